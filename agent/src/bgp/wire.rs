//! The BGP-4 wire format (RFC 4271) for what a Kubernetes node speaks: OPEN with capabilities
//! (RFC 5492: multiprotocol IPv4 unicast RFC 4760, route refresh RFC 2918, graceful restart
//! RFC 4724, 4-octet AS numbers RFC 6793), UPDATE for IPv4 unicast (classic NLRI and
//! MP_REACH/MP_UNREACH), KEEPALIVE, NOTIFICATION and ROUTE-REFRESH.
//!
//! Decoding never panics, whatever the bytes: every malformed message is reported as the
//! NOTIFICATION RFC 4271 section 6 prescribes for it (code, subcode and data), which the session
//! sends before closing. Pure functions over byte slices.
//!
//! Why not a crate: the candidates (netgauze-bgp-pkt among them) decode into their own error
//! types, which would need a mapping as long as this module to produce the exact NOTIFICATION of
//! each error, and bring a dependency tree many times the size of the IPv4-unicast subset used
//! here. This subset is small enough to own and test exhaustively.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub const HEADER_LEN: usize = 19;
pub const MAX_LEN: usize = 4096;
/// The 2-octet AS a 4-octet speaker puts in OPEN when its AS does not fit (RFC 6793).
pub const AS_TRANS: u16 = 23456;
pub const AFI_IPV4: u16 = 1;
pub const SAFI_UNICAST: u8 = 1;

/// Message types.
pub mod kind {
    pub const OPEN: u8 = 1;
    pub const UPDATE: u8 = 2;
    pub const NOTIFICATION: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const ROUTE_REFRESH: u8 = 5;
}

/// NOTIFICATION error codes and subcodes (RFC 4271 section 4.5, RFC 4486).
pub mod err {
    pub const HEADER: u8 = 1;
    pub const HEADER_NOT_SYNCHRONIZED: u8 = 1;
    pub const HEADER_BAD_LENGTH: u8 = 2;
    pub const HEADER_BAD_TYPE: u8 = 3;
    pub const OPEN: u8 = 2;
    pub const OPEN_UNSPECIFIC: u8 = 0;
    pub const OPEN_BAD_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_IDENTIFIER: u8 = 3;
    pub const OPEN_UNSUPPORTED_PARAMETER: u8 = 4;
    pub const OPEN_BAD_HOLD_TIME: u8 = 6;
    pub const UPDATE: u8 = 3;
    pub const UPDATE_MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UPDATE_UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const UPDATE_MISSING_WELL_KNOWN: u8 = 3;
    pub const UPDATE_ATTRIBUTE_FLAGS: u8 = 4;
    pub const UPDATE_ATTRIBUTE_LENGTH: u8 = 5;
    pub const UPDATE_INVALID_ORIGIN: u8 = 6;
    pub const UPDATE_INVALID_NEXT_HOP: u8 = 8;
    pub const UPDATE_OPTIONAL_ATTRIBUTE: u8 = 9;
    pub const UPDATE_INVALID_NETWORK: u8 = 10;
    pub const UPDATE_MALFORMED_AS_PATH: u8 = 11;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    pub const CEASE_PEER_DECONFIGURED: u8 = 3;
    pub const CEASE_ADMIN_RESET: u8 = 4;
    pub const CEASE_COLLISION: u8 = 7;
}

/// Path attribute type codes.
mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH: u8 = 14;
    pub const MP_UNREACH: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const EXTENDED_LENGTH: u8 = 0x10;
}

/// Capability codes.
mod cap {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
}

