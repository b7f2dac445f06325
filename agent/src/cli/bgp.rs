//! `ferrox bgp peers | routes`: the sessions and the best routes, as the agent reports them on
//! its status socket (they live only in the agent).

use std::net::Ipv4Addr;

use super::{
    NodeArgs,
    output::{Output, print_data, print_table},
};
use crate::observability::status;

#[derive(Debug, clap::Subcommand)]
pub enum BgpCommand {
    /// Each neighbour: state, since when, hold time in force and configured, prefixes received
    /// (and the most it may send) and advertised, last error.
    Peers(NodeArgs),
    /// The best route to each prefix learned over BGP, with its next hops and peers.
    Routes(NodeArgs),
}

/// `ferrox bgp peers|routes`: asks the agent over its status socket.
pub fn run(cmd: BgpCommand) -> anyhow::Result<()> {
    let (BgpCommand::Peers(args) | BgpCommand::Routes(args)) = &cmd;
    let socket = status::socket_path(&args.node_config);
    let status = status::agent_status(&socket).ok_or_else(|| {
        anyhow::anyhow!(
            "the agent does not answer on {} (BGP sessions live in the agent)",
            socket.display()
        )
    })?;
    let (Some(peers), Some(routes)) = (status.bgp_peers, status.bgp_routes) else {
        anyhow::bail!("the agent runs without BGP (--bgp)");
    };
    match (&cmd, args.output) {
        (BgpCommand::Peers(_), o @ (Output::Json | Output::Yaml)) => {
            print_data(o, &peers)?;
        }
        (BgpCommand::Routes(_), o @ (Output::Json | Output::Yaml)) => {
            print_data(o, &routes)?;
        }
        (BgpCommand::Peers(_), Output::Table) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let rows: Vec<[String; 11]> = peers
                .iter()
                .map(|p| {
                    [
                        p.name.clone(),
                        p.addr.to_string(),
                        p.asn.to_string(),
                        p.state.clone(),
                        format!("{}s", now.saturating_sub(p.since_unix)),
                        // In force (as of the last OPEN; none before one), and configured.
                        if p.router_id.is_some() {
                            format!("{}s", p.hold_time)
                        } else {
                            "-".into()
                        },
                        format!("{}s", p.configured_hold_time),
                        p.received.to_string(),
                        p.max_prefixes.map_or("-".into(), |m| m.to_string()),
                        p.advertised.to_string(),
                        p.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(
                [
                    "PEER",
                    "ADDRESS",
                    "AS",
                    "STATE",
                    "SINCE",
                    "HOLD",
                    "CONFIGURED",
                    "RECEIVED",
                    "MAX",
                    "ADVERTISED",
                    "LAST ERROR",
                ],
                &rows,
            );
        }
        (BgpCommand::Routes(_), Output::Table) => {
            let rows: Vec<[String; 4]> = routes
                .iter()
                .map(|r| {
                    let join = |v: &[Ipv4Addr]| {
                        v.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    [
                        r.prefix.to_string(),
                        join(&r.next_hops),
                        join(&r.peers),
                        r.as_path_len.to_string(),
                    ]
                })
                .collect();
            print_table(["PREFIX", "NEXT HOPS", "FROM", "AS PATH LEN"], &rows);
        }
    }
    Ok(())
}
