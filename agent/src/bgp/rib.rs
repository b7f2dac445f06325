//! The routing information base: what each peer announced (Adj-RIB-In), and the best paths
//! (Loc-RIB) chosen from them by the RFC 4271 decision process, reduced to what these
//! topologies need: highest LOCAL_PREF, shortest AS_PATH, lowest ORIGIN, lowest MED (between
//! paths from the same neighbouring AS), eBGP over iBGP, then lowest router ID. Paths equal up to
//! the router ID are ECMP. Pure data; the session tasks feed it.
//!
//! Incremental: every change records the prefixes it touched, and [`Rib::take_changes`] gives
//! the new best path of those alone, so an UPDATE costs what it carries, not the table's size
//! (100,000 routes from a router arrive in a few hundred UPDATEs).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::wire::Attributes;

/// A path to a prefix, as one peer announced it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Path {
    pub peer: Ipv4Addr,
    pub peer_router_id: Ipv4Addr,
    /// The peer is in another AS.
    pub ebgp: bool,
    pub attrs: Attributes,
    /// Kept across the peer's restart (graceful restart), until it announces again.
    pub stale: bool,
}

impl Path {
    fn local_pref(&self) -> u32 {
        self.attrs.local_pref.unwrap_or(100)
    }
    fn next_hop(&self) -> Ipv4Addr {
        self.attrs.next_hop.unwrap_or(self.peer)
    }
}

/// The best path(s) to one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Best {
    /// Next hops of the equal best paths (ECMP), sorted.
    pub next_hops: Vec<Ipv4Addr>,
    /// The peers those paths came from.
    pub peers: Vec<Ipv4Addr>,
    pub as_path_len: usize,
    /// The one best path (the lowest router ID among the equal ones): what a route reflector
    /// passes on.
    pub path: Path,
}

#[derive(Clone, Debug, Default)]
pub struct Rib {
    /// prefix -> peer -> path.
    paths: BTreeMap<Ipv4Net, BTreeMap<Ipv4Addr, Path>>,
    /// Prefixes whose paths changed since the last [`Rib::take_changes`].
    changed: BTreeSet<Ipv4Net>,
    /// Prefixes received from each peer.
    counts: HashMap<Ipv4Addr, usize>,
}

