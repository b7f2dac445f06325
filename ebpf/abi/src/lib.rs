//! The kernel/user-space contract of the ferrox datapath.
//!
//! Every map key and value, every map name and every constant that both the kernel programs
//! (`ferrox-ebpf`) and user space (`ferrox-datapath` and above) read lives here and nowhere else.
//!
//! Rules this crate must never break:
//! - `#[repr(C)]`, `Copy`, no `bool`, explicit `_pad` fields, and a size/offset assertion for
//!   every type, so that the two sides can never disagree on a layout.
//! - A pinned map is never reinterpreted: a layout change means a new map name (`.._V2`) and
//!   pin directory version, never an edit of a `_V1` type.
//! - Addresses and ports are stored in network byte order; each field says so.
#![no_std]

use core::mem::{offset_of, size_of};

/// Version of the pinned-object layout. Pins live under `<bpffs root>/v1/`.
pub const PIN_VERSION: &str = "v1";

/// Names of the maps, as the kernel and the pin directory know them (at most 15 bytes).
pub mod map_names {
    /// [`crate::ServiceKey`] -> [`crate::ServiceValue`]: frontends and their backend slots.
    pub const SERVICES: &str = "SVC_V1";
    /// `u32` backend id -> [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS_V1";
    /// [`crate::SockRevNatKey`] -> [`crate::SockRevNatValue`]: which frontend a socket dialled.
    pub const SOCK_REVNAT: &str = "SOCK_RNAT_V1";
    /// Per-CPU array of [`crate::CounterValue`], indexed by [`crate::counter_index`]. V2: a
    /// fixed grid of [`crate::HOOK_SLOTS`] x [`crate::REASON_SLOTS`] cells, so that a new hook or
    /// reason never changes the layout again (V1 was sized to the reasons of its day).
    pub const COUNTERS: &str = "COUNTERS_V2";
    /// [`crate::EndpointKey`] -> [`crate::EndpointInfo`]: the pods of this node.
    pub const ENDPOINTS: &str = "ENDPOINTS_V1";
    /// [`crate::AffinityKey`] -> [`crate::AffinityValue`]: session affinity (LRU).
    pub const AFFINITY: &str = "AFFINITY_V1";
    /// [`crate::CtKey`] -> [`crate::CtEntry`]: connection tracking of translated flows (LRU).
    /// V2: each entry also caches where its packets go ([`crate::CtEntry::fwd_ifindex`] and
    /// after), so an established flow needs no FIB lookup per packet.
    pub const CONNTRACK: &str = "CT_V2";
    /// The conntrack map of version 1 ([`crate::CtEntryV1`] values): the loader copies its flows
    /// into [`CONNTRACK`], so an upgrade keeps every connection, then unpins it.
    pub const CONNTRACK_V1: &str = "CT_V1";
    /// Hash of maps with at most one entry (key 0): while a resize of [`CONNTRACK`] finishes,
    /// the previous conntrack map, which the programs still attached to some hooks use. The
    /// current programs look a flow up there when [`CONNTRACK`] does not have it and create
    /// flows in both, so a flow is seen whichever hook's program runs. Empty otherwise.
    pub const CONNTRACK_PREVIOUS: &str = "CT_PREV_V1";
    /// As [`CONNTRACK_PREVIOUS`], for [`SOCK_REVNAT`] (entries are written in both maps and
    /// looked up in the previous one when the current one does not have them).
    pub const SOCK_REVNAT_PREVIOUS: &str = "RNAT_PREV_V1";
    /// As [`CONNTRACK_PREVIOUS`], for [`AFFINITY`].
    pub const AFFINITY_PREVIOUS: &str = "AFF_PREV_V1";
    /// LPM trie of [`crate::SrcRangeKey`] -> `u8`: loadBalancerSourceRanges per frontend.
    pub const SOURCE_RANGES: &str = "SRC_RANGES_V1";
    /// Array of one [`crate::DatapathConfig`]: what the agent tells the programs about the node.
    pub const CONFIG: &str = "CONFIG_V1";
    /// Hash of maps: `u32` rev_nat_id -> array of [`crate::MAGLEV_TABLE_SIZE`] backend ids.
    pub const MAGLEV: &str = "MAGLEV_V1";
    /// Ring buffer of [`crate::MonitorEvent`]s for `ferrox monitor`, written only while one
    /// listens ([`crate::DatapathConfig::monitor`]).
    pub const EVENTS: &str = "EVENTS_V1";
    /// LPM trie of [`crate::TunnelKey`] -> [`crate::TunnelInfo`]: remote pod blocks reached in
    /// IP-in-IP, and the node address each is encapsulated to.
    pub const TUNNELS: &str = "TUNNEL_V1";
    /// `u32` node address (network byte order) -> [`crate::NodeInfo`]: the cluster's nodes, the
    /// only sources IP-in-IP is accepted from.
    pub const NODES: &str = "NODES_V1";
    /// LRU hash of [`crate::FragKey`] -> [`crate::FragValue`]: the ports of fragmented TCP/UDP
    /// datagrams, from their first fragment, so that later fragments follow its translation.
    pub const FRAGMENTS: &str = "FRAG_V1";
    /// Array of one `u64`: the network namespace cookie of the node's host namespace (set by the
    /// agent); loopback frontends (`127.0.0.1:<nodePort>`) apply only there.
    pub const HOST_NETNS: &str = "HOST_NETNS_V1";
    /// Array of one `u32`: how many times backends were removed from [`BACKENDS`] (written by
    /// the agent after each removal, and once at its start). A packet of a tracked flow looks
    /// its backend up only when this count moved since its entry last did
    /// ([`crate::CtEntry::backends_gen`]), or when the entry's last-seen time is refreshed: a
    /// busy flow's packets do no [`BACKENDS`] lookup while no backend leaves.
    pub const BACKENDS_GEN: &str = "BACKENDS_GEN_V1";

