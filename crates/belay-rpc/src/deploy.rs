//! `belay.v1.DeployService`: one target's deployment pipeline run where the target lives.
//! [`DeployGrpc`] serves any [`TargetDeployApi`] (the agent's `PipelineDeployer`),
//! [`DeployClient`] implements it over gRPC (the controller's calls to agents), and the
//! conversions between the two live here.

use crate::InFlight;
use crate::client::Connection;
use crate::convert::{self, DecodeError, target, target_name};
use belay_auth::MaybeTokenAttach;
use belay_core::ApiError;
use belay_deploy::{
    AppliedMigration, Cause, DeployEvent, DeploySink, DeployerPolicy, DeploymentOutcome, OnFailure,
    Step, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun,
};
use belay_proto::v1 as pb;
use pb::deploy_service_client::DeployServiceClient;
use pb::deploy_service_server::{DeployService, DeployServiceServer};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};
use uuid::Uuid;

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---- conversions ----

pub fn deployer_policy(p: &DeployerPolicy) -> pb::DeployerPolicy {
    pb::DeployerPolicy {
        skip_preflight: p.skip_preflight,
        overrides: p.overrides.clone(),
        reason: p.reason.clone(),
        watch_ms: p.watch.map(millis),
        lock_trip_budget: p.lock_trip_budget,
        soak_ms: p.soak.map(millis),
        on_failure: match p.on_failure {
            OnFailure::Stop => pb::OnFailure::Stop,
            OnFailure::Rollback => pb::OnFailure::Rollback,
        } as i32,
        thresholds_json: if p.thresholds.is_empty() {
            String::new()
        } else {
            serde_json::json!(p.thresholds).to_string()
        },
    }
}

pub fn deployer_policy_from(p: Option<&pb::DeployerPolicy>) -> Result<DeployerPolicy, DecodeError> {
    let Some(p) = p else {
        return Ok(DeployerPolicy::default());
    };
    let on_failure = match pb::OnFailure::try_from(p.on_failure) {
        Ok(pb::OnFailure::Unspecified | pb::OnFailure::Stop) => OnFailure::Stop,
        Ok(pb::OnFailure::Rollback) => OnFailure::Rollback,
        Err(_) => {
            return Err(bad(
                "deployer policy",
                format!("unknown on_failure {}", p.on_failure),
            ));
        }
    };
    if !p.overrides.is_empty() && p.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(bad(
            "deployer policy",
            "overridden checks need a reason (--reason)",
        ));
    }
    let thresholds = if p.thresholds_json.is_empty() {
        Default::default()
    } else {
        serde_json::from_str(&p.thresholds_json).map_err(|e| {
            bad(
                "deployer policy",
                format!("thresholds_json is not a JSON object of [preflight] keys: {e}"),
            )
        })?
    };
    Ok(DeployerPolicy {
        skip_preflight: p.skip_preflight,
        overrides: p.overrides.clone(),
        reason: p.reason.clone(),
        watch: p.watch_ms.map(Duration::from_millis),
        soak: p.soak_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
        lock_trip_budget: p.lock_trip_budget,
        on_failure,
        thresholds,
    })
}

pub fn deploy_request(r: &TargetDeployment) -> pb::DeployTargetRequest {
    pb::DeployTargetRequest {
        target: target(&r.target),
        deployment_id: r.id.to_string(),
        forward: Some(convert::forward(&r.forward)),
        environment: r.environment.clone(),
        requested_by: r.requested_by.clone(),
        release: r.release.clone(),
        policy: Some(deployer_policy(&r.asked)),
    }
}

pub fn deploy_request_from(r: &pb::DeployTargetRequest) -> Result<TargetDeployment, Status> {
    Ok(TargetDeployment {
        id: convert::parse_uuid(&r.deployment_id)?,
        target: target_name(r.target.as_ref())?,
        forward: convert::forward_from(r.forward.as_ref()),
        environment: r.environment.clone(),
        requested_by: r.requested_by.clone(),
        release: r.release.clone(),
        asked: deployer_policy_from(r.policy.as_ref())?,
    })
}

fn step_from(s: &str) -> Result<Step, DecodeError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| bad("deployment step", format!("unknown step {s:?}")))
}

fn json_from(what: &'static str, s: &str) -> Result<serde_json::Value, DecodeError> {
    if s.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(s).map_err(|e| bad(what, format!("not JSON: {e}")))
}

