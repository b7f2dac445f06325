//! Giving a pinned map another capacity (or the flags of a newer version) without losing what it
//! holds or stopping traffic.
//!
//! The kernel cannot resize a map, and a program keeps the maps it was loaded with. So a map is
//! replaced the way an upgrade replaces a program, in steps each of which leaves a working node:
//!
//! 1. the new map is created and pinned under `maps/resize/<name>`, and the programs are loaded
//!    against it and pinned (every program is replaced: the code is the same, the maps are not);
//!    the hooks still run the previous programs with the previous map;
//! 2. everything the previous map holds is copied into the new one, then the two pins are
//!    exchanged in one `renameat2(RENAME_EXCHANGE)`: `maps/<name>` is the new map from then on
//!    (the agent and the CLI open it there), and the previous one waits under `maps/resize/`;
//! 3. the agent moves every hook to the new programs (the same `bpf_link_update` as an upgrade);
//! 4. [`merge_leftovers`] copies what the previous programs wrote in between (flows) into the
//!    current map, never over an entry the new programs wrote, and unpins the previous map.
//!
//! A pin under `maps/resize/` therefore always means "a map some hook may still use, whose flows
//! belong in the current map": an agent that dies anywhere in between merges and unpins it on
//! its next start and loads the programs again, so they run against the maps pinned under
//! `maps/` whatever step it died in. The maps only user space writes are not merged back (the
//! agent rewrites them from the API on every start, and the current map already holds a copy).
//!
//! A map is made smaller only when what it holds fits in half the smaller capacity; otherwise it
//! keeps its size and [`Plan::kept`] says so (shrinking a full flow table would drop flows).

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, HashOfMaps, Map, MapData, MapError, MapInfo},
};
use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, CtEntry, CtKey, EndpointInfo, EndpointKey, NodeInfo,
    PolicyCtKey, PolicyCtValue, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
    map_names,
};

use crate::{DatapathError, PinLayout, Result, Sizing};

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

/// The maps that can be given another capacity or other flags.
pub const RESIZABLE: [&str; 8] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::ENDPOINTS,
    map_names::NODES,
    map_names::CONNTRACK,
    map_names::SOCK_REVNAT,
    map_names::AFFINITY,
    map_names::POLICY_CT,
];

/// What one copy from a map into another did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapCopy {
    /// Entries copied.
    pub copied: usize,
    /// Entries the destination already held (copied by an earlier pass, or newer).
    pub present: usize,
    /// Entries that did not fit (the destination is full; an LRU map evicts instead).
    pub failed: usize,
}

/// One map given a new capacity or new flags on this start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resize {
    pub map: &'static str,
    pub from_entries: u32,
    pub to_entries: u32,
    pub from_flags: u32,
    pub to_flags: u32,
    /// What the first copy carried into the new map.
    pub copy: MapCopy,
}

/// A map left larger than asked, because what it holds would not fit in half the capacity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeptLarger {
    pub map: &'static str,
    pub capacity: u32,
    pub wanted: u32,
    pub entries: usize,
}

/// What to do with one resizable map.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Not pinned yet: created at the wanted capacity.
    Create(u32),
    /// Pinned and fine as it is, or too full to shrink (`refused`: the wanted capacity and the
    /// entries it holds).
    Keep {
        capacity: u32,
        refused: Option<(u32, usize)>,
    },
    /// Pinned with another capacity or other flags: rebuilt at `to`.
    Rebuild { from: u32, to: u32 },
}

/// `pinned`: capacity and flags of the pinned map; `count`: how many entries it holds (asked
/// only when it would shrink).
fn decide(
    pinned: Option<(u32, u32)>,
    wanted: u32,
    flags: u32,
    count: impl FnOnce() -> Result<usize>,
) -> Result<Decision> {
    let Some((capacity, pinned_flags)) = pinned else {
        return Ok(Decision::Create(wanted));
    };
    let mut target = wanted;
    let mut refused = None;
    if wanted < capacity {
        let entries = count()?;
        if entries > (wanted / 2) as usize {
            target = capacity;
            refused = Some((wanted, entries));
        }
    }
    Ok(if target == capacity && pinned_flags == flags {
        Decision::Keep { capacity, refused }
    } else {
        Decision::Rebuild {
            from: capacity,
            to: target,
        }
    })
}

