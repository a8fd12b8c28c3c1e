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
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// Metric names. Labels are given in each constant's documentation.
pub mod names {
    /// Counter, labels `target`, `status` (`applied`, `failed`, `skipped`, ...): migrations run.
    pub const MIGRATIONS_TOTAL: &str = "belay_migrations_total";
    /// Histogram, seconds: wall time of one migration.
    pub const MIGRATION_DURATION_SECONDS: &str = "belay_migration_duration_seconds";
    /// Histogram, seconds: time a migration waited for its locks.
    pub const MIGRATION_LOCK_WAIT_SECONDS: &str = "belay_migration_lock_wait_seconds";
    /// Counter: migration attempts retried after a lock timeout.
    pub const MIGRATION_RETRIES_TOTAL: &str = "belay_migration_retries_total";
    /// Counter: validation errors found (checksum mismatches, bad files, ...).
    pub const VALIDATION_ERRORS_TOTAL: &str = "belay_validation_errors_total";
    /// Counter, label `status`: deployments finished.
    pub const DEPLOYMENTS_TOTAL: &str = "belay_deployments_total";
    /// Gauge: agents currently connected to the controller.
    pub const AGENTS_CONNECTED: &str = "belay_agents_connected";
    /// Counter, label `strategy`: rollbacks performed.
    pub const ROLLBACKS_TOTAL: &str = "belay_rollbacks_total";
    /// Histogram, seconds: wall time of one backup.
    pub const BACKUP_DURATION_SECONDS: &str = "belay_backup_duration_seconds";
    /// Gauge, bytes: size of the latest backup.
    pub const BACKUP_SIZE_BYTES: &str = "belay_backup_size_bytes";
    /// Gauge, Unix seconds: when the latest successful backup finished.
    pub const BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "belay_backup_last_success_timestamp_seconds";
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
    /// Counter, label `probe` (and `target` where the controller relays a probe): failed
    /// post-deployment health probes.
    pub const PROBE_FAILURES_TOTAL: &str = "belay_probe_failures_total";
    /// Counter, labels `probe`, `to` (`triggered`, `recovered`), and `target` where the
    /// controller relays a probe: probe state changes.
    pub const PROBE_TRANSITIONS_TOTAL: &str = "belay_probe_transitions_total";
    /// Counter, label `target`: migration statements the lock guard cancelled because
    /// application sessions queued behind them longer than `max_blocking`.
    pub const LOCK_GUARD_TRIPS_TOTAL: &str = "belay_lock_guard_trips_total";
    /// Counter, label `backfill`: rows updated by `belay backfill` batches.
    pub const BACKFILL_ROWS_TOTAL: &str = "belay_backfill_rows_total";
    /// Gauge, label `backfill`: share of the table's rows a backfill has walked (from 0 to
    /// 1; estimated from the planner's row count until the last batch).
    pub const BACKFILL_PROGRESS_RATIO: &str = "belay_backfill_progress_ratio";
    /// Counter, label `backfill`: batches rolled back and retried after a lock timeout or
    /// a deadlock.
    pub const BACKFILL_LOCK_RETRIES_TOTAL: &str = "belay_backfill_lock_retries_total";
}

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

/// Registers help texts and units for every `belay_*` metric with the installed recorder
/// (descriptions sent before a recorder is installed are lost; [`metrics_handle`] calls this
/// for you).
pub fn describe_metrics() {
    use names::*;
    describe_counter!(
        MIGRATIONS_TOTAL,
        Unit::Count,
        "Migrations run, by target database and outcome."
    );
    describe_histogram!(
        MIGRATION_DURATION_SECONDS,
        Unit::Seconds,
        "Wall time of one migration, from first statement to commit or failure."
    );
    describe_histogram!(
        MIGRATION_LOCK_WAIT_SECONDS,
        Unit::Seconds,
        "Time a migration spent waiting for its locks."
    );
    describe_counter!(
        MIGRATION_RETRIES_TOTAL,
        Unit::Count,
        "Migration attempts retried after a lock timeout."
    );
    describe_counter!(
        VALIDATION_ERRORS_TOTAL,
        Unit::Count,
        "Validation errors found (checksum mismatches, unreadable or conflicting migrations)."
    );
    describe_counter!(
        DEPLOYMENTS_TOTAL,
        Unit::Count,
        "Deployments finished, by outcome."
    );
    describe_gauge!(
        AGENTS_CONNECTED,
        Unit::Count,
        "Agents currently connected to the controller."
    );
    describe_counter!(
        ROLLBACKS_TOTAL,
        Unit::Count,
        "Rollbacks performed, by strategy."
    );
    describe_histogram!(
        BACKUP_DURATION_SECONDS,
        Unit::Seconds,
        "Wall time of one pre-migration backup."
    );
    describe_gauge!(BACKUP_SIZE_BYTES, Unit::Bytes, "Size of the latest backup.");
    describe_gauge!(
        BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time at which the latest successful backup finished."
    );
    describe_gauge!(
        BLOCKED_SESSIONS,
        Unit::Count,
        "Sessions waiting for a lock in the target database, by target (agent's last lock sample)."
    );
    describe_gauge!(
        LONGEST_LOCK_WAIT_SECONDS,
        Unit::Seconds,
        "The longest lock wait in the target database, by target (agent's last lock sample)."
    );
    describe_gauge!(
        LONG_RUNNING_QUERIES,
        Unit::Count,
        "Queries running longer than 5 minutes in the target database, by target (agent's last lock sample)."
    );
    describe_gauge!(
        IDLE_IN_TRANSACTION_SESSIONS,
        Unit::Count,
        "Sessions idle in a transaction for over a minute in the target database, by target (agent's last lock sample)."
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "Replay lag of the target server's most lagging streaming replica, by target (0 without replicas)."
    );
    describe_counter!(
        LOCK_SAMPLE_FAILURES_TOTAL,
        Unit::Count,
        "Lock samples that failed, by target; the lock gauges keep their last values meanwhile."
    );
    describe_counter!(
        PROBE_FAILURES_TOTAL,
        Unit::Count,
        "Failed post-deployment health probes."
    );
    describe_counter!(
        PROBE_TRANSITIONS_TOTAL,
        Unit::Count,
        "Probe state changes: triggered (failure threshold crossed) and recovered."
    );
    describe_counter!(
        LOCK_GUARD_TRIPS_TOTAL,
        Unit::Count,
        "Migration statements the lock guard cancelled because application sessions queued behind them longer than max_blocking, by target."
    );
    describe_counter!(
        BACKFILL_ROWS_TOTAL,
        Unit::Count,
        "Rows updated by backfill batches, by backfill name."
    );
    describe_gauge!(
        BACKFILL_PROGRESS_RATIO,
        "Share of the table's rows a backfill has walked (0 to 1), by backfill name."
    );
    describe_counter!(
        BACKFILL_LOCK_RETRIES_TOTAL,
        Unit::Count,
        "Backfill batches rolled back and retried after a lock timeout or deadlock."
    );
}

/// Serves `GET /metrics` (Prometheus text exposition format 0.0.4) on `listener` until
/// `shutdown` completes, then finishes in-flight requests and returns.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .with_state(handle);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::MetricsServe)
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
            response.contains("# HELP belay_migrations_total Migrations run"),
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
