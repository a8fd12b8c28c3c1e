//! `ControllerService` and `HistoryService` over the fleet.

use crate::waves::Batch;
use crate::{DeploySpec, Fleet, RollbackScope, store_err};
use belay_migrate::{ApiError, ErrorKind};
use belay_proto::v1 as pb;
use belay_rpc::convert::{status_from, timestamp};
use belay_store::{AgentRegistration, DeploymentRecord, EventRecord, TargetRegistration};
use chrono::Utc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct ControllerGrpc(pub Fleet);

#[derive(Debug, Clone)]
pub struct HistoryGrpc(pub Fleet);

fn st(e: ApiError) -> Status {
    status_from(&e)
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_struct(o: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_prost(v)))
            .collect(),
    }
}

pub fn event_pb(e: &EventRecord) -> pb::DeploymentEvent {
    pb::DeploymentEvent {
        deployment_id: e.deployment_id.to_string(),
        seq: e.seq,
        at: Some(timestamp(e.at)),
        target: e.target.clone(),
        kind: e.kind.clone(),
        message: e.message.clone(),
        payload: match &e.payload {
            serde_json::Value::Object(o) => Some(json_struct(o)),
            _ => None,
        },
    }
}

pub fn deployment_pb(d: &DeploymentRecord) -> pb::Deployment {
    pb::Deployment {
        id: d.id.to_string(),
        state: d.state.as_str().to_string(),
        to_version: d.to_version.clone(),
        environment: d.environment.clone(),
        created_at: Some(timestamp(d.created_at)),
        finished_at: d.finished_at.map(timestamp),
        targets: d
            .targets
            .iter()
            .map(|t| pb::TargetStatus {
                target: t.target.clone(),
                state: t.state.as_str().to_string(),
                message: t.message.clone(),
                updated_at: Some(timestamp(t.updated_at)),
                step: t.step.map(|s| s.as_str().to_string()).unwrap_or_default(),
                outcome: match &t.outcome {
                    serde_json::Value::Object(o) => Some(json_struct(o)),
                    _ => None,
                },
            })
            .collect(),
        skip_promotion_reason: d.skip_promotion_reason.clone(),
        requested_by: d.requested_by.clone(),
        events: Vec::new(),
        // Kept in the deployment's parameters (remote `migrate --release`).
        release: d
            .params
            .get("release")
            .and_then(|r| r.as_str())
            .map(String::from),
    }
}

/// The shortest id prefix looked up: shorter ones match too much to be meant.
const MIN_ID_PREFIX: usize = 4;
/// How many deployments an ambiguous prefix names at most.
const MAX_PREFIX_CANDIDATES: i64 = 10;

fn parse_id(s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        st(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("{s:?} is not a deployment id (a UUID)"),
        ))
    })
}

type EventStream = ReceiverStream<Result<pb::DeploymentEvent, Status>>;

/// Streams a deployment's events after `after_seq`, following new ones until the
/// deployment is finished and no longer running in this controller. Bounded: a slow
/// watcher is sent the next events when it has read the earlier ones (they wait in the
/// store, not in memory).
pub fn watch(fleet: Fleet, id: Uuid, mut after_seq: i64) -> EventStream {
    let (tx, rx) = belay_rpc::stream::channel(belay_rpc::stream::CAPACITY);
    tokio::spawn(async move {
        loop {
            // Armed before reading, so an event stored meanwhile still wakes us.
            let changed = fleet.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let events = match fleet.store().events(id, after_seq).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(st(store_err(e)))).await;
                    return;
                }
            };
            for e in &events {
                after_seq = e.seq;
                if tx.send(Ok(event_pb(e))).await.is_err() {
                    return; // the watcher went away
                }
            }
            // A deployment this controller is running is not done: asked first, since
            // reading the deployment reads every one of its targets, and this loop wakes
            // at every event of a thousand-target deployment.
            let done = !fleet.is_active(id)
                && match fleet.store().deployment_state(id).await {
                    Ok(Some(state)) => state.is_finished(),
                    Ok(None) => true,
                    Err(_) => true,
                };
            if done {
                // One last read: events stored between the read above and the state check.
                if let Ok(rest) = fleet.store().events(id, after_seq).await {
                    for e in &rest {
                        if tx.send(Ok(event_pb(e))).await.is_err() {
                            return;
                        }
                    }
                }
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    });
    rx
}

