//! Writes the desired service table into the maps with the fewest changes, make-before-break.
//!
//! The reconciler keeps a mirror of what the maps hold (loaded from the pinned maps on start, so
//! a restarted agent converges without flushing anything). For each entry (a frontend in one
//! scope) it writes, in order: the backends it needs, its backend slots, then its master entry
//! (whose `count` makes the slots visible), then removes slots beyond the new count. A reader
//! therefore never sees a count that covers a missing slot or a slot naming a missing backend,
//! and a Service being updated never shows zero backends. When a write fails (a full map), that
//! entry keeps its previous, consistent state and the failure is reported; the next sync
//! retries. Session-affinity entries that name a backend their frontend no longer has are
//! removed, so a client is never pinned to a backend that left.
//!
//! Every external entry with backends also gets a Maglev table, keyed by its `rev_nat_id`: the
//! table [`super::maglev`] computes from its backends' identities, translated to this node's
//! backend ids. It is written after the backends it names and before the master entry, and only
//! when the entry's backend set changed; it is removed once no external master with backends
//! uses it, and a backend is deleted only when no slot and no table names it. A restarted
//! reconciler learns each table's digest from the maps and rewrites only tables that differ from
//! what it computes.
//!
//! An external entry with loadBalancerSourceRanges gets its allowed prefixes written before the
//! master that turns the check on, and loses prefixes only after its master stopped listing them.
//! When a backend leaves an external UDP entry, the conntrack entries of its flows are removed,
//! so the next datagram of such a flow picks a live backend instead of vanishing; TCP flows keep
//! theirs (a terminating backend finishes its connections).
//!
//! [`Reconciler::sync`] looks at every entry (on start, after a relist);
//! [`Reconciler::sync_changed`] at the entries of the Services that changed only, with indexes
//! that keep its cost independent of the table's size.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferrox_abi::{Backend, ServiceValue, svc_flags};
use ferrox_datapath::{DatapathError, SourceRange, WriteError};

mod encode;
mod maps;
mod report;
#[cfg(test)]
mod tests;

pub use encode::{addr_be, addr_from_be, entry_of, flags_of, master_key};
pub use maps::{NodeMaps, ServiceMaps};
pub use report::{Failure, SyncReport};

use encode::backend_value;
use report::failure;

use super::{
    maglev,
    model::{BackendAddr, Desired, Frontend, FrontendKey, FrontendSpec, Proto, Scope},
};

/// One entry as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MirrorEntry {
    master: Option<ServiceValue>,
    /// slot -> backend id
    slots: BTreeMap<u16, u32>,
}

/// A backend's identity as the backends map encodes it: address, port (network order), protocol.
type Identity = (u32, u16, u8);

/// One Maglev table as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MirrorTable {
    /// Digest of its contents ([`ferrox_datapath::table_digest`]); `None` when unknown.
    digest: Option<u64>,
    /// The backends (identity and id, sorted) it was computed from, once this reconciler wrote
    /// or verified it: the table names exactly these ids. `None` right after a restart.
    source: Option<Vec<(Identity, u32)>>,
}

/// How many slots and known Maglev tables name each backend, and which backends may have
/// become unused since the last sweep.
#[derive(Debug, Default)]
struct Refs {
    counts: HashMap<u32, usize>,
    candidates: BTreeSet<u32>,
}

impl Refs {
    fn add(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
    }

    fn drop(&mut self, id: u32) {
        if let Some(n) = self.counts.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&id);
                self.candidates.insert(id);
            }
        }
    }
}

/// What one rev_nat_id's entries reach, before and after a sync: the releases that follow a
/// backend's departure are computed from the difference.
#[derive(Debug, Default)]
struct Live {
    /// Backends its affinity-enabled entries reach.
    affinity: BTreeSet<u32>,
    /// Backends its external UDP entry reaches (conntrack holds their flows).
    udp_external: BTreeSet<u32>,
    /// Backends its internal UDP entry reaches (connected sockets may name them).
    udp_internal: BTreeSet<u32>,
}

