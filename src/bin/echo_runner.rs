//! echo-runner: an example runner built on `torpor::runner`, used by tests and benchmarks.
//! Its actors echo every WebSocket message back (same binary flag) and answer HTTP requests
//! with the request body (method and path in `x-echo-method` / `x-echo-path`).
//!
//! stdout protocol (one line each, for test harnesses):
//! - `READY runner_id=<id> runner_key=<key>` once the first `Init` is answered;
//! - `CONNECTED runner_id=<id> connections=<n>` after every later `Init` (reconnects);
//! - `COUNTERS messages=.. duplicates_dropped=.. gaps=.. ... seq_errors=.. drops=..` on
//!   SIGUSR1, and on SIGTERM / SIGINT / stdin EOF (with `--exit-on-stdin-eof`) before the
//!   graceful shutdown;
//! - `STOPPED` when the runner has shut down.
//!
//! Test aids:
//! - `--check-sequence`: text messages are `N:...`, numbered from 0 on each socket; the actor
//!   counts every `N` that is not the previous one + 1 (a duplicate that reached it, or a
//!   hole) in `seq_errors`.
//! - `--chaos-seed S --drop-every-min A --drop-every-max B`: after a seeded random number in
//!   [A, B] of delivered messages, the runner's connection breaks and the runner reconnects
//!   with the same key. The message that triggers the break, and every message delivered
//!   after it on the doomed connection, is echoed but not acknowledged, so the gateway must
//!   replay them (the runner drops them as duplicates) together with whatever it sent that
//!   never reached the runner. Once the runner has reconnected and the gateway's replay
//!   brought a duplicate, the withheld messages are acknowledged and acking goes on as usual.
//!   `--drop-mode` says how the connection breaks. `close` and `partition` put an in-process
//!   TCP relay between runner and gateway; at the break it stops passing the gateway's bytes
//!   (they are lost, as in flight on a dead link) and ends the runner's side, while every byte
//!   the runner wrote still reaches the gateway (so no echo is lost: the protocol has no
//!   replay in that direction). Then `close` closes the gateway's side, and `partition`
//!   keeps it open and silent, so the gateway sees the reconnect's `Init` while the old
//!   connection still looks alive. `runner` calls `RunnerHandle::drop_connection()` without
//!   a relay: the runner drops its own socket, and bytes it wrote that the kernel had not
//!   sent yet are lost with it, so echoes can go missing. The relay also lets the next
//!   connection through only once the gateway has handled every byte of the previous one
//!   (a ping after them came back), so old echoes are not overtaken by new ones.
//! - `--echo-via-handle`: echoes and acks go through an `ActorHandle` (as work finished on
//!   another task would), so those still queued when a drop happens are sent while
//!   disconnected (the runner queues them for the next connection).
//!
//! It must never be linked into the gateway; it is a client like any other runner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torpor::runner::{
    random_key, AckPolicy, Actor, ActorCx, ActorHandle, ActorInfo, HttpRequest, HttpResponse,
    RequestKey, Runner, RunnerConfig, RunnerHandle, WsOpen, WsOpenReply,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// Ack right after each message is echoed.
    Every,
    /// Never ack (the gateway keeps everything pending; tests the ack timeout).
    None,
    /// Ack each message this long after it was echoed.
    Delay(Duration),
}

