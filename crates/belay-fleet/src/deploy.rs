//! Fleet deployments: resolve targets, check the promotion gate and agent liveness before
//! anything runs, then run each target's pipeline on its agent in waves and halt on the
//! first wave with a target that failed at any step.

use crate::waves::{self, Batch};
use crate::whole::RollbackScope;
use crate::{Fleet, store_err};
use belay_deploy::{
    Cause, DeployEvent, DeploySink, DeployerPolicy, KIND_MIGRATION, KIND_TRANSITION, OnFailure,
    Step, StepFailure, TargetDeployApi, TargetDeployed, TargetDeployment,
};
use belay_migrate::{ApiError, ErrorKind, Target};
use belay_rollback::{Trigger, TriggerKind};
use belay_rpc::DeployClient;
use belay_store::{DeploymentState, NewDeployment, NewEvent, TargetState};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct DeploySpec {
    /// Names or glob patterns.
    pub patterns: Vec<String>,
    pub to_version: Option<String>,
    pub canary: usize,
    pub batch: Batch,
    pub parallel: usize,
    pub environment: Option<String>,
    pub skip_promotion_reason: Option<String>,
    pub requested_by: Option<String>,
    /// The deployer's part of every target's pipeline policy; the rest is in each
    /// target's agent.toml.
    pub policy: DeployerPolicy,
    /// With `Deployment`, a failed wave rolls back the targets that succeeded too.
    pub rollback_scope: RollbackScope,
}

fn refused(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Refused, msg)
}

