//! The executor: runs a [`RollbackPlan`] step by step — record `rolling_back`, `before`
//! hook, verified emergency backup, the strategy (undo scripts, or a restore with lock
//! timeouts retried, then history marked), verification (history at the version, the
//! postflight checks, probes passing for the settle period), `after` hook — every step an
//! event in the deployment's log, and ends `rolled_back` or, when any step fails,
//! `escalated` with everything kept and the reason on record.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use belay_backup::{
    BackupApi, BackupFormat, BackupKind, BackupRequest, BackupScope, RestoreRequest,
};
use belay_core::{ApiError, ErrorKind, Version};
use belay_deploy::{
    DeployEvent, DeploySink, DeploymentLog, DeploymentOutcome, DeploymentRecord, Step,
};
use belay_health::{CheckStatus, HealthApi, PostflightSpec, ProbeState, TargetProbe};
use belay_migrate::{Event, EventKind, EventSink, MigrationApi, State, UndoTarget};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::error::RollbackError;
use crate::failpoint;
use crate::hooks;
use crate::lifecycle::{RollbackEvent, next};
use crate::metrics;
use crate::model::{HookCommand, HookFailure, RollbackPlan, RollbackPolicy, Strategy};
use crate::notify::{Delivery, KIND_NOTIFY, NotifyAction, NotifyFormat, Started};
use crate::report::{BackupLocations, IncidentReport, Severity, StepRecord};
use crate::resume::{self, KIND_ROLLBACK_STEP_STARTED, NextAction, Progress, STEP_RESUMED};
use crate::run_lock::RunLock;

/// A rollback step's event: payload `{step, result, detail, error?}`.
pub const KIND_ROLLBACK_STEP: &str = "rollback_step";
/// The plan as decided: payload the `RollbackPlan`.
pub const KIND_ROLLBACK_PLAN: &str = "rollback_plan";
/// The incident report: payload `{report, markdown}`.
pub const KIND_INCIDENT_REPORT: &str = "incident_report";

/// How a rollback ended: `RolledBack` or `Escalated`, and its report (also on record).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: Step,
    pub report: IncidentReport,
}

/// Runs rollback plans over the capability traits.
#[derive(Clone)]
pub struct Executor {
    pub migrations: Arc<dyn MigrationApi>,
    pub backups: Arc<dyn BackupApi>,
    pub health: Arc<dyn HealthApi>,
    pub log: Arc<dyn DeploymentLog>,
    /// The target's name in the backup catalog (locally: named after the database).
    pub backup_target: String,
    pub policy: RollbackPolicy,
    /// Probes that must pass again for `policy.settle` (the deployment's, runnable).
    pub probes: Vec<TargetProbe>,
    /// The postflight checks to pass again; `None`: those the deployment recorded.
    pub postflight: Option<PostflightSpec>,
    /// Where events are shown as they are recorded.
    pub sink: Option<DeploySink>,
    /// Checked between steps: once set, the rollback stops before its next step.
    pub abort: Option<AbortSignal>,
    /// Held for the whole run, so another process can tell a rollback running elsewhere
    /// from an interrupted one; without it an interrupted rollback is not resumed.
    pub run_lock: Option<Arc<dyn RunLock>>,
}

/// An operator's request to stop a running rollback between two steps (`rollback abort`).
/// A step under way finishes (a restore is one transaction, an undo script one
/// migration): stopping inside one would leave a state nobody can describe.
#[derive(Debug, Clone, Default)]
pub struct AbortSignal(Arc<Mutex<Option<String>>>);

impl AbortSignal {
    /// Asks the rollback to stop before its next step, saying why.
    pub fn abort(&self, why: impl Into<String>) {
        if let Ok(mut s) = self.0.lock() {
            s.get_or_insert_with(|| why.into());
        }
    }