/// Orders two paths: `Less` means `a` is better. Stops before the router ID, so equal paths are
/// ECMP candidates.
fn compare(a: &Path, b: &Path) -> std::cmp::Ordering {
    b.local_pref()
        .cmp(&a.local_pref())
        .then(a.attrs.as_path_len().cmp(&b.attrs.as_path_len()))
        .then(a.attrs.origin.cmp(&b.attrs.origin))
        .then_with(|| {
            if a.attrs.first_as() == b.attrs.first_as() {
                a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .then(b.ebgp.cmp(&a.ebgp))
        // RFC 4456 9: a path through fewer reflectors first.
        .then(a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
}

/// The router ID for the last tie-break: a reflected path's originator stands in for the
/// reflector's ID (RFC 4456 9).
fn router_id(p: &Path) -> Ipv4Addr {
    p.attrs.originator_id.unwrap_or(p.peer_router_id)
}

impl Rib {
    /// Stores `peer`'s path to `prefix` (replacing its previous one).
    pub fn announce(&mut self, prefix: Ipv4Net, path: Path) {
        let peer = path.peer;
        let old = self.paths.entry(prefix).or_default().insert(peer, path);
        if old.is_none() {
            *self.counts.entry(peer).or_default() += 1;
        }
        self.changed.insert(prefix);
    }

    /// Removes `peer`'s path to `prefix`; true if there was one.
    pub fn withdraw(&mut self, prefix: Ipv4Net, peer: Ipv4Addr) -> bool {
        let Some(by_peer) = self.paths.get_mut(&prefix) else {
            return false;
        };
        let had = by_peer.remove(&peer).is_some();
        if by_peer.is_empty() {
            self.paths.remove(&prefix);
        }
        if had {
            self.uncount(peer, 1);
            self.changed.insert(prefix);
        }
        had
    }

    fn uncount(&mut self, peer: Ipv4Addr, n: usize) {
        if let Some(c) = self.counts.get_mut(&peer) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.counts.remove(&peer);
            }
        }
    }

    /// Removes the paths that went through the route-reflector cluster `cluster_id` (loops,
    /// once this node is in that cluster).
    pub fn drop_through_cluster(&mut self, cluster_id: Ipv4Addr) -> usize {
        self.retain(|p| !p.attrs.cluster_list.contains(&cluster_id))
    }

    /// Removes every path of `peer` (its session ended without graceful restart).
    pub fn drop_peer(&mut self, peer: Ipv4Addr) -> usize {
        self.retain(|p| p.peer != peer)
    }

    /// Marks every path of `peer` stale (its session ended; it may restart gracefully).
    pub fn mark_stale(&mut self, peer: Ipv4Addr) {
        for (prefix, by_peer) in &mut self.paths {
            if let Some(p) = by_peer.get_mut(&peer) {
                p.stale = true;
                self.changed.insert(*prefix);
            }
        }
    }

    /// Removes `peer`'s paths still stale (after its End-of-RIB, or when its restart time ran
    /// out).
    pub fn sweep_stale(&mut self, peer: Ipv4Addr) -> usize {
        self.retain(|p| !(p.peer == peer && p.stale))
    }

    fn retain(&mut self, keep: impl Fn(&Path) -> bool) -> usize {
        let mut removed: HashMap<Ipv4Addr, usize> = HashMap::new();
        let changed = &mut self.changed;
        self.paths.retain(|prefix, by_peer| {
            by_peer.retain(|peer, p| {
                let k = keep(p);
                if !k {
                    *removed.entry(*peer).or_default() += 1;
                    changed.insert(*prefix);
                }
                k
            });
            !by_peer.is_empty()
        });
        let total = removed.values().sum();
        for (peer, n) in removed {
            self.uncount(peer, n);
        }
        total
    }

    /// Paths received from `peer`.
    pub fn count_from(&self, peer: Ipv4Addr) -> usize {
        self.counts.get(&peer).copied().unwrap_or(0)
    }

    /// The best path(s) to `prefix`.
    pub fn best_of(&self, prefix: Ipv4Net) -> Option<Best> {
        let by_peer = self.paths.get(&prefix)?;
        let mut paths: Vec<&Path> = by_peer.values().collect();
        paths.sort_by(|a, b| compare(a, b).then(router_id(a).cmp(&router_id(b))));
        let first = *paths.first()?;
        let equal: Vec<&&Path> = paths
            .iter()
            .filter(|p| compare(p, first) == std::cmp::Ordering::Equal)
            .collect();
        let next_hops: BTreeSet<Ipv4Addr> = equal.iter().map(|p| p.next_hop()).collect();
        Some(Best {
            next_hops: next_hops.into_iter().collect(),
            peers: equal.iter().map(|p| p.peer).collect(),
            as_path_len: first.attrs.as_path_len(),
            path: first.clone(),
        })
    }

    /// The best path(s) to every prefix.
    pub fn best(&self) -> BTreeMap<Ipv4Net, Best> {
        self.paths
            .keys()
            .filter_map(|p| Some((*p, self.best_of(*p)?)))
            .collect()
    }

    /// The prefixes changed since the last call, each with its best path now (`None`: gone).
    pub fn take_changes(&mut self) -> Vec<(Ipv4Net, Option<Best>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|p| (p, self.best_of(p)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{Origin, Segment};
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn path(peer: &str, f: impl Fn(&mut Path)) -> Path {
        let mut p = Path {
            peer: ip(peer),
            peer_router_id: ip(peer),
            ebgp: false,
            attrs: Attributes {
                origin: Origin::Igp,
                as_path: vec![Segment::Sequence(vec![65000])],
                next_hop: Some(ip(peer)),
                ..Attributes::default()
            },
            stale: false,
        };
        f(&mut p);
        p
    }

    /// (what, the two paths, the next hops that must win)
    #[test]
    fn the_decision_process_picks_what_rfc_4271_picks() {
        let cases: Vec<(&str, Path, Path, Vec<&str>)> = vec![
            (
                "higher local-pref",
                path("10.0.0.1", |p| p.attrs.local_pref = Some(200)),
                path("10.0.0.2", |p| p.attrs.as_path.clear()),
                vec!["10.0.0.1"],
            ),
            (
                "shorter AS_PATH",
                path("10.0.0.1", |p| {
                    p.attrs.as_path = vec![Segment::Sequence(vec![1, 2])]
                }),
                path("10.0.0.2", |_| {}),
                vec!["10.0.0.2"],
            ),
            (
                "an AS_SET counts as one",
                path("10.0.0.1", |p| {
                    p.attrs.as_path = vec![Segment::Set(vec![1, 2, 3])]
                }),
                path("10.0.0.2", |p| {
                    p.attrs.as_path = vec![Segment::Sequence(vec![1, 2])]
                }),
                vec!["10.0.0.1"],
            ),
            (
                "lower origin",
                path("10.0.0.1", |p| p.attrs.origin = Origin::Incomplete),
                path("10.0.0.2", |_| {}),
                vec!["10.0.0.2"],
            ),
            (
                "lower MED from the same AS",
                path("10.0.0.1", |p| p.attrs.med = Some(10)),
                path("10.0.0.2", |p| p.attrs.med = Some(5)),
                vec!["10.0.0.2"],
            ),
            (
                "MED ignored across ASes: ECMP",
                path("10.0.0.1", |p| {
                    p.attrs.med = Some(10);
                    p.attrs.as_path = vec![Segment::Sequence(vec![1])];
                }),
                path("10.0.0.2", |p| {
                    p.attrs.med = Some(5);
                    p.attrs.as_path = vec![Segment::Sequence(vec![2])];
                }),
                vec!["10.0.0.1", "10.0.0.2"],
            ),
            (
                "eBGP over iBGP",
                path("10.0.0.1", |_| {}),
                path("10.0.0.2", |p| p.ebgp = true),
                vec!["10.0.0.2"],
            ),
            (
                "a path through fewer route reflectors",
                path("10.0.0.1", |p| {
                    p.attrs.cluster_list = vec![ip("10.255.0.1"), ip("10.255.0.2")]
                }),
                path("10.0.0.2", |p| {
                    p.attrs.cluster_list = vec![ip("10.255.0.1")]
                }),
                vec!["10.0.0.2"],
            ),
            (
                "equal paths: ECMP over both next hops",
                path("10.0.0.2", |_| {}),
                path("10.0.0.1", |_| {}),
                vec!["10.0.0.1", "10.0.0.2"],
            ),
        ];
        let prefix: Ipv4Net = "10.244.5.0/24".parse().unwrap();
        for (what, a, b, want) in cases {
            let mut rib = Rib::default();
            rib.announce(prefix, a);
            rib.announce(prefix, b);
            let best = &rib.best()[&prefix];
            let want: Vec<Ipv4Addr> = want.into_iter().map(ip).collect();
            assert_eq!(best.next_hops, want, "{what}");
        }
    }

    #[test]
    fn withdrawals_stale_marks_and_sweeps() {
        let prefix: Ipv4Net = "10.244.5.0/24".parse().unwrap();
        let other: Ipv4Net = "10.244.6.0/24".parse().unwrap();
        let mut rib = Rib::default();
        rib.announce(prefix, path("10.0.0.1", |_| {}));
        rib.announce(other, path("10.0.0.1", |_| {}));
        rib.announce(prefix, path("10.0.0.2", |_| {}));
        assert_eq!(rib.best()[&prefix].next_hops.len(), 2);
        assert!(rib.withdraw(prefix, ip("10.0.0.2")));
        assert!(!rib.withdraw(prefix, ip("10.0.0.2")));
        assert_eq!(rib.best()[&prefix].next_hops, vec![ip("10.0.0.1")]);
        // The peer restarts: its routes stay (stale) until it says it is done.
        rib.mark_stale(ip("10.0.0.1"));
        assert_eq!(rib.len(), 2);
        rib.announce(prefix, path("10.0.0.1", |_| {}));
        assert_eq!(
            rib.sweep_stale(ip("10.0.0.1")),
            1,
            "the route it did not announce again"
        );
        assert!(rib.best().contains_key(&prefix));
        assert!(!rib.best().contains_key(&other));
        assert_eq!(rib.drop_peer(ip("10.0.0.1")), 1);
        assert!(rib.is_empty());
        // Becoming a reflector in cluster C: paths that went through C are loops.
        rib.announce(
            prefix,
            path("10.0.0.1", |p| {
                p.attrs.cluster_list = vec![ip("10.255.0.9")]
            }),
        );
        rib.announce(other, path("10.0.0.1", |_| {}));
        assert_eq!(rib.drop_through_cluster(ip("10.255.0.9")), 1);
        assert!(!rib.best().contains_key(&prefix));
        assert!(rib.best().contains_key(&other));
    }

    /// Random announcements, withdrawals, stale marks, sweeps and dropped peers: the best paths
    /// kept up to date from `take_changes` always equal a full recomputation, and the per-peer
    /// counts equal a count of the table.
    #[test]
    fn incremental_changes_always_equal_a_full_recomputation() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let peers = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];
        let mut rib = Rib::default();
        let mut mirror: BTreeMap<Ipv4Net, Best> = BTreeMap::new();
        for round in 0..3000 {
            let peer = peers[next(4) as usize];
            let prefix = Ipv4Net::new(Ipv4Addr::new(10, 244, next(40) as u8, 0), 24).unwrap();
            match next(20) {
                0 => {
                    rib.drop_peer(ip(peer));
                }
                1 => rib.mark_stale(ip(peer)),
                2 => {
                    rib.sweep_stale(ip(peer));
                }
                3..=7 => {
                    rib.withdraw(prefix, ip(peer));
                }
                _ => {
                    let len = next(3) as usize;
                    let pref = 100 + next(2) as u32 * 50;
                    rib.announce(
                        prefix,
                        path(peer, |p| {
                            p.attrs.as_path = vec![Segment::Sequence(vec![65000; len])];
                            p.attrs.local_pref = Some(pref);
                        }),
                    );
                }
            }
            if next(3) == 0 {
                for (p, b) in rib.take_changes() {
                    match b {
                        Some(b) => mirror.insert(p, b),
                        None => mirror.remove(&p),
                    };
                }
                assert_eq!(mirror, rib.best(), "round {round}");
                for peer in peers {
                    let counted = rib
                        .paths
                        .values()
                        .filter(|m| m.contains_key(&ip(peer)))
                        .count();
                    assert_eq!(rib.count_from(ip(peer)), counted, "round {round}");
                }
            }
        }
    }
}