/// A NOTIFICATION: what was wrong, as the peer is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Self {
        Self {
            code,
            subcode,
            data: data.into(),
        }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.code, self.subcode) {
            (1, 1) => "message header: connection not synchronized",
            (1, 2) => "message header: bad message length",
            (1, 3) => "message header: bad message type",
            (2, 1) => "OPEN: unsupported version",
            (2, 2) => "OPEN: bad peer AS",
            (2, 3) => "OPEN: bad BGP identifier",
            (2, 4) => "OPEN: unsupported optional parameter",
            (2, 6) => "OPEN: unacceptable hold time",
            (2, _) => "OPEN message error",
            (3, 1) => "UPDATE: malformed attribute list",
            (3, 2) => "UPDATE: unrecognized well-known attribute",
            (3, 3) => "UPDATE: missing well-known attribute",
            (3, 4) => "UPDATE: attribute flags error",
            (3, 5) => "UPDATE: attribute length error",
            (3, 6) => "UPDATE: invalid ORIGIN",
            (3, 8) => "UPDATE: invalid NEXT_HOP",
            (3, 9) => "UPDATE: optional attribute error",
            (3, 10) => "UPDATE: invalid network field",
            (3, 11) => "UPDATE: malformed AS_PATH",
            (3, _) => "UPDATE message error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 7) => "cease: connection collision resolution",
            (6, _) => "cease",
            _ => "unknown error",
        };
        write!(f, "{what} ({}/{})", self.code, self.subcode)
    }
}

/// Graceful restart as a speaker announces it (RFC 4724).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The speaker has restarted (its peer should not wait for stale routes to be refreshed).
    pub restarting: bool,
    /// Seconds the peer should keep this speaker's routes after the session goes down.
    pub restart_time: u16,
    /// IPv4 unicast listed, with its forwarding-state-preserved bit.
    pub ipv4_unicast: Option<bool>,
}

/// What an OPEN announces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub four_octet_as: Option<u32>,
    pub ipv4_unicast: bool,
    pub route_refresh: bool,
    pub graceful_restart: Option<GracefulRestart>,
    /// Codes of capabilities this module does not know (kept, never an error: RFC 5492).
    pub other: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The speaker's AS: the 4-octet capability's when present, else the 2-octet field.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub caps: Capabilities,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    #[default]
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    Set(Vec<u32>),
    Sequence(Vec<u32>),
}

/// The path attributes of an UPDATE that announces routes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub origin: Origin,
    pub as_path: Vec<Segment>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
}

