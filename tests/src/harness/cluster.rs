//! The cluster: underlay, nodes, agents, pods, and the teardown that removes all of it.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use ferrox::{cli::svc::ServiceRow, services::model::Scope};
use ferrox_cni::spec::AddResult;
use ferrox_datapath::PinLayout;
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::core::v1::{Node as K8sNode, NodeAddress, NodeSpec, NodeStatus, Pod as K8sPod, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    bins::bin_path,
    leaks,
    netns::{NetNs, run},
    process::{Proc, spawn_in},
    wait_for,
};
use crate::apiserver::{ApiServer, RequestRecord};

/// The Service CIDR the tests allocate cluster IPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The underlay host that serves the Kubernetes API (and routes between the two subnets).
const API_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The router's address on the second underlay subnet (198.19.0.0/24).
pub const SUBNET2_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const API_PORT: u16 = 6443;
const AGENT_READY: &str = "CNI ready";

pub struct ClusterBuilder {
    nodes: usize,
    second_subnet_from: Option<usize>,
    static_pod_routes: bool,
    agent_env: Vec<(String, String)>,
    start_agents: bool,
    api_server_by_flag: bool,
    nic_like_uplinks: bool,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        assert!((1..=200).contains(&n), "1 to 200 nodes");
        self.nodes = n;
        self
    }

    /// Nodes from `index` on sit in a second underlay subnet (198.19.0.0/24), one router hop
    /// away from the first (the fabric namespace routes between its two bridges).
    pub fn second_subnet_from(mut self, index: usize) -> Self {
        self.second_subnet_from = Some(index);
        self
    }

    /// Routes between the nodes' pod CIDRs over the underlay, installed by the harness (as a
    /// cloud route table would), and the agents' own routing off. Off by default: the agents
    /// route pods themselves.
    pub fn static_pod_routes(mut self, on: bool) -> Self {
        self.static_pod_routes = on;
        self
    }

    /// An environment variable for every agent (e.g. `FERROX_CT_UDP_TIMEOUT`), on every start.
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Off: the nodes are built but their agents are not started; the test starts them
    /// ([`Node::start_agent`], [`Node::start_agent_wrapped`]).
    pub fn start_agents(mut self, on: bool) -> Self {
        self.start_agents = on;
        self
    }

    /// The agents' kubeconfig names a port where nothing listens, and the API server's real
    /// address reaches them only through `FERROX_K8S_API_SERVER` (as on a node without
    /// kube-proxy, where the in-cluster address does not work).
    pub fn api_server_by_flag(mut self) -> Self {
        self.api_server_by_flag = true;
        self
    }

    /// The agents attach their XDP program to the uplink in `mode` (`native` or `generic`),
    /// and the underlay behaves towards it as a NIC's wire would ([`Self::nic_like_uplinks`]).
    pub fn xdp(mut self, mode: &str) -> Self {
        self.agent_env.push(("FERROX_XDP".into(), mode.to_owned()));
        self.nic_like_uplinks = true;
        self
    }

    /// Frames reach the nodes' uplinks (and leave them) as a NIC would see them, which XDP
    /// needs: every sender on the underlay (node, external client) computes its checksums
    /// itself instead of leaving them to an offload a veth never performs (XDP reads and
    /// rewrites whole checksums), and the fabric's end of each uplink takes frames sent back
    /// with `XDP_TX` at once (see [`NetNs::attach_xdp_pass`]).
    pub fn nic_like_uplinks(mut self, on: bool) -> Self {
        self.nic_like_uplinks = on;
        self
    }

    pub fn build(self) -> Cluster {
        Cluster::build(self)
    }
}

struct PodRecord {
    name: String,
    node: usize,
    container_id: String,
    netns_path: PathBuf,
    /// None once the test deleted the namespace (DEL must still work then).
    netns: Option<NetNs>,
}

/// A node: its namespace, addresses, paths and agent.
pub struct Node {
    pub index: usize,
    pub name: String,
    pub addr: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    netns: NetNs,
    dir: PathBuf,
    cgroup: PathBuf,
    kubeconfig: PathBuf,
    agent_env: Vec<(String, String)>,
    agent: Mutex<Option<Proc>>,
}

/// Somewhere processes run: a pod, a node's host namespace, or the external client. Processes
/// join the given network namespace and cgroup.
#[derive(Clone, Debug)]
pub struct Place {
    pub name: String,
    pub netns_path: PathBuf,
    cgroup: PathBuf,
}

/// A pod created through the CNI plugin.
#[derive(Clone, Debug)]
pub struct Pod {
    pub place: Place,
    pub name: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub node: usize,
    pub netns_path: PathBuf,
    /// The CNI ADD result as the plugin printed it.
    pub cni_result: AddResult,
}

impl std::ops::Deref for Pod {
    type Target = Place;
    fn deref(&self) -> &Place {
        &self.place
    }
}

/// A client outside every node: a namespace on the underlay bridge, in no node's cgroup.
#[derive(Clone, Debug)]
pub struct ExternalClient {
    pub place: Place,
    pub ip: Ipv4Addr,
    netns_name: String,
}

