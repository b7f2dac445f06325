//! Routing between nodes: every other node's pod blocks get a kernel route on this node, and in
//! the IP-in-IP modes a tunnel entry the datapath encapsulates with (see
//! `ebpf/programs/src/tunnel.rs`).
//!
//! The blocks come from the Kubernetes API: each Node's `spec.podCIDRs` and, with `--ipam
//! pools`, the `IPAMBlock` objects naming it, reached at the Node's InternalIP. (BGP, issue #5,
//! will be a second source for the same plan.) [`plan`] turns them into what the node must hold,
//! purely; [`kernel`] makes the kernel and the maps hold exactly that, removing what an earlier
//! run left and the plan no longer wants. The first apply happens before the node configuration
//! is written, so a pod never starts on a node that cannot reach the others.

pub mod kernel;
pub mod plan;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ferrox_cni::{netlink::Netlink, node_config::TunnelMode};
use ferrox_datapath::{Maps, PinLayout};
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::observability::{metrics::Metrics, status::RoutingStatus};
use plan::{LocalNode, Plan, RemoteBlock};

/// What routing needs to know about this node and how to run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: plan::Modes,
    pub local: LocalNode,
    pub uplink: String,
    pub uplink_index: u32,
    /// IPAM blocks are watched too (`--ipam pools`).
    pub ipam_blocks: bool,
    pub layout: PinLayout,
    /// Best routes from the BGP speaker, when it runs.
    pub bgp: Option<watch::Receiver<BTreeMap<Ipv4Net, crate::bgp::rib::Best>>>,
    /// The BGP speaker's peers follow the Nodes: every other node is an iBGP peer (full mesh),
    /// besides the configured ones.
    pub mesh: Option<Mesh>,
    /// After an agent restart, the routes of ours found at start are kept even when the plan
    /// does not name them (the BGP sessions re-learn them, as graceful restart intends), until
    /// every BGP peer has sent End-of-RIB, this time at most. Then what no peer announced again
    /// goes. A route the plan named once in this run (learned again, or from the API) is no
    /// longer kept: its withdrawal takes effect at once.
    pub keep_until: Option<Instant>,
}

/// Who the BGP speaker peers with: the configured routers (flags and `BGPPeer` objects) and, in
/// a full mesh, every other node.
#[derive(Clone)]
pub struct Mesh {
    pub speaker: crate::bgp::speaker::Speaker,
    /// Peers from the command line, kept as they are.
    pub external: Vec<crate::bgp::speaker::Peer>,
    /// iBGP with every other Node.
    pub mesh: bool,
    pub asn: u32,
    pub port: u16,
    /// The mesh's MD5 key (`<password dir>/mesh`), if any.
    pub password: Option<String>,
    pub password_dir: std::path::PathBuf,
    /// The most prefixes a peer may announce, for peers without a limit of their own.
    pub max_prefixes: Option<u32>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("asn", &self.asn)
            .finish_non_exhaustive()
    }
}

/// `never`, `always`, `cross-subnet`.
pub fn mode_name(mode: &TunnelMode) -> &'static str {
    match mode {
        TunnelMode::Never => "never",
        TunnelMode::Always => "always",
        TunnelMode::CrossSubnet => "cross-subnet",
    }
}

