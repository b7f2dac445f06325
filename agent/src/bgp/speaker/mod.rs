//! The BGP speaker: one task per configured peer running the RFC 4271 session (Connect/Active,
//! OpenSent, OpenConfirm, Established, with connect-retry, hold and keepalive timers), a listener
//! that hands incoming connections to their peer's task (unknown sources are refused), and the
//! RIB the sessions feed. The best paths are published on a watch channel for routing; this
//! node's prefixes come in on another and are announced to every peer.
//!
//! Errors never crash the speaker: a malformed message is answered with its NOTIFICATION and the
//! session is reset; the peer's task then reconnects after the connect-retry time. A peer that
//! announced graceful restart keeps its routes (marked stale) for its restart time when its
//! session drops without a NOTIFICATION, until it announces them again and sends End-of-RIB;
//! one timer per peer, rescheduled at each loss and cancelled by End-of-RIB, removes what is
//! still stale when that time runs out. A peer that announces more prefixes than its limit is
//! sent a Cease (RFC 4486), loses its routes and is refused for a while.
//!
//! Hold time (RFC 4271 4.2): each session uses the smaller of the hold time configured for its
//! peer (the peer's own, else the speaker's) and the peer's offer, keepalives a third of it; 0
//! means no keepalives and no hold timer.
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

mod config;
mod export;
mod md5;
mod session;
mod status;
#[cfg(test)]
mod tests;

pub use config::{Config, Export, Exports, Peer};
pub use md5::set_md5;
pub use session::check_open;
use session::peer_task;
use status::now_unix;
pub use status::{LearnedRoute, PeerStatus};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
};

use ipnet::Ipv4Net;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use super::rib::{Best, Rib};

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
    /// The peers that have sent End-of-RIB since the speaker started: what they announce is
    /// complete (routing reconciles the routes it kept over a restart once all have).
    synced: watch::Sender<BTreeSet<Ipv4Addr>>,
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
                        configured_hold_time: session::configured_hold_time(&shared.cfg, w),
                        max_prefixes: w.max_prefixes,
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

    /// True once every configured peer has sent End-of-RIB (since the speaker started): the
    /// routes it holds are all its peers have to say.
    pub fn synced(&self) -> bool {
        let synced = self.shared.synced.borrow();
        self.shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .all(|a| synced.contains(a))
    }

    /// Changes whenever a peer sends its first End-of-RIB.
    pub fn sync_changes(&self) -> watch::Receiver<BTreeSet<Ipv4Addr>> {
        self.shared.synced.subscribe()
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

/// The listener's wait after a failed accept(), doubling up to the maximum.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

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
        synced: watch::channel(BTreeSet::new()).0,
    });
    let speaker = Speaker {
        shared: shared.clone(),
    };
    speaker.set_peers(&peers, None);
    tokio::spawn(async move {
        // accept() fails while the process is out of file descriptors (or memory); the
        // connection stays queued, so retrying at once would spin. Wait, longer each time.
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(c) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    c
                }
                Err(e) => {
                    if backoff == ACCEPT_BACKOFF_MIN {
                        warn!(error = %e, "BGP: accepting a connection failed; retrying with back-off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
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
