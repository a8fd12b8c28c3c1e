//! What the agent and the controller share as daemons: stop signals, the one stdout line
//! announcing the bound address, health status, the metrics endpoint and server
//! reflection. Kept here so the two binaries stay thin and cannot drift apart.

use std::io::Write as _;
use std::net::SocketAddr;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// SIGTERM (systemd, Kubernetes) and SIGINT (Ctrl-C) both mean "stop cleanly".
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl std::fmt::Debug for StopSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignals").finish_non_exhaustive()
    }
}

impl StopSignals {
    /// Installs the handlers; call before announcing the address, so a stop sent as soon
    /// as the line is read is handled, not fatal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Prints the one stdout line tests and supervisors read to learn the port.
pub fn announce(addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "listening on {addr}").and_then(|()| stdout.flush()) {
        // A closed stdout must not stop a daemon; the log line still says it.
        tracing::warn!(error = %err, "cannot write the listening address to stdout");
    }
}

/// Sets the health status of every service in `services` ("" is the whole server).
pub async fn set_health(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}

/// Serves Prometheus metrics on `addr` in the background. The error names the address.
pub async fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    let handle = belay_telemetry::metrics_handle().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot serve metrics on {addr}: {e}; pick another --metrics-listen")
    })?;
    tokio::spawn(async move {
        if let Err(err) =
            belay_telemetry::serve_metrics(listener, handle, std::future::pending()).await
        {
            tracing::error!(error = %err, "metrics endpoint failed");
        }
    });
    Ok(())
}

/// Serves the daemon's HTTP listener on `addr` in the background: `GET /metrics` plus the
/// caller's `routes` (the controller's webhooks), merged into one router. `flag` names the
/// option that chose the address, for the error.
pub async fn serve_http(
    addr: SocketAddr,
    flag: &str,
    routes: axum::Router,
) -> Result<SocketAddr, String> {
    let handle = belay_telemetry::metrics_handle().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve HTTP on {addr}: {e}; pick another {flag}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address of the HTTP listener {addr}: {e}"))?;
    let app = belay_telemetry::metrics_router(handle).merge(routes);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "HTTP listener failed");
        }
    });
    Ok(bound)
}

/// Serves `grpc.health.v1` alone, in plaintext, on `addr` in the background: for probes
/// that cannot speak TLS or present a token (the kubelet's `grpc:` probe), while the main
/// listener keeps mTLS. It answers what the daemon's health reporter says (NOT_SERVING
/// while it drains) and nothing else: no belay service is reachable through it. `flag`
/// names the option that chose the address, for the error.
pub async fn serve_health<H: tonic_health::pb::health_server::Health>(
    addr: SocketAddr,
    flag: &str,
    health: tonic_health::pb::health_server::HealthServer<H>,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve gRPC health on {addr}: {e}; pick another {flag}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address of the health listener {addr}: {e}"))?;
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "health listener failed");
        }
    });
    Ok(bound)
}

/// The health service every daemon serves (`tonic-health`).
pub const GRPC_HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The reflection service itself, advertised beside what a daemon serves.
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Server reflection (for grpcurl and friends) advertising exactly `services` — the
/// `belay.v1` services this daemon serves, as in its health list ("" is skipped) — plus
/// grpc.health.v1 and reflection itself. A daemon must not advertise a service it does
/// not serve: a client would discover it and get `Unimplemented`. A name that is not in
/// belay's descriptor set is an error naming it (a typo would advertise nothing).
pub fn reflection(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    String,
> {
    let known = described_services().map_err(|e| format!("reflection: {e}"))?;
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(belay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(GRPC_HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE);
    for service in services.iter().filter(|s| !s.is_empty()) {
        if !known.iter().any(|k| k == service) {
            return Err(format!(
                "reflection: {service} is not a service of belay's contracts (known: {})",
                known.join(", ")
            ));
        }
        builder = builder.with_service_name(*service);
    }
    builder.build_v1().map_err(|e| format!("reflection: {e}"))
}

/// Every service (`package.Name`) in belay's descriptor set.
fn described_services() -> Result<Vec<String>, prost::DecodeError> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(belay_proto::FILE_DESCRIPTOR_SET)?;
    Ok(set
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect())
}

/// How long in-flight calls may run after a stop signal before the daemon exits anyway;
/// below systemd's TimeoutStopSec so it exits on its own terms.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Exit codes of the daemons (sysexits(3)), so supervisors can tell "fix the config"
/// from "retry later".
pub mod exit {
    pub const USAGE: u8 = 64;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
}

/// Parses a `--listen` value: IP:PORT only (port 0 picks a free one).
pub fn parse_listen(value: &str, example: &str) -> Result<SocketAddr, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a socket address: expected IP:PORT, e.g. {example}"))
}

