//! The placement lease in PostgreSQL, and the fence that makes a deposed leader's writes fail.
//!
//! Table: `torpor_lease (id int primary key, epoch bigint, holder text, expires_at timestamptz)`
//! with one row (`id = 1`), created when absent. Every time is the database's clock
//! (`clock_timestamp()`), never a node's.
//!
//! - [`PgLease::acquire`]: one transaction takes the advisory lock [`LEASE_LOCK`]
//!   (`pg_try_advisory_xact_lock`: contenders are serialised, a second one is told the lease is
//!   busy instead of queueing), then the row `FOR UPDATE`; when the row is absent or its
//!   `expires_at` has passed, it writes `epoch + 1`, the caller as holder and `now + ttl`, and
//!   returns the new epoch; otherwise it returns who holds it until when.
//! - [`PgLease::renew`]: one `UPDATE … SET expires_at = now + ttl WHERE epoch = $e AND holder =
//!   $node AND expires_at >= now` — renewed, or lost (another epoch, or expired).
//!
//! The fence ([`crate::kv::pg_store::Fence`], set with `PgStore::set_fence`): every write
//! transaction of a leader's store first runs `SELECT epoch, expires_at >= clock_timestamp()
//! FROM torpor_lease WHERE id = 1 FOR KEY SHARE` and is abandoned with
//! [`crate::kv::KvError::Fenced`] when the epoch is not the leader's or the lease has expired.
//! Why this is enough: the `FOR KEY SHARE` row lock is held until the write transaction ends,
//! and an acquire needs `FOR UPDATE` on the same row, which conflicts with it. So an acquire
//! that comes while a fenced write is open waits until that write has committed (or rolled
//! back), and then reads the row again (READ COMMITTED re-checks the newest version). Hence
//! every write of epoch E either commits *before* the acquisition of E + 1 — and the new
//! leader, which restores from the records after acquiring, sees it — or starts after that
//! acquisition committed and finds epoch E + 1 in the row, and is refused. No write of a
//! deposed leader lands after its successor read the records, whatever the deposed node's
//! clock or pauses (SIGSTOP past its lease, then SIGCONT: its next write is refused). A renew
//! (`UPDATE` of a non-key column, `FOR NO KEY UPDATE`) does not conflict with `FOR KEY SHARE`,
//! so the leader's own writes never delay its renewals.

use std::time::{Duration, SystemTime};

use postgres::{Client, NoTls};

use crate::kv::KvError;

/// The advisory lock key that serialises acquisitions.
pub const LEASE_LOCK: i64 = 7_395_117_050;

const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(7395117049);
    CREATE TABLE IF NOT EXISTS torpor_lease (
        id int PRIMARY KEY,
        epoch bigint NOT NULL,
        holder text NOT NULL,
        expires_at timestamptz NOT NULL
    );
";

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is the caller's, with this epoch.
    Acquired { epoch: u64 },
    /// `holder` holds the lease with `epoch` until `until` (the database's clock).
    Held {
        holder: String,
        epoch: u64,
        until: SystemTime,
    },
    /// Another node is acquiring at this moment (it holds the advisory lock).
    Busy,
}

/// The answer to a renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renew {
    Renewed,
    Lost,
}

/// A connection for the lease operations (separate from the KV store's, so that a long KV
/// batch never delays a renew). It reconnects on the next call after a failure.
pub struct PgLease {
    url: String,
    statement_timeout: Duration,
    client: Option<Client>,
}

impl std::fmt::Debug for PgLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLease")
            .field("target", &crate::kv::pg_store::redacted(&self.url))
            .field("connected", &self.client.is_some())
            .finish()
    }
}

fn err(e: postgres::Error) -> KvError {
    if e.code().is_none() || e.is_closed() {
        KvError::StoreDown(format!("postgres lease: {e}"))
    } else {
        KvError::Storage(format!("postgres lease: {e}"))
    }
}

