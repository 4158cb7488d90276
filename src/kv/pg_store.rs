//! The actor KV backend on PostgreSQL, for several torpor nodes sharing one store.
//!
//! It implements [`KvBackend`] with the synchronous `postgres` crate: the KV worker is a plain
//! thread, and the crate runs each call to completion on a private single-threaded runtime, so
//! nothing of tokio leaks into the worker. Connections are plain TCP or unix sockets: **no TLS**
//! for now (point it at a server on a trusted network, a loopback address or a socket dir).
//!
//! Schema (created on open when absent, under an advisory lock so that nodes starting together
//! do not race): `kv (k bytea PRIMARY KEY, v bytea NOT NULL)` holds exactly the table keys and
//! stored values of the redb backend ([`super::encode_key`], [`super::encode_value`]); `bytea`
//! compares bytewise, so one actor's keys are one contiguous run of the primary key and list,
//! prefix, range, reverse, delete-range and drop are index range scans, as in redb. `meta (k
//! bytea PRIMARY KEY, v bytea NOT NULL)` holds the control plane's records, `usage (actor bytea
//! PRIMARY KEY, bytes bigint NOT NULL)` every actor's KV usage (no row for an actor without
//! keys; maintained in the same transaction as the data, exactly as redb does, see its module
//! doc), and `sys (k text PRIMARY KEY, v bigint NOT NULL)` the store-wide put sequence
//! (`put_seq`) that supplies metadata versions.
//!
//! Transactions: one [`KvBackend::write_batch`] (one group commit of the worker) is one
//! `BEGIN … COMMIT` at READ COMMITTED with `synchronous_commit = on`, so `Ok` means the commit is
//! durable on the server; a failed closure is rolled back. A batch that puts locks the `put_seq`
//! row (`SELECT … FOR UPDATE`) and writes it back before the commit, so versions strictly
//! increase across every node sharing the database (puts of different nodes serialize on that
//! row). Read batches run in `REPEATABLE READ READ ONLY` transactions. Statements are prepared
//! once per connection and cached (range scans per shape of bounds).
//!
//! Failures: a lost connection, a server shutting down or out of resources, a statement
//! cancelled by its timeout, or any error without a SQLSTATE is [`KvError::StoreDown`]; the
//! connection is dropped, the worker answers `store.unavailable` and later calls
//! [`KvBackend::probe`] (a fresh connection and `SELECT 1`, bounded by `probe_timeout`) and
//! [`KvBackend::reopen`] (a new connection; statements prepared again). Other server errors
//! concern one operation ([`KvError::Storage`]).
//!
//! Timeouts ([`PgSettings`], `[store]` in the config): `connect_timeout` bounds connecting;
//! `statement_timeout` is set on the session (`statement_timeout`, `lock_timeout`) so the server
//! cancels a statement that runs too long, and as `tcp_user_timeout` so unacknowledged data on a
//! dead peer or a broken network fails the connection; TCP keepalives catch an idle connection
//! to a vanished host. A server process that is frozen while its kernel still acknowledges
//! packets is not detected by these: a statement in flight then waits until the server resumes
//! or the connection breaks. Connecting (open, reopen) and the probe are bounded even then: they
//! run on a helper thread that the store thread waits for at most connect + statement timeout.
//!
//! Fence ([`PgStore::set_fence`]): on a node that leads placement, every write transaction
//! first checks, under a `FOR KEY SHARE` row lock held until the commit, that the lease row of
//! `torpor_lease` (see [`crate::cluster::pg_lease`], which creates it) still has the leader's
//! epoch and has not expired in the database's clock; otherwise the transaction is rolled back
//! and the batch fails with [`KvError::Fenced`]. The module doc of `pg_lease` explains why a
//! write then either commits before the next leader's acquisition or is refused. Read batches
//! are not fenced.

use std::collections::HashMap;
use std::ops::Bound;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Statement};

use super::{
    decode_value, encode_key, encode_list_range, encode_value, entry_bytes, over_quota,
    usage_after_put, BatchFn, KvBackend, KvBatch, KvEntries, KvError, KvHandle, KvLimits, KvStore,
    ListRange, MetaRecord, PutOutcome, VALUE_HEADER,
};
use crate::protocol::{KvKey, KvMetadata, KvValue};

