//! `LockMonitorApi` in-process (`LocalLocks`) against a real PostgreSQL: a target sees its
//! own database's trees (every database's with `all_databases`), a watch streams samples,
//! and an unreachable target fails up front.

use std::time::Duration;

use belay_core::{DatabaseUrl, ErrorKind};
use belay_locks::{LocalLocks, LockMonitorApi, MonitorOptions};
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};
use tokio_stream::StreamExt;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A held lock and a session queued behind it in `db`: (holder pid, holder, waiter pid).
async fn conflict(db: &TestDb) -> R<(i32, PgConnection, i32)> {
    let mut setup = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql("CREATE TABLE t (id int)")
        .execute(&mut setup)
        .await?;
    let mut a = PgConnection::connect(&db.url).await?;
    let a_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut a)
        .await?;
    sqlx::raw_sql("BEGIN; LOCK TABLE t IN SHARE MODE")
        .execute(&mut a)
        .await?;
    let mut b = PgConnection::connect(&db.url).await?;
    let b_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut b)
        .await?;
    tokio::spawn(async move {
        let _ = sqlx::raw_sql("INSERT INTO t VALUES (1)")
            .execute(&mut b)
            .await;
        b
    });
    Ok((a_pid, a, b_pid))
}

fn api(dbs: &[&TestDb]) -> R<LocalLocks> {
    let mut targets = Vec::new();
    for db in dbs {
        targets.push((db.name.clone(), DatabaseUrl::parse(&db.url)?));
    }
    Ok(LocalLocks::new(targets))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_target_sees_its_own_trees_and_a_watch_streams_them() -> R<()> {
    let (one, two) = (
        Cluster::shared().create_database().await?,
        Cluster::shared().create_database().await?,
    );
    let (a_pid, _a, b_pid) = conflict(&one).await?;
    let api = api(&[&one, &two])?;
    let options = MonitorOptions {
        period: Duration::from_millis(50),
        ..MonitorOptions::default()
    };

    let mut watch = api.watch(&one.name, &options).await?;
    // Samples follow each other until the waiter shows up queued behind the holder.
    let snap = loop {
        let s = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await?
            .ok_or("the watch ended")??;
        if s.trees.iter().any(|t| t.pid == a_pid) {
            break s;
        }
    };
    drop(watch);
    let root = snap.trees.iter().find(|t| t.pid == a_pid).ok_or("root")?;
    assert_eq!(root.mode.as_deref(), Some("ShareLock"));
    assert_eq!(root.children[0].pid, b_pid);
    assert_eq!(root.children[0].mode.as_deref(), Some("RowExclusiveLock"));
    assert!(
        snap.trees
            .iter()
            .all(|t| t.database.as_deref() == Some(one.name.as_str())),
        "{snap:#?}"
    );

    // The other target does not see this database's conflict, unless asked for all.
    let other = api.snapshot(&two.name, &options).await?;
    assert!(other.trees.iter().all(|t| t.pid != a_pid), "{other:#?}");
    let all = api
        .snapshot(
            &two.name,
            &MonitorOptions {
                all_databases: true,
                ..options.clone()
            },
        )
        .await?;
    assert!(all.trees.iter().any(|t| t.pid == a_pid), "{all:#?}");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_target_fails_before_any_stream() -> R<()> {
    let api = LocalLocks::new([(
        "gone".to_string(),
        DatabaseUrl::parse("postgres://app:secret@127.0.0.1:1/shop")?,
    )]);
    let err = api
        .watch("gone", &MonitorOptions::default())
        .await
        .err()
        .ok_or("a watch of an unreachable target must fail")?;
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(!err.message.contains("secret"), "{err}");
    let err = api
        .snapshot("gone", &MonitorOptions::default())
        .await
        .err()
        .ok_or("a snapshot of an unreachable target must fail")?;
    assert_eq!(err.kind, ErrorKind::Unavailable);
    Ok(())
}
