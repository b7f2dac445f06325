//! What a packet is, for the per-packet paths: a TCP/UDP flow (addresses, ports, where its L4
//! header is, whether it carries one at all: a later IP fragment does not, and takes its ports
//! from its datagram's first fragment, kept in `FRAG_V1`), an ICMP message, or something else
//! with its final reason.

use ferrox_abi::{CtKey, FragKey, FragValue, Hook, Reason, Verdict, proto};

use crate::{
    classify::classify,
    maps::FRAG_V1,
    packet::{ETH_HLEN, Frame, Hooked, Ipv4Hdr},
};

/// `frag_off` bits, host byte order.
pub(crate) const IP_DF: u16 = 0x4000;

pub(crate) const IP_MF: u16 = 0x2000;

/// The addresses and ports of a TCP or UDP packet, network byte order.
#[derive(Clone, Copy)]
pub(crate) struct Flow {
    /// Offset of the L4 header.
    pub(crate) l4_off: usize,
    pub(crate) proto: u8,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// IP total length, host byte order.
    pub(crate) tot_len: u16,
    /// The packet carries the L4 header: a whole datagram or its first fragment. A later
    /// fragment carries only data: its addresses are rewritten, its ports (known from the first
    /// fragment) are not there to rewrite.
    pub(crate) has_l4: bool,
    /// Don't-fragment is set.
    pub(crate) df: bool,
}

impl Flow {
    pub(crate) fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// What the packet is: a TCP/UDP flow to look at, an ICMP message (errors about translated
/// flows are translated too), or anything else with its final reason.
pub(crate) enum Parsed {
    Flow(Flow),
    Icmp(IcmpPacket),
    Other(Reason),
}

/// An ICMP message: where its header is, its addresses, its total length.
pub(crate) struct IcmpPacket {
    pub(crate) l4_off: usize,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) tot_len: u16,
}

#[inline(always)]
pub(crate) fn parse<C: Frame>(ctx: &C) -> Parsed {
    let reason = classify(ctx);
    let later_fragment = reason == Reason::PassIpv4Fragment;
    if !later_fragment
        && reason != Reason::PassTcp
        && reason != Reason::PassUdp
        && reason != Reason::PassIcmp
    {
        return Parsed::Other(reason);
    }
    // `classify` validated the header; read what translation needs.
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    let l4_off = ETH_HLEN + usize::from(ip.version_ihl & 0x0f) * 4;
    let frag_off = u16::from_be(ip.frag_off);
    let frag_key = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    };
    if later_fragment {
        if ip.proto != proto::TCP && ip.proto != proto::UDP {
            return Parsed::Other(reason);
        }
        // The ports are in the first fragment only: it must have come first.
        // SAFETY: hash map values are read once, by copy.
        let Some(ports) = (unsafe { FRAG_V1.get(&frag_key) }).copied() else {
            return Parsed::Other(Reason::DropFragmentUnknown);
        };
        return Parsed::Flow(Flow {
            l4_off,
            proto: ip.proto,
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports.sport,
            dport: ports.dport,
            tot_len: u16::from_be(ip.tot_len),
            has_l4: false,
            df: false,
        });
    }
    if reason == Reason::PassIcmp {
        return Parsed::Icmp(IcmpPacket {
            l4_off,
            saddr: ip.saddr,
            daddr: ip.daddr,
            tot_len: u16::from_be(ip.tot_len),
        });
    }
    // Source and destination ports are the first four bytes of both TCP and UDP headers.
    let Some(ports) = ctx.header::<[u16; 2]>(l4_off) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: as above, for the four port bytes.
    let [sport, dport] = unsafe { ports.read_unaligned() };
    if frag_off & IP_MF != 0 {
        // The first fragment of a datagram: its later fragments will need these ports.
        let _ = FRAG_V1.insert(&frag_key, &FragValue { sport, dport }, 0);
    }
    Parsed::Flow(Flow {
        l4_off,
        proto: ip.proto,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        tot_len: u16::from_be(ip.tot_len),
        has_l4: true,
        df: frag_off & IP_DF != 0,
    })
}

/// The action (TC or XDP, as `C` is) of a reason that ends a packet's processing without
/// translation.
#[inline(always)]
pub(crate) fn action_of<C: Hooked>(reason: Reason) -> i32 {
    match reason.verdict() {
        Verdict::Drop => C::DROP,
        Verdict::Pass | Verdict::Translate => C::PASS,
    }
}

/// The pass reason of a TCP or UDP packet nothing translates.
#[inline(always)]
pub(crate) fn untranslated<C: Hooked>(flow: &Flow) -> (Reason, i32) {
    let r = if !flow.has_l4 {
        Reason::PassIpv4Fragment
    } else if flow.proto == proto::TCP {
        Reason::PassTcp
    } else {
        Reason::PassUdp
    };
    (r, C::PASS)
}

/// Tells a listening monitor that `flow` was dropped for `reason`.
#[inline(always)]
pub(crate) fn flow_dropped(hook: Hook, reason: Reason, flow: &Flow) {
    crate::events::drop(
        hook, reason, flow.proto, flow.saddr, flow.sport, flow.daddr, flow.dport,
    );
}