impl ExternalClient {
    /// Routes `dst` (e.g. a LoadBalancer IP) via `node`, as the network in front of a cluster
    /// (a router, an ECMP load balancer) would.
    pub fn route(&self, dst: &str, via: Ipv4Addr) {
        super::netns::ip(&[
            "-n",
            &self.netns_name,
            "route",
            "replace",
            dst,
            "via",
            &via.to_string(),
        ]);
    }
}

/// A running capture on the underlay.
pub struct Capture {
    proc: Proc,
    netns: PathBuf,
    marker: Ipv4Addr,
}

impl Capture {
    /// Stops the capture once it has seen the end marker (so every packet sent before the call
    /// is in); returns the packet lines, marker and tcpdump's own messages left out.
    pub fn stop(mut self) -> Vec<String> {
        let marker = format!("{}.9:", self.marker);
        let netns = self.netns.clone();
        let to = SocketAddr::from((self.marker, 9));
        std::thread::spawn(move || {
            let f = std::fs::File::open(&netns).expect("opening the fabric netns");
            // SAFETY: setns on this short-lived thread only; the fd is valid for the call.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("marker socket");
            s.send_to(b"end", to)
                .expect("sending the capture's end marker");
        })
        .join()
        .expect("marker thread");
        self.proc
            .wait_for_line("the capture's end marker", Duration::from_secs(10), |l| {
                l.contains(&marker)
            });
        self.proc.signal_and_wait(libc::SIGINT);
        self.proc
            .lines()
            .into_iter()
            .filter(|l| l.contains(" IP ") && !l.contains(&marker))
            .collect()
    }
}

impl std::ops::Deref for ExternalClient {
    type Target = Place;
    fn deref(&self) -> &Place {
        &self.place
    }
}

pub struct Cluster {
    id: String,
    dir: PathBuf,
    cgroup_dir: PathBuf,
    api: Option<ApiServer>,
    fabric: Option<NetNs>,
    nodes: Vec<Node>,
    pods: Mutex<Vec<PodRecord>>,
    next_pod: AtomicU32,
    /// Namespaces of the external clients.
    external: Mutex<Vec<NetNs>>,
    /// Cgroups of processes outside every node's cgroup.
    unhooked: Mutex<Vec<PathBuf>>,
    /// See [`ClusterBuilder::nic_like_uplinks`].
    nic_like_uplinks: bool,
    /// The XDP links on the fabric's ends of the uplinks (nic-like uplinks).
    wire_links: Mutex<Vec<std::os::fd::OwnedFd>>,
}

fn cgroup_root() -> PathBuf {
    ferrox::daemon::node::cgroup2_mount().expect("a cgroup2 mount")
}

fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:02x}",
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Binds a TCP listener inside another network namespace (from a short-lived thread, so the
/// caller's namespace never changes).
fn listen_in(netns: &Path, addr: SocketAddr) -> TcpListener {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).expect("opening netns");
        // SAFETY: setns on this short-lived thread only; the fd is valid for the call.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        TcpListener::bind(addr).expect("binding the API server")
    })
    .join()
    .expect("listener thread")
}

