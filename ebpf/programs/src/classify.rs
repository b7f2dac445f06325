//! Classification of packets at TC: which family, which L4 protocol, whether the IPv4 header is
//! sound. For now every sound packet passes; a malformed IPv4 header is dropped and counted.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use ferrox_abi::{Hook, Reason, Verdict, proto};

use crate::{
    counters::count,
    packet::{ETH_HLEN, ETH_P_IP_BE, IP_OFFSET, IPV4_MIN_HLEN, Ipv4Hdr, header_at},
};

/// Classifies the packet, counts it, and returns the TC verdict. "Pass" is `TC_ACT_UNSPEC`
/// (TCX_NEXT): the packet goes on to any later TCX program, then to the stack.
#[inline(always)]
pub fn classify_and_pass(ctx: &TcContext, hook: Hook) -> i32 {
    let reason = classify(ctx);
    count(hook, reason, ctx.len());
    match reason.verdict() {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Translate => TC_ACT_UNSPEC,
    }
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Reason {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return Reason::PassNotIpv4;
    }
    let Some(ip) = header_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Reason::DropMalformedIpv4;
    };
    // SAFETY: `header_at` checked that a whole `Ipv4Hdr` lies inside the packet.
    let ip = unsafe { *ip };
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    let l3_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl || tot_len > l3_len {
        return Reason::DropMalformedIpv4;
    }
    let frag = u16::from_be(ip.frag_off);
    if frag & IP_OFFSET != 0 {
        // Not the first fragment: no L4 header to look at.
        return Reason::PassIpv4Fragment;
    }
    match ip.proto {
        proto::TCP => Reason::PassTcp,
        proto::UDP => Reason::PassUdp,
        proto::ICMP => Reason::PassIcmp,
        _ => Reason::PassOtherL4,
    }
}
