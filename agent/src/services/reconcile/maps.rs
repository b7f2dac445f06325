//! The maps the reconciler writes, behind one trait ([`ServiceMaps`]) so that the reconciler's
//! unit tests can check every intermediate state on a fake: [`NodeMaps`] is the node's pinned
//! maps (with the UDP flow purge and the socket closing that follow a backend's departure).

use std::collections::BTreeSet;

use ferrox_abi::{AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue};
use ferrox_datapath::{DatapathError, MaglevTables, Maps, PinLayout, SourceRange, WriteError};

use super::encode::UDP;

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
    /// Makes `table` (one backend id per Maglev slot) the table of `rev_nat_id`, replacing any
    /// previous one in a single step.
    fn write_maglev(&mut self, rev_nat_id: u16, table: &[u32]) -> Result<(), WriteError>;
    fn delete_maglev(&mut self, rev_nat_id: u16) -> Result<(), DatapathError>;
    /// Every Maglev table's rev_nat_id and the digest of its contents
    /// ([`ferrox_datapath::table_digest`]), `None` when unknown.
    fn maglev_digests(&self) -> Result<Vec<(u16, Option<u64>)>, DatapathError>;
    fn source_ranges(&self) -> Result<Vec<SourceRange>, DatapathError>;
    fn write_source_range(&mut self, range: &SourceRange) -> Result<(), WriteError>;
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), DatapathError>;
    /// Removes the conntrack entries (both directions) of UDP flows that `lost` names as
    /// (rev_nat_id, backend id); returns how many went.
    fn purge_udp_flows(&mut self, lost: &BTreeSet<(u16, u32)>) -> Result<usize, DatapathError>;
    /// Closes this node's connected UDP sockets that the socket hooks sent to a backend that
    /// `lost` names as (rev_nat_id, backend address, backend port), network byte order;
    /// returns how many ([`crate::sockets`]).
    fn close_udp_sockets(&mut self, lost: &BTreeSet<(u16, u32, u16)>) -> anyhow::Result<usize>;
}

/// The pinned maps the reconciler writes: the service maps and the Maglev tables.
pub struct NodeMaps {
    pub maps: Maps,
    pub maglev: MaglevTables,
}

impl NodeMaps {
    /// `maps` and the Maglev tables pinned under `layout` (the same layout `maps` came from).
    pub fn new(maps: Maps, layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(Self {
            maps,
            maglev: MaglevTables::open(layout)?,
        })
    }
}

impl ServiceMaps for NodeMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
        self.maps.backends.insert(&id, backend)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.maps.remove_backend(id).map(drop)
    }
    fn write_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError> {
        self.maps.services.insert(key, value)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        self.maps.services.remove(key).map(drop)
    }
    fn read_all(
        &self,
    ) -> Result<(Vec<(ServiceKey, ServiceValue)>, Vec<(u32, Backend)>), DatapathError> {
        Ok((self.maps.services.entries()?, self.maps.backends.entries()?))
    }
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, DatapathError> {
        self.maps.affinity.entries()
    }
    fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), DatapathError> {
        self.maps.affinity.remove(key).map(drop)
    }
    fn write_maglev(&mut self, rev_nat_id: u16, table: &[u32]) -> Result<(), WriteError> {
        self.maglev.set(rev_nat_id, table)
    }
    fn delete_maglev(&mut self, rev_nat_id: u16) -> Result<(), DatapathError> {
        self.maglev.remove(rev_nat_id).map(drop)
    }
    fn maglev_digests(&self) -> Result<Vec<(u16, Option<u64>)>, DatapathError> {
        self.maglev.digests()
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, DatapathError> {
        self.maps.source_ranges.entries()
    }
    fn write_source_range(&mut self, range: &SourceRange) -> Result<(), WriteError> {
        self.maps.source_ranges.insert(range)
    }
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), DatapathError> {
        self.maps.source_ranges.remove(range).map(drop)
    }
    fn purge_udp_flows(&mut self, lost: &BTreeSet<(u16, u32)>) -> Result<usize, DatapathError> {
        let mut removed = 0;
        for (k, v) in self.maps.conntrack.entries()? {
            if k.proto == UDP && lost.contains(&(v.rev_nat_id, v.backend_id)) {
                // An entry the kernel's LRU evicted meanwhile is fine: it is gone either way.
                if self.maps.conntrack.remove(&k)? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
    fn close_udp_sockets(&mut self, lost: &BTreeSet<(u16, u32, u16)>) -> anyhow::Result<usize> {
        let targets: Vec<crate::sockets::Target> = self
            .maps
            .sock_revnat
            .entries()?
            .into_iter()
            .filter(|(k, v)| lost.contains(&(v.rev_nat_id, k.addr, k.port)))
            .map(|(k, _)| crate::sockets::Target {
                cookie: k.cookie,
                addr: k.addr,
                port: k.port,
            })
            .collect();
        Ok(crate::sockets::destroy_connected_udp(&targets)?)
    }
}
