//! Tests of the runner state machine ([`super::core::Core`]) without a network: decoded
//! gateway messages in, `ToServer` messages out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::core::{Core, Ctl, InitInfo, Phase};
use super::counters::Counters;
use super::ctl::ActorOp;
use super::*;
use crate::protocol::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Start(String, u32),
    Stop(String),
    Open(RequestKey),
    Restore(RequestKey, Option<u16>),
    Msg(RequestKey, u16, Vec<u8>, bool),
    Close(RequestKey, Option<u16>, Option<String>),
    Http(String, String, Vec<u8>),
}

#[derive(Clone)]
struct Opts {
    hibernate: bool,
    policy: AckPolicy,
    welcome: bool,
    restore_last: Option<Option<u16>>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            hibernate: true,
            policy: AckPolicy::Immediate,
            welcome: false,
            restore_last: None,
        }
    }
}

struct TestActor {
    log: Arc<Mutex<Vec<Call>>>,
    opts: Opts,
}

impl Actor for TestActor {
    fn on_start(&mut self, cx: &mut ActorCx<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(Call::Start(cx.actor_id().into(), cx.generation()));
    }
    fn on_stop(&mut self, cx: &mut ActorCx<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(Call::Stop(cx.actor_id().into()));
    }
    fn ack_policy(&self) -> AckPolicy {
        self.opts.policy
    }
    fn on_websocket_open(&mut self, cx: &mut ActorCx<'_>, open: &WsOpen<'_>) -> WsOpenReply {
        self.log.lock().unwrap().push(Call::Open(open.key));
        if self.opts.welcome {
            assert!(cx.send(open.key, &b"welcome"[..], false));
        }
        WsOpenReply::Accept {
            can_hibernate: self.opts.hibernate,
        }
    }
    fn on_websocket_restore(
        &mut self,
        _cx: &mut ActorCx<'_>,
        key: RequestKey,
        remembered: Option<u16>,
    ) -> WsRestore {
        self.log
            .lock()
            .unwrap()
            .push(Call::Restore(key, remembered));
        WsRestore::Resume {
            last_index: self.opts.restore_last.unwrap_or(remembered),
        }
    }
    fn on_websocket_message(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        index: u16,
        data: Bytes,
        binary: bool,
    ) {
        self.log
            .lock()
            .unwrap()
            .push(Call::Msg(key, index, data.to_vec(), binary));
        cx.send(key, data, binary);
    }
    fn on_websocket_close(
        &mut self,
        _cx: &mut ActorCx<'_>,
        key: RequestKey,
        code: Option<u16>,
        reason: Option<&str>,
    ) {
        self.log
            .lock()
            .unwrap()
            .push(Call::Close(key, code, reason.map(str::to_owned)));
    }
    fn on_http_request(&mut self, _cx: &mut ActorCx<'_>, req: HttpRequest) -> HttpResponse {
        self.log.lock().unwrap().push(Call::Http(
            req.method.clone(),
            req.path.clone(),
            req.body.to_vec(),
        ));
        HttpResponse::new(200, req.body).header("X-Echo", "1")
    }
}

struct Harness {
    core: Core,
    log: Arc<Mutex<Vec<Call>>>,
    created: Arc<Mutex<u32>>,
    counters: Arc<Counters>,
    _rx: mpsc::UnboundedReceiver<Ctl>,
}

const KEY: RequestKey = RequestKey {
    gateway_id: [1, 2, 3, 4],
    request_id: [0, 0, 0, 1],
};
const KEY2: RequestKey = RequestKey {
    gateway_id: [1, 2, 3, 4],
    request_id: [0, 0, 0, 2],
};

fn typed_encoding(m: &ToServer) -> Vec<u8> {
    encode_to_server(m)
}

