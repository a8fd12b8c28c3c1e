//! The schema history table in each target database (`belay.schema_history` by default):
//! a superset of Flyway's `flyway_schema_history`, so monitoring SQL written for Flyway
//! ports directly. It owns the table's DDL, row types, and reads and writes on a
//! connection the caller provides — so the executor can write a migration's row inside the
//! migration's own transaction. Beside it, the local deployment log
//! (`deployments`, `deployment_events`; see [`DeploymentRow`]), whose writes the pipeline
//! makes on a session of its own so that a failed migration's attempt stays on record.
//! It must not run migrations or decide what to apply.

mod deployments;

pub use deployments::{
    DEPLOYMENT_EVENTS, DEPLOYMENTS, DeploymentEnd, DeploymentEventRow, DeploymentRow,
    DeploymentStart, NewDeploymentEvent, PrefixMatch,
};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use std::fmt;
use uuid::Uuid;

pub const DEFAULT_SCHEMA: &str = "belay";
pub const TABLE: &str = "schema_history";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "invalid history schema name {0:?}: use letters, digits and underscores, starting with a letter or underscore"
    )]
    BadSchemaName(String),
    #[error("history table {table}: {source}")]
    Database {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "history table {table} has a row with unknown {column} {value:?} (rank {rank}); was it written by a newer belay?"
    )]
    UnknownValue {
        table: String,
        column: &'static str,
        value: String,
        rank: i32,
    },
}

/// Flyway's `type` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum EntryType {
    #[serde(rename = "SQL")]
    Sql,
    #[serde(rename = "UNDO_SQL")]
    UndoSql,
    #[serde(rename = "REPEATABLE")]
    Repeatable,
    #[serde(rename = "BASELINE")]
    Baseline,
    /// A forward migration another tool (Flyway, sqlx, diesel, golang-migrate, dbmate,
    /// goose) applied before `belay adopt` took the database over. Read as `SQL` by every
    /// state computation; the type keeps the origin visible in the table itself, and its
    /// `notes.adopted` names the tool and what was compared.
    #[serde(rename = "ADOPTED")]
    Adopted,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Sql => "SQL",
            EntryType::UndoSql => "UNDO_SQL",
            EntryType::Repeatable => "REPEATABLE",
            EntryType::Baseline => "BASELINE",
            EntryType::Adopted => "ADOPTED",
        }
    }

    /// A versioned forward migration, whoever applied it: belay (`SQL`) or, before belay
    /// took over, another tool (`ADOPTED`). Everything that asks "is this version applied"
    /// must ask this rather than compare with `Sql`.
    pub fn is_forward(self) -> bool {
        matches!(self, EntryType::Sql | EntryType::Adopted)
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SQL" => EntryType::Sql,
            "UNDO_SQL" => EntryType::UndoSql,
            "REPEATABLE" => EntryType::Repeatable,
            "BASELINE" => EntryType::Baseline,
            "ADOPTED" => EntryType::Adopted,
            _ => return None,
        })
    }
}

impl fmt::Display for EntryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The life of one row. `Running` is only ever committed for migrations that run outside
/// a transaction; a `Running` row whose runner is gone means the process died mid-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowState {
    Running,
    Success,
    Failed,
    /// A failed or interrupted row that `belay repair` set aside; kept, never deleted.
    Repaired,
}

impl RowState {
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Running => "running",
            RowState::Success => "success",
            RowState::Failed => "failed",
            RowState::Repaired => "repaired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RowState::Running,
            "success" => RowState::Success,
            "failed" => RowState::Failed,
            "repaired" => RowState::Repaired,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryRow {
    pub installed_rank: i32,
    pub version: Option<String>,
    pub description: String,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    pub script: String,
    pub checksum: Option<String>,
    pub installed_by: String,
    pub installed_on: DateTime<Utc>,
    pub execution_time_ms: i32,
    pub success: bool,
    pub deployment_id: Option<Uuid>,
    pub backup_id: Option<String>,
    pub lock_wait_ms: i64,
    pub retries: i32,
    pub state: RowState,
    pub error: Option<String>,
    /// How many times the lock guard cancelled this migration's statement because the
    /// application queued behind it past the budget (0 on rows written before the column).
    pub lock_trips: i32,
    /// What else is worth knowing about this run of the migration (allowed lint findings,
    /// overridden preflight checks, lock guard trips); `None` when there is nothing to say.
    pub notes: Option<serde_json::Value>,
}

/// A row to write. `installed_rank`, `installed_by` and `installed_on` come from the database.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub version: Option<String>,
    pub description: String,
    pub entry_type: EntryType,
    pub script: String,
    pub checksum: Option<String>,
    pub execution_time_ms: i32,
    pub deployment_id: Option<Uuid>,
    pub backup_id: Option<String>,
    pub lock_wait_ms: i64,
    pub retries: i32,
    pub state: RowState,
    pub error: Option<String>,
    pub lock_trips: i32,
    /// A JSON object, or `None` (stored as SQL NULL) when there is nothing to say.
    pub notes: Option<serde_json::Value>,
}

