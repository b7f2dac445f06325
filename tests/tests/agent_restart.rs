//! Cluster tier: `kill -9` of the agent in the middle of a TCP stream through a Service. The
//! stream goes on while the agent is dead and after it is back; the restarted agent re-adopts
//! the pinned maps, programs and links (same kernel ids) instead of re-creating them; new
//! connections work throughout. Then SIGTERM: a clean exit that leaves the datapath in place.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::time::Duration;

use ferrox::services::testing::{slice, svc};
use ferrox_tests::harness::{Cluster, Proc};

/// Kernel ids of everything pinned on the node, by pin name.
fn pinned_ids(node: &ferrox_tests::harness::Node) -> Vec<(String, u64)> {
    let out = node.ferrox(&["datapath", "-o", "json"]);
    let objects: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    objects
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_owned(),
                o["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn progress(stream: &Proc) -> u64 {
    stream
        .lines()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("progress ").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Waits until the stream has moved at least `more` bytes past `from`.
fn wait_progress(stream: &Proc, from: u64, more: u64) -> u64 {
    let line = stream.wait_for_line("stream progress", Duration::from_secs(20), |l| {
        l.strip_prefix("progress ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= from + more)
    });
    line["progress ".len()..].parse().unwrap()
}

#[test]
fn a_stream_survives_kill_9_of_the_agent_and_nothing_is_recreated() {
    let c = Cluster::builder().nodes(2).build();
    let server = c.add_pod(2, "server");
    let client = c.add_pod(1, "client");
    let _srv = server.serve(8080);
    c.api().apply(
        &svc("echo")
            .cluster_ip("10.96.0.30")
            .port("", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("echo", "echo-1")
            .port("", 8080, "TCP")
            .ready(server.ip)
            .build(),
    );
    let node = c.node(1);
    node.wait_for_backends("10.96.0.30:80/TCP", 1);

    let mut stream = client.spawn(&["stream", "10.96.0.30:80"]);
    let connected = stream.wait_for_line("stream connected", Duration::from_secs(10), |l| {
        l.contains("\"connected\"")
    });
    assert!(
        connected.contains("10.96.0.30:80"),
        "the application sees the ClusterIP as its peer: {connected}"
    );
    let before_kill = wait_progress(&stream, 0, 64 * 1024);

    let ids_before = pinned_ids(node);
    assert!(
        ids_before.iter().any(|(n, _)| n == "maps/SVC_V1"),
        "{ids_before:?}"
    );
    assert!(
        ids_before
            .iter()
            .any(|(n, _)| n == "links/cgroup_sock_connect4"),
        "{ids_before:?}"
    );
    assert!(
        ids_before.iter().any(|(n, _)| n == "links/uplink_ingress"),
        "{ids_before:?}"
    );

    node.kill_agent();
    // With the agent dead, the stream goes on and new connections are still translated.
    let during = wait_progress(&stream, before_kill, 64 * 1024);
    let (by_backend, _) = client.call_tcp("10.96.0.30:80", 3);
    assert_eq!(by_backend.get("server"), Some(&3));

    node.start_agent();
    node.wait_agent_ready();
    let after_restart = wait_progress(&stream, during, 64 * 1024);
    let (by_backend, _) = client.call_tcp("10.96.0.30:80", 3);
    assert_eq!(by_backend.get("server"), Some(&3));

    // Same maps, programs and links: re-adopted, not re-created.
    assert_eq!(pinned_ids(node), ids_before);
    let log = node.agent_log().join("\n");
    assert!(
        log.contains("Adopted"),
        "the restarted agent reports adoption:\n{log}"
    );

    // The restarted agent still follows the API.
    let second = c.add_pod(2, "second");
    let _srv2 = second.serve(8080);
    c.api().apply(
        &slice("echo", "echo-1")
            .port("", 8080, "TCP")
            .ready(server.ip)
            .ready(second.ip)
            .build(),
    );
    node.wait_for_backends("10.96.0.30:80/TCP", 2);

    // SIGTERM (a rollout): the agent exits cleanly and leaves everything pinned and working.
    let status = node.stop_agent();
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    assert!(
        node.agent_log().iter().any(|l| l.contains("shutting down")),
        "{:?}",
        node.agent_log()
    );
    assert_eq!(pinned_ids(node), ids_before);
    let (by_backend, _) = client.call_tcp("10.96.0.30:80", 4);
    assert_eq!(by_backend.values().sum::<usize>(), 4);
    wait_progress(&stream, after_restart, 64 * 1024);

    let status = stream.signal_and_wait(libc::SIGTERM);
    let summary = stream.lines().last().cloned().unwrap_or_default();
    assert!(
        status.success(),
        "the stream ended with an error: {summary}"
    );
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert!(
        summary["bytes"].as_u64().unwrap() >= after_restart,
        "{summary}"
    );
    assert!(progress(&stream) >= after_restart);
}

/// The number of successful connections a `load` process reported last.
fn load_ok(load: &Proc) -> u64 {
    load.lines()
        .iter()
        .rev()
        .find_map(|l| {
            l.strip_prefix("progress ")
                .and_then(|n| n.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn wait_load(load: &Proc, from: u64, more: u64) -> u64 {
    let line = load.wait_for_line("load progress", Duration::from_secs(20), |l| {
        l.strip_prefix("progress ")
            .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok())
            .is_some_and(|n| n >= from + more)
    });
    line["progress ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn continuous_requests_through_a_node_port_and_a_cluster_ip_see_no_failure_across_kill_9() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip("10.96.3.10")
            .port_np("", 80, 30110, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "w")
            .port("", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    let node = c.node(1);
    node.wait_for_backends("10.96.3.10:80/TCP", 2);
    node.wait_for_entry(
        "198.18.0.11:30110/TCP",
        ferrox::services::model::Scope::External,
        2,
    );

    let mut external = outside.spawn(&["load", "198.18.0.11:30110"]);
    let mut internal = client.spawn(&["load", "10.96.3.10:80"]);
    let e0 = wait_load(&external, 0, 20);
    let i0 = wait_load(&internal, 0, 20);

    node.kill_agent();
    let e1 = wait_load(&external, e0, 20);
    let i1 = wait_load(&internal, i0, 20);
    node.start_agent();
    node.wait_agent_ready();
    wait_load(&external, e1, 20);
    wait_load(&internal, i1, 20);

    for (name, load) in [
        ("external NodePort", &mut external),
        ("pod ClusterIP", &mut internal),
    ] {
        let status = load.signal_and_wait(libc::SIGTERM);
        let summary: serde_json::Value =
            serde_json::from_str(load.lines().last().unwrap()).unwrap();
        assert!(status.success(), "{name}: {summary}");
        assert_eq!(summary["failed"], 0, "{name}: {summary}");
        assert!(summary["ok"].as_u64().unwrap() >= 60, "{name}: {summary}");
        assert!(load_ok(load) > 0);
    }
}

/// `kill -9` and restart of the agents of both nodes, over and over, while clients open
/// connections back to back through a NodePort from outside, a ClusterIP from a pod (the socket
/// hooks) and a ClusterIP from a process the hooks do not see (the per-packet fallback): not
/// one request may fail.
#[test]
fn repeated_kill_9_of_every_agent_under_load_fails_no_request() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip("10.96.3.11")
            .port_np("", 80, 30111, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "w")
            .port("", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    for n in c.nodes() {
        n.wait_for_backends("10.96.3.11:80/TCP", 2);
        n.wait_for_entry(
            &format!("{}:30111/TCP", n.addr),
            ferrox::services::model::Scope::External,
            2,
        );
    }
    let mut loads = [
        (
            "NodePort on node-1 from outside",
            outside.spawn(&["load", "198.18.0.11:30111"]),
        ),
        (
            "NodePort on node-2 from outside",
            outside.spawn(&["load", "198.18.0.12:30111"]),
        ),
        (
            "ClusterIP from a pod",
            client.spawn(&["load", "10.96.3.11:80"]),
        ),
        (
            "ClusterIP through the per-packet fallback",
            c.unhooked(&client).spawn(&["load", "10.96.3.11:80"]),
        ),
    ];
    let mut done: Vec<u64> = loads.iter().map(|(_, l)| wait_load(l, 0, 10)).collect();
    let cycles = 10;
    for _ in 0..cycles {
        for n in c.nodes() {
            n.kill_agent();
        }
        // Requests go on while both agents are dead...
        for (i, (_, l)) in loads.iter().enumerate() {
            done[i] = wait_load(l, done[i], 30);
        }
        for n in c.nodes() {
            n.start_agent();
        }
        for n in c.nodes() {
            n.wait_agent_ready();
        }
        // ...and after they are back, with their start-up work (full sync, routes, conntrack
        // collection) done.
        for (i, (_, l)) in loads.iter().enumerate() {
            done[i] = wait_load(l, done[i], 100);
        }
    }
    let mut report = Vec::new();
    for (name, load) in &mut loads {
        let status = load.signal_and_wait(libc::SIGTERM);
        let summary: serde_json::Value =
            serde_json::from_str(load.lines().last().unwrap()).unwrap();
        report.push(format!("{name}: {summary}"));
        assert!(status.success(), "{name}: {summary}");
    }
    eprintln!("{}", report.join("\n"));
    for line in &report {
        assert!(line.contains("\"failed\":0"), "{}", report.join("\n"));
    }
}

/// Conntrack and reverse-NAT capacity of the node's maps, as `ferrox status` reports them, and
/// whether a resize is still pending (a map under `maps/resize/`).
fn flow_map_capacities(node: &ferrox_tests::harness::Node) -> (u64, u64, u64, bool) {
    let status: serde_json::Value =
        serde_json::from_str(&node.ferrox(&["status", "-o", "json"])).unwrap();
    let cap = |name: &str| {
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {status}"))["capacity"]
            .as_u64()
            .unwrap()
    };
    let pending = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains("resize"));
    (
        cap("conntrack"),
        cap("socket-revnat"),
        cap("affinity"),
        pending,
    )
}

/// The agents restart with other map sizes (smaller, as for a 4 GiB node, then an explicit
/// conntrack size, then the default again) while clients open connections back to back through
/// a NodePort on each node from outside, a ClusterIP from a pod and a ClusterIP through the
/// per-packet fallback, and a pod asks a UDP ClusterIP from a new socket each time (the socket
/// reverse-NAT map): each restart replaces the flow maps with maps of the new size, carries
/// their entries over and moves every hook to them, and not one request fails. (Before the
/// programs looked flows up in both conntrack maps while the hooks moved, a few requests per
/// run timed out; before they told their own map from the previous one there, SYNs were
/// dropped as `snat-exhausted` and retried a second later.)
#[test]
fn restarting_the_agents_with_other_map_sizes_under_load_fails_no_request() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let outside = c.external_client();
    c.api().apply(
        &svc("web")
            .node_port_type()
            .cluster_ip("10.96.3.12")
            .port_np("tcp", 80, 30112, "TCP")
            .port_np("dns", 53, 30113, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("web", "w")
            .port("tcp", 8080, "TCP")
            .port("dns", 8080, "UDP")
            .ready_on(web1.ip, "node-1")
            .ready_on(web2.ip, "node-2")
            .build(),
    );
    for n in c.nodes() {
        n.wait_for_backends("10.96.3.12:80/TCP", 2);
        n.wait_for_backends("10.96.3.12:53/UDP", 2);
        n.wait_for_entry(
            &format!("{}:30112/TCP", n.addr),
            ferrox::services::model::Scope::External,
            2,
        );
    }
    let default = ferrox_datapath::Sizing::for_this_node().unwrap();
    let four_gib = ferrox_datapath::Sizing::for_memory(4 << 30);
    for n in c.nodes() {
        assert_eq!(
            flow_map_capacities(n),
            (
                u64::from(default.conntrack),
                u64::from(default.sock_revnat),
                u64::from(default.affinity),
                false
            )
        );
    }
    let mut loads = [
        (
            "NodePort on node-1 from outside",
            outside.spawn(&["load", "198.18.0.11:30112"]),
        ),
        (
            "NodePort on node-2 from outside",
            outside.spawn(&["load", "198.18.0.12:30112"]),
        ),
        (
            "ClusterIP from a pod",
            client.spawn(&["load", "10.96.3.12:80"]),
        ),
        (
            "ClusterIP through the per-packet fallback",
            c.unhooked(&client).spawn(&["load", "10.96.3.12:80"]),
        ),
        (
            "UDP ClusterIP from a pod, a new socket per request",
            client.spawn(&["load", "--udp", "10.96.3.12:53"]),
        ),
    ];
    let mut done: Vec<u64> = loads.iter().map(|(_, l)| wait_load(l, 0, 10)).collect();
    // (the agent's command-line prefix, the conntrack, reverse-NAT and affinity capacities)
    type Step<'a> = (&'a [&'a str], (u32, u32, u32));
    let steps: [Step; 3] = [
        (
            &["env", "FERROX_MAP_SIZING_MEMORY_MIB=4096"],
            (four_gib.conntrack, four_gib.sock_revnat, four_gib.affinity),
        ),
        (
            &[
                "env",
                "FERROX_MAP_SIZING_MEMORY_MIB=4096",
                "FERROX_MAP_CONNTRACK_ENTRIES=200000",
            ],
            (200_000, four_gib.sock_revnat, four_gib.affinity),
        ),
        (
            &[],
            (default.conntrack, default.sock_revnat, default.affinity),
        ),
    ];
    for (wrapper, (ct, rnat, aff)) in steps {
        let wrapper: Vec<String> = wrapper.iter().map(|s| (*s).to_owned()).collect();
        for n in c.nodes() {
            n.kill_agent();
            n.start_agent_wrapped(&wrapper);
        }
        for n in c.nodes() {
            n.wait_agent_ready();
        }
        for (i, (_, l)) in loads.iter().enumerate() {
            done[i] = wait_load(l, done[i], 100);
        }
        for n in c.nodes() {
            assert_eq!(
                flow_map_capacities(n),
                (u64::from(ct), u64::from(rnat), u64::from(aff), false),
                "{} after a restart with {wrapper:?}",
                n.name
            );
        }
    }
    let mut report = Vec::new();
    for (name, load) in &mut loads {
        let status = load.signal_and_wait(libc::SIGTERM);
        let summary: serde_json::Value =
            serde_json::from_str(load.lines().last().unwrap()).unwrap();
        report.push(format!("{name}: {summary}"));
        assert!(status.success(), "{name}: {summary}");
    }
    eprintln!("{}", report.join("\n"));
    // Where a request was lost, if one was: the drop reasons of both nodes.
    for n in c.nodes() {
        eprintln!("{}: {}", n.name, n.ferrox(&["counters"]));
    }
    for line in &report {
        assert!(line.contains("\"failed\":0"), "{}", report.join("\n"));
    }
}
