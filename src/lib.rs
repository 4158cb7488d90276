//! torpor: an io_uring, thread-per-core gateway between clients and actors hosted by runners.
//!
//! Layers (see ARCHITECTURE.md): the sans-IO core (`ws`, `http`, `protocol`, `tunnel`,
//! `engine`) decides everything and never touches a socket, clock or thread; the shell
//! (`shard`, `net`) owns sockets, timers and threads and pumps events through the core.
//! `serverless` is the outbound client for serverless runner pools (sans-IO parsers and one
//! thread of its own), driven by the engine's pools through the control thread.

pub mod cluster;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod http;
pub mod kv;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod plane;
pub mod protocol;
pub mod runner;
pub mod server;
pub mod serverless;
pub mod shard;
#[cfg(test)]
mod sim;
pub mod tunnel;
pub mod ws;
