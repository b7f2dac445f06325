//! Cluster tier: a pod reaches a ClusterIP Service programmed through the Kubernetes API, with
//! backends on its own node and on the other one, over TCP and UDP, and sees the frontend
//! address, never the backend's. Real binaries, real traffic, network namespaces.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{collections::BTreeSet, time::Duration};

use ferrox::services::testing::{slice, svc};
use ferrox_abi::{Hook, Reason};
use ferrox_datapath::Maps;
use ferrox_tests::harness::Cluster;
use k8s_openapi::api::core::v1::Service;

#[test]
fn pod_reaches_cluster_ip_backends_on_both_nodes_over_tcp_and_udp() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);

    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "TCP")
            .port("dns", 53, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("web", "web-abc")
            .port("", 8080, "TCP")
            .port("dns", 8080, "UDP")
            .ready(web1.ip)
            .ready(web2.ip)
            .build(),
    );
    c.node(1).wait_for_backends("10.96.0.10:80/TCP", 2);
    c.node(1).wait_for_backends("10.96.0.10:53/UDP", 2);

    // TCP: 40 connections are spread over both backends (a backend missed by 40 fair coin
    // flips has probability 2^-39), and the application's peer is the ClusterIP.
    let (by_backend, peers) = client.call_tcp("10.96.0.10:80", 40);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    assert_eq!(
        peers.iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([&"10.96.0.10:80".to_owned()])
    );

    // UDP on an unconnected socket: each datagram is translated (sendmsg4) and each reply comes
    // from the ClusterIP (recvmsg4), as a DNS client requires.
    let (by_backend, froms) = client.call_udp("10.96.0.10:53", 30);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    assert!(froms.iter().all(|f| f == "10.96.0.10:53"), "{froms:?}");

    // UDP on a connected socket goes through connect4 instead.
    let (status, lines) = client.run(&[
        "call",
        "udp",
        "10.96.0.10:53",
        "--connected",
        "--count",
        "5",
    ]);
    assert!(status.success(), "{lines:?}");
    assert!(
        lines.iter().all(|l| l["from"] == "10.96.0.10:53"),
        "{lines:?}"
    );

    // The datapath counted what it did.
    let maps = Maps::open(&c.node(1).layout()).unwrap();
    let connects = maps
        .counters
        .get(Hook::SockConnect4, Reason::TranslateToBackend)
        .unwrap()
        .packets;
    let sends = maps
        .counters
        .get(Hook::SockSendmsg4, Reason::TranslateToBackend)
        .unwrap()
        .packets;
    let reverse = maps
        .counters
        .get(Hook::SockRecvmsg4, Reason::TranslateToFrontend)
        .unwrap()
        .packets;
    assert!(connects >= 45, "connect4 translations: {connects}");
    assert!(sends >= 30, "sendmsg4 translations: {sends}");
    assert!(reverse >= 30, "recvmsg4 reverse translations: {reverse}");
    let from_pod = maps
        .counters
        .get(Hook::TcFromPod, Reason::PassTcp)
        .unwrap()
        .packets;
    assert!(
        from_pod > 0,
        "the pod-facing TC program saw the pods' TCP packets"
    );
}