impl Fleet {
    /// Validates and creates a deployment, then runs it in the background. Every check
    /// that can fail does so before the first target is touched.
    pub async fn start_deploy(&self, spec: DeploySpec) -> Result<Uuid, ApiError> {
        let all = self.store.targets().await.map_err(store_err)?;
        let mut chosen: Vec<String> = Vec::new();
        for p in &spec.patterns {
            let is_glob = p.contains(['*', '?']);
            let matched: Vec<&str> = all
                .iter()
                .filter(|t| waves::glob_match(p, &t.name))
                .map(|t| t.name.as_str())
                .collect();
            if matched.is_empty() {
                return Err(ApiError::new(
                    ErrorKind::UnknownTarget,
                    if is_glob {
                        format!("no registered target matches {p:?} (see `belay agents`)")
                    } else {
                        format!(
                            "unknown target {p:?}: no agent has registered it (see `belay agents`)"
                        )
                    },
                ));
            }
            chosen.extend(matched.into_iter().map(String::from));
        }
        chosen.sort();
        chosen.dedup();
        if chosen.is_empty() {
            return Err(refused("no targets given: pass --targets NAME_OR_PATTERN"));
        }
        if spec.rollback_scope == RollbackScope::Deployment
            && spec.policy.on_failure != OnFailure::Rollback
        {
            return Err(refused(
                "rollback scope `deployment` rolls back the rest of the deployment after a failed target's own rollback: it needs on_failure = rollback (pass --on-failure rollback), or drop --rollback-scope",
            ));
        }
        if spec.policy.soak.is_some() && spec.canary == 0 {
            return Err(refused(
                "a canary soak needs a canary wave to soak: pass --canary N (N ≥ 1), or drop --canary-soak",
            ));
        }

        // Promotion gate.
        let envs = &self.config.environments;
        if let Some(env) = &spec.environment {
            let Some(idx) = envs.iter().position(|e| e == env) else {
                return Err(refused(format!(
                    "environment {env:?} is not one of the controller's environments ({})",
                    envs.join(" → ")
                )));
            };
            for t in all.iter().filter(|t| chosen.contains(&t.name)) {
                if t.environment.as_deref().is_some_and(|e| e != env) {
                    return Err(refused(format!(
                        "target {} belongs to environment {:?}, not {env:?}",
                        t.name,
                        t.environment.as_deref().unwrap_or("")
                    )));
                }
            }
            match &spec.skip_promotion_reason {
                Some(reason) if reason.trim().is_empty() => {
                    return Err(refused("--skip-promotion needs a --reason"));
                }
                Some(_) => {}
                None if idx > 0 => {
                    let prev = &envs[idx - 1];
                    let Some(v) = &spec.to_version else {
                        return Err(refused(format!(
                            "promotion to {env} is checked per version: pass --to VERSION (it must have succeeded in {prev})"
                        )));
                    };
                    if !self.store.succeeded_in(prev, v).await.map_err(store_err)? {
                        return Err(refused(format!(
                            "version {v} has not succeeded in {prev}; deploy it there first (environments go {}), or pass --skip-promotion --reason \"…\"",
                            envs.join(" → ")
                        )));
                    }
                }
                None => {}
            }
        } else if !envs.is_empty() {
            return Err(refused(format!(
                "the controller enforces promotion ({}): pass --environment",
                envs.join(" → ")
            )));
        }

        // Every agent must be up before anything runs, so nothing is applied elsewhere
        // by surprise.
        for t in &chosen {
            self.client_for(t).await?;
        }

        let id = Uuid::new_v4();
        // Kept with the deployment: a later whole-deployment rollback goes through them
        // last wave first.
        let planned: Vec<&[String]> = waves::plan(chosen.len(), spec.canary, spec.batch)
            .into_iter()
            .map(|w| &chosen[w])
            .collect();
        let record = self
            .store
            .create_deployment(&NewDeployment {
                id,
                to_version: spec.to_version.clone(),
                targets: chosen.clone(),
                environment: spec.environment.clone(),
                params: serde_json::json!({
                    "canary": spec.canary,
                    "batch": format!("{:?}", spec.batch),
                    "parallel": spec.parallel,
                    "patterns": spec.patterns,
                    "policy": spec.policy,
                    "waves": planned,
                    "rollback_scope": spec.rollback_scope,
                }),
                skip_promotion_reason: spec.skip_promotion_reason.clone(),
                requested_by: spec.requested_by.clone(),
            })
            .await
            .map_err(store_err)?;
        self.notify();
        if let Ok(mut a) = self.active.lock() {
            a.insert(id);
        }
        let fleet = self.clone();
        tokio::spawn(
            async move {
                if let Err(e) = fleet.run(id, chosen, spec).await {
                    tracing::error!(deployment = %id, error = %e, "deployment stopped on a controller error");
                    let _ = fleet.store.transition(id, DeploymentState::Failed, &e.to_string()).await;
                }
                if let Ok(mut a) = fleet.active.lock() {
                    a.remove(&id);
                }
                fleet.notify();
            }
            .instrument(info_span!("deployment", id = %record.id)),
        );
        Ok(id)
    }

