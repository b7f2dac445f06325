//! The harness cleans up after itself, also when a test panics half-way, and the CNI plugin's
//! DEL is idempotent and works when the pod's namespace is already gone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::sync::{Arc, Mutex};

use ferrox_tests::harness::{Cluster, leaks};

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let id = Arc::new(Mutex::new(String::new()));
    let seen = id.clone();
    let result = std::panic::catch_unwind(move || {
        let c = Cluster::builder().nodes(2).build();
        *seen.lock().unwrap() = c.id().to_owned();
        let p = c.add_pod(1, "doomed");
        let _server = p.serve(8080);
        assert!(
            !leaks::find(c.id()).is_empty(),
            "the cluster exists while the test runs"
        );
        panic!("on purpose, with a cluster, a pod and a process running");
    });
    assert!(result.is_err(), "the closure panicked");
    let id = id.lock().unwrap().clone();
    assert!(!id.is_empty());
    assert_eq!(leaks::find(&id), Vec::<String>::new());
}

#[test]
fn cni_del_is_idempotent_and_works_without_the_namespace() {
    let c = Cluster::builder().nodes(1).build();
    let n = c.node(1);
    let p = c.add_pod(1, "p");
    let q = c.add_pod(1, "q");
    assert_ne!(p.ip, q.ip, "pods get distinct addresses");
    assert!(n.pod_cidr.contains(&p.ip), "{} in {}", p.ip, n.pod_cidr);
    let host_if = p.cni_result.interfaces[0].name.clone();
    assert!(n.netns().ip(&["-j", "link", "show"]).contains(&host_if));

    for _ in 0..2 {
        let out = c.cni_del(&p);
        assert!(
            out.status.success(),
            "DEL: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        !n.netns().ip(&["-j", "link", "show"]).contains(&host_if),
        "the host veth is gone"
    );
    assert!(
        !n.layout().pod_link(&host_if).exists(),
        "the pod's link pin is gone"
    );

    c.delete_pod_netns(&q);
    let out = c.cni_del(&q);
    assert!(
        out.status.success(),
        "DEL without netns: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Both addresses are free again: a new pod may get either.
    let ipam = ferrox_cni::ipam::Store::new(n.ipam_dir());
    assert!(
        ipam.list().unwrap().is_empty(),
        "{:?}",
        ipam.list().unwrap()
    );
}