#[test]
fn backends_follow_the_endpoints_and_a_service_without_endpoints_refuses() {
    let c = Cluster::builder().nodes(1).build();
    let a = c.add_pod(1, "a");
    let b = c.add_pod(1, "b");
    let client = c.add_pod(1, "client");
    let _sa = a.serve(8080);
    let _sb = b.serve(8080);
    let n = c.node(1);

    // No endpoints yet: the frontend exists and refuses at once, instead of timing out.
    c.api().apply(
        &svc("api")
            .cluster_ip("10.96.0.20")
            .port("", 80, "TCP")
            .build(),
    );
    n.wait_for_backends("10.96.0.20:80/TCP", 0);
    let (status, lines) = client.run(&["call", "tcp", "10.96.0.20:80", "--timeout-ms", "2000"]);
    assert!(!status.success());
    let err = lines[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        err.contains("not permitted"),
        "connect should fail with EPERM, got {err:?}"
    );

    // Two endpoints, then one: calls follow.
    c.api().apply(
        &slice("api", "api-1")
            .port("", 8080, "TCP")
            .ready(a.ip)
            .ready(b.ip)
            .build(),
    );
    n.wait_for_backends("10.96.0.20:80/TCP", 2);
    let (by_backend, _) = client.call_tcp("10.96.0.20:80", 30);
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");

    c.api().apply(
        &slice("api", "api-1")
            .port("", 8080, "TCP")
            .ready(b.ip)
            .not_ready(a.ip)
            .build(),
    );
    n.wait_for_backends("10.96.0.20:80/TCP", 1);
    let (by_backend, _) = client.call_tcp("10.96.0.20:80", 10);
    assert_eq!(
        by_backend.into_iter().collect::<Vec<_>>(),
        [("b".to_owned(), 10)]
    );

    // Deleting the Service removes its frontend and every backend entry.
    c.api().delete::<Service>(Some("default"), "api").unwrap();
    n.wait_for_no_frontend("10.96.0.20:80/TCP");
    let maps = Maps::open(&n.layout()).unwrap();
    assert!(maps.services.entries().unwrap().is_empty());
    assert!(maps.backends.entries().unwrap().is_empty());
}

#[test]
fn a_pod_reaching_its_own_service_lands_on_itself() {
    let c = Cluster::builder().nodes(1).build();
    let web = c.add_pod(1, "web");
    let _s = web.serve(8080);
    c.api().apply(
        &svc("self")
            .cluster_ip("10.96.0.60")
            .port("", 80, "TCP")
            .port("dns", 53, "UDP")
            .build(),
    );
    c.api().apply(
        &slice("self", "s")
            .port("", 8080, "TCP")
            .port("dns", 8080, "UDP")
            .ready_on(web.ip, "node-1")
            .build(),
    );
    c.node(1).wait_for_backends("10.96.0.60:80/TCP", 1);
    c.node(1).wait_for_backends("10.96.0.60:53/UDP", 1);
    // The only backend is the client itself (hairpin): it answers, and it sees its own address
    // as the client's, the one it would see without a Service in between.
    let (status, lines) = web.run(&["call", "tcp", "10.96.0.60:80", "--count", "5"]);
    assert!(status.success(), "{lines:?}");
    for l in &lines {
        assert_eq!(l["backend"], "web");
        assert_eq!(l["peer"], "10.96.0.60:80");
        assert!(
            l["seen_by_backend"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", web.ip)),
            "{l}"
        );
    }
    let (by_backend, froms) = web.call_udp("10.96.0.60:53", 5);
    assert_eq!(by_backend.get("web"), Some(&5), "{by_backend:?}");
    assert!(froms.iter().all(|f| f == "10.96.0.60:53"), "{froms:?}");
}

#[test]
fn connections_the_socket_hooks_cannot_see_are_translated_at_the_pod_interface() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    for (name, ip, pods) in [
        ("web", "10.96.0.70", vec![&web1, &web2]),
        ("self", "10.96.0.71", vec![&web1]),
    ] {
        c.api().apply(
            &svc(name)
                .cluster_ip(ip)
                .port("", 80, "TCP")
                .port("dns", 53, "UDP")
                .build(),
        );
        let mut s = slice(name, &format!("{name}-s"))
            .port("", 8080, "TCP")
            .port("dns", 8080, "UDP");
        for p in pods {
            s = s.ready_on(p.ip, &format!("node-{}", p.node));
        }
        c.api().apply(&s.build());
    }
    c.node(1).wait_for_backends("10.96.0.70:80/TCP", 2);
    c.node(1).wait_for_backends("10.96.0.70:53/UDP", 2);
    c.node(1).wait_for_backends("10.96.0.71:80/TCP", 1);
    let maps = Maps::open(&c.node(1).layout()).unwrap();
    let pod_nat = || {
        maps.counters
            .get(Hook::TcFromPod, Reason::NatNewFlow)
            .unwrap()
            .packets
    };
    // Packets the pod interface translated: first packets of flows, and later ones (a UDP
    // socket may get a source port an earlier one had, whose flow is still tracked).
    let pod_translated = || {
        pod_nat()
            + maps
                .counters
                .get(Hook::TcFromPod, Reason::NatEstablished)
                .unwrap()
                .packets
    };

    // A process the socket hooks see: translated at connect, nothing for the pod interface.
    let before = pod_nat();
    let before_all = pod_translated();
    let (by_backend, _) = client.call_tcp("10.96.0.70:80", 10);
    assert_eq!(by_backend.values().sum::<usize>(), 10);
    assert_eq!(pod_nat(), before, "the socket hooks translated these");
    assert_eq!(pod_translated(), before_all);

    // A process outside the hooked cgroup, in the same pod: its packets leave the pod still
    // addressed to the Service and are translated at the pod's veth, replies on their way back
    // (from the local backend at its veth, from the remote one at the uplink).
    let unhooked = c.unhooked(&client);
    let (status, lines) = unhooked.run(&["call", "tcp", "10.96.0.70:80", "--count", "30"]);
    assert!(status.success(), "{lines:?}");
    let backends: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, BTreeSet::from(["web-1", "web-2"]));
    assert!(lines.iter().all(|l| l["peer"] == "10.96.0.70:80"));
    // No SNAT: both backends see the pod's own address.
    assert!(lines.iter().all(|l| {
        l["seen_by_backend"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", client.ip))
    }));
    let (by_backend, froms) = unhooked.call_udp("10.96.0.70:53", 30);
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
    assert!(froms.iter().all(|f| f == "10.96.0.70:53"), "{froms:?}");
    assert!(
        pod_nat() >= before + 30,
        "every TCP connection is a new flow at the pod interface"
    );
    assert!(
        pod_translated() >= before_all + 60,
        "every connection and datagram translated at the pod interface"
    );

    // Hairpin through the fallback: the only backend is the client itself; it sees the pod
    // gateway's address as the client (a pod drops packets from its own address).
    let (status, lines) = c
        .unhooked(&web1)
        .run(&["call", "tcp", "10.96.0.71:80", "--count", "3"]);
    assert!(status.success(), "{lines:?}");
    for l in &lines {
        assert_eq!(l["backend"], "web-1");
        assert_eq!(l["peer"], "10.96.0.71:80");
        assert!(
            l["seen_by_backend"]
                .as_str()
                .unwrap()
                .starts_with("169.254.1.1:"),
            "{l}"
        );
    }
}

