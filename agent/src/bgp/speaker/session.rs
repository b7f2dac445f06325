//! One peer's sessions: the task that connects (or takes the connection the listener hands
//! over) and retries after the connect-retry time, and the RFC 4271 state machine of one TCP
//! connection (OpenSent, OpenConfirm, Established) with its hold and keepalive timers, which
//! feeds the RIB and keeps the peer's Adj-RIB-Out sent.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, PoisonError},
    time::Duration,
};

use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, watch},
    time::{Instant, sleep_until},
};
use tracing::{info, warn};

use super::{Config, Exports, Peer, Shared, export::export_updates, set_md5};
use crate::bgp::{
    rib::Path,
    wire::{
        self, AFI_IPV4, Attributes, Capabilities, GracefulRestart, Message, Notification, Open,
        SAFI_UNICAST, Update, err,
    },
};

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

/// What one connection got to before it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reached {
    /// The session was established (the peer's routes may be in the RIB).
    established: bool,
    /// The peer's OPEN announced graceful restart for IPv4 unicast, with this restart time.
    graceful_restart: Option<u16>,
}

/// What the end of a session does to the peer's routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routes {
    /// Nothing changes: the connection never got to Established (nothing was learned on it;
    /// routes kept stale from an earlier session stay, under their timer).
    Unchanged,
    /// Kept, marked stale, for the peer's restart time (RFC 4724): it lost the session without
    /// a NOTIFICATION and restarts gracefully.
    Stale(u16),
    /// Removed: a NOTIFICATION ended the session, or the peer does not restart gracefully.
    Removed,
}

/// RFC 4271 and RFC 4724 (without RFC 8538's N bit): the fate of the peer's routes when a
/// session ends.
fn routes_after(end: &End, reached: Reached) -> Routes {
    if !reached.established {
        return Routes::Unchanged;
    }
    match (end, reached.graceful_restart) {
        (End::Lost(_) | End::Replaced(_), Some(restart)) => Routes::Stale(restart),
        _ => Routes::Removed,
    }
}

/// The peer's stale-route timer (RFC 4724): one per peer, rescheduled when a session is lost,
/// cancelled by the peer's End-of-RIB; when it runs out, the peer's routes still stale go.
pub(super) struct StaleTimer {
    deadline: watch::Sender<Option<Instant>>,
}

