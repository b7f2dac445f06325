//! Cluster tier: `ferrox-cni` as a container runtime drives it, on a node whose agent runs:
//! every verb with valid input, every error code with the input that causes it, rollback of a
//! failed ADD, CHECK noticing damage, GC, chaining with the reference plugins, and concurrent
//! ADD/DEL with plugin processes killed half-way.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Output,
};

use ferrox_tests::harness::{Cluster, NetNs, Node, leaks};
use serde_json::{Value, json};

/// A pod sandbox: a network namespace named so that the leak check knows it.
fn sandbox(c: &Cluster, tag: &str) -> NetNs {
    NetNs::create(&format!("{}{}-{tag}", leaks::NETNS_PREFIX, c.id()))
}

fn env<'a>(command: &'a str, cid: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut e = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1",
        ),
    ];
    if !netns.is_empty() {
        e.push(("CNI_NETNS", netns));
    }
    e
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The CNI error code of a failed invocation (spec: exit status non-zero, error JSON on stdout).
fn error_code(out: &Output) -> u64 {
    assert!(!out.status.success(), "expected a failure");
    let v = stdout_json(out);
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["code"].as_u64().unwrap()
}

fn merged(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    for (k, x) in extra.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v
}

/// The node's configuration with other pod CIDRs and another IPAM directory, for the tests that
/// need a tiny block or a broken datapath root.
fn node_config_variant(node: &Node, name: &str, change: impl FnOnce(&mut Value)) -> PathBuf {
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(node.node_config()).unwrap()).unwrap();
    let dir = node.node_config().parent().unwrap().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    cfg["ipamDir"] = json!(dir.join("ipam"));
    change(&mut cfg);
    let path = dir.join("node.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// The allocation records of the IPAM store at `ipam_dir`.
fn allocations(ipam_dir: &Path) -> Vec<Value> {
    std::fs::read_dir(ipam_dir.join("allocations"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_none_or(|x| x != "tmp"))
                .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// What the row shows, the CNI_* variables, the configuration, the code it must fail with.
type ErrorRow<'a> = (&'a str, Vec<(&'a str, &'a str)>, Value, u64);

#[test]
fn every_verb_with_valid_input_and_every_error_code_with_its_cause() {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let base = merged(
        &node.cni_conf(),
        json!({ "dns": { "nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"] } }),
    );
    let ns1 = sandbox(&c, "c1");
    let ns1_path = ns1.path().display().to_string();

    // VERSION: every supported version, the requested one echoed.
    let out = node.cni_raw(
        &[("CNI_COMMAND", "VERSION")],
        &json!({ "cniVersion": "1.0.0" }),
    );
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["cniVersion"], "1.0.0");
    let versions: BTreeSet<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(versions, BTreeSet::from(["0.4.0", "1.0.0", "1.1.0"]));

    // STATUS: ready (the agent runs), nothing on stdout.
    let out = node.cni_raw(&[("CNI_COMMAND", "STATUS")], &base);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());

    // ADD: the result in the spec's shape.
    let out = node.cni_raw(&env("ADD", "cid-1", &ns1_path), &base);
    assert!(out.status.success(), "{out:?}");
    let result = stdout_json(&out);
    assert_eq!(result["cniVersion"], "1.1.0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2);
    assert!(ifaces[0].get("sandbox").is_none(), "host side first");
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(ifaces[1]["sandbox"], ns1_path.as_str());
    assert_eq!(
        result["ips"][0]["interface"], 1,
        "the ip names the pod interface"
    );
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .strip_suffix("/32")
        .unwrap()
        .parse()
        .unwrap();
    assert!(node.pod_cidr.contains(&ip));
    assert_eq!(
        result["routes"],
        json!([{ "dst": "0.0.0.0/0", "gw": "169.254.1.1" }])
    );
    assert_eq!(result["dns"], base["dns"], "dns passed through");
    // The allocation records the pod from CNI_ARGS.
    let cfg: Value = serde_json::from_slice(&std::fs::read(node.node_config()).unwrap()).unwrap();
    let record: Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(cfg["ipamDir"].as_str().unwrap()).join(format!("allocations/{ip}")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["containerId"], "cid-1");
    assert_eq!(record["podNamespace"], "ns1");
    assert_eq!(record["podName"], "pod1");

    // CHECK with the result as prevResult: all is as ADD left it.
    let with_prev = merged(&base, json!({ "prevResult": result }));
    let out = node.cni_raw(&env("CHECK", "cid-1", &ns1_path), &with_prev);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // CHECK notices a deleted route, and says which.
    ns1.ip(&["route", "del", "default"]);
    let out = node.cni_raw(&env("CHECK", "cid-1", &ns1_path), &with_prev);
    assert_eq!(error_code(&out), 102);
    let msg = stdout_json(&out)["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("no route to 0.0.0.0/0 via 169.254.1.1"),
        "{msg}"
    );

    // ADD at an older version: 0.4.0 results name the IP version.
    let ns2 = sandbox(&c, "c2");
    let ns2_path = ns2.path().display().to_string();
    let old = merged(&base, json!({ "cniVersion": "0.4.0" }));
    let out = node.cni_raw(&env("ADD", "cid-2", &ns2_path), &old);
    assert!(out.status.success(), "{out:?}");
    let r2 = stdout_json(&out);
    assert_eq!(r2["cniVersion"], "0.4.0");
    assert_eq!(r2["ips"][0]["version"], "4");

    // DEL: twice, and with the namespace already gone; every address is free afterwards.
    for _ in 0..2 {
        let out = node.cni_raw(&env("DEL", "cid-1", &ns1_path), &base);
        assert!(out.status.success(), "{out:?}");
    }
    drop(ns2);
    let out = node.cni_raw(&env("DEL", "cid-2", &ns2_path), &base);
    assert!(out.status.success(), "DEL without its netns: {out:?}");
    // DEL of something ADD never made.
    let out = node.cni_raw(&env("DEL", "never-added", ""), &base);
    assert!(out.status.success(), "{out:?}");
    let ipam_dir = PathBuf::from(cfg["ipamDir"].as_str().unwrap());
    assert_eq!(
        allocations(&ipam_dir),
        Vec::<Value>::new(),
        "every address released"
    );

    // Errors: (what, env, conf, code).
    let ns3 = sandbox(&c, "c3");
    let ns3_path = ns3.path().display().to_string();
    let missing = node.node_config().with_file_name("absent.json");
    let rows: Vec<ErrorRow> = vec![
        (
            "an unsupported cniVersion",
            env("ADD", "e1", &ns3_path),
            merged(&base, json!({ "cniVersion": "0.3.1" })),
            1,
        ),
        (
            "an ipam section (ferrox has its own)",
            env("ADD", "e2", &ns3_path),
            merged(&base, json!({ "ipam": { "type": "host-local" } })),
            2,
        ),
        (
            "CHECK of a container ADD never saw",
            env("CHECK", "e3", &ns3_path),
            with_prev.clone(),
            3,
        ),
        (
            "no CNI_COMMAND",
            vec![("CNI_CONTAINERID", "e4")],
            base.clone(),
            4,
        ),
        (
            "ADD without CNI_NETNS",
            env("ADD", "e5", ""),
            base.clone(),
            4,
        ),
        (
            "an interface name that is not one",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "e6"),
                ("CNI_NETNS", &ns3_path),
                ("CNI_IFNAME", "much-too-long-name"),
            ],
            base.clone(),
            4,
        ),
        (
            "a configuration without a name",
            env("ADD", "e7", &ns3_path),
            merged(&base, json!({ "name": "" })),
            7,
        ),
        (
            "CHECK without prevResult",
            env("CHECK", "e8", &ns3_path),
            base.clone(),
            7,
        ),
        (
            "GC without valid attachments",
            vec![("CNI_COMMAND", "GC")],
            base.clone(),
            7,
        ),
        (
            "ADD before the agent wrote the node configuration",
            env("ADD", "e9", &ns3_path),
            merged(&base, json!({ "nodeConfig": missing })),
            11,
        ),
        (
            "STATUS before the agent wrote the node configuration",
            vec![("CNI_COMMAND", "STATUS")],
            merged(&base, json!({ "nodeConfig": missing })),
            50,
        ),
    ];
    for (what, e, conf, want) in rows {
        let out = node.cni_raw(&e, &conf);
        assert_eq!(
            error_code(&out),
            want,
            "{what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Not JSON at all.
    let out = node.cni_raw(&env("ADD", "e10", &ns3_path), &json!("not a config"));
    assert_eq!(error_code(&out), 6);

    // 100: a node whose block is full (a /30: two addresses).
    let small = node_config_variant(node, "small", |cfg| {
        cfg["podCIDRs"] = json!(["10.244.1.248/30"]);
    });
    let small_conf = merged(&base, json!({ "nodeConfig": small }));
    let sandboxes: Vec<NetNs> = (0..3).map(|i| sandbox(&c, &format!("s{i}"))).collect();
    for (i, ns) in sandboxes.iter().enumerate() {
        let cid = format!("small-{i}");
        let p = ns.path().display().to_string();
        let out = node.cni_raw(&env("ADD", &cid, &p), &small_conf);
        if i < 2 {
            assert!(out.status.success(), "{out:?}");
        } else {
            assert_eq!(error_code(&out), 100);
            let msg = stdout_json(&out)["msg"].as_str().unwrap().to_owned();
            assert!(
                msg.contains("10.244.1.248/30"),
                "names the full block: {msg}"
            );
        }
    }
    assert_eq!(
        allocations(&small.with_file_name("ipam")).len(),
        2,
        "the failed ADD kept nothing"
    );
    for (i, ns) in sandboxes.iter().enumerate().take(2) {
        let p = ns.path().display().to_string();
        let out = node.cni_raw(&env("DEL", &format!("small-{i}"), &p), &small_conf);
        assert!(out.status.success());
    }

    // 101 and rollback: the datapath is not where the node configuration says; the ADD fails
    // after allocating and creating the veth, and undoes both.
    let broken = node_config_variant(node, "broken", |cfg| {
        cfg["bpffsRoot"] = json!("/run/ferrox-test/does-not-exist");
    });
    let broken_conf = merged(&base, json!({ "nodeConfig": broken }));
    let out = node.cni_raw(&env("ADD", "rb-1", &ns3_path), &broken_conf);
    assert_eq!(error_code(&out), 101);
    assert!(
        allocations(&broken.with_file_name("ipam")).is_empty(),
        "address released"
    );
    let links = node.netns().ip(&["-o", "link", "show", "type", "veth"]);
    assert!(
        !links.contains(&ferrox_cni::pod::host_ifname("rb-1", "eth0")),
        "veth removed: {links}"
    );
}

/// libcni's way of running a chain: ADD through every plugin in order, each given the previous
/// result; DEL in reverse order with the final result.
struct Chain<'a> {
    node: &'a Node,
    plugins: Vec<(PathBuf, Value)>,
}

