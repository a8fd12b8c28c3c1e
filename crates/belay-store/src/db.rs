//! A thin layer that runs one SQL text on either backend.
//!
//! Queries are written once, in PostgreSQL's spelling with `$n` parameters (SQLite accepts
//! `$n` too) and tables qualified with `belay_controller.`. On SQLite the qualifier is
//! stripped. Values differ by backend only in their column types: SQLite keeps timestamps
//! as fixed-width RFC 3339 text with microseconds (so text order is time order), UUIDs as
//! hyphenated text and JSON as text; PostgreSQL uses `timestamptz`, `uuid` and `jsonb`.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Postgres, Row as _, Sqlite};
use uuid::Uuid;

pub(crate) const SCHEMA_PREFIX: &str = "belay_controller.";

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    /// With the lock every write of this process takes (see [`SqliteWriter`]).
    Sqlite(sqlx::SqlitePool, SqliteWriter),
    Pg(sqlx::PgPool),
}

/// SQLite has one writer at a time, and a writer that finds the file locked waits in
/// SQLite's busy handler, which sleeps (1, 2, 5, 10 … ms) and polls; with the controller
/// recording the events of many targets at once, those sleeps added up to most of a
/// write's time. The controller's write transactions take this lock first instead: they
/// queue in order and each starts the moment the previous one commits. Single autocommitted
/// statements (heartbeats) do not queue behind them; `busy_timeout` covers those and
/// another process on the same file.
#[derive(Clone, Debug, Default)]
pub(crate) struct SqliteWriter(std::sync::Arc<tokio::sync::Mutex<()>>);

impl SqliteWriter {
    async fn lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.0.clone().lock_owned().await
    }
}

/// A bind value.
#[derive(Debug)]
pub(crate) enum Val<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    I64(i64),
    Ts(DateTime<Utc>),
    OptTs(Option<DateTime<Utc>>),
    Uuid(Uuid),
    OptUuid(Option<Uuid>),
    Bool(bool),
    Json(&'a serde_json::Value),
}

/// Timestamps as SQLite stores them: always 27 characters, so text order is time order.
pub(crate) fn ts_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Now, to the microsecond (what both backends keep).
pub(crate) fn now() -> DateTime<Utc> {
    micros(Utc::now())
}

pub(crate) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

fn sqlite_query(
    sql: &'static str,
    vals: &[Val<'_>],
) -> sqlx::query::Query<'static, Sqlite, SqliteArguments> {
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.replace(SCHEMA_PREFIX, "")));
    for v in vals {
        q = match v {
            Val::Text(s) => q.bind(*s),
            Val::OptText(s) => q.bind(*s),
            Val::I64(i) => q.bind(*i),
            Val::Ts(t) => q.bind(ts_text(*t)),
            Val::OptTs(t) => q.bind(t.map(ts_text)),
            Val::Uuid(u) => q.bind(u.to_string()),
            Val::OptUuid(u) => q.bind(u.map(|u| u.to_string())),
            Val::Bool(b) => q.bind(*b),
            Val::Json(j) => q.bind(j.to_string()),
        };
    }
    q
}

fn pg_query(
    sql: &'static str,
    vals: &[Val<'_>],
) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    let mut q = sqlx::query(sql);
    for v in vals {
        q = match v {
            Val::Text(s) => q.bind(*s),
            Val::OptText(s) => q.bind(*s),
            Val::I64(i) => q.bind(*i),
            Val::Ts(t) => q.bind(*t),
            Val::OptTs(t) => q.bind(*t),
            Val::Uuid(u) => q.bind(*u),
            Val::OptUuid(u) => q.bind(*u),
            Val::Bool(b) => q.bind(*b),
            Val::Json(j) => q.bind(sqlx::types::Json(*j)),
        };
    }
    q
}

/// A result row from either backend.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

fn decode_err(col: &str, what: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Decode(format!("column {col}: {what}").into())
}

impl Row {
    pub(crate) fn text(&self, col: &str) -> Result<String, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r.try_get(col),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r.try_get(col),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn i64(&self, col: &str) -> Result<i64, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r.try_get(col),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn opt_ts(&self, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r
                .try_get::<Option<String>, _>(col)?
                .map(|s| {
                    DateTime::parse_from_rfc3339(&s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| decode_err(col, format!("timestamp {s:?}: {e}")))
                })
                .transpose(),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn ts(&self, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.opt_ts(col)?
            .ok_or_else(|| decode_err(col, "unexpected NULL timestamp"))
    }

    pub(crate) fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        match self {
            Row::Sqlite(r) => {
                let s: String = r.try_get(col)?;
                Uuid::parse_str(&s).map_err(|e| decode_err(col, format!("uuid {s:?}: {e}")))
            }
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r
                .try_get::<Option<String>, _>(col)?
                .map(|s| {
                    Uuid::parse_str(&s).map_err(|e| decode_err(col, format!("uuid {s:?}: {e}")))
                })
                .transpose(),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn bool(&self, col: &str) -> Result<bool, sqlx::Error> {
        match self {
            Row::Sqlite(r) => r.try_get(col),
            Row::Pg(r) => r.try_get(col),
        }
    }

    pub(crate) fn json(&self, col: &str) -> Result<serde_json::Value, sqlx::Error> {
        match self {
            Row::Sqlite(r) => {
                let s: String = r.try_get(col)?;
                serde_json::from_str(&s).map_err(|e| decode_err(col, format!("JSON: {e}")))
            }
            Row::Pg(r) => Ok(r.try_get::<sqlx::types::Json<serde_json::Value>, _>(col)?.0),
        }
    }

    /// A nullable column holding one of our enums' names.
    pub(crate) fn opt_parsed<T>(&self, col: &str) -> Result<Option<T>, sqlx::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.opt_text(col)?
            .map(|s| s.parse().map_err(|e: T::Err| decode_err(col, e)))
            .transpose()
    }

    /// A column holding one of our enums' names.
    pub(crate) fn parsed<T>(&self, col: &str) -> Result<T, sqlx::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.text(col)?
            .parse()
            .map_err(|e: T::Err| decode_err(col, e))
    }
}