    /// Why it was asked to stop, once it was.
    pub fn requested(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backup_target", &self.backup_target)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// One rollback in progress.
struct Run<'a> {
    exec: &'a Executor,
    plan: &'a RollbackPlan,
    records: Vec<DeploymentRecord>,
    steps: Vec<StepRecord>,
    errors: Vec<String>,
    locations: BackupLocations,
    started: DateTime<Utc>,
    /// The PagerDuty triggers sent as the rollback started, running beside it.
    start_notices: Option<tokio::task::JoinHandle<Vec<Delivery>>>,
    /// What an interrupted earlier attempt did (empty for a fresh rollback).
    prior: Progress,
}

/// A step failed: the reason recorded when escalating.
struct Failed(String);

impl Executor {
    /// Runs `plan`. `Err` only when nothing could be done or recorded (the deployment
    /// moved on, the log is unreachable); a rollback that ran and failed is
    /// `Ok(Outcome { state: Escalated, .. })`.
    pub async fn execute(&self, plan: &RollbackPlan) -> Result<Outcome, RollbackError> {
        let Some(&primary) = plan.deployments.first() else {
            return Err(RollbackError::Invalid(
                "the plan names no deployment".into(),
            ));
        };
        // Taken before the records are read and held to the end: a second process reads
        // them only once this one is gone, and then sees what it left.
        let _held = match &self.run_lock {
            Some(lock) => match lock
                .try_acquire(&plan.target, &plan.deployments)
                .await
                .map_err(RollbackError::Api)?
            {
                Ok(held) => Some(held),
                Err(why) => return Err(RollbackError::Refused(why)),
            },
            None => None,
        };
        let first = self.log.get(primary).await?.ok_or_else(|| {
            RollbackError::NotFound(format!("no deployment {primary} in the log"))
        })?;
        if first.step == Step::RollingBack {
            return self.resume(plan).await;
        }
        let mut records = Vec::new();
        for id in &plan.deployments {
            let record =
                self.log.get(*id).await?.ok_or_else(|| {
                    RollbackError::NotFound(format!("no deployment {id} in the log"))
                })?;
            // Checked again here, just before acting: never two rollbacks of one deployment.
            match record.step {
                s if next(s, RollbackEvent::Start).is_some() => {}
                Step::RolledBack => {
                    return Err(RollbackError::Refused(format!(
                        "deployment {id} is already rolled back; nothing to do"
                    )));
                }
                Step::RollingBack => {
                    return Err(RollbackError::Refused(format!(
                        "deployment {id} is being rolled back by another plan (interrupted: `belay rollback status {id}` says what `execute` does with it)"
                    )));
                }
                other => {
                    return Err(RollbackError::Refused(format!(
                        "deployment {id} is at {other}; only a finished deployment can be rolled back"
                    )));
                }
            }
            records.push(record);
        }
        let span = info_span!("rollback", deployment = %primary, strategy = %plan.strategy);
        let started = Instant::now();
        metrics::started();
        let mut run = Run {
            exec: self,
            plan,
            records,
            steps: Vec::new(),
            errors: Vec::new(),
            locations: BackupLocations::default(),
            started: Utc::now(),
            start_notices: None,
            prior: Progress::default(),
        };
        let result = run.go().instrument(span).await;
        metrics::finished(plan, &result, started.elapsed());
        result
    }

    /// Whether the `before` and `after` hooks are configured.
    pub fn hooks(&self) -> (bool, bool) {
        (self.policy.before.is_some(), self.policy.after.is_some())
    }

    /// Continues a rollback a process that is gone left `rolling_back` (the run lock is
    /// held: nobody else runs it): from its recorded plan and steps, skipping what ended
    /// well, re-running verification, or recording the escalation it was heading for.
    async fn resume(&self, asked: &RollbackPlan) -> Result<Outcome, RollbackError> {
        let primary = asked.deployments[0];
        let events = self.log.events(primary).await?;
        let prior = resume::progress(&events);
        let action = prior.next_action(self.hooks());
        let plan = match (&action, &prior.plan) {
            (NextAction::Refuse { reason }, _) => {
                return Err(RollbackError::Refused(format!(
                    "the rollback of deployment {primary} was interrupted and cannot be resumed: {reason}"
                )));
            }
            (_, Some(plan)) => plan.clone(),
            (_, None) => {
                return Err(RollbackError::Refused(format!(
                    "the rollback of deployment {primary} was interrupted before its plan was recorded"
                )));
            }
        };
        if plan.deployments != asked.deployments {
            return Err(RollbackError::Refused(format!(
                "deployment {primary}'s interrupted rollback is of {:?}, not of {:?}: `belay rollback plan {primary}` shows it",
                plan.deployments, asked.deployments
            )));
        }
        let mut records = Vec::new();
        for id in &plan.deployments {
            let record =
                self.log.get(*id).await?.ok_or_else(|| {
                    RollbackError::NotFound(format!("no deployment {id} in the log"))
                })?;
            if record.step != Step::RollingBack {
                return Err(RollbackError::Refused(format!(
                    "deployment {id} is {}, not rolling_back with deployment {primary}: the record is inconsistent; a person decides",
                    record.step
                )));
            }
            records.push(record);
        }
        let started_at = events
            .iter()
            .find(|e| e.kind == KIND_ROLLBACK_PLAN)
            .map(|e| e.at)
            .unwrap_or_else(Utc::now);
        let span = info_span!("rollback", deployment = %primary, strategy = %plan.strategy, resumed = true);
        let started = Instant::now();
        metrics::started();
        let mut run = Run {
            exec: self,
            plan: &plan,
            records,
            steps: prior.done.clone(),
            errors: Vec::new(),
            locations: BackupLocations {
                pre_deployment: plan.backups.first().map(|b| b.id.clone()),
                emergency: prior.emergency_backup(),
                ..BackupLocations::default()
            },
            started: started_at,
            start_notices: None,
            prior,
        };
        // The pager's trigger again: the crash may have come before it was sent, and its
        // dedup key makes a second one the same incident.
        if !matches!(action, NextAction::Refuse { .. }) {
            run.notify_started();
        }
        let result = run.resume(action).instrument(span).await;
        metrics::finished(&plan, &result, started.elapsed());
        result
    }
}

impl Run<'_> {
    fn primary(&self) -> Uuid {
        self.plan.deployments[0]
    }

    fn target(&self) -> &str {
        &self.plan.target
    }

