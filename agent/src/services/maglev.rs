//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, §3.4): which backend owns each of the table's slots.
//!
//! The uplink's programs pick a new external flow's backend as `table[flow_hash % M]`. Every node
//! must therefore compute the same table from the same backends, and removing one of N backends
//! should move (almost) only the flows that were on it. This module owns the table's population:
//! a pure function from backend identities to, for every slot, the index of its backend in the
//! caller's list. It never sees backend ids (those are per node: the reconciler translates), and
//! it never depends on anything that can differ between processes, machines or Rust versions:
//! no `std` hasher, no `Hash` impls, no input order.
//!
//! # The hash
//!
//! A backend is hashed as its canonical identity bytes ([`identity_bytes`]: address in network
//! order, port big-endian, protocol number; 7 bytes) with SipHash-2-4 (Aumasson & Bernstein,
//! 2012) under two fixed 128-bit keys, one for the preference list's `offset` and one for its
//! `skip`. SipHash-2-4 is fully specified, so its output is the same everywhere (the unit tests
//! check it against the reference test vectors); as a keyed pseudo-random function, its outputs
//! under two different keys are independent, as the paper asks of its two hash functions, and
//! well spread even for identities that differ in one bit. `std`'s `DefaultHasher` is none of
//! this: its algorithm and the bytes `Hash` impls feed it may change between Rust releases. The
//! few dozen lines of the algorithm are here rather than in a dependency so that nothing outside
//! this file can change the tables; the golden tests catch any change in it.

use std::net::Ipv4Addr;

use super::model::{BackendAddr, Proto};

/// Number of slots of every table; the kernel indexes it with `flow_hash % TABLE_SIZE`.
pub const TABLE_SIZE: usize = ferrox_abi::MAGLEV_TABLE_SIZE as usize;

const fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

// Every `skip` in 1..M is coprime with a prime M, so every preference list visits every slot and
// the population below always fills the table.
const _: () = assert!(is_prime(TABLE_SIZE));

/// SipHash key (k0, k1) of a backend's `offset`: arbitrary fixed constants ("ferrox maglev o" in
/// ASCII). Changing them changes every table on every node.
const OFFSET_KEY: (u64, u64) = (0x6d20_786f_7272_6566, 0x6f20_7665_6c67_616d);
/// SipHash key of a backend's `skip` ("ferrox maglev s").
const SKIP_KEY: (u64, u64) = (0x6d20_786f_7272_6566, 0x7320_7665_6c67_616d);

/// The bytes a backend is hashed and ordered by: its identity (address, port, protocol), never
/// its flags, which change in place.
pub fn identity_bytes(addr: Ipv4Addr, port: u16, proto: Proto) -> [u8; 7] {
    let [a, b, c, d] = addr.octets();
    let [p0, p1] = port.to_be_bytes();
    [a, b, c, d, p0, p1, proto.number()]
}

fn backend_bytes(b: &BackendAddr) -> [u8; 7] {
    identity_bytes(b.addr, b.port, b.proto)
}

