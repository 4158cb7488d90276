//! Configuration: defaults, the TOML file, `TORPOR_*` environment variables and flags, in that
//! order of precedence (later wins), validated once at start with clear errors.
//!
//! Every limit of the gateway has a key here. Unknown keys in the file are errors. This module
//! never reads sockets or clocks; it only builds a validated [`Config`].

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole validated configuration of a running daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client and runner listener.
    pub listen: SocketAddr,
    /// Number of shards (threads, one per core); 0 means one per available core.
    pub shards: usize,
    /// When non-zero, shard `i` also listens on its own port `shard_port_base + i`, so a
    /// client can choose its shard (tests, diagnostics). 0 = off.
    pub shard_port_base: u16,
    /// Pin each shard thread to a core.
    pub pin_threads: bool,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// Log format: `human` or `json`.
    pub log_format: String,
    pub auth: Auth,
    pub cors: Cors,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub serverless: Serverless,
    pub store: Store,
    pub cluster: Cluster,
}

/// `[cluster]`: several torpor nodes sharing actors, placement and KV through PostgreSQL
/// (`[store] backend = "postgres"`, the same database for every node) and routing tunnel
/// traffic over core NATS. Off by default: one process holds everything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Run as one node of several.
    pub enabled: bool,
    /// The NATS server (`nats://host:4222`) or servers of one NATS cluster, comma-separated;
    /// every node uses the same. Credentials go in the URL (`nats://user:password@host:4222`,
    /// or `nats://token@host:4222`); `check-config` shows them as `***`.
    pub nats_url: String,
    /// PEM file of the certificate authorities that sign the NATS servers' certificates:
    /// set, the bus requires TLS and trusts these only. Unset, `tls://` addresses (or a server
    /// that requires TLS) are verified against the system's roots.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// How long a placement leader's lease lasts in PostgreSQL's clock.
    pub lease_ttl_ms: u64,
    /// How often the leader renews it (below `lease_ttl_ms / 3`).
    pub lease_renew_ms: u64,
    /// How much earlier than PostgreSQL a leader gives its lease up.
    pub lease_safety_ms: u64,
    /// How often a follower tries to take the lease (a standby leads within
    /// `lease_ttl_ms + lease_retry_ms` of the leader's last renew).
    pub lease_retry_ms: u64,
    /// How often a node tells the leader it is alive.
    pub heartbeat_ms: u64,
    /// A node the leader heard nothing from for this long is counted out: its runner
    /// connections are treated as closed and stop barriers stop waiting for its shards.
    pub node_timeout_ms: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            enabled: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_tls_ca_file: None,
            lease_ttl_ms: 10_000,
            lease_renew_ms: 2_000,
            lease_safety_ms: 1_000,
            lease_retry_ms: 1_000,
            heartbeat_ms: 1_000,
            node_timeout_ms: 5_000,
        }
    }
}

impl Cluster {
    /// The lease's timing.
    pub fn lease(&self) -> crate::cluster::lease::LeaseConfig {
        crate::cluster::lease::LeaseConfig {
            ttl: ms(self.lease_ttl_ms),
            renew_every: ms(self.lease_renew_ms),
            safety_margin: ms(self.lease_safety_ms),
            retry_every: ms(self.lease_retry_ms),
        }
    }
}

/// `[store]`: where actor KV and the engine's records live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    /// `redb` (the embedded file `data_dir/torpor.redb`, the default) or `postgres`.
    pub backend: String,
    /// With `backend = "postgres"`: `postgres://user@host:5432/db` or a
    /// `host=/run/postgresql user=torpor dbname=torpor` string. No TLS. A password in it is
    /// shown as `***` by `check-config`.
    pub postgres_url: String,
    /// Longest wait for a PostgreSQL connection.
    pub connect_timeout_ms: u64,
    /// Longest run of one statement (server-side timeout, and the connection's TCP user
    /// timeout).
    pub statement_timeout_ms: u64,
    /// Longest wait for the `SELECT 1` that checks a failed store is back, and for the idle
    /// health check.
    pub probe_timeout_ms: u64,
    /// How often an idle store that is up checks that PostgreSQL still answers (so
    /// `/readyz` turns 503 without waiting for a request).
    pub health_every_ms: u64,
}

impl Default for Store {
    fn default() -> Self {
        let p = crate::kv::PgSettings::new("");
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Store {
            backend: "redb".into(),
            postgres_url: String::new(),
            connect_timeout_ms: ms(p.connect_timeout),
            statement_timeout_ms: ms(p.statement_timeout),
            probe_timeout_ms: ms(p.probe_timeout),
            health_every_ms: ms(p.health_every),
        }
    }
}

impl Store {
    /// The PostgreSQL backend's settings.
    pub fn postgres(&self) -> crate::kv::PgSettings {
        crate::kv::PgSettings {
            url: self.postgres_url.clone(),
            connect_timeout: ms(self.connect_timeout_ms),
            statement_timeout: ms(self.statement_timeout_ms),
            probe_timeout: ms(self.probe_timeout_ms),
            health_every: ms(self.health_every_ms),
        }
    }
}

/// `[store]` as `check-config` prints it: a password in the URL redacted.
struct StoreSer<'a>(&'a Store);
impl serde::Serialize for StoreSer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = self.0.clone();
        st.postgres_url = crate::kv::pg_store::redacted(&st.postgres_url);
        st.serialize(s)
    }
}

