//! Failures of the store against the real daemon on a real filesystem: a full disk (a small
//! tmpfs), and damaged store files at start-up.

mod common;

use common::tmpfs::{fill, Tmpfs};
use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use torpor::protocol::{
    encode_to_server, Command as RunnerCommand, KvGetRequest, KvPutRequest, KvRequestData,
    KvResponseData, ToClient, ToServer, ToServerKvRequest,
};
use tungstenite::Message;

fn runner_ws(addr: SocketAddr, key: &str, name: &str) -> Ws {
    let mut ws = raw_runner_ws(addr, key, runner_init(name, 100));
    until(&mut ws, |m| matches!(m, ToClient::Init(_)).then_some(()));
    ws
}

fn until<T>(ws: &mut Ws, pick: impl FnMut(ToClient) -> Option<T>) -> T {
    runner_until(ws, pick)
}

/// Waits for the start command of `actor`.
fn wait_start(ws: &mut Ws, actor: &str) {
    until(ws, |m| match m {
        ToClient::Commands(c) => c
            .iter()
            .any(|c| {
                matches!(c.inner, RunnerCommand::StartActor(_)) && c.checkpoint.actor_id == actor
            })
            .then_some(()),
        _ => None,
    });
}

struct Kv {
    ws: Ws,
    actor: String,
    next: u32,
}

impl Kv {
    fn call(&mut self, data: KvRequestData) -> KvResponseData {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(Message::binary(encode_to_server(&ToServer::KvRequest(
                ToServerKvRequest {
                    actor_id: self.actor.clone(),
                    request_id: id,
                    data,
                },
            ))))
            .unwrap();
        until(&mut self.ws, |m| match m {
            ToClient::KvResponse(r) if r.request_id == id => Some(r.data),
            _ => None,
        })
    }

    fn put(&mut self, key: &str, len: usize) -> KvResponseData {
        self.call(KvRequestData::Put(KvPutRequest {
            keys: vec![key.as_bytes().to_vec()],
            values: vec![vec![key.len() as u8; len]],
        }))
    }

    fn get(&mut self, keys: &[String]) -> Vec<Vec<u8>> {
        match self.call(KvRequestData::Get(KvGetRequest {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })) {
            KvResponseData::Get(g) => g.keys,
            other => panic!("get answered {other:?}"),
        }
    }
}

