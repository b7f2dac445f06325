//! Builders for Service and EndpointSlice objects, for the unit tests, the cluster tests and the
//! demo: `svc("web").cluster_ip("10.96.0.10").port("http", 80, "TCP").build()`,
//! `slice("web", "web-abc").port("http", 8080, "TCP").ready("10.244.1.5").build()`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
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

    pub fn ready(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), true, true, false)
    }

    pub fn not_ready(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), false, false, false)
    }

    pub fn terminating_serving(self, ip: impl ToString) -> Self {
        self.endpoint(&ip.to_string(), false, true, true)
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}
