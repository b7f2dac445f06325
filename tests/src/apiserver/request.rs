//! Reading an HTTP request into what the API server should do: route, verb, query options,
//! patch flavour, response shape.
//!
//! Owns the URL layout of the Kubernetes API (`/api/v1/...`, `/apis/{group}/{version}/...`,
//! namespaced and cluster-wide collections, items, subresources) and the list/watch query
//! parameters. Pure: takes strings, returns data or a 400; never touches the store.

use serde_json::{Value, json};

use super::error::ApiError;
use super::selector::{FieldSelector, LabelSelector, ObjectFilter};

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Version,
    Health,
    /// `GET /api`
    CoreVersions,
    /// `GET /apis`
    Groups,
    /// `GET /apis/{group}`
    Group(String),
    /// `GET /api/v1` or `GET /apis/{group}/{version}`
    ResourceList {
        group: String,
        version: String,
    },
    Resource(ResourcePath),
}

/// A path under a group version: a collection, or an item, or an item's subresource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResourcePath {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
}

/// Subresources of a namespace, which would otherwise read as a namespaced collection.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

/// Parses a request path; `None` for anything this server does not serve.
pub(crate) fn parse_path(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "readyz" | "livez"] => return Some(Route::Health),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", group] => return Some(Route::Group((*group).to_owned())),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let resource =
        |namespace: Option<&str>, plural: &str, name: Option<&str>, sub: Option<&str>| {
            Some(Route::Resource(ResourcePath {
                group: group.to_owned(),
                version: version.to_owned(),
                plural: plural.to_owned(),
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                subresource: sub.map(str::to_owned),
            }))
        };
    match rest {
        [] => Some(Route::ResourceList {
            group: group.to_owned(),
            version: version.to_owned(),
        }),
        ["namespaces", name, sub] if NAMESPACE_SUBRESOURCES.contains(sub) => {
            resource(None, "namespaces", Some(name), Some(sub))
        }
        ["namespaces", ns, plural] => resource(Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => resource(Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub] => resource(Some(ns), plural, Some(name), Some(sub)),
        [plural] => resource(None, plural, None, None),
        [plural, name] => resource(None, plural, Some(name), None),
        [plural, name, sub] => resource(None, plural, Some(name), Some(sub)),
        _ => None,
    }
}

/// How objects are written back: whole, or as `PartialObjectMetadata` (metadata-only clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Full,
    Metadata,
}

impl Shape {
    /// From the `Accept` header: kube's `list_metadata`/`watch_metadata` ask for
    /// `application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    pub(crate) fn from_accept(accept: &str) -> Self {
        if accept.contains("as=PartialObjectMetadata") {
            Shape::Metadata
        } else {
            Shape::Full
        }
    }

    pub(crate) fn object(self, object: &Value) -> Value {
        match self {
            Shape::Full => object.clone(),
            Shape::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
            }),
        }
    }

    /// `kind` and `apiVersion` of a list of this shape.
    pub(crate) fn list_types(self, list_kind: String, api_version: String) -> (String, String) {
        match self {
            Shape::Full => (list_kind, api_version),
            Shape::Metadata => (
                "PartialObjectMetadataList".to_owned(),
                "meta.k8s.io/v1".to_owned(),
            ),
        }
    }
}

/// The body formats of a PATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    /// RFC 7386; also serves `strategic-merge-patch+json` (lists replaced, not merged by key).
    Merge,
    /// RFC 6902.
    Json,
    /// Server-side apply, served as create-or-merge (no field ownership).
    Apply,
}

const PATCH_TYPES: &str = "application/json-patch+json, application/merge-patch+json, \
                           application/strategic-merge-patch+json, application/apply-patch+yaml";

/// Reads the patch flavour from the `Content-Type` header.
pub(crate) fn patch_kind(content_type: &str) -> Result<PatchKind, ApiError> {
    match media_type(content_type).as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchKind::Merge)
        }
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
        _ => Err(ApiError::UnsupportedMediaType {
            accepted: PATCH_TYPES.to_owned(),
        }),
    }
}

/// Checks the `Content-Type` of a POST or PUT: JSON, or unset.
pub(crate) fn check_json_body(content_type: &str) -> Result<(), ApiError> {
    match media_type(content_type).as_str() {
        "" | "application/json" | "*/*" => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType {
            accepted: "application/json".to_owned(),
        }),
    }
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parses a JSON request body into an object; anything else is a 400.
pub(crate) fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
}