    async fn emit(
        &self,
        id: Uuid,
        step: Step,
        kind: &str,
        message: String,
        payload: Value,
    ) -> Result<(), RollbackError> {
        let mut event = DeployEvent {
            deployment_id: id,
            target: self.plan.target.clone(),
            seq: 0,
            at: Utc::now(),
            step,
            kind: kind.to_string(),
            message,
            payload,
        };
        event.seq = self.exec.log.append(event.clone()).await?;
        if let Some(sink) = &self.exec.sink {
            sink(&event);
        }
        Ok(())
    }

    async fn transition(
        &self,
        id: Uuid,
        from: Step,
        to: Step,
        reason: &str,
    ) -> Result<(), RollbackError> {
        self.emit(
            id,
            to,
            belay_deploy::KIND_TRANSITION,
            format!("{from} → {to}: {reason}"),
            json!({ "from": from, "to": to, "reason": reason }),
        )
        .await
    }

    /// Records a step's start (so a crash shows it under way); returns when it started.
    async fn begin(&self, name: &str) -> Result<DateTime<Utc>, RollbackError> {
        let at = Utc::now();
        self.emit(
            self.primary(),
            Step::RollingBack,
            KIND_ROLLBACK_STEP_STARTED,
            format!("rollback: {name} started"),
            json!({ "step": name, "started_at": at }),
        )
        .await?;
        failpoint::hit(&format!("rollback.before_{name}")).await;
        Ok(at)
    }

    /// Whether an interrupted earlier attempt ended `step` well: not run again.
    fn done_before(&self, step: &str) -> bool {
        self.prior.ended_ok(step)
    }

    /// Records a step's end (and keeps it for the report).
    async fn step_done(
        &mut self,
        name: &str,
        at: DateTime<Utc>,
        result: Result<String, String>,
        warning_only: bool,
    ) -> Result<(), RollbackError> {
        failpoint::hit(&format!("rollback.after_{name}")).await;
        let (res, detail, error) = match result {
            Ok(d) => ("ok", d, None),
            Err(e) if warning_only => ("warning", String::new(), Some(e)),
            Err(e) => ("failed", String::new(), Some(e)),
        };
        if let Some(e) = &error {
            self.errors.push(format!("{name}: {e}"));
        }
        let record = StepRecord {
            step: name.to_string(),
            result: res.to_string(),
            started_at: at,
            finished_at: Utc::now(),
            detail: detail.clone(),
            error: error.clone(),
        };
        let message = match &error {
            Some(e) => format!("rollback: {name} {res}: {e}"),
            None => format!("rollback: {name}: {detail}"),
        };
        self.emit(
            self.primary(),
            Step::RollingBack,
            KIND_ROLLBACK_STEP,
            message,
            serde_json::to_value(&record).unwrap_or(Value::Null),
        )
        .await?;
        self.steps.push(record);
        Ok(())
    }

    async fn go(&mut self) -> Result<Outcome, RollbackError> {
        let ids: Vec<Uuid> = self.plan.deployments.clone();
        for (id, record) in ids.iter().zip(self.records.clone()) {
            self.transition(
                *id,
                record.step,
                Step::RollingBack,
                &format!(
                    "{} rollback ({})",
                    self.plan.strategy, self.plan.trigger.reason
                ),
            )
            .await?;
        }
        self.emit(
            self.primary(),
            Step::RollingBack,
            KIND_ROLLBACK_PLAN,
            format!("rollback plan: {}", self.plan.strategy),
            serde_json::to_value(self.plan).unwrap_or(Value::Null),
        )
        .await?;
        self.locations.pre_deployment = self.plan.backups.first().map(|b| b.id.clone());
        self.notify_started();
        let result = self.steps_in_order().await?;
        self.finish(result).await
    }

    /// Sends the PagerDuty triggers in the background: the rollback does not wait for
    /// them (their results are recorded when it ends).
    fn notify_started(&mut self) {
        let pagers: Vec<_> = self
            .exec
            .policy
            .notifiers
            .iter()
            .filter(|n| n.format == NotifyFormat::Pagerduty)
            .cloned()
            .collect();
        if pagers.is_empty() {
            return;
        }
        let first = &self.records[0];
        let started = Started {
            deployment: first.start.id,
            target: first.start.target.clone(),
            environment: first.start.environment.clone(),
            strategy: self.plan.strategy.to_string(),
            trigger: self.plan.trigger.kind.as_str().to_string(),
            reason: self.plan.trigger.reason.clone(),
            at: self.started,
        };
        let span = info_span!("rollback_notify", phase = "started");
        self.start_notices = Some(tokio::spawn(
            async move {
                let sends = pagers.iter().map(|n| {
                    let body = n.started_body(&started);
                    async move { n.deliver(NotifyAction::Trigger, &body).await }
                });
                futures::future::join_all(sends).await
            }
            .instrument(span),
        ));
    }

