//! `cargo xtask bench`: the benchmark plan's sections, written to `bench/results/<time>.json`,
//! `docs/benchmarks.md` and its SVG plots in `docs/benchmarks/`. Section 1 (here): the cost of each
//! TC path per packet with BPF_PROG_TEST_RUN, for 1, 1k, 10k and 100k Services. Sections 2 and 3
//! ([`proxy`]): connection latency and programming time next to kube-proxy's iptables and
//! nftables rulesets; section 4 (here): pod to pod throughput across nodes (iperf3) with eBPF
//! IP-in-IP, direct routing and the kernel's VXLAN device, and 4b ([`xdp`]): NodePort packets
//! per second with the translation at TC, generic XDP and native XDP; section 5 ([`cni`]); section 6
//! ([`bgp`], and memory in [`proxy`]); section 7: each figure next to its goal.
//!
//! Section 1 method: the kernel's own run time (`duration`, ns) of `BPF_PROG_TEST_RUN` calls,
//! in a scratch network namespace whose routes and neighbours make the FIB lookups succeed, as
//! on a node. Single runs (`repeat = 1`, a fresh copy of the input each time, so the program
//! never runs on its own output; a new flow gets a new source port every run) give median, min
//! and max, test-run overhead included. The cost per packet without that overhead comes from
//! runs of [`REPEAT`] passes where a pass's output is again an input of the same path: the
//! baseline and the miss leave the packet alone, and an established flow and a reply go through
//! a pair of conntrack entries that translate into each other ([`ping_pong`]); for the other
//! paths (a new flow must be new, encapsulation and decapsulation change the packet's path) it
//! is the program's own time in single runs, from the kernel's run-time stats ([`program_time`]:
//! the test run's set-up is outside it), less the stats' own clock reads, compared with the
//! baseline's own time measured alike ([`figures`]). The classify-and-
//! count program of the uplink's egress is the baseline every path is compared with. A full run
//! (or `--profile`) has `perf` record where the time of each repeatable path goes;
//! `FX_BENCH_KEEP_PERF=<dir>` keeps the recordings (`perf report -i <dir>/<program>.perf`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool: failures should be loud"
)]

use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use ferrox_abi::{
    Backend, CtEntry, CtKey, DatapathConfig, ServiceKey, ServiceValue, backend_flags, ct_flags,
    scope, svc_flags,
};
use ferrox_datapath::{Datapath, RunStats, TcProgram, bpffs::ScratchBpffs};
use ferrox_tests::harness::Cluster;
use serde_json::{Value, json};

mod bgp;
mod cni;
mod policy;
mod proxy;
mod report;
mod xdp;

const NODE: [u8; 4] = [198, 18, 0, 11];
const CLIENT: [u8; 4] = [198, 18, 0, 200];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
const NODE2: [u8; 4] = [198, 18, 0, 12];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 6];

/// `frame` wrapped in IP-in-IP from `src` to `dst`, as a node's encapsulation writes it.
fn ipip(frame: &[u8], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let inner = &frame[14..];
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 4;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..14].to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(inner);
    out
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Ethernet + IPv4 + TCP (SYN), checksums right.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp_flags(src, sport, dst, dport, 0x02)
}

