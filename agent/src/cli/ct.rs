//! `ferrox ct list | flush`: the connection-tracking table as flows (both directions of a
//! translated flow on one line), from the pinned maps, so it works while the agent is down.

use std::net::{Ipv4Addr, SocketAddrV4};

use ferrox_abi::{CtEntry, CtKey, ct_flags, fwd_flags, proto};
use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use super::output::{Output, print_data, print_table};
use crate::conntrack::reply_key;

#[derive(Debug, clap::Subcommand)]
pub enum CtCommand {
    /// Tracked flows (both directions on one line), filtered.
    List {
        #[command(flatten)]
        filter: Filter,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Forgets the matching flows: their next packet is a new flow (new backend choice).
    Flush {
        #[command(flatten)]
        filter: Filter,
    },
}

pub fn run(cmd: CtCommand, layout: &PinLayout) -> anyhow::Result<()> {
    match cmd {
        CtCommand::List { filter, output } => list(layout, &filter, output),
        CtCommand::Flush { filter } => flush(layout, &filter),
    }
}

/// Which flows a command applies to; every given field must match.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// An address anywhere in the flow (client, frontend, backend, SNAT address).
    #[arg(long)]
    pub addr: Option<Ipv4Addr>,
    /// A port anywhere in the flow.
    #[arg(long)]
    pub port: Option<u16>,
    /// tcp or udp.
    #[arg(long)]
    pub proto: Option<String>,
}

/// One tracked flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub proto: &'static str,
    /// As the client sent it.
    pub client: String,
    pub frontend: String,
    /// As it leaves for the backend.
    pub nat_source: String,
    pub backend: String,
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub flags: Vec<&'static str>,
    /// Seconds since a packet of either direction used it.
    pub idle_s: u64,
    /// Whether its reply entry exists.
    pub reply: bool,
    /// The route cached for packets towards the backend (`None`: none cached yet).
    pub route: Option<CachedRoute>,
    /// The route cached for the replies.
    pub reply_route: Option<CachedRoute>,
}

/// Where the programs send a flow's packets without a FIB lookup (refreshed at least every
/// quarter second while the flow is active).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum CachedRoute {
    /// Redirected out of an interface with these Ethernet addresses.
    Redirect {
        ifindex: u32,
        dst_mac: String,
        src_mac: String,
        /// The longest packet (IP total length) the route was checked to carry.
        max_len: u16,
        /// Into the pod behind that host veth (`bpf_redirect_peer`), not out of the veth.
        into_pod: bool,
        /// Wrapped in IP-in-IP by the uplink on the way out (so XDP leaves it to TC).
        encap: bool,
    },
    /// Handed to this node's stack.
    Local,
}

fn mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn cached_route(e: &CtEntry) -> Option<CachedRoute> {
    if e.fwd_flags & fwd_flags::DIRECT != 0 {
        Some(CachedRoute::Redirect {
            ifindex: e.fwd_ifindex,
            dst_mac: mac(&e.fwd_macs[..6]),
            src_mac: mac(&e.fwd_macs[6..]),
            max_len: e.fwd_max_len,
            into_pod: e.fwd_flags & fwd_flags::PEER != 0,
            encap: e.fwd_flags & fwd_flags::ENCAP != 0,
        })
    } else if e.fwd_flags & fwd_flags::LOCAL != 0 {
        Some(CachedRoute::Local)
    } else {
        None
    }
}

/// An address and port in network byte order, as the maps hold them.
pub(crate) fn sock(a: u32, p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p))
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "other",
    }
}

impl Filter {
    fn matches(&self, k: &CtKey, e: &CtEntry) -> bool {
        let addrs = [k.saddr, k.daddr, e.nat_saddr, e.nat_daddr];
        let ports = [k.sport, k.dport, e.nat_sport, e.nat_dport];
        self.addr
            .is_none_or(|a| addrs.contains(&u32::from_ne_bytes(a.octets())))
            && self.port.is_none_or(|p| ports.contains(&p.to_be()))
            && self
                .proto
                .as_deref()
                .is_none_or(|p| p.eq_ignore_ascii_case(proto_name(k.proto)))
    }
}

