//! Postflight: did the migration leave the database as it should be? Invalid indexes,
//! `NOT VALID` constraints, user assertions, smoke queries, `verify.sql` scripts. Every
//! user-supplied query runs in its own transaction that is rolled back, under a
//! statement timeout: postflight observes, it never changes the database.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::check::{CheckResult, CheckStatus, Severity};
use crate::pg_error::describe;
use crate::preflight::{MigrationSummary, one_line};
use crate::{HealthError, units};

/// What postflight checks, from `belay.toml` (`[[checks]]`, `[[smoke]]`, `[postflight]`)
/// plus what the caller adds: the `verify.sql` scripts of the migrations just applied and
/// the history summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostflightSpec {
    pub checks: Vec<UserCheck>,
    pub smoke: Vec<SmokeQuery>,
    #[serde(skip)]
    pub verify_scripts: Vec<VerifyScript>,
    /// Migration status after the run; any failed version blocks (`history` check).
    #[serde(skip)]
    pub history: Option<MigrationSummary>,
    /// Severity of a `NOT VALID` constraint left behind.
    pub not_valid_constraints: Severity,
    /// `statement_timeout` for each user query (assertions, smoke, verify scripts).
    #[serde(with = "units::duration")]
    pub statement_timeout: Duration,
}

impl Default for PostflightSpec {
    fn default() -> Self {
        PostflightSpec {
            checks: Vec::new(),
            smoke: Vec::new(),
            verify_scripts: Vec::new(),
            history: None,
            not_valid_constraints: Severity::Block,
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// `[[checks]]`: a named query and what its result must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCheck {
    pub name: String,
    pub query: String,
    pub expect: Expectation,
}

/// `[[smoke]]`: a query the application depends on, run after the migration. It passes
/// when it succeeds (inside a transaction that is rolled back, under the statement
/// timeout) **and returns at least one row**: a smoke query that reads nothing has tested
/// nothing (`SELECT … FROM users WHERE id = 42` after the row went away), so zero rows
/// block unless the query says `allow_no_rows = true`. A query that must return no rows,
/// or a given value, is an assertion: `[[checks]]` with `expect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeQuery {
    pub name: String,
    pub query: String,
    /// Zero rows pass too: only success is asserted [default: false].
    #[serde(default)]
    pub allow_no_rows: bool,
}

impl SmokeQuery {
    /// A smoke query that must succeed and return at least one row.
    pub fn new(name: impl Into<String>, query: impl Into<String>) -> Self {
        SmokeQuery {
            name: name.into(),
            query: query.into(),
            allow_no_rows: false,
        }
    }

    fn threshold(&self) -> &'static str {
        if self.allow_no_rows {
            "succeeds (any number of rows)"
        } else {
            "succeeds with at least 1 row"
        }
    }
}

/// A `verify.sql` script: it must not raise and must return no rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyScript {
    pub path: PathBuf,
    pub sql: String,
}

impl From<(PathBuf, String)> for VerifyScript {
    fn from((path, sql): (PathBuf, String)) -> Self {
        VerifyScript { path, sql }
    }
}

/// What a query's result must be: `"no_rows"`, `"zero"` (the first column of a single
/// row is 0, as `SELECT count(*) …` of bad rows), `"equals=N"`, `"at_most=N"`
/// (the first column of the first row). One spelling everywhere — `belay probe sql --expect`,
/// `expect =` in `[[checks]]` and `[[probes]]`, agent.toml: `"no_rows"`, `"zero"`,
/// `"equals=N"`, `"at_most=N"` (see [`Expectation::from_str`]). The table form older files
/// used (`expect = { equals = 5 }`) is still read, so stored policies keep loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    NoRows,
    Zero,
    Equals(i64),
    AtMost(i64),
}

/// The accepted spellings, for error messages.
pub const EXPECTATION_FORMS: &str =
    "\"no_rows\", \"zero\", \"equals=N\" or \"at_most=N\" (N an integer)";