#[test]
fn a_connected_udp_socket_whose_backend_leaves_is_closed_and_the_next_one_works() {
    let c = Cluster::builder().nodes(2).build();
    let dns1 = c.add_pod(1, "dns-1");
    let dns2 = c.add_pod(2, "dns-2");
    let client = c.add_pod(1, "client");
    let servers = [dns1.serve(5353), dns2.serve(5353)];
    c.api().apply(
        &svc("dns")
            .cluster_ip("10.96.0.53")
            .port("dns", 53, "UDP")
            .build(),
    );
    let endpoints = |pods: &[&ferrox_tests::harness::Pod]| {
        let mut s = slice("dns", "dns-s").port("dns", 5353, "UDP");
        for p in pods {
            s = s.ready_on(p.ip, &format!("node-{}", p.node));
        }
        s.build()
    };
    c.api().apply(&endpoints(&[&dns1, &dns2]));
    c.node(1).wait_for_backends("10.96.0.53:53/UDP", 2);

    // A resolver-like client: one connected socket, asking every 50 ms.
    let mut session = client.spawn(&["udp-session", "10.96.0.53:53"]);
    let first = session.wait_for_line("a first answer", Duration::from_secs(10), |l| {
        l.contains("\"backend\"")
    });
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let first = first["backend"].as_str().unwrap().to_owned();
    let (gone, stays) = if first == "dns-1" {
        (0, &dns2)
    } else {
        (1, &dns1)
    };
    let answered_before = session.lines().len();

    // Its backend goes silent (frozen, or its node lost: no reply and no ICMP error, so the
    // client learns nothing by itself), and leaves the endpoints.
    // SAFETY: kill(2) on a child this test owns.
    assert_eq!(
        unsafe { libc::kill(servers[gone].pid() as i32, libc::SIGSTOP) },
        0
    );
    c.api().apply(&endpoints(&[stays]));
    c.node(1).wait_for_backends("10.96.0.53:53/UDP", 1);
    // The agent closes the socket; the client's next call fails, it opens a new socket, which
    // the hooks send to the backend that is left.
    session.wait_for_line(
        "an answer from the other backend",
        Duration::from_secs(10),
        |l| l.contains(&format!("\"backend\":\"{}\"", stays.name)),
    );
    let after: Vec<String> = session.lines()[answered_before..].to_vec();
    assert!(
        after.iter().any(|l| l.contains("socket_error")),
        "the socket was closed under the client: {after:?}"
    );
    let timeouts = after.iter().filter(|l| l.contains("timeout")).count();
    assert!(
        timeouts <= 5,
        "{timeouts} queries lost before the socket was closed: {after:?}"
    );
    assert!(
        c.node(1)
            .agent_log()
            .iter()
            .any(|l| l.contains("sockets_closed=1")),
        "the agent reports the closed socket"
    );
    let status = session.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
}

