//! `ferrox endpoints`: this node's pod endpoints (address, host-side veth, pod, container) from
//! the endpoint map and the IPAM store, so it works while the agent is down.

use std::net::Ipv4Addr;

use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use super::output::{Output, print_data, print_table};

/// One pod endpoint of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    /// The host side of its veth, when the interface exists.
    pub veth: Option<String>,
    /// namespace/name, from the IPAM store when the node configuration is readable.
    pub pod: Option<String>,
    pub container_id: Option<String>,
}

pub fn run(
    layout: &PinLayout,
    node_config: &std::path::Path,
    output: Output,
) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let allocations = ferrox_cni::node_config::NodeConfig::read(node_config)
        .ok()
        .and_then(|c| ferrox_cni::ipam::Store::new(&c.ipam_dir).list().ok())
        .unwrap_or_default();
    let mut rows: Vec<EndpointRow> = maps
        .endpoints
        .entries()?
        .into_iter()
        .map(|(k, v)| {
            let ip = Ipv4Addr::from(k.addr.to_ne_bytes());
            let a = allocations.iter().find(|a| a.ip == ip);
            EndpointRow {
                ip,
                ifindex: v.ifindex,
                veth: nix::net::if_::if_indextoname(v.ifindex)
                    .ok()
                    .map(|n| n.to_string_lossy().into_owned()),
                pod: a
                    .filter(|a| !a.pod_name.is_empty())
                    .map(|a| format!("{}/{}", a.pod_namespace, a.pod_name)),
                container_id: a.map(|a| a.container_id.clone()),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.ip);
    match output {
        Output::Json | Output::Yaml => print_data(output, &rows)?,
        Output::Table => {
            let t: Vec<[String; 4]> = rows
                .iter()
                .map(|r| {
                    [
                        r.ip.to_string(),
                        r.veth
                            .clone()
                            .unwrap_or_else(|| format!("ifindex {} (gone)", r.ifindex)),
                        r.pod.clone().unwrap_or_default(),
                        r.container_id.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(["IP", "VETH", "POD", "CONTAINER"], &t);
        }
    }
    Ok(())
}
