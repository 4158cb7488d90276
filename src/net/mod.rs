//! Drivers that move bytes between sockets and the core: the per-shard accept loop, the
//! HTTP/1.1 connection (routing, engine API, metrics, health), the client WebSocket tunnel
//! driver ([`client`]) and the runner connection driver ([`runner`]).
//!
//! Nothing here decides protocol behaviour: parsing is `crate::http`/`crate::ws`, the window
//! is `crate::tunnel`, placement is `crate::engine`. These functions read, call the core,
//! and queue what it returns.

pub mod client;
pub mod gateway;
pub mod runner;
pub mod shell;
pub mod writer;

use crate::gateway::{ApiRequest, ControlMsg, Refusal, Reply, ShardMsg};
use crate::http::access;
use crate::http::parse::{body_kind, parse_request_head, split_path_query, BodyKind, RequestHead};
use crate::http::response::Response;
use crate::metrics::{Counter, Gauge};
use crate::shard::mailbox::Inbox;
use crate::shard::Shared;
use bytes::{Bytes, BytesMut};
use shell::Shard;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

/// Read size of an HTTP request (and of a WebSocket handshake): most fit in one read.
pub const READ_CHUNK: usize = 512;
/// Smallest read of an open client WebSocket. Small on purpose: a quiet socket sits in a
/// read that holds its buffer, so the buffer is a large part of what an idle socket costs
/// (reads grow with the traffic, see [`next_chunk`]).
pub const WS_READ_CHUNK: usize = 256;
/// Smallest and largest buffer of a runner connection's reads: few connections, each
/// carrying many sockets' traffic. The ceiling matters: a frame that does not fit in what is
/// left of a buffer is moved to the next one, so with 16 KiB buffers every 16 KiB message was
/// copied once; 128 KiB buffers took S2 (200 clients x 16 KiB) from 22k to 35k msg/s, and
/// 1 MiB ones cut the user-space instructions of a 64 KiB echo by a quarter (callgrind,
/// `PROFILE_SIZE=65536 bash perf/profile.sh callgrind`): reads that fill their room grow the
/// buffer, so a busy runner's frames straddle a buffer's end once in many frames.
pub const RUNNER_CHUNKS: (usize, usize) = (16 * 1024, 1024 * 1024);
/// Smallest and largest buffer of a client WebSocket's reads for small frames (a large frame
/// asks for more through `client::read_size`).
pub const WS_CHUNKS: (usize, usize) = (WS_READ_CHUNK, 64 * 1024);

/// Size of the next buffer a connection's reads allocate, between `floor` and `ceil`: it
/// doubles while reads fill the room they are given (a busy socket gets few large reads)
/// and halves when they use less than a quarter of it, so a quiet socket waits in a read
/// holding a small buffer.
pub fn next_chunk(chunk: usize, n: usize, offered: usize, (floor, ceil): (usize, usize)) -> usize {
    if n >= offered {
        (chunk * 2).min(ceil)
    } else if n * 4 < offered {
        (chunk / 2).max(floor)
    } else {
        chunk
    }
}

/// Fails (`AddrInUse`, naming the address) when any socket already listens on `addr`: a
/// second torpor, or any other program. torpor's shards share their port through
/// SO_REUSEPORT, which would also let another process of the same user join the group and
/// take a share of the connections; so before its own group is made, a plain bind (no
/// SO_REUSEPORT) proves that nobody listens there. Port 0 is always free.
pub fn ensure_port_free(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() == 0 {
        return Ok(());
    }
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Connections of an earlier run in TIME_WAIT do not count; a listener does.
    s.set_reuse_address(true)?;
    match s.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another process already listens on {addr}; torpor needs the address to itself (stop the other process or choose another `listen`)"),
        )),
        Err(e) => Err(std::io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))),
    }
}

