//! NetworkPolicy per packet: a flow's source, when it is a local pod some policy isolates, must
//! be allowed to send it (egress), and its destination, likewise, to receive it (ingress).
//!
//! A flow is judged once, by its first packet: allowed, it is remembered in `POLICY_CT_V1` as
//! its pod sees it, and every later packet and every reply passes on that entry. A pod isolated
//! in one direction only has all its flows remembered, so that the replies of a flow it opened
//! pass its isolated ingress. A judgement is two longest-prefix lookups (the peer's identity in
//! the ipcache, then the pod's allowing entries, for that identity and for any peer), never a
//! walk over rules. A packet whose addresses are no isolated local pod's costs one array read
//! per address (the filter `POLICY_ON_V1`) and nothing else.
//!
//! Each end sees the flow after the service translation on its side: a pod that sent to a
//! Service is judged against the backend it reached, and a backend sees its client as the
//! translated packet arrives (the node's address when the flow was SNATed). Traffic this node
//! itself sends into its pods (the kubelet's probes) is not judged; nor is a packet from this
//! node's address or the pod gateway arriving through a translation (SNATed NodePort traffic,
//! a pod reaching itself through a Service), as upstream Kubernetes leaves it to the network
//! plugin and kubelet probes must pass.

use aya_ebpf::{bindings::TC_ACT_SHOT, maps::lpm_trie::Key as LpmKey, programs::TcContext};
use ferrox_abi::{
    CtEntry, EndpointKey, Hook, IpcacheKey, POD_GATEWAY, POLICY_ANY_IDENTITY,
    POLICY_CT_NOT_ISOLATED, POLICY_WORLD_IDENTITY, PolicyCtKey, PolicyCtValue, PolicyKey, Reason,
    Verdict, policy_direction, policy_filter_slot, policy_isolation, proto,
};

use crate::{
    flow::{Flow, IcmpPacket, flow_dropped},
    maps::{CONFIG_V1, IPCACHE_V1, POLICY_CT_V1, POLICY_EP_V1, POLICY_ON_V1, POLICY_V1},
    packet::{ETH_HLEN, Frame as _, Ipv4Hdr},
};

/// One end's view of a flow: its addresses and ports as that end sees them, network byte order.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// A packet to judge: its protocol, the flow as its source sent it and as its destination
/// receives it (the same for a packet nothing translates).
#[derive(Clone, Copy)]
pub(crate) struct Judged {
    pub(crate) proto: u8,
    pub(crate) sent: View,
    pub(crate) received: View,
}

impl Judged {
    /// A packet nothing translates.
    #[inline(always)]
    pub(crate) fn untranslated(flow: &Flow) -> Self {
        let v = View {
            saddr: flow.saddr,
            daddr: flow.daddr,
            sport: flow.sport,
            dport: flow.dport,
        };
        Self {
            proto: flow.proto,
            sent: v,
            received: v,
        }
    }
}

/// What a judgement that let the packet go found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// A flow already remembered, or no isolation concerned.
    Passed,
    /// A new flow a policy allowed (counted as [`Reason::PolicyAllowedNew`]).
    NewAllowed,
}

impl Judgement {
    /// Counts an allowed new flow at `hook`.
    #[inline(always)]
    pub(crate) fn count(self, hook: Hook) {
        if self == Self::NewAllowed {
            crate::counters::count(hook, Reason::PolicyAllowedNew, 0);
        }
    }
}

/// Whether `addr` may be an isolated local pod's (the filter's slot is set; a miss is certain).
#[inline(always)]
pub(crate) fn maybe_isolated(addr: u32) -> bool {
    POLICY_ON_V1
        .get(policy_filter_slot(addr))
        .is_some_and(|on| *on != 0)
}

/// Whether policy may concern a packet from `saddr` to `daddr` (else nothing is judged).
#[inline(always)]
pub(crate) fn concerns(saddr: u32, daddr: u32) -> bool {
    maybe_isolated(saddr) || maybe_isolated(daddr)
}