fn parse_ack(s: &str) -> Result<AckMode, String> {
    match s {
        "every" => Ok(AckMode::Every),
        "none" => Ok(AckMode::None),
        _ => {
            let ms = s
                .strip_prefix("delay-ms=")
                .or_else(|| s.strip_prefix("delay-ms:"))
                .ok_or_else(|| format!("expected every, none or delay-ms=N, got {s:?}"))?;
            ms.parse::<u64>()
                .map(|ms| AckMode::Delay(Duration::from_millis(ms)))
                .map_err(|e| format!("bad delay {ms:?}: {e}"))
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "echo-runner",
    about = "Echo runner for torpor (runner protocol v7)"
)]
struct Args {
    /// Gateway endpoint (http:// or ws://).
    #[arg(long, env = "TORPOR_ENDPOINT", default_value = "http://127.0.0.1:6420")]
    endpoint: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "default")]
    runner_name: String,
    /// Runner key (identity across reconnects); random when absent.
    #[arg(long)]
    runner_key: Option<String>,
    /// Runner token, offered as the `rivet_token.<token>` subprotocol.
    #[arg(long, env = "TORPOR_RUNNER_TOKEN")]
    token: Option<String>,
    #[arg(long, default_value_t = 100)]
    slots: u32,
    /// Runner version announced in Init.
    #[arg(long, default_value_t = 1)]
    version: u32,
    /// Ack policy: `every`, `none`, or `delay-ms=N`.
    #[arg(long, default_value = "every", value_parser = parse_ack)]
    ack: AckMode,
    /// Same as `--ack delay-ms=N`.
    #[arg(long, conflicts_with = "ack")]
    ack_delay_ms: Option<u64>,
    /// Answer `canHibernate: false` to every WebSocket open.
    #[arg(long)]
    no_hibernate: bool,
    /// Text messages `__sleep`, `__stop`, `__close`, `__hibernate` (after being echoed) make
    /// the actor sleep, stop, close the socket, or hand it to the gateway to hibernate.
    #[arg(long)]
    control_messages: bool,
    /// First reconnect delay in milliseconds (doubles to 30 s).
    #[arg(long, default_value_t = 1000)]
    reconnect_base_ms: u64,
    /// How long a graceful shutdown waits for the gateway to stop the actors.
    #[arg(long, default_value_t = 5000)]
    shutdown_timeout_ms: u64,
    /// Shut down when stdin reaches EOF (for harnesses that hold a pipe open).
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Text messages are `N:...` numbered from 0 per socket; count sequence errors.
    #[arg(long)]
    check_sequence: bool,
    /// Drop the connection at seeded random points (see `--drop-every-min/max`). Requires
    /// `--ack every`.
    #[arg(long)]
    chaos_seed: Option<u64>,
    /// Fewest delivered messages between two chaos drops.
    #[arg(long, default_value_t = 100)]
    drop_every_min: u64,
    /// Most delivered messages between two chaos drops.
    #[arg(long, default_value_t = 1000)]
    drop_every_max: u64,
    /// How a chaos drop breaks the connection: `close`, `partition` (relayed) or `runner`
    /// (`drop_connection()`); see the module documentation.
    #[arg(long, default_value = "close", value_parser = ["close", "partition", "runner"])]
    drop_mode: String,
    /// Echo and ack through an `ActorHandle` instead of the callback's context.
    #[arg(long)]
    echo_via_handle: bool,
}

/// Counters of the test aids, printed after the library's own.
#[derive(Default)]
struct Stats {
    seq_errors: AtomicU64,
    drops: AtomicU64,
}

/// Seeded connection drops, shared by every actor of the process.
struct Chaos {
    rng: StdRng,
    min: u64,
    max: u64,
    /// Delivered messages left before the next drop.
    countdown: u64,
    /// While `Some((n, d))`: a drop was requested on the connection that was the `n`-th to
    /// complete `Init`, when `d` duplicates had been dropped. Acknowledgements are withheld
    /// until a later connection completed `Init` and the gateway's replay brought a duplicate
    /// (there is one: the message that triggered the drop was delivered, never acknowledged).
    cut: Option<(u64, u64)>,
    /// Per socket, the newest message delivered but not acknowledged because of a drop.
    withheld: HashMap<RequestKey, (u16, ActorHandle)>,
    handle: Arc<OnceLock<RunnerHandle>>,
    /// `None` for `--drop-mode runner`.
    relay: Option<Arc<Relay>>,
    stats: Arc<Stats>,
}

impl Chaos {
    fn next_countdown(&mut self) -> u64 {
        self.rng.random_range(self.min..=self.max)
    }

    /// Called for each delivered message, before it is echoed. Returns whether the message
    /// may be acknowledged (after its echo); `false` while a drop is pending, and then the
    /// message is remembered for [`Chaos::release`].
    fn on_delivered(&mut self, key: RequestKey, index: u16, actor: &ActorHandle) -> bool {
        let Some(handle) = self.handle.get() else {
            return true;
        };
        let counters = handle.counters();
        if !self.replayed(&counters) {
            self.withheld.insert(key, (index, actor.clone()));
            return false;
        }
        self.cut = None;
        // This message's ack covers whatever was withheld on its socket.
        self.withheld.remove(&key);
        self.countdown = self.countdown.saturating_sub(1);
        if self.countdown > 0 {
            return true;
        }
        self.countdown = self.rng.random_range(self.min..=self.max);
        self.cut = Some((counters.connections, counters.duplicates_dropped));
        self.withheld.insert(key, (index, actor.clone()));
        self.stats.drops.fetch_add(1, Relaxed);
        match &self.relay {
            Some(relay) => relay.cut(),
            None => handle.drop_connection(),
        }
        false
    }