impl Chain<'_> {
    fn invoke(&self, command: &str, cid: &str, netns: &str, prev: Option<&Value>) -> Value {
        let order: Vec<&(PathBuf, Value)> = if command == "DEL" {
            self.plugins.iter().rev().collect()
        } else {
            self.plugins.iter().collect()
        };
        let mut result = prev.cloned();
        for (bin, conf) in order {
            let mut conf = conf.clone();
            if let Some(r) = &result {
                conf["prevResult"] = r.clone();
            }
            let e = env(command, cid, netns);
            let out = self
                .node
                .cni_spawn(bin, &e, &conf)
                .wait_with_output()
                .unwrap();
            assert!(
                out.status.success(),
                "{command} by {}: {}{}",
                bin.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if command == "ADD" {
                result = Some(stdout_json(&out));
            }
        }
        result.unwrap_or(Value::Null)
    }
}

#[test]
fn chained_before_portmap_bandwidth_and_tuning() {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let ref_plugins = Path::new("/usr/lib/cni");
    assert!(
        ref_plugins.join("portmap").exists(),
        "the reference plugins (containernetworking-plugins) are installed by `cargo xtask setup`"
    );
    let common = json!({ "cniVersion": "1.0.0", "name": "ferrox" });
    let with = |extra: Value| merged(&common, extra);
    let bandwidth = json!({
        "ingressRate": 8_000_000, "ingressBurst": 1_000_000,
        "egressRate": 8_000_000, "egressBurst": 1_000_000
    });
    let chain = Chain {
        node,
        plugins: vec![
            (
                ferrox_tests::harness::bin_path("ferrox-cni"),
                // As libcni passes it: the ferrox entry declares the bandwidth capability.
                merged(
                    &node.cni_conf(),
                    json!({
                        "cniVersion": "1.0.0",
                        "capabilities": { "bandwidth": true },
                        "runtimeConfig": { "bandwidth": bandwidth },
                    }),
                ),
            ),
            (
                ref_plugins.join("portmap"),
                with(json!({
                    "type": "portmap",
                    "capabilities": { "portMappings": true },
                    "snat": true,
                    "runtimeConfig": { "portMappings": [
                        { "hostPort": 18080, "containerPort": 8080, "protocol": "tcp" }
                    ] }
                })),
            ),
            (
                ref_plugins.join("bandwidth"),
                with(json!({
                    "type": "bandwidth",
                    "capabilities": { "bandwidth": true },
                    "runtimeConfig": { "bandwidth": bandwidth }
                })),
            ),
            (
                ref_plugins.join("tuning"),
                with(
                    json!({ "type": "tuning", "sysctl": { "net.ipv4.tcp_keepalive_time": "321" } }),
                ),
            ),
        ],
    };
    let ns = sandbox(&c, "chain");
    let ns_path = ns.path().display().to_string();
    let result = chain.invoke("ADD", "chain-1", &ns_path, None);
    // Every plugin passed ferrox's result along.
    let ip = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ip.ends_with("/32"), "{result}");
    let pod_ip = ip.trim_end_matches("/32").to_owned();

    // tuning: its sysctl landed in the pod.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "sysctl",
            "-n",
            "net.ipv4.tcp_keepalive_time",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "321");

    // bandwidth: a token bucket on the host side of the pod's veth (traffic to the pod).
    let host_ifname = ferrox_cni::pod::host_ifname("chain-1", "eth0");
    let tc = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.netns().name(),
            "tc",
            "qdisc",
            "show",
            "dev",
            &host_ifname,
        ])
        .output()
        .unwrap();
    let tc = String::from_utf8_lossy(&tc.stdout).to_string();
    assert!(tc.contains("tbf"), "a rate limit on {host_ifname}: {tc}");
    // The pod's egress is shaped too (the bandwidth plugin's ingress qdisc, which excludes a
    // clsact one): ferrox attached its program as a TCX link, which needs no qdisc.
    assert!(tc.contains("qdisc ingress"), "{tc}");
    assert!(
        node.layout().pod_link(&host_ifname).exists()
            && node.layout().to_pod_link(&host_ifname).exists(),
        "the pod programs of a shaped pod are pinned TCX links, both ways"
    );
    // Its packets must cross the host veth's qdiscs: not handed straight into the pod.
    let endpoint = ferrox_datapath::Maps::open(&node.layout())
        .unwrap()
        .endpoints
        .get(&ferrox_abi::EndpointKey {
            addr: u32::from_ne_bytes(pod_ip.parse::<std::net::Ipv4Addr>().unwrap().octets()),
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        endpoint.flags,
        ferrox_abi::endpoint_flags::POD,
        "{endpoint:?}"
    );

    // portmap: the host port reaches the pod's server, from another process on the node.
    let pod = node.place_in("chain-pod", &ns.path());
    let _server = pod.serve(8080);
    let (by_backend, _) = node.host().call_tcp(&format!("{}:18080", node.addr), 3);
    assert_eq!(
        by_backend.get("chain-pod"),
        Some(&3),
        "{by_backend:?} (pod {pod_ip})"
    );

    // DEL through the chain: nothing of any plugin is left.
    chain.invoke("DEL", "chain-1", &ns_path, Some(&result));
    let nat = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.netns().name(),
            "iptables-save",
            "-t",
            "nat",
        ])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout).to_string();
    assert!(!nat.contains("18080"), "portmap's rules removed: {nat}");
    assert!(
        !node
            .netns()
            .ip(&["-o", "link", "show"])
            .contains(&host_ifname),
        "the veth is gone"
    );
}

