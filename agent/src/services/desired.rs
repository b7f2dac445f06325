//! The pure function from API objects to the desired service table. It performs no I/O and
//! keeps no state: same objects in, same table out. Every rule kube-proxy applies to choose
//! frontends and backends lives here, with its tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};

use super::model::{
    BackendAddr, Desired, Frontend, FrontendKey, FrontendKind, FrontendSpec, HealthCheck, NodeInfo,
    Proto, ProxyOptions, Scope, ServiceRef, SkipReason, Skipped,
};

/// The label by which a Service asks to be handled by another proxy.
pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// The label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation that turns on topology-aware routing (older than trafficDistribution).
pub const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// kube-proxy's default sessionAffinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Computes the desired service table from every Service and EndpointSlice the agent sees.
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    options: &ProxyOptions,
) -> Desired {
    let slices_by_service = index_slices(slices);
    let nodeport_addrs = nodeport_addresses(node, options);
    let mut out = Desired::default();
    for svc in services {
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let skip = |reason| Skipped {
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        };
        let Some(spec) = &svc.spec else { continue };

        if let Some(proxy) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME))
        {
            out.skipped.push(skip(SkipReason::OtherProxy {
                proxy: proxy.clone(),
            }));
            continue;
        }
        if spec.type_.as_deref() == Some("ExternalName") {
            out.skipped.push(skip(SkipReason::ExternalName));
            continue;
        }
        let cluster_ip = match cluster_ipv4(spec) {
            Ok(Some(ip)) => ip,
            Ok(None) => continue, // not allocated yet
            Err(reason) => {
                out.skipped.push(skip(reason));
                continue;
            }
        };

        let slices = slices_by_service
            .get(&(namespace.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let policy = Policy::of(svc, spec, node);
        let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
        let nodeports_served = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let mut external_ips = Vec::new();
        for ip in spec.external_ips.iter().flatten() {
            match ip.parse::<Ipv4Addr>() {
                Ok(a) => external_ips.push(a),
                Err(_) => out.skipped.push(skip(SkipReason::Invalid {
                    detail: format!("externalIP {ip:?} is not an IPv4 address"),
                })),
            }
        }
        // LoadBalancer ingress IPs; with ipMode Proxy the load balancer must see the traffic, so
        // this node does not short-circuit its own clients to the backends.
        let mut lb_ips = Vec::new();
        if is_lb {
            for ing in svc
                .status
                .iter()
                .flat_map(|s| s.load_balancer.iter())
                .flat_map(|lb| lb.ingress.iter().flatten())
            {
                if let Some(Ok(a)) = ing.ip.as_deref().map(str::parse::<Ipv4Addr>) {
                    lb_ips.push((a, ing.ip_mode.as_deref() != Some("Proxy")));
                }
            }
        }
        let source_ranges: Vec<Ipv4Net> = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .filter_map(|r| r.trim().parse().ok())
            .collect();

        let mut local_endpoints = BTreeSet::new();
        for port in spec.ports.iter().flatten() {
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                other => {
                    out.skipped.push(skip(SkipReason::UnsupportedProtocol {
                        port: port.port,
                        protocol: other.to_owned(),
                    }));
                    continue;
                }
            };
            let Ok(svc_port) = u16::try_from(port.port) else {
                out.skipped.push(skip(SkipReason::Invalid {
                    detail: format!("port {} out of range", port.port),
                }));
                continue;
            };
            let service = ServiceRef {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port.name.clone().unwrap_or_default(),
            };
            let all = endpoints_for(port, proto, slices, &node.name);
            // Load balancers probing the healthCheckNodePort see only ready local endpoints:
            // a node whose local endpoints all terminate drains (KEP-1669).
            local_endpoints.extend(
                all.iter()
                    .filter(|e| e.backend.local && !e.backend.terminating)
                    .map(|e| e.backend.addr),
            );
            // Each policy's set falls back to its own serving-terminating endpoints when it has
            // no ready one (KEP-1669): the cluster-wide set, and the node-local set.
            let eps = usable(all.iter());
            let cluster = policy.topology(&eps);
            let local: Vec<BackendAddr> = usable(all.iter().filter(|e| e.backend.local))
                .into_iter()
                .map(|e| e.backend)
                .collect();
            let base = FrontendSpec {
                kind: FrontendKind::ClusterIp,
                service,
                backends: Vec::new(),
                affinity_timeout: policy.affinity_timeout,
                external_local: false,
                internal_local: false,
                source_ranges: Vec::new(),
            };
            let mut add = |kind: FrontendKind,
                           addr: Ipv4Addr,
                           fport: u16,
                           scope: Scope,
                           backends: &[BackendAddr]| {
                let mut spec = FrontendSpec {
                    kind,
                    backends: backends.to_vec(),
                    ..base.clone()
                };
                match (kind, scope) {
                    (FrontendKind::ClusterIp, _) => spec.internal_local = policy.internal_local,
                    (_, Scope::External) => spec.external_local = policy.external_local,
                    (_, Scope::Internal) => {}
                }
                if kind == FrontendKind::LoadBalancer && scope == Scope::External {
                    spec.source_ranges = source_ranges.clone();
                }
                let key = FrontendKey {
                    frontend: Frontend {
                        addr,
                        port: fport,
                        proto,
                    },
                    scope,
                };
                out.frontends.insert(key, spec);
            };

            // ClusterIP: traffic from this node only; internalTrafficPolicy applies.
            let internal = if policy.internal_local {
                &local
            } else {
                &cluster
            };
            add(
                FrontendKind::ClusterIp,
                cluster_ip,
                svc_port,
                Scope::Internal,
                internal,
            );

            // The external frontends: from this node they use every (topology-preferred)
            // endpoint, as kube-proxy does for pods reaching a NodePort or a load balancer;
            // from outside, externalTrafficPolicy Local keeps the traffic on this node.
            let external = if policy.external_local {
                &local
            } else {
                &cluster
            };
            if nodeports_served
                && let Some(node_port) = port
                    .node_port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
            {
                for a in &nodeport_addrs {
                    add(
                        FrontendKind::NodePort,
                        *a,
                        node_port,
                        Scope::Internal,
                        &cluster,
                    );
                    if !a.is_loopback() {
                        add(
                            FrontendKind::NodePort,
                            *a,
                            node_port,
                            Scope::External,
                            external,
                        );
                    }
                }
            }
            for a in &external_ips {
                add(
                    FrontendKind::ExternalIp,
                    *a,
                    svc_port,
                    Scope::Internal,
                    &cluster,
                );
                add(
                    FrontendKind::ExternalIp,
                    *a,
                    svc_port,
                    Scope::External,
                    external,
                );
            }
            for (a, local_short_circuit) in &lb_ips {
                if *local_short_circuit {
                    add(
                        FrontendKind::LoadBalancer,
                        *a,
                        svc_port,
                        Scope::Internal,
                        &cluster,
                    );
                }
                add(
                    FrontendKind::LoadBalancer,
                    *a,
                    svc_port,
                    Scope::External,
                    external,
                );
            }
        }
        if is_lb
            && policy.external_local
            && let Some(hc) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
        {
            out.health_checks.insert(
                hc,
                HealthCheck {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    local_endpoints: local_endpoints.len(),
                },
            );
        }
    }
    out
}

