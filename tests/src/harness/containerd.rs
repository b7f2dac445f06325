//! A real container runtime on a harness node: containerd 1.6 with runc, from Debian, driven
//! through the CRI ([`crate::cri`]) the way the kubelet drives it, with the node's CNI
//! configuration written by the real `ferrox install-cni`.
//!
//! One containerd per node, started in the node's network namespace only (its mount namespace
//! stays the host's: runc must see the cgroup mounts, which `ip netns exec` would hide), with its
//! root, state, sockets, runc state, CNI and log directories under the node's directory. It runs
//! in the cgroup `<node>/runtime`; pods get `<node>/pods/pod-<uid>` as cgroup parent, so the
//! node's socket hooks apply to their containers. Images are built here (OCI archives: a pause
//! image from busybox-static, a workload image with `fx-echo`) and imported with `ctr`: nothing
//! is pulled.
//!
//! Two things containerd 1.6 keeps in global places are cleaned by sandbox id: shim sockets in
//! `/run/containerd/s/` and libcni's result cache in `/var/lib/cni/results/`. Dropping a
//! [`Containerd`] removes its pods through the CRI (so every CNI DEL happens), then everything
//! it left: processes, mounts, sockets, cgroups in every hierarchy.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sha2::Digest as _;

use super::{Cluster, Node, Proc, bin_path, leaks};
use crate::cri::{Cri, Exec, PodSpec, RunningPod};

/// The sandbox ("pause") image containerd is configured with.
pub const PAUSE_IMAGE: &str = "localhost/ferrox-test/pause:1";
/// The workload image: `fx-echo` (with the libraries it links) and busybox.
pub const ECHO_IMAGE: &str = "localhost/ferrox-test/fx-echo:1";
/// Where containerd's reference CNI plugins are (Debian's containernetworking-plugins).
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The CRI's containerd namespace.
const K8S_NAMESPACE: &str = "k8s.io";

/// containerd on one node of a cluster.
pub struct Containerd {
    node_name: String,
    netns: PathBuf,
    /// `<node root>/run/containerd`: config, sockets, state, runc state.
    run: PathBuf,
    /// `<node root>/var/lib/containerd`: content, snapshots, metadata.
    lib: PathBuf,
    socket: PathBuf,
    /// The cgroup containerd and its shims run in (cgroup v2 path).
    cgroup: PathBuf,
    /// The node's cgroup, relative to the cgroup roots (`/ferrox-test/<id>/node-1`).
    node_cgroup_rel: String,
    proc: Option<Proc>,
    cri: Option<Cri>,
    /// Sandboxes ever created (for the global leftovers of a crash).
    sandboxes: BTreeSet<String>,
    next_pod: u32,
    cluster_id: String,
}

impl Containerd {
    /// Installs the CNI plugins (ferrox's through `ferrox install-cni`, which waits for the
    /// node's agent; loopback and portmap from the reference plugins), starts containerd in
    /// `node`'s network namespace and imports the test images.
    pub fn start(cluster: &Cluster, node: usize) -> Self {
        let n = cluster.node(node);
        let cgroup_root = ferrox::daemon::node::cgroup2_mount().expect("a cgroup2 mount");
        let node_cgroup_rel = format!(
            "/{}",
            n.cgroup()
                .strip_prefix(&cgroup_root)
                .expect("the node's cgroup is under the cgroup2 root")
                .display()
        );
        let run = n.host_path("/run/containerd");
        let lib = n.host_path("/var/lib/containerd");
        let cgroup = n.cgroup().join("runtime");
        for d in [&run, &lib, &cgroup] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        let mut c = Self {
            node_name: n.name.clone(),
            netns: n.netns().path(),
            socket: run.join("containerd.sock"),
            run,
            lib,
            cgroup,
            node_cgroup_rel,
            proc: None,
            cri: None,
            sandboxes: BTreeSet::new(),
            next_pod: 0,
            cluster_id: cluster.id().to_owned(),
        };
        c.install_cni(n);
        std::fs::write(c.run.join("config.toml"), c.config(n)).expect("writing config.toml");
        c.spawn();
        c.import_images();
        c
    }

    fn bin_dir(n: &Node) -> PathBuf {
        n.host_path("/opt/cni/bin")
    }

    fn conf_dir(n: &Node) -> PathBuf {
        n.host_path("/etc/cni/net.d")
    }