    /// LPM trie of [`crate::IpcacheKey`] -> [`crate::IpcacheValue`]: the NetworkPolicy
    /// identity of every address (pods by /32, the prefixes policies' ipBlocks name).
    pub const IPCACHE: &str = "IPCACHE_V1";
    /// LPM trie of [`crate::PolicyKey`] -> [`crate::PolicyValue`]: what each isolated local
    /// pod allows, by direction, peer identity, protocol and port prefix.
    pub const POLICIES: &str = "POLICY_V1";
    /// [`crate::EndpointKey`] -> [`crate::PolicyEndpoint`]: the local pods some NetworkPolicy
    /// isolates, and in which directions (a pod absent here is isolated in none).
    pub const POLICY_ENDPOINTS: &str = "POLICY_EP_V1";
    /// LRU hash of [`crate::PolicyCtKey`] -> [`crate::PolicyCtValue`]: the flows of isolated
    /// local pods that policy allowed, so that their later packets and replies pass.
    pub const POLICY_CT: &str = "POLICY_CT_V1";
    /// Array of [`crate::POLICY_FILTER_SLOTS`] `u8`, indexed by [`crate::policy_filter_slot`]
    /// of an address: non-zero where some isolated local pod's address falls (the agent sets a
    /// slot before that pod's [`POLICY_ENDPOINTS`] entry needs it and clears it after the last
    /// such entry went). A packet whose two addresses fall on zero slots is not judged: a pod no
    /// policy selects pays one array read per address and nothing else (a pod sharing a slot
    /// with an isolated one, one hash lookup more).
    pub const POLICY_ON: &str = "POLICY_ON_V1";

    /// Maps earlier versions pinned and this one no longer uses; the loader unpins them.
    pub const OBSOLETE: [&str; 1] = ["COUNTERS_V1"];

    /// Every map the datapath pins, in a stable order.
    pub const ALL: [&str; 24] = [
        SERVICES,
        BACKENDS,
        SOCK_REVNAT,
        SOCK_REVNAT_PREVIOUS,
        COUNTERS,
        ENDPOINTS,
        AFFINITY,
        AFFINITY_PREVIOUS,
        CONNTRACK,
        CONNTRACK_PREVIOUS,
        SOURCE_RANGES,
        CONFIG,
        MAGLEV,
        EVENTS,
        TUNNELS,
        NODES,
        FRAGMENTS,
        HOST_NETNS,
        IPCACHE,
        POLICIES,
        POLICY_ENDPOINTS,
        POLICY_CT,
        POLICY_ON,
        BACKENDS_GEN,
    ];
}

/// Names of the programs (the function names in `ferrox-ebpf`, also their pin names).
pub mod program_names {
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// Attached at TC ingress of a pod's host-side veth: packets leaving the pod.
    pub const TC_FROM_POD: &str = "tc_from_pod";
    /// Attached at TC egress of a pod's host-side veth: packets the host hands to the pod.
    pub const TC_TO_POD: &str = "tc_to_pod";
    /// Attached at TC ingress of the node's uplink.
    pub const TC_UPLINK_INGRESS: &str = "tc_uplink_in";
    /// Attached at TC egress of the node's uplink.
    pub const TC_UPLINK_EGRESS: &str = "tc_uplink_out";
    /// Attached at XDP of the node's uplink, when XDP is enabled.
    pub const XDP_UPLINK: &str = "xdp_uplink";
}

/// Map capacities. Sized for a large cluster; user space reports fill levels against these.
pub mod capacity {
    /// Frontend master entries plus one entry per backend slot.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    pub const SOCK_REVNAT: u32 = 262_144;
    pub const ENDPOINTS: u32 = 16_384;
    pub const AFFINITY: u32 = 131_072;
    /// Two entries per translated flow.
    pub const CONNTRACK: u32 = 524_288;
    pub const SOURCE_RANGES: u32 = 65_536;
    /// External frontends with a Maglev table.
    pub const MAGLEV: u32 = 16_384;
    /// Remote pod blocks (a /26 per 64 pods: 65,536 blocks cover four million pods).
    pub const TUNNELS: u32 = 65_536;
    /// Nodes of the cluster.
    pub const NODES: u32 = 16_384;
    /// Fragmented datagrams in flight (LRU: the oldest go first).
    pub const FRAGMENTS: u32 = 8_192;
    /// Pod addresses of the cluster and ipBlock prefixes.
    pub const IPCACHE: u32 = 262_144;
    /// Allowing entries of this node's isolated pods.
    pub const POLICIES: u32 = 262_144;
    /// Local pods isolated by some NetworkPolicy.
    pub const POLICY_ENDPOINTS: u32 = 16_384;
    /// Flows of isolated local pods, one entry per flow and side (LRU: the least recently used
    /// go first; an evicted flow is judged again by its next packet). The ceiling: the node's
    /// memory sizes it like the other flow maps (`ferrox_datapath::Sizing`).
    pub const POLICY_CT: u32 = 98_304;
}

