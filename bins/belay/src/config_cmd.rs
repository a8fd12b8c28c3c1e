//! `belay config check` (belay.toml, and agent.toml with `--agent`: validated as the run
//! would read them, then printed with every default filled in) and `belay init` (a
//! commented starter belay.toml).

use crate::cli::{Cli, ConfigCommand, Output};
use crate::settings::{self, Settings};
use crate::{Failure, exit};
use belay_core::format_duration;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

pub fn run(cli: &Cli, command: &ConfigCommand, url_from_argv: bool) -> Result<u8, Failure> {
    match command {
        ConfigCommand::Check { agent } => check(cli, agent.as_deref(), url_from_argv),
    }
}

fn invalid(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::USAGE,
        message: e.to_string(),
    }
}

fn check(cli: &Cli, agent: Option<&Path>, url_from_argv: bool) -> Result<u8, Failure> {
    let (_, source) = settings::load_source(cli).map_err(|e| invalid(format!("{e:#}")))?;
    let settings =
        settings::resolve(cli, url_from_argv, None).map_err(|e| invalid(format!("{e:#}")))?;
    let file = source.as_ref().map(|s| s.path.clone());
    let mut doc = json!({
        "belay_toml": {
            "file": file.as_ref().map(|p| p.display().to_string()),
            "effective": effective(&settings),
        }
    });
    if let Some(path) = agent {
        let (config, targets) = belay_config::agent::load(path).map_err(invalid)?;
        doc["agent_toml"] = json!({
            "file": path.display().to_string(),
            "effective": effective_agent(&config, &targets),
        });
    }
    match cli.output {
        Output::Json => println!("{}", belay_core::redact_url(&doc.to_string())),
        Output::Text => {
            match &file {
                Some(p) => println!("# {}: valid", p.display()),
                None => println!(
                    "# no belay.toml here (and no --config): the defaults below apply; `belay init` writes a starter file"
                ),
            }
            println!(
                "# effective configuration (flags and environment over the file over defaults)"
            );
            println!("{}", toml_text(&doc["belay_toml"]["effective"]));
            if let Some(path) = agent {
                println!("# {}: valid", path.display());
                println!("{}", toml_text(&doc["agent_toml"]["effective"]));
            }
        }
    }
    Ok(0)
}

/// The effective configuration as TOML (keys without a value — "unset" — left out,
/// which TOML cannot spell). URLs redacted.
fn toml_text(v: &Value) -> String {
    fn strip(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Object(m) => Some(Value::Object(
                m.iter()
                    .filter_map(|(k, v)| strip(v).map(|v| (k.clone(), v)))
                    .collect(),
            )),
            Value::Array(a) => Some(Value::Array(a.iter().filter_map(strip).collect())),
            other => Some(other.clone()),
        }
    }
    let stripped = strip(v).unwrap_or(Value::Null);
    let text = toml::to_string_pretty(&stripped)
        .unwrap_or_else(|e| format!("# cannot render: {e}\n{stripped:#}"));
    belay_core::redact_url(&text)
}

fn dur(d: std::time::Duration) -> String {
    format_duration(d)
}

fn effective(s: &Settings) -> Value {
    let e = &s.exec;
    let backup = s
        .backup
        .and_then(|b| clap::ValueEnum::to_possible_value(&b).map(|v| v.get_name().to_string()))
        .unwrap_or_else(|| "full".into());
    let on_failure = match s.deploy.on_failure {
        Some(crate::cli::OnFailureArg::Rollback) => "rollback",
        _ => "stop",
    };
    json!({
        "url": s.url.as_ref().map(|u| u.redacted().to_string()),
        "dir": s.dir.display().to_string(),
        "history_schema": e.history_schema,
        "backup_dir": s.backup_dir.display().to_string(),
        "backup": backup,
        "execution": {
            "lock_timeout": dur(e.lock_timeout),
            "max_attempts": e.max_attempts,
            "max_lock_wait": dur(e.max_lock_wait),
            "statement_timeout": e.statement_timeout.map(dur),
            "concurrent_lock_timeout": dur(e.concurrent_lock_timeout),
            "guarded_lock_timeout": dur(e.guarded_lock_timeout),
            "runner_wait": dur(e.runner_wait),
            "max_blocking": dur(e.max_blocking),
            "lock_guard": s.lock_guard,
        },
        "lint": {
            "small_table_rows": s.small_table.max_rows,
            "small_table_bytes": belay_health::format_bytes(s.small_table.max_bytes),
        },
        "preflight": s.thresholds,
        "postflight": {
            "not_valid_constraints": s.postflight.not_valid_constraints,
            "statement_timeout": dur(s.postflight.statement_timeout),
        },
        "checks": s.postflight.checks,
        "smoke": s.postflight.smoke,
        "probes": s.probes,
        "deploy": {
            "on_failure": on_failure,
            "lock_trip_budget": s.deploy.lock_trip_budget,
            "canary_soak": s.deploy.canary_soak.clone().unwrap_or_else(|| "0s".into()),
            "rollback_scope": match s.deploy.rollback_scope {
                Some(crate::cli::RollbackScopeArg::Deployment) => "deployment",
                _ => "wave",
            },
            "before": s.deploy_hooks.before.as_ref().map(|h| json!({"command": h.command, "timeout": dur(h.timeout)})),
            "after": s.deploy_hooks.after.as_ref().map(|h| json!({"command": h.command, "timeout": dur(h.timeout)})),
        },
        "rollback": {
            "policy": s.rollback.mode,
            "settle": dur(s.rollback.settle),
            "before": s.rollback.before.as_ref().map(|h| json!({"command": h.command, "timeout": dur(h.timeout)})),
            "after": s.rollback.after.as_ref().map(|h| json!({"command": h.command, "timeout": dur(h.timeout)})),
            "on_hook_failure": s.rollback.on_hook_failure,
            "restore_lock_timeout": dur(s.restore_lock_timeout),
            "restore_attempts": s.rollback.restore_attempts,
        },
    })
}

