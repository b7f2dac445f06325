//! The pod-facing hook (TC ingress of a pod's host-side veth, packets leaving the pod):
//! replies of flows a local backend serves, and the fallback for what the socket hooks cannot
//! see — a new flow leaving a pod still addressed to a Service.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use ferrox_abi::{Hook, Reason, ServiceKey, scope};

use crate::{
    conntrack::{Origin, new_flow, tracked},
    counters::count,
    flow::{Flow, Parsed, action_of, flow_dropped, parse, untranslated},
    icmp::icmp,
    maps::SVC_V1,
};

/// Pod veth ingress (packets leaving a pod): translate replies of flows a local backend serves.
#[inline(always)]
pub(crate) fn from_pod(ctx: &TcContext) -> i32 {
    let (reason, action) = match parse(ctx) {
        Parsed::Other(r) => (r, action_of::<TcContext>(r)),
        Parsed::Icmp(m) => icmp(ctx, &m),
        Parsed::Flow(flow) => match tracked(ctx, &flow) {
            Some(done) => done,
            None => pod_flow(ctx, &flow),
        },
    };
    count(Hook::TcFromPod, reason, ctx.len());
    action
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
