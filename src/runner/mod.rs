//! `torpor::runner`: a Rust runner library, the client side of Rivet runner protocol v7 (the
//! counterpart of `@rivetkit/engine-runner@2.2.1`), so that actors can be written in Rust.
//!
//! A runner dials `GET /runners/connect` on the gateway, sends `Init`, hosts the actors the
//! gateway starts on it ([`Actor`], created by an [`ActorFactory`]), answers tunnelled HTTP
//! requests and WebSockets, drops replayed WebSocket messages by index and closes a socket on
//! a gap, and reconnects with backoff keeping its key, actors and per-socket indices.
//!
//! Layout: [`core`] is the protocol state machine (no I/O), `io` the state it shares with the
//! actors' callbacks, `client` the tokio shell (socket, reconnect loop, timers), `actor` the
//! user-facing trait and contexts, `types` the values they exchange, `ctl` what handles send
//! to the runner task, `index` the duplicate/gap rule, `backoff` the reconnect schedule.
//!
//! This module is a client on a plain tokio runtime: it must never be used on the gateway's
//! io_uring data path, and it must never panic on anything the gateway sends.

mod actor;
mod backoff;
mod client;
pub(crate) mod core;
mod counters;
mod ctl;

/// The maps on the runner's per-message path (requests, streamed responses, actors, events):
/// foldhash, seeded per process like std's SipHash but several times cheaper for the short
/// keys looked up a few times per message (SipHash was a fifth of the echo runner's
/// instructions per 16 KiB echo).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod index;
mod io;
mod types;

#[cfg(test)]
mod loopback_tests;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use actor::{Actor, ActorCx, ActorFactory, ActorHandle};
pub use backoff::Backoff;
pub use client::{Runner, RunnerHandle, RunnerStatus};
pub use core::{GAP_CLOSE_CODE, GAP_CLOSE_REASON};
pub use counters::CounterSnapshot;
pub use types::{
    AckPolicy, ActorInfo, HttpRequest, HttpResponse, RequestKey, WsOpen, WsOpenReply, WsRestore,
};

/// The runner protocol version this library speaks.
pub const PROTOCOL_VERSION: u16 = 7;

/// How a runner connects and what it announces.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Gateway endpoint: `http://`, `https://`, `ws://` or `wss://` (TLS is not built in).
    /// Several nodes of one torpor cluster may be given, separated by commas: the runner
    /// connects to the first, and moves on to the next whenever a connection attempt fails
    /// or an open connection is lost.
    pub endpoint: String,
    pub namespace: String,
    pub runner_name: String,
    /// Identity of this runner process; kept across reconnects.
    pub runner_key: String,
    /// Offered as the `rivet_token.<token>` subprotocol.
    pub token: Option<String>,
    pub total_slots: u32,
    pub version: u32,
    /// `Init.metadata` (JSON text).
    pub metadata: Option<String>,
    /// First reconnect delay (doubles per failed attempt).
    pub reconnect_base: Duration,
    /// Largest reconnect delay before jitter.
    pub reconnect_max: Duration,
    /// How long `shutdown` waits for the gateway to stop our actors.
    pub shutdown_timeout: Duration,
    /// Seed of the jitter rng (random when `None`).
    pub seed: Option<u64>,
}

impl RunnerConfig {
    /// Defaults: namespace `default`, a random runner key, 100 slots, version 1, backoff 1 s
    /// doubling to 30 s, shutdown wait 30 s.
    pub fn new(endpoint: impl Into<String>, runner_name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            namespace: "default".into(),
            runner_name: runner_name.into(),
            runner_key: random_key(),
            token: None,
            total_slots: 100,
            version: 1,
            metadata: None,
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            seed: None,
        }
    }
}

/// A random runner key (UUID v4 text, like the TS runner's default).
pub fn random_key() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl From<tokio_tungstenite::tungstenite::Error> for RunnerError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        RunnerError::WebSocket(Box::new(e))
    }
}

/// Errors of the runner library.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("endpoint must start with http://, https://, ws:// or wss://: {0}")]
    Endpoint(String),
    #[error("token is not a valid header value")]
    Token,
    #[error("websocket: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    #[error("the runner has stopped")]
    Stopped,
}
