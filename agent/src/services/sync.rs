//! The async shell around the pure service logic: watch Services, EndpointSlices and this Node
//! through the Kubernetes API, feed the events to [`ClusterState`], and reconcile the entries
//! that changed.

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::health_check::HealthChecks;
use super::{
    model::{NodeInfo, ProxyOptions},
    reconcile::{NodeMaps, Reconciler, SyncReport},
    state::{Change, ClusterState, Listed},
};
use crate::observability::{
    health::Health,
    metrics::{Metrics, ServiceSync},
};

/// One event from one of the three watches.
enum Event {
    // Boxed: the objects are large, and moved through a channel.
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    // An object of a (re)list, already in the compact form the state keeps (encoded on the
    // watch's task: a list of thousands never waits in the channel decoded).
    ListedService(Listed<Service>),
    ListedSlice(Listed<EndpointSlice>),
}

/// Spawns a watch of `K` that forwards its events to `tx`, wrapped by `wrap`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<Event>,
    slim: fn(&mut K),
    wrap: fn(watcher::Event<K>) -> Event,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).into_owned();
    let stream = watcher(api, config)
        .modify(slim)
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(e) => {
                    // The receiver only goes away when the sync loop ends.
                    let _ = tx.send(wrap(e));
                }
                Err(e) => warn!(kind = %kind, error = %e, "watch failed; retrying with backoff"),
            }
            futures::future::ready(())
        });
    tokio::spawn(stream);
}

/// Objects of one kind listed since the watch's last `Init`, until its `InitDone`, each kept
/// as `T` (the compact form the state stores).
struct Relist<T> {
    pending: Option<Vec<T>>,
    listed: bool,
}

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Self {
            pending: None,
            listed: false,
        }
    }
}

impl<T> Relist<T> {
    /// One object of the list in progress.
    fn push(&mut self, item: T) {
        self.pending.get_or_insert_with(Vec::new).push(item);
    }

    /// Buffers list events; returns the complete list at `InitDone`, and other events as they are.
    fn feed<K: Into<T>>(
        &mut self,
        event: watcher::Event<K>,
    ) -> Option<Result<Vec<T>, watcher::Event<K>>> {
        match event {
            watcher::Event::Init => {
                self.pending = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(obj) => {
                self.pending.get_or_insert_with(Vec::new).push(obj.into());
                None
            }
            watcher::Event::InitDone => {
                self.listed = true;
                Some(Ok(self.pending.take().unwrap_or_default()))
            }
            e => Some(Err(e)),
        }
    }
}

/// The three watches' list buffers.
#[derive(Default)]
struct Lists {
    services: Relist<Listed<Service>>,
    slices: Relist<Listed<EndpointSlice>>,
    nodes: Relist<Node>,
}

impl Lists {
    fn all_listed(&self) -> bool {
        self.services.listed && self.slices.listed && self.nodes.listed
    }

    /// Applies one event to `state`.
    fn apply(&mut self, event: Event, state: &mut ClusterState, node_name: &str) {
        match event {
            Event::ListedService(l) => self.services.push(l),
            Event::ListedSlice(l) => self.slices.push(l),
            Event::Service(e) => match self.services.feed(*e) {
                Some(Ok(all)) => state.replace_services(all),
                Some(Err(watcher::Event::Apply(s))) => state.apply_service(s),
                Some(Err(watcher::Event::Delete(s))) => state.delete_service(&s),
                _ => {}
            },
            Event::Slice(e) => match self.slices.feed(*e) {
                Some(Ok(all)) => state.replace_slices(all),
                Some(Err(watcher::Event::Apply(s))) => state.apply_slice(s),
                Some(Err(watcher::Event::Delete(s))) => state.delete_slice(&s),
                _ => {}
            },
            Event::Node(e) => match self.nodes.feed(*e) {
                Some(Ok(all)) => state.set_node(node_info(node_name, all.first())),
                Some(Err(watcher::Event::Apply(n))) => {
                    state.set_node(node_info(node_name, Some(&n)))
                }
                Some(Err(watcher::Event::Delete(_))) => state.set_node(node_info(node_name, None)),
                _ => {}
            },
        }
    }
}

/// What the service sync needs to know besides the API objects.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// The BGP speaker's exports: the service sync keeps their externalIPs and LoadBalancer
    /// IPs equal to the table's.
    pub advertise: Option<std::sync::Arc<tokio::sync::watch::Sender<crate::bgp::speaker::Exports>>>,
    pub node_name: String,
    pub options: ProxyOptions,
}

