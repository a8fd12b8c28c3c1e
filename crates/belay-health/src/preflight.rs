//! Preflight: is it safe to migrate now? Each check measures one thing, grades it against
//! a configurable threshold and says what to do about it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use belay_core::{DatabaseUrl, format_duration, redact_url};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::check::{CheckResult, CheckStatus, Severity};
use crate::units::{self, format_bytes};
use crate::{HealthError, disk};

/// Every preflight check name, in report order (the names `--override-check` takes).
pub const PREFLIGHT_CHECKS: [&str; 12] = [
    "connectivity",
    "database_size",
    "disk_space",
    "connections",
    "long_running_queries",
    "idle_in_transaction",
    "lock_waits",
    "replication_lag",
    "pending_migrations",
    "failed_migrations",
    "checksum_drift",
    "table_locks",
];

/// Thresholds of every preflight check: `[preflight]` in `belay.toml`. Durations are
/// written `"5min"`, `"1s"`, `"200ms"`; sizes `"1GiB"`, `"16MB"` or a number of bytes.
/// A value strictly above a `*_warn` threshold warns, strictly above `*_block` blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Servers older than this major version block.
    pub min_server_version: u32,
    /// A round trip slower than this warns (a congested network makes lock waits longer).
    #[serde(with = "units::duration")]
    pub connect_latency_warn: Duration,
    /// Database size thresholds (a bigger database means a longer backup); unset: never.
    #[serde(with = "units::opt_bytes")]
    pub database_size_warn: Option<u64>,
    #[serde(with = "units::opt_bytes")]
    pub database_size_block: Option<u64>,
    /// Free space that must remain where backups go after the expected backup is written:
    /// less than `disk_free_block_floor` blocks, less than `disk_free_warn_floor` warns.
    #[serde(with = "units::bytes")]
    pub disk_free_warn_floor: u64,
    #[serde(with = "units::bytes")]
    pub disk_free_block_floor: u64,
    /// Client connections as a percentage of `max_connections`.
    pub connections_warn_percent: f64,
    pub connections_block_percent: f64,
    /// Age of the oldest active query in the target database.
    #[serde(with = "units::duration")]
    pub long_query_warn: Duration,
    #[serde(with = "units::duration")]
    pub long_query_block: Duration,
    /// Age of the oldest transaction sitting idle in the target database.
    #[serde(with = "units::duration")]
    pub idle_in_transaction_warn: Duration,
    #[serde(with = "units::duration")]
    pub idle_in_transaction_block: Duration,
    /// Longest wait of a session for a lock it has not been granted.
    #[serde(with = "units::duration")]
    pub lock_wait_warn: Duration,
    #[serde(with = "units::duration")]
    pub lock_wait_block: Duration,
    /// Age of the oldest transaction holding a lock on a table the pending migrations will
    /// lock (a transaction that read or wrote a table holds its lock until it ends).
    #[serde(with = "units::duration")]
    pub table_lock_warn: Duration,
    #[serde(with = "units::duration")]
    pub table_lock_block: Duration,
    /// Bytes of WAL the slowest replica has not replayed.
    #[serde(with = "units::bytes")]
    pub replication_lag_warn: u64,
    #[serde(with = "units::bytes")]
    pub replication_lag_block: u64,
    /// More pending migrations than this warns; unset: never.
    pub pending_migrations_warn: Option<usize>,
    pub failed_migrations: Severity,
    pub checksum_drift: Severity,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_server_version: 13,
            connect_latency_warn: Duration::from_millis(250),
            database_size_warn: None,
            database_size_block: None,
            disk_free_warn_floor: 1 << 30,
            disk_free_block_floor: 0,
            connections_warn_percent: 80.0,
            connections_block_percent: 95.0,
            long_query_warn: Duration::from_secs(60),
            // The seed runbook: no query running longer than five minutes.
            long_query_block: Duration::from_secs(300),
            idle_in_transaction_warn: Duration::from_secs(30),
            idle_in_transaction_block: Duration::from_secs(300),
            // Any waiting session warns; one waiting more than a second blocks.
            lock_wait_warn: Duration::ZERO,
            lock_wait_block: Duration::from_secs(1),
            // Any holder warns: the migration will queue behind it (the lock guard keeps
            // the application moving meanwhile). A transaction already open for 30 s is
            // unlikely to end within the migration's lock budget: fix it first.
            table_lock_warn: Duration::ZERO,
            table_lock_block: Duration::from_secs(30),
            replication_lag_warn: 16 << 20,
            replication_lag_block: 1 << 30,
            pending_migrations_warn: None,
            failed_migrations: Severity::Block,
            checksum_drift: Severity::Block,
        }
    }
}

