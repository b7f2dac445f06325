//! Putting ferrox on a node and taking it off again.
//!
//! `ferrox install-cni` (the DaemonSet's `install-cni` container) waits until the agent on the
//! node is ready — its node configuration written (the datapath is attached) and `/healthz`
//! answering 200 (the service maps are synced) — and only then copies the CNI plugin into the
//! runtime's bin dir and writes the network configuration into its conf dir. The kubelet reports
//! a node's network ready as soon as a configuration file exists, so writing it earlier would
//! send pods to a node that cannot serve them. Both files are written beside their final name
//! and renamed into place: the runtime never reads half a file.
//!
//! `ferrox uninstall` removes everything ferrox put on the node: the datapath's pins (which
//! detaches every program), the routes with ferrox's protocol number, the host side of pod
//! interfaces, the node configuration, the IPAM store, the network configuration and the plugin.
//!
//! This module must never write a CNI configuration before the agent answers, leave a partial
//! file under a name the runtime reads, or remove a file that ferrox did not put there.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use ferrox_cni::node_config::NodeConfig;
use ferrox_datapath::PinLayout;
use tracing::{debug, info, warn};

use crate::cli::{CniDirs, InstallCniArgs, UninstallArgs};

/// Name of the network configuration file; `05-` sorts it before most other CNIs' files (the
/// runtime uses the first one).
pub const CONFLIST_NAME: &str = "05-ferrox.conflist";
/// Name of the CNI plugin binary (the conflist's `type`).
pub const CNI_BINARY: &str = "ferrox-cni";
/// The CNI network name.
pub const NETWORK_NAME: &str = "ferrox";

/// The network configuration list the runtime reads: ferrox's plugin, pointed at the node
/// configuration the agent writes.
pub fn conflist(node_config: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": ferrox_cni::spec::CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            { "type": CNI_BINARY, "nodeConfig": node_config }
        ]
    })
}

/// Why the agent is not ready yet, or `Ok` when it is: the node configuration is written and
/// valid, and `/healthz` answers 200.
pub fn agent_readiness(node_config: &Path, healthz: SocketAddr) -> Result<(), String> {
    NodeConfig::read(node_config).map_err(|e| format!("{e}"))?;
    match http_status(healthz, "/healthz") {
        Ok(200) => Ok(()),
        Ok(code) => Err(format!("http://{healthz}/healthz answers {code}")),
        Err(e) => Err(format!("http://{healthz}/healthz: {e}")),
    }
}

/// The status code of `GET path` (HTTP/1.0, one request per connection: all a probe needs).
fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP status line")
        })
}

/// Puts `contents` at `dir/name` with `mode`, atomically: written and synced under a hidden
/// temporary name in the same directory, then renamed over the old file (a running plugin
/// keeps its old inode). Returns false when the file already had these contents and mode.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<bool> {
    let dst = dir.join(name);
    if let (Ok(existing), Ok(meta)) = (std::fs::read(&dst), std::fs::metadata(&dst))
        && existing == contents
        && meta.permissions().mode() & 0o7777 == mode
    {
        return Ok(false);
    }
    // The runtime loads only *.conf, *.conflist and *.json files, and runs only the plugin
    // named by `type`: neither looks at this name.
    let tmp = dir.join(format!(".{name}.ferrox-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", dst.display()));
    }
    Ok(true)
}

/// What [`install`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub binary: bool,
    pub conflist: bool,
}

/// Copies the plugin and writes the conflist (each only when it differs from what is there).
/// The plugin goes first: a conflist must never name a plugin that is not there yet.
pub fn install(dirs: &CniDirs, binary: &Path, node_config: &Path) -> anyhow::Result<Installed> {
    let bytes = std::fs::read(binary)
        .with_context(|| format!("reading the plugin {}", binary.display()))?;
    for dir in [&dirs.cni_bin_dir, &dirs.cni_conf_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let binary = write_atomic(&dirs.cni_bin_dir, CNI_BINARY, &bytes, 0o755)?;
    let mut conf = serde_json::to_vec_pretty(&conflist(node_config))?;
    conf.push(b'\n');
    let conflist = write_atomic(&dirs.cni_conf_dir, &dirs.cni_conflist_name, &conf, 0o644)?;
    Ok(Installed { binary, conflist })
}

/// SIGTERM and SIGINT, blocked so that [`wait_signal`] receives them.
fn block_signals() -> anyhow::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("blocking SIGTERM")?;
    Ok(set)
}

