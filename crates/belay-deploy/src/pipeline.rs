//! The pipeline: one target's deployment, step by step, through the capability traits.
//!
//! `planned → preflight → backing_up → migrating → validating → [watching] → succeeded`,
//! or `failed` from any of them. `backing_up` and `migrating` are one call,
//! `MigrationApi::apply`: the executor takes the runner lock, checks the pending scripts
//! (its `ScriptGate`, the lint gate), takes the backup (its `BackupHook`) and runs the
//! scripts, so the pipeline enters `backing_up` when it hands the run over and derives
//! `migrating` from the executor's first `started` event. A failure before that event
//! (runner lock, drift, lint refusal, backup) is a failure at `backing_up`.

use std::sync::Arc;

use belay_core::{ApiError, ErrorKind};
use belay_health::{CheckResult, CheckStatus, HealthApi, PreflightOptions, ProbeEvent};
use belay_migrate::{
    ApplyOptions, CheckOverride, Direction, Event, EventKind, EventSink, MigrationApi, RunReport,
    State, Target,
};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::metrics::{self, InStep};
use crate::policy::{DeploymentPolicy, OnFailure};
use crate::record::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord, LogError,
    NewDeployment, Step,
};

/// A step transition: payload `{from, to, reason}` (`from` is null for `planned`).
pub const KIND_TRANSITION: &str = "transition";
/// An executor event: payload the serialized `belay_migrate::Event` (`event` names it;
/// `failed` carries the error with `file:line`).
pub const KIND_MIGRATION: &str = "migration";
/// Check results: payload `{check: "preflight" | "postflight", results: [CheckResult]}`.
pub const KIND_CHECK: &str = "check";
/// A probe verdict: payload the `ProbeEvent`.
pub const KIND_PROBE: &str = "probe";
/// The executor's report once `apply` returned: payload the `RunReport`.
pub const KIND_RUN_REPORT: &str = "run_report";
/// What the failure handler said: payload `{ok, error?}`.
pub const KIND_FAILURE_HANDLER: &str = "failure_handler";
/// Something the record cannot say exactly (e.g. checksums unknown in remote mode):
/// payload its details.
pub const KIND_NOTE: &str = "note";
/// A `[deploy.before]`/`[deploy.after]` hook ran: payload the `HookRun` plus `phase`
/// (`before`/`after`) and `warning` (an `after` hook that failed: the migrations are in).
pub const KIND_HOOK: &str = "hook";
/// `phase` of the canary soak's events and of a failure in it (its step is `watching`).
pub const SOAK_PHASE: &str = "canary_soak";

/// Where a caller sees the deployment's events as they are recorded (to render them).
/// Called synchronously, in `seq` order.
pub type DeploySink = Arc<dyn Fn(&DeployEvent) + Send + Sync>;

/// Why a step failed, for callers choosing an exit code or a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A capability call failed (its `ErrorKind` says how).
    Error,
    /// Preflight blocked (`ErrorKind::Unavailable` when the database cannot be reached).
    Blocked,
    /// A postflight check blocked: an assertion, a smoke query, `verify.sql`, an invalid
    /// index, a `NOT VALID` constraint, a failed migration in history.
    AssertionFailed,
    /// A probe crossed its failure threshold in the watch window.
    ProbeTriggered,
    /// The run took more lock guard trips than the policy's budget.
    LockTripBudget,
    /// The `before` hook failed or timed out (nothing changed).
    HookFailed,
}

/// A failed step: what the record's outcome and the failure handler get.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFailure {
    pub step: Step,
    pub kind: ErrorKind,
    pub cause: Cause,
    /// One paragraph for a person.
    pub reason: String,
    pub evidence: Value,
}

/// The rollback controller's hook (a later issue): called once a deployment with
/// `on_failure = rollback` has failed and its failure is on record. It drives the same
/// capability traits and records its own steps (`rolling_back`, `rolled_back`,
/// `escalated`) through the same `DeploymentLog`.
#[async_trait::async_trait]
pub trait FailureHandler: Send + Sync {
    async fn handle(
        &self,
        record: &DeploymentRecord,
        failure: &StepFailure,
    ) -> Result<(), ApiError>;
}

