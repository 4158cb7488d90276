//! Rivet runner protocol v7 message types (SPEC §1.3), mirroring the BARE schema that the npm
//! package `@rivetkit/engine-runner-protocol@2.2.1` encodes.
//!
//! Every type derives serde `Serialize`/`Deserialize` so that its serde encoding in a BARE
//! serializer (this module's codec or `serde_bare` 0.5) is byte-identical to the TS encoding:
//! unions are Rust enums declared in schema order (tag = variant index), `void` members are unit
//! variants, `data` fields are `Vec<u8>` serialized as bytes, `data[4]` ids are `[u8; 4]`
//! (serialized as a 4-tuple = 4 raw bytes), `map<str><V>` are insertion-ordered vectors whose
//! decoding rejects duplicate keys.
//!
//! This module must never hold behaviour beyond (de)serialization shape: no validation of
//! semantics, no I/O.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// ---------------------------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------------------------

/// `Id = str`.
pub type Id = String;
/// `Json = str`.
pub type Json = String;
/// `GatewayId = data[4]`.
pub type GatewayId = [u8; 4];
/// `RequestId = data[4]`.
pub type RequestId = [u8; 4];
/// `MessageIndex = u16`.
pub type MessageIndex = u16;
/// `KvKey = data`.
pub type KvKey = Vec<u8>;
/// `KvValue = data`.
pub type KvValue = Vec<u8>;

/// serde helper for `list<data>` fields (`Vec<Vec<u8>>`): each element is encoded as BARE
/// `data` (uvarint length + bytes) rather than as a sequence of `u8`s. The bytes on the wire are
/// the same either way; this only makes (de)serialization fast.
pub mod bytes_list {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(Bytes::new(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<ByteBuf>::deserialize(d)?;
        Ok(v.into_iter().map(ByteBuf::into_vec).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Ordered maps with string keys
// ---------------------------------------------------------------------------------------------

fn serialize_entries<S: Serializer, V: Serialize>(
    entries: &[(String, V)],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

/// Above this many entries duplicate detection switches from a linear scan to a hash set.
const LINEAR_DUP_SCAN_MAX: usize = 16;

struct EntriesVisitor<V>(std::marker::PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
    type Value = Vec<(String, V)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a BARE map with unique string keys")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        // Never trust the size hint beyond a small bound: the decoder already refuses counts
        // larger than the remaining input, this keeps the first allocation modest as well.
        let cap = access.size_hint().unwrap_or(0).min(64);
        let mut entries: Vec<(String, V)> = Vec::with_capacity(cap);
        let mut seen: Option<std::collections::HashSet<String>> = None;
        while let Some(key) = access.next_key::<String>()? {
            let dup = match &mut seen {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = entries.iter().any(|(k, _)| *k == key);
                    if !dup && entries.len() >= LINEAR_DUP_SCAN_MAX {
                        let mut set: std::collections::HashSet<String> =
                            entries.iter().map(|(k, _)| k.clone()).collect();
                        set.insert(key.clone());
                        seen = Some(set);
                    }
                    dup
                }
            };
            if dup {
                return Err(de::Error::custom(DuplicateKeyMarker(&key)));
            }
            let value = access.next_value::<V>()?;
            entries.push((key, value));
        }
        Ok(entries)
    }
}

/// Display text used for duplicate-key errors; the codec recognises the prefix and turns it
/// into `ProtocolError::DuplicateKey`.
pub(crate) const DUPLICATE_KEY_PREFIX: &str = "duplicated map key";

struct DuplicateKeyMarker<'a>(&'a str);

impl fmt::Display for DuplicateKeyMarker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{DUPLICATE_KEY_PREFIX} {:?}", self.0)
    }
}

/// `map<str><str>`, insertion ordered. Decoding rejects duplicate keys, like the TS decoder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StrMap(pub Vec<(String, String)>);

impl StrMap {
    pub fn new() -> Self {
        StrMap(Vec::new())
    }

    /// First value stored under `key` (keys are unique in decoded maps).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl From<Vec<(String, String)>> for StrMap {
    fn from(v: Vec<(String, String)>) -> Self {
        StrMap(v)
    }
}

impl Serialize for StrMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_entries(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor::<String>(std::marker::PhantomData))
            .map(StrMap)
    }
}

/// `map<str><ActorName>`, insertion ordered. Decoding rejects duplicate keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActorNameMap(pub Vec<(String, ActorName)>);

