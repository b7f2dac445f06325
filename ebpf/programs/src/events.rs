//! Events for `ferrox monitor`: drops and translations, written to the `EVENTS_V1` ring buffer
//! only while a monitor listens (the `monitor` field of `CONFIG_V1`), so an unwatched node pays
//! one array lookup per event site and nothing else.

use ferrox_abi::{Hook, MonitorEvent, Reason, event_kind};

use crate::maps::{CONFIG_V1, EVENTS_V1};

/// Whether a monitor listens.
#[inline(always)]
fn listening() -> bool {
    CONFIG_V1.get(0).is_some_and(|c| c.monitor != 0)
}

/// A drop (or refusal) of a flow, with its reason.
#[inline(always)]
pub fn drop(hook: Hook, reason: Reason, proto: u8, saddr: u32, sport: u16, daddr: u32, dport: u16) {
    if listening() {
        let ev = MonitorEvent {
            kind: event_kind::DROP,
            hook: hook as u8,
            reason: reason as u8,
            proto,
            saddr,
            daddr,
            sport,
            dport,
            ..MonitorEvent::default()
        };
        let _ = EVENTS_V1.output(&ev, 0);
    }
}

/// A new flow or connection sent to `nat_addr`:`nat_port`.
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "the tuple before and after")]
pub fn translate(
    hook: Hook,
    proto: u8,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
    nat_addr: u32,
    nat_port: u16,
) {
    if listening() {
        let ev = MonitorEvent {
            kind: event_kind::TRANSLATE,
            hook: hook as u8,
            reason: Reason::NatNewFlow as u8,
            proto,
            saddr,
            daddr,
            nat_addr,
            sport,
            dport,
            nat_port,
            _pad: 0,
        };
        let _ = EVENTS_V1.output(&ev, 0);
    }
}
