//! Unit tests of the protocol module: round trips of every union member, exact bytes, decoder
//! strictness, and agreement between the zero-copy hot path and the serde decode.

use bytes::Bytes;
use proptest::prelude::*;

use super::arb;
use super::codec::{from_slice, to_vec, ProtocolError};
use super::hot::*;
use super::*;

const GW: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];
const RQ: [u8; 4] = [1, 2, 3, 4];

fn mid(index: u16) -> MessageId {
    MessageId {
        gateway_id: GW,
        request_id: RQ,
        message_index: index,
    }
}

fn cp(id: &str) -> ActorCheckpoint {
    ActorCheckpoint {
        actor_id: id.into(),
        generation: u32::MAX,
        index: i64::MIN,
    }
}

fn headers() -> StrMap {
    StrMap(vec![
        ("x-b".into(), "2".into()),
        ("x-a".into(), "1".into()),
        ("".into(), "".into()),
    ])
}

fn srv_tunnel(kind: ToServerTunnelMessageKind) -> ToServer {
    ToServer::TunnelMessage(ToServerTunnelMessage {
        message_id: mid(7),
        message_kind: kind,
    })
}

fn cli_tunnel(kind: ToClientTunnelMessageKind) -> ToClient {
    ToClient::TunnelMessage(ToClientTunnelMessage {
        message_id: mid(u16::MAX),
        message_kind: kind,
    })
}

