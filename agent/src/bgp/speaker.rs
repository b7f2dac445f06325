//! The BGP speaker: one task per configured peer running the RFC 4271 session (Connect/Active,
//! OpenSent, OpenConfirm, Established, with connect-retry, hold and keepalive timers), a listener
//! that hands incoming connections to their peer's task (unknown sources are refused), and the
//! RIB the sessions feed. The best paths are published on a watch channel for routing; this
//! node's prefixes come in on another and are announced to every peer.
//!
//! Errors never crash the speaker: a malformed message is answered with its NOTIFICATION and the
//! session is reset; the peer's task then reconnects after the connect-retry time. A peer that
//! announced graceful restart keeps its routes (marked stale) for its restart time when its
//! session drops without a NOTIFICATION, until it announces them again and sends End-of-RIB.
//!
//! Route reflection (RFC 4456), when the node has a cluster ID: the best path learned from an
//! iBGP peer is passed on to the other iBGP peers, from a client to everyone, from a non-client
//! to clients only, with ORIGINATOR_ID set and the cluster ID put first in CLUSTER_LIST; a path
//! that already carries the cluster ID is a loop and is ignored. Paths from eBGP peers are not
//! passed on (the nodes are not a transit network).
//!
//! Collisions (both sides connecting at once): the connection initiated by the side with the
//! higher BGP identifier survives (RFC 4271 6.8). The peer's identifier is not known before its
//! OPEN, so its address stands in for it, which holds where router IDs are node addresses.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    time::{Instant, sleep_until},
};
use tracing::{info, warn};

use super::{
    rib::{Best, Path, Rib},
    wire::{
        self, AFI_IPV4, Attributes, Capabilities, GracefulRestart, Message, Notification, Open,
        Origin, SAFI_UNICAST, Segment, Update, err,
    },
};