/// The agents' credentials as a DaemonSet's pod has them, in `dir/serviceaccount/` (`token`,
/// `ca.crt`, `namespace`, as the projected service-account volume), and the kubeconfig the
/// agents get, naming them (`tokenFile`, `certificate-authority`) and `server`. Returns the
/// kubeconfig's path.
fn write_credentials(dir: &Path, api: &ApiServer, token: &str, server: &str) -> PathBuf {
    let account = dir.join("serviceaccount");
    std::fs::create_dir_all(&account).expect("creating the service account directory");
    let (namespace, _) = crate::manifests::agent_service_account();
    for (file, content) in [
        ("token", token.to_owned()),
        ("ca.crt", api.ca_pem()),
        ("namespace", namespace),
    ] {
        std::fs::write(account.join(file), content).expect("writing the service account files");
    }
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n- name: ferrox\n  user:\n    tokenFile: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: ferrox\n\
             current-context: test\n",
            ca = account.join("ca.crt").display(),
            token = account.join("token").display(),
        ),
    )
    .expect("writing the kubeconfig");
    kubeconfig
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            second_subnet_from: None,
            static_pod_routes: false,
            agent_env: Vec::new(),
            start_agents: true,
            api_server_by_flag: false,
            nic_like_uplinks: false,
        }
    }

    fn build(mut b: ClusterBuilder) -> Self {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the cluster harness needs root (network namespaces, bpf)"
        );
        let id = unique_id();
        let dir = PathBuf::from(leaks::RUN_DIR).join(&id);
        let cgroup_dir = cgroup_root().join(leaks::CGROUP_DIR).join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        leaks::write_owner(&dir).unwrap();
        std::fs::create_dir_all(&cgroup_dir).unwrap();
        // From here on, Drop cleans up whatever has been built, also if a step below panics.
        let mut cluster = Self {
            id: id.clone(),
            dir,
            cgroup_dir,
            api: None,
            fabric: None,
            nodes: Vec::new(),
            pods: Mutex::new(Vec::new()),
            next_pod: AtomicU32::new(1),
            external: Mutex::new(Vec::new()),
            unhooked: Mutex::new(Vec::new()),
            nic_like_uplinks: b.nic_like_uplinks,
            wire_links: Mutex::new(Vec::new()),
        };

        let fabric = NetNs::create(&format!("{}{id}-fab", leaks::NETNS_PREFIX));
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["addr", "add", &format!("{API_ADDR}/24"), "dev", "br0"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        if b.second_subnet_from.is_some() {
            fabric.ip(&["link", "add", "br1", "type", "bridge"]);
            fabric.ip(&["addr", "add", &format!("{SUBNET2_ROUTER}/24"), "dev", "br1"]);
            fabric.ip(&["link", "set", "br1", "up"]);
            fabric.sysctl(&["net.ipv4.ip_forward=1"]);
        }
        let listener = listen_in(&fabric.path(), SocketAddr::from((API_ADDR, API_PORT)));
        cluster.fabric = Some(fabric);
        cluster.api = Some(ApiServer::start(listener));
        // The custom resources ferrox's manifests install.
        cluster
            .api()
            .register(crate::apiserver::ResourceType::cluster(
                ferrox::ipam::GROUP,
                ferrox::ipam::VERSION,
                ferrox::ipam::PLURAL,
                ferrox::ipam::KIND,
            ));
        cluster
            .api()
            .register(crate::apiserver::ResourceType::cluster(
                ferrox::bgp::peers::PEER_GROUP,
                ferrox::bgp::peers::PEER_VERSION,
                ferrox::bgp::peers::PEER_PLURAL,
                ferrox::bgp::peers::PEER_KIND,
            ));

        // The agents run as the manifest's ServiceAccount, under its ClusterRole.
        let token = crate::manifests::install_rbac(cluster.api());
        let kubeconfig_port = if b.api_server_by_flag {
            b.agent_env.push((
                "FERROX_K8S_API_SERVER".into(),
                format!("https://{API_ADDR}:{API_PORT}"),
            ));
            1
        } else {
            API_PORT
        };
        let kubeconfig = write_credentials(
            &cluster.dir,
            cluster.api(),
            &token,
            &format!("https://{API_ADDR}:{kubeconfig_port}"),
        );

        if b.static_pod_routes {
            b.agent_env.push(("FERROX_ROUTES".into(), "false".into()));
        }
        for index in 1..=b.nodes {
            let second = b.second_subnet_from.is_some_and(|from| index >= from);
            let node = cluster.add_node(index, second, &kubeconfig, &b.agent_env);
            cluster.nodes.push(node);
        }
        if b.static_pod_routes {
            for n in &cluster.nodes {
                for other in cluster.nodes.iter().filter(|o| o.index != n.index) {
                    n.netns.ip(&[
                        "route",
                        "add",
                        &other.pod_cidr.to_string(),
                        "via",
                        &other.addr.to_string(),
                    ]);
                }
            }
        }
        if b.start_agents {
            for n in &cluster.nodes {
                n.start_agent();
            }
            for n in &cluster.nodes {
                n.wait_agent_ready();
            }
        }
        cluster
    }

    fn add_node(
        &self,
        index: usize,
        second_subnet: bool,
        kubeconfig: &Path,
        agent_env: &[(String, String)],
    ) -> Node {
        let name = format!("node-{index}");
        let (addr, gateway, bridge) = if second_subnet {
            (
                Ipv4Addr::new(198, 19, 0, 10 + index as u8),
                SUBNET2_ROUTER,
                "br1",
            )
        } else {
            (Ipv4Addr::new(198, 18, 0, 10 + index as u8), API_ADDR, "br0")
        };
        let pod_cidr: Ipv4Net = format!("10.244.{index}.0/24").parse().unwrap();
        let netns = NetNs::create(&format!("{}{}-n{index}", leaks::NETNS_PREFIX, self.id));
        let fabric = self.fabric.as_ref().unwrap();
        let uplink = format!("n{index}");
        fabric.ip(&[
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        fabric.ip(&["link", "set", &uplink, "master", bridge, "up"]);
        if self.nic_like_uplinks {
            let link = fabric.attach_xdp_pass(&uplink);
            self.wire_links
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(link);
            netns.ethtool_features("eth0", &["tx", "off"]);
        }
        netns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", "default", "via", &gateway.to_string()]);
        netns.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ]);

        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = self.cgroup_dir.join(&name);
        std::fs::create_dir_all(&cgroup).unwrap();

        self.api().apply(&K8sNode {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(pod_cidr.to_string()),
                pod_cidrs: Some(vec![pod_cidr.to_string()]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: addr.to_string(),
                }]),
                ..Default::default()
            }),
        });
        Node {
            index,
            name,
            addr,
            pod_cidr,
            netns,
            dir,
            cgroup,
            kubeconfig: kubeconfig.to_path_buf(),
            agent_env: agent_env.to_vec(),
            agent: Mutex::new(None),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The Kubernetes API test server: create and change objects through it.
    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("api server")
    }

    /// Every request the API server refused (401 or 403). The agents run under the manifest's
    /// ClusterRole: a normal run has none, and dropping the cluster fails the test otherwise.
    pub fn denied_requests(&self) -> Vec<RequestRecord> {
        self.api
            .as_ref()
            .map(|api| {
                api.requests()
                    .into_iter()
                    .filter(|r| r.code == 401 || r.code == 403)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Does to every agent's watches what a real control plane does now and then: ends them
    /// (an API server restart, a watch timeout), runs `meanwhile` while the agents cannot watch
    /// (changes they can only learn by re-listing), compacts the history so that every
    /// resourceVersion they had is gone (etcd compaction), then lets them back: each broken
    /// watch is answered 410 Gone and its agent re-lists. Returns once the agents watch again
    /// as many things as before, with the requests made from the break on (the 410s, the
    /// re-lists, the new watches).
    pub fn expire_watches(&self, meanwhile: impl FnOnce()) -> Vec<RequestRecord> {
        let api = self.api();
        let watching = api.open_watches();
        let from = api.requests().len();
        let broken = api.break_watches();
        meanwhile();
        broken.expire();
        wait_for(
            "every agent to re-list and watch again after 410 Gone",
            Duration::from_secs(60),
            || {
                let since: Vec<RequestRecord> = api.requests().split_off(from);
                let gone = since.iter().filter(|r| r.watch_error == Some(410)).count();
                let open = api.open_watches();
                if gone >= watching && open >= watching {
                    Ok(since)
                } else {
                    Err(format!(
                        "{gone} of {watching} watches answered 410, {open} watching again"
                    ))
                }
            },
        )
    }

    /// Node `i`, counting from 1 like the node names.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Creates pod `name` on node `node` as a container runtime would: a fresh network namespace
    /// and `ferrox-cni ADD`. Also records the Pod in the API.
    pub fn add_pod(&self, node: usize, name: &str) -> Pod {
        self.add_pod_inner(node, name, None)
    }

    /// Like [`Cluster::add_pod`], for the Pod `template` (its namespace, name, labels and
    /// containers' ports as the API will carry them; the node and address are filled in).
    pub fn add_pod_as(&self, node: usize, template: K8sPod) -> Pod {
        self.add_pod_full(node, template, None)
    }

    /// Like [`Cluster::add_pod`], with the plugin binary and network configuration list a
    /// runtime would find on the node (e.g. what `ferrox install-cni` put there): the first
    /// plugin of `conflist`, given the list's name and version, as libcni does.
    pub fn add_pod_from_conflist(
        &self,
        node: usize,
        name: &str,
        plugin: &Path,
        conflist: &serde_json::Value,
    ) -> Pod {
        let mut conf = conflist["plugins"][0].clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        self.add_pod_inner(node, name, Some((plugin, &conf)))
    }

    fn add_pod_inner(
        &self,
        node: usize,
        name: &str,
        with: Option<(&Path, &serde_json::Value)>,
    ) -> Pod {
        let template = K8sPod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.add_pod_full(node, template, with)
    }

    fn add_pod_full(
        &self,
        node: usize,
        template: K8sPod,
        with: Option<(&Path, &serde_json::Value)>,
    ) -> Pod {
        let name = template.metadata.name.clone().expect("the Pod's name");
        let namespace = template
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let qualified = if namespace == "default" {
            name.clone()
        } else {
            format!("{namespace}/{name}")
        };
        let name = name.as_str();
        let n = self.node(node);
        let k = self.next_pod.fetch_add(1, Ordering::Relaxed);
        let netns = NetNs::create(&format!("{}{}-p{k}", leaks::NETNS_PREFIX, self.id));
        let container_id = format!("{}{:04}{name}", self.id, k);
        let out = match with {
            Some((plugin, conf)) => n.cni_with(
                plugin,
                conf,
                "ADD",
                &container_id,
                Some(&netns.path()),
                &qualified,
            ),
            None => n.cni("ADD", &container_id, Some(&netns.path()), &qualified),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let netns_path = netns.path();
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(PodRecord {
                name: qualified.clone(),
                node,
                container_id: container_id.clone(),
                netns_path: netns_path.clone(),
                netns: Some(netns),
            });
        assert!(
            out.status.success(),
            "CNI ADD of {name} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cni_result: AddResult =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("CNI result {stdout:?}: {e}"));
        let ip = cni_result.ips[0].address.addr();
        let mut spec = template.spec.clone().unwrap_or_default();
        spec.node_name = Some(n.name.clone());
        self.api().apply(&K8sPod {
            spec: Some(spec),
            status: Some(PodStatus {
                pod_ip: Some(ip.to_string()),
                phase: Some("Running".into()),
                ..Default::default()
            }),
            ..template
        });
        Pod {
            place: Place {
                name: name.into(),
                netns_path: netns_path.clone(),
                cgroup: n.cgroup.clone(),
            },
            name: name.into(),
            ip,
            container_id,
            node,
            netns_path,
            cni_result,
        }
    }

    /// A client outside every node (a namespace on the underlay, 198.18.0.200, in no node's
    /// cgroup): for NodePorts, load balancer IPs and health checks as the outside sees them.
    /// Starts `tcpdump -nn -l -i <bridge> <filter>` on the underlay (the fabric namespace) and
    /// waits until it listens. Stop it with [`Capture::stop`] to get one line per packet.
    pub fn capture(&self, bridge: &str, filter: &str) -> Capture {
        let fabric = self.fabric.as_ref().expect("fabric");
        let cgroup = self.cgroup_dir.join("fabric");
        std::fs::create_dir_all(&cgroup).expect("creating the fabric's cgroup");
        {
            // Killed and removed with the cluster, like every process outside the nodes.
            let mut extra = self
                .unhooked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !extra.contains(&cgroup) {
                extra.push(cgroup.clone());
            }
        }
        // The end marker: a datagram the fabric sends itself to a fixed neighbour, which the
        // capture sees after every packet before it.
        let marker = match bridge {
            "br1" => Ipv4Addr::new(198, 19, 0, 250),
            _ => Ipv4Addr::new(198, 18, 0, 250),
        };
        fabric.ip(&[
            "neigh",
            "replace",
            &marker.to_string(),
            "lladdr",
            "02:00:00:00:00:fa",
            "dev",
            bridge,
            "nud",
            "permanent",
        ]);
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-nn", "-l", "-i", bridge]).arg(format!(
            "({filter}) or (udp and dst host {marker} and dst port 9)"
        ));
        let proc = Proc::spawn(&format!("tcpdump {bridge}"), cmd, &fabric.path(), &cgroup);
        proc.wait_for_line("tcpdump to listen", Duration::from_secs(10), |l| {
            l.contains("listening on")
        });
        Capture {
            proc,
            netns: fabric.path(),
            marker,
        }
    }

    /// Packets `pod`'s host veth transmitted, and packets the pod's `eth0` received. A packet
    /// the datapath hands straight into the pod (`bpf_redirect_peer`) moves only the second.
    pub fn delivery_counters(&self, pod: &Pod) -> (u64, u64) {
        let host_if = &pod.cni_result.interfaces[0].name;
        let host = self
            .node(pod.node)
            .netns()
            .ip(&["-s", "-j", "link", "show", host_if]);
        let host: serde_json::Value = serde_json::from_str(&host).expect("ip -j link show");
        let out = Command::new("nsenter")
            .arg(format!("--net={}", pod.netns_path.display()))
            .args(["ip", "-s", "-j", "link", "show", "eth0"])
            .output()
            .expect("running nsenter ip");
        let inside: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ip -j link show in the pod");
        let count = |v: &serde_json::Value, dir: &str| {
            v[0]["stats64"][dir]["packets"]
                .as_u64()
                .expect("packet counter")
        };
        (count(&host, "tx"), count(&inside, "rx"))
    }

    pub fn external_client(&self) -> ExternalClient {
        let mut ext = self
            .external
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let k = ext.len();
        let ip = Ipv4Addr::new(198, 18, 0, 200 + k as u8);
        let netns = NetNs::create(&format!("{}{}-x{k}", leaks::NETNS_PREFIX, self.id));
        let fabric = self.fabric.as_ref().expect("fabric");
        let ifname = format!("x{k}");
        fabric.ip(&[
            "link",
            "add",
            &ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        fabric.ip(&["link", "set", &ifname, "master", "br0", "up"]);
        if self.nic_like_uplinks {
            netns.ethtool_features("eth0", &["tx", "off"]);
        }
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", "default", "via", &API_ADDR.to_string()]);
        let cgroup = self.cgroup_dir.join(format!("external-{k}"));
        std::fs::create_dir_all(&cgroup).expect("creating the external client's cgroup");
        let place = Place {
            name: format!("external-{k}"),
            netns_path: netns.path(),
            cgroup,
        };
        let netns_name = netns.name().to_owned();
        ext.push(netns);
        ExternalClient {
            place,
            ip,
            netns_name,
        }
    }

    /// `pod`'s network namespace, for a process outside every node's cgroup: the socket hooks do
    /// not see its connections, as with a VM behind a pod's interface or a pod that routes
    /// packets it did not originate. Only the per-packet fallback translates them.
    pub fn unhooked(&self, pod: &Pod) -> Place {
        let mut ext = self
            .unhooked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cgroup = self.cgroup_dir.join(format!("unhooked-{}", ext.len()));
        std::fs::create_dir_all(&cgroup).expect("creating an unhooked cgroup");
        ext.push(cgroup.clone());
        Place {
            name: format!("{} (unhooked)", pod.name),
            netns_path: pod.netns_path.clone(),
            cgroup,
        }
    }

    /// Runs `ferrox-cni DEL` for the pod (the namespace is kept, as a runtime may call DEL first).
    pub fn cni_del(&self, pod: &Pod) -> std::process::Output {
        self.node(pod.node)
            .cni("DEL", &pod.container_id, Some(&pod.netns_path), &pod.name)
    }

    /// Deletes a pod's network namespace, as a runtime may before calling DEL.
    pub fn delete_pod_netns(&self, pod: &Pod) {
        let mut pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = pods.iter_mut().find(|p| p.container_id == pod.container_id) {
            p.netns.take();
        }
    }
}

impl Node {
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn layout(&self) -> PinLayout {
        PinLayout::new(self.bpffs_mount().join("ferrox"))
    }

    /// The directory standing in for the node's root filesystem: the node's bpffs, node
    /// configuration and IPAM store live where they would on a real node, under it
    /// (`sys/fs/bpf`, `run/ferrox/node.json`, `var/lib/ferrox/ipam`), and tests put the CNI
    /// directories (`opt/cni/bin`, `etc/cni/net.d`) there too.
    pub fn host_root(&self) -> PathBuf {
        self.dir.join("host")
    }

    /// `path` of the node's root filesystem (absolute, e.g. `/opt/cni/bin`), under
    /// [`Node::host_root`].
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.host_root().join(path.trim_start_matches('/'))
    }

    fn bpffs_mount(&self) -> PathBuf {
        self.host_path("/sys/fs/bpf")
    }

    /// Mounts the node's bpffs, as a node's init system does at boot (otherwise the agent
    /// mounts it when it starts).
    pub fn mount_bpffs(&self) {
        let mount = self.bpffs_mount();
        std::fs::create_dir_all(&mount).expect("creating the bpffs mount point");
        if !ferrox_datapath::bpffs::is_bpffs(&mount) {
            nix::mount::mount(
                Some("bpf"),
                &mount,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mounting bpffs");
        }
    }

    pub fn node_config(&self) -> PathBuf {
        self.host_path(ferrox_cni::node_config::DEFAULT_PATH)
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.host_path("/var/lib/ferrox/ipam")
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    fn agent_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin_path("ferrox"));
        cmd.arg("agent")
            .args(["--node-name", &self.name])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--uplink", "eth0"])
            .arg("--node-config")
            .arg(self.node_config())
            .arg("--ipam-dir")
            .arg(self.ipam_dir())
            .args(extra)
            .env("FERROX_BPFFS_ROOT", self.layout().root())
            .env("RUST_LOG", "info,ferrox=debug")
            .env("NO_COLOR", "1")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the agent (replacing the handle of a previous, dead one).
    pub fn start_agent(&self) {
        self.start_agent_wrapped(&[]);
    }

    /// Starts the agent through `wrapper` (e.g. `setpriv --bounding-set=... --`), which gets
    /// the agent's command line appended.
    pub fn start_agent_wrapped(&self, wrapper: &[String]) {
        let proc = Proc::spawn(
            &format!("agent {}", self.name),
            wrapped(self.agent_command(&[]), wrapper),
            &self.netns.path(),
            &self.cgroup,
        );
        *self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(proc);
    }

    /// Waits until the agent has the datapath up and the node configuration written.
    pub fn wait_agent_ready(&self) {
        let g = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let agent = g.as_ref().expect("agent started");
        agent.wait_for_line("the agent to be ready", Duration::from_secs(60), |l| {
            l.contains(AGENT_READY)
        });
    }

    /// The agent's process id (0 when it is not running).
    pub fn agent_pid(&self) -> u32 {
        self.agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(Proc::pid)
            .unwrap_or(0)
    }

    /// `kill -9` the agent, as a crash would.
    pub fn kill_agent(&self) {
        let mut g = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let agent = g.as_mut().expect("agent started");
        agent.signal_and_wait(libc::SIGKILL);
    }

    /// Stops the agent with SIGTERM, as a DaemonSet rollout would; returns its exit status.
    pub fn stop_agent(&self) -> std::process::ExitStatus {
        let mut g = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let agent = g.as_mut().expect("agent started");
        agent.signal_and_wait(libc::SIGTERM)
    }

    /// The agent's output so far.
    pub fn agent_log(&self) -> Vec<String> {
        self.agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(Proc::lines)
            .unwrap_or_default()
    }

    /// Starts `cmd` in this node's network namespace and cgroup, in the background.
    pub fn spawn(&self, name: &str, cmd: Command) -> Proc {
        Proc::spawn(name, cmd, &self.netns.path(), &self.cgroup)
    }

    /// Runs `cmd` to completion in this node's network namespace and cgroup.
    pub fn output(&self, mut cmd: Command) -> std::process::Output {
        let _ns = spawn_in(&mut cmd, &self.netns.path(), &self.cgroup);
        cmd.output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
    }

    /// Runs the `ferrox` CLI on this node and returns its stdout.
    pub fn ferrox(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(bin_path("ferrox"));
        cmd.args(args)
            .env("FERROX_BPFFS_ROOT", self.layout().root())
            .env("FERROX_NODE_CONFIG", self.node_config());
        let _ns = spawn_in(&mut cmd, &self.netns.path(), &self.cgroup);
        run(&mut cmd)
    }

    /// Runs the `ferrox` CLI on this node; its whole output, whatever its status.
    pub fn ferrox_output(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin_path("ferrox"));
        cmd.args(args)
            .env("FERROX_BPFFS_ROOT", self.layout().root())
            .env("FERROX_NODE_CONFIG", self.node_config());
        let _ns = spawn_in(&mut cmd, &self.netns.path(), &self.cgroup);
        cmd.output().expect("running ferrox")
    }

    /// The services this node's datapath holds.
    pub fn services(&self) -> Vec<ServiceRow> {
        ferrox::cli::svc::services(&self.layout()).expect("reading the service maps")
    }

    /// Waits until `frontend` (e.g. `10.96.0.10:80/TCP`) has exactly `backends` backends for
    /// this node's own clients (internal scope).
    pub fn wait_for_backends(&self, frontend: &str, backends: usize) -> ServiceRow {
        self.wait_for_entry(frontend, Scope::Internal, backends)
    }

    /// Waits until the `scope` entry of `frontend` has exactly `backends` backends.
    pub fn wait_for_entry(&self, frontend: &str, scope: Scope, backends: usize) -> ServiceRow {
        wait_for(
            &format!(
                "{frontend} ({scope:?}) with {backends} backends on {}",
                self.name
            ),
            Duration::from_secs(30),
            || {
                let rows = self.services();
                match rows
                    .into_iter()
                    .find(|r| r.frontend == frontend && r.scope == scope)
                {
                    Some(r) if r.backends.len() == backends => Ok(r),
                    Some(r) => Err(format!("{} backends: {:?}", r.backends.len(), r.backends)),
                    None => Err("frontend not programmed".into()),
                }
            },
        )
    }

    /// Processes named `name` in the network namespace at `netns`, in this node's cgroup: a
    /// sandbox the test made itself.
    pub fn place_in(&self, name: &str, netns: &Path) -> Place {
        Place {
            name: name.into(),
            netns_path: netns.to_path_buf(),
            cgroup: self.cgroup.clone(),
        }
    }

    /// This node's host namespace, for clients that are processes of the node itself.
    pub fn host(&self) -> Place {
        Place {
            name: format!("{} host", self.name),
            netns_path: self.netns.path(),
            cgroup: self.cgroup.clone(),
        }
    }

    /// Waits until `frontend` is not programmed any more.
    pub fn wait_for_no_frontend(&self, frontend: &str) {
        wait_for(
            &format!("{frontend} to be removed on {}", self.name),
            Duration::from_secs(30),
            || {
                if self.services().iter().any(|r| r.frontend == frontend) {
                    Err("still programmed".into())
                } else {
                    Ok(())
                }
            },
        )
    }

    /// The network configuration the harness gives `ferrox-cni` on this node.
    pub fn cni_conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "ferrox",
            "type": "ferrox-cni",
            "nodeConfig": self.node_config(),
        })
    }

    /// Starts `plugin` (a CNI binary: `ferrox-cni` or a reference plugin's path) in this node's
    /// namespace as a runtime would: the CNI_* variables of `env` (CNI_PATH is added), `conf` on
    /// stdin. The caller waits for (or kills) it.
    pub fn cni_spawn(
        &self,
        plugin: &Path,
        env: &[(&str, &str)],
        conf: &serde_json::Value,
    ) -> std::process::Child {
        let mut cmd = Command::new(plugin);
        cmd.env_clear()
            .env("CNI_PATH", bin_path("ferrox-cni").parent().unwrap())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ns = spawn_in(&mut cmd, &self.netns.path(), &self.cgroup);
        let mut child = cmd.spawn().expect("starting a CNI plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child
    }

    /// [`Self::cni_spawn`] with `ferrox-cni`, waited for.
    pub fn cni_raw(&self, env: &[(&str, &str)], conf: &serde_json::Value) -> std::process::Output {
        self.cni_spawn(&bin_path("ferrox-cni"), env, conf)
            .wait_with_output()
            .unwrap()
    }

    fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: &str,
    ) -> std::process::Output {
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "ferrox",
            "type": "ferrox-cni",
            "nodeConfig": self.node_config(),
        });
        self.cni_with(
            &bin_path("ferrox-cni"),
            &conf,
            command,
            container_id,
            netns,
            pod,
        )
    }

    /// Runs `plugin` with the network configuration `conf`, as a container runtime would.
    fn cni_with(
        &self,
        plugin: &Path,
        conf: &serde_json::Value,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: &str,
    ) -> std::process::Output {
        // `pod` is `namespace/name`, or a name in the default namespace.
        let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
        let mut cmd = Command::new(plugin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap())
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        let _ns = spawn_in(&mut cmd, &self.netns.path(), &self.cgroup);
        let mut child = cmd.spawn().expect("starting ferrox-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Place {
    /// Starts `program <args>` here (any program: iperf3, ping, ...).
    pub fn command(&self, program: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Proc::spawn(
            &format!("{} {program} {}", self.name, args.join(" ")),
            cmd,
            &self.netns_path,
            &self.cgroup,
        )
    }

    /// Runs `program <args>` here to completion.
    pub fn command_output(&self, program: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        let _ns = spawn_in(&mut cmd, &self.netns_path, &self.cgroup);
        cmd.output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Starts `fx-echo <args>` here.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin_path("fx-echo"));
        cmd.args(args);
        Proc::spawn(
            &format!("{} {}", self.name, args.join(" ")),
            cmd,
            &self.netns_path,
            &self.cgroup,
        )
    }

    /// Starts an echo server named after the pod on `port` (TCP and UDP) and waits until it serves.
    pub fn serve(&self, port: u16) -> Proc {
        let p = port.to_string();
        let proc = self.spawn(&["serve", "--name", &self.name, "--tcp", &p, "--udp", &p]);
        proc.wait_for_line("the echo server", Duration::from_secs(10), |l| {
            l == "serving"
        });
        proc
    }

    /// Runs `fx-echo <args>` to completion here; returns its JSON output lines.
    pub fn run(&self, args: &[&str]) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
        let mut cmd = Command::new(bin_path("fx-echo"));
        cmd.args(args).stdin(Stdio::null());
        let _ns = spawn_in(&mut cmd, &self.netns_path, &self.cgroup);
        let out = cmd.output().expect("running fx-echo");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("fx-echo output {l:?}: {e}"))
            })
            .collect();
        (out.status, lines)
    }

    /// `count` TCP calls to `target`; returns how many each backend answered, and the peer
    /// addresses the application saw.
    pub fn call_tcp(&self, target: &str, count: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        let (status, lines) = self.run(&["call", "tcp", target, "--count", &count.to_string()]);
        assert!(
            status.success(),
            "calls from {} to {target} failed: {lines:?}",
            self.name
        );
        tally(&lines, "peer")
    }

    /// GET `path` from `target` (ip:port); returns the HTTP status and the body parsed as JSON.
    pub fn http_get(&self, target: &str, path: &str) -> (u16, serde_json::Value) {
        let (_, lines) = self.run(&["http-get", target, path]);
        let l = lines.first().cloned().unwrap_or_default();
        let status = l["status"].as_u64().unwrap_or(0) as u16;
        let body = serde_json::from_str(l["body"].as_str().unwrap_or("null")).unwrap_or_default();
        (status, body)
    }

    /// `count` UDP datagrams to `target` (unconnected socket: sendmsg/recvmsg).
    pub fn call_udp(&self, target: &str, count: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        let (status, lines) = self.run(&["call", "udp", target, "--count", &count.to_string()]);
        assert!(
            status.success(),
            "datagrams from {} to {target} failed: {lines:?}",
            self.name
        );
        tally(&lines, "from")
    }
}

