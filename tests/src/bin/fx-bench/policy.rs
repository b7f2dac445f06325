//! Section 8: what NetworkPolicy costs (issue #19, item 3). Per packet, at the pod's veth
//! (BPF_PROG_TEST_RUN of `tc_from_pod`, and of `tc_to_pod` for the replies the host hands to the
//! pod): no policy on the node, policies on the node but none selecting the pod, and the pod
//! selected by 1, 100 and 1,000 policies, for a flow already remembered (repeatable, amortised
//! over many passes) and for new flows (single runs, each a new source port, test-run overhead
//! included, next to the same single runs without policy).
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

pub fn policy_costs(runs: u32, quick: bool) -> Value {
    let bpffs = ScratchBpffs::new(Path::new("/run"), "ferrox-bench-policy").unwrap();
    let mut dp = Datapath::open(&bpffs.layout()).unwrap();
    let amortised_runs = (runs / 10).max(20);
    let established = |_| tcp_flags(LOCAL_POD, 40_000, PEER, 80, ACK);
    let new_flow = |i: u32| tcp_flags(LOCAL_POD, (20_000 + i) as u16, PEER, 80, 0x02);
    // The peer's answer, as the host hands it to the pod (`tc_to_pod`).
    let reply = |_| tcp_flags(PEER, 80, LOCAL_POD, 40_000, ACK);
    let into_pod = |dp: &mut Datapath| {
        measure_repeat(
            dp,
            TcProgram::ToPod,
            1,
            amortised_runs,
            REPEAT,
            reply,
            UNSPEC,
        )
    };
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
    let m = into_pod(&mut dp);
    per_packet.push(row("into the pod: no policy on the node", 0, m, false));
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
    let m = into_pod(&mut dp);
    per_packet.push(row(
        "into the pod: policies on the node, none selecting it",
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
        let m = into_pod(&mut dp);
        per_packet.push(row(
            "into the pod: selected, reply of a remembered flow",
            n,
            m,
            false,
        ));
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
    let through_api = programming_through_api(10_000, 1_000, if quick { 3 } else { 9 });
    json!({"per_packet": per_packet, "programming": programming, "through_api": through_api})
}

/// Through the API, on a running agent: `pods` Pods (100 of them on the node, with addresses)
/// and `policies` NetworkPolicies in the API; then a new policy isolating one more local pod, timed
/// from the API write to that pod's entry in the kernel's isolated-pods map (polled on that
/// entry), several times. Also the agent's memory with all of it watched.
pub fn programming_through_api(pods: usize, policies: usize, repeats: usize) -> Value {
    use std::time::Duration;

    use ferrox_tests::harness::{Cluster, wait_for};
    use k8s_openapi::api::{
        core::v1::{Namespace, Pod, PodSpec, PodStatus},
        networking::v1::NetworkPolicy,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let namespaces = (pods / 100).max(1);
    for n in 0..namespaces {
        c.api().apply(&Namespace {
            metadata: ObjectMeta {
                name: Some(format!("ns-{n}")),
                labels: Some([("team".to_owned(), format!("t-{}", n % 7))].into()),
                ..Default::default()
            },
            ..Default::default()
        });
    }
    let ip_of = |j: usize| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + j as u32 + 1);
    let local = |j: usize| j.is_multiple_of((pods / 100).max(1));
    for j in 0..pods {
        c.api().apply(&Pod {
            metadata: ObjectMeta {
                name: Some(format!("p-{j}")),
                namespace: Some(format!("ns-{}", j % namespaces)),
                labels: Some(
                    [
                        ("app".to_owned(), format!("app-{}", j % 10)),
                        ("idx".to_owned(), format!("{j}")),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(if local(j) {
                    node.name.clone()
                } else {
                    "elsewhere".into()
                }),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip_of(j).to_string()),
                phase: Some("Running".into()),
                ..Default::default()
            }),
        });
    }
    let np = |ns: usize, name: &str, spec: Value| -> NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": format!("ns-{ns}"), "name": name}, "spec": spec,
        }))
        .unwrap()
    };
    for i in 0..policies {
        c.api().apply(&np(
            i % namespaces,
            &format!("ingress-{i}"),
            json!({"podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t-{}", (i + 1) % 7)}}}],
                                "ports": [{"port": 8000 + (i % 100)}]}]}),
        ));
    }
    let maps = ferrox_datapath::Maps::open(&node.layout()).unwrap();
    let isolated = |j: usize| {
        maps.policy_endpoints
            .get(&ferrox_abi::EndpointKey {
                addr: u32::from_ne_bytes(ip_of(j).octets()),
            })
            .unwrap()
            .is_some()
    };
    // Every local pod some policy selects is isolated: the first full programming.
    let first_local = (0..pods).find(|j| local(*j)).unwrap();
    wait_for("the first tables", Duration::from_secs(300), || {
        if isolated(first_local) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    // Local pods no policy selects yet: the app labels cover them all, so select by idx.
    let mut times = Vec::new();
    for r in 0..repeats {
        let j = (0..pods).filter(|j| local(*j)).nth(r + 1).unwrap();
        let started = Instant::now();
        c.api().apply(&np(
            j % namespaces,
            &format!("egress-only-{j}"),
            json!({"podSelector": {"matchLabels": {"idx": format!("{j}")}}, "policyTypes": ["Egress"]}),
        ));
        wait_for(
            "the new policy's isolation",
            Duration::from_secs(60),
            || {
                let ep = maps
                    .policy_endpoints
                    .get(&ferrox_abi::EndpointKey {
                        addr: u32::from_ne_bytes(ip_of(j).octets()),
                    })
                    .unwrap();
                if ep.is_some_and(|e| e.isolated & ferrox_abi::policy_isolation::EGRESS != 0) {
                    Ok(())
                } else {
                    Err("not yet".into())
                }
            },
        );
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pid = node.agent_pid();
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let out = json!({
        "pods": pods, "policies": policies, "local_pods": (0..pods).filter(|j| local(*j)).count(),
        "policy_added_ms": {"p50": times[times.len() / 2], "min": times[0], "max": times[times.len() - 1]},
        "agent_rss_kib": rss_kib,
    });
    eprintln!("policy programming through the API: {out}");
    drop(maps);
    drop(c);
    out
}
