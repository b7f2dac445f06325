//! The CNI commands. Each takes the invocation and the configuration and returns what goes on
//! stdout, or a [`CniError`] with the right code and a message that says what to fix. ADD undoes
//! everything it did when a later step fails; DEL succeeds whatever is already gone.

use std::path::{Path, PathBuf};

use ferrox_abi::{EndpointInfo, EndpointKey, endpoint_flags};
use ferrox_datapath::{Maps, PinLayout};
use ipnet::Ipv4Net;

use crate::{
    ipam::{self, Allocation, IpamError},
    netlink::{MAIN_TABLE, Netlink},
    node_config::{self, NodeConfig, NodeConfigError},
    pod,
    spec::{
        AddResult, CNI_VERSION, CniError, Command, Interface, Invocation, IpConfig, NetConf,
        RouteConfig, SUPPORTED_VERSIONS, code,
    },
};

/// Runs one invocation; `Ok(Some(json))` is printed on stdout.
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<Option<String>, CniError> {
    match inv.command {
        Command::Version => Ok(Some(version(stdin))),
        Command::Add => add(inv, &NetConf::parse(stdin)?).map(Some),
        Command::Del => del(inv, &NetConf::parse(stdin)?).map(|()| None),
        Command::Status => status(&NetConf::parse(stdin)?).map(|()| None),
        Command::Check => check(inv, &NetConf::parse(stdin)?).map(|()| None),
        Command::Gc => gc(&NetConf::parse(stdin)?).map(|()| None),
    }
}

fn version(stdin: &[u8]) -> String {
    let requested = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CNI_VERSION.to_owned());
    serde_json::json!({ "cniVersion": requested, "supportedVersions": SUPPORTED_VERSIONS })
        .to_string()
}

fn node_config_path(conf: &NetConf) -> PathBuf {
    conf.node_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(node_config::DEFAULT_PATH))
}

fn read_node_config(conf: &NetConf) -> Result<NodeConfig, CniError> {
    NodeConfig::read(&node_config_path(conf)).map_err(|e| {
        let code = match e {
            NodeConfigError::Missing { .. } => code::TRY_AGAIN_LATER,
            NodeConfigError::Version { .. } => code::INCOMPATIBLE_VERSION,
            _ => code::IO_FAILURE,
        };
        CniError::new(code, e.to_string()).with_source(&e)
    })
}

fn datapath_error(
    what: &str,
    layout: &PinLayout,
    e: &(dyn std::error::Error + 'static),
) -> CniError {
    CniError::new(
        code::DATAPATH,
        format!(
            "{what}: the datapath pinned at {} is not usable; is the ferrox agent running?",
            layout.root().display()
        ),
    )
    .with_source(e)
}

/// Steps to undo, run in reverse order unless the ADD completes.
struct Rollback {
    steps: Vec<Box<dyn FnOnce()>>,
}

impl Rollback {
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.steps.push(Box::new(f));
    }

    /// A step undone after every other one.
    fn push_first(&mut self, f: impl FnOnce() + 'static) {
        self.steps.insert(0, Box::new(f));
    }

    fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        while let Some(step) = self.steps.pop() {
            step();
        }
    }
}

/// The pod program being attached on a thread of its own; joined when waited for or dropped.
struct Attaching(Option<std::thread::JoinHandle<ferrox_datapath::Result<()>>>);

impl Attaching {
    fn start(layout: PinLayout, host_ifname: String, how: ferrox_datapath::PodAttach) -> Self {
        Self(Some(std::thread::spawn(move || {
            ferrox_datapath::attach_pod(&layout, &host_ifname, how).map(drop)
        })))
    }

    fn wait(mut self, layout: &PinLayout) -> Result<(), CniError> {
        match self.0.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(datapath_error("attaching the pod program", layout, &e)),
            _ => Err(CniError::new(
                code::DATAPATH,
                "attaching the pod program failed (its thread panicked)",
            )),
        }
    }
}

