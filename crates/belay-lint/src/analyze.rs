//! Per-statement facts and the rules, over libpg_query's parse tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pg_query::NodeEnum;
use pg_query::protobuf::{
    AlterTableCmd, AlterTableType, ColumnDef, ConstrType, Constraint, DropBehavior, Node,
    ObjectType, RangeVar, ReindexObjectType, TransactionStmtKind,
};
use serde::Serialize;
use serde_json::Value;

use crate::position::{first_token_at, line_col, near, split, tokens};
use crate::rules::rule;
use crate::{Finding, LintContext, Severity};

/// What one statement does to the database, for `plan` and for findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementInfo {
    pub line: usize,
    pub column: usize,
    /// `ALTER TABLE`, `CREATE INDEX`, `UPDATE`, ...
    pub kind: String,
    /// The table (or index, for index statements) it acts on.
    pub target: Option<String>,
    /// The strongest table lock it takes, as PostgreSQL names modes (`ACCESS EXCLUSIVE`).
    pub lock: Option<String>,
    pub rewrites_table: bool,
}

/// A parse failure: where and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParseFailure {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The facts of every statement in `sql`, or the first parse failure.
pub fn statements(sql: &str) -> Result<Vec<StatementInfo>, ParseFailure> {
    let parsed = parse(sql);
    if let Some(f) = parsed.failures.first() {
        let (line, column) = line_col(sql, f.0);
        return Err(ParseFailure {
            line,
            column,
            message: f.1.clone(),
        });
    }
    let mut created = BTreeSet::new();
    Ok(parsed
        .stmts
        .iter()
        .map(|(off, node)| {
            let a = facts(node, &mut created);
            let (line, column) = line_col(sql, *off);
            StatementInfo {
                line,
                column,
                kind: a.kind.to_string(),
                target: a.target,
                lock: a.lock.map(str::to_string),
                rewrites_table: a.rewrites,
            }
        })
        .collect())
}

/// The parsed statements of `sql` (those that parse), for the run's memory.
pub(crate) fn parsed_statements(sql: &str) -> Vec<NodeEnum> {
    parse(sql).stmts.into_iter().map(|(_, n)| n).collect()
}

pub(crate) fn range_var_name(rv: Option<&RangeVar>) -> Option<String> {
    rv_name(rv)
}

