//! The maps of the datapath, pinned by name under `<bpffs root>/v1/maps/`. Their key and value
//! types, names and sizes come from `ferrox-abi`; nothing about a map is decided here.
//!
//! The maps only user space writes (services, backends, endpoints, nodes) are not preallocated
//! (`BPF_F_NO_PREALLOC`): the kernel allocates an entry when the agent writes it, lookups cost
//! the same, and the node pays for what they hold rather than their capacity. The maps the
//! programs write per packet (conntrack, reverse NAT, affinity, fragments) are LRU hashes, always
//! preallocated; the agent sizes them to the node's memory when it loads them
//! (`ferrox_datapath::Sizing`).
#![allow(
    non_upper_case_globals,
    reason = "map statics carry their versioned ABI names"
)]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array as BtfArray, HashOfMaps, LruHashMap as BtfLruHashMap},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, COUNTER_SLOTS, CounterValue, CtEntry, CtKey,
    DatapathConfig, EndpointInfo, EndpointKey, FragKey, FragValue, IpcacheKey, IpcacheValue,
    MAGLEV_TABLE_SIZE, NodeInfo, PolicyCtKey, PolicyCtValue, PolicyEndpoint, PolicyKey,
    PolicyValue, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeKey, TunnelInfo,
    TunnelKey, capacity,
};

#[map]
pub static SVC_V1: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub static BACKENDS_V1: HashMap<u32, Backend> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map]
pub static SOCK_RNAT_V1: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

#[map]
pub static COUNTERS_V2: PerCpuArray<CounterValue> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
pub static ENDPOINTS_V1: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(capacity::ENDPOINTS, BPF_F_NO_PREALLOC);

#[map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

/// While a resize of `SOCK_RNAT_V1` finishes: the previous map under key 0 (see
/// [`crate::resizing`]).
#[btf_map(pin_by_name)]
pub static RNAT_PREV_V1: HashOfMaps<u32, BtfLruHashMap<SockRevNatKey, SockRevNatValue, 1>, 1> =
    HashOfMaps::new();

/// While a resize of `AFFINITY_V1` finishes: the previous map under key 0.
#[btf_map(pin_by_name)]
pub static AFF_PREV_V1: HashOfMaps<u32, BtfLruHashMap<AffinityKey, AffinityValue, 1>, 1> =
    HashOfMaps::new();

#[map]
pub static CT_V2: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// While a resize of `CT_V2` finishes: the previous conntrack map under key 0 (see
/// [`crate::conntrack::lookup`]). The inner map's capacity is not part of its type for the
/// kernel (hash maps of any size fit), so the template declares one entry.
#[btf_map(pin_by_name)]
pub static CT_PREV_V1: HashOfMaps<u32, BtfLruHashMap<CtKey, CtEntry, 1>, 1> = HashOfMaps::new();

/// Allowed source prefixes per frontend (loadBalancerSourceRanges); value 1 = allowed.
#[map]
pub static SRC_RANGES_V1: LpmTrie<SrcRangeKey, u8> =
    LpmTrie::pinned(capacity::SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// Element 0: the node facts the agent provides.
#[map]
pub static CONFIG_V1: Array<DatapathConfig> = Array::pinned(1, 0);

/// One Maglev table per external frontend, keyed by its rev_nat_id.
#[btf_map(pin_by_name)]
pub static MAGLEV_V1: HashOfMaps<
    u32,
    BtfArray<u32, { MAGLEV_TABLE_SIZE as usize }>,
    { capacity::MAGLEV as usize },
> = HashOfMaps::new();

/// Events for `ferrox monitor` (see [`crate::events`]).
#[map]
pub static EVENTS_V1: RingBuf = RingBuf::pinned(ferrox_abi::EVENTS_BYTES, 0);

/// Remote pod blocks reached in IP-in-IP (see [`crate::tunnel`]).
#[map]
pub static TUNNEL_V1: LpmTrie<TunnelKey, TunnelInfo> =
    LpmTrie::pinned(capacity::TUNNELS, BPF_F_NO_PREALLOC);

/// The cluster's node addresses: the only sources IP-in-IP is decapsulated from.
#[map]
pub static NODES_V1: HashMap<u32, NodeInfo> = HashMap::pinned(capacity::NODES, BPF_F_NO_PREALLOC);

/// The ports of fragmented datagrams, from their first fragment (see [`crate::flow`]).
#[map]
pub static FRAG_V1: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Element 0: the host network namespace's cookie (see `ferrox_abi::map_names::HOST_NETNS`).
#[map]
pub static HOST_NETNS_V1: Array<u64> = Array::pinned(1, 0);

/// Element 0: how many times backends were removed (see `ferrox_abi::map_names::BACKENDS_GEN`).
#[map]
pub static BACKENDS_GEN_V1: Array<u32> = Array::pinned(1, 0);

/// NetworkPolicy: the identity of each address (written by the agent).
#[map]
pub static IPCACHE_V1: LpmTrie<IpcacheKey, IpcacheValue> =
    LpmTrie::pinned(capacity::IPCACHE, BPF_F_NO_PREALLOC);

/// NetworkPolicy: what each isolated local pod allows.
#[map]
pub static POLICY_V1: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICIES, BPF_F_NO_PREALLOC);

/// NetworkPolicy: the local pods some policy isolates.
#[map]
pub static POLICY_EP_V1: HashMap<EndpointKey, PolicyEndpoint> =
    HashMap::pinned(capacity::POLICY_ENDPOINTS, BPF_F_NO_PREALLOC);

/// NetworkPolicy: the allowed flows of isolated local pods.
#[map]
pub static POLICY_CT_V1: LruHashMap<PolicyCtKey, PolicyCtValue> =
    LruHashMap::pinned(capacity::POLICY_CT, 0);

/// NetworkPolicy: the filter of addresses that may be isolated local pods.
#[map]
pub static POLICY_ON_V1: Array<u8> = Array::pinned(ferrox_abi::POLICY_FILTER_SLOTS, 0);
