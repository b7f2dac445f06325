//! IPv4 routes: add, replace, delete, list, including ECMP multipath.
//!
//! Owns [`Route`] and its translation to and from rtnetlink route messages.
//! A [`Route`] read back by [`Netlink::list_routes`] can be handed to
//! [`Netlink::del_route`] or compared with a desired one, so an owner (the
//! CNI plugin, the agent) can reconcile the routes it tagged with its own
//! protocol number. Must never touch routes outside the requested table and
//! never delete by a looser match than the caller gave.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteNextHop,
    RouteNextHopFlags, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::error::Result;
use super::socket::{Ctx, Netlink};

/// The table `ip route` uses when none is named.
pub const MAIN_TABLE: u32 = 254;
/// The kernel's table of local and broadcast addresses.
pub const LOCAL_TABLE: u32 = 255;
/// Passed to [`Netlink::list_routes`]: every table.
pub const ALL_TABLES: u32 = 0;

/// `RT_TABLE_COMPAT`: what the one-byte header field says for tables > 255.
const TABLE_COMPAT: u8 = 252;

/// How far a destination is (`rtm_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Reached through a gateway (the default).
    Universe,
    /// Interior route (IPv6 site-local heritage; rare).
    Site,
    /// Directly attached to the link: no gateway, ARP for the destination.
    Link,
    /// On this host.
    Host,
    /// No destination.
    Nowhere,
    /// A value this module has no name for.
    Other(u8),
}

impl From<u8> for Scope {
    fn from(value: u8) -> Self {
        match value {
            0 => Self::Universe,
            200 => Self::Site,
            253 => Self::Link,
            254 => Self::Host,
            255 => Self::Nowhere,
            other => Self::Other(other),
        }
    }
}

impl From<Scope> for u8 {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Universe => 0,
            Scope::Site => 200,
            Scope::Link => 253,
            Scope::Host => 254,
            Scope::Nowhere => 255,
            Scope::Other(other) => other,
        }
    }
}

/// What the route does with a matching packet (`rtm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Forward it (the default).
    Unicast,
    /// Deliver it locally.
    Local,
    /// Broadcast address.
    Broadcast,
    /// Anycast address.
    Anycast,
    /// Multicast route.
    Multicast,
    /// Drop it silently.
    Blackhole,
    /// Drop it with ICMP host unreachable.
    Unreachable,
    /// Drop it with ICMP administratively prohibited.
    Prohibit,
    /// Continue the lookup in the next table (policy routing).
    Throw,
    /// A value this module has no name for.
    Other(u8),
}

impl From<u8> for RouteKind {
    fn from(value: u8) -> Self {
        match value {
            1 => Self::Unicast,
            2 => Self::Local,
            3 => Self::Broadcast,
            4 => Self::Anycast,
            5 => Self::Multicast,
            6 => Self::Blackhole,
            7 => Self::Unreachable,
            8 => Self::Prohibit,
            9 => Self::Throw,
            other => Self::Other(other),
        }
    }
}

impl From<RouteKind> for u8 {
    fn from(kind: RouteKind) -> Self {
        match kind {
            RouteKind::Unicast => 1,
            RouteKind::Local => 2,
            RouteKind::Broadcast => 3,
            RouteKind::Anycast => 4,
            RouteKind::Multicast => 5,
            RouteKind::Blackhole => 6,
            RouteKind::Unreachable => 7,
            RouteKind::Prohibit => 8,
            RouteKind::Throw => 9,
            RouteKind::Other(other) => other,
        }
    }
}

/// One next hop of a multipath (ECMP) route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct NextHop {
    /// The gateway, or `None` for a next hop that is the link itself.
    pub gateway: Option<Ipv4Addr>,
    /// The outgoing interface index.
    pub oif: Option<u32>,
    /// Relative weight, 1..=256 (`rtnh_hops + 1`); 1 by default.
    pub weight: u16,
    /// Use the gateway even if no address on `oif` covers it.
    pub onlink: bool,
}

impl NextHop {
    /// A next hop through `gateway` on interface `oif`.
    pub fn via(gateway: Ipv4Addr, oif: u32) -> Self {
        Self {
            gateway: Some(gateway),
            oif: Some(oif),
            weight: 1,
            onlink: false,
        }
    }

