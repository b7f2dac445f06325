//! Cluster tier: NetworkPolicy conformance the way upstream Kubernetes checks it. Nine pods (a,
//! b, c in namespaces x, y, z, spread over two nodes) serve TCP and UDP on ports 80 and 81;
//! for each case its policies go into the API, and every pod probes every other pod on every
//! port over both protocols until the whole reachability matrix is the one the reference model
//! (`ferrox::policy::model`, unit-tested against the upstream semantics) gives, or a deadline
//! passes and the differences are reported. Real agents, real CNI, real traffic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ferrox::policy::model::{Labels, PodInfo, Policy, Protocol, World};
use ferrox_tests::harness::{Cluster, Pod};
use k8s_openapi::api::{
    core::v1::{Container, ContainerPort, Namespace, Pod as K8sPod, PodSpec},
    networking::v1::NetworkPolicy,
};
use kube::api::ObjectMeta;
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// What every pod serves, and what the matrices probe.
const PORTS: [(Protocol, u16); 4] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 80),
    (Protocol::Udp, 81),
];
/// How long a change of policies or labels may take to show in the matrix.
const CONVERGE: Duration = Duration::from_secs(20);

/// One probe: from pod, to pod (`namespace/name`), protocol, port.
type Probe = (String, String, Protocol, u16);

