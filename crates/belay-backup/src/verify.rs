//! Verifying a backup: every file against the manifest, the archive readable by
//! `pg_restore --list`, optionally a restore into a scratch database.

use std::path::Path;
use std::time::Instant;

use belay_core::DatabaseUrl;
use chrono::Utc;

use crate::db::{self, quote_ident};
use crate::files::{sha256_file, write_manifest};
use crate::model::{
    BackupFormat, BackupScope, Manifest, RestoreTestReport, VerifyProblem, VerifyReport,
};
use crate::restore::table_list;
use crate::tools::{ChildConn, Runner, stderr_summary};
use crate::{BackupError, BackupManager};

impl BackupManager {
    /// Verifies backup `id` of `target` and records the outcome (`verified`, `verified_at`)
    /// in its manifest. A bad backup is `Ok` with `ok: false` and the problems, each naming
    /// its file; `Err` means verification itself could not run.
    ///
    /// With `restore_test` (an admin URL of a server to use), the backup is also restored
    /// into a scratch database there, its tables' row counts compared with the manifest, and
    /// the scratch database dropped again, whatever happened.
    pub async fn verify(
        &self,
        target: &str,
        id: &str,
        restore_test: Option<&DatabaseUrl>,
    ) -> Result<VerifyReport, BackupError> {
        let started = Instant::now();
        let catalog = self.catalog(target)?;
        let mut manifest = catalog.get(id)?;
        let dir = catalog.backup_dir(id)?;
        let runner = self.runner().await?;

        let (mut problems, bytes_checked) = check_files(&dir, &manifest).await?;
        let (archive_entries, unreadable) = list_archive(&runner, &dir, &manifest).await?;
        problems.extend(unreadable);

        let mut restore_report = None;
        if let Some(admin) = restore_test
            && problems.is_empty()
        {
            let (report, found) = self.restore_test(&runner, admin, &dir, &manifest).await?;
            restore_report = Some(report);
            problems.extend(found);
        }

        let ok = problems.is_empty();
        let verified_at = Utc::now();
        manifest.verified = ok;
        manifest.verified_at = Some(verified_at);
        manifest.restore_tested = ok && restore_report.is_some();
        write_manifest(&dir, &manifest)?;
        if ok {
            tracing::info!(target, id, "backup verified");
        } else {
            tracing::warn!(
                target,
                id,
                problems = problems.len(),
                "backup failed verification"
            );
        }
        Ok(VerifyReport {
            target: target.to_owned(),
            id: id.to_owned(),
            ok,
            verified_at,
            files_checked: manifest.files.len(),
            bytes_checked,
            archive_entries,
            restore_test: restore_report,
            problems,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn restore_test(
        &self,
        runner: &Runner,
        admin: &DatabaseUrl,
        dir: &Path,
        manifest: &Manifest,
    ) -> Result<(RestoreTestReport, Vec<VerifyProblem>), BackupError> {
        let target = manifest.target.as_str();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let scratch = format!("belay_verify_{}", &random[..12]);
        let mut admin_db = db::connect(admin, target).await?;
        admin_db
            .exec(&format!(
                "CREATE DATABASE {} TEMPLATE template0",
                quote_ident(&scratch)
            ))
            .await?;

        let outcome = async {
            let scratch_url = url_with_database(admin, &scratch)?;
            let conn = ChildConn::new(admin)?.with_database(&scratch)?;
            let archive = dir.join(manifest.format.dump_path());
            let mut args = vec![
                "--no-owner".to_owned(),
                "--no-privileges".to_owned(),
                "--exit-on-error".to_owned(),
                "--no-password".to_owned(),
            ];
            // A tables backup restores into an empty database without the tables its
            // foreign keys point to, and without its schemas (pg_dump --table omits them).
            let mut _list = None;
            if let BackupScope::Tables(_) = manifest.scope {
                create_schemas(&scratch_url, target, manifest).await?;
                let tables: Vec<(String, String)> = manifest
                    .tables
                    .iter()
                    .map(|t| (t.schema.clone(), t.name.clone()))
                    .collect();
                let list = table_list(runner, &archive, target, &tables, false).await?;
                args.push(format!("--use-list={}", list.path().display()));
                _list = Some(list);
            }
            if let BackupFormat::Directory { jobs } = manifest.format
                && jobs > 1
            {
                args.push(format!("--jobs={jobs}"));
            }
            args.push(format!("--dbname={}", conn.conninfo));
            args.push(archive.display().to_string());
            let out = runner
                .command("pg_restore", args, Some(&conn))
                .output()
                .await
                .map_err(BackupError::io(
                    "could not run",
                    runner.tools.program("pg_restore"),
                ))?;
            if !out.status.success() {
                return Ok(vec![VerifyProblem::RestoreFailed {
                    error: stderr_summary(&String::from_utf8_lossy(&out.stderr)),
                }]);
            }
            let mut problems = Vec::new();
            let mut sdb = db::connect(&scratch_url, target).await?;
            for t in &manifest.tables {
                let Some(expected) = t.rows else { continue };
                let actual = sdb.count(&t.schema, &t.name).await?;
                if actual != expected {
                    problems.push(VerifyProblem::RowCountMismatch {
                        table: t.qualified(),
                        expected,
                        actual,
                    });
                }
            }
            db::close(sdb).await;
            Ok::<_, BackupError>(problems)
        }
        .await;

        // Always drop the scratch database, whatever happened above.
        let drop_sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&scratch)
        );
        let dropped = match admin_db.exec(&drop_sql).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(%err, database = %scratch, "could not drop the scratch database");
                false
            }
        };
        db::close(admin_db).await;
        let problems = outcome?;
        Ok((
            RestoreTestReport {
                database: scratch,
                tables_compared: manifest.tables.iter().filter(|t| t.rows.is_some()).count(),
                dropped,
            },
            problems,
        ))
    }
}

