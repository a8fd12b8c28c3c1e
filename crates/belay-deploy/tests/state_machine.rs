//! The pipeline's state machine over small in-process fakes of the capability traits
//! (the crate's seam): the order of the steps, each failure path, the lock-trip budget,
//! the failure handler. The real binary on a real database is `bins/belay/tests/pipeline.rs`.

// Test helpers unwrap: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use belay_core::{ApiError, ErrorKind};
use belay_deploy::{
    AppliedMigration, Cause, DeployError, DeployEvent, DeploymentLog, DeploymentPolicy,
    DeploymentRecord, DeploymentRequest, FailureHandler, MemoryLog, OnFailure, Pipeline, Step,
    StepFailure,
};
use belay_health::{
    CheckResult, HealthApi, PostflightSpec, PreflightOptions, ProbeEvent, ProbeEvents, TargetProbe,
    UserCheck,
};
use belay_migrate::{
    ApplyOptions, Direction, Event, EventKind, EventSink, MigrationApi, MigrationStatus, PlanView,
    RepairAction, RunReport, StepResult, Target, UndoTarget, Validation,
};
use serde_json::json;
use uuid::Uuid;

fn unused() -> ApiError {
    ApiError::new(ErrorKind::Internal, "not used by the pipeline")
}

/// Replays `events` as the executor would, then returns `result`.
struct FakeMigrations {
    events: Vec<EventKind>,
    error: Option<ApiError>,
    applies: Mutex<u32>,
}

impl FakeMigrations {
    fn new(events: Vec<EventKind>) -> Self {
        FakeMigrations {
            events,
            error: None,
            applies: Mutex::new(0),
        }
    }

    fn failing(mut self, e: ApiError) -> Self {
        self.error = Some(e);
        self
    }