/// `[cluster]` as `check-config` prints it: passwords and tokens in `nats_url` redacted.
struct ClusterSer<'a>(&'a Cluster);
impl serde::Serialize for ClusterSer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut c = self.0.clone();
        c.nats_url = crate::cluster::nats_addr::redacted(&c.nats_url);
        c.serialize(s)
    }
}

/// `[serverless]`: serverless runner pools (runners started with `GET {url}/start` from the
/// runner configs) and the outbound client that starts them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Serverless {
    /// torpor's URL as started runners reach it (`x-rivet-endpoint`); not derived from
    /// `listen`, which may be a wildcard or sit behind a proxy.
    pub public_url: String,
    /// A pool's runner drains this long before the end of its request's lifespan and has this
    /// long to finish (`serverlessDrainGracePeriod` of its `Init`); at most
    /// `timeouts.actor_stop_threshold_ms`.
    pub drain_grace_ms: u64,
    /// Back-off after a failed start: `retry_base_ms × 2^n` (n up to `retry_max_exponent`),
    /// plus up to `retry_jitter_ms`; `n` restarts from 0 after `retry_reset_ms` without one.
    pub retry_base_ms: u64,
    pub retry_max_exponent: u32,
    pub retry_jitter_ms: u64,
    pub retry_reset_ms: u64,
    /// `GET {url}/metadata` interval when a config gives none, and the shortest one allowed.
    pub metadata_poll_default_ms: u64,
    pub metadata_poll_min_ms: u64,
    // The outbound client (`crate::serverless::ServerlessSettings`).
    pub connect_timeout_ms: u64,
    pub headers_timeout_ms: u64,
    pub init_timeout_ms: u64,
    pub event_timeout_ms: u64,
    pub metadata_timeout_ms: u64,
    pub max_event_bytes: usize,
    pub metadata_body_bytes: usize,
    pub max_streams: usize,
    pub max_metadata_requests: usize,
    pub addresses: crate::serverless::AddressPolicy,
}

impl Default for Serverless {
    fn default() -> Self {
        let o = crate::serverless::ServerlessSettings::default();
        let p = crate::engine::PoolSettings::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Serverless {
            public_url: "http://127.0.0.1:6420".into(),
            drain_grace_ms: ms(p.drain_grace),
            retry_base_ms: ms(p.retry_base),
            retry_max_exponent: p.retry_max_exponent,
            retry_jitter_ms: ms(p.retry_jitter),
            retry_reset_ms: ms(p.retry_reset),
            metadata_poll_default_ms: ms(p.metadata_poll_default),
            metadata_poll_min_ms: ms(p.metadata_poll_min),
            connect_timeout_ms: o.connect_timeout_ms,
            headers_timeout_ms: o.headers_timeout_ms,
            init_timeout_ms: o.init_timeout_ms,
            event_timeout_ms: o.event_timeout_ms,
            metadata_timeout_ms: o.metadata_timeout_ms,
            max_event_bytes: o.max_event_bytes,
            metadata_body_bytes: o.metadata_body_bytes,
            max_streams: o.max_streams,
            max_metadata_requests: o.max_metadata_requests,
            addresses: o.addresses,
        }
    }
}

impl Serverless {
    /// The outbound client's settings.
    pub fn outbound(&self) -> crate::serverless::ServerlessSettings {
        crate::serverless::ServerlessSettings {
            connect_timeout_ms: self.connect_timeout_ms,
            headers_timeout_ms: self.headers_timeout_ms,
            init_timeout_ms: self.init_timeout_ms,
            event_timeout_ms: self.event_timeout_ms,
            metadata_timeout_ms: self.metadata_timeout_ms,
            max_event_bytes: self.max_event_bytes,
            metadata_body_bytes: self.metadata_body_bytes,
            max_streams: self.max_streams,
            max_metadata_requests: self.max_metadata_requests,
            addresses: self.addresses.clone(),
        }
    }

    /// The engine's pool settings (`token`: the admin token, if any).
    pub fn pools(&self, token: Option<&str>) -> crate::engine::PoolSettings {
        let d = Duration::from_millis;
        crate::engine::PoolSettings {
            endpoint: self.public_url.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            drain_grace: d(self.drain_grace_ms),
            retry_base: d(self.retry_base_ms),
            retry_max_exponent: self.retry_max_exponent,
            retry_jitter: d(self.retry_jitter_ms),
            retry_reset: d(self.retry_reset_ms),
            metadata_poll_default: d(self.metadata_poll_default_ms),
            metadata_poll_min: d(self.metadata_poll_min_ms),
            ..crate::engine::PoolSettings::default()
        }
    }
}

/// A secret string: its `Debug` and `Serialize` never show it, so it cannot reach a log line
/// or `torpor check-config` output by accident.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for comparisons only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Who may use the engine API and connect runners (SPEC §3, "Authentication").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// The admin token: the engine API takes it as `Authorization: Bearer <token>`, runners
    /// as the `rivet_token.<token>` subprotocol. Without one torpor runs in protected mode:
    /// API calls and runner connections are accepted from loopback peers only.
    pub admin_token: Option<Secret>,
    /// A file holding the admin token (surrounding whitespace ignored); read at start.
    pub admin_token_file: Option<PathBuf>,
}

