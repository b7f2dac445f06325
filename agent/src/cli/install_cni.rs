//! `ferrox install-cni` (the DaemonSet's `install-cni` container) waits until the agent on the
//! node is ready — its node configuration written (the datapath is attached) and `/healthz`
//! answering 200 (the service maps are synced) — and only then copies the CNI plugin into the
//! runtime's bin dir and writes the network configuration into its conf dir. The kubelet reports
//! a node's network ready as soon as a configuration file exists, so writing it earlier would
//! send pods to a node that cannot serve them. Both files are written beside their final name
//! and renamed into place: the runtime never reads half a file.
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
use tracing::{debug, info, warn};

use clap::Args;

use crate::logging::LogFormat;

/// Where the container runtime looks for CNI plugins and network configurations on this node.
#[derive(Debug, Args)]
pub struct CniDirs {
    /// Directory of CNI plugin binaries (the runtime's CNI bin dir; mounted from the host in the
    /// DaemonSet).
    #[arg(long, env = "FERROX_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// Directory of CNI network configurations (the runtime's CNI conf dir).
    #[arg(long, env = "FERROX_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// File name of ferrox's network configuration; runtimes use the first file in name order.
    #[arg(long, env = "FERROX_CNI_CONFLIST_NAME", default_value = CONFLIST_NAME)]
    pub cni_conflist_name: String,
}

#[derive(Debug, Args)]
pub struct InstallCniArgs {
    #[command(flatten)]
    pub dirs: CniDirs,

    /// The CNI plugin binary to install; default: `ferrox-cni` beside this executable.
    #[arg(long, env = "FERROX_CNI_BINARY")]
    pub cni_binary: Option<PathBuf>,

    /// The node configuration the agent writes once the datapath is up (the conflist points the
    /// plugin at it; the path is the same on the host and in the agent's container).
    #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
    pub node_config: PathBuf,

    /// Where the agent serves `/healthz`; the plugin is installed only once it answers 200.
    #[arg(long, env = "FERROX_AGENT_HEALTHZ", default_value = "127.0.0.1:10256")]
    pub agent_healthz: std::net::SocketAddr,

    /// After installing, keep running (a DaemonSet container), reinstalling whatever goes
    /// missing, until SIGTERM.
    #[arg(long, env = "FERROX_CNI_KEEP_RUNNING")]
    pub keep_running: bool,

    /// Seconds between two checks of the installed files while running.
    #[arg(long, env = "FERROX_CNI_RECHECK_INTERVAL", default_value_t = 30)]
    pub recheck_interval: u64,

    /// The one CNI version the network configuration names (default: 1.0.0, which every
    /// runtime accepts, with every version the chain speaks in `cniVersions` for CNI 1.1
    /// runtimes).
    #[arg(long, env = "FERROX_CNI_VERSION", value_parser = ["0.4.0", "1.0.0", "1.1.0"])]
    pub cni_version: Option<String>,

    /// Chain the reference `portmap` plugin (hostPort) when it is in the CNI bin dir.
    #[arg(long, env = "FERROX_CNI_PORTMAP", default_value_t = true, action = clap::ArgAction::Set)]
    pub cni_portmap: bool,

    #[arg(long, value_enum, env = "FERROX_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Name of the network configuration file; `05-` sorts it before most other CNIs' files (the
/// runtime uses the first one).
pub const CONFLIST_NAME: &str = "05-ferrox.conflist";
/// Name of the CNI plugin binary (the conflist's `type`).
pub const CNI_BINARY: &str = "ferrox-cni";
/// The CNI network name.
pub const NETWORK_NAME: &str = "ferrox";

/// The reference plugin `hostPort` needs (containernetworking-plugins), chained after ferrox's
/// when it is in the bin dir, as Calico's default configuration does.
pub const PORTMAP: &str = "portmap";

/// What the network configuration is made of besides ferrox's plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// `--cni-version`: the one version the configuration names.
    pub forced: Option<String>,
    /// The versions `portmap` answered to VERSION, when it is chained.
    pub portmap: Option<Vec<String>>,
}

