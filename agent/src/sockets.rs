//! Closing connected UDP sockets whose Service backend left.
//!
//! The socket hooks translate a connected UDP socket once, at `connect()`. When its backend
//! then leaves, every datagram would keep going to the departed address and the application
//! would never learn why its queries time out (the black hole kube-proxy fixes by flushing
//! conntrack, and Cilium by destroying the socket). The agent destroys such sockets: the
//! application's next call fails with `ECONNABORTED`, and the new socket it opens is sent to a
//! live backend.
//!
//! Which sockets: those the socket reverse-translation map records, by socket cookie, as sent to
//! the departed backend for that frontend, and that are still connected to it. An unconnected
//! socket (translated per datagram) or one that dialled the backend's address itself is never
//! touched. Where: every network namespace on the node (pods and host), found through
//! `/proc/<pid>/ns/net` (the agent runs in the host PID namespace), with sock_diag's
//! `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`).

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

/// A connected UDP socket to close: its cookie and the backend it is connected to (network
/// byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` (up to and including the socket id).
const MSG_ID_OFF: usize = 4;

/// Every network namespace of the node, one path per namespace.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // The link's target is the namespace's inode: one path per namespace. A process that
        // exited meanwhile is skipped.
        if let Ok(meta) = std::fs::metadata(&path) {
            use std::os::unix::fs::MetadataExt as _;
            seen.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    }
    seen.into_values().collect()
}

/// Destroys the sockets of `targets` in every namespace of the node; returns how many.
pub fn destroy_connected_udp(targets: &[Target]) -> io::Result<usize> {
    if targets.is_empty() {
        return Ok(0);
    }
    let by_cookie: HashMap<u64, Target> = targets.iter().map(|t| (t.cookie, *t)).collect();
    // A thread of its own: entering namespaces never touches the caller's thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut destroyed = 0;
            for ns in namespaces() {
                match ferrox_cni::netlink::with_netns(&ns, || destroy_here(&by_cookie)) {
                    Ok(Ok(n)) => destroyed += n,
                    // The namespace went away meanwhile, or is not ours to enter.
                    Ok(Err(e)) => {
                        tracing::debug!(netns = %ns.display(), error = %e, "socket scan failed")
                    }
                    Err(e) => tracing::debug!(netns = %ns.display(), error = %e, "cannot enter"),
                }
            }
            Ok(destroyed)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the socket scan panicked")))
    })
}

/// A NETLINK_SOCK_DIAG socket in the calling thread's namespace.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned by the returned value.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sock_diag request for UDP over IPv4: header, then `inet_diag_req_v2` with `id`.
fn request(kind: u16, flags: u16, seq: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_INET as u8);
    m.push(libc::IPPROTO_UDP as u8);
    m.push(0); // idiag_ext
    m.push(0); // pad
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a valid buffer of its length; the kernel is the default destination.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One netlink message of a datagram: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        off += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// The error code of an NLMSG_ERROR payload (0 is an ACK).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
}

/// Destroys, in the calling thread's namespace, the UDP sockets of `targets` still connected to
/// their backend.
fn destroy_here(targets: &HashMap<u64, Target>) -> io::Result<usize> {
    let fd = diag_socket()?;
    send(
        &fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut doomed: Vec<[u8; SOCKID_LEN]> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    'dump: loop {
        let n = recv(&fd, &mut buf)?;
        if n == 0 {
            break;
        }
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => {
                    let code = error_code(payload);
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY => {
                    let Some(id) = payload.get(MSG_ID_OFF..MSG_ID_OFF + SOCKID_LEN) else {
                        continue;
                    };
                    let id: [u8; SOCKID_LEN] = id.try_into().unwrap_or([0; SOCKID_LEN]);
                    let dport = u16::from_ne_bytes([id[2], id[3]]);
                    let dst = u32::from_ne_bytes([id[20], id[21], id[22], id[23]]);
                    let cookie = u64::from(u32::from_ne_bytes([id[40], id[41], id[42], id[43]]))
                        | u64::from(u32::from_ne_bytes([id[44], id[45], id[46], id[47]])) << 32;
                    if targets
                        .get(&cookie)
                        .is_some_and(|t| t.addr == dst && t.port == dport)
                    {
                        doomed.push(id);
                    }
                }
                _ => {}
            }
        }
    }
    let mut destroyed = 0;
    for (seq, id) in (2u32..).zip(&doomed) {
        send(
            &fd,
            &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, id),
        )?;
        let n = recv(&fd, &mut buf)?;
        for (kind, payload) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR {
                match -error_code(payload) {
                    0 => destroyed += 1,
                    // Closed by its owner meanwhile.
                    libc::ENOENT => {}
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;

    #[test]
    fn a_destroy_request_has_the_kernel_layout() {
        let mut id = [0u8; SOCKID_LEN];
        id[40] = 0xaa;
        let m = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 7, &id);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            SOCK_DESTROY
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&m[24..], &id);
    }

    #[test]
    fn messages_walk_a_datagram_and_stop_at_a_truncated_one() {
        let mut buf = Vec::new();
        for (kind, body) in [
            (SOCK_DIAG_BY_FAMILY, &[1u8, 2, 3][..]),
            (NLMSG_DONE, &[][..]),
        ] {
            let len = (NLMSG_HDRLEN + body.len()) as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(body);
            while buf.len() % 4 != 0 {
                buf.push(0);
            }
        }
        let got: Vec<(u16, Vec<u8>)> = messages(&buf).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![(SOCK_DIAG_BY_FAMILY, vec![1, 2, 3]), (NLMSG_DONE, vec![])]
        );
        assert_eq!(messages(&buf[..10]).count(), 0);
    }
}
