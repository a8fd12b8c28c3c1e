//! `cargo xtask bench probes`: how long an HTTP probe takes to raise its trigger event
//! once the endpoint it watches starts failing.
//!
//! An in-process HTTP server on 127.0.0.1 answers 200 until it is switched to 500 at a
//! recorded instant; `belay_health::watch` runs one HTTP probe against it, and the time
//! from the switch to the `triggered` event is measured. The first failing attempt comes
//! up to one period after the switch (the phase), then `threshold - 1` more periods pass,
//! so the expected value lies between `(threshold - 1) × period` and `threshold × period`.
//! Each repetition switches at a different phase, spread evenly over one period, so the
//! median reflects an endpoint failing at a random moment.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_health::{ProbeSpec, WatchOutcome, watch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::util::heading;

/// Passing attempts seen before the switch, so the probe is known to be healthy.
const PASSES_BEFORE_SWITCH: usize = 2;

pub fn probes(reps: usize, period_ms: u64, threshold: u32) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    anyhow::ensure!(period_ms > 0, "--period-ms must be above zero");
    anyhow::ensure!(threshold > 0, "--threshold must be at least 1");
    let period = Duration::from_millis(period_ms);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start a tokio runtime")?;
    runtime.block_on(run(reps, period, threshold))
}

async fn run(reps: usize, period: Duration, threshold: u32) -> Result<()> {
    let server = Server::start().await?;
    let timeout = Duration::from_secs(1).min(period);
    heading(&format!(
        "probes: HTTP probe on {} (period {}, timeout {}, failure threshold {threshold}), {reps} repetitions",
        server.url,
        secs(period),
        secs(timeout)
    ));
    let mut took = Vec::with_capacity(reps);
    for rep in 1..=reps {
        // Switch `offset` after a pass was received: spread over one period, so the
        // phase between the switch and the next attempt covers (0, period) evenly.
        #[allow(clippy::cast_precision_loss)]
        let fraction = (rep as f64 - 0.5) / reps as f64;
        let offset = period.mul_f64(fraction);
        let r = one_rep(&server, period, timeout, threshold, offset).await?;
        println!(
            "rep {rep}: switch→first failure {:.2}s, switch→trigger {:.2}s ({} failing attempts)",
            r.first_failure.as_secs_f64(),
            r.trigger.as_secs_f64(),
            r.failures
        );
        took.push(r.trigger);
    }
    let median = median(&took);
    let max = took.iter().max().copied().unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let target = period.mul_f64(f64::from(threshold) + 0.5);
    heading("results");
    println!(
        "probes: switch→trigger median {:.2}s, max {:.2}s (period {}, threshold {threshold}; target ≤ {}: {})",
        median.as_secs_f64(),
        max.as_secs_f64(),
        secs(period),
        secs(target),
        if max <= target { "met" } else { "MISSED" }
    );
    Ok(())
}

struct RepResult {
    first_failure: Duration,
    trigger: Duration,
    failures: u32,
}

async fn one_rep(
    server: &Server,
    period: Duration,
    timeout: Duration,
    threshold: u32,
    offset: Duration,
) -> Result<RepResult> {
    server.set_status(200);
    let mut spec = ProbeSpec::http("bench", server.url.clone());
    spec.period = period;
    spec.timeout = timeout;
    spec.failure_threshold = threshold;

    let healthy = Arc::new(Notify::new());
    let switched_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let switcher = {
        let (healthy, switched_at, status) =
            (healthy.clone(), switched_at.clone(), server.status.clone());
        tokio::spawn(async move {
            healthy.notified().await;
            tokio::time::sleep(offset).await;
            // Recorded under the lock, so an event handler never sees a 500 response
            // without also seeing the switch instant.
            let mut at = switched_at.lock().unwrap_or_else(|p| p.into_inner());
            status.store(500, Ordering::SeqCst);
            *at = Some(Instant::now());
        })
    };

    let mut passes = 0;
    let mut first_failure = None;
    let mut failures = 0;
    let mut problem = None;
    let window = period * (threshold + PASSES_BEFORE_SWITCH as u32 + 5) + Duration::from_secs(5);
    let outcome = watch(vec![spec], window, |event| {
        let now = Instant::now();
        let switched = *switched_at.lock().unwrap_or_else(|p| p.into_inner());
        if event.result.is_failure() {
            failures += 1;
            match switched {
                None => {
                    problem.get_or_insert_with(|| {
                        format!(
                            "attempt {} failed before the switch: {}",
                            event.seq, event.evidence
                        )
                    });
                }
                Some(at) => {
                    first_failure.get_or_insert(now - at);
                }
            }
        } else {
            if switched.is_some() {
                problem.get_or_insert_with(|| {
                    format!("attempt {} passed after the switch", event.seq)
                });
            }
            passes += 1;
            if passes == PASSES_BEFORE_SWITCH {
                healthy.notify_one();
            }
        }
    })
    .await
    .context("the probe did not run")?;
    let triggered_at = Instant::now();
    switcher.abort();
    if let Some(problem) = problem {
        bail!("{problem}");
    }
    let WatchOutcome::Triggered(event) = outcome else {
        bail!(
            "no trigger event within {} of starting the probe",
            secs(window)
        );
    };
    let switched = (*switched_at.lock().unwrap_or_else(|p| p.into_inner()))
        .context("triggered without a switch")?;
    anyhow::ensure!(
        event.consecutive_failures == threshold,
        "triggered after {} consecutive failures, expected {threshold}",
        event.consecutive_failures
    );
    Ok(RepResult {
        first_failure: first_failure.unwrap_or_default(),
        trigger: triggered_at - switched,
        failures,
    })
}

/// A minimal HTTP/1.1 server answering every request with the current status and
/// `Connection: close`.
struct Server {
    url: String,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("could not listen on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("could not read the listening address")?;
        let status = Arc::new(AtomicU16::new(200));
        let shared = status.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let status = shared.clone();
                tokio::spawn(async move {
                    let _ = respond(stream, &status).await;
                });
            }
        });
        Ok(Server {
            url: format!("http://{addr}/healthz"),
            status,
            task,
        })
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn respond(mut stream: tokio::net::TcpStream, status: &AtomicU16) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // Headers end at the first blank line; a probe sends no body.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let code = status.load(Ordering::SeqCst);
    let (reason, body) = if code == 200 {
        ("OK", "ok\n")
    } else {
        ("Internal Server Error", "failing\n")
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s}s")
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_durations() {
        let d = Duration::from_millis;
        assert_eq!(median(&[d(300), d(100), d(200)]), d(200));
        assert_eq!(median(&[d(400), d(100), d(200), d(300)]), d(250));
    }

    #[test]
    fn whole_and_fractional_seconds() {
        assert_eq!(secs(Duration::from_secs(1)), "1s");
        assert_eq!(secs(Duration::from_millis(3500)), "3.5s");
    }
}
