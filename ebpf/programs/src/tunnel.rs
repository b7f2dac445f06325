//! IP-in-IP between nodes, done here because the node needs no `ipip` device for it.
//!
//! Encapsulation happens at the uplink's TC egress, for every packet leaving the node: one whose
//! destination falls in a remote pod block of `TUNNEL_V1` gets an outer IPv4 header (protocol 4)
//! from this node's address to the block's node. The kernel route of the block (installed by
//! the agent, with an MTU 20 bytes below the uplink's) already picked the right next hop (the
//! remote node itself, or the router towards it), so the Ethernet header stays as it is. Pod
//! traffic, host traffic and packets the per-packet NAT redirected all leave through this hook.
//!
//! Decapsulation happens at the uplink's TC ingress, before service translation, and only for
//! IP-in-IP addressed to this node from an address in `NODES_V1`: anything else is dropped and
//! counted, so nobody outside the cluster can slip packets to a pod through the tunnel. The
//! inner packet then goes through the uplink's usual processing (replies of translated flows are
//! translated back), and, addressed to a pod of this node, is handed straight to the pod (into
//! its side of the veth with `bpf_redirect_peer` where the pod allows it: `uplink::to_local_pod`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_check_mtu,
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use ferrox_abi::{
    Hook, IPIP_OVERHEAD, IPPROTO_IPIP, Reason, TunnelKey, node_flags, proto, tunnel_flags,
};

use crate::{
    maps::{CONFIG_V1, NODES_V1, TUNNEL_V1},
    packet::{ETH_HLEN, Frame as _, Ipv4Hdr, ipv4_checksum},
};

/// `frag_off` bits, network byte order as read from the packet.
const IP_DF_BE: u16 = 0x4000u16.to_be();
const IP_MF_OFFSET_BE: u16 = 0x3fffu16.to_be();
const OUTER_TTL: u8 = 64;

/// The node's own address, network byte order (0 when the agent has not said yet).
#[inline(always)]
fn node_addr() -> u32 {
    CONFIG_V1.get(0).map_or(0, |c| c.node_addr)
}

#[inline(always)]
pub fn encap(ctx: &TcContext, reason: Reason) -> (Reason, i32) {
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return (reason, TC_ACT_UNSPEC);
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    if ip.proto == IPPROTO_IPIP {
        // Already a tunnel packet (ours, or one the host sends itself): never wrap twice.
        return (reason, TC_ACT_UNSPEC);
    }
    let key = LpmKey::new(32, TunnelKey { addr: ip.daddr });
    let Some(tunnel) = TUNNEL_V1.get(&key).copied() else {
        return (reason, TC_ACT_UNSPEC);
    };
    if tunnel.flags & tunnel_flags::IPIP == 0 {
        return (reason, TC_ACT_UNSPEC);
    }
    let source = node_addr();
    if source == 0 || tunnel.remote == 0 {
        return (Reason::DropTunnelEncap, TC_ACT_SHOT);
    }
    let inner_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    // Room for the outer header between the Ethernet and the inner IP header; the kernel marks
    // GSO packets as IP-in-IP. A GSO packet whose segments still fit the uplink with the outer
    // header (a pod's or the host's own traffic: their MTU and routes leave the room) keeps its
    // segment size; one whose segments would not (forwarded traffic sized for the uplink) gets
    // it lowered by the header, and if that cannot be (UDP GSO, frag lists) keeps it. The
    // checksum state is kept: IP-in-IP has no outer checksum to invalidate it.
    let grow = IPIP_OVERHEAD as i32;
    let mut flags =
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) | u64::from(BPF_F_ADJ_ROOM_NO_CSUM_RESET);
    if segments_fit(ctx, &ip) {
        flags |= u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    }
    if ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags).is_err()
        && ctx
            .adjust_room(
                grow,
                BPF_ADJ_ROOM_MAC,
                flags ^ u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
            )
            .is_err()
    {
        return (Reason::DropTunnelEncap, TC_ACT_SHOT);
    }
    let tot_len = (inner_len + IPIP_OVERHEAD).min(u32::from(u16::MAX)) as u16;
    let mut outer = Ipv4Hdr {
        version_ihl: 0x45,
        tos: ip.tos,
        tot_len: tot_len.to_be(),
        // The inner packet's identification: it increases per packet of a flow (and per
        // segment of a GSO packet, which the kernel applies to the outer header too), which is
        // what GRO on the receiving side needs to merge the tunnelled segments.
        id: ip.id,
        // Don't-fragment follows the inner packet, so path-MTU discovery keeps working.
        frag_off: ip.frag_off & IP_DF_BE,
        ttl: OUTER_TTL,
        proto: IPPROTO_IPIP,
        check: 0,
        saddr: source,
        daddr: tunnel.remote,
    };
    outer.check = ipv4_checksum(&outer);
    // Written in place where the room lies in the linear data (as it does: the kernel makes it
    // there), with the helper otherwise.
    match ctx.header_mut::<Ipv4Hdr>(ETH_HLEN) {
        // SAFETY: `header_mut` checked that a whole `Ipv4Hdr` lies in the writable frame.
        Some(p) => unsafe { p.write_unaligned(outer) },
        None => {
            if ctx.store(ETH_HLEN, &outer, 0).is_err() {
                return (Reason::DropTunnelEncap, TC_ACT_SHOT);
            }
        }
    }
    (Reason::TunnelEncap, TC_ACT_UNSPEC)
}

