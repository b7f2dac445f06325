//! Parts of `cargo xtask bench` that compute things, unit-tested.
pub mod realistic;
pub mod rulesets;
pub mod stats;
pub mod svg;
