//! [`LintGate`]: a `belay_migrate::ScriptGate` over `belay-lint`, and the lint context
//! rules the CLI's `lint`, `plan` and `migrate` share with it, so a script is judged the
//! same whether it runs locally, through the agent or in a fleet deployment.
//!
//! A script's context: whether it runs in belay's transaction, whether it has an undo,
//! what earlier steps of the same run created (tables, renamed tables, indexes: new and
//! empty when later steps run), its `-- belay:allow=` directives, and what the database
//! says ([`read_facts`]: the server version and the size of each table a finding is
//! about, in one catalog query). With those facts a lock finding on a new or small table
//! is downgraded, with its reason, instead of refusing the run.

use belay_core::DatabaseUrl;
use belay_lint::{
    DatabaseFacts, DowngradeBasis, Finding, LintContext, RunMemory, SmallTable, TableFacts, Verdict,
};
use belay_migrate::source::Script;
use belay_migrate::{ApiError, ErrorKind, GateScript, ScriptGate};
use sqlx::{Connection, PgConnection};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use tracing::Instrument;

/// An `allow` directive naming no lint rule: such an allow would accept nothing while its
/// author believes otherwise, so it is an error in the script, not a silent no-op.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: directive `belay:allow={rule}` names no lint rule; known: {}", path.display(), known())]
pub struct UnknownRule {
    pub path: PathBuf,
    pub rule: String,
}

