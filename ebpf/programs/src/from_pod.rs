//! The pod-facing hook (TC ingress of a pod's host-side veth, packets leaving the pod):
//! replies of flows a local backend serves, the fallback for what the socket hooks cannot
//! see — a new flow leaving a pod still addressed to a Service — and pod traffic to another
//! node's pod block reached in IP-in-IP, sent straight to the uplink.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect_neigh,
    programs::TcContext,
};
use ferrox_abi::{Hook, Reason, ServiceKey, scope};

use crate::{
    conntrack::{Origin, new_flow, tracked},
    counters::count,
    flow::{Flow, Parsed, action_of, flow_dropped, parse, untranslated},
    icmp::icmp,
    maps::{CONFIG_V1, SVC_V1},
    packet::{ETH_HLEN, Frame as _, Ipv4Hdr},
    policy::{self, Sides},
    tunnel::{fits_wrapped, reached_in_ipip},
};

/// Pod veth ingress (packets leaving a pod): translate replies of flows a local backend serves
/// and new flows to Services the socket hooks did not translate; send what goes to a remote
/// pod block reached in IP-in-IP straight out of the uplink.
#[inline(always)]
pub(crate) fn from_pod(ctx: &TcContext) -> i32 {
    let (reason, action, daddr) = match parse(ctx) {
        Parsed::Other(r) => {
            let (r, a) = policy::other_l4(
                ctx,
                Hook::TcFromPod,
                Sides::Both,
                r,
                action_of::<TcContext>(r),
            );
            (r, a, 0)
        }
        Parsed::Icmp(m) => {
            let (r, a) = icmp(ctx, &m);
            let (r, a) = policy::untranslated_icmp(ctx, Hook::TcFromPod, Sides::Both, &m, r, a);
            (r, a, m.daddr)
        }
        Parsed::Flow(flow) => {
            let (r, a) = match tracked(ctx, &flow, Hook::TcFromPod) {
                Some(done) => done,
                None => pod_flow(ctx, &flow),
            };
            // The pod's egress policy, and a local destination's ingress policy (a translated
            // flow was judged by the translation).
            let (r, a) = policy::untranslated_flow(Hook::TcFromPod, Sides::Both, &flow, r, a);
            (r, a, flow.daddr)
        }
    };
    if action == TC_ACT_UNSPEC
        && daddr != 0
        && let Some(sent) = to_remote_block(ctx, daddr)
    {
        count(Hook::TcFromPod, Reason::PodToTunnel, ctx.len());
        return sent;
    }
    count(Hook::TcFromPod, reason, ctx.len());
    action
}

/// A packet the pod sends to a pod block of another node reached in IP-in-IP, which nothing
/// translated: redirected to the uplink's egress (where it is wrapped) with the kernel
/// resolving the next hop, instead of a pass through the host's IP input and forwarding.
/// `None`: not such a packet, it goes to the host's stack; also when it would not fit the
/// uplink once wrapped (a pod whose MTU was raised by hand): the stack then answers it as the
/// block's route says (fragmentation needed, so the sender learns the path's MTU).
#[inline(always)]
fn to_remote_block(ctx: &TcContext, daddr: u32) -> Option<i32> {
    if !reached_in_ipip(daddr) {
        return None;
    }
    let uplink = CONFIG_V1.get(0).map_or(0, |c| c.uplink_ifindex);
    if uplink == 0 {
        return None;
    }
    let ip = ctx.header::<Ipv4Hdr>(ETH_HLEN)?;
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    if !fits_wrapped(ctx, uplink, &unsafe { ip.read_unaligned() }) {
        return None;
    }
    // SAFETY: the kernel looks the route to the packet's destination up on the uplink and
    // resolves its next hop itself.
    Some(unsafe { bpf_redirect_neigh(uplink, core::ptr::null_mut(), 0, 0) } as i32)
}

/// The fallback for what the socket hooks cannot see: a new flow leaving a pod still addressed
/// to a Service (its process is outside the cgroup the hooks are attached to, or the pod
/// forwards packets it did not originate, as a VM behind a pod interface or a router pod does).
/// It is translated per packet with the frontend's internal backends, chosen at random as the
/// socket hooks would. A packet the hooks did translate is addressed to a backend and passes.
#[inline(always)]
pub(crate) fn pod_flow(ctx: &TcContext, flow: &Flow) -> (Reason, i32) {
    if !flow.has_l4 {
        // A later fragment of a datagram its first fragment did not translate.
        return untranslated::<TcContext>(flow);
    }
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::INTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated::<TcContext>(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, Origin::Pod) {
        Ok(outcome) => outcome.counted::<TcContext>(Reason::NatNewFlow),
        Err(r) => {
            flow_dropped(Hook::TcFromPod, r, flow);
            (r, TC_ACT_SHOT)
        }
    }
}
