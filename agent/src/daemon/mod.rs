//! `ferrox agent`: the node daemon's start-up and shutdown.
//!
//! Order matters: the datapath is loaded (or re-adopted) and attached first, the node
//! configuration for the CNI plugin is written only once that is done, then the service maps
//! are kept in sync with the API until SIGTERM. On exit everything stays pinned and attached, so
//! traffic goes on while the agent restarts.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use ferrox_cni::node_config::{IpamMode, NodeConfig, SCHEMA_VERSION};
use ferrox_datapath::{Datapath, PinLayout, XdpAttachMode};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, Config, config::KubeConfigOptions};
use tracing::{info, warn};

pub mod args;
pub mod node;

use args::{AgentArgs, IpamSetting, XdpSetting};

use crate::{observability, services};

pub async fn run(args: AgentArgs, layout: PinLayout) -> anyhow::Result<()> {
    if args.cleanup {
        return cleanup(&args, &layout);
    }

    let sizing = args.sizing().context("sizing the maps")?;
    let mut dp = Datapath::open_with(&layout, &sizing).context("loading the datapath")?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => node::cgroup2_mount()?,
    };
    for a in dp
        .attach_cgroup(&cgroup)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?
    {
        info!(program = a.program, link_id = a.link_id, outcome = ?a.outcome, cgroup = %cgroup.display(), "socket hook");
    }
    let uplink = match &args.uplink {
        Some(u) => u.clone(),
        None => node::default_route_interface()?,
    };
    for a in dp
        .attach_uplink(&uplink)
        .with_context(|| format!("attaching to uplink {uplink}"))?
    {
        info!(program = a.program, link_id = a.link_id, outcome = ?a.outcome, uplink = %uplink, "uplink hook");
    }
    let xdp_mode = match args.xdp {
        XdpSetting::Off => None,
        XdpSetting::Native => Some(XdpAttachMode::Native),
        XdpSetting::Generic => Some(XdpAttachMode::Generic),
    };
    match xdp_mode {
        Some(mode) => {
            let a = dp
                .attach_uplink_xdp(&uplink, mode)
                .with_context(|| format!("attaching XDP ({mode:?}) to {uplink}"))?;
            info!(program = a.program, link_id = a.link_id, outcome = ?a.outcome, uplink = %uplink, ?mode, "uplink XDP");
        }
        None => {
            if dp.detach_uplink_xdp()? {
                info!(uplink = %uplink, "XDP is off: removed the uplink's XDP program");
            }
        }
    }
    let pods = dp
        .update_pod_links()
        .context("moving pod links to the current program")?;
    info!(
        updated = pods.updated.len(),
        current = pods.current.len(),
        "pod hooks run the current program"
    );
    if !pods.defunct.is_empty() {
        warn!(links = ?pods.defunct, "pod link pins whose interface is gone (removed without CNI DEL)");
    }
    // Every hook runs the current programs now: the previous conntrack map can go.
    let finished = dp
        .finish_upgrade()
        .context("finishing the datapath upgrade")?;
    if let Some(c) = finished.conntrack_v1 {
        info!(
            copied = c.copied,
            present = c.present,
            failed = c.failed,
            "upgrade finished: flows carried into the current conntrack map, the previous one unpinned"
        );
    }
    for l in &finished.leftovers {
        info!(map = %l.map, merged = ?l.merged, "resize finished: the previous map's flows merged, the previous map unpinned");
    }
    info!(origin = ?dp.origin(), "datapath attached");

    let client = kube_client(args.kubeconfig.as_deref(), args.k8s_api_server.as_deref()).await?;
    let node = wait_for_node(&client, &args.node_name).await;
    let ipam = match args.ipam {
        IpamSetting::Kubernetes => None,
        IpamSetting::Pools => {
            anyhow::ensure!(
                !args.ipam_pool.is_empty(),
                "--ipam pools needs at least one --ipam-pool"
            );
            let settings = crate::ipam::Settings {
                pools: crate::ipam::Pools {
                    pools: args.ipam_pool.clone(),
                    block_prefix: args.ipam_block_size,
                },
                low_water: args.ipam_low_water,
                release_after: Duration::from_secs(args.ipam_release_after),
                interval: Duration::from_secs(1),
            };
            let blocks = crate::ipam::initial_blocks(&client, &settings, &args.node_name).await?;
            Some((settings, blocks))
        }
    };
    let pod_cidrs = match &ipam {
        Some((_, blocks)) => blocks.iter().map(|b| b.cidr).collect(),
        None if args.pod_cidr.is_empty() => node_pod_cidrs(&node)?,
        None => args.pod_cidr.clone(),
    };
    let uplink_mtu = node::interface_mtu(&uplink)?;
    let tunnel_mode = args.tunnel_mode.mode();
    let modes = crate::routing::plan::Modes {
        default: tunnel_mode.clone(),
        pools: args.tunnel_mode_pool.clone(),
    };
    let mtu = match args.mtu {
        Some(m) => m,
        None => crate::routing::plan::pod_mtu(&modes, uplink_mtu),
    };
    let config = NodeConfig {
        version: SCHEMA_VERSION,
        node_name: args.node_name.clone(),
        pod_cidrs,
        gateway: ferrox_abi::POD_GATEWAY.into(),
        mtu,
        tunnel_mode: tunnel_mode.clone(),
        bpffs_root: layout.root().to_path_buf(),
        ipam_dir: args.ipam_dir.clone(),
        ipam_mode: if ipam.is_some() {
            IpamMode::Pools
        } else {
            IpamMode::Kubernetes
        },
    };
    let node_addr = write_datapath_config(&mut dp, &node, &args.node_name, &uplink)?;
    let metrics = observability::metrics::Metrics::default();
    let mut advertise = None;
    if args.routes {
        match node_addr {
            Some(addr) => {
                let uplink_index = ferrox_datapath::ifindex(&uplink)
                    .with_context(|| format!("uplink {uplink}"))?;
                let nl = ferrox_cni::netlink::Netlink::open().context("opening rtnetlink")?;
                let subnet = crate::routing::uplink_subnet(&nl, uplink_index, addr)?;
                let settings = crate::routing::Settings {
                    mode: modes,
                    local: crate::routing::plan::LocalNode {
                        name: args.node_name.clone(),
                        addr,
                        subnet,
                        uplink_mtu,
                        pod_cidrs: config.pod_cidrs.clone(),
                    },
                    uplink: uplink.clone(),
                    uplink_index,
                    ipam_blocks: config.ipam_mode == IpamMode::Pools,
                    layout: layout.clone(),
                    bgp: None,
                    mesh: None,
                    keep_until: None,
                };
                let settings = if args.bgp {
                    let export = crate::bgp::speaker::Export::parse(
                        args.bgp_export.iter().map(String::as_str),
                    )
                    .map_err(|e| anyhow::anyhow!("--bgp-{e}"))?;
                    let mut peers = args
                        .bgp_peers
                        .iter()
                        .map(|p| crate::bgp::peers::parse_peer(p, args.bgp_port, export))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let max_prefixes = (args.bgp_max_prefixes > 0).then_some(args.bgp_max_prefixes);
                    for p in &mut peers {
                        p.password = crate::bgp::peers::password(&args.bgp_password_dir, &p.name)?;
                        p.max_prefixes = max_prefixes;
                    }
                    // This node's blocks (pools mode: the blocks at start; later claims are
                    // announced from the next start on), the ClusterIP range, and the
                    // Service addresses the service sync keeps up to date.
                    let (exports_tx, exports) =
                        tokio::sync::watch::channel(crate::bgp::speaker::Exports {
                            pod_blocks: config.pod_cidrs.clone(),
                            cluster_ips: args.bgp_service_cluster_ips.clone(),
                            ..Default::default()
                        });
                    let (speaker, learned) = crate::bgp::speaker::start(
                        crate::bgp::speaker::Config {
                            asn: args.bgp_as,
                            router_id: addr,
                            listen: std::net::SocketAddr::from(([0, 0, 0, 0], args.bgp_port)),
                            hold_time: args.bgp_hold_time,
                            restart_time: args.bgp_restart_time,
                            connect_retry: Duration::from_secs(args.bgp_connect_retry.max(1)),
                            max_prefixes_restart: Duration::from_secs(
                                args.bgp_max_prefixes_restart,
                            ),
                            next_hop: addr,
                        },
                        peers.clone(),
                        exports,
                    )
                    .await?;
                    info!(
                        asn = args.bgp_as,
                        peers = args.bgp_peers.len(),
                        "BGP speaker started"
                    );
                    // The exports channel lives as long as the agent (its sessions end with it).
                    advertise = Some(std::sync::Arc::new(exports_tx));
                    metrics.set_bgp(speaker.clone());
                    let mesh_password =
                        crate::bgp::peers::password(&args.bgp_password_dir, "mesh")?;
                    crate::routing::Settings {
                        bgp: Some(learned),
                        mesh: Some(crate::routing::Mesh {
                            speaker,
                            external: peers,
                            mesh: args.bgp_mesh,
                            asn: args.bgp_as,
                            port: args.bgp_port,
                            password: mesh_password,
                            password_dir: args.bgp_password_dir.clone(),
                            max_prefixes,
                        }),
                        // The routes found at start are kept until every peer has sent
                        // End-of-RIB, this long at most (RFC 4724's selection deferral).
                        keep_until: Some(
                            std::time::Instant::now()
                                + Duration::from_secs(u64::from(args.bgp_restart_time)),
                        ),
                        ..settings
                    }
                } else {
                    settings
                };
                crate::routing::start(
                    client.clone(),
                    settings,
                    metrics.clone(),
                    Duration::from_secs(10),
                )
                .await?;
            }
            None => warn!(
                node = %args.node_name,
                "the Node has no IPv4 address: routes to other nodes are not programmed"
            ),
        }
    }
    config.write(&args.node_config)?;
    info!(path = %args.node_config.display(), pod_cidrs = ?config.pod_cidrs, mtu, "node configuration written; CNI ready");

    tokio::spawn(crate::ipam::leaks::collect_leaks(
        client.clone(),
        args.node_name.clone(),
        args.node_config.clone(),
        Duration::from_secs(args.ipam_gc_interval.max(1)),
        Duration::from_secs(args.ipam_leak_grace),
    ));
    if let Some((settings, blocks)) = ipam {
        tokio::spawn(crate::ipam::run(
            client.clone(),
            args.node_name.clone(),
            settings,
            blocks,
            config.clone(),
            args.node_config.clone(),
            advertise.clone(),
        ));
    }
    tokio::spawn(metrics.clone().serve(
        args.metrics_bind_address,
        layout.clone(),
        args.node_config.clone(),
    ));
    let agent = metrics.clone();
    tokio::spawn(observability::status::serve(
        observability::status::socket_path(&args.node_config),
        move || agent.status(),
    ));
    tokio::spawn(crate::conntrack::run(
        layout.clone(),
        crate::conntrack::Timeouts {
            tcp: Duration::from_secs(args.ct_tcp_timeout),
            tcp_closing: Duration::from_secs(args.ct_tcp_close_timeout),
            udp: Duration::from_secs(args.ct_udp_timeout),
        },
        Duration::from_secs(args.ct_gc_interval.max(1)),
        metrics.clone(),
    ));
    if args.network_policy {
        tokio::spawn(crate::policy::sync::run(
            client.clone(),
            args.node_name.clone(),
            layout.clone(),
            args.node_config.clone(),
        ));
    } else {
        crate::policy::sync::clear(&layout)?;
    }
    let health = observability::health::Health::default();
    tokio::spawn(health.clone().serve_healthz(args.healthz_bind_address));
    let sync_config = services::sync::SyncConfig {
        advertise,
        node_name: args.node_name.clone(),
        options: services::model::ProxyOptions {
            nodeport_addresses: args.nodeport_addresses.clone(),
        },
    };
    let maps = services::reconcile::NodeMaps::new(dp.into_maps(), &layout)
        .context("opening the Maglev tables")?;
    tokio::select! {
        r = services::sync::run(client, maps, sync_config, health, metrics) => r,
        signal = shutdown_signal() => {
            let _ = std::fs::remove_file(observability::status::socket_path(&args.node_config));
            info!(signal = signal?, "shutting down; the datapath stays pinned and attached");
            Ok(())
        }
    }
}

