//! Privileged end-to-end tests of `ferrox_cni::netlink` (run as root:
//! `cargo test -p ferrox-cni --test netlink`).
//!
//! Every test makes its own network namespaces (`ip netns add fxnl-<pid>-<n>`)
//! and deletes them when it ends, panics included ([`TestNetns`]'s `Drop`).
//! All links live in those namespaces; the namespace running the tests is
//! only ever read. What the layer did is checked twice: through the layer
//! itself and independently through `ip -j`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "fixtures outside #[test] fns: a failed setup step must abort the test, with its error"
)]

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrox_cni::netlink::{
    LinkInfo, MAIN_TABLE, MacAddr, Netlink, NextHop, OperState, Route, Scope, THREAD_NETNS,
    get_sysctl, set_sysctl, with_netns,
};
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

/// The protocol number the tests tag their routes with (not in rt_protos).
const TEST_PROTO: u8 = 201;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const POD_IP: &str = "10.244.1.5/32";
const HOST_VETH: &str = "fxh0";

// ---------------------------------------------------------------- fixtures

/// A network namespace that exists for as long as this value does.
struct TestNetns {
    file: File,
    path: PathBuf,
    name: NetnsName,
}

/// Deletes the named namespace on drop, so it goes even if a later step of
/// the test (or of [`TestNetns::new`]) panics.
struct NetnsName(String);

impl Drop for NetnsName {
    fn drop(&mut self) {
        let deleted = Command::new("ip").args(["netns", "del", &self.0]).status();
        if !matches!(deleted, Ok(status) if status.success()) {
            eprintln!(
                "warning: could not delete test netns {}: {deleted:?}",
                self.0
            );
        }
    }
}

impl TestNetns {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests create network namespaces: run them as root"
        );
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fxnl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let name = NetnsName(name);
        let path = Path::new("/run/netns").join(&name.0);
        let file = File::open(&path).unwrap();
        Self { file, path, name }
    }

    fn netlink(&self) -> Netlink {
        Netlink::open_in(&self.file).unwrap()
    }

    /// `ip -n <ns> -j <args>`, parsed.
    fn ip_json(&self, args: &[&str]) -> Value {
        let output = run(Command::new("ip")
            .args(["-n", &self.name.0, "-j"])
            .args(args));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name.0, program])
            .args(args)
            .output()
            .unwrap()
    }
}

/// A pod-style veth pair: `fxh0` in `host`, `eth0` in `pod`, both up.
/// Fields drop in order: sockets first, then the namespaces.
struct PodLink {
    host_nl: Netlink,
    pod_nl: Netlink,
    host_veth: LinkInfo,
    eth0: LinkInfo,
    host: TestNetns,
    pod: TestNetns,
}

