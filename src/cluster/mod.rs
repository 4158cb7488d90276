//! Several torpor nodes (scale-out): the pieces that let nodes share actors and route tunnel
//! traffic to each other; see ARCHITECTURE.md, "Several nodes".
//!
//! - [`link`]: reliable, ordered delivery of control messages between two nodes over a bus
//!   that loses, duplicates and reorders (core NATS, the simulation's bus).
//! - [`bus`]: the node bus on core NATS (`async-nats` on its own thread): subjects per node,
//!   tunnel traffic at most once, control messages over a [`link`] per peer node.
//! - [`wire`]: the strict codec of what crosses nodes ([`wire::NodeMsg`]).
//! - [`node`]: a node's bus handle, the bridge thread (bus → shards and control thread) and
//!   the lease thread.
//! - [`lease`]: one placement leader at a time, the sans-IO lease state machine of a node.
//! - [`pg_lease`]: that lease in PostgreSQL (epoch row, advisory lock) and the epoch fence on
//!   the store's writes.
//! - [`nats_addr`]: `cluster.nats_url` (one server or several, credentials in the URL).
//! - [`nats_server`]: a throwaway `nats-server` for tests.

pub mod bus;
pub mod lease;
pub mod link;
pub mod nats_addr;
#[doc(hidden)]
pub mod nats_server;
pub mod node;
pub mod pg_lease;
pub mod wire;