    /// No drop pending, or the one pending is over: reconnected, and replayed.
    fn replayed(&self, c: &torpor::runner::CounterSnapshot) -> bool {
        self.cut
            .is_none_or(|(conns, dups)| c.connections > conns && c.duplicates_dropped > dups)
    }

    /// Polled while a drop is pending: once it is over, acknowledges what was withheld (the
    /// echoes went out before), as the actor would once it persisted. Without it, a replay
    /// made only of duplicates (the client paused by backpressure) would never be
    /// acknowledged.
    fn release(&mut self) {
        let Some(handle) = self.handle.get() else {
            return;
        };
        if self.cut.is_none() || !self.replayed(&handle.counters()) {
            return;
        }
        self.cut = None;
        for (key, (index, actor)) in self.withheld.drain() {
            actor.ack(key, index);
        }
    }
}

#[derive(Clone, Copy)]
struct EchoConfig {
    ack: AckMode,
    hibernate: bool,
    control: bool,
    check_sequence: bool,
    echo_via_handle: bool,
}

struct Echo {
    cfg: EchoConfig,
    chaos: Option<Arc<Mutex<Chaos>>>,
    stats: Arc<Stats>,
    /// Next expected sequence number per socket (`--check-sequence`).
    expected: HashMap<RequestKey, u64>,
}

impl Echo {
    fn check_sequence(&mut self, key: RequestKey, data: &[u8]) {
        let n = data
            .iter()
            .position(|&b| b == b':')
            .and_then(|i| std::str::from_utf8(&data[..i]).ok())
            .and_then(|s| s.parse::<u64>().ok());
        let expected = self.expected.entry(key).or_insert(0);
        match n {
            Some(n) => {
                if n != *expected {
                    self.stats.seq_errors.fetch_add(1, Relaxed);
                    eprintln!("echo-runner: socket {key}: got message {n}, expected {expected}");
                }
                *expected = n + 1;
            }
            None => {
                self.stats.seq_errors.fetch_add(1, Relaxed);
                eprintln!("echo-runner: socket {key}: unnumbered message");
            }
        }
    }
}

impl Actor for Echo {
    fn ack_policy(&self) -> AckPolicy {
        match self.cfg.ack {
            AckMode::Every if self.chaos.is_none() && !self.cfg.echo_via_handle => {
                AckPolicy::Immediate
            }
            AckMode::Every | AckMode::None | AckMode::Delay(_) => AckPolicy::Manual,
        }
    }

    fn on_websocket_open(&mut self, _cx: &mut ActorCx<'_>, open: &WsOpen<'_>) -> WsOpenReply {
        if self.cfg.check_sequence {
            self.expected.insert(open.key, 0);
        }
        WsOpenReply::Accept {
            can_hibernate: self.cfg.hibernate,
        }
    }

    fn on_websocket_close(
        &mut self,
        _cx: &mut ActorCx<'_>,
        key: RequestKey,
        _code: Option<u16>,
        _reason: Option<&str>,
    ) {
        self.expected.remove(&key);
    }

