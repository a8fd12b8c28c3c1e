//! The batch loop against a real PostgreSQL: keyset batches, progress in the same
//! transaction, resuming, lock retries, whole-batch rollback, and refusals that touch
//! nothing.

use belay_backfill::{
    Backfill, BackfillError, BackfillSpec, BatchReport, CancellationToken, Clause, ErrorKind,
    Limits, Progress, Start,
};
use belay_core::DatabaseUrl;
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn db_with(sql: &str) -> R<TestDb> {
    let db = Cluster::shared().create_database().await?;
    let mut c = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await?;
    c.close().await?;
    Ok(db)
}

async fn backfill_conn(db: &TestDb) -> R<PgConnection> {
    Ok(belay_backfill::connect(&DatabaseUrl::parse(&db.url)?).await?)
}

fn spec(table: &str, set: &str, filter: Option<&str>, batch: u32) -> BackfillSpec {
    BackfillSpec {
        table: table.into(),
        set: set.into(),
        filter: filter.map(String::from),
        name: None,
        batch_size: batch,
        sleep: Duration::ZERO,
        restart: false,
        progress_schema: "belay".into(),
        limits: Limits::default(),
    }
}

async fn scalar(db: &TestDb, sql: &str) -> R<String> {
    let mut c = PgConnection::connect(&db.url).await?;
    let v: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await?;
    c.close().await?;
    Ok(v.unwrap_or_default())
}

/// Runs to the end (or until `stop`), collecting progress.
async fn run(
    bf: &mut Backfill,
    conn: &mut PgConnection,
    stop: &CancellationToken,
    stop_after_batch: Option<u64>,
) -> R<(belay_backfill::Summary, Vec<BatchReport>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let token = stop.clone();
    let progress = move |p: &Progress| {
        if let Progress::Batch(b) = p {
            sink.lock().expect("lock").push(b.clone());
            if Some(b.batch) == stop_after_batch {
                token.cancel();
            }
        }
    };
    let summary = bf.run(conn, stop, &progress).await?;
    let batches = seen.lock().expect("lock").clone();
    Ok((summary, batches))
}

#[tokio::test]
async fn walks_every_row_once_in_key_batches_and_records_progress() -> R<()> {
    // Odd keys only: batches follow the keys that exist, not key arithmetic.
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, v int); \
         INSERT INTO t (id) SELECT generate_series(1, 50, 2);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut bf = Backfill::prepare(&mut conn, spec("t", "n = n + 1, v = id * 2", None, 10)).await?;
    assert_eq!(bf.start(), &Start::Fresh);
    assert_eq!(bf.estimated_rows(), Some(25));
    let (summary, batches) = run(&mut bf, &mut conn, &CancellationToken::new(), None).await?;

    let shape: Vec<_> = batches
        .iter()
        .map(|b| {
            (
                b.batch,
                b.rows_examined,
                b.rows_updated,
                b.last_key.clone(),
                b.finished,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (1, 10, 10, vec!["19".to_string()], false),
            (2, 10, 10, vec!["39".to_string()], false),
            (3, 5, 5, vec!["49".to_string()], true),
        ]
    );
    assert!(summary.done, "{summary:?}");
    assert_eq!((summary.rows_updated, summary.batches), (25, 3));
    assert_eq!(summary.last_key, Some(vec!["49".to_string()]));
    // Each row exactly once, with the value the assignment computes.
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*)::text FROM t WHERE n = 1 AND v = id * 2"
        )
        .await?,
        "25"
    );
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT concat_ws(' ', rows_updated, rows_examined, batches, last_key::text, finished_at IS NOT NULL) \
                 FROM belay.backfill_progress WHERE name = '{}'",
                bf.name()
            )
        )
        .await?,
        "25 25 3 {49} t"
    );
    Ok(())
}

