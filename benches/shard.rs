//! Shard hot path, sans IO: the end-to-end forward of one message (client frame bytes in →
//! the chunks the runner connection's writer hands to `writev`, and back), the tunnelled
//! message framing, the writer's chunk list, and the cross-shard hand-off (mailbox send +
//! receive + apply between two threads) against the same-shard path.
//!
//! Frame parse/encode, tunnel encode/decode and the pending window on their own are in
//! `ws.rs`, `protocol.rs` and `tunnel.rs`.

use std::hint::black_box;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torpor::config::Config;
use torpor::engine::ConnRef;
use torpor::gateway::{ConnId, ConnKind, Gateway, RunnerAccept, Settings, ShardMsg, WriterTurn};
use torpor::metrics::Metrics;
use torpor::net::writer::MAX_IOV;
use torpor::net::READ_CHUNK;
use torpor::protocol::{
    encode_ws_ack_to_server, encode_ws_message_prefix_to_server, ws_message_trailer,
};
use torpor::shard::mailbox::Inbox;
use torpor::shard::Shared;
use torpor::tunnel::TunnelSocket;
use torpor::ws::{apply_mask, encode_header, OpCode, WsEvent, WsReader, WsReaderConfig};

const GW: [u8; 4] = [7, 7, 7, 7];
const MASK: [u8; 4] = [0xA1, 0xB2, 0xC3, 0xD4];
const SIZES: [usize; 3] = [20, 1024, 16 * 1024];

fn masked(payload: &[u8]) -> Vec<u8> {
    let mut v = encode_header(true, OpCode::Binary, payload.len() as u64, Some(MASK)).to_vec();
    let start = v.len();
    v.extend_from_slice(payload);
    apply_mask(&mut v[start..], MASK, 0);
    v
}

/// `n` shards sharing one set of mailboxes (the states are built by their own threads).
fn shared(n: usize) -> (Shared, Vec<Inbox<ShardMsg>>) {
    // Control messages (only at open) are dropped.
    let (shared, (inboxes, _)) =
        Shared::new(Arc::new(Config::default()), Metrics::new(n), GW, n).expect("eventfd");
    (shared, inboxes)
}

/// Shard `id`'s gateway core.
fn core(id: u16, sh: &Shared) -> Gateway {
    let settings = Settings {
        shard: id,
        shards: sh.shards.len(),
        config: sh.config.clone(),
        metrics: sh.metrics.clone(),
        gateway_id: GW,
        clustered: false,
    };
    Gateway::new(settings, id as u64, Instant::now(), 0)
}

/// A runner connection on `st`, attached as runner 0.
fn add_runner(st: &mut Gateway) -> ConnRef {
    let accept = RunnerAccept {
        namespace: "default".into(),
        runner_key: "key".into(),
        accept: String::new(),
    };
    let id = st.runner_connected(accept, "127.0.0.1:1".parse().unwrap(), Instant::now());
    let conn = st.conn_ref(id);
    let attached = ShardMsg::RunnerAttached {
        runner_idx: 0,
        conn,
    };
    st.handle_shard_msg(attached, Instant::now());
    conn
}

fn id_of(conn: ConnRef) -> ConnId {
    ConnId {
        slot: conn.slot,
        gen: conn.gen,
    }
}

/// An open client socket on `st` tunnelled to runner 0; returns its id and request id.
fn add_client(st: &mut Gateway, hibernatable: bool) -> (ConnId, [u8; 4]) {
    let socket = TunnelSocket::new(st.limits());
    let id = st.insert_client("actor".into(), 0, 1, socket);
    st.client_opened(id, hibernatable, Instant::now());
    (id, st.request_id(id).expect("client"))
}

/// Drops what the core asks of a shell (a bench has no other shard or control plane).
fn drain(st: &mut Gateway) {
    while st.poll_mail().is_some() {}
    while st.poll_message().is_some() {}
    while st.poll_notice().is_some() {}
}

/// One writer turn's chunks moved into `batch`.
fn take(st: &mut Gateway, conn: ConnRef, batch: &mut Vec<Bytes>) {
    let _ = st.writer_turn(id_of(conn), batch, MAX_IOV);
    drain(st);
}

