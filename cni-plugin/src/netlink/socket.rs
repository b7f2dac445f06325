//! The NETLINK_ROUTE socket and the request/reply exchange every operation
//! goes through.
//!
//! Owns: opening the socket in a given network namespace, numbering requests,
//! and turning the kernel's replies (data, ACK, error, end of dump) into
//! messages or an [`Error`] with context. Must never hand back a reply to a
//! different request (replies are matched on the sequence number) and never
//! report success before the kernel's ACK arrived.

use std::cell::Cell;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::error::{Error, Result};
use super::netns::{open_netns, with_netns_fd};

/// Big enough for any single datagram the kernel sends: dumps are capped at
/// 32 KiB per datagram (`netlink_dump`), unicast replies are smaller.
const RECV_BUFFER: usize = 64 * 1024;

/// A dump is retried this many times when the kernel flags it as
/// inconsistent (`NLM_F_DUMP_INTR`, the table changed while being dumped).
const DUMP_ATTEMPTS: u32 = 3;

/// `NLMSGERR_ATTR_MSG`: the extended-ACK attribute holding the kernel's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Length of `struct nlmsghdr`.
const NLMSG_HEADER_LEN: usize = 16;

/// A NETLINK_ROUTE socket bound to one network namespace.
///
/// The socket stays in the namespace it was created in, whatever the calling
/// thread does afterwards. One `Netlink` serves one thread at a time (it is
/// `Send` but not `Sync`): requests are sent and answered one by one.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    sequence: Cell<u32>,
}

/// Which operation on which object, for error messages.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) op: &'static str,
    pub(super) target: &'a str,
}