/// The list and watch options of a query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ListQuery {
    pub(crate) watch: bool,
    pub(crate) label_selector: LabelSelector,
    pub(crate) field_selector: FieldSelector,
    pub(crate) resource_version: Option<String>,
    pub(crate) resource_version_match: Option<String>,
    pub(crate) limit: Option<usize>,
    pub(crate) continue_token: Option<String>,
    pub(crate) allow_bookmarks: bool,
    pub(crate) timeout_seconds: Option<u64>,
    pub(crate) send_initial_events: Option<bool>,
}

impl ListQuery {
    /// Parses a raw (percent-encoded) query string; unknown parameters are ignored.
    pub(crate) fn parse(query: &str) -> Result<Self, ApiError> {
        let mut q = ListQuery::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let bad = |what: &str| ApiError::BadRequest(format!("invalid {what} {key}={value:?}"));
            match key.as_ref() {
                "watch" => q.watch = parse_bool(&value).ok_or_else(|| bad("boolean"))?,
                "labelSelector" => {
                    q.label_selector = LabelSelector::parse(&value)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                }
                "fieldSelector" => {
                    q.field_selector = FieldSelector::parse(&value)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                }
                "resourceVersion" => q.resource_version = Some(value.into_owned()),
                "resourceVersionMatch" => q.resource_version_match = Some(value.into_owned()),
                "limit" => q.limit = Some(value.parse().map_err(|_| bad("integer"))?),
                "continue" if !value.is_empty() => q.continue_token = Some(value.into_owned()),
                "allowWatchBookmarks" => {
                    q.allow_bookmarks = parse_bool(&value).ok_or_else(|| bad("boolean"))?
                }
                "timeoutSeconds" => {
                    q.timeout_seconds = Some(value.parse().map_err(|_| bad("integer"))?)
                }
                "sendInitialEvents" => {
                    q.send_initial_events = Some(parse_bool(&value).ok_or_else(|| bad("boolean"))?);
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// The filter this query and the path's namespace select.
    pub(crate) fn filter(&self, namespace: Option<&str>) -> ObjectFilter {
        ObjectFilter {
            namespace: namespace.map(str::to_owned),
            labels: self.label_selector.clone(),
            fields: self.field_selector.clone(),
        }
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// One request the server answered, for tests that assert which API calls a client made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path without the query.
    pub path: String,
    /// Raw (percent-encoded) query string, empty if none.
    pub query: String,
    /// The verb RBAC authorized (see [`super::rbac::Attributes`]): `list`, `watch`, `get`,
    /// `create`, `update`, `patch`, `delete`, `deletecollection`; for paths outside the resource
    /// API (`/version`, discovery, health) the lowercased method. Empty when authentication
    /// failed.
    pub verb: String,
    /// API group, empty for core and for non-resource paths.
    pub group: String,
    /// API version, empty for non-resource paths.
    pub version: String,
    /// Plural resource, empty for non-resource paths.
    pub resource: String,
    /// Subresource (`status`), empty if none.
    pub subresource: String,
    /// Namespace named by the path.
    pub namespace: Option<String>,
    /// Object name named by the path.
    pub name: Option<String>,
    /// HTTP status code of the answer (200 for a watch, even one that carries a 410 event; 401
    /// without valid credentials, 403 when RBAC refused).
    pub code: u16,
    /// The authenticated user (`system:serviceaccount:kube-system:ferrox`, `kubernetes-admin`),
    /// empty when authentication failed.
    pub user: String,
    /// The client's address and port (each harness node has its own address).
    pub source: Option<std::net::SocketAddr>,
    /// The code of the ERROR event a watch began with instead of events (410 when its
    /// resourceVersion was compacted away), as the real server's audit log does not show it.
    pub watch_error: Option<u16>,
}

impl RequestRecord {
    /// The decoded value of a query parameter.
    pub fn query_param(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(
        group: &str,
        plural: &str,
        ns: Option<&str>,
        name: Option<&str>,
        sub: Option<&str>,
    ) -> Option<Route> {
        Some(Route::Resource(ResourcePath {
            group: group.into(),
            version: "v1".into(),
            plural: plural.into(),
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
            subresource: sub.map(Into::into),
        }))
    }

    #[test]
    fn path_table() {
        let d = "discovery.k8s.io";
        let cases = [
            ("/version", Some(Route::Version)),
            ("/healthz", Some(Route::Health)),
            ("/readyz", Some(Route::Health)),
            ("/api", Some(Route::CoreVersions)),
            ("/apis", Some(Route::Groups)),
            ("/apis/discovery.k8s.io", Some(Route::Group(d.into()))),
            (
                "/api/v1",
                Some(Route::ResourceList {
                    group: String::new(),
                    version: "v1".into(),
                }),
            ),
            (
                "/apis/discovery.k8s.io/v1/",
                Some(Route::ResourceList {
                    group: d.into(),
                    version: "v1".into(),
                }),
            ),
            ("/api/v1/pods", res("", "pods", None, None, None)),
            (
                "/api/v1/namespaces/default/pods",
                res("", "pods", Some("default"), None, None),
            ),
            (
                "/api/v1/namespaces/default/pods/web-0",
                res("", "pods", Some("default"), Some("web-0"), None),
            ),
            (
                "/api/v1/namespaces/default/pods/web-0/status",
                res("", "pods", Some("default"), Some("web-0"), Some("status")),
            ),
            ("/api/v1/nodes/n1", res("", "nodes", None, Some("n1"), None)),
            (
                "/api/v1/nodes/n1/status",
                res("", "nodes", None, Some("n1"), Some("status")),
            ),
            (
                "/api/v1/namespaces",
                res("", "namespaces", None, None, None),
            ),
            (
                "/api/v1/namespaces/kube-system",
                res("", "namespaces", None, Some("kube-system"), None),
            ),
            (
                "/api/v1/namespaces/kube-system/status",
                res("", "namespaces", None, Some("kube-system"), Some("status")),
            ),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                res(d, "endpointslices", None, None, None),
            ),
            (
                "/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices/s1",
                res(d, "endpointslices", Some("ns1"), Some("s1"), None),
            ),
            ("/", None),
            ("/metrics", None),
            ("/api/v1/namespaces/a/pods/b/c/d", None),
        ];
        for (path, want) in cases {
            assert_eq!(parse_path(path), want, "{path}");
        }
    }

    #[test]
    fn query_of_a_kube_watcher() {
        let q = ListQuery::parse(
            "watch=true&timeoutSeconds=290&labelSelector=app%3Dweb%2Ctier+in+%28a%2Cb%29&allowWatchBookmarks=true&resourceVersion=123",
        )
        .unwrap();
        assert!(q.watch);
        assert!(q.allow_bookmarks);
        assert_eq!(q.timeout_seconds, Some(290));
        assert_eq!(q.resource_version.as_deref(), Some("123"));
        assert_eq!(
            q.label_selector,
            LabelSelector::parse("app=web,tier in (a,b)").unwrap()
        );
        assert_eq!(q.send_initial_events, None);
    }

    #[test]
    fn query_of_a_paginated_list() {
        let q = ListQuery::parse("limit=2&continue=abcd&fieldSelector=metadata.name%3Dx&watch=0")
            .unwrap();
        assert!(!q.watch);
        assert_eq!(q.limit, Some(2));
        assert_eq!(q.continue_token.as_deref(), Some("abcd"));
        assert_eq!(
            q.field_selector,
            FieldSelector::parse("metadata.name=x").unwrap()
        );
        assert_eq!(
            ListQuery::parse("watch=1&sendInitialEvents=true")
                .unwrap()
                .send_initial_events,
            Some(true)
        );
    }

    #[test]
    fn bad_queries_are_400() {
        for bad in [
            "limit=x",
            "watch=maybe",
            "labelSelector=a+in+b",
            "fieldSelector=nope",
            "timeoutSeconds=-1",
        ] {
            let err = ListQuery::parse(bad).unwrap_err();
            assert_eq!(err.code(), 400, "{bad}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            patch_kind("application/merge-patch+json"),
            Ok(PatchKind::Merge)
        );
        assert_eq!(
            patch_kind("application/strategic-merge-patch+json; charset=utf-8"),
            Ok(PatchKind::Merge)
        );
        assert_eq!(
            patch_kind("application/json-patch+json"),
            Ok(PatchKind::Json)
        );
        assert_eq!(
            patch_kind("application/apply-patch+yaml"),
            Ok(PatchKind::Apply)
        );
        assert_eq!(patch_kind("application/json").unwrap_err().code(), 415);
        assert!(check_json_body("application/json").is_ok());
        assert!(check_json_body("").is_ok());
        assert_eq!(check_json_body("application/yaml").unwrap_err().code(), 415);
    }

    #[test]
    fn metadata_shape() {
        let shape =
            Shape::from_accept("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1");
        assert_eq!(shape, Shape::Metadata);
        let obj = json!({ "kind": "Pod", "metadata": { "name": "p" }, "spec": {} });
        assert_eq!(
            shape.object(&obj),
            json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": { "name": "p" } })
        );
        assert_eq!(Shape::from_accept("application/json"), Shape::Full);
    }
}
