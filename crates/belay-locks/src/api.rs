//! The lock monitor as a capability every caller sees the same way: [`LockMonitorApi`],
//! implemented here in-process over target URLs ([`LocalLocks`]), over gRPC by
//! `belay_rpc::LockMonitorClient`, and by the controller's router.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use sqlx::{Connection, PgConnection};
use tokio_stream::{Stream, StreamExt};
use tracing::{Instrument, info_span};

use crate::model::{LockNode, LockSnapshot, SnapshotOptions};
use crate::watch::{MONITOR_APPLICATION, connect};
use crate::{LocksError, snapshot, watch};

/// What a caller asks of the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOptions {
    /// Thresholds of the sample. `exclude_pid` is a local notion (a pid of the caller's
    /// own session) and does not travel over the wire.
    pub snapshot: SnapshotOptions,
    /// Report every database of the server; otherwise only what concerns the target's
    /// database (trees with a session in it, its sessions; replication is the server's).
    pub all_databases: bool,
    /// Time between samples of a watch.
    pub period: Duration,
}

/// Default time between samples of a watch: one query per sample. A new lock queue does not
/// wait for it: the watch's probe ([`crate::PROBE_PERIOD`]) samples at once when a wait
/// begins (`cargo xtask bench locks` measures the latency, and what watching costs pgbench).
pub const DEFAULT_WATCH_PERIOD: Duration = Duration::from_millis(200);

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            snapshot: SnapshotOptions::default(),
            all_databases: false,
            period: DEFAULT_WATCH_PERIOD,
        }
    }
}

/// Snapshots of a watch. An `Err` item is a sample that failed; the watch goes on. A
/// stream that ends right after an `Err` ended because of it (the connection to a
/// remote monitor broke).
pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<LockSnapshot, ApiError>> + Send>>;

