//! `ferrox policy list | flows`: NetworkPolicy on this node. `list`: every policy, its types and the local pods it selects, from the agent's
//! report, and each isolated pod as the kernel holds it; `flows`: the flows of isolated pods the
//! datapath remembers as allowed, and the policy that allowed each. Reads the pinned maps and the
//! report file, so it works while the agent is down (the report is then as the agent left it).

use std::{net::Ipv4Addr, path::Path};

use ferrox_abi::{POLICY_CT_NOT_ISOLATED, policy_direction, policy_isolation, proto};
use ferrox_datapath::{Maps, PinLayout};
use serde::Serialize;

use super::output::{Output, print_data, print_table};
use crate::policy::report::PolicyReport;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Policies, the local pods each selects, and the isolated pods as the kernel holds them.
    List(super::NodeArgs),
    /// Flows of isolated pods remembered as allowed, with the policy that allowed each.
    Flows(super::NodeArgs),
}

pub fn run(cmd: PolicyCommand, layout: &PinLayout) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::List(a) => list(layout, &a.node_config, a.output),
        PolicyCommand::Flows(a) => flows(layout, &a.node_config, a.output),
    }
}

fn report(node_config: &Path) -> anyhow::Result<PolicyReport> {
    Ok(PolicyReport::read(&PolicyReport::path(node_config))?.unwrap_or_default())
}

/// A local pod the kernel isolates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IsolatedPod {
    pub ip: Ipv4Addr,
    pub pod: Option<String>,
    pub ingress: bool,
    pub egress: bool,
    /// Allowing entries the kernel holds for it.
    pub entries: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyList {
    pub policies: Vec<crate::policy::report::PolicyRow>,
    pub refused: Vec<crate::policy::report::Refused>,
    pub isolated: Vec<IsolatedPod>,
}

fn list(layout: &PinLayout, node_config: &Path, output: Output) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let report = report(node_config)?;
    let entries = maps.policies.entries()?;
    let mut isolated: Vec<IsolatedPod> = maps
        .policy_endpoints
        .entries()?
        .into_iter()
        .map(|(k, v)| {
            let ip = Ipv4Addr::from(k.addr.to_ne_bytes());
            IsolatedPod {
                ip,
                pod: report.local_pods.get(&ip).cloned(),
                ingress: v.isolated & policy_isolation::INGRESS != 0,
                egress: v.isolated & policy_isolation::EGRESS != 0,
                entries: entries
                    .iter()
                    .filter(|(_, key, _)| key.data[0..4] == k.addr.to_ne_bytes())
                    .count(),
            }
        })
        .collect();
    isolated.sort_by_key(|p| p.ip);
    let out = PolicyList {
        policies: report.policies,
        refused: report.refused,
        isolated,
    };
    match output {
        Output::Json | Output::Yaml => print_data(output, &out)?,
        Output::Table => {
            let types = |i: bool, e: bool| match (i, e) {
                (true, true) => "Ingress,Egress",
                (true, false) => "Ingress",
                (false, true) => "Egress",
                (false, false) => "-",
            };
            let rows: Vec<[String; 4]> = out
                .policies
                .iter()
                .map(|p| {
                    [
                        p.id.clone(),
                        types(p.ingress, p.egress).to_owned(),
                        p.selects.join(","),
                        p.unsupported.join("; "),
                    ]
                })
                .chain(out.refused.iter().map(|r| {
                    [
                        r.id.clone(),
                        "refused".into(),
                        String::new(),
                        r.error.clone(),
                    ]
                }))
                .collect();
            print_table(
                ["POLICY", "TYPES", "SELECTS (THIS NODE)", "NOT ENFORCED"],
                &rows,
            );
            println!();
            let rows: Vec<[String; 4]> = out
                .isolated
                .iter()
                .map(|p| {
                    [
                        p.ip.to_string(),
                        p.pod.clone().unwrap_or_default(),
                        types(p.ingress, p.egress).to_owned(),
                        p.entries.to_string(),
                    ]
                })
                .collect();
            print_table(["ISOLATED POD", "NAME", "ISOLATED FOR", "ENTRIES"], &rows);
        }
    }
    Ok(())
}

/// One remembered flow, as its local pod sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyFlow {
    pub proto: String,
    pub pod: String,
    pub peer: String,
    /// The direction its first judged packet went: `ingress` (from the peer: usually the peer
    /// opened it) or `egress` (from the pod). A flow open before its pod was isolated is first
    /// judged by whichever packet comes next.
    pub first: &'static str,
    /// The allowing policy, or `not isolated` (tracked so that its replies pass).
    pub allowed_by: String,
}

fn flows(layout: &PinLayout, node_config: &Path, output: Output) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let report = report(node_config)?;
    let mut rows: Vec<PolicyFlow> = maps
        .policy_ct
        .entries()?
        .into_iter()
        .map(|(k, v)| {
            let addr =
                |a: u32, p: u16| format!("{}:{}", Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p));
            let pod_ip = Ipv4Addr::from(k.pod.to_ne_bytes());
            let pod = match report.local_pods.get(&pod_ip) {
                Some(name) => format!("{} ({name})", addr(k.pod, k.pod_port)),
                None => addr(k.pod, k.pod_port),
            };
            PolicyFlow {
                proto: match k.proto {
                    proto::TCP => "tcp".into(),
                    proto::UDP => "udp".into(),
                    proto::ICMP => "icmp".into(),
                    proto::SCTP => "sctp".into(),
                    n => n.to_string(),
                },
                pod,
                peer: addr(k.peer, k.peer_port),
                first: if k.direction == policy_direction::INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                allowed_by: if v.policy == POLICY_CT_NOT_ISOLATED {
                    "not isolated".into()
                } else {
                    report
                        .policies
                        .iter()
                        .find(|p| p.number == v.policy)
                        .map_or_else(|| format!("policy #{}", v.policy), |p| p.id.clone())
                        + &format!(" rule {}", v.rule)
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.pod, &a.peer).cmp(&(&b.pod, &b.peer)));
    match output {
        Output::Json | Output::Yaml => print_data(output, &rows)?,
        Output::Table => {
            let t: Vec<[String; 5]> = rows
                .iter()
                .map(|f| {
                    [
                        f.proto.clone(),
                        f.pod.clone(),
                        f.peer.clone(),
                        f.first.to_owned(),
                        f.allowed_by.clone(),
                    ]
                })
                .collect();
            print_table(["PROTO", "POD", "PEER", "FIRST SEEN", "ALLOWED BY"], &t);
        }
    }
    Ok(())
}