/// Whether `daddr` lies in a remote pod block reached in IP-in-IP (one [`encap`] wraps).
#[inline(always)]
pub fn reached_in_ipip(daddr: u32) -> bool {
    TUNNEL_V1
        .get(&LpmKey::new(32, TunnelKey { addr: daddr }))
        .is_some_and(|t| t.flags & tunnel_flags::IPIP != 0)
}

/// Whether each segment of this GSO packet still fits the interface with the outer header (true
/// for a packet that is not GSO).
#[inline(always)]
fn segments_fit(ctx: &TcContext, ip: &Ipv4Hdr) -> bool {
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    let gso_size = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size };
    gso_size == 0 || fits_wrapped(ctx, 0, ip)
}

/// Whether the packet (each of its segments, for a GSO packet: its segment size plus the inner
/// headers) still fits the MTU of interface `ifindex` (0: the packet's own device) with the
/// outer header added.
#[inline(always)]
pub fn fits_wrapped(ctx: &TcContext, ifindex: u32, ip: &Ipv4Hdr) -> bool {
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    let gso_size = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size };
    let ihl = u32::from(ip.version_ihl & 0x0f) * 4;
    let l3 = if gso_size == 0 {
        u32::from(u16::from_be(ip.tot_len))
    } else {
        let l4_hdr = match ip.proto {
            proto::TCP => match ctx.header::<[u8; 2]>(ETH_HLEN + ihl as usize + 12) {
                // SAFETY: `header` checked that both bytes lie inside the frame.
                Some(p) => u32::from(unsafe { (*p)[0] } >> 4) * 4,
                None => return false,
            },
            proto::UDP => 8,
            _ => return false,
        };
        gso_size + ihl + l4_hdr
    };
    // The device's MTU, as the helper reports it back (its own verdict is no use here: it
    // passes any GSO packet whatever its segments).
    let mut mtu = 1u32;
    // SAFETY: `mtu` is a valid in/out argument.
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &raw mut mtu, 0, 0) };
    rc >= 0 && l3 + IPIP_OVERHEAD <= mtu
}

/// What [`decap`] did.
pub enum Decap {
    /// Not IP-in-IP for this node: process the packet as it is.
    NotTunnel,
    /// The outer header is gone; process the inner packet.
    Done,
    /// Dropped for this reason.
    Drop(Reason),
}

/// Uplink ingress, before anything else: strip the outer header of IP-in-IP from a node.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> Decap {
    if !ctx.is_ipv4() {
        return Decap::NotTunnel;
    }
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return Decap::NotTunnel;
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    if ip.proto != IPPROTO_IPIP || ip.version_ihl >> 4 != 4 {
        return Decap::NotTunnel;
    }
    let local = node_addr();
    if local == 0 || ip.daddr != local {
        return Decap::NotTunnel;
    }
    // SAFETY: hash map values are read once, by copy.
    let known =
        unsafe { NODES_V1.get(&ip.saddr) }.is_some_and(|n| n.flags & node_flags::TUNNEL_PEER != 0);
    if !known {
        crate::events::drop(
            Hook::TcUplinkIngress,
            Reason::DropTunnelSource,
            IPPROTO_IPIP,
            ip.saddr,
            0,
            ip.daddr,
            0,
        );
        return Decap::Drop(Reason::DropTunnelSource);
    }
    if ip.frag_off & IP_MF_OFFSET_BE != 0 {
        // The encapsulating node never fragments the outer packet (it keeps the inner one
        // below the path MTU); a fragment means something in between did, and TC cannot
        // reassemble.
        return Decap::Drop(Reason::DropTunnelMalformed);
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Decap::Drop(Reason::DropTunnelMalformed);
    }
    // Read in place behind an outer header without options (the usual one), else copied out
    // with a helper (the verifier cannot follow a variable offset).
    let inner_version = if ihl == 20 {
        // SAFETY: `header` checked that the byte lies inside the frame.
        ctx.header::<u8>(ETH_HLEN + 20)
            .map_or(0, |b| unsafe { *b } >> 4)
    } else {
        ctx.load::<u8>(ETH_HLEN + ihl).map_or(0, |b| b >> 4)
    };
    if inner_version != 4 {
        return Decap::Drop(Reason::DropTunnelMalformed);
    }
    // The inner packet keeps its segment size and checksum state (the outer header had no
    // checksum of its own); its GSO type loses the tunnel bit where the kernel knows how (6.3+,
    // else without).
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO) | u64::from(BPF_F_ADJ_ROOM_NO_CSUM_RESET);
    let shrink = -(ihl as i32);
    if ctx
        .adjust_room(
            shrink,
            BPF_ADJ_ROOM_MAC,
            flags | u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
        )
        .is_err()
        && ctx.adjust_room(shrink, BPF_ADJ_ROOM_MAC, flags).is_err()
    {
        return Decap::Drop(Reason::DropTunnelMalformed);
    }
    Decap::Done
}
