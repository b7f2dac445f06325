//! `ferrox trace SRC[:PORT] DST:PORT/PROTO`: what a packet from SRC to DST would meet on this
//! node, explained step by step from the same pinned maps the programs read — which path
//! handles it, its conntrack entry, the frontend it matches, the source-range check, and which
//! backend it goes to and why (affinity, Maglev slot, random choice), with the SNAT it gets.
//! It works while the agent is down.
//!
//! [`explain`] is pure over a [`View`] of the maps; the choices it reports are computed the way
//! the programs compute them (the Maglev slot with [`ferrox_abi::flow_hash`], the same function
//! the kernel calls).

use std::net::{Ipv4Addr, SocketAddrV4};

use ferrox_abi::{
    AffinityKey, AffinityValue, Backend, CtEntry, CtKey, DatapathConfig, MAGLEV_TABLE_SIZE,
    ServiceKey, ServiceValue, affinity_client, backend_flags, ct_flags, proto, scope, svc_flags,
};
use ipnet::Ipv4Net;
use serde::Serialize;

use super::{
    output::{Output, print_data},
    svc::flag_names,
};
use crate::services::reconcile::{addr_be as be, addr_from_be as addr};

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The source address, with its port to predict the Maglev choice (e.g. 198.18.0.200:40000).
    pub src: String,
    /// The destination, e.g. 10.96.0.10:53/udp (tcp when no protocol is given).
    pub dst: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The node configuration the agent wrote (beside it, the NetworkPolicy report that names
    /// the policies).
    #[arg(long, env = "FERROX_NODE_CONFIG", default_value = ferrox_cni::node_config::DEFAULT_PATH)]
    pub node_config: std::path::PathBuf,
}

/// `ferrox trace`: explains the packet from the pinned maps and prints the explanation.
pub fn run(layout: &ferrox_datapath::PinLayout, t: &TraceArgs) -> anyhow::Result<()> {
    let (src, sport) = parse_src(&t.src)?;
    let (dst, dport, l4) = parse_dst(&t.dst)?;
    let view = Pinned::open(layout)?;
    let origin = view.origin_of(src);
    let mut trace = explain(&view, origin, src, sport, dst, dport, l4);
    let report = crate::policy::report::PolicyReport::read(
        &crate::policy::report::PolicyReport::path(&t.node_config),
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    // NetworkPolicy, on the flow as it reaches each possible destination.
    let destinations: Vec<(Ipv4Addr, u16)> = match &trace.verdict {
        Verdict::Translated { backend } => backend
            .parse::<SocketAddrV4>()
            .ok()
            .into_iter()
            .map(|a| (*a.ip(), a.port()))
            .collect(),
        Verdict::OneOf { backends } => backends
            .iter()
            .filter_map(|b| b.parse::<SocketAddrV4>().ok())
            .map(|a| (*a.ip(), a.port()))
            .collect(),
        Verdict::Passed => vec![(dst, dport)],
        Verdict::Dropped { .. } => vec![],
    };
    let protocol = if l4 == proto::TCP {
        crate::policy::model::Protocol::Tcp
    } else {
        crate::policy::model::Protocol::Udp
    };
    for (to, port) in destinations {
        trace.policy.extend(policy_judgements(
            &view.maps, &report, src, to, protocol, port,
        )?);
    }
    print(&trace, t.output)
}

/// One side's NetworkPolicy verdict on a flow, as the kernel's tables give it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyJudgement {
    /// The local pod judged (`address (namespace/name)`).
    pub pod: String,
    /// `egress` (the pod sends) or `ingress` (it receives).
    pub direction: &'static str,
    pub peer: String,
    /// `not isolated`, `allowed by <policy> rule <n>`, or `denied`.
    pub verdict: String,
    pub allowed: bool,
}

