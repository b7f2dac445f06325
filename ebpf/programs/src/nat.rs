//! Per-packet service translation for traffic the socket hooks cannot see: clients outside the
//! node reaching a NodePort, a LoadBalancer IP or an externalIP through the uplink, and (the
//! fallback at the pod-facing hook) flows leaving a pod still addressed to a Service because no
//! socket hook translated them: a process outside the cgroup the hooks are attached to, a VM
//! behind a pod's interface, a pod routing packets it did not originate.
//!
//! The first packet of a flow to an external frontend picks a backend (session affinity by
//! client address, else the frontend's Maglev table, so every node picks the same backend for
//! the same flow; a random slot when no table exists yet), and two conntrack entries are
//! written: the original direction (client -> frontend, rewritten to -> backend) and the reply
//! direction (backend -> client, rewritten to frontend -> client). When the backend is on
//! another node and externalTrafficPolicy is Cluster, the source is also rewritten to the
//! node's address and a free port, so the reply comes back through this node.
//!
//! Translated packets are forwarded with a FIB lookup and a redirect, not handed to the stack:
//! a packet whose source became this node's own address would be dropped by the stack as a
//! martian. Every path ends in a named reason, counted by the caller.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_fib_lookup,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use ferrox_abi::{
    AffinityKey, AffinityValue, CtEntry, CtKey, EndpointKey, Hook, MAGLEV_TABLE_SIZE, POD_GATEWAY,
    Reason, ServiceKey, ServiceValue, SrcRangeKey, Verdict, affinity_client, backend_flags,
    ct_flags, proto, scope, src_range_prefixlen, svc_flags,
};

use crate::{
    classify::classify,
    counters::count,
    maps::{
        AFFINITY_V1, BACKENDS_V1, CONFIG_V1, CT_V1, ENDPOINTS_V1, MAGLEV_V1, SRC_RANGES_V1, SVC_V1,
    },
    packet::{ETH_HLEN, Frame as _, Ipv4Hdr},
};

/// How many source ports SNAT tries for a new flow before giving up.
const SNAT_TRIES: u32 = 8;
const AF_INET: u8 = 2;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// The addresses and ports of a TCP or UDP packet, network byte order.
#[derive(Clone, Copy)]
struct Flow {
    /// Offset of the L4 header.
    l4_off: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// IP total length, host byte order.
    tot_len: u16,
}

