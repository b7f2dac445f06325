//! The compiled tables give the model's verdict for every local pod, direction, peer (every pod
//! and addresses outside them), protocol and port of a set of worlds.

use serde_json::json;

use super::{PortPrefix, compile, port_prefixes};
use crate::policy::{
    model::World,
    testing::{disagreements, policy, sample_worlds, world},
};

#[test]
fn port_ranges_become_the_fewest_aligned_prefixes() {
    let p = |value: u16, len: u8| PortPrefix { value, len };
    assert_eq!(port_prefixes(80, 80), vec![p(80, 16)]);
    assert_eq!(port_prefixes(0, 65535), vec![p(0, 0)]);
    assert_eq!(port_prefixes(79, 81), vec![p(79, 16), p(80, 15)]);
    assert_eq!(port_prefixes(1, 65535).len(), 16);
    // Every range's prefixes cover exactly its ports.
    for (a, b) in [
        (1u16, 1000u16),
        (30000, 32767),
        (443, 8443),
        (1024, 65535),
        (7, 7),
    ] {
        let pp = port_prefixes(a, b);
        assert!(pp.len() <= 30, "{a}-{b}: {}", pp.len());
        for port in 0..=u16::MAX {
            let n = pp.iter().filter(|x| x.contains(port)).count();
            assert_eq!(n, usize::from((a..=b).contains(&port)), "{a}-{b} at {port}");
        }
    }
}

/// Checks every verdict of `w` (all its pods local) against the compiled tables.
fn agree(what: &str, w: &World) -> Vec<String> {
    let local: Vec<String> = w
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let c = compile(w, &local);
    disagreements(what, w, |pod, dir, peer, protocol, port| {
        c.verdict(
            &format!("{}/{}", pod.namespace, pod.name),
            dir,
            peer,
            protocol,
            port,
        )
    })
}

#[test]
fn the_compiled_tables_agree_with_the_model() {
    let mut failures = Vec::new();
    for (what, w) in sample_worlds() {
        failures.extend(agree(what, &w));
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}

#[test]
fn pods_alike_share_an_identity_and_unselected_pods_get_no_table() {
    let w = world(vec![policy(
        "x",
        "deny",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
    )]);
    let local = vec!["x/a".to_owned(), "x/b".to_owned()];
    let c = compile(&w, &local);
    assert_eq!(c.endpoints.len(), 1, "only x/a is isolated");
    // Nine pods in three namespaces with three label sets: nine identities; with the world's
    // /0 the ipcache holds ten prefixes.
    assert_eq!(c.ipcache.len(), 10);
    let mut same = world(vec![]);
    for p in &mut same.pods {
        p.labels.clear();
    }
    let c = compile(&same, &[]);
    let ids: std::collections::BTreeSet<u32> = c.ipcache.values().copied().collect();
    assert_eq!(ids.len(), 4, "one identity per namespace, and the world's");
}

/// Labels no peer selector reads (a pod-name label, say) give no pod an identity of its own:
/// the entries of a rule grow with the distinct peers policies can tell apart, not with pods;
/// and the verdicts stay the model's.
#[test]
fn labels_no_peer_selector_reads_do_not_split_identities() {
    let mut w = world(vec![
        policy(
            "x",
            "from-b",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
        // Its own pod selector reads `idx`: that selects local pods, it does not tell peers apart.
        policy(
            "y",
            "one",
            json!({"podSelector": {"matchLabels": {"idx": "4"}}, "policyTypes": ["Egress"]}),
        ),
    ]);
    // A second replica of every pod, then a distinct `idx` on each of the 18.
    let replicas: Vec<_> = w
        .pods
        .iter()
        .map(|p| {
            let mut r = p.clone();
            r.name = format!("{}-2", p.name);
            r.ip = std::net::Ipv4Addr::from(u32::from(p.ip) + 100);
            r
        })
        .collect();
    w.pods.extend(replicas);
    for (i, p) in w.pods.iter_mut().enumerate() {
        p.labels.insert("idx".into(), i.to_string());
        // The same named ports everywhere, so only namespace and `pod` tell pods apart.
        p.named_ports.clear();
    }
    let local: Vec<String> = w
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let c = compile(&w, &local);
    let identities: std::collections::BTreeSet<u32> =
        w.pods.iter().map(|p| c.identity(p.ip)).collect();
    assert_eq!(
        identities.len(),
        9,
        "one per (namespace, pod label), not per pod"
    );
    // x/a allows every b: one entry per namespace's b, whatever their idx.
    let xa = &c.endpoints["x/a"];
    assert_eq!(xa.entries.len(), 3, "{:?}", xa.entries);
    let wrong = disagreements("idx labels", &w, |pod, dir, peer, protocol, port| {
        c.verdict(
            &format!("{}/{}", pod.namespace, pod.name),
            dir,
            peer,
            protocol,
            port,
        )
    });
    assert!(wrong.is_empty(), "{wrong:#?}");
}
