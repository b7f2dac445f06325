//! What the agent tells the world about itself: Prometheus `/metrics`, `/healthz`, and the
//! status document served on its owner-only unix socket (which `ferrox status` and
//! `ferrox bgp` read). The subsystems record into these; nothing here decides anything.

pub mod health;
pub mod http;
pub mod metrics;
pub mod status;
