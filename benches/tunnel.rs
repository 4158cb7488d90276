//! Tunnel core micro-benchmarks: steady-state push + ack through a hibernatable socket's
//! pending window (window depth 1 and 64), the non-hibernatable send path, and the
//! wrap-aware index comparison.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use torpor::tunnel::{after, Budget, ClientMsg, TunnelSocket, WindowLimits};

fn steady_state(c: &mut Criterion, depth: u16) {
    let now = Instant::now();
    let payload = Bytes::from(vec![0x5A; 128]);
    let mut budget = Budget::new(Budget::DEFAULT_PROCESS_CAP);
    let mut sock = TunnelSocket::new(WindowLimits::default());
    sock.on_runner_open(true);
    // Prefill so that each iteration pushes one message and acks the oldest.
    for _ in 1..depth {
        sock.on_client_message(payload.clone(), true, now, &mut budget);
    }
    let mut g = c.benchmark_group("tunnel/push_ack");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("window_{depth}"), |b| {
        b.iter(|| {
            let index = match sock.on_client_message(payload.clone(), true, now, &mut budget) {
                ClientMsg::Send { index, .. } => index,
                _ => unreachable!("the window never fills in this benchmark"),
            };
            let acked = index.wrapping_sub(depth - 1);
            black_box(sock.on_ack(black_box(acked), now, &mut budget));
        })
    });
    g.finish();
    assert_eq!(sock.pending_len(), usize::from(depth) - 1);
}

fn push_ack(c: &mut Criterion) {
    steady_state(c, 1);
    steady_state(c, 64);
}

fn non_hibernatable_send(c: &mut Criterion) {
    let now = Instant::now();
    let payload = Bytes::from(vec![0x5A; 128]);
    let mut budget = Budget::new(Budget::DEFAULT_PROCESS_CAP);
    let mut sock = TunnelSocket::new(WindowLimits::default());
    sock.on_runner_open(false);
    let mut g = c.benchmark_group("tunnel/send");
    g.throughput(Throughput::Elements(1));
    g.bench_function("non_hibernatable", |b| {
        b.iter(|| black_box(sock.on_client_message(payload.clone(), true, now, &mut budget)))
    });
    g.finish();
}

fn index_after(c: &mut Criterion) {
    let pairs: Vec<(u16, u16)> = (0..1024u32)
        .map(|i| {
            let a = (i.wrapping_mul(40503) & 0xFFFF) as u16;
            (a, a.wrapping_add((i * 97) as u16))
        })
        .collect();
    let mut g = c.benchmark_group("tunnel/after");
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function("1024_pairs", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for &(x, y) in black_box(&pairs) {
                n += u32::from(after(x, y));
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, push_ack, non_hibernatable_send, index_after);
criterion_main!(benches);
