//! Worlds and policies for the policy tests (unit and cluster): pods a, b, c in namespaces x,
//! y, z (labels `pod=<name>`, namespaces `ns=<name>`), policies written as the API carries them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test builders: a malformed fixture should stop the test"
)]

use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::model::{Direction, PodInfo, Policy, Protocol, Verdict, World};

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

/// Worlds that between them use every kind of selector, block, port and policy type, for the
/// tests that check the compiled tables (in memory and in the kernel) against the model.
pub fn sample_worlds() -> Vec<(&'static str, World)> {
    vec![
        ("none", vec![]),
        (
            "deny all ingress in x",
            vec![policy("x", "deny", json!({"podSelector": {}}))],
        ),
        (
            "selectors of every kind",
            vec![
                policy(
                    "x",
                    "a",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [
                               {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
                               {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                          "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "c"]}]}}],
                                "ports": [{"port": 80}, {"protocol": "UDP", "port": 81}]}]}),
                ),
                policy(
                    "y",
                    "egress",
                    json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                           "policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]},
                                      {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]}]}),
                ),
            ],
        ),
        (
            "blocks overlapping pods and each other",
            vec![
                policy(
                    "z",
                    "blocks",
                    json!({"podSelector": {},
                           "ingress": [
                               {"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24", "10.0.3.3/32"]}}],
                                "ports": [{"port": 79, "endPort": 81}]},
                               {"from": [{"ipBlock": {"cidr": "10.0.2.0/23"}}], "ports": [{"protocol": "SCTP"}]}],
                           "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}],
                           "policyTypes": ["Ingress", "Egress"]}),
                ),
                policy(
                    "x",
                    "named",
                    json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
                ),
            ],
        ),
        (
            "allow everything to a, deny egress everywhere in y",
            vec![
                policy(
                    "x",
                    "open",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
                ),
                policy(
                    "y",
                    "no-egress",
                    json!({"podSelector": {}, "policyTypes": ["Egress"]}),
                ),
                policy(
                    "z",
                    "egress-named",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"ports": [{"port": "serve-80-tcp"}, {"port": 443}]}]}),
                ),
            ],
        ),
    ]
    .into_iter()
    .map(|(what, policies)| (what, world(policies)))
    .collect()
}

/// Every probe of `w`'s verdicts: each pod, direction, peer (every pod, and addresses inside and
/// outside the sample worlds' blocks), protocol and port, with the model's verdict; and the
/// probes where `tables` (a table's verdict for the pod: `None` when not isolated, else the
/// allowing entry if any) disagrees with it, described.
pub fn disagreements<T: std::fmt::Debug>(
    what: &str,
    w: &World,
    mut tables: impl FnMut(&PodInfo, Direction, Ipv4Addr, Protocol, u16) -> Option<Option<T>>,
) -> Vec<String> {
    let mut peers: Vec<Ipv4Addr> = w.pods.iter().map(|p| p.ip).collect();
    peers.extend([
        Ipv4Addr::new(10, 0, 9, 9),
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 200),
        Ipv4Addr::new(198, 51, 100, 7),
    ]);
    let mut out = Vec::new();
    for pod in &w.pods {
        for dir in [Direction::Ingress, Direction::Egress] {
            for peer in &peers {
                for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    for port in [79u16, 80, 81, 443, 8080] {
                        let model = w.verdict(pod, dir, *peer, w.pod_by_ip(*peer), protocol, port);
                        let table = tables(pod, dir, *peer, protocol, port);
                        let same = matches!(
                            (&model, &table),
                            (Verdict::NotIsolated, None)
                                | (Verdict::Denied, Some(None))
                                | (Verdict::Allowed { .. }, Some(Some(_)))
                        );
                        if !same {
                            out.push(format!(
                                "{what}: {}/{} {dir:?} peer {peer} {protocol:?}/{port}: model {model:?}, tables {table:?}",
                                pod.namespace, pod.name
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}
