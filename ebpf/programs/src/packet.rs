//! Header layouts and the one bounds-checked accessor for packet data.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
/// `ETH_P_IP` as `__sk_buff.protocol` holds it (network byte order).
pub const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// Network byte order.
    pub tot_len: u16,
    pub id: u16,
    /// Network byte order: flags (3 bits) and fragment offset (13 bits).
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Hdr>();
/// Fragment offset mask of `frag_off`, host byte order.
pub const IP_OFFSET: u16 = 0x1fff;

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `None` when the packet's
/// linear data is too short. The caller may dereference it for reading.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: `[start + offset, start + offset + size_of::<T>())` lies inside the packet's linear
    // data, which is what the verifier checks against `data_end`.
    Some((start + offset) as *const T)
}

/// Like [`ptr_at`], but first pulls the non-linear part of the packet into the linear area when
/// the header is there (GSO, paged frames), so a valid packet is never mistaken for a short one.
#[inline(always)]
pub fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    if let Some(p) = ptr_at::<T>(ctx, offset) {
        return Some(p);
    }
    let want = (offset + size_of::<T>()) as u32;
    if ctx.len() < want || ctx.pull_data(want).is_err() {
        return None;
    }
    ptr_at::<T>(ctx, offset)
}
