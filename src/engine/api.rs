//! The engine HTTP API (JSON) that rivetkit@2.2.1's client calls on its engine endpoint:
//! `/actors` (list, create, get-or-create), `/actors/{id}` (get, destroy), `/actors/names`,
//! `/metadata`, `/health`, `/datacenters`, and `/runner-configs` (list, upsert, delete) that its
//! serverless runners call. Request and response shapes follow what that client
//! sends and reads; they are written down with their sources in `tests/interop/api_shapes.md`.
//!
//! Sans-IO: takes a parsed request and returns status, JSON body and the engine actions that the
//! request caused (a create starts its actor). Must never wait: every route answers at once.
//! Errors are `{"group","code","message"}` JSON, which the client turns into an `ActorError`.

use std::time::Instant;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::runner_configs::{RunnerConfig, RunnerConfigError, Variant};
use super::{Action, ActorInfo, CrashPolicy, CreateActor, CreateError, Engine};

/// Most actors returned by one list call, and the default.
pub const LIST_LIMIT_MAX: usize = 1000;
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// Most ids accepted in `actor_ids`.
pub const ACTOR_IDS_MAX: usize = 100;
/// `/actors/names` page size when `limit` is absent (the Rivet engine's default), and the
/// most it returns in one page (the Rivet engine has no maximum; a page is bounded here).
pub const NAMES_LIMIT_DEFAULT: usize = 100;
pub const NAMES_LIMIT_MAX: usize = 1000;
/// `GET /runner-configs` page size when `limit` is absent (the Rivet engine's default), and
/// the most one page holds (the Rivet engine has no maximum).
pub const RUNNER_CONFIGS_LIMIT_DEFAULT: usize = 100;
pub const RUNNER_CONFIGS_LIMIT_MAX: usize = 1000;
/// Most names in `runner_name` (repeated) and `runner_names` (comma-separated) together.
pub const RUNNER_NAMES_MAX: usize = 100;

/// What to answer. The body is always JSON (`content-type: application/json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
    /// Engine actions caused by the request, for the shell to execute.
    pub actions: Vec<Action>,
}

impl ApiReply {
    fn ok(v: Value) -> Self {
        ApiReply {
            status: 200,
            body: v.to_string(),
            actions: Vec::new(),
        }
    }

    fn error(status: u16, group: &str, code: &str, message: &str) -> Self {
        ApiReply {
            status,
            body: json!({ "group": group, "code": code, "message": message }).to_string(),
            actions: Vec::new(),
        }
    }

    fn bad_request(message: &str) -> Self {
        Self::error(400, "api", "bad_request", message)
    }

    fn actor_not_found() -> Self {
        Self::error(
            404,
            "actor",
            "not_found",
            "The actor does not exist or was destroyed.",
        )
    }
}

