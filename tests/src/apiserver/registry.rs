//! Which resources the test API server serves, and the discovery documents that list them.
//!
//! Owns the table (group, version, plural) → kind and scope, the built-in entries, and the
//! `/api`, `/apis`, `/api/v1` and `/apis/{group}/{version}` documents. Knows nothing of objects.

use std::any::TypeId;
use std::collections::BTreeMap;

use k8s_openapi::{NamespaceResourceScope, Resource};
use serde_json::{Value, json};

/// One kind of object the server stores: `group` is empty for the core group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceType {
    /// API group, `""` for the core group (`/api/v1`).
    pub group: String,
    /// API version within the group, e.g. `v1`.
    pub version: String,
    /// Plural resource name used in URLs, e.g. `endpointslices`.
    pub plural: String,
    /// Kind, e.g. `EndpointSlice`.
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
}

impl ResourceType {
    /// A namespaced resource.
    pub fn namespaced(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self::new(group, version, plural, kind, true)
    }

    /// A cluster-scoped resource.
    pub fn cluster(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self::new(group, version, plural, kind, false)
    }

    fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
        }
    }

    /// The resource of a `k8s-openapi` type (or any type implementing its `Resource` trait).
    pub fn of<K: Resource + 'static>() -> Self {
        let namespaced = TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>();
        Self::new(
            K::GROUP,
            K::VERSION,
            K::URL_PATH_SEGMENT,
            K::KIND,
            namespaced,
        )
    }

    /// `apiVersion` of its objects: `v1` for core, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Plural name qualified with the group, as error messages show it (`leases.coordination.k8s.io`).
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Kind of its list, e.g. `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

/// Index of a resource in the [`Registry`]; stable for the server's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ResId(pub(crate) usize);

/// The resources served, in registration order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    /// The resources a ferrox node agent and its tests need from the start.
    pub(crate) fn builtin() -> Self {
        let mut registry = Registry::default();
        for rt in [
            ResourceType::namespaced("", "v1", "services", "Service"),
            ResourceType::namespaced("", "v1", "pods", "Pod"),
            ResourceType::cluster("", "v1", "nodes", "Node"),
            ResourceType::cluster("", "v1", "namespaces", "Namespace"),
            ResourceType::namespaced("", "v1", "configmaps", "ConfigMap"),
            ResourceType::namespaced("", "v1", "secrets", "Secret"),
            ResourceType::namespaced("", "v1", "events", "Event"),
            ResourceType::namespaced("", "v1", "endpoints", "Endpoints"),
            ResourceType::namespaced("", "v1", "serviceaccounts", "ServiceAccount"),
            ResourceType::namespaced("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
            ResourceType::namespaced(
                "networking.k8s.io",
                "v1",
                "networkpolicies",
                "NetworkPolicy",
            ),
            ResourceType::namespaced("coordination.k8s.io", "v1", "leases", "Lease"),
            ResourceType::namespaced("events.k8s.io", "v1", "events", "Event"),
            // What authorization reads (see `rbac`).
            ResourceType::cluster(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
            ),
            ResourceType::cluster(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
            ),
        ] {
            registry.register(rt);
        }
        registry
    }

    /// Adds a resource, or updates kind and scope of one already known by (group, version, plural).
    pub(crate) fn register(&mut self, rt: ResourceType) -> ResId {
        if let Some(id) = self.find(&rt.group, &rt.version, &rt.plural) {
            self.types[id.0] = rt;
            return id;
        }
        self.types.push(rt);
        ResId(self.types.len() - 1)
    }

    pub(crate) fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResId> {
        self.types
            .iter()
            .position(|rt| rt.group == group && rt.version == version && rt.plural == plural)
            .map(ResId)
    }

    /// The resource of an id this registry handed out. Ids are never removed, so this holds.
    pub(crate) fn get(&self, id: ResId) -> &ResourceType {
        &self.types[id.0]
    }

    pub(crate) fn len(&self) -> usize {
        self.types.len()
    }

    /// Versions served per non-core group, in first-registration order of the group.
    fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for rt in self.types.iter().filter(|rt| !rt.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == rt.group) {
                Some((_, versions)) if versions.contains(&rt.version) => {}
                Some((_, versions)) => versions.push(rt.version.clone()),
                None => groups.push((rt.group.clone(), vec![rt.version.clone()])),
            }
        }
        groups
    }

    /// `GET /api`: the core group's versions.
    pub(crate) fn api_versions(&self, server_address: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
        })
    }

    /// `GET /apis`: every non-core group with its versions.
    pub(crate) fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(group, versions)| api_group(group, versions))
            .collect();
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
    }

    /// `GET /apis/{group}`, or `None` if no resource of that group is registered.
    pub(crate) fn api_group(&self, group: &str) -> Option<Value> {
        let groups = self.groups();
        let (name, versions) = groups.iter().find(|(g, _)| g == group)?;
        let mut doc = api_group(name, versions);
        if let Some(map) = doc.as_object_mut() {
            map.insert("kind".to_owned(), Value::from("APIGroup"));
            map.insert("apiVersion".to_owned(), Value::from("v1"));
        }
        Some(doc)
    }

    /// `GET /api/v1` or `GET /apis/{group}/{version}`: an `APIResourceList`, or `None` if nothing
    /// is registered under that group version.
    pub(crate) fn api_resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for rt in self
            .types
            .iter()
            .filter(|rt| rt.group == group && rt.version == version)
        {
            resources.push(json!({
                "name": rt.plural,
                "singularName": rt.kind.to_lowercase(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }));
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }
}

/// One entry of an `APIGroupList`; the first registered version is the preferred one.
fn api_group(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v }))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({ "name": group, "versions": versions, "preferredVersion": preferred })
}

/// `GET /version`: what a client sees as the server version.
pub(crate) fn version_info() -> Value {
    let mut info = BTreeMap::new();
    for (key, value) in [
        ("major", "1"),
        ("minor", "37"),
        ("gitVersion", "v1.37.0-ferrox-test"),
        ("gitCommit", "0000000000000000000000000000000000000000"),
        ("gitTreeState", "clean"),
        ("buildDate", "2026-01-01T00:00:00Z"),
        ("goVersion", "go1.25.0"),
        ("compiler", "gc"),
        ("platform", "linux/amd64"),
    ] {
        info.insert(key, value);
    }
    json!(info)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    #[test]
    fn typed_resources_carry_scope_and_group() {
        assert_eq!(
            ResourceType::of::<Service>(),
            ResourceType::namespaced("", "v1", "services", "Service")
        );
        assert_eq!(
            ResourceType::of::<Node>(),
            ResourceType::cluster("", "v1", "nodes", "Node")
        );
        let slice = ResourceType::of::<EndpointSlice>();
        assert_eq!(slice.api_version(), "discovery.k8s.io/v1");
        assert_eq!(slice.qualified_plural(), "endpointslices.discovery.k8s.io");
        assert_eq!(slice.list_kind(), "EndpointSliceList");
    }

    #[test]
    fn builtin_has_what_the_agent_watches() {
        let registry = Registry::builtin();
        for (group, plural) in [
            ("", "services"),
            ("", "pods"),
            ("", "nodes"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "namespaces"),
            ("networking.k8s.io", "networkpolicies"),
        ] {
            assert!(
                registry.find(group, "v1", plural).is_some(),
                "{group}/{plural}"
            );
        }
        let nodes = registry.find("", "v1", "nodes").unwrap();
        assert!(!registry.get(nodes).namespaced);
    }

    #[test]
    fn register_updates_in_place() {
        let mut registry = Registry::builtin();
        let before = registry.len();
        let id = registry.register(ResourceType::namespaced(
            "example.com",
            "v1",
            "widgets",
            "Widget",
        ));
        assert_eq!(registry.len(), before + 1);
        let again = registry.register(ResourceType::cluster(
            "example.com",
            "v1",
            "widgets",
            "Widget",
        ));
        assert_eq!(id, again);
        assert!(!registry.get(id).namespaced);
    }

    #[test]
    fn discovery_lists_groups_and_resources() {
        let mut registry = Registry::builtin();
        registry.register(ResourceType::namespaced(
            "example.com",
            "v1alpha1",
            "widgets",
            "Widget",
        ));
        let groups = registry.api_group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"discovery.k8s.io"));
        assert!(names.contains(&"example.com"));

        let core = registry.api_resource_list("", "v1").unwrap();
        assert_eq!(core["groupVersion"], "v1");
        let nodes = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "nodes")
            .unwrap();
        assert_eq!(nodes["namespaced"], false);
        assert_eq!(nodes["kind"], "Node");

        let widgets = registry
            .api_resource_list("example.com", "v1alpha1")
            .unwrap();
        assert_eq!(widgets["groupVersion"], "example.com/v1alpha1");
        assert!(registry.api_resource_list("example.com", "v9").is_none());
        assert_eq!(
            registry.api_group("example.com").unwrap()["preferredVersion"]["version"],
            "v1alpha1"
        );
        assert!(registry.api_group("nope.io").is_none());
    }
}
