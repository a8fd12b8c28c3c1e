//! The lock guard wired into the executor, against a real PostgreSQL: application
//! sessions run short transactions on `t` while a blocker holds a lock on it and a
//! migration queues behind the blocker (with a long `lock_timeout`, so only the guard can
//! release the application).

use belay_core::DatabaseUrl;
use belay_guards::LockGuardAdapter;
use belay_history::{History, HistoryRow, RowState};
use belay_migrate::{
    ApiError, BlockersGone, Event, EventKind, ExecConfig, LockGuardHook, LockWatch, MigrateError,
    Migrator, RunReport, Target, load,
};
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Generous bounds on awaiting what must happen; reaching one fails the test instead of
/// hanging it.
const SOON: Duration = Duration::from_secs(20);

async fn setup() -> R<(TestDb, PgConnection)> {
    let db = Cluster::shared().create_database().await?;
    let mut c = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 100)",
    )
    .execute(&mut c)
    .await?;
    Ok((db, c))
}

/// A session holding ACCESS SHARE on `t` in an open transaction: it blocks the
/// migration's ALTER TABLE, not the application.
async fn blocker(url: &str) -> R<(PgConnection, i32)> {
    let mut c = PgConnection::connect(url).await?;
    let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await?;
    // Its last query is what a message about it shows.
    sqlx::raw_sql("SET application_name = 'nightly-report'; BEGIN; SELECT count(*) FROM t")
        .execute(&mut c)
        .await?;
    Ok((c, pid))
}

/// pgbench-like application sessions: each loops over short SELECT + UPDATE transactions
/// on its own row, publishing how many it has completed and recording each one's latency.
struct App {
    done: Vec<watch::Receiver<u64>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), sqlx::Error>>>,
}

impl App {
    async fn start(url: &str, sessions: i32) -> R<App> {
        let (stop, stopped) = watch::channel(false);
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut done = Vec::new();
        let mut tasks = Vec::new();
        for id in 1..=sessions {
            let mut c = PgConnection::connect(url).await?;
            sqlx::raw_sql("SET application_name = 'app'")
                .execute(&mut c)
                .await?;
            let (tx, rx) = watch::channel(0u64);
            done.push(rx);
            let stopped = stopped.clone();
            let latencies = latencies.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !*stopped.borrow() {
                    let started = Instant::now();
                    let mut tx_ = c.begin().await?;
                    sqlx::query("SELECT n FROM t WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx_)
                        .await?;
                    sqlx::query("UPDATE t SET n = n + 1 WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx_)
                        .await?;
                    tx_.commit().await?;
                    if let Ok(mut l) = latencies.lock() {
                        l.push(started.elapsed());
                    }
                    n += 1;
                    tx.send_replace(n);
                    // Think time, so the sessions do not saturate the two CPUs the
                    // whole test suite shares.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            }));
        }
        Ok(App {
            done,
            latencies,
            stop,
            tasks,
        })
    }

    /// Waits until every session has completed a transaction after this call.
    async fn all_complete_another(&mut self) -> R<()> {
        for rx in &mut self.done {
            let before = *rx.borrow_and_update();
            tokio::time::timeout(SOON, rx.wait_for(|n| *n > before))
                .await
                .map_err(|_| "an application session stayed stuck behind the migration")??;
        }
        Ok(())
    }

    async fn finish(self) -> R<Vec<Duration>> {
        self.stop.send_replace(true);
        for t in self.tasks {
            t.await??;
        }
        let l = self.latencies.lock().map_err(|_| "poisoned")?.clone();
        Ok(l)
    }
}

fn migrations(files: &[(&str, &str)]) -> R<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    for (name, body) in files {
        std::fs::write(d.path().join(name), body)?;
    }
    Ok(d)
}

/// A `migrate` running in a task, and its events.
type Running = (
    JoinHandle<Result<RunReport, MigrateError>>,
    mpsc::UnboundedReceiver<Event>,
);

/// Runs `migrate` in a task, its events forwarded to a channel.
fn migrate(db: &TestDb, dir: &std::path::Path, config: ExecConfig) -> R<Running> {
    let guard = Arc::new(LockGuardAdapter::new(DatabaseUrl::parse(&db.url)?));
    migrate_guarded(db, dir, config, guard)
}

fn migrate_guarded(
    db: &TestDb,
    dir: &std::path::Path,
    config: ExecConfig,
    guard: Arc<dyn LockGuardHook>,
) -> R<Running> {
    let url = DatabaseUrl::parse(&db.url)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = Arc::new(move |e: &Event| {
        let _ = tx.send(e.clone());
    });
    let m = Migrator::new(url, load(dir)?, config, sink)?.with_lock_guard(guard);
    Ok((
        tokio::spawn(async move { m.migrate(&Target::default()).await }),
        rx,
    ))
}

/// The next event `pick` accepts (others are skipped).
async fn next_event<T>(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    what: &str,
    pick: impl Fn(&EventKind) -> Option<T>,
) -> R<T> {
    tokio::time::timeout(SOON, async {
        while let Some(e) = rx.recv().await {
            if let Some(t) = pick(&e.kind) {
                return Ok(t);
            }
        }
        Err(format!("the run ended without {what}").into())
    })
    .await
    .map_err(|_| format!("no {what} within {SOON:?}"))?
}

fn trip_of(k: &EventKind) -> Option<(u32, u32, u64, Vec<i32>, bool)> {
    match k {
        EventKind::LockGuardTripped {
            attempt,
            blocked_sessions,
            longest_wait_ms,
            blockers,
            cancelled,
            ..
        } => Some((
            *attempt,
            *blocked_sessions,
            *longest_wait_ms,
            blockers.clone(),
            *cancelled,
        )),
        _ => None,
    }
}

async fn column_exists(c: &mut PgConnection, name: &str) -> R<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM information_schema.columns WHERE table_name = 't' AND column_name = $1)",
    )
    .bind(name)
    .fetch_one(c)
    .await?)
}

