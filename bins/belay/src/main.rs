//! `belay`, the command-line interface. Thin: parse flags, resolve configuration, call
//! the migration engine, print. Local mode runs the engine in-process against `--url`;
//! remote mode (`--controller`) calls the same APIs through the controller.

mod adopt_cmd;
mod backfill_cmd;
mod backup_cmd;
mod cli;
mod config_cmd;
mod deploy_cmd;
mod health_cmd;
mod history_cmd;
mod lint_cmd;
mod locks_cmd;
mod pipe_guard;
mod remote;
mod render;
mod rollback_cmd;
mod settings;

use anyhow::anyhow;
use belay_migrate::{
    ApiError, ApplyOptions, ErrorKind, LocalTargets, MigrateError, MigrationApi, Target,
    TargetSpec, UndoTarget,
};
use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
use cli::{Cli, Command, Output};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

pub(crate) mod exit {
    pub const FAILED: u8 = 1;
    pub const REFUSED: u8 = 2;
    pub const BUSY: u8 = 3;
    pub const PROBE_FAILED: u8 = 4;
    /// The deployment failed after migrating: a postflight check blocked, or the lock
    /// guard tripped more often than `lock_trip_budget`; the migrations stay applied.
    pub const DEPLOY_FAILED: u8 = 5;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    /// The backup (or other object) does not exist (sysexits EX_NOINPUT).
    pub const NOT_FOUND: u8 = 66;
    /// Out of disk space or over the size budget (sysexits EX_CANTCREAT).
    pub const NO_SPACE: u8 = 73;
    /// `init`: the file exists, or cannot be created (sysexits EX_CANTCREAT).
    pub const CANT_CREATE: u8 = 73;
    pub const UNAVAILABLE: u8 = 69;
    pub const NOPERM: u8 = 77;
    pub const SOFTWARE: u8 = 70;
}

/// An error and the exit code it deserves.
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let code = match e.kind {
            ErrorKind::InvalidSource => exit::DATA,
            ErrorKind::Unavailable | ErrorKind::AgentUnreachable => exit::UNAVAILABLE,
            ErrorKind::MigrationFailed => exit::FAILED,
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::Busy => exit::BUSY,
            ErrorKind::Internal => exit::SOFTWARE,
            ErrorKind::UnknownTarget => exit::USAGE,
            ErrorKind::Unauthenticated => exit::NOPERM,
            ErrorKind::InvalidArgument => exit::USAGE,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::OutOfSpace => exit::NO_SPACE,
        };
        Failure {
            code,
            message: e.message,
        }
    }
}

impl From<MigrateError> for Failure {
    fn from(e: MigrateError) -> Self {
        ApiError::from(e).into()
    }
}

fn usage(e: anyhow::Error) -> Failure {
    Failure {
        code: exit::USAGE,
        message: format!("{e:#}"),
    }
}

fn main() -> ExitCode {
    // Output to a reader that goes away (`belay status | head`) is dropped; the work goes
    // on and the exit code is its own (see pipe_guard).
    let guard = pipe_guard::install();
    let code = std::panic::catch_unwind(belay_main);
    guard.finish();
    // A panic is an internal error, whatever Rust would exit with.
    code.unwrap_or(ExitCode::from(exit::SOFTWARE))
}

