//! Adapters that plug capability crates into the executor's hooks, so `belay-migrate`
//! needs no backup or lock-monitoring code and the capability crates need no executor
//! code: [`BackupGuard`] implements `belay_migrate::BackupHook` over `belay-backup`;
//! [`LockGuardAdapter`] implements `belay_migrate::LockGuardHook` over `belay-locks`;
//! [`LintGate`] implements `belay_migrate::ScriptGate` over `belay-lint`;
//! [`HistoryDeploymentLog`] implements `belay_deploy::DeploymentLog` over the deployment
//! log tables of `belay-history`, on a session of its own; [`FileScriptFacts`] implements
//! `belay_rollback::ScriptFacts` from the migration files. The
//! CLI and the agent wire them the same way. They hold no policy beyond choosing what to
//! back up from the run's context (the guard's budget comes from the executor's
//! config), and print nothing themselves: callers pass `notify` and `progress` callbacks.

mod deploy_log;
mod health;
pub mod lint;
mod lock_guard;
mod script_facts;

pub use deploy_log::{Attempt, DEPLOY_LOG_APPLICATION, Found, HistoryDeploymentLog, attempts};
pub use health::{MigrationFactsAdapter, summarize};
pub use lint::LintGate;
pub use lock_guard::{GUARD_CONNECT_TIMEOUT, LockGuardAdapter};
pub use script_facts::FileScriptFacts;

use belay_backup::{
    BackupError, BackupFormat, BackupManager, BackupRequest, BackupScope, Progress,
};
use belay_core::DatabaseUrl;
use belay_migrate::{ApiError, BackupContext, BackupHook, BackupTaken, ErrorKind};
use std::sync::Arc;

/// What to take before a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Nothing (a warning says so).
    None,
    /// The whole database.
    Full,
    /// Schema only.
    Schema,
    /// The tables the run touches (forward: altered tables; undo: tables losing data);
    /// a migration naming none falls back to full, an undo dropping none takes nothing.
    Tables,
}

impl BackupMode {
    /// What an undo takes before it runs unless told otherwise, wherever it is started
    /// (local `belay undo`, or the agent's Undo for a remote one): a pre-undo snapshot of
    /// the tables it drops data from, which retention keeps by its own rule. Only a target
    /// whose backups are off (`None`) takes nothing. The target's migrate mode (`full` by
    /// default) is for forward runs: a full dump before an undo would be another kind of
    /// backup, not the snapshot that holds what the undo dropped.
    pub fn default_for_undo(migrate: BackupMode) -> BackupMode {
        match migrate {
            BackupMode::None => BackupMode::None,
            _ => BackupMode::Tables,
        }
    }
}

/// `BackupHook` over `belay-backup`: verified backups before runs, their ids recorded in
/// history by the executor.
#[derive(Clone)]
pub struct BackupGuard {
    manager: BackupManager,
    url: DatabaseUrl,
    target: String,
    mode: BackupMode,
    /// What `before_undo` takes; `mode` unless set apart ([`BackupGuard::with_undo_mode`]).
    undo_mode: BackupMode,
    notify: Arc<dyn Fn(&str) + Send + Sync>,
    progress: Arc<dyn Fn(Progress) + Send + Sync>,
}

impl std::fmt::Debug for BackupGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupGuard")
            .field("url", &self.url)
            .field("target", &self.target)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn api_error(e: BackupError) -> ApiError {
    let kind = match e.kind() {
        belay_backup::ErrorKind::Unavailable => ErrorKind::Unavailable,
        _ => ErrorKind::Refused,
    };
    ApiError::new(kind, e.to_string())
}

impl BackupGuard {
    /// `target` names the backup catalog (the target's name, or the database's).
    pub fn new(
        manager: BackupManager,
        url: DatabaseUrl,
        target: impl Into<String>,
        mode: BackupMode,
    ) -> Self {
        BackupGuard {
            manager,
            url,
            target: target.into(),
            mode,
            undo_mode: mode,
            notify: Arc::new(|_| {}),
            progress: Arc::new(|_| {}),
        }
    }

    /// What an undo takes before it runs, apart from what a forward run takes: a guard
    /// serving both (the agent's, per target) passes
    /// [`BackupMode::default_for_undo`] of its migrate mode.
    pub fn with_undo_mode(mut self, undo_mode: BackupMode) -> Self {
        self.undo_mode = undo_mode;
        self
    }