/// This speaker.
#[derive(Clone, Debug)]
pub struct Config {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub listen: SocketAddr,
    /// Hold time offered in OPEN (seconds; 0 disables keepalives, 3 or more).
    pub hold_time: u16,
    /// Graceful restart time announced: how long peers keep this node's routes while it
    /// restarts.
    pub restart_time: u16,
    pub connect_retry: Duration,
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
    /// Hold time offered to this peer, instead of the speaker's.
    pub hold_time: Option<u16>,
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

/// `struct tcp_md5sig` of `linux/tcp.h`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

/// Sets (or, with `None`, removes) the MD5 key for connections with `peer` on socket `fd`.
pub fn set_md5(fd: std::os::fd::RawFd, peer: Ipv4Addr, key: Option<&str>) -> std::io::Result<()> {
    let key = key.unwrap_or("").as_bytes();
    if key.len() > 80 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a TCP MD5 key is at most 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid `tcp_md5sig` (an empty key, no flags).
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(peer.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a `sockaddr_in` fits at the start of a `sockaddr_storage`.
    unsafe {
        std::ptr::write((&raw mut sig.addr).cast::<libc::sockaddr_in>(), sin);
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

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
    pub hold_time: u16,
    /// Prefixes received from the peer (in the RIB, stale ones included).
    pub received: usize,
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
            received: 0,
            advertised: 0,
            graceful_restart: false,
            restart_time: 0,
            last_error: None,
            established_count: 0,
            rr_client: false,
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Shared {
    cfg: Config,
    rib: Mutex<Rib>,
    status: Mutex<BTreeMap<Ipv4Addr, PeerStatus>>,
    learned: watch::Sender<BTreeMap<Ipv4Net, Best>>,
    /// The configured peers: their session task, and where the listener hands their
    /// connections.
    peers: Mutex<HashMap<Ipv4Addr, PeerHandle>>,
    exports: watch::Receiver<Exports>,
    /// The listening socket (MD5 keys are set on it per peer).
    listener_fd: std::os::fd::RawFd,
    /// This node's route-reflector cluster ID, when it reflects.
    cluster_id: Mutex<Option<Ipv4Addr>>,
    /// Bumped when what is reflected may have changed: the sessions recompute what they
    /// announce.
    reflect: watch::Sender<u64>,
}

struct PeerHandle {
    peer: Peer,
    inbox: mpsc::Sender<TcpStream>,
    /// Set when the peer is removed: its task says goodbye (Cease, peer de-configured) and ends.
    stop: watch::Sender<bool>,
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Shared {
    fn set_state(&self, peer: &Peer, state: &str, error: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        // A peer removed meanwhile has no entry, and gets none back.
        let Some(e) = s.get_mut(&peer.addr) else {
            return;
        };
        if e.state != state {
            e.since_unix = now_unix();
        }
        e.state = state.to_owned();
        if state == "established" {
            e.established_count += 1;
        }
        if error.is_some() {
            e.last_error = error;
        }
    }

    fn update_status(&self, peer: Ipv4Addr, f: impl FnOnce(&mut PeerStatus)) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = s.get_mut(&peer) {
            f(e);
        }
    }

    /// Publishes the best paths of the prefixes changed since the last call. The RIB stays
    /// locked meanwhile, so publications never overtake each other.
    fn publish(&self) {
        let mut rib = self.rib.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = rib.take_changes();
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        for (addr, st) in s.iter_mut() {
            st.received = rib.count_from(*addr);
        }
        drop(s);
        if changes.is_empty() {
            return;
        }
        self.learned.send_modify(|best| {
            for (prefix, b) in changes {
                match b {
                    Some(b) => best.insert(prefix, b),
                    None => best.remove(&prefix),
                };
            }
        });
        drop(rib);
        if self.cluster_id().is_some() {
            self.reflect.send_modify(|n| *n += 1);
        }
    }

    fn cluster_id(&self) -> Option<Ipv4Addr> {
        *self
            .cluster_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What this node announces to `peer` now: the kinds of its own prefixes the peer takes
    /// and, as a route reflector, the best paths it reflects to that peer. The peer's export
    /// kinds and client flag are read as configured now (they change without a new session).
    fn adj_rib_out(&self, peer: &Peer, exports: &Exports) -> BTreeMap<Ipv4Net, Attributes> {
        let cfg = &self.cfg;
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (export, rr_client) = peers
            .get(&peer.addr)
            .map_or((peer.export, peer.rr_client), |h| {
                (h.peer.export, h.peer.rr_client)
            });
        let clients: HashMap<Ipv4Addr, bool> = peers
            .iter()
            .map(|(a, h)| (*a, h.peer.asn == cfg.asn && h.peer.rr_client))
            .collect();
        drop(peers);
        let mut out: BTreeMap<Ipv4Net, Attributes> = exports
            .select(&export)
            .into_iter()
            .map(|p| (p, export_attrs(cfg, peer)))
            .collect();
        let Some(cluster_id) = self.cluster_id() else {
            return out;
        };
        if peer.asn != cfg.asn {
            return out;
        }
        for (prefix, best) in self.learned.borrow().iter() {
            let from = &best.path;
            if from.ebgp || from.peer == peer.addr || out.contains_key(prefix) {
                continue;
            }
            let from_client = clients.get(&from.peer).copied().unwrap_or(false);
            if !from_client && !rr_client {
                continue;
            }
            let mut a = from.attrs.clone();
            a.originator_id.get_or_insert(from.peer_router_id);
            a.cluster_list.insert(0, cluster_id);
            out.insert(*prefix, a);
        }
        out
    }
}

/// The running speaker: its sessions' status and best routes.
#[derive(Clone)]
pub struct Speaker {
    shared: Arc<Shared>,
}

impl Speaker {
    /// Makes the configured peers `wanted`: new ones get a session task, removed ones (or ones
    /// whose AS changed) lose theirs and their routes.
    /// `cluster_id`: this node reflects routes between its iBGP peers (clients are marked in
    /// [`Peer::rr_client`]); `None`: it does not.
    pub fn set_peers(&self, wanted: &[Peer], cluster_id: Option<Ipv4Addr>) {
        let shared = &self.shared;
        let old_cluster = std::mem::replace(
            &mut *shared
                .cluster_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            cluster_id,
        );
        if old_cluster != cluster_id {
            info!(?cluster_id, "BGP: route reflector cluster ID");
            // Paths learned before that went through this cluster are loops now.
            if let Some(c) = cluster_id {
                let looped = shared
                    .rib
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drop_through_cluster(c);
                if looped > 0 {
                    info!(looped, "BGP: paths through this node's cluster dropped");
                    shared.publish();
                }
            }
            shared.reflect.send_modify(|n| *n += 1);
        }
        let mut peers = shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
        // What is announced to a peer (its export kinds, being a reflector client) changes in
        // place: its session re-announces, it does not restart.
        let mut reannounce = false;
        for w in wanted {
            if let Some(h) = peers.get_mut(&w.addr)
                && h.peer != *w
                && (Peer {
                    rr_client: w.rr_client,
                    export: w.export,
                    ..h.peer.clone()
                }) == *w
            {
                h.peer.rr_client = w.rr_client;
                h.peer.export = w.export;
                shared.update_status(w.addr, |s| s.rr_client = w.rr_client);
                reannounce = true;
            }
        }
        if reannounce {
            shared.reflect.send_modify(|n| *n += 1);
        }
        let gone: Vec<Ipv4Addr> = peers
            .iter()
            .filter(|(a, h)| !wanted.iter().any(|w| w.addr == **a && *w == h.peer))
            .map(|(a, _)| *a)
            .collect();
        let mut changed = false;
        for addr in gone {
            if let Some(h) = peers.remove(&addr)
                && h.peer.password.is_some()
            {
                let _ = set_md5(shared.listener_fd, addr, None);
            }
            shared
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&addr);
            shared
                .rib
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drop_peer(addr);
            info!(peer = %addr, "BGP: peer removed");
            changed = true;
        }
        for w in wanted {
            if peers.contains_key(&w.addr) {
                continue;
            }
            let (tx, rx) = mpsc::channel(4);
            let (stop, stop_rx) = watch::channel(false);
            shared
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    w.addr,
                    PeerStatus {
                        name: w.name.clone(),
                        addr: w.addr,
                        asn: w.asn,
                        state: "idle".into(),
                        since_unix: now_unix(),
                        rr_client: w.rr_client,
                        ..PeerStatus::default()
                    },
                );
            if w.password.is_some()
                && let Err(e) = set_md5(shared.listener_fd, w.addr, w.password.as_deref())
            {
                warn!(peer = %w.addr, error = %e, "BGP: cannot set the TCP MD5 key; the session will fail");
                shared.update_status(w.addr, |s| s.last_error = Some(format!("TCP MD5 key: {e}")));
            }
            tokio::spawn(peer_task(
                shared.clone(),
                w.clone(),
                rx,
                shared.exports.clone(),
                stop_rx,
            ));
            peers.insert(
                w.addr,
                PeerHandle {
                    peer: w.clone(),
                    inbox: tx,
                    stop,
                },
            );
        }
        drop(peers);
        if changed {
            shared.publish();
        }
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub fn routes(&self) -> Vec<LearnedRoute> {
        self.shared
            .learned
            .borrow()
            .iter()
            .map(|(p, b)| LearnedRoute {
                prefix: *p,
                next_hops: b.next_hops.clone(),
                peers: b.peers.clone(),
                as_path_len: b.as_path_len,
                originator_id: b.path.attrs.originator_id,
                cluster_list: b.path.attrs.cluster_list.clone(),
            })
            .collect()
    }
}

/// Starts the listener and one session task per peer. `exports`: the prefixes this node
/// announces. Returns the speaker and the best routes as they change.
pub async fn start(
    cfg: Config,
    peers: Vec<Peer>,
    exports: watch::Receiver<Exports>,
) -> anyhow::Result<(Speaker, watch::Receiver<BTreeMap<Ipv4Net, Best>>)> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("BGP: listening on {}: {e}", cfg.listen))?;
    let (learned, learned_rx) = watch::channel(BTreeMap::new());
    let shared = Arc::new(Shared {
        cfg,
        rib: Mutex::new(Rib::default()),
        status: Mutex::new(BTreeMap::new()),
        learned,
        peers: Mutex::new(HashMap::new()),
        exports,
        listener_fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
        cluster_id: Mutex::new(None),
        reflect: watch::channel(0).0,
    });
    let speaker = Speaker {
        shared: shared.clone(),
    };
    speaker.set_peers(&peers, None);
    tokio::spawn(async move {
        loop {
            let Ok((stream, from)) = listener.accept().await else {
                continue;
            };
            let std::net::IpAddr::V4(ip) = from.ip() else {
                continue;
            };
            let inbox = shared
                .peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&ip)
                .map(|h| h.inbox.clone());
            match inbox {
                Some(tx) => {
                    let _ = tx.try_send(stream);
                }
                None => warn!(%from, "BGP: connection from an unconfigured address refused"),
            }
        }
    });
    Ok((speaker, learned_rx))
}

/// How a session ended.
enum End {
    /// We sent this NOTIFICATION.
    Sent(Notification),
    /// The peer sent this one.
    Received(Notification),
    /// The connection broke (or the peer closed it) without a NOTIFICATION.
    Lost(String),
    /// A colliding connection replaces this one.
    Replaced(TcpStream),
}

async fn peer_task(
    shared: Arc<Shared>,
    peer: Peer,
    mut inbox: mpsc::Receiver<TcpStream>,
    exports: watch::Receiver<Exports>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next: Option<TcpStream> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = match next.take() {
            Some(s) => s,
            None => {
                shared.set_state(&peer, if peer.passive { "active" } else { "connect" }, None);
                let target = SocketAddr::from((peer.addr, peer.port));
                let connect = async {
                    if peer.passive {
                        std::future::pending().await
                    } else {
                        tokio::time::timeout(shared.cfg.connect_retry, connect(&peer, target)).await
                    }
                };
                tokio::select! {
                    r = connect => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            shared.set_state(&peer, "active", Some(format!("connect: {e}")));
                            match wait_or_accept(&shared, &mut inbox, &mut stop).await {
                                Some(s) => s,
                                None => continue,
                            }
                        }
                        Err(_) => continue,
                    },
                    Some(s) = inbox.recv() => s,
                    _ = stop.changed() => return,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let had_gr = std::sync::atomic::AtomicBool::new(false);
        let end = session(
            &shared,
            &peer,
            stream,
            &mut inbox,
            exports.clone(),
            &had_gr,
            &mut stop,
        )
        .await;
        let (error, graceful) = match end {
            End::Replaced(s) => {
                next = Some(s);
                (
                    Some("connection collision: the peer's connection kept".to_owned()),
                    true,
                )
            }
            End::Sent(n) => (Some(format!("sent {n}")), false),
            End::Received(n) => (Some(format!("received {n}")), false),
            End::Lost(e) => (Some(e), true),
        };
        info!(peer = %peer.addr, error = ?error, "BGP session down");
        shared.set_state(&peer, "idle", error);
        let keep = graceful && had_gr.load(std::sync::atomic::Ordering::Relaxed);
        {
            let mut rib = shared.rib.lock().unwrap_or_else(PoisonError::into_inner);
            if keep {
                rib.mark_stale(peer.addr);
            } else {
                rib.drop_peer(peer.addr);
            }
        }
        shared.publish();
        if keep {
            let restart = shared
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&peer.addr)
                .map(|s| s.restart_time)
                .unwrap_or(0);
            let shared = shared.clone();
            let addr = peer.addr;
            let wait = Duration::from_secs(u64::from(restart.max(1)));
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let swept = shared
                    .rib
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .sweep_stale(addr);
                if swept > 0 {
                    info!(peer = %addr, swept, "BGP: the peer did not come back in time; its stale routes are gone");
                    shared.publish();
                }
            });
        }
        if next.is_none() {
            next = wait_or_accept(&shared, &mut inbox, &mut stop).await;
        }
    }
}

