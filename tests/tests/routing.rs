//! Cluster tier: routing between nodes. Each agent routes the other nodes' pod blocks (from the
//! Node objects) and, in the IP-in-IP modes, encapsulates in eBPF; the underlay is watched with
//! tcpdump to see what really crosses it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, Node, Pod, wait_for};
use k8s_openapi::{
    api::core::v1::{Node as K8sNode, NodeAddress, NodeSpec, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// The routes the agent owns on `node` (`ip route show proto 243`), one per line.
fn owned_routes(node: &Node) -> Vec<String> {
    node.netns()
        .ip(&["route", "show", "proto", "243"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn counter(node: &Node, hook: Hook, reason: Reason) -> u64 {
    Maps::open(&node.layout())
        .unwrap()
        .counters
        .get(hook, reason)
        .unwrap()
        .packets
}

/// Packets seen on the underlay, split into IP-in-IP ones (outer `a > b`, inner pod addresses)
/// and plain pod packets.
#[derive(Debug, Default)]
struct Seen {
    tunnelled: Vec<(String, String)>,
    plain: usize,
}

fn classify(lines: &[String]) -> Seen {
    let mut seen = Seen::default();
    for l in lines {
        // "12:00:00.000 IP 198.18.0.11 > 198.18.0.12: IP 10.244.1.2.4000 > 10.244.2.2.8080: ..."
        let Some(rest) = l.split_once(" IP ").map(|(_, r)| r) else {
            continue;
        };
        if let Some((outer, inner)) = rest.split_once(": IP ") {
            if inner.starts_with("10.244.") {
                let mut it = outer.split(" > ");
                let (a, b) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
                seen.tunnelled.push((a.to_owned(), b.to_owned()));
            }
        } else if rest.starts_with("10.244.") {
            seen.plain += 1;
        }
    }
    seen
}

/// Pods on three nodes calling each other over TCP and UDP.
fn traffic(a: &Pod, b: &Pod, c: &Pod) {
    for (from, to) in [(a, b), (a, c), (c, a), (b, c)] {
        let target = format!("{}:8080", to.ip);
        let (by, _) = from.call_tcp(&target, 3);
        assert_eq!(
            by.get(&to.name),
            Some(&3),
            "{} -> {}: {by:?}",
            from.name,
            to.name
        );
        let (by, _) = from.call_udp(&target, 3);
        assert_eq!(
            by.get(&to.name),
            Some(&3),
            "{} -> {} UDP: {by:?}",
            from.name,
            to.name
        );
    }
}

/// A 3-node cluster in `mode`, node-3 in a second subnet when `split`, with a serving pod on each
/// node; the pods call each other while the underlay's first subnet is captured.
fn run_mode(mode: &str, split: bool) -> (Cluster, Seen, Pod) {
    run_mode_with(mode, split, &[])
}

/// [`run_mode`] with more agent settings.
fn run_mode_with(mode: &str, split: bool, env: &[(&str, &str)]) -> (Cluster, Seen, Pod) {
    let mut b = Cluster::builder()
        .nodes(3)
        .agent_env("FERROX_TUNNEL_MODE", mode);
    for (k, v) in env {
        b = b.agent_env(k, v);
    }
    if split {
        b = b.second_subnet_from(3);
    }
    let c = b.build();
    let pa = c.add_pod(1, "a");
    let pb = c.add_pod(2, "b");
    let pc = c.add_pod(3, "c");
    let _servers: Vec<_> = [&pa, &pb, &pc].iter().map(|p| p.serve(8080)).collect();
    let capture = c.capture("br0", "ip proto 4 or tcp port 8080 or udp port 8080");
    traffic(&pa, &pb, &pc);
    let seen = classify(&capture.stop());
    (c, seen, pa)
}

/// `ip -o link show eth0` inside the pod.
fn pod_link(pod: &Pod) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pod.netns_path.display()))
        .args(["ip", "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// IP datagrams the node's stack forwarded (`Ip: ForwDatagrams` of its namespace).
fn forwarded(node: &Node) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.netns().name(),
            "cat",
            "/proc/net/snmp",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn node_addr(c: &Cluster, i: usize) -> String {
    c.node(i).addr.to_string()
}

#[test]
fn never_routes_pod_addresses_as_they_are() {
    let (c, seen, pa) = run_mode("never", false);
    assert!(seen.tunnelled.is_empty(), "{seen:?}");
    assert!(seen.plain > 0, "pod packets cross the underlay: {seen:?}");
    let routes = owned_routes(c.node(1));
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with("10.244.2.0/24 via 198.18.0.12 dev eth0")),
        "{routes:?}"
    );
    assert!(routes.iter().all(|r| !r.contains("mtu")), "{routes:?}");
    let link = pod_link(&pa);
    assert!(link.contains("mtu 1500"), "{link}");
}

#[test]
fn always_wraps_every_packet_between_nodes_in_ip_in_ip() {
    let (c, seen, pa) = run_mode("always", true);
    assert_eq!(
        seen.plain, 0,
        "no bare pod address on the underlay: {seen:?}"
    );
    let n1 = node_addr(&c, 1);
    let n2 = node_addr(&c, 2);
    let n3 = node_addr(&c, 3);
    let pair = |a: &str, b: &str| {
        seen.tunnelled
            .iter()
            .any(|(x, y)| (x == a && y == b) || (x == b && y == a))
    };
    assert!(pair(&n1, &n2), "node-1 <-> node-2 in IP-in-IP: {seen:?}");
    assert!(
        pair(&n1, &n3),
        "node-1 <-> node-3 (across the router): {seen:?}"
    );
    let routes = owned_routes(c.node(1));
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with("10.244.3.0/24 via 198.18.0.1 dev eth0")
                && r.contains("mtu lock 1480")),
        "node-3's block via the router, 20 bytes below the uplink, locked (so forwarded, translated packets are held to it too): {routes:?}"
    );
    assert!(counter(c.node(1), Hook::TcUplinkEgress, Reason::TunnelEncap) > 0);
    assert!(counter(c.node(1), Hook::TcUplinkIngress, Reason::TunnelDecap) > 0);

    // Node-1 hands what it unwraps for its pod straight into the pod (bpf_redirect_peer): the
    // pod's eth0 receives every packet, its host veth transmits none of them (an ARP probe of
    // the host at most).
    let _server = pa.serve(8080);
    let client = c.add_pod(3, "c2");
    let (tx0, rx0) = c.delivery_counters(&pa);
    let (by, _) = client.call_tcp(&format!("{}:8080", pa.ip), 10);
    assert_eq!(by.get("a"), Some(&10), "{by:?}");
    let (tx1, rx1) = c.delivery_counters(&pa);
    assert!(rx1 - rx0 >= 30, "the pod received {} packets", rx1 - rx0);
    assert!(
        tx1 - tx0 <= 2,
        "the host veth transmitted {} packets for {} the pod received",
        tx1 - tx0,
        rx1 - rx0
    );

    // What node-1's pod sends to another node's pods goes from its veth straight to the
    // uplink (wrapped there): the node's stack forwards none of it, either way.
    let b = c.add_pod(2, "b2");
    let _b_server = b.serve(8080);
    let (f0, sent0) = (
        forwarded(c.node(1)),
        counter(c.node(1), Hook::TcFromPod, Reason::PodToTunnel),
    );
    let (by, _) = pa.call_tcp(&format!("{}:8080", b.ip), 10);
    assert_eq!(by.get("b2"), Some(&10), "{by:?}");
    let (by, _) = pa.call_udp(&format!("{}:8080", b.ip), 10);
    assert_eq!(by.get("b2"), Some(&10), "{by:?}");
    let sent = counter(c.node(1), Hook::TcFromPod, Reason::PodToTunnel) - sent0;
    assert!(
        sent >= 40,
        "{sent} packets sent from the pod's veth to the uplink"
    );
    assert_eq!(
        forwarded(c.node(1)) - f0,
        0,
        "datagrams node-1's stack forwarded while its pod talked to node-2's ({sent} sent by the pod's veth)"
    );
}

#[test]
fn cross_subnet_wraps_only_what_crosses_the_router() {
    let (c, seen, _) = run_mode("cross-subnet", true);
    let n1 = node_addr(&c, 1);
    let n2 = node_addr(&c, 2);
    let n3 = node_addr(&c, 3);
    assert!(seen.plain > 0, "node-1 <-> node-2 stay plain: {seen:?}");
    assert!(
        seen.tunnelled
            .iter()
            .all(|(a, b)| !((a == &n1 && b == &n2) || (a == &n2 && b == &n1))),
        "nothing wrapped within the subnet: {seen:?}"
    );
    assert!(
        seen.tunnelled.iter().any(|(a, b)| a == &n1 && b == &n3),
        "node-1 -> node-3 wrapped: {seen:?}"
    );
    let tunnels = Maps::open(&c.node(1).layout())
        .unwrap()
        .tunnels
        .entries()
        .unwrap();
    let tunnels: Vec<String> = tunnels
        .iter()
        .map(|t| format!("{} -> {}", t.prefix, t.remote))
        .collect();
    assert_eq!(tunnels, vec![format!("10.244.3.0/24 -> {n3}")]);

    // The CLI shows the same, from the kernel and the pinned maps.
    let json: serde_json::Value =
        serde_json::from_str(&c.node(1).ferrox(&["routes", "-o", "json"])).unwrap();
    let rows: Vec<String> = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} via {} {} remote {} mtu {} problem {}",
                r["prefix"].as_str().unwrap(),
                r["via"][0].as_str().unwrap(),
                r["encap"].as_str().unwrap(),
                r["remote"],
                r["mtu"],
                r["problem"]
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            format!("10.244.2.0/24 via {n2} direct remote null mtu null problem null"),
            // node-1's side of the router.
            format!("10.244.3.0/24 via 198.18.0.1 ipip remote \"{n3}\" mtu 1480 problem null"),
        ]
    );
    assert_eq!(json["tunnelPeers"], serde_json::json!([n2, n3]));
}

