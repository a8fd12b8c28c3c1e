//! The controller's durable store: the agents that registered and the targets (databases)
//! they own, and every deployment with its per-target progress and its gap-free event log.
//! It lives in an embedded SQLite file (the default) or in a PostgreSQL database, with the
//! same logical schema on both, and migrates its own schema when opened (on PostgreSQL with
//! belay's own engine). It owns the controller's store and nothing else: it must not talk to
//! target databases or run deployments — the controller drives those and records here what
//! happened.

mod backups;
mod db;
mod error;
mod model;
mod rollback_requests;
mod schema;

pub use backups::BackupRecord;
pub use error::StoreError;
pub use model::{
    AgentRecord, AgentRegistration, Backend, DeploymentRecord, DeploymentState, EventRecord,
    NewDeployment, NewEvent, TargetRecord, TargetRegistration, TargetState, TargetStatus,
    UnknownState,
};
pub use rollback_requests::{
    AlertEvidence, RollbackClaim, RollbackDelivery, RollbackRequestRecord, RollbackRequestState,
};
pub use schema::{POSTGRES_HISTORY_SCHEMA, POSTGRES_SCHEMA, SQLITE_HISTORY_TABLE};

use chrono::{DateTime, Utc};
use db::{Pool, Row, Tx, Val};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long after its last heartbeat an agent still counts as alive, for target ownership:
/// another agent may take over a target only once its owner has been silent this long.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a SQLite writer waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The controller's store. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// The store as shown in messages: a path, or a URL with its password redacted.
    name: Arc<str>,
    agent_timeout: Duration,
}

/// What `open` was given, sorted out.
enum Spec {
    Sqlite(PathBuf),
    Postgres(belay_core::DatabaseUrl),
}

fn parse_spec(spec: &str) -> Result<Spec, StoreError> {
    let trimmed = spec.trim();
    let unsupported = || StoreError::UnsupportedSpec {
        spec: belay_core::redact_url(trimmed),
    };
    if trimmed.is_empty() {
        return Err(unsupported());
    }
    if let Some(path) = trimmed
        .strip_prefix("sqlite://")
        .or_else(|| trimmed.strip_prefix("sqlite:"))
    {
        // Options after `?` (sqlx's spelling) are not ours to interpret.
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(unsupported());
        }
        return Ok(Spec::Sqlite(PathBuf::from(path)));
    }
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        return belay_core::DatabaseUrl::parse(trimmed)
            .map(Spec::Postgres)
            .map_err(|e| StoreError::Connect {
                store: belay_core::redact_url(trimmed),
                reason: e.to_string(),
            });
    }
    // Any other scheme (mysql://, http://…) is a mistake, not a file name.
    if trimmed.contains("://") {
        return Err(unsupported());
    }
    Ok(Spec::Sqlite(PathBuf::from(trimmed)))
}

/// Every deployment matching a condition over `d` (the deployment), oldest first, with its
/// targets joined: the statement behind `unfinished`, `unsettled` and `rolling_back`, kept
/// a `&'static str` as every statement the store runs is.
macro_rules! deployments_where {
    ($condition:literal) => {
        concat!(
            "SELECT d.*, t.target, t.state AS target_state, t.message AS target_message,
                 t.updated_at AS target_updated_at, t.step AS target_step,
                 t.outcome AS target_outcome
             FROM belay_controller.deployments d
             LEFT JOIN belay_controller.deployment_targets t ON t.deployment_id = d.id
             WHERE ",
            $condition,
            " ORDER BY d.created_at, d.id, t.position"
        )
    };
}

impl Store {
    /// Opens the store and migrates its schema.
    ///
    /// `spec` is a filesystem path or `sqlite://PATH` (the file and its directory are
    /// created if missing; WAL journal, `busy_timeout`, foreign keys on), or a
    /// `postgres://…` / `postgresql://…` URL (tables in schema `belay_controller`, created
    /// by belay's own migration engine with its history in `belay_store`).
    pub async fn open(spec: &str) -> Result<Store, StoreError> {
        match parse_spec(spec)? {
            Spec::Sqlite(path) => Self::open_sqlite(&path).await,
            Spec::Postgres(url) => Self::open_postgres(url).await,
        }
    }

