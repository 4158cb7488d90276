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
    UnroutableTunnelMessages => ("torpor_tunnel_unroutable_total", "Runner tunnel messages for a request that does not exist (never did, or closed long ago), or that the sending runner does not host"),
    LateTunnelMessages => ("torpor_tunnel_late_messages_total", "Runner tunnel messages for a client WebSocket the gateway closed shortly before (the runner's answer to the close, last acks): expected, not errors"),
    RunnerProtocolErrors => ("torpor_runner_protocol_errors_total", "Runner messages that failed to decode"),
    HttpRequests => ("torpor_http_requests_total", "HTTP requests handled"),
    Hibernations => ("torpor_hibernations_total", "Client WebSockets that entered hibernation"),
    HibernationWakes => ("torpor_hibernation_wakes_total", "Hibernating WebSockets reattached to a running actor"),
    WakeRequests => ("torpor_wake_requests_total", "Actor starts asked for by hibernating WebSockets"),
    HttpTunnelRequests => ("torpor_http_tunnel_requests_total", "HTTP requests tunnelled to actors"),
    HttpStreamedResponses => ("torpor_http_streamed_responses_total", "Tunnelled HTTP responses streamed to the client as the runner sent them"),
    HttpStreamedRequests => ("torpor_http_streamed_requests_total", "Tunnelled HTTP request bodies streamed to the runner"),
    HttpStreamAborts => ("torpor_http_stream_aborts_total", "Streamed tunnelled HTTP exchanges cut short (client too slow, idle, runner abort, runner or actor gone); the client sees a truncated body"),
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
    ServerlessStarts => ("torpor_serverless_starts_total", "GET {url}/start requests of serverless runner pools"),
    ServerlessStarted => ("torpor_serverless_started_total", "Serverless start streams that named their runner (init event)"),
    ServerlessFailures => ("torpor_serverless_failures_total", "Serverless start streams refused, broken or timed out (each backs off) or ended by the app"),
    ServerlessStops => ("torpor_serverless_stops_total", "Serverless start streams closed by torpor (drained runners, surplus, changed or deleted configs)"),
    ClusterDropped => ("torpor_cluster_dropped_total", "Control messages of shards dropped because no placement leader was known for too long (more than 65,536 waiting), or that reached a node which does not lead"),
    ClusterNodesLost => ("torpor_cluster_nodes_lost_total", "Nodes the leader counted out (restarted, or silent past cluster.node_timeout_ms)"),
    RunnersFenced => ("torpor_cluster_runners_fenced_total", "Runner connections told to stop every actor (a fencing Init) and closed because the placement leader changed or counted this node out"),
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

/// Defines a closed set of label values: an enum, its label strings (one list, so a
/// variant and its text cannot drift apart), and an exact string → variant lookup generated
/// as a `match` (a duplicate label is an unreachable pattern, which the build refuses).
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(usize)]
        #[deny(unreachable_patterns)]
        pub enum $name { $($variant),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn label(self) -> &'static str { match self { $($name::$variant => $label),* } }
            /// The variant whose label is exactly `s`, if any.
            #[deny(unreachable_patterns)]
            pub fn of(s: &str) -> Option<$name> {
                match s { $($label => Some($name::$variant),)* _ => None }
            }
        }
    };
}

labels!(
    /// Why the gateway closed a WebSocket (`torpor_websocket_closes_total{reason=…}`). Every
    /// close the gateway itself sends is a `gateway::Reason`, which names its label (a test
    /// checks that each has its own, of the same text); free text from a peer never becomes a
    /// label: a client's own close frame counts as `client.closed`, an actor's close (the
    /// runner's `WebSocketClose`) as `actor.closed`.
    CloseLabel {
        ClientClosed => "client.closed",
        ActorClosed => "actor.closed",
        WsClosed => "ws.closed",
        WsEviction => "ws.eviction",
        WsInvalidPacket => "ws.invalid_packet",
        WsTimedOutWaitingForInit => "ws.timed_out_waiting_for_init",
        WsInvalidInitialPacket => "ws.invalid_initial_packet",
        WsRunnerDisconnected => "ws.runner_disconnected",
        WsPingTimeout => "ws.ping_timeout",
        WsProtocolError => "ws.protocol_error",
        WsInvalidUtf8 => "ws.invalid_utf8",
        WsMessageTooBig => "ws.message_too_big",
        WsFrameTooBig => "ws.frame_too_big",
        WsGoingAway => "ws.going_away",
        ActorStopped => "actor.stopped",
        ActorDestroyed => "actor.destroyed",
        MessageNotAcked => "guard.websocket_message_not_acked",
        PendingLimitReached => "guard.websocket_pending_limit_reached",
        OpenTimeout => "guard.websocket_open_timeout",
        ClientTooSlow => "guard.client_too_slow",
        HibernationTimeout => "guard.hibernation_timeout",
        ClientIdleTimeout => "guard.client_idle_timeout",
        RunnerInitTooLarge => "runner.init_too_large",
        EngineTooManyRunners => "engine.too_many_runners",
        ClusterLeaderChanged => "cluster.leader_changed",
        ClusterNodeRejoined => "cluster.node_rejoined",
        Other => "other",
    }
);