/// Sizes and checksums of every file of the manifest.
pub(crate) async fn check_files(
    dir: &Path,
    manifest: &Manifest,
) -> Result<(Vec<VerifyProblem>, u64), BackupError> {
    let dir = dir.to_path_buf();
    let files = manifest.files.clone();
    tokio::task::spawn_blocking(move || {
        let mut problems = Vec::new();
        let mut bytes = 0u64;
        for f in files {
            if f.path.split('/').any(|c| c == ".." || c.is_empty()) {
                problems.push(VerifyProblem::FileMissing { path: f.path });
                continue;
            }
            let path = dir.join(&f.path);
            let Ok(meta) = std::fs::metadata(&path) else {
                problems.push(VerifyProblem::FileMissing { path: f.path });
                continue;
            };
            if meta.len() != f.size {
                problems.push(VerifyProblem::SizeMismatch {
                    path: f.path,
                    expected: f.size,
                    actual: meta.len(),
                });
                continue;
            }
            let (size, sha) = sha256_file(&path)?;
            bytes += size;
            if sha != f.sha256 {
                problems.push(VerifyProblem::ChecksumMismatch {
                    path: f.path,
                    expected: f.sha256,
                    actual: sha,
                });
            }
        }
        Ok((problems, bytes))
    })
    .await
    .map_err(|e| BackupError::Invalid(format!("checking files panicked: {e}")))?
}

/// `pg_restore --list`: the number of entries, or why the archive cannot be read.
pub(crate) async fn list_archive(
    runner: &Runner,
    dir: &Path,
    manifest: &Manifest,
) -> Result<(usize, Vec<VerifyProblem>), BackupError> {
    let rel = manifest.format.dump_path();
    let out = runner
        .command(
            "pg_restore",
            vec!["--list".into(), dir.join(rel).display().to_string()],
            None,
        )
        .output()
        .await
        .map_err(BackupError::io(
            "could not run",
            runner.tools.program("pg_restore"),
        ))?;
    if !out.status.success() {
        return Ok((
            0,
            vec![VerifyProblem::Unreadable {
                path: rel.to_owned(),
                error: stderr_summary(&String::from_utf8_lossy(&out.stderr)),
            }],
        ));
    }
    let entries = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .count();
    Ok((entries, Vec::new()))
}

/// The same server and credentials, another database.
pub(crate) fn url_with_database(url: &DatabaseUrl, db: &str) -> Result<DatabaseUrl, BackupError> {
    let mut parsed = url::Url::parse(url.expose())
        .map_err(|e| BackupError::Invalid(format!("cannot parse database URL {url}: {e}")))?;
    let encoded: String = db
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    parsed.set_path(&format!("/{encoded}"));
    DatabaseUrl::parse(parsed.as_str())
        .map_err(|e| BackupError::Invalid(format!("cannot build a URL for database {db}: {e}")))
}

/// `pg_dump --table` does not dump the tables' schemas: create them before restoring into
/// an empty database.
pub(crate) async fn create_schemas(
    url: &DatabaseUrl,
    target: &str,
    manifest: &Manifest,
) -> Result<(), BackupError> {
    let mut db = db::connect(url, target).await?;
    let mut schemas: Vec<&str> = manifest.tables.iter().map(|t| t.schema.as_str()).collect();
    schemas.sort_unstable();
    schemas.dedup();
    for s in schemas {
        db.exec(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s)))
            .await?;
    }
    db::close(db).await;
    Ok(())
}
