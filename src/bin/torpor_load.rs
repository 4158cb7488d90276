//! `torpor-load`: a small WebSocket load generator for loopback measurements.
//!
//! Mode `closed`: N connections, each with one message of S bytes in flight (send, wait for
//! the echo, repeat) for a fixed number of round trips; prints throughput and round-trip
//! latency percentiles as text and one JSON line. Given `--actor`, it targets
//! `/gateway/{actor}/`; given `--create-actor`, it creates one through the engine API first.
//!
//! Mode `--wake N`: the wake latency of a hibernating WebSocket (see the flag).

use clap::Parser;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::Message;

#[derive(Parser, Debug)]
#[command(
    name = "torpor-load",
    about = "WebSocket echo load generator (closed loop)"
)]
struct Args {
    /// Target address (the gateway, or a direct echo server).
    #[arg(long, default_value = "127.0.0.1:6420")]
    addr: SocketAddr,
    /// Actor id to address through `/gateway/{actor}/`; without it the path is `/`.
    #[arg(long)]
    actor: Option<String>,
    /// Create an actor through the engine API (`POST /actors`) and target it.
    #[arg(long)]
    create_actor: bool,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 20)]
    size: usize,
    /// Round trips per connection.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    count: usize,
    /// Round trips per connection before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Wake mode: N rounds on one connection of putting the actor to sleep (text `__sleep`,
    /// which `echo-runner --control-messages` obeys), waiting until torpor reports the socket
    /// hibernating, then timing one message until its echo (the wake). Needs the gateway.
    #[arg(long)]
    wake: Option<usize>,
}

/// `torpor_client_websockets_hibernating` from the gateway's `/metrics`.
fn hibernating(addr: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect for metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .find_map(|l| l.strip_prefix("torpor_client_websockets_hibernating "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Wake latency: client message on a hibernating socket → echo back, per round.
fn run_wake(addr: SocketAddr, path: &str, size: usize, rounds: usize) -> Vec<u32> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    let read_data = |ws: &mut tungstenite::WebSocket<TcpStream>| loop {
        match ws.read().expect("read") {
            Message::Binary(_) | Message::Text(_) => break,
            _ => continue,
        }
    };
    let payload = vec![0x5au8; size];
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ws.send(Message::text("__sleep")).expect("send");
        read_data(&mut ws);
        while hibernating(addr) < 1.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let t = Instant::now();
        ws.send(Message::binary(payload.clone())).expect("send");
        read_data(&mut ws);
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        // The socket is attached again before the next round puts the actor to sleep.
        while hibernating(addr) > 0.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = ws.close(None);
    lat
}

fn create_actor(addr: SocketAddr) -> String {
    let body = r#"{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}"#;
    let mut s = TcpStream::connect(addr).expect("connect for create");
    write!(
        s,
        "POST /actors?namespace=default HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let json = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).expect("create actor response");
    v["actor"]["actor_id"]
        .as_str()
        .expect("actor_id")
        .to_string()
}

fn run_conn(addr: SocketAddr, path: String, size: usize, warmup: usize, count: usize) -> Vec<u32> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    let payload = vec![0x5au8; size];
    let mut lat = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        ws.send(Message::binary(payload.clone())).expect("send");
        loop {
            match ws.read().expect("read") {
                Message::Binary(b) => {
                    assert_eq!(b.len(), size);
                    break;
                }
                Message::Text(_) => break,
                _ => continue,
            }
        }
        if i >= warmup {
            lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    let _ = ws.close(None);
    lat
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let a = Args::parse();
    let actor = if a.create_actor {
        Some(create_actor(a.addr))
    } else {
        a.actor.clone()
    };
    let path = match &actor {
        Some(id) => format!("/gateway/{id}/"),
        None => "/".to_string(),
    };
    if let Some(rounds) = a.wake {
        let mut lat = run_wake(a.addr, &path, a.size, rounds);
        lat.sort_unstable();
        println!(
            "wake rounds={rounds} s={}: wake-to-echo us p50={:.1} p90={:.1} p99={:.1} max={:.1}",
            a.size,
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
        println!(
            "{}",
            serde_json::json!({
                "mode": "wake", "rounds": rounds, "size": a.size,
                "p50_us": pct(&lat, 0.5), "p90_us": pct(&lat, 0.9),
                "p99_us": pct(&lat, 0.99), "max_us": pct(&lat, 1.0),
            })
        );
        return;
    }
    let start = Instant::now();
    let threads: Vec<_> = (0..a.connections)
        .map(|_| {
            let path = path.clone();
            let (addr, size, warmup, count) = (a.addr, a.size, a.warmup, a.count);
            std::thread::spawn(move || run_conn(addr, path, size, warmup, count))
        })
        .collect();
    let mut all: Vec<u32> = Vec::with_capacity(a.connections * a.count);
    for t in threads {
        all.extend(t.join().expect("connection thread"));
    }
    let elapsed = start.elapsed().max(Duration::from_nanos(1));
    all.sort_unstable();
    let total = all.len() as f64;
    let rate = total / elapsed.as_secs_f64();
    println!(
        "closed c={} s={} n={}: {:.0} msg/s, {:.1} MB/s echoed; rtt us p50={:.1} p90={:.1} p99={:.1} p99.9={:.1}",
        a.connections,
        a.size,
        a.count,
        rate,
        rate * a.size as f64 / 1e6,
        pct(&all, 0.5),
        pct(&all, 0.9),
        pct(&all, 0.99),
        pct(&all, 0.999)
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "closed", "connections": a.connections, "size": a.size, "count": a.count,
            "msgs_per_sec": rate, "p50_us": pct(&all, 0.5), "p90_us": pct(&all, 0.9),
            "p99_us": pct(&all, 0.99), "p999_us": pct(&all, 0.999),
        })
    );
}