fn effective_agent(
    c: &belay_config::agent::AgentConfig,
    targets: &[belay_config::agent::LoadedTarget],
) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|t| {
            let e = &t.spec.exec;
            let probes: Vec<Value> = t
                .policy
                .probes
                .iter()
                .map(|p| {
                    let check = match &p.check {
                        belay_health::ProbeCheck::Http(h) => json!({ "http": h }),
                        belay_health::ProbeCheck::Sql { query, expect } => {
                            json!({ "sql": { "query": query, "expect": expect } })
                        }
                    };
                    let mut v = json!({
                        "name": p.name,
                        "period": dur(p.period),
                        "timeout": dur(p.timeout),
                        "failure_threshold": p.failure_threshold,
                        "success_threshold": p.success_threshold,
                        "initial_delay": dur(p.initial_delay),
                    });
                    if let (Some(v), Value::Object(c)) = (v.as_object_mut(), check) {
                        v.extend(c);
                    }
                    v
                })
                .collect();
            json!({
                "name": t.spec.name,
                "url": t.spec.url.redacted().to_string(),
                "migrations": t.spec.dir.display().to_string(),
                "environment": t.environment,
                "labels": t.labels,
                "backup_dir": t.backup.as_ref().map(|(d, _)| d.display().to_string()),
                "backup": t.policy.backup_scope,
                "lock_timeout": dur(e.lock_timeout),
                "max_attempts": e.max_attempts,
                "max_lock_wait": dur(e.max_lock_wait),
                "history_schema": e.history_schema,
                "max_blocking": dur(e.max_blocking),
                "lock_guard": t.lock_guard,
                "lint": t.lint,
                "small_table_rows": t.small_table.max_rows,
                "small_table_bytes": belay_health::format_bytes(t.small_table.max_bytes),
                "lock_sample_period": t.lock_sample_period.map(dur).unwrap_or_else(|| "off".into()),
                "preflight": t.policy.thresholds,
                "postflight": {
                    "not_valid_constraints": t.policy.postflight.not_valid_constraints,
                    "statement_timeout": dur(t.policy.postflight.statement_timeout),
                },
                "checks": t.policy.postflight.checks,
                "smoke": t.policy.postflight.smoke,
                "probes": probes,
            })
        })
        .collect();
    json!({
        "name": c.name,
        "controller": c.controller,
        "advertise": c.advertise,
        "token_file": c.token_file.as_ref().map(|p| p.display().to_string()),
        // Checked when the file was loaded; the default when not written.
        "shutdown_grace": dur(
            c.shutdown_grace
                .as_deref()
                .and_then(|g| belay_config::agent::parse_shutdown_grace(g).ok())
                .unwrap_or(belay_config::agent::DEFAULT_SHUTDOWN_GRACE),
        ),
        "tls": c.tls.as_ref().map(|t| json!({
            "ca": t.ca.display().to_string(),
            "cert": t.cert.display().to_string(),
            "key": t.key.display().to_string(),
            "server_name": t.server_name,
        })),
        "targets": targets,
    })
}

/// `belay init`: writes `belay.toml` into `dir` (the global `--dir`, else the current
/// directory), refusing to overwrite one (exit 73: cannot create).
pub fn init(dir: Option<&Path>, out: Output) -> Result<u8, Failure> {
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join("belay.toml");
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Failure {
                code: exit::CANT_CREATE,
                message: format!(
                    "{} already exists; belay init does not overwrite it: `belay config check --config {}` shows what it sets",
                    path.display(),
                    path.display()
                ),
            });
        }
        Err(e) => {
            return Err(Failure {
                code: exit::CANT_CREATE,
                message: format!("cannot create {}: {e}", path.display()),
            });
        }
    };
    std::io::Write::write_all(&mut file, STARTER.as_bytes()).map_err(|e| Failure {
        code: exit::CANT_CREATE,
        message: format!("cannot write {}: {e}", path.display()),
    })?;
    crate::render::message(
        out,
        &format!(
            "wrote {}: every setting is commented out at its default; `belay config check` shows the effective configuration",
            path.display()
        ),
    );
    Ok(0)
}

/// The starter belay.toml: every section, each key commented out at its default (or with
/// an example where there is no default), so that it is valid as written.
pub const STARTER: &str = include_str!("starter.toml");
