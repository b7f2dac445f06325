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
use ferrox_tests::harness::{Cluster, wait_for};

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

/// How many master entries and backends the node's maps hold.
fn programmed(maps: &Maps) -> (usize, usize) {
    let masters = maps
        .services
        .entries()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .count();
    (masters, maps.backends.len().unwrap())
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
            let (m, b) = programmed(&maps);
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

    // One more Service, backed by a real pod: programmed and answering.
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
    node.wait_for_backends("10.96.0.77:80/TCP", 1);
    let add_one = added.elapsed();
    let (by_backend, _) = client.call_tcp("10.96.0.77:80", 3);
    assert_eq!(by_backend.get("web"), Some(&3));

    let figures = serde_json::json!({
        "services": SERVICES,
        "endpoints_per_service": ENDPOINTS,
        "objects_created_s": created.as_secs_f64(),
        "full_sync_converged_s": converged.as_secs_f64(),
        "add_one_service_ms": add_one.as_secs_f64() * 1e3,
        "note": "converged: from the first object created to all entries in the maps, polled; add-one: from apply to the entry in the maps, polled (poll interval adds up to 200 ms)",
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
