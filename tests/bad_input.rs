//! Bad input from runners and clients through the real daemon (SPEC §1.1, §1.4, §2.8): every
//! refusal gets its status or close code, its `{group}.{code}` reason and its metric, and
//! nothing else is disturbed (a real echo runner and its client keep echoing meanwhile).
//!
//! Runners that misbehave are written here with tungstenite; the well-behaved one is the real
//! `echo-runner` binary. Waits are bounded waits for a frame or a counter.

mod common;

use common::{create_actor, ws_connect, ws_expect_close, ws_recv, Daemon, Runner, Ws, WAIT};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use torpor::protocol::{
    encode_to_server, ActorCheckpoint, Event, EventActorSetAlarm, EventWrapper, KvRequestData,
    MessageId, ToClient, ToServer, ToServerInit, ToServerKvRequest, ToServerPong,
    ToServerTunnelMessage, ToServerTunnelMessageKind, ToServerWebSocketClose,
    ToServerWebSocketMessage, ToServerWebSocketMessageAck,
};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Opens a runner WebSocket by hand, offering `protocols`. `Err` carries the HTTP refusal.
fn raw_runner_connect(
    addr: SocketAddr,
    query: &str,
    protocols: &str,
) -> Result<Ws, Box<tungstenite::Error>> {
    let url = format!("ws://{addr}/runners/connect?{query}");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    match tungstenite::client::client(req, stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(proto.as_deref(), Some("rivet"));
            Ok(ws)
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(Box::new(e)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("blocking handshake"),
    }
}

fn runner_query(key: &str) -> String {
    format!("protocol_version=7&namespace=default&runner_key={key}")
}

/// A runner named `raw` (actors created by the tests ask for `default`, so none is placed on
/// it) that has sent `Init` and received the gateway's `Init`.
fn raw_runner(addr: SocketAddr, key: &str) -> Ws {
    let mut ws = raw_runner_connect(addr, &runner_query(key), "rivet").expect("runner upgrade");
    send_init(&mut ws);
    wait_gateway_init(&mut ws);
    ws
}

fn init_bytes() -> Vec<u8> {
    encode_to_server(&ToServer::Init(ToServerInit {
        name: "raw".into(),
        version: 1,
        total_slots: 1,
        prepopulate_actor_names: None,
        metadata: None,
    }))
}

fn send_init(ws: &mut Ws) {
    ws.send(Message::binary(init_bytes())).unwrap();
}

/// Reads gateway messages until its `Init` arrives.
fn wait_gateway_init(ws: &mut Ws) {
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                let msg = torpor::protocol::decode_to_client(&b).expect("gateway sent bad bytes");
                if matches!(msg, ToClient::Init(_)) {
                    return;
                }
            }
            Ok(Message::Close(f)) => panic!("runner closed before Init: {f:?}"),
            Ok(_) => continue,
            Err(e) => panic!("runner read: {e}"),
        }
    }
}

fn tunnel(request_id: [u8; 4], index: u16, kind: ToServerTunnelMessageKind) -> Vec<u8> {
    encode_to_server(&ToServer::TunnelMessage(ToServerTunnelMessage {
        message_id: MessageId {
            gateway_id: [0; 4],
            request_id,
            message_index: index,
        },
        message_kind: kind,
    }))
}

fn ws_message(request_id: [u8; 4], data: &[u8]) -> Vec<u8> {
    tunnel(
        request_id,
        0,
        ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
            data: data.to_vec(),
            binary: true,
        }),
    )
}

fn ws_ack(request_id: [u8; 4], index: u16) -> Vec<u8> {
    tunnel(
        request_id,
        0,
        ToServerTunnelMessageKind::WebSocketMessageAck(ToServerWebSocketMessageAck { index }),
    )
}

/// Replaces the first occurrence of `from` in `bytes` with `to` (same length).
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("placeholder present");
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

