//! Cluster tier: `ferrox trace` explains, from the pinned maps and with the agent stopped, what
//! real traffic meets: the Maglev backend of a flow before it is sent, the backend an affinity
//! entry pins a client to, and the drop of a source outside loadBalancerSourceRanges.
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
use ferrox_tests::harness::Cluster;
use serde_json::Value;

#[test]
fn trace_predicts_maglev_explains_affinity_and_source_range_drops_with_the_agent_stopped() {
    let c = Cluster::builder().nodes(2).build();
    let pods = [c.add_pod(1, "w1"), c.add_pod(2, "w2"), c.add_pod(2, "w3")];
    let _servers: Vec<_> = pods.iter().map(|p| p.serve(8080)).collect();
    let addr_of: BTreeMap<String, String> = pods
        .iter()
        .map(|p| (p.name.clone(), format!("{}:8080", p.ip)))
        .collect();
    let a = c.external_client();
    let b = c.external_client();
    for (name, ip, cluster_ip, affinity, ranges) in [
        ("mag", "203.0.113.91", "10.96.4.91", false, vec![]),
        ("sticky", "203.0.113.92", "10.96.4.92", true, vec![]),
        (
            "guarded",
            "203.0.113.93",
            "10.96.4.93",
            false,
            vec![format!("{}/32", a.ip)],
        ),
    ] {
        let ranges: Vec<&str> = ranges.iter().map(String::as_str).collect();
        let s = svc(name)
            .load_balancer(ip)
            .cluster_ip(cluster_ip)
            .port_np("", 80, 0, "TCP")
            .source_ranges(&ranges);
        let s = if affinity {
            s.session_affinity(Some(600))
        } else {
            s
        };
        c.api().apply(&s.build());
        let mut sl = slice(name, &format!("{name}-s")).port("", 8080, "TCP");
        for p in &pods {
            sl = sl.ready_on(p.ip, &format!("node-{}", p.node));
        }
        c.api().apply(&sl.build());
        c.node(1)
            .wait_for_entry(&format!("{ip}:80/TCP"), Scope::External, 3);
        for client in [&a, &b] {
            client.route(&format!("{ip}/32"), c.node(1).addr);
        }
    }
    let node = c.node(1);
    let trace = |src: &str, dst: &str| -> Value {
        serde_json::from_str(&node.ferrox(&["trace", src, dst, "-o", "json"])).unwrap()
    };

    // Maglev: predict the backend of ten flows before they exist (agent running or not: the
    // maps decide), then send them.
    let predicted: Vec<String> = (0..10)
        .map(|i| {
            let t = trace(&format!("{}:{}", a.ip, 31000 + i), "203.0.113.91:80/tcp");
            assert_eq!(t["verdict"], "translated", "{t}");
            assert!(
                t["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["step"] == "maglev"),
                "{t}"
            );
            t["backend"].as_str().unwrap().to_owned()
        })
        .collect();
    let (status, lines) = a.run(&[
        "call",
        "tcp",
        "203.0.113.91:80",
        "--count",
        "10",
        "--source-port",
        "31000",
    ]);
    assert!(status.success(), "{lines:?}");
    let actual: Vec<String> = lines
        .iter()
        .map(|l| addr_of[l["backend"].as_str().unwrap()].clone())
        .collect();
    assert_eq!(predicted, actual, "trace predicted every flow's backend");

    // Affinity: the client lands on one backend; trace names it and says why.
    let (status, lines) = a.run(&["call", "tcp", "203.0.113.92:80", "--count", "5"]);
    assert!(status.success(), "{lines:?}");
    let pinned = lines[0]["backend"].as_str().unwrap().to_owned();
    assert!(lines.iter().all(|l| l["backend"] == pinned.as_str()));

    // From here on the agent is down: trace reads the pinned maps only.
    node.kill_agent();
    let t = trace(&a.ip.to_string(), "203.0.113.92:80/tcp");
    assert_eq!(t["verdict"], "translated", "{t}");
    assert_eq!(t["backend"], addr_of[&pinned].as_str(), "{t}");
    assert!(
        t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "affinity"),
        "{t}"
    );

    // Source ranges: b is not listed.
    let t = trace(&format!("{}:40000", b.ip), "203.0.113.93:80/tcp");
    assert_eq!(t["verdict"], "dropped", "{t}");
    assert_eq!(t["reason"], "source-range-denied");
    let t = trace(&format!("{}:40000", a.ip), "203.0.113.93:80/tcp");
    assert_eq!(t["verdict"], "translated", "{t}");

    // Not a Service, and the human form.
    let t = trace(&a.ip.to_string(), &format!("{}:22/tcp", node.addr));
    assert_eq!(t["verdict"], "passed");
    let text = node.ferrox(&["trace", &b.ip.to_string(), "203.0.113.93:80/tcp"]);
    assert!(text.contains("dropped (source-range-denied)"), "{text}");
    node.start_agent();
    node.wait_agent_ready();
}