/// The reconciler and its mirror of the maps.
///
/// Besides the mirror it keeps indexes (backend identity -> id, frontend -> rev_nat_id,
/// references per backend), so that a sync of a few changed entries costs what those entries
/// cost, whatever the size of the table.
#[derive(Debug, Default)]
pub struct Reconciler {
    entries: BTreeMap<FrontendKey, MirrorEntry>,
    backends: BTreeMap<u32, Backend>,
    /// rev_nat_id -> its Maglev table.
    tables: BTreeMap<u16, MirrorTable>,
    /// The allowed source prefixes of external entries.
    ranges: BTreeSet<SourceRange>,
    /// Backend identity -> its id.
    ids: HashMap<Identity, u32>,
    /// The next backend id to hand out. Ids are not reused soon, so that nothing that still
    /// names a departed backend (an affinity entry being released) names another one.
    next_id: u32,
    /// Frontend -> the rev_nat_id its masters carry (all its scopes share one).
    rev_ids: HashMap<Frontend, u16>,
    used_rev_ids: BTreeSet<u16>,
    next_rev_id: u16,
    refs: Refs,
    /// Maglev tables found after a restart whose contents are not known yet: they may name any
    /// backend, so no backend is deleted while there are some.
    unknown_tables: usize,
    /// Entries with a master.
    masters: usize,
}

impl Reconciler {
    /// Builds the mirror from what the maps hold now (entries it cannot decode are ignored).
    /// Maglev tables are known by their digests until the first sync verifies them.
    pub fn load(maps: &impl ServiceMaps) -> Result<Self, DatapathError> {
        let (services, backends) = maps.read_all()?;
        let mut r = Self::default();
        for (id, b) in backends {
            r.ids.insert((b.addr, b.port, b.proto), id);
            r.backends.insert(id, b);
            // Unused ones (left by a crash) go at the end of the first sync.
            r.refs.candidates.insert(id);
        }
        r.next_id = r
            .backends
            .keys()
            .next_back()
            .map_or(1, |m| m.saturating_add(1));
        for (id, digest) in maps.maglev_digests()? {
            r.tables.insert(
                id,
                MirrorTable {
                    digest,
                    source: None,
                },
            );
            r.unknown_tables += 1;
        }
        r.ranges = maps.source_ranges()?.into_iter().collect();
        for (key, value) in services {
            let Some(entry) = entry_of(&key) else {
                continue;
            };
            let e = r.entries.entry(entry).or_default();
            if key.slot == 0 {
                e.master = Some(value);
                r.masters += 1;
                r.rev_ids.insert(entry.frontend, value.rev_nat_id);
                r.used_rev_ids.insert(value.rev_nat_id);
            } else if let Some(old) = e.slots.insert(key.slot, value.backend_id) {
                r.refs.drop(old);
                r.refs.add(value.backend_id);
            } else {
                r.refs.add(value.backend_id);
            }
        }
        r.next_rev_id = r
            .used_rev_ids
            .last()
            .map_or(1, |m| m.checked_add(1).unwrap_or(1));
        Ok(r)
    }

    /// Number of entries and backends currently programmed.
    pub fn size(&self) -> (usize, usize) {
        (self.masters, self.backends.len())
    }

    /// The reverse-translation id of `fe`: the one its scopes share, or a free one.
    fn rev_nat_id(&mut self, fe: &Frontend) -> Option<u16> {
        if let Some(id) = self.rev_ids.get(fe) {
            return Some(*id);
        }
        let start = self.next_rev_id.max(1);
        let id = (start..=u16::MAX)
            .chain(1..start)
            .find(|id| !self.used_rev_ids.contains(id))?;
        self.next_rev_id = id.checked_add(1).unwrap_or(1);
        Some(id)
    }

    fn has_master(&self, fe: &Frontend) -> bool {
        [Scope::Internal, Scope::External].into_iter().any(|scope| {
            self.entries
                .get(&FrontendKey {
                    frontend: *fe,
                    scope,
                })
                .is_some_and(|e| e.master.is_some())
        })
    }

    /// Makes the maps hold `desired`, every entry of it (a full sync). Also removes Maglev
    /// tables and source ranges no entry uses (left by a crash or another version).
    pub fn sync(&mut self, desired: &Desired, maps: &mut impl ServiceMaps) -> SyncReport {
        let keys: BTreeSet<FrontendKey> = desired
            .frontends
            .keys()
            .chain(self.entries.keys())
            .copied()
            .collect();
        let mut report = SyncReport::default();
        self.sync_keys(desired, &keys, maps, &mut report);
        self.sweep(maps, &mut report);
        self.finish(maps, report)
    }