#[test]
fn concurrent_add_and_del_with_killed_plugins_never_share_an_address_and_gc_cleans_up() {
    use std::time::{Duration, Instant};

    const PODS: usize = 200;
    const PARALLEL: usize = 16;
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let conf = node.cni_conf();
    let sandboxes: Vec<NetNs> = (0..PODS).map(|i| sandbox(&c, &format!("q{i}"))).collect();
    let paths: Vec<String> = sandboxes
        .iter()
        .map(|n| n.path().display().to_string())
        .collect();

    // Deterministic pseudo-random choices: which ADDs are killed, after how long, which live
    // pods are deleted again.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let plan: Vec<(bool, u64, bool)> = (0..PODS)
        .map(|_| (rnd(4) == 0, rnd(20), rnd(3) == 0))
        .collect();

    // Sequential latency first: one ADD and one DEL at a time.
    let (mut seq_add, mut seq_del) = (Vec::new(), Vec::new());
    for p in paths.iter().take(30) {
        let started = Instant::now();
        let out = node.cni_raw(&env("ADD", "seq", p), &conf);
        seq_add.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(out.status.success(), "{out:?}");
        let started = Instant::now();
        let out = node.cni_raw(&env("DEL", "seq", p), &conf);
        seq_del.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(out.status.success(), "{out:?}");
    }

    let results = std::sync::Mutex::new(BTreeMap::<usize, (Option<Ipv4Addr>, bool)>::new());
    let add_ms = std::sync::Mutex::new(Vec::new());
    let del_ms = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= PODS {
                        return;
                    }
                    let (kill, after_ms, delete) = plan[i];
                    let cid = format!("q{i}");
                    let e = env("ADD", &cid, &paths[i]);
                    let started = Instant::now();
                    let mut child =
                        node.cni_spawn(&ferrox_tests::harness::bin_path("ferrox-cni"), &e, &conf);
                    if kill {
                        std::thread::sleep(Duration::from_millis(after_ms));
                        let _ = child.kill();
                        let _ = child.wait();
                        results.lock().unwrap().insert(i, (None, false));
                        continue;
                    }
                    let out = child.wait_with_output().unwrap();
                    add_ms
                        .lock()
                        .unwrap()
                        .push(started.elapsed().as_secs_f64() * 1e3);
                    assert!(out.status.success(), "ADD {cid}: {out:?}");
                    let v = stdout_json(&out);
                    let ip: Ipv4Addr = v["ips"][0]["address"]
                        .as_str()
                        .unwrap()
                        .trim_end_matches("/32")
                        .parse()
                        .unwrap();
                    let mut live = true;
                    if delete {
                        let started = Instant::now();
                        let out = node.cni_raw(&env("DEL", &cid, &paths[i]), &conf);
                        del_ms
                            .lock()
                            .unwrap()
                            .push(started.elapsed().as_secs_f64() * 1e3);
                        assert!(out.status.success(), "DEL {cid}: {out:?}");
                        live = false;
                    }
                    results.lock().unwrap().insert(i, (Some(ip), live));
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let live: BTreeMap<usize, Ipv4Addr> = results
        .iter()
        .filter_map(|(i, (ip, live))| ip.filter(|_| *live).map(|ip| (*i, ip)))
        .collect();
    let killed = results.values().filter(|(ip, _)| ip.is_none()).count();
    // No address is held by two live pods.
    let distinct: BTreeSet<Ipv4Addr> = live.values().copied().collect();
    assert_eq!(
        distinct.len(),
        live.len(),
        "an address was handed out twice"
    );

    // GC with the runtime's view: the live attachments.
    let valid: Vec<Value> = live
        .keys()
        .map(|i| json!({ "containerID": format!("q{i}"), "ifname": "eth0" }))
        .collect();
    let out = node.cni_raw(
        &[("CNI_COMMAND", "GC")],
        &merged(&conf, json!({ "cni.dev/valid-attachments": valid })),
    );
    assert!(out.status.success(), "GC: {out:?}");
    let cfg: Value = serde_json::from_slice(&std::fs::read(node.node_config()).unwrap()).unwrap();
    let store = PathBuf::from(cfg["ipamDir"].as_str().unwrap());
    let held: BTreeMap<String, Ipv4Addr> = std::fs::read_dir(store.join("allocations"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_none_or(|x| x != "tmp"))
        .map(|e| {
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            (
                v["containerId"].as_str().unwrap().to_owned(),
                v["ip"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let want: BTreeMap<String, Ipv4Addr> =
        live.iter().map(|(i, ip)| (format!("q{i}"), *ip)).collect();
    assert_eq!(
        held, want,
        "after GC, exactly the live attachments hold addresses"
    );
    // Host veths: exactly the live pods'.
    let veths: BTreeSet<String> = node
        .netns()
        .ip(&["-o", "link", "show", "type", "veth"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .filter(|n| ferrox_cni::pod::is_host_ifname(n))
        .collect();
    let want_veths: BTreeSet<String> = live
        .keys()
        .map(|i| ferrox_cni::pod::host_ifname(&format!("q{i}"), "eth0"))
        .collect();
    assert_eq!(veths, want_veths);

    // Every live pod's attachment is intact (CHECK needs its prevResult: rebuild it).
    for (i, ip) in &live {
        let prev = json!({
            "cniVersion": "1.1.0", "interfaces": [], "ips": [{ "address": format!("{ip}/32") }],
            "routes": [{ "dst": "0.0.0.0/0", "gw": "169.254.1.1" }]
        });
        let out = node.cni_raw(
            &env("CHECK", &format!("q{i}"), &paths[*i]),
            &merged(&conf, json!({ "prevResult": prev })),
        );
        assert!(
            out.status.success(),
            "CHECK q{i}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let mut adds = add_ms.into_inner().unwrap();
    let mut dels = del_ms.into_inner().unwrap();
    let figures = json!({
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "sequential": { "add_p50_ms": pct(&mut seq_add, 0.5), "add_p99_ms": pct(&mut seq_add, 0.99),
                        "del_p50_ms": pct(&mut seq_del, 0.5), "del_p99_ms": pct(&mut seq_del, 0.99) },
        "concurrent_16": { "add_p50_ms": pct(&mut adds, 0.5), "add_p99_ms": pct(&mut adds, 0.99),
                           "del_p50_ms": pct(&mut dels, 0.5), "del_p99_ms": pct(&mut dels, 0.99) },
        "pods": PODS, "killed": killed, "live_after_gc": live.len(),
    });
    eprintln!("cni figures: {figures}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-figures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cni.json"),
        serde_json::to_string_pretty(&figures).unwrap(),
    )
    .unwrap();
    eprintln!(
        "{PODS} ADDs ({PARALLEL} at a time, {killed} killed): ADD p50 {:.1} ms p99 {:.1} ms; DEL p50 {:.1} ms p99 {:.1} ms; {} live after GC",
        pct(&mut adds, 0.5),
        pct(&mut adds, 0.99),
        pct(&mut dels, 0.5),
        pct(&mut dels, 0.99),
        live.len()
    );
    for (i, _) in live {
        let out = node.cni_raw(&env("DEL", &format!("q{i}"), &paths[i]), &conf);
        assert!(out.status.success());
    }
}

/// DEL takes the pod's veth out of service at once (down, no route, renamed; its program's
/// filter stays with it) instead of waiting for the kernel to destroy it; an ADD into the same
/// namespace works right after; the agent's sweep (at its start, then every interval) destroys
/// the retired veths.
#[test]
fn del_retires_the_veth_at_once_and_the_agent_destroys_it_later() {
    // No sweep while the test looks at what DEL left: the next one is at the agent's restart.
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_IPAM_GC_INTERVAL", "3600")
        .build();
    let node = c.node(1);
    let conf = node.cni_conf();
    let ns = sandbox(&c, "r1");
    let ns_path = ns.path().display().to_string();
    let host_ifname = ferrox_cni::pod::host_ifname("cid-r", "eth0");
    let layout = node.layout();
    let links = |kind: &str| -> Vec<(String, bool)> {
        node.netns()
            .ip(&["-o", "link", "show", "type", kind])
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?.split('@').next()?.to_owned();
                Some((name, l.contains(",UP")))
            })
            .collect()
    };
    let pod_filters = || -> Vec<String> {
        let out = node.ferrox(&["datapath", "-o", "json"]);
        let objects: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        objects
            .iter()
            .filter(|o| o["kind"] == "filter")
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let retired_pins = || -> Vec<String> {
        std::fs::read_dir(layout.retired_links_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    for round in 0..2 {
        let out = node.cni_raw(&env("ADD", "cid-r", &ns_path), &conf);
        assert!(out.status.success(), "ADD {round}: {out:?}");
        let ip = stdout_json(&out)["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_owned();
        let ifindex: u32 = node
            .netns()
            .ip(&["-o", "link", "show", &host_ifname])
            .split(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            pod_filters(),
            [
                format!("filters/{host_ifname}"),
                format!("filters-to-pod/{host_ifname}")
            ],
            "a filter out of the pod and one into it"
        );
        assert!(
            !layout.pod_link(&host_ifname).exists() && !layout.to_pod_link(&host_ifname).exists(),
            "a filter has no pin"
        );

        let out = node.cni_raw(&env("DEL", "cid-r", &ns_path), &conf);
        assert!(out.status.success(), "DEL {round}: {out:?}");
        let retired = ferrox_cni::pod::retired_ifname(ifindex);
        let veths = links("veth");
        assert!(
            !veths.iter().any(|(n, _)| *n == host_ifname),
            "the host veth keeps no pod name after DEL: {veths:?}"
        );
        // The namespace is still there, so is the pair: retired, down, with its filter (which
        // goes with it; nothing was pinned for it).
        let (_, up) = veths
            .iter()
            .find(|(n, _)| *n == retired)
            .unwrap_or_else(|| panic!("{retired} in {veths:?}"));
        assert!(!up, "{retired} is down");
        assert!(pod_filters().contains(&format!("filters/{retired}")));
        assert!(pod_filters().contains(&format!("filters-to-pod/{retired}")));
        assert!(retired_pins().is_empty());
        assert_eq!(
            node.netns()
                .ip(&["route", "show", &format!("{ip}/32")])
                .trim(),
            "",
            "no route to the released address"
        );
        assert!(!layout.pod_link(&host_ifname).exists());
        assert!(allocations(&node.ipam_dir()).is_empty());
    }
    // The second ADD found the first attachment's pod side in the namespace and removed it;
    // what is left goes with the agent's next sweep.
    node.kill_agent();
    node.start_agent();
    ferrox_tests::harness::wait_for(
        "the agent to destroy the retired veths and unpin their links",
        std::time::Duration::from_secs(15),
        || {
            let veths = links("veth");
            let pins = retired_pins();
            if veths
                .iter()
                .all(|(n, _)| !ferrox_cni::pod::is_retired_ifname(n))
                && pins.is_empty()
            {
                Ok(())
            } else {
                Err(format!("veths {veths:?}, retired links {pins:?}"))
            }
        },
    );
}
