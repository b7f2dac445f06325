//! One peer's sessions: the task that connects (or takes the connection the listener hands
//! over) and retries after the connect-retry time, and the RFC 4271 state machine of one TCP
//! connection (OpenSent, OpenConfirm, Established) with its hold and keepalive timers, which
//! feeds the RIB and keeps the peer's Adj-RIB-Out sent.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
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

pub(super) async fn peer_task(
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