impl Flow {
    fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// What the packet is: a TCP/UDP flow to look at, an ICMP message (errors about translated
/// flows are translated too), or anything else with its final reason.
enum Parsed {
    Flow(Flow),
    Icmp {
        l4_off: usize,
        saddr: u32,
        daddr: u32,
        tot_len: u16,
    },
    Other(Reason),
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let reason = classify(ctx);
    if reason != Reason::PassTcp && reason != Reason::PassUdp && reason != Reason::PassIcmp {
        return Parsed::Other(reason);
    }
    // `classify` validated the header; read what translation needs.
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    let l4_off = ETH_HLEN + usize::from(ip.version_ihl & 0x0f) * 4;
    if reason == Reason::PassIcmp {
        return Parsed::Icmp {
            l4_off,
            saddr: ip.saddr,
            daddr: ip.daddr,
            tot_len: u16::from_be(ip.tot_len),
        };
    }
    // Source and destination ports are the first four bytes of both TCP and UDP headers.
    let Some(ports) = ctx.header::<[u16; 2]>(l4_off) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: as above, for the four port bytes.
    let [sport, dport] = unsafe { ports.read_unaligned() };
    Parsed::Flow(Flow {
        l4_off,
        proto: ip.proto,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        tot_len: u16::from_be(ip.tot_len),
    })
}

/// The TC action of a reason that ends a packet's processing without translation.
#[inline(always)]
fn action_of(reason: Reason) -> i32 {
    match reason.verdict() {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Translate => TC_ACT_UNSPEC,
    }
}

/// Uplink ingress: decapsulate IP-in-IP from the cluster's nodes, then translate external flows
/// and the replies of SNATed ones. A decapsulated packet is counted twice: as `tunnel-decap`,
/// then by what happened to the inner packet.
#[inline(always)]
pub fn uplink_ingress(ctx: &TcContext) -> i32 {
    let decapsulated = match crate::tunnel::decap(ctx) {
        crate::tunnel::Decap::NotTunnel => false,
        crate::tunnel::Decap::Done => {
            count(Hook::TcUplinkIngress, Reason::TunnelDecap, ctx.len());
            true
        }
        crate::tunnel::Decap::Drop(r) => {
            count(Hook::TcUplinkIngress, r, ctx.len());
            return TC_ACT_SHOT;
        }
    };
    let (reason, mut action) = match parse(ctx) {
        Parsed::Other(r) => (r, action_of(r)),
        Parsed::Flow(flow) => uplink_flow(ctx, &flow),
        Parsed::Icmp {
            l4_off,
            saddr,
            daddr,
            tot_len,
        } => icmp(ctx, l4_off, saddr, daddr, tot_len),
    };
    if decapsulated && action == TC_ACT_UNSPEC {
        action = to_local_pod(ctx);
    }
    count(Hook::TcUplinkIngress, reason, ctx.len());
    action
}

/// A decapsulated packet nothing translated: straight to its pod's veth when it is for a pod of
/// this node (the kernel resolves the pod's MAC), else to the stack.
#[inline(always)]
fn to_local_pod(ctx: &TcContext) -> i32 {
    let Ok(daddr) = ctx.load::<u32>(IP_DADDR_OFF) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: hash map values are read once, by copy.
    match unsafe { ENDPOINTS_V1.get(&EndpointKey { addr: daddr }) } {
        // SAFETY: the kernel resolves the pod's MAC itself.
        Some(ep) => unsafe { bpf_redirect_neigh(ep.ifindex, core::ptr::null_mut(), 0, 0) as i32 },
        None => TC_ACT_UNSPEC,
    }
}

/// Pod veth ingress (packets leaving a pod): translate replies of flows a local backend serves.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let (reason, action) = match parse(ctx) {
        Parsed::Other(r) => (r, action_of(r)),
        Parsed::Icmp {
            l4_off,
            saddr,
            daddr,
            tot_len,
        } => icmp(ctx, l4_off, saddr, daddr, tot_len),
        Parsed::Flow(flow) => match tracked(ctx, &flow) {
            Some(done) => done,
            None => pod_flow(ctx, &flow),
        },
    };
    count(Hook::TcFromPod, reason, ctx.len());
    action
}

/// Where a new flow came in: the node's uplink (a client outside the node) or a pod's veth (a
/// client on this node that the socket hooks did not translate).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Uplink,
    Pod,
}

/// The pass reason of a TCP or UDP packet nothing translates.
#[inline(always)]
fn untranslated(flow: &Flow) -> (Reason, i32) {
    let r = if flow.proto == proto::TCP {
        Reason::PassTcp
    } else {
        Reason::PassUdp
    };
    (r, TC_ACT_UNSPEC)
}

/// The fallback for what the socket hooks cannot see: a new flow leaving a pod still addressed
/// to a Service (its process is outside the cgroup the hooks are attached to, or the pod
/// forwards packets it did not originate, as a VM behind a pod interface or a router pod does).
/// It is translated per packet with the frontend's internal backends, chosen at random as the
/// socket hooks would. A packet the hooks did translate is addressed to a backend and passes.
#[inline(always)]
fn pod_flow(ctx: &TcContext, flow: &Flow) -> (Reason, i32) {
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::INTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, Origin::Pod) {
        Ok(action) => (Reason::NatNewFlow, action),
        Err(r) => {
            flow_dropped(Hook::TcFromPod, r, flow);
            (r, TC_ACT_SHOT)
        }
    }
}

#[inline(always)]
fn uplink_flow(ctx: &TcContext, flow: &Flow) -> (Reason, i32) {
    if let Some(done) = tracked(ctx, flow) {
        return done;
    }
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::EXTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, Origin::Uplink) {
        Ok(action) => (Reason::NatNewFlow, action),
        Err(r) => {
            flow_dropped(Hook::TcUplinkIngress, r, flow);
            (r, TC_ACT_SHOT)
        }
    }
}

/// Tells a listening monitor that `flow` was dropped for `reason`.
#[inline(always)]
fn flow_dropped(hook: Hook, reason: Reason, flow: &Flow) {
    crate::events::drop(
        hook, reason, flow.proto, flow.saddr, flow.sport, flow.daddr, flow.dport,
    );
}

