//! Service proxy rulesets in the shapes kube-proxy programs, so that `cargo xtask bench` can
//! compare ferrox with kube-proxy's iptables mode and nftables mode on equal terms: N ClusterIP
//! Services with E endpoints each, IPv4, TCP.
//!
//! The text mirrors what kube-proxy (pkg/proxy/iptables/proxier.go and
//! pkg/proxy/nftables/proxier.go in kubernetes/kubernetes, v1.3x) hands to `iptables-restore`
//! and to `nft -f`, for a kube-proxy configured the common way: `--cluster-cidr` local-traffic
//! detection with the pod CIDR 10.244.0.0/16, masquerade bit 14 (mark 0x4000), NodePorts on all
//! addresses, no `--masquerade-all`, Services with `Cluster` traffic policies, no session
//! affinity, one port named `http`.
//!
//! Where the benchmark needs something kube-proxy does differently, each function's doc says so:
//! the full loads replace everything (kube-proxy installs its hook jumps with separate `iptables`
//! calls and never deletes its nft table), the iptables output is the `nat` table only (kube-proxy
//! also rewrites a handful of `filter` chains on every sync), and the Services are in the order
//! given (kube-proxy iterates a Go map, so its order is random on every sync).
//!
//! Chain names are hashed exactly like kube-proxy's (base32 of SHA-256, the SHA-256 written
//! here rather than adding a dependency to this crate), so the rules carry the same names and
//! lengths as on a real node.

use std::{fmt::Write as _, net::Ipv4Addr};

/// One ClusterIP Service port and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// Namespace of the generated Services.
const NAMESPACE: &str = "bench";
/// Name of every Service port (kube-proxy puts it in chain names and comments).
const PORT_NAME: &str = "http";
/// The only protocol generated; kube-proxy lower-cases `TCP` for names and matches.
const PROTOCOL: &str = "tcp";
/// Port of every generated Service.
const SERVICE_PORT: u16 = 80;
/// Target port of every generated endpoint.
const ENDPOINT_PORT: u16 = 8080;
/// First ClusterIP handed out by [`services`].
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// First endpoint address handed out by [`services`].
const FIRST_ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The pod CIDR of kube-proxy's `--cluster-cidr` local-traffic detector: traffic to a ClusterIP
/// from outside it gets masqueraded (`! -s` in iptables, `ip saddr !=` in nftables).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Service CIDR (the kubeadm default), which kube-proxy's nftables mode learns from the
/// ServiceCIDR objects and drops unallocated addresses of.
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's masquerade mark: `1 << --masquerade-bit`, default bit 14.
const MASQ_MARK: &str = "0x4000";
/// kube-proxy iptables' `largeClusterEndpointsThreshold`: with more endpoints than this in total
/// it stops writing the per-endpoint comments ("large cluster mode").
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// `n` Services "svc-0".."svc-{n-1}" in namespace "bench", cluster IPs from 10.96.0.10 upwards
/// (skipping any address whose last octet is 0 or 255), port 80, each with `e` endpoints
/// `10.244.x.y:8080`, distinct across all Services: consecutive addresses from 10.244.0.2, with
/// the same skipping. (Past 65,024 endpoints the addresses run on into 10.245.0.0/16 and beyond,
/// outside the pod CIDR; that changes no rule's shape.)
pub fn services(n: usize, e: usize) -> Vec<Svc> {
    let mut cluster_ips = usable_ips(FIRST_CLUSTER_IP);
    let mut endpoint_ips = usable_ips(FIRST_ENDPOINT_IP);
    (0..n)
        .map(|i| {
            let endpoints: Vec<_> = endpoint_ips
                .by_ref()
                .take(e)
                .map(|ip| (ip, ENDPOINT_PORT))
                .collect();
            assert_eq!(
                endpoints.len(),
                e,
                "services: IPv4 endpoint addresses exhausted"
            );
            Svc {
                namespace: NAMESPACE.to_owned(),
                name: format!("svc-{i}"),
                cluster_ip: cluster_ips
                    .next()
                    .expect("services: IPv4 cluster addresses exhausted"),
                port: SERVICE_PORT,
                endpoints,
            }
        })
        .collect()
}