async fn rows(c: &mut PgConnection) -> R<Vec<HistoryRow>> {
    Ok(History::new("belay")?.rows(c).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guard_releases_the_application_and_the_migration_lands_after_the_blocker() -> R<()> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[(
        "V1__add_c.sql",
        "-- belay:lock-timeout=30s\n\
         -- belay:allow=volatile-default the column has no default at all\n\
         ALTER TABLE t ADD COLUMN c int;\n",
    )])?;
    let (mut blocker, blocker_pid) = blocker(&db.url).await?;
    let mut app = App::start(&db.url, 4).await?;
    app.all_complete_another().await?;

    let config = ExecConfig::default();
    assert_eq!(
        config.max_blocking,
        Duration::from_millis(50),
        "the default"
    );
    let (run, mut events) = migrate(&db, dir.path(), config)?;

    // The migration queues behind the blocker and the application behind the
    // migration, until the guard cancels the migration's statement.
    let (attempt, blocked, longest, blockers, cancelled) =
        next_event(&mut events, "a lock guard trip", trip_of).await?;
    assert_eq!(attempt, 1);
    assert!(blocked >= 1, "application sessions were queued behind it");
    // The guard polls every 10 ms at this budget and trips at the last poll before a
    // wait would pass it: not before 40 ms.
    assert!(
        longest > 40,
        "tripped only when the next poll would be past max_blocking: {longest} ms"
    );
    assert_eq!(blockers, vec![blocker_pid]);
    assert!(cancelled);

    // The application flows again while the blocker still holds its lock, and the
    // executor waits for the blocker instead of queueing again.
    app.all_complete_another().await?;
    app.all_complete_another().await?;
    let blocker_state: String =
        sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
            .bind(blocker_pid)
            .fetch_one(&mut admin)
            .await?;
    assert_eq!(blocker_state, "idle in transaction");
    assert!(!column_exists(&mut admin, "c").await?, "not applied yet");
    assert!(!run.is_finished());

    // Once the blocker's transaction ends, the migration lands.
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    let report = tokio::time::timeout(SOON, run).await???;
    assert_eq!(report.results.len(), 1);
    assert!(report.results[0].retries >= 1, "{report:?}");
    assert!(column_exists(&mut admin, "c").await?);
    app.all_complete_another().await?;
    let latencies = app.finish().await?;
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} application transactions, the slowest {worst:?}",
        latencies.len()
    );

    let rows = rows(&mut admin).await?;
    let row = rows.last().ok_or("no history row")?;
    assert_eq!(row.state, RowState::Success);
    assert!(row.lock_trips >= 1, "{row:?}");
    let notes = row.notes.as_ref().ok_or("no notes")?;
    let trips = notes["lock_guard_trips"]
        .as_array()
        .ok_or("no trips in the notes")?;
    assert_eq!(trips.len(), usize::try_from(row.lock_trips)?);
    let first = &trips[0];
    assert_eq!(first["blockers"][0]["pid"], blocker_pid);
    assert_eq!(first["blockers"][0]["application"], "nightly-report");
    assert!(
        first["blockers"][0]["query"]
            .as_str()
            .is_some_and(|q| q.contains("SELECT count(*) FROM t")),
        "{first}"
    );
    assert!(first["blocked_sessions"].as_u64().is_some_and(|n| n >= 1));
    // Recorded as the trip saw it: past the last poll before the budget (see above).
    assert!(
        first["longest_wait_ms"].as_u64().is_some_and(|n| n > 40),
        "{first}"
    );
    assert!(first["at"].is_string());
    assert_eq!(first["line"], 3);
    assert_eq!(
        notes["allowed_lint"]["volatile-default"],
        "the column has no default at all"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_attempts_name_the_blocker_and_apply_nothing() -> R<()> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[(
        "V1__add_c.sql",
        "-- belay:lock-timeout=30s\nALTER TABLE t ADD COLUMN c int;\n",
    )])?;
    let (mut blocker, blocker_pid) = blocker(&db.url).await?;
    let mut app = App::start(&db.url, 2).await?;
    app.all_complete_another().await?;

    let config = ExecConfig {
        max_blocking: Duration::from_millis(200),
        max_attempts: 2,
        // Less than the blocker will hold its lock: waiting it out runs out of budget.
        max_lock_wait: Duration::from_secs(2),
        ..ExecConfig::default()
    };
    let (run, mut events) = migrate(&db, dir.path(), config)?;
    let (_, _, _, blockers, _) = next_event(&mut events, "a lock guard trip", trip_of).await?;
    assert_eq!(blockers, vec![blocker_pid]);
    let err = tokio::time::timeout(SOON, run)
        .await??
        .err()
        .ok_or("the migration must fail while the blocker stays")?;
    let text = err.to_string();
    assert!(matches!(err, MigrateError::LockGuardExhausted(_)), "{text}");
    assert_eq!(err.kind(), belay_migrate::ErrorKind::MigrationFailed);
    for want in [
        "V1__add_c.sql:2",
        &format!("pid {blocker_pid}"),
        "app \"nightly-report\"",
        "holds AccessShareLock on t",
        "SELECT count(*) FROM t",
        "--max-attempts 2",
        "--max-lock-wait 2s",
        "--max-blocking 200ms",
        "nothing of it was applied",
    ] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    let failed = next_event(&mut events, "the failure event", |k| match k {
        EventKind::Failed { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(failed, text);

    // The application was released and keeps going; nothing was applied, and a failed
    // transactional migration leaves no history row.
    app.all_complete_another().await?;
    assert!(!column_exists(&mut admin, "c").await?);
    assert!(rows(&mut admin).await?.is_empty());
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    app.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_no_transaction_script_retries_just_the_cancelled_statement() -> R<()> {
    let (db, mut admin) = setup().await?;
    // The first statement must run exactly once: a retry of the whole script would fail
    // on the table that already exists.
    let dir = migrations(&[(
        "V1__two_steps.sql",
        "-- belay:no-transaction\n-- belay:lock-timeout=30s\n\
         CREATE TABLE u (id int);\n\
         ALTER TABLE t ADD COLUMN c int;\n",
    )])?;
    let (mut blocker, blocker_pid) = blocker(&db.url).await?;
    let mut app = App::start(&db.url, 2).await?;
    app.all_complete_another().await?;
    let (run, mut events) = migrate(
        &db,
        dir.path(),
        ExecConfig {
            max_blocking: Duration::from_millis(200),
            ..ExecConfig::default()
        },
    )?;
    let (_, _, _, blockers, cancelled) =
        next_event(&mut events, "a lock guard trip", trip_of).await?;
    assert_eq!(blockers, vec![blocker_pid]);
    assert!(cancelled);
    app.all_complete_another().await?;
    // Meanwhile the history shows the migration running, as for any no-transaction one.
    let running = rows(&mut admin).await?;
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].state, RowState::Running);

    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    let report = tokio::time::timeout(SOON, run).await???;
    assert!(report.results[0].retries >= 1);
    assert!(column_exists(&mut admin, "c").await?);
    app.finish().await?;
    let rows = rows(&mut admin).await?;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.state, RowState::Success);
    assert!(row.lock_trips >= 1);
    let notes = row.notes.as_ref().ok_or("no notes")?;
    assert_eq!(
        notes["lock_guard_trips"][0]["blockers"][0]["pid"],
        blocker_pid
    );
    assert_eq!(notes["lock_guard_trips"][0]["line"], 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_holding_its_lock_too_long_is_cancelled_and_named_as_the_cause() -> R<()> {
    let (db, mut admin) = setup().await?;
    // Nothing blocks this migration: it takes its lock at once, then keeps it while it
    // works, and the application queues behind it.
    let dir = migrations(&[(
        "V1__slow.sql",
        "ALTER TABLE t ADD COLUMN c int;\nSELECT pg_sleep(30);\n",
    )])?;
    let mut app = App::start(&db.url, 2).await?;
    app.all_complete_another().await?;
    let (run, mut events) = migrate(
        &db,
        dir.path(),
        ExecConfig {
            max_blocking: Duration::from_millis(200),
            max_attempts: 1,
            ..ExecConfig::default()
        },
    )?;
    let (_, blocked, _, blockers, cancelled) =
        next_event(&mut events, "a lock guard trip", trip_of).await?;
    assert!(blocked >= 1);
    assert!(
        blockers.is_empty(),
        "nobody blocked the migration: {blockers:?}"
    );
    assert!(cancelled);
    let err = tokio::time::timeout(SOON, run)
        .await??
        .err()
        .ok_or("with one attempt allowed, the trip ends the run")?
        .to_string();
    for want in [
        "V1__slow.sql:2",
        "gave up after 1 attempt(s)",
        "Nothing blocked the migration",
        "nothing of it was applied",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    app.all_complete_another().await?;
    assert!(
        !column_exists(&mut admin, "c").await?,
        "rolled back with the sleep"
    );
    app.finish().await?;
    Ok(())
}

/// The adapter behind a counter of what the executor asks of it. Without
/// `forward_prepare` the guard looks ready at the start of the run, as one whose
/// connection is lost mid-run does: its first watch is where it fails.
struct Counting {
    inner: LockGuardAdapter,
    forward_prepare: bool,
    prepares: AtomicU32,
    watches: AtomicU32,
}

#[async_trait::async_trait]
impl LockGuardHook for Counting {
    async fn prepare(&self) -> Result<(), ApiError> {
        self.prepares.fetch_add(1, Ordering::Relaxed);
        if self.forward_prepare {
            self.inner.prepare().await
        } else {
            Ok(())
        }
    }

    async fn watch(
        &self,
        backend_pid: i32,
        max_blocking: Duration,
    ) -> Result<Box<dyn LockWatch>, ApiError> {
        self.watches.fetch_add(1, Ordering::Relaxed);
        self.inner.watch(backend_pid, max_blocking).await
    }

    async fn wait_until_gone(
        &self,
        pids: &[i32],
        timeout: Duration,
    ) -> Result<BlockersGone, ApiError> {
        self.inner.wait_until_gone(pids, timeout).await
    }
}

/// Runs a multi-statement transactional migration and a no-transaction one with `hook`
/// as the guard; returns the run's events and the history rows.
async fn run_with_guard(hook: Arc<Counting>) -> R<(Vec<Event>, Vec<HistoryRow>)> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[
        (
            "V1__three.sql",
            "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\nALTER TABLE t ADD COLUMN c int;\n",
        ),
        (
            "V2__two.sql",
            "-- belay:no-transaction\nCREATE TABLE d (id int);\nCREATE INDEX CONCURRENTLY t_n ON t (n);\nCREATE TABLE e (id int);\n",
        ),
    ])?;
    let url = DatabaseUrl::parse(&db.url)?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let sink = Arc::new(move |e: &Event| {
        if let Ok(mut v) = seen.lock() {
            v.push(e.clone());
        }
    });
    let m =
        Migrator::new(url, load(dir.path())?, ExecConfig::default(), sink)?.with_lock_guard(hook);
    let report = tokio::time::timeout(SOON, m.migrate(&Target::default())).await??;
    assert_eq!(report.results.len(), 2, "{report:?}");
    for table in ["a", "b", "d", "e"] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut admin)
            .await?;
        assert!(exists, "table {table} was created");
    }
    assert!(column_exists(&mut admin, "c").await?);
    let events = events.lock().map_err(|_| "poisoned")?.clone();
    Ok((events, rows(&mut admin).await?))
}

