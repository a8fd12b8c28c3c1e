//! `migrate` as a one-target deployment: the policy from belay.toml and flags, its events
//! rendered, its outcome mapped to an exit code. Local mode runs the pipeline
//! (`belay_deploy::Pipeline`) in-process over this mode's capability APIs; remote mode
//! asks the controller's `DeployService.DeployTarget`, and the target's agent runs the
//! same pipeline beside the database. The steps themselves are the pipeline's.

use crate::cli::{MigrateChecks, OnFailureArg, Output, TargetArgs};
use crate::settings::Settings;
use crate::{Failure, exit};
use belay_core::{ApiError, DatabaseUrl, parse_duration};
use belay_deploy::{
    AppliedMigration, Cause, DeployError, DeployEvent, DeploySink, DeployerPolicy, DeploymentLog,
    DeploymentPolicy, DeploymentRequest, OnFailure, Pipeline, Step, StepFailure, TargetDeployApi,
    TargetDeployment,
};
use belay_health::{
    CheckResult, CheckStatus, HealthApi, PostflightSpec, PreflightOptions, ProbeEvents, ProbeSpec,
    TargetProbe,
};
use belay_migrate::Target;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where local deployments are recorded: the target's own history schema, beside
/// `schema_history`, on a session of the log's own (so a migration that fails and rolls
/// back still leaves its attempt on record for `belay history` and `belay deployments`).
pub fn local_log(
    url: &DatabaseUrl,
    settings: &Settings,
) -> Result<Arc<dyn DeploymentLog>, Failure> {
    let log = belay_guards::HistoryDeploymentLog::new(url.clone(), &settings.exec.history_schema)
        .map_err(|e| usage(e.to_string()))?;
    Ok(Arc::new(log))
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::USAGE,
        message: belay_core::redact_url(&message.into()),
    }
}

/// The deployment policy of `migrate`: belay.toml's thresholds, assertions, probes and
/// `[deploy]`, and the flags. `--watch` without probes is refused here, before anything
/// touches the database.
pub fn policy(
    settings: &Settings,
    checks: &MigrateChecks,
    backup_scope: Option<String>,
) -> Result<DeploymentPolicy, Failure> {
    let mut policy = DeploymentPolicy::default();
    if let Some(w) = &checks.watch {
        let window = parse_duration(w).map_err(|e| usage(format!("--watch: {e}")))?;
        if settings.probes.is_empty() {
            return Err(usage(
                "--watch needs probes: add [[probes]] to belay.toml (see `belay probe --help`)",
            ));
        }
        policy.watch.duration = Some(window);
        policy.watch.probes = settings
            .probes
            .iter()
            .cloned()
            .map(TargetProbe::from)
            .collect();
    }
    policy.preflight.skip = checks.no_preflight;
    policy.preflight.thresholds = settings.thresholds.clone();
    policy.preflight.overrides = checks.override_check.clone();
    policy.preflight.reason = checks.reason.clone();
    policy.backup.scope = backup_scope;
    policy.postflight.spec = settings.postflight.clone();
    policy.lock_trip_budget = settings.deploy.lock_trip_budget;
    policy.hooks = settings.deploy_hooks.clone();
    policy.on_failure = match checks.on_failure.or(settings.deploy.on_failure) {
        Some(OnFailureArg::Rollback) => OnFailure::Rollback,
        Some(OnFailureArg::Stop) | None => OnFailure::Stop,
    };
    Ok(policy)
}

/// Where the lint gate's notes (downgraded and allowed findings) go in text mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LintNotes {
    /// Local mode: on stderr, where the CLI's own lint pass printed them before the gate
    /// moved into the executor.
    Stderr,
    /// Remote mode: on stdout with the run's other events, as the agent's always were.
    Stdout,
}

/// What the deployment's record carries beyond the policy.
#[derive(Debug, Default)]
pub struct RecordArgs {
    /// The migrations as the files say (checksum, undo, irreversible): local mode only,
    /// where the files are.
    pub catalog: Option<Vec<AppliedMigration>>,
    /// `--release`: the application release the deployment ships.
    pub release: Option<String>,
    /// Where the rollback controller leaves how its rollback ended (`state`, `report`),
    /// for the exit message and the JSON document.
    pub rollback: Option<RollbackSlot>,
}