/// Addresses from `first` upwards whose last octet is neither 0 nor 255.
fn usable_ips(first: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> {
    (u32::from(first)..=u32::MAX)
        .map(Ipv4Addr::from)
        .filter(|ip| !matches!(ip.octets()[3], 0 | 255))
}

// ---------------------------------------------------------------------------------------------
// Names, as kube-proxy derives them.
// ---------------------------------------------------------------------------------------------

/// kube-proxy's `ServicePortName.String()`: `namespace/name:portname`. Used in iptables chain
/// hashes and comments.
fn service_port_name(ns: &str, name: &str, port_name: &str) -> String {
    format!("{ns}/{name}:{port_name}")
}

/// `ip:port`, like kube-proxy's `BaseEndpointInfo.String()` for IPv4.
fn endpoint_string((ip, port): (Ipv4Addr, u16)) -> String {
    format!("{ip}:{port}")
}

/// The first `chars` characters of base32 (RFC 4648 alphabet, as Go's
/// `base32.StdEncoding`) of SHA-256 of `input`.
fn sha256_base32_prefix(input: &str, chars: usize) -> String {
    base32_prefix(&sha256(input.as_bytes()), chars)
}

/// iptables `KUBE-SVC-<16>`: kube-proxy's `servicePortPolicyClusterChain`, i.e. `portProtoHash`
/// = base32(sha256(servicePortName + protocol))[:16].
fn kube_svc_chain(spn: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        sha256_base32_prefix(&format!("{spn}{PROTOCOL}"), 16)
    )
}

/// iptables `KUBE-SEP-<16>`: kube-proxy's `servicePortEndpointChainName`,
/// base32(sha256(servicePortName + protocol + "ip:port"))[:16].
fn kube_sep_chain(spn: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        sha256_base32_prefix(&format!("{spn}{PROTOCOL}{endpoint}"), 16)
    )
}

/// kube-proxy nftables' `hashAndTruncate`: `<8 chars of base32(sha256(name))>-<name>`, cut to
/// 240 characters (nft's 256 less the longest prefix) with a trailing "...".
fn nft_hash_and_truncate(name: &str) -> String {
    const CHAIN_NAME_BASE_LENGTH_MAX: usize = 256 - 16;
    let mut base = format!("{}-{name}", sha256_base32_prefix(name, 8));
    if base.len() > CHAIN_NAME_BASE_LENGTH_MAX {
        // Kubernetes names and IPv4 addresses are ASCII, so any byte index is a char boundary.
        base.truncate(CHAIN_NAME_BASE_LENGTH_MAX - 3);
        base.push_str("...");
    }
    base
}

/// nftables `service-<HASH8>-<ns>/<name>/tcp/<portname>`: kube-proxy's
/// `servicePortChainNameBase` with the `Cluster` policy prefix. nft takes the slashes unquoted.
fn nft_service_chain(ns: &str, name: &str, port_name: &str) -> String {
    format!(
        "service-{}",
        nft_hash_and_truncate(&format!("{ns}/{name}/{PROTOCOL}/{port_name}"))
    )
}

/// nftables `endpoint-<HASH8>-<ns>/<name>/tcp/<portname>__<ip>/<port>`: kube-proxy's
/// `servicePortEndpointChainNameBase` with the endpoint prefix.
fn nft_endpoint_chain(
    ns: &str,
    name: &str,
    port_name: &str,
    (ip, port): (Ipv4Addr, u16),
) -> String {
    format!(
        "endpoint-{}",
        nft_hash_and_truncate(&format!("{ns}/{name}/{PROTOCOL}/{port_name}__{ip}/{port}"))
    )
}

// ---------------------------------------------------------------------------------------------
// iptables mode
// ---------------------------------------------------------------------------------------------

/// Writes one line into a `String` (which cannot fail).
macro_rules! out {
    ($buf:expr, $($arg:tt)*) => {{
        let _ = writeln!($buf, $($arg)*);
    }};
}

/// The `nat` part of an `iptables-restore` input, built like kube-proxy's `natChains` and
/// `natRules` line buffers: all `:CHAIN - [0:0]` lines first, then all rules.
struct Nat {
    chains: String,
    rules: String,
    /// kube-proxy's `largeClusterMode`: per-endpoint comments are left out.
    large_cluster: bool,
}

impl Nat {
    fn new(svcs: &[&Svc]) -> Self {
        let total_endpoints: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
        Self {
            chains: String::new(),
            rules: String::new(),
            large_cluster: total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
        }
    }

    /// `:CHAIN - [0:0]` (kube-proxy's `MakeChainLine`); in `iptables-restore --noflush` this
    /// creates the chain or flushes it.
    fn chain(&mut self, name: &str) {
        out!(self.chains, ":{name} - [0:0]");
    }

