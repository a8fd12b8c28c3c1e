//! The incident report: what happened, what was done, where the data is, how bad it is
//! and who to call — as JSON (stored with the deployment, as the payload of its
//! `incident_report` event) and as Markdown for people.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Reason, Strategy, Trigger};

/// P0 database down, P1 degraded, P2 non-critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    P0,
    P1,
    P2,
}

impl Severity {
    /// Who acts, and how fast.
    pub fn escalation_path(self) -> &'static str {
        match self {
            Severity::P0 => {
                "page the on-call DBA and the incident commander now; the database is unreachable or its state unknown — restore from the emergency backup by hand if it cannot be reached within the recovery objective"
            }
            Severity::P1 => {
                "page the on-call DBA: the rollback did not finish, the service may be degraded; everything was kept (emergency backup, snapshots), nothing further runs until a person decides"
            }
            Severity::P2 => {
                "notify the deploying team in working hours: the deployment was rolled back and verified; review the evidence and fix the migration before deploying again"
            }
        }
    }
}

/// One step of the rollback as it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    /// `ok`, `failed`, `skipped`, `warning`.
    pub result: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the data is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupLocations {
    /// Taken before the deployment; what a restore used.
    pub pre_deployment: Option<String>,
    /// Taken before the rollback changed anything.
    pub emergency: Option<String>,
    /// Taken by the undo before it dropped columns or tables.
    pub undo_snapshot: Option<String>,
    /// The one command that brings the dropped data back (into a new database beside the
    /// live one, so nothing live is overwritten).
    pub recover_command: Option<String>,
    /// The tables (or their columns) whose data the snapshot keeps.
    pub kept_tables: Vec<String>,
}

/// The incident report of one rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentReport {
    pub deployment_id: Uuid,
    /// Other deployments reverted with it (a rollback to a version or release).
    pub also_rolled_back: Vec<Uuid>,
    pub target: String,
    pub environment: Option<String>,
    pub release: Option<String>,
    pub requested_by: Option<String>,
    /// The version before the deployment, and the one it reached.
    pub from_version: Option<String>,
    pub reached_version: Option<String>,
    /// The version the rollback returned to.
    pub rolled_back_to: Option<String>,
    pub deployed_at: DateTime<Utc>,
    pub rollback_started_at: DateTime<Utc>,
    pub rollback_finished_at: DateTime<Utc>,
    pub trigger: Trigger,
    pub strategy: Strategy,
    pub reasons: Vec<Reason>,
    pub steps: Vec<StepRecord>,
    /// `rolled_back` or `escalated`.
    pub result: String,
    pub errors: Vec<String>,
    pub backups: BackupLocations,
    /// What the chosen path lost (or kept elsewhere).
    pub data: Vec<String>,
    pub severity: Severity,
    pub escalation: String,
}

impl IncidentReport {
    /// For people: a Markdown page.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".into());
        md.push_str(&format!(
            "# Incident: deployment {} {} ({:?})\n\n",
            self.deployment_id, self.result, self.severity
        ));
        md.push_str(&format!("- **Target:** {}\n", self.target));
        if let Some(e) = &self.environment {
            md.push_str(&format!("- **Environment:** {e}\n"));
        }
        md.push_str(&format!("- **Release:** {}\n", opt(&self.release)));
        md.push_str(&format!(
            "- **Versions:** {} → {} (deployed {}); rolled back to {}\n",
            opt(&self.from_version),
            opt(&self.reached_version),
            self.deployed_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.rolled_back_to
                .as_deref()
                .unwrap_or("before any migration")
        ));
        if !self.also_rolled_back.is_empty() {
            let ids: Vec<String> = self.also_rolled_back.iter().map(Uuid::to_string).collect();
            md.push_str(&format!("- **Also rolled back:** {}\n", ids.join(", ")));
        }
        md.push_str(&format!(
            "- **Rollback:** {} from {} to {} ({} ms)\n",
            self.strategy,
            self.rollback_started_at.format("%H:%M:%S%.3f"),
            self.rollback_finished_at.format("%H:%M:%S%.3f"),
            (self.rollback_finished_at - self.rollback_started_at).num_milliseconds()
        ));
        md.push_str(&format!(
            "- **Severity:** {:?} — {}\n\n",
            self.severity, self.escalation
        ));
        md.push_str("## Trigger\n\n");
        md.push_str(&format!(
            "{} at {}: {}\n\n",
            self.trigger.kind.as_str(),
            self.trigger
                .step
                .map(|s| s.to_string())
                .unwrap_or_else(|| "operator".into()),
            self.trigger.reason
        ));
        if !self.trigger.evidence.is_null() {
            md.push_str(&format!(
                "```json\n{}\n```\n\n",
                serde_json::to_string_pretty(&self.trigger.evidence).unwrap_or_default()
            ));
        }
        md.push_str("## Decision\n\n");
        for r in &self.reasons {
            md.push_str(&format!("- {}: {}\n", r.branch, r.why));
        }
        md.push_str("\n## Steps\n\n| step | result | time | detail |\n|---|---|---|---|\n");
        for s in &self.steps {
            let detail = match &s.error {
                Some(e) => format!("{} — error: {e}", s.detail),
                None => s.detail.clone(),
            };
            md.push_str(&format!(
                "| {} | {} | {} ms | {} |\n",
                s.step,
                s.result,
                (s.finished_at - s.started_at).num_milliseconds(),
                detail.replace('|', "\\|").replace('\n', " ")
            ));
        }
        md.push_str("\n## Data and backups\n\n");
        for d in &self.data {
            md.push_str(&format!("- {d}\n"));
        }
        let b = &self.backups;
        md.push_str(&format!(
            "- pre-deployment backup: {}\n",
            opt(&b.pre_deployment)
        ));
        md.push_str(&format!("- emergency backup: {}\n", opt(&b.emergency)));
        if let Some(s) = &b.undo_snapshot {
            md.push_str(&format!(
                "- data the undo dropped ({}): snapshot {s}\n",
                b.kept_tables.join(", ")
            ));
        }
        if let Some(c) = &b.recover_command {
            md.push_str(&format!("- bring it back: `{c}`\n"));
        }
        if !self.errors.is_empty() {
            md.push_str("\n## Errors\n\n");
            for e in &self.errors {
                md.push_str(&format!("- {e}\n"));
            }
        }
        md
    }
}
