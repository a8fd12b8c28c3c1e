//! `belay-controller`: the central service that records deployments and drives
//! agents across the fleet.
//!
//! Thin by design: parse arguments, start telemetry, bind, serve, stop on a
//! signal. Behaviour lives in the capability crates (`belay-fleet`, the webhook
//! included); this file only wires it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use belay_proto::v1 as pb;
use belay_telemetry::LogFormat;
use clap::Parser as _;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

const BIN: &str = "belay-controller";
const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
const LISTEN_ENV: &str = "BELAY_CONTROLLER_LISTEN";
const DEFAULT_LOG_FILTER: &str = "info";

/// The controller's own gRPC service. Its proto lands with the deployment
/// work; health already reports it so probes need not change then.
const CONTROLLER_SERVICE: &str = "belay.v1.ControllerService";

/// Services this process serves: their health is reported ("" is the whole server, as
/// the gRPC health protocol defines it) and reflection advertises them, and only them.
const HEALTH_SERVICES: [&str; 10] = [
    "",
    CONTROLLER_SERVICE,
    pb::history_service_server::SERVICE_NAME,
    pb::migration_service_server::SERVICE_NAME,
    pb::deploy_service_server::SERVICE_NAME,
    pb::lock_monitor_service_server::SERVICE_NAME,
    pb::health_service_server::SERVICE_NAME,
    pb::backup_service_server::SERVICE_NAME,
    pb::rollback_service_server::SERVICE_NAME,
    pb::backfill_service_server::SERVICE_NAME,
];

use belay_rpc::daemon::exit;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   stopped cleanly after SIGTERM or SIGINT (also after --help and --version)
  64  bad usage: unknown or malformed arguments, an invalid --listen address,
      an invalid BELAY_LOG filter
  69  the listen address is unavailable: in use, not local, or not permitted
  70  internal error while serving

Environment:
  BELAY_LOG  log filter, e.g. `info` or `info,belay_migrate=debug`";

/// The belay controller: keeps deployment history for all targets and
/// orchestrates deployments and rollbacks across agents.
#[derive(Debug, clap::Parser)]
#[command(name = BIN, version, after_help = EXIT_CODES_HELP)]
struct Args {
    /// Address to serve gRPC on, as IP:PORT (port 0 picks a free port; the
    /// bound address is printed to stdout as `listening on ADDR`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, env = LISTEN_ENV, value_parser = parse_listen)]
    listen: SocketAddr,

    /// The controller's store: a SQLite file path (created if missing) or a
    /// postgres:// URL (prefer BELAY_CONTROLLER_STORE to keep passwords off argv)
    #[arg(
        long,
        value_name = "PATH_OR_URL",
        env = "BELAY_CONTROLLER_STORE",
        default_value = "belay-controller.db",
        hide_env_values = true
    )]
    store: String,

    /// Environments in promotion order, e.g. staging,production: a version must
    /// succeed in one before it may be deployed to the next
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    environments: Vec<String>,

    /// How often agents heartbeat; three missed heartbeats make an agent unreachable
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    heartbeat_interval: Duration,

    /// HTTP/2 keepalive with agents (and callers): a ping every DURATION, the peer given
    /// up when one stays unanswered as long. An agent that dies silently mid-deployment
    /// is detected within twice this (20 s by default): its target is marked `unknown`
    /// at the step it was in, with the reason, and reconciled when the agent is back
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_interval)]
    agent_keepalive: Duration,

    /// File holding the bearer token every caller (CLI and agents) must present; without
    /// it, BELAY_TOKEN; without either, calls are not authenticated
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,

    /// CA certificate (PEM) for TLS: agents must present certificates it signed, and
    /// agents' certificates are checked against it
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<std::path::PathBuf>,

    /// This controller's certificate (PEM), served to callers and presented to agents
    #[arg(long, value_name = "PATH", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,

    /// This controller's private key (PEM)
    #[arg(long, value_name = "PATH", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<std::path::PathBuf>,

    /// Refused: the controller verifies each agent's server certificate against the name
    /// that agent registered under (its certificate's identity), never a shared name
    #[arg(long, value_name = "NAME", hide = true)]
    agent_tls_name: Option<String>,

    /// Also serve grpc.health.v1, and only it, in plaintext on ADDR: for probes that
    /// cannot speak TLS (the kubelet's `grpc:` probe); off when not given
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    health_listen: Option<SocketAddr>,

    /// Serve HTTP on ADDR: Prometheus metrics (GET /metrics) and the Alertmanager webhook
    /// (POST /webhooks/alertmanager, which checks the bearer token when one is set); off
    /// when not given. --metrics-listen is an alias, kept for existing configurations
    #[arg(long, value_name = "ADDR", value_parser = parse_listen, alias = "metrics-listen")]
    http_listen: Option<SocketAddr>,

    /// How long after a target's deployment ended an alert naming only the target
    /// (label belay_target) still rolls that deployment back; an alert naming the
    /// deployment (belay_deployment) is not limited
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_interval)]
    alert_grace: Duration,

    /// Export traces to this OpenTelemetry collector (OTLP/gRPC, http://host:4317); an
    /// unreachable collector never blocks or stops the daemon
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Log format on stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, env = belay_telemetry::LOG_FORMAT_ENV)]
    log_format: LogFormat,
}

