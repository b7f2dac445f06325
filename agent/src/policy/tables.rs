//! The compiled policy ([`super::compile::Compiled`]) in the kernel's tables: the ipcache
//! (`IPCACHE_V1`), each isolated local pod's entries (`POLICY_V1`, keyed by the pod's address)
//! and isolation (`POLICY_EP_V1`). Written as a diff against what the maps hold: entries that
//! stay are not touched, new and changed ones are written before stale ones are removed, so a
//! flow allowed before and after an update is allowed throughout.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferrox_abi::{
    EndpointKey, IpcacheKey, IpcacheValue, POLICY_ANY_IDENTITY, POLICY_CT_NOT_ISOLATED,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyEndpoint, PolicyKey, PolicyValue,
    policy_direction, policy_isolation, proto,
};
use ferrox_datapath::Maps;

use super::{
    compile::{Compiled, Entry},
    model::{Direction, Protocol},
};

/// The protocol number a policy key carries.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Sctp => 132,
    }
}

/// The number the kernel's entries (and the flows they allow) name a policy by: a hash of its
/// `namespace/name` (FNV-1a), the same on every node and across restarts, so a remembered flow
/// keeps naming the policy that allowed it while others come and go. Never
/// [`POLICY_CT_NOT_ISOLATED`].
pub fn policy_number(id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    if h == POLICY_CT_NOT_ISOLATED {
        h - 1
    } else {
        h
    }
}

/// An address as the maps hold it (network byte order in a `u32`).
fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The key and prefix length of `entry` of the pod at `endpoint`.
pub fn policy_key(endpoint: Ipv4Addr, entry: &Entry) -> (u32, PolicyKey) {
    let direction = match entry.direction {
        Direction::Ingress => policy_direction::INGRESS,
        Direction::Egress => policy_direction::EGRESS,
    };
    let identity = entry.identity.unwrap_or(POLICY_ANY_IDENTITY);
    match entry.protocol {
        None => (
            POLICY_PREFIX_ANY_PROTO,
            PolicyKey::new(be(endpoint), direction, identity, 0, 0),
        ),
        Some(p) => (
            POLICY_PREFIX_ANY_PORT + u32::from(entry.port.len),
            PolicyKey::new(
                be(endpoint),
                direction,
                identity,
                protocol_number(p),
                entry.port.value,
            ),
        ),
    }
}

/// What [`write`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub ipcache_set: usize,
    pub ipcache_removed: usize,
    pub entries_set: usize,
    pub entries_removed: usize,
    pub endpoints_set: usize,
    pub endpoints_removed: usize,
}

