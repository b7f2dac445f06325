//! Per-packet translation: a packet of a tracked flow is routed, then rewritten (addresses,
//! ports, checksums) as its conntrack entry says and sent on. Translated packets are forwarded
//! with a FIB lookup and a redirect, not handed to the stack: a packet whose source became this
//! node's own address would be dropped by the stack as a martian.

use core::ptr::addr_of_mut;

use aya_ebpf::{EbpfContext, bindings::TC_ACT_OK, helpers::bpf_redirect_neigh};
use ferrox_abi::{CtEntry, Reason, fwd_flags, proto};

use crate::{
    fib::{Fib, Route, can_send, encap_of, path_len, peer_of, route, send},
    flow::Flow,
    icmp::icmp_too_big,
    packet::{ETH_HLEN, Hooked, Ipv4Hdr, csum_apply, csum_diff16, csum_diff32},
};

/// What became of a packet given to [`translate`]: sent on translated (with this action),
/// answered with an ICMP fragmentation-needed instead (with this action), or (at XDP only)
/// left untouched for TC, because its way on is one XDP cannot take.
pub(crate) enum Outcome {
    Sent(i32),
    TooBig(i32),
    ToTc,
}

impl Outcome {
    /// The reason to count: `translated` when it was, else the too-big drop or the hand-over to
    /// TC; and the action.
    #[inline(always)]
    pub(crate) fn counted<C: Hooked>(self, translated: Reason) -> (Reason, i32) {
        match self {
            Self::Sent(a) => (translated, a),
            Self::TooBig(a) => (Reason::DropTooBig, a),
            Self::ToTc => (Reason::PassToTc, C::PASS),
        }
    }
}

/// What [`translate`] does with the route cached in the flow's entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cache {
    /// Use it while it holds one.
    Use,
    /// Look the route up and cache it anew: a new flow, or an entry whose last-seen time was
    /// just refreshed.
    Refresh,
}

/// Rewrites the packet as `e` says and sends it on: through the route cached in the flow's
/// entry while it is fresh and the packet no longer than what it was checked to carry; else
/// through a FIB lookup (whose result is cached), done before anything is rewritten, so a packet
/// that does not fit its path is answered with an error the client can match. A function of its
/// own (a BPF-to-BPF call), which keeps the callers' stacks within the kernel's limit.
///
/// At XDP the same, as far as XDP can send: a packet whose way on is back out of the arrival
/// interface unwrapped is rewritten and sent (`XDP_TX`); any other is left untouched for TC
/// ([`Outcome::ToTc`]), which finds the flow's entry (and the route cached here) and does the
/// rest.
#[inline(never)]
pub(crate) fn translate<C: Hooked + EbpfContext>(
    ctx: &C,
    flow: &Flow,
    entry: *mut CtEntry,
    cache: Cache,
) -> Result<Outcome, Reason> {
    let len = path_len(ctx, flow.tot_len);
    // SAFETY: `entry` comes from a successful lookup; read by copy.
    let e = unsafe { *entry };
    let refresh = cache == Cache::Refresh;
    if !refresh && e.fwd_flags & fwd_flags::DIRECT != 0 && len <= e.fwd_max_len {
        let peer = e.fwd_flags & fwd_flags::PEER != 0;
        if !can_send(
            ctx,
            e.fwd_ifindex,
            peer,
            e.fwd_flags & fwd_flags::ENCAP != 0,
        ) {
            return Ok(Outcome::ToTc);
        }
        rewrite(ctx, flow, &e, Some(&e.fwd_macs)).map_err(|_| Reason::DropRewrite)?;
        return Ok(Outcome::Sent(send::<C>(e.fwd_ifindex, peer)));
    }
    if !refresh && e.fwd_flags & fwd_flags::LOCAL != 0 {
        if C::XDP {
            return Ok(Outcome::ToTc);
        }
        rewrite(ctx, flow, &e, None).map_err(|_| Reason::DropRewrite)?;
        return Ok(Outcome::Sent(TC_ACT_OK));
    }
    // A longer packet than the cached route was checked for: it keeps what it knew.
    let known_len = if refresh || e.fwd_flags & fwd_flags::DIRECT == 0 {
        0
    } else {
        e.fwd_max_len
    };
    let e = &e;
    let to = Fib {
        proto: flow.proto,
        saddr: e.nat_saddr,
        daddr: e.nat_daddr,
        sport: e.nat_sport,
        dport: e.nat_dport,
        tot_len: len,
    };
    let route = route(ctx, &to);
    let (peer, encap) = match route {
        Route::Direct { ifindex, .. } => (
            peer_of(e.nat_daddr, ifindex),
            encap_of(e.nat_daddr, ifindex),
        ),
        _ => (false, false),
    };
    remember(entry, &route, len.max(known_len), peer, encap);
    match route {
        Route::Direct { ifindex, macs } => {
            if !can_send(ctx, ifindex, peer, encap) {
                return Ok(Outcome::ToTc);
            }
            rewrite(ctx, flow, e, Some(&macs)).map_err(|_| Reason::DropRewrite)?;
            Ok(Outcome::Sent(send::<C>(ifindex, peer)))
        }
        // XDP neither hands frames to the stack rewritten nor answers with ICMP: TC does.
        _ if C::XDP => Ok(Outcome::ToTc),
        Route::Neighbour { ifindex } => {
            rewrite(ctx, flow, e, None).map_err(|_| Reason::DropRewrite)?;
            // SAFETY: the kernel resolves the next hop's MAC itself.
            Ok(Outcome::Sent(
                unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32,
            ))
        }
        // A destination on this node (a host-network backend): the stack delivers it.
        Route::Local => {
            rewrite(ctx, flow, e, None).map_err(|_| Reason::DropRewrite)?;
            Ok(Outcome::Sent(TC_ACT_OK))
        }
        // Too big, don't-fragment set: the client learns the path's MTU in its own addresses.
        Route::TooBig { mtu } if flow.df => match ctx.tc() {
            Some(tc) => icmp_too_big(tc, flow, mtu).map(Outcome::TooBig),
            None => Ok(Outcome::ToTc),
        },
        // Too big, may be fragmented: the stack fragments it on the way.
        Route::TooBig { .. } => {
            rewrite(ctx, flow, e, None).map_err(|_| Reason::DropRewrite)?;
            Ok(Outcome::Sent(TC_ACT_OK))
        }
        Route::None => Err(Reason::DropNoRoute),
    }
}

