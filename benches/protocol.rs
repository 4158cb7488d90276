//! Runner protocol hot path: ws message prefix encoding and zero-copy decoding, compared with
//! the strict serde decode of the same messages.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torpor::protocol::{
    decode_to_server, decode_to_server_hot, encode_to_client, encode_ws_message_prefix,
    encode_ws_message_prefix_to_server, ws_message_trailer, MessageId, ToClient,
    ToClientTunnelMessage, ToClientTunnelMessageKind, ToClientWebSocketMessage,
};

const GW: [u8; 4] = [1, 2, 3, 4];
const RQ: [u8; 4] = [5, 6, 7, 8];

fn ws_to_server(len: usize) -> Bytes {
    let mut v = encode_ws_message_prefix_to_server(GW, RQ, 42, len)
        .as_bytes()
        .to_vec();
    v.extend(std::iter::repeat_n(0x61u8, len));
    v.extend_from_slice(&ws_message_trailer(true));
    Bytes::from(v)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol");
    g.bench_function("encode_ws_message_prefix", |b| {
        let mut i = 0u16;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(encode_ws_message_prefix(
                black_box(GW),
                black_box(RQ),
                i,
                black_box(16384),
            ))
        })
    });
    g.bench_function("encode_to_client_ws_16KiB_serde", |b| {
        let m = ToClient::TunnelMessage(ToClientTunnelMessage {
            message_id: MessageId {
                gateway_id: GW,
                request_id: RQ,
                message_index: 1,
            },
            message_kind: ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
                data: vec![0x61; 16384],
                binary: true,
            }),
        });
        b.iter(|| black_box(encode_to_client(black_box(&m))))
    });
    for len in [20usize, 16384] {
        let msg = ws_to_server(len);
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_with_input(BenchmarkId::new("decode_hot", len), &msg, |b, m| {
            b.iter(|| black_box(decode_to_server_hot(black_box(m)).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("decode_serde", len), &msg, |b, m| {
            b.iter(|| black_box(decode_to_server(black_box(m)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