impl Ctx<'_> {
    pub(super) fn decode(&self, reason: impl ToString) -> Error {
        Error::Decode {
            op: self.op,
            target: self.target.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn socket(&self, source: io::Error) -> Error {
        Error::Socket {
            op: self.op,
            target: self.target.to_owned(),
            source,
        }
    }

    pub(super) fn invalid(&self, reason: &'static str) -> Error {
        Error::InvalidArgument {
            op: self.op,
            target: self.target.to_owned(),
            reason,
        }
    }

    fn kernel(&self, errno: i32, kernel_message: Option<String>) -> Error {
        Error::Kernel {
            op: self.op,
            target: self.target.to_owned(),
            kernel_message,
            source: io::Error::from_raw_os_error(errno.abs()),
        }
    }
}

/// What one request/reply exchange produced.
struct Replies {
    messages: Vec<RouteNetlinkMessage>,
    /// The kernel flagged at least one part with `NLM_F_DUMP_INTR`.
    interrupted: bool,
}

impl Netlink {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Self> {
        let socket = Socket::new(NETLINK_ROUTE).map_err(|source| Error::Open { source })?;
        // Best effort: both only improve what errors say and how big ACKs
        // are (extended ACK since Linux 4.12, capped ACK since 4.3).
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Self {
            socket,
            sequence: Cell::new(0),
        })
    }

    /// Opens a socket inside the network namespace `netns` (an open
    /// `/run/netns/<name>` or `/proc/<pid>/ns/net`). The calling thread
    /// enters the namespace only to create the socket and is moved back
    /// before this returns, also on error.
    pub fn open_in(netns: impl AsFd) -> Result<Self> {
        with_netns_fd(netns.as_fd(), Self::open)?
    }

    /// Like [`Netlink::open_in`], for a namespace given by its path.
    pub fn open_in_path(netns: &Path) -> Result<Self> {
        let file = open_netns(netns)?;
        Self::open_in(&file)
    }

    fn next_sequence(&self) -> u32 {
        let next = self.sequence.get().wrapping_add(1);
        self.sequence.set(next);
        next
    }

    /// Sends a request that changes state (or gets one object) and waits for
    /// the kernel's ACK. Returns the data messages that came before it.
    pub(super) fn request(
        &self,
        ctx: Ctx<'_>,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        Ok(self.exchange(ctx, message, flags)?.messages)
    }

    /// Like [`Netlink::request`], but "not found" is an answer, not an
    /// error: returns `Ok(None)` when the kernel says `errno`.
    pub(super) fn request_unless(
        &self,
        ctx: Ctx<'_>,
        message: RouteNetlinkMessage,
        flags: u16,
        not_found: &[i32],
    ) -> Result<Option<Vec<RouteNetlinkMessage>>> {
        match self.request(ctx, message, flags) {
            Ok(messages) => Ok(Some(messages)),
            Err(err @ Error::Kernel { .. }) => match err.raw_os_error() {
                Some(errno) if not_found.contains(&errno) => Ok(None),
                _ => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// Sends a dump request and collects every part until `NLMSG_DONE`,
    /// retrying when the kernel says the dump was inconsistent.
    pub(super) fn dump(
        &self,
        ctx: Ctx<'_>,
        message: &RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let replies = self.exchange(ctx, message.clone(), NLM_F_DUMP)?;
            if !replies.interrupted {
                return Ok(replies.messages);
            }
        }
        Err(Error::DumpInterrupted {
            op: ctx.op,
            target: ctx.target.to_owned(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    fn exchange(&self, ctx: Ctx<'_>, message: RouteNetlinkMessage, flags: u16) -> Result<Replies> {
        let sequence = self.next_sequence();
        let bytes = encode(message, flags | NLM_F_REQUEST | NLM_F_ACK, sequence);
        let sent = self
            .socket
            .send_to(&bytes, &SocketAddr::new(0, 0), 0)
            .map_err(|e| ctx.socket(e))?;
        if sent != bytes.len() {
            return Err(ctx.socket(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", bytes.len()),
            )));
        }

        let mut replies = Replies {
            messages: Vec::new(),
            interrupted: false,
        };
        let mut buffer = Vec::with_capacity(RECV_BUFFER);
        loop {
            self.receive(ctx, &mut buffer)?;
            for raw in Datagram::new(&buffer) {
                let raw = raw.map_err(|e| ctx.decode(e))?;
                if let Step::Finished = handle_reply(ctx, raw, sequence, &mut replies)? {
                    return Ok(replies);
                }
            }
        }
    }

    /// Reads one datagram into `buffer`, refusing a truncated one.
    fn receive(&self, ctx: Ctx<'_>, buffer: &mut Vec<u8>) -> Result<()> {
        loop {
            buffer.clear();
            // MSG_TRUNC makes recv return the datagram's real length.
            match self.socket.recv(buffer, libc::MSG_TRUNC) {
                Ok(length) if length > buffer.len() => {
                    return Err(ctx.decode(format!(
                        "reply of {length} bytes truncated to {}",
                        buffer.len()
                    )));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ctx.socket(e)),
            }
        }
    }
}

enum Step {
    More,
    Finished,
}

/// Folds one netlink message of a reply datagram into `replies`.
fn handle_reply(ctx: Ctx<'_>, raw: &[u8], sequence: u32, replies: &mut Replies) -> Result<Step> {
    let header = NetlinkBuffer::new(raw);
    if header.sequence_number() != sequence {
        // Left over from an earlier request (e.g. after an error mid-dump).
        return Ok(Step::More);
    }
    let flags = header.flags();
    if flags & NLM_F_DUMP_INTR != 0 {
        replies.interrupted = true;
    }
    let message =
        NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw).map_err(|e| ctx.decode(e))?;
    match message.payload {
        NetlinkPayload::InnerMessage(inner) => {
            replies.messages.push(inner);
            Ok(Step::More)
        }
        NetlinkPayload::Error(error) => match error.code {
            None => Ok(Step::Finished),
            Some(code) => Err(ctx.kernel(code.get(), error_ack_text(flags, &error.header))),
        },
        NetlinkPayload::Done(done) if done.code < 0 => {
            let text = (flags & NLM_F_ACK_TLVS != 0)
                .then(|| ext_ack_text(&done.extended_ack))
                .flatten();
            Err(ctx.kernel(done.code, text))
        }
        NetlinkPayload::Done(_) => Ok(Step::Finished),
        NetlinkPayload::Overrun(_) => Err(ctx.decode("kernel reported an overrun")),
        _ => Ok(Step::More),
    }
}

/// Serialises one request.
pub(super) fn encode(message: RouteNetlinkMessage, flags: u16, sequence: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

/// The netlink messages packed in one datagram.
struct Datagram<'a> {
    rest: &'a [u8],
}

impl<'a> Datagram<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for Datagram<'a> {
    type Item = std::result::Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let checked = NetlinkBuffer::new_checked(self.rest)
            .map_err(|e| e.to_string())
            .and_then(|buffer| {
                let length = buffer.length() as usize;
                let message = self
                    .rest
                    .get(..length)
                    .ok_or("message longer than datagram")?;
                Ok((message, length))
            });
        match checked {
            Ok((message, length)) => {
                self.rest = self.rest.get(align4(length)..).unwrap_or_default();
                Some(Ok(message))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

fn align4(length: usize) -> usize {
    length.next_multiple_of(4)
}

/// The kernel's text in an `NLMSG_ERROR` payload (after the errno): the
/// echoed request header (and body, unless capped), then attributes.
fn error_ack_text(flags: u16, after_errno: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HEADER_LEN
    } else {
        let length: [u8; 4] = after_errno.get(..4)?.try_into().ok()?;
        u32::from_ne_bytes(length) as usize
    };
    ext_ack_text(after_errno.get(align4(echoed)..)?)
}

/// The `NLMSGERR_ATTR_MSG` string among extended-ACK attributes.
fn ext_ack_text(attributes: &[u8]) -> Option<String> {
    NlasIterator::new(attributes)
        .map_while(|nla| nla.ok())
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let text = nla.value();
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            String::from_utf8_lossy(text).into_owned()
        })
        .filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR};

    use super::*;

    /// One raw netlink message: header + payload, padded to 4 bytes.
    fn raw(kind: u16, flags: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
        let length = (NLMSG_HEADER_LEN + payload.len()) as u32;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&length.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    /// An NLMSG_ERROR payload as the kernel sends it with NETLINK_CAP_ACK and
    /// NETLINK_EXT_ACK: errno, echoed request header, attributes.
    fn capped_error(errno: i32, sequence: u32, text: &str) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload
            .extend(raw(24, NLM_F_REQUEST | NLM_F_ACK, sequence, &[])[..NLMSG_HEADER_LEN].iter());
        payload.extend(nla(NLMSGERR_ATTR_MSG, format!("{text}\0").as_bytes()));
        raw(
            NLMSG_ERROR,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            sequence,
            &payload,
        )
    }

    fn replies() -> Replies {
        Replies {
            messages: Vec::new(),
            interrupted: false,
        }
    }

    const CTX: Ctx<'static> = Ctx {
        op: "add route",
        target: "10.0.0.0/24",
    };

    #[test]
    fn datagram_splits_packed_messages_and_rejects_a_cut_one() {
        let mut bytes = raw(NLMSG_DONE, 0, 1, &[0, 0, 0, 0]);
        bytes.extend(raw(NLMSG_DONE, 0, 2, &[0, 0, 0, 0, 9]));
        let parts: Vec<_> = Datagram::new(&bytes)
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[1].len(),
            NLMSG_HEADER_LEN + 5,
            "padding is not part of a message"
        );

        let cut = &bytes[..bytes.len() - 8];
        let results: Vec<_> = Datagram::new(cut).collect();
        assert_eq!(results.len(), 2);
        assert!(results[1].is_err());
    }

    #[test]
    fn extended_ack_text_is_extracted_from_capped_and_uncapped_errors() {
        let capped = capped_error(libc::EINVAL, 7, "Invalid prefix for given prefix length");
        let payload = &capped[NLMSG_HEADER_LEN + 4..];
        assert_eq!(
            error_ack_text(NLM_F_CAPPED | NLM_F_ACK_TLVS, payload).as_deref(),
            Some("Invalid prefix for given prefix length")
        );
        assert_eq!(
            error_ack_text(NLM_F_CAPPED, payload),
            None,
            "no TLV flag, no text"
        );

        // Uncapped: the whole 20-byte request is echoed before the attributes.
        let mut uncapped = raw(24, 0, 7, &[1, 2, 3, 4]);
        uncapped.extend(nla(NLMSGERR_ATTR_MSG, b"Nexthop has invalid gateway\0"));
        assert_eq!(
            error_ack_text(NLM_F_ACK_TLVS, &uncapped).as_deref(),
            Some("Nexthop has invalid gateway")
        );
    }

    #[test]
    fn ack_finishes_and_error_carries_errno_and_text() {
        let mut got = replies();
        let ack = raw(NLMSG_ERROR, 0, 5, &[0; 20]);
        assert!(matches!(
            handle_reply(CTX, &ack, 5, &mut got),
            Ok(Step::Finished)
        ));

        let nack = capped_error(libc::EEXIST, 5, "File exists");
        let err = match handle_reply(CTX, &nack, 5, &mut got) {
            Err(err) => err,
            Ok(_) => panic!("an errno must be an error"),
        };
        assert!(err.is_already_exists());
        assert!(err.to_string().contains("(kernel: File exists)"), "{err}");
    }

    #[test]
    fn replies_to_other_requests_are_ignored() {
        let mut got = replies();
        let stale = capped_error(libc::EEXIST, 4, "File exists");
        assert!(matches!(
            handle_reply(CTX, &stale, 5, &mut got),
            Ok(Step::More)
        ));
    }

    #[test]
    fn failed_dump_reports_the_done_code() {
        let mut got = replies();
        let done = raw(
            NLMSG_DONE,
            NLM_F_DUMP_INTR,
            9,
            &(-libc::EBUSY).to_ne_bytes(),
        );
        let err = match handle_reply(CTX, &done, 9, &mut got) {
            Err(err) => err,
            Ok(_) => panic!("a negative DONE code must be an error"),
        };
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
        assert!(got.interrupted);
    }

    #[test]
    fn encode_sets_flags_sequence_and_length() {
        use netlink_packet_route::link::LinkMessage;
        let bytes = encode(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST,
            42,
        );
        let header = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(header.length() as usize, bytes.len());
        assert_eq!(header.sequence_number(), 42);
        assert_eq!(header.flags(), NLM_F_REQUEST);
        assert_eq!(header.message_type(), 18, "RTM_GETLINK");
    }
}
