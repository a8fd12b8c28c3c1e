//! Where an interrupted rollback stopped, read from its events alone (pure): the plan it
//! recorded, the steps that ended (with their results), the step under way (started, no
//! end), and what `execute` does with it next. The executor resumes from this; `rollback
//! status` shows it.

use belay_deploy::DeployEvent;
use serde::{Deserialize, Serialize};

use crate::exec::{KIND_INCIDENT_REPORT, KIND_ROLLBACK_PLAN, KIND_ROLLBACK_STEP};
use crate::model::{RollbackPlan, Strategy};
use crate::report::StepRecord;

/// A step's start: payload `{step, started_at}`. Its end is the `rollback_step` event.
pub const KIND_ROLLBACK_STEP_STARTED: &str = "rollback_step_started";

/// The step a resumed rollback records first, naming where it resumed.
pub const STEP_RESUMED: &str = "resumed";

/// A rollback's progress as recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// The plan it recorded before its first step.
    pub plan: Option<RollbackPlan>,
    /// Every step that ended, in order (a resumed rollback's earlier attempts included).
    pub done: Vec<StepRecord>,
    /// The step that started and did not end: where the process stopped.
    pub under_way: Option<String>,
    /// A step that failed (the rollback was then escalating).
    pub failed: Option<StepRecord>,
}

/// What `execute` does with an interrupted rollback, as `rollback status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum NextAction {
    /// Continues from `from`.
    Resume { from: String, detail: String },
    /// Records the end it was heading for: escalated (a step had failed).
    Escalate { detail: String },
    /// Refuses, with the reason.
    Refuse { reason: String },
}

impl std::fmt::Display for NextAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextAction::Resume { detail, .. } => write!(f, "resume: {detail}"),
            NextAction::Escalate { detail } => write!(f, "end it escalated: {detail}"),
            NextAction::Refuse { reason } => write!(f, "refused: {reason}"),
        }
    }
}

/// Reads a rollback's progress from the deployment's events.
pub fn progress(events: &[DeployEvent]) -> Progress {
    let mut p = Progress::default();
    for e in events {
        match e.kind.as_str() {
            KIND_ROLLBACK_PLAN => {
                p.plan = serde_json::from_value(e.payload.clone()).ok();
            }
            KIND_ROLLBACK_STEP_STARTED => {
                p.under_way = e.payload["step"].as_str().map(str::to_string);
            }
            KIND_ROLLBACK_STEP => {
                let Ok(step) = serde_json::from_value::<StepRecord>(e.payload.clone()) else {
                    continue;
                };
                if p.under_way.as_deref() == Some(step.step.as_str()) {
                    p.under_way = None;
                }
                if step.result == "failed" {
                    p.failed = Some(step.clone());
                }
                p.done.push(step);
            }
            KIND_INCIDENT_REPORT => p.under_way = None,
            _ => {}
        }
    }
    p
}

impl Progress {
    /// Whether `step` ended well (`ok`, or a tolerated `warning`) in any attempt.
    pub fn ended_ok(&self, step: &str) -> bool {
        self.done
            .iter()
            .any(|s| s.step == step && matches!(s.result.as_str(), "ok" | "warning"))
    }

