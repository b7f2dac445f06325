//! Network interfaces (links): look up, list, create veth pairs, delete, set
//! up/MTU/MAC.
//!
//! Owns the translation between [`LinkInfo`]/[`LinkId`] and rtnetlink link
//! messages. Must never create a link without `NLM_F_EXCL` (an existing
//! interface is reported, not silently reused) and never treat a missing
//! link as an error where "absent" is a valid answer (lookups, deletes).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd};
use std::str::FromStr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as InfoAttribute, LinkMessage,
};

use super::error::Result;
use super::socket::{Ctx, Netlink};

/// `IFNAMSIZ` minus the terminating NUL.
const MAX_NAME_LEN: usize = 15;

/// Names a link either by index or by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkId<'a> {
    /// The interface index (`ip link` shows it first).
    Index(u32),
    /// The interface name, at most 15 bytes.
    Name(&'a str),
}

impl From<u32> for LinkId<'_> {
    fn from(index: u32) -> Self {
        Self::Index(index)
    }
}

impl<'a> From<&'a str> for LinkId<'a> {
    fn from(name: &'a str) -> Self {
        Self::Name(name)
    }
}

impl<'a> From<&'a String> for LinkId<'a> {
    fn from(name: &'a String) -> Self {
        Self::Name(name)
    }
}

impl fmt::Display for LinkId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Index(index) => write!(f, "ifindex {index}"),
            Self::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub(super) fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not six colon-separated hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes such as 02:42:ac:11:00:02")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseMacError(text.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(invalid)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        match parts.next() {
            Some(_) => Err(invalid()),
            None => Ok(Self(bytes)),
        }
    }
}

/// RFC 2863 operational state (`IFLA_OPERSTATE`), as `ip link` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperState {
    /// The driver does not report a state (e.g. `lo`).
    Unknown,
    /// A component is missing.
    NotPresent,
    /// Down (e.g. admin down, or no carrier).
    Down,
    /// Down because a lower device is (e.g. a veth whose peer is down).
    LowerLayerDown,
    /// In test mode.
    Testing,
    /// Waiting for an external event.
    Dormant,
    /// Up and able to pass packets.
    Up,
    /// A value this module does not know.
    Other(u8),
}

impl From<u8> for OperState {
    fn from(value: u8) -> Self {
        match value {
            0 => Self::Unknown,
            1 => Self::NotPresent,
            2 => Self::Down,
            3 => Self::LowerLayerDown,
            4 => Self::Testing,
            5 => Self::Dormant,
            6 => Self::Up,
            other => Self::Other(other),
        }
    }
}

/// What the kernel reports about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: Option<u32>,
    /// Hardware address, for Ethernet-like links.
    pub mac: Option<MacAddr>,
    /// Administratively up (`IFF_UP`, what `set_up` changes).
    pub up: bool,
    /// Operational state (carrier and lower layers included).
    pub oper_state: OperState,
    /// Driver kind (`"veth"`, `"dummy"`, ...), absent for physical devices.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's index in the peer's namespace.
    pub link_index: Option<u32>,
}

