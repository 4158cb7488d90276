//! The outbound shell: one OS thread (`torpor-serverless`) running a current-thread tokio
//! runtime and a `reqwest` client. Commands come in over a crossbeam channel
//! ([`Outbound::send`]), events go out over another, and an optional waker is called after
//! every event so a control thread sleeping on something else can be woken.
//!
//! A `Start` runs `GET {url}/start` and reads its server-sent events until the pool's
//! lifespan ends (then torpor closes the connection: [`EndReason::Lifespan`]), a `Stop`
//! (closed at once: [`EndReason::Stopped`]) or a failure, reported as a [`Failure`] value;
//! the engine decides what follows (back-off, another start). Every `Start` ends with exactly
//! one `Ended` or `Failed`, after its `Started` and `Ping`s; nothing of a stream is reported
//! after its end. Stream ids are the caller's; reusing an id still running is refused
//! (`Failed { DuplicateId }` for the new start, the running stream is untouched).
//!
//! The stream's events, as the Rivet engine reads them: every `message` event must decode as
//! an init payload (else `Failure::Payload`) and only the first one counts; `ping` events
//! after it are reported (before it they are not); an `error` event's data is kept for the
//! `StreamEnded` failure that follows it; other events are ignored. Any event restarts the
//! silence deadline once the stream started.
//!
//! Outbound safety: the client follows no redirect (a 3xx is a `Status` failure), uses no
//! proxy (a proxy would resolve names where the policy cannot see), keeps no idle connection,
//! asks for no compression, and speaks HTTP/1.1 (with TLS by rustls). Every phase has a
//! deadline (connect, headers, init event, silence between events, the whole metadata
//! request) and every body a bound (SSE events, 512 bytes of a refused answer's body, the
//! metadata body). The address policy is applied to the addresses resolved for the URL's
//! host, in the client's resolver (a [`Resolver`] hook, so DNS cannot bypass it), and to an
//! IP-literal host before the request (a literal skips the resolver).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::headers::Headers;
use super::init::{self, InitError};
use super::metadata::{self, MetadataError, RunnerMetadata};
use super::sse::{SseError, SseParser};
use super::{AddressPolicy, ServerlessSettings, ERROR_BODY_BYTES};

/// Called after every event sent, from the outbound thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What the outbound thread is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `GET {url}/start` with `headers` (see [`super::start_headers`]); the stream is closed
    /// after `lifespan`.
    Start {
        id: u64,
        url: String,
        headers: Headers,
        lifespan: Duration,
    },
    /// Close stream `id` now (ignored when it already ended).
    Stop { id: u64 },
    /// `GET {url}/metadata` with `headers`.
    Metadata {
        id: u64,
        url: String,
        headers: Headers,
    },
    /// Drop every request and end the thread; no more events.
    Shutdown,
}

/// What the outbound thread reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The init event: the app connected runner `runner_id` to torpor.
    Started {
        id: u64,
        runner_id: String,
        protocol_version: u16,
    },
    /// A ping after the init event.
    Ping { id: u64 },
    /// torpor closed the stream.
    Ended { id: u64, reason: EndReason },
    /// The stream failed or ended by itself.
    Failed { id: u64, failure: Failure },
    /// The answer of a metadata request.
    Metadata {
        id: u64,
        result: Result<RunnerMetadata, Failure>,
    },
}

/// Why torpor closed a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Stopped,
    Lifespan,
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// TCP connect and TLS handshake (`connect_timeout_ms`).
    Connect,
    /// Status and headers (`headers_timeout_ms`).
    Headers,
    /// The init event (`init_timeout_ms`).
    Init,
    /// Silence after the init event (`event_timeout_ms`).
    Event,
    /// The whole metadata request (`metadata_timeout_ms`).
    Metadata,
}

