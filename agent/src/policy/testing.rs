//! Worlds and policies for the policy tests: pods a, b, c in namespaces x, y, z (labels
//! `pod=<name>`, namespaces `ns=<name>`), policies written as the API carries them.

use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::model::{PodInfo, Policy, Protocol, World};

pub fn policy(ns: &str, name: &str, spec: Value) -> Policy {
    let np: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }))
    .unwrap();
    Policy::from_api(&np).unwrap()
}

pub fn policy_err(spec: Value) -> String {
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "bad"},
        "spec": spec,
    }))
    .unwrap();
    Policy::from_api(&np).unwrap_err()
}

/// Nine pods: x/a is 10.0.1.1, x/b 10.0.1.2, ..., z/c 10.0.3.3; each serves `serve-80-tcp`
/// (80/TCP) and `serve-81-udp` (81/UDP).
pub fn world(policies: Vec<Policy>) -> World {
    let mut w = World {
        policies,
        ..World::default()
    };
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        w.namespaces
            .insert((*ns).into(), [("ns".to_owned(), (*ns).to_owned())].into());
        for (j, pod) in ["a", "b", "c"].iter().enumerate() {
            w.pods.push(PodInfo {
                namespace: (*ns).into(),
                name: (*pod).into(),
                labels: [("pod".to_owned(), (*pod).to_owned())].into(),
                ip: Ipv4Addr::new(10, 0, i as u8 + 1, j as u8 + 1),
                named_ports: vec![
                    ("serve-80-tcp".into(), Protocol::Tcp, 80),
                    ("serve-81-udp".into(), Protocol::Udp, 81),
                ],
            });
        }
    }
    w
}

pub fn pod<'a>(w: &'a World, id: &str) -> &'a PodInfo {
    let (ns, name) = id.split_once('/').unwrap();
    w.pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .unwrap()
}
