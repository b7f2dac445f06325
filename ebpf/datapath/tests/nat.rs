//! Datapath tier: the per-packet service translation (uplink ingress and pod egress) driven with
//! BPF_PROG_TEST_RUN inside a scratch network namespace whose routes and neighbours are known,
//! so every expected output byte, MAC addresses included, is determined. One table, played in
//! order (later rows depend on the flows earlier rows created), each row stating the program,
//! the packet in, the action, the counter reason that must move (and no other), and the packet
//! that must come out. Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use ferrox_abi::{
    Backend, COUNTER_SLOTS, CtKey, DatapathConfig, Hook, Reason, ServiceKey, ServiceValue,
    backend_flags, counter_cell, counter_index, ct_flags, proto, scope, svc_flags,
};
use ferrox_datapath::{Datapath, SourceRange, TcProgram, bpffs::ScratchBpffs};

mod netns;
mod packets;
use netns::NetNs;
use packets::{Packet, checksums_ok, pkt};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const NODE: [u8; 4] = [198, 18, 0, 11];
const NODE2: [u8; 4] = [198, 18, 0, 12];
const CLIENT: [u8; 4] = [198, 18, 0, 200];
const STRANGER: [u8; 4] = [198, 18, 0, 201];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 6];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0];
const STRANGER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];
const POD_MAC: [u8; 6] = [2, 0, 0, 1, 5, 5];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const GATEWAY: [u8; 4] = ferrox_abi::POD_GATEWAY;

