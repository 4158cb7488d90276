//! The synchronous parts of the load generator: creating an actor through the engine API
//! (`POST /actors`), and the `--wake N` measurement (the wake latency of a hibernating
//! WebSocket, one connection, blocking sockets and tungstenite).
//!
//! It must never run inside the async runtime (everything here blocks).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// One blocking HTTP/1.1 exchange (`connection: close`); returns the whole response text.
fn http(addr: SocketAddr, head_and_body: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(head_and_body.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    Ok(raw)
}

/// `torpor_client_websockets_hibernating` from the gateway's `/metrics`.
fn hibernating(addr: SocketAddr) -> Result<f64, String> {
    let raw = http(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"),
    )?;
    Ok(raw
        .lines()
        .find_map(|l| l.strip_prefix("torpor_client_websockets_hibernating "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Creates an actor (`POST /actors?namespace=default`, runner name `default`) and returns
/// its id.
pub fn create_actor(addr: SocketAddr) -> Result<String, String> {
    let body = r#"{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}"#;
    let raw = http(
        addr,
        &format!(
            "POST /actors?namespace=default HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )?;
    let json = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("create actor response ({e}): {raw}"))?;
    v["actor"]["actor_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no actor_id in create response: {raw}"))
}

/// Wake latency: client message on a hibernating socket → echo back, per round (ns).
pub fn run_wake(
    addr: SocketAddr,
    path: &str,
    size: usize,
    rounds: usize,
) -> Result<Vec<u32>, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}{path}"), stream)
        .map_err(|e| format!("handshake: {e}"))?;
    let read_data = |ws: &mut tungstenite::WebSocket<TcpStream>| loop {
        match ws.read().map_err(|e| format!("read: {e}"))? {
            Message::Binary(_) | Message::Text(_) => break Ok::<(), String>(()),
            _ => continue,
        }
    };
    let payload = vec![0x5au8; size];
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ws.send(Message::text("__sleep"))
            .map_err(|e| format!("send: {e}"))?;
        read_data(&mut ws)?;
        while hibernating(addr)? < 1.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let t = Instant::now();
        ws.send(Message::binary(payload.clone()))
            .map_err(|e| format!("send: {e}"))?;
        read_data(&mut ws)?;
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        // The socket is attached again before the next round puts the actor to sleep.
        while hibernating(addr)? > 0.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = ws.close(None);
    Ok(lat)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs `--wake N` and prints its text line and JSON line (unchanged format).
pub fn wake_main(addr: SocketAddr, path: &str, size: usize, rounds: usize) -> Result<(), String> {
    let mut lat = run_wake(addr, path, size, rounds)?;
    lat.sort_unstable();
    println!(
        "wake rounds={rounds} s={size}: wake-to-echo us p50={:.1} p90={:.1} p99={:.1} max={:.1}",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "wake", "rounds": rounds, "size": size,
            "p50_us": pct(&lat, 0.5), "p90_us": pct(&lat, 0.9),
            "p99_us": pct(&lat, 0.99), "max_us": pct(&lat, 1.0),
        })
    );
    Ok(())
}