impl Drop for Attaching {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

fn add(inv: &Invocation, conf: &NetConf) -> Result<String, CniError> {
    let node = read_node_config(conf)?;
    let layout = PinLayout::new(&node.bpffs_root);
    let netns = inv.netns.clone().unwrap_or_default();
    if !netns.exists() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_NETNS {} does not exist", netns.display()),
        ));
    }
    let mut rollback = Rollback { steps: Vec::new() };

    // 1. The veth pair. The pod program is attached to its host side on another thread while
    //    the address is allocated and the pod configured.
    let host_ifname = pod::host_ifname(&inv.container_id, &inv.ifname);
    {
        let name = host_ifname.clone();
        rollback.push(move || {
            let _ = pod::teardown(&name);
        });
    }
    let pair = pod::create_pair(&netns, &inv.container_id, &inv.ifname, node.mtu).map_err(|e| {
        CniError::new(code::IO_FAILURE, "creating the pod's veth pair").with_source(&e)
    })?;
    {
        let (layout, name) = (layout.clone(), host_ifname.clone());
        rollback.push(move || {
            let _ = ferrox_datapath::detach_pod(&layout, &name);
        });
    }
    // Declared after `rollback`: dropped (joined) before the rollback runs.
    // A filter, unless the bandwidth plugin needs the veth's ingress qdisc (see
    // `NetConf::pod_egress_is_shaped`): then a TCX link, which needs no qdisc.
    let how = if conf.pod_egress_is_shaped() {
        ferrox_datapath::PodAttach::Link
    } else {
        ferrox_datapath::PodAttach::Filter
    };
    let attaching = Attaching::start(layout.clone(), host_ifname.clone(), how);

    // 2. An address.
    let store = ipam::Store::new(&node.ipam_dir);
    let pod_ref = inv.pod();
    let record = Allocation {
        ip: std::net::Ipv4Addr::UNSPECIFIED,
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        pod_namespace: pod_ref.namespace,
        pod_name: pod_ref.name,
    };
    // The blocks as they are once the store is locked: the agent may have released one while
    // this ADD waited.
    let config_path = node_config_path(conf);
    let blocks = || {
        NodeConfig::read(&config_path)
            .map(|c| c.pod_cidrs)
            .map_err(|e| IpamError::Blocks(e.to_string()))
    };
    let alloc = store.allocate_from(blocks, record).map_err(|e| match &e {
        IpamError::Exhausted { .. } if node.ipam_mode == node_config::IpamMode::Pools => {
            // The agent claims another block when it sees the marker; the runtime retries.
            let _ = store.demand_block();
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{e}; the ferrox agent is claiming another block for this node, retry"),
            )
        }
        IpamError::Exhausted { .. } => CniError::new(code::ADDRESSES_EXHAUSTED, e.to_string()),
        _ => CniError::new(code::IO_FAILURE, "allocating an address").with_source(&e),
    })?;
    {
        let (dir, cid, ifname) = (
            node.ipam_dir.clone(),
            inv.container_id.clone(),
            inv.ifname.clone(),
        );
        // Undone last: the address is free only once nothing refers to it.
        rollback.push_first(move || {
            let _ = ipam::Store::new(dir).release(&cid, &ifname);
        });
    }

    // 3. Addresses and routes, then the program and the endpoint entry.
    let net = pair.configure(alloc.ip, node.gateway).map_err(|e| {
        CniError::new(code::IO_FAILURE, "setting up the pod's network").with_source(&e)
    })?;
    attaching.wait(&layout)?;
    // A GC that ran meanwhile (before the runtime knew this attachment) may have released the
    // address: never finish with an address the store no longer holds for this attachment.
    let still_ours = store
        .get(alloc.ip)
        .is_some_and(|a| a.container_id == inv.container_id && a.ifname == inv.ifname);
    if !still_ours {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "{} was released while this ADD ran (a concurrent GC); retry",
                alloc.ip
            ),
        ));
    }
    let mut maps =
        Maps::open(&layout).map_err(|e| datapath_error("opening the maps", &layout, &e))?;
    let key = EndpointKey {
        addr: u32::from_ne_bytes(alloc.ip.octets()),
    };
    maps.endpoints
        .insert(
            &key,
            &EndpointInfo {
                ifindex: net.host_ifindex,
                flags: if conf.pod_is_shaped() {
                    endpoint_flags::POD
                } else {
                    endpoint_flags::POD | endpoint_flags::PEER
                },
            },
        )
        .map_err(|e| datapath_error("registering the endpoint", &layout, &e))?;
    rollback.commit();

    let mac = |m: Option<crate::netlink::MacAddr>| m.map(|m| m.to_string()).unwrap_or_default();
    let result = AddResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: net.host_ifname.clone(),
                mac: mac(net.host_mac),
                mtu: Some(node.mtu),
                sandbox: None,
            },
            Interface {
                name: net.pod_ifname.clone(),
                mac: mac(net.pod_mac),
                mtu: Some(node.mtu),
                sandbox: Some(netns.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            address: Ipv4Net::from(alloc.ip),
            gateway: Some(node.gateway),
            interface: Some(1),
        }],
        routes: vec![RouteConfig {
            dst: Ipv4Net::default(),
            gw: Some(node.gateway),
        }],
        dns: conf.dns.clone(),
    };
    Ok(result.to_json().to_string())
}

fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let node = match read_node_config(conf) {
        Ok(n) => n,
        // Without the node configuration nothing of ours can be on this node any more.
        Err(e) if e.code == code::TRY_AGAIN_LATER => return Ok(()),
        Err(e) => return Err(e),
    };
    release_attachment(&node, &inv.container_id, &inv.ifname).map(drop)
}

/// Undoes everything ADD did for (container, ifname) on the node `node` describes: endpoint
/// entry, pod program, veth (retired at once, destroyed later), address. Idempotent; returns the
/// released allocation, if there was one. DEL, GC, the agent's leak collection and `ferrox ipam release` all use it.
pub fn release_attachment(
    node: &NodeConfig,
    container_id: &str,
    ifname: &str,
) -> Result<Option<Allocation>, CniError> {
    let layout = PinLayout::new(&node.bpffs_root);
    let store = ipam::Store::new(&node.ipam_dir);
    let host_ifname = pod::host_ifname(container_id, ifname);
    let alloc = store
        .find(container_id, ifname)
        .map_err(|e| CniError::new(code::IO_FAILURE, "reading the IPAM store").with_source(&e))?;

    // Datapath state first, then the interface, and the address last, so that it is never
    // handed out again while anything still refers to it.
    if let Some(a) = &alloc
        && layout_present(&layout)
    {
        let mut maps =
            Maps::open(&layout).map_err(|e| datapath_error("opening the maps", &layout, &e))?;
        maps.endpoints
            .remove(&EndpointKey {
                addr: u32::from_ne_bytes(a.ip.octets()),
            })
            .map_err(|e| datapath_error("removing the endpoint", &layout, &e))?;
    }
    // The veth is retired, not destroyed, here, and its program's link goes with it (see
    // `pod::retire`, `ferrox_datapath::retire_pod_link`): destroying either holds RTNL for RCU
    // grace periods, which the runtime's namespace deletion or the agent's sweep pays instead.
    let retired = pod::retire(&host_ifname)
        .map_err(|e| CniError::new(code::IO_FAILURE, "retiring the pod's veth").with_source(&e))?;
    match retired {
        Some(ifindex) => ferrox_datapath::retire_pod_link(&layout, &host_ifname, ifindex)
            .map_err(|e| datapath_error("retiring the pod program's link", &layout, &e))?,
        None => ferrox_datapath::detach_pod(&layout, &host_ifname)
            .map_err(|e| datapath_error("detaching the pod program", &layout, &e))?,
    };
    store
        .release(container_id, ifname)
        .map_err(|e| CniError::new(code::IO_FAILURE, "releasing the address").with_source(&e))?;
    Ok(alloc)
}