impl Thresholds {
    /// Every threshold's key, as `[preflight]` spells it.
    pub const KEYS: [&'static str; 21] = [
        "min_server_version",
        "connect_latency_warn",
        "database_size_warn",
        "database_size_block",
        "disk_free_warn_floor",
        "disk_free_block_floor",
        "connections_warn_percent",
        "connections_block_percent",
        "long_query_warn",
        "long_query_block",
        "idle_in_transaction_warn",
        "idle_in_transaction_block",
        "lock_wait_warn",
        "lock_wait_block",
        "table_lock_warn",
        "table_lock_block",
        "replication_lag_warn",
        "replication_lag_block",
        "pending_migrations_warn",
        "failed_migrations",
        "checksum_drift",
    ];

    /// `self` with each threshold named in `keys` made the stricter of `self`'s and
    /// `other`'s: lower limits (durations, sizes, percentages, lag), higher floors and
    /// minimum server version, `block` over `warn`, a limit over none. This is how a
    /// deployer's `[preflight]` meets a target's own: it may tighten what the target's
    /// owner set, never loosen it. Thresholds not named keep `self`'s value. `Err` names
    /// a key that is not a threshold.
    pub fn tightened(&self, other: &Thresholds, keys: &[String]) -> Result<Thresholds, String> {
        fn lower_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        fn severity(a: Severity, b: Severity) -> Severity {
            if a == Severity::Block || b == Severity::Block {
                Severity::Block
            } else {
                Severity::Warn
            }
        }
        let mut t = self.clone();
        for key in keys {
            match key.as_str() {
                "min_server_version" => {
                    t.min_server_version = t.min_server_version.max(other.min_server_version);
                }
                "connect_latency_warn" => {
                    t.connect_latency_warn = t.connect_latency_warn.min(other.connect_latency_warn);
                }
                "database_size_warn" => {
                    t.database_size_warn =
                        lower_opt(t.database_size_warn, other.database_size_warn);
                }
                "database_size_block" => {
                    t.database_size_block =
                        lower_opt(t.database_size_block, other.database_size_block);
                }
                "disk_free_warn_floor" => {
                    t.disk_free_warn_floor = t.disk_free_warn_floor.max(other.disk_free_warn_floor);
                }
                "disk_free_block_floor" => {
                    t.disk_free_block_floor =
                        t.disk_free_block_floor.max(other.disk_free_block_floor);
                }
                "connections_warn_percent" => {
                    t.connections_warn_percent = t
                        .connections_warn_percent
                        .min(other.connections_warn_percent);
                }
                "connections_block_percent" => {
                    t.connections_block_percent = t
                        .connections_block_percent
                        .min(other.connections_block_percent);
                }
                "long_query_warn" => {
                    t.long_query_warn = t.long_query_warn.min(other.long_query_warn)
                }
                "long_query_block" => {
                    t.long_query_block = t.long_query_block.min(other.long_query_block);
                }
                "idle_in_transaction_warn" => {
                    t.idle_in_transaction_warn = t
                        .idle_in_transaction_warn
                        .min(other.idle_in_transaction_warn);
                }
                "idle_in_transaction_block" => {
                    t.idle_in_transaction_block = t
                        .idle_in_transaction_block
                        .min(other.idle_in_transaction_block);
                }
                "lock_wait_warn" => t.lock_wait_warn = t.lock_wait_warn.min(other.lock_wait_warn),
                "lock_wait_block" => {
                    t.lock_wait_block = t.lock_wait_block.min(other.lock_wait_block)
                }
                "table_lock_warn" => {
                    t.table_lock_warn = t.table_lock_warn.min(other.table_lock_warn);
                }
                "table_lock_block" => {
                    t.table_lock_block = t.table_lock_block.min(other.table_lock_block);
                }
                "replication_lag_warn" => {
                    t.replication_lag_warn = t.replication_lag_warn.min(other.replication_lag_warn);
                }
                "replication_lag_block" => {
                    t.replication_lag_block =
                        t.replication_lag_block.min(other.replication_lag_block);
                }
                "pending_migrations_warn" => {
                    t.pending_migrations_warn =
                        lower_opt(t.pending_migrations_warn, other.pending_migrations_warn);
                }
                "failed_migrations" => {
                    t.failed_migrations = severity(t.failed_migrations, other.failed_migrations);
                }
                "checksum_drift" => {
                    t.checksum_drift = severity(t.checksum_drift, other.checksum_drift)
                }
                other => {
                    return Err(format!(
                        "{other:?} is not a preflight threshold (expected one of: {})",
                        Self::KEYS.join(", ")
                    ));
                }
            }
        }
        Ok(t)
    }
}

