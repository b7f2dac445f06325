//! Authorization as the real API server does it: the attributes it reads off a request (verb,
//! API group, resource and subresource, namespace, name, or the path of a non-resource request;
//! `k8s.io/apiserver`'s `RequestInfoFactory`), and the RBAC decision over ClusterRoles and
//! ClusterRoleBindings (`plugin/pkg/auth/authorizer/rbac`), with the `Forbidden` wording a
//! client shows.
//!
//! Owns: verb mapping (GET of a collection is `list`, with `?watch=true` `watch`, of one object
//! `get`; POST `create`, PUT `update`, PATCH `patch`, DELETE of one `delete`, of a collection
//! `deletecollection`; a list or watch whose field selector names one object is authorized for
//! that name), `resource/subresource`, the matching of verbs, apiGroups, resources (`*`,
//! `*/sub`), resourceNames and nonResourceURLs (exact or `prefix*`), subjects (User, Group,
//! ServiceAccount), the superuser group, and the default discovery roles every authenticated
//! user has. Pure: plain data in, a decision out; never panics.

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::auth::{AUTHENTICATED, User};
use super::error::ApiError;

/// What a request asks to do, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`; for a
    /// non-resource request the lowercased HTTP method.
    pub verb: String,
    /// Whether the path addresses a resource (`/api/v1/...`, `/apis/{group}/{version}/...`).
    pub resource_request: bool,
    /// The request path (what `nonResourceURLs` match).
    pub path: String,
    /// API group, `""` for the core group.
    pub api_group: String,
    /// Plural resource.
    pub resource: String,
    /// Subresource (`status`), empty if none.
    pub subresource: String,
    /// Namespace, empty at the cluster scope.
    pub namespace: String,
    /// Object name, empty for a collection (unless a field selector names one object).
    pub name: String,
}

impl Attributes {
    /// The attributes of an HTTP request, as the real API server derives them.
    pub fn of_request(method: &str, path: &str, query: &str) -> Attributes {
        let mut a = Attributes {
            verb: method.to_ascii_lowercase(),
            path: path.to_owned(),
            ..Attributes::default()
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() < 3 {
            return a;
        }
        let rest = match parts[0] {
            "api" => &parts[1..],
            "apis" if parts.len() >= 4 => {
                a.api_group = parts[1].to_owned();
                &parts[2..]
            }
            _ => return a,
        };
        a.resource_request = true;
        let mut rest = &rest[1..];
        match rest.first().copied() {
            Some(special @ ("watch" | "proxy")) if rest.len() >= 2 => {
                a.verb = special.to_owned();
                rest = &rest[1..];
            }
            _ => {
                a.verb = match method {
                    "POST" => "create",
                    "GET" | "HEAD" => "get",
                    "PUT" => "update",
                    "PATCH" => "patch",
                    "DELETE" => "delete",
                    _ => "",
                }
                .to_owned();
            }
        }
        if rest.first() == Some(&"namespaces") && rest.len() > 1 {
            a.namespace = rest[1].to_owned();
            if rest.len() > 2 && !["status", "finalize"].contains(&rest[2]) {
                rest = &rest[2..];
            }
        }
        if rest.len() >= 3 && a.verb != "proxy" {
            a.subresource = rest[2].to_owned();
        }
        if rest.len() >= 2 {
            a.name = rest[1].to_owned();
        }
        if let Some(resource) = rest.first() {
            a.resource = (*resource).to_owned();
        }
        if a.name.is_empty() && a.verb == "delete" {
            a.verb = "deletecollection".to_owned();
        }
        if a.name.is_empty() && a.verb == "get" {
            let param = |key: &str| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.into_owned())
            };
            let watch = param("watch").is_some_and(|w| matches!(w.as_str(), "true" | "1" | ""));
            a.verb = if watch { "watch" } else { "list" }.to_owned();
            if let Some(name) = param("fieldSelector").as_deref().and_then(selected_name) {
                a.name = name;
            }
        }
        a
    }

    /// A resource request (for tests and callers that build attributes by hand).
    pub fn resource(verb: &str, api_group: &str, resource: &str, namespace: &str) -> Attributes {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: verb.to_owned(),
            resource_request: true,
            api_group: api_group.to_owned(),
            resource: resource.to_owned(),
            subresource: subresource.to_owned(),
            namespace: namespace.to_owned(),
            ..Attributes::default()
        }
    }

    /// The same request for the object `name`.
    pub fn named(mut self, name: &str) -> Attributes {
        self.name = name.to_owned();
        self
    }

    /// A non-resource request: `verb` (lowercased method) on `path`.
    pub fn non_resource(verb: &str, path: &str) -> Attributes {
        Attributes {
            verb: verb.to_owned(),
            path: path.to_owned(),
            ..Attributes::default()
        }
    }

    /// `resource/subresource`, or `resource`.
    fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The name a field selector requires exactly (`metadata.name=x` or `==`), if it is a valid
