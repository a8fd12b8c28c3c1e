//! The lock guard and the executor's helpers for retrying at the right moment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use belay_core::DatabaseUrl;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::model::SessionInfo;
use crate::watch::connect;
use crate::{LocksError, QUERY_EXCERPT_CHARS};

/// `application_name` of the guard's session.
pub const GUARD_APPLICATION: &str = "belay-lock-guard";

/// Every session waiting for a heavyweight lock, whom it waits for, and since when. The
/// migration's own backend is included (its `blocked_by` are its blockers), and on its row
/// alone its blockers are described (who, what transaction, which lock on what), so the
/// poll that decides to give way has already read whom to name. One read of `pg_locks` for
/// the queue; `pg_blocking_pids` only for waiting sessions; the description only while
/// the migration waits; and whether the waiter is in the guard's own database (what a
/// [`QueueObserver`] is told). `$1` = the migration's pid, `$2` = query excerpt length.
const QUEUE_SQL: &str = r#"
WITH w AS MATERIALIZED (
    SELECT pid, min((to_jsonb(l) ->> 'waitstart')::timestamptz) AS waitstart
    FROM pg_locks l WHERE NOT granted AND pid IS NOT NULL GROUP BY pid
)
SELECT s.pid, coalesce(s.leader_pid, s.pid) AS leader,
       pg_blocking_pids(s.pid) AS blocked_by,
       (extract(epoch FROM clock_timestamp() - coalesce(w.waitstart, s.state_change)) * 1000)::bigint AS waiting_ms,
       CASE WHEN s.pid = $1 THEN (
           SELECT json_agg(json_build_object(
               'pid', b.pid, 'user', b.usename::text, 'application', nullif(b.application_name, ''),
               'client_addr', host(b.client_addr), 'state', b.state,
               'xact_ms', (extract(epoch FROM clock_timestamp() - b.xact_start) * 1000)::bigint,
               'query', left(b.query, $2),
               'held', (SELECT string_agg(DISTINCT h.mode, '+') FROM pg_locks h
                        WHERE h.pid = b.pid AND h.granted AND h.locktype = want.locktype
                          AND h.database IS NOT DISTINCT FROM want.database
                          AND h.relation IS NOT DISTINCT FROM want.relation
                          AND h.transactionid IS NOT DISTINCT FROM want.transactionid),
               'waiting', (SELECT h.mode FROM pg_locks h WHERE h.pid = b.pid AND NOT h.granted LIMIT 1),
               'relation', CASE WHEN want.relation IS NOT NULL AND want.database =
                                     (SELECT oid FROM pg_database WHERE datname = current_database())
                                THEN want.relation::regclass::text END
           ) ORDER BY b.pid)::text
           FROM pg_stat_activity b
           LEFT JOIN LATERAL (SELECT m.locktype, m.database, m.relation, m.transactionid
                              FROM pg_locks m WHERE m.pid = s.pid AND NOT m.granted LIMIT 1) want ON true
           WHERE b.pid = ANY(pg_blocking_pids(s.pid))
       ) END AS blockers,
       s.datname IS NOT DISTINCT FROM current_database() AS here
FROM pg_stat_activity s LEFT JOIN w ON w.pid = s.pid
WHERE s.wait_event_type = 'Lock' AND s.pid <> pg_backend_pid()
"#;

/// A session the migration waited for, as the guard's poll read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Blocker {
    pub pid: i32,
    pub user: Option<String>,
    pub application: Option<String>,
    pub client_addr: Option<String>,
    /// `active`, `idle in transaction`, ...
    pub state: Option<String>,
    /// How long its current transaction has been open.
    pub xact_ms: Option<u64>,
    pub query: Option<String>,
    /// The modes it holds on the lock the migration waits for (`AccessShareLock`, joined
    /// with `+` when several); `None` when it holds none (it is queued ahead).
    pub held: Option<String>,
    /// The mode it waits for itself, when it is queued too.
    pub waiting: Option<String>,
    /// The relation of the lock the migration waits for (`public.accounts`).
    pub relation: Option<String>,
}

impl Blocker {
    /// Just the pid (the session could not be described, or has gone).
    pub fn pid(pid: i32) -> Self {
        Blocker {
            pid,
            user: None,
            application: None,
            client_addr: None,
            state: None,
            xact_ms: None,
            query: None,
            held: None,
            waiting: None,
            relation: None,
        }
    }
}

