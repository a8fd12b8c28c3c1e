//! OTLP export to a closed local port: init succeeds, spans are emitted, and dropping the
//! guard returns quickly. Its own test binary, since the subscriber is process-global.

use std::time::{Duration, Instant};

use belay_telemetry::{LogFormat, init_with_otlp};

#[tokio::test]
async fn closed_port_never_blocks_or_fails() {
    // Bind and drop to get a port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let guard = init_with_otlp(LogFormat::Text, "info", Some(&endpoint), "belay-test")
        .expect("an unreachable collector is not an init error");
    assert!(guard.exports_spans());

    {
        let span = tracing::info_span!("deployment_step", step = "apply");
        let _entered = span.enter();
        tracing::info!("inside a span that will fail to export");
    }

    let again = init_with_otlp(LogFormat::Text, "info", Some(&endpoint), "belay-test")
        .expect_err("OTLP cannot be added after the subscriber is installed");
    assert!(again.to_string().contains(&endpoint), "{again}");
    let inert = init_with_otlp(LogFormat::Text, "info", None, "belay-test")
        .expect("without an endpoint a second init is a no-op");
    assert!(!inert.exports_spans());

    let started = Instant::now();
    drop(guard);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "dropping the guard took {took:?}"
    );
}
