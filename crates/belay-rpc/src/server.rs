//! Serves any `MigrationApi` as `belay.v1.MigrationService`.

use crate::InFlight;
use crate::convert::{self, target_name};
use belay_migrate::{EventSink, MigrationApi};
use belay_proto::v1 as pb;
use pb::migration_service_server::{MigrationService, MigrationServiceServer};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};
use uuid::Uuid;

/// The gRPC face of a migration capability: the agent serves its local targets through
/// it, the controller its router to agents.
#[derive(Clone)]
pub struct MigrationGrpc {
    api: Arc<dyn MigrationApi>,
    runs: InFlight,
}

impl std::fmt::Debug for MigrationGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationGrpc").finish_non_exhaustive()
    }
}

impl MigrationGrpc {
    pub fn new(api: Arc<dyn MigrationApi>) -> Self {
        MigrationGrpc {
            api,
            runs: InFlight::new(),
        }
    }

    /// The runs in flight. On shutdown a daemon closes it and waits (bounded), so a
    /// migration under way finishes and is recorded rather than cut off.
    pub fn runs(&self) -> &InFlight {
        &self.runs
    }

    pub fn into_service(self) -> MigrationServiceServer<Self> {
        MigrationServiceServer::new(self)
    }
}

fn deployment_id(s: &str) -> Result<Option<Uuid>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    convert::parse_uuid(s).map(Some).map_err(Status::from)
}

type RunStream = ReceiverStream<Result<pb::RunMessage, Status>>;

/// The migration metrics of a target, from its run's events (a no-op without an
/// installed recorder). Recorded where the executor runs ([`Metered`]), never by a server
/// passing runs on, so the controller routing a run to an agent does not count it twice.
fn record_metrics(target: &str, e: &belay_migrate::Event) {
    use belay_migrate::EventKind;
    use belay_telemetry::names;
    match &e.kind {
        EventKind::Succeeded {
            execution_ms,
            retries,
            lock_wait_ms,
            ..
        } => {
            let t = target.to_string();
            metrics::counter!(names::MIGRATIONS_TOTAL, "target" => t.clone(), "status" => "applied").increment(1);
            metrics::histogram!(names::MIGRATION_DURATION_SECONDS, "target" => t.clone())
                .record(*execution_ms as f64 / 1000.0);
            metrics::histogram!(names::MIGRATION_LOCK_WAIT_SECONDS, "target" => t.clone())
                .record(*lock_wait_ms as f64 / 1000.0);
            metrics::counter!(names::MIGRATION_RETRIES_TOTAL, "target" => t)
                .increment(u64::from(*retries));
        }
        EventKind::Failed { .. } => {
            metrics::counter!(names::MIGRATIONS_TOTAL, "target" => target.to_string(), "status" => "failed")
                .increment(1);
        }
        EventKind::LockGuardTripped { .. } => {
            metrics::counter!(names::LOCK_GUARD_TRIPS_TOTAL, "target" => target.to_string())
                .increment(1);
        }
        _ => {}
    }
}

/// A [`MigrationApi`] that records the migration metrics of every run it passes on, and
/// the problems `validate` finds: the agent wraps its executor in it, for the runs it
/// serves over `Apply` and for its deployment pipelines alike.
pub struct Metered(pub Arc<dyn MigrationApi>);

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered").finish_non_exhaustive()
    }
}

fn metered_sink(target: &str, sink: EventSink) -> EventSink {
    let target = target.to_string();
    Arc::new(move |e| {
        record_metrics(&target, e);
        sink(e);
    })
}

#[async_trait::async_trait]
impl MigrationApi for Metered {
    async fn status(
        &self,
        target: &str,
    ) -> Result<Vec<belay_migrate::MigrationStatus>, belay_migrate::ApiError> {
        self.0.status(target).await
    }

    async fn plan(
        &self,
        target: &str,
        forward: &belay_migrate::Target,
        sql: bool,
    ) -> Result<belay_migrate::PlanView, belay_migrate::ApiError> {
        self.0.plan(target, forward, sql).await
    }

    async fn apply(
        &self,
        target: &str,
        forward: &belay_migrate::Target,
        options: &belay_migrate::ApplyOptions,
        sink: EventSink,
    ) -> Result<belay_migrate::RunReport, belay_migrate::ApiError> {
        self.0
            .apply(target, forward, options, metered_sink(target, sink))
            .await
    }

    async fn undo(
        &self,
        target: &str,
        undo: &belay_migrate::UndoTarget,
        deployment_id: Option<Uuid>,
        sink: EventSink,
    ) -> Result<belay_migrate::RunReport, belay_migrate::ApiError> {
        self.0
            .undo(target, undo, deployment_id, metered_sink(target, sink))
            .await
    }

    async fn validate(
        &self,
        target: &str,
    ) -> Result<belay_migrate::Validation, belay_migrate::ApiError> {
        let validation = self.0.validate(target).await?;
        metrics::counter!(
            belay_telemetry::names::VALIDATION_ERRORS_TOTAL,
            "target" => target.to_string(),
            "kind" => "migrations"
        )
        .increment(validation.problems.len() as u64);
        Ok(validation)
    }

    async fn repair(
        &self,
        target: &str,
        scope: &belay_migrate::RepairScope,
    ) -> Result<Vec<belay_migrate::RepairAction>, belay_migrate::ApiError> {
        self.0.repair(target, scope).await
    }

