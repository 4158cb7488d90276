//! The `gateway_core` fuzz property: one or two sans-IO gateway cores (`torpor::gateway::Gateway`,
//! one per shard) driven by a byte-coded sequence of the calls the shell makes, with a model of
//! the shell around them (readers, writers, the open exchange, HTTP tasks, the shards'
//! mailboxes, a tiny control plane and the shard timer). Included by `checks.rs`.
//!
//! Every step ends with the core's own `check_invariants()` (a no-op unless debug assertions
//! are on: they are under `cargo fuzz` and `cargo test`) and the checks below, which only
//! assert what the core promises its shell:
//! - every output names a connection this core issued; messages for another shard name that
//!   shard (and a runner connection of it); a `Reply` answers an open question, once;
//! - no deadline earlier than the one the shell sleeps until is set without `Rearm`, and after
//!   `handle_timeout(now)` the next deadline is after `now`;
//! - no lost wake-up: a writer waiting with bytes queued was sent `Flush`, an answered open
//!   exchange or HTTP request was sent `Wake`, and a reader parked by `client_paused` is still
//!   marked parked in the core (so the `Wake` that frees it will come);
//! - what a writer takes is well-formed WebSocket frames (server side, unmasked), nothing after
//!   a close frame, and on a runner connection every message decodes as a runner-protocol
//!   `ToClient` whose tunnel ids name requests the cores issued;
//! - a removed connection is gone from every accessor; client states agree (a closing socket
//!   is closed and does not hibernate; a hibernating one is detached); outside the drain
//!   (which keeps hibernatable sockets' records on purpose) a closing client holds no engine
//!   record, and one that ended leaves none behind (`Hibernating { keep }` outputs tracked);
//! - the gauges (pending bytes and messages, open, paused and hibernating client WebSockets,
//!   runners connected) equal what the tables hold;
//! - at the end, after the clock jumped past every timeout: every question was answered, no
//!   open exchange still waits, every HTTP request has its outcome.
//!
//! Fixed bug, tolerated only when not `strict` (the target runs strict): a client closed while
//! its open exchange still waited (the core aborted it as too slow when its runner sent
//! messages before answering `WebSocketOpen`) was still accepted by a later
//! `WebSocketOpen { canHibernate: true }`: `client_opened` made an engine record of a closing
//! socket that was never forgotten. The core now refuses the open of a closing client.
//!
//! The model calls the core only as the shell would (`src/net`): no frame from a client before
//! its 101 or while its reader is parked, `remove` only for HTTP requests, the ids in shard
//! messages are runner connections that existed. `GATEWAY_CORE_TRACE=1` prints every step.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use torpor::config::Config;
use torpor::engine::ConnRef;
use torpor::gateway::conns::RequestPhase;
use torpor::gateway::{
    ConnId, ConnKind, ControlMsg, DrainPhase, Gateway, Next, OpenPhase, Output, Pause, Reason,
    Reply, RequestKey, ResolveError, Routed, RunnerAccept, Settings, ShardMsg, WriterTurn,
};
use torpor::metrics::{Gauge, Metrics};
use torpor::protocol::{
    decode_to_client, encode_to_client, encode_to_server, encode_ws_ack_to_server,
    encode_ws_message_prefix_to_server, ws_message_trailer, MessageId, StrMap, ToClient,
    ToClientPing, ToClientTunnelMessageKind, ToServer, ToServerAckCommands, ToServerInit,
    ToServerPong, ToServerResponseChunk, ToServerResponseStart, ToServerTunnelMessage,
    ToServerTunnelMessageKind, ToServerWebSocketClose, ToServerWebSocketMessage,
    ToServerWebSocketMessageAck, ToServerWebSocketOpen,
};
use torpor::tunnel::{SocketState, TunnelSocket};
use torpor::ws::{encode_header, OpCode, Role, WsEvent, WsReader, WsReaderConfig};

/// The gateway id the cores are given.
pub const GW: [u8; 4] = [7, 7, 7, 7];
/// Runner indices the control plane hands out: `0..RUNNERS`.
pub const RUNNERS: u32 = 3;
const ACTORS: [&str; 3] = ["actor-a", "actor-b", "actor-c"];

// A small configuration, so windows fill, limits are hit and every deadline passes.
pub const WINDOW_BYTES: usize = 64;
pub const WINDOW_MESSAGES: usize = 4;
/// The process-wide pending cap (each shard gets its share).
pub const GLOBAL_BYTES: u64 = 320;
pub const CLIENT_OUTBOUND: usize = 256;
pub const HTTP_BODY: usize = 64;

fn config() -> Arc<Config> {
    static CONFIG: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut c = Config::default();
            let l = &mut c.limits;
            l.pending_bytes_per_socket = WINDOW_BYTES;
            l.pending_messages_per_socket = WINDOW_MESSAGES;
            l.pending_bytes_global = GLOBAL_BYTES;
            l.client_outbound_bytes = CLIENT_OUTBOUND;
            l.http_body_bytes = HTTP_BODY;
            let t = &mut c.timeouts;
            t.runner_init_ms = 50;
            t.websocket_open_ms = 40;
            t.response_start_ms = 60;
            t.ack_timeout_ms = 30;
            t.gc_interval_ms = 20;
            t.ping_interval_ms = 25;
            t.ping_timeout_ms = 80;
            t.hibernation_refresh_ms = 40;
            t.hibernation_max_ms = 300;
            t.close_handshake_ms = 30;
            t.client_idle_ping_ms = 40;
            t.client_pong_timeout_ms = 40;
            Arc::new(c)
        })
        .clone()
}

