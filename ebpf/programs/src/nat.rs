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
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use ferrox_abi::{
    AffinityKey, AffinityValue, CtEntry, CtKey, EndpointKey, FragKey, FragValue, Hook,
    MAGLEV_TABLE_SIZE, POD_GATEWAY, Reason, ServiceKey, ServiceValue, SrcRangeKey, Verdict,
    affinity_client, backend_flags, ct_flags, proto, scope, src_range_prefixlen, svc_flags,
};

use crate::{
    classify::classify,
    counters::count,
    maps::{
        AFFINITY_V1, BACKENDS_V1, CONFIG_V1, CT_V1, ENDPOINTS_V1, FRAG_V1, MAGLEV_V1,
        SRC_RANGES_V1, SVC_V1,
    },
    packet::{ETH_HLEN, Frame as _, Ipv4Hdr},
};

/// How many source ports SNAT tries for a new flow before giving up.
const SNAT_TRIES: u32 = 8;
const AF_INET: u8 = 2;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// `frag_off` bits, host byte order.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
/// `-EEXIST`: a map insert with `BPF_NOEXIST` found the key taken.
const EEXIST: i32 = -17;
/// Map update flag: only create, never overwrite.
const BPF_NOEXIST: u64 = 1;

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
    /// The packet carries the L4 header: a whole datagram or its first fragment. A later
    /// fragment carries only data: its addresses are rewritten, its ports (known from the first
    /// fragment) are not there to rewrite.
    has_l4: bool,
    /// Don't-fragment is set.
    df: bool,
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
    Icmp(IcmpPacket),
    Other(Reason),
}

/// An ICMP message: where its header is, its addresses, its total length.
struct IcmpPacket {
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let reason = classify(ctx);
    let later_fragment = reason == Reason::PassIpv4Fragment;
    if !later_fragment
        && reason != Reason::PassTcp
        && reason != Reason::PassUdp
        && reason != Reason::PassIcmp
    {
        return Parsed::Other(reason);
    }
    // `classify` validated the header; read what translation needs.
    let Some(ip) = ctx.header::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    let l4_off = ETH_HLEN + usize::from(ip.version_ihl & 0x0f) * 4;
    let frag_off = u16::from_be(ip.frag_off);
    let frag_key = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    };
    if later_fragment {
        if ip.proto != proto::TCP && ip.proto != proto::UDP {
            return Parsed::Other(reason);
        }
        // The ports are in the first fragment only: it must have come first.
        // SAFETY: hash map values are read once, by copy.
        let Some(ports) = (unsafe { FRAG_V1.get(&frag_key) }).copied() else {
            return Parsed::Other(Reason::DropFragmentUnknown);
        };
        return Parsed::Flow(Flow {
            l4_off,
            proto: ip.proto,
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports.sport,
            dport: ports.dport,
            tot_len: u16::from_be(ip.tot_len),
            has_l4: false,
            df: false,
        });
    }
    if reason == Reason::PassIcmp {
        return Parsed::Icmp(IcmpPacket {
            l4_off,
            saddr: ip.saddr,
            daddr: ip.daddr,
            tot_len: u16::from_be(ip.tot_len),
        });
    }
    // Source and destination ports are the first four bytes of both TCP and UDP headers.
    let Some(ports) = ctx.header::<[u16; 2]>(l4_off) else {
        return Parsed::Other(Reason::DropMalformedIpv4);
    };
    // SAFETY: as above, for the four port bytes.
    let [sport, dport] = unsafe { ports.read_unaligned() };
    if frag_off & IP_MF != 0 {
        // The first fragment of a datagram: its later fragments will need these ports.
        let _ = FRAG_V1.insert(&frag_key, &FragValue { sport, dport }, 0);
    }
    Parsed::Flow(Flow {
        l4_off,
        proto: ip.proto,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        tot_len: u16::from_be(ip.tot_len),
        has_l4: true,
        df: frag_off & IP_DF != 0,
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
        Parsed::Icmp(m) => icmp(ctx, &m),
    };
    if decapsulated && action == TC_ACT_UNSPEC {
        action = to_local_pod(ctx);
    }
    count(Hook::TcUplinkIngress, reason, ctx.len());
    action
}