/// Who applied a row's migration and when, when someone other than this session did
/// (`None`: the session's `current_user` and `now()`).
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub installed_by: Option<String>,
    pub installed_on: Option<DateTime<Utc>>,
}

/// Columns added after the table's first release: (name, definition). `ensure` adds the
/// missing ones to an existing table; reads fill in their defaults when they are absent, so
/// read-only commands work on a table an older belay created.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("lock_trips", "integer NOT NULL DEFAULT 0"),
    ("notes", "jsonb"),
];

/// The name belay gives the `type` column's check, and the types it allows.
const TYPE_CHECK: &str = "schema_history_type_check";
const TYPES: &str = "'SQL', 'UNDO_SQL', 'REPEATABLE', 'BASELINE', 'ADOPTED'";

/// What `ensure` needs to know of an existing table.
struct Shape {
    columns: Vec<String>,
    /// The name of a `type` check written before `ADOPTED` existed, to be widened.
    narrow_type_check: Option<String>,
    /// Whether the deployment log's tables exist beside it (a belay before them did not
    /// create them).
    has_deployments: bool,
}

/// `notes` with `$2` (a repair's note) and the time appended to `notes.repairs`; notes
/// that are not an object (none written so) are kept under `previous`.
const REPAIR_NOTE: &str = "jsonb_set(\
    CASE WHEN jsonb_typeof(notes) = 'object' THEN notes \
         WHEN notes IS NULL THEN '{}'::jsonb \
         ELSE jsonb_build_object('previous', notes) END, \
    '{repairs}', \
    COALESCE(CASE WHEN jsonb_typeof(notes->'repairs') = 'array' THEN notes->'repairs' END, '[]'::jsonb) \
      || jsonb_build_array(jsonb_build_object('at', now()) || $2::jsonb))";