/// CHECK: the attachment is still what ADD made and `prevResult` describes. Every difference
/// is named in one error (code [`code::ATTACHMENT_DIFFERS`]).
fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let node = read_node_config(conf)?;
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "CHECK needs the prevResult of the ADD it checks",
        )
    })?;
    let prev: AddResult = serde_json::from_value(prev).map_err(|e| {
        CniError::new(code::DECODING_FAILURE, "prevResult is not a CNI result").with_source(&e)
    })?;
    let store = ipam::Store::new(&node.ipam_dir);
    let alloc = store
        .find(&inv.container_id, &inv.ifname)
        .map_err(|e| CniError::new(code::IO_FAILURE, "reading the IPAM store").with_source(&e))?
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "container {} has no {} attachment on this node",
                    inv.container_id, inv.ifname
                ),
            )
        })?;
    let mut wrong = Vec::new();
    let want = Ipv4Net::from(alloc.ip);
    if !prev.ips.iter().any(|i| i.address == want) {
        wrong.push(format!(
            "prevResult does not list {want}, the address the IPAM store holds for it"
        ));
    }

    // The pod's side.
    let netns = inv.netns.clone().unwrap_or_default();
    match Netlink::open_in_path(&netns) {
        Err(e) => wrong.push(format!(
            "its network namespace {} cannot be opened: {e}",
            netns.display()
        )),
        Ok(nl) => match nl.link(inv.ifname.as_str()) {
            Err(e) => wrong.push(format!("reading {} in the pod failed: {e}", inv.ifname)),
            Ok(None) => wrong.push(format!("interface {} is missing in the pod", inv.ifname)),
            Ok(Some(link)) => {
                if !link.up {
                    wrong.push(format!("interface {} is down", inv.ifname));
                }
                if link.mtu != Some(node.mtu) {
                    wrong.push(format!(
                        "interface {} has MTU {:?}, the node's is {}",
                        inv.ifname, link.mtu, node.mtu
                    ));
                }
                match nl.list_addresses(link.index) {
                    Ok(addrs) if addrs.contains(&want.into()) => {}
                    Ok(addrs) => wrong.push(format!(
                        "interface {} has {addrs:?}, not {want}",
                        inv.ifname
                    )),
                    Err(e) => wrong.push(format!("listing the pod's addresses failed: {e}")),
                }
                match nl.list_routes(MAIN_TABLE) {
                    Ok(routes) => {
                        for r in &prev.routes {
                            let present = routes.iter().any(|have| {
                                have.dst == r.dst
                                    && (r.gw.is_none() || have.gateway == r.gw)
                                    && have.oif == Some(link.index)
                            });
                            if !present {
                                wrong.push(format!(
                                    "the pod has no route to {}{}",
                                    r.dst,
                                    r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
                                ));
                            }
                        }
                    }
                    Err(e) => wrong.push(format!("listing the pod's routes failed: {e}")),
                }
            }
        },
    }

    // The host's side and the datapath.
    let host_ifname = pod::host_ifname(&inv.container_id, &inv.ifname);
    let host = Netlink::open()
        .map_err(|e| CniError::new(code::IO_FAILURE, "opening netlink").with_source(&e))?;
    let host_index = match host.link(host_ifname.as_str()) {
        Ok(Some(l)) => {
            if !l.up {
                wrong.push(format!("host interface {host_ifname} is down"));
            }
            Some(l.index)
        }
        Ok(None) => {
            wrong.push(format!("host interface {host_ifname} is missing"));
            None
        }
        Err(e) => {
            wrong.push(format!("reading host interface {host_ifname} failed: {e}"));
            None
        }
    };
    if let Some(index) = host_index {
        match host.list_routes(MAIN_TABLE) {
            Ok(routes) => {
                if !routes.iter().any(|r| r.dst == want && r.oif == Some(index)) {
                    wrong.push(format!("the host has no route to {want} via {host_ifname}"));
                }
            }
            Err(e) => wrong.push(format!("listing the host's routes failed: {e}")),
        }
        let layout = PinLayout::new(&node.bpffs_root);
        for side in ferrox_datapath::PodSide::BOTH {
            let program = side.program();
            match ferrox_datapath::pod_hook(&layout, &host_ifname, side) {
                Ok(Some(ferrox_datapath::PodHook::Filter { .. })) => {}
                Ok(Some(ferrox_datapath::PodHook::Link {
                    target: ferrox_datapath::LinkTarget::Tcx { ifindex, .. },
                    ..
                })) if ifindex == index => {}
                Ok(Some(ferrox_datapath::PodHook::Link { target, .. })) => wrong.push(format!(
                    "the pod program {program} is attached to {target:?}, not {host_ifname}"
                )),
                Ok(None) => wrong.push(format!(
                    "the pod program {program} is not attached to {host_ifname}"
                )),
                Err(e) => wrong.push(format!(
                    "reading the hook of {program} on {host_ifname} failed: {e}"
                )),
            }
        }
        match Maps::open(&layout).and_then(|m| {
            m.endpoints.get(&EndpointKey {
                addr: u32::from_ne_bytes(alloc.ip.octets()),
            })
        }) {
            Ok(Some(e)) if e.ifindex == index => {}
            Ok(Some(e)) => wrong.push(format!(
                "the endpoint map sends {} to ifindex {}, not {host_ifname} ({index})",
                alloc.ip, e.ifindex
            )),
            Ok(None) => wrong.push(format!("{} is not in the endpoint map", alloc.ip)),
            Err(e) => return Err(datapath_error("reading the endpoint map", &layout, &e)),
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::ATTACHMENT_DIFFERS,
            format!(
                "the attachment of container {} differs from what ADD made: {}",
                inv.container_id,
                wrong.join("; ")
            ),
        ))
    }
}