impl PodLink {
    fn new(mtu: Option<u32>) -> Self {
        let host = TestNetns::new();
        let pod = TestNetns::new();
        let host_nl = host.netlink();
        let pod_nl = pod.netlink();
        host_nl
            .create_veth(HOST_VETH, "eth0", &pod.file, mtu)
            .unwrap();
        let host_veth = host_nl
            .link(HOST_VETH)
            .unwrap()
            .expect("host veth exists in host ns");
        let eth0 = pod_nl.link("eth0").unwrap().expect("eth0 exists in pod ns");
        host_nl.set_up(host_veth.index).unwrap();
        pod_nl.set_up(eth0.index).unwrap();
        Self {
            host_nl,
            pod_nl,
            host_veth,
            eth0,
            host,
            pod,
        }
    }
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

/// The inode of the calling thread's network namespace.
fn thread_netns_inode() -> u64 {
    std::fs::metadata(THREAD_NETNS).unwrap().ino()
}

/// The route objects of `ip -j route show <args>` whose `dst` is `dst`.
fn ip_routes(ns: &TestNetns, args: &[&str], dst: &str) -> Vec<Value> {
    let mut full = vec!["route", "show"];
    full.extend_from_slice(args);
    let routes = ns.ip_json(&full);
    routes
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dst"] == dst)
        .cloned()
        .collect()
}

// ------------------------------------------------------------------ links

#[test]
fn veth_peer_is_created_directly_in_the_pod_namespace() {
    let link = PodLink::new(Some(1400));

    // Through the layer: each end where it belongs, with the MTU.
    assert_eq!(link.host_veth.mtu, Some(1400));
    assert_eq!(link.eth0.mtu, Some(1400));
    assert_eq!(link.host_veth.kind.as_deref(), Some("veth"));
    assert_eq!(link.eth0.kind.as_deref(), Some("veth"));
    assert_eq!(
        link.host_veth.link_index,
        Some(link.eth0.index),
        "IFLA_LINK names the peer"
    );
    assert!(
        link.host_nl.link("eth0").unwrap().is_none(),
        "the peer never lives in the host ns"
    );
    assert!(link.pod_nl.link(HOST_VETH).unwrap().is_none());
    let eth0 = link.pod_nl.link(link.eth0.index).unwrap().unwrap();
    assert_eq!(eth0.name, "eth0", "lookup by index finds the same link");
    assert!(eth0.up);
    // The kernel settles the operational state asynchronously (linkwatch):
    // wait for it, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    while link.pod_nl.link("eth0").unwrap().unwrap().oper_state != OperState::Up {
        assert!(
            Instant::now() < deadline,
            "eth0 never became operationally up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let listed: Vec<String> = link
        .pod_nl
        .list_links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(listed, ["lo", "eth0"]);

    // Independently, through iproute2.
    let eth0 = &link.pod.ip_json(&["link", "show", "eth0"])[0];
    assert_eq!(eth0["mtu"], 1400);
    assert_eq!(eth0["ifname"], "eth0");
    assert_eq!(eth0["address"], link.eth0.mac.unwrap().to_string());
    let host = &link.host.ip_json(&["link", "show", HOST_VETH])[0];
    assert_eq!(host["mtu"], 1400);

    // Creating it again is refused, distinguishably.
    let again = link
        .host_nl
        .create_veth(HOST_VETH, "eth1", &link.pod.file, None)
        .unwrap_err();
    assert!(again.is_already_exists(), "{again}");
    let taken_peer = link
        .host_nl
        .create_veth("fxh1", "eth0", &link.pod.file, None)
        .unwrap_err();
    assert!(taken_peer.is_already_exists(), "{taken_peer}");
    assert!(
        link.host_nl.link("fxh1").unwrap().is_none(),
        "a failed create leaves nothing behind"
    );
}

#[test]
fn link_attributes_can_be_changed() {
    let link = PodLink::new(None);
    let nl = &link.pod_nl;
    let mac: MacAddr = "02:fe:00:00:00:05".parse().unwrap();

    nl.set_mtu("eth0", 1300).unwrap();
    nl.set_mac(link.eth0.index, mac).unwrap();
    nl.set_down(link.eth0.index).unwrap();

    let eth0 = nl.link("eth0").unwrap().unwrap();
    assert_eq!(eth0.mtu, Some(1300));
    assert_eq!(eth0.mac, Some(mac));
    assert!(!eth0.up);
    let shown = &link.pod.ip_json(&["link", "show", "eth0"])[0];
    assert_eq!(shown["mtu"], 1300);
    assert_eq!(shown["address"], "02:fe:00:00:00:05");
    assert_eq!(shown["operstate"], "DOWN");

    let missing = nl.set_up("nosuch0").unwrap_err();
    assert!(missing.is_no_such_device(), "{missing}");
    assert!(
        missing.to_string().starts_with("set link up \"nosuch0\": "),
        "{missing}"
    );
    let too_long = nl.set_up("a-name-of-16byte").unwrap_err();
    assert!(
        too_long.to_string().contains("at most 15 bytes"),
        "{too_long}"
    );
}

#[test]
fn delete_link_is_idempotent_and_takes_the_peer_along() {
    let link = PodLink::new(None);

    assert!(link.host_nl.delete_link(link.host_veth.index).unwrap());
    assert!(!link.host_nl.delete_link(link.host_veth.index).unwrap());
    assert!(!link.host_nl.delete_link(HOST_VETH).unwrap());

    assert!(link.host_nl.link(HOST_VETH).unwrap().is_none());
    assert!(
        link.pod_nl.link("eth0").unwrap().is_none(),
        "deleting one end deletes the peer"
    );
    let names: Vec<Value> = link
        .pod
        .ip_json(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].clone())
        .collect();
    assert_eq!(names, ["lo"]);
}

// -------------------------------------------------------------- addresses

#[test]
fn addresses_are_added_listed_and_refused_twice() {
    let link = PodLink::new(None);
    let nl = &link.pod_nl;
    let pod_ip = net(POD_IP);

    nl.add_address(link.eth0.index, pod_ip).unwrap();
    let listed = nl.list_addresses(link.eth0.index).unwrap();
    assert!(listed.contains(&IpNet::V4(pod_ip)), "{listed:?}");
    assert!(
        nl.list_addresses(1)
            .unwrap()
            .iter()
            .all(|a| *a != IpNet::V4(pod_ip)),
        "lo does not get eth0's address"
    );

    let again = nl.add_address(link.eth0.index, pod_ip).unwrap_err();
    assert!(again.is_already_exists(), "{again}");
    assert_eq!(again.kind(), Some(std::io::ErrorKind::AlreadyExists));
    assert!(
        again.to_string().contains("add address 10.244.1.5/32"),
        "{again}"
    );

    let shown = &link.pod.ip_json(&["-4", "addr", "show", "eth0"])[0]["addr_info"];
    assert_eq!(shown[0]["local"], "10.244.1.5");
    assert_eq!(shown[0]["prefixlen"], 32);

    assert!(nl.del_address(link.eth0.index, pod_ip).unwrap());
    assert!(!nl.del_address(link.eth0.index, pod_ip).unwrap());
    let listed = nl.list_addresses(link.eth0.index).unwrap();
    assert!(
        listed.iter().all(|a| matches!(a, IpNet::V6(_))),
        "{listed:?}"
    );
}

// ----------------------------------------------------------------- routes

#[test]
fn pod_routes_round_trip_replace_and_delete() {
    let link = PodLink::new(None);
    let eth0 = link.eth0.index;

    // Pod side, in CNI order: the pod's address (an onlink gateway is only
    // accepted once the namespace has a local address), the gateway on the
    // link, then the default route through it.
    link.pod_nl.add_address(eth0, net(POD_IP)).unwrap();
    let to_gateway = Route::new(net("169.254.1.1/32"))
        .dev(eth0)
        .scope(Scope::Link);
    let default = Route::default_v4().via(GATEWAY).dev(eth0).onlink();
    link.pod_nl.add_route(&to_gateway).unwrap();
    link.pod_nl.add_route(&default).unwrap();
    let pod_routes = link.pod_nl.list_routes(MAIN_TABLE).unwrap();
    assert_eq!(pod_routes, [default.clone(), to_gateway.clone()]);

    let shown = ip_routes(&link.pod, &[], "default");
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["gateway"], "169.254.1.1");
    assert_eq!(shown[0]["dev"], "eth0");
    assert_eq!(shown[0]["flags"], serde_json::json!(["onlink"]));
    let shown = ip_routes(&link.pod, &[], "169.254.1.1");
    assert_eq!(shown[0]["scope"], "link");
    assert_eq!(shown[0]["dev"], "eth0");

