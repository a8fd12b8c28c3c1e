//! [`HistoryDeploymentLog`]: `belay_deploy::DeploymentLog` over the deployment log
//! tables `belay-history` keeps beside the history table, in the target database itself.

use belay_core::DatabaseUrl;
use belay_deploy::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord, LogError,
    NewDeployment, Step,
};
use belay_history::{
    DeploymentEnd, DeploymentEventRow, DeploymentRow, DeploymentStart, History, HistoryError,
    HistoryRow, NewDeploymentEvent, PrefixMatch, RowState,
};
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// `application_name` of the log's session, so it is easy to tell apart from the
/// migration's (`belay`) in `pg_stat_activity`.
pub const DEPLOY_LOG_APPLICATION: &str = "belay-deploy-log";

/// The longest a log write waits for a lock. Its statements only touch belay's own
/// deployment tables, so a wait means someone is altering them by hand; failing after a
/// few seconds is better than holding the deployment up.
const LOG_LOCK_TIMEOUT: &str = "5s";
const LOG_STATEMENT_TIMEOUT: &str = "30s";
const LOG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a prefix of a deployment id found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    None,
    One(Box<DeploymentRecord>),
    /// Several deployments start with it (some of their ids).
    Ambiguous(Vec<Uuid>),
}

/// The deployment log in the target database's history schema (`<schema>.deployments`,
/// `<schema>.deployment_events`).
///
/// Its writes are independent of the migration's transaction: the log owns its session
/// (one connection, opened on first use and reopened after a connection failure), never
/// the migration's, and every write is one autocommitted statement on belay's own tables.
/// So a migration that fails and rolls back still leaves its attempt on record, and a
/// write neither queues behind the migration's locks nor takes one the migration needs.
/// Concurrent appends to one deployment (in this process or another) get distinct,
/// gap-free `seq`s from the database. A failed write is returned as an error.
pub struct HistoryDeploymentLog {
    url: DatabaseUrl,
    history: History,
    session: tokio::sync::Mutex<Option<PgConnection>>,
}

impl std::fmt::Debug for HistoryDeploymentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryDeploymentLog")
            .field("url", &self.url)
            .field("schema", &self.history.schema())
            .finish_non_exhaustive()
    }
}

fn log_error(e: HistoryError) -> LogError {
    LogError(belay_core::redact_url(&e.to_string()))
}

fn step_from(text: &str) -> Result<Step, LogError> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        LogError(format!(
            "unknown deployment step {text:?} in the log; was it written by a newer belay?"
        ))
    })
}

fn record_from(row: DeploymentRow) -> Result<DeploymentRecord, LogError> {
    let s = row.start;
    let step = step_from(&s.step)?;
    let outcome = match row.end {
        Some(end) => Some(DeploymentOutcome {
            state: step_from(&end.state)?,
            finished_at: end.finished_at,
            failed_step: end.failed_step.as_deref().map(step_from).transpose()?,
            reason: end.reason,
            evidence: end.evidence,
            to_version: end.reached_version,
            backup_id: end.backup_id,
            applied: serde_json::from_value::<Vec<AppliedMigration>>(end.applied)
                .map_err(|e| LogError(format!("deployment {}: unreadable `applied`: {e}", s.id)))?,
        }),
        None => None,
    };
    Ok(DeploymentRecord {
        start: NewDeployment {
            id: s.id,
            target: s.target,
            started_at: s.started_at,
            environment: s.environment,
            requested_by: s.requested_by,
            release: s.release,
            from_version: s.from_version,
            to_version: s.to_version,
            policy: s.policy,
        },
        step,
        outcome,
    })
}

fn event_from(row: DeploymentEventRow) -> Result<DeployEvent, LogError> {
    Ok(DeployEvent {
        deployment_id: row.deployment_id,
        target: row.target,
        seq: u64::try_from(row.seq).unwrap_or(0),
        at: row.at,
        step: step_from(&row.step)?,
        kind: row.kind,
        message: row.message,
        payload: row.payload,
    })
}

