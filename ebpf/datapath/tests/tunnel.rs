//! Datapath tier: IP-in-IP encapsulation (uplink egress) and decapsulation (uplink ingress),
//! driven with BPF_PROG_TEST_RUN inside a scratch network namespace with a local pod and a
//! remote pod block. One table: the program, the packet in, the action, every counter cell that
//! must move (and no other), and the packet that must come out. Needs root.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use ferrox_abi::{
    COUNTER_SLOTS, DatapathConfig, EndpointInfo, EndpointKey, Hook, NodeInfo, Reason, counter_cell,
    counter_index, endpoint_flags, node_flags, tunnel_flags,
};
use ferrox_datapath::{Datapath, TcProgram, Tunnel, bpffs::ScratchBpffs};

mod netns;
mod packets;
use netns::NetNs;
use packets::{checksum, ipip, pkt};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const NODE: [u8; 4] = [198, 18, 0, 11];
const NODE2: [u8; 4] = [198, 18, 0, 12];
const STRANGER: [u8; 4] = [198, 18, 0, 201];
const CLIENT: [u8; 4] = [198, 18, 0, 200];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 6];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];

fn be(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// The node: uplink `up0` (198.18.0.11/24) with node-2 as a neighbour, a pod veth `pod0`.
fn node() -> NetNs {
    let ns = NetNs::new(format!("fxt-tun{}", std::process::id()));
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
    ns.ip(&[
        "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
    ]);
    for dev in ["up0", "up0p", "pod0", "pod0p"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["addr", "add", "198.18.0.11/24", "dev", "up0"]);
    ns.ip(&["route", "add", "10.244.1.5/32", "dev", "pod0"]);
    ns.ip(&[
        "route",
        "add",
        "10.244.2.0/24",
        "via",
        "198.18.0.12",
        "mtu",
        "1480",
    ]);
    ns
}

struct Row {
    what: &'static str,
    program: TcProgram,
    input: Vec<u8>,
    action: i32,
    /// Every counter cell that must move by one.
    counted: Vec<(Hook, Reason)>,
    /// `None`: the packet must come out unchanged.
    out: Option<Vec<u8>>,
}

fn counters(dp: &Datapath) -> Vec<u64> {
    (0..COUNTER_SLOTS)
        .map(|i| match counter_cell(i) {
            Some((h, r)) => dp.maps().counters.get(h, r).unwrap().packets,
            None => 0,
        })
        .collect()
}

#[test]
fn pod_traffic_is_encapsulated_to_remote_blocks_and_decapsulated_only_from_nodes() {
    let ns = node();
    let up0_mac = ns.mac("up0");
    let to_remote = pkt()
        .ipv4(LOCAL_POD, REMOTE_POD)
        .id(0x1234)
        .dont_fragment()
        .tcp(40000, 8080)
        .payload(100)
        .macs(NODE2_MAC, up0_mac)
        .build();
    let reply = pkt()
        .ipv4(REMOTE_POD, LOCAL_POD)
        .dont_fragment()
        .tcp(8080, 40000)
        .macs(up0_mac, NODE2_MAC)
        .build();
    let to_node = pkt()
        .ipv4(REMOTE_POD, NODE)
        .udp(5000, 53)
        .payload(8)
        .macs(up0_mac, NODE2_MAC)
        .build();
    let egress = |what, input: Vec<u8>, action, reason, out| Row {
        what,
        program: TcProgram::UplinkEgress,
        input,
        action,
        counted: vec![(Hook::TcUplinkEgress, reason)],
        out,
    };
    let ingress = |what, input: Vec<u8>, action, counted: &[Reason], out| Row {
        what,
        program: TcProgram::UplinkIngress,
        input,
        action,
        counted: counted
            .iter()
            .map(|r| (Hook::TcUplinkIngress, *r))
            .collect(),
        out,
    };
    let from_pod = |what, input: Vec<u8>, action, reason| Row {
        what,
        program: TcProgram::FromPod,
        input,
        action,
        counted: vec![(Hook::TcFromPod, reason)],
        out: None,
    };
    let rows = vec![
        from_pod(
            "a pod's packet to a remote pod block leaves its veth straight for the uplink (wrapped there)",
            to_remote.clone(),
            TC_ACT_REDIRECT,
            Reason::PodToTunnel,
        ),
        from_pod(
            "a pod's ping to a remote pod block: the same",
            pkt()
                .ipv4(LOCAL_POD, REMOTE_POD)
                .icmp_echo()
                .macs(NODE2_MAC, up0_mac)
                .build(),
            TC_ACT_REDIRECT,
            Reason::PodToTunnel,
        ),
        from_pod(
            "a pod's packet that would not fit the uplink once wrapped: to the host's stack, whose route for the block answers it",
            pkt()
                .ipv4(LOCAL_POD, REMOTE_POD)
                .dont_fragment()
                .tcp(40000, 8080)
                .payload(1460)
                .macs(NODE2_MAC, up0_mac)
                .build(),
            TC_ACT_UNSPEC,
            Reason::PassTcp,
        ),
        from_pod(
            "a pod's packet to an address outside every tunnelled block: to the host's stack",
            pkt()
                .ipv4(LOCAL_POD, CLIENT)
                .tcp(40000, 80)
                .macs(NODE2_MAC, up0_mac)
                .build(),
            TC_ACT_UNSPEC,
            Reason::PassTcp,
        ),
        egress(
            "a pod's packet to a remote pod block: wrapped to that block's node, DF and identification kept",
            to_remote.clone(),
            TC_ACT_UNSPEC,
            Reason::TunnelEncap,
            Some(ipip(&to_remote, NODE, NODE2, 0x1234)),
        ),
        egress(
            "a UDP datagram without DF to a remote pod: wrapped, outer DF clear",
            pkt()
                .ipv4(LOCAL_POD, REMOTE_POD)
                .id(0x0567)
                .udp(5000, 53)
                .payload(30)
                .macs(NODE2_MAC, up0_mac)
                .build(),
            TC_ACT_UNSPEC,
            Reason::TunnelEncap,
            Some(ipip(
                &pkt()
                    .ipv4(LOCAL_POD, REMOTE_POD)
                    .id(0x0567)
                    .udp(5000, 53)
                    .payload(30)
                    .macs(NODE2_MAC, up0_mac)
                    .build(),
                NODE,
                NODE2,
                0x0567,
            )),
        ),
        egress(
            "a packet to an address outside every remote block: untouched",
            pkt()
                .ipv4(NODE, CLIENT)
                .tcp(22, 40000)
                .macs(NODE2_MAC, up0_mac)
                .build(),
            TC_ACT_UNSPEC,
            Reason::PassTcp,
            None,
        ),
        egress(
            "IP-in-IP already: never wrapped twice",
            ipip(&to_remote, NODE, NODE2, 7),
            TC_ACT_UNSPEC,
            Reason::PassOtherL4,
            None,
        ),
        ingress(
            "IP-in-IP from node-2 for a pod here: unwrapped, straight to the pod's veth",
            ipip(&reply, NODE2, NODE, 9),
            TC_ACT_REDIRECT,
            &[Reason::TunnelDecap, Reason::PassTcp],
            Some(reply.clone()),
        ),
        ingress(
            "IP-in-IP from node-2 for the node itself: unwrapped, to the stack",
            ipip(&to_node, NODE2, NODE, 10),
            TC_ACT_UNSPEC,
            &[Reason::TunnelDecap, Reason::PassUdp],
            Some(to_node.clone()),
        ),
        ingress(
            "IP-in-IP from an address that is not a node: dropped, counted",
            ipip(&reply, STRANGER, NODE, 11),
            TC_ACT_SHOT,
            &[Reason::DropTunnelSource],
            None,
        ),
        ingress(
            "IP-in-IP from a node but to another address: not ours to unwrap",
            ipip(&reply, NODE2, CLIENT, 12),
            TC_ACT_UNSPEC,
            &[Reason::PassOtherL4],
            None,
        ),
        ingress(
            "an outer fragment: cannot be unwrapped at TC, dropped",
            {
                let mut p = ipip(&reply, NODE2, NODE, 13);
                p[20] |= 0x20; // more fragments
                let c = {
                    p[24..26].copy_from_slice(&[0, 0]);
                    checksum(&p[14..34])
                };
                p[24..26].copy_from_slice(&c.to_be_bytes());
                p
            },
            TC_ACT_SHOT,
            &[Reason::DropTunnelMalformed],
            None,
        ),
        ingress(
            "IP-in-IP that holds no IPv4 packet: dropped",
            {
                let mut p = ipip(&reply, NODE2, NODE, 14);
                p[34] = 0x65; // inner version 6
                p
            },
            TC_ACT_SHOT,
            &[Reason::DropTunnelMalformed],
            None,
        ),
    ];

    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-dp-test").unwrap();
    let layout = bpffs.layout();
    let failures = ns.run(|| {
        let mut dp = Datapath::open(&layout).unwrap();
        let uplink = ferrox_datapath::ifindex("up0").unwrap();
        let pod0 = ferrox_datapath::ifindex("pod0").unwrap();
        let cfg = DatapathConfig {
            node_addr: be(NODE),
            uplink_ifindex: uplink,
            snat_port_min: 61000,
            snat_port_max: 65535,
            monitor: 0,
        };
        dp.maps_mut().config.set(&cfg).unwrap();
        dp.maps_mut()
            .endpoints
            .insert(
                &EndpointKey {
                    addr: be(LOCAL_POD),
                },
                &EndpointInfo {
                    ifindex: pod0,
                    flags: endpoint_flags::POD,
                },
            )
            .unwrap();
        dp.maps_mut()
            .tunnels
            .insert(&Tunnel {
                prefix: "10.244.2.0/24".parse().unwrap(),
                remote: NODE2.into(),
                flags: tunnel_flags::IPIP,
            })
            .unwrap();
        dp.maps_mut()
            .nodes
            .insert(
                &be(NODE2),
                &NodeInfo {
                    flags: node_flags::TUNNEL_PEER,
                },
            )
            .unwrap();

        let mut failures = Vec::new();
        for row in &rows {
            let on = ferrox_datapath::ifindex("up0").unwrap();
            let before = counters(&dp);
            let out = dp
                .test_run_tc_on(row.program, &row.input, Some(on), 1)
                .unwrap();
            let after = counters(&dp);
            let mut fail = |m: String| failures.push(format!("{}: {m}", row.what));
            if out.action != row.action {
                fail(format!("action {} want {}", out.action, row.action));
            }
            let want_cells: Vec<usize> = row
                .counted
                .iter()
                .map(|(h, r)| counter_index(*h, *r) as usize)
                .collect();
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let want = u64::from(want_cells.contains(&i));
                if a - b != want {
                    fail(format!(
                        "counter {:?} moved by {} want {want}",
                        counter_cell(i as u32),
                        a - b
                    ));
                }
            }
            let (got, want) = match &row.out {
                None => (out.packet.clone(), row.input.clone()),
                Some(want) => (out.packet.clone(), want.clone()),
            };
            if got != want {
                fail(format!("output\n  got  {:02x?}\n  want {:02x?}", got, want));
            }
        }

        // A pod registered with `endpoint_flags::PEER`: the unwrapped packet is addressed to
        // the pod's MAC, which its address gives, and goes straight into the pod.
        dp.maps_mut()
            .endpoints
            .insert(
                &EndpointKey {
                    addr: be(LOCAL_POD),
                },
                &EndpointInfo {
                    ifindex: pod0,
                    flags: endpoint_flags::POD | endpoint_flags::PEER,
                },
            )
            .unwrap();
        let out = dp
            .test_run_tc_on(
                TcProgram::UplinkIngress,
                &ipip(&reply, NODE2, NODE, 9),
                Some(uplink),
                1,
            )
            .unwrap();
        let into_pod = pkt()
            .ipv4(REMOTE_POD, LOCAL_POD)
            .dont_fragment()
            .tcp(8080, 40000)
            .macs(ferrox_abi::pod_mac(be(LOCAL_POD)), NODE2_MAC)
            .build();
        if out.action != TC_ACT_REDIRECT || out.packet != into_pod {
            failures.push(format!(
                "peer pod: action {}\n  got  {:02x?}\n  want {:02x?}",
                out.action, out.packet, into_pod
            ));
        }

        // Without a node address there is no outer source: the packet is dropped and counted,
        // never sent unwrapped.
        dp.maps_mut()
            .config
            .set(&DatapathConfig {
                node_addr: 0,
                ..cfg
            })
            .unwrap();
        let before = dp
            .maps()
            .counters
            .get(Hook::TcUplinkEgress, Reason::DropTunnelEncap)
            .unwrap()
            .packets;
        let out = dp
            .test_run_tc_on(TcProgram::UplinkEgress, &to_remote, Some(uplink), 1)
            .unwrap();
        let after = dp
            .maps()
            .counters
            .get(Hook::TcUplinkEgress, Reason::DropTunnelEncap)
            .unwrap()
            .packets;
        if out.action != TC_ACT_SHOT || after != before + 1 {
            failures.push(format!(
                "no node address: action {} (want {TC_ACT_SHOT}), tunnel-encap-failed moved by {}",
                out.action,
                after - before
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