impl Attributes {
    /// AS_PATH length for best-path selection: a set counts as one (RFC 4271 9.1.2.2).
    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| match s {
                Segment::Set(_) => 1,
                Segment::Sequence(a) => a.len(),
            })
            .sum()
    }

    /// The neighbouring AS (first of the path), if any.
    pub fn first_as(&self) -> Option<u32> {
        match self.as_path.first()? {
            Segment::Sequence(a) | Segment::Set(a) => a.first().copied(),
        }
    }

    pub fn contains_as(&self, asn: u32) -> bool {
        self.as_path.iter().any(|s| match s {
            Segment::Sequence(a) | Segment::Set(a) => a.contains(&asn),
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Net>,
    /// Present when `nlri` is not empty.
    pub attrs: Option<Attributes>,
    pub nlri: Vec<Ipv4Net>,
}

impl Update {
    /// The End-of-RIB marker for IPv4 unicast: an UPDATE with nothing in it (RFC 4724).
    pub fn is_end_of_rib(&self) -> bool {
        self.withdrawn.is_empty() && self.nlri.is_empty() && self.attrs.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

/// A bounds-checked reader that reports running off the end as `err`.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn addr(&mut self) -> Option<Ipv4Addr> {
        self.u32().map(Ipv4Addr::from)
    }
}

/// Decodes the message at the start of `buf`. `Ok(None)`: not all of it is there yet.
/// `four_octet`: the session negotiated 4-octet AS numbers (AS_PATH carries 4-octet ASes).
pub fn decode(buf: &[u8], four_octet: bool) -> Result<Option<(Message, usize)>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notification::new(
            err::HEADER,
            err::HEADER_NOT_SYNCHRONIZED,
            [],
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    let ty = buf[18];
    let bad_len = || {
        Notification::new(
            err::HEADER,
            err::HEADER_BAD_LENGTH,
            (len as u16).to_be_bytes().to_vec(),
        )
    };
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(bad_len());
    }
    let min = match ty {
        kind::OPEN => 29,
        kind::UPDATE => 23,
        kind::NOTIFICATION => 21,
        kind::KEEPALIVE => 19,
        kind::ROUTE_REFRESH => 23,
        other => {
            return Err(Notification::new(
                err::HEADER,
                err::HEADER_BAD_TYPE,
                [other],
            ));
        }
    };
    if len < min || (ty == kind::KEEPALIVE && len != 19) || (ty == kind::ROUTE_REFRESH && len != 23)
    {
        return Err(bad_len());
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let msg = match ty {
        kind::OPEN => Message::Open(decode_open(body)?),
        kind::UPDATE => Message::Update(decode_update(body, four_octet)?),
        kind::NOTIFICATION => {
            Message::Notification(Notification::new(body[0], body[1], &body[2..]))
        }
        kind::KEEPALIVE => Message::Keepalive,
        _ => Message::RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        },
    };
    Ok(Some((msg, len)))
}

fn decode_open(body: &[u8]) -> Result<Open, Notification> {
    let unspecific = || Notification::new(err::OPEN, err::OPEN_UNSPECIFIC, []);
    let mut r = Reader::new(body);
    let version = r.u8().ok_or_else(unspecific)?;
    if version != 4 {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_BAD_VERSION,
            4u16.to_be_bytes(),
        ));
    }
    let my_as = r.u16().ok_or_else(unspecific)?;
    let hold_time = r.u16().ok_or_else(unspecific)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(Notification::new(err::OPEN, err::OPEN_BAD_HOLD_TIME, []));
    }
    let router_id = r.addr().ok_or_else(unspecific)?;
    if router_id.is_unspecified() || router_id.is_broadcast() {
        return Err(Notification::new(err::OPEN, err::OPEN_BAD_IDENTIFIER, []));
    }
    let params_len = usize::from(r.u8().ok_or_else(unspecific)?);
    if params_len != r.left() {
        return Err(unspecific());
    }
    let mut caps = Capabilities::default();
    while r.left() > 0 {
        let ptype = r.u8().ok_or_else(unspecific)?;
        let plen = usize::from(r.u8().ok_or_else(unspecific)?);
        let pbody = r.take(plen).ok_or_else(unspecific)?;
        if ptype != 2 {
            return Err(Notification::new(
                err::OPEN,
                err::OPEN_UNSUPPORTED_PARAMETER,
                [],
            ));
        }
        let mut c = Reader::new(pbody);
        while c.left() > 0 {
            let code = c.u8().ok_or_else(unspecific)?;
            let clen = usize::from(c.u8().ok_or_else(unspecific)?);
            let v = c.take(clen).ok_or_else(unspecific)?;
            match code {
                cap::MULTIPROTOCOL if clen == 4 => {
                    if u16::from_be_bytes([v[0], v[1]]) == AFI_IPV4 && v[3] == SAFI_UNICAST {
                        caps.ipv4_unicast = true;
                    }
                }
                cap::ROUTE_REFRESH if clen == 0 => caps.route_refresh = true,
                cap::FOUR_OCTET_AS if clen == 4 => {
                    caps.four_octet_as = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                }
                cap::GRACEFUL_RESTART if clen >= 2 && clen % 4 == 2 => {
                    let flags_time = u16::from_be_bytes([v[0], v[1]]);
                    let mut gr = GracefulRestart {
                        restarting: flags_time & 0x8000 != 0,
                        restart_time: flags_time & 0x0fff,
                        ipv4_unicast: None,
                    };
                    for t in v[2..].as_chunks::<4>().0 {
                        if u16::from_be_bytes([t[0], t[1]]) == AFI_IPV4 && t[2] == SAFI_UNICAST {
                            gr.ipv4_unicast = Some(t[3] & 0x80 != 0);
                        }
                    }
                    caps.graceful_restart = Some(gr);
                }
                cap::MULTIPROTOCOL
                | cap::ROUTE_REFRESH
                | cap::FOUR_OCTET_AS
                | cap::GRACEFUL_RESTART => return Err(unspecific()),
                other => caps.other.push(other),
            }
        }
    }
    Ok(Open {
        version,
        asn: caps.four_octet_as.unwrap_or(u32::from(my_as)),
        hold_time,
        router_id,
        caps,
    })
}