/// What the caller knows that this crate does not measure itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightContext {
    /// Where backups are written; `None` skips the disk check (reported as not checked).
    pub backup_dir: Option<PathBuf>,
    /// Expected backup size; defaults to the database size.
    pub expected_backup_bytes: Option<u64>,
    /// The migration status (from `belay-migrate`); `None` leaves out the three migration
    /// checks.
    pub migration_summary: Option<MigrationSummary>,
}

/// Migration status as the executor sees it: versions pending, failed, and drifted
/// (applied file changed since).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub pending: usize,
    pub failed: Vec<String>,
    pub drift: Vec<String>,
    /// The tables (and indexes) the pending migrations' statements lock, as the linter's
    /// lock analysis names them.
    #[serde(default)]
    pub lock_tables: Vec<String>,
}

/// Connects to `url` and runs [`preflight`]. A failed connection is not an error but a
/// blocking `connectivity` result (the report is what the operator needs).
pub async fn preflight_url(
    url: &DatabaseUrl,
    ctx: &PreflightContext,
    thresholds: &Thresholds,
) -> Result<Vec<CheckResult>, HealthError> {
    let opts = url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| HealthError::invalid("database URL", redact_url(&e.to_string())))?
        .application_name("belay-preflight");
    let connect = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&opts));
    let mut conn = match connect.await {
        Ok(Ok(conn)) => {
            belay_core::send_without_delay();
            conn
        }
        Ok(Err(e)) => return Ok(vec![unreachable(url, &redact_url(&e.to_string()))]),
        Err(_) => return Ok(vec![unreachable(url, "timed out after 10s")]),
    };
    let results = preflight(&mut conn, ctx, thresholds).await;
    // Best effort: the server notices a dropped socket anyway.
    let _ = conn.close().await;
    results
}

fn unreachable(url: &DatabaseUrl, err: &str) -> CheckResult {
    CheckResult::new(
        "connectivity",
        CheckStatus::Block,
        format!("could not connect to {url}: {err}"),
        "a connection",
        "check the URL, network, pg_hba.conf and that the server is up",
    )
}

/// Runs every preflight check on `conn`. Checks that cannot be measured (an error from
/// their query) block, naming the error: not knowing is not safe.
pub async fn preflight(
    conn: &mut PgConnection,
    ctx: &PreflightContext,
    t: &Thresholds,
) -> Result<Vec<CheckResult>, HealthError> {
    let mut out = Vec::with_capacity(PREFLIGHT_CHECKS.len());
    let version_num = match connectivity(conn, t).await {
        Ok((result, version_num)) => {
            out.push(result);
            version_num
        }
        Err(e) => {
            out.push(CheckResult::new(
                "connectivity",
                CheckStatus::Block,
                format!("query failed: {e}"),
                "SELECT succeeds",
                "check the connection and the server log",
            ));
            return Ok(out);
        }
    };
    let db_size = match database_size(conn).await {
        Ok(size) => {
            out.push(grade_database_size(size, t));
            Some(size)
        }
        Err(e) => {
            out.push(unmeasured("database_size", "-", &e));
            None
        }
    };
    out.push(disk_check(ctx, db_size, t));
    out.push(or_unmeasured(
        "connections",
        connections(conn, t).await,
        &format!(
            "warn > {}%, block > {}%",
            t.connections_warn_percent, t.connections_block_percent
        ),
    ));
    out.push(or_unmeasured(
        "long_running_queries",
        long_queries(conn, t).await,
        &dur_threshold(t.long_query_warn, t.long_query_block),
    ));
    out.push(or_unmeasured(
        "idle_in_transaction",
        idle_in_transaction(conn, t).await,
        &dur_threshold(t.idle_in_transaction_warn, t.idle_in_transaction_block),
    ));
    out.push(or_unmeasured(
        "lock_waits",
        lock_waits(conn, t, version_num).await,
        &dur_threshold(t.lock_wait_warn, t.lock_wait_block),
    ));
    out.push(or_unmeasured(
        "replication_lag",
        replication_lag(conn, t).await,
        &bytes_threshold(t.replication_lag_warn, t.replication_lag_block),
    ));
    if let Some(summary) = &ctx.migration_summary {
        out.extend(migration_checks(summary, t));
        out.push(or_unmeasured(
            "table_locks",
            table_locks(conn, &summary.lock_tables, t).await,
            &dur_threshold(t.table_lock_warn, t.table_lock_block),
        ));
    }
    Ok(out)
}

/// Pass / warn / block for a value strictly above its thresholds.
fn grade<T: PartialOrd>(value: T, warn: T, block: T) -> CheckStatus {
    if value > block {
        CheckStatus::Block
    } else if value > warn {
        CheckStatus::Warn
    } else {
        CheckStatus::Pass
    }
}