fn guard_warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Warning { message } if message.contains("lock guard") => {
                Some(message.clone())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guard_that_cannot_connect_is_off_for_the_whole_run_with_one_warning() -> R<()> {
    // A port nothing listens on: the guard's connect is refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let guard_url =
        DatabaseUrl::parse(&format!("postgres://guard:sekrit@127.0.0.1:{port}/nowhere"))?;
    let hook = Arc::new(Counting {
        inner: LockGuardAdapter::new(guard_url),
        forward_prepare: true,
        prepares: AtomicU32::new(0),
        watches: AtomicU32::new(0),
    });
    let (events, rows) = run_with_guard(hook.clone()).await?;

    // Tried once, before the first statement; no statement asked again.
    assert_eq!(hook.prepares.load(Ordering::Relaxed), 1);
    assert_eq!(hook.watches.load(Ordering::Relaxed), 0);
    let warnings = guard_warnings(&events);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("off for the rest of this run"),
        "{warnings:?}"
    );
    assert!(!warnings[0].contains("sekrit"), "{warnings:?}");
    // Every row the run wrote says it ran unguarded, and why.
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let why = row
            .notes
            .as_ref()
            .and_then(|n| n["lock_guard_off"].as_str())
            .ok_or_else(|| format!("no lock_guard_off note: {row:?}"))?;
        assert!(why.contains("lock guard"), "{why}");
        assert!(!why.contains("sekrit"), "{why}");
        assert_eq!(row.lock_trips, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guard_failing_mid_run_gives_up_once_after_its_connect_timeout() -> R<()> {
    // A server that accepts connections (the kernel completes the handshake) and never
    // answers: without a connect timeout the guard would wait forever at a statement,
    // with the migration's transaction open.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = silent.local_addr()?.port();
    let guard_url = DatabaseUrl::parse(&format!("postgres://guard@127.0.0.1:{port}/silent"))?;
    let hook = Arc::new(Counting {
        inner: LockGuardAdapter::new(guard_url),
        forward_prepare: false,
        prepares: AtomicU32::new(0),
        watches: AtomicU32::new(0),
    });
    let (events, rows) = run_with_guard(hook.clone()).await?;
    drop(silent);

    // Five watchable statements; only the first asked the guard, and it gave up after
    // its connect timeout instead of hanging the run.
    assert_eq!(hook.prepares.load(Ordering::Relaxed), 1);
    assert_eq!(hook.watches.load(Ordering::Relaxed), 1);
    let warnings = guard_warnings(&events);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("within 2s"), "{warnings:?}");
    assert!(
        rows.iter().all(|r| r
            .notes
            .as_ref()
            .is_some_and(|n| n["lock_guard_off"].is_string())),
        "{rows:?}"
    );
    Ok(())
}

/// Every event of a finished run, in order.
async fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<EventKind> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e.kind);
    }
    out
}