labels!(
    /// Why the gateway refused a request (`torpor_errors_total{code=…}`).
    ErrorLabel {
        ActorNotFound => "actor.not_found",
        ActorWakeTimeout => "guard.actor_ready_timeout",
        ActorRunnerFailed => "guard.actor_runner_failed",
        OpenTimeout => "guard.websocket_open_timeout",
        OpenRefused => "guard.websocket_open_refused",
        RunnerUnavailable => "guard.runner_unavailable",
        ControlUnavailable => "guard.control_unavailable",
        RequestBadRequest => "request.bad_request",
        RequestRunnerDisconnected => "request.runner_disconnected",
        RequestAborted => "request.aborted",
        ResponseTooLarge => "request.response_too_large",
        ResponseTimeout => "guard.response_timeout",
        HttpClientTooSlow => "guard.http_client_too_slow",
        HttpStreamIdle => "guard.http_stream_idle",
        Draining => "guard.draining",
        ActorStopped => "actor.stopped",
        ActorDestroyed => "actor.destroyed",
        RequestNotFound => "request.not_found",
        HttpBadRequest => "http.bad_request",
        HttpHeaderTooLarge => "http.header_too_large",
        HttpBodyTooLarge => "http.body_too_large",
        HttpUnsupportedVersion => "http.unsupported_version",
        HttpUnsupportedTransferEncoding => "http.unsupported_transfer_encoding",
        RequestUnsupportedVersion => "request.unsupported_version",
        WsInvalidMethod => "ws.invalid_method",
        WsInvalidHttpVersion => "ws.invalid_http_version",
        WsMissingUpgrade => "ws.missing_upgrade",
        WsMissingConnectionUpgrade => "ws.missing_connection_upgrade",
        WsUnsupportedVersion => "ws.unsupported_version",
        WsInvalidKey => "ws.invalid_key",
        RunnerInvalidQuery => "runner.invalid_query",
        RunnerUnsupportedProtocolVersion => "runner.unsupported_protocol_version",
        RunnerUnauthorized => "runner.unauthorized",
        ApiUnauthorized => "api.unauthorized",
        ApiForbiddenOrigin => "api.forbidden_origin",
        StoreUnavailable => "store.unavailable",
        // The engine API's refusals (`{group, code}` of its JSON errors).
        ApiBadRequest => "api.bad_request",
        ApiNotFound => "api.not_found",
        ApiMethodNotAllowed => "api.method_not_allowed",
        ApiNotImplemented => "api.not_implemented",
        DatacenterNotFound => "datacenter.not_found",
        ActorDuplicateKey => "actor.duplicate_key",
        ActorTooManyActors => "actor.too_many_actors",
        ActorInputTooLarge => "actor.input_too_large",
        ActorQuotaExceeded => "actor.quota_exceeded",
        RunnerConfigInvalid => "runner_config.invalid",
        RunnerConfigNameTooLong => "runner_config.name_too_long",
        RunnerConfigUrlTooLong => "runner_config.url_too_long",
        RunnerConfigTooManyHeaders => "runner_config.too_many_headers",
        RunnerConfigHeadersTooLarge => "runner_config.headers_too_large",
        RunnerConfigMetadataTooLarge => "runner_config.metadata_too_large",
        RunnerConfigMaxRunnersTooHigh => "runner_config.max_runners_too_high",
        RunnerConfigRequestLifespan => "runner_config.request_lifespan_out_of_range",
        RunnerConfigQuotaExceeded => "runner_config.quota_exceeded",
        RunnerConfigTooMany => "runner_config.too_many",
        Other => "other",
    }
);

