//! [`RollbackApi`]: the rollback controller as one trait per capability, like the others
//! (`MigrationApi`, `BackupApi`, …): one target named per call, every failure an
//! `ApiError`. [`LocalRollbacks`] runs it in-process over each target's [`Planner`] and
//! [`Executor`] (the CLI's local mode, and the agent for its targets); `belay-rpc` serves
//! any implementation over gRPC and implements it as a client, and the controller routes
//! it to the agent owning the target — so local and remote share one path and one
//! rendering.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use belay_core::{ApiError, ErrorKind};
use belay_deploy::{DeployEvent, DeploySink, DeploymentLog, DeploymentRecord, Step};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::RollbackError;
use crate::exec::{AbortSignal, Executor, KIND_INCIDENT_REPORT, KIND_ROLLBACK_STEP, Outcome};
use crate::model::{RollbackPlan, Trigger};
use crate::plan::{Planner, RollbackTo, resolve_in};
use crate::report::IncidentReport;
use crate::resume::progress;

/// How many of a target's newest deployments a rollback looks at.
pub const LOOKBACK: usize = 1000;

/// A deployment on record, and whether a rollback can act on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollbackable {
    pub id: Uuid,
    pub state: Step,
    pub started_at: DateTime<Utc>,
    pub release: Option<String>,
    pub from_version: Option<String>,
    pub reached_version: Option<String>,
    /// Migrations it applied.
    pub migrations: usize,
    pub can_roll_back: bool,
}

impl Rollbackable {
    pub fn of(r: &DeploymentRecord) -> Rollbackable {
        let migrations = r.outcome.as_ref().map(|o| o.applied.len()).unwrap_or(0);
        Rollbackable {
            id: r.start.id,
            state: r.step,
            started_at: r.start.started_at,
            release: r.start.release.clone(),
            from_version: r.start.from_version.clone(),
            reached_version: r.outcome.as_ref().and_then(|o| o.to_version.clone()),
            migrations,
            can_roll_back: matches!(r.step, Step::Succeeded | Step::Failed) && migrations > 0,
        }
    }
}

/// What `execute` runs: a plan made now for `<to>`, or one already shown to a person
/// (the executor checks again, just before acting, that its deployments can still be
/// rolled back).
#[derive(Debug, Clone)]
pub enum Execute {
    To(RollbackTo),
    Plan(Box<RollbackPlan>),
}

/// Where a deployment's rollback stands: its record, the rollback's steps as recorded,
/// the incident report once it ended, and whether it is running in this process now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackStatus {
    pub record: DeploymentRecord,
    /// The `rollback_step` events, in order.
    pub steps: Vec<DeployEvent>,
    /// The `notify` events: each delivery of the report to a webhook, in order.
    pub notifications: Vec<DeployEvent>,
    pub report: Option<IncidentReport>,
    pub markdown: Option<String>,
    /// Running now in the process that answered (an agent runs every rollback of its
    /// targets: there `false` for a `rolling_back` record means interrupted; locally
    /// another `belay` process may be running it).
    pub running: bool,
    /// Why it was asked to stop, while it finishes the step under way.
    pub abort_requested: Option<String>,
    /// The step that started and has not ended (`rolling_back` only): where an
    /// interrupted rollback stopped.
    #[serde(default)]
    pub under_way: Option<String>,
    /// For a `rolling_back` record: running (here, or in another process holding its
    /// lock), or what `rollback execute` would do with it — resume from a step, end it
    /// escalated, or refuse, and why.
    #[serde(default)]
    pub next: Option<String>,
}

/// The rollback controller of named targets.
#[async_trait::async_trait]
pub trait RollbackApi: Send + Sync {
    /// The newest `limit` deployments of `target`, newest first.
    async fn list(&self, target: &str, limit: usize) -> Result<Vec<Rollbackable>, ApiError>;

    /// What a rollback to `to` would do, and why; changes nothing.
    async fn plan(
        &self,
        target: &str,
        to: &RollbackTo,
        trigger: Trigger,
    ) -> Result<RollbackPlan, ApiError>;

    /// Runs a rollback, calling `sink` with each event as it is recorded. A rollback that
    /// ran and escalated is an `Ok` whose state says so; `Err` when it could not start
    /// (refused, already rolled back or rolling back, the log unreachable).
    async fn execute(
        &self,
        target: &str,
        what: Execute,
        trigger: Trigger,
        sink: DeploySink,
    ) -> Result<Outcome, ApiError>;