#[tokio::test]
async fn composite_primary_keys_batch_by_row_comparison() -> R<()> {
    let db = db_with(
        "CREATE TABLE c (tenant int, id text, n int NOT NULL DEFAULT 0, PRIMARY KEY (tenant, id)); \
         INSERT INTO c (tenant, id) SELECT t, chr(96 + i) FROM generate_series(1, 3) t, generate_series(1, 7) i;",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut bf = Backfill::prepare(&mut conn, spec("public.c", "n = n + 1", None, 4)).await?;
    let (summary, batches) = run(&mut bf, &mut conn, &CancellationToken::new(), None).await?;
    assert_eq!(batches[0].last_key, vec!["1".to_string(), "d".to_string()]);
    assert_eq!(batches[1].last_key, vec!["2".to_string(), "a".to_string()]);
    assert_eq!(summary.batches, 6, "{batches:?}");
    assert_eq!(
        summary.key_columns,
        vec!["tenant".to_string(), "id".to_string()]
    );
    assert_eq!(
        scalar(&db, "SELECT string_agg(DISTINCT n::text, ',') FROM c").await?,
        "1",
        "every row updated exactly once"
    );
    Ok(())
}

#[tokio::test]
async fn stopping_between_batches_then_resuming_neither_repeats_nor_skips() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 30);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut bf = Backfill::prepare(&mut conn, spec("t", "n = n + 1", None, 7)).await?;
    let (summary, _) = run(&mut bf, &mut conn, &CancellationToken::new(), Some(2)).await?;
    assert!(!summary.done);
    assert_eq!((summary.rows_updated, summary.batches), (14, 2));
    assert_eq!(summary.last_key, Some(vec!["14".to_string()]));
    assert_eq!(
        scalar(&db, "SELECT count(*)::text FROM t WHERE n = 1").await?,
        "14"
    );
    conn.close().await?;

    let mut conn = backfill_conn(&db).await?;
    let mut bf = Backfill::prepare(&mut conn, spec("t", "n = n + 1", None, 7)).await?;
    assert_eq!(
        bf.start(),
        &Start::Resuming {
            last_key: Some(vec!["14".to_string()]),
            rows_updated: 14,
            batches: 2
        }
    );
    let (summary, batches) = run(&mut bf, &mut conn, &CancellationToken::new(), None).await?;
    assert_eq!(
        batches.first().map(|b| b.batch),
        Some(3),
        "numbering continues"
    );
    assert!(summary.done);
    assert_eq!(
        (
            summary.rows_updated,
            summary.batches,
            summary.rows_updated_this_run
        ),
        (30, 5, 16)
    );
    assert_eq!(
        scalar(&db, "SELECT string_agg(DISTINCT n::text, ',') FROM t").await?,
        "1"
    );
    Ok(())
}

#[tokio::test]
async fn a_finished_backfill_is_already_done_until_restarted() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 10);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let stop = CancellationToken::new();
    let mut bf = Backfill::prepare(&mut conn, spec("t", "n = n + 1", None, 5)).await?;
    run(&mut bf, &mut conn, &stop, None).await?;

    let mut again = Backfill::prepare(&mut conn, spec("t", "n = n + 1", None, 5)).await?;
    assert!(
        matches!(
            again.start(),
            Start::AlreadyDone {
                rows_updated: 10,
                batches: 2,
                ..
            }
        ),
        "{:?}",
        again.start()
    );
    let (summary, batches) = run(&mut again, &mut conn, &stop, None).await?;
    assert!(summary.done && batches.is_empty() && summary.rows_updated_this_run == 0);
    assert_eq!(scalar(&db, "SELECT max(n)::text FROM t").await?, "1");

    let mut restart = spec("t", "n = n + 1", None, 5);
    restart.restart = true;
    let mut bf = Backfill::prepare(&mut conn, restart).await?;
    assert_eq!(bf.start(), &Start::Restarted);
    let (summary, _) = run(&mut bf, &mut conn, &stop, None).await?;
    assert_eq!((summary.rows_updated, summary.batches), (10, 2));
    assert_eq!(
        scalar(&db, "SELECT string_agg(DISTINCT n::text, ',') FROM t").await?,
        "2"
    );
    Ok(())
}

