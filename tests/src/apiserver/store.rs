//! The state of the test API server: objects, the global resourceVersion, each resource's change
//! history, the open watches, the tokens it issued, and the request log.
//!
//! Owns every write rule (create/update/patch/delete, optimistic concurrency, immutable metadata,
//! generation, finalizers, no-op updates) and the guarantee that each write is appended to the
//! history and queued to every open watch of its resource in resourceVersion order, under the one
//! lock the caller holds. Never blocks and never does I/O: watches are fed through unbounded
//! channels that the HTTP layer drains.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::auth::{Bearer, Tokens, User};
use super::error::ApiError;
use super::paging::{ContinueToken, page};
use super::patch::{json_patch, merge_patch};
use super::rbac::Policy;
use super::registry::{Registry, ResId, ResourceType};
use super::request::{PatchKind, RequestRecord};
use super::selector::ObjectFilter;
use super::watch::{Change, ChangeType, Frame, WatchStart, replay, translate};

/// The resourceVersion of an empty server; the first write gets the next one.
pub const START_RESOURCE_VERSION: u64 = 100;

/// Changes kept per resource before the oldest are dropped (as if compacted).
const MAX_HISTORY: usize = 10_000;

/// Requests kept in the log before the oldest are dropped.
const MAX_REQUESTS: usize = 100_000;

/// How often a real API server's watch cache sends a BOOKMARK to a watch that allows them.
pub(crate) const BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// A Pod's grace period when neither the DELETE nor its spec names one.
const DEFAULT_POD_GRACE_SECONDS: u64 = 30;

/// Uids are unique across every server of the process.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// Where an object lives: `namespace` is empty for cluster-scoped kinds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjectKey {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// Which part of an object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything but immutable metadata: the typed test API.
    Whole,
    /// Everything but immutable metadata and `status`: a PUT/PATCH of the main resource, as on a
    /// real API server (every kind is treated as having a status subresource).
    Main,
    /// Only `status`: the `/status` subresource.
    Status,
}

/// What a watch receives after its initial frames.
#[derive(Debug, Clone)]
pub(crate) enum WatchMsg {
    Change(Arc<Change>),
    Bookmark(u64),
}

struct Subscriber {
    resource: ResId,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

/// A watch just opened: frames to send first, then the live feed (none after a 410).
pub(crate) struct WatchOpen {
    pub(crate) initial: Vec<Frame>,
    pub(crate) live: Option<mpsc::UnboundedReceiver<WatchMsg>>,
}

/// One page of a list and the resourceVersion it was cut at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListPage {
    pub(crate) items: Vec<Arc<Value>>,
    pub(crate) rv: u64,
    pub(crate) continue_token: Option<String>,
}

/// List options the store interprets (selectors travel in the [`ObjectFilter`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct ListOptions<'a> {
    pub(crate) limit: Option<usize>,
    pub(crate) continue_token: Option<&'a str>,
    pub(crate) resource_version: Option<&'a str>,
    pub(crate) resource_version_match: Option<&'a str>,
}

struct Collection {
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// The history holds every change with a greater resourceVersion than this.
    since: u64,
}

pub(crate) struct Store {
    registry: Registry,
    collections: Vec<Collection>,
    rv: u64,
    subscribers: Vec<Subscriber>,
    requests: VecDeque<RequestRecord>,
    pub(crate) bookmark_interval: Option<Duration>,
    tokens: Tokens,
    admin_token: String,
}

