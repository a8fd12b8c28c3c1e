//! Fleet deployments: resolve targets, check the promotion gate and agent liveness before
//! anything runs, then migrate in waves and halt on the first failing wave.

use crate::waves::{self, Batch};
use crate::{Fleet, store_err};
use belay_migrate::{ApiError, ApplyOptions, ErrorKind, Event, EventSink, MigrationApi, Target};
use belay_store::{DeploymentState, NewDeployment, NewEvent, TargetState};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
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
            .transition(id, DeploymentState::Migrating, "migrating")
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
            let mut tasks = tokio::task::JoinSet::new();
            for t in names {
                let (fleet, t, sem, to) = (
                    self.clone(),
                    t.clone(),
                    sem.clone(),
                    spec.to_version.clone(),
                );
                tasks.spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    let outcome = fleet.migrate_target(id, &t, to).await;
                    (t, outcome)
                });
            }
            let mut failures = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((t, Ok(()))) => info!(target = %t, "target migrated"),
                    Ok((t, Err(e))) => failures.push(format!("{t}: {}", e.message)),
                    Err(e) => failures.push(format!("a target task panicked: {e}")),
                }
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
                    "halted after wave {}/{}: {}{}",
                    n + 1,
                    plan.len(),
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
                metrics::counter!(belay_telemetry::names::DEPLOYMENTS_TOTAL, "status" => "failed")
                    .increment(1);
                self.notify();
                return Ok(());
            }
        }
        self.store
            .transition(
                id,
                DeploymentState::Succeeded,
                &format!("{} target(s) migrated", targets.len()),
            )
            .await
            .map_err(store_err)?;
        metrics::counter!(belay_telemetry::names::DEPLOYMENTS_TOTAL, "status" => "succeeded")
            .increment(1);
        self.notify();
        Ok(())
    }

    /// Migrates one target through its agent, storing every event as it arrives.
    async fn migrate_target(
        &self,
        id: Uuid,
        target: &str,
        to: Option<String>,
    ) -> Result<(), ApiError> {
        self.set_target(id, target, TargetState::Running, "migrating")
            .await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let sink: EventSink = Arc::new(move |e| {
            let _ = tx.send(e.clone());
        });
        let recorder = {
            let (fleet, target) = (self.clone(), target.to_string());
            tokio::spawn(async move {
                let mut took_backup = false;
                while let Some(e) = rx.recv().await {
                    took_backup |= matches!(e.kind, belay_migrate::EventKind::BackupTaken { .. });
                    let kind = serde_json::to_value(&e.kind).unwrap_or_default();
                    let name = kind
                        .get("event")
                        .and_then(|v| v.as_str())
                        .unwrap_or("event")
                        .to_string();
                    let _ = fleet
                        .record(NewEvent {
                            deployment_id: id,
                            target: Some(target.clone()),
                            kind: name,
                            message: e.kind.describe().unwrap_or_default(),
                            payload: kind,
                        })
                        .await;
                }
                took_backup
            })
        };
        let result = match self.client_for(target).await {
            Ok((client, _)) => {
                client
                    .apply(
                        target,
                        &Target { to, steps: None },
                        &ApplyOptions::deployment(id),
                        sink,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        // The sink is gone with the call: the recorder drains what is left, then ends,
        // so the target's final state comes after all of its events.
        let took_backup = recorder.await.unwrap_or(false);
        if took_backup {
            // The mirror learns at once which backup precedes this deployment.
            self.mirror_catalog(target).await;
        }
        match &result {
            Ok(r) => {
                self.set_target(
                    id,
                    target,
                    TargetState::Succeeded,
                    &format!("{} migration(s) applied", r.results.len()),
                )
                .await?
            }
            Err(e) if e.kind == ErrorKind::AgentUnreachable => {
                self.set_target(
                    id,
                    target,
                    TargetState::Unknown,
                    &format!("{}; reconciled when the agent reports again", e.message),
                )
                .await?
            }
            Err(e) => {
                self.set_target(id, target, TargetState::Failed, &e.message)
                    .await?
            }
        }
        result.map(|_| ())
    }
}