/// The facts about this node the service table depends on, from its Node object.
pub fn node_info(name: &str, node: Option<&Node>) -> NodeInfo {
    let addresses = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    NodeInfo {
        name: name.to_owned(),
        addresses,
        zone,
    }
}

/// The well-known label of a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Runs until the process ends: keeps the service maps equal to what the API says.
///
/// Nothing is written before all three kinds are listed (a partial view would delete what the
/// maps hold). Then the first sync is a full one (it adopts what a previous run programmed and
/// converges it); after that, each sync covers only the entries of the Services whose objects
/// changed. Events that arrive during a sync are handled together by the next one.
pub async fn run(
    client: Client,
    mut maps: NodeMaps,
    config: SyncConfig,
    health: Health,
    metrics: Metrics,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        super::slim::service,
        |e| match e {
            watcher::Event::InitApply(s) => Event::ListedService(s.into()),
            e => Event::Service(Box::new(e)),
        },
    );
    watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        super::slim::slice,
        |e| match e {
            watcher::Event::InitApply(s) => Event::ListedSlice(s.into()),
            e => Event::Slice(Box::new(e)),
        },
    );
    watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
        tx,
        super::slim::node,
        |e| Event::Node(Box::new(e)),
    );
    let mut state = ClusterState::new(node_info(&config.node_name, None), config.options.clone());
    let mut lists = Lists::default();
    let mut reconciler = Reconciler::load(&maps)?;
    let (frontends, backends) = reconciler.size();
    info!(frontends, backends, "adopted the programmed service table");

    let checks = HealthChecks::default();
    let mut announced = false;
    // Entries a sync could not program (a full map, a failed write) keep their previous state;
    // a full sync retries them, sooner at first, then every minute at most, until none fails.
    let mut retry = Retry::default();
    loop {
        let retrying = match retry.at {
            Some(at) => tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => {
                        health.queued();
                        lists.apply(e, &mut state, &config.node_name);
                        false
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(at) => true,
            },
            None => match rx.recv().await {
                Some(e) => {
                    health.queued();
                    lists.apply(e, &mut state, &config.node_name);
                    false
                }
                None => break,
            },
        };
        while let Ok(event) = rx.try_recv() {
            lists.apply(event, &mut state, &config.node_name);
        }
        if !lists.all_listed() {
            continue;
        }
        if !announced {
            let (services, slices) = state.counts();
            info!(
                services,
                slices, "service, endpointslice and node caches synced"
            );
            announced = true;
        }
        let started = std::time::Instant::now();
        let change = match (state.update(), retrying) {
            (Some(c), false) => c,
            (_, true) => Change::Full,
            (None, false) => {
                // Events that changed nothing: still in sync.
                health.synced();
                continue;
            }
        };
        let table = state.table();
        let (report, full) = match &change {
            Change::Full => (reconciler.sync(table, &mut maps), true),
            Change::Entries(keys) => (reconciler.sync_changed(table, keys, &mut maps), false),
        };
        let took = started.elapsed();
        log_report(&report, table.skipped.len(), full, took);
        retry.after(&report);
        metrics.sync(&figures(&report, full, table.skipped.len(), took));
        checks.set_checks(&table.health_checks);
        if let Some(tx) = &config.advertise {
            let (external, lb) = advertised_ips(table);
            tx.send_if_modified(|e| {
                let changed = e.external_ips != external || e.load_balancer_ips != lb;
                e.external_ips = external;
                e.load_balancer_ips = lb;
                changed
            });
        }
        health.synced();
        if full {
            crate::heap::give_back_free_memory();
            for s in &table.skipped {
                debug!(service = %format!("{}/{}", s.namespace, s.name), reason = ?s.reason, "service not programmed");
            }
        }
    }
    anyhow::bail!("every watch ended")
}

/// When to retry entries that failed to program: 1 s after the first failing sync, doubling up
/// to a minute while they keep failing; nothing once a sync programs everything.
#[derive(Debug, Default)]
struct Retry {
    at: Option<tokio::time::Instant>,
    backoff: std::time::Duration,
}

impl Retry {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
    const MAX: std::time::Duration = std::time::Duration::from_secs(60);

    fn after(&mut self, report: &SyncReport) {
        if report.failures.is_empty() {
            *self = Self::default();
            return;
        }
        self.backoff = if self.backoff.is_zero() {
            Self::FIRST
        } else {
            (self.backoff * 2).min(Self::MAX)
        };
        self.at = Some(tokio::time::Instant::now() + self.backoff);
        warn!(
            failing = report.failures.len(),
            retry_in_s = self.backoff.as_secs(),
            "service entries failed to program; retrying"
        );
    }
}

