//! The reference verdict on the shapes upstream's NetworkPolicy e2e cases use: pods a, b, c in
//! namespaces x, y, z (labels `pod=<name>`, namespaces `ns=<name>`), policies written as the
//! API carries them.

use std::net::Ipv4Addr;

use serde_json::json;

use super::{Direction, Policy, Protocol, Verdict, World};
use crate::policy::testing::{pod, policy, policy_err, world};

/// Every pair (from, to) the world allows on `protocol`/`port`, as "x/a->y/b".
fn allowed(w: &World, protocol: Protocol, port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for from in &w.pods {
        for to in &w.pods {
            if w.pod_to_pod(from, to, protocol, port) {
                out.push(format!(
                    "{}/{}->{}/{}",
                    from.namespace, from.name, to.namespace, to.name
                ));
            }
        }
    }
    out
}

/// Checks that the pod pairs the world allows on `protocol`/`port` are exactly: every pair whose
/// destination is not in `isolated`, and the `allowed_pairs` (source, or "*" for any; and
/// destination).
fn expect(
    w: &World,
    protocol: Protocol,
    port: u16,
    isolated: &[&str],
    allowed_pairs: &[(&str, &str)],
) -> Result<(), String> {
    let mut want = Vec::new();
    for from in &w.pods {
        for to in &w.pods {
            let f = format!("{}/{}", from.namespace, from.name);
            let t = format!("{}/{}", to.namespace, to.name);
            let ok = !isolated.contains(&t.as_str())
                || allowed_pairs
                    .iter()
                    .any(|(a, b)| (*a == "*" || *a == f) && *b == t);
            if ok {
                want.push(format!("{f}->{t}"));
            }
        }
    }
    let got = allowed(w, protocol, port);
    if got == want {
        return Ok(());
    }
    let missing: Vec<_> = want.iter().filter(|p| !got.contains(p)).collect();
    let extra: Vec<_> = got.iter().filter(|p| !want.contains(p)).collect();
    Err(format!("missing {missing:?}, extra {extra:?}"))
}

/// What a case states: its name, the policies, the protocol and port probed, the pods
/// isolated for ingress, and the (source or "*", destination) pairs allowed to them.
type Case = (
    &'static str,
    Vec<Policy>,
    Protocol,
    u16,
    Vec<&'static str>,
    Vec<(&'static str, &'static str)>,
);