fn harness(opts: Opts) -> Harness {
    let log = Arc::new(Mutex::new(Vec::new()));
    let created = Arc::new(Mutex::new(0u32));
    let counters = Arc::new(Counters::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let (l2, c2) = (log.clone(), created.clone());
    let factory = move |_info: &ActorInfo| -> Box<dyn Actor> {
        *c2.lock().unwrap() += 1;
        Box::new(TestActor {
            log: l2.clone(),
            opts: opts.clone(),
        })
    };
    let core = Core::new(
        InitInfo {
            name: "rn".into(),
            version: 3,
            total_slots: 10,
            metadata: None,
        },
        Box::new(factory),
        counters.clone(),
        tx,
    );
    Harness {
        core,
        log,
        created,
        counters,
        _rx: rx,
    }
}

fn init(id: &str, lost_ms: i64) -> ToClient {
    ToClient::Init(ToClientInit {
        runner_id: id.into(),
        metadata: ProtocolMetadata {
            runner_lost_threshold: lost_ms,
            actor_stop_threshold: 30_000,
            serverless_drain_grace_period: None,
        },
    })
}

fn cp(actor: &str, generation: u32, index: i64) -> ActorCheckpoint {
    ActorCheckpoint {
        actor_id: actor.into(),
        generation,
        index,
    }
}

fn start_cmd(actor: &str, generation: u32, index: i64, hib: Vec<RequestKey>) -> ToClient {
    ToClient::Commands(vec![CommandWrapper {
        checkpoint: cp(actor, generation, index),
        inner: Command::StartActor(CommandStartActor {
            config: ActorConfig {
                name: "echo".into(),
                key: None,
                create_ts: 1,
                input: None,
            },
            hibernating_requests: hib
                .into_iter()
                .map(|k| HibernatingRequest {
                    gateway_id: k.gateway_id,
                    request_id: k.request_id,
                })
                .collect(),
        }),
    }])
}

fn stop_cmd(actor: &str, generation: u32, index: i64) -> ToClient {
    ToClient::Commands(vec![CommandWrapper {
        checkpoint: cp(actor, generation, index),
        inner: Command::StopActor,
    }])
}

fn tunnel(key: RequestKey, index: u16, kind: ToClientTunnelMessageKind) -> ToClient {
    ToClient::TunnelMessage(ToClientTunnelMessage {
        message_id: MessageId {
            gateway_id: key.gateway_id,
            request_id: key.request_id,
            message_index: index,
        },
        message_kind: kind,
    })
}

fn ws_open(key: RequestKey, actor: &str) -> ToClient {
    tunnel(
        key,
        0,
        ToClientTunnelMessageKind::WebSocketOpen(ToClientWebSocketOpen {
            actor_id: actor.into(),
            path: "/ws".into(),
            headers: StrMap(vec![("sec-websocket-protocol".into(), "rivet".into())]),
        }),
    )
}

fn ws_msg(key: RequestKey, index: u16, data: &[u8]) -> ToClient {
    tunnel(
        key,
        index,
        ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
            data: data.to_vec(),
            binary: true,
        }),
    )
}

impl Harness {
    fn out(&mut self) -> Vec<ToServer> {
        let mut v = Vec::new();
        self.core.take_out(&mut v);
        // Every outgoing message must encode to what the typed encoder produces.
        v.into_iter()
            .map(|m| {
                let bytes = m.encode();
                let typed = m.into_to_server();
                assert_eq!(bytes, typed_encoding(&typed));
                typed
            })
            .collect()
    }

    /// Opens a socket and completes `Init`, returning what was sent.
    fn connect(&mut self, id: &str) -> Vec<ToServer> {
        self.core.connection_opened();
        self.feed(init(id, 5_000));
        self.out()
    }

