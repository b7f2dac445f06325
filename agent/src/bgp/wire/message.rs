//! The BGP messages this speaker exchanges, as plain data: OPEN with its capabilities, UPDATE,
//! NOTIFICATION (in [`super`]), KEEPALIVE and ROUTE-REFRESH.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{Attributes, Notification};

/// Capability codes.
pub(super) mod cap {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
}

/// Graceful restart as a speaker announces it (RFC 4724).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The speaker has restarted (its peer should not wait for stale routes to be refreshed).
    pub restarting: bool,
    /// Seconds the peer should keep this speaker's routes after the session goes down.
    pub restart_time: u16,
    /// IPv4 unicast listed, with its forwarding-state-preserved bit.
    pub ipv4_unicast: Option<bool>,
}

/// What an OPEN announces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub four_octet_as: Option<u32>,
    pub ipv4_unicast: bool,
    pub route_refresh: bool,
    pub graceful_restart: Option<GracefulRestart>,
    /// Codes of capabilities this module does not know (kept, never an error: RFC 5492).
    pub other: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The speaker's AS: the 4-octet capability's when present, else the 2-octet field.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub caps: Capabilities,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Net>,
    /// Present when `nlri` is not empty.
    pub attrs: Option<Attributes>,
    pub nlri: Vec<Ipv4Net>,
}

impl Update {
    /// The End-of-RIB marker for IPv4 unicast: an UPDATE with nothing in it (RFC 4724).
    pub fn is_end_of_rib(&self) -> bool {
        self.withdrawn.is_empty() && self.nlri.is_empty() && self.attrs.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}
