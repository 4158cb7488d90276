//! Hibernating WebSockets (SPEC §2.6) with the real daemon and the echo runner: the client's
//! socket stays open while its actor sleeps or its runner is lost; messages sent meanwhile
//! are delivered after the wake, once and in order, on the same socket; non-hibernatable
//! sockets close; a client close or the hibernation limit ends a hibernating socket.

mod common;

use common::{create_actor, ws_connect, ws_expect_close, ws_recv, Daemon, Runner, Ws};
use tungstenite::Message;

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

#[test]
fn a_socket_survives_its_actor_sleeping_and_waking() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/sleepy");
    roundtrip(&mut ws, "before", 5);

    for round in 0..3 {
        send(&mut ws, "__sleep");
        expect(&mut ws, "__sleep");
        d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
        // Sent while the actor sleeps: these wake it, and come back in order, once.
        roundtrip(&mut ws, &format!("woken{round}"), 20);
        d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
    }
    assert!(d.metric("torpor_hibernations_total") >= 3.0);
    assert!(d.metric("torpor_hibernation_wakes_total") >= 3.0);
    assert_eq!(d.metric("torpor_client_websockets_open"), 1.0);

    // A client close while hibernating frees everything.
    send(&mut ws, "__sleep");
    expect(&mut ws, "__sleep");
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    ws.close(None).unwrap();
    let _ = ws_expect_close(&mut ws);
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
    d.wait_metric("torpor_client_websockets_open", |v| v == 0.0);
    assert_eq!(d.metric("torpor_tunnel_pending_bytes"), 0.0);
}

#[test]
fn a_socket_survives_its_runner_being_lost() {
    let d = Daemon::start(1, &[("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "500")]);
    let first = Runner::start(&d.endpoint(), &[]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/lost");
    roundtrip(&mut ws, "a", 5);

    drop(first); // SIGKILL: the runner never says goodbye
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    for i in 0..10 {
        send(&mut ws, &format!("held-{i}"));
    }
    // A new runner process (new key): the actor is placed there and the socket restored.
    let _second = Runner::start(&d.endpoint(), &[]);
    for i in 0..10 {
        expect(&mut ws, &format!("held-{i}"));
    }
    roundtrip(&mut ws, "after", 5);
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
    d.wait_metric("torpor_tunnel_pending_messages", |v| v == 0.0);
}

#[test]
fn a_socket_handed_back_by_a_running_actor_waits_for_its_next_start() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut a = ws_connect(d.addr, &actor, "/a");
    let mut b = ws_connect(d.addr, &actor, "/b");
    roundtrip(&mut a, "a", 3);
    send(&mut a, "__hibernate");
    expect(&mut a, "__hibernate");
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    // Held: the actor still runs this generation and does not hold the socket.
    for i in 0..5 {
        send(&mut a, &format!("held-{i}"));
    }
    // The other socket puts the actor to sleep; the held messages then wake it.
    send(&mut b, "__sleep");
    expect(&mut b, "__sleep");
    for i in 0..5 {
        expect(&mut a, &format!("held-{i}"));
    }
    roundtrip(&mut b, "b", 3);
    roundtrip(&mut a, "a2", 3);
}

#[test]
fn a_socket_that_cannot_hibernate_closes_when_its_actor_sleeps() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &["--control-messages", "--no-hibernate"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/plain");
    roundtrip(&mut ws, "x", 3);
    send(&mut ws, "__sleep");
    let (code, reason) = ws_expect_close(&mut ws);
    assert_eq!((code, reason.as_str()), (1000, "actor.stopped"));
    assert_eq!(d.metric("torpor_hibernations_total"), 0.0);
}

#[test]
fn a_socket_hibernating_past_the_limit_is_closed() {
    let d = Daemon::start(
        1,
        &[
            ("TORPOR_TIMEOUTS__HIBERNATION_MAX_MS", "300"),
            ("TORPOR_TIMEOUTS__GC_INTERVAL_MS", "100"),
        ],
    );
    let _r = Runner::start(&d.endpoint(), &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/limit");
    send(&mut ws, "__sleep");
    expect(&mut ws, "__sleep");
    let (code, reason) = ws_expect_close(&mut ws);
    assert_eq!((code, reason.as_str()), (1011, "guard.hibernation_timeout"));
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
}

#[test]
fn destroying_the_actor_closes_its_hibernating_socket() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &["--control-messages"]);
    let actor = create_actor(d.addr, "echo", None);
    let mut ws = ws_connect(d.addr, &actor, "/doomed");
    send(&mut ws, "__sleep");
    expect(&mut ws, "__sleep");
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
    let (status, _, body) = common::http(
        d.addr,
        "DELETE",
        &format!("/actors/{actor}?namespace=default"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (code, reason) = ws_expect_close(&mut ws);
    assert_eq!((code, reason.as_str()), (1000, "actor.destroyed"));
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
}