/// Connects to `peer`, signing with its MD5 key when it has one.
async fn connect(peer: &Peer, target: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd as _;
    let sock = tokio::net::TcpSocket::new_v4()?;
    if peer.password.is_some() {
        set_md5(sock.as_raw_fd(), peer.addr, peer.password.as_deref())?;
    }
    sock.connect(target).await
}

/// Waits the connect-retry time, or less if the peer connects to us meanwhile.
async fn wait_or_accept(
    shared: &Shared,
    inbox: &mut mpsc::Receiver<TcpStream>,
    stop: &mut watch::Receiver<bool>,
) -> Option<TcpStream> {
    tokio::select! {
        _ = tokio::time::sleep(shared.cfg.connect_retry) => None,
        s = inbox.recv() => s,
        _ = stop.changed() => None,
    }
}

fn export_attrs(cfg: &Config, peer: &Peer) -> Attributes {
    let ebgp = peer.asn != cfg.asn;
    Attributes {
        origin: Origin::Igp,
        as_path: if ebgp {
            vec![Segment::Sequence(vec![cfg.asn])]
        } else {
            vec![]
        },
        next_hop: Some(cfg.next_hop),
        local_pref: (!ebgp).then_some(100),
        ..Attributes::default()
    }
}

/// The UPDATEs that take a peer from having `old` to having `new`: withdrawals, then the
/// prefixes new or changed, those with the same attributes together.
fn export_updates(
    old: &BTreeMap<Ipv4Net, Attributes>,
    new: &BTreeMap<Ipv4Net, Attributes>,
) -> Vec<Message> {
    let withdrawn: Vec<Ipv4Net> = old
        .keys()
        .filter(|p| !new.contains_key(p))
        .copied()
        .collect();
    let mut by_attrs: HashMap<&Attributes, Vec<Ipv4Net>> = HashMap::new();
    for (prefix, a) in new {
        if old.get(prefix) != Some(a) {
            by_attrs.entry(a).or_default().push(*prefix);
        }
    }
    let mut groups: Vec<(&Attributes, Vec<Ipv4Net>)> = by_attrs.into_iter().collect();
    groups.sort_by_key(|(_, prefixes)| prefixes[0]);
    let mut out = Vec::new();
    for chunk in withdrawn.chunks(wire::PREFIXES_PER_UPDATE) {
        out.push(Message::Update(Update {
            withdrawn: chunk.to_vec(),
            ..Update::default()
        }));
    }
    for (attrs, prefixes) in groups {
        // As many prefixes as fit in 4096 bytes next to these attributes (a reflected route
        // brings whatever attributes it came with: communities, long AS paths); 5 bytes per
        // prefix at most (a /32).
        let bare = wire::encode(
            &Message::Update(Update {
                withdrawn: vec![],
                attrs: Some(attrs.clone()),
                nlri: vec![],
            }),
            true,
        )
        .len();
        let room = wire::MAX_LEN.saturating_sub(bare) / 5;
        if room == 0 {
            warn!(
                prefixes = prefixes.len(),
                attributes = bare,
                "BGP: attributes too large for an UPDATE; prefixes not announced"
            );
            continue;
        }
        for chunk in prefixes.chunks(room.min(wire::PREFIXES_PER_UPDATE)) {
            out.push(Message::Update(Update {
                withdrawn: vec![],
                attrs: Some(attrs.clone()),
                nlri: chunk.to_vec(),
            }));
        }
    }
    out
}