/// At least one value for every member of every union reachable from `ToServer`.
fn server_examples() -> Vec<ToServer> {
    use ToServerTunnelMessageKind as K;
    let kv = |data| {
        ToServer::KvRequest(ToServerKvRequest {
            actor_id: "a".into(),
            request_id: 9,
            data,
        })
    };
    vec![
        ToServer::Init(ToServerInit {
            name: "r".into(),
            version: 1,
            total_slots: 100,
            prepopulate_actor_names: None,
            metadata: None,
        }),
        ToServer::Init(ToServerInit {
            name: "runner".into(),
            version: u32::MAX,
            total_slots: 0,
            prepopulate_actor_names: Some(ActorNameMap(vec![
                (
                    "z".into(),
                    ActorName {
                        metadata: "{}".into(),
                    },
                ),
                (
                    "a".into(),
                    ActorName {
                        metadata: "{\"k\":1}".into(),
                    },
                ),
            ])),
            metadata: Some("{\"x\":\"é\"}".into()),
        }),
        ToServer::Init(ToServerInit {
            name: String::new(),
            version: 0,
            total_slots: 1,
            prepopulate_actor_names: Some(ActorNameMap(vec![])),
            metadata: Some(String::new()),
        }),
        ToServer::Events(vec![]),
        ToServer::Events(vec![
            EventWrapper {
                checkpoint: cp("a1"),
                inner: Event::ActorIntent(EventActorIntent {
                    intent: ActorIntent::Sleep,
                }),
            },
            EventWrapper {
                checkpoint: cp("a1"),
                inner: Event::ActorIntent(EventActorIntent {
                    intent: ActorIntent::Stop,
                }),
            },
            EventWrapper {
                checkpoint: cp("a2"),
                inner: Event::ActorStateUpdate(EventActorStateUpdate {
                    state: ActorState::Running,
                }),
            },
            EventWrapper {
                checkpoint: cp("a2"),
                inner: Event::ActorStateUpdate(EventActorStateUpdate {
                    state: ActorState::Stopped(ActorStateStopped {
                        code: StopCode::Ok,
                        message: None,
                    }),
                }),
            },
            EventWrapper {
                checkpoint: cp("a2"),
                inner: Event::ActorStateUpdate(EventActorStateUpdate {
                    state: ActorState::Stopped(ActorStateStopped {
                        code: StopCode::Error,
                        message: Some("boom".into()),
                    }),
                }),
            },
            EventWrapper {
                checkpoint: cp("a3"),
                inner: Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts: None }),
            },
            EventWrapper {
                checkpoint: cp("a3"),
                inner: Event::ActorSetAlarm(EventActorSetAlarm {
                    alarm_ts: Some(i64::MAX),
                }),
            },
        ]),
        ToServer::AckCommands(ToServerAckCommands {
            last_command_checkpoints: vec![cp("x"), cp("y")],
        }),
        ToServer::Stopping,
        ToServer::Pong(ToServerPong { ts: -1 }),
        kv(KvRequestData::Get(KvGetRequest {
            keys: vec![vec![], vec![1, 2]],
        })),
        kv(KvRequestData::List(KvListRequest {
            query: KvListQuery::All,
            reverse: None,
            limit: None,
        })),
        kv(KvRequestData::List(KvListRequest {
            query: KvListQuery::Range(KvListRangeQuery {
                start: vec![0],
                end: vec![0xff],
                exclusive: true,
            }),
            reverse: Some(false),
            limit: Some(u64::MAX),
        })),
        kv(KvRequestData::List(KvListRequest {
            query: KvListQuery::Prefix(KvListPrefixQuery { key: vec![7] }),
            reverse: Some(true),
            limit: Some(0),
        })),
        kv(KvRequestData::Put(KvPutRequest {
            keys: vec![vec![1]],
            values: vec![vec![2; 200]],
        })),
        kv(KvRequestData::Delete(KvDeleteRequest { keys: vec![] })),
        kv(KvRequestData::DeleteRange(KvDeleteRangeRequest {
            start: vec![],
            end: vec![9],
        })),
        kv(KvRequestData::Drop),
        srv_tunnel(K::ResponseStart(ToServerResponseStart {
            status: 200,
            headers: headers(),
            body: Some(b"hi".to_vec()),
            stream: false,
        })),
        srv_tunnel(K::ResponseStart(ToServerResponseStart {
            status: u16::MAX,
            headers: StrMap::new(),
            body: None,
            stream: true,
        })),
        srv_tunnel(K::ResponseChunk(ToServerResponseChunk {
            body: vec![],
            finish: true,
        })),
        srv_tunnel(K::ResponseAbort),
        srv_tunnel(K::WebSocketOpen(ToServerWebSocketOpen {
            can_hibernate: true,
        })),
        srv_tunnel(K::WebSocketMessage(ToServerWebSocketMessage {
            data: b"hello".to_vec(),
            binary: false,
        })),
        srv_tunnel(K::WebSocketMessage(ToServerWebSocketMessage {
            data: vec![],
            binary: true,
        })),
        srv_tunnel(K::WebSocketMessageAck(ToServerWebSocketMessageAck {
            index: 0x1234,
        })),
        srv_tunnel(K::WebSocketClose(ToServerWebSocketClose {
            code: Some(1000),
            reason: Some("bye".into()),
            hibernate: false,
        })),
        srv_tunnel(K::WebSocketClose(ToServerWebSocketClose {
            code: None,
            reason: None,
            hibernate: true,
        })),
    ]
}

