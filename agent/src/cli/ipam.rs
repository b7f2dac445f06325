//! `ferrox ipam show | check | release`: the node's blocks and allocations, their consistency
//! with the interfaces and the datapath, and releasing one by hand. Everything is read from the
//! node configuration, the IPAM store, the pinned endpoint map and the host's interfaces, so it
//! works while the agent is down.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use ferrox_abi::endpoint_flags;
use ferrox_cni::{
    ipam::{Allocation, Store},
    netlink::Netlink,
    node_config::NodeConfig,
    pod,
};
use ferrox_datapath::{Maps, PinLayout};
use ipnet::Ipv4Net;
use serde::Serialize;

use super::{
    NodeArgs,
    output::{Output, print_data, print_table},
};

#[derive(Debug, clap::Subcommand)]
pub enum IpamCommand {
    /// Blocks with their use, and every allocation with its pod and veth.
    Show(NodeArgs),
    /// Allocations against veths and the endpoint map; exits 1 when something is wrong.
    Check(NodeArgs),
    /// Releases the attachment holding an address or container id, as a CNI DEL would.
    Release {
        /// An address, or a container id.
        what: String,
        #[command(flatten)]
        args: NodeArgs,
    },
}

/// Runs one `ferrox ipam` command; `check` exits 1 when it found a problem (printed), for
/// scripts.
pub fn run(cmd: IpamCommand, layout: &PinLayout) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        IpamCommand::Show(a) => show(&a.node_config, a.output)?,
        IpamCommand::Check(a) => {
            if !run_check(&a.node_config, layout, a.output)? {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        IpamCommand::Release { what, args } => release(&args.node_config, &what)?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One block of the node, with its use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockRow {
    pub cidr: Ipv4Net,
    pub used: usize,
    pub capacity: usize,
}

/// One allocation, with what the node has for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AllocationRow {
    pub ip: Ipv4Addr,
    pub pod: String,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    /// The host side of its veth exists.
    pub veth: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Show {
    pub mode: ferrox_cni::node_config::IpamMode,
    pub blocks: Vec<BlockRow>,
    pub allocations: Vec<AllocationRow>,
}

/// Something an operator should look at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case", tag = "problem")]
pub enum Problem {
    /// An address is allocated but its veth is gone (a DEL that never came, or a crash).
    AllocationWithoutVeth { ip: Ipv4Addr, container_id: String },
    /// An address outside every block of the node.
    OutsideBlocks { ip: Ipv4Addr, container_id: String },
    /// A host veth of ours that no allocation owns.
    VethWithoutAllocation { host_ifname: String },
    /// The endpoint map routes an address no allocation holds.
    StaleEndpoint { ip: Ipv4Addr },
    /// The endpoint map sends an allocated address to another interface than its veth.
    EndpointMismatch {
        ip: Ipv4Addr,
        ifindex: u32,
        veth_ifindex: u32,
    },
    /// An allocated address missing from the endpoint map.
    MissingEndpoint { ip: Ipv4Addr },
    /// A file of the IPAM store that is not a readable record; its address (when its name is
    /// one) is kept out of use until `ferrox ipam release IP`.
    UnreadableRecord {
        path: String,
        reason: String,
        ip: Option<Ipv4Addr>,
    },
}

/// The problems of a node: allocations against veths (name -> ifindex) and endpoint entries
/// (pod address -> ifindex). Pure.
pub fn check(
    allocations: &[Allocation],
    blocks: &[Ipv4Net],
    veths: &BTreeMap<String, u32>,
    endpoints: &BTreeMap<Ipv4Addr, u32>,
) -> Vec<Problem> {
    let mut out = BTreeSet::new();
    let mut owned = BTreeSet::new();
    for a in allocations {
        let name = pod::host_ifname(&a.container_id, &a.ifname);
        owned.insert(name.clone());
        if !blocks.iter().any(|b| b.contains(&a.ip)) {
            out.insert(Problem::OutsideBlocks {
                ip: a.ip,
                container_id: a.container_id.clone(),
            });
        }
        match (veths.get(&name), endpoints.get(&a.ip)) {
            (None, _) => {
                out.insert(Problem::AllocationWithoutVeth {
                    ip: a.ip,
                    container_id: a.container_id.clone(),
                });
            }
            (Some(_), None) => {
                out.insert(Problem::MissingEndpoint { ip: a.ip });
            }
            (Some(v), Some(e)) if v != e => {
                out.insert(Problem::EndpointMismatch {
                    ip: a.ip,
                    ifindex: *e,
                    veth_ifindex: *v,
                });
            }
            _ => {}
        }
    }
    for name in veths.keys() {
        if !owned.contains(name) {
            out.insert(Problem::VethWithoutAllocation {
                host_ifname: name.clone(),
            });
        }
    }
    let allocated: BTreeSet<Ipv4Addr> = allocations.iter().map(|a| a.ip).collect();
    for ip in endpoints.keys() {
        if !allocated.contains(ip) {
            out.insert(Problem::StaleEndpoint { ip: *ip });
        }
    }
    out.into_iter().collect()
}

/// Host veths of ours: name -> ifindex.
fn host_veths() -> anyhow::Result<BTreeMap<String, u32>> {
    Ok(Netlink::open()?
        .list_links()?
        .into_iter()
        .filter(|l| pod::is_host_ifname(&l.name) && l.kind.as_deref() == Some("veth"))
        .map(|l| (l.name, l.index))
        .collect())
}

/// Pod entries of the endpoint map: address -> ifindex (empty when the datapath is not loaded).
fn pod_endpoints(layout: &PinLayout) -> anyhow::Result<BTreeMap<Ipv4Addr, u32>> {
    if !layout.map(ferrox_abi::map_names::ENDPOINTS).exists() {
        return Ok(BTreeMap::new());
    }
    Ok(Maps::open(layout)?
        .endpoints
        .entries()?
        .into_iter()
        .filter(|(_, v)| v.flags & endpoint_flags::POD != 0)
        .map(|(k, v)| (Ipv4Addr::from(k.addr.to_ne_bytes()), v.ifindex))
        .collect())
}

fn read(node_config: &Path) -> anyhow::Result<(NodeConfig, Vec<Allocation>)> {
    let (config, scan) = read_scan(node_config)?;
    Ok((config, scan.allocations))
}

fn read_scan(node_config: &Path) -> anyhow::Result<(NodeConfig, ferrox_cni::ipam::Scan)> {
    let config = NodeConfig::read(node_config)?;
    let scan = Store::new(&config.ipam_dir).scan()?;
    Ok((config, scan))
}

pub fn show(node_config: &Path, output: Output) -> anyhow::Result<()> {
    let (config, allocations) = read(node_config)?;
    let veths = host_veths()?;
    let blocks = config
        .pod_cidrs
        .iter()
        .map(|b| BlockRow {
            cidr: *b,
            used: allocations.iter().filter(|a| b.contains(&a.ip)).count(),
            capacity: b.hosts().count(),
        })
        .collect();
    let rows = allocations
        .iter()
        .map(|a| {
            let host_ifname = pod::host_ifname(&a.container_id, &a.ifname);
            AllocationRow {
                ip: a.ip,
                pod: if a.pod_name.is_empty() {
                    String::new()
                } else {
                    format!("{}/{}", a.pod_namespace, a.pod_name)
                },
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                veth: veths.contains_key(&host_ifname),
                host_ifname,
            }
        })
        .collect();
    let show = Show {
        mode: config.ipam_mode,
        blocks,
        allocations: rows,
    };
    match output {
        Output::Json | Output::Yaml => print_data(output, &show)?,
        Output::Table => {
            println!("mode: {:?}", show.mode);
            let blocks: Vec<[String; 3]> = show
                .blocks
                .iter()
                .map(|b| {
                    [
                        b.cidr.to_string(),
                        b.used.to_string(),
                        b.capacity.to_string(),
                    ]
                })
                .collect();
            print_table(["BLOCK", "USED", "CAPACITY"], &blocks);
            println!();
            let rows: Vec<[String; 5]> = show
                .allocations
                .iter()
                .map(|a| {
                    [
                        a.ip.to_string(),
                        a.pod.clone(),
                        a.container_id.clone(),
                        a.host_ifname.clone(),
                        if a.veth { "yes" } else { "MISSING" }.into(),
                    ]
                })
                .collect();
            print_table(["IP", "POD", "CONTAINER", "VETH", "PRESENT"], &rows);
        }
    }
    Ok(())
}

/// Prints the problems; true when there are none.
pub fn run_check(node_config: &Path, layout: &PinLayout, output: Output) -> anyhow::Result<bool> {
    let (config, scan) = read_scan(node_config)?;
    let allocations = scan.allocations;
    let mut problems = check(
        &allocations,
        &config.pod_cidrs,
        &host_veths()?,
        &pod_endpoints(layout)?,
    );
    problems.extend(scan.bad.into_iter().map(|b| Problem::UnreadableRecord {
        path: b.path.display().to_string(),
        reason: b.reason,
        ip: b.ip,
    }));
    match output {
        Output::Json | Output::Yaml => print_data(output, &problems)?,
        Output::Table => {
            if problems.is_empty() {
                println!("no problems: {} allocations", allocations.len());
            }
            for p in &problems {
                println!("{}", serde_json::to_string(p)?);
            }
        }
    }
    Ok(problems.is_empty())
}

/// Releases the attachment holding `what` (an address or a container id), as a DEL would.
pub fn release(node_config: &Path, what: &str) -> anyhow::Result<()> {
    let (config, allocations) = read(node_config)?;
    let ip: Option<Ipv4Addr> = what.parse().ok();
    let matching: Vec<&Allocation> = allocations
        .iter()
        .filter(|a| Some(a.ip) == ip || a.container_id == what)
        .collect();
    // An address held only by an unreadable record that was set aside: forgetting the record
    // frees the address.
    if let (Some(ip), true) = (ip, matching.is_empty()) {
        let n = Store::new(&config.ipam_dir).forget_set_aside(ip)?;
        if n > 0 {
            println!("released {ip} (held by {n} unreadable record(s) set aside)");
            return Ok(());
        }
    }
    anyhow::ensure!(
        !matching.is_empty(),
        "no allocation holds {what} (see `ferrox ipam show`)"
    );
    for a in matching {
        ferrox_cni::plugin::release_attachment(&config, &a.container_id, &a.ifname)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("released {} ({} {})", a.ip, a.container_id, a.ifname);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use super::*;

    fn alloc(ip: &str, cid: &str) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: cid.into(),
        }
    }

    #[test]
    fn every_kind_of_inconsistency_is_found_and_a_sound_node_has_none() {
        let blocks = vec!["10.244.1.0/24".parse().unwrap()];
        let good = alloc("10.244.1.2", "good");
        let v = |cid: &str| pod::host_ifname(cid, "eth0");
        let veths = BTreeMap::from([
            (v("good"), 10),
            (v("mismatch"), 11),
            (v("noentry"), 12),
            ("fx00000000000".to_owned(), 13),
        ]);
        let endpoints = BTreeMap::from([
            ("10.244.1.2".parse().unwrap(), 10),
            ("10.244.1.3".parse().unwrap(), 99),
            ("10.244.1.9".parse().unwrap(), 14),
        ]);
        assert!(
            check(
                std::slice::from_ref(&good),
                &blocks,
                &BTreeMap::from([(v("good"), 10)]),
                &BTreeMap::from([("10.244.1.2".parse().unwrap(), 10)])
            )
            .is_empty()
        );
        let allocations = vec![
            good,
            alloc("10.244.1.3", "mismatch"),
            alloc("10.244.1.4", "noentry"),
            alloc("10.244.1.5", "noveth"),
            alloc("10.99.0.1", "outside"),
        ];
        let problems = check(&allocations, &blocks, &veths, &endpoints);
        let kinds: Vec<String> = problems
            .iter()
            .map(|p| {
                serde_json::to_value(p).unwrap()["problem"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "allocation-without-veth",
                "allocation-without-veth",
                "outside-blocks",
                "veth-without-allocation",
                "stale-endpoint",
                "endpoint-mismatch",
                "missing-endpoint"
            ],
            "{problems:#?}"
        );
    }
}