impl ActorNameMap {
    pub fn get(&self, key: &str) -> Option<&ActorName> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(String, ActorName)>> for ActorNameMap {
    fn from(v: Vec<(String, ActorName)>) -> Self {
        ActorNameMap(v)
    }
}

impl Serialize for ActorNameMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_entries(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for ActorNameMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor::<ActorName>(std::marker::PhantomData))
            .map(ActorNameMap)
    }
}

// ---------------------------------------------------------------------------------------------
// Key-value
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMetadata {
    #[serde(with = "serde_bytes")]
    pub version: Vec<u8>,
    pub update_ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvListRangeQuery {
    #[serde(with = "serde_bytes")]
    pub start: KvKey,
    #[serde(with = "serde_bytes")]
    pub end: KvKey,
    pub exclusive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvListPrefixQuery {
    #[serde(with = "serde_bytes")]
    pub key: KvKey,
}

/// `KvListQuery` union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvListQuery {
    /// #0 `KvListAllQuery` (void)
    All,
    /// #1
    Range(KvListRangeQuery),
    /// #2
    Prefix(KvListPrefixQuery),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGetRequest {
    #[serde(with = "bytes_list")]
    pub keys: Vec<KvKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvListRequest {
    pub query: KvListQuery,
    pub reverse: Option<bool>,
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPutRequest {
    #[serde(with = "bytes_list")]
    pub keys: Vec<KvKey>,
    #[serde(with = "bytes_list")]
    pub values: Vec<KvValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDeleteRequest {
    #[serde(with = "bytes_list")]
    pub keys: Vec<KvKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDeleteRangeRequest {
    #[serde(with = "serde_bytes")]
    pub start: KvKey,
    #[serde(with = "serde_bytes")]
    pub end: KvKey,
}

/// `KvRequestData` union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRequestData {
    /// #0
    Get(KvGetRequest),
    /// #1
    List(KvListRequest),
    /// #2
    Put(KvPutRequest),
    /// #3
    Delete(KvDeleteRequest),
    /// #4
    DeleteRange(KvDeleteRangeRequest),
    /// #5 `KvDropRequest` (void)
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvErrorResponse {
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGetResponse {
    #[serde(with = "bytes_list")]
    pub keys: Vec<KvKey>,
    #[serde(with = "bytes_list")]
    pub values: Vec<KvValue>,
    pub metadata: Vec<KvMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvListResponse {
    #[serde(with = "bytes_list")]
    pub keys: Vec<KvKey>,
    #[serde(with = "bytes_list")]
    pub values: Vec<KvValue>,
    pub metadata: Vec<KvMetadata>,
}

/// `KvResponseData` union. A DeleteRange request is answered with `Delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponseData {
    /// #0
    Error(KvErrorResponse),
    /// #1
    Get(KvGetResponse),
    /// #2
    List(KvListResponse),
    /// #3 `KvPutResponse` (void)
    Put,
    /// #4 `KvDeleteResponse` (void)
    Delete,
    /// #5 `KvDropResponse` (void)
    Drop,
}

// ---------------------------------------------------------------------------------------------
// Actors
// ---------------------------------------------------------------------------------------------

/// `StopCode` enum { OK, ERROR }.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StopCode {
    Ok,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorName {
    pub metadata: Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorConfig {
    pub name: String,
    pub key: Option<String>,
    pub create_ts: i64,
    #[serde(with = "serde_bytes")]
    pub input: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActorCheckpoint {
    pub actor_id: Id,
    pub generation: u32,
    pub index: i64,
}

/// `ActorIntent` union.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActorIntent {
    /// #0 (void)
    Sleep,
    /// #1 (void)
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorStateStopped {
    pub code: StopCode,
    pub message: Option<String>,
}

/// `ActorState` union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorState {
    /// #0 (void)
    Running,
    /// #1
    Stopped(ActorStateStopped),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventActorIntent {
    pub intent: ActorIntent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventActorStateUpdate {
    pub state: ActorState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventActorSetAlarm {
    pub alarm_ts: Option<i64>,
}

/// `Event` union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// #0
    ActorIntent(EventActorIntent),
    /// #1
    ActorStateUpdate(EventActorStateUpdate),
    /// #2
    ActorSetAlarm(EventActorSetAlarm),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventWrapper {
    pub checkpoint: ActorCheckpoint,
    pub inner: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HibernatingRequest {
    pub gateway_id: GatewayId,
    pub request_id: RequestId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStartActor {
    pub config: ActorConfig,
    pub hibernating_requests: Vec<HibernatingRequest>,
}

/// `Command` union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// #0
    StartActor(CommandStartActor),
    /// #1 `CommandStopActor` (void)
    StopActor,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandWrapper {
    pub checkpoint: ActorCheckpoint,
    pub inner: Command,
}

// ---------------------------------------------------------------------------------------------
// Tunnel
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageId {
    pub gateway_id: GatewayId,
    pub request_id: RequestId,
    pub message_index: MessageIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientRequestStart {
    pub actor_id: Id,
    pub method: String,
    pub path: String,
    pub headers: StrMap,
    #[serde(with = "serde_bytes")]
    pub body: Option<Vec<u8>>,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientRequestChunk {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub finish: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientWebSocketOpen {
    pub actor_id: Id,
    pub path: String,
    pub headers: StrMap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientWebSocketMessage {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub binary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientWebSocketClose {
    pub code: Option<u16>,
    pub reason: Option<String>,
}

/// `ToClientTunnelMessageKind` union (gateway→runner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToClientTunnelMessageKind {
    /// #0
    RequestStart(ToClientRequestStart),
    /// #1
    RequestChunk(ToClientRequestChunk),
    /// #2 (void)
    RequestAbort,
    /// #3
    WebSocketOpen(ToClientWebSocketOpen),
    /// #4
    WebSocketMessage(ToClientWebSocketMessage),
    /// #5
    WebSocketClose(ToClientWebSocketClose),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientTunnelMessage {
    pub message_id: MessageId,
    pub message_kind: ToClientTunnelMessageKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerResponseStart {
    pub status: u16,
    pub headers: StrMap,
    #[serde(with = "serde_bytes")]
    pub body: Option<Vec<u8>>,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerResponseChunk {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub finish: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerWebSocketOpen {
    pub can_hibernate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerWebSocketMessage {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub binary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerWebSocketMessageAck {
    pub index: MessageIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerWebSocketClose {
    pub code: Option<u16>,
    pub reason: Option<String>,
    pub hibernate: bool,
}

/// `ToServerTunnelMessageKind` union (runner→gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToServerTunnelMessageKind {
    /// #0
    ResponseStart(ToServerResponseStart),
    /// #1
    ResponseChunk(ToServerResponseChunk),
    /// #2 (void)
    ResponseAbort,
    /// #3
    WebSocketOpen(ToServerWebSocketOpen),
    /// #4
    WebSocketMessage(ToServerWebSocketMessage),
    /// #5
    WebSocketMessageAck(ToServerWebSocketMessageAck),
    /// #6
    WebSocketClose(ToServerWebSocketClose),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerTunnelMessage {
    pub message_id: MessageId,
    pub message_kind: ToServerTunnelMessageKind,
}

// ---------------------------------------------------------------------------------------------
// Top level
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerInit {
    pub name: String,
    pub version: u32,
    pub total_slots: u32,
    pub prepopulate_actor_names: Option<ActorNameMap>,
    pub metadata: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerAckCommands {
    pub last_command_checkpoints: Vec<ActorCheckpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerPong {
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToServerKvRequest {
    pub actor_id: Id,
    pub request_id: u32,
    pub data: KvRequestData,
}

/// `ToServer` union: runner→gateway, one per binary WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToServer {
    /// #0
    Init(ToServerInit),
    /// #1 `ToServerEvents = list<EventWrapper>`
    Events(Vec<EventWrapper>),
    /// #2
    AckCommands(ToServerAckCommands),
    /// #3 (void)
    Stopping,
    /// #4
    Pong(ToServerPong),
    /// #5
    KvRequest(ToServerKvRequest),
    /// #6
    TunnelMessage(ToServerTunnelMessage),
}

/// Milliseconds. rivetkit derives its sleep timeout from `actor_stop_threshold - 1000`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolMetadata {
    pub runner_lost_threshold: i64,
    pub actor_stop_threshold: i64,
    pub serverless_drain_grace_period: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientInit {
    pub runner_id: Id,
    pub metadata: ProtocolMetadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientAckEvents {
    pub last_event_checkpoints: Vec<ActorCheckpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientKvResponse {
    pub request_id: u32,
    pub data: KvResponseData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToClientPing {
    pub ts: i64,
}

/// `ToClient` union: gateway→runner, one per binary WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToClient {
    /// #0
    Init(ToClientInit),
    /// #1 `ToClientCommands = list<CommandWrapper>`
    Commands(Vec<CommandWrapper>),
    /// #2
    AckEvents(ToClientAckEvents),
    /// #3
    KvResponse(ToClientKvResponse),
    /// #4
    TunnelMessage(ToClientTunnelMessage),
    /// #5
    Ping(ToClientPing),
}