/// Checks a peer's OPEN; the NOTIFICATION to send when it is not acceptable.
pub fn check_open(cfg: &Config, peer: &Peer, open: &Open) -> Result<u16, Notification> {
    if open.asn != peer.asn {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_BAD_PEER_AS,
            u16::try_from(peer.asn)
                .unwrap_or(wire::AS_TRANS)
                .to_be_bytes()
                .to_vec(),
        ));
    }
    if open.router_id == cfg.router_id && peer.asn == cfg.asn {
        return Err(Notification::new(err::OPEN, err::OPEN_BAD_IDENTIFIER, []));
    }
    // The hold time is the smaller of the two; 0 means no keepalives at all.
    Ok(cfg.hold_time.min(open.hold_time))
}

/// Sends `peer` what changed in what it should have (this node's exports it takes, and what
/// this node reflects to it) since `advertised`, which then holds the new state.
async fn advertise(
    shared: &Shared,
    peer: &Peer,
    exports: &mut watch::Receiver<Exports>,
    advertised: &mut BTreeMap<Ipv4Net, Attributes>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    four: bool,
) -> Result<(), End> {
    let now = shared.adj_rib_out(peer, &exports.borrow_and_update());
    for m in export_updates(advertised, &now) {
        send(wr, &m, four).await?;
    }
    *advertised = now;
    shared.update_status(peer.addr, |s| s.advertised = advertised.len());
    Ok(())
}

