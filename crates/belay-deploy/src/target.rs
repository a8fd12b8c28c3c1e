//! One target's deployment run where the target lives: the seam a fleet deployment uses.
//!
//! The controller coordinates waves; each target's pipeline runs on the agent beside the
//! database ([`TargetDeployApi`], served over gRPC by `belay-rpc`), so a controller or CLI
//! that goes away does not cut a deployment's checks short, and what a target is checked
//! and watched with stays with it. The policy is split by who owns each part:
//! [`DeployerPolicy`] is what the operator asks for (it travels with the request: skip
//! flags, overrides and their reason, the watch window, the lock-trip budget, the failure
//! action), [`TargetPolicy`] is what the target is judged by (it lives in `agent.toml`:
//! preflight thresholds, postflight assertions and smoke queries, probes). No URL, probe
//! or query crosses the wire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use belay_core::{ApiError, ErrorKind};
use belay_health::{HealthApi, PostflightSpec, TargetProbe, Thresholds};
use belay_migrate::{MigrationApi, Target};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::pipeline::{Cause, DeployError, DeploySink, DeploymentRequest, Pipeline};
use crate::policy::{DeploymentPolicy, OnFailure};
use crate::record::{DeploymentLog, DeploymentOutcome};

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
        policy.preflight.thresholds = own.thresholds.clone();
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
}

/// Where a target's deployment is recorded, beside it.
pub type LogFor = Arc<dyn Fn(&str) -> Result<Arc<dyn DeploymentLog>, ApiError> + Send + Sync>;

/// [`TargetDeployApi`] in-process: the [`Pipeline`] over the targets' own capability
/// implementations (the agent's `LocalTargets` with their lint gate, lock guard and backup
/// hook, and its `HealthTargets`), each target with its [`TargetPolicy`].
#[derive(Clone)]
pub struct PipelineDeployer {
    migrations: Arc<dyn MigrationApi>,
    health: Arc<dyn HealthApi>,
    log_for: LogFor,
    targets: BTreeMap<String, TargetPolicy>,
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
        let pipeline = Pipeline::new(self.migrations.clone(), self.health.clone(), log);
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
                    // The files are here, but the pipeline reads what it needs through the
                    // migration API (plan, status), as in remote mode.
                    catalog: None,
                },
                sink,
            )
            .instrument(span)
            .await
            .map_err(deploy_error)?;
        let outcome = deployment.record.outcome.clone().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                format!("deployment {} ended without an outcome", request.id),
            )
        })?;
        Ok(TargetDeployed {
            outcome,
            kind: deployment.failure.as_ref().map(|f| f.kind),
            cause: deployment.failure.as_ref().map(|f| f.cause),
        })
    }
}

fn deploy_error(e: DeployError) -> ApiError {
    match e {
        DeployError::Policy(m) => ApiError::new(ErrorKind::Refused, m),
        // The log is the target's own: failing to write it means the target cannot be
        // reached or written.
        DeployError::Log(e) => ApiError::new(ErrorKind::Unavailable, e.to_string()),
    }
}
