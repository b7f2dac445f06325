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

use std::{collections::BTreeMap, time::Duration};

use ferrox::services::{
    model::Scope,
    testing::{slice, svc},
};
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, Place, wait_for};

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
    // Every TCP connection is a new flow; UDP requests are one flow per source port, and the
    // client's kernel may hand a port out again, so only the two flows that reached the two
    // backends are certain.
    let new_flows = get(Reason::NatNewFlow);
    assert!((42..=70).contains(&new_flows), "{new_flows} new flows");
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

    // Node-1 hands the translated packets for its own backend straight into the pod
    // (bpf_redirect_peer): web-1's eth0 receives them, its host veth transmits none (an ARP
    // probe of the host at most).
    let (tx0, rx0) = c.delivery_counters(&web1);
    let (by_backend, _) = calls(&outside, "198.18.0.11:30080", 20);
    let to_web1 = by_backend.get("web-1").copied().unwrap_or(0) as u64;
    let (tx1, rx1) = c.delivery_counters(&web1);
    assert!(to_web1 > 0, "{by_backend:?}");
    assert!(
        rx1 - rx0 >= 3 * to_web1,
        "web-1 received {} packets for {to_web1} connections",
        rx1 - rx0
    );
    assert!(
        tx1 - tx0 <= 2,
        "web-1's host veth transmitted {} packets for {} web-1 received",
        tx1 - tx0,
        rx1 - rx0
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

/// Runs one call of `proto` from `from` to `target` with a short timeout; true when answered.
fn answered(from: &Place, proto: &str, target: &str) -> bool {
    let (status, _) = from.run(&["call", proto, target, "--timeout-ms", "500"]);
    status.success()
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_and_count_the_others() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let allowed = c.external_client();
    let denied = c.external_client();
    assert_ne!(allowed.ip, denied.ip);
    let service = |ranges: &[&str]| {
        svc("lb")
            .load_balancer("203.0.113.30")
            .cluster_ip("10.96.2.40")
            .port_np("tcp", 80, 30400, "TCP")
            .port_np("udp", 80, 30401, "UDP")
            .source_ranges(ranges)
            .build()
    };
    let allowed_range = format!("{}/32", allowed.ip);
    c.api().apply(&service(&[&allowed_range, "192.0.2.0/24"]));
    c.api().apply(
        &slice("lb", "l")
            .port("tcp", 8080, "TCP")
            .port("udp", 8080, "UDP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    for proto in ["TCP", "UDP"] {
        c.node(1)
            .wait_for_entry(&format!("203.0.113.30:80/{proto}"), Scope::External, 2);
    }
    for client in [&allowed, &denied] {
        client.route("203.0.113.30/32", c.node(1).addr);
    }
    let maps = Maps::open(&c.node(1).layout()).unwrap();
    let denials = || {
        maps.counters
            .get(Hook::TcUplinkIngress, Reason::DropSourceRange)
            .unwrap()
            .packets
    };
    let denied_before = denials();

    // The listed client reaches both backends over TCP and UDP.
    let (n, _) = calls(&allowed, "203.0.113.30:80", 20);
    assert_eq!(n.len(), 2, "{n:?}");
    let (n, _) = allowed.call_udp("203.0.113.30:80", 20);
    assert_eq!(n.len(), 2, "{n:?}");
    assert_eq!(
        denials(),
        denied_before,
        "nothing of the listed client was dropped"
    );

    // The other one does not, and every attempt is counted.
    assert!(!answered(&denied, "tcp", "203.0.113.30:80"));
    assert!(!answered(&denied, "udp", "203.0.113.30:80"));
    assert!(
        denials() >= denied_before + 2,
        "a TCP SYN and a datagram counted as source-range-denied"
    );
    // The same count on the node's /metrics, as Prometheus scrapes it.
    let metric = |name: &str| -> f64 {
        let (status, lines) = c
            .node(1)
            .host()
            .run(&["http-get", "127.0.0.1:10249", "/metrics"]);
        assert!(status.success(), "{lines:?}");
        assert_eq!(lines[0]["status"], 200);
        let body = lines[0]["body"].as_str().unwrap().to_owned();
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    };
    let denied_metric = r#"ferrox_datapath_packets_total{hook="tc-uplink-ingress",verdict="drop",reason="source-range-denied"}"#;
    assert_eq!(metric(denied_metric) as u64, denials());
    assert!(metric(r#"ferrox_sync_total{kind="full"}"#) >= 1.0);
    assert_eq!(metric("ferrox_cni_ready"), 1.0);
    assert!(
        metric(r#"ferrox_ipam_addresses{state="used"}"#) >= 1.0,
        "the backend pods"
    );
    assert_eq!(metric(r#"ferrox_ipam_addresses{state="capacity"}"#), 254.0);
    assert!(metric(r#"ferrox_map_entries{map="services"}"#) >= 2.0);
    assert!(metric(r#"ferrox_map_capacity{map="conntrack"}"#) > 0.0);
    assert!(metric(r#"ferrox_programmed{object="source-range"}"#) >= 2.0);
    // The ranges guard the load balancer's address only, as with kube-proxy: the node port of
    // the same Service stays open.
    assert!(answered(
        &denied,
        "tcp",
        &format!("{}:30400", c.node(1).addr)
    ));

    // Listing it admits it, without touching the established list.
    let denied_range = format!("{}/32", denied.ip);
    c.api().apply(&service(&[&allowed_range, &denied_range]));
    wait_for(
        "the second client to be admitted",
        Duration::from_secs(30),
        || {
            if answered(&denied, "tcp", "203.0.113.30:80") {
                Ok(())
            } else {
                Err("refused".into())
            }
        },
    );
    assert!(answered(&denied, "udp", "203.0.113.30:80"));
    assert!(answered(&allowed, "tcp", "203.0.113.30:80"));
    // Unlisting the first one shuts it out.
    c.api().apply(&service(&[&denied_range]));
    wait_for(
        "the first client to be refused",
        Duration::from_secs(30),
        || {
            if answered(&allowed, "tcp", "203.0.113.30:80") {
                Err("still admitted".into())
            } else {
                Ok(())
            }
        },
    );
}

#[test]
fn a_udp_flow_whose_backend_leaves_moves_to_a_live_one() {
    let c = Cluster::builder().nodes(2).build();
    let pods = [c.add_pod(1, "dns-1"), c.add_pod(2, "dns-2")];
    let mut servers: BTreeMap<String, _> = pods
        .iter()
        .map(|p| (p.name.clone(), p.serve(5353)))
        .collect();
    let outside = c.external_client();
    c.api().apply(
        &svc("dns")
            .load_balancer("203.0.113.53")
            .cluster_ip("10.96.2.53")
            .port_np("dns", 53, 30053, "UDP")
            .build(),
    );
    let endpoints = |pods: &[&ferrox_tests::harness::Pod]| {
        let mut s = slice("dns", "d").port("dns", 5353, "UDP");
        for p in pods {
            s = s.ready_on(p.ip, &format!("node-{}", p.node));
        }
        s.build()
    };
    c.api().apply(&endpoints(&[&pods[0], &pods[1]]));
    c.node(1)
        .wait_for_entry("203.0.113.53:53/UDP", Scope::External, 2);
    outside.route("203.0.113.53/32", c.node(1).addr);
    let maps = Maps::open(&c.node(1).layout()).unwrap();

    // One flow: the same source port every time, as a resolver's long-lived socket.
    let ask = || {
        let (status, lines) = outside.run(&[
            "call",
            "udp",
            "203.0.113.53:53",
            "--source-port",
            "25353",
            "--timeout-ms",
            "1000",
        ]);
        status
            .success()
            .then(|| lines[0]["backend"].as_str().unwrap().to_owned())
    };
    let first = ask().expect("the flow is answered");
    for _ in 0..5 {
        assert_eq!(
            ask().as_deref(),
            Some(first.as_str()),
            "a flow keeps its backend"
        );
    }
    let flows = || {
        maps.conntrack
            .entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.proto == 17)
            .count()
    };
    assert!(flows() >= 2, "the flow is tracked (forward and reply)");

    // Its backend goes away: the process ends and the endpoint leaves the slice.
    drop(servers.remove(&first));
    let rest: Vec<&ferrox_tests::harness::Pod> = pods.iter().filter(|p| p.name != first).collect();
    c.api().apply(&endpoints(&rest));
    c.node(1)
        .wait_for_entry("203.0.113.53:53/UDP", Scope::External, 1);
    // The same flow is answered by the backend that is left, at once: its conntrack entry went
    // with the backend instead of steering it into the void until it times out.
    let next = wait_for(
        "the flow to be answered again",
        Duration::from_secs(10),
        || ask().ok_or_else(|| "no answer".to_owned()),
    );
    assert_eq!(next, rest[0].name);
    assert!(
        c.node(1)
            .agent_log()
            .iter()
            .any(|l| l.contains("service maps synced") && !l.contains("flows_purged=0")),
        "the agent reports the purged flows"
    );
}

#[test]
fn conntrack_forgets_finished_and_idle_flows_and_keeps_live_ones() {
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_CT_UDP_TIMEOUT", "2")
        .agent_env("FERROX_CT_TCP_CLOSE_TIMEOUT", "1")
        .agent_env("FERROX_CT_TCP_TIMEOUT", "3600")
        .agent_env("FERROX_CT_GC_INTERVAL", "1")
        .build();
    let web = c.add_pod(2, "web");
    let _s = web.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("np")
            .node_port_type()
            .cluster_ip("10.96.2.60")
            .port_np("tcp", 80, 30500, "TCP")
            .port_np("udp", 80, 30501, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("np", "n")
            .port("tcp", 8080, "TCP")
            .port("udp", 8080, "UDP")
            .ready_on(web.ip, "node-2")
            .build(),
    );
    let node = c.node(1);
    for port in ["30500/TCP", "30501/UDP"] {
        node.wait_for_entry(&format!("{}:{port}", node.addr), Scope::External, 1);
    }
    let maps = Maps::open(&node.layout()).unwrap();
    let tracked = |proto: u8| {
        maps.conntrack
            .entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.proto == proto)
            .count()
    };

    // A long-lived connection, five finished ones, five UDP flows: all tracked.
    let mut stream = outside.spawn(&["stream", &format!("{}:30500", node.addr)]);
    stream.wait_for_line("stream progress", Duration::from_secs(10), |l| {
        l.starts_with("progress ")
    });
    let (n, _) = calls(&outside, &format!("{}:30500", node.addr), 5);
    assert_eq!(n.values().sum::<usize>(), 5);
    // Fixed source ports: five distinct flows (random ephemeral ports could repeat one).
    let (status, lines) = outside.run(&[
        "call",
        "udp",
        &format!("{}:30501", node.addr),
        "--count",
        "5",
        "--source-port",
        "33000",
    ]);
    assert!(status.success(), "{lines:?}");
    assert_eq!(tracked(6), 12, "6 connections, 2 entries each");
    assert_eq!(tracked(17), 10, "5 flows, 2 entries each");

    // The finished connections go after the closing timeout, the UDP flows after their idle
    // timeout; the live connection stays (2 entries).
    wait_for(
        "finished and idle flows to go",
        Duration::from_secs(30),
        || match (tracked(6), tracked(17)) {
            (2, 0) => Ok(()),
            other => Err(format!("(tcp, udp) entries: {other:?}")),
        },
    );
    // It stays across further collections, and keeps flowing.
    let rounds = |log: &[String]| log.iter().filter(|l| l.contains("conntrack GC")).count();
    let seen = rounds(&node.agent_log());
    wait_for("three more collections", Duration::from_secs(30), || {
        let now = rounds(&node.agent_log());
        if now >= seen + 3 {
            Ok(())
        } else {
            Err(format!("{} rounds", now - seen))
        }
    });
    assert_eq!(tracked(6), 2, "the live connection is still tracked");
    let progress = |p: &ferrox_tests::harness::Proc| {
        p.lines()
            .iter()
            .rev()
            .find_map(|l| {
                l.strip_prefix("progress ")
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let before = progress(&stream);
    stream.wait_for_line("more progress", Duration::from_secs(10), |l| {
        l.strip_prefix("progress ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > before)
    });
    let status = stream.signal_and_wait(libc::SIGTERM);
    assert!(
        status.success(),
        "the stream saw no error: {:?}",
        stream.lines()
    );
}

#[test]
fn session_affinity_pins_an_outside_client_to_one_backend() {
    let c = Cluster::builder().nodes(2).build();
    let pods = [
        c.add_pod(1, "web-1"),
        c.add_pod(2, "web-2"),
        c.add_pod(2, "web-3"),
    ];
    let _servers: Vec<_> = pods.iter().map(|p| p.serve(8080)).collect();
    let service = |affinity: bool| {
        let s = svc("sticky")
            .load_balancer("203.0.113.70")
            .cluster_ip("10.96.2.70")
            .port_np("", 80, 30700, "TCP");
        if affinity {
            s.session_affinity(Some(600)).build()
        } else {
            s.build()
        }
    };
    let mut sl = slice("sticky", "st").port("", 8080, "TCP");
    for p in &pods {
        sl = sl.ready_on(p.ip, &format!("node-{}", p.node));
    }
    c.api().apply(&sl.build());
    c.api().apply(&service(false));
    c.node(1)
        .wait_for_entry("203.0.113.70:80/TCP", Scope::External, 3);
    let outside = c.external_client();
    outside.route("203.0.113.70/32", c.node(1).addr);
    // Without affinity, new connections (new source ports) spread over the backends.
    let (n, _) = calls(&outside, "203.0.113.70:80", 30);
    assert_eq!(n.len(), 3, "{n:?}");
    // With it, 50 connections from the client land on one backend.
    c.api().apply(&service(true));
    wait_for("the affinity flag", Duration::from_secs(30), || {
        let row = c
            .node(1)
            .services()
            .into_iter()
            .find(|r| r.frontend == "203.0.113.70:80/TCP" && r.scope == Scope::External)
            .ok_or("no entry")?;
        if row.flags.contains(&"affinity") {
            Ok(())
        } else {
            Err(format!("{:?}", row.flags))
        }
    });
    let (n, _) = calls(&outside, "203.0.113.70:80", 50);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n.values().sum::<usize>(), 50);
}

/// NodePort flows from outside translated at XDP on node-1's uplink (`mode`: native or
/// generic): every flow is created there (TC creates none); flows to the backend on node-2 and
/// their replies are translated and sent back out of the uplink at XDP (SNAT to node-1, checked
/// by the backend and by the client's replies, whose checksums the receivers verify); flows to
/// the local backend are left to TC (`to-tc`), which sends them into the pod.
fn node_port_translated_at_xdp(mode: &str) {
    let c = Cluster::builder().nodes(2).xdp(mode).build();
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
    let maps = Maps::open(&c.node(1).layout()).unwrap();
    let get = |h, r| maps.counters.get(h, r).unwrap().packets;
    let tc_new0 = get(Hook::TcUplinkIngress, Reason::NatNewFlow);

    let (by_backend, seen) = calls(&outside, "198.18.0.11:30080", 40);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    assert!(
        seen["web-1"].iter().all(|s| s == "198.18.0.200"),
        "{seen:?}"
    );
    assert!(seen["web-2"].iter().all(|s| s == "198.18.0.11"), "{seen:?}");
    let (by_backend_udp, froms) = outside.call_udp("198.18.0.11:30053", 30);
    assert_eq!(
        by_backend_udp.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend_udp:?}"
    );
    assert!(froms.iter().all(|f| f == "198.18.0.11:30053"), "{froms:?}");

    let xdp = |r| get(Hook::XdpUplink, r);
    let web2_tcp = by_backend["web-2"] as u64;
    assert_eq!(
        get(Hook::TcUplinkIngress, Reason::NatNewFlow) - tc_new0,
        0,
        "every flow from outside is created at XDP"
    );
    // Every connection to web-2 is sent on at XDP, but the first may find node-2's neighbour
    // entry not yet resolved (XDP leaves that packet to TC, which resolves it).
    assert!(
        xdp(Reason::NatNewFlow) + 1 >= web2_tcp,
        "{} new flows sent at XDP for {web2_tcp} TCP connections to web-2",
        xdp(Reason::NatNewFlow)
    );
    assert!(
        xdp(Reason::NatEstablished) >= web2_tcp,
        "{} established packets sent at XDP",
        xdp(Reason::NatEstablished)
    );
    assert!(
        xdp(Reason::NatReply) >= web2_tcp,
        "{} replies from web-2 sent back to the client at XDP",
        xdp(Reason::NatReply)
    );
    let web1_tcp = by_backend["web-1"] as u64;
    assert!(
        xdp(Reason::PassToTc) >= web1_tcp,
        "{} packets of flows to the local backend left to TC for {web1_tcp} connections",
        xdp(Reason::PassToTc)
    );
    assert!(
        get(Hook::TcUplinkIngress, Reason::NatEstablished) > 0,
        "TC sends the local backend's flows"
    );
}

#[test]
fn node_port_flows_are_translated_at_native_xdp() {
    node_port_translated_at_xdp("native");
}

#[test]
fn node_port_flows_are_translated_at_generic_xdp() {
    node_port_translated_at_xdp("generic");
}
