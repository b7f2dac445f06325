//! The speaker against a peer speaking the wire format by hand.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{export::export_updates, *};
use crate::bgp::wire::{
    self, Attributes, Capabilities, GracefulRestart, Message, Notification, Open, Origin, Segment,
    Update,
};

fn cfg(port: u16) -> Config {
    Config {
        asn: 64512,
        router_id: "127.0.0.1".parse().unwrap(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        hold_time: 9,
        restart_time: 120,
        connect_retry: Duration::from_millis(200),
        max_prefixes_restart: Duration::from_secs(2),
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

/// The OPEN of the scripted peer (AS 65001, 4-octet capable) offering `hold_time`.
fn peer_open(hold_time: u16) -> Open {
    Open {
        version: 4,
        asn: 65001,
        hold_time,
        router_id: "127.0.0.2".parse().unwrap(),
        caps: Capabilities {
            four_octet_as: Some(65001),
            ipv4_unicast: true,
            ..Capabilities::default()
        },
    }
}

/// A scripted peer on 127.0.0.2: connects to the speaker and exchanges OPEN and KEEPALIVE;
/// returns the connection and what the speaker sent up to its End-of-RIB.
async fn peer_session(port: u16) -> (TcpStream, Vec<u8>) {
    peer_session_with(port, peer_open(9)).await
}

/// [`peer_session`] with the peer's own OPEN.
async fn peer_session_with(port: u16, open: Open) -> (TcpStream, Vec<u8>) {
    let four = open.caps.four_octet_as.is_some();
    let mut s = connect_as_peer(port).await;
    s.write_all(&wire::encode(&Message::Open(open), four))
        .await
        .unwrap();
    s.write_all(&wire::encode(&Message::Keepalive, four))
        .await
        .unwrap();
    let got = read_until(&mut s, |b| {
        messages_as(b, four)
            .iter()
            .any(|m| matches!(m, Message::Update(u) if u.is_end_of_rib()))
    })
    .await;
    (s, got)
}

/// Reads from the speaker until what it sent satisfies `done`; panics after 5 s or on close.
async fn read_until(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    while !done(&got) {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("the speaker answers")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", messages(&got));
        got.extend_from_slice(&b[..n]);
    }
    got
}

/// Sends `m` to the speaker.
async fn send(s: &mut TcpStream, m: Message) {
    s.write_all(&wire::encode(&m, true)).await.unwrap();
}

/// An UPDATE announcing `prefixes` via 198.18.0.250, AS path 65001.
fn announce(prefixes: &[&str]) -> Message {
    Message::Update(Update {
        withdrawn: vec![],
        attrs: Some(Attributes {
            origin: Origin::Igp,
            as_path: vec![Segment::Sequence(vec![65001])],
            next_hop: Some("198.18.0.250".parse().unwrap()),
            ..Attributes::default()
        }),
        nlri: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
    })
}

fn messages(b: &[u8]) -> Vec<Message> {
    messages_as(b, true)
}

/// The messages in `b`, AS numbers 4-octet or not (as the session negotiated).
fn messages_as(mut b: &[u8], four: bool) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Some((m, used))) = wire::decode(b, four) {
        out.push(m);
        b = &b[used..];
    }
    out
}

async fn speaker(
    port: u16,
) -> (
    Speaker,
    watch::Receiver<BTreeMap<Ipv4Net, Best>>,
    watch::Sender<Exports>,
) {
    speaker_with(port, |_| {}, |_| {}).await
}

/// The test peer (127.0.0.2, AS 65001, passive: it connects to the speaker), as configured.
fn test_peer() -> Peer {
    Peer {
        name: "test".into(),
        addr: "127.0.0.2".parse().unwrap(),
        asn: 65001,
        port: 1,
        passive: true,
        password: None,
        hold_time: None,
        max_prefixes: None,
        rr_client: false,
        export: Export::default(),
    }
}

/// A speaker on `port` with the test peer, both adjusted by the closures.
async fn speaker_with(
    port: u16,
    peer: impl FnOnce(&mut Peer),
    config: impl FnOnce(&mut Config),
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
    let mut p = test_peer();
    peer(&mut p);
    let mut c = cfg(port);
    config(&mut c);
    let (s, learned) = start(c, vec![p], rx).await.unwrap();
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

/// What the speaker sends over `for_`, collected (the connection may close meanwhile).
async fn read_for(s: &mut TcpStream, for_: Duration) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + for_;
    let mut got = Vec::new();
    loop {
        let mut b = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&b[..n]),
            _ => return messages(&got),
        }
    }
}

