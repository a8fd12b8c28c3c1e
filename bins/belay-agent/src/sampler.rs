//! Lock gauges: a background sampler that takes one `belay_locks` snapshot of each target
//! every `lock_sample_period` and sets the `/metrics` gauges labelled with the target, so
//! alerting sees blocked sessions and lock waits without anyone running `belay locks`.
//!
//! One connection per sample, within the agent's connection budget, closed right after it (the same path as `belay locks`): at a
//! period of seconds, a connection's setup is a small cost next to a session held open for
//! the agent's whole life, which would take one of the target's `max_connections` slots,
//! sit idle in every DBA's `pg_stat_activity`, and stay pinned to a server a failover may
//! have replaced.
//!
//! While a migration statement of a sampled target runs, its lock guard polls the lock
//! queue every 10 ms anyway: [`TargetGauges`] takes each of those polls into the
//! `belay_blocked_sessions` and `belay_longest_lock_wait_seconds` gauges, so a chain that
//! forms during a migration shows within a guard poll instead of a sampling period, for no
//! extra query; when the statement ends they keep the waits of the guard's last poll that
//! the statement's end did not release (the migration's own and those queued behind it).

use std::time::Duration;

use belay_core::DatabaseUrl;
use belay_locks::{
    LocalLocks, LockMonitorApi, LockSnapshot, MonitorOptions, QueueObserver, QueueSeen,
};
use belay_telemetry::names;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::{self, Budget};
use crate::config::LoadedTarget;
use std::sync::Arc;

/// How long stopping waits for the sampling tasks; they stop at once unless a sample is
/// being dropped mid-way, which takes no longer than closing a socket.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A target to sample and how often.
#[derive(Debug, Clone)]
pub struct Sampled {
    name: String,
    url: DatabaseUrl,
    period: Duration,
    gauges: Arc<TargetGauges>,
}

impl Sampled {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the target's lock guard tells, for its gauges.
    pub fn observer(&self) -> Arc<dyn QueueObserver> {
        self.gauges.clone()
    }
}

/// The lock-wait gauges of one target: set by each sample, and by each poll of the
/// target's lock guard while a migration statement runs.
#[derive(Debug)]
pub struct TargetGauges {
    target: String,
}

impl TargetGauges {
    fn new(target: &str) -> Self {
        TargetGauges {
            target: target.to_string(),
        }
    }

    fn set_waits(&self, waiting: f64, longest_s: f64) {
        metrics::gauge!(names::BLOCKED_SESSIONS, "target" => self.target.clone()).set(waiting);
        metrics::gauge!(names::LONGEST_LOCK_WAIT_SECONDS, "target" => self.target.clone())
            .set(longest_s);
    }
}

impl QueueObserver for TargetGauges {
    #[allow(
        clippy::cast_precision_loss,
        reason = "gauges are f64; session counts far below 2^52"
    )]
    fn seen(&self, queue: QueueSeen) {
        self.set_waits(
            queue.waiting as f64,
            Duration::from_millis(queue.longest_wait_ms).as_secs_f64(),
        );
    }

    fn ended(&self, rest: QueueSeen) {
        self.seen(rest);
    }
}

/// The targets whose locks are sampled (those with a `lock_sample_period`).
pub fn plan(targets: &[LoadedTarget]) -> Vec<Sampled> {
    targets
        .iter()
        .filter_map(|t| {
            t.lock_sample_period.map(|period| Sampled {
                name: t.spec.name.clone(),
                url: t.spec.url.clone(),
                period,
                gauges: Arc::new(TargetGauges::new(&t.spec.name)),
            })
        })
        .collect()
}

/// The running sampler: one task per target.
#[derive(Debug)]
pub struct Sampler {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling `targets` on the current runtime. Call after the metrics recorder
    /// is installed: gauges set before it are lost.
    pub fn start(targets: Vec<Sampled>, budget: &Budget) -> Sampler {
        let stop = CancellationToken::new();
        let n = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        if n > 0 {
            tracing::info!(targets = n, "sampling locks for the metrics gauges");
        }
        let tasks = targets
            .into_iter()
            .zip(0u32..)
            .map(|(t, i)| {
                // Spread the targets over the period: an agent with a hundred tenant
                // databases on one server should not query them all in the same instant.
                let offset = t.period / n.max(1) * i;
                let span = tracing::info_span!("lock_sampler", target = %t.name);
                tokio::spawn(sample_loop(t, offset, stop.clone(), budget.clone()).instrument(span))
            })
            .collect();
        Sampler { stop, tasks }
    }

    /// A handle that stops sampling when cancelled (by the daemon's stop signal).
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops sampling and waits (briefly) for the tasks to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let all = join_all(self.tasks);
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::warn!("lock sampling did not stop within the grace period");
        }
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        // A panicked task has already stopped; nothing is left to wait for.
        let _ = t.await;
    }
}

async fn sample_loop(t: Sampled, offset: Duration, stop: CancellationToken, budget: Budget) {
    let locks = budget::Locks {
        inner: Arc::new(LocalLocks::new([(t.name.clone(), t.url.clone())])),
        budget,
    };
    let options = MonitorOptions::default();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, t.period);
    // A slow sample delays the next instead of bunching several behind it.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the last sample failed: warned once per streak of failures, not per sample.
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        // A sample that takes longer than the period is worth less than the next one;
        // dropping it closes its connection.
        let sample = tokio::time::timeout(t.period, locks.snapshot(&t.name, &options));
        let result = tokio::select! {
            () = stop.cancelled() => break,
            r = sample => r,
        };
        let result = match result {
            Ok(r) => r.map_err(|e| e.message),
            Err(_) => Err(format!(
                "the sample took longer than its period ({})",
                belay_core::format_duration(t.period)
            )),
        };
        match result {
            Ok(snapshot) => {
                record(&t.gauges, &snapshot);
                if failing {
                    tracing::info!("lock sampling works again");
                    failing = false;
                }
            }
            Err(message) => {
                metrics::counter!(names::LOCK_SAMPLE_FAILURES_TOTAL, "target" => t.name.clone())
                    .increment(1);
                if failing {
                    tracing::debug!(error = %message, "lock sample failed again");
                } else {
                    // The message is the API's, already redacted; the gauges keep their
                    // last values, and the failure counter says they are stale.
                    tracing::warn!(
                        error = %message,
                        "lock sample failed; the lock gauges keep their last values until a sample succeeds (said once until then)"
                    );
                    failing = true;
                }
            }
        }
    }
    tracing::debug!("lock sampling stopped");
}

#[allow(
    clippy::cast_precision_loss,
    reason = "gauges are f64; counts and byte lags far below 2^52"
)]
fn record(gauges: &TargetGauges, s: &LockSnapshot) {
    let target = &gauges.target;
    let gauge = |name: &'static str, value: f64| {
        metrics::gauge!(name, "target" => target.to_string()).set(value);
    };
    gauges.set_waits(
        s.waiting_count() as f64,
        Duration::from_millis(s.longest_wait_ms()).as_secs_f64(),
    );
    gauge(names::LONG_RUNNING_QUERIES, s.long_running.len() as f64);
    gauge(
        names::IDLE_IN_TRANSACTION_SESSIONS,
        s.idle_in_transaction.len() as f64,
    );
    let lag = s
        .replication
        .iter()
        .filter_map(|r| r.replay_lag_bytes)
        .max()
        .unwrap_or(0)
        .max(0);
    gauge(names::REPLICATION_LAG_BYTES, lag as f64);
}