    async fn run(&self, id: Uuid, targets: Vec<String>, spec: DeploySpec) -> Result<(), ApiError> {
        self.store
            .transition(
                id,
                DeploymentState::Migrating,
                "running each target's pipeline on its agent, wave by wave",
            )
            .await
            .map_err(store_err)?;
        self.notify();
        let plan = waves::plan(targets.len(), spec.canary, spec.batch);
        let sem = Arc::new(Semaphore::new(spec.parallel.max(1)));
        for (n, wave) in plan.iter().enumerate() {
            let names = &targets[wave.clone()];
            self.record(NewEvent {
                deployment_id: id,
                target: None,
                kind: "wave".into(),
                message: format!("wave {}/{}: {}", n + 1, plan.len(), names.join(", ")),
                payload: serde_json::json!({ "wave": n + 1, "targets": names }),
            })
            .await?;
            let last_wave = n + 1 == plan.len();
            // The soak is the canary wave's alone (`waves::plan` puts it first): the
            // targets after it are what it protects.
            let canary_wave = n == 0 && spec.canary > 0;
            let mut wave_spec = spec.clone();
            if !canary_wave {
                wave_spec.policy.soak = None;
            }
            let mut tasks = tokio::task::JoinSet::new();
            for t in names {
                let (fleet, t, sem, spec) =
                    (self.clone(), t.clone(), sem.clone(), wave_spec.clone());
                // In the deployment's span: each target's spans join its trace.
                tasks.spawn(
                    async move {
                        let _permit = sem.acquire_owned().await;
                        let (outcome, trigger) =
                            fleet.deploy_target(id, &t, &spec, last_wave).await;
                        (t, outcome, trigger)
                    }
                    .in_current_span(),
                );
            }
            let mut failures = Vec::new();
            let mut trigger = None;
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((t, Ok(()), _)) => info!(target = %t, "target deployed"),
                    Ok((t, Err(e), failed)) => {
                        failures.push(format!("{t}: {}", e.message));
                        trigger = trigger.or(failed);
                    }
                    Err(e) => failures.push(format!("a target task panicked: {e}")),
                }
            }
            if canary_wave
                && failures.is_empty()
                && plan.len() > 1
                && let Some(soak) = spec.policy.soak
            {
                let soak = belay_core::format_duration(soak);
                self.record(NewEvent {
                    deployment_id: id,
                    target: None,
                    kind: "canary_soaked".into(),
                    message: format!(
                        "canary soak of {soak} passed on {}: the next wave starts",
                        names.join(", ")
                    ),
                    payload: serde_json::json!({ "targets": names, "soak": soak }),
                })
                .await?;
            }
            if !failures.is_empty() {
                let untouched = &targets[wave.end..];
                for t in untouched {
                    self.set_target(
                        id,
                        t,
                        TargetState::Skipped,
                        &format!("not started: wave {} failed", n + 1),
                    )
                    .await?;
                }
                let msg = format!(
                    "halted after wave {}/{}{}: {}{}",
                    n + 1,
                    plan.len(),
                    if canary_wave { " (the canary)" } else { "" },
                    failures.join("; "),
                    if untouched.is_empty() {
                        String::new()
                    } else {
                        format!("; untouched: {}", untouched.join(", "))
                    }
                );
                self.store
                    .transition(id, DeploymentState::Failed, &msg)
                    .await
                    .map_err(store_err)?;
                self.notify();
                if spec.rollback_scope == RollbackScope::Deployment {
                    let trigger = trigger.unwrap_or_else(|| Trigger {
                        kind: TriggerKind::MigrationFailed,
                        step: None,
                        reason: format!("fleet deployment {id} {msg}"),
                        evidence: serde_json::json!({ "deployment": id, "failures": failures }),
                        data_suspect: false,
                    });
                    self.roll_back_failed_deployment(id, trigger, spec.parallel)
                        .await?;
                }
                return Ok(());
            }
        }
        self.store
            .transition(
                id,
                DeploymentState::Succeeded,
                &format!("{} target(s) deployed: every step passed", targets.len()),
            )
            .await
            .map_err(store_err)?;
        self.notify();
        Ok(())
    }

    /// Runs one target of a fleet deployment: [`Fleet::run_target`]'s verdict, and when
    /// the target failed, the trigger of a whole-deployment rollback (its failure).
    async fn deploy_target(
        &self,
        id: Uuid,
        target: &str,
        spec: &DeploySpec,
        last_wave: bool,
    ) -> (Result<(), ApiError>, Option<Trigger>) {
        let request = TargetDeployment {
            id,
            target: target.to_string(),
            forward: Target {
                to: spec.to_version.clone(),
                steps: None,
            },
            environment: spec.environment.clone(),
            requested_by: spec.requested_by.clone(),
            release: None,
            asked: spec.policy.clone(),
        };
        let ran = self.run_target(request, last_wave, None).await;
        let trigger = match &ran.agent {
            Ok(deployed) if deployed.outcome.state != Step::Succeeded => {
                Some(failure_trigger(id, target, deployed))
            }
            _ => None,
        };
        (ran.verdict, trigger)
    }

    /// Runs one target's pipeline on its agent (`DeployService.DeployTarget`) as part of
    /// deployment `request.id` in the store, storing every event as it arrives with the
    /// step it happened in, the target's step at each transition, and its outcome; each
    /// event also goes to `forward` (a remote `migrate`'s caller) as it arrives. In a
    /// `last_wave`, entering `watching` moves the deployment there too.
    pub(crate) async fn run_target(
        &self,
        request: TargetDeployment,
        last_wave: bool,
        forward: Option<DeploySink>,
    ) -> TargetRan {
        let (id, target) = (request.id, request.target.clone());
        let target = target.as_str();
        if let Err(e) = self
            .set_target(
                id,
                target,
                TargetState::Running,
                "running its pipeline on its agent",
            )
            .await
        {
            return TargetRan {
                agent: Err(e.clone()),
                verdict: Err(e),
            };
        }
        let span = info_span!("deploy_target", target = %target);
        // Bounded: when the store is slow to record, the agent's stream is read more
        // slowly (HTTP/2 flow control slows the agent), nothing piles up or is dropped.
        let (tx, rx) = belay_rpc::stream::channel::<DeployEvent>(belay_rpc::stream::CAPACITY);
        let mut rx = rx.into_inner();
        let sink: DeploySink = Arc::new(move |e: &DeployEvent| {
            if let Some(f) = &forward {
                f(e);
            }
            let _ = tx.send_blocking(e.clone());
        });
        let recorder = {
            let (fleet, target, span) = (self.clone(), target.to_string(), span.clone());
            tokio::spawn(async move {
                let mut seen = Seen::default();
                // A span per step the agent reports, as the agent has one: entered at its
                // transition, closed at the next.
                let mut _step_span = None;
                while let Some(first) = rx.recv().await {
                    // What arrived meanwhile is stored with it, in one transaction.
                    let mut burst = vec![first];
                    while burst.len() < EVENT_BURST
                        && let Ok(e) = rx.try_recv()
                    {
                        burst.push(e);
                    }
                    let mut entered_watching = false;
                    for e in &burst {
                        seen.note(e);
                        if e.kind == KIND_TRANSITION {
                            _step_span = (!matches!(e.step, Step::Succeeded | Step::Failed)).then(|| {
                                info_span!(parent: &span, "deploy_step", otel.name = e.step.as_str(), step = %e.step)
                            });
                        }
                        entered_watching |=
                            e.kind == KIND_TRANSITION && e.step == Step::Watching && last_wave;
                    }
                    if let Err(err) = fleet.record_target_events(id, &target, burst).await {
                        // The run goes on on the agent; what the store missed is said in
                        // the log, and the target's outcome is still recorded below.
                        tracing::error!(target = %target, error = %err, "target events could not be stored");
                    }
                    if entered_watching {
                        fleet.deployment_watching(id).await;
                    }
                }
                seen
            })
        };
        let (result, agent) = match self.connection_for(target).await {
            Ok((conn, agent)) => (
                DeployClient::new(&conn)
                    .deploy_target(request, sink)
                    .instrument(span)
                    .await,
                agent.name,
            ),
            Err(e) => {
                // Nothing will send: the recorder must see the channel close.
                drop(sink);
                (Err(e), "?".to_string())
            }
        };
        // The sink is gone with the call: the recorder drains what is left, then ends,
        // so the target's final state comes after all of its events.
        let seen = recorder.await.unwrap_or_default();
        if seen.took_backup {
            // The mirror learns at once which backup precedes this deployment.
            self.mirror_catalog(target).await;
        }
        let verdict = self.settle_target(id, target, &agent, &result, &seen).await;
        TargetRan {
            agent: result,
            verdict,
        }
    }

    /// Records how a target's run ended; `Err` when it did not succeed, saying at which
    /// step and why.
    async fn settle_target(
        &self,
        id: Uuid,
        target: &str,
        agent: &str,
        result: &Result<TargetDeployed, ApiError>,
        seen: &Seen,
    ) -> Result<(), ApiError> {
        match result {
            Ok(deployed) if deployed.outcome.state == Step::Succeeded => {
                let outcome = serde_json::to_value(&deployed.outcome).unwrap_or_default();
                self.finish_target(
                    id,
                    target,
                    TargetState::Succeeded,
                    &format!(
                        "{} migration(s) applied; every step passed",
                        deployed.outcome.applied.len()
                    ),
                    &outcome,
                )
                .await
            }
            Ok(deployed) => {
                let o = &deployed.outcome;
                let step = o.failed_step.unwrap_or(Step::Failed);
                // `on_failure = rollback`: the agent's rollback controller acted on the
                // failure; its reason already ends with how the rollback went.
                let then = match o.state {
                    Step::RolledBack => " (rolled back by its agent)",
                    Step::Escalated => " (its agent's rollback escalated: a person must decide)",
                    _ => "",
                };
                let message = format!(
                    "failed at {step}{then}: {}",
                    o.reason.as_deref().unwrap_or("no reason given")
                );
                let outcome = serde_json::to_value(o).unwrap_or_default();
                self.finish_target(id, target, TargetState::Failed, &message, &outcome)
                    .await?;
                Err(ApiError::new(
                    deployed.kind.unwrap_or(ErrorKind::Refused),
                    message,
                ))
            }
            Err(e) if e.kind == ErrorKind::AgentUnreachable => {
                // The stream broke (the agent died, or stopped answering keepalive pings):
                // where the run got to is what the agent's record beside the target says,
                // asked once it is reachable again.
                let step = seen.step.unwrap_or(Step::Planned);
                let message = format!(
                    "agent {agent} lost during {step}: {}; reconciled from its record when it is back",
                    e.message
                );
                self.set_target(id, target, TargetState::Unknown, &message)
                    .await?;
                Err(ApiError::new(e.kind, message))
            }
            Err(e) => {
                // Refused before the pipeline ran (an unknown target, a watch window
                // without probes), or its record could not be kept on the target.
                let step = seen.step.unwrap_or(Step::Planned);
                let message = format!("failed at {step}: {}", e.message);
                let outcome = serde_json::json!({
                    "state": Step::Failed,
                    "failed_step": step,
                    "reason": e.message,
                    "evidence": { "error": e.message, "kind": e.kind },
                });
                self.finish_target(id, target, TargetState::Failed, &message, &outcome)
                    .await?;
                Err(ApiError::new(e.kind, message))
            }
        }
    }

    /// Stores one pipeline event of `target`: executor events under their own kind, as
    /// fleet deployments always stored them (`succeeded`, `backup_taken`, …), the others
    /// under the pipeline's (`transition`, `check`, `probe`, `rollback_step`, …); the payload
    /// carries the step and the agent's own sequence number beside the event's details.
    pub(crate) async fn record_target_event(
        &self,
        id: Uuid,
        target: &str,
        e: DeployEvent,
    ) -> Result<(), ApiError> {
        self.record_target_events(id, target, vec![e]).await
    }

    /// [`Fleet::record_target_event`] for events that arrived together, in order, stored
    /// in one transaction.
    pub(crate) async fn record_target_events(
        &self,
        id: Uuid,
        target: &str,
        events: Vec<DeployEvent>,
    ) -> Result<(), ApiError> {
        let rows: Vec<(NewEvent, Option<DeploymentState>)> = events
            .into_iter()
            .map(|e| target_event(id, target, e))
            .collect();
        self.store
            .append_target_events(&rows)
            .await
            .map_err(store_err)?;
        self.notify();
        Ok(())
    }

    /// The last wave entered its watch window: so does the deployment (once; the other
    /// targets of the wave find it there).
    async fn deployment_watching(&self, id: Uuid) {
        match self
            .store
            .transition(
                id,
                DeploymentState::Watching,
                "the last wave is watching its probes",
            )
            .await
        {
            Ok(()) => self.notify(),
            Err(belay_store::StoreError::BadTransition { .. }) => {}
            Err(e) => {
                tracing::warn!(deployment = %id, error = %e, "cannot record the watching state")
            }
        }
    }

    async fn finish_target(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        message: &str,
        outcome: &serde_json::Value,
    ) -> Result<(), ApiError> {
        self.store
            .finish_target(id, target, state, message, outcome)
            .await
            .map_err(store_err)?;
        self.notify();
        Ok(())
    }
}

