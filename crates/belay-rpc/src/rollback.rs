//! `belay.v1.RollbackService`: the rollback controller of one target. [`RollbackGrpc`]
//! serves any [`RollbackApi`] (the agent's `LocalRollbacks`, the controller's router),
//! [`RollbackClient`] implements it over gRPC (the CLI's remote mode, the controller's
//! calls to agents), and the conversions between the two live here. The plan, the
//! trigger, the record and the report travel as JSON beside typed key fields: they are
//! `belay-rollback`'s serde types, and one encoding keeps both ends exact.

use crate::InFlight;
use crate::client::Connection;
use crate::convert::{self, DecodeError, target, target_name};
use crate::deploy::{deploy_event, deploy_event_from};
use belay_auth::MaybeTokenAttach;
use belay_core::ApiError;
use belay_deploy::{DeployEvent, DeploySink, DeploymentRecord, Step};
use belay_proto::v1 as pb;
use belay_rollback::{
    Execute, IncidentReport, Outcome, RollbackApi, RollbackPlan, RollbackStatus, RollbackTo,
    Rollbackable, Strategy, Trigger,
};
use pb::rollback_service_client::RollbackServiceClient;
use pb::rollback_service_server::{RollbackService, RollbackServiceServer};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    s: &str,
) -> Result<T, DecodeError> {
    serde_json::from_str(s).map_err(|e| bad(what, format!("not a valid {what}: {e}")))
}

fn step_from(s: &str) -> Result<Step, DecodeError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| bad("deployment step", format!("unknown step {s:?}")))
}

// ---- conversions ----

pub fn strategy(s: Strategy) -> pb::RollbackStrategy {
    match s {
        Strategy::Undo => pb::RollbackStrategy::Undo,
        Strategy::TableRestore => pb::RollbackStrategy::TableRestore,
        Strategy::FullRestore => pb::RollbackStrategy::FullRestore,
        Strategy::Escalate => pb::RollbackStrategy::Escalate,
    }
}

pub fn rollback_to(to: &RollbackTo) -> pb::RollbackTo {
    use pb::rollback_to::To;
    pb::RollbackTo {
        to: Some(match to {
            RollbackTo::Deployment(d) => To::Deployment(d.clone()),
            RollbackTo::Version(v) => To::Version(v.clone()),
            RollbackTo::Release(r) => To::Release(r.clone()),
            RollbackTo::Positional(p) => To::Positional(p.clone()),
        }),
    }
}

pub fn rollback_to_from(to: Option<&pb::RollbackTo>) -> Result<RollbackTo, DecodeError> {
    use pb::rollback_to::To;
    match to.and_then(|t| t.to.as_ref()) {
        Some(To::Deployment(d)) => Ok(RollbackTo::Deployment(d.clone())),
        Some(To::Version(v)) => Ok(RollbackTo::Version(v.clone())),
        Some(To::Release(r)) => Ok(RollbackTo::Release(r.clone())),
        Some(To::Positional(p)) => Ok(RollbackTo::Positional(p.clone())),
        None => Err(bad(
            "rollback request",
            "names nothing to roll back to: a deployment id, a schema version or a release",
        )),
    }
}

pub fn trigger(t: &Trigger) -> pb::RollbackTrigger {
    pb::RollbackTrigger { json: to_json(t) }
}

pub fn trigger_from(t: Option<&pb::RollbackTrigger>) -> Result<Trigger, DecodeError> {
    match t {
        Some(t) => from_json("rollback trigger", &t.json),
        None => Err(bad("rollback request", "carries no trigger")),
    }
}

pub fn plan(p: &RollbackPlan) -> pb::RollbackPlan {
    pb::RollbackPlan {
        target: p.target.clone(),
        strategy: strategy(p.strategy) as i32,
        deployment_ids: p.deployments.iter().map(|d| d.to_string()).collect(),
        to_version: p.to_version.clone(),
        reasons: p
            .reasons
            .iter()
            .map(|r| format!("{}: {}", r.branch, r.why))
            .collect(),
        steps: p.steps.clone(),
        backup_ids: p.backups.iter().map(|b| b.id.clone()).collect(),
        estimated_ms: p.estimated_ms,
        plan_json: to_json(p),
    }
}

/// The plan from its JSON (the typed fields are its summary).
pub fn plan_from(p: &pb::RollbackPlan) -> Result<RollbackPlan, DecodeError> {
    from_json("rollback plan", &p.plan_json)
}

