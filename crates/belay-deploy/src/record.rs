//! What a deployment leaves on record, and the seam that stores it ([`DeploymentLog`]):
//! locally in the target's history schema, on the controller in its store.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a target's deployment stands. The rollback states are the rollback controller's:
/// the pipeline itself ends in `Succeeded` or `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Planned,
    Preflight,
    BackingUp,
    Migrating,
    Validating,
    Watching,
    Succeeded,
    Failed,
    RollingBack,
    RolledBack,
    Escalated,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Planned => "planned",
            Step::Preflight => "preflight",
            Step::BackingUp => "backing_up",
            Step::Migrating => "migrating",
            Step::Validating => "validating",
            Step::Watching => "watching",
            Step::Succeeded => "succeeded",
            Step::Failed => "failed",
            Step::RollingBack => "rolling_back",
            Step::RolledBack => "rolled_back",
            Step::Escalated => "escalated",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deployment of one target as it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDeployment {
    pub id: Uuid,
    pub target: String,
    pub started_at: DateTime<Utc>,
    pub environment: Option<String>,
    /// Who started it (OS user, token subject).
    pub requested_by: Option<String>,
    /// The application release this deployment ships (`--release 1.6.0`), semver.
    pub release: Option<String>,
    /// The newest applied version before the deployment.
    pub from_version: Option<String>,
    /// The version it migrates to (`None`: every pending migration).
    pub to_version: Option<String>,
    /// The policy the pipeline runs under, as JSON, so the record says what was checked.
    pub policy: serde_json::Value,
}

/// One migration a deployment applied: what a rollback needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMigration {
    pub version: Option<String>,
    pub script: String,
    /// `None` when the caller could not know it (remote mode: the files are on the agent).
    pub checksum: Option<String>,
    pub has_undo: bool,
    pub irreversible: bool,
}

impl AppliedMigration {
    /// What the files say about each migration of `set`, for the record: checksum, undo,
    /// `-- belay:irreversible`.
    pub fn catalog(set: &belay_migrate::MigrationSet) -> Vec<AppliedMigration> {
        let forward = set.migrations.iter().map(|m| AppliedMigration {
            version: Some(m.version.to_string()),
            script: m.script_name.clone(),
            checksum: Some(m.checksum.to_string()),
            has_undo: m.down.is_some(),
            irreversible: m.up.directives.irreversible,
        });
        let repeatable = set.repeatables.iter().map(|r| AppliedMigration {
            version: None,
            script: r.script_name.clone(),
            checksum: Some(r.script.checksum.to_string()),
            // Re-run, not undone.
            has_undo: true,
            irreversible: false,
        });
        forward.chain(repeatable).collect()
    }
}

/// One thing that happened in a deployment: a step transition, a migration event, a check
/// result, an attempt that failed. Ordered by `seq` within the deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployEvent {
    pub deployment_id: Uuid,
    pub target: String,
    /// Gap-free per deployment, from 1; assigned by the log.
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// The step the deployment was in when this happened.
    pub step: Step,
    /// `transition`, `migration`, `attempt_failed`, `check`, `probe`, …
    pub kind: String,
    /// One human line.
    pub message: String,
    pub payload: serde_json::Value,
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentOutcome {
    pub state: Step,
    pub finished_at: DateTime<Utc>,
    /// The step that failed (for `Failed`).
    pub failed_step: Option<Step>,
    pub reason: Option<String>,
    /// What showed the failure: findings, check results, probe values, lock trees.
    pub evidence: serde_json::Value,
    pub to_version: Option<String>,
    pub backup_id: Option<String>,
    pub applied: Vec<AppliedMigration>,
}

/// A deployment as stored: its start, where it stands, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    #[serde(flatten)]
    pub start: NewDeployment,
    /// The current step; final once `outcome` is set.
    pub step: Step,
    pub outcome: Option<DeploymentOutcome>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("deployment log: {0}")]
pub struct LogError(pub String);

/// Stores deployments and their events. Writes are independent of the migration's own
/// transaction: a migration that fails and rolls back still leaves its attempt on record.
#[async_trait::async_trait]
pub trait DeploymentLog: Send + Sync {
    async fn begin(&self, deployment: &NewDeployment) -> Result<(), LogError>;
    /// Appends `event` (its `seq` is assigned here) and, for a `transition`, moves the
    /// deployment to `event.step`.
    async fn append(&self, event: DeployEvent) -> Result<u64, LogError>;
    /// Appends events of one deployment that are ready together, in order, and returns
    /// their `seq`s. A log that can store them in one write does (the deployment log in
    /// the target database: one statement instead of one per event); by default, one
    /// `append` each.
    async fn append_all(&self, events: Vec<DeployEvent>) -> Result<Vec<u64>, LogError> {
        let mut seqs = Vec::with_capacity(events.len());
        for event in events {
            seqs.push(self.append(event).await?);
        }
        Ok(seqs)
    }
    async fn finish(&self, id: Uuid, outcome: &DeploymentOutcome) -> Result<(), LogError>;
    async fn get(&self, id: Uuid) -> Result<Option<DeploymentRecord>, LogError>;
    async fn events(&self, id: Uuid) -> Result<Vec<DeployEvent>, LogError>;
    /// Newest first.
    async fn list(&self, limit: usize) -> Result<Vec<DeploymentRecord>, LogError>;
}
