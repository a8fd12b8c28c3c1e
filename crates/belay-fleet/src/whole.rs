//! Rolling back a whole fleet deployment: every target it changed and that is still
//! deployed, each through its owning agent's `RollbackService` (the same call as an
//! operator's `--target T rollback execute`, so each rollback is planned, run, verified and
//! reported beside its database), in reverse wave order with the deployment's bounded
//! concurrency. Two ways in: `deploy --rollback-scope deployment`, once the failed wave's
//! targets have ended (their agents rolled them back per their policy), and an operator's
//! `rollback execute <fleet deployment>` without `--target`.

use crate::{Fleet, store_err};
use belay_core::{ApiError, ErrorKind};
use belay_deploy::{DeploySink, Step};
use belay_rollback::{Execute, RollbackApi, RollbackPlan, RollbackTo, Trigger};
use belay_store::{DeploymentRecord, DeploymentState, NewEvent, TargetState, TargetStatus};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tracing::{Instrument, info_span};
use uuid::Uuid;

/// What a failed target of a fleet deployment leads to beyond its own agent's rollback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackScope {
    /// Only the failed targets, each by its agent: earlier waves stay deployed.
    #[default]
    Wave,
    /// Then every other target the deployment changed, by the controller.
    Deployment,
}

impl RollbackScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackScope::Wave => "wave",
            RollbackScope::Deployment => "deployment",
        }
    }
}

/// What rolling back a whole deployment would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentRollbackPlan {
    pub deployment: Uuid,
    /// One per target to roll back, in the order they run.
    pub plans: Vec<RollbackPlan>,
    /// The deployment's other targets, each `target: why it is left out`.
    pub left_out: Vec<String>,
}

/// The targets of a deployment to roll back, in waves in the order they run (the
/// deployment's last wave first), and the others with why they are left out.
#[derive(Debug, Default, PartialEq)]
struct Selection {
    waves: Vec<Vec<String>>,
    left_out: Vec<String>,
}

/// Whether a target's run changed its database and is still in place: it succeeded, or
/// it failed after committing migrations and nothing rolled it back.
fn still_deployed(t: &TargetStatus) -> Result<(), String> {
    match t.step {
        Some(DeploymentState::RolledBack) => return Err("already rolled back".into()),
        Some(DeploymentState::Escalated) => {
            return Err(format!(
                "its rollback escalated: a person decides (`belay --target {} rollback status`)",
                t.target
            ));
        }
        Some(DeploymentState::RollingBack) => return Err("being rolled back".into()),
        _ => {}
    }
    match t.state {
        TargetState::Succeeded => Ok(()),
        TargetState::Failed => {
            let applied = t
                .outcome
                .get("applied")
                .and_then(|a| a.as_array())
                .is_some_and(|a| !a.is_empty());
            if applied {
                Ok(())
            } else {
                Err("failed before any migration committed: nothing to roll back".into())
            }
        }
        TargetState::Unknown => Err(
            "its state is unknown (its agent was lost): reconcile it first, then roll it back with --target"
                .into(),
        ),
        TargetState::Skipped | TargetState::Pending => Err("never ran".into()),
        TargetState::Running => Err("still running".into()),
    }
}

/// Whether a target's run left its database as it was: it never ran, or it failed before
/// any migration committed.
fn changed_nothing(t: &TargetStatus) -> bool {
    match t.state {
        TargetState::Skipped | TargetState::Pending => true,
        TargetState::Failed => t
            .outcome
            .get("applied")
            .and_then(|a| a.as_array())
            .is_none_or(|a| a.is_empty()),
        _ => false,
    }
}

/// The deployment's waves as it recorded them (`params.waves`), else one wave per target
/// in deployment order.
fn recorded_waves(d: &DeploymentRecord) -> Vec<Vec<String>> {
    let recorded: Option<Vec<Vec<String>>> = d
        .params
        .get("waves")
        .and_then(|w| serde_json::from_value(w.clone()).ok());
    recorded.unwrap_or_else(|| d.targets.iter().map(|t| vec![t.target.clone()]).collect())
}

