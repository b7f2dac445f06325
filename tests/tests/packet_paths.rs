//! Cluster tier: what real clients send through the per-packet paths. Large UDP datagrams (IP
//! fragments) through a NodePort to local and remote backends and through the pod-interface
//! fallback; a NodePort whose backend is a host-network process of the node the traffic enters;
//! a pod's own `127.0.0.1:<nodePort>`, which stays the pod's; a datagram too big for the tunnel
//! answered with a fragmentation-needed the client learns its path MTU from.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::collections::BTreeMap;

use ferrox::services::{
    model::Scope,
    testing::{slice, svc},
};
use ferrox_tests::harness::{Cluster, Place, wait_for};
use serde_json::Value;

/// `count` UDP datagrams of `size` bytes from `from` to `target`: the backends that answered
/// (each echo checked whole), and the errors.
fn udp_calls(
    from: &Place,
    target: &str,
    size: usize,
    count: usize,
) -> (BTreeMap<String, usize>, Vec<Value>) {
    let n = count.to_string();
    let size = size.to_string();
    let (_, lines) = from.run(&["call", "udp", target, "--count", &n, "--size", &size]);
    let mut answers = BTreeMap::new();
    let mut errors = Vec::new();
    for l in lines {
        match l["backend"].as_str() {
            Some(b) => *answers.entry(b.to_owned()).or_default() += 1,
            None => errors.push(l),
        }
    }
    (answers, errors)
}

#[test]
fn large_udp_datagrams_cross_every_per_packet_path_in_fragments() {
    let c = Cluster::builder().nodes(2).build();
    let (n1, n2) = (c.node(1), c.node(2));
    let local = c.add_pod(1, "local");
    let remote = c.add_pod(2, "remote");
    let client = c.add_pod(1, "client");
    let _s1 = local.serve(8053);
    let _s2 = remote.serve(8053);
    // One Service per backend, so each path is taken for sure.
    for (name, ip, port, backend, node) in [
        ("to-local", "10.96.5.1", 30531, &local, "node-1"),
        ("to-remote", "10.96.5.2", 30532, &remote, "node-2"),
    ] {
        c.api().apply(
            &svc(name)
                .node_port_type()
                .cluster_ip(ip)
                .port_np("dns", 53, port, "UDP")
                .build(),
        );
        c.api().apply(
            &slice(name, &format!("{name}-1"))
                .port("dns", 8053, "UDP")
                .ready_on(backend.ip, node)
                .build(),
        );
    }
    for (fe, scope) in [
        ("198.18.0.11:30531/UDP", Scope::External),
        ("198.18.0.11:30532/UDP", Scope::External),
        ("10.96.5.1:53/UDP", Scope::Internal),
        ("10.96.5.2:53/UDP", Scope::Internal),
    ] {
        n1.wait_for_entry(fe, scope, 1);
    }
    let outside = c.external_client();
    let unhooked = c.unhooked(&client);
    for size in [100, 1400, 3000, 8000] {
        for (from, target, want) in [
            (&*outside, "198.18.0.11:30531", "local"),
            (&*outside, "198.18.0.11:30532", "remote"),
            (&unhooked, "10.96.5.1:53", "local"),
            (&unhooked, "10.96.5.2:53", "remote"),
        ] {
            let (answers, errors) = udp_calls(from, target, size, 5);
            assert_eq!(
                answers.get(want),
                Some(&5),
                "{size}-byte datagrams from {} to {target}: {answers:?}, errors {errors:?}",
                from.name
            );
        }
    }
    // The later fragments were translated as their first ones (counted apart), none was lost
    // for want of its first.
    let counters: Value = serde_json::from_str(&n1.ferrox(&["counters", "-o", "json"])).unwrap();
    let count = |reason: &str| -> u64 {
        counters
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["reason"] == reason)
            .map(|r| r["packets"].as_u64().unwrap())
            .sum()
    };
    assert!(count("nat-fragment") > 0, "{counters}");
    assert_eq!(count("fragment-unknown"), 0, "{counters}");
    let _ = n2;
}

