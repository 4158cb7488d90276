//! A runner restarted with the same key gets its actors back (SPEC §1.4.2, §1.4.5, §2.5,
//! §2.6), with the real daemon and the real echo-runner: after a graceful SIGTERM (the runner
//! said `Stopping`, the gateway stopped its actors, the process exited) and after a kill -9,
//! a new process with the same key keeps the runnerId (it comes back within the lost
//! threshold), its actor answers HTTP again, and a hibernated client socket wakes on it and
//! gets every message sent meanwhile, once and in order.
//!
//! Every wait is a bounded wait for a condition (a stdout line, a metric, a reply); the lost
//! threshold is generous so that a slow machine still restarts the runner in time.

mod common;

use common::{create_actor, http, ws_connect, ws_recv, Daemon, Runner, Ws};
use tungstenite::Message;

const KEY: &str = "restart-key";

fn daemon() -> Daemon {
    Daemon::start(
        1,
        &[("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "120000")],
    )
}

fn runner(d: &Daemon, extra: &[&str]) -> Runner {
    let mut args = vec!["--runner-key", KEY];
    args.extend_from_slice(extra);
    Runner::start(&d.endpoint(), &args)
}

/// SIGTERM: the runner drains (`Stopping`, its actors stopped) and exits.
fn terminate(mut r: Runner) {
    r.proc.signal(libc::SIGTERM);
    r.proc.wait_line("STOPPED");
    let status = r.proc.child.wait().expect("echo-runner exit");
    assert!(status.success(), "echo-runner exited with {status}");
}

fn get(d: &Daemon, actor: &str) -> (u16, Vec<u8>) {
    let (status, _, body) = http(d.addr, "GET", &format!("/gateway/{actor}/"), &[], b"");
    (status, body)
}

fn assert_ok(d: &Daemon, actor: &str, when: &str) {
    let (status, body) = get(d, actor);
    assert_eq!(
        status,
        200,
        "{when}: GET /gateway/{actor}/ answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
}

fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

fn expect(ws: &mut Ws, text: &str) {
    let got = ws_recv(ws);
    assert_eq!(got.to_text().unwrap(), text);
}

/// Sends `n` numbered messages with `tag` and expects every echo, in order.
fn roundtrip(ws: &mut Ws, tag: &str, n: usize) {
    for i in 0..n {
        send(ws, &format!("{tag}-{i}"));
    }
    for i in 0..n {
        expect(ws, &format!("{tag}-{i}"));
    }
}

/// The messages sent while no runner hosted the actor come back in order, then a marker
/// sent after them comes back next: nothing was lost, duplicated or reordered.
fn expect_held_then_marker(ws: &mut Ws, tag: &str, n: usize) {
    for i in 0..n {
        expect(ws, &format!("{tag}-{i}"));
    }
    send(ws, "marker");
    expect(ws, "marker");
}

#[test]
fn sigterm_then_same_key_serves_http_again() {
    let d = daemon();
    let first = runner(&d, &[]);
    let rid = first.runner_id.clone();
    assert!(!rid.is_empty());
    let actor = create_actor(d.addr, "echo", None);
    assert_ok(&d, &actor, "before the restart");

    terminate(first);
    let second = runner(&d, &[]);
    assert_eq!(second.runner_id, rid, "same key within the lost threshold");
    assert_ok(&d, &actor, "after SIGTERM and a restart with the same key");
    // And once more after a second graceful restart.
    terminate(second);
    let _third = runner(&d, &[]);
    assert_ok(&d, &actor, "after a second restart");
}

#[test]
fn sigterm_then_same_key_keeps_the_runner_id_and_new_actors_are_placed() {
    let d = daemon();
    let first = runner(&d, &[]);
    let rid = first.runner_id.clone();
    let old = create_actor(d.addr, "echo", None);
    assert_ok(&d, &old, "before the restart");
    terminate(first);
    let second = runner(&d, &[]);
    assert_eq!(second.runner_id, rid, "same key within the lost threshold");
    let new = create_actor(d.addr, "echo", None);
    assert_ok(&d, &new, "an actor created after the restart");
    assert_ok(&d, &old, "the old actor after the restart");
}

#[test]
fn a_request_waiting_through_a_sigterm_restart_is_answered() {
    let d = daemon();
    let first = runner(&d, &[]);
    let actor = create_actor(d.addr, "echo", None);
    assert_ok(&d, &actor, "before the restart");
    terminate(first);
    // The request arrives while no runner is connected; it waits for the restart.
    let (addr, a) = (d.addr, actor.clone());
    let waiting =
        std::thread::spawn(move || http(addr, "GET", &format!("/gateway/{a}/"), &[], b"").0);
    let _second = runner(&d, &[]);
    assert_eq!(waiting.join().unwrap(), 200);
    assert_ok(&d, &actor, "after the restart");
}

#[test]
fn a_hibernated_socket_wakes_on_the_runner_restarted_after_sigterm() {
    let d = daemon();
    let first = runner(&d, &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/restart");
    roundtrip(&mut ws, "before", 5);
    send(&mut ws, "__sleep");
    expect(&mut ws, "__sleep");
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);

    terminate(first);
    // Sent while no runner is connected: the first wants a wake that has nowhere to go yet.
    for i in 0..50 {
        send(&mut ws, &format!("held-{i}"));
    }
    let _second = runner(&d, &["--control-messages"]);
    expect_held_then_marker(&mut ws, "held", 50);
    roundtrip(&mut ws, "after", 5);
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
}

#[test]
fn an_attached_socket_survives_a_sigterm_restart() {
    // The socket is attached when the runner drains: the drain stops the actor, the socket
    // hibernates, and wakes on the restarted runner.
    let d = daemon();
    let first = runner(&d, &[]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/drained");
    roundtrip(&mut ws, "before", 5);
    terminate(first);
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    for i in 0..50 {
        send(&mut ws, &format!("held-{i}"));
    }
    let _second = runner(&d, &[]);
    expect_held_then_marker(&mut ws, "held", 50);
    roundtrip(&mut ws, "after", 5);
}

#[test]
fn kill_then_same_key_serves_http_again() {
    let d = daemon();
    let mut first = runner(&d, &[]);
    let rid = first.runner_id.clone();
    let actor = create_actor(d.addr, "echo", None);
    assert_ok(&d, &actor, "before the kill");
    first.kill();
    // The gateway has seen the close (one shard: the close reaches the control plane before
    // the request below), so the request waits for a runner instead of racing the close.
    d.wait_metric("torpor_runners_connected", |v| v == 0.0);
    // A request that waits through the restart: the new process must not get it before it
    // proved which actors it hosts (it hosts none; the actor starts again there).
    let (addr, a) = (d.addr, actor.clone());
    let waiting =
        std::thread::spawn(move || http(addr, "GET", &format!("/gateway/{a}/"), &[], b"").0);
    let second = runner(&d, &[]);
    assert_eq!(second.runner_id, rid, "same key within the lost threshold");
    assert_eq!(waiting.join().unwrap(), 200, "the request that waited");
    assert_ok(&d, &actor, "after kill -9 and a restart with the same key");
}

#[test]
fn a_hibernated_socket_wakes_on_the_runner_restarted_after_kill() {
    let d = daemon();
    let mut first = runner(&d, &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/killed");
    roundtrip(&mut ws, "before", 5);
    send(&mut ws, "__sleep");
    expect(&mut ws, "__sleep");
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    first.kill();
    for i in 0..50 {
        send(&mut ws, &format!("held-{i}"));
    }
    let _second = runner(&d, &["--control-messages"]);
    expect_held_then_marker(&mut ws, "held", 50);
    roundtrip(&mut ws, "after", 5);
}

#[test]
fn an_attached_socket_survives_a_kill_and_restart() {
    // kill -9 while the socket is attached: its window is kept; the new process does not host
    // the actor, so the actor starts again there and the socket is restored with its window.
    let d = daemon();
    let mut first = runner(&d, &[]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/crashed");
    roundtrip(&mut ws, "before", 5);
    first.kill();
    for i in 0..50 {
        send(&mut ws, &format!("held-{i}"));
    }
    let _second = runner(&d, &[]);
    expect_held_then_marker(&mut ws, "held", 50);
    roundtrip(&mut ws, "after", 5);
}
