//! The HTTP tunnel's streaming rules on one shard's core (`Gateway`), without sockets:
//! framing of a streamed response, its bound and idle deadline, and the bound of a streamed
//! request body kept by the runner connection's receipts.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use torpor::config::Config;
use torpor::gateway::{
    ConnId, Gateway, HttpOutcome, RequestKey, Routed, ShardMsg, StreamTurn, TunnelIn, UploadRoom,
    WriterTurn,
};
use torpor::http::response::BodyFraming;
use torpor::metrics::{Counter, Metrics};
use torpor::protocol::{
    StrMap, ToServerResponseChunk, ToServerResponseStart, ToServerTunnelMessageKind,
};

struct Rig {
    gw: Gateway,
    metrics: Metrics,
    runner: ConnId,
    t0: Instant,
}

fn rig(f: impl FnOnce(&mut Config)) -> Rig {
    let t0 = Instant::now();
    let mut cfg = Config::default();
    f(&mut cfg);
    let (gw, metrics, runner) = common::core::core_with_runner(cfg, t0);
    Rig {
        gw,
        metrics,
        runner,
        t0,
    }
}

impl Rig {
    fn routed(&self) -> Routed {
        Routed {
            actor_id: "actor".into(),
            generation: 1,
            runner_idx: 0,
            conn: self.gw.conn_ref(self.runner),
        }
    }

    fn start(&mut self, method: &str, body: Option<Bytes>) -> ConnId {
        let routed = self.routed();
        let t0 = self.t0;
        self.gw.start_request_with(
            &routed,
            method.into(),
            "/x".into(),
            StrMap(Vec::new()),
            body,
            false,
            t0,
        )
    }

    fn runner_sends(&mut self, id: ConnId, kind: ToServerTunnelMessageKind) {
        let req = self.gw.request_id(id).expect("request id");
        let t0 = self.t0;
        self.gw.handle_shard_msg(
            ShardMsg::Tunnel {
                key: RequestKey::decode(req),
                msg: TunnelIn::Other(kind),
                from: Some(0),
            },
            t0,
        );
    }

    fn head(&mut self, id: ConnId, headers: Vec<(&str, &str)>) {
        let headers = headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.runner_sends(
            id,
            ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
                status: 200,
                headers: StrMap(headers),
                body: None,
                stream: true,
            }),
        );
    }

    fn chunk(&mut self, id: ConnId, body: &[u8], finish: bool) {
        self.runner_sends(
            id,
            ToServerTunnelMessageKind::ResponseChunk(ToServerResponseChunk {
                body: body.to_vec(),
                finish,
            }),
        );
    }

    /// What the client's writer gets now: the bytes, and how the turn ended.
    fn client_bytes(&mut self, id: ConnId) -> (Vec<u8>, StreamTurn) {
        let mut out = Vec::new();
        let mut batch = Vec::new();
        let mut written = 0;
        loop {
            batch.clear();
            match self.gw.stream_next(id, written, &mut batch, 1024) {
                StreamTurn::Write { bytes } => {
                    for b in &batch {
                        out.extend_from_slice(b);
                    }
                    written = bytes;
                }
                other => return (out, other),
            }
        }
    }

    /// Writes everything queued on the runner's connection; returns its byte count.
    fn flush_runner(&mut self) -> usize {
        let mut batch = Vec::new();
        let mut total = 0;
        let mut written = 0;
        loop {
            batch.clear();
            match self.gw.writer_next(self.runner, written, &mut batch, 1024) {
                WriterTurn::Write { bytes } => {
                    total += bytes;
                    written = bytes;
                }
                _ => return total,
            }
        }
    }
}

#[test]
fn a_streamed_response_is_chunked_as_it_comes_and_ends_with_the_last_chunk() {
    let mut r = rig(|_| {});
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![("content-type", "text/event-stream")]);
    match r.gw.take_http_outcome(id) {
        Some(HttpOutcome::Stream {
            status, framing, ..
        }) => {
            assert_eq!(status, 200);
            assert_eq!(framing, BodyFraming::Chunked);
        }
        other => panic!("expected a stream head, got {other:?}"),
    }
    assert!(
        r.gw.take_http_outcome(id).is_none(),
        "the head is taken once"
    );
    assert_eq!(r.client_bytes(id), (Vec::new(), StreamTurn::Idle));
    r.chunk(id, b"data: 1\n\n", false);
    assert_eq!(
        r.client_bytes(id),
        (b"9\r\ndata: 1\n\n\r\n".to_vec(), StreamTurn::Idle)
    );
    r.chunk(id, b"", false);
    assert_eq!(r.client_bytes(id), (Vec::new(), StreamTurn::Idle));
    r.chunk(id, b"xy", true);
    assert_eq!(
        r.client_bytes(id),
        (b"2\r\nxy\r\n0\r\n\r\n".to_vec(), StreamTurn::Done)
    );
    assert_eq!(r.metrics.counter(Counter::HttpStreamedResponses), 1);
}

