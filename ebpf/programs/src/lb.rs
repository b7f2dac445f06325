//! Load balancing of a new flow: the backend (session affinity by client address, else the
//! frontend's Maglev table — so every node picks the same backend for the same flow — else a
//! random slot) and the frontend's source ranges.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key as LpmKey,
};
use ferrox_abi::{
    AffinityKey, AffinityValue, MAGLEV_TABLE_SIZE, Reason, ServiceKey, ServiceValue, SrcRangeKey,
    affinity_client, src_range_prefixlen, svc_flags,
};

use crate::{
    flow::Flow,
    maps::{AFF_PREV_V1, AFFINITY_V1, BACKENDS_V1, MAGLEV_V1, SRC_RANGES_V1, SVC_V1},
    resizing,
};

/// Whether the frontend takes this new flow: it has backends, and the client is inside its
/// loadBalancerSourceRanges when it has some.
#[inline(always)]
pub(crate) fn admit(flow: &Flow, frontend: &ServiceValue) -> Result<(), Reason> {
    if frontend.count == 0 {
        return Err(Reason::DropNoBackend);
    }
    if frontend.flags & svc_flags::SOURCE_RANGES != 0 {
        let k = LpmKey::new(
            src_range_prefixlen(32),
            SrcRangeKey {
                rev_nat_id: frontend.rev_nat_id.to_be(),
                _pad: 0,
                addr: flow.saddr,
            },
        );
        if SRC_RANGES_V1.get(&k).is_none() {
            return Err(Reason::DropSourceRange);
        }
    }
    Ok(())
}

/// The backend of a new flow: the client address's affinity entry, else the frontend's Maglev
/// table when `maglev` (external flows; internal entries have other backends than the table's),
/// else a random slot.
#[inline(always)]
pub(crate) fn pick_backend(
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    maglev: bool,
) -> Result<u32, Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let akey = AffinityKey {
        client: u64::from(flow.saddr),
        rev_nat_id: frontend.rev_nat_id,
        client_kind: affinity_client::IPV4,
        _pad: [0; 5],
    };
    if frontend.flags & svc_flags::AFFINITY != 0 {
        let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
        if let Some(a) = resizing::get(&AFFINITY_V1, &AFF_PREV_V1, &akey)
            && now.saturating_sub(a.last_used_ns) <= timeout_ns
            // SAFETY: only checks that the backend still exists.
            && (unsafe { BACKENDS_V1.get(&a.backend_id) }).is_some()
        {
            let _ = resizing::insert(
                &AFFINITY_V1,
                &AFF_PREV_V1,
                &akey,
                &AffinityValue {
                    last_used_ns: now,
                    ..a
                },
            );
            return Ok(a.backend_id);
        }
    }
    let from_table = if maglev {
        let hash = flow_hash(flow);
        // SAFETY: the table entry is read by copy.
        unsafe { MAGLEV_V1.get_value(&u32::from(frontend.rev_nat_id), &(hash % MAGLEV_TABLE_SIZE)) }
            .copied()
    } else {
        None
    };
    let backend_id = match from_table {
        Some(id) => id,
        None => {
            // No table (yet): a random slot, like the socket hooks.
            // SAFETY: a helper without arguments or preconditions.
            let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(frontend.count)) as u16 + 1;
            // SAFETY: hash map values are read once, by copy.
            match unsafe { SVC_V1.get(&key.with_slot(slot)) } {
                Some(s) => s.backend_id,
                None => return Err(Reason::DropBackendMissing),
            }
        }
    };
    if frontend.flags & svc_flags::AFFINITY != 0 {
        let _ = resizing::insert(
            &AFFINITY_V1,
            &AFF_PREV_V1,
            &akey,
            &AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns: now,
            },
        );
    }
    Ok(backend_id)
}

/// A hash of the flow's tuple, the same on every node ([`ferrox_abi::flow_hash`]).
#[inline(always)]
pub(crate) fn flow_hash(flow: &Flow) -> u32 {
    ferrox_abi::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}
