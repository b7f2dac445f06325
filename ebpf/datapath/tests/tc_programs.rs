//! Datapath tier: the TC and XDP programs driven with BPF_PROG_TEST_RUN. Each case is a crafted
//! packet, the verdict we expect, and the one counter cell that must move; every other cell must
//! not. Needs root (it loads programs into the kernel).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use ferrox_abi::{COUNTER_SLOTS, Hook, Reason, counter_cell};
use ferrox_datapath::{Datapath, TcProgram, bpffs::ScratchBpffs};

mod packets;
use packets::{Packet, pkt};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

struct Case {
    what: &'static str,
    packet: Packet,
    action: i32,
    reason: Reason,
}

fn cases() -> Vec<Case> {
    let c = |what, packet, action, reason| Case {
        what,
        packet,
        action,
        reason,
    };
    vec![
        c(
            "TCP SYN",
            pkt().ipv4([10, 244, 1, 5], [10, 96, 0, 10]).tcp(40000, 80),
            TC_ACT_UNSPEC,
            Reason::PassTcp,
        ),
        c(
            "UDP DNS query",
            pkt().ipv4([10, 244, 1, 5], [10, 96, 0, 10]).udp(40000, 53),
            TC_ACT_UNSPEC,
            Reason::PassUdp,
        ),
        c(
            "ICMP echo",
            pkt().ipv4([10, 244, 1, 5], [10, 244, 2, 9]).icmp_echo(),
            TC_ACT_UNSPEC,
            Reason::PassIcmp,
        ),
        c(
            "GRE is some other L4",
            pkt().ipv4([1, 1, 1, 1], [2, 2, 2, 2]).l4(47, 24),
            TC_ACT_UNSPEC,
            Reason::PassOtherL4,
        ),
        c(
            "IPv4 options are fine",
            pkt().ipv4([1, 1, 1, 1], [2, 2, 2, 2]).ihl(6).tcp(1, 2),
            TC_ACT_UNSPEC,
            Reason::PassTcp,
        ),
        c(
            "first fragment still has its L4 header",
            pkt()
                .ipv4([1, 1, 1, 1], [2, 2, 2, 2])
                .more_fragments()
                .udp(1, 2),
            TC_ACT_UNSPEC,
            Reason::PassUdp,
        ),
        c(
            "a later fragment of that datagram (no service): passes",
            pkt()
                .ipv4([1, 1, 1, 1], [2, 2, 2, 2])
                .frag_offset(185)
                .udp(1, 2),
            TC_ACT_UNSPEC,
            Reason::PassIpv4Fragment,
        ),
        c("ARP", pkt().arp(), TC_ACT_UNSPEC, Reason::PassNotIpv4),
        c("IPv6", pkt().ipv6(), TC_ACT_UNSPEC, Reason::PassNotIpv4),
        // BPF_PROG_TEST_RUN itself rejects an IPv4 frame shorter than 20 bytes of IP header, so
        // the shortest malformed header it can carry is one whose options are cut off.
        c(
            "IPv4 options cut off",
            pkt()
                .ipv4([1, 1, 1, 1], [2, 2, 2, 2])
                .ihl(6)
                .truncate(14 + 20),
            TC_ACT_SHOT,
            Reason::DropMalformedIpv4,
        ),
        c(
            "IPv4 ethertype, version 6",
            pkt().ipv4([1, 1, 1, 1], [2, 2, 2, 2]).version(6).tcp(1, 2),
            TC_ACT_SHOT,
            Reason::DropMalformedIpv4,
        ),
        c(
            "IHL below 5",
            pkt().ipv4([1, 1, 1, 1], [2, 2, 2, 2]).ihl(4).tcp(1, 2),
            TC_ACT_SHOT,
            Reason::DropMalformedIpv4,
        ),
        c(
            "total length beyond the frame",
            pkt()
                .ipv4([1, 1, 1, 1], [2, 2, 2, 2])
                .tcp(1, 2)
                .tot_len(1400),
            TC_ACT_SHOT,
            Reason::DropMalformedIpv4,
        ),
        c(
            "total length below the header",
            pkt().ipv4([1, 1, 1, 1], [2, 2, 2, 2]).tcp(1, 2).tot_len(12),
            TC_ACT_SHOT,
            Reason::DropMalformedIpv4,
        ),
    ]
}