impl ControllerGrpc {
    /// With mTLS, an agent speaks only for the name its certificate carries: a
    /// registration or heartbeat under another name is refused (`PermissionDenied`, naming
    /// the certificate's identities and the claimed name) and logged. Without TLS the
    /// name is taken as asserted (the controller says so when it starts).
    fn check_agent_identity<T>(&self, req: &Request<T>, claimed: &str) -> Result<(), Status> {
        if self.0.config().agent_identity == belay_auth::PeerIdentity::Asserted {
            return Ok(());
        }
        let certs = req.peer_certs();
        belay_auth::check_claimed_name("agent", claimed, certs.as_deref().map(Vec::as_slice))
            .map_err(|e| {
                tracing::warn!(
                    agent = %claimed,
                    peer = ?req.remote_addr(),
                    error = %e,
                    "refused an agent whose certificate does not carry the name it claims"
                );
                Status::permission_denied(e.to_string())
            })
    }
}

#[tonic::async_trait]
impl pb::controller_service_server::ControllerService for ControllerGrpc {
    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        self.check_agent_identity(&req, &req.get_ref().name)?;
        let r = req.into_inner();
        if r.name.trim().is_empty() || r.address.trim().is_empty() {
            return Err(Status::invalid_argument(
                "an agent registers with a name and an address",
            ));
        }
        self.0
            .register(AgentRegistration {
                name: r.name,
                address: r.address,
                version: r.version,
                targets: r
                    .targets
                    .into_iter()
                    .map(|t| TargetRegistration {
                        name: t.name,
                        environment: (!t.environment.is_empty()).then_some(t.environment),
                        labels: t.labels.into_iter().collect(),
                    })
                    .collect(),
            })
            .await
            .map_err(st)?;
        Ok(Response::new(pb::RegisterAgentResponse {
            heartbeat_interval_ms: self.0.config().heartbeat_interval.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.check_agent_identity(&req, &req.get_ref().name)?;
        let known = self
            .0
            .store()
            .heartbeat(&req.get_ref().name, Utc::now())
            .await
            .map_err(|e| st(store_err(e)))?;
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .0
            .store()
            .agents()
            .await
            .map_err(|e| st(store_err(e)))?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .iter()
                .map(|a| pb::Agent {
                    name: a.name.clone(),
                    address: a.address.clone(),
                    version: a.version.clone(),
                    registered_at: Some(timestamp(a.registered_at)),
                    last_heartbeat: Some(timestamp(a.last_heartbeat)),
                    state: if self.0.is_alive(a) {
                        "connected"
                    } else {
                        "unreachable"
                    }
                    .to_string(),
                    targets: a.targets.clone(),
                })
                .collect(),
        }))
    }

    async fn list_targets(
        &self,
        _req: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let targets = self
            .0
            .store()
            .targets()
            .await
            .map_err(|e| st(store_err(e)))?;
        Ok(Response::new(pb::ListTargetsResponse {
            agents: targets.iter().map(|t| t.agent.clone()).collect(),
            targets: targets
                .into_iter()
                .map(|t| pb::TargetInfo {
                    name: t.name,
                    environment: t.environment.unwrap_or_default(),
                    labels: t.labels.into_iter().collect(),
                })
                .collect(),
        }))
    }

    type DeployStream = EventStream;

    async fn deploy(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        let r = req.into_inner();
        let batch = Batch::parse(&r.batch).map_err(Status::invalid_argument)?;
        let spec = DeploySpec {
            patterns: r.targets,
            to_version: r.to_version.filter(|v| !v.is_empty()),
            canary: r.canary as usize,
            batch,
            parallel: if r.parallel == 0 {
                4
            } else {
                r.parallel as usize
            },
            environment: r.environment.filter(|e| !e.is_empty()),
            skip_promotion_reason: r.skip_promotion_reason,
            requested_by: r.requested_by,
            policy: belay_rpc::deploy::deployer_policy_from(r.policy.as_ref())?,
            rollback_scope: match pb::RollbackScope::try_from(r.rollback_scope) {
                Ok(pb::RollbackScope::Deployment) => RollbackScope::Deployment,
                Ok(pb::RollbackScope::Wave | pb::RollbackScope::Unspecified) => RollbackScope::Wave,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "unknown rollback scope {}: expected wave or deployment",
                        r.rollback_scope
                    )));
                }
            },
        };
        let id = self.0.start_deploy(spec).await.map_err(st)?;
        Ok(Response::new(watch(self.0.clone(), id, 0)))
    }

    async fn plan_deployment_rollback(
        &self,
        req: Request<pb::DeploymentRollbackRequest>,
    ) -> Result<Response<pb::DeploymentRollbackPlan>, Status> {
        let r = req.into_inner();
        let id = resolve_id(&self.0, &r.deployment_id).await?;
        let trigger = belay_rpc::rollback::trigger_from(r.trigger.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plan = self
            .0
            .plan_deployment_rollback(id, trigger)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeploymentRollbackPlan {
            deployment_id: plan.deployment.to_string(),
            plans: plan.plans.iter().map(belay_rpc::rollback::plan).collect(),
            left_out: plan.left_out,
        }))
    }

    type RollbackDeploymentStream = EventStream;

    async fn rollback_deployment(
        &self,
        req: Request<pb::DeploymentRollbackRequest>,
    ) -> Result<Response<Self::RollbackDeploymentStream>, Status> {
        let r = req.into_inner();
        let id = resolve_id(&self.0, &r.deployment_id).await?;
        let trigger = belay_rpc::rollback::trigger_from(r.trigger.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Only what happens from now on: the deployment's earlier events are its run's.
        let from = self
            .0
            .store()
            .deployment(id)
            .await
            .map_err(|e| st(store_err(e)))?
            .map_or(0, |d| d.last_seq);
        self.0
            .start_deployment_rollback(id, trigger)
            .await
            .map_err(st)?;
        Ok(Response::new(watch(self.0.clone(), id, from)))
    }
}