impl StaleTimer {
    /// The timer of `peer`, and its task (which ends with the timer).
    fn start(shared: Arc<Shared>, peer: Ipv4Addr) -> Self {
        let (deadline, mut rx) = watch::channel(None::<Instant>);
        tokio::spawn(async move {
            loop {
                let at = *rx.borrow_and_update();
                if let Some(at) = at {
                    tokio::select! {
                        () = sleep_until(at) => {
                            let swept = shared
                                .rib
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .sweep_stale(peer);
                            if swept > 0 {
                                info!(peer = %peer, swept, "BGP: the peer's restart time ran out; its stale routes are gone");
                                shared.publish();
                            }
                        }
                        r = rx.changed() => {
                            if r.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Self { deadline }
    }

    /// Stale routes go in `after` (a new window), or not by this timer (`None`).
    fn set(&self, after: Option<Duration>) {
        self.deadline
            .send_replace(after.map(|d| Instant::now() + d));
    }

    /// The window restarts from now, if one is open.
    fn restart_if_running(&self, after: Duration) {
        self.deadline.send_if_modified(|d| {
            d.is_some()
                .then(|| *d = Some(Instant::now() + after))
                .is_some()
        });
    }
}

pub(super) async fn peer_task(
    shared: Arc<Shared>,
    peer: Peer,
    mut inbox: mpsc::Receiver<TcpStream>,
    exports: watch::Receiver<Exports>,
    mut stop: watch::Receiver<bool>,
) {
    let stale = StaleTimer::start(shared.clone(), peer.addr);
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
        let mut reached = Reached::default();
        let end = session(
            &shared,
            &peer,
            stream,
            Outside {
                inbox: &mut inbox,
                stop: &mut stop,
            },
            exports.clone(),
            &mut reached,
            &stale,
        )
        .await;
        // Removed or replaced meanwhile (its Cease sent): the peer's status entry and routes
        // now belong to its successor, started with the new configuration, or to nobody. This
        // task touches neither (it once overwrote the successor's last error).
        if *stop.borrow() {
            return;
        }
        let routes = routes_after(&end, reached);
        let over_limit = matches!(&end, End::Sent(n) if (n.code, n.subcode) == (err::CEASE, err::CEASE_MAX_PREFIXES));
        let error = match end {
            End::Replaced(s) => {
                next = Some(s);
                Some("connection collision: the peer's connection kept".to_owned())
            }
            End::Sent(n) if over_limit => Some(format!(
                "sent {n}: more than {} prefixes; refused for {} s",
                peer.max_prefixes.unwrap_or(0),
                shared.cfg.max_prefixes_restart.as_secs()
            )),
            End::Sent(n) => Some(format!("sent {n}")),
            End::Received(n) => Some(format!("received {n}")),
            End::Lost(e) => Some(e),
        };
        info!(peer = %peer.addr, error = ?error, "BGP session down");
        shared.set_state(&peer, "idle", error);
        match routes {
            Routes::Unchanged => {}
            Routes::Stale(restart) => {
                shared
                    .rib
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .mark_stale(peer.addr);
                stale.set(Some(Duration::from_secs(u64::from(restart.max(1)))));
            }
            Routes::Removed => {
                shared
                    .rib
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drop_peer(peer.addr);
                stale.set(None);
            }
        }
        shared.publish();
        if over_limit {
            let until = Instant::now() + shared.cfg.max_prefixes_restart;
            if !refuse_until(&peer, until, &mut inbox, &mut stop).await {
                return;
            }
            continue;
        }
        if next.is_none() {
            next = wait_or_accept(&shared, &mut inbox, &mut stop).await;
        }
    }
}

/// Refuses the peer's connections (Cease, connection rejected) until `until`; false when the
/// peer is removed meanwhile.
async fn refuse_until(
    peer: &Peer,
    until: Instant,
    inbox: &mut mpsc::Receiver<TcpStream>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        tokio::select! {
            () = sleep_until(until) => return true,
            Some(mut s) = inbox.recv() => {
                let n = Notification::new(err::CEASE, err::CEASE_CONNECTION_REJECTED, []);
                let _ = s.write_all(&wire::encode(&Message::Notification(n), true)).await;
                let _ = s.shutdown().await;
                info!(peer = %peer.addr, "BGP: connection refused (the peer exceeded its maximum number of prefixes)");
            }
            _ = stop.changed() => return false,
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
    // RFC 4271 4.2: the smaller of the hold time configured for this peer and its offer; 0
    // means no keepalives and no hold timer at all.
    Ok(configured_hold_time(cfg, peer).min(open.hold_time))
}

/// The hold time configured for `peer`: its own, else the speaker's.
pub(super) fn configured_hold_time(cfg: &Config, peer: &Peer) -> u16 {
    peer.hold_time.unwrap_or(cfg.hold_time)
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

/// What reaches a session from outside: the peer's other connections (collisions), and the
/// order to stop (the peer was removed).
struct Outside<'a> {
    inbox: &'a mut mpsc::Receiver<TcpStream>,
    stop: &'a mut watch::Receiver<bool>,
}

/// One TCP connection's session, until it ends.
async fn session(
    shared: &Shared,
    peer: &Peer,
    stream: TcpStream,
    outside: Outside<'_>,
    mut exports: watch::Receiver<Exports>,
    reached: &mut Reached,
    stale: &StaleTimer,
) -> End {
    let Outside { inbox, stop } = outside;
    let cfg = &shared.cfg;
    let (mut rd, mut wr) = stream.into_split();
    let offered = configured_hold_time(cfg, peer);
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
    // Until the OPENs are exchanged: a large hold time (RFC 4271 8.2.2 suggests 4 minutes).
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
                        Ok(h) => h,
                        Err(n) => return fail(&mut wr, n).await,
                    };
                    four = o.caps.four_octet_as.is_some();
                    hold = Duration::from_secs(u64::from(negotiated));
                    hold_deadline = Instant::now() + hold;
                    keepalive_at = (negotiated > 0)
                        .then(|| Instant::now() + Duration::from_secs(u64::from(negotiated / 3)));
                    let gr = o.caps.graceful_restart.clone();
                    // Graceful restart for what this speaker exchanges: IPv4 unicast listed.
                    reached.graceful_restart = gr
                        .as_ref()
                        .filter(|g| g.ipv4_unicast.is_some())
                        .map(|g| g.restart_time);
                    match reached.graceful_restart {
                        // Back within its restart time: what it had stays stale until its
                        // End-of-RIB, or until its restart time runs out again.
                        Some(restart) => {
                            stale.restart_if_running(Duration::from_secs(u64::from(restart.max(1))))
                        }
                        // Back without graceful restart: its stale routes go now (RFC 4724 4.2).
                        None => {
                            stale.set(None);
                            let swept = shared
                                .rib
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .sweep_stale(peer.addr);
                            if swept > 0 {
                                info!(peer = %peer.addr, swept, "BGP: the peer came back without graceful restart; its stale routes are gone");
                                shared.publish();
                            }
                        }
                    }
                    shared.update_status(peer.addr, |s| {
                        s.router_id = Some(o.router_id);
                        s.hold_time = negotiated;
                        s.keepalive_time = negotiated / 3;
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
                    reached.established = true;
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
                    if let Err(n) = apply_update(shared, peer, &u, stale) {
                        return fail(&mut wr, n).await;
                    }
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
        // A negotiated hold time of 0: no hold timer at all, from OpenConfirm on.
        let hold_timer = async {
            if hold.is_zero() && state != "open-sent" {
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

/// Applies an UPDATE from `peer` to the RIB and publishes the result. An error: the
/// NOTIFICATION that ends the session (the peer went over its maximum number of prefixes; its
/// routes are gone, none of them published).
fn apply_update(
    shared: &Shared,
    peer: &Peer,
    u: &Update,
    stale: &StaleTimer,
) -> Result<(), Notification> {
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
        stale.set(None);
        let swept = rib.sweep_stale(peer.addr);
        if swept > 0 {
            info!(peer = %peer.addr, swept, "BGP: End-of-RIB; stale routes removed");
        }
        shared.synced.send_if_modified(|s| s.insert(peer.addr));
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
    let over = peer
        .max_prefixes
        .filter(|max| rib.count_from(peer.addr) > *max as usize);
    if let Some(max) = over {
        let received = rib.count_from(peer.addr);
        // Nothing of it reaches routing: removed before the next publication.
        rib.drop_peer(peer.addr);
        drop(rib);
        shared.publish();
        shared.update_status(peer.addr, |s| s.max_prefixes_exceeded += 1);
        warn!(
            peer = %peer.addr,
            received,
            limit = max,
            down_for_s = shared.cfg.max_prefixes_restart.as_secs(),
            "BGP: the peer announced more prefixes than its limit; session closed (Cease, maximum number of prefixes reached), its routes removed"
        );
        // RFC 4486: AFI, SAFI and the limit.
        let mut data = AFI_IPV4.to_be_bytes().to_vec();
        data.push(SAFI_UNICAST);
        data.extend_from_slice(&max.to_be_bytes());
        return Err(Notification::new(err::CEASE, err::CEASE_MAX_PREFIXES, data));
    }
    drop(rib);
    shared.publish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4271 with RFC 4724: what happens to a peer's routes when a session ends.
    #[test]
    fn a_session_end_keeps_marks_or_removes_the_peers_routes() {
        let lost = || End::Lost("the peer closed the connection".into());
        let sent = || End::Sent(Notification::new(err::HOLD_TIMER_EXPIRED, 0, []));
        let received = || End::Received(Notification::new(err::CEASE, err::CEASE_ADMIN_RESET, []));
        let up = |gr: Option<u16>| Reached {
            established: true,
            graceful_restart: gr,
        };
        let cases = [
            (
                "lost before Established",
                lost(),
                Reached::default(),
                Routes::Unchanged,
            ),
            (
                "a NOTIFICATION before Established",
                received(),
                Reached {
                    established: false,
                    graceful_restart: Some(120),
                },
                Routes::Unchanged,
            ),
            (
                "lost, graceful restart",
                lost(),
                up(Some(120)),
                Routes::Stale(120),
            ),
            (
                "lost, no graceful restart",
                lost(),
                up(None),
                Routes::Removed,
            ),
            (
                "we sent a NOTIFICATION",
                sent(),
                up(Some(120)),
                Routes::Removed,
            ),
            (
                "the peer sent one",
                received(),
                up(Some(120)),
                Routes::Removed,
            ),
        ];
        for (what, end, reached, want) in cases {
            assert_eq!(routes_after(&end, reached), want, "{what}");
        }
    }
}
