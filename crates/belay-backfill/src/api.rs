//! One API for backfills, local or remote: [`BackfillApi`], served by the agent for its
//! targets ([`LocalBackfills`], beside the database) and by the controller (routed to the
//! owning agent), called by the CLI's remote mode over gRPC. Events are callbacks, as
//! [`Backfill::run`]'s progress is: the caller renders them.

use crate::{Backfill, BackfillError, BackfillSpec, ErrorKind, Limits, Progress, Start, Summary};
use belay_core::{ApiError, DatabaseUrl};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A backfill as a caller asks for it. The limits left `None` are the target's own
/// (`[execution]` in its configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillRequest {
    pub table: String,
    pub set: String,
    pub filter: Option<String>,
    pub name: Option<String>,
    pub batch_size: u32,
    pub sleep: Duration,
    pub restart: bool,
    pub lock_timeout: Option<Duration>,
    pub statement_timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub max_lock_wait: Option<Duration>,
}

/// A backfill resolved and holding its run lock, before its first batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub name: String,
    /// The table as PostgreSQL displays it.
    pub table: String,
    pub key_columns: Vec<String>,
    pub estimated_rows: Option<u64>,
    pub progress_schema: String,
    pub start: Start,
    /// Keys walked by earlier runs.
    pub rows_examined: u64,
}

/// What a running backfill reports: [`Started`] once, then its [`Progress`].
#[derive(Debug, Clone, PartialEq)]
pub enum BackfillEvent {
    Started(Started),
    Progress(Progress),
}

pub type BackfillSink = Arc<dyn Fn(&BackfillEvent) + Send + Sync>;

#[async_trait::async_trait]
pub trait BackfillApi: Send + Sync {
    /// Runs the backfill until it is done, `stop` is cancelled (the batch in flight
    /// commits first) or a batch fails. A stopped run is not an error: its summary says
    /// `done: false`, and the same request resumes it.
    async fn run(
        &self,
        target: &str,
        request: BackfillRequest,
        stop: CancellationToken,
        events: BackfillSink,
    ) -> Result<Summary, ApiError>;

    /// Asks the running backfill `name` to stop after the batch in flight; its `run` then
    /// returns. `NotFound` when none of that name runs on the target.
    async fn stop(&self, target: &str, name: &str) -> Result<(), ApiError>;
}

/// The class every caller sees, from the backfill's own.
pub fn api_error(e: &BackfillError) -> ApiError {
    let kind = match e.kind() {
        ErrorKind::Usage => belay_core::ErrorKind::InvalidArgument,
        ErrorKind::Refused => belay_core::ErrorKind::Refused,
        ErrorKind::Busy => belay_core::ErrorKind::Busy,
        ErrorKind::Unavailable => belay_core::ErrorKind::Unavailable,
        ErrorKind::Failed => belay_core::ErrorKind::MigrationFailed,
        ErrorKind::Internal => belay_core::ErrorKind::Internal,
    };
    ApiError::new(kind, e.to_string())
}

#[derive(Debug, Clone)]
struct TargetBackfills {
    url: DatabaseUrl,
    progress_schema: String,
    limits: Limits,
}

/// Backfills of the targets this process reaches directly (the agent's).
#[derive(Debug, Clone, Default)]
pub struct LocalBackfills {
    targets: BTreeMap<String, TargetBackfills>,
    /// The stop of each running backfill, by (target, name), for [`BackfillApi::stop`].
    running: Arc<Mutex<HashMap<(String, String), CancellationToken>>>,
    /// Parent of every run's stop: [`LocalBackfills::shutdown`] stops them all.
    shutdown: CancellationToken,
}

impl LocalBackfills {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `name`: its progress table lives in `progress_schema` (the target's history
    /// schema) and `limits` apply where a request names none.
    pub fn with_target(
        mut self,
        name: impl Into<String>,
        url: DatabaseUrl,
        progress_schema: impl Into<String>,
        limits: Limits,
    ) -> Self {
        self.targets.insert(
            name.into(),
            TargetBackfills {
                url,
                progress_schema: progress_schema.into(),
                limits,
            },
        );
        self
    }

    /// Stops every running backfill after its batch in flight (the process is stopping);
    /// backfills asked for later stop before their first batch.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    fn target(&self, target: &str) -> Result<&TargetBackfills, ApiError> {
        self.targets.get(target).ok_or_else(|| {
            ApiError::new(
                belay_core::ErrorKind::UnknownTarget,
                format!(
                    "unknown target {target:?}: this agent serves {}",
                    if self.targets.is_empty() {
                        "no targets".to_string()
                    } else {
                        self.targets
                            .keys()
                            .map(|k| format!("{k:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            )
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), CancellationToken>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl BackfillApi for LocalBackfills {
    async fn run(
        &self,
        target: &str,
        request: BackfillRequest,
        stop: CancellationToken,
        events: BackfillSink,
    ) -> Result<Summary, ApiError> {
        let span = tracing::info_span!("backfill_run", target = %target, table = %request.table);
        async {
            let t = self.target(target)?;
            let defaults = &t.limits;
            let spec = BackfillSpec {
                table: request.table,
                set: request.set,
                filter: request.filter,
                name: request.name,
                batch_size: request.batch_size,
                sleep: request.sleep,
                restart: request.restart,
                progress_schema: t.progress_schema.clone(),
                limits: Limits {
                    lock_timeout: request.lock_timeout.unwrap_or(defaults.lock_timeout),
                    statement_timeout: request
                        .statement_timeout
                        .unwrap_or(defaults.statement_timeout),
                    max_attempts: request.max_attempts.unwrap_or(defaults.max_attempts),
                    max_lock_wait: request.max_lock_wait.unwrap_or(defaults.max_lock_wait),
                    ..defaults.clone()
                },
            };
            let mut conn = crate::connect(&t.url).await.map_err(|e| api_error(&e))?;
            let mut bf = Backfill::prepare(&mut conn, spec)
                .await
                .map_err(|e| api_error(&e))?
                .for_target(target);
            if matches!(bf.start(), Start::AlreadyDone { .. }) {
                events(&BackfillEvent::Started(bf.started(&t.progress_schema)));
                let _ = sqlx::Connection::close(conn).await;
                return Ok(bf.summary());
            }
            // This run's stop: the caller's, this process's shutdown, or `stop(name)`;
            // registered before the caller learns the name, so a `stop` it sends at once
            // finds it.
            let token = self.shutdown.child_token();
            let key = (target.to_string(), bf.name().to_string());
            self.running().insert(key.clone(), token.clone());
            events(&BackfillEvent::Started(bf.started(&t.progress_schema)));
            let link = {
                let (caller, token) = (stop.clone(), token.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = caller.cancelled() => token.cancel(),
                        () = token.cancelled() => {}
                    }
                })
            };
            let progress = |p: &Progress| events(&BackfillEvent::Progress(p.clone()));
            let ran = bf.run(&mut conn, &token, &progress).await;
            link.abort();
            self.running().remove(&key);
            let _ = sqlx::Connection::close(conn).await;
            ran.map_err(|e| api_error(&e))
        }
        .instrument(span)
        .await
    }

    async fn stop(&self, target: &str, name: &str) -> Result<(), ApiError> {
        self.target(target)?;
        match self.running().get(&(target.to_string(), name.to_string())) {
            Some(token) => {
                token.cancel();
                Ok(())
            }
            None => Err(ApiError::new(
                belay_core::ErrorKind::NotFound,
                format!("no backfill {name:?} is running on target {target:?}"),
            )),
        }
    }
}
