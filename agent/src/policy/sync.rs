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

/// What the policy code keeps of a Pod.
fn slim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    if let Some(spec) = &mut p.spec {
        spec.volumes = None;
        spec.init_containers = None;
        for c in &mut spec.containers {
            c.env = None;
            c.volume_mounts = None;
            c.args = None;
            c.command = None;
        }
    }
    if let Some(status) = &mut p.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
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
pub fn world_of(
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    policies: &[Arc<NetworkPolicy>],
    node: &str,
) -> (World, BTreeMap<String, Ipv4Addr>, Vec<(String, String)>) {
    let mut world = World::default();
    let mut local = BTreeMap::new();
    for p in pods {
        let Some(info) = pod_info(p) else {
            continue;
        };
        if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node) {
            local.insert(format!("{}/{}", info.namespace, info.name), info.ip);
        }
        world.pods.push(info);
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
    let pods = reflect(Api::<Pod>::all(client.clone()), slim_pod, notify.clone());
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        slim_meta,
        notify.clone(),
    );
    let policies = reflect(Api::<NetworkPolicy>::all(client), slim_meta, notify.clone());
    let ready = async {
        pods.wait_until_ready().await?;
        namespaces.wait_until_ready().await?;
        policies.wait_until_ready().await
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
        let (world, local, errors) =
            world_of(&pods.state(), &namespaces.state(), &policies.state(), &node);
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