/// Sleeps for `timeout`, or less if one of `set` arrives; returns the signal's number then.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = nix::sys::time::TimeSpec::from_duration(timeout);
    // SAFETY: `set` is a valid sigset_t, `ts` a valid timespec, and a null info pointer is
    // allowed; the call only reads them.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), ts.as_ref()) };
    (n > 0).then_some(n)
}

/// `ferrox install-cni`.
pub fn run_install(args: &InstallCniArgs) -> anyhow::Result<()> {
    let signals = block_signals()?;
    let binary = match &args.cni_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(CNI_BINARY),
    };
    anyhow::ensure!(
        binary.is_file(),
        "the CNI plugin {} does not exist; pass --cni-binary",
        binary.display()
    );
    info!(node_config = %args.node_config.display(), healthz = %args.agent_healthz, "waiting for the agent to be ready before installing the CNI plugin");
    let mut delay = Duration::from_millis(100);
    loop {
        match agent_readiness(&args.node_config, args.agent_healthz) {
            Ok(()) => break,
            Err(why) => debug!(reason = %why, "agent not ready yet"),
        }
        if let Some(sig) = wait_signal(&signals, delay) {
            info!(
                signal = sig,
                "stopping before the agent was ready; nothing installed"
            );
            return Ok(());
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    let done = install(&args.dirs, &binary, &args.node_config)?;
    info!(
        bin_dir = %args.dirs.cni_bin_dir.display(),
        conf = %args.dirs.cni_conf_dir.join(&args.dirs.cni_conflist_name).display(),
        binary_changed = done.binary,
        conflist_changed = done.conflist,
        "agent ready: CNI plugin and network configuration installed"
    );
    if !args.keep_running {
        return Ok(());
    }
    let every = Duration::from_secs(args.recheck_interval.max(1));
    loop {
        if let Some(sig) = wait_signal(&signals, every) {
            info!(
                signal = sig,
                "stopping; the CNI plugin and configuration stay installed"
            );
            return Ok(());
        }
        // Put back what someone removed, but only while the agent still serves.
        match agent_readiness(&args.node_config, args.agent_healthz) {
            Ok(()) => match install(&args.dirs, &binary, &args.node_config) {
                Ok(d) if d != Installed::default() => {
                    info!(binary = d.binary, conflist = d.conflist, "reinstalled")
                }
                Ok(_) => {}
                Err(e) => warn!(error = format!("{e:#}"), "reinstalling the CNI plugin"),
            },
            Err(why) => debug!(reason = %why, "agent not ready; not checking the installed files"),
        }
    }
}

/// What [`uninstall`] removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub programs: usize,
    pub maps: usize,
    pub routes: usize,
    pub interfaces: usize,
    pub files: Vec<PathBuf>,
}