/// Size of every Maglev lookup table: a prime, identical on every node, so that every node
/// maps a flow's hash to the same backend.
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// IP protocol numbers as they appear in [`ServiceKey::proto`] and [`Backend::proto`].
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Key of the services map. Slot 0 is the frontend's master entry; slots `1..=count` hold the
/// backend ids, so a backend is chosen with two lookups and no loop in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order (the bytes of the address in memory order).
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// Which traffic the entry serves, see [`scope`]: traffic policies give a frontend different
    /// backends for traffic from this node and traffic from outside.
    pub scope: u8,
    /// 0 for the master entry, `1..=count` for backend slots.
    pub slot: u16,
    pub _pad: [u8; 2],
}

/// Values of [`ServiceKey::scope`].
pub mod scope {
    /// Traffic from this node: its pods and its host processes (socket hooks, pod-facing TC).
    pub const INTERNAL: u8 = 0;
    /// Traffic from outside the node (uplink TC and XDP).
    pub const EXTERNAL: u8 = 1;
}

impl ServiceKey {
    pub const fn master(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: scope::INTERNAL,
            slot: 0,
            _pad: [0; 2],
        }
    }

    pub const fn with_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }

    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Value of the services map. In the master entry (slot 0) `count`, `rev_nat_id`, `flags` and
/// `affinity_timeout` are meaningful; in a backend slot only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend id (slot > 0), key of the backends map.
    pub backend_id: u32,
    /// Number of backend slots (master entry). 0 means the frontend exists but has no backend:
    /// connections are refused, as kube-proxy does.
    pub count: u16,
    /// Identifies the frontend for reverse translation.
    pub rev_nat_id: u16,
    /// [`svc_flags`] bits.
    pub flags: u16,
    pub _pad: [u8; 2],
    /// Session affinity timeout in seconds when [`svc_flags::AFFINITY`] is set.
    pub affinity_timeout: u32,
}

/// Bits of [`ServiceValue::flags`]: the kind of frontend and its policies.
pub mod svc_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const EXTERNAL_IP: u16 = 1 << 2;
    pub const LOAD_BALANCER: u16 = 1 << 3;
    pub const AFFINITY: u16 = 1 << 4;
    pub const EXTERNAL_LOCAL: u16 = 1 << 5;
    pub const INTERNAL_LOCAL: u16 = 1 << 6;
    /// Only the sources in the frontend's loadBalancerSourceRanges may connect (external scope).
    pub const SOURCE_RANGES: u16 = 1 << 7;
}

/// Value of the backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
}

/// Bits of [`Backend::flags`].
pub mod backend_flags {
    /// The endpoint is terminating but still serving.
    pub const TERMINATING: u8 = 1 << 0;
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// Key of the socket reverse-translation map: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of the socket reverse-translation map: the frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub rev_nat_id: u16,
}

/// Key of the affinity map: a client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// The client: a network namespace cookie ([`affinity_client::NETNS`], socket hooks, where the
    /// source address is not known yet) or an IPv4 address in network byte order
    /// ([`affinity_client::IPV4`], per-packet paths).
    pub client: u64,
    pub rev_nat_id: u16,
    /// [`affinity_client`] value.
    pub client_kind: u8,
    pub _pad: [u8; 5],
}

/// Values of [`AffinityKey::client_kind`].
pub mod affinity_client {
    pub const NETNS: u8 = 0;
    pub const IPV4: u8 = 1;
}

/// Value of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used the entry.
    pub last_used_ns: u64,
}

/// Key of the connection-tracking map: a flow's tuple as it appears on the wire where it is
/// looked up. A translated flow has two entries: its original direction (client -> frontend) and
/// its reply direction (backend -> client, or backend -> node address when SNATed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the connection-tracking map: how to rewrite packets that match the key, and where
/// the rewritten packets go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// Source address to write, network byte order.
    pub nat_saddr: u32,
    /// Destination address to write, network byte order.
    pub nat_daddr: u32,
    /// Source port to write, network byte order.
    pub nat_sport: u16,
    /// Destination port to write, network byte order.
    pub nat_dport: u16,
    pub backend_id: u32,
    pub rev_nat_id: u16,
    /// [`ct_flags`] bits.
    pub flags: u8,
    /// [`fwd_flags`] bits: whether the forwarding cache below holds a route.
    pub fwd_flags: u8,
    /// Interface the rewritten packets leave through (cached route).
    pub fwd_ifindex: u32,
    /// `bpf_ktime_get_coarse_ns()` when a packet last used the entry (refreshed when older than
    /// a quarter second).
    pub last_seen_ns: u64,
    /// Ethernet destination then source address of the rewritten packets (cached route).
    pub fwd_macs: [u8; 12],
    /// The largest IP total length the cached route was checked to carry; a longer packet
    /// looks its route up again (and learns the path's MTU).
    pub fwd_max_len: u16,
    /// The low 16 bits of [`map_names::BACKENDS_GEN`] when this original-direction entry's
    /// backend was last found present; while they still match, its packets skip the lookup.
    /// (Entries of earlier versions hold 0 here, which the agent's bump at start makes stale.)
    pub backends_gen: u16,
}

/// Bits of [`CtEntry::fwd_flags`]. The programs fill the cache from a FIB lookup and look the
/// route up again when the entry's last-seen time is refreshed, so a cached route is at most a
/// quarter second older than the routing table and the neighbours.
pub mod fwd_flags {
    /// Redirect out of `fwd_ifindex` with `fwd_macs`.
    pub const DIRECT: u8 = 1 << 0;
    /// Hand to this node's stack (the destination is a local address).
    pub const LOCAL: u8 = 1 << 1;
    /// With `DIRECT`: `fwd_ifindex` is the host veth of a local pod that takes packets straight
    /// into its own side (`bpf_redirect_peer`, see [`super::endpoint_flags::PEER`]).
    pub const PEER: u8 = 1 << 2;
    /// With `DIRECT`: the destination is in a remote pod block reached in IP-in-IP, which the
    /// uplink's TC egress wraps (XDP, which cannot, leaves such flows to TC).
    pub const ENCAP: u8 = 1 << 3;
}