    /// The steps of `plan` in order, as the executor runs them (`before`/`after` hooks
    /// when configured).
    fn order(plan: &RollbackPlan, hooks: (bool, bool)) -> Vec<&'static str> {
        let mut order = Vec::new();
        if hooks.0 {
            order.push("before_hook");
        }
        order.push("emergency_backup");
        order.push(plan.strategy.as_str());
        if matches!(
            plan.strategy,
            Strategy::TableRestore | Strategy::FullRestore
        ) {
            order.push("record_history");
        }
        order.extend(["verify_history", "verify_postflight", "verify_probes"]);
        if hooks.1 {
            order.push("after_hook");
        }
        order.push("incident_report");
        order
    }

    /// The first step a resume runs: the first not ended well (verification is always
    /// run again: the database may have changed while nothing watched it).
    pub fn resume_from(&self, plan: &RollbackPlan, hooks: (bool, bool)) -> String {
        Self::order(plan, hooks)
            .into_iter()
            .find(|s| s.starts_with("verify_") || *s == "incident_report" || !self.ended_ok(s))
            .unwrap_or("incident_report")
            .to_string()
    }

    /// The steps ended so far, `step (result)`, for messages.
    pub fn done_list(&self) -> String {
        let done: Vec<String> = self
            .done
            .iter()
            .filter(|s| s.step != STEP_RESUMED)
            .map(|s| format!("{} ({})", s.step, s.result))
            .collect();
        if done.is_empty() {
            "none".into()
        } else {
            done.join(", ")
        }
    }

    /// What `execute` does with this rollback once no process runs it.
    pub fn next_action(&self, hooks: (bool, bool)) -> NextAction {
        let Some(plan) = &self.plan else {
            return NextAction::Refuse {
                reason: "it was interrupted before its plan was recorded, so nothing ran; the deployment's record says `rolling_back` only: a person decides (see `belay history`)".into(),
            };
        };
        if plan.strategy == Strategy::Escalate {
            return NextAction::Escalate {
                detail: "the plan had no automatic path".into(),
            };
        }
        if let Some(f) = &self.failed {
            return NextAction::Escalate {
                detail: format!(
                    "step {} failed before the interruption ({})",
                    f.step,
                    f.error.as_deref().unwrap_or("no error recorded")
                ),
            };
        }
        let from = self.resume_from(plan, hooks);
        let under_way = match &self.under_way {
            Some(s) => format!("; under way when it stopped: {s}"),
            None => String::new(),
        };
        let again = match from.as_str() {
            "undo" => " (undo re-plans from the history: scripts that committed are not run again)",
            "table_restore" | "full_restore" => {
                " (one transaction: retried from the same pre-deployment backup)"
            }
            "emergency_backup" => " (taken again: none finished verified)",
            _ => "",
        };
        NextAction::Resume {
            detail: format!(
                "{} by {} from {from}{again}; steps done: {}{under_way}",
                if self.done.is_empty() {
                    "start"
                } else {
                    "continue"
                },
                plan.strategy,
                self.done_list()
            ),
            from,
        }
    }

    /// The verified emergency backup a step recorded (`backup ID (…)`), to reuse.
    pub fn emergency_backup(&self) -> Option<String> {
        self.done
            .iter()
            .rev()
            .find(|s| s.step == "emergency_backup" && s.result == "ok")
            .and_then(|s| s.detail.strip_prefix("backup "))
            .and_then(|d| d.split(' ').next())
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use belay_deploy::Step;
    use chrono::Utc;
    use uuid::Uuid;

    fn event(kind: &str, payload: serde_json::Value) -> DeployEvent {
        DeployEvent {
            deployment_id: Uuid::nil(),
            target: "t".into(),
            seq: 0,
            at: Utc::now(),
            step: Step::RollingBack,
            kind: kind.into(),
            message: String::new(),
            payload,
        }
    }

    fn ended(step: &str, result: &str, detail: &str) -> DeployEvent {
        let now = Utc::now();
        event(
            KIND_ROLLBACK_STEP,
            serde_json::to_value(StepRecord {
                step: step.into(),
                result: result.into(),
                started_at: now,
                finished_at: now,
                detail: detail.into(),
                error: (result == "failed").then(|| "boom".to_string()),
            })
            .unwrap_or_default(),
        )
    }

    fn started(step: &str) -> DeployEvent {
        event(
            KIND_ROLLBACK_STEP_STARTED,
            serde_json::json!({ "step": step }),
        )
    }

    #[test]
    fn without_a_plan_it_is_refused() {
        let p = progress(&[]);
        assert!(matches!(
            p.next_action((false, false)),
            NextAction::Refuse { .. }
        ));
    }

    #[test]
    fn a_step_under_way_is_where_it_resumes_and_done_steps_are_skipped() {
        let plan = crate::plan::decide(&crate::plan::PlanInput {
            target: "t".into(),
            deployments: vec![Uuid::nil()],
            to_version: None,
            trigger: crate::model::Trigger::operator("test", false),
            migrations: vec![crate::model::RevertedMigration {
                deployment_id: Uuid::nil(),
                version: Some("1".into()),
                script: "V1__m.sql".into(),
                has_undo: true,
                irreversible: false,
                writes: None,
                undo_drops: vec![],
            }],
            backup: None,
            backup_problem: Some("none".into()),
            live: vec![],
            rates: Default::default(),
        });
        assert_eq!(plan.strategy, Strategy::Undo);
        let events = vec![
            event(
                KIND_ROLLBACK_PLAN,
                serde_json::to_value(&plan).unwrap_or_default(),
            ),
            started("emergency_backup"),
            ended("emergency_backup", "ok", "backup b-1 (10 bytes, verified)"),
            started("undo"),
        ];
        let p = progress(&events);
        assert_eq!(p.under_way.as_deref(), Some("undo"));
        assert_eq!(p.emergency_backup().as_deref(), Some("b-1"));
        match p.next_action((false, false)) {
            NextAction::Resume { from, detail } => {
                assert_eq!(from, "undo");
                assert!(
                    detail.contains("under way when it stopped: undo"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        // With the undo done, verification runs again.
        let mut more = events.clone();
        more.push(ended("undo", "ok", "1 undo script(s) ran"));
        assert_eq!(
            progress(&more).resume_from(&plan, (false, false)),
            "verify_history"
        );
        // A failed step: the rollback was escalating.
        let mut failed = events;
        failed.push(ended("undo", "failed", ""));
        assert!(matches!(
            progress(&failed).next_action((false, false)),
            NextAction::Escalate { .. }
        ));
    }
}