/// Where the store lives and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// A `postgres://user@host:port/db` URL or a `host=… port=… user=… dbname=…` string
    /// (`host` may be a unix socket directory).
    pub url: String,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest run of one statement (server-side `statement_timeout` and `lock_timeout`, and
    /// the connection's `tcp_user_timeout`).
    pub statement_timeout: Duration,
    /// Longest wait for the probe's `SELECT 1` while the store is down, and for the idle
    /// health check.
    pub probe_timeout: Duration,
    /// How often an idle worker checks the connection while the store is up.
    pub health_every: Duration,
}

impl PgSettings {
    /// Settings with the default timeouts (5 s to connect, 10 s per statement, 2 s probe, a
    /// health check every 2 s when idle).
    pub fn new(url: impl Into<String>) -> PgSettings {
        PgSettings {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            health_every: Duration::from_secs(2),
        }
    }

    fn config(&self) -> Result<postgres::Config, String> {
        let mut cfg: postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("invalid postgres_url: {e}"))?;
        cfg.connect_timeout(self.connect_timeout)
            .tcp_user_timeout(self.statement_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("torpor");
        Ok(cfg)
    }
}

/// Why the store could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    #[error("store.postgres_url is not valid: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL ({target}): {message}")]
    Connect { target: String, message: String },
    #[error("PostgreSQL ({target}): cannot create or read the store's tables: {message}")]
    Schema { target: String, message: String },
    #[error("cannot start the store's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Classifies a driver error: connection and server-side failures take the store down, the
/// rest concern one operation.
fn pg_error(e: postgres::Error) -> KvError {
    let down = match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources (disk full, out of memory)
                || c.starts_with("57") // operator intervention: shutdown, statement cancelled
                || c.starts_with("58") // system error (I/O)
                || c.starts_with("XX") // internal error, data corrupted
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
    };
    if down || e.is_closed() {
        KvError::StoreDown(format!("postgres: {e}"))
    } else {
        KvError::Storage(format!("postgres: {e}"))
    }
}

fn not_connected() -> KvError {
    KvError::StoreDown("postgres: not connected (the connection failed and is not back yet)".into())
}

