//! echo-runner: an example runner built on `torpor::runner`, used by tests and benchmarks.
//! Its actors echo every WebSocket message back (same binary flag) and answer HTTP requests
//! with the request body (method and path in `x-echo-method` / `x-echo-path`).
//!
//! stdout protocol (one line each, for test harnesses):
//! - `READY runner_id=<id> runner_key=<key>` once the first `Init` is answered;
//! - `CONNECTED runner_id=<id> connections=<n>` after every later `Init` (reconnects);
//! - `COUNTERS messages=.. duplicates_dropped=.. gaps=.. ...` on SIGUSR1, and on SIGTERM /
//!   SIGINT / stdin EOF (with `--exit-on-stdin-eof`) before the graceful shutdown;
//! - `STOPPED` when the runner has shut down.
//!
//! It must never be linked into the gateway; it is a client like any other runner.

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use torpor::runner::{
    random_key, AckPolicy, Actor, ActorCx, ActorInfo, HttpRequest, HttpResponse, RequestKey,
    Runner, RunnerConfig, WsOpen, WsOpenReply,
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
}

#[derive(Clone, Copy)]
struct EchoConfig {
    ack: AckMode,
    hibernate: bool,
    control: bool,
}

struct Echo {
    cfg: EchoConfig,
}

impl Actor for Echo {
    fn ack_policy(&self) -> AckPolicy {
        match self.cfg.ack {
            AckMode::Every => AckPolicy::Immediate,
            AckMode::None | AckMode::Delay(_) => AckPolicy::Manual,
        }
    }

    fn on_websocket_open(&mut self, _cx: &mut ActorCx<'_>, _open: &WsOpen<'_>) -> WsOpenReply {
        WsOpenReply::Accept {
            can_hibernate: self.cfg.hibernate,
        }
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
        cx.send(key, data, binary);
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
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
    };
    let mut cfg = RunnerConfig::new(args.endpoint, args.runner_name);
    cfg.namespace = args.namespace;
    cfg.runner_key = args.runner_key.unwrap_or_else(random_key);
    cfg.token = args.token;
    cfg.total_slots = args.slots;
    cfg.version = args.version;
    cfg.reconnect_base = Duration::from_millis(args.reconnect_base_ms.max(1));
    cfg.shutdown_timeout = Duration::from_millis(args.shutdown_timeout_ms);
    let key = cfg.runner_key.clone();
    let handle = match Runner::start(cfg, move |_: &ActorInfo| -> Box<dyn Actor> {
        Box::new(Echo { cfg: echo })
    }) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("echo-runner: {e}");
            return 2;
        }
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
            sig = signals.recv() => match sig {
                Some(Signal::Counters) => println!("COUNTERS {}", handle.counters()),
                Some(Signal::Stop) | None => {
                    println!("COUNTERS {}", handle.counters());
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
