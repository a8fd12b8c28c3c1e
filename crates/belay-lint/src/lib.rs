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

mod analyze;
mod position;
mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use analyze::{ParseFailure, StatementInfo, statements};
pub use rules::{RULES, Rule, rule};

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
    /// The reason given by a `-- belay:allow=<rule> reason` directive accepting this
    /// finding (see [`LintContext::allow`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<String>,
}

impl Finding {
    /// An `error` no directive accepted: `migrate` must refuse, `lint` exits non-zero.
    pub fn is_blocking(&self) -> bool {
        self.severity == Severity::Error && self.allowed.is_none()
    }
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
    /// Rule id → reason, from `-- belay:allow=<rule> reason` directives. Matching findings
    /// keep their severity and carry the reason in [`Finding::allowed`].
    pub allow: BTreeMap<String, String>,
}

/// Lints one migration file. Never panics on bad input: SQL that does not parse gives a
/// `parse-error` finding at the failing statement (the statements that do parse are still
/// linted).
pub fn lint(file: &Path, sql: &str, ctx: &LintContext) -> Vec<Finding> {
    let mut findings = analyze::lint_file(file, sql, ctx);
    for f in &mut findings {
        if let Some(reason) = ctx.allow.get(f.rule) {
            f.allowed = Some(reason.clone());
        }
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
/// `hint`, `lock`, `rewrites_table`).
pub fn to_json(findings: &[Finding]) -> String {
    serde_json::to_string_pretty(findings).unwrap_or_else(|_| "[]".to_string())
}
