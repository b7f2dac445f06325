//! NetworkPolicy (issue #19): the policies' semantics as plain data and the reference verdict
//! ([`model`]), their compilation into identities and longest-prefix tables a datapath can look
//! up in bounded time ([`compile`]), and those tables written into the kernel maps
//! ([`tables`]). Not enforced yet: the kernel checks, the watches and the CLI come next.

pub mod compile;
pub mod model;
pub mod tables;
pub mod testing;