/// At least one value for every member of every union reachable from `ToClient`.
fn client_examples() -> Vec<ToClient> {
    use ToClientTunnelMessageKind as K;
    let kv = |data| {
        ToClient::KvResponse(ToClientKvResponse {
            request_id: 3,
            data,
        })
    };
    vec![
        ToClient::Init(ToClientInit {
            runner_id: "runner-id".into(),
            metadata: ProtocolMetadata {
                runner_lost_threshold: 15000,
                actor_stop_threshold: 30000,
                serverless_drain_grace_period: None,
            },
        }),
        ToClient::Init(ToClientInit {
            runner_id: String::new(),
            metadata: ProtocolMetadata {
                runner_lost_threshold: i64::MIN,
                actor_stop_threshold: i64::MAX,
                serverless_drain_grace_period: Some(0),
            },
        }),
        ToClient::Commands(vec![]),
        ToClient::Commands(vec![
            CommandWrapper {
                checkpoint: cp("a"),
                inner: Command::StartActor(CommandStartActor {
                    config: ActorConfig {
                        name: "counter".into(),
                        key: Some("k".into()),
                        create_ts: 1_700_000_000_000,
                        input: Some(vec![1, 2, 3]),
                    },
                    hibernating_requests: vec![HibernatingRequest {
                        gateway_id: GW,
                        request_id: RQ,
                    }],
                }),
            },
            CommandWrapper {
                checkpoint: cp("b"),
                inner: Command::StartActor(CommandStartActor {
                    config: ActorConfig {
                        name: "n".into(),
                        key: None,
                        create_ts: 0,
                        input: None,
                    },
                    hibernating_requests: vec![],
                }),
            },
            CommandWrapper {
                checkpoint: cp("a"),
                inner: Command::StopActor,
            },
        ]),
        ToClient::AckEvents(ToClientAckEvents {
            last_event_checkpoints: vec![cp("q")],
        }),
        kv(KvResponseData::Error(KvErrorResponse {
            message: "too big".into(),
        })),
        kv(KvResponseData::Get(KvGetResponse {
            keys: vec![vec![1]],
            values: vec![vec![2]],
            metadata: vec![KvMetadata {
                version: vec![0, 1],
                update_ts: 5,
            }],
        })),
        kv(KvResponseData::List(KvListResponse {
            keys: vec![],
            values: vec![],
            metadata: vec![],
        })),
        kv(KvResponseData::Put),
        kv(KvResponseData::Delete),
        kv(KvResponseData::Drop),
        cli_tunnel(K::RequestStart(ToClientRequestStart {
            actor_id: "act".into(),
            method: "POST".into(),
            path: "/x?y=1".into(),
            headers: headers(),
            body: Some(vec![0; 3]),
            stream: false,
        })),
        cli_tunnel(K::RequestStart(ToClientRequestStart {
            actor_id: "act".into(),
            method: "GET".into(),
            path: "/".into(),
            headers: StrMap::new(),
            body: None,
            stream: true,
        })),
        cli_tunnel(K::RequestChunk(ToClientRequestChunk {
            body: vec![5; 130],
            finish: false,
        })),
        cli_tunnel(K::RequestAbort),
        cli_tunnel(K::WebSocketOpen(ToClientWebSocketOpen {
            actor_id: "act".into(),
            path: "/ws".into(),
            headers: headers(),
        })),
        cli_tunnel(K::WebSocketMessage(ToClientWebSocketMessage {
            data: b"\x00\x01".to_vec(),
            binary: true,
        })),
        cli_tunnel(K::WebSocketClose(ToClientWebSocketClose {
            code: Some(1011),
            reason: Some("ws.eviction".into()),
        })),
        cli_tunnel(K::WebSocketClose(ToClientWebSocketClose {
            code: None,
            reason: None,
        })),
        ToClient::Ping(ToClientPing { ts: 0 }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Round trips and exact bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn every_to_server_member_round_trips_and_matches_serde_bare() {
    for m in server_examples() {
        let b = encode_to_server(&m);
        assert_eq!(decode_to_server(&b).as_ref(), Ok(&m), "{m:?}");
        assert_eq!(serde_bare::to_vec(&m).unwrap(), b, "serde_bare bytes {m:?}");
        assert_eq!(serde_bare::from_slice::<ToServer>(&b).unwrap(), m);
        let hot = decode_to_server_hot(&Bytes::from(b.clone())).unwrap();
        assert_eq!(hot.into_to_server(), m);
    }
}

#[test]
fn every_to_client_member_round_trips_and_matches_serde_bare() {
    for m in client_examples() {
        let b = encode_to_client(&m);
        assert_eq!(decode_to_client(&b).as_ref(), Ok(&m), "{m:?}");
        assert_eq!(serde_bare::to_vec(&m).unwrap(), b, "serde_bare bytes {m:?}");
        assert_eq!(serde_bare::from_slice::<ToClient>(&b).unwrap(), m);
        let hot = decode_to_client_hot(&Bytes::from(b.clone())).unwrap();
        assert_eq!(hot.into_to_client(), m);
    }
}

#[test]
fn examples_cover_every_top_level_tag() {
    let mut s: Vec<u8> = server_examples()
        .iter()
        .map(|m| encode_to_server(m)[0])
        .collect();
    s.dedup();
    assert_eq!(s, (0..7).collect::<Vec<u8>>());
    let mut c: Vec<u8> = client_examples()
        .iter()
        .map(|m| encode_to_client(m)[0])
        .collect();
    c.dedup();
    assert_eq!(c, (0..6).collect::<Vec<u8>>());
}

#[test]
fn exact_bytes_of_small_messages() {
    assert_eq!(
        encode_to_client(&ToClient::Ping(ToClientPing { ts: 0x0102 })),
        [5, 2, 1, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(encode_to_server(&ToServer::Stopping), [3]);
    assert_eq!(
        encode_to_server(&ToServer::Pong(ToServerPong { ts: -2 })),
        [4, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
    );
    // KvListRequest: query All, reverse Some(true), limit Some(1) as fixed u64.
    let m = ToServer::KvRequest(ToServerKvRequest {
        actor_id: "a".into(),
        request_id: 1,
        data: KvRequestData::List(KvListRequest {
            query: KvListQuery::All,
            reverse: Some(true),
            limit: Some(1),
        }),
    });
    assert_eq!(
        encode_to_server(&m),
        [5, 1, b'a', 1, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    // StopCode is an enum: uvarint.
    let m = ToServer::Events(vec![EventWrapper {
        checkpoint: ActorCheckpoint {
            actor_id: String::new(),
            generation: 2,
            index: 3,
        },
        inner: Event::ActorStateUpdate(EventActorStateUpdate {
            state: ActorState::Stopped(ActorStateStopped {
                code: StopCode::Error,
                message: None,
            }),
        }),
    }]);
    assert_eq!(
        encode_to_server(&m),
        [1, 1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    );
}

#[test]
fn map_order_is_kept() {
    let m = headers();
    let b = to_vec(&m).unwrap();
    assert_eq!(
        b,
        [3, 3, b'x', b'-', b'b', 1, b'2', 3, b'x', b'-', b'a', 1, b'1', 0, 0]
    );
    assert_eq!(from_slice::<StrMap>(&b).unwrap(), m);
}

#[test]
fn long_strings_and_data_use_multi_byte_lengths() {
    let name = "n".repeat(70_000);
    let m = ToServer::Init(ToServerInit {
        name: name.clone(),
        version: 7,
        total_slots: 1,
        prepopulate_actor_names: None,
        metadata: None,
    });
    let b = encode_to_server(&m);
    // 70000 = 0x11170 → uvarint f0 a2 04
    assert_eq!(&b[..4], &[0, 0xf0, 0xa2, 0x04]);
    assert_eq!(decode_to_server(&b).unwrap(), m);
}

// ---------------------------------------------------------------------------------------------
// Strictness
// ---------------------------------------------------------------------------------------------

fn all_encodings() -> Vec<(bool, Vec<u8>)> {
    let mut v: Vec<(bool, Vec<u8>)> = server_examples()
        .iter()
        .map(|m| (true, encode_to_server(m)))
        .collect();
    v.extend(
        client_examples()
            .iter()
            .map(|m| (false, encode_to_client(m))),
    );
    v
}

fn decode_any(server: bool, b: &[u8]) -> Result<(), ProtocolError> {
    if server {
        decode_to_server(b).map(|_| ())
    } else {
        decode_to_client(b).map(|_| ())
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    for (server, mut b) in all_encodings() {
        b.push(0);
        let n = b.len();
        assert_eq!(
            decode_any(server, &b),
            Err(ProtocolError::TrailingBytes {
                offset: n - 1,
                remaining: 1
            })
        );
    }
}

#[test]
fn every_truncation_is_rejected() {
    for (server, b) in all_encodings() {
        for cut in 0..b.len() {
            assert!(
                decode_any(server, &b[..cut]).is_err(),
                "prefix {cut} of {b:?} accepted"
            );
        }
    }
}

#[test]
fn unknown_tags_are_rejected() {
    for t in [7u8, 8, 0x7f, 0xff] {
        assert!(matches!(
            decode_to_server(&[t]),
            Err(ProtocolError::InvalidTag { offset: 0, .. })
        ));
    }
    for t in [6u8, 0x7f, 0x80] {
        assert!(matches!(
            decode_to_client(&[t, 0]),
            Err(ProtocolError::InvalidTag { offset: 0, .. })
        ));
    }
    // Non-canonical multi-byte tag 0 (the TS decoder reads tag 0x80).
    assert!(matches!(
        decode_to_server(&[0x80, 0x00]),
        Err(ProtocolError::InvalidTag { .. })
    ));
    // Inner tags: tunnel kind 7 on the server side, 6 on the client side.
    let mut b = encode_to_server(&srv_tunnel(ToServerTunnelMessageKind::ResponseAbort));
    b[11] = 7;
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::InvalidTag { offset: 11, tag: 7 })
    ));
    let mut b = encode_to_client(&cli_tunnel(ToClientTunnelMessageKind::RequestAbort));
    b[11] = 6;
    assert!(matches!(
        decode_to_client(&b),
        Err(ProtocolError::InvalidTag { offset: 11, tag: 6 })
    ));
    // StopCode 2.
    let b = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::InvalidTag { offset: 17, tag: 2 })
    ));
}

#[test]
fn bools_and_optional_flags_must_be_zero_or_one() {
    // WebSocketOpen { can_hibernate: 2 }
    let mut b = encode_to_server(&srv_tunnel(ToServerTunnelMessageKind::WebSocketOpen(
        ToServerWebSocketOpen {
            can_hibernate: true,
        },
    )));
    *b.last_mut().unwrap() = 2;
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::InvalidBool { value: 2, .. })
    ));
    // Init metadata optional flag 2.
    let b = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::InvalidBool {
            offset: 11,
            value: 2
        })
    ));
}

