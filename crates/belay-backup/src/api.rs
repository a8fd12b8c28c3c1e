//! `BackupApi`: backups as every caller sees them — the CLI in local mode, the agent
//! serving its targets, the controller routing to agents — with one error type
//! (`belay_core::ApiError`). [`LocalBackups`] is the in-process implementation over
//! [`BackupManager`]; `belay-rpc` carries the same trait over gRPC.
//!
//! Retention here is safer than [`Catalog::prune`] alone: before deleting anything it reads
//! the target's history and protects the backup of every deployment that is not finished,
//! so a rollback never finds its backup pruned, and (unless forced) every pre-undo snapshot
//! holding a table or column the database no longer has.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use belay_history::{History, RowState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::model::{
    BackupRequest, CatalogEntry, KeepReason, Manifest, Progress, PruneReport, RestoreReport,
    RestoreRequest, VerifyReport,
};
use crate::rates::MeasuredRates;
use crate::{BackupError, BackupManager, ErrorKind as BackupKind, db};

/// Where progress events go; owned, so a server can forward them from its own task.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// Retention as asked for; the implementation adds the protections it knows of.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PruneRequest {
    /// Keep the newest `keep` verified backups (the newest verified one is always kept).
    pub keep: usize,
    /// Only report what would be deleted.
    pub dry_run: bool,
    /// Backup ids the caller needs kept (the controller's unfinished deployments).
    pub protect: Vec<String>,
    /// Also delete pre-undo snapshots that hold data no longer in the database (tables or
    /// columns an undo dropped); without it they are kept whatever `keep` says.
    #[serde(default)]
    pub force: bool,
}

/// Backups of named targets, in-process or remote alike.
#[async_trait::async_trait]
pub trait BackupApi: Send + Sync {
    /// Dumps `target` (not verified yet: call `verify`).
    async fn create(
        &self,
        target: &str,
        req: &BackupRequest,
        progress: ProgressSink,
    ) -> Result<Manifest, ApiError>;

    /// The catalog, newest first.
    async fn list(&self, target: &str) -> Result<Vec<CatalogEntry>, ApiError>;

    /// Checks files and archive, optionally restoring into a scratch database on the
    /// target's server; records the outcome in the manifest. A bad backup is `Ok` with
    /// `ok: false`.
    async fn verify(
        &self,
        target: &str,
        id: &str,
        restore_test: bool,
    ) -> Result<VerifyReport, ApiError>;

    async fn restore(
        &self,
        target: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressSink,
    ) -> Result<RestoreReport, ApiError>;

    /// Retention; never deletes the backup of an unfinished deployment.
    async fn prune(&self, target: &str, req: &PruneRequest) -> Result<PruneReport, ApiError>;

    /// A verified dump of `tables` (definitions and data), labelled `reason`.
    async fn snapshot_tables(
        &self,
        target: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, ApiError>;

    /// One backup's manifest (its per-table row counts, scope, size). Implementations
    /// that cannot read manifests yet refuse.
    async fn manifest(&self, target: &str, id: &str) -> Result<Manifest, ApiError> {
        Err(ApiError::new(
            ErrorKind::Refused,
            format!(
                "reading the manifest of backup {id} of {target:?} is not supported over this connection yet"
            ),
        ))
    }

    /// The rates measured on `target` by its recent backups and restores, for estimates.
    /// Implementations that do not keep them report none measured (estimates then say
    /// their rates are assumed).
    async fn measured_rates(&self, target: &str) -> Result<MeasuredRates, ApiError> {
        let _ = target;
        Ok(MeasuredRates::default())
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        let kind = match e.kind() {
            BackupKind::InvalidArgument => ErrorKind::InvalidArgument,
            BackupKind::NotFound => ErrorKind::NotFound,
            BackupKind::FailedPrecondition => ErrorKind::Refused,
            BackupKind::Unavailable => ErrorKind::Unavailable,
            BackupKind::ResourceExhausted => ErrorKind::OutOfSpace,
            BackupKind::Internal => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

#[derive(Clone)]
enum Slot {
    Configured {
        url: DatabaseUrl,
        manager: BackupManager,
    },
    /// A known target without a backup directory; the remedy says what to configure.
    Unconfigured { remedy: String },
}

/// [`BackupApi`] in-process: each target's URL and the manager holding its catalog
/// (`<root>/<target>/`). Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalBackups {
    targets: HashMap<String, Slot>,
}

impl std::fmt::Debug for LocalBackups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.targets.keys().collect();
        names.sort();
        f.debug_struct("LocalBackups")
            .field("targets", &names)
            .finish_non_exhaustive()
    }
}

impl LocalBackups {
    pub fn new() -> Self {
        LocalBackups::default()
    }

