//! Process-wide telemetry for the belay binaries: the tracing subscriber, the
//! log format, a panic hook that reports panics through tracing, OpenTelemetry
//! span export over OTLP/gRPC, and the Prometheus metrics registry with its
//! `/metrics` endpoint.
//!
//! Logs always go to stderr so that stdout stays free for command output and
//! machine-readable lines (`listening on ADDR`). The subscriber is global to the
//! process, so [`init`] / [`init_with_otlp`] install it once and later calls do
//! nothing; the same holds for the metrics recorder behind [`metrics_handle`].
//! Every `belay_*` metric is named in [`names`] and listed, with its type, labels,
//! exposer and help text, in [`CATALOG`] (`docs/metrics.md` is rendered from it); W3C trace
//! context crosses process boundaries through [`propagation`]. This crate must not depend
//! on any capability crate, nor record a metric itself: each is recorded where it happens.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

mod otlp;
mod prometheus;
pub mod propagation;

pub use metrics_exporter_prometheus::PrometheusHandle;
pub use otlp::{OTLP_EXPORT_TIMEOUT, TelemetryGuard, init_with_otlp};
pub use prometheus::{
    CATALOG, DEPLOYMENT_STATUSES, DEPLOYMENT_STEPS, Exposer, Kind, Metric, ROLLBACK_RESULTS,
    ROLLBACK_STRATEGIES, ROLLBACK_TRIGGERS, TargetSeries, Unit, describe_metrics,
    init_process_series, init_target_series, markdown_table, metrics_handle, metrics_router, names,
    serve_metrics,
};

/// Environment variable holding the log filter (`EnvFilter` syntax, e.g.
/// `info,belay_migrate=debug`). It overrides the binary's default filter.
pub const LOG_FILTER_ENV: &str = "BELAY_LOG";

/// Environment variable the binaries read for `--log-format`.
pub const LOG_FORMAT_ENV: &str = "BELAY_LOG_FORMAT";

/// How log lines are rendered on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// The accepted spellings, in the order shown to users.
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    /// The canonical spelling, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(Error::UnknownFormat(s.to_owned())),
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown log format `{0}`: expected `text` or `json`")]
    UnknownFormat(String),
    #[error("invalid log filter `{value}` from {source_name}: {source}")]
    Filter {
        value: String,
        /// Where the filter came from: the environment variable or "the default filter".
        source_name: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("another tracing subscriber is already installed in this process: {0}")]
    Install(#[source] tracing_subscriber::util::TryInitError),
    #[error(
        "cannot enable OTLP export to {endpoint}: the tracing subscriber was already installed \
         without it (call init_with_otlp before anything else logs)"
    )]
    OtlpAfterInit { endpoint: String },
    #[error("cannot set up OTLP export to {endpoint}: {source}")]
    Otlp {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("another metrics recorder is already installed in this process")]
    MetricsRecorder(#[source] metrics_exporter_prometheus::BuildError),
    #[error("the metrics endpoint failed: {0}")]
    MetricsServe(#[source] std::io::Error),
}

/// Set once the subscriber is ours; a Mutex (not a Once) so a failed attempt
/// can be retried and concurrent callers wait for the first one to finish.
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Installs the global tracing subscriber (stderr, `format`) and the panic hook.
///
/// The filter comes from [`LOG_FILTER_ENV`] when set and non-empty, otherwise
/// from `default_filter`. Calling it again after a success does nothing, so
/// tests and binaries can both call it freely.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), Error> {
    let mut installed = lock_installed();
    if *installed {
        return Ok(());
    }
    install(format, default_filter, None)?;
    *installed = true;
    Ok(())
}

/// A poisoned lock only means a panic happened mid-init elsewhere; the bool is
/// still accurate because it is written last.
fn lock_installed() -> std::sync::MutexGuard<'static, bool> {
    INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds and installs the subscriber: filter, stderr formatting and, when
/// given, the OpenTelemetry layer exporting spans through `tracer`. The caller
/// holds the [`INSTALLED`] lock.
fn install(
    format: LogFormat,
    default_filter: &str,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> Result<(), Error> {
    let filter = build_filter(std::env::var(LOG_FILTER_ENV).ok(), default_filter)?;
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
    });
    let otel = tracer.map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(Error::Install)?;
    install_panic_hook();
    Ok(())
}

fn build_filter(from_env: Option<String>, default_filter: &str) -> Result<EnvFilter, Error> {
    match from_env.filter(|v| !v.trim().is_empty()) {
        Some(value) => EnvFilter::try_new(&value).map_err(|source| Error::Filter {
            value,
            source_name: LOG_FILTER_ENV.to_owned(),
            source,
        }),
        None => EnvFilter::try_new(default_filter).map_err(|source| Error::Filter {
            value: default_filter.to_owned(),
            source_name: "the default filter".to_owned(),
            source,
        }),
    }
}

/// Replaces the default panic hook so a panic becomes one structured error
/// event (JSON when the format is JSON) instead of a raw stderr line that log
/// shippers would not parse.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("<non-string panic payload>");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        // `capture` honours RUST_BACKTRACE, like the default hook.
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(target: "panic", %location, thread, %backtrace, "panicked: {message}");
        } else {
            tracing::error!(target: "panic", %location, thread, "panicked: {message}");
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_known_names_and_rejects_others() {
        let cases = [
            ("text", Some(LogFormat::Text)),
            ("json", Some(LogFormat::Json)),
            ("JSON", Some(LogFormat::Json)),
            (" text ", Some(LogFormat::Text)),
            ("yaml", None),
            ("", None),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<LogFormat>().ok(), expected, "input {input:?}");
        }
        for name in LogFormat::NAMES {
            let parsed: LogFormat = name.parse().expect("every listed name parses");
            assert_eq!(parsed.to_string(), name);
        }
        let err = "yaml"
            .parse::<LogFormat>()
            .expect_err("yaml is not a format");
        assert!(err.to_string().contains("`yaml`"), "{err}");
    }

    #[test]
    fn log_format_works_as_a_clap_value() {
        assert_eq!(
            <LogFormat as clap::ValueEnum>::from_str("json", true).ok(),
            Some(LogFormat::Json)
        );
    }

    #[test]
    fn invalid_default_filter_names_its_source() {
        let err = build_filter(None, "info,[").expect_err("bad filter is rejected");
        assert!(err.to_string().contains("the default filter"), "{err}");
        let err = build_filter(Some("=bad=".into()), "info").expect_err("bad env filter");
        assert!(err.to_string().contains(LOG_FILTER_ENV), "{err}");
        assert!(
            build_filter(Some("  ".into()), "info").is_ok(),
            "blank env falls back"
        );
    }

    #[test]
    fn init_is_idempotent() {
        init(LogFormat::Text, "info").expect("first init installs");
        init(LogFormat::Json, "debug").expect("second init is a no-op");
        tracing::info!("telemetry initialised twice without panicking");
    }
}
