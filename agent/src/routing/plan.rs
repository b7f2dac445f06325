//! From "which node holds which pod block" to what the node must program: kernel routes (with
//! their next hops and path MTU), tunnel entries, and the set of node addresses allowed to send
//! IP-in-IP. Pure: no kernel, no API; the caller resolves next hops outside the local subnet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferrox_cni::node_config::TunnelMode;
use ipnet::Ipv4Net;

/// This node, as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    /// The node's address on the underlay (the outer source of IP-in-IP).
    pub addr: Ipv4Addr,
    /// The underlay subnet of the uplink (nodes inside it are reached directly).
    pub subnet: Ipv4Net,
    /// The uplink's MTU.
    pub uplink_mtu: u32,
    /// The node's own pod blocks (never routed elsewhere).
    pub pod_cidrs: Vec<Ipv4Net>,
}

/// A pod block and the node that holds it, from whatever source (Node objects, IPAM blocks,
/// BGP).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteBlock {
    pub prefix: Ipv4Net,
    pub node: String,
    /// The node's address, or the next hop a BGP peer gave.
    pub node_addr: Ipv4Addr,
    /// Not a cluster node (a router, a host outside the cluster): never reached in IP-in-IP.
    pub external: bool,
}

/// One kernel route the agent owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedRoute {
    /// Next hops on the underlay, sorted; more than one is ECMP.
    pub next_hops: Vec<Ipv4Addr>,
    /// Path MTU, set when the block is reached in IP-in-IP.
    pub mtu: Option<u32>,
    /// The node(s) that hold the block.
    pub nodes: Vec<String>,
    /// Reached in IP-in-IP (the tunnel entry names the outer destination).
    pub encap: Option<Ipv4Addr>,
}

/// A block that cannot be routed, and why (reported, never half-programmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unroutable {
    pub prefix: Ipv4Net,
    pub node: String,
    pub reason: String,
}

/// Everything routing programs on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub routes: BTreeMap<Ipv4Net, PlannedRoute>,
    /// Remote block -> outer destination of its IP-in-IP.
    pub tunnels: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Addresses of the other nodes: IP-in-IP is accepted from these only.
    pub peers: BTreeSet<Ipv4Addr>,
    pub unroutable: Vec<Unroutable>,
}

/// The MTU pods get on an uplink of `uplink_mtu`: 20 bytes less whenever some peer may be
/// reached in IP-in-IP (in the default mode or in a pool's).
pub fn pod_mtu(modes: &Modes, uplink_mtu: u32) -> u32 {
    let ipip = std::iter::once(&modes.default)
        .chain(modes.pools.iter().map(|(_, m)| m))
        .any(|m| *m != TunnelMode::Never);
    if ipip {
        uplink_mtu.saturating_sub(ferrox_abi::IPIP_OVERHEAD)
    } else {
        uplink_mtu
    }
}

/// How traffic to a remote block travels: the mode of the narrowest pool that holds the block
/// (like Calico's per-IPPool ipipMode: the destination's pool decides), else the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Modes {
    pub default: TunnelMode,
    pub pools: Vec<(Ipv4Net, TunnelMode)>,
}

impl From<TunnelMode> for Modes {
    fn from(default: TunnelMode) -> Self {
        Self {
            default,
            pools: vec![],
        }
    }
}

impl Modes {
    pub fn for_block(&self, block: Ipv4Net) -> &TunnelMode {
        self.pools
            .iter()
            .filter(|(pool, _)| pool.contains(&block))
            .max_by_key(|(pool, _)| pool.prefix_len())
            .map_or(&self.default, |(_, m)| m)
    }

    /// `CIDR=never|always|cross-subnet`, as `--tunnel-mode-pool` takes it.
    pub fn parse_pool(s: &str) -> Result<(Ipv4Net, TunnelMode), String> {
        let (cidr, mode) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: want CIDR=never|always|cross-subnet"))?;
        let cidr: Ipv4Net = cidr.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let mode = match mode.trim() {
            "never" | "none" => TunnelMode::Never,
            "always" => TunnelMode::Always,
            "cross-subnet" => TunnelMode::CrossSubnet,
            other => {
                return Err(format!(
                    "{s:?}: mode {other:?}: never, always or cross-subnet"
                ));
            }
        };
        Ok((cidr.trunc(), mode))
    }
}

