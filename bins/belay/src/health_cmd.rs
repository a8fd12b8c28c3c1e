//! Health commands: `check preflight|postflight`, `probe http|sql` (local and remote
//! alike, through `belay_health::HealthApi`), and the rendering and verdicts of checks
//! that `migrate`'s deployment (`deploy_cmd`) shares with them.

use crate::cli::{CheckCommand, Cli, Command, Output, ProbeArgs, ProbeCommand};
use crate::settings::Settings;
use crate::{Failure, exit};
use belay_core::{DatabaseUrl, parse_duration};
use belay_health::{
    CheckResult, CheckStatus, Expectation, HealthApi, HealthTarget, HealthTargets,
    PreflightOptions, ProbeCheck, ProbeEvent, ProbeEvents, TargetProbe,
};
use belay_migrate::LocalTargets;
use futures::StreamExt;
use std::sync::Arc;

fn health_err(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::USAGE,
        message: belay_core::redact_url(&e.to_string()),
    }
}

pub fn render(out: Output, results: &[CheckResult]) {
    if out == Output::Json {
        println!("{}", serde_json::json!(results));
        return;
    }
    for r in results {
        let status = match r.status {
            CheckStatus::Pass => "pass ",
            CheckStatus::Warn => "WARN ",
            CheckStatus::Block => "BLOCK",
        };
        println!(
            "{status} {:<22} {} (threshold {})",
            r.name, r.value, r.threshold
        );
        if r.status != CheckStatus::Pass && !r.remedy.is_empty() {
            println!("      remedy: {}", r.remedy);
        }
    }
}

/// The health checker of local mode: the one target at `url`, its backups under
/// `--backup-dir`, its migration state from `migrations` (the engine over the same target).
pub fn local_health(
    migrations: &LocalTargets,
    target: &str,
    settings: &Settings,
    url: Option<&DatabaseUrl>,
) -> HealthTargets {
    let mut facts = belay_guards::MigrationFactsAdapter::new(
        Arc::new(migrations.clone()),
        [(target.to_string(), settings.dir.clone())],
    );
    if let Some(set) = migrations.files(target) {
        facts = facts.with_files(target, set);
    }
    HealthTargets::new([(
        target.to_string(),
        HealthTarget {
            url: url.cloned(),
            backup_dir: Some(settings.backup_dir.clone()),
        },
    )])
    .with_migration_facts(Arc::new(facts))
}

fn blocked(results: &[CheckResult], what: &str) -> Failure {
    let lines: Vec<String> = results
        .iter()
        .filter(|r| r.status == CheckStatus::Block)
        .map(|r| format!("  {}: {} (remedy: {})", r.name, r.value, r.remedy))
        .collect();
    let names: Vec<&str> = results
        .iter()
        .filter(|r| r.status == CheckStatus::Block)
        .map(|r| r.name.as_str())
        .collect();
    Failure {
        code: exit::REFUSED,
        message: format!(
            "{what} blocked by: {}\n{}\nfix the cause, or pass --override-check NAME --reason \"…\" to go ahead knowingly",
            names.join(", "),
            lines.join("\n")
        ),
    }
}

/// The connectivity check blocks only when the database cannot be reached: that is
/// "unavailable" (exit 69), as everywhere else, not a refusal.
fn unreachable(results: &[CheckResult]) -> Option<Failure> {
    results
        .iter()
        .find(|r| r.name == "connectivity" && r.status == CheckStatus::Block)
        .map(|r| Failure {
            code: exit::UNAVAILABLE,
            // Worded as the executor's own connection errors.
            message: r.value.replacen("could not connect", "cannot connect", 1),
        })
}

pub fn refuse_on_block(results: &[CheckResult], what: &str) -> Result<(), Failure> {
    if let Some(f) = unreachable(results) {
        return Err(f);
    }
    if belay_health::any_blocks(results) {
        Err(blocked(results, what))
    } else {
        Ok(())
    }
}

/// `check preflight|postflight` of `target`: the report, then exit 2 when a check blocks
/// (69 when the database cannot be reached at all).
pub async fn check(
    command: &CheckCommand,
    api: &dyn HealthApi,
    target: &str,
    settings: &Settings,
    out: Output,
) -> Result<u8, Failure> {
    let results = match command {
        CheckCommand::Preflight {
            override_check,
            reason,
        } => {
            let options = PreflightOptions {
                thresholds: settings.thresholds.clone(),
                overrides: override_check.clone(),
                reason: reason.clone(),
                migration_checks: true,
            };
            api.preflight(target, &options).await?
        }
        // The history and verify.sql checks come from wherever the target's migrations
        // are: this process in local mode, the target's agent in remote mode.
        CheckCommand::Postflight => api.postflight(target, &settings.postflight).await?,
    };
    render(out, &results);
    if let Some(f) = unreachable(&results) {
        return Err(f);
    }
    Ok(if belay_health::any_blocks(&results) {
        exit::REFUSED
    } else {
        0
    })
}

/// The same spelling as `expect =` in belay.toml (`Expectation::from_str`).
fn parse_expect(s: &str) -> Result<Expectation, Failure> {
    s.parse().map_err(|e| health_err(format!("--expect: {e}")))
}

