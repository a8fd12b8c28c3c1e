//! `belay backup …` in both modes, through one [`BackupApi`] (in-process
//! [`LocalBackups`], or the controller's `BackupService`), so both print the same text and
//! JSON; the `--backup` flag of `migrate` and `undo` (a [`BackupHook`] over
//! `belay-backup`, local mode); progress lines.
//!
//! Backups of the local target live under `--backup-dir` (default `./.belay/backups`) in
//! a catalog named after the database of the URL (`local` when the URL names none). In
//! remote mode they live on the agent owning the target, under its `backup_dir`.

use crate::cli::Output;
use crate::settings::Settings;
use crate::{Failure, exit};
use belay_backup::{
    BackupApi, BackupFormat, BackupManager, BackupRequest, BackupScope, CatalogEntry, LocalBackups,
    Operation, Progress, PruneRequest, RestoreRequest,
};
use belay_core::DatabaseUrl;
use belay_migrate::BackupHook;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `migrate --backup` / `undo --backup` take before the first statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Schema and data of the whole database
    Full,
    /// Definitions only
    Schema,
    /// The existing tables the scripts name (`-- belay:tables=`) or alter, drop or
    /// truncate
    Tables,
    /// No backup (a warning says so)
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// One compressed file (pg_dump --format=custom)
    Custom,
    /// A directory of per-table files, dumped in parallel (--jobs)
    Directory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    Full,
    /// Definitions only (--schema-only)
    Schema,
    /// The tables given with --tables
    Tables,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up the database with pg_dump, then verify the backup
    Create {
        #[arg(long, value_enum, default_value_t = FormatArg::Custom)]
        format: FormatArg,
        /// Parallel dump jobs (directory format only) [default: 2]
        #[arg(long, value_name = "N")]
        jobs: Option<u32>,
        /// What to back up [default: full, or tables when --tables is given]
        #[arg(long, value_enum)]
        scope: Option<ScopeArg>,
        /// Tables to back up (schema.table or table), comma-separated
        #[arg(long, value_name = "LIST", value_delimiter = ',')]
        tables: Vec<String>,
        /// Free text shown by `backup list`
        #[arg(long)]
        label: Option<String>,
    },
    /// The backups of this database, newest first
    List,
    /// Check every file's sha256 and that pg_restore can read the archive
    Verify {
        id: String,
        /// Also restore into a scratch database, compare row counts, drop it again
        #[arg(long)]
        restore_test: bool,
    },
    /// Restore a backup: in full (--clean --if-exists), selected tables, or into a new
    /// database; refuses a backup that fails verification unless --force
    Restore {
        id: String,
        /// Restore only these tables, in place; other tables are left as they are
        #[arg(long, value_name = "LIST", value_delimiter = ',')]
        tables: Vec<String>,
        /// Create this database and restore into it instead
        #[arg(long, value_name = "NAME")]
        into: Option<String>,
        /// Restore even if the backup fails verification
        #[arg(long)]
        force: bool,
        /// Skip the backup of the current state taken before an in-place restore
        #[arg(long)]
        no_emergency_backup: bool,
        /// Restore --tables in place from a backup of another schema version than the
        /// database's: allowed only for tables whose columns are the same now as in the
        /// backup (so history stays true); without it such a restore is refused (exit 2)
        #[arg(long)]
        across_versions: bool,
    },
    /// Delete old backups, kind by kind (pre-deployment, pre-undo snapshot, emergency,
    /// manual): of each, keep the newest N verified ones (and always the newest verified
    /// one). Backups of unfinished deployments are kept, and so is every pre-undo snapshot
    /// holding a table or column the database no longer has, unless --force
    Prune {
        /// How many verified backups of each kind to keep
        #[arg(long, value_name = "N")]
        keep: usize,
        /// Only say what would be deleted
        #[arg(long)]
        dry_run: bool,
        /// Also delete pre-undo snapshots holding data the database no longer has (often
        /// the only copy of what an undo dropped)
        #[arg(long)]
        force: bool,
    },
}

/// The catalog name of the local target: the URL's database name, or `local`.
pub fn target_name(url: &DatabaseUrl) -> String {
    let Some(db) = url.database() else {
        return "local".into();
    };
    let cleaned: String = db
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned: String = cleaned.trim_start_matches('.').chars().take(128).collect();
    if belay_backup::validate_name("target", &cleaned).is_ok() {
        cleaned
    } else {
        "local".into()
    }
}

