//! The HTTPS shell of the test API server: axum over [`super::tls`], every request
//! authenticated ([`super::auth`], 401), authorized ([`super::rbac`], 403), then routed to the
//! store; JSON and `Status` responses, chunked watch streams with the real server's timeouts,
//! watches held back while a test has them broken, and the periodic bookmark task.
//!
//! Thin by design: paths and queries are read by [`super::request`], rules live in
//! [`super::store`], watch decisions in [`super::watch`]. A malformed request gets a 400 `Status`;
//! nothing here panics on client input.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::future::ready;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot, watch as signal};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::RequestRecord;
use super::auth::random_bytes;
use super::error::ApiError;
use super::rbac::Attributes;
use super::registry::{ResourceType, version_info};
use super::request::{
    ListQuery, ResourcePath, Route, Shape, check_json_body, json_body, parse_path, patch_kind,
};
use super::store::{ListOptions, Scope, Store, WatchMsg, WatchOpen};
use super::tls::{Peer, Pki, TlsListener};
use super::watch::{EventType, Frame, translate, watch_start};

/// Largest request body read.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The real API server's `--min-request-timeout`: a watch without `timeoutSeconds` ends after
/// a random time between this and twice this.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1800);

/// State shared by the server thread and the [`super::ApiServer`] handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Wakes the bookmark task when the interval changes.
    pub(crate) bookmark_changed: Notify,
    pub(crate) addr: SocketAddr,
    pub(crate) pki: Pki,
    /// True while new watches wait ([`super::ApiServer::break_watches`]). Set and read under the
    /// store's lock, so no watch opens between a break and its end.
    pub(crate) watches_held: signal::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Shared {
            store: Mutex::new(Store::new()),
            bookmark_changed: Notify::new(),
            addr,
            pki: Pki::new(addr.ip()),
            watches_held: signal::Sender::new(false),
        }
    }

    /// The store. A panic elsewhere while holding the lock leaves consistent data (every write is
    /// completed before it is recorded), so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves `listener` until `shutdown` fires (or its sender is dropped).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: oneshot::Receiver<()>,
) {
    let app = Router::new()
        .fallback(handle)
        .with_state(Arc::clone(&shared))
        .into_make_service_with_connect_info::<Peer>();
    let listener = match TlsListener::new(listener, &shared.pki) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(addr = %shared.addr, %err, "API test server cannot listen");
            return;
        }
    };
    let bookmarks = tokio::spawn(bookmark_ticker(Arc::clone(&shared)));
    tokio::select! {
        result = std::future::IntoFuture::into_future(axum::serve(listener, app)) => {
            if let Err(err) = result {
                tracing::error!(addr = %shared.addr, %err, "API test server stopped serving");
            }
        }
        _ = shutdown => {}
    }
    bookmarks.abort();
}

/// Sends bookmarks to every watch that allows them, every `bookmark_interval` (none while `None`).
async fn bookmark_ticker(shared: Arc<Shared>) {
    loop {
        let interval = shared.lock().bookmark_interval;
        match interval {
            Some(every) => {
                tokio::select! {
                    () = tokio::time::sleep(every) => shared.lock().bookmark_all(),
                    () = shared.bookmark_changed.notified() => {}
                }
            }
            None => shared.bookmark_changed.notified().await,
        }
    }
}

/// The one handler: reads the request, answers it (a held watch waits, then is answered), logs
/// it.
async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let header_str = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut record = RequestRecord {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        source: Some(peer.0),
        ..RequestRecord::default()
    };
    let response = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => {
            let incoming = Incoming {
                authorization: header_str(header::AUTHORIZATION),
                content_type: header_str(header::CONTENT_TYPE),
                accept: header_str(header::ACCEPT),
                body,
            };
            loop {
                match answer(&shared, &incoming, &mut record) {
                    Ok(Reply::Now(response)) => break response,
                    Ok(Reply::Held(mut held)) => {
                        // Only fails when the server is going away; then answer at once.
                        let _ = held.wait_for(|held| !*held).await;
                    }
                    Err(err) => break error_response(&err),
                }
            }
        }
        Err(err) => error_response(&ApiError::BadRequest(format!(
            "cannot read the request body: {err}"
        ))),
    };
    record.code = response.status().as_u16();
    tracing::debug!(method = %record.method, path = %record.path, query = %record.query, user = %record.user, code = record.code, "API request");
    shared.lock().log_request(record);
    response
}

