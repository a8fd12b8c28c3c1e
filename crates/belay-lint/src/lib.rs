//! Lints migration SQL with a real PostgreSQL parser.
//!
//! Statements are parsed by `libpg_query` (PostgreSQL's own grammar, through the
//! `pg_query` crate), never matched with regexes. For each statement the linter knows the
//! lock level it takes on its table and whether it rewrites the table, and it flags the
//! patterns that stall a live application or lose data (see [`RULES`]). Unparseable SQL
//! gives a `parse-error` finding with file and line, never a panic.
//!
//! - [`lint`]: findings for one migration file.
//! - [`statements`]: the per-statement facts (kind, lock, rewrite) for `plan`.
//! - [`format_compiler`] / [`format_text`] / serde JSON: output for editors, humans and CI.
//!
//! The linter runs no SQL. What only the database knows reaches it as facts in the
//! [`LintContext`] ([`DatabaseFacts`]: server version, table sizes), and what earlier
//! scripts of the same run did as [`RunMemory`]. With them, a finding about a lock held on
//! a live table is downgraded (with the reason in [`Finding::downgraded`]) when the table
//! is new in the run or small: the lock it takes is then brief.

mod analyze;
mod position;
mod rules;
mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use analyze::{ParseFailure, StatementInfo, statements};
pub use rules::{RULES, Rule, rule};
pub use run::RunMemory;

/// How bad a finding is. `error` findings make `migrate` refuse unless allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One problem found in a migration, pointing at the statement (1-based line and
/// character column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The rule id, e.g. `constraint-not-valid`.
    pub rule: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The safe way to do the same thing.
    pub hint: String,
    /// The table lock the statement takes (`ACCESS EXCLUSIVE`, ...), when it takes one.
    pub lock: Option<String>,
    /// Whether the statement rewrites the whole table.
    pub rewrites_table: bool,
    /// The table the finding is about, as written (for an index finding: the index's
    /// table, when the linter knows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The index the finding is about, as written (`DROP INDEX`, `REINDEX INDEX`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    /// The name [`Self::table`] had before this script renamed it (the name the run and
    /// the catalog know it by).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_before: Option<String>,
    /// The statement is `DROP … IF EXISTS`: on a name that does not exist it does nothing.
    #[serde(skip)]
    pub if_exists: bool,
    /// The reason given by a `-- belay:allow=<rule> reason` directive accepting this
    /// finding (see [`LintContext::allow`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<String>,
    /// Why the finding's severity was lowered one step (an `error` to a `warning`): its
    /// table is new in this run, or small enough that the lock is brief.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downgraded: Option<String>,
    /// What the downgrade rests on, for callers that summarise rather than list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downgraded_because: Option<DowngradeBasis>,
    /// What the finding means for `migrate`.
    pub verdict: Verdict,
    /// For an `error` the database's facts did not downgrade: what they say about its
    /// table (rows, size, the limits it is over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<String>,
}

impl Finding {
    /// An `error` no directive accepted: `migrate` must refuse, `lint` exits non-zero.
    pub fn is_blocking(&self) -> bool {
        self.severity == Severity::Error && self.allowed.is_none()
    }

    fn judge(&self) -> Verdict {
        if self.downgraded.is_some() {
            Verdict::Downgraded
        } else if self.allowed.is_some() {
            Verdict::Allowed
        } else if self.severity == Severity::Error {
            Verdict::Blocking
        } else {
            Verdict::Advisory
        }
    }
}

/// What a downgrade rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DowngradeBasis {
    /// The table is created earlier in the same run: nothing uses it yet, wherever the
    /// run goes.
    NewInRun,
    /// The catalog shows the table small (or the `IF EXISTS` object absent): true of this
    /// database now, not of every database the script will meet.
    DatabaseFacts,
}

/// What a finding means for `migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// An `error`: `migrate` refuses.
    Blocking,
    /// Lowered by what the run or the database shows (see [`Finding::downgraded`]).
    Downgraded,
    /// Accepted by a `-- belay:allow=` directive (see [`Finding::allowed`]).
    Allowed,
    /// A warning or note: shown, never refused.
    Advisory,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Blocking => "blocking",
            Verdict::Downgraded => "downgraded",
            Verdict::Allowed => "allowed",
            Verdict::Advisory => "advisory",
        })
    }
}

/// Default for [`SmallTable::max_rows`]. With [`DEFAULT_SMALL_TABLE_BYTES`]: a table at
/// both limits (10 000 rows, 16 MiB) took 15 ms for `CREATE INDEX`, 86 ms for `ALTER
/// COLUMN … TYPE`, 68 ms for a whole-table `UPDATE` and 9 ms to validate a `CHECK` on
/// PostgreSQL 15 (ARCHITECTURE.md): a lock held that long stays well under the lock
/// guard's 500 ms budget, which still bounds it if a table grew since it was measured.
pub const DEFAULT_SMALL_TABLE_ROWS: u64 = 10_000;
/// Default for [`SmallTable::max_bytes`]: 16 MiB, with TOAST and indexes (see
/// [`DEFAULT_SMALL_TABLE_ROWS`]); wide rows reach it before the row limit.
pub const DEFAULT_SMALL_TABLE_BYTES: u64 = 16 << 20;