/// The lock waits of the guard's database as one poll saw them: every session waiting for
/// a heavyweight lock there (parallel workers counted as their leader), whether or not it
/// is behind the migration, and the longest of their waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueSeen {
    pub waiting: usize,
    pub longest_wait_ms: u64,
}

/// Told what every poll of a guard sees, and when the guard stops: a live picture of the
/// target's lock waits while a migration statement runs, at the guard's poll rate, for
/// whoever reports them (the agent's lock gauges) without a sample of its own. Called on
/// the guard's task: it must return at once.
pub trait QueueObserver: Send + Sync + std::fmt::Debug {
    fn seen(&self, queue: QueueSeen);
    /// The guard stopped (the statement ended, or the guard failed). `rest`: the waits of
    /// its last poll without the migration and the sessions queued behind it, which the
    /// statement's end released — what is left of the picture without a new look.
    fn ended(&self, rest: QueueSeen);
}

/// One intervention of the guard: sessions queued behind the migration would have waited
/// past the budget by the next poll, so the migration's statement was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuardTrip {
    pub at: DateTime<Utc>,
    /// The migration's backend.
    pub migration_pid: i32,
    /// Sessions queued behind the migration, directly or transitively.
    pub blocked_sessions: Vec<i32>,
    /// The longest of their waits when the guard tripped.
    pub longest_wait_ms: u64,
    /// Whom the migration itself was waiting for (empty when it held its locks and was
    /// running, e.g. a table rewrite): the sessions to wait out before retrying.
    pub blockers_of_migration: Vec<i32>,
    /// The same sessions described, as the poll that tripped read them.
    pub blockers: Vec<Blocker>,
    /// Whether `pg_cancel_backend` reported that the signal was sent.
    pub cancelled: bool,
}

/// Watches the lock queue behind a migration's backend from a connection of its own and
/// cancels the migration's statement before anyone in that queue has waited past
/// `max_blocking`: at the last poll before the budget runs out (at a wait that would pass
/// it before the next poll), so the longest the application waits is about the budget
/// plus the cancel's round trip, not the budget plus a poll period.
///
/// Typical use by the executor, per statement attempt:
/// `start` → run the statement → `stop`; if the statement failed with SQLSTATE 57014
/// (query_canceled) and `stop` returned a trip, it was the guard: wait for
/// `trip.blockers_of_migration` with [`wait_until_gone`], then retry (bounded).
///
/// After a trip the guard does not trip again until it has seen the queue behind the
/// migration empty, so one stall causes one cancel.
#[derive(Debug)]
pub struct LockGuard {
    trips: mpsc::UnboundedReceiver<GuardTrip>,
    /// The migration's blockers at the last poll that saw it waiting.
    last_blockers: Arc<Mutex<Vec<Blocker>>>,
    stop: Option<oneshot::Sender<()>>,
    /// Ends with the outcome and, after a clean stop, the connection (for reuse).
    task: JoinHandle<(Result<(), LocksError>, Option<PgConnection>)>,
}

impl LockGuard {
    /// Connects (so a bad URL fails here, before the migration runs) and starts polling
    /// every `period`.
    pub async fn start(
        url: &DatabaseUrl,
        migration_backend_pid: i32,
        max_blocking: Duration,
        period: Duration,
    ) -> Result<LockGuard, LocksError> {
        let conn = connect(url, GUARD_APPLICATION).await?;
        Ok(Self::start_on(
            conn,
            migration_backend_pid,
            max_blocking,
            period,
            None,
        ))
    }

    /// As [`LockGuard::start`], on a connection the caller opened (it is closed on stop),
    /// telling `observer` (if any) what each poll sees.
    pub fn start_on(
        conn: PgConnection,
        migration_pid: i32,
        max_blocking: Duration,
        period: Duration,
        observer: Option<Arc<dyn QueueObserver>>,
    ) -> LockGuard {
        let (trip_tx, trips) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let last_blockers = Arc::new(Mutex::new(Vec::new()));
        let poll = Poll {
            migration_pid,
            period: period.max(Duration::from_millis(5)),
            budget: max_blocking,
            seen: last_blockers.clone(),
            trip_tx,
        };
        let task = tokio::spawn(async move {
            let mut rest = QueueSeen::default();
            let out = poll
                .run(conn, stopped, observer.as_deref(), &mut rest)
                .await;
            if let Some(o) = &observer {
                o.ended(rest);
            }
            out
        });
        LockGuard {
            trips,
            last_blockers,
            stop: Some(stop),
            task,
        }
    }