/// SipHash-2-4 of `msg` under the key `(k0, k1)`, as in the reference implementation.
fn siphash24((k0, k1): (u64, u64), msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut compress = |m: u64| {
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    };
    let (words, tail) = msg.as_chunks::<8>();
    for word in words {
        compress(u64::from_le_bytes(*word));
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    // The message length modulo 256 goes in the last word's top byte.
    last[7] = msg.len() as u8;
    compress(u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// A backend's preference list: slots `(offset + j * skip) % m` for `j = 0, 1, ...`.
fn preference(identity: &[u8; 7], m: usize) -> (usize, usize) {
    let m64 = m as u64;
    let offset = siphash24(OFFSET_KEY, identity) % m64;
    let skip = siphash24(SKIP_KEY, identity) % (m64 - 1) + 1;
    (offset as usize, skip as usize)
}

/// The Maglev table of `backends`: for each of the [`TABLE_SIZE`] slots, the index in
/// `backends` of the backend that owns it. Empty when `backends` is.
///
/// Only identities count: the input's order and the backends' flags do not change the result,
/// and backends that share an identity count once (the slots name the first of them).
pub fn table(backends: &[BackendAddr]) -> Vec<usize> {
    populate(backends, TABLE_SIZE)
}

/// [`table`] for a table of `m` slots; `m` must be a prime (or 1) for the table to fill.
fn populate(backends: &[BackendAddr], m: usize) -> Vec<usize> {
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    // Canonical order: by identity bytes, one entry per identity (the first in the input).
    let mut order: Vec<([u8; 7], usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (backend_bytes(b), i))
        .collect();
    order.sort();
    order.dedup_by_key(|(id, _)| *id);
    if m == 1 {
        return order.first().map(|(_, i)| vec![*i]).unwrap_or_default();
    }

    // Per backend: the next slot of its preference list to try, the step, and how many of its
    // list's m slots it has tried.
    struct Turn {
        slot: usize,
        skip: usize,
        tried: usize,
        input: usize,
    }
    let mut turns: Vec<Turn> = order
        .iter()
        .map(|(id, input)| {
            let (offset, skip) = preference(id, m);
            Turn {
                slot: offset,
                skip,
                tried: 0,
                input: *input,
            }
        })
        .collect();

    const FREE: usize = usize::MAX;
    let mut entry = vec![FREE; m];
    let mut filled = 0;
    // Backends take turns, in canonical order, each claiming the next free slot of its list.
    while filled < m {
        let before = filled;
        for t in &mut turns {
            while t.tried < m {
                let slot = t.slot;
                t.slot = (t.slot + t.skip) % m;
                t.tried += 1;
                if entry[slot] == FREE {
                    entry[slot] = t.input;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
        if filled == before {
            // Only when m is not prime: no list reaches the free slots. Never for TABLE_SIZE.
            break;
        }
    }
    entry.retain(|e| *e != FREE);
    entry
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn be(i: u32) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::from(0x0af4_0000 + i), // 10.244.x.y
            port: 8080,
            proto: Proto::Tcp,
            terminating: false,
            local: false,
        }
    }

    fn backends(n: u32) -> Vec<BackendAddr> {
        (1..=n).map(be).collect()
    }

    /// The table by identity: slot -> the backend's address, so tables over different input
    /// lists compare.
    fn owners(list: &[BackendAddr]) -> Vec<Ipv4Addr> {
        table(list).into_iter().map(|i| list[i].addr).collect()
    }

    fn counts(t: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, usize> {
        let mut c = BTreeMap::new();
        for a in t {
            *c.entry(*a).or_default() += 1;
        }
        c
    }

    /// Slots that changed owner although neither owner is in `moved` (the backends that left or
    /// arrived): the disruption beyond what the change itself forces.
    fn extra_moves(before: &[Ipv4Addr], after: &[Ipv4Addr], moved: Ipv4Addr) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a && **b != moved && **a != moved)
            .count()
    }

    /// FNV-1a over the table, to pin a whole table in one number.
    fn checksum(t: &[usize]) -> u64 {
        t.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
            (h ^ *v as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    #[test]
    fn siphash_matches_the_reference_test_vectors() {
        // Key 00 01 .. 0f; messages 00, 00 01, ..., from the SipHash paper's reference code.
        let key = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let msg: Vec<u8> = (0..64).collect();
        assert_eq!(siphash24(key, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(key, &msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(key, &msg[..8]), 0x93f5_f579_9a93_2462);
        assert_eq!(siphash24(key, &msg[..15]), 0xa129_ca61_49be_45e5);
        assert_eq!(siphash24(key, &msg[..63]), 0x958a_324c_eb06_4572);
    }

    #[test]
    #[allow(
        deprecated,
        reason = "std's SipHasher is SipHash-2-4: an independent reference"
    )]
    fn siphash_agrees_with_std_siphasher_on_every_length() {
        use std::hash::Hasher as _;
        let key = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
        let msg: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        for len in 0..msg.len() {
            let mut h = std::hash::SipHasher::new_with_keys(key.0, key.1);
            h.write(&msg[..len]);
            assert_eq!(siphash24(key, &msg[..len]), h.finish(), "length {len}");
        }
    }

    #[test]
    fn a_small_table_is_exactly_reproducible() {
        // Golden values: if these change, every node running the new code picks different
        // backends than nodes running the old one. Change them only on purpose.
        let list = backends(3);
        assert_eq!(
            populate(&list, 13),
            [2, 0, 1, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0],
            "the small table changed"
        );
        assert_eq!(
            checksum(&table(&backends(7))),
            0x8f89_d44f_fc99_8ebb,
            "the full-size table changed"
        );
        let (offset, skip) = preference(
            &identity_bytes(Ipv4Addr::new(10, 244, 1, 5), 8080, Proto::Tcp),
            TABLE_SIZE,
        );
        assert_eq!(
            (offset, skip),
            (11618, 13490),
            "the preference list of 10.244.1.5:8080/TCP changed"
        );
    }

    #[test]
    fn no_backends_no_table_and_one_backend_owns_every_slot() {
        assert!(table(&[]).is_empty());
        let one = table(&backends(1));
        assert_eq!(one.len(), TABLE_SIZE);
        assert!(one.iter().all(|i| *i == 0));
    }

    #[test]
    fn every_slot_is_owned_and_backends_share_them_evenly() {
        for n in [2u32, 3, 5, 7, 10, 16, 64, 100, 1000] {
            let list = backends(n);
            let t = table(&list);
            assert_eq!(t.len(), TABLE_SIZE);
            assert!(t.iter().all(|i| (*i as u32) < n));
            let c = counts(&owners(&list));
            assert_eq!(c.len(), n as usize, "N={n}: every backend owns slots");
            let (min, max) = (*c.values().min().unwrap(), *c.values().max().unwrap());
            // Backends claim one slot per turn, so shares differ by at most one slot...
            assert!(max - min <= 1, "N={n}: {min}..{max}");
            // ...which for N <= 100 is within 1% of M/N.
            if n <= 100 {
                let ideal = TABLE_SIZE as f64 / f64::from(n);
                for (b, k) in &c {
                    let dev = (*k as f64 - ideal).abs() / ideal;
                    assert!(dev <= 0.01, "N={n}: {b} owns {k}, ideal {ideal:.1}");
                }
            }
        }
    }

    #[test]
    fn input_order_flags_and_duplicates_do_not_change_the_table() {
        let list = backends(10);
        let want = owners(&list);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(owners(&reversed), want);
        let mut rotated = list.clone();
        rotated.rotate_left(3);
        assert_eq!(owners(&rotated), want);
        let flagged: Vec<BackendAddr> = list
            .iter()
            .map(|b| BackendAddr {
                terminating: true,
                local: true,
                ..*b
            })
            .collect();
        assert_eq!(owners(&flagged), want);
        let mut doubled = list.clone();
        doubled.extend(list.iter().copied());
        assert_eq!(owners(&doubled), want);
        // The slots name the first of the duplicates.
        assert!(table(&doubled).iter().all(|i| *i < list.len()));
    }

    #[test]
    fn port_and_protocol_are_part_of_the_identity() {
        let list = backends(5);
        let other_port: Vec<BackendAddr> = list
            .iter()
            .map(|b| BackendAddr { port: 8081, ..*b })
            .collect();
        let udp: Vec<BackendAddr> = list
            .iter()
            .map(|b| BackendAddr {
                proto: Proto::Udp,
                ..*b
            })
            .collect();
        assert_ne!(owners(&other_port), owners(&list));
        assert_ne!(owners(&udp), owners(&list));
    }

    /// The most slots (as a fraction of the table) a change of one backend among `n` may move
    /// between two backends that stay. Measured at M = 16381 (see the tests' output): at most
    /// 0.56% up to 10 backends, 0.84% at 20, 1.21% at 50, 1.51% at 100. A table that rehashed
    /// everything (`hash % n`) would move most slots.
    fn bound(n: u32) -> f64 {
        match n {
            0..=10 => 0.0075,
            11..=20 => 0.01,
            _ => 0.02,
        }
    }

    /// Removing one of N backends: the slots it owned must move (M/N of them); every other
    /// slot should keep its owner. Maglev trades a little of this for perfect balance; the
    /// bound below is what the algorithm gives at M = 16381 (measured values in the report).
    #[test]
    fn removing_a_backend_moves_little_else() {
        let mut worst = Vec::new();
        for n in [3u32, 5, 10, 20, 50, 100] {
            let list = backends(n);
            let before = owners(&list);
            let mut max_extra = 0usize;
            let mut sum_extra = 0usize;
            for gone in 0..n as usize {
                let mut rest = list.clone();
                let removed = rest.remove(gone).addr;
                let after = owners(&rest);
                // Every slot of the removed backend moved, to a live one.
                assert!(!after.contains(&removed));
                let extra = extra_moves(&before, &after, removed);
                max_extra = max_extra.max(extra);
                sum_extra += extra;
            }
            let max_frac = max_extra as f64 / TABLE_SIZE as f64;
            let mean_frac = sum_extra as f64 / f64::from(n) / TABLE_SIZE as f64;
            eprintln!(
                "remove 1 of {n}: forced {:.2}%, extra mean {:.3}% max {:.3}% of slots",
                100.0 / f64::from(n),
                mean_frac * 100.0,
                max_frac * 100.0
            );
            worst.push((n, mean_frac, max_frac));
        }
        for (n, mean, max) in worst {
            assert!(
                max <= bound(n),
                "N={n}: extra moves up to {max} (mean {mean})"
            );
        }
    }

    /// Adding one backend to N: it takes about M/(N+1) slots; other slots keep their owner.
    #[test]
    fn adding_a_backend_moves_little_else() {
        let mut worst = Vec::new();
        for n in [2u32, 4, 9, 19, 49, 99] {
            let list = backends(n);
            let before = owners(&list);
            let mut max_extra = 0usize;
            let mut sum_extra = 0usize;
            let trials = 10u32;
            for k in 0..trials {
                let mut more = list.clone();
                let added = be(1000 + k);
                more.push(added);
                let after = owners(&more);
                let taken = after.iter().filter(|a| **a == added.addr).count();
                assert!(taken.abs_diff(TABLE_SIZE / (n as usize + 1)) <= 1);
                let extra = extra_moves(&before, &after, added.addr);
                max_extra = max_extra.max(extra);
                sum_extra += extra;
            }
            let max_frac = max_extra as f64 / TABLE_SIZE as f64;
            let mean_frac = sum_extra as f64 / f64::from(trials) / TABLE_SIZE as f64;
            eprintln!(
                "add 1 to {n}: forced {:.2}%, extra mean {:.3}% max {:.3}% of slots",
                100.0 / f64::from(n + 1),
                mean_frac * 100.0,
                max_frac * 100.0
            );
            worst.push((n, mean_frac, max_frac));
        }
        for (n, mean, max) in worst {
            assert!(
                max <= bound(n + 1),
                "N={n}: extra moves up to {max} (mean {mean})"
            );
        }
    }

    #[test]
    fn distinct_identities_get_distinct_preference_lists() {
        let lists: BTreeSet<(usize, usize)> = (0..1000)
            .map(|i| preference(&backend_bytes(&be(i)), TABLE_SIZE))
            .collect();
        assert_eq!(lists.len(), 1000);
    }
}
