//! The install manifests cannot drift from the code: every document is a Kubernetes object the
//! typed API knows field by field; every flag and environment variable a DaemonSet passes is
//! one `ferrox` accepts (its own parser decides); the probes, the installer and the agent agree
//! on ports and paths; and the ClusterRole allows exactly the API calls the agent makes,
//! observed on a running agent (which the API server authorizes with that very role) and found
//! in its source.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use clap::Parser as _;
use ferrox_tests::{
    harness::Cluster,
    manifests::{self, all_of},
};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};

fn config_maps() -> Vec<ConfigMap> {
    all_of("ConfigMap")
}

#[test]
fn every_manifest_document_is_a_typed_kubernetes_object() {
    let files = manifests::files();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(
        names.contains(&"ferrox.yaml".to_owned()),
        "manifests/ferrox.yaml exists: {names:?}"
    );
    let mut kinds = BTreeMap::<String, usize>::new();
    for f in &files {
        for doc in manifests::documents(f) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = &doc["metadata"]["name"];
            let checked = match kind.as_str() {
                "ServiceAccount" => manifests::typed::<ServiceAccount>(&doc).map(drop),
                "ClusterRole" => manifests::typed::<ClusterRole>(&doc).map(drop),
                "ClusterRoleBinding" => manifests::typed::<ClusterRoleBinding>(&doc).map(drop),
                "ConfigMap" => manifests::typed::<ConfigMap>(&doc).map(drop),
                "DaemonSet" => manifests::typed::<DaemonSet>(&doc).map(drop),
                "CustomResourceDefinition" => manifests::typed::<CustomResourceDefinition>(&doc)
                    .and_then(|crd| {
                        // A resource the agent's code uses (ferrox::ipam, ferrox::bgp).
                        let v = crd.spec.versions.first().map(|v| v.name.as_str());
                        let known = [
                            (
                                ferrox::ipam::GROUP,
                                ferrox::ipam::PLURAL,
                                ferrox::ipam::KIND,
                                ferrox::ipam::VERSION,
                            ),
                            (
                                ferrox::bgp::peers::PEER_GROUP,
                                ferrox::bgp::peers::PEER_PLURAL,
                                ferrox::bgp::peers::PEER_KIND,
                                ferrox::bgp::peers::PEER_VERSION,
                            ),
                        ];
                        let ok = known.iter().any(|(g, p, k, ver)| {
                            crd.spec.group == *g
                                && crd.spec.names.plural == *p
                                && crd.spec.names.kind == *k
                                && crd.spec.scope == "Cluster"
                                && v == Some(*ver)
                        });
                        if ok {
                            Ok(())
                        } else {
                            Err(format!(
                                "differs from the resources ferrox::ipam and ferrox::bgp use: {:?}",
                                crd.spec
                            ))
                        }
                    }),
                other => Err(format!("unexpected kind {other:?}")),
            };
            if let Err(e) = checked {
                panic!("{}: {kind} {name}: {e}", f.display());
            }
            *kinds.entry(kind).or_default() += 1;
        }
    }
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} in {kinds:?}");
    }

    // The typed round trip catches unknown fields; show that it does.
    let mut doc = manifests::documents(&manifests::dir().join("ferrox.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    doc["spec"]["template"]["spec"]["hostNetwrok"] = true.into();
    let err = manifests::typed::<DaemonSet>(&doc).unwrap_err();
    assert!(err.contains("hostNetwrok"), "{err}");

    // The binding gives the role to the account the agent runs as.
    let ds = manifests::daemonset("ferrox");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let sa = pod.service_account_name.clone().unwrap();
    let binding = &all_of::<ClusterRoleBinding>("ClusterRoleBinding")[0];
    let role = &all_of::<ClusterRole>("ClusterRole")[0];
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount"
                && s.name == sa
                && s.namespace == ds.metadata.namespace),
        "the binding names ServiceAccount {sa}"
    );
    assert!(
        all_of::<ServiceAccount>("ServiceAccount")
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(&sa))
    );

    // What the issue asks of the DaemonSet.
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true), "sockets of every pod's netns");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    assert_eq!(
        ds.spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("RollingUpdate")
    );
    let host_paths: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some(v.host_path.as_ref()?.path.clone()))
        .collect();
    for p in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/ferrox",
        "/run/ferrox",
    ] {
        assert!(host_paths.contains(p), "host mount {p} in {host_paths:?}");
    }
    for ds in all_of::<DaemonSet>("DaemonSet") {
        for c in manifests::containers(&ds) {
            let sc = c.security_context.as_ref().unwrap();
            assert_ne!(sc.privileged, Some(true), "{} is privileged", c.name);
            let caps = manifests::added_capabilities(c);
            // The API server rejects this combination.
            assert!(
                !(sc.allow_privilege_escalation == Some(false)
                    && caps.iter().any(|c| c == "SYS_ADMIN")),
                "{}: allowPrivilegeEscalation false with SYS_ADMIN",
                c.name
            );
        }
    }
    let agent = manifests::container(&ds, "agent");
    assert_eq!(
        probe_target(agent, agent.readiness_probe.as_ref()),
        ("/healthz".into(), 10256)
    );
    assert_eq!(
        probe_target(agent, agent.liveness_probe.as_ref()),
        ("/metrics".into(), 10249)
    );
}

