//! `belay rollback list|plan|execute|status|abort`, `deployments show --report`, and the
//! rollback controller `migrate --on-failure rollback` installs: the wiring of
//! `belay-rollback` over local mode's APIs (`local`), and the commands over any
//! `RollbackApi` — `LocalRollbacks` in local mode, `RollbackClient` through the
//! controller — so both modes print the same text and JSON and exit the same way.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use belay_deploy::{DeployEvent, DeploySink, Step};
use belay_migrate::{LocalTargets, TargetSpec};
use belay_rollback::{
    Execute, Executor, HandlerNote, KIND_ROLLBACK_STEP, Outcome, Planner, RollbackApi,
    RollbackHandler, RollbackPlan, RollbackStatus, RollbackTo, Strategy, TargetRollbacks, Trigger,
};
use serde_json::json;

use crate::cli::{Output, RollbackCommand, RollbackToArgs};
use crate::settings::Settings;
use crate::{Failure, exit};

/// Builds the planner and executor for the database at `url`: the migrations with an
/// undo snapshot hook (the tables an undo drops data of are snapshotted, verified, first)
/// and the lock guard, backups with restores' lock waits bounded, the same health
/// checks and probes as `migrate`, the deployment log in the database.
pub fn local(
    settings: &Settings,
    url: &DatabaseUrl,
    target: &str,
    _out: Output,
) -> Result<TargetRollbacks, Failure> {
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
        scripts: Arc::new(belay_guards::FileScriptFacts::new(set)),
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
        // Each caller passes its own: `execute`'s, or the failure handler's.
        sink: None,
        abort: None,
        run_lock: Some(Arc::new(belay_rollback::PgRunLock::new(url.clone()))),
    };
    Ok(TargetRollbacks {
        planner,
        executor,
        log,
    })
}

/// The global arguments that make `belay rollback execute` reach the same database from
/// an operator's shell (any working directory): the migrations directory, belay.toml and
/// the backup directory as absolute paths, the URL's file, and the URL itself unless it
/// holds a password (then it stays where it came from: the environment or a file).
pub fn local_command_args(
    cli: &crate::cli::Cli,
    settings: &Settings,
    url: &DatabaseUrl,
) -> Vec<String> {
    let abs = |p: &std::path::Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let mut args = Vec::new();
    if let Some(file) = &cli.url_file {
        args.extend(["--url-file".into(), abs(file)]);
    } else if cli.url.is_some() && !url.has_password() {
        args.extend(["--url".into(), url.expose().to_string()]);
    }
    if let Some(c) = &cli.config {
        args.extend(["--config".into(), abs(c)]);
    }
    args.extend(["--dir".into(), abs(&settings.dir)]);
    args.extend(["--backup-dir".into(), abs(&settings.backup_dir)]);
    if let Some(h) = &cli.history_schema {
        args.extend(["--history-schema".into(), h.clone()]);
    }
    args
}

/// The `FailureHandler` `migrate --on-failure rollback` installs; `command_args` reach
/// this database in the command `ask` records.
pub fn handler(
    rollback: TargetRollbacks,
    out: Output,
    slot: crate::deploy_cmd::RollbackSlot,
    command_args: Vec<String>,
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
    let mut executor = rollback.executor;
    executor.sink = Some(render_sink(out));
    RollbackHandler {
        planner: rollback.planner,
        executor,
        notify: Some(notify),
        local: None,
        command_args,
    }
}

