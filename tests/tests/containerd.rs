//! Container runtime tier: pods started by containerd 1.6 (Debian's, with runc) through its CRI,
//! the way the kubelet starts them, on nodes whose CNI configuration the real
//! `ferrox install-cni` wrote (ferrox's plugin, then the reference portmap plugin). The runtime
//! negotiates the CNI version from that file, calls ADD once and DEL twice per pod (with the
//! network namespace on StopPodSandbox, without it on RemovePodSandbox).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use ferrox::services::testing::{slice, svc};
use ferrox_tests::harness::{Cluster, Node, containerd::Containerd, wait_for};
use serde_json::Value;

/// The addresses the node's IPAM store holds.
fn held(node: &Node) -> BTreeSet<Ipv4Addr> {
    let show: Value = serde_json::from_str(&node.ferrox(&["ipam", "show", "-o", "json"])).unwrap();
    show["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// The node's pod endpoints as `ferrox endpoints` lists them: address -> host-side veth.
fn endpoints(node: &Node) -> Vec<(Ipv4Addr, Option<String>)> {
    let rows: Value = serde_json::from_str(&node.ferrox(&["endpoints", "-o", "json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ip"].as_str().unwrap().parse().unwrap(),
                r["veth"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// `ferrox ipam check` finds nothing wrong.
fn check_clean(node: &Node) {
    let out = node.ferrox_output(&["ipam", "check", "-o", "json"]);
    assert!(
        out.status.success(),
        "ipam check on {}: {}",
        node.name,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn pods_started_by_containerd_serve_every_service_kind_and_leave_nothing_behind() {
    let c = Cluster::builder().nodes(2).build();
    let (n1, n2) = (c.node(1), c.node(2));
    let mut rt1 = Containerd::start(&c, 1);
    let mut rt2 = Containerd::start(&c, 2);
    let (runtime, version) = rt1.cri().version().unwrap();
    assert_eq!(runtime, "containerd");
    eprintln!("runtime: {runtime} {version}");

    // The configuration containerd read: a version its libcni accepts, portmap chained.
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(n1.host_path("/etc/cni/net.d/05-ferrox.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0", "{conflist}");
    assert_eq!(conflist["plugins"][0]["type"], "ferrox-cni");
    assert_eq!(conflist["plugins"][1]["type"], "portmap");

    let web1 = rt1.run_pod("web-1", None);
    let web2 = rt2.run_pod("web-2", Some(30090));
    let client = rt1.run_pod("client", None);
    assert!(n1.pod_cidr.contains(&web1.ip) && n1.pod_cidr.contains(&client.ip));
    assert!(n2.pod_cidr.contains(&web2.ip));
    assert_ne!(web1.ip, client.ip);
    assert_eq!(held(n1), BTreeSet::from([web1.ip, client.ip]));
    let eps: Vec<Ipv4Addr> = endpoints(n1).into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(eps.len(), 2, "{eps:?}");

    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.7.7")
            .port_np("http", 80, 30707, "TCP")
            .node_port_type()
            .build(),
    );
    c.api().apply(
        &slice("web", "web-1")
            .port("http", 8080, "TCP")
            .ready_on(web1.ip, &n1.name)
            .ready_on(web2.ip, &n2.name)
            .build(),
    );
    n1.wait_for_backends("10.96.7.7:80/TCP", 2);
    n1.wait_for_entry(
        &format!("{}:30707/TCP", n1.addr),
        ferrox::services::model::Scope::External,
        2,
    );

    // A ClusterIP from inside a container: translated by the socket hooks of the node's cgroup,
    // which the runtime's containers are in.
    let answers = wait_for(
        "both backends through the ClusterIP",
        Duration::from_secs(30),
        || {
            let a = rt1.call_tcp(&client, "10.96.7.7:80", 20);
            if a.len() == 2 && a.values().sum::<usize>() == 20 {
                Ok(a)
            } else {
                Err(format!("{a:?}"))
            }
        },
    );
    assert!(answers.contains_key("web-1") && answers.contains_key("web-2"));

    // The NodePort, and the hostPort pod, from outside the cluster.
    let ext = c.external_client();
    let (np, _) = ext.call_tcp(&format!("{}:30707", n1.addr), 20);
    assert_eq!(np.values().sum::<usize>(), 20, "{np:?}");
    assert_eq!(np.len(), 2, "both backends behind the NodePort: {np:?}");
    let (hp, _) = ext.call_tcp(&format!("{}:30090", n2.addr), 3);
    assert_eq!(
        hp.get("web-2"),
        Some(&3),
        "the hostPort reaches web-2: {hp:?}"
    );

    // Removal frees the address, the veth and the endpoint entry.
    let web1_veth = endpoints(n1)
        .into_iter()
        .find(|(ip, _)| *ip == web1.ip)
        .and_then(|(_, veth)| veth)
        .expect("web-1's veth");
    rt1.remove_pod(&web1);
    assert_eq!(held(n1), BTreeSet::from([client.ip]));
    assert!(
        endpoints(n1).iter().all(|(ip, _)| *ip != web1.ip),
        "web-1's endpoint entry is gone"
    );
    assert!(
        !n1.netns().ip(&["-o", "link", "show"]).contains(&web1_veth),
        "web-1's veth {web1_veth} is gone"
    );
    check_clean(n1);

    // containerd killed with a pod running: the pod keeps working; once it is back, the
    // sandboxes it lists are removed through the CRI, as a kubelet does with pods it no longer
    // wants, and nothing is left.
    rt1.kill();
    let (a, _) = n1.host().call_tcp(&format!("{}:8080", client.ip), 3);
    assert_eq!(
        a.get("client"),
        Some(&3),
        "the pod serves while containerd is down: {a:?}"
    );
    rt1.restart();
    let left = rt1.sandboxes();
    assert_eq!(
        left.iter()
            .map(|(_, name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["client"],
        "{left:?}"
    );
    assert_eq!(rt1.cri().remove_all().unwrap(), 1);
    assert!(rt1.sandboxes().is_empty());
    assert_eq!(held(n1), BTreeSet::new());
    assert!(endpoints(n1).is_empty());
    check_clean(n1);
    // Node 2's pod, removed the ordinary way.
    rt2.remove_pod(&web2);
    assert_eq!(held(n2), BTreeSet::new());
    check_clean(n2);
}