/// path segment: the real server then authorizes the list or watch for that one name.
fn selected_name(selector: &str) -> Option<String> {
    selector.split(',').find_map(|term| {
        let (field, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .filter(|(f, _)| !f.ends_with('!'))?;
        (field.trim() == "metadata.name")
            .then(|| value.trim().to_owned())
            .filter(|v| !v.is_empty() && v != "." && v != ".." && !v.contains(['/', '%']))
    })
}

/// The RBAC objects a decision reads: ClusterRoles and the ClusterRoleBindings granting them.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub roles: Vec<ClusterRole>,
    pub bindings: Vec<ClusterRoleBinding>,
}

impl Policy {
    /// The default roles of every cluster that the tests rely on: `system:discovery` and
    /// `system:public-info-viewer` (discovery documents, `/version`, health) for every
    /// authenticated user.
    pub fn bootstrap() -> Policy {
        let get_paths = |paths: &[&str]| PolicyRule {
            verbs: vec!["get".to_owned()],
            non_resource_urls: Some(paths.iter().map(|p| (*p).to_owned()).collect()),
            ..PolicyRule::default()
        };
        let role = |name: &str, rule: PolicyRule| ClusterRole {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            rules: Some(vec![rule]),
            ..ClusterRole::default()
        };
        let binding = |name: &str| ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "ClusterRole".to_owned(),
                name: name.to_owned(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "Group".to_owned(),
                name: AUTHENTICATED.to_owned(),
                namespace: None,
            }]),
        };
        Policy {
            roles: vec![
                role(
                    "system:discovery",
                    get_paths(&[
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/openapi",
                        "/openapi/*",
                        "/readyz",
                        "/version",
                        "/version/",
                    ]),
                ),
                role(
                    "system:public-info-viewer",
                    get_paths(&["/healthz", "/livez", "/readyz", "/version", "/version/"]),
                ),
            ],
            bindings: vec![
                binding("system:discovery"),
                binding("system:public-info-viewer"),
            ],
        }
    }

    /// Allows the request, or says why not: a 403 `Forbidden` worded as the real server's.
    pub fn authorize(&self, user: &User, attrs: &Attributes) -> Result<(), ApiError> {
        if user.is_superuser() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for binding in &self.bindings {
            if !binding
                .subjects
                .iter()
                .flatten()
                .any(|s| applies_to(s, user))
            {
                continue;
            }
            if binding.role_ref.kind != "ClusterRole" {
                continue;
            }
            let Some(role) = self
                .roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
            else {
                errors.push(format!(
                    "clusterrole.rbac.authorization.k8s.io \"{}\" not found",
                    binding.role_ref.name
                ));
                continue;
            };
            if role.rules.iter().flatten().any(|r| rule_allows(r, attrs)) {
                return Ok(());
            }
        }
        let reason = match errors.as_slice() {
            [] => String::new(),
            [one] => format!("RBAC: {one}"),
            many => format!("RBAC: [{}]", many.join(", ")),
        };
        Err(forbidden(user, attrs, &reason))
    }
}

