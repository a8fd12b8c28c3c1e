//! One target's deployment run where the target lives: the seam a fleet deployment uses.
//!
//! The controller coordinates waves; each target's pipeline runs on the agent beside the
//! database ([`TargetDeployApi`], served over gRPC by `belay-rpc`), so a controller or CLI
//! that goes away does not cut a deployment's checks short, and what a target is checked
//! and watched with stays with it. The policy is split by who owns each part:
//! [`DeployerPolicy`] is what the operator asks for (it travels with the request: skip
//! flags, overrides and their reason, the watch window, the lock-trip budget, the failure
//! action, and preflight thresholds the deployer's belay.toml sets, which can only tighten
//! the target's), [`TargetPolicy`] is what the target is judged by (it lives in
//! `agent.toml`: preflight thresholds, postflight assertions and smoke queries, probes).
//! No URL, probe or query crosses the wire.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use belay_core::{ApiError, ErrorKind};
use belay_health::{HealthApi, PostflightSpec, TargetProbe, Thresholds};
use belay_migrate::{MigrationApi, Target};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info_span, warn};
use uuid::Uuid;

use crate::Step;
use crate::pipeline::{Cause, DeployError, DeploySink, DeploymentRequest, Pipeline};
use crate::policy::{DeploymentPolicy, OnFailure};
use crate::record::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord,
};

/// The deployer's part of the policy: what the operator asked for, for every target alike.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployerPolicy {
    /// `--no-preflight`.
    pub skip_preflight: bool,
    /// `--override-check NAME`, with `reason`.
    pub overrides: Vec<String>,
    pub reason: Option<String>,
    /// `--watch D`: the watch window after validating; `None`: no window.
    #[serde(with = "crate::policy::opt_duration")]
    pub watch: Option<Duration>,
    /// The canary soak: after the watch window (or in place of one), the target's probes
    /// watched this long again and its postflight re-run at the end, still at `watching`.
    /// On a fleet `deploy` request it is `--canary-soak`, and the controller passes it on
    /// to the canary wave's targets only; `None` (the default, also for `0s`): no soak.
    #[serde(with = "crate::policy::opt_duration")]
    pub soak: Option<Duration>,
    /// Lock guard trips a run may take.
    pub lock_trip_budget: Option<u32>,
    pub on_failure: OnFailure,
    /// The deployer's belay.toml `[preflight]` keys, as written (`lock_wait_block =
    /// "300ms"`): each is composed with the target's own threshold as the stricter of the
    /// two (a deployer may tighten what the target's owner set, never loosen it). Empty:
    /// the target's thresholds alone.
    pub thresholds: BTreeMap<String, serde_json::Value>,
}

/// The target's part of the policy: what it is judged by, kept beside it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetPolicy {
    pub thresholds: Thresholds,
    /// Postflight assertions (`[[targets.checks]]`), smoke queries and settings.
    pub postflight: PostflightSpec,
    /// Watched in the window the deployer asks for (`[[targets.probes]]`).
    pub probes: Vec<TargetProbe>,
    /// What the pre-deployment backup holds, for the record (`backup`); `None`: no backup.
    pub backup_scope: Option<String>,
}

impl DeploymentPolicy {
    /// The policy of one target's deployment: the deployer's asks over the target's
    /// own checks. A watch window on a target without probes is refused naming the key.
    pub fn compose(
        target: &str,
        asked: &DeployerPolicy,
        own: &TargetPolicy,
    ) -> Result<Self, DeployError> {
        let mut policy = DeploymentPolicy::default();
        policy.preflight.skip = asked.skip_preflight;
        policy.preflight.thresholds = tightened(&own.thresholds, &asked.thresholds)?;
        policy.preflight.overrides = asked.overrides.clone();
        policy.preflight.reason = asked.reason.clone();
        policy.backup.scope = own.backup_scope.clone();
        policy.postflight.spec = own.postflight.clone();
        if let Some(window) = asked.watch {
            if own.probes.is_empty() {
                return Err(DeployError::Policy(format!(
                    "--watch needs probes on target {target}: add [[targets.probes]] to it in the \
                     agent's agent.toml"
                )));
            }
            policy.watch.duration = Some(window);
            policy.watch.probes = own.probes.clone();
        }
        if let Some(soak) = asked.soak {
            if own.probes.is_empty() {
                return Err(DeployError::Policy(format!(
                    "--canary-soak needs probes on canary target {target}: add \
                     [[targets.probes]] to it in the agent's agent.toml"
                )));
            }
            policy.watch.soak = Some(soak);
            policy.watch.probes = own.probes.clone();
        }
        policy.lock_trip_budget = asked.lock_trip_budget;
        policy.on_failure = asked.on_failure;
        Ok(policy)
    }
}

