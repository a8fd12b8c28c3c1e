//! `BackupService` over gRPC: the protobuf ↔ domain conversions of backups (kept here,
//! beside the only code that uses them), [`BackupGrpc`] serving any
//! [`belay_backup::BackupApi`], and [`BackupClient`] implementing that trait against an
//! agent or a controller. Progress streams over `Create` and `Restore`, each stream
//! ending with the operation's result. Paths and database names cross the wire; URLs
//! never do (the serving side holds them).

use crate::InFlight;
use crate::client::Connection;
use crate::convert::{self, DecodeError, target, target_name};
use belay_auth::MaybeTokenAttach;
use belay_backup::{
    BackupApi, BackupFormat, BackupKind, BackupRequest, BackupScope, CatalogEntry, FileEntry,
    KeepReason, KeptBackup, Manifest, Operation, Progress, ProgressSink, PruneReport, PruneRequest,
    RestoreReport, RestoreRequest, RestoreTestReport, TableCheck, TableCount, VerifyProblem,
    VerifyReport,
};
use belay_core::{ApiError, ErrorKind};
use belay_proto::v1 as pb;
use pb::backup_service_client::BackupServiceClient;
use pb::backup_service_server::{BackupService, BackupServiceServer};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn opt_ts(
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, DecodeError> {
    t.map(convert::from_timestamp).transpose()
}

fn required_ts(
    t: Option<&prost_types::Timestamp>,
    what: &'static str,
) -> Result<chrono::DateTime<chrono::Utc>, DecodeError> {
    opt_ts(t)?.ok_or_else(|| bad(what, "no timestamp"))
}

fn opt_uuid(s: Option<&str>) -> Result<Option<uuid::Uuid>, DecodeError> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => convert::parse_uuid(s).map(Some),
    }
}

// ---- formats, scopes, files ----

/// The format's enum value and its parallel jobs (0 for custom).
pub fn format(f: &BackupFormat) -> (i32, u32) {
    match f {
        BackupFormat::Custom => (pb::BackupFormat::Custom as i32, 0),
        BackupFormat::Directory { jobs } => (pb::BackupFormat::Directory as i32, *jobs),
    }
}

/// Unspecified is custom (the default); a directory backup without jobs gets 2.
pub fn format_from(value: i32, jobs: u32) -> Result<BackupFormat, DecodeError> {
    match pb::BackupFormat::try_from(value) {
        Ok(pb::BackupFormat::Unspecified | pb::BackupFormat::Custom) => Ok(BackupFormat::Custom),
        Ok(pb::BackupFormat::Directory) => Ok(BackupFormat::Directory {
            jobs: if jobs == 0 { 2 } else { jobs },
        }),
        Err(_) => Err(bad("backup format", format!("unknown value {value}"))),
    }
}

fn scope_tables(s: &BackupScope) -> Vec<String> {
    match s {
        BackupScope::Tables(t) => t.clone(),
        _ => Vec::new(),
    }
}

/// `full` (or empty), `schema`/`schema_only`, `tables` (with at least one table).
pub fn scope_from(name: &str, tables: &[String]) -> Result<BackupScope, DecodeError> {
    match name {
        "" | "full" => Ok(BackupScope::Full),
        "schema" | "schema_only" => Ok(BackupScope::SchemaOnly),
        "tables" => Ok(BackupScope::Tables(tables.to_vec())),
        other => Err(bad(
            "backup scope",
            format!("{other:?}: expected full, schema_only or tables"),
        )),
    }
}

fn file(f: &FileEntry) -> pb::BackupFile {
    pb::BackupFile {
        path: f.path.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
    }
}

fn file_from(f: &pb::BackupFile) -> FileEntry {
    FileEntry {
        path: f.path.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
    }
}

// ---- manifests and catalog entries ----

pub fn manifest(m: &Manifest) -> pb::BackupManifest {
    let (format, jobs) = format(&m.format);
    pb::BackupManifest {
        id: m.id.clone(),
        target: m.target.clone(),
        created_at: Some(convert::timestamp(m.created_at)),
        server_version: m.server_version.clone(),
        pg_dump_version: m.pg_dump_version.clone(),
        schema_version: m.schema_version.clone(),
        format,
        scope: m.scope.name().to_owned(),
        files: m.files.iter().map(file).collect(),
        tables: m
            .tables
            .iter()
            .map(|t| pb::TableRows {
                schema: t.schema.clone(),
                name: t.name.clone(),
                rows: t.rows,
                columns: t.columns.clone().unwrap_or_default(),
                columns_known: t.columns.is_some(),
            })
            .collect(),
        verified: m.verified,
        verified_at: m.verified_at.map(convert::timestamp),
        label: m.label.clone(),
        duration_ms: m.duration_ms,
        database: m.database.clone(),
        server_version_num: m.server_version_num,
        snapshot: m.snapshot.clone(),
        restore_tested: m.restore_tested,
        deployment_id: m.deployment_id.map(|d| d.to_string()),
        manifest_version: m.manifest_version,
        jobs,
        scope_tables: scope_tables(&m.scope),
        size: m.total_size(),
        path: String::new(),
        kind: m.kind.map(|k| k.name().to_owned()).unwrap_or_default(),
        applied_versions: m.applied_versions.clone(),
    }
}

