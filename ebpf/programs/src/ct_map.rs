//! The conntrack map as the programs use it: the current map, and, while a resize of it
//! finishes, the previous one (`CT_PREV_V1`), which the programs still attached to some hooks
//! use. Every lookup, creation and removal of an entry goes through here.

use ferrox_abi::{CtEntry, CtKey, ct_flags};

use crate::maps::{CT_PREV_V1, CT_V2};

/// `-EEXIST`: a map insert with `BPF_NOEXIST` found the key taken.
pub(crate) const EEXIST: i32 = -17;

/// Map update flag: only create, never overwrite.
pub(crate) const BPF_NOEXIST: u64 = 1;

/// The conntrack map of the previous size while a resize finishes (the agent sets it before
/// it moves the hooks to these programs and clears it once the flows are merged).
#[inline(always)]
fn previous() -> Option<&'static aya_ebpf::btf_maps::LruHashMap<CtKey, CtEntry, 1>> {
    // SAFETY: the outer map is only written by the agent, which never removes the entry while
    // a program it moved could still be running against it.
    unsafe { CT_PREV_V1.get(&0) }
}

/// A flow's entry: from the current map, or, while a resize finishes, from the previous one
/// (a flow the programs still attached to some hooks created).
#[inline(always)]
pub(crate) fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    match CT_V2.get_ptr_mut(key) {
        Some(e) => Some(e),
        None => previous()?.get_ptr_mut(key),
    }
}

/// Creates an entry where its key is free: in the current map and, while a resize finishes, in
/// the previous one too (the programs still using it must see the flow). `EEXIST` when either
/// holds the key already.
///
/// The programs of the previous resize still attached somewhere also read `CT_PREV_V1`, where
/// their own map now sits: for them the second insert finds the entry the first one wrote,
/// which is no collision.
#[inline(always)]
pub(crate) fn create(key: &CtKey, value: &CtEntry) -> Result<(), i32> {
    CT_V2.insert(key, value, BPF_NOEXIST)?;
    if let Some(p) = previous()
        && let Err(EEXIST) = p.insert(key, value, BPF_NOEXIST)
        && !p.get_ptr(key).is_some_and(|e| same_translation(e, value))
    {
        let _ = CT_V2.remove(key);
        return Err(EEXIST);
    }
    Ok(())
}

/// Whether the entry at `e` rewrites packets as `value` does.
#[inline(always)]
fn same_translation(e: *const CtEntry, value: &CtEntry) -> bool {
    // SAFETY: `e` comes from a successful lookup; the translation fields never change after
    // an entry is created.
    unsafe {
        (*e).nat_saddr == value.nat_saddr
            && (*e).nat_daddr == value.nat_daddr
            && (*e).nat_sport == value.nat_sport
            && (*e).nat_dport == value.nat_dport
            && (*e).flags & ct_flags::REPLY == value.flags & ct_flags::REPLY
    }
}

/// Removes an entry from the current map and, while a resize finishes, the previous one.
#[inline(always)]
pub(crate) fn remove(key: &CtKey) {
    let _ = CT_V2.remove(key);
    if let Some(p) = previous() {
        let _ = p.remove(key);
    }
}