/// Handle one API request. `path` has no query string; `query` holds the decoded query pairs
/// (see [`parse_query`]).
pub fn handle(
    engine: &mut Engine,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    now: Instant,
) -> ApiReply {
    let trimmed = path.trim_matches('/');
    let segs: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    let namespace = param(query, "namespace")
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    match (method, segs.as_slice()) {
        ("GET", ["actors"]) => list_actors(engine, &namespace, query),
        ("POST", ["actors"]) => create_actor(engine, &namespace, body, now),
        ("PUT", ["actors"]) => get_or_create_actor(engine, &namespace, body, now),
        ("GET", ["actors", "names"]) => actor_names(engine, &namespace, query),
        ("GET", ["actors", id]) => match percent_decode(id) {
            Some(id) => get_actor(engine, &namespace, &id),
            None => ApiReply::bad_request("invalid actor id"),
        },
        ("DELETE", ["actors", id]) => match percent_decode(id) {
            Some(id) => destroy_actor(engine, &namespace, &id, now),
            None => ApiReply::bad_request("invalid actor id"),
        },
        ("GET", ["metadata"]) => ApiReply::ok(json!({
            "runtime": "engine",
            "version": engine.config().version,
        })),
        ("GET", ["health"]) => ApiReply::ok(json!({
            "runtime": "engine",
            "status": "ok",
            "version": engine.config().version,
        })),
        ("GET", ["datacenters"]) => ApiReply::ok(json!({
            "datacenters": [{
                "label": 1,
                "name": engine.config().datacenter,
                "url": engine.config().public_url,
            }],
            "pagination": { "cursor": null },
        })),
        ("GET", ["runner-configs"]) => list_runner_configs(engine, &namespace, query),
        ("PUT", ["runner-configs", name]) => match percent_decode(name) {
            Some(name) => upsert_runner_config(engine, &namespace, &name, body),
            None => ApiReply::bad_request("invalid runner name"),
        },
        ("DELETE", ["runner-configs", name]) => match percent_decode(name) {
            Some(name) => delete_runner_config(engine, &namespace, &name),
            None => ApiReply::bad_request("invalid runner name"),
        },
        ("POST", ["runner-configs", "serverless-health-check"])
        | ("POST", ["runner-configs", _, "refresh-metadata"]) => ApiReply::error(
            501,
            "api",
            "not_implemented",
            "Serverless health checks and metadata refreshes are not supported yet.",
        ),
        (
            _,
            ["actors"]
            | ["actors", _]
            | ["metadata"]
            | ["health"]
            | ["datacenters"]
            | ["runner-configs"]
            | ["runner-configs", _],
        ) => ApiReply::error(405, "api", "method_not_allowed", "Method not allowed."),
        _ => ApiReply::error(404, "api", "not_found", "No such route."),
    }
}

pub use crate::http::parse::{parse_query, percent_decode};

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The actor object rivetkit reads (`actor_id`, `name`, `key`, `create_ts`, `start_ts`,
/// `connectable_ts`, `sleep_ts`, `destroy_ts`, `error`) plus the rest of the engine's shape.
pub fn actor_json(engine: &Engine, a: &ActorInfo) -> Value {
    json!({
        "actor_id": a.actor_id,
        "name": a.name,
        "key": a.key,
        "namespace_id": a.namespace,
        "datacenter": engine.config().datacenter,
        "runner_name_selector": a.runner_name,
        "crash_policy": a.crash_policy.as_str(),
        "create_ts": a.create_ts,
        "start_ts": a.start_ts,
        "pending_allocation_ts": a.pending_allocation_ts,
        "connectable_ts": a.connectable_ts,
        "sleep_ts": a.sleep_ts,
        "reschedule_ts": null,
        "destroy_ts": a.destroy_ts,
        // As the Rivet engine shows a failing serverless pool on the actors waiting for it.
        "error": pool_error_of(engine, a),
    })
}

/// `{"runner_pool_error": …}` for an actor that is not running while its pool has an error.
fn pool_error_of(engine: &Engine, a: &ActorInfo) -> Value {
    if a.status == super::ActorStatus::Running {
        return Value::Null;
    }
    match engine.pool_error(&a.namespace, &a.runner_name) {
        Some(e) => json!({ "runner_pool_error": e }),
        None => Value::Null,
    }
}

fn list_actors(engine: &Engine, namespace: &str, query: &[(String, String)]) -> ApiReply {
    let name = param(query, "name").filter(|s| !s.is_empty());
    let key = param(query, "key");
    let include_destroyed = param(query, "include_destroyed") == Some("true");
    let limit = match param(query, "limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(LIST_LIMIT_MAX),
            _ => return ApiReply::bad_request("limit must be a positive integer"),
        },
    };
    let cursor = match param(query, "cursor").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return ApiReply::bad_request("invalid cursor"),
        },
    };

    if let Some(ids) = param(query, "actor_ids") {
        let ids: Vec<&str> = ids
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if ids.len() > ACTOR_IDS_MAX {
            return ApiReply::bad_request("too many actor ids");
        }
        let actors: Vec<Value> = ids
            .iter()
            .filter_map(|id| engine.actor(id))
            .filter(|a| a.namespace == namespace && name.is_none_or(|n| n == a.name))
            .map(|a| actor_json(engine, &a))
            .collect();
        return ApiReply::ok(json!({ "actors": actors, "pagination": { "cursor": null } }));
    }

    if let Some(key) = key {
        let Some(name) = name else {
            return ApiReply::bad_request("name is required when key is provided");
        };
        let actors: Vec<Value> = engine
            .actor_by_key(namespace, name, key)
            .map(|a| actor_json(engine, &a))
            .into_iter()
            .collect();
        return ApiReply::ok(json!({ "actors": actors, "pagination": { "cursor": null } }));
    }

    let (list, next) = engine.list_actors(namespace, name, include_destroyed, cursor, limit);
    let actors: Vec<Value> = list.iter().map(|a| actor_json(engine, a)).collect();
    ApiReply::ok(json!({
        "actors": actors,
        "pagination": { "cursor": next.map(|n| n.to_string()) },
    }))
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    name: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    runner_name_selector: Option<String>,
    #[serde(default)]
    crash_policy: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    datacenter: Option<String>,
}

