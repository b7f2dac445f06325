//! Every message round-trips; every malformed one gets its NOTIFICATION; no input panics.

use ipnet::Ipv4Net;

use super::{
    encode::{finish, header},
    *,
};

fn open() -> Open {
    Open {
        version: 4,
        asn: 4_200_000_001,
        hold_time: 90,
        router_id: "198.18.0.11".parse().unwrap(),
        caps: Capabilities {
            four_octet_as: Some(4_200_000_001),
            ipv4_unicast: true,
            route_refresh: true,
            graceful_restart: Some(GracefulRestart {
                restarting: true,
                restart_time: 120,
                ipv4_unicast: Some(true),
            }),
            other: vec![],
        },
    }
}

fn update() -> Update {
    Update {
        withdrawn: vec!["10.244.9.0/24".parse().unwrap()],
        attrs: Some(Attributes {
            origin: Origin::Igp,
            as_path: vec![Segment::Sequence(vec![64512, 4_200_000_001])],
            next_hop: Some("198.18.0.11".parse().unwrap()),
            med: Some(5),
            local_pref: Some(100),
            atomic_aggregate: false,
            communities: vec![0xfde8_0001],
            originator_id: Some("198.18.0.12".parse().unwrap()),
            cluster_list: vec!["1.0.0.1".parse().unwrap()],
        }),
        nlri: vec![
            "10.244.1.0/24".parse().unwrap(),
            "10.244.1.64/26".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
            "10.96.0.10/32".parse().unwrap(),
        ],
    }
}

#[test]
fn every_message_round_trips() {
    for msg in [
        Message::Open(open()),
        Message::Update(update()),
        Message::Update(Update::default()),
        Message::Keepalive,
        Message::Notification(Notification::new(6, 2, b"bye".to_vec())),
        Message::RouteRefresh { afi: 1, safi: 1 },
    ] {
        let bytes = encode(&msg, true);
        let (back, used) = decode(&bytes, true).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, msg);
        // Every strict prefix is "incomplete", never an error.
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], true),
                Ok(None),
                "{msg:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn two_octet_sessions_carry_as_trans_and_small_ases() {
    let mut u = update();
    u.attrs.as_mut().unwrap().as_path = vec![Segment::Sequence(vec![64512, 65000])];
    let bytes = encode(&Message::Update(u.clone()), false);
    let (back, _) = decode(&bytes, false).unwrap().unwrap();
    assert_eq!(back, Message::Update(u));
    let o = open();
    let bytes = encode(&Message::Open(o.clone()), false);
    assert_eq!(u16::from_be_bytes([bytes[20], bytes[21]]), AS_TRANS);
    let (Message::Open(back), _) = decode(&bytes, false).unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(
        back.asn, o.asn,
        "the 4-octet capability carries the real AS"
    );
}

/// A message of type `ty` around `body`, with a correct length.
fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    header(&mut out, ty);
    out.extend_from_slice(body);
    finish(out)
}

/// An UPDATE with `attrs` (raw) announcing 10.0.0.0/8.
fn update_with(attrs: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(&[8, 10]);
    msg(kind::UPDATE, &b)
}

