//! Requests, the manifest, reports and progress events: plain data, JSON-serialisable, so the
//! CLI prints them and the gRPC service maps them without reaching into the engine.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The archive format `pg_dump` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackupFormat {
    /// One compressed file (`pg_dump --format=custom`), `dump.pgdump`.
    Custom,
    /// A directory of per-table files (`pg_dump --format=directory --jobs N`), `dump/`.
    Directory { jobs: u32 },
}

impl BackupFormat {
    /// The dump's path relative to the backup directory.
    pub fn dump_path(&self) -> &'static str {
        match self {
            BackupFormat::Custom => "dump.pgdump",
            BackupFormat::Directory { .. } => "dump",
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            BackupFormat::Custom => "custom",
            BackupFormat::Directory { .. } => "directory",
        }
    }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "tables", rename_all = "snake_case")]
pub enum BackupScope {
    /// Schema and data of the whole database.
    Full,
    /// Definitions only (`--schema-only`).
    SchemaOnly,
    /// Definitions and data of these tables (`schema.table` or `table`), as `pg_dump --table`.
    Tables(Vec<String>),
}

impl BackupScope {
    pub fn name(&self) -> &'static str {
        match self {
            BackupScope::Full => "full",
            BackupScope::SchemaOnly => "schema_only",
            BackupScope::Tables(_) => "tables",
        }
    }

    pub fn has_data(&self) -> bool {
        !matches!(self, BackupScope::SchemaOnly)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    pub format: BackupFormat,
    pub scope: BackupScope,
    /// Free text shown in listings: "before deployment 7f3…", "undo of V12 drops orders.note".
    pub label: Option<String>,
    /// The deployment (run) this backup precedes: retention keeps it while that deployment
    /// is unfinished, and the controller's mirror answers "which backup precedes it".
    #[serde(default)]
    pub deployment_id: Option<Uuid>,
    /// Why it is taken, when the caller knows better than the default (pre-deployment
    /// when `deployment_id` is set, manual otherwise): a rollback's emergency backup names
    /// its deployment but must not pass for that deployment's pre-deployment backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackupKind>,
}

impl Default for BackupRequest {
    fn default() -> Self {
        BackupRequest {
            format: BackupFormat::Custom,
            scope: BackupScope::Full,
            label: None,
            deployment_id: None,
            kind: None,
        }
    }
}

/// One file of a backup, relative to the backup's directory (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A table's row count inside the backup's snapshot (`None` for schema-only backups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCount {
    pub schema: String,
    pub name: String,
    pub rows: Option<i64>,
    /// Its columns in the snapshot, `name type` in column order (absent in older
    /// manifests): what tells whether the database still holds what the backup holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

/// Why a backup was taken, which decides how long retention keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// Taken before a deployment migrated (`deployment_id` set).
    PreDeployment,
    /// The tables an undo was about to drop data from (`snapshot_tables`): often the
    /// only copy of that data.
    PreUndo,
    /// What a restore in place was about to overwrite.
    Emergency,
    /// Asked for by someone (`backup create`).
    Manual,
}

