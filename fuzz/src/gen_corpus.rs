//! Writes the seed corpora under `fuzz/corpus/<target>/` (run from `fuzz/`:
//! `cargo run --bin gen_corpus`). Seeds are small, valid or nearly valid inputs that take
//! each target deep into its parser. It must stay deterministic so the checked-in files only
//! change when the generator does.

use std::fs;
use std::path::Path;

#[path = "checks.rs"]
#[allow(dead_code)]
mod checks;

use torpor::protocol::hot::{
    encode_ws_ack_to_server, encode_ws_message_prefix_to_server, ws_message_trailer,
};
use torpor::protocol::{
    encode_to_server, ToServer, ToServerAckCommands, ToServerInit, ToServerPong,
};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One client frame (masked), payload under 126 bytes or with a 16-bit length.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// Two leading bytes seed the read-boundary split of the ws and http targets.
fn with_seed(seed: [u8; 2], body: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    out.extend_from_slice(body);
    out
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    fs::write(dir.join(name), data).expect("write seed");
}

fn ws() {
    let t = "ws_reader";
    write(
        t,
        "text_hello",
        &with_seed([0, 3], &frame(true, 1, b"hello")),
    );
    let mut frag = frame(false, 2, b"abc");
    frag.extend(frame(true, 9, b"p")); // ping between fragments
    frag.extend(frame(true, 0, b"de"));
    write(t, "binary_fragmented_ping", &with_seed([1, 7], &frag));
    // "é€" split inside both characters across three fragments.
    let s = "é€".as_bytes();
    let mut utf = frame(false, 1, &s[..1]);
    utf.extend(frame(false, 0, &s[1..3]));
    utf.extend(frame(true, 0, &s[3..]));
    write(t, "text_utf8_split", &with_seed([2, 1], &utf));
    let mut close = frame(true, 10, b"");
    close.extend(frame(true, 8, &[0x03, 0xe8, b'b', b'y', b'e']));
    close.extend(frame(true, 1, b"after close"));
    write(t, "pong_close_then_data", &with_seed([3, 5], &close));
    write(
        t,
        "frame_over_limit",
        &with_seed([4, 2], &frame(true, 2, &[7u8; 70])),
    );
    let mut big = Vec::new();
    for i in 0..5 {
        big.extend(frame(i == 4, if i == 0 { 2 } else { 0 }, &[i; 60]));
    }
    write(t, "message_over_limit", &with_seed([5, 9], &big));
    write(
        t,
        "invalid_utf8",
        &with_seed([6, 0], &frame(true, 1, &[0xc3, 0x28])),
    );
    let mut unmasked = frame(true, 1, b"x");
    unmasked[1] &= 0x7f;
    write(t, "unmasked", &with_seed([7, 4], &unmasked));
}

fn http() {
    let t = "http_head";
    let upgrade = b"GET /gateway/actor-1/ws?x=1 HTTP/1.1\r\nHost: localhost\r\n\
Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: rivet, rivet_target.actor\r\n\r\n";
    write(t, "ws_upgrade", &with_seed([0, 5], upgrade));
    let chunked = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    write(t, "post_chunked", &with_seed([1, 3], chunked));
    let length = b"PUT /kv HTTP/1.0\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nbody";
    write(t, "put_content_length", &with_seed([2, 8], length));
    let smuggle =
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    write(t, "te_and_cl", &with_seed([3, 1], smuggle));
    write(
        t,
        "chunked_only",
        &with_seed([4, 4], b"4\r\nwiki\r\n0\r\n\r\n"),
    );
}

fn protocol() {
    let t = "protocol_to_server";
    write(t, "stopping", &encode_to_server(&ToServer::Stopping));
    write(
        t,
        "pong",
        &encode_to_server(&ToServer::Pong(ToServerPong { ts: 1_700_000 })),
    );
    let init = ToServer::Init(ToServerInit {
        name: "runner".into(),
        version: 1,
        total_slots: 100,
        prepopulate_actor_names: None,
        metadata: None,
    });
    write(t, "init", &encode_to_server(&init));
    write(
        t,
        "events_empty",
        &encode_to_server(&ToServer::Events(vec![])),
    );
    let ack = ToServer::AckCommands(ToServerAckCommands {
        last_command_checkpoints: vec![],
    });
    write(t, "ack_commands", &encode_to_server(&ack));
    for (name, binary) in [("ws_message_text", false), ("ws_message_binary", true)] {
        let payload = b"hello runner";
        let prefix = encode_ws_message_prefix_to_server([1, 2, 3, 4], [5, 6, 7, 8], 65535, 12);
        let mut wire = prefix.as_bytes().to_vec();
        wire.extend_from_slice(payload);
        wire.extend_from_slice(&ws_message_trailer(binary));
        write(t, name, &wire);
    }
    write(
        t,
        "ws_ack",
        &encode_ws_ack_to_server([1, 2, 3, 4], [5, 6, 7, 8], 3, 0xabcd),
    );
    let mut truncated = encode_ws_ack_to_server([1, 2, 3, 4], [5, 6, 7, 8], 3, 1).to_vec();
    truncated.pop();
    write(t, "ws_ack_truncated", &truncated);
}