    /// A next hop straight out of interface `oif`.
    pub fn dev(oif: u32) -> Self {
        Self {
            gateway: None,
            oif: Some(oif),
            weight: 1,
            onlink: false,
        }
    }

    /// Sets the relative weight (clamped to 1..=256).
    #[must_use]
    pub fn weight(mut self, weight: u16) -> Self {
        self.weight = weight.clamp(1, 256);
        self
    }

    /// Marks the gateway as reachable on the link (`onlink`).
    #[must_use]
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }
}

/// An IPv4 route, as `ip route` shows it.
///
/// Build it with [`Route::new`] and the setters:
/// `Route::new(dst).via(gw).dev(index).onlink()`. Routes read back from the
/// kernel carry every field the kernel reports, so they compare equal to the
/// route that was added when the caller filled in what the kernel fills in
/// (`protocol`, `scope`, `table`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Route {
    /// Destination prefix; `0.0.0.0/0` is the default route.
    pub dst: Ipv4Net,
    /// Gateway (`via`), for a single-path route.
    pub gateway: Option<Ipv4Addr>,
    /// Outgoing interface index (`dev`), for a single-path route.
    pub oif: Option<u32>,
    /// Preferred source address (`src`).
    pub source: Option<Ipv4Addr>,
    /// Metric (`metric`/`priority`); the kernel omits 0, so 0 reads back as
    /// `None`.
    pub metric: Option<u32>,
    /// Scope; [`Scope::Universe`] by default.
    pub scope: Scope,
    /// Who installed it (`proto`). [`Route::PROTO_BOOT`] by default, like
    /// `ip route`. An owner uses its own number (above 4, and not one listed
    /// in `/etc/iproute2/rt_protos`) to find its routes again. When deleting,
    /// a non-zero protocol must match.
    pub protocol: u8,
    /// Routing table; [`MAIN_TABLE`] by default.
    pub table: u32,
    /// Type; [`RouteKind::Unicast`] by default.
    pub kind: RouteKind,
    /// `onlink`: use the gateway even if no address on `oif` covers it.
    pub onlink: bool,
    /// ECMP next hops. When non-empty, `gateway`/`oif` stay `None`. The
    /// kernel reports a multipath route of one next hop as a plain route.
    pub next_hops: Vec<NextHop>,
    /// Path MTU of the route (`mtu`), below the interface's when the path
    /// adds a header (a tunnel).
    pub mtu: Option<u32>,
    /// The MTU is locked (`mtu lock`): the kernel holds forwarded packets to it too, not only
    /// the ones this host sends (which an unlocked route MTU is limited to).
    pub mtu_locked: bool,
}

/// The index of the MTU among route metrics (`RTAX_MTU`), and so its bit in `RTAX_LOCK`.
const RTAX_MTU: u32 = 2;

impl Route {
    /// `proto kernel`: installed by the kernel (connected routes).
    pub const PROTO_KERNEL: u8 = 2;
    /// `proto boot`: what `ip route add` uses.
    pub const PROTO_BOOT: u8 = 3;
    /// `proto static`: installed by an administrator.
    pub const PROTO_STATIC: u8 = 4;

    /// A unicast route to `dst` in the main table, scope universe, proto boot.
    pub fn new(dst: Ipv4Net) -> Self {
        Self {
            dst,
            gateway: None,
            oif: None,
            source: None,
            metric: None,
            scope: Scope::Universe,
            protocol: Self::PROTO_BOOT,
            table: MAIN_TABLE,
            kind: RouteKind::Unicast,
            onlink: false,
            next_hops: Vec::new(),
            mtu: None,
            mtu_locked: false,
        }
    }

    /// The default route, `0.0.0.0/0`.
    pub fn default_v4() -> Self {
        Self::new(Ipv4Net::default())
    }

