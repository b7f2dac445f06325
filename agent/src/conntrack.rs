//! Conntrack garbage collection. The programs write a flow's two entries (original and reply
//! direction) and refresh `last_seen_ns` on every packet; the map is an LRU, so it never
//! overflows, but without collection a finished flow would linger until pressure evicts it, and
//! a later flow on the same 5-tuple would inherit its backend. The agent removes a flow's
//! entries together once the flow is idle past its protocol's timeout: TCP after a long idle
//! time, or a short one once it closed (an RST, or a FIN in each direction: the programs mark
//! it closing; a half-closed flow waits for the idle timeout); UDP after a shorter idle time,
//! as nf_conntrack and Cilium do. An entry a packet used after the collector read the map is
//! kept.
//!
//! [`expired`] is the pure decision; [`run`] applies it periodically to the pinned map.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use ferrox_abi::{CtEntry, CtKey, ct_flags};
use ferrox_datapath::{Maps, PinLayout, TypedHash};
use tracing::{debug, info, warn};

/// Idle times after which a flow is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Duration,
    /// A TCP flow after a FIN or RST.
    pub tcp_closing: Duration,
    /// UDP (and anything not TCP).
    pub udp: Duration,
}

impl Timeouts {
    fn of(&self, proto: u8, closing: bool) -> Duration {
        match (proto, closing) {
            (6, true) => self.tcp_closing,
            (6, false) => self.tcp,
            _ => self.udp,
        }
    }
}

