//! The async shell of NetworkPolicy: watch every Pod, Namespace and NetworkPolicy of the
//! cluster, and after each change (a burst of changes together) turn them into the [`World`],
//! compile it for this node's pods and write the tables the programs read (a diff: what stays
//! is not touched, so allowed flows keep passing through an update).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use ferrox_datapath::{Maps, PinLayout};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    compile::compile,
    model::{PodInfo, Policy, Protocol, World},
    tables,
};

/// How long a change waits for the ones that follow it before the tables are written.
const COALESCE: Duration = Duration::from_millis(20);

/// Watches `api` into a store; every event wakes `notify`.
fn reflect<K>(api: Api<K>, slim: fn(&mut K), notify: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let kind = K::kind(&()).into_owned();
    tokio::spawn(
        reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(slim),
        )
        .default_backoff()
        .for_each(move |e| {
            match e {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(kind = %kind, error = %e, "policy: watch failed; retrying"),
            }
            futures::future::ready(())
        }),
    );
    store
}

/// What policy keeps of a Pod: the pod as policy sees it and its node. A Pod object is
/// kilobytes even with its fields emptied (every optional field of its spec, containers and
/// status is there); 10,000 of them were most of the agent's memory.
#[derive(Clone, Debug)]
pub struct PodEntry {
    pub info: PodInfo,
    pub node: Option<String>,
}

impl PodEntry {
    /// `None` for a pod policy does not see (see [`pod_info`]).
    pub fn of(p: &Pod) -> Option<Self> {
        Some(Self {
            info: pod_info(p)?,
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        })
    }
}

/// The pods of the cluster as the watch last listed and then changed them.
#[derive(Default)]
struct PodTable {
    live: BTreeMap<(String, String), PodEntry>,
    /// What a re-list brought so far (it replaces `live` when it ends).
    relisting: Option<BTreeMap<(String, String), PodEntry>>,
}

impl PodTable {
    /// Applies one watch event; true when a list ended (the table is complete).
    fn apply(&mut self, event: watcher::Event<Pod>) -> bool {
        let key = |p: &Pod| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        let put = |table: &mut BTreeMap<_, _>, p: &Pod| match PodEntry::of(p) {
            Some(e) => {
                table.insert(key(p), e);
            }
            None => {
                table.remove(&key(p));
            }
        };
        match event {
            watcher::Event::Apply(p) => put(&mut self.live, &p),
            watcher::Event::Delete(p) => {
                self.live.remove(&key(&p));
            }
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(p) => put(self.relisting.get_or_insert_default(), &p),
            watcher::Event::InitDone => {
                self.live = self.relisting.take().unwrap_or_default();
                return true;
            }
        }
        false
    }
}

/// Watches every Pod into a [`PodTable`] of [`PodEntry`]s; every event wakes `notify`, the
/// first complete list sets `ready`.
fn watch_pods(
    api: Api<Pod>,
    notify: Arc<Notify>,
) -> (
    Arc<std::sync::Mutex<PodTable>>,
    tokio::sync::watch::Receiver<bool>,
) {
    let table = Arc::new(std::sync::Mutex::new(PodTable::default()));
    let (ready, listed) = tokio::sync::watch::channel(false);
    let t = table.clone();
    tokio::spawn(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .for_each(move |e| {
                match e {
                    Ok(event) => {
                        let complete = t
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .apply(event);
                        if complete {
                            ready.send_replace(true);
                        }
                        notify.notify_one();
                    }
                    Err(e) => warn!(kind = "Pod", error = %e, "policy: watch failed; retrying"),
                }
                futures::future::ready(())
            }),
    );
    (table, listed)
}

fn slim_meta<K: kube::Resource>(o: &mut K) {
    let m = o.meta_mut();
    m.managed_fields = None;
    m.annotations = None;
}

/// A pod as policy sees it: `None` for a pod with no IPv4 address yet, one on the host's
/// network (it has the node's address, which no policy selects) or one that finished.
pub fn pod_info(p: &Pod) -> Option<PodInfo> {
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip = status
        .pod_ips
        .iter()
        .flatten()
        .map(|a| a.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find_map(|a| a.parse::<Ipv4Addr>().ok())?;
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| {
            let name = port.name.clone()?;
            let protocol = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP")).ok()?;
            Some((name, protocol, u16::try_from(port.container_port).ok()?))
        })
        .collect();
    Some(PodInfo {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ip,
        named_ports,
    })
}

/// The world of these objects, and the local pods (`namespace/name` -> address) of `node`.
/// Policies the API server would have refused are left out and returned as errors.
pub fn world_of<'a>(
    pods: impl IntoIterator<Item = &'a PodEntry>,
    namespaces: &[Arc<Namespace>],
    policies: &[Arc<NetworkPolicy>],
    node: &str,
) -> (World, BTreeMap<String, Ipv4Addr>, Vec<(String, String)>) {
    let mut world = World::default();
    let mut local = BTreeMap::new();
    for p in pods {
        if p.node.as_deref() == Some(node) {
            local.insert(format!("{}/{}", p.info.namespace, p.info.name), p.info.ip);
        }
        world.pods.push(p.info.clone());
    }
    world
        .pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for ns in namespaces {
        world.namespaces.insert(
            ns.metadata.name.clone().unwrap_or_default(),
            ns.metadata.labels.clone().unwrap_or_default(),
        );
    }
    let mut errors = Vec::new();
    for np in policies {
        match Policy::from_api(np) {
            Ok(p) => world.policies.push(p),
            Err(e) => errors.push((
                format!(
                    "{}/{}",
                    np.metadata.namespace.as_deref().unwrap_or_default(),
                    np.metadata.name.as_deref().unwrap_or_default()
                ),
                e,
            )),
        }
    }
    world.policies.sort_by_key(Policy::id);
    (world, local, errors)
}