impl Expectation {
    /// The spelling `from_str` reads: `no_rows`, `zero`, `equals=N`, `at_most=N`.
    pub fn spelling(&self) -> String {
        match self {
            Expectation::NoRows => "no_rows".into(),
            Expectation::Zero => "zero".into(),
            Expectation::Equals(n) => format!("equals={n}"),
            Expectation::AtMost(n) => format!("at_most={n}"),
        }
    }
}

impl std::str::FromStr for Expectation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an expectation: use {EXPECTATION_FORMS}");
        let number = |n: &str| n.trim().parse::<i64>().map_err(|_| bad());
        match s.trim() {
            "no_rows" => Ok(Expectation::NoRows),
            "zero" => Ok(Expectation::Zero),
            other => match other.split_once('=') {
                Some((k, n)) if k.trim() == "equals" => Ok(Expectation::Equals(number(n)?)),
                Some((k, n)) if k.trim() == "at_most" => Ok(Expectation::AtMost(number(n)?)),
                _ => Err(bad()),
            },
        }
    }
}

impl Serialize for Expectation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.spelling())
    }
}

impl<'de> Deserialize<'de> for Expectation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The table form older files and stored policies used.
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Tagged {
            Equals(i64),
            AtMost(i64),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Tagged(Tagged),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(format!("`expect` must be one of {EXPECTATION_FORMS}"))
        })? {
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
            Raw::Tagged(Tagged::Equals(n)) => Ok(Expectation::Equals(n)),
            Raw::Tagged(Tagged::AtMost(n)) => Ok(Expectation::AtMost(n)),
        }
    }
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expectation::NoRows => f.write_str("no rows"),
            Expectation::Zero => f.write_str("= 0"),
            Expectation::Equals(n) => write!(f, "= {n}"),
            Expectation::AtMost(n) => write!(f, "<= {n}"),
        }
    }
}

/// What a query returned, reduced to what expectations look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    pub rows: usize,
    /// The first column of the first row in its text form; `Some(None)` is NULL.
    pub first: Option<Option<String>>,
}