    /// Delivers a gateway message the way the shell does: encoded, through the hot decoder.
    fn feed(&mut self, msg: ToClient) {
        self.core.handle_bytes(&Bytes::from(encode_to_client(&msg)));
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// The tunnel messages of one request as (index, kind).
fn tunnel_of(out: &[ToServer], key: RequestKey) -> Vec<(u16, ToServerTunnelMessageKind)> {
    out.iter()
        .filter_map(|m| match m {
            ToServer::TunnelMessage(t)
                if t.message_id.gateway_id == key.gateway_id
                    && t.message_id.request_id == key.request_id =>
            {
                Some((t.message_id.message_index, t.message_kind.clone()))
            }
            _ => None,
        })
        .collect()
}

fn events(out: &[ToServer]) -> Vec<EventWrapper> {
    out.iter()
        .filter_map(|m| match m {
            ToServer::Events(e) => Some(e.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn echo(data: &[u8]) -> ToServerTunnelMessageKind {
    ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
        data: data.to_vec(),
        binary: true,
    })
}

fn ack(index: u16) -> ToServerTunnelMessageKind {
    ToServerTunnelMessageKind::WebSocketMessageAck(ToServerWebSocketMessageAck { index })
}

fn running(actor: &str, generation: u32, index: i64) -> EventWrapper {
    EventWrapper {
        checkpoint: cp(actor, generation, index),
        inner: Event::ActorStateUpdate(EventActorStateUpdate {
            state: ActorState::Running,
        }),
    }
}

#[test]
fn init_first_then_ping_pong() {
    let mut h = harness(Opts::default());
    h.core.connection_opened();
    let out = h.out();
    assert_eq!(
        out,
        vec![ToServer::Init(ToServerInit {
            name: "rn".into(),
            version: 3,
            total_slots: 10,
            prepopulate_actor_names: Some(ActorNameMap::default()),
            metadata: None,
        })]
    );
    assert_eq!(h.core.phase(), Phase::AwaitingInit);
    h.feed(init("r1", 5_000));
    assert_eq!(h.core.phase(), Phase::Connected);
    assert_eq!(h.core.runner_id(), Some("r1"));
    h.feed(ToClient::Ping(ToClientPing { ts: 42 }));
    assert_eq!(h.out(), vec![ToServer::Pong(ToServerPong { ts: 42 })]);
}

#[test]
fn start_and_stop_report_events_and_ack_commands() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    let out = h.out();
    assert_eq!(
        out,
        vec![
            ToServer::Events(vec![running("a1", 0, 0)]),
            ToServer::AckCommands(ToServerAckCommands {
                last_command_checkpoints: vec![cp("a1", 0, 0)]
            }),
        ]
    );
    assert_eq!(h.calls(), vec![Call::Start("a1".into(), 0)]);
    // A repeated start of the same generation is not a second actor.
    h.feed(start_cmd("a1", 0, 0, vec![]));
    assert_eq!(*h.created.lock().unwrap(), 1);
    h.out();

    h.feed(stop_cmd("a1", 0, 1));
    let out = h.out();
    assert_eq!(
        events(&out),
        vec![EventWrapper {
            checkpoint: cp("a1", 0, 1),
            inner: Event::ActorStateUpdate(EventActorStateUpdate {
                state: ActorState::Stopped(ActorStateStopped {
                    code: StopCode::Ok,
                    message: None
                })
            }),
        }]
    );
    assert!(out.contains(&ToServer::AckCommands(ToServerAckCommands {
        last_command_checkpoints: vec![cp("a1", 0, 1)]
    })));
    assert_eq!(h.calls(), vec![Call::Stop("a1".into())]);
    assert_eq!(h.core.actor_count(), 0);
}

#[test]
fn intents_and_alarm_are_numbered_events() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 3, 0, vec![]));
    h.out();
    h.core.handle_actor_op("a1", 3, ActorOp::Sleep);
    h.core.handle_actor_op("a1", 3, ActorOp::SetAlarm(Some(99)));
    h.core.handle_actor_op("a1", 2, ActorOp::Stop); // stale generation: ignored
    let out = h.out();
    assert_eq!(out.len(), 1, "consecutive events are batched: {out:?}");
    assert_eq!(
        events(&out),
        vec![
            EventWrapper {
                checkpoint: cp("a1", 3, 1),
                inner: Event::ActorIntent(EventActorIntent {
                    intent: ActorIntent::Sleep
                }),
            },
            EventWrapper {
                checkpoint: cp("a1", 3, 2),
                inner: Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts: Some(99) }),
            },
        ]
    );
}

