//! Socket-level load balancing: a connection to a service frontend is sent to one of its
//! backends when it is made (connect4) or per datagram (sendmsg4), and the backend's address is
//! shown back to the application as the frontend's (recvmsg4, getpeername4). Translation
//! happens once per connection, never per packet.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use ferrox_abi::{
    AffinityKey, AffinityValue, Hook, Reason, ServiceKey, ServiceValue, SockRevNatKey,
    SockRevNatValue, Verdict, affinity_client, proto, svc_flags,
};

use crate::{
    counters::count,
    maps::{
        AFF_PREV_V1, AFFINITY_V1, BACKENDS_V1, HOST_NETNS_V1, RNAT_PREV_V1, SOCK_RNAT_V1, SVC_V1,
    },
    resizing,
};

/// Return value of a sock_addr program that lets the operation go on.
const ALLOW: i32 = 1;
/// Return value that fails the operation (`connect()`/`sendmsg()` get `EPERM`).
const REJECT: i32 = 0;

/// connect4 / sendmsg4: rewrite a frontend destination to a backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Hook) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` context for the program's whole run.
    let (frontend_ip, frontend_port, l4) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16, sa.protocol as u8)
    };
    let reason = try_forward(ctx);
    count(hook, reason, 0);
    match reason.verdict() {
        Verdict::Drop => crate::events::drop(hook, reason, l4, 0, 0, frontend_ip, frontend_port),
        Verdict::Translate => {
            // SAFETY: as above; `try_forward` wrote the backend.
            let (ip, port) = unsafe {
                let sa = &*ctx.sock_addr;
                (sa.user_ip4, sa.user_port as u16)
            };
            crate::events::translate(hook, l4, 0, 0, frontend_ip, frontend_port, ip, port);
        }
        Verdict::Pass => {}
    }
    match reason.verdict() {
        Verdict::Drop => REJECT,
        Verdict::Pass | Verdict::Translate => ALLOW,
    }
}

#[inline(always)]
fn try_forward(ctx: &SockAddrContext) -> Reason {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` context for the program's whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let l4 = sa.protocol as u8;
    if l4 != proto::TCP && l4 != proto::UDP {
        return Reason::PassUnsupportedProto;
    }
    // `user_port` holds the port in network byte order in its first two bytes.
    let key = ServiceKey::master(sa.user_ip4, sa.user_port as u16, l4);
    // SAFETY: hash map values are read once, by copy, before any update of the same entry.
    let Some(frontend) = (unsafe { SVC_V1.get(&key) }).copied() else {
        return Reason::PassNoService;
    };
    // Loopback frontends (`127.0.0.1:<nodePort>`) are the host's: in a pod's own network
    // namespace 127.0.0.1 is the pod itself, and its own listeners must stay reachable.
    if sa.user_ip4.to_ne_bytes()[0] == 127 && !in_host_netns(ctx) {
        return Reason::PassNoService;
    }
    if frontend.count == 0 {
        return Reason::DropNoBackend;
    }
    let (backend_id, translated) = if frontend.flags & svc_flags::AFFINITY != 0 {
        match pick_with_affinity(ctx, &key, &frontend) {
            Ok(picked) => picked,
            Err(reason) => return reason,
        }
    } else {
        match pick_random(&key, &frontend) {
            Some(id) => (id, Reason::TranslateToBackend),
            None => return Reason::DropBackendMissing,
        }
    };
    // SAFETY: as above.
    let Some(backend) = (unsafe { BACKENDS_V1.get(&backend_id) }).copied() else {
        return Reason::DropBackendMissing;
    };

    // SAFETY: `ctx` is a sock_addr context, for which the kernel provides the socket cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    let rev_val = SockRevNatValue {
        addr: key.addr,
        port: key.port,
        rev_nat_id: frontend.rev_nat_id,
    };
    if !resizing::insert(&SOCK_RNAT_V1, &RNAT_PREV_V1, &rev_key, &rev_val) && l4 == proto::UDP {
        // Without the entry, replies would reach the application from the backend's address,
        // which a DNS client rejects: refuse instead of half-translating.
        return Reason::DropRevNatFull;
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    translated
}

/// Whether the socket lives in the node's host network namespace (whose cookie the agent
/// wrote; unknown means no).
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let host = HOST_NETNS_V1.get(0).copied().unwrap_or(0);
    // SAFETY: `ctx` is a sock_addr context, for which the kernel provides the cookie.
    host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
}

/// A backend id from a uniformly random slot of the frontend.
#[inline(always)]
fn pick_random(key: &ServiceKey, frontend: &ServiceValue) -> Option<u32> {
    // SAFETY: a helper without arguments or preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % u32::from(frontend.count)) as u16 + 1;
    // SAFETY: hash map values are read once, by copy.
    (unsafe { SVC_V1.get(&key.with_slot(slot)) }).map(|s| s.backend_id)
}

/// Session affinity (sessionAffinity: ClientIP): the client is the socket's network namespace,
/// so every connection from one pod (or from the host) goes to the same backend until the
/// entry has not been used for the frontend's timeout. The agent removes entries that name a
/// backend the frontend no longer has.
#[inline(always)]
fn pick_with_affinity(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    frontend: &ServiceValue,
) -> Result<(u32, Reason), Reason> {
    // SAFETY: `ctx` is a sock_addr context, for which the kernel provides the netns cookie.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let akey = AffinityKey {
        client: netns,
        rev_nat_id: frontend.rev_nat_id,
        client_kind: affinity_client::NETNS,
        _pad: [0; 5],
    };
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
    if let Some(entry) = resizing::get(&AFFINITY_V1, &AFF_PREV_V1, &akey)
        && now.saturating_sub(entry.last_used_ns) <= timeout_ns
        && (unsafe { BACKENDS_V1.get(&entry.backend_id) }).is_some()
    {
        let refreshed = AffinityValue {
            last_used_ns: now,
            ..entry
        };
        // Best effort: a failed refresh only shortens the affinity.
        let _ = resizing::insert(&AFFINITY_V1, &AFF_PREV_V1, &akey, &refreshed);
        return Ok((entry.backend_id, Reason::TranslateAffinity));
    }
    let backend_id = pick_random(key, frontend).ok_or(Reason::DropBackendMissing)?;
    let _ = resizing::insert(
        &AFFINITY_V1,
        &AFF_PREV_V1,
        &akey,
        &AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        },
    );
    Ok((backend_id, Reason::TranslateToBackend))
}

/// recvmsg4 / getpeername4: show the frontend address instead of the backend's.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, hook: Hook) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` context for the program's whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `ctx` is a sock_addr context, for which the kernel provides the socket cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: [0; 2],
    };
    let reason = match resizing::get(&SOCK_RNAT_V1, &RNAT_PREV_V1, &key) {
        Some(frontend) => {
            sa.user_ip4 = frontend.addr;
            sa.user_port = u32::from(frontend.port);
            Reason::TranslateToFrontend
        }
        None => Reason::PassNoRevNat,
    };
    count(hook, reason, 0);
    // recvmsg4 and getpeername4 must return 1: they cannot fail the call.
    ALLOW
}
