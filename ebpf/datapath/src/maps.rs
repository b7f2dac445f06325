//! Typed handles to the pinned maps. They open the pins directly, so the CLI can read them while
//! the agent is down, and every error names the map it concerns. A full map is its own error
//! ([`MapFull`]), never a silent partial write.

use std::marker::PhantomData;

use aya::{
    Pod,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray,
        lpm_trie::Key as LpmKey,
    },
};
use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, COUNTER_SLOTS, CounterValue, CtEntry, CtKey,
    DatapathConfig, EndpointInfo, EndpointKey, Hook, IpcacheKey, IpcacheValue, NodeInfo,
    PolicyCtKey, PolicyCtValue, PolicyEndpoint, PolicyKey, PolicyValue, Reason, ServiceKey,
    ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeKey, TunnelInfo, TunnelKey, counter_cell,
    counter_index, map_names, src_range_prefixlen,
};

use crate::{DatapathError, PinLayout, Result};

/// A write failed because the map holds `max_entries` entries already.
#[derive(Debug, thiserror::Error)]
#[error("map {name} is full ({capacity} entries)")]
pub struct MapFull {
    pub name: &'static str,
    pub capacity: u32,
}

/// Outcome of a write to a hash map.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Full(#[from] MapFull),
    #[error(transparent)]
    Other(#[from] DatapathError),
}

/// A pinned hash (or LRU hash) map with key `K` and value `V`.
pub struct TypedHash<K, V> {
    name: &'static str,
    capacity: u32,
    id: u32,
    map: HashMap<MapData, K, V>,
    _kv: PhantomData<(K, V)>,
}

fn open_map(layout: &PinLayout, name: &'static str) -> Result<(Map, MapInfo)> {
    let path = layout.map(name);
    let data =
        MapData::from_pin(&path).map_err(|e| DatapathError::map("opening pinned", name, e))?;
    let info = data
        .info()
        .map_err(|e| DatapathError::map("inspecting", name, e))?;
    let map = Map::from_map_data(data).map_err(|e| DatapathError::map("typing", name, e))?;
    Ok((map, info))
}

impl<K: Pod, V: Pod> TypedHash<K, V> {
    fn open(layout: &PinLayout, name: &'static str) -> Result<Self> {
        let (map, info) = open_map(layout, name)?;
        let map = HashMap::try_from(map).map_err(|e| match e {
            MapError::InvalidKeySize { size, expected }
            | MapError::InvalidValueSize { size, expected } => DatapathError::MapLayout {
                name,
                path: layout.map(name),
                expected: format!("{expected} bytes"),
                found: format!("{size} bytes"),
            },
            e => DatapathError::map("typing", name, e),
        })?;
        Ok(Self {
            name,
            capacity: info.max_entries(),
            id: info.id(),
            map,
            _kv: PhantomData,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The kernel's id of this map (stable while it stays pinned).
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn get(&self, key: &K) -> Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DatapathError::map("reading", self.name, e)),
        }
    }

    pub fn insert(&mut self, key: &K, value: &V) -> Result<(), WriteError> {
        match self.map.insert(key, value, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(MapFull {
                    name: self.name,
                    capacity: self.capacity,
                }
                .into())
            }
            Err(e) => Err(DatapathError::map("writing", self.name, e).into()),
        }
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&mut self, key: &K) -> Result<bool> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(e) => Err(DatapathError::map("deleting from", self.name, e)),
        }
    }

    /// Every entry. Entries removed while iterating are skipped.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(DatapathError::map("iterating", self.name, e)),
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.map.keys().next().is_none())
    }

    pub fn len(&self) -> Result<usize> {
        let mut n = 0;
        for key in self.map.keys() {
            key.map_err(|e| DatapathError::map("iterating", self.name, e))?;
            n += 1;
        }
        Ok(n)
    }
}

/// One non-zero counter cell, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CounterRow {
    pub hook: &'static str,
    pub reason: &'static str,
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The per-CPU verdict and drop-reason counters.
pub struct Counters {
    id: u32,
    map: PerCpuArray<MapData, CounterValue>,
}