fn hook_of(p: TcProgram) -> Hook {
    match p {
        TcProgram::FromPod => Hook::TcFromPod,
        TcProgram::ToPod => Hook::TcToPod,
        TcProgram::UplinkIngress => Hook::TcUplinkIngress,
        TcProgram::UplinkEgress => Hook::TcUplinkEgress,
    }
}

fn all_counters(dp: &Datapath) -> Vec<u64> {
    (0..COUNTER_SLOTS)
        .map(|i| match counter_cell(i) {
            Some((hook, reason)) => dp.maps().counters.get(hook, reason).unwrap().packets,
            None => 0,
        })
        .collect()
}

#[test]
fn tc_programs_classify_count_and_pass_or_drop() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let mut failures = Vec::new();
    // The program into a pod classifies nothing for a pod no policy isolates (the host already
    // accepted and routed the packet): its table is in tests/tests/policy_tables.rs.
    for program in TcProgram::ALL
        .into_iter()
        .filter(|p| *p != TcProgram::ToPod)
    {
        for case in cases() {
            let bytes = case.packet.build();
            let before = all_counters(&dp);
            let out = dp
                .test_run_tc(program, &bytes, 1)
                .unwrap_or_else(|e| panic!("{} / {}: {e:?}", program.name(), case.what));
            let after = all_counters(&dp);
            let label = format!("{} / {}", program.name(), case.what);
            if out.action != case.action {
                failures.push(format!(
                    "{label}: action {} want {}",
                    out.action, case.action
                ));
            }
            if out.packet != bytes {
                failures.push(format!("{label}: the packet was modified"));
            }
            let want_cell = ferrox_abi::counter_index(hook_of(program), case.reason) as usize;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let want = if i == want_cell { 1 } else { 0 };
                if a - b != want {
                    failures.push(format!(
                        "{label}: counter {:?} moved by {} want {want}",
                        counter_cell(i as u32),
                        a - b
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The same table through the uplink's XDP program, plus what only XDP test-run can carry: an
/// IPv4 frame cut inside its fixed header (skb test-run refuses to build such an skb).
#[test]
fn xdp_program_classifies_counts_and_passes_or_drops() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let mut all = cases();
    all.push(Case {
        what: "IPv4 header cut short",
        packet: pkt()
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2])
            .tcp(1, 2)
            .truncate(14 + 12),
        action: TC_ACT_SHOT,
        reason: Reason::DropMalformedIpv4,
    });
    let mut failures = Vec::new();
    for case in all {
        let bytes = case.packet.build();
        let before = all_counters(&dp);
        let out = dp
            .test_run_xdp(&bytes, 1)
            .unwrap_or_else(|e| panic!("xdp / {}: {e:?}", case.what));
        let after = all_counters(&dp);
        let want = if case.action == TC_ACT_SHOT {
            XDP_DROP
        } else {
            XDP_PASS
        };
        if out.action != want {
            failures.push(format!(
                "xdp / {}: action {} want {want}",
                case.what, out.action
            ));
        }
        if out.packet != bytes {
            failures.push(format!("xdp / {}: the packet was modified", case.what));
        }
        let want_cell = ferrox_abi::counter_index(Hook::XdpUplink, case.reason) as usize;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let want = usize::from(i == want_cell) as u64;
            if a - b != want {
                failures.push(format!(
                    "xdp / {}: counter {:?} moved by {} want {want}",
                    case.what,
                    counter_cell(i as u32),
                    a - b
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bytes_are_counted_with_packets() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let bytes = pkt()
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2])
        .udp(1, 2)
        .payload(100)
        .build();
    dp.test_run_tc(TcProgram::UplinkIngress, &bytes, 3).unwrap();
    let v = dp
        .maps()
        .counters
        .get(Hook::TcUplinkIngress, Reason::PassUdp)
        .unwrap();
    assert_eq!(v.packets, 3);
    assert_eq!(v.bytes, 3 * bytes.len() as u64);
}

#[test]
fn every_map_of_the_abi_is_pinned_under_its_versioned_name() {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let _dp = Datapath::open(&layout).unwrap();
    let pinned: Vec<String> = ferrox_datapath::inventory(&layout)
        .unwrap()
        .into_iter()
        .filter(|o| o.kind == ferrox_datapath::ObjectKind::Map)
        .map(|o| o.name)
        .collect();
    for name in ferrox_abi::map_names::ALL {
        assert!(
            pinned.contains(&format!("maps/{name}")),
            "{name} not pinned: {pinned:?}"
        );
    }
}
