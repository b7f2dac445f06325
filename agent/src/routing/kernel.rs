//! Makes the kernel and the datapath hold a [`Plan`]: the routes tagged with
//! [`ROUTE_PROTOCOL`] in the main table, the tunnel trie and the nodes map. What the agent no
//! longer wants (a stale route from a previous run, a node gone) is removed; nothing else is
//! touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::Context as _;
use ferrox_abi::{NodeInfo, node_flags, tunnel_flags};
use ferrox_cni::netlink::{MAIN_TABLE, Netlink, NextHop, Route};
use ferrox_datapath::{Maps, Tunnel};
use ipnet::Ipv4Net;

use super::plan::{Plan, PlannedRoute};

/// Routes to other nodes' pod blocks carry this protocol number (`ip route show proto 243`);
/// the CNI plugin's routes to local pods carry 242.
pub const ROUTE_PROTOCOL: u8 = 243;

/// What one apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub routes_set: usize,
    pub routes_removed: usize,
    pub tunnels_set: usize,
    pub tunnels_removed: usize,
    pub peers_set: usize,
    pub peers_removed: usize,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn desired_route(prefix: Ipv4Net, r: &PlannedRoute, uplink: u32) -> Route {
    let mut route = Route::new(prefix).protocol(ROUTE_PROTOCOL);
    route = match r.next_hops.as_slice() {
        [one] => route.via(*one).dev(uplink).onlink(),
        many => many.iter().fold(route, |route, hop| {
            route.next_hop(NextHop::via(*hop, uplink).onlink())
        }),
    };
    match r.mtu {
        Some(mtu) => route.mtu(mtu),
        None => route,
    }
}

/// Next hops (gateway, interface), sorted, and the path MTU and whether it is locked: what
/// matters when comparing a route with a desired one.
type Shape = (Vec<(Option<Ipv4Addr>, Option<u32>)>, Option<u32>, bool);

fn shape(r: &Route) -> Shape {
    let mut hops: Vec<_> = if r.next_hops.is_empty() {
        vec![(r.gateway, r.oif)]
    } else {
        r.next_hops.iter().map(|h| (h.gateway, h.oif)).collect()
    };
    hops.sort();
    (hops, r.mtu, r.mtu.is_some() && r.mtu_locked)
}

/// The routes of ours in the main table, by destination.
pub fn owned_routes(nl: &Netlink) -> anyhow::Result<BTreeMap<Ipv4Net, Route>> {
    Ok(nl
        .list_routes(MAIN_TABLE)
        .context("listing routes")?
        .into_iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
        .map(|r| (r.dst, r))
        .collect())
}

/// The next hop towards `addr` through the routes that are not ours (the underlay): the gateway
/// of the longest matching route, or `addr` itself for a directly connected one.
pub fn underlay_next_hop(routes: &[Route], addr: Ipv4Addr) -> Option<Ipv4Addr> {
    routes
        .iter()
        .filter(|r| r.protocol != ROUTE_PROTOCOL && r.table == MAIN_TABLE && r.dst.contains(&addr))
        .filter(|r| r.kind == ferrox_cni::netlink::RouteKind::Unicast)
        .max_by_key(|r| r.dst.prefix_len())
        .map(|r| {
            r.gateway
                .or_else(|| r.next_hops.iter().find_map(|h| h.gateway))
                .unwrap_or(addr)
        })
}