/// IPv4 prefixes, each a length byte and the fewest octets that hold it.
fn decode_prefixes(b: &[u8]) -> Result<Vec<Ipv4Net>, Notification> {
    let invalid = || Notification::new(err::UPDATE, err::UPDATE_INVALID_NETWORK, []);
    let mut r = Reader::new(b);
    let mut out = Vec::new();
    while r.left() > 0 {
        let bits = r.u8().ok_or_else(invalid)?;
        if bits > 32 {
            return Err(invalid());
        }
        let bytes = r.take(usize::from(bits).div_ceil(8)).ok_or_else(invalid)?;
        let mut a = [0u8; 4];
        a[..bytes.len()].copy_from_slice(bytes);
        let net = Ipv4Net::new(Ipv4Addr::from(a), bits).map_err(|_| invalid())?;
        out.push(net.trunc());
    }
    Ok(out)
}

fn decode_update(body: &[u8], four_octet: bool) -> Result<Update, Notification> {
    let malformed = || Notification::new(err::UPDATE, err::UPDATE_MALFORMED_ATTRIBUTE_LIST, []);
    let mut r = Reader::new(body);
    let wlen = usize::from(r.u16().ok_or_else(malformed)?);
    let withdrawn_bytes = r.take(wlen).ok_or_else(malformed)?;
    let alen = usize::from(r.u16().ok_or_else(malformed)?);
    let attr_bytes = r.take(alen).ok_or_else(malformed)?;
    let nlri_bytes = r.take(r.left()).unwrap_or_default();
    let mut update = Update {
        withdrawn: decode_prefixes(withdrawn_bytes)?,
        attrs: None,
        nlri: decode_prefixes(nlri_bytes)?,
    };
    if attr_bytes.is_empty() {
        if !update.nlri.is_empty() {
            return Err(Notification::new(
                err::UPDATE,
                err::UPDATE_MISSING_WELL_KNOWN,
                [attr::ORIGIN],
            ));
        }
        return Ok(update);
    }
    let mut a = Attributes::default();
    let mut seen = [false; 256];
    let (mut has_origin, mut has_path) = (false, false);
    let mut as4_path = None;
    let mut mp_nlri = Vec::new();
    let mut r = Reader::new(attr_bytes);
    while r.left() > 0 {
        let start = r.at;
        let flags = r.u8().ok_or_else(malformed)?;
        let code = r.u8().ok_or_else(malformed)?;
        let len = if flags & attr::EXTENDED_LENGTH != 0 {
            usize::from(r.u16().ok_or_else(malformed)?)
        } else {
            usize::from(r.u8().ok_or_else(malformed)?)
        };
        let v = r.take(len).ok_or_else(|| {
            Notification::new(
                err::UPDATE,
                err::UPDATE_ATTRIBUTE_LENGTH,
                attr_bytes[start..].to_vec(),
            )
        })?;
        let whole = &attr_bytes[start..r.at];
        if std::mem::replace(&mut seen[usize::from(code)], true) {
            return Err(malformed());
        }
        let error = |sub: u8| Notification::new(err::UPDATE, sub, whole.to_vec());
        let well_known = matches!(
            code,
            attr::ORIGIN
                | attr::AS_PATH
                | attr::NEXT_HOP
                | attr::LOCAL_PREF
                | attr::ATOMIC_AGGREGATE
        );
        // Flags a well-known attribute must carry (optional: no, transitive: yes), and the
        // optional ones this module reads.
        let expected = match code {
            c if well_known && c != 0 => Some(attr::TRANSITIVE),
            attr::MED
            | attr::ORIGINATOR_ID
            | attr::CLUSTER_LIST
            | attr::MP_REACH
            | attr::MP_UNREACH => Some(attr::OPTIONAL),
            attr::AGGREGATOR | attr::COMMUNITIES | attr::AS4_PATH | attr::AS4_AGGREGATOR => {
                Some(attr::OPTIONAL | attr::TRANSITIVE)
            }
            _ => None,
        };
        if let Some(want) = expected
            && flags & (attr::OPTIONAL | attr::TRANSITIVE) != want
        {
            return Err(error(err::UPDATE_ATTRIBUTE_FLAGS));
        }
        match code {
            attr::ORIGIN => {
                if len != 1 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                a.origin = match v[0] {
                    0 => Origin::Igp,
                    1 => Origin::Egp,
                    2 => Origin::Incomplete,
                    _ => return Err(error(err::UPDATE_INVALID_ORIGIN)),
                };
                has_origin = true;
            }
            attr::AS_PATH => {
                a.as_path = decode_as_path(v, four_octet)
                    .ok_or_else(|| error(err::UPDATE_MALFORMED_AS_PATH))?;
                has_path = true;
            }
            attr::AS4_PATH if !four_octet => {
                as4_path = Some(
                    decode_as_path(v, true).ok_or_else(|| error(err::UPDATE_OPTIONAL_ATTRIBUTE))?,
                );
            }
            attr::NEXT_HOP => {
                if len != 4 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                let nh = Ipv4Addr::new(v[0], v[1], v[2], v[3]);
                if nh.is_unspecified() || nh.is_broadcast() || nh.is_multicast() || nh.is_loopback()
                {
                    return Err(error(err::UPDATE_INVALID_NEXT_HOP));
                }
                a.next_hop = Some(nh);
            }
            attr::MED | attr::LOCAL_PREF => {
                if len != 4 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                let x = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                if code == attr::MED {
                    a.med = Some(x);
                } else {
                    a.local_pref = Some(x);
                }
            }
            attr::ATOMIC_AGGREGATE => {
                if len != 0 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                a.atomic_aggregate = true;
            }
            attr::AGGREGATOR => {
                if len != if four_octet { 8 } else { 6 } {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
            }
            attr::COMMUNITIES => {
                if len % 4 != 0 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                a.communities = v
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| u32::from_be_bytes(*c))
                    .collect();
            }
            attr::ORIGINATOR_ID => {
                if len != 4 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                a.originator_id = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3]));
            }
            attr::CLUSTER_LIST => {
                if len % 4 != 0 {
                    return Err(error(err::UPDATE_ATTRIBUTE_LENGTH));
                }
                a.cluster_list = v
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| Ipv4Addr::from(*c))
                    .collect();
            }
            attr::MP_REACH => {
                // AFI, SAFI, next hop length and next hop, a reserved byte, then NLRI.
                let mut m = Reader::new(v);
                let (afi, safi) = (m.u16(), m.u8());
                let nh_len = m.u8().map(usize::from);
                let (Some(afi), Some(safi), Some(nh_len)) = (afi, safi, nh_len) else {
                    return Err(error(err::UPDATE_OPTIONAL_ATTRIBUTE));
                };
                let nh = m
                    .take(nh_len)
                    .ok_or_else(|| error(err::UPDATE_OPTIONAL_ATTRIBUTE))?;
                m.u8()
                    .ok_or_else(|| error(err::UPDATE_OPTIONAL_ATTRIBUTE))?;
                if afi == AFI_IPV4 && safi == SAFI_UNICAST {
                    if nh_len != 4 {
                        return Err(error(err::UPDATE_OPTIONAL_ATTRIBUTE));
                    }
                    a.next_hop = Some(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]));
                    mp_nlri = decode_prefixes(m.take(m.left()).unwrap_or_default())?;
                }
            }
            attr::MP_UNREACH => {
                let mut m = Reader::new(v);
                let (Some(afi), Some(safi)) = (m.u16(), m.u8()) else {
                    return Err(error(err::UPDATE_OPTIONAL_ATTRIBUTE));
                };
                if afi == AFI_IPV4 && safi == SAFI_UNICAST {
                    update
                        .withdrawn
                        .extend(decode_prefixes(m.take(m.left()).unwrap_or_default())?);
                }
            }
            _ if flags & attr::OPTIONAL == 0 => {
                return Err(error(err::UPDATE_UNRECOGNIZED_WELL_KNOWN));
            }
            // Unknown optional attributes are ignored (not propagated: this speaker only
            // originates and reflects routes of its own cluster).
            _ => {}
        }
    }
    update.nlri.extend(mp_nlri);
    if update.nlri.is_empty() {
        // Attributes without reachable routes (a withdrawal carried in MP_UNREACH).
        return Ok(update);
    }
    for (present, code) in [
        (has_origin, attr::ORIGIN),
        (has_path, attr::AS_PATH),
        (a.next_hop.is_some(), attr::NEXT_HOP),
    ] {
        if !present {
            return Err(Notification::new(
                err::UPDATE,
                err::UPDATE_MISSING_WELL_KNOWN,
                [code],
            ));
        }
    }
    if let Some(p) = as4_path {
        // A 2-octet peer relays 4-octet ASes in AS4_PATH (RFC 6793 4.2.3), when it is not longer.
        if p.len() <= a.as_path.len() {
            a.as_path = p;
        }
    }
    update.attrs = Some(a);
    Ok(update)
}