#[test]
fn websocket_open_echo_and_coalesced_ack() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.out();
    h.feed(ws_open(KEY, "a1"));
    h.feed(ws_msg(KEY, 1, b"x"));
    h.feed(ws_msg(KEY, 2, b"y"));
    let out = h.out();
    assert_eq!(
        tunnel_of(&out, KEY),
        vec![
            (
                0,
                ToServerTunnelMessageKind::WebSocketOpen(ToServerWebSocketOpen {
                    can_hibernate: true
                })
            ),
            (1, echo(b"x")),
            (2, echo(b"y")),
            (3, ack(2)),
        ]
    );
    assert_eq!(h.counters.snapshot().acks_sent, 1);
    assert_eq!(h.counters.snapshot().messages, 2);
}

#[test]
fn send_from_open_callback_follows_the_open_answer() {
    let mut h = harness(Opts {
        welcome: true,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.out();
    h.feed(ws_open(KEY, "a1"));
    let t = tunnel_of(&h.out(), KEY);
    assert_eq!(t.len(), 2);
    assert!(matches!(
        t[0],
        (0, ToServerTunnelMessageKind::WebSocketOpen(_))
    ));
    assert_eq!(
        t[1],
        (
            1,
            ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
                data: b"welcome".to_vec(),
                binary: false
            })
        )
    );
}

#[test]
fn manual_ack_policy_acks_only_on_request() {
    let mut h = harness(Opts {
        policy: AckPolicy::Manual,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.feed(ws_msg(KEY, 1, b"x"));
    let out = h.out();
    assert!(!tunnel_of(&out, KEY)
        .iter()
        .any(|(_, k)| matches!(k, ToServerTunnelMessageKind::WebSocketMessageAck(_))));
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 1));
    assert_eq!(tunnel_of(&h.out(), KEY), vec![(2, ack(1))]);
    // Acks arriving out of order coalesce to the newest index.
    h.feed(ws_msg(KEY, 2, b"y"));
    h.feed(ws_msg(KEY, 3, b"z"));
    h.out();
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 3));
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 2));
    assert_eq!(tunnel_of(&h.out(), KEY), vec![(5, ack(3))]);
}

#[test]
fn duplicates_dropped_and_gap_closes_like_ts() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, &[i as u8]));
    }
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, &[i as u8]));
    }
    h.feed(ws_msg(KEY, 0, b"open-index"));
    assert_eq!(h.counters.snapshot().duplicates_dropped, 4);
    assert_eq!(h.counters.snapshot().messages, 3);
    h.out();
    h.calls();
    // Index 5 skips 4.
    h.feed(ws_msg(KEY, 5, b"z"));
    assert_eq!(h.counters.snapshot().gaps, 1);
    let out = h.out();
    assert_eq!(
        tunnel_of(&out, KEY),
        vec![(
            5,
            ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                code: Some(1008),
                reason: Some("ws.message_index_skip".into()),
                hibernate: false
            })
        )]
    );
    assert_eq!(
        h.calls(),
        vec![Call::Close(
            KEY,
            Some(1008),
            Some("ws.message_index_skip".into())
        )]
    );
    // The socket is gone: later messages reach nobody.
    h.feed(ws_msg(KEY, 4, b"late"));
    assert!(h.out().is_empty());
    assert!(h.calls().is_empty());
}

