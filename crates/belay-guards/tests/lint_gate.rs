//! The lint gate wired into the executor, against a real PostgreSQL: a pending script
//! with an unallowed `error` finding is refused under the runner lock, before the backup
//! hook and any statement, and goes through once a directive allows it.

use belay_core::DatabaseUrl;
use belay_guards::LintGate;
use belay_history::History;
use belay_migrate::{
    ApiError, ApplyOptions, BackupContext, BackupHook, BackupTaken, ErrorKind, LocalTargets,
    MigrationApi, Target, TargetSpec, events,
};
use belay_testkit::Cluster;
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Counts the backups asked for: a refused run must not reach the backup.
#[derive(Default)]
struct CountingBackup(AtomicU32);

#[async_trait::async_trait]
impl BackupHook for CountingBackup {
    async fn before_apply(&self, _: &BackupContext) -> Result<Option<BackupTaken>, ApiError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(None)
    }
    async fn before_undo(
        &self,
        _: &BackupContext,
        _: &str,
    ) -> Result<Option<BackupTaken>, ApiError> {
        Ok(None)
    }
}

async fn history(c: &mut PgConnection) -> R<Vec<(Option<String>, bool)>> {
    Ok(History::new("belay")?
        .rows(c)
        .await?
        .into_iter()
        .map(|r| (r.version, r.success))
        .collect())
}

async fn index_exists(c: &mut PgConnection) -> R<bool> {
    Ok(
        sqlx::query_scalar("SELECT count(*) > 0 FROM pg_indexes WHERE indexname = 't_a_idx'")
            .fetch_one(c)
            .await?,
    )
}

#[tokio::test]
async fn a_lint_error_refuses_the_run_before_the_backup_until_a_directive_allows_it() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("V1__t.sql"), "CREATE TABLE t (a int);\n")?;
    let backups = Arc::new(CountingBackup::default());
    let api = LocalTargets::new([TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&db.url)?,
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    }])
    .with_backup_hook("db", backups.clone())
    .with_script_gate("db", Arc::new(LintGate::new("skip hint")));
    let (target, options) = (Target::default(), ApplyOptions::default());
    let apply = || api.apply("db", &target, &options, events::discard());

    // Creating a table is fine; the gate lets the run through to the backup.
    apply().await?;
    assert_eq!(backups.0.load(Ordering::SeqCst), 1);
    // Over the small-table threshold: on an empty t the index would be downgraded.
    belay_testkit::psql(
        &db.url,
        "INSERT INTO t SELECT generate_series(1, 20000); ANALYZE t;",
    )?;

    let v2 = dir.path().join("V2__idx.sql");
    std::fs::write(&v2, "CREATE INDEX t_a_idx ON t (a);\n")?;
    let err = apply().await.expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    assert!(err.message.contains("nothing was applied"), "{err}");
    assert!(
        err.message
            .contains("V2__idx.sql:1:1: error[create-index-concurrently]"),
        "{err}"
    );
    assert!(err.message.contains("fix: "), "the safe rewrite: {err}");
    assert!(
        err.message
            .contains("-- belay:allow=create-index-concurrently <why it is safe>"),
        "{err}"
    );
    assert!(err.message.ends_with("skip hint"), "{err}");
    assert_eq!(
        backups.0.load(Ordering::SeqCst),
        1,
        "no backup for a refused run"
    );
    let mut c = PgConnection::connect(&db.url).await?;
    assert_eq!(history(&mut c).await?, [(Some("1".to_string()), true)]);
    assert!(!index_exists(&mut c).await?);

    // An allow naming no rule is an error in the script, not a silent pass.
    std::fs::write(
        &v2,
        "-- belay:allow=create-index-concurently small table\nCREATE INDEX t_a_idx ON t (a);\n",
    )?;
    let err = apply().await.expect_err("unknown rule");
    assert_eq!(err.kind, ErrorKind::InvalidSource, "{err}");
    assert!(err.message.contains("names no lint rule"), "{err}");
    assert_eq!(history(&mut c).await?.len(), 1);

    std::fs::write(
        &v2,
        "-- belay:allow=create-index-concurrently small table, built at deploy\nCREATE INDEX t_a_idx ON t (a);\n",
    )?;
    apply().await?;
    assert_eq!(
        history(&mut c).await?,
        [(Some("1".to_string()), true), (Some("2".to_string()), true)]
    );
    assert!(index_exists(&mut c).await?);
    Ok(())
}