/// Cross-origin access for browsers (the engine API and the gateway's preflights).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cors {
    /// Origins whose pages may call the engine API (exact `scheme://host[:port]`, or `*`).
    /// Empty (the default): with an admin token any origin (the token, never a cookie,
    /// authorizes a call, as in the Rivet engine); without one only loopback origins
    /// (`http://localhost:*`, `http://127.0.0.1:*`, `http://[::1]:*`), so that a web page
    /// from elsewhere cannot drive a development torpor on the visitor's machine.
    pub allowed_origins: Vec<String>,
}

/// Default of `limits.store_cache_bytes`: the store's own default, defined with the store's
/// limits ([`crate::kv::KvLimits`]).
pub use crate::kv::DEFAULT_STORE_CACHE_BYTES;

/// Size limits (bytes and counts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub http_header_bytes: usize,
    pub http_body_bytes: usize,
    pub ws_max_frame_bytes: u64,
    pub ws_max_message_bytes: u64,
    /// Pending (unacknowledged) payload bytes per client WebSocket.
    pub pending_bytes_per_socket: usize,
    /// Pending messages per client WebSocket (at most 32767).
    pub pending_messages_per_socket: usize,
    /// Pending bytes of the whole process (split evenly between shards).
    pub pending_bytes_global: u64,
    /// Bytes queued towards one client before that client is closed as too slow.
    pub client_outbound_bytes: usize,
    /// A streamed HTTP body through the tunnel, per request and direction: the response
    /// bytes queued for a client that has not read them (past it the request is aborted,
    /// `guard.http_client_too_slow`), and the request bytes handed to the runner's
    /// connection and not yet written to it (the client is not read meanwhile).
    pub http_stream_buffer_bytes: usize,
    /// Actor KV store (SPEC §1.6): largest key, value, keys per call, put payload, and the
    /// most entries one list returns.
    pub kv_key_bytes: usize,
    pub kv_value_bytes: usize,
    pub kv_keys_per_call: usize,
    pub kv_put_payload_bytes: usize,
    pub kv_list_limit: u64,
    /// Memory the embedded store may keep as its page cache (pages read and pages written);
    /// beyond it pages are read from the file again (the kernel's page cache).
    pub store_cache_bytes: usize,
    /// Open connections (clients and runners) one shard holds; at the cap it stops accepting
    /// until one closes (the kernel's backlog waits). 0 = derived from the open-files limit.
    pub connections_per_shard: usize,
    /// Largest `totalSlots` a runner may announce; more is clamped to it (and counted).
    pub runner_max_slots: u32,
    /// Largest namespace, runner name, runner key and `runner_name_selector`, in bytes.
    pub runner_name_bytes: usize,
    /// Actor names a runner may announce in `Init.prepopulateActorNames`.
    pub runner_actor_names: usize,
    /// Bytes of one announced actor name's metadata JSON.
    pub runner_actor_metadata_bytes: usize,
    /// Largest actor name and actor key, in bytes.
    pub actor_name_bytes: usize,
    pub actor_key_bytes: usize,
    /// Largest actor `input` (decoded), in bytes.
    pub actor_input_bytes: usize,
    /// Live actors in one namespace.
    pub actors_per_namespace: usize,
    /// KV bytes (keys plus values) one actor may store.
    pub kv_bytes_per_actor: u64,
    /// Runner configs (serverless pools' settings) of one namespace, and of all namespaces.
    pub runner_configs_per_namespace: usize,
    pub runner_configs: usize,
    /// A runner config's serverless `url`, in bytes.
    pub runner_config_url_bytes: usize,
    /// A runner config's `headers`: entries, and bytes of names plus values.
    pub runner_config_headers: usize,
    pub runner_config_header_bytes: usize,
    /// A runner config's `metadata`, as compact JSON, in bytes.
    pub runner_config_metadata_bytes: usize,
    /// Largest `max_runners` of a runner config.
    pub runner_config_max_runners: u32,
    /// Range of a runner config's `request_lifespan`, in seconds.
    pub runner_config_request_lifespan_min_s: u32,
    pub runner_config_request_lifespan_max_s: u32,
}

/// Deadlines and periods, in milliseconds in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub handshake_ms: u64,
    pub runner_init_ms: u64,
    pub websocket_open_ms: u64,
    pub response_start_ms: u64,
    /// A streamed HTTP exchange with no progress either way (no body chunk from the runner,
    /// no byte taken by the client, no upload byte) for this long is aborted (0 = never).
    pub http_stream_idle_ms: u64,
    pub ack_timeout_ms: u64,
    pub gc_interval_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub runner_lost_threshold_ms: u64,
    pub actor_stop_threshold_ms: u64,
    pub actor_wake_ms: u64,
    /// How often a hibernating socket's record is refreshed (plus up to 1/8 jitter).
    pub hibernation_refresh_ms: u64,
    /// Hibernating records older than this are not handed to a starting actor.
    pub hibernation_eligible_ms: u64,
    /// A socket hibernating longer than this is closed (`guard.hibernation_timeout`); 0 = never.
    pub hibernation_max_ms: u64,
    /// After the gateway queued a close frame on a WebSocket (client or runner), how long the
    /// peer has to finish the close handshake before the TCP connection is dropped.
    pub close_handshake_ms: u64,
    /// A client WebSocket silent this long gets a ping (0 = never ping idle clients).
    pub client_idle_ping_ms: u64,
    /// After that ping, how long the client has to send anything before it is closed with
    /// 1011 `guard.client_idle_timeout`.
    pub client_pong_timeout_ms: u64,
    /// How often each shard hands the memory it freed back to the OS (0 = never): after a
    /// burst of connections the allocator would otherwise keep their pages.
    pub memory_trim_ms: u64,
    /// On SIGTERM, how long in-flight HTTP requests and queued messages get to finish before
    /// every WebSocket is closed with 1001 (whose close handshakes then get
    /// `close_handshake_ms`).
    pub drain_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:6420".parse().expect("static address"),
            shards: 0,
            shard_port_base: 0,
            pin_threads: true,
            data_dir: PathBuf::from("./torpor-data"),
            log_format: "human".into(),
            auth: Auth::default(),
            cors: Cors::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            serverless: Serverless::default(),
            store: Store::default(),
            cluster: Cluster::default(),
        }
    }
}

