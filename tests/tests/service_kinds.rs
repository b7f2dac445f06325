//! Cluster tier: every kind of Service frontend as this node's own clients (pods and host
//! processes) reach it through the socket hooks, and the Service features that decide where
//! those connections go: internalTrafficPolicy, sessionAffinity, terminating endpoints,
//! skipped Services, and the health servers load balancers probe.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeSet, time::Duration};

use ferrox::services::{
    model::Scope,
    testing::{slice, svc},
};
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, wait_for};

fn backends(by_backend: &std::collections::BTreeMap<String, usize>) -> Vec<&str> {
    by_backend.keys().map(String::as_str).collect()
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_from_pods_and_from_the_node() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    c.api().apply(
        &svc("web")
            .load_balancer("203.0.113.10")
            .cluster_ip("10.96.1.10")
            .external_ip("192.0.2.10")
            .port_np("http", 80, 30080, "TCP")
            .port_np("dns", 53, 30053, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-1")
            .port("http", 8080, "TCP")
            .port("dns", 8080, "UDP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    let n1 = c.node(1);
    for fe in [
        "10.96.1.10:80/TCP",
        "198.18.0.11:30080/TCP",
        "127.0.0.1:30080/TCP",
        "203.0.113.10:80/TCP",
        "192.0.2.10:80/TCP",
    ] {
        n1.wait_for_backends(fe, 2);
    }
    // The external scope exists for the node's address, not for loopback or the ClusterIP.
    n1.wait_for_entry("198.18.0.11:30080/TCP", Scope::External, 2);
    let rows = n1.services();
    assert!(
        !rows
            .iter()
            .any(|r| r.scope == Scope::External && r.frontend.starts_with("127.")),
        "{rows:#?}"
    );
    assert!(
        !rows
            .iter()
            .any(|r| r.scope == Scope::External && r.frontend.starts_with("10.96.")),
        "{rows:#?}"
    );

    // (A pod's own 127.0.0.1 is the pod's: loopback NodePorts are the host's only, below and
    // in packet_paths.rs.)
    for target in [
        "10.96.1.10:80",
        "198.18.0.11:30080",
        "203.0.113.10:80",
        "192.0.2.10:80",
    ] {
        let (by_backend, peers) = client.call_tcp(target, 20);
        assert_eq!(
            backends(&by_backend),
            ["web-1", "web-2"],
            "{target}: {by_backend:?}"
        );
        assert!(
            peers.iter().all(|p| p == target),
            "{target}: the application sees the frontend: {peers:?}"
        );
    }
    // The node's own processes (kubelet, host-network pods) get the same translation.
    let host = n1.host();
    for target in ["10.96.1.10:80", "127.0.0.1:30080", "198.18.0.11:30080"] {
        let (by_backend, _) = host.call_tcp(target, 20);
        assert_eq!(
            backends(&by_backend),
            ["web-1", "web-2"],
            "host -> {target}: {by_backend:?}"
        );
    }
    // UDP through a NodePort: the reply comes from the address the client sent to.
    let (by_backend, froms) = client.call_udp("198.18.0.11:30053", 20);
    assert_eq!(backends(&by_backend), ["web-1", "web-2"]);
    assert!(froms.iter().all(|f| f == "198.18.0.11:30053"), "{froms:?}");
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client1 = c.add_pod(1, "client-1");
    let client2 = c.add_pod(2, "client-2");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    c.api().apply(
        &svc("local")
            .cluster_ip("10.96.1.20")
            .port("", 80, "TCP")
            .internal_traffic_policy("Local")
            .build(),
    );
    c.api().apply(
        &slice("local", "l")
            .port("", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    c.node(1).wait_for_backends("10.96.1.20:80/TCP", 1);
    c.node(2).wait_for_backends("10.96.1.20:80/TCP", 1);
    let (on1, _) = client1.call_tcp("10.96.1.20:80", 20);
    let (on2, _) = client2.call_tcp("10.96.1.20:80", 20);
    assert_eq!(backends(&on1), ["web-1"]);
    assert_eq!(backends(&on2), ["web-2"]);
}

#[test]
fn session_affinity_pins_each_client_until_the_timeout_or_until_its_backend_leaves() {
    let c = Cluster::builder().nodes(1).build();
    let pods: Vec<_> = (1..=3).map(|i| c.add_pod(1, &format!("web-{i}"))).collect();
    let _servers: Vec<_> = pods.iter().map(|p| p.serve(8080)).collect();
    let client_a = c.add_pod(1, "client-a");
    let client_b = c.add_pod(1, "client-b");
    let timeout_s = 2;
    c.api().apply(
        &svc("sticky")
            .cluster_ip("10.96.1.30")
            .port("", 80, "TCP")
            .session_affinity(Some(timeout_s))
            .build(),
    );
    let mut sl = slice("sticky", "s").port("", 8080, "TCP");
    for p in &pods {
        sl = sl.ready_on(p.ip, "node-1");
    }
    c.api().apply(&sl.build());
    let n = c.node(1);
    let row = n.wait_for_backends("10.96.1.30:80/TCP", 3);
    assert_eq!(row.affinity_timeout, Some(timeout_s as u32));
    let counters = || {
        let maps = Maps::open(&n.layout()).unwrap();
        let fresh = maps
            .counters
            .get(Hook::SockConnect4, Reason::TranslateToBackend)
            .unwrap()
            .packets;
        let pinned = maps
            .counters
            .get(Hook::SockConnect4, Reason::TranslateAffinity)
            .unwrap()
            .packets;
        (fresh, pinned)
    };

    // 50 connections from one client land on one backend: one fresh choice, 49 by affinity.
    let (a, _) = client_a.call_tcp("10.96.1.30:80", 50);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(counters(), (1, 49));
    let (b, _) = client_b.call_tcp("10.96.1.30:80", 50);
    assert_eq!(b.len(), 1, "client b sticks too: {b:?}");
    assert_eq!(counters(), (2, 98));

    // After the timeout without traffic, the next connection is a fresh choice. Waiting the
    // timeout out is the behaviour under test: the kernel entry expires by the clock.
    std::thread::sleep(Duration::from_secs(timeout_s as u64) + Duration::from_millis(500));
    let (again, _) = client_a.call_tcp("10.96.1.30:80", 10);
    assert_eq!(again.len(), 1);
    assert_eq!(
        counters(),
        (3, 107),
        "one fresh choice after expiry, then affinity again"
    );

    // The backend client a is pinned to leaves: its affinity entry is released, so its next
    // connection cannot go to it, and it sticks to the new choice.
    let pinned_to = again.keys().next().unwrap().clone();
    let mut sl = slice("sticky", "s").port("", 8080, "TCP");
    for p in pods.iter().filter(|p| p.name != pinned_to) {
        sl = sl.ready_on(p.ip, "node-1");
    }
    c.api().apply(&sl.build());
    n.wait_for_backends("10.96.1.30:80/TCP", 2);
    let (after, _) = client_a.call_tcp("10.96.1.30:80", 20);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(
        !after.contains_key(&pinned_to),
        "{pinned_to} left the Service but still got connections: {after:?}"
    );
}

#[test]
fn terminating_endpoints_serve_only_when_no_ready_one_is_left_and_skipped_services_program_nothing()
{
    let c = Cluster::builder().nodes(1).build();
    let ready = c.add_pod(1, "ready");
    let draining = c.add_pod(1, "draining");
    let client = c.add_pod(1, "client");
    let _s1 = ready.serve(8080);
    let _s2 = draining.serve(8080);
    let n = c.node(1);
    c.api().apply(
        &svc("roll")
            .cluster_ip("10.96.1.40")
            .port("", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("roll", "r")
            .port("", 8080, "TCP")
            .ready(ready.ip)
            .terminating_serving(draining.ip)
            .build(),
    );
    n.wait_for_backends("10.96.1.40:80/TCP", 1);
    let (by_backend, _) = client.call_tcp("10.96.1.40:80", 20);
    assert_eq!(backends(&by_backend), ["ready"]);

    c.api().apply(
        &slice("roll", "r")
            .port("", 8080, "TCP")
            .terminating_serving(draining.ip)
            .build(),
    );
    let row = wait_for(
        "the draining endpoint to take over",
        Duration::from_secs(30),
        || {
            let rows = n.services();
            match rows.into_iter().find(|r| r.frontend == "10.96.1.40:80/TCP") {
                Some(r) if r.backends.len() == 1 && r.backends[0].terminating => Ok(r),
                other => Err(format!("{other:?}")),
            }
        },
    );
    assert_eq!(row.backends[0].address, format!("{}:8080", draining.ip));
    let (by_backend, _) = client.call_tcp("10.96.1.40:80", 20);
    assert_eq!(backends(&by_backend), ["draining"]);

    // Headless and ExternalName Services produce no frontend at all.
    c.api().apply(
        &svc("headless")
            .cluster_ip("None")
            .port("", 80, "TCP")
            .build(),
    );
    c.api()
        .apply(&svc("ext").external_name("example.org").build());
    c.api().apply(
        &slice("headless", "h")
            .port("", 8080, "TCP")
            .ready(ready.ip)
            .build(),
    );
    c.api().apply(
        &svc("marker")
            .cluster_ip("10.96.1.41")
            .port("", 80, "TCP")
            .build(),
    );
    n.wait_for_backends("10.96.1.41:80/TCP", 0);
    let frontends: BTreeSet<String> = n.services().into_iter().map(|r| r.frontend).collect();
    assert_eq!(
        frontends,
        BTreeSet::from([
            "10.96.1.40:80/TCP".to_owned(),
            "10.96.1.41:80/TCP".to_owned()
        ])
    );
}

#[test]
fn health_check_node_ports_follow_local_endpoints_and_healthz_answers() {
    let c = Cluster::builder().nodes(2).build();
    let web = c.add_pod(1, "web");
    let _s = web.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("lb")
            .load_balancer("203.0.113.50")
            .cluster_ip("10.96.1.50")
            .port_np("", 80, 30050, "TCP")
            .external_traffic_policy("Local")
            .health_check_node_port(32050)
            .build(),
    );
    c.api().apply(
        &slice("lb", "l")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    c.node(1)
        .wait_for_entry("198.18.0.11:30050/TCP", Scope::External, 1);
    c.node(2)
        .wait_for_entry("198.18.0.12:30050/TCP", Scope::External, 0);

    let probe = |node_ip: &str, want: u16| {
        wait_for(
            &format!("health of {node_ip}:32050 to be {want}"),
            Duration::from_secs(30),
            || {
                let (status, body) = outside.http_get(&format!("{node_ip}:32050"), "/");
                if status == want {
                    Ok(body)
                } else {
                    Err(format!("{status} {body}"))
                }
            },
        )
    };
    let on1 = probe("198.18.0.11", 200);
    assert_eq!(on1["localEndpoints"], 1);
    assert_eq!(on1["service"]["name"], "lb");
    let on2 = probe("198.18.0.12", 503);
    assert_eq!(on2["localEndpoints"], 0);

    // The endpoint moves to node-2: the answers follow.
    let moved = c.add_pod(2, "web-2");
    let _s2 = moved.serve(8080);
    c.api().apply(
        &slice("lb", "l")
            .port("", 8080, "TCP")
            .ready_on(moved.ip, "node-2")
            .build(),
    );
    probe("198.18.0.12", 200);
    probe("198.18.0.11", 503);

    // kube-proxy's /healthz.
    for node_ip in ["198.18.0.11", "198.18.0.12"] {
        let (status, body) = outside.http_get(&format!("{node_ip}:10256"), "/healthz");
        assert_eq!(status, 200, "{node_ip}: {body}");
        assert_eq!(body["healthy"], true);
    }
}