impl Observed {
    pub(crate) fn from_rows(rows: &[PgRow]) -> Self {
        let first = rows.first().map(|row| {
            if row.columns().is_empty() {
                None
            } else {
                // The simple query protocol returns text: any type reads as its text form.
                row.try_get_unchecked::<Option<String>, _>(0).ok().flatten()
            }
        });
        Observed {
            rows: rows.len(),
            first,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.first {
            None => "no rows".to_string(),
            Some(v) => {
                let v = v
                    .as_deref()
                    .map_or_else(|| "NULL".to_string(), |v| one_line(v, 200));
                if self.rows == 1 {
                    format!("1 row, first value {v}")
                } else {
                    format!("{} rows, first value {v}", self.rows)
                }
            }
        }
    }
}

impl Expectation {
    /// Whether `observed` meets the expectation.
    pub(crate) fn holds(self, observed: &Observed) -> bool {
        let number = || -> Option<f64> {
            let text = observed.first.as_ref()?.as_ref()?;
            text.trim().parse::<f64>().ok()
        };
        #[allow(clippy::cast_precision_loss, clippy::float_cmp)]
        match self {
            Expectation::NoRows => observed.rows == 0,
            Expectation::Zero => observed.rows == 1 && number() == Some(0.0),
            Expectation::Equals(n) => number() == Some(n as f64),
            Expectation::AtMost(n) => number().is_some_and(|v| v <= n as f64),
        }
    }
}

/// Runs every postflight check. A check that fails blocks, naming the objects (indexes,
/// constraints) or the query and what it returned. Only a lost connection is an error.
pub async fn postflight(
    conn: &mut PgConnection,
    spec: &PostflightSpec,
) -> Result<Vec<CheckResult>, HealthError> {
    validate(spec)?;
    let mut out = Vec::new();
    if let Some(history) = &spec.history {
        out.push(CheckResult::new(
            "history",
            if history.failed.is_empty() {
                CheckStatus::Pass
            } else {
                CheckStatus::Block
            },
            if history.failed.is_empty() {
                "no failed migrations".to_string()
            } else {
                format!("failed: {}", history.failed.join(", "))
            },
            "no failed migration",
            "inspect the failed migration's error in `belay history`; roll back or repair",
        ));
    }
    out.push(invalid_indexes(conn).await);
    out.push(not_valid_constraints(conn, spec.not_valid_constraints).await);
    for check in &spec.checks {
        let outcome = run_isolated(conn, &check.query, spec.statement_timeout).await?;
        let threshold = format!("expect {}", check.expect);
        let result = match outcome {
            Ok(observed) if check.expect.holds(&observed) => CheckResult::new(
                &check.name,
                CheckStatus::Pass,
                observed.describe(),
                threshold,
                "",
            ),
            Ok(observed) => CheckResult::new(
                &check.name,
                CheckStatus::Block,
                format!("got {}", observed.describe()),
                threshold,
                "the assertion found data the migration should not have left: inspect with the query",
            ),
            Err(e) => CheckResult::new(
                &check.name,
                CheckStatus::Block,
                format!("query failed: {}", describe(&e, &check.query)),
                threshold,
                "fix the assertion query or the schema it expects",
            ),
        };
        out.push(result.with_query(check.query.clone()));
    }
    for smoke in &spec.smoke {
        let outcome = run_isolated(conn, &smoke.query, spec.statement_timeout).await?;
        let result = match outcome {
            Ok(observed) if observed.rows == 0 && !smoke.allow_no_rows => CheckResult::new(
                &smoke.name,
                CheckStatus::Block,
                "succeeded but returned no rows",
                smoke.threshold(),
                "a smoke query that reads nothing tested nothing: select a row the application \
                 needs, or set allow_no_rows = true if no rows is a pass",
            ),
            Ok(observed) => CheckResult::new(
                &smoke.name,
                CheckStatus::Pass,
                observed.describe(),
                smoke.threshold(),
                "",
            ),
            Err(e) => CheckResult::new(
                &smoke.name,
                CheckStatus::Block,
                format!("query failed: {}", describe(&e, &smoke.query)),
                smoke.threshold(),
                "the application's queries may fail the same way: roll back or fix forward",
            ),
        };
        out.push(result.with_query(smoke.query.clone()));
    }
    for script in &spec.verify_scripts {
        let name = format!("verify:{}", script.path.display());
        let outcome = run_isolated(conn, &script.sql, spec.statement_timeout).await?;
        let result = match outcome {
            Ok(observed) if observed.rows == 0 => {
                CheckResult::new(&name, CheckStatus::Pass, "no rows", "no rows, no error", "")
            }
            Ok(observed) => CheckResult::new(
                &name,
                CheckStatus::Block,
                format!("{} returned {}", script.path.display(), observed.describe()),
                "no rows, no error",
                "the verify script found rows that should not exist: inspect them with the script",
            ),
            Err(e) => CheckResult::new(
                &name,
                CheckStatus::Block,
                format!(
                    "{} failed: {}",
                    script.path.display(),
                    describe(&e, &script.sql)
                ),
                "no rows, no error",
                "the verify script raised: the migration did not produce what it promised",
            ),
        };
        out.push(result.with_query(script.sql.clone()));
    }
    Ok(out)
}

fn validate(spec: &PostflightSpec) -> Result<(), HealthError> {
    let mut seen: HashSet<&str> = ["history", "invalid_indexes", "not_valid_constraints"]
        .into_iter()
        .collect();
    for name in spec
        .checks
        .iter()
        .map(|c| c.name.as_str())
        .chain(spec.smoke.iter().map(|s| s.name.as_str()))
    {
        if name.trim().is_empty() {
            return Err(HealthError::invalid(
                "postflight check",
                "a check has no name",
            ));
        }
        if !seen.insert(name) {
            return Err(HealthError::invalid(
                "postflight check",
                format!("the name {name:?} is used twice (or is a built-in check's)"),
            ));
        }
    }
    Ok(())
}

/// Runs user SQL in a transaction that is always rolled back, under `timeout`. The outer
/// error is a lost connection (the rollback failed); the inner one is the query's.
async fn run_isolated(
    conn: &mut PgConnection,
    sql: &str,
    timeout: Duration,
) -> Result<Result<Observed, sqlx::Error>, HealthError> {
    let lost = |e| HealthError::Database {
        during: "postflight".into(),
        source: e,
    };
    let mut tx = conn.begin().await.map_err(lost)?;
    let ms = i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(format!("{ms}ms"))
        .execute(&mut *tx)
        .await
        .map_err(lost)?;
    let outcome = sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut *tx)
        .await
        .map(|rows| Observed::from_rows(&rows));
    tx.rollback().await.map_err(lost)?;
    Ok(outcome)
}

