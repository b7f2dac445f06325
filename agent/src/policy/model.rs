//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) as plain data, and the reference verdict:
//! whether a pod may receive from, or send to, a peer on a protocol and port, and which policy
//! and rule allow it. The datapath's tables are compiled from this model, and the tests check
//! the datapath's verdicts against this one.
//!
//! Semantics, as upstream defines them:
//! - A pod is isolated for a direction when at least one policy of that type selects it (a
//!   policy selects the pods of its own namespace that its `podSelector` matches; an empty
//!   selector matches them all). A pod no policy of a type selects allows everything in that
//!   direction.
//! - `policyTypes` absent: `Ingress`, plus `Egress` when the policy has egress rules.
//! - An isolated pod allows what the union of the selecting policies' rules allows. A rule with
//!   no peers allows every peer; one with no ports allows every port and protocol.
//! - A peer with only `podSelector` means pods of the policy's namespace; with only
//!   `namespaceSelector`, every pod of the matching namespaces; with both, the matching pods of
//!   the matching namespaces; `ipBlock`, the addresses in its CIDR but outside its `except`s
//!   (whether pod or not).
//! - A port without protocol is TCP; a numbered port with `endPort` is the range; a named port is
//!   resolved on the destination pod (the selected pod for ingress, the peer pod for egress):
//!   the container port of that name and protocol; it never matches a peer that is not a pod.
//! - Traffic between two pods must be allowed by the egress side of the sender and the ingress
//!   side of the receiver.
//!
//! What the datapath cannot enforce is reported, never silently allowed: IPv6 blocks (the
//! datapath is IPv4: they match nothing). SCTP ports sit where TCP's and UDP's do, and are
//! enforced like them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
        NetworkPolicyPort,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

pub type Labels = BTreeMap<String, String>;

