//! The pinned Maglev tables (`MAGLEV_V1`): a hash of maps from an external frontend's
//! `rev_nat_id` to an array of [`MAGLEV_TABLE_SIZE`] backend ids, which the uplink's programs
//! index with `flow_hash % MAGLEV_TABLE_SIZE`.
//!
//! This module owns writing, replacing, reading and removing whole tables. A table is never
//! edited in place: [`MaglevTables::set`] fills a new standalone array and then swaps it into the
//! outer map with one update, so a packet sees the old table or the new one, never a mix. It
//! never decides what a table holds (the agent computes it) and never writes a table of another
//! length than the kernel's, which the kernel would refuse anyway.
//!
//! Each inner array is named after a digest of its contents ([`table_digest`], shown as
//! `mg<13 hex digits>` by `bpftool map show`). The name is fixed when the array is created,
//! before it becomes visible, so it always describes what the array holds; a restarted agent
//! learns what every table holds from one lookup per table ([`MaglevTables::digests`]) instead
//! of reading 16381 entries each.
//!
//! Identical tables are one array: the frontends of one Service port on this node (each node
//! address, LoadBalancer IP and externalIP) have the same backends, hence the same table, and
//! each array costs 64 KiB of kernel memory. [`MaglevTables::set`] finds an array holding the
//! table by its name (the digest) and puts that one under the new key; since no array is ever
//! written once it is in the outer map, sharing changes nothing a packet sees.
//! [`MaglevTables::usage`] counts frontends, arrays and their memory.

use std::collections::HashMap;

use aya::maps::{Array, HashOfMaps, Map, MapData, MapError};
use ferrox_abi::{MAGLEV_TABLE_SIZE, map_names};

use crate::{DatapathError, MapFull, PinLayout, Result, WriteError};

const NAME: &str = map_names::MAGLEV;

/// Prefix of an inner array's name; 13 hex digits of its digest follow (15 characters, the
/// kernel's limit).
const DIGEST_PREFIX: &str = "mg";