fn decode_as_path(v: &[u8], four_octet: bool) -> Option<Vec<Segment>> {
    let width = if four_octet { 4 } else { 2 };
    let mut r = Reader::new(v);
    let mut out = Vec::new();
    while r.left() > 0 {
        let ty = r.u8()?;
        let n = usize::from(r.u8()?);
        if n == 0 {
            return None;
        }
        let raw = r.take(n * width)?;
        let asns: Vec<u32> = raw
            .chunks_exact(width)
            .map(|c| {
                if four_octet {
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u32::from(u16::from_be_bytes([c[0], c[1]]))
                }
            })
            .collect();
        out.push(match ty {
            1 => Segment::Set(asns),
            2 => Segment::Sequence(asns),
            _ => return None,
        });
    }
    Some(out)
}

fn header(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0, ty]);
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = out.len() as u16;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    out
}

fn push_prefix(out: &mut Vec<u8>, p: &Ipv4Net) {
    let bits = p.prefix_len();
    out.push(bits);
    out.extend_from_slice(&p.network().octets()[..usize::from(bits).div_ceil(8)]);
}

fn push_attr(out: &mut Vec<u8>, flags: u8, code: u8, v: &[u8]) {
    if v.len() > 255 {
        out.extend_from_slice(&[flags | attr::EXTENDED_LENGTH, code]);
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, code, v.len() as u8]);
    }
    out.extend_from_slice(v);
}