/// Path and port number of an HTTP probe (named ports resolved).
fn probe_target(c: &Container, probe: Option<&k8s_openapi::api::core::v1::Probe>) -> (String, u16) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{}: an HTTP probe", c.name));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{}: no port named {name}", c.name))
                .container_port
        }
    };
    (get.path.clone().unwrap_or_default(), port as u16)
}

#[test]
fn every_flag_and_variable_the_daemonsets_pass_is_accepted_by_ferrox() {
    let cms = config_maps();
    let mut checked = 0;
    for ds in all_of::<DaemonSet>("DaemonSet") {
        for c in manifests::containers(&ds) {
            manifests::argv(c, &cms).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "agent, install-cni, uninstall containers: {checked}"
    );

    // The pieces agree: probes hit the ports the agent serves, the installer waits on the
    // agent's /healthz and node configuration.
    let ds = manifests::daemonset("ferrox");
    let agent = manifests::container(&ds, "agent");
    let parsed = ferrox::cli::Cli::try_parse_from(manifests::argv(agent, &cms).unwrap()).unwrap();
    let ferrox::cli::Command::Agent(agent_args) = parsed.command else {
        panic!("the agent container runs `ferrox agent`")
    };
    assert_eq!(
        probe_target(agent, agent.readiness_probe.as_ref()).1,
        agent_args.healthz_bind_address.port()
    );
    assert_eq!(
        probe_target(agent, agent.liveness_probe.as_ref()).1,
        agent_args.metrics_bind_address.port()
    );
    assert!(
        agent_args.k8s_api_server.is_some(),
        "the API server is configured explicitly (no kube-proxy)"
    );
    let cgroup = agent_args.cgroup.clone().expect("the host's cgroup root");
    assert_eq!(
        manifests::host_path(&ds, agent, cgroup.to_str().unwrap()).as_deref(),
        Some("/sys/fs/cgroup"),
        "the agent's cgroup is the host's cgroup2 root"
    );
    let installer = manifests::container(&ds, "install-cni");
    let parsed =
        ferrox::cli::Cli::try_parse_from(manifests::argv(installer, &cms).unwrap()).unwrap();
    let ferrox::cli::Command::InstallCni(install_args) = parsed.command else {
        panic!("install-cni runs `ferrox install-cni`")
    };
    assert_eq!(
        install_args.agent_healthz.port(),
        agent_args.healthz_bind_address.port()
    );
    assert!(install_args.keep_running, "a DaemonSet container stays");
    let node_config = |c: &Container, p: &Path| manifests::host_path(&ds, c, p.to_str().unwrap());
    assert_eq!(
        node_config(installer, &install_args.node_config),
        node_config(agent, &agent_args.node_config),
        "the installer waits for the file the agent writes"
    );
    assert_eq!(
        manifests::host_path(
            &ds,
            installer,
            install_args.dirs.cni_conf_dir.to_str().unwrap()
        )
        .as_deref(),
        Some("/etc/cni/net.d")
    );
    assert_eq!(
        manifests::host_path(
            &ds,
            installer,
            install_args.dirs.cni_bin_dir.to_str().unwrap()
        )
        .as_deref(),
        Some("/opt/cni/bin")
    );

    // The check fails on drift: a variable no flag reads, a bad value, an unknown flag.
    let mut bad_env = agent.clone();
    bad_env
        .env
        .get_or_insert_default()
        .push(k8s_openapi::api::core::v1::EnvVar {
            name: "FERROX_XPD".into(),
            value: Some("native".into()),
            ..Default::default()
        });
    let e = manifests::argv(&bad_env, &cms).unwrap_err();
    assert!(
        e.contains("reads no environment variable FERROX_XPD"),
        "{e}"
    );
    let mut bad_value = agent.clone();
    bad_value
        .env
        .get_or_insert_default()
        .push(k8s_openapi::api::core::v1::EnvVar {
            name: "FERROX_MTU".into(),
            value: Some("jumbo".into()),
            ..Default::default()
        });
    assert!(manifests::argv(&bad_value, &cms).is_err());
    let mut bad_flag = installer.clone();
    bad_flag
        .args
        .get_or_insert_default()
        .push("--cni-bin=/x".into());
    assert!(manifests::argv(&bad_flag, &cms).is_err());
}

/// Group and plural of the kinds the agent may name in `Api::<Kind>`; an unknown kind fails the
/// test until it is added here (and, through the audit below, to the ClusterRole).
fn resource_of(kind: &str) -> (String, String) {
    fn of<K: k8s_openapi::Resource>() -> (String, String) {
        (K::GROUP.to_owned(), K::URL_PATH_SEGMENT.to_owned())
    }
    match kind {
        "Service" => of::<Service>(),
        "Node" => of::<k8s_openapi::api::core::v1::Node>(),
        "Pod" => of::<k8s_openapi::api::core::v1::Pod>(),
        "EndpointSlice" => of::<k8s_openapi::api::discovery::v1::EndpointSlice>(),
        "Endpoints" => of::<k8s_openapi::api::core::v1::Endpoints>(),
        "Namespace" => of::<k8s_openapi::api::core::v1::Namespace>(),
        "ConfigMap" => of::<ConfigMap>(),
        "NetworkPolicy" => of::<k8s_openapi::api::networking::v1::NetworkPolicy>(),
        // Dynamic kinds: IPAM blocks and BGP peers; the ClusterRole audit below covers both.
        "DynamicObject" => (
            ferrox::ipam::GROUP.to_owned(),
            ferrox::ipam::PLURAL.to_owned(),
        ),
        other => panic!("the agent uses Api::<{other}>: add its group and resource here"),
    }
}

/// Every `Api::<Kind>::...` the agent's source constructs, with the file that does.
fn api_kinds_in_source() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
    let mut out = BTreeMap::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (i, _) in text.match_indices("Api::<") {
                let rest = &text[i + "Api::<".len()..];
                let kind: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let kind = kind.rsplit("::").next().unwrap().to_owned();
                out.insert(kind, p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn the_cluster_role_allows_exactly_the_api_calls_the_agent_makes() {
    // 1. Run the agent through everything it does with the API: start (get its Node), list and
    //    watch, apply a Service with endpoints, see it programmed; then restart it (a relist).
    //    In pools mode (tiny /30 blocks, claimed and released at once), so that the IPAM calls
    //    happen too.
    let c = Cluster::builder()
        .nodes(1)
        .agent_env("FERROX_IPAM", "pools")
        .agent_env("FERROX_IPAM_POOLS", "10.250.0.0/24")
        .agent_env("FERROX_IPAM_BLOCK_SIZE", "30")
        .agent_env("FERROX_IPAM_LOW_WATER", "1")
        .agent_env("FERROX_IPAM_RELEASE_AFTER", "1")
        .agent_env("FERROX_BGP", "true")
        .build();
    let n = c.node(1);
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "clusterIP": "10.96.7.7", "clusterIPs": ["10.96.7.7"],
                  "ports": [ { "port": 80, "targetPort": 8080, "protocol": "TCP" } ] }
    }))
    .unwrap();
    c.api().apply(&svc);
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-1", "namespace": "default",
                          "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [ { "addresses": ["10.244.1.99"], "conditions": { "ready": true } } ],
            "ports": [ { "port": 8080, "protocol": "TCP" } ]
        }))
        .unwrap();
    c.api().apply(&slice);
    n.wait_for_backends("10.96.7.7:80/TCP", 1);
    n.stop_agent();
    n.start_agent();
    n.wait_agent_ready();
    n.wait_for_backends("10.96.7.7:80/TCP", 1);
    // Fill the /30 (two addresses): the agent claims a second block; empty both: it releases one.
    let blocks = || {
        c.api()
            .list_values(&ferrox_tests::apiserver::ResourceType::cluster(
                ferrox::ipam::GROUP,
                ferrox::ipam::VERSION,
                ferrox::ipam::PLURAL,
                ferrox::ipam::KIND,
            ))
            .len()
    };
    let sandboxes: Vec<ferrox_tests::harness::NetNs> = (0..2)
        .map(|i| {
            ferrox_tests::harness::NetNs::create(&format!(
                "{}{}-r{i}",
                ferrox_tests::harness::leaks::NETNS_PREFIX,
                c.id()
            ))
        })
        .collect();
    let cni = |cmd: &str, i: usize| {
        let p = sandboxes[i].path().display().to_string();
        let cid = format!("rbac-{i}");
        let out = n.cni_raw(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", &cid),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", &p),
            ],
            &n.cni_conf(),
        );
        assert!(out.status.success(), "{cmd} {cid}: {out:?}");
    };
    cni("ADD", 0);
    cni("ADD", 1);
    ferrox_tests::harness::wait_for("a second block", std::time::Duration::from_secs(20), || {
        if blocks() == 2 {
            Ok(())
        } else {
            Err(format!("{} blocks", blocks()))
        }
    });
    cni("DEL", 0);
    cni("DEL", 1);
    ferrox_tests::harness::wait_for(
        "a block released",
        std::time::Duration::from_secs(20),
        || {
            if blocks() == 1 {
                Ok(())
            } else {
                Err(format!("{} blocks", blocks()))
            }
        },
    );

    // The agent ran as the manifest's ServiceAccount, over TLS with its token, and the
    // ClusterRole, enforced by the API server, never refused it a call.
    let (ns, sa) = manifests::agent_service_account();
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let requests = c.api().requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.user, user, "{r:?}");
        assert!(
            r.code != 401 && r.code != 403,
            "the agent was refused {} {}?{}: {}",
            r.method,
            r.path,
            r.query,
            r.code
        );
    }
    assert!(c.denied_requests().is_empty());

    let mut observed = BTreeSet::new();
    for r in requests {
        assert!(
            !r.resource.is_empty(),
            "the agent called a non-resource path {} {}: the ClusterRole needs nonResourceURLs",
            r.method,
            r.path
        );
        assert!(
            r.namespace.is_none(),
            "namespaced call {} {}: a Role, not only the ClusterRole",
            r.method,
            r.path
        );
        observed.insert((r.group.clone(), r.resource.clone(), r.verb.clone()));
    }

    // 2. Every kind the source names was seen on the wire (no code path left unexercised).
    let kinds = api_kinds_in_source();
    assert!(!kinds.is_empty(), "Api::<...> found in agent/src");
    let observed_resources: BTreeSet<_> = observed
        .iter()
        .map(|(g, r, _)| (g.clone(), r.clone()))
        .collect();
    for (kind, file) in &kinds {
        let res = resource_of(kind);
        assert!(
            observed_resources.contains(&res),
            "{file} uses Api::<{kind}> but the run never called {res:?}; exercise that path here"
        );
    }

    // 3. The ClusterRole allows each observed call and nothing else.
    let role = &all_of::<ClusterRole>("ClusterRole")[0];
    let mut allowed = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(
                        g != "*" && r != "*" && v != "*",
                        "wildcards in the ClusterRole: {rule:?}"
                    );
                    allowed.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let missing: Vec<_> = observed.difference(&allowed).collect();
    let extra: Vec<_> = allowed.difference(&observed).collect();
    assert!(
        missing.is_empty(),
        "the agent makes calls the ClusterRole does not allow: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "the ClusterRole allows calls the agent never makes: {extra:?}"
    );
    eprintln!("API calls of the agent (group, resource, verb): {observed:?}");
}

