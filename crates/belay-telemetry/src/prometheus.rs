//! The Prometheus side: one process-wide `metrics` recorder, the `/metrics` endpoint, and the
//! names, units and help texts of every `belay_*` metric in one place.
//!
//! Record with the `metrics` macros and the names in [`names`], e.g.
//! `metrics::counter!(names::MIGRATIONS_TOTAL, "target" => t, "status" => "applied").increment(1)`.
//! Counters already carry their `_total` suffix in the name; the exporter adds none.

use std::future::Future;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
pub use metrics::Unit;
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// Metric names. Labels are given in each constant's documentation; who exposes what is in
/// [`CATALOG`] and `docs/metrics.md`.
pub mod names {
    /// Counter, labels `target`, `status` (`applied`, `failed`): migration scripts run, by
    /// the process that runs the executor (the agent, or the CLI in local mode).
    pub const MIGRATIONS_TOTAL: &str = "belay_migrations_total";
    /// Histogram, seconds, label `target`: wall time of one migration.
    pub const MIGRATION_DURATION_SECONDS: &str = "belay_migration_duration_seconds";
    /// Histogram, seconds, label `target`: time a migration waited for its locks.
    pub const MIGRATION_LOCK_WAIT_SECONDS: &str = "belay_migration_lock_wait_seconds";
    /// Counter, label `target`: migration attempts retried after a lock timeout.
    pub const MIGRATION_RETRIES_TOTAL: &str = "belay_migration_retries_total";
    /// Counter, labels `target`, `kind` (`migrations`: checksum mismatches, unreadable or
    /// conflicting files found by `validate`; `postflight`: blocking postflight results):
    /// validation errors found.
    pub const VALIDATION_ERRORS_TOTAL: &str = "belay_validation_errors_total";
    /// Counter, label `status` (`succeeded`, `failed`, `rolled_back`, `escalated`): one
    /// target's deployments ended, counted by the process running its pipeline.
    pub const DEPLOYMENTS_TOTAL: &str = "belay_deployments_total";
    /// Histogram, seconds, label `status` (as [`DEPLOYMENTS_TOTAL`]): one target's
    /// deployment, from `planned` to its end.
    pub const DEPLOYMENT_DURATION_SECONDS: &str = "belay_deployment_duration_seconds";
    /// Gauge, label `step` (`planned` … `watching`, `rolling_back`): targets whose pipeline is in that step
    /// now.
    pub const DEPLOYMENT_TARGETS: &str = "belay_deployment_targets";
    /// Gauge: agents currently connected to the controller.
    pub const AGENTS_CONNECTED: &str = "belay_agents_connected";
    /// Counter, labels `strategy`, `trigger`, `result`: rollbacks performed.
    pub const ROLLBACKS_TOTAL: &str = "belay_rollbacks_total";
    /// Histogram, seconds, labels `strategy`, `result`: wall time of one rollback.
    pub const ROLLBACK_DURATION_SECONDS: &str = "belay_rollback_duration_seconds";
    /// Gauge: rollbacks running now.
    pub const ROLLBACKS_IN_PROGRESS: &str = "belay_rollbacks_in_progress";
    /// Histogram, seconds, label `target`: wall time of one successful backup.
    pub const BACKUP_DURATION_SECONDS: &str = "belay_backup_duration_seconds";
    /// Gauge, bytes, label `target`: size of the latest successful backup.
    pub const BACKUP_SIZE_BYTES: &str = "belay_backup_size_bytes";
    /// Gauge, Unix seconds, label `target`: when the latest successful backup finished.
    pub const BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "belay_backup_last_success_timestamp_seconds";
    /// Counter, label `target`: backups that failed.
    pub const BACKUP_FAILURES_TOTAL: &str = "belay_backup_failures_total";
    /// Gauge, label `target`: sessions of the target's database waiting for a lock, as the
    /// agent's last lock sample saw them.
    pub const BLOCKED_SESSIONS: &str = "belay_blocked_sessions";
    /// Gauge, seconds, label `target`: the longest lock wait in the last sample.
    pub const LONGEST_LOCK_WAIT_SECONDS: &str = "belay_longest_lock_wait_seconds";
    /// Gauge, label `target`: queries running longer than 5 minutes in the last sample.
    pub const LONG_RUNNING_QUERIES: &str = "belay_long_running_queries";
    /// Gauge, label `target`: sessions idle in a transaction for over a minute in the
    /// last sample.
    pub const IDLE_IN_TRANSACTION_SESSIONS: &str = "belay_idle_in_transaction_sessions";
    /// Gauge, bytes, label `target`: replay lag of the target server's most lagging
    /// streaming replica (0 without replicas).
    pub const REPLICATION_LAG_BYTES: &str = "belay_replication_lag_bytes";
    /// Counter, label `target`: lock samples that failed (the lock gauges then keep their
    /// last values).
    pub const LOCK_SAMPLE_FAILURES_TOTAL: &str = "belay_lock_sample_failures_total";
    /// Counter, labels `target`, `probe`: failed probe attempts.
    pub const PROBE_FAILURES_TOTAL: &str = "belay_probe_failures_total";
    /// Counter, labels `target`, `probe`, `to` (`triggered`, `recovered`): probe state
    /// changes.
    pub const PROBE_TRANSITIONS_TOTAL: &str = "belay_probe_transitions_total";
    /// Gauge, labels `target`, `probe`: 0 while a watched probe is past its failure
    /// threshold, 1 otherwise (healthy, or not being watched).
    pub const PROBE_HEALTHY: &str = "belay_probe_healthy";
    /// Counter, label `target`: migration statements the lock guard cancelled because
    /// application sessions queued behind them longer than `max_blocking`.
    pub const LOCK_GUARD_TRIPS_TOTAL: &str = "belay_lock_guard_trips_total";
    /// Counter, labels `target`, `backfill`: rows updated by `belay backfill` batches.
    pub const BACKFILL_ROWS_TOTAL: &str = "belay_backfill_rows_total";
    /// Gauge, labels `target`, `backfill`: share of the table's rows a backfill has walked
    /// (from 0 to 1; estimated from the planner's row count until the last batch).
    pub const BACKFILL_PROGRESS_RATIO: &str = "belay_backfill_progress_ratio";
    /// Counter, labels `target`, `backfill`: batches rolled back and retried after a lock
    /// timeout or a deadlock.
    pub const BACKFILL_LOCK_RETRIES_TOTAL: &str = "belay_backfill_lock_retries_total";
}

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// As Prometheus' `# TYPE` line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which process exposes a metric on its `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposer {
    Agent,
    Controller,
    /// Both daemons; each counts only what happens in it, so sums never double count.
    Both,
    /// The `belay` CLI, in-process only (it serves no `/metrics`).
    Cli,
}

