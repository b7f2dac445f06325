//! What one sync did ([`SyncReport`]), for the log, the metrics and the tests; entries it could not
//! program are [`Failure`]s (a full map apart, as an operator acts on it differently).

use ferrox_datapath::{MapFull, WriteError};

use crate::services::model::FrontendKey;

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
    /// Maglev tables programmed after the sync.
    pub maglev_tables: usize,
    /// Allowed source prefixes (loadBalancerSourceRanges) programmed after the sync.
    pub source_ranges: usize,
    /// Conntrack entries of UDP flows to departed backends removed by the sync.
    pub flows_purged: usize,
    /// Connected UDP sockets to departed backends closed by the sync.
    pub sockets_closed: usize,
    pub failures: Vec<Failure>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.writes + self.deletes + self.affinity_removed + self.flows_purged + self.sockets_closed
            > 0
    }
}

pub(super) fn failure(key: &FrontendKey, e: &WriteError) -> Failure {
    Failure {
        frontend: key.to_string(),
        error: e.to_string(),
        map_full: matches!(e, WriteError::Full(MapFull { .. })),
    }
}
