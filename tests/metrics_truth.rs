//! `/metrics` read in known states of the real daemon with the echo runner: each gauge and
//! counter is asserted to the value the state implies (actors by state, runners known, a
//! normal client close, a runner restart's replays). Waits are bounded waits for a
//! condition (`wait_metric`), never sleeps a verdict depends on.

mod common;

use common::{ws_connect, ws_recv, Daemon, Runner, Ws};
use tungstenite::Message;

const SLEEPING: &str = "torpor_actors{state=\"sleeping\"}";
const STARTING: &str = "torpor_actors{state=\"starting\"}";
const RUNNING: &str = "torpor_actors{state=\"running\"}";
const STOPPING: &str = "torpor_actors{state=\"stopping\"}";
const RUNNERS_KNOWN: &str = "torpor_runners_known";
const UNROUTABLE: &str = "torpor_tunnel_unroutable_total";
const LATE: &str = "torpor_tunnel_late_messages_total";
const REPLAYS: &str = "torpor_tunnel_replays_total";

fn closes(reason: &str) -> String {
    format!("torpor_websocket_closes_total{{reason=\"{reason}\"}}")
}

fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
    let got = ws_recv(ws);
    assert_eq!(got.to_text().unwrap(), text);
}

/// Closes from the client side (1000) and reads until the server's close answer.
fn client_close(mut ws: Ws) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

/// Waits until the actor gauges read exactly (sleeping, starting, running, stopping).
fn wait_actors(d: &Daemon, want: [f64; 4]) {
    for (series, v) in [SLEEPING, STARTING, RUNNING, STOPPING].iter().zip(want) {
        d.wait_metric(series, |x| x == v);
    }
    // All four at once (they are published together).
    let m = d.metrics();
    let get = |s: &str| m.iter().find(|(k, _)| k == s).map(|(_, v)| *v).unwrap();
    let got = [get(SLEEPING), get(STARTING), get(RUNNING), get(STOPPING)];
    assert_eq!(
        got, want,
        "actors by state (sleeping, starting, running, stopping)"
    );
}

#[test]
fn actor_and_runner_gauges_and_a_normal_close() {
    let d = Daemon::start(2, &[]);
    assert_eq!(d.metric(RUNNERS_KNOWN), 0.0);
    let ids: Vec<String> = (0..3)
        .map(|i| d.create_actor("echo", Some(&format!("truth-{i}"))))
        .collect();
    // No runner: created actors wait asleep for one.
    wait_actors(&d, [3.0, 0.0, 0.0, 0.0]);

    let _runner = Runner::start(&d.endpoint(), &["--control-messages"]);
    d.wait_metric(RUNNERS_KNOWN, |v| v == 1.0);
    // The runner takes the waiting actors.
    wait_actors(&d, [0.0, 0.0, 3.0, 0.0]);

    // Each actor goes to sleep (its socket hibernates, then the client closes it).
    for id in &ids {
        let mut ws = ws_connect(d.addr, id, "/sleep");
        echo(&mut ws, "__sleep");
        d.wait_metric("torpor_client_websockets_hibernating", |v| v == 1.0);
        client_close(ws);
        d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
    }
    wait_actors(&d, [3.0, 0.0, 0.0, 0.0]);
    assert_eq!(d.metric(RUNNERS_KNOWN), 1.0);

    // A client WebSocket wakes one.
    let mut ws = ws_connect(d.addr, &ids[0], "/wake");
    echo(&mut ws, "hello");
    wait_actors(&d, [2.0, 0.0, 1.0, 0.0]);

    // A normal client close: counted as `client.closed`; the runner's answer to it is a late
    // message, not an unroutable one.
    let unroutable = d.metric(UNROUTABLE);
    let late = d.metric(LATE);
    let client_closed = d.metric(&closes("client.closed"));
    client_close(ws);
    d.wait_metric("torpor_client_websockets_open", |v| v == 0.0);
    d.wait_metric(LATE, |v| v >= late + 1.0);
    assert_eq!(d.metric(&closes("client.closed")), client_closed + 1.0);
    assert_eq!(
        d.metric(UNROUTABLE),
        unroutable,
        "a normal close is not unroutable"
    );
    assert_eq!(d.metric(&closes("other")), 0.0, "no close lands in `other`");
    assert_eq!(d.metric("torpor_errors_total{code=\"other\"}"), 0.0);
    // Nothing in this test was unroutable at all.
    assert_eq!(unroutable, 0.0);
    wait_actors(&d, [2.0, 0.0, 1.0, 0.0]);
}

#[test]
fn a_runner_restart_replays_each_hibernatable_socket_once() {
    const K: usize = 3;
    let d = Daemon::start(1, &[]);
    let key = format!("truth-restart-{}", common::rand_u64());
    let mut first = Runner::start(&d.endpoint(), &["--runner-key", &key]);
    let mut sockets: Vec<Ws> = (0..K)
        .map(|i| {
            let id = d.create_actor("echo", Some(&format!("restart-{i}")));
            let mut ws = ws_connect(d.addr, &id, "/r");
            echo(&mut ws, &format!("before-{i}"));
            ws
        })
        .collect();
    wait_actors(&d, [0.0, 0.0, K as f64, 0.0]);
    let replays = d.metric(REPLAYS);
    assert_eq!(replays, 0.0);

    first.kill();
    let _second = Runner::start(&d.endpoint(), &["--runner-key", &key]);
    // The new process (same key) reattaches the sockets, then proves it holds none of the
    // actors: their sockets hibernate until the actors run again.
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == K as f64);
    assert_eq!(
        d.metric(REPLAYS),
        0.0,
        "a reattachment with nothing pending replays nothing"
    );
    // A message on each wakes its actor; the socket's window (that message) is replayed once.
    for (i, ws) in sockets.iter_mut().enumerate() {
        echo(ws, &format!("after-{i}"));
    }
    d.wait_metric("torpor_client_websockets_hibernating", |v| v == 0.0);
    wait_actors(&d, [0.0, 0.0, K as f64, 0.0]);
    let got = d.metric(REPLAYS);
    eprintln!(
        "replays {got} replayed_messages {} hibernations {} wakes {}",
        d.metric("torpor_tunnel_replayed_messages_total"),
        d.metric("torpor_hibernations_total"),
        d.metric("torpor_hibernation_wakes_total")
    );
    assert_eq!(got, K as f64, "one replay per socket");
    assert_eq!(d.metric("torpor_tunnel_replayed_messages_total"), K as f64);
    assert_eq!(d.metric(RUNNERS_KNOWN), 1.0);
}