    async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        let name = format!("sqlite:{}", path.display());
        let open_err = |reason: String| StoreError::Open {
            store: name.clone(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across application crashes in WAL mode; only an OS crash
            // or power loss can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        schema::migrate_sqlite(&pool, &name).await?;
        Ok(Store {
            pool: Pool::Sqlite(pool, db::SqliteWriter::default()),
            name: name.into(),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
        })
    }

    async fn open_postgres(url: belay_core::DatabaseUrl) -> Result<Store, StoreError> {
        use sqlx::Connection as _;
        use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
        let name = url.redacted().to_string();
        let connect_err = |reason: String| StoreError::Connect {
            store: name.clone(),
            reason: belay_core::redact_url(&reason),
        };
        let options = PgConnectOptions::from_str(url.expose())
            .map_err(|e| connect_err(e.to_string()))?
            .application_name("belay-controller-store");
        // One plain connection first: an unreachable server or a bad password fails at
        // once and reads as that (the pool would retry until its acquire timeout).
        let probe = PgConnection::connect_with(&options)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        schema::migrate_postgres(&url, &name).await?;
        Ok(Store {
            pool: Pool::Pg(pool),
            name: name.into(),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(..) => Backend::Sqlite,
            Pool::Pg(_) => Backend::Postgres,
        }
    }

    /// The store as shown in messages: `sqlite:PATH` or the URL with its password redacted.
    pub fn describe(&self) -> &str {
        &self.name
    }

    /// How long after its last heartbeat an agent still owns its targets against another
    /// agent registering them (default [`DEFAULT_AGENT_TIMEOUT`]).
    pub fn with_agent_timeout(mut self, timeout: Duration) -> Store {
        self.agent_timeout = timeout;
        self
    }

    /// Closes the pool's connections (waits for checked-out ones to come back).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn db(&self, doing: &'static str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        move |e| StoreError::Database {
            store: self.name.to_string(),
            doing,
            reason: belay_core::redact_url(&e.to_string()),
        }
    }

    async fn begin(&self, doing: &'static str) -> Result<Tx, StoreError> {
        self.pool.begin().await.map_err(self.db(doing))
    }

    // ---------------------------------------------------------------- agents and targets

    /// Registers an agent (or registers it again, when it restarts): upserts its address
    /// and version, sets `registered_at` and `last_heartbeat` to now, and replaces its
    /// targets with `agent.targets`. Target names are unique across agents: a target that
    /// another agent owns is refused with [`StoreError::TargetOwned`] while that agent is
    /// alive (heartbeat within the agent timeout) and moves to this agent otherwise.
    pub async fn register_agent(&self, agent: &AgentRegistration) -> Result<(), StoreError> {
        const DOING: &str = "registering an agent";
        if agent.name.trim().is_empty() {
            return Err(StoreError::Invalid {
                what: "agent registration",
                reason: "the agent name is empty".into(),
            });
        }
        let mut seen = HashSet::new();
        for t in &agent.targets {
            if t.name.trim().is_empty() {
                return Err(StoreError::Invalid {
                    what: "agent registration",
                    reason: format!("agent {:?} lists a target with an empty name", agent.name),
                });
            }
            if !seen.insert(t.name.as_str()) {
                return Err(StoreError::Invalid {
                    what: "agent registration",
                    reason: format!("agent {:?} lists target {:?} twice", agent.name, t.name),
                });
            }
        }
        let now = db::now();
        let alive_since = chrono::Duration::from_std(self.agent_timeout)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let err = self.db(DOING);
        let mut tx = self.begin(DOING).await?;
        // Registrations check ownership, then write: serialise them, so two agents claiming
        // one new target at once cannot both pass the check.
        tx.serialise_registrations().await.map_err(&err)?;
        for t in &agent.targets {
            let owner = tx
                .fetch_optional(
                    "SELECT t.agent, a.last_heartbeat FROM belay_controller.targets t
                     JOIN belay_controller.agents a ON a.name = t.agent
                     WHERE t.name = $1",
                    &[Val::Text(&t.name)],
                )
                .await
                .map_err(&err)?;
            if let Some(row) = owner {
                let owner = row.text("agent").map_err(&err)?;
                let heartbeat = row.ts("last_heartbeat").map_err(&err)?;
                if owner != agent.name && heartbeat >= alive_since {
                    return Err(StoreError::TargetOwned {
                        target: t.name.clone(),
                        agent: owner,
                    });
                }
            }
        }
        tx.execute(
            "INSERT INTO belay_controller.agents (name, address, version, registered_at, last_heartbeat)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address,
                 version = excluded.version, registered_at = excluded.registered_at,
                 last_heartbeat = excluded.last_heartbeat",
            &[
                Val::Text(&agent.name),
                Val::Text(&agent.address),
                Val::Text(&agent.version),
                Val::Ts(now),
            ],
        )
        .await
        .map_err(&err)?;
        tx.execute(
            "DELETE FROM belay_controller.targets WHERE agent = $1",
            &[Val::Text(&agent.name)],
        )
        .await
        .map_err(&err)?;
        for t in &agent.targets {
            let labels = serde_json::to_value(&t.labels).unwrap_or_default();
            // A target of a silent agent moves here (checked above).
            tx.execute(
                "INSERT INTO belay_controller.targets (name, agent, environment, labels)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET agent = excluded.agent,
                     environment = excluded.environment, labels = excluded.labels",
                &[
                    Val::Text(&t.name),
                    Val::Text(&agent.name),
                    Val::OptText(t.environment.as_deref()),
                    Val::Json(&labels),
                ],
            )
            .await
            .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)
    }

