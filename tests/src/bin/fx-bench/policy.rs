//! Section 8: what NetworkPolicy costs (issue #19, item 3). Per packet, at the pod's veth
//! (BPF_PROG_TEST_RUN of `tc_from_pod`): no policy on the node, policies on the node but none
//! selecting the pod, and the pod selected by 1, 100 and 1,000 policies, for a flow already
//! remembered (repeatable, amortised over many passes) and for new flows (single runs, each a new
//! source port, test-run overhead included, next to the same single runs without policy).
//! Programming: compiling 1,000 policies over 10,000 pods for a node's 100 pods, writing the
//! tables into the kernel's maps, rewriting them unchanged and after one policy changed, and
//! the maps' kernel memory.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Instant};

use ferrox::policy::{
    compile::compile,
    model::{PodInfo, Policy, Protocol, World},
    tables::write,
    testing::policy,
};
use ferrox_datapath::{Datapath, TcProgram, bpffs::ScratchBpffs};
use serde_json::{Value, json};

use super::{ACK, LOCAL_POD, REPEAT, measure, measure_repeat, tcp_flags};

/// The pod the packets leave, and the one they go to.
const PEER: [u8; 4] = [10, 244, 2, 9];
const UNSPEC: i32 = -1;

/// A world of `pods` pods in `pods / 100` namespaces (`ns-i`, labels `app=app-{j % 10}`: pods
/// alike share an identity, as replicas do), the measured pod `bench/a` at [`LOCAL_POD`] and its peer at [`PEER`], and
/// `policies` policies: the first `selecting` select `bench/a` (each allowing egress to other
/// pods on its own port; the first allows [`PEER`] on 80), the rest select pods of the other
/// namespaces, with ingress from pods of some namespaces on some ports.
fn world(pods: usize, policies: usize, selecting: usize) -> World {
    let mut w = World::default();
    let namespaces = (pods / 100).max(1);
    for n in 0..namespaces {
        w.namespaces.insert(
            format!("ns-{n}"),
            [("team".to_owned(), format!("t-{}", n % 7))].into(),
        );
    }
    w.namespaces.insert(
        "bench".into(),
        [("team".to_owned(), "bench".to_owned())].into(),
    );
    for j in 0..pods {
        w.pods.push(PodInfo {
            namespace: format!("ns-{}", j % namespaces),
            name: format!("p-{j}"),
            labels: [("app".to_owned(), format!("app-{}", j % 10))].into(),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + j as u32),
            named_ports: vec![("http".into(), Protocol::Tcp, 8080)],
        });
    }
    for (name, ip) in [("a", LOCAL_POD), ("peer", PEER)] {
        w.pods.push(PodInfo {
            namespace: "bench".into(),
            name: name.into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ip: Ipv4Addr::from(ip),
            named_ports: vec![],
        });
    }
    for i in 0..policies {
        let p: Policy = if i < selecting {
            let to = if i == 0 {
                json!({"podSelector": {"matchLabels": {"app": "peer"}}})
            } else {
                json!({"namespaceSelector": {"matchLabels": {"team": format!("t-{}", i % 7)}},
                       "podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}}})
            };
            policy(
                "bench",
                &format!("egress-{i}"),
                json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [to], "ports": [{"port": 80 + (i % 1000) as u16}]}]}),
            )
        } else {
            policy(
                &format!("ns-{}", i % namespaces),
                &format!("ingress-{i}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t-{}", (i + 1) % 7)}}}],
                                    "ports": [{"port": 8000 + (i % 100) as u16}, {"port": "http"}]}]}),
            )
        };
        w.policies.push(p);
    }
    w
}

fn local(w: &World, ids: &[String]) -> BTreeMap<String, Ipv4Addr> {
    w.pods
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ip))
        .filter(|(id, _)| ids.contains(id))
        .collect()
}

/// Compiles `w` for `ids` and writes it; the compile and write times in ms.
fn program(dp: &mut Datapath, w: &World, ids: &[String]) -> (f64, f64) {
    let started = Instant::now();
    let c = compile(w, ids);
    let compiled = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    write(dp.maps_mut(), &c, &local(w, ids)).unwrap();
    (compiled, started.elapsed().as_secs_f64() * 1e3)
}

fn row(what: &str, policies: usize, m: (u64, u64, u64), single: bool) -> Value {
    json!({"path": what, "policies_selecting": policies, "single_runs": single,
           "median_ns": m.0, "min_ns": m.1, "max_ns": m.2})
}