/// Of `d`'s targets, those `keep` picks, in reverse wave order; each other one with why.
fn select(d: &DeploymentRecord, keep: impl Fn(&TargetStatus) -> Result<(), String>) -> Selection {
    let mut sel = Selection::default();
    let waves = recorded_waves(d);
    for t in &d.targets {
        if let Err(why) = keep(t) {
            sel.left_out.push(format!("{}: {why}", t.target));
        }
    }
    for wave in waves.iter().rev() {
        let chosen: Vec<String> = wave
            .iter()
            .filter(|name| {
                d.targets
                    .iter()
                    .find(|t| &t.target == *name)
                    .is_some_and(|t| keep(t).is_ok())
            })
            .cloned()
            .collect();
        if !chosen.is_empty() {
            sel.waves.push(chosen);
        }
    }
    sel
}

fn refused(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Refused, msg)
}

impl Fleet {
    /// A fleet deployment of this controller that an operator may roll back as a whole,
    /// and the targets that would be; refused naming why otherwise.
    async fn rollbackable_deployment(
        &self,
        id: Uuid,
    ) -> Result<(DeploymentRecord, Selection), ApiError> {
        let Some(d) = self.store.deployment(id).await.map_err(store_err)? else {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "no deployment {id} on this controller: `belay deployments list` shows its deployments"
                ),
            ));
        };
        if d.params.get("kind").and_then(|k| k.as_str()) == Some("migrate") {
            let target = d.targets.first().map_or("?", |t| t.target.as_str());
            return Err(refused(format!(
                "deployment {id} is a one-target `migrate` of {target}, not a fleet deployment: roll it back with --target {target}"
            )));
        }
        if self.is_active(id) || !d.state.is_finished() {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "fleet deployment {id} is {} now: wait until it ends",
                    d.state
                ),
            ));
        }
        match d.state {
            DeploymentState::RolledBack => {
                return Err(refused(format!(
                    "fleet deployment {id} is rolled back already"
                )));
            }
            DeploymentState::Escalated => {
                return Err(refused(format!(
                    "fleet deployment {id} escalated: a person decides; roll back what is left one target at a time with --target (see `belay deployments show {id}`)"
                )));
            }
            _ => {}
        }
        let sel = select(&d, still_deployed);
        if sel.waves.is_empty() {
            return Err(refused(format!(
                "no target of fleet deployment {id} is still deployed ({})",
                sel.left_out.join("; ")
            )));
        }
        Ok((d, sel))
    }

    /// What rolling back fleet deployment `id` would do: each still-deployed target's plan,
    /// asked of its agent, in the order they would run.
    pub async fn plan_deployment_rollback(
        &self,
        id: Uuid,
        trigger: Trigger,
    ) -> Result<DeploymentRollbackPlan, ApiError> {
        let (_, sel) = self.rollbackable_deployment(id).await?;
        let mut plans = Vec::new();
        for t in sel.waves.iter().flatten() {
            let plan = RollbackApi::plan(
                self,
                t,
                &RollbackTo::Deployment(id.to_string()),
                trigger.clone(),
            )
            .await
            .map_err(|e| ApiError::new(e.kind, format!("{t}: {}", e.message)))?;
            plans.push(plan);
        }
        Ok(DeploymentRollbackPlan {
            deployment: id,
            plans,
            left_out: sel.left_out,
        })
    }

    /// An operator's rollback of fleet deployment `id`: checked, moved to `rolling_back`,
    /// then run in the background (watch the deployment to follow it).
    pub async fn start_deployment_rollback(
        &self,
        id: Uuid,
        trigger: Trigger,
    ) -> Result<(), ApiError> {
        let (d, sel) = self.rollbackable_deployment(id).await?;
        if let Ok(mut a) = self.active.lock()
            && !a.insert(id)
        {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("fleet deployment {id} is being rolled back now"),
            ));
        }
        let parallel = d
            .params
            .get("parallel")
            .and_then(|p| p.as_u64())
            .map_or(4, |p| p.max(1) as usize);
        let fleet = self.clone();
        let started = self
            .store
            .transition(
                id,
                DeploymentState::RollingBack,
                &format!(
                    "an operator rolls the whole deployment back ({}): {}",
                    trigger.reason,
                    sel.waves
                        .iter()
                        .flatten()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .await
            .map_err(store_err);
        if let Err(e) = started {
            if let Ok(mut a) = self.active.lock() {
                a.remove(&id);
            }
            return Err(e);
        }
        self.notify();
        tokio::spawn(
            async move {
                if let Err(e) = fleet.roll_back_targets(id, sel, trigger, parallel).await {
                    tracing::error!(deployment = %id, error = %e, "the deployment's rollback stopped on a controller error");
                    let _ = fleet.store.transition(id, DeploymentState::Escalated, &e.to_string()).await;
                }
                if let Ok(mut a) = fleet.active.lock() {
                    a.remove(&id);
                }
                fleet.notify();
            }
            .instrument(info_span!("deployment_rollback", id = %id)),
        );
        Ok(())
    }

    /// `rollback_scope = deployment`: fleet deployment `id` failed (it is `failed` on
    /// record) and its failed wave's targets have ended; every target it changed that is
    /// still deployed is rolled back, the failed targets' own rollbacks having been their
    /// agents'.
    pub(crate) async fn roll_back_failed_deployment(
        &self,
        id: Uuid,
        trigger: Trigger,
        parallel: usize,
    ) -> Result<(), ApiError> {
        let d = self
            .store
            .deployment(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("deployment {id} vanished from the store"),
                )
            })?;
        // The failed targets were their agents' to roll back (per each target's policy);
        // the controller takes the ones that succeeded.
        let sel = select(&d, |t| match t.state {
            TargetState::Succeeded => still_deployed(t),
            _ => Err("not a target that succeeded".into()),
        });
        let names: Vec<String> = sel.waves.iter().flatten().cloned().collect();
        self.store
            .transition(
                id,
                DeploymentState::RollingBack,
                &format!(
                    "rollback_scope = deployment: {}",
                    if names.is_empty() {
                        "no target that succeeded is left to roll back".to_string()
                    } else {
                        format!(
                            "rolling back the targets that succeeded, last wave first: {}",
                            names.join(", ")
                        )
                    }
                ),
            )
            .await
            .map_err(store_err)?;
        self.notify();
        self.roll_back_targets(id, sel, trigger, parallel).await
    }

    /// Rolls back `sel`'s targets wave by wave (at most `parallel` at once), each through
    /// its agent, each rollback's events stored with the target as they stream; then ends
    /// the deployment `rolled_back` when every target it ran is rolled back, else
    /// `escalated` naming the others.
    async fn roll_back_targets(
        &self,
        id: Uuid,
        sel: Selection,
        trigger: Trigger,
        parallel: usize,
    ) -> Result<(), ApiError> {
        let sem = Arc::new(Semaphore::new(parallel.max(1)));
        let mut problems: Vec<String> = Vec::new();
        let n_waves = sel.waves.len();
        for (n, wave) in sel.waves.iter().enumerate() {
            self.record(NewEvent {
                deployment_id: id,
                target: None,
                kind: "rollback_wave".into(),
                message: format!("rolling back {}/{}: {}", n + 1, n_waves, wave.join(", ")),
                payload: serde_json::json!({ "wave": n + 1, "targets": wave }),
            })
            .await?;
            let mut tasks = tokio::task::JoinSet::new();
            for t in wave {
                let (fleet, t, sem, trigger) =
                    (self.clone(), t.clone(), sem.clone(), trigger.clone());
                tasks.spawn(
                    async move {
                        let _permit = sem.acquire_owned().await;
                        // The events reach the store through the routed call's recorder.
                        let sink: DeploySink = Arc::new(|_| {});
                        let r = RollbackApi::execute(
                            &fleet,
                            &t,
                            Execute::To(RollbackTo::Deployment(id.to_string())),
                            trigger,
                            sink,
                        )
                        .instrument(info_span!("rollback_target", target = %t))
                        .await;
                        (t, r)
                    }
                    .in_current_span(),
                );
            }
            while let Some(joined) = tasks.join_next().await {
                let (t, r) = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        problems.push(format!("a rollback task panicked: {e}"));
                        continue;
                    }
                };
                match r {
                    Ok(o) if o.state == Step::RolledBack => {
                        tracing::info!(target = %t, "target rolled back");
                    }
                    Ok(o) => problems.push(format!(
                        "{t}: its rollback ended {} ({})",
                        o.state,
                        o.report.errors.join("; ")
                    )),
                    Err(e) => {
                        // Nothing ran on the target: its step stays; say why beside it.
                        let message =
                            format!("the controller could not roll it back: {}", e.message);
                        self.record(NewEvent {
                            deployment_id: id,
                            target: Some(t.clone()),
                            kind: "rollback_refused".into(),
                            message: message.clone(),
                            payload: serde_json::json!({ "error": e.message, "kind": e.kind }),
                        })
                        .await?;
                        problems.push(format!("{t}: {message}"));
                    }
                }
            }
        }
        // The verdict is the record's: every target that ran must be rolled back now
        // (whoever did it), or never have changed anything.
        let d = self
            .store
            .deployment(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("deployment {id} vanished from the store"),
                )
            })?;
        let mut rolled_back = Vec::new();
        for t in &d.targets {
            if t.step == Some(DeploymentState::RolledBack) {
                rolled_back.push(t.target.clone());
                continue;
            }
            if changed_nothing(t)
                || problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{}:", t.target)))
            {
                continue;
            }
            // Deployed still, escalated, or unknown (its agent lost): not rolled back.
            let why = match still_deployed(t) {
                Ok(()) => format!("still deployed ({})", t.message),
                Err(why) => why,
            };
            problems.push(format!("{}: {why}", t.target));
        }
        let (state, message) = if problems.is_empty() {
            (
                DeploymentState::RolledBack,
                format!(
                    "the whole deployment is rolled back: {}",
                    if rolled_back.is_empty() {
                        "no target had changed".to_string()
                    } else {
                        rolled_back.join(", ")
                    }
                ),
            )
        } else {
            (
                DeploymentState::Escalated,
                format!(
                    "not every target is rolled back: a person must decide. {}{}",
                    problems.join("; "),
                    if rolled_back.is_empty() {
                        String::new()
                    } else {
                        format!("; rolled back: {}", rolled_back.join(", "))
                    }
                ),
            )
        };
        self.store
            .transition(id, state, &message)
            .await
            .map_err(store_err)?;
        self.notify();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn target(
        name: &str,
        state: TargetState,
        step: Option<DeploymentState>,
        applied: usize,
    ) -> TargetStatus {
        TargetStatus {
            target: name.into(),
            state,
            message: String::new(),
            updated_at: Utc::now(),
            step,
            outcome: serde_json::json!({ "applied": vec![serde_json::json!({}); applied] }),
        }
    }

    fn deployment(targets: Vec<TargetStatus>, waves: serde_json::Value) -> DeploymentRecord {
        DeploymentRecord {
            id: Uuid::nil(),
            state: DeploymentState::Failed,
            to_version: None,
            environment: None,
            params: serde_json::json!({ "waves": waves }),
            skip_promotion_reason: None,
            requested_by: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            finished_at: None,
            last_seq: 0,
            targets,
        }
    }

    #[test]
    fn the_still_deployed_targets_go_last_wave_first() {
        use DeploymentState as D;
        let d = deployment(
            vec![
                target("a", TargetState::Succeeded, Some(D::Succeeded), 1),
                target("b", TargetState::Succeeded, Some(D::Succeeded), 1),
                target("c", TargetState::Succeeded, Some(D::RolledBack), 1),
                target("d", TargetState::Failed, Some(D::Failed), 1),
                target("e", TargetState::Failed, Some(D::Failed), 0),
                target("f", TargetState::Skipped, None, 0),
            ],
            serde_json::json!([["a"], ["b", "c"], ["d", "e"], ["f"]]),
        );
        let sel = select(&d, still_deployed);
        assert_eq!(
            sel.waves,
            vec![vec!["d".to_string()], vec!["b".into()], vec!["a".into()]]
        );
        let unchanged: Vec<&str> = d
            .targets
            .iter()
            .filter(|t| changed_nothing(t))
            .map(|t| t.target.as_str())
            .collect();
        assert_eq!(unchanged, ["e", "f"]);
        assert_eq!(sel.left_out.len(), 3, "{:?}", sel.left_out);
        assert!(
            sel.left_out[0].starts_with("c: already rolled back"),
            "{:?}",
            sel.left_out
        );
        assert!(
            sel.left_out[1].starts_with("e: failed before"),
            "{:?}",
            sel.left_out
        );
        assert!(
            sel.left_out[2].starts_with("f: never ran"),
            "{:?}",
            sel.left_out
        );
        // Without recorded waves: one target at a time, in reverse deployment order.
        let d = deployment(d.targets.clone(), serde_json::Value::Null);
        let sel = select(&d, still_deployed);
        assert_eq!(
            sel.waves,
            vec![vec!["d".to_string()], vec!["b".into()], vec!["a".into()]]
        );
    }
}
