//! The rollback's data: what triggered it, the plan (strategy, reasons, steps, backups,
//! what each path would lose, an estimate) and the policy it runs under. Plain,
//! serialisable data, so the CLI renders it and a later `RollbackService` maps it.

use std::time::Duration;

use belay_deploy::{Cause, Step, StepFailure};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How a rollback gets back to the last good state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The deployment's undo scripts, newest first (dropped data snapshotted first).
    Undo,
    /// The tables the deployment's migrations wrote, restored from its pre-deployment
    /// backup.
    TableRestore,
    /// The whole database but belay's history, restored from the pre-deployment backup.
    FullRestore,
    /// No safe automatic path: a person decides.
    Escalate,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Undo => "undo",
            Strategy::TableRestore => "table_restore",
            Strategy::FullRestore => "full_restore",
            Strategy::Escalate => "escalate",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What set the rollback off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// A migration failed partway (the committed ones are reverted).
    MigrationFailed,
    /// Postflight validation blocked.
    ValidationFailed,
    /// A probe crossed its failure threshold in the watch window.
    ProbeThreshold,
    /// The run took more lock-guard trips than its budget.
    LockTrips,
    /// An operator asked (`belay rollback execute`).
    Operator,
    /// An Alertmanager alert naming the deployment or its target reached the controller's
    /// webhook.
    Alert,
}

impl TriggerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::MigrationFailed => "migration_failed",
            TriggerKind::ValidationFailed => "validation_failed",
            TriggerKind::ProbeThreshold => "probe_threshold",
            TriggerKind::LockTrips => "lock_trips",
            TriggerKind::Operator => "operator",
            TriggerKind::Alert => "alert",
        }
    }
}

/// The failure (or request) a rollback answers, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub kind: TriggerKind,
    /// The step that failed (`None` for an operator's request).
    pub step: Option<Step>,
    pub reason: String,
    pub evidence: serde_json::Value,
    /// The data itself is suspect (validation found corrupt rows, or the operator says
    /// so): replaying undo scripts would keep the bad rows, so a restore is preferred.
    pub data_suspect: bool,
}

impl Trigger {
    /// The trigger of a failed pipeline step.
    pub fn from_failure(f: &StepFailure) -> Trigger {
        let kind = match f.cause {
            Cause::ProbeTriggered => TriggerKind::ProbeThreshold,
            Cause::AssertionFailed => TriggerKind::ValidationFailed,
            Cause::LockTripBudget => TriggerKind::LockTrips,
            Cause::Blocked | Cause::Error | Cause::HookFailed => TriggerKind::MigrationFailed,
        };
        Trigger {
            kind,
            step: Some(f.step),
            reason: f.reason.clone(),
            evidence: f.evidence.clone(),
            data_suspect: false,
        }
    }

    /// An operator's request, optionally saying the data is suspect.
    /// The trigger of an alert: `evidence` is the alert as Alertmanager sent it (name,
    /// fingerprint, labels, annotations, start).
    pub fn alert(reason: impl Into<String>, evidence: serde_json::Value) -> Trigger {
        Trigger {
            kind: TriggerKind::Alert,
            step: None,
            reason: reason.into(),
            evidence,
            data_suspect: false,
        }
    }

    pub fn operator(reason: impl Into<String>, data_suspect: bool) -> Trigger {
        Trigger {
            kind: TriggerKind::Operator,
            step: None,
            reason: reason.into(),
            evidence: serde_json::Value::Null,
            data_suspect,
        }
    }
}

/// One branch of the decision tree and what it concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// `undo`, `table_restore`, `full_restore`, `escalate`, `data`.
    pub branch: String,
    /// Whether this branch is possible.
    pub possible: bool,
    pub why: String,
}

/// What one path would lose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathLoss {
    pub strategy: Strategy,
    /// Nothing is lost for good (data a path removes is kept where the report says).
    pub loses_no_data: bool,
    /// One line per table, column or write.
    pub items: Vec<String>,
}

