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
    Hibernations => ("torpor_hibernations_total", "Client WebSockets that entered hibernation"),
    HibernationWakes => ("torpor_hibernation_wakes_total", "Hibernating WebSockets reattached to a running actor"),
    WakeRequests => ("torpor_wake_requests_total", "Actor starts asked for by hibernating WebSockets"),
    HttpTunnelRequests => ("torpor_http_tunnel_requests_total", "HTTP requests tunnelled to actors"),
    CloseHandshakeTimeouts => ("torpor_websocket_close_timeouts_total", "WebSocket connections dropped because the peer did not finish the close handshake in time"),
    ClientIdlePings => ("torpor_client_idle_pings_total", "Pings sent to client WebSockets that were silent for the idle period"),
    ClientReadPauses => ("torpor_client_read_pauses_total", "Times a client WebSocket stopped being read because it had not read half of client_outbound_bytes sent to it"),
    Unauthorized => ("torpor_unauthorized_total", "API calls and runner connections refused for a missing or wrong token, or from a non-loopback peer in protected mode"),
    RunnerEvictions => ("torpor_runner_evictions_total", "Runner connections evicted by a newer connection with the same runner key"),
    RunnerSlotsClamped => ("torpor_runner_slots_clamped_total", "Runner Inits whose totalSlots was above limits.runner_max_slots and was clamped"),
    RunnersRefused => ("torpor_runners_refused_total", "Runner Inits refused by a limit (names, metadata, sizes)"),
    AcceptPauses => ("torpor_accept_pauses_total", "Times a shard stopped accepting because it held limits.connections_per_shard connections or ran out of file descriptors"),
    CorsPreflights => ("torpor_cors_preflights_total", "CORS preflight requests answered by the gateway"),
    LogLinesSuppressed => ("torpor_log_lines_suppressed_total", "Repeated warning lines not written (rate-limited)"),
});