pub fn manifest_from(m: &pb::BackupManifest) -> Result<Manifest, DecodeError> {
    Ok(Manifest {
        manifest_version: m.manifest_version,
        id: m.id.clone(),
        target: m.target.clone(),
        label: m.label.clone(),
        created_at: required_ts(m.created_at.as_ref(), "backup created_at")?,
        duration_ms: m.duration_ms,
        database: m.database.clone(),
        server_version: m.server_version.clone(),
        server_version_num: m.server_version_num,
        pg_dump_version: m.pg_dump_version.clone(),
        schema_version: m.schema_version.clone(),
        format: format_from(m.format, m.jobs)?,
        scope: scope_from(&m.scope, &m.scope_tables)?,
        snapshot: m.snapshot.clone(),
        files: m.files.iter().map(file_from).collect(),
        tables: m
            .tables
            .iter()
            .map(|t| TableCount {
                schema: t.schema.clone(),
                name: t.name.clone(),
                rows: t.rows,
                columns: t.columns_known.then(|| t.columns.clone()),
            })
            .collect(),
        verified: m.verified,
        verified_at: opt_ts(m.verified_at.as_ref())?,
        restore_tested: m.restore_tested,
        deployment_id: opt_uuid(m.deployment_id.as_deref())?,
        applied_versions: m.applied_versions.clone(),
        kind: match m.kind.as_str() {
            "" => None,
            k => Some(
                BackupKind::parse(k)
                    .ok_or_else(|| bad("backup kind", format!("unknown kind {k:?}")))?,
            ),
        },
    })
}

