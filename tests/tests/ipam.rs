//! IPAM blocks from pools through the Kubernetes API: concurrent claims never share a block; a
//! node whose blocks fill up gets another one (the plugin asks, the runtime retries); an empty
//! block goes back to the pool.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ferrox::ipam::{self, Pools};
use ferrox_tests::{
    apiserver::{ApiServer, ResourceType},
    harness::{Cluster, NetNs, leaks, wait_for},
};
use ipnet::Ipv4Net;
use serde_json::Value;

fn block_type() -> ResourceType {
    ResourceType::cluster(ipam::GROUP, ipam::VERSION, ipam::PLURAL, ipam::KIND)
}

#[test]
fn nodes_claiming_at_once_never_get_the_same_block() {
    let api = ApiServer::start_local();
    api.register(block_type());
    // Each node claims as the agent does: its ServiceAccount, under the manifest's ClusterRole.
    let token = ferrox_tests::manifests::install_rbac(&api);
    let pools = Pools {
        pools: vec!["10.250.0.0/26".parse().unwrap()],
        block_prefix: 29,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kubeconfig = api.kubeconfig(&token);
    // 12 nodes race for 8 blocks, three times over (releasing everything in between).
    for round in 0..3 {
        let claims: Vec<Option<Ipv4Net>> = rt.block_on(async {
            let tasks: Vec<_> = (0..12)
                .map(|i| {
                    let (pools, kubeconfig) = (pools.clone(), kubeconfig.clone());
                    tokio::spawn(async move {
                        let config = kube::Config::from_custom_kubeconfig(
                            kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap(),
                            &kube::config::KubeConfigOptions::default(),
                        )
                        .await
                        .unwrap();
                        let client = kube::Client::try_from(config).unwrap();
                        ipam::claim(&client, &pools, &format!("node-{i}"))
                            .await
                            .unwrap()
                            .map(|b| b.cidr)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let got: Vec<Ipv4Net> = claims.iter().flatten().copied().collect();
        let distinct: BTreeSet<Ipv4Net> = got.iter().copied().collect();
        assert_eq!(
            got.len(),
            8,
            "round {round}: every block claimed once: {claims:?}"
        );
        assert_eq!(
            distinct.len(),
            8,
            "round {round}: a block went to two nodes: {claims:?}"
        );
        assert_eq!(claims.iter().filter(|c| c.is_none()).count(), 4);
        // The API holds exactly those, each naming the node that got it.
        let objects = api.list_values(&block_type());
        assert_eq!(objects.len(), 8);
        for o in objects {
            api.delete_value(&block_type(), None, o["metadata"]["name"].as_str().unwrap())
                .unwrap();
        }
    }
    let refused: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.code == 401 || r.code == 403)
        .collect();
    assert!(
        refused.is_empty(),
        "claims outside the agent's role: {refused:?}"
    );
}

/// Runs CNI ADD as a runtime does: retried while the plugin says "try again later" (code 11).
/// Returns the address and how many retries it took.
fn add_with_retries(node: &ferrox_tests::harness::Node, cid: &str, netns: &str) -> (Ipv4Addr, u32) {
    let conf = node.cni_conf();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut retries = 0;
    loop {
        let out = node.cni_raw(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", cid),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns),
            ],
            &conf,
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if out.status.success() {
            let ip = v["ips"][0]["address"]
                .as_str()
                .unwrap()
                .trim_end_matches("/32")
                .parse()
                .unwrap();
            return (ip, retries);
        }
        assert_eq!(v["code"], 11, "ADD {cid}: {v}");
        assert!(Instant::now() < deadline, "ADD {cid} kept failing: {v}");
        retries += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_blocks(node: &ferrox_tests::harness::Node) -> Vec<Ipv4Net> {
    let cfg: Value = serde_json::from_slice(&std::fs::read(node.node_config()).unwrap()).unwrap();
    cfg["podCIDRs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_full_block_brings_a_second_one_and_an_emptied_one_goes_back() {
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_IPAM", "pools")
        .agent_env("FERROX_IPAM_POOLS", "10.250.0.0/24")
        .agent_env("FERROX_IPAM_BLOCK_SIZE", "26")
        // Only when full: the plugin's demand marker is what brings the second block.
        .agent_env("FERROX_IPAM_LOW_WATER", "0")
        .agent_env("FERROX_IPAM_RELEASE_AFTER", "1")
        // BIRD listens to what the node announces: each block while the node holds it.
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_PEERS", "bird=198.18.0.200:65001")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    let node = c.node(1);
    let node_addr = vec![node.addr.to_string()];
    let bird = ferrox_tests::harness::bird::Bird::start(&c, |ext| {
        ferrox_tests::harness::bird::listening_config(ext, &node_addr)
    });
    let bird_paths = |prefix: Ipv4Net, want: &[String]| {
        wait_for(
            &format!("BIRD's paths to {prefix}"),
            Duration::from_secs(20),
            || {
                let got = bird.paths(&prefix.to_string());
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        );
    };
    let first = node_blocks(node);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].prefix_len(), 26);
    assert_eq!(
        c.api().list_values(&block_type()).len(),
        1,
        "the block is claimed in the API"
    );

    // 62 usable addresses per /26: the 63rd pod needs a second block.
    const FULL: usize = 62;
    let sandboxes: Vec<NetNs> = (0..FULL + 2)
        .map(|i| NetNs::create(&format!("{}{}-b{i}", leaks::NETNS_PREFIX, c.id())))
        .collect();
    let mut ips = Vec::new();
    let mut retried = 0;
    for (i, ns) in sandboxes.iter().enumerate() {
        let (ip, r) = add_with_retries(node, &format!("b{i}"), &ns.path().display().to_string());
        ips.push(ip);
        retried += r;
    }
    let distinct: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    assert_eq!(distinct.len(), ips.len(), "an address was handed out twice");
    assert!(
        retried > 0,
        "the first ADD past the full block was told to retry"
    );
    let blocks = node_blocks(node);
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let second = *blocks.iter().find(|b| **b != first[0]).unwrap();
    bird_paths(first[0], &node_addr);
    bird_paths(second, &node_addr);
    assert!(ips[..FULL].iter().all(|ip| first[0].contains(ip)));
    assert!(ips[FULL..].iter().all(|ip| second.contains(ip)), "{ips:?}");
    let objects = c.api().list_values(&block_type());
    assert_eq!(objects.len(), 2);
    assert!(
        objects.iter().all(|o| o["spec"]["node"] == "node-1"),
        "{objects:?}"
    );

    // A pod of the second block works: it answers one of the first.
    let last = FULL + 1;
    let server = node.place_in("second", &sandboxes[last].path());
    let _s = server.serve(8080);
    let client = node.place_in("first", &sandboxes[0].path());
    let (by_backend, _) = client.call_tcp(&format!("{}:8080", ips[last]), 2);
    assert_eq!(by_backend.get("second"), Some(&2));

    // Its pods go: the block returns to the pool (after it stayed empty for a second).
    drop(_s);
    for i in FULL..FULL + 2 {
        let out = node.cni_raw(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", &format!("b{i}")),
                ("CNI_IFNAME", "eth0"),
            ],
            &node.cni_conf(),
        );
        assert!(out.status.success());
    }
    wait_for(
        "the empty block to be released",
        Duration::from_secs(20),
        || {
            let blocks = node_blocks(node);
            let objects = c.api().list_values(&block_type()).len();
            if blocks == first && objects == 1 {
                Ok(())
            } else {
                Err(format!("node config {blocks:?}, {objects} objects"))
            }
        },
    );
    bird_paths(second, &[]);
    bird_paths(first[0], &node_addr);
    // The first block, still used, stays.
    for i in 0..FULL {
        let out = node.cni_raw(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", &format!("b{i}")),
                ("CNI_IFNAME", "eth0"),
            ],
            &node.cni_conf(),
        );
        assert!(out.status.success());
    }
}

fn held_addresses(node: &ferrox_tests::harness::Node) -> BTreeSet<Ipv4Addr> {
    let cfg: Value = serde_json::from_slice(&std::fs::read(node.node_config()).unwrap()).unwrap();
    let dir = std::path::PathBuf::from(cfg["ipamDir"].as_str().unwrap()).join("allocations");
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_none_or(|x| x != "tmp"))
        // Readable records only (an unreadable one waits there for the agent's next pass).
        .filter_map(|e| {
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).ok()?;
            v["ip"].as_str()?.parse().ok()
        })
        .collect()
}

#[test]
fn addresses_of_pods_gone_without_a_del_are_released_after_the_grace_period() {
    use k8s_openapi::api::core::v1::Pod;
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_IPAM_LEAK_GRACE", "1")
        .agent_env("FERROX_IPAM_GC_INTERVAL", "1")
        .build();
    let node = c.node(1);
    let gone = c.add_pod(1, "gone");
    let moved = c.add_pod(1, "moved");
    let kept = c.add_pod(1, "kept");
    let _server = kept.serve(8080);
    assert_eq!(
        held_addresses(node),
        BTreeSet::from([gone.ip, moved.ip, kept.ip])
    );

    // The API forgets one pod without the runtime ever calling DEL (its node was down when it
    // was deleted), and another runs in a new sandbox with another address.
    c.api().delete::<Pod>(Some("default"), "gone").unwrap();
    let mut p = c.api().get::<Pod>(Some("default"), "moved").unwrap();
    p.status.as_mut().unwrap().pod_ip = Some("10.244.1.250".into());
    c.api().apply(&p);

    wait_for(
        "the leaked addresses to be released",
        Duration::from_secs(30),
        || {
            let held = held_addresses(node);
            if held == BTreeSet::from([kept.ip]) {
                Ok(())
            } else {
                Err(format!("{held:?}"))
            }
        },
    );
    // With their veths.
    let veths = node.netns().ip(&["-o", "link", "show", "type", "veth"]);
    for pod in [&gone, &moved] {
        let name = ferrox_cni::pod::host_ifname(&pod.container_id, "eth0");
        assert!(!veths.contains(&name), "{name} left behind: {veths}");
    }
    // The live pod is untouched across further checks, and still serves.
    let checks = || {
        node.agent_log()
            .iter()
            .filter(|l| l.contains("IPAM leak check"))
            .count()
    };
    let seen = checks();
    wait_for("three more leak checks", Duration::from_secs(30), || {
        if checks() >= seen + 3 {
            Ok(())
        } else {
            Err(format!("{} checks", checks() - seen))
        }
    });
    assert_eq!(held_addresses(node), BTreeSet::from([kept.ip]));
    let (by_backend, _) = node.host().call_tcp(&format!("{}:8080", kept.ip), 2);
    assert_eq!(by_backend.get("kept"), Some(&2));
}

#[test]
fn the_ipam_cli_shows_checks_and_releases() {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let pods = [c.add_pod(1, "a"), c.add_pod(1, "b"), c.add_pod(1, "c")];
    let json = |args: &[&str]| -> (bool, Value) {
        let out = node.ferrox_output(args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v)
    };

    let (ok, show) = json(&["ipam", "show", "-o", "json"]);
    assert!(ok);
    assert_eq!(show["mode"], "kubernetes");
    assert_eq!(show["blocks"][0]["cidr"], node.pod_cidr.to_string());
    assert_eq!(show["blocks"][0]["used"], 3);
    let listed: BTreeSet<(String, String)> = show["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["veth"], true);
            (
                a["ip"].as_str().unwrap().to_owned(),
                a["pod"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = pods
        .iter()
        .map(|p| (p.ip.to_string(), format!("default/{}", p.name)))
        .collect();
    assert_eq!(listed, want);
    let (ok, problems) = json(&["ipam", "check", "-o", "json"]);
    assert!(ok, "{problems}");
    assert_eq!(problems, serde_json::json!([]));

    // Damage: a's veth deleted behind the plugin's back, a stray veth of ours.
    let a_veth = ferrox_cni::pod::host_ifname(&pods[0].container_id, "eth0");
    node.netns().ip(&["link", "del", &a_veth]);
    node.netns().ip(&[
        "link",
        "add",
        "fx0123456789a",
        "type",
        "veth",
        "peer",
        "name",
        "fxtpeer",
    ]);
    let (ok, problems) = json(&["ipam", "check", "-o", "json"]);
    assert!(!ok, "problems make the status non-zero");
    let kinds: BTreeSet<&str> = problems
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["problem"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["allocation-without-veth", "veth-without-allocation"]),
        "{problems}"
    );

    // Release a's address by hand: its allocation and endpoint entry go.
    let out = node.ferrox_output(&["ipam", "release", &pods[0].ip.to_string()]);
    assert!(out.status.success(), "{out:?}");
    node.netns().ip(&["link", "del", "fx0123456789a"]);
    let (ok, problems) = json(&["ipam", "check", "-o", "json"]);
    assert!(ok, "{problems}");
    assert_eq!(
        held_addresses(node),
        BTreeSet::from([pods[1].ip, pods[2].ip])
    );
    // Releasing what nobody holds is an error that says so.
    let out = node.ferrox_output(&["ipam", "release", "10.99.99.99"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no allocation holds 10.99.99.99"));
}

#[test]
fn nodes_starting_together_in_pools_mode_get_disjoint_blocks() {
    let c = Cluster::builder()
        .nodes(3)
        .agent_env("FERROX_IPAM", "pools")
        .agent_env("FERROX_IPAM_POOLS", "10.250.0.0/24")
        .agent_env("FERROX_IPAM_BLOCK_SIZE", "26")
        .build();
    let mut all = BTreeSet::new();
    for node in c.nodes() {
        let blocks = node_blocks(node);
        assert_eq!(blocks.len(), 1, "{}: {blocks:?}", node.name);
        assert!(
            all.insert(blocks[0]),
            "{} got a block another node has",
            node.name
        );
    }
    let objects = c.api().list_values(&block_type());
    let owners: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                o["spec"]["cidr"].as_str().unwrap().to_owned(),
                o["spec"]["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = c
        .nodes()
        .iter()
        .map(|n| (node_blocks(n)[0].to_string(), n.name.clone()))
        .collect();
    assert_eq!(owners, want);
    // And a pod on each gets an address of its node's block.
    for node in c.nodes() {
        let pod = c.add_pod(node.index, &format!("p{}", node.index));
        assert!(node_blocks(node)[0].contains(&pod.ip));
    }
}

#[test]
fn a_garbage_file_in_the_store_leaves_add_and_del_working() {
    let c = Cluster::builder().nodes(1).build();
    let node = c.node(1);
    let first = c.add_pod(1, "first");
    // A record truncated by a crash, for the address allocation would hand out next, and a
    // stray file someone left there.
    let next = Ipv4Addr::from(u32::from(first.ip) + 1);
    let allocations = node.ipam_dir().join("allocations");
    std::fs::write(allocations.join(next.to_string()), br#"{"ip":"#).unwrap();
    std::fs::write(allocations.join("README"), b"not a record").unwrap();

    let second = c.add_pod(1, "second");
    assert_ne!(
        second.ip, next,
        "the address of an unreadable record was handed out"
    );
    let out = c.cni_del(&first);
    assert!(out.status.success(), "DEL: {out:?}");
    assert_eq!(held_addresses(node), BTreeSet::from([second.ip]));

    // Reported, with the address it keeps out of use (moved aside by the agent's next pass);
    // the stray file was moved aside by the ADD.
    let out = node.ferrox_output(&["ipam", "check", "-o", "json"]);
    assert!(!out.status.success(), "an unreadable record is a problem");
    let problems: Value = serde_json::from_slice(&out.stdout).unwrap();
    let unreadable: Vec<&Value> = problems
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["problem"] == "unreadable-record")
        .collect();
    assert_eq!(unreadable.len(), 2, "{problems}");
    assert!(
        unreadable.iter().any(|p| p["ip"] == next.to_string()),
        "{problems}"
    );
    assert!(
        unreadable.iter().any(|p| p["ip"].is_null()
            && p["path"].as_str().unwrap().contains("set-aside/README.")),
        "{problems}"
    );
    let status: Value = serde_json::from_str(&node.ferrox(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["ipam"]["unreadable_records"], 2, "{status}");
    // An operator frees the address by hand; the stray file stays reported.
    let out = node.ferrox_output(&["ipam", "release", &next.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let problems: Value =
        serde_json::from_slice(&node.ferrox_output(&["ipam", "check", "-o", "json"]).stdout)
            .unwrap();
    assert_eq!(problems.as_array().unwrap().len(), 1, "{problems}");
}