#[test]
fn sized_and_head_only_streams_are_framed_by_their_length() {
    let mut r = rig(|_| {});
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![("Content-Length", "5")]);
    let Some(HttpOutcome::Stream { framing, .. }) = r.gw.take_http_outcome(id) else {
        panic!("a stream head");
    };
    assert_eq!(framing, BodyFraming::Length(5));
    r.chunk(id, b"abc", false);
    r.chunk(id, b"de", false);
    assert_eq!(r.client_bytes(id), (b"abcde".to_vec(), StreamTurn::Done));

    // A body shorter than declared is cut: the connection ends.
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![("content-length", "5")]);
    r.chunk(id, b"abc", true);
    assert_eq!(r.client_bytes(id), (b"abc".to_vec(), StreamTurn::Closed));

    // HEAD: no body at all, complete at once.
    let id = r.start("HEAD", Some(Bytes::new()));
    r.head(id, vec![]);
    let Some(HttpOutcome::Stream { framing, .. }) = r.gw.take_http_outcome(id) else {
        panic!("a stream head");
    };
    assert_eq!(framing, BodyFraming::Empty);
    r.chunk(id, b"ignored", true);
    assert_eq!(r.client_bytes(id), (Vec::new(), StreamTurn::Done));
}

#[test]
fn a_client_past_its_bound_is_reset_and_the_runner_told() {
    let mut r = rig(|c| c.limits.http_stream_buffer_bytes = 1024);
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![]);
    r.flush_runner();
    r.chunk(id, &[b'a'; 600], false);
    // The client reads nothing; the next piece does not fit.
    r.chunk(id, &[b'b'; 600], false);
    assert_eq!(r.metrics.counter(Counter::HttpStreamAborts), 1);
    assert_eq!(
        r.gw.stream_next(id, 0, &mut Vec::new(), 16),
        StreamTurn::Reset
    );
    assert!(r.flush_runner() > 0, "RequestAbort went to the runner");
    // Later chunks change nothing.
    r.chunk(id, b"c", true);
    assert_eq!(r.metrics.counter(Counter::HttpStreamAborts), 1);
}

#[test]
fn a_runner_abort_mid_stream_truncates_without_the_last_chunk() {
    let mut r = rig(|_| {});
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![]);
    r.chunk(id, b"abc", false);
    r.runner_sends(id, ToServerTunnelMessageKind::ResponseAbort);
    assert_eq!(
        r.client_bytes(id),
        (b"3\r\nabc\r\n".to_vec(), StreamTurn::Closed)
    );
}

#[test]
fn a_stream_without_progress_is_ended_at_its_idle_bound() {
    let mut r = rig(|c| c.timeouts.http_stream_idle_ms = 1000);
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![]);
    r.chunk(id, b"abc", false);
    let _ = r.client_bytes(id);
    // Progress in the first period: checked again one period later.
    r.gw.handle_timeout(r.t0 + Duration::from_millis(1000));
    assert_eq!(r.client_bytes(id).1, StreamTurn::Idle);
    // None in the second: ended.
    r.gw.handle_timeout(r.t0 + Duration::from_millis(2000));
    assert_eq!(r.client_bytes(id).1, StreamTurn::Closed);
    assert_eq!(r.metrics.counter(Counter::HttpStreamAborts), 1);
}

#[test]
fn a_streamed_request_body_waits_for_the_runner_connection_to_be_written() {
    let mut r = rig(|c| c.limits.http_stream_buffer_bytes = 1024);
    let id = r.start("POST", None);
    r.flush_runner();
    assert_eq!(r.gw.upload_room(id), UploadRoom::Room);
    assert!(r
        .gw
        .request_body(id, Bytes::from(vec![1u8; 700]), false, r.t0));
    assert_eq!(r.gw.upload_room(id), UploadRoom::Room);
    assert!(r
        .gw
        .request_body(id, Bytes::from(vec![2u8; 700]), false, r.t0));
    // Over the bound until the runner's writer has written them.
    assert_eq!(r.gw.upload_room(id), UploadRoom::Wait);
    assert!(r.flush_runner() >= 1400);
    // The receipts came back with the write.
    assert_eq!(r.gw.upload_room(id), UploadRoom::Room);
    assert!(r
        .gw
        .request_body(id, Bytes::from_static(b"end"), true, r.t0));
    assert_eq!(r.gw.upload_room(id), UploadRoom::Ended);
    assert!(!r
        .gw
        .request_body(id, Bytes::from_static(b"more"), true, r.t0));
    assert_eq!(r.metrics.counter(Counter::HttpStreamedRequests), 1);
}

#[test]
fn an_http10_client_gets_the_body_until_the_connection_ends() {
    let mut r = rig(|_| {});
    let routed = r.routed();
    let t0 = r.t0;
    let id = r.gw.start_request_with(
        &routed,
        "GET".into(),
        "/x".into(),
        StrMap(Vec::new()),
        Some(Bytes::new()),
        true,
        t0,
    );
    r.head(id, vec![]);
    let Some(HttpOutcome::Stream { framing, .. }) = r.gw.take_http_outcome(id) else {
        panic!("a stream head");
    };
    assert_eq!(framing, BodyFraming::UntilClose);
    r.chunk(id, b"abc", true);
    assert_eq!(r.client_bytes(id), (b"abc".to_vec(), StreamTurn::Closed));
}

#[test]
fn the_actor_stopping_mid_stream_cuts_the_body_short() {
    let mut r = rig(|_| {});
    let id = r.start("GET", Some(Bytes::new()));
    r.head(id, vec![]);
    r.chunk(id, b"abc", false);
    let t0 = r.t0;
    r.gw.handle_shard_msg(
        ShardMsg::ActorStopped {
            actor_id: "actor".into(),
            destroyed: false,
            barrier: 0,
        },
        t0,
    );
    assert_eq!(
        r.client_bytes(id),
        (b"3\r\nabc\r\n".to_vec(), StreamTurn::Closed)
    );
    assert_eq!(r.metrics.counter(Counter::HttpStreamAborts), 1);
}
