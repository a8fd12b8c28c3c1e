//! The controller's lock monitor and health checker: every call routed to the agent
//! owning the target, as migration calls are. The controller never connects to a target
//! database itself; it counts the probe events it relays.

use crate::Fleet;
use belay_core::ApiError;
use belay_health::{
    CheckResult, HealthApi, PostflightSpec, PreflightOptions, ProbeEvent, ProbeEvents, TargetProbe,
    Transition,
};
use belay_locks::{LockMonitorApi, LockSnapshot, MonitorOptions, SnapshotStream};
use belay_rpc::{HealthClient, LockMonitorClient};
use belay_telemetry::names;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Counts a relayed probe event: failures, and the state machine's transitions (a
/// `triggered` one is what a rollback controller acts on).
fn record_probe(target: &str, e: &ProbeEvent) {
    if e.result.is_failure() {
        metrics::counter!(
            names::PROBE_FAILURES_TOTAL,
            "target" => target.to_string(),
            "probe" => e.probe.clone()
        )
        .increment(1);
    }
    if let Some(t) = e.transition {
        let to = match t {
            Transition::Triggered => "triggered",
            Transition::Recovered => "recovered",
        };
        metrics::counter!(
            names::PROBE_TRANSITIONS_TOTAL,
            "target" => target.to_string(),
            "probe" => e.probe.clone(),
            "to" => to
        )
        .increment(1);
    }
}

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
        let events = HealthClient::new(&conn)
            .probe(target, probe, duration)
            .await?;
        let target = target.to_string();
        Ok(Box::pin(events.map(move |e| {
            if let Ok(e) = &e {
                record_probe(&target, e);
            }
            e
        })))
    }
}