/// A packet of a tracked flow: translated as its conntrack entry says.
#[inline(always)]
fn tracked(ctx: &TcContext, flow: &Flow) -> Option<(Reason, i32)> {
    let entry = CT_V1.get_ptr_mut(&flow.key())?;
    let closing = tcp_closing(ctx, flow);
    // SAFETY: the pointer comes from a successful lookup; the entry is read by copy and only its
    // timestamp and flags are written (a torn timestamp is harmless, the flags are one byte).
    let e = unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        match closing {
            Some(true) => (*entry).flags |= ct_flags::CLOSING,
            Some(false) => (*entry).flags &= !ct_flags::CLOSING,
            None => {}
        }
        *entry
    };
    let reason = if e.flags & ct_flags::REPLY != 0 {
        Reason::NatReply
    } else {
        Reason::NatEstablished
    };
    Some(match translate(ctx, flow, &e) {
        Ok(action) => (reason, action),
        Err(r) => (r, TC_ACT_SHOT),
    })
}

/// TCP flags that change a tracked flow's state: `Some(true)` for FIN or RST (the flow is
/// closing), `Some(false)` for a SYN without ACK (the 5-tuple starts a new connection).
#[inline(always)]
fn tcp_closing(ctx: &TcContext, flow: &Flow) -> Option<bool> {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    if flow.proto != proto::TCP {
        return None;
    }
    let flags = ctx.load::<u8>(flow.l4_off + 13).ok()?;
    if flags & (FIN | RST) != 0 {
        Some(true)
    } else if flags & (SYN | ACK) == SYN {
        Some(false)
    } else {
        None
    }
}

/// The first packet of a flow to a frontend.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    origin: Origin,
) -> Result<i32, Reason> {
    if frontend.count == 0 {
        return Err(Reason::DropNoBackend);
    }
    if frontend.flags & svc_flags::SOURCE_RANGES != 0 {
        let k = LpmKey::new(
            src_range_prefixlen(32),
            SrcRangeKey {
                rev_nat_id: frontend.rev_nat_id.to_be(),
                _pad: 0,
                addr: flow.saddr,
            },
        );
        if SRC_RANGES_V1.get(&k).is_none() {
            return Err(Reason::DropSourceRange);
        }
    }
    let backend_id = pick_backend(flow, key, frontend, origin == Origin::Uplink)?;
    // SAFETY: hash map values are read once, by copy.
    let Some(backend) = (unsafe { BACKENDS_V1.get(&backend_id) }).copied() else {
        return Err(Reason::DropBackendMissing);
    };
    let local = backend.flags & backend_flags::LOCAL != 0;
    // From outside: the node's address, so the reply comes back through this node (unless
    // externalTrafficPolicy Local keeps the client's address for a local backend). From a pod
    // to itself (hairpin): the pod gateway's address, since a pod drops packets that come from
    // its own address.
    let snat = match origin {
        Origin::Uplink if !local && frontend.flags & svc_flags::EXTERNAL_LOCAL == 0 => {
            Some(snat_source(flow, backend.addr, backend.port, None)?)
        }
        Origin::Pod if backend.addr == flow.saddr => Some(snat_source(
            flow,
            backend.addr,
            backend.port,
            Some(u32::from_ne_bytes(POD_GATEWAY)),
        )?),
        _ => None,
    };
    let (nat_saddr, nat_sport) = snat.unwrap_or((flow.saddr, flow.sport));

    let now = unsafe { bpf_ktime_get_ns() };
    let mut flags = 0;
    if snat.is_some() {
        flags |= ct_flags::SNAT;
    }
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    let forward = CtEntry {
        nat_saddr,
        nat_daddr: backend.addr,
        nat_sport,
        nat_dport: backend.port,
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
        flags,
        _pad: [0; 5],
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        saddr: backend.addr,
        daddr: nat_saddr,
        sport: backend.port,
        dport: nat_sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        nat_saddr: flow.daddr,
        nat_daddr: flow.saddr,
        nat_sport: flow.dport,
        nat_dport: flow.sport,
        flags: flags | ct_flags::REPLY,
        ..forward
    };
    // Reply entry first: a reply can only come after the forward packet left.
    if CT_V1.insert(&reply_key, &reply, 0).is_err() {
        return Err(Reason::DropConntrackFull);
    }
    if CT_V1.insert(&flow.key(), &forward, 0).is_err() {
        let _ = CT_V1.remove(&reply_key);
        return Err(Reason::DropConntrackFull);
    }
    crate::events::translate(
        match origin {
            Origin::Uplink => Hook::TcUplinkIngress,
            Origin::Pod => Hook::TcFromPod,
        },
        flow.proto,
        flow.saddr,
        flow.sport,
        flow.daddr,
        flow.dport,
        backend.addr,
        backend.port,
    );
    translate(ctx, flow, &forward)
}