    /// Where human notes go (skipped backups, fallbacks, snapshots).
    pub fn with_notify(mut self, notify: Arc<dyn Fn(&str) + Send + Sync>) -> Self {
        self.notify = notify;
        self
    }

    /// Where backup progress goes.
    pub fn with_progress(mut self, progress: Arc<dyn Fn(Progress) + Send + Sync>) -> Self {
        self.progress = progress;
        self
    }

    /// Creates and verifies a backup of `scope`; an unverifiable backup is a failure. The
    /// run's deployment id goes into the manifest, so retention keeps the backup while
    /// that deployment is unfinished.
    async fn take(
        &self,
        scope: BackupScope,
        label: String,
        ctx: &BackupContext,
    ) -> Result<BackupTaken, ApiError> {
        let req = BackupRequest {
            format: BackupFormat::Custom,
            scope,
            label: Some(label),
            deployment_id: Some(ctx.deployment_id),
            kind: None,
        };
        let progress = self.progress.clone();
        let report_progress = move |p: Progress| progress(p);
        let manifest = self
            .manager
            .create(&self.url, &self.target, &req, &report_progress)
            .await
            .map_err(api_error)?;
        let report = self
            .manager
            .verify(&self.target, &manifest.id, None)
            .await
            .map_err(api_error)?;
        if !report.ok {
            return Err(api_error(BackupError::VerificationFailed {
                target: self.target.clone(),
                id: manifest.id,
                problems: report.problems,
            }));
        }
        Ok(BackupTaken {
            id: manifest.id,
            scope: manifest.scope.name().to_string(),
        })
    }

    fn skipped(&self, flag: &str) {
        (self.notify)(&format!(
            "warning: {flag} --backup none: no backup is taken before this run; restoring its changes will need a backup taken earlier"
        ));
    }
}

#[async_trait::async_trait]
impl BackupHook for BackupGuard {
    async fn before_apply(&self, ctx: &BackupContext) -> Result<Option<BackupTaken>, ApiError> {
        let label = format!("before deployment {}", ctx.deployment_id);
        let scope = match self.mode {
            BackupMode::None => {
                self.skipped("migrate");
                return Ok(None);
            }
            BackupMode::Full => BackupScope::Full,
            BackupMode::Schema => BackupScope::SchemaOnly,
            BackupMode::Tables if ctx.tables.is_empty() => {
                (self.notify)(
                    "note: --backup tables: the migrations name no existing table (-- belay:tables=, ALTER/DROP/TRUNCATE TABLE); taking a full backup instead",
                );
                BackupScope::Full
            }
            BackupMode::Tables => BackupScope::Tables(ctx.tables.clone()),
        };
        self.take(scope, label, ctx).await.map(Some)
    }

    fn snapshots_undo(&self) -> bool {
        self.mode != BackupMode::None
    }

    fn reads_tables(&self, direction: belay_migrate::Direction) -> bool {
        let mode = match direction {
            belay_migrate::Direction::Undo => self.undo_mode,
            _ => self.mode,
        };
        mode == BackupMode::Tables
    }

    async fn before_undo(
        &self,
        ctx: &BackupContext,
        reason: &str,
    ) -> Result<Option<BackupTaken>, ApiError> {
        let scope = match self.undo_mode {
            BackupMode::None => {
                self.skipped("undo");
                return Ok(None);
            }
            BackupMode::Full => BackupScope::Full,
            BackupMode::Schema => BackupScope::SchemaOnly,
            // Nothing the undo drops holds data: nothing to snapshot.
            BackupMode::Tables if ctx.tables.is_empty() => return Ok(None),
            BackupMode::Tables => {
                (self.notify)(&format!(
                    "snapshotting {} before the undo drops data",
                    ctx.tables.join(", ")
                ));
                let manifest = self
                    .manager
                    .snapshot_tables(&self.url, &self.target, &ctx.tables, reason)
                    .await
                    .map_err(api_error)?;
                return Ok(Some(BackupTaken {
                    id: manifest.id,
                    scope: manifest.scope.name().to_string(),
                }));
            }
        };
        self.take(scope, reason.to_string(), ctx).await.map(Some)
    }
}