/// The addresses NodePorts are served on: the Node's addresses and loopback, narrowed to
/// `--nodeport-addresses` when given.
pub fn nodeport_addresses(node: &NodeInfo, options: &ProxyOptions) -> Vec<Ipv4Addr> {
    let mut all: BTreeSet<Ipv4Addr> = node.addresses.iter().copied().collect();
    all.insert(Ipv4Addr::LOCALHOST);
    all.into_iter()
        .filter(|a| {
            options.nodeport_addresses.is_empty()
                || options.nodeport_addresses.iter().any(|n| n.contains(a))
        })
        .collect()
}

/// The Service's IPv4 cluster IP: `Ok(None)` while it has none, an error for headless, IPv6-only
/// and invalid ones.
fn cluster_ipv4(spec: &ServiceSpec) -> Result<Option<Ipv4Addr>, SkipReason> {
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => return Ok(None),
    };
    if ips.contains(&"None") {
        return Err(SkipReason::Headless);
    }
    let mut v4 = None;
    for ip in &ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => {
                v4.get_or_insert(a);
            }
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(SkipReason::Invalid {
                    detail: format!("cluster IP {ip:?} is not an IP address"),
                });
            }
        }
    }
    v4.map(Some).ok_or(SkipReason::NoIpv4ClusterIp)
}