/// Every kind of malformed runner message, by name.
fn malformed_messages() -> Vec<(&'static str, Vec<u8>)> {
    let req = [0, 0x12, 0x34, 0x05];
    let msg = ws_message(req, &[9u8; 100]);
    let events = encode_to_server(&ToServer::Events(vec![EventWrapper {
        checkpoint: ActorCheckpoint {
            actor_id: "actor-that-does-not-exist".into(),
            generation: 1,
            index: 1,
        },
        inner: Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts: None }),
    }]));
    let pong = encode_to_server(&ToServer::Pong(ToServerPong { ts: 1 }));
    let bad_utf8 = [0xff, 0xfe, 0xc0, 0x80];
    let close_reason = tunnel(
        req,
        0,
        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
            code: Some(1000),
            reason: Some("QQQQ".into()),
            hibernate: false,
        }),
    );
    let kv = encode_to_server(&ToServer::KvRequest(ToServerKvRequest {
        actor_id: "ZZZZ".into(),
        request_id: 1,
        data: KvRequestData::Drop,
    }));
    let with = |mut v: Vec<u8>, extra: &[u8]| {
        v.extend_from_slice(extra);
        v
    };
    // ToServer::TunnelMessage + message id + tunnel kind tag 7 (there are 7 kinds, 0..=6).
    let mut unknown_kind = vec![6u8];
    unknown_kind.extend_from_slice(&[0; 4]);
    unknown_kind.extend_from_slice(&req);
    unknown_kind.extend_from_slice(&[1, 0, 7]);
    vec![
        ("empty", Vec::new()),
        ("truncated ws message", msg[..msg.len() - 10].to_vec()),
        ("ws message without its flag", msg[..msg.len() - 1].to_vec()),
        ("truncated events", events[..events.len() - 3].to_vec()),
        ("trailing byte after pong", with(pong.clone(), &[0])),
        ("trailing byte after ws message", with(msg.clone(), &[1])),
        ("trailing byte after ack", with(ws_ack(req, 3), &[0])),
        ("unknown ToServer tag", vec![7]),
        (
            "unknown ToServer tag (multi-byte uvarint)",
            vec![0x80, 0x01],
        ),
        ("unknown tunnel kind tag", unknown_kind),
        ("bool out of range", {
            let mut m = msg.clone();
            *m.last_mut().unwrap() = 2;
            m
        }),
        (
            "invalid UTF-8 in a close reason",
            patch(close_reason, b"QQQQ", &bad_utf8),
        ),
        (
            "invalid UTF-8 in an actor id",
            patch(kv, b"ZZZZ", &bad_utf8),
        ),
        ("second Init", init_bytes()),
    ]
}

/// Echo round trip on an open client socket.
fn echo_once(ws: &mut Ws, tag: &str) {
    let m = Message::text(format!("still here after {tag}"));
    ws.send(m.clone()).unwrap();
    assert_eq!(ws_recv(ws), m, "echo after {tag}");
}

#[test]
fn malformed_runner_messages_close_only_that_runner() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");
    echo_once(&mut client, "start");

    let cases = malformed_messages();
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let mut raw = raw_runner(daemon.addr, &format!("bad-{i}"));
        raw.send(Message::binary(bytes.clone())).unwrap();
        let (code, reason) = ws_expect_close(&mut raw);
        assert_eq!(
            (code, reason.as_str()),
            (1011, "ws.invalid_packet"),
            "case {name:?}"
        );
        let want = (i + 1) as f64;
        daemon.wait_metric("torpor_runner_protocol_errors_total", |v| v == want);
        drop(raw);
        echo_once(&mut client, name);
    }

    // A text frame is not a protocol message either (closed, not counted as a decode error).
    let mut raw = raw_runner(daemon.addr, "bad-text");
    raw.send(Message::text("hello")).unwrap();
    assert_eq!(
        ws_expect_close(&mut raw),
        (1011, "ws.invalid_packet".into())
    );
    drop(raw);

    let n = cases.len() as f64;
    assert_eq!(daemon.metric("torpor_runner_protocol_errors_total"), n);
    assert_eq!(
        daemon.metric("torpor_websocket_closes_total{reason=\"ws.invalid_packet\"}"),
        n + 1.0
    );
    // Nothing else was disturbed: the echo runner never reconnected, no client socket closed,
    // the bad runners are gone, and a new client still echoes.
    daemon.wait_metric("torpor_runners_connected", |v| v == 1.0);
    assert_eq!(
        daemon.metric("torpor_runner_connections_total"),
        1.0 + n + 1.0
    );
    assert_eq!(
        daemon.metric("torpor_websocket_closes_total{reason=\"ws.runner_disconnected\"}"),
        0.0
    );
    echo_once(&mut client, "all cases");
    let mut fresh = ws_connect(daemon.addr, &actor, "/fresh");
    echo_once(&mut fresh, "all cases (new socket)");
}

