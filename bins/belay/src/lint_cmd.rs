//! `belay lint`, the findings `plan` shows under each step, and `migrate`'s lint gate.
//!
//! The rules live in `belay-lint`; this module only decides the context each script is
//! linted in, from the migration set `belay_migrate::load` reads:
//! - `in_transaction`: the script runs in belay's per-migration transaction (no
//!   `no-transaction` directive or equivalent);
//! - `has_undo`: an undo script exists (or `-- belay:irreversible` says none is meant to);
//! - what earlier steps of the same run created (tables, renamed tables, indexes):
//!   `plan`/`migrate` know which migrations are pending together; `lint` alone does not,
//!   so it treats every table not created in the same file as live;
//! - `allow`: the script's `-- belay:allow=<rule> <reason>` directives;
//! - the database's facts (server version, table sizes), read by
//!   `belay_guards::LintGate` in one catalog query: `plan` and `migrate` always have a
//!   database; `lint` uses one when a URL is configured (unless `--offline`), and says in
//!   one line on stderr how it judged.

use crate::cli::{Output, TargetArgs};
use crate::{Failure, exit};
use belay_core::DatabaseUrl;
use belay_guards::LintGate;
use belay_guards::lint::FactsSource;
use belay_lint::{DatabaseFacts, Finding, Severity, SmallTable, Verdict};
use belay_migrate::source::Script;
use belay_migrate::{GateScript, MigrateError, MigrationApi, MigrationSet, PlanView, Target};
use clap::ValueEnum;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `belay lint --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LintFormat {
    /// Findings with the lock taken, table rewrites and the safe rewrite
    Text,
    /// An array of findings (also `--output json`)
    Json,
    /// `file:line:col: severity[rule]: message`, for editors and CI annotations
    Compiler,
}

fn data(message: String) -> Failure {
    Failure {
        code: exit::DATA,
        message,
    }
}

/// Findings of one script in its context (see `belay_guards::lint`). An `allow` naming no
/// rule is an error in the script (exit 65).
fn lint_script(
    script: &Script,
    has_undo: bool,
    undo_preserves_data: bool,
    created: &BTreeSet<String>,
    db: Option<&DatabaseFacts>,
) -> Result<Vec<Finding>, Failure> {
    belay_guards::lint::lint_script(script, has_undo, undo_preserves_data, created, db)
        .map_err(|e| data(e.to_string()))
}

/// Findings of a forward script. `-- belay:irreversible` counts as an undo on purpose: it
/// says no undo is meant to exist.
fn lint_forward(
    up: &Script,
    down: Option<&Script>,
    db: Option<&DatabaseFacts>,
) -> Result<Vec<Finding>, Failure> {
    lint_script(
        up,
        down.is_some() || up.directives.irreversible,
        false,
        &BTreeSet::new(),
        db,
    )
}

/// Findings of an undo script: an undo has no undo of its own, and belay snapshots the
/// tables an undo drops before running it (`undo --backup tables`, the default).
fn lint_undo(down: &Script, db: Option<&DatabaseFacts>) -> Result<Vec<Finding>, Failure> {
    lint_script(down, true, true, &BTreeSet::new(), db)
}

/// Every script of the set: forward and undo scripts of each migration, then repeatables.
fn lint_set(
    set: &MigrationSet,
    only: Option<&Path>,
    db: Option<&DatabaseFacts>,
) -> Result<Vec<Finding>, Failure> {
    let wanted = |s: &Script| only.is_none_or(|p| same_file(&s.path, p));
    let mut out = Vec::new();
    for m in &set.migrations {
        if wanted(&m.up) {
            out.extend(lint_forward(&m.up, m.down.as_ref(), db)?);
        }
        if let Some(d) = m.down.as_ref().filter(|d| wanted(d)) {
            out.extend(lint_undo(d, db)?);
        }
    }
    for r in set.repeatables.iter().filter(|r| wanted(&r.script)) {
        out.extend(lint_script(&r.script, true, false, &BTreeSet::new(), db)?);
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn contains(set: &MigrationSet, file: &Path) -> bool {
    set.migrations
        .iter()
        .flat_map(|m| std::iter::once(&m.up).chain(m.down.as_ref()))
        .chain(set.repeatables.iter().map(|r| &r.script))
        .any(|s| same_file(&s.path, file))
}

/// One file: linted with its migration's context when a directory above it (or `--dir`)
/// loads as a migration set holding it; otherwise alone, with the context its own
/// directives give.
fn lint_file(file: &Path, dir: &Path, db: Option<&DatabaseFacts>) -> Result<Vec<Finding>, Failure> {
    let mut candidates: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut up = file.parent();
    for _ in 0..2 {
        match up {
            Some(p) => {
                candidates.push(if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                });
                up = p.parent();
            }
            None => break,
        }
    }
    for c in candidates {
        if let Ok(set) = belay_migrate::load(&c)
            && contains(&set, file)
        {
            return lint_set(&set, Some(file), db);
        }
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| crate::usage(anyhow::anyhow!("cannot read {}: {e}", file.display())))?;
    // The linter sees what would run: a dump's meta-commands and COPY data blanked.
    let split = belay_migrate::sql::split_script(&text)
        .map_err(|e| data(format!("{}:{e}", file.display())))?;
    let directives = belay_migrate::directives::parse(&split.text)
        .map_err(|e| data(format!("{}: {e}", file.display())))?;
    let script = Script {
        path: file.to_path_buf(),
        checksum: belay_core::Checksum::of(text.as_bytes()),
        text: split.text,
        directives,
        statements: split.statements,
    };
    lint_script(
        &script,
        script.directives.irreversible,
        false,
        &BTreeSet::new(),
        db,
    )
}

/// Every finding of `paths` (files or directories), judged with `db`'s facts when given,
/// and the number of scripts linted.
fn lint_paths(
    paths: &[PathBuf],
    dir: &Path,
    db: Option<&DatabaseFacts>,
) -> Result<(Vec<Finding>, usize), Failure> {
    let mut findings = Vec::new();
    let mut scripts = 0usize;
    for p in paths {
        if p.is_dir() {
            let set = belay_migrate::load(p).map_err(MigrateError::from)?;
            // Linted twice when facts are read: the files' warnings are said once.
            if db.is_none() {
                for w in &set.warnings {
                    eprintln!("warning: {w}");
                }
            }
            scripts += set
                .migrations
                .iter()
                .map(|m| 1 + usize::from(m.down.is_some()))
                .sum::<usize>()
                + set.repeatables.len();
            findings.extend(lint_set(&set, None, db)?);
        } else if p.is_file() {
            scripts += 1;
            findings.extend(lint_file(p, dir, db)?);
        } else {
            return Err(crate::usage(anyhow::anyhow!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
    Ok((findings, scripts))
}

/// `belay lint [PATH…]`: exit 2 when any finding blocks. With `url`, findings are judged
/// with the database's facts (a static pass names the tables, one query measures them);
/// without, statically. Either way one line on stderr says which.
pub async fn run(
    paths: &[PathBuf],
    format: Option<LintFormat>,
    dir: &Path,
    output: Output,
    url: Option<&DatabaseUrl>,
    small_table: SmallTable,
) -> Result<u8, Failure> {
    let format = format.unwrap_or(match output {
        Output::Json => LintFormat::Json,
        Output::Text => LintFormat::Text,
    });
    let paths = if paths.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        paths.to_vec()
    };
    let (mut findings, scripts) = lint_paths(&paths, dir, None)?;
    let source = match url {
        None => FactsSource::Static,
        Some(url) => match belay_guards::lint::facts_session(url).await {
            Err(why) => FactsSource::Unavailable(why),
            Ok(mut conn) => {
                let names: BTreeSet<String> = belay_lint::relations_to_look_up(&findings);
                let facts = belay_guards::lint::read_facts(&mut conn, &names, small_table).await;
                let _ = sqlx::Connection::close(conn).await;
                match facts {
                    Ok(facts) => {
                        findings = lint_paths(&paths, dir, Some(&facts))?.0;
                        FactsSource::Read {
                            server_version_num: facts.server_version_num,
                            relations: facts.relations.len(),
                        }
                    }
                    Err(e) => FactsSource::Unavailable(belay_core::redact_url(&e.to_string())),
                }
            }
        },
    };
    eprintln!("{}", source.describe());
    let blocking = findings.iter().filter(|f| f.is_blocking()).count();
    match format {
        LintFormat::Json => println!("{}", belay_lint::to_json(&findings)),
        LintFormat::Compiler => print!("{}", belay_lint::format_compiler(&findings)),
        LintFormat::Text => {
            print!("{}", belay_lint::format_text(&findings));
            let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
            println!(
                "linted {scripts} script(s): {} error(s) ({blocking} not allowed), {} warning(s), {} note(s)",
                count(Severity::Error),
                count(Severity::Warning),
                count(Severity::Info),
            );
        }
    }
    Ok(if blocking > 0 { exit::REFUSED } else { 0 })
}

pub fn target(t: &TargetArgs) -> Target {
    Target {
        to: t.to.clone(),
        steps: t.steps,
    }
}

/// The pending scripts of a forward plan, in the plan's order, as the executor's script
/// gate sees them; `None` for a step whose script is not in `set`.
fn gate_scripts(set: &MigrationSet, plan: &PlanView) -> Vec<Option<GateScript>> {
    plan.steps
        .iter()
        .map(|step| {
            if let Some(m) = set.migrations.iter().find(|m| m.script_name == step.script) {
                return Some(GateScript {
                    script: step.script.clone(),
                    version: step.version.clone(),
                    direction: step.direction,
                    source: m.up.clone(),
                    // `-- belay:irreversible` counts as an undo on purpose: it says no
                    // undo is meant to exist.
                    has_undo: m.down.is_some() || m.up.directives.irreversible,
                });
            }
            set.repeatables
                .iter()
                .find(|r| r.script_name == step.script)
                .map(|r| GateScript {
                    script: step.script.clone(),
                    version: None,
                    direction: step.direction,
                    source: r.script.clone(),
                    has_undo: true,
                })
        })
        .collect()
}

/// Findings per step of a forward plan, in the plan's order, judged as the agent's gate
/// judges them (`belay_guards::LintGate`, with the database's facts read at `url`): a
/// table created by an earlier step of the same run is new (empty) when later steps run,
/// and a small table's lock is brief, so their lock findings are downgraded with the
/// reason. A step whose script is not in `set` has none.
async fn plan_findings(
    set: &MigrationSet,
    plan: &PlanView,
    lint_gate: &LintGate,
    url: &DatabaseUrl,
) -> Result<(Vec<Vec<Finding>>, Vec<GateScript>, FactsSource), Failure> {
    let per_step = gate_scripts(set, plan);
    let scripts: Vec<GateScript> = per_step.iter().flatten().cloned().collect();
    let judged = lint_gate
        .findings_at(url, &scripts)
        .await
        .map_err(|e| data(e.to_string()))?;
    let mut judged_findings = judged.findings.into_iter();
    let findings = per_step
        .iter()
        .map(|s| match s {
            Some(_) => judged_findings.next().unwrap_or_default(),
            None => Vec::new(),
        })
        .collect();
    Ok((findings, scripts, judged.facts))
}

/// `plan`, with each step's lint findings: under the step in text, as `lint` in each step
/// of the JSON document.
/// `plan`, with each step's lint findings and their verdicts: under the step in text, as
/// `lint` in each step of the JSON document (each finding with `verdict` and, when set,
/// `downgraded`/`allowed`), and how they were judged (`lint_facts`).
pub async fn plan(
    api: &dyn MigrationApi,
    target_name: &str,
    set: &MigrationSet,
    t: &TargetArgs,
    output: Output,
    url: &DatabaseUrl,
    small_table: SmallTable,
) -> Result<u8, Failure> {
    let plan = api.plan(target_name, &target(t), false).await?;
    let lint_gate = LintGate::new("").with_small_table(small_table);
    let (findings, _, facts) = plan_findings(set, &plan, &lint_gate, url).await?;
    match output {
        Output::Json => {
            let mut doc = serde_json::to_value(&plan).unwrap_or_default();
            if let Some(steps) = doc.get_mut("steps").and_then(|s| s.as_array_mut()) {
                for (step, f) in steps.iter_mut().zip(&findings) {
                    step["lint"] = serde_json::to_value(f).unwrap_or_default();
                }
            }
            doc["lint_facts"] = serde_json::Value::String(facts.describe());
            println!("{doc}");
        }
        Output::Text => {
            crate::render::plan_annotated(output, &plan, &|i| {
                findings
                    .get(i)
                    .map(|fs| fs.iter().map(|f| describe(&set.dir, f)).collect())
                    .unwrap_or_default()
            });
            if !plan.steps.is_empty() {
                println!("{}", facts.describe());
            }
        }
    }
    Ok(0)
}

/// The script's name as history records it (relative to the migrations directory).
fn name(dir: &Path, f: &Finding) -> String {
    belay_migrate::source::relative_name(dir, &f.file)
}

/// One line per finding, for `plan` and `migrate`.
fn describe(dir: &Path, f: &Finding) -> String {
    let mut s = format!(
        "{}:{}: {}[{}]: {}",
        name(dir, f),
        f.line,
        f.severity,
        f.rule,
        f.message
    );
    if let Some(l) = &f.lock {
        s.push_str(&format!(" (takes {l}"));
        if f.rewrites_table {
            s.push_str(", rewrites the table");
        }
        s.push(')');
    }
    match (f.verdict, &f.downgraded, &f.allowed) {
        (Verdict::Downgraded, Some(reason), _) => {
            s.push_str(&format!(" — downgraded: {reason}"));
        }
        (Verdict::Allowed, _, Some(reason)) => s.push_str(&format!(" — allowed: {reason}")),
        (Verdict::Blocking, _, _) => {
            s.push_str(" — blocking");
            if let Some(m) = &f.measured {
                s.push_str(&format!(" ({m})"));
            }
            s.push_str(&format!("; fix: {}", f.hint));
        }
        _ if f.severity == Severity::Error => s.push_str(&format!(" — fix: {}", f.hint)),
        _ => {}
    }
    s
}
