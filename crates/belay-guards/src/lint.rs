//! [`LintGate`]: a `belay_migrate::ScriptGate` over `belay-lint`, and the lint context
//! rules the CLI's `lint`, `plan` and `migrate` share with it, so a script is judged the
//! same whether it runs locally, through the agent or in a fleet deployment.
//!
//! A script's context: whether it runs in belay's transaction, whether it has an undo,
//! the tables created by earlier steps of the same run (new and empty when later steps
//! run, so rules about live tables skip them), and its `-- belay:allow=` directives.

use belay_lint::{Finding, LintContext};
use belay_migrate::source::Script;
use belay_migrate::{ApiError, ErrorKind, GateScript, ScriptGate};
use std::collections::BTreeSet;
use std::path::PathBuf;

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
    })
}

/// Findings of one script in its context.
pub fn lint_script(
    script: &Script,
    has_undo: bool,
    undo_preserves_data: bool,
    created: &BTreeSet<String>,
) -> Result<Vec<Finding>, UnknownRule> {
    let ctx = context(script, has_undo, undo_preserves_data, created)?;
    Ok(belay_lint::lint(&script.path, &script.text, &ctx))
}

/// Lints the scripts of one run in order, remembering the tables each creates for the
/// steps after it.
#[derive(Debug, Default)]
pub struct RunLint {
    created: BTreeSet<String>,
}

impl RunLint {
    /// Findings of the run's next forward or repeatable script.
    pub fn next(&mut self, script: &Script, has_undo: bool) -> Result<Vec<Finding>, UnknownRule> {
        let findings = lint_script(script, has_undo, false, &self.created)?;
        // A script that does not parse has a `parse-error` finding already.
        if let Ok(stmts) = belay_lint::statements(&script.text) {
            self.created.extend(
                stmts
                    .into_iter()
                    .filter(|st| st.kind.starts_with("CREATE TABLE"))
                    .filter_map(|st| st.target),
            );
        }
        Ok(findings)
    }
}

/// `ScriptGate` over `belay-lint`: refuses a run whose pending scripts have an `error`
/// finding no `-- belay:allow=<rule> <reason>` directive accepts.
#[derive(Debug, Clone)]
pub struct LintGate {
    /// The last words of a refusal: how this caller's user turns the gate off.
    skip_hint: String,
}

impl LintGate {
    /// `skip_hint` says how to turn the gate off where it runs (`--no-lint` in the CLI,
    /// `lint = false` in agent.toml).
    pub fn new(skip_hint: impl Into<String>) -> Self {
        LintGate {
            skip_hint: skip_hint.into(),
        }
    }

    /// Each script's findings, in run order.
    pub fn findings(&self, scripts: &[GateScript]) -> Result<Vec<Vec<Finding>>, UnknownRule> {
        let mut run = RunLint::default();
        scripts
            .iter()
            .map(|s| run.next(&s.source, s.has_undo))
            .collect()
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
                "\n  {name}:{}:{}: error[{}]: {}\n    fix: {}",
                f.line, f.column, f.rule, f.message, f.hint
            ));
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

impl ScriptGate for LintGate {
    fn check(&self, scripts: &[GateScript]) -> Result<(), ApiError> {
        let findings = self.findings(scripts)?;
        self.verdict(scripts, &findings)
    }
}
