//! Header layouts, and the one bounds-checked accessor for packet data, for both TC and XDP.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action,
        xdp_md,
    },
    programs::{TcContext, XdpContext},
};

pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType in an Ethernet header.
const ETH_TYPE_OFFSET: usize = 12;
/// `ETH_P_IP` in network byte order, as a `u16` read from the packet.
const ETH_P_IP_BE16: u16 = 0x0800u16.to_be();
/// `ETH_P_IP` as `__sk_buff.protocol` holds it (network byte order, in a `u32`).
const ETH_P_IP_BE32: u32 = 0x0800u16.to_be() as u32;

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

/// Returns a pointer to a `T` at `offset` bytes into `[start, end)`, or `None` when it does not
/// fit. The caller may dereference it for reading.
#[inline(always)]
fn ptr_in<T>(start: usize, end: usize, offset: usize) -> Option<*const T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: `[start + offset, start + offset + size_of::<T>())` lies inside the packet's
    // linear data, which is what the verifier checks against `data_end`.
    Some((start + offset) as *const T)
}

/// A frame that starts with an Ethernet header, as TC and XDP programs see it.
pub trait Frame {
    /// Length of the whole frame in bytes.
    fn frame_len(&self) -> usize;
    /// A pointer to a `T` at `offset`, when the frame holds one there.
    fn header<T>(&self, offset: usize) -> Option<*const T>;
    /// Whether the frame carries IPv4.
    fn is_ipv4(&self) -> bool;
    /// A pointer to a `T` at `offset` the program may write through (TC: the verifier makes a
    /// cloned packet private before the program runs), when the frame holds one there.
    #[inline(always)]
    fn header_mut<T>(&self, offset: usize) -> Option<*mut T> {
        self.header::<T>(offset).map(<*const T>::cast_mut)
    }
}

/// What the per-packet paths need from the hook they run in, beyond the frame: TC (an skb,
/// after the stack took the frame in) or XDP (the driver's buffer, before any skb exists). The
/// translation code is written once over this; each hook's entry point picks its own.
pub trait Hooked: Frame {
    /// Whether this is XDP, which can send a frame only back out of the interface it came in
    /// on (`XDP_TX`); everything else it hands on to TC ([`Hooked::PASS`]) untouched.
    const XDP: bool;
    /// The action that hands the frame on unchanged: to the stack (TC), to the stack and so to
    /// TC (XDP).
    const PASS: i32;
    /// The action that drops the frame.
    const DROP: i32;
    /// Whether the frame is a GSO aggregate (longer than what goes on the wire).
    fn gso(&self) -> bool;
    /// The interface the frame arrived on (where a FIB lookup starts).
    fn arrival_ifindex(&self) -> u32;
    /// Adds `diff` (a sum of `csum_diff*` terms) to the TCP (`udp` false) or UDP checksum at
    /// `csum_off`; `pseudo` when the changed fields are in the pseudo-header (addresses).
    fn l4_checksum(&self, csum_off: usize, diff: u32, pseudo: bool, udp: bool) -> Result<(), i64>;
    /// The TC context, for what only TC does (answering with ICMP); `None` at XDP.
    fn tc(&self) -> Option<&TcContext>;
}

impl Hooked for TcContext {
    const XDP: bool = false;
    const PASS: i32 = TC_ACT_UNSPEC;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn gso(&self) -> bool {
        // SAFETY: `self` is a TC context, whose pointer is the kernel's `__sk_buff`.
        unsafe { (*(self.as_ptr() as *const __sk_buff)).gso_size != 0 }
    }

    #[inline(always)]
    fn arrival_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*(self.as_ptr() as *const __sk_buff)).ifindex }
    }

    /// With the kernel's helper, which knows the skb's checksum state (a receive checksum, an
    /// offloaded one it must keep partial, a UDP datagram without checksum).
    #[inline(always)]
    fn l4_checksum(&self, csum_off: usize, diff: u32, pseudo: bool, udp: bool) -> Result<(), i64> {
        let mut flags = 0u64;
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        self.l4_csum_replace(csum_off, 0, u64::from(diff), flags)
    }

    #[inline(always)]
    fn tc(&self) -> Option<&TcContext> {
        Some(self)
    }
}

