use serde::{Deserialize, Serialize};

use crate::HealthError;

/// The verdict of one check. For postflight checks `block` means "failed": the
/// deployment must not be declared successful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Block,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "warn",
            CheckStatus::Block => "block",
        }
    }
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a finding that has no numeric threshold is judged (`"warn"` or `"block"` in
/// `belay.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warn,
    Block,
}

impl From<Severity> for CheckStatus {
    fn from(s: Severity) -> Self {
        match s {
            Severity::Warn => CheckStatus::Warn,
            Severity::Block => CheckStatus::Block,
        }
    }
}

/// One line of a preflight or postflight report; `check … --output json` prints an array
/// of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Stable name, the one `--override-check` takes.
    pub name: String,
    pub status: CheckStatus,
    /// What was measured, naming the objects involved (pids, indexes, constraints).
    pub value: String,
    /// The thresholds the value was judged against.
    pub threshold: String,
    /// What to do about a warn or block (empty on pass).
    pub remedy: String,
    /// The query that found the problem, for checks that run one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Set when a block was overridden: the reason given, to be recorded with the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overridden: Option<String>,
}

impl CheckResult {
    pub(crate) fn new(
        name: &str,
        status: CheckStatus,
        value: impl Into<String>,
        threshold: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Self {
        let remedy = if status == CheckStatus::Pass {
            String::new()
        } else {
            remedy.into()
        };
        CheckResult {
            name: name.to_string(),
            status,
            value: value.into(),
            threshold: threshold.into(),
            remedy,
            query: None,
            overridden: None,
        }
    }

    pub(crate) fn with_query(mut self, query: impl Into<String>) -> Self {
        self.query = Some(query.into());
        self
    }

    pub fn is_block(&self) -> bool {
        self.status == CheckStatus::Block
    }
}

/// Whether any result blocks (the CLI exits non-zero, `migrate` refuses).
pub fn any_blocks(results: &[CheckResult]) -> bool {
    results.iter().any(CheckResult::is_block)
}

/// Applies `--override-check NAME … --reason R`: each named check that blocks becomes a
/// warn with `overridden = Some(R)` (and the reason appended to its remedy), so the
/// decision is visible in every report. Naming a check that passed or warned is allowed
/// and changes nothing. A name that matches no result is an error (a typo must not
/// silently leave a block in place while the operator believes it overridden), as is an
/// empty reason.
pub fn apply_overrides(
    results: &mut [CheckResult],
    overrides: &[String],
    reason: &str,
) -> Result<(), HealthError> {
    if overrides.is_empty() {
        return Ok(());
    }
    if reason.trim().is_empty() {
        return Err(HealthError::MissingReason);
    }
    for name in overrides {
        if !results.iter().any(|r| &r.name == name) {
            let mut known: Vec<String> = results.iter().map(|r| r.name.clone()).collect();
            known.dedup();
            return Err(HealthError::UnknownOverride {
                name: name.clone(),
                known,
            });
        }
    }
    for r in results.iter_mut() {
        if r.status == CheckStatus::Block && overrides.contains(&r.name) {
            r.status = CheckStatus::Warn;
            r.overridden = Some(reason.to_string());
            if r.remedy.is_empty() {
                r.remedy = format!("overridden: {reason}");
            } else {
                r.remedy = format!("{} (overridden: {reason})", r.remedy);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, status: CheckStatus) -> CheckResult {
        CheckResult::new(name, status, "v", "t", "fix it")
    }

    #[test]
    fn overrides_turn_named_blocks_into_recorded_warns() {
        let mut results = vec![
            r("long_running_queries", CheckStatus::Block),
            r("lock_waits", CheckStatus::Block),
            r("connections", CheckStatus::Pass),
        ];
        assert!(any_blocks(&results));
        apply_overrides(
            &mut results,
            &["long_running_queries".into(), "connections".into()],
            "nightly report, owner agreed",
        )
        .unwrap();
        assert_eq!(results[0].status, CheckStatus::Warn);
        assert_eq!(
            results[0].overridden.as_deref(),
            Some("nightly report, owner agreed")
        );
        assert!(results[0].remedy.contains("overridden"));
        assert_eq!(results[1].status, CheckStatus::Block);
        assert_eq!(results[2].status, CheckStatus::Pass);
        assert_eq!(results[2].overridden, None);
        assert!(any_blocks(&results));
    }

    #[test]
    fn unknown_override_names_and_empty_reasons_are_errors() {
        let mut results = vec![r("lock_waits", CheckStatus::Block)];
        let err = apply_overrides(&mut results, &["lock_wait".into()], "x").unwrap_err();
        assert!(matches!(err, HealthError::UnknownOverride { .. }));
        assert!(err.to_string().contains("lock_waits"), "{err}");
        let err = apply_overrides(&mut results, &["lock_waits".into()], " ").unwrap_err();
        assert!(matches!(err, HealthError::MissingReason));
        assert_eq!(results[0].status, CheckStatus::Block);
    }

    #[test]
    fn json_shape_is_the_documented_one() {
        let json = serde_json::to_value(r("disk_space", CheckStatus::Warn)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "disk_space", "status": "warn", "value": "v",
                               "threshold": "t", "remedy": "fix it"})
        );
    }
}
