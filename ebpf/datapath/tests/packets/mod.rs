//! A small builder for the packets the datapath tests feed to BPF_PROG_TEST_RUN:
//! `pkt().ipv4(src, dst).tcp(sport, dport).build()`, with knobs to break each header field.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the builder"
)]

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

#[derive(Clone, Debug)]
enum Body {
    Empty,
    Arp,
    Ipv6,
    Ipv4(Ipv4),
}

#[derive(Clone, Debug)]
struct Ipv4 {
    src: [u8; 4],
    dst: [u8; 4],
    version: u8,
    ihl: u8,
    tot_len: Option<u16>,
    frag_offset: u16,
    more_fragments: bool,
    dont_fragment: bool,
    id: u16,
    tos: u8,
    ttl: u8,
    proto: u8,
    l4: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Packet {
    body: Body,
    truncate: Option<usize>,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    /// Compute TCP/UDP checksums (a zero UDP checksum otherwise).
    l4_checksum: bool,
}

pub fn pkt() -> Packet {
    Packet {
        body: Body::Empty,
        truncate: None,
        dst_mac: DST_MAC,
        src_mac: SRC_MAC,
        l4_checksum: true,
    }
}

impl Packet {
    pub fn macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    /// A UDP datagram without checksum (0), which translation must keep at 0.
    pub fn no_l4_checksum(mut self) -> Self {
        self.l4_checksum = false;
        self
    }

    pub fn arp(mut self) -> Self {
        self.body = Body::Arp;
        self
    }

    pub fn ipv6(mut self) -> Self {
        self.body = Body::Ipv6;
        self
    }

    pub fn ipv4(mut self, src: [u8; 4], dst: [u8; 4]) -> Self {
        self.body = Body::Ipv4(Ipv4 {
            src,
            dst,
            version: 4,
            ihl: 5,
            tot_len: None,
            frag_offset: 0,
            more_fragments: false,
            dont_fragment: false,
            id: 0,
            tos: 0,
            ttl: 64,
            proto: 0,
            l4: Vec::new(),
        });
        self
    }

    fn ip(&mut self) -> &mut Ipv4 {
        match &mut self.body {
            Body::Ipv4(ip) => ip,
            _ => panic!("call .ipv4() first"),
        }
    }

    pub fn version(mut self, v: u8) -> Self {
        self.ip().version = v;
        self
    }

    /// Header length in 32-bit words; above 5 adds zeroed options (NOPs would be 1s; zero is EOL).
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ip().ihl = ihl;
        self
    }

    pub fn tot_len(mut self, len: u16) -> Self {
        self.ip().tot_len = Some(len);
        self
    }

    /// Fragment offset in 8-byte units.
    pub fn frag_offset(mut self, off: u16) -> Self {
        self.ip().frag_offset = off;
        self
    }

    pub fn more_fragments(mut self) -> Self {
        self.ip().more_fragments = true;
        self
    }

    pub fn dont_fragment(mut self) -> Self {
        self.ip().dont_fragment = true;
        self
    }

    /// The IP identification (fragments of one datagram share it).
    pub fn id(mut self, id: u16) -> Self {
        self.ip().id = id;
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.ip().tos = tos;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ip().ttl = ttl;
        self
    }

