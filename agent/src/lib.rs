//! ferrox: the node agent (`ferrox agent`) and the node CLI, as a library so that the tests can
//! reach its pure parts.
//!
//! - [`cli`]: the node commands (`ferrox svc list`, `ferrox ct flush`, `ferrox install-cni`,
//!   ...), one file each; nothing else imports it.
//! - [`daemon`]: `ferrox agent`'s flags, start-up and shutdown; it starts the subsystems below.
//! - The daemon's subsystems: [`services`] (Services and EndpointSlices to the service maps),
//!   [`routing`] (other nodes' pod blocks to kernel routes and tunnels), [`bgp`] (the speaker),
//!   [`ipam`] (this node's address blocks, leaked addresses), [`conntrack`] (flow collection),
//!   [`sockets`] (closing sockets to departed backends), [`observability`] (`/metrics`,
//!   `/healthz`, the status socket and the status document).
//!
//! - Shared by them: [`logging`] (log output) and [`heap`] (the allocator's arenas, and giving
//!   freed memory back).
//!
//! `cargo xtask lint` checks that these modules import each other without a cycle.

pub mod bgp;
pub mod cli;
pub mod conntrack;
pub mod daemon;
pub mod heap;
pub mod ipam;
pub mod logging;
pub mod observability;
pub mod policy;
pub mod routing;
pub mod services;
pub mod sockets;
