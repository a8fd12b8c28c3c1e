//! `belay rollback list|plan|execute|status`, `deployments show --report`, and the
//! rollback controller `migrate --on-failure rollback` installs: the wiring of
//! `belay-rollback` over local mode's APIs, the facts only the files know (which tables a
//! migration writes, which data its undo drops), rendering and exit codes.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use belay_deploy::{DeployEvent, DeploySink, DeploymentLog, DeploymentRecord, Step};
use belay_migrate::{LocalTargets, MigrationSet, TargetSpec};
use belay_rollback::{
    Executor, HandlerNote, IncidentReport, KIND_INCIDENT_REPORT, KIND_ROLLBACK_STEP, Outcome,
    Planner, RollbackError, RollbackHandler, RollbackPlan, RollbackTo, ScriptFact, ScriptFacts,
    Strategy, Trigger,
};
use serde_json::json;

use crate::cli::{Output, RollbackCommand, RollbackToArgs};
use crate::settings::Settings;
use crate::{Failure, exit};

/// The rollback controller of local mode, wired.
pub struct LocalRollback {
    pub planner: Planner,
    pub executor: Executor,
    pub log: Arc<dyn DeploymentLog>,
}

/// Builds the planner and executor for the database at `url`: the migrations with an
/// undo snapshot hook (the tables an undo drops data of are snapshotted, verified, first)
/// and the lock guard, backups with restores' lock waits bounded, the same health
/// checks and probes as `migrate`, the deployment log in the database.
pub fn local(
    settings: &Settings,
    url: &DatabaseUrl,
    target: &str,
    out: Output,
) -> Result<LocalRollback, Failure> {
    let backup_target = crate::backup_cmd::target_name(url);
    let manager = crate::backup_cmd::manager(settings)
        .with_restore_lock_timeout(settings.restore_lock_timeout);
    let hook = belay_guards::BackupGuard::new(
        manager.clone(),
        url.clone(),
        backup_target.clone(),
        belay_guards::BackupMode::Tables,
    )
    .with_notify(Arc::new(|m: &str| eprintln!("{m}")));
    let api = LocalTargets::new([TargetSpec {
        name: target.to_string(),
        url: url.clone(),
        dir: settings.dir.clone(),
        exec: settings.exec.clone(),
    }])
    .with_backup_hook(target, Arc::new(hook));
    let api = if settings.lock_guard {
        api.with_lock_guard(
            target,
            Arc::new(belay_guards::LockGuardAdapter::new(url.clone())),
        )
    } else {
        api
    };
    let health = crate::deploy_cmd::LocalHealth {
        checks: crate::health_cmd::local_health(&api, target, settings, Some(url)),
        probes: settings.probes.clone(),
    };
    let backups = Arc::new(belay_backup::LocalBackups::new().with_target(
        backup_target.clone(),
        url.clone(),
        manager,
    ));
    let log = crate::deploy_cmd::local_log(url, settings)?;
    let set = belay_migrate::load(&settings.dir).ok();
    let planner = Planner {
        backups: backups.clone(),
        backup_target: backup_target.clone(),
        history_schema: settings.exec.history_schema.clone(),
        scripts: Arc::new(FileScriptFacts { set }),
        stats: Arc::new(belay_rollback::PgTableStats::new(url.clone())),
    };
    let executor = Executor {
        migrations: Arc::new(api),
        backups,
        health: Arc::new(health),
        log: log.clone(),
        backup_target,
        policy: settings.rollback.clone(),
        probes: settings
            .probes
            .iter()
            .cloned()
            .map(belay_health::TargetProbe::from)
            .collect(),
        postflight: None,
        sink: Some(render_sink(out)),
    };
    Ok(LocalRollback {
        planner,
        executor,
        log,
    })
}

/// The `FailureHandler` `migrate --on-failure rollback` installs.
pub fn handler(
    rollback: LocalRollback,
    out: Output,
    slot: crate::deploy_cmd::RollbackSlot,
) -> RollbackHandler {
    let notify: belay_rollback::Notify = Arc::new(move |n: HandlerNote<'_>| {
        if let HandlerNote::Finished(o) = &n
            && let Ok(mut s) = slot.lock()
        {
            *s = Some(json!({ "state": o.state, "report": o.report }));
        }
        if out == Output::Json {
            return;
        }
        match n {
            HandlerNote::Planned(plan) => print_plan(plan),
            HandlerNote::Asked { command, .. } => println!(
                "rollback policy is `ask`: nothing was rolled back; to run this plan: {command}"
            ),
            HandlerNote::Finished(o) => print_outcome(o),
        }
    });
    RollbackHandler {
        planner: rollback.planner,
        executor: rollback.executor,
        notify: Some(notify),
    }
}

