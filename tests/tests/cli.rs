//! Cluster tier: the node CLI's machine-readable output. Every command's `-o json` and `-o yaml`
//! carry the same document; `svc list` and `counters` agree with what the test programmed and
//! sent; the agent's `--log-format json` logs are one JSON object per line.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use ferrox::services::testing::{slice, svc};
use ferrox_tests::harness::{Cluster, Node};
use serde_json::Value;

fn json(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&node.ferrox(&a)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn yaml(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "yaml"]);
    serde_yaml::from_str(&node.ferrox(&a)).unwrap_or_else(|e| panic!("{args:?} as YAML: {e}"))
}

/// The counter of (hook, reason) in `ferrox counters -o json`.
fn counter(rows: &Value, hook: &str, reason: &str) -> u64 {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["hook"] == hook && r["reason"] == reason)
        .map_or(0, |r| r["packets"].as_u64().unwrap())
}

#[test]
fn json_and_yaml_carry_the_same_documents_and_logs_are_json() {
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_LOG_FORMAT", "json")
        .build();
    let n1 = c.node(1);
    let web = c.add_pod(2, "web");
    let client = c.add_pod(1, "client");
    let _srv = web.serve(8080);
    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.3.3")
            .port_np("http", 80, 30303, "TCP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-1")
            .port("http", 8080, "TCP")
            .ready_on(web.ip, "node-2")
            .build(),
    );
    n1.wait_for_backends("10.96.3.3:80/TCP", 1);

    // svc list: the frontend the test programmed, with its one backend.
    let services = json(n1, &["svc", "list"]);
    let row = services
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["frontend"] == "10.96.3.3:80/TCP" && r["scope"] == "internal")
        .unwrap_or_else(|| panic!("{services:#}"));
    assert_eq!(row["backends"].as_array().unwrap().len(), 1, "{row:#}");

    // counters: five connections through the ClusterIP move the connect hook's cell by five.
    let before = counter(&json(n1, &["counters"]), "sock-connect4", "to-backend");
    let (by, _) = client.call_tcp("10.96.3.3:80", 5);
    assert_eq!(by.get("web"), Some(&5));
    let after = counter(&json(n1, &["counters"]), "sock-connect4", "to-backend");
    assert_eq!(
        after - before,
        5,
        "connect4/to-backend moved by {}",
        after - before
    );

    // Every command: the YAML document is the JSON one.
    for args in [
        &["svc", "list"][..],
        &["datapath"],
        &["endpoints"],
        &["routes"],
        &["ipam", "show"],
        &["ct", "list"],
        &["trace", "198.18.0.200:40000", "198.18.0.11:30303/tcp"],
    ] {
        assert_eq!(json(n1, args), yaml(n1, args), "{args:?}");
    }
    // The live ones (timestamps, counters) carry the same fields.
    for args in [&["status"][..], &["counters"]] {
        let (j, y) = (json(n1, args), yaml(n1, args));
        let keys = |v: &Value| -> Vec<String> {
            match v {
                Value::Object(m) => m.keys().cloned().collect(),
                Value::Array(a) => a.first().map_or(vec![], |f| match f {
                    Value::Object(m) => m.keys().cloned().collect(),
                    _ => vec![],
                }),
                _ => vec![],
            }
        };
        assert_eq!(keys(&j), keys(&y), "{args:?}");
    }

    // The agent logs one JSON object per line, with a level and a message.
    let log = n1.agent_log();
    assert!(log.len() > 5, "{log:?}");
    for line in log.iter().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        log.iter().any(|l| l.contains("CNI ready")),
        "the readiness line is there too"
    );
}

/// Text logs written to a pipe (a file, a container runtime's log) carry no colour codes.
#[test]
fn text_logs_to_a_pipe_are_plain() {
    use std::io::BufRead as _;
    let dir = std::env::temp_dir().join(format!("fx-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // install-cni logs that it waits for an agent that is not there, then keeps waiting.
    let mut child = std::process::Command::new(ferrox_tests::harness::bin_path("ferrox"))
        .args(["install-cni", "--log-format", "text", "--cni-binary"])
        .arg(ferrox_tests::harness::bin_path("ferrox-cni"))
        .arg("--node-config")
        .arg(dir.join("node.json"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .args(["--agent-healthz", "127.0.0.1:1"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(line.contains("waiting for the agent"), "{line:?}");
    assert!(
        !line.contains('\u{1b}'),
        "colour codes in a piped log: {line:?}"
    );
}
