//! Section 5: CNI ADD and DEL latency, one after the other and 16 at a time, through the real
//! `ferrox-cni` binary as a container runtime runs it (one process per call, the network
//! configuration on stdin), against a running agent. Each sandbox's network namespace is created
//! before the clock starts and removed after.

use std::time::Instant;

use ferrox_tests::{
    bench::stats,
    harness::{Cluster, NetNs, Node, leaks},
};
use serde_json::{Value, json};

/// Runs `op` for every sandbox, `threads` at a time; each call's time (ms) and the wall time.
fn phase(
    node: &Node,
    conf: &Value,
    sandboxes: &[(String, NetNs)],
    op: &str,
    threads: usize,
) -> (Vec<f64>, f64) {
    let started = Instant::now();
    let chunk = sandboxes.len().div_ceil(threads);
    let times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = sandboxes
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(id, ns)| {
                            let path = ns.path().display().to_string();
                            let args = format!(
                                "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id}"
                            );
                            let t = Instant::now();
                            let out = node.cni_raw(
                                &[
                                    ("CNI_COMMAND", op),
                                    ("CNI_CONTAINERID", id),
                                    ("CNI_NETNS", &path),
                                    ("CNI_IFNAME", "eth0"),
                                    ("CNI_ARGS", &args),
                                ],
                                conf,
                            );
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            assert!(
                                out.status.success(),
                                "CNI {op} {id}: {}",
                                String::from_utf8_lossy(&out.stdout)
                            );
                            ms
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    (times, started.elapsed().as_secs_f64())
}

pub fn cni(pods: usize) -> Vec<Value> {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let conf = node.cni_conf();
    let mut rows = Vec::new();
    for (k, (mode, threads)) in [("sequential", 1), ("16 concurrent", 16)]
        .into_iter()
        .enumerate()
    {
        let sandboxes: Vec<(String, NetNs)> = (0..pods)
            .map(|i| {
                let id = format!("bench{k}x{i}");
                let ns = NetNs::create(&format!("{}{}-{id}", leaks::NETNS_PREFIX, c.id()));
                (id, ns)
            })
            .collect();
        for op in ["ADD", "DEL"] {
            let (times, wall) = phase(node, &conf, &sandboxes, op, threads);
            let s = stats::summarize(&times);
            let rate = times.len() as f64 / wall;
            eprintln!(
                "CNI {op:<3} {mode:<14} p50 {:>6.1} ms  p99 {:>6.1} ms  {rate:>6.1} per s",
                s.p50, s.p99
            );
            rows.push(
                json!({ "op": op, "mode": mode, "pods": pods, "latency_ms": s, "per_s": rate }),
            );
        }
    }
    // The same ADDs for pods whose egress the bandwidth plugin shapes: their program is a TCX
    // link (the ingress qdisc is the bandwidth plugin's), which is what every pod paid before
    // the filters. The difference is the kernel's RCU grace period in the TCX attach.
    let mut shaped = conf.clone();
    shaped["runtimeConfig"] = json!({ "bandwidth": {
        "egressRate": 8_000_000, "egressBurst": 1_000_000
    } });
    let mode = "sequential, TCX link (egress shaped)";
    let sandboxes: Vec<(String, NetNs)> = (0..pods)
        .map(|i| {
            let id = format!("bench2x{i}");
            let ns = NetNs::create(&format!("{}{}-{id}", leaks::NETNS_PREFIX, c.id()));
            (id, ns)
        })
        .collect();
    for op in ["ADD", "DEL"] {
        let (times, wall) = phase(node, &shaped, &sandboxes, op, 1);
        let s = stats::summarize(&times);
        let rate = times.len() as f64 / wall;
        eprintln!(
            "CNI {op:<3} {mode} p50 {:>6.1} ms  p99 {:>6.1} ms  {rate:>6.1} per s",
            s.p50, s.p99
        );
        rows.push(json!({ "op": op, "mode": mode, "pods": pods, "latency_ms": s, "per_s": rate }));
    }
    rows
}