/// Value of the conntrack map of version 1 (`CT_V1`), read once by the loader to carry its
/// flows into version 2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntryV1 {
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub flags: u8,
    pub _pad: [u8; 5],
    pub last_seen_ns: u64,
}

impl From<CtEntryV1> for CtEntry {
    /// The same flow with an empty forwarding cache.
    fn from(v: CtEntryV1) -> Self {
        Self {
            nat_saddr: v.nat_saddr,
            nat_daddr: v.nat_daddr,
            nat_sport: v.nat_sport,
            nat_dport: v.nat_dport,
            backend_id: v.backend_id,
            rev_nat_id: v.rev_nat_id,
            flags: v.flags,
            last_seen_ns: v.last_seen_ns,
            ..Self::default()
        }
    }
}

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// The entry translates replies (backend -> client).
    pub const REPLY: u8 = 1 << 0;
    /// The flow's source was rewritten to the node's address (remote backend, eTP Cluster).
    pub const SNAT: u8 = 1 << 1;
    /// The backend runs on this node.
    pub const LOCAL_BACKEND: u8 = 1 << 2;
    /// The flow is closing: a TCP RST went through, or a FIN went through in both directions
    /// (cleared by a new SYN). The agent's conntrack GC removes the flow after the short closing
    /// timeout instead of the idle one. A half-closed flow (one FIN) stays until it is idle.
    pub const CLOSING: u8 = 1 << 3;
    /// A TCP FIN went through this direction (cleared by a new SYN).
    pub const FIN: u8 = 1 << 4;
}

/// Key of the fragments map: a datagram, as IPv4 identifies its fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the L4 ports of the datagram (network byte order), from its first
/// fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

/// Data of the source-ranges LPM trie key (the trie prepends the prefix length): frontend id,
/// then the allowed prefix. The prefix length counts the 32 bits of `rev_nat_id` and `_pad`
/// plus the prefix length of `addr`, see [`src_range_prefixlen`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// Big-endian, so that the trie compares it byte by byte like an address.
    pub rev_nat_id: u16,
    pub _pad: u16,
    /// Network byte order.
    pub addr: u32,
}

/// The hash of a flow's tuple the uplink's programs pick a Maglev slot with
/// (`flow_hash(..) % MAGLEV_TABLE_SIZE`): the same on every node, and shared with user space so
/// `ferrox trace` predicts the slot exactly. Addresses and ports in network byte order, as they
/// sit in the packet (murmur3's finaliser over a mix of the tuple).
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let mut h = saddr.wrapping_mul(0x9e37_79b1)
        ^ daddr.rotate_left(16).wrapping_mul(0x85eb_ca6b)
        ^ ports.wrapping_mul(0xc2b2_ae35)
        ^ proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The LPM prefix length of a source range of `addr_prefix` bits.
pub const fn src_range_prefixlen(addr_prefix: u8) -> u32 {
    32 + addr_prefix as u32
}

/// What the agent tells the programs about the node (the one element of `CONFIG_V1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// The node's address, used as the source of SNATed flows; network byte order. 0 means
    /// unknown: flows that would need SNAT are dropped and counted.
    pub node_addr: u32,
    /// Interface index of the uplink.
    pub uplink_ifindex: u32,
    /// First and last port (host byte order) the SNAT of external flows may use. They must not
    /// overlap the node's ephemeral port range.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Non-zero while a `ferrox monitor` listens: the programs then write events to
    /// `EVENTS_V1`; at zero they do not even reserve one (monitoring costs nothing unused).
    pub monitor: u32,
}

/// Size in bytes of the events ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Values of [`MonitorEvent::kind`].
pub mod event_kind {
    /// A packet dropped, or a socket operation refused; `reason` says why.
    pub const DROP: u8 = 1;
    /// A new flow or connection translated to a backend (`nat_addr`:`nat_port`).
    pub const TRANSLATE: u8 = 2;
}

/// One event of `ferrox monitor`. Addresses and ports in network byte order; the source is 0
/// when the hook does not know it yet (a `connect()`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    pub kind: u8,
    /// [`Hook`] as a number.
    pub hook: u8,
    /// [`Reason`] as a number.
    pub reason: u8,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub nat_addr: u32,
    pub sport: u16,
    pub dport: u16,
    pub nat_port: u16,
    pub _pad: u16,
}

/// Key of the endpoints map: a local pod's IPv4 address, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: u32,
}

/// Value of the endpoints map: where a local pod lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Interface index of the pod's host-side veth.
    pub ifindex: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
}

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    pub const POD: u32 = 1 << 0;
    /// Packets for the pod may skip its host veth (`bpf_redirect_peer` from an ingress hook,
    /// straight into the pod's side, no second pass through the veth and the backlog), and its
    /// interface's MAC is [`super::pod_mac`] of its address. Not set for a pod whose traffic is
    /// shaped on the host veth (the `bandwidth` plugin's qdiscs there would be skipped too), nor
    /// by versions before it.
    pub const PEER: u32 = 1 << 1;
}

/// Key of the ipcache (the LPM trie's data part): an address, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    pub addr: u32,
}

/// Value of the ipcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    /// The address's NetworkPolicy identity (never [`POLICY_ANY_IDENTITY`]).
    pub identity: u32,
}

/// The identity a [`PolicyKey`] names to allow any peer.
pub const POLICY_ANY_IDENTITY: u32 = 0;

