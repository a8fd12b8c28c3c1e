//! `belay history` and local `belay deployments list|show`: the deployment log kept in the
//! target database's history schema (`belay_guards::HistoryDeploymentLog`), rendered.

use crate::cli::{DeploymentsCommand, Output};
use crate::{Failure, exit};
use belay_core::DatabaseUrl;
use belay_deploy::{DeployEvent, DeploymentLog, DeploymentRecord, LogError};
use belay_guards::{Attempt, Found, HistoryDeploymentLog, attempts};
use belay_history::HistoryRow;
use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

/// Who starts a deployment from this machine: the OS user (`USER`, else `LOGNAME`). The
/// database user is already in every history row (`installed_by`); this names the person.
pub fn os_user() -> Option<String> {
    ["USER", "LOGNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
}

pub fn remote_unsupported() -> Failure {
    Failure {
        code: exit::USAGE,
        message: "`belay history` reads the deployment log in the target database itself: run it in local mode with the database URL; through a controller, use `belay deployments list|show`".into(),
    }
}

pub fn watch_needs_controller() -> Failure {
    Failure {
        code: exit::USAGE,
        message: "`belay deployments watch` follows a controller's deployment: pass --controller ADDR; locally, `belay deployments show ID` prints what is recorded".into(),
    }
}

fn software(e: LogError) -> Failure {
    Failure {
        code: exit::SOFTWARE,
        message: e.to_string(),
    }
}

/// The log, its session open: an unreachable database is exit 69 before anything is read.
async fn open(url: &DatabaseUrl, schema: &str) -> Result<HistoryDeploymentLog, Failure> {
    let log = HistoryDeploymentLog::new(url.clone(), schema).map_err(|e| Failure {
        code: exit::USAGE,
        message: e.to_string(),
    })?;
    log.connect_now().await.map_err(|e| Failure {
        code: exit::UNAVAILABLE,
        message: e.to_string(),
    })?;
    Ok(log)
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The record as JSON, with `state` (the controller's word for the same thing) beside the
/// pipeline's `step`.
fn record_json(d: &DeploymentRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(d).unwrap_or_else(|_| json!({}));
    v["state"] = json!(d.step);
    v
}

fn attempt_json(a: &Attempt) -> serde_json::Value {
    serde_json::to_value(a).unwrap_or_else(|_| json!({}))
}

fn row_json(r: &HistoryRow) -> serde_json::Value {
    json!({
        "installed_rank": r.installed_rank, "version": r.version, "script": r.script,
        "state": r.state, "installed_on": r.installed_on, "error": r.error,
        "deployment_id": r.deployment_id, "backup_id": r.backup_id,
    })
}

/// The first lines of a deployment: what, where, who, from and to.
fn print_header(d: &DeploymentRecord) {
    let s = &d.start;
    match d.outcome.as_ref().and_then(|o| o.failed_step) {
        Some(step) => println!(
            "deployment {}  {} in {step}  target {}",
            s.id, d.step, s.target
        ),
        None => println!("deployment {}  {}  target {}", s.id, d.step, s.target),
    }
    let mut who = vec![format!("started {}", when(s.started_at))];
    if let Some(o) = &d.outcome {
        who.push(format!("finished {}", when(o.finished_at)));
    }
    if let Some(u) = &s.requested_by {
        who.push(format!("by {u}"));
    }
    if let Some(r) = &s.release {
        who.push(format!("release {r}"));
    }
    if let Some(e) = &s.environment {
        who.push(format!("environment {e}"));
    }
    println!("  {}", who.join(" · "));
    let from = s.from_version.as_deref().unwrap_or("none");
    let asked = s.to_version.as_deref().unwrap_or("latest");
    match &d.outcome {
        Some(o) => println!(
            "  version {from} → {} (asked: {asked})",
            o.to_version.as_deref().unwrap_or("none")
        ),
        None => println!("  version {from} → {asked} (not finished)"),
    }
    if let Some(b) = d.outcome.as_ref().and_then(|o| o.backup_id.as_deref()) {
        println!("  backup {b}");
    }
    if let Some(r) = d.outcome.as_ref().and_then(|o| o.reason.as_deref()) {
        println!("  reason: {r}");
    }
}

fn print_applied(d: &DeploymentRecord) {
    let Some(o) = &d.outcome else { return };
    if o.applied.is_empty() {
        return;
    }
    println!("  applied:");
    for m in &o.applied {
        // A remote run's CLI has no files to checksum: it says so rather than guess.
        let mut notes = vec![match &m.checksum {
            Some(c) => format!("checksum {}", short(c)),
            None => "checksum not recorded".to_string(),
        }];
        notes.push(
            if m.has_undo {
                "undo available"
            } else {
                "no undo"
            }
            .into(),
        );
        if m.irreversible {
            notes.push("irreversible".into());
        }
        println!(
            "    {:<10} {}  ({})",
            m.version.as_deref().unwrap_or("R"),
            m.script,
            notes.join(", ")
        );
    }
}

fn short(checksum: &str) -> &str {
    checksum.get(..12).unwrap_or(checksum)
}

fn print_attempts(tried: &[Attempt], rows: &[&HistoryRow]) {
    if tried.is_empty() && rows.is_empty() {
        return;
    }
    println!("  attempts:");
    for a in tried {
        println!(
            "    {:<11} {:<10} {} ({})",
            a.outcome,
            a.version.as_deref().unwrap_or("R"),
            a.script,
            a.direction
        );
        if let Some(e) = &a.error {
            println!("        error: {e}");
        }
    }
    for r in rows {
        println!(
            "    {:<11} {:<10} {} (history row {}, no transaction)",
            r.state.as_str(),
            r.version.as_deref().unwrap_or("R"),
            r.script,
            r.installed_rank
        );
        if let Some(e) = &r.error {
            println!("        error: {e}");
        }
    }
}

/// `belay history`: the newest `limit` deployments (of `target` when given), each with its
/// attempts; then failed or interrupted history rows no recorded deployment accounts for.
pub async fn history(
    url: &DatabaseUrl,
    schema: &str,
    limit: u32,
    target: Option<&str>,
    out: Output,
) -> Result<u8, Failure> {
    let log = open(url, schema).await?;
    let deployments = log
        .list_for(limit as usize, target)
        .await
        .map_err(software)?;
    let unfinished = log.unfinished_history_rows().await.map_err(software)?;
    let mut entries = Vec::new();
    for d in &deployments {
        let events = log.events(d.start.id).await.map_err(software)?;
        let rows: Vec<&HistoryRow> = unfinished
            .iter()
            .filter(|r| r.deployment_id == Some(d.start.id))
            .collect();
        entries.push((d, attempts(&events), rows));
    }
    // Rows of deployments the log does not have (runs before the log, or by an older
    // belay): still failures an operator must see. Rows of recorded deployments beyond
    // `limit` are theirs, not orphans.
    let mut orphans: Vec<&HistoryRow> = Vec::new();
    for r in &unfinished {
        let listed = deployments
            .iter()
            .any(|d| Some(d.start.id) == r.deployment_id);
        let recorded = match r.deployment_id {
            Some(id) if !listed => log.get(id).await.map_err(software)?.is_some(),
            _ => listed,
        };
        if !recorded && target.is_none() {
            orphans.push(r);
        }
    }
    match out {
        Output::Json => {
            let doc = json!({
                "deployments": entries.iter().map(|(d, tried, rows)| {
                    let mut v = record_json(d);
                    v["attempts"] = json!(tried.iter().map(attempt_json).collect::<Vec<_>>());
                    v["unfinished_rows"] = json!(rows.iter().map(|r| row_json(r)).collect::<Vec<_>>());
                    v
                }).collect::<Vec<_>>(),
                "unrecorded_failures": orphans.iter().map(|r| row_json(r)).collect::<Vec<_>>(),
            });
            println!("{doc}");
        }
        Output::Text => {
            if entries.is_empty() && orphans.is_empty() {
                println!("no deployments recorded in {schema}.deployments");
            }
            for (d, tried, rows) in &entries {
                print_header(d);
                print_applied(d);
                print_attempts(tried, rows);
            }
            if !orphans.is_empty() {
                println!(
                    "failed or interrupted migrations in {schema}.schema_history outside the deployment log:"
                );
                for r in &orphans {
                    println!(
                        "  {:<11} {:<10} {}  rank {}  {}{}",
                        r.state.as_str(),
                        r.version.as_deref().unwrap_or("R"),
                        r.script,
                        r.installed_rank,
                        when(r.installed_on),
                        r.deployment_id
                            .map(|id| format!("  deployment {id}"))
                            .unwrap_or_default()
                    );
                    if let Some(e) = &r.error {
                        println!("        error: {e}");
                    }
                }
            }
        }
    }
    Ok(0)
}

/// `belay deployments` without `--controller`: the same log, as the controller's
/// deployments are shown.
pub async fn deployments(
    url: &DatabaseUrl,
    schema: &str,
    command: Option<&DeploymentsCommand>,
    target: Option<&str>,
    out: Output,
) -> Result<u8, Failure> {
    match command.unwrap_or(&DeploymentsCommand::List { limit: 20 }) {
        DeploymentsCommand::List { limit } => {
            let log = open(url, schema).await?;
            let ds = log
                .list_for(*limit as usize, target)
                .await
                .map_err(software)?;
            match out {
                Output::Json => {
                    println!("{}", json!(ds.iter().map(record_json).collect::<Vec<_>>()))
                }
                Output::Text if ds.is_empty() => println!("no deployments yet"),
                Output::Text => {
                    for d in &ds {
                        let failed = d
                            .outcome
                            .as_ref()
                            .and_then(|o| o.failed_step)
                            .map(|s| format!(" in {s}"))
                            .unwrap_or_default();
                        println!(
                            "{}  {:<11} {}  target {}  to {}{}",
                            d.start.id,
                            d.step,
                            when(d.start.started_at),
                            d.start.target,
                            d.start.to_version.as_deref().unwrap_or("latest"),
                            failed
                        );
                    }
                }
            }
            Ok(0)
        }
        DeploymentsCommand::Show { id, report } => {
            let log = open(url, schema).await?;
            let d = match log.find(id).await.map_err(software)? {
                Found::One(d) => d,
                Found::None => {
                    return Err(Failure {
                        code: exit::NOT_FOUND,
                        message: format!(
                            "no deployment {id:?} in {schema}.deployments: `belay deployments list` shows the recorded ones"
                        ),
                    });
                }
                Found::Ambiguous(ids) => {
                    return Err(Failure {
                        code: exit::USAGE,
                        message: format!(
                            "{id:?} starts more than one deployment id ({}): give more of it",
                            ids.iter()
                                .map(Uuid::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            };
            let events = log.events(d.start.id).await.map_err(software)?;
            if *report {
                return crate::rollback_cmd::show_report(d.start.id, &events, out);
            }
            show(&d, &events, out);
            Ok(0)
        }
        DeploymentsCommand::Watch { .. } => Err(watch_needs_controller()),
    }
}

/// The steps a deployment went through, with when: its start, each transition, its end.
fn steps(d: &DeploymentRecord, events: &[DeployEvent]) -> Vec<(String, DateTime<Utc>)> {
    let mut out = vec![("planned".to_string(), d.start.started_at)];
    for e in events.iter().filter(|e| e.kind == "transition") {
        if out.last().is_none_or(|(s, _)| s != e.step.as_str()) {
            out.push((e.step.to_string(), e.at));
        }
    }
    if let Some(o) = &d.outcome
        && out.last().is_none_or(|(s, _)| s != o.state.as_str())
    {
        out.push((o.state.to_string(), o.finished_at));
    }
    out
}

fn show(d: &DeploymentRecord, events: &[DeployEvent], out: Output) {
    let tried = attempts(events);
    let steps = steps(d, events);
    if out == Output::Json {
        let mut v = record_json(d);
        v["steps"] = json!(
            steps
                .iter()
                .map(|(s, at)| json!({ "step": s, "at": at }))
                .collect::<Vec<_>>()
        );
        v["events"] = json!(events);
        v["attempts"] = json!(tried.iter().map(attempt_json).collect::<Vec<_>>());
        println!("{v}");
        return;
    }
    print_header(d);
    if let Some(o) = &d.outcome
        && !o.evidence.is_null()
    {
        let text = serde_json::to_string_pretty(&o.evidence).unwrap_or_default();
        println!("  evidence:");
        for line in text.lines() {
            println!("    {line}");
        }
    }
    print_applied(d);
    print_attempts(&tried, &[]);
    println!("  steps:");
    for (s, at) in &steps {
        println!("    {}  {s}", when(*at));
    }
    println!("  events:");
    if events.is_empty() {
        println!("    (none recorded)");
    }
    for e in events {
        println!(
            "    [{}] {}  {:<10} {:<10} {}",
            e.seq,
            when(e.at),
            e.step,
            e.kind,
            e.message
        );
        if let Some(err) = e.payload.get("error").and_then(|v| v.as_str()) {
            println!("        error: {err}");
        }
    }
}