fn known() -> String {
    belay_lint::RULES
        .iter()
        .map(|r| r.id)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<UnknownRule> for ApiError {
    fn from(e: UnknownRule) -> Self {
        ApiError::new(ErrorKind::InvalidSource, e.to_string())
    }
}

/// The lint context of `script`; `created` are tables created earlier in the same run.
pub fn context(
    script: &Script,
    has_undo: bool,
    undo_preserves_data: bool,
    created: &BTreeSet<String>,
) -> Result<LintContext, UnknownRule> {
    if let Some(rule) = script
        .directives
        .allow
        .keys()
        .find(|rule| !belay_lint::RULES.iter().any(|r| r.id == rule.as_str()))
    {
        return Err(UnknownRule {
            path: script.path.clone(),
            rule: rule.clone(),
        });
    }
    Ok(LintContext {
        in_transaction: script.no_transaction().is_none(),
        has_undo,
        undo_preserves_data,
        tables_created_in_this_migration: created.clone(),
        allow: script.directives.allow.clone(),
        ..LintContext::default()
    })
}

/// Findings of one script in its context, judged with `database`'s facts when given.
pub fn lint_script(
    script: &Script,
    has_undo: bool,
    undo_preserves_data: bool,
    created: &BTreeSet<String>,
    database: Option<&DatabaseFacts>,
) -> Result<Vec<Finding>, UnknownRule> {
    let mut ctx = context(script, has_undo, undo_preserves_data, created)?;
    ctx.database = database.cloned();
    Ok(belay_lint::lint(&script.path, &script.text, &ctx))
}

/// Lints the scripts of one run in order, remembering what each creates (tables, their
/// renames, indexes) for the steps after it.
#[derive(Debug, Default)]
pub struct RunLint {
    memory: RunMemory,
}

impl RunLint {
    /// Findings of the run's next forward or repeatable script, judged with `database`'s
    /// facts when given.
    pub fn next(
        &mut self,
        script: &GateScript,
        database: Option<&DatabaseFacts>,
    ) -> Result<Vec<Finding>, UnknownRule> {
        let mut ctx = context(&script.source, script.has_undo, false, &BTreeSet::new())?;
        self.memory.context(&mut ctx);
        ctx.database = database.cloned();
        let findings = belay_lint::lint(&script.source.path, &script.source.text, &ctx);
        self.memory.record(&script.script, &script.source.text);
        Ok(findings)
    }
}

/// How long the facts query may wait for a lock: `pg_relation_size` takes ACCESS SHARE on
/// each table, which waits only behind an ACCESS EXCLUSIVE holder (another migration's);
/// then the facts are given up, not the run.
const SET_FACTS_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '1s'";

/// How long `lint` and `plan` wait for a connection to read facts.
pub const FACTS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The facts query: the server version, and for each name (as written in the scripts,
/// resolved through the session's `search_path` by `to_regclass`; an index resolves to its
/// table) the table's row estimate and sizes, summed over the leaves of a partitioned
/// table. Never `count(*)`: the estimate and the sizes are catalog reads and file sizes.
/// The estimate is the last ANALYZE's rows per page times the pages there are now, as the
/// planner scales it: a table that grew since would otherwise keep its old, small count.
/// No pages measured but a heap now (PostgreSQL before 14 says 0 rows for "never
/// analyzed"): judged as never analyzed.
const FACTS_SQL: &str = r"
WITH wanted AS (
    SELECT u.name,
           to_regclass(CASE WHEN u.schema = '' THEN quote_ident(u.rel)
                            ELSE quote_ident(u.schema) || '.' || quote_ident(u.rel) END) AS oid
    FROM unnest($1::text[], $2::text[], $3::text[]) AS u(name, schema, rel)
), resolved AS (
    SELECT w.name, COALESCE(i.indrelid, c.oid) AS tbl
    FROM wanted w
    JOIN pg_class c ON c.oid = w.oid
    LEFT JOIN pg_index i ON i.indexrelid = c.oid
), facts AS (
    SELECT r.name,
           format('%I.%I', n.nspname, t.relname) AS tbl_name,
           bool_or(l.reltuples < 0 OR (l.relpages = 0 AND s.heap > 0)) AS never_analyzed,
           sum(CASE WHEN l.relpages > 0
                    THEN GREATEST(l.reltuples, 0) / l.relpages
                         * (s.heap / current_setting('block_size')::float8)
                    ELSE GREATEST(l.reltuples, 0) END)::float8 AS est_rows,
           sum(s.heap)::int8 AS heap_bytes,
           sum(pg_total_relation_size(l.oid))::int8 AS total_bytes
    FROM resolved r
    JOIN pg_class t ON t.oid = r.tbl AND t.relkind IN ('r', 'p', 'm')
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN LATERAL (
        SELECT t.oid, t.reltuples, t.relpages WHERE t.relkind <> 'p'
        UNION ALL
        SELECT c.oid, c.reltuples, c.relpages
        FROM pg_partition_tree(r.tbl) p JOIN pg_class c ON c.oid = p.relid
        WHERE t.relkind = 'p' AND p.isleaf
    ) l ON true
    CROSS JOIN LATERAL (SELECT pg_relation_size(l.oid)::float8 AS heap) s
    GROUP BY r.name, n.nspname, t.relname
)
SELECT current_setting('server_version_num')::int4 AS version,
       (SELECT array_agg(name) FROM wanted WHERE oid IS NULL) AS missing,
       f.name, f.tbl_name, f.never_analyzed, f.est_rows, f.heap_bytes, f.total_bytes
FROM (SELECT 1) AS one
LEFT JOIN facts f ON true
";

/// `schema.rel` → (`schema`, `rel`); a bare name → (``, name).
fn split_name(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((schema, rel)) => (schema.to_string(), rel.to_string()),
        None => (String::new(), name.to_string()),
    }
}

/// Reads what the database says about `names` (relations as the scripts write them) on
/// `conn`, in one query, in a read-only transaction of its own that it ends.
pub async fn read_facts(
    conn: &mut PgConnection,
    names: &BTreeSet<String>,
    small_table: SmallTable,
) -> Result<DatabaseFacts, sqlx::Error> {
    let (mut all, mut schemas, mut rels) = (Vec::new(), Vec::new(), Vec::new());
    for n in names {
        let (s, r) = split_name(n);
        all.push(n.clone());
        schemas.push(s);
        rels.push(r);
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    sqlx::query(SET_FACTS_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    type Row = (
        i32,
        Option<Vec<String>>,
        Option<String>,
        Option<String>,
        Option<bool>,
        Option<f64>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(FACTS_SQL)
        .bind(&all)
        .bind(&schemas)
        .bind(&rels)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut facts = DatabaseFacts {
        server_version_num: 0,
        small_table,
        relations: BTreeMap::new(),
        missing: BTreeSet::new(),
    };
    let as_u64 = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(u64::MAX);
    for (version, missing, name, table, never_analyzed, rows, heap, total) in rows {
        facts.server_version_num = u32::try_from(version).unwrap_or(0);
        facts.missing.extend(missing.unwrap_or_default());
        let (Some(name), Some(table)) = (name, table) else {
            continue;
        };

        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a row estimate, non-negative by construction"
        )]
        let estimated_rows = match (never_analyzed, rows) {
            (Some(false), Some(r)) => Some(r.round() as u64),
            _ => None,
        };
        facts.relations.insert(
            name,
            TableFacts {
                name: table,
                estimated_rows,
                heap_bytes: as_u64(heap),
                total_bytes: as_u64(total),
            },
        );
    }
    Ok(facts)
}

/// Where a judgement's database facts came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactsSource {
    /// Read from the database (`server_version_num`, how many relations it knew).
    Read {
        server_version_num: u32,
        relations: usize,
    },
    /// No database: judged statically (every table live and large).
    Static,
    /// The database could not be asked; judged statically. Why:
    Unavailable(String),
}

impl FactsSource {
    /// One line for people about how the findings were judged.
    pub fn describe(&self) -> String {
        match self {
            FactsSource::Read {
                server_version_num,
                relations,
            } => format!(
                "lint: judged with the database's facts (PostgreSQL {}.{}, {relations} table(s) measured)",
                server_version_num / 10_000,
                server_version_num % 10_000
            ),
            FactsSource::Static => "lint: static (no database): every table not created in the same run is judged live and large; give a database URL to judge with its facts".to_string(),
            FactsSource::Unavailable(why) => format!(
                "lint: cannot read the database's facts ({why}); judged statically: every table not created in the same run is live and large"
            ),
        }
    }
}

/// Findings of a run's scripts, judged, and where their facts came from.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Per script, in run order.
    pub findings: Vec<Vec<Finding>>,
    pub facts: FactsSource,
}