/// The flows of `entries` (original-direction entries with their reply entry), filtered.
pub fn flows(
    entries: &[(CtKey, CtEntry)],
    filter: &Filter,
    now_ns: u64,
) -> Vec<(Flow, Vec<CtKey>)> {
    let by_key: std::collections::HashMap<&CtKey, &CtEntry> =
        entries.iter().map(|(k, e)| (k, e)).collect();
    let mut out = Vec::new();
    for (k, e) in entries
        .iter()
        .filter(|(_, e)| e.flags & ct_flags::REPLY == 0)
    {
        if !filter.matches(k, e) {
            continue;
        }
        let rk = reply_key(k, e);
        let reply = by_key.get(&rk).filter(|r| r.flags & ct_flags::REPLY != 0);
        let last = reply.map_or(e.last_seen_ns, |r| r.last_seen_ns.max(e.last_seen_ns));
        let all_flags = e.flags | reply.map_or(0, |r| r.flags);
        let flags = [
            (ct_flags::SNAT, "snat"),
            (ct_flags::LOCAL_BACKEND, "local-backend"),
            (ct_flags::CLOSING, "closing"),
        ]
        .into_iter()
        .filter(|(b, _)| all_flags & b != 0)
        .map(|(_, n)| n)
        .collect();
        let mut keys = vec![*k];
        if reply.is_some() {
            keys.push(rk);
        }
        out.push((
            Flow {
                proto: proto_name(k.proto),
                client: sock(k.saddr, k.sport).to_string(),
                frontend: sock(k.daddr, k.dport).to_string(),
                nat_source: sock(e.nat_saddr, e.nat_sport).to_string(),
                backend: sock(e.nat_daddr, e.nat_dport).to_string(),
                backend_id: e.backend_id,
                rev_nat_id: e.rev_nat_id,
                flags,
                idle_s: now_ns.saturating_sub(last) / 1_000_000_000,
                reply: reply.is_some(),
                route: cached_route(e),
                reply_route: reply.and_then(|r| cached_route(r)),
            },
            keys,
        ));
    }
    out.sort_by(|a, b| {
        (a.0.frontend.as_str(), a.0.client.as_str())
            .cmp(&(b.0.frontend.as_str(), b.0.client.as_str()))
    });
    out
}

pub fn list(layout: &PinLayout, filter: &Filter, output: Output) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let entries = maps.conntrack.entries()?;
    let flows: Vec<Flow> = flows(&entries, filter, crate::conntrack::monotonic_ns())
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    match output {
        Output::Json | Output::Yaml => print_data(output, &flows)?,
        Output::Table => {
            let rows: Vec<[String; 7]> = flows
                .iter()
                .map(|f| {
                    [
                        f.proto.into(),
                        f.client.clone(),
                        f.frontend.clone(),
                        f.nat_source.clone(),
                        f.backend.clone(),
                        f.flags.join(","),
                        format!("{}s", f.idle_s),
                    ]
                })
                .collect();
            print_table(
                [
                    "PROTO",
                    "CLIENT",
                    "FRONTEND",
                    "SOURCE AFTER NAT",
                    "BACKEND",
                    "FLAGS",
                    "IDLE",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// Removes the matching flows (both directions); a flow's next packet is a new flow.
pub fn flush(layout: &PinLayout, filter: &Filter) -> anyhow::Result<()> {
    let mut maps = Maps::open(layout)?;
    let entries = maps.conntrack.entries()?;
    let mut removed = 0;
    for (_, keys) in flows(&entries, filter, 0) {
        for k in keys {
            if maps.conntrack.remove(&k)? {
                removed += 1;
            }
        }
    }
    println!("removed {removed} conntrack entries");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;

    fn be(s: &str) -> u32 {
        u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets())
    }

    fn pair(client: &str, sport: u16, backend: &str, snat: bool) -> [(CtKey, CtEntry); 2] {
        let k = CtKey {
            saddr: be(client),
            daddr: be("198.18.0.11"),
            sport: sport.to_be(),
            dport: 30080u16.to_be(),
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let e = CtEntry {
            nat_saddr: if snat { be("198.18.0.11") } else { k.saddr },
            nat_daddr: be(backend),
            nat_sport: if snat { 61000u16.to_be() } else { k.sport },
            nat_dport: 8080u16.to_be(),
            backend_id: 3,
            rev_nat_id: 2,
            flags: if snat { ct_flags::SNAT } else { 0 },
            last_seen_ns: 5_000_000_000,
            ..CtEntry::default()
        };
        let rk = reply_key(&k, &e);
        let r = CtEntry {
            flags: e.flags | ct_flags::REPLY | ct_flags::CLOSING,
            last_seen_ns: 8_000_000_000,
            ..e
        };
        [(k, e), (rk, r)]
    }

    #[test]
    fn flows_pair_both_directions_and_filter() {
        let mut entries = Vec::new();
        entries.extend(pair("198.18.0.200", 40000, "10.244.2.6", true));
        entries.extend(pair("198.18.0.201", 40001, "10.244.1.5", false));
        let all = flows(&entries, &Filter::default(), 10_000_000_000);
        assert_eq!(all.len(), 2);
        let f = &all[0].0;
        assert_eq!(f.client, "198.18.0.200:40000");
        assert_eq!(f.frontend, "198.18.0.11:30080");
        assert_eq!(f.nat_source, "198.18.0.11:61000");
        assert_eq!(f.backend, "10.244.2.6:8080");
        assert_eq!(f.flags, ["snat", "closing"]);
        assert_eq!(f.idle_s, 2, "the newer direction counts");
        assert_eq!(all[0].1.len(), 2, "both keys, for flush");
        let by_addr = Filter {
            addr: Some("10.244.1.5".parse().unwrap()),
            ..Default::default()
        };
        let some = flows(&entries, &by_addr, 0);
        assert_eq!(some.len(), 1);
        assert_eq!(some[0].0.client, "198.18.0.201:40001");
        let udp = Filter {
            proto: Some("udp".into()),
            ..Default::default()
        };
        assert!(flows(&entries, &udp, 0).is_empty());
        let port = Filter {
            port: Some(61000),
            ..Default::default()
        };
        assert_eq!(flows(&entries, &port, 0).len(), 1);
    }
}