pub fn rollbackable(r: &Rollbackable) -> pb::Rollbackable {
    pb::Rollbackable {
        deployment_id: r.id.to_string(),
        state: r.state.as_str().to_string(),
        started_at: Some(convert::timestamp(r.started_at)),
        release: r.release.clone(),
        from_version: r.from_version.clone(),
        reached_version: r.reached_version.clone(),
        migrations: u32::try_from(r.migrations).unwrap_or(u32::MAX),
        can_roll_back: r.can_roll_back,
    }
}

pub fn rollbackable_from(r: &pb::Rollbackable) -> Result<Rollbackable, DecodeError> {
    Ok(Rollbackable {
        id: convert::parse_uuid(&r.deployment_id)?,
        state: step_from(&r.state)?,
        started_at: r
            .started_at
            .as_ref()
            .map(convert::from_timestamp)
            .transpose()?
            .ok_or_else(|| bad("rollbackable deployment", "has no start time"))?,
        release: r.release.clone(),
        from_version: r.from_version.clone(),
        reached_version: r.reached_version.clone(),
        migrations: r.migrations as usize,
        can_roll_back: r.can_roll_back,
    })
}

pub fn outcome(o: &Outcome) -> pb::RollbackOutcome {
    pb::RollbackOutcome {
        state: o.state.as_str().to_string(),
        report_json: to_json(&o.report),
    }
}

pub fn outcome_from(o: &pb::RollbackOutcome) -> Result<Outcome, DecodeError> {
    Ok(Outcome {
        state: step_from(&o.state)?,
        report: from_json::<IncidentReport>("incident report", &o.report_json)?,
    })
}

pub fn status(s: &RollbackStatus) -> pb::RollbackStatus {
    pb::RollbackStatus {
        deployment_id: s.record.start.id.to_string(),
        state: s.record.step.as_str().to_string(),
        running: s.running,
        record_json: to_json(&s.record),
        steps: s.steps.iter().map(deploy_event).collect(),
        notifications: s.notifications.iter().map(deploy_event).collect(),
        report_json: s.report.as_ref().map(to_json),
        report_markdown: s.markdown.clone(),
        abort_requested: s.abort_requested.clone(),
        under_way: s.under_way.clone(),
        next: s.next.clone(),
    }
}

pub fn status_from(s: &pb::RollbackStatus) -> Result<RollbackStatus, DecodeError> {
    let record: DeploymentRecord = from_json("deployment record", &s.record_json)?;
    let id = record.start.id;
    let target = record.start.target.clone();
    Ok(RollbackStatus {
        steps: s
            .steps
            .iter()
            .map(|e| deploy_event_from(e, id, &target))
            .collect::<Result<_, _>>()?,
        notifications: s
            .notifications
            .iter()
            .map(|e| deploy_event_from(e, id, &target))
            .collect::<Result<_, _>>()?,
        report: s
            .report_json
            .as_deref()
            .map(|j| from_json("incident report", j))
            .transpose()?,
        markdown: s.report_markdown.clone(),
        running: s.running,
        abort_requested: s.abort_requested.clone(),
        under_way: s.under_way.clone(),
        next: s.next.clone(),
        record,
    })
}

fn some_id(id: &str) -> Option<&str> {
    let id = id.trim();
    (!id.is_empty()).then_some(id)
}

// ---- server ----

/// The gRPC face of a rollback controller: the agent serves its targets' through it,
/// the controller its router.
#[derive(Clone)]
pub struct RollbackGrpc {
    api: Arc<dyn RollbackApi>,
    runs: InFlight,
}

impl std::fmt::Debug for RollbackGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollbackGrpc").finish_non_exhaustive()
    }
}

impl RollbackGrpc {
    pub fn new(api: Arc<dyn RollbackApi>) -> Self {
        RollbackGrpc {
            api,
            runs: InFlight::new(),
        }
    }

    /// The rollbacks in flight. On shutdown a daemon closes it and waits (bounded), so a
    /// rollback under way finishes its step and is recorded rather than cut off.
    pub fn runs(&self) -> &InFlight {
        &self.runs
    }

    pub fn into_service(self) -> RollbackServiceServer<Self> {
        RollbackServiceServer::new(self)
    }
}

type ExecuteStream = ReceiverStream<Result<pb::RollbackExecuteMessage, Status>>;