/// The shell's read: room (reclaimed in place when free), then the kernel's bytes.
fn read_into(buf: &mut BytesMut, wire: &[u8]) {
    if buf.capacity() - buf.len() < wire.len() {
        buf.reserve(wire.len().max(READ_CHUNK));
    }
    buf.extend_from_slice(wire);
}

/// One client and one runner connection on one shard.
struct Rig {
    st: Gateway,
    _inbox: Vec<Inbox<ShardMsg>>,
    client: ConnId,
    req: [u8; 4],
    runner: ConnRef,
    creader: WsReader,
    rreader: WsReader,
    cbuf: BytesMut,
    rbuf: BytesMut,
    batch: Vec<Bytes>,
}

impl Rig {
    fn new(hibernatable: bool) -> Rig {
        let (shared, inbox) = shared(1);
        let mut st = core(0, &shared);
        let runner = add_runner(&mut st);
        let (client, req) = add_client(&mut st, hibernatable);
        drain(&mut st);
        Rig {
            st,
            _inbox: inbox,
            client,
            req,
            runner,
            creader: WsReader::new(WsReaderConfig::default()),
            rreader: WsReader::new(WsReaderConfig::default()),
            cbuf: BytesMut::with_capacity(READ_CHUNK),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            batch: Vec::new(),
        }
    }

    fn client_reads(&mut self, wire: &[u8]) {
        read_into(&mut self.cbuf, wire);
        let now = Instant::now();
        while let Ok(Some(ev)) = self.creader.next(&mut self.cbuf) {
            self.st.handle_client_frame(self.client, ev, now);
        }
        drain(&mut self.st);
    }

    fn runner_reads(&mut self, wire: &[u8]) {
        read_into(&mut self.rbuf, wire);
        let now = Instant::now();
        let id = id_of(self.runner);
        while let Ok(Some(WsEvent::Message { data, .. })) = self.rreader.next(&mut self.rbuf) {
            self.st.handle_runner_message(id, data, now);
        }
        drain(&mut self.st);
    }

    /// One writer turn on a connection; returns the bytes it would write.
    fn turn(&mut self, id: ConnId) -> usize {
        self.batch.clear();
        let n = match self.st.writer_turn(id, &mut self.batch, MAX_IOV) {
            WriterTurn::Write { bytes } => bytes,
            _ => 0,
        };
        black_box(&self.batch);
        self.batch.clear();
        n
    }

    fn next_index(&mut self) -> u16 {
        match self.st.kind(self.client) {
            Some(ConnKind::Client(cc)) => cc.socket.next_index(),
            _ => 0,
        }
    }
}

fn ack_frame(req: [u8; 4], index: u16) -> [u8; 20] {
    let body = encode_ws_ack_to_server(GW, req, 0, index);
    let mut out = [0u8; 20];
    out[..6].copy_from_slice(encode_header(true, OpCode::Binary, 14, Some(MASK)).as_slice());
    out[6..].copy_from_slice(&body);
    apply_mask(&mut out[6..], MASK, 0);
    out
}

/// Client frame bytes in → runner chunks out, per message; `acked` adds the runner's ack
/// of each message (a hibernatable socket's window).
fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let wire = masked(&data);
        g.bench_function(BenchmarkId::new("client_to_runner", size), |b| {
            let mut rig = Rig::new(false);
            let r = id_of(rig.runner);
            b.iter(|| {
                rig.client_reads(black_box(&wire));
                rig.turn(r)
            })
        });
        g.bench_function(BenchmarkId::new("client_to_runner_acked", size), |b| {
            let mut rig = Rig::new(true);
            let r = id_of(rig.runner);
            b.iter(|| {
                let index = rig.next_index();
                rig.client_reads(black_box(&wire));
                let n = rig.turn(r);
                rig.runner_reads(&ack_frame(rig.req, index));
                n
            })
        });
        let mut body = encode_ws_message_prefix_to_server(GW, [0; 4], 3, size)
            .as_bytes()
            .to_vec();
        body.extend_from_slice(&data);
        body.extend_from_slice(&ws_message_trailer(true));
        g.bench_function(BenchmarkId::new("runner_to_client", size), |b| {
            let mut rig = Rig::new(true);
            body[5..9].copy_from_slice(&rig.req);
            let wire = masked(&body);
            let c = rig.client;
            b.iter(|| {
                rig.runner_reads(black_box(&wire));
                rig.turn(c)
            })
        });
    }
    g.finish();
}