/// [`concerns`] for a packet of a translated flow: its sender and its final destination.
#[inline(always)]
pub(crate) fn concerns_translated(flow: &Flow, entry: *const CtEntry) -> bool {
    // SAFETY: `entry` comes from a successful lookup; the field never changes after creation.
    concerns(flow.saddr, unsafe { (*entry).nat_daddr })
}

/// Which ends of a packet a hook judges: both where it leaves a pod or enters the node (the
/// receiver's side too, for what is handed straight into a pod), the receiver's only where the
/// host hands it to a pod (its sender's, if a local pod, was judged as it left).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sides {
    Both,
    Receiver,
}

/// `Ok` when policy lets the packet go; else the drop reason (its source may not send it, or
/// its destination may not receive it).
#[inline(always)]
pub(crate) fn check(j: &Judged, sides: Sides) -> Result<Judgement, Reason> {
    let concerned = match sides {
        Sides::Both => concerns(j.sent.saddr, j.received.daddr),
        Sides::Receiver => maybe_isolated(j.received.daddr),
    };
    if !concerned {
        return Ok(Judgement::Passed);
    }
    judge(j, sides)
}

/// The ICMP messages judged as flows: echo requests and replies (their identifier stands for
/// both ports, so a reply finds its request's entry) and anything not an error. Errors (about a
/// flow that passed) go through, as the kernel's conntrack lets related errors through.
#[inline(always)]
pub(crate) fn check_icmp(
    ctx: &TcContext,
    m: &IcmpPacket,
    sides: Sides,
) -> Result<Judgement, Reason> {
    let Ok(head) = ctx.load::<[u8; 8]>(m.l4_off) else {
        return Ok(Judgement::Passed);
    };
    let id = match head[0] {
        // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
        3 | 4 | 5 | 11 | 12 => return Ok(Judgement::Passed),
        // Echo reply and request.
        0 | 8 => u16::from_ne_bytes([head[4], head[5]]),
        _ => 0,
    };
    let v = View {
        saddr: m.saddr,
        daddr: m.daddr,
        sport: id,
        dport: id,
    };
    check(
        &Judged {
            proto: proto::ICMP,
            sent: v,
            received: v,
        },
        sides,
    )
}

/// A packet of a translated flow (its conntrack entry `entry`), before it is translated, at TC
/// (XDP sends nothing into or out of a local pod): its sender sees it as it is, its receiver as
/// it will be, so each end remembers the flow as its socket sees it (a pod whose packets to a
/// Service are translated per packet remembers the frontend, which its replies come from);
/// each end is judged against the real other end (a client against the backend it reached, a
/// backend against its client). A function of its own (a BPF-to-BPF call next to the
/// translation's, not under it: the stack allows two levels).
#[inline(never)]
pub(crate) fn translated(flow: &Flow, entry: *const CtEntry) -> Result<Judgement, Reason> {
    // SAFETY: `entry` comes from a successful lookup; the fields read never change after the
    // entry is created.
    let received = unsafe {
        View {
            saddr: (*entry).nat_saddr,
            daddr: (*entry).nat_daddr,
            sport: (*entry).nat_sport,
            dport: (*entry).nat_dport,
        }
    };
    judged(&Judged {
        proto: flow.proto,
        sent: View {
            saddr: flow.saddr,
            sport: flow.sport,
            daddr: flow.daddr,
            dport: flow.dport,
        },
        received,
    })
}

/// The checks of `sides`. Functions of their own (BPF-to-BPF calls): the per-packet paths that
/// call them keep their stacks.
#[inline(always)]
fn judge(j: &Judged, sides: Sides) -> Result<Judgement, Reason> {
    match sides {
        Sides::Both => judge_both(j),
        Sides::Receiver => judge_receiver(j),
    }
}

#[inline(never)]
fn judge_both(j: &Judged) -> Result<Judgement, Reason> {
    judged(j)
}

#[inline(never)]
fn judge_receiver(j: &Judged) -> Result<Judgement, Reason> {
    ingress_side(j)
}

#[inline(always)]
fn judged(j: &Judged) -> Result<Judgement, Reason> {
    let egress = egress_side(j)?;
    let ingress = ingress_side(j)?;
    Ok(
        if egress == Judgement::NewAllowed || ingress == Judgement::NewAllowed {
            Judgement::NewAllowed
        } else {
            Judgement::Passed
        },
    )
}

