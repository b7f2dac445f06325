//! Per-packet translation: a packet of a tracked flow is routed, then rewritten (addresses,
//! ports, checksums) as its conntrack entry says and sent on. Translated packets are forwarded
//! with a FIB lookup and a redirect, not handed to the stack: a packet whose source became this
//! node's own address would be dropped by the stack as a martian.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use ferrox_abi::{CtEntry, Reason, proto};

use crate::{
    fib::{Fib, Route, path_len, route},
    flow::Flow,
    icmp::icmp_too_big,
    packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

/// What became of a packet given to [`translate`]: sent on translated (with this action), or
/// answered with an ICMP fragmentation-needed instead (with this action).
pub(crate) enum Outcome {
    Sent(i32),
    TooBig(i32),
}

impl Outcome {
    /// The reason to count: `translated` when it was, else the too-big drop; and the action.
    #[inline(always)]
    pub(crate) fn counted(self, translated: Reason) -> (Reason, i32) {
        match self {
            Self::Sent(a) => (translated, a),
            Self::TooBig(a) => (Reason::DropTooBig, a),
        }
    }
}

/// Routes the translated packet, then rewrites it as `e` says and sends it on. The route is
/// looked up first: a packet that does not fit its path is answered before anything was
/// rewritten, so the client gets an error it can match. A function of its own (a BPF-to-BPF
/// call), which keeps the callers' stacks within the kernel's limit.
#[inline(never)]
pub(crate) fn translate(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<Outcome, Reason> {
    let to = Fib {
        proto: flow.proto,
        saddr: e.nat_saddr,
        daddr: e.nat_daddr,
        sport: e.nat_sport,
        dport: e.nat_dport,
        tot_len: path_len(ctx, flow.tot_len),
    };
    match route(ctx, &to) {
        Route::Direct { ifindex, macs } => {
            rewrite(ctx, flow, e).map_err(|_| Reason::DropRewrite)?;
            ctx.store(0, &macs, 0).map_err(|_| Reason::DropRewrite)?;
            // SAFETY: redirecting to the interface the lookup chose.
            Ok(Outcome::Sent(unsafe { bpf_redirect(ifindex, 0) } as i32))
        }
        Route::Neighbour { ifindex } => {
            rewrite(ctx, flow, e).map_err(|_| Reason::DropRewrite)?;
            // SAFETY: the kernel resolves the next hop's MAC itself.
            Ok(Outcome::Sent(
                unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32,
            ))
        }
        // A destination on this node (a host-network backend): the stack delivers it.
        Route::Local => {
            rewrite(ctx, flow, e).map_err(|_| Reason::DropRewrite)?;
            Ok(Outcome::Sent(TC_ACT_OK))
        }
        // Too big, don't-fragment set: the client learns the path's MTU in its own addresses.
        Route::TooBig { mtu } if flow.df => icmp_too_big(ctx, flow, mtu).map(Outcome::TooBig),
        // Too big, may be fragmented: the stack fragments it on the way.
        Route::TooBig { .. } => {
            rewrite(ctx, flow, e).map_err(|_| Reason::DropRewrite)?;
            Ok(Outcome::Sent(TC_ACT_OK))
        }
        Route::None => Err(Reason::DropNoRoute),
    }
}

/// Rewrites addresses and ports, keeping the IP and L4 checksums right (incrementally). A later
/// fragment has no L4 header: only its addresses and IP checksum change (the datagram's L4
/// checksum, in its first fragment, already took the new addresses in).
#[inline(always)]
pub(crate) fn rewrite(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<(), i64> {
    let (csum_off, mangled) = if flow.proto == proto::TCP {
        (flow.l4_off + 16, 0)
    } else {
        (flow.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    let l4 = flow.has_l4;
    if e.nat_saddr != flow.saddr {
        if l4 {
            ctx.l4_csum_replace(
                csum_off,
                u64::from(flow.saddr),
                u64::from(e.nat_saddr),
                pseudo | mangled | 4,
            )?;
        }
        ctx.l3_csum_replace(
            IP_CSUM_OFF,
            u64::from(flow.saddr),
            u64::from(e.nat_saddr),
            4,
        )?;
        ctx.store(IP_SADDR_OFF, &e.nat_saddr, 0)?;
    }
    if e.nat_daddr != flow.daddr {
        if l4 {
            ctx.l4_csum_replace(
                csum_off,
                u64::from(flow.daddr),
                u64::from(e.nat_daddr),
                pseudo | mangled | 4,
            )?;
        }
        ctx.l3_csum_replace(
            IP_CSUM_OFF,
            u64::from(flow.daddr),
            u64::from(e.nat_daddr),
            4,
        )?;
        ctx.store(IP_DADDR_OFF, &e.nat_daddr, 0)?;
    }
    if !l4 {
        return Ok(());
    }
    if e.nat_sport != flow.sport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(flow.sport),
            u64::from(e.nat_sport),
            mangled | 2,
        )?;
        ctx.store(flow.l4_off, &e.nat_sport, 0)?;
    }
    if e.nat_dport != flow.dport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(flow.dport),
            u64::from(e.nat_dport),
            mangled | 2,
        )?;
        ctx.store(flow.l4_off + 2, &e.nat_dport, 0)?;
    }
    Ok(())
}
