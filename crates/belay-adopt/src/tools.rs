//! Reading each tool's history table, on the caller's connection, into one shape: which
//! versions the tool says are applied, with whatever it recorded about them. Nothing here
//! writes; the other tool's table is left exactly as it was.

use crate::{AdoptError, Tool};
use belay_core::Version;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use std::collections::BTreeMap;

/// A history table found on the search path.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// `schema.table`, for messages.
    pub name: String,
    /// Quoted, for queries.
    quoted: String,
    pub columns: Vec<String>,
}

/// What a tool recorded about one applied version.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    /// As the tool wrote it.
    pub text: String,
    pub version: Version,
    pub installed_on: Option<DateTime<Utc>>,
    pub installed_by: Option<String>,
    pub execution_ms: Option<i64>,
    pub checksum: Theirs,
}

impl Applied {
    /// A version as a tool that records nothing else about it (golang-migrate, dbmate).
    pub fn version_only(text: String, version: Version) -> Self {
        Applied {
            text,
            version,
            installed_on: None,
            installed_by: None,
            execution_ms: None,
            checksum: Theirs::None,
        }
    }
}

/// The checksum a tool recorded, if any.
#[derive(Debug, Clone)]
pub(crate) enum Theirs {
    None,
    FlywayCrc32(i32),
    SqlxSha384(Vec<u8>),
}

/// A tool's history, read.
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// Versions recorded one by one.
    pub applied: Vec<Applied>,
    /// golang-migrate records one version: it and everything below it are applied.
    pub up_to: Option<Applied>,
    /// A Flyway baseline: everything at or below it is taken as present.
    pub baseline: Option<Applied>,
    /// Reasons to refuse (failed or dirty state, rows not understood), each with a way out.
    pub problems: Vec<String>,
    /// What was read and deliberately not imported.
    pub notes: Vec<String>,
}

fn db(doing: &'static str) -> impl Fn(sqlx::Error) -> AdoptError {
    move |source| AdoptError::Database { doing, source }
}

/// The table `name` as the search path resolves it, with its columns; `None` if absent.
pub(crate) async fn find(conn: &mut PgConnection, name: &str) -> Result<Option<Table>, AdoptError> {
    let row = sqlx::query(
        "SELECT n.nspname::text, c.relname::text, \
                coalesce((SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute \
                          WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped), '{}') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass(quote_ident($1))",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking for the other tool's history table"))?;
    Ok(row.map(|r| {
        let schema: String = r.get(0);
        let table: String = r.get(1);
        Table {
            name: format!("{schema}.{table}"),
            quoted: format!(
                "\"{}\".\"{}\"",
                schema.replace('"', "\"\""),
                table.replace('"', "\"\"")
            ),
            columns: r.get(2),
        }
    }))
}

/// Why `table` is not `tool`'s, or `None` when it looks like it: the tool's columns must
/// all be there, and dbmate's `schema_migrations` must not have golang-migrate's `dirty`
/// (read as dbmate's, golang-migrate's one version would adopt only that version).
pub(crate) fn not_the_tools(tool: Tool, table: &Table) -> Option<String> {
    let missing = missing_columns(tool, table);
    if !missing.is_empty() {
        return Some(format!("it lacks {tool}'s columns {}", missing.join(", ")));
    }
    if tool == Tool::Dbmate && table.columns.iter().any(|c| c == "dirty") {
        return Some("it has golang-migrate's `dirty` column".into());
    }
    None
}

/// The columns `tool` writes that `table` lacks (empty: it looks like the tool's).
fn missing_columns(tool: Tool, table: &Table) -> Vec<&'static str> {
    let expected: &[&str] = match tool {
        Tool::Flyway => &[
            "installed_rank",
            "version",
            "description",
            "type",
            "script",
            "checksum",
            "installed_by",
            "installed_on",
            "execution_time",
            "success",
        ],
        Tool::Sqlx => &[
            "version",
            "description",
            "installed_on",
            "success",
            "checksum",
            "execution_time",
        ],
        Tool::Diesel => &["version", "run_on"],
        Tool::GolangMigrate => &["version", "dirty"],
        Tool::Dbmate => &["version"],
        Tool::Goose => &["id", "version_id", "is_applied", "tstamp"],
    };
    expected
        .iter()
        .copied()
        .filter(|c| !table.columns.iter().any(|t| t == c))
        .collect()
}