#[test]
fn first_message_must_be_init() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");

    let not_init: Vec<(&str, Vec<u8>)> = vec![
        (
            "pong",
            encode_to_server(&ToServer::Pong(ToServerPong { ts: 1 })),
        ),
        ("ack", ws_ack([0, 1, 0, 0], 1)),
        ("garbage", vec![0xff, 0x00, 0x13]),
        ("empty", Vec::new()),
        ("truncated init", {
            let b = init_bytes();
            b[..b.len() - 1].to_vec()
        }),
        ("init with a trailing byte", {
            let mut b = init_bytes();
            b.push(0);
            b
        }),
    ];
    for (i, (name, bytes)) in not_init.iter().enumerate() {
        let mut ws = raw_runner_connect(daemon.addr, &runner_query(&format!("first-{i}")), "rivet")
            .expect("runner upgrade");
        ws.send(Message::binary(bytes.clone())).unwrap();
        assert_eq!(
            ws_expect_close(&mut ws),
            (1011, "ws.invalid_initial_packet".into()),
            "case {name:?}"
        );
        echo_once(&mut client, name);
    }
    assert_eq!(
        daemon.metric("torpor_websocket_closes_total{reason=\"ws.invalid_initial_packet\"}"),
        not_init.len() as f64
    );
    // None of them became a runner; the real one is untouched.
    assert_eq!(daemon.metric("torpor_runner_connections_total"), 1.0);
    daemon.wait_metric("torpor_runners_connected", |v| v == 1.0);
    echo_once(&mut client, "all cases");
}

#[test]
fn runner_without_init_times_out() {
    let daemon = Daemon::start(1, &[("TORPOR_TIMEOUTS__RUNNER_INIT_MS", "1000")]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");

    // Silent runner: no Init within 1 s.
    let mut ws =
        raw_runner_connect(daemon.addr, &runner_query("silent"), "rivet").expect("runner upgrade");
    assert_eq!(
        ws_expect_close(&mut ws),
        (1011, "ws.timed_out_waiting_for_init".into())
    );
    assert_eq!(
        daemon.metric("torpor_websocket_closes_total{reason=\"ws.timed_out_waiting_for_init\"}"),
        1.0
    );
    drop(ws);
    assert_eq!(daemon.metric("torpor_runner_connections_total"), 1.0);
    daemon.wait_metric("torpor_runners_connected", |v| v == 1.0);
    echo_once(&mut client, "init timeout");
}

/// A WebSocket upgrade request written by hand; returns (status, headers, body) of a refusal
/// (refusals end the connection, so the body is read to EOF).
fn refused_upgrade(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let (status, headers, body) = common::read_response(s);
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn refusals_have_status_reason_and_metric() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");

    // Unknown actor (well-formed and malformed ids): 404 actor.not_found.
    for id in ["00000000-0000-0000-0000-000000000000", "no-such-actor"] {
        let (status, headers, body) = refused_upgrade(daemon.addr, &format!("/gateway/{id}/"), &[]);
        assert_eq!(status, 404, "{id}: {body}");
        assert_eq!(header(&headers, "x-rivet-error"), Some("actor.not_found"));
        let v = common::json_body(body.as_bytes());
        assert_eq!(
            (v["group"].as_str(), v["code"].as_str()),
            (Some("actor"), Some("not_found"))
        );
    }
    assert_eq!(
        daemon.metric("torpor_errors_total{code=\"actor.not_found\"}"),
        2.0
    );

    // Missing runner query parameters: 400.
    for q in [
        "namespace=default&runner_key=k",
        "protocol_version=7&runner_key=k",
        "protocol_version=7&namespace=default",
        "",
    ] {
        let (status, headers, body) = refused_upgrade(
            daemon.addr,
            &format!("/runners/connect?{q}"),
            &[("sec-websocket-protocol", "rivet")],
        );
        assert_eq!(status, 400, "query {q:?}: {body}");
        assert_eq!(
            header(&headers, "x-rivet-error"),
            Some("runner.invalid_query")
        );
    }
    assert_eq!(
        daemon.metric("torpor_errors_total{code=\"runner.invalid_query\"}"),
        4.0
    );

    // Unsupported protocol version: 400 naming the supported versions.
    for v in ["6", "8", "x"] {
        let (status, headers, body) = refused_upgrade(
            daemon.addr,
            &format!("/runners/connect?protocol_version={v}&namespace=default&runner_key=k"),
            &[("sec-websocket-protocol", "rivet")],
        );
        assert_eq!(status, 400, "version {v}: {body}");
        assert_eq!(
            header(&headers, "x-rivet-error"),
            Some("runner.unsupported_protocol_version")
        );
        let msg = common::json_body(body.as_bytes())["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("supported versions: 7"),
            "body does not name the supported versions: {msg}"
        );
    }
    // None of it became a runner.
    assert_eq!(daemon.metric("torpor_runner_connections_total"), 1.0);
    assert_eq!(daemon.metric("torpor_runners_connected"), 1.0);
    echo_once(&mut client, "refusals");
}

#[test]
fn wrong_runner_token_is_refused_before_any_state() {
    let daemon = Daemon::start(1, &[("TORPOR_AUTH__ADMIN_TOKEN", "s3cret-token")]);
    let q = runner_query("tok");
    for protocols in [
        "rivet",
        "rivet, rivet_token.wrong",
        "rivet, rivet_token.s3cret-toke",
    ] {
        match raw_runner_connect(daemon.addr, &q, protocols).map_err(|e| *e) {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401, "offered {protocols:?}");
                assert_eq!(
                    resp.headers()
                        .get("x-rivet-error")
                        .map(|v| v.to_str().unwrap()),
                    Some("runner.unauthorized")
                );
            }
            Err(e) => panic!("offered {protocols:?}: unexpected error {e}"),
            Ok(_) => panic!("offered {protocols:?}: upgraded without the right token"),
        }
    }
    assert_eq!(
        daemon.metric("torpor_errors_total{code=\"runner.unauthorized\"}"),
        3.0
    );
    // Nothing was allocated for them.
    assert_eq!(daemon.metric("torpor_runners_connected"), 0.0);
    assert_eq!(daemon.metric("torpor_runner_connections_total"), 0.0);
    assert_eq!(daemon.metric("torpor_runners_known"), 0.0);

    // The right token is accepted, by a raw runner and by the echo runner.
    let mut ws = raw_runner_connect(daemon.addr, &q, "rivet, rivet_token.s3cret-token")
        .expect("right token");
    send_init(&mut ws);
    wait_gateway_init(&mut ws);
    let _runner = Runner::start(&daemon.endpoint(), &["--token", "s3cret-token"]);
    let actor = daemon.create_actor("echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/authorised");
    echo_once(&mut client, "token");
}

