//! BGP path attributes (RFC 4271 section 4.3 and 5; COMMUNITIES RFC 1997, ORIGINATOR_ID and
//! CLUSTER_LIST RFC 4456, MP_REACH/MP_UNREACH RFC 4760, AS4_PATH RFC 6793): their types, and
//! their decoding and encoding inside an UPDATE.

use std::net::Ipv4Addr;

use super::{
    AFI_IPV4, AS_TRANS, Notification, SAFI_UNICAST, Update, decode::decode_prefixes, err,
    reader::Reader,
};

/// Path attribute type codes.
pub(super) mod attr {
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

/// Decodes an UPDATE's path attributes into `update`: its [`Attributes`], and the prefixes
/// MP_REACH_NLRI and MP_UNREACH_NLRI carry for IPv4 unicast. Checks what RFC 4271 section 6.3
/// and RFC 7606's well-known attribute rules require; the error is the NOTIFICATION to send.
pub(super) fn decode(
    attr_bytes: &[u8],
    four_octet: bool,
    update: &mut Update,
) -> Result<(), Notification> {
    let malformed = || Notification::new(err::UPDATE, err::UPDATE_MALFORMED_ATTRIBUTE_LIST, []);
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
            // From a 2-octet speaker only (a 4-octet one's is ignored, RFC 6793 4.1). A malformed
            // one is discarded, the UPDATE kept (RFC 6793 6, RFC 7606 "attribute discard").
            attr::AS4_PATH if !four_octet => as4_path = decode_as_path(v, true),
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
        return Ok(());
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
        a.as_path = merge_as4_path(&a.as_path, p);
    }
    update.attrs = Some(a);
    Ok(())
}

/// AS numbers in a path as best-path selection counts them: a set counts as one.
fn path_len(path: &[Segment]) -> usize {
    path.iter()
        .map(|s| match s {
            Segment::Set(_) => 1,
            Segment::Sequence(a) => a.len(),
        })
        .sum()
}

/// The AS path of a route from a 2-octet speaker (RFC 6793 4.2.3): AS4_PATH carries the
/// 4-octet numbers of the trailing part of AS_PATH (where AS_PATH has AS_TRANS), and the
/// leading ASes AS_PATH has beyond it were added by 2-octet speakers since. So the path is as
/// many leading ASes of AS_PATH as it has more than AS4_PATH, then AS4_PATH; an AS4_PATH longer
/// than AS_PATH is ignored.
fn merge_as4_path(as_path: &[Segment], as4_path: Vec<Segment>) -> Vec<Segment> {
    let (two, four) = (path_len(as_path), path_len(&as4_path));
    if two < four {
        return as_path.to_vec();
    }
    let mut lead = two - four;
    let mut out: Vec<Segment> = Vec::new();
    for s in as_path {
        if lead == 0 {
            break;
        }
        match s {
            Segment::Set(a) => {
                out.push(Segment::Set(a.clone()));
                lead -= 1;
            }
            Segment::Sequence(a) => {
                let n = lead.min(a.len());
                out.push(Segment::Sequence(a[..n].to_vec()));
                lead -= n;
            }
        }
    }
    for s in as4_path {
        match (out.last_mut(), s) {
            (Some(Segment::Sequence(tail)), Segment::Sequence(more)) => tail.extend(more),
            (_, s) => out.push(s),
        }
    }
    out
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

fn push_attr(out: &mut Vec<u8>, flags: u8, code: u8, v: &[u8]) {
    if v.len() > 255 {
        out.extend_from_slice(&[flags | attr::EXTENDED_LENGTH, code]);
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, code, v.len() as u8]);
    }
    out.extend_from_slice(v);
}

/// Appends the path attributes `a` (AS numbers 4-octet when `four_octet`, else 2-octet with
/// AS_TRANS standing in for larger ones).
pub(super) fn encode(attrs: &mut Vec<u8>, a: &Attributes, four_octet: bool) {
    push_attr(attrs, attr::TRANSITIVE, attr::ORIGIN, &[a.origin as u8]);
    let mut path = Vec::new();
    // A segment holds 255 ASes at most: a longer sequence is several in a row.
    let segments = a.as_path.iter().flat_map(|s| match s {
        Segment::Set(x) => x.chunks(255).map(|c| (1u8, c)).collect::<Vec<_>>(),
        Segment::Sequence(x) => x.chunks(255).map(|c| (2u8, c)).collect(),
    });
    for (ty, asns) in segments {
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
    push_attr(attrs, attr::TRANSITIVE, attr::AS_PATH, &path);
    if let Some(nh) = a.next_hop {
        push_attr(attrs, attr::TRANSITIVE, attr::NEXT_HOP, &nh.octets());
    }
    if let Some(med) = a.med {
        push_attr(attrs, attr::OPTIONAL, attr::MED, &med.to_be_bytes());
    }
    if let Some(lp) = a.local_pref {
        push_attr(attrs, attr::TRANSITIVE, attr::LOCAL_PREF, &lp.to_be_bytes());
    }
    if a.atomic_aggregate {
        push_attr(attrs, attr::TRANSITIVE, attr::ATOMIC_AGGREGATE, &[]);
    }
    if !a.communities.is_empty() {
        let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
        push_attr(
            attrs,
            attr::OPTIONAL | attr::TRANSITIVE,
            attr::COMMUNITIES,
            &v,
        );
    }
    if let Some(o) = a.originator_id {
        push_attr(attrs, attr::OPTIONAL, attr::ORIGINATOR_ID, &o.octets());
    }
    if !a.cluster_list.is_empty() {
        let v: Vec<u8> = a.cluster_list.iter().flat_map(|c| c.octets()).collect();
        push_attr(attrs, attr::OPTIONAL, attr::CLUSTER_LIST, &v);
    }
}
