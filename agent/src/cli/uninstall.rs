//! `ferrox uninstall`: removes everything ferrox put on the node — the network configuration and
//! the plugin first (no new pods), then the datapath's pins (which detaches every program), the
//! routes with ferrox's protocol numbers, the host side of pod interfaces, the node
//! configuration, the agent's status socket and the IPAM store. Idempotent.
//!
//! It must never remove a file that ferrox did not put there.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use ferrox_datapath::PinLayout;
use tracing::info;

use super::install_cni::{CNI_BINARY, CniDirs, block_signals, wait_signal};
use clap::Args;

use crate::logging::LogFormat;

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub dirs: CniDirs,

    /// The node configuration the agent wrote.
    #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
    pub node_config: PathBuf,

    /// The IPAM store's directory.
    #[arg(long, env = "FERROX_IPAM_DIR", default_value = "/var/lib/ferrox/ipam")]
    pub ipam_dir: PathBuf,

    /// After cleaning up, keep running until SIGTERM (the uninstall DaemonSet's container).
    #[arg(long)]
    pub keep_running: bool,

    #[arg(long, value_enum, env = "FERROX_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    (name.len() == 13 && name.starts_with("fx") && name[2..].bytes().all(|b| b.is_ascii_hexdigit()))
        || ferrox_cni::pod::is_retired_ifname(name)
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
    remove_file(
        &crate::observability::status::socket_path(&args.node_config),
        &mut removed,
    )?;
    // Its NetworkPolicy report, beside it too.
    remove_file(
        &crate::policy::report::PolicyReport::path(&args.node_config),
        &mut removed,
    )?;
    match std::fs::remove_dir_all(&args.ipam_dir) {
        Ok(()) => removed.files.push(args.ipam_dir.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", args.ipam_dir.display())),
    }
    Ok(removed)
}

/// `ferrox uninstall`, with its report and `--keep-running`.
pub fn run(args: &UninstallArgs, layout: &PinLayout) -> anyhow::Result<()> {
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
    fn pod_interfaces_are_told_from_others() {
        let name = ferrox_cni::pod::host_ifname("abc", "eth0");
        assert!(is_pod_interface(&name), "{name}");
        for other in ["eth0", "fx", "fxzzzzzzzzzzz", "fx0123456789ab", "veth1234"] {
            assert!(!is_pod_interface(other), "{other}");
        }
    }
}