/// A catalog entry (what `List` answers): the manifest's catalog fields and the path.
pub fn entry(e: &CatalogEntry) -> pb::BackupManifest {
    let (format, jobs) = format(&e.format);
    pb::BackupManifest {
        id: e.id.clone(),
        target: e.target.clone(),
        created_at: Some(convert::timestamp(e.created_at)),
        schema_version: e.schema_version.clone(),
        format,
        scope: e.scope.name().to_owned(),
        files: e.files.iter().map(file).collect(),
        verified: e.verified,
        verified_at: e.verified_at.map(convert::timestamp),
        label: e.label.clone(),
        restore_tested: e.restore_tested,
        deployment_id: e.deployment_id.map(|d| d.to_string()),
        jobs,
        scope_tables: scope_tables(&e.scope),
        size: e.size,
        path: e.path.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

pub fn entry_from(m: &pb::BackupManifest) -> Result<CatalogEntry, DecodeError> {
    Ok(CatalogEntry {
        id: m.id.clone(),
        target: m.target.clone(),
        label: m.label.clone(),
        created_at: required_ts(m.created_at.as_ref(), "backup created_at")?,
        format: format_from(m.format, m.jobs)?,
        scope: scope_from(&m.scope, &m.scope_tables)?,
        schema_version: m.schema_version.clone(),
        verified: m.verified,
        verified_at: opt_ts(m.verified_at.as_ref())?,
        restore_tested: m.restore_tested,
        size: m.size,
        files: m.files.iter().map(file_from).collect(),
        deployment_id: opt_uuid(m.deployment_id.as_deref())?,
        path: PathBuf::from(&m.path),
    })
}

// ---- verification ----

pub fn problem(p: &VerifyProblem) -> pb::BackupProblem {
    let mut out = pb::BackupProblem {
        message: p.to_string(),
        ..Default::default()
    };
    match p {
        VerifyProblem::FileMissing { path } => {
            out.kind = "file_missing".into();
            out.path.clone_from(path);
        }
        VerifyProblem::SizeMismatch {
            path,
            expected,
            actual,
        } => {
            out.kind = "size_mismatch".into();
            out.path.clone_from(path);
            out.expected = expected.to_string();
            out.actual = actual.to_string();
        }
        VerifyProblem::ChecksumMismatch {
            path,
            expected,
            actual,
        } => {
            out.kind = "checksum_mismatch".into();
            out.path.clone_from(path);
            out.expected.clone_from(expected);
            out.actual.clone_from(actual);
        }
        VerifyProblem::Unreadable { path, error } => {
            out.kind = "unreadable".into();
            out.path.clone_from(path);
            out.error.clone_from(error);
        }
        VerifyProblem::RestoreFailed { error } => {
            out.kind = "restore_failed".into();
            out.error.clone_from(error);
        }
        VerifyProblem::RowCountMismatch {
            table,
            expected,
            actual,
        } => {
            out.kind = "row_count_mismatch".into();
            out.table.clone_from(table);
            out.expected = expected.to_string();
            out.actual = actual.to_string();
        }
    }
    out
}

pub fn problem_from(p: &pb::BackupProblem) -> Result<VerifyProblem, DecodeError> {
    fn num<T: std::str::FromStr>(s: &str, kind: &str) -> Result<T, DecodeError> {
        s.parse()
            .map_err(|_| bad("backup problem", format!("{kind}: {s:?} is not a number")))
    }
    Ok(match p.kind.as_str() {
        "file_missing" => VerifyProblem::FileMissing {
            path: p.path.clone(),
        },
        "size_mismatch" => VerifyProblem::SizeMismatch {
            path: p.path.clone(),
            expected: num(&p.expected, &p.kind)?,
            actual: num(&p.actual, &p.kind)?,
        },
        "checksum_mismatch" => VerifyProblem::ChecksumMismatch {
            path: p.path.clone(),
            expected: p.expected.clone(),
            actual: p.actual.clone(),
        },
        "unreadable" => VerifyProblem::Unreadable {
            path: p.path.clone(),
            error: p.error.clone(),
        },
        "restore_failed" => VerifyProblem::RestoreFailed {
            error: p.error.clone(),
        },
        "row_count_mismatch" => VerifyProblem::RowCountMismatch {
            table: p.table.clone(),
            expected: num(&p.expected, &p.kind)?,
            actual: num(&p.actual, &p.kind)?,
        },
        // A problem a newer server knows: keep its words rather than drop it.
        _ => VerifyProblem::Unreadable {
            path: p.path.clone(),
            error: p.message.clone(),
        },
    })
}

pub fn verify_report(r: &VerifyReport) -> pb::VerifyBackupResponse {
    pb::VerifyBackupResponse {
        target: r.target.clone(),
        id: r.id.clone(),
        ok: r.ok,
        verified_at: Some(convert::timestamp(r.verified_at)),
        files_checked: count(r.files_checked),
        bytes_checked: r.bytes_checked,
        archive_entries: count(r.archive_entries),
        restore_test: r.restore_test.as_ref().map(|t| pb::RestoreTestResult {
            database: t.database.clone(),
            tables_compared: count(t.tables_compared),
            dropped: t.dropped,
        }),
        problems: r.problems.iter().map(problem).collect(),
        duration_ms: r.duration_ms,
    }
}

pub fn verify_report_from(r: &pb::VerifyBackupResponse) -> Result<VerifyReport, DecodeError> {
    Ok(VerifyReport {
        target: r.target.clone(),
        id: r.id.clone(),
        ok: r.ok,
        verified_at: required_ts(r.verified_at.as_ref(), "verified_at")?,
        files_checked: r.files_checked as usize,
        bytes_checked: r.bytes_checked,
        archive_entries: r.archive_entries as usize,
        restore_test: r.restore_test.as_ref().map(|t| RestoreTestReport {
            database: t.database.clone(),
            tables_compared: t.tables_compared as usize,
            dropped: t.dropped,
        }),
        problems: r
            .problems
            .iter()
            .map(problem_from)
            .collect::<Result<_, _>>()?,
        duration_ms: r.duration_ms,
    })
}

// ---- restore ----

fn check(c: &TableCheck) -> pb::TableRowCheck {
    pb::TableRowCheck {
        table: c.table.clone(),
        expected: c.expected,
        actual: c.actual,
    }
}

fn check_from(c: &pb::TableRowCheck) -> TableCheck {
    TableCheck {
        table: c.table.clone(),
        expected: c.expected,
        actual: c.actual,
    }
}

pub fn restore_report(r: &RestoreReport) -> pb::RestoreBackupReport {
    pb::RestoreBackupReport {
        target: r.target.clone(),
        id: r.id.clone(),
        database: r.database.clone(),
        into_new_database: r.into_new_database,
        selected_tables: r.tables.is_some(),
        tables: r.tables.clone().unwrap_or_default(),
        emergency_backup: r.emergency_backup.clone(),
        forced: r.forced,
        verification_problems: r.verification_problems.iter().map(problem).collect(),
        checks: r.checks.iter().map(check).collect(),
        mismatches: r.mismatches.iter().map(check).collect(),
        foreign_keys_readded: r.foreign_keys_readded.clone(),
        duration_ms: r.duration_ms,
    }
}

pub fn restore_report_from(r: &pb::RestoreBackupReport) -> Result<RestoreReport, DecodeError> {
    Ok(RestoreReport {
        target: r.target.clone(),
        id: r.id.clone(),
        database: r.database.clone(),
        into_new_database: r.into_new_database,
        tables: r.selected_tables.then(|| r.tables.clone()),
        emergency_backup: r.emergency_backup.clone(),
        forced: r.forced,
        verification_problems: r
            .verification_problems
            .iter()
            .map(problem_from)
            .collect::<Result<_, _>>()?,
        checks: r.checks.iter().map(check_from).collect(),
        mismatches: r.mismatches.iter().map(check_from).collect(),
        foreign_keys_readded: r.foreign_keys_readded.clone(),
        duration_ms: r.duration_ms,
    })
}

pub fn restore_request(target: &str, id: &str, r: &RestoreRequest) -> pb::RestoreBackupRequest {
    pb::RestoreBackupRequest {
        target: Some(pb::Target {
            name: target.to_owned(),
        }),
        id: id.to_owned(),
        tables: r.tables.clone().unwrap_or_default(),
        into: r.into.clone(),
        force: r.force,
        skip_emergency_backup: !r.emergency_backup,
        across_versions: r.across_versions,
    }
}

pub fn restore_request_from(r: &pb::RestoreBackupRequest) -> RestoreRequest {
    RestoreRequest {
        tables: (!r.tables.is_empty()).then(|| r.tables.clone()),
        into: r.into.clone().filter(|s| !s.is_empty()),
        force: r.force,
        emergency_backup: !r.skip_emergency_backup,
        across_versions: r.across_versions,
        // Not on the wire yet: remote rollbacks come with `RollbackService`.
        keep_history: false,
    }
}

// ---- create ----

pub fn create_request(target: &str, r: &BackupRequest) -> pb::CreateBackupRequest {
    let (format, jobs) = format(&r.format);
    pb::CreateBackupRequest {
        target: Some(pb::Target {
            name: target.to_owned(),
        }),
        format,
        jobs,
        scope: r.scope.name().to_owned(),
        tables: scope_tables(&r.scope),
        deployment_id: r.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
        label: r.label.clone(),
    }
}

pub fn create_request_from(r: &pb::CreateBackupRequest) -> Result<BackupRequest, DecodeError> {
    Ok(BackupRequest {
        format: format_from(r.format, r.jobs)?,
        scope: scope_from(&r.scope, &r.tables)?,
        label: r.label.clone(),
        deployment_id: opt_uuid(Some(&r.deployment_id))?,
        kind: None,
    })
}

// ---- prune ----

fn keep_reason(r: KeepReason) -> &'static str {
    match r {
        KeepReason::Retained => "retained",
        KeepReason::LatestVerified => "latest_verified",
        KeepReason::Protected => "protected",
        KeepReason::AwaitingVerification => "awaiting_verification",
    }
}

fn keep_reason_from(s: &str) -> Result<KeepReason, DecodeError> {
    Ok(match s {
        "retained" => KeepReason::Retained,
        "latest_verified" => KeepReason::LatestVerified,
        "protected" => KeepReason::Protected,
        "awaiting_verification" => KeepReason::AwaitingVerification,
        other => return Err(bad("keep reason", format!("unknown value {other:?}"))),
    })
}

pub fn prune_report(r: &PruneReport) -> pb::PruneBackupsResponse {
    pb::PruneBackupsResponse {
        deleted: r.deleted.iter().map(|e| e.id.clone()).collect(),
        target: r.target.clone(),
        dry_run: r.dry_run,
        deleted_backups: r.deleted.iter().map(entry).collect(),
        kept: r
            .kept
            .iter()
            .map(|k| pb::KeptBackup {
                id: k.id.clone(),
                reason: keep_reason(k.reason).to_owned(),
                note: k.note.clone(),
            })
            .collect(),
        incomplete_removed: r
            .incomplete_removed
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
    }
}

pub fn prune_report_from(r: &pb::PruneBackupsResponse) -> Result<PruneReport, DecodeError> {
    Ok(PruneReport {
        target: r.target.clone(),
        dry_run: r.dry_run,
        deleted: r
            .deleted_backups
            .iter()
            .map(entry_from)
            .collect::<Result<_, _>>()?,
        kept: r
            .kept
            .iter()
            .map(|k| {
                Ok(KeptBackup {
                    id: k.id.clone(),
                    reason: keep_reason_from(&k.reason)?,
                    note: k.note.clone(),
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        incomplete_removed: r.incomplete_removed.iter().map(PathBuf::from).collect(),
    })
}

// ---- progress ----

fn operation(op: Operation) -> i32 {
    match op {
        Operation::Create => pb::BackupOperation::Create as i32,
        Operation::Restore => pb::BackupOperation::Restore as i32,
    }
}

fn operation_from(v: i32) -> Result<Operation, DecodeError> {
    match pb::BackupOperation::try_from(v) {
        Ok(pb::BackupOperation::Create) => Ok(Operation::Create),
        Ok(pb::BackupOperation::Restore) => Ok(Operation::Restore),
        _ => Err(bad("backup operation", format!("unknown value {v}"))),
    }
}

/// A progress event of operation `op` on `target` (the events that do not name them
/// carry them anyway, so every message says what it is about).
pub fn progress(op: Operation, target: &str, p: &Progress) -> pb::BackupProgress {
    use pb::backup_progress::Progress as P;
    let mut out = pb::BackupProgress {
        operation: operation(op),
        target: target.to_owned(),
        ..Default::default()
    };
    match p {
        Progress::Started {
            operation: o,
            target: t,
            id,
            tables,
        } => {
            out.operation = operation(*o);
            out.target.clone_from(t);
            out.total_tables = count(*tables);
            out.progress = Some(P::Started(id.clone()));
        }
        Progress::Table { name, done, total } => {
            out.done_tables = count(*done);
            out.total_tables = count(*total);
            out.progress = Some(P::Table(name.clone()));
        }
        Progress::Bytes { written } => out.progress = Some(P::BytesWritten(*written)),
        Progress::Finished {
            operation: o,
            target: t,
            id,
            bytes,
            duration_ms,
        } => {
            out.operation = operation(*o);
            out.target.clone_from(t);
            out.progress = Some(P::Done(pb::BackupDone {
                id: id.clone(),
                bytes: *bytes,
                duration_ms: *duration_ms,
            }));
        }
    }
    out
}

/// The progress event a message carries; `None` for the results (`finished`,
/// `restored`) and for an empty message.
pub fn progress_from(p: &pb::BackupProgress) -> Result<Option<Progress>, DecodeError> {
    use pb::backup_progress::Progress as P;
    Ok(Some(match &p.progress {
        Some(P::Started(id)) => Progress::Started {
            operation: operation_from(p.operation)?,
            target: p.target.clone(),
            id: id.clone(),
            tables: p.total_tables as usize,
        },
        Some(P::Table(name)) => Progress::Table {
            name: name.clone(),
            done: p.done_tables as usize,
            total: p.total_tables as usize,
        },
        Some(P::BytesWritten(written)) => Progress::Bytes { written: *written },
        Some(P::Done(d)) => Progress::Finished {
            operation: operation_from(p.operation)?,
            target: p.target.clone(),
            id: d.id.clone(),
            bytes: d.bytes,
            duration_ms: d.duration_ms,
        },
        Some(P::Finished(_) | P::Restored(_)) | None => return Ok(None),
    }))
}

// ---- server ----

/// The gRPC face of a backup capability: the agent serves its targets' catalogs through
/// it, the controller its router to agents.
pub struct BackupGrpc<T: ?Sized> {
    api: Arc<T>,
    ops: InFlight,
}

impl<T: ?Sized> Clone for BackupGrpc<T> {
    fn clone(&self) -> Self {
        BackupGrpc {
            api: self.api.clone(),
            ops: self.ops.clone(),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for BackupGrpc<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupGrpc").finish_non_exhaustive()
    }
}

impl<T: BackupApi + ?Sized + 'static> BackupGrpc<T> {
    pub fn new(api: Arc<T>) -> Self {
        BackupGrpc {
            api,
            ops: InFlight::new(),
        }
    }

    /// Creates and restores in flight. On shutdown a daemon closes it and waits (bounded):
    /// a restore cut off half-way helps no one.
    pub fn ops(&self) -> &InFlight {
        &self.ops
    }

    pub fn into_service(self) -> BackupServiceServer<Self> {
        BackupServiceServer::new(self)
    }
}

type ProgressStream = ReceiverStream<Result<pb::BackupProgress, Status>>;

/// Runs `work` in its own task, forwarding progress and then its result (made into the
/// stream's last message by `last`) into a stream. The task is not tied to the caller: a
/// client that disconnects does not abandon a restore half-way.
fn op_stream<F, Fut, R>(
    ops: &InFlight,
    op: Operation,
    target: String,
    span: tracing::Span,
    work: F,
    last: fn(&R) -> pb::backup_progress::Progress,
) -> ProgressStream
where
    F: FnOnce(ProgressSink) -> Fut,
    Fut: std::future::Future<Output = Result<R, ApiError>> + Send + 'static,
    R: Send + 'static,
{
    // Bounded: a slow reader slows the operation's progress reports, nothing piles up.
    let (tx, rx) = crate::stream::channel(crate::stream::CAPACITY);
    let events = tx.clone();
    let event_target = target.clone();
    let sink: ProgressSink = Arc::new(move |p| {
        let _ = events.send_blocking(Ok(progress(op, &event_target, &p)));
    });
    let fut = work(sink);
    let last_word = tx.clone();
    ops.spawn(
        async move {
            let msg = match fut.await {
                Ok(result) => Ok(pb::BackupProgress {
                    operation: operation(op),
                    target,
                    progress: Some(last(&result)),
                    ..Default::default()
                }),
                Err(e) => Err(convert::status_from(&e)),
            };
            let _ = tx.send(msg).await;
        }
        .instrument(span),
        move || async move {
            let _ =
                last_word.send_now(Err(Status::unavailable(crate::inflight::CANCELLED_AT_STOP)));
        },
    );
    rx
}

fn status(e: &ApiError) -> Status {
    convert::status_from(e)
}

#[tonic::async_trait]
impl<T: BackupApi + ?Sized + 'static> BackupService for BackupGrpc<T> {
    type CreateStream = ProgressStream;

    async fn create(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateStream>, Status> {
        let r = req.into_inner();
        let target = target_name(r.target.as_ref())?;
        let request = create_request_from(&r)?;
        let api = self.api.clone();
        let t = target.clone();
        Ok(Response::new(op_stream(
            &self.ops,
            Operation::Create,
            target.clone(),
            info_span!("backup_create", target = %target),
            move |sink| async move { api.create(&t, &request, sink).await },
            |m| pb::backup_progress::Progress::Finished(manifest(m)),
        )))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        let report = self
            .api
            .verify(&target, &r.id, r.restore_test)
            .instrument(info_span!("backup_verify", target = %target, id = %r.id))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(verify_report(&report)))
    }

    async fn list(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let target = target_name(req.get_ref().target.as_ref())?;
        let entries = self
            .api
            .list(&target)
            .instrument(info_span!("backup_list", target = %target))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListBackupsResponse {
            backups: entries.iter().map(entry).collect(),
        }))
    }

    type RestoreStream = ProgressStream;

    async fn restore(
        &self,
        req: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let r = req.into_inner();
        let target = target_name(r.target.as_ref())?;
        let request = restore_request_from(&r);
        let api = self.api.clone();
        let (t, id) = (target.clone(), r.id.clone());
        Ok(Response::new(op_stream(
            &self.ops,
            Operation::Restore,
            target.clone(),
            info_span!("backup_restore", target = %target, id = %r.id),
            move |sink| async move { api.restore(&t, &id, &request, sink).await },
            |report| pb::backup_progress::Progress::Restored(restore_report(report)),
        )))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneBackupsRequest>,
    ) -> Result<Response<pb::PruneBackupsResponse>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        let request = PruneRequest {
            keep: r.keep as usize,
            dry_run: r.dry_run,
            protect: r.protect.clone(),
            force: r.force,
        };
        let report = self
            .api
            .prune(&target, &request)
            .instrument(info_span!("backup_prune", target = %target))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(prune_report(&report)))
    }

    async fn snapshot_tables(
        &self,
        req: Request<pb::SnapshotTablesRequest>,
    ) -> Result<Response<pb::BackupManifest>, Status> {
        let r = req.get_ref();
        let target = target_name(r.target.as_ref())?;
        let m = self
            .api
            .snapshot_tables(&target, &r.tables, &r.reason)
            .instrument(info_span!("backup_snapshot_tables", target = %target))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(manifest(&m)))
    }
}

