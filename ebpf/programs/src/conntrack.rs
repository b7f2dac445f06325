//! Connection tracking of translated flows: two entries per flow (the original direction,
//! client -> frontend rewritten to -> backend, and the reply direction, backend -> client
//! rewritten to frontend -> client), created only where the key is free; the source a flow gets
//! (the client's own, or SNAT to the node or the pod gateway with a port of the SNAT range);
//! the TCP state the GC reads; backends that left.

use aya_ebpf::{EbpfContext, helpers::bpf_ktime_get_coarse_ns};
use ferrox_abi::{
    CtEntry, CtKey, Hook, POD_GATEWAY, Reason, ServiceKey, ServiceValue, backend_flags, ct_flags,
    proto, svc_flags,
};

use crate::{
    ct_map::{EEXIST, create, lookup, remove},
    flow::Flow,
    lb::{admit, flow_hash, pick_backend},
    maps::{BACKENDS_GEN_V1, BACKENDS_V1, CONFIG_V1},
    nat::{Cache, Outcome, translate},
    packet::Hooked,
};

/// How stale an entry's last-seen time may be before a packet refreshes it. The agent's
/// conntrack GC counts idle time in seconds; a flow is idle for at least its timeout less this.
pub(crate) const LAST_SEEN_RESOLUTION_NS: u64 = 250_000_000;

/// The clock of last-seen times: the kernel's monotonic clock at tick resolution (no clock
/// source read), which the agent compares with its own `CLOCK_MONOTONIC`.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: no arguments, no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The time now when a last-seen time is older than its resolution (the entry's time is due,
/// and so is a refresh of its cached route), else `None`.
#[inline(always)]
fn due(last_seen_ns: u64) -> Option<u64> {
    let now = now_ns();
    (now.wrapping_sub(last_seen_ns) > LAST_SEEN_RESOLUTION_NS).then_some(now)
}

/// Marks the entry used now. The time is written only when the stored one is older than its
/// resolution (then true: the entry's cached route is due for a refresh too): most packets of a
/// busy flow leave the entry's cache line alone.
#[inline(always)]
pub(crate) fn touch(entry: *mut CtEntry, last_seen_ns: u64) -> bool {
    let Some(now) = due(last_seen_ns) else {
        return false;
    };
    // SAFETY: `entry` comes from a successful lookup; only the timestamp is written (a torn
    // timestamp is harmless).
    unsafe { (*entry).last_seen_ns = now };
    true
}

/// The low 16 bits of the count of backend removals (`BACKENDS_GEN_V1`), which an entry
/// compares with the count its backend was last found present at.
#[inline(always)]
pub(crate) fn backends_gen() -> u16 {
    // Array element 0 always exists; truncation to the bits an entry keeps is intended.
    BACKENDS_GEN_V1.get(0).map_or(0, |g| *g as u16)
}

/// How many source ports SNAT tries for a new flow before giving up.
pub(crate) const SNAT_TRIES: u32 = 8;

/// TCP header flags.
pub(crate) const TCP_FIN: u8 = 0x01;

pub(crate) const TCP_SYN: u8 = 0x02;

pub(crate) const TCP_RST: u8 = 0x04;

pub(crate) const TCP_ACK: u8 = 0x10;

/// Where a new flow came in: the node's uplink (a client outside the node; at TC, or at XDP
/// before the skb exists) or a pod's veth (a client on this node that the socket hooks did not
/// translate).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Uplink,
    XdpUplink,
    Pod,
}

impl Origin {
    #[inline(always)]
    fn outside_client(self) -> bool {
        self != Self::Pod
    }

    #[inline(always)]
    pub(crate) fn hook(self) -> Hook {
        match self {
            Self::Uplink => Hook::TcUplinkIngress,
            Self::XdpUplink => Hook::XdpUplink,
            Self::Pod => Hook::TcFromPod,
        }
    }
}

