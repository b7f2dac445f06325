//! ICMP on the per-packet paths: errors about translated flows translated with them, and the
//! fragmentation-needed this datapath answers itself when a translated packet does not fit its
//! path.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::bpf_redirect,
    programs::TcContext,
};
use ferrox_abi::{CtKey, Reason, proto};

use crate::{
    fib::{Fib, forward},
    flow::{Flow, IcmpPacket},
    packet::{
        ETH_HLEN, Frame as _, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Ipv4Hdr, ipv4_checksum,
    },
};

/// ICMP destination unreachable, code fragmentation needed and don't-fragment set.
pub(crate) const ICMP_FRAG_NEEDED: u8 = 4;

/// What an ICMP error quotes here: an IPv4 header without options and 8 bytes of its payload.
pub(crate) const QUOTE_LEN: usize = 28;

pub(crate) const ICMP_ERROR_LEN: usize = 20 + 8;

/// Replaces the packet by an ICMP fragmentation-needed carrying `mtu`, from the address the
/// client sent it to, quoting the packet as the client sent it, and sends it back out the
/// interface it came in on. A packet with IP options is dropped without an answer. A function of
/// its own (a BPF-to-BPF call): its buffers stay off the stack of the common path.
#[inline(never)]
pub(crate) fn icmp_too_big(ctx: &TcContext, flow: &Flow, mtu: u16) -> Result<i32, Reason> {
    if flow.l4_off != ETH_HLEN + 20 {
        return Err(Reason::DropTooBig);
    }
    let err = |_| Reason::DropTooBig;
    let dmac: [u8; 6] = ctx.load(0).map_err(err)?;
    let smac: [u8; 6] = ctx.load(6).map_err(err)?;
    // The ICMP checksum covers the ICMP header and the quote: sum the quote's words now.
    let mut sum = 0u32;
    let mut off = ETH_HLEN;
    while off < ETH_HLEN + QUOTE_LEN {
        let w: u32 = ctx.load(off).map_err(err)?;
        sum += (w & 0xffff) + (w >> 16);
        off += 4;
    }
    // Down to the Ethernet header and the quote (a GSO packet stops being one), then room for
    // the new IP and ICMP headers in front of the quote.
    ctx.change_tail((ETH_HLEN + QUOTE_LEN) as u32, 0)
        .map_err(err)?;
    ctx.adjust_room(ICMP_ERROR_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(err)?;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0xc0,
        tot_len: ((ICMP_ERROR_LEN + QUOTE_LEN) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: proto::ICMP,
        check: 0,
        saddr: flow.daddr,
        daddr: flow.saddr,
    };
    ip.check = ipv4_checksum(&ip);
    ctx.store(ETH_HLEN, &ip, 0).map_err(err)?;
    // Type, code, checksum, unused, next-hop MTU.
    let head = u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]);
    let mtu_be = mtu.to_be();
    sum += u32::from(head) + u32::from(mtu_be);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let icmp: [u16; 4] = [head, !(sum as u16), 0, mtu_be];
    ctx.store(ETH_HLEN + 20, &icmp, 0).map_err(err)?;
    ctx.store(0, &smac, 0).map_err(err)?;
    ctx.store(6, &dmac, 0).map_err(err)?;
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    // SAFETY: back out of the interface the packet came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// ICMP types that quote the packet they are about.
pub(crate) const ICMP_DEST_UNREACH: u8 = 3;

pub(crate) const ICMP_TIME_EXCEEDED: u8 = 11;

pub(crate) const ICMP_PARAMETERPROB: u8 = 12;

/// Offset of the ICMP checksum in the ICMP header, and of the quoted packet.
pub(crate) const ICMP_CSUM: usize = 2;

pub(crate) const ICMP_QUOTE: usize = 8;

/// An ICMP message. Errors about a translated flow (fragmentation needed, unreachable, time
/// exceeded) are translated like the flow, so the sender they concern gets them in its own
/// addresses: the quoted packet, the error's destination, and its source when the error comes
/// from the quoted packet's destination itself. Anything else passes. A function of its own (a
/// BPF-to-BPF call), off the stack of the TCP/UDP path.
#[inline(never)]
pub(crate) fn icmp(ctx: &TcContext, m: &IcmpPacket) -> (Reason, i32) {
    match icmp_error(ctx, m.l4_off, m.saddr, m.daddr, m.tot_len) {
        Some(Ok(action)) => (Reason::NatIcmpError, action),
        Some(Err(r)) => (r, TC_ACT_SHOT),
        None => (Reason::PassIcmp, TC_ACT_UNSPEC),
    }
}