    /// Records a heartbeat. Returns `false` when the agent is unknown (it should register).
    /// A heartbeat older than the one recorded does not move it back.
    pub async fn heartbeat(&self, agent: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .pool
            .execute(
                "UPDATE belay_controller.agents
                 SET last_heartbeat = CASE WHEN last_heartbeat < $2 THEN $2 ELSE last_heartbeat END
                 WHERE name = $1",
                &[Val::Text(agent), Val::Ts(db::micros(at))],
            )
            .await
            .map_err(self.db("recording a heartbeat"))?;
        Ok(n > 0)
    }

    /// Every agent that registered, by name, with its targets.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let err = self.db("listing agents");
        let rows = self
            .pool
            .fetch_all(
                "SELECT name, address, version, registered_at, last_heartbeat
                 FROM belay_controller.agents ORDER BY name",
                &[],
            )
            .await
            .map_err(&err)?;
        let mut agents = Vec::with_capacity(rows.len());
        for r in rows {
            agents.push(AgentRecord {
                name: r.text("name").map_err(&err)?,
                address: r.text("address").map_err(&err)?,
                version: r.text("version").map_err(&err)?,
                registered_at: r.ts("registered_at").map_err(&err)?,
                last_heartbeat: r.ts("last_heartbeat").map_err(&err)?,
                targets: Vec::new(),
            });
        }
        for t in self.targets().await? {
            if let Some(a) = agents.iter_mut().find(|a| a.name == t.agent) {
                a.targets.push(t.name);
            }
        }
        Ok(agents)
    }

    /// Every registered target, by name.
    pub async fn targets(&self) -> Result<Vec<TargetRecord>, StoreError> {
        let err = self.db("listing targets");
        let rows = self
            .pool
            .fetch_all(
                "SELECT name, agent, environment, labels FROM belay_controller.targets ORDER BY name",
                &[],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(|r| self.target_record(r).map_err(&err))
            .collect()
    }

    pub async fn target(&self, name: &str) -> Result<Option<TargetRecord>, StoreError> {
        let err = self.db("reading a target");
        let row = self
            .pool
            .fetch_optional(
                "SELECT name, agent, environment, labels FROM belay_controller.targets WHERE name = $1",
                &[Val::Text(name)],
            )
            .await
            .map_err(&err)?;
        row.map(|r| self.target_record(&r).map_err(&err))
            .transpose()
    }

    fn target_record(&self, r: &Row) -> Result<TargetRecord, sqlx::Error> {
        let labels = r.json("labels")?;
        Ok(TargetRecord {
            name: r.text("name")?,
            agent: r.text("agent")?,
            environment: r.opt_text("environment")?,
            labels: serde_json::from_value(labels)
                .map_err(|e| sqlx::Error::Decode(format!("column labels: {e}").into()))?,
        })
    }

    // ---------------------------------------------------------------- deployments

    /// Creates a deployment in state `planned`, every target `pending` (in the order
    /// given), and appends its first event (`state`, seq 1).
    pub async fn create_deployment(
        &self,
        d: &NewDeployment,
    ) -> Result<DeploymentRecord, StoreError> {
        const DOING: &str = "creating a deployment";
        let mut seen = HashSet::new();
        if let Some(dup) = d.targets.iter().find(|t| !seen.insert(t.as_str())) {
            return Err(StoreError::Invalid {
                what: "deployment",
                reason: format!("target {dup:?} is listed twice"),
            });
        }
        let err = self.db(DOING);
        let now = db::now();
        let state = DeploymentState::Planned;
        let mut tx = self.begin(DOING).await?;
        let inserted = tx
            .execute(
                "INSERT INTO belay_controller.deployments (id, state, to_version, environment, params,
                     skip_promotion_reason, requested_by, created_at, updated_at, finished_at, last_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, NULL, 0)",
                &[
                    Val::Uuid(d.id),
                    Val::Text(state.as_str()),
                    Val::OptText(d.to_version.as_deref()),
                    Val::OptText(d.environment.as_deref()),
                    Val::Json(&d.params),
                    Val::OptText(d.skip_promotion_reason.as_deref()),
                    Val::OptText(d.requested_by.as_deref()),
                    Val::Ts(now),
                ],
            )
            .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::DeploymentExists(d.id));
            }
            other => other.map_err(&err)?,
        };
        for (position, target) in d.targets.iter().enumerate() {
            tx.execute(
                "INSERT INTO belay_controller.deployment_targets
                     (deployment_id, target, position, state, message, updated_at)
                 VALUES ($1, $2, $3, $4, '', $5)",
                &[
                    Val::Uuid(d.id),
                    Val::Text(target),
                    Val::I64(position as i64),
                    Val::Text(TargetState::Pending.as_str()),
                    Val::Ts(now),
                ],
            )
            .await
            .map_err(&err)?;
        }
        let event = NewEvent {
            deployment_id: d.id,
            target: None,
            kind: "state".into(),
            message: format!("deployment planned for {} target(s)", d.targets.len()),
            payload: serde_json::json!({
                "from": null,
                "to": state.as_str(),
                "to_version": d.to_version,
                "environment": d.environment,
                "targets": d.targets,
            }),
        };
        let first = self.append_in(&mut tx, &event, now).await?;
        tx.commit().await.map_err(&err)?;
        Ok(DeploymentRecord {
            id: d.id,
            state,
            to_version: d.to_version.clone(),
            environment: d.environment.clone(),
            params: d.params.clone(),
            skip_promotion_reason: d.skip_promotion_reason.clone(),
            requested_by: d.requested_by.clone(),
            created_at: now,
            updated_at: now,
            finished_at: None,
            last_seq: first.seq,
            targets: d
                .targets
                .iter()
                .map(|t| TargetStatus {
                    target: t.clone(),
                    state: TargetState::Pending,
                    message: String::new(),
                    updated_at: now,
                    step: None,
                    outcome: serde_json::Value::Null,
                })
                .collect(),
        })
    }

    /// Moves a deployment to `to` if the lifecycle allows it
    /// ([`DeploymentState::can_move_to`]; otherwise [`StoreError::BadTransition`]), appends
    /// a `state` event with `message`, and sets `finished_at` when `to` is terminal.
    pub async fn transition(
        &self,
        id: Uuid,
        to: DeploymentState,
        message: &str,
    ) -> Result<(), StoreError> {
        const DOING: &str = "changing a deployment's state";
        let err = self.db(DOING);
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        // An UPDATE first: it locks the row (PostgreSQL), so the state read is the one we
        // change, even with another controller task transitioning the same deployment.
        let row = tx
            .fetch_optional(
                "UPDATE belay_controller.deployments SET updated_at = $2 WHERE id = $1 RETURNING state",
                &[Val::Uuid(id), Val::Ts(now)],
            )
            .await
            .map_err(&err)?
            .ok_or(StoreError::NoSuchDeployment(id))?;
        let from: DeploymentState = row.parsed("state").map_err(&err)?;
        if !from.can_move_to(to) {
            return Err(StoreError::BadTransition { from, to });
        }
        tx.execute(
            "UPDATE belay_controller.deployments SET state = $2, finished_at = $3 WHERE id = $1",
            &[
                Val::Uuid(id),
                Val::Text(to.as_str()),
                Val::OptTs(to.is_terminal().then_some(now)),
            ],
        )
        .await
        .map_err(&err)?;
        let event = NewEvent {
            deployment_id: id,
            target: None,
            kind: "state".into(),
            message: message.to_string(),
            payload: serde_json::json!({ "from": from.as_str(), "to": to.as_str() }),
        };
        self.append_in(&mut tx, &event, now).await?;
        tx.commit().await.map_err(&err)
    }

    /// Sets one target's state within a deployment and appends a `target_state` event.
    pub async fn set_target_state(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        message: &str,
    ) -> Result<(), StoreError> {
        self.target_state(id, target, state, message, None).await
    }

    /// [`Store::set_target_state`] for a target whose pipeline ended: also records how
    /// (`outcome`, shown with the target), in the same transaction.
    pub async fn finish_target(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        message: &str,
        outcome: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.target_state(id, target, state, message, Some(outcome))
            .await
    }

    /// Settles a target the controller lost track of (`unknown`, or `running` in no live
    /// run): like [`Store::finish_target`], but only while the target is still `unknown` or
    /// `running`. Returns whether it did; `false` (nothing written, no event) when another
    /// pass settled it first, so a reconciliation is recorded once however many passes
    /// race for it.
    pub async fn settle_target(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        message: &str,
        outcome: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        const DOING: &str = "settling a deployment target";
        let err = self.db(DOING);
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        let event = NewEvent {
            deployment_id: id,
            target: Some(target.to_string()),
            kind: "target_state".into(),
            message: message.to_string(),
            payload: serde_json::json!({ "state": state.as_str() }),
        };
        // The append locks the deployment row first (or reports it missing), so two
        // settlers of one target serialise here; the loser's append is rolled back below.
        self.append_in(&mut tx, &event, now).await?;
        let n = tx
            .execute(
                "UPDATE belay_controller.deployment_targets
                 SET state = $3, message = $4, updated_at = $5, outcome = $6
                 WHERE deployment_id = $1 AND target = $2 AND state IN ('unknown', 'running')",
                &[
                    Val::Uuid(id),
                    Val::Text(target),
                    Val::Text(state.as_str()),
                    Val::Text(message),
                    Val::Ts(now),
                    Val::Json(outcome),
                ],
            )
            .await
            .map_err(&err)?;
        if n == 0 {
            // Already settled (or no such target): dropping the transaction undoes the append.
            return Ok(false);
        }
        tx.execute(
            "UPDATE belay_controller.deployments SET updated_at = $2 WHERE id = $1",
            &[Val::Uuid(id), Val::Ts(now)],
        )
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        Ok(true)
    }

    /// Appends one of a target's pipeline events; with `step` (a transition), also moves
    /// the target's step, in the same transaction, so the step shown and the event log
    /// never disagree.
    pub async fn append_target_event(
        &self,
        e: &NewEvent,
        step: Option<DeploymentState>,
    ) -> Result<EventRecord, StoreError> {
        let mut records = self.append_target_events(&[(e.clone(), step)]).await?;
        records
            .pop()
            .ok_or(StoreError::NoSuchDeployment(e.deployment_id))
    }

    /// [`Store::append_target_event`] for a burst of events (in order) in one transaction:
    /// all of them are stored or none, and a thousand targets streaming their events cost
    /// one commit per burst, not one per event.
    pub async fn append_target_events(
        &self,
        events: &[(NewEvent, Option<DeploymentState>)],
    ) -> Result<Vec<EventRecord>, StoreError> {
        const DOING: &str = "recording a target's pipeline event";
        let err = self.db(DOING);
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        let mut records = Vec::with_capacity(events.len());
        for (e, step) in events {
            let target = e.target.as_deref().ok_or_else(|| StoreError::Invalid {
                what: "target event",
                reason: "names no target".into(),
            })?;
            records.push(self.append_in(&mut tx, e, now).await?);
            if let Some(step) = step {
                let n = tx
                    .execute(
                        "UPDATE belay_controller.deployment_targets SET step = $3, updated_at = $4
                         WHERE deployment_id = $1 AND target = $2",
                        &[
                            Val::Uuid(e.deployment_id),
                            Val::Text(target),
                            Val::Text(step.as_str()),
                            Val::Ts(now),
                        ],
                    )
                    .await
                    .map_err(&err)?;
                if n == 0 {
                    return Err(StoreError::NoSuchTarget {
                        id: e.deployment_id,
                        target: target.to_string(),
                    });
                }
            }
        }
        tx.commit().await.map_err(&err)?;
        Ok(records)
    }

    async fn target_state(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        message: &str,
        outcome: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        const DOING: &str = "changing a deployment target's state";
        let err = self.db(DOING);
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        let event = NewEvent {
            deployment_id: id,
            target: Some(target.to_string()),
            kind: "target_state".into(),
            message: message.to_string(),
            payload: serde_json::json!({ "state": state.as_str() }),
        };
        // The append locks the deployment row first (or reports it missing).
        self.append_in(&mut tx, &event, now).await?;
        let n = tx
            .execute(
                "UPDATE belay_controller.deployment_targets SET state = $3, message = $4, updated_at = $5
                 WHERE deployment_id = $1 AND target = $2",
                &[
                    Val::Uuid(id),
                    Val::Text(target),
                    Val::Text(state.as_str()),
                    Val::Text(message),
                    Val::Ts(now),
                ],
            )
            .await
            .map_err(&err)?;
        if n == 0 {
            return Err(StoreError::NoSuchTarget {
                id,
                target: target.to_string(),
            });
        }
        if let Some(outcome) = outcome {
            tx.execute(
                "UPDATE belay_controller.deployment_targets SET outcome = $3
                 WHERE deployment_id = $1 AND target = $2",
                &[Val::Uuid(id), Val::Text(target), Val::Json(outcome)],
            )
            .await
            .map_err(&err)?;
        }
        tx.execute(
            "UPDATE belay_controller.deployments SET updated_at = $2 WHERE id = $1",
            &[Val::Uuid(id), Val::Ts(now)],
        )
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    /// Appends an event to a deployment's log and returns it with its seq (1, 2, 3, … per
    /// deployment, without gaps, also under concurrent appends).
    pub async fn append_event(&self, e: &NewEvent) -> Result<EventRecord, StoreError> {
        const DOING: &str = "appending a deployment event";
        let mut tx = self.begin(DOING).await?;
        let record = self.append_in(&mut tx, e, db::now()).await?;
        tx.commit().await.map_err(self.db(DOING))?;
        Ok(record)
    }

    /// Allocates the next seq by incrementing the deployment's `last_seq` — which locks
    /// its row until the transaction ends, so concurrent appends queue and get consecutive
    /// numbers, and a rolled-back append gives its number back — then inserts the event.
    async fn append_in(
        &self,
        tx: &mut Tx,
        e: &NewEvent,
        at: DateTime<Utc>,
    ) -> Result<EventRecord, StoreError> {
        let err = self.db("appending a deployment event");
        let seq = tx
            .fetch_optional(
                "UPDATE belay_controller.deployments SET last_seq = last_seq + 1 WHERE id = $1
                 RETURNING last_seq",
                &[Val::Uuid(e.deployment_id)],
            )
            .await
            .map_err(&err)?
            .ok_or(StoreError::NoSuchDeployment(e.deployment_id))?
            .i64("last_seq")
            .map_err(&err)?;
        tx.execute(
            "INSERT INTO belay_controller.deployment_events
                 (deployment_id, seq, at, target, kind, message, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                Val::Uuid(e.deployment_id),
                Val::I64(seq),
                Val::Ts(at),
                Val::OptText(e.target.as_deref()),
                Val::Text(&e.kind),
                Val::Text(&e.message),
                Val::Json(&e.payload),
            ],
        )
        .await
        .map_err(&err)?;
        Ok(EventRecord {
            deployment_id: e.deployment_id,
            seq,
            at,
            target: e.target.clone(),
            kind: e.kind.clone(),
            message: e.message.clone(),
            payload: e.payload.clone(),
        })
    }

    /// A deployment's events with `seq > after_seq`, oldest first (`after_seq = 0`: all).
    /// An unknown deployment has none.
    pub async fn events(&self, id: Uuid, after_seq: i64) -> Result<Vec<EventRecord>, StoreError> {
        let err = self.db("reading deployment events");
        let rows = self
            .pool
            .fetch_all(
                "SELECT deployment_id, seq, at, target, kind, message, payload
                 FROM belay_controller.deployment_events
                 WHERE deployment_id = $1 AND seq > $2 ORDER BY seq",
                &[Val::Uuid(id), Val::I64(after_seq)],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    deployment_id: r.uuid("deployment_id")?,
                    seq: r.i64("seq")?,
                    at: r.ts("at")?,
                    target: r.opt_text("target")?,
                    kind: r.text("kind")?,
                    message: r.text("message")?,
                    payload: r.json("payload")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(&err)
    }

    /// A deployment's state alone (`None`: no such deployment), without its targets.
    pub async fn deployment_state(&self, id: Uuid) -> Result<Option<DeploymentState>, StoreError> {
        let err = self.db("reading a deployment's state");
        let row = self
            .pool
            .fetch_optional(
                "SELECT state FROM belay_controller.deployments WHERE id = $1",
                &[Val::Uuid(id)],
            )
            .await
            .map_err(&err)?;
        row.map(|r| r.parsed("state")).transpose().map_err(&err)
    }

    pub async fn deployment(&self, id: Uuid) -> Result<Option<DeploymentRecord>, StoreError> {
        let err = self.db("reading a deployment");
        let rows = self
            .pool
            .fetch_all(
                "SELECT d.*, t.target, t.state AS target_state, t.message AS target_message,
                     t.updated_at AS target_updated_at, t.step AS target_step,
                     t.outcome AS target_outcome
                 FROM belay_controller.deployments d
                 LEFT JOIN belay_controller.deployment_targets t ON t.deployment_id = d.id
                 WHERE d.id = $1
                 ORDER BY t.position",
                &[Val::Uuid(id)],
            )
            .await
            .map_err(&err)?;
        Ok(group_deployments(&rows).map_err(&err)?.pop())
    }

    /// The newest `limit` deployments, newest first (`limit ≤ 0`: none).
    pub async fn deployments(&self, limit: i64) -> Result<Vec<DeploymentRecord>, StoreError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let err = self.db("listing deployments");
        let rows = self
            .pool
            .fetch_all(
                "SELECT d.*, t.target, t.state AS target_state, t.message AS target_message,
                     t.updated_at AS target_updated_at, t.step AS target_step,
                     t.outcome AS target_outcome
                 FROM (SELECT * FROM belay_controller.deployments
                       ORDER BY created_at DESC, id DESC LIMIT $1) d
                 LEFT JOIN belay_controller.deployment_targets t ON t.deployment_id = d.id
                 ORDER BY d.created_at DESC, d.id DESC, t.position",
                &[Val::I64(limit)],
            )
            .await
            .map_err(&err)?;
        group_deployments(&rows).map_err(&err)
    }

    /// Deployments not in a terminal state (including `failed` ones, which await a
    /// rollback or an escalation), oldest first: what a restarted controller reconciles.
    pub async fn unfinished(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.deployments_matching(
            "listing unfinished deployments",
            deployments_where!("d.state NOT IN ('succeeded', 'rolled_back', 'escalated')"),
        )
        .await
    }

    /// Every deployment, however old, with a target the controller lost track of
    /// (`unknown` or `running`), oldest first, with all its targets: what reconciliation
    /// settles. No limit: an unsettled target is never forgotten because newer deployments
    /// came after it.
    pub async fn unsettled(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.deployments_matching(
            "listing deployments with unsettled targets",
            deployments_where!("d.id IN (SELECT deployment_id FROM belay_controller.deployment_targets WHERE state IN ('unknown', 'running'))"),
        )
        .await
    }

    /// Every deployment, however old, with a target whose rollback this controller was
    /// recording (its step `rolling_back`), oldest first, with all its targets: what a
    /// restarted controller takes over from the agents. No limit, as for [`Self::unsettled`].
    pub async fn rolling_back(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.deployments_matching(
            "listing deployments with targets rolling back",
            deployments_where!("d.id IN (SELECT deployment_id FROM belay_controller.deployment_targets WHERE step = 'rolling_back')"),
        )
        .await
    }

    /// The deployments `sql` (from [`deployments_where!`]) selects, each with all its
    /// targets.
    async fn deployments_matching(
        &self,
        doing: &'static str,
        sql: &'static str,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let err = self.db(doing);
        let rows = self.pool.fetch_all(sql, &[]).await.map_err(&err)?;
        group_deployments(&rows).map_err(&err)
    }

    /// The promotion gate: whether a deployment to `to_version` succeeded in `environment`.
    pub async fn succeeded_in(
        &self,
        environment: &str,
        to_version: &str,
    ) -> Result<bool, StoreError> {
        let row = self
            .pool
            .fetch_optional(
                "SELECT 1 AS found FROM belay_controller.deployments
                 WHERE environment = $1 AND to_version = $2 AND state = 'succeeded' LIMIT 1",
                &[Val::Text(environment), Val::Text(to_version)],
            )
            .await
            .map_err(self.db("checking environment promotion"))?;
        Ok(row.is_some())
    }
}

