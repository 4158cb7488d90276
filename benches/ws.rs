//! WebSocket framing benchmarks: header parse plus in-place unmask through the reader for
//! small, medium and large frames, the raw mask loop, and header encoding.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use torpor::ws::{apply_mask, encode_header, parse_header, OpCode, WsReader, WsReaderConfig};

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn client_frame(len: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    apply_mask(&mut payload, MASK, 0);
    let mut v = encode_header(true, OpCode::Binary, len as u64, Some(MASK)).to_vec();
    v.extend_from_slice(&payload);
    v
}

fn parse_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_parse_unmask");
    for len in [20usize, 1024, 64 * 1024] {
        let wire = client_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("reader_{len}"), |b| {
            let mut reader = WsReader::new(WsReaderConfig::default());
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let ev = reader.next(&mut buf);
                    black_box(ev)
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("header_mask_{len}"), |b| {
            let mut buf = wire.clone();
            b.iter(|| {
                let h = parse_header(black_box(&buf)).ok().flatten();
                if let Some(h) = h {
                    if let Some(m) = h.mask {
                        apply_mask(&mut buf[h.header_len..], m, 0);
                    }
                }
                black_box(&buf);
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_encode_header");
    for len in [20u64, 1024, 64 * 1024] {
        g.bench_function(format!("server_{len}"), |b| {
            b.iter(|| encode_header(true, OpCode::Binary, black_box(len), None))
        });
    }
    g.bench_function("client_masked_1024", |b| {
        b.iter(|| encode_header(true, OpCode::Text, black_box(1024), Some(MASK)))
    });
    g.finish();
}

criterion_group!(benches, parse_unmask, encode);
criterion_main!(benches);