async fn send(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    msg: &Message,
    four: bool,
) -> Result<(), End> {
    w.write_all(&wire::encode(msg, four))
        .await
        .map_err(|e| End::Lost(format!("write: {e}")))
}

async fn fail(w: &mut tokio::net::tcp::OwnedWriteHalf, n: Notification) -> End {
    let _ = w
        .write_all(&wire::encode(&Message::Notification(n.clone()), true))
        .await;
    let _ = w.shutdown().await;
    End::Sent(n)
}

/// One TCP connection's session, until it ends.
async fn session(
    shared: &Shared,
    peer: &Peer,
    stream: TcpStream,
    inbox: &mut mpsc::Receiver<TcpStream>,
    mut exports: watch::Receiver<Exports>,
    had_gr: &std::sync::atomic::AtomicBool,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let cfg = &shared.cfg;
    let (mut rd, mut wr) = stream.into_split();
    let offered = peer.hold_time.unwrap_or(cfg.hold_time);
    let open = Open {
        version: 4,
        asn: cfg.asn,
        hold_time: offered,
        router_id: cfg.router_id,
        caps: Capabilities {
            four_octet_as: Some(cfg.asn),
            ipv4_unicast: true,
            route_refresh: true,
            graceful_restart: Some(GracefulRestart {
                restarting: false,
                restart_time: cfg.restart_time,
                ipv4_unicast: Some(true),
            }),
            other: vec![],
        },
    };
    if let Err(e) = send(&mut wr, &Message::Open(open), true).await {
        return e;
    }
    shared.set_state(peer, "open-sent", None);
    let mut state = "open-sent";
    let mut four = true;
    let mut hold = Duration::from_secs(240);
    let mut hold_deadline = Instant::now() + hold;
    let mut keepalive_at: Option<Instant> = None;
    let mut advertised: BTreeMap<Ipv4Net, Attributes> = BTreeMap::new();
    let mut reflect = shared.reflect.subscribe();
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Every complete message in the buffer first.
        loop {
            let decoded = match wire::decode(&buf, four) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(n) => return fail(&mut wr, n).await,
            };
            let (msg, used) = decoded;
            buf.drain(..used);
            if !hold.is_zero() {
                hold_deadline = Instant::now() + hold;
            }
            match (state, msg) {
                (_, Message::Notification(n)) => return End::Received(n),
                ("open-sent", Message::Open(o)) => {
                    let negotiated = match check_open(cfg, peer, &o) {
                        Ok(h) => h.min(offered),
                        Err(n) => return fail(&mut wr, n).await,
                    };
                    four = o.caps.four_octet_as.is_some();
                    hold = Duration::from_secs(u64::from(negotiated));
                    hold_deadline = Instant::now() + hold;
                    keepalive_at = (negotiated > 0)
                        .then(|| Instant::now() + Duration::from_secs(u64::from(negotiated / 3)));
                    let gr = o.caps.graceful_restart.clone();
                    had_gr.store(gr.is_some(), std::sync::atomic::Ordering::Relaxed);
                    shared.update_status(peer.addr, |s| {
                        s.router_id = Some(o.router_id);
                        s.hold_time = negotiated;
                        s.graceful_restart = gr.is_some();
                        s.restart_time = gr.as_ref().map_or(0, |g| g.restart_time);
                    });
                    if let Err(e) = send(&mut wr, &Message::Keepalive, four).await {
                        return e;
                    }
                    state = "open-confirm";
                    shared.set_state(peer, state, None);
                }
                ("open-confirm", Message::Keepalive) => {
                    state = "established";
                    shared.set_state(peer, state, None);
                    info!(peer = %peer.addr, asn = peer.asn, "BGP session established");
                    reflect.mark_unchanged();
                    if let Err(e) =
                        advertise(shared, peer, &mut exports, &mut advertised, &mut wr, four).await
                    {
                        return e;
                    }
                    // End-of-RIB: everything this node has is announced.
                    if let Err(e) = send(&mut wr, &Message::Update(Update::default()), four).await {
                        return e;
                    }
                }
                ("established", Message::Keepalive) => {}
                ("established", Message::Update(u)) => {
                    apply_update(shared, peer, &u);
                }
                ("established", Message::RouteRefresh { afi, safi }) => {
                    if afi == AFI_IPV4 && safi == SAFI_UNICAST {
                        for m in export_updates(&BTreeMap::new(), &advertised) {
                            if let Err(e) = send(&mut wr, &m, four).await {
                                return e;
                            }
                        }
                    }
                }
                (st, other) => {
                    let sub = match st {
                        "open-sent" => 1,
                        "open-confirm" => 2,
                        _ => 3,
                    };
                    warn!(peer = %peer.addr, state = st, message = ?other, "BGP: unexpected message");
                    return fail(&mut wr, Notification::new(err::FSM, sub, [])).await;
                }
            }
        }
        let keepalive = async {
            match keepalive_at {
                Some(t) if state != "open-sent" => sleep_until(t).await,
                _ => std::future::pending().await,
            }
        };
        let hold_timer = async {
            if hold.is_zero() && state == "established" {
                std::future::pending::<()>().await;
            } else {
                sleep_until(hold_deadline).await;
            }
        };
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return End::Lost("the peer closed the connection".into()),
                Ok(_) => {}
                Err(e) => return End::Lost(format!("read: {e}")),
            },
            () = hold_timer => {
                return fail(&mut wr, Notification::new(err::HOLD_TIMER_EXPIRED, 0, [])).await;
            }
            () = keepalive => {
                if let Err(e) = send(&mut wr, &Message::Keepalive, four).await {
                    return e;
                }
                keepalive_at = Some(Instant::now() + hold / 3);
            }
            r = exports.changed(), if state == "established" => {
                if r.is_err() {
                    return fail(&mut wr, Notification::new(err::CEASE, err::CEASE_ADMIN_SHUTDOWN, [])).await;
                }
                if let Err(e) = advertise(shared, peer, &mut exports, &mut advertised, &mut wr, four).await {
                    return e;
                }
            }
            _ = reflect.changed(), if state == "established" => {
                if let Err(e) = advertise(shared, peer, &mut exports, &mut advertised, &mut wr, four).await {
                    return e;
                }
            }
            _ = stop.changed() => {
                return fail(
                    &mut wr,
                    Notification::new(err::CEASE, err::CEASE_PEER_DECONFIGURED, []),
                )
                .await;
            }
            Some(other) = inbox.recv() => {
                // Collision: keep the connection the higher identifier initiated.
                if state != "established" && cfg.router_id < peer.addr {
                    let _ = wr
                        .write_all(&wire::encode(
                            &Message::Notification(Notification::new(err::CEASE, err::CEASE_COLLISION, [])),
                            four,
                        ))
                        .await;
                    return End::Replaced(other);
                }
                let mut other = other;
                let _ = other
                    .write_all(&wire::encode(
                        &Message::Notification(Notification::new(err::CEASE, err::CEASE_COLLISION, [])),
                        true,
                    ))
                    .await;
            }
        }
    }
}

