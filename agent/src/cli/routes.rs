//! `ferrox routes`: the routes to other nodes' pod blocks as the kernel holds them (ours carry
//! protocol 243), joined with the tunnel map entry of each, and the nodes IP-in-IP is accepted
//! from. Reads the kernel and the pinned maps only, so it works with the agent down.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ferrox_cni::netlink::Netlink;
use ferrox_datapath::{Maps, PinLayout};
use ipnet::Ipv4Net;
use serde::Serialize;

use super::output::{Output, print_data, print_table};
use crate::routing::kernel;

/// One remote pod block.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteRow {
    pub prefix: Ipv4Net,
    /// Next hops of the kernel route (empty: no kernel route, a tunnel entry alone).
    pub via: Vec<Ipv4Addr>,
    /// `ipip` (the datapath wraps packets to `remote`) or `direct`.
    pub encap: String,
    /// Outer destination of the IP-in-IP, for `ipip`.
    pub remote: Option<Ipv4Addr>,
    /// Path MTU of the kernel route, when set.
    pub mtu: Option<u32>,
    /// Something a human should look at (a tunnel entry without a route, a tunnel to a node
    /// that may not send IP-in-IP back).
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Routes {
    pub routes: Vec<RouteRow>,
    /// Node addresses whose IP-in-IP this node unwraps.
    pub tunnel_peers: Vec<Ipv4Addr>,
}

/// What the kernel and the maps hold now.
pub fn collect(layout: &PinLayout) -> anyhow::Result<Routes> {
    let maps = Maps::open(layout)?;
    let nl = Netlink::open()?;
    let kernel_routes = kernel::owned_routes(&nl)?;
    let tunnels: BTreeMap<Ipv4Net, Ipv4Addr> = maps
        .tunnels
        .entries()?
        .into_iter()
        .map(|t| (t.prefix, t.remote))
        .collect();
    let mut peers: Vec<Ipv4Addr> = maps
        .nodes
        .entries()?
        .into_iter()
        .map(|(k, _)| Ipv4Addr::from(k.to_ne_bytes()))
        .collect();
    peers.sort();
    let mut prefixes: Vec<Ipv4Net> = kernel_routes
        .keys()
        .chain(tunnels.keys())
        .copied()
        .collect();
    prefixes.sort();
    prefixes.dedup();
    let routes = prefixes
        .into_iter()
        .map(|prefix| {
            let route = kernel_routes.get(&prefix);
            let remote = tunnels.get(&prefix).copied();
            let mut via: Vec<Ipv4Addr> = route
                .map(|r| {
                    if r.next_hops.is_empty() {
                        r.gateway.into_iter().collect()
                    } else {
                        r.next_hops.iter().filter_map(|h| h.gateway).collect()
                    }
                })
                .unwrap_or_default();
            via.sort();
            let problem = match (route, remote) {
                (None, _) => Some("tunnel entry without a kernel route".to_owned()),
                (Some(_), Some(r)) if !peers.contains(&r) => {
                    Some(format!("{r} is not an accepted tunnel peer"))
                }
                _ => None,
            };
            RouteRow {
                prefix,
                via,
                encap: if remote.is_some() { "ipip" } else { "direct" }.to_owned(),
                remote,
                mtu: route.and_then(|r| r.mtu),
                problem,
            }
        })
        .collect();
    Ok(Routes {
        routes,
        tunnel_peers: peers,
    })
}

pub fn run(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let r = collect(layout)?;
    match output {
        Output::Json | Output::Yaml => print_data(output, &r)?,
        Output::Table => {
            let rows: Vec<[String; 6]> = r
                .routes
                .iter()
                .map(|x| {
                    [
                        x.prefix.to_string(),
                        x.via
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        x.encap.clone(),
                        x.remote.map(|a| a.to_string()).unwrap_or_default(),
                        x.mtu.map(|m| m.to_string()).unwrap_or_default(),
                        x.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(["BLOCK", "VIA", "ENCAP", "REMOTE", "MTU", "PROBLEM"], &rows);
            println!(
                "\nIP-in-IP accepted from {} node(s): {}",
                r.tunnel_peers.len(),
                r.tunnel_peers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(())
}