/// Connects to `url` for facts, within [`FACTS_CONNECT_TIMEOUT`].
pub async fn facts_session(url: &DatabaseUrl) -> Result<PgConnection, String> {
    match tokio::time::timeout(FACTS_CONNECT_TIMEOUT, PgConnection::connect(url.expose()))
        .instrument(tracing::info_span!("lint_facts_connect"))
        .await
    {
        Ok(Ok(c)) => {
            belay_core::send_without_delay();
            Ok(c)
        }
        Ok(Err(e)) => Err(belay_core::redact_url(&e.to_string())),
        Err(_) => Err(format!(
            "no connection within {}",
            belay_core::format_duration(FACTS_CONNECT_TIMEOUT)
        )),
    }
}

/// `ScriptGate` over `belay-lint`: refuses a run whose pending scripts have an `error`
/// finding no `-- belay:allow=<rule> <reason>` directive accepts.
#[derive(Debug, Clone)]
pub struct LintGate {
    /// The last words of a refusal: how this caller's user turns the gate off.
    skip_hint: String,
    small_table: SmallTable,
}

impl LintGate {
    /// `skip_hint` says how to turn the gate off where it runs (`--no-lint` in the CLI,
    /// `lint = false` in agent.toml).
    pub fn new(skip_hint: impl Into<String>) -> Self {
        LintGate {
            skip_hint: skip_hint.into(),
            small_table: SmallTable::default(),
        }
    }

    /// When a table counts as small enough for its lock findings to be downgraded.
    pub fn with_small_table(mut self, small_table: SmallTable) -> Self {
        self.small_table = small_table;
        self
    }

    /// Each script's findings, in run order, judged with `database`'s facts when given.
    pub fn findings(
        &self,
        scripts: &[GateScript],
        database: Option<&DatabaseFacts>,
    ) -> Result<Vec<Vec<Finding>>, UnknownRule> {
        let mut run = RunLint::default();
        scripts.iter().map(|s| run.next(s, database)).collect()
    }

    /// Each script's findings judged with what `conn`'s database says: a static pass
    /// names the tables (and indexes) whose findings a small table would downgrade, one
    /// catalog query reads their facts and the server version, and the scripts are
    /// judged again with them. When the query fails the static findings stand (stricter,
    /// never looser), and [`Judged::facts`] says why.
    pub async fn findings_on(
        &self,
        conn: &mut PgConnection,
        scripts: &[GateScript],
    ) -> Result<Judged, UnknownRule> {
        let first = self.findings(scripts, None)?;
        let names: BTreeSet<String> = first
            .iter()
            .flat_map(|fs| belay_lint::relations_to_look_up(fs))
            .collect();
        match read_facts(conn, &names, self.small_table)
            .instrument(tracing::info_span!("lint_facts", relations = names.len()))
            .await
        {
            Ok(facts) => Ok(Judged {
                findings: self.findings(scripts, Some(&facts))?,
                facts: FactsSource::Read {
                    server_version_num: facts.server_version_num,
                    relations: facts.relations.len(),
                },
            }),
            Err(e) => Ok(Judged {
                findings: first,
                facts: FactsSource::Unavailable(belay_core::redact_url(&e.to_string())),
            }),
        }
    }

