//! `ferrox status`: the node at a glance — the agent (over its owner-only unix socket beside the
//! node configuration), the kernel, where each program is attached, how full each map is, the
//! IPAM blocks, and the warnings a person should act on. Without the agent it still reports
//! everything the pinned maps show, and says the agent is down.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use crate::{cli::Output, metrics::AgentStatus};

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
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub kernel: String,
    /// `None` when the agent does not answer on its socket.
    pub agent: Option<AgentStatus>,
    pub datapath_loaded: bool,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<MapFill>,
    pub ipam: Option<IpamSummary>,
    /// Drops that mean a limit was hit, by reason (packets).
    pub limit_drops: Vec<(String, u64)>,
    pub warnings: Vec<String>,
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
            if a.failures_map_full > 0 {
                warnings.push(format!(
                    "{} service entries could not be programmed because a map is full (they keep their previous state)",
                    a.failures_map_full
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
        ];
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
                    other => format!("{other:?}"),
                },
            })
        })
        .collect();
    let ipam = ferrox_cni::node_config::NodeConfig::read(node_config)
        .ok()
        .map(|c| {
            let used = ferrox_cni::ipam::Store::new(&c.ipam_dir)
                .list()
                .map(|a| a.len())
                .unwrap_or(0);
            let capacity = c.pod_cidrs.iter().map(|b| b.hosts().count()).sum();
            IpamSummary {
                mode: c.ipam_mode,
                blocks: c.pod_cidrs.iter().map(ToString::to_string).collect(),
                used,
                capacity,
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
        ipam,
        limit_drops,
        warnings,
    }
}

pub fn print(layout: &PinLayout, node_config: &Path, output: Output) -> anyhow::Result<()> {
    let s = collect(layout, node_config);
    match output {
        Output::Json | Output::Yaml => crate::inspect::print_data(output, &s)?,
        Output::Table => {
            println!("kernel      {}", s.kernel);
            match &s.agent {
                Some(a) => println!(
                    "agent       running (pid {}); {} frontends, {} backends; {} full and {} incremental syncs, last took {:.1} ms",
                    a.pid,
                    a.frontends,
                    a.backends,
                    a.syncs_full,
                    a.syncs_incremental,
                    a.last_sync_seconds * 1e3
                ),
                None => println!("agent       NOT RUNNING"),
            }
            println!(
                "datapath    {}",
                if s.datapath_loaded {
                    "loaded"
                } else {
                    "NOT LOADED"
                }
            );
            if let Some(r) = s.agent.as_ref().and_then(|a| a.routing.as_ref()) {
                println!(
                    "routing     {} from {}: {} routes to other nodes' blocks ({} in IP-in-IP), {} tunnel peers",
                    r.mode, r.source, r.routes, r.tunnels, r.peers
                );
            }
            if let Some(peers) = s.agent.as_ref().and_then(|a| a.bgp_peers.as_ref()) {
                let up = peers.iter().filter(|p| p.state == "established").count();
                let received: usize = peers.iter().map(|p| p.received).sum();
                println!(
                    "bgp         {up} of {} sessions established, {received} prefixes received",
                    peers.len()
                );
            }
            if let Some(i) = &s.ipam {
                println!(
                    "ipam        {:?}: {} of {} addresses in {}",
                    i.mode,
                    i.used,
                    i.capacity,
                    i.blocks.join(", ")
                );
            }
            println!();
            let maps: Vec<[String; 3]> = s
                .maps
                .iter()
                .map(|m| {
                    [
                        m.name.into(),
                        format!("{} / {}", m.entries, m.capacity),
                        format!("{:.1}%", m.percent),
                    ]
                })
                .collect();
            crate::inspect::print_table(["MAP", "ENTRIES", "FILL"], &maps);
            println!();
            let links: Vec<[String; 2]> = s
                .attachments
                .iter()
                .map(|a| [a.link.clone(), a.target.clone()])
                .collect();
            crate::inspect::print_table(["LINK", "ATTACHED TO"], &links);
            if !s.warnings.is_empty() {
                println!();
                for w in &s.warnings {
                    println!("WARNING: {w}");
                }
            }
        }
    }
    Ok(())
}