/// Why a deployment could not be run at all (nothing was recorded or applied), or why its
/// record could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The policy asks for something this pipeline cannot do.
    #[error("{0}")]
    Policy(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// One deployment to run.
#[derive(Debug, Clone)]
pub struct DeploymentRequest {
    pub id: Uuid,
    pub target: String,
    /// How far to migrate.
    pub forward: Target,
    pub environment: Option<String>,
    pub requested_by: Option<String>,
    pub release: Option<String>,
    pub policy: DeploymentPolicy,
    /// What the caller knows of the migrations (checksum, undo): the local CLI reads the
    /// files. `None` (remote mode: the files are on the agent): the pipeline asks the
    /// migration API (plan for `irreversible`, status for the undo) and records no
    /// checksum.
    pub catalog: Option<Vec<AppliedMigration>>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// As the log keeps it, with its outcome.
    pub record: DeploymentRecord,
    /// The executor's report, when `apply` returned one.
    pub report: Option<RunReport>,
    pub failure: Option<StepFailure>,
}

/// Runs deployments of single targets through the capability traits.
#[derive(Clone)]
pub struct Pipeline {
    migrations: Arc<dyn MigrationApi>,
    health: Arc<dyn HealthApi>,
    log: Arc<dyn DeploymentLog>,
    failure_handler: Option<Arc<dyn FailureHandler>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("failure_handler", &self.failure_handler.is_some())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    pub fn new(
        migrations: Arc<dyn MigrationApi>,
        health: Arc<dyn HealthApi>,
        log: Arc<dyn DeploymentLog>,
    ) -> Self {
        Pipeline {
            migrations,
            health,
            log,
            failure_handler: None,
        }
    }

    /// Installs what `on_failure = rollback` calls.
    pub fn with_failure_handler(mut self, handler: Arc<dyn FailureHandler>) -> Self {
        self.failure_handler = Some(handler);
        self
    }

    /// Whether this pipeline can run `policy`; checked by [`Pipeline::run`] before
    /// anything is recorded, and callable earlier so a caller refuses at once.
    pub fn check(&self, policy: &DeploymentPolicy) -> Result<(), DeployError> {
        if policy.on_failure == OnFailure::Rollback && self.failure_handler.is_none() {
            return Err(DeployError::Policy(
                "on_failure = \"rollback\" needs the rollback controller, and none is installed \
                 for this deployment; nothing was run. Set on_failure = \"stop\" (a failure is \
                 recorded and what was applied stays applied) and roll back by hand with \
                 `belay undo` and the pre-deployment backup"
                    .into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(dup) = policy
            .watch
            .probes
            .iter()
            .find(|p| !names.insert(p.name.as_str()))
        {
            return Err(DeployError::Policy(format!(
                "two probes are named {:?}",
                dup.name
            )));
        }
        if (policy.watch.duration.is_some() || policy.watch.soak.is_some())
            && policy.watch.probes.is_empty()
        {
            return Err(DeployError::Policy(
                "a watch window needs probes to watch".into(),
            ));
        }
        Ok(())
    }

    /// Runs the deployment to its end. A failed step is an `Ok` with `failure` set: the
    /// failure is on record. `Err` only when nothing could be run or recorded.
    pub async fn run(
        &self,
        request: DeploymentRequest,
        sink: DeploySink,
    ) -> Result<Deployment, DeployError> {
        self.check(&request.policy)?;
        let span = info_span!("deploy", deployment = %request.id, target = %request.target);
        let started = std::time::Instant::now();
        let result = Run {
            pipeline: self,
            request: &request,
            sink,
            step: None,
            in_step: InStep::default(),
            step_span: None,
            span: span.clone(),
            backup_id: None,
            succeeded: Vec::new(),
            trips: Vec::new(),
            irreversible: None,
            held: None,
        }
        .execute()
        .instrument(span)
        .await;
        // Every end counts, a log that broke mid-run included (as `failed`).
        let state = match &result {
            Ok(d) => d.record.outcome.as_ref().map(|o| o.state),
            Err(_) => None,
        };
        metrics::ended(metrics::status(state), started);
        result
    }
}

/// One run's state: where it stands and what it has learned.
struct Run<'a> {
    pipeline: &'a Pipeline,
    request: &'a DeploymentRequest,
    sink: DeploySink,
    step: Option<Step>,
    /// This run in `belay_deployment_targets{step}`.
    in_step: InStep,
    /// The span of the step the run is in (one per step, children of `span`).
    step_span: Option<tracing::Span>,
    span: tracing::Span,
    backup_id: Option<String>,
    /// `succeeded` events of forward and repeatable scripts: what committed.
    succeeded: Vec<(Option<String>, String)>,
    /// `lock_guard_tripped` events, as recorded.
    trips: Vec<Value>,
    /// Without a catalog: each planned script's `-- belay:irreversible`, from the plan
    /// read before the run (`None` when it could not be read).
    irreversible: Option<std::collections::BTreeMap<String, bool>>,
    /// While the executor's events that are ready together are recorded: the events
    /// emitted meanwhile, written to the log in one go by [`Run::flush`].
    held: Option<Vec<DeployEvent>>,
}

/// The most events [`Run::flush`] writes in one go.
const MAX_EVENTS_PER_WRITE: usize = 256;

/// How long the executor's events gather before they are written together: the log (and
/// what a caller's sink prints) is at most this late, and a run of small migrations writes
/// once per window instead of once per event.
const EVENT_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// A step's verdict: go on, or fail with this.
type StepResult<T> = Result<T, StepFailure>;

impl Run<'_> {
    fn id(&self) -> Uuid {
        self.request.id
    }

    fn target(&self) -> &str {
        &self.request.target
    }

    fn current(&self) -> Step {
        self.step.unwrap_or(Step::Planned)
    }

    async fn emit(&mut self, kind: &str, message: String, payload: Value) -> Result<(), LogError> {
        let mut event = DeployEvent {
            deployment_id: self.id(),
            target: self.target().to_string(),
            seq: 0,
            at: Utc::now(),
            step: self.current(),
            kind: kind.to_string(),
            message,
            payload,
        };
        if let Some(held) = &mut self.held {
            held.push(event);
            return Ok(());
        }
        event.seq = self.pipeline.log.append(event.clone()).await?;
        (self.sink)(&event);
        Ok(())
    }

    /// Writes the held events (in writes of at most [`MAX_EVENTS_PER_WRITE`]) and hands
    /// each to the sink once it has its `seq`; emits go straight to the log again.
    async fn flush(&mut self) -> Result<(), LogError> {
        let held = self.held.take().unwrap_or_default();
        let mut held = held.into_iter().peekable();
        while held.peek().is_some() {
            let mut chunk: Vec<DeployEvent> = held.by_ref().take(MAX_EVENTS_PER_WRITE).collect();
            let seqs = self.pipeline.log.append_all(chunk.clone()).await?;
            for (event, seq) in chunk.iter_mut().zip(seqs) {
                event.seq = seq;
                (self.sink)(event);
            }
        }
        Ok(())
    }

    /// Records `first` and the events that follow it within [`EVENT_WINDOW`] (or until
    /// the run has `finished`), in one log write. A step transition ends the window at
    /// once: where a deployment stands reaches the log and the sink (the controller, for
    /// an agent) without the window's delay, so an agent lost a moment later is known to
    /// have been `migrating`. Returns whether the run has finished.
    async fn record_window(
        &mut self,
        first: Event,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
        finished: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> Result<bool, LogError> {
        self.held = Some(Vec::new());
        let window = tokio::time::Instant::now() + EVENT_WINDOW;
        let step = self.current();
        let mut done = false;
        let mut recorded = self.record(first).await;
        while recorded.is_ok()
            && !done
            && self.current() == step
            && self.held.as_ref().map_or(0, Vec::len) < MAX_EVENTS_PER_WRITE
        {
            tokio::select! {
                biased;
                Some(event) = rx.recv() => recorded = self.record(event).await,
                _ = &mut *finished => done = true,
                () = tokio::time::sleep_until(window) => break,
            }
        }
        let flushed = self.flush().await;
        recorded.and(flushed).map(|()| done)
    }

    /// Records every event still queued, in one log write: the run has ended.
    async fn record_rest(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), LogError> {
        self.held = Some(Vec::new());
        let mut recorded = Ok(());
        while recorded.is_ok()
            && let Ok(event) = rx.try_recv()
        {
            recorded = self.record(event).await;
        }
        let flushed = self.flush().await;
        recorded.and(flushed)
    }

    async fn transition(&mut self, to: Step, reason: &str) -> Result<(), LogError> {
        let from = self.step;
        self.step = Some(to);
        self.in_step.move_to(to);
        // Closing the previous step's span ends it; the final states get none.
        self.step_span = (!matches!(to, Step::Succeeded | Step::Failed)).then(
            || info_span!(parent: &self.span, "deploy_step", otel.name = to.as_str(), step = %to),
        );
        let message = match from {
            Some(f) => format!("{f} → {to}: {reason}"),
            None => format!("{to}: {reason}"),
        };
        self.emit(
            KIND_TRANSITION,
            message,
            json!({ "from": from, "to": to, "reason": reason }),
        )
        .await
    }

    async fn execute(mut self) -> Result<Deployment, DeployError> {
        let request = self.request;
        let policy = &request.policy;
        let from_version = self.newest_applied().await;
        let start = NewDeployment {
            id: request.id,
            target: request.target.clone(),
            started_at: Utc::now(),
            environment: request.environment.clone(),
            requested_by: request.requested_by.clone(),
            release: request.release.clone(),
            from_version,
            to_version: request.forward.to.clone(),
            policy: serde_json::to_value(policy).unwrap_or(Value::Null),
        };
        self.pipeline.log.begin(&start).await?;
        let scope = match (&request.forward.to, request.forward.steps) {
            (Some(v), _) => format!("up to version {v}"),
            (None, Some(n)) => format!("the next {n} pending migration(s)"),
            (None, None) => "every pending migration".to_string(),
        };
        self.transition(
            Step::Planned,
            &format!("deployment of {scope} to {}", request.target),
        )
        .await?;
        if request.catalog.is_none() {
            // Read now: once applied, a script is no longer in the plan.
            self.irreversible = self
                .pipeline
                .migrations
                .plan(&request.target, &request.forward, false)
                .await
                .ok()
                .map(|plan| {
                    plan.steps
                        .into_iter()
                        .map(|s| (s.script, s.directives.irreversible))
                        .collect()
                });
        }
        let mut report = None;
        let outcome = self.steps(&mut report).await?;
        let failure = outcome.err();
        let applied = self.applied().await?;
        let finished = match &failure {
            None => {
                self.transition(Step::Succeeded, "every step passed")
                    .await?;
                DeploymentOutcome {
                    state: Step::Succeeded,
                    finished_at: Utc::now(),
                    failed_step: None,
                    reason: None,
                    evidence: Value::Null,
                    to_version: self.to_version(),
                    backup_id: self.backup_id.clone(),
                    applied,
                }
            }
            Some(f) => {
                self.transition(Step::Failed, &format!("{} failed: {}", f.step, f.reason))
                    .await?;
                DeploymentOutcome {
                    state: Step::Failed,
                    finished_at: Utc::now(),
                    failed_step: Some(f.step),
                    reason: Some(f.reason.clone()),
                    evidence: f.evidence.clone(),
                    to_version: self.to_version(),
                    backup_id: self.backup_id.clone(),
                    applied,
                }
            }
        };
        self.pipeline.log.finish(request.id, &finished).await?;
        let record =
            self.pipeline.log.get(request.id).await?.ok_or_else(|| {
                LogError(format!("deployment {} vanished from the log", request.id))
            })?;
        if let (Some(f), OnFailure::Rollback, Some(handler)) = (
            &failure,
            policy.on_failure,
            self.pipeline.failure_handler.clone(),
        ) {
            let handled = handler
                .handle(&record, f)
                .instrument(info_span!("failure_handler"))
                .await;
            let (message, payload) = match &handled {
                Ok(()) => (
                    "failure handed to the rollback controller".to_string(),
                    json!({ "ok": true }),
                ),
                Err(e) => (
                    format!("the rollback controller failed: {e}"),
                    json!({ "ok": false, "error": e.message, "kind": e.kind }),
                ),
            };
            self.emit(KIND_FAILURE_HANDLER, message, payload).await?;
        }
        Ok(Deployment {
            record,
            report: report.take(),
            failure,
        })
    }

    /// The steps from preflight to the end of the watch window; `Err` in the inner result
    /// is a failed step, the outer one a log that cannot be written.
    async fn steps(&mut self, report: &mut Option<RunReport>) -> Result<StepResult<()>, LogError> {
        let overrides = match self.preflight().await? {
            Ok(o) => o,
            Err(f) => return Ok(Err(f)),
        };
        // Still at `preflight`: the last thing before anything changes (the backup).
        if let Some(hook) = self.request.policy.hooks.before.clone()
            && let Err(f) = self.hook("before", &hook).await?
        {
            return Ok(Err(f));
        }
        match self.apply(overrides).await? {
            Ok(r) => *report = Some(r),
            Err(f) => return Ok(Err(f)),
        }
        if let Err(f) = self.trip_budget() {
            return Ok(Err(f));
        }
        if let Err(f) = self.validate().await? {
            return Ok(Err(f));
        }
        if let Err(f) = self.watch().await? {
            return Ok(Err(f));
        }
        if let Some(hook) = self.request.policy.hooks.after.clone() {
            // Too late to fail the deployment: the migrations are in. Its failure is on
            // record as a warning event.
            let _warned = self.hook("after", &hook).await?;
        }
        Ok(Ok(()))
    }

    /// Runs a `[deploy.*]` hook and records it; `Err` in the inner result when it failed
    /// (the caller decides what that means for the deployment).
    async fn hook(
        &mut self,
        phase: &str,
        hook: &crate::hooks::DeployHook,
    ) -> Result<StepResult<()>, LogError> {
        let version = match phase {
            "after" => self.to_version(),
            _ => self.request.forward.to.clone(),
        };
        let env = [
            ("BELAY_DEPLOYMENT_ID", self.id().to_string()),
            ("BELAY_TARGET", self.target().to_string()),
            ("BELAY_DEPLOY_PHASE", phase.to_string()),
            ("BELAY_TARGET_VERSION", version.unwrap_or_default()),
        ];
        let run = crate::hooks::run(&hook.command, hook.timeout, &env)
            .instrument(info_span!("deploy_hook", phase = phase))
            .await;
        let warning = !run.ok && phase == "after";
        let mut payload = json!(run);
        payload["phase"] = json!(phase);
        payload["warning"] = json!(warning);
        let output = if run.output.is_empty() {
            String::new()
        } else {
            format!(": {}", one_line(&run.output))
        };
        let message = if run.ok {
            format!(
                "{phase} hook `{}` {} in {} ms",
                run.command, run.status, run.ms
            )
        } else if warning {
            format!(
                "warning: after hook `{}` failed ({}){output}; the migrations are applied and stay applied",
                run.command, run.status
            )
        } else {
            format!(
                "{phase} hook `{}` failed ({}){output}",
                run.command, run.status
            )
        };
        self.emit(KIND_HOOK, message, payload.clone()).await?;
        if run.ok {
            return Ok(Ok(()));
        }
        Ok(Err(StepFailure {
            step: self.current(),
            kind: ErrorKind::Refused,
            cause: Cause::HookFailed,
            reason: format!(
                "the {phase} hook `{}` failed ({}){output}; nothing was changed",
                run.command, run.status
            ),
            evidence: json!({ "hook": payload }),
        }))
    }

    async fn preflight(&mut self) -> Result<StepResult<Vec<CheckOverride>>, LogError> {
        let policy = &self.request.policy.preflight;
        if policy.skip {
            self.transition(Step::Preflight, "skipped by policy (--no-preflight)")
                .await?;
            return Ok(Ok(Vec::new()));
        }
        self.transition(Step::Preflight, "checking the target before anything runs")
            .await?;
        let options = PreflightOptions {
            thresholds: policy.thresholds.clone(),
            overrides: policy.overrides.clone(),
            reason: policy.reason.clone(),
            // Failed and drifted migrations are the executor's to refuse, with remedies
            // no override could replace.
            migration_checks: false,
        };
        let results = match self
            .pipeline
            .health
            .preflight(self.target(), &options)
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(api_failure(Step::Preflight, &e, Value::Null))),
        };
        self.emit(
            KIND_CHECK,
            format!("preflight: {}", tally(&results)),
            json!({ "check": "preflight", "results": results }),
        )
        .await?;
        let overrides = results
            .iter()
            .filter_map(|r| {
                r.overridden.as_ref().map(|reason| CheckOverride {
                    check: r.name.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        let blocked: Vec<&CheckResult> = results
            .iter()
            .filter(|r| r.status == CheckStatus::Block)
            .collect();
        if blocked.is_empty() {
            return Ok(Ok(overrides));
        }
        // The connectivity check blocks only when the database cannot be reached: that is
        // "unavailable", as everywhere else, not a refusal.
        let unreachable = blocked.iter().any(|r| r.name == "connectivity");
        let names: Vec<&str> = blocked.iter().map(|r| r.name.as_str()).collect();
        Ok(Err(StepFailure {
            step: Step::Preflight,
            kind: if unreachable {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Refused
            },
            cause: Cause::Blocked,
            reason: format!("preflight blocked by: {}", names.join(", ")),
            evidence: json!({ "blocked": blocked }),
        }))
    }

    /// `backing_up` and `migrating`: one `apply`, its events recorded as they come.
    async fn apply(
        &mut self,
        overrides: Vec<CheckOverride>,
    ) -> Result<StepResult<RunReport>, LogError> {
        let scope = self
            .request
            .policy
            .backup
            .scope
            .as_deref()
            .map(|s| format!(" (backup: {s})"))
            .unwrap_or_default();
        self.transition(
            Step::BackingUp,
            &format!(
                "handing the run to the executor: runner lock, lint gate, pre-deployment backup{scope}"
            ),
        )
        .await?;
        // The executor calls its sink synchronously and must not block: events go through
        // a channel and are recorded (an async write, on the log's own session) while the
        // run goes on, so a migration never waits for its events' round trips.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let sink: EventSink = Arc::new(move |e: &Event| {
            let _ = tx.send(e.clone());
        });
        let options = ApplyOptions {
            deployment_id: Some(self.id()),
            overrides,
        };
        let migrations = self.pipeline.migrations.clone();
        let target = self.target().to_string();
        let forward = self.request.forward.clone();
        let (done, mut finished) = tokio::sync::oneshot::channel::<()>();
        let run = async move {
            let r = migrations.apply(&target, &forward, &options, sink).await;
            let _ = done.send(());
            Ok::<_, LogError>(r)
        };
        // Polled together with the run, not in turns: while events are written the
        // executor goes on. In order, one write at a time, each with the events of one
        // window (a run of 346 small migrations: some 50 writes, not 692); a failed write
        // drops the run (as it always did), and a run's last events are recorded before
        // its result.
        let recorder = async {
            let mut done = false;
            while !done {
                tokio::select! {
                    biased;
                    Some(event) = rx.recv() => {
                        done = self.record_window(event, &mut rx, &mut finished).await?;
                    }
                    _ = &mut finished => done = true,
                }
            }
            self.record_rest(&mut rx).await?;
            Ok::<_, LogError>(())
        };
        let (result, ()) = tokio::try_join!(run, recorder)?;
        match result {
            Ok(report) => {
                if self.current() == Step::BackingUp {
                    let why = match &report.other_runner {
                        Some(h) => format!("another runner ({h}) applied the same migrations"),
                        None => "nothing to apply".to_string(),
                    };
                    self.transition(Step::Migrating, &why).await?;
                }
                self.emit(
                    KIND_RUN_REPORT,
                    format!("{} migration(s) applied", report.results.len()),
                    serde_json::to_value(&report).unwrap_or(Value::Null),
                )
                .await?;
                Ok(Ok(report))
            }
            Err(e) => {
                let evidence = json!({
                    "error": e.message,
                    "kind": e.kind,
                    "lock_trips": self.trips,
                });
                Ok(Err(api_failure(self.current(), &e, evidence)))
            }
        }
    }

    /// Records one executor event, moving to `migrating` at its first statement.
    async fn record(&mut self, event: Event) -> Result<(), LogError> {
        match &event.kind {
            EventKind::Started { script, .. } if self.current() == Step::BackingUp => {
                let why = match &self.backup_id {
                    Some(id) => format!("backup {id} taken; running {script}"),
                    None => format!("no backup taken; running {script}"),
                };
                self.transition(Step::Migrating, &why).await?;
            }
            EventKind::BackupTaken { id, .. } => self.backup_id = Some(id.clone()),
            EventKind::Succeeded {
                version,
                script,
                direction,
                ..
            } if *direction != Direction::Undo => {
                self.succeeded.push((version.clone(), script.clone()));
            }
            _ => {}
        }
        let payload = serde_json::to_value(&event).unwrap_or(Value::Null);
        if matches!(event.kind, EventKind::LockGuardTripped { .. }) {
            self.trips.push(payload.clone());
        }
        // The CLI prints nothing for a start; the record still says what started.
        let message = match &event.kind {
            EventKind::Started {
                script, direction, ..
            } => {
                let way = match direction {
                    Direction::Forward => "forward",
                    Direction::Undo => "undo",
                    Direction::Repeatable => "repeatable",
                };
                format!("started {script} ({way})")
            }
            kind => kind.describe().unwrap_or_default(),
        };
        self.emit(KIND_MIGRATION, message, payload).await
    }

    fn trip_budget(&self) -> StepResult<()> {
        let Some(budget) = self.request.policy.lock_trip_budget else {
            return Ok(());
        };
        let trips = self.trips.len();
        if trips as u64 <= u64::from(budget) {
            return Ok(());
        }
        Err(StepFailure {
            step: Step::Migrating,
            kind: ErrorKind::Refused,
            cause: Cause::LockTripBudget,
            reason: format!(
                "the lock guard tripped {trips} time(s), over the budget of {budget}: the \
                 application waited behind this deployment too often; what committed stays \
                 applied"
            ),
            evidence: json!({ "budget": budget, "lock_trips": self.trips }),
        })
    }

    async fn validate(&mut self) -> Result<StepResult<()>, LogError> {
        if self.request.policy.postflight.skip {
            self.transition(Step::Validating, "skipped by policy")
                .await?;
            return Ok(Ok(()));
        }
        self.transition(Step::Validating, "postflight checks and assertions")
            .await?;
        self.postflight(Step::Validating, None).await
    }

    /// The postflight checks and assertions, failing at `step`; `phase` marks the
    /// canary soak's re-run (in the event, the reason and the evidence).
    async fn postflight(
        &mut self,
        step: Step,
        phase: Option<&'static str>,
    ) -> Result<StepResult<()>, LogError> {
        let policy = &self.request.policy.postflight;
        let results = match self
            .pipeline
            .health
            .postflight(self.target(), &policy.spec)
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(api_failure(step, &e, json!({ "phase": phase })))),
        };
        let assertions = policy.spec.checks.len();
        let passed = policy
            .spec
            .checks
            .iter()
            .filter(|c| {
                results
                    .iter()
                    .any(|r| r.name == c.name && r.status == CheckStatus::Pass)
            })
            .count();
        let label = match phase {
            Some(_) => "canary soak, postflight again",
            None => "validating",
        };
        let mut payload = json!({ "check": "postflight", "results": results });
        if let Some(phase) = phase {
            payload["phase"] = json!(phase);
        }
        self.emit(
            KIND_CHECK,
            if assertions == 0 {
                format!("{label}: {}", tally(&results))
            } else {
                format!(
                    "{label}: {passed} of {assertions} assertion(s) passed; {}",
                    tally(&results)
                )
            },
            payload,
        )
        .await?;
        let blocked: Vec<&CheckResult> = results
            .iter()
            .filter(|r| r.status == CheckStatus::Block)
            .collect();
        if blocked.is_empty() {
            return Ok(Ok(()));
        }
        metrics::validation_errors(self.target(), blocked.len());
        let lines: Vec<String> = blocked
            .iter()
            .map(|r| {
                let mut line = format!("{}: {} ({})", r.name, r.value, r.threshold);
                if let Some(q) = &r.query {
                    line.push_str(&format!("\n    query: {}", one_line(q)));
                }
                line
            })
            .collect();
        let mut evidence = json!({ "failed": blocked });
        if let Some(phase) = phase {
            evidence["phase"] = json!(phase);
        }
        Ok(Err(StepFailure {
            step,
            kind: ErrorKind::Refused,
            cause: Cause::AssertionFailed,
            reason: format!(
                "{}postflight failed: {}; the migrations stay applied",
                if phase.is_some() { "canary soak: " } else { "" },
                lines.join("; ")
            ),
            evidence,
        }))
    }

    /// The watch window, then the canary soak (the probes again, then the postflight),
    /// all at `watching`: a soak is a longer look at the same target with the same
    /// probes, so it fails the same step.
    async fn watch(&mut self) -> Result<StepResult<()>, LogError> {
        let policy = &self.request.policy.watch;
        let (window, soak) = (policy.duration, policy.soak);
        if window.is_none() && soak.is_none() {
            return Ok(Ok(()));
        }
        let probes = policy.probes.clone();
        let fmt = belay_core::format_duration;
        let message = match (window, soak) {
            (Some(w), Some(s)) => format!(
                "watching {} probe(s) for {}, then a canary soak of {} (the probes again, then the postflight)",
                probes.len(),
                fmt(w),
                fmt(s)
            ),
            (Some(w), None) => format!("watching {} probe(s) for {}", probes.len(), fmt(w)),
            (None, Some(s)) => format!(
                "canary soak: watching {} probe(s) for {}, then the postflight again",
                probes.len(),
                fmt(s)
            ),
            (None, None) => String::new(),
        };
        self.transition(Step::Watching, &message).await?;
        if let Some(w) = window
            && let Err(f) = self.probe_for(&probes, w, None).await?
        {
            return Ok(Err(f));
        }
        let Some(s) = soak else {
            return Ok(Ok(()));
        };
        // Without a window the transition above already announced the soak.
        if window.is_some() {
            self.emit(
                KIND_NOTE,
                format!(
                    "canary soak: watching {} probe(s) for {}, then the postflight again",
                    probes.len(),
                    fmt(s)
                ),
                json!({ "phase": SOAK_PHASE, "duration": fmt(s) }),
            )
            .await?;
        }
        if let Err(f) = self.probe_for(&probes, s, Some(SOAK_PHASE)).await? {
            return Ok(Err(f));
        }
        if self.request.policy.postflight.skip {
            return Ok(Ok(()));
        }
        self.postflight(Step::Watching, Some(SOAK_PHASE)).await
    }

    /// Every probe for `window`, their events merged; the first to cross its failure
    /// threshold fails the step.
    async fn probe_for(
        &mut self,
        probes: &[belay_health::TargetProbe],
        window: std::time::Duration,
        phase: Option<&'static str>,
    ) -> Result<StepResult<()>, LogError> {
        let health = self.pipeline.health.clone();
        let target = self.target().to_string();
        let phased = |e: &ApiError| api_failure(Step::Watching, e, json!({ "phase": phase }));
        let streams =
            futures::future::try_join_all(probes.iter().map(|p| health.probe(&target, p, window)))
                .await;
        let streams = match streams {
            Ok(s) => s,
            Err(e) => return Ok(Err(phased(&e))),
        };
        // One stream per probe, all running at once, their events merged as they come;
        // returning drops them, which stops every probe wherever it runs.
        let mut events = futures::stream::select_all(streams);
        while let Some(event) = events.next().await {
            let event: ProbeEvent = match event {
                Ok(e) => e,
                Err(e) => return Ok(Err(phased(&e))),
            };
            let mut payload = serde_json::to_value(&event).unwrap_or(Value::Null);
            if let (Some(phase), Value::Object(o)) = (phase, &mut payload) {
                o.insert("phase".into(), json!(phase));
            }
            self.emit(KIND_PROBE, event.summary(), payload.clone())
                .await?;
            if event.triggered {
                return Ok(Err(StepFailure {
                    step: Step::Watching,
                    kind: ErrorKind::Refused,
                    cause: Cause::ProbeTriggered,
                    reason: format!(
                        "{}probe {} crossed its failure threshold ({} consecutive failures): {}",
                        if phase.is_some() { "canary soak: " } else { "" },
                        event.probe,
                        event.consecutive_failures,
                        event.summary()
                    ),
                    evidence: payload,
                }));
            }
        }
        Ok(Ok(()))
    }

    /// The newest applied version before the deployment; `None` when there is none or
    /// the target cannot say (preflight reports an unreachable target).
    async fn newest_applied(&self) -> Option<String> {
        let statuses = self.pipeline.migrations.status(self.target()).await.ok()?;
        statuses
            .iter()
            .filter(|s| s.state == State::Success && s.entry_type.is_forward())
            .filter_map(|s| s.version.clone())
            .next_back()
    }

    fn to_version(&self) -> Option<String> {
        self.succeeded
            .iter()
            .filter_map(|(v, _)| v.clone())
            .next_back()
            .or_else(|| self.request.forward.to.clone())
    }

    /// What committed, with what a rollback needs to know of each: from the caller's
    /// catalog, else from the migration API.
    async fn applied(&mut self) -> Result<Vec<AppliedMigration>, LogError> {
        if self.succeeded.is_empty() {
            return Ok(Vec::new());
        }
        let catalog = self.request.catalog.clone().unwrap_or_default();
        let missing = self
            .succeeded
            .iter()
            .any(|(_, script)| !catalog.iter().any(|c| &c.script == script));
        let statuses = if missing {
            self.pipeline
                .migrations
                .status(self.target())
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        for (version, script) in &self.succeeded {
            if let Some(c) = catalog.iter().find(|c| &c.script == script) {
                out.push(c.clone());
                continue;
            }
            let has_undo = statuses
                .iter()
                .find(|s| &s.script == script)
                .is_some_and(|s| s.undoable);
            let irreversible = self
                .irreversible
                .as_ref()
                .and_then(|flags| flags.get(script).copied());
            unknown.push(script.clone());
            out.push(AppliedMigration {
                version: version.clone(),
                script: script.clone(),
                checksum: None,
                has_undo,
                irreversible: irreversible.unwrap_or(false),
            });
        }
        if !unknown.is_empty() {
            self.emit(
                KIND_NOTE,
                format!(
                    "no checksum recorded for {}: the files are with the target",
                    unknown.join(", ")
                ),
                json!({ "unknown": unknown }),
            )
            .await?;
        }
        Ok(out)
    }
}

fn api_failure(step: Step, e: &ApiError, evidence: Value) -> StepFailure {
    let evidence = if evidence.is_null() {
        json!({ "error": e.message, "kind": e.kind })
    } else {
        evidence
    };
    StepFailure {
        step,
        kind: e.kind,
        cause: Cause::Error,
        reason: e.message.clone(),
        evidence,
    }
}

fn tally(results: &[CheckResult]) -> String {
    let count = |s: CheckStatus| results.iter().filter(|r| r.status == s).count();
    format!(
        "{} check(s): {} passed, {} warning(s), {} blocked",
        results.len(),
        count(CheckStatus::Pass),
        count(CheckStatus::Warn),
        count(CheckStatus::Block)
    )
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