/// Source ports SNAT of external flows uses: above the kernel's default ephemeral range
/// (32768-60999), so they never collide with the node's own connections.
pub const SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// Tells the programs the node's address (the source of SNATed flows) and uplink.
fn write_datapath_config(
    dp: &mut Datapath,
    node: &Node,
    node_name: &str,
    uplink: &str,
) -> anyhow::Result<Option<std::net::Ipv4Addr>> {
    let info = services::sync::node_info(node_name, Some(node));
    let node_addr = info.addresses.first().copied();
    if node_addr.is_none() {
        warn!(
            node = node_name,
            "the Node has no IPv4 InternalIP/ExternalIP: external flows to remote backends cannot be SNATed and will be dropped"
        );
    }
    if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        let hi: u16 = range
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if hi >= SNAT_PORTS.0 {
            warn!(
                ephemeral_max = hi,
                snat_min = SNAT_PORTS.0,
                "the node's ephemeral ports overlap the SNAT ports; lower net.ipv4.ip_local_port_range"
            );
        }
    }
    let cfg = ferrox_abi::DatapathConfig {
        node_addr: node_addr
            .map(|a| u32::from_ne_bytes(a.octets()))
            .unwrap_or(0),
        uplink_ifindex: ferrox_datapath::ifindex(uplink)?,
        snat_port_min: SNAT_PORTS.0,
        snat_port_max: SNAT_PORTS.1,
        // A `ferrox monitor` may be listening across the agent's restart.
        monitor: dp.maps().config.get().map(|c| c.monitor).unwrap_or(0),
    };
    dp.maps_mut().config.set(&cfg)?;
    dp.maps_mut().host_netns.set(node::netns_cookie()?)?;
    // Backends may have left while no agent ran: every tracked flow checks its own again.
    dp.maps_mut().backends_removed()?;
    info!(node_addr = ?node_addr, uplink, "datapath configuration written");
    Ok(node_addr)
}

