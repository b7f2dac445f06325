//! The pod's receiving hook (TC egress of a pod's host-side veth, packets the host hands to
//! the pod): the pod's ingress NetworkPolicy for whatever reaches it through the host, whoever
//! sent it (a local pod forwarded by the stack, a host process, an interface the datapath does
//! not hook). What the datapath hands straight into a pod (`bpf_redirect_peer`) skips this hook
//! and was judged, both sides, by the hook that handed it over.
//!
//! A pod no policy isolates costs one array read (the address filter) past the Ethernet type.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use ferrox_abi::{Hook, Reason};

use crate::{
    counters::count,
    flow::{Parsed, action_of, parse, untranslated},
    packet::{Frame as _, IP_DADDR_OFF},
    policy::{self, Sides},
};

/// Pod veth egress (packets into a pod): its ingress policy, judged as the pod receives the
/// packet. Nothing is translated here: every translation happened before the host routed it.
#[inline(always)]
pub(crate) fn to_pod(ctx: &TcContext) -> i32 {
    let (reason, action) = verdict(ctx);
    count(Hook::TcToPod, reason, ctx.len());
    action
}

#[inline(always)]
fn verdict(ctx: &TcContext) -> (Reason, i32) {
    if !ctx.is_ipv4() {
        return (Reason::PassNotIpv4, TC_ACT_UNSPEC);
    }
    if let Some(daddr) = ctx.header::<u32>(IP_DADDR_OFF) {
        // SAFETY: `header` checked that the four bytes lie inside the frame.
        if !policy::maybe_isolated(unsafe { daddr.read_unaligned() }) {
            return (Reason::PassPodNotIsolated, TC_ACT_UNSPEC);
        }
    }
    let hook = Hook::TcToPod;
    match parse(ctx) {
        Parsed::Other(r) => {
            policy::other_l4(ctx, hook, Sides::Receiver, r, action_of::<TcContext>(r))
        }
        Parsed::Icmp(m) => policy::untranslated_icmp(
            ctx,
            hook,
            Sides::Receiver,
            &m,
            Reason::PassIcmp,
            TC_ACT_UNSPEC,
        ),
        Parsed::Flow(flow) => {
            let (r, a) = untranslated::<TcContext>(&flow);
            policy::untranslated_flow(hook, Sides::Receiver, &flow, r, a)
        }
    }
}
