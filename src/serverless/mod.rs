//! Serverless runner pools, the outbound side: torpor starts a runner by calling a rivetkit
//! app's `GET {url}/start`; the app connects a runner back to torpor and keeps a server-sent
//! event stream open (an init event naming the runner, then a ping about every second) until
//! torpor closes it at the end of the pool's request lifespan. torpor also reads the app's
//! `GET {url}/metadata` (its actor names and versions).
//!
//! The engine's pools (`crate::engine`, `pools.rs`) drive it with values in and values out;
//! the control thread (`crate::shard::control`) owns the thread.
//!
//! | file | holds |
//! | --- | --- |
//! | `sse.rs` | the incremental SSE parser (sans-IO, bounded) |
//! | `init.rs` | the init event's payload: base64 of a u16 version and a BARE `ToServerlessServerInit` |
//! | `headers.rs` | the `/start` request's headers built from typed inputs |
//! | `addr.rs` | which peer addresses torpor may connect to (link-local and cloud metadata denied) |
//! | `metadata.rs` | the `/metadata` answer parsed into a typed value |
//! | `outbound.rs` | the I/O shell: one thread, a current-thread tokio runtime, `reqwest`; commands in, events out |
//!
//! Everything but `outbound.rs` is sans-IO. The shell must never follow a redirect, use a
//! proxy, read an unbounded body or connect to an address the policy denies.

pub mod addr;
pub mod headers;
pub mod init;
pub mod metadata;
pub mod outbound;
pub mod sse;

use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use addr::{AddrClass, AddressPolicy};
pub use headers::{start_headers, Headers, StartHeaders};
pub use init::{InitError, ServerlessInit};
pub use metadata::{ActorName, MetadataError, RunnerMetadata};
pub use outbound::{
    Command, EndReason, Event, Failure, Hooks, Outbound, Resolver, StaticResolver, SystemResolver,
    TimeoutPhase,
};
pub use sse::{SseError, SseEvent, SseParser};

/// How many bytes of a refused answer's body are kept (as the Rivet engine keeps).
pub const ERROR_BODY_BYTES: usize = 512;

/// Settings of the outbound client (timeouts, limits, address policy). Every request has a
/// deadline and every body a bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerlessSettings {
    /// TCP connect (and TLS handshake) to the app, per attempt.
    pub connect_timeout_ms: u64,
    /// From sending `/start` to the answer's status and headers (connect included).
    pub headers_timeout_ms: u64,
    /// From the answer's headers to the init event (the app starts a runner and the runner
    /// connects to torpor meanwhile).
    pub init_timeout_ms: u64,
    /// After the init event, the longest silence (no event) before the stream counts as
    /// dead; rivetkit pings every second.
    pub event_timeout_ms: u64,
    /// The whole `/metadata` request, body included.
    pub metadata_timeout_ms: u64,
    /// One SSE event (or line) at most; the init event is about 60 bytes.
    pub max_event_bytes: usize,
    /// The `/metadata` body at most.
    pub metadata_body_bytes: usize,
    /// `/start` streams open at once; more are refused with `Failure::TooManyStreams`.
    pub max_streams: usize,
    /// `/metadata` requests in flight at once; more are refused the same way.
    pub max_metadata_requests: usize,
    /// Which addresses may be connected to.
    pub addresses: AddressPolicy,
}

impl Default for ServerlessSettings {
    fn default() -> Self {
        ServerlessSettings {
            connect_timeout_ms: 5_000,
            headers_timeout_ms: 30_000,
            init_timeout_ms: 30_000,
            event_timeout_ms: 10_000,
            metadata_timeout_ms: 10_000,
            max_event_bytes: 64 * 1024,
            metadata_body_bytes: 1024 * 1024,
            max_streams: 1024,
            max_metadata_requests: 16,
            addresses: AddressPolicy::default(),
        }
    }
}

impl ServerlessSettings {
    /// Refuse settings that would fail every request (a zero deadline or bound).
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("connect_timeout_ms", self.connect_timeout_ms as usize),
            ("headers_timeout_ms", self.headers_timeout_ms as usize),
            ("init_timeout_ms", self.init_timeout_ms as usize),
            ("event_timeout_ms", self.event_timeout_ms as usize),
            ("metadata_timeout_ms", self.metadata_timeout_ms as usize),
            ("metadata_body_bytes", self.metadata_body_bytes),
            ("max_streams", self.max_streams),
            ("max_metadata_requests", self.max_metadata_requests),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("serverless.{key} must be above 0"));
        }
        // An init event (about 60 bytes) and its line must fit.
        if self.max_event_bytes < 1024 {
            return Err("serverless.max_event_bytes must be at least 1024".into());
        }
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub(crate) fn headers_timeout(&self) -> Duration {
        Duration::from_millis(self.headers_timeout_ms)
    }
    pub(crate) fn init_timeout(&self) -> Duration {
        Duration::from_millis(self.init_timeout_ms)
    }
    pub(crate) fn event_timeout(&self) -> Duration {
        Duration::from_millis(self.event_timeout_ms)
    }
    pub(crate) fn metadata_timeout(&self) -> Duration {
        Duration::from_millis(self.metadata_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_toml() {
        let s: ServerlessSettings =
            toml::from_str("max_streams = 3\n[addresses]\nallow_link_local = true\n").unwrap();
        assert_eq!(s.max_streams, 3);
        assert!(s.addresses.allow_link_local);
        assert!(!s.addresses.allow_cloud_metadata);
        assert_eq!(
            s.event_timeout_ms,
            ServerlessSettings::default().event_timeout_ms
        );
        assert!(toml::from_str::<ServerlessSettings>("nope = 1").is_err());
        assert_eq!(ServerlessSettings::default().validate(), Ok(()));
        let zero = ServerlessSettings {
            event_timeout_ms: 0,
            ..ServerlessSettings::default()
        };
        assert!(zero.validate().unwrap_err().contains("event_timeout_ms"));
    }
}
