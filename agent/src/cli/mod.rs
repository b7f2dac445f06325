//! The command line of the `ferrox` binary, and every command but `ferrox agent` (which is
//! [`crate::daemon`]). One file per subcommand; each has a `run`. They read the node's pinned
//! maps, its files and the agent's status socket directly, so they work while the agent is down,
//! and they print through [`output`] only.
//!
//! Nothing outside this folder imports it: the daemon publishes documents (pinned maps, the
//! status socket, files) and the commands read them, never the other way round
//! (`cargo xtask lint` checks it).

pub mod bgp;
pub mod counters;
pub mod ct;
pub mod datapath;
pub mod endpoints;
pub mod install_cni;
pub mod ipam;
pub mod monitor;
pub mod output;
pub mod policy;
pub mod routes;
pub mod status;
pub mod svc;
pub mod trace;
pub mod uninstall;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use ferrox_datapath::PinLayout;

use crate::daemon::args::AgentArgs;
use output::{Output, OutputArgs};

#[derive(Debug, Parser)]
#[command(
    name = "ferrox",
    version,
    about = "ferrox: eBPF networking data plane for Kubernetes"
)]
pub struct Cli {
    /// Where the datapath is pinned on this node.
    #[arg(long, global = true, env = "FERROX_BPFFS_ROOT", default_value = ferrox_datapath::DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (or, with --cleanup, remove its pins, links and node configuration).
    Agent(Box<AgentArgs>),
    /// Wait until the agent on this node is ready, then install the CNI plugin and its network
    /// configuration (what the DaemonSet's `install-cni` container runs).
    InstallCni(install_cni::InstallCniArgs),
    /// Remove everything ferrox put on this node: programs, pins, routes, pod interfaces, the
    /// node configuration, the IPAM store, the CNI configuration and the CNI plugin.
    Uninstall(uninstall::UninstallArgs),
    /// Services as the datapath holds them.
    #[command(subcommand)]
    Svc(svc::SvcCommand),
    /// Verdict and drop-reason counters of the kernel programs.
    Counters(OutputArgs),
    /// Pinned maps, programs and links, with kernel ids and attach targets.
    Datapath(OutputArgs),
    /// This node's address blocks and allocations.
    #[command(subcommand)]
    Ipam(ipam::IpamCommand),
    /// Connection tracking: translated flows from outside the node.
    #[command(subcommand)]
    Ct(ct::CtCommand),
    /// This node's pod endpoints: address, veth, pod.
    Endpoints(NodeArgs),
    /// NetworkPolicy on this node: policies and the pods they select, isolated pods, the flows
    /// remembered as allowed.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// BGP sessions and routes (asks the agent).
    #[command(subcommand)]
    Bgp(bgp::BgpCommand),
    /// Routes to other nodes' pod blocks: next hops, IP-in-IP or direct, MTU; the nodes
    /// IP-in-IP is accepted from.
    Routes(OutputArgs),
    /// The node at a glance: agent, kernel, attachments, map fill, IPAM, warnings.
    Status(NodeArgs),
    /// A live stream of drops (with reasons) and translations (before and after).
    Monitor {
        #[command(flatten)]
        filter: monitor::Filter,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The node configuration the agent wrote (beside it, the NetworkPolicy report that
        /// names the policies behind a policy drop).
        #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
        node_config: PathBuf,
    },
    /// Prints a shell completion script (e.g. `ferrox completion bash > /etc/bash_completion.d/ferrox`).
    Completion { shell: clap_complete::Shell },
    /// What a packet would meet on this node: path, conntrack, frontend, source ranges, the
    /// backend and why. Works while the agent is down.
    Trace(trace::TraceArgs),
}

/// The flags of the commands that read the node configuration (and through it the IPAM store
/// and the agent's status socket).
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node configuration the agent wrote.
    #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
    pub node_config: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs one node command (every command but `agent`, which `main` hands to the daemon).
pub fn run(command: Command, layout: &PinLayout) -> anyhow::Result<ExitCode> {
    match command {
        Command::Agent(_) => anyhow::bail!("`ferrox agent` is run by the daemon, not the CLI"),
        Command::InstallCni(args) => install_cni::run(&args)?,
        Command::Uninstall(args) => uninstall::run(&args, layout)?,
        Command::Svc(svc::SvcCommand::List(o)) => svc::run(layout, o.output)?,
        Command::Counters(o) => counters::run(layout, o.output)?,
        Command::Datapath(o) => datapath::run(layout, o.output)?,
        Command::Ipam(cmd) => return ipam::run(cmd, layout),
        Command::Ct(cmd) => ct::run(cmd, layout)?,
        Command::Endpoints(a) => endpoints::run(layout, &a.node_config, a.output)?,
        Command::Bgp(cmd) => bgp::run(cmd)?,
        Command::Policy(cmd) => policy::run(cmd, layout)?,
        Command::Routes(a) => routes::run(layout, a.output)?,
        Command::Status(a) => status::run(layout, &a.node_config, a.output)?,
        Command::Monitor {
            filter,
            output,
            node_config,
        } => monitor::run(layout, &filter, output, &node_config)?,
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "ferrox", &mut std::io::stdout());
        }
        Command::Trace(t) => trace::run(layout, &t)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_every_subcommand_for_every_shell() {
        use clap::CommandFactory as _;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferrox", &mut buf);
            let script = String::from_utf8(buf).unwrap_or_default();
            for sub in Cli::command().get_subcommands() {
                assert!(
                    script.contains(sub.get_name()),
                    "{shell:?} completion lacks {}",
                    sub.get_name()
                );
            }
        }
    }
}
