//! A small synchronous rtnetlink layer: links, addresses, routes and
//! neighbours in any network namespace, plus the sysctls that go with them.
//!
//! Owns every netlink conversation of the CNI plugin (and, later, of the
//! agent's route programming): a [`Netlink`] is a NETLINK_ROUTE socket bound
//! to one namespace; each method sends one request with
//! `NLM_F_REQUEST | NLM_F_ACK`, waits for the kernel's answer to *that*
//! request (matched by sequence number) and returns plain data
//! ([`LinkInfo`], [`Route`], [`IpNet`](ipnet::IpNet), ...) or an [`Error`]
//! saying which operation failed on what, with the kernel's errno.
//!
//! Must never: start an async runtime or threads, shell out to `ip`, leave
//! the calling thread in another namespace ([`with_netns`] and
//! [`Netlink::open_in`] always move it back), or report success before the
//! kernel acknowledged. Deletions are idempotent (`Ok(false)` when already
//! gone); creations are not (`EEXIST` is an error callers may accept, see
//! [`Error::is_already_exists`]).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ferrox_cni::netlink::{Netlink, Route, Scope, open_netns};
//! use std::path::Path;
//!
//! let pod = open_netns(Path::new("/run/netns/pod1"))?;
//! let host = Netlink::open()?;
//! host.create_veth("fxh1a2b3c", "eth0", &pod, Some(1450))?;
//! let veth = host.link("fxh1a2b3c")?.ok_or("veth vanished")?.index;
//! host.set_up(veth)?;
//! host.add_route(&Route::new("10.244.1.5/32".parse()?).dev(veth).scope(Scope::Link))?;
//!
//! let in_pod = Netlink::open_in(&pod)?;
//! in_pod.set_up("eth0")?;
//! # Ok(())
//! # }
//! ```

mod address;
mod error;
mod link;
mod neighbour;
mod netns;
mod route;
mod socket;
mod sysctl;

pub use error::{Error, Result};
pub use link::{LinkId, LinkInfo, MacAddr, OperState, ParseMacError};
pub use neighbour::Neighbour;
pub use netns::{THREAD_NETNS, current_netns, open_netns, with_netns, with_netns_fd};
pub use route::{ALL_TABLES, LOCAL_TABLE, MAIN_TABLE, NextHop, Route, RouteKind, Scope};
pub use socket::Netlink;
pub use sysctl::{get_sysctl, set_sysctl};
