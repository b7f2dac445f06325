//! A Kubernetes API test server that the agent's real `kube` client talks to unchanged, as
//! strict as a real one where a client depends on it.
//!
//! It owns an in-memory object store with one global resourceVersion, list (selectors,
//! pagination), watch (replay from a resourceVersion, bookmarks every minute, streaming lists,
//! the real timeouts, 410 Gone after [`ApiServer::compact`]), get/create/update/patch/delete
//! (Pods deleted gracefully) over HTTPS (HTTP/1.1) on a listener the caller binds, and a typed
//! Rust API for tests to seed and inspect objects. Every request needs a bearer token the server
//! issued ([`ApiServer::admin_token`], [`ApiServer::service_account_token`]; 401 otherwise) and
//! is authorized by RBAC over the ClusterRoles and ClusterRoleBindings it stores (403 otherwise),
//! so a client with a kubeconfig from [`ApiServer::kubeconfig`] verifies the certificate against
//! the CA and runs under its role exactly as in a cluster. It must never reach outside the
//! listener it is given: it binds nothing itself (except [`ApiServer::start_local`], on
//! 127.0.0.1) and has no persistence.
//!
//! Layout: [`request`] reads paths and queries, [`store`] holds objects and applies the write
//! rules, [`watch`] decides what a watch sees, [`auth`] says who a token is, [`rbac`] what they
//! may do, [`tls`] makes the CA and terminates TLS, [`selector`], [`patch`] and [`paging`] are
//! the pure helpers, [`http`] is the axum shell, [`registry`] the table of served resources.
//!
//! Deliberate simplifications (a real API server differs): no admission or schema validation;
//! every kind is treated as having a `status` subresource (PUT/PATCH of the main resource keep
//! the stored status, `/status` changes only status); create keeps a `status` given in the body
//! and ignores a `resourceVersion` in it; strategic merge patches are merge patches; apply
//! patches (server-side apply) are create-or-merge without field ownership; `dryRun` is ignored;
//! garbage collection of dependents does not happen. Authentication is bearer tokens only (no
//! client certificates, no anonymous requests: a request without a token is a 401, as with
//! `--anonymous-auth=false`); a service-account token is checked against the server's own
//! table and its ServiceAccount's uid, not a signature, and is not bound to a pod. RBAC reads
//! ClusterRoles and ClusterRoleBindings only (no Roles, RoleBindings or aggregation); the
//! default `system:discovery` and `system:public-info-viewer` roles are built in, not objects.
//! HTTP/2 is not offered. Bookmarks go to every watch that allowed them every minute
//! ([`ApiServer::set_bookmark_interval`]), not also just before the watch's timeout.

mod auth;
mod error;
mod http;
mod paging;
mod patch;
mod rbac;
mod registry;
mod request;
mod selector;
mod store;
mod tls;
mod watch;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::oneshot;

pub use auth::User;
pub use error::ApiError;
pub use patch::{PatchError, json_patch, merge_patch};
pub use rbac::{Attributes, Policy};
pub use registry::ResourceType;
pub use request::RequestRecord;
pub use selector::{FieldSelector, LabelSelector, SelectorError};
pub use store::START_RESOURCE_VERSION;

use http::Shared;
use store::Scope;