/// A failed request, as a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{host} is {addr}, which the address policy denies")]
    AddressDenied { host: String, addr: IpAddr },
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out waiting for {0:?}")]
    Timeout(TimeoutPhase),
    /// Not 200 (for `/start`) or not 2xx (for `/metadata`); the first
    /// [`ERROR_BODY_BYTES`] bytes of the body (cut at a character boundary).
    #[error("answered status {status}")]
    Status { status: u16, body: String },
    #[error("content type {0:?} is not text/event-stream")]
    ContentType(Option<String>),
    #[error("bad init payload: {0}")]
    Payload(InitError),
    #[error("bad event stream: {0}")]
    Sse(SseError),
    /// The app ended the stream before torpor closed it. `error_event` is the data of the
    /// last `error` event (hono sends one when the app's handler throws), `read_error` the
    /// transport error if the connection broke rather than ended.
    #[error("stream ended early (after init: {started})")]
    StreamEnded {
        started: bool,
        error_event: Option<String>,
        read_error: Option<String>,
    },
    #[error("{limit} requests of this kind are already running")]
    TooManyRequests { limit: usize },
    #[error("a stream with this id is running")]
    DuplicateId,
    #[error("body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("bad metadata: {0}")]
    Metadata(MetadataError),
}

/// Name resolution for the client; the address policy filters what it returns.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, host: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Fixed names (tests, or overrides like `/etc/hosts`); unknown names fail.
pub struct StaticResolver(pub HashMap<String, Vec<IpAddr>>);

impl Resolver for StaticResolver {
    fn resolve(&self, host: &str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> {
        let found = self.0.get(&host.to_ascii_lowercase()).cloned();
        let host = host.to_owned();
        Box::pin(async move {
            found.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("unknown host {host}"))
            })
        })
    }
}

/// Hooks of the outbound thread.
#[derive(Default)]
pub struct Hooks {
    /// Name resolution; the system's when `None`.
    pub resolver: Option<Arc<dyn Resolver>>,
    /// Called after every event.
    pub waker: Option<Waker>,
}

/// The handle of the outbound thread. Dropping it shuts the thread down and joins it.
pub struct Outbound {
    commands: Sender<Command>,
    notify: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Outbound {
    /// Start the thread; events arrive on the returned receiver.
    pub fn spawn(
        settings: ServerlessSettings,
        hooks: Hooks,
    ) -> io::Result<(Outbound, Receiver<Event>)> {
        // reqwest's rustls needs a crypto provider; torpor uses ring (a no-op if one is
        // already installed in the process).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let resolver = hooks.resolver.unwrap_or_else(|| Arc::new(SystemResolver));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(settings.connect_timeout())
            .pool_max_idle_per_host(0)
            .user_agent(concat!("torpor/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(PolicyResolver {
                inner: resolver,
                policy: settings.addresses.clone(),
            }))
            .build()
            .map_err(io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let notify = Arc::new(Notify::new());
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let shell = Shell {
            client,
            settings: Arc::new(settings),
            commands: command_rx,
            notify: notify.clone(),
            events: event_tx,
            waker: hooks.waker,
            streams: HashMap::new(),
            metadata: HashMap::new(),
            serial: 0,
            reports_tx,
            reports_rx,
        };
        let thread = std::thread::Builder::new()
            .name("torpor-serverless".into())
            .spawn(move || {
                runtime.block_on(shell.run());
                // A DNS lookup still on the blocking pool is not waited for.
                runtime.shutdown_background();
            })?;
        Ok((
            Outbound {
                commands,
                notify,
                thread: Some(thread),
            },
            events,
        ))
    }

    /// Hand a command to the thread; false when the thread is gone.
    pub fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        self.notify.notify_one();
        sent
    }