/// The defaults of the runner config limits, defined with them.
const RC: crate::engine::RunnerConfigLimits = crate::engine::RunnerConfigLimits::DEFAULT;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            http_header_bytes: 16 * 1024,
            http_body_bytes: 20 * 1024 * 1024,
            ws_max_frame_bytes: 16 * 1024 * 1024,
            ws_max_message_bytes: 64 * 1024 * 1024,
            pending_bytes_per_socket: 1024 * 1024,
            pending_messages_per_socket: 32767,
            pending_bytes_global: 1024 * 1024 * 1024,
            client_outbound_bytes: 16 * 1024 * 1024,
            http_stream_buffer_bytes: 1024 * 1024,
            kv_key_bytes: 2048,
            kv_value_bytes: 128 * 1024,
            kv_keys_per_call: 128,
            kv_put_payload_bytes: 976 * 1024,
            kv_list_limit: 16384,
            store_cache_bytes: DEFAULT_STORE_CACHE_BYTES,
            connections_per_shard: 0,
            runner_max_slots: 100_000,
            runner_name_bytes: 256,
            runner_actor_names: 1000,
            runner_actor_metadata_bytes: 16 * 1024,
            actor_name_bytes: 256,
            actor_key_bytes: 1024,
            actor_input_bytes: 4 * 1024 * 1024,
            actors_per_namespace: 100_000,
            kv_bytes_per_actor: 1 << 30,
            runner_configs_per_namespace: RC.per_namespace,
            runner_configs: RC.total,
            runner_config_url_bytes: RC.url_bytes,
            runner_config_headers: RC.headers,
            runner_config_header_bytes: RC.header_bytes,
            runner_config_metadata_bytes: RC.metadata_bytes,
            runner_config_max_runners: RC.max_runners,
            runner_config_request_lifespan_min_s: RC.request_lifespan_min_s,
            runner_config_request_lifespan_max_s: RC.request_lifespan_max_s,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_ms: 10_000,
            runner_init_ms: 5_000,
            websocket_open_ms: 15_000,
            response_start_ms: 300_000,
            http_stream_idle_ms: 300_000,
            ack_timeout_ms: 30_000,
            gc_interval_ms: 15_000,
            ping_interval_ms: 3_000,
            ping_timeout_ms: 15_000,
            runner_lost_threshold_ms: 15_000,
            actor_stop_threshold_ms: 30_000,
            actor_wake_ms: 30_000,
            hibernation_refresh_ms: 45_000,
            hibernation_eligible_ms: 90_000,
            hibernation_max_ms: 12 * 3600 * 1000,
            close_handshake_ms: 5_000,
            client_idle_ping_ms: 30_000,
            client_pong_timeout_ms: 30_000,
            memory_trim_ms: 1_000,
            drain_ms: 10_000,
        }
    }
}

