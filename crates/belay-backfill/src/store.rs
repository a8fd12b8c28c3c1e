//! `<schema>.backfill_progress`: one row per backfill, updated in the same transaction as
//! each batch, so the saved position is always exactly the last committed batch.

use crate::error::BackfillError;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

pub const TABLE: &str = "backfill_progress";

#[derive(Debug, Clone)]
pub(crate) struct Store {
    schema_quoted: String,
    /// `"schema".backfill_progress`
    pub qualified: String,
}

/// A backfill's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Saved {
    pub table_name: String,
    pub set_clause: String,
    pub where_clause: Option<String>,
    pub key_columns: Vec<String>,
    pub last_key: Option<Vec<String>>,
    pub rows_updated: u64,
    pub rows_examined: u64,
    pub batches: u64,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Counters as committed, returned by every write so memory never runs ahead of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub last_key: Option<Vec<String>>,
    pub rows_updated: u64,
    pub rows_examined: u64,
    pub batches: u64,
    pub finished: bool,
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn counters(r: &sqlx::postgres::PgRow) -> Counters {
    Counters {
        last_key: r.get(0),
        rows_updated: count(r.get(1)),
        rows_examined: count(r.get(2)),
        batches: count(r.get(3)),
        finished: r.get(4),
    }
}

const RETURNING: &str =
    "RETURNING last_key, rows_updated, rows_examined, batches, finished_at IS NOT NULL";

impl Store {
    pub fn new(schema: &str) -> Self {
        let schema_quoted = format!("\"{}\"", schema.replace('"', "\"\""));
        Store {
            qualified: format!("{schema_quoted}.{TABLE}"),
            schema_quoted,
        }
    }

    pub async fn ensure(&self, conn: &mut PgConnection) -> Result<(), BackfillError> {
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {table} (
    name          text        PRIMARY KEY,
    table_name    text        NOT NULL,
    set_clause    text        NOT NULL,
    where_clause  text,
    key_columns   text[]      NOT NULL,
    last_key      text[],
    rows_updated  bigint      NOT NULL DEFAULT 0,
    rows_examined bigint      NOT NULL DEFAULT 0,
    batches       bigint      NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);",
            schema = self.schema_quoted,
            table = self.qualified,
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *conn)
            .await
            .map_err(BackfillError::query("creating the backfill progress table"))?;
        Ok(())
    }

    pub async fn load(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<Saved>, BackfillError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT table_name, set_clause, where_clause, key_columns, last_key, rows_updated, \
                    rows_examined, batches, finished_at \
             FROM {} WHERE name = $1",
            self.qualified
        )))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(BackfillError::query("reading backfill progress"))?;
        Ok(row.map(|r| Saved {
            table_name: r.get(0),
            set_clause: r.get(1),
            where_clause: r.get(2),
            key_columns: r.get(3),
            last_key: r.get(4),
            rows_updated: count(r.get(5)),
            rows_examined: count(r.get(6)),
            batches: count(r.get(7)),
            finished_at: r.get(8),
        }))
    }

    /// Creates the row, or resets an existing one to "nothing done yet" (`--restart`).
    pub async fn start(
        &self,
        conn: &mut PgConnection,
        name: &str,
        table: &str,
        set: &str,
        filter: Option<&str>,
        key_columns: &[String],
    ) -> Result<Counters, BackfillError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {t} (name, table_name, set_clause, where_clause, key_columns) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET table_name = EXCLUDED.table_name, \
                set_clause = EXCLUDED.set_clause, where_clause = EXCLUDED.where_clause, \
                key_columns = EXCLUDED.key_columns, last_key = NULL, rows_updated = 0, \
                rows_examined = 0, batches = 0, started_at = now(), updated_at = now(), \
                finished_at = NULL \
             {RETURNING}",
            t = self.qualified
        )))
        .bind(name)
        .bind(table)
        .bind(set)
        .bind(filter)
        .bind(key_columns)
        .fetch_one(&mut *conn)
        .await
        .map_err(BackfillError::query("saving backfill progress"))?;
        Ok(counters(&row))
    }

    /// Locks the row for the batch's transaction and returns the committed position: the
    /// truth a batch starts from, whatever this process remembers.
    pub async fn lock(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<Counters>, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT last_key, rows_updated, rows_examined, batches, finished_at IS NOT NULL \
             FROM {} WHERE name = $1 FOR UPDATE",
            self.qualified
        )))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(row.as_ref().map(counters))
    }

    /// Records one batch (inside its transaction).
    pub async fn advance(
        &self,
        conn: &mut PgConnection,
        name: &str,
        last_key: &[String],
        updated: u64,
        examined: u64,
        finished: bool,
    ) -> Result<Counters, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET last_key = $2, rows_updated = rows_updated + $3, \
                rows_examined = rows_examined + $4, batches = batches + 1, updated_at = now(), \
                finished_at = CASE WHEN $5 THEN now() END \
             WHERE name = $1 {RETURNING}",
            self.qualified
        )))
        .bind(name)
        .bind(last_key)
        .bind(i64::try_from(updated).unwrap_or(i64::MAX))
        .bind(i64::try_from(examined).unwrap_or(i64::MAX))
        .bind(finished)
        .fetch_one(&mut *conn)
        .await?;
        Ok(counters(&row))
    }

    /// Marks the backfill finished when the last batch was exactly full and the next
    /// found nothing.
    pub async fn finish(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Counters, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET finished_at = now(), updated_at = now() WHERE name = $1 {RETURNING}",
            self.qualified
        )))
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
        Ok(counters(&row))
    }
}