pub fn deploy_event(e: &DeployEvent) -> pb::DeployEvent {
    pb::DeployEvent {
        seq: e.seq,
        at: Some(convert::timestamp(e.at)),
        step: e.step.as_str().to_string(),
        kind: e.kind.clone(),
        message: e.message.clone(),
        payload_json: e.payload.to_string(),
    }
}

pub fn deploy_event_from(
    e: &pb::DeployEvent,
    id: Uuid,
    target: &str,
) -> Result<DeployEvent, DecodeError> {
    Ok(DeployEvent {
        deployment_id: id,
        target: target.to_string(),
        seq: e.seq,
        at: e
            .at
            .as_ref()
            .map(convert::from_timestamp)
            .transpose()?
            .unwrap_or_else(chrono::Utc::now),
        step: step_from(&e.step)?,
        kind: e.kind.clone(),
        message: e.message.clone(),
        payload: json_from("deployment event payload", &e.payload_json)?,
    })
}

fn cause_name(c: Cause) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn cause_from(s: &str) -> Result<Cause, DecodeError> {
    Ok(match s {
        "error" => Cause::Error,
        "blocked" => Cause::Blocked,
        "assertion_failed" => Cause::AssertionFailed,
        "probe_triggered" => Cause::ProbeTriggered,
        "lock_trip_budget" => Cause::LockTripBudget,
        "hook_failed" => Cause::HookFailed,
        other => {
            return Err(bad(
                "deployment outcome",
                format!("unknown cause {other:?}"),
            ));
        }
    })
}

pub fn deploy_outcome(d: &TargetDeployed) -> pb::DeployOutcome {
    let o = &d.outcome;
    pb::DeployOutcome {
        state: o.state.as_str().to_string(),
        finished_at: Some(convert::timestamp(o.finished_at)),
        failed_step: o.failed_step.map(|s| s.as_str().to_string()),
        reason: o.reason.clone(),
        evidence_json: o.evidence.to_string(),
        to_version: o.to_version.clone(),
        backup_id: o.backup_id.clone(),
        applied: o
            .applied
            .iter()
            .map(|a| pb::AppliedMigration {
                version: a.version.clone(),
                script: a.script.clone(),
                checksum: a.checksum.clone(),
                has_undo: a.has_undo,
                irreversible: a.irreversible,
            })
            .collect(),
        error_reason: d
            .kind
            .map_or(pb::ErrorReason::Unspecified, convert::reason_of) as i32,
        cause: d.cause.map(cause_name),
        record_json: d
            .record
            .as_ref()
            .and_then(|r| serde_json::to_string(r).ok())
            .unwrap_or_default(),
    }
}

pub fn deploy_outcome_from(o: &pb::DeployOutcome) -> Result<TargetDeployed, DecodeError> {
    let kind = match pb::ErrorReason::try_from(o.error_reason) {
        Ok(pb::ErrorReason::Unspecified) => None,
        Ok(r) => convert::kind_of(r),
        Err(_) => None,
    };
    Ok(TargetDeployed {
        outcome: DeploymentOutcome {
            state: step_from(&o.state)?,
            finished_at: o
                .finished_at
                .as_ref()
                .map(convert::from_timestamp)
                .transpose()?
                .unwrap_or_else(chrono::Utc::now),
            failed_step: o.failed_step.as_deref().map(step_from).transpose()?,
            reason: o.reason.clone(),
            evidence: json_from("deployment evidence", &o.evidence_json)?,
            to_version: o.to_version.clone(),
            backup_id: o.backup_id.clone(),
            applied: o
                .applied
                .iter()
                .map(|a| AppliedMigration {
                    version: a.version.clone(),
                    script: a.script.clone(),
                    checksum: a.checksum.clone(),
                    has_undo: a.has_undo,
                    irreversible: a.irreversible,
                })
                .collect(),
        },
        kind,
        cause: o.cause.as_deref().map(cause_from).transpose()?,
        record: if o.record_json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&o.record_json)
                    .map_err(|e| bad("deployment record", format!("not a record: {e}")))?,
            )
        },
    })
}

pub fn target_run(r: &TargetRun) -> pb::TargetDeploymentState {
    match r {
        TargetRun::Running { step } => pb::TargetDeploymentState {
            state: "running".into(),
            step: step.as_str().to_string(),
            outcome: None,
        },
        TargetRun::Finished(o) => pb::TargetDeploymentState {
            state: "finished".into(),
            step: o.state.as_str().to_string(),
            outcome: Some(deploy_outcome(&TargetDeployed {
                outcome: o.clone(),
                kind: None,
                cause: None,
                record: None,
            })),
        },
        TargetRun::NotFound => pb::TargetDeploymentState {
            state: "not_found".into(),
            step: String::new(),
            outcome: None,
        },
    }
}