/// A port for this test process and test (`base` apart per test).
fn port(base: u16) -> u16 {
    base + (std::process::id() % 1000) as u16
}

/// RFC 4271 4.2: a hold time of 0 means no keepalives and no hold timer at all, from the
/// moment it is negotiated: a peer may take its time with the KEEPALIVE that ends OpenConfirm.
#[tokio::test]
async fn a_hold_time_of_zero_means_no_hold_timer_even_before_the_keepalive() {
    let port = port(19_900);
    let (speaker, _learned, _exports) = speaker(port).await;
    let mut s = connect_as_peer(port).await;
    send(&mut s, Message::Open(peer_open(0))).await;
    // The speaker's OPEN and KEEPALIVE: it waits in OpenConfirm now.
    let got = read_until(&mut s, |b| {
        messages(b).iter().any(|m| matches!(m, Message::Keepalive))
    })
    .await;
    assert!(matches!(&messages(&got)[0], Message::Open(o) if o.hold_time == 9));
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut s, Message::Keepalive).await;
    let rest = read_for(&mut s, Duration::from_secs(2)).await;
    assert!(
        rest.iter().all(|m| matches!(m, Message::Update(_))),
        "only its routes and End-of-RIB, no KEEPALIVE, no NOTIFICATION: {rest:?}"
    );
    assert!(
        rest.iter()
            .any(|m| matches!(m, Message::Update(u) if u.is_end_of_rib()))
    );
    let p = &speaker.peers()[0];
    assert_eq!((p.state.as_str(), p.hold_time), ("established", 0), "{p:?}");
}

/// RFC 4271 4.2: the hold time is the smaller of the one configured for this peer (its own, or
/// the speaker's) and the peer's offer; both sides compute the same.
#[test]
fn the_hold_time_is_the_smaller_of_this_peers_own_and_the_offer() {
    // (global, this peer's own, the peer's offer, negotiated)
    let cases: [(u16, Option<u16>, u16, u16); 8] = [
        (9, Some(30), 90, 30),
        (9, Some(30), 30, 30),
        (9, Some(30), 9, 9),
        (9, Some(30), 0, 0),
        (9, None, 90, 9),
        (90, None, 30, 30),
        (90, Some(6), 9, 6),
        (9, Some(0), 90, 0),
    ];
    for (global, own, offer, want) in cases {
        let mut c = cfg(1);
        c.hold_time = global;
        let p = Peer {
            hold_time: own,
            ..test_peer()
        };
        let got = check_open(&c, &p, &peer_open(offer));
        assert_eq!(
            got,
            Ok(want),
            "global {global}, own {own:?}, offered {offer}"
        );
    }
}

/// A peer's own hold time (a BGPPeer's holdTime) larger than the speaker's: offered in OPEN,
/// used for the session (the peer, offering more, uses it too).
#[tokio::test]
async fn a_peers_own_hold_time_is_offered_and_used() {
    let port = port(20_900);
    let (speaker, _learned, _exports) =
        speaker_with(port, |p| p.hold_time = Some(30), |c| c.hold_time = 9).await;
    let (_s, got) = peer_session_with(port, peer_open(90)).await;
    assert!(
        matches!(&messages(&got)[0], Message::Open(o) if o.hold_time == 30),
        "{:?}",
        messages(&got)[0]
    );
    let p = &speaker.peers()[0];
    assert_eq!(p.hold_time, 30, "{p:?}");
}

/// The scripted peer's OPEN with graceful restart (restart time `restart`).
fn gr_open(restart: u16) -> Open {
    let mut o = peer_open(9);
    o.caps.graceful_restart = Some(GracefulRestart {
        restarting: false,
        restart_time: restart,
        ipv4_unicast: Some(true),
    });
    o
}

fn has(learned: &BTreeMap<Ipv4Net, Best>, prefix: &str) -> bool {
    learned.contains_key(&prefix.parse::<Ipv4Net>().unwrap())
}

