//! EndpointSlices as the real EndpointSlice controller writes them, so that what the agent
//! reads in a test is what it reads in a cluster.
//!
//! Owns the controller's shapes: at most 100 endpoints per slice (`--max-endpoints-per-slice`),
//! several slices per Service, names from `generateName: <service>-`, the
//! `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by` labels, the
//! Service as controlling owner, ports from the Service (unnamed ports named `""`), endpoints
//! with `targetRef`, `nodeName` and `zone`, and the conditions `ready`, `serving`, `terminating`
//! derived from the pod (`ready = serving && !terminating`, unless `publishNotReadyAddresses`);
//! also every other shape a consumer may meet ([`Conditions`]: fields left out by older
//! controllers and other writers) and transient duplicates (one endpoint in two slices while
//! the controller moves it). Updates keep each endpoint in its slice, as the controller does,
//! so a change touches few slices. The planning is pure ([`plan`]); [`publish`] writes a plan
//! through the API test server's typed API. Never invents an address: endpoints are given.

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use crate::apiserver::{ApiError, ApiServer};

/// The controller's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller's value of [`MANAGED_BY_LABEL`].
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// An endpoint's conditions as written; `None` leaves the field out of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Conditions {
    /// A running pod whose readiness probe passes.
    pub const READY: Conditions = Conditions::of_pod(true, false, false);
    /// A running pod that is not ready (starting, or failing its probe).
    pub const NOT_READY: Conditions = Conditions::of_pod(false, false, false);
    /// A pod being deleted whose readiness probe still passes (draining).
    pub const TERMINATING_SERVING: Conditions = Conditions::of_pod(true, true, false);
    /// A pod being deleted that no longer passes its readiness probe.
    pub const TERMINATING: Conditions = Conditions::of_pod(false, true, false);
    /// No conditions at all (a hand-written slice): consumers must read it as ready.
    pub const UNKNOWN: Conditions = Conditions {
        ready: None,
        serving: None,
        terminating: None,
    };

    /// What the controller writes for a pod (`podToEndpoint`): `serving` is the pod's Ready
    /// condition, `terminating` whether it has a deletionTimestamp, and `ready` is
    /// `serving && !terminating`, or always true for a Service with `publishNotReadyAddresses`.
    pub const fn of_pod(pod_ready: bool, deleting: bool, publish_not_ready: bool) -> Conditions {
        Conditions {
            ready: Some(publish_not_ready || (pod_ready && !deleting)),
            serving: Some(pod_ready),
            terminating: Some(deleting),
        }
    }

    /// `ready` only, as controllers before Kubernetes 1.20 (and the Endpoints mirroring
    /// controller) write it.
    pub const fn ready_only(ready: bool) -> Conditions {
        Conditions {
            ready: Some(ready),
            serving: None,
            terminating: None,
        }
    }

    /// The conditions as an API object (`None` when every field is left out).
    fn object(self) -> Option<EndpointConditions> {
        (self != Conditions::UNKNOWN).then_some(EndpointConditions {
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
        })
    }
}

/// One endpoint of a Service: a pod's address and what the controller knows of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    /// The pod's name (`targetRef`), if the endpoint is a pod.
    pub pod: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub conditions: Conditions,
}

impl Backend {
    /// A ready endpoint at `ip`, with no pod behind it.
    pub fn ready(ip: Ipv4Addr) -> Backend {
        Backend {
            ip,
            pod: None,
            node: None,
            zone: None,
            conditions: Conditions::READY,
        }
    }

    /// The endpoint of pod `name` on `node`, ready.
    pub fn pod(name: &str, ip: Ipv4Addr, node: &str) -> Backend {
        Backend {
            pod: Some(name.to_owned()),
            node: Some(node.to_owned()),
            ..Backend::ready(ip)
        }
    }

    pub fn conditions(mut self, conditions: Conditions) -> Backend {
        self.conditions = conditions;
        self
    }

    pub fn zone(mut self, zone: &str) -> Backend {
        self.zone = Some(zone.to_owned());
        self
    }

