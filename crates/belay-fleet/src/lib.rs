//! The controller's behaviour: the registry of agents and their targets, routing of
//! migration calls to the agent that owns a target, fleet deployments in waves with a
//! promotion gate, and reconciliation of deployments interrupted by a crash (of an agent
//! or of the controller). It owns no storage (that is `belay-store`) and never connects
//! to a target database: every database action goes through the owning agent.

mod backup;
mod deploy;
pub mod grpc;
mod monitor;
mod reconcile_rollback;
mod route;
pub mod waves;
pub mod webhook;
mod whole;

pub use deploy::DeploySpec;
pub use whole::{DeploymentRollbackPlan, RollbackScope};

use belay_deploy::{Step, TargetDeployApi, TargetRun};
use belay_migrate::{
    ApiError, ApplyOptions, ErrorKind, EventSink, MigrationApi, MigrationStatus, PlanView,
    RepairAction, RunReport, Target, UndoTarget, Validation,
};
use belay_rpc::{Connection, MigrationClient};
use belay_store::{AgentRecord, AgentRegistration, NewEvent, Store, StoreError, TargetState};
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{Instrument as _, info, warn};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How often agents heartbeat; three missed ones make an agent unreachable.
    pub heartbeat_interval: Duration,
    /// Environments in promotion order ("staging", "production"); empty: no gate.
    pub environments: Vec<String>,
    /// Token the controller presents to agents.
    pub agent_token: Option<String>,
    /// mTLS identity the controller presents to agents, and the CA it verifies them
    /// against. Its domain name is not used: each agent's server certificate is verified
    /// against that agent's registered name (see [`Fleet`]'s connections).
    pub agent_tls: Option<tonic::transport::ClientTlsConfig>,
    /// HTTP/2 keepalive on channels to agents: a silently dead agent's deployment streams
    /// end within `agent_keepalive.bound()`.
    pub agent_keepalive: belay_rpc::Keepalive,
    /// Whether an agent's name must be an identity of its client certificate
    /// (`Certificate`, with mTLS) or is taken as asserted (plaintext).
    pub agent_identity: belay_auth::PeerIdentity,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_secs(1),
            environments: Vec::new(),
            agent_token: None,
            agent_tls: None,
            agent_keepalive: belay_rpc::Keepalive::default(),
            agent_identity: belay_auth::PeerIdentity::Asserted,
        }
    }
}

/// Shared controller state; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    store: Store,
    config: Arc<FleetConfig>,
    conns: Arc<Mutex<HashMap<String, Connection>>>,
    /// Woken whenever an event is stored, so watchers follow without polling hard.
    changed: Arc<Notify>,
    /// Deployments this process is running right now.
    active: Arc<Mutex<HashSet<Uuid>>>,
    /// Targets being reconciled right now (deployment, target), so the registration
    /// trigger and the periodic pass never settle one twice.
    reconciling: Arc<Mutex<HashSet<(Uuid, String)>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

pub(crate) fn store_err(e: StoreError) -> ApiError {
    ApiError::new(ErrorKind::Internal, format!("controller store: {e}"))
}

