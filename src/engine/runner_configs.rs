//! Runner configurations: the settings of serverless runner pools (and "normal" configs), per
//! namespace and runner name, as the Rivet engine keeps them at the `rivetkit@2.2.1` release
//! (`engine/packages/types/src/runner_configs.rs`, `pegboard/src/ops/runner_config/`).
//!
//! This module holds the data model, the parsing and validation of a datacenter's entry of
//! `PUT /runner-configs/{name}`, the bounds, the durable records and [`desired_runners`]. The
//! pools themselves (starting runners, the autoscaler, the outbound requests) are in `pools`;
//! every change of a config tells them.
//!
//! # Durability
//!
//! Each config is one record, `engine/runner-config/{namespace length, u32 BE}{namespace}{name}`
//! → [`RunnerConfigRecord`] as JSON (`"v": 1`, the config in the engine's API shape). A change
//! queues a put or a delete that [`Engine::take_store_ops`] hands to the shell with the
//! actors' records; the API's answer waits for the commit like every engine API change.
//! [`Engine::restore`] brings every readable record back, whatever the limits are now (a lowered
//! limit refuses new configs; it never drops stored ones).
//!
//! Sans-IO and pure: must never panic on a request body or a stored record.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::store_keys::{StoreOp, RUNNER_CONFIG_KEY_PREFIX};
use super::Engine;

/// Current [`RunnerConfigRecord::v`].
pub const RUNNER_CONFIG_RECORD_VERSION: u32 = 1;

/// A serverless pool's settings: where runners are started (`GET {url}/start` with
/// `headers`), how long each start request lives, and how the pool is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerlessConfig {
    /// `http` or `https`; stored as given.
    pub url: String,
    /// Extra headers of the requests to `url`, stored as given.
    pub headers: BTreeMap<String, String>,
    /// Seconds one start request may last (the runner drains before its end).
    pub request_lifespan: u32,
    /// Actor slots of one runner (at least 1).
    pub slots_per_runner: u32,
    pub min_runners: u32,
    pub max_runners: u32,
    /// Runners kept beyond what the slots in use need.
    pub runners_margin: u32,
    /// Milliseconds between metadata polls; `None`: the default. The poller clamps it.
    pub metadata_poll_interval: Option<u64>,
}

/// What kind of runners the config describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerConfigKind {
    /// Runners that connect by themselves (nothing to start).
    Normal,
    Serverless(ServerlessConfig),
}

/// One runner name's config in this datacenter.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerConfig {
    pub kind: RunnerConfigKind,
    /// Any JSON, kept for the caller (`None` when absent or `null`).
    pub metadata: Option<Value>,
    /// The Rivet engine's default is `false` (rivetkit sends `true`).
    pub drain_on_version_upgrade: bool,
}

/// `serverless` or `normal` (the `variant` filter and the cursor's prefix of the list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Serverless,
    Normal,
}

impl Variant {
    pub fn parse(s: &str) -> Option<Variant> {
        match s {
            "serverless" => Some(Variant::Serverless),
            "normal" => Some(Variant::Normal),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Serverless => "serverless",
            Variant::Normal => "normal",
        }
    }
}

impl RunnerConfig {
    pub fn variant(&self) -> Variant {
        match self.kind {
            RunnerConfigKind::Normal => Variant::Normal,
            RunnerConfigKind::Serverless(_) => Variant::Serverless,
        }
    }

    pub fn serverless(&self) -> Option<&ServerlessConfig> {
        match &self.kind {
            RunnerConfigKind::Serverless(s) => Some(s),
            RunnerConfigKind::Normal => None,
        }
    }

