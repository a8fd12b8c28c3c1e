//! Registration and heartbeats: the controller learns which targets this agent owns, and
//! that it is alive.

use belay_proto::v1 as pb;
use belay_rpc::Connection;
use pb::controller_service_client::ControllerServiceClient;
use std::time::Duration;
use tracing::{info, warn};

/// Registers, then heartbeats at the interval the controller asks for; registers again
/// whenever the controller has forgotten us (a fresh store) or stops answering. Never
/// returns: it runs until the process stops.
pub async fn run(conn: Connection, request: pb::RegisterAgentRequest) {
    let mut client = ControllerServiceClient::new(conn.intercepted());
    let mut failures = 0u32;
    loop {
        let interval = match client.register_agent(request.clone()).await {
            Ok(r) => {
                failures = 0;
                info!(controller = %conn.peer, targets = request.targets.len(), "registered with the controller");
                Duration::from_millis(u64::from(r.get_ref().heartbeat_interval_ms.max(100)))
            }
            Err(status) => {
                failures += 1;
                // Log the first failure and then every tenth, not every second.
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(controller = %conn.peer, error = %status.message(), "cannot register with the controller; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut missed = 0u32;
        loop {
            tokio::time::sleep(interval).await;
            match client
                .heartbeat(pb::HeartbeatRequest {
                    name: request.name.clone(),
                })
                .await
            {
                Ok(r) if r.get_ref().known => missed = 0,
                Ok(_) => {
                    info!("the controller does not know this agent; registering again");
                    break;
                }
                Err(status) => {
                    missed += 1;
                    warn!(error = %status.message(), missed, "heartbeat failed");
                    if missed >= 3 {
                        break;
                    }
                }
            }
        }
    }
}
