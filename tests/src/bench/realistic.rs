//! API objects shaped as a real cluster stores them, for the memory benchmark: a Service as
//! `kubectl apply` leaves it (the last-applied annotation, the client-side-apply manager's
//! managedFields, the API server's defaults) and an EndpointSlice as the EndpointSlice
//! controller writes it (generated name, owner reference, trigger-time annotation, its
//! managedFields, each endpoint's Pod reference and zone). The agent must not pay for what it
//! does not read; these let the benchmark show whether it does.

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, OwnerReference, Time},
};
use serde_json::{Value, json};

const TIME: &str = "2026-11-20T09:14:07Z";

fn time() -> Time {
    serde_json::from_value(Value::from(TIME)).expect("a timestamp")
}

fn entry(manager: &str, api_version: &str, fields: Value) -> ManagedFieldsEntry {
    ManagedFieldsEntry {
        manager: Some(manager.to_owned()),
        operation: Some("Update".to_owned()),
        api_version: Some(api_version.to_owned()),
        time: Some(time()),
        fields_type: Some("FieldsV1".to_owned()),
        fields_v1: Some(FieldsV1(fields)),
        subresource: None,
    }
}

/// A uid for object `n` of a kind (`kind` tells kinds apart).
pub fn uid(kind: u8, n: usize) -> String {
    format!("{kind:02x}6f3c1e-{:04x}-4b7a-9c2d-{n:012x}", n & 0xffff)
}

/// `svc` as `kubectl apply` and the API server leave it; `n` numbers it.
pub fn service(mut svc: Service, n: usize) -> Service {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let labels = [("app".to_owned(), name.clone())].into_iter().collect();
    svc.metadata.labels = Some(labels);
    let spec = svc.spec.get_or_insert_with(Default::default);
    spec.selector = Some([("app".to_owned(), name.clone())].into_iter().collect());
    let applied = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {},
            "labels": {"app": name},
            "name": name,
            "namespace": svc.metadata.namespace,
        },
        "spec": {
            "ports": spec.ports,
            "selector": {"app": name},
        },
    });
    spec.cluster_ips = spec.cluster_ip.clone().map(|ip| vec![ip]);
    spec.ip_families = Some(vec!["IPv4".to_owned()]);
    spec.ip_family_policy = Some("SingleStack".to_owned());
    spec.internal_traffic_policy = Some("Cluster".to_owned());
    spec.session_affinity = Some("None".to_owned());
    spec.type_ = spec.type_.clone().or(Some("ClusterIP".to_owned()));
    let port_keys: serde_json::Map<String, Value> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                format!(
                    "k:{{\"port\":{},\"protocol\":\"{}\"}}",
                    p.port,
                    p.protocol.as_deref().unwrap_or("TCP")
                ),
                json!({".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}),
            )
        })
        .chain([(".".to_owned(), json!({}))])
        .collect();
    svc.metadata.annotations = Some(
        [(
            "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
            format!("{applied}\n"),
        )]
        .into_iter()
        .collect(),
    );
    svc.metadata.uid = Some(uid(1, n));
    svc.metadata.creation_timestamp = Some(time());
    svc.metadata.managed_fields = Some(vec![entry(
        "kubectl-client-side-apply",
        "v1",
        json!({
            "f:metadata": {
                "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": {".": {}, "f:app": {}},
            },
            "f:spec": {
                "f:internalTrafficPolicy": {},
                "f:ports": port_keys,
                "f:selector": {},
                "f:sessionAffinity": {},
                "f:type": {},
            },
        }),
    )]);
    svc.status = Some(serde_json::from_value(json!({"loadBalancer": {}})).expect("a status"));
    svc
}

/// `slice` as the EndpointSlice controller writes it for the Service `service` (numbered `n`,
/// as given to [`service`]); its endpoints get Pod references and a zone.
pub fn slice(mut slice: EndpointSlice, service: &str, n: usize) -> EndpointSlice {
    let svc_uid = uid(1, n);
    slice.metadata.generate_name = Some(format!("{service}-"));
    let labels = slice.metadata.labels.get_or_insert_with(Default::default);
    labels.insert("app".to_owned(), service.to_owned());
    labels.insert(
        "endpointslice.kubernetes.io/managed-by".to_owned(),
        "endpointslice-controller.k8s.io".to_owned(),
    );
    slice.metadata.annotations = Some(
        [(
            "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
            TIME.to_owned(),
        )]
        .into_iter()
        .collect(),
    );
    slice.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Service".to_owned(),
        name: service.to_owned(),
        uid: svc_uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    slice.metadata.uid = Some(uid(2, n));
    slice.metadata.creation_timestamp = Some(time());
    slice.metadata.managed_fields = Some(vec![entry(
        "kube-controller-manager",
        "discovery.k8s.io/v1",
        json!({
            "f:addressType": {},
            "f:endpoints": {},
            "f:metadata": {
                "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                "f:generateName": {},
                "f:labels": {
                    ".": {}, "f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                    "f:kubernetes.io/service-name": {},
                },
                "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{svc_uid}\"}}"): {}},
            },
            "f:ports": {},
        }),
    )]);
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    for (k, e) in slice.endpoints.iter_mut().flatten().enumerate() {
        e.target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".to_owned()),
            name: Some(format!("{service}-7d9f8b6c5d-{k:05x}")),
            namespace: Some(namespace.clone()),
            uid: Some(uid(3, n * 64 + k)),
            ..Default::default()
        });
        e.zone = Some("zone-a".to_owned());
        if let Some(c) = e.conditions.as_mut() {
            c.serving = c.serving.or(c.ready);
            c.terminating = c.terminating.or(Some(false));
        }
    }
    slice
}
