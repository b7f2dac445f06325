//! The socket reverse-NAT and affinity maps as the programs use them: the current map, and,
//! while a resize of it finishes, the previous one (`RNAT_PREV_V1`, `AFF_PREV_V1`), which the
//! programs still attached to some hooks use. An entry is written in both, and looked up in the
//! previous one when the current one lacks it, so that whichever hook runs which programs, a
//! socket's reverse translation and a client's backend are the same. (The conntrack map has its
//! own module, [`crate::ct_map`]: its entries are created only where their key is free.)

use aya_ebpf::{
    btf_maps::{HashOfMaps, LruHashMap as BtfLruHashMap},
    maps::LruHashMap,
};

/// The previous map held by `outer`, while a resize finishes.
#[inline(always)]
fn previous<K, V>(
    outer: &'static HashOfMaps<u32, BtfLruHashMap<K, V, 1>, 1>,
) -> Option<&'static BtfLruHashMap<K, V, 1>> {
    // SAFETY: the outer map is only written by the agent, which never removes the entry while
    // a program it moved could still be running against it.
    unsafe { outer.get(&0) }
}

/// A copy of `key`'s value: from `current`, or, while a resize finishes, from the previous map.
#[inline(always)]
pub(crate) fn get<K, V: Copy>(
    current: &'static LruHashMap<K, V>,
    outer: &'static HashOfMaps<u32, BtfLruHashMap<K, V, 1>, 1>,
    key: &K,
) -> Option<V> {
    // SAFETY: hash map values are read once, by copy.
    if let Some(v) = unsafe { current.get(key) } {
        return Some(*v);
    }
    // SAFETY: as above.
    previous(outer)?.get_ptr(key).map(|v| unsafe { *v })
}

/// Writes `value` under `key` in `current` and, while a resize finishes, in the previous map
/// (best effort there). False when `current` refused it.
#[inline(always)]
pub(crate) fn insert<K, V>(
    current: &'static LruHashMap<K, V>,
    outer: &'static HashOfMaps<u32, BtfLruHashMap<K, V, 1>, 1>,
    key: &K,
    value: &V,
) -> bool {
    if current.insert(key, value, 0).is_err() {
        return false;
    }
    if let Some(p) = previous(outer) {
        let _ = p.insert(key, value, 0);
    }
    true
}