pub fn policy_costs(runs: u32) -> Value {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-bench-policy").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let amortised_runs = (runs / 10).max(20);
    let established = |_| tcp_flags(LOCAL_POD, 40_000, PEER, 80, ACK);
    let new_flow = |i: u32| tcp_flags(LOCAL_POD, (20_000 + i) as u16, PEER, 80, 0x02);
    let mut per_packet = Vec::new();
    let a = vec!["bench/a".to_owned()];

    // No policy at all on the node, then policies selecting another pod only.
    program(&mut dp, &world(200, 0, 0), &a);
    assert_eq!(dp.maps().policy_filter.marked().unwrap(), 0);
    let m = measure_repeat(
        &mut dp,
        TcProgram::FromPod,
        1,
        amortised_runs,
        REPEAT,
        established,
        UNSPEC,
    );
    per_packet.push(row("no policy on the node", 0, m, false));
    let base_single = measure(&mut dp, TcProgram::FromPod, 1, runs, new_flow, UNSPEC);
    per_packet.push(row(
        "no policy on the node, new flows",
        0,
        base_single,
        true,
    ));
    program(
        &mut dp,
        &world(200, 50, 0),
        &["ns-0/p-0".to_owned(), "bench/a".to_owned()],
    );
    assert!(
        !dp.maps()
            .policy_filter
            .get(u32::from_ne_bytes(LOCAL_POD))
            .unwrap()
    );
    let m = measure_repeat(
        &mut dp,
        TcProgram::FromPod,
        1,
        amortised_runs,
        REPEAT,
        established,
        UNSPEC,
    );
    per_packet.push(row(
        "policies on the node, none selecting the pod",
        0,
        m,
        false,
    ));
    for n in [1usize, 100, 1_000] {
        program(&mut dp, &world(200, n, n), &a);
        // The flow remembered by its first packet, then every pass a hit.
        let first = dp
            .test_run_tc(TcProgram::FromPod, &established(0), 1)
            .unwrap();
        assert_eq!(first.action, UNSPEC, "the flow is allowed");
        let m = measure_repeat(
            &mut dp,
            TcProgram::FromPod,
            1,
            amortised_runs,
            REPEAT,
            established,
            UNSPEC,
        );
        per_packet.push(row("pod selected, remembered flow", n, m, false));
        let flows: Vec<_> = dp.maps().policy_ct.entries().unwrap();
        for (k, _) in flows {
            dp.maps_mut().policy_ct.remove(&k).unwrap();
        }
        let m = measure(
            &mut dp,
            TcProgram::FromPod,
            1,
            runs.min(8_000),
            new_flow,
            UNSPEC,
        );
        per_packet.push(row("pod selected, new flows", n, m, true));
        let denied = dp
            .test_run_tc(
                TcProgram::FromPod,
                &tcp_flags(LOCAL_POD, 1, [10, 100, 0, 1], 9, 0x02),
                1,
            )
            .unwrap();
        assert_eq!(denied.action, 2, "a flow no policy allows is dropped");
    }

    // Programming at scale: 1,000 policies over 10,000 pods, for a node's 100 pods.
    let w = world(10_000, 1_000, 10);
    let ids: Vec<String> = w
        .pods
        .iter()
        .step_by(100)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .chain(a.iter().cloned())
        .collect();
    let bpffs2 = ScratchBpffs::new(Path::new("/run"), "ferrox-bench-policy-scale").unwrap();
    let mut dp2 = Datapath::open(&bpffs2.layout()).unwrap();
    let (c1, w1) = program(&mut dp2, &w, &ids);
    let (c2, w2) = program(&mut dp2, &w, &ids);
    let mut changed = w.clone();
    let p = &mut changed.policies[500];
    if let Some(rules) = p.ingress.as_mut() {
        rules.clear();
    }
    let (c3, w3) = program(&mut dp2, &changed, &ids);
    let compiled = compile(&w, &ids);
    let entries: usize = compiled.endpoints.values().map(|e| e.entries.len()).sum();
    let memory: u64 = ferrox_datapath::map_memory(&bpffs2.layout())
        .unwrap()
        .iter()
        .filter(|m| ["IPCACHE_V1", "POLICY_V1", "POLICY_EP_V1"].contains(&m.name.as_str()))
        .map(|m| m.bytes)
        .sum();
    let isolated = compiled.endpoints.len();
    let programming = json!({
        "pods": w.pods.len(), "policies": w.policies.len(), "local_pods": ids.len(),
        "isolated_local_pods": isolated, "ipcache_entries": compiled.ipcache.len(),
        "entries": entries,
        "first": {"compile_ms": c1, "write_ms": w1},
        "unchanged": {"compile_ms": c2, "write_ms": w2},
        "one_policy_changed": {"compile_ms": c3, "write_ms": w3},
        "tables_kernel_bytes": memory,
    });
    eprintln!("policy programming at scale: {programming}");
    json!({"per_packet": per_packet, "programming": programming})
}