/// The sender's side: remembered as it sent the packet, judged against the real destination
/// and its port (the backend a Service translated to).
#[inline(always)]
fn egress_side(j: &Judged) -> Result<Judgement, Reason> {
    let (s, r) = (&j.sent, &j.received);
    side(
        &Side {
            pod: s.saddr,
            pod_port: s.sport,
            peer: s.daddr,
            peer_port: s.dport,
            who: r.daddr,
            port: r.dport,
            direction: policy_direction::EGRESS,
        },
        j.proto,
        false,
    )
}

/// The receiver's side: remembered as it receives the packet, judged against the real source
/// (the client a translation hid) and its own port. Packets from this node's address or the pod
/// gateway pass (kubelet probes, SNATed NodePort traffic, a pod reaching itself through a
/// Service), and are remembered so that their replies pass an isolated egress.
#[inline(always)]
fn ingress_side(j: &Judged) -> Result<Judgement, Reason> {
    let (s, r) = (&j.sent, &j.received);
    side(
        &Side {
            pod: r.daddr,
            pod_port: r.dport,
            peer: r.saddr,
            peer_port: r.sport,
            who: s.saddr,
            port: r.dport,
            direction: policy_direction::INGRESS,
        },
        j.proto,
        from_this_node(r.saddr),
    )
}

/// One pod's side of a flow: `pod`:`pod_port` with `peer`:`peer_port` as the pod sees it (the
/// key it is remembered under), judged in `direction` against `who`'s identity and the
/// destination port `port` (network byte order).
struct Side {
    pod: u32,
    pod_port: u16,
    peer: u32,
    peer_port: u16,
    who: u32,
    port: u16,
    direction: u8,
}

/// Passed when `pod` is no isolated local pod; else as [`allowed`] says, denied with the
/// direction's reason. `trusted`: allowed whatever the policies say (still remembered).
#[inline(always)]
fn side(s: &Side, proto: u8, trusted: bool) -> Result<Judgement, Reason> {
    if !maybe_isolated(s.pod) {
        return Ok(Judgement::Passed);
    }
    // SAFETY: hash map values are read once, by copy.
    let Some(ep) = unsafe { POLICY_EP_V1.get(&EndpointKey { addr: s.pod }) }.copied() else {
        return Ok(Judgement::Passed);
    };
    let key = PolicyCtKey {
        pod: s.pod,
        peer: s.peer,
        pod_port: s.pod_port,
        peer_port: s.peer_port,
        proto,
        direction: s.direction,
        _pad: [0; 2],
    };
    let (isolation, denied) = if s.direction == policy_direction::EGRESS {
        (policy_isolation::EGRESS, Reason::DropPolicyEgress)
    } else {
        (policy_isolation::INGRESS, Reason::DropPolicyIngress)
    };
    let isolated = if trusted { 0 } else { ep.isolated & isolation };
    allowed(isolated, &key, s.who, s.port)?.ok_or(denied)
}

/// This node's own address, or the pod gateway (the source of a pod's flow to itself through a
/// Service).
#[inline(always)]
fn from_this_node(addr: u32) -> bool {
    addr == u32::from_ne_bytes(POD_GATEWAY)
        || CONFIG_V1
            .get(0)
            .is_some_and(|c| c.node_addr != 0 && c.node_addr == addr)
}