    async fn baseline(
        &self,
        target: &str,
        version: &str,
        description: &str,
    ) -> Result<(), belay_migrate::ApiError> {
        self.0.baseline(target, version, description).await
    }

    // Forwarded like the rest: without it an agent's restore-based rollback (whose
    // migrations are metered) could not record the versions reverted.
    async fn record_reverted(
        &self,
        target: &str,
        versions: &[String],
        deployment_id: Uuid,
        backup_id: Option<&str>,
        note: serde_json::Value,
    ) -> Result<Vec<String>, belay_migrate::ApiError> {
        self.0
            .record_reverted(target, versions, deployment_id, backup_id, note)
            .await
    }
}

/// Runs `work` in its own task, forwarding events and the final report into a stream.
/// The task is not tied to the caller: a client that disconnects mid-run does not
/// abandon a migration half-way; it finishes and is recorded as usual.
fn run_stream<F, Fut>(runs: &InFlight, target: String, work: F) -> RunStream
where
    F: FnOnce(EventSink) -> Fut,
    Fut: std::future::Future<Output = Result<belay_migrate::RunReport, belay_migrate::ApiError>>
        + Send
        + 'static,
{
    // Bounded: a client reading slowly slows the run down instead of piling its events
    // up in memory; a client that went away stops nothing (sends just fail).
    let (tx, rx) = crate::stream::channel(crate::stream::CAPACITY);
    let events = tx.clone();
    let event_target = target.clone();
    let sink: EventSink = Arc::new(move |e| {
        let msg = pb::RunMessage {
            message: Some(pb::run_message::Message::Event(convert::event(
                e,
                &event_target,
            ))),
        };
        let _ = events.send_blocking(Ok(msg));
    });
    let fut = work(sink);
    let last_word = tx.clone();
    runs.spawn(
        async move {
            let msg = match fut.await {
                Ok(report) => Ok(pb::RunMessage {
                    message: Some(pb::run_message::Message::Report(convert::report(&report))),
                }),
                Err(e) => Err(convert::status_from(&e)),
            };
            let _ = tx.send(msg).await;
        }
        .instrument(info_span!("migration_run", target = %target)),
        move || async move {
            let _ =
                last_word.send_now(Err(Status::unavailable(crate::inflight::CANCELLED_AT_STOP)));
        },
    );
    rx
}

#[tonic::async_trait]
impl MigrationService for MigrationGrpc {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let target = target_name(req.get_ref().target.as_ref())?;
        let statuses = self
            .api
            .status(&target)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(pb::StatusResponse {
            migrations: statuses.iter().map(convert::migration_info).collect(),
        }))
    }

    async fn plan(
        &self,
        req: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        let forward = convert::forward_from(r.forward.as_ref());
        let plan = self
            .api
            .plan(&target, &forward, r.sql)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(convert::plan(&plan)))
    }

    type ApplyStream = RunStream;

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let r = req.into_inner();
        let target = target_name(r.target.as_ref())?;
        let options = convert::apply_options_from(&r)?;
        let forward = convert::forward_from(r.forward.as_ref());
        let api = self.api.clone();
        let t = target.clone();
        Ok(Response::new(run_stream(
            &self.runs,
            target,
            move |sink| async move { api.apply(&t, &forward, &options, sink).await },
        )))
    }

    type UndoStream = RunStream;

    async fn undo(
        &self,
        req: Request<pb::UndoRequest>,
    ) -> Result<Response<Self::UndoStream>, Status> {
        let r = req.into_inner();
        let target = target_name(r.target.as_ref())?;
        let id = deployment_id(&r.deployment_id)?;
        let undo = convert::undo_from(r.undo.as_ref())?;
        let api = self.api.clone();
        let t = target.clone();
        Ok(Response::new(run_stream(
            &self.runs,
            target,
            move |sink| async move { api.undo(&t, &undo, id, sink).await },
        )))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let target = target_name(req.get_ref().target.as_ref())?;
        let v = self
            .api
            .validate(&target)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(convert::validation(&v)))
    }

    async fn repair(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let target = target_name(req.get_ref().target.as_ref())?;
        let scope = convert::repair_scope_from(req.get_ref());
        let actions = self
            .api
            .repair(&target, &scope)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(convert::repair_actions(&actions)))
    }

    async fn baseline(
        &self,
        req: Request<pb::BaselineRequest>,
    ) -> Result<Response<pb::BaselineResponse>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        self.api
            .baseline(&target, &r.version, &r.description)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(pb::BaselineResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use belay_migrate::{Event, EventKind};

    #[test]
    fn every_lock_guard_trip_is_counted_per_target() {
        let handle = belay_telemetry::metrics_handle().expect("recorder installs");
        let trip = Event {
            deployment_id: Uuid::new_v4(),
            at: chrono::Utc::now(),
            kind: EventKind::LockGuardTripped {
                version: Some("3".into()),
                script: "V3__col.sql".into(),
                line: 2,
                attempt: 1,
                blocked_sessions: 4,
                longest_wait_ms: 612,
                blockers: vec![4242],
                blocked_by: Vec::new(),
                cancelled: true,
            },
        };
        record_metrics("guarded_shop", &trip);
        record_metrics("guarded_shop", &trip);
        let text = handle.render();
        assert!(
            text.contains(r#"belay_lock_guard_trips_total{target="guarded_shop"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP belay_lock_guard_trips_total Migration statements the lock guard cancelled"
            ),
            "{text}"
        );
    }
}
