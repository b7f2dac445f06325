//! Pod programs as `cls_bpf` filters at the clsact ingress and egress of each pod's host veth.
//!
//! The uplink's programs are TCX links; a pod's is a netlink filter in direct-action mode,
//! because creating a TCX link waits for an RCU grace period with RTNL held
//! (`tcx_entry_sync()`: p50 15.8 ms on the 2-CPU VM, and every other link change of the node
//! waits behind it), while a filter is created without one. A filter also goes with its device
//! (DEL has nothing to detach), and its program is swapped in place by a change request on the
//! same priority and handle: that is how a new program version reaches running pods, atomically
//! per pod.
//!
//! Owns: the clsact qdisc, creating, changing and removing the pod filter, and listing the bpf filters of
//! an interface with their program ids (the kernel's `TCA_BPF_ID`).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Priority of a pod's filter: fixed, so that a change finds it and a dump recognises it.
pub const POD_FILTER_PRIORITY: u16 = 1;
/// Handle of a pod's filter (at [`POD_FILTER_PRIORITY`]).
pub const POD_FILTER_HANDLE: u32 = 1;

const ETH_P_ALL: u16 = 0x0003;
/// The clsact qdisc's handle (`TC_H_CLSACT`, minor 0) and its ingress hook.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
const CLSACT_INGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};
const CLSACT_EGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_EGRESS,
};

/// Which of an interface's clsact hooks a filter sits at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterHook {
    /// Packets the interface receives.
    Ingress,
    /// Packets the interface transmits.
    Egress,
}

impl FilterHook {
    fn parent(self) -> TcHandle {
        match self {
            Self::Ingress => CLSACT_INGRESS,
            Self::Egress => CLSACT_EGRESS,
        }
    }
}

/// One bpf filter at a clsact hook of an interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BpfFilter {
    pub ifindex: u32,
    pub hook: FilterHook,
    pub priority: u16,
    pub handle: u32,
    /// The name given at attach time (`TCA_BPF_NAME`): the program and bpffs root for ours.
    pub name: String,
    pub prog_id: u32,
    pub direct_action: bool,
}

impl BpfFilter {
    /// Whether this is a pod filter named `name` (see `attach::pod_filter_name`).
    pub fn is_pod_filter(&self, name: &str) -> bool {
        self.priority == POD_FILTER_PRIORITY
            && self.handle == POD_FILTER_HANDLE
            && self.name == name
    }
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace, for one thread.
pub(crate) struct TcSocket {
    socket: Socket,
    sequence: u32,
}

impl TcSocket {
    pub(crate) fn open() -> io::Result<Self> {
        let socket = Socket::new(NETLINK_ROUTE)?;
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Adds the clsact qdisc to `ifindex`; one already there is fine.
    pub(crate) fn ensure_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.handle = CLSACT_HANDLE;
        msg.header.parent = TcHandle::CLSACT;
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.request(RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_CREATE) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Makes the pod filter of `ifindex` run `prog_fd`: created when missing (with `create`),
    /// its program swapped in place otherwise. Without `create` a missing filter is `ENOENT`.
    pub(crate) fn set_pod_filter(
        &mut self,
        ifindex: u32,
        hook: FilterHook,
        prog_fd: std::os::fd::BorrowedFd<'_>,
        name: &str,
        create: bool,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut msg = pod_filter_message(ifindex, hook);
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd.as_raw_fd() as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        let flags = if create { NLM_F_CREATE } else { 0 };
        self.request(RouteNetlinkMessage::NewTrafficFilter(msg), flags)
            .map(drop)
    }

    /// Removes the pod filter at `hook` of `ifindex` (which detaches its program); false when
    /// there was none.
    pub(crate) fn delete_pod_filter(&mut self, ifindex: u32, hook: FilterHook) -> io::Result<bool> {
        let msg = pod_filter_message(ifindex, hook);
        match self.request(RouteNetlinkMessage::DelTrafficFilter(msg), 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The bpf filters at `hook` of `ifindex` (none without a clsact qdisc).
    pub(crate) fn filters(&mut self, ifindex: u32, hook: FilterHook) -> io::Result<Vec<BpfFilter>> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = hook.parent();
        let replies = match self.request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP) {
            Ok(r) => r,
            // The interface went away between listing and dumping.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => bpf_filter(ifindex, hook, f),
                _ => None,
            })
            .collect())
    }

    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send_to(&bytes, &SocketAddr::new(0, 0), 0)?;