/// The judgements of a new flow from `src` to `dst`:`port` (after translation): the sender's
/// egress and the receiver's ingress, for whichever is a local pod some policy isolates.
pub fn policy_judgements(
    maps: &ferrox_datapath::Maps,
    report: &crate::policy::report::PolicyReport,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: crate::policy::model::Protocol,
    port: u16,
) -> anyhow::Result<Vec<PolicyJudgement>> {
    use crate::policy::{model::Direction, tables::table_verdict};
    let node = addr(maps.config.get()?.node_addr);
    let mut out = Vec::new();
    for (pod, peer, dir) in [
        (src, dst, Direction::Egress),
        (dst, src, Direction::Ingress),
    ] {
        if !maps
            .policy_endpoints
            .get(&ferrox_abi::EndpointKey { addr: be(pod) })?
            .is_some()
        {
            continue;
        }
        let name = report
            .local_pods
            .get(&pod)
            .map_or_else(|| pod.to_string(), |n| format!("{pod} ({n})"));
        let (verdict, allowed) = if dir == Direction::Ingress
            && (peer == node || peer.octets() == ferrox_abi::POD_GATEWAY)
        {
            ("allowed: from this node".to_owned(), true)
        } else {
            match table_verdict(maps, pod, dir, peer, protocol, port)? {
                None => ("not isolated".to_owned(), true),
                Some(None) => ("denied: isolated, no policy allows it".to_owned(), false),
                Some(Some(v)) => (
                    format!(
                        "allowed by {} rule {}",
                        report
                            .policies
                            .iter()
                            .find(|p| p.number == v.policy)
                            .map_or_else(|| format!("policy #{}", v.policy), |p| p.id.clone()),
                        v.rule
                    ),
                    true,
                ),
            }
        };
        out.push(PolicyJudgement {
            pod: name,
            direction: if dir == Direction::Egress {
                "egress"
            } else {
                "ingress"
            },
            peer: if dir == Direction::Egress {
                format!("{peer}:{port}")
            } else {
                peer.to_string()
            },
            verdict,
            allowed,
        });
    }
    Ok(out)
}

/// The maps [`explain`] reads.
pub trait View {
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    fn backend(&self, id: u32) -> Option<Backend>;
    /// Whether `ip` is a pod of this node.
    fn is_local_pod(&self, ip: Ipv4Addr) -> bool;
    /// The longest allowed prefix of frontend `rev_nat_id` that contains `src`.
    fn source_range(&self, rev_nat_id: u16, src: Ipv4Addr) -> Option<Ipv4Net>;
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue>;
    /// The backend id of one Maglev slot of frontend `rev_nat_id`; `None` without a table.
    fn maglev(&self, rev_nat_id: u16, slot: u32) -> Option<u32>;
    fn conntrack(&self, key: &CtKey) -> Option<CtEntry>;
    fn config(&self) -> DatapathConfig;
    /// Now, on the programs' clock (CLOCK_MONOTONIC, ns).
    fn now_ns(&self) -> u64;
}

