//! Several torpor nodes (`[cluster] enabled`) on one throwaway PostgreSQL cluster and one
//! throwaway `nats-server`, all on loopback: the real daemon binaries, the real echo runner.
//!
//! The harness (`common::cluster`) shortens the lease timings so that failovers are quick;
//! no verdict depends on them being met in time.

mod common;

use common::cluster::Backends;
use common::{create_actor, ws_connect, ws_recv, Rng, Runner};
use tungstenite::Message;

/// Mixed sizes from 1 B to 256 KiB, mostly small, text and binary.
fn message(rng: &mut Rng, i: usize) -> Message {
    let size = match rng.below(100) {
        0..=1 => 64 * 1024 + rng.below(192 * 1024) as usize,
        2..=11 => 1024 + rng.below(63 * 1024) as usize,
        _ => 1 + rng.below(1024) as usize,
    };
    if i % 3 == 0 {
        let mut s = String::with_capacity(size);
        while s.len() < size {
            match rng.below(20) {
                0 => s.push('é'),
                _ => s.push((b'a' + rng.below(26) as u8) as char),
            }
        }
        Message::text(s)
    } else {
        Message::binary(rng.bytes(size))
    }
}

/// A client on node 1, the runner on node 2, the leader on node 3: 10,000 messages echo in
/// order and byte-identical through the cross-node hop in both directions.
#[test]
fn echo_10k_client_on_one_node_runner_on_another_leader_on_a_third() {
    let backends = Backends::start();
    let [n1, n2, n3] = backends.three_nodes(&[]);
    let _runner = Runner::start(&n2.endpoint(), &[]);
    let actor = create_actor(n1.addr, "echo", None);
    let mut ws = ws_connect(n1.addr, &actor, "/echo");
    let mut rng = Rng(0x5eed_00c1);
    let n = 10_000;
    let mut sent = std::collections::VecDeque::new();
    let mut i = 0;
    while i < n || !sent.is_empty() {
        while i < n && sent.len() < 16 {
            let m = message(&mut rng, i);
            ws.send(m.clone()).unwrap();
            sent.push_back(m);
            i += 1;
        }
        let got = ws_recv(&mut ws);
        let want = sent.pop_front().unwrap();
        let at = i - sent.len() - 1;
        assert_eq!(got.is_binary(), want.is_binary(), "message type at {at}");
        assert!(
            got.into_data() == want.into_data(),
            "payload differs at {at}"
        );
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    // The traffic crossed nodes: node 1 forwarded to the runner on node 2, which forwarded
    // the echoes back; the leader saw none of it.
    assert!(n1.metric("torpor_tunnel_messages_to_runner_total") >= n as f64);
    assert!(n1.metric("torpor_tunnel_messages_to_client_total") >= n as f64);
    assert_eq!(n3.metric("torpor_tunnel_messages_to_runner_total"), 0.0);
    assert_eq!(n1.metric("torpor_cluster_leading_epoch"), 0.0);
    assert_eq!(n2.metric("torpor_cluster_leading_epoch"), 0.0);
}

/// The echo runner's `COUNTERS` line as name → value.
fn counters(runner: &Runner) -> std::collections::HashMap<String, u64> {
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

fn count(c: &std::collections::HashMap<String, u64>, k: &str) -> u64 {
    *c.get(k)
        .unwrap_or_else(|| panic!("COUNTERS has no {k}: {c:?}"))
}

/// Waits (bounded) until the runner's actor got at least `n` messages.
fn wait_delivered(runner: &Runner, n: u64) -> std::collections::HashMap<String, u64> {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let c = counters(runner);
        if count(&c, "messages") >= n {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the actor got {} of {n} messages: {c:?}",
            count(&c, "messages")
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A client WebSocket whose echoes are read (and dropped) by a thread of their own, so the
/// client can send without waiting for them: runner → client messages are at most once
/// across nodes, so the verdict is what the actor received, not what came back.
struct Sender {
    ws: common::Ws,
    reader: Option<std::thread::JoinHandle<u64>>,
}

impl Sender {
    fn open(addr: std::net::SocketAddr, actor: &str) -> Sender {
        let ws = ws_connect(addr, actor, "/stream");
        let stream = ws.get_ref().try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut rx = tungstenite::WebSocket::from_raw_socket(
                stream,
                tungstenite::protocol::Role::Client,
                None,
            );
            let mut n = 0;
            while let Ok(m) = rx.read() {
                if m.is_text() || m.is_binary() {
                    n += 1;
                }
            }
            n
        });
        Sender {
            ws,
            reader: Some(reader),
        }
    }

    /// Sends numbered messages `from..to` (`"{i}:"` and a few bytes, as `--check-sequence`
    /// expects).
    fn send(&mut self, from: usize, to: usize) {
        for i in from..to {
            let m = format!("{i}:{}", "x".repeat(i % 200));
            self.ws.send(Message::text(m)).unwrap();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
        let _ = self.ws.get_ref().shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// `kill -9` of the runner's node while a client on another node streams numbered messages
/// on a hibernatable socket: the runner connects to its next endpoint (another node), the
/// client's node replays its pending window to the new connection, and the actor receives
/// every message exactly once, in order.
#[test]
fn kill_9_of_the_runners_node_loses_and_repeats_nothing() {
    let backends = Backends::start();
    // The runner comes back within the lost threshold, so its actor stays placed on it.
    let extra = [("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "120000")];
    let [n1, mut n2, n3] = backends.three_nodes(&extra);
    let endpoints = format!("{},{}", n2.endpoint(), n3.endpoint());
    let runner = Runner::start(
        &endpoints,
        &[
            "--runner-key",
            "kill-node",
            "--check-sequence",
            "--reconnect-base-ms",
            "50",
        ],
    );
    let actor = create_actor(n1.addr, "echo", None);
    let mut client = Sender::open(n1.addr, &actor);
    client.send(0, 1_000);
    wait_delivered(&runner, 1_000);
    // Half of the next messages are sent before the kill, half after.
    client.send(1_000, 1_500);
    let _ = n2.proc.child.kill();
    let _ = n2.proc.child.wait();
    client.send(1_500, 3_000);
    let c = wait_delivered(&runner, 3_000);
    assert_eq!(
        count(&c, "seq_errors"),
        0,
        "the actor saw a duplicate or a hole: {c:?}"
    );
    assert_eq!(count(&c, "gaps"), 0, "the runner saw an index gap: {c:?}");
    assert_eq!(count(&c, "messages"), 3_000, "{c:?}");
    assert!(
        count(&c, "connections") >= 2,
        "the runner reconnected: {c:?}"
    );
    assert!(n1.metric("torpor_tunnel_replays_total") >= 1.0);
    drop(client);
    drop(n3);
}

/// A NATS restart while a client on node 1 streams numbered messages to the actor on node
/// 2's runner: the nodes reconnect, the control link sends again what the restart lost, and
/// the actor receives every message exactly once, in order; echoes flow again afterwards.
#[test]
fn a_nats_restart_under_traffic_duplicates_and_loses_nothing_towards_the_actor() {
    let backends = Backends::start();
    let extra = [("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "120000")];
    let [n1, n2, _n3] = backends.three_nodes(&extra);
    let runner = Runner::start(
        &n2.endpoint(),
        &[
            "--runner-key",
            "nats-restart",
            "--check-sequence",
            "--reconnect-base-ms",
            "50",
        ],
    );
    let actor = create_actor(n1.addr, "echo", None);
    let mut client = Sender::open(n1.addr, &actor);
    client.send(0, 1_000);
    wait_delivered(&runner, 1_000);
    client.send(1_000, 1_500);
    backends.nats.kill();
    client.send(1_500, 2_000);
    backends.nats.restart().expect("restart nats-server");
    for n in [&n1, &n2] {
        n.wait_metric("torpor_cluster_nats_connected", |v| v == 1.0);
    }
    client.send(2_000, 3_000);
    let c = wait_delivered(&runner, 3_000);
    assert_eq!(
        count(&c, "seq_errors"),
        0,
        "the actor saw a duplicate or a hole: {c:?}"
    );
    assert_eq!(count(&c, "gaps"), 0, "the runner saw an index gap: {c:?}");
    assert_eq!(count(&c, "messages"), 3_000, "{c:?}");
    drop(client);
    // Traffic resumes both ways: a new socket's echo comes back.
    let mut ws = ws_connect(n1.addr, &actor, "/after");
    ws.send(Message::text("0:after")).unwrap();
    assert_eq!(ws_recv(&mut ws).into_text().unwrap().as_str(), "0:after");
}

/// Creates actor `key` of name `echo` through `addr`: the status and the actor id when 200.
fn create(addr: std::net::SocketAddr, key: &str) -> (u16, Option<String>) {
    let body = serde_json::json!({
        "name": "echo",
        "key": key,
        "runner_name_selector": "default",
        "crash_policy": "sleep",
    });
    let (status, _, resp) = common::post_actor(addr, &body);
    if status != 200 {
        eprintln!("create {key}: {status} {}", String::from_utf8_lossy(&resp));
    }
    let id = (status == 200).then(|| common::created_actor_id(&resp));
    (status, id)
}

/// The actors of name `echo` with key `key`, as `addr` lists them.
fn with_key(addr: std::net::SocketAddr, key: &str) -> Vec<String> {
    let (status, _, body) = common::http(
        addr,
        "GET",
        &format!("/actors?namespace=default&name=echo&key={key}"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    common::json_body(&body)["actors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| a["actor_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `kill -9` of the leader while a client creates actors through another node: every create
/// that got 200 exists exactly once afterwards (the standby restored it from PostgreSQL),
/// creates in between answer 503 (unknown, retry) rather than hang, and a standby leads.
#[test]
fn kill_9_of_the_leader_while_creating_loses_no_acknowledged_actor() {
    let backends = Backends::start();
    let [n1, n2, mut n3] = backends.three_nodes(&[]);
    let _runner = Runner::start(&format!("{},{}", n1.endpoint(), n2.endpoint()), &[]);
    let mut created: Vec<(String, String)> = Vec::new();
    let mut refused = Vec::new();
    let mut i = 0;
    let mut killed_at = None;
    let mut led_after = None;
    // Creates until 20 went through before the kill and 20 after a standby leads.
    while created.len() < 40 {
        let key = format!("k{i}");
        i += 1;
        match create(n1.addr, &key) {
            (200, Some(id)) => created.push((key, id)),
            (status, _) => {
                assert!(
                    killed_at.is_some(),
                    "create {key} answered {status} before the kill"
                );
                assert_eq!(status, 503, "create {key}");
                refused.push(key);
            }
        }
        if created.len() == 20 && killed_at.is_none() {
            let _ = n3.proc.child.kill();
            let _ = n3.proc.child.wait();
            killed_at = Some(std::time::Instant::now());
        }
        if killed_at.is_some() && led_after.is_none() {
            let leading = [&n1, &n2]
                .iter()
                .any(|n| n.metric("torpor_cluster_leading_epoch") > 0.0);
            if leading {
                led_after = killed_at.map(|t| t.elapsed());
            }
        }
        assert!(i < 10_000, "creates never went through again");
    }
    let led_after = led_after.expect("a standby leads");
    eprintln!(
        "leader killed: a standby led {led_after:?} after the kill (lease ttl 3 s, retry 0.2 s); \
         {} creates answered 503 meanwhile",
        refused.len()
    );
    // n2 may still follow the killed leader: it asks the new one once it follows it.
    wait_one_leader(&[&n1, &n2]);
    for (key, id) in &created {
        assert_eq!(with_key(n2.addr, key), vec![id.clone()], "actor {key}");
    }
    for key in &refused {
        assert!(with_key(n2.addr, key).len() <= 1, "actor {key}");
    }
}

/// SIGSTOP of the leader past its lease, then SIGCONT: a standby leads meanwhile; once
/// running again the old leader places nothing and answers nothing itself (its lease ran
/// out, so it steps down before handling what waited, and its store writes would be
/// refused by the epoch fence); what its own clients asked goes to the new leader. Every
/// actor exists once.
#[test]
fn sigstop_of_the_leader_past_its_lease_then_sigcont_places_nothing_twice() {
    let backends = Backends::start();
    let [n1, n2, n3] = backends.three_nodes(&[]);
    let _runner = Runner::start(&format!("{},{}", n1.endpoint(), n2.endpoint()), &[]);
    let first = n3.metric("torpor_cluster_leading_epoch");
    let (status, a) = create(n1.addr, "before");
    assert_eq!(status, 200);
    let a = a.unwrap();
    let get = |addr, id: &str| common::http(addr, "GET", &format!("/gateway/{id}/"), &[], b"").0;
    assert_eq!(get(n1.addr, &a), 200, "the actor answers through node 1");

    n3.proc.signal(libc::SIGSTOP);
    // A create sent to the stopped leader waits in its socket until SIGCONT.
    let to_stopped = {
        let addr = n3.addr;
        std::thread::spawn(move || create(addr, "sent-to-stopped"))
    };
    let deadline = std::time::Instant::now() + common::WAIT;
    let standby = loop {
        let leading = [&n1, &n2]
            .into_iter()
            .find(|n| n.metric("torpor_cluster_leading_epoch") > first);
        if let Some(n) = leading {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no standby took the lease"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Through the new leader itself: another node may still forward to the stopped one for
    // up to a heartbeat, and a question it had sent there is answered 503
    // `cluster.leader_changed` once it learns of the change (as documented).
    let (status, b) = create(standby.addr, "during");
    assert_eq!(status, 200);
    let b = b.unwrap();
    assert_eq!(get(standby.addr, &b), 200, "the new leader places actors");

    n3.proc.signal(libc::SIGCONT);
    let (status, c) = to_stopped.join().unwrap();
    assert!(
        status == 200 || status == 503,
        "a create sent to the stopped leader answered {status}"
    );
    n3.wait_metric("torpor_cluster_leading_epoch", |v| v == 0.0);
    assert!(standby.metric("torpor_cluster_leading_epoch") > first);
    wait_one_leader(&[&n1, &n2, &n3]);
    // Each actor once, and every one still answers (placed by the one leader).
    assert_eq!(with_key(n2.addr, "before"), vec![a.clone()]);
    assert_eq!(with_key(n2.addr, "during"), vec![b.clone()]);
    if let Some(c) = &c {
        assert_eq!(with_key(n2.addr, "sent-to-stopped"), vec![c.clone()]);
    }
    for id in [Some(&a), Some(&b), c.as_ref()].into_iter().flatten() {
        assert_eq!(get(n3.addr, id), 200, "actor {id} through the old leader");
    }
}

/// Waits (bounded) until one node leads and every node follows that leader's epoch
/// (`torpor_cluster_epoch`): from then on no question goes to a deposed leader, so none is
/// answered 503 `cluster.leader_changed`.
fn wait_one_leader(nodes: &[&common::Daemon]) {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let leading: Vec<f64> = nodes
            .iter()
            .map(|n| n.metric("torpor_cluster_leading_epoch"))
            .collect();
        let known: Vec<f64> = nodes
            .iter()
            .map(|n| n.metric("torpor_cluster_epoch"))
            .collect();
        let leaders = leading.iter().filter(|e| **e > 0.0).count();
        let epoch = leading.iter().cloned().fold(0.0, f64::max);
        if leaders == 1 && known.iter().all(|k| *k == epoch) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no single leader followed by every node: leading {leading:?}, known {known:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Polls `/readyz` of `node` until it answers `want` (bounded).
fn wait_ready(node: &common::Daemon, want: u16) {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let got = common::http(node.addr, "GET", "/readyz", &[], b"").0;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {got}, expected {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A PostgreSQL stop and restart while a client on node 1 echoes through node 2's runner:
/// every node says 503 on `/readyz`, creates answer 503 `store.unavailable` (never a 200
/// that is not durable), then everything recovers: readiness 200, a leader again, actors
/// created before the outage still there, creates and echoes work.
#[test]
fn a_postgresql_restart_under_traffic_is_refused_honestly_then_heals() {
    let backends = Backends::start();
    let [n1, n2, n3] = backends.three_nodes(&[]);
    let _runner = Runner::start(&n2.endpoint(), &[]);
    let (status, before) = create(n1.addr, "before-outage");
    assert_eq!(status, 200);
    let before = before.unwrap();
    // Traffic: echoes through the cross-node hop until told to stop (a socket the outage
    // closes is opened again).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, addr, actor) = (stop.clone(), n1.addr, before.clone());
        std::thread::spawn(move || {
            let mut echoed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut ws = ws_connect(addr, &actor, "/traffic");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if ws.send(Message::text("ping")).is_err() {
                        break;
                    }
                    match ws.read() {
                        Ok(m) if m.is_text() => echoed += 1,
                        _ => break,
                    }
                }
            }
            echoed
        })
    };
    backends.pg.stop();
    for n in [&n1, &n2, &n3] {
        wait_ready(n, 503);
    }
    let (status, _) = create(n1.addr, "during-outage");
    assert_eq!(status, 503, "a create while PostgreSQL is down");
    backends.pg.start_server().expect("restart PostgreSQL");
    for n in [&n1, &n2, &n3] {
        wait_ready(n, 200);
    }
    let deadline = std::time::Instant::now() + common::WAIT;
    let after = loop {
        match create(n1.addr, "after-outage") {
            (200, Some(id)) => break id,
            (503, _) => {}
            (s, _) => panic!("create after the outage answered {s}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "creates never recovered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = traffic.join().unwrap();
    assert!(echoed > 0);
    // The outage may have moved the lease: n2 asks the leader only once it follows it.
    wait_one_leader(&[&n1, &n2, &n3]);
    assert_eq!(with_key(n2.addr, "before-outage"), vec![before.clone()]);
    assert_eq!(with_key(n2.addr, "after-outage"), vec![after.clone()]);
    let mut ws = ws_connect(n1.addr, &after, "/after");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws_recv(&mut ws).into_text().unwrap().as_str(), "hello");
}
