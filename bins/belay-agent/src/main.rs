//! `belay-agent`: runs beside each database and serves its targets over gRPC.
//!
//! Thin by design: parse arguments, start telemetry, bind, serve, stop on a
//! signal. Behaviour lives in the capability crates; the agent serves its targets'
//! migration, deploy, backup, lock-monitor, health, rollback and backfill services, and
//! `grpc.health.v1`.

use std::net::SocketAddr;
use std::process::ExitCode;

mod backups;
mod budget;
use belay_config::agent as config;
mod monitor;
mod register;
mod rollbacks;
mod sampler;

use belay_migrate::LocalTargets;
use belay_proto::v1 as pb;
use belay_telemetry::LogFormat;
use clap::Parser as _;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

const BIN: &str = "belay-agent";
const DEFAULT_LISTEN: &str = "127.0.0.1:7401";
const LISTEN_ENV: &str = "BELAY_AGENT_LISTEN";
const DEFAULT_LOG_FILTER: &str = "info";

/// Services this process serves: their health is reported ("" is the whole server, as
/// the gRPC health protocol defines it) and reflection advertises them, and only them.
const HEALTH_SERVICES: [&str; 8] = [
    "",
    belay_proto::v1::migration_service_server::SERVICE_NAME,
    belay_proto::v1::deploy_service_server::SERVICE_NAME,
    belay_proto::v1::lock_monitor_service_server::SERVICE_NAME,
    belay_proto::v1::health_service_server::SERVICE_NAME,
    belay_proto::v1::backup_service_server::SERVICE_NAME,
    belay_proto::v1::rollback_service_server::SERVICE_NAME,
    belay_proto::v1::backfill_service_server::SERVICE_NAME,
];

use belay_rpc::daemon::exit;

/// What a stop takes beyond its grace at most: cancelling the work still in flight and
/// recording each cancelled deployment beside its target. The unit's `TimeoutStopSec`
/// must exceed the grace plus this plus a margin (a test reads the shipped unit).
const RECORD_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   stopped cleanly after SIGTERM or SIGINT (also after --help and --version)
  64  bad usage: unknown or malformed arguments, an invalid --listen address,
      an invalid BELAY_LOG filter
  69  the listen address is unavailable: in use, not local, or not permitted
  70  internal error while serving

Environment:
  BELAY_LOG  log filter, e.g. `info` or `info,belay_migrate=debug`";

/// The belay agent: runs migrations, backups, lock monitoring and health checks
/// for the databases on this host, and serves them over gRPC.
#[derive(Debug, clap::Parser)]
#[command(name = BIN, version, after_help = EXIT_CODES_HELP)]
struct Args {
    /// Address to serve gRPC on, as IP:PORT (port 0 picks a free port; the
    /// bound address is printed to stdout as `listening on ADDR`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, env = LISTEN_ENV, value_parser = parse_listen)]
    listen: SocketAddr,

    /// Agent configuration: its name, controller, and the targets it owns
    #[arg(long, value_name = "PATH", env = "BELAY_AGENT_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// Also serve grpc.health.v1, and only it, in plaintext on ADDR: for probes that
    /// cannot speak TLS (the kubelet's `grpc:` probe); off when not given
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    health_listen: Option<SocketAddr>,

    /// Serve Prometheus metrics on ADDR (GET /metrics); off when not given
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    metrics_listen: Option<SocketAddr>,

    /// Export traces to this OpenTelemetry collector (OTLP/gRPC, http://host:4317); an
    /// unreachable collector never blocks or stops the daemon
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// How long a stop (SIGTERM) lets deployments, rollbacks, runs, backups and restores
    /// in flight finish, from the signal on; then they are cancelled and each deployment
    /// recorded failed at its step [default: `shutdown_grace` in agent.toml, else 20s].
    /// Keep it 15 s or more below the unit's TimeoutStopSec
    #[arg(long, value_name = "DURATION", value_parser = config::parse_shutdown_grace)]
    shutdown_grace: Option<std::time::Duration>,

