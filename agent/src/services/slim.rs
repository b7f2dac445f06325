//! What the service logic keeps of each API object: the watches hand over whole objects
//! (managedFields, `kubectl apply`'s last-applied copy, owner references, every endpoint's Pod
//! reference), and at 10,000 Services those are most of the agent's memory. Each object is cut
//! down to the fields [`super::desired`] reads as soon as it arrives, before it is queued or
//! stored. A table test checks the table is the same from whole and from slimmed objects.

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus},
        discovery::v1::{EndpointConditions, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::desired::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME, TOPOLOGY_MODE};

/// Name, namespace and the labels and annotations in `keep` (absent when none is set).
fn meta(meta: &mut ObjectMeta, labels: &[&str], annotations: &[&str]) {
    let keep = |map: Option<std::collections::BTreeMap<String, String>>, keys: &[&str]| {
        let kept: std::collections::BTreeMap<String, String> = map
            .into_iter()
            .flatten()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: keep(meta.labels.take(), labels),
        annotations: keep(meta.annotations.take(), annotations),
        ..ObjectMeta::default()
    };
}

/// A Service as the service table reads it: name, namespace, the proxy-name label, the
/// topology annotation, its spec without the selector, and its load balancer's ingress
/// addresses.
pub fn service(svc: &mut Service) {
    meta(&mut svc.metadata, &[SERVICE_PROXY_NAME], &[TOPOLOGY_MODE]);
    if let Some(spec) = svc.spec.as_mut() {
        // Pods are matched by the EndpointSlice controller, not here.
        spec.selector = None;
    }
    svc.status = svc.status.take().and_then(|s| {
        let ingress: Vec<LoadBalancerIngress> = s
            .load_balancer?
            .ingress?
            .into_iter()
            .map(|i| LoadBalancerIngress {
                ip: i.ip,
                ip_mode: i.ip_mode,
                ..LoadBalancerIngress::default()
            })
            .collect();
        Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(ingress),
            }),
            conditions: None,
        })
    });
}

/// An EndpointSlice as the service table reads it: name, namespace, the Service it belongs
/// to, its address type and ports, and each endpoint's addresses, conditions, node, zone and
/// hints (not its Pod reference).
pub fn slice(slice: &mut EndpointSlice) {
    meta(&mut slice.metadata, &[SERVICE_NAME_LABEL], &[]);
    for e in slice.endpoints.iter_mut().flatten() {
        e.target_ref = None;
        e.deprecated_topology = None;
        e.conditions = e.conditions.take().and_then(conditions);
    }
}

/// Conditions without what their absence means anyway (ready: true; serving: as ready;
/// terminating: false), `None` when nothing is left: the usual endpoint (ready, serving, not
/// terminating) then stores no conditions at all.
fn conditions(c: EndpointConditions) -> Option<EndpointConditions> {
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
    let terminating = c.terminating.unwrap_or(false);
    let out = EndpointConditions {
        ready: (!ready).then_some(false),
        serving: (serving != ready).then_some(serving),
        terminating: terminating.then_some(true),
    };
    (out != EndpointConditions::default()).then_some(out)
}

