//! Creating a backup: `pg_dump` inside an exported snapshot, row counts in the same snapshot,
//! files hashed, manifest last, then the directory renamed into the catalog.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use belay_core::DatabaseUrl;
use chrono::Utc;
use sqlx::Row;

use crate::catalog::{PARTIAL_SUFFIX, new_id};
use crate::db::{self, qualified};
use crate::files::{describe_files, size_of, write_manifest};
use crate::model::{
    BackupFormat, BackupKind, BackupRequest, BackupScope, Manifest, Operation, Progress, TableCount,
};
use crate::proc::{is_disk_full, run_watched, table_of_line};
use crate::tools::{ChildConn, stderr_summary};
use crate::{BackupError, BackupManager, ProgressFn};

/// Layout version of `manifest.json`.
const MANIFEST_VERSION: u32 = 1;

/// Removes a directory on drop unless disarmed: no partial backup survives a failure (or a
/// cancelled future).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        // Parallel pg_dump workers may still be exiting (and writing) for a moment after
        // their leader was killed: retry briefly.
        for attempt in 0..20 {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => return,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
                Err(err) if attempt == 19 => {
                    tracing::warn!(dir = %dir.display(), %err, "could not remove a partial backup");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// One backup's end, as the metrics tell it: a failure counted, a success's duration, size
/// and finishing time.
fn record_metrics(target: &str, result: &Result<Manifest, BackupError>) {
    use belay_telemetry::names;
    let target = target.to_string();
    match result {
        Ok(m) => {
            metrics::histogram!(names::BACKUP_DURATION_SECONDS, "target" => target.clone())
                .record(m.duration_ms as f64 / 1000.0);
            metrics::gauge!(names::BACKUP_SIZE_BYTES, "target" => target.clone())
                .set(m.total_size() as f64);
            metrics::gauge!(names::BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS, "target" => target)
                .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        Err(_) => metrics::counter!(names::BACKUP_FAILURES_TOTAL, "target" => target).increment(1),
    }
}

impl BackupManager {
    /// Backs up the database at `url` as backup of `target`, into `<root>/<target>/<id>/`.
    /// On any failure the partial backup is removed and the catalog is unchanged. Counted in
    /// the backup metrics either way (`belay_backup_*{target}`).
    ///
    /// The manifest's kind is the request's, or else pre-deployment when the request
    /// names a deployment and manual otherwise; belay's own snapshots and emergency
    /// backups record theirs.
    pub async fn create(
        &self,
        url: &DatabaseUrl,
        target: &str,
        req: &BackupRequest,
        progress: ProgressFn<'_>,
    ) -> Result<Manifest, BackupError> {
        let kind = req.kind.unwrap_or(if req.deployment_id.is_some() {
            BackupKind::PreDeployment
        } else {
            BackupKind::Manual
        });
        self.create_kind(url, target, req, kind, progress).await
    }

    pub(crate) async fn create_kind(
        &self,
        url: &DatabaseUrl,
        target: &str,
        req: &BackupRequest,
        kind: BackupKind,
        progress: ProgressFn<'_>,
    ) -> Result<Manifest, BackupError> {
        let result = self
            .create_unmetered(url, target, req, kind, progress)
            .await;
        record_metrics(target, &result);
        if let Ok(m) = &result {
            self.record_rate(
                target,
                crate::rates::RateKind::Create,
                crate::RateSample {
                    at: Utc::now(),
                    backup_id: m.id.clone(),
                    bytes: m.total_size(),
                    ms: m.duration_ms,
                },
            );
        }
        result
    }

    async fn create_unmetered(
        &self,
        url: &DatabaseUrl,
        target: &str,
        req: &BackupRequest,
        kind: BackupKind,
        progress: ProgressFn<'_>,
    ) -> Result<Manifest, BackupError> {
        let started = Instant::now();
        let catalog = self.catalog(target)?;
        match (&req.format, &req.scope) {
            (BackupFormat::Directory { jobs: 0 }, _) => {
                return Err(BackupError::Invalid(
                    "directory format needs jobs >= 1".into(),
                ));
            }
            (_, BackupScope::Tables(t)) if t.is_empty() => {
                return Err(BackupError::Invalid(
                    "a tables backup needs at least one table".into(),
                ));
            }
            _ => {}
        }
        let runner = self.runner().await?;
        let mut db = db::connect(url, target).await?;
        let (server_version, server_version_num) = db.server_version().await?;
        runner
            .tools
            .check_server(target, server_version_num, &server_version)?;

        // One snapshot for pg_dump and for our row counts: the counts describe exactly the
        // rows in the dump.
        db.exec("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        // The row counts take ACCESS SHARE locks too: bound their wait like pg_dump's.
        db.exec(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            self.lock_wait_timeout.as_millis().max(1)
        ))
        .await?;
        // The counts run beside pg_dump: one backend each, no parallel workers, so they
        // neither take workers the application may need nor compete with pg_dump's own
        // backend and compression for the server's cores.
        db.exec("SET LOCAL max_parallel_workers_per_gather = 0")
            .await?;
        let err = db.err("exporting a snapshot");
        let snapshot: String = sqlx::query("SELECT pg_export_snapshot()")
            .fetch_one(&mut db.conn)
            .await
            .map_err(err)?
            .get(0);
        let tables = match &req.scope {
            BackupScope::Full | BackupScope::SchemaOnly => db.user_tables().await?,
            BackupScope::Tables(names) => db.resolve_tables(names).await?,
        };
        let applied_versions = db.applied_versions(&self.history_schema).await?;
        let schema_version = applied_versions.last().cloned();

        let created_at = Utc::now();
        let id = new_id(created_at);
        std::fs::create_dir_all(catalog.dir())
            .map_err(|e| io_or_full(e, "could not create", catalog.dir(), target))?;
        let partial = catalog.dir().join(format!("{id}{PARTIAL_SUFFIX}"));
        std::fs::create_dir(&partial)
            .map_err(|e| io_or_full(e, "could not create", &partial, target))?;
        let mut guard = RemoveOnDrop(Some(partial.clone()));
        let dump_path = partial.join(req.format.dump_path());

        let conn = ChildConn::new(url)?;
        let mut args = vec![
            "--verbose".to_owned(),
            "--no-password".to_owned(),
            format!("--snapshot={snapshot}"),
            format!(
                "--lock-wait-timeout={}ms",
                self.lock_wait_timeout.as_millis().max(1)
            ),
            format!("--file={}", dump_path.display()),
        ];
        match req.format {
            BackupFormat::Custom => args.push("--format=custom".into()),
            BackupFormat::Directory { jobs } => {
                args.push("--format=directory".into());
                args.push(format!("--jobs={jobs}"));
            }
        }
        match &req.scope {
            BackupScope::Full => {}
            BackupScope::SchemaOnly => args.push("--schema-only".into()),
            BackupScope::Tables(_) => {
                args.push("--strict-names".into());
                for (schema, name) in &tables {
                    // Quoted: matched literally, not as a pattern.
                    args.push(format!("--table={}", qualified(schema, name)));
                }
            }
        }
        args.push(format!("--dbname={}", conn.conninfo));
        let cmd = runner.command("pg_dump", args, Some(&conn));

        let total = if req.scope.has_data() {
            tables.len()
        } else {
            0
        };
        progress(Progress::Started {
            operation: Operation::Create,
            target: target.to_owned(),
            id: id.clone(),
            tables: total,
        });
        let done = Mutex::new(0usize);
        let mut on_line = |line: &str| {
            if let Some(name) = table_of_line(line) {
                let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                *d += 1;
                progress(Progress::Table {
                    name: name.to_owned(),
                    done: *d,
                    total,
                });
            }
        };
        let limit = self.size_limit;
        let mut last_written = 0u64;
        let mut on_tick = || {
            let written = size_of(&dump_path);
            if written != last_written {
                last_written = written;
                progress(Progress::Bytes { written });
            }
            match limit {
                Some(limit) if written > limit => Err(BackupError::SizeLimit {
                    target: target.to_owned(),
                    dir: partial.clone(),
                    limit,
                    written,
                }),
                _ => Ok(()),
            }
        };
        let dumping = run_watched(
            cmd,
            "pg_dump",
            Duration::from_millis(200),
            &mut on_line,
            &mut on_tick,
        );
        let has_data = req.scope.has_data();
        let counting = async {
            let mut counts = Vec::with_capacity(tables.len());
            for (schema, name) in &tables {
                let rows = if has_data {
                    Some(db.count(schema, name).await?)
                } else {
                    None
                };
                counts.push(TableCount {
                    schema: schema.clone(),
                    name: name.clone(),
                    rows,
                    columns: Some(db.columns(schema, name).await?),
                });
            }
            Ok::<_, BackupError>(counts)
        };
        let (dumped, counted) = tokio::join!(dumping, counting);
        let _ = db.exec("ROLLBACK").await;
        db::close(db).await;

        let run = dumped?;
        if !run.status.success() {
            if is_disk_full(&run.stderr) {
                return Err(BackupError::DiskFull {
                    target: target.to_owned(),
                    dir: catalog.dir().to_path_buf(),
                });
            }
            let mut stderr = stderr_summary(&run.stderr);
            if stderr.contains("LOCK TABLE") && stderr.contains("timeout") {
                stderr = format!(
                    "{stderr} | another session holds a table exclusively; pg_dump gave up after the lock wait bound of {} ms: retry once it is released",
                    self.lock_wait_timeout.as_millis()
                );
            }
            return Err(BackupError::ToolFailed {
                tool: "pg_dump".into(),
                target: target.to_owned(),
                status: run.status.to_string(),
                stderr,
            });
        }
        let tables = counted?;
        let written = size_of(&dump_path);
        if let Some(limit) = limit
            && written > limit
        {
            return Err(BackupError::SizeLimit {
                target: target.to_owned(),
                dir: partial.clone(),
                limit,
                written,
            });
        }
        progress(Progress::Bytes { written });

        let dir = partial.clone();
        let files = tokio::task::spawn_blocking(move || describe_files(&dir))
            .await
            .map_err(|e| {
                BackupError::Invalid(format!("hashing the backup files panicked: {e}"))
            })??;
        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            id: id.clone(),
            target: target.to_owned(),
            label: req.label.clone(),
            created_at,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            database: url.database(),
            server_version,
            server_version_num,
            pg_dump_version: runner.tools.pg_dump_version.clone(),
            schema_version,
            applied_versions,
            kind: Some(kind),
            format: req.format,
            scope: req.scope.clone(),
            snapshot: Some(snapshot),
            files,
            tables,
            verified: false,
            verified_at: None,
            restore_tested: false,
            deployment_id: req.deployment_id,
        };
        write_manifest(&partial, &manifest).map_err(|e| match e {
            BackupError::Io {
                source,
                path,
                action,
            } => io_or_full(source, &action, &path, target),
            other => other,
        })?;
        let final_dir = catalog.backup_dir(&id)?;
        std::fs::rename(&partial, &final_dir).map_err(BackupError::io(
            "could not move the finished backup to",
            &final_dir,
        ))?;
        guard.disarm();
        tracing::info!(target, id = %manifest.id, bytes = manifest.total_size(), "backup created");
        progress(Progress::Finished {
            operation: Operation::Create,
            target: target.to_owned(),
            id,
            bytes: manifest.total_size(),
            duration_ms: manifest.duration_ms,
        });
        Ok(manifest)
    }
}

fn io_or_full(err: std::io::Error, action: &str, path: &Path, target: &str) -> BackupError {
    if err.kind() == std::io::ErrorKind::StorageFull || err.raw_os_error() == Some(28) {
        BackupError::DiskFull {
            target: target.to_owned(),
            dir: path.to_path_buf(),
        }
    } else {
        BackupError::Io {
            action: action.to_owned(),
            path: path.to_path_buf(),
            source: err,
        }
    }
}
