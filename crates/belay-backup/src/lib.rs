//! Backups of a target database with the real `pg_dump` and `pg_restore` — never a
//! home-made dump: create (custom or directory format, full, schema-only or selected
//! tables, with per-table row counts taken in the dump's own snapshot), verify (sha256 of
//! every file, `pg_restore --list`, optionally a restore into a scratch database), a catalog
//! per target with retention that never deletes the last verified backup, restore (full with
//! `--clean --if-exists`, into a new database, or selected tables in place) behind an
//! emergency backup, and data snapshots of tables an undo is about to drop. Passwords reach
//! the client tools only through a private passfile, never their command line. This crate
//! must not apply migrations: it is called before and after them.
//!
//! Layout: `<root>/<target>/<id>/` holds the dump (`dump.pgdump`, or `dump/` for the
//! directory format) and `manifest.json`, written last; `<root>/<target>/rates.json` holds
//! the bytes and seconds of the target's recent backups and restores (their measured rates). [`BackupManager`] is the entry point
//! (one per process, cheap to clone); [`Catalog`] reads and prunes a target's backups.
//! [`BackupApi`] is the capability as every caller sees it (in-process [`LocalBackups`],
//! or over gRPC in `belay-rpc`); its prune never deletes the backup an unfinished
//! deployment may need.

mod api;
mod catalog;
mod create;
mod db;
mod error;
mod files;
mod model;
mod proc;
mod rates;
mod restore;
mod tools;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use api::{BackupApi, LocalBackups, ProgressSink, PruneRequest};
pub use catalog::{Catalog, new_id, validate_name};
pub use error::{BackupError, ErrorKind};
pub use model::{
    BackupFormat, BackupKind, BackupRequest, BackupScope, CatalogEntry, FileEntry, KeepReason,
    KeptBackup, Manifest, Operation, Progress, PruneReport, RestoreReport, RestoreRequest,
    RestoreTestReport, TableCheck, TableCount, VerifyProblem, VerifyReport,
};
pub use rates::{MeasuredRate, MeasuredRates, RateSample, median_rate};
pub use tools::{CommandHook, CommandLine, PgTools, parse_version_num};

/// Where progress events go. `&|_| {}` ignores them.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// Default bound on `pg_dump`'s wait for table locks.
pub const DEFAULT_LOCK_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Creates, verifies, restores and prunes backups under one backup root.
#[derive(Clone)]
pub struct BackupManager {
    root: PathBuf,
    bin_dir: Option<PathBuf>,
    size_limit: Option<u64>,
    lock_wait_timeout: std::time::Duration,
    history_schema: String,
    restore_lock_timeout: Option<std::time::Duration>,
    hook: Option<CommandHook>,
    tools: Arc<tokio::sync::OnceCell<PgTools>>,
}

impl std::fmt::Debug for BackupManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupManager")
            .field("root", &self.root)
            .field("bin_dir", &self.bin_dir)
            .field("size_limit", &self.size_limit)
            .field("history_schema", &self.history_schema)
            .finish_non_exhaustive()
    }
}

impl BackupManager {
    /// Backups live under `root` (the CLI's `--backup-dir`, default `./.belay/backups`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BackupManager {
            root: root.into(),
            bin_dir: None,
            size_limit: None,
            lock_wait_timeout: DEFAULT_LOCK_WAIT_TIMEOUT,
            history_schema: "belay".to_owned(),
            restore_lock_timeout: None,
            hook: None,
            tools: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    /// Use the client tools in this directory (and only there).
    pub fn with_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self.tools = Arc::new(tokio::sync::OnceCell::new());
        self
    }

    /// How long `pg_dump` may wait for its ACCESS SHARE locks before giving up with a clear
    /// error (every lock wait belay makes is bounded; default 30 s).
    pub fn with_lock_wait_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.lock_wait_timeout = timeout;
        self
    }

    /// Abort a backup (removing what it wrote) once it exceeds this many bytes.
    pub fn with_size_limit(mut self, bytes: u64) -> Self {
        self.size_limit = Some(bytes);
        self
    }

    /// Schema of the history table the schema version is read from (default `belay`).
    pub fn with_history_schema(mut self, schema: impl Into<String>) -> Self {
        self.history_schema = schema.into();
        self
    }

    /// Bounds each lock wait of an in-place restore (`lock_timeout` on its session): a
    /// wait longer than this fails the restore (one transaction: nothing changed, exit
    /// as a tool failure naming the lock timeout) instead of queueing the application
    /// behind it. `None` (default): PostgreSQL's own setting.
    pub fn with_restore_lock_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.restore_lock_timeout = Some(timeout);
        self
    }

    pub fn restore_lock_timeout(&self) -> Option<std::time::Duration> {
        self.restore_lock_timeout
    }

    /// Called with every child command line before it starts (auditing, debugging, tests).
    pub fn on_command(mut self, hook: CommandHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Schema of the history table this manager reads (default `belay`).
    pub fn history_schema(&self) -> &str {
        &self.history_schema
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn catalog(&self, target: &str) -> Result<Catalog, BackupError> {
        Catalog::open(&self.root, target)
    }

    /// The client tools in use (found on first use, then remembered).
    pub async fn tools(&self) -> Result<PgTools, BackupError> {
        self.tools
            .get_or_try_init(|| PgTools::locate(self.bin_dir.as_deref()))
            .await
            .cloned()
    }

    async fn runner(&self) -> Result<tools::Runner, BackupError> {
        Ok(tools::Runner {
            tools: self.tools().await?,
            hook: self.hook.clone(),
        })
    }

    /// The median rates of `target`'s recent backups and restores (`rates.json`), for
    /// estimates; `None` in each where nothing large enough was measured yet.
    pub fn measured_rates(&self, target: &str) -> Result<MeasuredRates, BackupError> {
        rates::measured(self.catalog(target)?.dir())
    }

    /// Adds one measurement to `target`'s rates. A failure to write it is logged, not
    /// returned: the backup or restore it measures succeeded.
    pub(crate) fn record_rate(&self, target: &str, kind: rates::RateKind, sample: RateSample) {
        let result = self
            .catalog(target)
            .and_then(|c| rates::record(c.dir(), kind, sample));
        if let Err(err) = result {
            tracing::warn!(target, %err, "could not record the measured rate");
        }
    }

    /// A data-safe undo's first step: dump `tables` (definitions and data) before the undo
    /// drops them or their columns, verify the dump, and return its manifest. `reason`
    /// becomes the backup's label.
    pub async fn snapshot_tables(
        &self,
        url: &belay_core::DatabaseUrl,
        target: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, BackupError> {
        let req = BackupRequest {
            format: BackupFormat::Custom,
            scope: BackupScope::Tables(tables.to_vec()),
            label: Some(reason.to_owned()),
            deployment_id: None,
            kind: Some(model::BackupKind::PreUndo),
        };
        let manifest = self
            .create_kind(url, target, &req, model::BackupKind::PreUndo, &|_| {})
            .await?;
        let report = self.verify(target, &manifest.id, None).await?;
        if !report.ok {
            return Err(BackupError::VerificationFailed {
                target: target.to_owned(),
                id: manifest.id,
                problems: report.problems,
            });
        }
        self.catalog(target)?.get(&manifest.id)
    }
}
