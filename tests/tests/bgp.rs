//! Cluster tier: the agent's BGP speaker against BIRD 2, a real router, as an external peer:
//! routes both ways, withdrawals, and graceful restart across an agent restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{path::PathBuf, time::Duration, time::Instant};

use ferrox_tests::harness::{Cluster, Node, bird::Bird, wait_for};

/// The TCP MD5 key both sides use.
const PASSWORD: &str = "s3cret-md5";

fn bird_config(ext_ip: &str, node_ip: &str, statics: &[&str]) -> String {
    let routes: String = statics
        .iter()
        .map(|r| format!("  route {r} blackhole;\n"))
        .collect();
    format!(
        "router id {ext_ip};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; scan time 1; }}\n\
         protocol static {{ ipv4;\n{routes}}}\n\
         protocol bgp node1 {{\n  local {ext_ip} as 65001;\n  neighbor {node_ip} as 64512;\n  \
           hold time 9; connect retry time 1; graceful restart on; password \"{PASSWORD}\";\n  \
           ipv4 {{ import all; export all; next hop self; }};\n}}\n"
    )
}

/// BIRD as the route reflector of every node (iBGP, AS 64512): the nodes are its clients.
fn bird_rr_config(ext_ip: &str, nodes: &[&Node]) -> String {
    let mut conf = format!(
        "router id {ext_ip};\n\
         protocol device {{ scan time 1; }}\n\
         template bgp nodes {{\n  local {ext_ip} as 64512;\n  direct;\n  rr client;\n  \
           rr cluster id {RR_CLUSTER};\n  hold time 9; connect retry time 1;\n  \
           ipv4 {{ import all; export all; }};\n}}\n"
    );
    for (i, n) in nodes.iter().enumerate() {
        conf += &format!(
            "protocol bgp node{} from nodes {{ neighbor {} as 64512; }}\n",
            i + 1,
            n.addr
        );
    }
    conf
}

/// BIRD's cluster ID as a route reflector.
const RR_CLUSTER: &str = "10.255.0.1";

/// Rewrites BIRD's static routes (as an external peer of `node`) and has it reload.
fn set_statics(bird: &Bird, node: &Node, statics: &[&str]) {
    bird.reconfigure(&bird_config(
        &bird.ext.ip.to_string(),
        &node.addr.to_string(),
        statics,
    ));
}

/// BIRD as an external peer of `node` (AS 65001), announcing `statics`.
fn external_bird(c: &Cluster, node: &Node, statics: &[&str]) -> Bird {
    let node = node.addr.to_string();
    Bird::start(c, |ext_ip| bird_config(ext_ip, &node, statics))
}

/// Waits until BIRD has put `prefix` in its kernel table via `node`.
fn wait_bird_installs(bird: &Bird, prefix: &str, node: &Node) {
    let via = format!("via {}", node.addr);
    wait_for(
        "BIRD to install the pod block",
        Duration::from_secs(10),
        || {
            let r = bird.kernel_route(prefix);
            if r.contains(&via) {
                Ok(())
            } else {
                Err(format!("{r:?}; birdc: {}", bird.birdc(&["show", "route"])))
            }
        },
    );
}

fn peer_type() -> ferrox_tests::apiserver::ResourceType {
    ferrox_tests::apiserver::ResourceType::cluster(
        ferrox::bgp::peers::PEER_GROUP,
        ferrox::bgp::peers::PEER_VERSION,
        ferrox::bgp::peers::PEER_PLURAL,
        ferrox::bgp::peers::PEER_KIND,
    )
}

/// Creates (or replaces) the `BGPPeer` `name` with `spec`.
fn apply_peer(c: &Cluster, name: &str, spec: serde_json::Value) {
    c.api()
        .apply_value(
            &peer_type(),
            serde_json::json!({
                "apiVersion": "bgp.ferrox.io/v1", "kind": "BGPPeer",
                "metadata": { "name": name }, "spec": spec
            }),
        )
        .unwrap();
}

/// A fresh directory under the system's temporary directory, removed at the end of the run.
fn tempfile_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrox-bgp-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn owned_route(node: &Node, prefix: &str) -> Option<String> {
    node.netns()
        .ip(&["route", "show", "proto", "243"])
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
}

