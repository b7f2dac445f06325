//! `ferrox status`: the node at a glance — the agent (over its status socket), the kernel, where
//! each program is attached, how full each map is, the IPAM blocks, and the warnings a person
//! should act on. Without the agent it still reports everything the pinned maps show, and says
//! the agent is down. The document is [`crate::observability::status::Status`].

use std::path::Path;

use ferrox_datapath::PinLayout;

use super::output::{Output, print_data, print_table};
use crate::observability::status::collect;

pub fn run(layout: &PinLayout, node_config: &Path, output: Output) -> anyhow::Result<()> {
    let s = collect(layout, node_config);
    match output {
        Output::Json | Output::Yaml => print_data(output, &s)?,
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
            let maps: Vec<[String; 4]> = s
                .maps
                .iter()
                .map(|m| {
                    [
                        m.name.into(),
                        format!("{} / {}", m.entries, m.capacity),
                        format!("{:.1}%", m.percent),
                        format!(
                            "{:.1} MiB{}",
                            m.bytes as f64 / f64::from(1 << 20),
                            if m.preallocated { "" } else { " (as filled)" }
                        ),
                    ]
                })
                .collect();
            print_table(["MAP", "ENTRIES", "FILL", "MEMORY"], &maps);
            if let Some(m) = &s.maglev {
                println!(
                    "maglev: {} external frontends on {} distinct tables, {:.1} MiB",
                    m.frontends,
                    m.tables,
                    m.bytes as f64 / f64::from(1 << 20)
                );
            }
            println!(
                "all maps: {:.1} MiB of kernel memory",
                s.map_memory_bytes as f64 / f64::from(1 << 20)
            );
            println!();
            let links: Vec<[String; 2]> = s
                .attachments
                .iter()
                .map(|a| [a.link.clone(), a.target.clone()])
                .collect();
            print_table(["LINK", "ATTACHED TO"], &links);
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
