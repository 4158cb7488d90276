//! Where the engine's records live in the store: the key prefixes, the key of each record
//! (actor, input, hibernating socket; runner configs have theirs in `runner_configs`) and the [`StoreOp`]s the shell applies in order. The
//! records themselves, and the layout as a whole, are described in `persist`.
//!
//! Pure functions of ids and values: must never hold state or reach the engine.

use crate::protocol::HibernatingRequest;

/// Key prefix of every engine record.
pub const KEY_PREFIX: &[u8] = b"engine/";
/// Key prefix of actor records (followed by the actor id).
pub const ACTOR_KEY_PREFIX: &[u8] = b"engine/actor/";
/// Key prefix of actor input records (followed by the actor id).
pub const INPUT_KEY_PREFIX: &[u8] = b"engine/input/";
/// Key prefix of hibernating-socket records (followed by `{actor id}/` and 8 id bytes).
pub const HIB_KEY_PREFIX: &[u8] = b"engine/hib/";
/// Key prefix of runner config records (see `runner_configs::runner_config_key`).
pub const RUNNER_CONFIG_KEY_PREFIX: &[u8] = b"engine/runner-config/";

/// One write for the store, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// `engine/actor/{id}`.
pub fn actor_key(actor_id: &str) -> Vec<u8> {
    [ACTOR_KEY_PREFIX, actor_id.as_bytes()].concat()
}

/// `engine/input/{id}`.
pub fn input_key(actor_id: &str) -> Vec<u8> {
    [INPUT_KEY_PREFIX, actor_id.as_bytes()].concat()
}

/// `engine/hib/{actor id}/{gateway id}{request id}`.
pub fn hib_key(actor_id: &str, h: HibernatingRequest) -> Vec<u8> {
    let mut k = Vec::with_capacity(HIB_KEY_PREFIX.len() + actor_id.len() + 9);
    k.extend_from_slice(HIB_KEY_PREFIX);
    k.extend_from_slice(actor_id.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&h.gateway_id);
    k.extend_from_slice(&h.request_id);
    k
}

/// The actor id and socket of a hibernating record's key (without the prefix).
pub(super) fn parse_hib_key(rest: &[u8]) -> Option<(&str, HibernatingRequest)> {
    let split = rest.len().checked_sub(9)?;
    let (id, tail) = rest.split_at(split);
    if id.is_empty() || tail[0] != b'/' {
        return None;
    }
    let id = std::str::from_utf8(id).ok()?;
    let mut gateway_id = [0u8; 4];
    let mut request_id = [0u8; 4];
    gateway_id.copy_from_slice(&tail[1..5]);
    request_id.copy_from_slice(&tail[5..9]);
    Some((
        id,
        HibernatingRequest {
            gateway_id,
            request_id,
        },
    ))
}

pub(super) fn hib_put(actor_id: &str, h: HibernatingRequest, last_seen_ms: i64) -> StoreOp {
    StoreOp::Put {
        key: hib_key(actor_id, h),
        value: last_seen_ms.to_le_bytes().to_vec(),
    }
}

pub(super) fn hib_delete(actor_id: &str, h: HibernatingRequest) -> StoreOp {
    StoreOp::Delete {
        key: hib_key(actor_id, h),
    }
}