impl Counters {
    fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::COUNTERS;
        let (map, info) = open_map(layout, name)?;
        if info.max_entries() != COUNTER_SLOTS {
            return Err(DatapathError::MapLayout {
                name,
                path: layout.map(name),
                expected: format!("{COUNTER_SLOTS} cells"),
                found: format!("{} cells", info.max_entries()),
            });
        }
        let map = PerCpuArray::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { id: info.id(), map })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The (hook, reason) cell summed over all CPUs.
    pub fn get(&self, hook: Hook, reason: Reason) -> Result<CounterValue> {
        let values = self
            .map
            .get(&counter_index(hook, reason), 0)
            .map_err(|e| DatapathError::map("reading", map_names::COUNTERS, e))?;
        Ok(values
            .iter()
            .fold(CounterValue::default(), |acc, v| CounterValue {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            }))
    }

    /// Every non-zero cell, summed over CPUs, in (hook, reason) order.
    pub fn snapshot(&self) -> Result<Vec<CounterRow>> {
        let mut rows = Vec::new();
        for index in 0..COUNTER_SLOTS {
            let Some((hook, reason)) = counter_cell(index) else {
                continue;
            };
            let v = self.get(hook, reason)?;
            if v.packets == 0 {
                continue;
            }
            let verdict = match reason.verdict() {
                ferrox_abi::Verdict::Pass => "pass",
                ferrox_abi::Verdict::Translate => "translate",
                ferrox_abi::Verdict::Drop => "drop",
            };
            rows.push(CounterRow {
                hook: hook.name(),
                reason: reason.name(),
                verdict,
                packets: v.packets,
                bytes: v.bytes,
            });
        }
        Ok(rows)
    }
}

/// Every map of the datapath, opened from its pin.
pub struct Maps {
    pub services: TypedHash<ServiceKey, ServiceValue>,
    /// Backend id -> backend. Remove through [`Maps::remove_backend`], which tells the
    /// programs' conntrack to look again.
    pub backends: TypedHash<u32, Backend>,
    /// How many times backends were removed (`BACKENDS_GEN_V1`).
    pub backends_gen: Single<u32>,
    pub sock_revnat: TypedHash<SockRevNatKey, SockRevNatValue>,
    pub endpoints: TypedHash<EndpointKey, EndpointInfo>,
    pub affinity: TypedHash<AffinityKey, AffinityValue>,
    pub conntrack: TypedHash<CtKey, CtEntry>,
    pub source_ranges: SourceRanges,
    pub config: Config,
    pub counters: Counters,
    pub tunnels: Tunnels,
    /// Node address (network byte order) -> what the programs know about that node.
    pub nodes: TypedHash<u32, NodeInfo>,
    /// The host network namespace's cookie.
    pub host_netns: HostNetns,
    /// NetworkPolicy: every address's identity.
    pub ipcache: Lpm<IpcacheKey, IpcacheValue>,
    /// NetworkPolicy: what each isolated local pod allows.
    pub policies: Lpm<PolicyKey, PolicyValue>,
    /// NetworkPolicy: the isolated local pods (pod address -> directions).
    pub policy_endpoints: TypedHash<EndpointKey, PolicyEndpoint>,
    /// NetworkPolicy: the allowed flows of isolated local pods.
    pub policy_ct: TypedHash<PolicyCtKey, PolicyCtValue>,
    /// NetworkPolicy: the filter of addresses that may be isolated local pods.
    pub policy_filter: PolicyFilter,
}

/// A longest-prefix-match trie of the datapath, by (prefix length, key data).
pub struct Lpm<K: Pod, V: Pod> {
    name: &'static str,
    capacity: u32,
    map: LpmTrie<MapData, K, V>,
}