/// A label selector: every `match_labels` pair and every expression must hold (an empty
/// selector matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expression {
    pub key: String,
    pub op: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match &e.op {
                    Operator::In(set) => value.is_some_and(|v| set.contains(v)),
                    // As upstream: a pod without the key is not "in" any set, so it matches.
                    Operator::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    fn from_api(s: &LabelSelector) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for e in s.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "selector {} {}: the operator needs values",
                        e.key, e.operator
                    ));
                }
                "In" => Operator::In(values),
                "NotIn" => Operator::NotIn(values),
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => return Err(format!("selector {}: unknown operator {other:?}", e.key)),
            };
            expressions.push(Expression {
                key: e.key.clone(),
                op,
            });
        }
        Ok(Self {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// Which ports of a protocol a rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port.
    Any,
    /// `first..=last` (one port: `first == last`).
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods: of the namespaces `namespaces` matches (`None`: the policy's own namespace) that
    /// `pods` matches (`None`: all of them).
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` outside every `except`.
    Block { cidr: Ipv4Net, except: Vec<Ipv4Net> },
    /// A block the IPv4 datapath cannot match (IPv6): matches nothing, reported.
    Unmatchable,
}

/// One ingress or egress rule: `peers` empty allows every peer, `ports` empty every port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<Port>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// A NetworkPolicy as enforced. `ingress`/`egress`: `None` when the policy is not of that type;
/// `Some(rules)` when it is (no rules: it isolates and allows nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selects: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// What of the policy the datapath cannot enforce (each also makes a rule allow less, never
    /// more).
    pub unsupported: Vec<String>,
}

impl Policy {
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The policy as the API gives it; an error for what the API server would have refused
    /// (so nothing of such a policy is half-enforced).
    pub fn from_api(np: &NetworkPolicy) -> Result<Self, String> {
        let namespace = np.metadata.namespace.clone().unwrap_or_default();
        let name = np.metadata.name.clone().unwrap_or_default();
        let spec = np.spec.clone().unwrap_or_default();
        let selects = Selector::from_api(&spec.pod_selector.unwrap_or_default())?;
        let (is_ingress, is_egress) = match &spec.policy_types {
            Some(types) => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        return Err(format!("unknown policy type {t:?}"));
                    }
                }
                (
                    types.iter().any(|t| t == "Ingress"),
                    types.iter().any(|t| t == "Egress"),
                )
            }
            None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };
        let mut unsupported = Vec::new();
        let ingress = if is_ingress {
            let rules = spec
                .ingress
                .iter()
                .flatten()
                .map(|r: &NetworkPolicyIngressRule| {
                    rule(r.from.as_deref(), r.ports.as_deref(), &mut unsupported)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(rules)
        } else {
            None
        };
        let egress = if is_egress {
            let rules = spec
                .egress
                .iter()
                .flatten()
                .map(|r: &NetworkPolicyEgressRule| {
                    rule(r.to.as_deref(), r.ports.as_deref(), &mut unsupported)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(rules)
        } else {
            None
        };
        Ok(Self {
            namespace,
            name,
            selects,
            ingress,
            egress,
            unsupported,
        })
    }
}

fn rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    unsupported: &mut Vec<String>,
) -> Result<Rule, String> {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .map(|p| peer(p, unsupported))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = ports
        .unwrap_or_default()
        .iter()
        .map(port)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule { peers, ports })
}

fn peer(p: &NetworkPolicyPeer, unsupported: &mut Vec<String>) -> Result<Peer, String> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("a peer with ipBlock cannot have selectors too".into());
        }
        let cidr: IpNet = block
            .cidr
            .parse()
            .map_err(|e| format!("ipBlock cidr {:?}: {e}", block.cidr))?;
        let IpNet::V4(cidr) = cidr else {
            unsupported.push(format!(
                "ipBlock {cidr}: IPv6 (the datapath is IPv4; the block matches nothing)"
            ));
            return Ok(Peer::Unmatchable);
        };
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            let net: IpNet = e
                .parse()
                .map_err(|err| format!("ipBlock except {e:?}: {err}"))?;
            let IpNet::V4(net) = net else {
                return Err(format!("ipBlock except {net} is not IPv4 like {cidr}"));
            };
            if !cidr.contains(&net) {
                return Err(format!("ipBlock except {net} is outside {cidr}"));
            }
            except.push(net.trunc());
        }
        return Ok(Peer::Block {
            cidr: cidr.trunc(),
            except,
        });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err("a peer needs podSelector, namespaceSelector or ipBlock".into());
    }
    Ok(Peer::Pods {
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
        pods: p
            .pod_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
    })
}

fn port(p: &NetworkPolicyPort) -> Result<Port, String> {
    let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
    let number = |v: i32| -> Result<u16, String> {
        u16::try_from(v)
            .ok()
            .filter(|n| *n != 0)
            .ok_or(format!("port {v} is not in 1-65535"))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::Int(n)), None) => {
            let n = number(*n)?;
            PortMatch::Range(n, n)
        }
        (Some(IntOrString::Int(n)), Some(end)) => {
            let (n, end) = (number(*n)?, number(end)?);
            if end < n {
                return Err(format!("endPort {end} is below port {n}"));
            }
            PortMatch::Range(n, end)
        }
        (Some(IntOrString::String(name)), None) => PortMatch::Named(name.clone()),
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err("endPort needs a numbered port".into());
        }
    };
    Ok(Port { protocol, port })
}

/// What the verdict needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    /// Named container ports: (name, protocol, number).
    pub named_ports: Vec<(String, Protocol, u16)>,
}

impl PodInfo {
    fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, port)| *port)
    }
}

/// The cluster as policy sees it: every pod, every namespace's labels, every policy.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub pods: Vec<PodInfo>,
    pub namespaces: BTreeMap<String, Labels>,
    pub policies: Vec<Policy>,
}

/// The verdict for one direction of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No policy of this direction selects the pod.
    NotIsolated,
    /// Allowed by this policy's rule (index among the direction's rules).
    Allowed { policy: String, rule: usize },
    /// Isolated, and no rule allows it.
    Denied,
}

impl Verdict {
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied)
    }
}

impl World {
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }

    /// Whether `peer` (an address, and the pod that has it if any) is one of `rule`'s peers of
    /// `policy`.
    pub fn peer_matches(
        &self,
        policy: &Policy,
        p: &Peer,
        addr: Ipv4Addr,
        pod: Option<&PodInfo>,
    ) -> bool {
        match p {
            Peer::Block { cidr, except } => {
                cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
            }
            Peer::Unmatchable => false,
            Peer::Pods { namespaces, pods } => {
                let Some(pod) = pod else {
                    return false;
                };
                let ns_ok = match namespaces {
                    None => pod.namespace == policy.namespace,
                    Some(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&pod.labels))
            }
        }
    }

    /// The verdict for `pod` receiving from (`Ingress`) or sending to (`Egress`) the peer at
    /// `peer` (a pod, when `peer_pod` is given) on `protocol` and port `port` (the destination
    /// port: the pod's own for ingress, the peer's for egress).
    pub fn verdict(
        &self,
        pod: &PodInfo,
        dir: Direction,
        peer: Ipv4Addr,
        peer_pod: Option<&PodInfo>,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let mut isolated = false;
        // The destination pod, on which named ports are resolved.
        let destination = match dir {
            Direction::Ingress => Some(pod),
            Direction::Egress => peer_pod,
        };
        for policy in self
            .policies
            .iter()
            .filter(|p| p.namespace == pod.namespace && p.selects.matches(&pod.labels))
        {
            let Some(rules) = policy.rules(dir) else {
                continue;
            };
            isolated = true;
            for (i, rule) in rules.iter().enumerate() {
                let peer_ok = rule.peers.is_empty()
                    || rule
                        .peers
                        .iter()
                        .any(|p| self.peer_matches(policy, p, peer, peer_pod));
                let port_ok = rule.ports.is_empty()
                    || rule.ports.iter().any(|p| {
                        p.protocol == protocol
                            && match &p.port {
                                PortMatch::Any => true,
                                PortMatch::Range(a, b) => (*a..=*b).contains(&port),
                                PortMatch::Named(name) => {
                                    destination.and_then(|d| d.named_port(name, protocol))
                                        == Some(port)
                                }
                            }
                    });
                if peer_ok && port_ok {
                    return Verdict::Allowed {
                        policy: policy.id(),
                        rule: i,
                    };
                }
            }
        }
        if isolated {
            Verdict::Denied
        } else {
            Verdict::NotIsolated
        }
    }

    /// Whether `from` may reach `to` (pods) on `protocol`/`port`: the sender's egress and the
    /// receiver's ingress must both allow it.
    pub fn pod_to_pod(&self, from: &PodInfo, to: &PodInfo, protocol: Protocol, port: u16) -> bool {
        self.verdict(from, Direction::Egress, to.ip, Some(to), protocol, port)
            .allows()
            && self
                .verdict(to, Direction::Ingress, from.ip, Some(from), protocol, port)
                .allows()
    }
}

#[cfg(test)]
mod tests;
