//! The controller's `DeployService`: one target's deployment (remote `belay migrate`)
//! routed to the agent owning the target, which runs the pipeline beside the database and
//! records it in the target's own deployment log. The controller records it too, as a
//! one-target deployment in its store (the same target runs, events and outcome as a
//! fleet deployment's target), so `belay deployments list|show|watch` show remote
//! migrates beside fleet deploys, and a caller that goes away does not cut the record
//! short.

use crate::{Fleet, store_err};
use belay_core::{ApiError, ErrorKind};
use belay_deploy::{DeploySink, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun};
use belay_rpc::DeployClient;
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