/// Which tables each migration writes and which data its undo drops, from the files.
struct FileScriptFacts {
    set: Option<MigrationSet>,
}

/// Statements whose tables the lexer names exactly (`ALTER TABLE`, `DROP TABLE`,
/// `TRUNCATE`), or that write no existing table's rows.
fn attributable(words: &[String]) -> bool {
    let w: Vec<String> = words
        .iter()
        .take(3)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["ALTER", "TABLE", ..]
            | ["DROP", "TABLE", ..]
            | ["TRUNCATE", ..]
            | ["CREATE", "TABLE", ..]
            | ["CREATE", "INDEX", ..]
            | ["CREATE", "UNIQUE", ..]
            | ["CREATE", "SEQUENCE", ..]
            | ["CREATE", "SCHEMA", ..]
            | ["CREATE", "TYPE", ..]
            | ["COMMENT", ..]
            | ["SET", ..]
            | ["DROP", "INDEX", ..]
    )
}

#[async_trait::async_trait]
impl ScriptFacts for FileScriptFacts {
    async fn fact(&self, _target: &str, script: &str) -> Result<Option<ScriptFact>, ApiError> {
        let Some(m) = self
            .set
            .as_ref()
            .and_then(|s| s.migrations.iter().find(|m| m.script_name == script))
        else {
            return Ok(None);
        };
        let mut named: Vec<String> = m.up.directives.tables.clone();
        let mut known = true;
        for st in &m.up.statements {
            if !attributable(&st.words) {
                known = false;
            }
            let t = st.table_targets(&m.up.text);
            named.extend(t.data_lost);
            named.extend(t.altered);
        }
        named.dedup();
        // `-- belay:tables=` is the author's word for what the script writes.
        let writes = (known || !m.up.directives.tables.is_empty()).then_some(named);
        let mut undo_drops = Vec::new();
        if let Some(down) = &m.down {
            for st in &down.statements {
                for t in st.table_targets(&down.text).data_lost {
                    if !undo_drops.contains(&t) {
                        undo_drops.push(t);
                    }
                }
            }
        }
        Ok(Some(ScriptFact { writes, undo_drops }))
    }
}

fn failure(e: RollbackError) -> Failure {
    Failure::from(ApiError::from(e))
}

/// Runs a `belay rollback` command in local mode.
pub async fn run(
    command: &RollbackCommand,
    rollback: LocalRollback,
    target: &str,
    out: Output,
) -> Result<u8, Failure> {
    match command {
        RollbackCommand::List { limit } => list(&rollback, *limit as usize, out).await,
        RollbackCommand::Plan { to, data_corrupted } => {
            let plan = plan(
                &rollback,
                target,
                to,
                operator_trigger(None, *data_corrupted),
            )
            .await?;
            if out == Output::Json {
                println!("{}", json!({ "action": "rollback_plan", "plan": plan }));
            } else {
                print_plan(&plan);
            }
            Ok(if plan.strategy == Strategy::Escalate {
                exit::REFUSED
            } else {
                0
            })
        }
        RollbackCommand::Execute {
            to,
            data_corrupted,
            reason,
            yes,
        } => {
            let trigger = operator_trigger(reason.clone(), *data_corrupted);
            let plan = plan(&rollback, target, to, trigger).await?;
            if out == Output::Text {
                print_plan(&plan);
            }
            if !*yes {
                confirm(&plan)?;
            }
            let outcome = rollback.executor.execute(&plan).await.map_err(failure)?;
            if out == Output::Json {
                println!(
                    "{}",
                    json!({
                        "action": "rollback_execute",
                        "ok": outcome.state == Step::RolledBack,
                        "state": outcome.state,
                        "plan": plan,
                        "report": outcome.report,
                    })
                );
            } else {
                print_outcome(&outcome);
            }
            Ok(if outcome.state == Step::RolledBack {
                0
            } else {
                exit::FAILED
            })
        }
        RollbackCommand::Status { id } => status(&rollback, id.as_deref(), out).await,
    }
}

fn operator_trigger(reason: Option<String>, data_suspect: bool) -> Trigger {
    Trigger::operator(
        reason.unwrap_or_else(|| {
            format!(
                "requested by {}",
                crate::history_cmd::os_user().unwrap_or_else(|| "an operator".into())
            )
        }),
        data_suspect,
    )
}