/// Uplink egress: a reply from a host-network backend of this node (its source is the node's
/// own address) to a client that reached it through a frontend is translated back, before it
/// leaves (the per-packet path delivered the client's packets to the host's stack, whose
/// replies leave here). `None`: not such a reply, the packet is left as it is.
#[inline(always)]
pub fn host_reply(ctx: &TcContext) -> Option<Reason> {
    let Parsed::Flow(flow) = parse(ctx) else {
        return None;
    };
    let node = CONFIG_V1.get(0).map_or(0, |c| c.node_addr);
    if node == 0 || flow.saddr != node {
        return None;
    }
    let entry = CT_V1.get_ptr_mut(&flow.key())?;
    // SAFETY: the pointer comes from a successful lookup; the entry is read by copy and only its
    // timestamp is written.
    let e = unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        *entry
    };
    if e.flags & ct_flags::REPLY == 0 {
        return None;
    }
    Some(match rewrite(ctx, &flow, &e) {
        Ok(()) if flow.has_l4 => Reason::NatReply,
        Ok(()) => Reason::NatFragment,
        Err(_) => Reason::DropRewrite,
    })
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
        Parsed::Icmp(m) => icmp(ctx, &m),
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
    let r = if !flow.has_l4 {
        Reason::PassIpv4Fragment
    } else if flow.proto == proto::TCP {
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
    if !flow.has_l4 {
        // A later fragment of a datagram its first fragment did not translate.
        return untranslated(flow);
    }
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::INTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, Origin::Pod) {
        Ok(outcome) => outcome.counted(Reason::NatNewFlow),
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
    if !flow.has_l4 {
        return untranslated(flow);
    }
    let key = ServiceKey::master(flow.daddr, flow.dport, flow.proto).with_scope(scope::EXTERNAL);
    // SAFETY: hash map values are read once, by copy.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return untranslated(flow);
    };
    match new_flow(ctx, flow, &key, &frontend, Origin::Uplink) {
        Ok(outcome) => outcome.counted(Reason::NatNewFlow),
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

/// TCP header flags.
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The key of the other direction of the flow an entry belongs to: for an original-direction
/// entry its reply key, for a reply entry its original key (the same formula serves both).
#[inline(always)]
fn other_direction(key: &CtKey, e: &CtEntry) -> CtKey {
    CtKey {
        saddr: e.nat_daddr,
        daddr: e.nat_saddr,
        sport: e.nat_dport,
        dport: e.nat_sport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Whether the backend an original-direction entry sends to still exists (ids are not reused
/// soon, and the address must match too).
#[inline(always)]
fn backend_alive(e: &CtEntry) -> bool {
    // SAFETY: hash map values are read once, by copy.
    (unsafe { BACKENDS_V1.get(&e.backend_id) })
        .is_some_and(|b| b.addr == e.nat_daddr && b.port == e.nat_dport)
}

/// A packet of a tracked flow: translated as its conntrack entry says. `None` when the flow
/// must be treated as new: its backend left and this packet may start over (any UDP datagram,
/// a TCP SYN); its entries are removed first.
#[inline(always)]
fn tracked(ctx: &TcContext, flow: &Flow) -> Option<(Reason, i32)> {
    let key = flow.key();
    let entry = CT_V1.get_ptr_mut(&key)?;
    // SAFETY: the pointer comes from a successful lookup; the entry is read by copy.
    let e = unsafe { *entry };
    let tcp = if flow.proto == proto::TCP && flow.has_l4 {
        ctx.load::<u8>(flow.l4_off + 13).unwrap_or(0)
    } else {
        0
    };
    let syn = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if e.flags & ct_flags::REPLY == 0 && !backend_alive(&e) {
        if flow.proto == proto::UDP || syn {
            let _ = CT_V1.remove(&other_direction(&key, &e));
            let _ = CT_V1.remove(&key);
            return None;
        }
        return Some((Reason::DropBackendGone, TC_ACT_SHOT));
    }
    // SAFETY: as above; only the timestamp and the one-byte flags are written (a torn
    // timestamp is harmless).
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
    }
    if tcp & (TCP_FIN | TCP_RST) != 0 || (syn && e.flags & (ct_flags::FIN | ct_flags::CLOSING) != 0)
    {
        tcp_state(&key, &e, entry, tcp, syn);
    }
    let reason = if !flow.has_l4 {
        Reason::NatFragment
    } else if e.flags & ct_flags::REPLY != 0 {
        Reason::NatReply
    } else {
        Reason::NatEstablished
    };
    Some(match translate(ctx, flow, &e) {
        Ok(outcome) => outcome.counted(reason),
        Err(r) => (r, TC_ACT_SHOT),
    })
}

/// Connection state from TCP flags: a RST closes the flow; a FIN marks its direction, and the
/// flow closes once both directions sent one (a half-closed flow stays while the other side
/// still sends); a SYN without ACK on a closed tuple starts a new connection. A function of its
/// own (a BPF-to-BPF call): it runs for a few packets of a connection only.
#[inline(never)]
fn tcp_state(key: &CtKey, e: &CtEntry, entry: *mut CtEntry, tcp: u8, syn: bool) {
    let other = CT_V1.get_ptr_mut(&other_direction(key, e));
    let set = |p: *mut CtEntry, clear: u8, add: u8| {
        // SAFETY: `p` comes from a successful lookup; the one-byte flags are written.
        unsafe { (*p).flags = ((*p).flags & !clear) | add };
    };
    if tcp & TCP_RST != 0 {
        set(entry, 0, ct_flags::CLOSING);
        if let Some(o) = other {
            set(o, 0, ct_flags::CLOSING);
        }
    } else if tcp & TCP_FIN != 0 {
        set(entry, 0, ct_flags::FIN);
        // SAFETY: as above, read by copy.
        if let Some(o) = other
            && unsafe { (*o).flags } & ct_flags::FIN != 0
        {
            set(entry, 0, ct_flags::CLOSING);
            set(o, 0, ct_flags::CLOSING);
        }
    } else if syn {
        set(entry, ct_flags::FIN | ct_flags::CLOSING, 0);
        if let Some(o) = other {
            set(o, ct_flags::FIN | ct_flags::CLOSING, 0);
        }
    }
}

/// The first packet of a flow to a frontend: tracked, then translated.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    origin: Origin,
) -> Result<Outcome, Reason> {
    let e = track_new(flow, key, frontend, origin)?;
    translate(ctx, flow, &e)
}

/// Chooses the new flow's backend and source, and creates its two conntrack entries; returns
/// the original-direction entry to translate with (another CPU's, when it tracked the flow a
/// moment earlier). A function of its own (a BPF-to-BPF call): the entries it builds stay off
/// the stack of the packet path.
#[inline(never)]
fn track_new(
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    origin: Origin,
) -> Result<CtEntry, Reason> {
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
    // The source the backend sees. From outside: the node's address, so the reply comes back
    // through this node (unless externalTrafficPolicy Local keeps the client's address for a
    // local backend). From a pod: the pod's own address with a port of the SNAT range, which
    // the kernel never hands out as an ephemeral port, so the translated flow never shares its
    // tuple with a connection the pod makes to the backend directly (the socket hooks'); to
    // itself (hairpin), the pod gateway's address, since a pod drops packets from its own
    // address. Otherwise the client's own address and port, unless another flow already
    // holds that reply tuple.
    let snat_addr = match origin {
        Origin::Uplink if !local && frontend.flags & svc_flags::EXTERNAL_LOCAL == 0 => {
            // SAFETY: array element 0 always exists; read by copy.
            Some(CONFIG_V1.get(0).map_or(0, |c| c.node_addr))
        }
        Origin::Pod if backend.addr == flow.saddr => Some(u32::from_ne_bytes(POD_GATEWAY)),
        Origin::Pod => Some(flow.saddr),
        Origin::Uplink => None,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut flags = 0;
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    let mut forward = CtEntry {
        nat_saddr: flow.saddr,
        nat_daddr: backend.addr,
        nat_sport: flow.sport,
        nat_dport: backend.port,
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
        flags,
        _pad: [0; 5],
        last_seen_ns: now,
    };
    let reply = CtEntry {
        nat_saddr: flow.daddr,
        nat_daddr: flow.saddr,
        nat_sport: flow.dport,
        nat_dport: flow.sport,
        flags: flags | ct_flags::REPLY,
        ..forward
    };
    // The reply entry first (created only where no other flow holds its key, so two flows
    // never share one); a reply can only come after the original-direction packet left.
    let reply_key = match snat_addr {
        None => match claim_reply(flow, &forward, &reply, forward.nat_saddr, forward.nat_sport) {
            Ok(k) => k,
            Err(EEXIST) => {
                // Another flow from this client address and port reaches the same backend
                // (through another frontend): keep the address, change the port.
                forward.flags |= ct_flags::SNAT;
                let reply = CtEntry {
                    flags: reply.flags | ct_flags::SNAT,
                    ..reply
                };
                snat_claim(flow, &mut forward, &reply, flow.saddr)?
            }
            Err(_) => return Err(Reason::DropConntrackFull),
        },
        Some(addr) => {
            forward.flags |= ct_flags::SNAT;
            let reply = CtEntry {
                flags: reply.flags | ct_flags::SNAT,
                ..reply
            };
            snat_claim(flow, &mut forward, &reply, addr)?
        }
    };
    match CT_V1.insert(&flow.key(), &forward, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => {
            // Another CPU tracked this flow a moment ago: its choice of backend wins.
            let _ = CT_V1.remove(&reply_key);
            // SAFETY: the entry is read by copy.
            return (unsafe { CT_V1.get(&flow.key()) })
                .copied()
                .ok_or(Reason::DropConntrackFull);
        }
        Err(_) => {
            let _ = CT_V1.remove(&reply_key);
            return Err(Reason::DropConntrackFull);
        }
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
    Ok(forward)
}

/// Creates the reply entry of `forward` with the source `nat_saddr:nat_sport`, only if no other
/// flow holds that reply key; returns the key, or the insert's error (`EEXIST`: taken).
#[inline(always)]
fn claim_reply(
    flow: &Flow,
    forward: &CtEntry,
    reply: &CtEntry,
    nat_saddr: u32,
    nat_sport: u16,
) -> Result<CtKey, i32> {
    let key = CtKey {
        saddr: forward.nat_daddr,
        daddr: nat_saddr,
        sport: forward.nat_dport,
        dport: nat_sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    CT_V1.insert(&key, reply, BPF_NOEXIST).map(|()| key)
}

/// Picks a free source port of the SNAT range for `forward` with source address `addr`: the
/// first candidate whose reply entry can be created (created here, so two flows racing for a
/// port never both get it). Writes the chosen source into `forward`.
#[inline(always)]
fn snat_claim(
    flow: &Flow,
    forward: &mut CtEntry,
    reply: &CtEntry,
    addr: u32,
) -> Result<CtKey, Reason> {
    // SAFETY: array element 0 always exists; read by copy.
    let Some(cfg) = CONFIG_V1.get(0).copied() else {
        return Err(Reason::DropSnatExhausted);
    };
    if addr == 0 || cfg.snat_port_max <= cfg.snat_port_min {
        return Err(Reason::DropSnatExhausted);
    }
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    let start = flow_hash(flow);
    let mut i = 0;
    while i < SNAT_TRIES {
        let port = (u32::from(cfg.snat_port_min)
            + (start.wrapping_add(i.wrapping_mul(7919))) % range) as u16;
        match claim_reply(flow, forward, reply, addr, port.to_be()) {
            Ok(key) => {
                forward.nat_saddr = addr;
                forward.nat_sport = port.to_be();
                return Ok(key);
            }
            Err(EEXIST) => {}
            Err(_) => return Err(Reason::DropConntrackFull),
        }
        i += 1;
    }
    Err(Reason::DropSnatExhausted)
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

/// What became of a packet given to [`translate`]: sent on translated (with this action), or
/// answered with an ICMP fragmentation-needed instead (with this action).
enum Outcome {
    Sent(i32),
    TooBig(i32),
}

impl Outcome {
    /// The reason to count: `translated` when it was, else the too-big drop; and the action.
    #[inline(always)]
    fn counted(self, translated: Reason) -> (Reason, i32) {
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
fn translate(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<Outcome, Reason> {
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

/// What a FIB lookup needs to know about a translated packet.
struct Fib {
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// The length the path must carry (0: do not check).
    tot_len: u16,
}

/// Where a translated packet goes.
enum Route {
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
fn path_len(ctx: &TcContext, tot_len: u16) -> u16 {
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    if unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size } != 0 {
        0
    } else {
        tot_len
    }
}

/// Looks the translated packet's route up (and checks its MTU). A function of its own (a
/// BPF-to-BPF call): the lookup's 64-byte request stays off the stack of its callers.
#[inline(never)]
fn route(ctx: &TcContext, to: &Fib) -> Route {
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

/// ICMP destination unreachable, code fragmentation needed and don't-fragment set.
const ICMP_FRAG_NEEDED: u8 = 4;
/// What an ICMP error quotes here: an IPv4 header without options and 8 bytes of its payload.
const QUOTE_LEN: usize = 28;
const ICMP_ERROR_LEN: usize = 20 + 8;

/// Replaces the packet by an ICMP fragmentation-needed carrying `mtu`, from the address the
/// client sent it to, quoting the packet as the client sent it, and sends it back out the
/// interface it came in on. A packet with IP options is dropped without an answer. A function of
/// its own (a BPF-to-BPF call): its buffers stay off the stack of the common path.
#[inline(never)]
fn icmp_too_big(ctx: &TcContext, flow: &Flow, mtu: u16) -> Result<i32, Reason> {
    if flow.l4_off != ETH_HLEN + 20 {
        return Err(Reason::DropTooBig);
    }
    let err = |_| Reason::DropTooBig;
    let dmac: [u8; 6] = ctx.load(0).map_err(err)?;
    let smac: [u8; 6] = ctx.load(6).map_err(err)?;
    // The ICMP checksum covers the ICMP header and the quote: sum the quote's words now.
    let mut sum = 0u32;
    let mut off = ETH_HLEN;
    while off < ETH_HLEN + QUOTE_LEN {
        let w: u32 = ctx.load(off).map_err(err)?;
        sum += (w & 0xffff) + (w >> 16);
        off += 4;
    }
    // Down to the Ethernet header and the quote (a GSO packet stops being one), then room for
    // the new IP and ICMP headers in front of the quote.
    ctx.change_tail((ETH_HLEN + QUOTE_LEN) as u32, 0)
        .map_err(err)?;
    ctx.adjust_room(ICMP_ERROR_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(err)?;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0xc0,
        tot_len: ((ICMP_ERROR_LEN + QUOTE_LEN) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: proto::ICMP,
        check: 0,
        saddr: flow.daddr,
        daddr: flow.saddr,
    };
    ip.check = crate::tunnel::ipv4_checksum(&ip);
    ctx.store(ETH_HLEN, &ip, 0).map_err(err)?;
    // Type, code, checksum, unused, next-hop MTU.
    let head = u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]);
    let mtu_be = mtu.to_be();
    sum += u32::from(head) + u32::from(mtu_be);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let icmp: [u16; 4] = [head, !(sum as u16), 0, mtu_be];
    ctx.store(ETH_HLEN + 20, &icmp, 0).map_err(err)?;
    ctx.store(0, &smac, 0).map_err(err)?;
    ctx.store(6, &dmac, 0).map_err(err)?;
    // SAFETY: `ctx` is a TC context, whose pointer is the kernel's `__sk_buff`.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    // SAFETY: back out of the interface the packet came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Rewrites addresses and ports, keeping the IP and L4 checksums right (incrementally). A later
/// fragment has no L4 header: only its addresses and IP checksum change (the datagram's L4
/// checksum, in its first fragment, already took the new addresses in).
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, e: &CtEntry) -> Result<(), i64> {
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

/// Sends an ICMP error towards its new destination: FIB lookup, MAC rewrite, redirect.
#[inline(always)]
fn forward(ctx: &TcContext, to: &Fib) -> Result<i32, Reason> {
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
/// from the quoted packet's destination itself. Anything else passes. A function of its own (a
/// BPF-to-BPF call), off the stack of the TCP/UDP path.
#[inline(never)]
fn icmp(ctx: &TcContext, m: &IcmpPacket) -> (Reason, i32) {
    match icmp_error(ctx, m.l4_off, m.saddr, m.daddr, m.tot_len) {
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
