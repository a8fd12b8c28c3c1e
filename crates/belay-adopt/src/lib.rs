//! Adopting a database another migration tool managed (Flyway, sqlx, diesel,
//! golang-migrate, dbmate, goose): reads that tool's history table on the caller's
//! connection, matches it with the migration files belay loaded, compares checksums where
//! the tool's computation can be reproduced exactly, refuses failed, dirty or mismatched
//! states with the way out, and records the result in belay's history in one transaction
//! under the runner lock, as `ADOPTED` rows. It must not write to the other tool's table,
//! apply migrations, or guess: what it cannot compare it says it did not compare.

mod checksum;
mod tools;

use belay_core::{ErrorKind, Version};
use belay_history::{EntryType, History, HistoryError, NewRow, Recorded, RowState};
use belay_migrate::{MigrateError, MigrationSet, Migrator, State};
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use std::fmt;
use std::str::FromStr;
use tools::{Record, Theirs};
use tracing::Instrument;

pub use checksum::{flyway as flyway_checksum, sqlx as sqlx_checksum};

/// A migration tool whose history belay can import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    Flyway,
    Sqlx,
    Diesel,
    GolangMigrate,
    Dbmate,
    Goose,
}

impl Tool {
    pub const ALL: [Tool; 6] = [
        Tool::Flyway,
        Tool::Sqlx,
        Tool::Diesel,
        Tool::GolangMigrate,
        Tool::Dbmate,
        Tool::Goose,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Flyway => "flyway",
            Tool::Sqlx => "sqlx",
            Tool::Diesel => "diesel",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Dbmate => "dbmate",
            Tool::Goose => "goose",
        }
    }

    /// The history table the tool creates by default.
    pub fn table(self) -> &'static str {
        match self {
            Tool::Flyway => "flyway_schema_history",
            Tool::Sqlx => "_sqlx_migrations",
            Tool::Diesel => "__diesel_schema_migrations",
            Tool::GolangMigrate | Tool::Dbmate => "schema_migrations",
            Tool::Goose => "goose_db_version",
        }
    }

    /// What the tool records to compare with a file, said the same way everywhere.
    fn checksum_note(self) -> &'static str {
        match self {
            Tool::Flyway => "Flyway's CRC-32 of the script's lines",
            Tool::Sqlx => "sqlx's SHA-384 of the file",
            Tool::Diesel | Tool::GolangMigrate | Tool::Dbmate | Tool::Goose => {
                "not compared: the tool records no checksum"
            }
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tool::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown tool {s:?}; one of: {}",
                    Tool::ALL.map(Tool::name).join(", ")
                )
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "no other migration tool's history table is on the search path (looked for {looked}); nothing to adopt. If the table lives in another schema, put that schema on the search path (e.g. `?options=-csearch_path%3Dmyschema` in the URL)"
    )]
    NoTool { looked: String },
    #[error(
        "found the history tables of several tools: {}; pass --from with the one that manages this database",
        .0.join(", ")
    )]
    Ambiguous(Vec<String>),
    #[error(
        "--from {tool}: there is no table {table} on the search path; is this database managed by {tool}?"
    )]
    TableMissing { tool: Tool, table: &'static str },
    #[error(
        "{table} does not look like {tool}'s ({reason}); it was not written by {tool}: pass the --from of the tool that wrote it"
    )]
    NotTheTool {
        tool: Tool,
        table: String,
        reason: String,
    },
    #[error("cannot adopt {tool}'s history ({table}); nothing was written:\n  {}", .problems.join("\n  "))]
    Refused {
        tool: Tool,
        table: String,
        problems: Vec<String>,
    },
    #[error("{0}")]
    Migrate(#[from] MigrateError),
    #[error("{0}")]
    History(#[from] HistoryError),
    #[error("{}: cannot read it to compare checksums: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database error while {doing}: {source}")]
    Database {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl AdoptError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdoptError::NoTool { .. }
            | AdoptError::Ambiguous(_)
            | AdoptError::TableMissing { .. }
            | AdoptError::NotTheTool { .. }
            | AdoptError::Refused { .. } => ErrorKind::Refused,
            AdoptError::Migrate(e) => e.kind(),
            AdoptError::Io { .. } => ErrorKind::InvalidSource,
            AdoptError::History(_) | AdoptError::Database { .. } => ErrorKind::Internal,
        }
    }
}

