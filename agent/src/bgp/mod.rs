//! The BGP speaker of the agent (issue #5), built up in layers: [`wire`] (the message format
//! and the NOTIFICATION of every malformed message) so far; the session state machine, the RIB
//! and the peering configuration follow.

pub mod rib;
pub mod speaker;
pub mod wire;

use std::net::Ipv4Addr;

/// The MD5 key of the peer `name`: the file `<dir>/<name>` (a Kubernetes Secret mounted there,
/// one key per peer name), trimmed; `None` when there is no such file.
pub fn password(dir: &std::path::Path, name: &str) -> anyhow::Result<Option<String>> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Ok(None);
    }
    match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading the BGP password of {name}: {e}")),
    }
}

/// Parses a `--bgp-peers` entry: `name=address:as` or `address:as`.
pub fn parse_peer(s: &str, port: u16) -> anyhow::Result<speaker::Peer> {
    let (name, rest) = match s.split_once('=') {
        Some((n, r)) => (n.trim().to_owned(), r),
        None => (String::new(), s),
    };
    let (addr, asn) = rest
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("BGP peer {s:?}: want name=address:as"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("BGP peer {s:?}: address: {e}"))?;
    let asn: u32 = asn
        .parse()
        .map_err(|e| anyhow::anyhow!("BGP peer {s:?}: AS number: {e}"))?;
    Ok(speaker::Peer {
        name: if name.is_empty() {
            addr.to_string()
        } else {
            name
        },
        addr,
        asn,
        port,
        passive: false,
        password: None,
    })
}

/// `ferrox bgp peers|routes`: asks the agent over its status socket.
pub fn cli(cmd: crate::cli::BgpCommand) -> anyhow::Result<()> {
    use crate::{cli::Output, inspect::print_table};
    let (crate::cli::BgpCommand::Peers(args) | crate::cli::BgpCommand::Routes(args)) = &cmd;
    let socket = crate::status::socket_path(&args.node_config);
    let status = crate::status::agent_status(&socket).ok_or_else(|| {
        anyhow::anyhow!(
            "the agent does not answer on {} (BGP sessions live in the agent)",
            socket.display()
        )
    })?;
    let (Some(peers), Some(routes)) = (status.bgp_peers, status.bgp_routes) else {
        anyhow::bail!("the agent runs without BGP (--bgp)");
    };
    match (&cmd, args.output) {
        (crate::cli::BgpCommand::Peers(_), o @ (Output::Json | Output::Yaml)) => {
            crate::inspect::print_data(o, &peers)?;
        }
        (crate::cli::BgpCommand::Routes(_), o @ (Output::Json | Output::Yaml)) => {
            crate::inspect::print_data(o, &routes)?;
        }
        (crate::cli::BgpCommand::Peers(_), Output::Table) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let rows: Vec<[String; 8]> = peers
                .iter()
                .map(|p| {
                    [
                        p.name.clone(),
                        p.addr.to_string(),
                        p.asn.to_string(),
                        p.state.clone(),
                        format!("{}s", now.saturating_sub(p.since_unix)),
                        p.received.to_string(),
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
                    "RECEIVED",
                    "ADVERTISED",
                    "LAST ERROR",
                ],
                &rows,
            );
        }
        (crate::cli::BgpCommand::Routes(_), Output::Table) => {
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

#[cfg(test)]
mod tests {
    #[test]
    fn peers_parse_with_and_without_a_name() {
        let p = super::parse_peer("tor=198.18.0.1:4200000000", 179).unwrap();
        assert_eq!(
            (p.name.as_str(), p.addr.to_string(), p.asn),
            ("tor", "198.18.0.1".into(), 4_200_000_000)
        );
        let p = super::parse_peer("198.18.0.1:65001", 179).unwrap();
        assert_eq!(p.name, "198.18.0.1");
        for bad in ["tor=198.18.0.1", "x=1.2.3:65001", "x=1.2.3.4:as"] {
            assert!(super::parse_peer(bad, 179).is_err(), "{bad}");
        }
    }
}