/// The target's thresholds, each the deployer set made the stricter of the two.
fn tightened(
    own: &Thresholds,
    asked: &BTreeMap<String, serde_json::Value>,
) -> Result<Thresholds, DeployError> {
    if asked.is_empty() {
        return Ok(own.clone());
    }
    let bad = |e: String| {
        DeployError::Policy(format!(
            "the deployer's [preflight] thresholds (belay.toml): {e}"
        ))
    };
    // Key by key first, so a value that does not parse is refused naming its key.
    for (k, v) in asked {
        serde_json::from_value::<Thresholds>(serde_json::json!({ k: v }))
            .map_err(|e| bad(format!("{k}: {e}")))?;
    }
    let object: serde_json::Map<String, serde_json::Value> =
        asked.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let caller: Thresholds = serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| bad(e.to_string()))?;
    let keys: Vec<String> = asked.keys().cloned().collect();
    own.tightened(&caller, &keys).map_err(bad)
}

/// One target's deployment, as the controller asks for it.
#[derive(Debug, Clone)]
pub struct TargetDeployment {
    /// The fleet deployment's id: the same for every target, in every history row.
    pub id: Uuid,
    pub target: String,
    pub forward: Target,
    pub environment: Option<String>,
    pub requested_by: Option<String>,
    pub release: Option<String>,
    pub asked: DeployerPolicy,
}

/// How one target's deployment ended: the outcome on record, and for a failure, how the
/// step failed.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDeployed {
    pub outcome: DeploymentOutcome,
    /// The failed step's error class (`None` when it succeeded).
    pub kind: Option<ErrorKind>,
    pub cause: Option<Cause>,
    /// The deployment as the target's log keeps it (its start with the composed policy,
    /// its step, its outcome), where the deployer can have it: what a caller's rendering
    /// shows as the record.
    pub record: Option<DeploymentRecord>,
}

/// Where one target's deployment stands where it runs: what the controller asks when it
/// lost the run's stream (an agent or the controller itself restarted).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetRun {
    /// Still running in the agent's process, at `step`.
    Running { step: Step },
    /// Over, as recorded beside the target (a run its agent did not live to finish is
    /// recorded as failed at the step it was in when the agent restarted).
    Finished(DeploymentOutcome),
    /// The target's log has no such deployment: nothing of it ran there.
    NotFound,
}