    /// Shut the thread down and wait for it.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(Command::Shutdown);
            self.notify.notify_one();
            let _ = thread.join();
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

// ---------------------------------------------------------------------------------------------
// The thread
// ---------------------------------------------------------------------------------------------

struct Live {
    serial: u64,
    task: tokio::task::AbortHandle,
}

/// What a request task tells the thread's loop; the loop drops reports of requests that
/// already ended (stopped), so nothing of a stream follows its end.
struct Report {
    id: u64,
    serial: u64,
    what: ReportKind,
}

enum ReportKind {
    Started {
        runner_id: String,
        protocol_version: u16,
    },
    Ping,
    Ended(EndReason),
    Failed(Failure),
    Metadata(Result<RunnerMetadata, Failure>),
}

struct Shell {
    client: reqwest::Client,
    settings: Arc<ServerlessSettings>,
    commands: Receiver<Command>,
    notify: Arc<Notify>,
    events: Sender<Event>,
    waker: Option<Waker>,
    streams: HashMap<u64, Live>,
    metadata: HashMap<u64, Live>,
    serial: u64,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
}

impl Shell {
    async fn run(mut self) {
        let notify = self.notify.clone();
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        self.abort_all();
                        return;
                    }
                    Ok(command) => self.command(command),
                    Err(TryRecvError::Empty) => break,
                }
            }
            let report = tokio::select! {
                _ = notify.notified() => None,
                report = self.reports_rx.recv() => report,
            };
            if let Some(report) = report {
                self.report(report);
            }
        }
    }

    fn abort_all(&mut self) {
        for (_, live) in self.streams.drain().chain(self.metadata.drain()) {
            live.task.abort();
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
        if let Some(waker) = &self.waker {
            waker();
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Start {
                id,
                url,
                headers,
                lifespan,
            } => {
                if let Some(failure) = admit(&self.streams, id, self.settings.max_streams) {
                    return self.emit(Event::Failed { id, failure });
                }
                let (client, settings) = (self.client.clone(), self.settings.clone());
                let live = self.spawn(id, move |report| async move {
                    let end = tokio::time::sleep(lifespan);
                    tokio::select! {
                        failure = stream(&client, &settings, &url, &headers, &report) => {
                            ReportKind::Failed(failure)
                        }
                        _ = end => ReportKind::Ended(EndReason::Lifespan),
                    }
                });
                self.streams.insert(id, live);
            }
            Command::Stop { id } => {
                if let Some(live) = self.streams.remove(&id) {
                    live.task.abort();
                    self.emit(Event::Ended {
                        id,
                        reason: EndReason::Stopped,
                    });
                }
            }
            Command::Metadata { id, url, headers } => {
                if let Some(failure) =
                    admit(&self.metadata, id, self.settings.max_metadata_requests)
                {
                    return self.emit(Event::Metadata {
                        id,
                        result: Err(failure),
                    });
                }
                let (client, settings) = (self.client.clone(), self.settings.clone());
                let live = self.spawn(id, move |_| async move {
                    let deadline = settings.metadata_timeout();
                    let result = match tokio::time::timeout(
                        deadline,
                        fetch_metadata(&client, &settings, &url, &headers),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => Err(Failure::Timeout(TimeoutPhase::Metadata)),
                    };
                    ReportKind::Metadata(result)
                });
                self.metadata.insert(id, live);
            }
            Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    /// Spawn a request task; `body` gets a reporter for its intermediate reports and returns
    /// its final one.
    fn spawn<F, Fut>(&mut self, id: u64, body: F) -> Live
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = ReportKind> + Send + 'static,
    {
        self.serial += 1;
        let serial = self.serial;
        let reporter = Reporter {
            id,
            serial,
            tx: self.reports_tx.clone(),
        };
        let tx = self.reports_tx.clone();
        let fut = body(reporter);
        let task = tokio::spawn(async move {
            let what = fut.await;
            let _ = tx.send(Report { id, serial, what });
        });
        Live {
            serial,
            task: task.abort_handle(),
        }
    }

    fn report(&mut self, report: Report) {
        let Report { id, serial, what } = report;
        let table = match what {
            ReportKind::Metadata(_) => &mut self.metadata,
            _ => &mut self.streams,
        };
        if table.get(&id).map(|l| l.serial) != Some(serial) {
            return; // stopped meanwhile
        }
        let event = match what {
            ReportKind::Started {
                runner_id,
                protocol_version,
            } => Event::Started {
                id,
                runner_id,
                protocol_version,
            },
            ReportKind::Ping => Event::Ping { id },
            ReportKind::Ended(reason) => {
                table.remove(&id);
                Event::Ended { id, reason }
            }
            ReportKind::Failed(failure) => {
                table.remove(&id);
                Event::Failed { id, failure }
            }
            ReportKind::Metadata(result) => {
                table.remove(&id);
                Event::Metadata { id, result }
            }
        };
        self.emit(event);
    }
}

fn admit(table: &HashMap<u64, Live>, id: u64, limit: usize) -> Option<Failure> {
    if table.contains_key(&id) {
        Some(Failure::DuplicateId)
    } else if table.len() >= limit {
        Some(Failure::TooManyRequests { limit })
    } else {
        None
    }
}

struct Reporter {
    id: u64,
    serial: u64,
    tx: mpsc::UnboundedSender<Report>,
}

impl Reporter {
    fn send(&self, what: ReportKind) {
        let _ = self.tx.send(Report {
            id: self.id,
            serial: self.serial,
            what,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// The `/start` stream until it fails (the caller's `select!` ends it otherwise).
async fn stream(
    client: &reqwest::Client,
    settings: &ServerlessSettings,
    url: &str,
    headers: &Headers,
    report: &Reporter,
) -> Failure {
    let request = match request(client, &settings.addresses, url, "start", headers) {
        Ok(r) => r.header(ACCEPT, "text/event-stream"),
        Err(failure) => return failure,
    };
    let mut response = match tokio::time::timeout(settings.headers_timeout(), request.send()).await
    {
        Err(_) => return Failure::Timeout(TimeoutPhase::Headers),
        Ok(Err(e)) => return request_failure(&e),
        Ok(Ok(r)) => r,
    };
    if response.status() != reqwest::StatusCode::OK {
        let status = response.status().as_u16();
        let body = error_body(&mut response, settings.headers_timeout()).await;
        return Failure::Status { status, body };
    }
    let content_type = response.headers().get(CONTENT_TYPE);
    if !content_type.is_some_and(is_event_stream) {
        let shown = content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return Failure::ContentType(shown);
    }

    let mut parser = SseParser::new(settings.max_event_bytes);
    let mut started = false;
    let mut error_event = None;
    let mut deadline = Instant::now() + settings.init_timeout();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) if started => return Failure::Timeout(TimeoutPhase::Event),
            Err(_) => return Failure::Timeout(TimeoutPhase::Init),
            Ok(Ok(Some(chunk))) => chunk,
            Ok(end) => {
                return Failure::StreamEnded {
                    started,
                    error_event,
                    read_error: end.err().map(|e| error_chain(&e)),
                }
            }
        };
        let fed = parser.feed(&chunk);
        while let Some(event) = parser.next_event() {
            if started {
                deadline = Instant::now() + settings.event_timeout();
            }
            match event.event.as_str() {
                // Every `message` must decode; only the first init counts (as the engine).
                "message" => match init::decode_init(&event.data) {
                    Ok(init) if !started => {
                        started = true;
                        deadline = Instant::now() + settings.event_timeout();
                        report.send(ReportKind::Started {
                            runner_id: init.runner_id,
                            protocol_version: init.runner_protocol_version,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => return Failure::Payload(e),
                },
                "ping" if started => report.send(ReportKind::Ping),
                "error" => error_event = Some(truncated(event.data.as_bytes())),
                _ => {}
            }
        }
        if let Err(e) = fed {
            return Failure::Sse(e);
        }
    }
}

async fn fetch_metadata(
    client: &reqwest::Client,
    settings: &ServerlessSettings,
    url: &str,
    headers: &Headers,
) -> Result<RunnerMetadata, Failure> {
    let request = request(client, &settings.addresses, url, "metadata", headers)?
        .header(ACCEPT, "application/json");
    let mut response = request.send().await.map_err(|e| request_failure(&e))?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        // The caller's deadline bounds this read too.
        let body = error_body(&mut response, Duration::MAX).await;
        return Err(Failure::Status { status, body });
    }
    let limit = settings.metadata_body_bytes;
    let too_large = Failure::BodyTooLarge { limit };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| Failure::StreamEnded {
        started: false,
        error_event: None,
        read_error: Some(error_chain(&e)),
    })? {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    metadata::parse_metadata(&body).map_err(Failure::Metadata)
}

/// `GET {base}/{path}` after the URL and the IP-literal checks.
fn request(
    client: &reqwest::Client,
    policy: &AddressPolicy,
    base: &str,
    path: &str,
    headers: &Headers,
) -> Result<reqwest::RequestBuilder, Failure> {
    let text = format!("{}/{path}", base.trim().trim_end_matches('/'));
    let url = url::Url::parse(&text).map_err(|e| Failure::InvalidRequest(format!("url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::InvalidRequest(format!(
            "url scheme {} is not http or https",
            url.scheme()
        )));
    }
    // An IP-literal host is connected to without resolution, so check it here.
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) => d.parse::<IpAddr>().ok(),
        None => return Err(Failure::InvalidRequest("url has no host".into())),
    };
    if let Some(addr) = literal {
        if !policy.allows(addr) {
            return Err(Failure::AddressDenied {
                host: url.host_str().unwrap_or_default().to_owned(),
                addr,
            });
        }
    }
    let mut map = HeaderMap::with_capacity(headers.0.len());
    for (name, value) in &headers.0 {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| Failure::InvalidRequest(format!("invalid header name {name:?}")))?;
        // The value is not shown: it may be a secret.
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| Failure::InvalidRequest(format!("invalid value of header {name}")))?;
        map.append(name, value);
    }
    Ok(client.get(url).headers(map))
}