#[tokio::test]
async fn a_table_created_earlier_in_the_same_run_is_not_live() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("V1__t.sql"), "CREATE TABLE t (a int);\n")?;
    std::fs::write(
        dir.path().join("V2__idx.sql"),
        "CREATE INDEX t_a_idx ON t (a);\n",
    )?;
    let api = LocalTargets::new([TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&db.url)?,
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    }])
    .with_script_gate("db", Arc::new(LintGate::new("skip hint")));
    let (sink, warnings) = collect_warnings();
    api.apply("db", &Target::default(), &ApplyOptions::default(), sink)
        .await?;
    let mut c = PgConnection::connect(&db.url).await?;
    assert_eq!(history(&mut c).await?.len(), 2);
    assert!(index_exists(&mut c).await?);
    // Downgraded, not hidden: the reason reaches the run's events (the agent streams them).
    let warnings = warnings.lock().expect("warnings").clone();
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "lint: 1 finding(s) in 1 script(s) downgraded: their tables are created earlier in this run"
        )),
        "{warnings:#?}"
    );
    Ok(())
}

/// An event sink keeping the `warning` events' messages.
fn collect_warnings() -> (events::EventSink, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let sink: events::EventSink = Arc::new(move |e: &events::Event| {
        if let events::EventKind::Warning { message } = &e.kind
            && let Ok(mut v) = keep.lock()
        {
            v.push(message.clone());
        }
    });
    (sink, seen)
}

/// The gate the agent installs reads the facts on the run's own session: an existing
/// empty table's lock findings are downgraded with the reason and the run applies; the
/// same script on a table over the thresholds is refused with nothing applied; per-target
/// thresholds decide.
#[tokio::test]
async fn the_executors_gate_judges_with_the_run_sessions_facts() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    belay_testkit::psql(
        &db.url,
        "CREATE TABLE empty_t (a int); CREATE TABLE full_t (a int);         INSERT INTO full_t SELECT generate_series(1, 20000); ANALYZE full_t;",
    )?;
    let dir = tempfile::tempdir()?;
    let api = |gate: LintGate| {
        LocalTargets::new([TargetSpec {
            name: "db".into(),
            url: DatabaseUrl::parse(&db.url).expect("url"),
            dir: dir.path().to_path_buf(),
            exec: Default::default(),
        }])
        .with_script_gate("db", Arc::new(gate))
    };
    let mut c = PgConnection::connect(&db.url).await?;

    std::fs::write(
        dir.path().join("V1__idx.sql"),
        "CREATE INDEX full_a ON full_t (a);
",
    )?;
    let err = api(LintGate::new("skip hint"))
        .apply(
            "db",
            &Target::default(),
            &ApplyOptions::default(),
            events::discard(),
        )
        .await
        .expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Refused, "{err}");
    assert!(
        err.message.contains("error[create-index-concurrently]"),
        "{err}"
    );
    assert!(history(&mut c).await?.is_empty());

    // Thresholds are the target's: 20 000 rows are small under a 50 000-row limit.
    let roomy = belay_lint::SmallTable {
        max_rows: 50_000,
        ..belay_lint::SmallTable::default()
    };
    let (sink, warnings) = collect_warnings();
    api(LintGate::new("skip hint").with_small_table(roomy))
        .apply("db", &Target::default(), &ApplyOptions::default(), sink)
        .await?;
    assert!(
        warnings
            .lock()
            .expect("warnings")
            .iter()
            .any(|w| w.contains("downgraded: table public.full_t is small (~20000 rows")),
        "{warnings:?}"
    );

    std::fs::write(
        dir.path().join("V2__idx.sql"),
        "CREATE INDEX empty_a ON empty_t (a);
ALTER TABLE empty_t ALTER COLUMN a TYPE bigint;
",
    )?;
    let (sink, warnings) = collect_warnings();
    api(LintGate::new("skip hint"))
        .apply("db", &Target::default(), &ApplyOptions::default(), sink)
        .await?;
    let warnings = warnings.lock().expect("warnings").clone();
    for rule in ["create-index-concurrently", "column-type-rewrite"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&format!("warning[{rule}]"))
                    && w.contains("downgraded: table public.empty_t is empty: the")),
            "{rule}: {warnings:#?}"
        );
    }
    assert_eq!(history(&mut c).await?.len(), 2);
    Ok(())
}