/// `ferrox bgp peers -o json`; an error while the agent's socket is not up yet.
fn bgp_peers(node: &Node) -> Result<serde_json::Value, String> {
    let out = node.ferrox_output(&["bgp", "peers", "-o", "json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn wait_established(node: &Node, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        let p = bgp_peers(node)?;
        if p[0]["state"] == "established" {
            Ok(())
        } else {
            Err(p.to_string())
        }
    });
}

#[test]
fn bird_as_an_external_peer_routes_both_ways_withdraws_and_survives_an_agent_restart() {
    // The first external client is 198.18.0.200: the peer the agent is told about. BIRD insists
    // on a TCP MD5 signature: the session only comes up if the agent signs with the key it
    // reads from its password directory (where a Secret would be mounted).
    let keys = tempfile_dir("keys");
    std::fs::write(keys.join("bird"), format!("{PASSWORD}\n")).unwrap();
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_BGP_PASSWORD_DIR", &keys.display().to_string())
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_PEERS", "bird=198.18.0.200:65001")
        .agent_env("FERROX_BGP_HOLD_TIME", "9")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    let n1 = c.node(1);
    let pod = c.add_pod(1, "web");
    let _srv = pod.serve(8080);
    let started = Instant::now();
    let bird = external_bird(&c, n1, &["192.0.2.0/24", "198.51.100.0/24"]);

    // Session up; BIRD learns the node's pod block (into its kernel table)...
    wait_established(n1, "the session to come up");
    let established = started.elapsed();
    let block = n1.pod_cidr.to_string();
    wait_bird_installs(&bird, &block, n1);
    // ... and the node learns BIRD's routes (as kernel routes, never in IP-in-IP: BIRD is not
    // a node).
    for prefix in ["192.0.2.0/24", "198.51.100.0/24"] {
        wait_for(
            "the node to install BIRD's route",
            Duration::from_secs(10),
            || match owned_route(n1, prefix) {
                Some(r) if r.contains("via 198.18.0.200") && !r.contains("mtu") => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    println!(
        "figure: session up and routes exchanged {:.2} s after BIRD started (connect retry 1 s)",
        established.as_secs_f64()
    );
    let routes: serde_json::Value =
        serde_json::from_str(&n1.ferrox(&["bgp", "routes", "-o", "json"])).unwrap();
    assert_eq!(routes.as_array().unwrap().len(), 2, "{routes}");
    let status = n1.ferrox(&["status"]);
    assert!(
        status.contains("bgp         1 of 1 sessions established, 2 prefixes received"),
        "{status}"
    );
    let peers = bgp_peers(n1).unwrap();
    assert_eq!(peers[0]["received"], 2, "{peers}");
    assert_eq!(peers[0]["advertised"], 1, "{peers}");
    assert_eq!(peers[0]["gracefulRestart"], true, "{peers}");

    // Traffic from outside to the pod follows the route BIRD learned (the external client's
    // default route knows nothing of pods).
    let (by, _) = bird.ext.call_tcp(&format!("{}:8080", pod.ip), 3);
    assert_eq!(by.get("web"), Some(&3), "{by:?}");

    // A withdrawal at BIRD removes the node's route.
    set_statics(&bird, n1, &["192.0.2.0/24"]);
    wait_for(
        "the withdrawn route to go",
        Duration::from_secs(10),
        || match owned_route(n1, "198.51.100.0/24") {
            None => Ok(()),
            Some(r) => Err(r),
        },
    );
    assert!(owned_route(n1, "192.0.2.0/24").is_some());

    // Graceful restart: the agent dies; BIRD keeps the pod block while it is away, and pod
    // traffic from outside goes on.
    n1.kill_agent();
    wait_for(
        "BIRD to notice the session is gone",
        Duration::from_secs(20),
        || {
            let p = bird.birdc(&["show", "protocols", "node1"]);
            if p.contains("Established") {
                Err(p)
            } else {
                Ok(())
            }
        },
    );
    assert!(
        bird.kernel_route(&block).contains("via 198.18.0.11"),
        "BIRD keeps the node's routes during its restart: {}",
        bird.birdc(&["show", "route", "all"])
    );
    let (by, _) = bird.ext.call_tcp(&format!("{}:8080", pod.ip), 3);
    assert_eq!(
        by.get("web"),
        Some(&3),
        "traffic while the agent is down: {by:?}"
    );
    // The node's learned route stays in its kernel too (nothing removes it while the agent is
    // down).
    assert!(owned_route(n1, "192.0.2.0/24").is_some());
    n1.start_agent();
    n1.wait_agent_ready();
    wait_established(n1, "the session to come back");
    assert!(bird.kernel_route(&block).contains("via 198.18.0.11"));
    wait_for(
        "the node's learned route after the restart",
        Duration::from_secs(10),
        || owned_route(n1, "192.0.2.0/24").ok_or_else(|| "missing".to_owned()),
    );
    drop(bird);
    drop(c);
    let _ = std::fs::remove_dir_all(&keys);
}

#[test]
fn nodes_form_an_ibgp_full_mesh_and_learn_each_others_blocks() {
    let c = Cluster::builder()
        .nodes(3)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    for n in c.nodes() {
        wait_for("every session established", Duration::from_secs(30), || {
            let p = bgp_peers(n)?;
            let peers = p.as_array().cloned().unwrap_or_default();
            if peers.len() == 2 && peers.iter().all(|x| x["state"] == "established") {
                Ok(())
            } else {
                Err(p.to_string())
            }
        });
    }
    let routes: serde_json::Value =
        serde_json::from_str(&c.node(1).ferrox(&["bgp", "routes", "-o", "json"])).unwrap();
    let got: Vec<String> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} via {}",
                r["prefix"].as_str().unwrap(),
                r["nextHops"][0].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            format!("{} via {}", c.node(2).pod_cidr, c.node(2).addr),
            format!("{} via {}", c.node(3).pod_cidr, c.node(3).addr),
        ]
    );
    // Pods reach each other (the routes from the API and from BGP agree).
    let a = c.add_pod(1, "a");
    let b = c.add_pod(3, "b");
    let _s = b.serve(8080);
    let (by, _) = a.call_tcp(&format!("{}:8080", b.ip), 3);
    assert_eq!(by.get("b"), Some(&3), "{by:?}");
}