impl Store {
    pub(crate) fn new() -> Self {
        let (tokens, admin_token) = Tokens::with_admin();
        let mut store = Store {
            registry: Registry::default(),
            collections: Vec::new(),
            rv: START_RESOURCE_VERSION,
            subscribers: Vec::new(),
            requests: VecDeque::new(),
            bookmark_interval: Some(BOOKMARK_INTERVAL),
            tokens,
            admin_token,
        };
        let builtin = Registry::builtin();
        for id in 0..builtin.len() {
            store.register(builtin.get(ResId(id)).clone());
        }
        store
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn resource(&self, id: ResId) -> &ResourceType {
        self.registry.get(id)
    }

    /// Registers a resource (or updates its kind and scope) and gives it an empty collection.
    pub(crate) fn register(&mut self, rt: ResourceType) -> ResId {
        let id = self.registry.register(rt);
        while self.collections.len() < self.registry.len() {
            self.collections.push(Collection {
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                since: self.rv,
            });
        }
        id
    }

    /// The id of a resource, registering it if it is new.
    pub(crate) fn ensure(&mut self, rt: &ResourceType) -> ResId {
        match self.registry.find(&rt.group, &rt.version, &rt.plural) {
            Some(id) => id,
            None => self.register(rt.clone()),
        }
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    fn collection(&self, id: ResId) -> &Collection {
        &self.collections[id.0]
    }

    fn collection_mut(&mut self, id: ResId) -> &mut Collection {
        &mut self.collections[id.0]
    }

    /// The key of an object: namespaced kinds default to `default`, cluster kinds ignore `namespace`.
    pub(crate) fn key(&self, id: ResId, namespace: Option<&str>, name: &str) -> ObjectKey {
        let namespace = if self.resource(id).namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn not_found(&self, id: ResId, key: &ObjectKey) -> ApiError {
        ApiError::NotFound {
            resource: self.resource(id).qualified_plural(),
            name: key.name.clone(),
        }
    }

    pub(crate) fn get(&self, id: ResId, key: &ObjectKey) -> Result<Arc<Value>, ApiError> {
        self.collection(id)
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| self.not_found(id, key))
    }

    /// Every object of a resource, in key order.
    pub(crate) fn all(&self, id: ResId) -> Vec<Arc<Value>> {
        self.collection(id).objects.values().cloned().collect()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Appends a change to the history and queues it to every watch of the resource.
    fn record(&mut self, id: ResId, change: Change) {
        let change = Arc::new(change);
        let collection = self.collection_mut(id);
        match change.kind {
            ChangeType::Deleted => collection.objects.remove(&change.key),
            ChangeType::Added | ChangeType::Modified => collection
                .objects
                .insert(change.key.clone(), Arc::clone(&change.object)),
        };
        collection.history.push_back(Arc::clone(&change));
        while collection.history.len() > MAX_HISTORY {
            if let Some(dropped) = collection.history.pop_front() {
                collection.since = dropped.rv;
            }
        }
        self.subscribers.retain(|s| {
            s.resource != id || s.tx.send(WatchMsg::Change(Arc::clone(&change))).is_ok()
        });
    }

    /// POST: a new object. `url_namespace` is the namespace of the request path, if any.
    pub(crate) fn create(
        &mut self,
        id: ResId,
        url_namespace: Option<&str>,
        body: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let rt = self.resource(id).clone();
        let mut object = typed_object(&rt, body)?;
        let meta = metadata_mut(&mut object)?;
        let uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        let name = match meta_str(meta, "name") {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match meta_str(meta, "generateName") {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", name_suffix(uid)),
                _ => {
                    return Err(ApiError::Invalid {
                        resource: rt.qualified_plural(),
                        name: String::new(),
                        detail: "metadata.name: Required value: name or generateName is required"
                            .to_owned(),
                    });
                }
            },
        };
        let namespace = if rt.namespaced {
            match (
                url_namespace,
                meta_str(meta, "namespace").filter(|ns| !ns.is_empty()),
            ) {
                (Some(url), Some(body)) if url != body => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request"
                            .to_owned(),
                    ));
                }
                (Some(ns), _) | (None, Some(ns)) => ns.to_owned(),
                (None, None) => "default".to_owned(),
            }
        } else {
            String::new()
        };
        let key = ObjectKey { namespace, name };
        if self.collection(id).objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists {
                resource: rt.qualified_plural(),
                name: key.name,
            });
        }
        let rv = self.bump();
        meta.insert("name".to_owned(), Value::from(key.name.clone()));
        if rt.namespaced {
            meta.insert("namespace".to_owned(), Value::from(key.namespace.clone()));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".to_owned(), Value::from(uid_string(uid)));
        meta.insert("creationTimestamp".to_owned(), Value::from(now()));
        meta.insert("generation".to_owned(), Value::from(1));
        meta.insert("resourceVersion".to_owned(), Value::from(rv.to_string()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        let object = Arc::new(object);
        self.record(
            id,
            Change {
                rv,
                kind: ChangeType::Added,
                key,
                object: Arc::clone(&object),
                previous: None,
            },
        );
        Ok(object)
    }

    /// PUT: replaces an existing object. With `check_rv`, a non-empty stale resourceVersion in the
    /// body is a 409.
    pub(crate) fn update(
        &mut self,
        id: ResId,
        key: &ObjectKey,
        body: Value,
        scope: Scope,
        check_rv: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let rt = self.resource(id).clone();
        let old = self.get(id, key)?;
        let mut new = typed_object(&rt, body)?;
        let meta = metadata_mut(&mut new)?;
        if let Some(name) = meta_str(meta, "name").filter(|n| !n.is_empty() && *n != key.name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        if rt.namespaced
            && let Some(ns) =
                meta_str(meta, "namespace").filter(|ns| !ns.is_empty() && *ns != key.namespace)
        {
            return Err(ApiError::BadRequest(format!(
                "the namespace of the object ({ns}) does not match the namespace on the URL ({})",
                key.namespace
            )));
        }
        if check_rv
            && let Some(rv) = meta_str(meta, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv)
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(ApiError::stale(&rt.qualified_plural(), &key.name));
        }
        self.commit_update(id, key, &old, new, scope)
    }

    /// Writes `new` over `old`: keeps immutable metadata, bumps the generation on a spec change,
    /// skips no-op writes, and completes a deletion once the last finalizer is gone.
    fn commit_update(
        &mut self,
        id: ResId,
        key: &ObjectKey,
        old: &Arc<Value>,
        new: Value,
        scope: Scope,
    ) -> Result<Arc<Value>, ApiError> {
        let mut new = match scope {
            Scope::Whole => new,
            Scope::Main => with_field(new, "status", old.get("status")),
            Scope::Status => with_field((**old).clone(), "status", new.get("status")),
        };
        let old_meta = old
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let spec_changed = without_meta_and_status(old) != without_meta_and_status(&new);
        let meta = metadata_mut(&mut new)?;
        for immutable in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old_meta.get(immutable) {
                Some(value) => meta.insert(immutable.to_owned(), value.clone()),
                None => meta.remove(immutable),
            };
        }
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta.insert(
            "generation".to_owned(),
            Value::from(if spec_changed {
                generation + 1
            } else {
                generation
            }),
        );
        meta.insert(
            "resourceVersion".to_owned(),
            old_meta
                .get("resourceVersion")
                .cloned()
                .unwrap_or(Value::Null),
        );
        let deleting = meta.contains_key("deletionTimestamp");
        if new == **old {
            return Ok(Arc::clone(old));
        }
        if deleting && finalizers(&new).is_empty() {
            return Ok(self.remove(id, key, new, Arc::clone(old)));
        }
        let rv = self.bump();
        set_rv(&mut new, rv);
        let object = Arc::new(new);
        self.record(
            id,
            Change {
                rv,
                kind: ChangeType::Modified,
                key: key.clone(),
                object: Arc::clone(&object),
                previous: Some(Arc::clone(old)),
            },
        );
        Ok(object)
    }

    /// PATCH. A patch that sets a different resourceVersion is a 409, as on a real API server.
    /// Apply patches create the object if it is missing.
    pub(crate) fn patch(
        &mut self,
        id: ResId,
        key: &ObjectKey,
        kind: PatchKind,
        patch: &Value,
        scope: Scope,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let old = match self.get(id, key) {
            Ok(old) => old,
            Err(_) if kind == PatchKind::Apply && scope == Scope::Main => {
                let mut body = patch.clone();
                metadata_mut(&mut body)?.insert("name".to_owned(), Value::from(key.name.clone()));
                let namespace = self
                    .resource(id)
                    .namespaced
                    .then_some(key.namespace.as_str());
                return self
                    .create(id, namespace, body)
                    .map(|created| (created, true));
            }
            Err(err) => return Err(err),
        };
        let patched = match kind {
            PatchKind::Merge | PatchKind::Apply => merge_patch(&old, patch),
            PatchKind::Json => {
                json_patch(&old, patch).map_err(|e| ApiError::BadRequest(e.to_string()))?
            }
        };
        self.update(id, key, patched, scope, true)
            .map(|updated| (updated, false))
    }

    /// The typed API's upsert: create, or replace ignoring the resourceVersion.
    pub(crate) fn apply(&mut self, id: ResId, body: Value) -> Result<Arc<Value>, ApiError> {
        let name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let namespace = body.pointer("/metadata/namespace").and_then(Value::as_str);
        let key = self.key(id, namespace, name);
        if self.collection(id).objects.contains_key(&key) {
            self.update(id, &key, body, Scope::Whole, false)
        } else {
            self.create(id, None, body)
        }
    }

    /// DELETE. An object with finalizers only gets its `deletionTimestamp`; it goes once an update
    /// removes the last finalizer. A Pod bound to a node and still running is deleted gracefully,
    /// as on a real API server: it stays, with `deletionTimestamp` (now + grace period) and
    /// `deletionGracePeriodSeconds`, until a DELETE with grace period 0 (the kubelet's, once its
    /// containers stopped); a shorter grace period shortens a deletion in progress. `grace` is
    /// DeleteOptions' `gracePeriodSeconds` (unset: the pod's `terminationGracePeriodSeconds`, or
    /// 30 s), `preconditions` its field of that name.
    pub(crate) fn delete(
        &mut self,
        id: ResId,
        key: &ObjectKey,
        preconditions: Option<&Value>,
        grace: Option<u64>,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self.get(id, key)?;
        for field in ["uid", "resourceVersion"] {
            let want = preconditions
                .and_then(|p| p.get(field))
                .and_then(Value::as_str);
            let have = old
                .pointer(&format!("/metadata/{field}"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(want) = want
                && want != have
            {
                return Err(ApiError::Conflict {
                    resource: self.resource(id).qualified_plural(),
                    name: key.name.clone(),
                    detail: format!(
                        "Precondition failed: {field} in precondition: {want}, {field} in object meta: {have}"
                    ),
                });
            }
        }
        let grace = self.grace_period(id, &old, grace);
        if grace == 0 && finalizers(&old).is_empty() {
            return Ok(self.remove(id, key, (*old).clone(), old));
        }
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        let current = old
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_u64);
        if deleting && current.is_none_or(|current| current <= grace) {
            return Ok(old);
        }
        let mut marked = (*old).clone();
        let meta = metadata_mut(&mut marked)?;
        meta.insert("deletionTimestamp".to_owned(), Value::from(now_plus(grace)));
        meta.insert("deletionGracePeriodSeconds".to_owned(), Value::from(grace));
        let rv = self.bump();
        set_rv(&mut marked, rv);
        let object = Arc::new(marked);
        self.record(
            id,
            Change {
                rv,
                kind: ChangeType::Modified,
                key: key.clone(),
                object: Arc::clone(&object),
                previous: Some(old),
            },
        );
        Ok(object)
    }

    /// The grace period of a deletion: 0 but for a Pod bound to a node and not finished.
    fn grace_period(&self, id: ResId, object: &Value, asked: Option<u64>) -> u64 {
        let rt = self.resource(id);
        let running_pod = rt.group.is_empty()
            && rt.plural == "pods"
            && object
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            && !matches!(
                object.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
        if !running_pod {
            return 0;
        }
        asked
            .or_else(|| {
                object
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_u64)
            })
            .unwrap_or(DEFAULT_POD_GRACE_SECONDS)
    }

    /// Removes an object; `last` is its final state, stamped with the delete's resourceVersion.
    fn remove(
        &mut self,
        id: ResId,
        key: &ObjectKey,
        mut last: Value,
        previous: Arc<Value>,
    ) -> Arc<Value> {
        let rv = self.bump();
        set_rv(&mut last, rv);
        let object = Arc::new(last);
        self.record(
            id,
            Change {
                rv,
                kind: ChangeType::Deleted,
                key: key.clone(),
                object: Arc::clone(&object),
                previous: Some(previous),
            },
        );
        object
    }

    /// DELETE on a collection: deletes every object the filter selects.
    pub(crate) fn delete_collection(
        &mut self,
        id: ResId,
        filter: &ObjectFilter,
    ) -> Result<Vec<Arc<Value>>, ApiError> {
        let keys: Vec<ObjectKey> = self
            .collection(id)
            .objects
            .iter()
            .filter(|(_, object)| filter.matches(object))
            .map(|(key, _)| key.clone())
            .collect();
        keys.iter()
            .map(|key| self.delete(id, key, None, None))
            .collect()
    }

    /// A page of a list. Every page of one paginated list comes from the snapshot of its first page.
    pub(crate) fn list(
        &self,
        id: ResId,
        filter: &ObjectFilter,
        options: &ListOptions<'_>,
    ) -> Result<ListPage, ApiError> {
        let (rv, after) = match options.continue_token {
            Some(token) => {
                let token = ContinueToken::decode(token)?;
                (token.rv, Some(token.after))
            }
            None => (self.list_version(options)?, None),
        };
        let objects = self
            .objects_at(id, rv)
            .map_err(|err| match options.continue_token {
                Some(_) => ApiError::ContinueExpired,
                None => err,
            })?;
        let (items, next) = page(
            &objects,
            |object| filter.matches(object),
            after.as_ref(),
            options.limit,
        );
        let continue_token = next.map(|after| ContinueToken { rv, after }.encode());
        Ok(ListPage {
            items,
            rv,
            continue_token,
        })
    }

    /// The snapshot a list without `continue` reads: the exact version for
    /// `resourceVersionMatch=Exact`, otherwise the newest (which is never older than any asked for).
    fn list_version(&self, options: &ListOptions<'_>) -> Result<u64, ApiError> {
        let rv = match options.resource_version {
            None | Some("") => return Ok(self.rv),
            Some(rv) => rv
                .parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {rv:?}")))?,
        };
        Ok(
            if options.resource_version_match == Some("Exact") && rv != 0 {
                rv.min(self.rv)
            } else {
                self.rv
            },
        )
    }

    /// The objects of a resource as they were at `rv`, rebuilt from the history.
    fn objects_at(
        &self,
        id: ResId,
        rv: u64,
    ) -> Result<Cow<'_, BTreeMap<ObjectKey, Arc<Value>>>, ApiError> {
        let collection = self.collection(id);
        if rv >= self.rv {
            return Ok(Cow::Borrowed(&collection.objects));
        }
        if rv < collection.since {
            return Err(ApiError::Expired {
                requested: rv,
                oldest: collection.since,
            });
        }
        Ok(Cow::Owned(rewind(
            &collection.objects,
            &collection.history,
            rv,
        )))
    }

    /// Opens a watch: computes the frames it starts with and subscribes it to live changes, under
    /// the caller's lock, so nothing is lost or reordered between replay and live.
    pub(crate) fn watch(
        &mut self,
        id: ResId,
        filter: &ObjectFilter,
        start: WatchStart,
        bookmarks: bool,
    ) -> WatchOpen {
        let rt = self.resource(id).clone();
        let collection = self.collection(id);
        let current = || {
            collection
                .objects
                .values()
                .filter(|o| filter.matches(o))
                .cloned()
                .map(Frame::added)
        };
        let initial = match start {
            WatchStart::CurrentState => current().collect(),
            WatchStart::InitialEvents => {
                let mut frames: Vec<Frame> = current().collect();
                frames.push(Frame::bookmark(&rt, self.rv, true));
                frames
            }
            WatchStart::Now => Vec::new(),
            WatchStart::After(from) => match replay(&collection.history, collection.since, from) {
                Ok(changes) => changes
                    .iter()
                    .filter_map(|c| translate(filter, c))
                    .collect(),
                Err(err) => {
                    return WatchOpen {
                        initial: vec![Frame::error(&err)],
                        live: None,
                    };
                }
            },
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber {
            resource: id,
            bookmarks,
            tx,
        });
        WatchOpen {
            initial,
            live: Some(rx),
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allowed bookmarks.
    pub(crate) fn bookmark_all(&mut self) {
        let rv = self.rv;
        self.subscribers.retain(|s| {
            !s.tx.is_closed() && (!s.bookmarks || s.tx.send(WatchMsg::Bookmark(rv)).is_ok())
        });
    }

    /// Ends every open watch stream.
    pub(crate) fn close_watches(&mut self) {
        self.subscribers.clear();
    }

    /// Watches still open (their client has not gone away).
    pub(crate) fn open_watches(&self) -> usize {
        self.subscribers
            .iter()
            .filter(|s| !s.tx.is_closed())
            .count()
    }

    /// One write elsewhere in the cluster (a Lease renewal, an Event: the resourceVersion moves
    /// with them), then [`Store::compact`]: every resourceVersion a client has seen, bookmarks
    /// included, is now too old to watch from.
    pub(crate) fn expire_history(&mut self) {
        self.bump();
        self.compact();
    }

    /// Forgets every history up to now: watches and continues from older versions get 410.
    pub(crate) fn compact(&mut self) {
        let rv = self.rv;
        for collection in &mut self.collections {
            collection.history.clear();
            collection.since = rv;
        }
    }

    // ---- Authentication and authorization ----

    pub(crate) fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A token for ServiceAccount `namespace/name`, which must exist (404 otherwise).
    pub(crate) fn service_account_token(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<String, ApiError> {
        let id = self.ensure(&ResourceType::namespaced(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
        ));
        let key = self.key(id, Some(namespace), name);
        let account = self.get(id, &key)?;
        let uid = account
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(self.tokens.mint_service_account(namespace, name, &uid))
    }

    /// The user behind an `Authorization` header, or 401. A service-account token is valid while
    /// its ServiceAccount exists with the uid the token names, as with the real server's lookup.
    pub(crate) fn authenticate(&self, authorization: &str) -> Result<User, ApiError> {
        match self.tokens.bearer(authorization)? {
            Bearer::Admin => Ok(User::admin()),
            Bearer::ServiceAccount {
                namespace,
                name,
                uid,
                ..
            } => {
                let id = self
                    .registry
                    .find("", "v1", "serviceaccounts")
                    .ok_or(ApiError::Unauthorized)?;
                let key = ObjectKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                let account = self
                    .collection(id)
                    .objects
                    .get(&key)
                    .ok_or(ApiError::Unauthorized)?;
                let current = account.pointer("/metadata/uid").and_then(Value::as_str);
                let deleting = account.pointer("/metadata/deletionTimestamp").is_some();
                if current == Some(uid.as_str()) && !deleting {
                    Ok(User::service_account(namespace, name))
                } else {
                    Err(ApiError::Unauthorized)
                }
            }
        }
    }

    /// The RBAC policy in force: the default discovery roles, and every ClusterRole and
    /// ClusterRoleBinding stored.
    pub(crate) fn policy(&self) -> Policy {
        let mut policy = Policy::bootstrap();
        let group = "rbac.authorization.k8s.io";
        let objects = |plural: &str| {
            self.registry
                .find(group, "v1", plural)
                .map(|id| self.all(id))
                .unwrap_or_default()
        };
        for role in objects("clusterroles") {
            match serde_json::from_value((*role).clone()) {
                Ok(role) => policy.roles.push(role),
                Err(err) => tracing::warn!(%err, "a stored ClusterRole does not parse; ignored"),
            }
        }
        for binding in objects("clusterrolebindings") {
            match serde_json::from_value((*binding).clone()) {
                Ok(binding) => policy.bindings.push(binding),
                Err(err) => {
                    tracing::warn!(%err, "a stored ClusterRoleBinding does not parse; ignored");
                }
            }
        }
        policy
    }

    pub(crate) fn log_request(&mut self, record: RequestRecord) {
        if self.requests.len() >= MAX_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(record);
    }

    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        self.requests.iter().cloned().collect()
    }

    pub(crate) fn clear_requests(&mut self) {
        self.requests.clear();
    }
}

/// Undoes, newest first, every change after `rv`.
fn rewind(
    objects: &BTreeMap<ObjectKey, Arc<Value>>,
    history: &VecDeque<Arc<Change>>,
    rv: u64,
) -> BTreeMap<ObjectKey, Arc<Value>> {
    let mut objects = objects.clone();
    for change in history.iter().rev().take_while(|c| c.rv > rv) {
        match &change.previous {
            Some(previous) => objects.insert(change.key.clone(), Arc::clone(previous)),
            None => objects.remove(&change.key),
        };
    }
    objects
}

/// Checks that a body is a JSON object of the resource's kind and fills in `apiVersion`/`kind`.
fn typed_object(rt: &ResourceType, body: Value) -> Result<Value, ApiError> {
    let Value::Object(mut map) = body else {
        return Err(ApiError::BadRequest(format!(
            "the body of a {} must be a JSON object",
            rt.kind
        )));
    };
    let api_version = rt.api_version();
    for (field, want) in [
        ("apiVersion", api_version.as_str()),
        ("kind", rt.kind.as_str()),
    ] {
        match map.get(field).and_then(Value::as_str) {
            Some(have) if !have.is_empty() && have != want => {
                return Err(ApiError::BadRequest(format!(
                    "the {field} in the data ({have}) does not match the expected {field} ({want})"
                )));
            }
            _ => {
                map.insert(field.to_owned(), Value::from(want));
            }
        }
    }
    Ok(Value::Object(map))
}

/// `metadata` of an object, created if missing.
fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("an object must be a JSON object".to_owned()))?;
    map.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("metadata must be a JSON object".to_owned()))
}