#[test]
fn invalid_utf8_is_rejected() {
    for bad in [
        &[0xff][..],
        &[0xc0, 0x80],             // overlong NUL
        &[0xed, 0xa0, 0x80],       // surrogate
        &[0xf4, 0x90, 0x80, 0x80], // > U+10FFFF
        &[0xe2, 0x82],             // truncated sequence
        &[0x80],                   // lone continuation
    ] {
        let mut b = vec![0, bad.len() as u8];
        b.extend_from_slice(bad);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_to_server(&b),
            Err(ProtocolError::InvalidUtf8 { offset: 2 }),
            "{bad:?}"
        );
    }
}

#[test]
fn duplicate_map_keys_are_rejected() {
    // ResponseStart headers {"a":"1","a":"2"}
    let b = [
        6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 200, 0, 2, 1, b'a', 1, b'1', 1, b'a', 1, b'2', 0, 0,
    ];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::DuplicateKey { .. })
    ));
    // prepopulateActorNames {"x":{}, "x":{}}
    let b = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 1, b'x', 0, 1, b'x', 0, 0,
    ];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::DuplicateKey { .. })
    ));
    // Many keys (hash-set path): 40 distinct keys then a duplicate of the first.
    let mut entries: Vec<(String, String)> =
        (0..40).map(|i| (format!("k{i}"), String::new())).collect();
    entries.push(("k0".into(), String::new()));
    let b = to_vec(&StrMap(entries.clone())).unwrap();
    assert!(matches!(
        from_slice::<StrMap>(&b),
        Err(ProtocolError::DuplicateKey { .. })
    ));
    entries.pop();
    let b = to_vec(&StrMap(entries.clone())).unwrap();
    assert_eq!(from_slice::<StrMap>(&b).unwrap(), StrMap(entries));
}