    /// Sets the gateway (`via`).
    #[must_use]
    pub fn via(mut self, gateway: Ipv4Addr) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// Sets the path MTU, locked (`mtu lock M`): forwarded packets are held to it as well as
    /// this host's own, which a tunnel's overhead needs (translated flows are forwarded).
    #[must_use]
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self.mtu_locked = true;
        self
    }

    /// Sets the outgoing interface (`dev`).
    #[must_use]
    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }

    /// Sets the preferred source address (`src`).
    #[must_use]
    pub fn source(mut self, source: Ipv4Addr) -> Self {
        self.source = Some(source);
        self
    }

    /// Sets the metric.
    #[must_use]
    pub fn metric(mut self, metric: u32) -> Self {
        self.metric = Some(metric);
        self
    }

    /// Sets the scope.
    #[must_use]
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Sets the protocol tag.
    #[must_use]
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets the routing table.
    #[must_use]
    pub fn table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// Sets the type (e.g. [`RouteKind::Blackhole`]).
    #[must_use]
    pub fn kind(mut self, kind: RouteKind) -> Self {
        self.kind = kind;
        self
    }

    /// Marks the gateway as reachable on the link (`onlink`).
    #[must_use]
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }

    /// Adds an ECMP next hop.
    #[must_use]
    pub fn next_hop(mut self, next_hop: NextHop) -> Self {
        self.next_hops.push(next_hop);
        self
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind != RouteKind::Unicast {
            write!(f, "{:?} ", self.kind)?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev {oif}")?;
        }
        if let Some(mtu) = self.mtu {
            write!(f, " mtu {mtu}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        for hop in &self.next_hops {
            write!(f, " nexthop")?;
            if let Some(gateway) = hop.gateway {
                write!(f, " via {gateway}")?;
            }
            if let Some(oif) = hop.oif {
                write!(f, " dev {oif}")?;
            }
            write!(f, " weight {}", hop.weight)?;
            if hop.onlink {
                write!(f, " onlink")?;
            }
        }
        write!(f, " table {} proto {}", self.table, self.protocol)
    }
}

