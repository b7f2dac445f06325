//! The routers the BGP interop tests peer the agents with (BIRD 2, FRR, GoBGP), behind one
//! interface: each runs in its own external client's namespace on the underlay with its own
//! configuration and state directory, is configured from one [`RouterSpec`], and is asked the
//! same questions (its sessions, their negotiated hold time, the routes it received) through its
//! own command-line client. A test case is written once and runs against each of them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::Cluster;

/// A neighbour of the router (an agent, usually).
#[derive(Clone, Debug)]
pub struct Neighbor {
    pub addr: Ipv4Addr,
    pub asn: u32,
    /// Hold time the router offers this neighbour in its OPEN (seconds; 0: no keepalives).
    pub hold_time: u16,
    /// TCP MD5 key of the session.
    pub password: Option<String>,
    /// The neighbour is a route-reflector client of the router.
    pub rr_client: bool,
}

impl Neighbor {
    /// An eBGP or iBGP neighbour offered `hold_time`, without MD5, not a reflector client.
    pub fn new(addr: Ipv4Addr, asn: u32, hold_time: u16) -> Self {
        Self {
            addr,
            asn,
            hold_time,
            password: None,
            rr_client: false,
        }
    }

    pub fn password(mut self, key: &str) -> Self {
        self.password = Some(key.to_owned());
        self
    }

    pub fn rr_client(mut self) -> Self {
        self.rr_client = true;
        self
    }
}

/// What a router under test is configured with, whichever implementation runs it.
#[derive(Clone, Debug)]
pub struct RouterSpec {
    pub asn: u32,
    pub neighbors: Vec<Neighbor>,
    /// Prefixes the router originates (next hop: itself).
    pub prefixes: Vec<String>,
    /// Its route-reflector cluster ID, when it reflects between its clients.
    pub cluster_id: Option<Ipv4Addr>,
    /// The graceful restart time it announces (seconds): how long its neighbours keep its
    /// routes while it restarts. It also keeps theirs (as a helper) while they restart.
    pub restart_time: u16,
}

impl RouterSpec {
    pub fn new(asn: u32) -> Self {
        Self {
            asn,
            neighbors: Vec::new(),
            prefixes: Vec::new(),
            cluster_id: None,
            restart_time: 120,
        }
    }

    pub fn neighbor(mut self, n: Neighbor) -> Self {
        self.neighbors.push(n);
        self
    }

    pub fn prefixes(mut self, prefixes: &[&str]) -> Self {
        self.prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    pub fn cluster_id(mut self, id: Ipv4Addr) -> Self {
        self.cluster_id = Some(id);
        self
    }

    pub fn restart_time(mut self, seconds: u16) -> Self {
        self.restart_time = seconds;
        self
    }
}

/// One session as the router reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterSession {
    pub established: bool,
    /// The hold time in force (seconds), while established.
    pub hold_time: Option<u16>,
    /// How often the session went down since the router started, when the router counts it.
    pub drops: Option<u64>,
    /// The last NOTIFICATION the router received from the neighbour (code, subcode), when it
    /// reports one.
    pub notification_received: Option<(u8, u8)>,
}

/// A router the tests peer with. Every method panics with the router's own output when its
/// client fails: a test stops where the router stopped making sense.
pub trait Router {
    /// Starts the router in a new external client's namespace of `c`.
    fn start(c: &Cluster, spec: RouterSpec) -> Self
    where
        Self: Sized;
    /// "BIRD", "FRR", "GoBGP".
    fn name(&self) -> &'static str;
    /// Its address on the underlay.
    fn ip(&self) -> Ipv4Addr;
    /// The last `n` lines of its daemon's log (for failure messages).
    fn log_tail(&self, n: usize) -> String;
    /// The session with `neighbor` as the router sees it.
    fn session(&self, neighbor: Ipv4Addr) -> RouterSession;
    /// Every prefix in its RIB learned from a neighbour, with the next hop of its best path.
    fn received(&self) -> BTreeMap<String, String>;
    /// Originates exactly `prefixes` from now on (announcing the new ones, withdrawing the rest);
    /// a later restart keeps them.
    fn announce(&mut self, prefixes: &[&str]);
    /// `kill -9` of its BGP daemon: its sessions drop without a NOTIFICATION, as in a crash.
    fn kill(&mut self);
    /// Starts its BGP daemon again after [`Router::kill`], originating `prefixes`, as a
    /// restarting speaker (graceful restart).
    fn restart(&mut self, prefixes: &[&str]);
}