/// When a table counts as small: at most `max_rows` estimated rows *and* at most
/// `max_bytes` (table, TOAST and indexes). A table never analyzed has no row estimate and
/// is judged by its size alone: its heap must be too small to hold more than `max_rows`
/// rows at PostgreSQL's densest packing ([`MIN_HEAP_ROW_BYTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallTable {
    pub max_rows: u64,
    pub max_bytes: u64,
}

impl Default for SmallTable {
    fn default() -> Self {
        SmallTable {
            max_rows: DEFAULT_SMALL_TABLE_ROWS,
            max_bytes: DEFAULT_SMALL_TABLE_BYTES,
        }
    }
}

/// The catalog's facts about one table (for an index: its table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    /// Schema-qualified, as the catalog names it.
    pub name: String,
    /// `pg_class.reltuples` (summed over partitions); `None` when never analyzed (or
    /// vacuumed): then only the size counts.
    pub estimated_rows: Option<u64>,
    /// Bytes of the table's own data (the main fork, summed over partitions): 0 is empty.
    pub heap_bytes: u64,
    /// Bytes with TOAST and indexes (`pg_total_relation_size`, summed over partitions).
    pub total_bytes: u64,
}

/// The least heap space one row takes: a 24-byte tuple header and a 4-byte line pointer
/// (PostgreSQL's `MaxHeapTuplesPerPage` is 291 for 8 kB pages). A heap of `b` bytes holds
/// at most `b / 28` rows.
pub const MIN_HEAP_ROW_BYTES: u64 = 28;

impl TableFacts {
    pub fn is_empty(&self) -> bool {
        self.heap_bytes == 0
    }

    pub fn is_small(&self, t: SmallTable) -> bool {
        // Never analyzed: the most rows the heap can hold stands in for the estimate, so a
        // table nobody has measured is never taken for small on a guess.
        let rows = self
            .estimated_rows
            .unwrap_or(self.heap_bytes / MIN_HEAP_ROW_BYTES);
        self.is_empty() || (self.total_bytes <= t.max_bytes && rows <= t.max_rows)
    }
}

/// What the target database says, read by the caller (belay-guards) in one catalog query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFacts {
    /// `server_version_num` (e.g. 150004): rules whose risk depends on the version use it.
    pub server_version_num: u32,
    pub small_table: SmallTable,
    /// Relation name as a finding writes it ([`Finding::table`] or [`Finding::index`]) →
    /// the facts of that table (of an index: of its table). Names the catalog does not
    /// know are absent.
    pub relations: BTreeMap<String, TableFacts>,
    /// Names looked up that the catalog does not know (through the session's
    /// `search_path`).
    pub missing: BTreeSet<String>,
}

/// Rules about how long a lock is held on a live table (or how much of it one statement
/// changes): a table that is new in the run, or small, makes them brief.
const LOCK_DURATION_RULES: &[&str] = &[
    "constraint-not-valid",
    "create-index-concurrently",
    "drop-index-concurrently",
    "reindex-concurrently",
    "detach-partition-concurrently",
    "volatile-default",
    "stored-generated-column",
    "column-type-rewrite",
    "set-not-null",
    "unique-without-index",
    "unbatched-dml",
    "vacuum-full",
    "cluster",
];

/// Whether the facts of a finding's table can downgrade it. `rename` is judged only by
/// whether its table is new in the run: renaming breaks the running application version
/// whatever the table's size.
pub fn judged_by_table(rule: &str) -> bool {
    LOCK_DURATION_RULES.contains(&rule)
}

