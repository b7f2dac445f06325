//! Cluster tier: clients outside every node reach NodePorts, LoadBalancer IPs and externalIPs
//! through a node's uplink, where the per-packet NAT translates them: backends on the same node
//! see the client's address, backends on another node are reached through SNAT (unless
//! externalTrafficPolicy is Local, which keeps the client's address and only serves from nodes
//! with local endpoints).
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
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, Place};

/// `count` TCP calls from `from` to `target`: (backend -> calls, backend -> client addresses it saw).
fn calls(
    from: &Place,
    target: &str,
    count: usize,
) -> (BTreeMap<String, usize>, BTreeMap<String, Vec<String>>) {
    let (status, lines) = from.run(&["call", "tcp", target, "--count", &count.to_string()]);
    assert!(
        status.success(),
        "calls from {} to {target} failed: {lines:?}",
        from.name
    );
    let mut n = BTreeMap::new();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in &lines {
        let b = l["backend"].as_str().unwrap().to_owned();
        *n.entry(b.clone()).or_default() += 1;
        seen.entry(b).or_default().push(
            l["seen_by_backend"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned(),
        );
    }
    (n, seen)
}

#[test]
fn node_port_from_outside_reaches_local_and_remote_backends() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip("10.96.2.10")
            .port_np("http", 80, 30080, "TCP")
            .port_np("dns", 53, 30053, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("web", "w")
            .port("http", 8080, "TCP")
            .port("dns", 8080, "UDP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    c.node(1)
        .wait_for_entry("198.18.0.11:30080/TCP", Scope::External, 2);
    c.node(1)
        .wait_for_entry("198.18.0.11:30053/UDP", Scope::External, 2);

    let (by_backend, seen) = calls(&outside, "198.18.0.11:30080", 40);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    // Same node: the backend sees the client. Other node: SNAT, it sees node-1.
    assert!(
        seen["web-1"].iter().all(|s| s == "198.18.0.200"),
        "{seen:?}"
    );
    assert!(seen["web-2"].iter().all(|s| s == "198.18.0.11"), "{seen:?}");

    // UDP through the same NodePort: replies come from the address the client sent to.
    let (by_backend, froms) = outside.call_udp("198.18.0.11:30053", 30);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    assert!(froms.iter().all(|f| f == "198.18.0.11:30053"), "{froms:?}");

    // Node-1 translated those flows: new flows, established packets and replies were counted.
    let maps = Maps::open(&c.node(1).layout()).unwrap();
    let get = |r| maps.counters.get(Hook::TcUplinkIngress, r).unwrap().packets;
    assert!(get(Reason::NatNewFlow) >= 70, "{}", get(Reason::NatNewFlow));
    assert!(get(Reason::NatEstablished) > 0);
    assert!(
        get(Reason::NatReply) > 0,
        "replies of SNATed flows come back through the uplink"
    );
    let from_pod = maps
        .counters
        .get(Hook::TcFromPod, Reason::NatReply)
        .unwrap()
        .packets;
    assert!(
        from_pod > 0,
        "replies of the local backend are translated as they leave the pod"
    );
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_serves_only_where_endpoints_are() {
    let c = Cluster::builder().nodes(2).build();
    let web = c.add_pod(1, "web");
    let _s = web.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("local")
            .node_port_type()
            .cluster_ip("10.96.2.20")
            .port_np("", 80, 30090, "TCP")
            .external_traffic_policy("Local")
            .build(),
    );
    c.api().apply(
        &slice("local", "l")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    c.node(1)
        .wait_for_entry("198.18.0.11:30090/TCP", Scope::External, 1);
    c.node(2)
        .wait_for_entry("198.18.0.12:30090/TCP", Scope::External, 0);

    let (by_backend, seen) = calls(&outside, "198.18.0.11:30090", 10);
    assert_eq!(by_backend.get("web"), Some(&10));
    assert!(
        seen["web"].iter().all(|s| s == "198.18.0.200"),
        "the client's address is kept: {seen:?}"
    );

    // Node-2 has no local endpoint: it does not serve the NodePort, and says why.
    let (status, lines) =
        outside.run(&["call", "tcp", "198.18.0.12:30090", "--timeout-ms", "1000"]);
    assert!(!status.success(), "{lines:?}");
    let maps = Maps::open(&c.node(2).layout()).unwrap();
    assert!(
        maps.counters
            .get(Hook::TcUplinkIngress, Reason::DropNoBackend)
            .unwrap()
            .packets
            >= 1
    );
}

#[test]
fn load_balancer_ips_and_external_ips_from_outside() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("lb")
            .load_balancer("203.0.113.10")
            .external_ip("192.0.2.10")
            .cluster_ip("10.96.2.30")
            .port_np("", 80, 30100, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("lb", "l")
            .port("", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    c.node(1)
        .wait_for_entry("203.0.113.10:80/TCP", Scope::External, 2);
    c.node(1)
        .wait_for_entry("192.0.2.10:80/TCP", Scope::External, 2);
    // The network in front of the cluster sends these addresses to node-1.
    outside.route("203.0.113.10/32", c.node(1).addr);
    outside.route("192.0.2.10/32", c.node(1).addr);
    for target in ["203.0.113.10:80", "192.0.2.10:80"] {
        let (status, lines) = outside.run(&["call", "tcp", target, "--count", "30"]);
        assert!(status.success(), "{target}: {lines:?}");
        let backends: std::collections::BTreeSet<_> = lines
            .iter()
            .map(|l| l["backend"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(backends.len(), 2, "{target}: {backends:?}");
        assert!(
            lines.iter().all(|l| l["peer"] == target),
            "{target}: the client talks to the address it dialled"
        );
    }
}
