//! The table to backfill as PostgreSQL resolves it: its qualified name, its primary key,
//! and the SQL text of the keyset-paginated statements built from them.

use crate::error::BackfillError;
use sqlx::{PgConnection, Row};

/// One primary-key column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    /// The column name as stored in the catalog.
    pub name: String,
    /// `quote_ident(name)`.
    pub quoted: String,
    /// `format_type(atttypid, atttypmod)`: how to cast a key's text form back.
    pub type_sql: String,
}

/// A table resolved through the session's `search_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub oid: i64,
    /// `schema.table` as the catalog spells it, for people.
    pub display: String,
    /// `quote_ident(schema).quote_ident(table)`, for SQL.
    pub qualified: String,
    /// The bare table name (default backfill names start with it).
    pub relname: String,
    pub key: Vec<KeyColumn>,
}

/// The statements of one batch, built once per backfill.
///
/// The key's text form travels as a `text[]` parameter and is cast back to each column's
/// type, so any key type with a text representation works and composite keys compare as
/// rows — which is what their btree index orders by, so every batch is an index range.
#[derive(Debug, Clone)]
pub(crate) struct BatchSql {
    /// `$1` text[] lower bound (exclusive), `$2` batch size → (last key of the batch as
    /// text[], rows in the batch); no row when nothing is left.
    pub next_keys_after: String,
    /// `$1` batch size; the first batch, which has no lower bound.
    pub next_keys_first: String,
    /// `$1` lower bound (exclusive), `$2` upper bound (inclusive).
    pub update_after: String,
    /// `$1` upper bound (inclusive); the first batch.
    pub update_first: String,
}

impl TableInfo {
    pub fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|k| k.name.clone()).collect()
    }

    fn key_list(&self) -> String {
        join(self.key.iter().map(|k| k.quoted.clone()))
    }

    /// The key columns qualified by the table, so assignments that join other tables
    /// (`--set "x = o.y FROM other o"`) cannot make them ambiguous.
    fn qualified_key_list(&self) -> String {
        join(
            self.key
                .iter()
                .map(|k| format!("{}.{}", self.qualified, k.quoted)),
        )
    }

    /// `($n::text[])[1]::type1, ($n::text[])[2]::type2`
    fn key_param(&self, n: u32) -> String {
        join(
            self.key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("(${n}::text[])[{}]::{}", i + 1, k.type_sql)),
        )
    }

    pub(crate) fn batch_sql(&self, set: &str, filter: Option<&str>) -> BatchSql {
        let keys = self.key_list();
        let desc = join(self.key.iter().map(|k| format!("{} DESC", k.quoted)));
        let as_text = join(self.key.iter().map(|k| format!("{}::text", k.quoted)));
        let next = |lower: Option<String>, limit: &str| {
            format!(
                "SELECT ARRAY[{as_text}], count(*) OVER () FROM (SELECT {keys} FROM {t}{w} ORDER BY {keys} LIMIT {limit}) AS batch ORDER BY {desc} LIMIT 1",
                t = self.qualified,
                w = lower
                    .map(|l| format!(" WHERE ({keys}) > ({l})"))
                    .unwrap_or_default(),
            )
        };
        let qkeys = self.qualified_key_list();
        let update = |lower: Option<u32>, upper: u32| {
            let mut conds = Vec::new();
            if let Some(n) = lower {
                conds.push(format!("({qkeys}) > ({})", self.key_param(n)));
            }
            conds.push(format!("({qkeys}) <= ({})", self.key_param(upper)));
            if let Some(f) = filter {
                // Newlines around user text end any `--` comment it finishes with.
                conds.push(format!("({f}\n)"));
            }
            update_statement(&self.qualified, set, &conds.join(" AND "))
        };
        BatchSql {
            next_keys_after: next(Some(self.key_param(1)), "$2"),
            next_keys_first: next(None, "$1"),
            update_after: update(Some(1), 2),
            update_first: update(None, 1),
        }
    }
}

/// `UPDATE t SET <set>\nWHERE <where>`. The line break keeps a trailing `--` comment in
/// the assignments from swallowing belay's own conditions.
pub(crate) fn update_statement(qualified: &str, set: &str, condition: &str) -> String {
    format!("UPDATE {qualified} SET {set}\nWHERE {condition}")
}

fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join(", ")
}