    fn applies(&self) -> u32 {
        *self.applies.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl MigrationApi for FakeMigrations {
    async fn status(&self, _: &str) -> Result<Vec<MigrationStatus>, ApiError> {
        Ok(Vec::new())
    }
    async fn plan(&self, _: &str, _: &Target, _: bool) -> Result<PlanView, ApiError> {
        Err(unused())
    }
    async fn apply(
        &self,
        _: &str,
        _: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        *self.applies.lock().unwrap() += 1;
        let deployment_id = options.deployment_id.expect("the pipeline names the run");
        let mut results = Vec::new();
        for kind in &self.events {
            if let EventKind::Succeeded {
                version, script, ..
            } = kind
            {
                results.push(StepResult {
                    version: version.clone(),
                    script: script.clone(),
                    direction: Direction::Forward,
                    execution_ms: 1,
                    retries: 0,
                    lock_wait_ms: 0,
                });
            }
            sink(&Event {
                deployment_id,
                at: chrono::Utc::now(),
                kind: kind.clone(),
            });
        }
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(RunReport {
                deployment_id,
                results,
                other_runner: None,
            }),
        }
    }
    async fn undo(
        &self,
        _: &str,
        _: &UndoTarget,
        _: Option<Uuid>,
        _: EventSink,
    ) -> Result<RunReport, ApiError> {
        Err(unused())
    }
    async fn validate(&self, _: &str) -> Result<Validation, ApiError> {
        Err(unused())
    }
    async fn repair(
        &self,
        _: &str,
        _: &belay_migrate::RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError> {
        Err(unused())
    }
    async fn baseline(&self, _: &str, _: &str, _: &str) -> Result<(), ApiError> {
        Err(unused())
    }
}

#[derive(Default)]
struct FakeHealth {
    preflight: Vec<CheckResult>,
    postflight: Vec<CheckResult>,
    /// What the postflight says from its second run on (the canary soak's), when set.
    postflight_again: Option<Vec<CheckResult>>,
    probe_events: Vec<ProbeEvent>,
    calls: Mutex<Vec<String>>,
}

impl FakeHealth {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl HealthApi for FakeHealth {
    async fn preflight(&self, _: &str, _: &PreflightOptions) -> Result<Vec<CheckResult>, ApiError> {
        self.calls.lock().unwrap().push("preflight".into());
        Ok(self.preflight.clone())
    }
    async fn postflight(&self, _: &str, _: &PostflightSpec) -> Result<Vec<CheckResult>, ApiError> {
        let mut calls = self.calls.lock().unwrap();
        let again = calls.iter().any(|c| c == "postflight");
        calls.push("postflight".into());
        Ok(match (&self.postflight_again, again) {
            (Some(later), true) => later.clone(),
            _ => self.postflight.clone(),
        })
    }
    async fn probe(
        &self,
        _: &str,
        probe: &TargetProbe,
        _: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("probe {}", probe.name));
        let events: Vec<Result<ProbeEvent, ApiError>> =
            self.probe_events.iter().cloned().map(Ok).collect();
        Ok(Box::pin(futures::stream::iter(events)))
    }
}

fn check(name: &str, status: &str, value: &str, query: Option<&str>) -> CheckResult {
    serde_json::from_value(json!({
        "name": name, "status": status, "value": value, "threshold": "expect zero",
        "remedy": "", "query": query,
    }))
    .unwrap()
}

fn probe_event(seq: u64, failures: u32, triggered: bool) -> ProbeEvent {
    serde_json::from_value(json!({
        "at": chrono::Utc::now(), "probe": "api", "target": "t", "seq": seq,
        "result": if failures > 0 { "fail" } else { "pass" },
        "evidence": { "status": if failures > 0 { 503 } else { 200 }, "elapsed_ms": 1 },
        "consecutive_failures": failures, "consecutive_successes": u32::from(failures == 0),
        "failure_threshold": 2,
        "state": if triggered { "triggered" } else { "healthy" },
        "triggered": triggered,
    }))
    .unwrap()
}

fn started(script: &str) -> EventKind {
    EventKind::Started {
        version: Some("1".into()),
        script: script.into(),
        direction: Direction::Forward,
        in_transaction: true,
    }
}

fn succeeded(version: &str, script: &str) -> EventKind {
    EventKind::Succeeded {
        version: Some(version.into()),
        script: script.into(),
        direction: Direction::Forward,
        execution_ms: 1,
        retries: 0,
        lock_wait_ms: 0,
    }
}

fn trip() -> EventKind {
    EventKind::LockGuardTripped {
        version: Some("1".into()),
        script: "V1__t.sql".into(),
        line: 1,
        attempt: 1,
        blocked_sessions: 3,
        longest_wait_ms: 700,
        blockers: vec![42],
        blocked_by: Vec::new(),
        cancelled: true,
    }
}

/// A run that backs up and applies V1.
fn applying() -> Vec<EventKind> {
    vec![
        EventKind::RunnerAcquired { waited_ms: 0 },
        EventKind::BackupTaken {
            id: "b-1".into(),
            scope: "full".into(),
            ms: 5,
        },
        started("V1__t.sql"),
        succeeded("1", "V1__t.sql"),
    ]
}

fn catalog() -> Vec<AppliedMigration> {
    vec![AppliedMigration {
        version: Some("1".into()),
        script: "V1__t.sql".into(),
        checksum: Some("abc".into()),
        has_undo: true,
        irreversible: false,
    }]
}

fn request(policy: DeploymentPolicy) -> DeploymentRequest {
    DeploymentRequest {
        id: Uuid::new_v4(),
        target: "t".into(),
        forward: Target::default(),
        environment: None,
        requested_by: None,
        release: None,
        policy,
        catalog: Some(catalog()),
    }
}

struct Harness {
    migrations: Arc<FakeMigrations>,
    health: Arc<FakeHealth>,
    log: Arc<MemoryLog>,
    seen: Arc<Mutex<Vec<DeployEvent>>>,
}

impl Harness {
    fn new(migrations: FakeMigrations, health: FakeHealth) -> Self {
        Harness {
            migrations: Arc::new(migrations),
            health: Arc::new(health),
            log: Arc::new(MemoryLog::new()),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn pipeline(&self) -> Pipeline {
        Pipeline::new(
            self.migrations.clone(),
            self.health.clone(),
            self.log.clone(),
        )
    }

    async fn run(&self, policy: DeploymentPolicy) -> belay_deploy::Deployment {
        self.run_with(self.pipeline(), policy).await.unwrap()
    }

    async fn run_with(
        &self,
        pipeline: Pipeline,
        policy: DeploymentPolicy,
    ) -> Result<belay_deploy::Deployment, DeployError> {
        let seen = self.seen.clone();
        pipeline
            .run(
                request(policy),
                Arc::new(move |e: &DeployEvent| seen.lock().unwrap().push(e.clone())),
            )
            .await
    }

    async fn events(&self, id: Uuid) -> Vec<DeployEvent> {
        self.log.events(id).await.unwrap()
    }

    async fn transitions(&self, id: Uuid) -> Vec<String> {
        self.events(id)
            .await
            .iter()
            .filter(|e| e.kind == "transition")
            .map(|e| e.payload["to"].as_str().unwrap().to_string())
            .collect()
    }
}

fn watching(probes: &[&str]) -> DeploymentPolicy {
    let mut policy = DeploymentPolicy::default();
    policy.watch.duration = Some(Duration::from_secs(1));
    policy.watch.probes = probes
        .iter()
        .map(|n| TargetProbe::http(*n, "http://127.0.0.1:1/health"))
        .collect();
    policy
}

#[tokio::test]
async fn a_deployment_walks_every_step_in_order_and_records_what_it_applied() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            preflight: vec![check("connectivity", "pass", "ok", None)],
            postflight: vec![check("no_nulls", "pass", "0", Some("SELECT 0"))],
            probe_events: vec![probe_event(1, 0, false)],
            ..FakeHealth::default()
        },
    );
    let d = h.run(watching(&["api"])).await;
    let id = d.record.start.id;
    assert!(d.failure.is_none(), "{:?}", d.failure);
    assert_eq!(
        h.transitions(id).await,
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
            "succeeded"
        ]
    );
    assert_eq!(
        h.health.calls(),
        ["preflight", "postflight", "probe api"],
        "each step calls its capability once, in order"
    );
    let events = h.events(id).await;
    // Gap-free, and the caller saw exactly what the log holds, in order.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(*h.seen.lock().unwrap(), events);
    // The backup is on record before migrating starts; every executor event is kept.
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let what = e.payload["event"]
                .as_str()
                .or(e.payload["to"].as_str())
                .unwrap_or("")
                .to_string();
            (e.kind.clone(), what)
        })
        .collect();
    let pos = |k: &str, w: &str| {
        kinds
            .iter()
            .position(|(a, b)| a == k && b == w)
            .unwrap_or_else(|| panic!("{k} {w} in {kinds:?}"))
    };
    assert!(pos("migration", "backup_taken") < pos("transition", "migrating"));
    assert!(pos("transition", "migrating") < pos("migration", "started"));
    assert!(pos("migration", "succeeded") < pos("transition", "validating"));
    assert!(
        events
            .iter()
            .any(|e| e.kind == "check" && e.step == Step::Preflight)
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "check" && e.step == Step::Validating)
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "probe" && e.step == Step::Watching)
    );
    let outcome = d.record.outcome.expect("finished");
    assert_eq!(outcome.state, Step::Succeeded);
    assert_eq!(d.record.step, Step::Succeeded);
    assert_eq!(outcome.backup_id.as_deref(), Some("b-1"));
    assert_eq!(outcome.applied, catalog());
    assert_eq!(outcome.to_version.as_deref(), Some("1"));
    assert_eq!(d.record.start.policy["watch"]["probes"][0]["name"], "api");
}

