//! Neighbour (ARP / NDP) entries: static entries for a known peer.
//!
//! Owns the translation between [`Neighbour`] and rtnetlink neighbour
//! messages. Must never flush or touch entries it was not asked about.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::error::Result;
use super::link::MacAddr;
use super::socket::{Ctx, Netlink};

/// One neighbour entry as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Neighbour {
    /// The link the entry is on.
    pub index: u32,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its hardware address; `None` while unresolved.
    pub mac: Option<MacAddr>,
    /// A static entry that never expires (`nud permanent`).
    pub permanent: bool,
}

impl Netlink {
    /// Adds a neighbour entry `ip lladdr mac dev index`; `permanent` makes
    /// it static (`nud permanent`), otherwise it starts reachable and ages
    /// like a learned one. Fails with
    /// [`Error::is_already_exists`](super::Error::is_already_exists) if an
    /// entry for `ip` exists.
    pub fn add_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
        permanent: bool,
    ) -> Result<()> {
        self.change_neighbour(
            "add neighbour",
            index,
            ip,
            mac,
            permanent,
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Like [`Netlink::add_neighbour`], replacing an existing entry.
    pub fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
        permanent: bool,
    ) -> Result<()> {
        self.change_neighbour(
            "replace neighbour",
            index,
            ip,
            mac,
            permanent,
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    fn change_neighbour(
        &self,
        op: &'static str,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
        permanent: bool,
        flags: u16,
    ) -> Result<()> {
        let target = format!("{ip} lladdr {mac} dev {index}");
        let ctx = Ctx {
            op,
            target: &target,
        };
        let state = if permanent {
            NeighbourState::Permanent
        } else {
            NeighbourState::Reachable
        };
        let message = neighbour_message(index, ip, Some(mac), state);
        self.request(ctx, RouteNetlinkMessage::NewNeighbour(message), flags)?;
        Ok(())
    }

    /// Deletes the entry for `ip` on link `index`. Returns `false` when
    /// there was none.
    pub fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<bool> {
        let target = format!("{ip} dev {index}");
        let ctx = Ctx {
            op: "delete neighbour",
            target: &target,
        };
        let message = neighbour_message(index, ip, None, NeighbourState::None);
        let deleted = self.request_unless(
            ctx,
            RouteNetlinkMessage::DelNeighbour(message),
            0,
            &[libc::ENOENT],
        )?;
        Ok(deleted.is_some())
    }

    /// The IPv4 and IPv6 neighbour entries on link `index`.
    pub fn list_neighbours(&self, index: u32) -> Result<Vec<Neighbour>> {
        let target = format!("dev {index}");
        let ctx = Ctx {
            op: "list neighbours",
            target: &target,
        };
        let replies = self.dump(
            ctx,
            &RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewNeighbour(message) if message.header.ifindex == index => {
                    parse_neighbour(message)
                }
                _ => None,
            })
            .collect())
    }
}

/// `ip neigh add|replace|del <ip> [lladdr <mac>] dev <index> nud <state>`.
pub(super) fn neighbour_message(
    index: u32,
    ip: IpAddr,
    mac: Option<MacAddr>,
    state: NeighbourState,
) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.ifindex = index;
    message.header.state = state;
    let destination = match ip {
        IpAddr::V4(v4) => {
            message.header.family = AddressFamily::Inet;
            NeighbourAddress::Inet(v4)
        }
        IpAddr::V6(v6) => {
            message.header.family = AddressFamily::Inet6;
            NeighbourAddress::Inet6(v6)
        }
    };
    message
        .attributes
        .push(NeighbourAttribute::Destination(destination));
    if let Some(mac) = mac {
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    message
}

/// Reads a neighbour message; `None` for entries without an IP (bridge FDB).
pub(super) fn parse_neighbour(message: &NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = MacAddr::from_slice(bytes),
            _ => {}
        }
    }
    Some(Neighbour {
        index: message.header.ifindex,
        ip: ip?,
        mac,
        permanent: message.header.state == NeighbourState::Permanent,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    #[test]
    fn static_entry_round_trips_through_the_wire_format() {
        let mac = MacAddr([0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
        let ip: IpAddr = "169.254.1.1".parse().unwrap();
        let message = neighbour_message(5, ip, Some(mac), NeighbourState::Permanent);
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        let parsed = NeighbourMessage::parse(&bytes[..]).unwrap();
        assert_eq!(parsed.header.family, AddressFamily::Inet);
        assert_eq!(
            parse_neighbour(&parsed),
            Some(Neighbour {
                index: 5,
                ip,
                mac: Some(mac),
                permanent: true
            })
        );
    }

    #[test]
    fn delete_carries_no_lladdr_and_fdb_entries_are_skipped() {
        let message = neighbour_message(5, "fe80::1".parse().unwrap(), None, NeighbourState::None);
        assert_eq!(message.header.family, AddressFamily::Inet6);
        assert_eq!(message.attributes.len(), 1);

        let mut fdb = NeighbourMessage::default();
        fdb.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_neighbour(&fdb), None);
    }
}
