//! From the policy model to what a datapath can look up in bounded time: identities and two
//! longest-prefix tables, no per-rule iteration.
//!
//! - **Identities.** Every address maps to one identity through the *ipcache*, a longest-prefix
//!   table: each pod's /32 to the identity of its namespace, labels, named ports and address
//!   region; every prefix that an ipBlock names (its CIDR and each `except`) to the identity of
//!   that region; `0.0.0.0/0` to the world's. A *region* is the longest such prefix containing
//!   an address, so two addresses in one region are in and out of exactly the same blocks, and
//!   pods of one namespace equal on the labels peer selectors read share an identity in one region.
//! - **Policy entries.** Per local pod and direction, entries keyed by (peer identity or any,
//!   protocol or any, port prefix) say the traffic is allowed, and by which policy and rule.
//!   Port ranges (`endPort`) become at most 30 aligned prefixes; "any port" and "any protocol"
//!   are shorter prefixes. A verdict is then two longest-prefix lookups: the peer's identity,
//!   and "any peer".
//! - **Isolation.** Per local pod and direction, whether any policy of that type selects it: a
//!   pod isolated in neither direction gets no entries at all.
//!
//! [`Compiled::verdict`] evaluates the tables the way the datapath does; the tests check it
//! against the model's verdict for every pod pair, protocol and port of their worlds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::model::{Direction, Labels, Peer, PodInfo, PortMatch, Protocol, World};

/// Identity of addresses in no listed region and belonging to no pod.
pub const WORLD: u32 = ferrox_abi::POLICY_WORLD_IDENTITY;
/// The first identity handed out to a region or pod.
const FIRST: u32 = 16;

/// What makes two addresses indistinguishable to every policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IdentityKey {
    /// Addresses of no pod whose longest listed prefix is this one.
    Region(Ipv4Net),
    /// Pods of one namespace with these labels (those some peer selector reads) and named
    /// ports, in this region.
    Pod {
        namespace: String,
        labels: Labels,
        named_ports: Vec<(String, Protocol, u16)>,
        region: Option<Ipv4Net>,
    },
}

/// A port prefix: the `len` high bits of `value` (`len` 0: any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub value: u16,
    pub len: u8,
}

impl PortPrefix {
    pub const ANY: Self = Self { value: 0, len: 0 };

    fn contains(self, port: u16) -> bool {
        self.len == 0 || (port ^ self.value) >> (16 - u32::from(self.len)) == 0
    }
}

/// `first..=last` as the fewest aligned prefixes.
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push(PortPrefix {
            value: lo as u16,
            len: (16 - size.trailing_zeros()) as u8,
        });
        lo += size;
    }
    out
}

/// One allowing entry of a local pod's table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub direction: Direction,
    /// The peer's identity; `None`: any peer.
    pub identity: Option<u32>,
    /// `None`: any protocol (and port).
    pub protocol: Option<Protocol>,
    pub port: PortPrefix,
    /// Index of the allowing policy in [`Compiled::policies`], and of its rule.
    pub policy: u32,
    pub rule: u16,
}

/// What a local pod gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub entries: BTreeSet<Entry>,
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// The ipcache: prefix -> identity.
    pub ipcache: BTreeMap<Ipv4Net, u32>,
    /// Per local pod (namespace/name).
    pub endpoints: BTreeMap<String, Endpoint>,
    /// `namespace/name` of each policy, by index.
    pub policies: Vec<String>,
}