const ORIGIN: [u8; 4] = [0x40, 1, 1, 0];
const PATH: [u8; 9] = [0x40, 2, 6, 2, 1, 0, 0, 0xfc, 0];
const NH: [u8; 7] = [0x40, 3, 4, 198, 18, 0, 12];

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn malformed_messages_get_the_notification_rfc_4271_prescribes() {
    let mut bad_marker = encode(&Message::Keepalive, true);
    bad_marker[3] = 0;
    let mut long = encode(&Message::Keepalive, true);
    long[16..18].copy_from_slice(&4097u16.to_be_bytes());
    let mut short_open = msg(kind::OPEN, &[4, 0, 1, 0, 90]);
    short_open.resize(28, 0);
    short_open[16..18].copy_from_slice(&28u16.to_be_bytes());
    let open_bytes = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = encode(&Message::Open(open()), true);
        f(&mut b);
        b
    };
    // (what, bytes, (code, subcode), the data that must come with it)
    type Case = (&'static str, Vec<u8>, (u8, u8), Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        ("marker not all ones", bad_marker, (1, 1), None),
        ("length above 4096", long, (1, 2), Some(vec![0x10, 0x01])),
        (
            "OPEN shorter than 29",
            short_open,
            (1, 2),
            Some(vec![0, 28]),
        ),
        (
            "KEEPALIVE with a body",
            msg(kind::KEEPALIVE, &[0]),
            (1, 2),
            Some(vec![0, 20]),
        ),
        ("type 9", msg(9, &[]), (1, 3), Some(vec![9])),
        (
            "OPEN version 3",
            open_bytes(&|b| b[19] = 3),
            (2, 1),
            Some(vec![0, 4]),
        ),
        (
            "OPEN hold time 2",
            open_bytes(&|b| b[22..24].copy_from_slice(&[0, 2])),
            (2, 6),
            None,
        ),
        (
            "OPEN router id 0.0.0.0",
            open_bytes(&|b| b[24..28].copy_from_slice(&[0; 4])),
            (2, 3),
            None,
        ),
        (
            "OPEN optional parameter type 1",
            open_bytes(&|b| b[29] = 1),
            (2, 4),
            None,
        ),
        (
            "OPEN parameters longer than the message",
            open_bytes(&|b| b[28] = b[28].wrapping_add(1)),
            (2, 0),
            None,
        ),
        (
            "UPDATE withdrawn length beyond the message",
            msg(kind::UPDATE, &[0, 50, 0, 0]),
            (3, 1),
            None,
        ),
        (
            "UPDATE with a /33",
            msg(kind::UPDATE, &[0, 0, 0, 0, 33, 10, 0, 0, 0, 0]),
            (3, 10),
            None,
        ),
        (
            "UPDATE without ORIGIN",
            update_with(&cat(&[&PATH, &NH])),
            (3, 3),
            Some(vec![1]),
        ),
        (
            "UPDATE without NEXT_HOP",
            update_with(&cat(&[&ORIGIN, &PATH])),
            (3, 3),
            Some(vec![3]),
        ),
        (
            "UPDATE with ORIGIN 7",
            update_with(&cat(&[&[0x40, 1, 1, 7], &PATH, &NH])),
            (3, 6),
            Some(vec![0x40, 1, 1, 7]),
        ),
        (
            "UPDATE with ORIGIN marked optional",
            update_with(&cat(&[&[0xc0, 1, 1, 0], &PATH, &NH])),
            (3, 4),
            Some(vec![0xc0, 1, 1, 0]),
        ),
        (
            "UPDATE with a 3-byte NEXT_HOP",
            update_with(&cat(&[&ORIGIN, &PATH, &[0x40, 3, 3, 1, 2, 3]])),
            (3, 5),
            Some(vec![0x40, 3, 3, 1, 2, 3]),
        ),
        (
            "UPDATE with NEXT_HOP 0.0.0.0",
            update_with(&cat(&[&ORIGIN, &PATH, &[0x40, 3, 4, 0, 0, 0, 0]])),
            (3, 8),
            Some(vec![0x40, 3, 4, 0, 0, 0, 0]),
        ),
        (
            "UPDATE with AS_PATH segment type 5",
            update_with(&cat(&[&ORIGIN, &[0x40, 2, 6, 5, 1, 0, 0, 0xfc, 0], &NH])),
            (3, 11),
            Some(vec![0x40, 2, 6, 5, 1, 0, 0, 0xfc, 0]),
        ),
        (
            "UPDATE with ORIGIN twice",
            update_with(&cat(&[&ORIGIN, &ORIGIN, &PATH, &NH])),
            (3, 1),
            None,
        ),
        (
            "UPDATE with an unknown well-known attribute",
            update_with(&cat(&[&ORIGIN, &PATH, &NH, &[0x40, 99, 0]])),
            (3, 2),
            Some(vec![0x40, 99, 0]),
        ),
        (
            "UPDATE attribute longer than the list",
            update_with(&cat(&[&ORIGIN, &PATH, &[0x40, 3, 9, 1, 2, 3, 4]])),
            (3, 5),
            Some(vec![0x40, 3, 9, 1, 2, 3, 4]),
        ),
    ];
    for (what, bytes, (code, sub), data) in cases {
        match decode(&bytes, true) {
            Err(n) => {
                assert_eq!((n.code, n.subcode), (code, sub), "{what}: {n}");
                if let Some(d) = data {
                    assert_eq!(n.data, d, "{what}: data");
                }
            }
            other => panic!("{what}: decoded as {other:?}"),
        }
    }
}

#[test]
fn unknown_optional_attributes_and_capabilities_are_tolerated() {
    let bytes = update_with(&cat(&[&ORIGIN, &PATH, &NH, &[0xc0, 99, 2, 1, 2]]));
    let (Message::Update(u), _) = decode(&bytes, true).unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(u.nlri, vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]);
}

