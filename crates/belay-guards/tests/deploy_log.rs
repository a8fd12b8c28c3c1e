//! `HistoryDeploymentLog` against a real PostgreSQL: what the pipeline writes reads back
//! as written, `seq` stays gap-free under concurrent appends from several sessions, and
//! writes go through while a migration's transaction holds its locks — and stay after
//! it rolls back.

use belay_core::DatabaseUrl;
use belay_deploy::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, NewDeployment, Step,
};
use belay_guards::{Found, HistoryDeploymentLog, attempts};
use belay_testkit::{Cluster, TestDb};
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use uuid::Uuid;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn log_for(db: &TestDb) -> R<HistoryDeploymentLog> {
    Ok(HistoryDeploymentLog::new(
        DatabaseUrl::parse(&db.url)?,
        "belay",
    )?)
}

fn start(target: &str, at: DateTime<Utc>) -> NewDeployment {
    NewDeployment {
        id: Uuid::new_v4(),
        target: target.into(),
        started_at: at,
        environment: Some("staging".into()),
        requested_by: Some("alice".into()),
        release: Some("1.6.0".into()),
        from_version: Some("1".into()),
        to_version: None,
        policy: serde_json::json!({ "backup": "full" }),
    }
}

fn event(d: &NewDeployment, step: Step, kind: &str, payload: serde_json::Value) -> DeployEvent {
    DeployEvent {
        deployment_id: d.id,
        target: d.target.clone(),
        seq: 0,
        at: Utc::now(),
        step,
        kind: kind.into(),
        message: format!("{kind} in {step}"),
        payload,
    }
}

/// The executor's `failed` event as the pipeline appends it (`serde_json::to_value(&event)`).
fn failed(d: &NewDeployment, script: &str, error: &str) -> serde_json::Value {
    serde_json::json!({
        "deployment_id": d.id, "at": Utc::now(), "event": "failed", "version": "2",
        "script": script, "direction": "forward", "error": error,
    })
}

#[tokio::test]
async fn what_the_pipeline_writes_reads_back() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    let log = log_for(&db)?;
    assert!(log.list(10).await?.is_empty(), "no log yet reads as empty");
    let t0: DateTime<Utc> = "2026-03-01T10:00:00Z".parse()?;
    let older = start("shop", t0);
    let newer = start("shop", t0 + chrono::Duration::minutes(5));
    // The first begin creates the tables on a database belay never touched.
    log.begin(&older).await?;
    log.begin(&newer).await?;
    assert!(
        log.begin(&newer).await.is_err(),
        "a deployment is recorded once"
    );

    let started = serde_json::json!({
        "deployment_id": newer.id, "at": Utc::now(), "event": "started", "version": "2",
        "script": "V2__bad.sql", "direction": "forward", "in_transaction": true,
    });
    let seqs = [
        log.append(event(
            &newer,
            Step::Migrating,
            "transition",
            serde_json::json!({}),
        ))
        .await?,
        log.append(event(&newer, Step::Migrating, "migration", started))
            .await?,
        log.append(event(
            &newer,
            Step::Migrating,
            "migration",
            failed(
                &newer,
                "V2__bad.sql",
                "V2__bad.sql:3:1: syntax error at or near \"SELEC\"",
            ),
        ))
        .await?,
    ];
    assert_eq!(seqs, [1, 2, 3]);
    let mid = log.get(newer.id).await?.ok_or("recorded")?;
    assert_eq!((mid.step, mid.outcome.clone()), (Step::Migrating, None));

    let outcome = DeploymentOutcome {
        state: Step::Failed,
        finished_at: Utc::now(),
        failed_step: Some(Step::Migrating),
        reason: Some("V2__bad.sql failed".into()),
        evidence: serde_json::json!({ "error": "V2__bad.sql:3:1: syntax error" }),
        to_version: Some("1".into()),
        backup_id: Some("20260301T100000-shop".into()),
        applied: vec![AppliedMigration {
            version: Some("1.5".into()),
            script: "V1.5__ok.sql".into(),
            checksum: Some("abc".into()),
            has_undo: true,
            irreversible: false,
        }],
    };
    log.finish(newer.id, &outcome).await?;
    assert!(log.finish(Uuid::new_v4(), &outcome).await.is_err());
    assert!(
        log.append(event(
            &start("x", t0),
            Step::Planned,
            "check",
            serde_json::json!({})
        ))
        .await
        .is_err(),
        "an event of an unrecorded deployment is an error, not dropped"
    );

    let got = log.get(newer.id).await?.ok_or("recorded")?;
    assert_eq!(got.start, newer);
    assert_eq!(got.step, Step::Failed);
    // Timestamps go through PostgreSQL's microseconds.
    let mut want = outcome.clone();
    want.finished_at = got.outcome.as_ref().ok_or("finished")?.finished_at;
    assert_eq!(got.outcome, Some(want));
    assert!(log.get(Uuid::new_v4()).await?.is_none());

    let events = log.events(newer.id).await?;
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(events.iter().all(|e| e.target == "shop"));
    let tried = attempts(&events);
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].outcome, "failed");
    assert_eq!(tried[0].script, "V2__bad.sql");
    assert!(tried[0].started_at.is_some());
    assert!(
        tried[0]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("V2__bad.sql:3:1: ")),
        "{tried:?}"
    );

    let listed: Vec<Uuid> = log.list(10).await?.iter().map(|d| d.start.id).collect();
    assert_eq!(listed, vec![newer.id, older.id], "newest first");
    assert_eq!(log.list(1).await?.len(), 1);
    assert!(log.list_for(10, Some("other")).await?.is_empty());
    match log.find(&newer.id.to_string()[..6]).await? {
        Found::One(d) => assert_eq!(d.start.id, newer.id),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.find("ffffffff-nope").await?, Found::None);
    Ok(())
}

