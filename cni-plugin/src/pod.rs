//! A pod's network, made of plain netlink calls: the veth pair (pod side created directly in
//! the pod's namespace), the pod's `/32` and its routes through a link-local gateway, and the
//! host side's route to the pod and proxy ARP, as Calico does.

use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;

use crate::netlink::{self, MacAddr, Netlink, Route, Scope};

/// Routes ferrox installs carry this protocol number (`ip route show proto 242`), so they can
/// be told from everyone else's.
pub const ROUTE_PROTOCOL: u8 = 242;

/// The host-side interface name of a pod's veth: `fx` and 11 hex digits of a hash of the
/// container id and interface name (15 characters, the kernel's limit), stable across retries.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain(*b"/").chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fx{:011x}", h >> 20)
}

/// Whether `name` has the shape of [`host_ifname`]'s names.
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 13
        && name.starts_with("fx")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Prefix of a retired host veth's name (see [`retire`]).
const RETIRED_PREFIX: &str = "fxdel";

/// The name a host veth gets when its attachment is released: `fxdel` and its ifindex in hex
/// (at most 13 bytes; never the shape of [`host_ifname`]'s names, so an ADD never meets it).
pub fn retired_ifname(ifindex: u32) -> String {
    format!("{RETIRED_PREFIX}{ifindex:x}")
}