/// Applies an UPDATE from `peer` to the RIB and publishes the result.
fn apply_update(shared: &Shared, peer: &Peer, u: &Update) {
    let cfg = &shared.cfg;
    let ebgp = peer.asn != cfg.asn;
    let router_id = shared
        .status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&peer.addr)
        .and_then(|s| s.router_id)
        .unwrap_or(peer.addr);
    let mut rib = shared.rib.lock().unwrap_or_else(PoisonError::into_inner);
    for p in &u.withdrawn {
        rib.withdraw(*p, peer.addr);
    }
    if u.is_end_of_rib() {
        let swept = rib.sweep_stale(peer.addr);
        if swept > 0 {
            info!(peer = %peer.addr, swept, "BGP: End-of-RIB; stale routes removed");
        }
    }
    if let Some(a) = &u.attrs {
        // Loops: our own AS in an eBGP path, our own routes reflected back, our own next hop.
        let cluster_id = shared.cluster_id();
        let looped = (ebgp && a.contains_as(cfg.asn))
            || a.originator_id == Some(cfg.router_id)
            || a.next_hop == Some(cfg.next_hop)
            || cluster_id.is_some_and(|c| a.cluster_list.contains(&c));
        for p in &u.nlri {
            if looped {
                rib.withdraw(*p, peer.addr);
                continue;
            }
            rib.announce(
                *p,
                Path {
                    peer: peer.addr,
                    peer_router_id: router_id,
                    ebgp,
                    attrs: a.clone(),
                    stale: false,
                },
            );
        }
    }
    drop(rib);
    shared.publish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(port: u16) -> Config {
        Config {
            asn: 64512,
            router_id: "127.0.0.1".parse().unwrap(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            hold_time: 9,
            restart_time: 120,
            connect_retry: Duration::from_millis(200),
            next_hop: "198.18.0.11".parse().unwrap(),
        }
    }

    /// A TCP connection from the test peer's address (127.0.0.2) to the speaker.
    async fn connect_as_peer(port: u16) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
        sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap()
    }

    /// A scripted peer on 127.0.0.2: connects to the speaker and exchanges OPEN and KEEPALIVE;
    /// returns the connection and what the speaker sent up to its End-of-RIB.
    async fn peer_session(port: u16) -> (TcpStream, Vec<u8>) {
        let mut s = connect_as_peer(port).await;
        let open = Open {
            version: 4,
            asn: 65001,
            hold_time: 9,
            router_id: "127.0.0.2".parse().unwrap(),
            caps: Capabilities {
                four_octet_as: Some(65001),
                ipv4_unicast: true,
                ..Capabilities::default()
            },
        };
        s.write_all(&wire::encode(&Message::Open(open), true))
            .await
            .unwrap();
        s.write_all(&wire::encode(&Message::Keepalive, true))
            .await
            .unwrap();
        let mut got = Vec::new();
        // Their OPEN, KEEPALIVE, our route and End-of-RIB.
        while !contains_eor(&got) {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("the speaker answers")
                .unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&b[..n]);
        }
        (s, got)
    }

    fn messages(mut b: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        while let Ok(Some((m, used))) = wire::decode(b, true) {
            out.push(m);
            b = &b[used..];
        }
        out
    }

    fn contains_eor(b: &[u8]) -> bool {
        messages(b)
            .iter()
            .any(|m| matches!(m, Message::Update(u) if u.is_end_of_rib()))
    }

    async fn speaker(
        port: u16,
    ) -> (
        Speaker,
        watch::Receiver<BTreeMap<Ipv4Net, Best>>,
        watch::Sender<Exports>,
    ) {
        // Service addresses too: the peer (default export) is sent the pod block alone.
        let (tx, rx) = watch::channel(Exports {
            pod_blocks: vec!["10.244.1.0/24".parse().unwrap()],
            cluster_ips: vec!["10.96.0.0/12".parse().unwrap()],
            external_ips: vec!["203.0.113.7/32".parse().unwrap()],
            load_balancer_ips: vec![],
        });
        let peer = Peer {
            name: "test".into(),
            addr: "127.0.0.2".parse().unwrap(),
            asn: 65001,
            port: 1,
            passive: true,
            password: None,
            hold_time: None,
            rr_client: false,
            export: Export::default(),
        };
        let (s, learned) = start(cfg(port), vec![peer], rx).await.unwrap();
        (s, learned, tx)
    }

    #[tokio::test]
    async fn a_session_exchanges_routes_and_a_malformed_update_resets_it() {
        let port = 17_900 + (std::process::id() % 1000) as u16;
        let (speaker, mut learned, _exports) = speaker(port).await;
        let (mut s, got) = peer_session(port).await;
        let msgs = messages(&got);
        assert!(
            matches!(&msgs[0], Message::Open(o) if o.asn == 64512 && o.caps.graceful_restart.is_some())
        );
        let announced: Vec<Ipv4Net> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::Update(u) => Some(u.nlri.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(announced, vec!["10.244.1.0/24".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(speaker.peers()[0].state, "established");

        // The peer announces a route: it becomes the best path.
        let u = Update {
            withdrawn: vec![],
            attrs: Some(Attributes {
                origin: Origin::Igp,
                as_path: vec![Segment::Sequence(vec![65001])],
                next_hop: Some("198.18.0.250".parse().unwrap()),
                ..Attributes::default()
            }),
            nlri: vec!["192.0.2.0/24".parse().unwrap()],
        };
        s.write_all(&wire::encode(&Message::Update(u), true))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), learned.wait_for(|b| !b.is_empty()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            speaker.routes()[0].next_hops,
            vec!["198.18.0.250".parse::<Ipv4Addr>().unwrap()]
        );

        // A malformed UPDATE (ORIGIN 9): NOTIFICATION 3/6, connection closed, routes gone.
        let mut bad = wire::encode(
            &Message::Update(Update {
                withdrawn: vec![],
                attrs: Some(Attributes {
                    origin: Origin::Igp,
                    next_hop: Some("198.18.0.250".parse().unwrap()),
                    ..Attributes::default()
                }),
                nlri: vec!["192.0.3.0/24".parse().unwrap()],
            }),
            true,
        );
        // The ORIGIN value is the first attribute's last byte: header, 2+2 lengths, 3 bytes in.
        bad[19 + 4 + 3] = 9;
        s.write_all(&bad).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let notes: Vec<Notification> = messages(&rest)
            .into_iter()
            .filter_map(|m| match m {
                Message::Notification(n) => Some(n),
                _ => None,
            })
            .collect();
        assert_eq!(notes.len(), 1, "{rest:?}");
        assert_eq!((notes[0].code, notes[0].subcode), (3, 6));
        tokio::time::timeout(Duration::from_secs(5), learned.wait_for(|b| b.is_empty()))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(speaker.peers()[0].state, "established");
        assert!(
            speaker.peers()[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("ORIGIN")
        );

        // The speaker takes the peer back afterwards.
        let (_s2, _) = peer_session(port).await;
        assert_eq!(speaker.peers()[0].state, "established");
        assert_eq!(speaker.peers()[0].established_count, 2);
    }

    #[tokio::test]
    async fn a_wrong_peer_as_is_refused_with_bad_peer_as() {
        let port = 18_900 + (std::process::id() % 1000) as u16;
        let (speaker, _learned, _exports) = speaker(port).await;
        let mut s = connect_as_peer(port).await;
        let open = Open {
            version: 4,
            asn: 65099,
            hold_time: 9,
            router_id: "127.0.0.2".parse().unwrap(),
            caps: Capabilities::default(),
        };
        s.write_all(&wire::encode(&Message::Open(open), true))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let last = messages(&rest).pop();
        assert!(
            matches!(&last, Some(Message::Notification(n)) if (n.code, n.subcode) == (2, 2)),
            "{last:?}"
        );
        assert!(
            speaker.peers()[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("bad peer AS")
        );
    }

    /// Reflected routes keep the attributes they came with: however large, every UPDATE stays
    /// within the 4096-byte limit and every prefix is sent once.
    #[test]
    fn updates_are_sized_from_their_attributes() {
        let big = Attributes {
            origin: Origin::Igp,
            as_path: vec![Segment::Sequence(vec![65001; 40])],
            next_hop: Some("198.18.0.12".parse().unwrap()),
            communities: (0..300).collect(),
            ..Attributes::default()
        };
        let small = Attributes {
            origin: Origin::Igp,
            next_hop: Some("198.18.0.13".parse().unwrap()),
            ..Attributes::default()
        };
        let mut new = BTreeMap::new();
        for i in 0..1500u32 {
            let p = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap();
            new.insert(
                p,
                if i % 2 == 0 {
                    big.clone()
                } else {
                    small.clone()
                },
            );
        }
        let mut sent = Vec::new();
        for m in export_updates(&BTreeMap::new(), &new) {
            let bytes = wire::encode(&m, true);
            assert!(bytes.len() <= wire::MAX_LEN, "{} bytes", bytes.len());
            let Message::Update(u) = m else {
                panic!("not an UPDATE")
            };
            sent.extend(u.nlri);
        }
        sent.sort();
        let want: Vec<Ipv4Net> = new.keys().copied().collect();
        assert_eq!(sent, want);
    }
}
