//! The uplink's hooks: ingress (decapsulate IP-in-IP from the cluster's nodes, translate
//! NodePort, LoadBalancer and externalIP flows from outside and the replies of SNATed ones,
//! hand tunnelled packets to their pod), egress (translate back the replies of host-network
//! backends, then encapsulate what goes to another node's pods), and XDP (when enabled: the
//! same translation of flows from outside, for the packets it can send back out of the uplink
//! itself, before the kernel allocates an skb for them).

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect_neigh,
    programs::{TcContext, XdpContext},
};
use ferrox_abi::{
    EndpointKey, Hook, Reason, ServiceKey, Verdict, ct_flags, endpoint_flags, pod_mac, scope,
};

use crate::{
    classify::classify,
    conntrack::{Origin, new_flow, touch, tracked},
    counters::count,
    fib::send,
    flow::{Flow, Parsed, action_of, flow_dropped, parse, untranslated},
    icmp::icmp,
    maps::{CONFIG_V1, ENDPOINTS_V1, SVC_V1},
    nat::rewrite,
    packet::{Frame as _, Hooked, IP_DADDR_OFF},
    policy::{self, Sides},
    tunnel,
};

/// Uplink ingress: decapsulate IP-in-IP from the cluster's nodes, then translate external flows
/// and the replies of SNATed ones. A decapsulated packet is counted twice: as `tunnel-decap`,
/// then by what happened to the inner packet.
#[inline(always)]
pub(crate) fn uplink_ingress(ctx: &TcContext) -> i32 {
    let decapsulated = match tunnel::decap(ctx) {
        tunnel::Decap::NotTunnel => false,
        tunnel::Decap::Done => {
            count(Hook::TcUplinkIngress, Reason::TunnelDecap, ctx.len());
            true
        }
        tunnel::Decap::Drop(r) => {
            count(Hook::TcUplinkIngress, r, ctx.len());
            return TC_ACT_SHOT;
        }
    };
    let (reason, mut action) = match parse(ctx) {
        Parsed::Other(r) => policy::other_l4(
            ctx,
            Hook::TcUplinkIngress,
            Sides::Both,
            r,
            action_of::<TcContext>(r),
        ),
        // Unwrapped traffic is between pods (only pod blocks are reached in IP-in-IP): its
        // destination is never a frontend, so only a flow translated elsewhere (whose reply
        // this may be) is looked up, no service.
        Parsed::Flow(flow) => {
            let (r, a) = if decapsulated {
                tracked(ctx, &flow, Hook::TcUplinkIngress)
                    .unwrap_or_else(|| untranslated::<TcContext>(&flow))
            } else {
                uplink_flow(ctx, &flow, Origin::Uplink)
            };
            // Into a local pod untranslated: its ingress policy (a translated flow was judged
            // by the translation).
            policy::untranslated_flow(Hook::TcUplinkIngress, Sides::Both, &flow, r, a)
        }
        Parsed::Icmp(m) => {
            let (r, a) = icmp(ctx, &m);
            policy::untranslated_icmp(ctx, Hook::TcUplinkIngress, Sides::Both, &m, r, a)
        }
    };
    if decapsulated && action == TC_ACT_UNSPEC {
        action = to_local_pod(ctx);
    }
    count(Hook::TcUplinkIngress, reason, ctx.len());
    action
}

/// A TCP/UDP packet from outside (at TC, or at XDP: `origin` says which): a packet of a tracked
/// flow, or the first of a flow to an external frontend, is translated; anything else passes.
#[inline(always)]
pub(crate) fn uplink_flow<C: Hooked + EbpfContext>(
    ctx: &C,
    flow: &Flow,
    origin: Origin,
) -> (Reason, i32) {
    if let Some(done) = tracked(ctx, flow, origin.hook()) {
        return done;
    }
    if !flow.has_l4 {
        return untranslated::<C>(flow);
    }
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::EXTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated::<C>(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, origin) {
        Ok(outcome) => outcome.counted::<C>(Reason::NatNewFlow),
        Err(r) => {
            flow_dropped(origin.hook(), r, flow);
            (r, C::DROP)
        }
    }
}