/// The relation names whose catalog facts would let `findings` be judged: each table (or,
/// when its table is unknown, index) of a finding a small table could downgrade.
pub fn relations_to_look_up(findings: &[Finding]) -> BTreeSet<String> {
    findings
        .iter()
        .filter(|f| {
            judged_by_table(f.rule) && f.downgraded.is_none() && f.severity > Severity::Info
        })
        .flat_map(|f| {
            f.table_before
                .iter()
                .chain(f.table.iter())
                .chain(f.index.iter())
                .cloned()
        })
        .collect()
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit < UNITS.len() - 1 && whole.is_multiple_of(1024) {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 && bytes >= 1024 {
        #[allow(clippy::cast_precision_loss, reason = "an approximate size for people")]
        let kib = bytes as f64 / 1024.0;
        if kib < 1024.0 {
            return format!("{kib:.0} KiB");
        }
        return format!("{:.1} MiB", kib / 1024.0);
    }
    format!("{whole} {}", UNITS[unit])
}

/// Why `f` is not blocking here, from the run and the database facts in `ctx`; `None`
/// when nothing in them makes it safe.
/// `moved_path`: the script changes its `search_path`, so an unqualified name in it may be
/// another table than the one the run's memory and the catalog's facts know by that name.
fn downgrade_reason(
    f: &Finding,
    ctx: &LintContext,
    moved_path: bool,
) -> Option<(String, DowngradeBasis)> {
    if moved_path
        && [&f.table_before, &f.table, &f.index]
            .into_iter()
            .flatten()
            .any(|n| !n.contains('.'))
    {
        return None;
    }
    downgrade_text(f, ctx).map(|(why, new_in_run)| {
        let basis = if new_in_run {
            DowngradeBasis::NewInRun
        } else {
            DowngradeBasis::DatabaseFacts
        };
        (why, basis)
    })
}

/// [`downgrade_reason`]'s text, and whether it rests on the run (not the catalog).
fn downgrade_text(f: &Finding, ctx: &LintContext) -> Option<(String, bool)> {
    let by_size = judged_by_table(f.rule);
    if !by_size && f.rule != "rename" {
        return None;
    }
    let table = f
        .table_before
        .clone()
        .or_else(|| f.table.clone())
        .or_else(|| {
            f.index
                .as_deref()
                .and_then(|i| analyze::lookup(&ctx.indexes_created_earlier_in_run, i))
                .map(|(_, t)| t.clone())
        });
    if let Some(t) = &table
        && let Some((name, script)) = analyze::lookup(&ctx.created_earlier_in_run, t)
    {
        return Some((
            match &f.index {
                Some(i) => {
                    format!("index {i} is on table {name}, created earlier in this run ({script})")
                }
                None => format!("table {name} is created earlier in this run ({script})"),
            },
            true,
        ));
    }
    if !by_size {
        return None;
    }
    let db = ctx.database.as_ref()?;
    // `DROP INDEX IF EXISTS i` of an index that neither exists nor is created earlier in
    // the file or the run (which would have given it a table) does nothing.
    if f.rule == "drop-index-concurrently"
        && f.if_exists
        && table.is_none()
        && let Some(i) = &f.index
        && db.missing.contains(i)
    {
        return Some((
            format!(
                "index {i} does not exist and no earlier script of this run creates it: DROP INDEX IF EXISTS does nothing"
            ),
            false,
        ));
    }
    let facts = table_facts(f, db)?;
    if !facts.is_small(db.small_table) {
        return None;
    }
    let what = match &f.index {
        Some(i) => format!("index {i} is on table {}, which", facts.name),
        None => format!("table {}", facts.name),
    };
    let brief = match (&f.lock, f.rule) {
        (_, "unbatched-dml") | (None, _) => "the statement is brief".to_string(),
        (Some(lock), _) => format!("the {lock} lock is brief"),
    };
    Some((
        if facts.is_empty() {
            format!("{what} is empty: {brief}")
        } else {
            format!(
                "{what} is small ({}; small is at most {} rows and {}): {brief}",
                size(facts),
                db.small_table.max_rows,
                human_bytes(db.small_table.max_bytes)
            )
        },
        false,
    ))
}

/// The facts of `f`'s table: by its name before an in-script rename, its name, or (for an
/// index whose table the linter does not know) the index's.
fn table_facts<'d>(f: &Finding, db: &'d DatabaseFacts) -> Option<&'d TableFacts> {
    f.table_before
        .as_deref()
        .or(f.table.as_deref())
        .and_then(|t| db.relations.get(t))
        .or_else(|| f.index.as_deref().and_then(|i| db.relations.get(i)))
}

fn size(facts: &TableFacts) -> String {
    let rows = facts
        .estimated_rows
        .map_or("never analyzed".to_string(), |r| format!("~{r} rows"));
    format!("{rows}, {}", human_bytes(facts.total_bytes))
}

/// For a finding the facts did not downgrade: what the database says about its table, so
/// a refusal shows why (`table public.big: ~1000000 rows, 57.2 MiB, over …`).
fn measured(f: &Finding, ctx: &LintContext) -> Option<String> {
    if !judged_by_table(f.rule) {
        return None;
    }
    let db = ctx.database.as_ref()?;
    let facts = table_facts(f, db)?;
    Some(format!(
        "table {}: {}, over the small-table limits ({} rows, {})",
        facts.name,
        size(facts),
        db.small_table.max_rows,
        human_bytes(db.small_table.max_bytes)
    ))
}