pub(crate) fn name_list(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|o| match &o.node {
            Some(NodeEnum::List(l)) => Some(strings(&l.items).join(".")),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Index names: `DROP INDEX` names an index, which may have been created without a name
// (`CREATE INDEX ON t (a)`) or by a constraint; PostgreSQL's naming is reproduced so the
// drop can be traced to its table.

/// PostgreSQL's `makeObjectName`: `name1[_name2]_label`, the longer part shortened until
/// it fits in 63 bytes.
fn object_name(name1: &str, name2: Option<&str>, label: &str) -> String {
    const MAX: usize = 63;
    let overhead = label.len() + 1 + usize::from(name2.is_some());
    let avail = MAX.saturating_sub(overhead);
    let (mut l1, mut l2) = (name1.len(), name2.map_or(0, str::len));
    while l1 + l2 > avail {
        if l1 > l2 {
            l1 -= 1;
        } else {
            l2 -= 1;
        }
    }
    let clip = |s: &str, n: usize| {
        let mut n = n.min(s.len());
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s[..n].to_string()
    };
    match name2 {
        Some(n2) => format!("{}_{}_{label}", clip(name1, l1), clip(n2, l2)),
        None => format!("{}_{label}", clip(name1, l1)),
    }
}

/// `FigureColname` for an index expression: a column's or function's name, else `expr`.
fn figure_colname(node: Option<&Node>) -> String {
    match node.and_then(|n| n.node.as_ref()) {
        Some(NodeEnum::ColumnRef(c)) => strings(&c.fields).last().cloned(),
        Some(NodeEnum::FuncCall(f)) => strings(&f.funcname).last().cloned(),
        Some(NodeEnum::TypeCast(t)) => Some(figure_colname(t.arg.as_deref())),
        Some(NodeEnum::CoalesceExpr(_)) => Some("coalesce".into()),
        _ => None,
    }
    .unwrap_or_else(|| "expr".into())
}

fn bare(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The name PostgreSQL gives a constraint's index (`t_pkey`, `t_a_b_key`), or its own.
fn constraint_index(c: &Constraint, table: &str, columns: &[String]) -> Option<String> {
    let name = match contype(c) {
        _ if !c.conname.is_empty() => c.conname.clone(),
        ConstrType::ConstrPrimary => object_name(bare(table), None, "pkey"),
        ConstrType::ConstrUnique => {
            let cols = if c.keys.is_empty() {
                columns.to_vec()
            } else {
                strings(&c.keys)
            };
            object_name(bare(table), Some(&cols.join("_")), "key")
        }
        _ => return None,
    };
    matches!(
        contype(c),
        ConstrType::ConstrPrimary | ConstrType::ConstrUnique | ConstrType::ConstrExclusion
    )
    .then(|| renamed(table, &name))
}

/// What a statement does to indexes, besides `DROP INDEX` and `ALTER INDEX … RENAME`.
pub(crate) enum IndexEffect {
    /// An index (as it is named in its table's schema) on a table.
    Created { index: String, table: String },
    /// `ALTER TABLE t DROP CONSTRAINT c`: an index `c` owned by the constraint is gone.
    ConstraintDropped { name: String },
    /// `ADD CONSTRAINT c … USING INDEX i`: `i` is renamed `c`.
    Renamed { from: String, to: String },
}

pub(crate) fn index_effects(node: &NodeEnum) -> Vec<IndexEffect> {
    let mut out = Vec::new();
    match node {
        NodeEnum::IndexStmt(s) => {
            if let Some(t) = rv_name(s.relation.as_ref()) {
                let name = if s.idxname.is_empty() {
                    let cols: Vec<String> = s
                        .index_params
                        .iter()
                        .filter_map(|p| match &p.node {
                            Some(NodeEnum::IndexElem(e)) if !e.indexcolname.is_empty() => {
                                Some(e.indexcolname.clone())
                            }
                            Some(NodeEnum::IndexElem(e)) if !e.name.is_empty() => {
                                Some(e.name.clone())
                            }
                            Some(NodeEnum::IndexElem(e)) => Some(figure_colname(e.expr.as_deref())),
                            _ => None,
                        })
                        .collect();
                    object_name(bare(&t), Some(&cols.join("_")), "idx")
                } else {
                    s.idxname.clone()
                };
                out.push(IndexEffect::Created {
                    index: renamed(&t, &name),
                    table: t,
                });
            }
        }
        NodeEnum::CreateStmt(s) => {
            let Some(t) = rv_name(s.relation.as_ref()) else {
                return out;
            };
            for elt in &s.table_elts {
                match &elt.node {
                    Some(NodeEnum::ColumnDef(cd)) => {
                        for c in constraints(cd) {
                            if let Some(index) =
                                constraint_index(c, &t, std::slice::from_ref(&cd.colname))
                            {
                                out.push(IndexEffect::Created {
                                    index,
                                    table: t.clone(),
                                });
                            }
                        }
                    }
                    Some(NodeEnum::Constraint(c)) => {
                        if let Some(index) = constraint_index(c, &t, &[]) {
                            out.push(IndexEffect::Created {
                                index,
                                table: t.clone(),
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        NodeEnum::AlterTableStmt(s) => {
            let Some(t) = rv_name(s.relation.as_ref()) else {
                return out;
            };
            for cmd in &s.cmds {
                let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
                    continue;
                };
                let sub =
                    AlterTableType::try_from(cmd.subtype).unwrap_or(AlterTableType::Undefined);
                match (sub, cmd.def.as_deref().and_then(|d| d.node.as_ref())) {
                    (
                        AlterTableType::AtAddConstraint | AlterTableType::AtAddIndexConstraint,
                        Some(NodeEnum::Constraint(c)),
                    ) => {
                        if !c.indexname.is_empty() && !c.conname.is_empty() {
                            out.push(IndexEffect::Renamed {
                                from: renamed(&t, &c.indexname),
                                to: renamed(&t, &c.conname),
                            });
                        } else if let Some(index) = constraint_index(c, &t, &[]) {
                            out.push(IndexEffect::Created {
                                index,
                                table: t.clone(),
                            });
                        }
                    }
                    (AlterTableType::AtAddColumn, Some(NodeEnum::ColumnDef(cd))) => {
                        for c in constraints(cd) {
                            if let Some(index) =
                                constraint_index(c, &t, std::slice::from_ref(&cd.colname))
                            {
                                out.push(IndexEffect::Created {
                                    index,
                                    table: t.clone(),
                                });
                            }
                        }
                    }
                    (AlterTableType::AtDropConstraint, _) => {
                        out.push(IndexEffect::ConstraintDropped {
                            name: renamed(&t, &cmd.name),
                        });
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    out
}

/// Applies `effects` to an index → table map; returns the indexes known dropped.
pub(crate) fn apply_index_effects(
    effects: Vec<IndexEffect>,
    indexes: &mut BTreeMap<String, String>,
) -> Vec<String> {
    let mut dropped = Vec::new();
    for e in effects {
        match e {
            IndexEffect::Created { index, table } => {
                indexes.insert(index, table);
            }
            IndexEffect::ConstraintDropped { name } => {
                if let Some((k, _)) = lookup(indexes, &name) {
                    let k = k.clone();
                    indexes.remove(&k);
                    dropped.push(k);
                }
            }
            IndexEffect::Renamed { from, to } => {
                if let Some((k, t)) = lookup(indexes, &from) {
                    let (k, t) = (k.clone(), t.clone());
                    indexes.remove(&k);
                    indexes.insert(to, t);
                }
            }
        }
    }
    dropped
}

struct Parsed {
    /// (byte offset of the statement's first token, statement)
    stmts: Vec<(usize, NodeEnum)>,
    /// (byte offset, message)
    failures: Vec<(usize, String)>,
}

fn parse(sql: &str) -> Parsed {
    if let Some(nul) = sql.find('\0') {
        return Parsed {
            stmts: Vec::new(),
            failures: vec![(nul, "the file contains a NUL byte".into())],
        };
    }
    let toks = tokens(sql);
    match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(res) => Parsed {
            stmts: res
                .protobuf
                .stmts
                .into_iter()
                .filter_map(|raw| {
                    let node = raw.stmt?.node?;
                    let loc = usize::try_from(raw.stmt_location).unwrap_or(0);
                    Some((first_token_at(toks.as_deref(), sql, loc), node))
                })
                .collect(),
            failures: Vec::new(),
        },
        Err(e) => {
            let message = error_message(&e);
            let Some(toks) = toks else {
                // Even the scanner fails (an unterminated quote): one finding.
                let at = near(sql, 0, sql.len(), &message).unwrap_or(0);
                return Parsed {
                    stmts: Vec::new(),
                    failures: vec![(at, message)],
                };
            };
            // Statement by statement, to point at the one that fails and still lint the rest.
            let mut out = Parsed {
                stmts: Vec::new(),
                failures: Vec::new(),
            };
            for (start, end) in split(sql, &toks) {
                let piece = &sql[start..end];
                match pg_query::parse(piece, pg_query::ParserOptions::DEFAULT) {
                    Ok(res) => {
                        for raw in res.protobuf.stmts {
                            if let Some(node) = raw.stmt.and_then(|s| s.node) {
                                let loc = start + usize::try_from(raw.stmt_location).unwrap_or(0);
                                out.stmts
                                    .push((first_token_at(Some(&toks), sql, loc), node));
                            }
                        }
                    }
                    Err(e) => {
                        let m = error_message(&e);
                        let at = near(sql, start, end, &m)
                            .unwrap_or_else(|| first_token_at(Some(&toks), sql, start));
                        out.failures.push((at, m));
                    }
                }
            }
            if out.failures.is_empty() {
                // The pieces parse alone but not together (e.g. a BEGIN ATOMIC body split
                // at its semicolons): report the whole-file error at the start.
                out.stmts.clear();
                out.failures
                    .push((first_token_at(Some(&toks), sql, 0), message));
            }
            out
        }
    }
}

fn error_message(e: &pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(m) | pg_query::Error::Scan(m) | pg_query::Error::Split(m) => {
            m.clone()
        }
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Lock levels.

const ACCESS_EXCLUSIVE: &str = "ACCESS EXCLUSIVE";
const EXCLUSIVE: &str = "EXCLUSIVE";
const SHARE_ROW_EXCLUSIVE: &str = "SHARE ROW EXCLUSIVE";
const SHARE: &str = "SHARE";
const SHARE_UPDATE_EXCLUSIVE: &str = "SHARE UPDATE EXCLUSIVE";
const ROW_EXCLUSIVE: &str = "ROW EXCLUSIVE";

fn lock_rank(l: &str) -> u8 {
    match l {
        ACCESS_EXCLUSIVE => 8,
        EXCLUSIVE => 7,
        SHARE_ROW_EXCLUSIVE => 6,
        SHARE => 5,
        SHARE_UPDATE_EXCLUSIVE => 4,
        ROW_EXCLUSIVE => 3,
        _ => 1,
    }
}

fn stronger(a: Option<&'static str>, b: &'static str) -> Option<&'static str> {
    match a {
        Some(x) if lock_rank(x) >= lock_rank(b) => Some(x),
        _ => Some(b),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers over the tree.

fn rv_name(rv: Option<&RangeVar>) -> Option<String> {
    let rv = rv?;
    Some(if rv.schemaname.is_empty() {
        rv.relname.clone()
    } else {
        format!("{}.{}", rv.schemaname, rv.relname)
    })
}

/// The name under which a `CREATE TABLE` of `rv` makes a table new for the statements after
/// it: none with `IF NOT EXISTS` (the table may already exist, live and large, and then
/// nothing is created); a temporary table as `pg_temp.<name>`, which matches the bare
/// name it shadows but no other schema's table.
pub(crate) fn created_table(rv: Option<&RangeVar>, if_not_exists: bool) -> Option<String> {
    let rv = rv?;
    if if_not_exists {
        return None;
    }
    if rv.relpersistence == "t" {
        return Some(format!("pg_temp.{}", rv.relname));
    }
    rv_name(Some(rv))
}

/// Whether `sql` changes its session's `search_path` (`SET`, `RESET`, or `set_config`
/// as pg_dump writes it): then an unqualified name in it may resolve to another table than
/// the one the catalog's facts and the run's memory know by that name.
pub(crate) fn sets_search_path(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    if lower.contains("set_config") && lower.contains("search_path") {
        return true;
    }
    parse(sql).stmts.iter().any(|(_, n)| {
        matches!(n, NodeEnum::VariableSetStmt(s) if s.name.eq_ignore_ascii_case("search_path"))
    })
}

/// Whether two relation names as written can name the same relation: `orders` matches
/// `public.orders` (the linter does not know the search_path); two different schemas do not
/// match.
pub(crate) fn same_relation(a: &str, b: &str) -> bool {
    let bare = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
    a == b || ((!a.contains('.') || !b.contains('.')) && bare(a) == bare(b))
}

fn is_created(name: Option<&str>, created: &BTreeSet<String>) -> bool {
    let Some(name) = name else { return false };
    created.iter().any(|c| same_relation(c, name))
}

/// The entry of `map` whose key names the same relation as `name`.
pub(crate) fn lookup<'m, V>(
    map: &'m BTreeMap<String, V>,
    name: &str,
) -> Option<(&'m String, &'m V)> {
    map.get_key_value(name)
        .or_else(|| map.iter().find(|(k, _)| same_relation(k, name)))
}

/// `new_name` in the schema of `old` (`ALTER … RENAME TO` keeps the schema).
pub(crate) fn renamed(old: &str, new_name: &str) -> String {
    match old.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{new_name}"),
        None => new_name.to_string(),
    }
}

fn strings(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

fn type_name(cd: &ColumnDef) -> Option<String> {
    cd.type_name
        .as_ref()
        .and_then(|t| strings(&t.names).last().cloned())
}

fn constraints(cd: &ColumnDef) -> impl Iterator<Item = &Constraint> {
    cd.constraints.iter().filter_map(|n| match &n.node {
        Some(NodeEnum::Constraint(c)) => Some(&**c),
        _ => None,
    })
}

fn contype(c: &Constraint) -> ConstrType {
    ConstrType::try_from(c.contype).unwrap_or(ConstrType::Undefined)
}

/// Every function called anywhere in `v` (a serde view of a subtree), by unqualified name.
fn called_functions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(f) = map.get("FuncCall")
                && let Some(Value::Array(names)) = f.get("funcname")
                && let Some(last) = names.last()
                && let Some(Value::String(name)) = last.pointer("/node/String/sval")
            {
                out.push(name.to_lowercase());
            }
            for v in map.values() {
                called_functions(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| called_functions(v, out)),
        _ => {}
    }
}

/// Whether a string constant equal to `value` appears anywhere in `v`.
fn has_string_constant(v: &Value, value: &str) -> bool {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(s)) = map.get("Sval").and_then(|s| s.get("sval"))
                && s == value
            {
                return true;
            }
            map.values().any(|v| has_string_constant(v, value))
        }
        Value::Array(items) => items.iter().any(|v| has_string_constant(v, value)),
        _ => false,
    }
}

/// Functions that are VOLATILE in PostgreSQL and commonly used as defaults.
const VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "gen_random_uuid",
    "gen_random_bytes",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "clock_timestamp",
    "timeofday",
    "nextval",
    "setval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
];

/// Functions known to be STABLE or IMMUTABLE (a default using only these does not rewrite).
const NON_VOLATILE: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "current_setting",
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "concat_ws",
    "length",
    "substr",
    "substring",
    "left",
    "right",
    "replace",
    "md5",
    "abs",
    "round",
    "greatest",
    "least",
    "nullif",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "to_timestamp",
    "to_date",
    "to_char",
    "date_trunc",
    "timezone",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "array_fill",
    "int4range",
    "int8range",
    "numrange",
    "tstzrange",
    "daterange",
];

enum Volatility {
    Safe,
    Volatile(String),
    Unknown(String),
}

fn default_volatility(expr: &Node) -> Volatility {
    let mut fns = Vec::new();
    if let Ok(v) = serde_json::to_value(expr) {
        called_functions(&v, &mut fns);
    }
    if let Some(f) = fns.iter().find(|f| VOLATILE.contains(&f.as_str())) {
        return Volatility::Volatile(f.clone());
    }
    if let Some(f) = fns.iter().find(|f| !NON_VOLATILE.contains(&f.as_str())) {
        return Volatility::Unknown(f.clone());
    }
    Volatility::Safe
}

// ---------------------------------------------------------------------------------------
// Facts and findings of one statement.

struct Issue {
    rule: &'static str,
    severity: Severity,
    message: String,
    /// The index the finding is about, when it is about an index (`DROP INDEX i`).
    index: Option<String>,
    /// Its table, when known; `None` takes the statement's target (unless the statement
    /// targets an index).
    table: Option<String>,
    /// `DROP … IF EXISTS`.
    if_exists: bool,
}

fn issue(id: &'static str, message: impl Into<String>) -> Issue {
    Issue {
        rule: id,
        severity: rule(id).severity,
        message: message.into(),
        index: None,
        table: None,
        if_exists: false,
    }
}

#[derive(Default)]
struct Facts {
    kind: &'static str,
    target: Option<String>,
    lock: Option<&'static str>,
    rewrites: bool,
    ddl: bool,
    uses_concurrently: bool,
    /// `target` names an index, not a table.
    target_is_index: bool,
    issues: Vec<Issue>,
}

/// The linter's memory across the statements of one file.
#[derive(Default)]
struct State {
    created: BTreeSet<String>,
    /// index → its table, for indexes created earlier in the file or the run: `DROP INDEX`
    /// names only the index.
    indexes: BTreeMap<String, String>,
    /// Indexes this file dropped (with their constraint, or by `DROP INDEX`): a later
    /// `DROP INDEX IF EXISTS` of one does nothing.
    dropped_indexes: Vec<String>,
    /// Tables renamed in this file: new name → the name the table had before the file.
    aliases: BTreeMap<String, String>,
    /// Tables created by earlier scripts of the run: their findings are judged (downgraded)
    /// after linting, but dropping one loses no data that existed before the run.
    created_in_run: BTreeSet<String>,
    /// `server_version_num`, when the database is known; `None` assumes a current server.
    version: Option<u32>,
    /// constraint name → (table, column) for CHECK (col IS NOT NULL) added NOT VALID
    pending_not_null: BTreeMap<String, (String, String)>,
    /// (table, column) with a validated CHECK (col IS NOT NULL)
    validated_not_null: BTreeSet<(String, String)>,
    undo_preserves_data: bool,
}

fn facts(node: &NodeEnum, created: &mut BTreeSet<String>) -> Facts {
    let mut st = State {
        created: std::mem::take(created),
        undo_preserves_data: true,
        ..State::default()
    };
    let f = analyze(node, &mut st);
    *created = st.created;
    f
}

fn analyze(node: &NodeEnum, st: &mut State) -> Facts {
    let f = analyze_statement(node, st);
    let gone = apply_index_effects(index_effects(node), &mut st.indexes);
    st.dropped_indexes.extend(gone);
    f
}

fn analyze_statement(node: &NodeEnum, st: &mut State) -> Facts {
    let mut f = Facts {
        ddl: true,
        ..Facts::default()
    };
    match node {
        NodeEnum::AlterTableStmt(s) => {
            f.kind = "ALTER TABLE";
            let table = rv_name(s.relation.as_ref());
            let new = is_created(table.as_deref(), &st.created);
            for cmd in &s.cmds {
                if let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node {
                    alter_cmd(cmd, table.as_deref().unwrap_or(""), new, st, &mut f);
                }
            }
            f.target = table;
        }
        NodeEnum::IndexStmt(s) => {
            f.kind = if s.unique {
                "CREATE UNIQUE INDEX"
            } else {
                "CREATE INDEX"
            };
            let table = rv_name(s.relation.as_ref());
            f.lock = Some(if s.concurrent {
                SHARE_UPDATE_EXCLUSIVE
            } else {
                SHARE
            });
            f.uses_concurrently = s.concurrent;
            if !s.concurrent && !is_created(table.as_deref(), &st.created) {
                f.issues.push(issue(
                    "create-index-concurrently",
                    format!(
                        "CREATE INDEX on {} without CONCURRENTLY blocks writes for the whole build",
                        table.as_deref().unwrap_or("the table")
                    ),
                ));
            }
            f.target = table;
        }
        NodeEnum::DropStmt(s) => {
            let kind = ObjectType::try_from(s.remove_type).unwrap_or(ObjectType::Undefined);
            let names: Vec<String> = s
                .objects
                .iter()
                .filter_map(|o| match &o.node {
                    Some(NodeEnum::List(l)) => Some(strings(&l.items).join(".")),
                    _ => None,
                })
                .collect();
            f.target = names.first().cloned();
            match kind {
                ObjectType::ObjectIndex => {
                    f.kind = "DROP INDEX";
                    f.uses_concurrently = s.concurrent;
                    f.lock = Some(if s.concurrent {
                        SHARE_UPDATE_EXCLUSIVE
                    } else {
                        ACCESS_EXCLUSIVE
                    });
                    f.target_is_index = true;
                    for name in &names {
                        let table = lookup(&st.indexes, name).map(|(_, t)| t.clone());
                        let gone = table.is_none()
                            && s.missing_ok
                            && st.dropped_indexes.iter().any(|d| same_relation(d, name));
                        if !s.concurrent && !gone && !is_created(table.as_deref(), &st.created) {
                            f.issues.push(Issue {
                                index: Some(name.clone()),
                                table: table.clone(),
                                if_exists: s.missing_ok,
                                ..issue(
                                    "drop-index-concurrently",
                                    format!(
                                        "DROP INDEX {name} without CONCURRENTLY takes ACCESS EXCLUSIVE on its table{}",
                                        table.as_deref().map(|t| format!(" ({t})")).unwrap_or_default()
                                    ),
                                )
                            });
                        }
                        if let Some((k, _)) = lookup(&st.indexes, name) {
                            let k = k.clone();
                            st.indexes.remove(&k);
                        }
                        st.dropped_indexes.push(name.clone());
                    }
                }
                ObjectType::ObjectTable => {
                    f.kind = "DROP TABLE";
                    f.lock = Some(ACCESS_EXCLUSIVE);
                    let lost: Vec<&String> = names
                        .iter()
                        .filter(|n| {
                            !is_created(Some(n), &st.created)
                                && !is_created(Some(n), &st.created_in_run)
                        })
                        .collect();
                    if !lost.is_empty() && !st.undo_preserves_data {
                        f.issues.push(issue(
                            "drop-without-data-undo",
                            format!(
                                "DROP TABLE {} destroys its data, and nothing brings it back",
                                lost.iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    if DropBehavior::try_from(s.behavior) == Ok(DropBehavior::DropCascade) {
                        f.issues.push(Issue {
                            rule: "drop-without-data-undo",
                            severity: Severity::Warning,
                            message:
                                "DROP TABLE … CASCADE also drops every object that depends on it"
                                    .into(),
                            index: None,
                            table: None,
                            if_exists: false,
                        });
                    }
                }
                ObjectType::ObjectMatview | ObjectType::ObjectView | ObjectType::ObjectSequence => {
                    f.kind = "DROP";
                    f.lock = Some(ACCESS_EXCLUSIVE);
                }
                _ => f.kind = "DROP",
            }
        }
        NodeEnum::ReindexStmt(s) => {
            f.kind = "REINDEX";
            let concurrent = s.params.iter().any(|p| match &p.node {
                Some(NodeEnum::DefElem(d)) => {
                    d.defname == "concurrently" && !defelem_false(d.arg.as_deref())
                }
                _ => false,
            });
            f.uses_concurrently = concurrent;
            f.target = rv_name(s.relation.as_ref()).or_else(|| Some(s.name.clone()));
            let kind = ReindexObjectType::try_from(s.kind).unwrap_or(ReindexObjectType::Undefined);
            f.target_is_index = kind == ReindexObjectType::ReindexObjectIndex;
            let on_table = match kind {
                ReindexObjectType::ReindexObjectTable => f.target.clone(),
                ReindexObjectType::ReindexObjectIndex => f
                    .target
                    .as_deref()
                    .and_then(|i| lookup(&st.indexes, i))
                    .map(|(_, t)| t.clone()),
                _ => None,
            };
            f.lock = Some(if concurrent {
                SHARE_UPDATE_EXCLUSIVE
            } else {
                ACCESS_EXCLUSIVE
            });
            if !concurrent && !is_created(on_table.as_deref(), &st.created) {
                f.issues.push(Issue {
                    index: f.target.clone().filter(|_| f.target_is_index),
                    table: on_table,
                    ..issue(
                        "reindex-concurrently",
                        "REINDEX without CONCURRENTLY blocks writes, and reads that use the index",
                    )
                });
            }
        }
        NodeEnum::UpdateStmt(s) => {
            row_change(
                &mut f,
                "UPDATE",
                s.relation.as_ref(),
                s.where_clause.is_none(),
                st,
            );
        }
        NodeEnum::DeleteStmt(s) => {
            row_change(
                &mut f,
                "DELETE",
                s.relation.as_ref(),
                s.where_clause.is_none(),
                st,
            );
        }
        NodeEnum::InsertStmt(s) => {
            f.ddl = false;
            f.kind = "INSERT";
            f.lock = Some(ROW_EXCLUSIVE);
            f.target = rv_name(s.relation.as_ref());
        }
        NodeEnum::MergeStmt(s) => {
            f.ddl = false;
            f.kind = "MERGE";
            f.lock = Some(ROW_EXCLUSIVE);
            f.target = rv_name(s.relation.as_ref());
        }
        NodeEnum::SelectStmt(_) => {
            f.ddl = false;
            f.kind = "SELECT";
        }
        NodeEnum::RenameStmt(s) => {
            let kind = ObjectType::try_from(s.rename_type).unwrap_or(ObjectType::Undefined);
            f.target = rv_name(s.relation.as_ref());
            let new = is_created(f.target.as_deref(), &st.created);
            match kind {
                ObjectType::ObjectTable => {
                    f.kind = "RENAME TABLE";
                    f.lock = Some(ACCESS_EXCLUSIVE);
                    if !new {
                        f.issues.push(issue(
                            "rename",
                            format!(
                                "renaming table {} to {} breaks queries of the running application",
                                f.target.as_deref().unwrap_or("?"),
                                s.newname
                            ),
                        ));
                    } else if let Some(t) = &f.target {
                        st.created.insert(renamed(t, &s.newname));
                    }
                    if let Some(t) = &f.target {
                        let before =
                            lookup(&st.aliases, t).map_or_else(|| t.clone(), |(_, b)| b.clone());
                        st.aliases.insert(renamed(t, &s.newname), before);
                        // The table's indexes follow it.
                        for it in st.indexes.values_mut() {
                            if same_relation(it, t) {
                                *it = renamed(t, &s.newname);
                            }
                        }
                    }
                }
                ObjectType::ObjectColumn => {
                    f.kind = "RENAME COLUMN";
                    f.lock = Some(ACCESS_EXCLUSIVE);
                    if !new {
                        f.issues.push(issue(
                            "rename",
                            format!(
                                "renaming column {}.{} to {} breaks queries of the running application",
                                f.target.as_deref().unwrap_or("?"),
                                s.subname,
                                s.newname
                            ),
                        ));
                    }
                }
                ObjectType::ObjectIndex => {
                    f.kind = "RENAME INDEX";
                    f.lock = Some(SHARE_UPDATE_EXCLUSIVE);
                    f.target_is_index = true;
                    if let Some(old) = &f.target
                        && let Some((k, t)) = lookup(&st.indexes, old)
                    {
                        let (k, t) = (k.clone(), t.clone());
                        st.indexes.remove(&k);
                        st.indexes.insert(renamed(old, &s.newname), t);
                    }
                }
                _ => {
                    f.kind = "RENAME";
                    f.lock = Some(ACCESS_EXCLUSIVE);
                }
            }
        }
        NodeEnum::VacuumStmt(s) => {
            f.kind = if s.is_vacuumcmd { "VACUUM" } else { "ANALYZE" };
            // One table named: the finding is about it; none or several: the whole lot.
            if let [rel] = s.rels.as_slice()
                && let Some(NodeEnum::VacuumRelation(vr)) = &rel.node
            {
                f.target = rv_name(vr.relation.as_ref());
            }
            let full = s.options.iter().any(|o| match &o.node {
                Some(NodeEnum::DefElem(d)) => {
                    d.defname == "full" && !defelem_false(d.arg.as_deref())
                }
                _ => false,
            });
            f.lock = Some(if full {
                ACCESS_EXCLUSIVE
            } else {
                SHARE_UPDATE_EXCLUSIVE
            });
            if full {
                f.kind = "VACUUM FULL";
                f.rewrites = true;
                f.issues.push(issue(
                    "vacuum-full",
                    "VACUUM FULL rewrites the table under ACCESS EXCLUSIVE",
                ));
            }
        }
        NodeEnum::ClusterStmt(s) => {
            f.kind = "CLUSTER";
            f.target = rv_name(s.relation.as_ref());
            f.lock = Some(ACCESS_EXCLUSIVE);
            f.rewrites = true;
            if !is_created(f.target.as_deref(), &st.created) {
                f.issues.push(issue(
                    "cluster",
                    "CLUSTER rewrites the table under ACCESS EXCLUSIVE",
                ));
            }
        }
        NodeEnum::TruncateStmt(s) => {
            f.kind = "TRUNCATE";
            f.lock = Some(ACCESS_EXCLUSIVE);
            f.target = s.relations.iter().find_map(|r| match &r.node {
                Some(NodeEnum::RangeVar(rv)) => rv_name(Some(rv)),
                _ => None,
            });
            if DropBehavior::try_from(s.behavior) == Ok(DropBehavior::DropCascade) {
                f.issues.push(issue(
                    "truncate-cascade",
                    "TRUNCATE … CASCADE also empties every table with a foreign key to it",
                ));
            }
        }
        NodeEnum::AlterEnumStmt(s) => {
            f.kind = if s.old_val.is_empty() {
                "ALTER TYPE ADD VALUE"
            } else {
                "ALTER TYPE RENAME VALUE"
            };
            f.target = Some(strings(&s.type_name).join("."));
        }
        NodeEnum::CreateStmt(s) => {
            f.kind = "CREATE TABLE";
            f.target = rv_name(s.relation.as_ref());
            if let Some(t) = created_table(s.relation.as_ref(), s.if_not_exists) {
                st.created.insert(t);
            }
        }
        NodeEnum::CreateTableAsStmt(s) => {
            f.kind = "CREATE TABLE AS";
            let rel = s.into.as_ref().and_then(|i| i.rel.as_ref());
            f.target = rv_name(rel);
            if let Some(t) = created_table(rel, s.if_not_exists) {
                st.created.insert(t);
            }
        }
        NodeEnum::RefreshMatViewStmt(s) => {
            f.kind = "REFRESH MATERIALIZED VIEW";
            f.target = rv_name(s.relation.as_ref());
            f.lock = Some(if s.concurrent {
                EXCLUSIVE
            } else {
                ACCESS_EXCLUSIVE
            });
            f.uses_concurrently = s.concurrent;
            f.rewrites = true;
        }
        NodeEnum::TransactionStmt(_) => {
            f.ddl = false;
            f.kind = "TRANSACTION";
        }
        NodeEnum::VariableSetStmt(_) | NodeEnum::VariableShowStmt(_) => {
            f.ddl = false;
            f.kind = "SET";
        }
        _ => f.kind = "OTHER",
    }
    f
}

/// An UPDATE or DELETE: row locks only, but one without a WHERE on an existing table
/// changes every row in one transaction.
fn row_change(
    f: &mut Facts,
    kind: &'static str,
    relation: Option<&RangeVar>,
    every_row: bool,
    st: &State,
) {
    f.ddl = false;
    f.kind = kind;
    f.lock = Some(ROW_EXCLUSIVE);
    f.target = rv_name(relation);
    if every_row && !is_created(f.target.as_deref(), &st.created) {
        f.issues.push(issue(
            "unbatched-dml",
            format!(
                "{kind} of every row of {} in one transaction",
                f.target.as_deref().unwrap_or("the table")
            ),
        ));
    }
}

fn defelem_false(arg: Option<&Node>) -> bool {
    match arg.and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::Boolean(b)) => !b.boolval,
        Some(NodeEnum::Integer(i)) => i.ival == 0,
        Some(NodeEnum::String(s)) => {
            matches!(s.sval.to_lowercase().as_str(), "false" | "off" | "0")
        }
        _ => false,
    }
}

fn alter_cmd(cmd: &AlterTableCmd, table: &str, new: bool, st: &mut State, f: &mut Facts) {
    use AlterTableType as T;
    let sub = T::try_from(cmd.subtype).unwrap_or(T::Undefined);
    let def = cmd.def.as_deref().and_then(|d| d.node.as_ref());
    let lock = match sub {
        T::AtSetStatistics
        | T::AtSetOptions
        | T::AtResetOptions
        | T::AtValidateConstraint
        | T::AtClusterOn
        | T::AtDropCluster
        | T::AtSetRelOptions
        | T::AtResetRelOptions
        | T::AtAttachPartition
        | T::AtDetachPartitionFinalize => SHARE_UPDATE_EXCLUSIVE,
        T::AtEnableTrig
        | T::AtEnableAlwaysTrig
        | T::AtEnableReplicaTrig
        | T::AtDisableTrig
        | T::AtEnableTrigAll
        | T::AtDisableTrigAll
        | T::AtEnableTrigUser
        | T::AtDisableTrigUser => SHARE_ROW_EXCLUSIVE,
        T::AtReplicaIdentity => EXCLUSIVE,
        T::AtAddConstraint => match def {
            Some(NodeEnum::Constraint(c)) if contype(c) == ConstrType::ConstrForeign => {
                SHARE_ROW_EXCLUSIVE
            }
            _ => ACCESS_EXCLUSIVE,
        },
        T::AtDetachPartition => match def {
            Some(NodeEnum::PartitionCmd(p)) if p.concurrent => SHARE_UPDATE_EXCLUSIVE,
            _ => ACCESS_EXCLUSIVE,
        },
        _ => ACCESS_EXCLUSIVE,
    };
    f.lock = stronger(f.lock, lock);

    match sub {
        T::AtAddColumn => {
            if let Some(NodeEnum::ColumnDef(cd)) = def {
                add_column(cd, table, new, st.version, f);
            }
        }
        T::AtAddConstraint | T::AtAddIndexConstraint => {
            if let Some(NodeEnum::Constraint(c)) = def {
                add_constraint(c, table, new, st, f);
            }
        }
        T::AtValidateConstraint => {
            if let Some(tc) = st.pending_not_null.remove(&cmd.name) {
                st.validated_not_null.insert(tc);
            }
        }
        T::AtAlterColumnType => {
            if let Some(NodeEnum::ColumnDef(cd)) = def
                && !new
            {
                column_type(cd, table, &cmd.name, f);
            }
        }
        T::AtSetNotNull => {
            let key = (table.to_string(), cmd.name.clone());
            // PostgreSQL < 12 scans for SET NOT NULL even with a validated CHECK.
            let check_helps = st.version.is_none_or(|v| v >= 120_000);
            let proven = check_helps && st.validated_not_null.contains(&key);
            if !new && !proven {
                f.issues.push(issue(
                    "set-not-null",
                    format!(
                        "SET NOT NULL on {table}.{} scans the whole table under ACCESS EXCLUSIVE (no validated CHECK ({} IS NOT NULL) in this migration)",
                        cmd.name, cmd.name
                    ),
                ));
            }
        }
        T::AtDropColumn if !new && !st.undo_preserves_data => {
            f.issues.push(issue(
                "drop-without-data-undo",
                format!(
                    "DROP COLUMN {table}.{} destroys its data, and nothing brings it back",
                    cmd.name
                ),
            ));
        }
        T::AtDetachPartition => {
            if let Some(NodeEnum::PartitionCmd(p)) = def {
                f.uses_concurrently |= p.concurrent;
                if !p.concurrent {
                    f.issues.push(issue(
                        "detach-partition-concurrently",
                        format!(
                            "DETACH PARTITION {} without CONCURRENTLY takes ACCESS EXCLUSIVE on {table}",
                            rv_name(p.name.as_ref()).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        T::AtSetLogged | T::AtSetUnLogged | T::AtSetAccessMethod | T::AtSetTableSpace => {
            f.rewrites = true;
        }
        _ => {}
    }
}

fn add_column(cd: &ColumnDef, table: &str, new: bool, version: Option<u32>, f: &mut Facts) {
    let ty = type_name(cd).unwrap_or_default();
    let col = &cd.colname;
    let mut defaults: Vec<&Node> = cd.raw_default.as_deref().into_iter().collect();
    for c in constraints(cd) {
        match contype(c) {
            ConstrType::ConstrDefault => defaults.extend(c.raw_expr.as_deref()),
            ConstrType::ConstrGenerated if c.generated_kind != "v" => {
                f.rewrites = true;
                if !new {
                    f.issues.push(issue(
                        "stored-generated-column",
                        format!(
                            "ADD COLUMN {table}.{col} GENERATED … STORED rewrites the whole table"
                        ),
                    ));
                }
            }
            ConstrType::ConstrIdentity => {
                f.rewrites = true;
                if !new {
                    f.issues.push(issue(
                        "volatile-default",
                        format!("ADD COLUMN {table}.{col} … GENERATED AS IDENTITY fills every row from a sequence: a table rewrite"),
                    ));
                }
            }
            ConstrType::ConstrForeign | ConstrType::ConstrCheck if !new => {
                f.issues.push(issue(
                    "constraint-not-valid",
                    format!(
                        "ADD COLUMN {table}.{col} with an inline {} constraint validates it at once",
                        if contype(c) == ConstrType::ConstrForeign { "REFERENCES" } else { "CHECK" }
                    ),
                ));
            }
            ConstrType::ConstrPrimary | ConstrType::ConstrUnique if !new => {
                f.issues.push(issue(
                    "unique-without-index",
                    format!("ADD COLUMN {table}.{col} with an inline UNIQUE/PRIMARY KEY builds its index under ACCESS EXCLUSIVE"),
                ));
            }
            _ => {}
        }
    }
    if matches!(
        ty.as_str(),
        "serial" | "serial4" | "bigserial" | "serial8" | "smallserial" | "serial2"
    ) {
        f.rewrites = true;
        if !new {
            f.issues.push(issue(
                "volatile-default",
                format!("ADD COLUMN {table}.{col} {ty} fills every row from a sequence (nextval): a table rewrite"),
            ));
        }
    }
    for d in defaults {
        match default_volatility(d) {
            // Before PostgreSQL 11 every ADD COLUMN … DEFAULT wrote the default into each row.
            Volatility::Safe if version.is_some_and(|v| v < 110_000) => {
                f.rewrites = true;
                if !new {
                    f.issues.push(issue(
                        "volatile-default",
                        format!("ADD COLUMN {table}.{col} DEFAULT rewrites every row on this server (PostgreSQL < 11 stores the default in each row)"),
                    ));
                }
            }
            Volatility::Safe => {}
            Volatility::Volatile(func) => {
                f.rewrites = true;
                if !new {
                    f.issues.push(issue(
                        "volatile-default",
                        format!("ADD COLUMN {table}.{col} DEFAULT calls volatile {func}(): every row is rewritten"),
                    ));
                }
            }
            Volatility::Unknown(func) => {
                if !new {
                    f.issues.push(Issue {
                        rule: "volatile-default",
                        severity: Severity::Warning,
                        message: format!(
                            "ADD COLUMN {table}.{col} DEFAULT calls {func}(): if it is VOLATILE, every row is rewritten"
                        ),
                        index: None,
                        table: None,
                        if_exists: false,
                    });
                }
            }
        }
    }
}

fn add_constraint(c: &Constraint, table: &str, new: bool, st: &mut State, f: &mut Facts) {
    let name = if c.conname.is_empty() {
        String::new()
    } else {
        format!(" {}", c.conname)
    };
    match contype(c) {
        ConstrType::ConstrForeign | ConstrType::ConstrCheck => {
            if contype(c) == ConstrType::ConstrCheck
                && let Some(col) = not_null_check_column(c)
            {
                let key = (table.to_string(), col);
                if c.skip_validation {
                    st.pending_not_null.insert(c.conname.clone(), key);
                } else {
                    st.validated_not_null.insert(key);
                }
            }
            if !c.skip_validation && !new {
                let what = if contype(c) == ConstrType::ConstrForeign {
                    "FOREIGN KEY"
                } else {
                    "CHECK"
                };
                f.issues.push(issue(
                    "constraint-not-valid",
                    format!("ADD CONSTRAINT{name} {what} on {table} without NOT VALID validates every row under lock"),
                ));
            }
        }
        ConstrType::ConstrPrimary | ConstrType::ConstrUnique if c.indexname.is_empty() && !new => {
            let what = if contype(c) == ConstrType::ConstrPrimary {
                "PRIMARY KEY"
            } else {
                "UNIQUE"
            };
            f.issues.push(issue(
                "unique-without-index",
                format!(
                    "ADD CONSTRAINT{name} {what} on {table} builds its index under ACCESS EXCLUSIVE"
                ),
            ));
        }
        _ => {}
    }
}

/// `CHECK (col IS NOT NULL)` → `col`.
fn not_null_check_column(c: &Constraint) -> Option<String> {
    let Some(NodeEnum::NullTest(nt)) = c.raw_expr.as_deref().and_then(|e| e.node.as_ref()) else {
        return None;
    };
    if nt.nulltesttype != pg_query::protobuf::NullTestType::IsNotNull as i32 {
        return None;
    }
    match nt.arg.as_deref().and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::ColumnRef(cr)) => strings(&cr.fields).last().cloned(),
        _ => None,
    }
}

/// Target types a change to which is often binary-coercible (no rewrite) depending on the
/// old type: varchar widening, to text, numeric precision increase, varbit, cidr → inet.
const MAYBE_COERCIBLE: &[&str] = &["text", "varchar", "numeric", "varbit", "inet", "citext"];

fn column_type(cd: &ColumnDef, table: &str, col: &str, f: &mut Facts) {
    let ty = type_name(cd).unwrap_or_default();
    let using = cd.raw_default.is_some();
    if !using && MAYBE_COERCIBLE.contains(&ty.as_str()) {
        f.issues.push(Issue {
            rule: "column-type-rewrite",
            severity: Severity::Warning,
            message: format!(
                "ALTER COLUMN {table}.{col} TYPE {ty} rewrites the table unless the old type converts without it (varchar(n) → varchar(m ≥ n) or text, numeric precision increase)"
            ),
            index: None,
            table: None,
            if_exists: false,
        });
    } else {
        f.rewrites = true;
        f.issues.push(issue(
            "column-type-rewrite",
            format!(
                "ALTER COLUMN {table}.{col} TYPE {ty}{} rewrites the table and its indexes under ACCESS EXCLUSIVE",
                if using { " USING …" } else { "" }
            ),
        ));
    }
}

// ---------------------------------------------------------------------------------------
// The file.

pub(crate) fn lint_file(file: &Path, sql: &str, ctx: &LintContext) -> Vec<Finding> {
    let parsed = parse(sql);
    let mut out = Vec::new();
    let finding = |offset: usize,
                   id: &'static str,
                   severity: Severity,
                   message: String,
                   facts: Option<&Facts>| {
        let (line, column) = line_col(sql, offset);
        Finding {
            file: file.to_path_buf(),
            line,
            column,
            rule: id,
            severity,
            message,
            hint: rule(id).hint.to_string(),
            lock: facts.and_then(|f| f.lock).map(str::to_string),
            rewrites_table: facts.is_some_and(|f| f.rewrites),
            table: facts
                .filter(|f| !f.target_is_index)
                .and_then(|f| f.target.clone()),
            index: None,
            table_before: None,
            if_exists: false,
            allowed: None,
            downgraded: None,
            downgraded_because: None,
            verdict: crate::Verdict::Advisory,
            measured: None,
        }
    };
    for (at, message) in &parsed.failures {
        out.push(finding(
            *at,
            "parse-error",
            Severity::Error,
            message.clone(),
            None,
        ));
    }

    let has_tx_control = parsed.stmts.iter().any(|(_, n)| {
        matches!(n, NodeEnum::TransactionStmt(t) if matches!(
            TransactionStmtKind::try_from(t.kind),
            Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart)
        ))
    });
    let mut in_tx = ctx.in_transaction && !has_tx_control;
    let mut st = State {
        created: ctx.tables_created_in_this_migration.clone(),
        created_in_run: ctx.created_earlier_in_run.keys().cloned().collect(),
        indexes: ctx.indexes_created_earlier_in_run.clone(),
        version: ctx.database.as_ref().map(|d| d.server_version_num),
        undo_preserves_data: ctx.undo_preserves_data,
        ..State::default()
    };
    let mut any_ddl = false;
    // (offset of ADD VALUE, type, value, index of the first statement after it)
    let mut enum_adds: Vec<(usize, String, String, usize)> = Vec::new();

    for (i, (off, node)) in parsed.stmts.iter().enumerate() {
        if let NodeEnum::TransactionStmt(t) = node {
            match TransactionStmtKind::try_from(t.kind) {
                Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                    in_tx = true;
                }
                Ok(
                    TransactionStmtKind::TransStmtCommit
                    | TransactionStmtKind::TransStmtRollback
                    | TransactionStmtKind::TransStmtPrepare,
                ) => in_tx = false,
                _ => {}
            }
        }
        let facts = analyze(node, &mut st);
        any_ddl |= facts.ddl;
        for is in &facts.issues {
            let mut f = finding(*off, is.rule, is.severity, is.message.clone(), Some(&facts));
            if is.index.is_some() || is.table.is_some() {
                f.index.clone_from(&is.index);
                f.table.clone_from(&is.table);
            }
            f.if_exists = is.if_exists;
            f.table_before = f
                .table
                .as_deref()
                .and_then(|t| lookup(&st.aliases, t))
                .map(|(_, b)| b.clone());
            out.push(f);
        }
        if facts.uses_concurrently && in_tx {
            out.push(finding(
                *off,
                "concurrently-in-transaction",
                Severity::Error,
                format!(
                    "{} … CONCURRENTLY cannot run inside a transaction block",
                    facts.kind
                ),
                Some(&facts),
            ));
        }
        if let NodeEnum::AlterEnumStmt(s) = node
            && s.old_val.is_empty()
            && in_tx
        {
            enum_adds.push((
                *off,
                facts.target.clone().unwrap_or_default(),
                s.new_val.clone(),
                i + 1,
            ));
        }
    }

    // ADD VALUE in a transaction: an error if a later statement of the same transaction
    // uses the value, a warning otherwise (it cannot be used before the commit; before
    // PostgreSQL 12 it cannot run in a transaction at all).
    for (off, ty, value, next) in &enum_adds {
        let mut used_at = None;
        for (o, n) in parsed.stmts.iter().skip(*next) {
            if let NodeEnum::TransactionStmt(t) = n
                && matches!(
                    TransactionStmtKind::try_from(t.kind),
                    Ok(TransactionStmtKind::TransStmtCommit
                        | TransactionStmtKind::TransStmtRollback
                        | TransactionStmtKind::TransStmtPrepare)
                )
            {
                break;
            }
            if serde_json::to_value(n).is_ok_and(|v| has_string_constant(&v, value)) {
                used_at = Some(*o);
                break;
            }
        }
        let (severity, message) = match used_at {
            None if st.version.is_some_and(|v| v < 120_000) => (
                Severity::Error,
                format!(
                    "ALTER TYPE {ty} ADD VALUE '{value}' cannot run inside a transaction block before PostgreSQL 12 (this server is older)"
                ),
            ),
            Some(o) => (
                Severity::Error,
                format!(
                    "ALTER TYPE {ty} ADD VALUE '{value}' and its use at line {} are in the same transaction: the new value cannot be used before the commit",
                    line_col(sql, o).0
                ),
            ),
            None => (
                Severity::Warning,
                format!(
                    "ALTER TYPE {ty} ADD VALUE '{value}' runs inside a transaction: the value is unusable until it commits (and PostgreSQL < 12 refuses it)"
                ),
            ),
        };
        out.push(finding(
            *off,
            "enum-add-value-in-transaction",
            severity,
            message,
            None,
        ));
    }

    if !ctx.has_undo && parsed.failures.is_empty() && !parsed.stmts.is_empty() {
        let (severity, message) = if any_ddl {
            (
                Severity::Warning,
                "the migration changes the schema and has no undo script".to_string(),
            )
        } else {
            (
                Severity::Info,
                "the migration has no undo script".to_string(),
            )
        };
        let at = parsed.stmts.first().map_or(0, |s| s.0);
        let mut f = finding(at, "missing-undo", severity, message, None);
        f.line = 1;
        f.column = 1;
        out.push(f);
    }
    out
}