    /// A deployment's rollback (`id`: a unique prefix); `None`: the newest deployment
    /// that was rolled back or is being rolled back.
    async fn status(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError>;

    /// Stops the running rollback of deployment `id` (`None`: the one running) before
    /// its next step; returns its status once it stopped.
    async fn abort(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError>;
}

/// One target's rollback controller, wired over its APIs.
#[derive(Clone)]
pub struct TargetRollbacks {
    pub planner: Planner,
    pub executor: Executor,
    pub log: Arc<dyn DeploymentLog>,
}

impl std::fmt::Debug for TargetRollbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetRollbacks")
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

/// A rollback running in this process.
struct Running {
    abort: AbortSignal,
    done: tokio::sync::watch::Receiver<bool>,
}

/// [`RollbackApi`] in-process, per target.
#[derive(Clone, Default)]
pub struct LocalRollbacks {
    targets: BTreeMap<String, TargetRollbacks>,
    /// By deployment id (the plan's first): never two rollbacks of one deployment here.
    running: Arc<Mutex<HashMap<Uuid, Running>>>,
}

impl std::fmt::Debug for LocalRollbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRollbacks")
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Takes a rollback out of the running set however it ends.
struct Finished {
    running: Arc<Mutex<HashMap<Uuid, Running>>>,
    ids: Vec<Uuid>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Ok(mut r) = self.running.lock() {
            for id in &self.ids {
                r.remove(id);
            }
        }
        let _ = self.done.send(true);
    }
}

fn log_error(e: belay_deploy::LogError) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        belay_core::redact_url(&e.to_string()),
    )
}

impl LocalRollbacks {
    pub fn new() -> Self {
        LocalRollbacks::default()
    }

    pub fn with_target(mut self, name: impl Into<String>, target: TargetRollbacks) -> Self {
        self.targets.insert(name.into(), target);
        self
    }

    /// The target's wiring.
    pub fn target(&self, name: &str) -> Result<&TargetRollbacks, ApiError> {
        self.targets.get(name).ok_or_else(|| {
            ApiError::new(ErrorKind::UnknownTarget, format!("unknown target {name:?}"))
        })
    }

    async fn find(
        &self,
        t: &TargetRollbacks,
        id: Option<&str>,
    ) -> Result<DeploymentRecord, ApiError> {
        let records = t.log.list(LOOKBACK).await.map_err(log_error)?;
        match id {
            Some(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                let found: Vec<&DeploymentRecord> = records
                    .iter()
                    .filter(|r| r.start.id.to_string().starts_with(&prefix))
                    .collect();
                match found.as_slice() {
                    [one] => Ok((*one).clone()),
                    [] => Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!(
                            "no deployment id starts with {prefix:?}; `belay rollback list` shows them"
                        ),
                    )),
                    many => Err(ApiError::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "{prefix:?} starts {} deployment ids: give more of it",
                            many.len()
                        ),
                    )),
                }
            }
            None => records
                .into_iter()
                .find(|r| {
                    matches!(
                        r.step,
                        Step::RollingBack | Step::RolledBack | Step::Escalated
                    )
                })
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::NotFound,
                        "no deployment on record was rolled back",
                    )
                }),
        }
    }

    async fn status_of(
        &self,
        t: &TargetRollbacks,
        record: DeploymentRecord,
    ) -> Result<RollbackStatus, ApiError> {
        let events = t.log.events(record.start.id).await.map_err(log_error)?;
        let (report, markdown) = match incident_report(&events) {
            Some((r, m)) => (Some(r), Some(m)),
            None => (None, None),
        };
        let (running, abort_requested) = match self.running.lock() {
            Ok(r) => match r.get(&record.start.id) {
                Some(run) => (true, run.abort.requested()),
                None => (false, None),
            },
            Err(_) => (false, None),
        };
        let (under_way, next) = if record.step == Step::RollingBack {
            let p = progress(&events);
            (
                p.under_way.clone(),
                Some(self.next_of(t, &record, running).await?),
            )
        } else {
            (None, None)
        };
        let (steps, notifications): (Vec<_>, Vec<_>) = events
            .into_iter()
            .filter(|e| e.kind == KIND_ROLLBACK_STEP || e.kind == crate::notify::KIND_NOTIFY)
            .partition(|e| e.kind == KIND_ROLLBACK_STEP);
        Ok(RollbackStatus {
            abort_requested,
            under_way,
            next,
            steps,
            notifications,
            record,
            report,
            markdown,
            running,
        })
    }
}