#[test]
fn a_bgp_peer_object_adds_a_router_and_deleting_it_closes_the_session() {
    let keys = tempfile_dir("crd-keys");
    std::fs::write(keys.join("tor-a"), PASSWORD).unwrap();
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_PASSWORD_DIR", &keys.display().to_string())
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    let n1 = c.node(1);
    let bird = external_bird(&c, n1, &["192.0.2.0/24"]);
    apply_peer(
        &c,
        "tor-a",
        serde_json::json!({ "address": "198.18.0.200", "asn": 65001, "holdTime": 6,
                          "password": "tor-a", "nodes": ["node-1"] }),
    );
    wait_established(n1, "the session with the BGPPeer");
    let p = bgp_peers(n1).unwrap();
    assert_eq!(p[0]["name"], "tor-a", "{p}");
    assert_eq!(p[0]["holdTime"], 6, "the peer's own hold time: {p}");
    let block = n1.pod_cidr.to_string();
    wait_bird_installs(&bird, &block, n1);

    // Deleting the object closes the session with a Cease: BIRD forgets the node's routes at
    // once (no graceful-restart wait), and the node forgets BIRD's.
    c.api().delete_value(&peer_type(), None, "tor-a").unwrap();
    wait_for(
        "BIRD to drop the pod block",
        Duration::from_secs(10),
        || {
            let r = bird.kernel_route(&block);
            if r.is_empty() { Ok(()) } else { Err(r) }
        },
    );
    wait_for(
        "the node to drop BIRD's route",
        Duration::from_secs(10),
        || match owned_route(n1, "192.0.2.0/24") {
            None => Ok(()),
            Some(r) => Err(r),
        },
    );
    let p = bgp_peers(n1).unwrap();
    assert_eq!(p.as_array().map(Vec::len), Some(0), "{p}");
    let proto = bird.birdc(&["show", "protocols", "all", "node1"]);
    assert!(
        proto.contains("de-configured") || proto.contains("Peer de-configured"),
        "{proto}"
    );
    drop(bird);
    drop(c);
    let _ = std::fs::remove_dir_all(&keys);
}

