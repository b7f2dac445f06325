//! Carrying flows across a change of map layout. A new layout is a new map (never a
//! reinterpretation of a pinned one); where the old map holds state live connections depend on
//! (conntrack), its entries are copied into the new map, so an upgrade drops no connection:
//! once when the new programs are loaded, before any hook runs them, and once more after every
//! hook was moved to them ([`crate::Datapath::finish_upgrade`]), which catches the flows the old
//! programs tracked in between. Then the old map is unpinned. An entry the new programs already
//! wrote is never overwritten. Both passes are idempotent: an agent that dies in between copies
//! again on its next start.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use ferrox_abi::{CtEntry, CtEntryV1, CtKey, map_names};

use crate::{DatapathError, PinLayout, Result};

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

/// What one pass over an old conntrack map did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackCopy {
    /// Entries copied into the current map.
    pub copied: usize,
    /// Entries the current map already held (copied by an earlier pass, or newer).
    pub present: usize,
    /// Entries that did not fit: the current map is full (its LRU evicts rather than refuses,
    /// so this stays 0 unless the kernel says otherwise).
    pub failed: usize,
}

fn open_hash<V: aya::Pod>(path: &Path, name: &'static str) -> Result<HashMap<MapData, CtKey, V>> {
    let data =
        MapData::from_pin(path).map_err(|e| DatapathError::map("opening pinned", name, e))?;
    let map = Map::from_map_data(data).map_err(|e| DatapathError::map("typing", name, e))?;
    HashMap::try_from(map).map_err(|e| DatapathError::map("typing", name, e))
}

/// Copies the flows of a pinned `CT_V1` into the current conntrack map. `None` when no
/// `CT_V1` is pinned (nothing to carry over).
pub(crate) fn conntrack_v1(layout: &PinLayout) -> Result<Option<ConntrackCopy>> {
    let old_pin = layout.map(map_names::CONNTRACK_V1);
    if !old_pin.exists() {
        return Ok(None);
    }
    let old: HashMap<MapData, CtKey, CtEntryV1> = open_hash(&old_pin, map_names::CONNTRACK_V1)?;
    let mut new: HashMap<MapData, CtKey, CtEntry> =
        open_hash(&layout.map(map_names::CONNTRACK), map_names::CONNTRACK)?;
    let mut report = ConntrackCopy::default();
    // Read first: writing while iterating the same kernel map is fine, but the old map is
    // only read here; keys removed meanwhile are skipped.
    let entries: Vec<(CtKey, CtEntryV1)> = old
        .iter()
        .filter_map(|item| match item {
            Ok(kv) => Some(Ok(kv)),
            Err(MapError::KeyNotFound) => None,
            Err(e) => Some(Err(DatapathError::map(
                "reading",
                map_names::CONNTRACK_V1,
                e,
            ))),
        })
        .collect::<Result<_>>()?;
    for (k, v) in entries {
        match new.insert(&k, &CtEntry::from(v), BPF_NOEXIST) {
            Ok(()) => report.copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                report.present += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "carrying a flow into the new conntrack map failed");
                report.failed += 1;
            }
        }
    }
    Ok(Some(report))
}

/// The last pass: copies what the old programs tracked since the first, then unpins `CT_V1`
/// (it is freed once no program holds it). `None` when no `CT_V1` is pinned.
pub(crate) fn finish_conntrack_v1(layout: &PinLayout) -> Result<Option<ConntrackCopy>> {
    let Some(report) = conntrack_v1(layout)? else {
        return Ok(None);
    };
    let pin = layout.map(map_names::CONNTRACK_V1);
    std::fs::remove_file(&pin).map_err(|e| DatapathError::io("unpinning", &pin, e))?;
    Ok(Some(report))
}