/// The capacities to load the object with, and which maps are rebuilt.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Every resizable map and the capacity the object is loaded with.
    pub(crate) max_entries: Vec<(&'static str, u32)>,
    /// Maps rebuilt at a new capacity or with new flags (their copies are filled in by
    /// [`carry_over`]).
    pub(crate) resized: Vec<Resize>,
    pub(crate) kept: Vec<KeptLarger>,
}

pub(crate) fn staging_dir(layout: &PinLayout) -> PathBuf {
    layout.maps_dir().join("resize")
}

pub(crate) fn staging(layout: &PinLayout, name: &str) -> PathBuf {
    staging_dir(layout).join(name)
}

/// Decides, for every resizable map, the capacity it should have on this node: the one
/// `object` (the kernel object's bytes) declares for the maps user space writes, `sizing`'s for
/// the flow maps.
pub(crate) fn plan(layout: &PinLayout, sizing: &Sizing, object: &[u8]) -> Result<Plan> {
    let object = aya_obj::Object::parse(object).map_err(|e| DatapathError::Parse(Box::new(e)))?;
    let mut plan = Plan::default();
    for name in RESIZABLE {
        let declared = object
            .maps
            .get(name)
            .ok_or(DatapathError::MapMissing { name })?;
        let wanted = sizing.entries(name).unwrap_or(declared.max_entries());
        let flags = declared.map_flags();
        let pin = layout.map(name);
        let pinned = if pin.exists() {
            let info =
                MapInfo::from_pin(&pin).map_err(|e| DatapathError::map("inspecting", name, e))?;
            Some((info.max_entries(), info.map_flags()))
        } else {
            None
        };
        match decide(pinned, wanted, flags, || count(name, &pin))? {
            Decision::Create(n) => plan.max_entries.push((name, n)),
            Decision::Keep { capacity, refused } => {
                plan.max_entries.push((name, capacity));
                if let Some((wanted, entries)) = refused {
                    plan.kept.push(KeptLarger {
                        map: name,
                        capacity,
                        wanted,
                        entries,
                    });
                }
            }
            Decision::Rebuild { from, to } => {
                plan.max_entries.push((name, to));
                let (_, from_flags) = pinned.unwrap_or((from, flags));
                plan.resized.push(Resize {
                    map: name,
                    from_entries: from,
                    to_entries: to,
                    from_flags,
                    to_flags: flags,
                    copy: MapCopy::default(),
                });
            }
        }
    }
    Ok(plan)
}

fn open_hash<K: Pod, V: Pod>(path: &Path, name: &'static str) -> Result<HashMap<MapData, K, V>> {
    let data =
        MapData::from_pin(path).map_err(|e| DatapathError::map("opening pinned", name, e))?;
    let map = Map::from_map_data(data).map_err(|e| DatapathError::map("typing", name, e))?;
    HashMap::try_from(map).map_err(|e| DatapathError::map("typing", name, e))
}

fn entries_of<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>> {
    map.iter()
        .filter_map(|item| match item {
            Ok(kv) => Some(Ok(kv)),
            Err(MapError::KeyNotFound) => None,
            Err(e) => Some(Err(DatapathError::map("reading", name, e))),
        })
        .collect()
}