#[tokio::test]
async fn a_preflight_block_fails_before_anything_runs() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            preflight: vec![
                check("connectivity", "pass", "ok", None),
                check("lock_waits", "block", "2 sessions waiting", None),
            ],
            ..FakeHealth::default()
        },
    );
    let d = h.run(DeploymentPolicy::default()).await;
    let f = d.failure.expect("failed");
    assert_eq!(
        (f.step, f.cause, f.kind),
        (Step::Preflight, Cause::Blocked, ErrorKind::Refused)
    );
    assert!(f.reason.contains("lock_waits"), "{}", f.reason);
    assert_eq!(f.evidence["blocked"][0]["name"], "lock_waits");
    assert_eq!(h.migrations.applies(), 0, "nothing applied");
    assert_eq!(h.health.calls(), ["preflight"]);
    let id = d.record.start.id;
    assert_eq!(h.transitions(id).await, ["planned", "preflight", "failed"]);
    let outcome = d.record.outcome.unwrap();
    assert_eq!(outcome.failed_step, Some(Step::Preflight));
    assert!(outcome.applied.is_empty());
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_not_refused() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            preflight: vec![check("connectivity", "block", "could not connect", None)],
            ..FakeHealth::default()
        },
    );
    let f = h.run(DeploymentPolicy::default()).await.failure.unwrap();
    assert_eq!(f.kind, ErrorKind::Unavailable);
    assert_eq!(h.migrations.applies(), 0);
}