/// The identity of an address the ipcache has nothing more specific for (no pod's, in no
/// prefix a policy names).
pub const POLICY_WORLD_IDENTITY: u32 = 1;

/// Key of the policy table (the LPM trie's data part), as bytes so that the trie compares them
/// in this order: the local pod's address (network byte order), the direction
/// ([`policy_direction`]), the peer's identity (big-endian), the protocol (0: any), the
/// destination port (big-endian). An entry allowing any protocol has prefix length
/// [`POLICY_PREFIX_ANY_PROTO`], any port of one protocol [`POLICY_PREFIX_ANY_PORT`], a port
/// prefix of `n` bits `POLICY_PREFIX_ANY_PORT + n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub data: [u8; 12],
}

pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;

impl PolicyKey {
    /// `endpoint` in network byte order (as a `u32` read from a packet), the rest in host order.
    pub fn new(endpoint: u32, direction: u8, identity: u32, proto: u8, port: u16) -> Self {
        let mut data = [0u8; 12];
        data[0..4].copy_from_slice(&endpoint.to_ne_bytes());
        data[4] = direction;
        data[5..9].copy_from_slice(&identity.to_be_bytes());
        data[9] = proto;
        data[10..12].copy_from_slice(&port.to_be_bytes());
        Self { data }
    }
}

/// Directions of a [`PolicyKey`].
pub mod policy_direction {
    /// Traffic the pod receives.
    pub const INGRESS: u8 = 1;
    /// Traffic the pod sends.
    pub const EGRESS: u8 = 2;
}

/// Value of the policy table: which policy and rule allow the traffic (for `ferrox trace` and
/// `ferrox monitor`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// The agent's number for the policy (its name is in the agent's table).
    pub policy: u32,
    pub rule: u16,
    pub _pad: u16,
}

/// Value of the policy endpoint map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEndpoint {
    /// [`policy_isolation`] bits.
    pub isolated: u32,
}

/// Bits of [`PolicyEndpoint::isolated`].
pub mod policy_isolation {
    pub const INGRESS: u32 = 1 << 0;
    pub const EGRESS: u32 = 1 << 1;
}

/// Key of the policy conntrack: a flow of an isolated local pod as the pod sees it (after any
/// service translation), and which side opened it ([`policy_direction`]: `INGRESS`, the peer
/// did; `EGRESS`, the pod did). Addresses and ports in network byte order. A packet passes when
/// its flow is found under either direction: a later packet of the flow, or a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCtKey {
    pub pod: u32,
    pub peer: u32,
    pub pod_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of the policy conntrack: what allowed the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCtValue {
    /// The allowing policy's number ([`PolicyValue::policy`]); [`POLICY_CT_NOT_ISOLATED`] when
    /// the pod is not isolated in the flow's direction (tracked so that replies pass the other).
    pub policy: u32,
    pub rule: u16,
    pub _pad: u16,
}

/// Slots of the policy filter (`POLICY_ON_V1`): a power of two.
pub const POLICY_FILTER_SLOTS: u32 = 16_384;

/// The policy filter's slot of an address (network byte order): its low bits, so the pods of a
/// node's block fall on distinct slots.
#[inline(always)]
pub const fn policy_filter_slot(addr: u32) -> u32 {
    u32::from_be(addr) & (POLICY_FILTER_SLOTS - 1)
}

/// [`PolicyCtValue::policy`] of a flow the pod's isolation did not concern.
pub const POLICY_CT_NOT_ISOLATED: u32 = u32::MAX;

/// Key of the tunnel map (the LPM trie's data part): a destination address, network byte order.
/// The prefix length is the trie key's own field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub addr: u32,
}

/// Value of the tunnel map: how to reach a remote pod block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TunnelInfo {
    /// The node the block lives on: the outer destination, network byte order.
    pub remote: u32,
    /// [`tunnel_flags`] bits.
    pub flags: u32,
}

/// Bits of [`TunnelInfo::flags`].
pub mod tunnel_flags {
    /// Encapsulate in IP-in-IP (protocol 4) to [`super::TunnelInfo::remote`].
    pub const IPIP: u32 = 1 << 0;
}

/// Value of the nodes map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// [`node_flags`] bits.
    pub flags: u32,
}

/// Bits of [`NodeInfo::flags`].
pub mod node_flags {
    /// IP-in-IP from this address is decapsulated.
    pub const TUNNEL_PEER: u32 = 1 << 0;
}

/// IP protocol number of IP-in-IP.
pub const IPPROTO_IPIP: u8 = 4;
/// Bytes an IP-in-IP outer header adds.
pub const IPIP_OVERHEAD: u32 = 20;

/// One counter cell: packets (or socket operations) and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Where a counter was incremented.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    SockConnect4 = 0,
    SockSendmsg4 = 1,
    SockRecvmsg4 = 2,
    SockGetpeername4 = 3,
    TcFromPod = 4,
    TcUplinkIngress = 5,
    TcUplinkEgress = 6,
    XdpUplink = 7,
    TcToPod = 8,
}

impl Hook {
    pub const COUNT: u32 = 9;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::SockConnect4,
        Self::SockSendmsg4,
        Self::SockRecvmsg4,
        Self::SockGetpeername4,
        Self::TcFromPod,
        Self::TcUplinkIngress,
        Self::TcUplinkEgress,
        Self::XdpUplink,
        Self::TcToPod,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::SockConnect4 => "sock-connect4",
            Self::SockSendmsg4 => "sock-sendmsg4",
            Self::SockRecvmsg4 => "sock-recvmsg4",
            Self::SockGetpeername4 => "sock-getpeername4",
            Self::TcFromPod => "tc-from-pod",
            Self::TcUplinkIngress => "tc-uplink-ingress",
            Self::TcUplinkEgress => "tc-uplink-egress",
            Self::XdpUplink => "xdp-uplink",
            Self::TcToPod => "tc-to-pod",
        }
    }
}

