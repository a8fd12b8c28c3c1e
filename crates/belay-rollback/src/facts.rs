//! What the planner must learn beyond the deployment record, each behind a seam so a
//! remote rollback (agents) can answer the same questions: which tables a migration
//! writes and which data its undo drops ([`ScriptFacts`], from the files, where they
//! are), and how many rows each table holds now ([`TableStats`], from the target).

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use sqlx::{Connection, PgConnection};

/// What one migration script does to tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptFact {
    /// Tables the forward script writes; `None` when some statement writes tables belay
    /// cannot name (DML, functions, `DO`) and no `-- belay:tables=` says which.
    pub writes: Option<Vec<String>>,
    /// Tables whose rows or columns its undo drops.
    pub undo_drops: Vec<String>,
}

/// Answers [`ScriptFact`]s for a target's migrations (the CLI reads the files).
#[async_trait::async_trait]
pub trait ScriptFacts: Send + Sync {
    /// `None` when the script is unknown here (its file is gone).
    async fn fact(&self, target: &str, script: &str) -> Result<Option<ScriptFact>, ApiError>;
}

/// No facts: every migration's tables unknown.
#[derive(Debug, Default)]
pub struct NoScriptFacts;

#[async_trait::async_trait]
impl ScriptFacts for NoScriptFacts {
    async fn fact(&self, _: &str, _: &str) -> Result<Option<ScriptFact>, ApiError> {
        Ok(None)
    }
}

/// A table's live row count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTable {
    /// As asked for.
    pub table: String,
    /// `None`: the table does not exist now.
    pub rows: Option<i64>,
}

/// Live row counts of a target's tables.
#[async_trait::async_trait]
pub trait TableStats: Send + Sync {
    async fn rows(&self, target: &str, tables: &[String]) -> Result<Vec<LiveTable>, ApiError>;
}

/// [`TableStats`] over a database URL: exact `count(*)` of each table, in one read-only
/// transaction so the counts are of one moment.
#[derive(Debug, Clone)]
pub struct PgTableStats {
    url: DatabaseUrl,
}

impl PgTableStats {
    pub fn new(url: DatabaseUrl) -> Self {
        PgTableStats { url }
    }
}

#[async_trait::async_trait]
impl TableStats for PgTableStats {
    async fn rows(&self, target: &str, tables: &[String]) -> Result<Vec<LiveTable>, ApiError> {
        let unavailable = |e: sqlx::Error| {
            ApiError::new(
                ErrorKind::Unavailable,
                belay_core::redact_url(&format!("counting rows on {target:?}: {e}")),
            )
        };
        let mut conn = PgConnection::connect(self.url.expose())
            .await
            .map_err(unavailable)?;
        belay_core::send_without_delay();
        sqlx::raw_sql(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL statement_timeout = '30s'",
        )
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
        let mut out = Vec::new();
        for table in tables {
            let regclass: Option<String> =
                sqlx::query_scalar("SELECT to_regclass($1)::oid::regclass::text")
                    .bind(table)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(unavailable)?;
            let rows = match regclass {
                None => None,
                Some(name) => {
                    // `name` is regclass output: quoted by PostgreSQL where needed.
                    let sql = format!("SELECT count(*) FROM {name}");
                    Some(
                        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                            .fetch_one(&mut conn)
                            .await
                            .map_err(unavailable)?,
                    )
                }
            };
            out.push(LiveTable {
                table: table.clone(),
                rows,
            });
        }
        let _ = conn.close().await;
        Ok(out)
    }
}