/// The backend of a new flow: the client address's affinity entry, else the frontend's Maglev
/// table when `maglev` (external flows; internal entries have other backends than the table's),
/// else a random slot.
#[inline(always)]
fn pick_backend(
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    maglev: bool,
) -> Result<u32, Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let akey = AffinityKey {
        client: u64::from(flow.saddr),
        rev_nat_id: frontend.rev_nat_id,
        client_kind: affinity_client::IPV4,
        _pad: [0; 5],
    };
    if frontend.flags & svc_flags::AFFINITY != 0 {
        let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
        // SAFETY: the value is copied out before the entry is written again.
        if let Some(a) = (unsafe { AFFINITY_V1.get(&akey) }).copied()
            && now.saturating_sub(a.last_used_ns) <= timeout_ns
            // SAFETY: only checks that the backend still exists.
            && (unsafe { BACKENDS_V1.get(&a.backend_id) }).is_some()
        {
            let _ = AFFINITY_V1.insert(
                &akey,
                &AffinityValue {
                    last_used_ns: now,
                    ..a
                },
                0,
            );
            return Ok(a.backend_id);
        }
    }
    let from_table = if maglev {
        let hash = flow_hash(flow);
        // SAFETY: the table entry is read by copy.
        unsafe { MAGLEV_V1.get_value(&u32::from(frontend.rev_nat_id), &(hash % MAGLEV_TABLE_SIZE)) }
            .copied()
    } else {
        None
    };
    let backend_id = match from_table {
        Some(id) => id,
        None => {
            // No table (yet): a random slot, like the socket hooks.
            // SAFETY: a helper without arguments or preconditions.
            let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(frontend.count)) as u16 + 1;
            // SAFETY: hash map values are read once, by copy.
            match unsafe { SVC_V1.get(&key.with_slot(slot)) } {
                Some(s) => s.backend_id,
                None => return Err(Reason::DropBackendMissing),
            }
        }
    };
    if frontend.flags & svc_flags::AFFINITY != 0 {
        let _ = AFFINITY_V1.insert(
            &akey,
            &AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns: now,
            },
            0,
        );
    }
    Ok(backend_id)
}

/// A hash of the flow's tuple, the same on every node ([`ferrox_abi::flow_hash`]).
#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    ferrox_abi::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

/// A source address (the node's, unless `addr` names another) and a free source port for a
/// SNATed flow to `backend`.
#[inline(always)]
fn snat_source(
    flow: &Flow,
    backend_addr: u32,
    backend_port: u16,
    addr: Option<u32>,
) -> Result<(u32, u16), Reason> {
    // SAFETY: array element 0 always exists; read by copy.
    let Some(cfg) = CONFIG_V1.get(0).copied() else {
        return Err(Reason::DropSnatExhausted);
    };
    let snat_addr = addr.unwrap_or(cfg.node_addr);
    if snat_addr == 0 || cfg.snat_port_max <= cfg.snat_port_min {
        return Err(Reason::DropSnatExhausted);
    }
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    let start = flow_hash(flow);
    let mut i = 0;
    while i < SNAT_TRIES {
        let port =
            (cfg.snat_port_min as u32 + (start.wrapping_add(i.wrapping_mul(7919))) % range) as u16;
        let candidate = CtKey {
            saddr: backend_addr,
            daddr: snat_addr,
            sport: backend_port,
            dport: port.to_be(),
            proto: flow.proto,
            _pad: [0; 3],
        };
        // SAFETY: only checks presence.
        if (unsafe { CT_V1.get(&candidate) }).is_none() {
            return Ok((snat_addr, port.to_be()));
        }
        i += 1;
    }
    Err(Reason::DropSnatExhausted)
}

