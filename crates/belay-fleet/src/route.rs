//! The controller's `DeployService`: one target's deployment routed to the agent owning
//! the target, so one target's deployment run through the controller (what remote
//! `belay migrate` is to use) runs the agent's pipeline beside the database and is
//! recorded in the target's own deployment log. The controller records nothing of
//! it in its store: a fleet deployment is `ControllerService.Deploy`; this is one target's.

use crate::Fleet;
use belay_core::ApiError;
use belay_deploy::{DeploySink, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun};
use belay_rpc::DeployClient;
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
