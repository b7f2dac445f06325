//! The maps of the datapath, pinned by name under `<bpffs root>/v1/maps/`. Their key and value
//! types, names and sizes come from `ferrox-abi`; nothing about a map is decided here.
#![allow(
    non_upper_case_globals,
    reason = "map statics carry their versioned ABI names"
)]

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, COUNTER_SLOTS, CounterValue, EndpointInfo, EndpointKey,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, capacity,
};

#[map]
pub static SVC_V1: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

#[map]
pub static BACKENDS_V1: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

#[map]
pub static SOCK_RNAT_V1: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

#[map]
pub static COUNTERS_V1: PerCpuArray<CounterValue> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
pub static ENDPOINTS_V1: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);