#[test]
fn non_canonical_uvarints_are_rejected() {
    // Init name length 0 written as 0x80 0x00.
    let b = [0, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::InvalidUint { offset: 1 })
    ));
    // 11-byte varint.
    let mut b = vec![1];
    b.extend_from_slice(&[0xff; 10]);
    b.push(0x01);
    assert!(decode_to_server(&b).is_err());
}

#[test]
fn huge_length_prefixes_fail_before_allocating() {
    // list count 2^63 in Events, string length u32::MAX in Init, data length 2^56.
    let mut b = vec![1];
    b.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::LengthOutOfBounds { offset: 1, .. })
    ));
    let b = [0, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::LengthOutOfBounds {
            offset: 1,
            len: 0xffff_ffff
        })
    ));
    let mut b = vec![6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4];
    b.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0]);
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::LengthOutOfBounds { .. })
    ));
    // Length exactly one more than what is left.
    let b = [0, 2, b'a'];
    assert!(matches!(
        decode_to_server(&b),
        Err(ProtocolError::LengthOutOfBounds { offset: 1, len: 2 })
    ));
}

#[test]
fn messages_above_32_mib_are_rejected_like_the_ts_codec() {
    let at_limit = MAX_MESSAGE_LEN - HOT_OVERHEAD;
    let ok = ws_server_message(at_limit);
    assert_eq!(ok.len(), MAX_MESSAGE_LEN);
    assert!(matches!(
        decode_to_server_hot(&ok),
        Ok(ToServerHot::WsMessage { .. })
    ));
    assert!(decode_to_server(&ok).is_ok());
    let big = ws_server_message(at_limit + 1);
    let want = ProtocolError::MessageTooLarge {
        len: MAX_MESSAGE_LEN + 1,
    };
    assert_eq!(decode_to_server(&big), Err(want.clone()));
    assert_eq!(decode_to_server_hot(&big), Err(want));
}