/// The uplink's XDP program: flows from outside to NodePort, LoadBalancer and externalIP
/// frontends, and the replies of flows it SNATed, translated with the maps and conntrack TC
/// uses and sent back out of the uplink (`XDP_TX`) when their route leads there unwrapped (a
/// backend or client reached through the uplink directly). Everything else passes to TC
/// unchanged: IP-in-IP (TC unwraps it), ICMP (errors are translated there), flows into a local
/// pod, to the host or through the tunnel (counted `to-tc`: TC finds their entry, created here
/// for a new flow, and the route cached in it). A frame off the wire carries its whole L4
/// checksum, which is updated in the frame.
#[inline(always)]
pub fn uplink_xdp(ctx: &XdpContext) -> u32 {
    let (reason, action) = match parse(ctx) {
        Parsed::Other(r) => (r, action_of::<XdpContext>(r)),
        Parsed::Flow(flow) => uplink_flow(ctx, &flow, Origin::XdpUplink),
        Parsed::Icmp(_) => (Reason::PassIcmp, XdpContext::PASS),
    };
    count(Hook::XdpUplink, reason, ctx.frame_len() as u32);
    action as u32
}

/// A decapsulated packet nothing translated: straight into its pod when it is for a pod of this
/// node, else to the stack. A pod registered with `endpoint_flags::PEER` gets it in its own side
/// of the veth, addressed to its MAC (known from its address); any other out of its host veth,
/// whose neighbour the kernel resolves.
#[inline(always)]
pub(crate) fn to_local_pod(ctx: &TcContext) -> i32 {
    let Ok(daddr) = ctx.load::<u32>(IP_DADDR_OFF) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: hash map values are read once, by copy.
    let Some(ep) = (unsafe { ENDPOINTS_V1.get(&EndpointKey { addr: daddr }) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if ep.flags & endpoint_flags::PEER != 0
        && let Some(dst) = ctx.header_mut::<[u8; 6]>(0)
    {
        // SAFETY: `header_mut` checked that the six bytes lie inside the frame.
        unsafe { dst.write_unaligned(pod_mac(daddr)) };
        return send::<TcContext>(ep.ifindex, true);
    }
    // SAFETY: the kernel resolves the pod's MAC itself.
    unsafe { bpf_redirect_neigh(ep.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Uplink egress: a reply from a host-network backend of this node (its source is the node's
/// own address) to a client that reached it through a frontend is translated back, before it
/// leaves (the per-packet path delivered the client's packets to the host's stack, whose
/// replies leave here). `None`: not such a reply, the packet is left as it is.
#[inline(always)]
pub(crate) fn host_reply(ctx: &TcContext) -> Option<Reason> {
    let Parsed::Flow(flow) = parse(ctx) else {
        return None;
    };
    let node = CONFIG_V1.get(0).map_or(0, |c| c.node_addr);
    if node == 0 || flow.saddr != node {
        return None;
    }
    let entry = crate::ct_map::lookup(&flow.key())?;
    // SAFETY: the pointer comes from a successful lookup; the entry is read by copy.
    let e = unsafe { *entry };
    if e.flags & ct_flags::REPLY == 0 {
        return None;
    }
    let _ = touch(entry, e.last_seen_ns);
    Some(match rewrite(ctx, &flow, &e, None) {
        Ok(()) if flow.has_l4 => Reason::NatReply,
        Ok(()) => Reason::NatFragment,
        Err(_) => Reason::DropRewrite,
    })
}

/// Uplink egress: encapsulate packets to remote pod blocks; everything else passes.
#[inline(always)]
pub fn uplink_egress(ctx: &TcContext) -> i32 {
    let reason = classify(ctx);
    let (reason, action) = match reason.verdict() {
        Verdict::Drop => (reason, TC_ACT_SHOT),
        _ if reason == Reason::PassNotIpv4 => (reason, TC_ACT_UNSPEC),
        // A host-network backend's reply, translated back first.
        _ => match host_reply(ctx) {
            Some(r) if r.verdict() == Verdict::Drop => (r, TC_ACT_SHOT),
            Some(r) => (r, tunnel::encap(ctx, r).1),
            None => tunnel::encap(ctx, reason),
        },
    };
    count(Hook::TcUplinkEgress, reason, ctx.len());
    action
}