/// The default mode and the pools' (`never, 10.250.0.0/16=always`).
pub fn modes_name(modes: &plan::Modes) -> String {
    std::iter::once(mode_name(&modes.default).to_owned())
        .chain(
            modes
                .pools
                .iter()
                .map(|(p, m)| format!("{p}={}", mode_name(m))),
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// The underlay subnet of `addr` on `uplink`, from the interface's addresses; a /32 when no
/// address covers it (every node is then "in another subnet").
pub fn uplink_subnet(nl: &Netlink, uplink: u32, addr: Ipv4Addr) -> anyhow::Result<Ipv4Net> {
    let subnet = nl
        .list_addresses(uplink)
        .context("listing the uplink's addresses")?
        .into_iter()
        .filter_map(|a| match a {
            ipnet::IpNet::V4(n) if n.contains(&addr) => Some(n.trunc()),
            _ => None,
        })
        .max_by_key(|n| n.prefix_len());
    Ok(subnet.unwrap_or_else(|| Ipv4Net::from(addr)))
}

/// A node's address (first IPv4 InternalIP, else ExternalIP) and pod blocks.
fn node_blocks(n: &Node) -> Option<(String, Ipv4Addr, Vec<Ipv4Net>)> {
    let name = n.metadata.name.clone()?;
    let addrs = n.status.as_ref()?.addresses.as_ref()?;
    let addr = ["InternalIP", "ExternalIP"].iter().find_map(|t| {
        addrs
            .iter()
            .filter(|a| a.type_ == *t)
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
    })?;
    let spec = n.spec.as_ref();
    let mut cidrs: Vec<Ipv4Net> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    cidrs.sort();
    Some((name, addr, cidrs))
}

/// The remote blocks and peer addresses the API holds now.
fn blocks_from(
    nodes: &[Arc<Node>],
    ipam: &[Arc<DynamicObject>],
) -> (Vec<RemoteBlock>, Vec<Ipv4Addr>) {
    let mut addr_of = BTreeMap::new();
    let mut blocks = Vec::new();
    for n in nodes {
        if let Some((name, addr, cidrs)) = node_blocks(n) {
            for prefix in cidrs {
                blocks.push(RemoteBlock {
                    prefix,
                    node: name.clone(),
                    node_addr: addr,
                    external: false,
                });
            }
            addr_of.insert(name, addr);
        }
    }
    for o in ipam {
        let Some(spec) = o.data.get("spec") else {
            continue;
        };
        let (Some(cidr), Some(node)) = (
            spec.get("cidr")
                .and_then(|c| c.as_str())
                .and_then(|c| c.parse().ok()),
            spec.get("node").and_then(|n| n.as_str()),
        ) else {
            continue;
        };
        if let Some(addr) = addr_of.get(node) {
            blocks.push(RemoteBlock {
                prefix: cidr,
                node: node.to_owned(),
                node_addr: *addr,
                external: false,
            });
        }
    }
    (blocks, addr_of.into_values().collect())
}

/// Computes the plan for what the API holds and programs it. `kept`: the routes found at start
/// still kept (see [`Settings::keep_until`]), shrinking; `api_listed`: the watches had listed
/// everything when routing started (so the BGP peers known are all there are).
fn program(
    settings: &Settings,
    kept: &mut std::collections::BTreeSet<Ipv4Net>,
    api_listed: bool,
    nl: &Netlink,
    maps: &mut Maps,
    (nodes, ipam, bgp_peers): &Snapshot,
    metrics: &Metrics,
) -> anyhow::Result<Plan> {
    let (mut blocks, peers) = blocks_from(nodes, ipam);
    if let Some(mesh) = &settings.mesh {
        let mut wanted = mesh.external.clone();
        for o in bgp_peers {
            match crate::bgp::peers::peer_from_object(
                o,
                &settings.local.name,
                mesh.port,
                &mesh.password_dir,
            ) {
                Ok(Some(mut p)) if !wanted.iter().any(|w| w.addr == p.addr) => {
                    p.max_prefixes = p.max_prefixes.or(mesh.max_prefixes);
                    wanted.push(p);
                }
                Ok(_) => {}
                Err(e) => warn!(peer = ?o.metadata.name, error = %e, "BGPPeer not used"),
            }
        }
        // Full mesh: every other node. Without it, route reflectors (Nodes with a cluster ID)
        // peer with every other node and the rest only with the reflectors.
        let cluster_of = |n: &Node| match crate::bgp::peers::rr_cluster_id(
            n.metadata.annotations.as_ref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!(node = ?n.metadata.name, error = %e, "route reflector annotation ignored");
                None
            }
        };
        let own_cluster = if mesh.mesh {
            None
        } else {
            nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(settings.local.name.as_str()))
                .and_then(|n| cluster_of(n))
        };
        for n in nodes {
            let their_cluster = if mesh.mesh { None } else { cluster_of(n) };
            if !mesh.mesh && own_cluster.is_none() && their_cluster.is_none() {
                continue;
            }
            if let Some((name, addr, _)) = node_blocks(n)
                && addr != settings.local.addr
                && !wanted.iter().any(|p| p.addr == addr)
            {
                wanted.push(crate::bgp::speaker::Peer {
                    name,
                    addr,
                    asn: mesh.asn,
                    port: mesh.port,
                    passive: false,
                    password: mesh.password.clone(),
                    hold_time: None,
                    max_prefixes: mesh.max_prefixes,
                    rr_client: own_cluster.is_some() && their_cluster.is_none(),
                    export: crate::bgp::speaker::Export::default(),
                });
            }
        }
        mesh.speaker.set_peers(&wanted, own_cluster);
    }
    if let Some(bgp) = &settings.bgp {
        for (prefix, best) in bgp.borrow().iter() {
            for nh in &best.next_hops {
                blocks.push(RemoteBlock {
                    prefix: *prefix,
                    node: format!("bgp:{}", best.peers.first().copied().unwrap_or(*nh)),
                    node_addr: *nh,
                    external: !peers.contains(nh),
                });
            }
        }
    }
    let started = Instant::now();
    let underlay = nl
        .list_routes(ferrox_cni::netlink::MAIN_TABLE)
        .context("listing routes")?;
    let listed = started.elapsed();
    let (ours, foreign): (Vec<_>, Vec<_>) = underlay
        .into_iter()
        .partition(|r| r.protocol == kernel::ROUTE_PROTOCOL);
    // The gateway towards each next hop, looked up once per address (100,000 learned routes
    // share a handful of next hops).
    let mut hops: std::collections::HashMap<Ipv4Addr, Option<Ipv4Addr>> = Default::default();
    let mut plan = plan::plan(&settings.local, &settings.mode, &blocks, &peers, |a| {
        *hops
            .entry(a)
            .or_insert_with(|| kernel::underlay_next_hop(&foreign, a))
    });
    // Never replace a route someone else owns (the node's default route, a static route): a
    // route is replaced by destination, whoever installed it.
    let taken: std::collections::BTreeSet<Ipv4Net> = foreign.iter().map(|r| r.dst).collect();
    plan.routes.retain(|prefix, r| {
        if taken.contains(prefix) {
            plan.unroutable.push(plan::Unroutable {
                prefix: *prefix,
                node: r.nodes.join(","),
                reason: "another route to it exists (not ferrox's)".into(),
            });
            plan.tunnels.remove(prefix);
            false
        } else {
            true
        }
    });
    for u in &plan.unroutable {
        warn!(block = %u.prefix, node = %u.node, reason = %u.reason, "pod block not routed");
    }
    // Routes found at start: kept until the plan names them (from then on they follow the
    // plan: a withdrawal removes them at once), until every BGP peer has sent End-of-RIB (what
    // none announced again is gone for good), or until the time runs out.
    let until = if settings.keep_until.is_none_or(|t| Instant::now() >= t) {
        plan::KeptUntil::Expired
    } else if api_listed && settings.mesh.as_ref().is_none_or(|m| m.speaker.synced()) {
        plan::KeptUntil::Synced
    } else {
        plan::KeptUntil::Waiting
    };
    let given_up = plan::still_kept(kept, &plan, until);
    if given_up > 0 {
        info!(
            routes = given_up,
            reason = ?until,
            "routing: routes kept over the restart and announced by no peer since are removed"
        );
    }
    let keep = kept.clone();
    let planned = started.elapsed();
    let existing = ours.into_iter().map(|r| (r.dst, r)).collect();
    let result = kernel::apply(nl, maps, &plan, settings.uplink_index, &keep, &existing);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    let status = RoutingStatus {
        mode: modes_name(&settings.mode),
        source: if settings.bgp.is_some() {
            "kubernetes+bgp"
        } else {
            "kubernetes"
        }
        .into(),
        routes: plan.routes.len(),
        tunnels: plan.tunnels.len(),
        peers: plan.peers.len(),
        unroutable: plan
            .unroutable
            .iter()
            .map(|u| format!("{} ({}): {}", u.prefix, u.node, u.reason))
            .collect(),
        applied_unix: now,
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    };
    metrics.routing(status, result.is_ok());
    let applied = result?;
    if !applied.is_empty() {
        info!(
            ?applied,
            routes = plan.routes.len(),
            tunnels = plan.tunnels.len(),
            list_ms = listed.as_secs_f64() * 1e3,
            plan_ms = (planned - listed).as_secs_f64() * 1e3,
            apply_ms = (started.elapsed() - planned).as_secs_f64() * 1e3,
            "routes programmed"
        );
    }
    Ok(plan)
}

