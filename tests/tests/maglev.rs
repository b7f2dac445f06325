//! Cluster tier: Maglev backend choice for traffic from outside the cluster. The network in
//! front of a cluster (ECMP, a router failing over) may send one client flow to any node; every
//! node must pick the same backend for it, and when a backend leaves, only the flows that were
//! on it may move.
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
use ferrox_tests::harness::{Cluster, ExternalClient};

const LB_IP: &str = "203.0.113.20";
const UDP_FLOWS: usize = 240;
const TCP_FLOWS: usize = 120;
const UDP_BASE: u16 = 20000;
const TCP_BASE: u16 = 24000;

/// The same client flows (fixed source ports) to the LoadBalancer IP: flow -> backend name.
fn flows(outside: &ExternalClient) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (proto, count, base) in [("udp", UDP_FLOWS, UDP_BASE), ("tcp", TCP_FLOWS, TCP_BASE)] {
        let (status, lines) = outside.run(&[
            "call",
            proto,
            &format!("{LB_IP}:80"),
            "--count",
            &count.to_string(),
            "--source-port",
            &base.to_string(),
        ]);
        assert!(status.success(), "{proto} calls failed: {lines:?}");
        assert_eq!(lines.len(), count);
        for l in lines {
            let flow = format!("{proto} {}", l["local"].as_str().unwrap());
            out.insert(flow, l["backend"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(out.len(), UDP_FLOWS + TCP_FLOWS, "every flow is distinct");
    out
}

#[test]
fn every_node_picks_the_same_backend_and_a_removed_backend_moves_only_its_flows() {
    let c = Cluster::builder().nodes(3).build();
    let names = ["web-a", "web-b", "web-c", "web-d", "web-e", "web-f"];
    let pods: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| c.add_pod(i % 3 + 1, n))
        .collect();
    let _servers: Vec<_> = pods.iter().map(|p| p.serve(8080)).collect();
    c.api().apply(
        &svc("lb")
            .load_balancer(LB_IP)
            .cluster_ip("10.96.3.20")
            .port_np("tcp", 80, 30300, "TCP")
            .port_np("udp", 80, 30301, "UDP")
            .build(),
    );
    let endpoints = |pods: &[&ferrox_tests::harness::Pod]| {
        let mut s = slice("lb", "m")
            .port("tcp", 8080, "TCP")
            .port("udp", 8080, "UDP");
        for p in pods {
            s = s.ready_on(p.ip, &format!("node-{}", p.node));
        }
        s.build()
    };
    c.api().apply(&endpoints(&pods.iter().collect::<Vec<_>>()));
    for node in c.nodes() {
        for proto in ["TCP", "UDP"] {
            node.wait_for_entry(&format!("{LB_IP}:80/{proto}"), Scope::External, 6);
        }
    }
    // Identical tables are one array: the TCP frontends (the LoadBalancer IP, each NodePort
    // address) share one, the UDP ones another.
    let status: serde_json::Value =
        serde_json::from_str(&c.node(1).ferrox(&["status", "-o", "json"])).unwrap();
    let maglev = &status["maglev"];
    eprintln!("maglev usage on node-1: {maglev}");
    assert_eq!(maglev["tables"], 2, "{maglev}");
    assert!(maglev["frontends"].as_u64().unwrap() >= 4, "{maglev}");
    let outside = c.external_client();

    // The same flows through node-1, then through node-2.
    outside.route(&format!("{LB_IP}/32"), c.node(1).addr);
    let via_1 = flows(&outside);
    outside.route(&format!("{LB_IP}/32"), c.node(2).addr);
    let via_2 = flows(&outside);
    let differ: Vec<_> = via_1
        .iter()
        .filter(|(flow, b)| via_2[*flow] != **b)
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} flows got another backend through node-2, e.g. {:?}",
        differ.len(),
        via_1.len(),
        &differ[..differ.len().min(5)]
    );
    let mut share: BTreeMap<&str, usize> = BTreeMap::new();
    for b in via_1.values() {
        *share.entry(b).or_default() += 1;
    }
    assert_eq!(share.len(), 6, "every backend gets flows: {share:?}");
    eprintln!("flows per backend: {share:?}");

    // One backend leaves; node-3 has seen none of these flows (no conntrack entry), so its
    // choice is Maglev's alone.
    let gone = "web-c";
    let remaining: Vec<_> = pods.iter().filter(|p| p.name != gone).collect();
    c.api().apply(&endpoints(&remaining));
    for proto in ["TCP", "UDP"] {
        c.node(3)
            .wait_for_entry(&format!("{LB_IP}:80/{proto}"), Scope::External, 5);
    }
    outside.route(&format!("{LB_IP}/32"), c.node(3).addr);
    let after = flows(&outside);
    let mut forced = 0;
    let mut extra = Vec::new();
    for (flow, before) in &via_1 {
        let now = &after[flow];
        assert_ne!(now, gone, "{flow} still reaches the removed backend");
        if before == gone {
            forced += 1;
        } else if now != before {
            extra.push((flow, before, now));
        }
    }
    eprintln!(
        "backend {gone} removed: {forced} of {} flows had to move, {} others moved",
        via_1.len(),
        extra.len()
    );
    assert!(forced > 0, "{gone} had flows before it left");
    // Maglev moves at most about 1% of the other slots for one change among 6 backends; a
    // choice that rehashed (or was random) would move about 5 in 6 of them.
    assert!(
        extra.len() * 100 <= 3 * (via_1.len() - forced),
        "{} flows moved between backends that stayed: {extra:?}",
        extra.len()
    );
}
