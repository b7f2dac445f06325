//! The ferrox kernel programs. Each entry point is a thin shell: it calls into a module that
//! owns one job, and returns the verdict that module chose. Every path ends in a named
//! [`Reason`](ferrox_abi::Reason), counted in `COUNTERS_V2`.
#![no_std]
#![no_main]
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "aya's #[classifier] expands to an entry point taking the kernel's raw __sk_buff pointer"
)]

mod classify;
mod conntrack;
mod counters;
mod ct_map;
mod events;
mod fib;
mod flow;
mod from_pod;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod policy;
mod resizing;
mod sock_lb;
mod to_pod;
mod tunnel;
mod uplink;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ferrox_abi::Hook;

/// Services reached by a socket: translate the destination before the connection is made.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_lb::forward(&ctx, Hook::SockConnect4)
}

/// Unconnected UDP datagrams to a service: translate each datagram's destination.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_lb::forward(&ctx, Hook::SockSendmsg4)
}

/// UDP replies from a backend: show the application the frontend it sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, Hook::SockRecvmsg4)
}

/// `getpeername()` on a translated socket: report the frontend, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, Hook::SockGetpeername4)
}

/// Packets leaving a pod (TC ingress of its host-side veth).
#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    from_pod::from_pod(&ctx)
}

/// Packets the host hands to a pod (TC egress of its host-side veth).
#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    to_pod::to_pod(&ctx)
}

/// Packets entering the node from its uplink.
#[classifier]
pub fn tc_uplink_in(ctx: TcContext) -> i32 {
    uplink::uplink_ingress(&ctx)
}

/// Packets leaving the node through its uplink: those to a remote pod block reached in
/// IP-in-IP are encapsulated here.
#[classifier]
pub fn tc_uplink_out(ctx: TcContext) -> i32 {
    uplink::uplink_egress(&ctx)
}

/// Frames arriving on the uplink, before the stack allocates an skb (when XDP is enabled):
/// flows from outside translated and sent back out where they can be.
#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    uplink::uplink_xdp(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program in which a panic is reachable; nothing calls this.
    loop {}
}

/// GPL-compatible, as the kernel requires for some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