/// Sends one IP-in-IP packet (inner: UDP to `pod`) to `node` from inside the network namespace
/// `netns`, through a raw socket: the kernel adds the outer header from the namespace's address.
fn send_ipip(netns: &std::path::Path, node: Ipv4Addr, inner_src: Ipv4Addr, pod: Ipv4Addr) {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).unwrap();
        // SAFETY: setns on this short-lived thread only.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        // SAFETY: plain socket syscalls on values we own.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, 4) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let payload = b"spoofed";
        let mut pkt = vec![0u8; 28 + payload.len()];
        pkt[0] = 0x45;
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        pkt[8] = 64;
        pkt[9] = 17;
        pkt[12..16].copy_from_slice(&inner_src.octets());
        pkt[16..20].copy_from_slice(&pod.octets());
        let mut sum = 0u32;
        for w in pkt[..20].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        pkt[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        pkt[20..22].copy_from_slice(&4000u16.to_be_bytes());
        pkt[22..24].copy_from_slice(&8080u16.to_be_bytes());
        pkt[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pkt[28..].copy_from_slice(payload);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(node.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `pkt` and `addr` outlive the call.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    })
    .join()
    .unwrap();
}

#[test]
fn ip_in_ip_carries_large_transfers_reports_the_path_mtu_and_refuses_strangers() {
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_TUNNEL_MODE", "always")
        .build();
    let pa = c.add_pod(1, "a");
    let pb = c.add_pod(2, "b");
    let _sb = pb.serve(8080);
    let _sa = pa.serve(8080);

    // Pods get the uplink's MTU minus the outer header.
    let link = c.node(1).netns().ip(&["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1500"), "{link}");
    let link = pod_link(&pa);
    assert!(link.contains("mtu 1480"), "{link}");

    // 1 MB each way over one TCP connection (Linux sets DF on TCP), echoed and verified.
    let (status, lines) = pa.run(&["transfer", &format!("{}:8080", pb.ip), "--bytes", "1048576"]);
    assert!(status.success(), "{lines:?}");
    assert_eq!(lines[0]["bytes"], 1_048_576, "{lines:?}");
    println!(
        "figure: 1 MiB echoed over IP-in-IP in {} ms",
        lines[0]["ms"]
    );

    // A pod that believes in a 1500-byte path (both ends of its veth at 1500) sends a full-size
    // packet with DF: the node cannot wrap it, and the pod hears "fragmentation needed, mtu
    // 1480" from the node.
    let in_pod = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", pa.netns_path.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let host_side = &pa.cni_result.interfaces[0].name;
    c.node(1)
        .netns()
        .ip(&["link", "set", host_side, "mtu", "1500"]);
    assert!(
        in_pod(&["ip", "link", "set", "eth0", "mtu", "1500"])
            .status
            .success()
    );
    let ping = in_pod(&[
        "ping",
        "-n",
        "-M",
        "do",
        "-s",
        "1472",
        "-c",
        "2",
        "-W",
        "2",
        &pb.ip.to_string(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(
        text.contains("mtu = 1480") || text.contains("mtu=1480"),
        "the sender learns the path MTU:\n{text}"
    );
    // Smaller packets still pass with DF.
    let ping = in_pod(&[
        "ping",
        "-n",
        "-M",
        "do",
        "-s",
        "1452",
        "-c",
        "1",
        "-W",
        "2",
        &pb.ip.to_string(),
    ]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // IP-in-IP from outside the cluster is dropped and counted, and never reaches the pod.
    let n1 = c.node(1);
    let before = counter(n1, Hook::TcUplinkIngress, Reason::DropTunnelSource);
    let ext = c.external_client();
    send_ipip(&ext.netns_path, n1.addr, pb.ip, pa.ip);
    wait_for(
        "the spoofed packet to be counted",
        Duration::from_secs(5),
        || {
            let now = counter(n1, Hook::TcUplinkIngress, Reason::DropTunnelSource);
            if now > before {
                Ok(())
            } else {
                Err(format!("tunnel-unknown-source at {now}"))
            }
        },
    );
    // The same from node-2 (a node) is unwrapped: the positive control of the check above.
    let decap_before = counter(n1, Hook::TcUplinkIngress, Reason::TunnelDecap);
    send_ipip(&c.node(2).netns().path(), n1.addr, pb.ip, pa.ip);
    wait_for(
        "node-2's packet to be unwrapped",
        Duration::from_secs(5),
        || {
            let now = counter(n1, Hook::TcUplinkIngress, Reason::TunnelDecap);
            if now > decap_before {
                Ok(())
            } else {
                Err(format!("tunnel-decap at {now}"))
            }
        },
    );
}

#[test]
fn routes_follow_nodes_joining_and_leaving_and_stale_ones_go_on_restart() {
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_TUNNEL_MODE", "always")
        .build();
    let n1 = c.node(1);
    // A node joins: its block is routed and tunnelled on node-1.
    let started = Instant::now();
    c.api().apply(&K8sNode {
        metadata: ObjectMeta {
            name: Some("node-9".into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(vec!["10.244.9.0/24".into()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "198.18.0.99".into(),
            }]),
            ..Default::default()
        }),
    });
    wait_for("node-9's route on node-1", Duration::from_secs(10), || {
        let routes = owned_routes(n1);
        if routes
            .iter()
            .any(|r| r.starts_with("10.244.9.0/24 via 198.18.0.99"))
        {
            Ok(())
        } else {
            Err(format!("{routes:?}"))
        }
    });
    let joined = started.elapsed();
    let tunnels = Maps::open(&n1.layout()).unwrap().tunnels.entries().unwrap();
    assert!(
        tunnels
            .iter()
            .any(|t| t.prefix.to_string() == "10.244.9.0/24"
                && t.remote.to_string() == "198.18.0.99"),
        "{tunnels:?}"
    );
    println!(
        "figure: a new node's block routed on another node {:.1} ms after the API write",
        joined.as_secs_f64() * 1e3
    );

    // It leaves: route, tunnel entry and its right to send IP-in-IP go.
    c.api().delete::<K8sNode>(None, "node-9").unwrap();
    wait_for("node-9's route to go", Duration::from_secs(10), || {
        let routes = owned_routes(n1);
        if routes.iter().any(|r| r.starts_with("10.244.9.0/24")) {
            Err(format!("{routes:?}"))
        } else {
            Ok(())
        }
    });
    let maps = Maps::open(&n1.layout()).unwrap();
    assert!(
        !maps
            .tunnels
            .entries()
            .unwrap()
            .iter()
            .any(|t| t.prefix.to_string() == "10.244.9.0/24")
    );
    assert_eq!(
        maps.nodes.len().unwrap(),
        1,
        "only node-2 may send IP-in-IP"
    );

    // A route of ours the API no longer explains (left by a crash) goes when the agent starts;
    // the routes it does explain stay in place across the restart.
    n1.netns().ip(&[
        "route",
        "add",
        "10.250.0.0/24",
        "via",
        "198.18.0.12",
        "proto",
        "243",
    ]);
    let before: Vec<String> = owned_routes(n1)
        .into_iter()
        .filter(|r| !r.starts_with("10.250."))
        .collect();
    n1.kill_agent();
    n1.start_agent();
    n1.wait_agent_ready();
    let after = owned_routes(n1);
    assert_eq!(after, before, "stale route removed, the others unchanged");
}

#[test]
fn a_pools_tunnel_mode_wraps_only_the_traffic_to_blocks_in_that_pool() {
    // Default never; node-3's block is in an always pool: whatever goes to node-3's pods is
    // wrapped, whoever sends it, and everything else crosses the underlay as it is.
    let (c, seen, pa) = run_mode_with(
        "never",
        false,
        &[("FERROX_TUNNEL_MODE_POOLS", "10.244.3.0/24=always")],
    );
    let to: std::collections::BTreeSet<&str> =
        seen.tunnelled.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        to,
        [node_addr(&c, 3).as_str()].into_iter().collect(),
        "only traffic to node-3 is wrapped: {seen:?}"
    );
    let from: std::collections::BTreeSet<&str> =
        seen.tunnelled.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        from,
        [node_addr(&c, 1).as_str(), node_addr(&c, 2).as_str()]
            .into_iter()
            .collect(),
        "{seen:?}"
    );
    assert!(seen.plain > 0, "the rest is not wrapped: {seen:?}");
    for i in 1..=2 {
        let tunnels = Maps::open(&c.node(i).layout())
            .unwrap()
            .tunnels
            .entries()
            .unwrap();
        let got: Vec<String> = tunnels.iter().map(|t| t.prefix.to_string()).collect();
        assert_eq!(got, vec!["10.244.3.0/24"], "node-{i}");
    }
    let status = c.node(1).ferrox(&["status"]);
    assert!(status.contains("never, 10.244.3.0/24=always"), "{status}");
    let link = pod_link(&pa);
    assert!(link.contains("mtu 1480"), "some traffic is wrapped: {link}");
}