/// Rewrites the packet as `e` says and forwards it.
#[inline(always)]
fn translate(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<i32, Reason> {
    rewrite(ctx, flow, e).map_err(|_| Reason::DropRewrite)?;
    let to = Fib {
        proto: flow.proto,
        saddr: e.nat_saddr,
        daddr: e.nat_daddr,
        sport: e.nat_sport,
        dport: e.nat_dport,
        tot_len: flow.tot_len,
    };
    forward(ctx, &to)
}

/// What a FIB lookup needs to know about a translated packet.
struct Fib {
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    tot_len: u16,
}

/// Rewrites addresses and ports, keeping the IP and L4 checksums right (incrementally).
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<(), i64> {
    let (csum_off, mangled) = if flow.proto == proto::TCP {
        (flow.l4_off + 16, 0)
    } else {
        (flow.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    if e.nat_saddr != flow.saddr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(flow.saddr),
            u64::from(e.nat_saddr),
            pseudo | mangled | 4,
        )?;
        ctx.l3_csum_replace(
            IP_CSUM_OFF,
            u64::from(flow.saddr),
            u64::from(e.nat_saddr),
            4,
        )?;
        ctx.store(IP_SADDR_OFF, &e.nat_saddr, 0)?;
    }
    if e.nat_daddr != flow.daddr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(flow.daddr),
            u64::from(e.nat_daddr),
            pseudo | mangled | 4,
        )?;
        ctx.l3_csum_replace(
            IP_CSUM_OFF,
            u64::from(flow.daddr),
            u64::from(e.nat_daddr),
            4,
        )?;
        ctx.store(IP_DADDR_OFF, &e.nat_daddr, 0)?;
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

/// Sends the translated packet towards its new destination: FIB lookup, MAC rewrite, redirect.
#[inline(always)]
fn forward(ctx: &TcContext, to: &Fib) -> Result<i32, Reason> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = to.proto;
    p.sport = to.sport;
    p.dport = to.dport;
    p.__bindgen_anon_1.tot_len = to.tot_len;
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    p.ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    p.__bindgen_anon_3.ipv4_src = to.saddr;
    p.__bindgen_anon_4.ipv4_dst = to.daddr;
    // SAFETY: `p` is a valid request of the size passed; `ctx` is the program's context.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: reading the MAC addresses the lookup filled in.
            let macs = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            ctx.store(0, &macs.dmac, 0)
                .map_err(|_| Reason::DropRewrite)?;
            ctx.store(6, &macs.smac, 0)
                .map_err(|_| Reason::DropRewrite)?;
            // SAFETY: redirecting to the interface the lookup chose.
            Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32)
        }
        // SAFETY: the kernel resolves the next hop's MAC itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            Ok(unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        // Too big for the next hop: the stack sends the ICMP error.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Ok(TC_ACT_OK),
        _ => Err(Reason::DropNoRoute),
    }
}

/// ICMP types that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Offset of the ICMP checksum in the ICMP header, and of the quoted packet.
const ICMP_CSUM: usize = 2;
const ICMP_QUOTE: usize = 8;

/// An ICMP message. Errors about a translated flow (fragmentation needed, unreachable, time
/// exceeded) are translated like the flow, so the sender they concern gets them in its own
/// addresses: the quoted packet, the error's destination, and its source when the error comes
/// from the quoted packet's destination itself. Anything else passes.
#[inline(always)]
fn icmp(ctx: &TcContext, l4_off: usize, saddr: u32, daddr: u32, tot_len: u16) -> (Reason, i32) {
    match icmp_error(ctx, l4_off, saddr, daddr, tot_len) {
        Some(Ok(action)) => (Reason::NatIcmpError, action),
        Some(Err(r)) => (r, TC_ACT_SHOT),
        None => (Reason::PassIcmp, TC_ACT_UNSPEC),
    }
}