series!(Gauge, GAUGES {
    PendingBytes => ("torpor_tunnel_pending_bytes", "Unacknowledged payload bytes held for replay"),
    PendingMessages => ("torpor_tunnel_pending_messages", "Unacknowledged messages held for replay"),
    OpenClientWebSockets => ("torpor_client_websockets_open", "Open client WebSockets"),
    PausedClientWebSockets => ("torpor_client_websockets_paused", "Client WebSockets not being read (backpressure)"),
    HibernatingWebSockets => ("torpor_client_websockets_hibernating", "Client WebSockets hibernating (their actor is not running)"),
    RunnersConnected => ("torpor_runners_connected", "Runner connections open on this process"),
    MaxSocketPendingBytes => ("torpor_tunnel_socket_pending_bytes_max", "Largest pending byte total seen on one socket (high-water mark)"),
    MaxSocketPendingMessages => ("torpor_tunnel_socket_pending_messages_max", "Largest pending message count seen on one socket (high-water mark)"),
    OpenConnections => ("torpor_connections_open", "Open TCP connections (clients and runners)"),
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
    "actor.destroyed",
    "guard.websocket_message_not_acked",
    "guard.websocket_pending_limit_reached",
    "guard.websocket_open_timeout",
    "guard.client_too_slow",
    "guard.hibernation_timeout",
    "guard.client_idle_timeout",
    "runner.init_too_large",
    "other",
];

pub const ERROR_CODES: &[&str] = &[
    "actor.not_found",
    "actor.wake_timeout",
    "guard.websocket_open_timeout",
    "guard.websocket_open_refused",
    "guard.runner_unavailable",
    "request.bad_request",
    "request.runner_disconnected",
    "request.aborted",
    "request.response_too_large",
    "guard.response_timeout",
    "guard.draining",
    "actor.stopped",
    "actor.destroyed",
    "request.not_found",
    "http.bad_request",
    "http.header_too_large",
    "http.body_too_large",
    "http.unsupported_version",
    "http.unsupported_transfer_encoding",
    "request.unsupported_version",
    "runner.invalid_query",
    "runner.unsupported_protocol_version",
    "runner.unauthorized",
    "api.unauthorized",
    "api.forbidden_origin",
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
    /// The control plane's block (runner sessions, placement, the engine API).
    pub control: Arc<ShardMetrics>,
    /// Actors by state, written by the control plane: sleeping, starting, running, stopping.
    pub actors: Arc<[AtomicI64; 4]>,
    pub runners_known: Arc<AtomicI64>,
    /// The actor KV store, once open (its counters are rendered with the rest).
    pub kv: Arc<std::sync::OnceLock<crate::kv::KvHandle>>,
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            control: Arc::new(ShardMetrics::default()),
            actors: Arc::new(std::array::from_fn(|_| AtomicI64::new(0))),
            runners_known: Arc::new(AtomicI64::new(0)),
            kv: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Every block: the shards' and the control plane's.
    fn blocks(&self) -> impl Iterator<Item = &ShardMetrics> {
        self.shards.iter().chain(std::iter::once(&*self.control))
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.blocks()
            .map(|s| s.counters[c as usize].load(Relaxed))
            .sum()
    }

    pub fn gauge(&self, g: Gauge) -> i64 {
        let vals = self.blocks().map(|s| s.gauges[g as usize].load(Relaxed));
        match g {
            Gauge::MaxSocketPendingBytes | Gauge::MaxSocketPendingMessages => {
                vals.max().unwrap_or(0)
            }
            _ => vals.sum(),
        }
    }

    pub fn closes(&self, reason: &str) -> u64 {
        let i = label_index(CLOSE_REASONS, reason);
        self.blocks().map(|s| s.closes[i].load(Relaxed)).sum()
    }

    pub fn errors(&self, code: &str) -> u64 {
        let i = label_index(ERROR_CODES, code);
        self.blocks().map(|s| s.errors[i].load(Relaxed)).sum()
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
            let v: u64 = self.blocks().map(|s| s.closes[i].load(Relaxed)).sum();
            let _ = writeln!(out, "torpor_websocket_closes_total{{reason=\"{r}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP torpor_errors_total Requests refused by the gateway, by error code"
        );
        let _ = writeln!(out, "# TYPE torpor_errors_total counter");
        for (i, r) in ERROR_CODES.iter().enumerate() {
            let v: u64 = self.blocks().map(|s| s.errors[i].load(Relaxed)).sum();
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
        if let Some(kv) = self.kv.get() {
            render_kv(&mut out, &kv.stats());
        }
        out
    }
}

/// The store's counters: operations by kind, refusals, failures, batches and commits.
fn render_kv(out: &mut String, k: &crate::kv::KvStatsSnapshot) {
    let _ = writeln!(
        out,
        "# HELP torpor_kv_ops_total Actor KV and control-plane store operations, by kind"
    );
    let _ = writeln!(out, "# TYPE torpor_kv_ops_total counter");
    for (op, v) in [
        ("get", k.gets),
        ("list", k.lists),
        ("put", k.puts),
        ("delete", k.deletes),
        ("delete_range", k.delete_ranges),
        ("drop", k.drops),
        ("meta_put", k.meta_puts),
        ("meta_delete", k.meta_deletes),
        ("flush", k.flushes),
    ] {
        let _ = writeln!(out, "torpor_kv_ops_total{{op=\"{op}\"}} {v}");
    }
    for (name, help, v) in [
        (
            "torpor_kv_refused_total",
            "KV requests refused by a limit",
            k.refused,
        ),
        (
            "torpor_kv_quota_refused_total",
            "KV puts refused by limits.kv_bytes_per_actor (also in torpor_kv_refused_total)",
            k.quota_refused,
        ),
        (
            "torpor_kv_failed_total",
            "Store jobs answered with a storage error",
            k.failed,
        ),
        ("torpor_kv_batches_total", "Store batches run", k.batches),
        (
            "torpor_kv_commits_total",
            "Durable write transactions committed",
            k.commits,
        ),
        (
            "torpor_kv_commit_failures_total",
            "Write transactions that failed",
            k.commit_failures,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP torpor_kv_commit_seconds_total Time spent in write transactions"
    );
    let _ = writeln!(out, "# TYPE torpor_kv_commit_seconds_total counter");
    let _ = writeln!(
        out,
        "torpor_kv_commit_seconds_total {}",
        k.commit_nanos as f64 / 1e9
    );
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
