//! In-memory service maps for the reconciler's tests: after every single write they check what
//! a concurrent kernel reader would see, and record a violation when it would be inconsistent.

use std::collections::{BTreeMap, BTreeSet};

use ferrox_abi::{AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, svc_flags};
use ferrox_datapath::{DatapathError, MapFull, SourceRange, WriteError};

use crate::services::{
    maglev::TABLE_SIZE,
    model::Scope,
    reconcile::{ServiceMaps, addr_from_be, entry_of},
};

/// In-memory maps that check, after every single write, what a concurrent kernel reader
/// would see: every frontend's count covers existing slots that name existing backends, and
/// every Maglev table has the kernel's size and names existing backends only.
#[derive(Default)]
pub(super) struct FakeMaps {
    pub(super) services: BTreeMap<ServiceKey, ServiceValue>,
    pub(super) backends: BTreeMap<u32, Backend>,
    pub(super) affinity: BTreeMap<AffinityKey, AffinityValue>,
    pub(super) maglev: BTreeMap<u16, Vec<u32>>,
    pub(super) maglev_writes: usize,
    /// Maglev writes fail (as with a full map) while set.
    pub(super) maglev_full: bool,
    pub(super) ranges: BTreeSet<SourceRange>,
    /// UDP flows in conntrack: (rev_nat_id, backend id) of each.
    pub(super) udp_flows: Vec<(u16, u32)>,
    /// Sockets the reconciler asked to close: (rev_nat_id, address, port).
    pub(super) sockets_closed: Vec<(u16, u32, u16)>,
    pub(super) service_capacity: usize,
    pub(super) ops: usize,
    pub(super) violations: Vec<String>,
}

impl FakeMaps {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            service_capacity: n,
            ..Self::default()
        }
    }

    pub(super) fn check(&mut self) {
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
        for (k, v) in &self.services {
            if k.slot == 0
                && k.scope == Scope::External.number()
                && v.count > 0
                && !self.maglev.contains_key(&v.rev_nat_id)
            {
                self.violations.push(format!(
                    "op {}: external {k:?} has backends but no Maglev table",
                    self.ops
                ));
            }
        }
        for (k, v) in &self.services {
            if k.slot == 0
                && k.scope == Scope::External.number()
                && v.flags & svc_flags::SOURCE_RANGES != 0
                && !self.ranges.iter().any(|r| r.rev_nat_id == v.rev_nat_id)
            {
                self.violations.push(format!(
                    "op {}: external {k:?} checks source ranges but has none: all denied",
                    self.ops
                ));
            }
        }
        for (id, table) in &self.maglev {
            if table.len() != TABLE_SIZE {
                self.violations.push(format!(
                    "op {}: Maglev table {id} has {} entries",
                    self.ops,
                    table.len()
                ));
            }
            let missing: BTreeSet<u32> = table
                .iter()
                .filter(|b| !self.backends.contains_key(b))
                .copied()
                .collect();
            if !missing.is_empty() {
                self.violations.push(format!(
                    "op {}: Maglev table {id} names missing backends {missing:?}",
                    self.ops
                ));
            }
        }
    }

    /// The backends a reader can reach through each frontend.
    pub(super) fn view(&self) -> BTreeMap<String, Vec<String>> {
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
    fn write_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError> {
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
    fn write_maglev(&mut self, rev_nat_id: u16, table: &[u32]) -> Result<(), WriteError> {
        if self.maglev_full {
            return Err(MapFull {
                name: "MAGLEV_V1",
                capacity: 1,
            }
            .into());
        }
        self.maglev.insert(rev_nat_id, table.to_vec());
        self.maglev_writes += 1;
        self.check();
        Ok(())
    }
    fn delete_maglev(&mut self, rev_nat_id: u16) -> Result<(), DatapathError> {
        self.maglev.remove(&rev_nat_id);
        self.check();
        Ok(())
    }
    fn maglev_digests(&self) -> Result<Vec<(u16, Option<u64>)>, DatapathError> {
        // As the real maps do: the digest of what each table holds.
        Ok(self
            .maglev
            .iter()
            .map(|(id, t)| (*id, Some(ferrox_datapath::table_digest(t))))
            .collect())
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, DatapathError> {
        Ok(self.ranges.iter().copied().collect())
    }
    fn write_source_range(&mut self, range: &SourceRange) -> Result<(), WriteError> {
        self.ranges.insert(*range);
        self.check();
        Ok(())
    }
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), DatapathError> {
        self.ranges.remove(range);
        self.check();
        Ok(())
    }
    fn close_udp_sockets(&mut self, lost: &BTreeSet<(u16, u32, u16)>) -> anyhow::Result<usize> {
        self.sockets_closed.extend(lost.iter().copied());
        Ok(lost.len())
    }
    fn purge_udp_flows(&mut self, lost: &BTreeSet<(u16, u32)>) -> Result<usize, DatapathError> {
        let before = self.udp_flows.len();
        self.udp_flows.retain(|f| !lost.contains(f));
        Ok(before - self.udp_flows.len())
    }
}