    /// Makes the maps hold `desired` for the entries `keys` only (those of the Services that
    /// changed); every other entry stays as it is. The cost follows the size of `keys`.
    pub fn sync_changed(
        &mut self,
        desired: &Desired,
        keys: &BTreeSet<FrontendKey>,
        maps: &mut impl ServiceMaps,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        self.sync_keys(desired, keys, maps, &mut report);
        self.finish(maps, report)
    }

    fn sync_keys(
        &mut self,
        desired: &Desired,
        keys: &BTreeSet<FrontendKey>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        let frontends: BTreeSet<Frontend> = keys.iter().map(|k| k.frontend).collect();
        let before = self.live_of(&frontends);
        // Entries that stay or come first, then entries that go.
        for key in keys {
            if let Some(spec) = desired.frontends.get(key)
                && let Err(e) = self.sync_entry(key, spec, maps, report)
            {
                report.failures.push(e);
            }
        }
        for key in keys {
            if !desired.frontends.contains_key(key) {
                self.remove_entry(key, maps, report);
            }
        }
        let after = self.live_of(&frontends);
        self.release_lost(&before, &after, maps, report);
    }

    /// Deletes backends nothing names any more, and fills in the report's totals.
    fn finish(&mut self, maps: &mut impl ServiceMaps, mut report: SyncReport) -> SyncReport {
        if self.unknown_tables == 0 {
            let candidates = std::mem::take(&mut self.refs.candidates);
            for id in candidates {
                if self.refs.counts.contains_key(&id) {
                    continue;
                }
                let Some(b) = self.backends.get(&id).copied() else {
                    continue;
                };
                match maps.delete_backend(id) {
                    Ok(()) => {
                        self.backends.remove(&id);
                        let identity = (b.addr, b.port, b.proto);
                        if self.ids.get(&identity) == Some(&id) {
                            self.ids.remove(&identity);
                        }
                        report.deletes += 1;
                    }
                    Err(e) => {
                        self.refs.candidates.insert(id);
                        report.failures.push(Failure {
                            frontend: format!("backend {id}"),
                            error: e.to_string(),
                            map_full: false,
                        });
                    }
                }
            }
        }
        (report.frontends, report.backends) = self.size();
        report.maglev_tables = self.tables.len();
        report.source_ranges = self.ranges.len();
        report
    }

    /// Per rev_nat_id of `frontends`, what its entries reach now.
    fn live_of(&self, frontends: &BTreeSet<Frontend>) -> BTreeMap<u16, Live> {
        let mut out: BTreeMap<u16, Live> = BTreeMap::new();
        for fe in frontends {
            for scope in [Scope::Internal, Scope::External] {
                let key = FrontendKey {
                    frontend: *fe,
                    scope,
                };
                let Some(e) = self.entries.get(&key) else {
                    continue;
                };
                let Some(m) = e.master else { continue };
                let live = (1..=m.count).filter_map(|s| e.slots.get(&s).copied());
                let l = out.entry(m.rev_nat_id).or_default();
                if m.flags & svc_flags::AFFINITY != 0 {
                    l.affinity.extend(live.clone());
                }
                match (scope, fe.proto) {
                    (Scope::External, Proto::Udp) => l.udp_external.extend(live),
                    (Scope::Internal, Proto::Udp) => l.udp_internal.extend(live),
                    _ => {}
                }
            }
        }
        out
    }