/// A gRPC server builder with HTTP/2 keepalive: the server pings each connection every
/// `keepalive.interval` and drops it when a ping stays unanswered for `keepalive.timeout`,
/// so a caller that died silently does not hold a stream open forever.
pub fn server(keepalive: crate::client::Keepalive) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
}

/// The body of a daemon's `main`: telemetry (kept until exit, so spans are flushed), a
/// multi-threaded runtime, and `serve` inside a span named after the binary.
pub fn run<Fut>(
    bin: &str,
    log_format: belay_telemetry::LogFormat,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
    listen: SocketAddr,
    serve: impl FnOnce() -> Fut,
) -> std::process::ExitCode
where
    Fut: std::future::Future<Output = std::process::ExitCode>,
{
    use tracing::Instrument as _;
    let _telemetry =
        match belay_telemetry::init_with_otlp(log_format, default_filter, otlp_endpoint, bin) {
            Ok(guard) => guard,
            Err(err) => {
                eprintln!("{bin}: error: {err}");
                return std::process::ExitCode::from(exit::USAGE);
            }
        };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{bin}: error: cannot start the async runtime: {err}");
            return std::process::ExitCode::from(exit::SOFTWARE);
        }
    };
    let span = tracing::info_span!("serve", bin, listen = %listen);
    runtime.block_on(serve().instrument(span))
}

/// Serves until SIGTERM or SIGINT, then stops cleanly: health goes NOT_SERVING first (so
/// load balancers and the controller stop routing here), in-flight calls get
/// [`SHUTDOWN_GRACE`], and a second signal stops at once. Returns the exit code.
pub async fn serve_until_stopped<F>(
    server: F,
    stop: tokio::sync::oneshot::Sender<()>,
    signals: &mut StopSignals,
    reporter: &HealthReporter,
    services: &[&str],
) -> u8
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    serve_until_stopped_within(server, stop, signals, reporter, services, SHUTDOWN_GRACE)
        .await
        .0
}

/// [`serve_until_stopped`] with the stop's whole grace given: the calls in flight get what
/// is left of `grace` from the stop signal on. Returns the exit code and the deadline
/// (signal + `grace`, or now after a second signal), by which the caller's own draining
/// must end too: one budget for the whole stop, which its supervisor's timeout must exceed.
pub async fn serve_until_stopped_within<F>(
    server: F,
    stop: tokio::sync::oneshot::Sender<()>,
    signals: &mut StopSignals,
    reporter: &HealthReporter,
    services: &[&str],
    grace: std::time::Duration,
) -> (u8, tokio::time::Instant)
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    tokio::pin!(server);
    let signal = tokio::select! {
        result = &mut server => {
            // The server only returns before a stop signal when it failed.
            let code = match result {
                Ok(()) => 0,
                Err(err) => {
                    tracing::error!(error = %err, "server failed");
                    exit::SOFTWARE
                }
            };
            return (code, tokio::time::Instant::now() + grace);
        }
        signal = signals.recv() => signal,
    };
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(signal, grace = ?grace, "stopping");
    set_health(reporter, services, ServingStatus::NotServing).await;
    let _ = stop.send(());
    tokio::select! {
        result = tokio::time::timeout_at(deadline, &mut server) => match result {
            Ok(Ok(())) => (0, deadline),
            Ok(Err(err)) => {
                tracing::error!(error = %err, "server failed while stopping");
                (exit::SOFTWARE, deadline)
            }
            Err(_) => {
                tracing::warn!(grace = ?grace, "in-flight calls did not finish in time; stopping anyway");
                (0, deadline)
            }
        },
        signal = signals.recv() => {
            tracing::warn!(signal, "second stop signal; not waiting for in-flight calls");
            (0, tokio::time::Instant::now())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_refuses_a_service_not_in_the_contracts() {
        let err = reflection(&["", "belay.v1.NoSuchService"])
            .err()
            .expect("an unknown service is refused");
        assert!(err.contains("belay.v1.NoSuchService"), "{err}");
        assert!(err.contains("belay.v1.MigrationService"), "{err}");
        assert!(reflection(&["", "belay.v1.MigrationService"]).is_ok());
    }
}
