//! Preflight checks against a real PostgreSQL, each driven to pass, warn and block.

// Test helpers unwrap: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use belay_core::DatabaseUrl;
use belay_health::{
    CheckResult, CheckStatus, HealthError, MigrationSummary, PreflightContext, Thresholds,
    any_blocks, apply_overrides, preflight, preflight_url,
};
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};

async fn db() -> (TestDb, PgConnection) {
    let db = Cluster::shared().create_database().await.unwrap();
    let conn = PgConnection::connect(&db.url).await.unwrap();
    (db, conn)
}

async fn check(
    conn: &mut PgConnection,
    ctx: &PreflightContext,
    t: &Thresholds,
    name: &str,
) -> CheckResult {
    let results = preflight(conn, ctx, t).await.unwrap();
    results
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no {name} check"))
}

async fn status(conn: &mut PgConnection, t: &Thresholds, name: &str) -> CheckStatus {
    check(conn, &PreflightContext::default(), t, name)
        .await
        .status
}

/// Polls `sql` (a boolean query) until it is true, for up to 10 s.
async fn wait_until(conn: &mut PgConnection, sql: &'static str) {
    let started = Instant::now();
    loop {
        let (done,): (bool,) = sqlx::query_as(sql).fetch_one(&mut *conn).await.unwrap();
        if done {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_healthy_database_passes_every_check_and_reports_them_all() {
    let (_db, mut conn) = db().await;
    let tmp = tempfile::tempdir().unwrap();
    let ctx = PreflightContext {
        backup_dir: Some(tmp.path().to_path_buf()),
        expected_backup_bytes: None,
        migration_summary: Some(MigrationSummary::default()),
    };
    let t = Thresholds {
        disk_free_warn_floor: 0,
        ..Thresholds::default()
    };
    let results = preflight(&mut conn, &ctx, &t).await.unwrap();
    let names: Vec<_> = results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, belay_health::PREFLIGHT_CHECKS);
    for r in &results {
        assert_eq!(r.status, CheckStatus::Pass, "{r:?}");
        assert!(!r.value.is_empty() && !r.threshold.is_empty(), "{r:?}");
    }
    assert!(!any_blocks(&results));
    let json = serde_json::to_value(&results).unwrap();
    assert_eq!(json[0]["name"], "connectivity");
    assert_eq!(json[0]["status"], "pass");
    assert!(json[0]["value"].as_str().unwrap().contains("PostgreSQL"));
}

#[tokio::test]
async fn connectivity() {
    let (db, mut conn) = db().await;
    let t = Thresholds::default();
    assert_eq!(
        status(&mut conn, &t, "connectivity").await,
        CheckStatus::Pass
    );
    let slow = Thresholds {
        connect_latency_warn: Duration::ZERO,
        ..Thresholds::default()
    };
    assert_eq!(
        status(&mut conn, &slow, "connectivity").await,
        CheckStatus::Warn
    );
    let old = Thresholds {
        min_server_version: 99,
        ..Thresholds::default()
    };
    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &old,
        "connectivity",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.remedy.contains("99"), "{r:?}");

    // Through a URL: a server that is not there blocks instead of failing the report.
    let url = DatabaseUrl::parse(&db.url).unwrap();
    let ok = preflight_url(&url, &PreflightContext::default(), &t)
        .await
        .unwrap();
    assert_eq!(ok[0].status, CheckStatus::Pass);
    let port = free_port();
    let gone =
        DatabaseUrl::parse(&format!("postgres://postgres:hunter2@127.0.0.1:{port}/x")).unwrap();
    let down = preflight_url(&gone, &PreflightContext::default(), &t)
        .await
        .unwrap();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0].name, "connectivity");
    assert_eq!(down[0].status, CheckStatus::Block);
    assert!(!down[0].value.contains("hunter2"), "{:?}", down[0]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn database_size() {
    let (_db, mut conn) = db().await;
    let mut t = Thresholds::default();
    assert_eq!(
        status(&mut conn, &t, "database_size").await,
        CheckStatus::Pass
    );
    t.database_size_warn = Some(1);
    assert_eq!(
        status(&mut conn, &t, "database_size").await,
        CheckStatus::Warn
    );
    t.database_size_block = Some(1);
    let r = check(&mut conn, &PreflightContext::default(), &t, "database_size").await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("MiB"), "{r:?}");
}