    /// The reference plugins containerd needs besides ferrox's (`loopback` for the pods' `lo`,
    /// `portmap` for hostPort), then ferrox's plugin and network configuration, installed by
    /// `ferrox install-cni` as the DaemonSet does.
    fn install_cni(&self, n: &Node) {
        let bin = Self::bin_dir(n);
        std::fs::create_dir_all(&bin).expect("CNI bin dir");
        for plugin in ["loopback", "portmap"] {
            let from = Path::new(REFERENCE_PLUGINS).join(plugin);
            std::fs::copy(&from, bin.join(plugin)).unwrap_or_else(|e| {
                panic!(
                    "copying {} (Debian's containernetworking-plugins; `cargo xtask setup`): {e}",
                    from.display()
                )
            });
        }
        let mut cmd = Command::new(bin_path("ferrox"));
        cmd.arg("install-cni")
            .arg("--cni-binary")
            .arg(bin_path("ferrox-cni"))
            .arg("--cni-bin-dir")
            .arg(&bin)
            .arg("--cni-conf-dir")
            .arg(Self::conf_dir(n))
            .arg("--node-config")
            .arg(n.node_config());
        let out = n.output(cmd);
        assert!(
            out.status.success(),
            "ferrox install-cni on {}: {}",
            n.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// containerd's configuration: every path under the node's directories, and what this
    /// machine needs (see the comments).
    fn config(&self, n: &Node) -> String {
        let run = self.run.display();
        let lib = self.lib.display();
        format!(
            r#"# containerd for harness node {node}: one containerd per network namespace.
version = 2
root = "{lib}"
state = "{run}/state"
temp = "{run}/tmp"
oom_score = 0
disabled_plugins = [
  # It creates /opt/containerd (global) and prepends it to PATH.
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    # The test machine's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
    restrict_oom_score_adj = true
    disable_apparmor = true
    disable_tcp_service = true
    # The streaming server (exec, attach), inside the node's network namespace.
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # Sandbox network namespaces under the state dir, not the global /var/run/netns.
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{run}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{bin}"
      conf_dir = "{conf}"
      max_conf_num = 1
"#,
            node = n.name,
            socket = self.socket.display(),
            pause = PAUSE_IMAGE,
            bin = Self::bin_dir(n).display(),
            conf = Self::conf_dir(n).display(),
        )
    }

    /// Starts containerd and waits until its CRI reports the runtime and the network ready.
    fn spawn(&mut self) {
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(self.run.join("config.toml"));
        self.proc = Some(Proc::spawn(
            &format!("containerd on {}", self.node_name),
            cmd,
            &self.netns,
            &self.cgroup,
        ));
        match Cri::wait_ready(&self.socket, Duration::from_secs(60)) {
            Ok(cri) => self.cri = Some(cri),
            Err(e) => {
                let log = self.proc.as_ref().map(Proc::lines).unwrap_or_default();
                panic!(
                    "{e:#}\ncontainerd's log:\n{}",
                    log[log.len().saturating_sub(30)..].join("\n")
                );
            }
        }
    }

    /// The runtime's CRI client.
    pub fn cri(&mut self) -> &mut Cri {
        self.cri.as_mut().expect("containerd is running")
    }

    /// Builds the images and imports them into the CRI's namespace.
    fn import_images(&mut self) {
        let dir = self.run.join("images");
        std::fs::create_dir_all(&dir).expect("images dir");
        for (reference, spec) in images() {
            let archive = dir.join(format!("{}.tar", spec.reference.replace(['/', ':'], "_")));
            xtask::oci::build(&spec, &archive).expect("building a test image");
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", K8S_NAMESPACE, "images", "import"])
                .args(["--snapshotter", "overlayfs"])
                .arg(&archive)
                .output()
                .expect("running ctr");
            assert!(
                out.status.success(),
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                self.cri().has_image(&reference).unwrap(),
                "the CRI does not see {reference} after the import"
            );
        }
    }

    /// Runs a pod whose container serves `fx-echo` on TCP and UDP 8080 under its name,
    /// optionally with a hostPort mapped to 8080.
    pub fn run_pod(&mut self, name: &str, host_port: Option<u16>) -> RunningPod {
        self.next_pod += 1;
        let uid = format!("{}-{}-{}", self.cluster_id, self.node_name, self.next_pod);
        let spec = PodSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            uid: uid.clone(),
            cgroup_parent: format!("{}/pods/pod-{uid}", self.node_cgroup_rel),
            log_dir: self.run.join("pod-logs").join(&uid),
            host_port: host_port.map(|h| (h, 8080)),
            image: ECHO_IMAGE.to_owned(),
            command: ["/usr/local/bin/fx-echo", "serve", "--name", name]
                .into_iter()
                .chain(["--tcp", "8080", "--udp", "8080"])
                .map(str::to_owned)
                .collect(),
        };
        let pod = self
            .cri()
            .run_pod(&spec)
            .unwrap_or_else(|e| panic!("running pod {name} on {}: {e:#}", self.node_name));
        self.sandboxes.insert(pod.sandbox_id.clone());
        pod
    }

    /// Runs `cmd` in the pod's container (ExecSync) and returns what it printed.
    pub fn exec(&mut self, pod: &RunningPod, cmd: &[&str]) -> Exec {
        self.cri()
            .exec(&pod.container_id, cmd, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("exec {cmd:?} in {}: {e:#}", pod.name))
    }

    /// `count` TCP connections from inside the pod's container to `target`: how many each
    /// backend answered (by the name it greets with).
    pub fn call_tcp(
        &mut self,
        pod: &RunningPod,
        target: &str,
        count: usize,
    ) -> BTreeMap<String, usize> {
        let n = count.to_string();
        let out = self.exec(
            pod,
            &[
                "/usr/local/bin/fx-echo",
                "call",
                "tcp",
                target,
                "--count",
                &n,
            ],
        );
        let mut answers = BTreeMap::new();
        for line in out.stdout.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("fx-echo printed {line:?}: {e}"));
            if let Some(b) = v["backend"].as_str() {
                *answers.entry(b.to_owned()).or_default() += 1;
            }
        }
        answers
    }

