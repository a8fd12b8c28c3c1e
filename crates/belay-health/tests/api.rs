//! `HealthApi` in-process (`HealthTargets`) against a real PostgreSQL: the target's
//! migration facts feed preflight and postflight, options reach the checks, and a probe's
//! stream ends with its window.

// Test helpers unwrap: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use belay_health::{
    CheckResult, CheckStatus, Expectation, HealthApi, HealthTarget, HealthTargets, MigrationFacts,
    MigrationSummary, PostflightSpec, PreflightOptions, ProbeResult, TargetProbe, VerifyScript,
};
use belay_testkit::{Cluster, TestDb};
use futures::StreamExt;

/// Fixed facts, as the migration engine would report them.
struct Facts;

#[async_trait::async_trait]
impl MigrationFacts for Facts {
    async fn summary(&self, _target: &str) -> Result<MigrationSummary, ApiError> {
        Ok(MigrationSummary {
            pending: 2,
            failed: vec!["3 (V3__bad.sql)".into()],
            drift: vec![],
            lock_tables: vec![],
        })
    }

    async fn verify_scripts(&self, _target: &str) -> Result<Vec<VerifyScript>, ApiError> {
        Ok(vec![VerifyScript::from((
            "V2__x/verify.sql".into(),
            "SELECT 1 AS bad_row".to_string(),
        ))])
    }
}

async fn target() -> (TestDb, HealthTargets) {
    let db = Cluster::shared().create_database().await.unwrap();
    let api = HealthTargets::new([(
        "shop".to_string(),
        HealthTarget {
            url: Some(DatabaseUrl::parse(&db.url).unwrap()),
            backup_dir: None,
        },
    )])
    .with_migration_facts(Arc::new(Facts));
    (db, api)
}

fn find<'a>(results: &'a [CheckResult], name: &str) -> Option<&'a CheckResult> {
    results.iter().find(|r| r.name == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_takes_the_targets_migration_state_and_the_callers_options() {
    let (_db, api) = target().await;
    let results = api
        .preflight("shop", &PreflightOptions::default())
        .await
        .unwrap();
    let failed = find(&results, "failed_migrations").unwrap();
    assert_eq!(failed.status, CheckStatus::Block);
    assert!(failed.value.contains("V3__bad.sql"), "{failed:?}");
    assert_eq!(
        find(&results, "pending_migrations").unwrap().value,
        "2 pending"
    );
    // No backup directory for this target: the disk check says so instead of measuring.
    assert!(
        find(&results, "disk_space")
            .unwrap()
            .value
            .starts_with("not checked"),
        "{results:?}"
    );

    let results = api
        .preflight(
            "shop",
            &PreflightOptions {
                migration_checks: false,
                ..PreflightOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(find(&results, "failed_migrations").is_none(), "{results:?}");

    let results = api
        .preflight(
            "shop",
            &PreflightOptions {
                overrides: vec!["failed_migrations".into()],
                reason: Some("repaired by hand".into()),
                ..PreflightOptions::default()
            },
        )
        .await
        .unwrap();
    let failed = find(&results, "failed_migrations").unwrap();
    assert_eq!(failed.status, CheckStatus::Warn);
    assert_eq!(failed.overridden.as_deref(), Some("repaired by hand"));

    let err = api
        .preflight(
            "shop",
            &PreflightOptions {
                overrides: vec!["failed_migrations".into()],
                ..PreflightOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn postflight_adds_the_targets_history_and_verify_scripts() {
    let (_db, api) = target().await;
    let results = api
        .postflight("shop", &PostflightSpec::default())
        .await
        .unwrap();
    let history = find(&results, "history").unwrap();
    assert_eq!(history.status, CheckStatus::Block);
    assert!(history.value.contains("V3__bad.sql"), "{history:?}");
    let verify = results
        .iter()
        .find(|r| r.name == "verify:V2__x/verify.sql")
        .unwrap_or_else(|| panic!("a verify.sql result in {results:?}"));
    assert_eq!(verify.status, CheckStatus::Block, "{verify:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_stream_ends_with_its_window_and_sql_probes_use_the_target() {
    let (_db, api) = target().await;
    let mut probe = TargetProbe::sql("q", "SELECT 1", Expectation::NoRows);
    probe.period = Duration::from_millis(50);
    probe.failure_threshold = 2;
    let mut events = api
        .probe("shop", &probe, Duration::from_millis(400))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(e) = events.next().await {
        seen.push(e.unwrap());
    }
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|e| e.result == ProbeResult::Fail),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|e| e.triggered).count(), 1, "{seen:?}");
    assert!(seen[1].triggered, "the second failure crosses threshold 2");

    // An HTTP probe needs no URL; an unknown target is refused up front.
    let err = api
        .probe(
            "nope",
            &TargetProbe::http("h", "http://127.0.0.1:1/"),
            Duration::from_secs(1),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::UnknownTarget);
    let mut bad = TargetProbe::http("h", "ftp://127.0.0.1/");
    bad.failure_threshold = 1;
    let err = api
        .probe("shop", &bad, Duration::from_secs(1))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}