/// Tunnel messages for request ids that name no request (a slot never used, a shard that does
/// not exist) are ignored and counted; the runner stays connected.
#[test]
fn unroutable_tunnel_messages_are_counted_and_ignored() {
    let daemon = Daemon::start(1, &[("TORPOR_TIMEOUTS__PING_INTERVAL_MS", "50")]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");
    let mut raw = raw_runner(daemon.addr, "unroutable");

    let unknown_slot = [0u8, 0x77, 0x77, 0x03];
    let unknown_shard = [9u8, 0, 0, 0];
    let msgs = [
        ws_message(unknown_slot, b"nobody"),
        ws_ack(unknown_slot, 1),
        ws_message(unknown_shard, b"nobody"),
        ws_ack(unknown_shard, 1),
        tunnel(
            unknown_slot,
            0,
            ToServerTunnelMessageKind::WebSocketOpen(torpor::protocol::ToServerWebSocketOpen {
                can_hibernate: true,
            }),
        ),
        tunnel(
            unknown_slot,
            0,
            ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                code: Some(1000),
                reason: None,
                hibernate: false,
            }),
        ),
    ];
    for m in &msgs {
        raw.send(Message::binary(m.clone())).unwrap();
    }
    let n = msgs.len() as f64;
    daemon.wait_metric("torpor_tunnel_unroutable_total", |v| v == n);

    // Still connected: the gateway keeps pinging it, and it answers.
    let mut pings = 0;
    while pings < 3 {
        match raw.read() {
            Ok(Message::Binary(b)) => {
                if let Ok(ToClient::Ping(p)) = torpor::protocol::decode_to_client(&b) {
                    pings += 1;
                    let pong = encode_to_server(&ToServer::Pong(ToServerPong { ts: p.ts }));
                    raw.send(Message::binary(pong)).unwrap();
                }
            }
            Ok(Message::Close(f)) => panic!("runner closed after unroutable messages: {f:?}"),
            Ok(_) => {}
            Err(e) => panic!("runner read: {e}"),
        }
    }
    assert_eq!(daemon.metric("torpor_runners_connected"), 2.0);
    assert_eq!(daemon.metric("torpor_runner_protocol_errors_total"), 0.0);
    echo_once(&mut client, "unroutable");
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

/// Every request id of `shard` whose slot is below 16, in every generation (the id keeps 4
/// bits of it): in a fresh daemon with a handful of connections, this covers every request
/// that shard ever had.
fn ids_of_shard(shard: u8) -> Vec<[u8; 4]> {
    let mut ids = Vec::new();
    for gen in 0u32..16 {
        for slot in 0u32..16 {
            let low = (slot | (gen << 20)).to_le_bytes();
            ids.push([shard, low[0], low[1], low[2]]);
        }
    }
    ids
}

