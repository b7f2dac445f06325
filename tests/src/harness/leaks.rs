//! Finds what the harness and the datapath tests leave behind: network namespaces, cgroups,
//! bpffs mounts and directories carrying our names. Used by a test of the harness's own
//! teardown and by `cargo xtask test` after the whole suite.
//!
//! Every cluster records its owner (pid and start time) in `<RUN_DIR>/<id>/owner`. A cluster
//! whose owner still runs (a demo, a benchmark) is in use, not left behind; one whose owner is
//! gone (killed, so its `Drop` never ran) is left behind, and [`sweep_stale`] tears it down.

use std::path::Path;

/// Network namespaces of test clusters start with this.
pub const NETNS_PREFIX: &str = "fxt-";
/// Per-cluster files (kubeconfig, node.json, IPAM, bpffs mounts) live under this directory.
pub const RUN_DIR: &str = "/run/ferrox-test";
/// Per-node cgroups live under `<cgroup2 root>/<CGROUP_DIR>/<cluster id>/`.
pub const CGROUP_DIR: &str = "ferrox-test";
/// Scratch bpffs mounts of the datapath tests.
const SCRATCH_BPFFS: &str = "/run/ferrox-dp-test";

/// The file in a cluster's directory that names the process owning it.
const OWNER_FILE: &str = "owner";

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    start_time: u64,
}

impl Owner {
    /// This process.
    pub fn me() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this process still runs.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Records that this process owns the cluster whose directory is `dir`.
pub fn write_owner(dir: &Path) -> std::io::Result<()> {
    let me = Owner::me();
    std::fs::write(
        dir.join(OWNER_FILE),
        format!("{} {}\n", me.pid, me.start_time),
    )
}

/// The owner recorded in a cluster's directory.
fn read_owner(dir: &Path) -> Option<Owner> {
    let text = std::fs::read_to_string(dir.join(OWNER_FILE)).ok()?;
    let mut fields = text.split_whitespace();
    Some(Owner {
        pid: fields.next()?.parse().ok()?,
        start_time: fields.next()?.parse().ok()?,
    })
}

/// The clusters on this machine, each with the process that owns it if that process still
/// runs. A directory without an owner file counts as in use while it is younger than a minute
/// (it is being built).
pub fn clusters() -> Vec<(String, Option<Owner>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        if !e.path().is_dir() {
            continue;
        }
        let id = e.file_name().to_string_lossy().into_owned();
        let owner = match read_owner(&e.path()) {
            Some(o) => o.alive().then_some(o),
            None => {
                let young = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < std::time::Duration::from_secs(60));
                young.then_some(Owner {
                    pid: 0,
                    start_time: 0,
                })
            }
        };
        out.push((id, owner));
    }
    out
}

/// Whether a [`find`] entry belongs to cluster `id` (not merely contains its characters).
fn belongs(entry: &str, id: &str) -> bool {
    entry.contains(&format!("{NETNS_PREFIX}{id}-"))
        || entry.contains(&format!("/{id}/"))
        || entry.contains(&format!("/{id} "))
        || entry.ends_with(&format!("/{id}"))
        || entry.ends_with(&format!("/{id})"))
}

/// The pid in a scratch bpffs mount's name (`<SCRATCH_BPFFS>-<pid>-<n>`).
fn scratch_owner(entry: &str) -> Option<u32> {
    let rest = &entry[entry.find(SCRATCH_BPFFS)? + SCRATCH_BPFFS.len()..];
    rest.strip_prefix('-')?.split('-').next()?.parse().ok()
}

/// What is left behind: [`find`]'s entries except those of clusters (and scratch mounts) whose
/// owner still runs. The second list names those in use, for the report.
pub fn left_behind() -> (Vec<String>, Vec<String>) {
    let live: Vec<(String, Owner)> = clusters()
        .into_iter()
        .filter_map(|(id, o)| o.map(|o| (id, o)))
        .collect();
    let mut leaks = Vec::new();
    let mut in_use = Vec::new();
    for entry in find("") {
        let owner = live
            .iter()
            .find(|(id, _)| belongs(&entry, id))
            .map(|(_, o)| o.pid)
            .or_else(|| {
                scratch_owner(&entry).filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            });
        match owner {
            Some(pid) => in_use.push(format!("{entry} (in use by pid {pid})")),
            None => leaks.push(entry),
        }
    }
    (leaks, in_use)
}

/// Tears down every cluster whose owner is gone and every scratch bpffs mount whose process
/// is gone: what a killed demo, benchmark or test run left. Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let (leaks, _) = left_behind();
    if leaks.is_empty() {
        return leaks;
    }
    let stale: Vec<String> = clusters()
        .into_iter()
        .filter(|(_, o)| o.is_none())
        .map(|(id, _)| id)
        .collect();
    for id in &stale {
        sweep_cluster(id);
    }
    for entry in &leaks {
        if let Some(mount) = entry.strip_prefix("mount ")
            && scratch_owner(entry).is_some()
        {
            let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(mount);
        }
    }
    leaks
}

/// Kills the processes of cluster `id` (its runtimes, and whatever runs in its namespaces or
/// cgroups), unmounts its mounts, deletes its namespaces and cgroups and its directory.
fn sweep_cluster(id: &str) {
    let entries = find(id);
    let netns: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.strip_prefix("network namespace "))
        .filter(|n| n.starts_with(&format!("{NETNS_PREFIX}{id}-")))
        .collect();
    // Processes: the runtimes named by their arguments, and every process in a namespace of
    // the cluster (servers and routers spawned by the killed owner outlive it).
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<u64> = netns
        .iter()
        .filter_map(|n| std::fs::metadata(format!("/run/netns/{n}")).ok())
        .map(|m| m.ino())
        .collect();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let named = entries
            .iter()
            .any(|e| e.starts_with(&format!("process {pid} ")));
        let inside =
            std::fs::metadata(p.path().join("ns/net")).is_ok_and(|m| inodes.contains(&m.ino()));
        if named || inside {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Cgroups: kill what is left in them, then remove them deepest first.
    let mut cgroups: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(root) = ferrox::daemon::node::cgroup2_mount() {
        cgroups.push(root.join(CGROUP_DIR).join(id));
    }
    cgroups.extend(
        v1_hierarchies()
            .into_iter()
            .map(|h| h.join(CGROUP_DIR).join(id)),
    );
    for top in &cgroups {
        let _ = std::fs::write(top.join("cgroup.kill"), "1");
        let mut dirs = Vec::new();
        collect_dirs(top, &mut dirs);
        for d in &dirs {
            for task in std::fs::read_to_string(d.join("tasks"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = task.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
    // Mounts under the cluster's directory, deepest first.
    let mut mounts: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.strip_prefix("mount "))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    for n in netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", n])
            .status();
    }
    for top in &cgroups {
        let mut dirs = Vec::new();
        collect_dirs(top, &mut dirs);
        // Killed processes leave their cgroup a moment after the signal.
        for d in dirs.iter().rev() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::remove_dir(d).is_err()
                && d.exists()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(id));
}

/// `dir` and every directory below it, parents before children.
fn collect_dirs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

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
