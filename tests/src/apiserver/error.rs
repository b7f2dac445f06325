//! The errors the test API server answers with, and their Kubernetes `Status` form.
//!
//! Owns the mapping error → HTTP code, `reason` and message. The messages copy the real API
//! server's wording where a client might show or match them. Never panics.

use serde_json::{Value, json};

/// An error of the API: what a real API server would answer with a `Status` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The object does not exist (404).
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Plural resource name, qualified with its group (`endpointslices.discovery.k8s.io`).
        resource: String,
        /// Object name.
        name: String,
    },
    /// The path names no resource or endpoint this server knows (404).
    #[error("the server could not find the requested resource ({path})")]
    NoRoute {
        /// The request path.
        path: String,
    },
    /// A create for a name that is taken (409).
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Qualified plural resource name.
        resource: String,
        /// Object name.
        name: String,
    },
    /// An optimistic-concurrency failure: stale resourceVersion or failed precondition (409).
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    Conflict {
        /// Qualified plural resource name.
        resource: String,
        /// Object name.
        name: String,
        /// What did not match.
        detail: String,
    },
    /// A malformed request: bad JSON, bad selector, bad query parameter, bad patch (400).
    #[error("{0}")]
    BadRequest(String),
    /// A well-formed object that the server refuses, e.g. one without a name (422).
    #[error("{resource} \"{name}\" is invalid: {detail}")]
    Invalid {
        /// Qualified plural resource name.
        resource: String,
        /// Object name (may be empty).
        name: String,
        /// Which field is wrong.
        detail: String,
    },
    /// A watch or list from a resourceVersion older than the retained history (410).
    #[error("too old resource version: {requested} ({oldest})")]
    Expired {
        /// The resourceVersion the client asked for.
        requested: u64,
        /// The oldest resourceVersion the server can still serve from.
        oldest: u64,
    },
    /// A `continue` token whose snapshot is no longer retained (410).
    #[error(
        "The provided continue parameter is too old to display a consistent list result. You can \
         start a new list without the continue parameter."
    )]
    ContinueExpired,
    /// A method this resource path does not serve (405).
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// A request body of a content type this server does not read (415).
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType {
        /// The media types that would have been accepted.
        accepted: String,
    },
    /// A request without valid credentials: no bearer token, an unknown or expired one, or
    /// one whose ServiceAccount is gone (401).
    #[error("Unauthorized")]
    Unauthorized,
    /// A request the caller's roles do not allow (403). `message` is what the real server says
    /// after "... is forbidden: ".
    #[error("{}", forbidden_text(.group, .resource, .name, .message))]
    Forbidden {
        /// API group of the resource, empty for core or a non-resource request.
        group: String,
        /// Plural resource (without subresource), empty for a non-resource request.
        resource: String,
        /// Object name, empty for a collection.
        name: String,
        /// `User "..." cannot VERB resource "..." in API group "..." ...`.
        message: String,
    },
}

/// `NewForbidden`'s message: `{resource.group} "{name}" is forbidden: {message}`.
fn forbidden_text(group: &str, resource: &str, name: &str, message: &str) -> String {
    let qualified = if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    };
    match (qualified.is_empty(), name.is_empty()) {
        (true, _) => format!("forbidden: {message}"),
        (false, true) => format!("{qualified} is forbidden: {message}"),
        (false, false) => format!("{qualified} \"{name}\" is forbidden: {message}"),
    }
}

impl ApiError {
    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute { .. } => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::BadRequest(_) => 400,
            ApiError::Invalid { .. } => 422,
            ApiError::Expired { .. } | ApiError::ContinueExpired => 410,
            ApiError::MethodNotAllowed => 405,
            ApiError::UnsupportedMediaType { .. } => 415,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden { .. } => 403,
        }
    }

    /// The machine-readable `reason` of the `Status`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute { .. } => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Expired { .. } | ApiError::ContinueExpired => "Expired",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden { .. } => "Forbidden",
        }
    }

    /// The `Status` object a real API server would send for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name, .. }
            | ApiError::Invalid { resource, name, .. } => Some(details(resource, name)),
            ApiError::Forbidden {
                group,
                resource,
                name,
                ..
            } => {
                // Empty fields are left out, as Go's `omitempty` does (`"details": {}` for a
                // non-resource path).
                let details: serde_json::Map<String, Value> =
                    [("name", name), ("group", group), ("kind", resource)]
                        .into_iter()
                        .filter(|(_, v)| !v.is_empty())
                        .map(|(k, v)| (k.to_owned(), Value::from(v.as_str())))
                        .collect();
                Some(Value::Object(details))
            }
            _ => None,
        };
        if let (Some(details), Some(map)) = (details, status.as_object_mut()) {
            map.insert("details".to_owned(), details);
        }
        status
    }

    /// A conflict caused by a stale `metadata.resourceVersion`.
    pub(crate) fn stale(resource: &str, name: &str) -> ApiError {
        ApiError::Conflict {
            resource: resource.to_owned(),
            name: name.to_owned(),
            detail:
                "the object has been modified; please apply your changes to the latest version \
                     and try again"
                    .to_owned(),
        }
    }
}

/// `details` of a `Status`: `kind` is the plural resource, `group` split off its qualified name.
fn details(resource: &str, name: &str) -> Value {
    let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
    let mut details = json!({ "name": name, "kind": kind });
    if !group.is_empty()
        && let Some(map) = details.as_object_mut()
    {
        map.insert("group".to_owned(), Value::from(group));
    }
    details
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_status_matches_the_real_api_server() {
        let err = ApiError::NotFound {
            resource: "services".into(),
            name: "web".into(),
        };
        assert_eq!(
            err.status(),
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "services \"web\" not found", "reason": "NotFound", "code": 404,
                "details": { "name": "web", "kind": "services" },
            })
        );
    }

    #[test]
    fn grouped_resources_report_their_group_in_details() {
        let err = ApiError::stale("endpointslices.discovery.k8s.io", "web-abc");
        let status = err.status();
        assert_eq!(status["code"], 409);
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(status["details"]["group"], "discovery.k8s.io");
        assert_eq!(status["details"]["kind"], "endpointslices");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("the object has been modified")
        );
    }

    #[test]
    fn unauthorized_status_matches_the_real_api_server() {
        assert_eq!(
            ApiError::Unauthorized.status(),
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401,
            })
        );
    }

    #[test]
    fn expired_message_names_both_versions() {
        let err = ApiError::Expired {
            requested: 5,
            oldest: 10,
        };
        assert_eq!(err.code(), 410);
        assert_eq!(err.reason(), "Expired");
        assert_eq!(err.to_string(), "too old resource version: 5 (10)");
    }
}