    /// The next trip, waiting for it (`None` once the guard has stopped).
    pub async fn next_trip(&mut self) -> Option<GuardTrip> {
        self.trips.recv().await
    }

    /// A trip already reported, without waiting.
    pub fn try_trip(&mut self) -> Option<GuardTrip> {
        self.trips.try_recv().ok()
    }

    /// Whom the migration was waiting for at the last poll that saw it waiting (empty:
    /// never seen waiting).
    pub fn last_blockers(&self) -> Vec<Blocker> {
        self.last_blockers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the guard has stopped polling on its own (it failed), or was stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops polling and closes the guard's connection. Returns the trips not yet taken
    /// with [`LockGuard::next_trip`]/[`LockGuard::try_trip`], or the error that stopped the
    /// guard early (the migration was never cancelled after that error). A trip is never
    /// lost to a later error: when the guard tripped before it failed, the trips are
    /// returned (the statement it cancelled must be seen as the guard's, and retried).
    pub async fn stop(self) -> Result<Vec<GuardTrip>, LocksError> {
        let (trips, conn) = self.stop_keeping_connection().await?;
        if let Some(conn) = conn {
            let _ = conn.close().await;
        }
        Ok(trips)
    }

    /// As [`LockGuard::stop`], handing back the guard's connection (when it is still
    /// sound) instead of closing it, so a caller guarding one statement after another can
    /// [`LockGuard::start_on`] it again rather than connect for every statement.
    pub async fn stop_keeping_connection(
        mut self,
    ) -> Result<(Vec<GuardTrip>, Option<PgConnection>), LocksError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let (outcome, conn) = (&mut self.task)
            .await
            .map_err(|e| LocksError::Task(e.to_string()))?;
        let mut trips = Vec::new();
        while let Ok(t) = self.trips.try_recv() {
            trips.push(t);
        }
        match outcome {
            Ok(()) => Ok((trips, conn)),
            Err(e) if !trips.is_empty() => {
                tracing::warn!(error = %e, "the lock guard failed after it tripped");
                Ok((trips, None))
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One guard's polling, on its own task.
struct Poll {
    migration_pid: i32,
    period: Duration,
    budget: Duration,
    /// The migration's blockers at the last poll that saw it waiting.
    seen: Arc<Mutex<Vec<Blocker>>>,
    trip_tx: mpsc::UnboundedSender<GuardTrip>,
}

impl Poll {
    /// Whether a queue whose longest wait is `longest_wait_ms` must be released now: the
    /// next poll would see it past the budget.
    fn must_trip(&self, longest_wait_ms: u64) -> bool {
        let budget = u64::try_from(self.budget.as_millis()).unwrap_or(u64::MAX);
        let period = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        longest_wait_ms.saturating_add(period) > budget
    }

    async fn run(
        self,
        mut conn: PgConnection,
        mut stopped: oneshot::Receiver<()>,
        observer: Option<&dyn QueueObserver>,
        rest: &mut QueueSeen,
    ) -> (Result<(), LocksError>, Option<PgConnection>) {
        let migration_pid = self.migration_pid;
        // The first look comes one period in, not at once: nobody can have queued behind a
        // statement for `max_blocking` before it has run for a fifth of that (a queue left
        // from the transaction's earlier statements was watched by their watches), and
        // most migration statements end well within a period, so they cost the server
        // nothing here.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.period, self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut armed = true;
        let mut bounded = false;
        let result = loop {
            tokio::select! {
                _ = &mut stopped => break Ok(()),
                _ = tick.tick() => {}
            }
            if !bounded {
                // Each poll must stay cheap; a poll that cannot finish quickly is skipped.
                if let Err(e) = sqlx::query("SET statement_timeout = '2s'")
                    .execute(&mut conn)
                    .await
                {
                    break Err(LocksError::query("set statement_timeout")(e));
                }
                bounded = true;
            }
            let (queue, here) = match queue_behind(&mut conn, migration_pid).await {
                Ok(q) => q,
                Err(e) => break Err(e),
            };
            if let Some(o) = observer {
                o.seen(here.all);
            }
            *rest = here.rest;
            if !queue.blockers.is_empty() {
                *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = queue.blockers.clone();
            }
            if queue.queued.is_empty() {
                armed = true;
                continue;
            }
            if !armed || !self.must_trip(queue.longest_wait_ms) {
                continue;
            }
            let sent = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
                .bind(migration_pid)
                .fetch_one(&mut conn)
                .await;
            armed = false;
            let trip = GuardTrip {
                at: Utc::now(),
                migration_pid,
                blocked_sessions: queue.queued,
                longest_wait_ms: queue.longest_wait_ms,
                blockers_of_migration: queue.blockers_of_migration,
                blockers: queue.blockers,
                cancelled: matches!(sent, Ok(true)),
            };
            if let Err(e) = sent {
                // The signal may have gone out before the guard's own session failed
                // (the migration then fails with 57014): the trip is reported either
                // way, so the executor can tell a guard's cancel from any other.
                let _ = self.trip_tx.send(trip);
                break Err(LocksError::Query {
                    what: "pg_cancel_backend",
                    source: e,
                });
            }
            // Info, not a warning: the executor reports the trip as an event (the CLI
            // prints its own line for it); a daemon's log still has this at its default.
            tracing::info!(
                migration_pid,
                blocked = trip.blocked_sessions.len(),
                longest_wait_ms = trip.longest_wait_ms,
                blockers = ?trip.blockers_of_migration,
                "lock guard cancelled the migration statement"
            );
            let _ = self.trip_tx.send(trip);
        };
        if result.is_err() {
            // The connection may be what failed: never hand it out again.
            let _ = conn.close().await;
            return (result, None);
        }
        (result, Some(conn))
    }
}

#[derive(Debug, Default)]
struct Queue {
    queued: Vec<i32>,
    longest_wait_ms: u64,
    blockers_of_migration: Vec<i32>,
    blockers: Vec<Blocker>,
}

/// pid, leader, blocked_by, waiting_ms, the migration's blockers described (JSON), in
/// the guard's database.
type QueueRow = (
    i32,
    i32,
    Vec<i32>,
    Option<i64>,
    Option<String>,
    Option<bool>,
);

/// The lock waits of the guard's database: all of them, and the rest once the migration
/// and the sessions queued behind it are left out.
#[derive(Debug, Clone, Copy, Default)]
struct Here {
    all: QueueSeen,
    rest: QueueSeen,
}

/// The queue behind the migration, and the lock waits of the guard's database.
async fn queue_behind(
    conn: &mut PgConnection,
    migration_pid: i32,
) -> Result<(Queue, Here), LocksError> {
    let rows: Vec<QueueRow> = sqlx::query_as(QUEUE_SQL)
        .bind(migration_pid)
        .bind(i32::try_from(QUERY_EXCERPT_CHARS).unwrap_or(i32::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(LocksError::query("lock queue"))?;
    let described = rows
        .iter()
        .find_map(|r| r.4.as_deref())
        .map(serde_json::from_str::<Vec<Blocker>>)
        .transpose()?
        .unwrap_or_default();
    let mut here: HashMap<i32, u64> = HashMap::new();
    for r in rows.iter().filter(|r| r.5 == Some(true)) {
        let w = r.3.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        let e = here.entry(r.1).or_default();
        *e = (*e).max(w);
    }
    let plain: Vec<(i32, i32, Vec<i32>, Option<i64>)> =
        rows.into_iter().map(|r| (r.0, r.1, r.2, r.3)).collect();
    let mut q = queue_from_rows(migration_pid, &plain);
    q.blockers = described;
    let seen = |waits: &mut dyn Iterator<Item = u64>| {
        waits.fold(QueueSeen::default(), |s, w| QueueSeen {
            waiting: s.waiting + 1,
            longest_wait_ms: s.longest_wait_ms.max(w),
        })
    };
    let all = seen(&mut here.values().copied());
    let rest = seen(
        &mut here
            .iter()
            .filter(|(p, _)| **p != migration_pid && q.queued.binary_search(p).is_err())
            .map(|(_, w)| *w),
    );
    Ok((q, Here { all, rest }))
}

/// Sessions waiting (directly or through other waiters) for `migration_pid`, parallel
/// workers counted as their leader.
fn queue_from_rows(migration_pid: i32, rows: &[(i32, i32, Vec<i32>, Option<i64>)]) -> Queue {
    let mut waits_for: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    let mut waited: HashMap<i32, u64> = HashMap::new();
    let leader: HashMap<i32, i32> = rows.iter().map(|r| (r.0, r.1)).collect();
    let canon = |p: i32| leader.get(&p).copied().unwrap_or(p);
    let mut blockers_of_migration = BTreeSet::new();
    for (pid, lead, blocked_by, waiting_ms) in rows {
        let w = waiting_ms.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        if *lead == migration_pid {
            blockers_of_migration.extend(
                blocked_by
                    .iter()
                    .map(|b| canon(*b))
                    .filter(|b| *b != migration_pid),
            );
            continue;
        }
        let _ = pid;
        let e = waited.entry(*lead).or_default();
        *e = (*e).max(w);
        waits_for
            .entry(*lead)
            .or_default()
            .extend(blocked_by.iter().map(|b| canon(*b)));
    }
    // Everyone whose waits-for chain reaches the migration.
    let mut behind: BTreeSet<i32> = BTreeSet::new();
    let mut frontier = vec![migration_pid];
    while let Some(p) = frontier.pop() {
        for (w, set) in &waits_for {
            if set.contains(&p) && *w != migration_pid && behind.insert(*w) {
                frontier.push(*w);
            }
        }
    }
    let longest = behind
        .iter()
        .filter_map(|p| waited.get(p).copied())
        .max()
        .unwrap_or(0);
    Queue {
        queued: behind.into_iter().collect(),
        longest_wait_ms: longest,
        blockers_of_migration: blockers_of_migration.into_iter().collect(),
        blockers: Vec::new(),
    }
}

/// The sessions `pid` waits for right now (`pg_blocking_pids`, deduplicated and sorted;
/// empty when it waits for no lock).
pub async fn blockers_of(conn: &mut PgConnection, pid: i32) -> Result<Vec<i32>, LocksError> {
    let mut v: Vec<i32> = sqlx::query_scalar("SELECT pg_blocking_pids($1)")
        .bind(pid)
        .fetch_one(&mut *conn)
        .await
        .map_err(LocksError::query("pg_blocking_pids"))?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// A session for the guard's own queries ([`wait_until_gone`], [`describe_sessions`],
/// [`LockGuard::start_on`]), named [`GUARD_APPLICATION`] in `pg_stat_activity`.
pub async fn guard_session(url: &DatabaseUrl) -> Result<PgConnection, LocksError> {
    connect(url, GUARD_APPLICATION).await
}

/// `pg_stat_activity` of the given pids, for naming them to a person.
const DESCRIBE_SQL: &str = r#"
SELECT pid, usename::text, application_name, datname::text, host(client_addr), state,
       CASE WHEN wait_event IS NULL THEN NULL ELSE wait_event_type || ':' || wait_event END,
       backend_type,
       (extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint,
       (extract(epoch FROM clock_timestamp() - xact_start) * 1000)::bigint,
       (extract(epoch FROM clock_timestamp() - state_change) * 1000)::bigint,
       left(query, $2)
FROM pg_stat_activity WHERE pid = ANY($1) ORDER BY pid
"#;

type DescribeRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// Who the sessions `pids` are and what they are doing (user, application, state, how
/// long their transaction has been open, a query excerpt), so a message can name a
/// blocker rather than just its pid. Sessions that have gone are left out.
pub async fn describe_sessions(
    conn: &mut PgConnection,
    pids: &[i32],
) -> Result<Vec<SessionInfo>, LocksError> {
    if pids.is_empty() {
        return Ok(Vec::new());
    }
    let ms = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    let rows: Vec<DescribeRow> = sqlx::query_as(DESCRIBE_SQL)
        .bind(pids)
        .bind(i32::try_from(QUERY_EXCERPT_CHARS).unwrap_or(i32::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(LocksError::query("describe sessions"))?;
    Ok(rows
        .into_iter()
        .map(|r| SessionInfo {
            pid: r.0,
            user: r.1,
            application: r.2.filter(|a| !a.is_empty()),
            database: r.3,
            client_addr: r.4,
            state: r.5,
            wait_event: r.6,
            backend_type: r.7,
            query_ms: ms(r.8),
            xact_ms: ms(r.9),
            state_ms: ms(r.10),
            query: r.11,
        })
        .collect())
}

/// How [`wait_until_gone`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WaitOutcome {
    /// Every session has ended its transaction (or disconnected). `ended_ms`: for each
    /// that was in one when the wait began, how long into the wait a poll found it ended,
    /// by pid: for sessions granted their lock just before the wait, about how long they
    /// held it (to the 10 ms of a poll; longer when they first queued behind another).
    Gone {
        waited_ms: u64,
        ended_ms: Vec<(i32, u64)>,
    },
    /// The timeout passed; these are still in the transaction they were in at the start.
    TimedOut { remaining: Vec<i32> },
}

/// Every round trip of the wait is one read of `pg_stat_activity` for a few pids: cheap
/// enough to poll often, and each millisecond of it is a millisecond later the migration
/// lands after its blockers leave.
const GONE_POLL: Duration = Duration::from_millis(10);

/// The transaction of each session: `(backend_start, xact_start)` in microseconds. A
/// session is "gone" once that changes (it disconnected, or finished the transaction that
/// held the lock; a pid reused by a new backend has another backend_start).
const XACT_SQL: &str = r#"
SELECT pid,
       (extract(epoch FROM backend_start) * 1000000)::bigint,
       (extract(epoch FROM xact_start) * 1000000)::bigint
FROM pg_stat_activity WHERE pid = ANY($1)
"#;

/// Waits until every session in `pids` has finished the transaction it is in now (or
/// disconnected), polling every 10 ms, for at most `timeout`. Sessions not in a
/// transaction at the start count as gone. This is what lets the executor retry the
/// moment its blockers are gone instead of after a blind backoff.
pub async fn wait_until_gone(
    conn: &mut PgConnection,
    pids: &[i32],
    timeout: Duration,
) -> Result<WaitOutcome, LocksError> {
    let start = Instant::now();
    let pids: Vec<i32> = pids.iter().copied().filter(|p| *p != 0).collect();
    let fetch = |rows: Vec<(i32, Option<i64>, Option<i64>)>| -> HashMap<i32, (Option<i64>, i64)> {
        rows.into_iter()
            .filter_map(|(pid, backend, xact)| xact.map(|x| (pid, (backend, x))))
            .collect()
    };
    let initial = fetch(
        sqlx::query_as(XACT_SQL)
            .bind(&pids)
            .fetch_all(&mut *conn)
            .await
            .map_err(LocksError::query("session transactions"))?,
    );
    let mut ended_ms: Vec<(i32, u64)> = Vec::new();
    loop {
        let now = fetch(
            sqlx::query_as(XACT_SQL)
                .bind(&pids)
                .fetch_all(&mut *conn)
                .await
                .map_err(LocksError::query("session transactions"))?,
        );
        let elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut remaining: Vec<i32> = Vec::new();
        for (pid, key) in &initial {
            if now.get(pid) == Some(key) {
                remaining.push(*pid);
            } else if !ended_ms.iter().any(|(p, _)| p == pid) {
                ended_ms.push((*pid, elapsed_ms));
            }
        }
        if remaining.is_empty() {
            ended_ms.sort_unstable();
            return Ok(WaitOutcome::Gone {
                waited_ms: elapsed_ms,
                ended_ms,
            });
        }
        if start.elapsed() >= timeout {
            let mut remaining = remaining;
            remaining.sort_unstable();
            return Ok(WaitOutcome::TimedOut { remaining });
        }
        tokio::time::sleep(GONE_POLL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
}

/// The statement [`ripe_wait_sql`] builds: `{AGE_MS}`, `{WITHIN_MS}` and `{RELATIONS}`
/// are filled in (the names last, so none can be taken for a placeholder). It runs in the
/// migration's transaction, right after its `BEGIN`. Within one transaction
/// `pg_stat_activity` is a snapshot taken at its first read, so every round clears it;
/// `pg_locks` is read afresh each time. It never waits longer than half the session's
/// `statement_timeout` (or, on PostgreSQL ≥ 17, `transaction_timeout`), so the wait itself
/// is never what times out. Only client backends count: autovacuum gives way to DDL by
/// itself. Sessions whose activity the role may not see (other roles', without
/// `pg_read_all_stats`) show no `xact_start` and do not count either: the wait is then
/// shorter, never longer. A round reads `pg_locks` (briefly taking every lock-table
/// partition's lock), so it polls every 2 ms, not faster.
const RIPE_WAIT_SQL: &str = r#"DO $belay_ripe_wait$
DECLARE
  deadline timestamptz := clock_timestamp() + interval '{WITHIN_MS} milliseconds';
  bound text;
  youngest float8;
BEGIN
  FOREACH bound IN ARRAY ARRAY[current_setting('statement_timeout'),
                               coalesce(current_setting('transaction_timeout', true), '0')] LOOP
    IF bound <> '0' THEN
      deadline := least(deadline, clock_timestamp() + bound::interval / 2);
    END IF;
  END LOOP;
  LOOP
    PERFORM pg_stat_clear_snapshot();
    SELECT extract(epoch FROM clock_timestamp() - max(a.xact_start)) * 1000 INTO youngest
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'relation' AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.relation = ANY (ARRAY(SELECT to_regclass(r)::oid FROM unnest(ARRAY[{RELATIONS}]::text[]) AS r))
       AND l.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
       AND a.backend_type = 'client backend';
    EXIT WHEN youngest IS NULL OR youngest >= {AGE_MS} OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(0.002);
  END LOOP;
END
$belay_ripe_wait$"#;

/// A statement that waits, for at most `within`, until every other session holding a
/// granted lock on `relations` (as a trip names them, `public.accounts`) is at least
/// `age` into its transaction, polling on the server. Run right after a retry's `BEGIN`,
/// in the same message as the script: when the application's transactions last at most
/// `age` plus the lock guard's trip point, the script's first lock request then queues
/// behind all of them for less than that, and no client round trip lies between the
/// moment chosen and that request (a client's separate retry arrives
/// milliseconds later, by which time a busy application has begun new ones). `None`
/// when there is nothing to wait for, or a name could not be quoted safely.
pub fn ripe_wait_sql(relations: &[String], age: Duration, within: Duration) -> Option<String> {
    if relations.is_empty() || age.is_zero() || within.is_zero() {
        return None;
    }
    // Names come from `regclass::text`; one that could close the literal or the body's
    // dollar quote is left out of the wait altogether.
    if relations.iter().any(|r| r.contains(['$', '\\', '\0'])) {
        return None;
    }
    let list: Vec<String> = relations
        .iter()
        .map(|r| format!("'{}'", r.replace('\'', "''")))
        .collect();
    Some(
        RIPE_WAIT_SQL
            .replace("{AGE_MS}", &age.as_millis().to_string())
            .replace("{WITHIN_MS}", &within.as_millis().to_string())
            .replace("{RELATIONS}", &list.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_transitive_and_ignores_other_chains() {
        // migration 10 waits for 1; 20 waits for 10; 30 waits for 20 (soft); 40 waits for 1 only.
        let rows = vec![
            (10, 10, vec![1], Some(900)),
            (20, 20, vec![10, 1], Some(300)),
            (30, 30, vec![20], Some(100)),
            (40, 40, vec![1], Some(5000)),
        ];
        let q = queue_from_rows(10, &rows);
        assert_eq!(q.queued, vec![20, 30]);
        assert_eq!(q.longest_wait_ms, 300);
        assert_eq!(q.blockers_of_migration, vec![1]);
    }

    #[test]
    fn workers_count_as_their_leader() {
        let rows = vec![(21, 20, vec![10], Some(700)), (20, 20, vec![10], Some(600))];
        let q = queue_from_rows(10, &rows);
        assert_eq!(q.queued, vec![20]);
        assert_eq!(q.longest_wait_ms, 700);
    }

    #[test]
    fn nobody_behind_means_empty() {
        let rows = vec![(10, 10, vec![1], Some(900))];
        let q = queue_from_rows(10, &rows);
        assert!(q.queued.is_empty());
        assert_eq!(q.blockers_of_migration, vec![1]);
    }
}