const INVALID_INDEXES: &str =
    "SELECT format('%s on %s', i.indexrelid::regclass, i.indrelid::regclass)
   FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  ORDER BY 1";

async fn invalid_indexes(conn: &mut PgConnection) -> CheckResult {
    let found: Result<Vec<(String,)>, _> =
        sqlx::query_as(INVALID_INDEXES).fetch_all(&mut *conn).await;
    let result = match found {
        Ok(rows) if rows.is_empty() => CheckResult::new(
            "invalid_indexes",
            CheckStatus::Pass,
            "none",
            "no invalid index",
            "",
        ),
        Ok(rows) => CheckResult::new(
            "invalid_indexes",
            CheckStatus::Block,
            format!(
                "invalid: {}",
                rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ")
            ),
            "no invalid index",
            "an INVALID index (left by a failed CREATE INDEX CONCURRENTLY) is maintained on \
             every write but never used: DROP INDEX CONCURRENTLY it, fix the cause (duplicates \
             for a unique index), and create it again",
        ),
        Err(e) => CheckResult::new(
            "invalid_indexes",
            CheckStatus::Block,
            format!("query failed: {e}"),
            "no invalid index",
            "check the connection and the role's catalog access",
        ),
    };
    result.with_query(INVALID_INDEXES)
}

const NOT_VALID_CONSTRAINTS: &str = "SELECT format('%I on %s: %s', c.conname,
          CASE WHEN c.conrelid <> 0 THEN c.conrelid::regclass::text
               ELSE 'domain ' || c.contypid::regtype::text END,
          pg_get_constraintdef(c.oid))
   FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
  WHERE NOT c.convalidated AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  ORDER BY 1";