/// How long the session waiting for a lock on `t` has waited in its current attempt, as
/// the server reports it (`None`: nobody waits for `t`).
async fn waiting_on_t(admin: &mut PgConnection) -> R<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT (extract(epoch FROM clock_timestamp() - waitstart) * 1000)::bigint \
         FROM pg_locks WHERE NOT granted AND relation = 't'::regclass",
    )
    .fetch_optional(admin)
    .await?
    .flatten())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_blocker_belay_gives_way_to_the_queue_naming_the_blocker_and_lands_in_one_more_attempt()
-> R<()> {
    let (db, mut admin) = setup().await?;
    // No directive: the defaults decide (the guard's budget, lock_timeout only as the net).
    let dir = migrations(&[("V1__add_c.sql", "ALTER TABLE t ADD COLUMN c int;\n")])?;
    let (mut blocker, blocker_pid) = blocker(&db.url).await?;
    let mut app = App::start(&db.url, 4).await?;
    app.all_complete_another().await?;
    let (run, mut events) = migrate(&db, dir.path(), ExecConfig::default())?;

    // Belay gives way because the application queued behind it, not because of a timeout:
    // the first retry event is the guard's, naming the blocker as the poll saw it.
    let first = next_event(&mut events, "a retry event", |k| match k {
        EventKind::LockGuardTripped { .. } | EventKind::LockTimeout { .. } => Some(k.clone()),
        _ => None,
    })
    .await?;
    let EventKind::LockGuardTripped {
        attempt,
        blocked_sessions,
        blocked_by,
        cancelled,
        ..
    } = &first
    else {
        return Err(format!("gave way by lock_timeout, not to the queue: {first:?}").into());
    };
    assert_eq!(*attempt, 1);
    assert!(*blocked_sessions >= 1);
    assert!(*cancelled);
    assert_eq!(blocked_by.len(), 1, "{blocked_by:?}");
    let b = &blocked_by[0];
    assert_eq!(b.pid, blocker_pid);
    assert_eq!(b.application.as_deref(), Some("nightly-report"));
    assert_eq!(b.state.as_deref(), Some("idle in transaction"));
    assert_eq!(b.mode.as_deref(), Some("AccessShareLock"));
    assert_eq!(b.relation.as_deref(), Some("t"));
    assert!(b.xact_ms.is_some() && b.user.is_some(), "{b:?}");
    assert!(b.query.as_deref().is_some_and(|q| q.contains("count(*)")));
    let line = first.describe().ok_or("a trip has a line")?;
    assert!(
        line.contains(&format!(
            "blocked by pid {blocker_pid} (app \"nightly-report\", idle in transaction"
        )) && line.contains("holds AccessShareLock on t)"),
        "{line}"
    );

    // The application flows while the blocker still holds its lock: belay waits for the
    // blocker to leave instead of queueing again.
    app.all_complete_another().await?;
    app.all_complete_another().await?;
    assert!(!run.is_finished());

    // Meanwhile no blocking tree exists, yet the lock monitor, from a session of its own,
    // says whom belay's pending DDL waits for.
    let mut monitor = PgConnection::connect(&db.url).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut monitor)
        .await?;
    let deadline = Instant::now() + SOON;
    let pending = loop {
        let snap =
            belay_locks::snapshot(&mut monitor, &belay_locks::SnapshotOptions::default()).await?;
        // The sample is the server's: other tests' runs wait beside this one.
        let ours = |p: &belay_locks::PendingDdl| {
            p.blockers
                .iter()
                .any(|b| b.session.database.as_deref() == Some(database.as_str()))
        };
        if let Some(p) = snap.pending_ddl.into_iter().find(ours) {
            break p;
        }
        if Instant::now() > deadline {
            return Err("belay locks never showed the pending DDL".into());
        }
    };
    // The blocker, and any application session the cancel released still in the
    // transaction it queued in (it holds the table's lock until that ends).
    let named = pending
        .blockers
        .iter()
        .find(|b| b.session.pid == blocker_pid)
        .ok_or_else(|| format!("the blocker is not named: {pending:?}"))?;
    assert!(
        pending.blockers.iter().all(
            |b| b.session.pid == blocker_pid || b.session.application.as_deref() == Some("app")
        ),
        "{pending:?}"
    );
    let holds = named.holds.clone().unwrap_or_default();
    assert!(holds.contains("AccessShareLock on t"), "{holds}");
    assert_eq!(named.session.application.as_deref(), Some("nightly-report"));
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    let report = tokio::time::timeout(SOON, run).await???;
    // One more attempt after the blocker left: the one that landed.
    assert_eq!(report.results[0].retries, 1, "{report:?}");
    assert!(column_exists(&mut admin, "c").await?);
    let rest = drain(&mut events).await;
    assert!(
        !rest
            .iter()
            .any(|k| matches!(k, EventKind::LockTimeout { .. })),
        "{rest:?}"
    );
    app.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_blocker_with_nobody_queued_belay_waits_in_one_attempt() -> R<()> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[("V1__add_c.sql", "ALTER TABLE t ADD COLUMN c int;\n")])?;
    let (mut blocker, _) = blocker(&db.url).await?;
    let config = ExecConfig::default();
    let unguarded = config.lock_timeout;
    let (run, mut events) = migrate(&db, dir.path(), config)?;

    // One attempt waits for its lock several times as long as an unguarded one may:
    // nobody is queued behind it, so waiting costs no one.
    let goal = i64::try_from(unguarded.as_millis() * 5)?;
    let deadline = Instant::now() + SOON;
    loop {
        if waiting_on_t(&mut admin).await?.is_some_and(|ms| ms >= goal) {
            break;
        }
        if Instant::now() > deadline || run.is_finished() {
            return Err("the migration never waited that long in one attempt".into());
        }
        tokio::task::yield_now().await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    let report = tokio::time::timeout(SOON, run).await???;
    assert_eq!(report.results[0].retries, 0, "no retry churn: {report:?}");
    assert!(column_exists(&mut admin, "c").await?);
    let all = drain(&mut events).await;
    assert!(
        !all.iter().any(|k| matches!(
            k,
            EventKind::LockTimeout { .. } | EventKind::LockGuardTripped { .. }
        )),
        "{all:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lock_timeout_safety_net_names_the_blocker_in_its_event_and_final_error() -> R<()> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[("V1__add_c.sql", "ALTER TABLE t ADD COLUMN c int;\n")])?;
    let (mut blocker, blocker_pid) = blocker(&db.url).await?;
    let config = ExecConfig {
        guarded_lock_timeout: Duration::from_millis(300),
        max_attempts: 3,
        // Less than the blocker will hold its lock: waiting it out runs out of budget.
        max_lock_wait: Duration::from_secs(2),
        ..ExecConfig::default()
    };
    let (run, mut events) = migrate(&db, dir.path(), config)?;
    let (attempt, backoff_ms, blocked_by, line) =
        next_event(&mut events, "a lock timeout", |k| match k {
            EventKind::LockTimeout {
                attempt,
                backoff_ms,
                blocked_by,
                ..
            } => Some((*attempt, *backoff_ms, blocked_by.clone(), k.describe())),
            _ => None,
        })
        .await?;
    assert_eq!(attempt, 1);
    assert_eq!(backoff_ms, 0, "waits for the blocker, no blind backoff");
    assert_eq!(
        blocked_by.iter().map(|b| b.pid).collect::<Vec<_>>(),
        vec![blocker_pid]
    );
    assert_eq!(blocked_by[0].mode.as_deref(), Some("AccessShareLock"));
    let line = line.ok_or("a lock timeout has a line")?;
    assert!(
        line.contains(&format!(
            "blocked by pid {blocker_pid} (app \"nightly-report\""
        )) && line.contains("retrying as soon as the blocker has finished"),
        "{line}"
    );
    let err = tokio::time::timeout(SOON, run)
        .await??
        .err()
        .ok_or("the migration must fail while the blocker stays")?;
    let text = err.to_string();
    assert!(
        matches!(err, MigrateError::LockRetriesExhausted { .. }),
        "{text}"
    );
    for want in [
        "V1__add_c.sql:1",
        &format!("pid {blocker_pid} (app \"nightly-report\""),
        "holds AccessShareLock on t",
        "SELECT count(*) FROM t",
        "still in the same transaction",
    ] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    assert!(!column_exists(&mut admin, "c").await?);
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    Ok(())
}

/// A session of its own on `url`, and its pid.
async fn session_on(url: &str) -> R<(PgConnection, i32)> {
    let mut c = PgConnection::connect(url).await?;
    let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await?;
    Ok((c, pid))
}

/// The adapter, counting the ripe waits it hands the executor.
struct CountingRipeWaits {
    inner: LockGuardAdapter,
    ripe_waits: AtomicU32,
}

#[async_trait::async_trait]
impl LockGuardHook for CountingRipeWaits {
    async fn prepare(&self) -> Result<(), ApiError> {
        self.inner.prepare().await
    }

    async fn release(&self) {
        self.inner.release().await
    }

    async fn watch(
        &self,
        backend_pid: i32,
        max_blocking: Duration,
    ) -> Result<Box<dyn LockWatch>, ApiError> {
        self.inner.watch(backend_pid, max_blocking).await
    }

    async fn wait_until_gone(
        &self,
        pids: &[i32],
        timeout: Duration,
    ) -> Result<BlockersGone, ApiError> {
        let gone = self.inner.wait_until_gone(pids, timeout).await?;
        if gone.ripe_wait.is_some() {
            self.ripe_waits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(gone)
    }
}

/// A run whose ALTER queued behind `blocker`; a reader queued behind the ALTER, the guard
/// cancelled it, and the reader, released, keeps ACCESS SHARE in its open transaction.
/// Returns once the guard's session announces that the pending DDL waits for both.
struct Released {
    run: tokio::task::JoinHandle<Result<RunReport, belay_migrate::MigrateError>>,
    blocker: PgConnection,
    reader: PgConnection,
    guard: Arc<CountingRipeWaits>,
}

async fn trip_releasing_a_reader(db: &TestDb, admin: &mut PgConnection) -> R<Released> {
    let dir = migrations(&[("V1__add_r.sql", "ALTER TABLE t ADD COLUMN r int;\n")])?;
    let (blocker, blocker_pid) = blocker(&db.url).await?;
    let guard = Arc::new(CountingRipeWaits {
        inner: LockGuardAdapter::new(DatabaseUrl::parse(&db.url)?),
        ripe_waits: AtomicU32::new(0),
    });
    let (run, mut events) = migrate_guarded(db, dir.path(), ExecConfig::default(), guard.clone())?;
    let deadline = Instant::now() + SOON;
    while waiting_on_t(admin).await?.is_none() {
        assert!(Instant::now() < deadline, "the ALTER never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reader queues behind the ALTER; the guard's cancel lets it take ACCESS SHARE, which
    // its transaction keeps: it blocks the next attempt as much as the first blocker.
    let (mut reader, reader_pid) = session_on(&db.url).await?;
    let reading = tokio::spawn(async move {
        let r = sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
            .execute(&mut reader)
            .await
            .map(|_| ());
        (reader, r)
    });
    next_event(&mut events, "the guard's trip", trip_of).await?;
    let (reader, r) = tokio::time::timeout(SOON, reading).await??;
    r?;

    // The guard's session says whom the pending DDL waits for: both.
    let announced = |app: &str| {
        app.strip_prefix("belay-lock-guard: ")
            .and_then(|a| a.split_once(" waits for "))
            .map(|(_, pids)| {
                pids.split(',')
                    .filter_map(|p| p.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + SOON;
    loop {
        let apps: Vec<String> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_all(&mut *admin)
        .await?;
        if apps.iter().any(|a| {
            let pids = announced(a);
            pids.contains(&blocker_pid) && pids.contains(&reader_pid)
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "never announced both: {apps:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Released {
        run,
        blocker,
        reader,
        guard,
    })
}

/// The run of [`trip_releasing_a_reader`] lands on its one retry.
async fn lands_on_the_retry(
    run: tokio::task::JoinHandle<Result<RunReport, belay_migrate::MigrateError>>,
    admin: &mut PgConnection,
) -> R<()> {
    let report = tokio::time::timeout(SOON, run).await???;
    assert_eq!(report.results[0].retries, 1, "{report:?}");
    assert!(column_exists(admin, "r").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_trip_belay_also_waits_for_the_sessions_its_cancel_released() -> R<()> {
    let (db, mut admin) = setup().await?;
    let Released {
        run,
        mut blocker,
        mut reader,
        guard: _,
    } = trip_releasing_a_reader(&db, &mut admin).await?;
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    // Still waiting for the reader: the ALTER has not queued behind it.
    assert_eq!(waiting_on_t(&mut admin).await?, None);
    sqlx::raw_sql("COMMIT").execute(&mut reader).await?;
    lands_on_the_retry(run, &mut admin).await
}

/// The ripe wait only chooses a moment: where it cannot run (a database without
/// PL/pgSQL), the retry goes ahead without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_whose_ripe_wait_cannot_run_goes_ahead_without_it() -> R<()> {
    let (db, mut admin) = setup().await?;
    sqlx::raw_sql("DROP EXTENSION plpgsql")
        .execute(&mut admin)
        .await?;
    let Released {
        run,
        mut blocker,
        mut reader,
        guard,
    } = trip_releasing_a_reader(&db, &mut admin).await?;
    // The released reader holds its lock past the budget: the retry would wait.
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::raw_sql("COMMIT").execute(&mut reader).await?;
    lands_on_the_retry(run, &mut admin).await?;
    assert_eq!(
        guard.ripe_waits.load(Ordering::Relaxed),
        1,
        "the retry had a ripe wait"
    );
    Ok(())
}

/// The application's transactions outlast the budget: retrying the moment the blockers
/// left would queue behind a transaction just begun, and trip again. The retry waits, in
/// its own message right after BEGIN, until every holder of the table's locks is far
/// enough in to end within the budget, judged by how long the released reader held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_trip_the_retry_queues_only_once_the_holders_are_far_enough_in() -> R<()> {
    let (db, mut admin) = setup().await?;
    let Released {
        run,
        mut blocker,
        mut reader,
        guard,
    } = trip_releasing_a_reader(&db, &mut admin).await?;
    // The blocker leaves; the released reader holds its lock 400 ms (far past the
    // budget), and another transaction on t begins just before it ends.
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (mut young, young_pid) = session_on(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut young)
        .await?;
    sqlx::raw_sql("COMMIT").execute(&mut reader).await?;

    // The retry's ALTER queues behind the young transaction only once it is as far in as
    // the reader's hold, less the budget (about 350 ms); without the wait it would queue
    // within milliseconds.
    let deadline = Instant::now() + SOON;
    let age_when_queued: f64 = loop {
        let seen: Option<(f64, bool)> = sqlx::query_as(
            "SELECT (extract(epoch FROM clock_timestamp() - a.xact_start) * 1000)::float8, \
                    EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 't'::regclass) \
               FROM pg_stat_activity a WHERE a.pid = $1",
        )
        .bind(young_pid)
        .fetch_optional(&mut admin)
        .await?;
        match seen {
            Some((age, true)) => break age,
            Some(_) => {}
            None => return Err("the young transaction's session is gone".into()),
        }
        assert!(Instant::now() < deadline, "the retry never queued");
    };
    assert!(
        age_when_queued >= 300.0,
        "the retry queued when the holder was {age_when_queued} ms in"
    );
    sqlx::raw_sql("COMMIT").execute(&mut young).await?;
    lands_on_the_retry(run, &mut admin).await?;
    assert_eq!(guard.ripe_waits.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A guard whose watch cancels the migration's backend once the migration has committed
/// (the table its script creates is visible to others), as a real guard's cancel does
/// when it lands while the session reset after COMMIT runs, and reports the trip.
struct CancelAfterCommit {
    url: String,
}

struct LateCancel {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<Result<(), sqlx::Error>>,
}

#[async_trait::async_trait]
impl LockWatch for LateCancel {
    async fn stop(self: Box<Self>) -> Result<belay_migrate::WatchEnd, ApiError> {
        self.stop.store(true, Ordering::Relaxed);
        let polled = self.task.await;
        assert!(matches!(polled, Ok(Ok(()))), "{polled:?}");
        Ok(belay_migrate::WatchEnd {
            trips: vec![belay_migrate::LockTrip {
                at: chrono::Utc::now(),
                blocked_sessions: 1,
                longest_wait_ms: 45,
                blockers: Vec::new(),
            }],
            last_blockers: Vec::new(),
        })
    }
}

#[async_trait::async_trait]
impl LockGuardHook for CancelAfterCommit {
    async fn watch(
        &self,
        backend_pid: i32,
        _max_blocking: Duration,
    ) -> Result<Box<dyn LockWatch>, ApiError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let url = self.url.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut c = PgConnection::connect(&url).await?;
            while !stopped.load(Ordering::Relaxed) {
                let committed: bool =
                    sqlx::query_scalar("SELECT to_regclass('marker') IS NOT NULL")
                        .fetch_one(&mut c)
                        .await?;
                if committed {
                    sqlx::query("SELECT pg_cancel_backend($1)")
                        .bind(backend_pid)
                        .execute(&mut c)
                        .await?;
                    break;
                }
            }
            Ok(())
        });
        Ok(Box::new(LateCancel { stop, task }))
    }

    async fn wait_until_gone(
        &self,
        _pids: &[i32],
        _timeout: Duration,
    ) -> Result<BlockersGone, ApiError> {
        Ok(BlockersGone::default())
    }
}

/// The guard's cancel can land after the migration's COMMIT, on the session reset that
/// shares its message (here made long: 200 temporary tables to drop). The migration
/// stands, once, and the trip says the statement finished before the cancel instead of
/// "cancelled and rolled back".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_that_lands_after_commit_leaves_the_migration_standing_and_says_so() -> R<()> {
    let (db, mut admin) = setup().await?;
    let dir = migrations(&[(
        "V1__temp_then_marker.sql",
        "DO $$ BEGIN FOR i IN 1..200 LOOP \
         EXECUTE format('CREATE TEMP TABLE tmp_%s (id int PRIMARY KEY, v text)', i); \
         END LOOP; END $$;\nCREATE TABLE marker (id int);\n",
    )])?;
    let guard = Arc::new(CancelAfterCommit {
        url: db.url.clone(),
    });
    let (run, mut events) = migrate_guarded(&db, dir.path(), ExecConfig::default(), guard)?;
    let report = tokio::time::timeout(SOON, run).await???;
    assert_eq!(report.results[0].retries, 0, "{report:?}");
    let (_, _, _, _, cancelled) = next_event(&mut events, "the trip", trip_of).await?;
    assert!(
        !cancelled,
        "the trip claimed to have cancelled a committed migration"
    );
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM belay.schema_history WHERE script = 'V1__temp_then_marker.sql'",
    )
    .fetch_one(&mut admin)
    .await?;
    assert_eq!(rows, 1);
    Ok(())
}