/// Whether `name` is a retired host veth's (see [`retired_ifname`]).
pub fn is_retired_ifname(name: &str) -> bool {
    name.strip_prefix(RETIRED_PREFIX).is_some_and(|hex| {
        !hex.is_empty()
            && hex.len() <= 8
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// Takes a pod's host veth out of service at once, without waiting for the kernel to destroy
/// it: down (which also removes its routes, so the address can go to another pod at once, and
/// stops anything the pod still sends) and renamed to [`retired_ifname`] (so a new attachment
/// can take its name). Destroying a veth waits for RCU barriers (~35 ms here, serialised with
/// every other link change of the node); the retired veth goes when the runtime deletes the pod's
/// network namespace (the usual case right after DEL), or when the agent sweeps retired veths
/// ([`remove_retired`]). Returns the veth's ifindex, `None` when there was no such veth.
pub fn retire(host_ifname: &str) -> Result<Option<u32>, PodError> {
    let host = Netlink::open().map_err(step("opening netlink in the host namespace"))?;
    let Some(link) = host
        .link(host_ifname)
        .map_err(step("reading the host veth"))?
    else {
        return Ok(None);
    };
    let gone = |e: &netlink::Error| e.is_no_such_device();
    match host.set_down(link.index) {
        Ok(()) => {}
        Err(e) if gone(&e) => return Ok(Some(link.index)),
        Err(e) => return Err(step("setting the host veth down")(e)),
    }
    match host.set_name(link.index, &retired_ifname(link.index)) {
        Ok(()) => Ok(Some(link.index)),
        Err(e) if gone(&e) => Ok(Some(link.index)),
        Err(e) => Err(step("renaming the retired host veth")(e)),
    }
}

/// Whether a link with index `ifindex` exists in this network namespace (true when that
/// cannot be told: nothing is removed on a doubt).
pub fn link_exists(ifindex: u32) -> bool {
    Netlink::open()
        .and_then(|nl| nl.link(ifindex))
        .map_or(true, |l| l.is_some())
}

/// Destroys the pod's `ifname` when it is the pod side of a veth whose host side was retired
/// (an earlier attachment of this namespace that DEL released); anything else keeps its name,
/// and the ADD fails on it.
fn remove_retired_pod_side(
    host: &Netlink,
    pod_ns: &std::fs::File,
    ifname: &str,
) -> Result<(), PodError> {
    use std::os::fd::AsFd as _;
    let pod_link = netlink::with_netns_fd(pod_ns.as_fd(), || {
        Netlink::open().and_then(|nl| nl.link(ifname))
    })
    .map_err(step("entering the pod's namespace"))?
    .map_err(step("reading the pod's interface"))?;
    let Some(peer) = pod_link
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .and_then(|l| l.link_index)
    else {
        return Ok(());
    };
    if let Some(host_side) = host.link(peer).map_err(step("reading a retired veth"))?
        && is_retired_ifname(&host_side.name)
    {
        host.delete_link(peer)
            .map_err(step("removing a retired veth"))?;
    }
    Ok(())
}

/// Destroys every retired host veth of this network namespace; returns how many.
pub fn remove_retired() -> Result<usize, PodError> {
    let host = Netlink::open().map_err(step("opening netlink in the host namespace"))?;
    let mut removed = 0;
    for l in host.list_links().map_err(step("listing links"))? {
        if is_retired_ifname(&l.name)
            && l.kind.as_deref() == Some("veth")
            && host
                .delete_link(l.index)
                .map_err(step("deleting a retired veth"))?
        {
            removed += 1;
        }
    }
    Ok(removed)
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("opening the pod's network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: netlink::Error,
    },
    #[error("{step}")]
    Netlink {
        step: &'static str,
        #[source]
        source: netlink::Error,
    },
    #[error("interface {name} vanished while it was being set up")]
    Vanished { name: String },
}

fn step(step: &'static str) -> impl FnOnce(netlink::Error) -> PodError {
    move |source| PodError::Netlink { step, source }
}

/// What [`setup`] built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: Option<MacAddr>,
    pub pod_ifname: String,
    pub pod_mac: Option<MacAddr>,
}

/// Builds the pod's network. The calling thread must be in the host's network namespace.
/// On error, whatever was created is left for the caller's rollback ([`teardown`]).
pub fn setup(
    netns: &Path,
    container_id: &str,
    ifname: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<PodNetwork, PodError> {
    create_pair(netns, container_id, ifname, mtu)?.configure(ip, gateway)
}

/// A veth pair made by [`create_pair`], not configured yet: its host side exists (programs can
/// be attached to it while the rest is set up).
pub struct Pair {
    pod_ns: std::fs::File,
    host: Netlink,
    host_ifname: String,
    ifname: String,
}

impl Pair {
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }
}

/// Creates the veth pair, the pod side directly in the pod's namespace.
pub fn create_pair(
    netns: &Path,
    container_id: &str,
    ifname: &str,
    mtu: u32,
) -> Result<Pair, PodError> {
    let pod_ns = netlink::open_netns(netns).map_err(|source| PodError::Netns {
        path: netns.display().to_string(),
        source,
    })?;
    let host = Netlink::open().map_err(step("opening netlink in the host namespace"))?;
    let host_ifname = host_ifname(container_id, ifname);

    match host.create_veth(&host_ifname, ifname, &pod_ns, Some(mtu)) {
        Err(e) if e.is_already_exists() => {
            // A retried ADD, or an ADD into a namespace whose earlier attachment DEL retired:
            // start again from nothing.
            host.delete_link(host_ifname.as_str())
                .map_err(step("removing a stale host veth"))?;
            remove_retired_pod_side(&host, &pod_ns, ifname)?;
            host.create_veth(&host_ifname, ifname, &pod_ns, Some(mtu))
                .map_err(step("creating the veth pair"))?;
        }
        r => r.map_err(step("creating the veth pair"))?,
    }
    Ok(Pair {
        pod_ns,
        host,
        host_ifname,
        ifname: ifname.to_owned(),
    })
}

impl Pair {
    /// The pod's address and routes, and the host side's route and proxy ARP.
    pub fn configure(self, ip: Ipv4Addr, gateway: Ipv4Addr) -> Result<PodNetwork, PodError> {
        let Self {
            pod_ns,
            host,
            host_ifname,
            ifname,
        } = self;
        let ifname = ifname.as_str();
        configure(&pod_ns, &host, host_ifname, ifname, ip, gateway)
    }
}

fn configure(
    pod_ns: &std::fs::File,
    host: &Netlink,
    host_ifname: String,
    ifname: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<PodNetwork, PodError> {
    let host_link = host
        .link(host_ifname.as_str())
        .map_err(step("reading the host veth"))?
        .ok_or_else(|| PodError::Vanished {
            name: host_ifname.clone(),
        })?;

    // Pod side: lo and eth0 up, the /32, a link route to the gateway and the default route
    // through it, and a permanent neighbour entry so the gateway never needs ARP.
    let in_pod = Netlink::open_in(pod_ns).map_err(step("opening netlink in the pod namespace"))?;
    in_pod
        .set_up("lo")
        .map_err(step("setting lo up in the pod"))?;
    let pod_link = in_pod
        .link(ifname)
        .map_err(step("reading the pod interface"))?
        .ok_or_else(|| PodError::Vanished {
            name: ifname.into(),
        })?;
    // Its MAC says its address (`ferrox_abi::pod_mac`): the programs address packets they hand
    // straight into the pod without a neighbour lookup, and the host needs no ARP for it.
    let pod_mac = MacAddr(ferrox_abi::pod_mac(u32::from_ne_bytes(ip.octets())));
    in_pod
        .set_mac(pod_link.index, pod_mac)
        .map_err(step("setting the pod interface's MAC"))?;
    in_pod
        .set_up(pod_link.index)
        .map_err(step("setting the pod interface up"))?;
    in_pod
        .add_address(pod_link.index, Ipv4Net::from(ip))
        .map_err(step("adding the pod address"))?;
    in_pod
        .add_route(
            &Route::new(Ipv4Net::from(gateway))
                .dev(pod_link.index)
                .scope(Scope::Link),
        )
        .map_err(step("adding the pod's route to its gateway"))?;
    in_pod
        .add_route(&Route::default_v4().via(gateway).dev(pod_link.index))
        .map_err(step("adding the pod's default route"))?;
    if let Some(mac) = host_link.mac {
        in_pod
            .replace_neighbour(pod_link.index, gateway.into(), mac, true)
            .map_err(step("adding the gateway's neighbour entry in the pod"))?;
    }

    // Host side: up, proxy ARP (answers for the gateway if the neighbour entry is ever
    // flushed), and the route to the pod.
    host.set_up(host_link.index)
        .map_err(step("setting the host veth up"))?;
    netlink::set_sysctl(&format!("net/ipv4/conf/{host_ifname}/proxy_arp"), "1")
        .map_err(step("enabling proxy ARP on the host veth"))?;
    host.replace_route(
        &Route::new(Ipv4Net::from(ip))
            .dev(host_link.index)
            .scope(Scope::Link)
            .protocol(ROUTE_PROTOCOL),
    )
    .map_err(step("adding the host route to the pod"))?;
    host.replace_neighbour(host_link.index, ip.into(), pod_mac, true)
        .map_err(step("adding the pod's neighbour entry on the host"))?;

    Ok(PodNetwork {
        host_ifname,
        host_ifindex: host_link.index,
        host_mac: host_link.mac,
        pod_ifname: ifname.into(),
        pod_mac: Some(pod_mac),
    })
}

/// Removes the pod's veth pair (its routes go with it). False when it was already gone.
pub fn teardown(host_ifname: &str) -> Result<bool, PodError> {
    let host = Netlink::open().map_err(step("opening netlink in the host namespace"))?;
    host.delete_link(host_ifname)
        .map_err(step("deleting the host veth"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_distinct_and_fit_the_kernel_limit() {
        let a = host_ifname("abc123", "eth0");
        assert_eq!(a, host_ifname("abc123", "eth0"));
        assert_ne!(a, host_ifname("abc124", "eth0"));
        assert_ne!(a, host_ifname("abc123", "net1"));
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("fx"));
    }

    #[test]
    fn retired_names_fit_and_are_never_host_names() {
        for ifindex in [1, 0xabc, u32::MAX] {
            let n = retired_ifname(ifindex);
            assert!(n.len() <= 15, "{n}");
            assert!(is_retired_ifname(&n), "{n}");
            assert!(!is_host_ifname(&n), "{n}");
        }
        assert!(!is_retired_ifname(&host_ifname("abc", "eth0")));
        assert!(!is_retired_ifname("fxdel"));
        assert!(!is_retired_ifname("fxdelXYZ"));
        assert!(!is_retired_ifname("fxdel123456789"));
    }
}
