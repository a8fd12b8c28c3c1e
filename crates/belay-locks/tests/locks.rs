//! Against a real PostgreSQL: sessions hold and queue for locks on their own connections.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use belay_core::DatabaseUrl;
use belay_locks::{
    GUARD_APPLICATION, LockGuard, LockNode, LockSnapshot, QueueObserver, QueueSeen,
    SnapshotOptions, WaitOutcome, blockers_of, describe_sessions, guard_session, ripe_wait_sql,
    snapshot, wait_until_gone, watch,
};
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn setup() -> R<(TestDb, PgConnection)> {
    let db = Cluster::shared().create_database().await?;
    let mut c = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)",
    )
    .execute(&mut c)
    .await?;
    Ok((db, c))
}

async fn session(url: &str) -> R<(PgConnection, i32)> {
    let mut c = PgConnection::connect(url).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await?;
    Ok((c, pid))
}

/// Runs `sql` on its own session in the background; the task yields the session back.
async fn background(
    url: &str,
    sql: &'static str,
) -> R<(i32, JoinHandle<(PgConnection, Result<(), sqlx::Error>)>)> {
    let (mut c, pid) = session(url).await?;
    let h = tokio::spawn(async move {
        let r = sqlx::raw_sql(sql).execute(&mut c).await.map(|_| ());
        (c, r)
    });
    Ok((pid, h))
}

/// Runs `sql` on the migration's session in the background and returns once the lock tree
/// shows it waiting behind `holder`.
async fn waiting_migration(
    admin: &mut PgConnection,
    mut m: PgConnection,
    m_pid: i32,
    holder: i32,
    sql: &'static str,
) -> R<JoinHandle<(PgConnection, Result<(), sqlx::Error>)>> {
    let migration = tokio::spawn(async move {
        let r = sqlx::raw_sql(sql).execute(&mut m).await.map(|_| ());
        (m, r)
    });
    until(
        admin,
        &SnapshotOptions::default(),
        "migration waiting",
        |s| tree_of(s, holder).is_some_and(|t| t.find(m_pid).is_some()),
    )
    .await?;
    Ok(migration)
}

