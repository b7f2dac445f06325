//! Classification of frames at TC and XDP: which family, which L4 protocol, whether the IPv4
//! header is sound. For now every sound frame passes; a malformed IPv4 header is dropped and
//! counted.

use ferrox_abi::{Reason, proto};

use crate::packet::{ETH_HLEN, Frame, IP_OFFSET, IPV4_MIN_HLEN, Ipv4Hdr};

#[inline(always)]
pub fn classify(frame: &impl Frame) -> Reason {
    if !frame.is_ipv4() {
        return Reason::PassNotIpv4;
    }
    let Some(ip) = frame.header::<Ipv4Hdr>(ETH_HLEN) else {
        return Reason::DropMalformedIpv4;
    };
    // SAFETY: `header` checked that a whole `Ipv4Hdr` lies inside the frame.
    let ip = unsafe { ip.read_unaligned() };
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    let l3_len = frame.frame_len().saturating_sub(ETH_HLEN);
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl || tot_len > l3_len {
        return Reason::DropMalformedIpv4;
    }
    if u16::from_be(ip.frag_off) & IP_OFFSET != 0 {
        // Not the first fragment: no L4 header to look at.
        return Reason::PassIpv4Fragment;
    }
    match ip.proto {
        proto::TCP => Reason::PassTcp,
        proto::UDP => Reason::PassUdp,
        proto::ICMP => Reason::PassIcmp,
        _ => Reason::PassOtherL4,
    }
}