/// The plan for `blocks` with tunnel `modes`. `underlay_next_hop` gives the gateway towards a
/// node address outside the local subnet (`None`: no route to it).
pub fn plan(
    local: &LocalNode,
    modes: &Modes,
    blocks: &[RemoteBlock],
    peer_addrs: &[Ipv4Addr],
    mut underlay_next_hop: impl FnMut(Ipv4Addr) -> Option<Ipv4Addr>,
) -> Plan {
    let mut out = Plan {
        peers: peer_addrs
            .iter()
            .copied()
            .filter(|a| *a != local.addr)
            .collect(),
        ..Plan::default()
    };
    let mut sorted: Vec<&RemoteBlock> = blocks.iter().collect();
    sorted.sort();
    for b in sorted {
        let prefix = b.prefix.trunc();
        if b.node == local.name || b.node_addr == local.addr {
            continue;
        }
        // A block inside one of ours would take our pods' traffic; a wider one (an aggregate)
        // is fine, the pods' own routes are more specific.
        let overlaps = |c: &Ipv4Net| c.contains(&prefix) || (!b.external && prefix.contains(c));
        if let Some(own) = local.pod_cidrs.iter().find(|c| overlaps(c)) {
            out.unroutable.push(Unroutable {
                prefix,
                node: b.node.clone(),
                reason: format!("overlaps this node's own block {own}"),
            });
            continue;
        }
        let on_link = local.subnet.contains(&b.node_addr);
        let encap = !b.external
            && match modes.for_block(prefix) {
                TunnelMode::Always => true,
                TunnelMode::Never => false,
                TunnelMode::CrossSubnet => !on_link,
            };
        let hop = if on_link {
            Some(b.node_addr)
        } else {
            underlay_next_hop(b.node_addr)
        };
        let Some(hop) = hop else {
            out.unroutable.push(Unroutable {
                prefix,
                node: b.node.clone(),
                reason: format!("no route to node address {}", b.node_addr),
            });
            continue;
        };
        let mtu = encap.then(|| local.uplink_mtu.saturating_sub(ferrox_abi::IPIP_OVERHEAD));
        match out.routes.get_mut(&prefix) {
            // Several nodes announce the block (BGP anycast, a block moving): ECMP when they
            // agree on encapsulation; a tunnel can only have one outer destination, the first.
            Some(r) => {
                if !r.next_hops.contains(&hop) && r.encap.is_none() && !encap {
                    r.next_hops.push(hop);
                    r.next_hops.sort();
                }
                r.nodes.push(b.node.clone());
            }
            None => {
                out.routes.insert(
                    prefix,
                    PlannedRoute {
                        next_hops: vec![hop],
                        mtu,
                        nodes: vec![b.node.clone()],
                        encap: encap.then_some(b.node_addr),
                    },
                );
                if encap {
                    out.tunnels.insert(prefix, b.node_addr);
                }
            }
        }
    }
    out
}

/// Why routes kept over a restart stop being kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptUntil {
    /// Not yet: some BGP peer has not sent End-of-RIB, and there is time left.
    Waiting,
    /// Every BGP peer has sent End-of-RIB: what none announced again is gone for good.
    Synced,
    /// The time to wait for them ran out.
    Expired,
}

