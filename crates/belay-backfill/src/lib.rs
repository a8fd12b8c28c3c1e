//! Batched, resumable backfills: `UPDATE table SET … [WHERE …]` applied in primary-key
//! batches found by keyset pagination (row comparison for composite keys), never as one
//! long statement. Each batch is its own short transaction with a low `lock_timeout`
//! (retried on 55P03 and deadlocks with bounded, jittered backoff) and a
//! `statement_timeout`; the backfill's position in `<schema>.backfill_progress` is updated
//! in that same transaction, so an interruption never loses or repeats a batch and a rerun
//! resumes from the last committed key. It owns the batch loop, the progress table, the
//! validation of the `SET`/`WHERE` texts (by PostgreSQL itself, through `EXPLAIN`) and the
//! `belay_backfill_*` metrics. It must not print (callers get [`Progress`] callbacks),
//! install signal handlers (callers pass a [`CancellationToken`] and decide what a signal
//! means), parse SQL itself, or touch migration history.

mod api;
mod error;
mod store;
mod table;

pub use api::{
    BackfillApi, BackfillEvent, BackfillRequest, BackfillSink, LocalBackfills, Started, api_error,
};
pub use error::{BackfillError, Clause, ErrorKind};
pub use store::TABLE as PROGRESS_TABLE;
pub use table::{KeyColumn, TableInfo};
pub use tokio_util::sync::CancellationToken;

use belay_core::DatabaseUrl;
use belay_telemetry::names;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgErrorPosition};
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::time::{Duration, Instant};
use store::{Counters, Store};
use table::BatchSql;
use tracing::Instrument;

/// The `application_name` of backfill sessions, so `belay locks` and `pg_stat_activity`
/// show who holds the row locks.
pub const APPLICATION_NAME: &str = "belay-backfill";

/// Advisory-lock class of backfills (`"bfll"`), distinct from the migration runner's, so a
/// backfill and a migration never exclude each other.
const LOCK_CLASS: i32 = 0x6266_6c6c;

/// How each batch waits for locks and how long it may run.
///
/// A batch holds row locks on up to `batch_size` rows until it commits, and while it waits
/// for a lock the application's writes to those rows queue behind it; `lock_timeout` is
/// the longest it adds to them, as for migrations (see ARCHITECTURE.md, "Lock-safe
/// execution"). `statement_timeout` keeps a batch that turns out slow (a missing index for
/// the `SET`'s subquery, a huge batch) from holding its locks for long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// Attempts per batch before giving up on locks.
    pub max_attempts: u32,
    /// Budget per batch for lock waits and backoff together.
    pub max_lock_wait: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            lock_timeout: Duration::from_millis(100),
            statement_timeout: Duration::from_secs(30),
            max_attempts: 60,
            max_lock_wait: Duration::from_secs(120),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// Backoff before attempt `attempt + 1`: exponential, capped, with jitter in [d/2, d]
    /// so a backfill and the application's own retries do not fall into step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_max);
        let half = d / 2;
        half + Duration::from_secs_f64(half.as_secs_f64() * fastrand::f64())
    }
}

/// What to backfill and how.
#[derive(Debug, Clone)]
pub struct BackfillSpec {
    /// `table` or `schema.table`, resolved through the session's `search_path`.
    pub table: String,
    /// The assignments of `UPDATE … SET`, e.g. `total = price * qty`.
    pub set: String,
    /// Only rows matching this condition are updated (every batch still walks the whole
    /// key range, so batches stay bounded however selective it is).
    pub filter: Option<String>,
    /// The progress row's key; [`default_name`] when `None`.
    pub name: Option<String>,
    /// Keys walked per batch (each batch examines at most this many rows).
    pub batch_size: u32,
    /// Pause between batches, for replicas and autovacuum to keep up.
    pub sleep: Duration,
    /// Start over even if a backfill of this name exists (finished or not).
    pub restart: bool,
    /// Schema of the progress table (the history schema, `belay` by default).
    pub progress_schema: String,
    pub limits: Limits,
}

