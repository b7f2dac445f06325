//! The API test server against the real `kube` client: HTTPS verified against the cluster CA,
//! bearer tokens (401 without), RBAC from the manifest's ClusterRole (403 outside it),
//! list/get with selectors and pagination, the runtime watcher (list-watch and streaming lists),
//! 410 recovery through a reflector, broken and expired watches, bookmarks, optimistic
//! concurrency, patches, deletes (Pods gracefully) and the request log.
//!
//! Nothing here sleeps and hopes: every wait polls a stream or a condition against a deadline.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failure should stop the test with its context"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, NodeSpec, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event, watcher as watch};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use ferrox_tests::apiserver::{ApiServer, RequestRecord};

/// How long any single wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- fixtures

/// A Service builder: `svc("web").ns("prod").label("app", "web")`.
struct SvcBuilder(Service);

fn svc(name: &str) -> SvcBuilder {
    SvcBuilder(Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

impl SvcBuilder {
    fn ns(mut self, namespace: &str) -> Self {
        self.0.metadata.namespace = Some(namespace.to_owned());
        self
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    fn port(mut self, port: i32) -> Self {
        self.0.spec.get_or_insert_with(ServiceSpec::default).ports = Some(vec![ServicePort {
            port,
            ..ServicePort::default()
        }]);
        self
    }

    fn build(self) -> Service {
        self.0
    }
}

fn node(name: &str, unschedulable: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            unschedulable: Some(unschedulable),
            ..NodeSpec::default()
        }),
        ..Node::default()
    }
}

fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                service.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(
            ips.iter()
                .map(|ip| Endpoint {
                    addresses: vec![(*ip).to_owned()],
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ..EndpointSlice::default()
    }
}

/// A kube client as `kubectl` would make from the server's kubeconfig with `token`.
async fn client_as(server: &ApiServer, token: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig(token)).expect("a valid kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a kube config from the kubeconfig");
    Client::try_from(config).expect("a kube client for the test server")
}

/// [`client_as`] the admin.
async fn client(server: &ApiServer) -> Client {
    client_as(server, &server.admin_token()).await
}

fn names<K: ResourceExt>(objects: impl IntoIterator<Item = K>) -> Vec<String> {
    objects.into_iter().map(|o| o.name_any()).collect()
}

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

/// The next item of a stream, failing the test after [`DEADLINE`] or at the end of the stream.
async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("the stream ended while waiting for {what}"))
}

/// Polls `stream` until `done()` holds, failing after [`DEADLINE`]; returns the errors it yielded.
/// Polls in short slices so that conditions outside the stream (e.g. the server's count of open
/// watches) are rechecked while the stream has nothing to say.
async fn drive_until<S, T, E>(
    stream: &mut S,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Vec<String>
where
    S: Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let mut errors = Vec::new();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; errors so far: {errors:?}"
        );
        match tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => errors.push(err.to_string()),
            Ok(None) => panic!("the stream ended while waiting for {what}"),
        }
    }
    errors
}

/// The watcher's event for one object, as (kind, name) so sequences compare readably.
fn describe(event: &Event<Service>) -> (&'static str, String) {
    match event {
        Event::Init => ("init", String::new()),
        Event::InitApply(s) => ("init-apply", s.name_any()),
        Event::InitDone => ("init-done", String::new()),
        Event::Apply(s) => ("apply", s.name_any()),
        Event::Delete(s) => ("delete", s.name_any()),
    }
}

fn requests_for(server: &ApiServer, resource: &str) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.resource == resource)
        .collect()
}

/// A TLS connection to the server, verified against its CA.
async fn connect_tls(server: &ApiServer) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr())
        .await
        .expect("connect to the API server");
    let name = rustls::pki_types::ServerName::IpAddress(server.addr().ip().into());
    tokio_rustls::TlsConnector::from(server.tls_client_config())
        .connect(name, tcp)
        .await
        .expect("a TLS handshake the cluster CA verifies")
}

/// A watch read over a TLS connection by hand: HTTP/1.1 chunked, newline-delimited JSON events.
struct RawWatch {
    reader: BufReader<TlsStream<TcpStream>>,
    buffered: Vec<u8>,
}