fn to_u64(v: i64) -> Result<u64, KvError> {
    u64::try_from(v).map_err(|_| KvError::Corrupt(format!("negative lease epoch {v}")))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PgLease {
    /// A lease client for `url`; each statement is bounded by `statement_timeout` (keep it
    /// below the lease's safety margin so that a stuck call is answered as an error before
    /// the leader's deadline). Connects lazily.
    pub fn new(url: impl Into<String>, statement_timeout: Duration) -> PgLease {
        PgLease {
            url: url.into(),
            statement_timeout,
            client: None,
        }
    }

    /// Connects now (creating the table when absent).
    pub fn connect(&mut self) -> Result<(), KvError> {
        self.client()?;
        Ok(())
    }

    fn client(&mut self) -> Result<&mut Client, KvError> {
        if self.client.is_none() {
            let mut cfg: postgres::Config = self
                .url
                .parse()
                .map_err(|e| KvError::StoreDown(format!("invalid postgres url: {e}")))?;
            cfg.connect_timeout(self.statement_timeout)
                .tcp_user_timeout(self.statement_timeout)
                .application_name("torpor-lease");
            let mut c = cfg.connect(NoTls).map_err(err)?;
            let ms = millis(self.statement_timeout).max(1);
            c.batch_execute(&format!(
                "SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
                 SET synchronous_commit = on; BEGIN; {SCHEMA} COMMIT;"
            ))
            .map_err(err)?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| KvError::StoreDown("postgres lease: not connected".into()))
    }

    /// Drops the connection after a failure that concerns it.
    fn keep<T>(&mut self, r: Result<T, KvError>) -> Result<T, KvError> {
        if let Err(e) = &r {
            let closed = self.client.as_ref().is_none_or(|c| c.is_closed());
            if e.is_store_down() || closed {
                self.client = None;
            } else if let Some(c) = self.client.as_mut() {
                if c.batch_execute("ROLLBACK").is_err() {
                    self.client = None;
                }
            }
        }
        r
    }

    /// Takes the lease for `node` for `ttl` when it is free or expired (see the module doc).
    pub fn acquire(&mut self, node: &str, ttl: Duration) -> Result<Acquire, KvError> {
        let ttl_ms = millis(ttl);
        let r = (|| {
            let c = self.client()?;
            let mut tx = c.transaction().map_err(err)?;
            let locked: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LEASE_LOCK])
                .map_err(err)?
                .get(0);
            if !locked {
                return Ok(Acquire::Busy);
            }
            let row = tx
                .query_opt(
                    "SELECT epoch, holder, expires_at, expires_at < clock_timestamp() \
                     FROM torpor_lease WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .map_err(err)?;
            let epoch = match row {
                None => {
                    tx.execute(
                        "INSERT INTO torpor_lease (id, epoch, holder, expires_at) VALUES \
                         (1, 1, $1, clock_timestamp() + $2::bigint * interval '1 millisecond')",
                        &[&node, &ttl_ms],
                    )
                    .map_err(err)?;
                    1
                }
                Some(row) => {
                    let epoch = to_u64(row.get(0))?;
                    let expired: bool = row.get(3);
                    if !expired {
                        return Ok(Acquire::Held {
                            holder: row.get(1),
                            epoch,
                            until: row.get(2),
                        });
                    }
                    let row = tx
                        .query_one(
                            "UPDATE torpor_lease SET epoch = epoch + 1, holder = $1, \
                             expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond' \
                             WHERE id = 1 RETURNING epoch",
                            &[&node, &ttl_ms],
                        )
                        .map_err(err)?;
                    to_u64(row.get(0))?
                }
            };
            tx.commit().map_err(err)?;
            Ok(Acquire::Acquired { epoch })
        })();
        self.keep(r)
    }

    /// Extends the lease of `epoch` held by `node` by `ttl` from now, unless it expired or
    /// another epoch replaced it.
    pub fn renew(&mut self, node: &str, epoch: u64, ttl: Duration) -> Result<Renew, KvError> {
        let ttl_ms = millis(ttl);
        let epoch = i64::try_from(epoch)
            .map_err(|_| KvError::Storage(format!("lease epoch {epoch} out of range")))?;
        let r = (|| {
            let n = self
                .client()?
                .execute(
                    "UPDATE torpor_lease \
                     SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond' \
                     WHERE id = 1 AND epoch = $1 AND holder = $2 \
                     AND expires_at >= clock_timestamp()",
                    &[&epoch, &node, &ttl_ms],
                )
                .map_err(err)?;
            Ok(if n == 1 { Renew::Renewed } else { Renew::Lost })
        })();
        self.keep(r)
    }

    /// The lease row as it is: (epoch, holder, expired in the database's clock).
    pub fn current(&mut self) -> Result<Option<(u64, String, bool)>, KvError> {
        let r = (|| {
            let row = self
                .client()?
                .query_opt(
                    "SELECT epoch, holder, expires_at < clock_timestamp() \
                     FROM torpor_lease WHERE id = 1",
                    &[],
                )
                .map_err(err)?;
            match row {
                None => Ok(None),
                Some(r) => Ok(Some((to_u64(r.get(0))?, r.get(1), r.get(2)))),
            }
        })();
        self.keep(r)
    }
}

#[cfg(test)]
mod pg_tests;