fn dur_threshold(warn: Duration, block: Duration) -> String {
    format!(
        "warn > {}, block > {}",
        format_duration(warn),
        format_duration(block)
    )
}

fn bytes_threshold(warn: u64, block: u64) -> String {
    format!(
        "warn > {}, block > {}",
        format_bytes(warn),
        format_bytes(block)
    )
}

/// `1.3s`, `4m12s`, `250ms`.
pub(crate) fn human_secs(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "0s".into();
    }
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round());
    }
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let whole = secs as u64;
    if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

fn unmeasured(name: &str, threshold: &str, e: &sqlx::Error) -> CheckResult {
    CheckResult::new(
        name,
        CheckStatus::Block,
        format!("could not measure: {e}"),
        threshold,
        format!(
            "fix the error (the role may need pg_monitor), or proceed with --override-check {name} --reason …"
        ),
    )
}

fn or_unmeasured(
    name: &str,
    measured: Result<CheckResult, sqlx::Error>,
    threshold: &str,
) -> CheckResult {
    measured.unwrap_or_else(|e| unmeasured(name, threshold, &e))
}

async fn connectivity(
    conn: &mut PgConnection,
    t: &Thresholds,
) -> Result<(CheckResult, i32), sqlx::Error> {
    let started = Instant::now();
    let (num, version): (i32, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
    )
    .fetch_one(&mut *conn)
    .await?;
    let latency = started.elapsed();
    #[allow(clippy::cast_sign_loss)]
    let major = (num.max(0) as u32) / 10_000;
    let threshold = format!(
        "server >= {}, round trip warn > {}",
        t.min_server_version,
        format_duration(t.connect_latency_warn)
    );
    let value = format!(
        "PostgreSQL {version}, round trip {}",
        human_secs(latency.as_secs_f64())
    );
    let result = if major < t.min_server_version {
        CheckResult::new(
            "connectivity",
            CheckStatus::Block,
            value,
            threshold,
            format!(
                "upgrade the server: belay supports PostgreSQL {} and later",
                t.min_server_version
            ),
        )
    } else {
        CheckResult::new(
            "connectivity",
            grade(latency, t.connect_latency_warn, Duration::MAX),
            value,
            threshold,
            "a slow link lengthens every lock wait: run belay close to the database",
        )
    };
    Ok((result, num))
}

async fn database_size(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let (size,): (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())::int8")
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(size).unwrap_or(0))
}

fn grade_database_size(size: u64, t: &Thresholds) -> CheckResult {
    let status = grade(
        size,
        t.database_size_warn.unwrap_or(u64::MAX),
        t.database_size_block.unwrap_or(u64::MAX),
    );
    let show = |v: Option<u64>| v.map_or_else(|| "none".to_string(), format_bytes);
    CheckResult::new(
        "database_size",
        status,
        format_bytes(size),
        format!(
            "warn > {}, block > {}",
            show(t.database_size_warn),
            show(t.database_size_block)
        ),
        "a large database makes the backup and a restore slow: schedule a window long enough, \
         or raise the threshold",
    )
}

fn disk_check(ctx: &PreflightContext, db_size: Option<u64>, t: &Thresholds) -> CheckResult {
    let threshold = format!(
        "free after backup: warn < {}, block < {}",
        format_bytes(t.disk_free_warn_floor),
        format_bytes(t.disk_free_block_floor)
    );
    let Some(dir) = &ctx.backup_dir else {
        return CheckResult::new(
            "disk_space",
            CheckStatus::Pass,
            "not checked: no backup directory configured",
            threshold,
            "",
        );
    };
    let space = match disk::disk_space(dir) {
        Ok(space) => space,
        Err(e) => {
            return CheckResult::new(
                "disk_space",
                CheckStatus::Block,
                format!("could not measure free space at {}: {e}", dir.display()),
                threshold,
                "create the backup directory or fix its permissions",
            );
        }
    };
    let expected = ctx.expected_backup_bytes.or(db_size).unwrap_or(0);
    grade_disk(dir, space.available, expected, t, threshold)
}

fn grade_disk(
    dir: &std::path::Path,
    available: u64,
    expected: u64,
    t: &Thresholds,
    threshold: String,
) -> CheckResult {
    let remaining = available.checked_sub(expected);
    let status = match remaining {
        None => CheckStatus::Block,
        Some(r) if r < t.disk_free_block_floor => CheckStatus::Block,
        Some(r) if r < t.disk_free_warn_floor => CheckStatus::Warn,
        Some(_) => CheckStatus::Pass,
    };
    CheckResult::new(
        "disk_space",
        status,
        format!(
            "{} free at {}, expected backup {}, {} left after it",
            format_bytes(available),
            dir.display(),
            format_bytes(expected),
            remaining.map_or_else(|| "nothing".to_string(), format_bytes)
        ),
        threshold,
        "free space or point backups elsewhere (a backup that cannot complete leaves no way back)",
    )
}

