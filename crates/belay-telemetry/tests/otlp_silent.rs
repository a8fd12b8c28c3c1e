//! OTLP export to a port that accepts connections but never answers: the worst case for a
//! collector, bounded only by the export timeout. Its own test binary (global subscriber).

use std::time::{Duration, Instant};

use belay_telemetry::{LogFormat, init_with_otlp};

#[test]
fn silent_collector_is_bounded_without_a_runtime() {
    // Listening but never accepting: connects complete via the backlog, nothing is answered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let guard = init_with_otlp(LogFormat::Json, "info", Some(&endpoint), "belay-test")
        .expect("init works outside any tokio runtime");
    for step in ["backup", "apply", "probe"] {
        let span = tracing::info_span!("deployment_step", step);
        let _entered = span.enter();
        tracing::info!("step");
    }
    let started = Instant::now();
    drop(guard);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "dropping the guard took {took:?}"
    );
    drop(listener);
}
