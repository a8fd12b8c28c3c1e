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

/// Server reflection over belay's contracts and grpc.health.v1, for grpcurl and friends.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    String,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(belay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))
}