/// Runs one target's deployment where the target lives, calling `sink` with each event in
/// order as it is recorded. A failed step is an `Ok` whose outcome says so; `Err` when
/// the deployment could not be run at all (an unknown target, a policy the target cannot
/// follow, a log that cannot be written) or the connection to it broke.
#[async_trait::async_trait]
pub trait TargetDeployApi: Send + Sync {
    async fn deploy_target(
        &self,
        request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError>;

    /// Where deployment `id` stands on `target`.
    async fn deployment(&self, target: &str, id: Uuid) -> Result<TargetRun, ApiError>;
}

/// Where a target's deployment is recorded, beside it.
pub type LogFor = Arc<dyn Fn(&str) -> Result<Arc<dyn DeploymentLog>, ApiError> + Send + Sync>;

/// The failure handler of a target's deployment (the rollback controller beside it),
/// given the run's sink so what it records streams with the deployment's own events;
/// `None`: the target has none.
pub type HandlerFor =
    Arc<dyn Fn(&str, DeploySink) -> Option<Arc<dyn crate::pipeline::FailureHandler>> + Send + Sync>;

/// What a target's migration files say of each migration (checksum, undo,
/// `-- belay:irreversible`), read when its deployment starts; `None` when they cannot be
/// read (the pipeline then asks the migration API, as in remote mode).
pub type CatalogFor = Arc<dyn Fn(&str) -> Option<Vec<AppliedMigration>> + Send + Sync>;

/// [`TargetDeployApi`] in-process: the [`Pipeline`] over the targets' own capability
/// implementations (the agent's `LocalTargets` with their lint gate, lock guard and backup
/// hook, and its `HealthTargets`), each target with its [`TargetPolicy`].
#[derive(Clone)]
pub struct PipelineDeployer {
    migrations: Arc<dyn MigrationApi>,
    health: Arc<dyn HealthApi>,
    log_for: LogFor,
    targets: BTreeMap<String, TargetPolicy>,
    /// `on_failure = rollback`'s handler per target; without one such a deployment is
    /// refused before it runs.
    handler_for: Option<HandlerFor>,
    /// The files' catalog per target, where the files are beside this process.
    catalog_for: Option<CatalogFor>,
    /// Deployments running in this process right now: id → target.
    running: Arc<Mutex<HashMap<Uuid, String>>>,
    /// When this deployer (its process) started: a record left unfinished from before
    /// is a run its process did not live to finish.
    started: DateTime<Utc>,
    /// Held while settling, so the start-up pass and a controller's question never
    /// settle one record twice.
    settling: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for PipelineDeployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineDeployer")
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PipelineDeployer {
    pub fn new(
        migrations: Arc<dyn MigrationApi>,
        health: Arc<dyn HealthApi>,
        log_for: LogFor,
        targets: impl IntoIterator<Item = (String, TargetPolicy)>,
    ) -> Self {
        PipelineDeployer {
            migrations,
            health,
            log_for,
            targets: targets.into_iter().collect(),
            handler_for: None,
            catalog_for: None,
            running: Arc::default(),
            started: Utc::now(),
            settling: Arc::default(),
        }
    }

    /// Installs the failure handlers (`on_failure = rollback`).
    pub fn with_failure_handlers(mut self, handler_for: HandlerFor) -> Self {
        self.handler_for = Some(handler_for);
        self
    }

    /// Installs where each target's migration files are read for the record (the agent:
    /// beside it). The pipeline then records their checksums and needs neither the plan
    /// before the run nor the history after it, two sessions fewer per deployment.
    pub fn with_catalogs(mut self, catalog_for: CatalogFor) -> Self {
        self.catalog_for = Some(catalog_for);
        self
    }

    fn is_running(&self, id: Uuid) -> bool {
        self.running.lock().is_ok_and(|r| r.contains_key(&id))
    }

    /// Settles `target`'s deployments that an earlier process of this agent started and
    /// did not live to finish (kill -9, a crash, a power cut): each is recorded as failed
    /// at the step it was in, with the reason. Called when the agent starts, so no record
    /// beside a target is left running; returns the ids settled.
    pub async fn settle(&self, target: &str) -> Result<Vec<Uuid>, ApiError> {
        let log = (self.log_for)(target)?;
        let mut settled = Vec::new();
        // Unfinished records are the newest ones: a process runs a handful at a time.
        for record in log.list(SETTLE_LOOKBACK).await.map_err(log_error)? {
            if self.abandoned(target, &record)
                && self
                    .settle_one(target, log.as_ref(), record.start.id)
                    .await?
            {
                settled.push(record.start.id);
            }
        }
        Ok(settled)
    }

    /// The deployments running in this process now, as `(id, target)`: what a stop whose
    /// grace runs out cancels, and then records with [`PipelineDeployer::record_cancelled`].
    pub fn running_now(&self) -> Vec<(Uuid, String)> {
        self.running
            .lock()
            .map(|r| r.iter().map(|(id, t)| (*id, t.clone())).collect())
            .unwrap_or_default()
    }

    /// Records each of `runs` (from [`PipelineDeployer::running_now`]) that is no longer
    /// running here and has no outcome as failed at the step it was in, cancelled by a stop
    /// after `grace`; returns the ids recorded. Called once the runs' tasks were
    /// cancelled, so the record says so at once instead of at the next start.
    pub async fn record_cancelled(
        &self,
        runs: &[(Uuid, String)],
        grace: Duration,
    ) -> Result<Vec<Uuid>, ApiError> {
        let _held = self.settling.lock().await;
        let mut recorded = Vec::new();
        for (id, target) in runs {
            if self.is_running(*id) {
                continue;
            }
            let log = (self.log_for)(target)?;
            if let Some(record) = log.get(*id).await.map_err(log_error)?
                && record.outcome.is_none()
            {
                settle(log.as_ref(), &record, Settled::AgentStop { grace }).await?;
                recorded.push(*id);
            }
        }
        Ok(recorded)
    }

    /// Settles deployment `id` if it is still abandoned once the lock is held; `true`
    /// when this call settled it.
    async fn settle_one(
        &self,
        target: &str,
        log: &dyn DeploymentLog,
        id: Uuid,
    ) -> Result<bool, ApiError> {
        let _held = self.settling.lock().await;
        match log.get(id).await.map_err(log_error)? {
            Some(record) if self.abandoned(target, &record) => {
                settle(log, &record, Settled::AgentRestart).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether `record` is a run of `target` an earlier process left unfinished: the
    /// agent records its targets' deployments under the target's name, and one started
    /// before this process that is not running in it can no longer finish.
    fn abandoned(&self, target: &str, record: &DeploymentRecord) -> bool {
        record.outcome.is_none()
            && record.start.target == target
            && record.start.started_at < self.started
            && !self.is_running(record.start.id)
    }
}

/// How many of a target's newest deployments [`PipelineDeployer::settle`] looks at.
const SETTLE_LOOKBACK: usize = 50;

/// How an unfinished run came to be settled (the evidence's `settled`).
#[derive(Clone, Copy, Debug)]
enum Settled {
    /// An earlier process did not live to finish it (kill -9, a crash).
    AgentRestart,
    /// This process cancelled it at a stop, its shutdown grace spent.
    AgentStop { grace: Duration },
}

/// Records an abandoned run as failed at the step it was in.
async fn settle(
    log: &dyn DeploymentLog,
    record: &DeploymentRecord,
    how: Settled,
) -> Result<(), ApiError> {
    let id = record.start.id;
    let step = record.step;
    let (reason, evidence) = match how {
        Settled::AgentRestart => (
            format!(
                "the agent stopped during {step} (killed or crashed) and the run was cut short; \
                 settled when the agent started again: see `belay history` on the target for \
                 what committed"
            ),
            serde_json::json!({ "settled": "agent_restart", "step": step }),
        ),
        Settled::AgentStop { grace } => (
            format!(
                "the agent was stopped during {step} and its shutdown grace ({}) ran out: the \
                 run was cancelled there (an open transaction rolled back); see `belay \
                 history` on the target for what committed, and deploy again to resume from it",
                belay_core::format_duration(grace)
            ),
            serde_json::json!({
                "settled": "agent_stop",
                "step": step,
                "shutdown_grace_ms": u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            }),
        ),
    };
    warn!(deployment = %id, target = %record.start.target, %step, ?how, "settling a deployment the agent did not finish");
    log.append(DeployEvent {
        deployment_id: id,
        target: record.start.target.clone(),
        seq: 0,
        at: Utc::now(),
        step: Step::Failed,
        kind: crate::pipeline::KIND_TRANSITION.to_string(),
        message: format!("{step} → failed: {reason}"),
        payload: serde_json::json!({ "from": step, "to": Step::Failed, "reason": reason }),
    })
    .await
    .map_err(log_error)?;
    log.finish(
        id,
        &DeploymentOutcome {
            state: Step::Failed,
            finished_at: Utc::now(),
            failed_step: Some(step),
            reason: Some(reason),
            evidence,
            to_version: None,
            backup_id: None,
            applied: Vec::new(),
        },
    )
    .await
    .map_err(log_error)
}

/// Takes the id out of the running set however the run ends.
struct Running(Arc<Mutex<HashMap<Uuid, String>>>, Uuid);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.lock() {
            r.remove(&self.1);
        }
    }
}

#[async_trait::async_trait]
impl TargetDeployApi for PipelineDeployer {
    async fn deploy_target(
        &self,
        request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError> {
        let own = self.targets.get(&request.target).ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownTarget,
                format!("unknown target {:?}", request.target),
            )
        })?;
        let policy = DeploymentPolicy::compose(&request.target, &request.asked, own)
            .map_err(deploy_error)?;
        let log = (self.log_for)(&request.target)?;
        if let Ok(mut r) = self.running.lock() {
            r.insert(request.id, request.target.clone());
        }
        let _running = Running(self.running.clone(), request.id);
        let mut pipeline = Pipeline::new(self.migrations.clone(), self.health.clone(), log.clone());
        if let Some(handler) = self
            .handler_for
            .as_ref()
            .and_then(|f| f(&request.target, sink.clone()))
        {
            pipeline = pipeline.with_failure_handler(handler);
        }
        let span = info_span!("deploy_target", deployment = %request.id, target = %request.target);
        let deployment = pipeline
            .run(
                DeploymentRequest {
                    id: request.id,
                    target: request.target.clone(),
                    forward: request.forward,
                    environment: request.environment,
                    requested_by: request.requested_by,
                    release: request.release,
                    policy,
                    // Without the files' catalog the pipeline reads what it needs through
                    // the migration API (plan, status), as in remote mode.
                    catalog: self.catalog_for.as_ref().and_then(|f| f(&request.target)),
                },
                sink,
            )
            .instrument(span)
            .await
            .map_err(deploy_error)?;
        // Read again: a failure handler may have rolled it back since (`rolled_back`,
        // `escalated`), and that is how it ended.
        let record = match deployment.failure {
            Some(_) => log
                .get(request.id)
                .await
                .map_err(log_error)?
                .unwrap_or_else(|| deployment.record.clone()),
            None => deployment.record.clone(),
        };
        let outcome = record.outcome.clone().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                format!("deployment {} ended without an outcome", request.id),
            )
        })?;
        Ok(TargetDeployed {
            outcome,
            kind: deployment.failure.as_ref().map(|f| f.kind),
            cause: deployment.failure.as_ref().map(|f| f.cause),
            record: Some(deployment.record),
        })
    }

    async fn deployment(&self, target: &str, id: Uuid) -> Result<TargetRun, ApiError> {
        if !self.targets.contains_key(target) {
            return Err(ApiError::new(
                ErrorKind::UnknownTarget,
                format!("unknown target {target:?}"),
            ));
        }
        let log = (self.log_for)(target)?;
        let Some(record) = log.get(id).await.map_err(log_error)? else {
            return Ok(TargetRun::NotFound);
        };
        if let Some(outcome) = record.outcome {
            return Ok(TargetRun::Finished(outcome));
        }
        if self.is_running(id) || !self.abandoned(target, &record) {
            return Ok(TargetRun::Running { step: record.step });
        }
        // Left by an earlier process and not settled at start (its database was down):
        // settled now, so the answer is final.
        self.settle_one(target, log.as_ref(), id).await?;
        match log
            .get(id)
            .await
            .map_err(log_error)?
            .and_then(|r| r.outcome)
        {
            Some(outcome) => Ok(TargetRun::Finished(outcome)),
            None => Ok(TargetRun::Running { step: record.step }),
        }
    }
}

fn log_error(e: crate::record::LogError) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, e.to_string())
}

fn deploy_error(e: DeployError) -> ApiError {
    match e {
        // What the deployer asked cannot be followed here (a watch window on a target
        // without probes, an unknown threshold): the request is to be changed, like a
        // usage error; nothing ran.
        DeployError::Policy(m) => ApiError::new(ErrorKind::InvalidArgument, m),
        // The log is the target's own: failing to write it means the target cannot be
        // reached or written.
        DeployError::Log(e) => ApiError::new(ErrorKind::Unavailable, e.to_string()),
    }
}