    fn endpoint(&self, namespace: &str) -> Endpoint {
        Endpoint {
            addresses: vec![self.ip.to_string()],
            conditions: self.conditions.object(),
            node_name: self.node.clone(),
            zone: self.zone.clone(),
            target_ref: self.pod.as_ref().map(|name| ObjectReference {
                kind: Some("Pod".to_owned()),
                namespace: Some(namespace.to_owned()),
                name: Some(name.clone()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }
}

/// What to write to make a Service's slices hold exactly some backends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// New slices (named by the server from `generateName`).
    pub create: Vec<EndpointSlice>,
    /// Existing slices whose endpoints or ports change, whole.
    pub update: Vec<EndpointSlice>,
    /// Names of slices to delete (emptied).
    pub delete: Vec<String>,
}

/// The endpoint ports of `service`: each port's name (`""` if unnamed), protocol and
/// `targetPort` (its `port` when unset). A named `targetPort` is resolved per pod by the real
/// controller; the harness's pods have none, so it is refused.
pub fn ports(service: &Service) -> Vec<EndpointPort> {
    let spec = service.spec.as_ref();
    spec.and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .map(|p| {
            let target = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => {
                    panic!("named targetPort {name:?}: give the Service a number")
                }
            };
            EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(target),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
                app_protocol: p.app_protocol.clone(),
            }
        })
        .collect()
}

/// A new slice of `service` (no endpoints yet), as the controller creates it.
fn new_slice(service: &Service) -> EndpointSlice {
    let name = service.metadata.name.clone().unwrap_or_default();
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME_LABEL.to_owned(), name.clone());
    labels.insert(MANAGED_BY_LABEL.to_owned(), CONTROLLER.to_owned());
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: Some(
                service
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            ),
            labels: Some(labels),
            owner_references: service.metadata.uid.clone().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "Service".to_owned(),
                    name: name.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            }),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(Vec::new()),
        ports: Some(ports(service)),
    }
}

/// The first address of an endpoint.
fn address(endpoint: &Endpoint) -> Option<Ipv4Addr> {
    endpoint.addresses.first().and_then(|a| a.parse().ok())
}

/// Whether `slice` is one the controller manages for `service`.
pub fn belongs_to(slice: &EndpointSlice, service: &Service) -> bool {
    let labels = slice.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    slice.metadata.namespace == service.metadata.namespace
        && label(SERVICE_NAME_LABEL) == service.metadata.name.as_deref()
        && label(MANAGED_BY_LABEL) == Some(CONTROLLER)
}

/// What to write so that `service`'s slices (`existing`, the controller's slices of it) hold
/// exactly `backends`, at most `max` per slice. As the controller: an endpoint stays in the
/// slice it is in (its fields updated); one that left is removed; new ones fill the slices with
/// room, then new slices; an emptied slice is deleted, but a Service always keeps one slice (a
/// placeholder without endpoints). A duplicate left in `existing` is removed from all slices
/// but its first.
pub fn plan(
    service: &Service,
    existing: &[EndpointSlice],
    backends: &[Backend],
    max: usize,
) -> Plan {
    assert!(max > 0, "slices hold at least one endpoint");
    let namespace = service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let wanted = |ip: Ipv4Addr| backends.iter().find(|b| b.ip == ip);
    let ports = ports(service);
    let mut placed = BTreeSet::new();
    let mut slices: Vec<(EndpointSlice, bool)> = Vec::new();
    for slice in existing {
        let mut next = slice.clone();
        let kept: Vec<Endpoint> = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(address)
            .filter_map(wanted)
            .filter(|b| placed.insert(b.ip))
            .map(|b| b.endpoint(&namespace))
            .collect();
        next.endpoints = Some(kept);
        next.ports = Some(ports.clone());
        let changed = next.endpoints != slice.endpoints || next.ports != slice.ports;
        slices.push((next, changed));
    }
    let mut fresh = backends.iter().filter(|b| !placed.contains(&b.ip));
    for (slice, changed) in &mut slices {
        let endpoints = slice.endpoints.get_or_insert_with(Vec::new);
        while endpoints.len() < max {
            let Some(b) = fresh.next() else { break };
            endpoints.push(b.endpoint(&namespace));
            *changed = true;
        }
    }
    let mut plan = Plan::default();
    let mut rest: Vec<&Backend> = fresh.collect();
    while !rest.is_empty() {
        let take = rest.len().min(max);
        let mut slice = new_slice(service);
        slice.endpoints = Some(rest.drain(..take).map(|b| b.endpoint(&namespace)).collect());
        plan.create.push(slice);
    }
    let mut kept_one = !plan.create.is_empty();
    for (slice, changed) in slices {
        let empty = slice.endpoints.as_ref().is_none_or(Vec::is_empty);
        if empty && kept_one {
            plan.delete
                .push(slice.metadata.name.clone().unwrap_or_default());
            continue;
        }
        kept_one = true;
        if changed {
            plan.update.push(slice);
        }
    }
    if !kept_one {
        plan.create.push(new_slice(service));
    }
    plan
}

/// `slices` as the controller leaves them for a moment while it moves the endpoint at `ip` into
/// the slice at index `into`: there too, before it is removed from where it was. Consumers
/// must count it once. Returns the one slice to write.
pub fn with_duplicate(slices: &[EndpointSlice], ip: Ipv4Addr, into: usize) -> EndpointSlice {
    let endpoint = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .find(|e| address(e) == Some(ip))
        .unwrap_or_else(|| panic!("no endpoint {ip} in the slices"))
        .clone();
    let mut slice = slices[into].clone();
    slice.endpoints.get_or_insert_with(Vec::new).push(endpoint);
    slice
}