    /// kube-proxy's `appendServiceCommentLocked`: ` -m comment --comment <c>`, or nothing in large
    /// cluster mode.
    fn endpoint_comment(&self, comment: &str) -> String {
        if self.large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment {comment}")
        }
    }

    /// The four top-level chains kube-proxy declares (and so flushes) on every sync, full or
    /// partial, and their fixed rules.
    fn top_level(&mut self) {
        for chain in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            self.chain(chain);
        }
        // Masquerade only what KUBE-MARK-MASQ marked; clear the mark so a packet that goes through
        // the stack again is not masqueraded twice.
        out!(
            self.rules,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
        );
        out!(
            self.rules,
            "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
        );
        out!(
            self.rules,
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        );
        out!(
            self.rules,
            "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
        );
    }

    /// A Service's rules, in kube-proxy's order: its `KUBE-SERVICES` rule and, if `with_chains`,
    /// its `KUBE-SVC` chain and `KUBE-SEP` chains (a partial sync leaves out the chains of
    /// unchanged Services but still rewrites their `KUBE-SERVICES` rule).
    ///
    /// kube-proxy writes a Service without endpoints as a REJECT rule in the `filter` table and
    /// nothing in `nat`; only the `nat` table is generated here, so such a Service gets nothing.
    fn service(&mut self, svc: &Svc, with_chains: bool) {
        if svc.endpoints.is_empty() {
            return;
        }
        let spn = service_port_name(&svc.namespace, &svc.name, PORT_NAME);
        let svc_chain = kube_svc_chain(&spn);
        // kube-proxy's argument order (`iptables-save` prints the same rule as
        // `-d <ip>/32 -p tcp -m comment --comment ... -m tcp --dport ...`).
        let cluster_ip_match = format!(
            "-m comment --comment \"{spn} cluster IP\" -m {PROTOCOL} -p {PROTOCOL} -d {} --dport {}",
            svc.cluster_ip, svc.port
        );
        out!(
            self.rules,
            "-A KUBE-SERVICES {cluster_ip_match} -j {svc_chain}"
        );
        if !with_chains {
            return;
        }

        self.chain(&svc_chain);
        // "Set up internal traffic handling": masquerade off-cluster traffic to the ClusterIP
        // (the local detector's `IfNotLocal()` is `! -s <cluster CIDR>`).
        out!(
            self.rules,
            "-A {svc_chain} {cluster_ip_match} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        );
        // `writeServiceToEndpointRules`: endpoint i of n is taken with probability 1/(n-i), the
        // last one unconditionally, so that each is picked with probability 1/n.
        let n = svc.endpoints.len();
        for (i, &ep) in svc.endpoints.iter().enumerate() {
            let ep_str = endpoint_string(ep);
            let mut rule = format!(
                "-A {svc_chain}{}",
                self.endpoint_comment(&format!("\"{spn} -> {ep_str}\""))
            );
            if i + 1 < n {
                // kube-proxy's `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
                let _ = write!(
                    rule,
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                );
            }
            out!(self.rules, "{rule} -j {}", kube_sep_chain(&spn, &ep_str));
        }
        // The per-endpoint chains: masquerade hairpin traffic (a pod reaching itself through the
        // Service), then DNAT.
        for &ep in &svc.endpoints {
            let ep_str = endpoint_string(ep);
            let sep = kube_sep_chain(&spn, &ep_str);
            self.chain(&sep);
            let comment = self.endpoint_comment(&spn);
            out!(
                self.rules,
                "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ",
                ep.0
            );
            out!(
                self.rules,
                "-A {sep}{comment} -m {PROTOCOL} -p {PROTOCOL} -j DNAT --to-destination {ep_str}"
            );
        }
    }

    /// "Finally, tail-call to the nodePorts chain": the last rule of `KUBE-SERVICES` (NodePorts
    /// on all local addresses, localhost NodePorts allowed: kube-proxy's defaults).
    fn nodeports_tail(&mut self) {
        out!(
            self.rules,
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        );
    }

    fn finish(self) -> String {
        format!("*nat\n{}{}COMMIT\n", self.chains, self.rules)
    }
}