async fn connections(conn: &mut PgConnection, t: &Thresholds) -> Result<CheckResult, sqlx::Error> {
    let (used, max): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int8,
                current_setting('max_connections')::int8",
    )
    .fetch_one(&mut *conn)
    .await?;
    #[allow(clippy::cast_precision_loss)]
    let percent = if max > 0 {
        used as f64 * 100.0 / max as f64
    } else {
        100.0
    };
    Ok(CheckResult::new(
        "connections",
        grade(
            percent,
            t.connections_warn_percent,
            t.connections_block_percent,
        ),
        format!("{used} of max_connections {max} ({percent:.0}%)"),
        format!(
            "warn > {}%, block > {}%",
            t.connections_warn_percent, t.connections_block_percent
        ),
        "close idle clients or put a pooler (PgBouncer) in front: belay and a backup need \
         connections of their own",
    ))
}

type SessionRow = (i32, f64, String, String, String);

fn describe_sessions(rows: &[SessionRow], what: &str) -> String {
    match rows.first() {
        None => format!("no {what}"),
        Some((pid, secs, user, app, query)) => {
            let more = if rows.len() > 1 {
                format!(" (and {} more)", rows.len() - 1)
            } else {
                String::new()
            };
            format!(
                "{} {what}; oldest {}: pid {pid}, user {user:?}, application {app:?}: {}{more}",
                rows.len(),
                human_secs(*secs),
                one_line(query, 100)
            )
        }
    }
}

pub(crate) fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

async fn long_queries(conn: &mut PgConnection, t: &Thresholds) -> Result<CheckResult, sqlx::Error> {
    let rows: Vec<SessionRow> = sqlx::query_as(
        "SELECT pid, extract(epoch FROM clock_timestamp() - query_start)::float8,
                coalesce(usename::text, ''), coalesce(application_name, ''), coalesce(query, '')
           FROM pg_stat_activity
          WHERE datname = current_database() AND state = 'active'
            AND backend_type = 'client backend' AND pid <> pg_backend_pid()
            AND query_start IS NOT NULL
          ORDER BY query_start LIMIT 50",
    )
    .fetch_all(&mut *conn)
    .await?;
    let longest = rows.first().map_or(0.0, |r| r.1);
    Ok(CheckResult::new(
        "long_running_queries",
        grade(
            longest,
            t.long_query_warn.as_secs_f64(),
            t.long_query_block.as_secs_f64(),
        ),
        describe_sessions(&rows, "active queries"),
        dur_threshold(t.long_query_warn, t.long_query_block),
        "wait for the query to finish, or cancel it with SELECT pg_cancel_backend(pid): a \
         migration's lock would queue behind it and stall the application",
    ))
}

async fn idle_in_transaction(
    conn: &mut PgConnection,
    t: &Thresholds,
) -> Result<CheckResult, sqlx::Error> {
    let rows: Vec<SessionRow> = sqlx::query_as(
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8,
                coalesce(usename::text, ''), coalesce(application_name, ''), coalesce(query, '')
           FROM pg_stat_activity
          WHERE datname = current_database()
            AND state IN ('idle in transaction', 'idle in transaction (aborted)')
            AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
          ORDER BY xact_start LIMIT 50",
    )
    .fetch_all(&mut *conn)
    .await?;
    let longest = rows.first().map_or(0.0, |r| r.1);
    Ok(CheckResult::new(
        "idle_in_transaction",
        grade(
            longest,
            t.idle_in_transaction_warn.as_secs_f64(),
            t.idle_in_transaction_block.as_secs_f64(),
        ),
        describe_sessions(&rows, "idle-in-transaction sessions"),
        dur_threshold(t.idle_in_transaction_warn, t.idle_in_transaction_block),
        "an open transaction holds its locks and snapshot (CREATE INDEX CONCURRENTLY waits for \
         it): have the client commit, or end it with SELECT pg_terminate_backend(pid)",
    ))
}

