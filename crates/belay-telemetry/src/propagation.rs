//! Trace context across process boundaries: W3C `traceparent`/`tracestate` written into and
//! read from a request's headers (gRPC metadata), so the agent's spans of one target's
//! deployment join the controller's trace of the whole deployment.
//!
//! Without OTLP export the spans have no OpenTelemetry context and nothing is written;
//! reading a missing or malformed header leaves the span a root, as it would be anyway.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The headers [`inject`] writes and [`set_parent`] reads.
pub const HEADERS: [&str; 2] = ["traceparent", "tracestate"];

struct Insert<'a>(&'a mut dyn FnMut(&str, String));

impl Injector for Insert<'_> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, value);
    }
}

/// A snapshot of the headers, so [`Extractor::get`] can lend from it.
struct Headers(Vec<(&'static str, String)>);

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

/// Writes `span`'s trace context as W3C headers through `insert` (nothing when the span
/// is not exported).
pub fn inject(span: &tracing::Span, mut insert: impl FnMut(&str, String)) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut Insert(&mut insert));
}

/// Makes the trace context in the headers `get` reads the parent of `span`, which must
/// not have been entered yet. Headers without a valid context leave it a root.
pub fn set_parent(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    let headers = Headers(
        HEADERS
            .iter()
            .filter_map(|k| get(k).map(|v| (*k, v)))
            .collect(),
    );
    if headers.0.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&headers);
    let _ = span.set_parent(cx);
}