impl Netlink {
    /// Adds a route; fails with
    /// [`Error::is_already_exists`](super::Error::is_already_exists) if an
    /// equal one is there.
    pub fn add_route(&self, route: &Route) -> Result<()> {
        self.change_route("add route", route, NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Adds a route, or replaces the one with the same destination, table
    /// and metric.
    pub fn replace_route(&self, route: &Route) -> Result<()> {
        self.change_route("replace route", route, NLM_F_CREATE | NLM_F_REPLACE)
    }

    fn change_route(&self, op: &'static str, route: &Route, flags: u16) -> Result<()> {
        let target = route.to_string();
        let ctx = Ctx {
            op,
            target: &target,
        };
        let message = route_message(route, Purpose::Change);
        self.request(ctx, RouteNetlinkMessage::NewRoute(message), flags)?;
        Ok(())
    }

    /// Deletes the route matching `route`'s destination, table, type and
    /// (when set) gateway, interface, metric and protocol. Any scope
    /// matches. Returns `false` when no route matched.
    pub fn del_route(&self, route: &Route) -> Result<bool> {
        let target = route.to_string();
        let ctx = Ctx {
            op: "delete route",
            target: &target,
        };
        let message = route_message(route, Purpose::Delete);
        let deleted = self.request_unless(
            ctx,
            RouteNetlinkMessage::DelRoute(message),
            0,
            &[libc::ESRCH],
        )?;
        Ok(deleted.is_some())
    }

    /// The IPv4 routes of `table` ([`MAIN_TABLE`], [`LOCAL_TABLE`], a custom
    /// number, or [`ALL_TABLES`]). Cached clones are left out.
    ///
    /// IPv4 routes through an IPv6 gateway (`via inet6`, RFC 5549) are
    /// listed without their gateway.
    pub fn list_routes(&self, table: u32) -> Result<Vec<Route>> {
        let target = format!("table {table}");
        let ctx = Ctx {
            op: "list routes",
            target: &target,
        };
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let replies = self.dump(ctx, &RouteNetlinkMessage::GetRoute(request))?;
        let mut routes = Vec::new();
        for reply in &replies {
            if let RouteNetlinkMessage::NewRoute(message) = reply
                && let Some(route) = parse_route(message).map_err(|e| ctx.decode(e))?
                && (table == ALL_TABLES || route.table == table)
            {
                routes.push(route);
            }
        }
        Ok(routes)
    }
}

/// Why a route message is built: deletes match any scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Change,
    Delete,
}

/// `ip route add|replace|del` for `route`.
pub(super) fn route_message(route: &Route, purpose: Purpose) -> RouteMessage {
    let mut message = RouteMessage::default();
    let header = &mut message.header;
    header.address_family = AddressFamily::Inet;
    header.destination_prefix_length = route.dst.prefix_len();
    header.table = u8::try_from(route.table).unwrap_or(TABLE_COMPAT);
    header.protocol = RouteProtocol::from(route.protocol);
    header.scope = match purpose {
        Purpose::Change => RouteScope::from(u8::from(route.scope)),
        Purpose::Delete => RouteScope::NoWhere,
    };
    header.kind = RouteType::from(u8::from(route.kind));
    if route.onlink {
        header.flags = RouteFlags::Onlink;
    }

    let attributes = &mut message.attributes;
    attributes.push(RouteAttribute::Table(route.table));
    if route.dst.prefix_len() > 0 {
        attributes.push(RouteAttribute::Destination(RouteAddress::Inet(
            route.dst.addr(),
        )));
    }
    if let Some(gateway) = route.gateway {
        attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    }
    if let Some(oif) = route.oif {
        attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(source) = route.source {
        attributes.push(RouteAttribute::PrefSource(RouteAddress::Inet(source)));
    }
    if let Some(metric) = route.metric {
        attributes.push(RouteAttribute::Priority(metric));
    }
    if let (Some(mtu), Purpose::Change) = (route.mtu, purpose) {
        let mut metrics = vec![RouteMetric::Mtu(mtu)];
        if route.mtu_locked {
            metrics.push(RouteMetric::Lock(1 << RTAX_MTU));
        }
        attributes.push(RouteAttribute::Metrics(metrics));
    }
    if !route.next_hops.is_empty() {
        attributes.push(RouteAttribute::MultiPath(
            route.next_hops.iter().map(next_hop_message).collect(),
        ));
    }
    message
}

fn next_hop_message(hop: &NextHop) -> RouteNextHop {
    let mut message = RouteNextHop::default();
    message.interface_index = hop.oif.unwrap_or(0);
    message.hops = u8::try_from(hop.weight.clamp(1, 256) - 1).unwrap_or(u8::MAX);
    if hop.onlink {
        message.flags = RouteNextHopFlags::Onlink;
    }
    if let Some(gateway) = hop.gateway {
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    }
    message
}

/// Reads a route message; `Ok(None)` for non-IPv4 routes and cached clones.
pub(super) fn parse_route(message: &RouteMessage) -> std::result::Result<Option<Route>, String> {
    let header = &message.header;
    if header.address_family != AddressFamily::Inet || header.flags.contains(RouteFlags::Cloned) {
        return Ok(None);
    }
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut route = Route::new(Ipv4Net::default());
    route.table = u32::from(header.table);
    route.protocol = u8::from(header.protocol);
    route.scope = Scope::from(u8::from(header.scope));
    route.kind = RouteKind::from(u8::from(header.kind));
    route.onlink = header.flags.contains(RouteFlags::Onlink);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => route.source = Some(*ip),
            RouteAttribute::Oif(oif) => route.oif = Some(*oif),
            RouteAttribute::Priority(metric) => route.metric = Some(*metric),
            RouteAttribute::Table(table) => route.table = *table,
            RouteAttribute::MultiPath(hops) => {
                route.next_hops = hops.iter().map(parse_next_hop).collect();
            }
            RouteAttribute::Metrics(metrics) => {
                route.mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) => Some(*mtu),
                    _ => None,
                });
                route.mtu_locked = metrics
                    .iter()
                    .any(|m| matches!(m, RouteMetric::Lock(bits) if bits & (1 << RTAX_MTU) != 0));
            }
            _ => {}
        }
    }
    route.dst = Ipv4Net::new(destination, header.destination_prefix_length).map_err(|e| {
        format!(
            "route to {destination}/{}: {e}",
            header.destination_prefix_length
        )
    })?;
    Ok(Some(route))
}

