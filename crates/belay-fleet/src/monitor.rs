//! The controller's lock monitor and health checker: every call routed to the agent
//! owning the target, as migration calls are. The controller never connects to a target
//! database itself, and counts nothing it relays: the agent counts where things happen.

use crate::Fleet;
use belay_core::ApiError;
use belay_health::{
    CheckResult, HealthApi, PostflightSpec, PreflightOptions, ProbeEvents, TargetProbe,
};
use belay_locks::{LockMonitorApi, LockSnapshot, MonitorOptions, SnapshotStream};
use belay_rpc::{HealthClient, LockMonitorClient};
use std::time::Duration;

#[async_trait::async_trait]
impl LockMonitorApi for Fleet {
    async fn snapshot(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<LockSnapshot, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        LockMonitorClient::new(&conn)
            .snapshot(target, options)
            .await
    }

    async fn watch(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<SnapshotStream, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        LockMonitorClient::new(&conn).watch(target, options).await
    }
}

#[async_trait::async_trait]
impl HealthApi for Fleet {
    async fn preflight(
        &self,
        target: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        HealthClient::new(&conn).preflight(target, options).await
    }

    async fn postflight(
        &self,
        target: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        HealthClient::new(&conn).postflight(target, spec).await
    }

    async fn probe(
        &self,
        target: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        // The agent running the probe counts it; relaying it is not another attempt.
        HealthClient::new(&conn)
            .probe(target, probe, duration)
            .await
    }
}