#[tokio::test]
async fn concurrent_appends_get_gap_free_distinct_seqs() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    // Two logs are two sessions, as two processes would be; each also appends from
    // several tasks at once.
    let logs = [Arc::new(log_for(&db)?), Arc::new(log_for(&db)?)];
    let d = start("shop", Utc::now());
    logs[0].begin(&d).await?;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let log = logs[i % 2].clone();
        let e = event(&d, Step::Migrating, "check", serde_json::json!({ "i": i }));
        tasks.push(tokio::spawn(async move { log.append(e).await }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await??);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    let stored: Vec<u64> = logs[1].events(d.id).await?.iter().map(|e| e.seq).collect();
    assert_eq!(stored, (1..=40).collect::<Vec<u64>>());
    let mut payloads: Vec<i64> = logs[0]
        .events(d.id)
        .await?
        .iter()
        .filter_map(|e| e.payload["i"].as_i64())
        .collect();
    payloads.sort_unstable();
    assert_eq!(
        payloads,
        (0..40).collect::<Vec<i64>>(),
        "every event stored once"
    );
    Ok(())
}

#[tokio::test]
async fn writes_pass_a_migration_holding_its_locks_and_survive_its_rollback() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    let log = log_for(&db)?;
    let d = start("shop", Utc::now());
    log.begin(&d).await?;
    // A migration mid-way: its transaction holds ACCESS EXCLUSIVE on an application
    // table and its (uncommitted) history row, as the executor's does before COMMIT.
    let mut migration = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(
        "CREATE TABLE t (id int PRIMARY KEY); \
         CREATE SCHEMA IF NOT EXISTS belay",
    )
    .execute(&mut migration)
    .await?;
    let history = belay_history::History::new("belay")?;
    history.ensure(&mut migration).await?;
    sqlx::raw_sql(
        "BEGIN; ALTER TABLE t ADD COLUMN n int; \
         INSERT INTO belay.schema_history (version, description, type, script, success, state, deployment_id) \
         VALUES ('2', 'n', 'SQL', 'V2__n.sql', true, 'success', NULL)",
    )
    .execute(&mut migration)
    .await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut migration)
        .await?;

    // The log's session waits for none of it (its lock_timeout would fail these writes).
    let seq = log
        .append(event(
            &d,
            Step::Migrating,
            "migration",
            failed(&d, "V2__n.sql", "V2__n.sql:1: boom"),
        ))
        .await?;
    assert_eq!(seq, 1);
    log.finish(
        d.id,
        &DeploymentOutcome {
            state: Step::Failed,
            finished_at: Utc::now(),
            failed_step: Some(Step::Migrating),
            reason: Some("V2__n.sql failed".into()),
            evidence: serde_json::Value::Null,
            to_version: None,
            backup_id: None,
            applied: Vec::new(),
        },
    )
    .await?;
    // The migration is still open, its locks held, while the log wrote on its own session.
    let mut observer = PgConnection::connect(&db.url).await?;
    let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&mut observer)
        .await?;
    assert_eq!(state, "idle in transaction");
    let log_sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2",
    )
    .bind(belay_guards::DEPLOY_LOG_APPLICATION)
    .bind(pid)
    .fetch_one(&mut observer)
    .await?;
    assert_eq!(log_sessions, 1, "the log writes on a session of its own");

    // The migration fails and rolls back: its history row is gone, its attempt is not.
    sqlx::raw_sql("ROLLBACK").execute(&mut migration).await?;
    assert!(history.rows(&mut observer).await?.is_empty());
    let events = log.events(d.id).await?;
    assert_eq!(events.len(), 1);
    assert_eq!(
        attempts(&events)[0].error.as_deref(),
        Some("V2__n.sql:1: boom")
    );
    assert_eq!(log.get(d.id).await?.ok_or("recorded")?.step, Step::Failed);
    Ok(())
}