/// One pod's side of a flow (`key`, with the direction it is judged in): a flow already
/// remembered in either direction passes; a new one passes when the pod is not `isolated` in
/// this direction or an entry allows `who`'s identity (or any peer) with the protocol and
/// `port`, and is then remembered. `None`: denied. `Err`: allowed but not remembered (the map
/// refused it).
#[inline(always)]
fn allowed(
    isolated: u32,
    key: &PolicyCtKey,
    who: u32,
    port: u16,
) -> Result<Option<Judgement>, Reason> {
    if POLICY_CT_V1.get_ptr(key).is_some() {
        return Ok(Some(Judgement::Passed));
    }
    let mut other = *key;
    other.direction = policy_direction::INGRESS + policy_direction::EGRESS - key.direction;
    if POLICY_CT_V1.get_ptr(&other).is_some() {
        return Ok(Some(Judgement::Passed));
    }
    let value = if isolated == 0 {
        PolicyCtValue {
            policy: POLICY_CT_NOT_ISOLATED,
            ..PolicyCtValue::default()
        }
    } else {
        let identity = IPCACHE_V1
            .get(&LpmKey::new(32, IpcacheKey { addr: who }))
            .map_or(POLICY_WORLD_IDENTITY, |v| v.identity);
        let port = u16::from_be(port);
        let lookup = |identity: u32| {
            let k = PolicyKey::new(key.pod, key.direction, identity, key.proto, port);
            POLICY_V1.get(&LpmKey::new(96, k)).copied()
        };
        let Some(rule) = lookup(identity).or_else(|| lookup(POLICY_ANY_IDENTITY)) else {
            return Ok(None);
        };
        PolicyCtValue {
            policy: rule.policy,
            rule: rule.rule,
            _pad: 0,
        }
    };
    POLICY_CT_V1
        .insert(key, &value, 0)
        .map_err(|_| Reason::DropPolicyCtFull)?;
    Ok(Some(if value.policy == POLICY_CT_NOT_ISOLATED {
        Judgement::Passed
    } else {
        Judgement::NewAllowed
    }))
}

/// A TCP/UDP packet that passes untranslated (`reason`, `action`) at `hook`, judged: the same,
/// or the policy's drop (told to a listening monitor).
#[inline(always)]
pub(crate) fn untranslated_flow(
    hook: Hook,
    sides: Sides,
    flow: &Flow,
    reason: Reason,
    action: i32,
) -> (Reason, i32) {
    if reason.verdict() != Verdict::Pass {
        return (reason, action);
    }
    match check(&Judged::untranslated(flow), sides) {
        Ok(j) => {
            j.count(hook);
            (reason, action)
        }
        Err(r) => {
            flow_dropped(hook, r, flow);
            (r, TC_ACT_SHOT)
        }
    }
}

/// An ICMP message that passes untranslated, judged as [`untranslated_flow`] judges a flow.
#[inline(always)]
pub(crate) fn untranslated_icmp(
    ctx: &TcContext,
    hook: Hook,
    sides: Sides,
    m: &IcmpPacket,
    reason: Reason,
    action: i32,
) -> (Reason, i32) {
    if reason.verdict() != Verdict::Pass {
        return (reason, action);
    }
    match check_icmp(ctx, m, sides) {
        Ok(j) => {
            j.count(hook);
            (reason, action)
        }
        Err(r) => {
            crate::events::drop(hook, r, proto::ICMP, m.saddr, 0, m.daddr, 0);
            (r, TC_ACT_SHOT)
        }
    }
}

/// A packet of another protocol that passes (`reason` [`Reason::PassOtherL4`]), judged with its
/// protocol: SCTP with its ports (the first four bytes of its header, as in TCP and UDP), any
/// other with none, so only a rule allowing every protocol lets it through an isolation.
#[inline(always)]
pub(crate) fn other_l4(
    ctx: &TcContext,
    hook: Hook,
    sides: Sides,
    reason: Reason,
    action: i32,
) -> (Reason, i32) {
    if reason != Reason::PassOtherL4 {
        return (reason, action);
    }
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return (reason, action);
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    let l4_off = ETH_HLEN + usize::from(ip.version_ihl & 0x0f) * 4;
    let [sport, dport] = match ctx.header::<[u16; 2]>(l4_off) {
        // SAFETY: as above, for the four port bytes.
        Some(p) if ip.proto == proto::SCTP => unsafe { p.read_unaligned() },
        _ => [0, 0],
    };
    let v = View {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
    };
    let j = Judged {
        proto: ip.proto,
        sent: v,
        received: v,
    };
    match check(&j, sides) {
        Ok(j) => {
            j.count(hook);
            (reason, action)
        }
        Err(r) => {
            crate::events::drop(hook, r, ip.proto, ip.saddr, sport, ip.daddr, dport);
            (r, TC_ACT_SHOT)
        }
    }
}