fn parse_create(engine: &Engine, namespace: &str, body: &[u8]) -> Result<CreateActor, ApiReply> {
    let b: CreateBody = serde_json::from_slice(body)
        .map_err(|e| ApiReply::bad_request(&format!("invalid request body: {e}")))?;
    if let Some(dc) = &b.datacenter {
        if dc != &engine.config().datacenter {
            return Err(ApiReply::error(
                400,
                "datacenter",
                "not_found",
                "The datacenter does not exist.",
            ));
        }
    }
    let crash_policy = match b.crash_policy.as_deref() {
        None => CrashPolicy::Sleep,
        Some(s) => CrashPolicy::parse(s).ok_or_else(|| {
            ApiReply::bad_request("crash_policy must be sleep, destroy or restart")
        })?,
    };
    let input = match b.input {
        None => None,
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|_| ApiReply::bad_request("input must be base64"))?,
        ),
    };
    Ok(CreateActor {
        namespace: namespace.to_string(),
        name: b.name,
        key: b.key,
        runner_name: b.runner_name_selector,
        input,
        crash_policy,
    })
}

fn create_error(engine: &Engine, e: CreateError) -> ApiReply {
    let cfg = engine.config();
    match e {
        CreateError::DuplicateKey => ApiReply::error(
            400,
            "actor",
            "duplicate_key",
            "An actor with this name and key already exists.",
        ),
        CreateError::TooManyActors => ApiReply::error(
            429,
            "actor",
            "too_many_actors",
            "The gateway holds its maximum number of actors.",
        ),
        CreateError::InvalidName => ApiReply::bad_request("invalid actor name"),
        CreateError::KeyTooLong => ApiReply::bad_request("actor key too long"),
        CreateError::InputTooLarge => ApiReply::error(
            413,
            "actor",
            "input_too_large",
            "The actor input is too large.",
        ),
        CreateError::RunnerNameTooLong => ApiReply::bad_request(&format!(
            "runner_name_selector is longer than limits.runner_name_bytes ({} bytes)",
            cfg.runner_name_bytes
        )),
        CreateError::NamespaceTooLong => ApiReply::bad_request(&format!(
            "namespace is longer than limits.runner_name_bytes ({} bytes)",
            cfg.runner_name_bytes
        )),
        CreateError::NamespaceQuota => ApiReply::error(
            429,
            "actor",
            "quota_exceeded",
            &format!(
                "The namespace holds its maximum of {} live actors (limits.actors_per_namespace).",
                cfg.actors_per_namespace
            ),
        ),
    }
}