/// The watched objects.
struct Stores {
    nodes: Store<Node>,
    ipam: Option<Store<DynamicObject>>,
    bgp_peers: Option<Store<DynamicObject>>,
}

/// What the watches hold: Nodes, IPAM blocks, BGP peers.
type Snapshot = (
    Vec<Arc<Node>>,
    Vec<Arc<DynamicObject>>,
    Vec<Arc<DynamicObject>>,
);

impl Stores {
    fn snapshot(&self) -> Snapshot {
        (
            self.nodes.state(),
            self.ipam.as_ref().map(Store::state).unwrap_or_default(),
            self.bgp_peers
                .as_ref()
                .map(Store::state)
                .unwrap_or_default(),
        )
    }
}

/// Watches objects of a custom resource into a store; every event wakes `notify`.
fn watch_dynamic(
    client: &Client,
    ar: kube::api::ApiResource,
    notify: Arc<tokio::sync::Notify>,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let reader = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let kind = ar.kind.clone();
    tokio::spawn(
        reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .for_each(move |e| {
                match e {
                    Ok(_) => notify.notify_one(),
                    Err(e) => warn!(kind = %kind, error = %e, "routing: watch failed; retrying"),
                }
                futures::future::ready(())
            }),
    );
    reader
}

/// Starts the watches; every event wakes `notify`.
fn watch_api(
    client: &Client,
    ipam_blocks: bool,
    bgp: bool,
    notify: Arc<tokio::sync::Notify>,
) -> Stores {
    let (nodes, writer) = reflector::store::<Node>();
    let n = notify.clone();
    tokio::spawn(
        reflector::reflector(
            writer,
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                .modify(crate::services::slim::node),
        )
        .default_backoff()
        .for_each(move |e| {
            match e {
                Ok(_) => n.notify_one(),
                Err(e) => warn!(error = %e, "routing: Node watch failed; retrying"),
            }
            futures::future::ready(())
        }),
    );
    let ipam =
        ipam_blocks.then(|| watch_dynamic(client, crate::ipam::block_resource(), notify.clone()));
    let bgp_peers =
        bgp.then(|| watch_dynamic(client, crate::bgp::peers::peer_resource(), notify.clone()));
    Stores {
        nodes,
        ipam,
        bgp_peers,
    }
}