impl Exposer {
    pub fn as_str(self) -> &'static str {
        match self {
            Exposer::Agent => "agent",
            Exposer::Controller => "controller",
            Exposer::Both => "agent, controller",
            Exposer::Cli => "cli",
        }
    }
}

/// One `belay_*` metric: the source of its `# HELP` line and of the docs' table.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub labels: &'static [&'static str],
    pub exposed_by: Exposer,
    pub help: &'static str,
}

/// Label values a deployment's end is counted under.
pub const DEPLOYMENT_STATUSES: [&str; 4] = ["succeeded", "failed", "rolled_back", "escalated"];
/// The pipeline steps a target can be in while its deployment runs.
pub const DEPLOYMENT_STEPS: [&str; 7] = [
    "planned",
    "preflight",
    "backing_up",
    "migrating",
    "validating",
    "watching",
    "rolling_back",
];
/// Rollback label values agreed with the rollback controller.
pub const ROLLBACK_STRATEGIES: [&str; 4] = ["undo", "table_restore", "full_restore", "escalate"];
pub const ROLLBACK_RESULTS: [&str; 3] = ["rolled_back", "escalated", "aborted"];
/// What started a rollback: the pipeline's failure handler (a failed step), an alert
/// through the controller's webhook, or a person (`belay rollback`).
pub const ROLLBACK_TRIGGERS: [&str; 3] = ["pipeline", "alert", "manual"];