#[test]
fn after_its_watches_expire_the_agent_relists_and_programs_what_changed_meanwhile() {
    let c = Cluster::builder().nodes(2).build();
    let web1 = c.add_pod(1, "web-1");
    let web2 = c.add_pod(2, "web-2");
    let client = c.add_pod(1, "client");
    let _s1 = web1.serve(8080);
    let _s2 = web2.serve(8080);
    let endpoints = |name: &str, pods: &[&ferrox_tests::harness::Pod]| {
        let mut s = slice(name, &format!("{name}-s")).port("", 8080, "TCP");
        for p in pods {
            s = s.ready_on(p.ip, &format!("node-{}", p.node));
        }
        s.build()
    };
    c.api().apply(
        &svc("web")
            .cluster_ip("10.96.0.80")
            .port("", 80, "TCP")
            .build(),
    );
    c.api().apply(&endpoints("web", &[&web1]));
    for n in c.nodes() {
        n.wait_for_backends("10.96.0.80:80/TCP", 1);
    }

    // The control plane ends every watch (a restart, a timeout) and compacts while the agents
    // are away; what changed meanwhile reaches them only through a re-list.
    let log = c.expire_watches(|| {
        c.api().apply(&endpoints("web", &[&web1, &web2]));
        c.api().apply(
            &svc("late")
                .cluster_ip("10.96.0.81")
                .port("", 80, "TCP")
                .build(),
        );
        c.api().apply(&endpoints("late", &[&web2]));
    });
    for n in c.nodes() {
        n.wait_for_backends("10.96.0.80:80/TCP", 2);
        n.wait_for_backends("10.96.0.81:80/TCP", 1);
    }
    let (by_backend, _) = client.call_tcp("10.96.0.80:80", 40);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_backend:?}"
    );
    let (by_backend, _) = client.call_tcp("10.96.0.81:80", 5);
    assert_eq!(by_backend.get("web-2"), Some(&5), "{by_backend:?}");

    // The request log shows, for each agent and each kind it syncs Services from, the watch
    // answered 410 Gone, then the re-list, then a new watch.
    for n in c.nodes() {
        for resource in ["services", "endpointslices", "nodes"] {
            let calls: Vec<(&str, Option<u16>)> = log
                .iter()
                .filter(|r| {
                    r.resource == resource
                        && r.source.map(|s| s.ip()) == Some(std::net::IpAddr::V4(n.addr))
                })
                .map(|r| (r.verb.as_str(), r.watch_error))
                .collect();
            let gone = calls
                .iter()
                .position(|c| *c == ("watch", Some(410)))
                .unwrap_or_else(|| panic!("{} {resource}: no 410: {calls:?}", n.name));
            assert!(
                calls[gone..].contains(&("list", None)),
                "{} {resource}: no re-list after the 410: {calls:?}",
                n.name
            );
            assert_eq!(
                calls.last(),
                Some(&("watch", None)),
                "{} {resource}: watching again",
                n.name
            );
        }
        assert!(
            n.agent_log()
                .iter()
                .any(|l| l.contains("too old resource version")),
            "{}: the agent saw the 410",
            n.name
        );
    }
}