impl Fleet {
    /// Opens the fleet over `store` and settles deployments a previous controller process
    /// left unfinished: they are marked failed, with their running targets `unknown` until
    /// their agents report back.
    pub async fn new(store: Store, config: FleetConfig) -> Result<Fleet, ApiError> {
        let fleet = Fleet {
            store,
            config: Arc::new(config),
            conns: Arc::default(),
            changed: Arc::default(),
            active: Arc::default(),
            reconciling: Arc::default(),
        };
        let interrupted = fleet
            .store
            .interrupt_rollback_requests(
                "the controller stopped while triggering this rollback; the next delivery of an alert naming it triggers it again",
            )
            .await
            .map_err(store_err)?;
        if interrupted > 0 {
            warn!(
                requests = interrupted,
                "rollback requests were being triggered when the controller stopped; marked failed, so the next alert delivery retries them"
            );
        }
        for d in fleet.store.unfinished().await.map_err(store_err)? {
            // A failed deployment is settled already (a rollback may follow, not a restart).
            if d.state == belay_store::DeploymentState::Failed {
                continue;
            }
            warn!(deployment = %d.id, state = %d.state, "deployment was running when the controller stopped; marking it failed");
            for t in &d.targets {
                let step = t.step.map_or("planned", |s| s.as_str());
                let (state, msg) = match t.state {
                    TargetState::Running => (
                        TargetState::Unknown,
                        format!(
                            "the controller restarted during {step}; reconciled with the target's agent (its own record says how the run ended)"
                        ),
                    ),
                    TargetState::Pending => (
                        TargetState::Skipped,
                        "not started: the controller restarted".to_string(),
                    ),
                    _ => continue,
                };
                fleet
                    .store
                    .set_target_state(d.id, &t.target, state, &msg)
                    .await
                    .map_err(store_err)?;
            }
            fleet
                .store
                .transition(
                    d.id,
                    belay_store::DeploymentState::Failed,
                    &format!(
                        "the controller restarted during {}: the deployment stops here (later waves never start); targets that were running are reconciled with their agents",
                        d.state
                    ),
                )
                .await
                .map_err(store_err)?;
        }
        Ok(fleet)
    }

