//! Services: from Kubernetes Service and EndpointSlice objects to the datapath's service maps.
//!
//! [`desired`] is the pure function (objects in, table out); [`reconcile`] diffs that table
//! against the maps and applies the smallest make-before-break change; [`sync`] is the thin
//! async shell that watches the API and runs the two.

pub mod desired;
pub mod maglev;
pub mod model;
pub mod reconcile;
pub mod state;
pub mod sync;
pub mod testing;