fn create_actor(engine: &mut Engine, namespace: &str, body: &[u8], now: Instant) -> ApiReply {
    let req = match parse_create(engine, namespace, body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    match engine.create_actor(req, now) {
        Ok((info, actions)) => {
            let mut reply = ApiReply::ok(json!({ "actor": actor_json(engine, &info) }));
            reply.actions = actions;
            reply
        }
        Err(e) => create_error(engine, e),
    }
}

fn get_or_create_actor(
    engine: &mut Engine,
    namespace: &str,
    body: &[u8],
    now: Instant,
) -> ApiReply {
    let req = match parse_create(engine, namespace, body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.key.is_none() {
        return ApiReply::bad_request("key is required");
    }
    match engine.get_or_create_actor(req, now) {
        Ok((info, created, actions)) => {
            let mut reply = ApiReply::ok(json!({
                "actor": actor_json(engine, &info),
                "created": created,
            }));
            reply.actions = actions;
            reply
        }
        Err(e) => create_error(engine, e),
    }
}

fn get_actor(engine: &Engine, namespace: &str, id: &str) -> ApiReply {
    match engine.actor(id) {
        Some(a) if a.namespace == namespace => {
            ApiReply::ok(json!({ "actor": actor_json(engine, &a) }))
        }
        _ => ApiReply::actor_not_found(),
    }
}

fn destroy_actor(engine: &mut Engine, namespace: &str, id: &str, now: Instant) -> ApiReply {
    match engine.destroy_actor(namespace, id, now) {
        Some(actions) => {
            let mut reply = ApiReply::ok(json!({}));
            reply.actions = actions;
            reply
        }
        None => ApiReply::actor_not_found(),
    }
}

/// `GET /actors/names?namespace=&limit=&cursor=`, paginated as the Rivet engine does it
/// (`api-peer/src/actors/list_names.rs`): names in order after `cursor`, at most `limit`
/// (default 100), and the cursor of the next page is the last name of this one (`null` for an
/// empty page).
fn actor_names(engine: &Engine, namespace: &str, query: &[(String, String)]) -> ApiReply {
    let limit = match param(query, "limit") {
        None => NAMES_LIMIT_DEFAULT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(NAMES_LIMIT_MAX),
            _ => return ApiReply::bad_request("limit must be a positive integer"),
        },
    };
    let cursor = param(query, "cursor").filter(|s| !s.is_empty());
    let page = engine.actor_names(namespace, cursor, limit);
    let next = page.last().map(|(name, _)| name.clone());
    let mut names = Map::new();
    for (name, metadata) in page {
        let metadata = match serde_json::from_str::<Value>(&metadata) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({}),
        };
        names.insert(name, json!({ "metadata": metadata }));
    }
    ApiReply::ok(json!({ "names": names, "pagination": { "cursor": next } }))
}

fn runner_config_error(e: RunnerConfigError) -> ApiReply {
    ApiReply::error(e.status(), "runner_config", e.code(), &e.to_string())
}

/// `PUT /runner-configs/{name}?namespace=` with `{"datacenters": {dc: config}}`, as the Rivet
/// engine's `api-public/src/runner_configs/upsert.rs`: an unknown top-level field is refused
/// (`deny_unknown_fields`); a datacenter that is not ours refuses the whole request
/// (`datacenter.not_found`, nothing changed); ours absent from the map deletes our config
/// (the engine deletes the config of every datacenter the body leaves out). Answers
/// `{"endpoint_config_changed": bool}`.
fn upsert_runner_config(engine: &mut Engine, namespace: &str, name: &str, body: &[u8]) -> ApiReply {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UpsertBody {
        datacenters: Map<String, Value>,
    }
    let b: UpsertBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return ApiReply::bad_request(&format!("invalid request body: {e}")),
    };
    let ours = engine.config().datacenter.clone();
    let mut entry = None;
    for (dc, v) in b.datacenters {
        if dc != ours {
            return ApiReply::error(
                400,
                "datacenter",
                "not_found",
                "The provided datacenter does not exist.",
            );
        }
        entry = Some(v);
    }
    let Some(v) = entry else {
        if name.len() > engine.config().runner_name_bytes
            || namespace.len() > engine.config().runner_name_bytes
        {
            return runner_config_error(RunnerConfigError::NameTooLong {
                max: engine.config().runner_name_bytes,
            });
        }
        engine.delete_runner_config(namespace, name);
        return ApiReply::ok(json!({ "endpoint_config_changed": false }));
    };
    let config = match RunnerConfig::from_json(v) {
        Ok(c) => c,
        Err(m) => return ApiReply::bad_request(&format!("invalid request body: {m}")),
    };
    match engine.upsert_runner_config(namespace, name, config) {
        Ok(changed) => ApiReply::ok(json!({ "endpoint_config_changed": changed })),
        Err(e) => runner_config_error(e),
    }
}