/// How one target's run through its agent went.
pub(crate) struct TargetRan {
    /// The agent's own answer: the outcome and record, or why it could not run.
    pub agent: Result<TargetDeployed, ApiError>,
    /// The controller's verdict, as recorded: `Err` when the target did not succeed,
    /// saying at which step and why (or when the store could not record it).
    pub verdict: Result<(), ApiError>,
}

/// What the controller learns of a target's run from its events.
#[derive(Debug, Default)]
struct Seen {
    step: Option<Step>,
    took_backup: bool,
}

impl Seen {
    fn note(&mut self, e: &DeployEvent) {
        if e.kind == KIND_TRANSITION {
            self.step = Some(e.step);
        }
        self.took_backup |= e.kind == KIND_MIGRATION
            && e.payload.get("event").and_then(|v| v.as_str()) == Some("backup_taken");
    }
}

/// The trigger of a whole-deployment rollback: `target`'s failure (kind from its cause,
/// as the agent's own rollback had it), its evidence kept under the failed target's name.
fn failure_trigger(id: Uuid, target: &str, deployed: &TargetDeployed) -> Trigger {
    let o = &deployed.outcome;
    let step = o.failed_step.unwrap_or(Step::Failed);
    let reason = o.reason.clone().unwrap_or_else(|| "no reason given".into());
    let mut trigger = Trigger::from_failure(&StepFailure {
        step,
        kind: deployed.kind.unwrap_or(ErrorKind::Refused),
        cause: deployed.cause.unwrap_or(Cause::Error),
        reason: reason.clone(),
        evidence: o.evidence.clone(),
    });
    trigger.reason = format!(
        "fleet deployment {id}: target {target} failed at {step} ({reason}); rollback_scope = deployment rolls back every target the deployment changed"
    );
    trigger.evidence = serde_json::json!({
        "deployment": id,
        "failed_target": target,
        "failed_step": step,
        "evidence": o.evidence,
    });
    trigger
}

