//! What this node announces to each peer (its Adj-RIB-Out): its own prefixes of the kinds the
//! peer takes, and, as a route reflector, the best paths it reflects to that peer; and the
//! UPDATEs that move a peer from what it has to what it should have.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::PoisonError;

use ipnet::Ipv4Net;

use super::{Config, Exports, Peer, Shared};
use tracing::warn;

use crate::bgp::wire::{self, Attributes, Message, Origin, Segment, Update};

impl Shared {
    /// What this node announces to `peer` now: the kinds of its own prefixes the peer takes
    /// and, as a route reflector, the best paths it reflects to that peer. The peer's export
    /// kinds and client flag are read as configured now (they change without a new session).
    pub(super) fn adj_rib_out(
        &self,
        peer: &Peer,
        exports: &Exports,
    ) -> BTreeMap<Ipv4Net, Attributes> {
        let cfg = &self.cfg;
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (export, rr_client) = peers
            .get(&peer.addr)
            .map_or((peer.export, peer.rr_client), |h| {
                (h.peer.export, h.peer.rr_client)
            });
        let clients: HashMap<Ipv4Addr, bool> = peers
            .iter()
            .map(|(a, h)| (*a, h.peer.asn == cfg.asn && h.peer.rr_client))
            .collect();
        drop(peers);
        let mut out: BTreeMap<Ipv4Net, Attributes> = exports
            .select(&export)
            .into_iter()
            .map(|p| (p, export_attrs(cfg, peer)))
            .collect();
        let Some(cluster_id) = self.cluster_id() else {
            return out;
        };
        if peer.asn != cfg.asn {
            return out;
        }
        for (prefix, best) in self.learned.borrow().iter() {
            let from = &best.path;
            if from.ebgp || from.peer == peer.addr || out.contains_key(prefix) {
                continue;
            }
            let from_client = clients.get(&from.peer).copied().unwrap_or(false);
            if !from_client && !rr_client {
                continue;
            }
            let mut a = from.attrs.clone();
            a.originator_id.get_or_insert(from.peer_router_id);
            a.cluster_list.insert(0, cluster_id);
            out.insert(*prefix, a);
        }
        out
    }
}

pub(super) fn export_attrs(cfg: &Config, peer: &Peer) -> Attributes {
    let ebgp = peer.asn != cfg.asn;
    Attributes {
        origin: Origin::Igp,
        as_path: if ebgp {
            vec![Segment::Sequence(vec![cfg.asn])]
        } else {
            vec![]
        },
        next_hop: Some(cfg.next_hop),
        local_pref: (!ebgp).then_some(100),
        ..Attributes::default()
    }
}

/// The UPDATEs that take a peer from having `old` to having `new`: withdrawals, then the
/// prefixes new or changed, those with the same attributes together.
pub(super) fn export_updates(
    old: &BTreeMap<Ipv4Net, Attributes>,
    new: &BTreeMap<Ipv4Net, Attributes>,
) -> Vec<Message> {
    let withdrawn: Vec<Ipv4Net> = old
        .keys()
        .filter(|p| !new.contains_key(p))
        .copied()
        .collect();
    let mut by_attrs: HashMap<&Attributes, Vec<Ipv4Net>> = HashMap::new();
    for (prefix, a) in new {
        if old.get(prefix) != Some(a) {
            by_attrs.entry(a).or_default().push(*prefix);
        }
    }
    let mut groups: Vec<(&Attributes, Vec<Ipv4Net>)> = by_attrs.into_iter().collect();
    groups.sort_by_key(|(_, prefixes)| prefixes[0]);
    let mut out = Vec::new();
    for chunk in withdrawn.chunks(wire::PREFIXES_PER_UPDATE) {
        out.push(Message::Update(Update {
            withdrawn: chunk.to_vec(),
            ..Update::default()
        }));
    }
    for (attrs, prefixes) in groups {
        // As many prefixes as fit in 4096 bytes next to these attributes (a reflected route
        // brings whatever attributes it came with: communities, long AS paths); 5 bytes per
        // prefix at most (a /32).
        let bare = wire::encode(
            &Message::Update(Update {
                withdrawn: vec![],
                attrs: Some(attrs.clone()),
                nlri: vec![],
            }),
            true,
        )
        .len();
        let room = wire::MAX_LEN.saturating_sub(bare) / 5;
        if room == 0 {
            warn!(
                prefixes = prefixes.len(),
                attributes = bare,
                "BGP: attributes too large for an UPDATE; prefixes not announced"
            );
            continue;
        }
        for chunk in prefixes.chunks(room.min(wire::PREFIXES_PER_UPDATE)) {
            out.push(Message::Update(Update {
                withdrawn: vec![],
                attrs: Some(attrs.clone()),
                nlri: chunk.to_vec(),
            }));
        }
    }
    out
}