/// kube-proxy iptables mode, full sync, as input for a plain (flushing) `iptables-restore`: the
/// `nat` table only (nothing in it needs `filter`).
///
/// Chains `KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, one
/// `KUBE-SVC-<16>` per Service and one `KUBE-SEP-<16>` per endpoint, named by kube-proxy's hashes;
/// rules in kube-proxy's order and argument order, with its comments (the per-endpoint ones left
/// out above 1000 endpoints in total, like kube-proxy's large cluster mode); `KUBE-SERVICES` ends
/// with the `--dst-type LOCAL -j KUBE-NODEPORTS` rule. The Services appear in `KUBE-SERVICES` in
/// the order given.
///
/// Differences from kube-proxy, for a self-contained load: the jumps from `PREROUTING`/`OUTPUT`
/// to `KUBE-SERVICES` and from `POSTROUTING` to `KUBE-POSTROUTING` are in the file (kube-proxy
/// adds them with `iptables -I` calls and then runs `iptables-restore --noflush`), and the
/// `filter` table chains kube-proxy rewrites on each sync (KUBE-FORWARD and friends) are absent.
pub fn iptables_full(svcs: &[Svc]) -> String {
    let mut nat = Nat::new(&svcs.iter().collect::<Vec<_>>());
    nat.top_level();
    // kube-proxy's `iptablesJumpChains` for the nat table, in its order.
    for hook in ["OUTPUT", "PREROUTING"] {
        out!(
            nat.rules,
            "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
    out!(
        nat.rules,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    for svc in svcs {
        nat.service(svc, true);
    }
    nat.nodeports_tail();
    nat.finish()
}

/// kube-proxy iptables partial sync after `new` was added while `existing` are programmed, as
/// input for `iptables-restore --noflush`: declares (and so flushes) `KUBE-SERVICES` and the other
/// three top-level chains kube-proxy declares on every sync, and `new`'s `KUBE-SVC`/`KUBE-SEP`
/// chains; rewrites every `KUBE-SERVICES` rule (`existing` then `new`, then the NodePorts rule),
/// the fixed `KUBE-POSTROUTING`/`KUBE-MARK-MASQ` rules, and `new`'s chains' rules. The chains
/// of `existing` are untouched.
///
/// Differences from kube-proxy: the `filter` table part is absent, and kube-proxy (outside large
/// cluster mode) also runs `iptables-save -t nat` before each sync to find stale chains.
pub fn iptables_add_one(existing: &[Svc], new: &Svc) -> String {
    let all: Vec<&Svc> = existing.iter().chain(std::iter::once(new)).collect();
    let mut nat = Nat::new(&all);
    nat.top_level();
    for svc in existing {
        nat.service(svc, false);
    }
    nat.service(new, true);
    nat.nodeports_tail();
    nat.finish()
}

// ---------------------------------------------------------------------------------------------
// nftables mode
// ---------------------------------------------------------------------------------------------

/// `<family> <table>` of kube-proxy's IPv4 nftables table.
const NFT_TABLE: &str = "ip kube-proxy";

/// kube-proxy's `nftablesBaseChains`: name, type, hook, priority. knftables writes priorities as
/// numbers: `dstnat` is -100 and `srcnat` 100 in the `ip` family, so `dstnat-10` is -110.
const NFT_BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// kube-proxy's `nftablesJumpChains`: destination chain, base chain jumping to it, match.
const NFT_JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new ",
    ),
];

/// kube-proxy's `ensureChain`: `add chain` + `flush chain`, once per chain per transaction.
fn nft_ensure_chain<'a>(out: &mut String, created: &mut Vec<&'a str>, chain: &'a str) {
    if created.contains(&chain) {
        return;
    }
    created.push(chain);
    out!(out, "add chain {NFT_TABLE} {chain}");
    out!(out, "flush chain {NFT_TABLE} {chain}");
}

