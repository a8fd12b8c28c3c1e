//! Text and JSON output. Text is for people (events as they happen, a summary); JSON is
//! one document on stdout for scripts.

use crate::cli::Output;
use belay_migrate::{
    ApiError, Event, EventSink, MigrationStatus, PlanView, RepairAction, RunReport,
};
use std::sync::{Arc, Mutex};

/// Prints events as they happen in text mode; collects them for the JSON document.
pub fn sink(output: Output, store: Arc<Mutex<Vec<Event>>>) -> EventSink {
    Arc::new(move |e: &Event| {
        if output == Output::Json {
            if let Ok(mut v) = store.lock() {
                v.push(e.clone());
            }
            return;
        }
        if let Some(line) = e.kind.describe() {
            println!("{line}");
        }
    })
}

pub fn message(output: Output, text: &str) {
    match output {
        Output::Text => println!("{text}"),
        Output::Json => println!("{}", serde_json::json!({ "message": text })),
    }
}

pub fn run_report(
    output: Output,
    action: &str,
    result: &Result<RunReport, ApiError>,
    events: &Arc<Mutex<Vec<Event>>>,
) {
    match output {
        Output::Json => {
            let events = events.lock().map(|v| v.clone()).unwrap_or_default();
            let doc = match result {
                Ok(r) => {
                    serde_json::json!({ "action": action, "ok": true, "report": r, "events": events })
                }
                Err(e) => {
                    serde_json::json!({ "action": action, "ok": false, "error": e.to_string(), "events": events })
                }
            };
            println!("{doc}");
        }
        Output::Text => {
            let Ok(r) = result else { return };
            if let Some(h) = &r.other_runner {
                println!(
                    "nothing to do: another runner ({h}) is already applying the same migrations"
                );
                return;
            }
            let n = r.results.len();
            let retries: u32 = r.results.iter().map(|s| s.retries).sum();
            let wait: u64 = r.results.iter().map(|s| s.lock_wait_ms).sum();
            if n == 0 && action == "undo" {
                println!("nothing to undo: no applied migration to revert");
            } else if n == 0 {
                println!("nothing to {action}: database is up to date");
            } else {
                println!(
                    "{action}: {n} migration(s) in deployment {}, {retries} lock retries, {wait} ms waiting for locks",
                    r.deployment_id
                );
            }
        }
    }
}

pub fn plan(output: Output, plan: &PlanView) {
    plan_annotated(output, plan, &|_| Vec::new());
}

/// The plan, with `notes(i)` printed under step `i` in text (e.g. its lint findings).
pub fn plan_annotated(output: Output, plan: &PlanView, note_lines: &dyn Fn(usize) -> Vec<String>) {
    if output == Output::Json {
        println!("{}", serde_json::json!(plan));
        return;
    }
    for w in &plan.warnings {
        println!("warning: {w}");
    }
    for b in &plan.blockers {
        println!("blocked: {b}");
    }
    if plan.steps.is_empty() {
        println!("nothing to apply: database is up to date");
        return;
    }
    println!(
        "{} migration(s) to apply (lock_timeout {}, up to {} attempts each):",
        plan.steps.len(),
        belay_core::format_duration(std::time::Duration::from_millis(plan.lock_timeout_ms)),
        plan.max_attempts
    );
    for (i, s) in plan.steps.iter().enumerate() {
        let mut notes = Vec::new();
        if let Some(reason) = s.directives.no_transaction {
            notes.push(format!(
                "no transaction ({})",
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ));
        }
        let d = &s.directives;
        if let Some(t) = d.lock_timeout {
            notes.push(format!("lock-timeout {}", belay_core::format_duration(t)));
        }
        if let Some(t) = d.statement_timeout {
            notes.push(format!(
                "statement-timeout {}",
                belay_core::format_duration(t)
            ));
        }
        if d.irreversible {
            notes.push("irreversible".into());
        }
        if !d.tables.is_empty() {
            notes.push(format!("tables {}", d.tables.join(",")));
        }
        if !d.allow.is_empty() {
            let rules: Vec<&str> = d.allow.keys().map(String::as_str).collect();
            notes.push(format!("allows {}", rules.join(",")));
        }
        if s.empty {
            notes.push("empty (no-op)".into());
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("  [{}]", notes.join("; "))
        };
        println!(
            "  {:<12} {}{notes}",
            s.version.as_deref().unwrap_or("R"),
            s.script
        );
        for line in note_lines(i) {
            println!("      {line}");
        }
    }
}

pub fn status(output: Output, statuses: &[MigrationStatus]) {
    if output == Output::Json {
        println!("{}", serde_json::json!(statuses));
        return;
    }
    if statuses.is_empty() {
        println!("no migrations found and no history recorded");
        return;
    }
    let rows: Vec<[String; 8]> = statuses
        .iter()
        .map(|s| {
            [
                s.version.clone().unwrap_or_else(|| "R".into()),
                s.description.clone(),
                s.entry_type.to_string(),
                s.state.as_str().to_string(),
                s.installed_on
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
                s.execution_time_ms
                    .map(|v| format!("{v} ms"))
                    .unwrap_or_default(),
                s.retries.map(|v| v.to_string()).unwrap_or_default(),
                s.lock_wait_ms
                    .map(|v| format!("{v} ms"))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "Version",
        "Description",
        "Type",
        "State",
        "Installed on",
        "Time",
        "Retries",
        "Lock wait",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.to_vec()));
    for r in &rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

pub fn validate(output: Output, problems: &[String], checked: usize) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "ok": problems.is_empty(), "problems": problems })
        ),
        Output::Text if problems.is_empty() => {
            println!("validated {checked} migration(s): files match history")
        }
        Output::Text => {
            for p in problems {
                println!("invalid: {p}");
            }
        }
    }
}

pub fn repair(output: Output, actions: &[RepairAction]) {
    match output {
        Output::Json => println!("{}", serde_json::json!(actions)),
        Output::Text if actions.is_empty() => println!("nothing to repair"),
        Output::Text => {
            for a in actions {
                println!(
                    "repaired {} ({}): {}",
                    a.version.as_deref().unwrap_or("R"),
                    a.script,
                    a.action
                );
            }
        }
    }
}
