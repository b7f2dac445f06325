//! Builders for Service and EndpointSlice objects, for the unit tests, the cluster tests and the
//! demo: `svc("web").cluster_ip("10.96.0.10").port("http", 80, "TCP").build()`,
//! `slice("web", "web-abc").port("http", 8080, "TCP").ready("10.244.1.5").build()`.
#![allow(
    clippy::expect_used,
    reason = "fixture builders: misuse is a bug in the test"
)]

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::desired::SERVICE_NAME_LABEL;

pub struct SvcBuilder(Service);

pub fn svc(name: &str) -> SvcBuilder {
    SvcBuilder(Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    })
}

impl SvcBuilder {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(Default::default)
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.0.metadata.namespace = Some(ns.into());
        self
    }

    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.into());
        self.spec().cluster_ips = Some(vec![ip.into()]);
        self
    }

    pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
        self.spec().cluster_ip = ips.first().map(|s| (*s).to_owned());
        self.spec().cluster_ips = Some(ips.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    pub fn external_name(mut self, name: &str) -> Self {
        self.spec().type_ = Some("ExternalName".into());
        self.spec().external_name = Some(name.into());
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port,
                protocol: Some(protocol.into()),
                ..Default::default()
            });
        self
    }

    /// A port with a nodePort (the Service must be NodePort or LoadBalancer to serve it).
    pub fn port_np(mut self, name: &str, port: i32, node_port: i32, protocol: &str) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port,
                node_port: Some(node_port),
                protocol: Some(protocol.into()),
                ..Default::default()
            });
        self
    }

    pub fn node_port_type(mut self) -> Self {
        self.spec().type_ = Some("NodePort".into());
        self
    }

    /// Type LoadBalancer with `ip` as its status ingress.
    pub fn load_balancer(self, ip: &str) -> Self {
        self.load_balancer_ingress(ip, None)
    }

    pub fn load_balancer_with_mode(self, ip: &str, ip_mode: &str) -> Self {
        self.load_balancer_ingress(ip, Some(ip_mode))
    }

    fn load_balancer_ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        let status = self.0.status.get_or_insert_with(ServiceStatus::default);
        let lb = status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        lb.ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: ip_mode.map(str::to_owned),
                ..Default::default()
            });
        self
    }

    pub fn external_ip(mut self, ip: &str) -> Self {
        self.spec()
            .external_ips
            .get_or_insert_with(Vec::new)
            .push(ip.into());
        self
    }

    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.into());
        self
    }

    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.into());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(|r| (*r).to_owned()).collect());
        self
    }

    /// sessionAffinity ClientIP, with `timeout` seconds (None: the API default).
    pub fn session_affinity(mut self, timeout: Option<i32>) -> Self {
        self.spec().session_affinity = Some("ClientIP".into());
        self.spec().session_affinity_config = timeout.map(|t| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(t),
            }),
        });
        self
    }

    pub fn traffic_distribution(mut self, td: &str) -> Self {
        self.spec().traffic_distribution = Some(td.into());
        self
    }

    pub fn build(self) -> Service {
        self.0
    }
}

pub struct SliceBuilder(EndpointSlice);

pub fn slice(service: &str, name: &str) -> SliceBuilder {
    SliceBuilder(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_owned(),
                service.to_owned(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: None,
        ports: None,
    })
}

impl SliceBuilder {
    pub fn namespace(mut self, ns: &str) -> Self {
        self.0.metadata.namespace = Some(ns.into());
        self
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port: Some(port),
                protocol: Some(protocol.into()),
                app_protocol: None,
            });
        self
    }

    fn endpoint(mut self, ip: &str, ready: bool, serving: bool, terminating: bool) -> Self {
        self.0
            .endpoints
            .get_or_insert_with(Vec::new)
            .push(Endpoint {
                addresses: vec![ip.into()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                ..Default::default()
            });
        self
    }

    fn last(&mut self) -> &mut Endpoint {
        self.0
            .endpoints
            .get_or_insert_with(Vec::new)
            .last_mut()
            .expect("an endpoint was just added")
    }

    /// A ready endpoint on node `node`.
    pub fn ready_on(mut self, ip: impl ToString, node: &str) -> Self {
        self = self.ready(ip);
        self.last().node_name = Some(node.into());
        self
    }

    /// A ready endpoint on `node` in `zone`, with the topology hints the EndpointSlice
    /// controller would give it (its zone and its node).
    pub fn ready_hinted(mut self, ip: impl ToString, node: &str, zone: &str) -> Self {
        self = self.ready_on(ip, node);
        let ep = self.last();
        ep.zone = Some(zone.into());
        ep.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone { name: zone.into() }]),
            for_nodes: Some(vec![ForNode { name: node.into() }]),
        });
        self
    }

    pub fn ready(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), true, true, false)
    }

    pub fn not_ready(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), false, false, false)
    }

    pub fn terminating_serving(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), false, true, true)
    }

    /// An endpoint on `node` with exactly these conditions (`None`: the field is absent, as
    /// older controllers and other writers leave it).
    pub fn with_conditions(
        mut self,
        ip: impl ToString,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        self = self.endpoint(&ip.to_string(), false, false, false);
        let ep = self.last();
        ep.node_name = Some(node.into());
        ep.conditions = Some(EndpointConditions {
            ready,
            serving,
            terminating,
        });
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}