/// Every `belay_*` metric, in the order of `docs/metrics.md`.
pub const CATALOG: &[Metric] = {
    use Exposer::*;
    use Kind::*;
    use names::*;
    &[
        Metric {
            name: DEPLOYMENTS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["status"],
            exposed_by: Agent,
            help: "Deployments of one target ended, by outcome; counted by the process running the target's pipeline.",
        },
        Metric {
            name: DEPLOYMENT_DURATION_SECONDS,
            kind: Histogram,
            unit: Some(Unit::Seconds),
            labels: &["status"],
            exposed_by: Agent,
            help: "Wall time of one target's deployment, from planned to its end, by outcome.",
        },
        Metric {
            name: DEPLOYMENT_TARGETS,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &["step"],
            exposed_by: Agent,
            help: "Targets whose deployment pipeline is in each step now.",
        },
        Metric {
            name: MIGRATIONS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "status"],
            exposed_by: Agent,
            help: "Migration scripts run, by target database and outcome (applied, failed).",
        },
        Metric {
            name: MIGRATION_DURATION_SECONDS,
            kind: Histogram,
            unit: Some(Unit::Seconds),
            labels: &["target"],
            exposed_by: Agent,
            help: "Wall time of one migration, from first statement to commit.",
        },
        Metric {
            name: MIGRATION_LOCK_WAIT_SECONDS,
            kind: Histogram,
            unit: Some(Unit::Seconds),
            labels: &["target"],
            exposed_by: Agent,
            help: "Time a migration spent waiting for its locks.",
        },
        Metric {
            name: MIGRATION_RETRIES_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Migration attempts retried after a lock timeout.",
        },
        Metric {
            name: LOCK_GUARD_TRIPS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Migration statements the lock guard cancelled because application sessions queued behind them longer than max_blocking, by target.",
        },
        Metric {
            name: VALIDATION_ERRORS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "kind"],
            exposed_by: Agent,
            help: "Validation errors found: kind=migrations (checksum mismatches, unreadable or conflicting migrations), kind=postflight (blocking postflight results).",
        },
        Metric {
            name: BACKUP_DURATION_SECONDS,
            kind: Histogram,
            unit: Some(Unit::Seconds),
            labels: &["target"],
            exposed_by: Agent,
            help: "Wall time of one successful backup, by target.",
        },
        Metric {
            name: BACKUP_SIZE_BYTES,
            kind: Gauge,
            unit: Some(Unit::Bytes),
            labels: &["target"],
            exposed_by: Agent,
            help: "Size of the target's latest successful backup (from its catalog at start-up).",
        },
        Metric {
            name: BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS,
            kind: Gauge,
            unit: Some(Unit::Seconds),
            labels: &["target"],
            exposed_by: Agent,
            help: "Unix time at which the target's latest successful backup finished (from its catalog at start-up; 0: none).",
        },
        Metric {
            name: BACKUP_FAILURES_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Backups of the target that failed.",
        },
        Metric {
            name: PROBE_HEALTHY,
            kind: Gauge,
            unit: None,
            labels: &["target", "probe"],
            exposed_by: Agent,
            help: "The probe's last verdict: 0 once it crossed its failure threshold, 1 while healthy (or never run). It keeps its value after a watch window ends, until the probe is watched again (a rollback's verification, the next deployment).",
        },
        Metric {
            name: PROBE_FAILURES_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "probe"],
            exposed_by: Agent,
            help: "Failed probe attempts.",
        },
        Metric {
            name: PROBE_TRANSITIONS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "probe", "to"],
            exposed_by: Agent,
            help: "Probe state changes: triggered (failure threshold crossed) and recovered.",
        },
        Metric {
            name: BLOCKED_SESSIONS,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Sessions waiting for a lock in the target database, by target (agent's last lock sample, or its lock guard's last poll while a migration statement runs).",
        },
        Metric {
            name: LONGEST_LOCK_WAIT_SECONDS,
            kind: Gauge,
            unit: Some(Unit::Seconds),
            labels: &["target"],
            exposed_by: Agent,
            help: "The longest lock wait in the target database, by target (agent's last lock sample, or its lock guard's last poll while a migration statement runs).",
        },
        Metric {
            name: LONG_RUNNING_QUERIES,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Queries running longer than 5 minutes in the target database, by target (agent's last lock sample).",
        },
        Metric {
            name: IDLE_IN_TRANSACTION_SESSIONS,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Sessions idle in a transaction for over a minute in the target database, by target (agent's last lock sample).",
        },
        Metric {
            name: REPLICATION_LAG_BYTES,
            kind: Gauge,
            unit: Some(Unit::Bytes),
            labels: &["target"],
            exposed_by: Agent,
            help: "Replay lag of the target server's most lagging streaming replica, by target (0 without replicas).",
        },
        Metric {
            name: LOCK_SAMPLE_FAILURES_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target"],
            exposed_by: Agent,
            help: "Lock samples that failed, by target; the lock gauges keep their last values meanwhile.",
        },
        Metric {
            name: ROLLBACKS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["strategy", "trigger", "result"],
            exposed_by: Both,
            help: "Rollbacks performed, by strategy, what triggered them and result.",
        },
        Metric {
            name: ROLLBACK_DURATION_SECONDS,
            kind: Histogram,
            unit: Some(Unit::Seconds),
            labels: &["strategy", "result"],
            exposed_by: Both,
            help: "Wall time of one rollback, by strategy and result.",
        },
        Metric {
            name: ROLLBACKS_IN_PROGRESS,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &[],
            exposed_by: Both,
            help: "Rollbacks running now.",
        },
        Metric {
            name: AGENTS_CONNECTED,
            kind: Gauge,
            unit: Some(Unit::Count),
            labels: &[],
            exposed_by: Controller,
            help: "Agents currently connected to the controller.",
        },
        Metric {
            name: BACKFILL_ROWS_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "backfill"],
            exposed_by: Agent,
            help: "Rows updated by backfill batches, by target and backfill name (counted by the agent that runs them).",
        },
        Metric {
            name: BACKFILL_PROGRESS_RATIO,
            kind: Gauge,
            unit: None,
            labels: &["target", "backfill"],
            exposed_by: Agent,
            help: "Share of the table's rows a backfill has walked (0 to 1; 1 once done), by target and backfill name.",
        },
        Metric {
            name: BACKFILL_LOCK_RETRIES_TOTAL,
            kind: Counter,
            unit: Some(Unit::Count),
            labels: &["target", "backfill"],
            exposed_by: Agent,
            help: "Backfill batches rolled back and retried after a lock timeout or deadlock.",
        },
    ]
};

