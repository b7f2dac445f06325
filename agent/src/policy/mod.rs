//! NetworkPolicy (issue #19): the policies' semantics as plain data and the reference verdict
//! ([`model`]), their compilation into identities and longest-prefix tables a datapath can look
//! up in bounded time ([`compile`]), those tables written into the kernel maps ([`tables`]),
//! which the programs enforce per packet (`ebpf/programs/src/policy.rs`), and the watches that
//! keep them in step with the API ([`sync`]).

pub mod compile;
pub mod model;
pub mod report;
pub mod sync;
pub mod tables;
pub mod testing;
