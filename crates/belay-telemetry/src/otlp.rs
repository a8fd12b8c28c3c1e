//! OpenTelemetry span export over OTLP/gRPC, bounded in time everywhere so that a missing,
//! refusing or silent collector never hangs or crashes a binary: each export gives up after
//! [`OTLP_EXPORT_TIMEOUT`] (retries included), and dropping the [`TelemetryGuard`] waits at
//! most [`SHUTDOWN_WAIT`] for the last spans to leave.
//!
//! The exporter's gRPC channel lives on a small runtime of its own (one worker thread owned by
//! the guard), so it works whatever runtime — or none — the caller uses, and shutting it down
//! never deadlocks a current-thread runtime (the ≈5 s stall `provider.shutdown()` shows there).

use std::fmt;
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::{Error, LogFormat, install, lock_installed};

/// How long one export (all retries included) may take before its spans are dropped.
pub const OTLP_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long dropping a [`TelemetryGuard`] waits for the final flush before giving up.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(2500);

/// Keeps span export running; dropping it flushes and shuts the exporter down, waiting at
/// most ≈2.5 s (a collector that is down costs that much at exit, never more). Inert when
/// OTLP export is off.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("otlp", &self.provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// A guard with nothing to shut down.
    fn inert() -> Self {
        Self {
            provider: None,
            runtime: None,
        }
    }

    /// Whether spans are being exported.
    pub fn exports_spans(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Shut down on a thread of its own: the SDK blocks while flushing, which must not
            // stall (or deadlock) whatever runtime the caller drops us on.
            let (done, finished) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("belay-otlp-shutdown".into())
                .spawn(move || {
                    let _ = provider.shutdown_with_timeout(OTLP_EXPORT_TIMEOUT);
                    let _ = done.send(());
                });
            if spawned.is_ok() {
                let _ = finished.recv_timeout(SHUTDOWN_WAIT);
            }
        }
        if let Some(runtime) = self.runtime.take() {
            // Never blocks, and is allowed inside an async context (a plain drop is not).
            runtime.shutdown_background();
        }
    }
}

/// Like [`crate::init`], and when `endpoint` is given (e.g. `http://127.0.0.1:4317`) also
/// exports spans over OTLP/gRPC to it, as service `service_name`.
///
/// Keep the returned guard alive for the life of the process; dropping it flushes. With
/// `endpoint: None` this is [`crate::init`] with an inert guard. Only plaintext `http://`
/// endpoints are supported (no TLS provider is compiled into the exporter); an `https://`
/// endpoint is an error. An unreachable collector is not an error: spans are dropped after
/// [`OTLP_EXPORT_TIMEOUT`] per batch.
///
/// Errors when the subscriber is already installed and `endpoint` is given
/// ([`Error::OtlpAfterInit`]), since export could not be added silently.
pub fn init_with_otlp(
    format: LogFormat,
    default_filter: &str,
    endpoint: Option<&str>,
    service_name: &str,
) -> Result<TelemetryGuard, Error> {
    let mut installed = lock_installed();
    let Some(endpoint) = endpoint else {
        if !*installed {
            install(format, default_filter, None)?;
            *installed = true;
        }
        return Ok(TelemetryGuard::inert());
    };
    if *installed {
        return Err(Error::OtlpAfterInit {
            endpoint: endpoint.to_owned(),
        });
    }

    let otlp_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Otlp {
        endpoint: endpoint.to_owned(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("belay-otlp")
        .enable_all()
        .build()
        .map_err(|e| otlp_error(e.into()))?;
    // The tonic channel spawns its worker on the current runtime: make it ours.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(OTLP_EXPORT_TIMEOUT)
            .build()
            .map_err(|e| otlp_error(e.into()))?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer(service_name.to_owned());
    // From here on the guard owns provider and runtime, so an early return cleans up.
    let guard = TelemetryGuard {
        provider: Some(provider),
        runtime: Some(runtime),
    };
    install(format, default_filter, Some(tracer))?;
    *installed = true;
    Ok(guard)
}