fn parse_next_hop(message: &RouteNextHop) -> NextHop {
    NextHop {
        gateway: message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            }),
        oif: (message.interface_index != 0).then_some(message.interface_index),
        weight: u16::from(message.hops) + 1,
        onlink: message.flags.contains(RouteNextHopFlags::Onlink),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    /// Emits the request, parses it back as the kernel would see it.
    fn wire(route: &Route, purpose: Purpose) -> RouteMessage {
        let message = route_message(route, purpose);
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        RouteMessage::parse(&bytes[..]).unwrap()
    }

    #[test]
    fn every_field_round_trips() {
        let cases = [
            Route::new(net("169.254.1.1/32")).dev(2).scope(Scope::Link),
            Route::default_v4().via(ip("169.254.1.1")).dev(2).onlink(),
            Route::new(net("10.244.1.5/32"))
                .dev(7)
                .scope(Scope::Link)
                .protocol(201),
            Route::new(net("10.0.0.0/8"))
                .via(ip("192.0.2.1"))
                .source(ip("192.0.2.10"))
                .metric(100),
            Route::new(net("10.96.0.0/12"))
                .kind(RouteKind::Blackhole)
                .table(1000),
            Route::new(net("10.1.0.0/16"))
                .next_hop(NextHop::via(ip("192.0.2.1"), 3))
                .next_hop(NextHop::via(ip("192.0.2.2"), 4).weight(3).onlink()),
        ];
        for route in cases {
            let parsed = parse_route(&wire(&route, Purpose::Change)).unwrap();
            assert_eq!(parsed.as_ref(), Some(&route), "{route}");
        }
    }

    #[test]
    fn big_table_numbers_go_in_the_attribute() {
        let message = route_message(&Route::new(net("10.0.0.0/8")).table(1000), Purpose::Change);
        assert_eq!(message.header.table, TABLE_COMPAT);
        assert!(message.attributes.contains(&RouteAttribute::Table(1000)));
        let main = route_message(&Route::new(net("10.0.0.0/8")), Purpose::Change);
        assert_eq!(main.header.table, 254);
    }

    #[test]
    fn default_route_carries_no_destination_and_deletes_match_any_scope() {
        let route = Route::default_v4()
            .via(ip("169.254.1.1"))
            .scope(Scope::Link);
        let message = route_message(&route, Purpose::Delete);
        assert_eq!(message.header.destination_prefix_length, 0);
        assert!(
            !message
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(_)))
        );
        assert_eq!(message.header.scope, RouteScope::NoWhere);
        assert_eq!(
            route_message(&route, Purpose::Change).header.scope,
            RouteScope::Link
        );
    }

    #[test]
    fn kernel_dump_of_a_link_route_parses() {
        // What the kernel sends for `10.244.1.5 dev 7 proto 201 scope link`.
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 32;
        message.header.table = 254;
        message.header.protocol = RouteProtocol::Other(201);
        message.header.scope = RouteScope::Link;
        message.header.kind = RouteType::Unicast;
        message.attributes = vec![
            RouteAttribute::Table(254),
            RouteAttribute::Destination(RouteAddress::Inet(ip("10.244.1.5"))),
            RouteAttribute::Oif(7),
        ];
        let route = parse_route(&message).unwrap().unwrap();
        assert_eq!(
            route,
            Route::new(net("10.244.1.5/32"))
                .dev(7)
                .scope(Scope::Link)
                .protocol(201)
        );
    }

    #[test]
    fn ipv6_and_cloned_routes_are_skipped_and_bad_prefixes_rejected() {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet6;
        assert_eq!(parse_route(&message).unwrap(), None);

        message.header.address_family = AddressFamily::Inet;
        message.header.flags = RouteFlags::Cloned;
        assert_eq!(parse_route(&message).unwrap(), None);

        message.header.flags = RouteFlags::empty();
        message.header.destination_prefix_length = 33;
        assert!(parse_route(&message).is_err());
    }

    #[test]
    fn next_hop_weight_is_hops_plus_one() {
        let hop = NextHop::dev(3).weight(256);
        let message = next_hop_message(&hop);
        assert_eq!(message.hops, 255);
        assert_eq!(parse_next_hop(&message), hop);
        assert_eq!(NextHop::dev(3).weight(0).weight, 1);
    }
}