/// `ferrox bgp routes -o json` as "prefix via next-hop from peer [originator; cluster list]".
fn bgp_routes(node: &Node) -> Vec<String> {
    let routes: serde_json::Value =
        serde_json::from_str(&node.ferrox(&["bgp", "routes", "-o", "json"])).unwrap();
    routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |v: &serde_json::Value| {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_str().unwrap().to_owned())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            };
            format!(
                "{} via {} from {} [{}; {}]",
                r["prefix"].as_str().unwrap(),
                list(&r["nextHops"]),
                list(&r["peers"]),
                r["originatorId"].as_str().unwrap_or("-"),
                list(&r["clusterList"]),
            )
        })
        .collect()
}

/// Waits until `node` has exactly the BGP sessions `want` (addresses), all established.
fn wait_sessions(node: &Node, want: &[String]) {
    wait_for(
        &format!("{}'s sessions {want:?}", node.name),
        Duration::from_secs(30),
        || {
            let p = bgp_peers(node)?;
            let mut got: Vec<String> = p
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|x| x["state"] == "established")
                .map(|x| x["addr"].as_str().unwrap_or("").to_owned())
                .collect();
            got.sort();
            let total = p.as_array().map_or(0, Vec::len);
            if got == want && total == want.len() {
                Ok(())
            } else {
                Err(p.to_string())
            }
        },
    );
}

#[test]
fn bird_as_route_reflector_passes_each_nodes_block_to_the_others() {
    // Mesh off: the nodes peer only with BIRD (a BGPPeer in their own AS, for every node), and
    // learn each other's blocks from it, next hop unchanged, tagged by the reflector.
    let c = Cluster::builder()
        .nodes(3)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_MESH", "false")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    let nodes: Vec<&Node> = c.nodes().iter().collect();
    let bird = Bird::start(&c, |ext_ip| bird_rr_config(ext_ip, &nodes));
    apply_peer(
        &c,
        "rr",
        serde_json::json!({ "address": bird.ext.ip.to_string(), "asn": 64512 }),
    );
    for n in c.nodes() {
        wait_sessions(n, &[bird.ext.ip.to_string()]);
    }
    for n in c.nodes() {
        let want: Vec<String> = c
            .nodes()
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| {
                format!(
                    "{} via {} from {} [{}; {RR_CLUSTER}]",
                    o.pod_cidr, o.addr, bird.ext.ip, o.addr
                )
            })
            .collect();
        wait_for(
            &format!("{} to learn the other blocks from BIRD", n.name),
            Duration::from_secs(10),
            || {
                let got = bgp_routes(n);
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?} want {want:?}"))
                }
            },
        );
    }
    // BIRD holds each block once, from its node.
    let table = bird.birdc(&["show", "route"]);
    for n in c.nodes() {
        assert!(
            table.contains(&n.pod_cidr.to_string()),
            "{} missing: {table}",
            n.pod_cidr
        );
    }
    let a = c.add_pod(2, "a");
    let b = c.add_pod(3, "b");
    let _s = b.serve(8080);
    let (by, _) = a.call_tcp(&format!("{}:8080", b.ip), 3);
    assert_eq!(by.get("b"), Some(&3), "{by:?}");
}

