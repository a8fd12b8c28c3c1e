//! `belay.v1.LockMonitorService`: conversions, the server adapter over any
//! [`LockMonitorApi`] and the client implementing it over gRPC.

use crate::Connection;
use crate::convert::{self, DecodeError};
use belay_auth::MaybeTokenAttach;
use belay_core::{ApiError, ErrorKind};
use belay_locks::{
    LockMonitorApi, LockNode, LockSnapshot, MonitorOptions, PendingBlocker, PendingDdl, ReplicaLag,
    SessionInfo, SnapshotOptions, SnapshotStream,
};
use belay_proto::v1 as pb;
use pb::lock_monitor_service_client::LockMonitorServiceClient;
use pb::lock_monitor_service_server::{LockMonitorService, LockMonitorServiceServer};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

// ---- conversions ----

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn node(n: &LockNode) -> pb::LockNode {
    pb::LockNode {
        pid: n.pid,
        user: n.user.clone(),
        application: n.application.clone(),
        state: n.state.clone(),
        wait_event: n.wait_event.clone(),
        mode: n.mode.clone(),
        relation: n.relation.clone(),
        waiting_ms: n.waiting_ms,
        query: n.query.clone(),
        children: n.children.iter().map(node).collect(),
        database: n.database.clone(),
        lock_type: n.lock_type.clone(),
        xact_ms: n.xact_ms,
        blocked_by: n.blocked_by.clone(),
        in_cycle: n.in_cycle,
    }
}

fn node_from(n: &pb::LockNode) -> LockNode {
    LockNode {
        pid: n.pid,
        user: n.user.clone(),
        application: n.application.clone(),
        database: n.database.clone(),
        state: n.state.clone(),
        wait_event: n.wait_event.clone(),
        mode: n.mode.clone(),
        lock_type: n.lock_type.clone(),
        relation: n.relation.clone(),
        waiting_ms: n.waiting_ms,
        xact_ms: n.xact_ms,
        query: n.query.clone(),
        blocked_by: n.blocked_by.clone(),
        in_cycle: n.in_cycle,
        children: n.children.iter().map(node_from).collect(),
    }
}

fn session(s: &SessionInfo) -> pb::SessionInfo {
    pb::SessionInfo {
        pid: s.pid,
        user: s.user.clone(),
        application: s.application.clone(),
        query_ms: s.query_ms,
        query: s.query.clone(),
        database: s.database.clone(),
        client_addr: s.client_addr.clone(),
        state: s.state.clone(),
        wait_event: s.wait_event.clone(),
        backend_type: s.backend_type.clone(),
        xact_ms: s.xact_ms,
        state_ms: s.state_ms,
    }
}

fn session_from(s: &pb::SessionInfo) -> SessionInfo {
    SessionInfo {
        pid: s.pid,
        user: s.user.clone(),
        application: s.application.clone(),
        database: s.database.clone(),
        client_addr: s.client_addr.clone(),
        state: s.state.clone(),
        wait_event: s.wait_event.clone(),
        backend_type: s.backend_type.clone(),
        query_ms: s.query_ms,
        xact_ms: s.xact_ms,
        state_ms: s.state_ms,
        query: s.query.clone(),
    }
}

fn replica(r: &ReplicaLag) -> pb::ReplicaLag {
    pb::ReplicaLag {
        client_addr: r.client_addr.clone(),
        state: r.state.clone(),
        pid: r.pid,
        application: r.application.clone(),
        sync_state: r.sync_state.clone(),
        write_lag_ms: r.write_lag_ms,
        flush_lag_ms: r.flush_lag_ms,
        replay_lag_ms: r.replay_lag_ms,
        replay_lag_bytes: r.replay_lag_bytes,
    }
}

fn replica_from(r: &pb::ReplicaLag) -> ReplicaLag {
    ReplicaLag {
        pid: r.pid,
        application: r.application.clone(),
        client_addr: r.client_addr.clone(),
        state: r.state.clone(),
        sync_state: r.sync_state.clone(),
        write_lag_ms: r.write_lag_ms,
        flush_lag_ms: r.flush_lag_ms,
        replay_lag_ms: r.replay_lag_ms,
        replay_lag_bytes: r.replay_lag_bytes,
    }
}