/// Folds rows of `deployments LEFT JOIN deployment_targets` (ordered by deployment, then
/// target position) into records.
fn group_deployments(rows: &[Row]) -> Result<Vec<DeploymentRecord>, sqlx::Error> {
    let mut out: Vec<DeploymentRecord> = Vec::new();
    for r in rows {
        let id = r.uuid("id")?;
        if out.last().is_none_or(|d| d.id != id) {
            out.push(DeploymentRecord {
                id,
                state: r.parsed("state")?,
                to_version: r.opt_text("to_version")?,
                environment: r.opt_text("environment")?,
                params: r.json("params")?,
                skip_promotion_reason: r.opt_text("skip_promotion_reason")?,
                requested_by: r.opt_text("requested_by")?,
                created_at: r.ts("created_at")?,
                updated_at: r.ts("updated_at")?,
                finished_at: r.opt_ts("finished_at")?,
                last_seq: r.i64("last_seq")?,
                targets: Vec::new(),
            });
        }
        if let (Some(target), Some(d)) = (r.opt_text("target")?, out.last_mut()) {
            d.targets.push(TargetStatus {
                target,
                state: r.parsed("target_state")?,
                message: r.text("target_message")?,
                updated_at: r.ts("target_updated_at")?,
                step: r.opt_parsed("target_step")?,
                outcome: r.json("target_outcome")?,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_cheap_to_share() {
        fn is<T: Send + Sync + Clone + 'static>() {}
        is::<Store>();
    }

    #[test]
    fn specs() {
        assert!(matches!(parse_spec("ctl.db"), Ok(Spec::Sqlite(p)) if p == Path::new("ctl.db")));
        assert!(
            matches!(parse_spec("sqlite:///var/lib/belay/ctl.db"), Ok(Spec::Sqlite(p)) if p == Path::new("/var/lib/belay/ctl.db"))
        );
        assert!(
            matches!(parse_spec("sqlite://rel/ctl.db?mode=rwc"), Ok(Spec::Sqlite(p)) if p == Path::new("rel/ctl.db"))
        );
        assert!(matches!(
            parse_spec("postgresql://u:pw@h/db"),
            Ok(Spec::Postgres(_))
        ));
        for bad in [
            "",
            "  ",
            "mysql://root:hunter2@x/db",
            "sqlite://",
            "sqlite::memory:",
            "http://x",
        ] {
            let err = parse_spec(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("unsupported controller store"), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = parse_spec("postgres://u:hunter2@/")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("cannot connect") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