    /// The config in the Rivet engine's shape (`GET /runner-configs` and the stored record):
    /// `{"serverless": {…}, "metadata"?, "drain_on_version_upgrade"}` or `{"normal": {}, …}`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        match &self.kind {
            RunnerConfigKind::Normal => {
                m.insert("normal".into(), json!({}));
            }
            RunnerConfigKind::Serverless(s) => {
                let mut v = json!({
                    "url": s.url,
                    "headers": s.headers,
                    "request_lifespan": s.request_lifespan,
                    "slots_per_runner": s.slots_per_runner,
                    "min_runners": s.min_runners,
                    "max_runners": s.max_runners,
                    "runners_margin": s.runners_margin,
                });
                if let Some(ms) = s.metadata_poll_interval {
                    v["metadata_poll_interval"] = json!(ms);
                }
                m.insert("serverless".into(), v);
            }
        }
        if let Some(md) = &self.metadata {
            m.insert("metadata".into(), md.clone());
        }
        m.insert(
            "drain_on_version_upgrade".into(),
            Value::Bool(self.drain_on_version_upgrade),
        );
        Value::Object(m)
    }

    /// Reads one datacenter's entry of `PUT /runner-configs/{name}` (and a stored config), as
    /// the Rivet engine reads it (`api-types/src/namespaces/runner_configs.rs`): exactly one
    /// of `serverless` or `normal`, optional `metadata` and `drain_on_version_upgrade`. Other
    /// keys of the entry are ignored as the engine ignores them (its kind is a flattened
    /// enum): `rivetkit@2.2.1` sends a stray `metadataPollInterval` there. Checks the shape
    /// only; [`RunnerConfig::check`] checks the rules and the bounds.
    pub fn from_json(v: Value) -> Result<RunnerConfig, String> {
        let Value::Object(mut m) = v else {
            return Err("a datacenter's runner config must be a JSON object".into());
        };
        let kind = match (m.remove("serverless"), m.remove("normal")) {
            (Some(s), None) => RunnerConfigKind::Serverless(parse_serverless(s)?),
            (None, Some(Value::Object(_))) => RunnerConfigKind::Normal,
            (None, Some(_)) => return Err("`normal` must be an object ({})".into()),
            (Some(_), Some(_)) => {
                return Err("a runner config is `serverless` or `normal`, not both".into())
            }
            (None, None) => return Err("a runner config needs `serverless` or `normal`".into()),
        };
        let metadata = match m.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        };
        let drain_on_version_upgrade = match m.remove("drain_on_version_upgrade") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err("`drain_on_version_upgrade` must be a boolean".into()),
        };
        Ok(RunnerConfig {
            kind,
            metadata,
            drain_on_version_upgrade,
        })
    }

    /// The rules the Rivet engine enforces (a parsable URL, at most 16 valid headers,
    /// `slots_per_runner` ≥ 1) made stricter where torpor is (http or https only,
    /// `min_runners` ≤ `max_runners`, no header twice), and torpor's bounds.
    pub fn check(&self, l: &RunnerConfigLimits) -> Result<(), RunnerConfigError> {
        if let Some(md) = &self.metadata {
            let bytes = serde_json::to_vec(md).map_or(usize::MAX, |v| v.len());
            if bytes > l.metadata_bytes {
                return Err(RunnerConfigError::MetadataTooLarge {
                    max: l.metadata_bytes,
                });
            }
        }
        let Some(s) = self.serverless() else {
            return Ok(());
        };
        let invalid = |m: String| Err(RunnerConfigError::Invalid(m));
        if s.url.len() > l.url_bytes {
            return Err(RunnerConfigError::UrlTooLong { max: l.url_bytes });
        }
        match url::Url::parse(&s.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => {
                return invalid(format!(
                    "serverless url must be http or https, not {}",
                    u.scheme()
                ))
            }
            Err(e) => return invalid(format!("invalid serverless url: {e}")),
        }
        if s.headers.len() > l.headers {
            return Err(RunnerConfigError::TooManyHeaders { max: l.headers });
        }
        let total: usize = s.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > l.header_bytes {
            return Err(RunnerConfigError::HeadersTooLarge {
                max: l.header_bytes,
            });
        }
        let mut seen: Vec<String> = Vec::with_capacity(s.headers.len());
        for (name, value) in &s.headers {
            if name.is_empty() || name.len() > 128 || !name.bytes().all(is_tchar) {
                return invalid(format!(
                    "invalid header name {:?}: an HTTP token of at most 128 bytes",
                    short(name)
                ));
            }
            if value.len() > 4096 || !value.bytes().all(|b| b == b'\t' || (b >= 32 && b != 127)) {
                return invalid(format!(
                    "invalid value of header {name}: at most 4096 bytes, no control characters"
                ));
            }
            let lower = name.to_ascii_lowercase();
            if seen.contains(&lower) {
                return invalid(format!("header {name} is given twice"));
            }
            seen.push(lower);
        }
        if s.slots_per_runner == 0 {
            return invalid("`slots_per_runner` cannot be 0".into());
        }
        if s.max_runners > l.max_runners {
            return Err(RunnerConfigError::MaxRunnersTooHigh { max: l.max_runners });
        }
        if s.min_runners > s.max_runners {
            return invalid(format!(
                "`min_runners` ({}) is above `max_runners` ({})",
                s.min_runners, s.max_runners
            ));
        }
        if s.request_lifespan < l.request_lifespan_min_s
            || s.request_lifespan > l.request_lifespan_max_s
        {
            return Err(RunnerConfigError::RequestLifespanOutOfRange {
                min: l.request_lifespan_min_s,
                max: l.request_lifespan_max_s,
            });
        }
        Ok(())
    }
}

