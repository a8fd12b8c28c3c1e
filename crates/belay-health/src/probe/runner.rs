//! Running probes: one task per probe, attempts every `period` under `timeout`, events
//! into a channel.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{
    Evidence, HttpProbe, ProbeEvent, ProbeKind, ProbeMachine, ProbeOutcome, ProbeResult, ProbeSpec,
    SqlProbe, Transition,
};
use crate::HealthError;
use crate::postflight::Observed;

/// How much of a body is read (the rest is ignored) and how much is kept as evidence.
const BODY_READ_LIMIT: usize = 256 * 1024;
const BODY_EXCERPT: usize = 512;

/// Events of one or more running probes. Dropping the stream stops the probes.
#[derive(Debug)]
pub struct ProbeStream {
    rx: mpsc::Receiver<ProbeEvent>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stream for ProbeStream {
    type Item = ProbeEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ProbeEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts one probe on the current tokio runtime. The stream yields an event per attempt
/// and never ends while the stream is held. The spec is validated first.
pub fn run_probe(spec: ProbeSpec) -> Result<ProbeStream, HealthError> {
    run_probes(vec![spec])
}

/// Starts several probes; their events are interleaved in one stream.
pub fn run_probes(specs: Vec<ProbeSpec>) -> Result<ProbeStream, HealthError> {
    let mut names = std::collections::HashSet::new();
    for spec in &specs {
        spec.validate()?;
        if !names.insert(spec.name.clone()) {
            return Err(HealthError::invalid(
                "probes",
                format!("two probes are named {:?}", spec.name),
            ));
        }
    }
    let mut probers = Vec::with_capacity(specs.len());
    for spec in specs {
        let prober = Prober::new(&spec)?;
        probers.push((spec, prober));
    }
    let (tx, rx) = mpsc::channel(64);
    let tasks = probers
        .into_iter()
        .map(|(spec, prober)| tokio::spawn(probe_loop(spec, prober, tx.clone())))
        .collect();
    Ok(ProbeStream { rx, tasks })
}

/// How a watch window ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchOutcome {
    /// The window passed without any probe crossing its failure threshold.
    Healthy { attempts: u64 },
    /// A probe crossed its threshold: the event, with its evidence.
    Triggered(Box<ProbeEvent>),
}

/// Runs `specs` for `window` (`migrate --watch 2m`, `probe … --for D`), handing every
/// event to `on_event`, and returns at the first triggered event or when the window ends.
/// With no probes it returns at once.
pub async fn watch(
    specs: Vec<ProbeSpec>,
    window: Duration,
    mut on_event: impl FnMut(&ProbeEvent),
) -> Result<WatchOutcome, HealthError> {
    use futures::StreamExt;
    if specs.is_empty() {
        return Ok(WatchOutcome::Healthy { attempts: 0 });
    }
    let mut stream = run_probes(specs)?;
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    let mut attempts = 0;
    loop {
        tokio::select! {
            () = &mut deadline => return Ok(WatchOutcome::Healthy { attempts }),
            event = stream.next() => {
                let Some(event) = event else {
                    return Ok(WatchOutcome::Healthy { attempts });
                };
                attempts += 1;
                on_event(&event);
                if event.triggered {
                    return Ok(WatchOutcome::Triggered(Box::new(event)));
                }
            }
        }
    }
}

async fn probe_loop(spec: ProbeSpec, mut prober: Prober, tx: mpsc::Sender<ProbeEvent>) {
    if !spec.initial_delay.is_zero() {
        tokio::time::sleep(spec.initial_delay).await;
    }
    let mut machine = ProbeMachine::new(spec.failure_threshold, spec.success_threshold);
    let mut ticker = tokio::time::interval(spec.period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let target = spec.target();
    let mut seq = 0;
    loop {
        ticker.tick().await;
        seq += 1;
        let outcome = prober.attempt(spec.timeout).await;
        let transition = machine.observe(outcome.result);
        let event = ProbeEvent {
            at: chrono::Utc::now(),
            probe: spec.name.clone(),
            target: target.clone(),
            seq,
            result: outcome.result,
            evidence: outcome.evidence,
            consecutive_failures: machine.consecutive_failures(),
            consecutive_successes: machine.consecutive_successes(),
            failure_threshold: spec.failure_threshold,
            state: machine.state(),
            transition,
            triggered: transition == Some(Transition::Triggered),
        };
        if event.triggered {
            tracing::warn!(probe = %spec.name, evidence = %event.evidence, "probe failure threshold crossed");
        }
        if tx.send(event).await.is_err() {
            return; // nobody listens any more
        }
    }
}

/// Counts one attempt of a target's probe: failures, transitions, and whether it is past
/// its failure threshold now. Recorded by the health checker that knows the target's name
/// (`HealthTargets::probe`), where the probe runs.
pub(crate) fn record_metrics(target: &str, event: &ProbeEvent) {
    let (target, probe) = (target.to_string(), event.probe.clone());
    if event.result.is_failure() {
        metrics::counter!("belay_probe_failures_total", "target" => target.clone(), "probe" => probe.clone())
            .increment(1);
    }
    if let Some(t) = event.transition {
        let to = match t {
            Transition::Triggered => "triggered",
            Transition::Recovered => "recovered",
        };
        metrics::counter!("belay_probe_transitions_total", "target" => target.clone(), "probe" => probe.clone(), "to" => to)
            .increment(1);
    }
    let healthy = if event.state == crate::ProbeState::Triggered {
        0.0
    } else {
        1.0
    };
    metrics::gauge!("belay_probe_healthy", "target" => target, "probe" => probe).set(healthy);
}

/// Performs attempts of one probe, keeping what can be reused between them.
enum Prober {
    Http {
        client: reqwest::Client,
        probe: HttpProbe,
    },
    Sql {
        opts: Box<PgConnectOptions>,
        probe: SqlProbe,
        conn: Option<PgConnection>,
    },
}

impl Prober {
    fn new(spec: &ProbeSpec) -> Result<Prober, HealthError> {
        match &spec.kind {
            ProbeKind::Http(probe) => {
                // reqwest is built without a default crypto provider; installing ours
                // again is a harmless no-op error.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_max_idle_per_host(0) // a fresh connection per attempt, as kubelet
                    .user_agent(concat!("belay-probe/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| {
                        HealthError::invalid(format!("probe {:?}", spec.name), e.to_string())
                    })?;
                Ok(Prober::Http {
                    client,
                    probe: probe.clone(),
                })
            }
            ProbeKind::Sql(probe) => {
                let ms = spec.timeout.as_millis().max(1);
                let opts = probe
                    .url
                    .expose()
                    .parse::<PgConnectOptions>()
                    .map_err(|e| {
                        HealthError::invalid(
                            format!("probe {:?}", spec.name),
                            belay_core::redact_url(&e.to_string()),
                        )
                    })?
                    .application_name("belay-probe")
                    // A probe runs someone's query with the target's credentials, over and
                    // over: every transaction it starts is read-only, so a probe written as
                    // an INSERT or UPDATE fails with its error as evidence instead of
                    // writing. (A script that ends its transaction and turns this off
                    // itself is not stopped; a role without write grants is the wall.)
                    .options([
                        ("statement_timeout", format!("{ms}ms")),
                        ("default_transaction_read_only", "on".to_string()),
                    ]);
                Ok(Prober::Sql {
                    opts: Box::new(opts),
                    probe: probe.clone(),
                    conn: None,
                })
            }
        }
    }

    async fn attempt(&mut self, timeout: Duration) -> ProbeOutcome {
        let started = Instant::now();
        let attempt = async {
            match self {
                Prober::Http { client, probe } => http_attempt(client, probe).await,
                Prober::Sql { opts, probe, conn } => sql_attempt(opts, probe, conn).await,
            }
        };
        let mut outcome = match tokio::time::timeout(timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                if let Prober::Sql { conn, .. } = self {
                    *conn = None; // mid-query: start afresh next time
                }
                ProbeOutcome {
                    result: ProbeResult::Error,
                    evidence: Evidence {
                        error: Some(format!(
                            "timed out after {}",
                            belay_core::format_duration(timeout)
                        )),
                        ..Evidence::default()
                    },
                }
            }
        };
        outcome.evidence.elapsed_ms =
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        outcome
    }
}

fn error(
    result: ProbeResult,
    status: Option<u16>,
    body: Option<String>,
    err: String,
) -> ProbeOutcome {
    ProbeOutcome {
        result,
        evidence: Evidence {
            status,
            body,
            error: Some(err),
            elapsed_ms: 0,
        },
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(BODY_EXCERPT).collect();
    if text.chars().count() > BODY_EXCERPT {
        out.push('…');
    }
    out
}

async fn http_attempt(client: &reqwest::Client, probe: &HttpProbe) -> ProbeOutcome {
    let method =
        reqwest::Method::from_bytes(probe.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut response = match client.request(method, &probe.url).send().await {
        Ok(r) => r,
        Err(e) => {
            return error(
                ProbeResult::Error,
                None,
                None,
                belay_core::redact_url(&error_chain(&e)),
            );
        }
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() >= BODY_READ_LIMIT {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return error(
                    ProbeResult::Error,
                    Some(status),
                    Some(excerpt(&body)),
                    format!("reading the body: {}", error_chain(&e)),
                );
            }
        }
    }
    let status_ok = match probe.expect_status {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    if !status_ok {
        let want = probe
            .expect_status
            .map_or_else(|| "2xx or 3xx".to_string(), |s| s.to_string());
        return error(
            ProbeResult::Fail,
            Some(status),
            Some(excerpt(&body)),
            format!("status {status}, expected {want}"),
        );
    }
    if let Some(pointer) = &probe.json_pointer {
        let json: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    ProbeResult::Error,
                    Some(status),
                    Some(excerpt(&body)),
                    format!("body is not JSON: {e}"),
                );
            }
        };
        let found = json.pointer(pointer);
        let verdict = match (found, &probe.equals) {
            (None, _) => Err(format!("JSON pointer {pointer} not found")),
            (Some(v), Some(want)) if v != want => {
                Err(format!("JSON pointer {pointer} is {v}, expected {want}"))
            }
            _ => Ok(()),
        };
        if let Err(msg) = verdict {
            return error(ProbeResult::Fail, Some(status), Some(excerpt(&body)), msg);
        }
    }
    ProbeOutcome {
        result: ProbeResult::Pass,
        evidence: Evidence {
            status: Some(status),
            body: Some(excerpt(&body)),
            error: None,
            elapsed_ms: 0,
        },
    }
}

