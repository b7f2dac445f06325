//! The DaemonSet's install and uninstall steps on a harness node, run as the manifests say:
//! each container's own arguments (paths mapped through its host volumes onto the node's
//! stand-in root filesystem) and its own capabilities (setpriv with the manifest's set, nothing
//! more). The agent reaches the API server only through `FERROX_K8S_API_SERVER`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ferrox_tests::{
    harness::{Node, bin_path, wait_for},
    manifests,
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Node as K8sNode};

/// Everything of a node that ferrox may change, in comparable form.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Files and directories under the node's root (mode for files, "dir" for directories).
    files: BTreeMap<String, String>,
    routes: String,
    links: Vec<String>,
    /// Programs attached to the node's cgroup.
    cgroup_progs: String,
    /// TC/TCX/XDP attachments in the node's namespace.
    net_progs: String,
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.insert(rel, "dir".into());
            walk(root, &p, out);
        } else {
            out.insert(rel, format!("{:o}", meta.permissions().mode() & 0o7777));
        }
    }
}

fn snapshot(n: &Node) -> Snapshot {
    let mut files = BTreeMap::new();
    walk(&n.host_root(), &n.host_root(), &mut files);
    let bpftool = |args: &[&str]| {
        let mut cmd = Command::new("bpftool");
        cmd.args(args);
        let out = n.output(cmd);
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let mut links: Vec<String> = n
        .netns()
        .ip(&["-o", "link", "show"])
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or_default().trim().to_owned())
        .collect();
    links.sort();
    Snapshot {
        files,
        // IPv4 (all ferrox routes): IPv6 link-local routes appear on their own after DAD.
        routes: n.netns().ip(&["-4", "route", "show", "table", "all"]),
        links,
        cgroup_progs: bpftool(&["cgroup", "show", n.cgroup().to_str().unwrap()]),
        net_progs: bpftool(&["net", "show"]),
    }
}

/// Creates every `DirectoryOrCreate` host path of `ds` under the node's root, as the kubelet
/// does before starting the pod.
fn kubelet_volumes(n: &Node, ds: &DaemonSet) {
    for v in ds
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
    {
        if let Some(h) = &v.host_path
            && h.type_.as_deref() == Some("DirectoryOrCreate")
        {
            std::fs::create_dir_all(n.host_path(&h.path)).unwrap();
        }
    }
}

/// The container's command line as it would run on node `n`: `ferrox` from the build, the
/// arguments and environment from the manifest, paths moved onto the node's root.
fn container_command(n: &Node, ds: &DaemonSet, container: &str) -> Command {
    let c = manifests::container(ds, container);
    let argv = manifests::argv(c, &manifests::all_of("ConfigMap")).unwrap();
    let argv = manifests::remap_paths(ds, c, &argv, |host| n.host_path(host));
    let wrapper = manifests::setpriv_wrapper(c);
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(bin_path("ferrox"))
        .args(&argv[1..])
        .env("FERROX_BPFFS_ROOT", n.layout().root())
        .env("RUST_LOG", "info,ferrox=debug")
        .env("NO_COLOR", "1");
    cmd
}