impl<K: Pod, V: Pod> Lpm<K, V> {
    fn open(layout: &PinLayout, name: &'static str, capacity: u32) -> Result<Self> {
        let (map, _) = open_map(layout, name)?;
        let map = LpmTrie::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self {
            name,
            capacity,
            map,
        })
    }

    /// Adds or replaces the entry of `key` with `prefix_len` bits.
    pub fn insert(&mut self, prefix_len: u32, key: K, value: &V) -> Result<(), WriteError> {
        match self.map.insert(&LpmKey::new(prefix_len, key), value, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                Err(MapFull {
                    name: self.name,
                    capacity: self.capacity,
                }
                .into())
            }
            Err(e) => Err(DatapathError::map("writing", self.name, e).into()),
        }
    }

    /// Removes the entry of exactly `key` with `prefix_len` bits; false when there was none.
    pub fn remove(&mut self, prefix_len: u32, key: K) -> Result<bool> {
        match self.map.remove(&LpmKey::new(prefix_len, key)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(DatapathError::map("deleting from", self.name, e)),
        }
    }

    /// The value of the longest prefix matching all 8 x `size_of::<K>()` bits of `key`, as the
    /// programs look it up.
    pub fn longest_match(&self, key: K) -> Result<Option<V>> {
        let bits = 8 * size_of::<K>() as u32;
        match self.map.get(&LpmKey::new(bits, key), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(DatapathError::map("reading", self.name, e)),
        }
    }

    /// Every entry: (prefix length, key, value).
    pub fn entries(&self) -> Result<Vec<(u32, K, V)>> {
        self.map
            .iter()
            .map(|item| {
                item.map(|(k, v)| (k.prefix_len(), k.data(), v))
                    .map_err(|e| DatapathError::map("iterating", self.name, e))
            })
            .collect()
    }
}

/// A map of one element (an `Array` of size 1): a value the agent sets for the programs.
pub struct Single<T: Pod> {
    name: &'static str,
    map: Array<MapData, T>,
}

impl<T: Pod> Single<T> {
    fn open(layout: &PinLayout, name: &'static str) -> Result<Self> {
        let (map, _) = open_map(layout, name)?;
        let map = Array::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { name, map })
    }

    pub fn get(&self) -> Result<T> {
        self.map
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", self.name, e))
    }

    pub fn set(&mut self, value: T) -> Result<()> {
        self.map
            .set(0, &value, 0)
            .map_err(|e| DatapathError::map("writing", self.name, e))
    }
}

/// The policy filter (`POLICY_ON_V1`): a byte per [`ferrox_abi::policy_filter_slot`].
pub struct PolicyFilter {
    map: Array<MapData, u8>,
}

impl PolicyFilter {
    fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::POLICY_ON;
        let (map, _) = open_map(layout, name)?;
        let map = Array::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { map })
    }

    /// Marks (or unmarks) the slot of `addr` (network byte order).
    pub fn set(&mut self, addr: u32, on: bool) -> Result<()> {
        self.map
            .set(ferrox_abi::policy_filter_slot(addr), &u8::from(on), 0)
            .map_err(|e| DatapathError::map("writing", map_names::POLICY_ON, e))
    }

    pub fn get(&self, addr: u32) -> Result<bool> {
        self.map
            .get(&ferrox_abi::policy_filter_slot(addr), 0)
            .map(|v| v != 0)
            .map_err(|e| DatapathError::map("reading", map_names::POLICY_ON, e))
    }

    /// How many slots are marked.
    pub fn marked(&self) -> Result<usize> {
        let mut n = 0;
        for slot in 0..ferrox_abi::POLICY_FILTER_SLOTS {
            let v = self
                .map
                .get(&slot, 0)
                .map_err(|e| DatapathError::map("reading", map_names::POLICY_ON, e))?;
            n += usize::from(v != 0);
        }
        Ok(n)
    }
}

/// The host network namespace's cookie (`HOST_NETNS_V1`).
pub type HostNetns = Single<u64>;

/// The tunnel trie: remote pod blocks reached in IP-in-IP, and their nodes.
pub struct Tunnels {
    map: LpmTrie<MapData, TunnelKey, TunnelInfo>,
}

