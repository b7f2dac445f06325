//! ferrox-cni library: what the `ferrox-cni` binary does, as plain functions.

pub mod netlink;