/// Sessions holding a lock on a table the pending migrations will lock, oldest
/// transaction first: the migration would queue behind each of them.
async fn table_locks(
    conn: &mut PgConnection,
    tables: &[String],
    t: &Thresholds,
) -> Result<CheckResult, sqlx::Error> {
    let threshold = dur_threshold(t.table_lock_warn, t.table_lock_block);
    let fix = "the migration queues behind these transactions (the lock guard gives way to \
               the application meanwhile): have them commit, or end them with SELECT \
               pg_terminate_backend(pid), before migrating";
    if tables.is_empty() {
        return Ok(CheckResult::new(
            "table_locks",
            CheckStatus::Pass,
            "the pending migrations lock no table".to_string(),
            threshold,
            fix,
        ));
    }
    // to_regclass: a table the migrations create does not exist yet, and nobody holds it.
    let rows: Vec<SessionRow> = sqlx::query_as(
        "SELECT a.pid,
                extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, clock_timestamp()))::float8,
                coalesce(a.usename::text, ''), coalesce(a.application_name, ''),
                string_agg(DISTINCT l.mode || ' on ' || l.relation::regclass::text, ', ')
                  || ' (' || coalesce(a.state, '?') || '): ' || coalesce(a.query, '')
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.granted AND l.locktype = 'relation' AND l.pid <> pg_backend_pid()
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.relation IN (SELECT to_regclass(n) FROM unnest($1::text[]) n)
          GROUP BY a.pid, a.xact_start, a.usename, a.application_name, a.state, a.query
          ORDER BY a.xact_start NULLS LAST LIMIT 50",
    )
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    let longest = rows.first().map_or(0.0, |r| r.1);
    let status = if rows.is_empty() {
        CheckStatus::Pass
    } else {
        grade(
            longest,
            t.table_lock_warn.as_secs_f64(),
            t.table_lock_block.as_secs_f64(),
        )
    };
    Ok(CheckResult::new(
        "table_locks",
        status,
        describe_sessions(
            &rows,
            &format!(
                "session(s) holding locks on tables the pending migrations lock ({})",
                tables.join(", ")
            ),
        ),
        threshold,
        fix,
    ))
}

async fn lock_waits(
    conn: &mut PgConnection,
    t: &Thresholds,
    version_num: i32,
) -> Result<CheckResult, sqlx::Error> {
    // pg_locks.waitstart exists from PostgreSQL 14; before, the query's start approximates.
    let sql = if version_num >= 140_000 {
        "SELECT l.pid, extract(epoch FROM clock_timestamp()
                  - coalesce(l.waitstart, a.state_change, clock_timestamp()))::float8,
                l.mode || ' on ' || coalesce(l.relation::regclass::text, l.locktype),
                array_to_string(pg_blocking_pids(l.pid), ','), coalesce(a.query, '')
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE NOT l.granted AND a.datname = current_database() AND l.pid <> pg_backend_pid()
          ORDER BY 2 DESC LIMIT 50"
    } else {
        "SELECT l.pid, extract(epoch FROM clock_timestamp()
                  - coalesce(a.state_change, clock_timestamp()))::float8,
                l.mode || ' on ' || coalesce(l.relation::regclass::text, l.locktype),
                array_to_string(pg_blocking_pids(l.pid), ','), coalesce(a.query, '')
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE NOT l.granted AND a.datname = current_database() AND l.pid <> pg_backend_pid()
          ORDER BY 2 DESC LIMIT 50"
    };
    let rows: Vec<(i32, f64, String, String, String)> =
        sqlx::query_as(sql).fetch_all(&mut *conn).await?;
    let longest = rows.first().map_or(-1.0, |r| r.1);
    let value = match rows.first() {
        None => "no session waiting for a lock".to_string(),
        Some((pid, secs, what, blockers, query)) => format!(
            "{} waiting; longest {}: pid {pid} wants {what}, blocked by pid(s) {blockers}: {}",
            rows.len(),
            human_secs(*secs),
            one_line(query, 100)
        ),
    };
    Ok(CheckResult::new(
        "lock_waits",
        grade(
            longest,
            t.lock_wait_warn.as_secs_f64(),
            t.lock_wait_block.as_secs_f64(),
        ),
        value,
        dur_threshold(t.lock_wait_warn, t.lock_wait_block),
        "a lock queue is already forming: find the blocking pid(s) and let them finish or end \
         them before migrating",
    ))
}