async fn plan(
    rollback: &LocalRollback,
    target: &str,
    to: &RollbackToArgs,
    trigger: Trigger,
) -> Result<RollbackPlan, Failure> {
    let records = rollback.log.list(1000).await.map_err(|e| Failure {
        code: exit::UNAVAILABLE,
        message: belay_core::redact_url(&e.to_string()),
    })?;
    let to = match (&to.release, &to.to) {
        (Some(r), _) => RollbackTo::Release(r.clone()),
        (None, Some(t)) => RollbackTo::positional(t, &records),
        (None, None) => {
            return Err(Failure {
                code: exit::USAGE,
                message: "name what to roll back to: a deployment id, a schema version, or --release VERSION".into(),
            });
        }
    };
    let resolved = belay_rollback::resolve_in(&records, &to).map_err(failure)?;
    rollback
        .planner
        .plan(target, &resolved, trigger)
        .await
        .map_err(failure)
}

/// Asks on a terminal; refuses without one (a script must say `--yes`).
fn confirm(plan: &RollbackPlan) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure {
            code: exit::USAGE,
            message: "rollback execute changes the database and needs confirmation: pass --yes (no terminal to ask on)".into(),
        });
    }
    print!(
        "roll back {} deployment(s) by {}? [y/N] ",
        plan.deployments.len(),
        plan.strategy
    );
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure {
            code: exit::REFUSED,
            message: "not confirmed: nothing was changed".into(),
        })
    }
}

fn print_plan(plan: &RollbackPlan) {
    let ids: Vec<String> = plan.deployments.iter().map(|d| d.to_string()).collect();
    println!(
        "rollback plan for {} (deployment {}): {} back to version {}",
        plan.target,
        ids.join(", "),
        plan.strategy,
        plan.to_version.as_deref().unwrap_or("none")
    );
    println!(
        "trigger: {} — {}",
        plan.trigger.kind.as_str(),
        plan.trigger.reason
    );
    println!("why:");
    for r in &plan.reasons {
        println!("  {}: {}", r.branch, r.why);
    }
    println!("steps:");
    for (i, s) in plan.steps.iter().enumerate() {
        println!("  {}. {s}", i + 1);
    }
    for b in &plan.backups {
        println!(
            "backup: {} ({}, {}, {} bytes{})",
            b.id,
            b.role,
            b.scope,
            b.size,
            if b.verified {
                ", verified"
            } else {
                ", NOT verified"
            }
        );
    }
    println!("what each path loses:");
    for l in &plan.losses {
        let verdict = if l.loses_no_data {
            "loses no data"
        } else {
            "loses data"
        };
        println!("  {} ({verdict}):", l.strategy);
        for i in &l.items {
            println!("    - {i}");
        }
    }
    println!(
        "estimated: {} ms ({})",
        plan.estimated_ms, plan.estimate_basis
    );
}