/// The network configuration list the runtime reads: ferrox's plugin, pointed at the node
/// configuration the agent writes, then `portmap` when it is chained.
///
/// Versions: `cniVersions` lists every version all the chained plugins speak (CNI 1.1 runtimes
/// pick the highest they know from it); `cniVersion` is the highest of those that runtimes whose
/// libcni predates CNI 1.1 accept ([`ferrox_cni::spec::COMPATIBLE_VERSION`]: containerd 1.6 and
/// 1.7 refuse a 1.1.0 result), so the file works with every runtime in service. `--cni-version`
/// names one version for both, and must be one every chained plugin speaks.
pub fn conflist(node_config: &Path, chain: &Chain) -> Result<serde_json::Value, String> {
    use ferrox_cni::spec::{COMPATIBLE_VERSION, SUPPORTED_VERSIONS};
    // Versions compare as numbers, not text.
    let key = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    let mut common: Vec<&str> = SUPPORTED_VERSIONS
        .iter()
        .copied()
        .filter(|v| {
            chain
                .portmap
                .as_ref()
                .is_none_or(|p| p.iter().any(|pv| pv == v))
        })
        .collect();
    common.sort_by_key(|v| key(v));
    let (version, versions) = match &chain.forced {
        Some(f) if common.contains(&f.as_str()) => (f.clone(), vec![f.clone()]),
        Some(f) => {
            return Err(format!(
                "--cni-version {f}: the chained plugins all speak only {} ({} speaks {})",
                common.join(", "),
                CNI_BINARY,
                SUPPORTED_VERSIONS.join(", ")
            ));
        }
        None => {
            let compatible = common
                .iter()
                .rev()
                .find(|v| key(v) <= key(COMPATIBLE_VERSION))
                .ok_or_else(|| {
                    format!(
                        "{PORTMAP} speaks none of the versions {CNI_BINARY} speaks ({})",
                        SUPPORTED_VERSIONS.join(", ")
                    )
                })?;
            (
                (*compatible).to_owned(),
                common.iter().map(|v| (*v).to_owned()).collect(),
            )
        }
    };
    // The bandwidth capability: the runtime then tells ferrox when a pod's egress is shaped by
    // a `bandwidth` plugin chained after it (which needs the veth's ingress qdisc), so that the
    // pod's program is attached in a way that leaves that qdisc free.
    let mut plugins = vec![serde_json::json!({
        "type": CNI_BINARY,
        "nodeConfig": node_config,
        "capabilities": { "bandwidth": true },
    })];
    if chain.portmap.is_some() {
        plugins.push(serde_json::json!({
            "type": PORTMAP,
            "capabilities": { "portMappings": true },
            "snat": true,
        }));
    }
    Ok(serde_json::json!({
        "cniVersion": version,
        "cniVersions": versions,
        "name": NETWORK_NAME,
        "plugins": plugins,
    }))
}

/// The versions the CNI plugin at `path` speaks: its answer to the VERSION command.
pub fn plugin_versions(path: &Path) -> anyhow::Result<Vec<String>> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(path)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {} VERSION", path.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Any version this plugin could name; the answer lists them all.
        let _ = stdin.write_all(br#"{"cniVersion":"0.4.0"}"#);
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {} VERSION", path.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} VERSION failed ({})",
        path.display(),
        out.status
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} VERSION did not answer JSON", path.display()))?;
    let versions: Vec<String> = answer["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(
        !versions.is_empty(),
        "{} VERSION lists no supportedVersions",
        path.display()
    );
    Ok(versions)
}

/// The chain for this node: `portmap` when it is in the bin dir, answers VERSION, and `chain`
/// asks for it. Says in the log why hostPort will not work otherwise.
fn chain_for(args: &InstallCniArgs) -> Chain {
    let mut chain = Chain {
        forced: args.cni_version.clone(),
        portmap: None,
    };
    if !args.cni_portmap {
        return chain;
    }
    let path = args.dirs.cni_bin_dir.join(PORTMAP);
    if !path.is_file() {
        warn!(bin_dir = %args.dirs.cni_bin_dir.display(), "no {PORTMAP} plugin in the CNI bin dir: pods with hostPort will not get their port (install the reference CNI plugins, e.g. Debian's containernetworking-plugins)");
        return chain;
    }
    match plugin_versions(&path) {
        Ok(v) => chain.portmap = Some(v),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "not chaining {PORTMAP}: pods with hostPort will not get their port"
            )
        }
    }
    chain
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
pub fn install(
    dirs: &CniDirs,
    binary: &Path,
    node_config: &Path,
    chain: &Chain,
) -> anyhow::Result<Installed> {
    let bytes = std::fs::read(binary)
        .with_context(|| format!("reading the plugin {}", binary.display()))?;
    for dir in [&dirs.cni_bin_dir, &dirs.cni_conf_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let binary = write_atomic(&dirs.cni_bin_dir, CNI_BINARY, &bytes, 0o755)?;
    let list = conflist(node_config, chain).map_err(anyhow::Error::msg)?;
    let mut conf = serde_json::to_vec_pretty(&list)?;
    conf.push(b'\n');
    let conflist = write_atomic(&dirs.cni_conf_dir, &dirs.cni_conflist_name, &conf, 0o644)?;
    Ok(Installed { binary, conflist })
}

/// SIGTERM and SIGINT, blocked so that [`wait_signal`] receives them.
pub(super) fn block_signals() -> anyhow::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("blocking SIGTERM")?;
    Ok(set)
}