/// Live lock monitoring of a target, local or remote alike.
#[async_trait::async_trait]
pub trait LockMonitorApi: Send + Sync {
    /// One sample of the target's lock and activity state.
    async fn snapshot(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<LockSnapshot, ApiError>;

    /// A sample every `options.period` until the stream is dropped. Fails at once when
    /// the target is unknown or cannot be reached at all.
    async fn watch(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<SnapshotStream, ApiError>;
}

impl From<LocksError> for ApiError {
    fn from(e: LocksError) -> Self {
        let kind = if e.is_connection() {
            ErrorKind::Unavailable
        } else {
            ErrorKind::Internal
        };
        ApiError::new(kind, belay_core::redact_url(&e.to_string()))
    }
}

/// Keeps what concerns `database` (`None`: everything): trees with a session in it, and
/// its long-running and idle-in-transaction sessions. Replication is the server's.
pub fn filtered(mut s: LockSnapshot, database: Option<&str>) -> LockSnapshot {
    let Some(db) = database else { return s };
    fn touches(n: &LockNode, db: &str) -> bool {
        n.database.as_deref() == Some(db) || n.children.iter().any(|c| touches(c, db))
    }
    s.trees.retain(|t| touches(t, db));
    s.long_running.retain(|x| x.database.as_deref() == Some(db));
    s.pending_ddl.retain(|p| {
        p.blockers
            .iter()
            .any(|b| b.session.database.as_deref() == Some(db))
    });
    s.idle_in_transaction
        .retain(|x| x.database.as_deref() == Some(db));
    s
}

/// [`LockMonitorApi`] in-process, over the URLs of named targets (the CLI's local mode,
/// the agent's own targets).
#[derive(Debug, Clone, Default)]
pub struct LocalLocks {
    targets: BTreeMap<String, DatabaseUrl>,
}

impl LocalLocks {
    pub fn new(targets: impl IntoIterator<Item = (String, DatabaseUrl)>) -> Self {
        LocalLocks {
            targets: targets.into_iter().collect(),
        }
    }

    fn url(&self, target: &str) -> Result<&DatabaseUrl, ApiError> {
        self.targets.get(target).ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownTarget,
                format!(
                    "unknown target {target:?}; known: {}",
                    self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}

/// The database whose sessions the report keeps (`None`: all of them).
async fn scope(conn: &mut PgConnection, all: bool) -> Result<Option<String>, ApiError> {
    if all {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(conn)
        .await
        .map(Some)
        .map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("cannot read the current database: {e}"),
            )
        })
}

#[async_trait::async_trait]
impl LockMonitorApi for LocalLocks {
    async fn snapshot(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<LockSnapshot, ApiError> {
        let url = self.url(target)?;
        async {
            let mut conn = connect(url, MONITOR_APPLICATION).await?;
            let result = async {
                let db = scope(&mut conn, options.all_databases).await?;
                let snap = snapshot(&mut conn, &options.snapshot).await?;
                Ok(filtered(snap, db.as_deref()))
            }
            .await;
            // Best effort: the server notices a dropped socket anyway.
            let _ = conn.close().await;
            result
        }
        .instrument(info_span!("lock_snapshot", target = %target))
        .await
    }

    async fn watch(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<SnapshotStream, ApiError> {
        let url = self.url(target)?;
        if options.period.is_zero() {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "the watch period must be greater than zero",
            ));
        }
        // Connect once up front: an unreachable target is an error, not a stream of them.
        let db = async {
            let mut conn = connect(url, MONITOR_APPLICATION).await?;
            let db = scope(&mut conn, options.all_databases).await;
            let _ = conn.close().await;
            db
        }
        .instrument(info_span!("lock_watch", target = %target))
        .await?;
        let stream = watch(url.clone(), options.period, options.snapshot.clone()).map(move |r| {
            r.map(|s| filtered(s, db.as_deref()))
                .map_err(ApiError::from)
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: i32, db: &str, children: Vec<LockNode>) -> LockNode {
        LockNode {
            pid,
            user: None,
            application: None,
            database: Some(db.into()),
            state: None,
            wait_event: None,
            mode: None,
            lock_type: None,
            relation: None,
            waiting_ms: None,
            xact_ms: None,
            query: None,
            blocked_by: vec![],
            in_cycle: false,
            children,
        }
    }

    #[test]
    fn keeps_trees_of_the_target_database() {
        let s = LockSnapshot {
            at: chrono::Utc::now(),
            trees: vec![
                node(1, "shop", vec![node(2, "shop", vec![])]),
                node(3, "other", vec![node(4, "other", vec![])]),
                // A tree rooted elsewhere that holds up a session of ours is ours too.
                node(5, "other", vec![node(6, "shop", vec![])]),
            ],
            pending_ddl: vec![],
            long_running: vec![],
            idle_in_transaction: vec![],
            replication: vec![],
        };
        let f = filtered(s.clone(), Some("shop"));
        assert_eq!(
            f.trees.iter().map(|t| t.pid).collect::<Vec<_>>(),
            vec![1, 5]
        );
        assert_eq!(filtered(s, None).trees.len(), 3);
    }

    #[tokio::test]
    async fn unknown_targets_are_named() {
        let api = LocalLocks::default();
        let err = api
            .snapshot("nope", &MonitorOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnknownTarget);
        assert!(err.message.contains("\"nope\""), "{err}");
    }

    #[test]
    fn connection_failures_are_unavailable_and_redacted() {
        // A driver message may carry the URL it was given, password and all.
        let e = LocksError::Connect {
            url: "postgres://app:***@db/shop".into(),
            source: sqlx::Error::Configuration(
                "postgres://app:secret@db/shop: connection refused".into(),
            ),
        };
        assert!(e.to_string().contains("secret"), "the case under test");
        let api = ApiError::from(e);
        assert_eq!(api.kind, ErrorKind::Unavailable);
        assert!(!api.message.contains("secret"), "{api}");
        assert!(api.message.contains("postgres://app:***@db/shop"), "{api}");
        let e = LocksError::Task("boom".into());
        assert_eq!(ApiError::from(e).kind, ErrorKind::Internal);
    }
}