struct Lab {
    cluster: Cluster,
    pods: Vec<(String, Pod)>,
    world: World,
    /// The matrix the last step converged to: a step expecting the same one could pass before
    /// the agents applied it, so none may.
    last: Option<BTreeMap<Probe, bool>>,
    _servers: Vec<ferrox_tests::harness::Proc>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn namespace_object(name: &str, l: &Labels) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(l.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pod_template(ns: &str, name: &str, l: &Labels) -> K8sPod {
    let port = |name: &str, protocol: &str, number: i32| ContainerPort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        container_port: number,
        ..Default::default()
    };
    K8sPod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(l.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "fx-echo".into(),
                ports: Some(vec![
                    port("serve-80-tcp", "TCP", 80),
                    port("serve-81-tcp", "TCP", 81),
                    port("serve-80-udp", "UDP", 80),
                    port("serve-81-udp", "UDP", 81),
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Lab {
    fn new() -> Self {
        let cluster = Cluster::builder().nodes(2).build();
        let mut world = World::default();
        for ns in NAMESPACES {
            // The label the API server gives every namespace, and one of ours.
            let l = labels(&[("ns", ns), ("kubernetes.io/metadata.name", ns)]);
            cluster.api().apply(&namespace_object(ns, &l));
            world.namespaces.insert(ns.into(), l);
        }
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, name) in PODS.iter().enumerate() {
                let l = labels(&[("pod", name)]);
                let pod = cluster.add_pod_as(1 + (i + j) % 2, pod_template(ns, name, &l));
                let server = pod.spawn(&[
                    "serve", "--name", name, "--tcp", "80", "--tcp", "81", "--udp", "80", "--udp",
                    "81",
                ]);
                server.wait_for_line("the echo server", Duration::from_secs(10), |l| {
                    l == "serving"
                });
                servers.push(server);
                world.pods.push(PodInfo {
                    namespace: (*ns).into(),
                    name: (*name).into(),
                    labels: l,
                    ip: pod.ip,
                    named_ports: vec![
                        ("serve-80-tcp".into(), Protocol::Tcp, 80),
                        ("serve-81-tcp".into(), Protocol::Tcp, 81),
                        ("serve-80-udp".into(), Protocol::Udp, 80),
                        ("serve-81-udp".into(), Protocol::Udp, 81),
                    ],
                });
                pods.push((format!("{ns}/{name}"), pod));
            }
        }
        Self {
            cluster,
            pods,
            world,
            last: None,
            _servers: servers,
        }
    }

    fn ip(&self, id: &str) -> std::net::Ipv4Addr {
        self.pod(id).ip
    }

    /// The pod `namespace/name`.
    fn pod(&self, id: &str) -> Pod {
        self.pods.iter().find(|(p, _)| p == id).unwrap().1.clone()
    }

    /// Service `web` of namespace y at `cluster_ip`:80, its one backend y/b, programmed on
    /// both nodes.
    fn web_service(&self, cluster_ip: &str) {
        use ferrox::services::testing::{slice, svc};
        let c = &self.cluster;
        c.api().apply(
            &svc("web")
                .namespace("y")
                .cluster_ip(cluster_ip)
                .port("", 80, "TCP")
                .build(),
        );
        c.api().apply(
            &slice("web", "web-1")
                .namespace("y")
                .port("", 80, "TCP")
                .ready(self.ip("y/b"))
                .build(),
        );
        for n in [1, 2] {
            c.node(n)
                .wait_for_backends(&format!("{cluster_ip}:80/TCP"), 1);
        }
    }

    /// Replaces the policies in the API (and in the model) by `policies`.
    fn set_policies(&mut self, policies: &[Value]) {
        let new: Vec<NetworkPolicy> = policies
            .iter()
            .map(|v| serde_json::from_value(v.clone()).unwrap())
            .collect();
        let kept = |p: &Policy| {
            new.iter().any(|n| {
                n.metadata.namespace.as_deref() == Some(&p.namespace)
                    && n.metadata.name.as_deref() == Some(&p.name)
            })
        };
        for p in self.world.policies.iter().filter(|p| !kept(p)) {
            self.cluster
                .api()
                .delete::<NetworkPolicy>(Some(&p.namespace), &p.name)
                .unwrap();
        }
        self.world.policies.clear();
        for np in new {
            self.cluster.api().apply(&np);
            self.world.policies.push(Policy::from_api(&np).unwrap());
        }
    }

    fn set_namespace_labels(&mut self, ns: &str, l: Labels) {
        self.cluster.api().apply(&namespace_object(ns, &l));
        self.world.namespaces.insert(ns.into(), l);
    }

    fn set_pod_labels(&mut self, id: &str, l: Labels) {
        let (ns, name) = id.split_once('/').unwrap();
        let mut pod: K8sPod = self.cluster.api().get(Some(ns), name).unwrap();
        pod.metadata.labels = Some(l.clone());
        pod.metadata.resource_version = None;
        self.cluster.api().apply(&pod);
        let info = self
            .world
            .pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == name)
            .unwrap();
        info.labels = l;
    }

    fn expected(&self) -> BTreeMap<Probe, bool> {
        expected(&self.world)
    }

    /// Every probe, run: each pod calls all the others at once (the pods in parallel).
    fn probe(&self) -> BTreeMap<Probe, bool> {
        std::thread::scope(|s| {
            let calls: Vec<_> = self
                .pods
                .iter()
                .map(|(from, pod)| {
                    let mut targets = Vec::new();
                    let mut keys = Vec::new();
                    for (to, other) in &self.pods {
                        if to == from {
                            continue;
                        }
                        for (protocol, port) in PORTS {
                            let p = match protocol {
                                Protocol::Tcp => "tcp",
                                Protocol::Udp => "udp",
                                Protocol::Sctp => unreachable!(),
                            };
                            targets.push(format!("{p}:{}:{port}", other.ip));
                            keys.push((from.clone(), to.clone(), protocol, port));
                        }
                    }
                    s.spawn(move || {
                        let mut args = vec!["probe", "--timeout-ms", "1000"];
                        args.extend(targets.iter().map(String::as_str));
                        let (_, lines) = pod.run(&args);
                        assert_eq!(lines.len(), keys.len(), "probe output {lines:?}");
                        keys.into_iter()
                            .zip(lines)
                            .map(|(k, l)| (k, l["ok"].as_bool().unwrap()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            calls
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect::<BTreeMap<_, _>>()
        })
    }

    /// Whether the model's matrix for `policies` is the one the last step converged to.
    fn same_as_last(&self, policies: &[Value]) -> bool {
        let mut world = self.world.clone();
        world.policies = policies
            .iter()
            .map(|v| Policy::from_api(&serde_json::from_value(v.clone()).unwrap()).unwrap())
            .collect();
        self.last.as_ref() == Some(&expected(&world))
    }

    /// Probes until the matrix is the model's; else panics with the differences of the last try.
    fn converge(&mut self, case: &str) {
        let want = self.expected();
        assert!(
            self.last.as_ref() != Some(&want),
            "{case}: the test is wrong: this step expects the matrix of the step before, so it \
             could pass before the agents applied it"
        );
        let deadline = Instant::now() + CONVERGE;
        let mut tries = 0;
        loop {
            tries += 1;
            let got = self.probe();
            let wrong: Vec<String> = want
                .iter()
                .filter(|(k, w)| got.get(*k) != Some(*w))
                .map(|((f, t, p, port), w)| {
                    format!(
                        "{f} -> {t} {p:?}/{port}: want {}, got {}",
                        if *w { "allowed" } else { "denied" },
                        if *w { "denied" } else { "allowed" }
                    )
                })
                .collect();
            if wrong.is_empty() {
                let allowed = want.values().filter(|v| **v).count();
                eprintln!(
                    "{case}: {allowed} of {} probes allowed, as the model says (try {tries})",
                    want.len()
                );
                self.last = Some(want);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: {} of {} probes differ from the model after {tries} tries:\n{}\n{}",
                wrong.len(),
                want.len(),
                wrong[..wrong.len().min(40)].join("\n"),
                self.cluster.node(1).agent_log().join("\n")
            );
        }
    }
}

/// What the model says every probe should do.
fn expected(world: &World) -> BTreeMap<Probe, bool> {
    let mut out = BTreeMap::new();
    for from in &world.pods {
        for to in &world.pods {
            if from.ip == to.ip {
                continue;
            }
            for (protocol, port) in PORTS {
                out.insert(
                    (
                        format!("{}/{}", from.namespace, from.name),
                        format!("{}/{}", to.namespace, to.name),
                        protocol,
                        port,
                    ),
                    world.pod_to_pod(from, to, protocol, port),
                );
            }
        }
    }
    out
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    })
}

fn sel(pairs: &[(&str, &str)]) -> Value {
    let m: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({ "matchLabels": m })
}

/// A case: its name and its policies (built with the lab's addresses where a case names them).
type Case = (&'static str, Box<dyn Fn(&Lab) -> Vec<Value>>);

fn case(name: &'static str, f: impl Fn(&Lab) -> Vec<Value> + 'static) -> Case {
    (name, Box::new(f))
}

/// Upstream's cases that are a set of policies and a matrix (the ones that change labels or
/// policies while running are separate tests below).
fn static_cases() -> Vec<Case> {
    vec![
        case("no policy: everything reaches everything", |_| vec![]),
        case("default-deny-ingress in x", |_| {
            vec![np(
                "x",
                "deny-ingress",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            )]
        }),
        case("default-deny-all in x", |_| {
            vec![np(
                "x",
                "deny-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            )]
        }),
        case("allow x/a from pods of x with pod=b (podSelector)", |_| {
            vec![np(
                "x",
                "allow-b",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}]}]}),
            )]
        }),
        case(
            "allow x/a from every namespace (namespaceSelector {})",
            |_| {
                vec![np(
                    "x",
                    "all-ns",
                    json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
                )]
            },
        ),
        case(
            "allow x/a only from namespace y (namespaceSelector)",
            |_| {
                vec![np(
                    "x",
                    "from-y",
                    json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
                )]
            },
        ),
        case(
            "allow x/a from the default namespace label (kubernetes.io/metadata.name)",
            |_| {
                vec![np(
                    "x",
                    "from-z",
                    json!({"podSelector": sel(&[("pod", "a")]),
                           "ingress": [{"from": [{"namespaceSelector": sel(&[("kubernetes.io/metadata.name", "z")])}]}]}),
                )]
            },
        ),
        case("podSelector matchExpressions In", |_| {
            vec![np(
                "x",
                "expr",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
            )]
        }),
        case("namespaceSelector matchExpressions NotIn", |_| {
            vec![np(
                "x",
                "ns-expr",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}),
            )]
        }),
        case("podSelector OR namespaceSelector (two peers)", |_| {
            vec![np(
                "x",
                "or",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [
                           {"namespaceSelector": sel(&[("ns", "y")])},
                           {"podSelector": sel(&[("pod", "b")])}]}]}),
            )]
        }),
        case("podSelector AND namespaceSelector (one peer)", |_| {
            vec![np(
                "x",
                "and",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [
                           {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                            "podSelector": sel(&[("pod", "b")])}]}]}),
            )]
        }),
        case("multiple pod and namespace selectors", |_| {
            vec![np(
                "x",
                "multi",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [
                           {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]}),
            )]
        }),
        case("any podSelector (all pods of x)", |_| {
            vec![np(
                "x",
                "any-pod",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"from": [{"podSelector": {}}]}]}),
            )]
        }),
        case("ingress on port 81 only (numbered port)", |_| {
            vec![np(
                "x",
                "port-81",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]}),
            )]
        }),
        case("stacked policies with overlapping podSelectors", |_| {
            vec![
                np(
                    "x",
                    "port-80",
                    json!({"podSelector": sel(&[("pod", "a")]),
                           "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}),
                ),
                np(
                    "x",
                    "port-81",
                    json!({"podSelector": {},
                           "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]}),
                ),
            ]
        }),
        case("allow-all ingress in x", |_| {
            vec![np(
                "x",
                "allow-all",
                json!({"podSelector": {}, "ingress": [{}]}),
            )]
        }),
        case("ingress on one named port", |_| {
            vec![np(
                "x",
                "named",
                json!({"podSelector": {},
                       "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
            )]
        }),
        case("ingress from namespace y on one named UDP port", |_| {
            vec![np(
                "x",
                "named-ns",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}],
                                    "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}),
            )]
        }),
        case("egress on one named port", |_| {
            vec![np(
                "x",
                "egress-named",
                json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
            )]
        }),
        case("deny ingress from other namespaces", |_| {
            vec![np(
                "x",
                "same-ns",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
            )]
        }),
        case("deny egress of x/a (podSelector)", |_| {
            vec![np(
                "x",
                "no-egress",
                json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"]}),
            )]
        }),
        case("deny egress of every pod of x", |_| {
            vec![np(
                "x",
                "no-egress-all",
                json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            )]
        }),
        case("ingress and egress together", |_| {
            vec![np(
                "x",
                "both",
                json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}]}],
                       "egress": [{"to": [{"podSelector": sel(&[("pod", "b")])}]}]}),
            )]
        }),
        case(
            "egress denied at the client though the server allows it",
            |_| {
                vec![
                    np(
                        "x",
                        "client-deny",
                        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                               "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
                    ),
                    np(
                        "z",
                        "server-allow",
                        json!({"podSelector": {}, "ingress": [{}]}),
                    ),
                ]
            },
        ),
        case(
            "egress to a pod of another namespace (pod and namespace selector)",
            |_| {
                vec![np(
                    "x",
                    "to-y-b",
                    json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")]), "podSelector": sel(&[("pod", "b")])}]}]}),
                )]
            },
        ),
        case("ingress any port on UDP only", |_| {
            vec![np(
                "x",
                "udp-any",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
            )]
        }),
        case(
            "an allow-all ingress policy beside a narrower one takes precedence",
            |_| {
                vec![
                    np(
                        "x",
                        "narrow",
                        json!({"podSelector": sel(&[("pod", "a")]),
                               "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}),
                    ),
                    np(
                        "x",
                        "open",
                        json!({"podSelector": sel(&[("pod", "a")]), "ingress": [{}]}),
                    ),
                ]
            },
        ),
        case(
            "an allow-all egress policy beside a narrower one takes precedence",
            |_| {
                vec![
                    np(
                        "x",
                        "narrow-egress",
                        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                               "egress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}),
                    ),
                    np(
                        "x",
                        "open-egress",
                        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"], "egress": [{}]}),
                    ),
                ]
            },
        ),
        case("egress to a CIDR block (one pod's address)", |lab| {
            vec![np(
                "x",
                "cidr",
                json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", lab.ip("y/b"))}}]}]}),
            )]
        }),
        case("egress to a CIDR block with an except", |lab| {
            let b = lab.ip("y/b");
            let block = ipnet::Ipv4Net::new(b, 16).unwrap().trunc();
            vec![np(
                "x",
                "cidr-except",
                json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": block.to_string(), "except": [format!("{b}/32")]}}]}]}),
            )]
        }),
        case(
            "an address in both a CIDR and its except is allowed by another block",
            |lab| {
                let b = lab.ip("y/b");
                let block = ipnet::Ipv4Net::new(b, 16).unwrap().trunc();
                vec![np(
                    "x",
                    "overlap",
                    json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": block.to_string(), "except": [format!("{b}/32")]}},
                                              {"ipBlock": {"cidr": format!("{b}/32")}}]}]}),
                )]
            },
        ),
        case(
            "ingress and egress controlled independently (podSelector)",
            |_| {
                vec![
                    np(
                        "x",
                        "in-a",
                        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Ingress"]}),
                    ),
                    np(
                        "x",
                        "out-b",
                        json!({"podSelector": sel(&[("pod", "b")]), "policyTypes": ["Egress"]}),
                    ),
                ]
            },
        ),
        case("SCTP is not TCP", |_| {
            vec![np(
                "x",
                "sctp",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
            )]
        }),
        case("UDP only is not TCP", |_| {
            vec![np(
                "x",
                "udp-80",
                json!({"podSelector": sel(&[("pod", "a")]),
                       "ingress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]}),
            )]
        }),
        case("a port range (endPort)", |_| {
            vec![np(
                "x",
                "range",
                json!({"podSelector": {},
                       "ingress": [{"ports": [{"port": 79, "endPort": 80, "protocol": "TCP"}]}]}),
            )]
        }),
        case("several port ranges, each one protocol", |_| {
            vec![np(
                "x",
                "ranges",
                json!({"podSelector": {},
                       "ingress": [{"ports": [{"port": 81, "endPort": 90, "protocol": "TCP"},
                                              {"port": 70, "endPort": 80, "protocol": "UDP"}]}]}),
            )]
        }),
        case("policies in y do not touch x's pods", |_| {
            vec![np(
                "y",
                "deny-y",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            )]
        }),
    ]
}