    // Host side: the pod's /32, tagged with our protocol.
    let host = &link.host_nl;
    let to_pod = Route::new(net(POD_IP))
        .dev(link.host_veth.index)
        .scope(Scope::Link)
        .protocol(TEST_PROTO);
    host.add_route(&to_pod).unwrap();
    let found: Vec<Route> = host
        .list_routes(MAIN_TABLE)
        .unwrap()
        .into_iter()
        .filter(|r| r.protocol == TEST_PROTO)
        .collect();
    assert_eq!(found, std::slice::from_ref(&to_pod));
    let shown = ip_routes(&link.host, &["proto", "201"], "10.244.1.5");
    assert_eq!(shown.len(), 1, "ip route show proto 201 finds it");
    assert_eq!(shown[0]["dev"], HOST_VETH);

    let again = host.add_route(&to_pod).unwrap_err();
    assert!(again.is_already_exists(), "{again}");

    // Replace: same destination, now with a preferred source address.
    host.set_up(1).unwrap();
    host.add_address(1, net("10.255.0.1/32")).unwrap();
    let replaced = to_pod.clone().source(Ipv4Addr::new(10, 255, 0, 1));
    host.replace_route(&replaced).unwrap();
    let found: Vec<Route> = host
        .list_routes(MAIN_TABLE)
        .unwrap()
        .into_iter()
        .filter(|r| r.dst == net(POD_IP))
        .collect();
    assert_eq!(
        found,
        std::slice::from_ref(&replaced),
        "replaced in place, not added"
    );
    assert_eq!(
        ip_routes(&link.host, &[], "10.244.1.5")[0]["prefsrc"],
        "10.255.0.1"
    );

    // Delete: true, then false; a different protocol does not match.
    assert!(
        !host
            .del_route(&replaced.clone().protocol(TEST_PROTO + 1))
            .unwrap()
    );
    assert!(host.del_route(&replaced).unwrap());
    assert!(!host.del_route(&replaced).unwrap());
    assert!(ip_routes(&link.host, &[], "10.244.1.5").is_empty());
}