    /// Keeps `belay_agents_connected` current, once per heartbeat interval.
    pub fn spawn_gauges(&self) {
        let fleet = self.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(agents) = fleet.store.agents().await {
                    let alive = agents.iter().filter(|a| fleet.is_alive(a)).count();
                    metrics::gauge!(belay_telemetry::names::AGENTS_CONNECTED).set(alive as f64);
                }
                tokio::time::sleep(fleet.config.heartbeat_interval).await;
            }
        });
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }

    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Whether this controller process is running the deployment right now.
    pub fn is_active(&self, id: Uuid) -> bool {
        self.active.lock().is_ok_and(|a| a.contains(&id))
    }

    pub(crate) async fn record(&self, e: NewEvent) -> Result<(), ApiError> {
        self.store.append_event(&e).await.map_err(store_err)?;
        self.notify();
        Ok(())
    }

    pub(crate) async fn set_target(
        &self,
        id: Uuid,
        target: &str,
        state: TargetState,
        msg: &str,
    ) -> Result<(), ApiError> {
        self.store
            .set_target_state(id, target, state, msg)
            .await
            .map_err(store_err)?;
        self.notify();
        Ok(())
    }

    /// Whether the agent heartbeat recently enough (within three intervals).
    pub fn is_alive(&self, a: &AgentRecord) -> bool {
        let limit = self.config.heartbeat_interval * 3;
        Utc::now()
            .signed_duration_since(a.last_heartbeat)
            .to_std()
            .map_or(true, |age| age <= limit)
    }

    fn connection(&self, agent: &AgentRecord) -> Result<Connection, ApiError> {
        let mut conns = self
            .conns
            .lock()
            .map_err(|_| ApiError::new(ErrorKind::Internal, "connection cache poisoned"))?;
        if let Some(c) = conns.get(&agent.name)
            && c.peer.ends_with(&agent.address)
        {
            return Ok(c.clone());
        }
        // The agent's server certificate must carry the name it registered under, as its
        // client certificate did then: with one shared name, any agent's certificate could
        // answer at another agent's address and receive its calls.
        let tls = self
            .config
            .agent_tls
            .clone()
            .map(|tls| tls.domain_name(agent.name.clone()));
        let conn = Connection::with_keepalive(
            &agent.address,
            tls,
            self.config.agent_token.as_deref(),
            format!("agent {} at {}", agent.name, agent.address),
            self.config.agent_keepalive,
        )?;
        conns.insert(agent.name.clone(), conn.clone());
        Ok(conn)
    }

    /// The migration client for the agent owning `target`, refusing early when the agent
    /// is known to be down.
    pub(crate) async fn client_for(
        &self,
        target: &str,
    ) -> Result<(MigrationClient, AgentRecord), ApiError> {
        let (conn, agent) = self.connection_for(target).await?;
        Ok((MigrationClient::new(&conn), agent))
    }

    /// The connection to the agent owning `target`, for any service's client, refusing
    /// early when the agent is known to be down.
    pub async fn connection_for(
        &self,
        target: &str,
    ) -> Result<(Connection, AgentRecord), ApiError> {
        let t = self
            .store
            .target(target)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::UnknownTarget,
                    format!(
                        "unknown target {target:?}: no agent has registered it (see `belay agents`)"
                    ),
                )
            })?;
        let agent = self
            .store
            .agents()
            .await
            .map_err(store_err)?
            .into_iter()
            .find(|a| a.name == t.agent)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!(
                        "target {target:?} names agent {:?}, which is not registered",
                        t.agent
                    ),
                )
            })?;
        if !self.is_alive(&agent) {
            return Err(ApiError::new(
                ErrorKind::AgentUnreachable,
                format!(
                    "agent {} at {} owns target {target:?} but has missed its heartbeats since {}; start it or check the network",
                    agent.name,
                    agent.address,
                    agent.last_heartbeat.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            ));
        }
        Ok((self.connection(&agent)?, agent))
    }

    /// Records an agent and its targets; then settles deployments its absence left
    /// `unknown`, by asking it where each target stands now.
    pub async fn register(&self, reg: AgentRegistration) -> Result<(), ApiError> {
        self.store.register_agent(&reg).await.map_err(|e| match e {
            StoreError::TargetOwned { .. } => ApiError::new(ErrorKind::Refused, e.to_string()),
            other => store_err(other),
        })?;
        self.conns.lock().map(|mut c| c.remove(&reg.name)).ok();
        info!(agent = %reg.name, address = %reg.address, targets = reg.targets.len(), "agent registered");
        let fleet = self.clone();
        let targets: HashSet<String> = reg.targets.iter().map(|t| t.name.clone()).collect();
        tokio::spawn(async move {
            if let Err(e) = fleet.reconcile(Some(&targets)).await {
                warn!(error = %e, "reconciliation after registration failed");
            }
            if let Err(e) = fleet.reconcile_rollbacks(Some(&targets)).await {
                warn!(error = %e, "reconciling rollbacks after registration failed");
            }
        });
        Ok(())
    }

    /// Settles, once its agent answers, every target the controller lost track of
    /// (`unknown`: its agent was lost mid-run, or the controller restarted) among `targets`
    /// (all when `None`), in every deployment however old. Each target is settled in a
    /// task of its own, so an agent that is down, or slow to answer, or still running its
    /// watch window holds up only its own targets, never the others'. Returns how many
    /// targets it started settling.
    async fn reconcile(&self, targets: Option<&HashSet<String>>) -> Result<usize, ApiError> {
        let active = self.active.lock().map(|a| a.clone()).unwrap_or_default();
        let mut started = 0;
        for d in self.store.unsettled().await.map_err(store_err)? {
            if active.contains(&d.id) {
                continue;
            }
            for t in d.targets.iter().filter(|t| {
                matches!(t.state, TargetState::Unknown | TargetState::Running)
                    && targets.is_none_or(|ts| ts.contains(&t.target))
            }) {
                let key = (d.id, t.target.clone());
                let claimed = self
                    .reconciling
                    .lock()
                    .is_ok_and(|mut r| r.insert(key.clone()));
                if !claimed {
                    continue;
                }
                started += 1;
                let fleet = self.clone();
                let (id, target, step, to_version) =
                    (d.id, t.target.clone(), t.step, d.to_version.clone());
                let span =
                    tracing::info_span!("reconcile_target", deployment = %id, target = %target);
                tokio::spawn(
                    async move {
                        let result = fleet
                            .reconcile_target(id, &target, step, to_version.as_deref())
                            .await;
                        if let Ok(mut r) = fleet.reconciling.lock() {
                            r.remove(&key);
                        }
                        if let Err(e) = result {
                            // Left `unknown`: the next pass (or the agent's next
                            // registration) tries again.
                            tracing::debug!(target = %target, error = %e, "cannot reconcile yet");
                        }
                    }
                    .instrument(span),
                );
            }
        }
        Ok(started)
    }

    /// Asks the target's agent how deployment `id` went there, from the agent's own
    /// record beside the target (waiting while the run is still going: a controller
    /// restart does not stop it), and records that, with where the target's migrations
    /// stand now.
    async fn reconcile_target(
        &self,
        id: Uuid,
        target: &str,
        step: Option<belay_store::DeploymentState>,
        to_version: Option<&str>,
    ) -> Result<(), ApiError> {
        let (conn, agent) = self.connection_for(target).await?;
        let deployer = belay_rpc::DeployClient::new(&conn);
        let run = loop {
            match deployer.deployment(target, id).await? {
                TargetRun::Running { .. } => {
                    // Still running on the agent: its watch window or soak goes on.
                    self.connection_for(target).await?;
                    tokio::time::sleep(self.config.heartbeat_interval).await;
                }
                other => break other,
            }
        };
        let client = MigrationClient::new(&conn);
        // A migration still `running` means the old agent's session is still on the
        // server (it is cancelled once the server notices the dead client): ask again
        // until the target has settled, for up to a minute.
        let mut statuses = None;
        for _ in 0..60 {
            match client.status(target).await {
                Ok(s) if s.iter().any(|m| m.state == belay_migrate::State::Running) => {}
                Ok(s) => {
                    statuses = Some(s);
                    break;
                }
                Err(e) => {
                    warn!(target = %target, error = %e, "cannot read the target's migrations yet")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let now = statuses.map_or_else(
            || "its migrations did not settle within a minute".to_string(),
            |s| summarize(&s, to_version).1,
        );
        let step = step.map_or("planned", |s| s.as_str());
        let (state, message, outcome) = match run {
            TargetRun::Finished(o) if o.state == Step::Succeeded => (
                TargetState::Succeeded,
                format!(
                    "reconciled from agent {}'s record: the run went on without the controller and every step passed; now {now}",
                    agent.name
                ),
                serde_json::to_value(&o).unwrap_or_default(),
            ),
            TargetRun::Finished(o) => (
                TargetState::Failed,
                format!(
                    "reconciled from agent {}'s record: failed at {}: {}; now {now}",
                    agent.name,
                    o.failed_step.unwrap_or(Step::Failed),
                    o.reason.as_deref().unwrap_or("no reason given")
                ),
                serde_json::to_value(&o).unwrap_or_default(),
            ),
            TargetRun::NotFound | TargetRun::Running { .. } => {
                let reason = format!(
                    "agent {} has no record of this deployment on {target}: the run never started there (lost during {step}); now {now}",
                    agent.name
                );
                let outcome = serde_json::json!({
                    "state": Step::Failed,
                    "failed_step": step,
                    "reason": reason,
                    "evidence": { "reconciled": "no record on the target" },
                });
                (
                    TargetState::Failed,
                    format!("reconciled: {reason}"),
                    outcome,
                )
            }
        };
        // Recorded once: a pass that raced this one (it read the target as unknown
        // before this settled it) finds it settled and writes nothing.
        let settled = self
            .store
            .settle_target(id, target, state, &message, &outcome)
            .await
            .map_err(store_err)?;
        if !settled {
            tracing::debug!(target = %target, "already reconciled by another pass");
            return Ok(());
        }
        self.record(NewEvent {
            deployment_id: id,
            target: Some(target.to_string()),
            kind: "reconciled".into(),
            message,
            payload: serde_json::json!({ "state": state.as_str(), "outcome": outcome }),
        })
        .await
    }

    /// Reconciles `unknown` targets in the background, once per three heartbeat intervals
    /// (when their agents may be back): after a controller restart and after an agent was
    /// lost without registering again (a partition healed, a stopped process resumed).
    pub fn spawn_reconciler(&self) {
        let fleet = self.clone();
        tokio::spawn(async move {
            // Rollbacks this controller was recording before it restarted: nothing in this
            // process records them now, so their agents' records are taken over.
            if let Err(e) = fleet.reconcile_rollbacks(None).await {
                warn!(error = %e, "reconciling rollbacks at start-up failed");
            }
            loop {
                match fleet.reconcile(None).await {
                    Ok(started) => tracing::debug!(started, "reconciliation pass"),
                    Err(e) => warn!(error = %e, "reconciliation pass failed"),
                }
                tokio::time::sleep(fleet.config.heartbeat_interval * 3).await;
            }
        });
    }
}

/// Where a target stands, in one line, and whether that counts as the deployment's
/// goal reached.
fn summarize(statuses: &[MigrationStatus], to_version: Option<&str>) -> (TargetState, String) {
    use belay_migrate::State;
    let count = |st: State| statuses.iter().filter(|s| s.state == st).count();
    let failed: Vec<&str> = statuses
        .iter()
        .filter(|s| s.state == State::Failed)
        .map(|s| s.script.as_str())
        .collect();
    let wanted = |s: &&MigrationStatus| match (to_version, s.version.as_deref()) {
        (Some(to), Some(v)) => at_or_below(v, to),
        _ => true,
    };
    let pending = statuses
        .iter()
        .filter(wanted)
        .filter(|s| matches!(s.state, State::Pending | State::Undone))
        .count();
    let summary = format!(
        "{} applied, {} pending, {} failed{}",
        count(State::Success),
        pending,
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", failed.join(", "))
        }
    );
    let state = if failed.is_empty() && pending == 0 {
        TargetState::Succeeded
    } else {
        TargetState::Failed
    };
    (state, summary)
}

/// `v <= to` by belay's version order; unparsable versions count as wanted.
fn at_or_below(v: &str, to: &str) -> bool {
    match (
        belay_core::Version::parse(v),
        belay_core::Version::parse(to),
    ) {
        (Ok(a), Ok(b)) => a <= b,
        _ => true,
    }
}

/// The controller routes every migration call to the agent owning the target.
#[async_trait::async_trait]
impl MigrationApi for Fleet {
    async fn status(&self, target: &str) -> Result<Vec<MigrationStatus>, ApiError> {
        self.client_for(target).await?.0.status(target).await
    }

    async fn plan(&self, target: &str, forward: &Target, sql: bool) -> Result<PlanView, ApiError> {
        self.client_for(target)
            .await?
            .0
            .plan(target, forward, sql)
            .await
    }

    async fn apply(
        &self,
        target: &str,
        forward: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        self.client_for(target)
            .await?
            .0
            .apply(target, forward, options, sink)
            .await
    }

    async fn undo(
        &self,
        target: &str,
        undo: &UndoTarget,
        deployment_id: Option<Uuid>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        self.client_for(target)
            .await?
            .0
            .undo(target, undo, deployment_id, sink)
            .await
    }

    async fn validate(&self, target: &str) -> Result<Validation, ApiError> {
        self.client_for(target).await?.0.validate(target).await
    }

    async fn repair(
        &self,
        target: &str,
        scope: &belay_migrate::RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError> {
        self.client_for(target).await?.0.repair(target, scope).await
    }

    async fn baseline(
        &self,
        target: &str,
        version: &str,
        description: &str,
    ) -> Result<(), ApiError> {
        self.client_for(target)
            .await?
            .0
            .baseline(target, version, description)
            .await
    }
}
