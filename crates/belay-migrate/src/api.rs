//! The migration capability as a trait, so callers do not care where it runs: the CLI's
//! local mode and the agent use [`LocalTargets`] (the engine in-process); the CLI's remote
//! mode and the controller use a gRPC client implementing the same trait (`belay-rpc`).

use crate::backup::BackupHook;
use crate::config::ExecConfig;
use crate::directives::Directives;
use crate::error::{ErrorKind, MigrateError};
use crate::events::{Direction, EventSink};
use crate::gate::ScriptGate;
use crate::guard::LockGuardHook;
use crate::runner::{
    CheckOverride, Migrator, RepairAction, RepairScope, RunReport, Target, UndoTarget,
};
use crate::source::MigrationSet;
use crate::status::MigrationStatus;
use belay_core::DatabaseUrl;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

pub use belay_core::ApiError;

impl From<MigrateError> for ApiError {
    fn from(e: MigrateError) -> Self {
        ApiError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// One step of a plan, without the script's text: what crosses the wire.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanStepView {
    pub version: Option<String>,
    pub description: String,
    pub script: String,
    pub direction: Direction,
    pub directives: Directives,
    /// No statement: empty or comments only.
    pub empty: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanView {
    pub steps: Vec<PlanStepView>,
    pub blockers: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    pub lock_timeout_ms: u64,
    pub max_attempts: u32,
}

/// How one `apply` runs, beyond how far it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Ties every event and history row of the run to a deployment (the controller's);
    /// `None`: a fresh one.
    pub deployment_id: Option<Uuid>,
    /// Preflight checks the operator overrode for this run (`migrate --override-check
    /// NAME --reason "…"`), recorded in the notes of every history row it writes. They
    /// travel with the call rather than living on the implementation, so a run through
    /// the controller records them on the agent exactly as a local run does.
    pub overrides: Vec<CheckOverride>,
}

impl ApplyOptions {
    /// A run of deployment `id` with nothing overridden (fleet deployments).
    pub fn deployment(id: Uuid) -> Self {
        ApplyOptions {
            deployment_id: Some(id),
            overrides: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Validation {
    pub problems: Vec<String>,
    pub checked: usize,
}

/// What belay can do to a target's migrations.
#[async_trait::async_trait]
pub trait MigrationApi: Send + Sync {
    async fn status(&self, target: &str) -> Result<Vec<MigrationStatus>, ApiError>;
    async fn plan(&self, target: &str, forward: &Target, sql: bool) -> Result<PlanView, ApiError>;
    /// `sink` receives events as they happen; the report comes at the end.
    async fn apply(
        &self,
        target: &str,
        forward: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError>;
    async fn undo(
        &self,
        target: &str,
        undo: &UndoTarget,
        deployment_id: Option<Uuid>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError>;
    async fn validate(&self, target: &str) -> Result<Validation, ApiError>;
    async fn repair(
        &self,
        target: &str,
        scope: &RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError>;
    async fn baseline(
        &self,
        target: &str,
        version: &str,
        description: &str,
    ) -> Result<(), ApiError>;

    /// Records `versions` as reverted by a restore (not by their undo scripts), as
    /// `UNDO_SQL` rows of deployment `deployment_id` with `note` (see
    /// `Migrator::record_reverted`). Implementations that cannot write history yet refuse.
    async fn record_reverted(
        &self,
        target: &str,
        versions: &[String],
        deployment_id: Uuid,
        backup_id: Option<&str>,
        note: serde_json::Value,
    ) -> Result<Vec<String>, ApiError> {
        let _ = (versions, deployment_id, backup_id, note);
        Err(ApiError::new(
            ErrorKind::Refused,
            format!(
                "recording a restore-based rollback in the history of {target:?} is not \
                 supported over this connection yet; run the rollback locally"
            ),
        ))
    }
}

/// A database this process can reach directly, and its migrations.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub name: String,
    pub url: DatabaseUrl,
    pub dir: PathBuf,
    pub exec: ExecConfig,
}

/// The engine in-process over a set of targets. Migration files are read afresh on every
/// call, so an edit on disk is seen by the next command, as in local mode; a target given
/// its files with [`LocalTargets::with_files`] uses those instead.
#[derive(Clone, Default)]
pub struct LocalTargets {
    targets: BTreeMap<String, TargetSpec>,
    /// Per target: its files as the caller already read them.
    files: BTreeMap<String, Arc<MigrationSet>>,
    /// Per target: the backup taken before `apply` and `undo` change anything.
    backup_hooks: BTreeMap<String, Arc<dyn BackupHook>>,
    /// Per target: the guard around each statement of `apply` and `undo`.
    lock_guards: BTreeMap<String, Arc<dyn LockGuardHook>>,
    /// Per target: the check of the pending scripts before `apply` runs any.
    script_gates: BTreeMap<String, Arc<dyn ScriptGate>>,
    /// Per target, with [`LocalTargets::reusing_sessions`]: the session one call leaves
    /// for the next.
    stashes: BTreeMap<String, Arc<crate::SessionStash>>,
}

impl std::fmt::Debug for LocalTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTargets")
            .field("targets", &self.targets)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field(
                "backup_hooks",
                &self.backup_hooks.keys().collect::<Vec<_>>(),
            )
            .field("lock_guards", &self.lock_guards.keys().collect::<Vec<_>>())
            .field(
                "script_gates",
                &self.script_gates.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl LocalTargets {
    pub fn new(targets: impl IntoIterator<Item = TargetSpec>) -> Self {
        LocalTargets {
            targets: targets.into_iter().map(|t| (t.name.clone(), t)).collect(),
            files: BTreeMap::new(),
            backup_hooks: BTreeMap::new(),
            lock_guards: BTreeMap::new(),
            script_gates: BTreeMap::new(),
            stashes: BTreeMap::new(),
        }
    }

    /// Guards every statement of `apply` and `undo` on `target` with `hook` (see
    /// [`LockGuardHook`]), with the target's `max_blocking`.
    pub fn with_lock_guard(mut self, target: &str, hook: Arc<dyn LockGuardHook>) -> Self {
        self.lock_guards.insert(target.to_string(), hook);
        self
    }

    /// Every call on `target` works from `set` (its directory as read once, by a command
    /// that runs one operation and exits) instead of reading the directory again: what
    /// the command checked, planned and printed is exactly what it runs, and a
    /// deployment's several calls (plan, apply, status) read 346 migrations once, not
    /// seven times. A long-lived process (the agent) does not: its files change between
    /// deployments.
    pub fn with_files(mut self, target: &str, set: Arc<MigrationSet>) -> Self {
        self.files.insert(target.to_string(), set);
        self
    }

    /// A command's calls hand each other their target's session: the plan's read leaves
    /// it, the run takes it (see [`crate::SessionStash`]). For a command-line run, which
    /// ends soon after; a long-lived process (the agent) does not: an idle session would
    /// hold a connection outside its budget.
    pub fn reusing_sessions(mut self) -> Self {
        self.stashes = self
            .targets
            .keys()
            .map(|t| (t.clone(), Arc::default()))
            .collect();
        self
    }

    /// `target`'s files, when given with [`LocalTargets::with_files`].
    pub fn files(&self, target: &str) -> Option<Arc<MigrationSet>> {
        self.files.get(target).cloned()
    }

    /// Runs `hook` before every `apply` and `undo` on `target` that has something to do
    /// (see [`BackupHook`]).
    pub fn with_backup_hook(mut self, target: &str, hook: Arc<dyn BackupHook>) -> Self {
        self.backup_hooks.insert(target.to_string(), hook);
        self
    }

    /// Checks the pending scripts of every `apply` on `target` with `gate` before anything
    /// runs (see [`ScriptGate`]).
    pub fn with_script_gate(mut self, target: &str, gate: Arc<dyn ScriptGate>) -> Self {
        self.script_gates.insert(target.to_string(), gate);
        self
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<&TargetSpec> {
        self.targets.get(name)
    }

    fn migrator(
        &self,
        target: &str,
        sink: EventSink,
        deployment_id: Option<Uuid>,
    ) -> Result<Migrator, ApiError> {
        let spec = self.targets.get(target).ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownTarget,
                format!(
                    "unknown target {target:?}; known: {}",
                    self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let set = match self.files.get(target) {
            Some(set) => set.clone(),
            None => Arc::new(crate::source::load(&spec.dir).map_err(MigrateError::from)?),
        };
        let mut m = Migrator::new(spec.url.clone(), set, spec.exec.clone(), sink)?;
        if let Some(id) = deployment_id {
            m = m.with_deployment_id(id);
        }
        if let Some(hook) = self.backup_hooks.get(target) {
            m = m.with_backup_hook(hook.clone());
        }
        if let Some(hook) = self.lock_guards.get(target) {
            m = m.with_lock_guard(hook.clone());
        }
        if let Some(gate) = self.script_gates.get(target) {
            m = m.with_script_gate(gate.clone());
        }
        if let Some(stash) = self.stashes.get(target) {
            m = m.with_session_stash(stash.clone());
        }
        Ok(m)
    }
}

#[async_trait::async_trait]
impl MigrationApi for LocalTargets {
    async fn status(&self, target: &str) -> Result<Vec<MigrationStatus>, ApiError> {
        let m = self.migrator(target, crate::events::discard(), None)?;
        Ok(m.status().await?)
    }

    async fn plan(&self, target: &str, forward: &Target, sql: bool) -> Result<PlanView, ApiError> {
        let m = self.migrator(target, crate::events::discard(), None)?;
        let plan = m.plan(forward).await?;
        let config = &self.targets[target].exec;
        Ok(PlanView {
            steps: plan
                .steps
                .iter()
                .map(|s| PlanStepView {
                    version: s.version.clone(),
                    description: s.description.clone(),
                    script: s.script.clone(),
                    direction: s.direction,
                    directives: s.source.directives.clone(),
                    empty: s.source.is_empty(),
                })
                .collect(),
            blockers: plan.blockers.clone(),
            warnings: plan.warnings.clone(),
            sql: sql.then(|| m.render_sql(&plan)),
            lock_timeout_ms: config.lock_timeout.as_millis() as u64,
            max_attempts: config.max_attempts,
        })
    }

    async fn apply(
        &self,
        target: &str,
        forward: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        let m = self
            .migrator(target, sink, options.deployment_id)?
            .with_overrides(options.overrides.clone());
        Ok(m.migrate(forward).await?)
    }

    async fn undo(
        &self,
        target: &str,
        undo: &UndoTarget,
        deployment_id: Option<Uuid>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        let m = self.migrator(target, sink, deployment_id)?;
        Ok(m.undo(undo).await?)
    }

    async fn validate(&self, target: &str) -> Result<Validation, ApiError> {
        let m = self.migrator(target, crate::events::discard(), None)?;
        let problems = m.validate().await?;
        Ok(Validation {
            problems,
            checked: m.set().migrations.len(),
        })
    }

    async fn repair(
        &self,
        target: &str,
        scope: &RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError> {
        let m = self.migrator(target, crate::events::discard(), None)?;
        Ok(m.repair(scope).await?)
    }

    async fn baseline(
        &self,
        target: &str,
        version: &str,
        description: &str,
    ) -> Result<(), ApiError> {
        let m = self.migrator(target, crate::events::discard(), None)?;
        Ok(m.baseline(version, description).await?)
    }

    async fn record_reverted(
        &self,
        target: &str,
        versions: &[String],
        deployment_id: Uuid,
        backup_id: Option<&str>,
        note: serde_json::Value,
    ) -> Result<Vec<String>, ApiError> {
        let m = self.migrator(target, crate::events::discard(), Some(deployment_id))?;
        Ok(m.record_reverted(versions, backup_id, note).await?)
    }
}