/// Printable payload bytes (text messages stay valid UTF-8).
static ASCII: [u8; 256] = {
    let mut a = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        a[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    a
};

fn ascii(n: usize) -> Bytes {
    Bytes::from_static(&ASCII[..n.min(ASCII.len())])
}

/// Operation codes (the first byte of each step, modulo [`op::COUNT`]), each followed by a
/// fixed number of argument bytes (listed; missing bytes read as 0). A "pick" byte selects,
/// modulo their number, among the live connections of that kind (core 0's first).
pub mod op {
    /// core, actor, runner_idx, pick (bit 7: any runner connection ever made, else the
    /// control plane's current one for runner_idx), generation
    pub const OPEN_CLIENT: u8 = 0;
    /// core, actor, runner_idx, generation, hibernatable (the tests' path: insert_client +
    /// client_opened + client_upgraded)
    pub const INSERT_CLIENT: u8 = 1;
    /// core, actor, runner_idx, pick (as OPEN_CLIENT), body length (bit 7: a streamed body,
    /// sent by HTTP_STEP)
    pub const START_REQUEST: u8 = 2;
    /// core
    pub const RUNNER_CONNECT: u8 = 3;
    /// runner
    pub const RUNNER_INIT: u8 = 4;
    /// runner, target (255: a made-up request id), kind (bit 3: handle_runner_message), a, b
    /// kinds: 0 text / 1 binary message (hot encoding, len a, index b), 2 message (codec),
    /// 3 ack (hot) / 4 ack (codec) at the oldest pending index + (a as i8), 5 open
    /// (hibernatable a&1), 6 close (code a%4, reason a>>2, hibernate b&1), 7 ack index (a,b)
    pub const RUNNER_WS: u8 = 5;
    /// runner, target (a request if any), kind (bit 3: handle_runner_message), a
    /// kinds: 0 ResponseStart, 1 ResponseStart stream, 2 ResponseChunk (finish kind&4),
    /// 3 ResponseAbort
    pub const RUNNER_HTTP: u8 = 6;
    /// runner, kind (bit 4: handle_runner_message), a
    /// kinds: 0 pong ts>0, 1 pong ts<0 (fence), 2 stopping, 3 events, 4 ack commands,
    /// 5 garbage (1 + a%8 more input bytes), 6 text frame, 7 ping, 8 pong frame, 9 close,
    /// 10 protocol error, 11 init again
    pub const RUNNER_OTHER: u8 = 7;
    /// client, kind, a — kinds: 0 text / 1 binary (len a%100), 2 large binary, 3 ping,
    /// 4 pong, 5 close, 6 protocol error, 7 empty binary
    pub const CLIENT_FRAME: u8 = 8;
    /// client
    pub const CLIENT_READ: u8 = 9;
    /// client
    pub const CLIENT_END: u8 = 10;
    /// runner
    pub const RUNNER_END: u8 = 11;
    /// request (bit 7 of the pick, while its streamed body may go on: the next piece, the
    /// last with bit 6)
    pub const HTTP_STEP: u8 = 12;
    /// client (still opening), fail (bit 0: the 101 write fails)
    pub const HANDSHAKE: u8 = 13;
    /// connection (clients then runners), max (1 + max%4 chunks; bit 7: a write fails)
    pub const WRITER: u8 = 14;
    /// core, n (1 + n%8 messages from its mailbox)
    pub const DELIVER: u8 = 15;
    /// a (the control plane answers its oldest message)
    pub const CONTROL: u8 = 16;
    /// target (bit 0: every shard, else shard target>>1), kind, a, b — kinds: 0 attached,
    /// 1 detached, 2 lost, 3 actor stopped, 4 destroyed, 5 running (gen b%6), 6 close a
    /// runner connection, 7 reply, 8 frames to a runner connection, 9 shutdown
    pub const INJECT: u8 = 17;
    /// core, timeout (1 + t ms)
    pub const ASK: u8 = 18;
    /// ms: the clock moves a..255 ms; due timers run
    pub const TICK: u8 = 19;
    /// a: the clock jumps 1..250 s, or hours from 250 on
    pub const JUMP: u8 = 20;
    /// core, k — 0 idle_scan, 1 drain_idle/has_open_websockets, 2 shutdown,
    /// 3 handle_timeout whether due or not
    pub const MISC: u8 = 21;
    pub const COUNT: u8 = 22;
}

/// How the model's shell waits when a client is paused for not reading (flags bit 7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shell {
    /// As `src/net/client.rs` does: wait for `Wake` while `client_out_full`.
    Net,
    /// As `client_paused` documents: wait for `Wake`, then ask `client_paused` again.
    Contract,
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn op(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Client,
    Runner,
    Request,
}

/// The shell's reader of a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reader {
    Running,
    /// Waiting for `Wake` (clients only).
    Parked(Pause),
    /// The peer's close frame was read: nothing more is parsed, reads go on.
    Closed,
    /// `Next::Stop`: reads and discards until the peer ends the connection.
    Stopped,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WState {
    /// A client still in its open exchange: no writer yet.
    NotStarted,
    /// Waiting for `Flush`.
    Waiting,
    /// Taking turns until one is idle.
    Looping,
    /// A batch of this many bytes is being written.
    InFlight(usize),
    Done,
}

/// A connection's writer and what it put on the wire (parsed as the peer would).
struct Wire {
    state: WState,
    /// A `Flush` came while the writer was busy (a stored `Notify` permit).
    permit: bool,
    buf: BytesMut,
    parser: WsReader,
    closed: bool,
}

impl Wire {
    fn new(started: bool) -> Wire {
        Wire {
            state: if started {
                WState::Waiting
            } else {
                WState::NotStarted
            },
            permit: false,
            buf: BytesMut::new(),
            parser: WsReader::new(WsReaderConfig {
                role: Role::Client,
                max_frame: 1 << 20,
                max_message: 1 << 20,
            }),
            closed: false,
        }
    }

    fn notify(&mut self) {
        match self.state {
            WState::Waiting => self.state = WState::Looping,
            WState::Done => {}
            _ => self.permit = true,
        }
    }

    fn start(&mut self) {
        self.state = if std::mem::take(&mut self.permit) {
            WState::Looping
        } else {
            WState::Waiting
        };
    }
}

struct ClientM {
    id: ConnId,
    /// In the open exchange (the shell waits for the runner's answer).
    opening: bool,
    /// `Wake` came while opening and the shell has not looked yet.
    woken: bool,
    reader: Reader,
    /// A `Wake` came while the reader was not waiting (a stored `Notify` permit).
    permit: bool,
    wire: Wire,
    req: [u8; 4],
    /// Seen closing while still in its open exchange (the known bug in the module docs).
    closed_in_open: bool,
}

struct RunnerM {
    id: ConnId,
    reader: Reader,
    wire: Wire,
}

struct ReqM {
    id: ConnId,
    woken: bool,
}

struct Core {
    gw: Gateway,
    clients: Vec<ClientM>,
    runners: Vec<RunnerM>,
    requests: Vec<ReqM>,
    issued: HashMap<ConnId, Kind>,
    removed: Vec<ConnId>,
    /// Questions asked and not answered yet.
    waiters: HashSet<u32>,
    /// What the shell's timer sleeps until (the last `poll_timeout`).
    sleep: Instant,
    draining: bool,
    /// The deadline of the drain's close phase, once seen.
    closing_until: Option<Instant>,
}

impl Core {
    /// Remembers the deadline of the drain's close phase when it is in it.
    fn note_drain(&mut self) {
        if let DrainPhase::Closing(until) = self.gw.drain_phase() {
            self.closing_until = Some(until);
        }
    }
}

/// A request id a runner may name: every client and HTTP request ever opened.
struct Target {
    req: [u8; 4],
    core: usize,
    id: ConnId,
    client: bool,
}

#[derive(Clone, Copy)]
enum ConnPick {
    Client(usize),
    Runner(usize),
}

struct World {
    cores: Vec<Core>,
    metrics: Metrics,
    mailboxes: Vec<VecDeque<ShardMsg>>,
    control: VecDeque<(usize, ControlMsg)>,
    runner_refs: Vec<ConnRef>,
    targets: Vec<Target>,
    /// Request ids issued: (named a client, named an HTTP request) — 4 generation bits, so
    /// ids repeat after 16 reuses of a slot.
    reqs: HashMap<[u8; 4], (bool, bool)>,
    /// The control plane's view: runner index → its current connection.
    attached: [Option<ConnRef>; RUNNERS as usize],
    actor_gen: [u32; ACTORS.len()],
    now: Instant,
    start: Instant,
    shell: Shell,
    /// Also fail on the known bug (module docs).
    strict: bool,
    /// The engine's hibernating-request records, as the cores asked (`Hibernating { keep }`).
    records: HashSet<[u8; 4]>,
    peer: SocketAddr,
}

/// Runs the property on `data` (`strict`: fail on the known bug too). The first byte is
/// flags: bit 0 two shards, bit 7 the documented paused reader instead of `src/net`'s, all of
/// it seeds the cores' jitter.
pub fn run(data: &[u8], strict: bool) {
    let mut input = Input { data, pos: 0 };
    let flags = input.u8();
    let shards = if flags & 1 != 0 { 2 } else { 1 };
    let shell = if flags & 0x80 != 0 {
        Shell::Contract
    } else {
        Shell::Net
    };
    let mut w = World::new(shards, u64::from(flags >> 1), shell);
    w.strict = strict;
    let mut step = 0usize;
    let trace = std::env::var_os("GATEWAY_CORE_TRACE").is_some();
    while let Some(code) = input.op() {
        step += 1;
        let at = input.pos;
        let ran = w.apply(code % op::COUNT, &mut input);
        if trace {
            let args = &data[at.min(data.len())..input.pos.min(data.len())];
            eprintln!(
                "step {step}: op {} {args:?} (t+{:?})",
                code % op::COUNT,
                w.now - w.start
            );
        }
        w.pump(ran);
        if trace {
            w.trace();
        }
        for (c, core) in w.cores.iter().enumerate() {
            if ran & (1 << c) != 0 {
                assert!(
                    core.sleep > w.now,
                    "step {step}: after handle_timeout(now) the next deadline is not after now"
                );
            }
        }
        w.check();
    }
    w.finish();
}

fn actor(b: u8) -> usize {
    b as usize % ACTORS.len()
}

fn id_of(conn: ConnRef) -> ConnId {
    ConnId {
        slot: conn.slot,
        gen: conn.gen,
    }
}

/// A whole runner-protocol message to a runner, as the control plane frames it.
fn to_runner_frames(msg: &ToClient) -> Vec<Bytes> {
    let body = Bytes::from(encode_to_client(msg));
    let h = encode_header(true, OpCode::Binary, body.len() as u64, None);
    vec![Bytes::copy_from_slice(h.as_slice()), body]
}

fn tunnel(req: [u8; 4], index: u16, kind: ToServerTunnelMessageKind) -> Vec<u8> {
    encode_to_server(&ToServer::TunnelMessage(ToServerTunnelMessage {
        message_id: MessageId {
            gateway_id: GW,
            request_id: req,
            message_index: index,
        },
        message_kind: kind,
    }))
}

fn init_message() -> Vec<u8> {
    encode_to_server(&ToServer::Init(ToServerInit {
        name: "runner".into(),
        version: 1,
        total_slots: 10,
        prepopulate_actor_names: None,
        metadata: None,
    }))
}

impl World {
    fn new(shards: usize, seed: u64, shell: Shell) -> World {
        let metrics = Metrics::new(shards);
        let now = Instant::now();
        let cores = (0..shards)
            .map(|i| {
                let settings = Settings {
                    shard: i as u16,
                    shards,
                    config: config(),
                    metrics: metrics.clone(),
                    gateway_id: GW,
                    clustered: false,
                };
                let mut gw = Gateway::new(
                    settings,
                    seed.wrapping_add(i as u64),
                    now,
                    1_700_000_000_000,
                );
                // The shell's timer asks at start.
                let sleep = gw.poll_timeout().expect("a core always has a deadline");
                Core {
                    gw,
                    clients: Vec::new(),
                    runners: Vec::new(),
                    requests: Vec::new(),
                    issued: HashMap::new(),
                    removed: Vec::new(),
                    waiters: HashSet::new(),
                    sleep,
                    draining: false,
                    closing_until: None,
                }
            })
            .collect();
        World {
            cores,
            metrics,
            mailboxes: (0..shards).map(|_| VecDeque::new()).collect(),
            control: VecDeque::new(),
            runner_refs: Vec::new(),
            targets: Vec::new(),
            reqs: HashMap::new(),
            attached: [None; RUNNERS as usize],
            actor_gen: [1; ACTORS.len()],
            now,
            start: now,
            shell,
            strict: false,
            records: HashSet::new(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    fn core(&self, b: u8) -> usize {
        b as usize % self.cores.len()
    }

    fn pick_client(&self, b: u8, pred: impl Fn(&ClientM) -> bool) -> Option<(usize, usize)> {
        let all: Vec<(usize, usize)> = self
            .cores
            .iter()
            .enumerate()
            .flat_map(|(c, core)| {
                core.clients
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| pred(m))
                    .map(move |(i, _)| (c, i))
            })
            .collect();
        (!all.is_empty()).then(|| all[b as usize % all.len()])
    }

    fn pick_runner(&self, b: u8) -> Option<(usize, usize)> {
        let all: Vec<(usize, usize)> = self
            .cores
            .iter()
            .enumerate()
            .flat_map(|(c, core)| (0..core.runners.len()).map(move |i| (c, i)))
            .collect();
        (!all.is_empty()).then(|| all[b as usize % all.len()])
    }

    /// Where the control plane routes a request to runner `ridx` (or, with bit 7 of `pick`,
    /// any runner connection ever made: a stale answer).
    fn routed(&self, a: u8, ridx: u8, pick: u8, gen: u8) -> Option<Routed> {
        let runner_idx = u32::from(ridx) % RUNNERS;
        let current = self.attached[runner_idx as usize].filter(|_| pick & 0x80 == 0);
        let conn = match current {
            Some(c) => c,
            None if self.runner_refs.is_empty() => return None,
            None => self.runner_refs[pick as usize % self.runner_refs.len()],
        };
        Some(Routed {
            actor_id: Arc::from(ACTORS[actor(a)]),
            generation: u32::from(gen % 4),
            runner_idx,
            conn,
        })
    }

    fn issue(&mut self, c: usize, id: ConnId, kind: Kind) {
        let core = &mut self.cores[c];
        assert!(
            core.issued.insert(id, kind).is_none(),
            "connection id {id:?} issued twice"
        );
        if kind != Kind::Runner {
            let req = core
                .gw
                .request_id(id)
                .expect("a new client or request has a request id");
            assert_eq!(
                RequestKey::decode(req).shard,
                c as u16,
                "a request id names its shard"
            );
            assert_eq!(
                core.gw.conn_of_request(req),
                Some(id),
                "a request id names its connection"
            );
            assert!(
                !self.reqs.contains_key(&req),
                "request id {req:?} issued twice (serials come back only after 2^24)"
            );
            let e = self.reqs.entry(req).or_default();
            if kind == Kind::Client {
                e.0 = true;
            } else {
                e.1 = true;
            }
            self.targets.push(Target {
                req,
                core: c,
                id,
                client: kind == Kind::Client,
            });
        }
    }

    /// After the shell removed a connection: no accessor finds it any more.
    fn gone(&mut self, c: usize, id: ConnId) {
        if let Some(t) = self.targets.iter().find(|t| t.core == c && t.id == id) {
            assert_eq!(
                self.cores[c].gw.conn_of_request(t.req),
                None,
                "a removed connection's request id still routes"
            );
        }
        let gw = &mut self.cores[c].gw;
        assert!(
            !gw.contains(id),
            "removed connection {id:?} still in the table"
        );
        assert!(gw.kind(id).is_none());
        assert!(
            gw.out_queue(id).is_none(),
            "removed connection keeps its queue"
        );
        assert!(gw.request_id(id).is_none());
        assert!(gw.open_phase(id).is_none());
        assert!(!gw.client_read(id));
        assert!(gw.client_paused(id).is_none());
        assert!(!gw.client_out_full(id));
        assert!(gw.take_http_outcome(id).is_none());
        let mut batch = Vec::new();
        assert_eq!(gw.writer_turn(id, &mut batch, 4), WriterTurn::Gone);
        assert!(batch.is_empty());
        self.cores[c].removed.push(id);
    }

    fn client_end(&mut self, c: usize, i: usize) {
        let id = self.cores[c].clients[i].id;
        self.cores[c].gw.client_ended(id, self.now);
        self.pump_core(c, false);
        let m = self.cores[c].clients.remove(i);
        self.gone(c, id);
        self.record_forgotten(c, &m);
    }

    /// A client's socket ended: the engine no longer holds its record (the drain keeps the
    /// records of hibernatable sockets on purpose: a restart can still list them).
    fn record_forgotten(&mut self, c: usize, m: &ClientM) {
        let tolerated = self.cores[c].draining || (!self.strict && m.closed_in_open);
        assert!(
            tolerated || !self.records.contains(&m.req),
            "client {:?} ended and the engine still holds its hibernating record",
            m.id
        );
        // Request ids repeat once a slot is reused 16 times: a record left behind on purpose
        // must not be blamed on a later client.
        self.records.remove(&m.req);
    }

    fn runner_end(&mut self, c: usize, i: usize) {
        let id = self.cores[c].runners[i].id;
        self.cores[c].gw.runner_ended(id);
        self.cores[c].runners.remove(i);
        self.gone(c, id);
    }

    /// A runner frame through the shell's reader.
    fn runner_frame(&mut self, c: usize, i: usize, ev: WsEvent) {
        let r = &self.cores[c].runners[i];
        if r.reader != Reader::Running {
            return;
        }
        let id = r.id;
        match self.cores[c].gw.handle_runner_frame(id, ev, self.now) {
            Next::Continue => {}
            Next::Stop => self.cores[c].runners[i].reader = Reader::Stopped,
            Next::Done => self.runner_end(c, i),
        }
    }

    /// A runner-protocol message: through the reader, or straight to
    /// `handle_runner_message` (as the tests and benches call it).
    fn runner_send(&mut self, c: usize, i: usize, data: Vec<u8>, direct: bool) {
        let r = &self.cores[c].runners[i];
        if r.reader != Reader::Running {
            return;
        }
        if direct {
            let id = r.id;
            let _ = self.cores[c]
                .gw
                .handle_runner_message(id, Bytes::from(data), self.now);
        } else {
            let ev = WsEvent::Message {
                text: false,
                data: Bytes::from(data),
            };
            self.runner_frame(c, i, ev);
        }
    }

    /// The request id a runner names: a target's (`b` picks it), or a made-up one.
    fn target(&self, b: u8, x: u8, requests_first: bool) -> ([u8; 4], Option<(usize, ConnId)>) {
        let pool: Vec<&Target> = if requests_first && self.targets.iter().any(|t| !t.client) {
            self.targets.iter().filter(|t| !t.client).collect()
        } else {
            self.targets.iter().collect()
        };
        if b == 255 || pool.is_empty() {
            return ([x % 3, x, b, x.rotate_left(3) & 0x3f], None);
        }
        let t = pool[b as usize % pool.len()];
        (t.req, Some((t.core, t.id)))
    }

    /// The oldest pending index of a live client (else its next index), for acks.
    fn ack_base(&self, t: Option<(usize, ConnId)>) -> u16 {
        let Some((c, id)) = t else {
            return 1;
        };
        match self.cores[c].gw.kind(id) {
            Some(ConnKind::Client(cc)) => cc
                .socket
                .pending()
                .next()
                .map_or(cc.socket.next_index(), |e| e.index),
            _ => 1,
        }
    }

    /// The shell's reader of an open client before it parses a frame: returns whether it may
    /// (it parks when `client_paused` says so).
    fn reader_gate(&mut self, c: usize, i: usize) -> bool {
        let shell = self.shell;
        let core = &mut self.cores[c];
        let m = &mut core.clients[i];
        loop {
            match core.gw.client_paused(m.id) {
                None => return true,
                Some(p) => {
                    if std::mem::take(&mut m.permit) {
                        // A stored wake-up: it looks again at once.
                        if p == Pause::Unread
                            && shell == Shell::Net
                            && core.gw.client_out_full(m.id)
                        {
                            m.reader = Reader::Parked(p);
                            return false;
                        }
                        continue;
                    }
                    m.reader = Reader::Parked(p);
                    return false;
                }
            }
        }
    }

    fn client_frame(&mut self, c: usize, i: usize, kind: u8, a: u8) {
        if !self.reader_gate(c, i) {
            return;
        }
        let id = self.cores[c].clients[i].id;
        let now = self.now;
        let gw = &mut self.cores[c].gw;
        let (next, closes) = match kind % 8 {
            k @ (0 | 1) => {
                let ev = WsEvent::Message {
                    text: k == 0,
                    data: ascii(a as usize % 100),
                };
                (gw.handle_client_frame(id, ev, now), false)
            }
            2 => {
                let ev = WsEvent::Message {
                    text: false,
                    data: ascii(WINDOW_BYTES - 8 + (a as usize % 8) * 8),
                };
                (gw.handle_client_frame(id, ev, now), false)
            }
            3 => (
                gw.handle_client_frame(id, WsEvent::Ping(ascii(a as usize % 126)), now),
                false,
            ),
            4 => (
                gw.handle_client_frame(id, WsEvent::Pong(Bytes::new()), now),
                false,
            ),
            5 => {
                let code = [Some(1000), None, Some(4001), Some(1001)][a as usize % 4];
                let reason = if code.is_some() && a & 4 != 0 {
                    Bytes::from_static("bye é".as_bytes())
                } else {
                    Bytes::new()
                };
                (
                    gw.handle_client_frame(id, WsEvent::Close { code, reason }, now),
                    true,
                )
            }
            6 => (
                gw.client_protocol_error(id, Reason::WsProtocolError, now),
                false,
            ),
            _ => {
                let ev = WsEvent::Message {
                    text: false,
                    data: Bytes::new(),
                };
                (gw.handle_client_frame(id, ev, now), false)
            }
        };
        match next {
            Next::Continue if closes => self.cores[c].clients[i].reader = Reader::Closed,
            Next::Continue => {}
            Next::Stop => self.cores[c].clients[i].reader = Reader::Stopped,
            Next::Done => self.client_end(c, i),
        }
    }

    /// One step of a connection's writer.
    fn writer_step(&mut self, c: usize, pick: ConnPick, max: u8) {
        let core = &mut self.cores[c];
        let (id, wire, runner) = match pick {
            ConnPick::Client(i) => {
                let m = &mut core.clients[i];
                (m.id, &mut m.wire, false)
            }
            ConnPick::Runner(i) => {
                let m = &mut core.runners[i];
                (m.id, &mut m.wire, true)
            }
        };
        match wire.state {
            WState::Looping => {
                let n = 1 + max as usize % 4;
                let mut batch = Vec::new();
                match core.gw.writer_turn(id, &mut batch, n) {
                    WriterTurn::Gone => {
                        assert!(
                            !core.gw.contains(id),
                            "writer told Gone for a live connection"
                        );
                        wire.state = WState::Done;
                    }
                    WriterTurn::Reset => {
                        let q = core.gw.out_queue(id).expect("Reset for a live connection");
                        assert!(q.is_aborted(), "writer told Reset without an abort");
                        wire.state = WState::Done;
                    }
                    WriterTurn::Shutdown => {
                        let q = core
                            .gw
                            .out_queue(id)
                            .expect("Shutdown for a live connection");
                        assert!(
                            q.is_closing() && q.is_empty(),
                            "Shutdown before the close frame is out"
                        );
                        wire.state = WState::Done;
                    }
                    WriterTurn::Idle => {
                        assert!(batch.is_empty(), "an idle turn handed out chunks");
                        assert!(core.gw.out_queue(id).is_some_and(|q| q.is_empty()));
                        wire.state = if std::mem::take(&mut wire.permit) {
                            WState::Looping
                        } else {
                            WState::Waiting
                        };
                    }
                    WriterTurn::Write { bytes } => {
                        assert!(
                            !batch.is_empty() && batch.len() <= n,
                            "batch of {} chunks, max {n}",
                            batch.len()
                        );
                        let sum: usize = batch.iter().map(|b| b.len()).sum();
                        assert_eq!(bytes, sum, "a turn's byte count");
                        assert!(bytes > 0, "an empty chunk was queued");
                        assert!(!wire.closed, "bytes written after the close frame");
                        for b in &batch {
                            wire.buf.extend_from_slice(b);
                        }
                        parse_wire(wire, runner, &self.reqs);
                        wire.state = WState::InFlight(bytes);
                    }
                }
            }
            WState::InFlight(bytes) => {
                if max & 0x80 != 0 {
                    // The write failed: the writer shuts the socket and ends.
                    wire.state = WState::Done;
                } else {
                    wire.state = WState::Looping;
                    core.gw.written(id, bytes);
                }
            }
            WState::NotStarted | WState::Waiting | WState::Done => {}
        }
    }

    /// Delivers one mailbox message to core `c`.
    fn deliver_one(&mut self, c: usize) -> bool {
        let Some(msg) = self.mailboxes[c].pop_front() else {
            return false;
        };
        let core = &mut self.cores[c];
        if matches!(msg, ShardMsg::Shutdown) {
            core.draining = true;
        }
        core.gw.handle_shard_msg(msg, self.now);
        true
    }

    fn broadcast(&mut self, make: impl Fn() -> ShardMsg) {
        for mb in self.mailboxes.iter_mut() {
            mb.push_back(make());
        }
    }

    /// The control plane acts on its oldest message, roughly as the engine would.
    fn control_step(&mut self, a: u8) {
        let Some((_, msg)) = self.control.pop_front() else {
            return;
        };
        match msg {
            ControlMsg::RunnerInit { conn, .. } => {
                let idx = u32::from(a) % RUNNERS;
                if let Some(old) = self.attached[idx as usize].replace(conn) {
                    if old != conn {
                        self.mailboxes[old.shard as usize].push_back(ShardMsg::CloseConn {
                            conn: id_of(old),
                            code: 1000,
                            reason: Reason::WsEviction,
                        });
                    }
                }
                self.broadcast(|| ShardMsg::RunnerAttached {
                    runner_idx: idx,
                    conn,
                });
            }
            ControlMsg::RunnerClosed { conn } => {
                for idx in 0..RUNNERS {
                    if self.attached[idx as usize] == Some(conn) {
                        self.attached[idx as usize] = None;
                        let lost = a & 1 != 0;
                        self.broadcast(|| ShardMsg::RunnerDetached {
                            runner_idx: idx,
                            lost,
                        });
                    }
                }
            }
            ControlMsg::Resolve { actor_id, waiter } => {
                let shard = (waiter >> 32) as usize;
                let at = (0..RUNNERS)
                    .map(|k| (u32::from(a) + k) % RUNNERS)
                    .find_map(|idx| self.attached[idx as usize].map(|c| (idx, c)));
                let ai = ACTORS.iter().position(|x| *x == actor_id).unwrap_or(0);
                let reply = match at {
                    Some((runner_idx, conn)) => Ok(Routed {
                        actor_id: Arc::from(ACTORS[ai]),
                        generation: self.actor_gen[ai],
                        runner_idx,
                        conn,
                    }),
                    None => Err(ResolveError::Unavailable),
                };
                if shard < self.mailboxes.len() {
                    self.mailboxes[shard].push_back(ShardMsg::Reply {
                        waiter: waiter as u32,
                        reply: Reply::Resolve(reply),
                    });
                }
            }
            ControlMsg::Wake { actor_id } => {
                let at = (0..RUNNERS).find(|idx| self.attached[*idx as usize].is_some());
                if let Some(runner_idx) = at {
                    let ai = ACTORS.iter().position(|x| *x == actor_id).unwrap_or(0);
                    self.actor_gen[ai] += 1;
                    let generation = self.actor_gen[ai];
                    let id: Arc<str> = Arc::from(ACTORS[ai]);
                    self.broadcast(|| ShardMsg::ActorRunning {
                        actor_id: id.clone(),
                        generation,
                        runner_idx,
                    });
                }
            }
            _ => {}
        }
    }

    fn inject(&mut self, target: u8, kind: u8, a: u8, b: u8) {
        let n = self.cores.len();
        let to = (target >> 1) as usize % n;
        let all = target & 1 != 0;
        let idx = u32::from(a) % RUNNERS;
        let send = |w: &mut World, make: &dyn Fn() -> ShardMsg| {
            if all {
                w.broadcast(make);
            } else {
                w.mailboxes[to].push_back(make());
            }
        };
        match kind % 10 {
            0 => {
                if self.runner_refs.is_empty() {
                    return;
                }
                let conn = self.runner_refs[b as usize % self.runner_refs.len()];
                send(self, &|| ShardMsg::RunnerAttached {
                    runner_idx: idx,
                    conn,
                });
            }
            k @ (1 | 2) => send(self, &|| ShardMsg::RunnerDetached {
                runner_idx: idx,
                lost: k == 2,
            }),
            k @ (3 | 4) => {
                let id: Arc<str> = Arc::from(ACTORS[actor(b)]);
                send(self, &|| ShardMsg::ActorStopped {
                    actor_id: id.clone(),
                    destroyed: k == 4,
                    barrier: 1,
                })
            }
            5 => {
                let id: Arc<str> = Arc::from(ACTORS[actor(b >> 4)]);
                let generation = u32::from(b % 6);
                send(self, &|| ShardMsg::ActorRunning {
                    actor_id: id.clone(),
                    generation,
                    runner_idx: idx,
                })
            }
            6 => {
                // The engine closes runner connections only (evictions).
                if self.runner_refs.is_empty() {
                    return;
                }
                let conn = self.runner_refs[b as usize % self.runner_refs.len()];
                let code = if a & 1 != 0 { 1011 } else { 1000 };
                self.mailboxes[conn.shard as usize].push_back(ShardMsg::CloseConn {
                    conn: id_of(conn),
                    code,
                    reason: Reason::WsEviction,
                });
            }
            7 => {
                let mut open: Vec<u32> = self.cores[to].waiters.iter().copied().collect();
                open.sort_unstable();
                let waiter = if open.is_empty() || a & 0x80 != 0 {
                    u32::from_le_bytes([a, b, a ^ b, 0])
                } else {
                    open[b as usize % open.len()]
                };
                let reply = match a % 3 {
                    0 => Reply::Api {
                        status: 200,
                        body: "{}".into(),
                    },
                    1 => Reply::Resolve(Err(ResolveError::NotFound)),
                    _ => match self.routed(b, a >> 2, b, a) {
                        Some(r) => Reply::Resolve(Ok(r)),
                        None => Reply::Resolve(Err(ResolveError::Timeout)),
                    },
                };
                self.mailboxes[to].push_back(ShardMsg::Reply { waiter, reply });
            }
            9 => send(self, &|| ShardMsg::Shutdown),
            _ => {
                if self.runner_refs.is_empty() {
                    return;
                }
                let conn = self.runner_refs[b as usize % self.runner_refs.len()];
                let frames = to_runner_frames(&ToClient::Ping(ToClientPing { ts: i64::from(a) }));
                self.mailboxes[conn.shard as usize].push_back(ShardMsg::ToRunner {
                    conn: id_of(conn),
                    frames,
                });
            }
        }
    }

    /// Runs the timers of every core that is due (or of all with `force`); returns a bit per
    /// core that ran `handle_timeout`.
    fn timers(&mut self, force: bool) -> u8 {
        let mut ran = 0;
        for (c, core) in self.cores.iter_mut().enumerate() {
            if force || self.now >= core.sleep {
                core.gw.handle_timeout(self.now);
                ran |= 1 << c;
            }
        }
        ran
    }

    /// One step; returns a bit per core that ran `handle_timeout`.
    fn apply(&mut self, code: u8, inp: &mut Input) -> u8 {
        let now = self.now;
        match code {
            op::OPEN_CLIENT => {
                let (c, a, ridx, pick, gen) =
                    (self.core(inp.u8()), inp.u8(), inp.u8(), inp.u8(), inp.u8());
                if self.cores[c].draining {
                    return 0;
                }
                let Some(routed) = self.routed(a, ridx, pick, gen) else {
                    return 0;
                };
                let id =
                    self.cores[c]
                        .gw
                        .open_client(&routed, "/ws?x=1".into(), StrMap::default(), now);
                assert_eq!(
                    self.cores[c].gw.open_phase(id),
                    Some(OpenPhase::Waiting),
                    "a new client waits for its runner"
                );
                self.issue(c, id, Kind::Client);
                let req = self.cores[c]
                    .gw
                    .request_id(id)
                    .expect("a client's request id");
                self.cores[c].clients.push(ClientM {
                    id,
                    req,
                    closed_in_open: false,
                    opening: true,
                    woken: false,
                    reader: Reader::Running,
                    permit: false,
                    wire: Wire::new(false),
                });
            }
            op::INSERT_CLIENT => {
                let (c, a, ridx, gen, hib) =
                    (self.core(inp.u8()), inp.u8(), inp.u8(), inp.u8(), inp.u8());
                if self.cores[c].draining {
                    return 0;
                }
                let gw = &mut self.cores[c].gw;
                let socket = TunnelSocket::new(gw.limits());
                let id = gw.insert_client(
                    Arc::from(ACTORS[actor(a)]),
                    u32::from(ridx) % RUNNERS,
                    u32::from(gen % 4),
                    socket,
                );
                gw.client_opened(id, hib & 1 != 0, now);
                gw.client_upgraded(id);
                self.issue(c, id, Kind::Client);
                let req = self.cores[c]
                    .gw
                    .request_id(id)
                    .expect("a client's request id");
                self.cores[c].clients.push(ClientM {
                    id,
                    req,
                    closed_in_open: false,
                    opening: false,
                    woken: false,
                    reader: Reader::Running,
                    permit: false,
                    wire: Wire::new(true),
                });
            }
            op::START_REQUEST => {
                let (c, a, ridx, pick, len) =
                    (self.core(inp.u8()), inp.u8(), inp.u8(), inp.u8(), inp.u8());
                if self.cores[c].draining {
                    return 0;
                }
                let Some(routed) = self.routed(a, ridx, pick, 0) else {
                    return 0;
                };
                let body = (len & 0x80 == 0).then(|| ascii(len as usize % 80));
                let id = self.cores[c].gw.start_request_with(
                    &routed,
                    "POST".into(),
                    "/echo".into(),
                    StrMap(vec![("x-k".into(), "v".into())]),
                    body,
                    false,
                    now,
                );
                self.issue(c, id, Kind::Request);
                self.cores[c].requests.push(ReqM { id, woken: false });
            }
            op::RUNNER_CONNECT => {
                let c = self.core(inp.u8());
                if self.cores[c].draining {
                    return 0;
                }
                let accept = RunnerAccept {
                    namespace: "default".into(),
                    runner_key: "key".into(),
                    accept: String::new(),
                };
                let id = self.cores[c].gw.runner_connected(accept, self.peer, now);
                self.issue(c, id, Kind::Runner);
                let conn = self.cores[c].gw.conn_ref(id);
                assert_eq!(
                    (conn.shard, conn.slot, conn.gen),
                    (c as u16, id.slot, id.gen)
                );
                self.runner_refs.push(conn);
                self.cores[c].runners.push(RunnerM {
                    id,
                    reader: Reader::Running,
                    wire: Wire::new(true),
                });
            }
            op::RUNNER_INIT => {
                let r = inp.u8();
                if let Some((c, i)) = self.pick_runner(r) {
                    self.runner_send(c, i, init_message(), false);
                }
            }
            op::RUNNER_WS => {
                let (r, t, kind, a, b) = (inp.u8(), inp.u8(), inp.u8(), inp.u8(), inp.u8());
                let Some((c, i)) = self.pick_runner(r) else {
                    return 0;
                };
                let (req, live) = self.target(t, a ^ b, false);
                let direct = kind & 8 != 0;
                let msg = match kind % 8 {
                    k @ (0 | 1) => {
                        let data = &ASCII[..a as usize % 100];
                        let mut m =
                            encode_ws_message_prefix_to_server(GW, req, u16::from(b), data.len())
                                .as_bytes()
                                .to_vec();
                        m.extend_from_slice(data);
                        m.extend_from_slice(&ws_message_trailer(k == 1));
                        m
                    }
                    2 => tunnel(
                        req,
                        u16::from(b),
                        ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
                            data: ASCII[..a as usize % 100].to_vec(),
                            binary: b & 1 != 0,
                        }),
                    ),
                    k @ (3 | 4) => {
                        let index = self.ack_base(live).wrapping_add(a as i8 as i16 as u16);
                        if k == 3 {
                            encode_ws_ack_to_server(GW, req, u16::from(b), index).to_vec()
                        } else {
                            tunnel(
                                req,
                                u16::from(b),
                                ToServerTunnelMessageKind::WebSocketMessageAck(
                                    ToServerWebSocketMessageAck { index },
                                ),
                            )
                        }
                    }
                    5 => tunnel(
                        req,
                        0,
                        ToServerTunnelMessageKind::WebSocketOpen(ToServerWebSocketOpen {
                            can_hibernate: a & 1 != 0,
                        }),
                    ),
                    6 => tunnel(
                        req,
                        u16::from(b),
                        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                            code: [None, Some(1000), Some(4000), Some(1011)][a as usize % 4],
                            reason: match (a >> 2) % 4 {
                                0 => None,
                                1 => Some("bye".into()),
                                2 => Some("é".repeat(100)),
                                _ => Some(String::new()),
                            },
                            hibernate: b & 1 != 0,
                        }),
                    ),
                    _ => encode_ws_ack_to_server(GW, req, 0, u16::from_le_bytes([a, b])).to_vec(),
                };
                self.runner_send(c, i, msg, direct);
            }
            op::RUNNER_HTTP => {
                let (r, t, kind, a) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
                let Some((c, i)) = self.pick_runner(r) else {
                    return 0;
                };
                let (req, _) = self.target(t, a, true);
                let k = match kind % 4 {
                    k @ (0 | 1) => {
                        ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
                            status: [200, 404, 500, 101][a as usize % 4],
                            headers: StrMap(vec![("content-type".into(), "text/plain".into())]),
                            body: (a & 0x80 == 0).then(|| ASCII[..a as usize % 80].to_vec()),
                            stream: k == 1,
                        })
                    }
                    2 => ToServerTunnelMessageKind::ResponseChunk(ToServerResponseChunk {
                        body: ASCII[..a as usize % 40].to_vec(),
                        finish: kind & 4 != 0,
                    }),
                    _ => ToServerTunnelMessageKind::ResponseAbort,
                };
                self.runner_send(c, i, tunnel(req, 1, k), kind & 8 != 0);
            }
            op::RUNNER_OTHER => {
                let (r, kind, a) = (inp.u8(), inp.u8(), inp.u8());
                let garbage: Vec<u8> = if kind % 12 == 5 {
                    (0..1 + a % 8).map(|_| inp.u8()).collect()
                } else {
                    Vec::new()
                };
                let Some((c, i)) = self.pick_runner(r) else {
                    return 0;
                };
                let direct = kind & 16 != 0;
                let msg = match kind % 12 {
                    0 => ToServer::Pong(ToServerPong {
                        ts: 1_700_000_000_000 + i64::from(a),
                    }),
                    1 => ToServer::Pong(ToServerPong {
                        ts: -1 - i64::from(a),
                    }),
                    2 => ToServer::Stopping,
                    3 => ToServer::Events(vec![]),
                    4 => ToServer::AckCommands(ToServerAckCommands {
                        last_command_checkpoints: vec![],
                    }),
                    5 => {
                        self.runner_send(c, i, garbage, direct);
                        return 0;
                    }
                    6 => {
                        let ev = WsEvent::Message {
                            text: true,
                            data: ascii(a as usize % 20),
                        };
                        self.runner_frame(c, i, ev);
                        return 0;
                    }
                    7 => {
                        self.runner_frame(c, i, WsEvent::Ping(ascii(a as usize % 126)));
                        return 0;
                    }
                    8 => {
                        self.runner_frame(c, i, WsEvent::Pong(Bytes::new()));
                        return 0;
                    }
                    9 => {
                        let code = (a & 1 == 0).then_some(1000);
                        let ev = WsEvent::Close {
                            code,
                            reason: Bytes::new(),
                        };
                        self.runner_frame(c, i, ev);
                        return 0;
                    }
                    10 => {
                        let r = &self.cores[c].runners[i];
                        if r.reader == Reader::Running {
                            let id = r.id;
                            let next = self.cores[c].gw.runner_protocol_error(
                                id,
                                Reason::WsProtocolError,
                                now,
                            );
                            assert_eq!(next, Next::Stop);
                            self.cores[c].runners[i].reader = Reader::Stopped;
                        }
                        return 0;
                    }
                    _ => {
                        self.runner_send(c, i, init_message(), direct);
                        return 0;
                    }
                };
                self.runner_send(c, i, encode_to_server(&msg), direct);
            }
            op::CLIENT_FRAME => {
                let (p, kind, a) = (inp.u8(), inp.u8(), inp.u8());
                if let Some((c, i)) =
                    self.pick_client(p, |m| !m.opening && m.reader == Reader::Running)
                {
                    self.client_frame(c, i, kind, a);
                }
            }
            op::CLIENT_READ => {
                let p = inp.u8();
                if let Some((c, i)) = self.pick_client(p, |m| {
                    !m.opening && matches!(m.reader, Reader::Running | Reader::Closed)
                }) {
                    let id = self.cores[c].clients[i].id;
                    assert!(
                        self.cores[c].gw.client_read(id),
                        "client_read on a live client"
                    );
                }
            }
            op::CLIENT_END => {
                // A parked reader does not read, so it cannot see its socket end.
                let p = inp.u8();
                if let Some((c, i)) =
                    self.pick_client(p, |m| !m.opening && !matches!(m.reader, Reader::Parked(_)))
                {
                    self.client_end(c, i);
                }
            }
            op::RUNNER_END => {
                let r = inp.u8();
                if let Some((c, i)) = self.pick_runner(r) {
                    self.runner_end(c, i);
                }
            }
            op::HTTP_STEP => {
                let p = inp.u8();
                let all: Vec<(usize, usize)> = self
                    .cores
                    .iter()
                    .enumerate()
                    .flat_map(|(c, core)| (0..core.requests.len()).map(move |i| (c, i)))
                    .collect();
                if all.is_empty() {
                    return 0;
                }
                let (c, i) = all[p as usize % all.len()];
                let core = &mut self.cores[c];
                let m = &mut core.requests[i];
                if p & 0x80 != 0 {
                    let id = m.id;
                    if core.gw.upload_room(id) == torpor::gateway::UploadRoom::Room {
                        let piece = ascii(p as usize % 50);
                        core.gw.request_body(id, piece, p & 0x40 != 0, now);
                    }
                    return 0;
                }
                if !std::mem::take(&mut m.woken) {
                    return 0;
                }
                let id = m.id;
                match core.gw.take_http_outcome(id) {
                    Some(_) => {
                        core.gw.end_request(id, now);
                        core.requests.remove(i);
                        self.gone(c, id);
                    }
                    None => assert!(core.gw.contains(id), "an HTTP request vanished"),
                }
            }
            op::HANDSHAKE => {
                let (p, fail) = (inp.u8(), inp.u8());
                let Some((c, i)) = self.pick_client(p, |m| m.opening) else {
                    return 0;
                };
                let core = &mut self.cores[c];
                let m = &mut core.clients[i];
                if !std::mem::take(&mut m.woken) {
                    return 0;
                }
                let id = m.id;
                match core.gw.open_phase(id) {
                    Some(OpenPhase::Waiting) => {}
                    Some(OpenPhase::Accepted) if fail & 1 != 0 => self.client_end(c, i),
                    Some(OpenPhase::Accepted) => {
                        core.gw.client_upgraded(id);
                        m.opening = false;
                        m.reader = Reader::Running;
                        m.permit = false;
                        m.wire.start();
                    }
                    Some(OpenPhase::Refused(_)) => {
                        core.gw.client_refused(id);
                        let m = core.clients.remove(i);
                        self.pump_core(c, false);
                        self.gone(c, id);
                        self.record_forgotten(c, &m);
                    }
                    other => panic!("open phase {other:?} of a client in its open exchange"),
                }
            }
            op::WRITER => {
                let (p, max) = (inp.u8(), inp.u8());
                let all: Vec<(usize, ConnPick)> = self
                    .cores
                    .iter()
                    .enumerate()
                    .flat_map(|(c, core)| {
                        (0..core.clients.len())
                            .map(move |i| (c, ConnPick::Client(i)))
                            .chain((0..core.runners.len()).map(move |i| (c, ConnPick::Runner(i))))
                    })
                    .collect();
                if !all.is_empty() {
                    let (c, pick) = all[p as usize % all.len()];
                    self.writer_step(c, pick, max);
                }
            }
            op::DELIVER => {
                let (c, n) = (self.core(inp.u8()), inp.u8());
                for _ in 0..1 + n % 8 {
                    if !self.deliver_one(c) {
                        break;
                    }
                }
            }
            op::CONTROL => {
                let a = inp.u8();
                self.control_step(a);
            }
            op::INJECT => {
                let (t, kind, a, b) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
                self.inject(t, kind, a, b);
            }
            op::ASK => {
                let (c, t) = (self.core(inp.u8()), inp.u8());
                if self.cores[c].draining {
                    return 0;
                }
                let ai = actor(t);
                let core = &mut self.cores[c];
                let w = core.gw.ask(
                    |waiter| ControlMsg::Resolve {
                        actor_id: ACTORS[ai].into(),
                        waiter,
                    },
                    Duration::from_millis(1 + u64::from(t)),
                    now,
                );
                assert!(core.waiters.insert(w), "waiter id {w:#x} handed out twice");
            }
            op::TICK => {
                let ms = inp.u8();
                self.now += Duration::from_millis(u64::from(ms));
                return self.timers(false);
            }
            op::JUMP => {
                let a = inp.u8();
                let d = if a < 250 {
                    Duration::from_secs(1 + u64::from(a))
                } else {
                    Duration::from_secs(3600 * u64::from(a - 249))
                };
                self.now += d;
                return self.timers(false);
            }
            _ => {
                let (c, k) = (self.core(inp.u8()), inp.u8());
                let core = &mut self.cores[c];
                match k % 4 {
                    0 => core.gw.idle_scan(now),
                    1 => {
                        let _ = core.gw.drain_idle();
                        let _ = core.gw.has_open_websockets();
                    }
                    2 => {
                        core.draining = true;
                        core.gw.shutdown(now);
                    }
                    _ => {
                        core.gw.handle_timeout(now);
                        return 1 << c;
                    }
                }
            }
        }
        0
    }

    /// What the shells do with the cores' outputs (the timer bits `ran` name cores whose
    /// timer task just ran `handle_timeout` and asks `poll_timeout` anyway).
    fn pump(&mut self, ran: u8) {
        for c in 0..self.cores.len() {
            self.pump_core(c, ran & (1 << c) != 0);
        }
    }

    /// [`Self::pump`] for one core (`timed`: its timer task just ran `handle_timeout`).
    fn pump_core(&mut self, c: usize, timed: bool) {
        let n = self.cores.len();
        // As the shell does after every call while the shard drains.
        if self.cores[c].gw.draining() {
            let now = self.now;
            self.cores[c].note_drain();
            self.cores[c].gw.drain_step(now);
            self.cores[c].note_drain();
        }
        {
            let mut rearm = false;
            while let Some(o) = self.cores[c].gw.poll_output() {
                match o {
                    Output::Flush(id) => {
                        self.assert_issued(c, id, "Flush");
                        let core = &mut self.cores[c];
                        if let Some(m) = core.clients.iter_mut().find(|m| m.id == id) {
                            m.wire.notify();
                        } else if let Some(m) = core.runners.iter_mut().find(|m| m.id == id) {
                            m.wire.notify();
                        }
                    }
                    Output::Wake(id) => {
                        self.assert_issued(c, id, "Wake");
                        self.wake(c, id);
                    }
                    Output::Reset(id) => {
                        self.assert_issued(c, id, "Reset");
                        if let Some(q) = self.cores[c].gw.out_queue(id) {
                            assert!(q.is_aborted(), "Reset of a connection not aborted");
                        }
                    }
                    Output::ToShard(to, msg) => {
                        let to = to as usize;
                        assert!(to < n && to != c, "core {c} sends to shard {to} of {n}");
                        match &msg {
                            ShardMsg::ToRunner { conn, .. }
                            | ShardMsg::ToRunnerInline { conn, .. } => {
                                assert_eq!(
                                    self.cores[to].issued.get(conn),
                                    Some(&Kind::Runner),
                                    "frames for shard {to}'s {conn:?}, \
                                     not a runner connection it made"
                                );
                            }
                            ShardMsg::Tunnel { key, .. } => {
                                assert_eq!(
                                    key.shard as usize, to,
                                    "tunnel traffic for another shard"
                                )
                            }
                            _ => {}
                        }
                        self.mailboxes[to].push_back(msg);
                    }
                    Output::ToNode(..) => panic!("core {c} of one node sends to another node"),
                    Output::ToControl(msg) => {
                        match &*msg {
                            ControlMsg::RunnerInit { conn, .. }
                            | ControlMsg::RunnerMsg { conn, .. }
                            | ControlMsg::RunnerClosed { conn } => {
                                assert_eq!(conn.shard as usize, c, "a runner of another shard");
                                assert_eq!(
                                    self.cores[c].issued.get(&id_of(*conn)),
                                    Some(&Kind::Runner),
                                    "runner news about a connection that is not a runner"
                                );
                            }
                            ControlMsg::Hibernating { req, keep, .. } => {
                                if *keep {
                                    self.records.insert(req.request_id);
                                } else {
                                    self.records.remove(&req.request_id);
                                }
                                assert_eq!(req.gateway_id, GW);
                                assert!(
                                    self.reqs.get(&req.request_id).is_some_and(|e| e.0),
                                    "a record of a request id no client had"
                                );
                            }
                            _ => {}
                        }
                        self.control.push_back((c, *msg));
                    }
                    Output::Reply(w, _) => {
                        assert!(
                            self.cores[c].waiters.remove(&w),
                            "reply to waiter {w:#x}, which is not waiting"
                        );
                    }
                    Output::Rearm => rearm = true,
                    Output::Drained => {
                        let core = &self.cores[c];
                        assert!(core.draining, "Drained without a Shutdown");
                        assert_eq!(core.gw.drain_phase(), DrainPhase::Drained);
                        if core.gw.has_open_websockets() {
                            let closing = core
                                .closing_until
                                .expect("drained with WebSockets open and no close phase");
                            assert!(
                                self.now >= closing,
                                "drained with WebSockets open before the close deadline"
                            );
                        }
                    }
                }
            }
            let core = &mut self.cores[c];
            let next = core
                .gw
                .poll_timeout()
                .expect("a core always has a deadline");
            if !rearm && !timed {
                assert!(
                    next >= core.sleep,
                    "a deadline earlier than the one the shell sleeps until was set without Rearm"
                );
            }
            core.sleep = next;
        }
    }

    fn assert_issued(&self, c: usize, id: ConnId, what: &str) {
        assert!(
            self.cores[c].issued.contains_key(&id),
            "{what} names {id:?}, which core {c} never issued"
        );
    }

    /// `Wake` for a connection: the task waiting on it looks again.
    fn wake(&mut self, c: usize, id: ConnId) {
        let shell = self.shell;
        let core = &mut self.cores[c];
        if let Some(m) = core.clients.iter_mut().find(|m| m.id == id) {
            if m.opening {
                m.woken = true;
                return;
            }
            match m.reader {
                Reader::Parked(Pause::Unread) if shell == Shell::Net => {
                    if !core.gw.client_out_full(id) {
                        m.reader = Reader::Running;
                    }
                }
                Reader::Parked(_) => m.reader = Reader::Running,
                _ => m.permit = true,
            }
        } else if let Some(m) = core.requests.iter_mut().find(|m| m.id == id) {
            m.woken = true;
        }
    }

    /// The models' state, for `GATEWAY_CORE_TRACE`.
    fn trace(&mut self) {
        for (c, core) in self.cores.iter_mut().enumerate() {
            for m in &core.clients {
                let (phase, state, parked) = match core.gw.kind(m.id) {
                    Some(ConnKind::Client(cc)) => {
                        (cc.open.clone(), cc.socket.state(), cc.reader_parked)
                    }
                    _ => continue,
                };
                let q = core.gw.out_queue(m.id).expect("live");
                eprintln!(
                    "  core {c} client {:?}: {phase:?} {state:?} reader {:?} \
                     (core parked {parked}, permit {}) writer {:?} queued {} closing {}",
                    m.id,
                    m.reader,
                    m.permit,
                    m.wire.state,
                    q.queued_bytes(),
                    q.is_closing()
                );
            }
            for m in &core.runners {
                let q = core.gw.out_queue(m.id).expect("live");
                eprintln!(
                    "  core {c} runner {:?}: reader {:?} writer {:?} queued {} closing {}",
                    m.id,
                    m.reader,
                    m.wire.state,
                    q.queued_bytes(),
                    q.is_closing()
                );
            }
            for m in &core.requests {
                eprintln!("  core {c} request {:?} woken {}", m.id, m.woken);
            }
        }
    }

    /// What must hold after every step.
    fn check(&mut self) {
        let (mut hib, mut open, mut paused, mut pb, mut pm, mut runners) = (0, 0, 0, 0, 0, 0);
        let strict = self.strict;
        for (c, core) in self.cores.iter_mut().enumerate() {
            core.gw.check_invariants();
            for m in core.clients.iter_mut() {
                let id = m.id;
                let Some(ConnKind::Client(cc)) = core.gw.kind(id) else {
                    panic!("client {id:?} of core {c} is gone or not a client");
                };
                let state = cc.socket.state();
                let hibernating = cc.hibernation.is_some();
                let record = cc.record_refresh_at.is_some();
                let phase = cc.open.clone();
                let reader_parked = cc.reader_parked;
                hib += i64::from(hibernating);
                open += i64::from(matches!(phase, OpenPhase::Accepted | OpenPhase::Open));
                paused += i64::from(cc.socket.is_paused());
                pb += cc.socket.pending_bytes() as i64;
                pm += cc.socket.pending_len() as i64;
                if hibernating {
                    assert_eq!(
                        state,
                        SocketState::Detached,
                        "a hibernating socket is detached"
                    );
                    assert!(cc.socket.is_hibernatable());
                }
                let q = core.gw.out_queue(id).expect("a live client has a queue");
                if q.is_closing() && m.opening {
                    m.closed_in_open = true;
                }
                if q.is_closing() {
                    assert_eq!(
                        state,
                        SocketState::Closed,
                        "a client closing with its socket {state:?}"
                    );
                    assert!(!hibernating, "a closing client hibernates");
                    // The drain keeps hibernatable sockets' records on purpose (a restart
                    // can still list them), including one whose runner accepted it after the
                    // drain closed it mid-open; otherwise every close forgets the record.
                    let tolerated = core.draining || (!strict && m.closed_in_open);
                    assert!(
                        !record || tolerated,
                        "client {id:?} is closing and keeps its engine record (refreshed, never \
                         forgotten)"
                    );
                }
                if m.opening {
                    assert!(
                        m.woken || phase == OpenPhase::Waiting,
                        "client {id:?}: open exchange ended ({phase:?}) without Wake"
                    );
                } else {
                    assert_eq!(phase, OpenPhase::Open, "an upgraded client's phase");
                }
                if let Reader::Parked(p) = m.reader {
                    assert!(
                        m.permit || reader_parked,
                        "client {id:?}: lost wake-up: the reader waits ({p:?}) but the core no \
                         longer marks it parked, so no Wake will come"
                    );
                }
                lost_flush(&m.wire, q, id);
            }
            for m in &core.runners {
                runners += 1;
                assert!(
                    matches!(core.gw.kind(m.id), Some(ConnKind::Runner(_))),
                    "runner {:?} of core {c} is gone",
                    m.id
                );
                let q = core.gw.out_queue(m.id).expect("a live runner has a queue");
                lost_flush(&m.wire, q, m.id);
            }
            for m in &core.requests {
                let Some(ConnKind::Request(r)) = core.gw.kind(m.id) else {
                    panic!("request {:?} of core {c} is gone", m.id);
                };
                if matches!(r.phase, RequestPhase::Answered(Some(_))) {
                    assert!(m.woken, "request {:?} answered without Wake", m.id);
                }
            }
        }
        let g = |x| self.metrics.gauge(x);
        assert_eq!(g(Gauge::PendingBytes), pb, "pending bytes gauge");
        assert_eq!(g(Gauge::PendingMessages), pm, "pending messages gauge");
        assert_eq!(g(Gauge::HibernatingWebSockets), hib, "hibernating gauge");
        assert_eq!(
            g(Gauge::OpenClientWebSockets),
            open,
            "open client WebSockets gauge"
        );
        assert_eq!(
            g(Gauge::PausedClientWebSockets),
            paused,
            "paused client WebSockets gauge"
        );
        assert_eq!(
            g(Gauge::RunnersConnected),
            runners,
            "runners connected gauge"
        );
    }

    /// The end: mailboxes drained and the clock past every deadline, every question is
    /// answered, every open exchange settled, every HTTP request has its outcome.
    fn finish(&mut self) {
        for _ in 0..3 {
            self.drain_mailboxes();
            self.now += Duration::from_secs(86_400);
            let ran = self.timers(true);
            self.pump(ran);
            self.check();
        }
        self.drain_mailboxes();
        for (c, core) in self.cores.iter_mut().enumerate() {
            assert!(
                core.waiters.is_empty(),
                "core {c}: questions never answered: {:?}",
                core.waiters
            );
            for m in &core.clients {
                assert_ne!(
                    core.gw.open_phase(m.id),
                    Some(OpenPhase::Waiting),
                    "an open exchange outlived its deadline"
                );
            }
            for m in &core.requests {
                assert!(
                    matches!(
                        core.gw.kind(m.id),
                        Some(ConnKind::Request(r))
                            if matches!(r.phase, RequestPhase::Answered(_) | RequestPhase::Streaming(_))
                    ),
                    "an HTTP request outlived its deadline unanswered (a streamed response has its idle bound instead)"
                );
            }
            for id in &core.removed {
                assert!(!core.gw.contains(*id), "a removed connection came back");
            }
        }
    }

    fn drain_mailboxes(&mut self) {
        for _ in 0..100_000 {
            let Some(c) = (0..self.mailboxes.len()).find(|c| !self.mailboxes[*c].is_empty()) else {
                return;
            };
            self.deliver_one(c);
            self.pump(0);
            self.check();
        }
        panic!("the shards keep sending each other messages");
    }
}

