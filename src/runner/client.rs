//! The tokio shell of the runner: owns the WebSocket to the gateway, the reconnect loop with
//! backoff, the runner-lost timer and the handle channel, and pumps everything through
//! [`Core`]. It decides nothing about the protocol itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tungstenite::http::HeaderValue;

use crate::ws::WsEvent;

use super::actor::ActorFactory;
use super::backoff::Backoff;
use super::core::{Core, Ctl, InitInfo, Outgoing, Phase};
use super::counters::{CounterSnapshot, Counters};
use super::{RunnerConfig, RunnerError, PROTOCOL_VERSION};

mod conn;

use conn::Conn;

/// Close code of our own close frame (normal closure).
const CLOSE_NORMAL: u16 = 1000;
/// Reason of our own close frame.
const SHUTDOWN_REASON: &str = "pegboard.runner_shutdown";

/// Most inbound messages handled before outgoing ones are flushed.
const BATCH: usize = 256;

/// What handles can observe about the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerStatus {
    /// `Init` answered on the current socket.
    pub connected: bool,
    /// The runner id from the latest `Init`.
    pub runner_id: Option<String>,
    /// Connections that completed `Init` so far.
    pub connections: u64,
    /// The runner task has finished (shutdown, eviction).
    pub stopped: bool,
}

/// Entry point of the runner library.
pub struct Runner;

impl Runner {
    /// Spawns the runner on the current tokio runtime (call it from within one) and returns
    /// its handle. It connects in the background and keeps reconnecting until
    /// [`RunnerHandle::shutdown`] or an eviction; dropping every handle does not stop it.
    pub fn start(
        config: RunnerConfig,
        factory: impl ActorFactory,
    ) -> Result<RunnerHandle, RunnerError> {
        let urls = connect_urls(&config)?;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let core = Core::new(
            InitInfo {
                name: config.runner_name.clone(),
                version: config.version,
                total_slots: config.total_slots,
                metadata: with_stream_requests(config.metadata.clone()),
            },
            Box::new(factory),
            counters.clone(),
            ctl_tx.clone(),
        );
        let (status_tx, status_rx) = watch::channel(RunnerStatus::default());
        let seed = config.seed.unwrap_or_else(rand::random);
        let shell = Shell {
            core,
            urls,
            next_url: 0,
            token: config.token.clone(),
            backoff: Backoff::new(config.reconnect_base, config.reconnect_max, seed),
            shutdown_timeout: config.shutdown_timeout,
            ctl_rx,
            status: status_tx,
            shutdown_waiters: Vec::new(),
            out_buf: Vec::new(),
        };
        let task = tokio::spawn(shell.run());
        Ok(RunnerHandle {
            ctl: ctl_tx,
            status: status_rx,
            counters,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        })
    }
}

