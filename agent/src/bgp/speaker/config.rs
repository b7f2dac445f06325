//! What the speaker is configured with: itself ([`Config`]), its neighbours ([`Peer`]) and
//! which of this node's prefixes each is sent ([`Export`], [`Exports`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use ipnet::Ipv4Net;

/// This speaker.
#[derive(Clone, Debug)]
pub struct Config {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub listen: SocketAddr,
    /// Hold time offered in OPEN to peers without one of their own (seconds; 0 disables
    /// keepalives and the hold timer, else 3 or more).
    pub hold_time: u16,
    /// Graceful restart time announced: how long peers keep this node's routes while it
    /// restarts.
    pub restart_time: u16,
    pub connect_retry: Duration,
    /// How long a session stays down after its peer sent more prefixes than its limit
    /// ([`Peer::max_prefixes`]); it is refused meanwhile.
    pub max_prefixes_restart: Duration,
    /// The next hop of the routes this node announces (its address).
    pub next_hop: Ipv4Addr,
}

/// A configured neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub addr: Ipv4Addr,
    pub asn: u32,
    pub port: u16,
    /// Only accept its connections, never connect.
    pub passive: bool,
    /// TCP MD5 signature key (RFC 2385), on both the listener and outgoing connections.
    pub password: Option<String>,
    /// Hold time offered to this peer, instead of the speaker's. The session's hold time is
    /// the smaller of this (or the speaker's) and the peer's offer (RFC 4271 4.2).
    pub hold_time: Option<u16>,
    /// The most prefixes the peer may announce; one more ends the session with a Cease,
    /// "Maximum Number of Prefixes Reached" (RFC 4486), its routes removed. `None`: no limit.
    pub max_prefixes: Option<u32>,
    /// A route-reflector client of this node (meaningful when the node has a cluster ID).
    pub rr_client: bool,
    /// Which of this node's prefixes the peer is sent.
    pub export: Export,
}

/// Kinds of prefixes a peer can be sent (`BGPPeer` `spec.export`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// The node's pod blocks.
    pub pod_blocks: bool,
    /// The Service ClusterIP range(s) (`--bgp-service-cluster-ip-range`), from every node.
    pub cluster_ips: bool,
    /// Services' externalIPs as /32s.
    pub external_ips: bool,
    /// Services' LoadBalancer ingress IPs as /32s.
    pub load_balancer_ips: bool,
}

impl Default for Export {
    /// The node's pod blocks only.
    fn default() -> Self {
        Self {
            pod_blocks: true,
            cluster_ips: false,
            external_ips: false,
            load_balancer_ips: false,
        }
    }
}

impl Export {
    pub const NAMES: [&str; 4] = [
        "podBlocks",
        "serviceClusterIPs",
        "serviceExternalIPs",
        "serviceLoadBalancerIPs",
    ];

    /// From names as in `spec.export` (an empty list: nothing at all).
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut e = Self {
            pod_blocks: false,
            ..Self::default()
        };
        for n in names {
            match n {
                "podBlocks" => e.pod_blocks = true,
                "serviceClusterIPs" => e.cluster_ips = true,
                "serviceExternalIPs" => e.external_ips = true,
                "serviceLoadBalancerIPs" => e.load_balancer_ips = true,
                other => {
                    return Err(format!(
                        "export {other:?}: one of {}",
                        Self::NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(e)
    }
}

/// This node's prefixes, by kind; each peer is sent the kinds its [`Export`] names.
/// eTP=Local Services' addresses are here only while the node has a local endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exports {
    pub pod_blocks: Vec<Ipv4Net>,
    pub cluster_ips: Vec<Ipv4Net>,
    pub external_ips: Vec<Ipv4Net>,
    pub load_balancer_ips: Vec<Ipv4Net>,
}

impl Exports {
    /// The prefixes `export` selects, sorted, without duplicates.
    pub fn select(&self, export: &Export) -> Vec<Ipv4Net> {
        let mut out: Vec<Ipv4Net> = [
            (export.pod_blocks, &self.pod_blocks),
            (export.cluster_ips, &self.cluster_ips),
            (export.external_ips, &self.external_ips),
            (export.load_balancer_ips, &self.load_balancer_ips),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
        out.sort();
        out.dedup();
        out
    }
}