/// Binds a listener with SO_REUSEPORT so every shard accepts on the same port.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// The shard's io_uring: with `COOP_TASKRUN` where the kernel has it (5.19+), so a completion
/// for a busy shard does not interrupt it with an inter-processor interrupt to run the ring's
/// task work; the work runs at the shard's next system call (a sleeping shard is still woken).
/// Measured with `perf record`: those interrupts were a fifth of torpor's CPU time under load;
/// with the flag, closed-loop echo throughput rose 23 %. On a kernel without it, a plain ring.
fn ring_builder() -> tokio_uring::Builder {
    let mut b = tokio_uring::builder();
    let mut ub = tokio_uring::uring_builder();
    ub.setup_coop_taskrun();
    if ub.build(8).is_ok() {
        b.uring_builder(&ub);
    }
    b
}

/// The body of one shard thread.
pub fn run_shard(
    id: u16,
    shared: Shared,
    inbox: Inbox<ShardMsg>,
    listeners: Vec<std::net::TcpListener>,
) {
    ring_builder().start(async move {
        let state = Rc::new(Shard::new(id, shared.clone()));
        tokio_uring::spawn(mailbox_task(state.clone(), inbox));
        tokio_uring::spawn(timer_task(state.clone()));
        let trim_ms = state.shared.config.timeouts.memory_trim_ms;
        if trim_ms > 0 {
            tokio_uring::spawn(every(Duration::from_millis(trim_ms), trim_heap));
        }
        let cap = {
            let c = &state.shared.config;
            connection_cap(c.limits.connections_per_shard, c.shard_count())
        };
        let count = Rc::new(ConnCount {
            open: std::cell::Cell::new(0),
            cap,
            freed: tokio::sync::Notify::new(),
            metrics: shared.metrics.clone(),
            shard: id as usize,
        });
        let mut accepts = Vec::new();
        for l in listeners {
            let listener = TcpListener::from_std(l);
            accepts.push(tokio_uring::spawn(accept_loop(
                state.clone(),
                listener,
                count.clone(),
            )));
        }
        for a in accepts {
            let _ = a.await;
        }
        // The listeners end at the drain, but the shard's connections are still closing
        // (`drain`): leaving this future would drop the runtime with every task, and the
        // sockets would end with a bare FIN instead of their close frames. The process ends
        // once the main thread has seen every shard drained.
        std::future::pending::<()>().await;
    });
}

/// Connections a shard holds open: the accept loop waits while it is at the cap, and each
/// connection's [`ConnGuard`] gives its place back when the connection's last task ends.
pub struct ConnCount {
    open: std::cell::Cell<usize>,
    cap: usize,
    freed: tokio::sync::Notify,
    metrics: crate::metrics::Metrics,
    shard: usize,
}

/// One open connection's place under the shard's cap (see [`ConnCount`]).
pub struct ConnGuard(Rc<ConnCount>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.open.set(c.open.get() - 1);
        c.metrics.shards[c.shard].gauge_add(Gauge::OpenConnections, -1);
        if c.open.get() + 1 == c.cap {
            c.freed.notify_one();
        }
    }
}

/// The connection cap of one shard: `limits.connections_per_shard`, or with 0 the open-files
/// limit shared between the shards (less room for the store, the rings and the mailboxes).
pub fn connection_cap(configured: usize, shards: usize) -> usize {
    // A connection takes one slot of the shard's table, whose slots fit in a request id.
    let max = crate::gateway::MAX_SLOTS / 2;
    if configured > 0 {
        return configured.min(max);
    }
    let mut lim: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed by pointer.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (nofile.saturating_sub(256) / shards.max(1)).clamp(16, max)
}

/// Is `e` the process or the system running out of file descriptors?
fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