#[test]
fn reachability_matrices_match_the_model_in_every_case() {
    let mut lab = Lab::new();
    let cases = static_cases();
    assert!(cases.len() >= 35, "{} cases", cases.len());
    for (name, policies) in &cases {
        let p = policies(&lab);
        if lab.same_as_last(&p) {
            // Another matrix in between, so this case cannot pass on what was there.
            lab.set_policies(&[np(
                "y",
                "barrier",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            )]);
            lab.converge("(between two cases of the same matrix: y isolated)");
        }
        lab.set_policies(&p);
        lab.converge(name);
    }

    // Cases that change something while the policies stay.
    lab.set_policies(&[np(
        "x",
        "from-ns-updated",
        json!({"podSelector": sel(&[("pod", "a")]),
               "ingress": [{"from": [{"namespaceSelector": sel(&[("ns2", "updated")])}]}]}),
    )]);
    lab.converge("ingress from a namespace, before it has the label");
    lab.set_namespace_labels(
        "y",
        labels(&[
            ("ns", "y"),
            ("kubernetes.io/metadata.name", "y"),
            ("ns2", "updated"),
        ]),
    );
    lab.converge("ingress from a namespace, after it got the label");
    lab.set_namespace_labels(
        "y",
        labels(&[("ns", "y"), ("kubernetes.io/metadata.name", "y")]),
    );

    lab.set_policies(&[np(
        "x",
        "from-pod-updated",
        json!({"podSelector": sel(&[("pod", "a")]),
               "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(&[("pod", "b"), ("role", "client")])}]}]}),
    )]);
    lab.converge("ingress from a pod, before it has the label");
    lab.set_pod_labels("z/b", labels(&[("pod", "b"), ("role", "client")]));
    lab.converge("ingress from a pod, after it got the label");

    lab.set_policies(&[np(
        "x",
        "deny-updated-pod",
        json!({"podSelector": sel(&[("target", "true")]), "policyTypes": ["Ingress"]}),
    )]);
    lab.converge("a policy selecting no pod yet");
    lab.set_pod_labels("x/c", labels(&[("pod", "c"), ("target", "true")]));
    lab.converge("the pod it selects once labelled is isolated");

    lab.set_policies(&[np(
        "x",
        "updated",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}),
    )]);
    lab.converge("a policy before its update");
    lab.set_policies(&[np(
        "x",
        "updated",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
    )]);
    lab.converge("the same policy updated");
    lab.set_policies(&[]);
    lab.converge("every policy deleted: enforcement stops");
    let denied = lab.cluster.denied_requests();
    assert!(denied.is_empty(), "denied API requests: {denied:#?}");
}