    /// Stops and removes the pod (both CNI DELs happen).
    pub fn remove_pod(&mut self, pod: &RunningPod) {
        let name = self.node_name.clone();
        self.cri()
            .remove_pod(&pod.sandbox_id)
            .unwrap_or_else(|e| panic!("removing {} on {name}: {e:#}", pod.name));
    }

    /// `kill -9` of containerd (its shims and pods go on).
    pub fn kill(&mut self) {
        self.cri = None;
        if let Some(mut p) = self.proc.take() {
            p.signal_and_wait(libc::SIGKILL);
        }
    }

    /// Starts containerd again after [`Containerd::kill`]; it re-adopts its shims.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "containerd is still running");
        self.spawn();
    }

    /// Every sandbox containerd lists: (id, name, ready).
    pub fn sandboxes(&mut self) -> Vec<(String, String, bool)> {
        self.cri().sandboxes().expect("ListPodSandbox")
    }

    /// Removes everything, without needing containerd to answer: its pods through the CRI when
    /// it does (so the CNI DELs happen), then processes, mounts, global sockets and caches,
    /// cgroups.
    fn teardown(&mut self) {
        if let Some(cri) = self.cri.as_mut() {
            match cri.sandboxes() {
                Ok(all) => {
                    self.sandboxes.extend(all.into_iter().map(|(id, _, _)| id));
                    if let Err(e) = cri.remove_all() {
                        eprintln!("harness: removing the pods of {}: {e:#}", self.node_name);
                    }
                }
                Err(e) => eprintln!("harness: listing the pods of {}: {e:#}", self.node_name),
            }
        }
        self.cri = None;
        // Sandboxes whose state is still on disk (a containerd that did not answer).
        for dir in [
            self.run.join("state/io.containerd.grpc.v1.cri/sandboxes"),
            self.lib.join("io.containerd.grpc.v1.cri/sandboxes"),
        ] {
            self.sandboxes.extend(
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        // containerd and the shims (their cgroup), then every container (the pods' cgroups).
        self.proc.take();
        let node_cgroup = self
            .cgroup
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for cg in [self.cgroup.clone(), node_cgroup.join("pods")] {
            kill_cgroup(&cg);
        }
        // Mounts: container root filesystems, sandbox shm and network namespaces.
        let prefixes = [
            format!("{}/", self.run.display()),
            format!("{}/", self.lib.display()),
        ];
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| prefixes.iter().any(|p| m.starts_with(p.as_str())))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts.dedup();
        for m in mounts {
            if let Err(e) = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("harness: unmounting {m}: {e}");
            }
        }
        // Global leftovers, by sandbox id.
        for id in &self.sandboxes {
            let _ = std::fs::remove_file(shim_socket(&self.socket, id));
        }
        for e in std::fs::read_dir(CNI_RESULTS)
            .into_iter()
            .flatten()
            .flatten()
        {
            let f = e.file_name().to_string_lossy().into_owned();
            if self
                .sandboxes
                .iter()
                .any(|id| f.contains(&format!("-{id}-")))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for dir in [SHIM_SOCKETS, "/run/containerd", CNI_RESULTS, "/var/lib/cni"] {
            let _ = std::fs::remove_dir(dir); // only when empty: another runtime's stay
        }
        // cgroups: the cgroup2 ones, and those runc made in every v1 hierarchy.
        remove_cgroup_tree(&self.cgroup);
        remove_cgroup_tree(&node_cgroup.join("pods"));
        for h in leaks::v1_hierarchies() {
            let rel = self.node_cgroup_rel.trim_start_matches('/');
            remove_cgroup_tree(&h.join(rel));
            // The cluster's and the harness's own directories there, when empty.
            let mut up = h.join(rel);
            while up.pop() && up != h {
                if std::fs::remove_dir(&up).is_err() {
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(&self.lib);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Where containerd 1.6 puts every shim's socket, whatever its configuration.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// libcni's result cache (not configurable in containerd 1.6).
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// The socket of a sandbox's shim: `sha256("<containerd address>/<namespace>/<sandbox id>")`
/// under [`SHIM_SOCKETS`].
fn shim_socket(address: &Path, sandbox_id: &str) -> PathBuf {
    let digest = sha2::Sha256::digest(
        format!("{}/{K8S_NAMESPACE}/{sandbox_id}", address.display()).as_bytes(),
    );
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SHIM_SOCKETS).join(hex)
}

/// Kills every process in the cgroup (v2) and waits for it to be empty.
fn kill_cgroup(cg: &Path) {
    if !cg.exists() {
        return;
    }
    let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cgroup_tree_has_processes(cg) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cgroup_tree_has_processes(cg: &Path) -> bool {
    subdirs_deepest_first(cg).iter().any(|d| {
        std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    })
}

/// `dir` and every directory below it, the deepest first.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subdirs_deepest_first(&e.path()));
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

/// Removes a cgroup and its children (deepest first).
fn remove_cgroup_tree(cg: &Path) {
    for d in subdirs_deepest_first(cg) {
        if let Err(e) = std::fs::remove_dir(&d) {
            eprintln!("harness: removing cgroup {}: {e}", d.display());
        }
    }
}

/// The test images: a pause image (busybox sleeping) and the workload image (`fx-echo`, the
/// shared libraries it links, and busybox).
fn images() -> Vec<(String, xtask::oci::Spec)> {
    let busybox = xtask::oci::File {
        path: "/bin/busybox".into(),
        source: PathBuf::from("/bin/busybox"),
        mode: 0o755,
    };
    let echo = bin_path("fx-echo");
    let mut files = vec![
        busybox.clone(),
        xtask::oci::File {
            path: "/usr/local/bin/fx-echo".into(),
            source: echo.clone(),
            mode: 0o755,
        },
    ];
    // The dynamic libraries fx-echo links, at the paths the loader looks for them.
    let ldd = Command::new("ldd")
        .arg(&echo)
        .output()
        .expect("running ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(xtask::oci::File {
                path: p.to_owned(),
                source: PathBuf::from(p),
                mode: 0o755,
            });
        }
    }
    let spec = |reference: &str, files: Vec<xtask::oci::File>, entrypoint: &[&str]| {
        (
            reference.to_owned(),
            xtask::oci::Spec {
                reference: reference.to_owned(),
                files,
                entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
                cmd: vec![],
                env: vec!["PATH=/usr/local/bin:/bin".into()],
                gzip: false,
            },
        )
    };
    vec![
        spec(
            PAUSE_IMAGE,
            vec![busybox],
            &["/bin/busybox", "sleep", "2147483647"],
        ),
        spec(ECHO_IMAGE, files, &["/usr/local/bin/fx-echo"]),
    ]
}