#[test]
fn install_cni_waits_for_the_agent_and_uninstall_leaves_the_node_as_it_was() {
    let ds = manifests::daemonset("ferrox");
    let uninstall_ds = manifests::daemonset("ferrox-uninstall");
    let c = ferrox_tests::harness::Cluster::builder()
        .nodes(1)
        .start_agents(false)
        .api_server_by_flag()
        .build();
    let n = c.node(1);
    // The node as it boots: bpffs mounted, the kubelet's host directories, another network's
    // files that ferrox must leave alone.
    n.mount_bpffs();
    kubelet_volumes(n, &ds);
    kubelet_volumes(n, &uninstall_ds);
    std::fs::write(n.host_path("/opt/cni/bin/loopback"), b"not ours").unwrap();
    std::fs::write(n.host_path("/etc/cni/net.d/99-loopback.conf"), b"{}").unwrap();
    let before = snapshot(n);

    // The agent cannot become ready while its Node is missing: it attaches the datapath, then
    // waits for the API. It runs with exactly the manifest's capabilities.
    let node_obj: K8sNode = c.api().get(None, &n.name).unwrap();
    c.api().delete::<K8sNode>(None, &n.name).unwrap();
    let installer = n.spawn("install-cni", container_command(n, &ds, "install-cni"));
    n.start_agent_wrapped(&manifests::setpriv_wrapper(manifests::container(
        &ds, "agent",
    )));
    wait_for(
        "the agent to attach the datapath",
        Duration::from_secs(60),
        || {
            let log = n.agent_log();
            if log.iter().any(|l| l.contains("datapath attached")) {
                Ok(())
            } else {
                Err(log.last().cloned().unwrap_or_default())
            }
        },
    );
    let not_ready = |l: &str| l.contains("agent not ready yet");
    let seen = installer.lines().iter().filter(|l| not_ready(l)).count();
    wait_for(
        "the installer to look at the unready agent twice more",
        Duration::from_secs(30),
        || {
            let now = installer.lines().iter().filter(|l| not_ready(l)).count();
            if now >= seen + 2 {
                Ok(())
            } else {
                Err(format!("{now} checks"))
            }
        },
    );
    let bin = n.host_path("/opt/cni/bin/ferrox-cni");
    let conf = n.host_path("/etc/cni/net.d/05-ferrox.conflist");
    assert!(
        !bin.exists() && !conf.exists(),
        "nothing installed while the agent is not ready: {:?}",
        installer.lines()
    );

    // The Node appears: the agent writes node.json, syncs, serves /healthz; then (only then)
    // the plugin and its configuration appear.
    c.api().apply(&node_obj);
    installer.wait_for_line("the installation", Duration::from_secs(60), |l| {
        l.contains("CNI plugin and network configuration installed")
    });
    let log = n.agent_log();
    assert!(
        log.iter()
            .any(|l| l.contains("connecting to the Kubernetes API")
                && l.contains("https://198.18.0.1:6443")),
        "the agent used --k8s-api-server, not the kubeconfig's address: {log:?}"
    );
    assert!(log.iter().any(|l| l.contains("CNI ready")));
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(bin_path("ferrox-cni")).unwrap(),
        "the installed plugin is the built one"
    );
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "ferrox-cni");
    assert_eq!(
        conflist["plugins"][0]["nodeConfig"],
        n.node_config().display().to_string()
    );
    for dir in ["/opt/cni/bin", "/etc/cni/net.d"] {
        let names: Vec<String> = std::fs::read_dir(n.host_path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            names.iter().all(|f| !f.contains("tmp")),
            "no temporary file in {dir}: {names:?}"
        );
    }

    // A runtime using what was installed gets a working pod.
    let pod = c.add_pod_from_conflist(1, "web", &bin, &conflist);
    assert!(n.pod_cidr.contains(&pod.ip), "{} in {}", pod.ip, n.pod_cidr);
    let _server = pod.serve(8080);
    let (answers, _) = n.host().call_tcp(&format!("{}:8080", pod.ip), 3);
    assert_eq!(answers.get("web"), Some(&3), "{answers:?}");

    // A rollout stops the installer; what it installed stays.
    let mut installer = installer;
    assert!(installer.signal_and_wait(libc::SIGTERM).success());
    assert!(bin.exists() && conf.exists());

    // Removal, as the uninstall DaemonSet does it, with the pod still there.
    assert!(n.stop_agent().success());
    for _ in 0..2 {
        let out = n.output(container_command(n, &uninstall_ds, "uninstall"));
        assert!(
            out.status.success(),
            "uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!bin.exists() && !conf.exists());
    assert!(
        n.host_path("/opt/cni/bin/loopback").exists(),
        "others' files stay"
    );
    assert!(!n.node_config().exists() && !n.ipam_dir().exists());
    assert_eq!(n.netns().ip(&["route", "show", "proto", "242"]), "");
    let after = snapshot(n);
    assert_eq!(before, after, "the node is as it was before ferrox");
}

/// What [`container_command`] runs, for a failure message that shows the command line.
#[test]
fn container_command_lines_map_onto_the_node_root() {
    let ds = manifests::daemonset("ferrox");
    let c = manifests::container(&ds, "install-cni");
    let argv = manifests::argv(c, &[]).unwrap();
    let root = PathBuf::from("/node-root");
    let mapped = manifests::remap_paths(&ds, c, &argv, |h| root.join(h.trim_start_matches('/')));
    assert!(
        mapped.contains(&"--cni-bin-dir=/node-root/opt/cni/bin".to_owned()),
        "{mapped:?}"
    );
    assert!(
        mapped.contains(&"--node-config=/node-root/run/ferrox/node.json".to_owned()),
        "{mapped:?}"
    );
    assert_eq!(
        manifests::setpriv_wrapper(manifests::container(&ds, "agent"))[1],
        "--bounding-set=-all,+net_admin,+sys_admin,+sys_ptrace"
    );
}

/// The one agent task that needs SYS_ADMIN (setns into a pod's namespace) and SYS_PTRACE (open
/// that namespace through /proc), besides NET_ADMIN (SOCK_DESTROY): closing a pod's connected
/// UDP socket whose backend left. It works with the manifest's capabilities and nothing more.
#[test]
fn the_agent_closes_stale_pod_sockets_with_only_the_manifests_capabilities() {
    use ferrox::services::testing::{slice, svc};
    let ds = manifests::daemonset("ferrox");
    let c = ferrox_tests::harness::Cluster::builder()
        .nodes(1)
        .start_agents(false)
        .build();
    let n = c.node(1);
    // As on a real node, bpffs is mounted before the agent starts (the agent in its container
    // cannot mount one the host sees).
    n.mount_bpffs();
    n.start_agent_wrapped(&manifests::setpriv_wrapper(manifests::container(
        &ds, "agent",
    )));
    n.wait_agent_ready();
    let status = std::fs::read_to_string(format!("/proc/{}/status", n.agent_pid())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_owned();
    let bit = |name: &str| match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number"),
    };
    let want = manifests::added_capabilities(manifests::container(&ds, "agent"))
        .iter()
        .fold(0u64, |m, c| m | 1 << bit(c));
    assert_eq!(
        u64::from_str_radix(&cap_eff, 16).unwrap(),
        want,
        "the agent runs with exactly the manifest's capabilities"
    );

    let dns1 = c.add_pod(1, "dns-1");
    let dns2 = c.add_pod(1, "dns-2");
    let client = c.add_pod(1, "client");
    let servers = [dns1.serve(5353), dns2.serve(5353)];
    c.api().apply(
        &svc("dns")
            .cluster_ip("10.96.0.53")
            .port("dns", 53, "UDP")
            .build(),
    );
    let endpoints = |pods: &[&ferrox_tests::harness::Pod]| {
        let mut s = slice("dns", "dns-s").port("dns", 5353, "UDP");
        for p in pods {
            s = s.ready_on(p.ip, "node-1");
        }
        s.build()
    };
    c.api().apply(&endpoints(&[&dns1, &dns2]));
    n.wait_for_backends("10.96.0.53:53/UDP", 2);
    let mut session = client.spawn(&["udp-session", "10.96.0.53:53"]);
    let first = session.wait_for_line("a first answer", Duration::from_secs(10), |l| {
        l.contains("\"backend\"")
    });
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let (gone, stays) = if first["backend"] == "dns-1" {
        (0, &dns2)
    } else {
        (1, &dns1)
    };
    // SAFETY: kill(2) on a child this test owns.
    assert_eq!(
        unsafe { libc::kill(servers[gone].pid() as i32, libc::SIGSTOP) },
        0
    );
    c.api().apply(&endpoints(&[stays]));
    session.wait_for_line(
        "an answer from the other backend",
        Duration::from_secs(10),
        |l| l.contains(&format!("\"backend\":\"{}\"", stays.name)),
    );
    assert!(
        n.agent_log().iter().any(|l| l.contains("sockets_closed=1")),
        "the agent closed the pod's socket"
    );
    assert!(session.signal_and_wait(libc::SIGTERM).success());
}