        let mut out = Vec::new();
        let mut buffer = Vec::with_capacity(64 * 1024);
        loop {
            buffer.clear();
            self.socket.recv(&mut buffer, 0)?;
            let mut rest = &buffer[..];
            while !rest.is_empty() {
                let length = NetlinkBuffer::new_checked(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                    .length() as usize;
                let raw = rest.get(..length).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "netlink message past datagram")
                })?;
                rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::Done(d) if d.code < 0 => {
                        return Err(io::Error::from_raw_os_error(-d.code));
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }
}

/// A request about the pod filter at `hook` of `ifindex` (its hook, priority, handle and kind).
fn pod_filter_message(ifindex: u32, hook: FilterHook) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = TcHandle::from(POD_FILTER_HANDLE);
    msg.header.parent = hook.parent();
    msg.header.info = filter_info(POD_FILTER_PRIORITY);
    msg.attributes
        .push(TcAttribute::Kind(TcFilterBpf::KIND.into()));
    msg
}

/// `tcm_info` of a filter: its priority and protocol (all, network order).
fn filter_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be())
}

fn bpf_filter(ifindex: u32, hook: FilterHook, message: TcMessage) -> Option<BpfFilter> {
    let mut filter = BpfFilter {
        ifindex,
        hook,
        priority: (message.header.info >> 16) as u16,
        handle: message.header.handle.into(),
        name: String::new(),
        prog_id: 0,
        direct_action: false,
    };
    let mut bpf = false;
    for attribute in message.attributes {
        match attribute {
            TcAttribute::Kind(kind) => bpf = kind == TcFilterBpf::KIND,
            TcAttribute::Options(options) => {
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => filter.name = n,
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = id,
                        TcOption::Bpf(TcFilterBpfOption::Flags(f)) => {
                            filter.direct_action = f.contains(TcBpfFlags::DirectAction);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // A dump also lists each priority's chain head (no handle, no options).
    (bpf && filter.prog_id != 0).then_some(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_info_puts_priority_high_and_protocol_in_network_order() {
        let info = filter_info(POD_FILTER_PRIORITY);
        assert_eq!(info >> 16, 1);
        assert_eq!((info & 0xffff) as u16, 0x0003u16.to_be());
    }

    #[test]
    fn parsing_keeps_only_bpf_filters_with_a_program() {
        let mut m = TcMessage::with_index(7);
        m.header.handle = TcHandle::from(POD_FILTER_HANDLE);
        m.header.info = filter_info(POD_FILTER_PRIORITY);
        m.attributes.push(TcAttribute::Kind("bpf".into()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgName("tc_from_pod".into())),
            TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        let f = bpf_filter(7, FilterHook::Ingress, m.clone()).unwrap();
        assert!(f.is_pod_filter("tc_from_pod"));
        assert!(!f.is_pod_filter("tc_uplink_ingress"));
        assert_eq!((f.prog_id, f.direct_action), (42, true));

        let mut head = m.clone();
        head.attributes.truncate(1);
        assert_eq!(
            bpf_filter(7, FilterHook::Ingress, head),
            None,
            "a chain head has no program"
        );
        let mut u32_filter = m;
        u32_filter.attributes[0] = TcAttribute::Kind("u32".into());
        assert_eq!(bpf_filter(7, FilterHook::Ingress, u32_filter), None);
    }
}
