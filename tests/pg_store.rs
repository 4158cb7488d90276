//! The daemon on PostgreSQL (`store.backend = "postgres"`): actors created through the API
//! are still there after a restart on the same database; `/readyz` follows the server going
//! away and coming back; an unreachable server at start-up is a clear error and exit 1.
//!
//! Each test starts its own throwaway cluster (`torpor::kv::pg_cluster`).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{create_actor, http, json_body, post_actor, temp_dir, Daemon, WAIT};
use torpor::kv::pg_cluster::PgCluster;

fn pg_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TORPOR_STORE__BACKEND", "postgres".to_string()),
        ("TORPOR_STORE__POSTGRES_URL", url.to_string()),
        ("TORPOR_STORE__CONNECT_TIMEOUT_MS", "2000".to_string()),
        ("TORPOR_STORE__PROBE_TIMEOUT_MS", "2000".to_string()),
    ]
}

fn start(url: &str) -> Daemon {
    let env = pg_env(url);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start(1, &env)
}

fn listed(addr: SocketAddr, id: &str) -> Vec<serde_json::Value> {
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/actors?namespace=default&actor_ids={id}"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    json_body(&body)["actors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn readyz(addr: SocketAddr) -> u16 {
    http(addr, "GET", "/readyz", &[], b"").0
}

/// Polls `/readyz` until it answers `want` (bounded).
fn wait_ready(addr: SocketAddr, want: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = readyz(addr);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn actors_survive_a_daemon_restart_on_the_same_database() {
    let cluster = PgCluster::start().expect("start a PostgreSQL cluster");
    let url = cluster.url("torpor");
    let d = start(&url);
    let id = create_actor(d.addr, "echo", Some("pg-key"));
    assert_eq!(listed(d.addr, &id).len(), 1);
    assert!(d.terminate_keeping_data().success());

    // A new daemon with a fresh data directory: everything comes from PostgreSQL.
    let d = start(&url);
    let actors = listed(d.addr, &id);
    assert_eq!(actors.len(), 1, "{actors:?}");
    assert_eq!(actors[0]["actor_id"], id.as_str());
    assert_eq!(actors[0]["key"], "pg-key");
    assert_eq!(readyz(d.addr), 200);
}

#[test]
fn readyz_follows_postgres_going_away_and_coming_back() {
    let cluster = PgCluster::start().expect("start a PostgreSQL cluster");
    let d = start(&cluster.url("torpor"));
    assert_eq!(readyz(d.addr), 200);
    create_actor(d.addr, "echo", Some("before"));

    cluster.stop();
    // The idle store's health check notices without any request.
    wait_ready(d.addr, 503);
    // A create needs a durable write: refused while the server is away.
    let (status, _, body) = post_actor(
        d.addr,
        &serde_json::json!({"name": "echo", "key": "during", "runner_name_selector": "default"}),
    );
    assert_ne!(status, 200, "{}", String::from_utf8_lossy(&body));

    cluster.start_server().expect("restart PostgreSQL");
    wait_ready(d.addr, 200);
    let id = create_actor(d.addr, "echo", Some("after"));
    assert_eq!(listed(d.addr, &id).len(), 1);
}

#[test]
fn an_unreachable_server_at_start_up_is_a_clear_error() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = temp_dir("pg-unreachable");
    let run = |url: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--data-dir",
        ])
        .arg(&data)
        .env("TORPOR_PIN_THREADS", "false")
        .stdin(Stdio::null());
        for (k, v) in pg_env(url) {
            cmd.env(k, v);
        }
        cmd.output().expect("run torpor")
    };
    let out = run(&format!("postgres://torpor:secret@127.0.0.1:{port}/torpor"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open the store") && err.contains("cannot connect to PostgreSQL"),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "the password is not printed: {err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("torpor listening"));

    let out = run("postgres://[not-a-url");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("store.postgres_url"), "{err}");
    let _ = std::fs::remove_dir_all(&data);
}
