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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, backend_flags, svc_flags,
};
use ferrox_datapath::{DatapathError, MapFull, Maps, WriteError};

use super::model::{
    BackendAddr, Desired, Frontend, FrontendKey, FrontendKind, FrontendSpec, Proto, Scope,
};

/// The map operations the reconciler needs; implemented by the real maps and by a test fake.
pub trait ServiceMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    fn write_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError>;
    #[expect(clippy::type_complexity, reason = "two plain entry lists")]
    fn read_all(
        &self,
    ) -> Result<(Vec<(ServiceKey, ServiceValue)>, Vec<(u32, Backend)>), DatapathError>;
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, DatapathError>;
    fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), DatapathError>;
}

impl ServiceMaps for Maps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
        self.backends.insert(&id, backend)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.backends.remove(&id).map(drop)
    }
    fn write_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError> {
        self.services.insert(key, value)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        self.services.remove(key).map(drop)
    }
    fn read_all(
        &self,
    ) -> Result<(Vec<(ServiceKey, ServiceValue)>, Vec<(u32, Backend)>), DatapathError> {
        Ok((self.services.entries()?, self.backends.entries()?))
    }
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, DatapathError> {
        self.affinity.entries()
    }
    fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), DatapathError> {
        self.affinity.remove(key).map(drop)
    }
}

/// Network-order encodings used in map keys and values.
pub fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// The master key of an entry.
pub fn master_key(key: &FrontendKey) -> ServiceKey {
    let fe = &key.frontend;
    ServiceKey::master(addr_be(fe.addr), fe.port.to_be(), fe.proto.number())
        .with_scope(key.scope.number())
}

/// The entry a map key belongs to.
pub fn entry_of(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        frontend: Frontend {
            addr: addr_from_be(key.addr),
            port: u16::from_be(key.port),
            proto: Proto::from_number(key.proto)?,
        },
        scope: Scope::from_number(key.scope)?,
    })
}

fn backend_value(b: &BackendAddr) -> Backend {
    let mut flags = 0;
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    if b.local {
        flags |= backend_flags::LOCAL;
    }
    Backend {
        addr: addr_be(b.addr),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags,
    }
}

/// The master entry's flags for a spec.
pub fn flags_of(spec: &FrontendSpec) -> u16 {
    let mut flags = match spec.kind {
        FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
        FrontendKind::NodePort => svc_flags::NODE_PORT,
        FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
    };
    if spec.affinity_timeout.is_some() {
        flags |= svc_flags::AFFINITY;
    }
    if spec.external_local {
        flags |= svc_flags::EXTERNAL_LOCAL;
    }
    if spec.internal_local {
        flags |= svc_flags::INTERNAL_LOCAL;
    }
    if !spec.source_ranges.is_empty() {
        flags |= svc_flags::SOURCE_RANGES;
    }
    flags
}

/// One entry as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MirrorEntry {
    master: Option<ServiceValue>,
    /// slot -> backend id
    slots: BTreeMap<u16, u32>,
}

/// Why an entry could not be (fully) programmed on this sync.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub frontend: String,
    pub error: String,
    pub map_full: bool,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    pub writes: usize,
    pub deletes: usize,
    pub affinity_removed: usize,
    pub failures: Vec<Failure>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.writes + self.deletes + self.affinity_removed > 0
    }
}

/// The reconciler and its mirror of the maps.
#[derive(Debug, Default)]
pub struct Reconciler {
    entries: BTreeMap<FrontendKey, MirrorEntry>,
    backends: BTreeMap<u32, Backend>,
}

impl Reconciler {
    /// Builds the mirror from what the maps hold now (entries it cannot decode are ignored).
    pub fn load(maps: &impl ServiceMaps) -> Result<Self, DatapathError> {
        let (services, backends) = maps.read_all()?;
        let mut r = Self {
            backends: backends.into_iter().collect(),
            ..Self::default()
        };
        for (key, value) in services {
            let Some(entry) = entry_of(&key) else {
                continue;
            };
            let e = r.entries.entry(entry).or_default();
            if key.slot == 0 {
                e.master = Some(value);
            } else {
                e.slots.insert(key.slot, value.backend_id);
            }
        }
        Ok(r)
    }

    /// Number of entries and backends currently programmed.
    pub fn size(&self) -> (usize, usize) {
        (
            self.entries.values().filter(|f| f.master.is_some()).count(),
            self.backends.len(),
        )
    }