// ---- client ----

/// `BackupApi` over gRPC: the CLI's remote mode and the controller's calls to agents.
#[derive(Clone, Debug)]
pub struct BackupClient {
    client: BackupServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl BackupClient {
    pub fn new(conn: &Connection) -> Self {
        BackupClient {
            client: BackupServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }

    fn err(&self, s: &Status) -> ApiError {
        convert::api_error_from(s, &self.peer)
    }

    /// Forwards progress until the result arrives; `pick` takes the result from the last
    /// message.
    async fn drain<R>(
        &self,
        mut stream: tonic::Streaming<pb::BackupProgress>,
        sink: ProgressSink,
        what: &str,
        pick: fn(&pb::BackupProgress) -> Option<Result<R, DecodeError>>,
    ) -> Result<R, ApiError> {
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if let Some(result) = pick(&msg) {
                        return Ok(result?);
                    }
                    if let Some(p) = progress_from(&msg)? {
                        sink(p);
                    }
                }
                Ok(None) => return Err(cut_short(Ok(()), &self.peer, what)),
                Err(s) => return Err(cut_short(Err(&s), &self.peer, what)),
            }
        }
    }
}

fn cut_short(result: Result<(), &Status>, peer: &crate::client::Peer, what: &str) -> ApiError {
    convert::stream_cut_short(result, peer, what, "`belay backup list` shows the catalog")
}