    /// Sets the TCP flags byte (after `.tcp()`; SYN by default).
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.ip().l4[13] = flags;
        self
    }

    /// A later fragment's bytes: `len` bytes of datagram data, no L4 header (and so no L4
    /// checksum to compute).
    pub fn fragment_data(mut self, proto: u8, len: usize) -> Self {
        let ip = self.ip();
        ip.proto = proto;
        ip.l4 = vec![0xcd; len];
        self.l4_checksum = false;
        self
    }

    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
        h[12] = 5 << 4; // data offset
        h[13] = 0x02; // SYN
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let ip = self.ip();
        ip.proto = 6;
        ip.l4 = h;
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[4..6].copy_from_slice(&8u16.to_be_bytes());
        let ip = self.ip();
        ip.proto = 17;
        ip.l4 = h;
        self
    }

    pub fn icmp_echo(mut self) -> Self {
        let mut h = vec![0u8; 8];
        h[0] = 8; // echo request
        let ip = self.ip();
        ip.proto = 1;
        ip.l4 = h;
        self
    }

    /// An ICMP echo request (`kind` 8) or reply (0) with identifier `id`.
    pub fn icmp_echo_id(mut self, kind: u8, id: u16) -> Self {
        let mut h = vec![0u8; 8];
        h[0] = kind;
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let ip = self.ip();
        ip.proto = 1;
        ip.l4 = h;
        self
    }

    /// An SCTP common header with these ports (and no chunk).
    pub fn sctp(mut self, sport: u16, dport: u16) -> Self {
        let mut h = vec![0u8; 12];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        let ip = self.ip();
        ip.proto = 132;
        ip.l4 = h;
        self
    }

    /// An ICMP error (`kind`, `code`, e.g. 3/4: fragmentation needed) quoting `quote` (the
    /// quoted packet's bytes from its IP header on).
    pub fn icmp_error(self, kind: u8, code: u8, quote: &[u8]) -> Self {
        self.icmp_error_mtu(kind, code, 1500, quote)
    }

    /// [`Packet::icmp_error`] with this next-hop MTU.
    pub fn icmp_error_mtu(mut self, kind: u8, code: u8, mtu: u16, quote: &[u8]) -> Self {
        let mut h = vec![kind, code, 0, 0, 0, 0];
        h.extend_from_slice(&mtu.to_be_bytes());
        h.extend_from_slice(quote);
        let ip = self.ip();
        ip.proto = 1;
        ip.l4 = h;
        self
    }

    /// The first `len` bytes of this packet from its IP header on: what an ICMP error quotes.
    pub fn quote(&self, len: usize) -> Vec<u8> {
        self.build()[14..14 + len].to_vec()
    }

    /// Any L4 protocol with `len` zero bytes of payload.
    pub fn l4(mut self, proto: u8, len: usize) -> Self {
        let ip = self.ip();
        ip.proto = proto;
        ip.l4 = vec![0; len];
        self
    }

    /// Appends `n` payload bytes after the L4 header (fixing the UDP length).
    pub fn payload(mut self, n: usize) -> Self {
        let ip = self.ip();
        ip.l4.extend(std::iter::repeat_n(0xab, n));
        if ip.proto == 17 {
            let len = ip.l4.len() as u16;
            ip.l4[4..6].copy_from_slice(&len.to_be_bytes());
        }
        self
    }

    /// Cuts the frame to `len` bytes (after the headers claim more).
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        match &self.body {
            Body::Empty => f.extend_from_slice(&[0x88, 0xb5]), // local experimental ethertype
            Body::Arp => {
                f.extend_from_slice(&[0x08, 0x06]);
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend_from_slice(&SRC_MAC);
                f.extend_from_slice(&[10, 0, 0, 1]);
                f.extend_from_slice(&[0; 6]);
                f.extend_from_slice(&[10, 0, 0, 2]);
            }
            Body::Ipv6 => {
                f.extend_from_slice(&[0x86, 0xdd]);
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[6] = 59; // no next header
                h[7] = 64;
                f.extend_from_slice(&h);
            }
            Body::Ipv4(ip) => {
                f.extend_from_slice(&[0x08, 0x00]);
                let hlen = usize::from(ip.ihl.max(5)) * 4;
                let mut h = vec![0u8; hlen];
                h[0] = (ip.version << 4) | (ip.ihl & 0x0f);
                let tot = ip.tot_len.unwrap_or((hlen + ip.l4.len()) as u16);
                h[2..4].copy_from_slice(&tot.to_be_bytes());
                let frag = (ip.frag_offset & 0x1fff)
                    | if ip.more_fragments { 0x2000 } else { 0 }
                    | if ip.dont_fragment { 0x4000 } else { 0 };
                h[1] = ip.tos;
                h[4..6].copy_from_slice(&ip.id.to_be_bytes());
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = ip.ttl;
                h[9] = ip.proto;
                h[12..16].copy_from_slice(&ip.src);
                h[16..20].copy_from_slice(&ip.dst);
                let csum = checksum(&h);
                h[10..12].copy_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(&h);
                let mut l4 = ip.l4.clone();
                if ip.proto == 1 && l4.len() >= 4 && self.l4_checksum {
                    // ICMP: no pseudo header.
                    l4[2..4].copy_from_slice(&[0, 0]);
                    let c = checksum(&l4);
                    l4[2..4].copy_from_slice(&c.to_be_bytes());
                }
                let csum_at = match ip.proto {
                    6 if l4.len() >= 20 => Some(16),
                    17 if l4.len() >= 8 => Some(6),
                    _ => None,
                };
                if let (Some(at), true) = (csum_at, self.l4_checksum) {
                    l4[at..at + 2].copy_from_slice(&[0, 0]);
                    let mut c = l4_checksum(ip.src, ip.dst, ip.proto, &l4);
                    if c == 0 && ip.proto == 17 {
                        c = 0xffff;
                    }
                    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
                }
                f.extend_from_slice(&l4);
            }
        }
        if let Some(n) = self.truncate {
            f.truncate(n);
        }
        f
    }
}

/// The TCP/UDP checksum over the IPv4 pseudo header and `l4` (whose checksum field is zero).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let mut buf = Vec::with_capacity(12 + l4.len());
    buf.extend_from_slice(&src);
    buf.extend_from_slice(&dst);
    buf.extend_from_slice(&[0, proto]);
    buf.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    buf.extend_from_slice(l4);
    checksum(&buf)
}

/// True when the IPv4 header and TCP/UDP checksums of an Ethernet frame verify.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = &frame[14..14 + ihl];
    if checksum(ip) != 0 {
        return false;
    }
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    if frag & 0x3fff != 0 {
        // A fragment: its L4 checksum covers the whole datagram, not this piece.
        return true;
    }
    let l4 = &frame[14 + ihl..14 + tot];
    let (src, dst, proto) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
        ip[9],
    );
    if proto == 1 {
        // ICMP: its own checksum, and the quoted IP header's when it quotes one.
        let quote_ok = l4.len() < 28 || checksum(&l4[8..8 + usize::from(l4[8] & 0x0f) * 4]) == 0;
        return checksum(l4) == 0 && quote_ok;
    }
    if proto == 17 && l4[6] == 0 && l4[7] == 0 {
        return true; // no checksum
    }
    l4_checksum(src, dst, proto, l4) == 0
}

/// `frame` (Ethernet + IPv4) wrapped in IP-in-IP from `src` to `dst`, as a node's encapsulation
/// writes it: the inner packet's TOS and don't-fragment bit, TTL 64, identification `id`.
pub fn ipip(frame: &[u8], src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    let inner = &frame[14..];
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = inner[1];
    h[2..4].copy_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = inner[6] & 0x40;
    h[8] = 64;
    h[9] = 4;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..14].to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(inner);
    out
}

/// The Internet checksum (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn ipv4_header_checksum_verifies_to_zero() {
    let p = pkt().ipv4([10, 0, 0, 1], [10, 0, 0, 2]).tcp(1, 2).build();
    assert_eq!(checksum(&p[14..34]), 0);
}
