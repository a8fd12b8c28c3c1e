//! The controller's `DeployService`: one target's deployment (remote `belay migrate`)
//! routed to the agent owning the target, which runs the pipeline beside the database and
//! records it in the target's own deployment log. The controller records it too, as a
//! one-target deployment in its store (the same target runs, events and outcome as a
//! fleet deployment's target), so `belay deployments list|show|watch` show remote
//! migrates beside fleet deploys, and a caller that goes away does not cut the record
//! short.
//!
//! The controller's `RollbackService` likewise: each call goes to the agent owning the
//! target, which plans and runs the rollback beside the database over its deployment log;
//! a rollback of a deployment this controller recorded is also stored with it (the
//! target's events and step).

use crate::{Fleet, store_err};
use belay_core::{ApiError, ErrorKind};
use belay_deploy::{
    DeployEvent, DeploySink, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun,
};
use belay_rollback::{
    Execute, Outcome, RollbackApi, RollbackPlan, RollbackStatus, RollbackTo, Rollbackable, Trigger,
};
use belay_rpc::{DeployClient, RollbackClient};
use belay_store::{DeploymentState, NewDeployment};
use tracing::{Instrument, info_span};
use uuid::Uuid;

#[async_trait::async_trait]
impl TargetDeployApi for Fleet {
    async fn deploy_target(
        &self,
        mut request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError> {
        // Refused before anything is recorded: an unknown target, an agent known down.
        self.connection_for(&request.target).await?;
        let registered = self
            .store
            .target(&request.target)
            .await
            .map_err(store_err)?;
        // The caller does not know the target's environment; the registry does.
        if request.environment.is_none() {
            request.environment = registered.and_then(|t| t.environment);
        }
        let id = request.id;
        self.store
            .create_deployment(&NewDeployment {
                id,
                to_version: request.forward.to.clone(),
                targets: vec![request.target.clone()],
                environment: request.environment.clone(),
                params: serde_json::json!({
                    "kind": "migrate",
                    "release": request.release,
                    "steps": request.forward.steps,
                    "policy": request.asked,
                }),
                skip_promotion_reason: None,
                requested_by: request.requested_by.clone(),
            })
            .await
            .map_err(|e| match e {
                // The caller chose the id: one already on record is the caller's mistake.
                e @ belay_store::StoreError::DeploymentExists(_) => {
                    ApiError::new(ErrorKind::InvalidArgument, e.to_string())
                }
                e => store_err(e),
            })?;
        self.notify();
        if let Ok(mut a) = self.active.lock() {
            a.insert(id);
        }
        let target = request.target.clone();
        let ran = async {
            self.store
                .transition(
                    id,
                    DeploymentState::Migrating,
                    "running the target's pipeline on its agent",
                )
                .await
                .map_err(store_err)?;
            self.notify();
            let ran = self.run_target(request, true, Some(sink)).await;
            let (state, message) = match &ran.verdict {
                Ok(()) => (
                    DeploymentState::Succeeded,
                    format!("{target}: every step passed"),
                ),
                Err(e) => (DeploymentState::Failed, e.message.clone()),
            };
            self.store
                .transition(id, state, &message)
                .await
                .map_err(store_err)?;
            Ok::<_, ApiError>(ran.agent)
        }
        .instrument(info_span!("deployment", id = %id))
        .await;
        if let Ok(mut a) = self.active.lock() {
            a.remove(&id);
        }
        self.notify();
        match ran {
            Ok(agent) => agent,
            Err(e) => {
                // The store failed around the run: say so on record where it still can.
                let _ = self
                    .store
                    .transition(id, DeploymentState::Failed, &e.message)
                    .await;
                Err(e)
            }
        }
    }

    async fn deployment(&self, target: &str, id: Uuid) -> Result<TargetRun, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        DeployClient::new(&conn).deployment(target, id).await
    }
}

#[async_trait::async_trait]
impl RollbackApi for Fleet {
    async fn list(&self, target: &str, limit: usize) -> Result<Vec<Rollbackable>, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        RollbackClient::new(&conn).list(target, limit).await
    }

    async fn plan(
        &self,
        target: &str,
        to: &RollbackTo,
        trigger: Trigger,
    ) -> Result<RollbackPlan, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        RollbackClient::new(&conn).plan(target, to, trigger).await
    }

    async fn execute(
        &self,
        target: &str,
        what: Execute,
        trigger: Trigger,
        sink: DeploySink,
    ) -> Result<Outcome, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        // A deployment this controller ran (a fleet deployment) gets the rollback's events
        // in its record too, as they stream: `deployments show` then tells the target's
        // step (`rolled_back`, `escalated`) and every rollback step.
        // Bounded, as the deploy path's recorder: a slow store slows the stream.
        let (tx, rx) = belay_rpc::stream::channel::<DeployEvent>(belay_rpc::stream::CAPACITY);
        let mut rx = rx.into_inner();
        let recorder = {
            let (fleet, target) = (self.clone(), target.to_string());
            tokio::spawn(async move {
                let mut ours: std::collections::HashMap<Uuid, bool> = Default::default();
                while let Some(e) = rx.recv().await {
                    let id = e.deployment_id;
                    if let std::collections::hash_map::Entry::Vacant(slot) = ours.entry(id) {
                        slot.insert(matches!(
                            fleet.store().deployment(id).await,
                            Ok(Some(d)) if d.targets.iter().any(|t| t.target == target)
                        ));
                    }
                    if ours.get(&id) == Some(&true)
                        && let Err(err) = fleet.record_target_event(id, &target, e).await
                    {
                        tracing::error!(deployment = %id, target = %target, error = %err, "a rollback event could not be stored");
                    }
                }
            })
        };
        let relay: DeploySink = std::sync::Arc::new(move |e: &DeployEvent| {
            let _ = tx.send_blocking(e.clone());
            sink(e);
        });
        let result = RollbackClient::new(&conn)
            .execute(target, what, trigger, relay)
            .await;
        // The relay went with the call: the recorder stores what is left, then ends.
        let _ = recorder.await;
        result
    }

    async fn status(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        RollbackClient::new(&conn).status(target, id).await
    }

    async fn abort(&self, target: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        RollbackClient::new(&conn).abort(target, id).await
    }
}
