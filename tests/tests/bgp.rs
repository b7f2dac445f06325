//! Cluster tier: the agent's BGP speaker against BIRD 2, a real router, as an external peer:
//! routes both ways, withdrawals, and graceful restart across an agent restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{path::PathBuf, time::Duration, time::Instant};

use ferrox_tests::harness::{Cluster, ExternalClient, Node, Proc, wait_for};

/// BIRD in the external client's namespace, peering with node-1 (AS 64512) from AS 65001.
struct Bird {
    _proc: Proc,
    dir: PathBuf,
    ext: ExternalClient,
}

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

impl Bird {
    fn start(c: &Cluster, node: &Node, statics: &[&str]) -> Self {
        let ext = c.external_client();
        let dir = std::env::temp_dir().join(format!("ferrox-bird-{}-{}", c.id(), ext.ip));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bird.conf"),
            bird_config(&ext.ip.to_string(), &node.addr.to_string(), statics),
        )
        .unwrap();
        let conf = dir.join("bird.conf").display().to_string();
        let sock = dir.join("bird.ctl").display().to_string();
        let proc = ext.command("bird", &["-f", "-c", &conf, "-s", &sock]);
        Self {
            _proc: proc,
            dir,
            ext,
        }
    }

    fn birdc(&self, args: &[&str]) -> String {
        let sock = self.dir.join("bird.ctl").display().to_string();
        let mut full = vec!["-s", sock.as_str()];
        full.extend_from_slice(args);
        let out = self.ext.command_output("birdc", &full);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Rewrites the static routes and tells BIRD to reload.
    fn set_statics(&self, node: &Node, statics: &[&str]) {
        std::fs::write(
            self.dir.join("bird.conf"),
            bird_config(&self.ext.ip.to_string(), &node.addr.to_string(), statics),
        )
        .unwrap();
        let out = self.birdc(&["configure"]);
        assert!(out.contains("Reconfigured"), "{out}");
    }

    /// The route BIRD put in its namespace's kernel table for `prefix`.
    fn kernel_route(&self, prefix: &str) -> String {
        let out = self
            .ext
            .command_output("ip", &["route", "show", prefix, "proto", "bird"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let bird = Bird::start(&c, n1, &["192.0.2.0/24", "198.51.100.0/24"]);

    // Session up; BIRD learns the node's pod block (into its kernel table)...
    wait_established(n1, "the session to come up");
    let established = started.elapsed();
    let block = n1.pod_cidr.to_string();
    wait_for(
        "BIRD to install the pod block",
        Duration::from_secs(10),
        || {
            let r = bird.kernel_route(&block);
            if r.contains("via 198.18.0.11") {
                Ok(())
            } else {
                Err(format!("{r:?}; birdc: {}", bird.birdc(&["show", "route"])))
            }
        },
    );
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
    bird.set_statics(n1, &["192.0.2.0/24"]);
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
    let bird = Bird::start(&c, n1, &["192.0.2.0/24"]);
    let peers = ferrox_tests::apiserver::ResourceType::cluster(
        ferrox::bgp::PEER_GROUP,
        ferrox::bgp::PEER_VERSION,
        ferrox::bgp::PEER_PLURAL,
        ferrox::bgp::PEER_KIND,
    );
    c.api()
        .apply_value(
            &peers,
            serde_json::json!({
                "apiVersion": "bgp.ferrox.io/v1",
                "kind": "BGPPeer",
                "metadata": { "name": "tor-a" },
                "spec": { "address": "198.18.0.200", "asn": 65001, "holdTime": 6,
                          "password": "tor-a", "nodes": ["node-1"] }
            }),
        )
        .unwrap();
    wait_established(n1, "the session with the BGPPeer");
    let p = bgp_peers(n1).unwrap();
    assert_eq!(p[0]["name"], "tor-a", "{p}");
    assert_eq!(p[0]["holdTime"], 6, "the peer's own hold time: {p}");
    let block = n1.pod_cidr.to_string();
    wait_for(
        "BIRD to install the pod block",
        Duration::from_secs(10),
        || {
            let r = bird.kernel_route(&block);
            if r.contains("via 198.18.0.11") {
                Ok(())
            } else {
                Err(r)
            }
        },
    );

    // Deleting the object closes the session with a Cease: BIRD forgets the node's routes at
    // once (no graceful-restart wait), and the node forgets BIRD's.
    c.api().delete_value(&peers, None, "tor-a").unwrap();
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