/// Polls `probe` (a call's outcome) until it is `want`, or panics after [`CONVERGE`].
fn eventually(what: &str, want: bool, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if probe() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} after {CONVERGE:?}",
            if want { "denied" } else { "allowed" }
        );
    }
}

/// Policy drops counted on `node` so far (every hook, both directions).
fn policy_drops(node: &ferrox_tests::harness::Node) -> u64 {
    let maps = ferrox_datapath::Maps::open(&node.layout()).unwrap();
    let mut n = 0;
    for hook in ferrox_abi::Hook::ALL {
        for reason in [
            ferrox_abi::Reason::DropPolicyEgress,
            ferrox_abi::Reason::DropPolicyIngress,
        ] {
            n += maps.counters.get(hook, reason).unwrap().packets;
        }
    }
    n
}

/// A TCP call from `place` to `target` fails, and it is policy that dropped it on `node` (not
/// a timeout or an exhausted resource).
fn policy_denies(
    node: &ferrox_tests::harness::Node,
    place: &ferrox_tests::harness::Place,
    target: &str,
) {
    let before = policy_drops(node);
    assert!(!reaches(place, target), "{} reaches {target}", place.name);
    assert!(
        policy_drops(node) > before,
        "{} does not reach {target}, but no policy drop was counted",
        place.name
    );
}