fn create(addr: SocketAddr, name: &str, key: &str, runner: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({
        "name": name, "key": key, "runner_name_selector": runner, "crash_policy": "sleep",
    })
    .to_string();
    let (status, _, resp) = http(
        addr,
        "POST",
        "/actors?namespace=default",
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    (status, json_body(&resp))
}

fn destroy(addr: SocketAddr, id: &str) -> (u16, serde_json::Value) {
    let (status, _, resp) = http(
        addr,
        "DELETE",
        &format!("/actors/{id}?namespace=default"),
        &[],
        b"",
    );
    (status, json_body(&resp))
}

fn actor(addr: SocketAddr, id: &str) -> serde_json::Value {
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/actors?namespace=default&actor_ids={id}"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    json_body(&body)["actors"][0].clone()
}

fn by_key(addr: SocketAddr, name: &str, key: &str) -> Vec<serde_json::Value> {
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/actors?namespace=default&name={name}&key={key}"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    json_body(&body)["actors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn readyz(addr: SocketAddr) -> (u16, Option<String>) {
    let (status, headers, _) = http(addr, "GET", "/readyz", &[], b"");
    let code = headers
        .into_iter()
        .find(|(k, _)| k == "x-rivet-error")
        .map(|(_, v)| v);
    (status, code)
}

#[test]
fn a_full_disk_is_refused_by_name_then_heals_without_a_restart() {
    let Some(fs) = Tmpfs::mount("20m") else {
        return;
    };
    let data = fs.0.join("data");
    let d = Daemon::start_at("127.0.0.1:0", &data, 1, &[], &[]);
    let addr = d.addr;
    let mut ws = runner_ws(addr, "kv", "kv");
    let (status, v) = create(addr, "kv", "main", "kv");
    assert_eq!(status, 200, "{v}");
    let main_id = v["actor"]["actor_id"].as_str().unwrap().to_string();
    wait_start(&mut ws, &main_id);
    let mut kv = Kv {
        ws,
        actor: main_id.clone(),
        next: 0,
    };
    let (status, v) = create(addr, "kv", "doomed", "nobody");
    assert_eq!(status, 200, "{v}");
    let doomed = v["actor"]["actor_id"].as_str().unwrap().to_string();
    let mut acked: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    assert!(matches!(kv.put("before", 1000), KvResponseData::Put));
    acked.push("before".into());

    // The disk fills up: writes are refused with the store's error, by name.
    let filler = fill(&fs.0);
    let mut first_error = None;
    for i in 0..200 {
        let key = format!("full-{i}");
        match kv.put(&key, 100 * 1024) {
            KvResponseData::Put => acked.push(key),
            KvResponseData::Error(e) => {
                refused.push(key);
                first_error = Some(e.message);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let msg = first_error.expect("a put on a full disk must fail");
    assert!(msg.starts_with("store.unavailable: "), "{msg}");
    eprintln!("first refusal: {msg}");

    // While the store cannot commit: not ready, API writes and KV writes refused by name, the
    // gauge down and the failures counted.
    assert_eq!(readyz(addr), (503, Some("store.unavailable".to_string())));
    let (status, v) = create(addr, "kv", "during", "nobody");
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        (&v["group"], &v["code"]),
        (&"store".into(), &"unavailable".into()),
        "{v}"
    );
    let (status, v) = destroy(addr, &doomed);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "unavailable", "{v}");
    match kv.put("refused-again", 1000) {
        KvResponseData::Error(e) => {
            assert!(e.message.starts_with("store.unavailable"), "{}", e.message)
        }
        other => panic!("a put while the store is down answered {other:?}"),
    }
    refused.push("refused-again".into());
    assert_eq!(d.metric("torpor_store_up"), 0.0);
    assert!(d.metric("torpor_kv_failed_total") >= 2.0);
    assert!(d.metric("torpor_kv_commit_failures_total") >= 1.0);

    // Space is freed: the very next writes succeed, without a restart.
    std::fs::remove_file(&filler).unwrap();
    assert!(matches!(kv.put("after", 1000), KvResponseData::Put));
    acked.push("after".into());
    let (status, v) = create(addr, "kv", "after", "nobody");
    assert_eq!(status, 200, "{v}");
    let after_id = v["actor"]["actor_id"].as_str().unwrap().to_string();
    let (status, v) = destroy(addr, &doomed);
    assert_eq!(status, 200, "{v}");
    assert_eq!(readyz(addr).0, 200);
    assert_eq!(d.metric("torpor_store_up"), 1.0);
    assert!(d.metric("torpor_store_reopens_total") >= 1.0);
    drop(kv);

    // kill -9 and restart: every acknowledged change is there, nothing that was refused.
    let d = d.kill_and_restart(1, &[]);
    let addr = d.addr;
    assert_eq!(readyz(addr).0, 200);
    assert!(actor(addr, &main_id)["destroy_ts"].is_null());
    assert!(actor(addr, &after_id)["destroy_ts"].is_null());
    assert!(
        !actor(addr, &doomed)["destroy_ts"].is_null(),
        "the acknowledged destroy"
    );
    assert!(
        by_key(addr, "kv", "during").is_empty(),
        "a refused create survived"
    );
    let mut ws = runner_ws(addr, "kv2", "kv");
    // Wake the actor with a request through the gateway (never answered: only its start
    // command matters here).
    let gateway = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = write!(s, "GET /gateway/{main_id}/ HTTP/1.1\r\nhost: x\r\n\r\n");
            let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
        });
    });
    let main_id = by_key(addr, "kv", "main")[0]["actor_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_start(&mut ws, &main_id);
    let mut kv = Kv {
        ws,
        actor: main_id,
        next: 100,
    };
    let found: Vec<String> = kv
        .get(&acked)
        .into_iter()
        .map(|k| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(found, acked, "acknowledged writes lost");
    assert!(kv.get(&refused).is_empty(), "a refused write survived");
    drop(kv);
    drop(d);
    let _ = gateway.join();
    drop(fs);
}

/// How a start on a given data directory ended.
enum Start {
    /// Exited before listening: code and stderr.
    Exited(Option<i32>, String),
    /// Listening (the daemon is running).
    Running(Daemon),
}

fn start_on(data: &Path) -> Start {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_torpor"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--data-dir",
        ])
        .arg(data)
        .env("RUST_LOG", "warn")
        .env("TORPOR_PIN_THREADS", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    match rx.recv_timeout(WAIT) {
        Ok(line) if line.starts_with("torpor listening on ") => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = stderr.join();
            // Start it again through the harness, which owns it from here on.
            Start::Running(Daemon::start_at("127.0.0.1:0", data, 1, &[], &[]))
        }
        _ => {
            let status = child.wait().unwrap();
            let text = stderr.join().unwrap();
            Start::Exited(status.code(), text)
        }
    }
}