/// The externalIPs and LoadBalancer IPs this node announces over BGP, as /32s: every one of
/// an externalTrafficPolicy Cluster Service, those of a Local one only while this node has a
/// local endpoint (so routers send its traffic only to nodes that serve it, keeping the client
/// address).
pub fn advertised_ips(
    table: &crate::services::model::Desired,
) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv4Net>) {
    use crate::services::model::{FrontendKind, Scope};
    let mut external = std::collections::BTreeSet::new();
    let mut lb = std::collections::BTreeSet::new();
    for (key, spec) in &table.frontends {
        if key.scope != Scope::External {
            continue;
        }
        let set = match spec.kind {
            FrontendKind::ExternalIp => &mut external,
            FrontendKind::LoadBalancer => &mut lb,
            FrontendKind::ClusterIp | FrontendKind::NodePort => continue,
        };
        if spec.external_local && !spec.backends.iter().any(|b| b.local) {
            continue;
        }
        set.insert(ipnet::Ipv4Net::from(key.frontend.addr));
    }
    (external.into_iter().collect(), lb.into_iter().collect())
}

/// The figures of one sync, for the metrics.
fn figures(
    report: &SyncReport,
    full: bool,
    skipped: usize,
    took: std::time::Duration,
) -> ServiceSync {
    let map_full = report.failures.iter().filter(|f| f.map_full).count();
    ServiceSync {
        full,
        seconds: took.as_secs_f64(),
        failures_map_full: map_full,
        failures_other: report.failures.len() - map_full,
        frontends: report.frontends,
        backends: report.backends,
        maglev_tables: report.maglev_tables,
        source_ranges: report.source_ranges,
        skipped,
        writes: report.writes,
        deletes: report.deletes,
        flows_purged: report.flows_purged,
        sockets_closed: report.sockets_closed,
    }
}

fn log_report(report: &SyncReport, skipped: usize, full: bool, took: std::time::Duration) {
    for f in &report.failures {
        if f.map_full {
            error!(frontend = %f.frontend, error = %f.error, "service map full: frontend keeps its previous backends");
        } else {
            error!(frontend = %f.frontend, error = %f.error, "programming frontend failed");
        }
    }
    if report.changed() {
        info!(
            frontends = report.frontends,
            backends = report.backends,
            writes = report.writes,
            deletes = report.deletes,
            maglev_tables = report.maglev_tables,
            source_ranges = report.source_ranges,
            flows_purged = report.flows_purged,
            sockets_closed = report.sockets_closed,
            skipped,
            full,
            took_us = took.as_micros() as u64,
            "service maps synced"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_ips;
    use crate::services::{
        model::{NodeInfo, ProxyOptions},
        state::ClusterState,
        testing::{slice, svc},
    };

    /// (node, the externalIPs and LoadBalancer IPs it announces)
    #[test]
    fn local_policy_addresses_are_announced_only_by_nodes_with_a_local_endpoint() {
        let services = [
            svc("local")
                .cluster_ip("10.96.0.1")
                .external_ip("203.0.113.1")
                .load_balancer("203.0.113.2")
                .external_traffic_policy("Local")
                .port("http", 80, "TCP")
                .build(),
            svc("cluster")
                .cluster_ip("10.96.0.2")
                .load_balancer("203.0.113.3")
                .port("http", 80, "TCP")
                .build(),
            svc("plain")
                .cluster_ip("10.96.0.3")
                .port("http", 80, "TCP")
                .build(),
        ];
        let slices = [
            slice("local", "local-1")
                .port("http", 8080, "TCP")
                .ready_on("10.244.2.5", "node-2")
                .build(),
            slice("cluster", "cluster-1")
                .port("http", 8080, "TCP")
                .ready_on("10.244.2.6", "node-2")
                .build(),
        ];
        for (node, external, lb) in [
            ("node-1", vec![], vec!["203.0.113.3/32"]),
            (
                "node-2",
                vec!["203.0.113.1/32"],
                vec!["203.0.113.2/32", "203.0.113.3/32"],
            ),
        ] {
            let mut st = ClusterState::new(
                NodeInfo {
                    name: node.into(),
                    addresses: vec![],
                    zone: None,
                },
                ProxyOptions::default(),
            );
            st.replace_services(services.clone());
            st.replace_slices(slices.clone());
            st.update();
            let (e, l) = advertised_ips(st.table());
            let s = |v: Vec<ipnet::Ipv4Net>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
            assert_eq!((s(e), s(l)), (s2(&external), s2(&lb)), "{node}");
        }
    }

    fn s2(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }
}
