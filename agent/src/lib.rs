//! ferrox: the node agent (`ferrox agent`) and the node CLI, as a library so that the tests can
//! reach its pure parts.

pub mod bgp;
pub mod cli;
pub mod conntrack;
pub mod ct_cli;
pub mod daemon;
pub mod health;
pub mod inspect;
pub mod install;
pub mod ipam;
pub mod ipam_cli;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod routes_cli;
pub mod routing;
pub mod services;
pub mod sockets;
pub mod status;
pub mod trace;