#[test]
fn ecmp_route_round_trips_in_a_custom_table() {
    let link = PodLink::new(None);
    let host = &link.host_nl;
    // A second link for the second next hop (both ends in the host ns).
    host.create_veth("fxup0", "fxup1", &link.host.file, None)
        .unwrap();
    let uplink = host.link("fxup0").unwrap().unwrap().index;
    host.set_up(uplink).unwrap();
    host.set_up("fxup1").unwrap();

    // Onlink gateways need a local address in the namespace: bring lo up.
    host.set_up(1).unwrap();
    let table = 1000;
    let ecmp = Route::new(net("10.250.0.0/24"))
        .table(table)
        .protocol(TEST_PROTO)
        .next_hop(NextHop::via(Ipv4Addr::new(192, 0, 2, 1), link.host_veth.index).onlink())
        .next_hop(
            NextHop::via(Ipv4Addr::new(192, 0, 2, 2), uplink)
                .onlink()
                .weight(3),
        );
    host.add_route(&ecmp).unwrap();

    assert_eq!(
        host.list_routes(table).unwrap(),
        std::slice::from_ref(&ecmp)
    );
    assert!(
        host.list_routes(MAIN_TABLE)
            .unwrap()
            .iter()
            .all(|r| r.dst != ecmp.dst),
        "the route stays in its table"
    );

    let shown = ip_routes(&link.host, &["table", "1000"], "10.250.0.0/24");
    let hops = shown[0]["nexthops"].as_array().unwrap();
    assert_eq!(hops.len(), 2);
    assert_eq!(hops[0]["gateway"], "192.0.2.1");
    assert_eq!(hops[0]["dev"], HOST_VETH);
    assert_eq!(hops[1]["gateway"], "192.0.2.2");
    assert_eq!(hops[1]["dev"], "fxup0");
    assert_eq!(hops[1]["weight"], 3);

    assert!(host.del_route(&ecmp).unwrap());
    assert!(host.list_routes(table).unwrap().is_empty());
}

// ------------------------------------------------------------- neighbours

#[test]
fn static_neighbours_are_added_replaced_and_deleted() {
    let link = PodLink::new(None);
    let nl = &link.pod_nl;
    let gateway = IpAddr::V4(GATEWAY);
    let host_mac = link.host_veth.mac.unwrap();

    nl.add_neighbour(link.eth0.index, gateway, host_mac, true)
        .unwrap();
    let entries = nl.list_neighbours(link.eth0.index).unwrap();
    let entry = entries.iter().find(|n| n.ip == gateway).unwrap();
    assert_eq!(entry.mac, Some(host_mac));
    assert!(entry.permanent);
    let shown = link.pod.ip_json(&["neigh", "show", "dev", "eth0"]);
    assert_eq!(shown[0]["dst"], "169.254.1.1");
    assert_eq!(shown[0]["lladdr"], host_mac.to_string());
    assert_eq!(shown[0]["state"], serde_json::json!(["PERMANENT"]));

    let again = nl
        .add_neighbour(link.eth0.index, gateway, host_mac, true)
        .unwrap_err();
    assert!(again.is_already_exists(), "{again}");
    let other: MacAddr = "02:00:00:00:00:99".parse().unwrap();
    nl.replace_neighbour(link.eth0.index, gateway, other, true)
        .unwrap();
    let entries = nl.list_neighbours(link.eth0.index).unwrap();
    assert_eq!(
        entries.iter().find(|n| n.ip == gateway).unwrap().mac,
        Some(other)
    );

    assert!(nl.del_neighbour(link.eth0.index, gateway).unwrap());
    assert!(!nl.del_neighbour(link.eth0.index, gateway).unwrap());
    assert!(
        nl.list_neighbours(link.eth0.index)
            .unwrap()
            .iter()
            .all(|n| n.ip != gateway)
    );
}

// ------------------------------------------------------------- namespaces

#[test]
fn open_in_and_with_netns_always_restore_the_thread_namespace() {
    let before = thread_netns_inode();

    let missing = Netlink::open_in_path(Path::new("/run/netns/fxnl-does-not-exist")).unwrap_err();
    assert!(
        missing.to_string().contains("fxnl-does-not-exist"),
        "{missing}"
    );
    assert_eq!(thread_netns_inode(), before);

    let not_a_netns = File::open("/dev/null").unwrap();
    let refused = Netlink::open_in(&not_a_netns).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
    assert_eq!(thread_netns_inode(), before);

    let ns = TestNetns::new();
    let target = std::fs::metadata(&ns.path).unwrap().ino();
    assert_ne!(target, before);
    let inside = with_netns(&ns.path, thread_netns_inode).unwrap();
    assert_eq!(
        inside, target,
        "the closure really ran in the target namespace"
    );
    assert_eq!(thread_netns_inode(), before);

    let failed: Result<(), String> =
        with_netns(&ns.path, || Err("closure failed".to_owned())).unwrap();
    assert!(failed.is_err());
    assert_eq!(thread_netns_inode(), before);

    let panicked = std::panic::catch_unwind(|| with_netns(&ns.path, || panic!("boom")));
    assert!(panicked.is_err());
    assert_eq!(thread_netns_inode(), before, "restored while unwinding");

    // A socket opened in the namespace keeps answering for it afterwards.
    let nl = ns.netlink();
    assert_eq!(thread_netns_inode(), before);
    let names: Vec<String> = nl
        .list_links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["lo"]);
}