/// A configuration error, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Parse { path: String, err: String },
    #[error("environment variable {name}: {err}")]
    Env { name: String, err: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    /// Reads the TOML file (if any) over the defaults, then applies `TORPOR_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|err| ConfigError::Read {
                    path: p.display().to_string(),
                    err,
                })?;
                Self::from_toml(&text).map_err(|err| ConfigError::Parse {
                    path: p.display().to_string(),
                    err,
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(std::env::vars())?;
        cfg.read_token_file()?;
        Ok(cfg)
    }

    /// Reads `auth.admin_token_file` into `auth.admin_token` (both set is an error).
    pub fn read_token_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.auth.admin_token_file else {
            return Ok(());
        };
        if self.auth.admin_token.is_some() {
            return Err(ConfigError::Invalid(
                "set auth.admin_token or auth.admin_token_file, not both".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.display().to_string(),
            err,
        })?;
        self.auth.admin_token = Some(Secret::new(text.trim()));
        Ok(())
    }

    /// The admin token, when one is configured.
    pub fn admin_token(&self) -> Option<&str> {
        self.auth.admin_token.as_ref().map(Secret::expose)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `TORPOR_<KEY>` and `TORPOR_<SECTION>__<KEY>` variables (e.g.
    /// `TORPOR_LISTEN`, `TORPOR_TIMEOUTS__ACK_TIMEOUT_MS`). Unknown names are errors.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("TORPOR_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let (section, field) = match key.split_once("__") {
                Some((s, f)) => (Some(s.to_string()), f.to_string()),
                None => (None, key.clone()),
            };
            let literal = if value.parse::<f64>().is_ok() || value == "true" || value == "false" {
                value.clone()
            } else {
                toml::Value::String(value.clone()).to_string()
            };
            let snippet = match &section {
                Some(s) => format!("[{s}]\n{field} = {literal}\n"),
                None => format!("{field} = {literal}\n"),
            };
            let overlay: toml::Table = toml::from_str(&snippet).map_err(|e| ConfigError::Env {
                name: name.clone(),
                err: e.to_string(),
            })?;
            // The round trip below goes through `Serialize`, which redacts the token.
            let token = self.auth.admin_token.clone();
            let pg_url = self.store.postgres_url.clone();
            let nats_url = self.cluster.nats_url.clone();
            let mut current = toml::Table::try_from(&*self).map_err(|e| ConfigError::Env {
                name: name.clone(),
                err: e.to_string(),
            })?;
            merge(&mut current, overlay);
            *self = toml::Value::Table(current)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Env {
                    name: name.clone(),
                    err: e.to_string(),
                })?;
            if !(section.as_deref() == Some("auth") && field == "admin_token") {
                self.auth.admin_token = token;
            }
            if !(section.as_deref() == Some("store") && field == "postgres_url") {
                self.store.postgres_url = pg_url;
            }
            if !(section.as_deref() == Some("cluster") && field == "nats_url") {
                self.cluster.nats_url = nats_url;
            }
        }
        Ok(())
    }

    /// Checks relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let t = &self.timeouts;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if l.pending_messages_per_socket == 0 || l.pending_messages_per_socket > 32767 {
            return bad("limits.pending_messages_per_socket must be in 1..=32767 (the wrapping index comparison is only sound below 32768)");
        }
        if l.pending_bytes_per_socket == 0 {
            return bad("limits.pending_bytes_per_socket must be > 0");
        }
        if l.ws_max_frame_bytes == 0 || l.ws_max_message_bytes < l.ws_max_frame_bytes {
            return bad("limits.ws_max_message_bytes must be >= limits.ws_max_frame_bytes > 0");
        }
        if l.kv_key_bytes == 0
            || l.kv_value_bytes == 0
            || l.kv_keys_per_call == 0
            || l.kv_put_payload_bytes == 0
            || l.kv_list_limit == 0
        {
            return bad("limits.kv_* must be > 0");
        }
        if l.http_stream_buffer_bytes < 1024 {
            return bad("limits.http_stream_buffer_bytes must be >= 1024");
        }
        if l.http_header_bytes < 1024 {
            return bad("limits.http_header_bytes must be >= 1024");
        }
        if t.actor_stop_threshold_ms <= 1000 {
            return bad("timeouts.actor_stop_threshold_ms must be > 1000 (runners derive their sleep timeout from it minus 1000)");
        }
        if t.ping_interval_ms == 0 || t.ping_timeout_ms <= t.ping_interval_ms {
            return bad("timeouts.ping_timeout_ms must be > timeouts.ping_interval_ms > 0");
        }
        if t.hibernation_refresh_ms == 0 || t.hibernation_eligible_ms <= t.hibernation_refresh_ms {
            return bad("timeouts.hibernation_eligible_ms must be > timeouts.hibernation_refresh_ms > 0 (a refreshed record must stay eligible)");
        }
        if t.close_handshake_ms == 0 {
            return bad("timeouts.close_handshake_ms must be > 0");
        }
        if t.client_pong_timeout_ms == 0 {
            return bad("timeouts.client_pong_timeout_ms must be > 0");
        }
        if t.gc_interval_ms == 0 {
            return bad("timeouts.gc_interval_ms must be > 0");
        }
        if self.shards > 256 {
            return bad("shards must be <= 256");
        }
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return bad("log_format must be \"human\" or \"json\"");
        }
        if let Some(tok) = self.admin_token() {
            // It travels as a WebSocket subprotocol (an HTTP token) and a bearer credential.
            if tok.is_empty() || !tok.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return bad(
                    "auth.admin_token must be non-empty printable ASCII without commas or spaces",
                );
            }
        }
        for o in &self.cors.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return bad("cors.allowed_origins: each entry is \"*\" or an origin such as https://app.example.com");
            }
        }
        if l.runner_name_bytes == 0
            || l.actor_name_bytes == 0
            || l.actor_key_bytes == 0
            || l.runner_max_slots == 0
            || l.actors_per_namespace == 0
            || l.kv_bytes_per_actor == 0
        {
            return bad("limits.runner_name_bytes, actor_name_bytes, actor_key_bytes, runner_max_slots, actors_per_namespace and kv_bytes_per_actor must be > 0");
        }
        if l.runner_configs_per_namespace == 0
            || l.runner_configs == 0
            || l.runner_config_url_bytes < 16
        {
            return bad("limits.runner_configs_per_namespace and runner_configs must be > 0, runner_config_url_bytes >= 16");
        }
        if l.runner_config_request_lifespan_min_s == 0
            || l.runner_config_request_lifespan_max_s < l.runner_config_request_lifespan_min_s
        {
            return bad("limits.runner_config_request_lifespan_max_s must be >= runner_config_request_lifespan_min_s > 0");
        }
        let sv = &self.serverless;
        match url::Url::parse(&sv.public_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return bad("serverless.public_url must be an http or https URL, such as https://torpor.example.com"),
        }
        if sv.drain_grace_ms == 0 || sv.drain_grace_ms > t.actor_stop_threshold_ms {
            return bad("serverless.drain_grace_ms must be > 0 and <= timeouts.actor_stop_threshold_ms (a draining runner's actors must be able to stop within it)");
        }
        if sv.retry_base_ms == 0 || sv.retry_max_exponent > 16 || sv.metadata_poll_min_ms == 0 {
            return bad("serverless.retry_base_ms and metadata_poll_min_ms must be > 0, retry_max_exponent <= 16");
        }
        if let Err(e) = sv.outbound().validate() {
            return Err(ConfigError::Invalid(e));
        }
        let st = &self.store;
        match st.backend.as_str() {
            "redb" => {}
            "postgres" => {
                if st.postgres_url.is_empty() {
                    return bad("store.postgres_url must be set with store.backend = \"postgres\" (e.g. postgres://torpor@127.0.0.1:5432/torpor)");
                }
                if let Err(e) = st.postgres_url.parse::<postgres::Config>() {
                    return Err(ConfigError::Invalid(format!(
                        "store.postgres_url is not a valid PostgreSQL connection string: {e}"
                    )));
                }
            }
            _ => return bad("store.backend must be \"redb\" or \"postgres\""),
        }
        if st.connect_timeout_ms == 0
            || st.statement_timeout_ms == 0
            || st.probe_timeout_ms == 0
            || st.health_every_ms == 0
        {
            return bad(
                "store.connect_timeout_ms, statement_timeout_ms, probe_timeout_ms and health_every_ms must be > 0",
            );
        }
        let c = &self.cluster;
        if c.enabled {
            if st.backend != "postgres" {
                return bad("cluster.enabled needs store.backend = \"postgres\" (every node shares one PostgreSQL database)");
            }
            if let Err(e) = crate::cluster::nats_addr::parse(&c.nats_url) {
                return Err(ConfigError::Invalid(format!("cluster.nats_url: {e}")));
            }
            if let Some(ca) = &c.nats_tls_ca_file {
                if let Err(e) = std::fs::metadata(ca) {
                    return Err(ConfigError::Invalid(format!(
                        "cluster.nats_tls_ca_file {}: {e}",
                        ca.display()
                    )));
                }
            }
            if let Err(e) = c.lease().validate() {
                return Err(ConfigError::Invalid(format!("cluster.{e}")));
            }
            if c.heartbeat_ms == 0 || c.node_timeout_ms < 2 * c.heartbeat_ms {
                return bad(
                    "cluster.heartbeat_ms must be > 0 and node_timeout_ms at least twice it",
                );
            }
        }
        Ok(())
    }

    /// The bounds of runner configs, for the engine.
    pub fn runner_config_limits(&self) -> crate::engine::RunnerConfigLimits {
        let l = &self.limits;
        crate::engine::RunnerConfigLimits {
            per_namespace: l.runner_configs_per_namespace,
            total: l.runner_configs,
            url_bytes: l.runner_config_url_bytes,
            headers: l.runner_config_headers,
            header_bytes: l.runner_config_header_bytes,
            metadata_bytes: l.runner_config_metadata_bytes,
            max_runners: l.runner_config_max_runners,
            request_lifespan_min_s: l.runner_config_request_lifespan_min_s,
            request_lifespan_max_s: l.runner_config_request_lifespan_max_s,
        }
    }

    /// The actor KV store's limits.
    pub fn kv_limits(&self) -> crate::kv::KvLimits {
        let l = &self.limits;
        crate::kv::KvLimits {
            max_key_size: l.kv_key_bytes,
            max_value_size: l.kv_value_bytes,
            max_keys_per_call: l.kv_keys_per_call,
            max_put_payload: l.kv_put_payload_bytes,
            default_list_limit: l.kv_list_limit,
            max_list_limit: l.kv_list_limit,
            cache_bytes: l.store_cache_bytes,
            max_actor_bytes: l.kv_bytes_per_actor,
            ..crate::kv::KvLimits::default()
        }
    }

    /// The embedded store's file.
    pub fn store_path(&self) -> std::path::PathBuf {
        self.data_dir.join("torpor.redb")
    }

    /// Resolved shard count.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