impl HistoryDeploymentLog {
    /// The log in `schema` (the history schema, `belay` by default) of the database at
    /// `url`. Connects on first use.
    pub fn new(url: DatabaseUrl, schema: &str) -> Result<Self, LogError> {
        Ok(HistoryDeploymentLog {
            url,
            history: History::new(schema).map_err(log_error)?,
            session: tokio::sync::Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<PgConnection, LogError> {
        let fail = |reason: String| {
            LogError(format!(
                "deployment log: cannot connect to {}: {}",
                self.url,
                belay_core::redact_url(&reason)
            ))
        };
        let opts = sqlx::postgres::PgConnectOptions::from_str(self.url.expose())
            .map_err(|e| fail(e.to_string()))?
            .application_name(DEPLOY_LOG_APPLICATION)
            .options([
                ("lock_timeout", LOG_LOCK_TIMEOUT),
                ("statement_timeout", LOG_STATEMENT_TIMEOUT),
            ]);
        match tokio::time::timeout(LOG_CONNECT_TIMEOUT, PgConnection::connect_with(&opts)).await {
            Ok(Ok(conn)) => {
                belay_core::send_without_delay();
                Ok(conn)
            }
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!(
                "no connection within {}",
                belay_core::format_duration(LOG_CONNECT_TIMEOUT)
            ))),
        }
    }

    /// Runs `f` on the log's session, opening it when needed. A failure drops the
    /// session, so the next call starts on a fresh one rather than on a broken one.
    async fn with_session<T>(
        &self,
        f: impl AsyncFnOnce(&History, &mut PgConnection) -> Result<T, HistoryError>,
    ) -> Result<T, LogError> {
        let mut guard = self.session.lock().await;
        let mut conn = match guard.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let result = f(&self.history, &mut conn).await;
        if result.is_ok() {
            *guard = Some(conn);
        }
        result.map_err(log_error)
    }

    /// Opens the log's session now, so a caller can tell an unreachable database from a
    /// failing read.
    pub async fn connect_now(&self) -> Result<(), LogError> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        Ok(())
    }

    /// The history rows of migrations that failed or never finished (`failed`,
    /// `running`), in rank order: what a no-transaction migration leaves behind, with the
    /// deployment it belongs to.
    pub async fn unfinished_history_rows(&self) -> Result<Vec<HistoryRow>, LogError> {
        let rows = self.with_session(async |h, c| h.rows(c).await).await?;
        Ok(rows
            .into_iter()
            .filter(|r| matches!(r.state, RowState::Failed | RowState::Running))
            .collect())
    }

    /// The deployment whose id starts with `prefix` (the whole id works too).
    pub async fn find(&self, prefix: &str) -> Result<Found, LogError> {
        match self
            .with_session(async |h, c| h.deployment_by_prefix(c, prefix).await)
            .await?
        {
            PrefixMatch::None => Ok(Found::None),
            PrefixMatch::One(row) => Ok(Found::One(Box::new(record_from(*row)?))),
            PrefixMatch::Many(ids) => Ok(Found::Ambiguous(ids)),
        }
    }

    /// Newest first, only `target`'s when given.
    pub async fn list_for(
        &self,
        limit: usize,
        target: Option<&str>,
    ) -> Result<Vec<DeploymentRecord>, LogError> {
        self.with_session(async |h, c| h.recent_deployments(c, limit, target).await)
            .await?
            .into_iter()
            .map(record_from)
            .collect()
    }
}

/// An event as the log's table stores it: a `transition` moves the deployment's step.
fn new_event(event: DeployEvent) -> NewDeploymentEvent {
    NewDeploymentEvent {
        deployment_id: event.deployment_id,
        at: event.at,
        step: event.step.as_str().to_string(),
        moves_step: event.kind == "transition",
        kind: event.kind,
        message: event.message,
        payload: event.payload,
    }
}

#[async_trait::async_trait]
impl DeploymentLog for HistoryDeploymentLog {
    async fn begin(&self, d: &NewDeployment) -> Result<(), LogError> {
        let start = DeploymentStart {
            id: d.id,
            target: d.target.clone(),
            started_at: d.started_at,
            step: Step::Planned.as_str().to_string(),
            environment: d.environment.clone(),
            requested_by: d.requested_by.clone(),
            release: d.release.clone(),
            from_version: d.from_version.clone(),
            to_version: d.to_version.clone(),
            policy: d.policy.clone(),
        };
        // The pipeline records a deployment before the executor's `ensure` runs, so the
        // first deployment of a database creates the log's tables here.
        self.with_session(async |h, c| {
            h.ensure_deployments(c).await?;
            h.insert_deployment(c, &start).await
        })
        .await
    }

    async fn append(&self, event: DeployEvent) -> Result<u64, LogError> {
        let id = event.deployment_id;
        let new = new_event(event);
        match self
            .with_session(async |h, c| h.append_deployment_event(c, &new).await)
            .await?
        {
            Some(seq) => Ok(u64::try_from(seq).unwrap_or(0)),
            None => Err(LogError(format!(
                "no deployment {id} in the log: `begin` records it before its events"
            ))),
        }
    }