    /// Sends the report to every notifier once the rollback ended (after the PagerDuty
    /// triggers of its start, so a resolve never overtakes its trigger) and records each
    /// delivery as a `notify` event. Best effort: a receiver that fails, or a log that
    /// cannot record it, changes nothing about the rollback's outcome.
    async fn notify_ended(&mut self, state: Step, report: &IncidentReport, markdown: &str) {
        let mut deliveries = match self.start_notices.take() {
            Some(handle) => handle.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let sends = self.exec.policy.notifiers.iter().map(|n| {
            let (action, body) = n.ended_body(report, markdown);
            async move { n.deliver(action, &body).await }
        });
        deliveries.extend(futures::future::join_all(sends).await);
        for d in deliveries {
            if !d.ok {
                tracing::warn!(host = %d.host, action = d.action.as_str(), error = ?d.error, "the incident report could not be delivered");
            }
            let payload = serde_json::to_value(&d).unwrap_or(Value::Null);
            if let Err(e) = self
                .emit(self.primary(), state, KIND_NOTIFY, d.line(), payload)
                .await
            {
                tracing::warn!(error = %e, "cannot record a notification's delivery");
            }
        }
    }

    /// A resumed run: records where it resumes, then the steps not yet ended well.
    async fn resume(&mut self, action: NextAction) -> Result<Outcome, RollbackError> {
        let at = Utc::now();
        match action {
            NextAction::Escalate { detail } => {
                self.step_done(
                    STEP_RESUMED,
                    at,
                    Ok(format!(
                        "after an interruption (the process running it stopped); it was escalating: {detail}"
                    )),
                    false,
                )
                .await?;
                self.finish(Err(Failed(detail))).await
            }
            NextAction::Resume { from, detail } => {
                self.step_done(
                    STEP_RESUMED,
                    at,
                    Ok(format!(
                        "after an interruption (the process running it stopped): {detail}; resuming at {from}"
                    )),
                    false,
                )
                .await?;
                let result = self.steps_in_order().await?;
                self.finish(result).await
            }
            NextAction::Refuse { reason } => Err(RollbackError::Refused(reason)),
        }
    }

    /// Stops here when an abort was asked for: recorded as the step `aborted`, naming
    /// the steps done and the one not started.
    async fn aborted(&mut self, next: &str) -> Result<Option<Failed>, RollbackError> {
        let Some(why) = self.exec.abort.as_ref().and_then(AbortSignal::requested) else {
            return Ok(None);
        };
        let done: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{} ({})", s.step, s.result))
            .collect();
        let done = if done.is_empty() {
            "none".to_string()
        } else {
            done.join(", ")
        };
        let e = format!("stopped before {next} ({why}); steps done: {done}");
        self.step_done("aborted", Utc::now(), Err(e.clone()), false)
            .await?;
        Ok(Some(Failed(format!("aborted: {e}"))))
    }

    /// The steps; `Err(Failed)` stops at the first that fails (the outer error: the
    /// log cannot be written).
    async fn steps_in_order(&mut self) -> Result<Result<(), Failed>, RollbackError> {
        if self.plan.strategy == Strategy::Escalate {
            let why = self
                .plan
                .reasons
                .iter()
                .filter(|r| !r.possible)
                .map(|r| format!("{}: {}", r.branch, r.why))
                .collect::<Vec<_>>()
                .join("; ");
            let at = Utc::now();
            self.step_done("plan", at, Err(format!("no automatic path: {why}")), false)
                .await?;
            return Ok(Err(Failed(format!("no automatic rollback path ({why})"))));
        }
        if let Some(f) = self.aborted("before_hook").await? {
            return Ok(Err(f));
        }
        if let Some(hook) = self.exec.policy.before.clone()
            && !self.done_before("before_hook")
            && let Err(f) = self
                .hook("before", &hook)
                .instrument(info_span!("rollback_hook", phase = "before"))
                .await?
        {
            return Ok(Err(f));
        }
        if let Some(f) = self.aborted("emergency_backup").await? {
            return Ok(Err(f));
        }
        if !self.done_before("emergency_backup")
            && let Err(f) = self
                .emergency_backup()
                .instrument(info_span!("rollback_emergency_backup"))
                .await?
        {
            return Ok(Err(f));
        }
        if let Some(f) = self.aborted(self.plan.strategy.as_str()).await? {
            return Ok(Err(f));
        }
        let executed = match self.plan.strategy {
            Strategy::Undo if self.done_before("undo") => Ok(()),
            Strategy::Undo => self.undo().instrument(info_span!("rollback_undo")).await?,
            Strategy::TableRestore | Strategy::FullRestore => {
                self.restore()
                    .instrument(info_span!("rollback_restore"))
                    .await?
            }
            Strategy::Escalate => Ok(()),
        };
        if let Err(f) = executed {
            return Ok(Err(f));
        }
        if let Some(f) = self.aborted("verify_history").await? {
            return Ok(Err(f));
        }
        if let Err(f) = self
            .verify()
            .instrument(info_span!("rollback_verify"))
            .await?
        {
            return Ok(Err(f));
        }
        if let Some(f) = self.aborted("after_hook").await? {
            return Ok(Err(f));
        }
        if let Some(hook) = self.exec.policy.after.clone()
            && !self.done_before("after_hook")
            && let Err(f) = self
                .hook("after", &hook)
                .instrument(info_span!("rollback_hook", phase = "after"))
                .await?
        {
            return Ok(Err(f));
        }
        Ok(Ok(()))
    }

    async fn hook(
        &mut self,
        phase: &str,
        hook: &HookCommand,
    ) -> Result<Result<(), Failed>, RollbackError> {
        let at = self.begin(&format!("{phase}_hook")).await?;
        let env = [
            ("BELAY_ROLLBACK_PHASE", phase.to_string()),
            ("BELAY_DEPLOYMENT_ID", self.primary().to_string()),
            ("BELAY_ROLLBACK_STRATEGY", self.plan.strategy.to_string()),
            ("BELAY_TARGET", self.plan.target.clone()),
        ];
        let run = hooks::run(hook, &env).await;
        let name = format!("{phase}_hook");
        if run.ok {
            self.step_done(
                &name,
                at,
                Ok(format!("`{}` {} in {} ms", run.command, run.status, run.ms)),
                false,
            )
            .await?;
            return Ok(Ok(()));
        }
        let error = format!(
            "`{}` {}{}",
            run.command,
            run.status,
            if run.output.is_empty() {
                String::new()
            } else {
                format!(": {}", run.output)
            }
        );
        let tolerate = self.exec.policy.on_hook_failure == HookFailure::Continue;
        self.step_done(&name, at, Err(error.clone()), tolerate)
            .await?;
        if tolerate {
            Ok(Ok(()))
        } else {
            Ok(Err(Failed(format!("the {phase} hook failed: {error}"))))
        }
    }

    async fn emergency_backup(&mut self) -> Result<Result<(), Failed>, RollbackError> {
        let at = self.begin("emergency_backup").await?;
        let req = BackupRequest {
            format: BackupFormat::Custom,
            scope: BackupScope::Full,
            label: Some(format!(
                "emergency backup before rolling back deployment {}",
                self.primary()
            )),
            deployment_id: Some(self.primary()),
            kind: Some(BackupKind::Emergency),
        };
        let target = self.exec.backup_target.clone();
        let result = async {
            let manifest = self
                .exec
                .backups
                .create(&target, &req, Arc::new(|_| {}))
                .await?;
            let report = self
                .exec
                .backups
                .verify(&target, &manifest.id, false)
                .await?;
            if !report.ok {
                return Err(ApiError::new(
                    ErrorKind::Refused,
                    format!(
                        "emergency backup {} failed verification: {:?}",
                        manifest.id, report.problems
                    ),
                ));
            }
            Ok::<_, ApiError>(manifest)
        }
        .await;
        match result {
            Ok(m) => {
                self.locations.emergency = Some(m.id.clone());
                self.step_done(
                    "emergency_backup",
                    at,
                    Ok(format!(
                        "backup {} ({} bytes, verified)",
                        m.id,
                        m.total_size()
                    )),
                    false,
                )
                .await?;
                Ok(Ok(()))
            }
            Err(e) => {
                self.step_done("emergency_backup", at, Err(e.message.clone()), false)
                    .await?;
                Ok(Err(Failed(format!(
                    "the emergency backup failed, nothing was changed: {}",
                    e.message
                ))))
            }
        }
    }

    async fn undo(&mut self) -> Result<Result<(), Failed>, RollbackError> {
        let at = self.begin("undo").await?;
        let events: Arc<Mutex<Vec<Event>>> = Arc::new(Mutex::new(Vec::new()));
        let sink: EventSink = {
            let events = events.clone();
            Arc::new(move |e: &Event| {
                if let Ok(mut v) = events.lock() {
                    v.push(e.clone());
                }
            })
        };
        let undo_to = match &self.plan.to_version {
            Some(v) => UndoTarget::To(v.clone()),
            None => UndoTarget::All,
        };
        let result = self
            .exec
            .migrations
            .undo(self.target(), &undo_to, Some(self.primary()), sink)
            .await;
        let recorded: Vec<Event> = events.lock().map(|v| v.clone()).unwrap_or_default();
        // Each undo script that drops data snapshots it behind its own fence: (script, id).
        let mut snapshots: Vec<(String, String)> = Vec::new();
        let mut script = String::new();
        for e in &recorded {
            match &e.kind {
                EventKind::Started { script: s, .. } => script.clone_from(s),
                // A script retried after a lock wait snapshots again: its last snapshot is
                // the one whose fence held until its drop.
                EventKind::BackupTaken { id, .. } => {
                    snapshots.retain(|(s, _)| *s != script);
                    snapshots.push((script.clone(), id.clone()));
                }
                _ => {}
            }
            self.emit(
                self.primary(),
                Step::RollingBack,
                belay_deploy::KIND_MIGRATION,
                e.kind.describe().unwrap_or_default(),
                serde_json::to_value(e).unwrap_or(Value::Null),
            )
            .await?;
        }
        if !snapshots.is_empty() {
            let ids: Vec<&str> = snapshots.iter().map(|(_, id)| id.as_str()).collect();
            self.locations.undo_snapshot = Some(ids.join(", "));
            self.locations.kept_tables = self
                .plan
                .migrations
                .iter()
                .flat_map(|m| m.undo_drops.clone())
                .collect();
            // One new database per snapshot: `--into` creates it.
            let into = recovery_database(self.primary());
            let commands: Vec<String> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| match n {
                    0 => format!("belay backup restore {id} --into {into}"),
                    _ => format!("belay backup restore {id} --into {into}_{}", n + 1),
                })
                .collect();
            self.locations.recover_command = Some(commands.join(" && "));
        }
        match result {
            Ok(report) => {
                let scripts: Vec<String> =
                    report.results.iter().map(|r| r.script.clone()).collect();
                self.step_done(
                    "undo",
                    at,
                    Ok(format!(
                        "{} undo script(s) ran: {}",
                        scripts.len(),
                        scripts.join(", ")
                    )),
                    false,
                )
                .await?;
                Ok(Ok(()))
            }
            Err(e) => {
                self.step_done("undo", at, Err(e.message.clone()), false)
                    .await?;
                Ok(Err(Failed(format!(
                    "the undo failed and stopped (what it undid before is undone; the rest stays applied): {}",
                    e.message
                ))))
            }
        }
    }

