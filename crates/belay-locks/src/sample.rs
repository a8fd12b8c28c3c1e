//! The one query a sample costs, and its raw rows.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::{Acquire, PgConnection};

use crate::model::{
    LockSnapshot, PendingBlocker, PendingDdl, ReplicaLag, SessionInfo, SnapshotOptions,
};
use crate::{LocksError, QUERY_EXCERPT_CHARS, tree};

/// The server-side budget of one sample. A sample that cannot finish in this time is
/// worth less than the next one.
pub(crate) const SAMPLE_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '2s'";
/// Reading catalog views takes no heavyweight lock worth waiting for.
pub(crate) const SAMPLE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '200ms'";
/// The same limits for a session that only samples (a watch's own): set once.
pub(crate) const SAMPLE_SESSION_SETTINGS: &str =
    "SET statement_timeout = '2s'; SET lock_timeout = '200ms'";

/// One round trip, one row, one JSON document. `pg_locks` is read once (each reference to
/// the view would call `pg_lock_status()` again, which briefly takes every lock-manager
/// partition lock); `pg_blocking_pids()` is only called for sessions waiting on a lock.
/// Sessions are filtered server-side to the interesting ones: waiting, blocking, the
/// leaders of waiting parallel workers, long-running and idle in transaction.
///
/// `$1` = long-running threshold (ms), `$2` = idle-in-transaction threshold (ms).
const SAMPLE_SQL: &str = r#"
WITH l AS MATERIALIZED (
    SELECT pl.pid, pl.locktype, pl.mode, pl.granted, pl.relation, pl.database,
           (to_jsonb(pl) ->> 'waitstart')::timestamptz AS waitstart
    FROM pg_locks pl
    WHERE pl.pid IS NOT NULL AND (NOT pl.granted OR pl.locktype = 'relation')
),
a AS MATERIALIZED (
    SELECT s.pid, s.leader_pid, s.usename::text AS usename, s.application_name, s.datname::text AS datname,
           host(s.client_addr) AS client_addr, s.state, s.wait_event_type, s.wait_event, s.backend_type,
           s.query_start, s.xact_start, s.state_change, left(s.query, 400) AS query,
           CASE WHEN s.wait_event_type = 'Lock' THEN pg_blocking_pids(s.pid) ELSE '{}'::int[] END AS blocked_by
    FROM pg_stat_activity s
    WHERE s.pid <> pg_backend_pid() AND s.backend_type IN
          ('client backend', 'parallel worker', 'autovacuum worker', 'background worker', 'walsender')
),
blockers AS (SELECT DISTINCT unnest(blocked_by) AS pid FROM a),
w AS (
    SELECT DISTINCT ON (l.pid) l.pid, l.locktype, l.mode, l.relation, l.database, l.waitstart
    FROM l WHERE NOT l.granted
    ORDER BY l.pid, l.waitstart NULLS LAST
),
waited_rel AS (SELECT DISTINCT relation FROM w WHERE relation IS NOT NULL),
ms AS (SELECT clock_timestamp() AS now)
SELECT json_build_object(
  'at', (SELECT now FROM ms),
  'sessions', (SELECT coalesce(json_agg(json_build_object(
      'pid', a.pid, 'leader_pid', a.leader_pid, 'user', a.usename, 'application', a.application_name,
      'database', a.datname, 'client_addr', a.client_addr, 'state', a.state,
      'wait_event_type', a.wait_event_type, 'wait_event', a.wait_event, 'backend_type', a.backend_type,
      'query_ms', (extract(epoch FROM ms.now - a.query_start) * 1000)::bigint,
      'xact_ms', (extract(epoch FROM ms.now - a.xact_start) * 1000)::bigint,
      'state_ms', (extract(epoch FROM ms.now - a.state_change) * 1000)::bigint,
      'query', a.query, 'blocked_by', a.blocked_by,
      'lock_type', w.locktype, 'mode', w.mode,
      'relation', CASE WHEN w.relation IS NULL THEN NULL
                       WHEN w.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       THEN w.relation::regclass::text ELSE w.relation::text END,
      'waiting_ms', CASE WHEN cardinality(a.blocked_by) > 0 OR w.pid IS NOT NULL THEN
                    (extract(epoch FROM ms.now - coalesce(w.waitstart, a.state_change)) * 1000)::bigint END
    )), '[]'::json)
    FROM a CROSS JOIN ms LEFT JOIN w ON w.pid = a.pid
    WHERE cardinality(a.blocked_by) > 0
       OR a.pid IN (SELECT pid FROM blockers)
       OR a.pid IN (SELECT leader_pid FROM a a2 WHERE cardinality(a2.blocked_by) > 0)
       OR (a.state = 'active' AND a.backend_type = 'client backend'
           AND ms.now - a.query_start >= make_interval(secs => $1::float8 / 1000))
       OR (a.state IN ('idle in transaction', 'idle in transaction (aborted)')
           AND ms.now - a.state_change >= make_interval(secs => $2::float8 / 1000))),
  'held', (SELECT coalesce(json_agg(json_build_object(
      'pid', l.pid, 'mode', l.mode,
      'relation', CASE WHEN l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       THEN l.relation::regclass::text ELSE l.relation::text END,
      'relation_oid', l.relation::bigint)), '[]'::json)
    FROM l WHERE l.granted AND l.locktype = 'relation'
      AND l.relation IN (SELECT relation FROM waited_rel)
      AND l.pid IN (SELECT pid FROM blockers)),
  'waited_relations', (SELECT coalesce(json_agg(json_build_object('pid', w.pid, 'relation_oid', w.relation::bigint)), '[]'::json)
    FROM w WHERE w.relation IS NOT NULL),
  'pending', (SELECT coalesce(json_agg(json_build_object(
      'guard_pid', g.pid,
      'migration_pid', split_part(split_part(g.application_name, ': ', 2), ' ', 1)::int,
      'blockers', (SELECT coalesce(json_agg(json_build_object(
          'pid', b.pid, 'leader_pid', b.leader_pid, 'user', b.usename::text,
          'application', b.application_name, 'database', b.datname::text,
          'client_addr', host(b.client_addr), 'state', b.state,
          'wait_event_type', b.wait_event_type, 'wait_event', b.wait_event,
          'backend_type', b.backend_type,
          'query_ms', (extract(epoch FROM clock_timestamp() - b.query_start) * 1000)::bigint,
          'xact_ms', (extract(epoch FROM clock_timestamp() - b.xact_start) * 1000)::bigint,
          'state_ms', (extract(epoch FROM clock_timestamp() - b.state_change) * 1000)::bigint,
          'query', left(b.query, 400), 'blocked_by', '{}'::int[],
          'lock_type', NULL, 'mode', NULL, 'waiting_ms', NULL,
          'relation', (SELECT string_agg(h.mode || ' on ' || h.relation::regclass::text, ', ')
                       FROM pg_locks h JOIN pg_class c ON c.oid = h.relation
                       WHERE h.pid = b.pid AND h.granted AND h.locktype = 'relation'
                         AND c.relkind IN ('r', 'p', 'm')
                         AND h.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
        ) ORDER BY b.pid), '[]'::json)
        FROM pg_stat_activity b
        WHERE b.pid = ANY(string_to_array(split_part(g.application_name, ' waits for ', 2), ',')::int[]))
    )), '[]'::json)
    FROM pg_stat_activity g
    WHERE g.application_name ~ '^belay-lock-guard: [0-9]+ waits for [0-9]+(,[0-9]+)*$'),
  'replication', (SELECT coalesce(json_agg(json_build_object(
      'pid', r.pid, 'application', r.application_name, 'client_addr', host(r.client_addr),
      'state', r.state, 'sync_state', r.sync_state,
      'write_lag_ms', (extract(epoch FROM r.write_lag) * 1000)::bigint,
      'flush_lag_ms', (extract(epoch FROM r.flush_lag) * 1000)::bigint,
      'replay_lag_ms', (extract(epoch FROM r.replay_lag) * 1000)::bigint,
      'replay_lag_bytes', CASE WHEN pg_is_in_recovery() THEN NULL
                          ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint END
    )), '[]'::json) FROM pg_stat_replication r)
)
"#;

#[derive(Debug, Deserialize)]
pub(crate) struct RawSample {
    pub at: DateTime<Utc>,
    pub sessions: Vec<RawSession>,
    pub held: Vec<RawHeld>,
    pub waited_relations: Vec<RawWaitedRel>,
    #[serde(default)]
    pub pending: Vec<RawPending>,
    pub replication: Vec<RawReplica>,
}

/// A runner between attempts, as its guard session's `application_name` announces it;
/// `relation` of each blocker holds the relation locks it holds (`mode on table, ...`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawPending {
    pub guard_pid: i32,
    pub migration_pid: i32,
    pub blockers: Vec<RawSession>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawSession {
    pub pid: i32,
    pub leader_pid: Option<i32>,
    pub user: Option<String>,
    pub application: Option<String>,
    pub database: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub wait_event_type: Option<String>,
    pub wait_event: Option<String>,
    pub backend_type: Option<String>,
    pub query_ms: Option<i64>,
    pub xact_ms: Option<i64>,
    pub state_ms: Option<i64>,
    pub query: Option<String>,
    pub blocked_by: Vec<i32>,
    pub lock_type: Option<String>,
    pub mode: Option<String>,
    pub relation: Option<String>,
    pub waiting_ms: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawHeld {
    pub pid: i32,
    pub mode: String,
    pub relation: Option<String>,
    pub relation_oid: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawWaitedRel {
    pub pid: i32,
    pub relation_oid: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawReplica {
    pub pid: i32,
    pub application: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sync_state: Option<String>,
    pub write_lag_ms: Option<i64>,
    pub flush_lag_ms: Option<i64>,
    pub replay_lag_ms: Option<i64>,
    pub replay_lag_bytes: Option<i64>,
}

/// Takes one sample on `conn`: a short transaction with a low `statement_timeout`
/// (`SET LOCAL`, so the session's own settings are untouched) around one query.
///
/// Needs no privilege beyond `pg_monitor` (for other users' query texts and
/// `pg_stat_replication`); without it the sample still works, with other users' queries
/// hidden by the server.
pub async fn snapshot(
    conn: &mut PgConnection,
    opts: &SnapshotOptions,
) -> Result<LockSnapshot, LocksError> {
    let raw = sample_raw(conn, opts).await?;
    Ok(build(raw, opts))
}

pub(crate) async fn sample_raw(
    conn: &mut PgConnection,
    opts: &SnapshotOptions,
) -> Result<RawSample, LocksError> {
    let mut tx = conn.begin().await.map_err(LocksError::query("begin"))?;
    sqlx::query(SAMPLE_STATEMENT_TIMEOUT)
        .execute(&mut *tx)
        .await
        .map_err(LocksError::query("set statement_timeout"))?;
    sqlx::query(SAMPLE_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await
        .map_err(LocksError::query("set lock_timeout"))?;
    let json: sqlx::types::Json<RawSample> = sqlx::query_scalar(SAMPLE_SQL)
        .bind(millis(opts.long_running))
        .bind(millis(opts.idle_in_transaction))
        .fetch_one(&mut *tx)
        .await
        .map_err(LocksError::query("sample"))?;
    tx.commit().await.map_err(LocksError::query("commit"))?;
    Ok(json.0)
}

/// As [`snapshot`], on a session that is the caller's own and already carries
/// [`SAMPLE_SESSION_SETTINGS`]: the query alone, one round trip.
pub(crate) async fn snapshot_on_own_session(
    conn: &mut PgConnection,
    opts: &SnapshotOptions,
) -> Result<LockSnapshot, LocksError> {
    let json: sqlx::types::Json<RawSample> = sqlx::query_scalar(SAMPLE_SQL)
        .bind(millis(opts.long_running))
        .bind(millis(opts.idle_in_transaction))
        .fetch_one(conn)
        .await
        .map_err(LocksError::query("sample"))?;
    Ok(build(json.0, opts))
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn ms(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

/// Whitespace collapsed, cut to [`QUERY_EXCERPT_CHARS`] characters.
pub(crate) fn excerpt(q: Option<&str>) -> Option<String> {
    let q = q?;
    let mut out = String::new();
    let mut n = 0;
    for word in q.split_whitespace() {
        for c in (!out.is_empty())
            .then_some(' ')
            .into_iter()
            .chain(word.chars())
        {
            if n == QUERY_EXCERPT_CHARS {
                out.pop();
                out.push('…');
                return Some(out);
            }
            out.push(c);
            n += 1;
        }
    }
    Some(out)
}

fn session_info(s: &RawSession) -> SessionInfo {
    SessionInfo {
        pid: s.pid,
        user: s.user.clone(),
        application: s.application.clone(),
        database: s.database.clone(),
        client_addr: s.client_addr.clone(),
        state: s.state.clone(),
        wait_event: wait_event(s),
        backend_type: s.backend_type.clone(),
        query_ms: ms(s.query_ms),
        xact_ms: ms(s.xact_ms),
        state_ms: ms(s.state_ms),
        query: excerpt(s.query.as_deref()),
    }
}

pub(crate) fn wait_event(s: &RawSession) -> Option<String> {
    match (&s.wait_event_type, &s.wait_event) {
        (Some(t), Some(e)) => Some(format!("{t}:{e}")),
        (None, Some(e)) => Some(e.clone()),
        (Some(t), None) => Some(t.clone()),
        (None, None) => None,
    }
}

pub(crate) fn build(raw: RawSample, opts: &SnapshotOptions) -> LockSnapshot {
    let long_ms = millis(opts.long_running);
    let idle_ms = millis(opts.idle_in_transaction);
    let excluded = |s: &&RawSession| Some(s.pid) == opts.exclude_pid;

    let mut long_running: Vec<SessionInfo> = raw
        .sessions
        .iter()
        .filter(|s| !excluded(s))
        .filter(|s| {
            s.state.as_deref() == Some("active")
                && s.backend_type.as_deref() == Some("client backend")
                && s.query_ms.is_some_and(|q| q >= long_ms)
        })
        .map(session_info)
        .collect();
    long_running.sort_by_key(|s| std::cmp::Reverse(s.query_ms));

    let mut idle: Vec<SessionInfo> = raw
        .sessions
        .iter()
        .filter(|s| !excluded(s))
        .filter(|s| {
            s.state
                .as_deref()
                .is_some_and(|st| st.starts_with("idle in transaction"))
                && s.state_ms.is_some_and(|q| q >= idle_ms)
        })
        .map(session_info)
        .collect();
    idle.sort_by_key(|s| std::cmp::Reverse(s.state_ms));

    let replication = raw
        .replication
        .iter()
        .map(|r| ReplicaLag {
            pid: r.pid,
            application: r.application.clone(),
            client_addr: r.client_addr.clone(),
            state: r.state.clone(),
            sync_state: r.sync_state.clone(),
            write_lag_ms: ms(r.write_lag_ms),
            flush_lag_ms: ms(r.flush_lag_ms),
            replay_lag_ms: ms(r.replay_lag_ms),
            replay_lag_bytes: r.replay_lag_bytes,
        })
        .collect();

    let min_wait = u64::try_from(opts.min_wait.as_millis()).unwrap_or(u64::MAX);
    let trees = tree::build_trees(&raw.sessions, &raw.held, &raw.waited_relations)
        .into_iter()
        .filter(|t| t.longest_wait_ms() >= min_wait)
        .collect();

    let pending_ddl = raw
        .pending
        .iter()
        .map(|p| PendingDdl {
            migration_pid: p.migration_pid,
            guard_pid: p.guard_pid,
            blockers: p
                .blockers
                .iter()
                .map(|b| PendingBlocker {
                    session: session_info(b),
                    holds: b.relation.clone(),
                })
                .collect(),
        })
        .collect();

    LockSnapshot {
        at: raw.at,
        trees,
        pending_ddl,
        long_running,
        idle_in_transaction: idle,
        replication,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_collapses_and_cuts() {
        assert_eq!(
            excerpt(Some("SELECT\n   1,\t2")).as_deref(),
            Some("SELECT 1, 2")
        );
        let long = "x".repeat(500);
        let e = excerpt(Some(&long)).unwrap_or_default();
        assert_eq!(e.chars().count(), QUERY_EXCERPT_CHARS);
        assert!(e.ends_with('…'));
        assert_eq!(excerpt(None), None);
    }
}