#[tokio::test]
async fn a_filter_limits_updated_rows_while_batches_walk_every_key() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 10);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut bf =
        Backfill::prepare(&mut conn, spec("t", "n = n + 1", Some("id % 2 = 0"), 3)).await?;
    let (summary, batches) = run(&mut bf, &mut conn, &CancellationToken::new(), None).await?;
    assert_eq!(
        batches.iter().map(|b| b.rows_updated).collect::<Vec<_>>(),
        vec![1, 2, 1, 1]
    );
    assert_eq!((summary.rows_updated, summary.rows_examined), (5, 10));
    assert_eq!(
        scalar(
            &db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t WHERE n = 1"
        )
        .await?,
        "2,4,6,8,10"
    );
    Ok(())
}

#[tokio::test]
async fn lock_timeouts_are_retried_until_the_blocker_leaves() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 6);",
    )
    .await?;
    let mut blocker = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT * FROM t WHERE id = 2 FOR UPDATE;")
        .execute(&mut blocker)
        .await?;

    let mut conn = backfill_conn(&db).await?;
    let mut s = spec("t", "n = n + 1", None, 4);
    s.limits.lock_timeout = Duration::from_millis(50);
    s.limits.backoff_initial = Duration::from_millis(20);
    let mut bf = Backfill::prepare(&mut conn, s).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let progress = move |p: &Progress| {
            let _ = tx.send(p.clone());
        };
        let r = bf
            .run(&mut conn, &CancellationToken::new(), &progress)
            .await;
        (r, conn)
    });
    // The first retry proves the batch waited and rolled back; only then let it through.
    let first = rx.recv().await.ok_or("progress channel closed")?;
    assert!(
        matches!(&first, Progress::LockRetry { batch: 1, attempt: 1, sqlstate, .. } if sqlstate == "55P03"),
        "{first:?}"
    );
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await?;
    let (summary, _conn) = task.await?;
    let summary = summary?;
    assert!(summary.done);
    let mut reports = Vec::new();
    while let Ok(p) = rx.try_recv() {
        if let Progress::Batch(b) = p {
            reports.push(b);
        }
    }
    assert!(reports[0].retries >= 1, "{reports:?}");
    assert_eq!(
        scalar(&db, "SELECT string_agg(DISTINCT n::text, ',') FROM t").await?,
        "1"
    );
    Ok(())
}