#[tokio::test]
async fn skipped_checks_still_pass_through_their_steps() {
    let h = Harness::new(FakeMigrations::new(applying()), FakeHealth::default());
    let mut policy = DeploymentPolicy::default();
    policy.preflight.skip = true;
    policy.postflight.skip = true;
    let d = h.run(policy).await;
    assert!(d.failure.is_none());
    assert!(h.health.calls().is_empty(), "{:?}", h.health.calls());
    let id = d.record.start.id;
    let events = h.events(id).await;
    let reasons: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "transition")
        .map(|e| e.payload["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[1].contains("skipped"), "{reasons:?}");
    assert_eq!(
        h.transitions(id).await,
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "succeeded"
        ],
        "no watch window: no watching step"
    );
}

#[tokio::test]
async fn a_refusal_before_the_first_statement_fails_at_backing_up() {
    let h = Harness::new(
        FakeMigrations::new(vec![EventKind::RunnerAcquired { waited_ms: 0 }]).failing(
            ApiError::new(
                ErrorKind::Refused,
                "migrate refused: 1 lint error(s) in pending migrations; nothing was applied",
            ),
        ),
        FakeHealth::default(),
    );
    let d = h.run(DeploymentPolicy::default()).await;
    let f = d.failure.unwrap();
    assert_eq!(
        (f.step, f.kind, f.cause),
        (Step::BackingUp, ErrorKind::Refused, Cause::Error)
    );
    assert!(f.reason.contains("lint error"), "{}", f.reason);
    let id = d.record.start.id;
    assert_eq!(
        h.transitions(id).await,
        ["planned", "preflight", "backing_up", "failed"]
    );
    assert!(
        !h.health.calls().contains(&"postflight".to_string()),
        "no validation after a failure"
    );
}

#[tokio::test]
async fn a_failed_migration_fails_at_migrating_with_its_event_on_record() {
    let mut events = applying();
    events.push(started("V2__bad.sql"));
    events.push(EventKind::Failed {
        version: Some("2".into()),
        script: "V2__bad.sql".into(),
        direction: Direction::Forward,
        error: "V2__bad.sql:3: relation \"nope\" does not exist".into(),
    });
    let h = Harness::new(
        FakeMigrations::new(events).failing(ApiError::new(
            ErrorKind::MigrationFailed,
            "V2__bad.sql:3: relation \"nope\" does not exist",
        )),
        FakeHealth::default(),
    );
    let d = h.run(DeploymentPolicy::default()).await;
    let f = d.failure.unwrap();
    assert_eq!(
        (f.step, f.kind),
        (Step::Migrating, ErrorKind::MigrationFailed)
    );
    let id = d.record.start.id;
    let failed: Vec<DeployEvent> = h
        .events(id)
        .await
        .into_iter()
        .filter(|e| e.kind == "migration" && e.payload["event"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].payload["error"]
            .as_str()
            .unwrap()
            .contains("V2__bad.sql:3")
    );
    // V1 committed before V2 failed: the record says so.
    let outcome = d.record.outcome.unwrap();
    assert_eq!(outcome.applied, catalog());
    assert_eq!(outcome.backup_id.as_deref(), Some("b-1"));
}