fn be(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// The node: an uplink `up0` (198.18.0.11/24) with the client, a stranger and node-2 as static
/// neighbours, a pod veth `pod0` with a local pod behind it, and node-2's pod CIDR via node-2.
fn node(tag: &str) -> NetNs {
    let ns = NetNs::new(format!("fxt-nat{tag}{}", std::process::id()));
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
    ns.ip(&[
        "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
    ]);
    for dev in ["up0", "up0p", "pod0", "pod0p"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["addr", "add", "198.18.0.11/24", "dev", "up0"]);
    ns.ip(&["route", "add", "10.244.1.5/32", "dev", "pod0"]);
    ns.ip(&["route", "add", "10.244.2.0/24", "via", "198.18.0.12"]);
    for (ip, mac, dev) in [
        ("198.18.0.200", "02:00:00:00:02:00", "up0"),
        ("198.18.0.201", "02:00:00:00:02:01", "up0"),
        ("198.18.0.12", "02:00:00:00:00:12", "up0"),
        ("10.244.1.5", "02:00:00:01:05:05", "pod0"),
    ] {
        ns.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    let out = ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(out.status.success());
    ns
}

/// One external frontend (scope external) with its backends in slots 1..=n.
fn frontend(dp: &mut Datapath, port: u16, l4: u8, rev_nat_id: u16, flags: u16, backends: &[u32]) {
    let key = ServiceKey::master(be(NODE), port.to_be(), l4).with_scope(scope::EXTERNAL);
    for (i, id) in backends.iter().enumerate() {
        let slot = ServiceValue {
            backend_id: *id,
            ..Default::default()
        };
        dp.maps_mut()
            .services
            .insert(&key.with_slot(i as u16 + 1), &slot)
            .unwrap();
    }
    let master = ServiceValue {
        count: backends.len() as u16,
        rev_nat_id,
        flags: svc_flags::NODE_PORT | flags,
        ..Default::default()
    };
    dp.maps_mut().services.insert(&key, &master).unwrap();
}

/// One internal frontend (a cluster IP, for this node's own clients) with its backends.
fn internal_frontend(dp: &mut Datapath, port: u16, rev_nat_id: u16, backends: &[u32]) {
    let key =
        ServiceKey::master(be(CLUSTER_IP), port.to_be(), proto::TCP).with_scope(scope::INTERNAL);
    for (i, id) in backends.iter().enumerate() {
        let slot = ServiceValue {
            backend_id: *id,
            ..Default::default()
        };
        dp.maps_mut()
            .services
            .insert(&key.with_slot(i as u16 + 1), &slot)
            .unwrap();
    }
    let master = ServiceValue {
        count: backends.len() as u16,
        rev_nat_id,
        flags: svc_flags::CLUSTER_IP,
        ..Default::default()
    };
    dp.maps_mut().services.insert(&key, &master).unwrap();
}

fn backend(dp: &mut Datapath, id: u32, addr: [u8; 4], port: u16, l4: u8, local: bool) {
    let b = Backend {
        addr: be(addr),
        port: port.to_be(),
        proto: l4,
        flags: if local { backend_flags::LOCAL } else { 0 },
    };
    dp.maps_mut().backends.insert(&id, &b).unwrap();
}

fn counters(dp: &Datapath) -> Vec<u64> {
    (0..COUNTER_SLOTS)
        .map(|i| match counter_cell(i) {
            Some((h, r)) => dp.maps().counters.get(h, r).unwrap().packets,
            None => 0,
        })
        .collect()
}

/// What must come out.
enum Out {
    /// The packet, unchanged.
    Same,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// A SNATed packet: these bytes for the source port the program chose, which must be in
    /// 61000..=65535 and is remembered for the following rows.
    Snat(Box<dyn Fn(u16) -> Vec<u8> + Send + Sync>),
    /// These bytes, given the remembered SNAT port.
    WithSnatPort(Box<dyn Fn(u16) -> Vec<u8> + Send + Sync>),
}

enum Input {
    Bytes(Vec<u8>),
    /// A packet to the port the SNAT row chose.
    WithSnatPort(Box<dyn Fn(u16) -> Vec<u8> + Send + Sync>),
}

/// The program a row runs: a TC program, or the uplink's XDP program.
#[derive(Clone, Copy)]
enum Prog {
    Tc(TcProgram),
    Xdp,
}

struct Row {
    what: &'static str,
    program: Prog,
    /// The interface the packet arrives on.
    on: &'static str,
    input: Input,
    action: i32,
    reason: Reason,
    out: Out,
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Packet {
    pkt().ipv4(src, dst).tcp(sport, dport)
}

#[test]
fn external_flows_are_translated_tracked_and_answered() {
    let ns = node("a");
    let up0_mac = ns.mac("up0");
    let pod0_mac = ns.mac("pod0");
    let rows = vec![
        Row {
            what: "new flow to a NodePort with a local backend: DNAT, to the pod's veth",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40000, NODE, 30080)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40000, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the same flow again: translated from conntrack",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40000, NODE, 30080)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Bytes(
                tcp(CLIENT, 40000, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the local pod's reply: source back to the NodePort, out of the uplink",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 8080, CLIENT, 40000)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30080, CLIENT, 40000)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "new flow to a remote backend: DNAT and SNAT to the node, to node-2",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40001, NODE, 30081)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                tcp(NODE, port, REMOTE_POD, 8080)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "the remote backend's reply to the SNAT port: back to the client",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                tcp(REMOTE_POD, 8080, NODE, port)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::WithSnatPort(Box::new(move |_| {
                tcp(NODE, 30081, CLIENT, 40001)
                    .macs(CLIENT_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "fragmentation needed from a router about a SNATed flow: to the client, in its addresses",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                let quote = tcp(NODE, port, REMOTE_POD, 8080).quote(28);
                pkt()
                    .ipv4(NODE2, NODE)
                    .icmp_error(3, 4, &quote)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatIcmpError,
            out: Out::WithSnatPort(Box::new(move |_| {
                let quote = tcp(CLIENT, 40001, NODE, 30081).quote(28);
                pkt()
                    .ipv4(NODE2, CLIENT)
                    .icmp_error(3, 4, &quote)
                    .macs(CLIENT_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "port unreachable from the remote backend itself: its source becomes the frontend",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                let quote = tcp(NODE, port, REMOTE_POD, 8080).quote(28);
                pkt()
                    .ipv4(REMOTE_POD, NODE)
                    .icmp_error(3, 3, &quote)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatIcmpError,
            out: Out::WithSnatPort(Box::new(move |_| {
                let quote = tcp(CLIENT, 40001, NODE, 30081).quote(28);
                pkt()
                    .ipv4(NODE, CLIENT)
                    .icmp_error(3, 3, &quote)
                    .macs(CLIENT_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "fragmentation needed about a local backend's reply: to the pod, in its addresses",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes({
                let quote = tcp(NODE, 30080, CLIENT, 40000).quote(28);
                pkt()
                    .ipv4(NODE2, NODE)
                    .icmp_error(3, 4, &quote)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            }),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatIcmpError,
            out: Out::Bytes({
                let quote = tcp(LOCAL_POD, 8080, CLIENT, 40000).quote(28);
                pkt()
                    .ipv4(NODE2, LOCAL_POD)
                    .icmp_error(3, 4, &quote)
                    .macs(POD_MAC, pod0_mac)
                    .build()
            }),
        },
        Row {
            what: "an ICMP error about a flow that was never translated: passed untouched",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes({
                let quote = tcp(NODE, 22, CLIENT, 50000).quote(28);
                pkt()
                    .ipv4(NODE2, NODE)
                    .icmp_error(3, 4, &quote)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            }),
            action: TC_ACT_UNSPEC,
            reason: Reason::PassIcmp,
            out: Out::Same,
        },
        Row {
            what: "a client outside loadBalancerSourceRanges is dropped",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(STRANGER, 40002, NODE, 30082)
                    .macs(up0_mac, STRANGER_MAC)
                    .build(),
            ),
            action: TC_ACT_SHOT,
            reason: Reason::DropSourceRange,
            out: Out::Same,
        },
        Row {
            what: "a client inside loadBalancerSourceRanges is translated",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40003, NODE, 30082)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40003, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a frontend without backends drops",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40004, NODE, 30083)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_SHOT,
            reason: Reason::DropNoBackend,
            out: Out::Same,
        },
        Row {
            what: "UDP without checksum: translated, checksum stays 0",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                pkt()
                    .ipv4(CLIENT, NODE)
                    .udp(5000, 30053)
                    .payload(12)
                    .no_l4_checksum()
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                pkt()
                    .ipv4(CLIENT, LOCAL_POD)
                    .udp(5000, 5353)
                    .payload(12)
                    .no_l4_checksum()
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "UDP with checksum: translated, checksum still valid",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                pkt()
                    .ipv4(CLIENT, NODE)
                    .udp(5001, 30053)
                    .payload(12)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                pkt()
                    .ipv4(CLIENT, LOCAL_POD)
                    .udp(5001, 5353)
                    .payload(12)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "not a frontend (ssh to the node): passed untouched",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40005, NODE, 22)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_UNSPEC,
            reason: Reason::PassTcp,
            out: Out::Same,
        },
        Row {
            what: "the node's own reply traffic from a pod that is not a backend: passed",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 9999, CLIENT, 40000)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_UNSPEC,
            reason: Reason::PassTcp,
            out: Out::Same,
        },
        Row {
            what: "a pod's packet to a cluster IP no socket hook translated: DNAT, its address kept with a source port of the SNAT range (never an ephemeral port a direct connection could hold), to node-2",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 41000, CLUSTER_IP, 80)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                tcp(LOCAL_POD, port, REMOTE_POD, 8080)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "the remote backend's reply: from the cluster IP again, to the pod's own port",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                tcp(REMOTE_POD, 8080, LOCAL_POD, port)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(CLUSTER_IP, 80, LOCAL_POD, 41000)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "hairpin: a pod to a cluster IP whose backend is itself: SNAT to the gateway",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 41001, CLUSTER_IP, 81)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                tcp(GATEWAY, port, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build()
            })),
        },
        Row {
            what: "hairpin reply to the gateway: from the cluster IP, to the pod",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::WithSnatPort(Box::new(move |port| {
                tcp(LOCAL_POD, 8080, GATEWAY, port)
                    .macs(pod0_mac, POD_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(CLUSTER_IP, 81, LOCAL_POD, 41001)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a cluster IP from outside the node: not served, passed untouched",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40010, CLUSTER_IP, 80)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_UNSPEC,
            reason: Reason::PassTcp,
            out: Out::Same,
        },
        Row {
            what: "a frontend packet whose total length lies: dropped, not rewritten",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40006, NODE, 30080)
                    .tot_len(900)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_SHOT,
            reason: Reason::DropMalformedIpv4,
            out: Out::Same,
        },
    ];

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        backend(&mut dp, 2, REMOTE_POD, 8080, proto::TCP, false);
        backend(&mut dp, 3, LOCAL_POD, 5353, proto::UDP, true);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        frontend(&mut dp, 30081, proto::TCP, 2, 0, &[2]);
        frontend(
            &mut dp,
            30082,
            proto::TCP,
            3,
            svc_flags::SOURCE_RANGES,
            &[1],
        );
        frontend(&mut dp, 30083, proto::TCP, 4, 0, &[]);
        frontend(&mut dp, 30053, proto::UDP, 5, 0, &[3]);
        internal_frontend(&mut dp, 80, 6, &[2]);
        internal_frontend(&mut dp, 81, 7, &[1]);
        dp.maps_mut()
            .source_ranges
            .insert(&SourceRange {
                rev_nat_id: 3,
                prefix: "198.18.0.200/32".parse().unwrap(),
            })
            .unwrap();
        let uplink = ferrox_datapath::ifindex("up0").unwrap();
        let cfg = DatapathConfig {
            node_addr: be(NODE),
            uplink_ifindex: uplink,
            snat_port_min: 61000,
            snat_port_max: 65535,
            monitor: 0,
        };
        dp.maps_mut().config.set(&cfg).unwrap();

        let mut snat_port = 0u16;
        let mut failures = play(&mut dp, &rows, &mut snat_port);
        // Every translated flow is tracked in both directions: 7 flows, 14 entries.
        let ct: Vec<CtKey> = dp
            .maps()
            .conntrack
            .entries()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if ct.len() != 14 {
            failures.push(format!(
                "conntrack holds {} entries, want 14: {ct:?}",
                ct.len()
            ));
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Plays `rows` in order against the loaded datapath; returns what did not go as stated.
fn play(dp: &mut Datapath, rows: &[Row], snat_port: &mut u16) -> Vec<String> {
    let mut failures = Vec::new();
    for row in rows {
        let input = match &row.input {
            Input::Bytes(b) => b.clone(),
            Input::WithSnatPort(f) => f(*snat_port),
        };
        let ifindex = ferrox_datapath::ifindex(row.on).unwrap();
        let before = counters(dp);
        let out = match row.program {
            Prog::Tc(p) => dp.test_run_tc_on(p, &input, Some(ifindex), 1),
            Prog::Xdp => dp.test_run_xdp_on(&input, Some(ifindex), 1),
        }
        .unwrap();
        let after = counters(dp);
        let mut fail = |m: String| failures.push(format!("{}: {m}", row.what));
        if out.action != row.action {
            fail(format!("action {} want {}", out.action, row.action));
        }
        let hook = match row.program {
            Prog::Tc(TcProgram::FromPod) => Hook::TcFromPod,
            Prog::Tc(TcProgram::ToPod) => Hook::TcToPod,
            Prog::Tc(TcProgram::UplinkIngress) => Hook::TcUplinkIngress,
            Prog::Tc(TcProgram::UplinkEgress) => Hook::TcUplinkEgress,
            Prog::Xdp => Hook::XdpUplink,
        };
        let want_cell = counter_index(hook, row.reason) as usize;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let want = u64::from(i == want_cell);
            if a - b != want {
                fail(format!(
                    "counter {:?} moved by {} want {want}",
                    counter_cell(i as u32),
                    a - b
                ));
            }
        }
        match &row.out {
            Out::Same => {
                if out.packet != input {
                    fail("the packet was modified".into());
                }
            }
            Out::Bytes(want) => {
                if &out.packet != want {
                    fail(format!(
                        "output\n  got  {:02x?}\n  want {:02x?}",
                        out.packet, want
                    ));
                }
            }
            Out::Snat(want) => {
                // The chosen port is the TCP source port, bytes 34..36.
                let port = u16::from_be_bytes([out.packet[34], out.packet[35]]);
                if !(61000..=65535).contains(&port) {
                    fail(format!("SNAT port {port} outside 61000..=65535"));
                }
                *snat_port = port;
                let want = want(port);
                if out.packet != want {
                    fail(format!(
                        "output\n  got  {:02x?}\n  want {:02x?}",
                        out.packet, want
                    ));
                }
            }
            Out::WithSnatPort(want) => {
                let want = want(*snat_port);
                if out.packet != want {
                    fail(format!(
                        "output\n  got  {:02x?}\n  want {:02x?}",
                        out.packet, want
                    ));
                }
            }
        }
        let sent = match row.program {
            Prog::Tc(_) => row.action == TC_ACT_REDIRECT,
            Prog::Xdp => row.action == XDP_TX,
        };
        if sent && !checksums_ok(&out.packet) {
            fail("checksums do not verify".into());
        }
    }
    failures
}

const FAR_POD: [u8; 4] = [10, 244, 3, 7];
const TCP_FIN_ACK: u8 = 0x11;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;
const TC_ACT_OK: i32 = 0;

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Packet {
    pkt().ipv4(src, dst).udp(sport, dport)
}

/// The conntrack flags of the entry of `(src:sport -> dst:dport, proto)`.
fn ct_flags_of(dp: &Datapath, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, l4: u8) -> u8 {
    let key = CtKey {
        saddr: be(src),
        daddr: be(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: l4,
        _pad: [0; 3],
    };
    dp.maps()
        .conntrack
        .get(&key)
        .unwrap()
        .unwrap_or_else(|| panic!("no entry {src:?}:{sport} -> {dst:?}:{dport}"))
        .flags
}

#[test]
fn fragments_tcp_state_gone_backends_path_mtu_and_host_backends() {
    let ns = node("b");
    // A third node's pod block whose path MTU is 1000, locked as the agent writes tunnel routes
    // (an unlocked route MTU holds only the host's own packets, not forwarded ones).
    ns.ip(&[
        "route",
        "add",
        "10.244.3.0/24",
        "via",
        "198.18.0.12",
        "mtu",
        "lock",
        "1000",
    ]);
    let up0_mac = ns.mac("up0");
    let pod0_mac = ns.mac("pod0");
    let first = |id: u16| {
        udp(CLIENT, 40100, NODE, 30053)
            .id(id)
            .more_fragments()
            .payload(64)
    };
    let later = |id: u16, dst: [u8; 4], off: u16, last: bool| {
        let p = pkt().ipv4(CLIENT, dst).id(id).frag_offset(off);
        let p = if last { p } else { p.more_fragments() };
        p.fragment_data(proto::UDP, 72)
    };
    let phase1 = vec![
        Row {
            what: "UDP first fragment to a NodePort: translated, its ports remembered",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(first(77).macs(up0_mac, CLIENT_MAC).build()),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                udp(CLIENT, 40100, LOCAL_POD, 5353)
                    .id(77)
                    .more_fragments()
                    .payload(64)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a middle fragment: its addresses follow the first's translation",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(later(77, NODE, 9, false).macs(up0_mac, CLIENT_MAC).build()),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatFragment,
            out: Out::Bytes(
                later(77, LOCAL_POD, 9, false)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the last fragment: the same",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(later(77, NODE, 18, true).macs(up0_mac, CLIENT_MAC).build()),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatFragment,
            out: Out::Bytes(
                later(77, LOCAL_POD, 18, true)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a later fragment whose first never came: dropped, counted",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(later(78, NODE, 9, true).macs(up0_mac, CLIENT_MAC).build()),
            action: TC_ACT_SHOT,
            reason: Reason::DropFragmentUnknown,
            out: Out::Same,
        },
        Row {
            what: "the pod's fragmented reply: first fragment from the NodePort",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                udp(LOCAL_POD, 5353, CLIENT, 40100)
                    .id(900)
                    .more_fragments()
                    .payload(64)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                udp(NODE, 30053, CLIENT, 40100)
                    .id(900)
                    .more_fragments()
                    .payload(64)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the reply's last fragment: from the NodePort too",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                pkt()
                    .ipv4(LOCAL_POD, CLIENT)
                    .id(900)
                    .frag_offset(9)
                    .fragment_data(proto::UDP, 40)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatFragment,
            out: Out::Bytes(
                pkt()
                    .ipv4(NODE, CLIENT)
                    .id(900)
                    .frag_offset(9)
                    .fragment_data(proto::UDP, 40)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "IP options and TTL 1: translated, options kept, TTL as it came (the node is the frontend's destination)",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40200, NODE, 30080)
                    .ihl(6)
                    .ttl(1)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40200, LOCAL_POD, 8080)
                    .ihl(6)
                    .ttl(1)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        // TCP state: a FIN from the client half-closes the flow, the backend's FIN closes it.
        Row {
            what: "SYN of a flow whose close follows",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40300, NODE, 30080)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40300, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the client's FIN: half-closed, not closing",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40300, NODE, 30080)
                    .tcp_flags(TCP_FIN_ACK)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Bytes(
                tcp(CLIENT, 40300, LOCAL_POD, 8080)
                    .tcp_flags(TCP_FIN_ACK)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
    ];
    let phase2 = [
        Row {
            what: "the backend keeps sending on the half-closed flow",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 8080, CLIENT, 40300)
                    .tcp_flags(TCP_ACK)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30080, CLIENT, 40300)
                    .tcp_flags(TCP_ACK)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "the backend's FIN: now the flow is closing",
            program: Prog::Tc(TcProgram::FromPod),
            on: "pod0",
            input: Input::Bytes(
                tcp(LOCAL_POD, 8080, CLIENT, 40300)
                    .tcp_flags(TCP_FIN_ACK)
                    .macs(pod0_mac, POD_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30080, CLIENT, 40300)
                    .tcp_flags(TCP_FIN_ACK)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a flow reset by the client: closing at once",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40200, NODE, 30080)
                    .ihl(6)
                    .tcp_flags(TCP_RST)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Bytes(
                tcp(CLIENT, 40200, LOCAL_POD, 8080)
                    .ihl(6)
                    .tcp_flags(TCP_RST)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a SYN reusing the closed tuple: a new connection, no longer closing",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40300, NODE, 30080)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Bytes(
                tcp(CLIENT, 40300, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "a flow to a backend that is about to leave",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40400, NODE, 30086)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40400, LOCAL_POD, 8086)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
    ];
    let phase3 = vec![
        Row {
            what: "its backend left: an established packet is dropped, counted",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40400, NODE, 30086)
                    .tcp_flags(TCP_ACK)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_SHOT,
            reason: Reason::DropBackendGone,
            out: Out::Same,
        },
        Row {
            what: "a SYN on that tuple: a new flow to the frontend's remaining backend",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40400, NODE, 30086)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40400, LOCAL_POD, 8087)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "too big for the path, don't-fragment set: an ICMP fragmentation-needed to the client, from the address it used, quoting what it sent",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40500, NODE, 30084)
                    .dont_fragment()
                    .payload(1100)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_REDIRECT,
            reason: Reason::DropTooBig,
            out: Out::Bytes({
                let quote = tcp(CLIENT, 40500, NODE, 30084)
                    .dont_fragment()
                    .payload(1100)
                    .quote(28);
                pkt()
                    .ipv4(NODE, CLIENT)
                    .tos(0xc0)
                    .icmp_error_mtu(3, 4, 1000, &quote)
                    .macs(CLIENT_MAC, up0_mac)
                    .build()
            }),
        },
        Row {
            what: "too big, may fragment: translated and left to the stack, which fragments it",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                udp(CLIENT, 40501, NODE, 30087)
                    .payload(1100)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_OK,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                udp(NODE, port, FAR_POD, 5353)
                    .payload(1100)
                    .macs(up0_mac, CLIENT_MAC)
                    .build()
            })),
        },
        Row {
            what: "a NodePort whose backend is the node's own host network: delivered to the stack",
            program: Prog::Tc(TcProgram::UplinkIngress),
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 40600, NODE, 30085)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: TC_ACT_OK,
            reason: Reason::NatNewFlow,
            out: Out::Bytes(
                tcp(CLIENT, 40600, NODE, 8085)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
        },
        Row {
            what: "the host's reply leaving through the uplink: from the NodePort again",
            program: Prog::Tc(TcProgram::UplinkEgress),
            on: "up0",
            input: Input::Bytes(
                tcp(NODE, 8085, CLIENT, 40600)
                    .tcp_flags(0x12)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
            action: TC_ACT_UNSPEC,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30085, CLIENT, 40600)
                    .tcp_flags(0x12)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "host traffic that is no reply leaves as it is",
            program: Prog::Tc(TcProgram::UplinkEgress),
            on: "up0",
            input: Input::Bytes(
                tcp(NODE, 50000, CLIENT, 22)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
            action: TC_ACT_UNSPEC,
            reason: Reason::PassTcp,
            out: Out::Same,
        },
    ];

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        backend(&mut dp, 3, LOCAL_POD, 5353, proto::UDP, true);
        backend(&mut dp, 4, FAR_POD, 8080, proto::TCP, false);
        backend(&mut dp, 5, NODE, 8085, proto::TCP, true);
        backend(&mut dp, 6, LOCAL_POD, 8086, proto::TCP, true);
        backend(&mut dp, 7, LOCAL_POD, 8087, proto::TCP, true);
        backend(&mut dp, 8, FAR_POD, 5353, proto::UDP, false);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        frontend(&mut dp, 30053, proto::UDP, 5, 0, &[3]);
        frontend(&mut dp, 30084, proto::TCP, 8, 0, &[4]);
        frontend(&mut dp, 30085, proto::TCP, 9, 0, &[5]);
        frontend(&mut dp, 30086, proto::TCP, 10, 0, &[6]);
        frontend(&mut dp, 30087, proto::UDP, 11, 0, &[8]);
        let cfg = DatapathConfig {
            node_addr: be(NODE),
            uplink_ifindex: ferrox_datapath::ifindex("up0").unwrap(),
            snat_port_min: 61000,
            snat_port_max: 65535,
            monitor: 0,
        };
        dp.maps_mut().config.set(&cfg).unwrap();
        let mut snat_port = 0;
        let mut failures = play(&mut dp, &phase1, &mut snat_port);
        let flags = |dp: &Datapath, a, ap, b, bp| ct_flags_of(dp, a, ap, b, bp, proto::TCP);
        let half = flags(&dp, CLIENT, 40300, NODE, 30080);
        if half & ct_flags::FIN == 0 || half & ct_flags::CLOSING != 0 {
            failures.push(format!(
                "after one FIN: flags {half:#x}, want FIN and not CLOSING"
            ));
        }
        failures.extend(play(&mut dp, &phase2[..2], &mut snat_port));
        for (a, ap, b, bp) in [
            (CLIENT, 40300, NODE, 30080),
            (LOCAL_POD, 8080, CLIENT, 40300),
        ] {
            let f = flags(&dp, a, ap, b, bp);
            if f & ct_flags::CLOSING == 0 {
                failures.push(format!(
                    "after both FINs: {a:?}:{ap} flags {f:#x}, want CLOSING"
                ));
            }
        }
        failures.extend(play(&mut dp, &phase2[2..3], &mut snat_port));
        let reset = flags(&dp, CLIENT, 40200, NODE, 30080);
        if reset & ct_flags::CLOSING == 0 {
            failures.push(format!("after a RST: flags {reset:#x}, want CLOSING"));
        }
        failures.extend(play(&mut dp, &phase2[3..], &mut snat_port));
        let reopened = flags(&dp, CLIENT, 40300, NODE, 30080);
        if reopened & (ct_flags::CLOSING | ct_flags::FIN) != 0 {
            failures.push(format!(
                "after a new SYN: flags {reopened:#x}, want neither FIN nor CLOSING"
            ));
        }
        // Backend 6 leaves its frontend, which keeps backend 7.
        let key =
            ServiceKey::master(be(NODE), 30086u16.to_be(), proto::TCP).with_scope(scope::EXTERNAL);
        dp.maps_mut()
            .services
            .insert(
                &key.with_slot(1),
                &ServiceValue {
                    backend_id: 7,
                    ..Default::default()
                },
            )
            .unwrap();
        dp.maps_mut().remove_backend(6).unwrap();
        failures.extend(play(&mut dp, &phase3, &mut snat_port));
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The route of an established flow is cached in its conntrack entry by its first packet: the
/// next packets are sent with it without a FIB lookup, even when the neighbour changed, until
/// the entry's last-seen time is refreshed (a quarter second; here: aged by hand), when the
/// route is looked up again; a packet longer than the cached route was checked for looks it up
/// too (and a path too small for it answers with fragmentation-needed). The same bound holds
/// for the entry's backend: a removal nobody counted in `BACKENDS_GEN_V1` is noticed when the
/// entry's time is due, and the dropped packets leave that time alone.
#[test]
fn established_flows_follow_the_route_cached_in_their_entry_until_it_is_refreshed() {
    let ns = node("c");
    let up0_mac = ns.mac("up0");
    let pod0_mac = ns.mac("pod0");
    const NEW_POD_MAC: [u8; 6] = [2, 0, 0, 1, 5, 6];
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        let up0 = ferrox_datapath::ifindex("up0").unwrap();
        let pod0 = ferrox_datapath::ifindex("pod0").unwrap();
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
        let key = CtKey {
            saddr: be(CLIENT),
            daddr: be(NODE),
            sport: 40000u16.to_be(),
            dport: 30080u16.to_be(),
            proto: proto::TCP,
            _pad: [0; 3],
        };
        // Packets of `len` bytes (IP total length), don't-fragment set.
        let packet = |len: u16| {
            tcp(CLIENT, 40000, NODE, 30080)
                .dont_fragment()
                .payload(usize::from(len - 40))
                .macs(up0_mac, CLIENT_MAC)
                .build()
        };
        let to_pod = |mac: [u8; 6], len: u16| {
            tcp(CLIENT, 40000, LOCAL_POD, 8080)
                .dont_fragment()
                .payload(usize::from(len - 40))
                .macs(mac, pod0_mac)
                .build()
        };
        let mut failures = Vec::new();
        let send = |dp: &mut Datapath, what: &str, len: u16, want: Vec<u8>| {
            let out = dp.test_run_tc_on(TcProgram::UplinkIngress, &packet(len), Some(up0), 1);
            let out = out.unwrap();
            (out.action != TC_ACT_REDIRECT || out.packet != want).then(|| {
                format!(
                    "{what}: action {} output\n  got  {:02x?}\n  want {:02x?}",
                    out.action, out.packet, want
                )
            })
        };
        failures.extend(send(&mut dp, "new flow", 40, to_pod(POD_MAC, 40)));
        let e = dp.maps().conntrack.get(&key).unwrap().unwrap();
        let mut want_macs = [0u8; 12];
        want_macs[..6].copy_from_slice(&POD_MAC);
        want_macs[6..].copy_from_slice(&pod0_mac);
        if e.fwd_flags != ferrox_abi::fwd_flags::DIRECT
            || e.fwd_ifindex != pod0
            || e.fwd_macs != want_macs
            || e.fwd_max_len != 40
        {
            failures.push(format!(
                "the new flow's entry did not cache its route: {e:?}"
            ));
        }
        // The pod's MAC changes: the cached route still holds the old one.
        ns.ip(&[
            "neigh",
            "replace",
            "10.244.1.5",
            "lladdr",
            "02:00:00:01:05:06",
            "dev",
            "pod0",
            "nud",
            "permanent",
        ]);
        failures.extend(send(
            &mut dp,
            "established, cached route",
            40,
            to_pod(POD_MAC, 40),
        ));
        // A longer packet than the route was checked for: looked up again (new MAC), and the
        // cache now holds the new route for packets up to that length.
        failures.extend(send(
            &mut dp,
            "longer packet",
            600,
            to_pod(NEW_POD_MAC, 600),
        ));
        let e = dp.maps().conntrack.get(&key).unwrap().unwrap();
        if e.fwd_max_len != 600 || e.fwd_macs[..6] != NEW_POD_MAC {
            failures.push(format!(
                "the longer packet did not re-cache the route: {e:?}"
            ));
        }
        // Back to the old MAC; the cached route holds until the entry is refreshed.
        ns.ip(&[
            "neigh",
            "replace",
            "10.244.1.5",
            "lladdr",
            "02:00:00:01:05:05",
            "dev",
            "pod0",
            "nud",
            "permanent",
        ]);
        failures.extend(send(&mut dp, "cached again", 40, to_pod(NEW_POD_MAC, 40)));
        let aged = ferrox_abi::CtEntry {
            last_seen_ns: 0,
            ..e
        };
        dp.maps_mut().conntrack.insert(&key, &aged).unwrap();
        failures.extend(send(&mut dp, "refreshed entry", 40, to_pod(POD_MAC, 40)));
        let e = dp.maps().conntrack.get(&key).unwrap().unwrap();
        if e.last_seen_ns == 0 || e.fwd_max_len != 40 || e.fwd_macs[..6] != POD_MAC {
            failures.push(format!("the refresh did not re-cache the route: {e:?}"));
        }
        // The route to the pod now has a small locked MTU: a packet longer than it, still within
        // what the cache was checked for, is sent on the cached route until the refresh; then
        // it is answered with fragmentation-needed.
        let widened = ferrox_abi::CtEntry {
            fwd_max_len: 600,
            ..dp.maps().conntrack.get(&key).unwrap().unwrap()
        };
        dp.maps_mut().conntrack.insert(&key, &widened).unwrap();
        ns.ip(&[
            "route",
            "replace",
            "10.244.1.5/32",
            "dev",
            "pod0",
            "mtu",
            "lock",
            "500",
        ]);
        failures.extend(send(
            &mut dp,
            "cached route, not yet refreshed",
            600,
            to_pod(POD_MAC, 600),
        ));
        let aged = ferrox_abi::CtEntry {
            last_seen_ns: 0,
            ..dp.maps().conntrack.get(&key).unwrap().unwrap()
        };
        dp.maps_mut().conntrack.insert(&key, &aged).unwrap();
        let out = dp
            .test_run_tc_on(TcProgram::UplinkIngress, &packet(600), Some(up0), 1)
            .unwrap();
        if out.action != TC_ACT_REDIRECT || out.packet.get(23) != Some(&proto::ICMP) {
            failures.push(format!(
                "a DF packet over the new path MTU: action {}, packet {:02x?}",
                out.action, out.packet
            ));
        }
        // The backend leaves without the removal being counted (a writer other than
        // `Maps::remove_backend`): the entry found its backend at the current count, so its
        // packets skip the lookup until its time is due; then the packet finds it gone.
        // (ACKs: a SYN to a gone backend starts its flow over instead.)
        let ack = tcp(CLIENT, 40000, NODE, 30080)
            .tcp_flags(0x10)
            .dont_fragment()
            .macs(up0_mac, CLIENT_MAC)
            .build();
        let ack_to_pod = tcp(CLIENT, 40000, LOCAL_POD, 8080)
            .tcp_flags(0x10)
            .dont_fragment()
            .macs(POD_MAC, pod0_mac)
            .build();
        dp.maps_mut().backends.remove(&1).unwrap();
        let out = dp
            .test_run_tc_on(TcProgram::UplinkIngress, &ack, Some(up0), 1)
            .unwrap();
        if out.action != TC_ACT_REDIRECT || out.packet != ack_to_pod {
            failures.push(format!(
                "backend left uncounted, entry not due: action {} output\n  got  {:02x?}\n  want {:02x?}",
                out.action, out.packet, ack_to_pod
            ));
        }
        let aged = ferrox_abi::CtEntry {
            last_seen_ns: 0,
            ..dp.maps().conntrack.get(&key).unwrap().unwrap()
        };
        dp.maps_mut().conntrack.insert(&key, &aged).unwrap();
        let out = dp
            .test_run_tc_on(TcProgram::UplinkIngress, &ack, Some(up0), 1)
            .unwrap();
        if out.action != TC_ACT_SHOT {
            failures.push(format!(
                "an entry due whose backend left uncounted: action {} want {TC_ACT_SHOT}",
                out.action
            ));
        }
        let e = dp.maps().conntrack.get(&key).unwrap().unwrap();
        if e.last_seen_ns != 0 {
            failures.push(format!(
                "a packet dropped for a gone backend refreshed the entry: {e:?}"
            ));
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A translated flow whose route leads to the host veth of a local pod registered with
/// `endpoint_flags::PEER` caches that: its packets are sent with `bpf_redirect_peer`, straight
/// into the pod. A pod registered without it (shaped by the bandwidth plugin, or by an earlier
/// version), an entry naming another interface, or no entry keeps the plain redirect.
#[test]
fn flows_to_a_local_pod_that_takes_packets_directly_are_sent_into_the_pod() {
    use ferrox_abi::{EndpointInfo, EndpointKey, endpoint_flags, fwd_flags};
    let ns = node("p");
    let up0_mac = ns.mac("up0");
    let pod0_mac = ns.mac("pod0");
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test-peer").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        let up0 = ferrox_datapath::ifindex("up0").unwrap();
        let pod0 = ferrox_datapath::ifindex("pod0").unwrap();
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
        let pod = EndpointKey {
            addr: be(LOCAL_POD),
        };
        let rows: [(&str, Option<EndpointInfo>, u8); 4] = [
            (
                "a pod that takes packets directly",
                Some(EndpointInfo {
                    ifindex: pod0,
                    flags: endpoint_flags::POD | endpoint_flags::PEER,
                }),
                fwd_flags::DIRECT | fwd_flags::PEER,
            ),
            (
                "a shaped pod",
                Some(EndpointInfo {
                    ifindex: pod0,
                    flags: endpoint_flags::POD,
                }),
                fwd_flags::DIRECT,
            ),
            (
                "an entry on another interface",
                Some(EndpointInfo {
                    ifindex: up0,
                    flags: endpoint_flags::POD | endpoint_flags::PEER,
                }),
                fwd_flags::DIRECT,
            ),
            ("no entry", None, fwd_flags::DIRECT),
        ];
        let mut failures = Vec::new();
        for (n, (what, entry, want)) in rows.into_iter().enumerate() {
            match entry {
                Some(e) => dp.maps_mut().endpoints.insert(&pod, &e).unwrap(),
                None => {
                    let _ = dp.maps_mut().endpoints.remove(&pod);
                }
            }
            // A new flow per row (another client port): its route is looked up and cached.
            let sport = 41000 + n as u16;
            let packet = tcp(CLIENT, sport, NODE, 30080)
                .macs(up0_mac, CLIENT_MAC)
                .build();
            let want_packet = tcp(CLIENT, sport, LOCAL_POD, 8080)
                .macs(POD_MAC, pod0_mac)
                .build();
            for round in ["new flow", "established"] {
                let out = dp
                    .test_run_tc_on(TcProgram::UplinkIngress, &packet, Some(up0), 1)
                    .unwrap();
                if out.action != TC_ACT_REDIRECT || out.packet != want_packet {
                    failures.push(format!(
                        "{what}, {round}: action {}, packet {:02x?}",
                        out.action, out.packet
                    ));
                }
            }
            let key = CtKey {
                saddr: be(CLIENT),
                daddr: be(NODE),
                sport: sport.to_be(),
                dport: 30080u16.to_be(),
                proto: proto::TCP,
                _pad: [0; 3],
            };
            let e = dp.maps().conntrack.get(&key).unwrap().unwrap();
            if e.fwd_flags != want || e.fwd_ifindex != pod0 {
                failures.push(format!(
                    "{what}: cached fwd_flags {:#x} ifindex {} (want {want:#x}, {pod0})",
                    e.fwd_flags, e.fwd_ifindex
                ));
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Writes one entry into the conntrack map pinned at `pin`, as another program would.
fn pins_update(pin: &Path, k: &CtKey, v: &ferrox_abi::CtEntry) {
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let mut map: aya::maps::HashMap<_, CtKey, ferrox_abi::CtEntry> =
        aya::maps::HashMap::try_from(map).unwrap();
    map.insert(k, v, 0).unwrap();
}

/// The entries of the conntrack map pinned at `pin` (the previous map of a resize).
fn conntrack_at(pin: &Path) -> Vec<CtKey> {
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let map: aya::maps::HashMap<_, CtKey, ferrox_abi::CtEntry> =
        aya::maps::HashMap::try_from(map).unwrap();
    map.keys().map(Result::unwrap).collect()
}

/// While a resize of the conntrack map finishes, some hooks still run the programs of the
/// previous map. The current programs find the flows those created (only in the previous map)
/// and create theirs in both maps, so that both directions of every flow are translated
/// whichever hook runs which programs; once the resize ends, the previous map is out of reach.
#[test]
fn while_a_conntrack_resize_finishes_flows_are_seen_in_both_maps() {
    let ns = node("r");
    let up0_mac = ns.mac("up0");
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    ns.run(|| {
        let small = ferrox_datapath::Sizing {
            memory: 0,
            conntrack: 4096,
            sock_revnat: 2048,
            affinity: 1024,
            policy_ct: 1024,
        };
        let mut dp = Datapath::open_with(&layout, &small).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        let up0 = ferrox_datapath::ifindex("up0").unwrap();
        let cfg = DatapathConfig {
            node_addr: be(NODE),
            uplink_ifindex: up0,
            snat_port_min: 61000,
            snat_port_max: 65535,
            monitor: 0,
        };
        dp.maps_mut().config.set(&cfg).unwrap();
        let run = |dp: &mut Datapath, sport: u16, flags: u8| {
            let frame = tcp(CLIENT, sport, NODE, 30080)
                .tcp_flags(flags)
                .macs(up0_mac, CLIENT_MAC)
                .build();
            let before = counters(dp);
            let out = dp
                .test_run_tc_on(TcProgram::UplinkIngress, &frame, Some(up0), 1)
                .unwrap();
            let after = counters(dp);
            let moved: Vec<Reason> = [Reason::NatNewFlow, Reason::NatEstablished]
                .into_iter()
                .filter(|r| {
                    let i = counter_index(Hook::TcUplinkIngress, *r) as usize;
                    after[i] > before[i]
                })
                .collect();
            (out.action, moved)
        };
        let forward = |sport: u16| CtKey {
            saddr: be(CLIENT),
            daddr: be(NODE),
            sport: sport.to_be(),
            dport: 30080u16.to_be(),
            proto: proto::TCP,
            _pad: [0; 3],
        };
        // Flow A: tracked before the resize.
        assert_eq!(
            run(&mut dp, 41000, 0x02),
            (TC_ACT_REDIRECT, vec![Reason::NatNewFlow])
        );
        drop(dp);

        let mut dp = Datapath::open_with(
            &layout,
            &ferrox_datapath::Sizing {
                conntrack: 8192,
                ..small
            },
        )
        .unwrap();
        assert_eq!(dp.maps().conntrack.capacity(), 8192);
        let previous = layout.maps_dir().join("resize/CT_V2");
        // As if the previous programs had created flow A after the copy: only there.
        let a: Vec<CtKey> = dp
            .maps()
            .conntrack
            .entries()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(a.len(), 2);
        for k in &a {
            dp.maps_mut().conntrack.remove(k).unwrap();
        }
        // An ACK of flow A through the current programs: found in the previous map.
        assert_eq!(
            run(&mut dp, 41000, 0x10),
            (TC_ACT_REDIRECT, vec![Reason::NatEstablished])
        );
        assert!(dp.maps().conntrack.get(&forward(41000)).unwrap().is_none());
        // Flow B, new through the current programs: created in both maps.
        assert_eq!(
            run(&mut dp, 41001, 0x02),
            (TC_ACT_REDIRECT, vec![Reason::NatNewFlow])
        );
        assert_eq!(dp.maps().conntrack.len().unwrap(), 2);
        let in_previous = conntrack_at(&previous);
        assert_eq!(in_previous.len(), 4, "{in_previous:?}");
        assert!(in_previous.contains(&forward(41001)));

        // Flow D's reply key (the pod to the client's port 41003) is taken in the previous map
        // by another flow: the current programs must not reuse it (the previous programs would
        // translate the replies of both the same way), so flow D gets another source port.
        let taken = CtKey {
            saddr: be(LOCAL_POD),
            daddr: be(CLIENT),
            sport: 8080u16.to_be(),
            dport: 41003u16.to_be(),
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let other_flow = ferrox_abi::CtEntry {
            nat_saddr: be(NODE),
            nat_daddr: be(STRANGER),
            nat_sport: 30080u16.to_be(),
            nat_dport: 41003u16.to_be(),
            flags: ct_flags::REPLY,
            ..Default::default()
        };
        pins_update(&previous, &taken, &other_flow);
        assert_eq!(
            run(&mut dp, 41003, 0x02),
            (TC_ACT_REDIRECT, vec![Reason::NatNewFlow])
        );
        let d = dp.maps().conntrack.get(&forward(41003)).unwrap().unwrap();
        assert_ne!(
            d.nat_sport,
            41003u16.to_be(),
            "flow D kept a port taken in the previous map"
        );
        assert!(d.flags & ct_flags::SNAT != 0);
        assert!(dp.maps().conntrack.get(&taken).unwrap().is_none());

        // The resize ends: flow A is merged, the previous map is out of the programs' reach.
        let finished = dp.finish_upgrade().unwrap();
        assert_eq!(finished.leftovers.len(), 1);
        assert!(dp.maps().conntrack.get(&forward(41000)).unwrap().is_some());
        // A, B and D, and the other flow's reply entry.
        assert_eq!(dp.maps().conntrack.len().unwrap(), 7);
        // Flow C: only in the current map now.
        assert_eq!(
            run(&mut dp, 41002, 0x02),
            (TC_ACT_REDIRECT, vec![Reason::NatNewFlow])
        );
        assert_eq!(dp.maps().conntrack.len().unwrap(), 9);
    });
}

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// The uplink's XDP program translates flows from outside with the maps and conntrack TC uses:
/// what goes back out of the uplink unwrapped (a remote backend reached directly, the reply to
/// the client) is rewritten and sent (`XDP_TX`, checksums updated in the frame); a flow into a
/// local pod or through the tunnel is tracked at XDP and left untouched (`to-tc`), and TC then
/// sends it as an established flow with the route XDP cached; ICMP, IP-in-IP and packets to no
/// frontend pass untouched; a malformed header or a frontend without backends is dropped.
#[test]
fn xdp_translates_what_it_can_send_back_out_and_leaves_the_rest_to_tc() {
    let ns = node("x");
    ns.ip(&["route", "add", "10.244.3.0/24", "via", "198.18.0.12"]);
    let up0_mac = ns.mac("up0");
    let pod0_mac = ns.mac("pod0");
    let xdp = Prog::Xdp;
    let tc = Prog::Tc(TcProgram::UplinkIngress);
    let from_client = |sport: u16, dport: u16| {
        tcp(CLIENT, sport, NODE, dport)
            .macs(up0_mac, CLIENT_MAC)
            .build()
    };
    let rows = vec![
        Row {
            what: "XDP: new flow to a remote backend: DNAT and SNAT to the node, back out to node-2",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41001, 30081)),
            action: XDP_TX,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                tcp(NODE, port, REMOTE_POD, 8080)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "XDP: the same flow again, from conntrack",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41001, 30081)),
            action: XDP_TX,
            reason: Reason::NatEstablished,
            out: Out::WithSnatPort(Box::new(move |port| {
                tcp(NODE, port, REMOTE_POD, 8080)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "XDP: the remote backend's reply to the SNAT port, back out to the client",
            program: xdp,
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                tcp(REMOTE_POD, 8080, NODE, port)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: XDP_TX,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30081, CLIENT, 41001)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "TC sees the same reply as XDP saw it: the one conntrack entry serves both",
            program: tc,
            on: "up0",
            input: Input::WithSnatPort(Box::new(move |port| {
                tcp(REMOTE_POD, 8080, NODE, port)
                    .macs(up0_mac, NODE2_MAC)
                    .build()
            })),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatReply,
            out: Out::Bytes(
                tcp(NODE, 30081, CLIENT, 41001)
                    .macs(CLIENT_MAC, up0_mac)
                    .build(),
            ),
        },
        Row {
            what: "XDP: new UDP flow with a checksum: updated in the frame",
            program: xdp,
            on: "up0",
            input: Input::Bytes(
                udp(CLIENT, 41002, NODE, 30054)
                    .payload(13)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: XDP_TX,
            reason: Reason::NatNewFlow,
            out: Out::Snat(Box::new(move |port| {
                udp(NODE, port, REMOTE_POD, 53)
                    .payload(13)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "XDP: a UDP datagram sent without checksum keeps none",
            program: xdp,
            on: "up0",
            input: Input::Bytes(
                udp(CLIENT, 41002, NODE, 30054)
                    .payload(13)
                    .no_l4_checksum()
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: XDP_TX,
            reason: Reason::NatEstablished,
            out: Out::WithSnatPort(Box::new(move |port| {
                udp(NODE, port, REMOTE_POD, 53)
                    .payload(13)
                    .no_l4_checksum()
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "XDP: new flow to a local backend: tracked, left to TC untouched",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41003, 30080)),
            action: XDP_PASS,
            reason: Reason::PassToTc,
            out: Out::Same,
        },
        Row {
            what: "TC: that flow is established, sent into the pod's veth by the cached route",
            program: tc,
            on: "up0",
            input: Input::Bytes(from_client(41003, 30080)),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Bytes(
                tcp(CLIENT, 41003, LOCAL_POD, 8080)
                    .macs(POD_MAC, pod0_mac)
                    .build(),
            ),
        },
        Row {
            what: "XDP: its next packet, also left to TC",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41003, 30080)),
            action: XDP_PASS,
            reason: Reason::PassToTc,
            out: Out::Same,
        },
        Row {
            what: "XDP: new flow to a backend in a block reached in IP-in-IP: left to TC",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41004, 30085)),
            action: XDP_PASS,
            reason: Reason::PassToTc,
            out: Out::Same,
        },
        Row {
            what: "TC: that flow goes out of the uplink for its egress hook to wrap",
            program: tc,
            on: "up0",
            input: Input::Bytes(from_client(41004, 30085)),
            action: TC_ACT_REDIRECT,
            reason: Reason::NatEstablished,
            out: Out::Snat(Box::new(move |port| {
                tcp(NODE, port, FAR_POD, 8080)
                    .macs(NODE2_MAC, up0_mac)
                    .build()
            })),
        },
        Row {
            what: "XDP: not a frontend: passes",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41005, 22)),
            action: XDP_PASS,
            reason: Reason::PassTcp,
            out: Out::Same,
        },
        Row {
            what: "XDP: a frontend without backends: refused",
            program: xdp,
            on: "up0",
            input: Input::Bytes(from_client(41006, 30083)),
            action: XDP_DROP,
            reason: Reason::DropNoBackend,
            out: Out::Same,
        },
        Row {
            what: "XDP: ICMP passes (TC translates errors)",
            program: xdp,
            on: "up0",
            input: Input::Bytes(
                pkt()
                    .ipv4(CLIENT, NODE)
                    .icmp_echo()
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: XDP_PASS,
            reason: Reason::PassIcmp,
            out: Out::Same,
        },
        Row {
            what: "XDP: IP-in-IP from node-2 passes (TC unwraps it)",
            program: xdp,
            on: "up0",
            input: Input::Bytes({
                let inner = tcp(REMOTE_POD, 8080, LOCAL_POD, 41000).build();
                packets::ipip(&inner, NODE2, NODE, 7)
            }),
            action: XDP_PASS,
            reason: Reason::PassOtherL4,
            out: Out::Same,
        },
        Row {
            what: "XDP: a total length beyond the frame: dropped",
            program: xdp,
            on: "up0",
            input: Input::Bytes(
                tcp(CLIENT, 41007, NODE, 30081)
                    .tot_len(900)
                    .macs(up0_mac, CLIENT_MAC)
                    .build(),
            ),
            action: XDP_DROP,
            reason: Reason::DropMalformedIpv4,
            out: Out::Same,
        },
    ];

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        backend(&mut dp, 1, LOCAL_POD, 8080, proto::TCP, true);
        backend(&mut dp, 2, REMOTE_POD, 8080, proto::TCP, false);
        backend(&mut dp, 4, REMOTE_POD, 53, proto::UDP, false);
        backend(&mut dp, 5, FAR_POD, 8080, proto::TCP, false);
        frontend(&mut dp, 30080, proto::TCP, 1, 0, &[1]);
        frontend(&mut dp, 30081, proto::TCP, 2, 0, &[2]);
        frontend(&mut dp, 30083, proto::TCP, 4, 0, &[]);
        frontend(&mut dp, 30054, proto::UDP, 5, 0, &[4]);
        frontend(&mut dp, 30085, proto::TCP, 6, 0, &[5]);
        dp.maps_mut()
            .tunnels
            .insert(&ferrox_datapath::Tunnel {
                prefix: "10.244.3.0/24".parse().unwrap(),
                remote: std::net::Ipv4Addr::from(NODE2),
                flags: ferrox_abi::tunnel_flags::IPIP,
            })
            .unwrap();
        let up0 = ferrox_datapath::ifindex("up0").unwrap();
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
        let mut snat_port = 0u16;
        let mut failures = play(&mut dp, &rows, &mut snat_port);
        // The tunnelled flow's cached route says the uplink wraps it.
        let far = dp
            .maps()
            .conntrack
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.sport == 41004u16.to_be() && k.saddr == be(CLIENT));
        match far {
            Some((_, e)) if e.fwd_flags & ferrox_abi::fwd_flags::ENCAP != 0 => {}
            other => failures.push(format!(
                "the tunnelled flow's entry has no encap flag: {other:?}"
            )),
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