fn belay_main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let url_from_argv = matches.value_source("url") == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    let format = belay_telemetry::LogFormat::Text;
    if let Err(e) = belay_telemetry::init(format, "warn") {
        eprintln!("error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let output = cli.output;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    match runtime.block_on(run(cli, url_from_argv)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let message = belay_core::redact_url(&f.message);
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({ "error": message, "exit_code": f.code })
                );
            }
            eprintln!("error: {message}");
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli, url_from_argv: bool) -> Result<u8, Failure> {
    // adopt runs no migration: of the execution settings, only the runner wait is its.
    let adopt_exec = match &cli.command {
        Command::Adopt { runner_wait, .. } => Some(cli::ExecArgs {
            runner_wait: runner_wait.clone(),
            ..cli::ExecArgs::default()
        }),
        _ => None,
    };
    let exec_args = match &cli.command {
        Command::Migrate { exec, .. }
        | Command::Undo { exec, .. }
        | Command::Repair { exec, .. }
        | Command::Baseline { exec, .. } => Some(exec),
        _ => adopt_exec.as_ref(),
    };
    // Configuration files are local, whatever the mode.
    match &cli.command {
        Command::Config { command } => return config_cmd::run(&cli, command, url_from_argv),
        Command::Init => return config_cmd::init(cli.dir.as_deref(), cli.output),
        _ => {}
    }
    if cli.controller.is_some()
        && let Some(f) = backup_cmd::remote_unsupported(&cli.command)
    {
        return Err(f);
    }
    // Lint reads local files, and the local database's facts when a URL is configured:
    // the same in both modes.
    if let Command::Lint {
        paths,
        format,
        offline,
    } = &cli.command
    {
        let settings = settings::resolve(&cli, url_from_argv, None).map_err(usage)?;
        let url = settings.url.as_ref().filter(|_| !*offline);
        return lint_cmd::run(
            paths,
            *format,
            &settings.dir,
            cli.output,
            url,
            settings.small_table,
        )
        .await;
    }
    if cli.controller.is_some() && matches!(cli.command, Command::Adopt { .. }) {
        return Err(adopt_cmd::remote_unsupported());
    }
    if cli.controller.is_some() && matches!(cli.command, Command::History { .. }) {
        return Err(history_cmd::remote_unsupported());
    }
    if let Some(addr) = cli.controller.clone() {
        let token = read_token(cli.token_file.as_deref())?;
        let tls = match &cli.ca {
            Some(ca) => Some(
                belay_auth::client_tls_ca_only(ca, &cli.tls_server_name)
                    .map_err(|e| usage(anyhow!("{e}")))?,
            ),
            None => None,
        };
        let conn = belay_rpc::Connection::new(
            &addr,
            tls,
            token.as_deref(),
            format!("controller at {addr}"),
        )?;
        // `deploy` takes belay.toml's `[deploy]` (failure action, lock-trip budget), as
        // `migrate` does.
        let file_deploy = if matches!(cli.command, Command::Deploy { .. }) {
            settings::load_file(&cli).map_err(usage)?.deploy
        } else {
            settings::FileDeploy::default()
        };
        if let Some(result) =
            remote::fleet_command(&conn, &cli.command, cli.output, &file_deploy).await
        {
            return result;
        }
        if let Command::Rollback { command } = &cli.command
            && cli.target.is_none()
            && let Some(result) = remote::rollback_deployment(&conn, command, cli.output).await
        {
            return result;
        }
        let target = remote::remote_target(cli.target.as_deref())?.to_string();
        if let Command::Rollback { command } = &cli.command {
            // Through the controller to the target's agent, which plans and runs it
            // beside the database; the same commands, output and exit codes as local.
            let api = belay_rpc::RollbackClient::new(&conn);
            return rollback_cmd::run(command, &api, &target, cli.output).await;
        }
        if let Command::Backfill { args } = &cli.command {
            // Run by the target's agent beside the database, under its connection budget
            // and on its /metrics; the same output and exit codes as local mode.
            let api = belay_rpc::BackfillClient::new(&conn);
            return backfill_cmd::remote(&cli, args, &api, &target).await;
        }
        if let Command::Backup { command } = &cli.command {
            let api = belay_rpc::BackupClient::new(&conn);
            return backup_cmd::run(command, &api, &target, cli.output).await;
        }
        if let Some(result) = health_cmd::remote(&cli, url_from_argv, &conn, &target).await {
            return result;
        }
        if let Command::Migrate {
            checks,
            target: t,
            release,
            ..
        } = &cli.command
        {
            // The same pipeline as local mode, run by the target's agent
            // (`DeployService.DeployTarget` through the controller, which records it): the
            // scripts, the lint gate, the checks and the probes are there.
            let settings = settings::resolve(&cli, url_from_argv, None).map_err(usage)?;
            let asked = remote::migrate_policy(&cli, &settings, checks)?;
            return deploy_cmd::migrate_remote(
                &belay_rpc::DeployClient::new(&conn),
                &target,
                t,
                asked,
                release.clone(),
                cli.output,
            )
            .await;
        }
        let api = belay_rpc::MigrationClient::new(&conn);
        return execute(&api, &target, cli.command, cli.output).await;
    }
    if let Some(f) = remote::needs_controller(&cli.command) {
        return Err(f);
    }
    // Backfills need no migrations directory: handled before the files are loaded.
    if let Command::Backfill { args } = &cli.command {
        return backfill_cmd::run(&cli, args, url_from_argv).await;
    }
    let settings = settings::resolve(&cli, url_from_argv, exec_args).map_err(usage)?;
    if let Command::Probe { command } = &cli.command {
        return health_cmd::probe_local(command, &settings, cli.output).await;
    }
    if settings.url_from_argv_with_password {
        eprintln!(
            "warning: the database password is on the command line, where other users can read it; use BELAY_DATABASE_URL, --url-file or a .pgpass file"
        );
    }
    let url = settings.url.clone().ok_or_else(|| {
        usage(anyhow!(
            "no database URL: set BELAY_DATABASE_URL (or DATABASE_URL), pass --url-file, or set `url_file` in belay.toml"
        ))
    })?;
    if let Command::Backup { command } = &cli.command {
        let api = backup_cmd::local(&settings, &url);
        let target = backup_cmd::target_name(&url);
        return backup_cmd::run(command, &api, &target, cli.output).await;
    }
    if let Command::Locks { args } = &cli.command {
        return locks_cmd::run_local(args, &url, cli.output).await;
    }
    // The deployment log is in the database: no migration files needed.
    let schema = &settings.exec.history_schema;
    if let Command::History { limit } = &cli.command {
        return history_cmd::history(&url, schema, *limit, cli.target.as_deref(), cli.output).await;
    }
    if let Command::Rollback { command } = &cli.command {
        let api = belay_rollback::LocalRollbacks::new().with_target(
            LOCAL_TARGET,
            rollback_cmd::local(&settings, &url, LOCAL_TARGET, cli.output)?,
        );
        return rollback_cmd::run(command, &api, LOCAL_TARGET, cli.output).await;
    }
    if let Command::Deployments { command } = &cli.command {
        return history_cmd::deployments(
            &url,
            schema,
            command.as_ref(),
            cli.target.as_deref(),
            cli.output,
        )
        .await;
    }
    // Files are checked before anything else touches the database.
    let set = belay_migrate::load(&settings.dir).map_err(MigrateError::from)?;
    // `plan` lists the set's warnings and `migrate`/`undo` emit them as events; every
    // other command would drop them, so they go to stderr here.
    if !matches!(
        cli.command,
        Command::Plan { sql: false, .. } | Command::Migrate { .. } | Command::Undo { .. }
    ) {
        for w in &set.warnings {
            eprintln!("warning: {w}");
        }
    }
    if let Command::Adopt { from, dry_run, .. } = &cli.command {
        return adopt_cmd::run(*from, *dry_run, set, &settings, &url, cli.output).await;
    }
    let set = Arc::new(set);
    let backup_hook = backup_cmd::hook_for(&cli.command, &settings, &url);
    // The files as read above, for every call of this command: what it checked and
    // planned is what it runs, and the directory is read once; the plan's session is the
    // run's.
    let api = LocalTargets::new([TargetSpec {
        name: LOCAL_TARGET.to_string(),
        url: url.clone(),
        dir: settings.dir.clone(),
        exec: settings.exec.clone(),
    }])
    .with_files(LOCAL_TARGET, set.clone())
    .reusing_sessions();
    let api = match backup_hook {
        Some(hook) => api.with_backup_hook(LOCAL_TARGET, hook),
        None => api,
    };
    let api = if settings.lock_guard {
        api.with_lock_guard(
            LOCAL_TARGET,
            Arc::new(belay_guards::LockGuardAdapter::new(url.clone())),
        )
    } else {
        api
    };
    if let Command::Check { command } = &cli.command {
        let health = health_cmd::local_health(&api, LOCAL_TARGET, &settings, Some(&url));
        return health_cmd::check(command, &health, LOCAL_TARGET, &settings, cli.output).await;
    }
    if let Command::Plan { sql: false, target } = &cli.command {
        return lint_cmd::plan(
            &api,
            LOCAL_TARGET,
            &set,
            target,
            cli.output,
            &url,
            settings.small_table,
        )
        .await;
    }
    if let Command::Migrate {
        checks,
        target,
        backup,
        release,
        ..
    } = &cli.command
    {
        // The lint gate runs in the executor, under the runner lock, over exactly the
        // scripts about to run — as on the agent.
        let api = if checks.no_lint {
            eprintln!("warning: --no-lint: migrating without linting the pending scripts");
            api
        } else {
            api.with_script_gate(
                LOCAL_TARGET,
                Arc::new(
                    belay_guards::LintGate::new("--no-lint skips linting entirely")
                        .with_small_table(settings.small_table),
                ),
            )
        };
        let scope = backup
            .or(settings.backup)
            .unwrap_or(backup_cmd::BackupMode::Full);
        let scope = clap::ValueEnum::to_possible_value(&scope).map(|v| v.get_name().to_string());
        let policy = deploy_cmd::policy(&settings, checks, scope)?;
        let health = deploy_cmd::LocalHealth {
            checks: health_cmd::local_health(&api, LOCAL_TARGET, &settings, Some(&url)),
            probes: settings.probes.clone(),
        };
        let pipeline = belay_deploy::Pipeline::new(
            Arc::new(api),
            Arc::new(health),
            deploy_cmd::local_log(&url, &settings)?,
        );
        // `on_failure = rollback`: the rollback controller, on its own executor (undo
        // snapshots the tables it drops data of, restores bound their lock waits).
        let slot: deploy_cmd::RollbackSlot = Arc::default();
        let pipeline = if policy.on_failure == belay_deploy::OnFailure::Rollback {
            let rollback = rollback_cmd::local(&settings, &url, LOCAL_TARGET, cli.output)?;
            pipeline.with_failure_handler(Arc::new(rollback_cmd::handler(
                rollback,
                cli.output,
                slot.clone(),
                rollback_cmd::local_command_args(&cli, &settings, &url),
            )))
        } else {
            pipeline
        };
        let catalog = belay_deploy::AppliedMigration::catalog(&set);
        return deploy_cmd::migrate(
            &pipeline,
            LOCAL_TARGET,
            target,
            policy,
            deploy_cmd::RecordArgs {
                catalog: Some(catalog),
                release: release.clone(),
                rollback: Some(slot),
            },
            cli.output,
            deploy_cmd::LintNotes::Stderr,
        )
        .await;
    }
    execute(&api, LOCAL_TARGET, cli.command, cli.output).await
}

