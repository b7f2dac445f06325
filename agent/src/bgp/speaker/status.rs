//! The speaker's state as `ferrox bgp peers|routes`, `ferrox status` and `/metrics` show it
//! (published in the agent's status document).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// One session as `ferrox bgp peers` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    pub addr: Ipv4Addr,
    pub asn: u32,
    /// idle, connect, active, open-sent, open-confirm, established.
    pub state: String,
    /// Unix seconds of the last change of state.
    pub since_unix: u64,
    pub router_id: Option<Ipv4Addr>,
    /// The hold time in force (seconds): the smaller of [`PeerStatus::configured_hold_time`]
    /// and the peer's offer, as of the last OPEN; 0: no keepalives, no hold timer.
    pub hold_time: u16,
    /// The hold time configured for this peer (its own, or the speaker's), offered in OPEN.
    #[serde(default)]
    pub configured_hold_time: u16,
    /// Seconds between the KEEPALIVEs this node sends: a third of the hold time.
    #[serde(default)]
    pub keepalive_time: u16,
    /// Prefixes received from the peer (in the RIB, stale ones included).
    pub received: usize,
    /// The most prefixes the peer may announce, when limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<u32>,
    /// Sessions ended because the peer announced more than [`PeerStatus::max_prefixes`].
    #[serde(default)]
    pub max_prefixes_exceeded: u64,
    /// Prefixes announced to the peer.
    pub advertised: usize,
    /// The peer announced graceful restart (its routes survive its restarts).
    pub graceful_restart: bool,
    /// Seconds its routes are kept while it restarts.
    pub restart_time: u16,
    pub last_error: Option<String>,
    pub established_count: u64,
    /// This node reflects routes to the peer as its route-reflector client.
    #[serde(default)]
    pub rr_client: bool,
}

/// A best route as `ferrox bgp routes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LearnedRoute {
    pub prefix: Ipv4Net,
    pub next_hops: Vec<Ipv4Addr>,
    pub peers: Vec<Ipv4Addr>,
    pub as_path_len: usize,
    /// The router that first announced the route in this AS, when a route reflector passed it
    /// on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originator_id: Option<Ipv4Addr>,
    /// The route reflectors it passed through, the last one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_list: Vec<Ipv4Addr>,
}

impl Default for PeerStatus {
    fn default() -> Self {
        Self {
            name: String::new(),
            addr: Ipv4Addr::UNSPECIFIED,
            asn: 0,
            state: "idle".into(),
            since_unix: 0,
            router_id: None,
            hold_time: 0,
            configured_hold_time: 0,
            keepalive_time: 0,
            received: 0,
            max_prefixes: None,
            max_prefixes_exceeded: 0,
            advertised: 0,
            graceful_restart: false,
            restart_time: 0,
            last_error: None,
            established_count: 0,
            rr_client: false,
        }
    }
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