/// How a rollback of this deployment ended, once the failure handler has run.
pub type RollbackSlot = Arc<Mutex<Option<serde_json::Value>>>;

/// Runs `migrate` on `target` as a deployment and renders it: events as they come in
/// text, one document at the end in JSON. The exit code follows the failed step.
pub async fn migrate(
    pipeline: &Pipeline,
    target: &str,
    t: &TargetArgs,
    policy: DeploymentPolicy,
    record: RecordArgs,
    out: Output,
    lint_notes: LintNotes,
) -> Result<u8, Failure> {
    let RecordArgs {
        catalog,
        release,
        rollback,
    } = record;
    // Refused before anything runs or prints (e.g. `rollback` without a rollback
    // controller).
    pipeline.check(&policy).map_err(deploy_error)?;
    if policy.preflight.skip {
        eprintln!("warning: --no-preflight: migrating without the preflight checklist");
    }
    let request = DeploymentRequest {
        id: uuid::Uuid::new_v4(),
        target: target.to_string(),
        forward: Target {
            to: t.to.clone(),
            steps: t.steps,
        },
        environment: None,
        requested_by: crate::history_cmd::os_user(),
        release,
        policy,
        catalog,
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = render_sink(out, lint_notes, events.clone());
    let deployment = pipeline.run(request, sink).await.map_err(deploy_error)?;
    let events = events.lock().map(|v| v.clone()).unwrap_or_default();
    let rolled = rollback.and_then(|slot| slot.lock().ok().and_then(|v| v.clone()));
    let ended = Ended {
        failure: deployment.failure.as_ref().map(failure_of),
        record: serde_json::to_value(&deployment.record).unwrap_or_default(),
        report: deployment.report.as_ref().map(|r| serde_json::json!(r)),
    };
    finish(out, ended, &events, rolled)
}

/// Remote `migrate`: the deployment runs on the target's agent through the controller
/// (`DeployService.DeployTarget`), which records it as a one-target deployment; its events
/// are rendered here as they arrive, exactly as local mode renders its own pipeline's,
/// and its outcome maps to the same exit codes. The agent's lint gate runs under its
/// runner lock, and its notes go to stdout with the run's other events.
pub async fn migrate_remote(
    api: &dyn TargetDeployApi,
    target: &str,
    t: &TargetArgs,
    asked: DeployerPolicy,
    release: Option<String>,
    out: Output,
) -> Result<u8, Failure> {
    if asked.skip_preflight {
        eprintln!("warning: --no-preflight: migrating without the preflight checklist");
    }
    let request = TargetDeployment {
        id: uuid::Uuid::new_v4(),
        target: target.to_string(),
        forward: Target {
            to: t.to.clone(),
            steps: t.steps,
        },
        // The controller fills in the target's environment from its registry.
        environment: None,
        requested_by: crate::history_cmd::os_user(),
        release,
        asked,
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = render_sink(out, LintNotes::Stdout, events.clone());
    let deployed = api.deploy_target(request, sink).await?;
    let events = events.lock().map(|v| v.clone()).unwrap_or_default();
    let o = &deployed.outcome;
    let failure = (o.state != Step::Succeeded).then(|| StepFailure {
        step: o.failed_step.unwrap_or(Step::Failed),
        kind: deployed.kind.unwrap_or(belay_core::ErrorKind::Internal),
        cause: deployed.cause.unwrap_or(Cause::Error),
        reason: o.reason.clone().unwrap_or_default(),
        evidence: o.evidence.clone(),
    });
    let record = match &deployed.record {
        Some(r) => serde_json::to_value(r).unwrap_or_default(),
        None => serde_json::json!({ "outcome": o }),
    };
    // The executor's report is the payload of the run's `run_report` event.
    let report = events
        .iter()
        .rev()
        .find(|e| e.kind == belay_deploy::KIND_RUN_REPORT)
        .map(|e| e.payload.clone());
    let ended = Ended {
        failure: failure.as_ref().map(failure_of),
        record,
        report,
    };
    finish(out, ended, &events, None)
}

/// How a deployment ended, as `finish` renders it.
struct Ended {
    failure: Option<Failure>,
    /// The record as its log keeps it.
    record: serde_json::Value,
    /// The executor's report, when `apply` returned one.
    report: Option<serde_json::Value>,
}

fn deploy_error(e: DeployError) -> Failure {
    match e {
        DeployError::Policy(m) => usage(m),
        // The log lives in the target database: failing to write it means that database
        // cannot be reached or written, and nothing further was done.
        DeployError::Log(e) => Failure {
            code: exit::UNAVAILABLE,
            message: belay_core::redact_url(&e.to_string()),
        },
    }
}

/// The exit code and message of a failed deployment.
fn failure_of(f: &StepFailure) -> Failure {
    match f.cause {
        Cause::Blocked => {
            let blocked: Vec<CheckResult> =
                serde_json::from_value(f.evidence["blocked"].clone()).unwrap_or_default();
            match crate::health_cmd::refuse_on_block(&blocked, "migrate refused: preflight") {
                Err(failure) => failure,
                Ok(()) => Failure {
                    code: exit::REFUSED,
                    message: format!("migrate refused: {}", f.reason),
                },
            }
        }
        // Refused before anything changed, as a blocking preflight check is.
        Cause::HookFailed => Failure {
            code: exit::REFUSED,
            message: format!("migrate refused: {}", f.reason),
        },
        Cause::ProbeTriggered => Failure {
            code: exit::PROBE_FAILED,
            message: f.reason.clone(),
        },
        Cause::AssertionFailed | Cause::LockTripBudget => Failure {
            code: exit::DEPLOY_FAILED,
            message: format!("deployment failed at {}: {}", f.step, f.reason),
        },
        Cause::Error => ApiError::new(f.kind, f.reason.clone()).into(),
    }
}

/// Prints the end of a deployment: in JSON, its one document (the run report as before,
/// plus `deployment`: the record and every event); in text, nothing more (the events
/// said it all) but the error.
fn finish(
    out: Output,
    ended: Ended,
    events: &[DeployEvent],
    rollback: Option<serde_json::Value>,
) -> Result<u8, Failure> {
    let Ended {
        mut failure,
        mut record,
        report,
    } = ended;
    // The exit code stays the failed step's; the message says what became of it.
    if let (Some(f), Some(r)) = (failure.as_mut(), &rollback) {
        f.message.push_str(&format!(
            "; the deployment was then {} ({}): see `belay rollback status`",
            r["state"].as_str().unwrap_or("?"),
            r["report"]["strategy"].as_str().unwrap_or("?")
        ));
    }
    if out == Output::Text {
        return match failure {
            Some(f) => Err(f),
            None => Ok(0),
        };
    }
    let migration_events: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == belay_deploy::KIND_MIGRATION)
        .map(|e| &e.payload)
        .collect();
    record["events"] = serde_json::json!(events);
    let mut doc = serde_json::json!({
        "action": "migrate",
        "ok": failure.is_none(),
        "events": migration_events,
        "deployment": record,
    });
    if let Some(r) = report {
        doc["report"] = r;
    }
    if let Some(r) = rollback {
        doc["rollback"] = r;
    }
    let code = match failure {
        Some(f) => {
            let message = belay_core::redact_url(&f.message);
            doc["error"] = serde_json::json!(message);
            doc["exit_code"] = serde_json::json!(f.code);
            eprintln!("error: {message}");
            f.code
        }
        None => 0,
    };
    println!("{doc}");
    Ok(code)
}

/// Renders the deployment's events as they are recorded. Text: executor events as
/// before (lint notes where `lint_notes` says), the checks that did not pass,
/// one line per step where it helps, every probe attempt. JSON: collected for the final
/// document.
fn render_sink(
    out: Output,
    lint_notes: LintNotes,
    store: Arc<Mutex<Vec<DeployEvent>>>,
) -> DeploySink {
    let probe_attempts = AtomicU64::new(0);
    Arc::new(move |e: &DeployEvent| {
        if out == Output::Json {
            if let Ok(mut v) = store.lock() {
                v.push(e.clone());
            }
            return;
        }
        match e.kind.as_str() {
            belay_deploy::KIND_MIGRATION => {
                if lint_notes == LintNotes::Stderr && e.message.starts_with("warning: lint: ") {
                    eprintln!("{}", e.message);
                } else if !e.message.is_empty() && e.payload["event"] != "started" {
                    // A start is on record; on the terminal, its end says it all.
                    println!("{}", e.message);
                }
            }
            belay_deploy::KIND_CHECK => render_checks(e),
            belay_deploy::KIND_FAILURE_HANDLER => println!("{}", e.message),
            belay_deploy::KIND_HOOK if e.payload["warning"] == true => eprintln!("{}", e.message),
            belay_deploy::KIND_HOOK => println!("{}", e.message),
            belay_deploy::KIND_RUN_REPORT => render_report(&e.payload),
            belay_deploy::KIND_PROBE => {
                probe_attempts.fetch_add(1, Ordering::Relaxed);
                println!("{}", e.message);
            }
            belay_deploy::KIND_TRANSITION => {
                let to = e.payload["to"].as_str().unwrap_or_default();
                let from = e.payload["from"].as_str().unwrap_or_default();
                if to == Step::Watching.as_str() {
                    println!("{}", e.payload["reason"].as_str().unwrap_or_default());
                } else if to == Step::Succeeded.as_str() && from == Step::Watching.as_str() {
                    println!(
                        "healthy: {} probe attempt(s), no failure threshold crossed",
                        probe_attempts.load(Ordering::Relaxed)
                    );
                }
            }
            _ => {}
        }
    })
}

fn render_checks(e: &DeployEvent) {
    let results: Vec<CheckResult> =
        serde_json::from_value(e.payload["results"].clone()).unwrap_or_default();
    let shown: Vec<CheckResult> = results
        .iter()
        .filter(|r| r.status != CheckStatus::Pass)
        .cloned()
        .collect();
    let which = e.payload["check"].as_str().unwrap_or_default();
    if !shown.is_empty() {
        println!("{which}:");
        crate::health_cmd::render(Output::Text, &shown);
    }
    for r in results.iter().filter(|r| r.overridden.is_some()) {
        eprintln!(
            "warning: preflight check {} overridden: {}",
            r.name,
            r.overridden.as_deref().unwrap_or("")
        );
    }
    println!("{}", e.message);
}

/// The executor's summary, as `migrate` has always printed it.
fn render_report(report: &serde_json::Value) {
    if let Some(h) = report.get("other_runner").filter(|h| !h.is_null()) {
        let pid = h["pid"].as_i64().unwrap_or_default();
        println!(
            "nothing to do: another runner (pid {pid}) is already applying the same migrations"
        );
        return;
    }
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let retries: u64 = results.iter().filter_map(|r| r["retries"].as_u64()).sum();
    let wait: u64 = results
        .iter()
        .filter_map(|r| r["lock_wait_ms"].as_u64())
        .sum();
    if results.is_empty() {
        println!("nothing to migrate: database is up to date");
    } else {
        println!(
            "migrate: {} migration(s) in deployment {}, {retries} lock retries, {wait} ms waiting for locks",
            results.len(),
            report["deployment_id"].as_str().unwrap_or_default()
        );
    }
}

/// The health checker of local `migrate`: preflight and postflight on the target, and each
/// probe on what its belay.toml spec names (an HTTP endpoint, or the database at its
/// URL), as `probe` runs them locally.
pub struct LocalHealth {
    pub checks: belay_health::HealthTargets,
    pub probes: Vec<ProbeSpec>,
}

#[async_trait::async_trait]
impl HealthApi for LocalHealth {
    async fn preflight(
        &self,
        target: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError> {
        self.checks.preflight(target, options).await
    }

    async fn postflight(
        &self,
        target: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError> {
        self.checks.postflight(target, spec).await
    }

    async fn probe(
        &self,
        target: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        let Some(spec) = self.probes.iter().find(|s| s.name == probe.name) else {
            return self.checks.probe(target, probe, duration).await;
        };
        let events = belay_health::run_probe(spec.clone())?;
        Ok(Box::pin(
            events.take_until(tokio::time::sleep(duration)).map(Ok),
        ))
    }
}