    fn on_websocket_message(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        index: u16,
        data: Bytes,
        binary: bool,
    ) {
        let control = if self.cfg.control && !binary {
            match &data[..] {
                b"__sleep" => Some(0),
                b"__stop" => Some(1),
                b"__close" => Some(2),
                b"__hibernate" => Some(3),
                _ => None,
            }
        } else {
            None
        };
        if self.cfg.check_sequence && !binary {
            self.check_sequence(key, &data);
        }
        // Decided before the echo: with `--drop-mode runner` the drop request then goes ahead
        // of a handle's echo, which is queued while disconnected.
        let chaos_ack = self.chaos.as_ref().map(|c| {
            let actor = cx.handle();
            c.lock()
                .map(|mut c| c.on_delivered(key, index, &actor))
                .unwrap_or(true)
        });
        if self.cfg.echo_via_handle {
            // One FIFO path for echoes and acks, so their order holds across a drop.
            let h = cx.handle();
            h.send(key, data, binary);
            if chaos_ack == Some(true) || (chaos_ack.is_none() && self.cfg.ack == AckMode::Every) {
                h.ack(key, index);
            }
        } else {
            cx.send(key, data, binary);
            // Acks are written after the echo queued above.
            if chaos_ack == Some(true) {
                cx.ack(key, index);
            }
        }
        if let AckMode::Delay(d) = self.cfg.ack {
            let h = cx.handle();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                h.ack(key, index);
            });
        }
        match control {
            Some(0) => cx.sleep(),
            Some(1) => cx.stop(),
            Some(2) => {
                cx.close(key, Some(1000), Some("echo.closed"));
            }
            Some(3) => {
                cx.hibernate(key);
            }
            _ => {}
        }
    }

    fn on_http_request(&mut self, _cx: &mut ActorCx<'_>, req: HttpRequest) -> HttpResponse {
        let content_type = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "application/octet-stream".into());
        HttpResponse::new(200, req.body)
            .header("content-type", content_type)
            .header("x-echo-method", req.method)
            .header("x-echo-path", req.path)
    }
}

/// Process-level events from the signal and stdin threads.
enum Signal {
    Counters,
    Stop,
}

/// Blocks SIGTERM/SIGINT/SIGUSR1 in every thread and waits for them on a dedicated thread
/// (tokio's signal feature is not enabled in this crate).
fn spawn_signal_thread(tx: tokio::sync::mpsc::UnboundedSender<Signal>) -> std::io::Result<()> {
    // SAFETY: plain libc signal-mask calls on a zero-initialised sigset_t owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised signal set; `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            let ev = if sig == libc::SIGUSR1 {
                Signal::Counters
            } else {
                Signal::Stop
            };
            if tx.send(ev).is_err() {
                return;
            }
        })?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    if args.chaos_seed.is_some() {
        // Chaos mode breaks the connection on purpose: the resets it causes are expected,
        // not warnings.
        filter = filter.add_directive("torpor::runner::client=error".parse().expect("directive"));
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();

    let (sig_tx, sig_rx) = tokio::sync::mpsc::unbounded_channel();
    // Before any other thread exists, so that every thread inherits the blocked mask.
    if let Err(e) = spawn_signal_thread(sig_tx.clone()) {
        eprintln!("echo-runner: cannot install signal handling: {e}");
        std::process::exit(1);
    }
    if args.exit_on_stdin_eof {
        let tx = sig_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                let _ = tx.send(Signal::Stop);
            });
        if let Err(e) = spawned {
            eprintln!("echo-runner: cannot watch stdin: {e}");
            std::process::exit(1);
        }
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo-runner: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(args, sig_rx));
    std::process::exit(code);
}