/// Histogram buckets for every `*_seconds` histogram: 5 ms up to an hour, since lock waits
/// are short and migrations (index builds, backfills) can be long.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// The installed handle; a Mutex (not a OnceLock) so a failed install can be retried.
static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder as the process's `metrics` recorder on first call (and
/// describes every metric, see [`describe_metrics`]); later calls return the same handle.
/// Fails only when some other recorder was installed first.
pub fn metrics_handle() -> Result<PrometheusHandle, Error> {
    let mut slot = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(Error::MetricsRecorder)?
        .install_recorder()
        .map_err(Error::MetricsRecorder)?;
    // Describe while still holding the slot: a second caller that got the handle before the
    // help texts were registered would render metrics without their `# HELP` lines.
    describe_metrics();
    *slot = Some(handle.clone());
    Ok(handle)
}

/// The rows of `docs/metrics.md`'s table, one per [`CATALOG`] entry (a unit test keeps
/// the file equal to them).
pub fn markdown_table() -> String {
    let mut out =
        String::from("| metric | type | labels | exposed by | meaning |\n|---|---|---|---|---|\n");
    for m in CATALOG {
        let labels = if m.labels.is_empty() {
            "—".to_string()
        } else {
            m.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.exposed_by.as_str(),
            m.help
        ));
    }
    out
}