impl HistoryGrpc {
    async fn resolve_id(&self, given: &str) -> Result<Uuid, Status> {
        resolve_id(&self.0, given).await
    }
}

/// A deployment id, or a unique prefix of one (at least four characters, as `belay
/// deployments list` prints them): none matching is `NotFound`, several an
/// `InvalidArgument` naming them.
async fn resolve_id(fleet: &Fleet, given: &str) -> Result<Uuid, Status> {
    {
        let given = given.trim();
        if let Ok(id) = Uuid::parse_str(given) {
            return Ok(id);
        }
        let prefix = given.to_ascii_lowercase();
        if prefix.len() < MIN_ID_PREFIX
            || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(st(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{given:?} is not a deployment id: give the id, or a unique prefix of at least {MIN_ID_PREFIX} of its characters"
                ),
            )));
        }
        // The store matches the prefix; a few candidates are enough to name an ambiguity.
        let matching = fleet
            .store()
            .deployment_ids_with_prefix(&prefix, MAX_PREFIX_CANDIDATES)
            .await
            .map_err(|e| st(store_err(e)))?;
        match matching[..] {
            [id] => Ok(id),
            [] => Err(st(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "no deployment {given:?}: `belay deployments list` shows the recorded ones"
                ),
            ))),
            _ => Err(st(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{given:?} starts more than one deployment id ({}{}): give more of it",
                    matching
                        .iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    if matching.len() as i64 == MAX_PREFIX_CANDIDATES {
                        ", and maybe more"
                    } else {
                        ""
                    }
                ),
            ))),
        }
    }
}

#[tonic::async_trait]
impl pb::history_service_server::HistoryService for HistoryGrpc {
    async fn list_deployments(
        &self,
        req: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let limit = match req.get_ref().limit {
            0 => 20,
            n => i64::from(n),
        };
        let ds = self
            .0
            .store()
            .deployments(limit)
            .await
            .map_err(|e| st(store_err(e)))?;
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments: ds.iter().map(deployment_pb).collect(),
        }))
    }

    async fn get_deployment(
        &self,
        req: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let id = self.resolve_id(&req.get_ref().id).await?;
        match self
            .0
            .store()
            .deployment(id)
            .await
            .map_err(|e| st(store_err(e)))?
        {
            Some(d) if req.get_ref().without_events => Ok(Response::new(deployment_pb(&d))),
            Some(d) => {
                let events = self
                    .0
                    .store()
                    .events(id, 0)
                    .await
                    .map_err(|e| st(store_err(e)))?;
                let mut d = deployment_pb(&d);
                d.events = events.iter().map(event_pb).collect();
                Ok(Response::new(d))
            }
            None => Err(st(ApiError::new(
                ErrorKind::NotFound,
                format!("no deployment {id}: `belay deployments list` shows the recorded ones"),
            ))),
        }
    }

    type WatchDeploymentStream = EventStream;

    async fn watch_deployment(
        &self,
        req: Request<pb::WatchDeploymentRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        let id = parse_id(&req.get_ref().id)?;
        if self
            .0
            .store()
            .deployment(id)
            .await
            .map_err(|e| st(store_err(e)))?
            .is_none()
        {
            return Err(st(ApiError::new(
                ErrorKind::UnknownTarget,
                format!("no deployment {id}"),
            )));
        }
        Ok(Response::new(watch(
            self.0.clone(),
            id,
            req.get_ref().after_seq,
        )))
    }
}