async fn replication_lag(
    conn: &mut PgConnection,
    t: &Thresholds,
) -> Result<CheckResult, sqlx::Error> {
    let (in_recovery,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
        .fetch_one(&mut *conn)
        .await?;
    // (who, lag bytes or NULL when not visible)
    let rows: Vec<(String, Option<f64>)> = if in_recovery {
        sqlx::query_as(
            "SELECT 'this server (a replica)',
                    pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::float8",
        )
        .fetch_all(&mut *conn)
        .await?
    } else {
        sqlx::query_as(
            "SELECT coalesce(nullif(application_name, ''), 'walsender') || ' pid ' || pid
                      || coalesce(' at ' || host(client_addr), ''),
                    pg_wal_lsn_diff(pg_current_wal_lsn(),
                                    coalesce(replay_lsn, flush_lsn, write_lsn, sent_lsn))::float8
               FROM pg_stat_replication ORDER BY 2 DESC NULLS FIRST",
        )
        .fetch_all(&mut *conn)
        .await?
    };
    Ok(grade_replication(&rows, t))
}

fn grade_replication(rows: &[(String, Option<f64>)], t: &Thresholds) -> CheckResult {
    let threshold = bytes_threshold(t.replication_lag_warn, t.replication_lag_block);
    let remedy = "wait for replicas to catch up (a migration adds WAL and lag), or find why \
                  they fall behind";
    let Some((who, lag)) = rows.first() else {
        return CheckResult::new(
            "replication_lag",
            CheckStatus::Pass,
            "no replicas",
            threshold,
            "",
        );
    };
    let Some(lag) = lag else {
        return CheckResult::new(
            "replication_lag",
            CheckStatus::Warn,
            format!("lag of {who} not visible to this role"),
            threshold,
            "grant pg_monitor to belay's role so replication positions are visible",
        );
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let lag = lag.max(0.0) as u64;
    CheckResult::new(
        "replication_lag",
        grade(lag, t.replication_lag_warn, t.replication_lag_block),
        format!(
            "{} behind: {who} ({} replica(s))",
            format_bytes(lag),
            rows.len()
        ),
        threshold,
        remedy,
    )
}

fn migration_checks(s: &MigrationSummary, t: &Thresholds) -> Vec<CheckResult> {
    let pending_status = match t.pending_migrations_warn {
        Some(max) if s.pending > max => CheckStatus::Warn,
        _ => CheckStatus::Pass,
    };
    let listed = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    vec![
        CheckResult::new(
            "pending_migrations",
            pending_status,
            format!("{} pending", s.pending),
            t.pending_migrations_warn
                .map_or_else(|| "informational".into(), |n| format!("warn > {n}")),
            "apply fewer migrations per deployment: each is a step to verify and to undo",
        ),
        CheckResult::new(
            "failed_migrations",
            if s.failed.is_empty() {
                CheckStatus::Pass
            } else {
                t.failed_migrations.into()
            },
            format!("failed: {}", listed(&s.failed)),
            format!("any failed: {}", CheckStatus::from(t.failed_migrations)),
            "inspect the failed migration, fix the database, then `belay repair`",
        ),
        CheckResult::new(
            "checksum_drift",
            if s.drift.is_empty() {
                CheckStatus::Pass
            } else {
                t.checksum_drift.into()
            },
            format!("changed since applied: {}", listed(&s.drift)),
            format!("any drift: {}", CheckStatus::from(t.checksum_drift)),
            "restore the applied files as they were (history records what ran), or `belay \
             repair` to accept the new checksums",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_threshold_key_is_known_and_tightening_never_loosens() {
        let defaults = serde_json::to_value(Thresholds::default()).expect("serializes");
        let mut keys: Vec<&str> = defaults
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut known = Thresholds::KEYS.to_vec();
        known.sort_unstable();
        assert_eq!(keys, known, "KEYS lists every field of Thresholds");

        // The target's owner loosened some, tightened others.
        let own = Thresholds {
            lock_wait_block: Duration::from_secs(5),
            long_query_block: Duration::from_secs(10),
            database_size_block: Some(1 << 40),
            disk_free_block_floor: 1 << 20,
            checksum_drift: Severity::Warn,
            failed_migrations: Severity::Block,
            ..Thresholds::default()
        };
        let caller = Thresholds {
            lock_wait_block: Duration::from_millis(300),
            long_query_block: Duration::from_secs(600),
            database_size_block: None,
            disk_free_block_floor: 1 << 30,
            checksum_drift: Severity::Block,
            failed_migrations: Severity::Warn,
            min_server_version: 16,
            ..Thresholds::default()
        };
        let all: Vec<String> = Thresholds::KEYS.iter().map(|k| k.to_string()).collect();
        let t = own.tightened(&caller, &all).expect("known keys");
        assert_eq!(t.lock_wait_block, Duration::from_millis(300), "tightened");
        assert_eq!(t.long_query_block, Duration::from_secs(10), "not loosened");
        assert_eq!(t.database_size_block, Some(1 << 40), "a limit beats none");
        assert_eq!(
            t.disk_free_block_floor,
            1 << 30,
            "a higher floor is stricter"
        );
        assert_eq!(t.checksum_drift, Severity::Block);
        assert_eq!(t.failed_migrations, Severity::Block, "not loosened");
        assert_eq!(t.min_server_version, 16);

        // Only the keys the caller set take part: its defaults do not tighten the rest.
        let t = own
            .tightened(&caller, &["lock_wait_block".to_string()])
            .expect("known key");
        assert_eq!(
            t,
            Thresholds {
                lock_wait_block: Duration::from_millis(300),
                ..own.clone()
            }
        );
        let err = own
            .tightened(&caller, &["lock_wait".to_string()])
            .expect_err("unknown key");
        assert!(
            err.contains("\"lock_wait\"") && err.contains("lock_wait_block"),
            "{err}"
        );
    }

    #[test]
    fn grading_is_strictly_above() {
        assert_eq!(grade(1.0, 1.0, 5.0), CheckStatus::Pass);
        assert_eq!(grade(1.1, 1.0, 5.0), CheckStatus::Warn);
        assert_eq!(grade(5.1, 1.0, 5.0), CheckStatus::Block);
        // default lock thresholds: any wait warns, over a second blocks, none passes
        let t = Thresholds::default();
        let (w, b) = (
            t.lock_wait_warn.as_secs_f64(),
            t.lock_wait_block.as_secs_f64(),
        );
        assert_eq!(grade(-1.0, w, b), CheckStatus::Pass);
        assert_eq!(grade(0.2, w, b), CheckStatus::Warn);
        assert_eq!(grade(1.2, w, b), CheckStatus::Block);
    }

    #[test]
    fn replication_lag_grades_and_hidden_positions_warn() {
        let t = Thresholds::default();
        assert_eq!(grade_replication(&[], &t).status, CheckStatus::Pass);
        let r = |lag: Option<f64>| vec![("replica1 pid 7".to_string(), lag)];
        assert_eq!(
            grade_replication(&r(Some(1024.0)), &t).status,
            CheckStatus::Pass
        );
        let warn = grade_replication(&r(Some(100.0 * 1024.0 * 1024.0)), &t);
        assert_eq!(warn.status, CheckStatus::Warn);
        assert!(warn.value.contains("replica1"), "{}", warn.value);
        assert_eq!(
            grade_replication(&r(Some(2e9)), &t).status,
            CheckStatus::Block
        );
        assert_eq!(grade_replication(&r(None), &t).status, CheckStatus::Warn);
    }

    #[test]
    fn disk_needs_the_backup_plus_the_floor() {
        let t = Thresholds {
            disk_free_warn_floor: 100,
            disk_free_block_floor: 10,
            ..Thresholds::default()
        };
        let dir = std::path::Path::new("/backups");
        let g = |avail, expected| grade_disk(dir, avail, expected, &t, String::new()).status;
        assert_eq!(g(1000, 500), CheckStatus::Pass);
        assert_eq!(g(550, 500), CheckStatus::Warn);
        assert_eq!(g(505, 500), CheckStatus::Block);
        assert_eq!(g(400, 500), CheckStatus::Block);
    }

    #[test]
    fn migration_checks_follow_their_severity() {
        let mut t = Thresholds::default();
        let s = MigrationSummary {
            pending: 3,
            failed: vec!["4".into()],
            drift: vec!["2".into()],
            lock_tables: vec![],
        };
        let st = |rs: Vec<CheckResult>| rs.iter().map(|r| r.status).collect::<Vec<_>>();
        use CheckStatus::*;
        assert_eq!(st(migration_checks(&s, &t)), [Pass, Block, Block]);
        t.pending_migrations_warn = Some(2);
        t.failed_migrations = Severity::Warn;
        t.checksum_drift = Severity::Warn;
        assert_eq!(st(migration_checks(&s, &t)), [Warn, Warn, Warn]);
        let clean = MigrationSummary::default();
        assert_eq!(st(migration_checks(&clean, &t)), [Pass, Pass, Pass]);
    }

    #[test]
    fn thresholds_read_from_belay_toml() {
        let t: Thresholds = toml::from_str(
            r#"
            long_query_block = "2min"
            lock_wait_block = "500ms"
            disk_free_warn_floor = "10GiB"
            replication_lag_block = 1048576
            database_size_warn = "50GB"
            checksum_drift = "warn"
            "#,
        )
        .unwrap();
        assert_eq!(t.long_query_block, Duration::from_secs(120));
        assert_eq!(t.lock_wait_block, Duration::from_millis(500));
        assert_eq!(t.disk_free_warn_floor, 10 << 30);
        assert_eq!(t.replication_lag_block, 1 << 20);
        assert_eq!(t.database_size_warn, Some(50 << 30));
        assert_eq!(t.checksum_drift, Severity::Warn);
        assert_eq!(t.long_query_warn, Thresholds::default().long_query_warn);
        assert!(toml::from_str::<Thresholds>("lock_wait = \"1s\"").is_err());
    }
}