/// Ethernet + IPv4 + TCP with these flags, checksums right.
fn tcp_flags(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 54];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 2, 0]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ipv4 = &mut p[14..34];
    ipv4[0] = 0x45;
    ipv4[2..4].copy_from_slice(&40u16.to_be_bytes());
    ipv4[8] = 64;
    ipv4[9] = 6;
    ipv4[12..16].copy_from_slice(&src);
    ipv4[16..20].copy_from_slice(&dst);
    let sum = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&sum.to_be_bytes());
    let t = &mut p[34..54];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in [src, dst] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 6 + 20;
    let sum = checksum(&p[34..54], pseudo);
    p[50..52].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8], start: u32) -> u16 {
    let mut sum = start;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

const BASELINE: &str = "baseline: classify, count, tunnel lookup miss (egress)";
const MISS: &str = "miss: not a frontend";
const NEW: &str = "new flow: Maglev pick, conntrack x2, DNAT";
const ESTABLISHED: &str = "established flow: conntrack hit, DNAT";
const REPLY: &str = "reply: reverse NAT at the pod's veth";
const ENCAP: &str = "IP-in-IP encap (egress)";
const DECAP: &str = "IP-in-IP decap, to the pod (ingress)";
const XDP_MISS: &str = "XDP miss: not a frontend";
const XDP_NEW: &str =
    "XDP new flow: Maglev pick, conntrack x2, DNAT+SNAT to a remote backend, XDP_TX";
const XDP_ESTABLISHED: &str = "XDP established flow: conntrack hit, DNAT, XDP_TX";
/// Another address routed through the uplink: the partner of [`FRONTEND2`] in the XDP
/// ping-pong flows, and the remote backend of the XDP new flows.
const FRONTEND3: [u8; 4] = [198, 18, 0, 98];
/// The client port of the XDP ping-pong flows ([`xdp_ping_pong`]).
const XDP_PING_PONG_PORT: u16 = 30_001;
/// The NodePort of the XDP new flows (its backend is [`FRONTEND3`]).
const XDP_NEW_PORT: u16 = 9_999;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// TCP ACK: the flag of an established flow's packets.
const ACK: u8 = 0x10;
/// Passes per amortised run.
const REPEAT: u32 = 256;
/// The client port of the ping-pong flows ([`ping_pong`]).
const PING_PONG_PORT: u16 = 30_000;
/// A frontend address routed through the uplink (an externalIP of another node's), for the
/// ping-pong flows.
const FRONTEND2: [u8; 4] = [198, 18, 0, 99];

/// Conntrack entries that make an established flow and a reply repeatable: each translates a
/// packet into the key of its partner, so every pass of a repeated run is a conntrack hit, a
/// rewrite and a redirect, as on a real flow. Established (uplink ingress):
/// client -> FRONTEND2:port becomes client -> pod:8080, and client -> pod:8080 becomes
/// client -> FRONTEND2:port (its backend, id 2, is FRONTEND2:port). Reply (pod veth):
/// pod:8080 -> client becomes FRONTEND2:port -> client and back.
fn ping_pong(dp: &mut Datapath, port: u16) {
    let key = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16| CtKey {
        saddr: be(s),
        daddr: be(d),
        sport: sp.to_be(),
        dport: dp.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let entry = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, backend_id: u32, flags: u8| CtEntry {
        nat_saddr: be(s),
        nat_daddr: be(d),
        nat_sport: sp.to_be(),
        nat_dport: dp.to_be(),
        backend_id,
        flags,
        ..Default::default()
    };
    let m = dp.maps_mut();
    m.backends
        .insert(
            &2,
            &Backend {
                addr: be(FRONTEND2),
                port: port.to_be(),
                proto: 6,
                flags: 0,
            },
        )
        .unwrap();
    let c = CLIENT;
    let pp = PING_PONG_PORT;
    for (k, e) in [
        (
            key(c, pp, FRONTEND2, port),
            entry(c, pp, LOCAL_POD, 8080, 1, 0),
        ),
        (
            key(c, pp, LOCAL_POD, 8080),
            entry(c, pp, FRONTEND2, port, 2, 0),
        ),
        (
            key(LOCAL_POD, 8080, c, pp),
            entry(FRONTEND2, port, c, pp, 1, ct_flags::REPLY),
        ),
        (
            key(FRONTEND2, port, c, pp),
            entry(LOCAL_POD, 8080, c, pp, 2, ct_flags::REPLY),
        ),
    ] {
        m.conntrack.insert(&k, &e).unwrap();
    }
}

/// The XDP program's repeatable established flow: both directions of the pair leave through
/// the uplink, so every pass is a conntrack hit, a rewrite and an `XDP_TX`:
/// client -> FRONTEND2:port becomes client -> FRONTEND3:port and back (backend 2 is
/// FRONTEND2:port, backend 3 FRONTEND3:port). Also the frontend of the XDP new flows
/// (NODE:[`XDP_NEW_PORT`], its Maglev table all backend 3).
fn xdp_ping_pong(dp: &mut Datapath, layout: &ferrox_datapath::PinLayout, port: u16) {
    let key = |d: [u8; 4]| CtKey {
        saddr: be(CLIENT),
        daddr: be(d),
        sport: XDP_PING_PONG_PORT.to_be(),
        dport: port.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let entry = |d: [u8; 4], backend_id: u32| CtEntry {
        nat_saddr: be(CLIENT),
        nat_daddr: be(d),
        nat_sport: XDP_PING_PONG_PORT.to_be(),
        nat_dport: port.to_be(),
        backend_id,
        ..Default::default()
    };
    let m = dp.maps_mut();
    m.backends
        .insert(
            &3,
            &Backend {
                addr: be(FRONTEND3),
                port: port.to_be(),
                proto: 6,
                flags: 0,
            },
        )
        .unwrap();
    m.conntrack
        .insert(&key(FRONTEND2), &entry(FRONTEND3, 3))
        .unwrap();
    m.conntrack
        .insert(&key(FRONTEND3), &entry(FRONTEND2, 2))
        .unwrap();
    let fkey = ServiceKey::master(be(NODE), XDP_NEW_PORT.to_be(), 6).with_scope(scope::EXTERNAL);
    m.services
        .insert(
            &fkey.with_slot(1),
            &ServiceValue {
                backend_id: 3,
                ..Default::default()
            },
        )
        .unwrap();
    m.services
        .insert(
            &fkey,
            &ServiceValue {
                count: 1,
                rev_nat_id: 60_001,
                flags: svc_flags::NODE_PORT,
                ..Default::default()
            },
        )
        .unwrap();
    ferrox_datapath::MaglevTables::open(layout)
        .unwrap()
        .set(60_001, &vec![3u32; ferrox_abi::MAGLEV_TABLE_SIZE as usize])
        .unwrap();
}

/// Where the time of a path goes: `perf record` on this thread while it runs the path over and
/// over (runs of `repeat` passes over `input(i)`; 1 for a path that needs a fresh input every
/// time), then the symbols with the most samples (percent, name). Single runs are recorded with
/// call chains and only the samples inside the program (the JIT-ed `bpf_prog_<tag>_<name>` and
/// what it calls) are kept, as percentages of those: the test run's set-up, which dominates a
/// single run, is left out. Empty when `perf` is not there or records nothing.
fn profile(
    dp: &mut Datapath,
    program: impl Into<Run>,
    ifindex: u32,
    input: &dyn Fn(u32) -> Vec<u8>,
    repeat: u32,
    want_action: i32,
) -> Vec<(f64, String)> {
    let program = program.into();
    let data = std::env::temp_dir().join(format!("fx-bench-{}.perf", std::process::id()));
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let Ok(mut perf) = Command::new("perf")
        .args(["record", "-q", "-F", "9999", "-t", &tid.to_string()])
        .args(if repeat == 1 { &["-g"][..] } else { &[] })
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    let t0 = std::time::Instant::now();
    // Fresh inputs are bounded (a new flow each: well below the conntrack map's size).
    let mut i = 0;
    while perf.try_wait().unwrap().is_none()
        && t0.elapsed() < std::time::Duration::from_secs(10)
        && (repeat > 1 || i < 100_000)
    {
        let out = test_run(dp, program, &input(i), ifindex, repeat);
        assert_eq!(out.action, want_action, "{program:?}: unexpected verdict");
        i += 1;
    }
    let _ = perf.wait();
    let inside = repeat == 1;
    let report = Command::new("perf")
        .args(["report", "--stdio", "-q", "--no-children", "--sort", "sym"])
        .args(if inside {
            &["-g", "none", "--parent", "^bpf_prog_[0-9a-f]{16}_", "-x"][..]
        } else {
            &[]
        })
        .arg("-i")
        .arg(&data)
        .output();
    if let Ok(keep) = std::env::var("FX_BENCH_KEEP_PERF") {
        let _ = std::fs::copy(&data, Path::new(&keep).join(format!("{program:?}.perf")));
    }
    let _ = std::fs::remove_file(&data);
    let Ok(report) = report else {
        return Vec::new();
    };
    let rows: Vec<(f64, String)> = String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            let rest = rest.trim().trim_start_matches(['[', 'k', ']', '.']).trim();
            // With call chains, a second column names the program the sample was under.
            let sym = if inside {
                rest.split_whitespace().next()?
            } else {
                rest
            };
            Some((pct.trim().parse().ok()?, sym.to_owned()))
        })
        .collect();
    // Inside the program: shares of the program's samples.
    let total: f64 = if inside {
        rows.iter().map(|r| r.0).sum()
    } else {
        100.0
    };
    rows.into_iter()
        .filter(|_| total > 0.0)
        .map(|(p, sym)| (p * 100.0 / total, sym))
        .take(20)
        .collect()
}

/// The rows of one Service count: each path's single-run figures, its cost per packet without
/// the test-run overhead, and its ratio to the baseline. Where the path has an amortised median
/// (the same packet passed many times), that is its cost and the ratio is to the baseline's
/// amortised median. Else the cost is the program's own time in single runs (run-time stats,
/// `own`) less what single runs add to the baseline's (its own time less its amortised median:
/// the stats' clock reads, and a colder start); for XDP paths, to the XDP miss's. A single run
/// on a fresh input being colder than a pass over the same packet, by more the more the path
/// does, the ratio of such a path is its own time to the baseline's own time, both single runs
/// measured alike. The former estimate, the single-run median less the whole test-run overhead
/// the baseline shows, stays in the JSON.
fn figures(
    n: u32,
    single: &[(&str, (u64, u64, u64))],
    amortised: &[(&str, (u64, u64, u64))],
    own: &[(&str, Own)],
) -> Vec<Value> {
    let find = |v: &[(&str, (u64, u64, u64))], p: &str| v.iter().find(|x| x.0 == p).map(|x| x.1);
    // The test run's own overhead differs between TC (an skb to build) and XDP: each path's
    // is measured on its hook's cheapest repeatable path.
    let less = |v: &[(&str, (u64, u64, u64))], reference: &str| match (
        find(v, reference),
        find(amortised, reference),
    ) {
        (Some(s), Some(a)) => s.0.saturating_sub(a.0),
        _ => 0,
    };
    let (tc_overhead, xdp_overhead) = (less(single, BASELINE), less(single, XDP_MISS));
    let own_of = |p: &str| own.iter().find(|x| x.0 == p).map(|x| x.1);
    let clock_of = |reference: &str| match (own_of(reference), find(amortised, reference)) {
        (Some(o), Some(a)) => o.median.saturating_sub(a.0),
        _ => 0,
    };
    let (tc_clock, xdp_clock) = (clock_of(BASELINE), clock_of(XDP_MISS));
    let base_amortised = find(amortised, BASELINE).map_or(0, |a| a.0);
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    single
        .iter()
        .map(|&(path, m)| {
            let xdp = path.starts_with("XDP");
            let overhead = if xdp { xdp_overhead } else { tc_overhead };
            let clock = if xdp { xdp_clock } else { tc_clock };
            let less_overhead = m.0.saturating_sub(overhead);
            let (per_packet, method, to_base, am) = match (find(amortised, path), own_of(path)) {
                (Some(a), _) => (a.0, "repeated", ratio(a.0, base_amortised), Some(a)),
                (None, Some(o)) => {
                    let cost = o.median.saturating_sub(clock);
                    (cost, "program's own time, single runs", ratio(o.median, o.baseline), None)
                }
                (None, None) => (
                    less_overhead,
                    "single run less overhead",
                    ratio(less_overhead, base_amortised),
                    None,
                ),
            };
            eprintln!(
                "{n:>7} services  {path:<54} {per_packet:>5} ns per packet ({method}), {to_base:.2}x the baseline; single run median {} (min {}, max {})",
                m.0, m.1, m.2
            );
            json!({
                "services": n, "path": path, "median_ns": m.0, "min_ns": m.1, "max_ns": m.2,
                "per_packet_ns": per_packet, "per_packet_method": method,
                "ratio_to_baseline": to_base,
                "amortised": am.map(|a| json!({"median_ns": a.0, "min_ns": a.1, "max_ns": a.2, "repeat": REPEAT})),
                "own_time": own_of(path).map(|o| json!({"median_ns": o.median, "min_ns": o.min, "max_ns": o.max, "baseline_median_ns": o.baseline, "single_run_extra_ns": clock})),
                "single_less_overhead_ns": less_overhead,
                "test_run_overhead_ns": overhead,
            })
        })
        .collect()
}

/// `services` external frontends on NODE ports 10000.. (each with one local backend); returns
/// the port of the one in the middle.
fn program(dp: &mut Datapath, services: u32) -> u16 {
    let backend = Backend {
        addr: be(LOCAL_POD),
        port: 8080u16.to_be(),
        proto: 6,
        flags: backend_flags::LOCAL,
    };
    dp.maps_mut().backends.insert(&1, &backend).unwrap();
    for i in 0..services {
        let port = 10_000 + i;
        let (addr, port) = if port <= 65_000 {
            (be(NODE), port as u16)
        } else {
            // Beyond one address's ports: more addresses (externalIP-like frontends).
            (
                be([198, 19, (i / 50_000) as u8, 1]),
                (10_000 + i % 50_000) as u16,
            )
        };
        let key = ServiceKey::master(addr, port.to_be(), 6).with_scope(scope::EXTERNAL);
        dp.maps_mut()
            .services
            .insert(
                &key.with_slot(1),
                &ServiceValue {
                    backend_id: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        dp.maps_mut()
            .services
            .insert(
                &key,
                &ServiceValue {
                    count: 1,
                    rev_nat_id: (i % 60_000 + 1) as u16,
                    flags: svc_flags::NODE_PORT,
                    ..Default::default()
                },
            )
            .unwrap();
    }
    10_000 + (services / 2).min(55_000) as u16
}

/// A program to test-run: one of the TC programs, or the uplink's XDP program.
#[derive(Clone, Copy, Debug)]
enum Run {
    Tc(TcProgram),
    Xdp,
}

impl From<TcProgram> for Run {
    fn from(p: TcProgram) -> Self {
        Self::Tc(p)
    }
}

fn test_run(
    dp: &mut Datapath,
    program: Run,
    input: &[u8],
    ifindex: u32,
    repeat: u32,
) -> ferrox_datapath::TestRunOutput {
    match program {
        Run::Tc(p) => dp.test_run_tc_on(p, input, Some(ifindex), repeat),
        Run::Xdp => dp.test_run_xdp_on(input, Some(ifindex), repeat),
    }
    .unwrap()
}

/// median, min, max of `runs` single runs of `program` on inputs from `input(i)`.
fn measure(
    dp: &mut Datapath,
    program: impl Into<Run>,
    ifindex: u32,
    runs: u32,
    input: impl Fn(u32) -> Vec<u8>,
    want_action: i32,
) -> (u64, u64, u64) {
    measure_repeat(dp, program, ifindex, runs, 1, input, want_action)
}

/// median, min, max of `runs` runs of `program` on inputs from `input(i)`, each run `repeat`
/// times over the same packet (the kernel reports the mean time of one pass). Only for a path
/// whose output is again an input of the same path.
fn measure_repeat(
    dp: &mut Datapath,
    program: impl Into<Run>,
    ifindex: u32,
    runs: u32,
    repeat: u32,
    input: impl Fn(u32) -> Vec<u8>,
    want_action: i32,
) -> (u64, u64, u64) {
    let program = program.into();
    spread((0..runs).map(|i| {
        let out = test_run(dp, program, &input(i), ifindex, repeat);
        assert_eq!(out.action, want_action, "{program:?}: unexpected verdict");
        out.duration_ns
    }))
}

/// median, min, max of some figures (at least one).
fn spread(figures: impl Iterator<Item = u64>) -> (u64, u64, u64) {
    let mut d: Vec<u64> = figures.collect();
    d.sort_unstable();
    (d[d.len() / 2], d[0], d[d.len() - 1])
}

/// The program's own time over `runs` single runs on inputs from `input(i)`, from the kernel's
/// run-time stats (on only while this runs: they add two clock reads to every run of every
/// program): the test run's set-up around the program (the skb, the copies, the syscall) is
/// outside it. Each run is followed by one of the baseline on its fixed packet, so that the
/// path and its reference see the machine alike (this VM's speed drifts within a run):
/// median, min, max of the path, and the baseline's median.
fn program_time(
    dp: &mut Datapath,
    program: impl Into<Run>,
    ifindex: u32,
    runs: u32,
    input: impl Fn(u32) -> Vec<u8>,
    want_action: i32,
) -> Own {
    let program = program.into();
    let base_ifindex = ferrox_datapath::ifindex("up0").unwrap();
    let base_input = tcp(NODE, 22, CLIENT, 40000);
    let _stats = RunStats::enable().unwrap();
    let one = |dp: &mut Datapath, program: Run, ifindex: u32, input: &[u8], want: i32| {
        let stats = |dp: &mut Datapath| {
            match program {
                Run::Tc(p) => dp.tc_run_stats(p),
                Run::Xdp => dp.xdp_run_stats(),
            }
            .unwrap()
        };
        let (t0, c0) = stats(dp);
        let out = test_run(dp, program, input, ifindex, 1);
        let (t1, c1) = stats(dp);
        assert_eq!(out.action, want, "{program:?}: unexpected verdict");
        assert_eq!(c1 - c0, 1, "{program:?}: one run accounted");
        t1 - t0
    };
    let mut d = Vec::new();
    let mut b = Vec::new();
    for i in 0..runs {
        d.push(one(dp, program, ifindex, &input(i), want_action));
        b.push(one(
            dp,
            Run::Tc(TcProgram::UplinkEgress),
            base_ifindex,
            &base_input,
            -1,
        ));
    }
    let (median, min, max) = spread(d.into_iter());
    Own {
        median,
        min,
        max,
        baseline: spread(b.into_iter()).0,
    }
}

/// What [`program_time`] measured.
#[derive(Clone, Copy, Debug)]
struct Own {
    median: u64,
    min: u64,
    max: u64,
    /// The baseline's median, in runs interleaved with the path's.
    baseline: u64,
}

/// Busy CPU time of the whole machine so far, in seconds (`/proc/stat`: all but idle and iowait).
fn cpu_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields[4];
    // USER_HZ is 100 on Linux.
    (total - idle) / 100.0
}

/// A VXLAN overlay between the nodes with the kernel's device (VNI 42, UDP 4789, static
/// flooding entries), and each node's pod block routed over it: the reference overlay.
fn vxlan(c: &Cluster) {
    for n in c.nodes() {
        let ns = n.netns();
        let addr = n.addr.to_string();
        ns.ip(&[
            "link",
            "add",
            "vxlan0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &addr,
            "dev",
            "eth0",
            "dstport",
            "4789",
            "nolearning",
        ]);
        ns.ip(&[
            "addr",
            "add",
            &format!("10.99.0.{}/24", n.index),
            "dev",
            "vxlan0",
        ]);
        ns.ip(&["link", "set", "vxlan0", "up"]);
        for o in c.nodes().iter().filter(|o| o.index != n.index) {
            let out = Command::new("ip")
                .args(["netns", "exec", ns.name(), "bridge", "fdb", "append"])
                .args([
                    "00:00:00:00:00:00",
                    "dev",
                    "vxlan0",
                    "dst",
                    &o.addr.to_string(),
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            ns.ip(&[
                "route",
                "add",
                &o.pod_cidr.to_string(),
                "via",
                &format!("10.99.0.{}", o.index),
                "dev",
                "vxlan0",
                "onlink",
            ]);
        }
    }
}

/// The machine's profile while `run` runs: `perf record -a` for `secs` seconds, then the
/// symbols with the most samples (percent, process and symbol). Empty without `perf`.
fn system_profile<T>(secs: u64, run: impl FnOnce() -> T) -> (T, Vec<(f64, String)>) {
    let data = std::env::temp_dir().join(format!("fx-bench-sys-{}.perf", std::process::id()));
    let perf = Command::new("perf")
        .args(["record", "-q", "-a", "-F", "999", "-o"])
        .arg(&data)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let out = run();
    let Ok(mut perf) = perf else {
        return (out, Vec::new());
    };
    let _ = perf.wait();
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "-q",
            "--no-children",
            "--sort",
            "comm,sym",
            "-i",
        ])
        .arg(&data)
        .output();
    let _ = std::fs::remove_file(&data);
    let top = report.map_or_else(
        |_| Vec::new(),
        |r| {
            String::from_utf8_lossy(&r.stdout)
                .lines()
                .filter_map(|l| {
                    let (pct, rest) = l.trim().split_once('%')?;
                    let rest = rest.split_whitespace().collect::<Vec<_>>().join(" ");
                    Some((
                        pct.trim().parse().ok()?,
                        rest.replace("[k] ", "").replace("[.] ", ""),
                    ))
                })
                .take(12)
                .collect()
        },
    );
    (out, top)
}

/// Section 4: iperf3 from a pod on node-1 to a pod on node-2, in each way of crossing nodes;
/// with `profiling`, where the machine's time goes during the last run of each.
fn throughput(quick: bool, profiling: bool) -> Vec<Value> {
    let secs: u64 = if quick { 3 } else { 10 };
    let repeats = if quick { 1 } else { 5 };
    let mut rows = Vec::new();
    for (path, mode) in [
        ("direct routing (never)", Some("never")),
        ("eBPF IP-in-IP (always)", Some("always")),
        ("kernel VXLAN device", None),
    ] {
        let mut b = Cluster::builder().nodes(2);
        b = match mode {
            Some(m) => b.agent_env("FERROX_TUNNEL_MODE", m),
            None => b
                .agent_env("FERROX_TUNNEL_MODE", "never")
                .agent_env("FERROX_ROUTES", "false")
                .agent_env("FERROX_MTU", "1450"),
        };
        let c = b.build();
        if mode.is_none() {
            vxlan(&c);
        }
        let client = c.add_pod(1, "client");
        let server = c.add_pod(2, "server");
        // Sender on CPU 0, receiver on CPU 1, in every path: as on two machines, and the same
        // placement for each (left to the scheduler, where the pair lands moves a path's
        // throughput by more than a quarter on this 2-CPU VM, in either mode).
        let srv = server.command("taskset", &["-c", "1", "iperf3", "-s", "--forceflush"]);
        srv.wait_for_line(
            "iperf3 to listen",
            std::time::Duration::from_secs(10),
            |l| l.contains("Server listening"),
        );
        let mut gbps = Vec::new();
        let mut cores_per_gbps = Vec::new();
        let mut retransmits = 0u64;
        let mut top = Vec::new();
        for run in 0..repeats {
            let cpu0 = cpu_busy_seconds();
            let t0 = std::time::Instant::now();
            let iperf = || {
                client.command_output(
                    "taskset",
                    &[
                        "-c",
                        "0",
                        "iperf3",
                        "-c",
                        &server.ip.to_string(),
                        "-t",
                        &secs.to_string(),
                        "-J",
                    ],
                )
            };
            let out = if profiling && run == repeats - 1 {
                let (out, t) = system_profile(secs.saturating_sub(1).max(1), iperf);
                top = t;
                out
            } else {
                iperf()
            };
            let wall = t0.elapsed().as_secs_f64();
            let cpu = cpu_busy_seconds() - cpu0;
            assert!(out.status.success(), "iperf3 over {path}: {out:?}");
            let j: Value = serde_json::from_slice(&out.stdout).unwrap();
            let bps = j["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap();
            retransmits += j["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            let g = bps / 1e9;
            gbps.push(g);
            cores_per_gbps.push(cpu / wall / g);
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (g, gmin, gmax) = stats(&mut gbps);
        let (c50, cmin, cmax) = stats(&mut cores_per_gbps);
        eprintln!(
            "{path:<28} {g:>6.2} Gbit/s (min {gmin:.2}, max {gmax:.2})  {c50:.3} CPU cores per Gbit/s (min {cmin:.3}, max {cmax:.3})  {retransmits} retransmits"
        );
        for (pct, sym) in &top {
            eprintln!("  {pct:>6.2}%  {sym}");
        }
        rows.push(json!({
            "path": path, "gbps_median": g, "gbps_min": gmin, "gbps_max": gmax,
            "cores_per_gbps": c50, "cores_per_gbps_min": cmin, "cores_per_gbps_max": cmax,
            "retransmits": retransmits, "seconds": secs, "repeats": repeats,
            "profile": top.iter().map(|(p, s)| json!({"percent": p, "symbol": s})).collect::<Vec<_>>(),
        }));
    }
    rows
}

/// Section 1: the per-packet cost of each TC path at 1, 1k, 10k and 100k Services.
fn per_packet(runs: u32, profiling: bool) -> (Vec<Value>, Vec<Value>) {
    let ns = Ns(format!("fxbench{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", "up0", "type", "veth", "peer", "name", "up0p"],
        vec![
            "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ],
        vec!["link", "set", "up0", "up"],
        vec!["link", "set", "up0p", "up"],
        vec!["link", "set", "pod0", "up"],
        vec!["link", "set", "pod0p", "up"],
        vec!["addr", "add", "198.18.0.11/24", "dev", "up0"],
        vec!["route", "add", "10.244.1.5/32", "dev", "pod0"],
        vec![
            "neigh",
            "replace",
            "198.18.0.200",
            "lladdr",
            "02:00:00:00:02:00",
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
        vec![
            "neigh",
            "replace",
            "198.18.0.98",
            "lladdr",
            "02:00:00:00:02:98",
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
        vec![
            "neigh",
            "replace",
            "198.18.0.99",
            "lladdr",
            "02:00:00:00:02:99",
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
        vec![
            "neigh",
            "replace",
            "10.244.1.5",
            "lladdr",
            "02:00:00:01:05:05",
            "dev",
            "pod0",
            "nud",
            "permanent",
        ],
    ] {
        let mut full = vec!["-n", ns.0.as_str()];
        full.extend(args);
        ip(&full);
    }
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());

    let sizes: Vec<u32> = vec![1, 1_000, 10_000, 100_000];
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(Path::new("/run/netns").join(&ns.0)).unwrap();
            // SAFETY: setns on this scoped thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let up0 = ferrox_datapath::ifindex("up0").unwrap();
            let pod0 = ferrox_datapath::ifindex("pod0").unwrap();
            let mut rows = Vec::new();
            let mut profiles = Vec::new();
            for &n in &sizes {
                let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-bench").unwrap();
                let mut dp = Datapath::open(&bpffs.layout()).unwrap();
                dp.maps_mut()
                    .config
                    .set(&DatapathConfig {
                        node_addr: be(NODE),
                        uplink_ifindex: up0,
                        snat_port_min: 61000,
                        snat_port_max: 65535,
                        monitor: 0,
                    })
                    .unwrap();
                let port = program(&mut dp, n);
                // The measured frontend gets its Maglev table, as the agent would write it.
                let rev = ((n / 2).min(55_000) % 60_000 + 1) as u16;
                ferrox_datapath::MaglevTables::open(&bpffs.layout())
                    .unwrap()
                    .set(rev, &vec![1u32; ferrox_abi::MAGLEV_TABLE_SIZE as usize])
                    .unwrap();
                const PASS: i32 = -1;
                const REDIRECT: i32 = 7;
                let amortised_runs = (runs / 10).max(20);
                // Single runs (fresh input each), then amortised runs where a pass's output is
                // again an input of the same path.
                let mut single = Vec::new();
                let mut amortised = Vec::new();
                let m = measure(&mut dp, TcProgram::UplinkEgress, up0, runs, |_| tcp(NODE, 22, CLIENT, 40000), PASS);
                single.push((BASELINE, m));
                amortised.push((BASELINE, measure_repeat(&mut dp, TcProgram::UplinkEgress, up0, amortised_runs, REPEAT, |_| tcp(NODE, 22, CLIENT, 40000), PASS)));
                let m = measure(&mut dp, TcProgram::UplinkIngress, up0, runs, |_| tcp(CLIENT, 40000, NODE, 22), PASS);
                single.push((MISS, m));
                amortised.push((MISS, measure_repeat(&mut dp, TcProgram::UplinkIngress, up0, amortised_runs, REPEAT, |_| tcp(CLIENT, 40000, NODE, 22), PASS)));
                let m = measure(&mut dp, TcProgram::UplinkIngress, up0, runs, |i| tcp(CLIENT, (20_000 + i) as u16, NODE, port), REDIRECT);
                single.push((NEW, m));
                // The programs' own time (run-time stats) where the per-packet figure comes
                // from single runs; the baseline's and the XDP miss's calibrate the stats' own
                // clock reads. New flows from clients of their own (198.20.x.y).
                let mut own = Vec::new();
                own.push((BASELINE, program_time(&mut dp, TcProgram::UplinkEgress, up0, runs, |_| tcp(NODE, 22, CLIENT, 40000), PASS)));
                own.push((ESTABLISHED, program_time(&mut dp, TcProgram::UplinkIngress, up0, runs, |_| tcp_flags(CLIENT, 20_000, NODE, port, ACK), REDIRECT)));
                own.push((NEW, program_time(&mut dp, TcProgram::UplinkIngress, up0, runs, |i| tcp([198, 20, (i >> 8) as u8, i as u8], 20_000, NODE, port), REDIRECT)));
                let m = measure(&mut dp, TcProgram::UplinkIngress, up0, runs, |_| tcp_flags(CLIENT, 20_000, NODE, port, ACK), REDIRECT);
                single.push((ESTABLISHED, m));
                let m = measure(&mut dp, TcProgram::FromPod, pod0, runs, |_| tcp_flags(LOCAL_POD, 8080, CLIENT, 20_000, ACK), REDIRECT);
                single.push((REPLY, m));
                ping_pong(&mut dp, port);
                amortised.push((ESTABLISHED, measure_repeat(&mut dp, TcProgram::UplinkIngress, up0, amortised_runs, REPEAT, |_| tcp_flags(CLIENT, PING_PONG_PORT, FRONTEND2, port, ACK), REDIRECT)));
                amortised.push((REPLY, measure_repeat(&mut dp, TcProgram::FromPod, pod0, amortised_runs, REPEAT, |_| tcp_flags(LOCAL_POD, 8080, CLIENT, PING_PONG_PORT, ACK), REDIRECT)));
                // The same at the uplink's XDP program (issue #17, item 5).
                xdp_ping_pong(&mut dp, &bpffs.layout(), port);
                let m = measure(&mut dp, Run::Xdp, up0, runs, |_| tcp(CLIENT, 40000, NODE, 22), XDP_PASS);
                single.push((XDP_MISS, m));
                amortised.push((XDP_MISS, measure_repeat(&mut dp, Run::Xdp, up0, amortised_runs, REPEAT, |_| tcp(CLIENT, 40000, NODE, 22), XDP_PASS)));
                // SNATed flows: at most 1,000 of the 4,536 SNAT ports in all (700 here, 300 for
                // the program's own time, from clients of their own: 198.21.x.y), so a port is
                // always found within SNAT's 8 tries.
                let m = measure(&mut dp, Run::Xdp, up0, runs.min(700), |i| tcp(CLIENT, (30_100 + i) as u16, NODE, XDP_NEW_PORT), XDP_TX);
                single.push((XDP_NEW, m));
                own.push((XDP_MISS, program_time(&mut dp, Run::Xdp, up0, runs, |_| tcp(CLIENT, 40000, NODE, 22), XDP_PASS)));
                own.push((XDP_NEW, program_time(&mut dp, Run::Xdp, up0, runs.min(300), |i| tcp([198, 21, (i >> 8) as u8, i as u8], 31_100, NODE, XDP_NEW_PORT), XDP_TX)));
                let m = measure(&mut dp, Run::Xdp, up0, runs, |_| tcp_flags(CLIENT, XDP_PING_PONG_PORT, FRONTEND2, port, ACK), XDP_TX);
                single.push((XDP_ESTABLISHED, m));
                amortised.push((XDP_ESTABLISHED, measure_repeat(&mut dp, Run::Xdp, up0, amortised_runs, REPEAT, |_| tcp_flags(CLIENT, XDP_PING_PONG_PORT, FRONTEND2, port, ACK), XDP_TX)));
                if profiling && n == 1 {
                    // New flows from other clients than the measured ones (198.19.x.y), one each.
                    let new_client = |i: u32| [198, 19, (i >> 8) as u8, i as u8];
                    let paths: [(&str, TcProgram, u32, Input, u32, i32); 5] = [
                        (BASELINE, TcProgram::UplinkEgress, up0, Box::new(|_| tcp(NODE, 22, CLIENT, 40000)), REPEAT * 100, PASS),
                        (MISS, TcProgram::UplinkIngress, up0, Box::new(|_| tcp(CLIENT, 40000, NODE, 22)), REPEAT * 100, PASS),
                        (NEW, TcProgram::UplinkIngress, up0, Box::new(move |i| tcp(new_client(i), (20_000 + (i >> 16)) as u16, NODE, port)), 1, REDIRECT),
                        (ESTABLISHED, TcProgram::UplinkIngress, up0, Box::new(move |_| tcp_flags(CLIENT, PING_PONG_PORT, FRONTEND2, port, ACK)), REPEAT * 100, REDIRECT),
                        (REPLY, TcProgram::FromPod, pod0, Box::new(|_| tcp_flags(LOCAL_POD, 8080, CLIENT, PING_PONG_PORT, ACK)), REPEAT * 100, REDIRECT),
                    ];
                    for (path, program, ifindex, input, repeat, action) in paths {
                        let top = profile(&mut dp, program, ifindex, &*input, repeat, action);
                        eprintln!("profile of {path}{}:", if repeat == 1 { " (single runs, inside the program)" } else { "" });
                        for (pct, sym) in &top {
                            eprintln!("  {pct:>6.2}%  {sym}");
                        }
                        profiles.push(json!({"path": path, "single_runs": repeat == 1, "top": top.iter().map(|(p, s)| json!({"percent": p, "symbol": s})).collect::<Vec<_>>()}));
                    }
                }
                dp.maps_mut()
                    .tunnels
                    .insert(&ferrox_datapath::Tunnel {
                        prefix: "10.244.2.0/24".parse().unwrap(),
                        remote: NODE2.into(),
                        flags: ferrox_abi::tunnel_flags::IPIP,
                    })
                    .unwrap();
                dp.maps_mut()
                    .nodes
                    .insert(&be(NODE2), &ferrox_abi::NodeInfo { flags: ferrox_abi::node_flags::TUNNEL_PEER })
                    .unwrap();
                dp.maps_mut()
                    .endpoints
                    .insert(
                        &ferrox_abi::EndpointKey { addr: be(LOCAL_POD) },
                        // As the CNI plugin registers an unshaped pod: delivered into the pod (bpf_redirect_peer,
                        // to the MAC its address gives).
                        &ferrox_abi::EndpointInfo { ifindex: pod0, flags: ferrox_abi::endpoint_flags::POD | ferrox_abi::endpoint_flags::PEER },
                    )
                    .unwrap();
                let m = measure(&mut dp, TcProgram::UplinkEgress, up0, runs, |_| tcp(LOCAL_POD, 40000, REMOTE_POD, 8080), PASS);
                single.push((ENCAP, m));
                let m = measure(&mut dp, TcProgram::UplinkIngress, up0, runs, |_| ipip(&tcp(REMOTE_POD, 8080, LOCAL_POD, 40000), NODE2, NODE), REDIRECT);
                single.push((DECAP, m));
                own.push((ENCAP, program_time(&mut dp, TcProgram::UplinkEgress, up0, runs, |_| tcp(LOCAL_POD, 40000, REMOTE_POD, 8080), PASS)));
                own.push((DECAP, program_time(&mut dp, TcProgram::UplinkIngress, up0, runs, |_| ipip(&tcp(REMOTE_POD, 8080, LOCAL_POD, 40000), NODE2, NODE), REDIRECT)));
                if profiling && n == 1 {
                    let paths: [(&str, TcProgram, Input, i32); 2] = [
                        (ENCAP, TcProgram::UplinkEgress, Box::new(|_| tcp(LOCAL_POD, 40000, REMOTE_POD, 8080)), PASS),
                        (DECAP, TcProgram::UplinkIngress, Box::new(|_| ipip(&tcp(REMOTE_POD, 8080, LOCAL_POD, 40000), NODE2, NODE)), REDIRECT),
                    ];
                    for (path, program, input, action) in paths {
                        let top = profile(&mut dp, program, up0, &*input, 1, action);
                        eprintln!("profile of {path} (single runs, inside the program):");
                        for (pct, sym) in &top {
                            eprintln!("  {pct:>6.2}%  {sym}");
                        }
                        profiles.push(json!({"path": path, "single_runs": true, "top": top.iter().map(|(p, s)| json!({"percent": p, "symbol": s})).collect::<Vec<_>>()}));
                    }
                }
                rows.extend(figures(n, &single, &amortised, &own));
                dp.maps_mut().tunnels.remove("10.244.2.0/24".parse().unwrap()).unwrap();
            }
            (rows, profiles)
        })
        .join()
        .unwrap()
    })
}

/// A packet builder: the `i`th input of a run.
type Input = Box<dyn Fn(u32) -> Vec<u8>>;

/// Kernel memory of the maps of a node with `gib` GiB of memory at default settings: empty,
/// and with `services` Services x 10 endpoints written the way the agent writes them (a
/// master entry and 10 backend slots per frontend, one backend entry per endpoint).
fn maps_by_node(sizes_gib: &[u64], services: u32) -> Vec<Value> {
    let total = |layout: &ferrox_datapath::PinLayout| -> u64 {
        ferrox_datapath::map_memory(layout)
            .unwrap()
            .iter()
            .map(|m| m.bytes)
            .sum()
    };
    let mut rows = Vec::new();
    for &gib in sizes_gib {
        let sizing = ferrox_datapath::Sizing::for_memory(gib << 30);
        let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-bench").unwrap();
        let layout = bpffs.layout();
        let mut dp = Datapath::open_with(&layout, &sizing).unwrap();
        let empty = total(&layout);
        let mut backend_id = 1u32;
        for i in 0..services {
            let addr = u32::from_ne_bytes([10, 96, (i >> 8) as u8, i as u8]);
            let key = ServiceKey::master(addr, 80u16.to_be(), 6);
            for slot in 1..=10u16 {
                let b = Backend {
                    addr: u32::from_ne_bytes([10, 244, (backend_id >> 8) as u8, backend_id as u8]),
                    port: 8080u16.to_be(),
                    proto: 6,
                    flags: 0,
                };
                dp.maps_mut().backends.insert(&backend_id, &b).unwrap();
                let v = ServiceValue {
                    backend_id,
                    ..Default::default()
                };
                dp.maps_mut()
                    .services
                    .insert(&key.with_slot(slot), &v)
                    .unwrap();
                backend_id += 1;
            }
            let master = ServiceValue {
                count: 10,
                rev_nat_id: (i % 60_000 + 1) as u16,
                flags: svc_flags::CLUSTER_IP,
                ..Default::default()
            };
            dp.maps_mut().services.insert(&key, &master).unwrap();
        }
        let filled = total(&layout);
        eprintln!(
            "maps of a {gib} GiB node: {:.1} MiB empty, {:.1} MiB with {services} Services x 10 endpoints (conntrack {}, reverse NAT {}, affinity {}, policy flows {})",
            empty as f64 / 1_048_576.0,
            filled as f64 / 1_048_576.0,
            sizing.conntrack,
            sizing.sock_revnat,
            sizing.affinity,
            sizing.policy_ct
        );
        rows.push(json!({
            "node_memory_gib": gib,
            "conntrack": sizing.conntrack,
            "sock_revnat": sizing.sock_revnat,
            "affinity": sizing.affinity,
            "policy_ct": sizing.policy_ct,
            "empty_bytes": empty,
            "services": services,
            "filled_bytes": filled,
        }));
    }
    rows
}

fn main() {
    // What a killed earlier run left (clusters of dead owners) would share the machine with
    // the measurements: tear it down first, saying what it was.
    let swept = ferrox_tests::harness::leaks::sweep_stale();
    if !swept.is_empty() {
        eprintln!("removed {} things a killed earlier run left:", swept.len());
        for s in &swept {
            eprintln!("  {s}");
        }
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let runs: u32 = if quick { 300 } else { 3000 };
    // `--sections 2,3` runs only those (the others stay empty in the report).
    let only: Option<Vec<u32>> = std::env::args()
        .skip_while(|a| a != "--sections")
        .nth(1)
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let on = |section: u32| only.as_ref().is_none_or(|o| o.contains(&section));
    // Where the time of each repeatable path goes (perf, at 1 Service): in a full run, or with
    // `--profile`.
    let profiling = !quick || std::env::args().any(|a| a == "--profile");
    let (results, profiles) = if on(1) {
        per_packet(runs, profiling)
    } else {
        (vec![], vec![])
    };
    // The CNI figures first among the cluster sections: the namespaces the others leave (a
    // kube-proxy ruleset of 10k Services in each) are torn down by the kernel in the background
    // for minutes, holding the locks every ADD and DEL takes (a full run measured ADD at 31 ms
    // p50 after them, 2.9 ms before).
    let cni = if on(5) {
        cni::cni(if quick { 32 } else { 160 })
    } else {
        vec![]
    };
    let throughput = if on(4) {
        throughput(quick, profiling)
    } else {
        vec![]
    };
    let node_port_rate = if on(4) {
        xdp::node_port_rate(quick, profiling)
    } else {
        vec![]
    };
    // `--sizes 10000` runs sections 2, 3 and the memory figures at these sizes only.
    let proxy_sizes: Vec<usize> = std::env::args()
        .skip_while(|a| a != "--sizes")
        .nth(1)
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or(if quick {
            vec![1, 1_000]
        } else {
            vec![1, 1_000, 10_000]
        });
    let exchanges = if quick { 300 } else { 2_000 };
    let (mut latency, mut programming, mut memory) = (vec![], vec![], vec![]);
    if on(2) || on(3) {
        (latency, programming) =
            proxy::kube_proxy(&proxy_sizes, exchanges, if quick { 1 } else { 3 });
    }
    if on(2) || on(3) || on(6) {
        let (f_lat, f_prog, mem) = proxy::ferrox(&proxy_sizes, exchanges);
        latency.extend(f_lat);
        programming.extend(f_prog);
        memory = mem;
    }
    let maps = if on(6) {
        maps_by_node(&[2, 4, 8, 16, 32], 10_000)
    } else {
        vec![]
    };
    let bgp = if on(6) {
        bgp::learning(if quick { &[10_000] } else { &[10_000, 100_000] })
    } else {
        vec![]
    };

    let network_policy = if on(8) {
        policy::policy_costs(runs, quick)
    } else {
        Value::Null
    };

    let uname = Command::new("uname").arg("-r").output().unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let doc = json!({
        "timestamp": stamp,
        "quick": quick,
        "kernel": String::from_utf8_lossy(&uname.stdout).trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "method": "BPF_PROG_TEST_RUN, kernel-measured duration; single runs: repeat = 1 on a fresh input, median/min/max over runs",
        "runs_per_figure": runs,
        "per_packet": results,
        "profiles": profiles,
        "throughput": throughput,
        "node_port_rate": node_port_rate,
        "latency": latency,
        "programming": programming,
        "memory": memory,
        "maps_by_node": maps,
        "cni": cni,
        "bgp": bgp,
        "network_policy": network_policy,
    });
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();

    let root_docs = root.join("docs");
    report::write(&doc, &root_docs, &format!("bench/results/{stamp}.json"));
    println!("wrote {} and docs/benchmarks.md", path.display());
}