#[tokio::test]
async fn disk_space_for_the_backup() {
    let (_db, mut conn) = db().await;
    let tmp = tempfile::tempdir().unwrap();
    let ctx = PreflightContext {
        // not created yet: measured at its parent
        backup_dir: Some(tmp.path().join("backups")),
        ..PreflightContext::default()
    };
    let mut t = Thresholds {
        disk_free_warn_floor: 0,
        disk_free_block_floor: 0,
        ..Thresholds::default()
    };
    let r = check(&mut conn, &ctx, &t, "disk_space").await;
    assert_eq!(r.status, CheckStatus::Pass, "{r:?}");
    assert!(r.value.contains("expected backup"), "{r:?}");
    // A floor larger than the disk: warn, then block.
    t.disk_free_warn_floor = u64::MAX / 4;
    assert_eq!(
        check(&mut conn, &ctx, &t, "disk_space").await.status,
        CheckStatus::Warn
    );
    t.disk_free_block_floor = u64::MAX / 4;
    let r = check(&mut conn, &ctx, &t, "disk_space").await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.remedy.contains("backup"), "{r:?}");
    // A backup bigger than the free space blocks even without a floor.
    let huge = PreflightContext {
        expected_backup_bytes: Some(u64::MAX / 2),
        ..ctx.clone()
    };
    let t = Thresholds {
        disk_free_warn_floor: 0,
        ..Thresholds::default()
    };
    assert_eq!(
        check(&mut conn, &huge, &t, "disk_space").await.status,
        CheckStatus::Block
    );
    // No backup directory: said plainly, not a silent pass.
    let r = check(&mut conn, &PreflightContext::default(), &t, "disk_space").await;
    assert!(r.value.contains("not checked"), "{r:?}");
}

#[tokio::test]
async fn connections() {
    let (_db, mut conn) = db().await;
    let mut t = Thresholds::default();
    assert_eq!(
        status(&mut conn, &t, "connections").await,
        CheckStatus::Pass
    );
    t.connections_warn_percent = 0.0;
    assert_eq!(
        status(&mut conn, &t, "connections").await,
        CheckStatus::Warn
    );
    t.connections_block_percent = 0.0;
    let r = check(&mut conn, &PreflightContext::default(), &t, "connections").await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("max_connections"), "{r:?}");
}

#[tokio::test]
async fn long_running_queries() {
    let (db, mut conn) = db().await;
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    let sleeper = tokio::spawn(async move {
        let _ = sqlx::query("SELECT pg_sleep(30) /* long one */")
            .execute(&mut other)
            .await;
    });
    wait_until(
        &mut conn,
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
           AND state = 'active' AND query LIKE '%long one%' AND query NOT LIKE '%EXISTS%'
           AND clock_timestamp() - query_start > interval '200 ms')",
    )
    .await;
    let mut t = Thresholds::default();
    assert_eq!(
        status(&mut conn, &t, "long_running_queries").await,
        CheckStatus::Pass
    );
    t.long_query_warn = Duration::from_millis(100);
    assert_eq!(
        status(&mut conn, &t, "long_running_queries").await,
        CheckStatus::Warn
    );
    t.long_query_block = Duration::from_millis(100);
    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &t,
        "long_running_queries",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(
        r.value.contains("pg_sleep(30)") && r.value.contains("pid"),
        "{r:?}"
    );
    sqlx::query(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE '%long one%' AND pid <> pg_backend_pid()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sleeper.await.unwrap();
}