    /// Backs up `name` at `url` into `manager`'s root.
    pub fn with_target(
        mut self,
        name: impl Into<String>,
        url: DatabaseUrl,
        manager: BackupManager,
    ) -> Self {
        self.targets
            .insert(name.into(), Slot::Configured { url, manager });
        self
    }

    /// `name` is a known target without backups: calls are refused with `remedy` (what to
    /// configure), rather than reported as an unknown target.
    pub fn without_backups(mut self, name: impl Into<String>, remedy: impl Into<String>) -> Self {
        self.targets.insert(
            name.into(),
            Slot::Unconfigured {
                remedy: remedy.into(),
            },
        );
        self
    }

    fn slot(&self, target: &str) -> Result<(&DatabaseUrl, &BackupManager), ApiError> {
        match self.targets.get(target) {
            Some(Slot::Configured { url, manager }) => Ok((url, manager)),
            Some(Slot::Unconfigured { remedy }) => Err(ApiError::new(
                ErrorKind::Refused,
                format!("target {target:?} has no backups configured: {remedy}"),
            )),
            None => {
                let mut known: Vec<&str> = self.targets.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(ApiError::new(
                    ErrorKind::UnknownTarget,
                    format!(
                        "unknown target {target:?} (known here: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ))
            }
        }
    }
}

#[async_trait::async_trait]
impl BackupApi for LocalBackups {
    async fn create(
        &self,
        target: &str,
        req: &BackupRequest,
        progress: ProgressSink,
    ) -> Result<Manifest, ApiError> {
        let (url, manager) = self.slot(target)?;
        let report = move |p: Progress| progress(p);
        Ok(manager
            .create(url, target, req, &report)
            .instrument(info_span!("backup_create", target))
            .await?)
    }

    async fn manifest(&self, target: &str, id: &str) -> Result<Manifest, ApiError> {
        let (_, manager) = self.slot(target)?;
        Ok(manager.catalog(target)?.get(id)?)
    }

    async fn measured_rates(&self, target: &str) -> Result<MeasuredRates, ApiError> {
        let (_, manager) = self.slot(target)?;
        Ok(manager.measured_rates(target)?)
    }

    async fn list(&self, target: &str) -> Result<Vec<CatalogEntry>, ApiError> {
        let (_, manager) = self.slot(target)?;
        let _span = info_span!("backup_list", target).entered();
        Ok(manager.catalog(target)?.list()?)
    }

    async fn verify(
        &self,
        target: &str,
        id: &str,
        restore_test: bool,
    ) -> Result<VerifyReport, ApiError> {
        let (url, manager) = self.slot(target)?;
        Ok(manager
            .verify(target, id, restore_test.then_some(url))
            .instrument(info_span!("backup_verify", target, id))
            .await?)
    }

    async fn restore(
        &self,
        target: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressSink,
    ) -> Result<RestoreReport, ApiError> {
        let (url, manager) = self.slot(target)?;
        let report = move |p: Progress| progress(p);
        Ok(manager
            .restore(url, target, id, req, &report)
            .instrument(info_span!("backup_restore", target, id))
            .await?)
    }

    async fn prune(&self, target: &str, req: &PruneRequest) -> Result<PruneReport, ApiError> {
        let (url, manager) = self.slot(target)?;
        async {
            let catalog = manager.catalog(target)?;
            let entries = catalog.list()?;
            let rows = read_history(url, target, manager.history_schema()).await?;
            let mut notes: HashMap<String, Option<String>> = protected_by_history(&rows, &entries)
                .into_iter()
                .map(|(id, note)| (id, Some(note)))
                .collect();
            for id in &req.protect {
                notes.entry(id.clone()).or_insert(None);
            }
            if !req.force {
                for (id, note) in holding_lost_data(url, target, &catalog.manifests()?).await? {
                    notes.entry(id).or_insert(Some(note));
                }
            }
            let protect: Vec<String> = notes.keys().cloned().collect();
            let mut report = catalog.prune(req.keep, &protect, req.dry_run)?;
            for kept in &mut report.kept {
                if kept.reason == KeepReason::Protected {
                    kept.note = notes.get(&kept.id).cloned().flatten();
                }
            }
            Ok::<_, BackupError>(report)
        }
        .instrument(info_span!("backup_prune", target))
        .await
        .map_err(ApiError::from)
    }

    async fn snapshot_tables(
        &self,
        target: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, ApiError> {
        let (url, manager) = self.slot(target)?;
        Ok(manager
            .snapshot_tables(url, target, tables, reason)
            .instrument(info_span!("backup_snapshot_tables", target))
            .await?)
    }
}

/// Pre-undo snapshots that hold data the database no longer has — a table or a column
/// of theirs is gone (or changed type) — with what is gone: often the only copy of the
/// data an undo dropped, so `prune` keeps them unless forced. A snapshot whose manifest
/// predates column recording is kept too: belay cannot tell.
async fn holding_lost_data(
    url: &DatabaseUrl,
    target: &str,
    manifests: &[Manifest],
) -> Result<Vec<(String, String)>, BackupError> {
    let snapshots: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| m.kind() == crate::model::BackupKind::PreUndo)
        .collect();
    if snapshots.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = db::connect(url, target).await?;
    let mut out = Vec::new();
    for m in snapshots {
        let mut gone = Vec::new();
        for t in &m.tables {
            let now = conn.columns(&t.schema, &t.name).await?;
            match &t.columns {
                _ if now.is_empty() => gone.push(format!("table {} is gone", t.qualified())),
                None => gone.push(format!(
                    "{} may have lost columns (the snapshot predates column recording)",
                    t.qualified()
                )),
                Some(then) => {
                    let lost: Vec<&str> = then
                        .iter()
                        .filter(|c| !now.contains(c))
                        .map(String::as_str)
                        .collect();
                    if !lost.is_empty() {
                        gone.push(format!("{} lost ({})", t.qualified(), lost.join(", ")));
                    }
                }
            }
        }
        if !gone.is_empty() {
            out.push((
                m.id.clone(),
                format!(
                    "holds data no longer in the database: {}; `backup prune --force` deletes it anyway",
                    gone.join("; ")
                ),
            ));
        }
    }
    db::close(conn).await;
    Ok(out)
}

/// One history row, as retention reads it.
#[derive(Debug, Clone)]
pub(crate) struct RunRow {
    pub deployment_id: Option<Uuid>,
    pub backup_id: Option<String>,
    pub state: RowState,
    pub script: String,
    pub installed_on: DateTime<Utc>,
}

/// The target's history rows (none when the table does not exist yet). Prune refuses
/// to run without them: deleting blind could remove the backup a rollback needs.
async fn read_history(
    url: &DatabaseUrl,
    target: &str,
    schema: &str,
) -> Result<Vec<RunRow>, BackupError> {
    const DOING: &str = "reading the history to find backups of unfinished deployments (prune deletes nothing without it)";
    let history = History::new(schema).map_err(|e| BackupError::Invalid(e.to_string()))?;
    let mut conn = db::connect(url, target).await?;
    let rows = history.rows(&mut conn.conn).await;
    db::close(conn).await;
    let rows = rows.map_err(|e| BackupError::Database {
        target: target.to_owned(),
        url: url.to_string(),
        doing: DOING.to_owned(),
        reason: belay_core::redact_url(&e.to_string()),
    })?;
    Ok(rows
        .into_iter()
        .map(|r| RunRow {
            deployment_id: r.deployment_id,
            backup_id: r.backup_id,
            state: r.state,
            script: r.script,
            installed_on: r.installed_on,
        })
        .collect())
}

/// Backups the history says a deployment may still need, with why:
///
/// - a deployment with a `running` or `failed` row (not repaired) is unfinished: its
///   backups (by the manifest's deployment id, or the rows' `backup_id`) are kept until
///   `repair` or a rollback settles it;
/// - the newest pre-deployment backup whose deployment recorded no row at all, taken
///   after the last row: that deployment is still running towards its first commit, or
///   failed before applying anything — either way nothing superseded it yet.
pub(crate) fn protected_by_history(
    rows: &[RunRow],
    entries: &[CatalogEntry],
) -> Vec<(String, String)> {
    let mut unfinished: HashMap<Uuid, Vec<String>> = HashMap::new();
    for r in rows {
        if let (Some(d), RowState::Running | RowState::Failed) = (r.deployment_id, r.state) {
            unfinished
                .entry(d)
                .or_default()
                .push(format!("{} is {}", r.script, r.state.as_str()));
        }
    }
    let why = |d: &Uuid| {
        format!(
            "deployment {d} is unfinished ({}); `belay repair` or a rollback settles it",
            unfinished.get(d).map(|v| v.join(", ")).unwrap_or_default()
        )
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut seen = HashSet::new();
    for e in entries {
        if let Some(d) = e.deployment_id.filter(|d| unfinished.contains_key(d))
            && seen.insert(e.id.clone())
        {
            out.push((e.id.clone(), why(&d)));
        }
    }
    // Older manifests carry no deployment id; the rows name their backup.
    for r in rows {
        if let (Some(d), Some(b)) = (r.deployment_id, &r.backup_id)
            && unfinished.contains_key(&d)
            && seen.insert(b.clone())
        {
            out.push((b.clone(), why(&d)));
        }
    }
    let recorded: HashSet<Uuid> = rows.iter().filter_map(|r| r.deployment_id).collect();
    let last_row = rows.iter().map(|r| r.installed_on).max();
    let pending = entries
        .iter()
        .filter(|e| {
            e.deployment_id.is_some_and(|d| !recorded.contains(&d))
                && last_row.is_none_or(|t| e.created_at > t)
        })
        .max_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    if let Some(e) = pending
        && let Some(d) = e.deployment_id
        && seen.insert(e.id.clone())
    {
        out.push((
            e.id.clone(),
            format!(
                "deployment {d} has recorded no migration yet: it may still be running, or it failed before applying anything"
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackupFormat, BackupScope};

    fn at(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + min * 60, 0).expect("valid time")
    }

    fn entry(id: &str, created: i64, deployment: Option<Uuid>) -> CatalogEntry {
        CatalogEntry {
            id: id.into(),
            target: "shop".into(),
            label: None,
            created_at: at(created),
            format: BackupFormat::Custom,
            scope: BackupScope::Full,
            schema_version: None,
            verified: true,
            verified_at: None,
            restore_tested: false,
            size: 1,
            files: Vec::new(),
            deployment_id: deployment,
            path: "x".into(),
        }
    }

    fn row(d: Uuid, backup: Option<&str>, state: RowState, on: i64) -> RunRow {
        RunRow {
            deployment_id: Some(d),
            backup_id: backup.map(Into::into),
            state,
            script: format!("V{on}__x.sql"),
            installed_on: at(on),
        }
    }

    fn ids(v: &[(String, String)]) -> Vec<&str> {
        let mut ids: Vec<&str> = v.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn finished_deployments_protect_nothing() {
        let d = Uuid::new_v4();
        let rows = [
            row(d, Some("b1"), RowState::Success, 2),
            row(d, Some("b1"), RowState::Success, 3),
        ];
        let entries = [entry("b1", 1, Some(d)), entry("manual", 5, None)];
        assert!(protected_by_history(&rows, &entries).is_empty());
    }

    #[test]
    fn failed_and_running_deployments_keep_their_backups_until_repaired() {
        let (failed, running, repaired) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let rows = [
            row(failed, Some("b-failed"), RowState::Success, 2),
            row(failed, Some("b-failed"), RowState::Failed, 3),
            row(repaired, Some("b-repaired"), RowState::Repaired, 5),
            row(running, Some("b-running"), RowState::Running, 7),
        ];
        let entries = [
            entry("b-failed", 1, Some(failed)),
            entry("b-repaired", 4, Some(repaired)),
            entry("b-running", 6, Some(running)),
        ];
        let got = protected_by_history(&rows, &entries);
        assert_eq!(ids(&got), ["b-failed", "b-running"]);
        let note = &got.iter().find(|(id, _)| id == "b-failed").expect("kept").1;
        assert!(
            note.contains(&failed.to_string()) && note.contains("V3__x.sql is failed"),
            "{note}"
        );
    }

    #[test]
    fn a_manifest_without_deployment_id_is_found_through_the_rows() {
        let d = Uuid::new_v4();
        let rows = [row(d, Some("old"), RowState::Failed, 2)];
        let got = protected_by_history(&rows, &[entry("old", 1, None)]);
        assert_eq!(ids(&got), ["old"]);
    }

    #[test]
    fn the_newest_backup_of_a_deployment_with_no_rows_yet_is_kept() {
        let (done, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let rows = [row(done, Some("b-done"), RowState::Success, 2)];
        let entries = [
            entry("b-done", 1, Some(done)),
            // Before the last row: superseded by the deployment that followed.
            entry("b-early", 0, Some(a)),
            entry("b-new", 4, Some(b)),
            entry("manual", 5, None),
        ];
        let got = protected_by_history(&rows, &entries);
        assert_eq!(ids(&got), ["b-new"]);
        assert!(got[0].1.contains("recorded no migration yet"), "{got:?}");
        // With an empty history, the newest pre-deployment backup is kept.
        assert_eq!(ids(&protected_by_history(&[], &entries)), ["b-new"]);
    }

    #[test]
    fn errors_keep_their_class() {
        let e = ApiError::from(BackupError::BackupNotFound {
            target: "shop".into(),
            id: "x".into(),
            dir: "/b".into(),
        });
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("backup x of target shop"), "{e}");
        let e = ApiError::from(BackupError::DiskFull {
            target: "shop".into(),
            dir: "/b".into(),
        });
        assert_eq!(e.kind, ErrorKind::OutOfSpace);
        let e = ApiError::from(BackupError::Invalid("bad".into()));
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn unknown_and_unconfigured_targets_are_told_apart() {
        let api = LocalBackups::new().without_backups("orders", "set `backup_dir` for it");
        let e = api.list("orders").await.expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(
            e.message.contains("\"orders\"") && e.message.contains("backup_dir"),
            "{e}"
        );
        let e = api.list("nope").await.expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::UnknownTarget);
        assert!(e.message.contains("orders"), "{e}");
    }
}
