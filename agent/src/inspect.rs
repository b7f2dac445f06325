//! The read-only node commands: they open the pinned maps directly, so they work while the
//! agent is down. Tables for people, JSON (`-o json`) for scripts.

use std::collections::BTreeMap;

use ferrox_abi::{backend_flags, svc_flags};
use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use crate::{
    cli::Output,
    services::model::Scope,
    services::reconcile::{addr_from_be, entry_of},
};

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

pub fn print_services(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let rows = services(layout)?;
    match output {
        Output::Json | Output::Yaml => crate::inspect::print_data(output, &rows)?,
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

pub fn print_counters(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let rows = maps.counters.snapshot()?;
    match output {
        Output::Json | Output::Yaml => crate::inspect::print_data(output, &rows)?,
        Output::Table => {
            let table: Vec<[String; 5]> = rows
                .iter()
                .map(|r| {
                    [
                        r.hook.into(),
                        r.verdict.into(),
                        r.reason.into(),
                        r.packets.to_string(),
                        r.bytes.to_string(),
                    ]
                })
                .collect();
            print_table(["HOOK", "VERDICT", "REASON", "PACKETS", "BYTES"], &table);
        }
    }
    Ok(())
}

pub fn print_datapath(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let objects = ferrox_datapath::inventory(layout)?;
    match output {
        Output::Json | Output::Yaml => crate::inspect::print_data(output, &objects)?,
        Output::Table => {
            let table: Vec<[String; 4]> = objects
                .iter()
                .map(|o| {
                    let target = match o.target {
                        Some(ferrox_datapath::LinkTarget::Cgroup { cgroup_id, .. }) => {
                            format!("cgroup id {cgroup_id}")
                        }
                        Some(ferrox_datapath::LinkTarget::Tcx { ifindex, .. }) => {
                            format!("tcx ifindex {ifindex}")
                        }
                        Some(ferrox_datapath::LinkTarget::Xdp { ifindex }) => {
                            format!("xdp ifindex {ifindex}")
                        }
                        Some(ferrox_datapath::LinkTarget::Other { link_type }) => {
                            format!("link type {link_type}")
                        }
                        None => String::new(),
                    };
                    [
                        format!("{:?}", o.kind).to_lowercase(),
                        o.name.clone(),
                        o.id.to_string(),
                        target,
                    ]
                })
                .collect();
            print_table(["KIND", "NAME", "ID", "ATTACHED TO"], &table);
        }
    }
    Ok(())
}

/// Prints `data` as the JSON or YAML document `output` asks for (the same fields either way).
pub fn print_data<T: serde::Serialize>(output: Output, data: &T) -> anyhow::Result<()> {
    match output {
        // Through a JSON value, so that both carry the very same document (serde_yaml would
        // write enums as YAML tags).
        Output::Yaml => print!("{}", serde_yaml::to_string(&serde_json::to_value(data)?)?),
        Output::Json | Output::Table => println!("{}", serde_json::to_string_pretty(data)?),
    }
    Ok(())
}

pub fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
