//! Cluster tier: a service entry that could not be programmed (a full map) is visible while it
//! fails and is retried until it succeeds, without any change from the API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::time::Duration;

use ferrox::services::testing::{slice, svc};
use ferrox_abi::Backend;
use ferrox_datapath::Maps;
use ferrox_tests::harness::{Cluster, wait_for};
use serde_json::Value;

#[test]
fn an_entry_that_hit_a_full_map_is_retried_until_it_is_programmed() {
    let c = Cluster::builder().nodes(1).build();
    let n = c.node(1);
    let web = c.add_pod(1, "web");
    let _srv = web.serve(8080);

    // Fill the backends map with entries nobody uses (ids far above the agent's own).
    let mut maps = Maps::open(&n.layout()).unwrap();
    let capacity = maps.backends.capacity();
    let junk = |i: u32| 0x8000_0000 + i;
    let mut filled = 0;
    for i in 0..capacity {
        match maps.backends.insert(&junk(i), &Backend::default()) {
            Ok(()) => filled += 1,
            Err(_) => break,
        }
    }
    assert!(filled > capacity / 2, "filled {filled} of {capacity}");

    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.8.8")
            .port("http", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-1")
            .port("http", 8080, "TCP")
            .ready_on(web.ip, &n.name)
            .build(),
    );
    // The failure is visible: the status warns, the metric counts it.
    let warning = wait_for(
        "the failing entry in ferrox status",
        Duration::from_secs(30),
        || {
            let st: Value = serde_json::from_str(&n.ferrox(&["status", "-o", "json"])).unwrap();
            st["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .find(|w| w.contains("could not be programmed"))
                .map(str::to_owned)
                .ok_or_else(|| format!("{}", st["warnings"]))
        },
    );
    assert!(warning.contains("retries"), "{warning}");
    assert!(
        n.agent_log()
            .iter()
            .any(|l| l.contains("failed to program; retrying")),
        "the agent logs the retry"
    );

    // Room again: the next retry programs it, with no change from the API.
    for i in 0..filled {
        maps.remove_backend(junk(i)).unwrap();
    }
    n.wait_for_backends("10.96.8.8:80/TCP", 1);
    let (answers, _) = c.add_pod(1, "client").call_tcp("10.96.8.8:80", 3);
    assert_eq!(answers.get("web"), Some(&3), "{answers:?}");
    let st: Value = serde_json::from_str(&n.ferrox(&["status", "-o", "json"])).unwrap();
    assert_eq!(st["agent"]["failing_entries"], 0, "{st}");
}
