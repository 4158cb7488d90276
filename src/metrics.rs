//! Metrics: counters and gauges, one block per shard, rendered as Prometheus text.
//!
//! Each shard writes only its own block (relaxed atomics on cache lines no other shard
//! writes), so counting costs no contention; `/metrics` sums the blocks when scraped.
//! Labelled series (closes and errors by code) use fixed label tables so that nothing on the
//! data path allocates to count.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

macro_rules! series {
    ($name:ident, $count:ident { $($variant:ident => ($metric:literal, $help:literal)),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum $name { $($variant),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn metric(self) -> &'static str { match self { $($name::$variant => $metric),* } }
            pub fn help(self) -> &'static str { match self { $($name::$variant => $help),* } }
        }
        const $count: usize = [$($metric),*].len();
    };
}

series!(Counter, COUNTERS {
    ClientConnections => ("torpor_client_connections_total", "Client connections accepted"),
    ClientWebSockets => ("torpor_client_websockets_total", "Client WebSockets tunnelled to actors"),
    RunnerConnections => ("torpor_runner_connections_total", "Runner connections that completed Init"),
    MessagesToRunner => ("torpor_tunnel_messages_to_runner_total", "WebSocket messages forwarded client to runner"),
    BytesToRunner => ("torpor_tunnel_bytes_to_runner_total", "Payload bytes forwarded client to runner"),
    MessagesToClient => ("torpor_tunnel_messages_to_client_total", "WebSocket messages forwarded runner to client"),
    BytesToClient => ("torpor_tunnel_bytes_to_client_total", "Payload bytes forwarded runner to client"),
    Acks => ("torpor_tunnel_acks_total", "Acknowledgements received from runners"),
    AcksIgnored => ("torpor_tunnel_acks_ignored_total", "Acknowledgements for unknown or stale indices"),
    AckedMessages => ("torpor_tunnel_acked_messages_total", "Pending messages freed by acknowledgements"),
    Replays => ("torpor_tunnel_replays_total", "Sockets whose pending window was replayed to a runner"),
    ReplayedMessages => ("torpor_tunnel_replayed_messages_total", "Messages replayed to runners"),
    BackpressurePauses => ("torpor_tunnel_backpressure_pauses_total", "Times a client socket stopped being read because its pending window was full"),
    UnroutableTunnelMessages => ("torpor_tunnel_unroutable_total", "Runner tunnel messages for unknown or closed requests"),
    RunnerProtocolErrors => ("torpor_runner_protocol_errors_total", "Runner messages that failed to decode"),
    HttpRequests => ("torpor_http_requests_total", "HTTP requests handled"),
    CloseHandshakeTimeouts => ("torpor_websocket_close_timeouts_total", "WebSocket connections dropped because the peer did not finish the close handshake in time"),
    ClientIdlePings => ("torpor_client_idle_pings_total", "Pings sent to client WebSockets that were silent for the idle period"),
});

series!(Gauge, GAUGES {
    PendingBytes => ("torpor_tunnel_pending_bytes", "Unacknowledged payload bytes held for replay"),
    PendingMessages => ("torpor_tunnel_pending_messages", "Unacknowledged messages held for replay"),
    OpenClientWebSockets => ("torpor_client_websockets_open", "Open client WebSockets"),
    PausedClientWebSockets => ("torpor_client_websockets_paused", "Client WebSockets not being read (backpressure)"),
    RunnersConnected => ("torpor_runners_connected", "Runner connections open on this process"),
    MaxSocketPendingBytes => ("torpor_tunnel_socket_pending_bytes_max", "Largest pending byte total seen on one socket (high-water mark)"),
    MaxSocketPendingMessages => ("torpor_tunnel_socket_pending_messages_max", "Largest pending message count seen on one socket (high-water mark)"),
});

/// Close and error codes counted by label. Unknown labels go to `other`.
pub const CLOSE_REASONS: &[&str] = &[
    "ws.closed",
    "ws.eviction",
    "ws.invalid_packet",
    "ws.timed_out_waiting_for_init",
    "ws.invalid_initial_packet",
    "ws.runner_disconnected",
    "ws.ping_timeout",
    "ws.protocol_error",
    "ws.invalid_utf8",
    "ws.message_too_big",
    "ws.frame_too_big",
    "ws.going_away",
    "actor.stopped",
    "guard.websocket_message_not_acked",
    "guard.websocket_pending_limit_reached",
    "guard.websocket_open_timeout",
    "guard.client_too_slow",
    "guard.client_idle_timeout",
    "other",
];

pub const ERROR_CODES: &[&str] = &[
    "actor.not_found",
    "actor.wake_timeout",
    "guard.websocket_open_timeout",
    "guard.websocket_open_refused",
    "guard.runner_unavailable",
    "request.bad_request",
    "request.not_found",
    "request.header_too_large",
    "request.body_too_large",
    "request.unsupported_version",
    "runner.invalid_query",
    "runner.unsupported_protocol_version",
    "runner.unauthorized",
    "other",
];

fn label_index(table: &[&str], label: &str) -> usize {
    table
        .iter()
        .position(|l| *l == label)
        .unwrap_or(table.len() - 1)
}

/// One shard's block of metrics.
pub struct ShardMetrics {
    counters: [AtomicU64; COUNTERS],
    gauges: [AtomicI64; GAUGES],
    closes: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            gauges: std::array::from_fn(|_| AtomicI64::new(0)),
            closes: (0..CLOSE_REASONS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            errors: (0..ERROR_CODES.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl ShardMetrics {
    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.counters[c as usize].fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn gauge_add(&self, g: Gauge, n: i64) {
        self.gauges[g as usize].fetch_add(n, Relaxed);
    }
    /// Raises a high-water-mark gauge.
    #[inline]
    pub fn gauge_max(&self, g: Gauge, v: i64) {
        self.gauges[g as usize].fetch_max(v, Relaxed);
    }
    pub fn close(&self, code: u16, reason: &str) {
        let _ = code;
        self.closes[label_index(CLOSE_REASONS, reason)].fetch_add(1, Relaxed);
    }
    pub fn error(&self, code: &str) {
        self.errors[label_index(ERROR_CODES, code)].fetch_add(1, Relaxed);
    }
}

/// All shards' blocks plus process-wide values set by the control plane.
#[derive(Clone)]
pub struct Metrics {
    pub shards: Arc<[ShardMetrics]>,
    /// Actors by state, written by the control plane: sleeping, starting, running, stopping.
    pub actors: Arc<[AtomicI64; 4]>,
    pub runners_known: Arc<AtomicI64>,
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            actors: Arc::new(std::array::from_fn(|_| AtomicI64::new(0))),
            runners_known: Arc::new(AtomicI64::new(0)),
        }
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.shards
            .iter()
            .map(|s| s.counters[c as usize].load(Relaxed))
            .sum()
    }

    pub fn gauge(&self, g: Gauge) -> i64 {
        let vals = self
            .shards
            .iter()
            .map(|s| s.gauges[g as usize].load(Relaxed));
        match g {
            Gauge::MaxSocketPendingBytes | Gauge::MaxSocketPendingMessages => {
                vals.max().unwrap_or(0)
            }
            _ => vals.sum(),
        }
    }

    pub fn closes(&self, reason: &str) -> u64 {
        let i = label_index(CLOSE_REASONS, reason);
        self.shards.iter().map(|s| s.closes[i].load(Relaxed)).sum()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for &c in Counter::ALL {
            let _ = writeln!(out, "# HELP {} {}", c.metric(), c.help());
            let _ = writeln!(out, "# TYPE {} counter", c.metric());
            let _ = writeln!(out, "{} {}", c.metric(), self.counter(c));
        }
        for &g in Gauge::ALL {
            let _ = writeln!(out, "# HELP {} {}", g.metric(), g.help());
            let _ = writeln!(out, "# TYPE {} gauge", g.metric());
            let _ = writeln!(out, "{} {}", g.metric(), self.gauge(g));
        }
        let _ = writeln!(
            out,
            "# HELP torpor_websocket_closes_total WebSockets closed by the gateway, by reason"
        );
        let _ = writeln!(out, "# TYPE torpor_websocket_closes_total counter");
        for (i, r) in CLOSE_REASONS.iter().enumerate() {
            let v: u64 = self.shards.iter().map(|s| s.closes[i].load(Relaxed)).sum();
            let _ = writeln!(out, "torpor_websocket_closes_total{{reason=\"{r}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP torpor_errors_total Requests refused by the gateway, by error code"
        );
        let _ = writeln!(out, "# TYPE torpor_errors_total counter");
        for (i, r) in ERROR_CODES.iter().enumerate() {
            let v: u64 = self.shards.iter().map(|s| s.errors[i].load(Relaxed)).sum();
            let _ = writeln!(out, "torpor_errors_total{{code=\"{r}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP torpor_actors Actors by state");
        let _ = writeln!(out, "# TYPE torpor_actors gauge");
        for (i, st) in ["sleeping", "starting", "running", "stopping"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "torpor_actors{{state=\"{st}\"}} {}",
                self.actors[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP torpor_runners_known Runners known to the control plane"
        );
        let _ = writeln!(out, "# TYPE torpor_runners_known gauge");
        let _ = writeln!(
            out,
            "torpor_runners_known {}",
            self.runners_known.load(Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_shards_and_labels() {
        let m = Metrics::new(2);
        m.shards[0].inc(Counter::Acks);
        m.shards[1].add(Counter::Acks, 2);
        m.shards[1].close(1011, "guard.websocket_message_not_acked");
        m.shards[0].close(1011, "something.unlisted");
        m.shards[0].gauge_max(Gauge::MaxSocketPendingBytes, 10);
        m.shards[1].gauge_max(Gauge::MaxSocketPendingBytes, 7);
        assert_eq!(m.counter(Counter::Acks), 3);
        assert_eq!(m.closes("guard.websocket_message_not_acked"), 1);
        assert_eq!(m.closes("other"), 1);
        assert_eq!(m.gauge(Gauge::MaxSocketPendingBytes), 10);
        let text = m.render();
        assert!(text.contains("torpor_tunnel_acks_total 3"));
        assert!(text.contains(
            "torpor_websocket_closes_total{reason=\"guard.websocket_message_not_acked\"} 1"
        ));
    }
}