/// Framing a tunnelled message, and one writer turn's chunk list from the outbound queue:
/// a fresh list per turn (`writer_list_fresh_3`, what the writer did before) against the
/// list reused across turns.
fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(1));
    let (sh, _inbox) = shared(1);
    let mut st = core(0, &sh);
    let payload = Bytes::from(vec![0x61u8; 1024]);
    let mut i = 0u16;
    g.bench_function("ws_message_frames", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(st.ws_message_frames([1, 2, 3, 4], i, payload.clone(), true))
        })
    });
    // The same frames moved into a fresh list, as every message paid before.
    g.bench_function("ws_message_frames_list", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let frames = st.ws_message_frames([1, 2, 3, 4], i, payload.clone(), true);
            black_box(Vec::from(frames))
        })
    });
    let chunk = Bytes::from_static(b"chunk");
    let runner = add_runner(&mut st);
    let r = id_of(runner);
    g.bench_function("writer_list_fresh_3", |b| {
        b.iter(|| {
            st.write_local(r, [chunk.clone(), chunk.clone(), chunk.clone()]);
            let mut batch = Vec::new();
            st.writer_turn(r, &mut batch, MAX_IOV);
            drain(&mut st);
            black_box(batch)
        })
    });
    let mut batch = Vec::new();
    g.bench_function("writer_list_reused_3", |b| {
        b.iter(|| {
            st.write_local(r, [chunk.clone(), chunk.clone(), chunk.clone()]);
            batch.clear();
            st.writer_turn(r, &mut batch, MAX_IOV);
            drain(&mut st);
            black_box(&batch);
        })
    });
    g.finish();
}

/// What a shard's shell does with the core's messages for other shards: each goes to that
/// shard's mailbox.
fn forward_outputs(st: &mut Gateway, sh: &Shared) {
    let mut last = None;
    while let Some((to, msg)) = st.poll_mail() {
        if last.is_some_and(|l| l != to) {
            sh.shards[last.take().unwrap_or(0) as usize].wake();
        }
        sh.shards[to as usize].push(msg);
        last = Some(to);
    }
    if let Some(l) = last {
        sh.shards[l as usize].wake();
    }
    drain(st);
}