/// The catalog query on its own: names as scripts write them (bare, schema-qualified,
/// quoted case), an index resolved to its table, a partitioned table summed over its
/// leaves, a missing name, the row estimate absent for a table never analyzed.
#[tokio::test]
async fn read_facts_resolves_what_scripts_name() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    belay_testkit::psql(
        &db.url,
        "CREATE SCHEMA app;\
         CREATE TABLE app.orders (id int); INSERT INTO app.orders SELECT generate_series(1, 500); ANALYZE app.orders;\
         CREATE INDEX orders_id ON app.orders (id);\
         CREATE TABLE \"Mixed\" (id int);\
         CREATE TABLE raw (id int) WITH (autovacuum_enabled = false); INSERT INTO raw VALUES (1);\
         CREATE TABLE ev (at date, n int) PARTITION BY RANGE (at);\
         CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');\
         CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');\
         INSERT INTO ev SELECT '2020-06-01', g FROM generate_series(1, 300) g;\
         INSERT INTO ev SELECT '2021-06-01', g FROM generate_series(1, 200) g; ANALYZE ev_1; ANALYZE ev_2;",
    )?;
    let mut c = PgConnection::connect(&db.url).await?;
    let names = [
        "app.orders",
        "app.orders_id",
        "Mixed",
        "raw",
        "ev",
        "nosuch",
        "app.nosuch_idx",
    ]
    .map(String::from)
    .into();
    let facts =
        belay_guards::lint::read_facts(&mut c, &names, belay_lint::SmallTable::default()).await?;
    assert!(facts.server_version_num >= 120_000, "{facts:?}");
    let orders = &facts.relations["app.orders"];
    assert_eq!(orders.name, "app.orders");
    assert_eq!(orders.estimated_rows, Some(500));
    assert!(
        orders.heap_bytes > 0 && orders.total_bytes > orders.heap_bytes,
        "{orders:?}"
    );
    assert_eq!(
        &facts.relations["app.orders_id"], orders,
        "an index gives its table"
    );
    assert_eq!(facts.relations["Mixed"].name, "public.\"Mixed\"");
    assert!(facts.relations["Mixed"].is_empty());
    assert_eq!(
        facts.relations["raw"].estimated_rows, None,
        "never analyzed"
    );
    assert!(!facts.relations["raw"].is_empty());
    let ev = &facts.relations["ev"];
    assert_eq!(
        ev.estimated_rows,
        Some(500),
        "summed over partitions: {ev:?}"
    );
    assert!(ev.heap_bytes > 0, "{ev:?}");
    assert_eq!(
        facts.missing,
        ["app.nosuch_idx", "nosuch"].map(String::from).into()
    );
    // The session is left as found: the SET LOCAL lock_timeout would still show inside
    // an open transaction.
    let lock_timeout: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&mut c)
        .await?;
    assert_eq!(lock_timeout, "0");
    Ok(())
}

/// A table analyzed while small and grown since is not small: the row estimate is scaled
/// to the pages the table has now, as the planner scales it.
#[tokio::test]
async fn a_table_grown_since_its_last_analyze_is_not_small() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    belay_testkit::psql(
        &db.url,
        "CREATE TABLE grown (id int) WITH (autovacuum_enabled = false);\
         INSERT INTO grown SELECT generate_series(1, 100); ANALYZE grown;\
         INSERT INTO grown SELECT generate_series(1, 300000);",
    )?;
    let mut c = PgConnection::connect(&db.url).await?;
    let names = ["grown".to_string()].into();
    let small = belay_lint::SmallTable::default();
    let facts = belay_guards::lint::read_facts(&mut c, &names, small).await?;
    let grown = &facts.relations["grown"];
    assert!(grown.total_bytes < small.max_bytes, "{grown:?}");
    assert!(
        grown.estimated_rows.is_some_and(|r| r > 100_000),
        "{grown:?}"
    );
    assert!(!grown.is_small(small), "{grown:?}");
    Ok(())
}
