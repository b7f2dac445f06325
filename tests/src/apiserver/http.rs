//! The HTTP shell of the test API server: axum routing every request to the store, JSON and
//! `Status` responses, chunked watch streams, and the periodic bookmark task.
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
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::future::ready;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::RequestRecord;
use super::error::ApiError;
use super::registry::{ResourceType, version_info};
use super::request::{
    ListQuery, ResourcePath, Route, Shape, check_json_body, json_body, parse_path, patch_kind, verb,
};
use super::store::{ListOptions, Scope, Store, WatchMsg, WatchOpen};
use super::watch::{Frame, translate, watch_start};

/// Largest request body read.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// State shared by the server thread and the [`super::ApiServer`] handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Wakes the bookmark task when the interval changes.
    pub(crate) bookmark_changed: Notify,
    pub(crate) addr: SocketAddr,
}

impl Shared {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Shared {
            store: Mutex::new(Store::new()),
            bookmark_changed: Notify::new(),
            addr,
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
        .with_state(Arc::clone(&shared));
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

/// The one handler: reads the request, answers it, logs it.
async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
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
        ..RequestRecord::default()
    };
    let response = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => {
            let incoming = Incoming {
                content_type: header_str(header::CONTENT_TYPE),
                accept: header_str(header::ACCEPT),
                body,
            };
            answer(&shared, &incoming, &mut record).unwrap_or_else(|err| error_response(&err))
        }
        Err(err) => error_response(&ApiError::BadRequest(format!(
            "cannot read the request body: {err}"
        ))),
    };
    record.code = response.status().as_u16();
    tracing::debug!(method = %record.method, path = %record.path, query = %record.query, code = record.code, "API request");
    shared.lock().log_request(record);
    response
}

/// What of a request the answer needs besides its method, path and query (kept in the record).
struct Incoming {
    content_type: String,
    accept: String,
    body: Bytes,
}

fn answer(
    shared: &Shared,
    incoming: &Incoming,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let route = parse_path(&record.path).ok_or_else(|| ApiError::NoRoute {
        path: record.path.clone(),
    })?;
    let Route::Resource(path) = route else {
        record.verb = record.method.to_ascii_lowercase();
        if record.method != "GET" {
            return Err(ApiError::MethodNotAllowed);
        }
        let store = shared.lock();
        let registry = store.registry();
        let document = match route {
            Route::Version => Some(version_info()),
            Route::Health => return Ok((StatusCode::OK, "ok").into_response()),
            Route::CoreVersions => Some(registry.api_versions(&shared.addr.to_string())),
            Route::Groups => Some(registry.api_group_list()),
            Route::Group(group) => registry.api_group(&group),
            Route::ResourceList { group, version } => registry.api_resource_list(&group, &version),
            Route::Resource(_) => None,
        };
        return document
            .map(|doc| json_response(StatusCode::OK, &doc))
            .ok_or_else(|| ApiError::NoRoute {
                path: record.path.clone(),
            });
    };
    let query = ListQuery::parse(&record.query)?;
    record.verb = verb(&record.method, &path, query.watch).to_owned();
    record.group.clone_from(&path.group);
    record.version.clone_from(&path.version);
    record.resource.clone_from(&path.plural);
    record.subresource = path.subresource.clone().unwrap_or_default();
    record.namespace.clone_from(&path.namespace);
    record.name.clone_from(&path.name);
    serve_resource(shared, incoming, &record.method, &path, &query)
}

fn serve_resource(
    shared: &Shared,
    incoming: &Incoming,
    method: &str,
    path: &ResourcePath,
    query: &ListQuery,
) -> Result<Response, ApiError> {
    let no_route = || ApiError::NoRoute {
        path: format!("{}/{}", path.group, path.plural),
    };
    let mut store = shared.lock();
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
                drop(store);
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
            (
                StatusCode::OK,
                store.delete(id, &key, options.get("preconditions"))?,
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
/// through the watch's filter, until the store closes the watch or `timeoutSeconds` pass.
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
    let body = match timeout_seconds {
        Some(seconds) => {
            Body::from_stream(frames.take_until(tokio::time::sleep(Duration::from_secs(seconds))))
        }
        None => Body::from_stream(frames),
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
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