impl serde::Serialize for Config {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Config", 13)?;
        st.serialize_field("listen", &self.listen.to_string())?;
        st.serialize_field("shards", &self.shards)?;
        st.serialize_field("shard_port_base", &self.shard_port_base)?;
        st.serialize_field("pin_threads", &self.pin_threads)?;
        st.serialize_field("data_dir", &self.data_dir)?;
        st.serialize_field("log_format", &self.log_format)?;
        st.serialize_field("auth", &AuthSer(&self.auth))?;
        st.serialize_field("cors", &self.cors)?;
        st.serialize_field("limits", &LimitsSer(&self.limits))?;
        st.serialize_field("timeouts", &TimeoutsSer(&self.timeouts))?;
        st.serialize_field("serverless", &self.serverless)?;
        st.serialize_field("store", &StoreSer(&self.store))?;
        st.serialize_field("cluster", &ClusterSer(&self.cluster))?;
        st.end()
    }
}

/// `[auth]` as `check-config` prints it: the token redacted, the file's path shown.
struct AuthSer<'a>(&'a Auth);
impl serde::Serialize for AuthSer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Auth", 2)?;
        if let Some(t) = &self.0.admin_token {
            st.serialize_field("admin_token", t)?;
        }
        if let Some(p) = &self.0.admin_token_file {
            st.serialize_field("admin_token_file", p)?;
        }
        st.end()
    }
}

