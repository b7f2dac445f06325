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

/// Run by `a_killed_runs_cluster_is_swept_before_the_next_run` in a child process: builds a
/// cluster with a pod serving, says its id and the server's pid, and waits to be killed.
#[test]
#[ignore = "a helper of another test, which runs it in a process of its own"]
fn hold_a_cluster_until_killed() {
    if std::env::var_os("FX_HOLD_CLUSTER").is_none() {
        return;
    }
    let c = Cluster::builder().nodes(1).build();
    let p = c.add_pod(1, "orphan");
    let server = p.serve(8080);
    println!("HOLDING {} {}", c.id(), server.pid());
    loop {
        std::thread::park();
    }
}

#[test]
fn a_killed_runs_cluster_is_swept_before_the_next_run() {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hold_a_cluster_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("FX_HOLD_CLUSTER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let holding = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("HOLDING ").map(str::to_owned));
    let Some(holding) = holding else {
        let _ = child.kill();
        panic!("the child never built its cluster: {:?}", child.wait());
    };
    let (id, server) = holding.split_once(' ').unwrap();
    let server: i32 = server.parse().unwrap();
    let ours = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|e| e.contains(&format!("-{id}-")) || e.contains(&format!("/{id}")))
            .cloned()
            .collect()
    };

    // While its owner runs, the cluster is in use, not left behind, and a sweep keeps it.
    let (leaks, in_use) = leaks::left_behind();
    assert_eq!(ours(&leaks), Vec::<String>::new());
    assert!(!ours(&in_use).is_empty(), "{in_use:?}");
    leaks::sweep_stale();
    assert!(
        !leaks::find(id).is_empty(),
        "a running cluster survives a sweep"
    );

    // Killed, its Drop never runs: everything stays, and is now left behind.
    child.kill().unwrap();
    child.wait().unwrap();
    let (leaks, _) = leaks::left_behind();
    assert!(
        ours(&leaks)
            .iter()
            .any(|e| e.starts_with("network namespace")),
        "{leaks:?}"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{server}")).exists(),
        "the pod's server outlives the killed owner"
    );

    let swept = leaks::sweep_stale();
    assert!(!ours(&swept).is_empty(), "{swept:?}");
    assert_eq!(leaks::find(id), Vec::<String>::new());
    // The orphaned server was killed (gone, or a zombie until init reaps it).
    let gone = || match std::fs::read_to_string(format!("/proc/{server}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.contains(") Z "),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gone() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone(), "the orphaned pod server was killed");
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
        !n.ferrox(&["datapath"]).contains(&host_if),
        "no pod program is attached to {host_if} any more"
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