async fn sql_attempt(
    opts: &PgConnectOptions,
    probe: &SqlProbe,
    slot: &mut Option<PgConnection>,
) -> ProbeOutcome {
    let conn = match slot {
        Some(conn) => conn,
        None => match PgConnection::connect_with(opts).await {
            Ok(conn) => {
                belay_core::send_without_delay();
                slot.insert(conn)
            }
            Err(e) => {
                return error(
                    ProbeResult::Error,
                    None,
                    None,
                    format!(
                        "connecting to {}: {}",
                        probe.url,
                        belay_core::redact_url(&e.to_string())
                    ),
                );
            }
        },
    };
    match sqlx::raw_sql(AssertSqlSafe(probe.query.clone()))
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => {
            let observed = Observed::from_rows(&rows);
            let seen = observed.describe();
            if probe.expect.holds(&observed) {
                ProbeOutcome {
                    result: ProbeResult::Pass,
                    evidence: Evidence {
                        body: Some(seen),
                        ..Evidence::default()
                    },
                }
            } else {
                error(
                    ProbeResult::Fail,
                    None,
                    Some(seen),
                    format!("expected {}", probe.expect),
                )
            }
        }
        Err(e) => {
            *slot = None;
            error(
                ProbeResult::Error,
                None,
                None,
                format!(
                    "query failed: {}",
                    crate::pg_error::describe(&e, &probe.query)
                ),
            )
        }
    }
}