/// How many runners a serverless pool wants for `slots` actor slots in demand:
/// `min(max(runners_margin + ceil(slots / slots_per_runner), min_runners), max_runners)`, as
/// the Rivet engine's `runner_pool` workflow computes it, in 64-bit saturating arithmetic (no
/// overflow whatever the inputs; a `slots_per_runner` of 0, which is refused, counts as 1).
pub fn desired_runners(serverless: &ServerlessConfig, slots: u64) -> u32 {
    let per_runner = u64::from(serverless.slots_per_runner.max(1));
    let wanted = u64::from(serverless.runners_margin).saturating_add(slots.div_ceil(per_runner));
    let n = wanted
        .max(u64::from(serverless.min_runners))
        .min(u64::from(serverless.max_runners));
    // At most max_runners, a u32.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The bounds of runner configs (`limits.runner_config*` keys; the name and namespace are
/// bounded by `limits.runner_name_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfigLimits {
    /// Configs of one namespace (`limits.runner_configs_per_namespace`).
    pub per_namespace: usize,
    /// Configs of all namespaces (`limits.runner_configs`).
    pub total: usize,
    /// `serverless.url` bytes (`limits.runner_config_url_bytes`).
    pub url_bytes: usize,
    /// `serverless.headers` entries (`limits.runner_config_headers`).
    pub headers: usize,
    /// Header names plus values, bytes (`limits.runner_config_header_bytes`).
    pub header_bytes: usize,
    /// `metadata` as compact JSON, bytes (`limits.runner_config_metadata_bytes`).
    pub metadata_bytes: usize,
    /// Largest `max_runners` (`limits.runner_config_max_runners`).
    pub max_runners: u32,
    /// `request_lifespan` range in seconds (`limits.runner_config_request_lifespan_min_s`,
    /// `_max_s`).
    pub request_lifespan_min_s: u32,
    pub request_lifespan_max_s: u32,
}

impl RunnerConfigLimits {
    /// The defaults of the configuration keys.
    pub const DEFAULT: RunnerConfigLimits = RunnerConfigLimits {
        per_namespace: 100,
        total: 1000,
        url_bytes: 2048,
        headers: 16,
        header_bytes: 16 * 1024,
        metadata_bytes: 16 * 1024,
        // rivetkit@2.2.1 sends 100000 when `maxRunners` is not set.
        max_runners: 100_000,
        // A lifespan shorter than the drain before its end would restart runners in a loop.
        request_lifespan_min_s: 10,
        request_lifespan_max_s: 86_400,
    };
}

impl Default for RunnerConfigLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a config was refused. Each is an error code (`runner_config.{code}`, counted in
/// `torpor_errors_total`) and a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerConfigError {
    #[error("Invalid runner config: {0}")]
    Invalid(String),
    #[error("The runner name or namespace is longer than limits.runner_name_bytes ({max} bytes).")]
    NameTooLong { max: usize },
    #[error("The serverless url is longer than limits.runner_config_url_bytes ({max} bytes).")]
    UrlTooLong { max: usize },
    #[error("More headers than limits.runner_config_headers ({max}).")]
    TooManyHeaders { max: usize },
    #[error("The headers' names and values are longer than limits.runner_config_header_bytes ({max} bytes).")]
    HeadersTooLarge { max: usize },
    #[error("The metadata JSON is larger than limits.runner_config_metadata_bytes ({max} bytes).")]
    MetadataTooLarge { max: usize },
    #[error("max_runners is above limits.runner_config_max_runners ({max}).")]
    MaxRunnersTooHigh { max: u32 },
    #[error("request_lifespan (in seconds) must be from {min} to {max} (limits.runner_config_request_lifespan_min_s, _max_s).")]
    RequestLifespanOutOfRange { min: u32, max: u32 },
    #[error("The namespace holds its maximum of {max} runner configs (limits.runner_configs_per_namespace).")]
    QuotaExceeded { max: usize },
    #[error("torpor holds its maximum of {max} runner configs (limits.runner_configs).")]
    TooMany { max: usize },
}