#[tokio::test]
async fn lock_retries_are_bounded_and_leave_nothing_behind() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 6);",
    )
    .await?;
    let mut blocker = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql("BEGIN; SELECT * FROM t WHERE id = 3 FOR UPDATE;")
        .execute(&mut blocker)
        .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut s = spec("t", "n = n + 1", None, 10);
    s.limits.lock_timeout = Duration::from_millis(30);
    s.limits.backoff_initial = Duration::from_millis(10);
    s.limits.max_attempts = 3;
    let mut bf = Backfill::prepare(&mut conn, s).await?;
    let err = bf
        .run(&mut conn, &CancellationToken::new(), &|_: &Progress| {})
        .await
        .expect_err("the row stays locked");
    assert!(
        matches!(
            err,
            BackfillError::LockRetriesExhausted {
                batch: 1,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Failed);
    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await?;
    // Rows 1 and 2 were updated in the attempts and rolled back with them.
    assert_eq!(scalar(&db, "SELECT max(n)::text FROM t").await?, "0");
    assert_eq!(
        scalar(
            &db,
            "SELECT concat_ws(' ', batches, coalesce(last_key::text, 'none')) FROM belay.backfill_progress"
        )
        .await?,
        "0 none"
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_batch_rolls_back_whole_and_the_position_stays() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT generate_series(1, 20);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut bf = Backfill::prepare(&mut conn, spec("t", "v = 100 / (id - 15)", None, 10)).await?;
    let err = bf
        .run(&mut conn, &CancellationToken::new(), &|_: &Progress| {})
        .await
        .expect_err("division by zero at id 15");
    match &err {
        BackfillError::Batch {
            batch,
            after,
            message,
            sqlstate,
        } => {
            assert_eq!((*batch, after.as_str()), (2, "(10)"));
            assert!(message.contains("division by zero"), "{message}");
            assert_eq!(sqlstate.as_deref(), Some("22012"));
        }
        other => panic!("expected a batch error, got {other}"),
    }
    // Rows 11..14 would have succeeded: they were rolled back with the batch.
    assert_eq!(
        scalar(
            &db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t WHERE v IS NOT NULL"
        )
        .await?,
        "1,2,3,4,5,6,7,8,9,10"
    );
    assert_eq!(bf.summary().last_key, Some(vec!["10".to_string()]));
    assert_eq!(
        scalar(&db, "SELECT last_key::text FROM belay.backfill_progress").await?,
        "{10}"
    );
    Ok(())
}

#[tokio::test]
async fn mistakes_are_refused_before_anything_is_created_or_changed() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT generate_series(1, 5); \
         CREATE TABLE nopk (v int); INSERT INTO nopk VALUES (1); \
         CREATE VIEW tv AS SELECT * FROM t;",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut attempt =
        async |s: BackfillSpec| Backfill::prepare(&mut conn, s).await.expect_err("refused");

    let e = attempt(spec("nopk", "v = 2", None, 10)).await;
    assert!(
        matches!(&e, BackfillError::NoPrimaryKey { table } if table == "public.nopk"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("ADD PRIMARY KEY"), "{e}");

    let e = attempt(spec("missing", "v = 2", None, 10)).await;
    assert!(matches!(e, BackfillError::TableNotFound { .. }), "{e}");
    assert!(e.to_string().contains("search_path"), "{e}");

    let e = attempt(spec("tv", "v = 2", None, 10)).await;
    assert!(
        matches!(e, BackfillError::NotATable { kind: "a view", .. }),
        "{e}"
    );

    let e = attempt(spec("t", "v = nope + 1", None, 10)).await;
    match &e {
        BackfillError::InvalidExpression {
            clause: Clause::Set,
            message,
            position,
            ..
        } => {
            assert!(message.contains("\"nope\" does not exist"), "{message}");
            assert_eq!(*position, Some(5), "points into --set");
        }
        other => panic!("{other}"),
    }
    assert!(
        e.to_string().starts_with("--set is not valid for public.t"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Usage);

    let e = attempt(spec("t", "v = 2", Some("v >"), 10)).await;
    assert!(
        matches!(
            e,
            BackfillError::InvalidExpression {
                clause: Clause::Where,
                ..
            }
        ),
        "{e}"
    );
    let e = attempt(spec("t", "v = 2", Some("v"), 10)).await;
    assert!(
        e.to_string().contains("--where") && e.to_string().contains("boolean"),
        "{e}"
    );

    // A second statement is refused by the server's parser, not run.
    let e = attempt(spec("t", "v = 2; DROP TABLE t", None, 10)).await;
    assert!(
        matches!(
            e,
            BackfillError::InvalidExpression {
                clause: Clause::Set,
                ..
            }
        ),
        "{e}"
    );
    // Assignments may not carry their own WHERE: it would replace the batch bounds.
    let e = attempt(spec("t", "v = 2 WHERE id = 1", None, 10)).await;
    assert!(
        matches!(
            e,
            BackfillError::InvalidExpression {
                clause: Clause::Set,
                ..
            }
        ),
        "{e}"
    );

    let e = attempt(spec("t", "v = 2", None, 0)).await;
    assert!(matches!(e, BackfillError::InvalidSpec(_)), "{e}");

    assert_eq!(
        scalar(&db, "SELECT count(*)::text FROM t WHERE v IS NULL").await?,
        "5"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*)::text FROM pg_namespace WHERE nspname = 'belay'"
        )
        .await?,
        "0",
        "no progress table for a refused backfill"
    );
    Ok(())
}

#[tokio::test]
async fn one_run_per_backfill_and_one_backfill_per_name() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT generate_series(1, 5);",
    )
    .await?;
    let mut first = backfill_conn(&db).await?;
    let _held = Backfill::prepare(&mut first, spec("t", "v = 1", None, 2)).await?;
    let mut second = backfill_conn(&db).await?;
    let e = Backfill::prepare(&mut second, spec("t", "v = 1", None, 2))
        .await
        .expect_err("the first run holds it");
    assert!(matches!(e, BackfillError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("belay-backfill"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Busy);

    let mut named = spec("t", "v = 1", None, 2);
    named.name = Some("fill_v".into());
    let mut bf = Backfill::prepare(&mut second, named).await?;
    bf.run(&mut second, &CancellationToken::new(), &|_: &Progress| {})
        .await?;
    let mut other_work = spec("t", "v = 2", None, 2);
    other_work.name = Some("fill_v".into());
    let e = Backfill::prepare(&mut second, other_work)
        .await
        .expect_err("the name is taken by other work");
    assert!(matches!(e, BackfillError::NameInUse { .. }), "{e}");
    assert!(e.to_string().contains("SET v = 1"), "{e}");

    // A prepare that fails gives its run lock back: the session stays usable and the
    // backfill can be opened elsewhere.
    second.close().await?;
    let mut third = backfill_conn(&db).await?;
    let mut other_work = spec("t", "v = 2", None, 2);
    other_work.name = Some("fill_v".into());
    Backfill::prepare(&mut third, other_work)
        .await
        .expect_err("still taken");
    let mut fourth = backfill_conn(&db).await?;
    let mut same = spec("t", "v = 1", None, 2);
    same.name = Some("fill_v".into());
    let reopened = Backfill::prepare(&mut fourth, same).await?;
    assert!(
        matches!(reopened.start(), Start::AlreadyDone { .. }),
        "{:?}",
        reopened.start()
    );
    Ok(())
}

#[tokio::test]
async fn metrics_count_rows_and_report_progress() -> R<()> {
    let handle = belay_telemetry::metrics_handle()?;
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT generate_series(1, 12);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    let mut s = spec("t", "v = 1", None, 5);
    s.name = Some(format!("metrics_{}", db.name));
    // Labelled by the target that runs it, as the agent does.
    let mut bf = Backfill::prepare(&mut conn, s).await?.for_target("shop");
    bf.run(&mut conn, &CancellationToken::new(), &|_: &Progress| {})
        .await?;
    let text = handle.render();
    let label = format!("{{target=\"shop\",backfill=\"metrics_{}\"}}", db.name);
    // Every series of it exists from its start, lock retries at 0 without any.
    assert!(
        text.contains(&format!("belay_backfill_lock_retries_total{label} 0")),
        "{text}"
    );
    assert!(
        text.contains(&format!("belay_backfill_rows_total{label} 12")),
        "{text}"
    );
    assert!(
        text.contains(&format!("belay_backfill_progress_ratio{label} 1")),
        "{text}"
    );
    Ok(())
}

/// Polls until a backfill session of `db` is in `wait_event` (20 s at most): waiting for
/// the state the server shows, not for time to pass.
async fn until_backfill_waits(db: &TestDb, wait_event: &str) -> R<()> {
    let mut c = PgConnection::connect(&db.url).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'belay-backfill' \
             AND datname = current_database() AND wait_event = $1",
        )
        .bind(wait_event)
        .fetch_one(&mut c)
        .await?;
        if n > 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("the batch never waited on {wait_event}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.close().await?;
    Ok(())
}

#[tokio::test]
async fn keys_are_saved_in_one_text_form_whatever_the_sessions_date_style() -> R<()> {
    // Day-first and month-first readings of 02/01/2024 are a month apart: a position
    // saved by a DMY session and read by an MDY one would skip the rows in between.
    let db = db_with(
        "CREATE TABLE ev (at timestamp PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO ev (at) VALUES ('2024-01-02'), ('2024-01-15'), ('2024-02-01'), ('2024-03-01');",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    sqlx::raw_sql("SET DateStyle = 'SQL, DMY'")
        .execute(&mut conn)
        .await?;
    let mut bf = Backfill::prepare(&mut conn, spec("ev", "n = n + 1", None, 1)).await?;
    let (summary, _) = run(&mut bf, &mut conn, &CancellationToken::new(), Some(1)).await?;
    assert_eq!(
        summary.last_key,
        Some(vec!["2024-01-02 00:00:00".to_string()]),
        "ISO, which every DateStyle order reads alike"
    );
    conn.close().await?;

    let mut conn = backfill_conn(&db).await?;
    sqlx::raw_sql("SET DateStyle = 'SQL, MDY'")
        .execute(&mut conn)
        .await?;
    let mut bf = Backfill::prepare(&mut conn, spec("ev", "n = n + 1", None, 1)).await?;
    let (summary, _) = run(&mut bf, &mut conn, &CancellationToken::new(), None).await?;
    assert!(summary.done);
    assert_eq!(
        scalar(&db, "SELECT string_agg(n::text, ',' ORDER BY at) FROM ev").await?,
        "1,1,1,1",
        "every row exactly once across the two sessions"
    );
    Ok(())
}

#[tokio::test]
async fn a_cancelled_batch_is_not_reported_as_a_statement_timeout() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 4);",
    )
    .await?;
    let mut conn = backfill_conn(&db).await?;
    // Sleeps once per batch (an uncorrelated subquery), far longer than the test waits.
    let mut bf = Backfill::prepare(
        &mut conn,
        spec("t", "n = n + (SELECT 1 FROM pg_sleep(60))", None, 10),
    )
    .await?;
    let task = tokio::spawn(async move {
        let r = bf
            .run(&mut conn, &CancellationToken::new(), &|_: &Progress| {})
            .await;
        (r, conn)
    });
    until_backfill_waits(&db, "PgSleep").await?;
    let mut admin = PgConnection::connect(&db.url).await?;
    sqlx::query(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'belay-backfill' AND datname = current_database()",
    )
    .execute(&mut admin)
    .await?;
    let (r, _conn) = tokio::time::timeout(Duration::from_secs(20), task).await??;
    let err = r.expect_err("the batch was cancelled");
    match &err {
        BackfillError::Batch {
            batch, sqlstate, ..
        } => {
            assert_eq!(*batch, 1);
            assert_eq!(sqlstate.as_deref(), Some("57014"));
        }
        other => panic!("a cancel is not a statement timeout: {other}"),
    }
    assert!(!err.to_string().contains("statement_timeout"), "{err}");
    assert_eq!(scalar(&db, "SELECT max(n)::text FROM t").await?, "0");
    Ok(())
}