const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(7395117049);
    CREATE TABLE IF NOT EXISTS kv (k bytea PRIMARY KEY, v bytea NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (k bytea PRIMARY KEY, v bytea NOT NULL);
    CREATE TABLE IF NOT EXISTS usage (actor bytea PRIMARY KEY, bytes bigint NOT NULL);
    CREATE TABLE IF NOT EXISTS sys (k text PRIMARY KEY, v bigint NOT NULL);
    INSERT INTO sys (k, v) VALUES ('put_seq', 0) ON CONFLICT (k) DO NOTHING;
";

/// The statements of one connection.
struct Stmts {
    get: Statement,
    value_len: Statement,
    upsert: Statement,
    delete: Statement,
    usage: Statement,
    set_usage: Statement,
    del_usage: Statement,
    seq_lock: Statement,
    seq_set: Statement,
    meta_put: Statement,
    meta_del: Statement,
    meta_get: Statement,
    meta_all: Statement,
}

/// One open connection with its prepared statements.
struct Conn {
    client: Client,
    s: Stmts,
    /// Range statements by their SQL text (a few shapes of bounds).
    ranges: HashMap<String, Statement>,
}

impl Conn {
    fn open(settings: &PgSettings) -> Result<Conn, KvError> {
        let cfg = settings.config().map_err(KvError::StoreDown)?;
        let mut client = cfg.connect(NoTls).map_err(pg_error)?;
        let ms = settings.statement_timeout.as_millis().max(1);
        client
            .batch_execute(&format!(
                "SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
                 SET synchronous_commit = on; SET default_transaction_isolation = 'read committed'"
            ))
            .map_err(pg_error)?;
        client
            .batch_execute(&format!("BEGIN; {SCHEMA} COMMIT;"))
            .map_err(pg_error)?;
        let mut p = |sql: &str| client.prepare(sql).map_err(pg_error);
        let s = Stmts {
            get: p("SELECT v FROM kv WHERE k = $1")?,
            value_len: p("SELECT octet_length(v)::bigint FROM kv WHERE k = $1")?,
            upsert: p("INSERT INTO kv (k, v) VALUES ($1, $2) \
                       ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")?,
            delete: p("DELETE FROM kv WHERE k = $1 RETURNING octet_length(v)::bigint")?,
            usage: p("SELECT bytes FROM usage WHERE actor = $1")?,
            set_usage: p("INSERT INTO usage (actor, bytes) VALUES ($1, $2) \
                          ON CONFLICT (actor) DO UPDATE SET bytes = EXCLUDED.bytes")?,
            del_usage: p("DELETE FROM usage WHERE actor = $1")?,
            seq_lock: p("SELECT v FROM sys WHERE k = 'put_seq' FOR UPDATE")?,
            seq_set: p("UPDATE sys SET v = $1 WHERE k = 'put_seq'")?,
            meta_put: p("INSERT INTO meta (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")?,
            meta_del: p("DELETE FROM meta WHERE k = $1")?,
            meta_get: p("SELECT v FROM meta WHERE k = $1")?,
            meta_all: p("SELECT k, v FROM meta ORDER BY k")?,
        };
        Ok(Conn {
            client,
            s,
            ranges: HashMap::new(),
        })
    }

    /// [`Conn::open`] bounded by the connect and statement timeouts (see [`bounded`]).
    fn open_bounded(settings: &PgSettings) -> Result<Conn, KvError> {
        let s = settings.clone();
        let limit = settings.connect_timeout + settings.statement_timeout;
        bounded(limit, "connection", move || Conn::open(&s))
    }

    /// The cached statement for `sql`, prepared on first use.
    fn range_stmt(&mut self, sql: String) -> Result<Statement, KvError> {
        if let Some(s) = self.ranges.get(&sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql).map_err(pg_error)?;
        self.ranges.insert(sql, s.clone());
        Ok(s)
    }
}

/// The lease epoch every write transaction of a leader is conditional on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: u64,
}

/// The fence check: the lease row, locked against a concurrent acquire until the commit.
const FENCE_SQL: &str = "SELECT epoch, expires_at >= clock_timestamp() FROM torpor_lease \
                         WHERE id = 1 FOR KEY SHARE";

/// The PostgreSQL-backed store. `Send`: open it on one thread, hand it to the worker.
pub struct PgStore {
    settings: PgSettings,
    /// When set, every write transaction is conditional on this lease epoch.
    fence: Option<Fence>,
    /// `None` after a failure until [`KvBackend::reopen`] connects again.
    conn: Option<Conn>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &redacted(&self.settings.url))
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

/// The connection string without its password, for messages and `check-config`.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.scheme().starts_with("postgres") => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        _ => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

impl PgStore {
    /// Connects, creates the tables when absent and prepares the statements.
    pub fn open(settings: PgSettings) -> Result<PgStore, PgOpenError> {
        settings.config().map_err(PgOpenError::BadUrl)?;
        let t = redacted(&settings.url);
        // A failure to reach the server takes the store down; an error the server answers
        // (permissions, a clashing table) concerns the schema.
        let conn = Conn::open_bounded(&settings).map_err(|e| match e {
            KvError::StoreDown(message) => PgOpenError::Connect { target: t, message },
            other => PgOpenError::Schema {
                target: t,
                message: other.to_string(),
            },
        })?;
        Ok(PgStore {
            settings,
            fence: None,
            conn: Some(conn),
        })
    }

