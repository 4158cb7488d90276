//! Several torpor nodes (scale-out): the pieces that let nodes share actors and route tunnel
//! traffic to each other. Being built; see ARCHITECTURE.md, "Several nodes".
//!
//! - [`link`]: reliable, ordered delivery of control messages between two nodes over a bus
//!   that loses, duplicates and reorders (core NATS, the simulation's bus).
//! - [`lease`]: one placement leader at a time, the sans-IO lease state machine of a node.
//! - [`pg_lease`]: that lease in PostgreSQL (epoch row, advisory lock) and the epoch fence on
//!   the store's writes.

pub mod lease;
pub mod link;
pub mod pg_lease;