/// Prefix (header, kind, 4-byte length varint) plus trailer for payloads near 32 MiB.
const HOT_OVERHEAD: usize = 12 + 4 + 1;

fn ws_server_message(len: usize) -> Bytes {
    let mut v = encode_ws_message_prefix_to_server(GW, RQ, 0, len)
        .as_bytes()
        .to_vec();
    v.resize(v.len() + len, 0x33);
    v.push(0);
    Bytes::from(v)
}

#[test]
fn empty_input_is_rejected() {
    assert!(matches!(
        decode_to_server(&[]),
        Err(ProtocolError::UnexpectedEof { offset: 0 })
    ));
    assert!(decode_to_client(&[]).is_err());
    assert!(decode_to_server_hot(&Bytes::new()).is_err());
    assert!(decode_to_client_hot(&Bytes::new()).is_err());
}

#[test]
fn errors_display_and_are_std_errors() {
    let e: Box<dyn std::error::Error> = Box::new(decode_to_server(&[9]).unwrap_err());
    assert_eq!(e.to_string(), "invalid union tag 9 at byte 0");
}

// ---------------------------------------------------------------------------------------------
// Hot path
// ---------------------------------------------------------------------------------------------

const LENGTHS: &[usize] = &[
    0,
    1,
    127,
    128,
    16383,
    16384,
    65535,
    65536,
    1 << 20,
    2_097_151,
    2_097_152,
];

#[test]
fn client_prefix_payload_trailer_equals_serde_encoding() {
    for &len in LENGTHS {
        for binary in [false, true] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let idx = (len % 65536) as u16;
            let prefix = encode_ws_message_prefix(GW, RQ, idx, len);
            let mut wire = prefix.as_bytes().to_vec();
            wire.extend_from_slice(&payload);
            wire.extend_from_slice(&ws_message_trailer(binary));
            let m = ToClient::TunnelMessage(ToClientTunnelMessage {
                message_id: MessageId {
                    gateway_id: GW,
                    request_id: RQ,
                    message_index: idx,
                },
                message_kind: ToClientTunnelMessageKind::WebSocketMessage(
                    ToClientWebSocketMessage {
                        data: payload,
                        binary,
                    },
                ),
            });
            assert_eq!(wire, encode_to_client(&m), "len {len}");
            assert!(prefix.len() <= WS_PREFIX_MAX);
        }
    }
}

#[test]
fn server_prefix_and_ack_equal_serde_encoding() {
    for &len in LENGTHS {
        let payload = vec![0x5au8; len];
        let prefix = encode_ws_message_prefix_to_server(RQ, GW, 65535, len);
        let mut wire = prefix.as_bytes().to_vec();
        wire.extend_from_slice(&payload);
        wire.extend_from_slice(&ws_message_trailer(false));
        let m = ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: MessageId {
                gateway_id: RQ,
                request_id: GW,
                message_index: 65535,
            },
            message_kind: ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
                data: payload,
                binary: false,
            }),
        });
        assert_eq!(wire, encode_to_server(&m), "len {len}");
    }
    let ack = encode_ws_ack_to_server(GW, RQ, 3, 0xabcd);
    let m = ToServer::TunnelMessage(ToServerTunnelMessage {
        message_id: mid(3),
        message_kind: ToServerTunnelMessageKind::WebSocketMessageAck(ToServerWebSocketMessageAck {
            index: 0xabcd,
        }),
    });
    assert_eq!(ack.to_vec(), encode_to_server(&m));
}