/// A migration the rollback reverts, with what is known about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertedMigration {
    pub deployment_id: Uuid,
    pub version: Option<String>,
    pub script: String,
    pub has_undo: bool,
    pub irreversible: bool,
    /// Tables the migration writes; `None`: unknown (a statement belay cannot attribute to
    /// tables, and no `-- belay:tables=`).
    pub writes: Option<Vec<String>>,
    /// Tables whose data (rows or columns) its undo drops.
    pub undo_drops: Vec<String>,
}

/// The backup a restore would use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupUse {
    pub id: String,
    /// `pre_deployment`, `emergency`, `undo_snapshot`.
    pub role: String,
    pub verified: bool,
    pub size: u64,
    /// `full`, `schema_only`, `tables`.
    pub scope: String,
}

/// A rollback as planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackPlan {
    pub target: String,
    /// The deployments rolled back, newest first (the first is the one on record for
    /// the rollback's own events).
    pub deployments: Vec<Uuid>,
    /// The schema version the target returns to (`None`: before any migration).
    pub to_version: Option<String>,
    pub trigger: Trigger,
    pub strategy: Strategy,
    /// One per branch of the decision tree.
    pub reasons: Vec<Reason>,
    pub steps: Vec<String>,
    pub migrations: Vec<RevertedMigration>,
    pub backups: Vec<BackupUse>,
    /// Tables a table restore replaces (for `table_restore`).
    pub tables: Vec<String>,
    /// What each possible path would lose; the chosen one first.
    pub losses: Vec<PathLoss>,
    pub estimated_ms: u64,
    /// How the estimate was made.
    pub estimate_basis: String,
    /// Set when this is an interrupted rollback's recorded plan: what `execute` does
    /// with it (resume from a step, end it escalated, or refuse, and why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl RollbackPlan {
    /// The chosen path's loss entry.
    pub fn chosen_loss(&self) -> Option<&PathLoss> {
        self.losses.iter().find(|l| l.strategy == self.strategy)
    }
}

/// `auto`, `ask`, `never`: what a failed deployment with `on_failure = rollback` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plan and execute at once.
    #[default]
    Auto,
    /// Plan, record it, and wait for `belay rollback execute`.
    Ask,
    /// Refuse: record that the policy forbids an automatic rollback.
    Never,
}

/// A command run before or after a rollback (maintenance mode on/off, notify).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCommand {
    /// Run by `sh -c`.
    pub command: String,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
}

/// What a hook's failure does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookFailure {
    /// A failed `before` hook stops the rollback before anything changes (escalated); a
    /// failed `after` hook escalates a rollback that otherwise worked.
    #[default]
    Escalate,
    /// Recorded as a warning; the rollback goes on.
    Continue,
}

/// How rollbacks run on this target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackPolicy {
    pub mode: Mode,
    /// How long probes must pass again before a rollback counts as verified.
    #[serde(with = "duration_text")]
    pub settle: Duration,
    pub before: Option<HookCommand>,
    pub after: Option<HookCommand>,
    pub on_hook_failure: HookFailure,
    /// Attempts of a restore that timed out waiting for a lock (each one transaction that
    /// changed nothing).
    pub restore_attempts: u32,
    /// Where the report goes (`[[rollback.notify]]`). Never serialized: they hold secrets.
    #[serde(skip)]
    pub notifiers: Vec<crate::notify::Notifier>,
}

impl Default for RollbackPolicy {
    fn default() -> Self {
        RollbackPolicy {
            mode: Mode::Auto,
            settle: Duration::from_secs(5),
            before: None,
            after: None,
            on_hook_failure: HookFailure::Escalate,
            restore_attempts: 5,
            notifiers: Vec::new(),
        }
    }
}

