//! The speaker against a peer speaking the wire format by hand.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{export::export_updates, *};
use crate::bgp::wire::{
    self, Attributes, Capabilities, Message, Notification, Open, Origin, Segment, Update,
};

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
