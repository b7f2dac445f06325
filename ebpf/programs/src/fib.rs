//! Routing of translated packets: the FIB lookup (with its MTU check, by segment for GSO
//! packets) and the redirect it leads to.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use ferrox_abi::{EndpointKey, Reason, endpoint_flags};

use crate::{
    maps::{CONFIG_V1, ENDPOINTS_V1},
    packet::Hooked,
    tunnel::reached_in_ipip,
};

pub(crate) const AF_INET: u8 = 2;

/// What a FIB lookup needs to know about a translated packet.
pub(crate) struct Fib {
    pub(crate) proto: u8,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// The length the path must carry (0: do not check).
    pub(crate) tot_len: u16,
}

/// Where a translated packet goes.
pub(crate) enum Route {
    /// Out of `ifindex` with these Ethernet addresses (destination, then source).
    Direct {
        ifindex: u32,
        macs: [u8; 12],
    },
    /// Out of `ifindex`; the kernel resolves the next hop's address.
    Neighbour {
        ifindex: u32,
    },
    /// To this node itself.
    Local,
    /// The path's MTU is below the packet's length.
    TooBig {
        mtu: u16,
    },
    None,
}

/// The length a path must carry for this packet: its total length, or 0 for a GSO packet, which
/// the kernel cuts into segments of its own size on the way out (its total length is the
/// aggregate's, not what goes on the wire).
#[inline(always)]
pub(crate) fn path_len<C: Hooked>(ctx: &C, tot_len: u16) -> u16 {
    if ctx.gso() { 0 } else { tot_len }
}

/// Looks the translated packet's route up (and checks its MTU). A function of its own (a
/// BPF-to-BPF call): the lookup's 64-byte request stays off the stack of its callers.
#[inline(never)]
pub(crate) fn route<C: Hooked + EbpfContext>(ctx: &C, to: &Fib) -> Route {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = to.proto;
    p.sport = to.sport;
    p.dport = to.dport;
    p.__bindgen_anon_1.tot_len = to.tot_len;
    p.ifindex = ctx.arrival_ifindex();
    p.__bindgen_anon_3.ipv4_src = to.saddr;
    p.__bindgen_anon_4.ipv4_dst = to.daddr;
    // SAFETY: `p` is a valid request of the size passed; `ctx` is the program's context.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: reading the MAC addresses the lookup filled in.
            let m = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&m.dmac);
            macs[6..].copy_from_slice(&m.smac);
            Route::Direct {
                ifindex: p.ifindex,
                macs,
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::Neighbour { ifindex: p.ifindex },
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::Local,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig {
            // SAFETY: the lookup wrote the MTU into the union on this result.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        _ => Route::None,
    }
}

/// Whether `ifindex`, where the route to `daddr` leads, is the host veth of the local pod with
/// that address, and the pod takes packets straight into its own side (see [`send`]).
#[inline(always)]
pub(crate) fn peer_of(daddr: u32, ifindex: u32) -> bool {
    // SAFETY: hash map values are read once, by copy.
    unsafe { ENDPOINTS_V1.get(&EndpointKey { addr: daddr }) }
        .is_some_and(|ep| ep.ifindex == ifindex && ep.flags & endpoint_flags::PEER != 0)
}

/// Whether the route to `daddr` out of `ifindex` leads through the uplink into a pod block
/// reached in IP-in-IP (the uplink's TC egress wraps such packets). Asked when a route is
/// cached, not per packet.
#[inline(always)]
pub(crate) fn encap_of(daddr: u32, ifindex: u32) -> bool {
    let uplink = CONFIG_V1.get(0).map_or(0, |c| c.uplink_ifindex);
    ifindex == uplink && reached_in_ipip(daddr)
}

/// Whether `ctx`'s hook can itself send a rewritten packet out of `ifindex` (`peer`: into the
/// pod side of that veth; `encap`: the uplink must wrap it first). TC sends anywhere; XDP only
/// back out of the interface the frame came in on, unwrapped (`XDP_TX`).
#[inline(always)]
pub(crate) fn can_send<C: Hooked>(ctx: &C, ifindex: u32, peer: bool, encap: bool) -> bool {
    !C::XDP || (ifindex == ctx.arrival_ifindex() && !peer && !encap)
}

/// Sends a rewritten packet out of `ifindex` (which [`can_send`] allowed); with `peer` (only
/// from an ingress hook, which every caller of the per-packet translation is) straight into
/// the pod side of that veth: no pass through the veth's transmit and the backlog queue, one
/// softirq round less. At XDP: back out of the arrival interface.
#[inline(always)]
pub(crate) fn send<C: Hooked>(ifindex: u32, peer: bool) -> i32 {
    if C::XDP {
        return xdp_action::XDP_TX as i32;
    }
    // SAFETY: redirecting to an interface the FIB lookup chose.
    unsafe {
        if peer {
            bpf_redirect_peer(ifindex, 0) as i32
        } else {
            bpf_redirect(ifindex, 0) as i32
        }
    }
}

/// Sends an ICMP error towards its new destination: FIB lookup, MAC rewrite, redirect.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, to: &Fib) -> Result<i32, Reason> {
    match route(ctx, to) {
        Route::Direct { ifindex, macs } => {
            ctx.store(0, &macs, 0).map_err(|_| Reason::DropRewrite)?;
            // SAFETY: redirecting to the interface the lookup chose.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
        }
        // SAFETY: the kernel resolves the next hop's MAC itself.
        Route::Neighbour { ifindex } => {
            Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        Route::Local | Route::TooBig { .. } => Ok(TC_ACT_OK),
        Route::None => Err(Reason::DropNoRoute),
    }
}
