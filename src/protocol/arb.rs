//! proptest strategies producing arbitrary protocol values (test-only).
//!
//! Covers every struct field and union member; sizes are kept small so that cases stay fast.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::types::*;

fn s() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9_.-]{1,12}",
        any::<String>().prop_map(|s| s.chars().take(8).collect()),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        vec(any::<u8>(), 0..40),
        (0usize..300).prop_map(|n| vec![0xa5; n]),
    ]
}

fn id4() -> impl Strategy<Value = [u8; 4]> {
    any::<[u8; 4]>()
}

fn unique_entries<V: std::fmt::Debug + Clone>(
    v: impl Strategy<Value = V>,
) -> impl Strategy<Value = Vec<(String, V)>> {
    vec((s(), v), 0..5).prop_map(|mut entries| {
        let mut seen = std::collections::HashSet::new();
        entries.retain(|(k, _)| seen.insert(k.clone()));
        entries
    })
}

pub fn str_map() -> impl Strategy<Value = StrMap> {
    unique_entries(s()).prop_map(StrMap)
}

pub fn actor_name_map() -> impl Strategy<Value = ActorNameMap> {
    unique_entries(s().prop_map(|metadata| ActorName { metadata })).prop_map(ActorNameMap)
}

pub fn checkpoint() -> impl Strategy<Value = ActorCheckpoint> {
    (s(), any::<u32>(), any::<i64>()).prop_map(|(actor_id, generation, index)| ActorCheckpoint {
        actor_id,
        generation,
        index,
    })
}

pub fn message_id() -> impl Strategy<Value = MessageId> {
    (id4(), id4(), any::<u16>()).prop_map(|(gateway_id, request_id, message_index)| MessageId {
        gateway_id,
        request_id,
        message_index,
    })
}

fn kv_metadata() -> impl Strategy<Value = KvMetadata> {
    (data(), any::<i64>()).prop_map(|(version, update_ts)| KvMetadata { version, update_ts })
}

fn kv_list_query() -> impl Strategy<Value = KvListQuery> {
    prop_oneof![
        Just(KvListQuery::All),
        (data(), data(), any::<bool>()).prop_map(|(start, end, exclusive)| KvListQuery::Range(
            KvListRangeQuery {
                start,
                end,
                exclusive
            }
        )),
        data().prop_map(|key| KvListQuery::Prefix(KvListPrefixQuery { key })),
    ]
}

pub fn kv_request_data() -> impl Strategy<Value = KvRequestData> {
    prop_oneof![
        vec(data(), 0..4).prop_map(|keys| KvRequestData::Get(KvGetRequest { keys })),
        (
            kv_list_query(),
            option::of(any::<bool>()),
            option::of(any::<u64>())
        )
            .prop_map(
                |(query, reverse, limit)| KvRequestData::List(KvListRequest {
                    query,
                    reverse,
                    limit
                })
            ),
        (vec(data(), 0..4), vec(data(), 0..4))
            .prop_map(|(keys, values)| KvRequestData::Put(KvPutRequest { keys, values })),
        vec(data(), 0..4).prop_map(|keys| KvRequestData::Delete(KvDeleteRequest { keys })),
        (data(), data()).prop_map(|(start, end)| KvRequestData::DeleteRange(
            KvDeleteRangeRequest { start, end }
        )),
        Just(KvRequestData::Drop),
    ]
}

pub fn kv_response_data() -> impl Strategy<Value = KvResponseData> {
    let triple = || {
        (
            vec(data(), 0..4),
            vec(data(), 0..4),
            vec(kv_metadata(), 0..3),
        )
    };
    prop_oneof![
        s().prop_map(|message| KvResponseData::Error(KvErrorResponse { message })),
        triple().prop_map(
            |(keys, values, metadata)| KvResponseData::Get(KvGetResponse {
                keys,
                values,
                metadata
            })
        ),
        triple().prop_map(
            |(keys, values, metadata)| KvResponseData::List(KvListResponse {
                keys,
                values,
                metadata
            })
        ),
        Just(KvResponseData::Put),
        Just(KvResponseData::Delete),
        Just(KvResponseData::Drop),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let state = prop_oneof![
        Just(ActorState::Running),
        (
            prop_oneof![Just(StopCode::Ok), Just(StopCode::Error)],
            option::of(s())
        )
            .prop_map(|(code, message)| ActorState::Stopped(ActorStateStopped { code, message })),
    ];
    prop_oneof![
        prop_oneof![Just(ActorIntent::Sleep), Just(ActorIntent::Stop)]
            .prop_map(|intent| Event::ActorIntent(EventActorIntent { intent })),
        state.prop_map(|state| Event::ActorStateUpdate(EventActorStateUpdate { state })),
        option::of(any::<i64>())
            .prop_map(|alarm_ts| Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts })),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let config = (s(), option::of(s()), any::<i64>(), option::of(data())).prop_map(
        |(name, key, create_ts, input)| ActorConfig {
            name,
            key,
            create_ts,
            input,
        },
    );
    let hib = (id4(), id4()).prop_map(|(gateway_id, request_id)| HibernatingRequest {
        gateway_id,
        request_id,
    });
    prop_oneof![
        (config, vec(hib, 0..3)).prop_map(|(config, hibernating_requests)| {
            Command::StartActor(CommandStartActor {
                config,
                hibernating_requests,
            })
        }),
        Just(Command::StopActor),
    ]
}

fn opt_code() -> impl Strategy<Value = Option<u16>> {
    option::of(any::<u16>())
}