impl RawWatch {
    async fn open(server: &ApiServer, path_and_query: &str) -> RawWatch {
        let mut stream = connect_tls(server).await;
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            server.addr(),
            server.admin_token()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).await.unwrap();
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "watch answered {status:?}"
        );
        let mut chunked = false;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await.unwrap();
            if header.trim().is_empty() {
                break;
            }
            chunked |= header
                .to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked");
        }
        assert!(chunked, "a watch is a chunked stream");
        RawWatch {
            reader,
            buffered: Vec::new(),
        }
    }

    /// The next event, or `None` at the end of the stream.
    async fn next_event(&mut self) -> Option<Value> {
        tokio::time::timeout(DEADLINE, self.read_event())
            .await
            .expect("timed out waiting for a watch event")
    }

    async fn read_event(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffered.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("each watch line is JSON"));
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).await.unwrap();
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.unwrap();
            chunk.truncate(size);
            self.buffered.extend_from_slice(&chunk);
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn list_and_get_with_selectors_and_pagination() {
    let server = ApiServer::start_local();
    for s in [
        svc("web").label("app", "web").label("tier", "front"),
        svc("web-canary").label("app", "web"),
        svc("db").label("app", "db"),
        svc("cache"),
        svc("web").ns("prod").label("app", "web"),
    ] {
        server.create(&s.build()).unwrap();
    }
    for (name, unschedulable) in [("n1", false), ("n2", true), ("n3", false)] {
        server.create(&node(name, unschedulable)).unwrap();
    }
    for s in [
        slice("web-abc", "web", &["10.0.0.1"]),
        slice("web-def", "web", &["10.0.0.2"]),
        slice("db-1", "db", &[]),
    ] {
        server.create(&s).unwrap();
    }
    let client = client(&server).await;

    // Label selectors, namespaced and across namespaces.
    let default: Api<Service> = Api::default_namespaced(client.clone());
    let all: Api<Service> = Api::all(client.clone());
    let listed = |api: &Api<Service>, selector: &str| {
        let api = api.clone();
        let lp = ListParams::default().labels(selector);
        async move { names(api.list(&lp).await.unwrap()) }
    };
    assert_eq!(listed(&default, "app=web").await, ["web", "web-canary"]);
    assert_eq!(
        listed(&all, "app=web").await,
        ["web", "web-canary", "web"],
        "prod/web sorts after default/*"
    );
    assert_eq!(
        listed(&default, "app in (web,db),!tier").await,
        ["db", "web-canary"]
    );
    assert_eq!(listed(&default, "app").await, ["db", "web", "web-canary"]);
    assert_eq!(listed(&default, "app!=web").await, ["cache", "db"]);
    let prod: Api<Service> = Api::namespaced(client.clone(), "prod");
    assert_eq!(listed(&prod, "").await, ["web"]);

    // Field selectors, including a generic path.
    let one = all
        .list(&ListParams::default().fields("metadata.name=web,metadata.namespace=prod"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(one.items[0].namespace().as_deref(), Some("prod"));
    let nodes: Api<Node> = Api::all(client.clone());
    let cordoned = nodes
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await
        .unwrap();
    assert_eq!(names(cordoned), ["n2"]);
    let schedulable = nodes
        .list(&ListParams::default().fields("spec.unschedulable!=true"))
        .await
        .unwrap();
    assert_eq!(names(schedulable), ["n1", "n3"]);

    // EndpointSlices of one service, the way kube-proxy-like agents select them.
    let slices: Api<EndpointSlice> = Api::default_namespaced(client.clone());
    let web = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(names(web.items.clone()), ["web-abc", "web-def"]);
    assert_eq!(
        web.items[1].endpoints.as_ref().unwrap()[0].addresses,
        ["10.0.0.2"]
    );
    assert_eq!(
        web.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    // Pagination: limit 2 over 5 services; a write between pages does not disturb the list.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut lp = ListParams::default().limit(2);
    loop {
        let page = all.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2, "a page holds at most `limit` items");
        seen.extend(
            page.items
                .iter()
                .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any())),
        );
        if pages == 1 {
            server.create(&svc("zzz-late").build()).unwrap();
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = ListParams::default().limit(2).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        [
            "default/cache",
            "default/db",
            "default/web",
            "default/web-canary",
            "prod/web"
        ]
    );
    let fresh = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(fresh.items.len(), 6, "the late service is in the next list");

    // Get: the agent reads its own Node; a missing object is a 404 Status.
    let n2 = nodes.get("n2").await.unwrap();
    assert_eq!(n2.spec.unwrap().unschedulable, Some(true));
    assert!(n2.metadata.uid.is_some() && n2.metadata.creation_timestamp.is_some());
    let missing = api_error(nodes.get("n9").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "nodes \"n9\" not found");
    let bad = api_error(
        default
            .list(&ListParams::default().labels("app in web"))
            .await
            .unwrap_err(),
    );
    assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));

    // Metadata-only lists (kube's `list_metadata`) get PartialObjectMetadata.
    let meta = all
        .list_metadata(&ListParams::default().labels("app=db"))
        .await
        .unwrap();
    assert_eq!(meta.items.len(), 1);
    assert_eq!(meta.items[0].name_any(), "db");
    assert_eq!(
        meta.items[0].labels().get("app").map(String::as_str),
        Some("db")
    );

    let pages_requested = requests_for(&server, "services")
        .into_iter()
        .filter(|r| r.verb == "list" && r.query_param("limit").as_deref() == Some("2"))
        .count();
    assert_eq!(pages_requested, 3);
}