async fn until(
    conn: &mut PgConnection,
    opts: &SnapshotOptions,
    what: &str,
    ok: impl Fn(&LockSnapshot) -> bool,
) -> R<LockSnapshot> {
    let start = Instant::now();
    loop {
        let s = snapshot(conn, opts).await?;
        if ok(&s) {
            return Ok(s);
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("timed out waiting for {what}; last snapshot: {s:#?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The trees of one test database (tests run concurrently on one shared cluster, and a
/// snapshot covers the whole cluster).
fn trees_in<'a>(s: &'a LockSnapshot, db: &TestDb) -> Vec<&'a LockNode> {
    s.trees
        .iter()
        .filter(|t| t.database.as_deref() == Some(db.name.as_str()))
        .collect()
}

fn tree_of(s: &LockSnapshot, root: i32) -> Option<&LockNode> {
    s.trees.iter().find(|t| t.pid == root)
}

async fn cancel(c: &mut PgConnection, pid: i32) -> R<()> {
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(c)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sessions_in_conflict_form_a_tree() -> R<()> {
    let (db, mut mon) = setup().await?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; INSERT INTO t VALUES (100)")
        .execute(&mut a)
        .await?;
    let (b_pid, b) = background(&db.url, "ALTER TABLE t ADD COLUMN x int").await?;

    let opts = SnapshotOptions::default();
    let s = until(&mut mon, &opts, "a tree rooted at A", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.children.iter().any(|c| c.pid == b_pid))
    })
    .await?;
    let root = tree_of(&s, a_pid).ok_or("no tree")?;
    assert_eq!(trees_in(&s, &db).len(), 1, "{s:#?}");
    assert_eq!(root.waiting_ms, None);
    assert_eq!(root.mode.as_deref(), Some("RowExclusiveLock"));
    assert_eq!(root.relation.as_deref(), Some("t"));
    assert_eq!(root.state.as_deref(), Some("idle in transaction"));
    assert!(
        root.query
            .as_deref()
            .is_some_and(|q| q.contains("INSERT INTO t"))
    );
    let child = &root.children[0];
    assert_eq!(child.mode.as_deref(), Some("AccessExclusiveLock"));
    assert_eq!(child.relation.as_deref(), Some("t"));
    assert_eq!(child.lock_type.as_deref(), Some("relation"));
    assert!(child.waiting_ms.is_some());
    assert_eq!(child.blocked_by, vec![a_pid]);
    assert_eq!(child.wait_event.as_deref(), Some("Lock:relation"));
    assert_eq!(blockers_of(&mut mon, b_pid).await?, vec![a_pid]);

    // JSON carries the field names.
    let json = serde_json::to_value(&s)?;
    for k in [
        "trees",
        "long_running",
        "idle_in_transaction",
        "replication",
    ] {
        assert!(json.get(k).is_some(), "missing {k}");
    }
    let node = &json["trees"][0];
    for k in ["pid", "mode", "relation", "waiting_ms", "query", "children"] {
        assert!(node.get(k).is_some(), "missing node field {k}");
    }

    // min_wait hides trees whose waits are shorter.
    let hidden = snapshot(
        &mut mon,
        &SnapshotOptions {
            min_wait: Duration::from_secs(3600),
            ..SnapshotOptions::default()
        },
    )
    .await?;
    assert!(trees_in(&hidden, &db).is_empty());

    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    let (_, r) = b.await?;
    r?;
    let s = snapshot(&mut mon, &opts).await?;
    assert!(trees_in(&s, &db).is_empty(), "{s:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_level_chain_is_a_chain() -> R<()> {
    let (db, mut mon) = setup().await?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    let (b_pid, b) = background(&db.url, "ALTER TABLE t ADD COLUMN x int").await?;
    let opts = SnapshotOptions::default();
    until(&mut mon, &opts, "B waiting", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.find(b_pid).is_some())
    })
    .await?;
    let (c_pid, c) = background(&db.url, "SELECT count(*) FROM t").await?;
    let s = until(&mut mon, &opts, "C behind B", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.find(c_pid).is_some())
    })
    .await?;

    let mine = trees_in(&s, &db);
    assert_eq!(mine.len(), 1, "{s:#?}");
    let root = mine[0];
    assert_eq!(root.pid, a_pid);
    assert_eq!(root.mode.as_deref(), Some("AccessShareLock"));
    assert_eq!(root.relation.as_deref(), Some("t"));
    assert_eq!(root.children.len(), 1, "{root:#?}");
    let b_node = &root.children[0];
    assert_eq!(b_node.pid, b_pid);
    assert_eq!(b_node.mode.as_deref(), Some("AccessExclusiveLock"));
    assert_eq!(b_node.children.len(), 1);
    let c_node = &b_node.children[0];
    assert_eq!(c_node.pid, c_pid);
    assert_eq!(c_node.mode.as_deref(), Some("AccessShareLock"));
    assert_eq!(c_node.relation.as_deref(), Some("t"));
    assert!(c_node.blocked_by.contains(&b_pid));
    assert!(c_node.children.is_empty());
    assert_eq!(root.pids().len(), 3);

    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    b.await?.1?;
    c.await?.1?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_running_and_idle_in_transaction_follow_thresholds() -> R<()> {
    let (db, mut mon) = setup().await?;
    let (mut idle, idle_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT 1").execute(&mut idle).await?;
    let (sleep_pid, sleeper) = background(&db.url, "SELECT pg_sleep(60) /* belay-long */").await?;

    let short = SnapshotOptions {
        long_running: Duration::from_millis(200),
        idle_in_transaction: Duration::from_millis(200),
        ..SnapshotOptions::default()
    };
    let s = until(&mut mon, &short, "both flagged", |s| {
        s.long_running.iter().any(|x| x.pid == sleep_pid)
            && s.idle_in_transaction.iter().any(|x| x.pid == idle_pid)
    })
    .await?;
    let long = s
        .long_running
        .iter()
        .find(|x| x.pid == sleep_pid)
        .ok_or("no long")?;
    assert!(long.query_ms.is_some_and(|ms| ms >= 200));
    assert!(
        long.query
            .as_deref()
            .is_some_and(|q| q.contains("belay-long"))
    );
    let idle_info = s
        .idle_in_transaction
        .iter()
        .find(|x| x.pid == idle_pid)
        .ok_or("no idle")?;
    assert!(idle_info.state_ms.is_some_and(|ms| ms >= 200));
    assert!(!s.long_running.iter().any(|x| x.pid == idle_pid));

    // Default thresholds (5 min, 1 min): neither is flagged yet.
    let s = snapshot(&mut mon, &SnapshotOptions::default()).await?;
    assert!(!s.long_running.iter().any(|x| x.pid == sleep_pid));
    assert!(!s.idle_in_transaction.iter().any(|x| x.pid == idle_pid));

    // exclude_pid hides a session from both lists.
    let s = snapshot(
        &mut mon,
        &SnapshotOptions {
            exclude_pid: Some(sleep_pid),
            ..short.clone()
        },
    )
    .await?;
    assert!(!s.long_running.iter().any(|x| x.pid == sleep_pid));

    cancel(&mut mon, sleep_pid).await?;
    let _ = sleeper.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pg_monitor_only_role_sees_everything() -> R<()> {
    let (db, mut admin) = setup().await?;
    let role = format!("mon_{}", db.name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN; GRANT pg_monitor TO {role}"
    )))
    .execute(&mut admin)
    .await?;
    let mon_url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(mon_url, db.url);
    let mut mon = PgConnection::connect(&mon_url).await?;

    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; INSERT INTO t VALUES (100)")
        .execute(&mut a)
        .await?;
    let (b_pid, b) = background(&db.url, "ALTER TABLE t ADD COLUMN x int /* secret-ish */").await?;
    let (sleep_pid, sleeper) = background(&db.url, "SELECT pg_sleep(60) /* by postgres */").await?;

    let opts = SnapshotOptions {
        long_running: Duration::from_millis(100),
        ..SnapshotOptions::default()
    };
    let s = until(&mut mon, &opts, "tree and long query as pg_monitor", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.find(b_pid).is_some())
            && s.long_running.iter().any(|x| x.pid == sleep_pid)
    })
    .await?;
    let long = s
        .long_running
        .iter()
        .find(|x| x.pid == sleep_pid)
        .ok_or("no long")?;
    assert!(
        long.query
            .as_deref()
            .is_some_and(|q| q.contains("by postgres")),
        "other users' queries visible: {long:?}"
    );
    assert_eq!(long.user.as_deref(), Some("postgres"));
    let root = tree_of(&s, a_pid).ok_or("no tree")?;
    assert_eq!(root.relation.as_deref(), Some("t"));
    assert!(
        root.children[0]
            .query
            .as_deref()
            .is_some_and(|q| q.contains("ALTER TABLE t"))
    );

    cancel(&mut admin, sleep_pid).await?;
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    b.await?.1?;
    let _ = sleeper.await?;
    mon.close().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guard_cancels_a_migration_whose_queue_waits_too_long() -> R<()> {
    let (db, mut admin) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;

    let (m, m_pid) = session(&db.url).await?;
    let mut guard = LockGuard::start(
        &url,
        m_pid,
        Duration::from_millis(300),
        Duration::from_millis(50),
    )
    .await?;
    let migration = waiting_migration(
        &mut admin,
        m,
        m_pid,
        a_pid,
        "ALTER TABLE t ADD COLUMN z int",
    )
    .await?;
    let queued_at = Instant::now();
    let (r_pid, reader) = background(&db.url, "SELECT count(*) FROM t").await?;

    let trip = tokio::time::timeout(Duration::from_secs(10), guard.next_trip())
        .await?
        .ok_or("guard stopped without tripping")?;
    assert_eq!(trip.migration_pid, m_pid);
    assert!(trip.blocked_sessions.contains(&r_pid), "{trip:?}");
    // Tripped at the last poll (every 50 ms) before a wait would pass the 300 ms budget.
    assert!(trip.longest_wait_ms > 250, "{trip:?}");
    assert_eq!(trip.blockers_of_migration, vec![a_pid]);
    assert!(trip.cancelled);

    let (_m, r) = migration.await?;
    let err = r.err().ok_or("migration should have been cancelled")?;
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{err}");

    // The reader is released at once (A only holds a share lock).
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await??
        .1?;
    assert!(queued_at.elapsed() < Duration::from_secs(5));
    assert!(guard.stop().await?.is_empty());

    // The column was not added: the cancelled statement rolled back.
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    let cols: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'z'",
    )
    .fetch_one(&mut admin)
    .await?;
    assert_eq!(cols, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guard_stays_quiet_when_nobody_queues_behind() -> R<()> {
    let (db, mut admin) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    let (m, m_pid) = session(&db.url).await?;
    let guard = LockGuard::start(
        &url,
        m_pid,
        Duration::from_millis(100),
        Duration::from_millis(20),
    )
    .await?;
    let migration = waiting_migration(
        &mut admin,
        m,
        m_pid,
        a_pid,
        "ALTER TABLE t ADD COLUMN z int",
    )
    .await?;
    // The migration waits far past the budget, but nobody waits for it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    migration.await?.1?;
    let trips = guard.stop().await?;
    assert!(trips.is_empty(), "{trips:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_until_gone_returns_when_the_blocker_commits() -> R<()> {
    let (db, mut admin) = setup().await?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;

    let out = wait_until_gone(&mut admin, &[a_pid], Duration::from_millis(150)).await?;
    assert_eq!(
        out,
        WaitOutcome::TimedOut {
            remaining: vec![a_pid]
        }
    );

    let committer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = sqlx::raw_sql("COMMIT").execute(&mut a).await.map(|_| ());
        (a, r)
    });
    let start = Instant::now();
    let out = wait_until_gone(&mut admin, &[a_pid], Duration::from_secs(10)).await?;
    let took = start.elapsed();
    committer.await?.1?;
    let WaitOutcome::Gone { ended_ms, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(ended_ms.len(), 1, "{out:?}");
    assert_eq!(ended_ms[0].0, a_pid, "{out:?}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");

    // Sessions not in a transaction (or gone) count as gone at once.
    let out = wait_until_gone(&mut admin, &[a_pid, 999_999], Duration::from_secs(1)).await?;
    assert!(matches!(out, WaitOutcome::Gone { .. }), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_streams_samples_on_one_connection() -> R<()> {
    let (db, _c) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    let stream = watch(url, Duration::from_millis(50), SnapshotOptions::default());
    tokio::pin!(stream);
    let mut ats = Vec::new();
    for _ in 0..3 {
        let s = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .ok_or("stream ended")??;
        ats.push(s.at);
    }
    assert!(ats.windows(2).all(|w| w[0] < w[1]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_guard_hands_back_its_connection_and_names_sessions() -> R<()> {
    let (db, _admin) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("SET application_name = 'reporter'; BEGIN; SELECT count(*) FROM t /* report */")
        .execute(&mut a)
        .await?;

    let conn = guard_session(&url).await?;
    let guard = LockGuard::start_on(
        conn,
        a_pid,
        Duration::from_secs(60),
        Duration::from_millis(20),
        None,
    );
    let (trips, conn) = guard.stop_keeping_connection().await?;
    assert!(trips.is_empty());
    let mut conn = conn.ok_or("a cleanly stopped guard hands its connection back")?;
    let app: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(app, GUARD_APPLICATION);

    // Gone or unknown pids are left out; a live one is named with what it is doing.
    let d = describe_sessions(&mut conn, &[a_pid, 0]).await?;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].pid, a_pid);
    assert_eq!(d[0].application.as_deref(), Some("reporter"));
    assert_eq!(d[0].state.as_deref(), Some("idle in transaction"));
    assert!(d[0].xact_ms.is_some());
    assert!(
        d[0].query
            .as_deref()
            .is_some_and(|q| q.contains("/* report */")),
        "{d:?}"
    );
    assert!(describe_sessions(&mut conn, &[]).await?.is_empty());

    // The same connection guards the next statement.
    let guard = LockGuard::start_on(
        conn,
        a_pid,
        Duration::from_secs(60),
        Duration::from_millis(20),
        None,
    );
    assert!(guard.stop().await?.is_empty());
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trip_is_reported_even_when_the_guard_fails_after_it() -> R<()> {
    let (db, mut admin) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    let (m, m_pid) = session(&db.url).await?;
    let guard = LockGuard::start(
        &url,
        m_pid,
        Duration::from_millis(200),
        Duration::from_millis(20),
    )
    .await?;
    let migration = waiting_migration(
        &mut admin,
        m,
        m_pid,
        a_pid,
        "ALTER TABLE t ADD COLUMN z int",
    )
    .await?;
    let (_r_pid, reader) = background(&db.url, "SELECT count(*) FROM t").await?;
    // The guard's cancel ends the migration's statement (the trip is not taken yet).
    let (_m, r) = tokio::time::timeout(Duration::from_secs(10), migration).await??;
    let code = r
        .err()
        .ok_or("the guard should have cancelled the migration")?
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"));
    // Then the guard's own session dies before the executor stops the watch.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(GUARD_APPLICATION)
    .execute(&mut admin)
    .await?;
    let start = Instant::now();
    while !guard.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the guard never noticed its session was gone"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let trips = guard.stop().await?;
    assert_eq!(trips.len(), 1, "{trips:?}");
    assert_eq!(trips[0].blockers_of_migration, vec![a_pid]);
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await??
        .1?;
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    Ok(())
}

/// The next snapshot of `stream` that satisfies `ok` (other tests' lock waits on the shared
/// cluster may bring samples of their own first).
async fn next_where<S>(
    stream: &mut S,
    what: &str,
    ok: impl Fn(&LockSnapshot) -> bool,
) -> R<LockSnapshot>
where
    S: tokio_stream::Stream<Item = Result<LockSnapshot, belay_locks::LocksError>> + Unpin,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = tokio::time::timeout(left, stream.next())
            .await
            .map_err(|_| format!("no sample showed {what}"))?
            .ok_or("stream ended")??;
        if ok(&s) {
            return Ok(s);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_reports_a_new_chain_without_waiting_for_its_period() -> R<()> {
    let (db, _c) = setup().await?;
    let url = DatabaseUrl::parse(&db.url)?;
    // A period no test outlives: every sample after the first is one the probe asked for.
    let stream = watch(url, Duration::from_secs(3600), SnapshotOptions::default());
    tokio::pin!(stream);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or("stream ended")??;
    let (mut a, a_pid) = session(&db.url).await?;
    assert!(tree_of(&first, a_pid).is_none());

    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    let (b_pid, b) = background(&db.url, "ALTER TABLE t ADD COLUMN w int").await?;
    let s = next_where(&mut stream, "the ALTER queued behind A", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.find(b_pid).is_some())
    })
    .await?;
    assert!(s.at > first.at);

    // A belay guard announcing a pending DDL is new too.
    let (mut g, g_pid) = session(&db.url).await?;
    let name = format!("{GUARD_APPLICATION}: {b_pid} waits for {a_pid}");
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(&name)
        .execute(&mut g)
        .await?;
    let s = next_where(&mut stream, "the guard's announcement", |s| {
        s.pending_ddl.iter().any(|p| p.guard_pid == g_pid)
    })
    .await?;
    let pending = s
        .pending_ddl
        .iter()
        .find(|p| p.guard_pid == g_pid)
        .ok_or("no pending DDL")?;
    assert_eq!(pending.migration_pid, b_pid);
    assert_eq!(
        pending
            .blockers
            .iter()
            .map(|b| b.session.pid)
            .collect::<Vec<_>>(),
        vec![a_pid]
    );

    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    b.await?.1?;
    Ok(())
}

/// Waits until a probe of the watch (`belay-locks` session) has run and finished since
/// `waiter` began to wait for its lock: whatever that probe asked for is sampled by now.
async fn until_probed_since_wait(admin: &mut PgConnection, waiter: i32) -> R<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_stat_activity m, pg_locks l
                             WHERE m.application_name = 'belay-locks' AND m.state = 'idle'
                               AND l.pid = $1 AND NOT l.granted
                               AND m.query_start > l.waitstart)",
        )
        .bind(waiter)
        .fetch_one(&mut *admin)
        .await?;
        if seen {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no probe after session {waiter} began to wait").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_samples_at_once_for_a_row_lock_wait_only_while_a_belay_run_is_on() -> R<()> {
    // A cluster of its own: another test's lock wait would bring a sample of its own.
    let cluster = tokio::task::spawn_blocking(Cluster::start).await??;
    let db = cluster.create_database().await?;
    let mut admin = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);
         CREATE TABLE u (id int)",
    )
    .execute(&mut admin)
    .await?;
    let url = DatabaseUrl::parse(&db.url)?;
    // A period no test outlives: every sample after the first is one the probe asked for.
    let stream = watch(url, Duration::from_secs(3600), SnapshotOptions::default());
    tokio::pin!(stream);
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or("stream ended")??;

    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; UPDATE t SET id = id WHERE id IN (1, 2); SELECT count(*) FROM u")
        .execute(&mut a)
        .await?;
    // No belay run: a row-lock wait is the application's own contention, left to the period.
    let (b_pid, b) = background(&db.url, "UPDATE t SET id = id WHERE id = 1").await?;
    until_probed_since_wait(&mut admin, b_pid).await?;
    // A queue on a table's lock is sampled at once, and is the first sample since.
    let (c_pid, c) = background(&db.url, "ALTER TABLE u ADD COLUMN w int").await?;
    let s = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or("stream ended")??;
    let tree = tree_of(&s, a_pid).ok_or("no tree for the holder")?;
    assert!(
        tree.find(c_pid).is_some(),
        "the first sample after the row-lock wait should be the ALTER's: {s:?}"
    );

    // With a belay run's guard connected, a row-lock wait is sampled at once too.
    let opts =
        sqlx::postgres::PgConnectOptions::from_str(&db.url)?.application_name(GUARD_APPLICATION);
    let _guard = PgConnection::connect_with(&opts).await?;
    let (d_pid, d) = background(&db.url, "UPDATE t SET id = id WHERE id = 2").await?;
    next_where(&mut stream, "the row-lock wait during a run", |s| {
        tree_of(s, a_pid).is_some_and(|t| t.find(d_pid).is_some())
    })
    .await?;

    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    for h in [b, c, d] {
        h.await?.1?;
    }
    Ok(())
}

