//! Cluster tier: the agent reads EndpointSlices as the real controller writes them: a Service's
//! endpoints over several slices of at most 100, an endpoint briefly in two slices (counted
//! once), every shape of `ready`/`serving`/`terminating` (fields left out included), and a pod
//! deleted gracefully (draining while terminating and serving, gone after).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use ferrox::services::testing::svc;
use ferrox_tests::harness::{
    Cluster,
    endpoint_slices::{self, Backend, Conditions},
};
use k8s_openapi::api::core::v1::Pod as K8sPod;

/// `n` endpoints with no pod behind them (nothing connects to them here).
fn addresses(n: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend::ready(Ipv4Addr::from(0x0afa_0000 + i)))
        .collect()
}

#[test]
fn endpoints_over_several_slices_and_a_transient_duplicate_are_programmed_once_each() {
    let c = Cluster::builder().nodes(1).build();
    let n = c.node(1);
    let service = c.api().apply(
        &svc("big")
            .cluster_ip("10.96.1.1")
            .port("", 80, "TCP")
            .build(),
    );
    let all = addresses(250);
    let slices = c.publish_endpoints(&service, &all);
    let mut sizes: Vec<usize> = slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [50, 100, 100]);
    let row = n.wait_for_backends("10.96.1.1:80/TCP", 250);
    let distinct: BTreeSet<&str> = row.backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(distinct.len(), 250);

    // The controller moves an endpoint: for a moment it is in two slices. Still one backend.
    let moved = all[3].ip;
    let holder = slices
        .iter()
        .position(|s| {
            s.endpoints
                .iter()
                .flatten()
                .any(|e| e.addresses[0] == moved.to_string())
        })
        .unwrap();
    let into = (holder + 1) % slices.len();
    c.api()
        .replace(&endpoint_slices::with_duplicate(&slices, moved, into))
        .unwrap();
    // A marker after the duplicate: once it is programmed, the duplicate was seen too.
    let marker = c.api().apply(
        &svc("marker")
            .cluster_ip("10.96.1.2")
            .port("", 80, "TCP")
            .build(),
    );
    c.publish_endpoints(&marker, &addresses(1));
    n.wait_for_backends("10.96.1.2:80/TCP", 1);
    let row = n.wait_for_backends("10.96.1.1:80/TCP", 250);
    assert_eq!(
        row.backends
            .iter()
            .filter(|b| b.address.starts_with(&format!("{moved}:")))
            .count(),
        1,
        "{moved} counted once: {:?}",
        row.backends
    );
    // Resolved (the second copy removed), then 60 endpoints leave: the slice emptied goes, the
    // others keep their endpoints where they were (the controller does not repack).
    c.publish_endpoints(&service, &all);
    n.wait_for_backends("10.96.1.1:80/TCP", 250);
    let slices = c.publish_endpoints(&service, &all[..190]);
    let mut sizes: Vec<usize> = slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [90, 100]);
    n.wait_for_backends("10.96.1.1:80/TCP", 190);
}