#[test]
fn non_hibernatable_sockets_are_not_index_checked() {
    let mut h = harness(Opts {
        hibernate: false,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.feed(ws_msg(KEY, 1, b"a"));
    h.feed(ws_msg(KEY, 1, b"b"));
    h.feed(ws_msg(KEY, 7, b"c"));
    assert_eq!(h.counters.snapshot().messages, 3);
    assert_eq!(h.counters.snapshot().gaps, 0);
    // And never acked: the gateway keeps no window for them.
    assert!(!tunnel_of(&h.out(), KEY)
        .iter()
        .any(|(_, k)| matches!(k, ToServerTunnelMessageKind::WebSocketMessageAck(_))));
}

#[test]
fn restored_socket_wraps_through_u16_max() {
    let mut h = harness(Opts {
        restore_last: Some(Some(65534)),
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![KEY]));
    assert_eq!(
        h.calls(),
        vec![Call::Start("a1".into(), 0), Call::Restore(KEY, None)]
    );
    for i in [65535u16, 0, 1, 65535, 0, 2] {
        h.feed(ws_msg(KEY, i, &i.to_le_bytes()));
    }
    let delivered: Vec<u16> = h
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Msg(_, i, _, _) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![65535, 0, 1, 2]);
    assert_eq!(h.counters.snapshot().duplicates_dropped, 2);
}

#[test]
fn messages_queue_while_disconnected_and_flush_in_order_after_init() {
    let mut h = harness(Opts {
        policy: AckPolicy::Manual,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.feed(ws_msg(KEY, 1, b"m1"));
    // Echo of m1 produced but never written: the connection drops first.
    h.core.connection_lost(Instant::now());
    assert_eq!(h.core.phase(), Phase::Disconnected);
    for d in [&b"q1"[..], b"q2", b"q3"] {
        h.core.handle_actor_op(
            "a1",
            0,
            ActorOp::Send {
                key: KEY,
                data: Bytes::copy_from_slice(d),
                binary: true,
            },
        );
    }
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 1));
    h.core.handle_actor_op("a1", 0, ActorOp::Sleep);
    h.feed(ToClient::Ping(ToClientPing { ts: 1 })); // no socket: no pong queued
    assert_eq!(h.core.backlog_len(), 5, "open answer, m1 echo, q1..q3");
    assert_eq!(h.counters.snapshot().queued, 5);

    // New socket: only Init before the gateway answers.
    h.core.connection_opened();
    let before = h.out();
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(matches!(before[0], ToServer::Init(_)));
    // The coalesced ack joined the backlog, behind the messages.
    assert_eq!(h.core.backlog_len(), 6);
    h.feed(init("r1", 5_000));
    let mut out = before;
    out.extend(h.out());
    // Unacked events (Running, Sleep intent) come first after Init, then the tunnel backlog.
    let first_tunnel = out
        .iter()
        .position(|m| matches!(m, ToServer::TunnelMessage(_)))
        .unwrap();
    let ev_pos = out
        .iter()
        .position(|m| matches!(m, ToServer::Events(_)))
        .unwrap();
    assert!(ev_pos < first_tunnel);
    assert_eq!(events(&out).len(), 2);
    let t = tunnel_of(&out, KEY);
    let idx: Vec<u16> = t.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(t[1].1, echo(b"m1"));
    assert_eq!(t[2].1, echo(b"q1"));
    assert_eq!(t[4].1, echo(b"q3"));
    assert_eq!(t[5].1, ack(1));
    assert_eq!(h.counters.snapshot().queued, 0);
    assert_eq!(h.core.actor_count(), 1, "actors survive a reconnect");
}

#[test]
fn events_resent_until_acknowledged() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.out();
    h.core.connection_lost(Instant::now());
    let out = h.connect("r1");
    assert_eq!(events(&out), vec![running("a1", 0, 0)]);
    h.feed(ToClient::AckEvents(ToClientAckEvents {
        last_event_checkpoints: vec![cp("a1", 0, 0)],
    }));
    h.core.connection_lost(Instant::now());
    let out = h.connect("r1");
    assert!(events(&out).is_empty(), "{out:?}");
}

#[test]
fn reconnect_keeps_indices_and_closes_non_hibernatable() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(start_cmd("b1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    h.out();
    h.calls();
    h.core.connection_lost(Instant::now());
    h.connect("r1");
    // The gateway replays 2..=5 with the original indices.
    for i in 2..=5 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    let delivered: Vec<u16> = h
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Msg(_, i, _, _) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![4, 5]);
    assert_eq!(h.counters.snapshot().duplicates_dropped, 2);

    let mut h = harness(Opts {
        hibernate: false,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY2, "a1"));
    h.calls();
    h.core.connection_lost(Instant::now());
    assert_eq!(
        h.calls(),
        vec![Call::Close(
            KEY2,
            Some(1011),
            Some("ws.runner_disconnected".into())
        )]
    );
}

#[test]
fn new_runner_id_stops_all_actors() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.core.connection_lost(Instant::now());
    h.core.handle_actor_op(
        "a1",
        0,
        ActorOp::Send {
            key: KEY,
            data: Bytes::from_static(b"old"),
            binary: true,
        },
    );
    h.calls();
    let out = h.connect("r2");
    assert_eq!(h.core.actor_count(), 0);
    assert_eq!(h.calls(), vec![Call::Stop("a1".into())]);
    assert!(tunnel_of(&out, KEY).is_empty(), "{out:?}");
    assert!(events(&out).is_empty());
    assert_eq!(h.core.runner_id(), Some("r2"));
}