impl Pool {
    pub(crate) async fn execute(
        &self,
        sql: &'static str,
        vals: &[Val<'_>],
    ) -> Result<u64, sqlx::Error> {
        Ok(match self {
            // One autocommitted statement (a heartbeat): not queued behind the
            // transactions of a deployment's targets, as before the writer lock.
            Pool::Sqlite(p, _) => sqlite_query(sql, vals).execute(p).await?.rows_affected(),
            Pool::Pg(p) => pg_query(sql, vals).execute(p).await?.rows_affected(),
        })
    }

    pub(crate) async fn fetch_all(
        &self,
        sql: &'static str,
        vals: &[Val<'_>],
    ) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p, _) => sqlite_query(sql, vals)
                .fetch_all(p)
                .await?
                .into_iter()
                .map(Row::Sqlite)
                .collect(),
            Pool::Pg(p) => pg_query(sql, vals)
                .fetch_all(p)
                .await?
                .into_iter()
                .map(Row::Pg)
                .collect(),
        })
    }

    pub(crate) async fn fetch_optional(
        &self,
        sql: &'static str,
        vals: &[Val<'_>],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p, _) => sqlite_query(sql, vals)
                .fetch_optional(p)
                .await?
                .map(Row::Sqlite),
            Pool::Pg(p) => pg_query(sql, vals).fetch_optional(p).await?.map(Row::Pg),
        })
    }

    /// A write transaction. On SQLite it is `BEGIN IMMEDIATE`, which takes the write lock
    /// at once (waiting up to `busy_timeout`): a deferred transaction that reads first and
    /// writes later can fail with SQLITE_BUSY without waiting when another writer got in
    /// between. It holds this process's [`SqliteWriter`] until it ends.
    pub(crate) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p, writer) => {
                let writing = writer.lock().await;
                Tx::Sqlite {
                    tx: p.begin_with("BEGIN IMMEDIATE").await?,
                    _writing: writing,
                }
            }
            Pool::Pg(p) => Tx::Pg(p.begin().await?),
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Pool::Sqlite(p, _) => p.close().await,
            Pool::Pg(p) => p.close().await,
        }
    }
}

/// A transaction on either backend; dropped without `commit`, it rolls back.
pub(crate) enum Tx {
    Sqlite {
        tx: sqlx::Transaction<'static, Sqlite>,
        /// This process's write lock, held until the transaction ends.
        _writing: tokio::sync::OwnedMutexGuard<()>,
    },
    Pg(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub(crate) async fn execute(
        &mut self,
        sql: &'static str,
        vals: &[Val<'_>],
    ) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Tx::Sqlite { tx: t, .. } => sqlite_query(sql, vals)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Pg(t) => pg_query(sql, vals).execute(&mut **t).await?.rows_affected(),
        })
    }

    pub(crate) async fn fetch_optional(
        &mut self,
        sql: &'static str,
        vals: &[Val<'_>],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(match self {
            Tx::Sqlite { tx: t, .. } => sqlite_query(sql, vals)
                .fetch_optional(&mut **t)
                .await?
                .map(Row::Sqlite),
            Tx::Pg(t) => pg_query(sql, vals)
                .fetch_optional(&mut **t)
                .await?
                .map(Row::Pg),
        })
    }

    /// Makes concurrent agent registrations wait for each other. SQLite write
    /// transactions (`BEGIN IMMEDIATE`) already do; on PostgreSQL, a transaction-scoped
    /// advisory lock does (registrations are rare and short). Keys: belay's lock class
    /// ("bela", as the migration runner uses) and the targets table's name.
    pub(crate) async fn serialise_registrations(&mut self) -> Result<(), sqlx::Error> {
        if let Tx::Pg(t) = self {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(1650814049, hashtext('belay_controller.targets'))",
            )
            .execute(&mut **t)
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite { tx: t, .. } => t.commit().await,
            Tx::Pg(t) => t.commit().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_timestamps_sort_as_text() {
        let a = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        let b = DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap();
        let c = DateTime::from_timestamp_micros(1_700_000_001_000_000).unwrap();
        let (ta, tb, tc) = (ts_text(a), ts_text(b), ts_text(c));
        assert_eq!(ta, "2023-11-14T22:13:20.000000Z");
        assert_eq!(ta.len(), tb.len());
        assert!(ta < tb && tb < tc);
        assert_eq!(
            DateTime::parse_from_rfc3339(&tb)
                .unwrap()
                .with_timezone(&Utc),
            b
        );
    }
}