#[tokio::test]
async fn a_failing_assertion_fails_at_validating_naming_it() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            postflight: vec![
                check("invalid_indexes", "pass", "none", None),
                check(
                    "no_null_emails",
                    "block",
                    "got 1 row, first value 3",
                    Some("SELECT count(*) FROM users WHERE email IS NULL"),
                ),
            ],
            ..FakeHealth::default()
        },
    );
    let mut policy = watching(&["api"]);
    policy.postflight.spec.checks.push(UserCheck {
        name: "no_null_emails".into(),
        query: "SELECT count(*) FROM users WHERE email IS NULL".into(),
        expect: belay_health::Expectation::Zero,
    });
    let d = h.run(policy).await;
    let f = d.failure.unwrap();
    assert_eq!(
        (f.step, f.cause),
        (Step::Validating, Cause::AssertionFailed)
    );
    assert!(f.reason.contains("no_null_emails"), "{}", f.reason);
    assert!(f.reason.contains("first value 3"), "{}", f.reason);
    assert_eq!(f.evidence["failed"][0]["name"], "no_null_emails");
    assert_eq!(
        f.evidence["failed"][0]["query"],
        "SELECT count(*) FROM users WHERE email IS NULL"
    );
    assert_eq!(f.evidence["failed"].as_array().unwrap().len(), 1);
    assert!(
        !h.health.calls().iter().any(|c| c.starts_with("probe")),
        "no watch after a failed validation"
    );
    assert_eq!(
        d.record.outcome.unwrap().applied,
        catalog(),
        "stays applied"
    );
}

#[tokio::test]
async fn a_probe_crossing_its_threshold_fails_at_watching() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            probe_events: vec![
                probe_event(1, 1, false),
                probe_event(2, 2, true),
                probe_event(3, 3, false),
            ],
            ..FakeHealth::default()
        },
    );
    let d = h.run(watching(&["api"])).await;
    let f = d.failure.unwrap();
    assert_eq!((f.step, f.cause), (Step::Watching, Cause::ProbeTriggered));
    assert!(
        f.reason.contains("probe api crossed its failure threshold"),
        "{}",
        f.reason
    );
    assert_eq!(f.evidence["seq"], 2);
    assert_eq!(f.evidence["evidence"]["status"], 503);
    let id = d.record.start.id;
    let probes = h
        .events(id)
        .await
        .into_iter()
        .filter(|e| e.kind == "probe")
        .count();
    assert_eq!(probes, 2, "the watch stops at the triggering event");
}

#[tokio::test]
async fn the_lock_trip_budget_is_judged_when_the_executor_returns() {
    let mut events = applying();
    events.insert(2, trip());
    events.insert(3, trip());
    let h = Harness::new(FakeMigrations::new(events.clone()), FakeHealth::default());
    let mut policy = DeploymentPolicy {
        lock_trip_budget: Some(1),
        ..DeploymentPolicy::default()
    };
    let d = h.run(policy.clone()).await;
    let f = d.failure.unwrap();
    assert_eq!((f.step, f.cause), (Step::Migrating, Cause::LockTripBudget));
    assert_eq!(f.evidence["lock_trips"].as_array().unwrap().len(), 2);
    assert_eq!(f.evidence["lock_trips"][0]["blockers"], json!([42]));
    assert_eq!(h.health.calls(), ["preflight"], "no validation over budget");
    // Within budget: the trips are on record, the deployment goes on.
    let h = Harness::new(FakeMigrations::new(events), FakeHealth::default());
    policy.lock_trip_budget = Some(2);
    assert!(h.run(policy).await.failure.is_none());
}

