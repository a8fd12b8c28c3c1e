//! `belay adopt`: flags, wiring and rendering around `belay_adopt::adopt`.

use crate::cli::Output;
use crate::settings::Settings;
use crate::{Failure, exit};
use belay_adopt::{AdoptError, AdoptOptions, Adoption, Outcome, Tool};
use belay_core::DatabaseUrl;
use belay_migrate::{ApiError, MigrationSet, Migrator};

pub const ABOUT: &str = "Take over a database another tool migrated (Flyway, sqlx, diesel, golang-migrate, \
dbmate, goose): import its history into belay's";

pub const LONG_ABOUT: &str = "\
Take over a database another tool migrated: import its history into belay's.

belay reads the other tool's history table (on the search path), matches every applied
version with a migration file in --dir, and records each one in belay's history as an
ADOPTED row: belay's checksum of the file as it is now, the other tool's installed_on and
installed_by where it recorded them, and a note naming the tool and what was compared.
Everything is written in one transaction under belay's runner lock; the other tool's table
is left untouched. Afterwards `belay status` shows the adopted versions as applied,
`belay migrate` applies newer files, and `belay undo` reverts an adopted migration with its
undo script when the files have one (U<version>__x.sql, x.down.sql, down.sql).

  tool            table                        compared with the files
  flyway          flyway_schema_history        CRC-32 of the script's lines (as Flyway)
  sqlx            _sqlx_migrations             SHA-384 of the file (as sqlx)
  diesel          __diesel_schema_migrations   versions only (no checksum recorded)
  golang-migrate  schema_migrations            current version; every file up to it
  dbmate          schema_migrations            versions only
  goose           goose_db_version             versions (latest row per version decides)

Without --from the tool is detected from the tables present; with several present,
adopt refuses and names them. golang-migrate's and dbmate's tables share a name and are
told apart by golang-migrate's `dirty` column.

Refused (exit 2), with nothing written: a failed or dirty state (e.g. golang-migrate dirty
at version 5: fix the database, run `migrate force 5`, adopt again); a version the tool
applied whose file is missing; a file whose checksum differs from what Flyway or sqlx
recorded; a belay history that already says something else. Files older than the newest
adopted version that the tool never applied (gaps) are reported and left pending. When
belay's history already records everything the tool applied, adopt says so and exits 0:
running it twice changes nothing the second time.

Examples:
  belay adopt --dry-run                  # what would be recorded; writes nothing
  belay adopt --from flyway
  belay adopt --output json

Local mode only: run it against the database URL.";

/// `--from`, as clap spells the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FromTool {
    Flyway,
    Sqlx,
    Diesel,
    GolangMigrate,
    Dbmate,
    Goose,
}

impl FromTool {
    fn tool(self) -> Tool {
        match self {
            FromTool::Flyway => Tool::Flyway,
            FromTool::Sqlx => Tool::Sqlx,
            FromTool::Diesel => Tool::Diesel,
            FromTool::GolangMigrate => Tool::GolangMigrate,
            FromTool::Dbmate => Tool::Dbmate,
            FromTool::Goose => Tool::Goose,
        }
    }
}

pub fn remote_unsupported() -> Failure {
    Failure {
        code: exit::USAGE,
        message: "`belay adopt` is not available in remote mode (--controller): run it in local mode against the database URL, then manage the target through the controller".into(),
    }
}

fn failure(e: AdoptError) -> Failure {
    ApiError::new(e.kind(), e.to_string()).into()
}

pub async fn run(
    from: Option<FromTool>,
    dry_run: bool,
    set: MigrationSet,
    settings: &Settings,
    url: &DatabaseUrl,
    out: Output,
) -> Result<u8, Failure> {
    let migrator = Migrator::new(
        url.clone(),
        set,
        settings.exec.clone(),
        belay_migrate::events::discard(),
    )?;
    let options = AdoptOptions {
        from: from.map(FromTool::tool),
        dry_run,
    };
    let adoption = belay_adopt::adopt(&migrator, options)
        .await
        .map_err(failure)?;
    render(out, &adoption, &migrator);
    Ok(0)
}

fn render(out: Output, a: &Adoption, migrator: &Migrator) {
    if out == Output::Json {
        let mut doc = serde_json::json!(a);
        if a.outcome == Outcome::Adopted {
            doc["deployment_id"] = serde_json::json!(migrator.deployment_id());
        }
        println!("{doc}");
        return;
    }
    if a.outcome == Outcome::NothingToDo {
        for n in &a.notes {
            println!("note: {n}");
        }
        println!(
            "nothing to do: {} already records everything {} applied ({} version(s) in {})",
            a.history_table,
            a.tool,
            a.rows.len(),
            a.table
        );
        return;
    }
    let verb = match a.outcome {
        Outcome::WouldAdopt => "would record",
        _ => "recorded",
    };
    println!(
        "{} history in {}: {} {} row(s) in {}",
        a.tool,
        a.table,
        verb,
        a.rows.len(),
        a.history_table
    );
    for r in &a.rows {
        let by = r
            .installed_by
            .as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default();
        let on = r
            .installed_on
            .map(|t| format!(" on {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_else(|| " (no time recorded: now)".into());
        println!(
            "  {:<8} {:<16} {}{on}{by}\n           checksum: {}",
            r.entry_type.as_str(),
            r.version,
            r.script,
            r.compared
        );
    }
    for g in &a.gaps {
        println!("warning: gap: {g}");
    }
    for n in &a.notes {
        println!("note: {n}");
    }
    if !a.pending.is_empty() {
        println!("pending, for `belay migrate`: {}", a.pending.join(", "));
    }
    match a.outcome {
        Outcome::WouldAdopt => println!("dry run: nothing was written"),
        _ => println!(
            "adopted {} migration(s) from {} in deployment {}",
            a.rows.len(),
            a.tool,
            migrator.deployment_id()
        ),
    }
}