impl LocalRollbacks {
    /// What `execute` would do now with `record`'s rollback (`rolling_back`).
    async fn next_of(
        &self,
        t: &TargetRollbacks,
        record: &DeploymentRecord,
        running_here: bool,
    ) -> Result<String, ApiError> {
        let id = record.start.id;
        if running_here {
            return Ok(
                "running now in this process: `execute` is refused; `abort` stops it between steps"
                    .into(),
            );
        }
        match &t.executor.run_lock {
            None => {
                return Ok("refused: this process cannot tell whether another one still runs it (no run lock)".into());
            }
            Some(lock) => {
                if let Some(who) = lock.holder(&record.start.target, id).await? {
                    return Ok(format!(
                        "running in another process ({who}), which holds its lock: `execute` is refused"
                    ));
                }
            }
        }
        // Only the rollback's first deployment carries its plan and steps.
        let mut events = t.log.events(id).await.map_err(log_error)?;
        if !events
            .iter()
            .any(|e| e.kind == crate::exec::KIND_ROLLBACK_PLAN)
        {
            let records = t.log.list(LOOKBACK).await.map_err(log_error)?;
            for r in records
                .iter()
                .filter(|r| r.step == Step::RollingBack && r.start.id != id)
            {
                let other = t.log.events(r.start.id).await.map_err(log_error)?;
                if progress(&other)
                    .plan
                    .is_some_and(|p| p.deployments.contains(&id))
                {
                    return Ok(format!(
                        "interrupted; part of the rollback of deployment {}: `belay rollback status {}` says what `execute` does",
                        r.start.id,
                        &r.start.id.to_string()[..8]
                    ));
                }
            }
            events.clear();
        }
        Ok(format!(
            "interrupted (no process runs it); `rollback execute {}` would {}",
            &id.to_string()[..8],
            progress(&events).next_action(t.executor.hooks())
        ))
    }

    /// The recorded plan of an interrupted (or running) rollback that `to` names — its
    /// deployment (any of them) or the version it returns to — with what `execute`
    /// would do with it; `None` when `to` names none.
    async fn interrupted(
        &self,
        t: &TargetRollbacks,
        records: &[DeploymentRecord],
        to: &RollbackTo,
    ) -> Result<Option<RollbackPlan>, ApiError> {
        let to = match to {
            RollbackTo::Positional(text) => RollbackTo::positional(text, records),
            other => other.clone(),
        };
        let running: Vec<Uuid> = self
            .running
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        for r in records.iter().filter(|r| r.step == Step::RollingBack) {
            let events = t.log.events(r.start.id).await.map_err(log_error)?;
            let Some(mut plan) = progress(&events).plan else {
                continue;
            };
            if plan.deployments.first() != Some(&r.start.id) {
                continue;
            }
            let named = match &to {
                RollbackTo::Deployment(prefix) => {
                    let prefix = prefix.to_ascii_lowercase();
                    plan.deployments
                        .iter()
                        .any(|d| d.to_string().starts_with(&prefix))
                }
                RollbackTo::Version(v) => plan.to_version.as_deref() == Some(v.as_str()),
                _ => false,
            };
            if named {
                plan.resume = Some(self.next_of(t, r, running.contains(&r.start.id)).await?);
                return Ok(Some(plan));
            }
        }
        Ok(None)
    }
}