pub fn to_server_kind() -> impl Strategy<Value = ToServerTunnelMessageKind> {
    use ToServerTunnelMessageKind as K;
    prop_oneof![
        (any::<u16>(), str_map(), option::of(data()), any::<bool>()).prop_map(
            |(status, headers, body, stream)| K::ResponseStart(ToServerResponseStart {
                status,
                headers,
                body,
                stream
            })
        ),
        (data(), any::<bool>())
            .prop_map(|(body, finish)| K::ResponseChunk(ToServerResponseChunk { body, finish })),
        Just(K::ResponseAbort),
        any::<bool>()
            .prop_map(|can_hibernate| K::WebSocketOpen(ToServerWebSocketOpen { can_hibernate })),
        (data(), any::<bool>()).prop_map(|(data, binary)| K::WebSocketMessage(
            ToServerWebSocketMessage { data, binary }
        )),
        any::<u16>()
            .prop_map(|index| K::WebSocketMessageAck(ToServerWebSocketMessageAck { index })),
        (opt_code(), option::of(s()), any::<bool>()).prop_map(|(code, reason, hibernate)| {
            K::WebSocketClose(ToServerWebSocketClose {
                code,
                reason,
                hibernate,
            })
        }),
    ]
}

pub fn to_client_kind() -> impl Strategy<Value = ToClientTunnelMessageKind> {
    use ToClientTunnelMessageKind as K;
    prop_oneof![
        (s(), s(), s(), str_map(), option::of(data()), any::<bool>()).prop_map(
            |(actor_id, method, path, headers, body, stream)| K::RequestStart(
                ToClientRequestStart {
                    actor_id,
                    method,
                    path,
                    headers,
                    body,
                    stream
                }
            )
        ),
        (data(), any::<bool>())
            .prop_map(|(body, finish)| K::RequestChunk(ToClientRequestChunk { body, finish })),
        Just(K::RequestAbort),
        (s(), s(), str_map()).prop_map(|(actor_id, path, headers)| K::WebSocketOpen(
            ToClientWebSocketOpen {
                actor_id,
                path,
                headers
            }
        )),
        (data(), any::<bool>()).prop_map(|(data, binary)| K::WebSocketMessage(
            ToClientWebSocketMessage { data, binary }
        )),
        (opt_code(), option::of(s()))
            .prop_map(|(code, reason)| K::WebSocketClose(ToClientWebSocketClose { code, reason })),
    ]
}

pub fn to_server() -> impl Strategy<Value = ToServer> {
    prop_oneof![
        1 => (
            s(),
            any::<u32>(),
            any::<u32>(),
            option::of(actor_name_map()),
            option::of(s())
        )
            .prop_map(|(name, version, total_slots, prepopulate_actor_names, metadata)| {
                ToServer::Init(ToServerInit {
                    name,
                    version,
                    total_slots,
                    prepopulate_actor_names,
                    metadata,
                })
            }),
        1 => vec(
            (checkpoint(), event()).prop_map(|(checkpoint, inner)| EventWrapper {
                checkpoint,
                inner
            }),
            0..3
        )
        .prop_map(ToServer::Events),
        1 => vec(checkpoint(), 0..3).prop_map(|last_command_checkpoints| ToServer::AckCommands(
            ToServerAckCommands {
                last_command_checkpoints
            }
        )),
        1 => Just(ToServer::Stopping),
        1 => any::<i64>().prop_map(|ts| ToServer::Pong(ToServerPong { ts })),
        1 => (s(), any::<u32>(), kv_request_data()).prop_map(|(actor_id, request_id, data)| {
            ToServer::KvRequest(ToServerKvRequest {
                actor_id,
                request_id,
                data,
            })
        }),
        // Tunnel messages weighted up: they are the hot path.
        4 => (message_id(), to_server_kind()).prop_map(|(message_id, message_kind)| {
            ToServer::TunnelMessage(ToServerTunnelMessage {
                message_id,
                message_kind,
            })
        }),
    ]
}

pub fn to_client() -> impl Strategy<Value = ToClient> {
    prop_oneof![
        1 => (s(), any::<i64>(), any::<i64>(), option::of(any::<i64>())).prop_map(
            |(runner_id, runner_lost_threshold, actor_stop_threshold, grace)| {
                ToClient::Init(ToClientInit {
                    runner_id,
                    metadata: ProtocolMetadata {
                        runner_lost_threshold,
                        actor_stop_threshold,
                        serverless_drain_grace_period: grace,
                    },
                })
            }
        ),
        1 => vec(
            (checkpoint(), command()).prop_map(|(checkpoint, inner)| CommandWrapper {
                checkpoint,
                inner
            }),
            0..3
        )
        .prop_map(ToClient::Commands),
        1 => vec(checkpoint(), 0..3).prop_map(|last_event_checkpoints| ToClient::AckEvents(
            ToClientAckEvents {
                last_event_checkpoints
            }
        )),
        1 => (any::<u32>(), kv_response_data()).prop_map(|(request_id, data)| ToClient::KvResponse(
            ToClientKvResponse { request_id, data }
        )),
        4 => (message_id(), to_client_kind()).prop_map(|(message_id, message_kind)| {
            ToClient::TunnelMessage(ToClientTunnelMessage {
                message_id,
                message_kind,
            })
        }),
        1 => any::<i64>().prop_map(|ts| ToClient::Ping(ToClientPing { ts })),
    ]
}