fn parse_interval(value: &str) -> Result<Duration, String> {
    match belay_core::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be greater than zero".to_string()),
        Err(e) => Err(e.to_string()),
    }
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

    if let Some(name) = &args.agent_tls_name {
        // A shared name is what let any agent's certificate answer for every agent; it
        // cannot coexist with names bound to certificates, so it is refused, not ignored.
        eprintln!(
            "{BIN}: error: --agent-tls-name {name:?} is no longer accepted: the controller \
             verifies each agent's server certificate against the name the agent registered \
             under, so one shared name would let any agent's certificate answer for every \
             agent; issue each agent a certificate whose DNS SAN is its `name` in agent.toml, \
             and drop the flag"
        );
        return ExitCode::from(exit::USAGE);
    }
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

    let store = match belay_store::Store::open(&args.store).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let token = match belay_auth::read_secret(belay_auth::TOKEN_ENV, args.token_file.as_deref()) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let tls_files = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(belay_auth::TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let (server_tls, agent_tls) = match &tls_files {
        Some(files) => match (
            belay_auth::server_tls_client_optional(files),
            // The name here is replaced per agent by its registered name (belay-fleet).
            belay_auth::client_tls(files, "localhost"),
        ) {
            (Ok(s), Ok(c)) => (Some(s), Some(c)),
            (Err(err), _) | (_, Err(err)) => {
                eprintln!("{BIN}: error: {err}");
                return ExitCode::from(exit::USAGE);
            }
        },
        None => (None, None),
    };
    let check = belay_auth::MaybeTokenCheck(token.clone().map(belay_auth::TokenCheck::new));
    let fleet = match belay_fleet::Fleet::new(
        store,
        belay_fleet::FleetConfig {
            heartbeat_interval: args.heartbeat_interval,
            environments: args.environments.clone(),
            agent_token: token.as_ref().map(|t| t.expose().to_string()),
            agent_tls,
            agent_keepalive: belay_rpc::Keepalive::every(args.agent_keepalive),
            agent_identity: if tls_files.is_some() {
                belay_auth::PeerIdentity::Certificate
            } else {
                belay_auth::PeerIdentity::Asserted
            },
        },
    )
    .await
    {
        Ok(fleet) => fleet,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };

    if let Some(addr) = args.http_listen {
        // An alert's rollback runs on the agent owning the target, routed as an operator's
        // `belay rollback execute` through this controller is.
        let trigger: std::sync::Arc<dyn belay_fleet::webhook::RollbackTrigger> =
            std::sync::Arc::new(belay_fleet::webhook::RoutedRollback {
                fleet: fleet.clone(),
            });
        let webhook = belay_fleet::webhook::Webhook::new(fleet.clone(), trigger, args.alert_grace)
            .with_token(token.clone().map(belay_auth::TokenCheck::new));
        match belay_rpc::daemon::serve_http(addr, "--http-listen", webhook.router()).await {
            Ok(bound) => {
                tracing::info!(addr = %bound, "serving HTTP (/metrics, /webhooks/alertmanager)")
            }
            Err(err) => {
                eprintln!("{BIN}: error: {err}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        }
        belay_telemetry::init_process_series(belay_telemetry::Exposer::Controller);
    }
    let reflection = match belay_rpc::daemon::reflection(&HEALTH_SERVICES) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("{BIN}: error: {err}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };

    fleet.spawn_gauges();
    fleet.spawn_reconciler();
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
    let mut builder = belay_rpc::daemon::server(belay_rpc::Keepalive::every(args.agent_keepalive));
    if let Some(tls) = server_tls {
        builder = match builder.tls_config(tls) {
            Ok(b) => b,
            Err(err) => {
                eprintln!("{BIN}: error: TLS configuration: {err}");
                return ExitCode::from(exit::USAGE);
            }
        };
    }
    // Health stays open (load balancers, probes); everything else checks the token.
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            pb::controller_service_server::ControllerServiceServer::with_interceptor(
                belay_fleet::grpc::ControllerGrpc(fleet.clone()),
                check.clone(),
            ),
        )
        .add_service(
            pb::history_service_server::HistoryServiceServer::with_interceptor(
                belay_fleet::grpc::HistoryGrpc(fleet.clone()),
                check.clone(),
            ),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::LockMonitorGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::HealthGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::BackupGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        // One target's deployment (remote `belay migrate`), run by its agent.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::DeployGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        // One target's rollback, planned and run by its agent.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::RollbackGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        // One target's backfill, run by its agent (which exports its metrics).
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::BackfillGrpc::new(std::sync::Arc::new(fleet.clone())).into_service(),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            belay_rpc::MigrationGrpc::new(std::sync::Arc::new(fleet)).into_service(),
            check,
        ))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            // A dropped sender also means "stop".
            let _ = stop_rx.await;
        });
    belay_rpc::daemon::announce(local_addr);
    tracing::info!(addr = %local_addr, "serving");
    if tls_files.is_none() {
        tracing::warn!(
            "no TLS (--tls-ca/--tls-cert/--tls-key): agent identities are asserted, not checked; \
             any caller (holding the token, when one is set) can register under any agent name"
        );
    } else {
        tracing::info!(
            "mTLS: an agent may register only under a name its certificate carries (DNS SAN, or CN without DNS SANs), and is called only at an address whose certificate carries that name as a DNS SAN"
        );
    }
    let code = ExitCode::from(
        belay_rpc::daemon::serve_until_stopped(
            server,
            stop_tx,
            &mut signals,
            &reporter,
            &HEALTH_SERVICES,
        )
        .await,
    );
    tracing::info!("stopped");
    code
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
    fn default_listen_parses_and_cli_is_consistent() {
        assert!(parse_listen(DEFAULT_LISTEN).is_ok());
        <Args as clap::CommandFactory>::command().debug_assert();
    }
}