    async fn restore(&mut self) -> Result<Result<(), Failed>, RollbackError> {
        let Some(backup) = self.plan.backups.first().cloned() else {
            let at = Utc::now();
            self.step_done("restore", at, Err("the plan names no backup".into()), false)
                .await?;
            return Ok(Err(Failed("no backup to restore".into())));
        };
        // Resumed after the restore ended: it is not run again (one transaction that
        // committed); the history is what may still be missing.
        if !self.done_before(self.plan.strategy.as_str()) {
            let at = self.begin(self.plan.strategy.as_str()).await?;
            let req = RestoreRequest {
                tables: (self.plan.strategy == Strategy::TableRestore)
                    .then(|| self.plan.tables.clone()),
                into: None,
                force: false,
                // Taken already, of the whole database, before any step changed anything.
                emergency_backup: false,
                // Not needed: a restore that keeps history (a rollback's) is not refused
                // across schema versions — the backup is of the version before the
                // deployment on purpose, and this rollback marks the deployment's migrations
                // reverted once the tables are back, so history agrees with them.
                across_versions: false,
                keep_history: true,
            };
            let attempts = self.exec.policy.restore_attempts.max(1);
            let mut attempt = 0;
            let result = loop {
                attempt += 1;
                let r = self
                    .exec
                    .backups
                    .restore(&self.exec.backup_target, &backup.id, &req, Arc::new(|_| {}))
                    .await;
                match r {
                    Err(e) if attempt < attempts && is_lock_timeout(&e) => {
                        // One transaction that timed out waiting for a lock: nothing changed.
                        let backoff = Duration::from_millis((250 * u64::from(attempt)).min(2000));
                        self.emit(
                        self.primary(),
                        Step::RollingBack,
                        "restore_retry",
                        format!(
                            "rollback: restore attempt {attempt}/{attempts} timed out waiting for a lock (nothing changed); retrying in {} ms",
                            backoff.as_millis()
                        ),
                        json!({ "attempt": attempt, "attempts": attempts, "backoff_ms": backoff.as_millis() as u64, "error": e.message }),
                    )
                    .await?;
                        tokio::time::sleep(backoff).await;
                    }
                    other => break other,
                }
            };
            let report = match result {
                Ok(r) => r,
                Err(e) => {
                    self.step_done(
                        self.plan.strategy.as_str(),
                        at,
                        Err(e.message.clone()),
                        false,
                    )
                    .await?;
                    return Ok(Err(Failed(format!(
                        "the restore failed (one transaction: the database is as before it): {}",
                        e.message
                    ))));
                }
            };
            let what = match &report.tables {
                Some(t) => t.join(", "),
                None => "the whole database but belay's history".into(),
            };
            let mut detail = format!(
                "restored {what} from backup {} in {} ms (attempt {attempt})",
                backup.id, report.duration_ms
            );
            if !report.mismatches.is_empty() {
                detail.push_str(&format!(
                    "; row counts differ from the backup: {:?}",
                    report.mismatches
                ));
            }
            self.step_done(self.plan.strategy.as_str(), at, Ok(detail), false)
                .await?;
        }
        if self.done_before("record_history") {
            return Ok(Ok(()));
        }

        // The history still says the migrations are applied: say they were reverted.
        let at = self.begin("record_history").await?;
        let versions: Vec<String> = self
            .plan
            .migrations
            .iter()
            .filter_map(|m| m.version.clone())
            .collect();
        let note = json!({
            "rolled_back": {
                "strategy": self.plan.strategy,
                "backup_id": backup.id,
                "deployments": self.plan.deployments,
            }
        });
        match self
            .exec
            .migrations
            .record_reverted(
                self.target(),
                &versions,
                self.primary(),
                Some(&backup.id),
                note,
            )
            .await
        {
            Ok(done) => {
                self.step_done(
                    "record_history",
                    at,
                    Ok(format!(
                        "recorded {} as reverted by the restore",
                        done.join(", ")
                    )),
                    false,
                )
                .await?;
                Ok(Ok(()))
            }
            Err(e) => {
                self.step_done("record_history", at, Err(e.message.clone()), false)
                    .await?;
                Ok(Err(Failed(format!(
                    "the restore worked but the history could not record it: {}",
                    e.message
                ))))
            }
        }
    }