fn tunnel() {
    let t = "tunnel_socket";
    // flags: bit0 open, bit1 start near the index wrap, bit2 hibernatable.
    // ops (pairs): 0/1 msg(len) | 2 ack(delta) | 3 detach(cause) | 4 attach | 5 time(arg*20ms)
    //              | 6 close | 7 open(arg&1 hibernatable)
    write(t, "hib_send_ack", &[5, 0, 10, 0, 20, 2, 0, 2, 1]);
    write(
        t,
        "hib_fill_pause_resume",
        &[5, 0, 30, 0, 30, 0, 30, 0, 30, 2, 0, 2, 1],
    );
    write(
        t,
        "hib_detach_hold_replay_wrap",
        &[7, 0, 8, 3, 0, 0, 8, 0, 8, 0, 8, 4, 0, 2, 1, 4, 0, 2, 2],
    );
    write(t, "ack_timeout", &[5, 0, 8, 5, 40, 5, 20]);
    write(t, "not_hibernatable_detach", &[1, 0, 8, 0, 8, 3, 0, 0, 8]);
    write(t, "opening_then_open", &[0, 0, 8, 7, 1, 0, 8, 6, 0, 0, 8]);
    write(
        t,
        "over_global_cap",
        &[5, 0, 70, 0, 70, 0, 70, 2, 0, 2, 1, 2, 2],
    );
}

/// A `gateway_core` input: a flags byte, then (op, args…) steps (see `op` in gateway_core.rs).
struct Steps(Vec<u8>);

impl Steps {
    /// flags: bit 0 two shards, bit 7 the documented paused reader instead of src/net's; all
    /// of it seeds the cores' jitter.
    fn new(flags: u8) -> Steps {
        Steps(vec![flags])
    }

    fn op(mut self, code: u8, args: &[u8]) -> Steps {
        self.0.push(code);
        self.0.extend_from_slice(args);
        self
    }

    /// Runner 0 (the first runner connection made) sends Init and the control plane attaches
    /// it as runner index 0 on every shard.
    fn attach_first_runner(self, shards: u8) -> Steps {
        use checks::gateway_op::*;
        let mut s = self.op(RUNNER_INIT, &[0]).op(CONTROL, &[0]);
        for c in 0..shards {
            s = s.op(DELIVER, &[c, 7]);
        }
        s
    }
}