fn applies_to(subject: &Subject, user: &User) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.groups.contains(&subject.name),
        "ServiceAccount" => subject.namespace.as_deref().is_some_and(|ns| {
            !ns.is_empty() && user.name == super::auth::service_account_user(ns, &subject.name)
        }),
        _ => false,
    }
}

fn rule_allows(rule: &PolicyRule, attrs: &Attributes) -> bool {
    let any = |list: Option<&Vec<String>>, want: &str| {
        list.into_iter()
            .flatten()
            .any(|item| item == "*" || item == want)
    };
    if !any(Some(&rule.verbs), &attrs.verb) {
        return false;
    }
    if !attrs.resource_request {
        return rule.non_resource_urls.iter().flatten().any(|url| {
            url == "*"
                || *url == attrs.path
                || url
                    .strip_suffix('*')
                    .is_some_and(|prefix| attrs.path.starts_with(prefix))
        });
    }
    let combined = attrs.combined_resource();
    let resource_matches = rule.resources.iter().flatten().any(|r| {
        r == "*"
            || *r == combined
            || (!attrs.subresource.is_empty()
                && r.strip_prefix("*/") == Some(attrs.subresource.as_str()))
    });
    let name_matches = match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => names.contains(&attrs.name),
    };
    any(rule.api_groups.as_ref(), &attrs.api_group) && resource_matches && name_matches
}