/// `cmd` run through `wrapper` (the wrapper's program and arguments, then `cmd`'s program,
/// arguments and environment).
fn wrapped(cmd: Command, wrapper: &[String]) -> Command {
    let Some((program, args)) = wrapper.split_first() else {
        return cmd;
    };
    let mut w = Command::new(program);
    w.args(args).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    w
}

fn tally(lines: &[serde_json::Value], addr_field: &str) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut by_backend = BTreeMap::new();
    let mut addrs = Vec::new();
    for l in lines {
        *by_backend
            .entry(l["backend"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
        addrs.push(l[addr_field].as_str().unwrap_or_default().to_owned());
    }
    (by_backend, addrs)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let denied: Vec<String> = if failed {
            Vec::new()
        } else {
            self.denied_requests()
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {}?{} by {:?} from {:?}: {}",
                        r.verb, r.method, r.path, r.query, r.user, r.source, r.code
                    )
                })
                .collect()
        };
        if failed {
            for n in &self.nodes {
                let log = n.agent_log();
                let tail = &log[log.len().saturating_sub(40)..];
                eprintln!(
                    "---- agent log of {} (last {} lines) ----\n{}",
                    n.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        // 0. Processes in pods outside the nodes' cgroups.
        let unhooked = std::mem::take(
            &mut *self
                .unhooked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for cg in unhooked {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(cg.join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = std::fs::remove_dir(&cg) {
                eprintln!("harness: removing cgroup {}: {e}", cg.display());
            }
        }
        // 1. Stop every process of every node: agents, pod workloads.
        for n in &self.nodes {
            n.agent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let _ = std::fs::write(n.cgroup.join("cgroup.kill"), "1");
        }
        for n in &self.nodes {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(n.cgroup.join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // 2. Pods: CNI DEL as the runtime would, then their namespaces.
        let pods = std::mem::take(
            &mut *self
                .pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for p in pods {
            let out =
                self.nodes[p.node - 1].cni("DEL", &p.container_id, Some(&p.netns_path), &p.name);
            if !out.status.success() {
                eprintln!(
                    "harness: CNI DEL of {} failed: {}",
                    p.name,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            drop(p.netns);
        }
        // 3. Nodes: the agent's own cleanup, then the bpffs, the namespace, the cgroup.
        for n in self.nodes.drain(..) {
            let mut cmd = n.agent_command(&["--cleanup"]);
            let _ns = spawn_in(&mut cmd, &n.netns.path(), &n.cgroup);
            match cmd.output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "harness: agent --cleanup on {} failed: {}",
                    n.name,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("harness: agent --cleanup on {}: {e}", n.name),
            }
            let mount = n.bpffs_mount();
            if ferrox_datapath::bpffs::is_bpffs(&mount)
                && let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH)
            {
                eprintln!("harness: unmounting {}: {e}", mount.display());
            }
            drop(n.netns);
            if let Err(e) = std::fs::remove_dir(&n.cgroup) {
                eprintln!("harness: removing cgroup {}: {e}", n.cgroup.display());
            }
        }
        // 4. External clients, the underlay, the API server, the cluster's directories.
        let external = std::mem::take(
            &mut *self
                .external
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (k, netns) in external.into_iter().enumerate() {
            let cg = self.cgroup_dir.join(format!("external-{k}"));
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(cg.join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(netns);
            if let Err(e) = std::fs::remove_dir(&cg) {
                eprintln!("harness: removing cgroup {}: {e}", cg.display());
            }
        }
        self.fabric.take();
        self.api.take();
        let _ = std::fs::remove_dir(&self.cgroup_dir);
        let _ = std::fs::remove_dir(self.cgroup_dir.parent().unwrap_or(Path::new("/")));
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("harness: removing {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(leaks::RUN_DIR);
        assert!(
            denied.is_empty(),
            "the API server refused requests of the agents (their credentials, or the manifest's \
             ClusterRole): {denied:#?}"
        );
    }
}