/// `ferrox agent --cleanup`: removes pins (detaching every program) and the node configuration.
fn cleanup(args: &AgentArgs, layout: &PinLayout) -> anyhow::Result<()> {
    let report = ferrox_datapath::cleanup(layout)?;
    let _ = std::fs::remove_file(observability::status::socket_path(&args.node_config));
    let _ = std::fs::remove_file(crate::policy::report::PolicyReport::path(&args.node_config));
    match std::fs::remove_file(&args.node_config) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing {}", args.node_config.display()));
        }
    }
    info!(
        links = report.links,
        programs = report.programs,
        maps = report.maps,
        "removed the datapath"
    );
    Ok(())
}

/// The API client: from the kubeconfig, or the pod's service account; `api_server` replaces the
/// server address either gives (a cluster without kube-proxy has no working in-cluster address
/// until ferrox itself runs).
async fn kube_client(
    kubeconfig: Option<&Path>,
    api_server: Option<&str>,
) -> anyhow::Result<Client> {
    let mut config = match (kubeconfig, api_server) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        // The service account's token and CA, without the KUBERNETES_SERVICE_* variables.
        (None, Some(_)) => Config::incluster_dns()
            .context("reading the pod's service account (token, CA) for --k8s-api-server")?,
        (None, None) => Config::infer().await?,
    };
    if let Some(server) = api_server {
        config.cluster_url = server
            .parse()
            .with_context(|| format!("--k8s-api-server {server}"))?;
    }
    info!(api_server = %config.cluster_url, "connecting to the Kubernetes API");
    Ok(Client::try_from(config)?)
}

/// Gets this node's Node object, retrying (with a capped backoff) until the API answers.
async fn wait_for_node(client: &Client, name: &str) -> Node {
    let api = Api::<Node>::all(client.clone());
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match api.get(name).await {
            Ok(node) => return node,
            Err(e) => {
                warn!(node = name, error = %e, retry_in_ms = delay.as_millis() as u64, "reading this node's Node object")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

fn node_pod_cidrs(node: &Node) -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
    let spec = node.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let v4: Vec<ipnet::Ipv4Net> = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    anyhow::ensure!(
        !v4.is_empty(),
        "Node has no IPv4 spec.podCIDRs; pass --pod-cidr"
    );
    Ok(v4)
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