/// Runs a `belay rollback` command on `target` through `api` (local or remote).
pub async fn run(
    command: &RollbackCommand,
    api: &dyn RollbackApi,
    target: &str,
    out: Output,
) -> Result<u8, Failure> {
    match command {
        RollbackCommand::List { limit } => list(api, target, *limit as usize, out).await,
        RollbackCommand::Plan { to, data_corrupted } => {
            let plan = api
                .plan(
                    target,
                    &rollback_to(to)?,
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
            let plan = api.plan(target, &rollback_to(to)?, trigger.clone()).await?;
            if out == Output::Text {
                print_plan(&plan);
            }
            if !*yes {
                confirm(&plan)?;
            }
            // The plan shown is the plan run; the executor checks again, just before
            // acting, that its deployments can still be rolled back.
            let outcome = api
                .execute(
                    target,
                    Execute::Plan(Box::new(plan.clone())),
                    trigger,
                    render_sink(out),
                )
                .await?;
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
        RollbackCommand::Status { id } => {
            let status = api.status(target, id.as_deref()).await?;
            print_status(&status, out);
            Ok(0)
        }
        RollbackCommand::Abort { id } => {
            let status = api.abort(target, id.as_deref()).await?;
            print_status(&status, out);
            Ok(0)
        }
    }
}

/// What `<to>` names, as the command line gave it: read against the records where they
/// are (the agent's log in remote mode).
fn rollback_to(to: &RollbackToArgs) -> Result<RollbackTo, Failure> {
    match (&to.release, &to.to) {
        (Some(r), _) => Ok(RollbackTo::Release(r.clone())),
        (None, Some(t)) => Ok(RollbackTo::Positional(t.clone())),
        (None, None) => Err(Failure {
            code: exit::USAGE,
            message:
                "name what to roll back to: a deployment id, a schema version, or --release VERSION"
                    .into(),
        }),
    }
}

pub(crate) fn operator_trigger(reason: Option<String>, data_suspect: bool) -> Trigger {
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

/// Asks on a terminal; refuses without one (a script must say `--yes`).
fn confirm(plan: &RollbackPlan) -> Result<(), Failure> {
    confirm_question(&format!(
        "roll back {} deployment(s) by {}?",
        plan.deployments.len(),
        plan.strategy
    ))
}

/// Asks `question` on a terminal; refuses without one (a script must say `--yes`).
pub(crate) fn confirm_question(question: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure {
            code: exit::USAGE,
            message: "rollback execute changes the database and needs confirmation: pass --yes (no terminal to ask on)".into(),
        });
    }
    print!("{question} [y/N] ");
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

pub(crate) fn print_plan(plan: &RollbackPlan) {
    let ids: Vec<String> = plan.deployments.iter().map(|d| d.to_string()).collect();
    if let Some(resume) = &plan.resume {
        println!("an interrupted rollback, planned before: {resume}");
    }
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
            KIND_ROLLBACK_STEP | "restore_retry" | belay_rollback::KIND_NOTIFY => {
                println!("{}", e.message)
            }
            belay_deploy::KIND_MIGRATION if !e.message.is_empty() => println!("{}", e.message),
            belay_deploy::KIND_TRANSITION => println!("{}", e.message),
            _ => {}
        }
    })
}

async fn list(
    api: &dyn RollbackApi,
    target: &str,
    limit: usize,
    out: Output,
) -> Result<u8, Failure> {
    let rows = api.list(target, limit).await?;
    if out == Output::Json {
        println!("{}", json!({ "deployments": rows }));
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no deployments yet");
    }
    for r in &rows {
        println!(
            "{}  {:<12} {}  release {:<8} {} → {}  {} migration(s){}",
            r.id,
            r.state.as_str(),
            r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            r.release.as_deref().unwrap_or("—"),
            r.from_version.as_deref().unwrap_or("none"),
            r.reached_version.as_deref().unwrap_or("none"),
            r.migrations,
            if r.can_roll_back {
                "  (can roll back)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

fn print_status(status: &RollbackStatus, out: Output) {
    let record = &status.record;
    if out == Output::Json {
        println!(
            "{}",
            json!({
                "deployment": record.start.id,
                "state": record.step,
                "running": status.running,
                "abort_requested": status.abort_requested,
                "under_way": status.under_way,
                "next": status.next,
                "steps": status.steps.iter().map(|e| &e.payload).collect::<Vec<_>>(),
                "notifications": status.notifications.iter().map(|e| &e.payload).collect::<Vec<_>>(),
                "report": status.report,
            })
        );
        return;
    }
    println!("deployment {}: {}", record.start.id, record.step);
    match &status.markdown {
        Some(markdown) => println!("{markdown}"),
        None if record.step == Step::RollingBack => {
            if status.running {
                println!("a rollback is running; steps so far:");
            } else {
                // Not running in the process that answered: in local mode another
                // `belay` may be running it.
                println!(
                    "a rollback started and has not ended (or was interrupted); steps so far:"
                );
            }
            for e in &status.steps {
                println!("  {}", e.message);
            }
        }
        None => println!("no rollback on record for this deployment"),
    }
    if !status.notifications.is_empty() {
        println!("notifications:");
        for e in &status.notifications {
            println!("  {}", e.message);
        }
    }
    // Also after a report: a crash can fall between the report and the last transition.
    if let Some(step) = &status.under_way {
        println!("under way (started, not ended): {step}");
    }
    if let Some(next) = &status.next {
        println!("next: {next}");
    }
}

/// `deployments show ID --report`.
pub fn show_report(id: uuid::Uuid, events: &[DeployEvent], out: Output) -> Result<u8, Failure> {
    let Some((report, markdown)) = belay_rollback::incident_report(events) else {
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