/// The 403 of the real API server (`responsewriters.forbiddenMessage` and `NewForbidden`).
fn forbidden(user: &User, attrs: &Attributes, reason: &str) -> ApiError {
    let mut message = if !attrs.resource_request {
        format!(
            "User \"{}\" cannot {} path \"{}\"",
            user.name, attrs.verb, attrs.path
        )
    } else if !attrs.namespace.is_empty() {
        format!(
            "User \"{}\" cannot {} resource \"{}\" in API group \"{}\" in the namespace \"{}\"",
            user.name,
            attrs.verb,
            attrs.combined_resource(),
            attrs.api_group,
            attrs.namespace
        )
    } else {
        format!(
            "User \"{}\" cannot {} resource \"{}\" in API group \"{}\" at the cluster scope",
            user.name,
            attrs.verb,
            attrs.combined_resource(),
            attrs.api_group
        )
    };
    if !reason.is_empty() {
        message.push_str(": ");
        message.push_str(reason);
    }
    ApiError::Forbidden {
        group: attrs.api_group.clone(),
        resource: attrs.resource.clone(),
        name: attrs.name.clone(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ferrox() -> User {
        User::service_account("kube-system", "ferrox")
    }

    /// The manifest's role, as YAML would give it.
    fn policy(rules: serde_json::Value) -> Policy {
        let mut policy = Policy::bootstrap();
        policy.roles.push(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "ferrox" }, "rules": rules
            }))
            .unwrap(),
        );
        policy.bindings.push(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "ferrox" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ferrox" },
                "subjects": [ { "kind": "ServiceAccount", "name": "ferrox", "namespace": "kube-system" } ]
            }))
            .unwrap(),
        );
        policy
    }

    fn agent_policy() -> Policy {
        policy(serde_json::json!([
            { "apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"] },
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"] },
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["ferrox-config"] },
            { "apiGroups": ["", "apps"], "resources": ["pods/status", "*/scale"], "verbs": ["patch"] },
        ]))
    }

    fn req(method: &str, path_and_query: &str) -> Attributes {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Attributes::of_request(method, path, query)
    }

    #[test]
    fn verbs_and_attributes_are_read_as_the_real_server_reads_them() {
        let cases = [
            (
                "GET",
                "/api/v1/services",
                "list",
                "",
                "services",
                "",
                "",
                "",
            ),
            (
                "GET",
                "/api/v1/services?watch=true&resourceVersion=5",
                "watch",
                "",
                "services",
                "",
                "",
                "",
            ),
            (
                "GET",
                "/api/v1/namespaces/default/services/web",
                "get",
                "",
                "services",
                "",
                "default",
                "web",
            ),
            (
                "POST",
                "/apis/ipam.ferrox.io/v1alpha1/ipamblocks",
                "create",
                "ipam.ferrox.io",
                "ipamblocks",
                "",
                "",
                "",
            ),
            (
                "PUT",
                "/api/v1/nodes/n1/status",
                "update",
                "",
                "nodes",
                "status",
                "",
                "n1",
            ),
            (
                "PATCH",
                "/api/v1/namespaces/a/pods/p/status",
                "patch",
                "",
                "pods",
                "status",
                "a",
                "p",
            ),
            (
                "DELETE",
                "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/s",
                "delete",
                "discovery.k8s.io",
                "endpointslices",
                "",
                "a",
                "s",
            ),
            (
                "DELETE",
                "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices",
                "deletecollection",
                "discovery.k8s.io",
                "endpointslices",
                "",
                "a",
                "",
            ),
            (
                "GET",
                "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-1&watch=1",
                "watch",
                "",
                "nodes",
                "",
                "",
                "node-1",
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1",
                "list",
                "",
                "pods",
                "",
                "",
                "",
            ),
            (
                "GET",
                "/api/v1/namespaces/kube-system",
                "get",
                "",
                "namespaces",
                "",
                "kube-system",
                "kube-system",
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/a/services",
                "watch",
                "",
                "services",
                "",
                "a",
                "",
            ),
        ];
        for (method, url, verb, group, resource, sub, ns, name) in cases {
            let a = req(method, url);
            assert!(a.resource_request, "{url}");
            assert_eq!(
                (
                    a.verb.as_str(),
                    a.api_group.as_str(),
                    a.resource.as_str(),
                    a.subresource.as_str(),
                    a.namespace.as_str(),
                    a.name.as_str()
                ),
                (verb, group, resource, sub, ns, name),
                "{method} {url}"
            );
        }
        for (method, url) in [
            ("GET", "/version"),
            ("GET", "/api"),
            ("GET", "/api/v1"),
            ("GET", "/apis"),
            ("GET", "/apis/discovery.k8s.io"),
            ("GET", "/apis/discovery.k8s.io/v1"),
            ("GET", "/healthz"),
            ("POST", "/metrics"),
        ] {
            let a = req(method, url);
            assert!(!a.resource_request, "{url}");
            assert_eq!(a.verb, method.to_ascii_lowercase());
            assert_eq!(a.path, url);
        }
    }

    #[test]
    fn the_role_grants_its_verbs_groups_resources_and_names_and_nothing_else() {
        let p = agent_policy();
        let u = ferrox();
        let allowed = [
            Attributes::resource("list", "", "services", ""),
            Attributes::resource("watch", "", "services", "default"),
            Attributes::resource("watch", "discovery.k8s.io", "endpointslices", ""),
            Attributes::resource("get", "", "nodes", "").named("node-1"),
            Attributes::resource("get", "", "configmaps", "kube-system").named("ferrox-config"),
            Attributes::resource("patch", "", "pods/status", "a").named("p"),
            Attributes::resource("patch", "apps", "deployments/scale", "a").named("d"),
        ];
        for a in &allowed {
            assert_eq!(p.authorize(&u, a), Ok(()), "{a:?}");
        }
        let denied = [
            // Verb not granted.
            Attributes::resource("get", "", "services", "default").named("web"),
            Attributes::resource("create", "", "services", "default"),
            Attributes::resource("deletecollection", "", "services", "default"),
            // Same resource name in another group.
            Attributes::resource("list", "discovery.k8s.io", "services", ""),
            Attributes::resource("list", "", "endpointslices", ""),
            // Another resource, a subresource of a granted resource.
            Attributes::resource("list", "", "secrets", ""),
            Attributes::resource("get", "", "nodes/proxy", "").named("node-1"),
            Attributes::resource("patch", "", "pods", "a").named("p"),
            // resourceNames: another name, or no name (a list).
            Attributes::resource("get", "", "configmaps", "kube-system").named("other"),
            Attributes::resource("list", "", "configmaps", "kube-system"),
            // Non-resource paths outside the discovery roles.
            Attributes::non_resource("get", "/metrics"),
            Attributes::non_resource("post", "/api"),
        ];
        for a in &denied {
            let err = p.authorize(&u, a).unwrap_err();
            assert_eq!(err.code(), 403, "{a:?}");
            assert_eq!(err.reason(), "Forbidden");
        }
        // Another service account, or a user named like it in the wrong namespace, gets nothing.
        let other = User::service_account("default", "ferrox");
        assert!(
            p.authorize(&other, &Attributes::resource("list", "", "services", ""))
                .is_err()
        );
        // The superuser gets everything.
        assert_eq!(
            p.authorize(
                &User::admin(),
                &Attributes::resource("delete", "", "nodes", "")
            ),
            Ok(())
        );
    }

    #[test]
    fn every_authenticated_user_may_read_discovery_and_version() {
        let p = Policy::bootstrap();
        for path in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/discovery.k8s.io/v1",
            "/version",
            "/healthz",
            "/readyz",
            "/livez",
        ] {
            assert_eq!(
                p.authorize(&ferrox(), &Attributes::non_resource("get", path)),
                Ok(()),
                "{path}"
            );
        }
        let err = p
            .authorize(&ferrox(), &Attributes::non_resource("get", "/metrics"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "forbidden: User \"system:serviceaccount:kube-system:ferrox\" cannot get path \"/metrics\""
        );
    }

    #[test]
    fn forbidden_is_worded_as_the_real_api_server_words_it() {
        let p = agent_policy();
        let u = User::service_account("kube-system", "someone");
        let err = p
            .authorize(&u, &req("GET", "/api/v1/services"))
            .unwrap_err();
        assert_eq!(
            err.status(),
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "services is forbidden: User \"system:serviceaccount:kube-system:someone\" cannot list resource \"services\" in API group \"\" at the cluster scope",
                "reason": "Forbidden", "details": { "kind": "services" }, "code": 403,
            })
        );
        let err = p
            .authorize(
                &ferrox(),
                &req(
                    "PUT",
                    "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-abc",
                ),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpointslices.discovery.k8s.io \"web-abc\" is forbidden: User \"system:serviceaccount:kube-system:ferrox\" cannot update resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"default\""
        );
        let status = err.status();
        assert_eq!(
            status["details"],
            serde_json::json!({ "name": "web-abc", "group": "discovery.k8s.io", "kind": "endpointslices" })
        );
        let err = p
            .authorize(&ferrox(), &req("GET", "/api/v1/nodes/n1/proxy"))
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "cannot get resource \"nodes/proxy\" in API group \"\" at the cluster scope"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_binding_to_a_missing_role_grants_nothing_and_says_so() {
        let mut p = agent_policy();
        p.roles
            .retain(|r| r.metadata.name.as_deref() != Some("ferrox"));
        let err = p
            .authorize(&ferrox(), &Attributes::resource("list", "", "services", ""))
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "at the cluster scope: RBAC: clusterrole.rbac.authorization.k8s.io \"ferrox\" not found"
            ),
            "{err}"
        );
    }

    #[test]
    fn user_and_group_subjects() {
        let mut p = agent_policy();
        p.bindings[2].subjects = Some(vec![
            Subject {
                kind: "User".into(),
                name: "alice".into(),
                ..Subject::default()
            },
            Subject {
                kind: "Group".into(),
                name: "system:serviceaccounts:kube-system".into(),
                ..Subject::default()
            },
        ]);
        let list = Attributes::resource("list", "", "services", "");
        let alice = User {
            name: "alice".into(),
            groups: vec![AUTHENTICATED.into()],
        };
        assert_eq!(p.authorize(&alice, &list), Ok(()));
        assert_eq!(
            p.authorize(&User::service_account("kube-system", "any"), &list),
            Ok(())
        );
        assert!(
            p.authorize(&User::service_account("default", "any"), &list)
                .is_err()
        );
    }
}