    async fn verify(&mut self) -> Result<Result<(), Failed>, RollbackError> {
        // History at the version.
        let at = self.begin("verify_history").await?;
        match self.exec.migrations.status(self.target()).await {
            Err(e) => {
                self.step_done("verify_history", at, Err(e.message.clone()), false)
                    .await?;
                return Ok(Err(Failed(format!(
                    "could not read the history: {}",
                    e.message
                ))));
            }
            Ok(statuses) => {
                let applied = |s: &belay_migrate::MigrationStatus| {
                    matches!(
                        s.state,
                        State::Success | State::Missing | State::Future | State::ChecksumMismatch
                    )
                };
                let newest = statuses
                    .iter()
                    .filter(|s| applied(s))
                    .filter_map(|s| s.version.as_deref())
                    .filter_map(|v| Version::parse(v).ok())
                    .max();
                let still: Vec<String> = self
                    .plan
                    .migrations
                    .iter()
                    .filter_map(|m| m.version.clone())
                    .filter(|v| {
                        statuses
                            .iter()
                            .any(|s| s.version.as_deref() == Some(v.as_str()) && applied(s))
                    })
                    .collect();
                let want = self
                    .plan
                    .to_version
                    .as_deref()
                    .and_then(|v| Version::parse(v).ok());
                let at_version = match (&newest, &want) {
                    (None, None) => true,
                    (Some(n), Some(w)) => n <= w,
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                };
                if !still.is_empty() || !at_version {
                    let e = format!(
                        "history is at {} (wanted {}); still applied: {}",
                        newest
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "nothing".into()),
                        self.plan.to_version.as_deref().unwrap_or("nothing"),
                        if still.is_empty() {
                            "none".into()
                        } else {
                            still.join(", ")
                        }
                    );
                    self.step_done("verify_history", at, Err(e.clone()), false)
                        .await?;
                    return Ok(Err(Failed(e)));
                }
                self.step_done(
                    "verify_history",
                    at,
                    Ok(format!(
                        "history at version {}",
                        newest
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "none".into())
                    )),
                    false,
                )
                .await?;
            }
        }

        // Postflight.
        let at = self.begin("verify_postflight").await?;
        let (skip, spec) = match &self.exec.postflight {
            Some(s) => (false, s.clone()),
            None => recorded_postflight(&self.records[0]),
        };
        if skip {
            self.step_done(
                "verify_postflight",
                at,
                Ok("skipped, as in the deployment".into()),
                false,
            )
            .await?;
        } else {
            match self.exec.health.postflight(self.target(), &spec).await {
                Err(e) => {
                    self.step_done("verify_postflight", at, Err(e.message.clone()), false)
                        .await?;
                    return Ok(Err(Failed(format!(
                        "postflight could not run: {}",
                        e.message
                    ))));
                }
                Ok(results) => {
                    let blocked: Vec<String> = results
                        .iter()
                        .filter(|r| r.status == CheckStatus::Block)
                        .map(|r| format!("{} ({})", r.name, r.value))
                        .collect();
                    if !blocked.is_empty() {
                        let e = format!("postflight blocked by: {}", blocked.join(", "));
                        self.step_done("verify_postflight", at, Err(e.clone()), false)
                            .await?;
                        return Ok(Err(Failed(e)));
                    }
                    self.step_done(
                        "verify_postflight",
                        at,
                        Ok(format!("{} check(s), none blocking", results.len())),
                        false,
                    )
                    .await?;
                }
            }
        }

        // Probes for the settle period.
        let at = self.begin("verify_probes").await?;
        if self.exec.probes.is_empty() {
            self.step_done(
                "verify_probes",
                at,
                Ok("no probes configured".into()),
                false,
            )
            .await?;
            return Ok(Ok(()));
        }
        let settle = self.exec.policy.settle;
        let runs = self.exec.probes.iter().map(|p| {
            let health = self.exec.health.clone();
            let target = self.plan.target.clone();
            let probe = p.clone();
            async move {
                let mut attempts = 0u64;
                let mut last = None;
                let mut triggered = false;
                match health.probe(&target, &probe, settle).await {
                    Err(e) => return (probe.name.clone(), Err(e.message)),
                    Ok(mut stream) => {
                        while let Some(ev) = stream.next().await {
                            match ev {
                                Ok(ev) => {
                                    attempts += 1;
                                    triggered |= ev.triggered || ev.state == ProbeState::Triggered;
                                    last = Some(ev);
                                }
                                Err(e) => return (probe.name.clone(), Err(e.message)),
                            }
                        }
                    }
                }
                let verdict = match last {
                    None => Err("no attempt finished within the settle period".to_string()),
                    Some(_) if triggered => Err("crossed its failure threshold again".to_string()),
                    Some(ev) if ev.result.is_failure() => {
                        Err(format!("last attempt failed: {}", ev.summary()))
                    }
                    Some(_) => Ok(attempts),
                };
                (probe.name.clone(), verdict)
            }
        });
        let results = futures::future::join_all(runs).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect();
        if !failed.is_empty() {
            let e = format!("probes did not settle: {}", failed.join("; "));
            self.step_done("verify_probes", at, Err(e.clone()), false)
                .await?;
            return Ok(Err(Failed(e)));
        }
        let passed: Vec<String> = results
            .iter()
            .map(|(n, r)| format!("{n} ({} attempts)", r.as_ref().copied().unwrap_or_default()))
            .collect();
        self.step_done(
            "verify_probes",
            at,
            Ok(format!(
                "healthy for {}: {}",
                belay_core::format_duration(settle),
                passed.join(", ")
            )),
            false,
        )
        .await?;
        Ok(Ok(()))
    }

    async fn finish(&mut self, result: Result<(), Failed>) -> Result<Outcome, RollbackError> {
        self.begin("incident_report").await?;
        let event = match &result {
            Ok(()) => RollbackEvent::Verified,
            Err(_) => RollbackEvent::StepFailed,
        };
        let state = next(Step::RollingBack, event).unwrap_or(Step::Escalated);
        let why = match &result {
            Ok(()) => format!(
                "rolled back by {} to version {} and verified",
                self.plan.strategy,
                self.plan.to_version.as_deref().unwrap_or("none")
            ),
            Err(Failed(r)) => format!("rollback escalated: {r}"),
        };
        let unreachable = self
            .errors
            .iter()
            .any(|e| e.contains("connect") || e.contains("unreachable"));
        let severity = match state {
            Step::RolledBack => Severity::P2,
            _ if unreachable => Severity::P0,
            _ => Severity::P1,
        };
        let first = &self.records[0];
        let mut data: Vec<String> = self
            .plan
            .chosen_loss()
            .map(|l| l.items.clone())
            .unwrap_or_default();
        if state == Step::Escalated {
            data.push("everything was kept: the emergency backup (if taken) and any snapshot are listed below".into());
        }
        let report = IncidentReport {
            deployment_id: first.start.id,
            also_rolled_back: self.plan.deployments.iter().skip(1).copied().collect(),
            target: first.start.target.clone(),
            environment: first.start.environment.clone(),
            release: first.start.release.clone(),
            requested_by: first.start.requested_by.clone(),
            from_version: self
                .records
                .last()
                .and_then(|r| r.start.from_version.clone()),
            reached_version: first.outcome.as_ref().and_then(|o| o.to_version.clone()),
            rolled_back_to: self.plan.to_version.clone(),
            deployed_at: first.start.started_at,
            rollback_started_at: self.started,
            rollback_finished_at: Utc::now(),
            trigger: self.plan.trigger.clone(),
            strategy: self.plan.strategy,
            reasons: self.plan.reasons.clone(),
            steps: self.steps.clone(),
            result: state.to_string(),
            errors: self.errors.clone(),
            backups: self.locations.clone(),
            data,
            severity,
            escalation: severity.escalation_path().to_string(),
        };
        let markdown = report.markdown();
        self.emit(
            self.primary(),
            Step::RollingBack,
            KIND_INCIDENT_REPORT,
            format!("incident report ({:?}): {why}", severity),
            json!({ "report": report, "markdown": markdown }),
        )
        .await?;
        failpoint::hit("rollback.after_incident_report").await;
        for record in self.records.clone() {
            let id = record.start.id;
            self.transition(id, Step::RollingBack, state, &why).await?;
            let Some(outcome) = record.outcome.clone() else {
                continue;
            };
            let ended = DeploymentOutcome {
                state,
                finished_at: Utc::now(),
                reason: Some(match &outcome.reason {
                    Some(r) => format!("{r}; {why}"),
                    None => why.clone(),
                }),
                ..outcome
            };
            self.exec.log.finish(id, &ended).await?;
        }
        if !self.exec.policy.notifiers.is_empty() || self.start_notices.is_some() {
            self.notify_ended(state, &report, &markdown)
                .instrument(info_span!("rollback_notify", phase = "ended"))
                .await;
        }
        Ok(Outcome { state, report })
    }
}

/// Whether a restore failed only because it timed out waiting for a lock.
fn is_lock_timeout(e: &ApiError) -> bool {
    e.message.contains("lock timeout")
}

/// Where `recover_command` restores an undo's snapshot: a new database beside the live
/// one, named after the deployment.
pub fn recovery_database(id: Uuid) -> String {
    format!("belay_recovered_{}", &id.simple().to_string()[..8])
}

/// The deployment's own postflight settings, from its recorded policy: `(skip, spec)`.
fn recorded_postflight(record: &DeploymentRecord) -> (bool, PostflightSpec) {
    let p = &record.start.policy["postflight"];
    let skip = p["skip"].as_bool().unwrap_or(false);
    let spec = serde_json::from_value(p["spec"].clone()).unwrap_or_default();
    (skip, spec)
}
