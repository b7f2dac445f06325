//! `ferrox svc list`: every frontend the service maps hold, with its backends, read from the
//! pinned maps (works while the agent is down).

use std::collections::BTreeMap;

use ferrox_abi::{backend_flags, svc_flags};
use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use super::output::{Output, print_data, print_table};
use crate::services::{
    model::Scope,
    reconcile::{addr_from_be, entry_of},
};

#[derive(Debug, clap::Subcommand)]
pub enum SvcCommand {
    /// Frontends and their backends.
    List(super::output::OutputArgs),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    pub frontend: String,
    /// Internal: this node's pods and host; external: clients outside the node.
    pub scope: Scope,
    pub rev_nat_id: u16,
    pub flags: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub terminating: bool,
    pub local: bool,
}

/// The names of a master entry's [`svc_flags`] bits, as `svc list` and `trace` show them.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (svc_flags::CLUSTER_IP, "cluster-ip"),
        (svc_flags::NODE_PORT, "node-port"),
        (svc_flags::EXTERNAL_IP, "external-ip"),
        (svc_flags::LOAD_BALANCER, "load-balancer"),
        (svc_flags::AFFINITY, "affinity"),
        (svc_flags::EXTERNAL_LOCAL, "external-local"),
        (svc_flags::INTERNAL_LOCAL, "internal-local"),
        (svc_flags::SOURCE_RANGES, "source-ranges"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Every frontend entry with its backends, read from the maps.
pub fn services(layout: &PinLayout) -> anyhow::Result<Vec<ServiceRow>> {
    let maps = Maps::open(layout)?;
    let entries: BTreeMap<_, _> = maps.services.entries()?.into_iter().collect();
    let backends: BTreeMap<_, _> = maps.backends.entries()?.into_iter().collect();
    let mut rows = Vec::new();
    for (key, master) in entries.iter().filter(|(k, _)| k.slot == 0) {
        let Some(entry) = entry_of(key) else { continue };
        let mut bs = Vec::new();
        for slot in 1..=master.count {
            let Some(slot_entry) = entries.get(&key.with_slot(slot)) else {
                continue;
            };
            let id = slot_entry.backend_id;
            if let Some(b) = backends.get(&id) {
                bs.push(BackendRow {
                    id,
                    address: format!("{}:{}", addr_from_be(b.addr), u16::from_be(b.port)),
                    terminating: b.flags & backend_flags::TERMINATING != 0,
                    local: b.flags & backend_flags::LOCAL != 0,
                });
            }
        }
        rows.push(ServiceRow {
            frontend: entry.frontend.to_string(),
            scope: entry.scope,
            rev_nat_id: master.rev_nat_id,
            flags: flag_names(master.flags),
            affinity_timeout: (master.flags & svc_flags::AFFINITY != 0)
                .then_some(master.affinity_timeout),
            backends: bs,
        });
    }
    Ok(rows)
}

pub fn run(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let rows = services(layout)?;
    match output {
        Output::Json | Output::Yaml => print_data(output, &rows)?,
        Output::Table => {
            let table: Vec<[String; 4]> = rows
                .iter()
                .map(|r| {
                    let backends = if r.backends.is_empty() {
                        "(none: connections refused)".to_owned()
                    } else {
                        r.backends
                            .iter()
                            .map(|b| {
                                let mut s = b.address.clone();
                                if b.local {
                                    s.push_str(" (local)");
                                }
                                if b.terminating {
                                    s.push_str(" (terminating)");
                                }
                                s
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let mut flags = r.flags.join(",");
                    if let Some(t) = r.affinity_timeout {
                        flags.push_str(&format!(" ({t}s)"));
                    }
                    let scope = match r.scope {
                        Scope::Internal => "internal",
                        Scope::External => "external",
                    };
                    [r.frontend.clone(), scope.to_owned(), flags, backends]
                })
                .collect();
            print_table(["FRONTEND", "SCOPE", "FLAGS", "BACKENDS"], &table);
        }
    }
    Ok(())
}