    /// Where it connects and its timeouts.
    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// Makes every following write transaction conditional on the lease epoch (`None`: no
    /// condition, a single node). Set it when the node becomes leader with an epoch, before
    /// its first write as leader; a refused write answers [`KvError::Fenced`].
    pub fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }

    /// The fence in force.
    pub fn fence(&self) -> Option<Fence> {
        self.fence
    }

    /// Stores one meta record and commits.
    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.write_batch(&mut |b| b.put_meta(key, value))
    }

    /// Removes one meta record (missing is fine) and commits.
    pub fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.write_batch(&mut |b| b.delete_meta(key))
    }

    /// Every meta record, ordered by key.
    pub fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        let mut out = Vec::new();
        self.read_batch(&mut |b| {
            out = b.load_meta()?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs `f` between `begin` and COMMIT; rolls back when it fails. A store-down error drops
    /// the connection.
    fn run(&mut self, begin: &str, write: bool, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        let fence = if write { self.fence } else { None };
        let conn = self.conn.as_mut().ok_or_else(not_connected)?;
        let result = (|| {
            conn.client.batch_execute(begin).map_err(pg_error)?;
            if let Some(fence) = fence {
                check_fence(conn, fence)?;
            }
            let mut view = View {
                conn: &mut *conn,
                write,
                seq: None,
                scratch: Vec::new(),
            };
            let r = f(&mut view);
            let seq = view.seq;
            match r {
                Ok(()) => {
                    if let Some((first, now)) = seq {
                        if now != first {
                            let v = i64::try_from(now).map_err(|_| {
                                KvError::Storage("the put sequence is exhausted".into())
                            })?;
                            conn.client
                                .execute(&conn.s.seq_set, &[&v])
                                .map_err(pg_error)?;
                        }
                    }
                    conn.client.batch_execute("COMMIT").map_err(pg_error)
                }
                Err(e) => Err(e),
            }
        })();
        if let Err(e) = &result {
            if e.is_store_down() {
                self.conn = None;
            } else if let Some(conn) = self.conn.as_mut() {
                // The transaction is open or aborted: roll it back; a connection that cannot is
                // dropped (the next batch then reconnects through the worker's reopen).
                if !conn.client.is_closed() && conn.client.batch_execute("ROLLBACK").is_err() {
                    self.conn = None;
                }
            }
        }
        result
    }
}

impl KvBackend for PgStore {
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        self.run("BEGIN", true, f)
    }

    fn read_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        self.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", false, f)
    }

    /// Drops the connection and connects again (statements prepared again, schema checked).
    fn reopen(&mut self, _verify: bool) -> Result<(), KvError> {
        self.conn = None;
        self.conn = Some(Conn::open_bounded(&self.settings)?);
        Ok(())
    }

    fn health_every(&self) -> Option<Duration> {
        Some(self.settings.health_every)
    }

    fn set_fence(&mut self, epoch: Option<u64>) {
        PgStore::set_fence(self, epoch.map(|epoch| Fence { epoch }));
    }

    /// The open connection answers within `probe_timeout` (`Client::is_valid`: a simple
    /// query with a timeout, so a server that stopped answering cannot hold the worker).
    fn health(&mut self) -> Result<(), KvError> {
        let timeout = self.settings.probe_timeout;
        match self.conn.as_mut() {
            Some(c) => c.client.is_valid(timeout).map_err(pg_error),
            None => Err(KvError::StoreDown("no connection to PostgreSQL".into())),
        }
    }

    /// A fresh connection answers `SELECT 1` within `probe_timeout`.
    fn probe(&mut self) -> Result<(), KvError> {
        let mut settings = self.settings.clone();
        settings.connect_timeout = settings.probe_timeout.min(settings.connect_timeout);
        let probe_timeout = settings.probe_timeout;
        bounded(
            settings.connect_timeout + probe_timeout,
            "probe",
            move || {
                let cfg = settings.config().map_err(KvError::StoreDown)?;
                let mut client = cfg.connect(NoTls).map_err(pg_error)?;
                client.is_valid(probe_timeout).map_err(pg_error)?;
                client
                    .query_one("SELECT 1", &[])
                    .map_err(pg_error)
                    .map(|_| ())
            },
        )
    }
}

