//! Socket-level load balancing: a connection to a service frontend is sent to one of its
//! backends when it is made (connect4) or per datagram (sendmsg4), and the backend's address is
//! shown back to the application as the frontend's (recvmsg4, getpeername4). Translation
//! happens once per connection, never per packet.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use ferrox_abi::{Hook, Reason, ServiceKey, SockRevNatKey, SockRevNatValue, Verdict, proto};

use crate::{
    counters::count,
    maps::{BACKENDS_V1, SOCK_RNAT_V1, SVC_V1},
};

/// Return value of a sock_addr program that lets the operation go on.
const ALLOW: i32 = 1;
/// Return value that fails the operation (`connect()`/`sendmsg()` get `EPERM`).
const REJECT: i32 = 0;

/// connect4 / sendmsg4: rewrite a frontend destination to a backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let reason = try_forward(ctx);
    count(hook, reason, 0);
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
    if frontend.count == 0 {
        return Reason::DropNoBackend;
    }
    // SAFETY: a helper without arguments or preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % u32::from(frontend.count)) as u16 + 1;
    // SAFETY: as above.
    let Some(slot_entry) = (unsafe { SVC_V1.get(&key.with_slot(slot)) }).copied() else {
        return Reason::DropBackendMissing;
    };
    // SAFETY: as above.
    let Some(backend) = (unsafe { BACKENDS_V1.get(&slot_entry.backend_id) }).copied() else {
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
    if SOCK_RNAT_V1.insert(&rev_key, &rev_val, 0).is_err() && l4 == proto::UDP {
        // Without the entry, replies would reach the application from the backend's address,
        // which a DNS client rejects: refuse instead of half-translating.
        return Reason::DropRevNatFull;
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    Reason::TranslateToBackend
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
    // SAFETY: the value is copied out before anything else touches the map.
    let reason = match (unsafe { SOCK_RNAT_V1.get(&key) }).copied() {
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