/// What a program decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the packet or socket operation go on unchanged.
    Pass,
    /// Rewrote the destination (or source, on the reverse path) and let it go on.
    Translate,
    /// Dropped the packet or refused the socket operation.
    Drop,
}

/// Why a program reached its verdict. Every path of every program ends in one of these; every
/// drop has its own reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    // Pass: classified and let through.
    PassNotIpv4 = 0,
    PassTcp = 1,
    PassUdp = 2,
    PassIcmp = 3,
    PassOtherL4 = 4,
    PassIpv4Fragment = 5,
    /// Socket hook: the destination is not a service frontend.
    PassNoService = 6,
    /// Socket hook: the protocol is neither TCP nor UDP.
    PassUnsupportedProto = 7,
    /// Reverse socket hooks: the peer is not a translated backend.
    PassNoRevNat = 8,
    // Translate.
    /// Socket hook: the destination was a frontend, rewritten to a backend.
    TranslateToBackend = 9,
    /// Reverse socket hooks: the backend's address was rewritten back to the frontend's.
    TranslateToFrontend = 10,
    /// Like [`Reason::TranslateToBackend`], to the backend the client's affinity entry names.
    TranslateAffinity = 15,
    /// Per-packet path: the first packet of a flow to a frontend, translated to a backend.
    NatNewFlow = 16,
    /// Per-packet path: a packet of a tracked flow, translated as its first one was.
    NatEstablished = 17,
    /// Per-packet path: a reply from a backend, translated back to the frontend.
    NatReply = 18,
    /// Per-packet path: an ICMP error about a translated flow, translated with it.
    NatIcmpError = 19,
    /// The client is outside the frontend's loadBalancerSourceRanges.
    DropSourceRange = 20,
    /// The flow could not be tracked (the conntrack map refused the entry).
    DropConntrackFull = 21,
    /// The flow needs SNAT but no source port (or node address) was available.
    DropSnatExhausted = 22,
    /// A translated packet has no route to its new destination.
    DropNoRoute = 23,
    /// Rewriting a packet's headers or checksums failed.
    DropRewrite = 24,
    // Drop.
    /// The IPv4 header is truncated or invalid (version, IHL, total length).
    DropMalformedIpv4 = 11,
    /// The frontend exists but has no backend: the connection is refused.
    DropNoBackend = 12,
    /// A backend slot or backend entry the frontend refers to is missing.
    DropBackendMissing = 13,
    /// The UDP reverse-translation entry could not be stored, so replies could not be mapped.
    DropRevNatFull = 14,
    /// Uplink egress: a packet to a remote pod block, encapsulated in IP-in-IP to its node.
    TunnelEncap = 25,
    /// Uplink ingress: IP-in-IP from a cluster node, decapsulated.
    TunnelDecap = 26,
    /// IP-in-IP to this node from an address that is not a cluster node (a spoofing attempt,
    /// or a node the agent does not know yet).
    DropTunnelSource = 27,
    /// IP-in-IP that cannot be decapsulated: an outer fragment, or no IPv4 packet inside.
    DropTunnelMalformed = 28,
    /// Encapsulation failed: no node address known, or the packet could not grow.
    DropTunnelEncap = 29,
    /// Per-packet path: a later fragment of a translated datagram, translated as its first.
    NatFragment = 30,
    /// A later fragment of a TCP/UDP datagram whose first fragment was not seen (out of order,
    /// or lost): its ports, and so its translation, are unknown.
    DropFragmentUnknown = 31,
    /// A packet of an established TCP flow whose backend left (a new SYN picks another).
    DropBackendGone = 32,
    /// Too big for the path to its backend with don't-fragment set: answered with an ICMP
    /// fragmentation-needed in the client's own addresses.
    DropTooBig = 33,
    /// XDP: a packet of a translated flow whose way on XDP cannot take itself (into a local
    /// pod, to the host, through the tunnel, an ICMP answer), left untouched for TC, which
    /// translates it with the same conntrack entry.
    PassToTc = 34,
    /// Pod veth: a packet to a pod block of another node reached in IP-in-IP, sent straight
    /// to the uplink (wrapped there) instead of through the host's forwarding.
    PodToTunnel = 35,
    /// NetworkPolicy: a new flow from a local pod isolated for egress that no policy allows.
    DropPolicyEgress = 36,
    /// NetworkPolicy: a new flow to a local pod isolated for ingress that no policy allows.
    DropPolicyIngress = 37,
    /// NetworkPolicy: the policy conntrack refused the entry of an allowed new flow (its later
    /// packets would be judged again, its replies perhaps dropped).
    DropPolicyCtFull = 38,
    /// NetworkPolicy: a new flow of an isolated pod that a policy allowed (remembered from then
    /// on). Counted besides the packet's own reason, once per flow and side, without bytes.
    PolicyAllowedNew = 39,
    /// Pod veth, towards the pod: its address is in no isolated pod's filter slot, so no
    /// policy is judged (one array read).
    PassPodNotIsolated = 40,
}