/// A version as the tool wrote it, or a problem naming the row.
fn version(tool: Tool, table: &Table, text: &str, problems: &mut Vec<String>) -> Option<Version> {
    match Version::parse(text) {
        Ok(v) => Some(v),
        Err(_) => {
            problems.push(format!(
                "{table} has version {text:?}, which belay cannot read as a version; {tool} rows belay does not understand are not adopted: fix or remove that row with {tool}, then adopt again",
                table = table.name
            ));
            None
        }
    }
}

pub(crate) async fn read(
    conn: &mut PgConnection,
    tool: Tool,
    table: &Table,
) -> Result<Record, AdoptError> {
    match tool {
        Tool::Flyway => flyway(conn, table).await,
        Tool::Sqlx => sqlx_table(conn, table).await,
        Tool::Diesel => diesel(conn, table).await,
        Tool::GolangMigrate => golang_migrate(conn, table).await,
        Tool::Dbmate => dbmate(conn, table).await,
        Tool::Goose => goose(conn, table).await,
    }
}

/// Flyway: one row per action, in `installed_rank` order; the latest row of a version
/// decides whether it stands (an undo or a `repair`-recorded deletion takes it back).
async fn flyway(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    // `installed_on` is a `timestamp` Flyway filled with the server's now(): read in the
    // session's time zone, as it was written.
    let sql = format!(
        "SELECT installed_rank::bigint, version, description, type, script, checksum, installed_by, \
                installed_on::timestamptz, execution_time::bigint, success \
         FROM {} ORDER BY installed_rank",
        table.quoted
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading flyway_schema_history"))?;
    let mut record = Record::default();
    // Per version, its latest row: whether it applies, what it recorded, its rank,
    // script and success. Indexed, so a history of thousands of rows is one pass.
    let mut latest: BTreeMap<Version, (bool, Applied, i64, String, bool)> = BTreeMap::new();
    for r in &rows {
        let rank: i64 = r.get(0);
        let text: Option<String> = r.get(1);
        let kind: String = r.get(3);
        let script: String = r.get(4);
        let checksum: Option<i32> = r.get(5);
        let success: bool = r.get(9);
        let Some(text) = text else {
            if kind == "SQL" {
                record.notes.push(format!(
                    "repeatable {script} (rank {rank}) is not imported: belay runs it once on the next migrate, as repeatable migrations are meant to be re-run"
                ));
            }
            continue;
        };
        if kind == "SCHEMA" {
            continue; // Flyway noting that it created the schema: nothing to adopt.
        }
        let Some(v) = version(Tool::Flyway, table, &text, &mut record.problems) else {
            continue;
        };
        let applied = Applied {
            text: text.clone(),
            version: v.clone(),
            installed_on: r.get(7),
            installed_by: r.get(6),
            execution_ms: r.get(8),
            checksum: match (kind.as_str(), checksum) {
                ("SQL", Some(c)) => Theirs::FlywayCrc32(c),
                _ => Theirs::None,
            },
        };
        let applies = match kind.as_str() {
            "SQL" | "JDBC" | "SPRING_JDBC" | "SCRIPT" | "CUSTOM" => true,
            "UNDO_SQL" | "UNDO_JDBC" | "UNDO_SPRING_JDBC" | "UNDO_SCRIPT" | "DELETE" => false,
            "BASELINE" => {
                if success {
                    record.baseline = Some(applied);
                }
                continue;
            }
            other => {
                record.problems.push(format!(
                    "{} rank {rank} (version {text}) has type {other:?}, which belay does not know; it adopts only what it understands: resolve it with Flyway, or adopt by hand with `belay baseline`",
                    table.name
                ));
                continue;
            }
        };
        if applies && kind != "SQL" {
            record.notes.push(format!(
                "version {text} is a Flyway {kind} migration (rank {rank}); belay runs SQL files only"
            ));
        }
        // Rows come in rank order: a later row of the same version replaces the earlier.
        latest.insert(v, (applies, applied, rank, script, success));
    }
    for (applies, applied, rank, script, success) in latest.into_values() {
        if !success {
            record.problems.push(format!(
                "Flyway recorded version {} ({script}) as failed ({} rank {rank}, success = false): fix the database by hand, run `flyway repair` to remove the failed row, run `flyway migrate` until it succeeds, then adopt again",
                applied.text, table.name
            ));
        } else if applies {
            record.applied.push(applied);
        }
    }
    Ok(record)
}

/// sqlx: one row per applied migration (a reverted one's row is deleted); `success =
/// false` marks a migration that failed part-way.
async fn sqlx_table(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    let sql = format!(
        "SELECT version::bigint, installed_on::timestamptz, success, checksum, execution_time::bigint \
         FROM {} ORDER BY version",
        table.quoted
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading _sqlx_migrations"))?;
    let mut record = Record::default();
    for r in &rows {
        let v: i64 = r.get(0);
        let text = v.to_string();
        let Some(version) = version(Tool::Sqlx, table, &text, &mut record.problems) else {
            continue;
        };
        let success: bool = r.get(2);
        if !success {
            record.problems.push(format!(
                "sqlx recorded version {text} as failed ({}: success = false): the migration stopped part-way; fix the database by hand, delete its row from {} (as sqlx advises), run `sqlx migrate run` until it succeeds, then adopt again",
                table.name, table.name
            ));
            continue;
        }
        let nanos: i64 = r.get(4);
        record.applied.push(Applied {
            text,
            version,
            installed_on: r.get(1),
            installed_by: None,
            // sqlx records nanoseconds.
            execution_ms: Some(nanos / 1_000_000),
            checksum: Theirs::SqlxSha384(r.get(3)),
        });
    }
    Ok(record)
}

/// diesel: one row per applied migration, its version the folder's prefix without dashes.
async fn diesel(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    let sql = format!(
        "SELECT version::text, run_on::timestamptz FROM {} ORDER BY version",
        table.quoted
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading __diesel_schema_migrations"))?;
    let mut record = Record::default();
    for r in &rows {
        let text: String = r.get(0);
        if let Some(version) = version(Tool::Diesel, table, &text, &mut record.problems) {
            record.applied.push(Applied {
                text,
                version,
                installed_on: r.get(1),
                installed_by: None,
                execution_ms: None,
                checksum: Theirs::None,
            });
        }
    }
    Ok(record)
}

/// golang-migrate: one row, the current version and whether the last run stopped half-way.
async fn golang_migrate(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    let sql = format!("SELECT version::bigint, dirty FROM {}", table.quoted);
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading golang-migrate's schema_migrations"))?;
    let mut record = Record::default();
    if rows.len() > 1 {
        record.problems.push(format!(
            "{} has {} rows; golang-migrate keeps exactly one (the current version): is this table golang-migrate's? If it is dbmate's, pass --from dbmate",
            table.name,
            rows.len()
        ));
        return Ok(record);
    }
    let Some(r) = rows.first() else {
        return Ok(record);
    };
    let v: i64 = r.get(0);
    let dirty: bool = r.get(1);
    let text = v.to_string();
    if dirty {
        record.problems.push(format!(
            "golang-migrate is dirty at version {text} ({} dirty = true): migration {text} stopped part-way; fix the database by hand and run `migrate force {text}` (or force the version before it if {text}'s changes are not in place), then adopt again",
            table.name
        ));
        return Ok(record);
    }
    // golang-migrate's "no version" after migrating all the way down.
    if v < 0 {
        return Ok(record);
    }
    if let Some(version) = version(Tool::GolangMigrate, table, &text, &mut record.problems) {
        record.up_to = Some(Applied::version_only(text, version));
    }
    Ok(record)
}

/// dbmate: one row per applied migration, the version as text.
async fn dbmate(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    let sql = format!(
        "SELECT version::text FROM {} ORDER BY version",
        table.quoted
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading dbmate's schema_migrations"))?;
    let mut record = Record::default();
    for r in &rows {
        let text: String = r.get(0);
        if let Some(version) = version(Tool::Dbmate, table, &text, &mut record.problems) {
            record.applied.push(Applied::version_only(text, version));
        }
    }
    Ok(record)
}

/// goose: a log of rows; per version the latest (highest id) decides, `is_applied = false`
/// meaning it was rolled back. Version 0 is goose's own marker row.
async fn goose(conn: &mut PgConnection, table: &Table) -> Result<Record, AdoptError> {
    let sql = format!(
        "SELECT version_id::bigint, is_applied, tstamp::timestamptz FROM {} ORDER BY id",
        table.quoted
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading goose_db_version"))?;
    let mut record = Record::default();
    // Rows come in id order: a later row of the same version replaces the earlier.
    let mut latest: BTreeMap<i64, (bool, Option<DateTime<Utc>>)> = BTreeMap::new();
    for r in &rows {
        let v: i64 = r.get(0);
        if v != 0 {
            latest.insert(v, (r.get(1), r.get(2)));
        }
    }
    for (v, (applied, at)) in latest {
        if !applied {
            continue;
        }
        let text = v.to_string();
        if let Some(version) = version(Tool::Goose, table, &text, &mut record.problems) {
            record.applied.push(Applied {
                text,
                version,
                installed_on: at,
                installed_by: None,
                execution_ms: None,
                checksum: Theirs::None,
            });
        }
    }
    Ok(record)
}