/// Blocks until the eventfd is written (the shard loop's io_uring read, done plainly).
fn wait_fd(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a valid u64 from our own eventfd.
    unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// A tunnelled message framed on one shard and written on a runner connection of another:
/// `send_to_conn` on the sending thread, mailbox wake-up, `on_msg` + one writer turn on the
/// receiving thread. Bursts of `BURST` messages, then the sender waits for all of them to be
/// applied; the time is per message. The same-shard path does the same on one thread.
/// `mailbox_one_thread` keeps both shards on one thread to time the hand-off's own work
/// without the wake-up. `_list` variants hand the frames over as a heap list
/// (`ShardMsg::ToRunner`), as every tunnelled message did before; the others move them
/// inline.
fn handoff(c: &mut Criterion) {
    const BURST: u64 = 64;
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(1));
    let payload = Bytes::from(vec![0x61u8; 1024]);

    // Same shard; `_list` moves each message's frames through a fresh list first (what
    // every message paid before).
    for list in [false, true] {
        let name = if list {
            "same_shard_list"
        } else {
            "same_shard"
        };
        g.bench_function(name, |b| {
            let (sh, _inbox) = shared(1);
            let mut st = core(0, &sh);
            let runner = add_runner(&mut st);
            let mut batch = Vec::new();
            let mut i = 0u16;
            b.iter(|| {
                i = i.wrapping_add(1);
                let frames = st.ws_message_frames([0, 1, 0, 0], i, payload.clone(), true);
                if list {
                    st.send_to_conn(runner, Vec::from(frames));
                } else {
                    st.send_to_conn(runner, frames);
                }
                batch.clear();
                take(&mut st, runner, &mut batch);
                black_box(&batch);
            })
        });
    }

    // Across shards, both states on this thread: the mailbox's own cost (channel push and
    // pop, wake flag, `on_msg`, writer turn) without a thread wake-up in it.
    for list in [false, true] {
        let name = if list {
            "mailbox_one_thread_list"
        } else {
            "mailbox_one_thread"
        };
        g.bench_function(name, |b| {
            let (sh, mut inboxes) = shared(2);
            let inbox1 = inboxes.pop().expect("two inboxes");
            let mut st0 = core(0, &sh);
            let mut st1 = core(1, &sh);
            let runner = add_runner(&mut st1);
            let mut batch = Vec::new();
            let mut i = 0u16;
            b.iter_custom(|iters| {
                let bursts = iters.div_ceil(BURST);
                let start = Instant::now();
                for _ in 0..bursts {
                    for _ in 0..BURST {
                        i = i.wrapping_add(1);
                        let frames = st0.ws_message_frames([0, 1, 0, 0], i, payload.clone(), true);
                        if list {
                            st0.send_to_conn(runner, Vec::from(frames));
                        } else {
                            st0.send_to_conn(runner, frames);
                        }
                    }
                    forward_outputs(&mut st0, &sh);
                    inbox1.rearm();
                    let now = Instant::now();
                    while let Some(msg) = inbox1.try_recv() {
                        st1.handle_shard_msg(msg, now);
                    }
                    batch.clear();
                    take(&mut st1, runner, &mut batch);
                    black_box(&batch);
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (bursts * BURST) as f64)
            })
        });
    }

    // Across shards: shard 1 (the runner's) runs on its own thread.
    let (sh, mut inboxes) = shared(2);
    let inbox1 = inboxes.pop().expect("two inboxes");
    let applied = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (conn_tx, conn_rx) = std::sync::mpsc::channel();
    let peer = {
        let (sh, applied, stop) = (sh.clone(), applied.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut st = core(1, &sh);
            let runner = add_runner(&mut st);
            conn_tx.send(runner).expect("bench thread");
            let fd = inbox1.wake_fd().expect("eventfd");
            let mut batch = Vec::new();
            while !stop.load(Ordering::Acquire) {
                wait_fd(&fd);
                inbox1.rearm();
                let now = Instant::now();
                let mut n = 0;
                while let Some(msg) = inbox1.try_recv() {
                    st.handle_shard_msg(msg, now);
                    n += 1;
                }
                batch.clear();
                take(&mut st, runner, &mut batch);
                black_box(&batch);
                applied.fetch_add(n, Ordering::Release);
            }
        })
    };
    let runner = conn_rx.recv().expect("peer shard");
    let mut st = core(0, &sh);
    let mut i = 0u16;
    for list in [false, true] {
        let name = if list {
            "cross_thread_burst64_list"
        } else {
            "cross_thread_burst64"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let bursts = iters.div_ceil(BURST);
                let start = Instant::now();
                for _ in 0..bursts {
                    let target = applied.load(Ordering::Acquire) + BURST;
                    for _ in 0..BURST {
                        i = i.wrapping_add(1);
                        let frames = st.ws_message_frames([0, 1, 0, 0], i, payload.clone(), true);
                        if list {
                            st.send_to_conn(runner, Vec::from(frames));
                        } else {
                            st.send_to_conn(runner, frames);
                        }
                    }
                    forward_outputs(&mut st, &sh);
                    while applied.load(Ordering::Acquire) < target {
                        std::hint::spin_loop();
                    }
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (bursts * BURST) as f64)
            })
        });
    }
    g.finish();
    stop.store(true, Ordering::Release);
    // Wake the peer so it sees `stop`.
    sh.shards[1].send(ShardMsg::Shutdown);
    let _ = peer.join();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = forward, framing, handoff
}
criterion_main!(benches);