/// GC: releases every attachment not in `cni.dev/valid-attachments` (its endpoint entry, pod
/// program, veth and address), and removes host veths of ours that belong to no attachment.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "GC needs cni.dev/valid-attachments (an empty list releases everything)",
        )
    })?;
    let node = match read_node_config(conf) {
        Ok(n) => n,
        // Nothing of ours was ever set up on this node.
        Err(e) if e.code == code::TRY_AGAIN_LATER => return Ok(()),
        Err(e) => return Err(e),
    };
    let keep: std::collections::BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let layout = PinLayout::new(&node.bpffs_root);
    let store = ipam::Store::new(&node.ipam_dir);
    let allocations = store
        .list()
        .map_err(|e| CniError::new(code::IO_FAILURE, "reading the IPAM store").with_source(&e))?;
    for a in &allocations {
        if keep.contains(&(a.container_id.as_str(), a.ifname.as_str())) {
            continue;
        }
        release_attachment(&node, &a.container_id, &a.ifname)?;
    }
    // Host veths of ours (name prefix, veth) that no valid attachment owns: left by an ADD
    // killed before it recorded anything, or by a DEL that never came.
    let owned: std::collections::BTreeSet<String> = valid
        .iter()
        .map(|a| pod::host_ifname(&a.container_id, &a.ifname))
        .collect();
    let host = Netlink::open()
        .map_err(|e| CniError::new(code::IO_FAILURE, "opening netlink").with_source(&e))?;
    let links = host
        .list_links()
        .map_err(|e| CniError::new(code::IO_FAILURE, "listing interfaces").with_source(&e))?;
    for l in &links {
        if pod::is_retired_ifname(&l.name) && l.kind.as_deref() == Some("veth") {
            host.delete_link(l.index).map_err(|e| {
                CniError::new(code::IO_FAILURE, "deleting a retired veth").with_source(&e)
            })?;
        }
    }
    ferrox_datapath::remove_retired_links(&layout, pod::link_exists)
        .map_err(|e| datapath_error("unpinning retired links", &layout, &e))?;
    for l in links {
        if pod::is_host_ifname(&l.name)
            && l.kind.as_deref() == Some("veth")
            && !owned.contains(&l.name)
        {
            ferrox_datapath::detach_pod(&layout, &l.name)
                .map_err(|e| datapath_error("detaching a leftover pod program", &layout, &e))?;
            pod::teardown(&l.name).map_err(|e| {
                CniError::new(code::IO_FAILURE, "deleting a leftover veth").with_source(&e)
            })?;
        }
    }
    Ok(())
}

fn layout_present(layout: &PinLayout) -> bool {
    layout.map(ferrox_abi::map_names::ENDPOINTS).exists()
}

/// Ready only when the agent has written the node configuration and the datapath is pinned.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let node = read_node_config(conf).map_err(|e| CniError {
        code: code::NOT_AVAILABLE,
        ..e
    })?;
    let layout = PinLayout::new(&node.bpffs_root);
    let from_pod = layout.program(ferrox_abi::program_names::TC_FROM_POD);
    let to_pod = layout.program(ferrox_abi::program_names::TC_TO_POD);
    for path in [
        from_pod.as_path(),
        to_pod.as_path(),
        layout.map(ferrox_abi::map_names::ENDPOINTS).as_path(),
    ] {
        if !Path::new(path).exists() {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "the ferrox datapath is not loaded ({} is missing); is the ferrox agent running?",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}