/// Keeps this node's policy tables in step with the API, until the process ends.
pub async fn run(client: Client, node: String, layout: PinLayout, node_config: std::path::PathBuf) {
    let notify = Arc::new(Notify::new());
    let (pods, mut pods_listed) = watch_pods(Api::<Pod>::all(client.clone()), notify.clone());
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        slim_meta,
        notify.clone(),
    );
    let policies = reflect(Api::<NetworkPolicy>::all(client), slim_meta, notify.clone());
    let ready = async {
        pods_listed
            .wait_for(|listed| *listed)
            .await
            .map_err(|_| anyhow::anyhow!("the Pod watch ended"))?;
        namespaces.wait_until_ready().await?;
        policies.wait_until_ready().await?;
        anyhow::Ok(())
    };
    if let Err(e) = ready.await {
        warn!(error = %e, "policy: the watches ended; NetworkPolicy is not enforced");
        return;
    }
    let mut maps = loop {
        match Maps::open(&layout) {
            Ok(m) => break m,
            Err(e) => {
                warn!(error = %e, "policy: opening the maps failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let started = Instant::now();
        let (world, local, errors) = {
            let pods = pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            world_of(
                pods.live.values(),
                &namespaces.state(),
                &policies.state(),
                &node,
            )
        };
        for (id, e) in &errors {
            if reported.get(id) != Some(e) {
                warn!(policy = %id, error = %e, "NetworkPolicy refused (the API server would have): ignored");
            }
        }
        for p in &world.policies {
            for u in &p.unsupported {
                let key = format!("{}: {u}", p.id());
                if !reported.contains_key(&key) {
                    warn!(policy = %p.id(), what = %u, "NetworkPolicy: part of it cannot be enforced (it allows less)");
                }
            }
        }
        reported = errors
            .iter()
            .cloned()
            .chain(world.policies.iter().flat_map(|p| {
                p.unsupported
                    .iter()
                    .map(|u| (format!("{}: {u}", p.id()), String::new()))
            }))
            .collect();
        let report = super::report::PolicyReport::new(&world, &local, &errors);
        let report_path = super::report::PolicyReport::path(&node_config);
        if let Err(e) = report.write(&report_path) {
            warn!(path = %report_path.display(), error = %e, "policy: writing the report failed");
        }
        let names: Vec<String> = local.keys().cloned().collect();
        let compiled = compile(&world, &names);
        match tables::write(&mut maps, &compiled, &local) {
            Ok(w) if w == tables::Written::default() => {
                debug!(elapsed = ?started.elapsed(), "policy: tables unchanged");
            }
            Ok(w) => info!(
                policies = world.policies.len(),
                pods = world.pods.len(),
                isolated = compiled.endpoints.len(),
                written = ?w,
                elapsed = ?started.elapsed(),
                "policy: tables written"
            ),
            Err(e) => {
                warn!(error = %e, "policy: writing the tables failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        drop((world, compiled, report));
        crate::heap::give_back_free_memory();
        notify.notified().await;
        tokio::time::sleep(COALESCE).await;
    }
}

/// Empties this node's policy tables (NetworkPolicy turned off: nothing a previous run wrote
/// may go on isolating pods).
pub fn clear(layout: &PinLayout) -> anyhow::Result<()> {
    let mut maps = Maps::open(layout)?;
    let w = tables::write(
        &mut maps,
        &super::compile::Compiled::default(),
        &BTreeMap::new(),
    )?;
    if w != tables::Written::default() {
        info!(removed = ?w, "NetworkPolicy off: the policy tables emptied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, ip: Option<&str>, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("x".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn names(t: &PodTable) -> Vec<String> {
        t.live.values().map(|e| e.info.name.clone()).collect()
    }

    #[test]
    fn the_pod_table_follows_events_and_a_relist_replaces_it() {
        let mut t = PodTable::default();
        assert!(!t.apply(watcher::Event::Init));
        t.apply(watcher::Event::InitApply(pod(
            "a",
            Some("10.0.0.1"),
            "Running",
        )));
        t.apply(watcher::Event::InitApply(pod("pending", None, "Pending")));
        assert!(names(&t).is_empty(), "nothing before the list ends");
        assert!(t.apply(watcher::Event::InitDone));
        assert_eq!(names(&t), ["a"], "a pod without an address is not kept");
        assert_eq!(
            t.live.values().next().unwrap().node.as_deref(),
            Some("node-1")
        );
        t.apply(watcher::Event::Apply(pod("b", Some("10.0.0.2"), "Running")));
        t.apply(watcher::Event::Apply(pod(
            "pending",
            Some("10.0.0.3"),
            "Running",
        )));
        assert_eq!(names(&t), ["a", "b", "pending"]);
        t.apply(watcher::Event::Apply(pod(
            "b",
            Some("10.0.0.2"),
            "Succeeded",
        )));
        assert_eq!(names(&t), ["a", "pending"], "a finished pod goes");
        t.apply(watcher::Event::Delete(pod(
            "pending",
            Some("10.0.0.3"),
            "Running",
        )));
        assert_eq!(names(&t), ["a"]);
        // The watch restarts; a pod deleted meanwhile is gone once the new list ends.
        t.apply(watcher::Event::Init);
        t.apply(watcher::Event::InitApply(pod(
            "c",
            Some("10.0.0.4"),
            "Running",
        )));
        assert_eq!(
            names(&t),
            ["a"],
            "the previous list stands until the new one ends"
        );
        assert!(t.apply(watcher::Event::InitDone));
        assert_eq!(names(&t), ["c"]);
    }
}
