//! Cluster tier, at scale: 10,000 Services with 10 endpoints each, created through the API
//! test server while the agent runs, converge in the maps; a Service added afterwards is
//! programmed and carries traffic. The times are recorded (to `target/test-figures/scale.json`
//! and stderr), never asserted: the benchmarks compare them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ferrox::services::testing::{slice, svc};
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, programmed_services, wait_for, wait_for_frontend};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

/// The i-th Service's cluster IP, inside 10.96.0.0/12.
fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i)
}

/// The j-th endpoint of the i-th Service (addresses nobody uses: only the maps are checked).
fn endpoint(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS + j)
}

/// One "service maps synced" line of the agent's log.
#[derive(Clone, Debug)]
struct Sync {
    full: bool,
    writes: u64,
    took_us: u64,
}

/// Every sync the agent logged so far.
fn syncs(node: &ferrox_tests::harness::Node) -> Vec<Sync> {
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        Some(
            line[start..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    node.agent_log()
        .iter()
        .filter(|l| l.contains("service maps synced"))
        .map(|l| Sync {
            full: field(l, "full").as_deref() == Some("true"),
            writes: field(l, "writes").and_then(|v| v.parse().ok()).unwrap_or(0),
            took_us: field(l, "took_us")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
        .collect()
}

#[test]
fn ten_thousand_services_converge_and_one_more_works_at_once() {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let web = c.add_pod(1, "web");
    let client = c.add_pod(1, "client");
    let _server = web.serve(8080);
    let maps = Maps::open(&node.layout()).unwrap();

    let started = Instant::now();
    for i in 0..SERVICES {
        let name = format!("s{i}");
        c.api().apply(
            &svc(&name)
                .cluster_ip(&cluster_ip(i).to_string())
                .port("", 80, "TCP")
                .build(),
        );
        let mut sl = slice(&name, &format!("{name}-x")).port("", 8080, "TCP");
        for j in 0..ENDPOINTS {
            sl = sl.ready_on(endpoint(i, j), "node-1");
        }
        c.api().apply(&sl.build());
    }
    let created = started.elapsed();
    wait_for(
        "10,000 frontends with 100,000 backends",
        Duration::from_secs(300),
        || {
            let (m, b) = programmed_services(&maps);
            if m == SERVICES as usize && b == (SERVICES * ENDPOINTS) as usize {
                Ok(())
            } else {
                Err(format!("{m} frontends, {b} backends"))
            }
        },
    );
    let converged = started.elapsed();

    // Every frontend got all of its backends.
    let rows = node.services();
    assert_eq!(rows.len(), SERVICES as usize);
    assert!(rows.iter().all(|r| r.backends.len() == ENDPOINTS as usize));

    // One more Service, backed by a real pod: programmed and answering. Polled every
    // millisecond on its one map entry.
    let syncs_before = syncs(node);
    let added = Instant::now();
    c.api().apply(
        &svc("extra")
            .cluster_ip("10.96.0.77")
            .port("", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("extra", "extra-x")
            .port("", 8080, "TCP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    wait_for_frontend(&maps, Ipv4Addr::new(10, 96, 0, 77), 80, 1);
    let add_one = added.elapsed();
    let (by_backend, _) = client.call_tcp("10.96.0.77:80", 3);
    assert_eq!(by_backend.get("web"), Some(&3));
    let add_one_syncs: Vec<Sync> = syncs(node)[syncs_before.len()..].to_vec();
    assert!(
        add_one_syncs.iter().all(|s| !s.full),
        "adding a Service is an incremental sync: {add_one_syncs:?}"
    );
    // A backend, a slot and the master; plus the master alone first when the Service's sync
    // ran before its EndpointSlice arrived. Nothing else is rewritten.
    let writes: u64 = add_one_syncs.iter().map(|s| s.writes).sum();
    assert!(
        (3..=4).contains(&writes),
        "{writes} writes to add one Service: {add_one_syncs:?}"
    );

    // A cold full sync: the agent restarts onto empty service maps with every object in the API.
    node.stop_agent();
    let emptied = Instant::now();
    let mut m = Maps::open(&node.layout()).unwrap();
    for (k, _) in m.services.entries().unwrap() {
        m.services.remove(&k).unwrap();
    }
    for (id, _) in m.backends.entries().unwrap() {
        m.remove_backend(id).unwrap();
    }
    eprintln!("emptied the maps in {:.1?}", emptied.elapsed());
    let restarted = Instant::now();
    node.start_agent();
    wait_for(
        "the restarted agent to program everything",
        Duration::from_secs(300),
        || {
            let (m, b) = programmed_services(&maps);
            if m == SERVICES as usize + 1 && b == (SERVICES * ENDPOINTS) as usize + 1 {
                Ok(())
            } else {
                Err(format!("{m} frontends, {b} backends"))
            }
        },
    );
    let restart_converged = restarted.elapsed();
    let full = syncs(node)
        .into_iter()
        .find(|s| s.full)
        .expect("the restarted agent's first sync is a full one");
    let (by_backend, _) = client.call_tcp("10.96.0.77:80", 3);
    assert_eq!(by_backend.get("web"), Some(&3));

    let figures = serde_json::json!({
        "services": SERVICES,
        "endpoints_per_service": ENDPOINTS,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "objects_created_s": created.as_secs_f64(),
        "converged_from_first_object_s": converged.as_secs_f64(),
        "add_one_apply_to_map_ms": add_one.as_secs_f64() * 1e3,
        "add_one_agent_sync_ms": add_one_syncs.iter().map(|s| s.took_us).sum::<u64>() as f64 / 1e3,
        "cold_full_sync_agent_ms": full.took_us as f64 / 1e3,
        "cold_full_sync_writes": full.writes,
        "cold_restart_to_converged_s": restart_converged.as_secs_f64(),
        "note": "agent_sync: the agent's own measure of one sync (table update + map writes); apply_to_map: from the API write to the entry in the map, polled every 1 ms; cold restart: agent start (datapath re-adopted, 20,000 objects listed) to every entry written",
    });
    eprintln!("scale figures: {figures}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-figures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("scale.json"),
        serde_json::to_string_pretty(&figures).unwrap(),
    )
    .unwrap();
}
