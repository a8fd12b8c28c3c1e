//! Health commands (local mode): `check preflight|postflight`, `probe http|sql`, and the
//! preflight and watch window around `migrate`.

use crate::cli::{CheckCommand, Output, ProbeArgs, ProbeCommand};
use crate::settings::Settings;
use crate::{Failure, exit};
use belay_core::{DatabaseUrl, parse_duration};
use belay_health::{
    CheckResult, CheckStatus, Expectation, MigrationSummary, PostflightSpec, PreflightContext,
    ProbeEvent, ProbeSpec, VerifyScript, WatchOutcome,
};
use belay_migrate::{MigrationApi, State};
use sqlx::Connection;

fn health_err(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::USAGE,
        message: belay_core::redact_url(&e.to_string()),
    }
}

/// Pending, failed and drifted migrations, as preflight and postflight report them.
pub async fn summary(api: &dyn MigrationApi, target: &str) -> Result<MigrationSummary, Failure> {
    let statuses = api.status(target).await?;
    let name = |s: &belay_migrate::MigrationStatus| {
        format!(
            "{} ({})",
            s.version.clone().unwrap_or_else(|| "R".into()),
            s.script
        )
    };
    Ok(MigrationSummary {
        pending: statuses
            .iter()
            .filter(|s| matches!(s.state, State::Pending | State::Undone))
            .count(),
        failed: statuses
            .iter()
            .filter(|s| s.state == State::Failed)
            .map(name)
            .collect(),
        drift: statuses
            .iter()
            .filter(|s| s.state == State::ChecksumMismatch)
            .map(name)
            .collect(),
    })
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

/// Runs preflight; `Err` (exit 2) when a check blocks and is not overridden.
pub async fn preflight(
    api: &dyn MigrationApi,
    target: &str,
    settings: &Settings,
    url: &DatabaseUrl,
    overrides: &[String],
    reason: Option<&str>,
    include_migration_state: bool,
) -> Result<Vec<CheckResult>, Failure> {
    let ctx = PreflightContext {
        backup_dir: Some(settings.backup_dir.clone()),
        expected_backup_bytes: None,
        migration_summary: if include_migration_state {
            Some(summary(api, target).await?)
        } else {
            None
        },
    };
    let mut results = belay_health::preflight_url(url, &ctx, &settings.thresholds)
        .await
        .map_err(health_err)?;
    if !overrides.is_empty() {
        belay_health::apply_overrides(&mut results, overrides, reason.unwrap_or(""))
            .map_err(health_err)?;
    }
    Ok(results)
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

pub async fn check(
    command: &CheckCommand,
    api: &dyn MigrationApi,
    target: &str,
    settings: &Settings,
    url: &DatabaseUrl,
    out: Output,
) -> Result<u8, Failure> {
    let results = match command {
        CheckCommand::Preflight {
            override_check,
            reason,
        } => {
            preflight(
                api,
                target,
                settings,
                url,
                override_check,
                reason.as_deref(),
                true,
            )
            .await?
        }
        CheckCommand::Postflight => {
            let mut spec: PostflightSpec = settings.postflight.clone();
            spec.history = Some(summary(api, target).await?);
            // The verify.sql of every applied migration that has one.
            let set =
                belay_migrate::load(&settings.dir).map_err(belay_migrate::MigrateError::from)?;
            let statuses = api.status(target).await?;
            for m in &set.migrations {
                let applied = statuses.iter().any(|s| {
                    s.version.as_deref() == Some(m.version.as_str()) && s.state == State::Success
                });
                if let (true, Some(v)) = (applied, &m.verify) {
                    spec.verify_scripts
                        .push(VerifyScript::from((v.path.clone(), v.text.clone())));
                }
            }
            let mut conn = sqlx::PgConnection::connect(url.expose())
                .await
                .map_err(|e| Failure {
                    code: exit::UNAVAILABLE,
                    message: format!(
                        "cannot connect to {url}: {}",
                        belay_core::redact_url(&e.to_string())
                    ),
                })?;
            let results = belay_health::postflight(&mut conn, &spec)
                .await
                .map_err(health_err)?;
            let _ = conn.close().await;
            results
        }
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

fn parse_expect(s: &str) -> Result<Expectation, Failure> {
    let bad = || {
        health_err(format!(
            "--expect {s:?}: use no_rows, zero, equals=N or at_most=N"
        ))
    };
    Ok(match s {
        "no_rows" => Expectation::NoRows,
        "zero" => Expectation::Zero,
        other => match other.split_once('=') {
            Some(("equals", n)) => Expectation::Equals(n.trim().parse().map_err(|_| bad())?),
            Some(("at_most", n)) => Expectation::AtMost(n.trim().parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        },
    })
}

fn apply_args(mut spec: ProbeSpec, a: &ProbeArgs) -> Result<ProbeSpec, Failure> {
    let d = |flag: &str, v: &Option<String>| -> Result<Option<std::time::Duration>, Failure> {
        v.as_deref()
            .map(|v| parse_duration(v).map_err(|e| health_err(format!("--{flag}: {e}"))))
            .transpose()
    };
    if let Some(p) = d("period", &a.period)? {
        spec.period = p;
    }
    if let Some(t) = d("timeout", &a.timeout)? {
        spec.timeout = t;
    }
    if let Some(n) = a.failure_threshold {
        spec.failure_threshold = n;
    }
    if let Some(n) = a.success_threshold {
        spec.success_threshold = n;
    }
    Ok(spec)
}

pub fn print_event(out: Output, e: &ProbeEvent) {
    match out {
        Output::Text => println!("{}", e.summary()),
        Output::Json => println!("{}", serde_json::json!(e)),
    }
}

/// Watches `specs` for `window`; exit 4 with the evidence when one crosses its threshold.
pub async fn watch(
    specs: Vec<ProbeSpec>,
    window: std::time::Duration,
    out: Output,
) -> Result<u8, Failure> {
    match belay_health::watch(specs, window, |e| print_event(out, e))
        .await
        .map_err(health_err)?
    {
        WatchOutcome::Healthy { attempts } => {
            if out == Output::Text {
                println!("healthy: {attempts} probe attempt(s), no failure threshold crossed");
            }
            Ok(0)
        }
        WatchOutcome::Triggered(e) => Err(Failure {
            code: exit::PROBE_FAILED,
            message: format!(
                "probe {} crossed its failure threshold ({} consecutive failures): {}",
                e.probe,
                e.consecutive_failures,
                e.summary()
            ),
        }),
    }
}

pub async fn probe(
    command: &ProbeCommand,
    url: Option<&DatabaseUrl>,
    out: Output,
) -> Result<u8, Failure> {
    let (spec, args) = match command {
        ProbeCommand::Http {
            endpoint,
            expect_status,
            json_pointer,
            equals,
            args,
        } => {
            let mut spec = ProbeSpec::http("http", endpoint.clone());
            if let belay_health::ProbeKind::Http(h) = &mut spec.kind {
                h.expect_status = *expect_status;
                h.json_pointer.clone_from(json_pointer);
                h.equals = equals.as_deref().map(|v| {
                    serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.to_string()))
                });
            }
            (spec, args)
        }
        ProbeCommand::Sql {
            query,
            expect,
            args,
        } => {
            let url = url.cloned().ok_or_else(|| {
                health_err(
                    "no database URL: set BELAY_DATABASE_URL (or DATABASE_URL) or pass --url-file",
                )
            })?;
            (
                ProbeSpec::sql("sql", url, query.clone(), parse_expect(expect)?),
                args,
            )
        }
    };
    let spec = apply_args(spec, args)?;
    spec.validate().map_err(health_err)?;
    // Without --for, probe until the threshold is crossed (or Ctrl-C).
    let window = match &args.r#for {
        Some(v) => parse_duration(v).map_err(|e| health_err(format!("--for: {e}")))?,
        None => std::time::Duration::from_secs(60 * 60 * 24 * 365),
    };
    watch(vec![spec], window, out).await
}
