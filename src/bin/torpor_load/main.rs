//! `torpor-load`: a WebSocket load generator for loopback benchmarks of the gateway (or of
//! any WebSocket echo server).
//!
//! Modes (`--mode`): `closed` (one message in flight per connection), `pipeline` (`--depth`
//! in flight), `rate` (open loop at `--rate` msgs/s, latency from the intended send time),
//! `idle` (many quiet connections, target RSS per connection), `flood` (writes without ever
//! reading, reconnecting when dropped). `--wake N` measures the wake latency of a
//! hibernating WebSocket (see the flag). Output: a text summary, then one JSON line.
//!
//! Target: `--path P`, or `--actor ID` (`/gateway/{ID}/`), or `--create-actor` (creates one
//! through the engine API first); default `/`.
//!
//! It is a client tool: it must never be linked into the gateway, and it counts what goes
//! wrong on the wire (connect failures, unexpected closes, wrong echo sizes) instead of
//! panicking.

mod modes;
mod stats;
mod wake;
mod ws;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use modes::{FloodCfg, IdleCfg, LoopCfg, RateCfg, Run, Target};
use stats::{new_hist, Totals};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Closed,
    Pipeline,
    Rate,
    Idle,
    Flood,
}

#[derive(Parser, Debug)]
#[command(name = "torpor-load", about = "WebSocket echo load generator")]
struct Args {
    /// Target address HOST:PORT (the gateway, or a plain echo server).
    #[arg(long, default_value = "127.0.0.1:6420")]
    addr: String,
    /// Literal request path (e.g. for a plain echo server); default `/` without an actor.
    #[arg(long, conflicts_with_all = ["actor", "create_actor"])]
    path: Option<String>,
    /// Actor id to address through `/gateway/{actor}/`.
    #[arg(long)]
    actor: Option<String>,
    /// Create an actor through the engine API (`POST /actors`) and target it.
    #[arg(long, conflicts_with = "actor")]
    create_actor: bool,
    /// Load pattern.
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 20)]
    size: usize,
    /// Send text frames (default binary).
    #[arg(long)]
    text: bool,
    /// Messages per connection (closed / pipeline); ignored when --duration is given.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    count: u64,
    /// Measure for this many seconds instead of a count (rate / flood: default 10).
    #[arg(long, short = 'd')]
    duration: Option<f64>,
    /// Seconds of load before the measured window (duration and rate modes).
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Count mode: round trips per connection before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Pipeline: messages in flight per connection.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Rate: total messages per second over all connections (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Idle: spread connections over source addresses 127.0.0.1 ... 127.0.0.K
    /// (default: enough that each has at most 20000 connections).
    #[arg(long)]
    sources: Option<usize>,
    /// Idle: seconds to hold all connections once they are all open.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Report CPU seconds and RSS of this process over the measured window.
    #[arg(long)]
    pid: Option<i32>,
    /// Wake mode: N rounds on one connection of putting the actor to sleep (text `__sleep`,
    /// which `echo-runner --control-messages` obeys), waiting until torpor reports the socket
    /// hibernating, then timing one message until its echo (the wake). Needs the gateway.
    #[arg(long)]
    wake: Option<usize>,
    /// Tokio worker threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print only the JSON line.
    #[arg(long)]
    json_only: bool,
    /// Print each connection error to stderr.
    #[arg(long)]
    verbose: bool,
}

fn secs(what: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("{what} must be a number of seconds >= 0"))
}

fn real_main(a: Args) -> Result<bool, String> {
    let addr: SocketAddr = a
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {}: {e}", a.addr))?
        .next()
        .ok_or_else(|| format!("--addr {}: no address", a.addr))?;
    let actor = if a.create_actor {
        Some(wake::create_actor(addr)?)
    } else {
        a.actor.clone()
    };
    let path = match (&a.path, &actor) {
        (Some(p), _) => p.clone(),
        (None, Some(id)) => format!("/gateway/{id}/"),
        (None, None) => "/".to_string(),
    };
    if let Some(rounds) = a.wake {
        wake::wake_main(addr, &path, a.size, rounds)?;
        return Ok(true);
    }
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let duration = a.duration.map(|d| secs("--duration", d)).transpose()?;
    let warmup_time = secs("--warmup-secs", a.warmup_secs)?;
    let soft = modes::raise_nofile();
    if soft > 0 && a.connections as u64 + 64 > soft {
        eprintln!(
            "torpor-load: open-files limit {soft} is below {} connections; expect failures",
            a.connections
        );
    }
    let run = Arc::new(Run {
        t: Target {
            addr,
            host: a.addr.clone(),
            path: path.clone(),
            size: a.size,
            text: a.text,
            pid: a.pid,
        },
        totals: Totals::default(),
        hist: new_hist(),
        lag: new_hist(),
        verbose: a.verbose,
    });
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    let c = a.connections;
    let report = match a.mode {
        Mode::Closed | Mode::Pipeline => {
            let depth = if a.mode == Mode::Closed {
                1
            } else {
                a.depth.max(1)
            };
            rt.block_on(modes::run_loop(
                run.clone(),
                LoopCfg {
                    connections: c,
                    depth,
                    warmup: a.warmup,
                    count: a.count,
                    duration,
                    warmup_time,
                },
            ))
        }
        Mode::Rate => {
            let rate = a.rate.ok_or("--mode rate needs --rate R")?;
            if !(rate > 0.0 && rate.is_finite()) {
                return Err("--rate must be > 0".into());
            }
            rt.block_on(modes::run_rate(
                run.clone(),
                RateCfg {
                    connections: c,
                    rate,
                    duration: duration.unwrap_or(Duration::from_secs(10)),
                    warmup_time,
                },
            ))
        }
        Mode::Idle => {
            let sources = a.sources.unwrap_or(c.div_ceil(20_000)).max(1);
            rt.block_on(modes::run_idle(
                run.clone(),
                IdleCfg {
                    connections: c,
                    sources,
                    hold: secs("--hold", a.hold)?,
                },
            ))
        }
        Mode::Flood => rt.block_on(modes::run_flood(
            run.clone(),
            FloodCfg {
                connections: c,
                duration: duration.unwrap_or(Duration::from_secs(10)),
            },
        )),
    };
    // Connections still closing are not waited for.
    rt.shutdown_timeout(Duration::from_millis(100));
    if !a.json_only {
        println!("target ws://{}{}", a.addr, path);
        println!("{}", report.text());
    }
    println!("{}", report.json());
    let measured = match a.mode {
        Mode::Idle => report.connected.unwrap_or(0) > 0,
        _ => report.messages > 0,
    };
    Ok(measured)
}

fn main() -> ExitCode {
    match real_main(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("torpor-load: nothing was measured");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("torpor-load: {e}");
            ExitCode::FAILURE
        }
    }
}