#[test]
fn an_agent_whose_cluster_role_lacks_a_rule_is_refused_as_on_a_real_cluster() {
    // The manifest's role without its EndpointSlice rule, as a reviewer might drop it: the
    // API server refuses the agent's list with the real 403, and the agent says so in its log.
    let c = Cluster::builder().nodes(1).start_agents(false).build();
    let n = c.node(1);
    let mut role = all_of::<ClusterRole>("ClusterRole")[0].clone();
    role.rules
        .as_mut()
        .unwrap()
        .retain(|r| !r.resources.iter().flatten().any(|r| r == "endpointslices"));
    c.api().apply(&role);
    n.start_agent();
    n.wait_agent_ready();
    let (ns, sa) = manifests::agent_service_account();
    let message = format!(
        "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:{ns}:{sa}\" \
         cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"
    );
    ferrox_tests::harness::wait_for(
        "the agent to log the 403",
        std::time::Duration::from_secs(30),
        || {
            if n.agent_log().iter().any(|l| l.contains(&message)) {
                Ok(())
            } else {
                Err(format!("{:?}", n.agent_log().last()))
            }
        },
    );
    let denied = c.denied_requests();
    assert!(!denied.is_empty());
    assert!(
        denied
            .iter()
            .all(|r| r.code == 403 && r.resource == "endpointslices" && r.verb == "list"),
        "{denied:?}"
    );
    // Refused on purpose: the cluster's check of refused requests does not apply.
    c.api().clear_requests();
}