/// Runs the default watcher or a streaming-list one over Services: initial objects, then an add,
/// a modify and a delete, in that order.
async fn watcher_sees_changes_in_order(config: watcher::Config) -> ApiServer {
    let server = ApiServer::start_local();
    server
        .create(&svc("a").label("app", "web").build())
        .unwrap();
    server
        .create(&svc("b").label("app", "web").build())
        .unwrap();
    server
        .create(&svc("other").label("app", "db").build())
        .unwrap();
    server
        .create(&svc("elsewhere").ns("prod").label("app", "web").build())
        .unwrap();
    let api: Api<Service> = Api::default_namespaced(client(&server).await);
    let mut events = watch(api, config.labels("app=web")).boxed();

    let mut initial = Vec::new();
    loop {
        let event = next(&mut events, "the initial list")
            .await
            .expect("no watcher error");
        match describe(&event) {
            ("init", _) => {}
            ("init-apply", name) => initial.push(name),
            ("init-done", _) => break,
            other => panic!("unexpected {other:?} during the initial list"),
        }
    }
    initial.sort();
    assert_eq!(initial, ["a", "b"]);

    server.apply(&svc("c").label("app", "web").build());
    server.apply(&svc("other").label("app", "db").port(81).build()); // not selected: no event
    server.apply(&svc("c").label("app", "web").port(8080).build());
    server.delete::<Service>(None, "c").unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = next(&mut events, "a live change")
            .await
            .expect("no watcher error");
        if let Event::Apply(s) = &event {
            seen.push((
                describe(&event),
                s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
            ));
        } else {
            seen.push((describe(&event), 0));
        }
    }
    assert_eq!(
        seen,
        [
            (("apply", "c".to_owned()), 80),
            (("apply", "c".to_owned()), 8080),
            (("delete", "c".to_owned()), 0)
        ]
    );
    server
}