/// The fence check inside an open write transaction (see the module doc): the row lock taken
/// here is held until the transaction ends.
fn check_fence(conn: &mut Conn, fence: Fence) -> Result<(), KvError> {
    // No lease table: no lease was ever granted in this database, so no epoch is current.
    let no_table = |e: postgres::Error| {
        if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
            KvError::Fenced {
                epoch: fence.epoch,
                current: None,
            }
        } else {
            pg_error(e)
        }
    };
    let stmt = match conn.ranges.get(FENCE_SQL) {
        Some(s) => s.clone(),
        None => {
            let s = conn.client.prepare(FENCE_SQL).map_err(no_table)?;
            conn.ranges.insert(FENCE_SQL.to_string(), s.clone());
            s
        }
    };
    let row = conn.client.query_opt(&stmt, &[]).map_err(no_table)?;
    let (current, live) = match row {
        Some(r) => {
            let e: i64 = r.get(0);
            (u64::try_from(e).ok(), r.get::<_, bool>(1))
        }
        None => (None, false),
    };
    if current == Some(fence.epoch) && live {
        Ok(())
    } else {
        Err(KvError::Fenced {
            epoch: fence.epoch,
            current,
        })
    }
}

/// Runs `f` on a helper thread and waits at most `limit` for it. The driver bounds only the
/// socket connect; a server that accepts the connection but never answers (frozen) would
/// otherwise hold the store thread in the start-up handshake forever. A helper that overruns is
/// left to finish on its own (its result is dropped).
fn bounded<T: Send + 'static>(
    limit: Duration,
    what: &'static str,
    f: impl FnOnce() -> Result<T, KvError> + Send + 'static,
) -> Result<T, KvError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("torpor-pg-connect".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| {
            KvError::StoreDown(format!("postgres: cannot start the {what} thread: {e}"))
        })?;
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(KvError::StoreDown(format!(
            "postgres: the {what} got no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// Opens the PostgreSQL store (refusing a bad URL or an unreachable server) and starts its
/// worker thread.
pub fn spawn(settings: PgSettings, limits: KvLimits) -> Result<KvHandle, PgOpenError> {
    let store = PgStore::open(settings)?;
    super::spawn_backend(store, limits).map_err(PgOpenError::Thread)
}

/// A transaction view.
struct View<'c> {
    conn: &'c mut Conn,
    write: bool,
    /// (sequence at the start, last used) once the batch has locked the sequence row.
    seq: Option<(u64, u64)>,
    scratch: Vec<u8>,
}

fn read_only() -> KvError {
    KvError::Storage("write in a read transaction".to_string())
}

fn to_u64(v: i64) -> Result<u64, KvError> {
    u64::try_from(v).map_err(|_| KvError::Corrupt(format!("negative size {v} in the store")))
}

fn to_i64(v: u64) -> Result<i64, KvError> {
    i64::try_from(v).map_err(|_| KvError::Storage(format!("size {v} out of range")))
}

fn bound_sql(b: Bound<&[u8]>, low: bool, n: usize, params: &mut Vec<Vec<u8>>) -> String {
    match b {
        Bound::Unbounded => "TRUE".to_string(),
        Bound::Included(v) => {
            params.push(v.to_vec());
            format!("k {} ${n}", if low { ">=" } else { "<=" })
        }
        Bound::Excluded(v) => {
            params.push(v.to_vec());
            format!("k {} ${n}", if low { ">" } else { "<" })
        }
    }
}

impl View<'_> {
    fn check_write(&self) -> Result<(), KvError> {
        if self.write {
            Ok(())
        } else {
            Err(read_only())
        }
    }

    /// The next put version (locks the sequence row on first use in the batch).
    fn next_version(&mut self) -> Result<u64, KvError> {
        let (first, last) = match self.seq {
            Some(s) => s,
            None => {
                let row = self
                    .conn
                    .client
                    .query_one(&self.conn.s.seq_lock, &[])
                    .map_err(pg_error)?;
                let v = to_u64(row.get(0))?;
                (v, v)
            }
        };
        let next = last
            .checked_add(1)
            .ok_or_else(|| KvError::Storage("the put sequence is exhausted".to_string()))?;
        self.seq = Some((first, next));
        Ok(next)
    }

    fn set_usage(&mut self, actor: &str, bytes: u64) -> Result<(), KvError> {
        let c = &mut self.conn;
        if bytes == 0 {
            c.client
                .execute(&c.s.del_usage, &[&actor.as_bytes()])
                .map_err(pg_error)?;
        } else {
            c.client
                .execute(&c.s.set_usage, &[&actor.as_bytes(), &to_i64(bytes)?])
                .map_err(pg_error)?;
        }
        Ok(())
    }

    fn free(&mut self, actor: &str, freed: u64) -> Result<(), KvError> {
        if freed == 0 {
            return Ok(());
        }
        let usage = self.usage(actor)?;
        self.set_usage(actor, usage.saturating_sub(freed))
    }

    /// Deletes every table key in the bounds (one actor's, whose prefix is `prefix_len` bytes);
    /// returns the usage bytes they held.
    fn remove_range(
        &mut self,
        prefix_len: usize,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> Result<u64, KvError> {
        let mut params = Vec::new();
        let lo = bound_sql(start, true, 1, &mut params);
        let hi = bound_sql(end, false, params.len() + 1, &mut params);
        let sql = format!(
            "WITH d AS (DELETE FROM kv WHERE {lo} AND {hi} RETURNING k, v) \
             SELECT coalesce(sum(greatest(octet_length(k) - {prefix_len}, 0)::bigint \
             + greatest(octet_length(v) - {VALUE_HEADER}, 0)::bigint), 0)::bigint FROM d"
        );
        let stmt = self.conn.range_stmt(sql)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let row = self.conn.client.query_one(&stmt, &refs).map_err(pg_error)?;
        to_u64(row.get(0))
    }
}

impl KvStore for View<'_> {
    fn get(&mut self, actor: &str, key: &[u8]) -> Result<Option<(KvValue, KvMetadata)>, KvError> {
        encode_key(actor, key, &mut self.scratch)?;
        let c = &mut self.conn;
        let Some(row) = c
            .client
            .query_opt(&c.s.get, &[&self.scratch.as_slice()])
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let stored: &[u8] = row.get(0);
        let (meta, value) = decode_value(stored)?;
        Ok(Some((value.to_vec(), meta)))
    }

    fn list(
        &mut self,
        actor: &str,
        range: &ListRange<'_>,
        reverse: bool,
        limit: usize,
        out: &mut KvEntries,
    ) -> Result<(), KvError> {
        let Some(enc) = encode_list_range(actor, range)? else {
            return Ok(());
        };
        if limit == 0 {
            return Ok(());
        }
        let (start, end) = enc.bounds();
        let mut params = Vec::new();
        let lo = bound_sql(start, true, 1, &mut params);
        let hi = bound_sql(end, false, params.len() + 1, &mut params);
        let n = params.len() + 1;
        let order = if reverse { "DESC" } else { "ASC" };
        let sql = format!("SELECT k, v FROM kv WHERE {lo} AND {hi} ORDER BY k {order} LIMIT ${n}");
        let stmt = self.conn.range_stmt(sql)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn postgres::types::ToSql + Sync))
            .collect();
        refs.push(&limit);
        let rows = self.conn.client.query(&stmt, &refs).map_err(pg_error)?;
        for row in rows {
            let k: &[u8] = row.get(0);
            let v: &[u8] = row.get(1);
            let user_key = k.get(enc.prefix_len..).ok_or_else(|| {
                KvError::Corrupt(format!(
                    "table key of {} bytes in an actor's range",
                    k.len()
                ))
            })?;
            let (meta, value) = decode_value(v)?;
            out.push(user_key.to_vec(), value.to_vec(), meta);
        }
        Ok(())
    }

    fn usage(&mut self, actor: &str) -> Result<u64, KvError> {
        let c = &mut self.conn;
        match c
            .client
            .query_opt(&c.s.usage, &[&actor.as_bytes()])
            .map_err(pg_error)?
        {
            Some(row) => to_u64(row.get(0)),
            None => Ok(0),
        }
    }

    fn put(
        &mut self,
        actor: &str,
        keys: &[KvKey],
        values: &[KvValue],
        now_unix_ms: i64,
        max_usage: u64,
    ) -> Result<PutOutcome, KvError> {
        self.check_write()?;
        if keys.len() != values.len() {
            return Err(KvError::Storage(format!(
                "put of {} keys with {} values",
                keys.len(),
                values.len()
            )));
        }
        let usage = self.usage(actor)?;
        let after = {
            let c = &mut *self.conn;
            let scratch = &mut self.scratch;
            usage_after_put(usage, keys, values, |key| {
                encode_key(actor, key, scratch)?;
                match c
                    .client
                    .query_opt(&c.s.value_len, &[&scratch.as_slice()])
                    .map_err(pg_error)?
                {
                    Some(row) => {
                        let len = to_u64(row.get(0))?;
                        let len = usize::try_from(len).unwrap_or(usize::MAX);
                        Ok(Some(entry_bytes(
                            key.len(),
                            len.saturating_sub(VALUE_HEADER),
                        )))
                    }
                    None => Ok(None),
                }
            })?
        };
        if over_quota(usage, after, max_usage) {
            return Ok(PutOutcome::OverQuota { usage, after });
        }
        for (key, value) in keys.iter().zip(values) {
            let version = self.next_version()?;
            encode_key(actor, key, &mut self.scratch)?;
            let stored = encode_value(version, now_unix_ms, value);
            let c = &mut self.conn;
            c.client
                .execute(&c.s.upsert, &[&self.scratch.as_slice(), &stored.as_slice()])
                .map_err(pg_error)?;
        }
        if after != usage {
            self.set_usage(actor, after)?;
        }
        Ok(PutOutcome::Stored)
    }

    fn delete(&mut self, actor: &str, keys: &[KvKey]) -> Result<(), KvError> {
        self.check_write()?;
        let mut freed: u64 = 0;
        for key in keys {
            encode_key(actor, key, &mut self.scratch)?;
            let c = &mut self.conn;
            if let Some(row) = c
                .client
                .query_opt(&c.s.delete, &[&self.scratch.as_slice()])
                .map_err(pg_error)?
            {
                let len = usize::try_from(to_u64(row.get(0))?).unwrap_or(usize::MAX);
                freed =
                    freed.saturating_add(entry_bytes(key.len(), len.saturating_sub(VALUE_HEADER)));
            }
        }
        self.free(actor, freed)
    }

    fn delete_range(&mut self, actor: &str, start: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.check_write()?;
        if start >= end {
            return Ok(());
        }
        let mut lo = Vec::new();
        let mut hi = Vec::new();
        encode_key(actor, start, &mut lo)?;
        encode_key(actor, end, &mut hi)?;
        let prefix_len = lo.len() - start.len();
        let freed = self.remove_range(prefix_len, Bound::Included(&lo), Bound::Excluded(&hi))?;
        self.free(actor, freed)
    }

    fn drop_actor(&mut self, actor: &str) -> Result<(), KvError> {
        self.check_write()?;
        let Some(enc) = encode_list_range(actor, &ListRange::All)? else {
            return Ok(());
        };
        let (start, end) = enc.bounds();
        self.remove_range(enc.prefix_len, start, end)?;
        self.set_usage(actor, 0)
    }
}

impl KvBatch for View<'_> {
    fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.check_write()?;
        let c = &mut self.conn;
        c.client
            .execute(&c.s.meta_put, &[&key, &value])
            .map_err(pg_error)?;
        Ok(())
    }

    fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.check_write()?;
        let c = &mut self.conn;
        c.client.execute(&c.s.meta_del, &[&key]).map_err(pg_error)?;
        Ok(())
    }

    fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        let c = &mut self.conn;
        let rows = c.client.query(&c.s.meta_all, &[]).map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
            .collect())
    }

    fn get_meta(&mut self, keys: &[Vec<u8>]) -> Result<Vec<MetaRecord>, KvError> {
        let mut out = Vec::new();
        for k in keys {
            let c = &mut self.conn;
            if let Some(row) = c
                .client
                .query_opt(&c.s.meta_get, &[&k.as_slice()])
                .map_err(pg_error)?
            {
                out.push((k.clone(), row.get::<_, Vec<u8>>(0)));
            }
        }
        Ok(out)
    }
}