/// Where the packet comes from, which decides the path that handles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A pod of this node: the socket hooks (per connection).
    Pod,
    /// A process of the node itself: the socket hooks.
    Node,
    /// Outside the node: TC on the uplink (per packet, conntrack).
    Outside,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum Step {
    Path {
        origin: Origin,
        hook: &'static str,
    },
    Conntrack {
        entry: String,
        to: String,
    },
    Frontend {
        frontend: String,
        scope: &'static str,
        flags: Vec<&'static str>,
        backends: u16,
    },
    NoService,
    SourceRange {
        allowed_by: Option<Ipv4Net>,
    },
    Affinity {
        backend: String,
        idle_s: u64,
        timeout_s: u32,
    },
    Maglev {
        hash: u32,
        slot: u32,
        backend_id: u32,
    },
    Random {
        candidates: Vec<String>,
    },
    Snat {
        to: Ipv4Addr,
        why: &'static str,
    },
    Deliver {
        backend: String,
        local: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum Verdict {
    /// Sent to this backend.
    Translated { backend: String },
    /// The backend depends on a random draw (socket hooks) or on the source port; any of these.
    OneOf { backends: Vec<String> },
    /// Dropped (packet) or refused (socket), with the counter's reason.
    Dropped { reason: &'static str },
    /// Not a Service: the packet is routed as it is.
    Passed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub src: String,
    pub dst: String,
    pub proto: &'static str,
    pub steps: Vec<Step>,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// NetworkPolicy on the flow as it reaches its destination (empty: no isolated local pod
    /// concerned).
    pub policy: Vec<PolicyJudgement>,
}

fn backend_name(b: &Backend) -> String {
    SocketAddrV4::new(addr(b.addr), u16::from_be(b.port)).to_string()
}

/// Explains a packet from `src` (with `sport` when known) to `dst`:`dport`/`l4` arriving from
/// `origin`.
pub fn explain(
    view: &impl View,
    origin: Origin,
    src: Ipv4Addr,
    sport: Option<u16>,
    dst: Ipv4Addr,
    dport: u16,
    l4: u8,
) -> Trace {
    let mut steps = Vec::new();
    let external = origin == Origin::Outside;
    steps.push(Step::Path {
        origin,
        hook: if external {
            "tc ingress on the uplink (per packet)"
        } else if l4 == proto::UDP {
            "socket hooks: connect4 or sendmsg4 (per connection or datagram)"
        } else {
            "socket hook connect4 (once per connection)"
        },
    });
    let verdict = explain_steps(view, external, src, sport, dst, dport, l4, &mut steps);
    Trace {
        src: match sport {
            Some(p) => format!("{src}:{p}"),
            None => src.to_string(),
        },
        dst: format!("{dst}:{dport}"),
        proto: if l4 == proto::TCP { "tcp" } else { "udp" },
        steps,
        verdict,
        policy: Vec::new(),
    }
}

#[allow(clippy::too_many_arguments, reason = "the tuple, spelled out")]
fn explain_steps(
    view: &impl View,
    external: bool,
    src: Ipv4Addr,
    sport: Option<u16>,
    dst: Ipv4Addr,
    dport: u16,
    l4: u8,
    steps: &mut Vec<Step>,
) -> Verdict {
    // An established external flow is translated from conntrack before anything else.
    if external && let Some(sport) = sport {
        let key = CtKey {
            saddr: be(src),
            daddr: be(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: l4,
            _pad: [0; 3],
        };
        if let Some(e) = view
            .conntrack(&key)
            .filter(|e| e.flags & ct_flags::REPLY == 0)
        {
            let to = SocketAddrV4::new(addr(e.nat_daddr), u16::from_be(e.nat_dport)).to_string();
            steps.push(Step::Conntrack {
                entry: format!(
                    "{}:{} -> {}:{}",
                    addr(e.nat_saddr),
                    u16::from_be(e.nat_sport),
                    addr(e.nat_daddr),
                    u16::from_be(e.nat_dport)
                ),
                to: to.clone(),
            });
            return Verdict::Translated { backend: to };
        }
    }
    let scope_id = if external {
        scope::EXTERNAL
    } else {
        scope::INTERNAL
    };
    let key = ServiceKey::master(be(dst), dport.to_be(), l4).with_scope(scope_id);
    let Some(fe) = view.service(&key) else {
        steps.push(Step::NoService);
        return Verdict::Passed;
    };
    steps.push(Step::Frontend {
        frontend: format!("{dst}:{dport}"),
        scope: if external { "external" } else { "internal" },
        flags: flag_names(fe.flags),
        backends: fe.count,
    });
    if fe.count == 0 {
        return Verdict::Dropped {
            reason: "no-backend",
        };
    }
    if fe.flags & svc_flags::SOURCE_RANGES != 0 {
        let allowed_by = view.source_range(fe.rev_nat_id, src);
        steps.push(Step::SourceRange { allowed_by });
        if allowed_by.is_none() {
            return Verdict::Dropped {
                reason: "source-range-denied",
            };
        }
    }
    let slots: Vec<(u32, Backend)> = (1..=fe.count)
        .filter_map(|s| view.service(&key.with_slot(s)))
        .filter_map(|v| view.backend(v.backend_id).map(|b| (v.backend_id, b)))
        .collect();

    // Session affinity: by client address on the per-packet path; by network namespace at the
    // socket hooks, which an address does not name.
    let mut chosen: Option<(u32, Backend)> = None;
    if fe.flags & svc_flags::AFFINITY != 0 && external {
        let akey = AffinityKey {
            client: u64::from(be(src)),
            rev_nat_id: fe.rev_nat_id,
            client_kind: affinity_client::IPV4,
            _pad: [0; 5],
        };
        if let Some(a) = view.affinity(&akey) {
            let idle = view.now_ns().saturating_sub(a.last_used_ns) / 1_000_000_000;
            if idle <= u64::from(fe.affinity_timeout)
                && let Some(b) = view.backend(a.backend_id)
            {
                steps.push(Step::Affinity {
                    backend: backend_name(&b),
                    idle_s: idle,
                    timeout_s: fe.affinity_timeout,
                });
                chosen = Some((a.backend_id, b));
            }
        }
    }
    if chosen.is_none()
        && external
        && let Some(sport) = sport
    {
        {
            let hash = ferrox_abi::flow_hash(be(src), be(dst), sport.to_be(), dport.to_be(), l4);
            let slot = hash % MAGLEV_TABLE_SIZE;
            if let Some(id) = view.maglev(fe.rev_nat_id, slot) {
                steps.push(Step::Maglev {
                    hash,
                    slot,
                    backend_id: id,
                });
                chosen = view.backend(id).map(|b| (id, b));
            }
        }
    }
    let Some((_, backend)) = chosen else {
        let candidates: Vec<String> = slots.iter().map(|(_, b)| backend_name(b)).collect();
        steps.push(Step::Random {
            candidates: candidates.clone(),
        });
        return Verdict::OneOf {
            backends: candidates,
        };
    };
    let local = backend.flags & backend_flags::LOCAL != 0;
    if external && !local && fe.flags & svc_flags::EXTERNAL_LOCAL == 0 {
        steps.push(Step::Snat {
            to: addr(view.config().node_addr),
            why: "the backend is on another node: its reply must come back through this one",
        });
    }
    steps.push(Step::Deliver {
        backend: backend_name(&backend),
        local: local || view.is_local_pod(addr(backend.addr)),
    });
    Verdict::Translated {
        backend: backend_name(&backend),
    }
}

/// The pinned maps as a [`View`].
pub struct Pinned {
    pub maps: ferrox_datapath::Maps,
    pub maglev: Option<ferrox_datapath::MaglevTables>,
    ranges: Vec<ferrox_datapath::SourceRange>,
}

impl Pinned {
    pub fn open(layout: &ferrox_datapath::PinLayout) -> anyhow::Result<Self> {
        let maps = ferrox_datapath::Maps::open(layout)?;
        let ranges = maps.source_ranges.entries()?;
        Ok(Self {
            maps,
            maglev: ferrox_datapath::MaglevTables::open(layout).ok(),
            ranges,
        })
    }

    /// The origin of `src` as this node sees it.
    pub fn origin_of(&self, src: Ipv4Addr) -> Origin {
        if self.is_local_pod(src) {
            Origin::Pod
        } else if src.is_loopback() || self.config().node_addr == be(src) {
            Origin::Node
        } else {
            Origin::Outside
        }
    }
}

impl View for Pinned {
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.maps.services.get(key).ok().flatten()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.maps.backends.get(&id).ok().flatten()
    }
    fn is_local_pod(&self, ip: Ipv4Addr) -> bool {
        self.maps
            .endpoints
            .get(&ferrox_abi::EndpointKey { addr: be(ip) })
            .ok()
            .flatten()
            .is_some()
    }
    fn source_range(&self, rev_nat_id: u16, src: Ipv4Addr) -> Option<Ipv4Net> {
        self.ranges
            .iter()
            .filter(|r| r.rev_nat_id == rev_nat_id && r.prefix.contains(&src))
            .map(|r| r.prefix)
            .max_by_key(Ipv4Net::prefix_len)
    }
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.maps.affinity.get(key).ok().flatten()
    }
    fn maglev(&self, rev_nat_id: u16, slot: u32) -> Option<u32> {
        let table = self.maglev.as_ref()?.get(rev_nat_id).ok()??;
        table.get(slot as usize).copied()
    }
    fn conntrack(&self, key: &CtKey) -> Option<CtEntry> {
        self.maps.conntrack.get(key).ok().flatten()
    }
    fn config(&self) -> DatapathConfig {
        self.maps.config.get().unwrap_or_default()
    }
    fn now_ns(&self) -> u64 {
        crate::conntrack::monotonic_ns()
    }
}

/// Parses `SRC[:PORT]`.
pub fn parse_src(s: &str) -> anyhow::Result<(Ipv4Addr, Option<u16>)> {
    match s.split_once(':') {
        Some((a, p)) => Ok((a.parse()?, Some(p.parse()?))),
        None => Ok((s.parse()?, None)),
    }
}

/// Parses `DST:PORT/PROTO` (PROTO `tcp` or `udp`, default tcp).
pub fn parse_dst(s: &str) -> anyhow::Result<(Ipv4Addr, u16, u8)> {
    let (rest, l4) = match s.rsplit_once('/') {
        Some((r, "tcp" | "TCP")) => (r, proto::TCP),
        Some((r, "udp" | "UDP")) => (r, proto::UDP),
        Some((_, other)) => anyhow::bail!("protocol {other:?}: tcp or udp"),
        None => (s, proto::TCP),
    };
    let (a, p) = rest
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("{s:?}: expected ADDRESS:PORT/PROTO"))?;
    Ok((a.parse()?, p.parse()?, l4))
}

pub fn print(trace: &Trace, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json | Output::Yaml => print_data(output, trace)?,
        Output::Table => {
            println!("{} -> {}/{}", trace.src, trace.dst, trace.proto);
            for (i, s) in trace.steps.iter().enumerate() {
                println!("  {}. {}", i + 1, describe(s));
            }
            println!(
                "  => {}",
                match &trace.verdict {
                    Verdict::Translated { backend } => format!("to {backend}"),
                    Verdict::OneOf { backends } => format!("to one of {}", backends.join(", ")),
                    Verdict::Dropped { reason } => format!("dropped ({reason})"),
                    Verdict::Passed => "passed untranslated (routed as is)".into(),
                }
            );
            for j in &trace.policy {
                println!(
                    "  policy: {} {} {}: {}",
                    j.pod, j.direction, j.peer, j.verdict
                );
            }
        }
    }
    Ok(())
}

