//! Decoding: bytes to [`Message`]s. Never panics, whatever the bytes; every malformed message is
//! reported as the NOTIFICATION RFC 4271 section 6 prescribes for it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{
    AFI_IPV4, Capabilities, GracefulRestart, HEADER_LEN, MAX_LEN, Message, Notification, Open,
    SAFI_UNICAST, Update,
    attributes::{self, attr},
    err, kind,
    message::cap,
    reader::Reader,
};

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
pub(super) fn decode_prefixes(b: &[u8]) -> Result<Vec<Ipv4Net>, Notification> {
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
    attributes::decode(attr_bytes, four_octet, &mut update)?;
    Ok(update)
}