pub fn manager(settings: &Settings) -> BackupManager {
    BackupManager::new(settings.backup_dir.clone())
        .with_history_schema(settings.exec.history_schema.clone())
}

/// The backup capability of local mode: the one target, backed up under `--backup-dir`.
pub fn local(settings: &Settings, url: &DatabaseUrl) -> LocalBackups {
    LocalBackups::new().with_target(target_name(url), url.clone(), manager(settings))
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::USAGE,
        message: message.into(),
    }
}

/// `--backup` is local-mode only for now: through the controller, the agent's
/// configuration (`backup`, `backup_dir`) decides the pre-deployment backup.
pub fn remote_unsupported(command: &crate::cli::Command) -> Option<Failure> {
    use crate::cli::Command;
    let what = match command {
        Command::Migrate {
            backup: Some(_), ..
        }
        | Command::Undo {
            backup: Some(_), ..
        } => "--backup",
        _ => return None,
    };
    Some(usage(format!(
        "{what} is not yet available in remote mode (--controller): run it in local mode against the database URL"
    )))
}

/// The hook for `migrate` and `undo`; `None` for other commands.
pub fn hook_for(
    command: &crate::cli::Command,
    settings: &Settings,
    url: &DatabaseUrl,
) -> Option<Arc<dyn BackupHook>> {
    use crate::cli::Command;
    let mode = match command {
        Command::Migrate { backup, .. } => backup.or(settings.backup).unwrap_or(BackupMode::Full),
        // The same default as the agent's for a remote undo
        // (`belay_guards::BackupMode::default_for_undo`): a snapshot of the tables it drops.
        Command::Undo { backup, .. } => backup.unwrap_or(BackupMode::Tables),
        _ => return None,
    };
    let mode = match mode {
        BackupMode::None => belay_guards::BackupMode::None,
        BackupMode::Full => belay_guards::BackupMode::Full,
        BackupMode::Schema => belay_guards::BackupMode::Schema,
        BackupMode::Tables => belay_guards::BackupMode::Tables,
    };
    let printer = Arc::new(ProgressPrinter::new());
    Some(Arc::new(
        belay_guards::BackupGuard::new(manager(settings), url.clone(), target_name(url), mode)
            .with_notify(Arc::new(|m: &str| eprintln!("{m}")))
            .with_progress(Arc::new(move |p| printer.show(p))),
    ))
}

/// Progress on stderr: one updating line on a terminal, plain lines otherwise.
struct ProgressPrinter {
    tty: bool,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    what: String,
    done: usize,
    total: usize,
    bytes: u64,
    last_line: Instant,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl ProgressPrinter {
    fn new() -> Self {
        ProgressPrinter {
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(ProgressState {
                what: String::new(),
                done: 0,
                total: 0,
                bytes: 0,
                last_line: Instant::now(),
            }),
        }
    }

    fn show(&self, p: Progress) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        let verb = |op: Operation| match op {
            Operation::Create => "backing up",
            Operation::Restore => "restoring",
        };
        match p {
            Progress::Started {
                operation,
                target,
                id,
                tables,
            } => {
                s.what = format!("{} {target} ({id})", verb(operation));
                s.total = tables;
                s.done = 0;
                s.bytes = 0;
                if !self.tty {
                    let _ = writeln!(err, "{}: {tables} table(s)", s.what);
                }
            }
            Progress::Table { name, done, total } => {
                s.done = done;
                s.total = total;
                if !self.tty {
                    let _ = writeln!(err, "  table {name} ({done}/{total})");
                }
            }
            Progress::Bytes { written } => {
                s.bytes = written;
                if !self.tty && s.last_line.elapsed() >= Duration::from_secs(5) {
                    s.last_line = Instant::now();
                    let _ = writeln!(err, "  {} written", human_bytes(written));
                }
            }
            Progress::Finished {
                bytes, duration_ms, ..
            } => {
                if self.tty {
                    let _ = write!(err, "\r\x1b[K");
                }
                let _ = writeln!(
                    err,
                    "{}: done, {} in {duration_ms} ms",
                    s.what,
                    human_bytes(bytes)
                );
                return;
            }
        }
        if self.tty {
            let bar_width = 24usize;
            let filled = (s.done * bar_width)
                .checked_div(s.total)
                .map_or(0, |f| f.min(bar_width));
            let _ = write!(
                err,
                "\r\x1b[K{} [{}{}] {}/{} tables, {}",
                s.what,
                "#".repeat(filled),
                " ".repeat(bar_width - filled),
                s.done,
                s.total,
                human_bytes(s.bytes)
            );
            let _ = err.flush();
        }
    }
}