/// Controls a running runner. Cheap to clone.
#[derive(Clone)]
pub struct RunnerHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
    status: watch::Receiver<RunnerStatus>,
    counters: Arc<Counters>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl RunnerHandle {
    /// The runner id of the latest `Init`, if any.
    pub fn runner_id(&self) -> Option<String> {
        self.status.borrow().runner_id.clone()
    }

    /// The current status.
    pub fn status(&self) -> RunnerStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (connect, reconnect, stop).
    pub fn subscribe(&self) -> watch::Receiver<RunnerStatus> {
        self.status.clone()
    }

    /// Waits until `Init` has been answered on the current socket; returns the runner id.
    pub async fn wait_connected(&self) -> Result<String, RunnerError> {
        let mut rx = self.status.clone();
        let st = rx
            .wait_for(|s| s.connected || s.stopped)
            .await
            .map_err(|_| RunnerError::Stopped)?;
        match (&st.runner_id, st.connected) {
            (Some(id), true) => Ok(id.clone()),
            _ => Err(RunnerError::Stopped),
        }
    }

    /// Waits until at least `n` connections have completed `Init` (e.g. after a forced drop).
    pub async fn wait_connections(&self, n: u64) -> Result<String, RunnerError> {
        let mut rx = self.status.clone();
        let st = rx
            .wait_for(|s| (s.connected && s.connections >= n) || s.stopped)
            .await
            .map_err(|_| RunnerError::Stopped)?;
        match (&st.runner_id, st.connected) {
            (Some(id), true) => Ok(id.clone()),
            _ => Err(RunnerError::Stopped),
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Drops the current socket without a close handshake (simulates a connection loss); the
    /// runner reconnects with backoff, keeping its key and actors.
    pub fn drop_connection(&self) {
        let _ = self.ctl.send(Ctl::DropConnection);
    }

    /// Graceful shutdown: `Stopping`, wait (bounded) for the gateway to stop our actors, close
    /// with 1000 `pegboard.runner_shutdown`, end the task. Idempotent.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Percent-encodes like JavaScript's `encodeURIComponent`.
pub(crate) fn encode_uri_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The connect URL of each endpoint (comma-separated) of `config`, in order.
pub(crate) fn connect_urls(config: &RunnerConfig) -> Result<Vec<String>, RunnerError> {
    config
        .endpoint
        .split(',')
        .map(|ep| {
            connect_url(&RunnerConfig {
                endpoint: ep.to_string(),
                ..config.clone()
            })
        })
        .collect()
}

/// `ws://host/runners/connect?protocol_version=7&namespace=..&runner_key=..`.
pub(crate) fn connect_url(config: &RunnerConfig) -> Result<String, RunnerError> {
    let ep = config.endpoint.trim();
    let base = if let Some(rest) = ep.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = ep.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if ep.starts_with("ws://") || ep.starts_with("wss://") {
        ep.to_string()
    } else {
        return Err(RunnerError::Endpoint(config.endpoint.clone()));
    };
    let base = base.strip_suffix('/').unwrap_or(&base);
    Ok(format!(
        "{base}/runners/connect?protocol_version={PROTOCOL_VERSION}&namespace={}&runner_key={}",
        encode_uri_component(&config.namespace),
        encode_uri_component(&config.runner_key)
    ))
}

/// Why a session ended.
/// How long a closed session waits to send its answer to the gateway's close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

enum End {
    /// Socket failed, or dropped on request: reconnect.
    Lost,
    /// The gateway closed the connection (not an eviction): answer its close frame, then
    /// reconnect.
    Closed,
    /// Evicted by a newer connection with our identity, or shut down: stop.
    Stop,
}

struct Shell {
    core: Core,
    /// The endpoints' connect URLs; the next attempt uses `urls[next_url]`.
    urls: Vec<String>,
    next_url: usize,
    token: Option<String>,
    backoff: Backoff,
    shutdown_timeout: Duration,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    status: watch::Sender<RunnerStatus>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    out_buf: Vec<Outgoing>,
}

impl Shell {
    async fn run(mut self) {
        loop {
            if !self.shutdown_waiters.is_empty() {
                break;
            }
            let url = self.urls[self.next_url].clone();
            match self.connect(&url).await {
                Some(Ok(ws)) => {
                    let end = self.session(ws).await;
                    self.core.connection_lost(Instant::now());
                    self.publish();
                    if matches!(end, End::Stop) {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, url = %url, "runner connect failed");
                }
                None => break,
            }
            // The next attempt goes to the next endpoint (the same when there is one).
            self.next_url = (self.next_url + 1) % self.urls.len();
            if !self.shutdown_waiters.is_empty() {
                break;
            }
            let delay = self.backoff.next_delay();
            tracing::debug!(
                ?delay,
                attempt = self.backoff.attempt(),
                "reconnecting after delay"
            );
            if !self.wait_offline(Instant::now() + delay).await {
                break;
            }
        }
        self.core.stop_all_local();
        self.status.send_modify(|s| {
            s.connected = false;
            s.stopped = true;
        });
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn publish(&self) {
        let connected = self.core.phase() == Phase::Connected;
        let runner_id = self.core.runner_id().map(str::to_owned);
        let connections = self
            .core
            .io
            .counters
            .connections
            .load(std::sync::atomic::Ordering::Relaxed);
        self.status.send_if_modified(|s| {
            let changed = s.connected != connected
                || s.runner_id != runner_id
                || s.connections != connections;
            s.connected = connected;
            s.runner_id = runner_id.clone();
            s.connections = connections;
            changed
        });
    }

    /// Handles a handle message while there is no socket. Returns false on shutdown.
    fn ctl_offline(&mut self, ctl: Ctl) -> bool {
        match ctl {
            Ctl::Actor {
                actor_id,
                generation,
                op,
            } => {
                self.core.handle_actor_op(&actor_id, generation, op);
                true
            }
            Ctl::DropConnection => true,
            Ctl::Shutdown(tx) => {
                self.shutdown_waiters.push(tx);
                false
            }
        }
    }

    /// Sleeps until `until`, serving handles and the runner-lost timer. False on shutdown.
    async fn wait_offline(&mut self, until: Instant) -> bool {
        loop {
            let lost = self.core.lost_deadline();
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => return true,
                _ = sleep_opt(lost) => {
                    self.core.poll(Instant::now());
                }
                ctl = self.ctl_rx.recv() => match ctl {
                    Some(c) => if !self.ctl_offline(c) { return false },
                    None => return false,
                },
            }
        }
    }

    /// Connects, serving handles meanwhile. `None` when shutdown was requested.
    async fn connect(&mut self, url: &str) -> Option<Result<Conn, RunnerError>> {
        let protocols = match self.protocols() {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        // One runner message is one frame of up to the protocol's message limit (a 16 MiB
        // client message tunnels as 16 MiB plus its header).
        let fut = Conn::connect(url, &protocols, crate::protocol::MAX_MESSAGE_LEN);
        tokio::pin!(fut);
        loop {
            let lost = self.core.lost_deadline();
            tokio::select! {
                r = &mut fut => return Some(r),
                _ = sleep_opt(lost) => self.core.poll(Instant::now()),
                ctl = self.ctl_rx.recv() => match ctl {
                    Some(c) => if !self.ctl_offline(c) { return None },
                    None => return None,
                },
            }
        }
    }

    /// The `Sec-WebSocket-Protocol` value: `rivet`, plus `rivet_token.<token>` when a token
    /// is configured; a token that is not a valid header value is refused.
    fn protocols(&self) -> Result<String, RunnerError> {
        let mut protocols = String::from("rivet");
        if let Some(t) = &self.token {
            protocols.push_str(", rivet_token.");
            protocols.push_str(t);
        }
        HeaderValue::from_str(&protocols).map_err(|_| RunnerError::Token)?;
        Ok(protocols)
    }

    async fn session(&mut self, mut conn: Conn) -> End {
        self.core.connection_opened();
        let mut shutdown_deadline: Option<Instant> = None;
        let mut end = None;
        while end.is_none() {
            // Handle whatever is already buffered (at most BATCH messages) before writing.
            let (handled, e) = self.pump(&mut conn);
            if e.is_some() {
                end = e;
                break;
            }
            if let Err(e) = self.flush(&mut conn).await {
                tracing::warn!(error = %e, "runner socket write failed");
                return End::Lost;
            }
            self.publish();
            if shutdown_deadline.is_some()
                && (self.core.actor_count() == 0
                    || shutdown_deadline.is_some_and(|d| Instant::now() >= d))
            {
                self.close(&mut conn).await;
                return End::Stop;
            }
            if handled == BATCH {
                continue;
            }
            tokio::select! {
                r = conn.read_more() => match r {
                    Ok(0) => {
                        tracing::warn!("runner socket closed without a close frame");
                        end = Some(End::Lost);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "runner socket failed");
                        end = Some(End::Lost);
                    }
                },
                ctl = self.ctl_rx.recv() => {
                    end = self.ctl_online(ctl, &mut shutdown_deadline);
                    while end.is_none() {
                        match self.ctl_rx.try_recv() {
                            Ok(c) => end = self.ctl_online(Some(c), &mut shutdown_deadline),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_opt(shutdown_deadline) => {}
            }
        }
        match end {
            Some(End::Stop) => {
                let _ = self.flush(&mut conn).await;
                self.close(&mut conn).await;
                End::Stop
            }
            Some(End::Closed) => {
                // The reply to the gateway's close frame is queued; send it, so the gateway
                // sees the close handshake end rather than a connection dropped.
                let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, conn.flush()).await;
                End::Lost
            }
            _ => End::Lost,
        }
    }

    /// Handles up to [`BATCH`] events already in the read buffer. Returns how many, and how
    /// the session ends if one of them ends it.
    fn pump(&mut self, conn: &mut Conn) -> (usize, Option<End>) {
        let mut n = 0;
        while n < BATCH {
            match conn.rd.next() {
                Ok(None) => break,
                Ok(Some(ev)) => {
                    n += 1;
                    if let Some(end) = self.inbound(ev, conn) {
                        return (n, Some(end));
                    }
                }
                Err(close) => {
                    tracing::warn!(error = %close, "runner socket failed");
                    return (n, Some(End::Lost));
                }
            }
        }
        (n, None)
    }

    fn ctl_online(
        &mut self,
        ctl: Option<Ctl>,
        shutdown_deadline: &mut Option<Instant>,
    ) -> Option<End> {
        match ctl {
            Some(Ctl::Actor {
                actor_id,
                generation,
                op,
            }) => {
                self.core.handle_actor_op(&actor_id, generation, op);
                None
            }
            Some(Ctl::DropConnection) => {
                tracing::info!("dropping runner connection on request");
                Some(End::Lost)
            }
            Some(Ctl::Shutdown(tx)) => {
                self.shutdown_waiters.push(tx);
                if shutdown_deadline.is_none() {
                    self.core.begin_shutdown();
                    *shutdown_deadline = Some(Instant::now() + self.shutdown_timeout);
                }
                None
            }
            None => Some(End::Stop),
        }
    }

    fn inbound(&mut self, ev: WsEvent, conn: &mut Conn) -> Option<End> {
        match ev {
            WsEvent::Message { text: false, data } => {
                let was_connected = self.core.phase() == Phase::Connected;
                self.core.handle_bytes(&data);
                if !was_connected && self.core.phase() == Phase::Connected {
                    self.backoff.reset();
                }
                None
            }
            WsEvent::Message { text: true, .. } => {
                Counters::bump(&self.core.io.counters.protocol_errors);
                None
            }
            WsEvent::Ping(p) => {
                conn.wr.pong(&p);
                None
            }
            WsEvent::Pong(_) => None,
            WsEvent::Close { code, reason } => {
                // the reader checked that the reason is UTF-8
                let reason = std::str::from_utf8(&reason).unwrap_or("");
                conn.queue_close_reply(code, reason);
                tracing::info!(reason, "gateway closed the runner connection");
                if reason.split('#').next() == Some("ws.eviction") {
                    Some(End::Stop)
                } else {
                    Some(End::Closed)
                }
            }
        }
    }

    /// Encodes everything the core has queued into the write buffer (with any pongs and
    /// close replies already there) and writes it all at once.
    async fn flush(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        self.core.take_out(&mut self.out_buf);
        if conn.close_sent() {
            // nothing may follow a close frame
            self.out_buf.clear();
        }
        for msg in self.out_buf.drain(..) {
            conn.wr.message(&msg);
        }
        conn.flush().await
    }

    /// Sends our close frame (unless a close reply went out already) and waits briefly for
    /// the gateway's.
    async fn close(&mut self, conn: &mut Conn) {
        conn.queue_close(CLOSE_NORMAL, SHUTDOWN_REASON);
        if conn.flush().await.is_err() || conn.rd.is_closed() {
            return;
        }
        // Wait briefly for the gateway's close reply.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match conn.rd.next() {
                    Ok(Some(WsEvent::Close { .. })) | Err(_) => break,
                    Ok(Some(_)) => {}
                    Ok(None) => match conn.read_more().await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
            }
        })
        .await;
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The runner's `Init.metadata` with `{"torpor_stream_requests": true}` added: this library
/// takes streamed request bodies (it collects them for actors that do not stream them), and
/// torpor streams large bodies only to runners that say so. Metadata that is not a JSON
/// object is sent as given.
fn with_stream_requests(metadata: Option<String>) -> Option<String> {
    let key = crate::gateway::STREAM_REQUESTS_KEY;
    let mut obj = match metadata
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => serde_json::Map::new(),
        Some(Ok(serde_json::Value::Object(m))) => m,
        Some(_) => return metadata,
    };
    obj.insert(key.into(), serde_json::Value::Bool(true));
    Some(serde_json::Value::Object(obj).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: &str) -> RunnerConfig {
        let mut c = RunnerConfig::new(endpoint, "default");
        c.namespace = "my ns/é".into();
        c.runner_key = "key+1&x=y".into();
        c
    }

    #[test]
    fn url_like_the_ts_runner() {
        assert_eq!(
            connect_url(&cfg("http://127.0.0.1:6420/")).unwrap(),
            "ws://127.0.0.1:6420/runners/connect?protocol_version=7\
             &namespace=my%20ns%2F%C3%A9&runner_key=key%2B1%26x%3Dy"
        );
        assert!(connect_url(&cfg("https://h"))
            .unwrap()
            .starts_with("wss://h/runners/connect?"));
        assert!(connect_url(&cfg("ws://h:1/base"))
            .unwrap()
            .starts_with("ws://h:1/base/runners/connect?"));
        assert!(connect_url(&cfg("ftp://h")).is_err());
        let both = connect_urls(&cfg("http://a:1, ws://b:2/x")).unwrap();
        assert_eq!(both.len(), 2);
        assert!(both[0].starts_with("ws://a:1/runners/connect?"));
        assert!(both[1].starts_with("ws://b:2/x/runners/connect?"));
        assert!(connect_urls(&cfg("http://a:1,ftp://b")).is_err());
        assert_eq!(encode_uri_component("a-_.!~*'()Z9"), "a-_.!~*'()Z9");
    }

    #[test]
    fn init_metadata_says_that_streamed_bodies_are_taken() {
        let m = |s: Option<&str>| super::with_stream_requests(s.map(String::from));
        let v: serde_json::Value = serde_json::from_str(&m(None).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"torpor_stream_requests": true}));
        let v: serde_json::Value = serde_json::from_str(&m(Some(r#"{"a":1}"#)).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "torpor_stream_requests": true})
        );
        assert_eq!(m(Some("[1]")), Some("[1]".to_string()));
        assert!(crate::gateway::streams_requests(m(None).as_deref()));
        assert!(!crate::gateway::streams_requests(Some("[1]")));
    }
}