/// `DELETE /runner-configs/{name}?namespace=`: `{}`, whether or not there was a config (as
/// the Rivet engine).
fn delete_runner_config(engine: &mut Engine, namespace: &str, name: &str) -> ApiReply {
    let max = engine.config().runner_name_bytes;
    if name.len() > max || namespace.len() > max {
        return runner_config_error(RunnerConfigError::NameTooLong { max });
    }
    engine.delete_runner_config(namespace, name);
    ApiReply::ok(json!({}))
}

/// `GET /runner-configs?namespace=[&runner_name=…][&runner_names=a,b][&variant=][&limit=][&cursor=]`
/// in the Rivet engine's public shape: `{"runner_configs": {name: {"datacenters": {dc:
/// config}}}, "pagination": {"cursor"}}`. With names (`runner_name` repeated, or the
/// deprecated comma-separated `runner_names`) it answers those that exist, without a cursor.
/// Otherwise configs in name order, `variant` (`serverless` or `normal`) filtering, pages of
/// `limit` (default 100); the cursor is `{variant}:{name}` of the page's last config as the
/// engine's per-datacenter list makes it, and is `null` after the last page (the engine's
/// public list always answers `null`).
fn list_runner_configs(engine: &Engine, namespace: &str, query: &[(String, String)]) -> ApiReply {
    let mut names: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k == "runner_name")
        .map(|(_, v)| v.as_str())
        .collect();
    if let Some(list) = param(query, "runner_names") {
        names.extend(list.split(','));
    }
    names.retain(|n| !n.is_empty());
    if names.len() > RUNNER_NAMES_MAX {
        return ApiReply::bad_request(&format!(
            "at most {RUNNER_NAMES_MAX} runner names in one call"
        ));
    }
    let dc = &engine.config().datacenter;
    let entry = |c: &RunnerConfig| json!({ "datacenters": { dc.as_str(): c.to_json() } });
    let mut out = Map::new();
    if !names.is_empty() {
        for n in names {
            if let Some(c) = engine.runner_config(namespace, n) {
                out.insert(n.to_string(), entry(c));
            }
        }
        return ApiReply::ok(json!({ "runner_configs": out, "pagination": { "cursor": null } }));
    }
    let variant = match param(query, "variant").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match Variant::parse(s) {
            Some(v) => Some(v),
            None => return ApiReply::bad_request("variant must be serverless or normal"),
        },
    };
    let limit = match param(query, "limit") {
        None => RUNNER_CONFIGS_LIMIT_DEFAULT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(RUNNER_CONFIGS_LIMIT_MAX),
            _ => return ApiReply::bad_request("limit must be a positive integer"),
        },
    };
    let after = match param(query, "cursor").filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => match c.split_once(':') {
            Some((_, name)) => Some(name),
            None => return ApiReply::bad_request("invalid cursor"),
        },
    };
    let (page, more) = engine.runner_configs_page(namespace, variant, after, limit);
    let cursor = match page.last() {
        Some((name, c)) if more => Some(format!("{}:{name}", c.variant().as_str())),
        _ => None,
    };
    for (name, c) in page {
        out.insert(name.to_string(), entry(c));
    }
    ApiReply::ok(json!({ "runner_configs": out, "pagination": { "cursor": cursor } }))
}