/// Registers help texts and units for every `belay_*` metric in [`CATALOG`] with the
/// installed recorder (descriptions sent before a recorder is installed are lost;
/// [`metrics_handle`] calls this for you).
pub fn describe_metrics() {
    for m in CATALOG {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
    }
}

/// Exposes, at zero, the series a daemon knows the labels of before anything happens
/// (Prometheus' advice: a query or alert never meets a series that does not exist yet).
/// `Agent` and `Controller` get their process-wide series; per-target ones come from
/// [`init_target_series`].
pub fn init_process_series(exposer: Exposer) {
    use names::*;
    if matches!(exposer, Exposer::Agent | Exposer::Cli) {
        for status in DEPLOYMENT_STATUSES {
            metrics::counter!(DEPLOYMENTS_TOTAL, "status" => status).absolute(0);
            // A histogram is listed once registered, with empty buckets.
            let _ = metrics::histogram!(DEPLOYMENT_DURATION_SECONDS, "status" => status);
        }
        for step in DEPLOYMENT_STEPS {
            metrics::gauge!(DEPLOYMENT_TARGETS, "step" => step).increment(0.0);
        }
    }
    if exposer == Exposer::Controller {
        metrics::gauge!(AGENTS_CONNECTED).increment(0.0);
    }
    if matches!(exposer, Exposer::Agent | Exposer::Controller) {
        for strategy in ROLLBACK_STRATEGIES {
            for result in ROLLBACK_RESULTS {
                for trigger in ROLLBACK_TRIGGERS {
                    metrics::counter!(ROLLBACKS_TOTAL, "strategy" => strategy, "trigger" => trigger, "result" => result)
                        .absolute(0);
                }
                let _ = metrics::histogram!(ROLLBACK_DURATION_SECONDS, "strategy" => strategy, "result" => result);
            }
        }
        metrics::gauge!(ROLLBACKS_IN_PROGRESS).increment(0.0);
    }
}

/// What an agent knows of one of its targets at start-up.
#[derive(Debug, Clone, Default)]
pub struct TargetSeries {
    pub name: String,
    /// Its configured probes (`[[targets.probes]]`).
    pub probes: Vec<String>,
    /// Whether it takes backups, and the newest one on record: (finished, Unix seconds;
    /// size in bytes).
    pub backups: Option<Option<(f64, f64)>>,
}

/// Exposes one target's series at zero (counters), at their known values (the newest
/// backup) or healthy (probes, not watched yet).
pub fn init_target_series(t: &TargetSeries) {
    use names::*;
    let target = t.name.clone();
    for status in ["applied", "failed"] {
        metrics::counter!(MIGRATIONS_TOTAL, "target" => target.clone(), "status" => status)
            .absolute(0);
    }
    let _ = metrics::histogram!(MIGRATION_DURATION_SECONDS, "target" => target.clone());
    let _ = metrics::histogram!(MIGRATION_LOCK_WAIT_SECONDS, "target" => target.clone());
    for name in [
        MIGRATION_RETRIES_TOTAL,
        LOCK_GUARD_TRIPS_TOTAL,
        LOCK_SAMPLE_FAILURES_TOTAL,
    ] {
        metrics::counter!(name, "target" => target.clone()).absolute(0);
    }
    for kind in ["migrations", "postflight"] {
        metrics::counter!(VALIDATION_ERRORS_TOTAL, "target" => target.clone(), "kind" => kind)
            .absolute(0);
    }
    for probe in &t.probes {
        metrics::gauge!(PROBE_HEALTHY, "target" => target.clone(), "probe" => probe.clone())
            .set(1.0);
        metrics::counter!(PROBE_FAILURES_TOTAL, "target" => target.clone(), "probe" => probe.clone())
            .absolute(0);
        for to in ["triggered", "recovered"] {
            metrics::counter!(PROBE_TRANSITIONS_TOTAL, "target" => target.clone(), "probe" => probe.clone(), "to" => to)
                .absolute(0);
        }
    }
    if let Some(newest) = t.backups {
        let _ = metrics::histogram!(BACKUP_DURATION_SECONDS, "target" => target.clone());
        metrics::counter!(BACKUP_FAILURES_TOTAL, "target" => target.clone()).absolute(0);
        let (at, size) = newest.unwrap_or((0.0, 0.0));
        metrics::gauge!(BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS, "target" => target.clone()).set(at);
        metrics::gauge!(BACKUP_SIZE_BYTES, "target" => target).set(size);
    }
}