/// What of a request the answer needs besides its method, path and query (kept in the record).
struct Incoming {
    authorization: String,
    content_type: String,
    accept: String,
    body: Bytes,
}

/// An answer, or a watch to open once the test lets watches in again.
enum Reply {
    Now(Response),
    Held(signal::Receiver<bool>),
}

/// Authenticates, authorizes and answers a request, under one hold of the store's lock.
fn answer(
    shared: &Shared,
    incoming: &Incoming,
    record: &mut RequestRecord,
) -> Result<Reply, ApiError> {
    let mut store = shared.lock();
    let user = store.authenticate(&incoming.authorization)?;
    record.user.clone_from(&user.name);
    let attributes = Attributes::of_request(&record.method, &record.path, &record.query);
    record.verb.clone_from(&attributes.verb);
    if let Some(Route::Resource(path)) = parse_path(&record.path) {
        record.group.clone_from(&path.group);
        record.version.clone_from(&path.version);
        record.resource.clone_from(&path.plural);
        record.subresource = path.subresource.clone().unwrap_or_default();
        record.namespace.clone_from(&path.namespace);
        record.name.clone_from(&path.name);
    }
    store.policy().authorize(&user, &attributes)?;
    let route = parse_path(&record.path).ok_or_else(|| ApiError::NoRoute {
        path: record.path.clone(),
    })?;
    let Route::Resource(path) = route else {
        if record.method != "GET" {
            return Err(ApiError::MethodNotAllowed);
        }
        let registry = store.registry();
        let document = match route {
            Route::Version => Some(version_info()),
            Route::Health => return Ok(Reply::Now((StatusCode::OK, "ok").into_response())),
            Route::CoreVersions => Some(registry.api_versions(&shared.addr.to_string())),
            Route::Groups => Some(registry.api_group_list()),
            Route::Group(group) => registry.api_group(&group),
            Route::ResourceList { group, version } => registry.api_resource_list(&group, &version),
            Route::Resource(_) => None,
        };
        return document
            .map(|doc| Reply::Now(json_response(StatusCode::OK, &doc)))
            .ok_or_else(|| ApiError::NoRoute {
                path: record.path.clone(),
            });
    };
    let query = ListQuery::parse(&record.query)?;
    if record.method == "GET" && query.watch && path.name.is_none() && *shared.watches_held.borrow()
    {
        return Ok(Reply::Held(shared.watches_held.subscribe()));
    }
    serve_resource(&mut store, incoming, record, &path, &query).map(Reply::Now)
}