#[inline(always)]
pub(crate) fn icmp_error(
    ctx: &TcContext,
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Option<Result<i32, Reason>> {
    let hdr = ctx.header::<[u8; 2]>(l4_off)?;
    // SAFETY: `header` checked the two bytes are inside the frame.
    let [kind, _code] = unsafe { hdr.read_unaligned() };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return None;
    }
    let inner_off = l4_off + ICMP_QUOTE;
    let inner = ctx.header::<Ipv4Hdr>(inner_off)?;
    // SAFETY: as above, for the quoted IP header.
    let inner = unsafe { inner.read_unaligned() };
    if inner.proto != proto::TCP && inner.proto != proto::UDP {
        return None;
    }
    let inner_l4 = inner_off + usize::from(inner.version_ihl & 0x0f) * 4;
    let ports = ctx.header::<[u16; 2]>(inner_l4)?;
    // SAFETY: as above, for the quoted ports.
    let [isport, idport] = unsafe { ports.read_unaligned() };
    // The quoted packet went s -> d; its flow's entry is the one for d -> s.
    let key = CtKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: idport,
        dport: isport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    let e = crate::ct_map::lookup(&key)?;
    // SAFETY: the pointer comes from a successful lookup; only the four translation fields
    // are read (they never change after the entry is created), not the whole entry, whose copy
    // this function's stack has no room for.
    let (nat_saddr, nat_daddr, nat_sport, nat_dport) = unsafe {
        (
            (*e).nat_saddr,
            (*e).nat_daddr,
            (*e).nat_sport,
            (*e).nat_dport,
        )
    };
    // Translated quote: the reverse of the translated d -> s.
    let (new_isaddr, new_isport, new_idaddr, new_idport) =
        (nat_daddr, nat_dport, nat_saddr, nat_sport);
    let new_daddr = nat_daddr;
    let new_saddr = if saddr == inner.daddr {
        nat_saddr
    } else {
        saddr
    };
    Some(
        rewrite_icmp_error(
            ctx,
            l4_off,
            inner_off,
            inner_l4,
            &inner,
            [isport, idport],
            [new_isaddr, new_idaddr],
            [new_isport, new_idport],
            saddr,
            daddr,
            new_saddr,
            new_daddr,
        )
        .map_err(|_| Reason::DropRewrite)
        .and_then(|()| {
            forward(
                ctx,
                &Fib {
                    proto: proto::ICMP,
                    saddr: new_saddr,
                    daddr: new_daddr,
                    sport: 0,
                    dport: 0,
                    tot_len,
                },
            )
        }),
    )
}

/// Rewrites an ICMP error and its quote. The ICMP checksum covers the quote (no pseudo
/// header), so every quoted byte that changes, the quoted IP checksum included, is folded in.
#[allow(
    clippy::too_many_arguments,
    reason = "the old and new values of every rewritten field"
)]
#[inline(always)]
pub(crate) fn rewrite_icmp_error(
    ctx: &TcContext,
    l4_off: usize,
    inner_off: usize,
    inner_l4: usize,
    inner: &Ipv4Hdr,
    old_ports: [u16; 2],
    new_addrs: [u32; 2],
    new_ports: [u16; 2],
    saddr: u32,
    daddr: u32,
    new_saddr: u32,
    new_daddr: u32,
) -> Result<(), i64> {
    let icmp_csum = l4_off + ICMP_CSUM;
    let inner_csum = inner_off + 10;
    let old_inner_csum = inner.check;
    // Quoted addresses: the quoted IP checksum and the ICMP checksum.
    for (off, old, new) in [
        (inner_off + 12, inner.saddr, new_addrs[0]),
        (inner_off + 16, inner.daddr, new_addrs[1]),
    ] {
        if old != new {
            ctx.l3_csum_replace(inner_csum, u64::from(old), u64::from(new), 4)?;
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 4)?;
            ctx.store(off, &new, 0)?;
        }
    }
    // Quoted ports: the ICMP checksum (the quoted L4 checksum may lie beyond the quote).
    for (off, old, new) in [
        (inner_l4, old_ports[0], new_ports[0]),
        (inner_l4 + 2, old_ports[1], new_ports[1]),
    ] {
        if old != new {
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 2)?;
            ctx.store(off, &new, 0)?;
        }
    }
    // The quoted IP checksum itself changed: fold that into the ICMP checksum.
    let new_inner_csum = ctx.load::<u16>(inner_csum)?;
    if new_inner_csum != old_inner_csum {
        ctx.l4_csum_replace(
            icmp_csum,
            u64::from(old_inner_csum),
            u64::from(new_inner_csum),
            2,
        )?;
    }
    // Outer addresses: only the outer IP checksum (ICMP has no pseudo header).
    if new_saddr != saddr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(saddr), u64::from(new_saddr), 4)?;
        ctx.store(IP_SADDR_OFF, &new_saddr, 0)?;
    }
    if new_daddr != daddr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(daddr), u64::from(new_daddr), 4)?;
        ctx.store(IP_DADDR_OFF, &new_daddr, 0)?;
    }
    Ok(())
}
