//! `ferrox agent`'s flags (each with its environment variable, as the DaemonSet sets them) and
//! the settings they name.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::logging::LogFormat;

/// How pod traffic reaches other nodes (Calico's ipipMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TunnelSetting {
    /// Routed as is: the underlay must carry pod addresses (one L2 segment, or BGP to the
    /// routers).
    Never,
    /// IP-in-IP to every other node.
    Always,
    /// IP-in-IP only to nodes outside this node's subnet; direct within it.
    CrossSubnet,
}

fn parse_pool_mode(
    s: &str,
) -> Result<(ipnet::Ipv4Net, ferrox_cni::node_config::TunnelMode), String> {
    crate::routing::plan::Modes::parse_pool(s)
}

impl TunnelSetting {
    pub fn mode(self) -> ferrox_cni::node_config::TunnelMode {
        use ferrox_cni::node_config::TunnelMode;
        match self {
            Self::Never => TunnelMode::Never,
            Self::Always => TunnelMode::Always,
            Self::CrossSubnet => TunnelMode::CrossSubnet,
        }
    }
}

/// Where pod addresses come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IpamSetting {
    Kubernetes,
    Pools,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum XdpSetting {
    #[default]
    Off,
    Native,
    Generic,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (its Node object).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Kubeconfig to reach the API server; without it, the in-cluster configuration is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The API server to talk to, as `https://host:port` or `host:port` (like Cilium's
    /// k8sServiceHost/k8sServicePort): on a cluster without kube-proxy the in-cluster address
    /// (the `kubernetes` Service's ClusterIP) is not reachable until ferrox itself runs, so the
    /// agent must reach the API server directly. Credentials still come from the kubeconfig or
    /// the pod's service account.
    #[arg(long, env = "FERROX_K8S_API_SERVER", value_parser = parse_api_server)]
    pub k8s_api_server: Option<String>,

    /// cgroup v2 whose sockets get service translation; default: the cgroup2 root.
    #[arg(long, env = "FERROX_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// The node's uplink interface; default: the interface of the default route.
    #[arg(long, env = "FERROX_UPLINK")]
    pub uplink: Option<String>,

    /// Where to write the node configuration the CNI plugin reads.
    #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
    pub node_config: PathBuf,

    /// Directory of the IPAM store (handed to the CNI plugin through the node configuration).
    #[arg(long, env = "FERROX_IPAM_DIR", default_value = "/var/lib/ferrox/ipam")]
    pub ipam_dir: PathBuf,

    /// Pod CIDR of this node; default: the Node's spec.podCIDRs.
    #[arg(long, env = "FERROX_POD_CIDR")]
    pub pod_cidr: Vec<ipnet::Ipv4Net>,

    /// Node addresses that serve NodePorts (CIDRs, comma-separated or repeated); default: the
    /// Node's InternalIP/ExternalIP addresses and 127.0.0.1.
    #[arg(long, env = "FERROX_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<ipnet::Ipv4Net>,

    /// Where `/healthz` is served (kube-proxy's port).
    #[arg(
        long,
        env = "FERROX_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: std::net::SocketAddr,

    /// Conntrack: seconds a TCP flow may stay idle before it is forgotten.
    #[arg(long, env = "FERROX_CT_TCP_TIMEOUT", default_value_t = 21_600)]
    pub ct_tcp_timeout: u64,

    /// Conntrack: seconds a TCP flow is kept after a FIN or RST.
    #[arg(long, env = "FERROX_CT_TCP_CLOSE_TIMEOUT", default_value_t = 10)]
    pub ct_tcp_close_timeout: u64,

    /// Conntrack: seconds a UDP flow may stay idle before it is forgotten.
    #[arg(long, env = "FERROX_CT_UDP_TIMEOUT", default_value_t = 60)]
    pub ct_udp_timeout: u64,

    /// Conntrack: seconds between two collections of expired flows.
    #[arg(long, env = "FERROX_CT_GC_INTERVAL", default_value_t = 15)]
    pub ct_gc_interval: u64,

    /// Maps: size the flow maps (conntrack, reverse NAT, affinity) as for a node with this much
    /// memory, in MiB; default: this machine's. Their capacity is about 0.5% of it, within
    /// floors and the full capacity at 20 GiB and more (`ferrox status` shows what was chosen).
    #[arg(long, env = "FERROX_MAP_SIZING_MEMORY_MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub map_sizing_memory_mib: Option<u64>,

    /// Maps: entries of the conntrack map, instead of the size derived from memory. A pinned
    /// map of another size is replaced, its flows carried over, with no traffic lost.
    #[arg(long, env = "FERROX_MAP_CONNTRACK_ENTRIES", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub map_conntrack_entries: Option<u32>,

    /// Maps: entries of the socket reverse-NAT map (replies of UDP Services to pods), instead
    /// of the size derived from memory.
    #[arg(long, env = "FERROX_MAP_SOCK_REVNAT_ENTRIES", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub map_sock_revnat_entries: Option<u32>,

    /// Maps: entries of the session-affinity map, instead of the size derived from memory.
    #[arg(long, env = "FERROX_MAP_AFFINITY_ENTRIES", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub map_affinity_entries: Option<u32>,

    /// Where `/metrics` is served (kube-proxy's metrics port).
    #[arg(
        long,
        env = "FERROX_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:10249"
    )]
    pub metrics_bind_address: std::net::SocketAddr,

    /// How pod traffic reaches other nodes: `never` (routed as is), `always` (IP-in-IP, done in
    /// eBPF) or `cross-subnet` (IP-in-IP only to nodes in other subnets). Pods get the uplink's
    /// MTU minus 20 in the IP-in-IP modes.
    #[arg(long, value_enum, env = "FERROX_TUNNEL_MODE", default_value_t = TunnelSetting::CrossSubnet)]
    pub tunnel_mode: TunnelSetting,

    /// Per-pool tunnel modes, `CIDR=never|always|cross-subnet`, comma-separated or repeated:
    /// traffic to a pod block inside CIDR travels in that pool's mode (the narrowest pool wins;
    /// blocks in no pool use --tunnel-mode).
    #[arg(long, env = "FERROX_TUNNEL_MODE_POOLS", value_delimiter = ',', value_parser = parse_pool_mode)]
    pub tunnel_mode_pool: Vec<(ipnet::Ipv4Net, ferrox_cni::node_config::TunnelMode)>,

    /// Run the BGP speaker: announce this node's pod blocks to the --bgp-peers and route what
    /// they announce.
    #[arg(long, env = "FERROX_BGP", default_value_t = false, action = clap::ArgAction::Set)]
    pub bgp: bool,

    /// This node's AS number (4-octet numbers work).
    #[arg(long, env = "FERROX_BGP_AS", default_value_t = 64512)]
    pub bgp_as: u32,

    /// BGP neighbours: `name=address:as` (or `address:as`), comma-separated or repeated.
    #[arg(long, env = "FERROX_BGP_PEERS", value_delimiter = ',')]
    pub bgp_peers: Vec<String>,

    /// What the --bgp-peers are sent: podBlocks, serviceClusterIPs, serviceExternalIPs,
    /// serviceLoadBalancerIPs (BGPPeer objects say it in spec.export).
    #[arg(
        long,
        env = "FERROX_BGP_EXPORT",
        value_delimiter = ',',
        default_value = "podBlocks"
    )]
    pub bgp_export: Vec<String>,

    /// The Service ClusterIP range(s) announced to peers that export serviceClusterIPs, from
    /// every node (as Calico's serviceClusterIPs).
    #[arg(long, env = "FERROX_BGP_SERVICE_CLUSTER_IPS", value_delimiter = ',')]
    pub bgp_service_cluster_ips: Vec<ipnet::Ipv4Net>,

    /// Where the BGP MD5 keys are: a file per peer name (`mesh` for the node-to-node mesh),
    /// e.g. a Kubernetes Secret mounted there.
    #[arg(
        long,
        env = "FERROX_BGP_PASSWORD_DIR",
        default_value = "/etc/ferrox/bgp-passwords"
    )]
    pub bgp_password_dir: std::path::PathBuf,

    /// iBGP full mesh: every other Node is a peer (in --bgp-as), besides --bgp-peers.
    #[arg(long, env = "FERROX_BGP_MESH", default_value_t = true, action = clap::ArgAction::Set)]
    pub bgp_mesh: bool,

    /// TCP port the speaker listens on and connects to.
    #[arg(long, env = "FERROX_BGP_PORT", default_value_t = 179)]
    pub bgp_port: u16,

    /// Hold time offered to peers without one of their own (a BGPPeer's spec.holdTime), in
    /// seconds; each session uses the smaller of the offered and the peer's, keepalives every
    /// third of it; 0: no keepalives and no hold timer.
    #[arg(long, env = "FERROX_BGP_HOLD_TIME", default_value_t = 90)]
    pub bgp_hold_time: u16,

    /// Graceful restart time announced: how long peers keep this node's routes while the agent
    /// restarts (seconds). Also how long, after a restart, the node keeps the routes it had
    /// learned when peers do not all come back and send End-of-RIB.
    #[arg(long, env = "FERROX_BGP_RESTART_TIME", default_value_t = 120)]
    pub bgp_restart_time: u16,

    /// Seconds between connection attempts to a peer that is down.
    #[arg(long, env = "FERROX_BGP_CONNECT_RETRY", default_value_t = 5)]
    pub bgp_connect_retry: u64,

    /// The most prefixes each BGP peer may announce (a BGPPeer's spec.maxPrefixes overrides
    /// it): one more ends its session with a Cease (maximum number of prefixes reached) and
    /// removes its routes, so a misbehaving router cannot fill the node's routing table. 0: no
    /// limit.
    #[arg(long, env = "FERROX_BGP_MAX_PREFIXES", default_value_t = 0)]
    pub bgp_max_prefixes: u32,

    /// Seconds a peer that went over its maximum number of prefixes is refused before its
    /// session may come back (at once when its BGPPeer changes).
    #[arg(long, env = "FERROX_BGP_MAX_PREFIXES_RESTART", default_value_t = 60)]
    pub bgp_max_prefixes_restart: u64,

    /// Program routes to the other nodes' pod blocks (off: something else routes them).
    #[arg(long, env = "FERROX_ROUTES", default_value_t = true, action = clap::ArgAction::Set)]
    pub routes: bool,

    /// Where pod addresses come from: `kubernetes` (the Node's spec.podCIDRs) or `pools`
    /// (blocks claimed from --ipam-pool through the API, more as pods need them).
    #[arg(long, value_enum, env = "FERROX_IPAM", default_value_t = IpamSetting::Kubernetes)]
    pub ipam: IpamSetting,

    /// IP pools blocks are claimed from (CIDRs, comma-separated or repeated; same on every node).
    #[arg(long, env = "FERROX_IPAM_POOLS", value_delimiter = ',')]
    pub ipam_pool: Vec<ipnet::Ipv4Net>,

    /// Prefix length of the blocks pools are cut into.
    #[arg(long, env = "FERROX_IPAM_BLOCK_SIZE", default_value_t = 26, value_parser = clap::value_parser!(u8).range(16..=30))]
    pub ipam_block_size: u8,

    /// Claim another block when fewer free addresses than this are left in the node's blocks.
    #[arg(long, env = "FERROX_IPAM_LOW_WATER", default_value_t = 4)]
    pub ipam_low_water: usize,

    /// Seconds an address stays allocated after its pod is gone from this node without a CNI
    /// DEL, before the agent releases it.
    #[arg(long, env = "FERROX_IPAM_LEAK_GRACE", default_value_t = 900)]
    pub ipam_leak_grace: u64,

    /// Seconds between two checks for addresses of pods that are gone.
    #[arg(long, env = "FERROX_IPAM_GC_INTERVAL", default_value_t = 60)]
    pub ipam_gc_interval: u64,

    /// Seconds a block (not the node's last) stays empty before it is released.
    #[arg(long, env = "FERROX_IPAM_RELEASE_AFTER", default_value_t = 600)]
    pub ipam_release_after: u64,

    /// Enforce Kubernetes NetworkPolicies (watches every Pod, Namespace and NetworkPolicy).
    #[arg(long, env = "FERROX_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub network_policy: bool,

    /// MTU of pod interfaces; default: the uplink's MTU, minus 20 in the IP-in-IP modes.
    #[arg(long, env = "FERROX_MTU")]
    pub mtu: Option<u32>,

    /// XDP on the uplink: off, native (in the driver) or generic (any interface, slower).
    #[arg(long, value_enum, env = "FERROX_XDP", default_value_t = XdpSetting::Off)]
    pub xdp: XdpSetting,

    #[arg(long, value_enum, env = "FERROX_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Remove every pin, link and file the agent created, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