/// A writer waiting for `Flush` while its queue holds bytes would never write them.
fn lost_flush(wire: &Wire, q: &mut torpor::gateway::OutQueue, id: ConnId) {
    if wire.state == WState::Waiting && !wire.permit && !q.is_empty() && !q.is_aborted() {
        panic!(
            "{id:?}: lost Flush: {} bytes queued, writer waiting",
            q.queued_bytes()
        );
    }
}

/// Parses what a writer put on the wire, as the peer would.
fn parse_wire(wire: &mut Wire, runner: bool, reqs: &HashMap<[u8; 4], (bool, bool)>) {
    loop {
        let ev = match wire.parser.next(&mut wire.buf) {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => panic!(
                "the gateway wrote malformed frames ({} {})",
                e.code, e.reason
            ),
        };
        match ev {
            WsEvent::Close { .. } => wire.closed = true,
            WsEvent::Message { text, data } if runner => {
                assert!(!text, "a text message to a runner");
                let msg = decode_to_client(&data)
                    .unwrap_or_else(|e| panic!("a runner message that does not decode: {e}"));
                if let ToClient::TunnelMessage(t) = msg {
                    assert_eq!(t.message_id.gateway_id, GW);
                    let (client, request) = reqs
                        .get(&t.message_id.request_id)
                        .copied()
                        .unwrap_or_else(|| {
                            panic!(
                                "tunnel message for request id {:?}, never issued",
                                t.message_id.request_id
                            )
                        });
                    let for_client = matches!(
                        t.message_kind,
                        ToClientTunnelMessageKind::WebSocketOpen(_)
                            | ToClientTunnelMessageKind::WebSocketMessage(_)
                            | ToClientTunnelMessageKind::WebSocketClose(_)
                    );
                    assert!(
                        if for_client { client } else { request },
                        "{:?} for a request id that named no such request",
                        t.message_kind
                    );
                }
            }
            _ => {}
        }
    }
}
