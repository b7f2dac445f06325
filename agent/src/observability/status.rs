//! The status document: what only the agent knows about itself ([`AgentStatus`], served as
//! JSON on its owner-only unix socket beside the node configuration), and the node's status
//! ([`Status`]: the agent's document plus the kernel, attachments, map fill, IPAM and the
//! warnings a person should act on), collected from the pinned maps and files so that it is
//! complete while the agent is down. `ferrox status`, `ferrox bgp` and `/metrics` read it.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

/// Routing between nodes, as of the last time the agent programmed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingStatus {
    /// never, always or cross-subnet.
    pub mode: String,
    /// Where the routes come from (kubernetes: Node podCIDRs and IPAM blocks).
    pub source: String,
    /// Kernel routes to other nodes' pod blocks.
    pub routes: usize,
    /// Of those, the ones reached in IP-in-IP.
    pub tunnels: usize,
    /// Other nodes, the only sources of IP-in-IP accepted.
    pub peers: usize,
    /// Blocks that cannot be routed, with the reason ("10.244.3.0/24 (node-3): no route to ...").
    pub unroutable: Vec<String>,
    /// Unix seconds of the last apply.
    pub applied_unix: Option<u64>,
    /// The last failure, if the last apply failed.
    pub error: Option<String>,
}

/// What only the agent knows about itself, as `ferrox status` gets it over the agent's socket.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub last_sync_unix: Option<u64>,
    pub last_sync_seconds: f64,
    pub syncs_full: u64,
    pub syncs_incremental: u64,
    pub failures_map_full: u64,
    pub failures_other: u64,
    /// Entries the last sync could not program (the agent retries them).
    #[serde(default)]
    pub failing_entries: usize,
    pub frontends: usize,
    pub backends: usize,
    pub maglev_tables: usize,
    pub source_ranges: usize,
    pub services_skipped: usize,
    pub conntrack_expired: u64,
    pub flows_purged: u64,
    pub sockets_closed: u64,
    #[serde(default)]
    pub routing: Option<RoutingStatus>,
    /// BGP sessions, when the speaker runs.
    #[serde(default)]
    pub bgp_peers: Option<Vec<crate::bgp::speaker::PeerStatus>>,
    /// Best BGP routes, when the speaker runs.
    #[serde(default)]
    pub bgp_routes: Option<Vec<crate::bgp::speaker::LearnedRoute>>,
}

/// The agent's status socket: `agent.sock` beside the node configuration.
pub fn socket_path(node_config: &Path) -> PathBuf {
    node_config
        .parent()
        .unwrap_or(Path::new("/run/ferrox"))
        .join("agent.sock")
}

#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
    pub percent: f64,
    /// Kernel memory of the map (bytes).
    pub bytes: u64,
    /// Allocated at full capacity (false: entries are allocated as they are written).
    pub preallocated: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub link: String,
    pub target: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct IpamSummary {
    pub mode: ferrox_cni::node_config::IpamMode,
    pub blocks: Vec<String>,
    pub used: usize,
    pub capacity: usize,
    /// Files of the IPAM store that are not readable records (`ferrox ipam check` lists them).
    pub unreadable_records: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub kernel: String,
    /// `None` when the agent does not answer on its socket.
    pub agent: Option<AgentStatus>,
    pub datapath_loaded: bool,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<MapFill>,
    /// Kernel memory of every pinned map, those without a row in `maps` included, and of the
    /// Maglev tables (bytes).
    pub map_memory_bytes: u64,
    /// External frontends with a Maglev table, the distinct tables behind them, their memory.
    pub maglev: Option<ferrox_datapath::MaglevUsage>,
    pub ipam: Option<IpamSummary>,
    /// Drops that mean a limit was hit, by reason (packets).
    pub limit_drops: Vec<(String, u64)>,
    pub warnings: Vec<String>,
}