/// One entry of the tunnel trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tunnel {
    pub prefix: ipnet::Ipv4Net,
    /// The node the block is encapsulated to.
    pub remote: std::net::Ipv4Addr,
    /// [`ferrox_abi::tunnel_flags`] bits.
    pub flags: u32,
}

impl Tunnels {
    fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::TUNNELS;
        let (map, _) = open_map(layout, name)?;
        let map = LpmTrie::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { map })
    }

    fn key(prefix: ipnet::Ipv4Net) -> LpmKey<TunnelKey> {
        let net = prefix.trunc();
        LpmKey::new(
            u32::from(net.prefix_len()),
            TunnelKey {
                addr: u32::from_ne_bytes(net.network().octets()),
            },
        )
    }

    /// Adds or replaces the entry of `t.prefix`.
    pub fn insert(&mut self, t: &Tunnel) -> Result<(), WriteError> {
        let value = TunnelInfo {
            remote: u32::from_ne_bytes(t.remote.octets()),
            flags: t.flags,
        };
        match self.map.insert(&Self::key(t.prefix), &value, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                Err(MapFull {
                    name: map_names::TUNNELS,
                    capacity: ferrox_abi::capacity::TUNNELS,
                }
                .into())
            }
            Err(e) => Err(DatapathError::map("writing", map_names::TUNNELS, e).into()),
        }
    }

    pub fn remove(&mut self, prefix: ipnet::Ipv4Net) -> Result<bool> {
        match self.map.remove(&Self::key(prefix)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(DatapathError::map("deleting from", map_names::TUNNELS, e)),
        }
    }

    /// Every entry, by prefix.
    pub fn entries(&self) -> Result<Vec<Tunnel>> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (k, v) =
                item.map_err(|e| DatapathError::map("iterating", map_names::TUNNELS, e))?;
            let addr = std::net::Ipv4Addr::from(k.data().addr.to_ne_bytes());
            if let Ok(prefix) = ipnet::Ipv4Net::new(addr, k.prefix_len().min(32) as u8) {
                out.push(Tunnel {
                    prefix,
                    remote: std::net::Ipv4Addr::from(v.remote.to_ne_bytes()),
                    flags: v.flags,
                });
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The loadBalancerSourceRanges trie: which (frontend, prefix) pairs may connect.
pub struct SourceRanges {
    map: LpmTrie<MapData, SrcRangeKey, u8>,
}

/// One allowed source prefix of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub rev_nat_id: u16,
    pub prefix: ipnet::Ipv4Net,
}