/// What `adopt` did, or with `dry_run` would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Adopted,
    WouldAdopt,
    /// belay's history already records everything the tool applied.
    NothingToDo,
}

/// One row `adopt` records in belay's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdoptedRow {
    pub version: String,
    /// The version as the other tool wrote it (golang-migrate, which records only its
    /// current version: the file's version, at or below the recorded one).
    pub their_version: String,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    pub script: String,
    pub description: String,
    /// belay's checksum of the files as they are now.
    pub checksum: Option<String>,
    pub installed_on: Option<DateTime<Utc>>,
    pub installed_by: Option<String>,
    pub execution_time_ms: i32,
    /// How the tool's record was compared with the file: `match (…)` or `not compared: …`.
    pub compared: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Adoption {
    pub outcome: Outcome,
    pub tool: Tool,
    pub table: String,
    pub history_table: String,
    pub rows: Vec<AdoptedRow>,
    /// Files older than the newest adopted version that the tool never applied: left
    /// pending, and `migrate` will apply them out of order.
    pub gaps: Vec<String>,
    /// Files newer than everything adopted: pending, for `belay migrate`.
    pub pending: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AdoptOptions {
    /// The tool; `None`: detected from the tables present.
    pub from: Option<Tool>,
    pub dry_run: bool,
}

/// Adopts the database `migrator` points at: reads the other tool's history, matches it
/// with `migrator`'s files, and (unless `dry_run`) records it in one transaction under
/// the runner lock. Refusals write nothing.
pub async fn adopt(migrator: &Migrator, options: AdoptOptions) -> Result<Adoption, AdoptError> {
    let span = tracing::info_span!("adopt", deployment_id = %migrator.deployment_id(), dry_run = options.dry_run);
    async {
        let history = History::new(migrator.history_schema())?;
        if options.dry_run {
            let mut conn = migrator.session().await?;
            let result = inspect(&mut conn, migrator.set(), &history, options.from).await;
            let _ = conn.close().await;
            return result.map(|mut a| {
                if a.outcome == Outcome::Adopted {
                    a.outcome = Outcome::WouldAdopt;
                }
                a
            });
        }
        let mut session = migrator.lock_runner().await?;
        let result = async {
            let adoption = inspect(session.conn(), migrator.set(), &history, options.from).await?;
            if adoption.outcome == Outcome::Adopted {
                record(session.conn(), &history, &adoption, migrator).await?;
            }
            Ok(adoption)
        }
        .await;
        session.release().await;
        result
    }
    .instrument(span)
    .await
}

/// Which tool's table is here: `from` checked, or the one tool whose table exists.
async fn detect(
    conn: &mut PgConnection,
    from: Option<Tool>,
) -> Result<(Tool, tools::Table), AdoptError> {
    if let Some(tool) = from {
        let table = tools::find(conn, tool.table())
            .await?
            .ok_or(AdoptError::TableMissing {
                tool,
                table: tool.table(),
            })?;
        if let Some(reason) = tools::not_the_tools(tool, &table) {
            return Err(AdoptError::NotTheTool {
                tool,
                table: table.name,
                reason,
            });
        }
        return Ok((tool, table));
    }
    // golang-migrate's and dbmate's tables share a name; golang-migrate's `dirty` column
    // tells them apart, so at most one of the two matches.
    let mut found = Vec::new();
    for tool in Tool::ALL {
        if let Some(table) = tools::find(conn, tool.table()).await?
            && tools::not_the_tools(tool, &table).is_none()
        {
            found.push((tool, table));
        }
    }
    match found.len() {
        0 => Err(AdoptError::NoTool {
            looked: Tool::ALL
                .iter()
                .map(|t| format!("{} ({t})", t.table()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(AdoptError::Ambiguous(
            found
                .iter()
                .map(|(t, table)| format!("{t} ({})", table.name))
                .collect(),
        )),
    }
}

/// Reads the other tool's history and belay's, and decides what to record. Writes nothing.
async fn inspect(
    conn: &mut PgConnection,
    set: &MigrationSet,
    history: &History,
    from: Option<Tool>,
) -> Result<Adoption, AdoptError> {
    let (tool, table) = detect(conn, from).await?;
    let record = tools::read(conn, tool, &table).await?;
    let mut adoption = plan(tool, &table.name, set, record)?;
    adoption.history_table = history.table_name();
    let belay_rows = history.rows(conn).await?;
    if belay_rows.iter().all(|r| r.state == RowState::Repaired) {
        if adoption.rows.is_empty() {
            adoption.outcome = Outcome::NothingToDo;
            adoption
                .notes
                .push(format!("{} records no applied migration", table.name));
        }
        return Ok(adoption);
    }
    // belay already keeps this database's history: adopting again must change nothing,
    // and adopting over a history that says otherwise would make it lie.
    let statuses = belay_migrate::status::compute(set, &belay_rows, false);
    let mut differs = Vec::new();
    for row in &adoption.rows {
        let covered: Vec<&str> = match row.entry_type {
            EntryType::Baseline => {
                let b = Version::parse(&row.version).ok();
                set.migrations
                    .iter()
                    .filter(|m| b.as_ref().is_some_and(|b| &m.version <= b))
                    .map(|m| m.script_name.as_str())
                    .collect()
            }
            _ => vec![row.script.as_str()],
        };
        for script in covered {
            let state = statuses
                .iter()
                .find(|s| s.entry_type.is_forward() && s.script == script)
                .map(|s| s.state);
            if !matches!(state, Some(State::Success | State::Baseline)) {
                differs.push(format!(
                    "{script} (version {}) is applied per {tool} but {} in {}",
                    row.version,
                    state.map_or("absent", State::as_str),
                    history.table_name()
                ));
            }
        }
    }
    if differs.is_empty() {
        adoption.outcome = Outcome::NothingToDo;
        return Ok(adoption);
    }
    differs.push(format!(
        "{} already holds belay's history ({} row(s)); adopt only fills an empty history or confirms one that matches: compare with `belay status`, and settle the difference with `belay migrate`, `belay baseline` or `belay repair`",
        history.table_name(),
        belay_rows.len()
    ));
    Err(AdoptError::Refused {
        tool,
        table: table.name,
        problems: differs,
    })
}

/// Matches the tool's record with the files: the rows to write, or every problem at once.
fn plan(
    tool: Tool,
    table: &str,
    set: &MigrationSet,
    record: Record,
) -> Result<Adoption, AdoptError> {
    let Record {
        mut applied,
        up_to,
        baseline,
        mut problems,
        notes,
    } = record;
    let dir = set.dir.display();
    // golang-migrate's one version stands for every file up to it.
    if let Some(top) = up_to {
        if set.find(&top.version).is_none() {
            problems.push(format!(
                "golang-migrate is at version {}, but no migration file of that version is in {dir}: restore its file (golang-migrate needs it too), then adopt again",
                top.text
            ));
        }
        applied.extend(
            set.migrations
                .iter()
                .filter(|m| m.version <= top.version)
                .map(|m| tools::Applied {
                    text: m.version.to_string(),
                    version: m.version.clone(),
                    ..top.clone()
                }),
        );
    }
    let mut rows = Vec::new();
    if let Some(b) = &baseline {
        rows.push(AdoptedRow {
            version: b.version.to_string(),
            their_version: b.text.clone(),
            entry_type: EntryType::Baseline,
            script: "<< Flyway Baseline >>".into(),
            description: format!("adopted Flyway baseline at {}", b.text),
            checksum: None,
            installed_on: b.installed_on,
            installed_by: b.installed_by.clone(),
            execution_time_ms: 0,
            compared: "not compared: a baseline has no script".into(),
        });
    }
    for a in &applied {
        let Some(m) = set.find(&a.version) else {
            problems.push(format!(
                "version {} is applied per {table} but no migration file of that version is in {dir}: restore the file (from version control), then adopt again",
                a.text
            ));
            continue;
        };
        let bytes = std::fs::read(&m.up.path).map_err(|source| AdoptError::Io {
            path: m.up.path.clone(),
            source,
        })?;
        let compared = match &a.checksum {
            Theirs::None => tool.checksum_note().to_string(),
            Theirs::FlywayCrc32(theirs) => match checksum::flyway(&bytes) {
                Some(ours) if ours == *theirs => {
                    format!("match ({}: {ours})", tool.checksum_note())
                }
                ours => {
                    problems.push(format!(
                        "version {}: {} differs from what Flyway applied (Flyway recorded checksum {theirs}, the file has {}): the file changed after Flyway ran it; restore the applied text, or run `flyway repair` if the edit is deliberate, then adopt again",
                        a.text,
                        m.up.path.display(),
                        ours.map_or("no computable checksum".into(), |c| c.to_string())
                    ));
                    continue;
                }
            },
            Theirs::SqlxSha384(theirs) => {
                let ours = checksum::sqlx(&bytes);
                if &ours == theirs {
                    format!("match ({})", tool.checksum_note())
                } else {
                    problems.push(format!(
                        "version {}: {} differs from what sqlx applied (sqlx recorded SHA-384 {}, the file has {}): the file changed after sqlx ran it; restore the applied text, then adopt again",
                        a.text,
                        m.up.path.display(),
                        checksum::hex(theirs),
                        checksum::hex(&ours)
                    ));
                    continue;
                }
            }
        };
        rows.push(AdoptedRow {
            version: m.version.to_string(),
            their_version: a.text.clone(),
            entry_type: EntryType::Adopted,
            script: m.script_name.clone(),
            description: m.description.clone(),
            checksum: Some(m.checksum.to_string()),
            installed_on: a.installed_on,
            installed_by: a.installed_by.clone(),
            execution_time_ms: a
                .execution_ms
                .map_or(0, |ms| i32::try_from(ms).unwrap_or(i32::MAX)),
            compared,
        });
    }
    if !problems.is_empty() {
        return Err(AdoptError::Refused {
            tool,
            table: table.to_string(),
            problems,
        });
    }
    rows.sort_by(|a, b| {
        let v = |r: &AdoptedRow| Version::parse(&r.version).ok();
        v(a).cmp(&v(b))
    });
    let newest = rows
        .iter()
        .filter_map(|r| Version::parse(&r.version).ok())
        .max();
    let base = baseline.as_ref().map(|b| b.version.clone());
    let adopted: Vec<&str> = rows.iter().map(|r| r.script.as_str()).collect();
    let (mut gaps, mut pending) = (Vec::new(), Vec::new());
    for m in &set.migrations {
        if adopted.contains(&m.script_name.as_str())
            || base.as_ref().is_some_and(|b| &m.version <= b)
        {
            continue;
        }
        if newest.as_ref().is_some_and(|n| &m.version < n) {
            gaps.push(format!(
                "{} (version {}) is older than the newest adopted version but {tool} never applied it: it stays pending, and `belay migrate` will apply it out of order; delete the file if it is obsolete",
                m.script_name, m.version
            ));
        } else {
            pending.push(m.script_name.clone());
        }
    }
    Ok(Adoption {
        outcome: Outcome::Adopted,
        tool,
        table: table.to_string(),
        history_table: String::new(),
        rows,
        gaps,
        pending,
        notes,
    })
}

/// Writes the rows and, if needed, the history table, in one transaction.
async fn record(
    conn: &mut PgConnection,
    history: &History,
    adoption: &Adoption,
    migrator: &Migrator,
) -> Result<(), AdoptError> {
    let mut tx = conn.begin().await.map_err(|source| AdoptError::Database {
        doing: "starting the adoption's transaction",
        source,
    })?;
    history.ensure(&mut tx).await?;
    for row in &adoption.rows {
        let new = NewRow {
            version: Some(row.version.clone()),
            description: row.description.clone(),
            entry_type: row.entry_type,
            script: row.script.clone(),
            checksum: row.checksum.clone(),
            execution_time_ms: row.execution_time_ms,
            deployment_id: Some(migrator.deployment_id()),
            backup_id: None,
            lock_wait_ms: 0,
            retries: 0,
            state: RowState::Success,
            error: None,
            lock_trips: 0,
            notes: Some(serde_json::json!({
                "adopted": {
                    "from": adoption.tool,
                    "table": adoption.table,
                    "version": row.their_version,
                    "checksum": row.compared,
                }
            })),
        };
        let recorded = Recorded {
            installed_by: row.installed_by.clone(),
            installed_on: row.installed_on,
        };
        history.insert_as(&mut tx, &new, &recorded).await?;
    }
    tx.commit().await.map_err(|source| AdoptError::Database {
        doing: "committing the adoption",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tools::Applied;

    fn set(files: &[(&str, &str)]) -> (tempfile::TempDir, MigrationSet) {
        let d = tempfile::tempdir().expect("tempdir");
        for (n, b) in files {
            std::fs::write(d.path().join(n), b).expect("write");
        }
        let s = belay_migrate::load(d.path()).expect("load");
        (d, s)
    }

    fn applied(v: &str) -> Applied {
        Applied::version_only(v.into(), Version::parse(v).expect("version"))
    }

    fn versions(a: &Adoption) -> Vec<(&str, EntryType)> {
        a.rows
            .iter()
            .map(|r| (r.version.as_str(), r.entry_type))
            .collect()
    }

    const FILES: &[(&str, &str)] = &[
        ("1_a.up.sql", "select 1;"),
        ("2_b.up.sql", "select 2;"),
        ("3_c.up.sql", "select 3;"),
        ("4_d.up.sql", "select 4;"),
    ];

    #[test]
    fn unapplied_files_below_the_newest_are_gaps_and_above_it_pending() {
        let (_d, s) = set(FILES);
        let record = Record {
            applied: vec![applied("1"), applied("3")],
            ..Record::default()
        };
        let a = plan(Tool::Dbmate, "public.schema_migrations", &s, record).expect("plan");
        assert_eq!(
            versions(&a),
            [("1", EntryType::Adopted), ("3", EntryType::Adopted)]
        );
        assert_eq!(a.gaps.len(), 1);
        assert!(
            a.gaps[0].starts_with("2_b.up.sql (version 2)"),
            "{:?}",
            a.gaps
        );
        assert_eq!(a.pending, ["4_d.up.sql"]);
        assert!(
            a.rows
                .iter()
                .all(|r| r.compared.starts_with("not compared"))
        );
    }

    #[test]
    fn golang_migrates_one_version_covers_every_file_up_to_it() {
        let (_d, s) = set(FILES);
        let record = Record {
            up_to: Some(applied("3")),
            ..Record::default()
        };
        let a = plan(Tool::GolangMigrate, "public.schema_migrations", &s, record).expect("plan");
        assert_eq!(versions(&a).len(), 3);
        assert!(a.gaps.is_empty());
        assert_eq!(a.pending, ["4_d.up.sql"]);
        // A version with no file is refused, naming it.
        let record = Record {
            up_to: Some(applied("7")),
            ..Record::default()
        };
        let err = plan(Tool::GolangMigrate, "public.schema_migrations", &s, record)
            .expect_err("no file of version 7");
        assert!(err.to_string().contains("at version 7"), "{err}");
    }

    #[test]
    fn a_flyway_baseline_covers_older_files() {
        let (_d, s) = set(FILES);
        let record = Record {
            baseline: Some(applied("2")),
            applied: vec![applied("3")],
            ..Record::default()
        };
        let a = plan(Tool::Flyway, "public.flyway_schema_history", &s, record).expect("plan");
        assert_eq!(
            versions(&a),
            [("2", EntryType::Baseline), ("3", EntryType::Adopted)]
        );
        assert!(a.gaps.is_empty(), "{:?}", a.gaps);
        assert_eq!(a.pending, ["4_d.up.sql"]);
    }

    #[test]
    fn tool_names_round_trip() {
        for t in Tool::ALL {
            assert_eq!(t.name().parse::<Tool>(), Ok(t));
        }
        assert!("liquibase".parse::<Tool>().is_err());
    }
}
