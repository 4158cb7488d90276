//! The control plane's records survive the process: actors created (and answered) before a
//! `kill -9` exist after a restart on the same data directory, keep their name+key address
//! and generation, and wake on demand; a SIGTERM exits cleanly with the store closed.

mod common;

use common::{create_actor, http, json_body, ws_connect, ws_recv, Daemon, Runner};
use tungstenite::Message;

fn actor_json(d: &Daemon, id: &str) -> serde_json::Value {
    let (status, _, body) = http(
        d.addr,
        "GET",
        &format!("/actors?namespace=default&actor_ids={id}"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v = json_body(&body);
    v["actors"][0].clone()
}

#[test]
fn actors_survive_kill_9_and_wake_on_demand() {
    let d = Daemon::start(1, &[]);
    let r = Runner::start(&d.endpoint(), &[]);
    let id = create_actor(d.addr, "echo", Some("durable-key"));
    let mut ws = ws_connect(d.addr, &id, "/");
    ws.send(Message::text("before")).unwrap();
    assert_eq!(ws_recv(&mut ws).to_text().unwrap(), "before");
    let before = actor_json(&d, &id);
    drop(ws);
    drop(r);

    let d = d.kill_and_restart(1, &[]);
    let after = actor_json(&d, &id);
    assert_eq!(after["actor_id"], before["actor_id"], "{after}");
    assert_eq!(after["key"], before["key"]);
    assert_eq!(after["create_ts"], before["create_ts"]);
    assert!(after["destroy_ts"].is_null(), "{after}");
    // Found by name and key, and woken by the first request once a runner is there.
    let _r = Runner::start(&d.endpoint(), &[]);
    let mut ws = ws_connect(d.addr, "echo", "/?rvt-method=get&rvt-key=durable-key");
    ws.send(Message::text("after")).unwrap();
    assert_eq!(ws_recv(&mut ws).to_text().unwrap(), "after");
}

#[test]
fn destroyed_actors_stay_destroyed_after_a_restart() {
    let d = Daemon::start(1, &[]);
    let id = create_actor(d.addr, "echo", Some("gone"));
    let (status, _, _) = http(
        d.addr,
        "DELETE",
        &format!("/actors/{id}?namespace=default"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let d = d.kill_and_restart(1, &[]);
    assert!(!actor_json(&d, &id)["destroy_ts"].is_null());
    let (status, _, _) = http(d.addr, "GET", &format!("/gateway/{id}/"), &[], b"");
    assert_eq!(status, 404);
}

#[test]
fn sigterm_exits_zero_and_the_store_reopens() {
    let d = Daemon::start(1, &[]);
    let id = create_actor(d.addr, "echo", None);
    let data = d.data_dir.clone();
    let addr = d.addr.to_string();
    let status = d.terminate_keeping_data();
    assert!(status.success(), "{status}");
    let d = Daemon::start_at(&addr, &data, 1, &[], &[]);
    assert_eq!(actor_json(&d, &id)["actor_id"], id.as_str());
}