fn api_status(e: ApiError) -> Status {
    convert::status_from(&e)
}

#[tonic::async_trait]
impl RollbackService for RollbackGrpc {
    type ExecuteStream = ExecuteStream;

    async fn list(
        &self,
        req: Request<pb::ListRollbacksRequest>,
    ) -> Result<Response<pb::ListRollbacksResponse>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let limit = if r.limit == 0 { 20 } else { r.limit as usize };
        let rows = self.api.list(&t, limit).await.map_err(api_status)?;
        Ok(Response::new(pb::ListRollbacksResponse {
            deployments: rows.iter().map(rollbackable).collect(),
        }))
    }

    async fn plan(
        &self,
        req: Request<pb::RollbackPlanRequest>,
    ) -> Result<Response<pb::RollbackPlan>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let to = rollback_to_from(r.to.as_ref())?;
        let trigger = trigger_from(r.trigger.as_ref())?;
        let p = self.api.plan(&t, &to, trigger).await.map_err(api_status)?;
        Ok(Response::new(plan(&p)))
    }

    async fn execute(
        &self,
        req: Request<pb::RollbackExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        use pb::rollback_execute_request::What;
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let what = match &r.what {
            Some(What::To(to)) => Execute::To(rollback_to_from(Some(to))?),
            Some(What::Plan(p)) => Execute::Plan(Box::new(plan_from(p)?)),
            None => {
                return Err(Status::invalid_argument(
                    "the rollback request names neither what to roll back to nor a plan",
                ));
            }
        };
        let trigger = trigger_from(r.trigger.as_ref())?;
        let span = info_span!("rollback_rpc", target = %t);
        // Bounded, as every event stream: a slow caller slows the rollback's event flow.
        let (tx, rx) = crate::stream::channel(crate::stream::CAPACITY);
        let events = tx.clone();
        let sink: DeploySink = Arc::new(move |e: &DeployEvent| {
            let _ = events.send_blocking(Ok(pb::RollbackExecuteMessage {
                message: Some(pb::rollback_execute_message::Message::Event(
                    pb::RollbackEvent {
                        deployment_id: e.deployment_id.to_string(),
                        event: Some(deploy_event(e)),
                    },
                )),
            }));
        });
        let api = self.api.clone();
        // Its own task, not tied to the caller: a caller that goes away mid-rollback does
        // not leave the database half rolled back; it runs to its end and is recorded.
        let last_word = tx.clone();
        self.runs.spawn(
            async move {
                let msg = match api.execute(&t, what, trigger, sink).await {
                    Ok(o) => Ok(pb::RollbackExecuteMessage {
                        message: Some(pb::rollback_execute_message::Message::Outcome(outcome(&o))),
                    }),
                    Err(e) => Err(convert::status_from(&e)),
                };
                let _ = tx.send(msg).await;
            }
            .instrument(span),
            move || async move {
                let _ = last_word
                    .send_now(Err(Status::unavailable(crate::inflight::CANCELLED_AT_STOP)));
            },
        );
        Ok(Response::new(rx))
    }

    async fn status(
        &self,
        req: Request<pb::RollbackStatusRequest>,
    ) -> Result<Response<pb::RollbackStatus>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let s = self
            .api
            .status(&t, some_id(&r.deployment_id))
            .await
            .map_err(api_status)?;
        Ok(Response::new(status(&s)))
    }

    async fn abort(
        &self,
        req: Request<pb::RollbackStatusRequest>,
    ) -> Result<Response<pb::RollbackStatus>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let s = self
            .api
            .abort(&t, some_id(&r.deployment_id))
            .await
            .map_err(api_status)?;
        Ok(Response::new(status(&s)))
    }
}

// ---- client ----

