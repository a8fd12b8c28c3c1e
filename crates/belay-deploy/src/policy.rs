//! [`DeploymentPolicy`]: what each step of the pipeline does. Built by the CLI from
//! `belay.toml` and flags, by the agent from `agent.toml` and a `DeployTargetRequest`
//! (`DeploymentPolicy::compose`, `target.rs`),
//! and stored with the deployment so its record says what was checked.

use std::time::Duration;

use belay_health::{PostflightSpec, TargetProbe, Thresholds};
use serde::{Deserialize, Serialize};

/// What each step does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeploymentPolicy {
    pub preflight: PreflightPolicy,
    pub backup: BackupPolicy,
    pub postflight: PostflightPolicy,
    pub watch: WatchPolicy,
    /// Lock guard trips the run may take (each `lock_guard_tripped` event counts, as
    /// history's `lock_trips` does); one more fails the deployment at `migrating` with the
    /// trips as evidence. Evaluated once the executor returns: `MigrationApi::apply` cannot
    /// be interrupted safely mid-run, so what committed stays committed and the failure
    /// stops the pipeline before `validating` (and hands it to the failure handler).
    /// `None`: no budget.
    pub lock_trip_budget: Option<u32>,
    pub on_failure: OnFailure,
    /// Commands run around the deployment (`[deploy.before]`/`[deploy.after]`).
    pub hooks: DeployHooks,
}

/// `before` runs once preflight passed and before the backup (a failure or timeout fails
/// the deployment at `preflight`, nothing changed); `after` once every step passed (a
/// failure is a warning: the migrations are in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployHooks {
    pub before: Option<crate::hooks::DeployHook>,
    pub after: Option<crate::hooks::DeployHook>,
}

/// The preflight checklist before anything runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreflightPolicy {
    /// Skip the checklist (`--no-preflight`): the step is entered and left, saying so.
    pub skip: bool,
    pub thresholds: Thresholds,
    /// Blocking checks to go ahead past (`--override-check`), with `reason`.
    pub overrides: Vec<String>,
    pub reason: Option<String>,
}

/// The pre-deployment backup. Informational: the backup itself is taken by the executor
/// under the runner lock, through the hook the caller wired (`BackupHook`); the policy
/// records what was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupPolicy {
    /// `full`, `schema`, `tables`, `none`; `None` when the caller does not say.
    pub scope: Option<String>,
}

/// Postflight validation after migrating: `HealthApi::postflight` with these assertions
/// (`[[checks]]`), smoke queries (`[[smoke]]`) and the `NOT VALID` severity; the target's
/// side adds the history check, invalid indexes and the applied migrations' `verify.sql`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostflightPolicy {
    /// Skip validation: the step is entered and left, saying so.
    pub skip: bool,
    pub spec: PostflightSpec,
}

/// The watch window after validating: every probe for `duration`; the first to cross its
/// failure threshold fails the deployment at `watching`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchPolicy {
    /// `None`: no watch window (the step is not entered).
    #[serde(with = "opt_duration")]
    pub duration: Option<Duration>,
    /// The canary soak after the window: the probes again for this long, then the
    /// postflight re-run, both still at `watching` (`phase: "canary_soak"` in their
    /// events and in a failure's evidence). `None`: no soak.
    #[serde(with = "opt_duration")]
    pub soak: Option<Duration>,
    /// The probes as the record shows them; runnable probes travel in `probes`.
    #[serde(skip_deserializing, serialize_with = "probe_views")]
    pub probes: Vec<TargetProbe>,
}

/// What the pipeline does once a step fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Record the failure and stop; what was applied stays applied.
    #[default]
    Stop,
    /// Hand the failure to the installed `FailureHandler` (the rollback controller).
    /// Without one the deployment is refused before anything runs.
    Rollback,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Stop => "stop",
            OnFailure::Rollback => "rollback",
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

pub(crate) mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&belay_core::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = serde::Deserialize::deserialize(d)?;
        text.map(|t| belay_core::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A probe as the record shows it: its name, what it looks at and its thresholds. A SQL
/// probe names no URL (it runs on the target's own database).
fn probe_views<S: serde::Serializer>(probes: &[TargetProbe], s: S) -> Result<S::Ok, S::Error> {
    use belay_health::ProbeCheck;
    let views: Vec<serde_json::Value> = probes
        .iter()
        .map(|p| {
            let check = match &p.check {
                ProbeCheck::Http(h) => serde_json::json!({ "http": h.url }),
                ProbeCheck::Sql { query, expect } => {
                    serde_json::json!({ "sql": query, "expect": expect.to_string() })
                }
            };
            serde_json::json!({
                "name": p.name,
                "check": check,
                "period": belay_core::format_duration(p.period),
                "timeout": belay_core::format_duration(p.timeout),
                "failure_threshold": p.failure_threshold,
                "success_threshold": p.success_threshold,
            })
        })
        .collect();
    serde::Serialize::serialize(&views, s)
}