impl Reason {
    pub const COUNT: u32 = 41;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::PassNotIpv4,
        Self::PassTcp,
        Self::PassUdp,
        Self::PassIcmp,
        Self::PassOtherL4,
        Self::PassIpv4Fragment,
        Self::PassNoService,
        Self::PassUnsupportedProto,
        Self::PassNoRevNat,
        Self::TranslateToBackend,
        Self::TranslateToFrontend,
        Self::DropMalformedIpv4,
        Self::DropNoBackend,
        Self::DropBackendMissing,
        Self::DropRevNatFull,
        Self::TranslateAffinity,
        Self::NatNewFlow,
        Self::NatEstablished,
        Self::NatReply,
        Self::NatIcmpError,
        Self::DropSourceRange,
        Self::DropConntrackFull,
        Self::DropSnatExhausted,
        Self::DropNoRoute,
        Self::DropRewrite,
        Self::TunnelEncap,
        Self::TunnelDecap,
        Self::DropTunnelSource,
        Self::DropTunnelMalformed,
        Self::DropTunnelEncap,
        Self::NatFragment,
        Self::DropFragmentUnknown,
        Self::DropBackendGone,
        Self::DropTooBig,
        Self::PassToTc,
        Self::PodToTunnel,
        Self::DropPolicyEgress,
        Self::DropPolicyIngress,
        Self::DropPolicyCtFull,
        Self::PolicyAllowedNew,
        Self::PassPodNotIsolated,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Self::PassNotIpv4
            | Self::PassTcp
            | Self::PassUdp
            | Self::PassIcmp
            | Self::PassOtherL4
            | Self::PassIpv4Fragment
            | Self::PassNoService
            | Self::PassUnsupportedProto
            | Self::PassNoRevNat
            | Self::TunnelEncap
            | Self::TunnelDecap
            | Self::PassToTc
            | Self::PodToTunnel
            | Self::PolicyAllowedNew
            | Self::PassPodNotIsolated => Verdict::Pass,
            Self::TranslateToBackend
            | Self::TranslateToFrontend
            | Self::TranslateAffinity
            | Self::NatNewFlow
            | Self::NatEstablished
            | Self::NatReply
            | Self::NatIcmpError
            | Self::NatFragment => Verdict::Translate,
            Self::DropMalformedIpv4
            | Self::DropNoBackend
            | Self::DropBackendMissing
            | Self::DropRevNatFull
            | Self::DropSourceRange
            | Self::DropConntrackFull
            | Self::DropSnatExhausted
            | Self::DropNoRoute
            | Self::DropRewrite
            | Self::DropTunnelSource
            | Self::DropTunnelMalformed
            | Self::DropTunnelEncap
            | Self::DropFragmentUnknown
            | Self::DropBackendGone
            | Self::DropTooBig
            | Self::DropPolicyEgress
            | Self::DropPolicyIngress
            | Self::DropPolicyCtFull => Verdict::Drop,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::PassNotIpv4 => "not-ipv4",
            Self::PassTcp => "tcp",
            Self::PassUdp => "udp",
            Self::PassIcmp => "icmp",
            Self::PassOtherL4 => "other-l4",
            Self::PassIpv4Fragment => "ipv4-fragment",
            Self::PassNoService => "no-service",
            Self::PassUnsupportedProto => "unsupported-proto",
            Self::PassNoRevNat => "no-revnat",
            Self::TranslateToBackend => "to-backend",
            Self::TranslateToFrontend => "to-frontend",
            Self::DropMalformedIpv4 => "malformed-ipv4",
            Self::DropNoBackend => "no-backend",
            Self::DropBackendMissing => "backend-missing",
            Self::DropRevNatFull => "revnat-full",
            Self::TranslateAffinity => "to-backend-affinity",
            Self::NatNewFlow => "nat-new-flow",
            Self::NatEstablished => "nat-established",
            Self::NatReply => "nat-reply",
            Self::NatIcmpError => "nat-icmp-error",
            Self::DropSourceRange => "source-range-denied",
            Self::DropConntrackFull => "conntrack-full",
            Self::DropSnatExhausted => "snat-exhausted",
            Self::DropNoRoute => "no-route",
            Self::DropRewrite => "rewrite-failed",
            Self::TunnelEncap => "tunnel-encap",
            Self::TunnelDecap => "tunnel-decap",
            Self::DropTunnelSource => "tunnel-unknown-source",
            Self::DropTunnelMalformed => "tunnel-malformed",
            Self::DropTunnelEncap => "tunnel-encap-failed",
            Self::NatFragment => "nat-fragment",
            Self::DropFragmentUnknown => "fragment-unknown",
            Self::DropBackendGone => "backend-gone",
            Self::DropTooBig => "too-big",
            Self::PassToTc => "to-tc",
            Self::PodToTunnel => "pod-to-tunnel",
            Self::DropPolicyEgress => "policy-denied-egress",
            Self::DropPolicyIngress => "policy-denied-ingress",
            Self::DropPolicyCtFull => "policy-conntrack-full",
            Self::PolicyAllowedNew => "policy-allowed-new-flow",
            Self::PassPodNotIsolated => "pod-not-isolated",
        }
    }

    pub const fn from_u32(v: u32) -> Option<Self> {
        if v < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
}

/// Hooks the counters grid has room for (more than exist, so a new hook keeps the layout).
pub const HOOK_SLOTS: u32 = 16;
/// Reasons the counters grid has room for per hook.
pub const REASON_SLOTS: u32 = 64;

/// Size of the counters array: a fixed grid of cells, one per (hook, reason), with room to grow.
pub const COUNTER_SLOTS: u32 = HOOK_SLOTS * REASON_SLOTS;

/// Index of the (hook, reason) cell in the counters map.
#[inline(always)]
pub const fn counter_index(hook: Hook, reason: Reason) -> u32 {
    hook as u32 * REASON_SLOTS + reason as u32
}

