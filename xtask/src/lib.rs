//! The parts of `cargo xtask` that tests reach: the OCI image builder and checker, and the
//! module-graph check of `cargo xtask lint`.

pub mod modgraph;
pub mod oci;