/// RFC 4724: the peer's routes are kept (stale) for its restart time from the loss of the
/// session. When it comes back, refreshes them, and loses the session again, a new window
/// starts: the first one's timer must not sweep them early.
#[tokio::test]
async fn the_stale_timer_starts_again_at_every_session_loss() {
    let port = port(21_900);
    let (_speaker, mut learned, _exports) = speaker(port).await;
    let (mut s, _) = peer_session_with(port, gr_open(3)).await;
    send(&mut s, announce(&["192.0.2.0/24"])).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        learned.wait_for(|l| has(l, "192.0.2.0/24")),
    )
    .await
    .unwrap()
    .unwrap();
    // Lost without a NOTIFICATION: kept, stale, for 3 s.
    drop(s);
    let lost = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back within the window: refreshed, End-of-RIB.
    let (mut s, _) = peer_session_with(port, gr_open(3)).await;
    send(&mut s, announce(&["192.0.2.0/24"])).await;
    send(&mut s, Message::Update(Update::default())).await;
    // Lost again 1.5 s after the first loss: a new 3 s window, until 4.5 s.
    tokio::time::sleep_until(lost + Duration::from_millis(1500)).await;
    drop(s);
    tokio::time::sleep_until(lost + Duration::from_millis(3500)).await;
    assert!(
        has(&learned.borrow(), "192.0.2.0/24"),
        "swept by the first window's timer, 1 s before the second window ends"
    );
    tokio::time::timeout(
        Duration::from_secs(3),
        learned.wait_for(|l| !has(l, "192.0.2.0/24")),
    )
    .await
    .expect("swept when the second window ends")
    .unwrap();
    assert!(
        lost.elapsed() >= Duration::from_millis(4300),
        "{:?}",
        lost.elapsed()
    );
}

/// One stale timer per peer, whatever the number of flaps (each session loss reschedules it),
/// not one sleeping task per flap.
#[tokio::test]
async fn flapping_sessions_leave_no_timer_task_behind() {
    let port = port(22_900);
    let (speaker, mut learned, _exports) = speaker(port).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let mut base = 0;
    for flap in 0..10 {
        let (mut s, _) = peer_session_with(port, gr_open(120)).await;
        send(&mut s, announce(&["192.0.2.0/24"])).await;
        tokio::time::timeout(
            Duration::from_secs(5),
            learned.wait_for(|l| has(l, "192.0.2.0/24")),
        )
        .await
        .unwrap()
        .unwrap();
        drop(s);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while speaker.peers()[0].state == "established" {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if flap == 0 {
            base = tasks();
        }
    }
    assert!(
        tasks() <= base + 1,
        "{} tasks alive after 10 flaps, {base} after the first",
        tasks()
    );
}

/// A 2-octet peer's AS4_PATH is merged into AS_PATH (RFC 6793 4.2.3), not put in its place: the
/// path keeps its length, and this node's own AS in its leading part is still a loop.
#[tokio::test]
async fn a_two_octet_peers_as4_path_is_merged_into_as_path() {
    let port = port(23_900);
    let (speaker, mut learned, _exports) = speaker(port).await;
    let mut open = peer_open(9);
    open.caps.four_octet_as = None;
    let (mut s, _) = peer_session_with(port, open).await;
    // AS_PATH 65001 64512(this node) AS_TRANS with AS4_PATH 4200000001: a loop through this
    // node; AS_PATH 65001 65002 AS_TRANS with AS4_PATH 4200000001: three ASes long.
    let attrs = |second: u16| -> Vec<u8> {
        let mut a = vec![0x40, 1, 1, 0, 0x40, 2, 8, 2, 3];
        for asn in [65001u16, second, wire::AS_TRANS] {
            a.extend_from_slice(&asn.to_be_bytes());
        }
        a.extend_from_slice(&[0x40, 3, 4, 198, 18, 0, 250]);
        a.extend_from_slice(&[0xc0, 17, 6, 2, 1]);
        a.extend_from_slice(&4_200_000_001u32.to_be_bytes());
        a
    };
    for (second, prefix) in [(64512u16, [24u8, 192, 0, 2]), (65002, [24, 198, 51, 100])] {
        let a = attrs(second);
        let mut body = vec![0, 0];
        body.extend_from_slice(&(a.len() as u16).to_be_bytes());
        body.extend_from_slice(&a);
        body.extend_from_slice(&prefix);
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        s.write_all(&m).await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(5),
        learned.wait_for(|l| has(l, "198.51.100.0/24")),
    )
    .await
    .unwrap()
    .unwrap();
    let routes = speaker.routes();
    assert_eq!(routes.len(), 1, "the looped path is dropped: {routes:?}");
    assert_eq!(routes[0].as_path_len, 3, "{routes:?}");
}

/// The listener backs off when accept() fails (here: the process is out of file descriptors)
/// instead of spinning on the connection it cannot take. Runs in a child process of its own:
/// it lowers the file descriptor limit.
#[test]
fn accept_errors_do_not_spin_the_listener() {
    const CHILD: &str = "FERROX_TEST_ACCEPT_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "bgp::speaker::tests::accept_errors_do_not_spin_the_listener",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let cpu = || {
        // SAFETY: getrusage fills the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
        let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
        t(u.ru_utime) + t(u.ru_stime)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let port = port(24_900);
        let (_speaker, _learned, _exports) = speaker(port).await;
        // Every file descriptor but one in use.
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        let lim = libc::rlimit {
            rlim_cur: highest + 16,
            rlim_max: highest + 16,
        };
        // SAFETY: setrlimit reads the struct it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let mut hold = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hold.push(f);
        }
        drop(hold.pop());
        // A connection the listener cannot accept (no descriptor left for it).
        let _c = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = cpu();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = cpu() - before;
        assert!(
            used < Duration::from_millis(200),
            "the listener spun: {used:?} of CPU in 1 s"
        );
    });
}