fn gateway() {
    use checks::gateway_op::*;
    let t = "gateway_core";
    // Writer picks: core 0's clients, core 0's runners, core 1's clients, core 1's runners.
    // A client on shard 0, its runner on shard 1: open, accept (hibernatable), messages both
    // ways across the mailboxes, an ack, the client's close and its handshake.
    let s = Steps::new(1)
        .op(RUNNER_CONNECT, &[1])
        .attach_first_runner(2)
        .op(OPEN_CLIENT, &[0, 0, 0, 0, 1])
        .op(DELIVER, &[1, 7])
        .op(WRITER, &[1, 3])
        .op(WRITER, &[1, 3])
        .op(RUNNER_WS, &[0, 0, 5, 1, 0])
        .op(DELIVER, &[0, 7])
        .op(HANDSHAKE, &[0, 0])
        .op(CLIENT_FRAME, &[0, 1, 10])
        .op(CLIENT_FRAME, &[0, 0, 30])
        .op(DELIVER, &[1, 7])
        .op(WRITER, &[1, 3])
        .op(WRITER, &[1, 3])
        .op(RUNNER_WS, &[0, 0, 3, 0, 0])
        .op(RUNNER_WS, &[0, 0, 1, 20, 1])
        .op(RUNNER_WS, &[0, 0, 2, 5, 2])
        .op(DELIVER, &[0, 7])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(CLIENT_FRAME, &[0, 3, 4])
        .op(CLIENT_FRAME, &[0, 5, 0])
        .op(DELIVER, &[1, 7])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(RUNNER_WS, &[0, 0, 6, 1, 0])
        .op(DELIVER, &[0, 7])
        .op(TICK, &[40])
        .op(CLIENT_END, &[0]);
    write(t, "ws_two_shards", &s.0);

    // HTTP: a streamed response in two chunks, then one that times out, on one shard.
    let s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .attach_first_runner(1)
        .op(START_REQUEST, &[0, 0, 0, 0, 10])
        .op(RUNNER_HTTP, &[0, 0, 1, 5])
        .op(RUNNER_HTTP, &[0, 0, 2, 10])
        .op(RUNNER_HTTP, &[0, 0, 6, 10])
        .op(HTTP_STEP, &[0])
        .op(START_REQUEST, &[0, 1, 0, 0, 0])
        .op(RUNNER_HTTP, &[0, 1, 1, 70])
        .op(RUNNER_HTTP, &[0, 1, 2, 39])
        .op(RUNNER_HTTP, &[0, 1, 2, 39])
        .op(HTTP_STEP, &[0])
        .op(START_REQUEST, &[0, 2, 0, 0, 3])
        .op(TICK, &[100])
        .op(HTTP_STEP, &[0])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3]);
    write(t, "http_stream_and_timeout", &s.0);

    // A hibernatable client fills its window (pause), the actor hands it back (hibernate),
    // the client's message asks for a wake, the actor runs again and the window replays.
    let s = Steps::new(1)
        .op(RUNNER_CONNECT, &[1])
        .attach_first_runner(2)
        .op(INSERT_CLIENT, &[0, 0, 0, 1, 1])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(DELIVER, &[1, 7])
        .op(RUNNER_WS, &[0, 0, 3, 0, 0])
        .op(DELIVER, &[0, 7])
        .op(CLIENT_FRAME, &[0, 1, 20])
        .op(RUNNER_WS, &[0, 0, 6, 1, 1])
        .op(DELIVER, &[0, 7])
        .op(INJECT, &[1, 3, 0, 0])
        .op(DELIVER, &[0, 7])
        .op(RUNNER_WS, &[0, 0, 3, 1, 0])
        .op(DELIVER, &[0, 7])
        .op(CONTROL, &[0])
        .op(CONTROL, &[0])
        .op(CONTROL, &[0])
        .op(DELIVER, &[0, 7])
        .op(DELIVER, &[1, 7])
        .op(WRITER, &[1, 3])
        .op(WRITER, &[1, 3])
        .op(RUNNER_WS, &[0, 0, 3, 3, 0])
        .op(DELIVER, &[0, 7])
        .op(TICK, &[250])
        .op(TICK, &[250]);
    write(t, "hibernate_wake_replay", &s.0);

    // The runner goes: its connection ends, the control plane detaches it and later calls it
    // lost; a non-hibernatable client closes, a hibernatable one hibernates until its limit.
    let s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .attach_first_runner(1)
        .op(INSERT_CLIENT, &[0, 0, 0, 1, 0])
        .op(INSERT_CLIENT, &[0, 1, 0, 1, 1])
        .op(CLIENT_FRAME, &[1, 1, 8])
        .op(RUNNER_END, &[0])
        .op(CONTROL, &[0])
        .op(CONTROL, &[0])
        .op(DELIVER, &[0, 7])
        .op(INJECT, &[0, 2, 0, 0])
        .op(DELIVER, &[0, 7])
        .op(CLIENT_FRAME, &[1, 1, 8])
        .op(RUNNER_CONNECT, &[0])
        .op(RUNNER_INIT, &[0])
        .op(CONTROL, &[0])
        .op(CONTROL, &[0])
        .op(DELIVER, &[0, 7])
        .op(JUMP, &[1]);
    write(t, "runner_lost", &s.0);

    // A client that does not read: three messages put it past half of client_outbound_bytes,
    // its reader pauses (Unread), and the writer drains the queue one chunk per turn.
    let s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .op(RUNNER_INIT, &[0])
        .op(INJECT, &[0, 0, 0, 0])
        .op(DELIVER, &[0, 0])
        .op(INSERT_CLIENT, &[0, 0, 0, 1, 0])
        .op(RUNNER_WS, &[0, 0, 1, 99, 0])
        .op(RUNNER_WS, &[0, 0, 1, 99, 0])
        .op(RUNNER_WS, &[0, 0, 1, 99, 0])
        .op(CLIENT_FRAME, &[0, 1, 5])
        .op(WRITER, &[0, 0])
        .op(WRITER, &[0, 0])
        .op(WRITER, &[0, 0])
        .op(WRITER, &[0, 0])
        .op(WRITER, &[0, 0])
        .op(WRITER, &[0, 0])
        .op(CLIENT_FRAME, &[0, 1, 5])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(CLIENT_FRAME, &[0, 1, 5]);
    write(t, "client_unread_pause", &s.0);
    // The same with the reader that asks `client_paused` again after each wake-up.
    let mut contract = s.0.clone();
    contract[0] = 0x80;
    write(t, "client_unread_pause_contract_reader", &contract);

    // Deadlines: an open never answered, a question never answered, a runner that never
    // sends Init, and close handshakes that time out into resets.
    let s = Steps::new(2)
        .op(RUNNER_CONNECT, &[0])
        .op(RUNNER_CONNECT, &[0])
        .op(RUNNER_INIT, &[0])
        .op(CONTROL, &[0])
        .op(DELIVER, &[0, 7])
        .op(OPEN_CLIENT, &[0, 0, 0, 0, 0])
        .op(ASK, &[0, 20])
        .op(TICK, &[45])
        .op(HANDSHAKE, &[0, 0])
        .op(TICK, &[30])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[1, 3])
        .op(WRITER, &[1, 3])
        .op(TICK, &[100])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[1, 3])
        .op(RUNNER_OTHER, &[0, 0, 0])
        .op(JUMP, &[3]);
    write(t, "deadlines", &s.0);

    // The drain: a request, a client and a runner when Shutdown comes; the client answers
    // the 1001 close.
    let s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .attach_first_runner(1)
        .op(INSERT_CLIENT, &[0, 0, 0, 1, 1])
        .op(START_REQUEST, &[0, 0, 0, 0, 4])
        .op(INJECT, &[0, 8, 0, 0])
        .op(MISC, &[0, 1])
        .op(INJECT, &[1, 9, 0, 0])
        .op(DELIVER, &[0, 7])
        .op(MISC, &[0, 1])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(CLIENT_FRAME, &[0, 5, 0])
        .op(HTTP_STEP, &[0])
        .op(RUNNER_OTHER, &[0, 9, 0]);
    write(t, "shutdown_drain", &s.0);

    // The drain closes a client whose open exchange still waits; then its runner accepts it.
    let s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .attach_first_runner(1)
        .op(OPEN_CLIENT, &[0, 0, 0, 0, 1])
        .op(MISC, &[0, 2])
        .op(RUNNER_WS, &[0, 0, 5, 1, 0])
        .op(HANDSHAKE, &[0, 0])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(WRITER, &[0, 3])
        .op(CLIENT_FRAME, &[0, 5, 0]);
    write(t, "drain_during_open", &s.0);

    // The runner sends four messages before answering WebSocketOpen: the client, which has no
    // writer yet, is aborted as too slow while its open exchange waits; the runner's
    // WebSocketOpen then accepts it anyway (the known bug `gateway_core_strict` fails on).
    let mut s = Steps::new(0)
        .op(RUNNER_CONNECT, &[0])
        .attach_first_runner(1)
        .op(OPEN_CLIENT, &[0, 0, 0, 0, 1]);
    for _ in 0..4 {
        s = s.op(RUNNER_WS, &[0, 0, 1, 99, 0]);
    }
    let s = s.op(RUNNER_WS, &[0, 0, 5, 1, 0]).op(HANDSHAKE, &[0, 1]);
    write(t, "record_after_close_in_open", &s.0);

    // What a runner may send that makes no sense: garbage, text, fences, stray ids, a
    // second Init, a ping, and acks for nobody.
    let s = Steps::new(1)
        .op(RUNNER_CONNECT, &[0])
        .op(RUNNER_CONNECT, &[1])
        .op(RUNNER_OTHER, &[0, 5, 3, 1, 2, 3, 4])
        .op(RUNNER_INIT, &[0])
        .op(RUNNER_INIT, &[1])
        .op(CONTROL, &[0])
        .op(CONTROL, &[0])
        .op(DELIVER, &[0, 7])
        .op(DELIVER, &[1, 7])
        .op(OPEN_CLIENT, &[1, 0, 0, 0, 1])
        .op(RUNNER_WS, &[1, 255, 0, 9, 9])
        .op(RUNNER_WS, &[0, 0, 5, 0, 0])
        .op(RUNNER_WS, &[1, 0, 7, 5, 5])
        .op(RUNNER_OTHER, &[1, 1, 7])
        .op(RUNNER_OTHER, &[1, 7, 9])
        .op(RUNNER_OTHER, &[1, 11, 0])
        .op(RUNNER_OTHER, &[0, 6, 3])
        .op(DELIVER, &[1, 7])
        .op(DELIVER, &[0, 7])
        .op(TICK, &[200]);
    write(t, "runner_nonsense", &s.0);
}

fn main() {
    ws();
    http();
    protocol();
    tunnel();
    gateway();
}
