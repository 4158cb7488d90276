//! Replay (SPEC §2.5): the echo runner drops its connection at seeded random points while a
//! client streams numbered messages; the runner reconnects with the same key, the gateway
//! replays every unacknowledged message with its original index, and:
//! - the actor receives every message exactly once and in order (`seq_errors == 0`,
//!   `gaps == 0`, `messages == n`), the runner dropping the replayed duplicates;
//! - the client gets every echo exactly once and in order.
//!
//! The echo runner withholds the ack of the message that triggers a drop (and of everything
//! it delivers after it on the doomed connection) until the gateway's replay brought a
//! duplicate, so every drop forces at least one replayed duplicate. Each seed runs with both
//! drop modes of its relay: `close` (the gateway sees the old socket close, then the
//! reconnect) and `partition` (the old socket stays open and silent, so the gateway sees the
//! reconnect's `Init` first and evicts the old connection); odd seeds echo through an actor
//! handle, so echoes still queued at a drop are sent after the reconnect. The relay delivers
//! every byte the runner wrote, and the gateway handles them before the next connection's, so
//! "every echo, in order" is a fair demand (runner → gateway traffic has no replay).
//! The verdict never depends on timing: drops are counted in delivered messages, and the
//! waits below are bounded waits for conditions.

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{create_actor, ws_connect, Daemon, Rng, Runner, WAIT};
use tungstenite::Message;

const SEEDS: [u64; 3] = [0x5eed_7e01, 0x5eed_7e02, 0x5eed_7e03];
const MESSAGES: usize = 5_000;
const IN_FLIGHT: usize = 32;

/// The echo runner's `COUNTERS` line as name → value.
fn counters(runner: &Runner) -> HashMap<String, u64> {
    runner.proc.signal(libc::SIGUSR1);
    let line = runner.proc.wait_line("COUNTERS");
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(c: &HashMap<String, u64>, k: &str) -> u64 {
    *c.get(k)
        .unwrap_or_else(|| panic!("COUNTERS has no {k}: {c:?}"))
}

/// Message `i`: `"{i}:"` and then 1–300 bytes, or for every other message up to 64 KiB (so
/// that the 1 MiB pending window fills now and then and backpressure meets the drops).
fn message(rng: &mut Rng, i: usize) -> String {
    let len = match rng.below(2) {
        0 => 1 + rng.below(64 * 1024) as usize,
        _ => 1 + rng.below(300) as usize,
    };
    let mut s = format!("{i}:");
    s.extend((0..len).map(|_| (b'a' + rng.below(26) as u8) as char));
    s
}

/// The number before the colon, for messages in assertion failures.
fn number(s: &str) -> &str {
    s.split(':').next().unwrap_or(s)
}

/// Streams `n` numbered text messages with up to `IN_FLIGHT` in flight and checks that every
/// echo arrives exactly once, in order. Returns with the socket still open, or what went
/// wrong.
fn stream(ws: &mut common::Ws, n: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut sent: VecDeque<String> = VecDeque::new();
    let mut i = 0;
    let mut received = 0;
    while i < n || !sent.is_empty() {
        while i < n && sent.len() < IN_FLIGHT {
            let m = message(&mut rng, i);
            ws.send(Message::text(m.clone()))
                .map_err(|e| format!("send {i}: {e}"))?;
            sent.push_back(m);
            i += 1;
        }
        let got = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(f)) => return Err(format!("echo #{received}: closed: {f:?}")),
            Ok(Message::Binary(_)) => return Err(format!("echo #{received} is binary")),
            Ok(_) => continue,
            Err(e) => return Err(format!("echo #{received}: read: {e}")),
        };
        let want = sent.pop_front().unwrap_or_default();
        if got.as_str() != want {
            return Err(format!(
                "echo #{received}: got message {} ({} bytes), want message {} ({} bytes)",
                number(&got),
                got.len(),
                number(&want),
                want.len()
            ));
        }
        received += 1;
    }
    Ok(())
}

/// Closes the client and checks that no further data message arrives before the close.
fn close_quietly(ws: &mut common::Ws) {
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => panic!("extra echo after the stream: {}", number(&t)),
            Ok(Message::Binary(_)) => panic!("extra binary message after the stream"),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
}

/// Waits (bounded) until the runner has reconnected after its last drop and the replay of
/// that reconnect has been handled (each drop yields at least one duplicate).
fn settled_counters(runner: &Runner) -> HashMap<String, u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = counters(runner);
        let drops = get(&c, "drops");
        if get(&c, "connections") > drops && get(&c, "duplicates_dropped") >= drops {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "runner did not settle after its drops: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    /// `--drop-mode` of the echo runner.
    drop: &'static str,
    /// `--echo-via-handle`.
    via_handle: bool,
}