/// One TCP call from `place` to `target` (ip:port).
fn reaches(place: &ferrox_tests::harness::Place, target: &str) -> bool {
    let (_, lines) = place.run(&["probe", "--timeout-ms", "1000", &format!("tcp:{target}")]);
    lines[0]["ok"].as_bool().unwrap()
}

fn progress(stream: &ferrox_tests::harness::Proc, at_least: u64) -> u64 {
    let line = stream.wait_for_line("stream progress", Duration::from_secs(20), |l| {
        l.strip_prefix("progress ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= at_least)
    });
    line["progress ".len()..].parse().unwrap()
}

/// Egress to a Service is judged against the backend it reaches, whether the socket hooks or
/// the per-packet path translated it; an established connection a policy allows keeps flowing
/// while policies change around it and while the agent of its server's node is killed and
/// restarted, after which the policies still hold.
#[test]
fn egress_to_services_is_judged_on_backends_and_allowed_flows_outlive_updates_and_restarts() {
    let mut lab = Lab::new();
    lab.web_service("10.96.0.50");
    let c = &lab.cluster;
    let yb = lab.ip("y/b");
    let xa = lab.pod("x/a");
    let hooked = xa.place.clone();
    let unhooked = c.unhooked(&xa);
    assert!(reaches(&hooked, "10.96.0.50:80"));
    assert!(reaches(&unhooked, "10.96.0.50:80"));

    let egress_to = |pod: &str| {
        vec![np(
            "x",
            "egress",
            json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")]), "podSelector": sel(&[("pod", pod)])}]}]}),
        )]
    };
    lab.set_policies(&egress_to("c"));
    eventually(
        "x/a to the Service of y/b, egress only to y/c",
        false,
        || reaches(&hooked, "10.96.0.50:80"),
    );
    eventually("the same through the per-packet path", false, || {
        reaches(&unhooked, "10.96.0.50:80")
    });
    let xa_node = lab.cluster.node(xa.node);
    policy_denies(xa_node, &hooked, "10.96.0.50:80");
    policy_denies(xa_node, &unhooked, "10.96.0.50:80");
    // `ferrox trace` says so, and why.
    let trace = |node: &ferrox_tests::harness::Node| -> Value {
        serde_json::from_str(&node.ferrox(&[
            "trace",
            &xa.ip.to_string(),
            "10.96.0.50:80/tcp",
            "-o",
            "json",
        ]))
        .unwrap()
    };
    let t = trace(xa_node);
    assert_eq!(t["policy"][0]["direction"], "egress", "{t}");
    assert_eq!(t["policy"][0]["allowed"], false, "{t}");
    assert_eq!(t["policy"][0]["peer"], format!("{yb}:80"), "{t}");
    assert!(reaches(&hooked, &format!("{}:80", lab.ip("y/c"))));
    lab.set_policies(&egress_to("b"));
    eventually(
        "x/a to the Service of y/b, egress only to y/b",
        true,
        || reaches(&hooked, "10.96.0.50:80"),
    );
    eventually("the same through the per-packet path", true, || {
        reaches(&unhooked, "10.96.0.50:80")
    });
    policy_denies(
        lab.cluster.node(xa.node),
        &hooked,
        &format!("{}:80", lab.ip("y/c")),
    );
    let t = trace(lab.cluster.node(xa.node));
    assert_eq!(t["policy"][0]["allowed"], true, "{t}");
    assert_eq!(
        t["policy"][0]["verdict"], "allowed by x/egress rule 0",
        "{t}"
    );

    // A connection from x/b to x/a, allowed by each policy x/a gets in turn.
    lab.set_policies(&[]);
    let xb = lab.pod("x/b");
    let xc = lab.pod("x/c").place;
    let target = format!("{}:80", xa.ip);
    let mut stream = xb.spawn(&["stream", &target]);
    let mut seen = progress(&stream, 1);
    let from_b = |ports: Value| {
        vec![np(
            "x",
            "to-a",
            json!({"podSelector": sel(&[("pod", "a")]),
                   "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}], "ports": ports}]}),
        )]
    };
    for (step, policies) in [
        ("from b on any port", from_b(json!([]))),
        ("from b on 80", from_b(json!([{"port": 80}]))),
        (
            "from b on 79-80",
            from_b(json!([{"port": 79, "endPort": 80}])),
        ),
    ] {
        lab.set_policies(&policies);
        eventually(step, false, || reaches(&xc, &target));
        policy_denies(lab.cluster.node(xa.node), &xc, &target);
        seen = progress(&stream, seen + 64 * 1024);
    }
    // `ferrox monitor` shows x/c's denied connection, and the policy isolating x/a.
    let node = lab.cluster.node(xa.node);
    let maps = ferrox_datapath::Maps::open(&node.layout()).unwrap();
    let mut cmd = std::process::Command::new(ferrox_tests::harness::bin_path("ferrox"));
    cmd.args(["monitor", "-o", "json"])
        .env("FERROX_BPFFS_ROOT", node.layout().root())
        .env("FERROX_NODE_CONFIG", node.node_config());
    let mut monitor = node.spawn("monitor", cmd);
    ferrox_tests::harness::wait_for("the monitor to listen", Duration::from_secs(10), || {
        if maps.config.get().unwrap().monitor != 0 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    policy_denies(node, &xc, &target);
    let drop = monitor.wait_for_line("the policy drop", Duration::from_secs(10), |l| {
        l.contains("policy-denied-ingress")
    });
    let drop: Value = serde_json::from_str(&drop).unwrap();
    assert_eq!(drop["dst"], target.as_str(), "{drop}");
    assert_eq!(drop["isolated_by"], "x/a: x/to-a", "{drop}");
    assert!(monitor.signal_and_wait(libc::SIGTERM).success());

    // The agent of x/a's node killed and restarted: the flow goes on, the policy holds.
    let node = lab.cluster.node(xa.node);
    node.kill_agent();
    seen = progress(&stream, seen + 64 * 1024);
    node.start_agent();
    node.wait_agent_ready();
    seen = progress(&stream, seen + 64 * 1024);
    policy_denies(node, &xc, &target);

    assert!(
        reaches(&xb.place, &target),
        "x/b still reaches x/a after the restart"
    );
    // What `ferrox policy` says on that node: the policy, the pod it selects and isolates, and
    // the connection, allowed by it.
    let list: Value =
        serde_json::from_str(&node.ferrox(&["policy", "list", "-o", "json"])).unwrap();
    let to_a = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "x/to-a")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(to_a["selects"], json!(["x/a"]), "{list}");
    assert!(
        list["isolated"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pod"] == "x/a" && p["ingress"] == true && p["egress"] == false),
        "{list}"
    );
    let flows: Value =
        serde_json::from_str(&node.ferrox(&["policy", "flows", "-o", "json"])).unwrap();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["pod"].as_str().unwrap().starts_with(&target)
                && f["peer"].as_str().unwrap().starts_with(&xb.ip.to_string())
                && f["first"] == "ingress"
                && f["allowed_by"].as_str().unwrap().starts_with("x/to-a")),
        "{flows}"
    );
    let status = stream.signal_and_wait(libc::SIGTERM);
    let summary = stream.lines().last().cloned().unwrap_or_default();
    assert!(status.success(), "the stream broke: {summary}");
    assert!(seen > 0);
    let denied = lab.cluster.denied_requests();
    assert!(denied.is_empty(), "denied API requests: {denied:#?}");
}

/// One TCP call from `place` to `target` (ip:port), from the local address `from`.
fn reaches_from(place: &ferrox_tests::harness::Place, from: &str, target: &str) -> bool {
    let (_, lines) = place.run(&[
        "probe",
        "--timeout-ms",
        "1000",
        "--from",
        from,
        &format!("tcp:{target}"),
    ]);
    lines[0]["ok"].as_bool().unwrap()
}

/// Ingress is judged at the pod's own veth (`tc_to_pod`), whatever hands the packet to it: here
/// processes of the node itself. One sending from an address that is not the node's (on a
/// second interface of the node) is a peer like any other: denied by a default-deny, with the
/// drop counted at the hook into the pod, and let in by an ipBlock. The node's own address (the
/// kubelet's probes) reaches its pods also when they are isolated both ways: their replies
/// pass their isolated egress.
#[test]
fn ingress_is_judged_at_the_pods_veth_whatever_hands_it_the_packet() {
    let mut lab = Lab::new();
    let xa = lab.pod("x/a");
    let node = lab.cluster.node(xa.node);
    for args in [
        &[
            "link",
            "add",
            "fxextra",
            "type",
            "veth",
            "peer",
            "name",
            "fxextra-p",
        ][..],
        &["addr", "add", "10.99.0.1/32", "dev", "fxextra"],
        &["link", "set", "fxextra", "up"],
        &["link", "set", "fxextra-p", "up"],
    ] {
        node.netns().ip(args);
    }
    let host = node.host();
    let layout = node.layout();
    let target = format!("{}:80", xa.ip);
    let extra = "10.99.0.1";
    assert!(reaches(&host, &target), "the node reaches its pod");
    assert!(reaches_from(&host, extra, &target), "and from {extra}");
    // x/c, on the same node: reached as well before the policies.
    let other = format!("{}:80", lab.ip("x/c"));
    assert!(reaches_from(&host, extra, &other));
    let drops_into_pods = || {
        let maps = ferrox_datapath::Maps::open(&layout).unwrap();
        maps.counters
            .get(
                ferrox_abi::Hook::TcToPod,
                ferrox_abi::Reason::DropPolicyIngress,
            )
            .unwrap()
            .packets
    };

    let deny_all = np(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    lab.set_policies(std::slice::from_ref(&deny_all));
    eventually(&format!("{extra} to x/a under deny-all"), false, || {
        reaches_from(&host, extra, &target)
    });
    let before = drops_into_pods();
    assert!(!reaches_from(&host, extra, &target));
    assert!(
        drops_into_pods() > before,
        "denied, but no policy drop counted at tc-to-pod"
    );
    for _ in 0..3 {
        assert!(
            reaches(&host, &target),
            "the node's own address reaches its pod isolated both ways (kubelet probes)"
        );
    }

    let from_extra = np(
        "x",
        "from-extra",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"ipBlock": {"cidr": "10.99.0.0/24"}}]}]}),
    );
    lab.set_policies(&[deny_all, from_extra]);
    eventually(
        &format!("{extra} to x/a, allowed by an ipBlock"),
        true,
        || reaches_from(&host, extra, &target),
    );
    assert!(
        !reaches_from(&host, extra, &other),
        "the ipBlock policy selects x/a only"
    );
    lab.set_policies(&[]);

    // A pod whose traffic crosses its host veth's qdiscs (registered with a bandwidth limit, so
    // nothing is handed straight into it), isolated for ingress, reaching a Service through
    // the per-packet path: the replies come into it from the frontend's address, translated
    // back before its veth, and pass as its own flow's (on each node: backend y/b local to
    // node 1, remote from node 2).
    lab.web_service("10.96.0.51");
    let c = &lab.cluster;
    let cni = ferrox_tests::harness::bin_path("ferrox-cni");
    let mut shaped = Vec::new();
    for n in [1, 2] {
        let mut plugin = c.node(n).cni_conf();
        plugin["runtimeConfig"] = json!({"bandwidth": {
            "ingressRate": 1_000_000_000u64, "ingressBurst": 100_000_000u64,
            "egressRate": 1_000_000_000u64, "egressBurst": 100_000_000u64}});
        let conflist = json!({"cniVersion": "1.1.0", "name": "ferrox", "plugins": [plugin]});
        let pod = c.add_pod_from_conflist(n, &format!("shaped-{n}"), &cni, &conflist);
        let host_ifname = ferrox_cni::pod::host_ifname(&pod.container_id, "eth0");
        assert!(
            c.node(n).layout().to_pod_link(&host_ifname).exists(),
            "the program into a pod that cannot take clsact is a TCX link"
        );
        shaped.push(pod);
    }
    let xa_place = lab.pod("x/a").place;
    let first = shaped[0].ip;
    let _server = shaped[0].serve(8080);
    assert!(reaches(&xa_place, &format!("{first}:8080")));
    lab.set_policies(&[np(
        "default",
        "deny-ingress",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )]);
    eventually("x/a to an ingress-isolated pod", false, || {
        reaches(&xa_place, &format!("{first}:8080"))
    });
    policy_denies(lab.cluster.node(1), &xa_place, &format!("{first}:8080"));
    for pod in &shaped {
        let unhooked = lab.cluster.unhooked(pod);
        for _ in 0..3 {
            assert!(
                reaches(&unhooked, "10.96.0.51:80"),
                "{}: the replies of its own flow through the per-packet path",
                pod.name
            );
            assert!(reaches(&pod.place, "10.96.0.51:80"), "{}", pod.name);
        }
    }
}