    /// After a backend left a frontend: releases the clients pinned to it by session affinity,
    /// and removes the conntrack entries of UDP flows to it, so that their next datagram picks
    /// a live backend instead of vanishing (TCP connections keep their backend: a terminating
    /// backend finishes its connections).
    fn release_lost(
        &mut self,
        before: &BTreeMap<u16, Live>,
        after: &BTreeMap<u16, Live>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        let none = Live::default();
        let mut affinity_lost = BTreeSet::new();
        let mut flows_lost = BTreeSet::new();
        let mut sockets_lost = BTreeSet::new();
        for (rev, b) in before {
            let a = after.get(rev).unwrap_or(&none);
            if !b.affinity.is_subset(&a.affinity) {
                affinity_lost.insert(*rev);
            }
            flows_lost.extend(
                b.udp_external
                    .difference(&a.udp_external)
                    .map(|id| (*rev, *id)),
            );
            // Still in the mirror: backends are deleted at the end of the sync.
            sockets_lost.extend(
                b.udp_internal
                    .difference(&a.udp_internal)
                    .filter_map(|id| self.backends.get(id))
                    .map(|be| (*rev, be.addr, be.port)),
            );
        }
        if !sockets_lost.is_empty() {
            match maps.close_udp_sockets(&sockets_lost) {
                Ok(n) => report.sockets_closed += n,
                Err(e) => report.failures.push(Failure {
                    frontend: "connected UDP sockets".into(),
                    error: format!("{e:#}"),
                    map_full: false,
                }),
            }
        }
        if !affinity_lost.is_empty() {
            match maps.affinity_entries() {
                Ok(entries) => {
                    for (k, v) in entries {
                        let release = affinity_lost.contains(&k.rev_nat_id)
                            && !after
                                .get(&k.rev_nat_id)
                                .is_some_and(|a| a.affinity.contains(&v.backend_id));
                        if release {
                            match maps.delete_affinity(&k) {
                                Ok(()) => report.affinity_removed += 1,
                                Err(e) => report.failures.push(Failure {
                                    frontend: format!("affinity of frontend {}", k.rev_nat_id),
                                    error: e.to_string(),
                                    map_full: false,
                                }),
                            }
                        }
                    }
                }
                Err(e) => report.failures.push(Failure {
                    frontend: "affinity map".into(),
                    error: e.to_string(),
                    map_full: false,
                }),
            }
        }
        if !flows_lost.is_empty() {
            match maps.purge_udp_flows(&flows_lost) {
                Ok(n) => report.flows_purged += n,
                Err(e) => report.failures.push(Failure {
                    frontend: "conntrack map".into(),
                    error: e.to_string(),
                    map_full: false,
                }),
            }
        }
    }

    /// Removes the Maglev tables of external entries without backends and the source ranges of
    /// external entries without the source-range flag: what a crash or an older version may
    /// have left. Per-entry changes already keep both right.
    fn sweep(&mut self, maps: &mut impl ServiceMaps, report: &mut SyncReport) {
        let mut with_backends = BTreeSet::new();
        let mut with_ranges = BTreeSet::new();
        for (k, e) in &self.entries {
            if k.scope != Scope::External {
                continue;
            }
            if let Some(m) = e.master {
                if m.count > 0 {
                    with_backends.insert(m.rev_nat_id);
                }
                if m.flags & svc_flags::SOURCE_RANGES != 0 {
                    with_ranges.insert(m.rev_nat_id);
                }
            }
        }
        let tables: Vec<u16> = self
            .tables
            .keys()
            .filter(|id| !with_backends.contains(id))
            .copied()
            .collect();
        for id in tables {
            self.remove_table(id, maps, report);
        }
        let ranges: Vec<SourceRange> = self
            .ranges
            .iter()
            .filter(|r| !with_ranges.contains(&r.rev_nat_id))
            .copied()
            .collect();
        for r in ranges {
            self.remove_range(r, maps, report);
        }
    }

    fn remove_table(&mut self, id: u16, maps: &mut impl ServiceMaps, report: &mut SyncReport) {
        match maps.delete_maglev(id) {
            Ok(()) => {
                match self.tables.remove(&id) {
                    Some(MirrorTable {
                        source: Some(source),
                        ..
                    }) => {
                        for (_, b) in source {
                            self.refs.drop(b);
                        }
                    }
                    Some(MirrorTable { source: None, .. }) => self.unknown_tables -= 1,
                    None => {}
                }
                report.deletes += 1;
            }
            Err(e) => report.failures.push(Failure {
                frontend: format!("Maglev table {id}"),
                error: e.to_string(),
                map_full: false,
            }),
        }
    }

