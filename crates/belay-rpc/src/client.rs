//! `MigrationApi` over gRPC: the CLI's remote mode and the controller's calls to agents.

use crate::convert::{self, target};
use belay_auth::{MaybeTokenAttach, Secret, TokenAttach};
use belay_migrate::{
    ApiError, ApplyOptions, ErrorKind, EventSink, MigrationApi, MigrationStatus, PlanView,
    RepairAction, RunReport, Target, UndoTarget, Validation,
};
use belay_proto::v1 as pb;
use pb::migration_service_client::MigrationServiceClient;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use uuid::Uuid;

/// HTTP/2 keepalive of a channel, on both ends: a ping every `interval` (also while no
/// call is open), the peer given up when one stays unanswered for `timeout`. A peer that
/// dies silently (power loss, a partition, a stopped process: no FIN, no RST) is noticed
/// within [`Keepalive::bound`], and every call open on the channel, a deployment's event
/// stream included, ends with `Unavailable` then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// 10 s + 10 s: a silently dead peer is detected within 20 s, one ping per 10 s.
    fn default() -> Self {
        Keepalive::every(Duration::from_secs(10))
    }
}

impl Keepalive {
    /// A ping every `d`, answered within `d`.
    pub fn every(d: Duration) -> Self {
        Keepalive {
            interval: d,
            timeout: d,
        }
    }

    /// The longest a silently dead peer goes unnoticed.
    pub fn bound(&self) -> Duration {
        self.interval + self.timeout
    }
}

/// Who is on the other end of a [`Connection`], for messages ("agent db-1 at
/// 10.0.0.5:7401"; reads as that string), and whether we speak TLS to it, so that a
/// transport failure can say which side is missing TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    name: String,
    tls: bool,
}

impl Peer {
    /// `name` as messages show it; `tls`: whether calls to it use TLS.
    pub fn new(name: impl Into<String>, tls: bool) -> Self {
        Peer {
            name: name.into(),
            tls,
        }
    }

    /// Whether calls to this peer use TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

impl std::ops::Deref for Peer {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// A channel to a belay server (agent or controller), with its credentials.
#[derive(Clone, Debug)]
pub struct Connection {
    pub channel: Channel,
    pub token: MaybeTokenAttach,
    /// Who is on the other end, for messages ("agent db-1 at 10.0.0.5:7401").
    pub peer: Peer,
}

impl Connection {
    /// Connects lazily: an unreachable peer surfaces on the first call as
    /// `AgentUnreachable`, naming `peer`.
    pub fn new(
        address: &str,
        tls: Option<ClientTlsConfig>,
        token: Option<&str>,
        peer: impl Into<String>,
    ) -> Result<Self, ApiError> {
        Self::with_keepalive(address, tls, token, peer, Keepalive::default())
    }

    /// [`Connection::new`] with the channel's keepalive chosen by the caller (the
    /// controller's `--agent-keepalive`).
    pub fn with_keepalive(
        address: &str,
        tls: Option<ClientTlsConfig>,
        token: Option<&str>,
        peer: impl Into<String>,
        keepalive: Keepalive,
    ) -> Result<Self, ApiError> {
        let peer = Peer::new(peer, tls.is_some());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("{scheme}://{address}")
        };
        let bad = |e: &dyn std::fmt::Display| {
            ApiError::new(
                ErrorKind::AgentUnreachable,
                format!("bad address {address:?} for {peer}: {e}"),
            )
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(&e))?;
        }
        let token = token
            .map(|t| TokenAttach::new(&Secret::new(t)))
            .transpose()
            .map_err(|e| ApiError::new(ErrorKind::Unauthenticated, e.to_string()))?;
        Ok(Connection {
            channel: endpoint.connect_lazy(),
            token: MaybeTokenAttach(token),
            peer,
        })
    }

    pub fn intercepted(&self) -> InterceptedService<Channel, MaybeTokenAttach> {
        InterceptedService::new(self.channel.clone(), self.token.clone())
    }
}

#[derive(Clone, Debug)]
pub struct MigrationClient {
    client: MigrationServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: Peer,
}

impl MigrationClient {
    pub fn new(conn: &Connection) -> Self {
        MigrationClient {
            client: MigrationServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }

    fn err(&self, s: &tonic::Status) -> ApiError {
        convert::api_error_from(s, &self.peer)
    }

    async fn drain(
        &self,
        mut stream: tonic::Streaming<pb::RunMessage>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        loop {
            match stream.message().await {
                Ok(Some(pb::RunMessage {
                    message: Some(pb::run_message::Message::Event(e)),
                })) => sink(&convert::event_from(&e)?),
                Ok(Some(pb::RunMessage {
                    message: Some(pb::run_message::Message::Report(r)),
                })) => return Ok(convert::report_from(&r)?),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(convert::stream_cut_short(
                        Ok(()),
                        &self.peer,
                        "run",
                        "check `belay status`",
                    ));
                }
                Err(s) => {
                    return Err(convert::stream_cut_short(
                        Err(&s),
                        &self.peer,
                        "run",
                        "check `belay status`",
                    ));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl MigrationApi for MigrationClient {
    async fn status(&self, t: &str) -> Result<Vec<MigrationStatus>, ApiError> {
        let r = self
            .client
            .clone()
            .status(pb::StatusRequest { target: target(t) })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(r.get_ref()
            .migrations
            .iter()
            .map(convert::migration_status)
            .collect::<Result<_, _>>()?)
    }

    async fn plan(&self, t: &str, forward: &Target, sql: bool) -> Result<PlanView, ApiError> {
        let r = self
            .client
            .clone()
            .plan(pb::PlanRequest {
                target: target(t),
                forward: Some(convert::forward(forward)),
                sql,
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(convert::plan_from(r.get_ref())?)
    }

    async fn apply(
        &self,
        t: &str,
        forward: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        let stream = self
            .client
            .clone()
            .apply(convert::apply_request(t, forward, options))
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        self.drain(stream, sink).await
    }

    async fn undo(
        &self,
        t: &str,
        undo: &UndoTarget,
        deployment_id: Option<Uuid>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        let stream = self
            .client
            .clone()
            .undo(pb::UndoRequest {
                target: target(t),
                undo: Some(convert::undo(undo)),
                deployment_id: deployment_id.map(|u| u.to_string()).unwrap_or_default(),
            })
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        self.drain(stream, sink).await
    }

    async fn validate(&self, t: &str) -> Result<Validation, ApiError> {
        let r = self
            .client
            .clone()
            .validate(pb::ValidateRequest { target: target(t) })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(convert::validation_from(r.get_ref()))
    }

    async fn repair(
        &self,
        t: &str,
        scope: &belay_migrate::RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError> {
        let r = self
            .client
            .clone()
            .repair(convert::repair_request(target(t), scope))
            .await
            .map_err(|s| self.err(&s))?;
        Ok(convert::repair_actions_from(r.get_ref()))
    }

    async fn baseline(&self, t: &str, version: &str, description: &str) -> Result<(), ApiError> {
        self.client
            .clone()
            .baseline(pb::BaselineRequest {
                target: target(t),
                version: version.to_string(),
                description: description.to_string(),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(())
    }
}
