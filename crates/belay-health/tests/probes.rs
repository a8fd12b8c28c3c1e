//! Probes against a real local HTTP server (switched between behaviours by the test) and
//! a real PostgreSQL. Tests await events from the stream; they never sleep to wait.

// Test helpers unwrap: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use belay_core::DatabaseUrl;
use belay_health::{
    Expectation, HttpProbe, ProbeEvent, ProbeKind, ProbeResult, ProbeSpec, ProbeState, ProbeStream,
    Transition, WatchOutcome, run_probe, run_probes, watch,
};
use belay_testkit::Cluster;
use futures::StreamExt;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Healthy,
    Failing,
    /// Even-numbered requests pass, odd ones fail.
    Flapping,
    /// Answers healthy, after this long.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with JSON saying the database is down.
    DbDown,
}

/// A tiny HTTP/1.1 server: one response per connection, chosen by the current mode.
struct Server {
    url: String,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicUsize>,
}

impl Server {
    async fn start(mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(mode));
        let requests = Arc::new(AtomicUsize::new(0));
        let (m, n) = (mode.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (m, n) = (m.clone(), n.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let index = n.fetch_add(1, Ordering::SeqCst);
                    let mode = *m.lock().unwrap();
                    let healthy = (200, r#"{"status":"ok","db":{"up":true}}"#);
                    let (code, body) = match mode {
                        Mode::Healthy => healthy,
                        Mode::Failing => (503, r#"{"status":"down"}"#),
                        Mode::Flapping if index % 2 == 0 => healthy,
                        Mode::Flapping => (500, "boom"),
                        Mode::Slow(d) => {
                            tokio::time::sleep(d).await;
                            healthy
                        }
                        Mode::Garbage => (200, "<html>maintenance</html>"),
                        Mode::DbDown => (200, r#"{"status":"ok","db":{"up":false}}"#),
                    };
                    let response = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Server {
            url,
            mode,
            requests,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn spec(url: &str, failure_threshold: u32) -> ProbeSpec {
    let mut spec = ProbeSpec::http("api", url);
    spec.period = Duration::from_millis(50);
    spec.timeout = Duration::from_millis(500);
    spec.failure_threshold = failure_threshold;
    spec
}

async fn next(stream: &mut ProbeStream) -> ProbeEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream does not end")
}

#[tokio::test]
async fn triggers_after_exactly_failure_threshold_failed_periods() {
    let server = Server::start(Mode::Healthy).await;
    let mut stream = run_probe(spec(&server.url, 3)).unwrap();
    for _ in 0..3 {
        let e = next(&mut stream).await;
        assert_eq!(
            (e.result, e.state, e.triggered),
            (ProbeResult::Pass, ProbeState::Healthy, false)
        );
        assert_eq!(e.evidence.status, Some(200));
    }
    server.set(Mode::Failing);
    // Attempts already under way may still pass; count failures from the first one.
    let mut failures = Vec::new();
    let triggered = loop {
        let e = next(&mut stream).await;
        if e.result == ProbeResult::Pass {
            assert!(failures.is_empty(), "a pass after the switch: {e:?}");
            continue;
        }
        failures.push(e.clone());
        if e.triggered {
            break e;
        }
        assert!(
            failures.len() < 3,
            "not triggered at the third failure: {failures:#?}"
        );
    };
    assert_eq!(failures.len(), 3);
    assert_eq!(triggered.consecutive_failures, 3);
    assert_eq!(triggered.transition, Some(Transition::Triggered));
    assert_eq!(triggered.state, ProbeState::Triggered);
    assert_eq!(triggered.seq, failures[0].seq + 2);
    assert_eq!(triggered.probe, "api");
    assert_eq!(triggered.evidence.status, Some(503));
    assert!(triggered.evidence.body.as_deref().unwrap().contains("down"));
    assert!(
        triggered.summary().contains("threshold crossed"),
        "{}",
        triggered.summary()
    );
    // It fires once: later failures keep the state without triggering again.
    let e = next(&mut stream).await;
    assert_eq!(
        (e.result, e.triggered, e.state),
        (ProbeResult::Fail, false, ProbeState::Triggered)
    );

    // Recovery after success_threshold (1) pass.
    server.set(Mode::Healthy);
    let recovered = loop {
        let e = next(&mut stream).await;
        if e.result == ProbeResult::Pass {
            break e;
        }
    };
    assert_eq!(recovered.transition, Some(Transition::Recovered));
    assert_eq!(recovered.state, ProbeState::Healthy);
}

#[tokio::test]
async fn flapping_below_the_threshold_never_fires() {
    let server = Server::start(Mode::Flapping).await;
    let mut stream = run_probe(spec(&server.url, 2)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..12 {
        let e = next(&mut stream).await;
        assert!(!e.triggered, "fired on {e:?}");
        assert!(e.consecutive_failures <= 1, "{e:?}");
        seen.push(e.result);
    }
    assert!(
        seen.contains(&ProbeResult::Pass) && seen.contains(&ProbeResult::Fail),
        "{seen:?}"
    );
    assert!(server.requests.load(Ordering::SeqCst) >= 12);
}

#[tokio::test]
async fn a_refused_connection_counts_as_failure() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut stream = run_probe(spec(&format!("http://127.0.0.1:{port}/health"), 2)).unwrap();
    let first = next(&mut stream).await;
    assert_eq!((first.result, first.triggered), (ProbeResult::Error, false));
    let error = first.evidence.error.as_deref().unwrap().to_lowercase();
    assert!(
        error.contains("refused") || error.contains("connect"),
        "{error}"
    );
    let second = next(&mut stream).await;
    assert_eq!(
        (second.result, second.triggered),
        (ProbeResult::Error, true)
    );
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_counts_as_failure() {
    let server = Server::start(Mode::Slow(Duration::from_secs(2))).await;
    let mut spec = spec(&server.url, 2);
    spec.timeout = Duration::from_millis(100);
    let mut stream = run_probe(spec).unwrap();
    let first = next(&mut stream).await;
    assert_eq!(first.result, ProbeResult::Error);
    assert_eq!(
        first.evidence.error.as_deref(),
        Some("timed out after 100ms")
    );
    assert!(
        first.evidence.elapsed_ms >= 100 && first.evidence.elapsed_ms < 1000,
        "{first:?}"
    );
    assert!(next(&mut stream).await.triggered);
}

#[tokio::test]
async fn json_pointer_values_and_bad_json() {
    let server = Server::start(Mode::Healthy).await;
    let mut spec = spec(&server.url, 1);
    spec.kind = ProbeKind::Http(HttpProbe {
        method: "GET".into(),
        url: server.url.clone(),
        expect_status: Some(200),
        json_pointer: Some("/db/up".into()),
        equals: Some(serde_json::json!(true)),
    });
    spec.success_threshold = 1;
    let mut stream = run_probe(spec).unwrap();
    assert_eq!(next(&mut stream).await.result, ProbeResult::Pass);

    server.set(Mode::DbDown);
    let e = loop {
        let e = next(&mut stream).await;
        if e.result != ProbeResult::Pass {
            break e;
        }
    };
    assert_eq!(e.result, ProbeResult::Fail);
    assert!(e.triggered);
    assert!(
        e.evidence
            .error
            .as_deref()
            .unwrap()
            .contains("/db/up is false, expected true"),
        "{e:?}"
    );

    // A provider error (not JSON) is never a success, even with status 200.
    server.set(Mode::Garbage);
    let e = loop {
        let e = next(&mut stream).await;
        if e.result == ProbeResult::Error {
            break e;
        }
        assert_eq!(e.result, ProbeResult::Fail, "{e:?}");
    };
    assert_eq!(e.evidence.status, Some(200));
    assert!(
        e.evidence.error.as_deref().unwrap().contains("not JSON"),
        "{e:?}"
    );
    assert!(e.evidence.body.as_deref().unwrap().contains("maintenance"));
}

#[tokio::test]
async fn sql_probe_follows_its_expectation() {
    let db = Cluster::shared().create_database().await.unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE jobs (id int, stuck bool)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut spec = ProbeSpec::sql(
        "stuck_jobs",
        DatabaseUrl::parse(&db.url).unwrap(),
        "SELECT count(*) FROM jobs WHERE stuck",
        Expectation::AtMost(1),
    );
    spec.period = Duration::from_millis(50);
    spec.failure_threshold = 2;
    let mut stream = run_probe(spec).unwrap();
    assert_eq!(next(&mut stream).await.result, ProbeResult::Pass);
    sqlx::raw_sql("INSERT INTO jobs VALUES (1, true), (2, true)")
        .execute(&mut conn)
        .await
        .unwrap();
    let e = loop {
        let e = next(&mut stream).await;
        if e.triggered {
            break e;
        }
    };
    assert_eq!(e.result, ProbeResult::Fail);
    assert_eq!(e.evidence.body.as_deref(), Some("1 row, first value 2"));

    // An unreachable database is an error, never a pass.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gone = ProbeSpec::sql(
        "gone",
        DatabaseUrl::parse(&format!("postgres://postgres:hunter2@127.0.0.1:{port}/x")).unwrap(),
        "SELECT 1",
        Expectation::Equals(1),
    );
    gone.period = Duration::from_millis(50);
    let mut stream = run_probe(gone).unwrap();
    let e = next(&mut stream).await;
    assert_eq!(e.result, ProbeResult::Error);
    assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
}

#[tokio::test]
async fn sql_probes_cannot_write() {
    let db = Cluster::shared().create_database().await.unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE jobs (id int, stuck bool); INSERT INTO jobs VALUES (1, true)")
        .execute(&mut conn)
        .await
        .unwrap();
    let url = DatabaseUrl::parse(&db.url).unwrap();
    let writes = [
        ("insert", "INSERT INTO jobs VALUES (2, true) RETURNING 1"),
        ("update", "UPDATE jobs SET stuck = false RETURNING 1"),
        (
            "cte",
            "WITH d AS (DELETE FROM jobs RETURNING 1) SELECT count(*) FROM d",
        ),
        // Turning the default off takes effect only for later transactions, and this
        // script's statements share one.
        (
            "sneaky",
            "SET default_transaction_read_only = off; INSERT INTO jobs VALUES (3, true) RETURNING 1",
        ),
    ];
    let specs = writes
        .iter()
        .map(|(name, query)| {
            let mut spec = ProbeSpec::sql(*name, url.clone(), *query, Expectation::Equals(1));
            spec.period = Duration::from_millis(100);
            spec.timeout = Duration::from_secs(5);
            spec
        })
        .collect();
    let mut stream = run_probes(specs).unwrap();
    let mut pending: std::collections::BTreeSet<&str> = writes.iter().map(|(n, _)| *n).collect();
    while !pending.is_empty() {
        let e = next(&mut stream).await;
        pending.remove(e.probe.as_str());
        assert_eq!(e.result, ProbeResult::Error, "{e:?}");
        let error = e.evidence.error.as_deref().unwrap_or_default();
        assert!(error.contains("read-only transaction"), "{e:?}");
    }
    drop(stream);
    let rows: Vec<(i32, bool)> = sqlx::query_as("SELECT id, stuck FROM jobs ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, true)], "the table is unchanged");
}

#[tokio::test]
async fn watch_returns_the_triggering_event_or_a_healthy_window() {
    let healthy = Server::start(Mode::Healthy).await;
    let failing = Server::start(Mode::Failing).await;
    let mut seen = 0;
    let outcome = watch(
        vec![spec(&healthy.url, 2)],
        Duration::from_millis(300),
        |_| seen += 1,
    )
    .await
    .unwrap();
    let WatchOutcome::Healthy { attempts } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(attempts >= 2 && attempts == seen, "{attempts} {seen}");

    let mut other = spec(&failing.url, 2);
    other.name = "payments".into();
    let outcome = watch(
        vec![spec(&healthy.url, 2), other],
        Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    let WatchOutcome::Triggered(event) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(event.probe, "payments");
    assert_eq!(event.evidence.status, Some(503));
    let json = serde_json::to_value(&*event).unwrap();
    assert_eq!(json["triggered"], true);
    assert_eq!(json["result"], "fail");

    // Two probes with one name are refused up front.
    assert!(run_probes(vec![spec(&healthy.url, 1), spec(&healthy.url, 1)]).is_err());
}