impl Netlink {
    /// Looks a link up by index or name; `Ok(None)` when it does not exist.
    pub fn link<'a>(&self, id: impl Into<LinkId<'a>>) -> Result<Option<LinkInfo>> {
        let id = id.into();
        let target = id.to_string();
        let ctx = Ctx {
            op: "get link",
            target: &target,
        };
        let request = selector(ctx, id)?;
        let replies = self.request_unless(
            ctx,
            RouteNetlinkMessage::GetLink(request),
            0,
            &[libc::ENODEV],
        )?;
        let Some(replies) = replies else {
            return Ok(None);
        };
        replies
            .iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|link| parse_link(link).map_err(|e| ctx.decode(e)))
            .transpose()
    }

    /// Every link in this socket's namespace.
    pub fn list_links(&self) -> Result<Vec<LinkInfo>> {
        let ctx = Ctx {
            op: "list links",
            target: "",
        };
        let replies = self.dump(ctx, &RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        replies
            .iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|link| parse_link(link).map_err(|e| ctx.decode(e)))
            .collect()
    }

    /// Creates a veth pair: `name` in this socket's namespace, `peer_name`
    /// created directly inside `peer_netns` (so a pod's `eth0` never meets
    /// the host's `eth0`). Both ends get `mtu` when given. Both start down.
    ///
    /// Fails with [`Error::is_already_exists`](super::Error::is_already_exists)
    /// if either name is taken in its namespace.
    pub fn create_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_netns: impl AsFd,
        mtu: Option<u32>,
    ) -> Result<()> {
        let target = format!("{name:?} (peer {peer_name:?})");
        let ctx = Ctx {
            op: "create veth",
            target: &target,
        };
        check_name(name).map_err(|reason| ctx.invalid(reason))?;
        check_name(peer_name).map_err(|reason| ctx.invalid(reason))?;
        let message = veth_message(name, peer_name, peer_netns.as_fd().as_raw_fd(), mtu);
        self.request(
            ctx,
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Deletes a link. Returns `false` when it did not exist. Deleting one
    /// end of a veth pair deletes the other end too.
    pub fn delete_link<'a>(&self, id: impl Into<LinkId<'a>>) -> Result<bool> {
        let id = id.into();
        let target = id.to_string();
        let ctx = Ctx {
            op: "delete link",
            target: &target,
        };
        let request = selector(ctx, id)?;
        let deleted = self.request_unless(
            ctx,
            RouteNetlinkMessage::DelLink(request),
            0,
            &[libc::ENODEV],
        )?;
        Ok(deleted.is_some())
    }

    /// Sets a link administratively up.
    pub fn set_up<'a>(&self, id: impl Into<LinkId<'a>>) -> Result<()> {
        self.set_flags("set link up", id.into(), true)
    }

    /// Sets a link administratively down.
    pub fn set_down<'a>(&self, id: impl Into<LinkId<'a>>) -> Result<()> {
        self.set_flags("set link down", id.into(), false)
    }

    fn set_flags(&self, op: &'static str, id: LinkId<'_>, up: bool) -> Result<()> {
        let target = id.to_string();
        let ctx = Ctx {
            op,
            target: &target,
        };
        let mut message = selector(ctx, id)?;
        message.header.flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        message.header.change_mask = LinkFlags::Up;
        self.request(ctx, RouteNetlinkMessage::SetLink(message), 0)?;
        Ok(())
    }

    /// Renames a link (the kernel refuses while it is up).
    pub fn set_name<'a>(&self, id: impl Into<LinkId<'a>>, name: &str) -> Result<()> {
        check_name(name).map_err(|reason| {
            Ctx {
                op: "rename link",
                target: name,
            }
            .invalid(reason)
        })?;
        self.set_attribute(
            "rename link",
            id.into(),
            LinkAttribute::IfName(name.to_owned()),
        )
    }

    /// Sets a link's MTU.
    pub fn set_mtu<'a>(&self, id: impl Into<LinkId<'a>>, mtu: u32) -> Result<()> {
        self.set_attribute("set mtu", id.into(), LinkAttribute::Mtu(mtu))
    }

    /// Sets a link's hardware address.
    pub fn set_mac<'a>(&self, id: impl Into<LinkId<'a>>, mac: MacAddr) -> Result<()> {
        self.set_attribute("set mac", id.into(), LinkAttribute::Address(mac.0.to_vec()))
    }

    fn set_attribute(
        &self,
        op: &'static str,
        id: LinkId<'_>,
        attribute: LinkAttribute,
    ) -> Result<()> {
        let target = id.to_string();
        let ctx = Ctx {
            op,
            target: &target,
        };
        let mut message = selector(ctx, id)?;
        message.attributes.push(attribute);
        self.request(ctx, RouteNetlinkMessage::SetLink(message), 0)?;
        Ok(())
    }
}

/// The kernel's rules for interface names (`dev_valid_name`).
pub(super) fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("an interface name must not be empty, \".\" or \"..\"");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("an interface name is at most 15 bytes");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("an interface name must not contain '/', ':' or whitespace");
    }
    Ok(())
}