/// A data directory with a store holding three actors, closed cleanly (SIGTERM); returns the
/// store's bytes, the marker's bytes and the actor ids.
fn make_store() -> (Vec<u8>, Vec<u8>, Vec<String>) {
    let dir = temp_dir("origin");
    let d = Daemon::start_at("127.0.0.1:0", &dir, 1, &[], &[]);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let (status, v) = create(d.addr, "echo", &format!("k{i}"), "nobody");
            assert_eq!(status, 200, "{v}");
            v["actor"]["actor_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(d.terminate_keeping_data().success());
    let store = std::fs::read(dir.join("torpor.redb")).unwrap();
    let marker = std::fs::read(dir.join("torpor.id")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (store, marker, ids)
}

#[test]
fn a_damaged_store_is_refused_at_start_or_serves_only_what_it_can_prove() {
    let (store, marker, ids) = make_store();
    let page = 4096;
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "truncated to 4096 bytes".into(),
            store[..page.min(store.len())].to_vec(),
        ),
        (
            "truncated to half".into(),
            store[..store.len() / 2].to_vec(),
        ),
        ("zero-length with the marker".into(), Vec::new()),
    ];
    let pages = store.len() / page;
    let mut offsets = vec![0, 1, 2, 3];
    offsets.extend([pages / 4, pages / 2, 3 * pages / 4, pages.saturating_sub(1)]);
    offsets.sort_unstable();
    offsets.dedup();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for p in offsets.into_iter().filter(|&p| p < pages) {
        let mut damaged = store.clone();
        let noise = rng.bytes(page);
        damaged[p * page..(p + 1) * page].copy_from_slice(&noise);
        cases.push((
            format!("4 KiB of random bytes at offset {}", p * page),
            damaged,
        ));
    }
    for (what, bytes) in cases {
        let dir = temp_dir("damaged");
        std::fs::write(dir.join("torpor.redb"), &bytes).unwrap();
        std::fs::write(dir.join("torpor.id"), &marker).unwrap();
        match start_on(&dir) {
            Start::Exited(code, stderr) => {
                eprintln!("{what}: exit {code:?}: {}", stderr.trim());
                assert_eq!(code, Some(1), "{what}: {stderr}");
                assert!(!stderr.contains("panicked"), "{what}: {stderr}");
                assert!(
                    stderr.contains("is damaged") || stderr.contains("torpor.id"),
                    "{what}: no clear message: {stderr}"
                );
                let _ = std::fs::remove_dir_all(&dir);
            }
            Start::Running(d) => {
                // It started: then the store works and what it serves is what was stored.
                eprintln!("{what}: started");
                assert_eq!(readyz(d.addr).0, 200, "{what}");
                for id in &ids {
                    let a = actor(d.addr, id);
                    assert!(a.is_null() || a["actor_id"] == id.as_str(), "{what}: {a}");
                }
                let (status, v) = create(d.addr, "echo", "new", "nobody");
                assert_eq!(status, 200, "{what}: {v}");
                assert_eq!(readyz(d.addr).0, 200, "{what}");
            }
        }
    }
}
