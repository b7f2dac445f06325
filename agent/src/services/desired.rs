//! The pure function from API objects to the desired service table. It performs no I/O and
//! keeps no state: same objects in, same table out. Every rule kube-proxy applies to choose
//! backends lives here, with its tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};

use super::model::{
    BackendAddr, Desired, Frontend, FrontendKind, FrontendSpec, Proto, ServiceRef, SkipReason,
    Skipped,
};

/// The label by which a Service asks to be handled by another proxy.
pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// The label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Computes the desired service table from every Service and EndpointSlice the agent sees.
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Desired {
    let slices_by_service = index_slices(slices);
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
        let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => vec![],
        };
        if cluster_ips.contains(&"None") {
            out.skipped.push(skip(SkipReason::Headless));
            continue;
        }
        let mut v4 = None;
        let mut invalid = None;
        for ip in &cluster_ips {
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => {
                    v4.get_or_insert(a);
                }
                Ok(std::net::IpAddr::V6(_)) => {}
                Err(_) => invalid = Some(format!("cluster IP {ip:?} is not an IP address")),
            }
        }
        if let Some(detail) = invalid {
            out.skipped.push(skip(SkipReason::Invalid { detail }));
            continue;
        }
        let Some(cluster_ip) = v4 else {
            // A Service being created may not have its IP yet; only report IPv6-only ones.
            if !cluster_ips.is_empty() {
                out.skipped.push(skip(SkipReason::NoIpv4ClusterIp));
            }
            continue;
        };

        let slices = slices_by_service
            .get(&(namespace.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
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
            let frontend = Frontend {
                addr: cluster_ip,
                port: svc_port,
                proto,
            };
            let service = ServiceRef {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port.name.clone().unwrap_or_default(),
            };
            let backends = backends_for(port, proto, slices);
            out.frontends.insert(
                frontend,
                FrontendSpec {
                    kind: FrontendKind::ClusterIp,
                    service,
                    backends,
                },
            );
        }
    }
    out
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

/// Terminating but still serving: usable only when nothing is ready.
fn is_serving_terminating(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    c.and_then(|c| c.serving).unwrap_or(false) && c.and_then(|c| c.terminating).unwrap_or(false)
}

/// The backends of one Service port: ready endpoints, or, when none is ready, the terminating
/// endpoints that are still serving (kube-proxy's rule, so that rolling updates drain cleanly).
fn backends_for(port: &ServicePort, proto: Proto, slices: &[&EndpointSlice]) -> Vec<BackendAddr> {
    let want_name = port.name.as_deref().unwrap_or_default();
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
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
            let set = if is_ready(ep) {
                &mut ready
            } else if is_serving_terminating(ep) {
                &mut terminating
            } else {
                continue;
            };
            for addr in ep
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
            {
                set.insert((addr, target_port));
            }
        }
    }
    let (chosen, term) = if ready.is_empty() {
        (terminating, true)
    } else {
        (ready, false)
    };
    chosen
        .into_iter()
        .map(|(addr, port)| BackendAddr {
            addr,
            port,
            proto,
            terminating: term,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{slice, svc};

    fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            addr: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn addrs(spec: &FrontendSpec) -> Vec<String> {
        spec.backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
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
        let d = desired([&s], [&sl]);
        let spec = &d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(addrs(spec), ["10.244.1.5:8080", "10.244.2.7:8080"]);
        assert_eq!(spec.service.to_string(), "default/web:http");
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
        let d = desired([&s], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]),
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
        let d = desired([&s], [&draining]);
        let spec = &d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(addrs(spec), ["10.244.1.5:8080"]);
        assert!(spec.backends[0].terminating);

        let with_ready = slice("web", "b")
            .port("", 8080, "TCP")
            .ready("10.244.2.2")
            .build();
        let d = desired([&s], [&draining, &with_ready]);
        assert_eq!(
            addrs(&d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]),
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
        let d = desired([&s], [&sl]);
        assert_eq!(
            addrs(&d.frontends[&fe("10.96.0.53", 53, Proto::Udp)]),
            ["10.244.1.9:5353"]
        );
        assert_eq!(
            addrs(&d.frontends[&fe("10.96.0.53", 53, Proto::Tcp)]),
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
        let d = desired([&s], [&a, &b, &other]);
        assert_eq!(
            addrs(&d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]),
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
        let d = desired([&s], []);
        assert!(
            d.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]
                .backends
                .is_empty()
        );
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
        let d = desired([&headless, &external, &other, &sctp, &v6], []);
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
        assert_eq!(
            d.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.12", 81, Proto::Tcp)]
        );
    }

    #[test]
    fn dual_stack_services_use_their_ipv4_cluster_ip() {
        let s = svc("ds")
            .cluster_ips(&["fd00::10", "10.96.0.20"])
            .port("", 80, "TCP")
            .build();
        let d = desired([&s], []);
        assert!(d.frontends.contains_key(&fe("10.96.0.20", 80, Proto::Tcp)));
    }
}