/// Compiles `world` for the local pods `local` (namespace/name).
pub fn compile(world: &World, local: &[String]) -> Compiled {
    // Every prefix an ipBlock names, and the world.
    let mut prefixes: BTreeSet<Ipv4Net> = BTreeSet::new();
    for p in &world.policies {
        for rules in [&p.ingress, &p.egress].into_iter().flatten() {
            for r in rules {
                for peer in &r.peers {
                    if let Peer::Block { cidr, except } = peer {
                        prefixes.insert(*cidr);
                        prefixes.extend(except.iter().copied());
                    }
                }
            }
        }
    }
    let region_of = |ip: Ipv4Addr| -> Option<Ipv4Net> {
        prefixes
            .iter()
            .filter(|p| p.contains(&ip))
            .max_by_key(|p| p.prefix_len())
            .copied()
    };
    let mut ids: BTreeMap<IdentityKey, u32> = BTreeMap::new();
    let mut next = FIRST;
    let mut id_of = |k: IdentityKey| -> u32 {
        *ids.entry(k).or_insert_with(|| {
            next += 1;
            next - 1
        })
    };
    let mut ipcache = BTreeMap::new();
    ipcache.insert(Ipv4Net::default(), WORLD);
    for p in &prefixes {
        ipcache.insert(*p, id_of(IdentityKey::Region(*p)));
    }
    // The label keys some peer selector reads: pods equal on these (and on the rest of the
    // identity key) are equal to every policy, whatever their other labels (a pod-name label
    // would otherwise give every pod an identity of its own, and every rule an entry per pod).
    let mut relevant: BTreeSet<&str> = BTreeSet::new();
    for p in &world.policies {
        for rules in [&p.ingress, &p.egress].into_iter().flatten() {
            for r in rules {
                for peer in &r.peers {
                    if let Peer::Pods {
                        pods: Some(sel), ..
                    } = peer
                    {
                        relevant.extend(sel.match_labels.keys().map(String::as_str));
                        relevant.extend(sel.expressions.iter().map(|e| e.key.as_str()));
                    }
                }
            }
        }
    }
    // Each pod's identity, and which pods have it.
    let mut pod_identity: Vec<u32> = Vec::with_capacity(world.pods.len());
    for pod in &world.pods {
        let id = id_of(IdentityKey::Pod {
            namespace: pod.namespace.clone(),
            labels: pod
                .labels
                .iter()
                .filter(|(k, _)| relevant.contains(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            named_ports: pod.named_ports.clone(),
            region: region_of(pod.ip),
        });
        ipcache.insert(Ipv4Net::from(pod.ip), id);
        pod_identity.push(id);
    }
    // A representative of each identity: the pod with it, or a region's prefix.
    let pods_by_identity: BTreeMap<u32, &PodInfo> = world
        .pods
        .iter()
        .zip(&pod_identity)
        .map(|(p, id)| (*id, p))
        .collect();
    let region_identities: Vec<(Ipv4Net, u32)> = ids
        .iter()
        .filter_map(|(k, id)| match k {
            IdentityKey::Region(p) => Some((*p, *id)),
            IdentityKey::Pod { .. } => None,
        })
        .collect();

    let mut out = Compiled {
        ipcache,
        policies: world.policies.iter().map(|p| p.id()).collect(),
        ..Compiled::default()
    };
    for id in local {
        let Some(pod) = world
            .pods
            .iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == *id)
        else {
            continue;
        };
        let mut ep = Endpoint::default();
        for (pi, policy) in world.policies.iter().enumerate() {
            if policy.namespace != pod.namespace || !policy.selects.matches(&pod.labels) {
                continue;
            }
            for dir in [Direction::Ingress, Direction::Egress] {
                let Some(rules) = policy.rules(dir) else {
                    continue;
                };
                match dir {
                    Direction::Ingress => ep.ingress_isolated = true,
                    Direction::Egress => ep.egress_isolated = true,
                }
                for (ri, rule) in rules.iter().enumerate() {
                    // The peers: any, or the identities the rule's peers match. A pod identity
                    // matches a block when its region does (its address is in the region).
                    let peers: Option<Vec<u32>> = if rule.peers.is_empty() {
                        None
                    } else {
                        let mut set = BTreeSet::new();
                        for peer in &rule.peers {
                            match peer {
                                Peer::Pods { .. } => {
                                    for (pid, p) in &pods_by_identity {
                                        if world.peer_matches(policy, peer, p.ip, Some(p)) {
                                            set.insert(*pid);
                                        }
                                    }
                                }
                                Peer::Block { cidr, except } => {
                                    // A region is inside the block when its prefix is, and
                                    // inside no except (an except strictly inside it is a
                                    // region of its own).
                                    let within = |outer: &Ipv4Net, inner: &Ipv4Net| {
                                        inner.prefix_len() >= outer.prefix_len()
                                            && outer.contains(&inner.network())
                                    };
                                    for (prefix, rid) in &region_identities {
                                        if within(cidr, prefix)
                                            && !except.iter().any(|e| within(e, prefix))
                                        {
                                            set.insert(*rid);
                                        }
                                    }
                                    for (pid, p) in &pods_by_identity {
                                        if world.peer_matches(policy, peer, p.ip, None) {
                                            set.insert(*pid);
                                        }
                                    }
                                }
                                Peer::Unmatchable => {}
                            }
                        }
                        Some(set.into_iter().collect())
                    };
                    let mut peer_list: Vec<Option<u32>> = match &peers {
                        None => vec![None],
                        Some(ids) => ids.iter().map(|i| Some(*i)).collect(),
                    };
                    // An egress rule to any peer with a named port: the name is resolved on
                    // each destination pod, so each pod identity gets its own entries (a
                    // destination that is no pod has no named ports).
                    if dir == Direction::Egress
                        && peers.is_none()
                        && rule
                            .ports
                            .iter()
                            .any(|p| matches!(p.port, PortMatch::Named(_)))
                    {
                        peer_list.extend(pods_by_identity.keys().map(|i| Some(*i)));
                    }
                    for peer in peer_list {
                        // The destination pod a named port is resolved on: the local pod for
                        // ingress, the peer pod for egress (none for a region).
                        let destination = match dir {
                            Direction::Ingress => Some(pod),
                            Direction::Egress => {
                                peer.and_then(|i| pods_by_identity.get(&i).copied())
                            }
                        };
                        let mut add = |protocol: Option<Protocol>, port: PortPrefix| {
                            ep.entries.insert(Entry {
                                direction: dir,
                                identity: peer,
                                protocol,
                                port,
                                policy: pi as u32,
                                rule: ri as u16,
                            });
                        };
                        if rule.ports.is_empty() {
                            add(None, PortPrefix::ANY);
                            continue;
                        }
                        for port in &rule.ports {
                            // The entries of a pod identity added for its named ports only.
                            let named_only =
                                dir == Direction::Egress && peers.is_none() && peer.is_some();
                            match &port.port {
                                _ if named_only && !matches!(port.port, PortMatch::Named(_)) => {}
                                PortMatch::Any => add(Some(port.protocol), PortPrefix::ANY),
                                PortMatch::Range(a, b) => {
                                    for pp in port_prefixes(*a, *b) {
                                        add(Some(port.protocol), pp);
                                    }
                                }
                                PortMatch::Named(name) => {
                                    if let Some(n) = destination.and_then(|d| {
                                        d.named_ports
                                            .iter()
                                            .find(|(pn, pr, _)| pn == name && *pr == port.protocol)
                                            .map(|(_, _, n)| *n)
                                    }) {
                                        add(Some(port.protocol), PortPrefix { value: n, len: 16 });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if ep.ingress_isolated || ep.egress_isolated {
            out.endpoints.insert(id.clone(), ep);
        }
    }
    out
}

impl Compiled {
    /// The identity of `addr`: its longest prefix in the ipcache.
    pub fn identity(&self, addr: Ipv4Addr) -> u32 {
        self.ipcache
            .iter()
            .filter(|(p, _)| p.contains(&addr))
            .max_by_key(|(p, _)| p.prefix_len())
            .map_or(WORLD, |(_, id)| *id)
    }

    /// The datapath's verdict for local pod `pod` (namespace/name): `None` when not isolated in
    /// `dir`, else whether an entry allows `peer` on `protocol`/`port`, and which (policy,
    /// rule): the longest match for the peer's identity, else for any peer.
    pub fn verdict(
        &self,
        pod: &str,
        dir: Direction,
        peer: Ipv4Addr,
        protocol: Protocol,
        port: u16,
    ) -> Option<Option<(u32, u16)>> {
        let ep = self.endpoints.get(pod)?;
        let isolated = match dir {
            Direction::Ingress => ep.ingress_isolated,
            Direction::Egress => ep.egress_isolated,
        };
        if !isolated {
            return None;
        }
        let id = self.identity(peer);
        let lookup = |identity: Option<u32>| {
            ep.entries
                .iter()
                .filter(|e| {
                    e.direction == dir
                        && e.identity == identity
                        && e.protocol.is_none_or(|p| p == protocol)
                        && (e.protocol.is_none() || e.port.contains(port))
                })
                .max_by_key(|e| (e.protocol.is_some(), e.port.len))
                .map(|e| (e.policy, e.rule))
        };
        Some(lookup(Some(id)).or_else(|| lookup(None)))
    }
}

#[cfg(test)]
mod tests;