/// `notes` as jsonb accepts it: PostgreSQL text cannot hold NUL, and jsonb rejects the
/// `\u0000` escape serde_json would write for one, so NULs are dropped from every string.
pub(crate) fn storable_notes(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "")),
        Value::Array(a) => Value::Array(a.iter().map(storable_notes).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.replace('\0', ""), storable_notes(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Handle on one database's history table. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct History {
    schema: String,
    qualified: String,
}

impl History {
    pub fn new(schema: &str) -> Result<Self, HistoryError> {
        let ok = schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && schema.len() <= 63
            && schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(HistoryError::BadSchemaName(schema.to_string()));
        }
        Ok(History {
            qualified: format!("\"{schema}\".\"{TABLE}\""),
            schema: schema.to_string(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// `schema.schema_history`, for messages.
    pub fn table_name(&self) -> String {
        format!("{}.{TABLE}", self.schema)
    }

    fn err(&self, source: sqlx::Error) -> HistoryError {
        HistoryError::Database {
            table: self.table_name(),
            source,
        }
    }

    /// The DDL that creates the table and the deployment log's tables beside it; shown by
    /// `plan --sql` on a fresh database.
    pub fn create_sql(&self) -> String {
        format!(
            r#"CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS {table} (
    installed_rank integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    version        text,
    description    text        NOT NULL,
    type           text        NOT NULL CONSTRAINT {type_check} CHECK (type IN ({types})),
    script         text        NOT NULL,
    checksum       text,
    installed_by   text        NOT NULL DEFAULT current_user,
    installed_on   timestamptz NOT NULL DEFAULT now(),
    execution_time integer     NOT NULL DEFAULT 0,
    success        boolean     NOT NULL,
    deployment_id  uuid,
    backup_id      text,
    lock_wait_ms   bigint      NOT NULL DEFAULT 0,
    retries        integer     NOT NULL DEFAULT 0,
    state          text        NOT NULL CHECK (state IN ('running', 'success', 'failed', 'repaired')),
    error          text,
    lock_trips     integer     NOT NULL DEFAULT 0,
    notes          jsonb
);
CREATE INDEX IF NOT EXISTS "{idx}" ON {table} (version);
{deployments}"#,
            deployments = self.deployments_sql(),
            schema = self.schema,
            table = self.qualified,
            idx = format_args!("{TABLE}_version_idx"),
            type_check = TYPE_CHECK,
            types = TYPES,
        )
    }

    /// Whether the table exists, without creating it (read-only commands must not write).
    pub async fn exists(&self, conn: &mut PgConnection) -> Result<bool, HistoryError> {
        Ok(self.shape(conn).await?.is_some())
    }

    /// The table's shape, or `None` when it does not exist: one round trip, so the reads
    /// can adapt to a table an older belay created without costing an extra query.
    async fn shape(&self, conn: &mut PgConnection) -> Result<Option<Shape>, HistoryError> {
        let row = sqlx::query(
            "SELECT to_regclass($1) IS NOT NULL, \
                    coalesce((SELECT array_agg(attname::text) FROM pg_attribute \
                              WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped), '{}'), \
                    (SELECT conname::text FROM pg_constraint \
                      WHERE conrelid = to_regclass($1) AND contype = 'c' \
                        AND pg_get_constraintdef(oid) LIKE '%UNDO_SQL%' \
                        AND pg_get_constraintdef(oid) NOT LIKE '%ADOPTED%' LIMIT 1), \
                    to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL",
        )
        .bind(&self.qualified)
        .bind(format!("\"{}\".{DEPLOYMENTS}", self.schema))
        .bind(format!("\"{}\".{DEPLOYMENT_EVENTS}", self.schema))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;
        let exists: bool = row.try_get(0).map_err(|e| self.err(e))?;
        let columns: Vec<String> = row.try_get(1).map_err(|e| self.err(e))?;
        let narrow_type_check: Option<String> = row.try_get(2).map_err(|e| self.err(e))?;
        let has_deployments: bool = row.try_get(3).map_err(|e| self.err(e))?;
        Ok(exists.then_some(Shape {
            columns,
            narrow_type_check,
            has_deployments,
        }))
    }

    /// `ALTER TABLE` adding the columns the table lacks and widening a `type` check that
    /// predates `ADOPTED`, or `None` when it is current.
    fn upgrade_sql(&self, shape: &Shape) -> Option<String> {
        let mut changes: Vec<String> = ADDED_COLUMNS
            .iter()
            .filter(|(name, _)| !shape.columns.iter().any(|c| c == name))
            .map(|(name, def)| format!("ADD COLUMN IF NOT EXISTS {name} {def}"))
            .collect();
        if let Some(old) = &shape.narrow_type_check {
            changes.push(format!(
                "DROP CONSTRAINT \"{}\", ADD CONSTRAINT {TYPE_CHECK} CHECK (type IN ({TYPES}))",
                old.replace('"', "\"\"")
            ));
        }
        (!changes.is_empty()).then(|| {
            // Bounded like every lock belay takes; the table is belay's own, so the wait
            // can only be a monitoring query reading it.
            format!(
                "SET LOCAL lock_timeout = '10s'; ALTER TABLE {} {}",
                self.qualified,
                changes.join(", ")
            )
        })
    }

    /// Creates schema and table if missing. Callers hold the runner lock, so two runners
    /// never race on `CREATE SCHEMA`.
    pub async fn ensure(&self, conn: &mut PgConnection) -> Result<(), HistoryError> {
        self.ensure_and_read(conn).await.map(drop)
    }

    /// Creates the table if missing and returns its rows, in as few round trips as it
    /// takes (the runner calls this once per run, under its lock).
    pub async fn ensure_and_read(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<HistoryRow>, HistoryError> {
        if let Some(shape) = self.shape(conn).await? {
            if !shape.has_deployments {
                tracing::info!(schema = %self.schema, "adding the deployment log's tables");
                self.ensure_deployments(conn).await?;
            }
            if let Some(upgrade) = self.upgrade_sql(&shape) {
                tracing::info!(table = %self.table_name(), "adding the history columns this belay records");
                // Two statements in one query: one implicit transaction, so SET LOCAL
                // holds for the ALTER and nothing outlives a failure.
                sqlx::raw_sql(sqlx::AssertSqlSafe(upgrade))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.err(e))?;
                return self.fetch_rows(conn, &[]).await;
            }
            return self.fetch_rows(conn, &shape.columns).await;
        }
        // One multi-statement query runs as one implicit transaction: all or nothing.
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.create_sql()))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Vec::new())
    }

    /// All rows in rank order; empty when the table does not exist yet.
    pub async fn rows(&self, conn: &mut PgConnection) -> Result<Vec<HistoryRow>, HistoryError> {
        match self.shape(conn).await? {
            Some(shape) => self.fetch_rows(conn, &shape.columns).await,
            None => Ok(Vec::new()),
        }
    }

    /// Reads every row. `columns` are the table's columns (empty: all known to exist); a
    /// column added since the table was created reads as its default until `ensure` adds it.
    async fn fetch_rows(
        &self,
        conn: &mut PgConnection,
        columns: &[String],
    ) -> Result<Vec<HistoryRow>, HistoryError> {
        let has = |c: &str| columns.is_empty() || columns.iter().any(|x| x == c);
        let sql = format!(
            "SELECT installed_rank, version, description, type, script, checksum, installed_by, \
             installed_on, execution_time, success, deployment_id, backup_id, lock_wait_ms, \
             retries, state, error, {} AS lock_trips, {} AS notes FROM {} ORDER BY installed_rank",
            if has("lock_trips") { "lock_trips" } else { "0" },
            if has("notes") { "notes" } else { "NULL::jsonb" },
            self.qualified
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(|r| self.decode(r)).collect()
    }

    fn decode(&self, r: &sqlx::postgres::PgRow) -> Result<HistoryRow, HistoryError> {
        let e = |e| self.err(e);
        let rank: i32 = r.try_get("installed_rank").map_err(e)?;
        let type_text: String = r.try_get("type").map_err(e)?;
        let state_text: String = r.try_get("state").map_err(e)?;
        let unknown = |column, value: String| HistoryError::UnknownValue {
            table: self.table_name(),
            column,
            value,
            rank,
        };
        Ok(HistoryRow {
            installed_rank: rank,
            version: r.try_get("version").map_err(e)?,
            description: r.try_get("description").map_err(e)?,
            entry_type: EntryType::parse(&type_text)
                .ok_or_else(|| unknown("type", type_text.clone()))?,
            script: r.try_get("script").map_err(e)?,
            checksum: r.try_get("checksum").map_err(e)?,
            installed_by: r.try_get("installed_by").map_err(e)?,
            installed_on: r.try_get("installed_on").map_err(e)?,
            execution_time_ms: r.try_get("execution_time").map_err(e)?,
            success: r.try_get("success").map_err(e)?,
            deployment_id: r.try_get("deployment_id").map_err(e)?,
            backup_id: r.try_get("backup_id").map_err(e)?,
            lock_wait_ms: r.try_get("lock_wait_ms").map_err(e)?,
            retries: r.try_get("retries").map_err(e)?,
            state: RowState::parse(&state_text)
                .ok_or_else(|| unknown("state", state_text.clone()))?,
            error: r.try_get("error").map_err(e)?,
            lock_trips: r.try_get("lock_trips").map_err(e)?,
            notes: r.try_get("notes").map_err(e)?,
        })
    }

    /// Writes a row on `conn` — inside the caller's transaction when it has one open, which
    /// is how a migration and its success row commit or vanish together.
    pub async fn insert(&self, conn: &mut PgConnection, row: &NewRow) -> Result<i32, HistoryError> {
        self.insert_as(conn, row, &Recorded::default()).await
    }

    /// [`insert`](Self::insert), with who applied it and when taken from `recorded` where
    /// it says (an adopted migration keeps the other tool's record) and from the session
    /// otherwise.
    pub async fn insert_as(
        &self,
        conn: &mut PgConnection,
        row: &NewRow,
        recorded: &Recorded,
    ) -> Result<i32, HistoryError> {
        let sql = format!(
            "INSERT INTO {} (version, description, type, script, checksum, execution_time, \
             success, deployment_id, backup_id, lock_wait_ms, retries, state, error, lock_trips, notes, \
             installed_by, installed_on) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                     coalesce($16, current_user), coalesce($17, now())) RETURNING installed_rank",
            self.qualified
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&row.version)
            .bind(&row.description)
            .bind(row.entry_type.as_str())
            .bind(&row.script)
            .bind(&row.checksum)
            .bind(row.execution_time_ms)
            .bind(row.state == RowState::Success)
            .bind(row.deployment_id)
            .bind(&row.backup_id)
            .bind(row.lock_wait_ms)
            .bind(row.retries)
            .bind(row.state.as_str())
            .bind(&row.error)
            .bind(row.lock_trips)
            .bind(
                row.notes
                    .as_ref()
                    .map(|n| sqlx::types::Json(storable_notes(n))),
            )
            .bind(&recorded.installed_by)
            .bind(recorded.installed_on)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        r.try_get(0).map_err(|e| self.err(e))
    }

    /// The row's INSERT as one literal statement (no parameters), so the executor can
    /// send it with the migration's COMMIT in a single round trip, and `plan --sql` can
    /// print exactly what runs. Strings are `E''` literals, whose escaping does not depend
    /// on `standard_conforming_strings`.
    pub fn insert_statement(&self, row: &NewRow) -> String {
        self.render_insert(row, &row.execution_time_ms.to_string())
    }

    /// [`History::insert_statement`] for a row sent in the same message as the script it
    /// records: the server fills in `execution_time` (milliseconds since the message
    /// arrived, `statement_timestamp()`), and the statement returns the row's
    /// `installed_rank`.
    pub fn insert_statement_timed_here(&self, row: &NewRow) -> String {
        format!(
            "{} RETURNING installed_rank",
            self.render_insert(
                row,
                "(extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::int",
            )
        )
    }

    /// Records the lock guard's trips on a row after its commit: those of the attempt that
    /// went on to commit, which its insert, sent before the attempt ran, could not know.
    pub async fn record_trips(
        &self,
        conn: &mut PgConnection,
        rank: i32,
        lock_trips: i32,
        notes: Option<&serde_json::Value>,
    ) -> Result<(), HistoryError> {
        let sql = format!(
            "UPDATE {} SET lock_trips = $2, notes = $3 WHERE installed_rank = $1",
            self.qualified
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rank)
            .bind(lock_trips)
            .bind(notes.map(|n| sqlx::types::Json(storable_notes(n))))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn render_insert(&self, row: &NewRow, execution_time: &str) -> String {
        fn lit(s: Option<&str>) -> String {
            match s {
                Some(s) => format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
                None => "NULL".to_string(),
            }
        }
        format!(
            "INSERT INTO {} (version, description, type, script, checksum, execution_time, \
             success, deployment_id, backup_id, lock_wait_ms, retries, state, error, lock_trips, notes) \
             VALUES ({}, {}, '{}', {}, {}, {}, {}, {}, {}, {}, {}, '{}', {}, {}, {})",
            self.qualified,
            lit(row.version.as_deref()),
            lit(Some(&row.description)),
            row.entry_type,
            lit(Some(&row.script)),
            lit(row.checksum.as_deref()),
            execution_time,
            row.state == RowState::Success,
            row.deployment_id
                .map_or("NULL".to_string(), |u| format!("'{u}'")),
            lit(row.backup_id.as_deref()),
            row.lock_wait_ms,
            row.retries,
            row.state.as_str(),
            lit(row.error.as_deref()),
            row.lock_trips,
            // JSON text in an E'' literal: its backslashes and quotes escaped like any
            // other string, then cast.
            match &row.notes {
                Some(n) => format!("{}::jsonb", lit(Some(&storable_notes(n).to_string()))),
                None => "NULL".to_string(),
            },
        )
    }

    /// Ends a `running` row of a no-transaction migration.
    pub async fn finish(
        &self,
        conn: &mut PgConnection,
        rank: i32,
        outcome: &Outcome,
    ) -> Result<(), HistoryError> {
        let sql = format!(
            "UPDATE {} SET state = $2, success = $3, execution_time = $4, lock_wait_ms = $5, \
             retries = $6, error = $7, lock_trips = $8, notes = $9 WHERE installed_rank = $1",
            self.qualified
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rank)
            .bind(outcome.state.as_str())
            .bind(outcome.state == RowState::Success)
            .bind(outcome.execution_time_ms)
            .bind(outcome.lock_wait_ms)
            .bind(outcome.retries)
            .bind(&outcome.error)
            .bind(outcome.lock_trips)
            .bind(
                outcome
                    .notes
                    .as_ref()
                    .map(|n| sqlx::types::Json(storable_notes(n))),
            )
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Sets failed and interrupted rows aside (state `repaired`); they stay for the record.
    /// Sets a failed or interrupted row aside, appending `note` (with the time) to its
    /// `notes.repairs` in the same statement.
    pub async fn mark_repaired(
        &self,
        conn: &mut PgConnection,
        rank: i32,
        note: &serde_json::Value,
    ) -> Result<(), HistoryError> {
        let sql = format!(
            "UPDATE {} SET state = 'repaired', success = false, notes = {REPAIR_NOTE} WHERE installed_rank = $1 AND state IN ('running', 'failed')",
            self.qualified
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rank)
            .bind(sqlx::types::Json(storable_notes(note)))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Realigns a row's checksum with the script on disk (`belay repair` after a
    /// deliberate, reviewed edit of an applied migration).
    /// Realigns a row's checksum, appending `note` to its `notes.repairs` in the same
    /// statement.
    pub async fn update_checksum(
        &self,
        conn: &mut PgConnection,
        rank: i32,
        checksum: &str,
        note: &serde_json::Value,
    ) -> Result<(), HistoryError> {
        let sql = format!(
            "UPDATE {} SET checksum = $3, notes = {REPAIR_NOTE} WHERE installed_rank = $1",
            self.qualified
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rank)
            .bind(sqlx::types::Json(storable_notes(note)))
            .bind(checksum)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// How a `running` row ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: RowState,
    pub execution_time_ms: i32,
    pub lock_wait_ms: i64,
    pub retries: i32,
    pub error: Option<String>,
    pub lock_trips: i32,
    /// Replaces the row's notes (the runner writes them whole).
    pub notes: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn schema_names_are_validated() {
        assert!(History::new("belay").is_ok());
        assert!(History::new("_ops2").is_ok());
        for bad in ["", "1abc", "a-b", "a\"b", "a b", &"x".repeat(64)] {
            assert!(History::new(bad).is_err(), "{bad}");
        }
    }

    /// Notes with everything that could break a literal: quotes, backslashes, JSON escapes,
    /// a newline, non-ASCII and a NUL (which jsonb cannot store).
    fn tricky_notes() -> serde_json::Value {
        serde_json::json!({
            "allowed_lint": { "rename-column": "it's \\ \"fine\"\n\\u0041 é \u{0}" },
            "overrides": [{ "check": "long_queries", "reason": "O'Brien said so; E'\\x'" }],
        })
    }

    fn tricky_notes_stored() -> serde_json::Value {
        serde_json::json!({
            "allowed_lint": { "rename-column": "it's \\ \"fine\"\n\\u0041 é " },
            "overrides": [{ "check": "long_queries", "reason": "O'Brien said so; E'\\x'" }],
        })
    }

    #[tokio::test]
    async fn a_table_from_before_lock_trips_and_notes_gains_them() {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        // The table as belay created it before the columns existed, with a row in it.
        sqlx::raw_sql(
            r#"CREATE SCHEMA belay;
CREATE TABLE belay.schema_history (
    installed_rank integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    version text, description text NOT NULL, type text NOT NULL, script text NOT NULL,
    checksum text, installed_by text NOT NULL DEFAULT current_user,
    installed_on timestamptz NOT NULL DEFAULT now(), execution_time integer NOT NULL DEFAULT 0,
    success boolean NOT NULL, deployment_id uuid, backup_id text,
    lock_wait_ms bigint NOT NULL DEFAULT 0, retries integer NOT NULL DEFAULT 0,
    state text NOT NULL, error text);
INSERT INTO belay.schema_history (version, description, type, script, success, state)
VALUES ('1', 'old', 'SQL', 'V1__old.sql', true, 'success');"#,
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let h = History::new("belay").unwrap();
        // Read-only commands read it as it is, without altering it.
        let rows = h.rows(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].lock_trips, rows[0].notes.clone()), (0, None));
        const ADDED: &str = "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'belay' AND table_name = 'schema_history' \
               AND column_name IN ('lock_trips', 'notes') ORDER BY 1";
        assert!(
            sqlx::query_scalar::<_, String>(ADDED)
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .is_empty()
        );
        // The runner's ensure adds them; the old row keeps its values and gets defaults.
        let rows = h.ensure_and_read(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].script, "V1__old.sql");
        assert_eq!(
            sqlx::query_scalar::<_, String>(ADDED)
                .fetch_all(&mut conn)
                .await
                .unwrap(),
            vec!["lock_trips", "notes"]
        );
        let not_null: String = sqlx::query_scalar(
            "SELECT is_nullable::text FROM information_schema.columns \
             WHERE table_schema = 'belay' AND table_name = 'schema_history' AND column_name = 'lock_trips'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(not_null, "NO");
        // New rows carry them; ensuring again changes nothing.
        h.ensure(&mut conn).await.unwrap();
        let mut row = NewRow {
            version: Some("2".into()),
            description: "new".into(),
            entry_type: EntryType::Sql,
            script: "V2__new.sql".into(),
            checksum: None,
            execution_time_ms: 1,
            deployment_id: None,
            backup_id: None,
            lock_wait_ms: 0,
            retries: 0,
            state: RowState::Success,
            error: None,
            lock_trips: 3,
            notes: Some(serde_json::json!({ "lock_guard_trips": [] })),
        };
        h.insert(&mut conn, &row).await.unwrap();
        row.notes = None;
        sqlx::raw_sql(sqlx::AssertSqlSafe(h.insert_statement(&row)))
            .execute(&mut conn)
            .await
            .unwrap();
        let rows = h.rows(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].lock_trips, 3);
        assert_eq!(
            rows[1].notes,
            Some(serde_json::json!({ "lock_guard_trips": [] }))
        );
        assert_eq!(rows[2].notes, None, "no notes is SQL NULL, not a JSON null");
        let sql_null: bool = sqlx::query_scalar(
            "SELECT notes IS NULL FROM belay.schema_history ORDER BY installed_rank DESC LIMIT 1",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(sql_null);
    }

    #[tokio::test]
    async fn adopted_rows_keep_the_other_tools_record_and_old_tables_learn_the_type() {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        // The table as a belay before ADOPTED created it: its type check knows four types.
        let h = History::new("belay").unwrap();
        let old = h.create_sql().replace(", 'ADOPTED'", "");
        sqlx::raw_sql(sqlx::AssertSqlSafe(old))
            .execute(&mut conn)
            .await
            .unwrap();
        let row = NewRow {
            version: Some("3".into()),
            description: "users".into(),
            entry_type: EntryType::Adopted,
            script: "3_users.up.sql".into(),
            checksum: Some("abc".into()),
            execution_time_ms: 7,
            deployment_id: None,
            backup_id: None,
            lock_wait_ms: 0,
            retries: 0,
            state: RowState::Success,
            error: None,
            lock_trips: 0,
            notes: Some(serde_json::json!({ "adopted": { "from": "sqlx" } })),
        };
        assert!(
            h.insert(&mut conn, &row).await.is_err(),
            "the old check refuses ADOPTED"
        );
        h.ensure(&mut conn).await.unwrap();
        let at: DateTime<Utc> = "2024-05-06T07:08:09Z".parse().unwrap();
        h.insert_as(
            &mut conn,
            &row,
            &Recorded {
                installed_by: Some("flyway_user".into()),
                installed_on: Some(at),
            },
        )
        .await
        .unwrap();
        h.insert_as(&mut conn, &row, &Recorded::default())
            .await
            .unwrap();
        let rows = h.rows(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].entry_type, EntryType::Adopted);
        assert_eq!(rows[0].installed_by, "flyway_user");
        assert_eq!(rows[0].installed_on, at);
        assert_ne!(rows[1].installed_by, "flyway_user", "the session's user");
        assert!(rows[1].installed_on > at, "the session's now()");
        // Other types are still checked.
        let bad = sqlx::query(
            "INSERT INTO belay.schema_history (description, type, script, success, state) \
             VALUES ('x', 'NONSENSE', 'x', true, 'success')",
        )
        .execute(&mut conn)
        .await;
        assert!(bad.is_err());
    }

    #[tokio::test]
    async fn rows_round_trip_through_a_real_database() {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let h = History::new("belay").unwrap();
        assert!(
            h.rows(&mut conn).await.unwrap().is_empty(),
            "no table yet reads as empty"
        );
        assert!(
            !h.exists(&mut conn).await.unwrap(),
            "reading must not create the table"
        );
        h.ensure(&mut conn).await.unwrap();
        h.ensure(&mut conn).await.unwrap();
        let row = NewRow {
            version: Some("1.1".into()),
            description: "it's a test".into(),
            entry_type: EntryType::Sql,
            script: "V1.1__test.sql".into(),
            checksum: Some("abc".into()),
            execution_time_ms: 12,
            deployment_id: Some(Uuid::new_v4()),
            backup_id: None,
            lock_wait_ms: 300,
            retries: 2,
            state: RowState::Running,
            error: None,
            lock_trips: 0,
            notes: None,
        };
        let rank = h.insert(&mut conn, &row).await.unwrap();
        h.finish(
            &mut conn,
            rank,
            &Outcome {
                state: RowState::Failed,
                execution_time_ms: 40,
                lock_wait_ms: 500,
                retries: 3,
                error: Some("boom".into()),
                lock_trips: 2,
                notes: Some(serde_json::json!({ "lock_guard_trips": [{ "blocked_sessions": 3 }] })),
            },
        )
        .await
        .unwrap();
        let rows = h.rows(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.version.as_deref(), Some("1.1"));
        assert_eq!(r.state, RowState::Failed);
        assert!(!r.success);
        assert_eq!(
            (r.retries, r.lock_wait_ms, r.execution_time_ms),
            (3, 500, 40)
        );
        assert_eq!(r.lock_trips, 2);
        assert_eq!(
            r.notes
                .as_ref()
                .map(|n| n["lock_guard_trips"][0]["blocked_sessions"].clone()),
            Some(serde_json::json!(3))
        );
        h.mark_repaired(
            &mut conn,
            rank,
            &serde_json::json!({ "action": "set_aside" }),
        )
        .await
        .unwrap();
        // The literal form stores the same values, however awkward the text.
        let mut tricky = row.clone();
        tricky.description = r"it's \ a 'quoted' \n test".into();
        tricky.state = RowState::Success;
        tricky.lock_trips = 1;
        tricky.notes = Some(tricky_notes());
        sqlx::raw_sql(sqlx::AssertSqlSafe(h.insert_statement(&tricky)))
            .execute(&mut conn)
            .await
            .unwrap();
        let last = h.rows(&mut conn).await.unwrap().pop().unwrap();
        assert_eq!(last.description, tricky.description);
        assert_eq!(
            (last.state, last.success, last.retries),
            (RowState::Success, true, 2)
        );
        assert_eq!(last.deployment_id, row.deployment_id);
        assert_eq!(last.lock_trips, 1);
        assert_eq!(last.notes, Some(tricky_notes_stored()));
        // And the bound form stores the same notes.
        let rank = h.insert(&mut conn, &tricky).await.unwrap();
        let bound = h.rows(&mut conn).await.unwrap().pop().unwrap();
        assert_eq!(bound.installed_rank, rank);
        assert_eq!(bound.notes, Some(tricky_notes_stored()));
        assert_eq!(
            h.rows(&mut conn).await.unwrap()[0].state,
            RowState::Repaired
        );
        // The Flyway monitoring query from the seeds runs unchanged against our table.
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT installed_rank, version, description, type, script, checksum, installed_by, installed_on, execution_time, success FROM belay.schema_history ORDER BY installed_rank DESC) s",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(n, 3);
    }
}