fn describe(s: &Step) -> String {
    match s {
        Step::Path { origin, hook } => format!("from {origin:?}: handled by the {hook}"),
        Step::Conntrack { entry, .. } => format!("established flow: conntrack rewrites it {entry}"),
        Step::Frontend {
            frontend,
            scope,
            flags,
            backends,
        } => format!(
            "matches frontend {frontend} ({scope} scope; {}) with {backends} backends",
            flags.join(", ")
        ),
        Step::NoService => "no Service has this address and port".into(),
        Step::SourceRange { allowed_by } => match allowed_by {
            Some(p) => format!("loadBalancerSourceRanges: allowed by {p}"),
            None => "loadBalancerSourceRanges: the source is in none of them".into(),
        },
        Step::Affinity {
            backend,
            idle_s,
            timeout_s,
        } => format!("session affinity: pinned to {backend} (idle {idle_s}s of {timeout_s}s)"),
        Step::Maglev {
            hash,
            slot,
            backend_id,
        } => format!("Maglev: flow hash {hash:#010x}, slot {slot}, backend id {backend_id}"),
        Step::Random { candidates } => format!(
            "a random backend per new connection, among {}",
            candidates.join(", ")
        ),
        Step::Snat { to, why } => format!("source rewritten to {to}: {why}"),
        Step::Deliver { backend, local } => format!(
            "delivered to {backend} ({})",
            if *local {
                "a pod of this node"
            } else {
                "on another node"
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "tests: a failure should stop the test with its context"
    )]

    use std::collections::BTreeMap;

    use super::*;

    #[derive(Default)]
    struct Fake {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        ranges: Vec<(u16, Ipv4Net)>,
        affinity: BTreeMap<AffinityKey, AffinityValue>,
        maglev: BTreeMap<u16, Vec<u32>>,
    }

    impl View for Fake {
        fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
            self.services.get(key).copied()
        }
        fn backend(&self, id: u32) -> Option<Backend> {
            self.backends.get(&id).copied()
        }
        fn is_local_pod(&self, _: Ipv4Addr) -> bool {
            false
        }
        fn source_range(&self, rev: u16, src: Ipv4Addr) -> Option<Ipv4Net> {
            self.ranges
                .iter()
                .filter(|(r, p)| *r == rev && p.contains(&src))
                .map(|(_, p)| *p)
                .max_by_key(Ipv4Net::prefix_len)
        }
        fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
            self.affinity.get(key).copied()
        }
        fn maglev(&self, rev: u16, slot: u32) -> Option<u32> {
            self.maglev.get(&rev).map(|t| t[slot as usize])
        }
        fn conntrack(&self, _: &CtKey) -> Option<CtEntry> {
            None
        }
        fn config(&self) -> DatapathConfig {
            DatapathConfig {
                node_addr: be("198.18.0.11".parse().unwrap()),
                ..Default::default()
            }
        }
        fn now_ns(&self) -> u64 {
            100_000_000_000
        }
    }

    const LB: &str = "203.0.113.9";

    fn fake(flags: u16) -> Fake {
        let mut f = Fake::default();
        let key = ServiceKey::master(be(LB.parse().unwrap()), 80u16.to_be(), proto::TCP)
            .with_scope(scope::EXTERNAL);
        f.services.insert(
            key,
            ServiceValue {
                count: 2,
                rev_nat_id: 7,
                flags: svc_flags::LOAD_BALANCER | flags,
                affinity_timeout: 60,
                ..Default::default()
            },
        );
        for (slot, id, ip) in [(1, 11, "10.244.2.5"), (2, 12, "10.244.2.6")] {
            f.services.insert(
                key.with_slot(slot),
                ServiceValue {
                    backend_id: id,
                    ..Default::default()
                },
            );
            f.backends.insert(
                id,
                Backend {
                    addr: be(ip.parse().unwrap()),
                    port: 8080u16.to_be(),
                    proto: proto::TCP,
                    flags: 0,
                },
            );
        }
        // Slots alternate between the two backends.
        f.maglev.insert(
            7,
            (0..MAGLEV_TABLE_SIZE)
                .map(|i| if i % 2 == 0 { 11 } else { 12 })
                .collect(),
        );
        f
    }

    fn trace(f: &Fake, src: &str, sport: Option<u16>) -> Trace {
        explain(
            f,
            Origin::Outside,
            src.parse().unwrap(),
            sport,
            LB.parse().unwrap(),
            80,
            proto::TCP,
        )
    }

    #[test]
    fn maglev_picks_the_slot_the_kernel_would() {
        let f = fake(0);
        let t = trace(&f, "198.18.0.200", Some(40000));
        let hash = ferrox_abi::flow_hash(
            be("198.18.0.200".parse().unwrap()),
            be(LB.parse().unwrap()),
            40000u16.to_be(),
            80u16.to_be(),
            proto::TCP,
        );
        let want = if (hash % MAGLEV_TABLE_SIZE).is_multiple_of(2) {
            "10.244.2.5:8080"
        } else {
            "10.244.2.6:8080"
        };
        assert_eq!(
            t.verdict,
            Verdict::Translated {
                backend: want.into()
            }
        );
        assert!(t.steps.iter().any(|s| matches!(s, Step::Snat { .. })));
        // Without a source port, any of them.
        let t = trace(&f, "198.18.0.200", None);
        assert!(matches!(t.verdict, Verdict::OneOf { ref backends } if backends.len() == 2));
    }

    #[test]
    fn source_ranges_and_affinity_decide_before_maglev() {
        let mut f = fake(svc_flags::SOURCE_RANGES | svc_flags::AFFINITY);
        f.ranges.push((7, "198.51.100.0/24".parse().unwrap()));
        let t = trace(&f, "198.18.0.200", Some(1));
        assert_eq!(
            t.verdict,
            Verdict::Dropped {
                reason: "source-range-denied"
            }
        );
        f.affinity.insert(
            AffinityKey {
                client: u64::from(be("198.51.100.7".parse().unwrap())),
                rev_nat_id: 7,
                client_kind: affinity_client::IPV4,
                _pad: [0; 5],
            },
            AffinityValue {
                backend_id: 12,
                _pad: 0,
                last_used_ns: 90_000_000_000,
            },
        );
        let t = trace(&f, "198.51.100.7", Some(1));
        assert_eq!(
            t.verdict,
            Verdict::Translated {
                backend: "10.244.2.6:8080".into()
            }
        );
        assert!(
            t.steps
                .iter()
                .any(|s| matches!(s, Step::Affinity { idle_s: 10, .. }))
        );
        // Not a Service.
        let t = explain(
            &f,
            Origin::Outside,
            "198.18.0.200".parse().unwrap(),
            None,
            "198.18.0.11".parse().unwrap(),
            22,
            proto::TCP,
        );
        assert_eq!(t.verdict, Verdict::Passed);
    }
}