struct Recorder(Mutex<Vec<(Step, Step)>>);

#[async_trait::async_trait]
impl FailureHandler for Recorder {
    async fn handle(
        &self,
        record: &DeploymentRecord,
        failure: &StepFailure,
    ) -> Result<(), ApiError> {
        self.0.lock().unwrap().push((record.step, failure.step));
        Ok(())
    }
}

#[tokio::test]
async fn rollback_needs_a_handler_and_gets_the_failure() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            postflight: vec![check("no_dups", "block", "got 2 rows", Some("SELECT 1"))],
            ..FakeHealth::default()
        },
    );
    let policy = DeploymentPolicy {
        on_failure: OnFailure::Rollback,
        ..DeploymentPolicy::default()
    };
    let err = h.run_with(h.pipeline(), policy.clone()).await.unwrap_err();
    assert!(matches!(err, DeployError::Policy(_)), "{err}");
    assert!(err.to_string().contains("rollback"), "{err}");
    assert_eq!(h.migrations.applies(), 0, "refused before anything runs");
    assert!(h.health.calls().is_empty());
    assert!(h.log.list(10).await.unwrap().is_empty(), "nothing recorded");

    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let pipeline = h.pipeline().with_failure_handler(recorder.clone());
    let d = h.run_with(pipeline, policy).await.unwrap();
    assert_eq!(d.failure.unwrap().step, Step::Validating);
    assert_eq!(
        *recorder.0.lock().unwrap(),
        [(Step::Failed, Step::Validating)],
        "called once, after the failure is on record"
    );
    let events = h.events(d.record.start.id).await;
    assert_eq!(events.last().unwrap().kind, "failure_handler");
}