/// [`RollbackApi`] over gRPC: the CLI's calls to the controller, the controller's to the
/// agent owning a target.
#[derive(Clone, Debug)]
pub struct RollbackClient {
    client: RollbackServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl RollbackClient {
    pub fn new(conn: &Connection) -> Self {
        RollbackClient {
            client: RollbackServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }

    fn err(&self, s: &Status) -> ApiError {
        convert::api_error_from(s, &self.peer)
    }
}

const CHECK: &str = "check `belay rollback status` on the target";

#[async_trait::async_trait]
impl RollbackApi for RollbackClient {
    async fn list(&self, t: &str, limit: usize) -> Result<Vec<Rollbackable>, ApiError> {
        let r = self
            .client
            .clone()
            .list(pb::ListRollbacksRequest {
                target: target(t),
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(r.get_ref()
            .deployments
            .iter()
            .map(rollbackable_from)
            .collect::<Result<_, _>>()?)
    }

    async fn plan(&self, t: &str, to: &RollbackTo, tr: Trigger) -> Result<RollbackPlan, ApiError> {
        let r = self
            .client
            .clone()
            .plan(pb::RollbackPlanRequest {
                target: target(t),
                to: Some(rollback_to(to)),
                trigger: Some(trigger(&tr)),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(plan_from(r.get_ref())?)
    }

    async fn execute(
        &self,
        t: &str,
        what: Execute,
        tr: Trigger,
        sink: DeploySink,
    ) -> Result<Outcome, ApiError> {
        use pb::rollback_execute_request::What;
        let request = pb::RollbackExecuteRequest {
            target: target(t),
            what: Some(match &what {
                Execute::To(to) => What::To(rollback_to(to)),
                Execute::Plan(p) => What::Plan(plan(p)),
            }),
            trigger: Some(trigger(&tr)),
        };
        let mut stream = self
            .client
            .clone()
            .execute(request)
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(pb::RollbackExecuteMessage {
                    message: Some(pb::rollback_execute_message::Message::Event(e)),
                })) => {
                    let id = convert::parse_uuid(&e.deployment_id)?;
                    let event = e
                        .event
                        .as_ref()
                        .ok_or_else(|| bad("rollback event", "carries no event"))?;
                    sink(&deploy_event_from(event, id, t)?)
                }
                Ok(Some(pb::RollbackExecuteMessage {
                    message: Some(pb::rollback_execute_message::Message::Outcome(o)),
                })) => return Ok(outcome_from(&o)?),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(convert::stream_cut_short(
                        Ok(()),
                        &self.peer,
                        "rollback",
                        CHECK,
                    ));
                }
                Err(s) => {
                    return Err(convert::stream_cut_short(
                        Err(&s),
                        &self.peer,
                        "rollback",
                        CHECK,
                    ));
                }
            }
        }
    }

    async fn status(&self, t: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let r = self
            .client
            .clone()
            .status(pb::RollbackStatusRequest {
                target: target(t),
                deployment_id: id.unwrap_or_default().to_string(),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(status_from(r.get_ref())?)
    }

    async fn abort(&self, t: &str, id: Option<&str>) -> Result<RollbackStatus, ApiError> {
        let r = self
            .client
            .clone()
            .abort(pb::RollbackStatusRequest {
                target: target(t),
                deployment_id: id.unwrap_or_default().to_string(),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(status_from(r.get_ref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use belay_rollback::TriggerKind;
    use uuid::Uuid;

    #[test]
    fn targets_triggers_and_rows_round_trip_and_bad_input_is_refused() {
        for to in [
            RollbackTo::Deployment("3f2a".into()),
            RollbackTo::Version("2".into()),
            RollbackTo::Release("1.2.0".into()),
            RollbackTo::Positional("3f2a".into()),
        ] {
            assert_eq!(rollback_to_from(Some(&rollback_to(&to))).unwrap(), to);
        }
        let err = rollback_to_from(Some(&pb::RollbackTo { to: None })).unwrap_err();
        assert!(
            err.to_string().contains("names nothing to roll back to"),
            "{err}"
        );

        let t = Trigger::operator("requested by ops", true);
        let back = trigger_from(Some(&trigger(&t))).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.kind, TriggerKind::Operator);
        assert!(trigger_from(None).is_err());
        let err = trigger_from(Some(&pb::RollbackTrigger {
            json: "{not json".into(),
        }))
        .unwrap_err();
        assert!(err.to_string().contains("rollback trigger"), "{err}");

        let row = Rollbackable {
            id: Uuid::new_v4(),
            state: Step::RolledBack,
            started_at: chrono::Utc::now(),
            release: Some("1.1.0".into()),
            from_version: None,
            reached_version: Some("1".into()),
            migrations: 1,
            can_roll_back: false,
        };
        let back = rollbackable_from(&rollbackable(&row)).unwrap();
        assert_eq!(back.id, row.id);
        assert_eq!(back.state, Step::RolledBack);
        assert_eq!(back.release, row.release);
        let mut bad = rollbackable(&row);
        bad.state = "sideways".into();
        assert!(rollbackable_from(&bad).is_err());
    }
}