fn serve_resource(
    store: &mut Store,
    incoming: &Incoming,
    record: &mut RequestRecord,
    path: &ResourcePath,
    query: &ListQuery,
) -> Result<Response, ApiError> {
    let no_route = || ApiError::NoRoute {
        path: format!("{}/{}", path.group, path.plural),
    };
    let method = record.method.as_str();
    let id = store
        .registry()
        .find(&path.group, &path.version, &path.plural)
        .ok_or_else(no_route)?;
    let rt = store.resource(id).clone();
    if !rt.namespaced && path.namespace.is_some() {
        return Err(no_route());
    }
    let scope = match path.subresource.as_deref() {
        None => Scope::Main,
        Some("status") => Scope::Status,
        Some(_) => return Err(no_route()),
    };
    let shape = Shape::from_accept(&incoming.accept);
    let namespace = path.namespace.as_deref();
    let Some(name) = path.name.as_deref() else {
        if scope != Scope::Main {
            return Err(no_route());
        }
        let filter = query.filter(namespace);
        return match method {
            "GET" if query.watch => {
                let start =
                    watch_start(query.resource_version.as_deref(), query.send_initial_events)?;
                let open = store.watch(id, &filter, start, query.allow_bookmarks);
                record.watch_error = open
                    .initial
                    .first()
                    .filter(|f| f.event == EventType::Error)
                    .and_then(|f| f.object.get("code"))
                    .and_then(Value::as_u64)
                    .and_then(|code| u16::try_from(code).ok());
                Ok(watch_response(
                    open,
                    rt,
                    filter,
                    shape,
                    query.timeout_seconds,
                ))
            }
            "GET" => {
                let options = ListOptions {
                    limit: query.limit,
                    continue_token: query.continue_token.as_deref(),
                    resource_version: query.resource_version.as_deref(),
                    resource_version_match: query.resource_version_match.as_deref(),
                };
                let page = store.list(id, &filter, &options)?;
                let items: Vec<Value> = page.items.iter().map(|o| shape.object(o)).collect();
                Ok(json_response(
                    StatusCode::OK,
                    &list(&rt, shape, page.rv, page.continue_token, items),
                ))
            }
            "POST" if rt.namespaced && namespace.is_none() => Err(ApiError::MethodNotAllowed),
            "POST" => {
                check_json_body(&incoming.content_type)?;
                let created = store.create(id, namespace, json_body(&incoming.body)?)?;
                Ok(json_response(StatusCode::CREATED, &shape.object(&created)))
            }
            "DELETE" => {
                let deleted = store.delete_collection(id, &filter)?;
                let items: Vec<Value> = deleted.iter().map(|o| shape.object(o)).collect();
                let rv = store.resource_version();
                Ok(json_response(
                    StatusCode::OK,
                    &list(&rt, shape, rv, None, items),
                ))
            }
            _ => Err(ApiError::MethodNotAllowed),
        };
    };
    if rt.namespaced && namespace.is_none() {
        return Err(no_route());
    }
    let key = store.key(id, namespace, name);
    let (code, object) = match method {
        "GET" => (StatusCode::OK, store.get(id, &key)?),
        "PUT" => {
            check_json_body(&incoming.content_type)?;
            (
                StatusCode::OK,
                store.update(id, &key, json_body(&incoming.body)?, scope, true)?,
            )
        }
        "PATCH" => {
            let kind = patch_kind(&incoming.content_type)?;
            let (object, created) =
                store.patch(id, &key, kind, &json_body(&incoming.body)?, scope)?;
            (
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                object,
            )
        }
        "DELETE" if scope == Scope::Main => {
            let options = if incoming.body.is_empty() {
                Value::Null
            } else {
                json_body(&incoming.body)?
            };
            let grace = options.get("gracePeriodSeconds").and_then(Value::as_u64);
            (
                StatusCode::OK,
                store.delete(id, &key, options.get("preconditions"), grace)?,
            )
        }
        _ => return Err(ApiError::MethodNotAllowed),
    };
    Ok(json_response(code, &shape.object(&object)))
}

/// A list document: `kind`/`apiVersion` of the list, its resourceVersion and continue token.
fn list(
    rt: &ResourceType,
    shape: Shape,
    rv: u64,
    continue_token: Option<String>,
    items: Vec<Value>,
) -> Value {
    let (kind, api_version) = shape.list_types(rt.list_kind(), rt.api_version());
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let (Some(token), Some(map)) = (continue_token, metadata.as_object_mut()) {
        map.insert("continue".to_owned(), Value::from(token));
    }
    json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items })
}

/// A chunked stream of newline-delimited watch events: the initial frames, then live changes
/// through the watch's filter, until the store closes the watch or the timeout passes:
/// `timeoutSeconds`, or without it a random time between [`MIN_REQUEST_TIMEOUT`] and twice it,
/// as the real server picks.
fn watch_response(
    open: WatchOpen,
    rt: ResourceType,
    filter: super::selector::ObjectFilter,
    shape: Shape,
    timeout_seconds: Option<u64>,
) -> Response {
    let live = match open.live {
        Some(rx) => UnboundedReceiverStream::new(rx)
            .filter_map(move |msg| {
                ready(match msg {
                    WatchMsg::Change(change) => translate(&filter, &change),
                    WatchMsg::Bookmark(rv) => Some(Frame::bookmark(&rt, rv, false)),
                })
            })
            .boxed(),
        None => futures::stream::empty().boxed(),
    };
    let frames = futures::stream::iter(open.initial)
        .chain(live)
        .map(move |frame| Ok::<Bytes, Infallible>(Bytes::from(frame.line(shape))));
    let timeout = timeout_seconds.map_or_else(default_watch_timeout, Duration::from_secs);
    let body = Body::from_stream(frames.take_until(tokio::time::sleep(timeout)));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `minRequestTimeout * (1 + rand)`.
fn default_watch_timeout() -> Duration {
    let random = random_bytes(8)
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    MIN_REQUEST_TIMEOUT + Duration::from_secs(random % MIN_REQUEST_TIMEOUT.as_secs())
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(err: &ApiError) -> Response {
    let code = StatusCode::from_u16(err.code()).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(code, &err.status())
}
