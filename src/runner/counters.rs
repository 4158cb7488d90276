//! Counters the runner keeps for tests and benchmarks (atomics shared with handles).
//! Counting only: nothing here decides or sends anything.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, shared between the runner task and its handles.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) messages: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) acks_sent: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// WebSocket messages delivered to actors.
    pub messages: u64,
    /// Inbound WebSocket messages dropped because their index was not after the last one.
    pub duplicates_dropped: u64,
    /// Sockets closed because an inbound index skipped ahead.
    pub gaps: u64,
    /// `WebSocketMessageAck`s sent (coalesced acks count once).
    pub acks_sent: u64,
    /// HTTP requests answered by actors.
    pub http_requests: u64,
    /// Connections that completed the `Init` exchange.
    pub connections: u64,
    /// Connections lost or dropped after they were established.
    pub disconnects: u64,
    /// Tunnel messages currently waiting for a connection.
    pub queued: u64,
    /// Messages from the gateway that could not be decoded.
    pub protocol_errors: u64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            messages: self.messages.load(Relaxed),
            duplicates_dropped: self.duplicates_dropped.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            acks_sent: self.acks_sent.load(Relaxed),
            http_requests: self.http_requests.load(Relaxed),
            connections: self.connections.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            queued: self.queued.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}

impl std::fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "messages={} duplicates_dropped={} gaps={} acks_sent={} http_requests={} \
             connections={} disconnects={} queued={} protocol_errors={}",
            self.messages,
            self.duplicates_dropped,
            self.gaps,
            self.acks_sent,
            self.http_requests,
            self.connections,
            self.disconnects,
            self.queued,
            self.protocol_errors
        )
    }
}
