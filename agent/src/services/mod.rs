//! Services: from Kubernetes Service and EndpointSlice objects to the datapath's service maps.
//!
//! [`desired`] is the pure function (objects in, table out); [`reconcile`] diffs that table
//! against the maps and applies the smallest make-before-break change; [`sync`] is the thin
//! async shell that watches the API and runs the two, and keeps the [`health_check`] servers
//! of externalTrafficPolicy Local Services in step.

pub mod desired;
pub mod health_check;
pub mod maglev;
pub mod model;
pub mod reconcile;
pub mod slim;
pub mod state;
pub mod sync;
pub mod testing;