/// The key of the other direction of the flow an entry belongs to: for an original-direction
/// entry its reply key, for a reply entry its original key (the same formula serves both).
#[inline(always)]
pub(crate) fn other_direction(key: &CtKey, e: &CtEntry) -> CtKey {
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
pub(crate) fn backend_alive(entry: *const CtEntry) -> bool {
    // SAFETY: `entry` comes from a successful lookup; the fields read never change after the
    // entry is created. Hash map values are read once, by copy.
    unsafe {
        BACKENDS_V1
            .get(&(*entry).backend_id)
            .is_some_and(|b| b.addr == (*entry).nat_daddr && b.port == (*entry).nat_dport)
    }
}

/// What [`check_backend`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// There; `refreshed`: the entry's last-seen time was written (see [`touch`]).
    Present { refreshed: bool },
    /// Gone, and the packet may start the flow over: its entries were removed.
    StartOver,
    /// Gone, and the packet cannot start over (a TCP segment other than a SYN); the entry's
    /// time is left as it was, so that packets dropped for it do not keep it from idling out.
    Gone,
}

/// Whether the backend of an original-direction entry (last seen at `last_seen_ns`) is still
/// there, marking the entry used when it is. The backend is looked up only when some backend
/// left since the entry last found its own present, or when the entry's time is due anyway
/// (which bounds what a lost count could miss): a busy flow's other packets skip the lookup.
/// A gone backend's entries are removed when the packet may start over (`restart`: any UDP
/// datagram, a TCP SYN). A function of its own (a BPF-to-BPF call): its locals stay off the
/// packet path's stack.
#[inline(never)]
pub(crate) fn check_backend(
    entry: *mut CtEntry,
    key: &CtKey,
    last_seen_ns: u64,
    restart: bool,
) -> Backend {
    let due = due(last_seen_ns);
    let current = backends_gen();
    // SAFETY: `entry` comes from a successful lookup; one field read.
    if due.is_none() && unsafe { (*entry).backends_gen } == current {
        return Backend::Present { refreshed: false };
    }
    if backend_alive(entry) {
        // SAFETY: as above; only these two fields are written (a torn timestamp is harmless).
        unsafe {
            (*entry).backends_gen = current;
            if let Some(now) = due {
                (*entry).last_seen_ns = now;
            }
        }
        return Backend::Present {
            refreshed: due.is_some(),
        };
    }
    if !restart {
        return Backend::Gone;
    }
    // SAFETY: as above, read by copy.
    let other = other_direction(key, &unsafe { *entry });
    remove(&other);
    remove(key);
    Backend::StartOver
}

/// A packet of a tracked flow: translated as its conntrack entry says. `None` when the flow
/// must be treated as new: its backend left and this packet may start over (any UDP datagram,
/// a TCP SYN); its entries are removed first.
#[inline(always)]
pub(crate) fn tracked<C: Hooked + EbpfContext>(
    ctx: &C,
    flow: &Flow,
    hook: Hook,
) -> Option<(Reason, i32)> {
    let key = flow.key();
    let entry = lookup(&key)?;
    // SAFETY: the pointer comes from a successful lookup. The entry is read field by field,
    // where needed, not copied whole (the stack of the hooks that inline this is tight).
    let (flags, last_seen_ns) = unsafe { ((*entry).flags, (*entry).last_seen_ns) };
    // The data offset and flags bytes (a one-byte bounds check against a variable offset is
    // one the verifier cannot follow).
    let tcp = match ctx.header::<[u8; 2]>(flow.l4_off + 12) {
        // SAFETY: `header` checked that both bytes lie inside the frame.
        Some(p) if flow.proto == proto::TCP && flow.has_l4 => unsafe { (*p)[1] },
        _ => 0,
    };
    let syn = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let refresh = if flags & ct_flags::REPLY == 0 {
        let restart = flow.proto == proto::UDP || syn;
        match check_backend(entry, &key, last_seen_ns, restart) {
            Backend::Present { refreshed } => refreshed,
            Backend::StartOver => return None,
            Backend::Gone => return Some((Reason::DropBackendGone, C::DROP)),
        }
    } else {
        touch(entry, last_seen_ns)
    };
    if tcp & (TCP_FIN | TCP_RST) != 0 || (syn && flags & (ct_flags::FIN | ct_flags::CLOSING) != 0) {
        tcp_state(&key, entry, tcp, syn);
    }
    let reason = if !flow.has_l4 {
        Reason::NatFragment
    } else if flags & ct_flags::REPLY != 0 {
        Reason::NatReply
    } else {
        Reason::NatEstablished
    };
    if !C::XDP && crate::policy::concerns_translated(flow, entry) {
        match crate::policy::translated(flow, entry) {
            Ok(j) => j.count(hook),
            Err(r) => {
                crate::flow::flow_dropped(hook, r, flow);
                return Some((r, C::DROP));
            }
        }
    }
    Some(
        match translate(
            ctx,
            flow,
            entry,
            if refresh { Cache::Refresh } else { Cache::Use },
        ) {
            Ok(outcome) => outcome.counted::<C>(reason),
            Err(r) => {
                crate::flow::flow_dropped(hook, r, flow);
                (r, C::DROP)
            }
        },
    )
}