pub fn target_run_from(r: &pb::TargetDeploymentState) -> Result<TargetRun, DecodeError> {
    match r.state.as_str() {
        "running" => Ok(TargetRun::Running {
            step: step_from(&r.step)?,
        }),
        "finished" => {
            let o = r
                .outcome
                .as_ref()
                .ok_or_else(|| bad("target deployment", "finished without an outcome"))?;
            Ok(TargetRun::Finished(deploy_outcome_from(o)?.outcome))
        }
        "not_found" => Ok(TargetRun::NotFound),
        other => Err(bad("target deployment", format!("unknown state {other:?}"))),
    }
}

// ---- server ----

/// The gRPC face of a target deployer: the agent serves its targets' pipelines through it.
#[derive(Clone)]
pub struct DeployGrpc {
    api: Arc<dyn TargetDeployApi>,
    runs: InFlight,
}

impl std::fmt::Debug for DeployGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployGrpc").finish_non_exhaustive()
    }
}

impl DeployGrpc {
    pub fn new(api: Arc<dyn TargetDeployApi>) -> Self {
        DeployGrpc {
            api,
            runs: InFlight::new(),
        }
    }

    /// The deployments in flight. On shutdown a daemon closes it and waits (bounded), so
    /// a deployment under way finishes its step and is recorded rather than cut off.
    pub fn runs(&self) -> &InFlight {
        &self.runs
    }

    pub fn into_service(self) -> DeployServiceServer<Self> {
        DeployServiceServer::new(self)
    }
}

type DeployStream = ReceiverStream<Result<pb::DeployTargetMessage, Status>>;

#[tonic::async_trait]
impl DeployService for DeployGrpc {
    type DeployTargetStream = DeployStream;