/// The routes of ours found at start that are still kept over the restart (graceful restart):
/// `kept` loses every prefix `plan` names (from then on the prefix follows the plan, so its
/// withdrawal takes effect at once), and all of them once `until` is no longer
/// [`KeptUntil::Waiting`]. Returns how many were given up because of `until`.
pub fn still_kept(kept: &mut BTreeSet<Ipv4Net>, plan: &Plan, until: KeptUntil) -> usize {
    kept.retain(|p| !plan.routes.contains_key(p));
    if until == KeptUntil::Waiting {
        return 0;
    }
    let n = kept.len();
    kept.clear();
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalNode {
        LocalNode {
            name: "node-1".into(),
            addr: "198.18.0.11".parse().unwrap(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            uplink_mtu: 1500,
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        }
    }

    fn block(prefix: &str, node: &str, addr: &str) -> RemoteBlock {
        RemoteBlock {
            prefix: prefix.parse().unwrap(),
            node: node.into(),
            node_addr: addr.parse().unwrap(),
            external: false,
        }
    }

    fn blocks() -> Vec<RemoteBlock> {
        vec![
            block("10.244.1.0/24", "node-1", "198.18.0.11"),
            block("10.244.2.0/24", "node-2", "198.18.0.12"),
            block("10.244.3.0/24", "node-3", "198.19.0.13"),
        ]
    }

    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn via_router(a: Ipv4Addr) -> Option<Ipv4Addr> {
        "198.19.0.0/24"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&a)
            .then_some(ROUTER)
    }

    #[test]
    fn each_mode_routes_every_remote_block_and_tunnels_the_right_ones() {
        let addrs: Vec<Ipv4Addr> = blocks().iter().map(|b| b.node_addr).collect();
        // (mode, which blocks are tunnelled, MTU of pods)
        let cases = [
            (TunnelMode::Never, vec![], 1500),
            (
                TunnelMode::Always,
                vec!["10.244.2.0/24", "10.244.3.0/24"],
                1480,
            ),
            (TunnelMode::CrossSubnet, vec!["10.244.3.0/24"], 1480),
        ];
        for (mode, tunnelled, mtu) in cases {
            let modes = Modes::from(mode.clone());
            let p = plan(&local(), &modes, &blocks(), &addrs, via_router);
            assert_eq!(pod_mtu(&modes, 1500), mtu, "{mode:?}");
            assert_eq!(p.routes.len(), 2, "{mode:?}: the own block is not routed");
            let node2 = &p.routes[&"10.244.2.0/24".parse().unwrap()];
            assert_eq!(
                node2.next_hops,
                vec!["198.18.0.12".parse::<Ipv4Addr>().unwrap()]
            );
            let node3 = &p.routes[&"10.244.3.0/24".parse().unwrap()];
            assert_eq!(
                node3.next_hops,
                vec![ROUTER],
                "{mode:?}: other subnet via the router"
            );
            let got: Vec<String> = p.tunnels.keys().map(|k| k.to_string()).collect();
            assert_eq!(got, tunnelled, "{mode:?}");
            for (prefix, r) in &p.routes {
                let tunnel = p.tunnels.contains_key(prefix);
                assert_eq!(
                    r.mtu.is_some(),
                    tunnel,
                    "{mode:?} {prefix}: MTU only on tunnels"
                );
                assert_eq!(r.encap.is_some(), tunnel);
            }
            assert_eq!(p.peers.len(), 2, "every other node may send IP-in-IP");
            assert!(p.unroutable.is_empty());
        }
        let p = plan(
            &local(),
            &TunnelMode::Always.into(),
            &blocks(),
            &addrs,
            via_router,
        );
        assert_eq!(p.routes[&"10.244.2.0/24".parse().unwrap()].mtu, Some(1480));
    }

    #[test]
    fn unreachable_nodes_and_overlapping_blocks_are_reported_not_programmed() {
        let mut b = blocks();
        b.push(block("10.244.1.128/25", "node-9", "198.18.0.19"));
        let p = plan(&local(), &TunnelMode::CrossSubnet.into(), &b, &[], |_| None);
        let reasons: Vec<(String, String)> = p
            .unroutable
            .iter()
            .map(|u| (u.prefix.to_string(), u.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (
                    "10.244.1.128/25".to_string(),
                    "overlaps this node's own block 10.244.1.0/24".to_string()
                ),
                (
                    "10.244.3.0/24".to_string(),
                    "no route to node address 198.19.0.13".to_string()
                ),
            ]
        );
        assert_eq!(p.routes.len(), 1);
        assert!(p.tunnels.is_empty());
    }

    #[test]
    fn a_block_announced_by_two_nodes_is_ecmp_when_routed_directly() {
        let b = vec![
            block("10.96.0.0/12", "node-3", "198.18.0.13"),
            block("10.96.0.0/12", "node-2", "198.18.0.12"),
        ];
        let p = plan(&local(), &TunnelMode::Never.into(), &b, &[], |_| None);
        let r = &p.routes[&"10.96.0.0/12".parse().unwrap()];
        assert_eq!(
            r.next_hops,
            vec![
                "198.18.0.12".parse::<Ipv4Addr>().unwrap(),
                "198.18.0.13".parse().unwrap()
            ]
        );
        let p = plan(&local(), &TunnelMode::Always.into(), &b, &[], |_| None);
        let r = &p.routes[&"10.96.0.0/12".parse().unwrap()];
        assert_eq!(r.next_hops.len(), 1, "a tunnel has one outer destination");
        assert_eq!(p.tunnels.len(), 1);
    }

    #[test]
    fn routes_from_outside_the_cluster_are_never_tunnelled_and_may_aggregate() {
        let mut ext = block("10.0.0.0/8", "bgp:tor", "198.18.0.1");
        ext.external = true;
        let p = plan(
            &local(),
            &TunnelMode::Always.into(),
            &[ext.clone()],
            &[],
            |_| None,
        );
        assert!(p.tunnels.is_empty());
        assert_eq!(p.routes[&"10.0.0.0/8".parse().unwrap()].mtu, None);
        // The same aggregate from a node would swallow this node's block: refused.
        ext.external = false;
        let p = plan(&local(), &TunnelMode::Always.into(), &[ext], &[], |_| None);
        assert!(p.routes.is_empty());
        assert_eq!(p.unroutable.len(), 1);
    }

    #[test]
    fn a_pools_mode_decides_for_the_blocks_inside_it() {
        let addrs: Vec<Ipv4Addr> = blocks().iter().map(|b| b.node_addr).collect();
        // Default never; node-2's block in an always pool; a narrower never pool inside a wider
        // always one wins.
        let modes = Modes {
            default: TunnelMode::Never,
            pools: vec![
                Modes::parse_pool("10.244.2.0/23=always").unwrap(),
                Modes::parse_pool("10.244.3.0/24=never").unwrap(),
            ],
        };
        let p = plan(&local(), &modes, &blocks(), &addrs, via_router);
        let got: Vec<String> = p.tunnels.keys().map(|k| k.to_string()).collect();
        assert_eq!(got, vec!["10.244.2.0/24"]);
        assert_eq!(pod_mtu(&modes, 1500), 1480, "some traffic is wrapped");
        assert_eq!(pod_mtu(&TunnelMode::Never.into(), 1500), 1500);
        for bad in ["10.244.0.0/16", "10.244.0.0/16=ipip", "10.244.0/16=always"] {
            assert!(Modes::parse_pool(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Modes::parse_pool("10.244.0.0/16=cross-subnet"),
            Ok(("10.244.0.0/16".parse().unwrap(), TunnelMode::CrossSubnet))
        );
    }

    /// Routes found at start stay until named by the plan or until the peers are all back;
    /// once named, a withdrawal (no longer in the plan) is not protected any more.
    #[test]
    fn routes_kept_over_a_restart_follow_the_plan_once_it_names_them() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let plan_of = |prefixes: &[&str]| Plan {
            routes: prefixes
                .iter()
                .map(|p| {
                    (
                        net(p),
                        PlannedRoute {
                            next_hops: vec!["198.18.0.200".parse().unwrap()],
                            mtu: None,
                            nodes: vec!["bgp:198.18.0.200".into()],
                            encap: None,
                        },
                    )
                })
                .collect(),
            ..Plan::default()
        };
        let mut kept: BTreeSet<Ipv4Net> = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]
            .into_iter()
            .map(net)
            .collect();
        // A peer announced two of them again: only the third is still kept.
        let n = still_kept(
            &mut kept,
            &plan_of(&["192.0.2.0/24", "203.0.113.0/24"]),
            KeptUntil::Waiting,
        );
        assert_eq!((n, kept.clone()), (0, [net("198.51.100.0/24")].into()));
        // It withdraws one of them while others are still away: not kept again.
        still_kept(&mut kept, &plan_of(&["192.0.2.0/24"]), KeptUntil::Waiting);
        assert_eq!(kept, [net("198.51.100.0/24")].into());
        // Everyone is back: the rest goes.
        assert_eq!(
            still_kept(&mut kept, &plan_of(&["192.0.2.0/24"]), KeptUntil::Synced),
            1
        );
        assert!(kept.is_empty());
    }
}