/// Writes `compiled` for the local pods `local` (namespace/name -> address) into `maps`.
pub fn write(
    maps: &mut Maps,
    compiled: &Compiled,
    local: &BTreeMap<String, Ipv4Addr>,
) -> anyhow::Result<Written> {
    let mut done = Written::default();
    // The ipcache: prefix -> identity.
    let want_ip: BTreeMap<(u32, u32), u32> = compiled
        .ipcache
        .iter()
        .map(|(p, id)| ((u32::from(p.prefix_len()), be(p.network())), *id))
        .collect();
    let have_ip: BTreeMap<(u32, u32), u32> = maps
        .ipcache
        .entries()?
        .into_iter()
        .map(|(len, k, v)| ((len, k.addr), v.identity))
        .collect();
    for (&(len, addr), &identity) in &want_ip {
        if have_ip.get(&(len, addr)) != Some(&identity) {
            maps.ipcache
                .insert(len, IpcacheKey { addr }, &IpcacheValue { identity })?;
            done.ipcache_set += 1;
        }
    }
    // The pods' entries and isolation.
    let mut want: BTreeMap<(u32, [u8; 12]), PolicyValue> = BTreeMap::new();
    let mut want_ep: BTreeMap<u32, u32> = BTreeMap::new();
    for (id, ep) in &compiled.endpoints {
        let Some(addr) = local.get(id) else {
            continue;
        };
        let mut isolated = 0;
        if ep.ingress_isolated {
            isolated |= policy_isolation::INGRESS;
        }
        if ep.egress_isolated {
            isolated |= policy_isolation::EGRESS;
        }
        want_ep.insert(be(*addr), isolated);
        for e in &ep.entries {
            let (len, key) = policy_key(*addr, e);
            // Several rules may allow the same key: the first (policy, rule) in order names it.
            want.entry((len, key.data)).or_insert(PolicyValue {
                policy: compiled
                    .policies
                    .get(e.policy as usize)
                    .map_or(POLICY_CT_NOT_ISOLATED - 1, |id| policy_number(id)),
                rule: e.rule,
                _pad: 0,
            });
        }
    }
    let have: BTreeMap<(u32, [u8; 12]), PolicyValue> = maps
        .policies
        .entries()?
        .into_iter()
        .map(|(len, k, v)| ((len, k.data), v))
        .collect();
    for (&(len, data), value) in &want {
        if have.get(&(len, data)) != Some(value) {
            maps.policies.insert(len, PolicyKey { data }, value)?;
            done.entries_set += 1;
        }
    }
    let have_ep: BTreeMap<u32, u32> = maps
        .policy_endpoints
        .entries()?
        .into_iter()
        .map(|(k, v)| (k.addr, v.isolated))
        .collect();
    for (&addr, &isolated) in &want_ep {
        if have_ep.get(&addr) != Some(&isolated) {
            maps.policy_endpoints
                .insert(&EndpointKey { addr }, &PolicyEndpoint { isolated })?;
            done.endpoints_set += 1;
        }
    }
    // The programs judge a pod's packets once its filter slot is marked (its entries are in
    // place). Every isolated pod's slot is written each time: a slot left unmarked by a crash
    // between two writes is marked again.
    for &addr in want_ep.keys() {
        maps.policy_filter.set(addr, true)?;
    }
    // Then what no longer applies.
    let stale_ep: BTreeSet<u32> = have_ep
        .keys()
        .filter(|a| !want_ep.contains_key(a))
        .copied()
        .collect();
    for addr in stale_ep {
        maps.policy_endpoints.remove(&EndpointKey { addr })?;
        done.endpoints_removed += 1;
    }
    // Slots no isolated pod falls on any more (another may share a slot).
    let want_slots: BTreeSet<u32> = want_ep
        .keys()
        .map(|a| ferrox_abi::policy_filter_slot(*a))
        .collect();
    for &addr in have_ep.keys() {
        if !want_slots.contains(&ferrox_abi::policy_filter_slot(addr)) {
            maps.policy_filter.set(addr, false)?;
        }
    }
    for &(len, data) in have.keys().filter(|k| !want.contains_key(k)) {
        maps.policies.remove(len, PolicyKey { data })?;
        done.entries_removed += 1;
    }
    for &(len, addr) in have_ip.keys().filter(|k| !want_ip.contains_key(k)) {
        maps.ipcache.remove(len, IpcacheKey { addr })?;
        done.ipcache_removed += 1;
    }
    Ok(done)
}

/// The verdict the kernel's tables give for the local pod at `endpoint` in `dir` towards `peer`
/// on `protocol`/`port`, looked up as the programs do: `None` when the pod is not isolated in
/// that direction; else the allowing (policy, rule), if any: the longest match for the peer's
/// identity, else for any peer.
pub fn table_verdict(
    maps: &Maps,
    endpoint: Ipv4Addr,
    dir: Direction,
    peer: Ipv4Addr,
    protocol: Protocol,
    port: u16,
) -> anyhow::Result<Option<Option<PolicyValue>>> {
    let (bit, direction) = match dir {
        Direction::Ingress => (policy_isolation::INGRESS, policy_direction::INGRESS),
        Direction::Egress => (policy_isolation::EGRESS, policy_direction::EGRESS),
    };
    let isolated = maps
        .policy_endpoints
        .get(&EndpointKey { addr: be(endpoint) })?
        .is_some_and(|e| e.isolated & bit != 0);
    if !isolated {
        return Ok(None);
    }
    let identity = maps
        .ipcache
        .longest_match(IpcacheKey { addr: be(peer) })?
        .map_or(super::compile::WORLD, |v| v.identity);
    let lookup = |identity: u32| {
        maps.policies.longest_match(PolicyKey::new(
            be(endpoint),
            direction,
            identity,
            protocol_number(protocol),
            port,
        ))
    };
    Ok(Some(match lookup(identity)? {
        Some(v) => Some(v),
        None => lookup(POLICY_ANY_IDENTITY)?,
    }))
}
