//! Tunnel state of client WebSockets (SPEC §2.4–§2.6), sans-IO.
//!
//! - [`index`]: the 16-bit message index and its wrap-aware comparison.
//! - [`window`]: the pending window of unacknowledged messages, its caps, and the shard's
//!   share of the global pending-bytes cap ([`Budget`]).
//! - [`socket`]: the per-client-WebSocket state machine ([`TunnelSocket`]): indices, acks,
//!   backpressure, ack timeout, detach/attach and replay.
//!
//! Nothing here touches a socket, a clock or a thread: time comes in as `now`, decisions go
//! out as values. Nothing here may panic on input from a client or a runner.

pub mod index;
pub mod socket;
pub mod window;

pub use index::{after, MAX_WINDOW_MESSAGES, OPEN_INDEX};
pub use socket::{
    AckResult, ClientMsg, CloseReason, Detach, DetachCause, Replay, SocketState, TunnelSocket,
};
pub use window::{
    Admission, Budget, Entry, IgnoredAck, PendingWindow, Refused, WindowAck, WindowLimits,
};

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod socket_tests;