#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Option<Result<i32, Reason>> {
    let hdr = ctx.header::<[u8; 2]>(l4_off)?;
    // SAFETY: `header` checked the two bytes are inside the frame.
    let [kind, _code] = unsafe { hdr.read_unaligned() };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return None;
    }
    let inner_off = l4_off + ICMP_QUOTE;
    let inner = ctx.header::<Ipv4Hdr>(inner_off)?;
    // SAFETY: as above, for the quoted IP header.
    let inner = unsafe { inner.read_unaligned() };
    if inner.proto != proto::TCP && inner.proto != proto::UDP {
        return None;
    }
    let inner_l4 = inner_off + usize::from(inner.version_ihl & 0x0f) * 4;
    let ports = ctx.header::<[u16; 2]>(inner_l4)?;
    // SAFETY: as above, for the quoted ports.
    let [isport, idport] = unsafe { ports.read_unaligned() };
    // The quoted packet went s -> d; its flow's entry is the one for d -> s.
    let key = CtKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: idport,
        dport: isport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    // SAFETY: the entry is read by copy.
    let e = (unsafe { CT_V1.get(&key) }).copied()?;
    // Translated quote: the reverse of the translated d -> s.
    let (new_isaddr, new_isport, new_idaddr, new_idport) =
        (e.nat_daddr, e.nat_dport, e.nat_saddr, e.nat_sport);
    let new_daddr = e.nat_daddr;
    let new_saddr = if saddr == inner.daddr {
        e.nat_saddr
    } else {
        saddr
    };
    Some(
        rewrite_icmp_error(
            ctx,
            l4_off,
            inner_off,
            inner_l4,
            &inner,
            [isport, idport],
            [new_isaddr, new_idaddr],
            [new_isport, new_idport],
            saddr,
            daddr,
            new_saddr,
            new_daddr,
        )
        .map_err(|_| Reason::DropRewrite)
        .and_then(|()| {
            forward(
                ctx,
                &Fib {
                    proto: proto::ICMP,
                    saddr: new_saddr,
                    daddr: new_daddr,
                    sport: 0,
                    dport: 0,
                    tot_len,
                },
            )
        }),
    )
}

/// Rewrites an ICMP error and its quote. The ICMP checksum covers the quote (no pseudo
/// header), so every quoted byte that changes, the quoted IP checksum included, is folded in.
#[allow(
    clippy::too_many_arguments,
    reason = "the old and new values of every rewritten field"
)]
#[inline(always)]
fn rewrite_icmp_error(
    ctx: &TcContext,
    l4_off: usize,
    inner_off: usize,
    inner_l4: usize,
    inner: &Ipv4Hdr,
    old_ports: [u16; 2],
    new_addrs: [u32; 2],
    new_ports: [u16; 2],
    saddr: u32,
    daddr: u32,
    new_saddr: u32,
    new_daddr: u32,
) -> Result<(), i64> {
    let icmp_csum = l4_off + ICMP_CSUM;
    let inner_csum = inner_off + 10;
    let old_inner_csum = inner.check;
    // Quoted addresses: the quoted IP checksum and the ICMP checksum.
    for (off, old, new) in [
        (inner_off + 12, inner.saddr, new_addrs[0]),
        (inner_off + 16, inner.daddr, new_addrs[1]),
    ] {
        if old != new {
            ctx.l3_csum_replace(inner_csum, u64::from(old), u64::from(new), 4)?;
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 4)?;
            ctx.store(off, &new, 0)?;
        }
    }
    // Quoted ports: the ICMP checksum (the quoted L4 checksum may lie beyond the quote).
    for (off, old, new) in [
        (inner_l4, old_ports[0], new_ports[0]),
        (inner_l4 + 2, old_ports[1], new_ports[1]),
    ] {
        if old != new {
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 2)?;
            ctx.store(off, &new, 0)?;
        }
    }
    // The quoted IP checksum itself changed: fold that into the ICMP checksum.
    let new_inner_csum = ctx.load::<u16>(inner_csum)?;
    if new_inner_csum != old_inner_csum {
        ctx.l4_csum_replace(
            icmp_csum,
            u64::from(old_inner_csum),
            u64::from(new_inner_csum),
            2,
        )?;
    }
    // Outer addresses: only the outer IP checksum (ICMP has no pseudo header).
    if new_saddr != saddr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(saddr), u64::from(new_saddr), 4)?;
        ctx.store(IP_SADDR_OFF, &new_saddr, 0)?;
    }
    if new_daddr != daddr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(daddr), u64::from(new_daddr), 4)?;
        ctx.store(IP_DADDR_OFF, &new_daddr, 0)?;
    }
    Ok(())
}
