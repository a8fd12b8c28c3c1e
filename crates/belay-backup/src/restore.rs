//! Restoring a backup: in full (`--clean --if-exists`, one transaction), into a new
//! database, or selected tables in place — each behind verification and, when it destroys
//! current data, an emergency backup.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use belay_core::DatabaseUrl;
use sqlx::Row;

use crate::db::{self, qualified, quote_ident};
use crate::model::{
    BackupFormat, BackupKind, BackupRequest, BackupScope, EMERGENCY_LABEL, Manifest, Operation,
    Progress, RestoreReport, RestoreRequest, TableCheck, VerifyReport,
};
use crate::proc::{run_watched, table_of_line};
use crate::rates::{RateKind, RateSample};
use crate::tools::{ChildConn, Runner, stderr_summary};
use crate::verify::{create_schemas, url_with_database};
use crate::{BackupError, BackupManager, ProgressFn};

/// Where a restore goes.
struct Dest {
    url: DatabaseUrl,
    /// Its database name, for the report.
    database: String,
    in_place: bool,
    /// When the restore began (its verification included), for the measured rate.
    began: Instant,
}

impl BackupManager {
    /// Restores backup `id` of `target` into the database at `url` (or, with `req.into`, into
    /// a new database on the same server). Refuses a backup that fails verification unless
    /// `req.force`. Before restoring in place it takes an emergency backup of what it is about
    /// to overwrite (unless `req.emergency_backup` is false) and reports its id.
    ///
    /// A full restore runs `pg_restore --clean --if-exists --single-transaction`: it fails
    /// as a whole or succeeds as a whole. Objects created after the backup are not dropped.
    /// A table restore replaces only the named tables (definition, data, indexes,
    /// constraints, triggers, owned sequences) in one transaction; foreign keys of other
    /// tables pointing at them are dropped and re-added (validated) around it, and the
    /// restore is refused if views depend on them, and — when the backup is of another
    /// schema version than the database — unless `req.across_versions` and the tables'
    /// columns are the same now as then. A restore into a new database that fails drops
    /// that database again.
    pub async fn restore(
        &self,
        url: &DatabaseUrl,
        target: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressFn<'_>,
    ) -> Result<RestoreReport, BackupError> {
        let began = Instant::now();
        let manifest = self.catalog(target)?.get(id)?;
        let verification = self.verify(target, id, None).await?;
        if !verification.ok && !req.force {
            return Err(BackupError::VerificationFailed {
                target: target.to_owned(),
                id: id.to_owned(),
                problems: verification.problems,
            });
        }
        let selected = match &req.tables {
            Some(names) => Some(select_tables(&manifest, names)?),
            None => None,
        };

        // A rollback (`keep_history`) returns the tables to the backup's version on purpose
        // and records the revert in history itself: the version check is not for it (with
        // `across_versions` alone, a migration that added a column would refuse it).
        if let (Some(tables), None, false) = (&selected, &req.into, req.keep_history) {
            self.check_schema_version(url, target, &manifest, tables, req.across_versions)
                .await?;
        }

        // Where to.
        let Some(name) = &req.into else {
            let database = url.database().unwrap_or_default();
            let dest = Dest {
                url: url.clone(),
                database,
                in_place: true,
                began,
            };
            return self
                .restore_to(
                    url,
                    dest,
                    target,
                    &manifest,
                    verification,
                    selected,
                    req,
                    progress,
                )
                .await;
        };
        create_database(url, target, name).await?;
        let result = match url_with_database(url, name) {
            Ok(dest_url) => {
                let dest = Dest {
                    url: dest_url,
                    database: name.clone(),
                    in_place: false,
                    began,
                };
                self.restore_to(
                    url,
                    dest,
                    target,
                    &manifest,
                    verification,
                    selected,
                    req,
                    progress,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(report) => Ok(report),
            // The database was created for this restore alone: a failed restore removes
            // it, so nothing half-restored is left for someone to take for a copy and a
            // retry with the same name starts clean.
            Err(e) => {
                let cleanup = match drop_database(url, target, name).await {
                    Ok(()) => format!("database {name} was dropped again: a retry starts clean"),
                    Err(drop) => format!(
                        "database {name} could not be dropped ({drop}): drop it (DROP DATABASE {}) before retrying",
                        quote_ident(name)
                    ),
                };
                Err(BackupError::IntoFailed {
                    target: target.to_owned(),
                    id: id.to_owned(),
                    name: name.clone(),
                    source: Box::new(e),
                    cleanup,
                })
            }
        }
    }

    /// A table restore in place puts back the tables' definitions as they were: refused
    /// when the backup is of another schema version than the database, unless the caller
    /// says so and every table's columns are the same now as then (so history stays true).
    async fn check_schema_version(
        &self,
        url: &DatabaseUrl,
        target: &str,
        manifest: &Manifest,
        tables: &[(String, String)],
        across_versions: bool,
    ) -> Result<(), BackupError> {
        let mut d = db::connect(url, target).await?;
        let current = d.applied_versions(&self.history_schema).await?.pop();
        if current == manifest.schema_version {
            db::close(d).await;
            return Ok(());
        }
        let shown = |v: &Option<String>| {
            v.clone()
                .unwrap_or_else(|| "none (no migration applied)".to_owned())
        };
        let (backup_version, current_version) = (shown(&manifest.schema_version), shown(&current));
        let names = || {
            tables
                .iter()
                .map(|(s, n)| format!("{s}.{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !across_versions {
            db::close(d).await;
            return Err(BackupError::SchemaVersionMismatch {
                target: target.to_owned(),
                id: manifest.id.clone(),
                backup_version,
                current_version,
                tables: names(),
            });
        }
        let mut changes = Vec::new();
        for (schema, name) in tables {
            let then = manifest
                .tables
                .iter()
                .find(|t| &t.schema == schema && &t.name == name)
                .and_then(|t| t.columns.clone());
            let now = d.columns(schema, name).await?;
            match then {
                None => changes.push(format!(
                    "{schema}.{name}: the backup predates column recording, so belay cannot tell what changed"
                )),
                Some(_) if now.is_empty() => changes.push(format!(
                    "{schema}.{name} no longer exists (a migration since dropped it)"
                )),
                Some(then) if then != now => {
                    let lost: Vec<&String> = now.iter().filter(|c| !then.contains(c)).collect();
                    let back: Vec<&String> = then.iter().filter(|c| !now.contains(c)).collect();
                    changes.push(format!(
                        "{schema}.{name} changed since: restoring would drop ({}) and bring back ({})",
                        join(&lost),
                        join(&back)
                    ));
                }
                Some(_) => {}
            }
        }
        db::close(d).await;
        if changes.is_empty() {
            return Ok(());
        }
        Err(BackupError::TableChangedSince {
            target: target.to_owned(),
            id: manifest.id.clone(),
            backup_version,
            current_version,
            changes: changes.join("; "),
        })
    }

    /// The restore proper, once the destination exists.
    #[allow(clippy::too_many_arguments)]
    async fn restore_to(
        &self,
        url: &DatabaseUrl,
        dest: Dest,
        target: &str,
        manifest: &Manifest,
        verification: VerifyReport,
        selected: Option<Vec<(String, String)>>,
        req: &RestoreRequest,
        progress: ProgressFn<'_>,
    ) -> Result<RestoreReport, BackupError> {
        let started = Instant::now();
        let id = manifest.id.as_str();
        let dir = self.catalog(target)?.backup_dir(id)?;
        let runner = self.runner().await?;
        let Dest {
            url: dest_url,
            database,
            in_place,
            began,
        } = dest;

        // A snapshot of some tables restored into a new database: their foreign keys may
        // point at tables the snapshot does not hold (`orders.account_id` → `accounts`),
        // which a whole-archive pg_restore would fail on. So it is restored as `--tables`
        // naming each of its tables would be, without foreign keys (a recovery copy beside
        // the live data, not a replacement), and the recover command a rollback prints
        // works on its own.
        let selected = match (&selected, &manifest.scope) {
            (None, BackupScope::Tables(_)) if !in_place => Some(
                manifest
                    .tables
                    .iter()
                    .filter(|t| t.rows.is_some())
                    .map(|t| (t.schema.clone(), t.name.clone()))
                    .collect(),
            ),
            _ => selected,
        };

        let mut emergency = None;
        let mut emergency_took = Duration::ZERO;
        if in_place && req.emergency_backup {
            let at = Instant::now();
            emergency = self
                .emergency_backup(url, target, id, selected.as_deref())
                .await?;
            emergency_took = at.elapsed();
        }

        let conn = ChildConn::new(&dest_url)?;
        let archive = dir.join(manifest.format.dump_path());
        let restored: Vec<(String, String)> = match &selected {
            Some(t) => t.clone(),
            None => manifest
                .tables
                .iter()
                .filter(|t| t.rows.is_some())
                .filter(|t| !(req.keep_history && t.schema == self.history_schema()))
                .map(|t| (t.schema.clone(), t.name.clone()))
                .collect(),
        };
        progress(Progress::Started {
            operation: Operation::Restore,
            target: target.to_owned(),
            id: id.to_owned(),
            tables: restored.len(),
        });

        let mut readded = Vec::new();
        match &selected {
            None => {
                let mut args = vec![
                    "--verbose".to_owned(),
                    "--no-password".to_owned(),
                    "--exit-on-error".to_owned(),
                    "--single-transaction".to_owned(),
                ];
                // Held until pg_restore is done with it.
                let mut without_history = None;
                if in_place {
                    args.push("--clean".into());
                    args.push("--if-exists".into());
                    if req.keep_history {
                        let list =
                            history_free_list(&runner, &archive, target, self.history_schema())
                                .await?;
                        args.push(format!("--use-list={}", list.path().display()));
                        without_history = Some(list);
                    }
                }
                args.push(format!("--dbname={}", conn.conninfo));
                args.push(archive.display().to_string());
                let mut cmd = runner.command("pg_restore", args, Some(&conn));
                self.bound_lock_waits(&mut cmd);
                let done = Mutex::new(0usize);
                let total = restored.len();
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
                let run = run_watched(
                    cmd,
                    "pg_restore",
                    Duration::from_secs(1),
                    &mut on_line,
                    &mut || Ok(()),
                )
                .await?;
                if !run.status.success() {
                    return Err(restore_failed(target, run.status.to_string(), &run.stderr));
                }
                drop(without_history);
            }
            Some(tables) => {
                let list = table_list(&runner, &archive, target, tables, in_place).await?;
                if in_place {
                    readded = self
                        .restore_tables_in_place(
                            &runner,
                            &dest_url,
                            &conn,
                            target,
                            tables,
                            list.path(),
                            &archive,
                        )
                        .await?;
                } else {
                    create_schemas(&dest_url, target, manifest).await?;
                    let args = vec![
                        "--no-password".to_owned(),
                        "--exit-on-error".to_owned(),
                        "--single-transaction".to_owned(),
                        format!("--use-list={}", list.path().display()),
                        format!("--dbname={}", conn.conninfo),
                        archive.display().to_string(),
                    ];
                    let out = runner
                        .command("pg_restore", args, Some(&conn))
                        .output()
                        .await
                        .map_err(BackupError::io(
                            "could not run",
                            runner.tools.program("pg_restore"),
                        ))?;
                    if !out.status.success() {
                        return Err(restore_failed(
                            target,
                            out.status.to_string(),
                            &String::from_utf8_lossy(&out.stderr),
                        ));
                    }
                }
                for (i, (schema, name)) in tables.iter().enumerate() {
                    progress(Progress::Table {
                        name: format!("{schema}.{name}"),
                        done: i + 1,
                        total: tables.len(),
                    });
                }
            }
        }

        // Row counts against the manifest.
        let mut checks = Vec::new();
        let mut ddb = db::connect(&dest_url, target).await?;
        for (schema, name) in &restored {
            let expected = manifest
                .tables
                .iter()
                .find(|t| &t.schema == schema && &t.name == name)
                .and_then(|t| t.rows);
            let actual = ddb.count(schema, name).await?;
            checks.push(TableCheck {
                table: format!("{schema}.{name}"),
                expected,
                actual,
            });
        }
        db::close(ddb).await;
        let mismatches: Vec<TableCheck> = checks
            .iter()
            .filter(|c| c.expected.is_some_and(|e| e != c.actual))
            .cloned()
            .collect();
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if mismatches.is_empty() && self.read_whole_archive(manifest, &restored) {
            let took = began.elapsed().saturating_sub(emergency_took);
            self.record_rate(
                target,
                RateKind::Restore,
                RateSample {
                    at: chrono::Utc::now(),
                    backup_id: id.to_owned(),
                    bytes: manifest.total_size(),
                    ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                },
            );
        }
        progress(Progress::Finished {
            operation: Operation::Restore,
            target: target.to_owned(),
            id: id.to_owned(),
            bytes: manifest.total_size(),
            duration_ms,
        });
        tracing::info!(target, id, database, "backup restored");
        Ok(RestoreReport {
            target: target.to_owned(),
            id: id.to_owned(),
            database,
            into_new_database: !in_place,
            tables: selected.map(|t| t.iter().map(|(s, n)| format!("{s}.{n}")).collect()),
            emergency_backup: emergency,
            forced: !verification.ok,
            verification_problems: verification.problems,
            checks,
            mismatches,
            foreign_keys_readded: readded,
            duration_ms,
        })
    }

    /// Whether restoring `restored` read every table's data in the archive (belay's
    /// history aside): only then are the archive's bytes the restore's bytes, for its rate.
    /// A schema-only archive tells nothing of a data restore's rate.
    fn read_whole_archive(&self, manifest: &Manifest, restored: &[(String, String)]) -> bool {
        manifest.scope.has_data()
            && manifest
                .tables
                .iter()
                .filter(|t| t.rows.is_some() && t.schema != self.history_schema())
                .all(|t| restored.iter().any(|(s, n)| *s == t.schema && *n == t.name))
    }

    /// Bounds every lock wait of a restore's session (`lock_timeout`, see
    /// [`BackupManager::with_restore_lock_timeout`]): its DROP and CREATE take ACCESS
    /// EXCLUSIVE locks, and an unbounded wait behind one long transaction would queue the
    /// application behind the restore. The restore is one transaction, so a timeout
    /// leaves the database unchanged and the caller may retry.
    fn bound_lock_waits(&self, cmd: &mut tokio::process::Command) {
        if let Some(t) = self.restore_lock_timeout() {
            cmd.env(
                "PGOPTIONS",
                format!("-c lock_timeout={}", t.as_millis().max(1)),
            );
        }
    }

    /// A verified backup of what a restore in place is about to overwrite: the whole
    /// database, or the selected tables that exist now. `None` if nothing exists to lose.
    async fn emergency_backup(
        &self,
        url: &DatabaseUrl,
        target: &str,
        id: &str,
        tables: Option<&[(String, String)]>,
    ) -> Result<Option<String>, BackupError> {
        let scope = match tables {
            None => BackupScope::Full,
            Some(tables) => {
                let mut d = db::connect(url, target).await?;
                let mut existing = Vec::new();
                for (schema, name) in tables {
                    let q = qualified(schema, name);
                    if d.resolve_table(&q).await?.is_some() {
                        existing.push(q);
                    }
                }
                db::close(d).await;
                if existing.is_empty() {
                    return Ok(None);
                }
                BackupScope::Tables(existing)
            }
        };
        let req = BackupRequest {
            format: BackupFormat::Custom,
            scope,
            label: Some(format!("{EMERGENCY_LABEL} {id}")),
            deployment_id: None,
            kind: Some(BackupKind::Emergency),
        };
        let manifest = self
            .create_kind(url, target, &req, BackupKind::Emergency, &|_| {})
            .await?;
        let report = self.verify(target, &manifest.id, None).await?;
        if !report.ok {
            return Err(BackupError::VerificationFailed {
                target: target.to_owned(),
                id: manifest.id,
                problems: report.problems,
            });
        }
        Ok(Some(manifest.id))
    }

    /// Drops the tables (after checking no view needs them, and dropping other tables'
    /// foreign keys to them), recreates them from the archive and re-adds those foreign
    /// keys: one `psql --single-transaction` fed by `pg_restore --use-list -f -`.
    #[allow(clippy::too_many_arguments)]
    async fn restore_tables_in_place(
        &self,
        runner: &Runner,
        dest_url: &DatabaseUrl,
        conn: &ChildConn,
        target: &str,
        tables: &[(String, String)],
        list: &Path,
        archive: &Path,
    ) -> Result<Vec<String>, BackupError> {
        let mut d = db::connect(dest_url, target).await?;
        d.exec("SELECT pg_catalog.set_config('search_path', '', false)")
            .await?;
        let mut existing = Vec::new();
        let mut oids = Vec::new();
        for (schema, name) in tables {
            let q = qualified(schema, name);
            let err = d.err(format!("looking up {q}"));
            let oid: Option<i64> = sqlx::query("SELECT to_regclass($1)::oid::bigint")
                .bind(&q)
                .fetch_one(&mut d.conn)
                .await
                .map_err(err)?
                .get(0);
            if let Some(oid) = oid {
                existing.push(q);
                oids.push(oid);
            }
        }
        let mut prelude = String::new();
        let mut postlude = String::new();
        let mut readded = Vec::new();
        for (q, oid) in existing.iter().zip(&oids) {
            let err = d.err(format!("looking for views on {q}"));
            let views: Vec<String> = sqlx::query(
                "SELECT DISTINCT quote_ident(vn.nspname) || '.' || quote_ident(v.relname)
                   FROM pg_depend dep
                   JOIN pg_rewrite r ON r.oid = dep.objid
                   JOIN pg_class v ON v.oid = r.ev_class
                   JOIN pg_namespace vn ON vn.oid = v.relnamespace
                  WHERE dep.classid = 'pg_rewrite'::regclass
                    AND dep.refclassid = 'pg_class'::regclass
                    AND dep.refobjid = $1::bigint::oid AND v.oid <> $1::bigint::oid
                  ORDER BY 1",
            )
            .bind(oid)
            .fetch_all(&mut d.conn)
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
            if !views.is_empty() {
                return Err(BackupError::TableHasDependents {
                    table: q.clone(),
                    dependents: format!("views {}", views.join(", ")),
                });
            }
            let err = d.err(format!("looking for foreign keys to {q}"));
            let fks = sqlx::query(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                        quote_ident(k.conname), pg_get_constraintdef(k.oid)
                   FROM pg_constraint k
                   JOIN pg_class c ON c.oid = k.conrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE k.contype = 'f' AND k.confrelid = $1::bigint::oid
                    AND k.conrelid::bigint <> ALL($2::bigint[])
                  ORDER BY 1, 2",
            )
            .bind(oid)
            .bind(&oids)
            .fetch_all(&mut d.conn)
            .await
            .map_err(err)?;
            for r in fks {
                let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                prelude.push_str(&format!("ALTER TABLE {table} DROP CONSTRAINT {name};\n"));
                postlude.push_str(&format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {name} {def};\n"
                ));
                readded.push(format!("{table}.{name}"));
            }
        }
        db::close(d).await;
        if !existing.is_empty() {
            prelude.push_str(&format!("DROP TABLE {};\n", existing.join(", ")));
        }

        let mut dump = runner
            .command(
                "pg_restore",
                vec![
                    format!("--use-list={}", list.display()),
                    "--file=-".to_owned(),
                    archive.display().to_string(),
                ],
                None,
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BackupError::io(
                "could not start",
                runner.tools.program("pg_restore"),
            ))?;
        let script: Stdio = dump
            .stdout
            .take()
            .ok_or_else(|| BackupError::Invalid("pg_restore stdout not captured".into()))?
            .try_into()
            .map_err(BackupError::io(
                "could not pipe",
                runner.tools.program("pg_restore"),
            ))?;
        let mut args = vec![
            "-X".to_owned(),
            "-q".to_owned(),
            "--no-password".to_owned(),
            "-v".to_owned(),
            "ON_ERROR_STOP=1".to_owned(),
            "--single-transaction".to_owned(),
            format!("--dbname={}", conn.conninfo),
        ];
        if !prelude.is_empty() {
            args.push("-c".into());
            args.push(prelude);
        }
        args.push("-f".into());
        args.push("-".into());
        if !postlude.is_empty() {
            args.push("-c".into());
            args.push(postlude);
        }
        let mut psql = runner.command("psql", args, Some(conn));
        self.bound_lock_waits(&mut psql);
        let psql = psql
            .stdin(script)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BackupError::io(
                "could not start",
                runner.tools.program("psql"),
            ))?;
        let (psql_out, dump_out) = tokio::join!(psql.wait_with_output(), dump.wait_with_output());
        let dump_out = dump_out.map_err(BackupError::io(
            "could not wait for",
            runner.tools.program("pg_restore"),
        ))?;
        let psql_out = psql_out.map_err(BackupError::io(
            "could not wait for",
            runner.tools.program("psql"),
        ))?;
        if !dump_out.status.success() {
            return Err(restore_failed(
                target,
                dump_out.status.to_string(),
                &String::from_utf8_lossy(&dump_out.stderr),
            ));
        }
        if !psql_out.status.success() {
            return Err(restore_failed(
                target,
                psql_out.status.to_string(),
                &String::from_utf8_lossy(&psql_out.stderr),
            ));
        }
        Ok(readded)
    }
}

fn join(columns: &[&String]) -> String {
    if columns.is_empty() {
        "nothing".to_owned()
    } else {
        columns
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Drops a database this restore created, closing whatever sessions it still has.
async fn drop_database(url: &DatabaseUrl, target: &str, name: &str) -> Result<(), BackupError> {
    let mut d = db::connect(url, target).await?;
    let force = if d.server_version().await?.1 >= 130_000 {
        " WITH (FORCE)"
    } else {
        ""
    };
    let dropped = d
        .exec(&format!(
            "DROP DATABASE IF EXISTS {}{force}",
            quote_ident(name)
        ))
        .await;
    db::close(d).await;
    dropped
}

fn restore_failed(target: &str, status: String, stderr: &str) -> BackupError {
    BackupError::ToolFailed {
        tool: "restore (one transaction, rolled back: the database is unchanged)".into(),
        target: target.to_owned(),
        status,
        stderr: stderr_summary(stderr),
    }
}

/// Requested names (`schema.table` or a `table` unique in the backup) → tables of the manifest.
fn select_tables(
    manifest: &Manifest,
    names: &[String],
) -> Result<Vec<(String, String)>, BackupError> {
    if !manifest.scope.has_data() {
        return Err(BackupError::Invalid(format!(
            "backup {} of target {} is schema-only: it holds no table data to restore",
            manifest.id, manifest.target
        )));
    }
    if names.is_empty() {
        return Err(BackupError::Invalid("no tables named to restore".into()));
    }
    let available = || {
        manifest
            .tables
            .iter()
            .map(|t| t.qualified())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for name in names {
        let found: Vec<_> = manifest
            .tables
            .iter()
            .filter(|t| t.qualified() == *name || (!name.contains('.') && t.name == *name))
            .collect();
        let t = match found.as_slice() {
            [t] => t,
            [] => {
                return Err(BackupError::TableNotInBackup {
                    target: manifest.target.clone(),
                    id: manifest.id.clone(),
                    table: name.clone(),
                    available: available(),
                });
            }
            many => {
                return Err(BackupError::Invalid(format!(
                    "table name {name} is ambiguous in backup {}: {}; name it as schema.table",
                    manifest.id,
                    many.iter()
                        .map(|t| t.qualified())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        };
        let pair = (t.schema.clone(), t.name.clone());
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    Ok(out)
}

async fn create_database(url: &DatabaseUrl, target: &str, name: &str) -> Result<(), BackupError> {
    if name.is_empty() || name.len() > 63 {
        return Err(BackupError::Invalid(format!(
            "database name {name:?} must be 1-63 bytes"
        )));
    }
    let mut d = db::connect(url, target).await?;
    let err = d.err("checking for the database");
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut d.conn)
        .await
        .map_err(err)?
        .is_some();
    if exists {
        return Err(BackupError::DatabaseExists {
            target: target.to_owned(),
            name: name.to_owned(),
        });
    }
    d.exec(&format!(
        "CREATE DATABASE {} TEMPLATE template0",
        quote_ident(name)
    ))
    .await?;
    db::close(d).await;
    Ok(())
}

/// One entry of `pg_restore --list --verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TocEntry {
    pub id: u32,
    pub desc: String,
    /// After the description: `schema tag owner`.
    pub rest: String,
    pub deps: Vec<u32>,
    /// The line as listed, for `--use-list`.
    pub line: String,
}

/// Descriptions that span several words, longest first.
const MULTI_WORD: &[&str] = &[
    "MATERIALIZED VIEW DATA",
    "SEQUENCE OWNED BY",
    "MATERIALIZED VIEW",
    "PUBLICATION TABLE",
    "CHECK CONSTRAINT",
    "SECURITY LABEL",
    "FOREIGN TABLE",
    "FK CONSTRAINT",
    "EVENT TRIGGER",
    "SEQUENCE SET",
    "INDEX ATTACH",
    "TABLE ATTACH",
    "ROW SECURITY",
    "TABLE DATA",
    "DEFAULT ACL",
];

/// What belongs to a table when it is restored on its own.
const TABLE_PARTS: &[&str] = &[
    "TABLE DATA",
    "INDEX",
    "CONSTRAINT",
    "CHECK CONSTRAINT",
    "FK CONSTRAINT",
    "TRIGGER",
    "DEFAULT",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "SEQUENCE SET",
    "COMMENT",
    "ACL",
    "POLICY",
    "ROW SECURITY",
    "RULE",
    "STATISTICS",
    "SECURITY LABEL",
];

pub(crate) fn parse_toc(text: &str) -> Vec<TocEntry> {
    let mut out: Vec<TocEntry> = Vec::new();
    for line in text.lines() {
        if let Some(deps) = line.strip_prefix(";\tdepends on:") {
            if let Some(last) = out.last_mut() {
                last.deps = deps
                    .split_whitespace()
                    .filter_map(|d| d.parse().ok())
                    .collect();
            }
            continue;
        }
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        let Some((id, after)) = line.split_once(';') else {
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        // "<catalog oid> <object oid> <DESC> <schema> <tag> <owner>"
        let mut it = after.trim_start().splitn(3, ' ');
        let (_, _, body) = (it.next(), it.next(), it.next().unwrap_or(""));
        let desc = MULTI_WORD
            .iter()
            .find(|d| body.starts_with(&format!("{d} ")))
            .map(|d| (*d).to_owned())
            .unwrap_or_else(|| body.split(' ').next().unwrap_or("").to_owned());
        let rest = body.get(desc.len()..).unwrap_or("").trim_start().to_owned();
        out.push(TocEntry {
            id,
            desc,
            rest,
            deps: Vec::new(),
            line: line.to_owned(),
        });
    }
    out
}

/// The entries that restore `tables`: their TABLE entries and everything belonging to them
/// (transitively dependent parts such as data, indexes, constraints, owned sequences).
/// Foreign keys of other tables are never included; the tables' own foreign keys only with
/// `own_fks` (not when restoring into a new database without the referenced tables).
pub(crate) fn select_entries<'a>(
    toc: &'a [TocEntry],
    tables: &[(String, String)],
    own_fks: bool,
) -> Result<Vec<&'a TocEntry>, BackupError> {
    let prefixes: Vec<String> = tables.iter().map(|(s, n)| format!("{s} {n} ")).collect();
    let mut included: HashSet<u32> = HashSet::new();
    for (i, (s, n)) in tables.iter().enumerate() {
        let found = toc
            .iter()
            .find(|e| e.desc == "TABLE" && e.rest.starts_with(&prefixes[i]))
            .ok_or_else(|| {
                BackupError::Invalid(format!("the archive has no definition of table {s}.{n}"))
            })?;
        included.insert(found.id);
    }
    loop {
        let before = included.len();
        for e in toc {
            if included.contains(&e.id)
                || !TABLE_PARTS.contains(&e.desc.as_str())
                || !e.deps.iter().any(|d| included.contains(d))
            {
                continue;
            }
            if e.desc == "FK CONSTRAINT"
                && (!own_fks || !prefixes.iter().any(|p| e.rest.starts_with(p.as_str())))
            {
                continue;
            }
            included.insert(e.id);
        }
        if included.len() == before {
            break;
        }
    }
    Ok(toc.iter().filter(|e| included.contains(&e.id)).collect())
}

/// A `--use-list` file restoring just `tables` (see [`select_entries`]).
pub(crate) async fn table_list(
    runner: &Runner,
    archive: &Path,
    target: &str,
    tables: &[(String, String)],
    own_fks: bool,
) -> Result<tempfile::NamedTempFile, BackupError> {
    let toc = read_toc(runner, archive, target).await?;
    let entries = select_entries(&toc, tables, own_fks)?;
    let mut list = tempfile::Builder::new()
        .prefix("belay-restore-")
        .suffix(".list")
        .tempfile()
        .map_err(BackupError::io("could not create", std::env::temp_dir()))?;
    for e in &entries {
        writeln!(list, "{}", e.line).map_err(BackupError::io("could not write", list.path()))?;
    }
    list.flush()
        .map_err(BackupError::io("could not write", list.path()))?;
    Ok(list)
}

/// Every entry of the archive but belay's history schema and what it holds: a full
/// restore around belay's own record (`RestoreRequest::keep_history`). `--exclude-schema`
/// alone leaves the schema's own entry, whose `DROP SCHEMA` then fails on the tables kept.
async fn history_free_list(
    runner: &Runner,
    archive: &Path,
    target: &str,
    schema: &str,
) -> Result<tempfile::NamedTempFile, BackupError> {
    let toc = read_toc(runner, archive, target).await?;
    let mut list = tempfile::Builder::new()
        .prefix("belay-restore-")
        .suffix(".list")
        .tempfile()
        .map_err(BackupError::io("could not create", std::env::temp_dir()))?;
    let own_schema = format!("- {schema} ");
    let in_schema = format!("{schema} ");
    for e in toc {
        if (e.desc == "SCHEMA" && e.rest.starts_with(&own_schema)) || e.rest.starts_with(&in_schema)
        {
            continue;
        }
        writeln!(list, "{}", e.line).map_err(BackupError::io("could not write", list.path()))?;
    }
    list.flush()
        .map_err(BackupError::io("could not write", list.path()))?;
    Ok(list)
}

async fn read_toc(
    runner: &Runner,
    archive: &Path,
    target: &str,
) -> Result<Vec<TocEntry>, BackupError> {
    let out = runner
        .command(
            "pg_restore",
            vec![
                "--list".into(),
                "--verbose".into(),
                archive.display().to_string(),
            ],
            None,
        )
        .output()
        .await
        .map_err(BackupError::io(
            "could not run",
            runner.tools.program("pg_restore"),
        ))?;
    if !out.status.success() {
        return Err(BackupError::ToolFailed {
            tool: "pg_restore --list".into(),
            target: target.to_owned(),
            status: out.status.to_string(),
            stderr: stderr_summary(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(parse_toc(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOC: &str = "\
;
; Archive created at 2026-11-23 04:09:20 UTC
;
216; 1259 16385 TABLE public u postgres
215; 1259 16384 SEQUENCE public u_id_seq postgres
;\tdepends on: 216
3373; 0 0 SEQUENCE OWNED BY public u_id_seq postgres
;\tdepends on: 215
218; 1259 16394 TABLE public o postgres
217; 1259 16393 SEQUENCE public o_id_seq postgres
;\tdepends on: 218
219; 1259 16407 VIEW public v postgres
;\tdepends on: 218 218 218
3211; 2604 16388 DEFAULT public u id postgres
;\tdepends on: 216 215 216
3364; 0 16394 TABLE DATA public o postgres
;\tdepends on: 218
3362; 0 16385 TABLE DATA public u postgres
;\tdepends on: 216
3374; 0 0 SEQUENCE SET public o_id_seq postgres
;\tdepends on: 217
3375; 0 0 SEQUENCE SET public u_id_seq postgres
;\tdepends on: 215
3215; 2606 16400 CONSTRAINT public o o_pkey postgres
;\tdepends on: 218
3213; 2606 16392 CONSTRAINT public u u_pkey postgres
;\tdepends on: 216
3216; 1259 16406 INDEX public o_x_idx postgres
;\tdepends on: 218
3217; 2606 16401 FK CONSTRAINT public o o_uid_fkey postgres
;\tdepends on: 3213 218 216
";

    fn ids(entries: &[&TocEntry]) -> Vec<u32> {
        entries.iter().map(|e| e.id).collect()
    }

    #[test]
    fn toc_lines_parse_with_multi_word_descriptions() {
        let toc = parse_toc(TOC);
        let fk = toc.iter().find(|e| e.id == 3217).unwrap();
        assert_eq!(fk.desc, "FK CONSTRAINT");
        assert_eq!(fk.rest, "public o o_uid_fkey postgres");
        assert_eq!(fk.deps, [3213, 218, 216]);
        assert_eq!(
            toc.iter().find(|e| e.id == 3373).unwrap().desc,
            "SEQUENCE OWNED BY"
        );
    }

    #[test]
    fn a_table_comes_with_its_parts_but_not_views_or_others_foreign_keys() {
        let toc = parse_toc(TOC);
        let u = [("public".to_owned(), "u".to_owned())];
        // u: table, serial sequence, owned-by, default, data, sequence value, pkey. Not o's
        // FK to it, not the view on o.
        assert_eq!(
            ids(&select_entries(&toc, &u, true).unwrap()),
            [216, 215, 3373, 3211, 3362, 3375, 3213]
        );
        let o = [("public".to_owned(), "o".to_owned())];
        assert_eq!(
            ids(&select_entries(&toc, &o, true).unwrap()),
            [218, 217, 3364, 3374, 3215, 3216, 3217]
        );
        // Into a new database without u: o's own FK is left out.
        assert_eq!(
            ids(&select_entries(&toc, &o, false).unwrap()),
            [218, 217, 3364, 3374, 3215, 3216]
        );
        let missing = [("public".to_owned(), "nope".to_owned())];
        assert!(select_entries(&toc, &missing, true).is_err());
    }
}
