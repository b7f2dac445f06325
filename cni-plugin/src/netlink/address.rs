//! Interface addresses: add, delete, list (IPv4 and IPv6).
//!
//! Owns the translation between [`IpNet`] and rtnetlink address messages.
//! Must never replace an existing address silently: adding one twice is an
//! [`Error::is_already_exists`](super::Error::is_already_exists) error the
//! caller may choose to accept.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::error::Result;
use super::socket::{Ctx, Netlink};

impl Netlink {
    /// Adds `address` (e.g. `10.244.1.5/32`) to link `index`. The prefix
    /// length decides the connected route the kernel adds with it.
    pub fn add_address(&self, index: u32, address: impl Into<IpNet>) -> Result<()> {
        let address = address.into();
        let target = format!("{address} dev {index}");
        let ctx = Ctx {
            op: "add address",
            target: &target,
        };
        self.request(
            ctx,
            RouteNetlinkMessage::NewAddress(address_message(index, address)),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes `address` from link `index`. Returns `false` when it was not
    /// there.
    pub fn del_address(&self, index: u32, address: impl Into<IpNet>) -> Result<bool> {
        let address = address.into();
        let target = format!("{address} dev {index}");
        let ctx = Ctx {
            op: "delete address",
            target: &target,
        };
        let deleted = self.request_unless(
            ctx,
            RouteNetlinkMessage::DelAddress(address_message(index, address)),
            0,
            &[libc::EADDRNOTAVAIL],
        )?;
        Ok(deleted.is_some())
    }

    /// The addresses on link `index`, both families, as `address/prefix`
    /// (e.g. `10.244.1.5/32`, not truncated to the network). An IPv6 link
    /// that is up also carries its automatic `fe80::/64` address.
    pub fn list_addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let target = format!("dev {index}");
        let ctx = Ctx {
            op: "list addresses",
            target: &target,
        };
        let replies = self.dump(
            ctx,
            &RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut addresses = Vec::new();
        for reply in &replies {
            if let RouteNetlinkMessage::NewAddress(message) = reply
                && message.header.index == index
            {
                addresses.extend(parse_address(message).map_err(|e| ctx.decode(e))?);
            }
        }
        Ok(addresses)
    }
}

/// `ip addr add|del <address> dev <index>`: local and peer address equal, as
/// iproute2 sends them for a non-point-to-point address.
pub(super) fn address_message(index: u32, address: IpNet) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = match address {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    message.header.prefix_len = address.prefix_len();
    message.header.index = index;
    message.attributes = vec![
        AddressAttribute::Local(address.addr()),
        AddressAttribute::Address(address.addr()),
    ];
    message
}

/// Reads an address message; `Ok(None)` for families other than IP.
pub(super) fn parse_address(
    message: &AddressMessage,
) -> std::result::Result<Option<IpNet>, String> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on point-to-point links, and the only one present for IPv6.
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let Some(ip): Option<IpAddr> = local.or(address) else {
        return Ok(None);
    };
    IpNet::new(ip, message.header.prefix_len)
        .map(Some)
        .map_err(|e| format!("address {ip}/{}: {e}", message.header.prefix_len))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    #[test]
    fn address_message_round_trips_through_the_wire_format() {
        let net: IpNet = "10.244.1.5/32".parse().unwrap();
        let message = address_message(4, net);
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        let parsed = AddressMessage::parse(&bytes[..]).unwrap();
        assert_eq!(parsed.header.family, AddressFamily::Inet);
        assert_eq!(parsed.header.index, 4);
        assert_eq!(parse_address(&parsed).unwrap(), Some(net));
    }

    #[test]
    fn point_to_point_reports_the_local_side() {
        let mut message = AddressMessage::default();
        message.header.prefix_len = 32;
        message.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        ];
        assert_eq!(
            parse_address(&message).unwrap(),
            Some("10.0.0.1/32".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_only_carries_address_and_bad_prefix_is_an_error() {
        let mut message = AddressMessage::default();
        message.header.prefix_len = 64;
        message.attributes = vec![AddressAttribute::Address("fe80::1".parse().unwrap())];
        assert_eq!(
            parse_address(&message).unwrap(),
            Some("fe80::1/64".parse().unwrap())
        );

        message.header.prefix_len = 129;
        assert!(parse_address(&message).is_err());
        message.attributes.clear();
        assert_eq!(parse_address(&message).unwrap(), None);
    }
}