/// The bearer token for the controller: `--token-file`, else `BELAY_TOKEN`.
fn read_token(file: Option<&std::path::Path>) -> Result<Option<String>, Failure> {
    belay_auth::read_secret(belay_auth::TOKEN_ENV, file)
        .map(|t| t.map(|t| t.expose().to_string()))
        .map_err(|e| usage(anyhow!("{e}")))
}

/// The name of the one target of local mode.
const LOCAL_TARGET: &str = "local";

/// Runs one command against `target` through the migration API, local or remote alike,
/// so both modes print the same thing. `migrate` goes through the deployment pipeline
/// (`deploy_cmd`) instead; here it is a bare run, for completeness.
async fn execute(
    api: &dyn MigrationApi,
    target_name: &str,
    command: Command,
    out: Output,
) -> Result<u8, Failure> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = render::sink(out, events.clone());
    match command {
        Command::Plan { sql, target: t } => {
            let target = Target {
                to: t.to,
                steps: t.steps,
            };
            let plan = api.plan(target_name, &target, sql).await?;
            match (&plan.sql, sql) {
                (Some(text), true) => print!("{text}"),
                _ => render::plan(out, &plan),
            }
            Ok(0)
        }
        Command::Migrate { target: t, .. } => {
            let target = Target {
                to: t.to,
                steps: t.steps,
            };
            let options = ApplyOptions::default();
            let result = api.apply(target_name, &target, &options, sink).await;
            render::run_report(out, "migrate", &result, &events);
            result.map(|_| 0).map_err(Failure::from)
        }
        Command::Undo { to, steps, all, .. } => {
            let target = match (to, steps, all) {
                (Some(v), _, _) => UndoTarget::To(v),
                (_, Some(n), _) => UndoTarget::Steps(n),
                (_, _, true) => UndoTarget::All,
                _ => UndoTarget::Steps(1),
            };
            let result = api.undo(target_name, &target, None, sink).await;
            render::run_report(out, "undo", &result, &events);
            result.map(|_| 0).map_err(Failure::from)
        }
        Command::Status => {
            let statuses = api.status(target_name).await?;
            render::status(out, &statuses);
            Ok(0)
        }
        Command::Validate => {
            let v = api.validate(target_name).await?;
            render::validate(out, &v.problems, v.checked);
            Ok(if v.problems.is_empty() {
                0
            } else {
                exit::REFUSED
            })
        }
        Command::Repair {
            version,
            checksums_only,
            failed_only,
            ..
        } => {
            let scope = belay_migrate::RepairScope {
                version,
                checksums_only,
                failed_only,
            };
            let actions = api.repair(target_name, &scope).await?;
            render::repair(out, &actions);
            Ok(0)
        }
        Command::Backup { .. } => Err(Failure {
            code: exit::SOFTWARE,
            message: "backup commands go through the backup API, not the migration API".into(),
        }),
        Command::Backfill { .. } => Err(Failure {
            code: exit::SOFTWARE,
            message: "backfill is handled before the migration API".into(),
        }),
        Command::Adopt { .. } => Err(adopt_cmd::remote_unsupported()),
        Command::Lint { .. } => Err(Failure {
            code: exit::USAGE,
            message: "lint reads local files; it does not go through the migration API".into(),
        }),
        Command::Locks { .. } | Command::Check { .. } | Command::Probe { .. } => Err(Failure {
            code: exit::USAGE,
            message: "locks, check and probe go through the lock monitor and health APIs, not the migration API".into(),
        }),
        Command::History { .. } => Err(history_cmd::remote_unsupported()),
        Command::Config { .. } | Command::Init => Err(Failure {
            code: exit::SOFTWARE,
            message: "config and init are handled before the migration API".into(),
        }),
        Command::Rollback { .. } => Err(Failure {
            code: exit::USAGE,
            message: "rollback is handled before the migration API".into(),
        }),
        Command::Deploy { .. } | Command::Deployments { .. } | Command::Agents => {
            Err(remote::needs_controller(&command).unwrap_or(Failure {
                code: exit::USAGE,
                message: "needs --controller".into(),
            }))
        }
        Command::Baseline {
            version,
            description,
            ..
        } => {
            api.baseline(target_name, &version, &description).await?;
            render::message(out, &format!("baselined at version {version}"));
            Ok(0)
        }
    }
}