    /// [`Self::findings_on`] a session of its own to `url` (`lint`, `plan` and the CLI's
    /// pre-check, which hold no run session); an unreachable database leaves the findings
    /// static.
    pub async fn findings_at(
        &self,
        url: &DatabaseUrl,
        scripts: &[GateScript],
    ) -> Result<Judged, UnknownRule> {
        match facts_session(url).await {
            Ok(mut conn) => {
                let judged = self.findings_on(&mut conn, scripts).await;
                let _ = conn.close().await;
                judged
            }
            Err(why) => Ok(Judged {
                findings: self.findings(scripts, None)?,
                facts: FactsSource::Unavailable(why),
            }),
        }
    }

    /// Lines for the findings the run goes ahead with although they were errors: each
    /// allowed one with the directive's reason, each one downgraded by the database's facts
    /// with its reason (true of this database now: worth reading before the same scripts
    /// meet production), and one summary line for those downgraded because their table is
    /// created earlier in the same run — a project's first deployment has hundreds, all
    /// harmless, and `belay plan` lists them one by one.
    pub fn notes(scripts: &[GateScript], judged: &Judged) -> Vec<String> {
        let mut out = Vec::new();
        if let FactsSource::Unavailable(_) = judged.facts {
            out.push(judged.facts.describe());
        }
        let mut new_in_run = 0usize;
        let mut new_in_run_scripts = BTreeSet::new();
        for (s, fs) in scripts.iter().zip(&judged.findings) {
            for f in fs {
                let why = match (f.verdict, &f.downgraded, &f.allowed) {
                    (Verdict::Downgraded, Some(_), _)
                        if f.downgraded_because == Some(DowngradeBasis::NewInRun) =>
                    {
                        new_in_run += 1;
                        new_in_run_scripts.insert(s.script.as_str());
                        continue;
                    }
                    (Verdict::Downgraded, Some(r), _) => format!("downgraded: {r}"),
                    (Verdict::Allowed, _, Some(r)) => format!("allowed: {r}"),
                    _ => continue,
                };
                out.push(format!(
                    "lint: {}:{}:{}: {}[{}]: {} — {why}",
                    s.script, f.line, f.column, f.severity, f.rule, f.message
                ));
            }
        }
        if new_in_run > 0 {
            out.push(format!(
                "lint: {new_in_run} finding(s) in {} script(s) downgraded: their tables are created earlier in this run, so nothing uses them yet and their locks are brief (`belay plan` lists each)",
                new_in_run_scripts.len()
            ));
        }
        out
    }

    /// The verdict on `findings` (per script of `scripts`): a `Refused` error listing each
    /// blocking finding and how to allow it, or `Ok`.
    pub fn verdict(
        &self,
        scripts: &[GateScript],
        findings: &[Vec<Finding>],
    ) -> Result<(), ApiError> {
        let blocking: Vec<(&str, &Finding)> = scripts
            .iter()
            .zip(findings)
            .flat_map(|(s, fs)| fs.iter().map(move |f| (s.script.as_str(), f)))
            .filter(|(_, f)| f.is_blocking())
            .collect();
        if blocking.is_empty() {
            return Ok(());
        }
        let mut message = format!(
            "migrate refused: {} lint error(s) in pending migrations; nothing was applied",
            blocking.len()
        );
        for (name, f) in &blocking {
            message.push_str(&format!(
                "\n  {name}:{}:{}: error[{}]: {}",
                f.line, f.column, f.rule, f.message
            ));
            if let Some(m) = &f.measured {
                message.push_str(&format!("\n    {m}"));
            }
            message.push_str(&format!("\n    fix: {}", f.hint));
        }
        let rules: BTreeSet<&str> = blocking.iter().map(|(_, f)| f.rule).collect();
        let example = rules.iter().next().copied().unwrap_or("RULE");
        message.push_str(&format!(
            "\nrewrite the statement safely, or, if it is safe here, accept it with a directive in the script's leading comments: `-- belay:allow={example} <why it is safe>` (one per rule: {}); {}",
            rules.into_iter().collect::<Vec<_>>().join(", "),
            self.skip_hint
        ));
        Err(ApiError::new(ErrorKind::Refused, message))
    }
}

#[async_trait::async_trait]
impl ScriptGate for LintGate {
    async fn check(
        &self,
        conn: &mut PgConnection,
        scripts: &[GateScript],
    ) -> Result<Vec<String>, ApiError> {
        let judged = self.findings_on(conn, scripts).await?;
        self.verdict(scripts, &judged.findings)?;
        Ok(Self::notes(scripts, &judged))
    }
}