#[test]
fn a_host_network_backend_serves_node_ports_on_its_own_node_and_through_others() {
    let c = Cluster::builder().nodes(2).build();
    let n1 = c.node(1);
    // A host-network server on node-1 (an ingress controller, say), TCP and UDP on 8090.
    let host = n1.host();
    let _srv = host.spawn(&[
        "serve",
        "--name",
        "node-1-host",
        "--tcp",
        "8090",
        "--udp",
        "8090",
    ]);
    c.api().apply(
        &svc("ingress")
            .node_port_type()
            .cluster_ip("10.96.6.1")
            .port_np("tcp", 80, 30610, "TCP")
            .port_np("udp", 80, 30611, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("ingress", "ingress-1")
            .port("tcp", 8090, "TCP")
            .port("udp", 8090, "UDP")
            .ready_on(n1.addr, "node-1")
            .build(),
    );
    for n in c.nodes() {
        n.wait_for_entry(&format!("{}:30610/TCP", n.addr), Scope::External, 1);
        n.wait_for_entry(&format!("{}:30611/UDP", n.addr), Scope::External, 1);
    }
    let outside = c.external_client();
    for entry in ["198.18.0.11", "198.18.0.12"] {
        let (tcp, _) = outside.call_tcp(&format!("{entry}:30610"), 5);
        assert_eq!(
            tcp.get("node-1-host"),
            Some(&5),
            "TCP entering {entry}: {tcp:?}"
        );
        let (udp, errors) = udp_calls(&outside, &format!("{entry}:30611"), 64, 5);
        assert_eq!(
            udp.get("node-1-host"),
            Some(&5),
            "UDP entering {entry}: {udp:?} {errors:?}"
        );
    }
    // Entering node-1 itself, the client's address is what the host process saw (no SNAT for
    // a local backend).
    let (_, lines) = outside.run(&["call", "tcp", "198.18.0.11:30610"]);
    assert_eq!(
        lines[0]["seen_by_backend"]
            .as_str()
            .map(|s| s.split(':').next()),
        Some(Some(outside.ip.to_string().as_str())),
        "{lines:?}"
    );
}

#[test]
fn a_pods_own_loopback_is_never_a_node_port() {
    let c = Cluster::builder().nodes(1).build();
    let n1 = c.node(1);
    let web = c.add_pod(1, "web");
    let _web = web.serve(8080);
    c.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip("10.96.6.2")
            .port_np("", 80, 30620, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-1")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    n1.wait_for_entry("127.0.0.1:30620/TCP", Scope::Internal, 1);
    // A pod listening on the NodePort's number on its own loopback reaches itself.
    let other = c.add_pod(1, "other");
    let _own = other.serve(30620);
    let (own, _) = other.call_tcp("127.0.0.1:30620", 3);
    assert_eq!(own.get("other"), Some(&3), "{own:?}");
    // The node's own 127.0.0.1:<nodePort> is the Service.
    let (node, _) = n1.host().call_tcp("127.0.0.1:30620", 3);
    assert_eq!(node.get("web"), Some(&3), "{node:?}");
}

#[test]
fn a_datagram_too_big_for_the_tunnel_teaches_the_client_its_path_mtu() {
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_TUNNEL_MODE", "always")
        .build();
    let n1 = c.node(1);
    let remote = c.add_pod(2, "remote");
    let _srv = remote.serve(8053);
    c.api().apply(
        &svc("dns")
            .node_port_type()
            .cluster_ip("10.96.6.3")
            .port_np("dns", 53, 30630, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("dns", "dns-1")
            .port("dns", 8053, "UDP")
            .ready_on(remote.ip, "node-2")
            .build(),
    );
    n1.wait_for_entry("198.18.0.11:30630/UDP", Scope::External, 1);
    let outside = c.external_client();
    // 1472 bytes of UDP: a 1500-byte packet with don't-fragment set (Linux's default), 20
    // bytes too many for IP-in-IP. The first is answered with a fragmentation-needed for 1480
    // in the client's own addresses; the client's kernel learns the path MTU and fragments the
    // next ones, which arrive.
    wait_for(
        "a 1472-byte datagram to be answered",
        std::time::Duration::from_secs(20),
        || {
            let (answers, errors) = udp_calls(&outside, "198.18.0.11:30630", 1472, 1);
            if answers.get("remote") == Some(&1) {
                Ok(())
            } else {
                Err(format!("{errors:?}"))
            }
        },
    );
    let route = String::from_utf8_lossy(
        &outside
            .command_output("ip", &["route", "get", "198.18.0.11"])
            .stdout,
    )
    .to_string();
    assert!(
        route.contains("mtu 1480"),
        "the client learned no path MTU: {route}"
    );
    let counters: Value = serde_json::from_str(&n1.ferrox(&["counters", "-o", "json"])).unwrap();
    assert!(
        counters
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["reason"] == "too-big" && r["packets"].as_u64().unwrap() > 0),
        "{counters}"
    );
}
