//! The routing information base: what each peer announced (Adj-RIB-In), and the best paths
//! (Loc-RIB) chosen from them by the RFC 4271 decision process, reduced to what these
//! topologies need: highest LOCAL_PREF, shortest AS_PATH, lowest ORIGIN, lowest MED (between
//! paths from the same neighbouring AS), eBGP over iBGP, then lowest router ID. Paths equal up to
//! the router ID are ECMP. Pure data; the session tasks feed it.

use std::{
    collections::{BTreeMap, BTreeSet},
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
}

#[derive(Clone, Debug, Default)]
pub struct Rib {
    /// prefix -> peer -> path.
    paths: BTreeMap<Ipv4Net, BTreeMap<Ipv4Addr, Path>>,
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
}

impl Rib {
    /// Stores `peer`'s path to `prefix` (replacing its previous one).
    pub fn announce(&mut self, prefix: Ipv4Net, path: Path) {
        self.paths
            .entry(prefix)
            .or_default()
            .insert(path.peer, path);
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
        had
    }

    /// Removes every path of `peer` (its session ended without graceful restart).
    pub fn drop_peer(&mut self, peer: Ipv4Addr) -> usize {
        self.retain(|p| p.peer != peer)
    }

    /// Marks every path of `peer` stale (its session ended; it may restart gracefully).
    pub fn mark_stale(&mut self, peer: Ipv4Addr) {
        for p in self.paths.values_mut().flat_map(|m| m.values_mut()) {
            if p.peer == peer {
                p.stale = true;
            }
        }
    }

    /// Removes `peer`'s paths still stale (after its End-of-RIB, or when its restart time ran
    /// out).
    pub fn sweep_stale(&mut self, peer: Ipv4Addr) -> usize {
        self.retain(|p| !(p.peer == peer && p.stale))
    }

    fn retain(&mut self, keep: impl Fn(&Path) -> bool) -> usize {
        let mut removed = 0;
        self.paths.retain(|_, by_peer| {
            let before = by_peer.len();
            by_peer.retain(|_, p| keep(p));
            removed += before - by_peer.len();
            !by_peer.is_empty()
        });
        removed
    }

    /// Paths received from `peer`.
    pub fn count_from(&self, peer: Ipv4Addr) -> usize {
        self.paths
            .values()
            .filter(|m| m.contains_key(&peer))
            .count()
    }

    /// The best path(s) to every prefix.
    pub fn best(&self) -> BTreeMap<Ipv4Net, Best> {
        let mut out = BTreeMap::new();
        for (prefix, by_peer) in &self.paths {
            let mut paths: Vec<&Path> = by_peer.values().collect();
            paths.sort_by(|a, b| compare(a, b).then(a.peer_router_id.cmp(&b.peer_router_id)));
            let Some(first) = paths.first() else {
                continue;
            };
            let equal: Vec<&&Path> = paths
                .iter()
                .filter(|p| compare(p, first) == std::cmp::Ordering::Equal)
                .collect();
            let next_hops: BTreeSet<Ipv4Addr> = equal.iter().map(|p| p.next_hop()).collect();
            out.insert(
                *prefix,
                Best {
                    next_hops: next_hops.into_iter().collect(),
                    peers: equal.iter().map(|p| p.peer).collect(),
                    as_path_len: first.attrs.as_path_len(),
                },
            );
        }
        out
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
    }
}