impl AgentArgs {
    /// The map capacities these flags ask for on this machine.
    pub fn sizing(&self) -> anyhow::Result<ferrox_datapath::Sizing> {
        let memory = match self.map_sizing_memory_mib {
            Some(mib) => mib.saturating_mul(1 << 20),
            None => ferrox_datapath::sizing::node_memory()?,
        };
        let mut s = ferrox_datapath::Sizing::for_memory(memory);
        if let Some(n) = self.map_conntrack_entries {
            s.conntrack = n;
        }
        if let Some(n) = self.map_sock_revnat_entries {
            s.sock_revnat = n;
        }
        if let Some(n) = self.map_affinity_entries {
            s.affinity = n;
        }
        Ok(s)
    }
}

/// `https://host:port`, `http://host:port` or `host:port` (HTTPS assumed) to a URL; `host` alone
/// gets the API server's usual port 6443.
pub fn parse_api_server(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("empty; give https://host:port".into());
    }
    let (scheme, rest) = match value.split_once("://") {
        Some((s @ ("https" | "http"), rest)) => (s, rest),
        Some((s, _)) => return Err(format!("scheme {s}:// is not http or https")),
        None => ("https", value),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("{value:?} is not host[:port] (no path allowed)"));
    }
    let has_port = match authority.rsplit_once(':') {
        // An IPv6 literal is bracketed: [::1]:6443.
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            port.parse::<u16>()
                .map_err(|_| format!("port {port:?} is not a number"))?;
            true
        }
        _ => false,
    };
    Ok(if has_port {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}:6443")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_forms() {
        for (given, want) in [
            ("https://10.0.0.1:6443", "https://10.0.0.1:6443"),
            ("10.0.0.1:443", "https://10.0.0.1:443"),
            ("cp.example.com", "https://cp.example.com:6443"),
            ("http://198.18.0.1:6443/", "http://198.18.0.1:6443"),
            ("[fd00::1]:6443", "https://[fd00::1]:6443"),
            ("[fd00::1]", "https://[fd00::1]:6443"),
        ] {
            assert_eq!(parse_api_server(given).as_deref(), Ok(want), "{given}");
        }
        for bad in ["", "ftp://x:1", "10.0.0.1:http", "https://x:6443/api"] {
            assert!(parse_api_server(bad).is_err(), "{bad:?} accepted");
        }
    }
}