#[test]
fn runner_lost_threshold_stops_actors() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    let t0 = Instant::now();
    h.core.connection_lost(t0);
    assert_eq!(
        h.core.lost_deadline(),
        Some(t0 + Duration::from_millis(5_000))
    );
    h.core.poll(t0 + Duration::from_millis(4_999));
    assert_eq!(h.core.actor_count(), 1);
    h.core.poll(t0 + Duration::from_millis(5_000));
    assert_eq!(h.core.actor_count(), 0);
    // The Stopped event waits in the history for the next connection.
    let out = h.connect("r1");
    let ev = events(&out);
    assert_eq!(ev.len(), 2);
    assert!(matches!(
        &ev[1].inner,
        Event::ActorStateUpdate(EventActorStateUpdate {
            state: ActorState::Stopped(ActorStateStopped {
                code: StopCode::Error,
                ..
            })
        })
    ));
}

#[test]
fn sleep_and_wake_in_process_remembers_indices() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    h.feed(stop_cmd("a1", 0, 1));
    h.out();
    h.calls();
    h.feed(start_cmd("a1", 1, 0, vec![KEY]));
    assert_eq!(
        h.calls(),
        vec![Call::Start("a1".into(), 1), Call::Restore(KEY, Some(3))]
    );
    h.feed(ws_msg(KEY, 3, b"x"));
    h.feed(ws_msg(KEY, 4, b"x"));
    assert_eq!(h.counters.snapshot().duplicates_dropped, 1);
    let t = tunnel_of(&h.out(), KEY);
    // The outbound counter continues too: open(0) + 3 echoes + ack(4) before the stop.
    assert_eq!(t, vec![(5, echo(b"x")), (6, ack(4))]);
}

#[test]
fn http_request_response_and_unknown_actor() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.out();
    h.calls();
    h.feed(tunnel(
        KEY,
        0,
        ToClientTunnelMessageKind::RequestStart(ToClientRequestStart {
            actor_id: "a1".into(),
            method: "POST".into(),
            path: "/p?q=1".into(),
            headers: StrMap::new(),
            body: Some(b"hello".to_vec()),
            stream: false,
        }),
    ));
    let t = tunnel_of(&h.out(), KEY);
    assert_eq!(
        t,
        vec![(
            0,
            ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
                status: 200,
                headers: StrMap(vec![
                    ("x-echo".into(), "1".into()),
                    ("content-length".into(), "5".into())
                ]),
                body: Some(b"hello".to_vec()),
                stream: false,
            })
        )]
    );
    assert_eq!(
        h.calls(),
        vec![Call::Http(
            "POST".into(),
            "/p?q=1".into(),
            b"hello".to_vec()
        )]
    );

    // Streamed request bodies are collected.
    h.feed(tunnel(
        KEY2,
        0,
        ToClientTunnelMessageKind::RequestStart(ToClientRequestStart {
            actor_id: "a1".into(),
            method: "PUT".into(),
            path: "/s".into(),
            headers: StrMap::new(),
            body: None,
            stream: true,
        }),
    ));
    for (i, (b, fin)) in [(&b"ab"[..], false), (b"cd", true)].into_iter().enumerate() {
        h.feed(tunnel(
            KEY2,
            i as u16 + 1,
            ToClientTunnelMessageKind::RequestChunk(ToClientRequestChunk {
                body: b.to_vec(),
                finish: fin,
            }),
        ));
    }
    assert_eq!(
        h.calls(),
        vec![Call::Http("PUT".into(), "/s".into(), b"abcd".to_vec())]
    );

    h.feed(tunnel(
        KEY,
        0,
        ToClientTunnelMessageKind::RequestStart(ToClientRequestStart {
            actor_id: "nope".into(),
            method: "GET".into(),
            path: "/".into(),
            headers: StrMap::new(),
            body: None,
            stream: false,
        }),
    ));
    let t = tunnel_of(&h.out(), KEY);
    let ToServerTunnelMessageKind::ResponseStart(r) = &t[0].1 else {
        panic!("{t:?}")
    };
    assert_eq!(r.status, 503);
    assert_eq!(
        r.headers.get("x-rivet-error"),
        Some("runner.actor_not_found")
    );
}