    fn backend_id_index(&self) -> BTreeMap<(u32, u16, u8), u32> {
        self.backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port, b.proto), *id))
            .collect()
    }

    /// The reverse-translation id of `fe`: the one any of its scopes already has, or a free one.
    fn rev_nat_id(&self, fe: &Frontend) -> Option<u16> {
        let existing = self
            .entries
            .iter()
            .filter(|(k, _)| k.frontend == *fe)
            .find_map(|(_, e)| e.master.map(|m| m.rev_nat_id));
        if existing.is_some() {
            return existing;
        }
        let used: BTreeSet<u16> = self
            .entries
            .values()
            .filter_map(|f| f.master.map(|m| m.rev_nat_id))
            .collect();
        (1..=u16::MAX).find(|id| !used.contains(id))
    }

    /// Makes the maps hold `desired`.
    pub fn sync(&mut self, desired: &Desired, maps: &mut impl ServiceMaps) -> SyncReport {
        let mut report = SyncReport::default();
        let mut ids = self.backend_id_index();
        let mut next_id = self
            .backends
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .saturating_add(1);
        // Backends each affinity-enabled frontend had before this sync: if one is gone,
        // clients pinned to it must be released.
        let affinity_before: BTreeMap<u16, BTreeSet<u32>> = self.affinity_backends();

        for (key, spec) in &desired.frontends {
            if let Err(e) = self.sync_entry(key, spec, maps, &mut ids, &mut next_id, &mut report) {
                report.failures.push(e);
            }
        }

        // Entries no longer wanted: master first (the entry disappears at once), then slots.
        let gone: Vec<FrontendKey> = self
            .entries
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let mkey = master_key(&key);
            let Some(mirror) = self.entries.get_mut(&key) else {
                continue;
            };
            if mirror.master.is_some() {
                if let Err(e) = maps.delete_service(&mkey) {
                    report.failures.push(failure(&key, &WriteError::Other(e)));
                    continue;
                }
                mirror.master = None;
                report.deletes += 1;
            }
            let slots: Vec<u16> = mirror.slots.keys().copied().collect();
            for slot in slots {
                match maps.delete_service(&mkey.with_slot(slot)) {
                    Ok(()) => {
                        mirror.slots.remove(&slot);
                        report.deletes += 1;
                    }
                    Err(e) => report.failures.push(failure(&key, &WriteError::Other(e))),
                }
            }
            if mirror.slots.is_empty() {
                self.entries.remove(&key);
            }
        }

        // Affinity entries naming a backend their frontend lost.
        let affinity_after = self.affinity_backends();
        let lost = affinity_before.iter().any(|(id, before)| {
            affinity_after
                .get(id)
                .is_none_or(|after| !before.is_subset(after))
        });
        if lost {
            match maps.affinity_entries() {
                Ok(entries) => {
                    for (k, v) in entries {
                        let keep = affinity_after
                            .get(&k.rev_nat_id)
                            .is_some_and(|b| b.contains(&v.backend_id));
                        if !keep {
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

        // Backends no slot refers to any more.
        let referenced: BTreeSet<u32> = self
            .entries
            .values()
            .flat_map(|f| f.slots.values().copied())
            .collect();
        let unused: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in unused {
            match maps.delete_backend(id) {
                Ok(()) => {
                    self.backends.remove(&id);
                    report.deletes += 1;
                }
                Err(e) => report.failures.push(Failure {
                    frontend: format!("backend {id}"),
                    error: e.to_string(),
                    map_full: false,
                }),
            }
        }
        (report.frontends, report.backends) = self.size();
        report
    }

    /// rev_nat_id -> the backends its affinity-enabled entries can reach now.
    fn affinity_backends(&self) -> BTreeMap<u16, BTreeSet<u32>> {
        let mut out: BTreeMap<u16, BTreeSet<u32>> = BTreeMap::new();
        for e in self.entries.values() {
            let Some(m) = e.master.filter(|m| m.flags & svc_flags::AFFINITY != 0) else {
                continue;
            };
            let live = (1..=m.count).filter_map(|s| e.slots.get(&s).copied());
            out.entry(m.rev_nat_id).or_default().extend(live);
        }
        out
    }

    fn sync_entry(
        &mut self,
        key: &FrontendKey,
        spec: &FrontendSpec,
        maps: &mut impl ServiceMaps,
        ids: &mut BTreeMap<(u32, u16, u8), u32>,
        next_id: &mut u32,
        report: &mut SyncReport,
    ) -> Result<(), Failure> {
        // 1. Backends.
        let mut slot_ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let value = backend_value(b);
            let identity = (value.addr, value.port, value.proto);
            let id = *ids.entry(identity).or_insert_with(|| {
                let id = *next_id;
                *next_id += 1;
                id
            });
            if self.backends.get(&id) != Some(&value) {
                maps.write_backend(id, &value)
                    .map_err(|e| failure(key, &e))?;
                self.backends.insert(id, value);
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
                mirror.slots.insert(slot, *id);
                report.writes += 1;
            }
        }

        // 3. Master: makes exactly `count` slots visible.
        let master = ServiceValue {
            count,
            rev_nat_id,
            flags: flags_of(spec),
            affinity_timeout: spec.affinity_timeout.unwrap_or(0),
            ..ServiceValue::default()
        };
        if mirror.master != Some(master) {
            maps.write_service(&mkey, &master)
                .map_err(|e| failure(key, &e))?;
            mirror.master = Some(master);
            report.writes += 1;
        }

        // 4. Slots beyond the new count.
        let extra: Vec<u16> = mirror
            .slots
            .keys()
            .filter(|s| **s > count)
            .copied()
            .collect();
        for slot in extra {
            maps.delete_service(&mkey.with_slot(slot))
                .map_err(|e| failure(key, &WriteError::Other(e)))?;
            mirror.slots.remove(&slot);
            report.deletes += 1;
        }
        Ok(())
    }
}

fn failure(key: &FrontendKey, e: &WriteError) -> Failure {
    Failure {
        frontend: key.to_string(),
        error: e.to_string(),
        map_full: matches!(e, WriteError::Full(MapFull { .. })),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::services::{
        desired::desired,
        testing::{slice, svc},
    };

    /// In-memory maps that check, after every single write, what a concurrent kernel reader
    /// would see: every frontend's count covers existing slots that name existing backends.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        affinity: BTreeMap<AffinityKey, AffinityValue>,
        service_capacity: usize,
        ops: usize,
        violations: Vec<String>,
    }

    impl FakeMaps {
        fn with_capacity(n: usize) -> Self {
            Self {
                service_capacity: n,
                ..Self::default()
            }
        }

        fn check(&mut self) {
            self.ops += 1;
            for (k, v) in &self.services {
                if k.slot != 0 {
                    continue;
                }
                for slot in 1..=v.count {
                    match self.services.get(&k.with_slot(slot)) {
                        None => self.violations.push(format!(
                            "op {}: {k:?} count {} but slot {slot} missing",
                            self.ops, v.count
                        )),
                        Some(s) if !self.backends.contains_key(&s.backend_id) => {
                            self.violations.push(format!(
                                "op {}: slot {slot} names missing backend {}",
                                self.ops, s.backend_id
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
        }

        /// The backends a reader can reach through each frontend.
        fn view(&self) -> BTreeMap<String, Vec<String>> {
            let mut out = BTreeMap::new();
            for (k, v) in &self.services {
                if k.slot != 0 {
                    continue;
                }
                let fe = entry_of(k).unwrap().to_string();
                let mut bs: Vec<String> = (1..=v.count)
                    .map(|s| {
                        let b = self.backends[&self.services[&k.with_slot(s)].backend_id];
                        format!("{}:{}", addr_from_be(b.addr), u16::from_be(b.port))
                    })
                    .collect();
                bs.sort();
                out.insert(fe, bs);
            }
            out
        }
    }

    impl ServiceMaps for FakeMaps {
        fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
            self.backends.insert(id, *backend);
            self.check();
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
            self.backends.remove(&id);
            self.check();
            Ok(())
        }
        fn write_service(
            &mut self,
            key: &ServiceKey,
            value: &ServiceValue,
        ) -> Result<(), WriteError> {
            if self.service_capacity > 0
                && !self.services.contains_key(key)
                && self.services.len() >= self.service_capacity
            {
                return Err(MapFull {
                    name: "SVC_V1",
                    capacity: self.service_capacity as u32,
                }
                .into());
            }
            self.services.insert(*key, *value);
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
            self.services.remove(key);
            self.check();
            Ok(())
        }
        fn read_all(
            &self,
        ) -> Result<(Vec<(ServiceKey, ServiceValue)>, Vec<(u32, Backend)>), DatapathError> {
            Ok((
                self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            ))
        }
        fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, DatapathError> {
            Ok(self.affinity.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), DatapathError> {
            self.affinity.remove(key);
            Ok(())
        }
    }

    fn run<'a>(
        services: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Service>,
        slices: impl IntoIterator<Item = &'a k8s_openapi::api::discovery::v1::EndpointSlice>,
    ) -> Desired {
        let node = crate::services::model::NodeInfo {
            name: "node-1".into(),
            ..Default::default()
        };
        desired(
            services,
            slices,
            &node,
            &crate::services::model::ProxyOptions::default(),
        )
    }

    fn web(backends: &[&str]) -> Desired {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .build();
        let mut sl = slice("web", "a").port("", 8080, "TCP");
        for b in backends {
            sl = sl.ready(b);
        }
        run([&s], [&sl.build()])
    }

    fn view_of(backends: &[&str]) -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([(
            "10.96.0.10:80/TCP".to_owned(),
            backends.iter().map(|b| format!("{b}:8080")).collect(),
        )])
    }

    #[test]
    fn programs_grows_shrinks_and_removes_without_a_broken_moment() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::default();
        for step in [
            &["10.244.1.5"][..],
            &["10.244.1.5", "10.244.2.6", "10.244.3.7"],
            &["10.244.3.7"],
            &["10.244.4.8", "10.244.5.9"],
            &[],
        ] {
            let report = r.sync(&web(step), &mut maps);
            assert!(report.failures.is_empty(), "{report:?}");
            assert_eq!(maps.view(), view_of(step), "after step {step:?}");
        }
        // No unused backend is left behind.
        assert!(maps.backends.is_empty());
        r.sync(&Desired::default(), &mut maps);
        assert!(maps.services.is_empty());
        assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
    }

    #[test]
    fn a_second_sync_of_the_same_table_writes_nothing() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::default();
        let d = web(&["10.244.1.5", "10.244.2.6"]);
        assert!(r.sync(&d, &mut maps).changed());
        let again = r.sync(&d, &mut maps);
        assert!(!again.changed(), "{again:?}");
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_changes_nothing() {
        let mut maps = FakeMaps::default();
        let d = web(&["10.244.1.5", "10.244.2.6"]);
        Reconciler::default().sync(&d, &mut maps);
        let before = (maps.services.clone(), maps.backends.clone());
        let mut restarted = Reconciler::load(&maps).unwrap();
        let report = restarted.sync(&d, &mut maps);
        assert!(!report.changed(), "{report:?}");
        assert_eq!((maps.services.clone(), maps.backends.clone()), before);
    }

    #[test]
    fn a_restart_repairs_a_half_written_update() {
        // A crash after the slots of a shrink were written but before the stale slot was
        // deleted leaves an orphan slot; the next agent removes it.
        let mut maps = FakeMaps::default();
        Reconciler::default().sync(&web(&["10.244.1.5", "10.244.2.6"]), &mut maps);
        let orphan = master_key(&FrontendKey {
            frontend: Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 80,
                proto: Proto::Tcp,
            },
            scope: Scope::Internal,
        })
        .with_slot(7);
        maps.services.insert(
            orphan,
            ServiceValue {
                backend_id: 99,
                ..Default::default()
            },
        );
        let mut r = Reconciler::load(&maps).unwrap();
        r.sync(&web(&["10.244.1.5", "10.244.2.6"]), &mut maps);
        assert!(!maps.services.contains_key(&orphan));
        assert_eq!(maps.view(), view_of(&["10.244.1.5", "10.244.2.6"]));
    }

    #[test]
    fn a_full_map_keeps_the_previous_consistent_state_and_is_reported() {
        // Room for the master and two slots only.
        let mut maps = FakeMaps::with_capacity(3);
        let mut r = Reconciler::default();
        assert!(
            r.sync(&web(&["10.244.1.5", "10.244.2.6"]), &mut maps)
                .failures
                .is_empty()
        );
        let report = r.sync(&web(&["10.244.1.5", "10.244.2.6", "10.244.3.7"]), &mut maps);
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert!(report.failures[0].map_full);
        assert!(report.failures[0].error.contains("SVC_V1"), "{report:?}");
        assert_eq!(maps.view(), view_of(&["10.244.1.5", "10.244.2.6"]));
        assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
        // Once the Service shrinks again, the same reconciler converges.
        assert!(r.sync(&web(&["10.244.3.7"]), &mut maps).failures.is_empty());
        assert_eq!(maps.view(), view_of(&["10.244.3.7"]));
    }

    #[test]
    fn frontends_get_distinct_reverse_translation_ids_that_survive_updates() {
        let a = svc("a").cluster_ip("10.96.0.1").port("", 80, "TCP").build();
        let b = svc("b").cluster_ip("10.96.0.2").port("", 80, "TCP").build();
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::default();
        r.sync(&run([&a, &b], []), &mut maps);
        let ids: BTreeSet<u16> = maps
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(!ids.contains(&0));
        let sl = slice("a", "x")
            .port("", 8080, "TCP")
            .ready("10.244.1.1")
            .build();
        r.sync(&run([&a, &b], [&sl]), &mut maps);
        let after: BTreeSet<u16> = maps
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        assert_eq!(ids, after);
    }

    #[test]
    fn affinity_entries_naming_a_removed_backend_are_released() {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .session_affinity(Some(60))
            .build();
        let with = |ips: &[&str]| {
            let mut sl = slice("web", "a").port("", 8080, "TCP");
            for ip in ips {
                sl = sl.ready(ip);
            }
            run([&s], [&sl.build()])
        };
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::default();
        r.sync(&with(&["10.244.1.5", "10.244.2.6"]), &mut maps);
        let master = maps
            .services
            .iter()
            .find(|(k, _)| k.slot == 0)
            .map(|(_, v)| *v)
            .unwrap();
        assert_eq!(master.affinity_timeout, 60);
        assert_ne!(master.flags & svc_flags::AFFINITY, 0);
        let id_of = |maps: &FakeMaps, ip: &str| {
            let be = addr_be(ip.parse().unwrap());
            maps.backends
                .iter()
                .find(|(_, b)| b.addr == be)
                .map(|(id, _)| *id)
                .unwrap()
        };
        let (a, b) = (id_of(&maps, "10.244.1.5"), id_of(&maps, "10.244.2.6"));
        for (client, backend_id) in [(1u64, a), (2, b)] {
            let key = AffinityKey {
                client,
                rev_nat_id: master.rev_nat_id,
                client_kind: 0,
                _pad: [0; 5],
            };
            maps.affinity.insert(
                key,
                AffinityValue {
                    backend_id,
                    _pad: 0,
                    last_used_ns: 1,
                },
            );
        }
        // Adding a backend releases nobody.
        let report = r.sync(
            &with(&["10.244.1.5", "10.244.2.6", "10.244.3.7"]),
            &mut maps,
        );
        assert_eq!(report.affinity_removed, 0);
        // Removing 10.244.2.6 releases exactly the client pinned to it.
        let report = r.sync(&with(&["10.244.1.5", "10.244.3.7"]), &mut maps);
        assert_eq!(report.affinity_removed, 1);
        assert_eq!(
            maps.affinity
                .values()
                .map(|v| v.backend_id)
                .collect::<Vec<_>>(),
            [a]
        );
    }

    #[test]
    fn scopes_are_separate_entries_sharing_one_reverse_translation_id() {
        let s = svc("np")
            .node_port_type()
            .cluster_ip("10.96.0.30")
            .port_np("", 80, 30080, "TCP")
            .external_traffic_policy("Local")
            .build();
        let sl = slice("np", "a")
            .port("", 8080, "TCP")
            .ready_on("10.244.1.5", "node-1")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let node = crate::services::model::NodeInfo {
            name: "node-1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            zone: None,
        };
        let d = desired(
            [&s],
            [&sl],
            &node,
            &crate::services::model::ProxyOptions::default(),
        );
        let mut maps = FakeMaps::default();
        Reconciler::default().sync(&d, &mut maps);
        let masters: Vec<(u8, u16, u16, u16)> = maps
            .services
            .iter()
            .filter(|(k, _)| {
                k.slot == 0 && addr_from_be(k.addr) == "198.18.0.11".parse::<Ipv4Addr>().unwrap()
            })
            .map(|(k, v)| {
                (
                    k.scope,
                    v.count,
                    v.rev_nat_id,
                    v.flags & svc_flags::EXTERNAL_LOCAL,
                )
            })
            .collect();
        assert_eq!(masters.len(), 2, "{masters:?}");
        let (internal, external) = (masters[0], masters[1]);
        assert_eq!(
            (internal.0, internal.1, internal.3),
            (0, 2, 0),
            "this node's clients use every endpoint"
        );
        assert_eq!(
            (external.0, external.1, external.3),
            (1, 1, svc_flags::EXTERNAL_LOCAL),
            "outside clients use the local one"
        );
        assert_eq!(
            internal.2, external.2,
            "one frontend address, one reverse-translation id"
        );
    }
}