impl SourceRanges {
    fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::SOURCE_RANGES;
        let (map, _) = open_map(layout, name)?;
        let map = LpmTrie::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { map })
    }

    fn key(r: &SourceRange) -> LpmKey<SrcRangeKey> {
        let net = r.prefix.trunc();
        LpmKey::new(
            src_range_prefixlen(net.prefix_len()),
            SrcRangeKey {
                rev_nat_id: r.rev_nat_id.to_be(),
                _pad: 0,
                addr: u32::from_ne_bytes(net.network().octets()),
            },
        )
    }

    pub fn insert(&mut self, r: &SourceRange) -> Result<(), WriteError> {
        match self.map.insert(&Self::key(r), &1, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                Err(MapFull {
                    name: map_names::SOURCE_RANGES,
                    capacity: ferrox_abi::capacity::SOURCE_RANGES,
                }
                .into())
            }
            Err(e) => Err(DatapathError::map("writing", map_names::SOURCE_RANGES, e).into()),
        }
    }

    pub fn remove(&mut self, r: &SourceRange) -> Result<bool> {
        match self.map.remove(&Self::key(r)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(DatapathError::map(
                "deleting from",
                map_names::SOURCE_RANGES,
                e,
            )),
        }
    }

    /// Every allowed (frontend, prefix).
    pub fn entries(&self) -> Result<Vec<SourceRange>> {
        let mut out = Vec::new();
        for k in self.map.keys() {
            let k = k.map_err(|e| DatapathError::map("iterating", map_names::SOURCE_RANGES, e))?;
            let data = k.data();
            let bits = k.prefix_len().saturating_sub(32).min(32) as u8;
            let addr = std::net::Ipv4Addr::from(data.addr.to_ne_bytes());
            if let Ok(prefix) = ipnet::Ipv4Net::new(addr, bits) {
                out.push(SourceRange {
                    rev_nat_id: u16::from_be(data.rev_nat_id),
                    prefix,
                });
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The node facts the programs read (`CONFIG_V1`, one element).
pub struct Config {
    map: Array<MapData, DatapathConfig>,
}

impl Config {
    fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::CONFIG;
        let (map, _) = open_map(layout, name)?;
        let map = Array::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { map })
    }

    pub fn get(&self) -> Result<DatapathConfig> {
        self.map
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", map_names::CONFIG, e))
    }

    pub fn set(&mut self, config: &DatapathConfig) -> Result<()> {
        self.map
            .set(0, config, 0)
            .map_err(|e| DatapathError::map("writing", map_names::CONFIG, e))
    }
}

impl Maps {
    /// Opens the pinned maps of `layout`. Fails with a clear error when they are not pinned
    /// (the agent has not run) or were pinned by an incompatible version.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            services: TypedHash::open(layout, map_names::SERVICES)?,
            backends: TypedHash::open(layout, map_names::BACKENDS)?,
            backends_gen: Single::open(layout, map_names::BACKENDS_GEN)?,
            sock_revnat: TypedHash::open(layout, map_names::SOCK_REVNAT)?,
            endpoints: TypedHash::open(layout, map_names::ENDPOINTS)?,
            affinity: TypedHash::open(layout, map_names::AFFINITY)?,
            conntrack: TypedHash::open(layout, map_names::CONNTRACK)?,
            source_ranges: SourceRanges::open(layout)?,
            config: Config::open(layout)?,
            counters: Counters::open(layout)?,
            tunnels: Tunnels::open(layout)?,
            nodes: TypedHash::open(layout, map_names::NODES)?,
            host_netns: Single::open(layout, map_names::HOST_NETNS)?,
            ipcache: Lpm::open(layout, map_names::IPCACHE, ferrox_abi::capacity::IPCACHE)?,
            policies: Lpm::open(layout, map_names::POLICIES, ferrox_abi::capacity::POLICIES)?,
            policy_endpoints: TypedHash::open(layout, map_names::POLICY_ENDPOINTS)?,
            policy_ct: TypedHash::open(layout, map_names::POLICY_CT)?,
            policy_filter: PolicyFilter::open(layout)?,
        })
    }

    /// Removes a backend (true if it was there) and counts the removal in `BACKENDS_GEN_V1`,
    /// after it: a tracked flow's next packet then looks its backend up (flows skip that lookup
    /// while the count stands still), so a flow whose backend left learns it at once.
    pub fn remove_backend(&mut self, id: u32) -> Result<bool> {
        let removed = self.backends.remove(&id)?;
        if removed {
            self.backends_removed()?;
        }
        Ok(removed)
    }

    /// Counts a removal of backends without removing one: every tracked flow's next packet
    /// checks its backend. The agent calls it at start, when the backends may have changed
    /// while no agent ran.
    pub fn backends_removed(&mut self) -> Result<()> {
        let n = self.backends_gen.get()?;
        self.backends_gen.set(n.wrapping_add(1))
    }
}

/// The events ring buffer `ferrox monitor` reads (`EVENTS_V1`).
pub struct Events {
    ring: aya::maps::RingBuf<MapData>,
}

impl Events {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let name = map_names::EVENTS;
        let (map, _) = open_map(layout, name)?;
        let ring =
            aya::maps::RingBuf::try_from(map).map_err(|e| DatapathError::map("typing", name, e))?;
        Ok(Self { ring })
    }

    /// The next event, if one is waiting (never blocks).
    pub fn next_event(&mut self) -> Option<ferrox_abi::MonitorEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<ferrox_abi::MonitorEvent>() {
            return None;
        }
        // SAFETY: the programs write whole `MonitorEvent`s; read unaligned, by copy.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
    }
}