fn meta_str<'a>(meta: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    meta.get(field).and_then(Value::as_str)
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Ok(meta) = metadata_mut(object) {
        meta.insert("resourceVersion".to_owned(), Value::from(rv.to_string()));
    }
}

fn finalizers(object: &Value) -> Vec<Value> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `object` with `field` set to `value`, or removed if `value` is `None`.
fn with_field(mut object: Value, field: &str, value: Option<&Value>) -> Value {
    if let Some(map) = object.as_object_mut() {
        match value {
            Some(value) => map.insert(field.to_owned(), value.clone()),
            None => map.remove(field),
        };
    }
    object
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

fn uid_string(n: u64) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

/// A `generateName` suffix: five base-36 characters, unique per uid.
fn name_suffix(n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = n;
    let mut suffix = [b'0'; 5];
    for slot in suffix.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&suffix).into_owned()
}

/// The current time in RFC 3339, whole seconds, as Kubernetes writes timestamps.
fn now() -> String {
    now_plus(0)
}

/// [`now`] plus `seconds`.
fn now_plus(seconds: u64) -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        + seconds;
    i64::try_from(seconds)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "1970-01-01T00:00:00Z".to_owned(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::apiserver::selector::LabelSelector;
    use crate::apiserver::watch::EventType;

    fn services(store: &Store) -> ResId {
        store.registry().find("", "v1", "services").unwrap()
    }

    fn svc(name: &str, app: &str) -> Value {
        json!({ "metadata": { "name": name, "labels": { "app": app } }, "spec": { "ports": [{ "port": 80 }] } })
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn rv_of(object: &Value) -> u64 {
        object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn drain(open: &mut WatchOpen, filter: &ObjectFilter) -> Vec<(EventType, String)> {
        let mut frames = std::mem::take(&mut open.initial);
        if let Some(rx) = open.live.as_mut() {
            while let Ok(msg) = rx.try_recv() {
                if let WatchMsg::Change(change) = msg {
                    frames.extend(translate(filter, &change));
                }
            }
        }
        frames
            .into_iter()
            .map(|f| {
                (
                    f.event,
                    f.object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn create_stamps_metadata_and_bumps_the_version() {
        let mut store = Store::new();
        let id = services(&store);
        let created = store.create(id, None, svc("web", "web")).unwrap();
        assert_eq!(store.resource_version(), START_RESOURCE_VERSION + 1);
        assert_eq!(rv_of(&created), START_RESOURCE_VERSION + 1);
        assert_eq!(created["apiVersion"], "v1");
        assert_eq!(created["kind"], "Service");
        assert_eq!(created["metadata"]["namespace"], "default");
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(created["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(
            created["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );

        let again = store.create(id, None, svc("web", "web")).unwrap_err();
        assert_eq!(again.code(), 409);
        assert_eq!(again.reason(), "AlreadyExists");
        let other = store.create(id, None, svc("web2", "web")).unwrap();
        assert_ne!(other["metadata"]["uid"], created["metadata"]["uid"]);
    }

    #[test]
    fn create_checks_names_namespaces_and_kinds() {
        let mut store = Store::new();
        let id = services(&store);
        assert_eq!(
            store
                .create(id, None, json!({ "metadata": {} }))
                .unwrap_err()
                .code(),
            422
        );
        let generated = store
            .create(id, None, json!({ "metadata": { "generateName": "web-" } }))
            .unwrap();
        assert!(
            generated["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("web-")
        );
        let mismatched = json!({ "metadata": { "name": "x", "namespace": "a" } });
        assert_eq!(
            store.create(id, Some("b"), mismatched).unwrap_err().code(),
            400
        );
        let wrong_kind = json!({ "kind": "Pod", "metadata": { "name": "x" } });
        assert_eq!(store.create(id, None, wrong_kind).unwrap_err().code(), 400);
        assert_eq!(store.create(id, None, json!([1])).unwrap_err().code(), 400);

        let nodes = store.registry().find("", "v1", "nodes").unwrap();
        let node = store
            .create(
                nodes,
                None,
                json!({ "metadata": { "name": "n1", "namespace": "x" } }),
            )
            .unwrap();
        assert!(
            node["metadata"].get("namespace").is_none(),
            "cluster-scoped objects have no namespace"
        );
    }

    #[test]
    fn update_enforces_optimistic_concurrency() {
        let mut store = Store::new();
        let id = services(&store);
        let created = store.create(id, None, svc("web", "web")).unwrap();
        let mut edit = (*created).clone();
        edit["spec"]["ports"][0]["port"] = json!(8080);
        let updated = store
            .update(id, &key("web"), edit.clone(), Scope::Main, true)
            .unwrap();
        assert_eq!(rv_of(&updated), rv_of(&created) + 1);
        assert_eq!(
            updated["metadata"]["generation"], 2,
            "a spec change bumps the generation"
        );
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);

        edit["spec"]["ports"][0]["port"] = json!(9090);
        let stale = store
            .update(id, &key("web"), edit.clone(), Scope::Main, true)
            .unwrap_err();
        assert_eq!(stale.code(), 409);
        assert_eq!(stale.reason(), "Conflict");
        edit["metadata"]["resourceVersion"] = json!("");
        assert!(
            store
                .update(id, &key("web"), edit, Scope::Main, true)
                .is_ok(),
            "an empty version is unconditional"
        );
        assert_eq!(
            store
                .update(id, &key("nope"), svc("nope", "x"), Scope::Main, true)
                .unwrap_err()
                .code(),
            404
        );
        let renamed = svc("other", "web");
        assert_eq!(
            store
                .update(id, &key("web"), renamed, Scope::Main, true)
                .unwrap_err()
                .code(),
            400
        );
    }

    #[test]
    fn no_op_updates_do_not_write() {
        let mut store = Store::new();
        let id = services(&store);
        let created = store.create(id, None, svc("web", "web")).unwrap();
        let before = store.resource_version();
        let same = store
            .update(id, &key("web"), (*created).clone(), Scope::Main, true)
            .unwrap();
        assert_eq!(same, created);
        assert_eq!(store.resource_version(), before);
    }

    #[test]
    fn status_and_main_scopes() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("web", "web")).unwrap();
        let mut with_status = svc("web", "web");
        with_status["status"] = json!({ "loadBalancer": { "ingress": [{ "ip": "1.2.3.4" }] } });
        let main = store
            .update(id, &key("web"), with_status.clone(), Scope::Main, false)
            .unwrap();
        assert!(
            main.get("status").is_none(),
            "the main resource ignores status"
        );
        with_status["spec"] = json!({ "ports": [] });
        let status = store
            .update(id, &key("web"), with_status, Scope::Status, false)
            .unwrap();
        assert_eq!(
            status["status"]["loadBalancer"]["ingress"][0]["ip"],
            "1.2.3.4"
        );
        assert_eq!(
            status["spec"]["ports"][0]["port"], 80,
            "the status subresource ignores spec"
        );
        assert_eq!(status["metadata"]["generation"], 1);
    }

    #[test]
    fn patches_and_their_preconditions() {
        let mut store = Store::new();
        let id = services(&store);
        let created = store.create(id, None, svc("web", "web")).unwrap();
        let (patched, created_now) = store
            .patch(
                id,
                &key("web"),
                PatchKind::Merge,
                &json!({ "metadata": { "labels": { "tier": "front" } } }),
                Scope::Main,
            )
            .unwrap();
        assert!(!created_now);
        assert_eq!(
            patched["metadata"]["labels"],
            json!({ "app": "web", "tier": "front" })
        );
        let stale =
            json!({ "metadata": { "resourceVersion": created["metadata"]["resourceVersion"] } });
        assert_eq!(
            store
                .patch(id, &key("web"), PatchKind::Merge, &stale, Scope::Main)
                .unwrap_err()
                .code(),
            409
        );
        let json_patch = json!([{ "op": "remove", "path": "/metadata/labels/tier" }]);
        let (patched, _) = store
            .patch(id, &key("web"), PatchKind::Json, &json_patch, Scope::Main)
            .unwrap();
        assert_eq!(patched["metadata"]["labels"], json!({ "app": "web" }));
        let bad = json!([{ "op": "remove", "path": "/nope" }]);
        assert_eq!(
            store
                .patch(id, &key("web"), PatchKind::Json, &bad, Scope::Main)
                .unwrap_err()
                .code(),
            400
        );
        assert_eq!(
            store
                .patch(id, &key("x"), PatchKind::Merge, &json!({}), Scope::Main)
                .unwrap_err()
                .code(),
            404
        );
        let (applied, created_now) = store
            .patch(
                id,
                &key("x"),
                PatchKind::Apply,
                &json!({ "spec": { "type": "ClusterIP" } }),
                Scope::Main,
            )
            .unwrap();
        assert!(created_now);
        assert_eq!(applied["metadata"]["name"], "x");
    }

    #[test]
    fn finalizers_delay_deletion() {
        let mut store = Store::new();
        let id = services(&store);
        let mut body = svc("web", "web");
        body["metadata"]["finalizers"] = json!(["ferrox.io/cleanup"]);
        store.create(id, None, body).unwrap();
        let marked = store.delete(id, &key("web"), None, None).unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(
            store.get(id, &key("web")).is_ok(),
            "still there while a finalizer remains"
        );
        let (gone, _) = store
            .patch(
                id,
                &key("web"),
                PatchKind::Merge,
                &json!({ "metadata": { "finalizers": null } }),
                Scope::Main,
            )
            .unwrap();
        assert_eq!(rv_of(&gone), store.resource_version());
        assert_eq!(store.get(id, &key("web")).unwrap_err().code(), 404);
    }

    #[test]
    fn a_running_pod_is_deleted_gracefully() {
        let mut store = Store::new();
        let pods = store.registry().find("", "v1", "pods").unwrap();
        let pod = |name: &str, node: Option<&str>, phase: &str| {
            json!({ "metadata": { "name": name, "namespace": "default" },
                    "spec": { "nodeName": node, "terminationGracePeriodSeconds": 20 },
                    "status": { "phase": phase } })
        };
        store
            .create(pods, None, pod("web", Some("node-1"), "Running"))
            .unwrap();
        let marked = store.delete(pods, &key("web"), None, None).unwrap();
        assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 20);
        let when = marked["metadata"]["deletionTimestamp"].as_str().unwrap();
        assert!(when > now().as_str(), "{when} is in the future");
        assert!(
            store.get(pods, &key("web")).is_ok(),
            "terminating, not gone"
        );
        // A longer grace period changes nothing; a shorter one shortens; 0 removes.
        let rv = store.resource_version();
        store.delete(pods, &key("web"), None, Some(25)).unwrap();
        assert_eq!(store.resource_version(), rv);
        let shorter = store.delete(pods, &key("web"), None, Some(5)).unwrap();
        assert_eq!(shorter["metadata"]["deletionGracePeriodSeconds"], 5);
        store.delete(pods, &key("web"), None, Some(0)).unwrap();
        assert_eq!(store.get(pods, &key("web")).unwrap_err().code(), 404);
        // Unscheduled or finished pods, and other kinds, go at once.
        for (name, node, phase) in [
            ("pending", None, "Pending"),
            ("done", Some("n"), "Succeeded"),
        ] {
            store.create(pods, None, pod(name, node, phase)).unwrap();
            store.delete(pods, &key(name), None, None).unwrap();
            assert!(store.get(pods, &key(name)).is_err(), "{name}");
        }
    }

    #[test]
    fn expiring_the_history_makes_every_seen_version_too_old() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("web", "web")).unwrap();
        let seen = store.resource_version();
        store.expire_history();
        let open = store.watch(id, &ObjectFilter::default(), WatchStart::After(seen), true);
        assert!(open.live.is_none());
        assert_eq!(open.initial[0].event, EventType::Error);
        assert_eq!(open.initial[0].object["code"], 410);
        let now = store.resource_version();
        assert!(
            store
                .watch(id, &ObjectFilter::default(), WatchStart::After(now), true)
                .live
                .is_some(),
            "the version after the expiry is servable"
        );
    }

    #[test]
    fn delete_preconditions() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("web", "web")).unwrap();
        let err = store
            .delete(id, &key("web"), Some(&json!({ "uid": "nope" })), None)
            .unwrap_err();
        assert_eq!(err.code(), 409);
        let deleted = store.delete(id, &key("web"), None, None).unwrap();
        assert_eq!(
            rv_of(&deleted),
            store.resource_version(),
            "the deleted object carries the delete's version"
        );
        assert_eq!(
            store
                .delete(id, &key("web"), None, None)
                .unwrap_err()
                .code(),
            404
        );
    }

    #[test]
    fn paginated_lists_read_one_snapshot() {
        let mut store = Store::new();
        let id = services(&store);
        for name in ["a", "b", "c", "d"] {
            store.create(id, None, svc(name, "web")).unwrap();
        }
        let filter = ObjectFilter::default();
        let first = store
            .list(
                id,
                &filter,
                &ListOptions {
                    limit: Some(2),
                    ..Default::default()
                },
            )
            .unwrap();
        let names = |page: &ListPage| {
            page.items
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&first), ["a", "b"]);
        // Writes between pages do not show in the rest of the list.
        store.create(id, None, svc("bb", "web")).unwrap();
        store.delete(id, &key("c"), None, None).unwrap();
        let token = first.continue_token.clone().unwrap();
        let second = store
            .list(
                id,
                &filter,
                &ListOptions {
                    limit: Some(2),
                    continue_token: Some(&token),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(names(&second), ["c", "d"]);
        assert_eq!(second.rv, first.rv);
        assert_eq!(second.continue_token, None);

        store.compact();
        let err = store
            .list(
                id,
                &filter,
                &ListOptions {
                    limit: Some(2),
                    continue_token: Some(&token),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.code(), 410);
    }

    #[test]
    fn rewind_undoes_adds_modifies_and_deletes() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("a", "v1")).unwrap();
        let at = store.resource_version();
        store.create(id, None, svc("b", "x")).unwrap();
        store
            .patch(
                id,
                &key("a"),
                PatchKind::Merge,
                &json!({ "metadata": { "labels": { "app": "v2" } } }),
                Scope::Main,
            )
            .unwrap();
        store.delete(id, &key("a"), None, None).unwrap();
        let exact = ListOptions {
            resource_version: Some("101"),
            resource_version_match: Some("Exact"),
            ..Default::default()
        };
        assert_eq!(at, 101);
        let page = store.list(id, &ObjectFilter::default(), &exact).unwrap();
        assert_eq!(page.rv, 101);
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0]["metadata"]["labels"]["app"], "v1");
    }

    #[test]
    fn watch_replays_then_streams_in_order() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("a", "web")).unwrap();
        let listed_at = store.resource_version();
        store.create(id, None, svc("b", "db")).unwrap();
        store.create(id, None, svc("c", "web")).unwrap();
        let filter = ObjectFilter {
            labels: LabelSelector::parse("app=web").unwrap(),
            ..Default::default()
        };
        let mut open = store.watch(id, &filter, WatchStart::After(listed_at), true);
        store
            .patch(
                id,
                &key("b"),
                PatchKind::Merge,
                &json!({ "metadata": { "labels": { "app": "web" } } }),
                Scope::Main,
            )
            .unwrap();
        store
            .patch(
                id,
                &key("a"),
                PatchKind::Merge,
                &json!({ "metadata": { "labels": { "app": "db" } } }),
                Scope::Main,
            )
            .unwrap();
        store.delete(id, &key("c"), None, None).unwrap();
        assert_eq!(
            drain(&mut open, &filter),
            vec![
                (EventType::Added, "c".to_owned()),
                (EventType::Added, "b".to_owned()),
                (EventType::Deleted, "a".to_owned()),
                (EventType::Deleted, "c".to_owned()),
            ]
        );
    }

    #[test]
    fn watch_start_modes() {
        let mut store = Store::new();
        let id = services(&store);
        store.create(id, None, svc("a", "web")).unwrap();
        let all = ObjectFilter::default();
        let mut current = store.watch(id, &all, WatchStart::CurrentState, false);
        assert_eq!(
            drain(&mut current, &all),
            vec![(EventType::Added, "a".to_owned())]
        );
        let initial = store.watch(id, &all, WatchStart::InitialEvents, true);
        assert_eq!(initial.initial.len(), 2);
        assert_eq!(initial.initial[1].event, EventType::Bookmark);
        assert_eq!(
            initial.initial[1].object["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        let mut now = store.watch(id, &all, WatchStart::Now, false);
        assert!(drain(&mut now, &all).is_empty());

        store.compact();
        let gone = store.watch(id, &all, WatchStart::After(START_RESOURCE_VERSION), true);
        assert!(gone.live.is_none());
        assert_eq!(gone.initial[0].event, EventType::Error);
        assert_eq!(gone.initial[0].object["code"], 410);
        let fresh = store.watch(id, &all, WatchStart::After(store.resource_version()), true);
        assert!(fresh.live.is_some() && fresh.initial.is_empty());
    }

    #[test]
    fn bookmarks_and_closing() {
        let mut store = Store::new();
        let id = services(&store);
        let all = ObjectFilter::default();
        let mut with = store.watch(id, &all, WatchStart::Now, true);
        let mut without = store.watch(id, &all, WatchStart::Now, false);
        store.bookmark_all();
        assert!(
            matches!(with.live.as_mut().unwrap().try_recv(), Ok(WatchMsg::Bookmark(rv)) if rv == START_RESOURCE_VERSION)
        );
        assert!(without.live.as_mut().unwrap().try_recv().is_err());
        assert_eq!(store.open_watches(), 2);
        store.close_watches();
        assert_eq!(store.open_watches(), 0);
        assert!(matches!(
            with.live.as_mut().unwrap().try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn name_suffixes_are_distinct() {
        assert_eq!(name_suffix(0), "00000");
        assert_eq!(name_suffix(35), "0000z");
        assert_ne!(name_suffix(36), name_suffix(1));
    }
}