/// The per-Service settings that shape backend selection.
struct Policy<'a> {
    node: &'a NodeInfo,
    internal_local: bool,
    external_local: bool,
    affinity_timeout: Option<u32>,
    /// trafficDistribution (or the topology annotation) asks for topology-aware routing.
    topology: Option<Topology>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    SameZone,
    SameNode,
}

impl<'a> Policy<'a> {
    fn of(svc: &Service, spec: &ServiceSpec, node: &'a NodeInfo) -> Self {
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let annotated = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TOPOLOGY_MODE))
            .is_some_and(|m| m.eq_ignore_ascii_case("auto"));
        let topology = match spec.traffic_distribution.as_deref() {
            Some("PreferSameNode") => Some(Topology::SameNode),
            Some("PreferClose" | "PreferSameZone") => Some(Topology::SameZone),
            _ if annotated => Some(Topology::SameZone),
            _ => None,
        };
        Self {
            node,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout,
            topology,
        }
    }

    /// The endpoints cluster-wide traffic uses: topology-preferred ones when the Service asks
    /// for it and the hints allow (every endpoint has hints, and some name this node or its
    /// zone), otherwise all of them.
    fn topology(&self, eps: &[Ep<'_>]) -> Vec<BackendAddr> {
        let all = || eps.iter().map(|e| e.backend).collect();
        let Some(mode) = self.topology else {
            return all();
        };
        let hinted: Vec<_> = eps
            .iter()
            .filter_map(|e| e.endpoint.hints.as_ref().map(|h| (e.backend, h)))
            .collect();
        if hinted.len() != eps.len() || eps.is_empty() {
            return all();
        }
        if mode == Topology::SameNode {
            let same_node: Vec<BackendAddr> = hinted
                .iter()
                .filter(|(_, h)| {
                    h.for_nodes
                        .iter()
                        .flatten()
                        .any(|n| n.name == self.node.name)
                })
                .map(|(b, _)| *b)
                .collect();
            if !same_node.is_empty() {
                return same_node;
            }
        }
        if let Some(zone) = &self.node.zone {
            let same_zone: Vec<BackendAddr> = hinted
                .iter()
                .filter(|(_, h)| h.for_zones.iter().flatten().any(|z| &z.name == zone))
                .map(|(b, _)| *b)
                .collect();
            if !same_zone.is_empty() {
                return same_zone;
            }
        }
        all()
    }
}

/// EndpointSlices grouped by (namespace, service name).
fn index_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        by_service
            .entry((ns, svc.as_str()))
            .or_default()
            .push(slice);
    }
    by_service
}

/// Ready: absent `ready` means ready (the API's documented default).
fn is_ready(ep: &Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

/// Terminating but still serving: usable only when nothing is ready. An absent `serving`
/// defers to `ready` (the API's documented meaning), and an absent `ready` means ready.
fn is_serving_terminating(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    let serving = c.and_then(|c| c.serving.or(c.ready)).unwrap_or(true);
    serving && c.and_then(|c| c.terminating).unwrap_or(false)
}

/// A usable endpoint address with the endpoint it came from (for its hints).
#[derive(Clone, Copy)]
struct Ep<'a> {
    backend: BackendAddr,
    endpoint: &'a Endpoint,
}

/// The endpoints of a set that take new connections: its ready ones, or, when none is ready,
/// its terminating endpoints that are still serving (so that rolling updates drain cleanly).
fn usable<'e, 'a: 'e>(eps: impl Iterator<Item = &'e Ep<'a>>) -> Vec<Ep<'a>> {
    let eps: Vec<Ep<'a>> = eps.copied().collect();
    if eps.iter().any(|e| !e.backend.terminating) {
        eps.into_iter().filter(|e| !e.backend.terminating).collect()
    } else {
        eps
    }
}

