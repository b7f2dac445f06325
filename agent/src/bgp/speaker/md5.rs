//! TCP MD5 signatures (RFC 2385) on the speaker's sockets: the `TCP_MD5SIG` socket option with
//! one key per peer address.

use std::net::Ipv4Addr;

/// `struct tcp_md5sig` of `linux/tcp.h`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

/// Sets (or, with `None`, removes) the MD5 key for connections with `peer` on socket `fd`.
pub fn set_md5(fd: std::os::fd::RawFd, peer: Ipv4Addr, key: Option<&str>) -> std::io::Result<()> {
    let key = key.unwrap_or("").as_bytes();
    if key.len() > 80 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a TCP MD5 key is at most 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid `tcp_md5sig` (an empty key, no flags).
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(peer.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a `sockaddr_in` fits at the start of a `sockaddr_storage`.
    unsafe {
        std::ptr::write((&raw mut sig.addr).cast::<libc::sockaddr_in>(), sin);
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