/// How many events that arrived together one store transaction records at most.
const EVENT_BURST: usize = 64;

/// One pipeline event of `target` as the store keeps it, with the step it moves the
/// target to (a transition).
fn target_event(id: Uuid, target: &str, e: DeployEvent) -> (NewEvent, Option<DeploymentState>) {
    let kind = if e.kind == KIND_MIGRATION {
        e.payload
            .get("event")
            .and_then(|v| v.as_str())
            .unwrap_or("migration")
            .to_string()
    } else {
        e.kind.clone()
    };
    let mut payload = match e.payload {
        serde_json::Value::Object(o) => o,
        serde_json::Value::Null => serde_json::Map::new(),
        other => {
            let mut o = serde_json::Map::new();
            o.insert("value".into(), other);
            o
        }
    };
    // A rollback step's record names its own step (`undo`, `verify_probes`): kept as
    // `rollback_step`, since `step` is the pipeline's here.
    if e.kind == belay_rollback::KIND_ROLLBACK_STEP
        && let Some(own) = payload.remove("step")
    {
        payload.insert("rollback_step".into(), own);
    }
    payload.insert("step".into(), serde_json::json!(e.step.as_str()));
    payload.insert("target_seq".into(), serde_json::json!(e.seq));
    let step = (e.kind == KIND_TRANSITION)
        .then(|| state_of(e.step))
        .flatten();
    (
        NewEvent {
            deployment_id: id,
            target: Some(target.to_string()),
            kind,
            message: e.message,
            payload: serde_json::Value::Object(payload),
        },
        step,
    )
}

/// The store's name for a pipeline step (the same vocabulary).
fn state_of(step: Step) -> Option<DeploymentState> {
    step.as_str().parse().ok()
}