/// A daemon with two shards and per-shard ports, an echo runner, and a raw runner.
fn two_shards() -> (Daemon, Runner, Ws, u16) {
    let base = free_port_pair();
    let base_s = base.to_string();
    let daemon = Daemon::start(
        2,
        &[
            ("TORPOR_SHARD_PORT_BASE", base_s.as_str()),
            ("TORPOR_TIMEOUTS__PING_INTERVAL_MS", "50"),
        ],
    );
    let runner = Runner::start(&daemon.endpoint(), &[]);
    let raw = raw_runner(daemon.addr, "intruder");
    (daemon, runner, raw, base)
}

/// Sends a message, an ack and a close for each id, then waits until the daemon counted at
/// least `expect_unroutable` more unroutable messages; returns the count before.
fn send_to_ids(daemon: &Daemon, raw: &mut Ws, ids: &[[u8; 4]], expect_unroutable: usize) -> f64 {
    let before = daemon.metric("torpor_tunnel_unroutable_total");
    for id in ids {
        raw.send(Message::binary(ws_message(*id, b"INJECTED")))
            .unwrap();
        raw.send(Message::binary(ws_ack(*id, 1))).unwrap();
        raw.send(Message::binary(tunnel(
            *id,
            0,
            ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                code: Some(1000),
                reason: Some("injected".into()),
                hibernate: false,
            }),
        )))
        .unwrap();
    }
    let want = before + expect_unroutable as f64;
    daemon.wait_metric("torpor_tunnel_unroutable_total", |v| v >= want);
    before
}

/// After a client closed, tunnel messages for its request id (and every other id its shard
/// had) are ignored and counted; the runner that sent them stays connected and a client on
/// the other shard is not disturbed.
#[test]
fn tunnel_messages_for_closed_requests_are_counted_and_ignored() {
    let (daemon, _runner, mut raw, base) = two_shards();
    let actor = create_actor(daemon.addr, "echo", None);
    let shard0: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let shard1: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let mut bystander = ws_connect(shard1, &actor, "/bystander");
    echo_once(&mut bystander, "before");
    // A request on shard 0 that then closes.
    let mut closed = ws_connect(shard0, &actor, "/closed");
    echo_once(&mut closed, "soon closed");
    closed.close(None).unwrap();
    while closed.read().is_ok() {}
    daemon.wait_metric("torpor_client_websockets_open", |v| v == 1.0);

    let ids = ids_of_shard(0);
    let late = daemon.metric("torpor_tunnel_late_messages_total");
    // The three naming the request closed a moment ago count as late, the rest as
    // unroutable.
    send_to_ids(&daemon, &mut raw, &ids, ids.len() * 3 - 3);
    daemon.wait_metric("torpor_tunnel_late_messages_total", |v| v == late + 3.0);
    assert_eq!(daemon.metric("torpor_runner_protocol_errors_total"), 0.0);
    assert_eq!(daemon.metric("torpor_runners_connected"), 2.0);
    echo_once(&mut bystander, "after");
    // The raw runner is still served: a ping reaches it after all that.
    loop {
        match raw.read() {
            Ok(Message::Binary(b)) => {
                if let Ok(ToClient::Ping(_)) = torpor::protocol::decode_to_client(&b) {
                    break;
                }
            }
            Ok(Message::Close(f)) => panic!("runner closed: {f:?}"),
            Ok(_) => {}
            Err(e) => panic!("runner read: {e}"),
        }
    }
}

/// A runner must not reach a request it does not own: tunnel messages naming another
/// runner's live request are ignored and counted, and that request's client sees nothing.
#[test]
fn tunnel_messages_for_another_runners_request_are_ignored() {
    let (daemon, _runner, mut raw, base) = two_shards();
    let actor = create_actor(daemon.addr, "echo", None);
    let shard1: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let mut victim = ws_connect(shard1, &actor, "/victim");
    echo_once(&mut victim, "before");
    let ids = ids_of_shard(1);
    // All but the three naming the victim are unroutable either way.
    let before = send_to_ids(&daemon, &mut raw, &ids, ids.len() * 3 - 3);
    // Nothing injected arrives before the echo, and the socket is still open.
    echo_once(&mut victim, "after");
    assert_eq!(daemon.metric("torpor_client_websockets_open"), 1.0);
    let all = before + (ids.len() * 3) as f64;
    daemon.wait_metric("torpor_tunnel_unroutable_total", |v| v == all);
}