/// Caches a route in the flow's entry: a redirect with its Ethernet addresses (good for packets
/// up to `max_len` long; into the pod side of the veth with `peer`; wrapped in IP-in-IP on the
/// way out with `encap`) or the local stack;
/// anything else empties the cache, so the next packet looks its route up again.
#[inline(always)]
fn remember(entry: *mut CtEntry, route: &Route, max_len: u16, peer: bool, encap: bool) {
    // SAFETY: `entry` comes from a successful lookup; only the cache fields are written, the
    // flags last (a reader that sees them set finds the rest written on this CPU or another's
    // identical lookup).
    unsafe {
        match *route {
            Route::Direct { ifindex, macs } => {
                (*entry).fwd_ifindex = ifindex;
                (*entry).fwd_macs = macs;
                (*entry).fwd_max_len = max_len;
                let mut flags = fwd_flags::DIRECT;
                if peer {
                    flags |= fwd_flags::PEER;
                }
                if encap {
                    flags |= fwd_flags::ENCAP;
                }
                (*entry).fwd_flags = flags;
            }
            Route::Local => (*entry).fwd_flags = fwd_flags::LOCAL,
            _ => (*entry).fwd_flags = 0,
        }
    }
}

/// Rewrites addresses and ports (and the Ethernet addresses when `macs` is given), keeping the
/// IP and L4 checksums right. The packet is written directly and the IP checksum updated in
/// place; the L4 checksum takes one diff for the addresses (through the pseudo-header, which
/// also keeps a receive checksum and an offloaded checksum right) and one for the ports, with
/// the kernel's helper, which knows the packet's checksum state. A later fragment has no L4
/// header: only its addresses and IP checksum change (the datagram's L4 checksum, in its first
/// fragment, already took the new addresses in).
#[inline(always)]
pub(crate) fn rewrite<C: Hooked>(
    ctx: &C,
    flow: &Flow,
    e: &CtEntry,
    macs: Option<&[u8; 12]>,
) -> Result<(), i64> {
    let ip = ctx.header_mut::<Ipv4Hdr>(ETH_HLEN).ok_or(-1i64)?;
    let mut addrs = 0u32;
    // SAFETY: `header_mut` checked that a whole IPv4 header lies in the writable frame; fields
    // are accessed unaligned.
    unsafe {
        if e.nat_saddr != flow.saddr {
            addrs += csum_diff32(flow.saddr, e.nat_saddr);
            addr_of_mut!((*ip).saddr).write_unaligned(e.nat_saddr);
        }
        if e.nat_daddr != flow.daddr {
            addrs += csum_diff32(flow.daddr, e.nat_daddr);
            addr_of_mut!((*ip).daddr).write_unaligned(e.nat_daddr);
        }
        if addrs != 0 {
            let check = addr_of_mut!((*ip).check);
            check.write_unaligned(csum_apply(check.read_unaligned(), addrs));
        }
    }
    let mut ports = 0u32;
    if flow.has_l4 {
        let p = ctx.header_mut::<[u16; 2]>(flow.l4_off).ok_or(-1i64)?;
        // SAFETY: as above, for the four port bytes.
        unsafe {
            if e.nat_sport != flow.sport {
                ports += csum_diff16(flow.sport, e.nat_sport);
                addr_of_mut!((*p)[0]).write_unaligned(e.nat_sport);
            }
            if e.nat_dport != flow.dport {
                ports += csum_diff16(flow.dport, e.nat_dport);
                addr_of_mut!((*p)[1]).write_unaligned(e.nat_dport);
            }
        }
    }
    if let Some(macs) = macs {
        let eth = ctx.header_mut::<[u8; 12]>(0).ok_or(-1i64)?;
        // SAFETY: as above, for the two Ethernet addresses.
        unsafe { eth.write_unaligned(*macs) };
    }
    if !flow.has_l4 {
        return Ok(());
    }
    // The helpers change the packet: no pointer into it is used after this point.
    let udp = flow.proto != proto::TCP;
    let csum_off = if udp {
        flow.l4_off + 6
    } else {
        flow.l4_off + 16
    };
    if C::XDP {
        // One update of the checksum in the frame for both kinds of change.
        if addrs | ports != 0 {
            ctx.l4_checksum(csum_off, addrs + ports, true, udp)?;
        }
        return Ok(());
    }
    if addrs != 0 {
        ctx.l4_checksum(csum_off, addrs, true, udp)?;
    }
    if ports != 0 {
        ctx.l4_checksum(csum_off, ports, false, udp)?;
    }
    Ok(())
}