#[test]
fn every_shape_of_endpoint_conditions_is_read_as_the_api_defines_it() {
    let c = Cluster::builder().nodes(1).build();
    let n = c.node(1);
    // One Service per shape, one endpoint each: (conditions, programmed?). A terminating
    // endpoint that still serves is used only while nothing is ready (each is alone here).
    let ready_only = Conditions::ready_only;
    let shapes = [
        ("ready", Conditions::READY, true),
        ("not-ready", Conditions::NOT_READY, false),
        ("draining", Conditions::TERMINATING_SERVING, true),
        ("terminating", Conditions::TERMINATING, false),
        // publishNotReadyAddresses: ready while terminating.
        ("published", Conditions::of_pod(false, true, true), true),
        // Fields left out: `ready` absent means ready; `serving` absent means `serving` = `ready`;
        // `terminating` absent means not terminating.
        ("unknown", Conditions::UNKNOWN, true),
        ("old-ready", ready_only(true), true),
        ("old-not-ready", ready_only(false), false),
        (
            "ready-absent-terminating",
            Conditions {
                terminating: Some(true),
                ..Conditions::UNKNOWN
            },
            true,
        ),
        (
            "serving-absent-terminating",
            Conditions {
                ready: Some(false),
                serving: None,
                terminating: Some(true),
            },
            false,
        ),
        (
            "serving-absent-ready",
            Conditions {
                ready: Some(true),
                serving: None,
                terminating: Some(false),
            },
            true,
        ),
    ];
    for (i, (name, conditions, _)) in shapes.iter().enumerate() {
        let service = c.api().apply(
            &svc(name)
                .cluster_ip(&format!("10.96.2.{}", i + 1))
                .port("", 80, "TCP")
                .build(),
        );
        c.publish_endpoints(
            &service,
            &[Backend::ready(Ipv4Addr::new(10, 250, 2, i as u8 + 1)).conditions(*conditions)],
        );
    }
    // Written last: once it is programmed, every slice before it was seen.
    let marker = c.api().apply(
        &svc("marker")
            .cluster_ip("10.96.2.200")
            .port("", 80, "TCP")
            .build(),
    );
    c.publish_endpoints(&marker, &addresses(1));
    n.wait_for_backends("10.96.2.200:80/TCP", 1);
    let rows = n.services();
    let mut wrong = Vec::new();
    for (i, (name, _, used)) in shapes.iter().enumerate() {
        let frontend = format!("10.96.2.{}:80/TCP", i + 1);
        let backends = rows
            .iter()
            .find(|r| r.frontend == frontend)
            .map(|r| r.backends.len());
        if backends != Some(usize::from(*used)) {
            wrong.push(format!(
                "{name}: {backends:?} backends, want {}",
                usize::from(*used)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_pod_deleted_gracefully_drains_while_it_serves_and_leaves_when_it_is_gone() {
    let c = Cluster::builder().nodes(1).build();
    let n = c.node(1);
    let a = c.add_pod(1, "a");
    let b = c.add_pod(1, "b");
    let client = c.add_pod(1, "client");
    let _sa = a.serve(8080);
    let _sb = b.serve(8080);
    let service = c.api().apply(
        &svc("web")
            .cluster_ip("10.96.3.1")
            .port("", 80, "TCP")
            .build(),
    );
    // The Service port's targetPort is its port unless set: ask for 8080.
    let mut service = service;
    service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080));
    let service = c.api().apply(&service);
    c.publish_endpoints(&service, &[a.backend(), b.backend()]);
    n.wait_for_backends("10.96.3.1:80/TCP", 2);

    // a is deleted: it stays, terminating; its endpoint is not ready any more but serving, and
    // since b is ready, only b gets new connections.
    let deleting_a = c.delete_pod(&a, Duration::from_secs(30));
    let pod: K8sPod = c.api().get(Some("default"), "a").expect("a is still there");
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(30));
    let row = n.wait_for_backends("10.96.3.1:80/TCP", 1);
    assert!(row.backends[0].address.starts_with(&format!("{}:", b.ip)));
    assert!(!row.backends[0].terminating);
    let (answers, _) = client.call_tcp("10.96.3.1:80", 10);
    assert_eq!(answers.get("b"), Some(&10), "{answers:?}");

    // b is deleted too (a rolling update's last step): nothing is ready, so the terminating
    // endpoints that still serve take the traffic rather than a refusal.
    let deleting_b = c.delete_pod(&b, Duration::from_secs(30));
    let row = n.wait_for_backends("10.96.3.1:80/TCP", 2);
    assert!(row.backends.iter().all(|b| b.terminating), "{row:?}");
    let (answers, _) = client.call_tcp("10.96.3.1:80", 20);
    assert_eq!(answers.values().sum::<usize>(), 20, "{answers:?}");

    // a fails its readiness probe while shutting down, then is gone.
    deleting_a.stop_serving();
    let row = n.wait_for_backends("10.96.3.1:80/TCP", 1);
    assert!(row.backends[0].address.starts_with(&format!("{}:", b.ip)));
    deleting_a.finish();
    assert!(c.api().get::<K8sPod>(Some("default"), "a").is_none());
    let (answers, _) = client.call_tcp("10.96.3.1:80", 5);
    assert_eq!(answers.get("b"), Some(&5), "{answers:?}");

    // b goes without a last unready phase (killed at the end of its grace period).
    deleting_b.finish();
    n.wait_for_backends("10.96.3.1:80/TCP", 0);
    let (status, lines) = client.run(&["call", "tcp", "10.96.3.1:80", "--timeout-ms", "2000"]);
    assert!(!status.success(), "{lines:?}");
}