    fn remove_range(
        &mut self,
        r: SourceRange,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        match maps.delete_source_range(&r) {
            Ok(()) => {
                self.ranges.remove(&r);
                report.deletes += 1;
            }
            Err(e) => report.failures.push(Failure {
                frontend: format!("source range {} of frontend {}", r.prefix, r.rev_nat_id),
                error: e.to_string(),
                map_full: false,
            }),
        }
    }

    /// Removes an entry that is no longer wanted: master first (the entry disappears at once),
    /// then its slots, then (external entries) its Maglev table and source ranges.
    fn remove_entry(
        &mut self,
        key: &FrontendKey,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        let mkey = master_key(key);
        let Some(mirror) = self.entries.get_mut(key) else {
            return;
        };
        let rev = mirror
            .master
            .map(|m| m.rev_nat_id)
            .or_else(|| self.rev_ids.get(&key.frontend).copied());
        if mirror.master.is_some() {
            if let Err(e) = maps.delete_service(&mkey) {
                report.failures.push(failure(key, &WriteError::Other(e)));
                return;
            }
            mirror.master = None;
            self.masters -= 1;
            report.deletes += 1;
        }
        let slots: Vec<u16> = mirror.slots.keys().copied().collect();
        for slot in slots {
            match maps.delete_service(&mkey.with_slot(slot)) {
                Ok(()) => {
                    if let Some(id) = mirror.slots.remove(&slot) {
                        self.refs.drop(id);
                    }
                    report.deletes += 1;
                }
                Err(e) => report.failures.push(failure(key, &WriteError::Other(e))),
            }
        }
        if mirror.slots.is_empty() {
            self.entries.remove(key);
        }
        if key.scope == Scope::External
            && let Some(rev) = rev
        {
            if self.tables.contains_key(&rev) {
                self.remove_table(rev, maps, report);
            }
            let ranges: Vec<SourceRange> = self
                .ranges
                .iter()
                .filter(|r| r.rev_nat_id == rev)
                .copied()
                .collect();
            for r in ranges {
                self.remove_range(r, maps, report);
            }
        }
        if !self.has_master(&key.frontend)
            && let Some(id) = self.rev_ids.remove(&key.frontend)
        {
            self.used_rev_ids.remove(&id);
        }
    }

    fn sync_entry(
        &mut self,
        key: &FrontendKey,
        spec: &FrontendSpec,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), Failure> {
        // 1. Backends.
        let mut slot_ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let value = backend_value(b);
            let identity = (value.addr, value.port, value.proto);
            let id = match self.ids.get(&identity) {
                Some(id) => *id,
                None => {
                    let id = self.next_id.max(1);
                    self.next_id = id.wrapping_add(1);
                    self.ids.insert(identity, id);
                    id
                }
            };
            if self.backends.get(&id) != Some(&value) {
                maps.write_backend(id, &value)
                    .map_err(|e| failure(key, &e))?;
                self.backends.insert(id, value);
                // Collected at the end of the sync if no entry ends up naming it.
                self.refs.candidates.insert(id);
                report.writes += 1;
            }
            slot_ids.push(id);
        }
        let count = u16::try_from(slot_ids.len()).map_err(|_| Failure {
            frontend: key.to_string(),
            error: format!(
                "{} backends exceed the datapath's limit of {}",
                slot_ids.len(),
                u16::MAX
            ),
            map_full: false,
        })?;