/// Encodes `msg`; `four_octet` as negotiated (an OPEN always carries the 4-octet capability
/// when its AS is set there).
pub fn encode(msg: &Message, four_octet: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match msg {
        Message::Keepalive => header(&mut out, kind::KEEPALIVE),
        Message::Notification(n) => {
            header(&mut out, kind::NOTIFICATION);
            out.extend_from_slice(&[n.code, n.subcode]);
            out.extend_from_slice(&n.data);
        }
        Message::RouteRefresh { afi, safi } => {
            header(&mut out, kind::ROUTE_REFRESH);
            out.extend_from_slice(&afi.to_be_bytes());
            out.extend_from_slice(&[0, *safi]);
        }
        Message::Open(o) => {
            header(&mut out, kind::OPEN);
            out.push(o.version);
            let two = u16::try_from(o.asn).unwrap_or(AS_TRANS);
            out.extend_from_slice(&two.to_be_bytes());
            out.extend_from_slice(&o.hold_time.to_be_bytes());
            out.extend_from_slice(&o.router_id.octets());
            let mut caps = Vec::new();
            let mut push_cap = |code: u8, v: &[u8]| {
                caps.extend_from_slice(&[code, v.len() as u8]);
                caps.extend_from_slice(v);
            };
            if o.caps.ipv4_unicast {
                push_cap(cap::MULTIPROTOCOL, &[0, 1, 0, SAFI_UNICAST]);
            }
            if o.caps.route_refresh {
                push_cap(cap::ROUTE_REFRESH, &[]);
            }
            if let Some(gr) = &o.caps.graceful_restart {
                let mut v = Vec::new();
                let ft = (gr.restart_time & 0x0fff) | if gr.restarting { 0x8000 } else { 0 };
                v.extend_from_slice(&ft.to_be_bytes());
                if let Some(preserved) = gr.ipv4_unicast {
                    v.extend_from_slice(&[0, 1, SAFI_UNICAST, if preserved { 0x80 } else { 0 }]);
                }
                push_cap(cap::GRACEFUL_RESTART, &v);
            }
            if let Some(asn) = o.caps.four_octet_as {
                push_cap(cap::FOUR_OCTET_AS, &asn.to_be_bytes());
            }
            let mut params = Vec::new();
            if !caps.is_empty() {
                params.extend_from_slice(&[2, caps.len() as u8]);
                params.extend_from_slice(&caps);
            }
            out.push(params.len() as u8);
            out.extend_from_slice(&params);
        }
        Message::Update(u) => {
            header(&mut out, kind::UPDATE);
            let mut w = Vec::new();
            for p in &u.withdrawn {
                push_prefix(&mut w, p);
            }
            out.extend_from_slice(&(w.len() as u16).to_be_bytes());
            out.extend_from_slice(&w);
            let mut attrs = Vec::new();
            if let Some(a) = &u.attrs {
                push_attr(
                    &mut attrs,
                    attr::TRANSITIVE,
                    attr::ORIGIN,
                    &[a.origin as u8],
                );
                let mut path = Vec::new();
                for s in &a.as_path {
                    let (ty, asns) = match s {
                        Segment::Set(x) => (1u8, x),
                        Segment::Sequence(x) => (2u8, x),
                    };
                    path.extend_from_slice(&[ty, asns.len() as u8]);
                    for asn in asns {
                        if four_octet {
                            path.extend_from_slice(&asn.to_be_bytes());
                        } else {
                            let two = u16::try_from(*asn).unwrap_or(AS_TRANS);
                            path.extend_from_slice(&two.to_be_bytes());
                        }
                    }
                }
                push_attr(&mut attrs, attr::TRANSITIVE, attr::AS_PATH, &path);
                if let Some(nh) = a.next_hop {
                    push_attr(&mut attrs, attr::TRANSITIVE, attr::NEXT_HOP, &nh.octets());
                }
                if let Some(med) = a.med {
                    push_attr(&mut attrs, attr::OPTIONAL, attr::MED, &med.to_be_bytes());
                }
                if let Some(lp) = a.local_pref {
                    push_attr(
                        &mut attrs,
                        attr::TRANSITIVE,
                        attr::LOCAL_PREF,
                        &lp.to_be_bytes(),
                    );
                }
                if a.atomic_aggregate {
                    push_attr(&mut attrs, attr::TRANSITIVE, attr::ATOMIC_AGGREGATE, &[]);
                }
                if !a.communities.is_empty() {
                    let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
                    push_attr(
                        &mut attrs,
                        attr::OPTIONAL | attr::TRANSITIVE,
                        attr::COMMUNITIES,
                        &v,
                    );
                }
                if let Some(o) = a.originator_id {
                    push_attr(&mut attrs, attr::OPTIONAL, attr::ORIGINATOR_ID, &o.octets());
                }
                if !a.cluster_list.is_empty() {
                    let v: Vec<u8> = a.cluster_list.iter().flat_map(|c| c.octets()).collect();
                    push_attr(&mut attrs, attr::OPTIONAL, attr::CLUSTER_LIST, &v);
                }
            }
            out.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            out.extend_from_slice(&attrs);
            for p in &u.nlri {
                push_prefix(&mut out, p);
            }
        }
    }
    finish(out)
}

/// Prefixes per UPDATE at most (a /32 takes 5 bytes: 3500 bytes); fewer when the attributes
/// need the room (the speaker sizes each UPDATE from its attributes).
pub const PREFIXES_PER_UPDATE: usize = 700;

#[cfg(test)]
mod tests {
    use super::*;

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
}
