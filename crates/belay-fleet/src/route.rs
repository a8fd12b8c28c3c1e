//! The controller's `DeployService`: one target's deployment routed to the agent owning
//! the target, so one target's deployment run through the controller (what remote
//! `belay migrate` is to use) runs the agent's pipeline beside the database and is
//! recorded in the target's own deployment log. The controller records nothing of
//! it in its store: a fleet deployment is `ControllerService.Deploy`; this is one target's.
//!
//! The controller's `RollbackService` likewise: each call goes to the agent owning the
//! target, which plans and runs the rollback beside the database over its deployment log;
//! a rollback of a fleet deployment this controller ran is also stored with it (the
//! target's events and step).

use crate::Fleet;
use belay_core::ApiError;
use belay_deploy::{
    DeployEvent, DeploySink, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun,
};
use belay_rollback::{
    Execute, Outcome, RollbackApi, RollbackPlan, RollbackStatus, RollbackTo, Rollbackable, Trigger,
};
use belay_rpc::{DeployClient, RollbackClient};
use uuid::Uuid;

#[async_trait::async_trait]
impl TargetDeployApi for Fleet {
    async fn deploy_target(
        &self,
        request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError> {
        let (conn, _) = self.connection_for(&request.target).await?;
        DeployClient::new(&conn).deploy_target(request, sink).await
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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DeployEvent>();
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
            let _ = tx.send(e.clone());
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