/// The newest incident report among `events`, with its Markdown.
pub fn incident_report(events: &[DeployEvent]) -> Option<(IncidentReport, String)> {
    let e = events
        .iter()
        .rev()
        .find(|e| e.kind == KIND_INCIDENT_REPORT)?;
    let report = serde_json::from_value(e.payload["report"].clone()).ok()?;
    let markdown = e.payload["markdown"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Some((report, markdown))
}

#[async_trait::async_trait]
impl RollbackApi for LocalRollbacks {
    async fn list(&self, target: &str, limit: usize) -> Result<Vec<Rollbackable>, ApiError> {
        let t = self.target(target)?;
        let records = t.log.list(limit).await.map_err(log_error)?;
        Ok(records.iter().map(Rollbackable::of).collect())
    }

    async fn plan(
        &self,
        target: &str,
        to: &RollbackTo,
        trigger: Trigger,
    ) -> Result<RollbackPlan, ApiError> {
        let t = self.target(target)?;
        let records = t.log.list(LOOKBACK).await.map_err(log_error)?;
        // An interrupted rollback is continued from its own plan, never planned afresh.
        if let Some(plan) = self.interrupted(t, &records, to).await? {
            return Ok(plan);
        }
        let resolved = resolve_in(&records, to)?;
        Ok(t.planner.plan(target, &resolved, trigger).await?)
    }

    async fn execute(
        &self,
        target: &str,
        what: Execute,
        trigger: Trigger,
        sink: DeploySink,
    ) -> Result<Outcome, ApiError> {
        let t = self.target(target)?;
        let plan = match what {
            Execute::To(to) => self.plan(target, &to, trigger).await?,
            Execute::Plan(plan) => {
                if plan.target != target {
                    return Err(ApiError::new(
                        ErrorKind::InvalidArgument,
                        format!("the plan is for target {:?}, not {target:?}", plan.target),
                    ));
                }
                *plan
            }
        };
        let abort = AbortSignal::default();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        {
            let mut running = self.running.lock().map_err(|_| {
                ApiError::new(ErrorKind::Internal, "the running-rollback set is poisoned")
            })?;
            // Never two rollbacks of one deployment: the record's state is checked again
            // by the executor; this closes the gap between that read and its first write.
            if let Some(id) = plan.deployments.iter().find(|id| running.contains_key(id)) {
                return Err(RollbackError::Refused(format!(
                    "deployment {id} is already being rolled back (by a rollback running now); see `belay rollback status {}`",
                    &id.to_string()[..8]
                ))
                .into());
            }
            for id in &plan.deployments {
                running.insert(
                    *id,
                    Running {
                        abort: abort.clone(),
                        done: done_rx.clone(),
                    },
                );
            }
        }
        let _finished = Finished {
            running: self.running.clone(),
            ids: plan.deployments.clone(),
            done: done_tx,
        };
        let mut executor = t.executor.clone();
        let own = executor.sink.take();
        executor.sink = Some(Arc::new(move |e: &DeployEvent| {
            if let Some(own) = &own {
                own(e);
            }
            sink(e);
        }));
        executor.abort = Some(abort);
        Ok(executor.execute(&plan).await?)
    }

    async fn status(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let t = self.target(target)?;
        let record = self.find(t, id).await?;
        self.status_of(t, record).await
    }

    async fn abort(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let t = self.target(target)?;
        let record = match id {
            Some(_) => self.find(t, id).await?,
            None => {
                let records = t.log.list(LOOKBACK).await.map_err(log_error)?;
                records
                    .into_iter()
                    .find(|r| r.step == Step::RollingBack)
                    .ok_or_else(|| {
                        ApiError::new(ErrorKind::NotFound, "no rollback is running on this target")
                    })?
            }
        };
        let id = record.start.id;
        let found = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(&id).map(|r| (r.abort.clone(), r.done.clone())));
        let Some((abort, mut done)) = found else {
            let why = match record.step {
                Step::RollingBack => format!(
                    "the rollback of deployment {id} is not running in this process: it was interrupted (`belay rollback status {}` shows where it stopped), or, in local mode, another `belay` process runs it, which `abort` cannot reach (stop that process; an agent runs all of its targets' rollbacks, so `--controller … --target …` reaches them)",
                    &id.to_string()[..8]
                ),
                other => format!("deployment {id} is {other}: no rollback of it is running"),
            };
            return Err(ApiError::new(ErrorKind::Refused, why));
        };
        abort.abort(format!(
            "aborted by an operator at {}",
            Utc::now().format("%H:%M:%S UTC")
        ));
        // The step under way finishes first; then the executor records where it stopped.
        let _ = done.wait_for(|d| *d).await;
        let record = t.log.get(id).await.map_err(log_error)?.ok_or_else(|| {
            ApiError::new(ErrorKind::NotFound, format!("deployment {id} vanished"))
        })?;
        self.status_of(t, record).await
    }
}