    /// Log format on stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, env = belay_telemetry::LOG_FORMAT_ENV)]
    log_format: LogFormat,
}

fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    belay_rpc::daemon::parse_listen(value, DEFAULT_LISTEN)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            // Help and version go to stdout and are not errors.
            let code = if err.use_stderr() { exit::USAGE } else { 0 };
            // Nothing useful is left to do if stderr/stdout is gone.
            let _ = err.print();
            return ExitCode::from(code);
        }
    };

    let (format, otlp, listen) = (args.log_format, args.otlp_endpoint.clone(), args.listen);
    belay_rpc::daemon::run(
        BIN,
        format,
        DEFAULT_LOG_FILTER,
        otlp.as_deref(),
        listen,
        || serve(args),
    )
}

async fn serve(args: Args) -> ExitCode {
    // Register signal handlers before announcing the address: a supervisor (or
    // test) may send SIGTERM as soon as it reads the line, and the default
    // action would kill us without a clean shutdown.
    let mut signals = match belay_rpc::daemon::StopSignals::new() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("{BIN}: error: cannot install signal handlers: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };

    let (agent_config, targets) = match &args.config {
        Some(path) => match config::load(path) {
            Ok(loaded) => {
                if let Err(err) = budget::check(&loaded.0.limits, &loaded.1) {
                    eprintln!("{BIN}: error: agent config {}: {err}", path.display());
                    return ExitCode::from(exit::USAGE);
                }
                loaded
            }
            Err(err) => {
                eprintln!("{BIN}: error: {err:#}");
                return ExitCode::from(exit::USAGE);
            }
        },
        None => (
            config::AgentConfig {
                name: None,
                controller: None,
                advertise: None,
                token_file: None,
                tls: None,
                shutdown_grace: None,
                lock_sample_period: None,
                limits: config::Limits::default(),
                targets: Vec::new(),
            },
            Vec::new(),
        ),
    };
    let grace = match (args.shutdown_grace, &agent_config.shutdown_grace) {
        (Some(g), _) => g,
        (None, Some(text)) => match config::parse_shutdown_grace(text) {
            Ok(g) => g,
            Err(err) => {
                eprintln!("{BIN}: error: agent config: shutdown_grace: {err}");
                return ExitCode::from(exit::USAGE);
            }
        },
        (None, None) => config::DEFAULT_SHUTDOWN_GRACE,
    };
    let registration_targets: Vec<pb::TargetInfo> = targets
        .iter()
        .map(|t| pb::TargetInfo {
            name: t.spec.name.clone(),
            environment: t.environment.clone().unwrap_or_default(),
            labels: t.labels.clone().into_iter().collect(),
        })
        .collect();
    let token =
        match belay_auth::read_secret(belay_auth::TOKEN_ENV, agent_config.token_file.as_deref()) {
            Ok(t) => t,
            Err(err) => {
                eprintln!("{BIN}: error: {err}");
                return ExitCode::from(exit::USAGE);
            }
        };
    let (server_tls, controller_tls) = match &agent_config.tls {
        Some(t) => {
            let files = belay_auth::TlsFiles {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            };
            // Only the controller calls agents: it must present a certificate.
            match (
                belay_auth::server_tls(&files),
                belay_auth::client_tls(&files, &t.server_name),
            ) {
                (Ok(s), Ok(c)) => (Some(s), Some(c)),
                (Err(err), _) | (_, Err(err)) => {
                    eprintln!("{BIN}: error: {err}");
                    return ExitCode::from(exit::USAGE);
                }
            }
        }
        None => (None, None),
    };
    let check = belay_auth::MaybeTokenCheck(token.clone().map(belay_auth::TokenCheck::new));
    let backups: Vec<(
        String,
        belay_core::DatabaseUrl,
        std::path::PathBuf,
        belay_guards::BackupMode,
    )> = targets
        .iter()
        .filter_map(|t| {
            t.backup
                .clone()
                .map(|(dir, mode)| (t.spec.name.clone(), t.spec.url.clone(), dir, mode))
        })
        .collect();
    // Every connection the agent opens is counted against its budget per server.
    let budget = budget::Budget::new(
        belay_core::ConnectionBudget::new(agent_config.limits.connections_per_server()),
        &targets,
    );
    let (lock_monitor, health_checks, health) = monitor::services(&targets, &budget);
    // What fleet deployments judge each target by (agent.toml), and where each records
    // its deployments: the target's own history schema, as local `migrate` does.
    let policies: Vec<(String, belay_deploy::TargetPolicy)> = targets
        .iter()
        .map(|t| (t.spec.name.clone(), t.policy.clone()))
        .collect();
    let log_targets: std::collections::BTreeMap<String, (belay_core::DatabaseUrl, String)> =
        targets
            .iter()
            .map(|t| {
                (
                    t.spec.name.clone(),
                    (t.spec.url.clone(), t.spec.exec.history_schema.clone()),
                )
            })
            .collect();
    let migration_dirs: std::collections::BTreeMap<String, std::path::PathBuf> = targets
        .iter()
        .map(|t| (t.spec.name.clone(), t.spec.dir.clone()))
        .collect();
    let lock_samples = sampler::plan(&targets);
    // Backfills run here, beside each target's database: they outlive the operator's
    // session, take their connection from the budget, and are exported on /metrics.
    let backfills = targets
        .iter()
        .fold(belay_backfill::LocalBackfills::new(), |b, t| {
            let e = &t.spec.exec;
            let defaults = belay_backfill::Limits::default();
            b.with_target(
                t.spec.name.clone(),
                t.spec.url.clone(),
                e.history_schema.clone(),
                belay_backfill::Limits {
                    lock_timeout: e.lock_timeout,
                    statement_timeout: e.statement_timeout.unwrap_or(defaults.statement_timeout),
                    max_attempts: e.max_attempts,
                    max_lock_wait: e.max_lock_wait,
                    backoff_initial: e.backoff_initial,
                    backoff_max: e.backoff_max,
                },
            )
        });
    let stop_backfills = backfills.clone();
    let backfill_service = belay_rpc::BackfillGrpc::new(Arc::new(budget::Backfills {
        inner: Arc::new(backfills),
        budget: budget.clone(),
    }));
    let metric_series: Vec<_> = targets.iter().map(backups::metric_series).collect();
    let backup_service = belay_rpc::BackupGrpc::new(Arc::new(budget::Backups {
        inner: Arc::new(backups::service(&targets, args.config.as_deref())),
        budget: budget.clone(),
    }));
    // The lock guard watches every target's migrations unless its config says not to.
    let guarded: Vec<(String, belay_core::DatabaseUrl)> = targets
        .iter()
        .filter(|t| t.lock_guard)
        .map(|t| (t.spec.name.clone(), t.spec.url.clone()))
        .collect();
    // The lint gate refuses scripts with unallowed `error` findings, however the run
    // was started (remote CLI, fleet deployment), unless the target's config says not to.
    let linted: Vec<(String, belay_lint::SmallTable)> = targets
        .iter()
        .filter(|t| t.lint)
        .map(|t| (t.spec.name.clone(), t.small_table))
        .collect();
    let mut local = LocalTargets::new(targets.iter().map(|t| t.spec.clone()));
    for (name, small_table) in linted {
        let lint_gate = belay_guards::LintGate::new(
            "to deploy this target without linting, set `lint = false` for it in the agent's agent.toml",
        )
        .with_small_table(small_table);
        local = local.with_script_gate(&name, Arc::new(lint_gate));
    }
    for (name, url) in guarded {
        let mut guard = belay_guards::LockGuardAdapter::new(url);
        // The guard's polls feed the target's lock gauges, when they are exported.
        if args.metrics_listen.is_some()
            && let Some(s) = lock_samples.iter().find(|s| s.name() == name)
        {
            guard = guard.with_observer(s.observer());
        }
        local = local.with_lock_guard(&name, Arc::new(guard));
    }
    for (name, url, dir, mode) in backups {
        let target = name.clone();
        let guard = belay_guards::BackupGuard::new(
            belay_backup::BackupManager::new(dir),
            url,
            name.clone(),
            mode,
        )
        // A remote undo takes the same pre-undo snapshot as local `belay undo` does.
        .with_undo_mode(belay_guards::BackupMode::default_for_undo(mode))
        .with_notify(Arc::new(
            move |m: &str| tracing::info!(target = %target, "{m}"),
        ));
        local = local.with_backup_hook(&name, Arc::new(guard));
    }
    // Counted in the migration metrics here, where the executor runs: runs served over
    // `Apply` and each deployment pipeline's alike.
    let local: Arc<dyn belay_migrate::MigrationApi> =
        Arc::new(belay_rpc::server::Metered(Arc::new(budget::Migrations {
            inner: Arc::new(local),
            budget: budget.clone(),
        })));
    let migration_service = belay_rpc::MigrationGrpc::new(local.clone());
    let log_for: belay_deploy::LogFor = Arc::new(move |name: &str| {
        let (url, schema) = log_targets.get(name).ok_or_else(|| {
            belay_core::ApiError::new(
                belay_core::ErrorKind::UnknownTarget,
                format!("unknown target {name:?}"),
            )
        })?;
        let log = belay_guards::HistoryDeploymentLog::new(url.clone(), schema).map_err(|e| {
            belay_core::ApiError::new(belay_core::ErrorKind::Internal, e.to_string())
        })?;
        Ok(Arc::new(log) as Arc<dyn belay_deploy::DeploymentLog>)
    });
    // Each fleet deployment's target runs the same pipeline as local `migrate`, over the
    // same guarded executor (lint gate, lock guard, backup hook) and health checker.
    let target_names: Vec<String> = policies.iter().map(|(n, _)| n.clone()).collect();
    // The rollback controller of each target, over the same executor and health checker:
    // served as `RollbackService`, and the failure handler of its deployments.
    let rollbacks = match rollbacks::local(&targets, local.clone(), health.clone()) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::USAGE);
        }
    };
    drop(targets);
    let deployer = Arc::new(
        belay_deploy::PipelineDeployer::new(local, health, log_for, policies)
            // The files are here: read for the record as local `migrate` reads them (the
            // executor reads them again for the run, and a script changed in between is
            // asked of the migration API).
            .with_catalogs(Arc::new(move |name: &str| {
                let set = belay_migrate::load(migration_dirs.get(name)?).ok()?;
                Some(belay_deploy::AppliedMigration::catalog(&set))
            }))
            .with_failure_handlers(rollbacks::handlers(
                rollbacks.clone(),
                agent_config.controller.clone(),
            )),
    );
    // Operators' and the controller's rollbacks take their connections from the budget
    // (a pipeline's rollback runs within its deployment's reservation).
    let rollback_service = belay_rpc::RollbackGrpc::new(Arc::new(budget::Rollbacks {
        inner: Arc::new(rollbacks),
        budget: budget.clone(),
    }));
    // A deployment an earlier process of this agent did not live to finish is settled in
    // its target's log (failed at the step it was in), so none is left running there.
    // In the background: a target whose database is down must not keep the agent from
    // serving the others; the controller's question settles it later anyway.
    {
        let (deployer, budget) = (deployer.clone(), budget.clone());
        tokio::spawn(async move {
            for name in target_names {
                let settled = budget.within(&name, |_| 2, "settling", deployer.settle(&name));
                match settled.await {
                    Ok(ids) if !ids.is_empty() => {
                        tracing::warn!(target = %name, settled = ids.len(), "settled deployments an earlier agent process left unfinished")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(target = %name, error = %e, "cannot settle this target's unfinished deployments now; they are settled when the controller asks")
                    }
                }
            }
        });
    }
    let stop_deployer = deployer.clone();
    let deploy_service = belay_rpc::DeployGrpc::new(Arc::new(budget::Deploys {
        inner: deployer,
        budget: budget.clone(),
    }));

    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "{BIN}: error: cannot listen on {}: {err}; pick another address with --listen",
                args.listen
            );
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let local_addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!(
                "{BIN}: error: cannot read the bound address of {}: {err}",
                args.listen
            );
            return ExitCode::from(exit::SOFTWARE);
        }
    };

    if let Some(addr) = args.metrics_listen {
        if let Err(err) = belay_rpc::daemon::serve_metrics(addr).await {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
        // Every series whose labels are known, from start-up.
        belay_telemetry::init_process_series(belay_telemetry::Exposer::Agent);
        for series in &metric_series {
            belay_telemetry::init_target_series(series);
        }
    }
    // The gauges are read through /metrics only: without it, sampling would be load for
    // nothing.
    let sampler = sampler::Sampler::start(
        if args.metrics_listen.is_some() {
            lock_samples
        } else {
            Vec::new()
        },
        &budget,
    );
    let stop_sampling = sampler.stopper();
    let reflection = match belay_rpc::daemon::reflection(&HEALTH_SERVICES) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };

    let (reporter, health_service) = tonic_health::server::health_reporter();
    if let Some(addr) = args.health_listen {
        match belay_rpc::daemon::serve_health(addr, "--health-listen", health_service.clone()).await
        {
            Ok(bound) => tracing::info!(addr = %bound, "serving grpc.health.v1 in plaintext"),
            Err(err) => {
                eprintln!("{BIN}: error: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        }
    }
    belay_rpc::daemon::set_health(&reporter, &HEALTH_SERVICES, ServingStatus::Serving).await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(controller) = &agent_config.controller {
        let name = agent_config.name.clone().unwrap_or_else(default_name);
        let advertise = agent_config
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string());
        match belay_rpc::Connection::new(
            controller,
            controller_tls,
            token.as_ref().map(belay_auth::Secret::expose),
            format!("controller at {controller}"),
        ) {
            Ok(conn) => {
                tokio::spawn(register::run(
                    conn,
                    pb::RegisterAgentRequest {
                        name,
                        address: advertise,
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        targets: registration_targets,
                    },
                ));
            }
            Err(err) => {
                eprintln!("{BIN}: error: {err}");
                return ExitCode::from(exit::USAGE);
            }
        }
    }

    let mut builder = belay_rpc::daemon::server(belay_rpc::Keepalive::default());
    if let Some(tls) = server_tls {
        builder = match builder.tls_config(tls) {
            Ok(b) => b,
            Err(err) => {
                eprintln!("{BIN}: error: TLS configuration: {err}");
                return ExitCode::from(exit::USAGE);
            }
        };
    }
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            lock_monitor.into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            backup_service.clone().into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health_checks.into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            deploy_service.clone().into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            rollback_service.clone().into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            backfill_service.clone().into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            migration_service.clone().into_service(),
            check,
        ))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            // A dropped sender also means "stop".
            let _ = stop_rx.await;
            stop_sampling.cancel();
            // As Ctrl-C locally: each backfill commits its batch in flight, then ends its
            // stream with how far it got; the same command resumes it.
            stop_backfills.shutdown();
        });
    belay_rpc::daemon::announce(local_addr);
    tracing::info!(addr = %local_addr, "serving");
    let (code, deadline) = belay_rpc::daemon::serve_until_stopped_within(
        server,
        stop_tx,
        &mut signals,
        &reporter,
        &HEALTH_SERVICES,
        grace,
    )
    .await;
    let code = ExitCode::from(code);
    // One budget for the whole stop, from the signal on: everything below waits until
    // `deadline` at most, then cancels, so the stop fits the unit's TimeoutStopSec.
    let _ = tokio::time::timeout_at(deadline, sampler.stop()).await;
    // Work keeps going after its caller leaves; let it finish and record its outcome
    // rather than cutting a migration off mid-way. A deployment's pipeline includes its
    // migration run, a rollback finishes its step; a restore or backup cut off leaves a
    // catalog entry missing or a database half restored.
    let in_flight = [
        ("deployments", deploy_service.runs().clone()),
        ("rollbacks", rollback_service.runs().clone()),
        ("migration runs", migration_service.runs().clone()),
        ("backups and restores", backup_service.ops().clone()),
        // Told to stop with the server: each commits its batch in flight, then ends; one
        // cancelled past the grace has that batch rolled back, and the same command resumes.
        ("backfills", backfill_service.runs().clone()),
    ];
    for (what, work) in &in_flight {
        work.close();
        if !work.is_empty() {
            tracing::info!(count = work.len(), grace = ?grace, "waiting for {what} in flight");
        }
    }
    let all_done = all_ended(&in_flight);
    if tokio::time::timeout_at(deadline, all_done).await.is_err() {
        // Cancelled where they wait: each task's database sessions close, so an open
        // transaction rolls back; the caller is told; each deployment is recorded failed
        // at its step (deploy again to resume from what committed).
        let deployments = stop_deployer.running_now();
        for (what, work) in &in_flight {
            if !work.is_empty() {
                tracing::warn!(count = work.len(), grace = ?grace, "shutdown grace ran out: cancelling {what} in flight");
            }
            work.cancel();
        }
        let record = async {
            all_ended(&in_flight).await;
            stop_deployer.record_cancelled(&deployments, grace).await
        };
        match tokio::time::timeout(RECORD_BOUND, record).await {
            Ok(Ok(ids)) => {
                for id in ids {
                    tracing::warn!(deployment = %id, "recorded a deployment cancelled by the stop");
                }
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot record the cancelled deployments; they are settled when the agent starts again")
            }
            Err(_) => {
                tracing::error!(bound = ?RECORD_BOUND, "recording the cancelled deployments took too long; they are settled when the agent starts again")
            }
        }
    }
    tracing::info!("stopped");
    code
}