/// Fuzz-style: random and mutated inputs never panic, and each either decodes, asks for
/// more bytes, or yields a NOTIFICATION with a defined error code.
#[test]
fn arbitrary_bytes_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid = [
        encode(&Message::Open(open()), true),
        encode(&Message::Update(update()), true),
        encode(&Message::Keepalive, true),
    ];
    for i in 0..200_000 {
        let mut b = valid[i % valid.len()].clone();
        let flips = 1 + (rand() % 4) as usize;
        for _ in 0..flips {
            let at = (rand() as usize) % b.len();
            // Keep the marker most of the time, so the bodies get exercised.
            if at >= 16 || rand() % 8 == 0 {
                b[at] = rand() as u8;
            }
        }
        if rand() % 4 == 0 {
            let cut = (rand() as usize) % (b.len() + 1);
            b.truncate(cut);
        }
        if let Err(n) = decode(&b, i % 2 == 0) {
            assert!((1..=6).contains(&n.code), "{n:?}");
        }
    }
}

/// A 2-octet AS_PATH of `segments` (type, ASes) as an attribute.
fn as_path2(segments: &[(u8, &[u16])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (ty, asns) in segments {
        v.extend_from_slice(&[*ty, asns.len() as u8]);
        for a in *asns {
            v.extend_from_slice(&a.to_be_bytes());
        }
    }
    cat(&[&[0x40, 2, v.len() as u8], &v])
}

/// AS4_PATH (optional transitive, 4-octet ASes) of `segments`.
fn as4_path(segments: &[(u8, &[u32])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (ty, asns) in segments {
        v.extend_from_slice(&[*ty, asns.len() as u8]);
        for a in *asns {
            v.extend_from_slice(&a.to_be_bytes());
        }
    }
    cat(&[&[0xc0, 17, v.len() as u8], &v])
}

/// RFC 6793 4.2.3: from a 2-octet speaker, AS4_PATH replaces only as many trailing ASes of
/// AS_PATH as it holds; the leading ones (added by 2-octet speakers) stay. A shorter AS_PATH
/// means AS4_PATH is ignored, and a malformed AS4_PATH is discarded, not a session reset.
#[test]
fn as4_path_is_merged_with_the_leading_part_of_as_path() {
    const T: u16 = AS_TRANS;
    let (big1, big2) = (4_200_000_001u32, 4_200_000_002u32);
    // (what, AS_PATH attribute, AS4_PATH attribute, the path decoded)
    type Case = (&'static str, Vec<u8>, Vec<u8>, Vec<Segment>);
    let cases: Vec<Case> = vec![
        (
            "two 2-octet ASes in front of two 4-octet ones",
            as_path2(&[(2, &[65001, 65002, T, T])]),
            as4_path(&[(2, &[big1, big2])]),
            vec![Segment::Sequence(vec![65001, 65002, big1, big2])],
        ),
        (
            "as long as AS_PATH: all of AS4_PATH",
            as_path2(&[(2, &[T, T])]),
            as4_path(&[(2, &[big1, big2])]),
            vec![Segment::Sequence(vec![big1, big2])],
        ),
        (
            "AS4_PATH longer than AS_PATH: ignored",
            as_path2(&[(2, &[65001])]),
            as4_path(&[(2, &[big1, big2])]),
            vec![Segment::Sequence(vec![65001])],
        ),
        (
            "a set counts as one AS",
            as_path2(&[(2, &[65001]), (1, &[T, 65003])]),
            as4_path(&[(1, &[big1, 65003])]),
            vec![
                Segment::Sequence(vec![65001]),
                Segment::Set(vec![big1, 65003]),
            ],
        ),
        (
            "a malformed AS4_PATH is discarded",
            as_path2(&[(2, &[65001, T])]),
            vec![0xc0, 17, 3, 2, 5, 0],
            vec![Segment::Sequence(vec![65001, u32::from(T)])],
        ),
    ];
    for (what, path, as4, want) in cases {
        let bytes = update_with(&cat(&[&ORIGIN, &path, &NH, &as4]));
        let decoded = decode(&bytes, false);
        let Ok(Some((Message::Update(u), _))) = decoded else {
            panic!("{what}: {decoded:?}")
        };
        assert_eq!(u.attrs.unwrap().as_path, want, "{what}");
    }
}
