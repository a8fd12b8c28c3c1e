//! The few queries belay-backup runs itself (versions, tables, row counts), on sqlx.

use std::str::FromStr;

use belay_core::DatabaseUrl;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, Row};

use crate::BackupError;

pub(crate) struct Db<'a> {
    pub conn: PgConnection,
    pub url: &'a DatabaseUrl,
    pub target: &'a str,
}

pub(crate) async fn connect<'a>(
    url: &'a DatabaseUrl,
    target: &'a str,
) -> Result<Db<'a>, BackupError> {
    let err = |reason: String| BackupError::Connect {
        target: target.to_owned(),
        url: url.to_string(),
        reason: belay_core::redact_url(&reason),
    };
    let opts = PgConnectOptions::from_str(url.expose())
        .map_err(|e| err(e.to_string()))?
        .application_name("belay-backup")
        .log_statements(tracing::log::LevelFilter::Trace);
    let conn = opts.connect().await.map_err(|e| err(e.to_string()))?;
    belay_core::send_without_delay();
    Ok(Db { conn, url, target })
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

impl Db<'_> {
    pub fn err<S: Into<String>>(
        &self,
        doing: S,
    ) -> impl FnOnce(sqlx::Error) -> BackupError + use<S> {
        let (target, url, doing) = (self.target.to_owned(), self.url.to_string(), doing.into());
        move |e| BackupError::Database {
            target,
            url,
            doing,
            reason: belay_core::redact_url(&e.to_string()),
        }
    }

    pub async fn exec(&mut self, sql: &str) -> Result<(), BackupError> {
        let err = self.err(sql.to_owned());
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut self.conn)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// (`server_version`, `server_version_num`).
    pub async fn server_version(&mut self) -> Result<(String, u32), BackupError> {
        let err = self.err("reading the server version");
        let row = sqlx::query(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(err)?;
        let num: i32 = row.get(1);
        Ok((row.get(0), u32::try_from(num).unwrap_or(0)))
    }

    /// Ordinary tables of the database that `pg_dump` dumps data for (not system, not
    /// temporary, not members of an extension), as (schema, name).
    pub async fn user_tables(&mut self) -> Result<Vec<(String, String)>, BackupError> {
        let err = self.err("listing tables");
        let rows = sqlx::query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                AND c.relpersistence <> 't'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype = 'e')
              ORDER BY 1, 2",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(err)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// `schema.table` or `table` (found through `search_path`) → (schema, name).
    pub async fn resolve_table(
        &mut self,
        name: &str,
    ) -> Result<Option<(String, String)>, BackupError> {
        let err = self.err(format!("looking up table {name}"));
        let row = sqlx::query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
        )
        .bind(name)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(err)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn resolve_tables(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, String)>, BackupError> {
        let mut out = Vec::new();
        for name in names {
            match self.resolve_table(name).await? {
                Some(t) if !out.contains(&t) => out.push(t),
                Some(_) => {}
                None => {
                    return Err(BackupError::TableNotFound {
                        target: self.target.to_owned(),
                        url: self.url.to_string(),
                        table: name.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    pub async fn count(&mut self, schema: &str, name: &str) -> Result<i64, BackupError> {
        let sql = format!("SELECT count(*) FROM {}", qualified(schema, name));
        let err = self.err(sql.clone());
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut self.conn)
            .await
            .map_err(err)?;
        Ok(row.get::<i64, _>(0))
    }

    /// A table's columns, `name type` in column order (empty when it does not exist).
    pub async fn columns(&mut self, schema: &str, name: &str) -> Result<Vec<String>, BackupError> {
        let err = self.err(format!("reading the columns of {schema}.{name}"));
        let rows = sqlx::query(
            "SELECT a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
        )
        .bind(qualified(schema, name))
        .fetch_all(&mut self.conn)
        .await
        .map_err(err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Every version applied according to `<schema>.schema_history`, in version order;
    /// empty if the table does not exist (or does not look like a history table).
    pub async fn applied_versions(&mut self, schema: &str) -> Result<Vec<String>, BackupError> {
        let table = qualified(schema, "schema_history");
        let err = self.err("looking for the schema history");
        let exists: bool = sqlx::query("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut self.conn)
            .await
            .map_err(err)?
            .get(0);
        if !exists {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT version, type, success FROM {table} WHERE version IS NOT NULL ORDER BY installed_rank"
        );
        let rows = match sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut self.conn)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "{table} is not a belay history table; schema version unknown");
                return Ok(Vec::new());
            }
        };
        let history = rows.iter().map(|r| {
            (
                r.get::<String, _>(0),
                r.get::<String, _>(1),
                r.get::<bool, _>(2),
            )
        });
        Ok(applied(history))
    }
}

/// From history rows in `installed_rank` order: the versions whose latest successful row
/// applied them (an `UNDO_SQL` row undoes one), in version order.
pub(crate) fn applied(rows: impl Iterator<Item = (String, String, bool)>) -> Vec<String> {
    let mut state: Vec<(String, bool)> = Vec::new();
    for (version, ty, success) in rows {
        if !success {
            continue;
        }
        let applied = ty != "UNDO_SQL";
        match state.iter_mut().find(|(v, _)| *v == version) {
            Some(slot) => slot.1 = applied,
            None => state.push((version, applied)),
        }
    }
    let mut out: Vec<(belay_core::Version, String)> = state
        .into_iter()
        .filter(|(_, applied)| *applied)
        .filter_map(|(v, _)| belay_core::Version::parse(&v).ok().map(|p| (p, v)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, v)| v).collect()
}

pub(crate) async fn close(db: Db<'_>) {
    let _ = db.conn.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_applied_version_honours_undo_and_numeric_order() {
        let rows = [
            ("1", "SQL", true),
            ("1.10", "SQL", true),
            ("1.9", "SQL", true),
            ("2", "SQL", false),
            ("3", "SQL", true),
            ("3", "UNDO_SQL", true),
        ]
        .map(|(v, t, s)| (v.to_owned(), t.to_owned(), s));
        assert_eq!(applied(rows.into_iter()), ["1", "1.9", "1.10"]);
        assert!(applied(std::iter::empty()).is_empty());
    }
}