/// Where a prepared backfill starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Fresh,
    /// `--restart` reset an existing backfill of this name.
    Restarted,
    /// An earlier run was interrupted; the next batch starts after `last_key` (`None`: the
    /// earlier run committed no batch).
    Resuming {
        last_key: Option<Vec<String>>,
        rows_updated: u64,
        batches: u64,
    },
    /// Finished earlier; [`Backfill::run`] does nothing.
    AlreadyDone {
        rows_updated: u64,
        batches: u64,
        finished_at: DateTime<Utc>,
    },
}

/// Reported to the caller as the backfill goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A batch committed.
    Batch(BatchReport),
    /// A batch did not get a lock within `lock_timeout` (or was chosen as a deadlock
    /// victim, or hit a serialization failure); it was rolled back and is retried after
    /// `backoff`.
    LockRetry {
        batch: u64,
        attempt: u32,
        backoff: Duration,
        sqlstate: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchReport {
    /// 1-based, counted over the whole backfill (earlier runs included).
    pub batch: u64,
    pub rows_updated: u64,
    pub rows_examined: u64,
    pub total_updated: u64,
    pub total_examined: u64,
    pub last_key: Vec<String>,
    /// Lock retries this batch needed.
    pub retries: u32,
    pub duration: Duration,
    /// This was the last batch.
    pub finished: bool,
}

/// The state of a backfill after a run (or before one, from [`Backfill::summary`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub name: String,
    pub table: String,
    pub key_columns: Vec<String>,
    /// Over the whole backfill, earlier runs included.
    pub rows_updated: u64,
    pub rows_examined: u64,
    pub batches: u64,
    pub done: bool,
    /// The last committed key (text form of each key column); the next batch starts after it.
    pub last_key: Option<Vec<String>>,
    pub rows_updated_this_run: u64,
    pub batches_this_run: u64,
    pub estimated_rows: Option<u64>,
}