impl BackupKind {
    pub fn name(self) -> &'static str {
        match self {
            BackupKind::PreDeployment => "pre_deployment",
            BackupKind::PreUndo => "pre_undo",
            BackupKind::Emergency => "emergency",
            BackupKind::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<BackupKind> {
        [
            BackupKind::PreDeployment,
            BackupKind::PreUndo,
            BackupKind::Emergency,
            BackupKind::Manual,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// The label an emergency backup gets; older manifests are recognised by it.
pub(crate) const EMERGENCY_LABEL: &str = "emergency backup before restoring";

impl TableCount {
    /// `schema.name`, as people write it (unquoted).
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// `manifest.json` of a backup: written last, so a backup without one is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of this file.
    pub manifest_version: u32,
    /// `YYYYMMDDTHHMMSS.mmmZ-xxxxxx`: sorts by creation time.
    pub id: String,
    pub target: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Wall time of the dump, including the row counts.
    pub duration_ms: u64,
    /// The database name the backup was taken from.
    pub database: Option<String>,
    /// `SHOW server_version` (text) and `server_version_num`.
    pub server_version: String,
    pub server_version_num: u32,
    /// `pg_dump --version`.
    pub pg_dump_version: String,
    /// Latest version applied according to `belay.schema_history`, if that table exists
    /// (`None` also when it exists with nothing applied).
    pub schema_version: Option<String>,
    /// Every version applied then, in version order (absent in older manifests).
    #[serde(default)]
    pub applied_versions: Vec<String>,
    /// Why it was taken (absent in older manifests: see [`Manifest::kind`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackupKind>,
    pub format: BackupFormat,
    pub scope: BackupScope,
    /// The snapshot the dump and the row counts were taken in (`pg_export_snapshot()`).
    pub snapshot: Option<String>,
    pub files: Vec<FileEntry>,
    pub tables: Vec<TableCount>,
    pub verified: bool,
    pub verified_at: Option<DateTime<Utc>>,
    /// Whether the last successful verification included a restore into a scratch database.
    #[serde(default)]
    pub restore_tested: bool,
    /// The deployment this backup was taken before, if any (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<Uuid>,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Why it was taken: as recorded, or, for a manifest written before kinds were,
    /// read from what it carries (a deployment id, the emergency label, a tables backup
    /// labelled for an undo).
    pub fn kind(&self) -> BackupKind {
        self.kind
            .unwrap_or_else(|| infer_kind(self.deployment_id, self.label.as_deref(), &self.scope))
    }
}

fn infer_kind(deployment: Option<Uuid>, label: Option<&str>, scope: &BackupScope) -> BackupKind {
    let label = label.unwrap_or_default();
    if label.starts_with(EMERGENCY_LABEL) {
        BackupKind::Emergency
    } else if matches!(scope, BackupScope::Tables(_)) && label.contains("undo") {
        BackupKind::PreUndo
    } else if deployment.is_some() {
        BackupKind::PreDeployment
    } else {
        BackupKind::Manual
    }
}

/// A backup as `backup list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: String,
    pub target: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub format: BackupFormat,
    pub scope: BackupScope,
    pub schema_version: Option<String>,
    pub verified: bool,
    pub verified_at: Option<DateTime<Utc>>,
    pub restore_tested: bool,
    pub size: u64,
    pub files: Vec<FileEntry>,
    /// The deployment this backup was taken before, if any.
    #[serde(default)]
    pub deployment_id: Option<Uuid>,
    /// The backup's directory (on the host holding the catalog).
    pub path: std::path::PathBuf,
}

impl CatalogEntry {
    /// The catalog's view of a manifest, its backup in `path`.
    pub fn from_manifest(m: Manifest, path: std::path::PathBuf) -> CatalogEntry {
        CatalogEntry {
            size: m.total_size(),
            id: m.id,
            target: m.target,
            label: m.label,
            created_at: m.created_at,
            format: m.format,
            scope: m.scope,
            schema_version: m.schema_version,
            verified: m.verified,
            verified_at: m.verified_at,
            restore_tested: m.restore_tested,
            files: m.files,
            deployment_id: m.deployment_id,
            path,
        }
    }
}

/// Something wrong with a backup, found by verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum VerifyProblem {
    FileMissing {
        path: String,
    },
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    ChecksumMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    /// `pg_restore --list` could not read the archive.
    Unreadable {
        path: String,
        error: String,
    },
    /// The restore into the scratch database failed.
    RestoreFailed {
        error: String,
    },
    RowCountMismatch {
        table: String,
        expected: i64,
        actual: i64,
    },
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyProblem::FileMissing { path } => write!(f, "file {path} is missing"),
            VerifyProblem::SizeMismatch {
                path,
                expected,
                actual,
            } => write!(
                f,
                "file {path} has {actual} bytes, the manifest says {expected} (truncated or appended)"
            ),
            VerifyProblem::ChecksumMismatch { path, .. } => {
                write!(f, "file {path} differs from its sha256 in the manifest")
            }
            VerifyProblem::Unreadable { path, error } => {
                write!(f, "pg_restore --list cannot read {path}: {error}")
            }
            VerifyProblem::RestoreFailed { error } => {
                write!(f, "restore into a scratch database failed: {error}")
            }
            VerifyProblem::RowCountMismatch {
                table,
                expected,
                actual,
            } => write!(
                f,
                "table {table} has {actual} rows after a test restore, the manifest says {expected}"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTestReport {
    /// The scratch database (dropped again).
    pub database: String,
    pub tables_compared: usize,
    pub dropped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub target: String,
    pub id: String,
    pub ok: bool,
    pub verified_at: DateTime<Utc>,
    pub files_checked: usize,
    pub bytes_checked: u64,
    /// Entries `pg_restore --list` found in the archive.
    pub archive_entries: usize,
    pub restore_test: Option<RestoreTestReport>,
    pub problems: Vec<VerifyProblem>,
    pub duration_ms: u64,
}

/// Retention: what `prune` did (or would do with `dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub target: String,
    pub dry_run: bool,
    pub deleted: Vec<CatalogEntry>,
    pub kept: Vec<KeptBackup>,
    /// Directories of incomplete backups removed (no manifest, or an abandoned `.partial`).
    pub incomplete_removed: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBackup {
    pub id: String,
    pub reason: KeepReason,
    /// Why it is protected, in words (e.g. which unfinished deployment it precedes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// Among the newest `keep` verified backups.
    Retained,
    /// The newest verified backup: never deleted, even with `keep = 0`.
    LatestVerified,
    /// Named in `protect` (e.g. the pre-deployment backup of an unfinished deployment).
    Protected,
    /// Not verified yet and newer than every verified backup: nothing supersedes it.
    AwaitingVerification,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// Only these tables (definition, data, indexes, constraints, triggers); others untouched.
    pub tables: Option<Vec<String>>,
    /// Create this database and restore into it instead of the target's own database.
    pub into: Option<String>,
    /// Restore even if the backup fails verification.
    pub force: bool,
    /// Take a backup of the current state before a destructive restore (in place).
    pub emergency_backup: bool,
    /// A table restore in place from a backup of another schema version than the
    /// database's: allowed only for tables whose columns are the same now as in the backup
    /// (so history stays true); without it such a restore is refused naming both versions.
    #[serde(default)]
    pub across_versions: bool,
    /// A full restore in place leaves belay's history schema (history table, deployment
    /// log) as it is now instead of putting back the backup's copy: a rollback restores
    /// around its own record, then marks the deployment's migrations reverted. For a table
    /// restore it means the same caller: the schema-version check is skipped, since
    /// returning the tables to the backup's version is the point.
    #[serde(default)]
    pub keep_history: bool,
}

impl RestoreRequest {
    /// A full restore in place, with an emergency backup first.
    pub fn full() -> Self {
        RestoreRequest {
            emergency_backup: true,
            ..Default::default()
        }
    }

    /// These tables in place, with an emergency backup of them first.
    pub fn tables<S: Into<String>>(tables: impl IntoIterator<Item = S>) -> Self {
        RestoreRequest {
            tables: Some(tables.into_iter().map(Into::into).collect()),
            emergency_backup: true,
            ..Default::default()
        }
    }
}

/// A restored table's row count against the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCheck {
    pub table: String,
    pub expected: Option<i64>,
    pub actual: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub target: String,
    pub id: String,
    /// The database restored into.
    pub database: String,
    pub into_new_database: bool,
    /// `None` for a full restore.
    pub tables: Option<Vec<String>>,
    /// The backup of the state before this restore, if one was taken.
    pub emergency_backup: Option<String>,
    /// Restored although verification failed (`force`).
    pub forced: bool,
    pub verification_problems: Vec<VerifyProblem>,
    /// Row counts after the restore, for every restored table the manifest lists.
    pub checks: Vec<TableCheck>,
    /// Tables whose row count differs from the manifest.
    pub mismatches: Vec<TableCheck>,
    /// Foreign keys of other tables dropped and re-added around an in-place table restore.
    pub foreign_keys_readded: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Create,
    Restore,
}

/// Progress of a running backup or restore, for a progress bar, log lines or a gRPC stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Started {
        operation: Operation,
        target: String,
        id: String,
        /// Tables whose data will be processed.
        tables: usize,
    },
    /// A table's data is being dumped or restored (`done` counts it).
    Table {
        name: String,
        done: usize,
        total: usize,
    },
    /// Bytes written to the backup so far.
    Bytes { written: u64 },
    Finished {
        operation: Operation,
        target: String,
        id: String,
        bytes: u64,
        duration_ms: u64,
    },
}