#[test]
fn sysctl_writes_land_in_the_namespace_of_the_calling_thread() {
    let link = PodLink::new(None);
    let key = format!("net/ipv4/conf/{HOST_VETH}/proxy_arp");
    with_netns(&link.host.path, || set_sysctl(&key, "1"))
        .unwrap()
        .unwrap();
    let value = with_netns(&link.host.path, || get_sysctl(&key))
        .unwrap()
        .unwrap();
    assert_eq!(value, "1");
    let shown = link
        .host
        .exec("sysctl", &["-n", "net.ipv4.conf.fxh0.proxy_arp"]);
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "1");
    // The test's own namespace has no such interface.
    let outside = get_sysctl(&key).unwrap_err();
    assert_eq!(
        outside.kind(),
        Some(std::io::ErrorKind::NotFound),
        "{outside}"
    );
}

// ---------------------------------------------------------------- traffic

/// Configures `link` the way a CNI ADD would, except for how the pod learns
/// the gateway's MAC (`arp`).
fn configure_pod_link(link: &PodLink, arp: impl FnOnce(&PodLink)) {
    let host = &link.host_nl;
    // The host owns 10.255.0.1: the pod pings it, nothing is forwarded.
    host.set_up(1).unwrap();
    host.add_address(1, net("10.255.0.1/32")).unwrap();
    host.add_route(
        &Route::new(net(POD_IP))
            .dev(link.host_veth.index)
            .scope(Scope::Link)
            .protocol(TEST_PROTO),
    )
    .unwrap();

    let pod = &link.pod_nl;
    pod.add_address(link.eth0.index, net(POD_IP)).unwrap();
    pod.add_route(
        &Route::new(net("169.254.1.1/32"))
            .dev(link.eth0.index)
            .scope(Scope::Link),
    )
    .unwrap();
    pod.add_route(
        &Route::default_v4()
            .via(GATEWAY)
            .dev(link.eth0.index)
            .onlink(),
    )
    .unwrap();
    arp(link);
}

fn assert_pod_reaches_host(link: &PodLink) {
    let ping = link.pod.exec("ping", &["-c1", "-W2", "10.255.0.1"]);
    assert!(
        ping.status.success(),
        "pod cannot reach the host: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
}

#[test]
fn pod_reaches_host_through_proxy_arp() {
    let link = PodLink::new(Some(1450));
    configure_pod_link(&link, |link| {
        // Proxy ARP answers for 169.254.1.1 only if the host would forward
        // to it out of *another* interface: forwarding on the veth, and a
        // route to the gateway address (on a node, its default route; here
        // a route to lo stands in for it).
        link.host_nl
            .add_route(
                &Route::new(net("169.254.1.1/32"))
                    .dev(1)
                    .scope(Scope::Link)
                    .protocol(TEST_PROTO),
            )
            .unwrap();
        with_netns(&link.host.path, || {
            set_sysctl(&format!("net/ipv4/conf/{HOST_VETH}/proxy_arp"), "1")?;
            set_sysctl(&format!("net/ipv4/conf/{HOST_VETH}/forwarding"), "1")?;
            // Answer at once instead of after up to 0.8 s (proxy_delay).
            set_sysctl(&format!("net/ipv4/neigh/{HOST_VETH}/proxy_delay"), "0")
        })
        .unwrap()
        .unwrap();
    });
    assert_pod_reaches_host(&link);
}

#[test]
fn pod_reaches_host_through_a_static_arp_entry() {
    let link = PodLink::new(None);
    configure_pod_link(&link, |link| {
        let host_mac = link.host_veth.mac.unwrap();
        link.pod_nl
            .add_neighbour(link.eth0.index, IpAddr::V4(GATEWAY), host_mac, true)
            .unwrap();
    });
    assert_pod_reaches_host(&link);
}