fn remove_file(path: &Path, removed: &mut Removed) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            removed.files.push(path.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// True for the host side of a pod interface the plugin created (`fx` and 11 hex digits).
pub fn is_pod_interface(name: &str) -> bool {
    name.len() == 13 && name.starts_with("fx") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// `ferrox uninstall`: everything ferrox put on the node, in the current network namespace.
/// Idempotent: a second run finds nothing and succeeds.
pub fn uninstall(args: &UninstallArgs, layout: &PinLayout) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    // The network configuration first: the runtime stops sending new pods here.
    let conflist = args.dirs.cni_conf_dir.join(&args.dirs.cni_conflist_name);
    remove_file(&conflist, &mut removed)?;
    remove_file(&args.dirs.cni_bin_dir.join(CNI_BINARY), &mut removed)?;
    // Unpinning the links detaches every program from the cgroup, the uplink and pod veths.
    let report = ferrox_datapath::cleanup(layout).context("removing the datapath's pins")?;
    removed.links = report.links;
    removed.programs = report.programs;
    removed.maps = report.maps;

    let nl = ferrox_cni::netlink::Netlink::open().context("opening rtnetlink")?;
    for route in nl.list_routes(ferrox_cni::netlink::ALL_TABLES)? {
        let ours = route.protocol == ferrox_cni::pod::ROUTE_PROTOCOL
            || route.protocol == crate::routing::kernel::ROUTE_PROTOCOL;
        if ours && nl.del_route(&route)? {
            removed.routes += 1;
        }
    }
    for link in nl.list_links()? {
        if link.kind.as_deref() == Some("veth")
            && is_pod_interface(&link.name)
            && nl.delete_link(link.index)?
        {
            removed.interfaces += 1;
        }
    }

    remove_file(&args.node_config, &mut removed)?;
    // The agent's status socket beside it (left when the agent was killed).
    remove_file(&crate::status::socket_path(&args.node_config), &mut removed)?;
    match std::fs::remove_dir_all(&args.ipam_dir) {
        Ok(()) => removed.files.push(args.ipam_dir.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", args.ipam_dir.display())),
    }
    Ok(removed)
}

/// `ferrox uninstall`, with its report and `--keep-running`.
pub fn run_uninstall(args: &UninstallArgs, layout: &PinLayout) -> anyhow::Result<()> {
    let signals = block_signals()?;
    let r = uninstall(args, layout)?;
    info!(
        links = r.links,
        programs = r.programs,
        maps = r.maps,
        routes = r.routes,
        pod_interfaces = r.interfaces,
        files = ?r.files,
        "ferrox removed from this node"
    );
    if args.keep_running {
        while wait_signal(&signals, Duration::from_secs(3600)).is_none() {}
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn conflist_names_the_plugin_and_the_node_configuration() {
        let c = conflist(Path::new("/run/ferrox/node.json"));
        assert_eq!(c["name"], NETWORK_NAME);
        assert_eq!(c["plugins"][0]["type"], CNI_BINARY);
        assert_eq!(c["plugins"][0]["nodeConfig"], "/run/ferrox/node.json");
        // What a runtime hands the plugin: the plugin's entry plus name and version.
        let mut plugin = c["plugins"][0].clone();
        plugin["name"] = c["name"].clone();
        plugin["cniVersion"] = c["cniVersion"].clone();
        let parsed = ferrox_cni::spec::NetConf::parse(plugin.to_string().as_bytes()).unwrap();
        assert_eq!(
            parsed.node_config.as_deref(),
            Some(Path::new("/run/ferrox/node.json"))
        );
    }

    #[test]
    fn pod_interfaces_are_told_from_others() {
        let name = ferrox_cni::pod::host_ifname("abc", "eth0");
        assert!(is_pod_interface(&name), "{name}");
        for other in ["eth0", "fx", "fxzzzzzzzzzzz", "fx0123456789ab", "veth1234"] {
            assert!(!is_pod_interface(other), "{other}");
        }
    }

    #[test]
    fn atomic_writes_replace_and_skip_identical_contents() {
        let dir = std::env::temp_dir().join(format!("ferrox-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        assert!(write_atomic(&dir, "f", b"one", 0o755).unwrap());
        assert!(
            !write_atomic(&dir, "f", b"one", 0o755).unwrap(),
            "unchanged"
        );
        assert!(
            write_atomic(&dir, "f", b"one", 0o644).unwrap(),
            "mode differs"
        );
        assert!(write_atomic(&dir, "f", b"two", 0o644).unwrap());
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"], "no temporary file left");
    }

    #[test]
    fn readiness_needs_the_node_configuration_and_healthz() {
        let missing = agent_readiness(
            Path::new("/nonexistent/node.json"),
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap_err();
        assert!(missing.contains("not found"), "{missing}");
    }
}