/// Copies every entry of the map pinned at `from` into the one pinned at `to`, never over an
/// entry `to` already holds. Entries removed meanwhile are skipped.
pub(crate) fn copy_typed<K: Pod, V: Pod>(
    name: &'static str,
    from: &Path,
    to: &Path,
) -> Result<MapCopy> {
    let old: HashMap<MapData, K, V> = open_hash(from, name)?;
    let mut new: HashMap<MapData, K, V> = open_hash(to, name)?;
    let mut report = MapCopy::default();
    for (k, v) in entries_of(&old, name)? {
        match new.insert(&k, &v, BPF_NOEXIST) {
            Ok(()) => report.copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                report.present += 1;
            }
            Err(e) => {
                tracing::warn!(map = name, error = %e, "carrying an entry into the resized map failed");
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

fn count_typed<K: Pod, V: Pod>(name: &'static str, pin: &Path) -> Result<usize> {
    let map: HashMap<MapData, K, V> = open_hash(pin, name)?;
    Ok(map.keys().filter(Result::is_ok).count())
}

/// Runs `$f::<K, V>` with the key and value types of the resizable map `$name`.
macro_rules! typed {
    ($name:expr, $f:ident ( $($arg:expr),* )) => {
        match $name {
            map_names::SERVICES => $f::<ServiceKey, ServiceValue>(map_names::SERVICES, $($arg),*),
            map_names::BACKENDS => $f::<u32, Backend>(map_names::BACKENDS, $($arg),*),
            map_names::ENDPOINTS => $f::<EndpointKey, EndpointInfo>(map_names::ENDPOINTS, $($arg),*),
            map_names::NODES => $f::<u32, NodeInfo>(map_names::NODES, $($arg),*),
            map_names::CONNTRACK => $f::<CtKey, CtEntry>(map_names::CONNTRACK, $($arg),*),
            map_names::SOCK_REVNAT => {
                $f::<SockRevNatKey, SockRevNatValue>(map_names::SOCK_REVNAT, $($arg),*)
            }
            map_names::AFFINITY => $f::<AffinityKey, AffinityValue>(map_names::AFFINITY, $($arg),*),
            map_names::POLICY_CT => {
                $f::<PolicyCtKey, PolicyCtValue>(map_names::POLICY_CT, $($arg),*)
            }
            other => Err(DatapathError::MapMissing {
                name: RESIZABLE.iter().find(|n| **n == other).copied().unwrap_or("unknown"),
            }),
        }
    };
}

fn count(name: &str, pin: &Path) -> Result<usize> {
    typed!(name, count_typed(pin))
}

fn copy(name: &str, from: &Path, to: &Path) -> Result<MapCopy> {
    typed!(name, copy_typed(from, to))
}

/// Swaps two pins in one step.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let ca = CString::new(a.as_os_str().as_bytes())
        .map_err(|_| DatapathError::io("renaming", a, std::io::ErrorKind::InvalidInput.into()))?;
    let cb = CString::new(b.as_os_str().as_bytes())
        .map_err(|_| DatapathError::io("renaming", b, std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: two NUL-terminated paths; renameat2 reads them only.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(DatapathError::io(
            "exchanging with",
            a,
            std::io::Error::last_os_error(),
        ))
    }
}

/// The hash of maps through which the programs reach the previous copy of the flow map `name`
/// while its resize finishes; none for a map the programs do not write.
fn previous_of(name: &str) -> Option<&'static str> {
    match name {
        map_names::CONNTRACK => Some(map_names::CONNTRACK_PREVIOUS),
        map_names::SOCK_REVNAT => Some(map_names::SOCK_REVNAT_PREVIOUS),
        map_names::AFFINITY => Some(map_names::AFFINITY_PREVIOUS),
        _ => None,
    }
}

/// The maps the kernel programs write: those with a previous copy the programs reach while a
/// resize finishes, and the policy flows (which the programs do not look up in a previous
/// copy: a flow the previous programs remembered between the copy and the move of the hooks
/// is judged again by its next packet until the merge at the end brings it over).
fn written_by_programs(name: &str) -> bool {
    previous_of(name).is_some() || name == map_names::POLICY_CT
}

fn previous_map(
    layout: &PinLayout,
    name: &'static str,
) -> Result<HashOfMaps<MapData, u32, MapData>> {
    let data = MapData::from_pin(layout.map(name))
        .map_err(|e| DatapathError::map("opening pinned", name, e))?;
    let map = Map::from_map_data(data).map_err(|e| DatapathError::map("typing", name, e))?;
    HashOfMaps::try_from(map).map_err(|e| DatapathError::map("typing", name, e))
}

/// Step 2, once the programs are pinned against the new maps: fills each new map from the
/// previous one and exchanges their pins. The previous flow maps are handed to the new
/// programs (`CT_PREV_V1`, `RNAT_PREV_V1`, `AFF_PREV_V1`) before any hook runs them: until the
/// resize ends they look entries up there too and write them in both maps, so that whichever
/// hook runs which programs, both directions of a flow see the same entries.
pub(crate) fn carry_over(layout: &PinLayout, resized: &mut [Resize]) -> Result<()> {
    for r in resized {
        let current = layout.map(r.map);
        let new = staging(layout, r.map);
        r.copy = copy(r.map, &current, &new)?;
        if let Some(outer) = previous_of(r.map) {
            let previous = MapData::from_pin(&current)
                .map_err(|e| DatapathError::map("opening pinned", r.map, e))?;
            previous_map(layout, outer)?
                .insert(&0, &previous, 0)
                .map_err(|e| DatapathError::map("writing", outer, e))?;
        }
        exchange(&new, &current)?;
    }
    Ok(())
}

/// What [`merge_leftovers`] did with one map found under `maps/resize/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    pub map: String,
    /// For flow maps: what was merged into the current map.
    pub merged: Option<MapCopy>,
}

/// Step 4 (and recovery from an interrupted resize): merges the flows of every map pinned under
/// `maps/resize/` into the current map of that name and unpins them all.
pub(crate) fn merge_leftovers(layout: &PinLayout) -> Result<Vec<Leftover>> {
    let dir = staging_dir(layout);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("listing", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatapathError::io("listing", &dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let current = layout.map(&name);
        // The maps the kernel programs write: what the previous copy gained is merged into the
        // current one.
        let merged = if written_by_programs(&name) && current.exists() {
            Some(copy(&name, &path, &current)?)
        } else {
            None
        };
        if let Some(outer) = previous_of(&name)
            && layout.map(outer).exists()
        {
            match previous_map(layout, outer)?.remove(&0) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(DatapathError::map("clearing", outer, e)),
            }
        }
        std::fs::remove_file(&path).map_err(|e| DatapathError::io("unpinning", &path, e))?;
        out.push(Leftover { map: name, merged });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREALLOC: u32 = 0;
    const NO_PREALLOC: u32 = 1;

    fn never() -> Result<usize> {
        panic!("entries counted although the map does not shrink")
    }

    #[test]
    fn a_map_is_rebuilt_to_grow_to_take_new_flags_or_to_shrink_when_its_entries_fit() {
        assert_eq!(
            decide(None, 1024, PREALLOC, never).unwrap(),
            Decision::Create(1024)
        );
        assert_eq!(
            decide(Some((1024, PREALLOC)), 1024, PREALLOC, never).unwrap(),
            Decision::Keep {
                capacity: 1024,
                refused: None
            }
        );
        assert_eq!(
            decide(Some((1024, PREALLOC)), 4096, PREALLOC, never).unwrap(),
            Decision::Rebuild {
                from: 1024,
                to: 4096
            }
        );
        // A version that stops preallocating a map: same capacity, new flags.
        assert_eq!(
            decide(Some((4096, PREALLOC)), 4096, NO_PREALLOC, never).unwrap(),
            Decision::Rebuild {
                from: 4096,
                to: 4096
            }
        );
        // Shrinking: only when the entries fit in half the smaller capacity.
        assert_eq!(
            decide(Some((4096, PREALLOC)), 1024, PREALLOC, || Ok(512)).unwrap(),
            Decision::Rebuild {
                from: 4096,
                to: 1024
            }
        );
        assert_eq!(
            decide(Some((4096, PREALLOC)), 1024, PREALLOC, || Ok(513)).unwrap(),
            Decision::Keep {
                capacity: 4096,
                refused: Some((1024, 513))
            }
        );
        // Too full to shrink, but the flags change: rebuilt at its present size.
        assert_eq!(
            decide(Some((4096, PREALLOC)), 1024, NO_PREALLOC, || Ok(3000)).unwrap(),
            Decision::Rebuild {
                from: 4096,
                to: 4096
            }
        );
    }
}