#[test]
fn ingress_cases_match_the_upstream_reachability_matrices() {
    let all_x = ["x/a", "x/b", "x/c"];
    let cases: Vec<Case> = vec![
        (
            "no policy: everything allowed",
            vec![],
            Protocol::Tcp,
            80,
            vec![],
            vec![],
        ),
        (
            "default deny ingress in x (empty podSelector, no rules)",
            vec![policy("x", "deny", json!({"podSelector": {}}))],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![],
        ),
        (
            "allow all ingress in x (one empty rule)",
            vec![policy(
                "x",
                "all",
                json!({"podSelector": {}, "ingress": [{}]}),
            )],
            Protocol::Tcp,
            80,
            vec![],
            vec![],
        ),
        (
            "x/a takes only pods of x labelled pod=b",
            vec![policy(
                "x",
                "a-from-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec!["x/a"],
            vec![("x/b", "x/a")],
        ),
        (
            "x/a takes every pod of namespace y",
            vec![policy(
                "x",
                "a-from-y",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec!["x/a"],
            vec![("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a")],
        ),
        (
            "x/a takes pod=c of namespaces other than x (both selectors, NotIn)",
            vec![policy(
                "x",
                "a-from-c-elsewhere",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{
                           "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                           "podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec!["x/a"],
            vec![("y/c", "x/a"), ("z/c", "x/a")],
        ),
        (
            "two peers in one rule are a union: pod=b of x, or anything of z",
            vec![policy(
                "x",
                "a-from-b-or-z",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [
                           {"podSelector": {"matchLabels": {"pod": "b"}}},
                           {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec!["x/a"],
            vec![
                ("x/b", "x/a"),
                ("z/a", "x/a"),
                ("z/b", "x/a"),
                ("z/c", "x/a"),
            ],
        ),
        (
            "ipBlock with except: 10.0.0.0/16 but not 10.0.2.0/24 (namespace y's pods)",
            vec![policy(
                "x",
                "a-from-block",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec!["x/a"],
            vec![
                ("x/a", "x/a"),
                ("x/b", "x/a"),
                ("x/c", "x/a"),
                ("z/a", "x/a"),
                ("z/b", "x/a"),
                ("z/c", "x/a"),
            ],
        ),
        (
            "ports: only 81/UDP is allowed, so 80/TCP is denied",
            vec![policy(
                "x",
                "udp-only",
                json!({"podSelector": {},
                       "ingress": [{"ports": [{"protocol": "UDP", "port": 81}]}]}),
            )],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![],
        ),
        (
            "ports: 81/UDP allowed from everywhere",
            vec![policy(
                "x",
                "udp-only",
                json!({"podSelector": {},
                       "ingress": [{"ports": [{"protocol": "UDP", "port": 81}]}]}),
            )],
            Protocol::Udp,
            81,
            vec![],
            vec![],
        ),
        (
            "named port serve-80-tcp is 80/TCP on the destination",
            vec![policy(
                "x",
                "named",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec![],
            vec![],
        ),
        (
            "named port of the wrong protocol matches nothing",
            vec![policy(
                "x",
                "named-udp",
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP", "port": "serve-80-tcp"}]}]}),
            )],
            Protocol::Udp,
            80,
            all_x.to_vec(),
            vec![],
        ),
        (
            "endPort: 79-81 includes 80",
            vec![policy(
                "x",
                "range",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 79, "endPort": 81}]}]}),
            )],
            Protocol::Tcp,
            80,
            vec![],
            vec![],
        ),
        (
            "endPort: 81-90 excludes 80",
            vec![policy(
                "x",
                "range",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]}),
            )],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![],
        ),
        (
            "SCTP port 80 allowed: TCP 80 is not",
            vec![policy(
                "x",
                "sctp",
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
            )],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![],
        ),
        (
            "SCTP port 80 allowed: SCTP 80 is",
            vec![policy(
                "x",
                "sctp",
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
            )],
            Protocol::Sctp,
            80,
            vec![],
            vec![],
        ),
        (
            "policies add up: deny all in x, plus x/b from y",
            vec![
                policy("x", "deny", json!({"podSelector": {}})),
                policy(
                    "x",
                    "b-from-y",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
                ),
            ],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![("y/a", "x/b"), ("y/b", "x/b"), ("y/c", "x/b")],
        ),
        (
            "a policy in y never isolates x's pods",
            vec![policy("y", "deny", json!({"podSelector": {}}))],
            Protocol::Tcp,
            80,
            vec!["y/a", "y/b", "y/c"],
            vec![],
        ),
        (
            "an egress-only policy leaves ingress open",
            vec![policy(
                "x",
                "egress-only",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
            )],
            Protocol::Tcp,
            80,
            vec![],
            vec![],
        ),
        (
            "IPv6 block: reported, matches nothing",
            vec![policy(
                "x",
                "v6",
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]}),
            )],
            Protocol::Tcp,
            80,
            all_x.to_vec(),
            vec![],
        ),
    ];
    let mut failures = Vec::new();
    for (what, policies, protocol, port, isolated, pairs) in cases {
        let w = world(policies);
        if let Err(e) = expect(&w, protocol, port, &isolated, &pairs) {
            failures.push(format!("{what}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn egress_rules_and_policy_type_defaulting() {
    // Egress rules without policyTypes: the policy is of both types (ingress: deny all).
    let p = policy(
        "x",
        "both",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    assert!(p.ingress.as_ref().is_some_and(Vec::is_empty));
    assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
    let w = world(vec![p]);
    let a = pod(&w, "x/a");
    let b = pod(&w, "x/b");
    let c = pod(&w, "x/c");
    assert!(w.pod_to_pod(a, b, Protocol::Tcp, 80));
    assert!(!w.pod_to_pod(a, c, Protocol::Tcp, 80), "egress to c denied");
    assert!(
        !w.pod_to_pod(b, a, Protocol::Tcp, 80),
        "ingress to a denied"
    );
    assert!(w.pod_to_pod(b, c, Protocol::Tcp, 80));
    assert_eq!(
        w.verdict(a, Direction::Egress, b.ip, Some(b), Protocol::Tcp, 80),
        Verdict::Allowed {
            policy: "x/both".into(),
            rule: 0
        }
    );
    // Egress to an address outside the cluster through an ipBlock; a named port never matches
    // an address that is no pod.
    let w = world(vec![policy(
        "x",
        "out",
        json!({"podSelector": {}, "policyTypes": ["Egress"],
               "egress": [
                   {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 443}]},
                   {"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": "serve-80-tcp"}]}]}),
    )]);
    let a = pod(&w, "x/a");
    let out = |ip: [u8; 4], port| {
        w.verdict(
            a,
            Direction::Egress,
            Ipv4Addr::from(ip),
            None,
            Protocol::Tcp,
            port,
        )
    };
    assert!(out([192, 0, 2, 7], 443).allows());
    assert!(!out([192, 0, 2, 7], 80).allows());
    assert!(!out([198, 51, 100, 1], 80).allows());
    assert_eq!(out([198, 51, 100, 1], 80), Verdict::Denied);
    // Ingress is not isolated by an Egress-only policy.
    let b = pod(&w, "x/b");
    assert_eq!(
        w.verdict(a, Direction::Ingress, b.ip, Some(b), Protocol::Tcp, 80),
        Verdict::NotIsolated
    );
}

#[test]
fn what_the_api_server_would_refuse_is_an_error() {
    for (spec, want) in [
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}),
            "endPort without port",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "below port",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "numbered port",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}),
            "1-65535",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "unknown protocol",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "outside",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "ipBlock cidr",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
            "needs podSelector",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "needs values",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
            "unknown operator",
        ),
        (
            json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
            "unknown policy type",
        ),
    ] {
        let err = policy_err(spec.clone());
        assert!(err.contains(want), "{spec}: {err}");
    }
    // Reported, not refused: an IPv6 block.
    let p = policy(
        "x",
        "v6",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]}),
    );
    assert_eq!(p.unsupported.len(), 1, "{:?}", p.unsupported);
}