async fn accept_loop(state: Rc<Shard>, listener: TcpListener, count: Rc<ConnCount>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        if count.open.get() >= count.cap {
            // At the cap: leave new connections in the kernel's backlog until one closes.
            state.metrics().inc(Counter::AcceptPauses);
            crate::warn_limited!(
                state.metrics(),
                cap = count.cap,
                "connection cap reached (limits.connections_per_shard); not accepting until a connection closes"
            );
            while count.open.get() >= count.cap {
                count.freed.notified().await;
            }
        }
        let (stream, peer) = match listener.accept().await {
            Ok(s) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(_) if state.shared.draining.load(Ordering::Relaxed) => {
                // The listener was shut down for the drain.
                return;
            }
            Err(e) => {
                // Out of descriptors (or another failure): wait, doubling up to a second, so
                // a flood neither spins the shard nor fills the log.
                if out_of_fds(&e) {
                    state.metrics().inc(Counter::AcceptPauses);
                }
                crate::warn_limited!(state.metrics(), error = %e, retry_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if state.shared.draining.load(Ordering::Relaxed) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        state.metrics().inc(Counter::ClientConnections);
        count.open.set(count.open.get() + 1);
        state.metrics().gauge_add(Gauge::OpenConnections, 1);
        let guard = ConnGuard(count.clone());
        tokio_uring::spawn(conn_task(state.clone(), stream, peer, guard));
    }
}

/// Drains the shard's mailbox on every eventfd wake-up.
async fn mailbox_task(state: Rc<Shard>, inbox: Inbox<ShardMsg>) {
    let fd = match inbox.wake_fd() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot duplicate the mailbox eventfd");
            return;
        }
    };
    let file = tokio_uring::fs::File::from_std(std::fs::File::from(fd));
    let mut buf = vec![0u8; 8];
    loop {
        let (res, b) = file.read_at(buf, 0).await;
        buf = b;
        if res.is_err() {
            return;
        }
        inbox.rearm();
        state.with(|core, now| {
            while let Some(msg) = inbox.try_recv() {
                core.handle_shard_msg(msg, now);
            }
        });
    }
}

/// The shard's one timer: sleeps until the core's next deadline (or until the core set an
/// earlier one) and runs what is due.
async fn timer_task(state: Rc<Shard>) {
    loop {
        let at = state.with(|core, _| core.poll_timeout());
        let Some(at) = at else {
            state.timer.notified().await;
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                state.with(|core, now| core.handle_timeout(now));
            }
            _ = state.timer.notified() => {}
        }
    }
}

/// Runs `f` every `period` (a late tick delays the next ones rather than bunching them).
async fn every(period: Duration, mut f: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        f();
    }
}