#[tokio::test]
async fn policies_the_pipeline_cannot_run_are_refused() {
    let h = Harness::new(FakeMigrations::new(applying()), FakeHealth::default());
    let err = h
        .run_with(h.pipeline(), watching(&["api", "api"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("two probes are named"), "{err}");
    let err = h.run_with(h.pipeline(), watching(&[])).await.unwrap_err();
    assert!(err.to_string().contains("needs probes"), "{err}");
    assert_eq!(h.migrations.applies(), 0);
}

#[tokio::test]
async fn the_memory_log_keeps_a_persistent_logs_rules() {
    let log = MemoryLog::new();
    let h = Harness::new(FakeMigrations::new(applying()), FakeHealth::default());
    let d = h.run(DeploymentPolicy::default()).await;
    let id = d.record.start.id;
    let outcome = d.record.outcome.clone().unwrap();
    // A finished deployment takes no second outcome.
    assert!(h.log.finish(id, &outcome).await.is_err());
    // Unknown deployments are errors, not silently created.
    let mut e = h.events(id).await[0].clone();
    e.deployment_id = Uuid::new_v4();
    assert!(log.append(e).await.is_err());
    assert_eq!(h.log.list(5).await.unwrap()[0].start.id, id);
    let policy: DeploymentPolicy =
        serde_json::from_value(json!({ "on_failure": "rollback", "lock_trip_budget": 3,
            "watch": { "duration": "30s" } }))
        .unwrap();
    assert_eq!(policy.on_failure, OnFailure::Rollback);
    assert_eq!(policy.watch.duration, Some(Duration::from_secs(30)));
}

fn soaking(probes: &[&str], window: Option<Duration>) -> DeploymentPolicy {
    let mut policy = watching(probes);
    policy.watch.duration = window;
    policy.watch.soak = Some(Duration::from_secs(1));
    policy
}

#[tokio::test]
async fn the_canary_soak_probes_again_then_reruns_the_postflight_at_watching() {
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            postflight: vec![check("no_nulls", "pass", "0", Some("SELECT 0"))],
            probe_events: vec![probe_event(1, 0, false)],
            ..FakeHealth::default()
        },
    );
    let d = h.run(soaking(&["api"], Some(Duration::from_secs(1)))).await;
    assert!(d.failure.is_none(), "{:?}", d.failure);
    let id = d.record.start.id;
    assert_eq!(
        h.transitions(id).await,
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
            "succeeded"
        ]
    );
    // The window's probes, then the soak's, then the postflight once more.
    assert_eq!(
        h.health.calls(),
        [
            "preflight",
            "postflight",
            "probe api",
            "probe api",
            "postflight"
        ]
    );
    let events = h.events(id).await;
    let soak_probes = events
        .iter()
        .filter(|e| e.kind == "probe" && e.payload["phase"] == "canary_soak")
        .count();
    assert_eq!(soak_probes, 1, "{events:?}");
    assert!(
        events.iter().any(|e| e.kind == "check"
            && e.step == Step::Watching
            && e.payload["phase"] == "canary_soak"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_canary_failing_its_soak_fails_at_watching_with_the_evidence() {
    // A probe crossing its threshold in the soak (no watch window before it).
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            probe_events: vec![probe_event(1, 1, false), probe_event(2, 2, true)],
            ..FakeHealth::default()
        },
    );
    let d = h.run(soaking(&["api"], None)).await;
    let f = d.failure.unwrap();
    assert_eq!((f.step, f.cause), (Step::Watching, Cause::ProbeTriggered));
    assert!(
        f.reason.starts_with("canary soak: probe api"),
        "{}",
        f.reason
    );
    assert_eq!(f.evidence["phase"], "canary_soak");
    assert_eq!(f.evidence["seq"], 2);

    // The postflight passing after migrating and failing at the soak's end.
    let h = Harness::new(
        FakeMigrations::new(applying()),
        FakeHealth {
            postflight: vec![check("no_nulls", "pass", "0", Some("SELECT 0"))],
            postflight_again: Some(vec![check(
                "no_nulls",
                "block",
                "3",
                Some("SELECT count(*) FROM t WHERE x IS NULL"),
            )]),
            probe_events: vec![probe_event(1, 0, false)],
            ..FakeHealth::default()
        },
    );
    let d = h.run(soaking(&["api"], None)).await;
    let f = d.failure.unwrap();
    assert_eq!((f.step, f.cause), (Step::Watching, Cause::AssertionFailed));
    assert!(
        f.reason
            .starts_with("canary soak: postflight failed: no_nulls: 3"),
        "{}",
        f.reason
    );
    assert_eq!(f.evidence["phase"], "canary_soak");
    assert_eq!(f.evidence["failed"][0]["name"], "no_nulls");
    assert_eq!(d.record.outcome.unwrap().failed_step, Some(Step::Watching));
}

