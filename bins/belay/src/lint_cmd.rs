//! `belay lint`, the findings `plan` shows under each step, and `migrate`'s lint gate.
//!
//! The rules live in `belay-lint`; this module only decides the context each script is
//! linted in, from the migration set `belay_migrate::load` reads:
//! - `in_transaction`: the script runs in belay's per-migration transaction (no
//!   `no-transaction` directive or equivalent);
//! - `has_undo`: an undo script exists (or `-- belay:irreversible` says none is meant to);
//! - `tables_created_in_this_migration`: tables created by earlier steps of the same run
//!   (`plan`/`migrate` know which migrations are pending together; `lint` alone does not,
//!   so it treats every table not created in the same file as live);
//! - `allow`: the script's `-- belay:allow=<rule> <reason>` directives.

use crate::cli::{Output, TargetArgs};
use crate::{Failure, exit};
use belay_lint::{Finding, Severity};
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
) -> Result<Vec<Finding>, Failure> {
    belay_guards::lint::lint_script(script, has_undo, undo_preserves_data, created)
        .map_err(|e| data(e.to_string()))
}

/// Findings of a forward script. `-- belay:irreversible` counts as an undo on purpose: it
/// says no undo is meant to exist.
fn lint_forward(
    up: &Script,
    down: Option<&Script>,
    created: &BTreeSet<String>,
) -> Result<Vec<Finding>, Failure> {
    lint_script(
        up,
        down.is_some() || up.directives.irreversible,
        false,
        created,
    )
}

/// Findings of an undo script: an undo has no undo of its own, and belay snapshots the
/// tables an undo drops before running it (`undo --backup tables`, the default).
fn lint_undo(down: &Script) -> Result<Vec<Finding>, Failure> {
    lint_script(down, true, true, &BTreeSet::new())
}

/// Every script of the set: forward and undo scripts of each migration, then repeatables.
fn lint_set(set: &MigrationSet, only: Option<&Path>) -> Result<Vec<Finding>, Failure> {
    let wanted = |s: &Script| only.is_none_or(|p| same_file(&s.path, p));
    let none = BTreeSet::new();
    let mut out = Vec::new();
    for m in &set.migrations {
        if wanted(&m.up) {
            out.extend(lint_forward(&m.up, m.down.as_ref(), &none)?);
        }
        if let Some(d) = m.down.as_ref().filter(|d| wanted(d)) {
            out.extend(lint_undo(d)?);
        }
    }
    for r in set.repeatables.iter().filter(|r| wanted(&r.script)) {
        out.extend(lint_script(&r.script, true, false, &none)?);
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
fn lint_file(file: &Path, dir: &Path) -> Result<Vec<Finding>, Failure> {
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
            return lint_set(&set, Some(file));
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
    )
}

/// `belay lint [PATH…]`: exit 2 when any finding blocks.
pub fn run(
    paths: &[PathBuf],
    format: Option<LintFormat>,
    dir: &Path,
    output: Output,
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
    let mut findings = Vec::new();
    let mut scripts = 0usize;
    for p in &paths {
        if p.is_dir() {
            let set = belay_migrate::load(p).map_err(MigrateError::from)?;
            for w in &set.warnings {
                eprintln!("warning: {w}");
            }
            scripts += set
                .migrations
                .iter()
                .map(|m| 1 + usize::from(m.down.is_some()))
                .sum::<usize>()
                + set.repeatables.len();
            findings.extend(lint_set(&set, None)?);
        } else if p.is_file() {
            scripts += 1;
            findings.extend(lint_file(p, dir)?);
        } else {
            return Err(crate::usage(anyhow::anyhow!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
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

/// Findings per step of a forward plan, in the plan's order, linted as the agent's gate
/// lints them (`belay_guards::lint::RunLint`): a table created by an earlier step of the
/// same run is new (empty) when later steps run, so rules about live tables skip it there.
pub fn plan_findings(set: &MigrationSet, plan: &PlanView) -> Result<Vec<Vec<Finding>>, Failure> {
    let mut run = belay_guards::lint::RunLint::default();
    gate_scripts(set, plan)
        .into_iter()
        .map(|s| match s {
            Some(s) => run
                .next(&s.source, s.has_undo)
                .map_err(|e| data(e.to_string())),
            None => Ok(Vec::new()),
        })
        .collect()
}

/// `plan`, with each step's lint findings: under the step in text, as `lint` in each step
/// of the JSON document.
pub async fn plan(
    api: &dyn MigrationApi,
    target_name: &str,
    set: &MigrationSet,
    t: &TargetArgs,
    output: Output,
) -> Result<u8, Failure> {
    let plan = api.plan(target_name, &target(t), false).await?;
    let findings = plan_findings(set, &plan)?;
    match output {
        Output::Json => {
            let mut doc = serde_json::to_value(&plan).unwrap_or_default();
            if let Some(steps) = doc.get_mut("steps").and_then(|s| s.as_array_mut()) {
                for (step, f) in steps.iter_mut().zip(&findings) {
                    step["lint"] = serde_json::to_value(f).unwrap_or_default();
                }
            }
            println!("{doc}");
        }
        Output::Text => crate::render::plan_annotated(output, &plan, &|i| {
            findings
                .get(i)
                .map(|fs| fs.iter().map(|f| describe(&set.dir, f)).collect())
                .unwrap_or_default()
        }),
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
    match &f.allowed {
        Some(reason) => s.push_str(&format!(" — allowed: {reason}")),
        None if f.severity == Severity::Error => s.push_str(&format!(" — fix: {}", f.hint)),
        None => {}
    }
    s
}

/// `migrate`'s gate: refuses (exit 2, nothing applied) when a pending script has an
/// `error` finding no `-- belay:allow=` directive accepts — the same `LintGate` the agent
/// runs in its executor, here before preflight so a refusal costs no checks. Allowed
/// findings are printed as warnings with their reasons. `--no-lint` skips the gate, with
/// a warning.
pub async fn gate(
    api: &dyn MigrationApi,
    target_name: &str,
    set: &MigrationSet,
    t: &TargetArgs,
    skip: bool,
) -> Result<(), Failure> {
    if skip {
        eprintln!("warning: --no-lint: migrating without linting the pending scripts");
        return Ok(());
    }
    let plan = api.plan(target_name, &target(t), false).await?;
    let scripts: Vec<GateScript> = gate_scripts(set, &plan).into_iter().flatten().collect();
    if scripts.is_empty() {
        return Ok(());
    }
    let lint_gate = belay_guards::LintGate::new("--no-lint skips linting entirely");
    let findings = lint_gate
        .findings(&scripts)
        .map_err(|e| data(e.to_string()))?;
    for f in findings.iter().flatten().filter(|f| f.allowed.is_some()) {
        eprintln!("warning: lint: {}", describe(&set.dir, f));
    }
    Ok(lint_gate.verdict(&scripts, &findings)?)
}