/// The key of the reply-direction entry of the original-direction entry (`key`, `e`), as the
/// programs write it.
pub fn reply_key(key: &CtKey, e: &CtEntry) -> CtKey {
    CtKey {
        saddr: e.nat_daddr,
        daddr: e.nat_saddr,
        sport: e.nat_dport,
        dport: e.nat_sport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// The entries to remove at `now_ns` (the programs' clock, CLOCK_MONOTONIC): both entries of
/// every flow idle in both directions past its timeout, and reply entries whose original
/// entry is gone (evicted) once they are idle too.
pub fn expired(entries: &[(CtKey, CtEntry)], now_ns: u64, timeouts: &Timeouts) -> Vec<CtKey> {
    let by_key: HashMap<&CtKey, &CtEntry> = entries.iter().map(|(k, e)| (k, e)).collect();
    let idle = |last: u64| Duration::from_nanos(now_ns.saturating_sub(last));
    let mut out = Vec::new();
    let mut paired = HashSet::new();
    for (k, e) in entries
        .iter()
        .filter(|(_, e)| e.flags & ct_flags::REPLY == 0)
    {
        let rk = reply_key(k, e);
        let reply = by_key.get(&rk).filter(|r| r.flags & ct_flags::REPLY != 0);
        let last = reply.map_or(e.last_seen_ns, |r| r.last_seen_ns.max(e.last_seen_ns));
        let closing = (e.flags | reply.map_or(0, |r| r.flags)) & ct_flags::CLOSING != 0;
        if reply.is_some() {
            paired.insert(rk);
        }
        if idle(last) > timeouts.of(k.proto, closing) {
            out.push(*k);
            if reply.is_some() {
                out.push(rk);
            }
        }
    }
    for (k, e) in entries {
        if e.flags & ct_flags::REPLY != 0
            && !paired.contains(k)
            && idle(e.last_seen_ns) > timeouts.of(k.proto, e.flags & ct_flags::CLOSING != 0)
        {
            out.push(*k);
        }
    }
    out
}

/// Now, on the programs' clock.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Collects expired flows every `interval`, until the process ends.
pub async fn run(
    layout: PinLayout,
    timeouts: Timeouts,
    interval: Duration,
    metrics: crate::observability::metrics::Metrics,
) {
    let mut map: TypedHash<CtKey, CtEntry> = match Maps::open(&layout) {
        Ok(m) => m.conntrack,
        Err(e) => {
            warn!(error = %e, "conntrack GC disabled: cannot open the conntrack map");
            return;
        }
    };
    info!(?timeouts, ?interval, "conntrack GC running");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let entries = match map.entries() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "conntrack GC: reading the map failed");
                continue;
            }
        };
        let gone = expired(&entries, monotonic_ns(), &timeouts);
        let seen: HashMap<CtKey, u64> = entries.iter().map(|(k, e)| (*k, e.last_seen_ns)).collect();
        let mut removed = 0usize;
        let mut refreshed = 0usize;
        for k in &gone {
            // A packet that used the entry since it was read keeps it (and its flow).
            match map.get(k) {
                Ok(Some(now)) if Some(&now.last_seen_ns) != seen.get(k) => {
                    refreshed += 1;
                    continue;
                }
                Ok(None) => continue,
                _ => {}
            }
            match map.remove(k) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "conntrack GC: removing an entry failed"),
            }
        }
        if refreshed > 0 {
            debug!(
                refreshed,
                "conntrack GC: entries used since they were read were kept"
            );
        }
        metrics.conntrack_gc(removed, entries.len() - removed);
        if removed > 0 {
            info!(removed, remaining = entries.len() - removed, "conntrack GC");
        } else {
            debug!(entries = entries.len(), "conntrack GC: nothing expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts {
            tcp: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }

    /// A flow client:40000 -> frontend, translated to backend:8080 (no SNAT): its two entries.
    fn flow(
        proto: u8,
        sport: u16,
        fwd_seen: u64,
        reply_seen: u64,
        closing: bool,
    ) -> [(CtKey, CtEntry); 2] {
        let key = CtKey {
            saddr: 0x0a00_0001,
            daddr: 0x0a60_0001,
            sport,
            dport: 80,
            proto,
            _pad: [0; 3],
        };
        let fwd = CtEntry {
            nat_saddr: key.saddr,
            nat_daddr: 0x0af4_0105,
            nat_sport: sport,
            nat_dport: 8080,
            backend_id: 1,
            rev_nat_id: 1,
            flags: if closing { ct_flags::CLOSING } else { 0 },
            last_seen_ns: fwd_seen,
            ..CtEntry::default()
        };
        let rk = reply_key(&key, &fwd);
        let reply = CtEntry {
            nat_saddr: key.daddr,
            nat_daddr: key.saddr,
            nat_sport: 80,
            nat_dport: sport,
            flags: ct_flags::REPLY,
            last_seen_ns: reply_seen,
            ..fwd
        };
        [(key, fwd), (rk, reply)]
    }

    #[test]
    fn flows_go_whole_once_idle_in_both_directions_past_their_timeout() {
        let now = 10_000 * S;
        let cases = [
            // (what, entries, how many must go)
            (
                "udp idle 61 s both ways",
                flow(17, 1, now - 61 * S, now - 61 * S, false),
                2,
            ),
            (
                "udp idle 61 s but a reply 5 s ago",
                flow(17, 2, now - 61 * S, now - 5 * S, false),
                0,
            ),
            (
                "udp idle 59 s",
                flow(17, 3, now - 59 * S, now - 59 * S, false),
                0,
            ),
            (
                "tcp idle 61 s",
                flow(6, 4, now - 61 * S, now - 61 * S, false),
                0,
            ),
            (
                "tcp idle 2 h",
                flow(6, 5, now - 7200 * S, now - 7200 * S, false),
                2,
            ),
            (
                "tcp closing, idle 11 s",
                flow(6, 6, now - 11 * S, now - 11 * S, true),
                2,
            ),
            (
                "tcp closing, idle 9 s",
                flow(6, 7, now - 9 * S, now - 9 * S, true),
                0,
            ),
            (
                "from the future (clock read before the packet)",
                flow(17, 8, now + S, now + S, false),
                0,
            ),
        ];
        for (what, entries, want) in cases {
            let got = expired(&entries, now, &timeouts());
            assert_eq!(got.len(), want, "{what}: {got:?}");
            if want == 2 {
                assert!(
                    got.contains(&entries[0].0) && got.contains(&entries[1].0),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn a_reply_closing_marks_the_flow_and_orphans_expire_alone() {
        let now = 10_000 * S;
        // The backend sent the FIN: only the reply entry is marked.
        let [(fk, mut f), (rk, mut r)] = flow(6, 1, now - 11 * S, now - 11 * S, false);
        r.flags |= ct_flags::CLOSING;
        let got = expired(&[(fk, f), (rk, r)], now, &timeouts());
        assert_eq!(got.len(), 2);
        // A new SYN cleared the mark: the long timeout again.
        r.flags &= !ct_flags::CLOSING;
        f.flags &= !ct_flags::CLOSING;
        assert!(expired(&[(fk, f), (rk, r)], now, &timeouts()).is_empty());
        // The original entry was evicted: the reply goes alone once idle.
        let [_, (rk, r)] = flow(17, 2, now - 100 * S, now - 100 * S, false);
        assert_eq!(expired(&[(rk, r)], now, &timeouts()), vec![rk]);
        let [_, (rk, r)] = flow(17, 3, now - 10 * S, now - 10 * S, false);
        assert!(expired(&[(rk, r)], now, &timeouts()).is_empty());
    }
}