/// `error sending request: client error (Connect): tcp connect error: Connection refused`
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;

    /// Records `name{labels} += n` lines.
    #[derive(Debug, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    struct Line(Arc<Mutex<Vec<String>>>, String);

    impl CounterFn for Line {
        fn increment(&self, value: u64) {
            self.0
                .lock()
                .expect("lines")
                .push(format!("{} += {value}", self.1));
        }
        fn absolute(&self, _: u64) {}
    }

    impl Recorder for Lines {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            Counter::from_arc(Arc::new(Line(self.0.clone(), name)))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn failures_and_transitions_are_counted_per_probe() {
        let recorder = Lines::default();
        let event = |result, transition| ProbeEvent {
            at: chrono::Utc::now(),
            probe: "api".into(),
            target: "GET http://x".into(),
            seq: 1,
            result,
            evidence: Default::default(),
            consecutive_failures: 0,
            consecutive_successes: 0,
            failure_threshold: 1,
            state: crate::ProbeState::Healthy,
            transition,
            triggered: false,
        };
        metrics::with_local_recorder(&recorder, || {
            record_metrics("shop", &event(ProbeResult::Pass, None));
            record_metrics("shop", &event(ProbeResult::Fail, None));
            record_metrics(
                "shop",
                &event(ProbeResult::Error, Some(Transition::Triggered)),
            );
            record_metrics(
                "shop",
                &event(ProbeResult::Pass, Some(Transition::Recovered)),
            );
        });
        let lines = recorder.0.lock().expect("lines").clone();
        assert_eq!(
            lines,
            [
                "belay_probe_failures_total{target=shop,probe=api} += 1",
                "belay_probe_failures_total{target=shop,probe=api} += 1",
                "belay_probe_transitions_total{target=shop,probe=api,to=triggered} += 1",
                "belay_probe_transitions_total{target=shop,probe=api,to=recovered} += 1",
            ]
        );
    }
}
