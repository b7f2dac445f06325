//! Finds what the harness and the datapath tests leave behind: network namespaces, cgroups,
//! bpffs mounts and directories carrying our names. Used by a test of the harness's own
//! teardown and by `cargo xtask test` after the whole suite.

use std::path::Path;

/// Network namespaces of test clusters start with this.
pub const NETNS_PREFIX: &str = "fxt-";
/// Per-cluster files (kubeconfig, node.json, IPAM, bpffs mounts) live under this directory.
pub const RUN_DIR: &str = "/run/ferrox-test";
/// Per-node cgroups live under `<cgroup2 root>/<CGROUP_DIR>/<cluster id>/`.
pub const CGROUP_DIR: &str = "ferrox-test";
/// Scratch bpffs mounts of the datapath tests.
const SCRATCH_BPFFS: &str = "/run/ferrox-dp-test";

/// Everything left over whose name contains `id` (a cluster id), or everything of ours when
/// `id` is empty. Each entry says what and where.
pub fn find(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(NETNS_PREFIX) && name.contains(id) {
                out.push(format!("network namespace {name}"));
            }
        }
    }
    if let Ok(root) = ferrox::daemon::node::cgroup2_mount() {
        let dir = root.join(CGROUP_DIR);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                if e.file_name().to_string_lossy().contains(id) {
                    out.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines() {
            let Some(mount_point) = line.split_whitespace().nth(4) else {
                continue;
            };
            let ours = mount_point.starts_with(RUN_DIR) || mount_point.starts_with(SCRATCH_BPFFS);
            if ours && mount_point.contains(id) {
                out.push(format!("mount {mount_point}"));
            }
        }
    }
    for h in v1_hierarchies() {
        let dir = h.join(CGROUP_DIR);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().is_dir() && e.file_name().to_string_lossy().contains(id) {
                out.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    // A container runtime of a node (containerd, its shims) still running.
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args.windows(2).any(|w| {
            (w[0] == "--config" || w[0] == "-address")
                && w[1].starts_with(RUN_DIR)
                && w[1].contains(id)
        });
        if ours {
            out.push(format!(
                "process {} ({})",
                entry.file_name().to_string_lossy(),
                args.join(" ")
            ));
        }
    }
    let run = Path::new(RUN_DIR);
    if let Ok(entries) = std::fs::read_dir(run) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(id) {
                out.push(format!("directory {}", e.path().display()));
            }
        }
    }
    out
}

/// The mount points of the cgroup v1 hierarchies (none on a cgroup2-only machine): a container
/// runtime places its containers there as well.
pub fn v1_hierarchies() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            // "... mount-point options - fstype source super-options"
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup"))
                .then(|| pre.split_whitespace().nth(4).map(std::path::PathBuf::from))
                .flatten()
        })
        .collect()
}