#[tokio::test]
async fn serialization_failures_under_repeatable_read_are_retried() -> R<()> {
    let db = db_with(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO t SELECT generate_series(1, 4);",
    )
    .await?;
    // The application changes row 2 and commits while the batch, whose snapshot is older,
    // waits for it: under REPEATABLE READ that is SQLSTATE 40001, not a lost update.
    let mut app = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql("BEGIN; UPDATE t SET n = n + 10 WHERE id = 2;")
        .execute(&mut app)
        .await?;
    let mut conn = backfill_conn(&db).await?;
    sqlx::raw_sql("SET default_transaction_isolation = 'repeatable read'")
        .execute(&mut conn)
        .await?;
    let mut s = spec("t", "n = n + 1", None, 10);
    s.limits.lock_timeout = Duration::from_secs(20);
    s.limits.backoff_initial = Duration::from_millis(10);
    let mut bf = Backfill::prepare(&mut conn, s).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let progress = move |p: &Progress| {
            let _ = tx.send(p.clone());
        };
        let r = bf
            .run(&mut conn, &CancellationToken::new(), &progress)
            .await;
        (r, conn)
    });
    until_backfill_waits(&db, "transactionid").await?;
    sqlx::raw_sql("COMMIT").execute(&mut app).await?;
    let (summary, _conn) = tokio::time::timeout(Duration::from_secs(20), task).await??;
    assert!(summary?.done);
    let first = rx.recv().await.ok_or("progress channel closed")?;
    assert!(
        matches!(&first, Progress::LockRetry { batch: 1, attempt: 1, sqlstate, .. } if sqlstate == "40001"),
        "{first:?}"
    );
    assert_eq!(
        scalar(&db, "SELECT string_agg(n::text, ',' ORDER BY id) FROM t").await?,
        "1,11,1,1",
        "the application's change kept, every row updated once"
    );
    Ok(())
}