/// Programs `plan`; `uplink` is the uplink's interface index; `existing`: the routes of ours in
/// the kernel now ([`owned_routes`]). Routes (and tunnel entries) of ours to the prefixes in
/// `keep` stay even when the plan does not name them (after a restart, until the BGP sessions
/// have had time to announce them again).
pub fn apply(
    nl: &Netlink,
    maps: &mut Maps,
    plan: &Plan,
    uplink: u32,
    keep: &BTreeSet<Ipv4Net>,
    existing: &BTreeMap<Ipv4Net, Route>,
) -> anyhow::Result<Applied> {
    let mut done = Applied::default();
    for (prefix, r) in &plan.routes {
        let want = desired_route(*prefix, r, uplink);
        if existing.get(prefix).map(shape) == Some(shape(&want)) {
            continue;
        }
        nl.replace_route(&want)
            .with_context(|| format!("installing the route {want}"))?;
        done.routes_set += 1;
    }
    for (prefix, route) in existing {
        if !keep.contains(prefix) && !plan.routes.contains_key(prefix) && nl.del_route(route)? {
            done.routes_removed += 1;
        }
    }

    let tunnels: BTreeMap<Ipv4Net, Tunnel> = maps
        .tunnels
        .entries()?
        .into_iter()
        .map(|t| (t.prefix, t))
        .collect();
    for (prefix, remote) in &plan.tunnels {
        let want = Tunnel {
            prefix: *prefix,
            remote: *remote,
            flags: tunnel_flags::IPIP,
        };
        if tunnels.get(prefix) == Some(&want) {
            continue;
        }
        maps.tunnels
            .insert(&want)
            .map_err(|e| anyhow::anyhow!("tunnel entry {prefix} -> {remote}: {e}"))?;
        done.tunnels_set += 1;
    }
    for prefix in tunnels.keys() {
        if !keep.contains(prefix)
            && !plan.tunnels.contains_key(prefix)
            && maps.tunnels.remove(*prefix)?
        {
            done.tunnels_removed += 1;
        }
    }

    let peers: BTreeSet<u32> = maps.nodes.entries()?.into_iter().map(|(k, _)| k).collect();
    let want: BTreeSet<u32> = plan
        .peers
        .iter()
        .map(|a| u32::from_ne_bytes(a.octets()))
        .collect();
    for addr in want.difference(&peers) {
        maps.nodes
            .insert(
                addr,
                &NodeInfo {
                    flags: node_flags::TUNNEL_PEER,
                },
            )
            .map_err(|e| anyhow::anyhow!("nodes map: {e}"))?;
        done.peers_set += 1;
    }
    for addr in peers.difference(&want) {
        if maps.nodes.remove(addr)? {
            done.peers_removed += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, gw: Option<&str>, proto: u8) -> Route {
        let mut r = Route::new(dst.parse().unwrap()).protocol(proto);
        if let Some(g) = gw {
            r = r.via(g.parse().unwrap());
        }
        r
    }

    #[test]
    fn the_underlay_next_hop_is_the_longest_match_outside_our_routes() {
        let routes = vec![
            route("0.0.0.0/0", Some("198.18.0.1"), 3),
            route("198.18.0.0/24", None, 2),
            route("198.19.0.0/16", Some("198.18.0.254"), 3),
            route("198.19.5.0/24", Some("198.18.0.9"), ROUTE_PROTOCOL),
        ];
        let hop = |a: &str| underlay_next_hop(&routes, a.parse().unwrap());
        assert_eq!(hop("198.18.0.12"), Some("198.18.0.12".parse().unwrap()));
        assert_eq!(hop("198.19.5.3"), Some("198.18.0.254".parse().unwrap()));
        assert_eq!(hop("203.0.113.1"), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(
            underlay_next_hop(&routes[1..2], "203.0.113.1".parse().unwrap()),
            None
        );
    }

    #[test]
    fn a_route_compares_equal_to_its_desired_shape_whatever_the_kernel_adds() {
        let planned = PlannedRoute {
            next_hops: vec!["198.18.0.12".parse().unwrap()],
            mtu: Some(1480),
            nodes: vec!["node-2".into()],
            encap: Some("198.18.0.12".parse().unwrap()),
        };
        let want = desired_route("10.244.2.0/24".parse().unwrap(), &planned, 7);
        let mut read_back = want.clone();
        read_back.scope = ferrox_cni::netlink::Scope::Universe;
        read_back.onlink = false;
        assert_eq!(shape(&read_back), shape(&want));
        let other_mtu = want.clone().mtu(1500);
        assert_ne!(shape(&other_mtu), shape(&want));
    }
}