impl Hooked for XdpContext {
    const XDP: bool = true;
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    #[inline(always)]
    fn gso(&self) -> bool {
        false
    }

    #[inline(always)]
    fn arrival_ifindex(&self) -> u32 {
        // SAFETY: `self` is an XDP context, whose pointer is the kernel's `xdp_md`.
        unsafe { (*(self.as_ptr() as *const xdp_md)).ingress_ifindex }
    }

    /// In the frame itself: a frame off the wire carries its whole checksum (no offload state
    /// exists before the skb). A UDP datagram sent without checksum (0) keeps none; one whose
    /// checksum comes to 0 is sent as 0xffff, as RFC 768 says.
    #[inline(always)]
    fn l4_checksum(&self, csum_off: usize, diff: u32, _pseudo: bool, udp: bool) -> Result<(), i64> {
        let check = self.header_mut::<u16>(csum_off).ok_or(-1i64)?;
        // SAFETY: `header_mut` checked that the two bytes lie inside the frame.
        unsafe {
            let old = check.read_unaligned();
            if udp && old == 0 {
                return Ok(());
            }
            let mut new = csum_apply(old, diff);
            if udp && new == 0 {
                new = 0xffff;
            }
            check.write_unaligned(new);
        }
        Ok(())
    }

    #[inline(always)]
    fn tc(&self) -> Option<&TcContext> {
        None
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    /// Pulls the non-linear part of the packet into the linear area when the header is there
    /// (GSO, paged frames), so a valid packet is never mistaken for a short one.
    #[inline(always)]
    fn header<T>(&self, offset: usize) -> Option<*const T> {
        if let Some(p) = ptr_in::<T>(self.data(), self.data_end(), offset) {
            return Some(p);
        }
        let want = (offset + size_of::<T>()) as u32;
        if self.len() < want || self.pull_data(want).is_err() {
            return None;
        }
        ptr_in::<T>(self.data(), self.data_end(), offset)
    }

    #[inline(always)]
    fn is_ipv4(&self) -> bool {
        self.skb.protocol() == ETH_P_IP_BE32
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn header<T>(&self, offset: usize) -> Option<*const T> {
        ptr_in::<T>(self.data(), self.data_end(), offset)
    }

    #[inline(always)]
    fn is_ipv4(&self) -> bool {
        match self.header::<u16>(ETH_TYPE_OFFSET) {
            // SAFETY: `header` checked that the two bytes lie inside the frame.
            Some(p) => (unsafe { p.read_unaligned() }) == ETH_P_IP_BE16,
            None => false,
        }
    }
}

/// Offsets in an Ethernet frame of the IPv4 header's checksum and addresses (no VLAN tag).
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// The header checksum of an IPv4 header without options.
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: `Ipv4Hdr` is 20 bytes of plain integers, `repr(C)` without padding.
    let words: [u16; 10] = unsafe { core::mem::transmute(*h) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(words[i]);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Folds a one's-complement sum to 16 bits.
#[inline(always)]
pub fn csum_fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// What a checksum must take in when a 32-bit field goes from `old` to `new` (RFC 1624: the
/// sum of `~old` and `new`), on the field's 16-bit words as they lie in memory; sums of these
/// are the diff form `bpf_l4_csum_replace` accepts.
#[inline(always)]
pub fn csum_diff32(old: u32, new: u32) -> u32 {
    let old = !old;
    (old & 0xffff) + (old >> 16) + (new & 0xffff) + (new >> 16)
}

/// The same for a 16-bit field.
#[inline(always)]
pub fn csum_diff16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// A stored checksum updated by a diff of [`csum_diff32`]/[`csum_diff16`] terms:
/// `~(~check + diff)`.
#[inline(always)]
pub fn csum_apply(check: u16, diff: u32) -> u16 {
    !csum_fold(u32::from(!check) + (diff & 0xffff) + (diff >> 16))
}