async fn not_valid_constraints(conn: &mut PgConnection, severity: Severity) -> CheckResult {
    let found: Result<Vec<(String,)>, _> = sqlx::query_as(NOT_VALID_CONSTRAINTS)
        .fetch_all(&mut *conn)
        .await;
    let result = match found {
        Ok(rows) if rows.is_empty() => CheckResult::new(
            "not_valid_constraints",
            CheckStatus::Pass,
            "none",
            "no NOT VALID constraint",
            "",
        ),
        Ok(rows) => CheckResult::new(
            "not_valid_constraints",
            severity.into(),
            format!(
                "not validated: {}",
                rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; ")
            ),
            "no NOT VALID constraint",
            "existing rows are unchecked: ALTER TABLE … VALIDATE CONSTRAINT … (takes only a \
             SHARE UPDATE EXCLUSIVE lock) in a follow-up migration",
        ),
        Err(e) => CheckResult::new(
            "not_valid_constraints",
            CheckStatus::Block,
            format!("query failed: {e}"),
            "no NOT VALID constraint",
            "check the connection and the role's catalog access",
        ),
    };
    result.with_query(NOT_VALID_CONSTRAINTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(rows: usize, first: Option<Option<&str>>) -> Observed {
        Observed {
            rows,
            first: first.map(|v| v.map(str::to_string)),
        }
    }

    #[test]
    fn expectations_table() {
        use Expectation::*;
        let cases = [
            (NoRows, obs(0, None), true),
            (NoRows, obs(1, Some(Some("0"))), false),
            (Zero, obs(1, Some(Some("0"))), true),
            (Zero, obs(1, Some(Some("0.000"))), true),
            (Zero, obs(1, Some(Some("3"))), false),
            (Zero, obs(0, None), false),
            (Zero, obs(1, Some(None)), false),
            (Zero, obs(2, Some(Some("0"))), false),
            (Equals(5), obs(1, Some(Some("5"))), true),
            (Equals(5), obs(1, Some(Some("6"))), false),
            (Equals(5), obs(1, Some(Some("five"))), false),
            (AtMost(5), obs(1, Some(Some("5"))), true),
            (AtMost(5), obs(1, Some(Some("4.5"))), true),
            (AtMost(5), obs(1, Some(Some("6"))), false),
            (AtMost(5), obs(0, None), false),
        ];
        for (expect, observed, want) in cases {
            assert_eq!(expect.holds(&observed), want, "{expect:?} {observed:?}");
        }
    }

    #[test]
    fn checks_read_from_belay_toml() {
        #[derive(Deserialize)]
        struct Config {
            #[serde(flatten)]
            postflight: PostflightSpec,
        }
        let c: Config = toml::from_str(
            r#"
            statement_timeout = "5s"
            [[checks]]
            name = "no_orphans"
            query = "SELECT 1 FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL"
            expect = "no_rows"
            [[checks]]
            name = "null_emails"
            query = "SELECT count(*) FROM users WHERE email IS NULL"
            expect = "zero"
            [[checks]]
            name = "currencies"
            query = "SELECT count(*) FROM currencies"
            expect = { equals = 3 }
            [[checks]]
            name = "dupes"
            query = "SELECT count(*) FROM x"
            expect = { at_most = 10 }
            [[checks]]
            name = "spelt_as_on_the_command_line"
            query = "SELECT count(*) FROM x"
            expect = "at_most=10"
            [[smoke]]
            name = "orders_readable"
            query = "SELECT * FROM orders LIMIT 1"
            "#,
        )
        .unwrap();
        let expects: Vec<_> = c.postflight.checks.iter().map(|c| c.expect).collect();
        assert_eq!(
            expects,
            [
                Expectation::NoRows,
                Expectation::Zero,
                Expectation::Equals(3),
                Expectation::AtMost(10),
                Expectation::AtMost(10)
            ]
        );
        assert_eq!(c.postflight.smoke.len(), 1);
        assert_eq!(c.postflight.statement_timeout, Duration::from_secs(5));
    }

    #[test]
    fn expectations_read_the_same_everywhere_and_bad_ones_name_the_forms() {
        for e in [
            Expectation::NoRows,
            Expectation::Zero,
            Expectation::Equals(-3),
            Expectation::AtMost(10),
        ] {
            // What is written (config check's output, stored policies) reads back.
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Expectation>(&json).unwrap(), e);
            assert_eq!(e.spelling().parse::<Expectation>().unwrap(), e);
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct C {
            expect: Expectation,
        }
        for bad in [
            "expect = \"equals 3\"",
            "expect = \"equal=3\"",
            "expect = 3",
            "expect = { more_than = 3 }",
            "expect = \"at_most=x\"",
        ] {
            let e = toml::from_str::<C>(bad).unwrap_err().to_string();
            assert!(e.contains("\"equals=N\""), "{bad}: {e}");
        }
    }
}
