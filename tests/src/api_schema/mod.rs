//! The published Kubernetes API of the lowest and the highest supported version (README.md,
//! "Supported versions"), and a document checked against it the way `kubectl apply` with strict
//! field validation has the API server do: the object decoded into that version's type, every
//! field the type does not have reported (a typo, a field of a later version), every value of
//! the wrong type reported, each with its path. CustomResourceDefinitions are also checked the
//! way the API server validates them, their schemas structural ([`structural`]).
//!
//! Each version's types come from a k8s-openapi release built for it: k8s-openapi generates them
//! from the OpenAPI document Kubernetes publishes for that version, which is itself generated
//! from the API server's Go types, so field names and JSON types are the ones the API server
//! decodes. (1.33 comes from k8s-openapi 0.28, since the workspace's 0.29 builds 1.37; the 1.33
//! API both releases generate has the same types with the same fields.) What this does not
//! check is the API server's semantic validation beyond CRDs (required values, a selector
//! matching the template's labels, name formats), nor admission.
//!
//! Never changes a document; never needs a cluster or the network.

pub mod strict;
pub mod structural;
pub mod yaml;

use std::fmt;

use serde_json::Value;

/// One thing the API server would reject, at `path` (`.spec.template.spec.hostNetwork`,
/// `.` for the whole document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A Kubernetes minor version whose published API documents are checked against.
pub struct Version {
    /// `1.33`.
    pub name: &'static str,
    decode: fn(&Value) -> Result<(), Vec<Problem>>,
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kubernetes {}", self.name)
    }
}

impl Version {
    /// What the API server of this version rejects in `doc` when it is applied with strict field
    /// validation: unknown fields, values of the wrong type, a kind it does not serve; and for a
    /// CustomResourceDefinition, what its validation rejects (see [`structural`]).
    pub fn check(&self, doc: &Value) -> Result<(), Vec<Problem>> {
        (self.decode)(doc)?;
        if doc["apiVersion"] == "apiextensions.k8s.io/v1"
            && doc["kind"] == "CustomResourceDefinition"
        {
            let problems = structural::check_crd(doc);
            if !problems.is_empty() {
                return Err(problems);
            }
        }
        Ok(())
    }
}

/// The lowest supported version: kube 5.0, the agent's client, is tested from 1.33 on (its
/// minimum supported Kubernetes version); README.md says why.
pub const LOWEST: Version = Version {
    name: lowest::NAME,
    decode: lowest::decode,
};

/// The highest supported version: the one the workspace's k8s-openapi (and so the agent) is
/// built for.
pub const HIGHEST: Version = Version {
    name: highest::NAME,
    decode: highest::decode,
};

/// The versions the manifests must apply on: both ends of the supported range.
pub const SUPPORTED: [&Version; 2] = [&LOWEST, &HIGHEST];

/// Decodes `doc` as the first of the listed types whose apiVersion and kind it names, in the
/// k8s-openapi crate `k` the invoking module imports; a kind none of them is, is an error.
macro_rules! decode_as_one_of {
    ($version:expr, $doc:expr; $($ty:ty),* $(,)?) => {{
        let doc: &serde_json::Value = $doc;
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        $(
            if api_version == <$ty as k::Resource>::API_VERSION
                && kind == <$ty as k::Resource>::KIND
            {
                return $crate::api_schema::strict::decode::<$ty>(doc);
            }
        )*
        let known: Vec<String> = vec![$(format!(
            "{} {}",
            <$ty as k::Resource>::API_VERSION,
            <$ty as k::Resource>::KIND
        )),*];
        Err(vec![$crate::api_schema::Problem::new(
            ".",
            format!(
                "apiVersion {api_version:?}, kind {kind:?}: not one of the kinds this check \
                 knows for Kubernetes {} ({}); a kind the manifests start to use goes in the \
                 table of tests/src/api_schema/mod.rs",
                $version,
                known.join(", ")
            ),
        )])
    }};
}

/// The kinds a manifest may hold, as types of the k8s-openapi crate imported as `k`: the same
/// list for every version, so a kind that one of them lacks does not compile.
macro_rules! served_kinds {
    ($version:expr) => {
        pub(super) fn decode(doc: &serde_json::Value) -> Result<(), Vec<super::Problem>> {
            use k::{
                api::{apps, core, policy, rbac, scheduling},
                apiextensions_apiserver::pkg::apis::apiextensions,
            };
            decode_as_one_of!($version, doc;
                apiextensions::v1::CustomResourceDefinition,
                core::v1::ConfigMap,
                core::v1::Namespace,
                core::v1::Secret,
                core::v1::Service,
                core::v1::ServiceAccount,
                rbac::v1::ClusterRole,
                rbac::v1::ClusterRoleBinding,
                rbac::v1::Role,
                rbac::v1::RoleBinding,
                apps::v1::DaemonSet,
                apps::v1::Deployment,
                scheduling::v1::PriorityClass,
                policy::v1::PodDisruptionBudget,
            )
        }
    };
}

mod lowest {
    use k8s_openapi_lowest as k;
    // tests/Cargo.toml builds this k8s-openapi for 1.33; the name follows the feature.
    k8s_openapi_lowest::k8s_if_1_33! {
        pub(super) const NAME: &str = "1.33";
    }
    served_kinds!(NAME);
}

mod highest {
    use k8s_openapi as k;
    // The workspace's k8s-openapi builds one Kubernetes version: 1.37. When it moves on, this
    // stops compiling: raise the supported range in README.md ("Supported versions") and here.
    k8s_openapi::k8s_if_1_37! {
        pub(super) const NAME: &str = "1.37";
    }
    served_kinds!(NAME);
}