/// A Node as routing reads it: everything but its managedFields and the parts of its status
/// that only the kubelet and the scheduler use (images, capacity, conditions, system info:
/// tens of kilobytes per Node on a real cluster).
pub fn node(node: &mut k8s_openapi::api::core::v1::Node) {
    node.metadata.managed_fields = None;
    if let Some(status) = node.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{
        desired::desired,
        model::{NodeInfo, ProxyOptions},
        testing::{slice as slice_of, svc},
    };

    #[test]
    fn the_table_is_the_same_from_whole_and_from_slimmed_objects() {
        let node = NodeInfo {
            name: "node-1".into(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
            zone: Some("zone-a".into()),
        };
        let services = [
            svc("web")
                .cluster_ip("10.96.0.10")
                .port("http", 80, "TCP")
                .build(),
            svc("lb")
                .load_balancer("198.51.100.7")
                .cluster_ip("10.96.0.11")
                .port_np("", 443, 30443, "TCP")
                .external_traffic_policy("Local")
                .health_check_node_port(31999)
                .build(),
            {
                let mut s = svc("topo")
                    .cluster_ip("10.96.0.12")
                    .port("", 53, "UDP")
                    .build();
                s.metadata.annotations = Some([(TOPOLOGY_MODE.into(), "Auto".into())].into());
                s
            },
            svc("other")
                .cluster_ip("10.96.0.13")
                .port("", 80, "TCP")
                .label(SERVICE_PROXY_NAME, "someone-else")
                .build(),
        ];
        // One Service per combination of conditions (each absent, false or true), so the
        // table shows how each single endpoint is read.
        let states = [None, Some(false), Some(true)];
        let mut combos = Vec::new();
        for ready in states {
            for serving in states {
                for terminating in states {
                    combos.push((ready, serving, terminating));
                }
            }
        }
        let services: Vec<_> = services
            .into_iter()
            .chain(combos.iter().enumerate().map(|(k, _)| {
                svc(&format!("c{k}"))
                    .cluster_ip(&format!("10.96.1.{k}"))
                    .port("", 80, "TCP")
                    .build()
            }))
            .collect();
        let slices: Vec<_> = [
            slice_of("web", "web-1")
                .port("http", 8080, "TCP")
                .ready_on("10.244.1.5", "node-1")
                .ready_on("10.244.2.5", "node-2")
                .build(),
            slice_of("lb", "lb-1")
                .port("", 8443, "TCP")
                .ready_on("10.244.1.6", "node-1")
                .build(),
            slice_of("topo", "topo-1")
                .port("", 5353, "UDP")
                .ready_hinted("10.244.1.7", "node-1", "zone-a")
                .ready_hinted("10.244.2.7", "node-2", "zone-b")
                .build(),
        ]
        .into_iter()
        .chain(combos.iter().enumerate().map(|(k, (r, s, t))| {
            slice_of(&format!("c{k}"), &format!("c{k}-1"))
                .port("", 8080, "TCP")
                .with_conditions(format!("10.244.3.{k}"), "node-1", *r, *s, *t)
                .build()
        }))
        .collect();
        // Whole objects carry what a real cluster stores besides.
        let mut whole_services = services.to_vec();
        for s in &mut whole_services {
            decorate(&mut s.metadata);
            s.spec.as_mut().unwrap().selector = Some([("app".into(), "x".into())].into());
        }
        let mut whole_slices = slices.to_vec();
        for s in &mut whole_slices {
            decorate(&mut s.metadata);
            for e in s.endpoints.iter_mut().flatten() {
                e.target_ref = Some(Default::default());
            }
        }
        let mut slim_services = whole_services.clone();
        slim_services.iter_mut().for_each(service);
        let mut slim_slices = whole_slices.clone();
        slim_slices.iter_mut().for_each(slice);

        let options = ProxyOptions::default();
        let from_whole = desired(&whole_services, &whole_slices, &node, &options);
        let from_slim = desired(&slim_services, &slim_slices, &node, &options);
        assert_eq!(from_whole, from_slim);
        let with_backends = (0..combos.len())
            .filter(|k| {
                let ip: std::net::Ipv4Addr = format!("10.96.1.{k}").parse().unwrap();
                from_whole
                    .frontends
                    .iter()
                    .any(|(key, spec)| key.frontend.addr == ip && !spec.backends.is_empty())
            })
            .count();
        assert!(
            with_backends > 0 && with_backends < combos.len(),
            "the combinations differ in what they serve: {with_backends} of {}",
            combos.len()
        );
        let stored: usize = slim_slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.is_some())
            .count();
        assert!(stored < combos.len(), "defaults are not stored");
        assert_eq!(
            from_whole.skipped.len(),
            1,
            "the other proxy's Service is skipped"
        );
        assert!(
            from_whole.frontends.len() >= 5,
            "{:?}",
            from_whole.frontends.keys()
        );
        for s in &slim_services {
            assert!(s.metadata.managed_fields.is_none() && s.metadata.uid.is_none());
        }
        for s in &slim_slices {
            assert!(s.metadata.annotations.is_none() && s.metadata.owner_references.is_none());
        }
    }

    fn decorate(meta: &mut ObjectMeta) {
        meta.uid = Some("0b1c".into());
        meta.managed_fields = Some(vec![Default::default()]);
        meta.owner_references = Some(vec![Default::default()]);
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(
                "kubectl.kubernetes.io/last-applied-configuration".into(),
                "{}".into(),
            );
        meta.labels
            .get_or_insert_with(Default::default)
            .insert("app".into(), "x".into());
    }
}