#[test]
fn gateway_close_reaches_actor_and_is_answered() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.out();
    h.calls();
    h.feed(tunnel(
        KEY,
        1,
        ToClientTunnelMessageKind::WebSocketClose(ToClientWebSocketClose {
            code: Some(1000),
            reason: Some("bye".into()),
        }),
    ));
    assert_eq!(
        h.calls(),
        vec![Call::Close(KEY, Some(1000), Some("bye".into()))]
    );
    let t = tunnel_of(&h.out(), KEY);
    assert_eq!(t.len(), 1);
    assert!(matches!(
        &t[0].1,
        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
            hibernate: false,
            ..
        })
    ));
    // Unknown actor on open.
    h.feed(ws_open(KEY2, "ghost"));
    let t = tunnel_of(&h.out(), KEY2);
    assert!(matches!(
        &t[0],
        (
            0,
            ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                code: Some(1011),
                ..
            })
        )
    ));
}

#[test]
fn garbage_from_the_gateway_is_counted_not_fatal() {
    let mut h = harness(Opts::default());
    h.core.connection_opened();
    h.core
        .handle_bytes(&Bytes::from_static(&[0xff, 0xff, 0xff]));
    h.core.handle_bytes(&Bytes::new());
    assert_eq!(h.counters.snapshot().protocol_errors, 2);
    h.core
        .handle_bytes(&Bytes::from(encode_to_client(&init("r1", 0))));
    assert_eq!(h.core.phase(), Phase::Connected);
}

#[test]
fn echoed_payload_is_a_slice_of_the_received_frame() {
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.out();
    let frame = Bytes::from(encode_to_client(&ws_msg(KEY, 1, &[7u8; 1000])));
    h.core.handle_bytes(&frame);
    let mut raw = Vec::new();
    h.core.take_out(&mut raw);
    let data = raw
        .iter()
        .find_map(|m| match m {
            super::core::Outgoing::WsData { data, .. } => Some(data.clone()),
            _ => None,
        })
        .expect("an echo");
    let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
    assert_eq!(data.len(), 1000);
    assert!(
        range.contains(&(data.as_ptr() as usize)),
        "payload was copied"
    );
}

#[test]
fn replayed_duplicates_resend_an_ack_lost_with_the_connection() {
    let acks_of = |out: &[ToServer]| -> Vec<ToServerTunnelMessageKind> {
        tunnel_of(out, KEY)
            .into_iter()
            .map(|(_, k)| k)
            .filter(|k| matches!(k, ToServerTunnelMessageKind::WebSocketMessageAck(_)))
            .collect()
    };
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    assert_eq!(acks_of(&h.out()), vec![ack(3)]);
    h.calls();
    // The ack was written, but the connection died before the gateway read it: the gateway
    // replays 1..=3, which only an ack can free.
    h.core.connection_lost(Instant::now());
    h.connect("r1");
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    assert_eq!(acks_of(&h.out()), vec![ack(3)]);
    assert!(h.calls().is_empty(), "duplicates reached the actor");
    assert_eq!(h.counters.snapshot().duplicates_dropped, 3);

    // Manual acks: only what the actor acknowledged is acknowledged again.
    let mut h = harness(Opts {
        policy: AckPolicy::Manual,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    // Nothing acknowledged yet: a duplicate sends no ack.
    h.feed(ws_msg(KEY, 3, b"x"));
    assert!(acks_of(&h.out()).is_empty());
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 1));
    assert_eq!(acks_of(&h.out()), vec![ack(1)]);
    h.core.connection_lost(Instant::now());
    h.connect("r1");
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    assert_eq!(acks_of(&h.out()), vec![ack(1)]);
}