#[tokio::test]
async fn idle_in_transaction() {
    let (db, mut conn) = db().await;
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    wait_until(
        &mut conn,
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
           AND state = 'idle in transaction'
           AND clock_timestamp() - xact_start > interval '200 ms')",
    )
    .await;
    let mut t = Thresholds::default();
    assert_eq!(
        status(&mut conn, &t, "idle_in_transaction").await,
        CheckStatus::Pass
    );
    t.idle_in_transaction_warn = Duration::from_millis(100);
    assert_eq!(
        status(&mut conn, &t, "idle_in_transaction").await,
        CheckStatus::Warn
    );
    t.idle_in_transaction_block = Duration::from_millis(100);
    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &t,
        "idle_in_transaction",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("pid"), "{r:?}");
    tx.rollback().await.unwrap();
    let t = Thresholds {
        idle_in_transaction_block: Duration::from_millis(100),
        ..Thresholds::default()
    };
    assert_eq!(
        status(&mut conn, &t, "idle_in_transaction").await,
        CheckStatus::Pass
    );
}

#[tokio::test]
async fn lock_waits_block_after_a_second_by_default() {
    let (db, mut conn) = db().await;
    sqlx::query("CREATE TABLE accounts (id int)")
        .execute(&mut conn)
        .await
        .unwrap();
    let defaults = Thresholds::default();
    assert_eq!(
        status(&mut conn, &defaults, "lock_waits").await,
        CheckStatus::Pass
    );

    // A holds the lock, B waits for it.
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut waiter = PgConnection::connect(&db.url).await.unwrap();
    let waiting = tokio::spawn(async move {
        sqlx::query("SELECT count(*) FROM accounts")
            .execute(&mut waiter)
            .await
            .unwrap();
    });
    wait_until(
        &mut conn,
        "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid)
           WHERE NOT l.granted AND a.datname = current_database())",
    )
    .await;
    let patient = Thresholds {
        lock_wait_block: Duration::from_secs(3600),
        ..Thresholds::default()
    };
    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &patient,
        "lock_waits",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Warn, "{r:?}");
    assert!(
        r.value.contains("accounts") && r.value.contains("blocked by"),
        "{r:?}"
    );

    // Past a second, the defaults block.
    let started = Instant::now();
    let r = loop {
        let r = check(
            &mut conn,
            &PreflightContext::default(),
            &defaults,
            "lock_waits",
        )
        .await;
        if r.status == CheckStatus::Block || started.elapsed() > Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, CheckStatus::Block, "{r:?}");
    assert!(r.value.contains("AccessShareLock on accounts"), "{r:?}");

    tx.commit().await.unwrap();
    waiting.await.unwrap();
    assert_eq!(
        status(&mut conn, &defaults, "lock_waits").await,
        CheckStatus::Pass
    );
}

#[tokio::test]
async fn migration_status_and_overrides() {
    let (_db, mut conn) = db().await;
    let ctx = PreflightContext {
        migration_summary: Some(MigrationSummary {
            pending: 4,
            failed: vec!["3".into()],
            drift: vec!["1.1".into()],
            lock_tables: vec![],
        }),
        ..PreflightContext::default()
    };
    let mut t = Thresholds::default();
    let mut results = preflight(&mut conn, &ctx, &t).await.unwrap();
    let get = |rs: &[CheckResult], n: &str| rs.iter().find(|r| r.name == n).unwrap().clone();
    assert_eq!(
        get(&results, "pending_migrations").status,
        CheckStatus::Pass
    );
    assert_eq!(
        get(&results, "failed_migrations").status,
        CheckStatus::Block
    );
    assert!(get(&results, "checksum_drift").value.contains("1.1"));
    assert!(any_blocks(&results));

    let err = apply_overrides(&mut results, &["drift".into()], "why").unwrap_err();
    assert!(matches!(err, HealthError::UnknownOverride { .. }), "{err}");
    apply_overrides(
        &mut results,
        &["failed_migrations".into(), "checksum_drift".into()],
        "repaired by hand, ticket 42",
    )
    .unwrap();
    assert!(!any_blocks(&results));
    let drift = get(&results, "checksum_drift");
    assert_eq!(drift.status, CheckStatus::Warn);
    assert_eq!(
        drift.overridden.as_deref(),
        Some("repaired by hand, ticket 42")
    );

    t.pending_migrations_warn = Some(3);
    let results = preflight(&mut conn, &ctx, &t).await.unwrap();
    assert_eq!(
        get(&results, "pending_migrations").status,
        CheckStatus::Warn
    );
}