/// `<table>_<first 8 hex digits of sha256(qualified table, set, where)>`: the same
/// command always names the same backfill, so rerunning it resumes.
pub fn default_name(table: &TableInfo, set: &str, filter: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(table.qualified.as_bytes());
    h.update([0]);
    h.update(set.trim().as_bytes());
    h.update([0]);
    if let Some(f) = filter {
        h.update(f.trim().as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}_{hex}", table.relname)
}

/// `lock_timeout`/`statement_timeout` values for `set_config`: whole milliseconds, at
/// least one (zero would mean "no timeout").
pub(crate) fn pg_millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The settings of a batch's transaction: its timeouts (`$1`, `$2`), and the output
/// formats that decide the text form of key values. The saved position is the last key
/// as text, written by one session and cast back by another (a resume, maybe with
/// another role's or machine's defaults): with `DateStyle = 'SQL, DMY'` a date key is
/// written `02/01/2024`, which an `MDY` session reads as February 1st, and the resumed
/// run would skip (or repeat) every row in between; before PostgreSQL 12,
/// `extra_float_digits = 0` rounds float keys. So keys are always written in ISO form,
/// which every `DateStyle` order reads alike. Only the output style is set: the order
/// (`DMY`/`MDY`) the user's `--set`/`--where` literals are read with stays the session's.
const BATCH_SETTINGS_SQL: &str = "SELECT set_config('lock_timeout', $1, true), \
     set_config('statement_timeout', $2, true), set_config('DateStyle', 'ISO', true), \
     set_config('IntervalStyle', 'postgres', true), set_config('extra_float_digits', '3', true)";

/// A session for backfills: named [`APPLICATION_NAME`], and cancelled by the server
/// within a second if this process dies mid-batch (PostgreSQL ≥ 14), so the batch rolls
/// back instead of finishing work nobody records.
pub async fn connect(url: &DatabaseUrl) -> Result<PgConnection, BackfillError> {
    let err = |reason: String| BackfillError::Connect {
        url: url.redacted().to_string(),
        reason: belay_core::redact_url(&reason),
    };
    let opts = PgConnectOptions::from_str(url.expose())
        .map_err(|e| err(e.to_string()))?
        .application_name(APPLICATION_NAME);
    let mut conn = PgConnection::connect_with(&opts)
        .await
        .map_err(|e| err(e.to_string()))?;
    belay_core::send_without_delay();
    let _ = sqlx::raw_sql("SET client_connection_check_interval = '1s'")
        .execute(&mut conn)
        .await;
    Ok(conn)
}

/// A backfill resolved against its database, holding its run lock, ready to [`run`].
///
/// [`run`]: Backfill::run
#[derive(Debug)]
pub struct Backfill {
    name: String,
    table: TableInfo,
    batch_size: u32,
    sleep: Duration,
    limits: Limits,
    store: Store,
    sql: BatchSql,
    start: Start,
    committed: Counters,
    estimated_rows: Option<u64>,
    rows_this_run: u64,
    batches_this_run: u64,
    /// The `target` label of its metrics.
    target: String,
}

/// The `target` label of a backfill's metrics unless [`Backfill::for_target`] names one:
/// the CLI's local mode, which has no target name (as its migrations).
pub const LOCAL_TARGET: &str = "local";

enum Step {
    Batch {
        key: Vec<String>,
        updated: u64,
        examined: u64,
        counters: Counters,
    },
    /// Nothing left after the saved key (or someone else finished it).
    Finished(Counters),
    Lost,
}

impl Backfill {
    /// Checks everything before the first batch, in this order, so that a mistake changes
    /// nothing in the database: the spec, the table and its primary key, the `SET` and
    /// `WHERE` texts (PostgreSQL plans them with `EXPLAIN`). Then takes the backfill's run
    /// lock (a session advisory lock: one run per backfill name, held until the session
    /// ends; released again if preparing fails), creates the progress table if needed,
    /// and reads or creates the backfill's row.
    pub async fn prepare(
        conn: &mut PgConnection,
        spec: BackfillSpec,
    ) -> Result<Backfill, BackfillError> {
        let span = tracing::info_span!("backfill_prepare", table = %spec.table);
        Self::prepare_inner(conn, spec).instrument(span).await
    }

    async fn prepare_inner(
        conn: &mut PgConnection,
        spec: BackfillSpec,
    ) -> Result<Backfill, BackfillError> {
        let set = spec.set.trim().to_string();
        let filter = spec.filter.as_deref().map(str::trim).map(String::from);
        check_spec(&spec, &set, filter.as_deref())?;
        let table = table::resolve(conn, spec.table.trim()).await?;
        validate(conn, &table, &set, filter.as_deref(), &spec.limits).await?;
        let name = match &spec.name {
            Some(n) => n.trim().to_string(),
            None => default_name(&table, &set, filter.as_deref()),
        };
        take_run_lock(conn, &name).await?;
        let lock_name = name.clone();
        let opened: Result<Backfill, BackfillError> = async {
            let store = Store::new(&spec.progress_schema);
            store.ensure(conn).await?;
            let keys = table.key_names();
            let saved = store.load(conn, &name).await?;
            let (start, committed) = match saved {
                Some(s) if !spec.restart => {
                    if s.table_name != table.qualified
                        || s.set_clause != set
                        || s.where_clause != filter
                    {
                        return Err(BackfillError::NameInUse {
                            name,
                            existing: describe(
                                &s.table_name,
                                &s.set_clause,
                                s.where_clause.as_deref(),
                            ),
                        });
                    }
                    if s.key_columns != keys {
                        return Err(BackfillError::KeyChanged {
                            name,
                            table: table.display,
                            was: s.key_columns.join(", "),
                            now: keys.join(", "),
                        });
                    }
                    let counters = Counters {
                        last_key: s.last_key.clone(),
                        rows_updated: s.rows_updated,
                        rows_examined: s.rows_examined,
                        batches: s.batches,
                        finished: s.finished_at.is_some(),
                    };
                    let start = match s.finished_at {
                        Some(finished_at) => Start::AlreadyDone {
                            rows_updated: s.rows_updated,
                            batches: s.batches,
                            finished_at,
                        },
                        None => Start::Resuming {
                            last_key: s.last_key,
                            rows_updated: s.rows_updated,
                            batches: s.batches,
                        },
                    };
                    (start, counters)
                }
                existing => {
                    let counters = store
                        .start(
                            conn,
                            &name,
                            &table.qualified,
                            &set,
                            filter.as_deref(),
                            &keys,
                        )
                        .await?;
                    let start = if existing.is_some() {
                        Start::Restarted
                    } else {
                        Start::Fresh
                    };
                    (start, counters)
                }
            };
            let estimated_rows = if committed.finished {
                None
            } else {
                // A count of a large, never-analyzed table must not delay the first batch long.
                let budget = spec.limits.statement_timeout.min(Duration::from_secs(5));
                table::estimate_rows(conn, &table, budget).await
            };
            tracing::info!(backfill = %name, table = %table.display, ?start, "backfill prepared");
            Ok(Backfill {
                sql: table.batch_sql(&set, filter.as_deref()),
                name,
                table,
                batch_size: spec.batch_size,
                sleep: spec.sleep,
                limits: spec.limits,
                store,
                start,
                committed,
                estimated_rows,
                rows_this_run: 0,
                batches_this_run: 0,
                target: LOCAL_TARGET.to_string(),
            })
        }
        .await;
        if opened.is_err() {
            // The caller may keep using the session: do not leave it holding the run lock
            // of a backfill that never started.
            let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(&lock_name)
                .execute(&mut *conn)
                .await;
        }
        opened
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Labels its metrics with `target` (the agent's target name), so two databases'
    /// backfills of the same name stay apart.
    pub fn for_target(mut self, target: impl Into<String>) -> Self {
        self.target = target.into();
        self
    }

    /// What a caller shows before the first batch.
    pub fn started(&self, progress_schema: &str) -> Started {
        Started {
            name: self.name.clone(),
            table: self.table.display.clone(),
            key_columns: self.table.key_names(),
            estimated_rows: self.estimated_rows,
            progress_schema: progress_schema.to_string(),
            start: self.start.clone(),
            rows_examined: self.committed.rows_examined,
        }
    }

    pub fn table(&self) -> &TableInfo {
        &self.table
    }

    pub fn start(&self) -> &Start {
        &self.start
    }

    /// The table's row count as estimated before the run (planner statistics or a count).
    pub fn estimated_rows(&self) -> Option<u64> {
        self.estimated_rows
    }

    /// The committed state, as of the last batch this process saw commit.
    pub fn summary(&self) -> Summary {
        Summary {
            name: self.name.clone(),
            table: self.table.display.clone(),
            key_columns: self.table.key_names(),
            rows_updated: self.committed.rows_updated,
            rows_examined: self.committed.rows_examined,
            batches: self.committed.batches,
            done: self.committed.finished,
            last_key: self.committed.last_key.clone(),
            rows_updated_this_run: self.rows_this_run,
            batches_this_run: self.batches_this_run,
            estimated_rows: self.estimated_rows,
        }
    }

    /// Runs batches until the table is done or `stop` is cancelled.
    ///
    /// `stop` is honoured between batches and during pauses (the `sleep`, lock backoff),
    /// never inside a batch: the batch in flight commits or rolls back as a whole. A
    /// caller that cannot wait for it drops this future and the connection; the server
    /// then rolls the open transaction back. The returned summary says whether the
    /// backfill is `done`; a stopped run is not an error.
    pub async fn run(
        &mut self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Summary, BackfillError> {
        let span =
            tracing::info_span!("backfill", backfill = %self.name, table = %self.table.display);
        self.run_inner(conn, stop, progress).instrument(span).await
    }

    async fn run_inner(
        &mut self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Summary, BackfillError> {
        // Its series exist from its start (at zero), so a rate or an alert over them never
        // meets a missing series: the labels are known now.
        metrics::counter!(names::BACKFILL_LOCK_RETRIES_TOTAL, "target" => self.target.clone(), "backfill" => self.name.clone())
            .increment(0);
        self.record_metrics(0);
        while !self.committed.finished && !stop.is_cancelled() {
            let batch = self.committed.batches + 1;
            let started = Instant::now();
            let Some((step, retries)) =
                self.batch_with_retries(conn, batch, stop, progress).await?
            else {
                break;
            };
            match step {
                Step::Lost => {
                    return Err(BackfillError::ProgressLost {
                        name: self.name.clone(),
                    });
                }
                Step::Finished(c) => {
                    self.committed = c;
                    self.record_metrics(0);
                }
                Step::Batch {
                    key,
                    updated,
                    examined,
                    counters,
                } => {
                    self.committed = counters;
                    self.rows_this_run += updated;
                    self.batches_this_run += 1;
                    self.record_metrics(updated);
                    tracing::debug!(batch, updated, examined, "batch committed");
                    progress(&Progress::Batch(BatchReport {
                        batch: self.committed.batches,
                        rows_updated: updated,
                        rows_examined: examined,
                        total_updated: self.committed.rows_updated,
                        total_examined: self.committed.rows_examined,
                        last_key: key,
                        retries,
                        duration: started.elapsed(),
                        finished: self.committed.finished,
                    }));
                    if !self.committed.finished && !self.sleep.is_zero() {
                        tokio::select! {
                            () = tokio::time::sleep(self.sleep) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                }
            }
        }
        Ok(self.summary())
    }

    fn record_metrics(&self, updated: u64) {
        let (target, name) = (self.target.clone(), self.name.clone());
        metrics::counter!(names::BACKFILL_ROWS_TOTAL, "target" => target.clone(), "backfill" => name.clone())
            .increment(updated);
        let ratio = if self.committed.finished {
            1.0
        } else {
            match self.estimated_rows {
                Some(total) if total > 0 => {
                    (self.committed.rows_examined as f64 / total as f64).min(0.99)
                }
                _ => 0.0,
            }
        };
        metrics::gauge!(names::BACKFILL_PROGRESS_RATIO, "target" => target, "backfill" => name)
            .set(ratio);
    }

    /// One batch, retried while it cannot get its locks. `None`: stopped during a backoff
    /// (nothing in flight).
    async fn batch_with_retries(
        &mut self,
        conn: &mut PgConnection,
        batch: u64,
        stop: &CancellationToken,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Option<(Step, u32)>, BackfillError> {
        let began = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let attempt_started = Instant::now();
            let err = match self.try_batch(conn).await {
                Ok(step) => return Ok(Some((step, attempt - 1))),
                Err(e) => e,
            };
            let state = error::sqlstate(&err);
            match state.as_deref() {
                // lock_not_available, deadlock_detected, serialization_failure (under a
                // REPEATABLE READ or SERIALIZABLE default, a row the application changed
                // meanwhile): the batch rolled back whole; waiting lets the application's
                // transactions through first.
                Some(code @ ("55P03" | "40P01" | "40001")) => {
                    let backoff = self.limits.backoff(attempt);
                    if attempt >= self.limits.max_attempts
                        || began.elapsed() + backoff > self.limits.max_lock_wait
                    {
                        return Err(BackfillError::LockRetriesExhausted {
                            batch,
                            attempts: attempt,
                            waited_ms: began.elapsed().as_millis() as u64,
                        });
                    }
                    metrics::counter!(names::BACKFILL_LOCK_RETRIES_TOTAL, "target" => self.target.clone(), "backfill" => self.name.clone())
                        .increment(1);
                    tracing::info!(batch, attempt, code, ?backoff, "batch lock retry");
                    progress(&Progress::LockRetry {
                        batch,
                        attempt,
                        backoff,
                        sqlstate: code.to_string(),
                    });
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return Ok(None),
                    }
                }
                // query_canceled is also someone's pg_cancel_backend (an operator, a
                // guard): only a batch that ran as long as the timeout met it.
                Some("57014") if attempt_started.elapsed() >= self.limits.statement_timeout => {
                    return Err(BackfillError::StatementTimeout {
                        batch,
                        timeout: self.limits.statement_timeout,
                    });
                }
                _ if error::is_connection(&err) => {
                    return Err(BackfillError::Query {
                        what: "running a batch",
                        source: err,
                    });
                }
                _ => {
                    let message = match &err {
                        sqlx::Error::Database(d) => d.message().to_string(),
                        other => other.to_string(),
                    };
                    return Err(BackfillError::Batch {
                        batch,
                        after: self
                            .committed
                            .last_key
                            .as_ref()
                            .map_or_else(|| "the start".into(), |k| format!("({})", k.join(", "))),
                        message,
                        sqlstate: state,
                    });
                }
            }
        }
    }

    /// One transaction: lock the progress row (the committed position is read there, not
    /// taken from memory), find the next `batch_size` keys, update the matching rows among
    /// them, record the new position, commit. Any error rolls all of it back.
    async fn try_batch(&self, conn: &mut PgConnection) -> Result<Step, sqlx::Error> {
        let mut tx = conn.begin().await?;
        sqlx::query(BATCH_SETTINGS_SQL)
            .bind(pg_millis(self.limits.lock_timeout))
            .bind(pg_millis(self.limits.statement_timeout))
            .execute(&mut *tx)
            .await?;
        let Some(at) = self.store.lock(&mut tx, &self.name).await? else {
            return Ok(Step::Lost);
        };
        if at.finished {
            tx.commit().await?;
            return Ok(Step::Finished(at));
        }
        let limit = i64::from(self.batch_size);
        let next: Option<(Vec<String>, i64)> = match &at.last_key {
            None => {
                sqlx::query_as(sqlx::AssertSqlSafe(self.sql.next_keys_first.clone()))
                    .bind(limit)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            Some(lo) => {
                sqlx::query_as(sqlx::AssertSqlSafe(self.sql.next_keys_after.clone()))
                    .bind(lo)
                    .bind(limit)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let Some((hi, examined)) = next else {
            let c = self.store.finish(&mut tx, &self.name).await?;
            tx.commit().await?;
            return Ok(Step::Finished(c));
        };
        let updated = match &at.last_key {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.update_first.clone()))
                    .bind(&hi)
                    .execute(&mut *tx)
                    .await?
            }
            Some(lo) => {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.update_after.clone()))
                    .bind(lo)
                    .bind(&hi)
                    .execute(&mut *tx)
                    .await?
            }
        }
        .rows_affected();
        let examined = u64::try_from(examined).unwrap_or(0);
        // A short batch is the last: nothing follows its key (rows inserted after it
        // later are new rows, which the application writes with the new value).
        let finished = examined < u64::from(self.batch_size);
        let counters = self
            .store
            .advance(&mut tx, &self.name, &hi, updated, examined, finished)
            .await?;
        tx.commit().await?;
        Ok(Step::Batch {
            key: hi,
            updated,
            examined,
            counters,
        })
    }
}

fn describe(table: &str, set: &str, filter: Option<&str>) -> String {
    match filter {
        Some(f) => format!("table {table}, SET {set}, WHERE {f}"),
        None => format!("table {table}, SET {set}"),
    }
}

fn check_spec(spec: &BackfillSpec, set: &str, filter: Option<&str>) -> Result<(), BackfillError> {
    let bad = |m: &str| Err(BackfillError::InvalidSpec(m.to_string()));
    if spec.batch_size == 0 {
        return bad("--batch must be at least 1");
    }
    if spec.table.trim().is_empty() {
        return bad("--table is empty");
    }
    if set.is_empty() {
        return bad("--set is empty: give the assignments, e.g. --set \"total = price * qty\"");
    }
    if filter == Some("") {
        return bad("--where is empty: leave it out to update every row");
    }
    if let Some(n) = &spec.name {
        let n = n.trim();
        if n.is_empty() || n.chars().count() > 200 || n.chars().any(char::is_control) {
            return bad("--name must be 1 to 200 printable characters");
        }
    }
    if spec.limits.lock_timeout.is_zero() || spec.limits.statement_timeout.is_zero() {
        return bad(
            "--lock-timeout and --statement-timeout must be greater than zero: a batch must never wait or run unbounded",
        );
    }
    if spec.limits.max_attempts == 0 {
        return bad("--max-attempts must be at least 1");
    }
    Ok(())
}

/// Lets PostgreSQL parse and plan the user's fragments inside the statement they will run
/// in, without executing it: first the assignments alone (`WHERE false`), then with the
/// filter, so an error is attributed to the option that caused it.
async fn validate(
    conn: &mut PgConnection,
    table: &TableInfo,
    set: &str,
    filter: Option<&str>,
    limits: &Limits,
) -> Result<(), BackfillError> {
    const EXPLAIN: &str = "EXPLAIN ";
    let set_stmt = table::update_statement(&table.qualified, set, "false");
    let set_at = EXPLAIN.len() + format!("UPDATE {} SET ", table.qualified).chars().count();
    explain(conn, &set_stmt, Clause::Set, set_at, set, table, limits).await?;
    if let Some(f) = filter {
        let stmt = table::update_statement(&table.qualified, set, &format!("({f}\n)"));
        let at = EXPLAIN.len()
            + format!("UPDATE {} SET {set}\nWHERE (", table.qualified)
                .chars()
                .count();
        explain(conn, &stmt, Clause::Where, at, f, table, limits).await?;
    }
    Ok(())
}

async fn explain(
    conn: &mut PgConnection,
    statement: &str,
    clause: Clause,
    fragment_at: usize,
    fragment: &str,
    table: &TableInfo,
    limits: &Limits,
) -> Result<(), BackfillError> {
    let began = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // EXPLAIN takes the UPDATE's ROW EXCLUSIVE lock: bounded like a batch.
        let result = async {
            let mut tx = conn.begin().await?;
            sqlx::query(
                "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
            )
            .bind(pg_millis(limits.lock_timeout))
            .bind(pg_millis(limits.statement_timeout))
            .execute(&mut *tx)
            .await?;
            // Prepared (extended protocol), so `; DROP …` in a fragment is refused as
            // multiple commands rather than run.
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN {statement}")))
                .persistent(false)
                .execute(&mut *tx)
                .await?;
            tx.rollback().await
        }
        .await;
        let Err(e) = result else { return Ok(()) };
        match error::sqlstate(&e).as_deref() {
            Some("55P03") if attempt < limits.max_attempts => {
                let backoff = limits.backoff(attempt);
                if began.elapsed() + backoff > limits.max_lock_wait {
                    return Err(BackfillError::LockRetriesExhausted {
                        batch: 0,
                        attempts: attempt,
                        waited_ms: began.elapsed().as_millis() as u64,
                    });
                }
                tokio::time::sleep(backoff).await;
            }
            Some("55P03") => {
                return Err(BackfillError::LockRetriesExhausted {
                    batch: 0,
                    attempts: attempt,
                    waited_ms: began.elapsed().as_millis() as u64,
                });
            }
            Some("42501") => {
                return Err(BackfillError::Privilege {
                    table: table.display.clone(),
                    message: match &e {
                        sqlx::Error::Database(d) => d.message().to_string(),
                        other => other.to_string(),
                    },
                });
            }
            Some(_) => {
                let (message, position) = match &e {
                    sqlx::Error::Database(d) => {
                        let pos = d
                            .try_downcast_ref::<PgDatabaseError>()
                            .and_then(PgDatabaseError::position)
                            .and_then(|p| match p {
                                PgErrorPosition::Original(p) => Some(p),
                                _ => None,
                            })
                            .and_then(|p| {
                                let inside = p.checked_sub(fragment_at)?;
                                (inside >= 1 && inside <= fragment.chars().count())
                                    .then_some(inside)
                            });
                        (d.message().to_string(), pos)
                    }
                    other => (other.to_string(), None),
                };
                return Err(BackfillError::InvalidExpression {
                    clause,
                    table: table.display.clone(),
                    message,
                    position,
                });
            }
            None => {
                return Err(BackfillError::Query {
                    what: "checking --set and --where",
                    source: e,
                });
            }
        }
    }
}

/// One run per backfill name: a session advisory lock, released when the connection
/// closes however the process ends.
async fn take_run_lock(conn: &mut PgConnection, name: &str) -> Result<(), BackfillError> {
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .map_err(BackfillError::query("taking the backfill's run lock"))?;
    if got {
        return Ok(());
    }
    let holder: Option<(i32, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT a.pid, coalesce(a.application_name, ''), a.backend_start \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = $1::int4::oid AND l.objid = hashtext($2)::oid",
    )
    .bind(LOCK_CLASS)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(BackfillError::query("finding the backfill's runner"))?;
    Err(BackfillError::Busy {
        name: name.to_string(),
        holder: holder.map_or_else(
            || "by a session belay cannot see".to_string(),
            |(pid, app, since)| {
                format!(
                    "pid {pid}{}, since {}",
                    if app.is_empty() {
                        String::new()
                    } else {
                        format!(" ({app})")
                    },
                    since.format("%Y-%m-%d %H:%M:%S UTC")
                )
            },
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> TableInfo {
        TableInfo {
            oid: 1,
            display: "public.orders".into(),
            qualified: "public.orders".into(),
            relname: "orders".into(),
            key: vec![KeyColumn {
                name: "id".into(),
                quoted: "id".into(),
                type_sql: "bigint".into(),
            }],
        }
    }

    #[test]
    fn default_names_are_stable_and_tell_different_work_apart() {
        let t = orders();
        let a = default_name(&t, "total = price * qty", None);
        // Pinned: a different hash would orphan every interrupted backfill's progress.
        assert_eq!(a, "orders_ac3db47b");
        // Surrounding whitespace is not a different backfill; the batch size is not part
        // of the identity either (it is not an input here), so a resume may change it.
        assert_eq!(a, default_name(&t, "  total = price * qty ", None));
        assert_ne!(a, default_name(&t, "total = price * qty", Some("id > 5")));
        assert_ne!(a, default_name(&t, "total = price", None));
        let mut other = orders();
        other.qualified = "archive.orders".into();
        assert_ne!(a, default_name(&other, "total = price * qty", None));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let l = Limits::default();
        for attempt in 1..12 {
            let b = l.backoff(attempt);
            let full = l
                .backoff_initial
                .saturating_mul(1 << (attempt - 1))
                .min(l.backoff_max);
            assert!(b >= full / 2 && b <= full, "attempt {attempt}: {b:?}");
        }
    }

    #[test]
    fn timeouts_are_never_zero_for_postgres() {
        assert_eq!(pg_millis(Duration::from_micros(10)), "1ms");
        assert_eq!(pg_millis(Duration::from_millis(250)), "250ms");
    }
}
