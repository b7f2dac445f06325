//! The agent's BGP speaker: [`wire`] (the message format, and the NOTIFICATION of every
//! malformed message), [`rib`] (paths and the decision process), [`speaker`] (sessions, their
//! timers, and what is announced to each peer) and [`peers`] (who to peer with, from
//! `BGPPeer` objects, flags and Node annotations). Learned routes go to [`crate::routing`].

pub mod peers;
pub mod rib;
pub mod speaker;
pub mod wire;