/// What the linter cannot see in the SQL itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LintContext {
    /// The migration runs inside one transaction (belay's default; false for
    /// `no-transaction` migrations). A file with its own `BEGIN`/`COMMIT` is linted as
    /// belay runs it: statement by statement, in the transactions it opens itself.
    pub in_transaction: bool,
    /// The migration has an undo script.
    pub has_undo: bool,
    /// Dropped data can be brought back: a data snapshot is taken before the migration, or
    /// the undo restores it. Without it, `DROP COLUMN`/`DROP TABLE` are flagged.
    pub undo_preserves_data: bool,
    /// Tables created by this migration (e.g. by earlier files of the same deployment);
    /// tables created by `CREATE TABLE` earlier in the same file are added automatically.
    /// Nothing reads them yet, so rules about live tables skip them. Names as written,
    /// optionally schema-qualified.
    pub tables_created_in_this_migration: BTreeSet<String>,
    /// Tables created by earlier scripts of the same run (after renames) → the script that
    /// created each ([`RunMemory::context`]). They are new when this script runs: findings
    /// about them are downgraded, naming the script.
    pub created_earlier_in_run: BTreeMap<String, String>,
    /// Indexes created by earlier scripts of the same run → their table, so `DROP INDEX i`
    /// is judged by `i`'s table.
    pub indexes_created_earlier_in_run: BTreeMap<String, String>,
    /// What the target database says; `None` lints statically (every table is live and
    /// large, the server current).
    pub database: Option<DatabaseFacts>,
    /// Rule id → reason, from `-- belay:allow=<rule> reason` directives. Matching findings
    /// keep their severity and carry the reason in [`Finding::allowed`].
    pub allow: BTreeMap<String, String>,
}

/// Lints one migration file. Never panics on bad input: SQL that does not parse gives a
/// `parse-error` finding at the failing statement (the statements that do parse are still
/// linted).
pub fn lint(file: &Path, sql: &str, ctx: &LintContext) -> Vec<Finding> {
    let mut findings = analyze::lint_file(file, sql, ctx);
    let moved_path =
        findings.iter().any(|f| f.severity > Severity::Info) && analyze::sets_search_path(sql);
    for f in &mut findings {
        if let Some(reason) = ctx.allow.get(f.rule) {
            f.allowed = Some(reason.clone());
        }
        if f.severity > Severity::Info
            && let Some((reason, basis)) = downgrade_reason(f, ctx, moved_path)
        {
            f.downgraded_because = Some(basis);
            f.severity = match f.severity {
                Severity::Error => Severity::Warning,
                _ => Severity::Info,
            };
            f.downgraded = Some(reason);
        } else if f.severity == Severity::Error {
            f.measured = measured(f, ctx);
        }
        f.verdict = f.judge();
    }
    findings.sort_by_key(|a| (a.line, a.column));
    findings
}

/// `file:line:col: severity[rule]: message` lines, for editors and CI annotations. The hint
/// follows on its own line, indented, as compilers print notes.
pub fn format_compiler(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{}:{}:{}: {}[{}]: {}",
            f.file.display(),
            f.line,
            f.column,
            f.severity,
            f.rule,
            f.message
        ));
        if let Some(reason) = &f.downgraded {
            out.push_str(&format!(" (downgraded: {reason})"));
        }
        if let Some(reason) = &f.allowed {
            out.push_str(&format!(" (allowed: {reason})"));
        }
        out.push('\n');
        if !f.hint.is_empty() {
            out.push_str(&format!("    hint: {}\n", f.hint));
        }
    }
    out
}

/// A human summary: the compiler format plus lock and rewrite facts.
pub fn format_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{}:{}:{} {} {}: {}",
            f.file.display(),
            f.line,
            f.column,
            f.severity,
            f.rule,
            f.message
        ));
        let mut facts = Vec::new();
        if let Some(l) = &f.lock {
            facts.push(format!("takes {l}"));
        }
        if f.rewrites_table {
            facts.push("rewrites the table".to_string());
        }
        if let Some(reason) = &f.downgraded {
            facts.push(format!("downgraded: {reason}"));
        }
        if let Some(reason) = &f.allowed {
            facts.push(format!("allowed: {reason}"));
        }
        if !facts.is_empty() {
            out.push_str(&format!(" [{}]", facts.join("; ")));
        }
        out.push('\n');
        if !f.hint.is_empty() {
            out.push_str(&format!("  fix: {}\n", f.hint));
        }
    }
    out
}

/// The findings as a JSON array (`file`, `line`, `column`, `rule`, `severity`, `message`,
/// `hint`, `lock`, `rewrites_table`, `verdict`; `table`, `index`, `allowed` and
/// `downgraded` when set).
pub fn to_json(findings: &[Finding]) -> String {
    serde_json::to_string_pretty(findings).unwrap_or_else(|_| "[]".to_string())
}
