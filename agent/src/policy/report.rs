//! What the agent publishes about NetworkPolicy for `ferrox policy` (a file beside the node
//! configuration, rewritten after every change): the policies with the numbers the kernel's
//! tables name them by, the local pods each selects, what could not be enforced, and the policies
//! refused. The kernel's maps say the rest (isolated pods, remembered flows).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::model::{Direction, World};

/// One policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRow {
    /// `namespace/name`.
    pub id: String,
    /// What the kernel's entries call it ([`super::tables::policy_number`]).
    pub number: u32,
    pub ingress: bool,
    pub egress: bool,
    /// The local pods it selects (`namespace/name`).
    pub selects: Vec<String>,
    /// What of it the datapath cannot enforce (it then allows less).
    pub unsupported: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub id: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    pub policies: Vec<PolicyRow>,
    pub refused: Vec<Refused>,
    /// Local pods by address (`namespace/name`).
    pub local_pods: BTreeMap<Ipv4Addr, String>,
}

impl PolicyReport {
    pub fn new(
        world: &World,
        local: &BTreeMap<String, Ipv4Addr>,
        refused: &[(String, String)],
    ) -> Self {
        let policies = world
            .policies
            .iter()
            .map(|p| PolicyRow {
                id: p.id(),
                number: super::tables::policy_number(&p.id()),
                ingress: p.rules(Direction::Ingress).is_some(),
                egress: p.rules(Direction::Egress).is_some(),
                selects: world
                    .pods
                    .iter()
                    .filter(|pod| {
                        pod.namespace == p.namespace
                            && p.selects.matches(&pod.labels)
                            && local.contains_key(&format!("{}/{}", pod.namespace, pod.name))
                    })
                    .map(|pod| format!("{}/{}", pod.namespace, pod.name))
                    .collect(),
                unsupported: p.unsupported.clone(),
            })
            .collect();
        Self {
            policies,
            refused: refused
                .iter()
                .map(|(id, error)| Refused {
                    id: id.clone(),
                    error: error.clone(),
                })
                .collect(),
            local_pods: local.iter().map(|(id, ip)| (*ip, id.clone())).collect(),
        }
    }

    /// Where the agent whose node configuration is `node_config` writes it.
    pub fn path(node_config: &Path) -> PathBuf {
        node_config.with_file_name("policies.json")
    }

    /// Writes it whole (a reader never sees half of it).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// The report at `path`; the default (nothing known) when there is none.
    pub fn read(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