#[test]
fn a_node_annotated_as_route_reflector_reflects_between_the_others() {
    use k8s_openapi::api::core::v1::Node as K8sNode;
    let c = Cluster::builder()
        .nodes(3)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_MESH", "false")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .build();
    let addr = |i: usize| c.node(i).addr.to_string();
    // No mesh and no reflector yet: no sessions at all.
    wait_sessions(c.node(2), &[]);
    // node-1 becomes a reflector: it peers with both others (its clients), they with it only.
    let set_cluster = |node: &str, value: Option<&str>| {
        let mut n: K8sNode = c.api().get(None, node).unwrap();
        let ann = n.metadata.annotations.get_or_insert_with(Default::default);
        match value {
            Some(v) => ann.insert(
                ferrox::bgp::peers::RR_CLUSTER_ID_ANNOTATION.into(),
                v.into(),
            ),
            None => ann.remove(ferrox::bgp::peers::RR_CLUSTER_ID_ANNOTATION),
        };
        c.api().replace(&n).unwrap();
    };
    set_cluster("node-1", Some("10.255.9.9"));
    wait_sessions(c.node(1), &[addr(2), addr(3)]);
    wait_sessions(c.node(2), &[addr(1)]);
    wait_sessions(c.node(3), &[addr(1)]);
    let peers = bgp_peers(c.node(1)).unwrap();
    assert!(
        peers
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["rrClient"] == true),
        "{peers}"
    );
    // node-2 learns node-3's block from node-1, next hop node-3, originator node-3, through
    // cluster 10.255.9.9; and node-1's own block from node-1 directly (not reflected).
    let n1 = c.node(1);
    let n3 = c.node(3);
    let want = vec![
        format!("{} via {} from {} [-; ]", n1.pod_cidr, n1.addr, n1.addr),
        format!(
            "{} via {} from {} [{}; 10.255.9.9]",
            n3.pod_cidr, n3.addr, n1.addr, n3.addr
        ),
    ];
    wait_for(
        "node-2 to learn node-3's block through node-1",
        Duration::from_secs(10),
        || {
            let got = bgp_routes(c.node(2));
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?} want {want:?}"))
            }
        },
    );
    // The reflector keeps the clients' paths as they are (nothing reflected back to it).
    let on_rr = bgp_routes(n1);
    assert_eq!(on_rr.len(), 2, "{on_rr:?}");
    assert!(on_rr.iter().all(|r| r.ends_with("[-; ]")), "{on_rr:?}");

    // node-2 becomes a reflector too: node-3 now peers with both; node-1 keeps its session
    // with node-2 as it was (only its client flag changes: no restart).
    set_cluster("node-2", Some("10.255.9.9"));
    wait_sessions(c.node(3), &[addr(1), addr(2)]);
    wait_for(
        "node-2 to be a non-client peer of node-1",
        Duration::from_secs(10),
        || {
            let p = bgp_peers(n1)?;
            let to2 = p
                .as_array()
                .and_then(|a| a.iter().find(|x| x["addr"] == addr(2).as_str()).cloned())
                .ok_or_else(|| p.to_string())?;
            if to2["rrClient"] == false && to2["state"] == "established" {
                Ok(to2)
            } else {
                Err(to2.to_string())
            }
        },
    );
    // Seen from node-2: its session with node-1 came up once and never went down (a restart
    // by node-1 would have been a Cease and a second establishment).
    let on2 = bgp_peers(c.node(2)).unwrap();
    let to1 = on2
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["addr"] == addr(1).as_str())
        .unwrap();
    assert_eq!(to1["establishedCount"], 1, "{to1}");

    // No longer reflectors: the sessions go, and with them the reflected routes.
    set_cluster("node-2", None);
    set_cluster("node-1", None);
    wait_sessions(c.node(2), &[]);
    wait_for(
        "node-2 to forget the reflected routes",
        Duration::from_secs(10),
        || {
            let got = bgp_routes(c.node(2));
            if got.is_empty() {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
}

#[test]
fn the_node_installs_100k_routes_from_bird_and_removes_them_on_withdrawal() {
    // Correctness at scale: every one of 100,000 prefixes becomes a kernel route via BIRD, and
    // every one goes when BIRD withdraws them. The times are printed, not asserted (the bench
    // records them from a release build).
    let c = ferrox_tests::harness::bird::learning_cluster();
    let l = ferrox_tests::harness::bird::learn_and_forget(&c, c.node(1), 100_000);
    for l in c.node(1).agent_log() {
        if l.contains("routes programmed") {
            println!("{l}");
        }
    }
    println!(
        "figure: 100,000 routes from BIRD programmed {:.2} s after birdc configure ({:.2} s of \
         it BIRD reading its configuration), withdrawn in {:.2} s",
        l.learned.as_secs_f64(),
        l.bird_configure.as_secs_f64(),
        l.withdrawn.as_secs_f64()
    );
}

#[test]
fn service_addresses_are_announced_and_local_policy_ones_only_by_nodes_with_an_endpoint() {
    use ferrox::services::testing::{slice, svc};
    let c = Cluster::builder()
        .nodes(2)
        .agent_env("FERROX_BGP", "true")
        .agent_env("FERROX_BGP_CONNECT_RETRY", "1")
        .agent_env(
            "FERROX_BGP_SERVICE_CLUSTER_IPS",
            ferrox_tests::harness::SERVICE_CIDR,
        )
        .build();
    let nodes: Vec<String> = c.nodes().iter().map(|n| n.addr.to_string()).collect();
    let bird = Bird::start(&c, |ext| {
        ferrox_tests::harness::bird::listening_config(ext, &nodes)
    });
    apply_peer(
        &c,
        "tor",
        serde_json::json!({ "address": bird.ext.ip.to_string(), "asn": 65001,
                          "export": ["podBlocks", "serviceClusterIPs", "serviceExternalIPs",
                                     "serviceLoadBalancerIPs"] }),
    );
    let web2 = c.add_pod(2, "web-2");
    let _s2 = web2.serve(8080);
    // eTP=Local with its only endpoint on node-2; eTP=Cluster with the same endpoint.
    c.api().apply(
        &svc("local")
            .cluster_ip("10.96.7.40")
            .external_ip("203.0.113.40")
            .external_traffic_policy("Local")
            .port("http", 80, "TCP")
            .build(),
    );
    c.api().apply(
        &svc("cluster")
            .cluster_ip("10.96.7.41")
            .load_balancer("203.0.113.41")
            .port("http", 80, "TCP")
            .build(),
    );
    for s in ["local", "cluster"] {
        c.api().apply(
            &slice(s, &format!("{s}-1"))
                .port("http", 8080, "TCP")
                .ready_on(web2.ip, "node-2")
                .build(),
        );
    }
    let wait_paths = |prefix: &str, want: &[&String]| {
        let want: Vec<String> = want.iter().map(|s| (*s).clone()).collect();
        wait_for(
            &format!("BIRD's paths to {prefix}"),
            Duration::from_secs(20),
            || {
                let got = bird.paths(prefix);
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?} want {want:?}"))
                }
            },
        );
    };
    let (n1, n2) = (&nodes[0], &nodes[1]);
    wait_paths(ferrox_tests::harness::SERVICE_CIDR, &[n1, n2]);
    wait_paths("203.0.113.41/32", &[n1, n2]);
    wait_paths("203.0.113.40/32", &[n2]);
    wait_paths(&c.node(1).pod_cidr.to_string(), &[n1]);
    // From outside, over the route BIRD learned (the client's own routes know nothing of
    // 203.0.113.40): answered by the endpoint on node-2, from the Service's address.
    let (by, peers_seen) = bird.ext.call_tcp("203.0.113.40:80", 3);
    assert_eq!(by.get("web-2"), Some(&3), "{by:?}");
    assert!(
        peers_seen.iter().all(|p| p == "203.0.113.40:80"),
        "{peers_seen:?}"
    );

    // The endpoint moves to node-1: so does the /32.
    let web1 = c.add_pod(1, "web-1");
    let _s1 = web1.serve(8080);
    c.api().apply(
        &slice("local", "local-1")
            .port("http", 8080, "TCP")
            .ready_on(web1.ip, "node-1")
            .build(),
    );
    wait_paths("203.0.113.40/32", &[n1]);
    let (by, _) = bird.ext.call_tcp("203.0.113.40:80", 3);
    assert_eq!(by.get("web-1"), Some(&3), "{by:?}");
    // And when the Service goes, so does its address.
    c.api()
        .delete::<k8s_openapi::api::core::v1::Service>(Some("default"), "local")
        .unwrap();
    wait_paths("203.0.113.40/32", &[]);
}