#[tokio::test]
async fn watcher_list_then_watch_sees_add_modify_delete() {
    let server = watcher_sees_changes_in_order(watcher::Config::default()).await;
    let requests = requests_for(&server, "services");
    let verbs: Vec<&str> = requests.iter().map(|r| r.verb.as_str()).collect();
    assert_eq!(
        verbs,
        ["list", "watch"],
        "one list, then one watch from its resourceVersion"
    );
    let list = &requests[0];
    let watch = &requests[1];
    assert_eq!(
        list.query_param("labelSelector").as_deref(),
        Some("app=web")
    );
    assert_eq!(list.query_param("limit").as_deref(), Some("500"));
    assert_eq!(
        watch.query_param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(
        watch.query_param("resourceVersion").as_deref(),
        Some("104"),
        "the list's version"
    );
    assert_eq!(watch.query_param("sendInitialEvents"), None);
}

#[tokio::test]
async fn watcher_streaming_list_sees_add_modify_delete() {
    let server = watcher_sees_changes_in_order(watcher::Config::default().streaming_lists()).await;
    let requests = requests_for(&server, "services");
    let verbs: Vec<&str> = requests.iter().map(|r| r.verb.as_str()).collect();
    assert_eq!(verbs, ["watch"], "a streaming list needs no list call");
    assert_eq!(
        requests[0].query_param("sendInitialEvents").as_deref(),
        Some("true")
    );
    assert_eq!(
        requests[0].query_param("resourceVersion").as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn reflector_recovers_from_410_after_compaction() {
    let server = ApiServer::start_local();
    for name in ["a", "b", "c"] {
        server.create(&svc(name).build()).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store::<Service>();
    let mut stream = reflector(writer, watch(api, watcher::Config::default())).boxed();
    let errors = drive_until(&mut stream, "the initial list and an open watch", || {
        reader.len() == 3 && server.open_watches() == 1
    })
    .await;
    assert!(errors.is_empty(), "{errors:?}");

    // The client is not polled from here: the server drops its watch and changes things while
    // it is away, then forgets the history.
    server.close_watches();
    server.create(&svc("d").build()).unwrap();
    server.apply(&svc("a").port(443).build());
    server.delete::<Service>(None, "b").unwrap();
    server.compact();
    let compacted_at = server.resource_version();

    let state = |services: Vec<Service>| -> BTreeSet<(String, String, i32)> {
        services
            .into_iter()
            .map(|s| {
                let port = s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
                (s.name_any(), s.resource_version().unwrap(), port)
            })
            .collect()
    };
    let errors = drive_until(&mut stream, "the reflector to match the server", || {
        state(reader.state().iter().map(|s| (**s).clone()).collect())
            == state(server.list::<Service>())
    })
    .await;
    assert_eq!(state(server.list::<Service>()).len(), 3);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version")),
        "the re-watch got 410 Expired: {errors:?}"
    );
    let requests = requests_for(&server, "services");
    let verbs: Vec<&str> = requests.iter().map(|r| r.verb.as_str()).collect();
    assert_eq!(
        verbs,
        ["list", "watch", "watch", "list"],
        "re-watch, 410, re-list"
    );
    assert_eq!(
        requests[2].query_param("resourceVersion"),
        requests[1].query_param("resourceVersion")
    );
    let relist = drive_until(&mut stream, "the watch after the re-list", || {
        server.open_watches() == 1
    })
    .await;
    assert!(relist.is_empty(), "{relist:?}");
    let rewatch = requests_for(&server, "services").pop().unwrap();
    assert_eq!(rewatch.verb, "watch");
    assert_eq!(
        rewatch.query_param("resourceVersion"),
        Some(compacted_at.to_string())
    );

    // A raw watch from before the compaction gets the same 410 as one ERROR event, then the end.
    let mut raw = RawWatch::open(&server, "/api/v1/services?watch=true&resourceVersion=101").await;
    let gone = raw.next_event().await.expect("an ERROR event");
    assert_eq!(gone["type"], "ERROR");
    assert_eq!(gone["object"]["kind"], "Status");
    assert_eq!(gone["object"]["code"], 410);
    assert_eq!(gone["object"]["reason"], "Expired");
    assert_eq!(
        gone["object"]["message"],
        format!("too old resource version: 101 ({compacted_at})")
    );
    assert_eq!(
        raw.next_event().await,
        None,
        "the stream ends after the error"
    );
}

#[tokio::test]
async fn bookmarks_reach_watchers_that_ask_for_them() {
    let server = ApiServer::start_local();
    server.set_bookmark_interval(None);
    server.create(&svc("a").build()).unwrap();

    // The kube watcher takes the bookmark's version: after a reconnect it resumes from there.
    let api: Api<Service> = Api::default_namespaced(client(&server).await);
    let mut events = watch(api, watcher::Config::default()).boxed();
    let errors = drive_until(&mut events, "an open watch", || server.open_watches() == 1).await;
    assert!(errors.is_empty(), "{errors:?}");
    let unrelated = ConfigMap {
        metadata: ObjectMeta {
            name: Some("cm".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    server.create(&unrelated).unwrap();
    let bookmark_rv = server.resource_version();
    server.bookmark_now();
    server.close_watches();
    let errors = drive_until(&mut events, "the re-watch", || server.open_watches() == 1).await;
    assert!(errors.is_empty(), "{errors:?}");
    let rewatch = requests_for(&server, "services").pop().unwrap();
    assert_eq!(rewatch.verb, "watch");
    assert_eq!(
        rewatch.query_param("resourceVersion"),
        Some(bookmark_rv.to_string()),
        "resumed from the bookmark"
    );
    server.create(&svc("after-bookmark").build()).unwrap();
    loop {
        match describe(
            &next(&mut events, "the service created after the bookmark")
                .await
                .unwrap(),
        ) {
            ("apply", name) if name == "after-bookmark" => break,
            ("init-apply" | "apply", _) | ("init" | "init-done", _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // Raw watches: only the one that allowed bookmarks gets the BOOKMARK line.
    let rv = server.resource_version();
    let watches_before = server.open_watches();
    let path = format!("/api/v1/namespaces/default/services?watch=1&resourceVersion={rv}");
    let mut with = RawWatch::open(&server, &format!("{path}&allowWatchBookmarks=true")).await;
    let mut without = RawWatch::open(&server, &path).await;
    let start = Instant::now();
    while server.open_watches() < watches_before + 2 {
        assert!(start.elapsed() < DEADLINE, "the raw watches did not open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.bookmark_now();
    server.create(&svc("z").build()).unwrap();
    let bookmark = with.next_event().await.unwrap();
    assert_eq!(
        bookmark,
        json!({ "type": "BOOKMARK", "object": { "kind": "Service", "apiVersion": "v1", "metadata": { "resourceVersion": rv.to_string() } } })
    );
    assert_eq!(with.next_event().await.unwrap()["type"], "ADDED");
    let first = without.next_event().await.unwrap();
    assert_eq!(
        first["type"], "ADDED",
        "no bookmark without allowWatchBookmarks"
    );
    assert_eq!(first["object"]["metadata"]["name"], "z");

    // Periodic bookmarks, once turned on, arrive by themselves.
    server.set_bookmark_interval(Duration::from_millis(20));
    let periodic = with.next_event().await.unwrap();
    assert_eq!(periodic["type"], "BOOKMARK");
    assert_eq!(
        periodic["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
}

#[tokio::test]
async fn writes_conflicts_patches_and_deletes() {
    let server = ApiServer::start_local();
    let created = server
        .create(&svc("web").label("app", "web").build())
        .unwrap();
    let api: Api<Service> = Api::default_namespaced(client(&server).await);

    // Optimistic concurrency, typed API: replacing an outdated copy is a 409.
    let mut newer = created.clone();
    newer.spec.as_mut().unwrap().ports = Some(vec![ServicePort {
        port: 81,
        ..ServicePort::default()
    }]);
    let newer = server.replace(&newer).unwrap();
    assert_ne!(newer.resource_version(), created.resource_version());
    assert_eq!(newer.metadata.generation, Some(2));
    let stale = server.replace(&created).unwrap_err();
    assert_eq!((stale.code(), stale.reason()), (409, "Conflict"));
    assert_eq!(
        server.create(&created).unwrap_err().code(),
        409,
        "create of an existing name"
    );

    // The same through kube: a stale replace fails, a fresh one succeeds.
    let err = api_error(
        api.replace("web", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );
    let mut fresh = api.get("web").await.unwrap();
    fresh.spec.as_mut().unwrap().ports = Some(vec![ServicePort {
        port: 82,
        ..ServicePort::default()
    }]);
    let replaced = api
        .replace("web", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(replaced.spec.unwrap().ports.unwrap()[0].port, 82);

    // A merge patch adds a label and removes another.
    let patch = json!({ "metadata": { "labels": { "tier": "front", "app": null } } });
    let patched = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        patched.labels(),
        &BTreeMap::from([("tier".to_owned(), "front".to_owned())])
    );
    assert_eq!(
        server.get::<Service>(None, "web").unwrap().labels(),
        patched.labels()
    );

    // The status subresource changes status only.
    let status = json!({ "status": { "loadBalancer": { "ingress": [{ "ip": "192.0.2.1" }] } }, "spec": { "ports": [] } });
    let with_status = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let ServiceStatus { load_balancer, .. } = with_status.status.unwrap();
    assert_eq!(
        load_balancer.unwrap().ingress.unwrap()[0].ip.as_deref(),
        Some("192.0.2.1")
    );
    assert_eq!(
        with_status.spec.unwrap().ports.unwrap()[0].port,
        82,
        "spec untouched through /status"
    );

    // Create and delete through kube.
    let made = api
        .create(&PostParams::default(), &svc("tmp").build())
        .await
        .unwrap();
    assert_eq!(made.namespace().as_deref(), Some("default"));
    let dup = api_error(
        api.create(&PostParams::default(), &svc("tmp").build())
            .await
            .unwrap_err(),
    );
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    let deleted = api.delete("tmp", &DeleteParams::default()).await.unwrap();
    let deleted = deleted.left().expect("the deleted object");
    assert_eq!(deleted.name_any(), "tmp");
    assert!(server.get::<Service>(None, "tmp").is_none());
    let again = api_error(
        api.delete("tmp", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(again.code, 404);

    // The request log saw every call, with its verb, resource and outcome.
    let log: Vec<(String, String, u16)> = requests_for(&server, "services")
        .into_iter()
        .map(|r| (r.verb, r.subresource, r.code))
        .collect();
    let expected: Vec<(String, String, u16)> = [
        ("update", "", 409),
        ("get", "", 200),
        ("update", "", 200),
        ("patch", "", 200),
        ("patch", "status", 200),
        ("create", "", 201),
        ("create", "", 409),
        ("delete", "", 200),
        ("delete", "", 404),
    ]
    .into_iter()
    .map(|(v, s, c)| (v.to_owned(), s.to_owned(), c))
    .collect();
    assert_eq!(log, expected);
}

#[tokio::test]
async fn discovery_and_version_documents_parse_in_kube() {
    let server = ApiServer::start_local();
    let client = client(&server).await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let (resource, caps) = discovery
        .resolve_gvk(&kube::core::GroupVersionKind::gvk(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
        ))
        .expect("EndpointSlice is discoverable");
    assert_eq!(resource.plural, "endpointslices");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let (_, node_caps) = discovery
        .resolve_gvk(&kube::core::GroupVersionKind::gvk("", "v1", "Node"))
        .expect("Node is discoverable");
    assert_eq!(node_caps.scope, kube::discovery::Scope::Cluster);
}

#[test]
fn serves_a_caller_bound_listener_without_a_runtime_and_stops_on_drop() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ApiServer::start(listener);
    assert_eq!(server.addr(), addr);
    assert_eq!(server.url(), format!("https://{addr}"));
    server.apply(&node("n1", false));

    // HTTP/1.1 by hand, over TLS verified against the cluster CA.
    let tls = server.tls_client_config();
    let get = |path: &str, token: Option<&str>| -> Option<String> {
        use std::io::{Read, Write};
        let tcp = std::net::TcpStream::connect(addr).ok()?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(std::sync::Arc::clone(&tls), name).ok()?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = Vec::new();
        match stream.read_to_end(&mut response) {
            Ok(_) => {}
            // The server may close without a close_notify after `Connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(_) => return None,
        }
        Some(String::from_utf8_lossy(&response).into_owned())
    };
    let admin = server.admin_token();
    let response = get("/api/v1/nodes/n1", Some(&admin)).expect("the server answers");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"name\":\"n1\""), "{response}");
    let missing = get("/api/v1/nodes/n9", Some(&admin)).unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let ready = get("/readyz", Some(&admin)).unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.ends_with("ok"),
        "{ready}"
    );
    let nonsense = get(
        "/api/v1/namespaces/default/services?labelSelector=%28%28",
        Some(&admin),
    )
    .unwrap();
    assert!(
        nonsense.starts_with("HTTP/1.1 400") && nonsense.contains("\"reason\":\"BadRequest\""),
        "{nonsense}"
    );
    // Without a token: 401 and the real server's Status, for resources and health alike.
    for path in ["/api/v1/nodes/n1", "/readyz"] {
        let anonymous = get(path, None).unwrap();
        assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
        let body = &anonymous[anonymous.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(
            serde_json::from_str::<Value>(body).unwrap(),
            json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401 }),
            "{path}"
        );
    }

    server.shutdown();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn the_agents_token_gets_what_its_cluster_role_grants_and_403_for_anything_else() {
    let server = ApiServer::start_local();
    let token = ferrox_tests::manifests::install_rbac(&server);
    server.create(&svc("web").build()).unwrap();
    server.apply(&node("node-1", false));
    let client = client_as(&server, &token).await;
    let user = "system:serviceaccount:kube-system:ferrox";

    // What the manifest's ClusterRole grants, and discovery for every authenticated user.
    let services: Api<Service> = Api::all(client.clone());
    assert_eq!(
        names(services.list(&ListParams::default()).await.unwrap()),
        ["web"]
    );
    let in_default: Api<Service> = Api::default_namespaced(client.clone());
    assert_eq!(
        names(in_default.list(&ListParams::default()).await.unwrap()),
        ["web"],
        "a ClusterRoleBinding grants every namespace"
    );
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(nodes.get("node-1").await.unwrap().name_any(), "node-1");
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");

    // Everything else is a 403 with the real server's Status.
    let forbidden = [
        (
            api_error(in_default.get("web").await.unwrap_err()),
            format!(
                "services \"web\" is forbidden: User \"{user}\" cannot get resource \"services\" in API group \"\" in the namespace \"default\""
            ),
        ),
        (
            api_error(
                in_default
                    .create(&PostParams::default(), &svc("mine").build())
                    .await
                    .unwrap_err(),
            ),
            format!(
                "services is forbidden: User \"{user}\" cannot create resource \"services\" in API group \"\" in the namespace \"default\""
            ),
        ),
        (
            api_error(
                Api::<ConfigMap>::all(client.clone())
                    .list(&ListParams::default())
                    .await
                    .unwrap_err(),
            ),
            format!(
                "configmaps is forbidden: User \"{user}\" cannot list resource \"configmaps\" in API group \"\" at the cluster scope"
            ),
        ),
        (
            api_error(
                nodes
                    .patch_status(
                        "node-1",
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "status": {} })),
                    )
                    .await
                    .unwrap_err(),
            ),
            format!(
                "nodes \"node-1\" is forbidden: User \"{user}\" cannot patch resource \"nodes/status\" in API group \"\" at the cluster scope"
            ),
        ),
        (
            api_error(
                Api::<EndpointSlice>::default_namespaced(client.clone())
                    .delete("web-abc", &DeleteParams::default())
                    .await
                    .unwrap_err(),
            ),
            format!(
                "endpointslices.discovery.k8s.io \"web-abc\" is forbidden: User \"{user}\" cannot delete resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"default\""
            ),
        ),
    ];
    for (status, message) in &forbidden {
        assert_eq!(
            (status.code, status.reason.as_str(), &status.message),
            (403, "Forbidden", message)
        );
    }
    assert!(
        server.get::<Service>(None, "mine").is_none(),
        "nothing was created"
    );

    // The request log names the user of every call, and what it was refused.
    let log: Vec<(String, String, String, u16)> = server
        .requests()
        .into_iter()
        .map(|r| (r.user, r.verb, r.resource, r.code))
        .collect();
    let by = |verb: &str, resource: &str, code: u16| {
        (user.to_owned(), verb.to_owned(), resource.to_owned(), code)
    };
    for want in [
        by("list", "services", 200),
        by("get", "nodes", 200),
        by("get", "services", 403),
        by("create", "services", 403),
        by("patch", "nodes", 403),
    ] {
        assert!(log.contains(&want), "{want:?} not in {log:?}");
    }

    // A token that is not the server's, or of an account that is gone, is a 401.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [forged.as_str(), "", "not-a-token"] {
        let err = api_error(
            Api::<Service>::all(client_as(&server, bad).await)
                .list(&ListParams::default())
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (err.code, err.reason.as_str(), err.message.as_str()),
            (401, "Unauthorized", "Unauthorized"),
            "{bad:?}"
        );
    }
    server
        .delete::<k8s_openapi::api::core::v1::ServiceAccount>(Some("kube-system"), "ferrox")
        .unwrap();
    let err = api_error(services.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(err.code, 401, "the ServiceAccount was deleted");
}

#[tokio::test]
async fn the_client_verifies_the_certificate_against_the_kubeconfigs_ca() {
    let server = ApiServer::start_local();
    let other = ApiServer::start_local();
    let admin = server.admin_token();

    // Another cluster's CA (also named `kubernetes`, as every kubeadm CA is) does not verify
    // this server's certificate.
    let wrong_ca = other
        .kubeconfig(&admin)
        .replace(&other.url(), &server.url());
    let kubeconfig = Kubeconfig::from_yaml(&wrong_ca).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let err = Api::<Service>::all(Client::try_from(config).unwrap())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)) && format!("{err:?}").contains("InvalidCertificate"),
        "{err:?}"
    );

    // Nor does the right CA for a name the certificate does not carry.
    let wrong_name = server.kubeconfig(&admin).replace(
        "    certificate-authority-data:",
        "    tls-server-name: control-plane.invalid\n    certificate-authority-data:",
    );
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&wrong_name).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let err = Api::<Service>::all(Client::try_from(config).unwrap())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");

    // What a TLS handshake costs here, next to the TCP connection it runs on.
    let rounds = 50;
    let start = Instant::now();
    for _ in 0..rounds {
        drop(TcpStream::connect(server.addr()).await.unwrap());
    }
    let tcp = start.elapsed() / rounds;
    let start = Instant::now();
    for _ in 0..rounds {
        drop(connect_tls(&server).await);
    }
    let tls = start.elapsed() / rounds;
    eprintln!("TCP connect {tcp:?}, TCP connect + TLS handshake {tls:?} (mean of {rounds})");
}

#[tokio::test]
async fn broken_watches_resume_and_expired_ones_relist() {
    let server = ApiServer::start_local();
    server.create(&svc("a").build()).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store::<Service>();
    let mut stream = reflector(writer, watch(api, watcher::Config::default())).boxed();
    let errors = drive_until(&mut stream, "the list and an open watch", || {
        reader.len() == 1 && server.open_watches() == 1
    })
    .await;
    assert!(errors.is_empty(), "{errors:?}");
    let has = |name: &str| reader.state().iter().any(|s| s.name_any() == name);

    // Broken: no watch opens, so a change made meanwhile does not arrive...
    let broken = server.break_watches();
    server.create(&svc("b").build()).unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while stream.next().await.is_some() {}
    })
    .await;
    assert!(!has("b"), "nothing arrives while the watches are broken");
    assert_eq!(server.open_watches(), 0);
    // ...until the watches come back: the client resumes where it was, without a list.
    drop(broken);
    let errors = drive_until(&mut stream, "b through the resumed watch", || has("b")).await;
    assert!(errors.is_empty(), "{errors:?}");
    let verbs = |from: usize| -> Vec<(String, Option<u16>)> {
        requests_for(&server, "services")[from..]
            .iter()
            .map(|r| (r.verb.clone(), r.watch_error))
            .collect()
    };
    assert_eq!(
        verbs(0),
        [
            ("list".to_owned(), None),
            ("watch".to_owned(), None),
            ("watch".to_owned(), None)
        ]
    );

    // Broken and expired: the client's version is gone, it gets 410 and re-lists.
    let before = requests_for(&server, "services").len();
    let broken = server.break_watches();
    server.create(&svc("c").build()).unwrap();
    server.delete::<Service>(None, "a").unwrap();
    broken.expire();
    let errors = drive_until(&mut stream, "the re-list after 410", || {
        has("c") && !has("a") && server.open_watches() == 1
    })
    .await;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version")),
        "{errors:?}"
    );
    assert_eq!(
        verbs(before),
        [
            ("watch".to_owned(), Some(410)),
            ("list".to_owned(), None),
            ("watch".to_owned(), None)
        ]
    );
}

#[tokio::test]
async fn pods_on_a_node_are_deleted_gracefully() {
    use k8s_openapi::api::core::v1::Pod;
    let server = ApiServer::start_local();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web-0", "namespace": "default" },
        "spec": { "nodeName": "node-1", "terminationGracePeriodSeconds": 45,
                  "containers": [ { "name": "web", "image": "web" } ] },
        "status": { "phase": "Running" }
    }))
    .unwrap();
    server.create(&pod).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client(&server).await);
    let terminating = pods
        .delete("web-0", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the pod stays, terminating");
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(45));
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(server.get::<Pod>(None, "web-0").is_some());
    // The kubelet's final delete, once the containers stopped.
    let gone = pods
        .delete("web-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(gone.is_left());
    assert!(server.get::<Pod>(None, "web-0").is_none());
}