impl RunnerConfigError {
    /// The code in group `runner_config`.
    pub fn code(&self) -> &'static str {
        match self {
            RunnerConfigError::Invalid(_) => "invalid",
            RunnerConfigError::NameTooLong { .. } => "name_too_long",
            RunnerConfigError::UrlTooLong { .. } => "url_too_long",
            RunnerConfigError::TooManyHeaders { .. } => "too_many_headers",
            RunnerConfigError::HeadersTooLarge { .. } => "headers_too_large",
            RunnerConfigError::MetadataTooLarge { .. } => "metadata_too_large",
            RunnerConfigError::MaxRunnersTooHigh { .. } => "max_runners_too_high",
            RunnerConfigError::RequestLifespanOutOfRange { .. } => "request_lifespan_out_of_range",
            RunnerConfigError::QuotaExceeded { .. } => "quota_exceeded",
            RunnerConfigError::TooMany { .. } => "too_many",
        }
    }

    /// 429 for the count limits, 400 for the rest (the Rivet engine answers 400).
    pub fn status(&self) -> u16 {
        match self {
            RunnerConfigError::QuotaExceeded { .. } | RunnerConfigError::TooMany { .. } => 429,
            _ => 400,
        }
    }
}

/// A config as stored: `engine/runner-config/…` → this, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerConfigRecord {
    pub v: u32,
    pub namespace: String,
    pub name: String,
    /// The config in the API's shape ([`RunnerConfig::to_json`]).
    pub config: Value,
}