/// Connection state from TCP flags: a RST closes the flow; a FIN marks its direction, and the
/// flow closes once both directions sent one (a half-closed flow stays while the other side
/// still sends); a SYN without ACK on a closed tuple starts a new connection. A function of its
/// own (a BPF-to-BPF call): it runs for a few packets of a connection only.
#[inline(never)]
pub(crate) fn tcp_state(key: &CtKey, entry: *mut CtEntry, tcp: u8, syn: bool) {
    // SAFETY: `entry` comes from a successful lookup; read by copy.
    let other = lookup(&other_direction(key, &unsafe { *entry }));
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

/// The first packet of a flow to a frontend: tracked, then translated by its entry in the map
/// (whose route cache it fills).
#[inline(always)]
pub(crate) fn new_flow<C: Hooked + EbpfContext>(
    ctx: &C,
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    origin: Origin,
) -> Result<Outcome, Reason> {
    track_new(flow, key, frontend, origin)?;
    // Evicted already (a full LRU under pressure): as good as not tracked.
    let entry = lookup(&flow.key()).ok_or(Reason::DropConntrackFull)?;
    if !C::XDP && crate::policy::concerns_translated(flow, entry) {
        crate::policy::translated(flow, entry)?.count(origin.hook());
    }
    translate(ctx, flow, entry, Cache::Refresh)
}

/// Chooses the new flow's backend and source, and creates its two conntrack entries (or finds
/// that another CPU tracked the flow a moment earlier: its choice stands). A function of its
/// own (a BPF-to-BPF call): the entries it builds stay off the stack of the packet path.
#[inline(never)]
pub(crate) fn track_new(
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    origin: Origin,
) -> Result<(), Reason> {
    admit(flow, frontend)?;
    let backend_id = pick_backend(flow, key, frontend, origin.outside_client())?;
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
        Origin::Uplink | Origin::XdpUplink
            if !local && frontend.flags & svc_flags::EXTERNAL_LOCAL == 0 =>
        {
            // SAFETY: array element 0 always exists; read by copy.
            Some(CONFIG_V1.get(0).map_or(0, |c| c.node_addr))
        }
        Origin::Pod if backend.addr == flow.saddr => Some(u32::from_ne_bytes(POD_GATEWAY)),
        Origin::Pod => Some(flow.saddr),
        Origin::Uplink | Origin::XdpUplink => None,
    };
    let now = now_ns();
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
        last_seen_ns: now,
        backends_gen: backends_gen(),
        ..CtEntry::default()
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
    match create(&flow.key(), &forward) {
        Ok(()) => {}
        Err(EEXIST) => {
            // Another CPU tracked this flow a moment ago: its choice of backend wins.
            remove(&reply_key);
            // SAFETY: the entry is read by copy.
            return Ok(());
        }
        Err(_) => {
            remove(&reply_key);
            return Err(Reason::DropConntrackFull);
        }
    }
    crate::events::translate(
        origin.hook(),
        flow.proto,
        flow.saddr,
        flow.sport,
        flow.daddr,
        flow.dport,
        backend.addr,
        backend.port,
    );
    Ok(())
}

/// Creates the reply entry of `forward` with the source `nat_saddr:nat_sport`, only if no other
/// flow holds that reply key; returns the key, or the insert's error (`EEXIST`: taken).
#[inline(always)]
pub(crate) fn claim_reply(
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
    create(&key, reply).map(|()| key)
}

/// Picks a free source port of the SNAT range for `forward` with source address `addr`: the
/// first candidate whose reply entry can be created (created here, so two flows racing for a
/// port never both get it). Writes the chosen source into `forward`.
#[inline(always)]
pub(crate) fn snat_claim(
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