/// Every poll a guard reported, and what it said was left when it ended.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<QueueSeen>>,
    ended: Mutex<Option<QueueSeen>>,
}

impl QueueObserver for Recorder {
    fn seen(&self, queue: QueueSeen) {
        self.seen.lock().map(|mut v| v.push(queue)).ok();
    }

    fn ended(&self, rest: QueueSeen) {
        self.ended.lock().map(|mut e| *e = Some(rest)).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guard_tells_its_observer_the_lock_waits_of_its_database() -> R<()> {
    let (db, mut admin) = setup().await?;
    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    let (m, m_pid) = session(&db.url).await?;
    let recorder = Arc::new(Recorder::default());
    let conn = guard_session(&DatabaseUrl::parse(&db.url)?).await?;
    // A budget no test reaches: the guard only watches.
    let guard = LockGuard::start_on(
        conn,
        m_pid,
        Duration::from_secs(3600),
        Duration::from_millis(10),
        Some(recorder.clone()),
    );
    let migration = waiting_migration(
        &mut admin,
        m,
        m_pid,
        a_pid,
        "ALTER TABLE t ADD COLUMN v int",
    )
    .await?;
    // The migration waits, then a reader queues behind it: two waits in this database.
    let (_r_pid, reader) = background(&db.url, "SELECT count(*) FROM t").await?;
    let start = Instant::now();
    loop {
        let two = recorder
            .seen
            .lock()
            .map(|v| v.iter().any(|q| q.waiting == 2 && q.longest_wait_ms > 0))
            .unwrap_or(false);
        if two {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the observer never saw both waits: {recorder:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*recorder.ended.lock().map_err(|e| e.to_string())?, None);

    // Stopped while both still wait: neither is left once the statement has ended (the
    // migration's own wait, and the reader queued behind it).
    assert!(guard.stop().await?.is_empty());
    assert_eq!(
        *recorder.ended.lock().map_err(|e| e.to_string())?,
        Some(QueueSeen::default())
    );
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    migration.await?.1?;
    reader.await?.1?;
    Ok(())
}

/// Runs a ripe wait in a transaction of `conn`'s, as a retry's message does; gives up (an
/// error) should it not return within a test's patience.
async fn ripe_wait(conn: &mut PgConnection, wait: &str) -> R<()> {
    let message = format!("BEGIN; SELECT count(*) FROM t; {wait}; COMMIT");
    tokio::time::timeout(
        Duration::from_secs(20),
        sqlx::raw_sql(sqlx::AssertSqlSafe(message)).execute(&mut *conn),
    )
    .await
    .map_err(|_| "the ripe wait did not return")??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ripe_wait_returns_once_every_other_holder_is_far_enough_in() -> R<()> {
    let (db, mut admin) = setup().await?;
    let (mut m, _) = session(&db.url).await?;
    let t = vec!["public.t".to_string()];
    let minute = Duration::from_secs(60);
    let sql = |rels: &[String], age: Duration, within: Duration| {
        ripe_wait_sql(rels, age, within).ok_or("no ripe wait")
    };

    // Nothing to wait for, or a name that could break out of the literal or the body.
    assert_eq!(ripe_wait_sql(&[], minute, minute), None);
    assert_eq!(ripe_wait_sql(&t, Duration::ZERO, minute), None);
    assert_eq!(
        ripe_wait_sql(&["public.\"a$$b\"".into()], minute, minute),
        None
    );
    // A quote is doubled: the name reaches to_regclass whole (and is no table).
    ripe_wait(&mut m, &sql(&["public.\"it's\"".into()], minute, minute)?).await?;

    // Only the session's own lock on t: nobody else holds one, ripe at once.
    ripe_wait(&mut m, &sql(&t, minute, minute)?).await?;

    let (mut a, a_pid) = session(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    // A lock on another table does not count.
    sqlx::raw_sql("CREATE TABLE u (id int)")
        .execute(&mut admin)
        .await?;
    ripe_wait(&mut m, &sql(&["public.u".into()], minute, minute)?).await?;
    // Never waits past half the session's statement_timeout: the wait itself never fails.
    sqlx::raw_sql("SET statement_timeout = '2s'")
        .execute(&mut m)
        .await?;
    ripe_wait(&mut m, &sql(&t, minute, minute)?).await?;
    sqlx::raw_sql("RESET statement_timeout")
        .execute(&mut m)
        .await?;

    // Returns once the holder is 300 ms into its transaction, and not before: a
    // transaction begun just now.
    sqlx::raw_sql("COMMIT; BEGIN; SELECT count(*) FROM t")
        .execute(&mut a)
        .await?;
    ripe_wait(&mut m, &sql(&t, Duration::from_millis(300), minute)?).await?;
    let age_ms: f64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM clock_timestamp() - xact_start) * 1000)::float8 \
           FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(a_pid)
    .fetch_one(&mut admin)
    .await?;
    assert!(
        age_ms >= 300.0,
        "returned when the holder was {age_ms} ms in"
    );
    sqlx::raw_sql("COMMIT").execute(&mut a).await?;
    Ok(())
}