/// The endpoints of one Service port that may serve: ready ones and terminating ones that are
/// still serving (marked `terminating`); [`usable`] chooses among them per policy set. Sorted,
/// without duplicates (an endpoint in two slices at once, as during a controller's update,
/// counts once; ready wins).
fn endpoints_for<'a>(
    port: &ServicePort,
    proto: Proto,
    slices: &[&'a EndpointSlice],
    node: &str,
) -> Vec<Ep<'a>> {
    let want_name = port.name.as_deref().unwrap_or_default();
    let mut ready = BTreeMap::new();
    let mut terminating = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == want_name
                && p.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
        }) else {
            continue;
        };
        let Some(target_port) = target
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let (set, term) = if is_ready(ep) {
                (&mut ready, false)
            } else if is_serving_terminating(ep) {
                (&mut terminating, true)
            } else {
                continue;
            };
            let local = ep.node_name.as_deref() == Some(node);
            for addr in ep
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
            {
                let backend = BackendAddr {
                    addr,
                    port: target_port,
                    proto,
                    terminating: term,
                    local,
                };
                set.entry((addr, target_port)).or_insert(Ep {
                    backend,
                    endpoint: ep,
                });
            }
        }
    }
    for (k, ep) in terminating {
        ready.entry(k).or_insert(ep);
    }
    ready.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{slice, svc};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            zone: Some("zone-a".into()),
        }
    }

    fn run<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Desired {
        desired(services, slices, &node(), &ProxyOptions::default())
    }

    fn key(ip: &str, port: u16, proto: Proto, scope: Scope) -> FrontendKey {
        FrontendKey {
            frontend: Frontend {
                addr: ip.parse().unwrap(),
                port,
                proto,
            },
            scope,
        }
    }

    fn int(ip: &str, port: u16) -> FrontendKey {
        key(ip, port, Proto::Tcp, Scope::Internal)
    }

    fn ext(ip: &str, port: u16) -> FrontendKey {
        key(ip, port, Proto::Tcp, Scope::External)
    }

    fn addrs(spec: &FrontendSpec) -> Vec<String> {
        spec.backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    fn keys(d: &Desired) -> Vec<String> {
        d.frontends.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn cluster_ip_with_ready_endpoints() {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .build();
        let sl = slice("web", "web-abc")
            .port("http", 8080, "TCP")
            .ready("10.244.1.5")
            .ready("10.244.2.7")
            .build();
        let d = run([&s], [&sl]);
        let spec = &d.frontends[&int("10.96.0.10", 80)];
        assert_eq!(addrs(spec), ["10.244.1.5:8080", "10.244.2.7:8080"]);
        assert_eq!(spec.service.to_string(), "default/web:http");
        assert_eq!(
            keys(&d),
            ["10.96.0.10:80/TCP"],
            "a ClusterIP is served to this node only"
        );
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn not_ready_endpoints_are_left_out() {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .build();
        let sl = slice("web", "a")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .not_ready("10.244.1.6")
            .build();
        let d = run([&s], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.10", 80)]),
            ["10.244.1.5:8080"]
        );
    }

    #[test]
    fn terminating_serving_endpoints_only_when_nothing_is_ready() {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .build();
        let draining = slice("web", "a")
            .port("", 8080, "TCP")
            .terminating_serving("10.244.1.5")
            .build();
        let d = run([&s], [&draining]);
        let spec = &d.frontends[&int("10.96.0.10", 80)];
        assert_eq!(addrs(spec), ["10.244.1.5:8080"]);
        assert!(spec.backends[0].terminating);

        let with_ready = slice("web", "b")
            .port("", 8080, "TCP")
            .ready("10.244.2.2")
            .build();
        let d = run([&s], [&draining, &with_ready]);
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.10", 80)]),
            ["10.244.2.2:8080"]
        );
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let s = svc("dns")
            .cluster_ip("10.96.0.53")
            .port("dns", 53, "UDP")
            .port("dns-tcp", 53, "TCP")
            .build();
        let sl = slice("dns", "a")
            .port("dns", 5353, "UDP")
            .port("dns-tcp", 5354, "TCP")
            .ready("10.244.1.9")
            .build();
        let d = run([&s], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&key("10.96.0.53", 53, Proto::Udp, Scope::Internal)]),
            ["10.244.1.9:5353"]
        );
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.53", 53)]),
            ["10.244.1.9:5354"]
        );
    }

    #[test]
    fn endpoints_from_several_slices_merge_without_duplicates() {
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .build();
        let a = slice("web", "a")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .build();
        let b = slice("web", "b")
            .port("", 8080, "TCP")
            .ready("10.244.1.5")
            .ready("10.244.3.3")
            .build();
        let other = slice("api", "c")
            .port("", 8080, "TCP")
            .ready("10.244.9.9")
            .build();
        let d = run([&s], [&a, &b, &other]);
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.10", 80)]),
            ["10.244.1.5:8080", "10.244.3.3:8080"]
        );
    }

    #[test]
    fn a_service_without_endpoints_still_has_its_frontend() {
        // Connections must be refused (no backend), not sent on to nowhere.
        let s = svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .build();
        let d = run([&s], []);
        assert!(d.frontends[&int("10.96.0.10", 80)].backends.is_empty());
    }

    #[test]
    fn skipped_services_are_reported_with_their_reason() {
        let headless = svc("h").cluster_ip("None").port("", 80, "TCP").build();
        let external = svc("e").external_name("example.org").build();
        let other = svc("o")
            .cluster_ip("10.96.0.11")
            .label(SERVICE_PROXY_NAME, "other")
            .port("", 80, "TCP")
            .build();
        let sctp = svc("s")
            .cluster_ip("10.96.0.12")
            .port("", 80, "SCTP")
            .port("web", 81, "TCP")
            .build();
        let v6 = svc("six").cluster_ip("fd00::1").port("", 80, "TCP").build();
        let d = run([&headless, &external, &other, &sctp, &v6], []);
        let reasons: Vec<_> = d
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("h", SkipReason::Headless),
                ("e", SkipReason::ExternalName),
                (
                    "o",
                    SkipReason::OtherProxy {
                        proxy: "other".into()
                    }
                ),
                (
                    "s",
                    SkipReason::UnsupportedProtocol {
                        port: 80,
                        protocol: "SCTP".into()
                    }
                ),
                ("six", SkipReason::NoIpv4ClusterIp),
            ]
        );
        // The TCP port of the SCTP Service is still served.
        assert_eq!(keys(&d), ["10.96.0.12:81/TCP"]);
    }

    #[test]
    fn dual_stack_services_use_their_ipv4_cluster_ip() {
        let s = svc("ds")
            .cluster_ips(&["fd00::10", "10.96.0.20"])
            .port("", 80, "TCP")
            .build();
        let d = run([&s], []);
        assert!(d.frontends.contains_key(&int("10.96.0.20", 80)));
    }

    #[test]
    fn node_ports_on_node_addresses_and_loopback_in_both_scopes() {
        let s = svc("np")
            .node_port_type()
            .cluster_ip("10.96.0.30")
            .port_np("", 80, 30080, "TCP")
            .build();
        let sl = slice("np", "a")
            .port("", 8080, "TCP")
            .ready_on("10.244.1.5", "node-1")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&sl]);
        assert_eq!(
            keys(&d),
            [
                "10.96.0.30:80/TCP",
                "127.0.0.1:30080/TCP",
                "198.18.0.11:30080/TCP",
                "198.18.0.11:30080/TCP (external)",
            ],
            "loopback serves only this node's own clients"
        );
        for k in [ext("198.18.0.11", 30080), int("127.0.0.1", 30080)] {
            assert_eq!(d.frontends[&k].kind, FrontendKind::NodePort);
            assert_eq!(addrs(&d.frontends[&k]).len(), 2);
        }
    }

    #[test]
    fn nodeport_addresses_narrow_where_node_ports_are_served() {
        let opts = ProxyOptions {
            nodeport_addresses: vec!["198.18.0.0/16".parse().unwrap()],
        };
        assert_eq!(
            nodeport_addresses(&node(), &opts),
            ["198.18.0.11".parse::<Ipv4Addr>().unwrap()]
        );
        let lo = ProxyOptions {
            nodeport_addresses: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert_eq!(nodeport_addresses(&node(), &lo), [Ipv4Addr::LOCALHOST]);
    }

    #[test]
    fn each_policy_falls_back_to_its_own_serving_terminating_endpoints() {
        // KEP-1669: node-1's only endpoint is terminating (still serving); node-2's is ready.
        let s = svc("lb")
            .load_balancer("203.0.113.10")
            .cluster_ip("10.96.0.40")
            .port_np("", 80, 30090, "TCP")
            .external_traffic_policy("Local")
            .internal_traffic_policy("Local")
            .health_check_node_port(32000)
            .build();
        let sl = slice("lb", "a")
            .port("", 8080, "TCP")
            .with_conditions("10.244.1.5", "node-1", Some(false), Some(true), Some(true))
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&sl]);
        // Local sets: node-1's terminating endpoint takes what reaches this node.
        for k in [ext("203.0.113.10", 80), int("10.96.0.40", 80)] {
            let spec = &d.frontends[&k];
            assert_eq!(addrs(spec), ["10.244.1.5:8080"], "{k}");
            assert!(spec.backends[0].terminating, "{k}");
        }
        // The cluster-wide set has a ready endpoint: only that one.
        assert_eq!(
            addrs(&d.frontends[&int("203.0.113.10", 80)]),
            ["10.244.2.6:8080"]
        );
        // Load balancers drain the node: no ready local endpoint.
        assert_eq!(d.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn absent_serving_defers_to_ready_and_absent_ready_means_ready() {
        let s = svc("web")
            .cluster_ip("10.96.0.41")
            .port("", 80, "TCP")
            .build();
        let run_with = |ready, serving, terminating| {
            let sl = slice("web", "a")
                .port("", 8080, "TCP")
                .with_conditions("10.244.1.5", "node-1", ready, serving, terminating)
                .build();
            let d = run([&s], [&sl]);
            d.frontends[&int("10.96.0.41", 80)]
                .backends
                .iter()
                .map(|b| b.terminating)
                .collect::<Vec<_>>()
        };
        // (ready, serving, terminating) -> the backends (their terminating mark).
        assert_eq!(run_with(None, None, None), [false]);
        // Absent ready is ready, even with terminating set (the API's default).
        assert_eq!(run_with(None, None, Some(true)), [false]);
        assert_eq!(run_with(None, Some(true), Some(true)), [false]);
        assert_eq!(run_with(Some(false), None, Some(true)), Vec::<bool>::new());
        assert_eq!(run_with(Some(false), Some(true), Some(true)), [true]);
        assert_eq!(
            run_with(Some(false), Some(false), Some(true)),
            Vec::<bool>::new()
        );
        assert_eq!(run_with(Some(false), None, None), Vec::<bool>::new());
    }

    #[test]
    fn external_traffic_policy_local_keeps_outside_traffic_on_this_node() {
        let s = svc("lb")
            .load_balancer("203.0.113.10")
            .cluster_ip("10.96.0.40")
            .port_np("", 80, 30090, "TCP")
            .external_traffic_policy("Local")
            .health_check_node_port(32000)
            .build();
        let sl = slice("lb", "a")
            .port("", 8080, "TCP")
            .ready_on("10.244.1.5", "node-1")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&sl]);
        // From outside: local endpoints only, client address kept.
        for k in [ext("198.18.0.11", 30090), ext("203.0.113.10", 80)] {
            let spec = &d.frontends[&k];
            assert_eq!(addrs(spec), ["10.244.1.5:8080"], "{k}");
            assert!(spec.external_local, "{k}");
        }
        // From this node's pods: every endpoint, as kube-proxy does.
        for k in [
            int("198.18.0.11", 30090),
            int("203.0.113.10", 80),
            int("10.96.0.40", 80),
        ] {
            assert_eq!(addrs(&d.frontends[&k]).len(), 2, "{k}");
            assert!(!d.frontends[&k].external_local, "{k}");
        }
        assert_eq!(
            d.health_checks[&32000],
            HealthCheck {
                namespace: "default".into(),
                name: "lb".into(),
                local_endpoints: 1
            }
        );

        let only_remote = slice("lb", "a")
            .port("", 8080, "TCP")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&only_remote]);
        assert!(
            d.frontends[&ext("203.0.113.10", 80)].backends.is_empty(),
            "no local endpoint: nothing serves outside traffic"
        );
        assert_eq!(d.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn internal_traffic_policy_local_uses_local_endpoints_for_the_cluster_ip() {
        let s = svc("itp")
            .cluster_ip("10.96.0.50")
            .port("", 80, "TCP")
            .internal_traffic_policy("Local")
            .build();
        let sl = slice("itp", "a")
            .port("", 8080, "TCP")
            .ready_on("10.244.1.5", "node-1")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&sl]);
        let spec = &d.frontends[&int("10.96.0.50", 80)];
        assert_eq!(addrs(spec), ["10.244.1.5:8080"]);
        assert!(spec.internal_local);
        assert!(spec.backends[0].local);
    }

    #[test]
    fn external_ips_and_lb_ips_with_source_ranges() {
        let s = svc("x")
            .load_balancer("203.0.113.20")
            .cluster_ip("10.96.0.60")
            .external_ip("192.0.2.7")
            .port_np("", 443, 30443, "TCP")
            .source_ranges(&["198.51.100.0/24", "bogus"])
            .build();
        let sl = slice("x", "a")
            .port("", 8443, "TCP")
            .ready_on("10.244.2.6", "node-2")
            .build();
        let d = run([&s], [&sl]);
        assert_eq!(
            d.frontends[&ext("192.0.2.7", 443)].kind,
            FrontendKind::ExternalIp
        );
        assert!(
            d.frontends[&ext("192.0.2.7", 443)].source_ranges.is_empty(),
            "source ranges are for load balancer IPs"
        );
        let lb = &d.frontends[&ext("203.0.113.20", 443)];
        assert_eq!(lb.kind, FrontendKind::LoadBalancer);
        assert_eq!(
            lb.source_ranges,
            ["198.51.100.0/24".parse::<Ipv4Net>().unwrap()]
        );
        assert!(
            d.frontends[&int("203.0.113.20", 443)]
                .source_ranges
                .is_empty()
        );
    }

    #[test]
    fn lb_ip_mode_proxy_is_not_short_circuited_for_local_clients() {
        let s = svc("p")
            .load_balancer_with_mode("203.0.113.30", "Proxy")
            .cluster_ip("10.96.0.70")
            .port_np("", 80, 30070, "TCP")
            .build();
        let d = run([&s], []);
        assert!(d.frontends.contains_key(&ext("203.0.113.30", 80)));
        assert!(!d.frontends.contains_key(&int("203.0.113.30", 80)));
    }

    #[test]
    fn session_affinity_carries_its_timeout_to_every_frontend() {
        let s = svc("a")
            .cluster_ip("10.96.0.80")
            .port("", 80, "TCP")
            .session_affinity(Some(60))
            .build();
        let d = run([&s], []);
        assert_eq!(
            d.frontends[&int("10.96.0.80", 80)].affinity_timeout,
            Some(60)
        );
        let s = svc("a")
            .cluster_ip("10.96.0.80")
            .port("", 80, "TCP")
            .session_affinity(None)
            .build();
        assert_eq!(
            run([&s], []).frontends[&int("10.96.0.80", 80)].affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
    }

    #[test]
    fn topology_prefers_same_zone_then_same_node_when_hints_allow() {
        let zoned = |td: &str| {
            svc("t")
                .cluster_ip("10.96.0.90")
                .port("", 80, "TCP")
                .traffic_distribution(td)
                .build()
        };
        let sl = slice("t", "a")
            .port("", 8080, "TCP")
            .ready_hinted("10.244.1.5", "node-1", "zone-a")
            .ready_hinted("10.244.2.6", "node-2", "zone-a")
            .ready_hinted("10.244.3.7", "node-3", "zone-b")
            .build();
        let d = run([&zoned("PreferClose")], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.90", 80)]),
            ["10.244.1.5:8080", "10.244.2.6:8080"]
        );
        let d = run([&zoned("PreferSameNode")], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&int("10.96.0.90", 80)]),
            ["10.244.1.5:8080"]
        );
        // Without trafficDistribution, hints are ignored.
        let plain = svc("t")
            .cluster_ip("10.96.0.90")
            .port("", 80, "TCP")
            .build();
        assert_eq!(
            run([&plain], [&sl]).frontends[&int("10.96.0.90", 80)]
                .backends
                .len(),
            3
        );
        // One endpoint without hints: topology cannot be trusted, use all.
        let partial = slice("t", "a")
            .port("", 8080, "TCP")
            .ready_hinted("10.244.1.5", "node-1", "zone-a")
            .ready_on("10.244.3.7", "node-3")
            .build();
        assert_eq!(
            run([&zoned("PreferClose")], [&partial]).frontends[&int("10.96.0.90", 80)]
                .backends
                .len(),
            2
        );
        // No hint for our zone: all.
        let elsewhere = slice("t", "a")
            .port("", 8080, "TCP")
            .ready_hinted("10.244.3.7", "node-3", "zone-b")
            .build();
        assert_eq!(
            run([&zoned("PreferClose")], [&elsewhere]).frontends[&int("10.96.0.90", 80)]
                .backends
                .len(),
            1
        );
    }
}