#[async_trait::async_trait]
impl BackupApi for BackupClient {
    async fn create(
        &self,
        t: &str,
        req: &BackupRequest,
        progress: ProgressSink,
    ) -> Result<Manifest, ApiError> {
        let stream = self
            .client
            .clone()
            .create(create_request(t, req))
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        self.drain(stream, progress, "backup", |m| match &m.progress {
            Some(pb::backup_progress::Progress::Finished(f)) => Some(manifest_from(f)),
            _ => None,
        })
        .await
    }

    async fn list(&self, t: &str) -> Result<Vec<CatalogEntry>, ApiError> {
        let r = self
            .client
            .clone()
            .list(pb::ListBackupsRequest { target: target(t) })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(r.get_ref()
            .backups
            .iter()
            .map(entry_from)
            .collect::<Result<_, _>>()?)
    }

    async fn verify(
        &self,
        t: &str,
        id: &str,
        restore_test: bool,
    ) -> Result<VerifyReport, ApiError> {
        let r = self
            .client
            .clone()
            .verify(pb::VerifyBackupRequest {
                target: target(t),
                id: id.to_owned(),
                restore_test,
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(verify_report_from(r.get_ref())?)
    }

    async fn restore(
        &self,
        t: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressSink,
    ) -> Result<RestoreReport, ApiError> {
        let stream = self
            .client
            .clone()
            .restore(restore_request(t, id, req))
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        self.drain(stream, progress, "restore", |m| match &m.progress {
            Some(pb::backup_progress::Progress::Restored(r)) => Some(restore_report_from(r)),
            _ => None,
        })
        .await
    }

    async fn prune(&self, t: &str, req: &PruneRequest) -> Result<PruneReport, ApiError> {
        let keep = u32::try_from(req.keep).map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("--keep {} is too large", req.keep),
            )
        })?;
        let r = self
            .client
            .clone()
            .prune(pb::PruneBackupsRequest {
                target: target(t),
                keep,
                dry_run: req.dry_run,
                protect: req.protect.clone(),
                force: req.force,
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(prune_report_from(r.get_ref())?)
    }

    async fn snapshot_tables(
        &self,
        t: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, ApiError> {
        let r = self
            .client
            .clone()
            .snapshot_tables(pb::SnapshotTablesRequest {
                target: target(t),
                tables: tables.to_vec(),
                reason: reason.to_owned(),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(manifest_from(r.get_ref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid time")
            .with_timezone(&Utc)
    }

    fn sample_manifest(format: BackupFormat, scope: BackupScope) -> Manifest {
        Manifest {
            manifest_version: 1,
            id: "20260422T101530.123Z-3f9a1c".into(),
            target: "shop".into(),
            label: Some("before deployment".into()),
            created_at: at("2026-04-22T10:15:30.123456789Z"),
            duration_ms: 1234,
            database: Some("shop".into()),
            server_version: "17.2".into(),
            server_version_num: 170002,
            pg_dump_version: "pg_dump (PostgreSQL) 17.2".into(),
            schema_version: Some("3".into()),
            applied_versions: vec!["1".into(), "2".into(), "3".into()],
            kind: Some(BackupKind::PreUndo),
            format,
            scope,
            snapshot: Some("00000003-0000001B-1".into()),
            files: vec![FileEntry {
                path: "dump.pgdump".into(),
                size: 4096,
                sha256: "ab".repeat(32),
            }],
            tables: vec![
                TableCount {
                    schema: "public".into(),
                    name: "orders".into(),
                    rows: Some(50),
                    columns: Some(vec!["id integer".into(), "note text".into()]),
                },
                TableCount {
                    schema: "public".into(),
                    name: "empty".into(),
                    rows: None,
                    columns: None,
                },
            ],
            verified: true,
            verified_at: Some(at("2026-04-22T10:16:00Z")),
            restore_tested: true,
            deployment_id: Some(uuid::Uuid::new_v4()),
        }
    }

    #[test]
    fn manifests_round_trip_in_every_format_and_scope() {
        for (format, scope) in [
            (BackupFormat::Custom, BackupScope::Full),
            (BackupFormat::Directory { jobs: 4 }, BackupScope::SchemaOnly),
            (
                BackupFormat::Custom,
                BackupScope::Tables(vec!["public.orders".into(), "b".into()]),
            ),
        ] {
            let m = sample_manifest(format, scope);
            assert_eq!(manifest_from(&manifest(&m)).expect("decodes"), m);
            let mut bare = m.clone();
            bare.label = None;
            bare.verified_at = None;
            bare.deployment_id = None;
            bare.snapshot = None;
            assert_eq!(manifest_from(&manifest(&bare)).expect("decodes"), bare);
        }
    }

    #[test]
    fn catalog_entries_round_trip_with_their_path() {
        let m = sample_manifest(
            BackupFormat::Directory { jobs: 2 },
            BackupScope::Tables(vec!["orders".into()]),
        );
        let e = CatalogEntry::from_manifest(m, PathBuf::from("/var/lib/belay/backups/shop/x"));
        assert_eq!(entry_from(&entry(&e)).expect("decodes"), e);
        assert_eq!(entry(&e).size, 4096);
    }

    #[test]
    fn verify_reports_round_trip_with_every_problem() {
        let problems = vec![
            VerifyProblem::FileMissing {
                path: "dump/1.dat.gz".into(),
            },
            VerifyProblem::SizeMismatch {
                path: "dump.pgdump".into(),
                expected: 10,
                actual: 7,
            },
            VerifyProblem::ChecksumMismatch {
                path: "dump.pgdump".into(),
                expected: "aa".into(),
                actual: "bb".into(),
            },
            VerifyProblem::Unreadable {
                path: "dump.pgdump".into(),
                error: "bad magic".into(),
            },
            VerifyProblem::RestoreFailed {
                error: "relation exists".into(),
            },
            VerifyProblem::RowCountMismatch {
                table: "public.orders".into(),
                expected: 50,
                actual: -1,
            },
        ];
        let r = VerifyReport {
            target: "shop".into(),
            id: "x".into(),
            ok: false,
            verified_at: at("2026-04-22T10:16:00.5Z"),
            files_checked: 3,
            bytes_checked: 99,
            archive_entries: 12,
            restore_test: Some(RestoreTestReport {
                database: "belay_verify_x".into(),
                tables_compared: 2,
                dropped: true,
            }),
            problems,
            duration_ms: 77,
        };
        let wire = verify_report(&r);
        assert_eq!(verify_report_from(&wire).expect("decodes"), r);
        // Generic clients get the problem in words too.
        assert!(
            wire.problems[1].message.contains("7 bytes"),
            "{:?}",
            wire.problems[1]
        );
    }

    #[test]
    fn restore_and_prune_reports_round_trip() {
        let check = TableCheck {
            table: "public.orders".into(),
            expected: Some(50),
            actual: 49,
        };
        for tables in [None, Some(vec!["orders".into()]), Some(Vec::new())] {
            let r = RestoreReport {
                target: "shop".into(),
                id: "x".into(),
                database: "shop".into(),
                into_new_database: false,
                tables,
                emergency_backup: Some("y".into()),
                forced: true,
                verification_problems: vec![VerifyProblem::FileMissing { path: "a".into() }],
                checks: vec![check.clone()],
                mismatches: vec![check.clone()],
                foreign_keys_readded: vec!["lines_order_fk".into()],
                duration_ms: 5,
            };
            assert_eq!(
                restore_report_from(&restore_report(&r)).expect("decodes"),
                r
            );
        }
        let deleted = CatalogEntry::from_manifest(
            sample_manifest(BackupFormat::Custom, BackupScope::Full),
            PathBuf::from("/b/shop/x"),
        );
        let p = PruneReport {
            target: "shop".into(),
            dry_run: true,
            deleted: vec![deleted],
            kept: vec![
                KeptBackup {
                    id: "a".into(),
                    reason: KeepReason::Protected,
                    note: Some("deployment d is unfinished".into()),
                },
                KeptBackup {
                    id: "b".into(),
                    reason: KeepReason::LatestVerified,
                    note: None,
                },
                KeptBackup {
                    id: "c".into(),
                    reason: KeepReason::Retained,
                    note: None,
                },
                KeptBackup {
                    id: "d".into(),
                    reason: KeepReason::AwaitingVerification,
                    note: None,
                },
            ],
            incomplete_removed: vec![PathBuf::from("/b/shop/y.partial")],
        };
        let wire = prune_report(&p);
        assert_eq!(wire.deleted, ["20260422T101530.123Z-3f9a1c"]);
        assert_eq!(prune_report_from(&wire).expect("decodes"), p);
    }

    #[test]
    fn requests_and_progress_round_trip() {
        for req in [
            BackupRequest::default(),
            BackupRequest {
                format: BackupFormat::Directory { jobs: 3 },
                scope: BackupScope::Tables(vec!["a".into()]),
                label: Some("l".into()),
                deployment_id: Some(uuid::Uuid::new_v4()),
                kind: None,
            },
            BackupRequest {
                scope: BackupScope::SchemaOnly,
                ..Default::default()
            },
        ] {
            let wire = create_request("shop", &req);
            assert_eq!(wire.target.as_ref().map(|t| t.name.as_str()), Some("shop"));
            assert_eq!(create_request_from(&wire).expect("decodes"), req);
        }
        for req in [
            RestoreRequest::full(),
            RestoreRequest::tables(["orders"]),
            RestoreRequest {
                into: Some("copy".into()),
                force: true,
                ..Default::default()
            },
            RestoreRequest {
                across_versions: true,
                ..RestoreRequest::tables(["orders"])
            },
        ] {
            assert_eq!(
                restore_request_from(&restore_request("shop", "x", &req)),
                req
            );
        }
        for p in [
            Progress::Started {
                operation: Operation::Restore,
                target: "shop".into(),
                id: "x".into(),
                tables: 3,
            },
            Progress::Table {
                name: "public.orders".into(),
                done: 2,
                total: 3,
            },
            Progress::Bytes { written: 1 << 40 },
            Progress::Finished {
                operation: Operation::Create,
                target: "shop".into(),
                id: "x".into(),
                bytes: 10,
                duration_ms: 20,
            },
        ] {
            let wire = progress(Operation::Create, "shop", &p);
            assert_eq!(progress_from(&wire).expect("decodes"), Some(p));
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut m = manifest(&sample_manifest(BackupFormat::Custom, BackupScope::Full));
        m.scope = "everything".into();
        assert!(manifest_from(&m).is_err());
        m.scope = "full".into();
        m.created_at = None;
        assert!(manifest_from(&m).is_err());
        m.created_at = Some(convert::timestamp(chrono::Utc::now()));
        m.deployment_id = Some("not-a-uuid".into());
        assert!(manifest_from(&m).is_err());
        m.deployment_id = None;
        m.format = 99;
        assert!(manifest_from(&m).is_err());
        let p = pb::BackupProblem {
            kind: "size_mismatch".into(),
            expected: "ten".into(),
            ..Default::default()
        };
        assert!(problem_from(&p).is_err());
        let create = pb::CreateBackupRequest {
            scope: "nope".into(),
            ..Default::default()
        };
        let status = Status::from(create_request_from(&create).expect_err("bad scope"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
