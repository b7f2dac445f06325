//! The async shell around the pure service logic: watch Services and EndpointSlices through the
//! Kubernetes API, and on every change recompute the desired table and reconcile the maps.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::{
    desired::desired,
    model::{NodeInfo, ProxyOptions},
    reconcile::{NodeMaps, Reconciler, SyncReport},
};
use crate::health::Health;

/// Spawns a reflector for `K` that wakes `notify` on every event, and returns its store.
fn watch<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream = reflector(writer, watcher(api, config))
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(kind = %kind, error = %e, "watch failed; retrying with backoff"),
            }
            futures::future::ready(())
        });
    tokio::spawn(stream);
    reader
}

/// What the service sync needs to know besides the API objects.
#[derive(Clone, Debug)]
pub struct SyncConfig {
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
pub async fn run(
    client: Client,
    mut maps: NodeMaps,
    config: SyncConfig,
    health: Health,
) -> anyhow::Result<()> {
    let notify = Arc::new(Notify::new());
    let services = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let this_node = watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
        notify.clone(),
    );
    services.wait_until_ready().await?;
    slices.wait_until_ready().await?;
    this_node.wait_until_ready().await?;
    info!("service, endpointslice and node caches synced");

    let mut reconciler = Reconciler::load(&maps)?;
    let (frontends, backends) = reconciler.size();
    info!(frontends, backends, "adopted the programmed service table");

    loop {
        let svc_state = services.state();
        let slice_state = slices.state();
        let node = node_info(
            &config.node_name,
            this_node.state().first().map(AsRef::as_ref),
        );
        let started = std::time::Instant::now();
        let table = desired(
            svc_state.iter().map(AsRef::as_ref),
            slice_state.iter().map(AsRef::as_ref),
            &node,
            &config.options,
        );
        let report = reconciler.sync(&table, &mut maps);
        log_report(&report, table.skipped.len(), started.elapsed());
        health.set_checks(&table.health_checks);
        health.synced();
        for s in &table.skipped {
            debug!(service = %format!("{}/{}", s.namespace, s.name), reason = ?s.reason, "service not programmed");
        }
        // Events that arrive while syncing leave one permit: they coalesce into the next sync.
        notify.notified().await;
    }
}

fn log_report(report: &SyncReport, skipped: usize, took: std::time::Duration) {
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
            skipped,
            took_us = took.as_micros() as u64,
            "service maps synced"
        );
    }
}