/// `slices` with the conditions of every endpoint at `ip` replaced: the controller's answer to
/// a change of its pod (deletion started, readiness lost). Returns the slices that changed.
pub fn with_conditions(
    slices: &[EndpointSlice],
    ip: Ipv4Addr,
    conditions: Conditions,
) -> Vec<EndpointSlice> {
    slices
        .iter()
        .filter_map(|slice| {
            let mut next = slice.clone();
            let mut hit = false;
            for e in next.endpoints.iter_mut().flatten() {
                if address(e) == Some(ip) {
                    e.conditions = conditions.object();
                    hit = true;
                }
            }
            hit.then_some(next)
        })
        .collect()
}

/// `slices` without the endpoints at `ip` (its pod is gone). Returns the slices that changed.
pub fn without(slices: &[EndpointSlice], ip: Ipv4Addr) -> Vec<EndpointSlice> {
    slices
        .iter()
        .filter(|s| s.endpoints.iter().flatten().any(|e| address(e) == Some(ip)))
        .map(|slice| {
            let mut next = slice.clone();
            next.endpoints
                .get_or_insert_with(Vec::new)
                .retain(|e| address(e) != Some(ip));
            next
        })
        .collect()
}

/// The controller's slices of `service` in `api`, by name.
pub fn slices_of(api: &ApiServer, service: &Service) -> Vec<EndpointSlice> {
    api.list::<EndpointSlice>()
        .into_iter()
        .filter(|s| belongs_to(s, service))
        .collect()
}

/// Makes `service`'s slices in `api` hold exactly `backends` (at most `max` per slice), as the
/// controller would, and returns them. The Service must exist in `api` (its uid becomes the
/// slices' owner).
pub fn publish(
    api: &ApiServer,
    service: &Service,
    backends: &[Backend],
    max: usize,
) -> Result<Vec<EndpointSlice>, ApiError> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let stored: Service = api
        .get(service.metadata.namespace.as_deref(), name)
        .ok_or_else(|| ApiError::NotFound {
            resource: "services".to_owned(),
            name: name.to_owned(),
        })?;
    let plan = plan(&stored, &slices_of(api, &stored), backends, max);
    for slice in &plan.update {
        api.replace(slice)?;
    }
    for slice in &plan.create {
        api.create(slice)?;
    }
    for name in &plan.delete {
        api.delete::<EndpointSlice>(stored.metadata.namespace.as_deref(), name)?;
    }
    Ok(slices_of(api, &stored))
}

impl super::Cluster {
    /// Publishes `service`'s endpoints as the EndpointSlice controller would ([`publish`], at
    /// most [`MAX_ENDPOINTS_PER_SLICE`] per slice); returns the Service's slices. The Service
    /// must be applied first.
    pub fn publish_endpoints(&self, service: &Service, backends: &[Backend]) -> Vec<EndpointSlice> {
        publish(self.api(), service, backends, MAX_ENDPOINTS_PER_SLICE)
            .expect("publishing a Service's endpoints")
    }
}