async fn run(args: Args, mut signals: tokio::sync::mpsc::UnboundedReceiver<Signal>) -> i32 {
    let ack = match args.ack_delay_ms {
        Some(ms) => AckMode::Delay(Duration::from_millis(ms)),
        None => args.ack,
    };
    let echo = EchoConfig {
        ack,
        hibernate: !args.no_hibernate,
        control: args.control_messages,
        check_sequence: args.check_sequence,
        echo_via_handle: args.echo_via_handle,
    };
    let stats = Arc::new(Stats::default());
    let handle_cell: Arc<OnceLock<RunnerHandle>> = Arc::new(OnceLock::new());
    let (endpoint, relay) = if args.chaos_seed.is_some() && args.drop_mode != "runner" {
        match Relay::start(&args.endpoint, args.drop_mode == "partition").await {
            Ok((e, r)) => (e, Some(r)),
            Err(e) => {
                eprintln!("echo-runner: cannot start the relay: {e}");
                return 2;
            }
        }
    } else {
        (args.endpoint, None)
    };
    let chaos = match args.chaos_seed {
        None => None,
        Some(seed) => {
            if ack != AckMode::Every {
                eprintln!("echo-runner: --chaos-seed needs --ack every");
                return 2;
            }
            let min = args.drop_every_min.max(1);
            let max = args.drop_every_max.max(min);
            let mut c = Chaos {
                rng: StdRng::seed_from_u64(seed),
                min,
                max,
                countdown: 0,
                cut: None,
                withheld: HashMap::new(),
                handle: handle_cell.clone(),
                relay,
                stats: stats.clone(),
            };
            c.countdown = c.next_countdown();
            Some(Arc::new(Mutex::new(c)))
        }
    };
    let mut cfg = RunnerConfig::new(endpoint, args.runner_name);
    cfg.namespace = args.namespace;
    cfg.runner_key = args.runner_key.unwrap_or_else(random_key);
    cfg.token = args.token;
    cfg.total_slots = args.slots;
    cfg.version = args.version;
    cfg.reconnect_base = Duration::from_millis(args.reconnect_base_ms.max(1));
    cfg.shutdown_timeout = Duration::from_millis(args.shutdown_timeout_ms);
    cfg.seed = args.chaos_seed;
    let key = cfg.runner_key.clone();
    let actor_stats = stats.clone();
    let main_chaos = chaos.clone();
    let handle = match Runner::start(cfg, move |_: &ActorInfo| -> Box<dyn Actor> {
        Box::new(Echo {
            cfg: echo,
            chaos: chaos.clone(),
            stats: actor_stats.clone(),
            expected: HashMap::new(),
        })
    }) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("echo-runner: {e}");
            return 2;
        }
    };
    let _ = handle_cell.set(handle.clone());
    let counters = |h: &RunnerHandle| {
        format!(
            "COUNTERS {} seq_errors={} drops={}",
            h.counters(),
            stats.seq_errors.load(Relaxed),
            stats.drops.load(Relaxed)
        )
    };

    let mut status = handle.subscribe();
    let mut seen = 0u64;
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                let st = status.borrow_and_update().clone();
                if st.stopped {
                    break;
                }
                if st.connected && st.connections > seen {
                    seen = st.connections;
                    let id = st.runner_id.unwrap_or_default();
                    if seen == 1 {
                        println!("READY runner_id={id} runner_key={key}");
                    } else {
                        println!("CONNECTED runner_id={id} connections={seen}");
                    }
                }
            }
            _ = sleep_if(main_chaos.is_some(), Duration::from_millis(5)) => {
                if let Some(Ok(mut c)) = main_chaos.as_ref().map(|c| c.lock()) {
                    c.release();
                }
            }
            sig = signals.recv() => match sig {
                Some(Signal::Counters) => println!("{}", counters(&handle)),
                Some(Signal::Stop) | None => {
                    println!("{}", counters(&handle));
                    // A second signal during the graceful shutdown exits at once.
                    tokio::select! {
                        _ = handle.shutdown() => {}
                        _ = signals.recv() => {
                            println!("STOPPED");
                            return 0;
                        }
                    }
                    break;
                }
            }
        }
    }
    println!("STOPPED");
    0
}