/// Every (seed, mode) combination the tests run.
fn runs() -> Vec<(u64, Mode)> {
    let mut v = Vec::new();
    for (i, seed) in SEEDS.into_iter().enumerate() {
        for drop in ["close", "partition"] {
            let via_handle = i % 2 == 1;
            v.push((seed, Mode { drop, via_handle }));
        }
    }
    v
}

fn replay_run(
    daemon: &Daemon,
    runner_endpoint: &str,
    client_addr: SocketAddr,
    seed: u64,
    mode: Mode,
) {
    let key = format!("replay-{seed:x}");
    let seed_s = seed.to_string();
    let mut args = vec![
        "--runner-key",
        &key,
        "--reconnect-base-ms",
        "10",
        "--chaos-seed",
        &seed_s,
        "--drop-every-min",
        "50",
        "--drop-every-max",
        "300",
        "--check-sequence",
        "--drop-mode",
        mode.drop,
    ];
    if mode.via_handle {
        args.push("--echo-via-handle");
    }
    let runner = Runner::start(runner_endpoint, &args);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut ws = ws_connect(client_addr, &actor, "/replay");
    if let Err(e) = stream(&mut ws, MESSAGES, seed) {
        let c = counters(&runner);
        let metrics: Vec<String> = daemon
            .metrics()
            .into_iter()
            .filter(|(k, v)| *v != 0.0 && (k.contains("tunnel") || k.contains("closes")))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        panic!("seed {seed:#x} {mode:?}: {e}\nrunner: {c:?}\ngateway: {metrics:?}");
    }

    let c = settled_counters(&runner);
    close_quietly(&mut ws);
    let replays = daemon.metric("torpor_tunnel_replays_total");
    let replayed = daemon.metric("torpor_tunnel_replayed_messages_total");
    let ignored = daemon.metric("torpor_tunnel_acks_ignored_total");
    let pauses = daemon.metric("torpor_tunnel_backpressure_pauses_total");
    let evictions = daemon.metric("torpor_websocket_closes_total{reason=\"ws.eviction\"}");
    eprintln!(
        "replay seed {seed:#x} {mode:?}: runner drops={} connections={} \
         duplicates_dropped={} messages={} acks_sent={} seq_errors={} gaps={} | gateway \
         replays={replays} replayed_messages={replayed} acks_ignored={ignored} \
         backpressure_pauses={pauses} evictions={evictions}",
        get(&c, "drops"),
        get(&c, "connections"),
        get(&c, "duplicates_dropped"),
        get(&c, "messages"),
        get(&c, "acks_sent"),
        get(&c, "seq_errors"),
        get(&c, "gaps"),
    );
    let drops = get(&c, "drops");
    assert_eq!(get(&c, "seq_errors"), 0, "actor saw a duplicate or a hole");
    assert_eq!(get(&c, "gaps"), 0, "runner saw an index gap");
    assert_eq!(get(&c, "protocol_errors"), 0);
    assert_eq!(
        get(&c, "messages"),
        MESSAGES as u64,
        "actor deliveries != messages sent"
    );
    assert!(drops >= 3, "only {drops} drops");
    assert!(
        get(&c, "duplicates_dropped") >= drops,
        "every drop withholds an ack, so it must replay at least one duplicate"
    );
    assert!(replays >= drops as f64, "replays {replays} < drops {drops}");
    if mode.drop == "partition" {
        // The old connection was still open at every reconnect: the eviction path replayed.
        assert!(
            evictions >= drops as f64,
            "evictions {evictions} < drops {drops}"
        );
    }
    assert!(
        replayed >= drops as f64,
        "replayed {replayed} < drops {drops}"
    );
}

#[test]
fn replay_after_runner_drops_single_shard() {
    for (seed, mode) in runs() {
        let daemon = Daemon::start(1, &[]);
        replay_run(&daemon, &daemon.endpoint(), daemon.addr, seed, mode);
    }
}

/// `--shards 2` with per-shard ports: the runner is on shard 0, the client on shard 1, so
/// detach, attach and replay cross shards. The pending window is cut to 128 KiB so that
/// backpressure (the client paused until acks free room) keeps meeting the drops.
#[test]
fn replay_after_runner_drops_across_shards() {
    for (seed, mode) in runs() {
        let base = free_port_pair();
        let base_s = base.to_string();
        let daemon = Daemon::start(
            2,
            &[
                ("TORPOR_SHARD_PORT_BASE", base_s.as_str()),
                ("TORPOR_LIMITS__PENDING_BYTES_PER_SOCKET", "131072"),
            ],
        );
        let shard0 = format!("http://127.0.0.1:{base}");
        let client_addr: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
        replay_run(&daemon, &shard0, client_addr, seed ^ 0x2_0000, mode);
    }
}

/// Two consecutive free ports (bound and released; the daemon binds them right after).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}
