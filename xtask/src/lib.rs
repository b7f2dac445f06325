//! The parts of `cargo xtask` that tests reach: the OCI image builder and checker.

pub mod oci;
