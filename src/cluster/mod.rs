//! Several torpor nodes (scale-out): the pieces that let nodes share actors and route tunnel
//! traffic to each other. Being built; see ARCHITECTURE.md, "Several nodes".
//!
//! - [`link`]: reliable, ordered delivery of control messages between two nodes over a bus
//!   that loses, duplicates and reorders (core NATS, the simulation's bus).

pub mod link;