/// RFC 4486: a peer announcing more prefixes than its limit is sent a Cease, "Maximum Number of
/// Prefixes Reached", with AFI, SAFI and the limit; its routes go (none of the excess reaches
/// routing) and it is refused (Cease, connection rejected) until the restart time has passed.
#[tokio::test]
async fn a_peer_over_its_maximum_number_of_prefixes_is_sent_a_cease_and_refused() {
    let port = port(25_900);
    let (speaker, mut learned, _exports) =
        speaker_with(port, |p| p.max_prefixes = Some(2), |_| {}).await;
    let (mut s, _) = peer_session(port).await;
    // At the limit: fine.
    send(&mut s, announce(&["192.0.2.0/24", "198.51.100.0/24"])).await;
    tokio::time::timeout(Duration::from_secs(5), learned.wait_for(|l| l.len() == 2))
        .await
        .unwrap()
        .unwrap();
    // One more: over it.
    send(&mut s, announce(&["203.0.113.0/24"])).await;
    let rest = read_for(&mut s, Duration::from_secs(2)).await;
    let cease = rest.iter().find_map(|m| match m {
        Message::Notification(n) => Some(n.clone()),
        _ => None,
    });
    assert_eq!(
        cease,
        Some(Notification::new(6, 1, [0, 1, 1, 0, 0, 0, 2])),
        "{rest:?}"
    );
    let ceased = tokio::time::Instant::now();
    assert!(learned.borrow().is_empty(), "{:?}", learned.borrow());
    let p = &speaker.peers()[0];
    assert_eq!(
        (p.max_prefixes, p.max_prefixes_exceeded, p.received),
        (Some(2), 1, 0),
        "{p:?}"
    );
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("maximum number of prefixes")),
        "{p:?}"
    );
    // Refused for the restart time (2 s here)...
    let mut again = connect_as_peer(port).await;
    send(&mut again, Message::Open(peer_open(9))).await;
    let refused = read_for(&mut again, Duration::from_secs(1)).await;
    assert!(
        refused
            .iter()
            .any(|m| matches!(m, Message::Notification(n) if (n.code, n.subcode) == (6, 5))),
        "{refused:?}"
    );
    assert_ne!(speaker.peers()[0].state, "established");
    // ... then taken back.
    tokio::time::sleep_until(ceased + Duration::from_millis(2200)).await;
    let (_s, _) = peer_session(port).await;
    assert_eq!(speaker.peers()[0].state, "established");
}

/// A peer whose configuration changes is replaced: the old session ends with Cease, peer
/// de-configured, and its task leaves the successor alone (it once wrote that Cease as the new
/// session's last error, and could touch the successor's routes).
#[tokio::test]
async fn a_replaced_peers_old_session_leaves_its_successor_alone() {
    let port = port(26_900);
    let (speaker, _learned, _exports) = speaker(port).await;
    let (mut s, _) = peer_session(port).await;
    assert_eq!(speaker.peers()[0].state, "established");
    let mut changed = test_peer();
    changed.hold_time = Some(30);
    speaker.set_peers(&[changed], None);
    let rest = read_for(&mut s, Duration::from_secs(2)).await;
    assert!(
        rest.iter()
            .any(|m| matches!(m, Message::Notification(n) if (n.code, n.subcode) == (6, 3))),
        "{rest:?}"
    );
    let p = &speaker.peers()[0];
    assert_eq!(p.last_error, None, "{p:?}");
    assert_eq!(p.established_count, 0, "{p:?}");
    assert_ne!(p.state, "established", "{p:?}");
}