/// Inverse of [`counter_index`]; `None` for a cell no (hook, reason) uses yet.
pub const fn counter_cell(index: u32) -> Option<(Hook, Reason)> {
    let hook = index / REASON_SLOTS;
    if hook >= Hook::COUNT {
        return None;
    }
    match Reason::from_u32(index % REASON_SLOTS) {
        Some(reason) => Some((Hook::ALL[hook as usize], reason)),
        None => None,
    }
}

/// Link-local address every pod uses as its default gateway (answered by proxy ARP on the
/// host-side veth), as in Calico.
pub const POD_GATEWAY: [u8; 4] = [169, 254, 1, 1];

/// The MAC address the CNI plugin gives a pod's interface: `0a:58` (locally administered,
/// unicast) then its IPv4 address, so the programs know it from the address alone (for a pod
/// registered with [`endpoint_flags::PEER`]). `addr` in network byte order, as the maps hold it.
#[inline(always)]
pub const fn pod_mac(addr: u32) -> [u8; 6] {
    let o = addr.to_ne_bytes();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

// Layout checks: a change here is an ABI change and needs a new map version.
const _: () = {
    assert!(size_of::<ServiceKey>() == 12);
    assert!(offset_of!(ServiceKey, port) == 4);
    assert!(offset_of!(ServiceKey, proto) == 6);
    assert!(offset_of!(ServiceKey, slot) == 8);
    assert!(size_of::<ServiceValue>() == 16);
    assert!(offset_of!(ServiceValue, count) == 4);
    assert!(offset_of!(ServiceValue, flags) == 8);
    assert!(offset_of!(ServiceValue, affinity_timeout) == 12);
    assert!(size_of::<Backend>() == 8);
    assert!(offset_of!(Backend, port) == 4);
    assert!(offset_of!(Backend, flags) == 7);
    assert!(size_of::<SockRevNatKey>() == 16);
    assert!(offset_of!(SockRevNatKey, addr) == 8);
    assert!(size_of::<SockRevNatValue>() == 8);
    assert!(size_of::<EndpointKey>() == 4);
    assert!(size_of::<EndpointInfo>() == 8);
    assert!(size_of::<CounterValue>() == 16);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<CtKey>() == 16);
    assert!(offset_of!(CtKey, sport) == 8);
    assert!(offset_of!(CtKey, proto) == 12);
    assert!(size_of::<CtEntry>() == 48);
    assert!(offset_of!(CtEntry, fwd_flags) == 19);
    assert!(offset_of!(CtEntry, fwd_ifindex) == 20);
    assert!(offset_of!(CtEntry, fwd_macs) == 32);
    assert!(offset_of!(CtEntry, fwd_max_len) == 44);
    assert!(size_of::<CtEntryV1>() == 32);
    assert!(offset_of!(CtEntryV1, flags) == 18);
    assert!(offset_of!(CtEntryV1, last_seen_ns) == 24);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragValue>() == 4);
    assert!(offset_of!(CtEntry, backend_id) == 12);
    assert!(offset_of!(CtEntry, flags) == 18);
    assert!(offset_of!(CtEntry, last_seen_ns) == 24);
    assert!(size_of::<SrcRangeKey>() == 8);
    assert!(offset_of!(SrcRangeKey, addr) == 4);
    assert!(size_of::<DatapathConfig>() == 16);
    assert!(size_of::<MonitorEvent>() == 24);
    assert!(offset_of!(AffinityKey, rev_nat_id) == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(offset_of!(AffinityValue, last_used_ns) == 8);
    assert!(size_of::<TunnelKey>() == 4);
    assert!(size_of::<TunnelInfo>() == 8);
    assert!(size_of::<NodeInfo>() == 4);
    assert!(size_of::<IpcacheKey>() == 4 && size_of::<IpcacheValue>() == 4);
    assert!(size_of::<PolicyKey>() == 12 && size_of::<PolicyValue>() == 8);
    assert!(size_of::<PolicyEndpoint>() == 4);
    assert!(size_of::<PolicyCtKey>() == 16 && offset_of!(PolicyCtKey, proto) == 12);
    assert!(size_of::<PolicyCtValue>() == 8);
    assert!(POLICY_PREFIX_ANY_PORT + 16 == 8 * size_of::<PolicyKey>() as u32);
    assert!(Reason::COUNT <= REASON_SLOTS && Hook::COUNT <= HOOK_SLOTS);
    assert!(Reason::ALL.len() == Reason::COUNT as usize);
    assert!(Hook::ALL.len() == Hook::COUNT as usize);
};

#[cfg(feature = "user")]
mod pod {
    //! SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers, with all padding
    //! explicit (checked by the size asserts above), so any bit pattern is a valid value.
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtEntryV1 {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for TunnelKey {}
    unsafe impl aya::Pod for TunnelInfo {}
    unsafe impl aya::Pod for NodeInfo {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyEndpoint {}
    unsafe impl aya::Pod for PolicyCtKey {}
    unsafe impl aya::Pod for PolicyCtValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_index_round_trips_for_every_cell() {
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let i = counter_index(hook, reason);
                assert!(i < COUNTER_SLOTS);
                assert_eq!(counter_cell(i), Some((hook, reason)));
            }
        }
        assert_eq!(counter_cell(COUNTER_SLOTS), None);
        assert_eq!(
            counter_cell(Reason::COUNT),
            None,
            "an unused cell names nothing"
        );
    }

    #[test]
    fn enum_discriminants_match_their_position() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, h) in Hook::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i, "{h:?}");
        }
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
