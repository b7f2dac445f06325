//! ferrox-cni library: what the `ferrox-cni` binary does, as plain functions, plus the node
//! configuration the agent writes for it.
//!
//! - [`spec`]: the CNI protocol (environment, configuration, results, errors); pure.
//! - [`plugin`]: the commands (ADD, DEL, STATUS, VERSION), with rollback.
//! - [`pod`]: the pod's veth, addresses and routes.
//! - [`ipam`]: the local address store.
//! - [`netlink`]: synchronous rtnetlink (links, addresses, routes, neighbours).
//! - [`node_config`]: the file the agent writes and the plugin reads.

pub mod ipam;
pub mod netlink;
pub mod node_config;
pub mod plugin;
pub mod pod;
pub mod spec;