/// Hands the pages this thread's allocator heap no longer uses back to the OS (a no-op for
/// pages still in use). mimalloc frees lazily, on later allocations of the same thread; a
/// shard that went quiet after a burst (ten thousand handshakes, then idle sockets) would
/// keep the burst's memory resident indefinitely.
fn trim_heap() {
    // SAFETY: mi_collect takes no pointers and may be called at any time; it collects the
    // calling thread's heap (with `false`, without forcing other threads' delayed frees).
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Reads more bytes into `buf` (growing it if full). Returns false on EOF or error.
pub async fn read_more(stream: &TcpStream, buf: &mut BytesMut, want: usize) -> bool {
    read_some(stream, buf, want, want).await.is_some()
}

/// Most room one read of a request body adds to its buffer.
pub const BODY_READ_CHUNK: usize = 16 * 1024;

/// Room below which a buffer is not worth reading into: a new one is taken.
const MIN_SPARE: usize = 128;

/// Reads more bytes into `buf`. It reads into the room left in `buf` when that holds at least
/// `need` bytes (and [`MIN_SPARE`] when `buf` is empty); otherwise into a new buffer with
/// room for `max(need, chunk)`, the unparsed bytes moved over. Messages
/// already split off keep the old buffer alive until they are dropped. Returns (bytes read,
/// room offered), or `None` at EOF or on an error.
pub async fn read_some(
    stream: &TcpStream,
    buf: &mut BytesMut,
    need: usize,
    chunk: usize,
) -> Option<(usize, usize)> {
    let spare = buf.capacity() - buf.len();
    // A buffer holding part of a frame is replaced only when the rest does not fit: the
    // replacement copies that part over (a 64 KiB frame short of 67 bytes was copied whole
    // for a 67-byte read). An empty one costs nothing to replace.
    let least = if buf.is_empty() { MIN_SPARE } else { 1 };
    if spare < need.max(least) {
        let room = need.max(chunk).max(1);
        if buf.is_empty() {
            // Nothing to carry over: a fresh buffer of the size asked for (`reserve` would
            // keep the size of the largest buffer this one ever had).
            *buf = BytesMut::with_capacity(room);
        } else {
            buf.reserve(room);
        }
    }
    // io_uring reads write at the start of the buffer they are given, so hand it the spare
    // capacity only (a slice after the bytes already held).
    let start = buf.len();
    let offered = buf.capacity() - start;
    let b = std::mem::take(buf).slice(start..);
    let (res, b) = stream.read(b).await;
    *buf = b.into_inner();
    match res {
        Ok(n) if n > 0 => Some((n, offered)),
        _ => None,
    }
}

/// The response with `connection: close`.
pub fn closing(mut r: Response) -> Response {
    r.set_close();
    r
}

/// Writes a whole response (head and body) to a connection that is not a WebSocket.
pub async fn write_response(stream: &TcpStream, resp: &Response) -> bool {
    let head = Bytes::from(resp.encode_head());
    let mut chunks = vec![head];
    if !resp.body.is_empty() {
        chunks.push(resp.body.clone());
    }
    writer::write_all_vectored(stream, chunks).await.is_ok()
}

/// Refuses a request with an `x-rivet-error` response and closes the connection.
pub async fn refuse(state: &Shard, stream: &TcpStream, r: Refusal) {
    state.metrics().error(r.code);
    write_response(stream, &closing(r.response())).await;
}

fn error_response(state: &Shard, r: Refusal) -> Response {
    state.metrics().error(r.code);
    r.response()
}

/// One accepted connection: HTTP/1.1 requests until it upgrades or closes.
async fn conn_task(state: Rc<Shard>, stream: TcpStream, peer: SocketAddr, guard: ConnGuard) {
    let stream = Rc::new(stream);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let (head_limit, body_limit, handshake) = {
        let c = &state.shared.config;
        (
            c.limits.http_header_bytes,
            c.limits.http_body_bytes,
            Duration::from_millis(c.timeouts.handshake_ms),
        )
    };
    loop {
        // Read one request head within the handshake deadline.
        let deadline = tokio::time::Instant::now() + handshake;
        let head = loop {
            match parse_request_head(&buf, head_limit) {
                Ok(Some((head, n))) => {
                    let _ = buf.split_to(n);
                    break head;
                }
                Ok(None) => {}
                Err(e) => {
                    state.metrics().error(e.code());
                    let resp = closing(e.to_response());
                    write_response(&stream, &resp).await;
                    return;
                }
            }
            match tokio::time::timeout_at(deadline, read_more(&stream, &mut buf, READ_CHUNK)).await
            {
                Ok(true) => {}
                _ => return, // EOF, error or handshake deadline: just close
            }
        };
        state.metrics().inc(Counter::HttpRequests);
        let (path, query) = split_path_query(&head.path);
        let path = path.to_string();
        let query = query.to_string();
        if state.shared.draining.load(Ordering::Relaxed)
            && (path == "/runners/connect" || is_upgrade(&head))
        {
            // No new WebSocket while draining: the peer should go to another instance.
            refuse(&state, &stream, Refusal::DRAINING).await;
            return;
        }
        if path == "/runners/connect" {
            runner::serve(state, stream, head, buf, &query, peer).await;
            return;
        }
        if is_upgrade(&head) {
            client::serve(state, stream, head, buf, &path, &query, guard).await;
            return;
        }
        let gateway = match path.as_str() {
            "/livez" | "/readyz" | "/metrics" => None,
            _ => crate::gateway::route::parse_target(&head, &path, &query),
        };
        // The engine API is checked before its body is read: a refused caller makes torpor
        // hold nothing.
        if gateway.is_none() && !path.starts_with("/gateway/") {
            if let Some(resp) = api_gate(&state, &head, &path, peer) {
                write_response(&stream, &closing(resp)).await;
                return;
            }
        }
        let gateway = match gateway {
            Some(target) if head.method != "OPTIONS" => {
                // To an actor: the body buffered or streamed, the answer whole or streamed.
                if !gateway::serve(&state, &stream, &head, target, &mut buf, deadline).await {
                    return;
                }
                continue;
            }
            other => other,
        };
        // Plain HTTP: read the body, answer, keep the connection alive.
        let body = match read_body(&stream, &head, &mut buf, body_limit, deadline).await {
            Ok(b) => b,
            Err(resp) => {
                if let Some(code) = resp.header("x-rivet-error") {
                    state.metrics().error(code);
                }
                write_response(&stream, &closing(resp)).await;
                return;
            }
        };
        let resp = route_http(&state, &head, &path, &query, gateway, body).await;
        // While draining, each answer ends its connection (as Envoy's `connection: close`).
        let keep_alive = head.keep_alive() && !state.shared.draining.load(Ordering::Relaxed);
        let resp = if keep_alive { resp } else { closing(resp) };
        if !write_response(&stream, &resp).await || !keep_alive {
            return;
        }
    }
}

fn is_upgrade(head: &RequestHead) -> bool {
    head.header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Sends `100 Continue` when the client waits for it before its body
/// ([`RequestHead::expects_continue`]); called once the request is accepted, just before the
/// body is read. `false` when the write failed.
pub(crate) async fn send_continue(
    stream: &TcpStream,
    head: &RequestHead,
    kind: BodyKind,
    buf: &BytesMut,
) -> bool {
    if !head.expects_continue(kind, buf.len()) {
        return true;
    }
    let interim = vec![Bytes::from_static(crate::http::response::CONTINUE)];
    writer::write_all_vectored(stream, interim).await.is_ok()
}

pub(crate) async fn read_body(
    stream: &TcpStream,
    head: &RequestHead,
    buf: &mut BytesMut,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, Response> {
    let kind = body_kind(head, limit as u64).map_err(|e| e.to_response())?;
    if !send_continue(stream, head, kind, buf).await {
        return Err(Response::error(
            400,
            "request.bad_request",
            "incomplete body",
        ));
    }
    match kind {
        BodyKind::None => Ok(Bytes::new()),
        BodyKind::Length(n) => {
            let n = n as usize;
            while buf.len() < n {
                // Room for what arrives, not for what the head declares: a client that
                // declares 20 MiB and sends 1 KiB makes torpor hold about 1 KiB (the buffer
                // doubles as bytes come).
                let want = (n - buf.len()).min(BODY_READ_CHUNK);
                match tokio::time::timeout_at(deadline, read_more(stream, buf, want)).await {
                    Ok(true) => {}
                    _ => {
                        return Err(Response::error(
                            400,
                            "request.bad_request",
                            "incomplete body",
                        ))
                    }
                }
            }
            Ok(buf.split_to(n).freeze())
        }
        BodyKind::Chunked => {
            let mut dec = crate::http::parse::ChunkedDecoder::new(limit as u64);
            let mut out = BytesMut::new();
            loop {
                match dec.decode(buf, &mut out) {
                    Ok(true) => return Ok(out.freeze()),
                    Ok(false) => {}
                    Err(e) => return Err(e.to_response()),
                }
                match tokio::time::timeout_at(deadline, read_more(stream, buf, READ_CHUNK)).await {
                    Ok(true) => {}
                    _ => {
                        return Err(Response::error(
                            400,
                            "request.bad_request",
                            "incomplete body",
                        ))
                    }
                }
            }
        }
    }
}

/// The access check of an engine API route (everything but the gateway): `None` lets the
/// request through, `Some` is the refusal (401/403) or the answer to a CORS preflight.
fn api_gate(state: &Shard, head: &RequestHead, path: &str, peer: SocketAddr) -> Option<Response> {
    let access = &state.shared.access;
    if head.method == "OPTIONS" {
        state.metrics().inc(Counter::CorsPreflights);
        return Some(access.api_preflight(head));
    }
    if access::is_public_route(path) {
        return None;
    }
    let denied = access.check_api(head, peer).err()?;
    let m = state.metrics();
    m.inc(Counter::Unauthorized);
    m.error(denied.code(false));
    crate::warn_limited!(m, %peer, code = denied.code(false), path, "engine API call refused");
    Some(denied.response(false))
}

async fn route_http(
    state: &Shard,
    head: &RequestHead,
    path: &str,
    query: &str,
    gateway: Option<crate::gateway::route::Target>,
    body: Bytes,
) -> Response {
    if gateway.is_some() {
        // Preflights are the gateway's to answer (other gateway requests went to
        // `gateway::serve`): they carry no credentials, and tunnelling one would wake the
        // actor for nothing.
        state.metrics().inc(Counter::CorsPreflights);
        return access::gateway_preflight(head);
    }
    if path.starts_with("/gateway/") {
        return error_response(state, Refusal::NOT_FOUND_ROUTE);
    }
    let mut resp = route_api(state, head, path, query, body).await;
    state.shared.access.api_cors(head, &mut resp);
    resp
}

async fn route_api(
    state: &Shard,
    head: &RequestHead,
    path: &str,
    query: &str,
    body: Bytes,
) -> Response {
    match path {
        "/livez" => return Response::json(200, "{\"status\":\"ok\"}"),
        "/readyz" => {
            if state.shared.draining.load(Ordering::Relaxed) {
                return Refusal::DRAINING.response();
            }
            // Not ready while the store cannot commit (full disk, I/O error, damage).
            let store_down = state
                .shared
                .metrics
                .kv
                .get()
                .and_then(|kv| kv.down_reason());
            return match store_down {
                Some(why) => Response::error(
                    503,
                    crate::kv::STORE_UNAVAILABLE,
                    &format!("the store cannot commit: {why}"),
                ),
                None => Response::json(200, "{\"status\":\"ready\"}"),
            };
        }
        "/metrics" => {
            let text = state.shared.metrics.render();
            let mut r = Response::json(200, "");
            r.body = Bytes::from(text);
            r.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
            r.headers
                .push(("content-type".into(), "text/plain; version=0.0.4".into()));
            return r;
        }
        _ => {}
    }
    let method = head.method.clone();
    let path = path.to_string();
    let query = crate::http::parse::parse_query(query);
    let reply = state
        .ask(
            |waiter| {
                ControlMsg::Api(ApiRequest {
                    method,
                    path,
                    query,
                    body,
                    waiter,
                })
            },
            Duration::from_secs(60),
        )
        .await;
    match reply {
        Some(Reply::Api { status, body }) => {
            let mut r = Response::json(status, &body);
            if status >= 400 {
                // The engine's error body says `{group, code}`; the header says it too (SPEC
                // §2.3), for clients that read headers only.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                    if let (Some(g), Some(c)) = (v["group"].as_str(), v["code"].as_str()) {
                        let code = format!("{g}.{c}");
                        state.metrics().error(&code);
                        r.headers.push(("x-rivet-error".into(), code));
                    }
                }
            }
            r
        }
        _ => error_response(state, Refusal::CONTROL_UNAVAILABLE),
    }
}