#[test]
fn hot_decode_is_zero_copy() {
    for &len in LENGTHS {
        let prefix = encode_ws_message_prefix_to_server(GW, RQ, 9, len);
        let mut wire = prefix.as_bytes().to_vec();
        wire.extend(std::iter::repeat_n(7u8, len));
        wire.push(1);
        let msg = Bytes::from(wire);
        match decode_to_server_hot(&msg).unwrap() {
            ToServerHot::WsMessage {
                gateway_id,
                request_id,
                message_index,
                data,
                binary,
            } => {
                assert_eq!((gateway_id, request_id, message_index), (GW, RQ, 9));
                assert!(binary);
                assert_eq!(data.len(), len);
                // Same memory as the received message.
                assert_eq!(data.as_ptr() as usize, msg.as_ptr() as usize + prefix.len());
            }
            other => panic!("unexpected {other:?}"),
        }

        let prefix = encode_ws_message_prefix(GW, RQ, 9, len);
        let mut wire = prefix.as_bytes().to_vec();
        wire.extend(std::iter::repeat_n(7u8, len));
        wire.push(0);
        let msg = Bytes::from(wire);
        match decode_to_client_hot(&msg).unwrap() {
            ToClientHot::WsMessage { data, binary, .. } => {
                assert!(!binary);
                assert_eq!(data.as_ptr() as usize, msg.as_ptr() as usize + prefix.len());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn hot_decode_of_ack_and_other() {
    let ack = Bytes::copy_from_slice(&encode_ws_ack_to_server(GW, RQ, 1, 2));
    assert_eq!(
        decode_to_server_hot(&ack).unwrap(),
        ToServerHot::WsAck {
            gateway_id: GW,
            request_id: RQ,
            message_index: 1,
            ack_index: 2
        }
    );
    let pong = Bytes::from(encode_to_server(&ToServer::Pong(ToServerPong { ts: 5 })));
    assert_eq!(
        decode_to_server_hot(&pong).unwrap(),
        ToServerHot::Other(ToServer::Pong(ToServerPong { ts: 5 }))
    );
    // Malformed ws messages are rejected with the serde decoder's error.
    let mut wire = encode_ws_message_prefix_to_server(GW, RQ, 0, 3)
        .as_bytes()
        .to_vec();
    wire.extend_from_slice(b"abc");
    for (tail, what) in [
        (&[][..], "missing flag"),
        (&[2][..], "bad flag"),
        (&[1, 0][..], "trailing"),
    ] {
        let mut w = wire.clone();
        w.extend_from_slice(tail);
        let hot = decode_to_server_hot(&Bytes::from(w.clone()));
        assert!(hot.is_err(), "{what}");
        assert_eq!(
            hot.unwrap_err(),
            decode_to_server(&w).unwrap_err(),
            "{what}"
        );
    }
}

/// Both decoders agree: same value or both errors; and the hot decoder never hands an ws
/// message or ack to the slow path.
fn check_server_agreement(b: &[u8]) -> Result<(), TestCaseError> {
    let slow = decode_to_server(b);
    let hot = decode_to_server_hot(&Bytes::copy_from_slice(b));
    match (hot, slow) {
        (Ok(h), Ok(s)) => {
            if let ToServerHot::Other(ToServer::TunnelMessage(t)) = &h {
                prop_assert!(!matches!(
                    t.message_kind,
                    ToServerTunnelMessageKind::WebSocketMessage(_)
                        | ToServerTunnelMessageKind::WebSocketMessageAck(_)
                ));
            }
            prop_assert_eq!(h.into_to_server(), s);
        }
        (Err(h), Err(s)) => prop_assert_eq!(h, s),
        (h, s) => prop_assert!(false, "disagree on {:?}: hot {:?} slow {:?}", b, h, s),
    }
    Ok(())
}

fn check_client_agreement(b: &[u8]) -> Result<(), TestCaseError> {
    let slow = decode_to_client(b);
    let hot = decode_to_client_hot(&Bytes::copy_from_slice(b));
    match (hot, slow) {
        (Ok(h), Ok(s)) => {
            if let ToClientHot::Other(ToClient::TunnelMessage(t)) = &h {
                prop_assert!(!matches!(
                    t.message_kind,
                    ToClientTunnelMessageKind::WebSocketMessage(_)
                ));
            }
            prop_assert_eq!(h.into_to_client(), s);
        }
        (Err(h), Err(s)) => prop_assert_eq!(h, s),
        (h, s) => prop_assert!(false, "disagree on {:?}: hot {:?} slow {:?}", b, h, s),
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(usize),
    Append(Vec<u8>),
    Set(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::None),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..3).prop_map(Mutation::Append),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
    ]
}

fn apply(mut b: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::None => {}
        Mutation::Truncate(n) => {
            let n = n % (b.len() + 1);
            b.truncate(n);
        }
        Mutation::Append(t) => b.extend_from_slice(t),
        Mutation::Set(i, v) => {
            if !b.is_empty() {
                let i = i % b.len();
                b[i] = *v;
            }
        }
    }
    b
}

/// Bytes shaped like a tunnelled ws message/ack with random details.
fn ws_shaped(outer: u8) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 10]>(),
        prop_oneof![Just(4u8), Just(5u8), any::<u8>()],
        proptest::collection::vec(any::<u8>(), 0..8),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(move |(h, kind, len, body)| {
            let mut b = vec![outer];
            b.extend_from_slice(&h);
            b.push(kind);
            b.extend_from_slice(&len);
            b.extend_from_slice(&body);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_to_server_round_trip(m in arb::to_server()) {
        let b = encode_to_server(&m);
        prop_assert_eq!(decode_to_server(&b), Ok(m.clone()));
        prop_assert_eq!(serde_bare::to_vec(&m).unwrap(), b);
    }

    #[test]
    fn prop_to_client_round_trip(m in arb::to_client()) {
        let b = encode_to_client(&m);
        prop_assert_eq!(decode_to_client(&b), Ok(m.clone()));
        prop_assert_eq!(serde_bare::to_vec(&m).unwrap(), b);
    }

    #[test]
    fn prop_hot_agrees_on_mutated_server_encodings(m in arb::to_server(), mu in mutation()) {
        check_server_agreement(&apply(encode_to_server(&m), &mu))?;
    }

    #[test]
    fn prop_hot_agrees_on_mutated_client_encodings(m in arb::to_client(), mu in mutation()) {
        check_client_agreement(&apply(encode_to_client(&m), &mu))?;
    }

    #[test]
    fn prop_hot_agrees_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        check_server_agreement(&b)?;
        check_client_agreement(&b)?;
    }

    #[test]
    fn prop_hot_agrees_on_ws_shaped_bytes(b in ws_shaped(6), c in ws_shaped(4)) {
        check_server_agreement(&b)?;
        check_client_agreement(&c)?;
    }

    #[test]
    fn prop_prefix_matches_serde(gw in any::<[u8;4]>(), rq in any::<[u8;4]>(), idx in any::<u16>(),
                                 data in proptest::collection::vec(any::<u8>(), 0..300), binary in any::<bool>()) {
        let mut wire = encode_ws_message_prefix(gw, rq, idx, data.len()).as_bytes().to_vec();
        wire.extend_from_slice(&data);
        wire.extend_from_slice(&ws_message_trailer(binary));
        let m = ToClient::TunnelMessage(ToClientTunnelMessage {
            message_id: MessageId { gateway_id: gw, request_id: rq, message_index: idx },
            message_kind: ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage { data, binary }),
        });
        prop_assert_eq!(wire, encode_to_client(&m));
    }
}