fn is_event_stream(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("text/event-stream")
}

/// The first [`ERROR_BODY_BYTES`] bytes of a refused answer's body, read within `limit`.
async fn error_body(response: &mut reqwest::Response, limit: Duration) -> String {
    let mut body = Vec::new();
    let read = async {
        while body.len() < ERROR_BODY_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    truncated(&body)
}

/// At most [`ERROR_BODY_BYTES`] bytes of text, cut at a character boundary.
fn truncated(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(ERROR_BODY_BYTES)];
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    let mut end = text.len().min(ERROR_BODY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn request_failure(e: &reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(denied) = err.downcast_ref::<Denied>() {
            return Failure::AddressDenied {
                host: denied.host.clone(),
                addr: denied.addr,
            };
        }
        source = err.source();
    }
    if e.is_timeout() {
        Failure::Timeout(TimeoutPhase::Connect)
    } else {
        Failure::Connect(error_chain(e))
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// Every address of `host` is denied by the policy.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {addr}, which the address policy denies")]
struct Denied {
    host: String,
    addr: IpAddr,
}

/// The client's resolver: the hook's answer, less what the policy denies.
struct PolicyResolver {
    inner: Arc<dyn Resolver>,
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let lookup = self.inner.resolve(&host);
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs = lookup.await?;
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .filter(|ip| policy.allows(**ip))
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
            match (allowed.is_empty(), addrs.first()) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                (true, Some(&addr)) => Err(Box::new(Denied { host, addr }) as _),
                (true, None) => Err(Box::new(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host} has no address"),
                )) as _),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_content_types() {
        for (v, ok) in [
            ("text/event-stream", true),
            ("Text/Event-Stream; charset=utf-8", true),
            (" text/event-stream ;x=y", true),
            ("text/plain", false),
            ("text/event-streams", false),
            ("", false),
        ] {
            assert_eq!(is_event_stream(&HeaderValue::from_static(v)), ok, "{v}");
        }
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        let mut body = vec![b'a'; ERROR_BODY_BYTES - 1];
        body.extend("é".as_bytes());
        let text = truncated(&body);
        assert_eq!(text.len(), ERROR_BODY_BYTES - 1);
        assert_eq!(truncated(b"short"), "short");
    }
}
