//! The netns cluster harness: `Cluster::builder().nodes(2).build()` gives a cluster of nodes on
//! one machine, each a network namespace with its own uplink on a shared underlay bridge, its own
//! cgroup, its own bpffs and its own `ferrox agent` process, all driven by a Kubernetes API test
//! server. Pods are network namespaces set up by the real `ferrox-cni` binary, invoked as a
//! container runtime would. Everything is torn down when the cluster is dropped, also when the
//! test panics; [`leaks`] finds anything that was not. The agents run as the manifest's
//! ServiceAccount over HTTPS, under its ClusterRole; [`endpoint_slices`] writes a Service's
//! endpoints as the real controller does, [`PodDeletion`] deletes a pod as Kubernetes does, and
//! [`Cluster::expire_watches`] makes every agent re-list after 410 Gone.
//!
//! Nothing here touches the machine's own interfaces, routes or root cgroup.

mod bins;
pub mod bird;
mod cluster;
pub mod containerd;
pub mod endpoint_slices;
pub mod frr;
pub mod gobgp;
pub mod leaks;
mod netns;
mod pod_deletion;
mod process;
pub mod router;

pub use bins::bin_path;
pub use cluster::{
    Capture, Cluster, ClusterBuilder, ExternalClient, Node, Place, Pod, SERVICE_CIDR,
    SUBNET2_ROUTER,
};
pub use netns::NetNs;
pub use pod_deletion::PodDeletion;
pub use process::{Proc, spawn_in};

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what` and the last
/// observation. Tests wait for conditions, never for a fixed time.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    let mut delay = std::time::Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => {}
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(200));
    }
}

/// Polls (every millisecond, no back-off: callers time this) until the ClusterIP frontend
/// `addr:port/TCP` has `backends` backends in `maps`; panics after 30 s. Reads that one entry
/// only, so polling costs nothing next to what is timed.
pub fn wait_for_frontend(
    maps: &ferrox_datapath::Maps,
    addr: std::net::Ipv4Addr,
    port: u16,
    backends: u16,
) {
    let key = ferrox_abi::ServiceKey::master(u32::from_ne_bytes(addr.octets()), port.to_be(), 6)
        .with_scope(ferrox_abi::scope::INTERNAL);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while maps
        .services
        .get(&key)
        .unwrap()
        .is_none_or(|m| m.count != backends)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr}:{port} was not programmed with {backends} backends"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// How many Service frontends (master entries) and backends `maps` hold.
pub fn programmed_services(maps: &ferrox_datapath::Maps) -> (usize, usize) {
    let masters = maps
        .services
        .entries()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .count();
    (masters, maps.backends.len().unwrap())
}
