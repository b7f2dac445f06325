//! Per-CPU verdict and drop-reason counters. Every program path calls [`count`] exactly once.

use ferrox_abi::{Hook, Reason, counter_index};

use crate::maps::COUNTERS_V2;

/// Adds one event of `bytes` bytes to the (hook, reason) cell of this CPU.
#[inline(always)]
pub fn count(hook: Hook, reason: Reason, bytes: u32) {
    if let Some(cell) = COUNTERS_V2.get_ptr_mut(counter_index(hook, reason)) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points at this
        // CPU's cell for the program's whole run; no other CPU writes it.
        unsafe {
            (*cell).packets += 1;
            (*cell).bytes += u64::from(bytes);
        }
    }
}