fn apply_args(mut probe: TargetProbe, a: &ProbeArgs) -> Result<TargetProbe, Failure> {
    let d = |flag: &str, v: &Option<String>| -> Result<Option<std::time::Duration>, Failure> {
        v.as_deref()
            .map(|v| parse_duration(v).map_err(|e| health_err(format!("--{flag}: {e}"))))
            .transpose()
    };
    if let Some(p) = d("period", &a.period)? {
        probe.period = p;
    }
    if let Some(t) = d("timeout", &a.timeout)? {
        probe.timeout = t;
    }
    if let Some(n) = a.failure_threshold {
        probe.failure_threshold = n;
    }
    if let Some(n) = a.success_threshold {
        probe.success_threshold = n;
    }
    Ok(probe)
}

pub fn print_event(out: Output, e: &ProbeEvent) {
    match out {
        Output::Text => println!("{}", e.summary()),
        Output::Json => println!("{}", serde_json::json!(e)),
    }
}

fn healthy(attempts: u64, out: Output) -> u8 {
    if out == Output::Text {
        println!("healthy: {attempts} probe attempt(s), no failure threshold crossed");
    }
    0
}

fn triggered(e: &ProbeEvent) -> Failure {
    Failure {
        code: exit::PROBE_FAILED,
        message: format!(
            "probe {} crossed its failure threshold ({} consecutive failures): {}",
            e.probe,
            e.consecutive_failures,
            e.summary()
        ),
    }
}

/// Prints every event until the window ends (exit 0) or one crosses its threshold (exit
/// 4); dropping the stream then stops the probe, wherever it runs.
async fn follow(mut events: ProbeEvents, out: Output) -> Result<u8, Failure> {
    let mut attempts = 0;
    while let Some(event) = events.next().await {
        let event = event?;
        attempts += 1;
        print_event(out, &event);
        if event.triggered {
            return Err(triggered(&event));
        }
    }
    Ok(healthy(attempts, out))
}

/// Whether the probe needs the target's database (local mode then needs a URL).
fn needs_database(command: &ProbeCommand) -> bool {
    matches!(command, ProbeCommand::Sql { .. })
}

/// `probe http|sql` of `target`: HTTP probes run where the target's health checker runs
/// (this process, or the target's agent), SQL probes on the target's database.
pub async fn probe(
    command: &ProbeCommand,
    api: &dyn HealthApi,
    target: &str,
    out: Output,
) -> Result<u8, Failure> {
    let (probe, args) = match command {
        ProbeCommand::Http {
            endpoint,
            expect_status,
            json_pointer,
            equals,
            args,
        } => {
            let mut probe = TargetProbe::http("http", endpoint.clone());
            if let ProbeCheck::Http(h) = &mut probe.check {
                h.expect_status = *expect_status;
                h.json_pointer.clone_from(json_pointer);
                h.equals = equals.as_deref().map(|v| {
                    serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.to_string()))
                });
            }
            (probe, args)
        }
        ProbeCommand::Sql {
            query,
            expect,
            args,
        } => (
            TargetProbe::sql("sql", query.clone(), parse_expect(expect)?),
            args,
        ),
    };
    let probe = apply_args(probe, args)?;
    // Without --for, probe until the threshold is crossed (or Ctrl-C).
    let window = match &args.r#for {
        Some(v) => parse_duration(v).map_err(|e| health_err(format!("--for: {e}")))?,
        None => std::time::Duration::from_secs(60 * 60 * 24 * 365),
    };
    follow(api.probe(target, &probe, window).await?, out).await
}

/// `probe` in local mode: HTTP probes need no database; SQL probes run on the URL's.
pub async fn probe_local(
    command: &ProbeCommand,
    settings: &Settings,
    out: Output,
) -> Result<u8, Failure> {
    const TARGET: &str = "local";
    if needs_database(command) && settings.url.is_none() {
        return Err(health_err(
            "no database URL: set BELAY_DATABASE_URL (or DATABASE_URL) or pass --url-file",
        ));
    }
    let api = HealthTargets::new([(
        TARGET.to_string(),
        HealthTarget {
            url: settings.url.clone(),
            backup_dir: None,
        },
    )]);
    probe(command, &api, TARGET, out).await
}

/// `locks`, `check` and `probe` in remote mode: through the controller, which routes to
/// the target's agent; `None` for every other command.
pub async fn remote(
    cli: &Cli,
    url_from_argv: bool,
    conn: &belay_rpc::Connection,
    target: &str,
) -> Option<Result<u8, Failure>> {
    let out = cli.output;
    Some(match &cli.command {
        Command::Locks { args } => {
            crate::locks_cmd::run(args, &belay_rpc::LockMonitorClient::new(conn), target, out).await
        }
        Command::Check { command } => {
            // Thresholds, assertions and smoke queries are the caller's (belay.toml);
            // measuring is the agent's.
            match crate::settings::resolve(cli, url_from_argv, None) {
                Ok(settings) => {
                    check(
                        command,
                        &belay_rpc::HealthClient::new(conn),
                        target,
                        &settings,
                        out,
                    )
                    .await
                }
                Err(e) => Err(crate::usage(e)),
            }
        }
        Command::Probe { command } => {
            probe(command, &belay_rpc::HealthClient::new(conn), target, out).await
        }
        _ => return None,
    })
}
