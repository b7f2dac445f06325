//! A Kubernetes API test server that the agent's real `kube` client talks to unchanged.
//!
//! It owns an in-memory object store with one global resourceVersion, list (selectors,
//! pagination), watch (replay from a resourceVersion, bookmarks, streaming lists, 410 Gone after
//! [`ApiServer::compact`]), get/create/update/patch/delete over HTTP/1.1 on a listener the caller
//! binds, and a typed Rust API for tests to seed and inspect objects. It must never reach outside
//! the listener it is given: it binds nothing itself (except [`ApiServer::start_local`], on
//! 127.0.0.1) and has no authentication, TLS or persistence.
//!
//! Layout: [`request`] reads paths and queries, [`store`] holds objects and applies the write
//! rules, [`watch`] decides what a watch sees, [`selector`], [`patch`] and [`paging`] are the
//! pure helpers, [`http`] is the axum shell, [`registry`] the table of served resources.
//!
//! Deliberate simplifications (a real API server differs): no admission or schema validation;
//! every kind is treated as having a `status` subresource (PUT/PATCH of the main resource keep
//! the stored status, `/status` changes only status); create keeps a `status` given in the body
//! and ignores a `resourceVersion` in it; strategic merge patches are merge patches; apply
//! patches (server-side apply) are create-or-merge without field ownership; `dryRun` is ignored;
//! garbage collection of dependents does not happen. Bookmarks go to every watch that allowed
//! them every second by default ([`ApiServer::set_bookmark_interval`]).

mod error;
mod http;
mod paging;
mod patch;
mod registry;
mod request;
mod selector;
mod store;
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

pub use error::ApiError;
pub use patch::{PatchError, json_patch, merge_patch};
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
    /// Serves HTTP/1.1 on `listener`, already bound by the caller (possibly in another network
    /// namespace), from a thread of its own with its own tokio runtime, so it works from sync
    /// code and from inside any runtime alike.
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

    /// The base URL, e.g. `http://127.0.0.1:41234`, for a kube `Config::cluster_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
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

    /// Deletes an object and returns its last state (with a `deletionTimestamp` instead, while
    /// finalizers remain). `namespace` `None` means `default` for namespaced kinds.
    pub fn delete<K: Object>(&self, namespace: Option<&str>, name: &str) -> Result<K, ApiError> {
        self.delete_value(&ResourceType::of::<K>(), namespace, name)
            .map(from_value)
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
        store.delete(id, &key, None).map(|v| (*v).clone())
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

    /// Sends a BOOKMARK with the current resourceVersion to every open watch that asked for
    /// bookmarks (`allowWatchBookmarks=true`).
    pub fn bookmark_now(&self) {
        self.shared.lock().bookmark_all();
    }

    /// Sets the period of automatic bookmarks; `None` or a zero duration turns them off. The
    /// default is one second.
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