/// Sleeps for `timeout`, or less if one of `set` arrives; returns the signal's number then.
pub(super) fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = nix::sys::time::TimeSpec::from_duration(timeout);
    // SAFETY: `set` is a valid sigset_t, `ts` a valid timespec, and a null info pointer is
    // allowed; the call only reads them.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), ts.as_ref()) };
    (n > 0).then_some(n)
}

/// `ferrox install-cni`.
pub fn run(args: &InstallCniArgs) -> anyhow::Result<()> {
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
    let chain = chain_for(args);
    let done = install(&args.dirs, &binary, &args.node_config, &chain)?;
    info!(
        portmap = chain.portmap.is_some(),
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
            Ok(()) => match install(&args.dirs, &binary, &args.node_config, &chain_for(args)) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn chain(forced: Option<&str>, portmap: Option<&[&str]>) -> Chain {
        Chain {
            forced: forced.map(str::to_owned),
            portmap: portmap.map(|p| p.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn conflist_versions_work_with_every_runtime_and_the_chain() {
        let node = Path::new("/run/ferrox/node.json");
        let versions = |c: &serde_json::Value| -> (String, Vec<String>, usize) {
            (
                c["cniVersion"].as_str().unwrap().to_owned(),
                serde_json::from_value(c["cniVersions"].clone()).unwrap(),
                c["plugins"].as_array().unwrap().len(),
            )
        };
        /// (cniVersion, cniVersions, number of plugins), or a part of the error.
        type Want = Result<(&'static str, &'static [&'static str], usize), &'static str>;
        // (forced, portmap's versions) -> what the conflist must be.
        #[expect(
            clippy::type_complexity,
            reason = "a test table, its columns named above"
        )]
        let cases: [(Option<&str>, Option<&[&str]>, Want); 7] = [
            // Alone: 1.0.0 for old libcni, all three for CNI 1.1 runtimes.
            (None, None, Ok(("1.0.0", &["0.4.0", "1.0.0", "1.1.0"], 1))),
            // portmap 1.1.1 (Debian 12) speaks up to 1.0.0.
            (
                None,
                Some(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]),
                Ok(("1.0.0", &["0.4.0", "1.0.0"], 2)),
            ),
            // A newer portmap: 1.1.0 offered, 1.0.0 named.
            (
                None,
                Some(&["0.4.0", "1.0.0", "1.1.0"]),
                Ok(("1.0.0", &["0.4.0", "1.0.0", "1.1.0"], 2)),
            ),
            // An old portmap: the newest common version.
            (
                None,
                Some(&["0.3.1", "0.4.0"]),
                Ok(("0.4.0", &["0.4.0"], 2)),
            ),
            (Some("1.1.0"), None, Ok(("1.1.0", &["1.1.0"], 1))),
            (
                Some("1.1.0"),
                Some(&["0.4.0", "1.0.0"]),
                Err("only 0.4.0, 1.0.0"),
            ),
            (None, Some(&["0.2.0"]), Err("speaks none of the versions")),
        ];
        for (forced, portmap, want) in cases {
            let got = conflist(node, &chain(forced, portmap));
            match want {
                Ok((v, vs, n)) => {
                    let c = got.unwrap();
                    assert_eq!(
                        versions(&c),
                        (
                            v.to_owned(),
                            vs.iter().map(|s| (*s).to_owned()).collect(),
                            n
                        ),
                        "{forced:?} {portmap:?}"
                    );
                }
                Err(msg) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(msg), "{forced:?} {portmap:?}: {e}");
                }
            }
        }
        let c = conflist(node, &chain(None, Some(&["1.0.0"]))).unwrap();
        assert_eq!(c["plugins"][1]["type"], PORTMAP);
        assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn conflist_names_the_plugin_and_the_node_configuration() {
        let c = conflist(Path::new("/run/ferrox/node.json"), &Chain::default()).unwrap();
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