/// A 52-bit digest of a table's contents, the one [`MaglevTables::set`] names the table after.
///
/// FNV-1a (64-bit) over the ids' little-endian bytes, then MurmurHash3's 64-bit finalizer for
/// avalanche, keeping the top 52 bits. Both are fully specified, so the digest of a table is the
/// same in every process and version. It detects a table that differs from the expected one
/// (not an adversary): two different tables share a digest with probability about 2^-52.
pub fn table_digest(table: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in table {
        for byte in id.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h >> 12
}

fn digest_name(digest: u64) -> String {
    format!("{DIGEST_PREFIX}{:013x}", digest & ((1 << 52) - 1))
}

fn digest_of_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix(DIGEST_PREFIX)?;
    if hex.len() != 13 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn map_err(op: &'static str, e: MapError) -> DatapathError {
    DatapathError::map(op, NAME, e)
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// The pinned hash of Maglev tables.
pub struct MaglevTables {
    map: HashOfMaps<MapData, u32, MapData>,
    id: u32,
    capacity: u32,
    /// Digest -> kernel id of an array holding that table, built on the first [`Self::set`]
    /// (an id whose array is gone, or holds another table, is dropped when met).
    arrays: Option<HashMap<u64, u32>>,
}

/// What the Maglev tables hold and cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MaglevUsage {
    /// External frontends with a table.
    pub frontends: usize,
    /// Distinct arrays behind them (identical tables are shared).
    pub tables: usize,
    /// Kernel memory of those arrays (bytes).
    pub bytes: u64,
}

impl MaglevTables {
    /// Opens the pinned `MAGLEV_V1` of `layout`. Fails with a clear error when it is not pinned
    /// (the datapath was never loaded there) or is not a hash of maps keyed by `u32`.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let path = layout.map(NAME);
        let data = MapData::from_pin(&path).map_err(|e| map_err("opening pinned", e))?;
        let info = data.info().map_err(|e| map_err("inspecting", e))?;
        let map = Map::from_map_data(data).map_err(|e| map_err("typing", e))?;
        let layout_error = |found: String| DatapathError::MapLayout {
            name: NAME,
            path: path.clone(),
            expected: "hash of maps, u32 key".into(),
            found,
        };
        let map = HashOfMaps::try_from(map).map_err(|e| match e {
            MapError::InvalidMapType { map_type } => layout_error(format!("map type {map_type}")),
            MapError::InvalidKeySize { size, .. } | MapError::InvalidValueSize { size, .. } => {
                layout_error(format!("{size}-byte keys or values"))
            }
            e => map_err("typing", e),
        })?;
        Ok(Self {
            map,
            id: info.id(),
            capacity: info.max_entries(),
            arrays: None,
        })
    }

    /// The kernel's id of the outer map (stable while it stays pinned).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// How many tables the outer map can hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Makes `table` the Maglev table of `rev_nat_id`, replacing any previous one in a single
    /// update. `table` must have exactly [`MAGLEV_TABLE_SIZE`] entries.
    pub fn set(&mut self, rev_nat_id: u16, table: &[u32]) -> Result<(), WriteError> {
        if table.len() != MAGLEV_TABLE_SIZE as usize {
            return Err(map_err(
                "refusing a table of the wrong length (sizes in bytes) for",
                MapError::InvalidValueSize {
                    size: size_of_val(table),
                    expected: MAGLEV_TABLE_SIZE as usize * size_of::<u32>(),
                },
            )
            .into());
        }
        let digest = table_digest(table);
        if let Some(shared) = self.array_holding(digest)? {
            return self.insert(rev_nat_id, &shared);
        }
        let obj = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            size_of::<u32>() as u32,
            size_of::<u32>() as u32,
            MAGLEV_TABLE_SIZE,
            0,
        );
        let data = MapData::create(obj, &digest_name(digest), None)
            .map_err(|e| map_err("creating a new table for", e))?;
        let array_id = data
            .info()
            .map_err(|e| map_err("inspecting a new table for", e))?
            .id();
        let mut inner =
            Map::from_map_data(data).map_err(|e| map_err("typing a new table for", e))?;
        {
            let mut array = Array::<&mut MapData, u32>::try_from(&mut inner)
                .map_err(|e| map_err("typing a new table for", e))?;
            for (index, id) in (0u32..).zip(table) {
                array
                    .set(index, id, 0)
                    .map_err(|e| map_err("filling a new table for", e))?;
            }
        }
        let Map::Array(inner) = &inner else {
            // `from_map_data` types an array as `Map::Array`; anything else is an aya bug.
            return Err(map_err(
                "typing a new table for",
                MapError::InvalidMapType {
                    map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_UNSPEC as u32,
                },
            )
            .into());
        };
        self.insert(rev_nat_id, inner)?;
        if let Some(arrays) = &mut self.arrays {
            arrays.insert(digest, array_id);
        }
        Ok(())
    }

    fn insert(&mut self, rev_nat_id: u16, inner: &MapData) -> Result<(), WriteError> {
        match self.map.insert(&u32::from(rev_nat_id), inner, 0) {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::E2BIG) => Err(MapFull {
                name: NAME,
                capacity: self.capacity,
            }
            .into()),
            Err(e) => Err(map_err("inserting a table into", e).into()),
        }
    }

    /// An array already holding the table of `digest`, opened, if one is in the outer map.
    fn array_holding(&mut self, digest: u64) -> Result<Option<MapData>> {
        if self.arrays.is_none() {
            let mut arrays = HashMap::new();
            for id in self.ids()? {
                if let Some(data) = self.inner(id)?
                    && let Ok(info) = data.info()
                    && let Some(d) = info.name_as_str().and_then(digest_of_name)
                {
                    arrays.insert(d, info.id());
                }
            }
            self.arrays = Some(arrays);
        }
        let Some(arrays) = &mut self.arrays else {
            return Ok(None);
        };
        let Some(&array_id) = arrays.get(&digest) else {
            return Ok(None);
        };
        // The array may be gone (every frontend using it was removed or replaced), or the id
        // taken by another map since.
        let opened = MapData::from_id(array_id).ok().filter(|data| {
            data.info().ok().is_some_and(|i| {
                i.name_as_str().and_then(digest_of_name) == Some(digest)
                    && i.max_entries() == MAGLEV_TABLE_SIZE
                    && i.value_size() == size_of::<u32>() as u32
            })
        });
        if opened.is_none() {
            arrays.remove(&digest);
        }
        Ok(opened)
    }

    /// Frontends with a table, the distinct arrays behind them and their kernel memory.
    pub fn usage(&self) -> Result<MaglevUsage> {
        use std::os::fd::AsFd as _;
        let mut usage = MaglevUsage::default();
        let mut seen = std::collections::HashSet::new();
        for id in self.ids()? {
            let Some(data) = self.inner(id)? else {
                continue;
            };
            usage.frontends += 1;
            let info = data
                .info()
                .map_err(|e| map_err("inspecting a table of", e))?;
            if seen.insert(info.id()) {
                usage.tables += 1;
                usage.bytes += crate::inventory::memlock(data.fd().as_fd()).unwrap_or(0);
            }
        }
        Ok(usage)
    }

    /// Removes the table of `rev_nat_id`; false when it had none.
    pub fn remove(&mut self, rev_nat_id: u16) -> Result<bool> {
        match self.map.remove(&u32::from(rev_nat_id)) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(e) => Err(map_err("deleting from", e)),
        }
    }

    /// The inner array of `rev_nat_id`, opened by the id the outer map holds. A table replaced
    /// between the lookup and the open is looked up again.
    fn inner(&self, rev_nat_id: u16) -> Result<Option<MapData>> {
        let key = u32::from(rev_nat_id);
        let mut attempts = 0;
        loop {
            match self.map.get(&key, 0) {
                Ok(data) => return Ok(Some(data)),
                Err(MapError::KeyNotFound) => return Ok(None),
                Err(e) if is_errno(&e, libc::ENOENT) && attempts < 3 => attempts += 1,
                Err(e) => return Err(map_err("reading a table of", e)),
            }
        }
    }

    /// The table of `rev_nat_id`, when it has one.
    pub fn get(&self, rev_nat_id: u16) -> Result<Option<Vec<u32>>> {
        let Some(data) = self.inner(rev_nat_id)? else {
            return Ok(None);
        };
        let map = Map::from_map_data(data).map_err(|e| map_err("typing a table of", e))?;
        let array =
            Array::<MapData, u32>::try_from(map).map_err(|e| map_err("typing a table of", e))?;
        if array.len() != MAGLEV_TABLE_SIZE {
            return Err(DatapathError::MapLayout {
                name: NAME,
                path: format!("{NAME}[{rev_nat_id}]").into(),
                expected: format!("{MAGLEV_TABLE_SIZE} entries"),
                found: format!("{} entries", array.len()),
            });
        }
        array
            .iter()
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
            .map_err(|e| map_err("reading a table of", e))
    }

    /// The rev_nat_ids that have a table, in ascending order. Keys that are no rev_nat_id
    /// (above `u16::MAX`; only a foreign writer could add them) are left out.
    pub fn ids(&self) -> Result<Vec<u16>> {
        let mut ids = Vec::new();
        for key in self.map.keys() {
            match key {
                Ok(k) => match u16::try_from(k) {
                    Ok(id) => ids.push(id),
                    Err(_) => tracing::warn!(map = NAME, key = k, "ignoring a key above u16::MAX"),
                },
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err("iterating", e)),
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// The digest of the table of `rev_nat_id` ([`table_digest`] of its contents), from the
    /// table's name: `Some(None)` when the table has a name [`Self::set`] does not give.
    pub fn digest(&self, rev_nat_id: u16) -> Result<Option<Option<u64>>> {
        let Some(data) = self.inner(rev_nat_id)? else {
            return Ok(None);
        };
        let info = data
            .info()
            .map_err(|e| map_err("inspecting a table of", e))?;
        Ok(Some(info.name_as_str().and_then(digest_of_name)))
    }

    /// Every table's rev_nat_id and digest (see [`Self::digest`]), in ascending order. Tables
    /// removed while listing are left out.
    pub fn digests(&self) -> Result<Vec<(u16, Option<u64>)>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if let Some(digest) = self.digest(id)? {
                out.push((id, digest));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_round_trips_through_a_map_name() {
        for table in [
            vec![],
            vec![0u32; MAGLEV_TABLE_SIZE as usize],
            (0..MAGLEV_TABLE_SIZE).map(|i| i % 7 + 1).collect(),
        ] {
            let d = table_digest(&table);
            assert!(d < 1 << 52);
            let name = digest_name(d);
            assert!(name.len() <= 15, "{name}");
            assert_eq!(digest_of_name(&name), Some(d));
        }
        assert_eq!(digest_of_name("standalone_arra"), None);
        assert_eq!(digest_of_name("mg12345"), None);
        assert_eq!(digest_of_name("mgzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn the_digest_is_fixed_and_sees_every_entry() {
        // Golden value: a change here makes a restarted agent rewrite every table once.
        let table: Vec<u32> = (0..MAGLEV_TABLE_SIZE).map(|i| i % 3 + 1).collect();
        assert_eq!(table_digest(&table), 0x8_fe9e_b9d1_bd24);
        let base = table_digest(&table);
        for i in [0, 1, 8191, MAGLEV_TABLE_SIZE as usize - 1] {
            let mut t = table.clone();
            t[i] = 9;
            assert_ne!(table_digest(&t), base, "entry {i}");
        }
        // Two entries swapped.
        let mut t = table.clone();
        t.swap(10, 11);
        assert_ne!(table_digest(&t), base);
    }
}
