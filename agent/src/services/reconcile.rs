//! Writes the desired service table into the maps with the fewest changes, make-before-break.
//!
//! The reconciler keeps a mirror of what the maps hold (loaded from the pinned maps on start, so
//! a restarted agent converges without flushing anything). For each frontend it writes, in
//! order: the backends it needs, its backend slots, then its master entry (whose `count` makes
//! the slots visible), then removes slots beyond the new count. A reader therefore never sees a
//! count that covers a missing slot or a slot naming a missing backend, and a Service being
//! updated never shows zero backends. When a write fails (a full map), that frontend keeps its
//! previous, consistent entries and the failure is reported; the next sync retries.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferrox_abi::{Backend, ServiceKey, ServiceValue, backend_flags, svc_flags};
use ferrox_datapath::{DatapathError, MapFull, Maps, WriteError};

use super::model::{BackendAddr, Desired, Frontend, FrontendKind, FrontendSpec, Proto};

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
}

/// Network-order encodings used in map keys and values.
pub fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

pub fn master_key(fe: &Frontend) -> ServiceKey {
    ServiceKey::master(addr_be(fe.addr), fe.port.to_be(), fe.proto.number())
}

fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: addr_from_be(key.addr),
        port: u16::from_be(key.port),
        proto: Proto::from_number(key.proto)?,
    })
}

fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: addr_be(b.addr),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags: if b.terminating {
            backend_flags::TERMINATING
        } else {
            0
        },
    }
}

fn kind_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
    }
}

/// One frontend as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MirrorFrontend {
    master: Option<ServiceValue>,
    /// slot -> backend id
    slots: BTreeMap<u16, u32>,
}

/// Why a frontend could not be (fully) programmed on this sync.
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
    pub failures: Vec<Failure>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.writes + self.deletes > 0
    }
}

/// The reconciler and its mirror of the maps.
#[derive(Debug, Default)]
pub struct Reconciler {
    frontends: BTreeMap<Frontend, MirrorFrontend>,
    backends: BTreeMap<u32, Backend>,
}

impl Reconciler {
    /// Builds the mirror from what the maps hold now (entries of unknown protocols are ignored).
    pub fn load(maps: &impl ServiceMaps) -> Result<Self, DatapathError> {
        let (services, backends) = maps.read_all()?;
        let mut r = Self {
            backends: backends.into_iter().collect(),
            ..Self::default()
        };
        for (key, value) in services {
            let Some(fe) = frontend_of(&key) else {
                continue;
            };
            let entry = r.frontends.entry(fe).or_default();
            if key.slot == 0 {
                entry.master = Some(value);
            } else {
                entry.slots.insert(key.slot, value.backend_id);
            }
        }
        Ok(r)
    }

    /// Number of frontends and backends currently programmed.
    pub fn size(&self) -> (usize, usize) {
        (
            self.frontends
                .values()
                .filter(|f| f.master.is_some())
                .count(),
            self.backends.len(),
        )
    }

    fn backend_id_index(&self) -> BTreeMap<(u32, u16, u8), u32> {
        self.backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port, b.proto), *id))
            .collect()
    }

    fn free_rev_nat_id(&self) -> Option<u16> {
        let used: BTreeSet<u16> = self
            .frontends
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

        for (fe, spec) in &desired.frontends {
            if let Err(e) = self.sync_frontend(fe, spec, maps, &mut ids, &mut next_id, &mut report)
            {
                report.failures.push(e);
            }
        }

        // Frontends no longer wanted: master first (the frontend disappears at once), then slots.
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !desired.frontends.contains_key(fe))
            .copied()
            .collect();
        for fe in gone {
            let key = master_key(&fe);
            let Some(mirror) = self.frontends.get_mut(&fe) else {
                continue;
            };
            if mirror.master.is_some() {
                if let Err(e) = maps.delete_service(&key) {
                    report.failures.push(failure(&fe, &WriteError::Other(e)));
                    continue;
                }
                mirror.master = None;
                report.deletes += 1;
            }
            let slots: Vec<u16> = mirror.slots.keys().copied().collect();
            for slot in slots {
                match maps.delete_service(&key.with_slot(slot)) {
                    Ok(()) => {
                        mirror.slots.remove(&slot);
                        report.deletes += 1;
                    }
                    Err(e) => report.failures.push(failure(&fe, &WriteError::Other(e))),
                }
            }
            if mirror.slots.is_empty() {
                self.frontends.remove(&fe);
            }
        }

        // Backends no slot refers to any more.
        let referenced: BTreeSet<u32> = self
            .frontends
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

    fn sync_frontend(
        &mut self,
        fe: &Frontend,
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
                    .map_err(|e| failure(fe, &e))?;
                self.backends.insert(id, value);
                report.writes += 1;
            }
            slot_ids.push(id);
        }
        let count = u16::try_from(slot_ids.len()).map_err(|_| Failure {
            frontend: fe.to_string(),
            error: format!(
                "{} backends exceed the datapath's limit of {}",
                slot_ids.len(),
                u16::MAX
            ),
            map_full: false,
        })?;

        // 2. Slots.
        let key = master_key(fe);
        let rev_nat_id = match self.frontends.get(fe).and_then(|m| m.master) {
            Some(m) => m.rev_nat_id,
            None => self.free_rev_nat_id().ok_or_else(|| Failure {
                frontend: fe.to_string(),
                error: "no free reverse-translation id (65535 frontends)".into(),
                map_full: true,
            })?,
        };
        let mirror = self.frontends.entry(*fe).or_default();
        for (i, id) in slot_ids.iter().enumerate() {
            let slot = i as u16 + 1;
            if mirror.slots.get(&slot) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                };
                maps.write_service(&key.with_slot(slot), &value)
                    .map_err(|e| failure(fe, &e))?;
                mirror.slots.insert(slot, *id);
                report.writes += 1;
            }
        }

        // 3. Master: makes exactly `count` slots visible.
        let master = ServiceValue {
            count,
            rev_nat_id,
            flags: kind_flags(spec.kind),
            ..ServiceValue::default()
        };
        if mirror.master != Some(master) {
            maps.write_service(&key, &master)
                .map_err(|e| failure(fe, &e))?;
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
            maps.delete_service(&key.with_slot(slot))
                .map_err(|e| failure(fe, &WriteError::Other(e)))?;
            mirror.slots.remove(&slot);
            report.deletes += 1;
        }
        Ok(())
    }
}

fn failure(fe: &Frontend, e: &WriteError) -> Failure {
    Failure {
        frontend: fe.to_string(),
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
                let fe = frontend_of(k).unwrap().to_string();
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
        desired([&s], [&sl.build()])
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
        let orphan = master_key(&Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
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
        r.sync(&desired([&a, &b], []), &mut maps);
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
        r.sync(&desired([&a, &b], [&sl]), &mut maps);
        let after: BTreeSet<u16> = maps
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        assert_eq!(ids, after);
    }
}