impl super::Pod {
    /// This pod as a ready endpoint (its address, name and node).
    pub fn backend(&self) -> Backend {
        Backend::pod(&self.name, self.ip, &format!("node-{}", self.node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("uid-web".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![
                    ServicePort {
                        port: 80,
                        target_port: Some(IntOrString::Int(8080)),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn backends(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend::ready(Ipv4Addr::from(0x0af4_0000 + i)))
            .collect()
    }

    /// Stores a plan's creations as the server would (names given), and its updates.
    fn stored(plan: &Plan, mut existing: Vec<EndpointSlice>) -> Vec<EndpointSlice> {
        for u in &plan.update {
            let slot = existing
                .iter_mut()
                .find(|s| s.metadata.name == u.metadata.name)
                .unwrap();
            *slot = u.clone();
        }
        existing.retain(|s| !plan.delete.contains(s.metadata.name.as_ref().unwrap()));
        for (i, c) in plan.create.iter().enumerate() {
            let mut c = c.clone();
            c.metadata.name = Some(format!("web-{}{i}", existing.len()));
            existing.push(c);
        }
        existing
    }

    fn counts(slices: &[EndpointSlice]) -> Vec<usize> {
        slices
            .iter()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .collect()
    }

    #[test]
    fn slices_hold_at_most_100_endpoints_in_the_controllers_shape() {
        let p = plan(&service(), &[], &backends(250), MAX_ENDPOINTS_PER_SLICE);
        assert!(p.update.is_empty() && p.delete.is_empty());
        assert_eq!(counts(&p.create), [100, 100, 50]);
        let s = &p.create[0];
        assert_eq!(s.metadata.generate_name.as_deref(), Some("web-"));
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], CONTROLLER);
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Service", "uid-web", Some(true))
        );
        let ports: Vec<(String, i32, String)> = s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.port.unwrap(),
                    p.protocol.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (String::new(), 8080, "TCP".to_owned()),
                ("dns".to_owned(), 53, "UDP".to_owned())
            ]
        );
        let e = &s.endpoints.as_ref().unwrap()[0];
        assert_eq!(
            e.conditions,
            Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false)
            })
        );
        let all: BTreeSet<String> = p
            .create
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .map(|e| e.addresses[0].clone())
            .collect();
        assert_eq!(all.len(), 250, "every endpoint once");
    }

    #[test]
    fn an_update_keeps_endpoints_in_their_slices_and_touches_few() {
        let svc = service();
        let all = backends(250);
        let first = stored(&plan(&svc, &[], &all, 100), Vec::new());
        // Nothing changed: nothing to write.
        assert_eq!(plan(&svc, &first, &all, 100), Plan::default());
        // One endpoint of the second slice leaves, one arrives: only the second slice changes
        // (the newcomer fills the hole).
        let gone = first[1].endpoints.as_ref().unwrap()[7].addresses[0].clone();
        let mut next: Vec<Backend> = all
            .iter()
            .filter(|b| b.ip.to_string() != gone)
            .cloned()
            .collect();
        next.push(Backend::ready(Ipv4Addr::new(10, 245, 0, 1)));
        let p = plan(&svc, &first, &next, 100);
        assert!(p.create.is_empty() && p.delete.is_empty(), "{p:?}");
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].metadata.name, first[1].metadata.name);
        // A condition change rewrites only the slice holding the endpoint.
        let ip = all[5].ip;
        let drained: Vec<Backend> = all
            .iter()
            .map(|b| {
                if b.ip == ip {
                    b.clone().conditions(Conditions::TERMINATING_SERVING)
                } else {
                    b.clone()
                }
            })
            .collect();
        let p = plan(&svc, &first, &drained, 100);
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].metadata.name, first[0].metadata.name);
        // Shrinking to 30 empties two slices, which go; the first one stays.
        let p = plan(&svc, &first, &all[..30], 100);
        assert_eq!(p.delete.len(), 2);
        assert_eq!(counts(&stored(&p, first.clone())), [30]);
        // No endpoints at all: one placeholder slice remains.
        let p = plan(&svc, &first, &[], 100);
        assert_eq!(counts(&stored(&p, first)), [0]);
    }

    #[test]
    fn a_transient_duplicate_is_written_and_then_resolved() {
        let svc = service();
        let all = backends(150);
        let first = stored(&plan(&svc, &[], &all, 100), Vec::new());
        let ip = all[3].ip;
        let dup = with_duplicate(&first, ip, 1);
        let mut during = first.clone();
        during[1] = dup;
        let occurrences = during
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.addresses[0] == ip.to_string())
            .count();
        assert_eq!(occurrences, 2);
        // The next reconcile removes the second copy.
        let p = plan(&svc, &during, &all, 100);
        assert_eq!(p.update.len(), 1);
        assert_eq!(counts(&stored(&p, during)), [100, 50]);
    }

    #[test]
    fn conditions_are_written_as_given_and_left_out_when_unknown() {
        let shapes = [
            (Conditions::READY, (Some(true), Some(true), Some(false))),
            (
                Conditions::NOT_READY,
                (Some(false), Some(false), Some(false)),
            ),
            (
                Conditions::TERMINATING_SERVING,
                (Some(false), Some(true), Some(true)),
            ),
            (
                Conditions::TERMINATING,
                (Some(false), Some(false), Some(true)),
            ),
            (
                Conditions::of_pod(true, true, true),
                (Some(true), Some(true), Some(true)),
            ),
            (Conditions::ready_only(false), (Some(false), None, None)),
        ];
        for (c, (ready, serving, terminating)) in shapes {
            assert_eq!(
                c.object(),
                Some(EndpointConditions {
                    ready,
                    serving,
                    terminating
                })
            );
        }
        assert_eq!(Conditions::UNKNOWN.object(), None);
        let only_ip = with_conditions(
            &plan(&service(), &[], &backends(3), 100).create,
            Ipv4Addr::from(0x0af4_0001),
            Conditions::TERMINATING,
        );
        let eps = only_ip[0].endpoints.as_ref().unwrap();
        assert_eq!(
            eps.iter()
                .map(|e| e.conditions.as_ref().unwrap().terminating)
                .collect::<Vec<_>>(),
            [Some(false), Some(true), Some(false)]
        );
        let removed = without(&only_ip, Ipv4Addr::from(0x0af4_0001));
        assert_eq!(counts(&removed), [2]);
    }
}