/// A link message naming one link, to be completed by the caller.
fn selector(ctx: Ctx<'_>, id: LinkId<'_>) -> Result<LinkMessage> {
    let mut message = LinkMessage::default();
    match id {
        LinkId::Index(0) => return Err(ctx.invalid("interface index 0 names no link")),
        LinkId::Index(index) => message.header.index = index,
        LinkId::Name(name) => {
            check_name(name).map_err(|reason| ctx.invalid(reason))?;
            message
                .attributes
                .push(LinkAttribute::IfName(name.to_owned()));
        }
    }
    Ok(message)
}

/// `ip link add <name> [mtu M] type veth peer name <peer> netns <fd> [mtu M]`.
pub(super) fn veth_message(
    name: &str,
    peer_name: &str,
    peer_netns: std::os::fd::RawFd,
    mtu: Option<u32>,
) -> LinkMessage {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(peer_name.to_owned()));
    peer.attributes.extend(mtu.map(LinkAttribute::Mtu));
    peer.attributes.push(LinkAttribute::NetNsFd(peer_netns));

    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    message.attributes.extend(mtu.map(LinkAttribute::Mtu));
    message.attributes.push(LinkAttribute::LinkInfo(vec![
        InfoAttribute::Kind(InfoKind::Veth),
        InfoAttribute::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    message
}

/// Reads a link message from the kernel into a [`LinkInfo`].
pub(super) fn parse_link(message: &LinkMessage) -> std::result::Result<LinkInfo, String> {
    let mut name = None;
    let mut info = LinkInfo {
        index: message.header.index,
        name: String::new(),
        mtu: None,
        mac: None,
        up: message.header.flags.contains(LinkFlags::Up),
        oper_state: OperState::Unknown,
        kind: None,
        link_index: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(value) => name = Some(value.clone()),
            LinkAttribute::Mtu(value) => info.mtu = Some(*value),
            LinkAttribute::Address(bytes) => info.mac = MacAddr::from_slice(bytes),
            LinkAttribute::OperState(state) => info.oper_state = u8::from(*state).into(),
            LinkAttribute::Link(index) => info.link_index = Some(*index),
            LinkAttribute::LinkInfo(infos) => {
                info.kind = infos.iter().find_map(|i| match i {
                    InfoAttribute::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    info.name = name.ok_or_else(|| format!("link {} has no IFLA_IFNAME", info.index))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::link::State;

    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "02:42:AC:11:00:02".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(mac.to_string(), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "zz:42:ac:11:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_follow_the_kernel_rules() {
        assert!(check_name("eth0").is_ok());
        assert!(
            check_name("fxveth0123456ab").is_ok(),
            "15 bytes is the maximum"
        );
        for bad in ["", ".", "..", "fxveth0123456abc", "a/b", "a:b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn veth_message_puts_the_namespace_on_the_peer_only() {
        let message = veth_message("fxh1", "eth0", 9, Some(1400));
        // It must survive the kernel's wire format: emit, then parse back.
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        let parsed = LinkMessage::parse(&bytes[..]).unwrap();
        assert!(
            parsed
                .attributes
                .contains(&LinkAttribute::IfName("fxh1".into()))
        );
        assert!(parsed.attributes.contains(&LinkAttribute::Mtu(1400)));
        assert!(
            !parsed
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::NetNsFd(_)))
        );
        let peer = parsed
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    InfoAttribute::Data(InfoData::Veth(InfoVeth::Peer(peer))) => Some(peer),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            peer.attributes,
            vec![
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::Mtu(1400),
                LinkAttribute::NetNsFd(9)
            ]
        );
    }

    #[test]
    fn parse_link_reads_what_a_user_sees() {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        message.attributes = vec![
            LinkAttribute::IfName("fxh1".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::OperState(State::LowerLayerDown),
            LinkAttribute::Link(3),
            LinkAttribute::LinkInfo(vec![InfoAttribute::Kind(InfoKind::Veth)]),
        ];
        let info = parse_link(&message).unwrap();
        assert_eq!(info.index, 7);
        assert_eq!(info.name, "fxh1");
        assert_eq!(info.mtu, Some(1450));
        assert_eq!(info.mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert!(info.up);
        assert_eq!(info.oper_state, OperState::LowerLayerDown);
        assert_eq!(info.kind.as_deref(), Some("veth"));
        assert_eq!(info.link_index, Some(3));

        message.attributes.clear();
        assert!(
            parse_link(&message).is_err(),
            "a link without a name is malformed"
        );
    }
}