/// Resolves `name` as PostgreSQL would in a query (`search_path`, quoting rules) and reads
/// its primary key.
pub(crate) async fn resolve(
    conn: &mut PgConnection,
    name: &str,
) -> Result<TableInfo, BackfillError> {
    let row = sqlx::query(
        "SELECT c.oid::int8, c.relkind::text, n.nspname::text, c.relname::text, \
                quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass($1)",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| match &e {
        // to_regclass raises only for names it cannot parse (too many dots, bad quoting).
        sqlx::Error::Database(d) => BackfillError::TableName {
            table: name.to_string(),
            reason: d.message().to_string(),
        },
        _ => BackfillError::Query {
            what: "resolving --table",
            source: e,
        },
    })?;
    let Some(row) = row else {
        let search_path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
            .fetch_one(&mut *conn)
            .await
            .map_err(BackfillError::query("reading search_path"))?;
        return Err(BackfillError::TableNotFound {
            table: name.to_string(),
            search_path,
        });
    };
    let oid: i64 = row.get(0);
    let relkind: String = row.get(1);
    let display = format!("{}.{}", row.get::<String, _>(2), row.get::<String, _>(3));
    let kind = match relkind.as_str() {
        "r" | "p" => None,
        "v" => Some("a view"),
        "m" => Some("a materialized view"),
        "f" => Some("a foreign table"),
        "i" | "I" => Some("an index"),
        "S" => Some("a sequence"),
        _ => Some("not an ordinary table"),
    };
    if let Some(kind) = kind {
        return Err(BackfillError::NotATable {
            table: display,
            kind,
        });
    }
    let key = sqlx::query(
        "SELECT a.attname::text, quote_ident(a.attname), format_type(a.atttypid, a.atttypmod) \
         FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = $1::oid AND i.indisprimary \
         ORDER BY k.ord",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await
    .map_err(BackfillError::query("reading the primary key"))?
    .into_iter()
    .map(|r| KeyColumn {
        name: r.get(0),
        quoted: r.get(1),
        type_sql: r.get(2),
    })
    .collect::<Vec<_>>();
    if key.is_empty() {
        return Err(BackfillError::NoPrimaryKey { table: display });
    }
    Ok(TableInfo {
        oid,
        display,
        qualified: row.get(4),
        relname: row.get(3),
        key,
    })
}

/// The number of rows to expect: the planner's estimate when the table has statistics,
/// otherwise a count bounded by `statement_timeout`; `None` when neither is available.
pub(crate) async fn estimate_rows(
    conn: &mut PgConnection,
    table: &TableInfo,
    statement_timeout: std::time::Duration,
) -> Option<u64> {
    let reltuples: f64 =
        sqlx::query_scalar("SELECT reltuples::float8 FROM pg_class WHERE oid = $1::oid")
            .bind(table.oid)
            .fetch_one(&mut *conn)
            .await
            .ok()?;
    // -1 means never vacuumed or analyzed (0 too before PostgreSQL 14; partitioned parents
    // have no statistics of their own): count instead.
    if reltuples > 0.0 {
        return Some(reltuples.round() as u64);
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await.ok()?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(crate::pg_millis(statement_timeout))
        .execute(&mut *tx)
        .await
        .ok()?;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        table.qualified
    )))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await
    .ok()?;
    let _ = tx.rollback().await;
    u64::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(keys: &[(&str, &str)]) -> TableInfo {
        TableInfo {
            oid: 1,
            display: "public.orders".into(),
            qualified: "public.orders".into(),
            relname: "orders".into(),
            key: keys
                .iter()
                .map(|(n, t)| KeyColumn {
                    name: n.to_string(),
                    quoted: n.to_string(),
                    type_sql: t.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn single_key_batches_are_index_ranges_bounded_on_both_ends() {
        let sql = table(&[("id", "bigint")]).batch_sql("total = price * qty", None);
        assert_eq!(
            sql.next_keys_after,
            "SELECT ARRAY[id::text], count(*) OVER () FROM (SELECT id FROM public.orders \
             WHERE (id) > (($1::text[])[1]::bigint) ORDER BY id LIMIT $2) AS batch \
             ORDER BY id DESC LIMIT 1"
        );
        assert_eq!(
            sql.update_after,
            "UPDATE public.orders SET total = price * qty\nWHERE (public.orders.id) > \
             (($1::text[])[1]::bigint) AND (public.orders.id) <= (($2::text[])[1]::bigint)"
        );
        assert!(
            !sql.next_keys_first.contains("WHERE"),
            "{}",
            sql.next_keys_first
        );
        assert!(sql.update_first.contains("<= (($1::text[])[1]::bigint)"));
        assert!(!sql.update_first.contains(">"), "{}", sql.update_first);
    }

    #[test]
    fn composite_keys_compare_as_rows_and_the_filter_is_its_own_conjunct() {
        let sql = table(&[("tenant", "integer"), ("id", "text")])
            .batch_sql("v = 1 -- trailing comment", Some("v IS NULL -- why"));
        assert!(
            sql.next_keys_after.contains(
                "WHERE (tenant, id) > (($1::text[])[1]::integer, ($1::text[])[2]::text) ORDER BY tenant, id"
            ),
            "{}",
            sql.next_keys_after
        );
        assert!(
            sql.next_keys_after
                .contains("ORDER BY tenant DESC, id DESC LIMIT 1")
        );
        // The comments end at line breaks, so belay's conditions stay live.
        assert!(
            sql.update_after.starts_with("UPDATE public.orders SET v = 1 -- trailing comment\nWHERE (public.orders.tenant, public.orders.id) > "),
            "{}",
            sql.update_after
        );
        assert!(
            sql.update_after.ends_with(" AND (v IS NULL -- why\n)"),
            "{}",
            sql.update_after
        );
    }
}
