//! Encoding: [`Message`]s to bytes.

use ipnet::Ipv4Net;

use super::{AS_TRANS, Message, SAFI_UNICAST, attributes, kind, message::cap};

pub(super) fn header(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0, ty]);
}

pub(super) fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = out.len() as u16;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    out
}

fn push_prefix(out: &mut Vec<u8>, p: &Ipv4Net) {
    let bits = p.prefix_len();
    out.push(bits);
    out.extend_from_slice(&p.network().octets()[..usize::from(bits).div_ceil(8)]);
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
                attributes::encode(&mut attrs, a, four_octet);
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