/// Waits for every tracker of work in flight to be closed and empty.
async fn all_ended(in_flight: &[(&str, belay_rpc::InFlight)]) {
    for (_, work) in in_flight {
        work.wait().await;
    }
}

/// The host name, the natural name of the agent beside a database.
fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "belay-agent".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_ip_and_port_only() {
        let cases = [
            ("127.0.0.1:0", true),
            (" 0.0.0.0:7400 ", true),
            ("[::1]:7401", true),
            ("not-an-addr", false),
            ("localhost:7401", false),
            ("127.0.0.1", false),
            ("127.0.0.1:99999", false),
        ];
        for (input, ok) in cases {
            assert_eq!(parse_listen(input).is_ok(), ok, "input {input:?}");
        }
        let err = parse_listen("nope").expect_err("not an address");
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn the_shipped_unit_waits_longer_than_the_worst_case_stop_with_a_margin() {
        let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/systemd/belay-agent.service");
        let text = std::fs::read_to_string(&unit).expect("the shipped unit file");
        let timeouts: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("TimeoutStopSec="))
            .collect();
        assert_eq!(
            timeouts.len(),
            1,
            "one TimeoutStopSec in {}",
            unit.display()
        );
        let stop_sec: u64 = timeouts[0]
            .trim()
            .parse()
            .expect("TimeoutStopSec in seconds");
        // The worst case by default: the whole grace, then cancelling and recording.
        let worst = config::DEFAULT_SHUTDOWN_GRACE + RECORD_BOUND;
        let margin = std::time::Duration::from_secs(10);
        assert!(
            std::time::Duration::from_secs(stop_sec) >= worst + margin,
            "TimeoutStopSec={stop_sec} leaves less than {margin:?} above the worst-case stop {worst:?}"
        );
    }

    #[test]
    fn default_listen_parses_and_cli_is_consistent() {
        assert!(parse_listen(DEFAULT_LISTEN).is_ok());
        <Args as clap::CommandFactory>::command().debug_assert();
    }
}