fn print_outcome(o: &Outcome) {
    let r = &o.report;
    println!(
        "{}: deployment {} ({:?})",
        o.state, r.deployment_id, r.severity
    );
    if let Some(c) = &r.backups.recover_command {
        println!(
            "data the undo dropped ({}) is kept in snapshot {}; bring it back with: {c}",
            r.backups.kept_tables.join(", "),
            r.backups.undo_snapshot.as_deref().unwrap_or("?")
        );
    }
    if let Some(e) = &r.backups.emergency {
        println!("emergency backup: {e}");
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    println!(
        "incident report: `belay rollback status {}` (or `belay deployments show {} --report`)",
        &r.deployment_id.to_string()[..8],
        &r.deployment_id.to_string()[..8]
    );
}

/// The rollback's steps as they are recorded, one line each.
fn render_sink(out: Output) -> DeploySink {
    Arc::new(move |e: &DeployEvent| {
        if out == Output::Json {
            return;
        }
        match e.kind.as_str() {
            KIND_ROLLBACK_STEP | "restore_retry" => println!("{}", e.message),
            belay_deploy::KIND_MIGRATION if !e.message.is_empty() => println!("{}", e.message),
            belay_deploy::KIND_TRANSITION => println!("{}", e.message),
            _ => {}
        }
    })
}

async fn list(rollback: &LocalRollback, limit: usize, out: Output) -> Result<u8, Failure> {
    let records = rollback.log.list(limit).await.map_err(|e| Failure {
        code: exit::UNAVAILABLE,
        message: belay_core::redact_url(&e.to_string()),
    })?;
    let rows: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let applied = r.outcome.as_ref().map(|o| o.applied.len()).unwrap_or(0);
            let can = matches!(r.step, Step::Succeeded | Step::Failed) && applied > 0;
            json!({
                "id": r.start.id,
                "state": r.step,
                "started_at": r.start.started_at,
                "release": r.start.release,
                "from_version": r.start.from_version,
                "reached_version": r.outcome.as_ref().and_then(|o| o.to_version.clone()),
                "migrations": applied,
                "can_roll_back": can,
            })
        })
        .collect();
    if out == Output::Json {
        println!("{}", json!({ "deployments": rows }));
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no deployments yet");
    }
    for (r, row) in records.iter().zip(&rows) {
        println!(
            "{}  {:<12} {}  release {:<8} {} → {}  {} migration(s){}",
            r.start.id,
            r.step.as_str(),
            r.start.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            r.start.release.as_deref().unwrap_or("—"),
            r.start.from_version.as_deref().unwrap_or("none"),
            row["reached_version"].as_str().unwrap_or("none"),
            row["migrations"],
            if row["can_roll_back"] == true {
                "  (can roll back)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

/// The newest incident report among `events`.
pub fn incident_report(events: &[DeployEvent]) -> Option<(IncidentReport, String)> {
    let e = events
        .iter()
        .rev()
        .find(|e| e.kind == KIND_INCIDENT_REPORT)?;
    let report = serde_json::from_value(e.payload["report"].clone()).ok()?;
    let markdown = e.payload["markdown"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Some((report, markdown))
}

async fn status(rollback: &LocalRollback, id: Option<&str>, out: Output) -> Result<u8, Failure> {
    let unavailable = |e: belay_deploy::LogError| Failure {
        code: exit::UNAVAILABLE,
        message: belay_core::redact_url(&e.to_string()),
    };
    let records = rollback.log.list(1000).await.map_err(unavailable)?;
    let record: &DeploymentRecord = match id {
        Some(prefix) => {
            let prefix = prefix.to_ascii_lowercase();
            let found: Vec<&DeploymentRecord> = records
                .iter()
                .filter(|r| r.start.id.to_string().starts_with(&prefix))
                .collect();
            match found.as_slice() {
                [one] => one,
                [] => {
                    return Err(Failure {
                        code: exit::NOT_FOUND,
                        message: format!(
                            "no deployment id starts with {prefix:?}; `belay rollback list` shows them"
                        ),
                    });
                }
                many => {
                    return Err(Failure {
                        code: exit::USAGE,
                        message: format!(
                            "{prefix:?} starts {} deployment ids: give more of it",
                            many.len()
                        ),
                    });
                }
            }
        }
        None => records
            .iter()
            .find(|r| {
                matches!(
                    r.step,
                    Step::RollingBack | Step::RolledBack | Step::Escalated
                )
            })
            .ok_or_else(|| Failure {
                code: exit::NOT_FOUND,
                message: "no deployment on record was rolled back".into(),
            })?,
    };
    let events = rollback
        .log
        .events(record.start.id)
        .await
        .map_err(unavailable)?;
    let steps: Vec<&DeployEvent> = events
        .iter()
        .filter(|e| e.kind == KIND_ROLLBACK_STEP)
        .collect();
    let report = incident_report(&events);
    if out == Output::Json {
        println!(
            "{}",
            json!({
                "deployment": record.start.id,
                "state": record.step,
                "steps": steps.iter().map(|e| &e.payload).collect::<Vec<_>>(),
                "report": report.as_ref().map(|(r, _)| r),
            })
        );
        return Ok(0);
    }
    println!("deployment {}: {}", record.start.id, record.step);
    match report {
        Some((_, markdown)) => println!("{markdown}"),
        None if record.step == Step::RollingBack => {
            println!("a rollback started and has not ended (or was interrupted); steps so far:");
            for e in steps {
                println!("  {}", e.message);
            }
        }
        None => println!("no rollback on record for this deployment"),
    }
    Ok(0)
}

/// `deployments show ID --report`.
pub fn show_report(id: uuid::Uuid, events: &[DeployEvent], out: Output) -> Result<u8, Failure> {
    let Some((report, markdown)) = incident_report(events) else {
        return Err(Failure::from(ApiError::new(
            ErrorKind::NotFound,
            format!("deployment {id} has no incident report: it was not rolled back"),
        )));
    };
    match out {
        Output::Json => println!("{}", json!(report)),
        Output::Text => println!("{markdown}"),
    }
    Ok(0)
}