/// A running API test server. Dropping it (or [`ApiServer::shutdown`]) ends every watch, stops
/// the server and joins its thread.
pub struct ApiServer {
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the typed API accepts: any `k8s-openapi` resource type (or one implementing its traits).
pub trait Object: Resource + Serialize + DeserializeOwned + 'static {}
impl<K: Resource + Serialize + DeserializeOwned + 'static> Object for K {}

impl ApiServer {
    /// Serves HTTPS on `listener`, already bound by the caller (possibly in another network
    /// namespace), from a thread of its own with its own tokio runtime, so it works from sync
    /// code and from inside any runtime alike. The serving certificate, signed by a CA made for
    /// this server, names the listener's address, 127.0.0.1 and `localhost`.
    pub fn start(listener: TcpListener) -> ApiServer {
        let addr = listener
            .local_addr()
            .expect("the API server listener has a local address");
        listener
            .set_nonblocking(true)
            .expect("make the API server listener non-blocking");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the API server's tokio runtime");
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .expect("register the API server listener with tokio")
        };
        let shared = Arc::new(Shared::new(addr));
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn({
                let shared = Arc::clone(&shared);
                move || runtime.block_on(http::serve(listener, shared, shutdown_rx))
            })
            .expect("spawn the API server thread");
        ApiServer {
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// [`ApiServer::start`] on a fresh port of 127.0.0.1.
    pub fn start_local() -> ApiServer {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the API server");
        Self::start(listener)
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The base URL, e.g. `https://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    // ---- Credentials ----

    /// The cluster CA's certificate (PEM), which signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        self.shared.pki.ca_pem().to_owned()
    }

    /// A rustls client configuration that trusts the cluster CA only, for tests that speak
    /// HTTP by hand.
    pub fn tls_client_config(&self) -> Arc<rustls::ClientConfig> {
        self.shared.pki.client_config()
    }

    /// The admin's bearer token (`kubernetes-admin`, group `system:masters`: never refused).
    pub fn admin_token(&self) -> String {
        self.shared.lock().admin_token().to_owned()
    }

    /// A new token of ServiceAccount `namespace/name`, shaped as the one a pod gets projected;
    /// valid for an hour, while the account exists. 404 if it does not.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String, ApiError> {
        self.shared.lock().service_account_token(namespace, name)
    }

    /// A kubeconfig for this server: its URL, the CA as `certificate-authority-data`, `token` as
    /// the user's bearer token.
    pub fn kubeconfig(&self, token: &str) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n\
             users:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            self.url()
        )
    }

    /// What RBAC decides for `user` on `attributes` now (the stored roles and bindings and the
    /// default discovery roles): `Ok`, or the 403 the server would answer.
    pub fn authorize(&self, user: &User, attributes: &Attributes) -> Result<(), ApiError> {
        self.shared.lock().policy().authorize(user, attributes)
    }

    /// Ends every watch and stops the server (what dropping it does).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.lock().close_watches();
        if let Some(shutdown) = self.shutdown.take() {
            // The server may already have stopped; then there is nobody to tell.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(addr = %self.shared.addr, "the API server thread panicked");
        }
    }

    // ---- Resources ----

    /// Serves another resource (e.g. a CRD) or changes kind/scope of a known one.
    pub fn register(&self, rt: ResourceType) {
        self.shared.lock().register(rt);
    }

    /// [`ApiServer::register`] for a type implementing `k8s_openapi::Resource`. The typed API
    /// registers its types on first use, so this is only needed before HTTP clients use them.
    pub fn register_typed<K: Resource + 'static>(&self) {
        self.register(ResourceType::of::<K>());
    }

    /// The current (newest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    // ---- Typed objects ----

    /// Creates an object (409 `AlreadyExists` if it exists). A namespaced object without a
    /// namespace goes to `default`.
    pub fn create<K: Object>(&self, object: &K) -> Result<K, ApiError> {
        self.create_value(&ResourceType::of::<K>(), to_value(object)?)
            .map(from_value)
    }

    /// Replaces an existing object; a set `metadata.resourceVersion` that is not the stored one is a
    /// 409 `Conflict`. Status is replaced too.
    pub fn replace<K: Object>(&self, object: &K) -> Result<K, ApiError> {
        let rt = ResourceType::of::<K>();
        let value = to_value(object)?;
        let mut store = self.shared.lock();
        let id = store.ensure(&rt);
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key = store.key(
            id,
            value.pointer("/metadata/namespace").and_then(Value::as_str),
            name,
        );
        let replaced = store.update(id, &key, value, Scope::Whole, true)?;
        Ok(from_value((*replaced).clone()))
    }

    /// Creates or replaces an object whatever its resourceVersion: the usual way to seed state.
    /// Panics if the object has no name.
    pub fn apply<K: Object>(&self, object: &K) -> K {
        let value = to_value(object).expect("a k8s-openapi object serializes to JSON");
        let applied = self
            .apply_value(&ResourceType::of::<K>(), value)
            .expect("apply an object through the typed API");
        from_value(applied)
    }

    /// Deletes an object at once (grace period 0) and returns its last state (with a
    /// `deletionTimestamp` instead, while finalizers remain). `namespace` `None` means `default`
    /// for namespaced kinds.
    pub fn delete<K: Object>(&self, namespace: Option<&str>, name: &str) -> Result<K, ApiError> {
        self.delete_value(&ResourceType::of::<K>(), namespace, name)
            .map(from_value)
    }

    /// Deletes an object with a grace period, as `kubectl delete --grace-period` does: a Pod
    /// bound to a node and still running stays, terminating (`deletionTimestamp` now + `grace`,
    /// `deletionGracePeriodSeconds`), until deleted with grace 0 ([`ApiServer::delete`], the
    /// kubelet's final delete); other objects go as with [`ApiServer::delete`].
    pub fn delete_gracefully<K: Object>(
        &self,
        namespace: Option<&str>,
        name: &str,
        grace: Duration,
    ) -> Result<K, ApiError> {
        let rt = ResourceType::of::<K>();
        let mut store = self.shared.lock();
        let id = store.ensure(&rt);
        let key = store.key(id, namespace, name);
        store
            .delete(id, &key, None, Some(grace.as_secs()))
            .map(|v| from_value((*v).clone()))
    }

    /// An object, if it exists. `namespace` `None` means `default` for namespaced kinds.
    pub fn get<K: Object>(&self, namespace: Option<&str>, name: &str) -> Option<K> {
        self.get_value(&ResourceType::of::<K>(), namespace, name)
            .map(from_value)
    }

    /// Every object of a kind, in all namespaces, ordered by namespace and name.
    pub fn list<K: Object>(&self) -> Vec<K> {
        self.list_values(&ResourceType::of::<K>())
            .into_iter()
            .map(from_value)
            .collect()
    }

    // ---- Untyped objects (custom resources without a Rust type) ----

    /// [`ApiServer::create`] for a JSON object of resource `rt` (registered on first use).
    pub fn create_value(&self, rt: &ResourceType, object: Value) -> Result<Value, ApiError> {
        let mut store = self.shared.lock();
        let id = store.ensure(rt);
        store.create(id, None, object).map(|v| (*v).clone())
    }

    /// [`ApiServer::apply`] for a JSON object of resource `rt`.
    pub fn apply_value(&self, rt: &ResourceType, object: Value) -> Result<Value, ApiError> {
        let mut store = self.shared.lock();
        let id = store.ensure(rt);
        store.apply(id, object).map(|v| (*v).clone())
    }

    /// [`ApiServer::delete`] for resource `rt`.
    pub fn delete_value(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut store = self.shared.lock();
        let id = store.ensure(rt);
        let key = store.key(id, namespace, name);
        store.delete(id, &key, None, Some(0)).map(|v| (*v).clone())
    }

    /// [`ApiServer::get`] for resource `rt`.
    pub fn get_value(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let mut store = self.shared.lock();
        let id = store.ensure(rt);
        let key = store.key(id, namespace, name);
        store.get(id, &key).ok().map(|v| (*v).clone())
    }

    /// [`ApiServer::list`] for resource `rt`.
    pub fn list_values(&self, rt: &ResourceType) -> Vec<Value> {
        let mut store = self.shared.lock();
        let id = store.ensure(rt);
        store.all(id).iter().map(|v| (**v).clone()).collect()
    }

    // ---- Test knobs ----

    /// Forgets the change history up to now, as etcd compaction does: a watch (or `continue`)
    /// from an older resourceVersion gets 410 Expired, and kube's watcher re-lists.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch stream now, as an API server restart would. Clients re-watch from
    /// the last resourceVersion they saw.
    pub fn close_watches(&self) {
        self.shared.lock().close_watches();
    }

    /// Ends every open watch stream and keeps new watches waiting, as while an API server
    /// restarts or a client's network is cut: changes made meanwhile reach clients only when
    /// they watch again. Dropping the returned guard lets the watches in (clients resume from
    /// the resourceVersions they had); [`WatchBreak::expire`] first compacts the history, as
    /// etcd does every five minutes, so that every client gets 410 Gone and re-lists.
    pub fn break_watches(&self) -> WatchBreak<'_> {
        let mut store = self.shared.lock();
        self.shared.watches_held.send_replace(true);
        store.close_watches();
        WatchBreak {
            shared: &self.shared,
        }
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open watch that asked for
    /// bookmarks (`allowWatchBookmarks=true`).
    pub fn bookmark_now(&self) {
        self.shared.lock().bookmark_all();
    }

    /// Sets the period of automatic bookmarks; `None` or a zero duration turns them off. The
    /// default is a minute, as the real server's watch cache.
    pub fn set_bookmark_interval(&self, interval: impl Into<Option<Duration>>) {
        self.shared.lock().bookmark_interval = interval.into().filter(|d| !d.is_zero());
        self.shared.bookmark_changed.notify_one();
    }

    /// Number of watch streams open now (their client still connected, as far as the server
    /// knows). Lets a test wait until a client has (re)connected its watch.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().clear_requests();
    }
}

/// Watches broken by [`ApiServer::break_watches`]: new ones wait until this is dropped.
#[must_use = "watches stay broken only while the WatchBreak lives"]
pub struct WatchBreak<'a> {
    shared: &'a Shared,
}

impl WatchBreak<'_> {
    /// Compacts away every resourceVersion the clients have seen (one write elsewhere, then
    /// compaction), then lets the watches in: each gets 410 Gone, and a client re-lists.
    pub fn expire(self) {
        self.shared.lock().expire_history();
        // Drop lets the watches in.
    }
}

impl Drop for WatchBreak<'_> {
    fn drop(&mut self) {
        let _store = self.shared.lock();
        self.shared.watches_held.send_replace(false);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

fn to_value<K: Serialize>(object: &K) -> Result<Value, ApiError> {
    serde_json::to_value(object)
        .map_err(|e| ApiError::BadRequest(format!("the object does not serialize: {e}")))
}

/// Stored objects were validated against their kind on the way in; one that does not deserialize
/// is a bug in the test (two Rust types for one resource), so this panics with the reason.
#[expect(
    clippy::panic,
    reason = "test support: a type mismatch is a bug in the test, stop loudly"
)]
fn from_value<K: Object>(value: Value) -> K {
    serde_json::from_value(value).unwrap_or_else(|e| {
        panic!(
            "a stored {} does not deserialize as its Rust type: {e}",
            K::KIND
        )
    })
}