fn acks_of(out: &[ToServer], key: RequestKey) -> Vec<ToServerTunnelMessageKind> {
    tunnel_of(out, key)
        .into_iter()
        .map(|(_, k)| k)
        .filter(|k| matches!(k, ToServerTunnelMessageKind::WebSocketMessageAck(_)))
        .collect()
}

#[test]
fn restored_socket_reacknowledges_replayed_duplicates() {
    // The actor persisted up to 5, but the ack for it was lost with the runner that ran the
    // previous generation: the gateway replays 4 and 5, which only an ack can free.
    let mut h = harness(Opts {
        restore_last: Some(Some(5)),
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 3, 0, vec![KEY]));
    h.out();
    h.calls();
    h.feed(ws_msg(KEY, 4, b"x"));
    h.feed(ws_msg(KEY, 5, b"x"));
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(5)]);
    assert!(h.calls().is_empty(), "duplicates reached the actor");
    assert_eq!(h.counters.snapshot().duplicates_dropped, 2);
    h.feed(ws_msg(KEY, 6, b"x"));
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(6)]);

    // Restored without a known index: the first replayed message is the baseline, and a
    // duplicate of it is re-acknowledged once it was acknowledged.
    let mut h = harness(Opts {
        restore_last: Some(None),
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 3, 0, vec![KEY]));
    h.out();
    h.feed(ws_msg(KEY, 9, b"x"));
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(9)]);
    h.feed(ws_msg(KEY, 9, b"x"));
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(9)]);
}

#[test]
fn remembered_indices_are_dropped_after_the_actor_ran_elsewhere() {
    let run_then_restart = |first: u32, next: u32| -> Vec<Call> {
        let mut h = harness(Opts::default());
        h.connect("r1");
        h.feed(start_cmd("a1", first, 0, vec![]));
        h.feed(ws_open(KEY, "a1"));
        for i in 1..=3 {
            h.feed(ws_msg(KEY, i, b"x"));
        }
        h.feed(stop_cmd("a1", first, 1));
        h.out();
        h.calls();
        h.feed(start_cmd("a1", next, 0, vec![KEY]));
        h.calls()
    };
    // The next generation: nothing ran in between, the memory is current.
    assert_eq!(
        run_then_restart(4, 5),
        vec![Call::Start("a1".into(), 5), Call::Restore(KEY, Some(3))]
    );
    assert_eq!(
        run_then_restart(u32::MAX, 0),
        vec![Call::Start("a1".into(), 0), Call::Restore(KEY, Some(3))]
    );
    // A generation skipped: it ran on another runner, which may have delivered more.
    assert_eq!(
        run_then_restart(4, 6),
        vec![Call::Start("a1".into(), 6), Call::Restore(KEY, None)]
    );

    // With the stale index dropped, the replay sets the baseline instead of looking like a
    // gap (the other runner had delivered up to 7).
    let mut h = harness(Opts::default());
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    h.feed(ws_msg(KEY, 1, b"x"));
    h.feed(stop_cmd("a1", 0, 1));
    h.feed(start_cmd("a1", 2, 0, vec![KEY]));
    h.out();
    h.calls();
    h.feed(ws_msg(KEY, 8, b"x"));
    assert_eq!(h.counters.snapshot().gaps, 0);
    assert_eq!(h.calls(), vec![Call::Msg(KEY, 8, b"x".to_vec(), true)]);
}

#[test]
fn an_older_ack_never_lowers_the_acknowledged_index() {
    let mut h = harness(Opts {
        policy: AckPolicy::Manual,
        ..Opts::default()
    });
    h.connect("r1");
    h.feed(start_cmd("a1", 0, 0, vec![]));
    h.feed(ws_open(KEY, "a1"));
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    // Two persistence tasks finish in reverse order, in separate flushes.
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 3));
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(3)]);
    h.core.handle_actor_op("a1", 0, ActorOp::Ack(KEY, 2));
    h.out();
    // The connection dies before the gateway read the acks: its replay is re-acknowledged
    // with the newest index.
    h.core.connection_lost(Instant::now());
    h.connect("r1");
    for i in 1..=3 {
        h.feed(ws_msg(KEY, i, b"x"));
    }
    assert_eq!(acks_of(&h.out(), KEY), vec![ack(3)]);
}