/// Programs the routes once the watches have listed everything (bounded by `timeout`), then keeps
/// them in step with the API in a spawned task.
pub async fn start(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    timeout: Duration,
) -> anyhow::Result<()> {
    let notify = Arc::new(tokio::sync::Notify::new());
    let stores = watch_api(
        &client,
        settings.ipam_blocks,
        settings.mesh.is_some(),
        notify.clone(),
    );
    if let Some(mut rx) = settings.bgp.clone() {
        let n = notify.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                n.notify_one();
            }
        });
    }
    let ready = async {
        stores.nodes.wait_until_ready().await?;
        for s in [&stores.ipam, &stores.bgp_peers].into_iter().flatten() {
            s.wait_until_ready().await?;
        }
        Ok::<_, reflector::store::WriterDropped>(())
    };
    let api_listed = match tokio::time::timeout(timeout, ready).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => anyhow::bail!("routing watches ended: {e}"),
        Err(_) => {
            warn!(
                ?timeout,
                "routing: the API did not list Nodes in time; routes follow when it does"
            );
            false
        }
    };
    if let Some(mut rx) = settings.mesh.as_ref().map(|m| m.speaker.sync_changes()) {
        let n = notify.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                n.notify_one();
            }
        });
    }
    let nl = Netlink::open().context("opening rtnetlink")?;
    let mut maps = Maps::open(&settings.layout).context("opening the datapath maps")?;
    let mut kept: std::collections::BTreeSet<Ipv4Net> =
        kernel::owned_routes(&nl)?.into_keys().collect();
    let api = stores.snapshot();
    let started = Instant::now();
    match program(
        &settings, &mut kept, api_listed, &nl, &mut maps, &api, &metrics,
    ) {
        Ok(plan) => info!(
            mode = modes_name(&settings.mode),
            routes = plan.routes.len(),
            tunnels = plan.tunnels.len(),
            peers = plan.peers.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "routing programmed"
        ),
        Err(e) => warn!(error = %format!("{e:#}"), "routing: programming failed; retrying"),
    }
    tokio::spawn(async move {
        loop {
            // A change, a periodic check that repairs what someone else changed, or the end of
            // the time stale routes are kept.
            let check = match settings.keep_until {
                Some(t) if !kept.is_empty() && Instant::now() < t => {
                    t.saturating_duration_since(Instant::now())
                }
                _ => Duration::from_secs(30),
            };
            let _ = tokio::time::timeout(check, notify.notified()).await;
            let api = stores.snapshot();
            // Programming 100,000 routes takes a while: the runtime's other tasks (BGP
            // sessions, /metrics) move to another thread meanwhile.
            let result = tokio::task::block_in_place(|| {
                program(
                    &settings, &mut kept, api_listed, &nl, &mut maps, &api, &metrics,
                )
            });
            if let Err(e) = result {
                warn!(error = %format!("{e:#}"), "routing: programming failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    Ok(())
}