/// One shard's block of metrics.
pub struct ShardMetrics {
    counters: [AtomicU64; COUNTERS],
    gauges: [AtomicI64; GAUGES],
    closes: [AtomicU64; CLOSES],
    errors: [AtomicU64; ERRORS],
}

const CLOSES: usize = CloseLabel::ALL.len();
const ERRORS: usize = ErrorLabel::ALL.len();

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            gauges: std::array::from_fn(|_| AtomicI64::new(0)),
            closes: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
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
    /// Counts a close (the gateway's closes count `Reason::label`).
    #[inline]
    pub fn close_as(&self, label: CloseLabel) {
        self.closes[label as usize].fetch_add(1, Relaxed);
    }
    /// Counts a refusal by its error code (`other` for a code not listed in [`ErrorLabel`]).
    pub fn error(&self, code: &str) {
        self.error_as(ErrorLabel::of(code).unwrap_or(ErrorLabel::Other));
    }
    #[inline]
    pub fn error_as(&self, label: ErrorLabel) {
        self.errors[label as usize].fetch_add(1, Relaxed);
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
    /// The lease epoch this node places with, 0 while it does not lead (several nodes); 1
    /// when torpor runs alone.
    pub leading_epoch: Arc<AtomicI64>,
    /// The newest lease epoch this node knows a leader of (leading or following), 0 before
    /// it knows one (several nodes); 1 when torpor runs alone.
    pub known_epoch: Arc<AtomicI64>,
    /// 1 while this node's NATS connection is up (several nodes), else 0.
    pub nats_connected: Arc<AtomicI64>,
    /// Serverless pools by state, written by the control plane (one entry per runner config
    /// with a pool: bounded by `limits.runner_configs`).
    pub pools: Arc<std::sync::Mutex<Vec<crate::engine::PoolStatus>>>,
    /// The actor KV store, once open (its counters are rendered with the rest).
    pub kv: Arc<std::sync::OnceLock<crate::kv::KvHandle>>,
    /// The node bus's counters, with several nodes.
    pub bus: Arc<std::sync::OnceLock<Arc<crate::cluster::bus::BusStats>>>,
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            control: Arc::new(ShardMetrics::default()),
            actors: Arc::new(std::array::from_fn(|_| AtomicI64::new(0))),
            runners_known: Arc::new(AtomicI64::new(0)),
            leading_epoch: Arc::new(AtomicI64::new(0)),
            known_epoch: Arc::new(AtomicI64::new(0)),
            nats_connected: Arc::new(AtomicI64::new(0)),
            pools: Arc::default(),
            kv: Arc::new(std::sync::OnceLock::new()),
            bus: Arc::new(std::sync::OnceLock::new()),
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

    /// Publishes the control plane's actor counts (sleeping, starting, running, stopping).
    pub fn set_actor_counts(&self, counts: [i64; 4]) {
        for (a, v) in self.actors.iter().zip(counts) {
            a.store(v, Relaxed);
        }
    }

    /// Publishes the serverless pools' runners by state.
    pub fn set_pools(&self, pools: Vec<crate::engine::PoolStatus>) {
        *self.pools.lock().unwrap_or_else(|e| e.into_inner()) = pools;
    }

    pub fn set_runners_known(&self, n: i64) {
        self.runners_known.store(n, Relaxed);
    }

    pub fn actor_count(&self, state: usize) -> i64 {
        self.actors[state].load(Relaxed)
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

    /// Closes counted under `reason` (a label of [`CloseLabel`]; anything else reads `other`).
    pub fn closes(&self, reason: &str) -> u64 {
        let i = CloseLabel::of(reason).unwrap_or(CloseLabel::Other) as usize;
        self.blocks().map(|s| s.closes[i].load(Relaxed)).sum()
    }

    /// Refusals counted under `code` (a label of [`ErrorLabel`]; anything else reads `other`).
    pub fn errors(&self, code: &str) -> u64 {
        let i = ErrorLabel::of(code).unwrap_or(ErrorLabel::Other) as usize;
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
        for &l in CloseLabel::ALL {
            let (i, r) = (l as usize, l.label());
            let v: u64 = self.blocks().map(|s| s.closes[i].load(Relaxed)).sum();
            let _ = writeln!(out, "torpor_websocket_closes_total{{reason=\"{r}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP torpor_errors_total Requests refused by the gateway, by error code"
        );
        let _ = writeln!(out, "# TYPE torpor_errors_total counter");
        for &l in ErrorLabel::ALL {
            let (i, r) = (l as usize, l.label());
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
        let _ = writeln!(
            out,
            "# HELP torpor_cluster_leading_epoch The placement lease epoch this node leads with (0: it does not lead; 1 when torpor runs alone)"
        );
        let _ = writeln!(out, "# TYPE torpor_cluster_leading_epoch gauge");
        let _ = writeln!(
            out,
            "torpor_cluster_leading_epoch {}",
            self.leading_epoch.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP torpor_cluster_epoch The newest placement lease epoch this node knows a leader of, leading or following (0: none yet; 1 when torpor runs alone)"
        );
        let _ = writeln!(out, "# TYPE torpor_cluster_epoch gauge");
        let _ = writeln!(
            out,
            "torpor_cluster_epoch {}",
            self.known_epoch.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP torpor_cluster_nats_connected 1 while this node's NATS connection is up (several nodes)"
        );
        let _ = writeln!(out, "# TYPE torpor_cluster_nats_connected gauge");
        let _ = writeln!(
            out,
            "torpor_cluster_nats_connected {}",
            self.nats_connected.load(Relaxed)
        );
        render_pools(
            &mut out,
            &self.pools.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if let Some(kv) = self.kv.get() {
            render_kv(&mut out, &kv.stats());
        }
        if let Some(bus) = self.bus.get() {
            render_bus(&mut out, bus);
        }
        out
    }
}

/// Request ids of client WebSockets a shard closed recently (at most `cap`, each for `ttl`),
/// so that the runner's expected late messages for them (its answer to the close, acks of
/// the last messages) count as late rather than unroutable, while a message for a request id
/// that never existed still counts as unroutable. Steady state allocates nothing.
pub struct RecentlyClosed {
    ttl: std::time::Duration,
    cap: usize,
    set: std::collections::HashSet<[u8; 4]>,
    order: std::collections::VecDeque<(std::time::Instant, [u8; 4])>,
}

impl RecentlyClosed {
    /// How long a closed request's late messages are expected by default: longer than a
    /// runner's reconnect (its owed close is sent when it comes back and answered then).
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(120);
    /// Most request ids remembered per shard (about 40 bytes each).
    pub const CAP: usize = 1 << 16;

    pub fn new(ttl: std::time::Duration, cap: usize) -> RecentlyClosed {
        RecentlyClosed {
            ttl,
            cap: cap.max(1),
            set: Default::default(),
            order: Default::default(),
        }
    }

    /// Remembers that request `req` closed at `now` (the oldest is forgotten at `cap`).
    pub fn insert(&mut self, req: [u8; 4], now: std::time::Instant) {
        self.expire(now);
        if !self.set.insert(req) {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back((now, req));
    }

    /// Whether `req` closed less than `ttl` before `now` (and is still remembered).
    pub fn contains(&mut self, req: [u8; 4], now: std::time::Instant) -> bool {
        self.expire(now);
        self.set.contains(&req)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn expire(&mut self, now: std::time::Instant) {
        while let Some(&(at, req)) = self.order.front() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.order.pop_front();
            self.set.remove(&req);
        }
    }
}

impl Default for RecentlyClosed {
    fn default() -> Self {
        RecentlyClosed::new(Self::TTL, Self::CAP)
    }
}

/// The store's counters: operations by kind, refusals, failures, batches and commits.
/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

fn render_pools(out: &mut String, pools: &[crate::engine::PoolStatus]) {
    let _ = writeln!(
        out,
        "# HELP torpor_serverless_pool_runners Runners of each serverless pool, by state"
    );
    let _ = writeln!(out, "# TYPE torpor_serverless_pool_runners gauge");
    for p in pools {
        let (ns, pool) = (label_value(&p.namespace), label_value(&p.pool));
        for (state, n) in [
            ("starting", p.starting),
            ("running", p.running),
            ("backoff", p.backoff),
            ("draining", p.draining),
        ] {
            let _ = writeln!(
                out,
                "torpor_serverless_pool_runners{{namespace=\"{ns}\",pool=\"{pool}\",state=\"{state}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP torpor_serverless_pool_failing 1 while a serverless pool has an error and no runner up"
    );
    let _ = writeln!(out, "# TYPE torpor_serverless_pool_failing gauge");
    for p in pools {
        let (ns, pool) = (label_value(&p.namespace), label_value(&p.pool));
        let _ = writeln!(
            out,
            "torpor_serverless_pool_failing{{namespace=\"{ns}\",pool=\"{pool}\"}} {}",
            u8::from(p.failing)
        );
    }
}

fn render_bus(out: &mut String, b: &crate::cluster::bus::BusStats) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    for (name, help, v) in [
        (
            "torpor_cluster_bus_messages_out_total",
            "NATS messages published to other nodes (each carries the frames one round of work had for a node)",
            get(&b.messages_out),
        ),
        (
            "torpor_cluster_bus_frames_out_total",
            "Frames (control and tunnel) published to other nodes",
            get(&b.frames_out),
        ),
        (
            "torpor_cluster_bus_frames_resent_total",
            "Control-link frames sent again because no acknowledgement came",
            get(&b.frames_resent),
        ),
        (
            "torpor_cluster_bus_tun_dropped_out_total",
            "Runner-to-client tunnel messages not published: the outgoing queue was full",
            get(&b.tun_dropped_out),
        ),
        (
            "torpor_cluster_bus_tun_dropped_in_total",
            "Runner-to-client tunnel messages dropped on arrival: the node's queue was full, more than 1,024 messages or 8 MiB waited behind a lost control frame, or their sender restarted",
            get(&b.tun_dropped_in),
        ),
        (
            "torpor_cluster_bus_ctl_refused_total",
            "Control messages refused because a peer acknowledged nothing for 65,536 messages",
            get(&b.ctl_refused),
        ),
        (
            "torpor_cluster_bus_frames_dropped_out_total",
            "Control-link frames not published because the outgoing queue was full (sent again later)",
            get(&b.frames_dropped_out),
        ),
        (
            "torpor_cluster_bus_publish_failed_total",
            "Publishes the NATS client refused",
            get(&b.publish_failed),
        ),
        (
            "torpor_cluster_bus_malformed_total",
            "NATS messages or frames from other nodes that did not parse",
            get(&b.malformed_in),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {v}");
    }
}

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
            "Write transactions that failed (or could not start because the store is down)",
            k.commit_failures,
        ),
        (
            "torpor_kv_panics_total",
            "Panics of the storage engine caught by the store thread",
            k.panics,
        ),
        (
            "torpor_store_reopens_total",
            "Reopens of the store after an I/O error, damage or a panic",
            k.reopens,
        ),
        (
            "torpor_store_reopen_failures_total",
            "Failed attempts to reopen the store",
            k.reopen_failures,
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
    let _ = writeln!(
        out,
        "# HELP torpor_store_up 1 while the store commits, 0 while it cannot (store.unavailable)"
    );
    let _ = writeln!(out, "# TYPE torpor_store_up gauge");
    let _ = writeln!(out, "torpor_store_up {}", u8::from(k.store_up));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_shards_and_labels() {
        let m = Metrics::new(2);
        m.shards[0].inc(Counter::Acks);
        m.shards[1].add(Counter::Acks, 2);
        m.shards[1].close_as(CloseLabel::MessageNotAcked);
        m.shards[0].close_as(CloseLabel::Other);
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

    #[test]
    fn pools_render_by_state_with_escaped_labels() {
        let m = Metrics::new(1);
        m.set_pools(vec![crate::engine::PoolStatus {
            namespace: "default".into(),
            pool: "a\"b\\c".into(),
            starting: 1,
            running: 2,
            backoff: 0,
            draining: 3,
            failing: true,
        }]);
        let out = m.render();
        let p = r#"namespace="default",pool="a\"b\\c""#;
        for line in [
            format!("torpor_serverless_pool_runners{{{p},state=\"starting\"}} 1"),
            format!("torpor_serverless_pool_runners{{{p},state=\"running\"}} 2"),
            format!("torpor_serverless_pool_runners{{{p},state=\"backoff\"}} 0"),
            format!("torpor_serverless_pool_runners{{{p},state=\"draining\"}} 3"),
            format!("torpor_serverless_pool_failing{{{p}}} 1"),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }

    #[test]
    fn labels_round_trip_and_are_unique() {
        for &l in CloseLabel::ALL {
            assert_eq!(CloseLabel::of(l.label()), Some(l), "{}", l.label());
        }
        for &l in ErrorLabel::ALL {
            assert_eq!(ErrorLabel::of(l.label()), Some(l), "{}", l.label());
        }
        let closes: std::collections::HashSet<_> =
            CloseLabel::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(closes.len(), CloseLabel::ALL.len());
        let errors: std::collections::HashSet<_> =
            ErrorLabel::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(errors.len(), ErrorLabel::ALL.len());
        // `other` is last, and only what nothing else names lands there.
        assert_eq!(CloseLabel::ALL.last(), Some(&CloseLabel::Other));
        assert_eq!(ErrorLabel::ALL.last(), Some(&ErrorLabel::Other));
        assert_eq!(CloseLabel::of(""), None);
        assert_eq!(CloseLabel::of("ws.close"), None);
    }

    #[test]
    fn every_close_and_every_label_is_rendered() {
        let m = Metrics::new(1);
        m.shards[0].close_as(CloseLabel::ClientClosed);
        m.control.error("guard.control_unavailable");
        let text = m.render();
        for &l in CloseLabel::ALL {
            let want = format!("torpor_websocket_closes_total{{reason=\"{}\"}} ", l.label());
            assert!(text.contains(&want), "{want}");
        }
        for &l in ErrorLabel::ALL {
            let want = format!("torpor_errors_total{{code=\"{}\"}} ", l.label());
            assert!(text.contains(&want), "{want}");
        }
        assert!(text.contains("torpor_websocket_closes_total{reason=\"client.closed\"} 1"));
        assert!(text.contains("torpor_errors_total{code=\"guard.control_unavailable\"} 1"));
        assert_eq!(m.closes("other"), 0);
        assert_eq!(m.errors("other"), 0);
        m.set_actor_counts([5, 1, 2, 3]);
        m.set_runners_known(7);
        let text = m.render();
        assert!(text.contains("torpor_actors{state=\"sleeping\"} 5"));
        assert!(text.contains("torpor_actors{state=\"starting\"} 1"));
        assert!(text.contains("torpor_actors{state=\"running\"} 2"));
        assert!(text.contains("torpor_actors{state=\"stopping\"} 3"));
        assert!(text.contains("torpor_runners_known 7"));
    }

    /// Strings the sources use in the `{group}.{code}` shape that are not gateway close
    /// reasons or error codes, and why.
    const NOT_LABELS: &[&str] = &[
        // The runner library's own closes and HTTP error header: they reach the gateway as
        // an actor's close (`actor.closed`) or a tunnelled response.
        "ws.message_index_skip",
        "ws.meta_not_found_during_restore",
        "ws.duplicate_open",
        "runner.actor_not_found",
    ];

    /// Every reason and code string in `src/` is a label (or listed in [`NOT_LABELS`]), so a
    /// new reason or a typo cannot land in `other` unnoticed.
    #[test]
    fn every_reason_in_the_sources_has_a_label() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let groups = [
            "ws", "guard", "actor", "runner", "request", "http", "api", "engine", "client",
        ];
        let mut unknown = Vec::new();
        let mut seen = 0;
        // This file holds the labels themselves (and a typo on purpose in a test).
        files.retain(|f| !f.ends_with("src/metrics.rs"));
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for lit in text.split('"').skip(1).step_by(2) {
                let Some((group, code)) = lit.split_once('.') else {
                    continue;
                };
                let shaped = groups.contains(&group)
                    && !code.is_empty()
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !shaped {
                    continue;
                }
                seen += 1;
                if CloseLabel::of(lit).is_none()
                    && ErrorLabel::of(lit).is_none()
                    && !NOT_LABELS.contains(&lit)
                {
                    unknown.push(format!("{}: {lit}", f.display()));
                }
            }
        }
        assert!(seen > 50, "the scan found only {seen} reason strings");
        assert!(
            unknown.is_empty(),
            "reason strings without a metrics label: {unknown:#?}"
        );
    }

    #[test]
    fn recently_closed_forgets_after_ttl_and_at_cap() {
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs(1);
        let mut r = RecentlyClosed::new(10 * s, 3);
        r.insert([1; 4], t0);
        assert!(r.contains([1; 4], t0 + 9 * s));
        assert!(!r.contains([2; 4], t0), "never closed");
        assert!(!r.contains([1; 4], t0 + 10 * s), "expired");
        assert!(r.is_empty());
        for i in 0..4u8 {
            r.insert([i; 4], t0);
        }
        assert_eq!(r.len(), 3);
        assert!(!r.contains([0; 4], t0), "oldest dropped at the cap");
        assert!(r.contains([3; 4], t0));
        r.insert([3; 4], t0);
        assert_eq!(r.len(), 3, "a second close of the same id is one entry");
    }
}