/// A streaming replica stand-in (`pg_receivewal`) on a dedicated cluster, paused with
/// SIGSTOP so its reported position stays behind while WAL is written.
#[tokio::test]
async fn replication_lag() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut t = Thresholds::default();
    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &t,
        "replication_lag",
    )
    .await;
    assert_eq!(
        (r.status, r.value.as_str()),
        (CheckStatus::Pass, "no replicas")
    );

    let wal_dir = tempfile::tempdir().unwrap();
    let bin: PathBuf = belay_testkit::bin_dir().unwrap().join("pg_receivewal");
    let mut receiver = Command::new(bin)
        .args(["-d", &url, "--no-loop", "--synchronous", "-D"])
        .arg(wal_dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        &mut conn,
        "SELECT EXISTS (SELECT FROM pg_stat_replication WHERE coalesce(flush_lsn, write_lsn) IS NOT NULL)",
    )
    .await;
    let pid = receiver.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    sqlx::raw_sql(
        "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 5000) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let r = check(
        &mut conn,
        &PreflightContext::default(),
        &t,
        "replication_lag",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Pass, "{r:?}");
    assert!(r.value.contains("pg_receivewal"), "{r:?}");
    t.replication_lag_warn = 1024;
    assert_eq!(
        status(&mut conn, &t, "replication_lag").await,
        CheckStatus::Warn
    );
    t.replication_lag_block = 1024;
    assert_eq!(
        status(&mut conn, &t, "replication_lag").await,
        CheckStatus::Block
    );

    signal("-CONT");
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    conn.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_session_holding_a_table_the_pending_migrations_lock_warns_and_blocks_past_its_threshold()
{
    let (db, mut conn) = db().await;
    sqlx::raw_sql("CREATE TABLE accounts (id int); CREATE TABLE other (id int)")
        .execute(&mut conn)
        .await
        .unwrap();
    let ctx = |tables: &[&str]| PreflightContext {
        migration_summary: Some(MigrationSummary {
            lock_tables: tables.iter().map(ToString::to_string).collect(),
            ..MigrationSummary::default()
        }),
        ..PreflightContext::default()
    };
    let defaults = Thresholds::default();
    // Nobody holds anything: it passes.
    let r = check(&mut conn, &ctx(&["accounts"]), &defaults, "table_locks").await;
    assert_eq!(r.status, CheckStatus::Pass, "{r:?}");

    // A reader's open transaction holds ACCESS SHARE on accounts.
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::raw_sql("SET application_name = 'report'")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM accounts")
        .execute(&mut holder)
        .await
        .unwrap();
    let r = check(
        &mut conn,
        &ctx(&["accounts", "new_table"]),
        &defaults,
        "table_locks",
    )
    .await;
    assert_eq!(r.status, CheckStatus::Warn, "{r:?}");
    for want in [
        &format!("pid {pid}"),
        "\"report\"",
        "AccessShareLock on accounts",
        "SELECT count(*) FROM accounts",
    ] {
        assert!(r.value.contains(want), "{want:?} missing: {r:?}");
    }
    // Past the block threshold it blocks.
    let strict = Thresholds {
        table_lock_block: Duration::ZERO,
        ..Thresholds::default()
    };
    let r = check(&mut conn, &ctx(&["accounts"]), &strict, "table_locks").await;
    assert_eq!(r.status, CheckStatus::Block, "{r:?}");
    // A table the migrations do not lock is not the holder's business.
    let r = check(&mut conn, &ctx(&["other"]), &strict, "table_locks").await;
    assert_eq!(r.status, CheckStatus::Pass, "{r:?}");
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
}
