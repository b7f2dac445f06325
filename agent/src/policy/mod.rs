//! NetworkPolicy (issue #19): the policies' semantics as plain data and the reference verdict
//! ([`model`]), and their compilation into identities and longest-prefix tables a datapath can
//! look up in bounded time ([`compile`]). Not enforced yet: the datapath maps and programs, the
//! watches and the CLI come next.

pub mod compile;
pub mod model;
#[cfg(test)]
mod testing;