        // 2. Slots.
        let mkey = master_key(key);
        let rev_nat_id = self.rev_nat_id(&key.frontend).ok_or_else(|| Failure {
            frontend: key.to_string(),
            error: "no free reverse-translation id (65535 frontends)".into(),
            map_full: true,
        })?;
        let mirror = self.entries.entry(*key).or_default();
        for (i, id) in slot_ids.iter().enumerate() {
            let slot = i as u16 + 1;
            if mirror.slots.get(&slot) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                };
                maps.write_service(&mkey.with_slot(slot), &value)
                    .map_err(|e| failure(key, &e))?;
                self.refs.add(*id);
                if let Some(old) = mirror.slots.insert(slot, *id) {
                    self.refs.drop(old);
                }
                report.writes += 1;
            }
        }

        // 3. Maglev table: before the master, so an external entry is never visible with
        //    backends but without their table.
        if key.scope == Scope::External && !slot_ids.is_empty() {
            self.sync_table(key, rev_nat_id, &spec.backends, &slot_ids, maps, report)?;
        }

        // 4. Source ranges: before the master that checks them, so an allowed client is never
        //    refused while they are being written.
        let ranges: BTreeSet<SourceRange> = if key.scope == Scope::External {
            spec.source_ranges
                .iter()
                .map(|p| SourceRange {
                    rev_nat_id,
                    prefix: p.trunc(),
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        for r in &ranges {
            if !self.ranges.contains(r) {
                maps.write_source_range(r).map_err(|e| failure(key, &e))?;
                self.ranges.insert(*r);
                report.writes += 1;
            }
        }

        // 5. Master: makes exactly `count` slots visible.
        let master = ServiceValue {
            count,
            rev_nat_id,
            flags: flags_of(spec),
            affinity_timeout: spec.affinity_timeout.unwrap_or(0),
            ..ServiceValue::default()
        };
        let mirror = self.entries.entry(*key).or_default();
        if mirror.master != Some(master) {
            maps.write_service(&mkey, &master)
                .map_err(|e| failure(key, &e))?;
            if mirror.master.replace(master).is_none() {
                self.masters += 1;
            }
            report.writes += 1;
        }
        self.rev_ids.insert(key.frontend, rev_nat_id);
        self.used_rev_ids.insert(rev_nat_id);

        // 6. Slots beyond the new count.
        let extra: Vec<u16> = mirror
            .slots
            .keys()
            .filter(|s| **s > count)
            .copied()
            .collect();
        for slot in extra {
            maps.delete_service(&mkey.with_slot(slot))
                .map_err(|e| failure(key, &WriteError::Other(e)))?;
            if let Some(id) = mirror.slots.remove(&slot) {
                self.refs.drop(id);
            }
            report.deletes += 1;
        }

        // 7. What the master no longer uses: its Maglev table once it has no backends, the
        //    source ranges it no longer lists.
        if key.scope == Scope::External {
            if count == 0 && self.tables.contains_key(&rev_nat_id) {
                self.remove_table(rev_nat_id, maps, report);
            }
            let stale: Vec<SourceRange> = self
                .ranges
                .iter()
                .filter(|r| r.rev_nat_id == rev_nat_id && !ranges.contains(r))
                .copied()
                .collect();
            for r in stale {
                self.remove_range(r, maps, report);
            }
        }
        Ok(())
    }

    /// Makes the Maglev table of `rev_nat_id` the one `backends` (with this node's ids `ids`,
    /// in the same order) give, writing it only when it differs from what the maps hold.
    fn sync_table(
        &mut self,
        key: &FrontendKey,
        rev_nat_id: u16,
        backends: &[BackendAddr],
        ids: &[u32],
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), Failure> {
        let mut source: Vec<(Identity, u32)> = backends
            .iter()
            .zip(ids)
            .map(|(b, id)| {
                let v = backend_value(b);
                ((v.addr, v.port, v.proto), *id)
            })
            .collect();
        source.sort_unstable();
        source.dedup();
        let current = self.tables.get(&rev_nat_id);
        if current.and_then(|t| t.source.as_ref()) == Some(&source) {
            return Ok(());
        }
        let table: Vec<u32> = maglev::table(backends)
            .into_iter()
            .filter_map(|i| ids.get(i).copied())
            .collect();
        let digest = ferrox_datapath::table_digest(&table);
        if current.is_none_or(|t| t.digest != Some(digest)) {
            maps.write_maglev(rev_nat_id, &table)
                .map_err(|e| failure(key, &e))?;
            report.writes += 1;
        }
        for (_, id) in &source {
            self.refs.add(*id);
        }
        let previous = self.tables.insert(
            rev_nat_id,
            MirrorTable {
                digest: Some(digest),
                source: Some(source),
            },
        );
        match previous {
            Some(MirrorTable {
                source: Some(old), ..
            }) => {
                for (_, id) in old {
                    self.refs.drop(id);
                }
            }
            Some(MirrorTable { source: None, .. }) => self.unknown_tables -= 1,
            None => {}
        }
        Ok(())
    }
}
