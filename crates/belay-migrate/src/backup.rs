//! Backups around runs, without depending on the backup crate: the executor calls a
//! [`BackupHook`] once it holds the runner lock and knows the run is not empty, before the
//! first statement of the first migration (`pg_dump` holds ACCESS SHARE locks while it
//! runs, so it must be finished before any DDL asks for stronger ones). The hook's backup
//! id is recorded in every history row of the run. A hook failure refuses the run with
//! nothing applied.

use crate::api::ApiError;
use crate::events::Direction;
use uuid::Uuid;

/// One script of the run, as the hook sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupStep {
    pub version: Option<String>,
    pub script: String,
    pub direction: Direction,
}

/// What a run is about to do, so the hook can decide what to back up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupContext {
    pub deployment_id: Uuid,
    /// `Forward` for `migrate` (repeatables included), `Undo` for `undo`.
    pub direction: Direction,
    pub steps: Vec<BackupStep>,
    /// Existing tables (`schema.table`, quoted where needed) the steps name: in
    /// `-- belay:tables=`, and in the DDL — for an undo the tables it drops, truncates or
    /// drops columns of; for a migration also the tables it alters. Tables the run
    /// creates (not there yet) are left out.
    pub tables: Vec<String>,
}

/// A backup the hook took.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupTaken {
    pub id: String,
    /// What it holds: `full`, `schema_only`, `tables`.
    pub scope: String,
}

/// Takes backups before runs. Implemented where the backup manager is (the CLI, the
/// agent), so this crate needs no backup code.
#[async_trait::async_trait]
pub trait BackupHook: Send + Sync {
    /// Before a migration run: the pre-deployment backup. `None` when the hook was told
    /// not to take one.
    async fn before_apply(&self, ctx: &BackupContext) -> Result<Option<BackupTaken>, ApiError>;

    /// Whether `before_undo` takes anything. When it does, an undo script that drops
    /// data calls `before_undo` for itself alone, inside its own transaction, with writes
    /// to `ctx.tables` held back (`LOCK TABLE … IN EXCLUSIVE MODE`) until the script has
    /// dropped them: every row committed before the drop is in the snapshot. Reads go on;
    /// writes to those tables wait for as long as the hook takes.
    fn snapshots_undo(&self) -> bool {
        true
    }

    /// Whether the hook reads [`BackupContext::tables`] for a run in `direction`; when it
    /// does not (a full backup, or none), belay does not look them up.
    fn reads_tables(&self, direction: Direction) -> bool {
        let _ = direction;
        true
    }

    /// Before an undo run: usually a snapshot of `ctx.tables` (whose data the undo drops);
    /// `None` when nothing needs saving or the hook was told not to. `reason` is a
    /// human label for the backup.
    async fn before_undo(
        &self,
        ctx: &BackupContext,
        reason: &str,
    ) -> Result<Option<BackupTaken>, ApiError>;
}