#[test]
fn ct_list_shows_flows_flush_forgets_them_and_endpoints_name_the_pods() {
    let c = Cluster::builder().nodes(2).build();
    let local = c.add_pod(1, "local");
    let remote = c.add_pod(2, "remote");
    let _s1 = local.serve(8080);
    let _s2 = remote.serve(8080);
    c.api().apply(
        &svc("np")
            .node_port_type()
            .cluster_ip("10.96.4.50")
            .port_np("", 80, 30450, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("np", "np-s")
            .port("", 8080, "TCP")
            .ready_on(local.ip, "node-1")
            .ready_on(remote.ip, "node-2")
            .build(),
    );
    let node = c.node(1);
    node.wait_for_entry(&format!("{}:30450/TCP", node.addr), Scope::External, 2);
    let outside = c.external_client();
    let target = format!("{}:30450", node.addr);
    let (status, lines) = outside.run(&[
        "call",
        "tcp",
        &target,
        "--count",
        "6",
        "--source-port",
        "32000",
    ]);
    assert!(status.success(), "{lines:?}");
    let list = |args: &[&str]| -> Vec<Value> {
        let mut a = vec!["ct", "list", "-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&node.ferrox(&a)).unwrap()
    };
    let flows = list(&[]);
    assert_eq!(flows.len(), 6, "{flows:#?}");
    for (i, f) in flows.iter().enumerate() {
        assert_eq!(
            f["client"],
            format!("{}:{}", outside.ip, 32000 + i).as_str()
        );
        assert_eq!(f["frontend"], target.as_str());
        assert_eq!(f["reply"], true);
        let to_remote = f["backend"] == format!("{}:8080", remote.ip).as_str();
        let snat = f["flags"].as_array().unwrap().iter().any(|x| x == "snat");
        assert_eq!(snat, to_remote, "SNAT exactly for the remote backend: {f}");
    }
    // Filters.
    let to_local = list(&["--addr", &local.ip.to_string()]);
    assert!(
        to_local
            .iter()
            .all(|f| f["backend"] == format!("{}:8080", local.ip).as_str())
    );
    assert_eq!(list(&["--port", "32003"]).len(), 1);
    assert!(list(&["--proto", "udp"]).is_empty());

    // Flush the flows to the remote backend; the others stay.
    let remote_flows = list(&["--addr", &remote.ip.to_string()]).len();
    let out = node.ferrox(&["ct", "flush", "--addr", &remote.ip.to_string()]);
    assert!(
        out.contains(&format!("removed {} conntrack entries", remote_flows * 2)),
        "{out}"
    );
    assert_eq!(list(&[]).len(), 6 - remote_flows);

    // Endpoints: the local pod with its veth.
    let eps: Vec<Value> = serde_json::from_str(&node.ferrox(&["endpoints", "-o", "json"])).unwrap();
    let me = eps
        .iter()
        .find(|e| e["ip"] == local.ip.to_string().as_str())
        .expect("the local pod is an endpoint");
    assert_eq!(
        me["veth"],
        ferrox_cni::pod::host_ifname(&local.container_id, "eth0").as_str()
    );
    assert_eq!(me["pod"], "default/local");
    assert!(
        !eps.iter()
            .any(|e| e["ip"] == remote.ip.to_string().as_str())
    );
}

#[test]
fn status_reports_agent_maps_attachments_and_warns_when_the_agent_is_down() {
    let c = Cluster::builder().nodes(1).build();
    let web = c.add_pod(1, "web");
    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.4.60")
            .port("", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-s")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    let node = c.node(1);
    node.wait_for_backends("10.96.4.60:80/TCP", 1);
    let status =
        || -> Value { serde_json::from_str(&node.ferrox(&["status", "-o", "json"])).unwrap() };
    let s = status();
    assert!(s["agent"]["pid"].as_u64().unwrap() > 0, "{s:#}");
    assert_eq!(s["agent"]["frontends"], 1);
    assert!(s["agent"]["syncs_full"].as_u64().unwrap() >= 1);
    assert_eq!(s["datapath_loaded"], true);
    let services = s["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "services")
        .unwrap()
        .clone();
    assert_eq!(services["entries"], 2, "a master and a slot: {services}");
    assert_eq!(services["capacity"], ferrox_abi::capacity::SERVICES);
    let targets: Vec<String> = s["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].as_str().unwrap().to_owned())
        .collect();
    let veth = ferrox_cni::pod::host_ifname(&web.container_id, "eth0");
    assert!(
        targets.iter().any(|t| t.starts_with("cgroup ")),
        "{targets:?}"
    );
    assert!(
        targets.iter().any(|t| t.starts_with("tcx eth0")),
        "{targets:?}"
    );
    assert!(targets.iter().any(|t| t.contains(&veth)), "{targets:?}");
    assert_eq!(s["ipam"]["used"], 1);
    assert_eq!(s["warnings"], serde_json::json!([]), "{s:#}");

    // The agent goes: status still reads the node, and says so.
    node.kill_agent();
    let s = status();
    assert!(s["agent"].is_null());
    assert_eq!(s["datapath_loaded"], true);
    assert!(
        s["warnings"][0]
            .as_str()
            .unwrap()
            .contains("does not answer"),
        "{s:#}"
    );
    let text = node.ferrox(&["status"]);
    assert!(
        text.contains("NOT RUNNING") && text.contains("WARNING"),
        "{text}"
    );
    node.start_agent();
    node.wait_agent_ready();
}

#[test]
fn monitor_streams_a_source_range_drop_and_a_service_translation() {
    let c = Cluster::builder().nodes(1).build();
    let web = c.add_pod(1, "web");
    let client = c.add_pod(1, "client");
    let _s = web.serve(8080);
    let allowed = c.external_client();
    let denied = c.external_client();
    c.api().apply(
        &svc("guarded")
            .load_balancer("203.0.113.95")
            .cluster_ip("10.96.4.95")
            .port_np("", 80, 0, "TCP")
            .source_ranges(&[&format!("{}/32", allowed.ip)])
            .build(),
    );
    c.api().apply(
        &slice("guarded", "guarded-s")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    let node = c.node(1);
    node.wait_for_entry("203.0.113.95:80/TCP", Scope::External, 1);
    node.wait_for_backends("10.96.4.95:80/TCP", 1);
    denied.route("203.0.113.95/32", node.addr);
    let maps = ferrox_datapath::Maps::open(&node.layout()).unwrap();
    assert_eq!(maps.config.get().unwrap().monitor, 0, "nobody listens yet");

    let mut cmd = std::process::Command::new(ferrox_tests::harness::bin_path("ferrox"));
    cmd.args(["monitor", "-o", "json"])
        .env("FERROX_BPFFS_ROOT", node.layout().root());
    let mut monitor = node.spawn("monitor", cmd);
    ferrox_tests::harness::wait_for(
        "the monitor to listen",
        std::time::Duration::from_secs(10),
        || {
            if maps.config.get().unwrap().monitor != 0 {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    );

    // A client outside the ranges: its SYN is dropped, and the monitor says why.
    let (status, _) = denied.run(&["call", "tcp", "203.0.113.95:80", "--timeout-ms", "300"]);
    assert!(!status.success());
    let drop = monitor.wait_for_line("the drop event", std::time::Duration::from_secs(10), |l| {
        l.contains("source-range-denied")
    });
    let drop: Value = serde_json::from_str(&drop).unwrap();
    assert_eq!(drop["kind"], "drop");
    assert_eq!(drop["hook"], "tc-uplink-ingress");
    assert!(
        drop["src"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", denied.ip)),
        "{drop}"
    );
    assert_eq!(drop["dst"], "203.0.113.95:80");

    // A pod's connection to the ClusterIP: the translation, before and after.
    let (by_backend, _) = client.call_tcp("10.96.4.95:80", 1);
    assert_eq!(by_backend.get("web"), Some(&1));
    let t = monitor.wait_for_line(
        "the translation event",
        std::time::Duration::from_secs(10),
        |l| l.contains("\"translate\"") && l.contains("10.96.4.95:80"),
    );
    let t: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(t["hook"], "sock-connect4");
    assert_eq!(t["to"], format!("{}:8080", web.ip).as_str());

    // Stopped, it leaves the datapath as quiet as before.
    assert!(monitor.signal_and_wait(libc::SIGTERM).success());
    assert_eq!(maps.config.get().unwrap().monitor, 0);
}