/// Serves `GET /metrics` (Prometheus text exposition format 0.0.4) on `listener` until
/// `shutdown` completes, then finishes in-flight requests and returns.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    axum::serve(listener, metrics_router(handle))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::MetricsServe)
}

/// `GET /metrics` as a router, for a daemon that serves more routes on the same listener
/// (`Router::merge`).
pub fn metrics_router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(render))
        .with_state(handle)
}

async fn render(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    // Without an exporter task nobody else drains histogram buffers: do it per scrape.
    handle.run_upkeep();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/metrics.md` holds [`markdown_table`] between its markers; run with
    /// `BELAY_BLESS=1` to rewrite it after changing [`CATALOG`].
    #[test]
    fn docs_table_matches_the_catalog() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md");
        let doc = std::fs::read_to_string(&path).expect("docs/metrics.md exists");
        let (begin, end) = (
            "<!-- metrics table: begin -->\n",
            "<!-- metrics table: end -->",
        );
        let start = doc.find(begin).expect("begin marker") + begin.len();
        let stop = doc.find(end).expect("end marker");
        let table = markdown_table();
        if std::env::var_os("BELAY_BLESS").is_some() {
            let updated = format!("{}{table}{}", &doc[..start], &doc[stop..]);
            std::fs::write(&path, updated).expect("rewrite docs/metrics.md");
            return;
        }
        assert_eq!(
            doc[start..stop],
            table,
            "docs/metrics.md is stale: rerun this test with BELAY_BLESS=1"
        );
    }

    #[test]
    fn catalog_names_are_unique_and_counters_end_in_total() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("belay_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
        }
    }
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get_metrics(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("send request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read response");
        response
    }

    #[test]
    fn handle_is_installed_once_and_shared() {
        let first = metrics_handle().expect("recorder installs");
        let second = metrics_handle().expect("second call reuses it");
        metrics::counter!("belay_test_shared_total").increment(3);
        assert!(first.render().contains("belay_test_shared_total 3"));
        assert!(second.render().contains("belay_test_shared_total 3"));
    }

    #[tokio::test]
    async fn endpoint_serves_counters_with_help_and_histogram_buckets() {
        let handle = metrics_handle().expect("recorder installs");
        metrics::counter!(names::MIGRATIONS_TOTAL, "target" => "orders", "status" => "applied")
            .increment(2);
        metrics::histogram!(names::MIGRATION_DURATION_SECONDS).record(0.3);
        metrics::gauge!(names::AGENTS_CONNECTED).set(4.0);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, handle, async move {
            let _ = stopped.await;
        }));

        let response = get_metrics(addr).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("text/plain; version=0.0.4"), "{response}");
        assert!(
            response.contains(r#"belay_migrations_total{target="orders",status="applied"} 2"#),
            "{response}"
        );
        assert!(
            response.contains("# HELP belay_migrations_total Migration scripts run"),
            "{response}"
        );
        assert!(
            response.contains("# TYPE belay_migration_duration_seconds histogram"),
            "{response}"
        );
        assert!(
            response.contains(r#"belay_migration_duration_seconds_bucket{le="0.5"} 1"#),
            "{response}"
        );
        assert!(response.contains("belay_agents_connected 4"), "{response}");

        stop.send(()).expect("server still running");
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .expect("task did not panic")
            .expect("server returned cleanly");
    }
}