/// kube-proxy's `setupNFTables` (run on every full sync) for IPv4, NodePorts on all addresses,
/// in its order, as knftables writes it.
fn nft_setup(out: &mut String) {
    let t = NFT_TABLE;
    out!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // kube-proxy's first sync adds and deletes each base chain so that they are re-created with
    // the properties below.
    for (name, ..) in NFT_BASE_CHAINS {
        out!(out, "add chain {t} {name}");
        out!(out, "delete chain {t} {name}");
    }
    for (name, kind, hook, priority) in NFT_BASE_CHAINS {
        out!(
            out,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
        out!(out, "flush chain {t} {name}");
    }
    let mut created = Vec::new();
    for (dst, src, matches) in NFT_JUMP_CHAINS {
        nft_ensure_chain(out, &mut created, dst);
        out!(out, "add rule {t} {src} {matches}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        nft_ensure_chain(out, &mut created, chain);
    }

    // Masquerading, as in iptables mode: mark in mark-for-masquerade, masquerade marked packets
    // (clearing the mark) in nat-postrouting.
    out!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    out!(
        out,
        "add rule {t} masquerading mark and {MASQ_MARK} == 0 return"
    );
    out!(
        out,
        "add rule {t} masquerading mark set mark xor {MASQ_MARK}"
    );
    out!(out, "add rule {t} masquerading masquerade fully-random");

    // Reject traffic to ClusterIPs on ports no Service has; drop traffic to unallocated ClusterIPs.
    out!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    out!(
        out,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    out!(
        out,
        "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );

    // NodePorts on all addresses: kube-proxy makes sure the nodeport-ips set does not exist.
    out!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    out!(out, "delete set {t} nodeport-ips");

    // Services without endpoints.
    out!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    out!(
        out,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    out!(
        out,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    out!(out, "flush chain {t} reject-chain");
    out!(out, "add rule {t} reject-chain reject");
    out!(
        out,
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    out!(
        out,
        "add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    );

    // LoadBalancerSourceRanges.
    out!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    nft_ensure_chain(out, &mut created, "firewall-check");
    out!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );

    // Service dispatch: one verdict-map lookup on (daddr, protocol, dport).
    out!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    out!(
        out,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    out!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    out!(
        out,
        "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );

    // A full sync re-fills every set and map.
    out!(out, "flush set {t} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        out!(out, "flush map {t} {map}");
    }
}

/// One Service as kube-proxy's nftables `syncProxyRules` writes it when the Service (or its
/// endpoints) changed: its chains (created and flushed), its set and map elements, then the rules
/// of its service chain and endpoint chains.
fn nft_service(out: &mut String, svc: &Svc) {
    let t = NFT_TABLE;
    let (ip, port) = (svc.cluster_ip, svc.port);
    if svc.endpoints.is_empty() {
        // No endpoints: no chains; the ClusterIP is rejected through @no-endpoint-services.
        let spn = service_port_name(&svc.namespace, &svc.name, PORT_NAME);
        out!(out, "add element {t} cluster-ips {{ {ip} }}");
        out!(
            out,
            "add element {t} no-endpoint-services {{ {ip} . {PROTOCOL} . {port} comment \"{spn}\" : goto reject-chain }}"
        );
        return;
    }
    let svc_chain = nft_service_chain(&svc.namespace, &svc.name, PORT_NAME);
    let ep_chains: Vec<String> = svc
        .endpoints
        .iter()
        .map(|&ep| nft_endpoint_chain(&svc.namespace, &svc.name, PORT_NAME, ep))
        .collect();
    let mut created = Vec::new();
    for chain in &ep_chains {
        nft_ensure_chain(out, &mut created, chain);
    }
    nft_ensure_chain(out, &mut created, &svc_chain);

    out!(out, "add element {t} cluster-ips {{ {ip} }}");
    out!(
        out,
        "add element {t} service-ips {{ {ip} . {PROTOCOL} . {port} : goto {svc_chain} }}"
    );

    // Masquerade off-cluster traffic to the ClusterIP (`IfNotLocalNFT()` of the cluster-CIDR
    // detector).
    out!(
        out,
        "add rule {t} {svc_chain} ip daddr {ip} {PROTOCOL} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
    );
    // `writeServiceToEndpointRules`: one random number picks the endpoint from an anonymous
    // verdict map (knftables.Concat puts spaces around the commas).
    let choices: Vec<String> = ep_chains
        .iter()
        .enumerate()
        .map(|(i, chain)| format!("{i} : goto {chain}"))
        .collect();
    out!(
        out,
        "add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}",
        ep_chains.len(),
        choices.join(" , ")
    );
    for (chain, &(ep_ip, ep_port)) in ep_chains.iter().zip(&svc.endpoints) {
        out!(
            out,
            "add rule {t} {chain} ip saddr {ep_ip} jump mark-for-masquerade"
        );
        out!(
            out,
            "add rule {t} {chain} meta l4proto {PROTOCOL} dnat to {ep_ip}:{ep_port}"
        );
    }
}

/// kube-proxy nftables mode, full ruleset, for `nft -f`: `add table ip kube-proxy` then
/// `delete table ip kube-proxy` so that the file replaces any previous one (kube-proxy never
/// deletes its table; it re-creates and flushes its base chains, chains, sets and maps instead,
/// which is the rest of the file), then kube-proxy's full-sync transaction: the table; base chains
/// (filter ones at `dstnat-10`/`dstnat+10`, `nat-prerouting`/`nat-output` at `dstnat`,
/// `nat-postrouting` at `srcnat`); `services` with `ip daddr . meta l4proto . th dport vmap
/// @service-ips`; `mark-for-masquerade`, `masquerading`, and the filter-side checks and maps; and
/// per Service its chain `service-<HASH8>-<ns>/<name>/tcp/http`, one endpoint chain per endpoint,
/// and its `service-ips` element. Chain names with slashes go unquoted, as knftables writes them
/// (nft accepts them).
pub fn nft_full(svcs: &[Svc]) -> String {
    let mut out = String::new();
    out!(out, "add table {NFT_TABLE}");
    out!(out, "delete table {NFT_TABLE}");
    nft_setup(&mut out);
    for svc in svcs {
        nft_service(&mut out, svc);
    }
    out
}

/// kube-proxy nftables partial sync for one new Service, as input for `nft -f` on top of
/// [`nft_full`]: its endpoint chains and service chain (added and flushed), its `cluster-ips` and
/// `service-ips` elements, and its chains' rules. (kube-proxy also runs `nft list chains` and
/// `nft list sets` before each sync to find stale ones.)
pub fn nft_add_one(new: &Svc) -> String {
    let mut out = String::new();
    nft_service(&mut out, new);
    out
}

// ---------------------------------------------------------------------------------------------
// SHA-256 and base32, for kube-proxy's chain-name hashes.
// ---------------------------------------------------------------------------------------------

/// SHA-256 (FIPS 180-4). The workspace has the `sha2` crate but this crate does not depend on it;
/// a chain-name hash is all that is needed here.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    // Padding: 0x80, zeros up to 56 mod 64, then the length in bits, big-endian.
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());

    // The padded length is a multiple of 64, so there is no remainder.
    for block in msg.as_chunks::<64>().0 {
        let mut w = [0u32; 64];
        for (wi, word) in w.iter_mut().zip(block.as_chunks::<4>().0) {
            *wi = u32::from_be_bytes(*word);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for (&k, &wi) in K.iter().zip(&w) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(k)
                .wrapping_add(wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut digest = [0u8; 32];
    for (chunk, v) in digest.as_chunks_mut::<4>().0.iter_mut().zip(h) {
        *chunk = v.to_be_bytes();
    }
    digest
}

/// The first `chars` characters of the RFC 4648 base32 encoding of `bytes` (Go's
/// `base32.StdEncoding`), for `chars` that need no padding.
fn base32_prefix(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    assert!(
        chars * 5 <= bytes.len() * 8,
        "base32_prefix: {chars} characters need more than {} bytes",
        bytes.len()
    );
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 && out.len() < chars {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
        if out.len() == chars {
            break;
        }
        acc &= (1 << bits) - 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{NetNs, leaks::NETNS_PREFIX};
    use std::{
        collections::HashSet,
        io::Write as _,
        process::{Command, Stdio},
        sync::atomic::{AtomicUsize, Ordering},
    };

    /// A scratch network namespace, so that nothing touches the machine's own rulesets. Named
    /// with the leak checker's prefix, so a leftover one is reported.
    fn scratch_ns() -> NetNs {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{NETNS_PREFIX}rules-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        NetNs::create(&name)
    }

    /// Runs `ip netns exec <ns> <argv>` with `stdin` on its standard input: its stdout, or what
    /// went wrong with its stderr.
    fn exec_in(ns: &NetNs, argv: &[&str], stdin: &str) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {argv:?}: {e}"))?;
        let mut pipe = child.stdin.take().expect("piped stdin");
        let input = stdin.to_owned();
        // Fed from a thread: the input can be megabytes while the child writes output.
        let feeder = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {argv:?}: {e}"))?;
        let fed = feeder.join().expect("stdin feeder panicked");
        if !out.status.success() {
            return Err(format!(
                "{argv:?} in {} failed ({}): {}",
                ns.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        fed.map_err(|e| format!("writing the input of {argv:?}: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn must(result: Result<String, String>) -> String {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The rules (`-A CHAIN ...` lines) of `chain`, in order.
    fn rules_of<'a>(ruleset: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        ruleset.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    /// The value after `flag` in an iptables rule.
    fn arg_after<'a>(rule: &'a str, flag: &str) -> Option<&'a str> {
        let mut words = rule.split_whitespace();
        words.find(|w| *w == flag)?;
        words.next()
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // The names in kube-proxy's own unit tests for ns1/svc1 port p80 -> 10.180.0.1:80.
        let spn = service_port_name("ns1", "svc1", "p80");
        assert_eq!(kube_svc_chain(&spn), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            kube_sep_chain(&spn, "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            nft_service_chain("ns1", "svc1", "p80"),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain("ns1", "svc1", "p80", (Ipv4Addr::new(10, 180, 0, 1), 80)),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        // And SHA-256 itself, on the FIPS 180-4 two-block example.
        let digest = sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    /// Test 1: `iptables-restore --test` accepts a 100×10 full sync; a real load, then a partial
    /// sync adding a 101st Service with `--noflush`, leave exactly 101 KUBE-SVC and 1010
    /// KUBE-SEP chains, with the new Service's rule last before the NodePorts rule.
    #[test]
    fn iptables_restore_accepts_full_and_partial_sync() {
        let all = services(101, 10);
        let (existing, new) = all.split_at(100);
        let new = &new[0];
        let full = iptables_full(existing);
        let partial = iptables_add_one(existing, new);

        let ns = scratch_ns();
        must(exec_in(&ns, &["iptables-restore", "--test"], &full));
        must(exec_in(&ns, &["iptables-restore"], &full));
        must(exec_in(&ns, &["iptables-restore", "--noflush"], &partial));

        let saved = must(exec_in(&ns, &["iptables-save", "-t", "nat"], ""));
        let count = |prefix: &str| saved.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count(":KUBE-SVC-"), 101, "KUBE-SVC chains in:\n{saved}");
        assert_eq!(count(":KUBE-SEP-"), 1010, "KUBE-SEP chains");
        let services_rules = rules_of(&saved, "KUBE-SERVICES");
        assert_eq!(services_rules.len(), 102, "KUBE-SERVICES rules");
        assert!(
            services_rules[100].contains(&format!("-d {}/32", new.cluster_ip)),
            "new Service not last: {}",
            services_rules[100]
        );
        assert!(services_rules[101].ends_with("-j KUBE-NODEPORTS"));
        // The hook jumps are there once (the partial sync must not have added more).
        assert_eq!(rules_of(&saved, "PREROUTING").len(), 1);
        assert_eq!(rules_of(&saved, "POSTROUTING").len(), 1);
    }

    /// Test 2: the structure of a 3×3 full sync.
    #[test]
    fn iptables_full_structure() {
        let svcs = services(3, 3);
        let full = iptables_full(&svcs);
        assert!(full.starts_with("*nat\n") && full.ends_with("COMMIT\n"));

        let svc_chain = kube_svc_chain(&service_port_name("bench", "svc-1", "http"));
        let svc_rules = rules_of(&full, &svc_chain);
        assert_eq!(svc_rules.len(), 4, "{svc_rules:#?}");
        assert!(
            svc_rules[0].contains(&format!("! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ")),
            "{}",
            svc_rules[0]
        );
        let probabilities: Vec<Option<&str>> = svc_rules[1..]
            .iter()
            .map(|r| arg_after(r, "--probability"))
            .collect();
        assert_eq!(
            probabilities,
            [Some("0.3333333333"), Some("0.5000000000"), None]
        );
        // Each jumps to its own endpoint's chain, which DNATs to that endpoint.
        for (rule, &ep) in svc_rules[1..].iter().zip(&svcs[1].endpoints) {
            let sep = arg_after(rule, "-j").expect("a jump");
            let sep_rules = rules_of(&full, sep);
            assert_eq!(sep_rules.len(), 2, "{sep_rules:#?}");
            assert!(sep_rules[0].ends_with(&format!("-s {} -j KUBE-MARK-MASQ", ep.0)));
            assert!(sep_rules[1].ends_with(&format!("--to-destination {}:8080", ep.0)));
        }

        let services_rules = rules_of(&full, "KUBE-SERVICES");
        assert_eq!(services_rules.len(), 4);
        assert!(
            services_rules[3].contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "{}",
            services_rules[3]
        );
        // The order given is kept, also when it is not the generated one.
        for order in [vec![0, 1, 2], vec![2, 0, 1]] {
            let reordered: Vec<Svc> = order.iter().map(|&i| svcs[i].clone()).collect();
            let text = iptables_full(&reordered);
            let ips: Vec<String> = rules_of(&text, "KUBE-SERVICES")[..3]
                .iter()
                .map(|r| arg_after(r, "-d").expect("a -d").to_owned())
                .collect();
            let expected: Vec<String> =
                reordered.iter().map(|s| s.cluster_ip.to_string()).collect();
            assert_eq!(ips, expected);
        }
    }

    /// kube-proxy's large cluster mode: per-endpoint comments only up to 1000 endpoints.
    #[test]
    fn iptables_large_cluster_mode_drops_endpoint_comments() {
        let sep_lines_with_comment = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("-A KUBE-SEP-") && l.contains("-m comment"))
                .count()
        };
        assert_eq!(
            sep_lines_with_comment(&iptables_full(&services(100, 10))),
            2000
        );
        assert_eq!(
            sep_lines_with_comment(&iptables_full(&services(101, 10))),
            0
        );
        let all = services(101, 10);
        assert_eq!(
            sep_lines_with_comment(&iptables_add_one(&all[..100], &all[100])),
            0
        );
    }

    /// Test 3: `nft -c` accepts a 100×10 full ruleset; a real load (twice: the file replaces the
    /// table), then adding a 101st Service (and one without endpoints), leaves 101 elements in the
    /// service-ips map.
    #[test]
    fn nft_accepts_full_and_incremental() {
        let all = services(101, 10);
        let full = nft_full(&all[..100]);
        let add = nft_add_one(&all[100]);

        let ns = scratch_ns();
        must(exec_in(&ns, &["nft", "-c", "-f", "-"], &full));
        must(exec_in(&ns, &["nft", "-f", "-"], &full));
        must(exec_in(&ns, &["nft", "-f", "-"], &full));
        must(exec_in(&ns, &["nft", "-f", "-"], &add));
        // A Service without endpoints goes to no-endpoint-services, not service-ips.
        let empty = Svc {
            name: "empty".to_owned(),
            cluster_ip: Ipv4Addr::new(10, 96, 9, 9),
            endpoints: Vec::new(),
            ..all[0].clone()
        };
        must(exec_in(&ns, &["nft", "-f", "-"], &nft_add_one(&empty)));
        let no_endpoints = must(exec_in(
            &ns,
            &[
                "nft",
                "list",
                "map",
                "ip",
                "kube-proxy",
                "no-endpoint-services",
            ],
            "",
        ));
        assert!(
            no_endpoints
                .contains("10.96.9.9 . tcp . 80 comment \"bench/empty:http\" : goto reject-chain"),
            "{no_endpoints}"
        );

        let map = must(exec_in(
            &ns,
            &["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
            "",
        ));
        assert_eq!(map.matches(" : goto service-").count(), 101, "{map}");
        assert!(map.contains(&format!(
            "{} . tcp . 80 : goto service-",
            all[100].cluster_ip
        )));

        let table = must(exec_in(
            &ns,
            &["nft", "list", "table", "ip", "kube-proxy"],
            "",
        ));
        // Per-Service chains are the ones with a slash (not, e.g., service-endpoints-check).
        let count = |prefix: &str| {
            table
                .lines()
                .filter(|l| l.trim_start().starts_with(prefix) && l.contains('/'))
                .count()
        };
        assert_eq!(count("chain service-"), 101, "{table}");
        assert_eq!(count("chain endpoint-"), 1010);
        // Loading the full file twice did not double the rules.
        let services_chain = must(exec_in(
            &ns,
            &["nft", "list", "chain", "ip", "kube-proxy", "services"],
            "",
        ));
        assert_eq!(
            services_chain.matches("vmap @").count(),
            2,
            "{services_chain}"
        );
    }

    /// Test 4: addresses are distinct and avoid .0 and .255, across octet boundaries.
    #[test]
    fn services_addresses() {
        let svcs = services(300, 250);
        assert_eq!(svcs.len(), 300);
        assert_eq!(svcs[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(svcs[0].endpoints[0], (Ipv4Addr::new(10, 244, 0, 2), 8080));
        assert_eq!(svcs[299].name, "svc-299");
        assert!(
            svcs.iter()
                .all(|s| s.namespace == "bench" && s.port == 80 && s.endpoints.len() == 250)
        );

        let cluster_ips: HashSet<Ipv4Addr> = svcs.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(cluster_ips.len(), 300, "cluster IPs repeat");
        let endpoints: HashSet<(Ipv4Addr, u16)> = svcs
            .iter()
            .flat_map(|s| s.endpoints.iter().copied())
            .collect();
        assert_eq!(endpoints.len(), 300 * 250, "endpoints repeat");
        let last_octets = cluster_ips
            .iter()
            .chain(endpoints.iter().map(|(ip, _)| ip))
            .map(|ip| ip.octets()[3]);
        for octet in last_octets {
            assert!(octet != 0 && octet != 255, "address ending in .{octet}");
        }
        // Endpoints stay in the pod CIDR while it lasts (75,000 > 65,024 spill into 10.245).
        assert!(
            svcs[..200]
                .iter()
                .flat_map(|s| &s.endpoints)
                .all(|(ip, _)| ip.octets()[..2] == [10, 244])
        );
    }
}