/// `engine/runner-config/{namespace length, 4 bytes BE}{namespace}{name}`: one key per
/// (namespace, name) whatever bytes they hold.
pub fn runner_config_key(namespace: &str, name: &str) -> Vec<u8> {
    let mut k =
        Vec::with_capacity(RUNNER_CONFIG_KEY_PREFIX.len() + 4 + namespace.len() + name.len());
    k.extend_from_slice(RUNNER_CONFIG_KEY_PREFIX);
    k.extend_from_slice(
        &u32::try_from(namespace.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    k.extend_from_slice(namespace.as_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The configs the engine holds, by namespace then name (byte order, as the Rivet engine
/// lists them), and the store writes not yet taken.
#[derive(Debug, Default)]
pub(super) struct RunnerConfigs {
    by_namespace: HashMap<String, BTreeMap<String, RunnerConfig>>,
    total: usize,
    ops: Vec<StoreOp>,
}

impl RunnerConfigs {
    pub(super) fn take_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.ops)
    }

    fn insert(
        &mut self,
        namespace: &str,
        name: &str,
        config: RunnerConfig,
    ) -> Option<RunnerConfig> {
        let old = self
            .by_namespace
            .entry(namespace.to_string())
            .or_default()
            .insert(name.to_string(), config);
        if old.is_none() {
            self.total += 1;
        }
        old
    }

    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<&RunnerConfig> {
        self.by_namespace.get(namespace)?.get(name)
    }

    /// (namespace, name) of every serverless config.
    pub(super) fn serverless_keys(&self) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        for (ns, m) in &self.by_namespace {
            for (name, c) in m {
                if c.serverless().is_some() {
                    keys.push((ns.clone(), name.clone()));
                }
            }
        }
        keys
    }

    /// A stored record (`restore`): whether it was usable.
    pub(super) fn restore_entry(&mut self, key: &[u8], value: &[u8]) -> bool {
        let Ok(rec) = serde_json::from_slice::<RunnerConfigRecord>(value) else {
            return false;
        };
        if rec.v != RUNNER_CONFIG_RECORD_VERSION
            || rec.name.is_empty()
            || key != runner_config_key(&rec.namespace, &rec.name).as_slice()
        {
            return false;
        }
        let Ok(config) = RunnerConfig::from_json(rec.config) else {
            return false;
        };
        self.insert(&rec.namespace, &rec.name, config);
        true
    }
}

impl Engine {
    /// Creates or replaces the config of runner `name` in `namespace`, as the Rivet engine's
    /// `runner_config::upsert` does. Returns `endpoint_config_changed` as the engine decides
    /// it: `false` only when a serverless config replaces a serverless one with the same url
    /// and headers; `true` for a new config and for every other replacement.
    pub fn upsert_runner_config(
        &mut self,
        namespace: &str,
        name: &str,
        config: RunnerConfig,
    ) -> Result<bool, RunnerConfigError> {
        let l = &self.cfg.runner_configs;
        let name_max = self.cfg.runner_name_bytes;
        if name.is_empty() {
            return Err(RunnerConfigError::Invalid(
                "the runner name is empty".into(),
            ));
        }
        if name.len() > name_max || namespace.len() > name_max {
            return Err(RunnerConfigError::NameTooLong { max: name_max });
        }
        config.check(l)?;
        let rc = &mut self.runner_configs;
        let existing = rc.by_namespace.get(namespace).and_then(|m| m.get(name));
        if existing.is_none() {
            let in_namespace = rc.by_namespace.get(namespace).map_or(0, BTreeMap::len);
            if in_namespace >= l.per_namespace {
                return Err(RunnerConfigError::QuotaExceeded {
                    max: l.per_namespace,
                });
            }
            if rc.total >= l.total {
                return Err(RunnerConfigError::TooMany { max: l.total });
            }
        }
        let changed = match (existing.map(|c| &c.kind), &config.kind) {
            (Some(RunnerConfigKind::Serverless(old)), RunnerConfigKind::Serverless(new)) => {
                old.url != new.url || old.headers != new.headers
            }
            _ => true,
        };
        let record = RunnerConfigRecord {
            v: RUNNER_CONFIG_RECORD_VERSION,
            namespace: namespace.to_string(),
            name: name.to_string(),
            config: config.to_json(),
        };
        rc.ops.push(StoreOp::Put {
            key: runner_config_key(namespace, name),
            // Serialising strings and JSON values into memory cannot fail.
            value: serde_json::to_vec(&record).unwrap_or_default(),
        });
        rc.insert(namespace, name, config);
        self.pool_config_written((namespace.to_string(), name.to_string()), changed);
        Ok(changed)
    }

    /// Removes the config of runner `name` in `namespace`; whether there was one.
    pub fn delete_runner_config(&mut self, namespace: &str, name: &str) -> bool {
        let rc = &mut self.runner_configs;
        let Some(m) = rc.by_namespace.get_mut(namespace) else {
            return false;
        };
        if m.remove(name).is_none() {
            return false;
        }
        if m.is_empty() {
            rc.by_namespace.remove(namespace);
        }
        rc.total -= 1;
        rc.ops.push(StoreOp::Delete {
            key: runner_config_key(namespace, name),
        });
        self.pools_changed();
        true
    }

    /// The config of runner `name` in `namespace`.
    pub fn runner_config(&self, namespace: &str, name: &str) -> Option<&RunnerConfig> {
        self.runner_configs.by_namespace.get(namespace)?.get(name)
    }

    /// Configs of `namespace` in name order after `after`, of `variant` if given: at most
    /// `limit`, and whether more follow.
    pub fn runner_configs_page(
        &self,
        namespace: &str,
        variant: Option<Variant>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(&str, &RunnerConfig)>, bool) {
        let Some(m) = self.runner_configs.by_namespace.get(namespace) else {
            return (Vec::new(), false);
        };
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut it = m
            .range::<str, _>((start, Bound::Unbounded))
            .filter(|(_, c)| variant.is_none_or(|v| c.variant() == v))
            .map(|(n, c)| (n.as_str(), c));
        let page: Vec<_> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// Runner configs held, all namespaces.
    pub fn runner_configs_count(&self) -> usize {
        self.runner_configs.total
    }
}

/// The `serverless` object of an entry (the Rivet engine's API type: `headers`,
/// `min_runners`, `runners_margin` and `metadata_poll_interval` may be absent or `null`).
fn parse_serverless(v: Value) -> Result<ServerlessConfig, String> {
    #[derive(Deserialize)]
    struct Body {
        url: String,
        #[serde(default)]
        headers: Option<BTreeMap<String, String>>,
        request_lifespan: u32,
        slots_per_runner: u32,
        #[serde(default)]
        min_runners: Option<u32>,
        max_runners: u32,
        #[serde(default)]
        runners_margin: Option<u32>,
        #[serde(default)]
        metadata_poll_interval: Option<u64>,
    }
    if !v.is_object() {
        return Err("`serverless` must be an object".into());
    }
    let b: Body = serde_json::from_value(v).map_err(|e| format!("serverless: {e}"))?;
    Ok(ServerlessConfig {
        url: b.url,
        headers: b.headers.unwrap_or_default(),
        request_lifespan: b.request_lifespan,
        slots_per_runner: b.slots_per_runner,
        min_runners: b.min_runners.unwrap_or(0),
        max_runners: b.max_runners,
        runners_margin: b.runners_margin.unwrap_or(0),
        metadata_poll_interval: b.metadata_poll_interval,
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At most 64 characters of a name from a peer, for an error message.
fn short(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