pub(crate) mod duration_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&belay_core::format_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        belay_core::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// `[rollback]` as a configuration file writes it (belay.toml's `[rollback]`, agent.toml's
/// `[targets.rollback]`): durations as text, checked by [`RollbackSettings::resolve`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackSettings {
    /// `auto` (default), `ask` (plan, then wait for `belay rollback execute`), `never`.
    pub policy: Option<Mode>,
    /// How long probes must pass again before a rollback counts as verified [5s].
    pub settle: Option<String>,
    /// Run before the rollback changes anything (maintenance mode on).
    pub before: Option<HookSetting>,
    /// Run once it is verified (maintenance mode off).
    pub after: Option<HookSetting>,
    /// `escalate` (default) or `continue`.
    pub on_hook_failure: Option<HookFailure>,
    /// Bound on each lock wait of a restore [2s]; a restore that waits longer is one
    /// transaction that changed nothing, and is retried.
    pub restore_lock_timeout: Option<String>,
    /// Attempts of a restore that timed out on a lock [5].
    pub restore_attempts: Option<u32>,
    /// `[[rollback.notify]]`: webhooks the incident report is sent to (generic JSON, or
    /// PagerDuty Events v2).
    #[serde(default)]
    pub notify: Vec<crate::notify::NotifierSetting>,
}

/// A command run around a rollback, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSetting {
    /// Run by `sh -c`.
    pub command: String,
    /// Killed after this long [30s].
    pub timeout: Option<String>,
}

impl RollbackSettings {
    /// The policy and the restore lock timeout, every duration parsed and positive and
    /// every hook naming a command; errors name `section` (`belay.toml [rollback]`) and
    /// the key.
    pub fn resolve(&self, section: &str) -> Result<(RollbackPolicy, Duration), String> {
        self.resolve_keyed()
            .map_err(|(key, message)| format!("{section} {key}: {message}"))
    }

    /// As [`RollbackSettings::resolve`], the error as the key within the section
    /// (`settle`, `before.timeout`, …) and what is wrong with it, for callers that point at
    /// the key's line.
    pub fn resolve_keyed(&self) -> Result<(RollbackPolicy, Duration), (String, String)> {
        let positive = |key: &str, v: &str| -> Result<Duration, (String, String)> {
            let d = belay_core::parse_duration(v).map_err(|e| (key.to_string(), e.to_string()))?;
            if d.is_zero() {
                return Err((key.to_string(), "must be greater than zero".into()));
            }
            Ok(d)
        };
        let hook = |key: &str,
                    h: &Option<HookSetting>|
         -> Result<Option<HookCommand>, (String, String)> {
            let Some(h) = h else { return Ok(None) };
            if h.command.trim().is_empty() {
                return Err((
                    format!("{key}.command"),
                    "is empty: name the command to run (`command = \"./maintenance on\"`), or remove the section".into(),
                ));
            }
            Ok(Some(HookCommand {
                command: h.command.clone(),
                timeout: match &h.timeout {
                    Some(t) => positive(&format!("{key}.timeout"), t)?,
                    None => Duration::from_secs(30),
                },
            }))
        };
        let mut policy = RollbackPolicy::default();
        if let Some(m) = self.policy {
            policy.mode = m;
        }
        if let Some(s) = &self.settle {
            policy.settle = positive("settle", s)?;
        }
        policy.before = hook("before", &self.before)?;
        policy.after = hook("after", &self.after)?;
        if let Some(h) = self.on_hook_failure {
            policy.on_hook_failure = h;
        }
        if let Some(n) = self.restore_attempts {
            if n == 0 {
                return Err(("restore_attempts".into(), "must be at least 1".into()));
            }
            policy.restore_attempts = n;
        }
        for (i, n) in self.notify.iter().enumerate() {
            let notifier = n
                .resolve()
                .map_err(|(key, message)| (format!("notify[{i}].{key}"), message))?;
            policy.notifiers.push(notifier);
        }
        let restore_lock_timeout = match &self.restore_lock_timeout {
            Some(t) => positive("restore_lock_timeout", t)?,
            None => Duration::from_secs(2),
        };
        Ok((policy, restore_lock_timeout))
    }
}
