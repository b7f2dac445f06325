//! ferrox-tests: the machinery of ferrox's end-to-end tests and demo.
//!
//! - [`apiserver`]: a Kubernetes API test server (HTTPS with its own CA, bearer tokens, RBAC,
//!   list/watch with resourceVersions, bookmarks, 410 Gone) that the agent's real `kube` client
//!   talks to unchanged.
//! - [`harness`]: a cluster of nodes built from network namespaces on one machine, each with its
//!   own uplink, cgroup, bpffs and agent process; pods created by the real `ferrox-cni`.
//! - [`cri`]: a Container Runtime Interface client, to drive containerd as the kubelet does
//!   ([`harness::containerd`]).
//! - [`manifests`]: the install manifests as typed objects, and their containers' command lines.
//! - [`api_schema`]: the published API of the lowest and highest supported Kubernetes versions,
//!   and a document checked against it as the API server's strict field validation does.
//!
//! This is test support: a failure stops the test loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: failures should panic with context"
)]

pub mod api_schema;
pub mod apiserver;
pub mod bench;
pub mod cri;
pub mod harness;
pub mod manifests;