/// Sleeps for `d` when `on`, else never completes.
async fn sleep_if(on: bool, d: Duration) {
    if on {
        tokio::time::sleep(d).await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// The in-process TCP relay of `--drop-mode close|partition`.
struct Relay {
    upstream: std::net::SocketAddr,
    /// Keep the gateway's side open and silent after a cut.
    partition: bool,
    /// The cut signal of the newest relayed connection (the runner's current one).
    current: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

impl Relay {
    /// Listens on loopback in front of `endpoint`; returns the endpoint the runner dials.
    async fn start(endpoint: &str, partition: bool) -> std::io::Result<(String, Arc<Relay>)> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "endpoint host:port");
        let rest = endpoint.split_once("://").map(|(_, r)| r).ok_or_else(bad)?;
        let authority = rest.split('/').next().ok_or_else(bad)?;
        let upstream = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(bad)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let relay = Arc::new(Relay {
            upstream,
            partition,
            current: Mutex::new(None),
        });
        let r = relay.clone();
        tokio::spawn(async move {
            let mut previous: Option<tokio::sync::oneshot::Receiver<()>> = None;
            let mut token = 0u64;
            while let Ok((down, _)) = listener.accept().await {
                // The gateway handles everything of the previous connection before anything
                // of this one, as it would if the old bytes had not been in flight.
                if let Some(done) = previous.take() {
                    let _ = done.await;
                }
                let cut = Arc::new(tokio::sync::Notify::new());
                if let Ok(mut cur) = r.current.lock() {
                    *cur = Some(cut.clone());
                }
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                previous = Some(done_rx);
                token += 1;
                let conn = RelayConn {
                    upstream: r.upstream,
                    cut,
                    partition: r.partition,
                    token: token.to_be_bytes(),
                    done: done_tx,
                };
                tokio::spawn(conn.run(down));
            }
        });
        Ok((format!("http://{local}"), relay))
    }

    /// Breaks the runner's current connection.
    fn cut(&self) {
        if let Some(cut) = self.current.lock().ok().and_then(|mut c| c.take()) {
            cut.notify_one();
        }
    }
}

/// One relayed connection.
struct RelayConn {
    upstream: std::net::SocketAddr,
    cut: Arc<tokio::sync::Notify>,
    partition: bool,
    /// Payload of the barrier ping, unique per connection.
    token: [u8; 8],
    /// Fired once the gateway has handled every byte the runner sent on this connection.
    done: tokio::sync::oneshot::Sender<()>,
}

impl RelayConn {
    /// Every byte the runner writes is passed to the gateway, to the end of the runner's side.
    /// The gateway's bytes are passed to the runner until the gateway ends its side or `cut`
    /// fires. After a cut they are discarded, and the runner's side is half-closed so that
    /// the runner sees the connection end (having read everything, it closes gracefully, so
    /// nothing it wrote is lost). When the runner's side has ended, a barrier follows its
    /// bytes: a WebSocket ping whose pong proves the gateway handled all of them (it answers
    /// pings in order). Then the gateway's side is closed, or with `partition` kept open and
    /// silent until the gateway closes it.
    async fn run(self, down: tokio::net::TcpStream) {
        use tokio::io::AsyncWriteExt;
        let Ok(up) = tokio::net::TcpStream::connect(self.upstream).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let _ = down.set_nodelay(true);
        let (mut down_r, mut down_w) = down.into_split();
        let (mut up_r, mut up_w) = up.into_split();
        // Not cancelled at any point, so that no byte read from the runner is dropped.
        let mut upward = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
            up_w
        });
        let was_cut = tokio::select! {
            _ = tokio::io::copy(&mut up_r, &mut down_w) => false,
            _ = self.cut.notified() => true,
        };
        drop(down_w);
        if !was_cut {
            // The gateway ended the connection: nothing to order after it.
            let _ = self.done.send(());
            return;
        }
        let mut gateway_open = true;
        let mut tail: Vec<u8> = Vec::new();
        let mut up_w = loop {
            tokio::select! {
                r = &mut upward => break r.ok(),
                open = discard_until(&mut up_r, &mut tail, None), if gateway_open => {
                    gateway_open = open;
                }
            }
        };
        // A masked (client) ping frame with a zero mask: the payload travels as is.
        let mut ping = vec![0x89, 0x80 | 8, 0, 0, 0, 0];
        ping.extend_from_slice(&self.token);
        let mut pong = vec![0x8a, 8];
        pong.extend_from_slice(&self.token);
        if let Some(w) = up_w.as_mut() {
            if gateway_open && w.write_all(&ping).await.is_ok() {
                tail.clear();
                gateway_open = discard_until(&mut up_r, &mut tail, Some(&pong)).await;
            }
        }
        let _ = self.done.send(());
        if !self.partition {
            drop(up_w.take());
        }
        while gateway_open {
            gateway_open = discard_until(&mut up_r, &mut tail, None).await;
        }
    }
}

/// Reads and discards the gateway's bytes: one read when `pattern` is `None`, else until the
/// pattern went by (`tail` keeps the bytes a match may straddle). Returns false once the
/// gateway's side has ended.
async fn discard_until(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    tail: &mut Vec<u8>,
    pattern: Option<&[u8]>,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let Some(p) = pattern else {
            return true;
        };
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(p.len()).any(|w| w == p) {
            tail.clear();
            return true;
        }
        let keep = tail.len().min(p.len() - 1);
        tail.drain(..tail.len() - keep);
    }
}