fn format_json(format: &BackupFormat) -> (String, Option<u32>) {
    match format {
        BackupFormat::Custom => ("custom".into(), None),
        BackupFormat::Directory { jobs } => ("directory".into(), Some(*jobs)),
    }
}

fn scope_tables(scope: &BackupScope) -> Option<&[String]> {
    match scope {
        BackupScope::Tables(t) => Some(t),
        _ => None,
    }
}

fn entry_json(e: &CatalogEntry) -> serde_json::Value {
    let (format, jobs) = format_json(&e.format);
    json!({
        "id": e.id,
        "target": e.target,
        "label": e.label,
        "deployment_id": e.deployment_id,
        "created_at": e.created_at,
        "format": format,
        "jobs": jobs,
        "scope": e.scope.name(),
        "tables": scope_tables(&e.scope),
        "schema_version": e.schema_version,
        "verified": e.verified,
        "verified_at": e.verified_at,
        "restore_tested": e.restore_tested,
        "size": e.size,
        "path": e.path,
        "files": e.files.iter().map(|f| json!({
            "path": f.path, "size": f.size, "sha256": f.sha256,
        })).collect::<Vec<_>>(),
    })
}

/// Runs `belay backup …` against `target` through `api`, local or remote alike.
pub async fn run(
    command: &BackupCommand,
    api: &dyn BackupApi,
    target: &str,
    out: Output,
) -> Result<u8, Failure> {
    let printer = Arc::new(ProgressPrinter::new());
    let progress: belay_backup::ProgressSink = Arc::new(move |p: Progress| printer.show(p));
    match command {
        BackupCommand::Create {
            format,
            jobs,
            scope,
            tables,
            label,
        } => {
            let format = match (format, jobs) {
                (FormatArg::Custom, Some(_)) => {
                    return Err(usage("--jobs needs --format directory"));
                }
                (FormatArg::Custom, None) => BackupFormat::Custom,
                (FormatArg::Directory, j) => BackupFormat::Directory {
                    jobs: j.unwrap_or(2),
                },
            };
            let scope = match (scope, tables.is_empty()) {
                (None | Some(ScopeArg::Tables), false) => BackupScope::Tables(tables.clone()),
                (Some(ScopeArg::Tables), true) => {
                    return Err(usage("--scope tables needs --tables a,b"));
                }
                (Some(_), false) => {
                    return Err(usage("--tables goes with --scope tables"));
                }
                (None | Some(ScopeArg::Full), true) => BackupScope::Full,
                (Some(ScopeArg::Schema), true) => BackupScope::SchemaOnly,
            };
            let req = BackupRequest {
                format,
                scope,
                label: label.clone(),
                deployment_id: None,
                kind: None,
            };
            let manifest = api.create(target, &req, progress).await?;
            let report = api.verify(target, &manifest.id, false).await?;
            let entry = api
                .list(target)
                .await?
                .into_iter()
                .find(|e| e.id == manifest.id);
            match out {
                Output::Json => {
                    let mut doc = entry.as_ref().map(entry_json).unwrap_or(json!({}));
                    doc["tables_counted"] = json!(manifest.tables);
                    doc["server_version"] = json!(manifest.server_version);
                    doc["pg_dump_version"] = json!(manifest.pg_dump_version);
                    doc["duration_ms"] = json!(manifest.duration_ms);
                    doc["problems"] = json!(report.problems);
                    println!("{doc}");
                }
                Output::Text => {
                    let (format, _) = format_json(&manifest.format);
                    println!(
                        "backup {} of {target}: {}, {format}, {}, {} table(s), {}",
                        manifest.id,
                        manifest.scope.name(),
                        human_bytes(manifest.total_size()),
                        manifest.tables.len(),
                        if report.ok {
                            "verified"
                        } else {
                            "FAILED verification"
                        }
                    );
                    for p in &report.problems {
                        println!("  problem: {p}");
                    }
                }
            }
            Ok(if report.ok { 0 } else { exit::FAILED })
        }
        BackupCommand::List => {
            let entries = api.list(target).await?;
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(entries.iter().map(entry_json).collect())
                ),
                Output::Text if entries.is_empty() => println!("no backups of {target}"),
                Output::Text => {
                    println!(
                        "{:<28} {:<20} {:<10} {:<12} {:>10}  {:<9} {:<13} label",
                        "id", "created", "format", "scope", "size", "verified", "restore-test"
                    );
                    let yes_no = |b: bool| if b { "yes" } else { "no" };
                    for e in &entries {
                        let (format, _) = format_json(&e.format);
                        println!(
                            "{:<28} {:<20} {:<10} {:<12} {:>10}  {:<9} {:<13} {}",
                            e.id,
                            e.created_at.format("%Y-%m-%d %H:%M:%S"),
                            format,
                            e.scope.name(),
                            human_bytes(e.size),
                            yes_no(e.verified),
                            // Passed a restore into a scratch database, besides the checksums.
                            yes_no(e.restore_tested),
                            e.label.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            Ok(0)
        }
        BackupCommand::Verify { id, restore_test } => {
            let report = api.verify(target, id, *restore_test).await?;
            match out {
                Output::Json => println!("{}", json!(report)),
                Output::Text if report.ok => {
                    let mut line = format!(
                        "backup {id} verified: {} file(s), {}, {} archive entries",
                        report.files_checked,
                        human_bytes(report.bytes_checked),
                        report.archive_entries
                    );
                    if let Some(t) = &report.restore_test {
                        line.push_str(&format!(
                            "; restore test into {}: {} table(s) match their row counts",
                            t.database, t.tables_compared
                        ));
                    }
                    println!("{line}");
                }
                Output::Text => {
                    println!("backup {id} FAILED verification:");
                    for p in &report.problems {
                        println!("  {p}");
                    }
                }
            }
            Ok(if report.ok { 0 } else { exit::FAILED })
        }
        BackupCommand::Restore {
            id,
            tables,
            into,
            force,
            no_emergency_backup,
            across_versions,
        } => {
            let req = RestoreRequest {
                tables: (!tables.is_empty()).then(|| tables.clone()),
                into: into.clone(),
                force: *force,
                emergency_backup: !no_emergency_backup,
                across_versions: *across_versions,
                keep_history: false,
            };
            let report = api.restore(target, id, &req, progress).await?;
            match out {
                Output::Json => println!("{}", json!(report)),
                Output::Text => {
                    if report.forced {
                        for p in &report.verification_problems {
                            println!("warning: restored despite: {p}");
                        }
                    }
                    if let Some(e) = &report.emergency_backup {
                        println!("emergency backup of the state before the restore: {e}");
                    }
                    for fk in &report.foreign_keys_readded {
                        println!("re-added foreign key {fk}");
                    }
                    for m in &report.mismatches {
                        println!(
                            "warning: table {} has {} rows, the backup recorded {}",
                            m.table,
                            m.actual,
                            m.expected.map(|v| v.to_string()).unwrap_or("?".into())
                        );
                    }
                    let what = match &report.tables {
                        Some(t) => format!("table(s) {}", t.join(", ")),
                        None => "everything".into(),
                    };
                    println!(
                        "restored {what} from backup {id} into database {} in {} ms",
                        report.database, report.duration_ms
                    );
                }
            }
            Ok(if report.mismatches.is_empty() {
                0
            } else {
                exit::FAILED
            })
        }
        BackupCommand::Prune {
            keep,
            dry_run,
            force,
        } => {
            let req = PruneRequest {
                keep: *keep,
                dry_run: *dry_run,
                protect: Vec::new(),
                force: *force,
            };
            let report = api.prune(target, &req).await?;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({
                        "target": report.target,
                        "dry_run": report.dry_run,
                        "deleted": report.deleted.iter().map(entry_json).collect::<Vec<_>>(),
                        "kept": report.kept,
                        "incomplete_removed": report.incomplete_removed,
                    })
                ),
                Output::Text => {
                    let verb = if *dry_run { "would delete" } else { "deleted" };
                    for e in &report.deleted {
                        println!("{verb} {} ({})", e.id, human_bytes(e.size));
                    }
                    for p in &report.incomplete_removed {
                        println!("{verb} incomplete backup {}", p.display());
                    }
                    for k in &report.kept {
                        let why = serde_json::to_value(k.reason)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default();
                        match &k.note {
                            Some(note) => println!("kept {} ({why}: {note})", k.id),
                            None => println!("kept {} ({why})", k.id),
                        }
                    }
                    if report.deleted.is_empty() && report.incomplete_removed.is_empty() {
                        println!("nothing to prune");
                    }
                }
            }
            Ok(0)
        }
    }
}