    async fn append_all(&self, events: Vec<DeployEvent>) -> Result<Vec<u64>, LogError> {
        let Some(id) = events.first().map(|e| e.deployment_id) else {
            return Ok(Vec::new());
        };
        if let Some(other) = events.iter().find(|e| e.deployment_id != id) {
            return Err(LogError(format!(
                "events of deployments {id} and {} in one write: append them apart",
                other.deployment_id
            )));
        }
        let new: Vec<NewDeploymentEvent> = events.into_iter().map(new_event).collect();
        match self
            .with_session(async |h, c| h.append_deployment_events(c, id, &new).await)
            .await?
        {
            Some(seqs) => Ok(seqs
                .into_iter()
                .map(|seq| u64::try_from(seq).unwrap_or(0))
                .collect()),
            None => Err(LogError(format!(
                "no deployment {id} in the log: `begin` records it before its events"
            ))),
        }
    }

    async fn finish(&self, id: Uuid, outcome: &DeploymentOutcome) -> Result<(), LogError> {
        let end = DeploymentEnd {
            state: outcome.state.as_str().to_string(),
            finished_at: outcome.finished_at,
            failed_step: outcome.failed_step.map(|s| s.as_str().to_string()),
            reason: outcome.reason.clone(),
            evidence: outcome.evidence.clone(),
            reached_version: outcome.to_version.clone(),
            backup_id: outcome.backup_id.clone(),
            applied: serde_json::to_value(&outcome.applied)
                .map_err(|e| LogError(format!("deployment {id}: `applied`: {e}")))?,
        };
        if self
            .with_session(async |h, c| h.finish_deployment(c, id, &end).await)
            .await?
        {
            Ok(())
        } else {
            Err(LogError(format!(
                "no deployment {id} in the log: `begin` records it before it can finish"
            )))
        }
    }

    async fn get(&self, id: Uuid) -> Result<Option<DeploymentRecord>, LogError> {
        self.with_session(async |h, c| h.deployment(c, id).await)
            .await?
            .map(record_from)
            .transpose()
    }

    async fn events(&self, id: Uuid) -> Result<Vec<DeployEvent>, LogError> {
        self.with_session(async |h, c| h.deployment_events(c, id).await)
            .await?
            .into_iter()
            .map(event_from)
            .collect()
    }

    async fn list(&self, limit: usize) -> Result<Vec<DeploymentRecord>, LogError> {
        self.list_for(limit, None).await
    }
}

/// One run of one migration script inside a deployment, read back from its `migration`
/// events (the executor's events, serialized as the payload).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Attempt {
    pub version: Option<String>,
    pub script: String,
    /// `forward`, `undo`, `repeatable`.
    pub direction: String,
    /// `succeeded`, `failed`, or `interrupted` (started, never ended on record).
    pub outcome: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The error as the executor reported it (with `file:line`).
    pub error: Option<String>,
    /// Lock timeouts and lock guard trips on the way.
    pub retries: u32,
}

/// The attempts recorded in `events`, in the order they started. A `failed` event is
/// an attempt even without its `started` (the executor fails some scripts before
/// running them).
pub fn attempts(events: &[DeployEvent]) -> Vec<Attempt> {
    let mut out: Vec<Attempt> = Vec::new();
    let str_of =
        |p: &serde_json::Value, k: &str| p.get(k).and_then(|v| v.as_str()).map(String::from);
    for e in events.iter().filter(|e| e.kind == "migration") {
        let p = &e.payload;
        let Some(script) = str_of(p, "script") else {
            continue;
        };
        let open = out
            .iter()
            .rposition(|a| a.script == script && a.outcome == "interrupted");
        match p.get("event").and_then(|v| v.as_str()) {
            Some("started") => out.push(Attempt {
                version: str_of(p, "version"),
                script,
                direction: str_of(p, "direction").unwrap_or_default(),
                outcome: "interrupted".into(),
                started_at: Some(e.at),
                ended_at: None,
                error: None,
                retries: 0,
            }),
            Some("lock_timeout" | "lock_guard_tripped") => {
                if let Some(i) = open {
                    out[i].retries += 1;
                }
            }
            Some(end @ ("succeeded" | "failed")) => {
                let i = match open {
                    Some(i) => i,
                    None => {
                        out.push(Attempt {
                            version: str_of(p, "version"),
                            script,
                            direction: str_of(p, "direction").unwrap_or_default(),
                            outcome: "interrupted".into(),
                            started_at: None,
                            ended_at: None,
                            error: None,
                            retries: 0,
                        });
                        out.len() - 1
                    }
                };
                let a = &mut out[i];
                a.outcome = end.to_string();
                a.ended_at = Some(e.at);
                a.error = str_of(p, "error");
            }
            _ => {}
        }
    }
    out
}