/// Answers every connection on the unix socket `path` (owner-only) with the agent's status
/// as one JSON document, until the task is dropped.
pub async fn serve(path: PathBuf, status: impl Fn() -> AgentStatus + Send + 'static) {
    use std::os::unix::fs::PermissionsExt as _;
    use tokio::io::AsyncWriteExt as _;
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot serve the status socket");
            return;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot restrict the status socket");
    }
    tracing::info!(path = %path.display(), "serving the status socket");
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let body = serde_json::to_vec(&status()).unwrap_or_default();
        tokio::spawn(async move {
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// What the agent says over its status socket; `None` when it does not answer.
pub fn agent_status(socket: &Path) -> Option<AgentStatus> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

fn fill(name: &'static str, entries: usize, capacity: u32) -> MapFill {
    MapFill {
        name,
        entries,
        capacity,
        percent: entries as f64 * 100.0 / f64::from(capacity.max(1)),
        bytes: 0,
        preallocated: false,
    }
}

/// Collects the status of the node, asking the agent over its socket.
pub fn collect(layout: &PinLayout, node_config: &Path) -> Status {
    collect_with(layout, node_config, agent_status(&socket_path(node_config)))
}

/// Collects the status of the node with what the agent says (`None`: it does not answer).
pub fn collect_with(layout: &PinLayout, node_config: &Path, agent: Option<AgentStatus>) -> Status {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut warnings = Vec::new();
    match &agent {
        None => warnings.push(format!(
            "the agent does not answer on {}: Services, endpoints and addresses are not being updated (traffic goes on with what is programmed)",
            socket_path(node_config).display()
        )),
        Some(a) => {
            if a.last_sync_unix.is_none() {
                warnings.push("the agent has not synced the service maps yet".into());
            }
            if a.failing_entries > 0 {
                warnings.push(format!(
                    "{} service entries could not be programmed (a full map: {} so far); they keep their previous state and the agent retries them",
                    a.failing_entries, a.failures_map_full
                ));
            }
        }
    }
    let maps = Maps::open(layout).ok();
    let datapath_loaded = maps.is_some();
    if !datapath_loaded {
        warnings.push(format!(
            "no datapath is pinned at {}",
            layout.root().display()
        ));
    }
    let mut fills = Vec::new();
    let mut map_memory_bytes = 0;
    let mut maglev = None;
    let mut limit_drops = Vec::new();
    if let Some(m) = &maps {
        fills = vec![
            fill(
                "services",
                m.services.len().unwrap_or(0),
                m.services.capacity(),
            ),
            fill(
                "backends",
                m.backends.len().unwrap_or(0),
                m.backends.capacity(),
            ),
            fill(
                "conntrack",
                m.conntrack.len().unwrap_or(0),
                m.conntrack.capacity(),
            ),
            fill(
                "socket-revnat",
                m.sock_revnat.len().unwrap_or(0),
                m.sock_revnat.capacity(),
            ),
            fill(
                "affinity",
                m.affinity.len().unwrap_or(0),
                m.affinity.capacity(),
            ),
            fill(
                "endpoints",
                m.endpoints.len().unwrap_or(0),
                m.endpoints.capacity(),
            ),
            fill("nodes", m.nodes.len().unwrap_or(0), m.nodes.capacity()),
        ];
        let pinned_names = [
            ferrox_abi::map_names::SERVICES,
            ferrox_abi::map_names::BACKENDS,
            ferrox_abi::map_names::CONNTRACK,
            ferrox_abi::map_names::SOCK_REVNAT,
            ferrox_abi::map_names::AFFINITY,
            ferrox_abi::map_names::ENDPOINTS,
            ferrox_abi::map_names::NODES,
        ];
        let memory = ferrox_datapath::map_memory(layout).unwrap_or_default();
        for (f, pinned) in fills.iter_mut().zip(pinned_names) {
            if let Some(m) = memory.iter().find(|m| m.name == pinned) {
                f.bytes = m.bytes;
                f.preallocated = m.preallocated;
            }
        }
        maglev = ferrox_datapath::MaglevTables::open(layout)
            .and_then(|t| t.usage())
            .ok();
        map_memory_bytes =
            memory.iter().map(|m| m.bytes).sum::<u64>() + maglev.map_or(0, |u| u.bytes);
        for m in memory.iter().filter(|m| m.name.starts_with("resize/")) {
            warnings.push(format!(
                "map {} is pinned: a resize has not finished (the agent finishes it when it starts)",
                m.name
            ));
        }
        for f in &fills {
            if f.percent >= 90.0 {
                warnings.push(format!(
                    "map {} is {:.0}% full ({} of {})",
                    f.name, f.percent, f.entries, f.capacity
                ));
            }
        }
        for row in m.counters.snapshot().unwrap_or_default() {
            let limit = matches!(
                row.reason,
                "conntrack-full" | "revnat-full" | "snat-exhausted"
            );
            if limit && row.packets > 0 {
                warnings.push(format!(
                    "{} packets dropped at {} for {}",
                    row.packets, row.hook, row.reason
                ));
                limit_drops.push((format!("{}/{}", row.hook, row.reason), row.packets));
            }
        }
    }
    let attachments = ferrox_datapath::inventory(layout)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| {
            o.target.map(|t| Attachment {
                link: o.name,
                target: match t {
                    ferrox_datapath::LinkTarget::Cgroup { cgroup_id, .. } => {
                        format!("cgroup {cgroup_id}")
                    }
                    ferrox_datapath::LinkTarget::Tcx { ifindex, .. } => {
                        let name = nix::net::if_::if_indextoname(ifindex)
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|_| "gone".into());
                        format!("tcx {name} ({ifindex})")
                    }
                    ferrox_datapath::LinkTarget::Xdp { ifindex } => {
                        format!("xdp ifindex {ifindex}")
                    }
                    ferrox_datapath::LinkTarget::TcFilter { ifindex, .. } => {
                        let name = nix::net::if_::if_indextoname(ifindex)
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|_| "gone".into());
                        format!("tc filter {name} ({ifindex})")
                    }
                    other => format!("{other:?}"),
                },
            })
        })
        .collect();
    let ipam = ferrox_cni::node_config::NodeConfig::read(node_config)
        .ok()
        .map(|c| {
            let scan = ferrox_cni::ipam::Store::new(&c.ipam_dir)
                .scan()
                .unwrap_or_default();
            let capacity = c.pod_cidrs.iter().map(|b| b.hosts().count()).sum();
            IpamSummary {
                mode: c.ipam_mode,
                blocks: c.pod_cidrs.iter().map(ToString::to_string).collect(),
                used: scan.allocations.len(),
                capacity,
                unreadable_records: scan.bad.len(),
            }
        });
    if let Some(r) = agent.as_ref().and_then(|a| a.routing.as_ref()) {
        if let Some(e) = &r.error {
            warnings.push(format!("programming routes failed: {e}"));
        }
        for u in &r.unroutable {
            warnings.push(format!("pod block not routed: {u}"));
        }
    }
    for p in agent
        .as_ref()
        .and_then(|a| a.bgp_peers.as_ref())
        .into_iter()
        .flatten()
    {
        if p.state != "established" {
            warnings.push(format!(
                "BGP session with {} ({}) is {}{}",
                p.name,
                p.addr,
                p.state,
                p.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(i) = &ipam
        && i.unreadable_records > 0
    {
        warnings.push(format!(
            "{} files of the IPAM store are not readable allocation records; their addresses are kept out of use (`ferrox ipam check` lists them, `ferrox ipam release IP` frees one)",
            i.unreadable_records
        ));
    }
    if let Some(i) = &ipam
        && i.mode == ferrox_cni::node_config::IpamMode::Kubernetes
        && i.used * 10 >= i.capacity * 9
    {
        warnings.push(format!(
            "{} of {} pod addresses in use: the node's podCIDRs are nearly full",
            i.used, i.capacity
        ));
    }
    Status {
        kernel,
        agent,
        datapath_loaded,
        attachments,
        maps: fills,
        map_memory_bytes,
        maglev,
        ipam,
        limit_drops,
        warnings,
    }
}