    async fn deploy_target(
        &self,
        req: Request<pb::DeployTargetRequest>,
    ) -> Result<Response<Self::DeployTargetStream>, Status> {
        let request = deploy_request_from(req.get_ref())?;
        let span =
            info_span!("deploy_target_rpc", deployment = %request.id, target = %request.target);
        // The controller's trace of the whole deployment continues here.
        belay_telemetry::propagation::set_parent(&span, |key| {
            req.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        // Bounded: a slow controller slows the pipeline's event flow, nothing piles up.
        let (tx, rx) = crate::stream::channel(crate::stream::CAPACITY);
        let events = tx.clone();
        let sink: DeploySink = Arc::new(move |e: &DeployEvent| {
            let _ = events.send_blocking(Ok(pb::DeployTargetMessage {
                message: Some(pb::deploy_target_message::Message::Event(deploy_event(e))),
            }));
        });
        let api = self.api.clone();
        // Its own task, not tied to the caller: a controller that goes away mid-run does
        // not abandon a deployment half-way; it runs to its end and is recorded beside
        // the target.
        let last_word = tx.clone();
        self.runs.spawn(
            async move {
                let msg = match api.deploy_target(request, sink).await {
                    Ok(d) => Ok(pb::DeployTargetMessage {
                        message: Some(pb::deploy_target_message::Message::Outcome(deploy_outcome(
                            &d,
                        ))),
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

    async fn get_target_deployment(
        &self,
        req: Request<pb::GetTargetDeploymentRequest>,
    ) -> Result<Response<pb::TargetDeploymentState>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        let id = convert::parse_uuid(&r.deployment_id)?;
        let run = self
            .api
            .deployment(&target, id)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(target_run(&run)))
    }
}

// ---- client ----

/// [`TargetDeployApi`] over gRPC: the controller's calls to the agent owning a target.
#[derive(Clone, Debug)]
pub struct DeployClient {
    client: DeployServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl DeployClient {
    pub fn new(conn: &Connection) -> Self {
        DeployClient {
            client: DeployServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }
}

const CHECK: &str = "check `belay status` and `belay history` on the target";

/// How long the controller waits for an agent to say where a deployment stands: one read
/// of the target's log, so an agent slower than this is treated as unreachable.
const QUERY_DEADLINE: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl TargetDeployApi for DeployClient {
    async fn deploy_target(
        &self,
        request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError> {
        let mut call = tonic::Request::new(deploy_request(&request));
        // W3C trace context, so the agent's spans of this target join the caller's trace.
        belay_telemetry::propagation::inject(&tracing::Span::current(), |key, value| {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                call.metadata_mut().insert(key, value);
            }
        });
        let mut stream = self
            .client
            .clone()
            .deploy_target(call)
            .await
            .map_err(|s| convert::api_error_from(&s, &self.peer))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(pb::DeployTargetMessage {
                    message: Some(pb::deploy_target_message::Message::Event(e)),
                })) => sink(&deploy_event_from(&e, request.id, &request.target)?),
                Ok(Some(pb::DeployTargetMessage {
                    message: Some(pb::deploy_target_message::Message::Outcome(o)),
                })) => return Ok(deploy_outcome_from(&o)?),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(convert::stream_cut_short(
                        Ok(()),
                        &self.peer,
                        "deployment",
                        CHECK,
                    ));
                }
                Err(s) => {
                    return Err(convert::stream_cut_short(
                        Err(&s),
                        &self.peer,
                        "deployment",
                        CHECK,
                    ));
                }
            }
        }
    }

    async fn deployment(&self, t: &str, id: Uuid) -> Result<TargetRun, ApiError> {
        let mut req = Request::new(pb::GetTargetDeploymentRequest {
            target: target(t),
            deployment_id: id.to_string(),
        });
        req.set_timeout(QUERY_DEADLINE);
        let r = self
            .client
            .clone()
            .get_target_deployment(req)
            .await
            .map_err(|s| convert::api_error_from(&s, &self.peer))?;
        Ok(target_run_from(r.get_ref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use belay_core::ErrorKind;
    use serde_json::json;

    #[test]
    fn requests_events_and_outcomes_round_trip() {
        let request = TargetDeployment {
            id: Uuid::new_v4(),
            target: "shop".into(),
            forward: belay_migrate::Target {
                to: Some("3".into()),
                steps: None,
            },
            environment: Some("staging".into()),
            requested_by: Some("ops".into()),
            release: None,
            asked: DeployerPolicy {
                skip_preflight: false,
                overrides: vec!["lock_waits".into()],
                reason: Some("agreed".into()),
                watch: Some(Duration::from_secs(30)),
                soak: Some(Duration::from_secs(300)),
                lock_trip_budget: Some(2),
                on_failure: OnFailure::Stop,
                thresholds: [("lock_wait_block".to_string(), json!("300ms"))].into(),
            },
        };
        let back = deploy_request_from(&deploy_request(&request)).expect("decodes");
        assert_eq!(back.id, request.id);
        assert_eq!(back.target, "shop");
        assert_eq!(back.forward.to.as_deref(), Some("3"));
        assert_eq!(back.asked, request.asked);

        let mut no_reason = deploy_request(&request);
        if let Some(p) = no_reason.policy.as_mut() {
            p.reason = None;
        }
        let err = deploy_request_from(&no_reason).expect_err("refused");
        assert!(err.message().contains("need a reason"), "{err:?}");

        let event = DeployEvent {
            deployment_id: request.id,
            target: "shop".into(),
            seq: 3,
            at: chrono::Utc::now(),
            step: Step::Validating,
            kind: "check".into(),
            message: "validating: 1 of 1 assertion(s) passed".into(),
            payload: json!({ "check": "postflight", "results": [] }),
        };
        let back = deploy_event_from(&deploy_event(&event), request.id, "shop").expect("decodes");
        assert_eq!(back.step, Step::Validating);
        assert_eq!(back.payload, event.payload);
        assert_eq!(back.seq, 3);

        let deployed = TargetDeployed {
            outcome: DeploymentOutcome {
                state: Step::Failed,
                finished_at: chrono::Utc::now(),
                failed_step: Some(Step::Preflight),
                reason: Some("preflight blocked by: lock_waits".into()),
                evidence: json!({ "blocked": [{ "name": "lock_waits" }] }),
                to_version: None,
                backup_id: None,
                applied: vec![],
            },
            kind: Some(ErrorKind::Refused),
            cause: Some(Cause::Blocked),
            record: None,
        };
        let back = deploy_outcome_from(&deploy_outcome(&deployed)).expect("decodes");
        assert_eq!(back.outcome.failed_step, Some(Step::Preflight));
        assert_eq!(back.outcome.evidence, deployed.outcome.evidence);
        assert_eq!(back.kind, Some(ErrorKind::Refused));
        assert_eq!(back.cause, Some(Cause::Blocked));
        assert_eq!(back.record, None);

        let mut no_object = deploy_request(&request);
        if let Some(p) = no_object.policy.as_mut() {
            p.thresholds_json = "[1]".into();
        }
        let err = deploy_request_from(&no_object).expect_err("refused");
        assert!(err.message().contains("thresholds_json"), "{err:?}");
    }
}