pub fn snapshot(s: &LockSnapshot) -> pb::LockSnapshot {
    pb::LockSnapshot {
        at: Some(convert::timestamp(s.at)),
        trees: s.trees.iter().map(node).collect(),
        long_running: s.long_running.iter().map(session).collect(),
        idle_in_transaction: s.idle_in_transaction.iter().map(session).collect(),
        replication: s.replication.iter().map(replica).collect(),
        pending_ddl: s
            .pending_ddl
            .iter()
            .map(|p| pb::PendingDdl {
                migration_pid: p.migration_pid,
                guard_pid: p.guard_pid,
                blockers: p
                    .blockers
                    .iter()
                    .map(|b| pb::PendingBlocker {
                        session: Some(session(&b.session)),
                        holds: b.holds.clone().unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn snapshot_from(s: &pb::LockSnapshot) -> Result<LockSnapshot, DecodeError> {
    let at = s.at.as_ref().ok_or_else(|| DecodeError {
        what: "lock snapshot",
        problem: "no sample time".into(),
    })?;
    Ok(LockSnapshot {
        at: convert::from_timestamp(at)?,
        trees: s.trees.iter().map(node_from).collect(),
        long_running: s.long_running.iter().map(session_from).collect(),
        idle_in_transaction: s.idle_in_transaction.iter().map(session_from).collect(),
        replication: s.replication.iter().map(replica_from).collect(),
        pending_ddl: s
            .pending_ddl
            .iter()
            .map(|p| PendingDdl {
                migration_pid: p.migration_pid,
                guard_pid: p.guard_pid,
                blockers: p
                    .blockers
                    .iter()
                    .filter_map(|b| {
                        Some(PendingBlocker {
                            session: session_from(b.session.as_ref()?),
                            holds: (!b.holds.is_empty()).then(|| b.holds.clone()),
                        })
                    })
                    .collect(),
            })
            .collect(),
    })
}

fn snapshot_options(
    min_wait_ms: u64,
    long_running_ms: Option<u64>,
    idle_ms: Option<u64>,
) -> SnapshotOptions {
    let defaults = SnapshotOptions::default();
    SnapshotOptions {
        min_wait: Duration::from_millis(min_wait_ms),
        long_running: long_running_ms.map_or(defaults.long_running, Duration::from_millis),
        idle_in_transaction: idle_ms.map_or(defaults.idle_in_transaction, Duration::from_millis),
        // A pid of the caller's own session means nothing on the agent's server.
        exclude_pid: None,
    }
}

pub fn snapshot_request(target: &str, o: &MonitorOptions) -> pb::LockSnapshotRequest {
    pb::LockSnapshotRequest {
        target: Some(pb::Target {
            name: target.to_string(),
        }),
        min_wait_ms: millis(o.snapshot.min_wait),
        long_running_ms: Some(millis(o.snapshot.long_running)),
        idle_in_transaction_ms: Some(millis(o.snapshot.idle_in_transaction)),
        all_databases: o.all_databases,
    }
}

pub fn snapshot_request_from(r: &pb::LockSnapshotRequest) -> MonitorOptions {
    MonitorOptions {
        snapshot: snapshot_options(r.min_wait_ms, r.long_running_ms, r.idle_in_transaction_ms),
        all_databases: r.all_databases,
        ..MonitorOptions::default()
    }
}

pub fn watch_request(target: &str, o: &MonitorOptions) -> pb::LockWatchRequest {
    pb::LockWatchRequest {
        target: Some(pb::Target {
            name: target.to_string(),
        }),
        min_wait_ms: millis(o.snapshot.min_wait),
        period_ms: millis(o.period),
        long_running_ms: Some(millis(o.snapshot.long_running)),
        idle_in_transaction_ms: Some(millis(o.snapshot.idle_in_transaction)),
        all_databases: o.all_databases,
    }
}

pub fn watch_request_from(r: &pb::LockWatchRequest) -> MonitorOptions {
    MonitorOptions {
        snapshot: snapshot_options(r.min_wait_ms, r.long_running_ms, r.idle_in_transaction_ms),
        all_databases: r.all_databases,
        period: if r.period_ms == 0 {
            MonitorOptions::default().period
        } else {
            Duration::from_millis(r.period_ms)
        },
    }
}

/// One item of a watch on the wire: a snapshot, or a sample that failed.
pub fn watch_message(item: &Result<LockSnapshot, ApiError>) -> pb::LockWatchMessage {
    use pb::lock_watch_message::Message;
    pb::LockWatchMessage {
        message: Some(match item {
            Ok(s) => Message::Snapshot(snapshot(s)),
            Err(e) => Message::Error(pb::LockSampleError {
                reason: convert::reason_of(e.kind) as i32,
                message: e.message.clone(),
            }),
        }),
    }
}

pub fn watch_message_from(m: &pb::LockWatchMessage) -> Result<LockSnapshot, ApiError> {
    use pb::lock_watch_message::Message;
    match &m.message {
        Some(Message::Snapshot(s)) => Ok(snapshot_from(s)?),
        Some(Message::Error(e)) => {
            let kind = pb::ErrorReason::try_from(e.reason)
                .ok()
                .and_then(convert::kind_of)
                .unwrap_or(ErrorKind::Internal);
            Err(ApiError::new(kind, e.message.clone()))
        }
        None => Err(DecodeError {
            what: "lock watch message",
            problem: "neither a snapshot nor an error".into(),
        }
        .into()),
    }
}

// ---- server ----

/// The shortest watch period the server accepts. Each sample is one query on the target's
/// server, run by the agent beside a production database on behalf of whoever called; a
/// faster watch reports nothing sooner that matters (a lock queue costs the application
/// from `lock_timeout`, 100 ms, up) and only adds load. Refused rather than clamped, so a
/// caller never reads samples at a rate it did not ask for. In-process callers (the CLI's
/// local mode, on the operator's own authority) are not held to it.
pub const MIN_WATCH_PERIOD: Duration = Duration::from_millis(50);

/// Refuses a watch period under [`MIN_WATCH_PERIOD`], naming the minimum.
fn check_watch_period(period: Duration) -> Result<(), Status> {
    if period < MIN_WATCH_PERIOD {
        return Err(convert::status_from(&ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "the watch period must be at least {} (asked for {})",
                belay_core::format_duration(MIN_WATCH_PERIOD),
                belay_core::format_duration(period)
            ),
        )));
    }
    Ok(())
}

/// The gRPC face of a lock monitor: the agent serves its targets through it, the
/// controller its router to agents.
#[derive(Clone)]
pub struct LockMonitorGrpc {
    api: Arc<dyn LockMonitorApi>,
}

impl std::fmt::Debug for LockMonitorGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockMonitorGrpc").finish_non_exhaustive()
    }
}

impl LockMonitorGrpc {
    pub fn new(api: Arc<dyn LockMonitorApi>) -> Self {
        LockMonitorGrpc { api }
    }

    pub fn into_service(self) -> LockMonitorServiceServer<Self> {
        LockMonitorServiceServer::new(self)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::LockWatchMessage, Status>> + Send>>;

#[tonic::async_trait]
impl LockMonitorService for LockMonitorGrpc {
    async fn snapshot(
        &self,
        req: Request<pb::LockSnapshotRequest>,
    ) -> Result<Response<pb::LockSnapshot>, Status> {
        let r = req.get_ref();
        let target = convert::target_name(r.target.as_ref())?;
        let options = snapshot_request_from(r);
        let s = self
            .api
            .snapshot(&target, &options)
            .instrument(info_span!("lock_snapshot_rpc", target = %target))
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(snapshot(&s)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::LockWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.get_ref();
        let target = convert::target_name(r.target.as_ref())?;
        let options = watch_request_from(r);
        check_watch_period(options.period)?;
        let stream = self
            .api
            .watch(&target, &options)
            .instrument(info_span!("lock_watch_rpc", target = %target))
            .await
            .map_err(|e| convert::status_from(&e))?;
        // Dropped when the caller goes away, which stops the sampling behind it.
        Ok(Response::new(Box::pin(
            stream.map(|item| Ok(watch_message(&item))),
        )))
    }
}

// ---- client ----

/// [`LockMonitorApi`] over gRPC: the CLI's remote mode and the controller's calls to agents.
#[derive(Clone, Debug)]
pub struct LockMonitorClient {
    client: LockMonitorServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl LockMonitorClient {
    pub fn new(conn: &Connection) -> Self {
        LockMonitorClient {
            client: LockMonitorServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }
}

#[async_trait::async_trait]
impl LockMonitorApi for LockMonitorClient {
    async fn snapshot(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<LockSnapshot, ApiError> {
        let r = self
            .client
            .clone()
            .snapshot(snapshot_request(target, options))
            .await
            .map_err(|s| convert::api_error_from(&s, &self.peer))?;
        Ok(snapshot_from(r.get_ref())?)
    }

    async fn watch(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<SnapshotStream, ApiError> {
        let stream = self
            .client
            .clone()
            .watch(watch_request(target, options))
            .await
            .map_err(|s| convert::api_error_from(&s, &self.peer))?
            .into_inner();
        let peer = self.peer.clone();
        Ok(Box::pin(stream.map(move |m| match m {
            Ok(m) => watch_message_from(&m),
            Err(s) => Err(convert::api_error_from(&s, &peer)),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn full_node(pid: i32, waiting: Option<u64>, children: Vec<LockNode>) -> LockNode {
        LockNode {
            pid,
            user: Some("app".into()),
            // An empty application name is not an absent one.
            application: Some(String::new()),
            database: Some("shop".into()),
            state: Some("active".into()),
            wait_event: waiting.map(|_| "Lock:relation".into()),
            mode: Some("AccessExclusiveLock".into()),
            lock_type: Some("relation".into()),
            relation: Some("public.orders".into()),
            waiting_ms: waiting,
            xact_ms: Some(1_234),
            query: Some("ALTER TABLE orders ADD COLUMN x int".into()),
            blocked_by: waiting.map(|_| vec![1]).unwrap_or_default(),
            in_cycle: pid == 1,
            children,
        }
    }

    fn sample() -> LockSnapshot {
        let s = |pid| SessionInfo {
            pid,
            user: Some("app".into()),
            application: None,
            database: Some("shop".into()),
            client_addr: Some("10.0.0.7".into()),
            state: Some("idle in transaction".into()),
            wait_event: Some("Client:ClientRead".into()),
            backend_type: Some("client backend".into()),
            query_ms: Some(90_000),
            xact_ms: Some(91_000),
            state_ms: None,
            query: Some("SELECT 1".into()),
        };
        LockSnapshot {
            at: chrono::Utc
                .timestamp_opt(1_700_000_000, 123_456_000)
                .single()
                .unwrap(),
            trees: vec![full_node(
                1,
                None,
                vec![full_node(2, Some(0), vec![full_node(3, Some(700), vec![])])],
            )],
            pending_ddl: vec![],
            long_running: vec![s(4)],
            idle_in_transaction: vec![s(5), s(6)],
            replication: vec![ReplicaLag {
                pid: 7,
                application: Some("walreceiver".into()),
                client_addr: None,
                state: Some("streaming".into()),
                sync_state: Some("async".into()),
                write_lag_ms: Some(1),
                flush_lag_ms: None,
                replay_lag_ms: Some(3),
                replay_lag_bytes: Some(-1),
            }],
        }
    }

    #[test]
    fn snapshots_round_trip_exactly() {
        let s = sample();
        let back = snapshot_from(&snapshot(&s)).unwrap();
        assert_eq!(back, s);
        // The JSON the CLI prints is the same on both sides of the wire.
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        let mut no_time = snapshot(&s);
        no_time.at = None;
        assert!(snapshot_from(&no_time).is_err());
    }

    #[test]
    fn options_round_trip_and_defaults_fill_gaps() {
        let o = MonitorOptions {
            snapshot: SnapshotOptions {
                min_wait: Duration::from_millis(250),
                long_running: Duration::ZERO,
                idle_in_transaction: Duration::from_secs(5),
                exclude_pid: None,
            },
            all_databases: true,
            period: Duration::from_millis(300),
        };
        let back = snapshot_request_from(&snapshot_request("t", &o));
        assert_eq!(back.snapshot, o.snapshot);
        assert!(back.all_databases);
        assert_eq!(watch_request_from(&watch_request("t", &o)), o);
        let bare = watch_request_from(&pb::LockWatchRequest::default());
        assert_eq!(bare, MonitorOptions::default());
    }

    /// A monitor that counts the watches it is asked for and streams nothing.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl LockMonitorApi for Counting {
        async fn snapshot(&self, _: &str, _: &MonitorOptions) -> Result<LockSnapshot, ApiError> {
            Ok(sample())
        }
        async fn watch(&self, _: &str, _: &MonitorOptions) -> Result<SnapshotStream, ApiError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Box::pin(tokio_stream::empty()))
        }
    }

    #[tokio::test]
    async fn watches_faster_than_the_minimum_are_refused_naming_it() {
        let api = Arc::new(Counting::default());
        let grpc = LockMonitorGrpc::new(api.clone());
        let ask = |ms: u64| {
            let o = MonitorOptions {
                period: Duration::from_millis(ms),
                ..MonitorOptions::default()
            };
            Request::new(watch_request("t", &o))
        };
        let err = LockMonitorService::watch(&grpc, ask(10))
            .await
            .err()
            .expect("a 10ms watch is refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at least 50ms"), "{err:?}");
        assert!(err.message().contains("asked for 10ms"), "{err:?}");
        let err = convert::api_error_from(&err, &crate::Peer::new("agent", false));
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert_eq!(api.0.load(std::sync::atomic::Ordering::Relaxed), 0);

        // The minimum itself, and an unset period (the default, 200ms), are served.
        for ms in [50, 0] {
            assert!(LockMonitorService::watch(&grpc, ask(ms)).await.is_ok());
        }
        assert_eq!(api.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn watch_items_keep_errors_and_their_class() {
        let ok = watch_message_from(&watch_message(&Ok(sample()))).unwrap();
        assert_eq!(ok, sample());
        let err = ApiError::new(ErrorKind::Unavailable, "cannot connect to postgres://db");
        let back = watch_message_from(&watch_message(&Err(err))).unwrap_err();
        assert_eq!(back.kind, ErrorKind::Unavailable);
        assert_eq!(back.message, "cannot connect to postgres://db");
        let empty = watch_message_from(&pb::LockWatchMessage { message: None });
        assert!(empty.is_err());
    }
}