macro_rules! ser_fields {
    ($wrap:ident, $ty:ty, $($f:ident),*) => {
        struct $wrap<'a>(&'a $ty);
        impl serde::Serialize for $wrap<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut st = s.serialize_struct(stringify!($ty), 16)?;
                $( st.serialize_field(stringify!($f), &self.0.$f)?; )*
                st.end()
            }
        }
    };
}
ser_fields!(
    LimitsSer,
    Limits,
    http_header_bytes,
    http_body_bytes,
    ws_max_frame_bytes,
    ws_max_message_bytes,
    pending_bytes_per_socket,
    pending_messages_per_socket,
    pending_bytes_global,
    client_outbound_bytes,
    http_stream_buffer_bytes,
    kv_key_bytes,
    kv_value_bytes,
    kv_keys_per_call,
    kv_put_payload_bytes,
    kv_list_limit,
    store_cache_bytes,
    connections_per_shard,
    runner_max_slots,
    runner_name_bytes,
    runner_actor_names,
    runner_actor_metadata_bytes,
    actor_name_bytes,
    actor_key_bytes,
    actor_input_bytes,
    actors_per_namespace,
    kv_bytes_per_actor,
    runner_configs_per_namespace,
    runner_configs,
    runner_config_url_bytes,
    runner_config_headers,
    runner_config_header_bytes,
    runner_config_metadata_bytes,
    runner_config_max_runners,
    runner_config_request_lifespan_min_s,
    runner_config_request_lifespan_max_s
);
ser_fields!(
    TimeoutsSer,
    Timeouts,
    handshake_ms,
    runner_init_ms,
    websocket_open_ms,
    response_start_ms,
    http_stream_idle_ms,
    ack_timeout_ms,
    gc_interval_ms,
    ping_interval_ms,
    ping_timeout_ms,
    runner_lost_threshold_ms,
    actor_stop_threshold_ms,
    actor_wake_ms,
    hibernation_refresh_ms,
    hibernation_eligible_ms,
    hibernation_max_ms,
    close_handshake_ms,
    client_idle_ping_ms,
    client_pong_timeout_ms,
    memory_trim_ms,
    drain_ms
);

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLimits;

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 6420);
        assert_eq!(c.limits.pending_bytes_per_socket, 1 << 20);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("bogus = 1").is_err());
        assert!(Config::from_toml("[limits]\nnope = 2").is_err());
        let c = Config::from_toml("shards = 2\n[timeouts]\nack_timeout_ms = 100").unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.timeouts.ack_timeout_ms, 100);
        assert_eq!(c.timeouts.gc_interval_ms, 15_000);
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(vec![
            ("TORPOR_SHARDS".to_string(), "3".to_string()),
            ("TORPOR_LISTEN".to_string(), "127.0.0.1:1".to_string()),
            (
                "TORPOR_TIMEOUTS__ACK_TIMEOUT_MS".to_string(),
                "250".to_string(),
            ),
            ("HOME".to_string(), "/x".to_string()),
        ])
        .unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.timeouts.ack_timeout_ms, 250);
        let mut c = Config::default();
        assert!(c
            .apply_env(vec![("TORPOR_NOPE".to_string(), "1".to_string())])
            .is_err());
    }

    #[test]
    fn the_token_is_never_printed() {
        let mut c = Config::default();
        c.apply_env(vec![(
            "TORPOR_AUTH__ADMIN_TOKEN".to_string(),
            "very-secret-token".to_string(),
        )])
        .unwrap();
        // A later variable keeps it (the overlay round trip must not redact it).
        c.apply_env(vec![("TORPOR_SHARDS".to_string(), "2".to_string())])
            .unwrap();
        assert_eq!(c.admin_token(), Some("very-secret-token"));
        c.validate().unwrap();
        let printed = toml::to_string_pretty(&c).unwrap();
        assert!(!printed.contains("very-secret-token"), "{printed}");
        assert!(printed.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("very-secret-token"));
    }

    #[test]
    fn the_token_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("torpor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let mut c = Config::default();
        c.auth.admin_token_file = Some(f.clone());
        c.read_token_file().unwrap();
        assert_eq!(c.admin_token(), Some("from-a-file"));
        // Both set is refused.
        assert!(c.read_token_file().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn validation_catches_bad_limits() {
        let mut c = Config::default();
        c.limits.pending_messages_per_socket = 40000;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.timeouts.actor_stop_threshold_ms = 1000;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.timeouts.close_handshake_ms = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.timeouts.client_pong_timeout_ms = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.apply_env(vec![(
            "TORPOR_TIMEOUTS__CLIENT_IDLE_PING_MS".to_string(),
            "0".to_string(),
        )])
        .unwrap();
        assert_eq!(c.timeouts.client_idle_ping_ms, 0);
        c.validate().unwrap();
    }

    #[test]
    fn runner_config_limits_have_keys_and_checked_ranges() {
        let c = Config::from_toml(
            "[limits]\nrunner_configs_per_namespace = 3\nrunner_config_max_runners = 7",
        )
        .unwrap();
        let l = c.runner_config_limits();
        assert_eq!((l.per_namespace, l.max_runners), (3, 7));
        assert_eq!(l.total, crate::engine::RunnerConfigLimits::DEFAULT.total);
        assert_eq!(
            Config::default().runner_config_limits(),
            crate::engine::RunnerConfigLimits::DEFAULT
        );
        let mut c = Config::default();
        c.limits.runner_config_request_lifespan_max_s = 5;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.runner_configs = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn quota_default_is_one_gib() {
        assert_eq!(KvLimits::default().max_actor_bytes, 1 << 30);
        let cfg = crate::config::Config::default();
        assert_eq!(
            cfg.kv_limits().max_actor_bytes,
            cfg.limits.kv_bytes_per_actor
        );
    }

    #[test]
    fn serverless_section() {
        let c = Config::from_toml(
            "[serverless]\npublic_url = \"https://torpor.example/\"\ndrain_grace_ms = 5000\nmax_streams = 3\n[serverless.addresses]\nallow_private = false",
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.serverless.pools(Some("tok"));
        assert_eq!(p.endpoint, "https://torpor.example");
        assert_eq!(p.token.as_deref(), Some("tok"));
        assert_eq!(p.drain_grace, Duration::from_secs(5));
        let o = c.serverless.outbound();
        assert_eq!(o.max_streams, 3);
        assert!(!o.addresses.allow_private);
        assert_eq!(
            Config::default().serverless.outbound(),
            crate::serverless::ServerlessSettings::default()
        );
        assert!(Config::from_toml("[serverless]\nnope = 1").is_err());
        // The drain grace may not exceed the actor stop threshold.
        let mut c = Config::default();
        c.serverless.drain_grace_ms = c.timeouts.actor_stop_threshold_ms + 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("drain_grace_ms"));
        let mut c = Config::default();
        c.serverless.public_url = "ftp://x".into();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.serverless.event_timeout_ms = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.apply_env(vec![(
            "TORPOR_SERVERLESS__PUBLIC_URL".to_string(),
            "http://127.0.0.1:9".to_string(),
        )])
        .unwrap();
        assert_eq!(c.serverless.public_url, "http://127.0.0.1:9");
    }

    /// `cluster.nats_url`: several servers and credentials; a bad one refused by name and
    /// without its secret; the password never printed and kept across env overrides.
    #[test]
    fn cluster_nats_url() {
        let base = "[store]\nbackend = \"postgres\"\npostgres_url = \"postgres://u@127.0.0.1/t\"\n[cluster]\nenabled = true\n";
        let c = Config::from_toml(&format!(
            "{base}nats_url = \"nats://torpor:hunter2@a:4222,nats://b:4222\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        let printed = toml::to_string(&c).unwrap();
        assert!(
            !printed.contains("hunter2") && printed.contains("nats://torpor:***@a:4222"),
            "{printed}"
        );
        let mut c2 = c.clone();
        c2.apply_env(vec![("TORPOR_SHARDS".to_string(), "2".to_string())])
            .unwrap();
        assert_eq!(c2.cluster.nats_url, c.cluster.nats_url);
        c2.apply_env(vec![(
            "TORPOR_CLUSTER__NATS_URL".to_string(),
            "nats://c:4222".to_string(),
        )])
        .unwrap();
        assert_eq!(c2.cluster.nats_url, "nats://c:4222");
        let bad = Config::from_toml(&format!(
            "{base}nats_url = \"nats://u:one@a:4222,nats://u:hunter2@b:4222\"\n"
        ))
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("cluster.nats_url") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn store_section() {
        let c = Config::default();
        assert_eq!(c.store.backend, "redb");
        let c = Config::from_toml(
            "[store]\nbackend = \"postgres\"\npostgres_url = \"postgres://u:hunter2@127.0.0.1:5432/torpor\"\nstatement_timeout_ms = 3000\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.store.postgres().statement_timeout, Duration::from_secs(3));
        let printed = toml::to_string(&c).unwrap();
        assert!(
            !printed.contains("hunter2") && printed.contains("***"),
            "{printed}"
        );
        // An unrelated override keeps the password (the round trip goes through Serialize).
        let mut c2 = c.clone();
        c2.apply_env(vec![("TORPOR_SHARDS".to_string(), "2".to_string())])
            .unwrap();
        assert_eq!(c2.store.postgres_url, c.store.postgres_url);
        let mut c3 = Config::default();
        c3.apply_env(vec![
            ("TORPOR_STORE__BACKEND".to_string(), "postgres".to_string()),
            (
                "TORPOR_STORE__POSTGRES_URL".to_string(),
                "host=/tmp user=torpor dbname=torpor".to_string(),
            ),
        ])
        .unwrap();
        c3.validate().unwrap();
        assert!(Config::from_toml("[store]\nnope = 1\n").is_err());
        let mut bad = Config::default();
        bad.store.backend = "postgres".into();
        assert!(bad.validate().is_err(), "a URL is required");
        bad.store.postgres_url = "postgres://[bad".into();
        assert!(bad.validate().is_err());
        bad.store.backend = "sqlite".into();
        assert!(bad.validate().is_err());
    }
}