#[tokio::test]
async fn a_canary_soak_without_probes_is_refused_naming_the_key() {
    let asked = belay_deploy::DeployerPolicy {
        soak: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let err = DeploymentPolicy::compose("c_1", &asked, &belay_deploy::TargetPolicy::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("--canary-soak") && msg.contains("c_1") && msg.contains("[[targets.probes]]"),
        "{msg}"
    );
    let h = Harness::new(FakeMigrations::new(applying()), FakeHealth::default());
    let err = h
        .run_with(h.pipeline(), soaking(&[], None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs probes"), "{err}");
    assert_eq!(h.migrations.applies(), 0);
}

#[tokio::test]
async fn an_agent_settles_the_runs_an_earlier_process_left_unfinished() {
    use belay_deploy::{NewDeployment, PipelineDeployer, TargetDeployApi, TargetRun};
    let log = Arc::new(MemoryLog::new());
    let record = |id: Uuid, target: &str| NewDeployment {
        id,
        target: target.into(),
        started_at: chrono::Utc::now() - chrono::Duration::minutes(5),
        environment: None,
        requested_by: None,
        release: None,
        from_version: None,
        to_version: None,
        policy: json!({}),
    };
    // One run left at migrating by a process that died, one that finished, and one of a
    // target this agent does not own.
    let (cut, done, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (id, target) in [(cut, "t"), (done, "t"), (other, "elsewhere")] {
        log.begin(&record(id, target)).await.unwrap();
        log.append(DeployEvent {
            deployment_id: id,
            target: target.into(),
            seq: 0,
            at: chrono::Utc::now(),
            step: Step::Migrating,
            kind: "transition".into(),
            message: "backing_up → migrating".into(),
            payload: json!({ "to": "migrating" }),
        })
        .await
        .unwrap();
    }
    let finished = belay_deploy::DeploymentOutcome {
        state: Step::Succeeded,
        finished_at: chrono::Utc::now(),
        failed_step: None,
        reason: None,
        evidence: serde_json::Value::Null,
        to_version: None,
        backup_id: None,
        applied: vec![],
    };
    log.finish(done, &finished).await.unwrap();
    let for_log = log.clone();
    let deployer = PipelineDeployer::new(
        Arc::new(FakeMigrations::new(applying())),
        Arc::new(FakeHealth::default()),
        Arc::new(move |_: &str| Ok(for_log.clone() as Arc<dyn DeploymentLog>)),
        [("t".to_string(), belay_deploy::TargetPolicy::default())],
    );
    assert_eq!(deployer.settle("t").await.unwrap(), [cut]);
    // Settled once: a second pass finds nothing.
    assert!(deployer.settle("t").await.unwrap().is_empty());
    let settled = log.get(cut).await.unwrap().unwrap();
    assert_eq!(settled.step, Step::Failed);
    let outcome = settled.outcome.unwrap();
    assert_eq!(outcome.failed_step, Some(Step::Migrating));
    assert!(
        outcome
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("the agent stopped during migrating")),
        "{outcome:?}"
    );
    assert_eq!(
        log.get(done).await.unwrap().unwrap().outcome,
        Some(finished.clone())
    );
    assert!(log.get(other).await.unwrap().unwrap().outcome.is_none());

    // What the controller is told.
    match deployer.deployment("t", cut).await.unwrap() {
        TargetRun::Finished(o) => assert_eq!(o.failed_step, Some(Step::Migrating)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        deployer.deployment("t", done).await.unwrap(),
        TargetRun::Finished(finished)
    );
    assert_eq!(
        deployer.deployment("t", Uuid::new_v4()).await.unwrap(),
        TargetRun::NotFound
    );
    let err = deployer.deployment("nope", cut).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownTarget);
}

#[test]
fn the_deployers_thresholds_tighten_the_targets_and_never_loosen_them() {
    let own = belay_deploy::TargetPolicy {
        thresholds: belay_health::Thresholds {
            lock_wait_block: Duration::from_secs(1),
            long_query_block: Duration::from_secs(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let asked = belay_deploy::DeployerPolicy {
        thresholds: [
            ("lock_wait_block".to_string(), json!("300ms")),
            ("long_query_block".to_string(), json!("1h")),
        ]
        .into(),
        ..Default::default()
    };
    let policy = DeploymentPolicy::compose("t_1", &asked, &own).unwrap();
    let t = &policy.preflight.thresholds;
    assert_eq!(t.lock_wait_block, Duration::from_millis(300), "tightened");
    assert_eq!(t.long_query_block, Duration::from_secs(10), "not loosened");
    // Keys the deployer did not set keep the target's value, not the default's.
    assert_eq!(
        t.idle_in_transaction_block,
        own.thresholds.idle_in_transaction_block
    );
    // Nothing asked: the target's own thresholds.
    let plain = DeploymentPolicy::compose("t_1", &Default::default(), &own).unwrap();
    assert_eq!(plain.preflight.thresholds, own.thresholds);

    for (key, value, says) in [
        ("lock_wait", json!("1s"), "lock_wait_block"),
        ("lock_wait_block", json!("soon"), "[preflight]"),
    ] {
        let asked = belay_deploy::DeployerPolicy {
            thresholds: [(key.to_string(), value)].into(),
            ..Default::default()
        };
        let err = DeploymentPolicy::compose("t_1", &asked, &own).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DeployError::Policy(_)), "{msg}");
        assert!(msg.contains(says) && msg.contains(key), "{msg}");
    }
}
