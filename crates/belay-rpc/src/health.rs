//! `belay.v1.HealthService`: conversions, the server adapter over any [`HealthApi`] and
//! the client implementing it over gRPC. Probes travel as specs (an HTTP request, or a
//! query run on the target itself); database URLs never do.

use crate::Connection;
use crate::convert::{self, DecodeError, target};
use belay_auth::MaybeTokenAttach;
use belay_core::{ApiError, ErrorKind};
use belay_health::{
    CheckResult, CheckStatus, Evidence, Expectation, HealthApi, HttpProbe, PostflightSpec,
    PreflightOptions, ProbeCheck, ProbeEvent, ProbeEvents, ProbeResult, ProbeState, Severity,
    SmokeQuery, TargetProbe, Thresholds, Transition, UserCheck,
};
use belay_proto::v1 as pb;
use pb::health_service_client::HealthServiceClient;
use pb::health_service_server::{HealthService, HealthServiceServer};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `ms` as a duration, `default` for 0 (proto3 cannot tell 0 from unset).
fn ms_or(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

// ---- checks ----

fn severity(s: Severity) -> i32 {
    match s {
        Severity::Warn => pb::CheckSeverity::Warn as i32,
        Severity::Block => pb::CheckSeverity::Block as i32,
    }
}

fn severity_from(v: i32) -> Result<Severity, DecodeError> {
    match pb::CheckSeverity::try_from(v) {
        Ok(pb::CheckSeverity::Warn) => Ok(Severity::Warn),
        Ok(pb::CheckSeverity::Block | pb::CheckSeverity::Unspecified) => Ok(Severity::Block),
        Err(_) => Err(bad("check severity", format!("unknown value {v}"))),
    }
}

pub fn check_result(r: &CheckResult) -> pb::CheckResult {
    pb::CheckResult {
        name: r.name.clone(),
        status: match r.status {
            CheckStatus::Pass => pb::CheckStatus::Pass,
            CheckStatus::Warn => pb::CheckStatus::Warn,
            CheckStatus::Block => pb::CheckStatus::Block,
        } as i32,
        value: r.value.clone(),
        threshold: r.threshold.clone(),
        remedy: r.remedy.clone(),
        query: r.query.clone(),
        overridden: r.overridden.clone(),
    }
}

pub fn check_result_from(r: &pb::CheckResult) -> Result<CheckResult, DecodeError> {
    let status = match pb::CheckStatus::try_from(r.status) {
        Ok(pb::CheckStatus::Pass) => CheckStatus::Pass,
        Ok(pb::CheckStatus::Warn) => CheckStatus::Warn,
        Ok(pb::CheckStatus::Block) => CheckStatus::Block,
        _ => {
            return Err(bad(
                "check status",
                format!("{} of check {:?}", r.status, r.name),
            ));
        }
    };
    Ok(CheckResult {
        name: r.name.clone(),
        status,
        value: r.value.clone(),
        threshold: r.threshold.clone(),
        remedy: r.remedy.clone(),
        query: r.query.clone(),
        overridden: r.overridden.clone(),
    })
}

pub fn report(results: &[CheckResult]) -> pb::CheckReport {
    pb::CheckReport {
        checks: results.iter().map(check_result).collect(),
    }
}

pub fn report_from(r: &pb::CheckReport) -> Result<Vec<CheckResult>, DecodeError> {
    r.checks.iter().map(check_result_from).collect()
}

pub fn thresholds(t: &Thresholds) -> pb::PreflightThresholds {
    pb::PreflightThresholds {
        min_server_version: t.min_server_version,
        connect_latency_warn_ms: millis(t.connect_latency_warn),
        database_size_warn_bytes: t.database_size_warn,
        database_size_block_bytes: t.database_size_block,
        disk_free_warn_floor_bytes: t.disk_free_warn_floor,
        disk_free_block_floor_bytes: t.disk_free_block_floor,
        connections_warn_percent: t.connections_warn_percent,
        connections_block_percent: t.connections_block_percent,
        long_query_warn_ms: millis(t.long_query_warn),
        long_query_block_ms: millis(t.long_query_block),
        idle_in_transaction_warn_ms: millis(t.idle_in_transaction_warn),
        idle_in_transaction_block_ms: millis(t.idle_in_transaction_block),
        lock_wait_warn_ms: millis(t.lock_wait_warn),
        lock_wait_block_ms: millis(t.lock_wait_block),
        table_lock_warn_ms: millis(t.table_lock_warn),
        table_lock_block_ms: millis(t.table_lock_block),
        replication_lag_warn_bytes: t.replication_lag_warn,
        replication_lag_block_bytes: t.replication_lag_block,
        pending_migrations_warn: t.pending_migrations_warn.map(|n| n as u64),
        failed_migrations: severity(t.failed_migrations),
        checksum_drift: severity(t.checksum_drift),
    }
}

/// Every threshold is taken as sent: a zero is a threshold of zero (`lock_wait_warn = 0`
/// is belay's own default), so a caller sends all of them.
pub fn thresholds_from(t: &pb::PreflightThresholds) -> Result<Thresholds, DecodeError> {
    let ms = Duration::from_millis;
    Ok(Thresholds {
        min_server_version: t.min_server_version,
        connect_latency_warn: ms(t.connect_latency_warn_ms),
        database_size_warn: t.database_size_warn_bytes,
        database_size_block: t.database_size_block_bytes,
        disk_free_warn_floor: t.disk_free_warn_floor_bytes,
        disk_free_block_floor: t.disk_free_block_floor_bytes,
        connections_warn_percent: t.connections_warn_percent,
        connections_block_percent: t.connections_block_percent,
        long_query_warn: ms(t.long_query_warn_ms),
        long_query_block: ms(t.long_query_block_ms),
        idle_in_transaction_warn: ms(t.idle_in_transaction_warn_ms),
        idle_in_transaction_block: ms(t.idle_in_transaction_block_ms),
        lock_wait_warn: ms(t.lock_wait_warn_ms),
        lock_wait_block: ms(t.lock_wait_block_ms),
        table_lock_warn: ms(t.table_lock_warn_ms),
        table_lock_block: ms(t.table_lock_block_ms),
        replication_lag_warn: t.replication_lag_warn_bytes,
        replication_lag_block: t.replication_lag_block_bytes,
        pending_migrations_warn: t
            .pending_migrations_warn
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        failed_migrations: severity_from(t.failed_migrations)?,
        checksum_drift: severity_from(t.checksum_drift)?,
    })
}

pub fn preflight_request(name: &str, o: &PreflightOptions) -> pb::CheckRequest {
    pb::CheckRequest {
        target: target(name),
        override_checks: o.overrides.clone(),
        reason: o.reason.clone().unwrap_or_default(),
        thresholds: Some(thresholds(&o.thresholds)),
        skip_migration_checks: !o.migration_checks,
    }
}

pub fn preflight_request_from(r: &pb::CheckRequest) -> Result<PreflightOptions, DecodeError> {
    Ok(PreflightOptions {
        thresholds: r
            .thresholds
            .as_ref()
            .map(thresholds_from)
            .transpose()?
            .unwrap_or_default(),
        overrides: r.override_checks.clone(),
        reason: (!r.reason.is_empty()).then(|| r.reason.clone()),
        migration_checks: !r.skip_migration_checks,
    })
}

fn expectation(e: Expectation) -> pb::SqlExpectation {
    let (kind, value) = match e {
        Expectation::NoRows => (pb::ExpectationKind::NoRows, 0),
        Expectation::Zero => (pb::ExpectationKind::Zero, 0),
        Expectation::Equals(n) => (pb::ExpectationKind::Equals, n),
        Expectation::AtMost(n) => (pb::ExpectationKind::AtMost, n),
    };
    pb::SqlExpectation {
        kind: kind as i32,
        value,
    }
}

fn expectation_from(e: Option<&pb::SqlExpectation>) -> Result<Expectation, DecodeError> {
    let Some(e) = e else {
        return Err(bad("expectation", "missing"));
    };
    Ok(match pb::ExpectationKind::try_from(e.kind) {
        Ok(pb::ExpectationKind::NoRows) => Expectation::NoRows,
        Ok(pb::ExpectationKind::Zero) => Expectation::Zero,
        Ok(pb::ExpectationKind::Equals) => Expectation::Equals(e.value),
        Ok(pb::ExpectationKind::AtMost) => Expectation::AtMost(e.value),
        _ => return Err(bad("expectation", format!("unknown kind {}", e.kind))),
    })
}

pub fn postflight_request(name: &str, s: &PostflightSpec) -> pb::PostflightRequest {
    pb::PostflightRequest {
        target: target(name),
        checks: s
            .checks
            .iter()
            .map(|c| pb::PostflightCheck {
                name: c.name.clone(),
                query: c.query.clone(),
                expect: Some(expectation(c.expect)),
            })
            .collect(),
        smoke: s
            .smoke
            .iter()
            .map(|q| pb::SmokeQuery {
                name: q.name.clone(),
                query: q.query.clone(),
                allow_no_rows: q.allow_no_rows,
            })
            .collect(),
        not_valid_constraints: severity(s.not_valid_constraints),
        statement_timeout_ms: millis(s.statement_timeout),
    }
}

/// The caller's part of a postflight; the history and `verify.sql` scripts are the
/// target's own and filled in where its migrations are.
pub fn postflight_request_from(r: &pb::PostflightRequest) -> Result<PostflightSpec, DecodeError> {
    let defaults = PostflightSpec::default();
    Ok(PostflightSpec {
        checks: r
            .checks
            .iter()
            .map(|c| {
                Ok(UserCheck {
                    name: c.name.clone(),
                    query: c.query.clone(),
                    expect: expectation_from(c.expect.as_ref())?,
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        smoke: r
            .smoke
            .iter()
            .map(|q| SmokeQuery {
                name: q.name.clone(),
                query: q.query.clone(),
                allow_no_rows: q.allow_no_rows,
            })
            .collect(),
        verify_scripts: Vec::new(),
        history: None,
        not_valid_constraints: severity_from(r.not_valid_constraints)?,
        statement_timeout: ms_or(r.statement_timeout_ms, defaults.statement_timeout),
    })
}

// ---- probes ----

pub fn probe_spec(p: &TargetProbe) -> pb::ProbeSpec {
    use pb::probe_spec::Check;
    let check = match &p.check {
        ProbeCheck::Http(h) => Check::Http(pb::HttpProbeSpec {
            method: h.method.clone(),
            url: h.url.clone(),
            expect_status: h.expect_status.map(u32::from),
            json_pointer: h.json_pointer.clone(),
            equals_json: h.equals.as_ref().map(serde_json::Value::to_string),
        }),
        ProbeCheck::Sql { query, expect } => Check::Sql(pb::SqlProbeSpec {
            query: query.clone(),
            expect: Some(expectation(*expect)),
        }),
    };
    pb::ProbeSpec {
        name: p.name.clone(),
        check: Some(check),
        period_ms: millis(p.period),
        timeout_ms: millis(p.timeout),
        failure_threshold: p.failure_threshold,
        success_threshold: p.success_threshold,
        initial_delay_ms: millis(p.initial_delay),
    }
}

pub fn probe_spec_from(p: &pb::ProbeSpec) -> Result<TargetProbe, DecodeError> {
    use pb::probe_spec::Check;
    let check = match &p.check {
        Some(Check::Http(h)) => ProbeCheck::Http(HttpProbe {
            method: if h.method.is_empty() {
                "GET".into()
            } else {
                h.method.clone()
            },
            url: h.url.clone(),
            expect_status: h
                .expect_status
                .map(|s| u16::try_from(s).map_err(|_| bad("probe", format!("HTTP status {s}"))))
                .transpose()?,
            json_pointer: h.json_pointer.clone(),
            equals: h
                .equals_json
                .as_deref()
                .map(|v| {
                    serde_json::from_str(v)
                        .map_err(|e| bad("probe", format!("`equals` is not JSON: {e}")))
                })
                .transpose()?,
        }),
        Some(Check::Sql(s)) => ProbeCheck::Sql {
            query: s.query.clone(),
            expect: expectation_from(s.expect.as_ref())?,
        },
        None => return Err(bad("probe", "neither an HTTP nor a SQL probe")),
    };
    // Zero values take the defaults of a probe built from flags.
    let defaults = TargetProbe::http(p.name.clone(), "");
    Ok(TargetProbe {
        name: p.name.clone(),
        check,
        period: ms_or(p.period_ms, defaults.period),
        timeout: ms_or(p.timeout_ms, defaults.timeout),
        failure_threshold: if p.failure_threshold == 0 {
            defaults.failure_threshold
        } else {
            p.failure_threshold
        },
        success_threshold: if p.success_threshold == 0 {
            defaults.success_threshold
        } else {
            p.success_threshold
        },
        initial_delay: Duration::from_millis(p.initial_delay_ms),
    })
}

fn probe_result(r: ProbeResult) -> &'static str {
    match r {
        ProbeResult::Pass => "pass",
        ProbeResult::Fail => "fail",
        ProbeResult::Error => "error",
    }
}

fn probe_state(s: ProbeState) -> &'static str {
    match s {
        ProbeState::Healthy => "healthy",
        ProbeState::Triggered => "triggered",
    }
}

fn transition(t: Transition) -> &'static str {
    match t {
        Transition::Triggered => "triggered",
        Transition::Recovered => "recovered",
    }
}

pub fn probe_event(e: &ProbeEvent) -> pb::ProbeEvent {
    pb::ProbeEvent {
        at: Some(convert::timestamp(e.at)),
        probe: e.probe.clone(),
        result: probe_result(e.result).to_string(),
        consecutive_failures: e.consecutive_failures,
        triggered: e.triggered,
        target: e.target.clone(),
        seq: e.seq,
        evidence: Some(pb::ProbeEvidence {
            status: e.evidence.status.map(u32::from),
            body: e.evidence.body.clone(),
            error: e.evidence.error.clone(),
            elapsed_ms: e.evidence.elapsed_ms,
        }),
        consecutive_successes: e.consecutive_successes,
        failure_threshold: e.failure_threshold,
        state: probe_state(e.state).to_string(),
        transition: e.transition.map(|t| transition(t).to_string()),
    }
}

pub fn probe_event_from(e: &pb::ProbeEvent) -> Result<ProbeEvent, DecodeError> {
    let at = e.at.as_ref().ok_or_else(|| bad("probe event", "no time"))?;
    let result = match e.result.as_str() {
        "pass" => ProbeResult::Pass,
        "fail" => ProbeResult::Fail,
        "error" => ProbeResult::Error,
        other => return Err(bad("probe event", format!("result {other:?}"))),
    };
    let state = match e.state.as_str() {
        "healthy" => ProbeState::Healthy,
        "triggered" => ProbeState::Triggered,
        other => return Err(bad("probe event", format!("state {other:?}"))),
    };
    let transition = match e.transition.as_deref() {
        None => None,
        Some("triggered") => Some(Transition::Triggered),
        Some("recovered") => Some(Transition::Recovered),
        Some(other) => return Err(bad("probe event", format!("transition {other:?}"))),
    };
    let evidence = e.evidence.clone().unwrap_or_default();
    Ok(ProbeEvent {
        at: convert::from_timestamp(at)?,
        probe: e.probe.clone(),
        target: e.target.clone(),
        seq: e.seq,
        result,
        evidence: Evidence {
            status: evidence
                .status
                .map(|s| u16::try_from(s).map_err(|_| bad("probe event", format!("status {s}"))))
                .transpose()?,
            body: evidence.body,
            error: evidence.error,
            elapsed_ms: evidence.elapsed_ms,
        },
        consecutive_failures: e.consecutive_failures,
        consecutive_successes: e.consecutive_successes,
        failure_threshold: e.failure_threshold,
        state,
        transition,
        triggered: e.triggered,
    })
}

/// `duration_ms` 0 probes until the caller cancels.
fn probe_window(ms: u64) -> Duration {
    ms_or(ms, Duration::from_secs(60 * 60 * 24 * 365))
}

// ---- server ----

/// The shortest probe period the server accepts. A probe attempt is an HTTP request from
/// the agent's host or a query on the target's database, made on behalf of whoever called;
/// faster than this it is load, not a quicker verdict (a trigger takes `failure_threshold`
/// periods anyway). Refused rather than clamped, so the caller's thresholds keep the
/// meaning it gave them. In-process callers (the CLI's local mode) are not held to it.
pub const MIN_PROBE_PERIOD: Duration = Duration::from_millis(100);

/// Refuses a probe period under [`MIN_PROBE_PERIOD`], naming the minimum.
fn check_probe_period(probe: &TargetProbe) -> Result<(), Status> {
    if probe.period < MIN_PROBE_PERIOD {
        return Err(convert::status_from(&ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "probe {:?}: the period must be at least {} (asked for {})",
                probe.name,
                belay_core::format_duration(MIN_PROBE_PERIOD),
                belay_core::format_duration(probe.period)
            ),
        )));
    }
    Ok(())
}

/// The gRPC face of a health checker: the agent serves its targets through it, the
/// controller its router to agents.
#[derive(Clone)]
pub struct HealthGrpc {
    api: Arc<dyn HealthApi>,
}

impl std::fmt::Debug for HealthGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthGrpc").finish_non_exhaustive()
    }
}

impl HealthGrpc {
    pub fn new(api: Arc<dyn HealthApi>) -> Self {
        HealthGrpc { api }
    }

    pub fn into_service(self) -> HealthServiceServer<Self> {
        HealthServiceServer::new(self)
    }
}

type ProbeStream = Pin<Box<dyn Stream<Item = Result<pb::ProbeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl HealthService for HealthGrpc {
    async fn preflight(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckReport>, Status> {
        let r = req.get_ref();
        let name = convert::target_name(r.target.as_ref())?;
        let options = preflight_request_from(r)?;
        let results = self
            .api
            .preflight(&name, &options)
            .instrument(info_span!("preflight_rpc", target = %name))
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(report(&results)))
    }

    async fn postflight(
        &self,
        req: Request<pb::PostflightRequest>,
    ) -> Result<Response<pb::CheckReport>, Status> {
        let r = req.get_ref();
        let name = convert::target_name(r.target.as_ref())?;
        let spec = postflight_request_from(r)?;
        let results = self
            .api
            .postflight(&name, &spec)
            .instrument(info_span!("postflight_rpc", target = %name))
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(report(&results)))
    }

    type ProbeStream = ProbeStream;

    async fn probe(
        &self,
        req: Request<pb::ProbeRequest>,
    ) -> Result<Response<Self::ProbeStream>, Status> {
        let r = req.get_ref();
        let name = convert::target_name(r.target.as_ref())?;
        let spec = probe_spec_from(
            r.spec
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("the probe request carries no probe"))?,
        )?;
        check_probe_period(&spec)?;
        let events = self
            .api
            .probe(&name, &spec, probe_window(r.duration_ms))
            .instrument(info_span!("probe_rpc", target = %name, probe = %spec.name))
            .await
            .map_err(|e| convert::status_from(&e))?;
        // Dropped when the caller goes away, which stops the probe behind it.
        Ok(Response::new(Box::pin(events.map(|e| match e {
            Ok(e) => Ok(probe_event(&e)),
            Err(e) => Err(convert::status_from(&e)),
        }))))
    }
}

// ---- client ----

/// [`HealthApi`] over gRPC: the CLI's remote mode and the controller's calls to agents.
#[derive(Clone, Debug)]
pub struct HealthClient {
    client: HealthServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl HealthClient {
    pub fn new(conn: &Connection) -> Self {
        HealthClient {
            client: HealthServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }

    fn err(&self, s: &Status) -> ApiError {
        convert::api_error_from(s, &self.peer)
    }
}

#[async_trait::async_trait]
impl HealthApi for HealthClient {
    async fn preflight(
        &self,
        name: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let r = self
            .client
            .clone()
            .preflight(preflight_request(name, options))
            .await
            .map_err(|s| self.err(&s))?;
        Ok(report_from(r.get_ref())?)
    }

    async fn postflight(
        &self,
        name: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let r = self
            .client
            .clone()
            .postflight(postflight_request(name, spec))
            .await
            .map_err(|s| self.err(&s))?;
        Ok(report_from(r.get_ref())?)
    }

    async fn probe(
        &self,
        name: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        let stream = self
            .client
            .clone()
            .probe(pb::ProbeRequest {
                target: target(name),
                duration_ms: millis(duration),
                spec: Some(probe_spec(probe)),
            })
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        let peer = self.peer.clone();
        Ok(Box::pin(stream.map(move |m| match m {
            Ok(e) => Ok(probe_event_from(&e)?),
            Err(s) => Err(convert::api_error_from(&s, &peer)),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn check_results_round_trip() {
        let results = vec![
            CheckResult {
                name: "lock_waits".into(),
                status: CheckStatus::Block,
                value: "pid 42 waits 3.1s for AccessExclusiveLock on public.orders".into(),
                threshold: "warn > 0ms, block > 1s".into(),
                remedy: "wait for the blocker".into(),
                query: Some("SELECT … FROM pg_locks".into()),
                overridden: None,
            },
            CheckResult {
                name: "connections".into(),
                status: CheckStatus::Warn,
                value: "81%".into(),
                threshold: "warn > 80%".into(),
                remedy: "x (overridden: agreed)".into(),
                query: None,
                overridden: Some("agreed".into()),
            },
            CheckResult {
                name: "connectivity".into(),
                status: CheckStatus::Pass,
                value: "PostgreSQL 17".into(),
                threshold: String::new(),
                remedy: String::new(),
                query: None,
                overridden: None,
            },
        ];
        let back = report_from(&report(&results)).unwrap();
        assert_eq!(back, results);
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&results).unwrap()
        );
        let mut bad = report(&results);
        bad.checks[0].status = 0;
        assert!(report_from(&bad).is_err());
    }

    #[test]
    fn preflight_options_round_trip_with_every_threshold() {
        let o = PreflightOptions {
            thresholds: Thresholds {
                min_server_version: 14,
                connect_latency_warn: Duration::from_millis(300),
                database_size_warn: Some(1 << 30),
                database_size_block: None,
                disk_free_warn_floor: 5,
                disk_free_block_floor: 1,
                connections_warn_percent: 70.5,
                connections_block_percent: 90.0,
                long_query_warn: Duration::from_secs(10),
                long_query_block: Duration::from_secs(20),
                idle_in_transaction_warn: Duration::ZERO,
                idle_in_transaction_block: Duration::from_secs(3),
                lock_wait_warn: Duration::ZERO,
                lock_wait_block: Duration::from_millis(1500),
                table_lock_warn: Duration::from_millis(250),
                table_lock_block: Duration::from_secs(7),
                replication_lag_warn: 7,
                replication_lag_block: 8,
                pending_migrations_warn: Some(3),
                failed_migrations: Severity::Warn,
                checksum_drift: Severity::Block,
            },
            overrides: vec!["lock_waits".into()],
            reason: Some("agreed with the owner".into()),
            migration_checks: false,
        };
        assert_eq!(
            preflight_request_from(&preflight_request("t", &o)).unwrap(),
            o
        );
        let bare = preflight_request_from(&pb::CheckRequest::default()).unwrap();
        assert_eq!(bare, PreflightOptions::default());
    }

    #[test]
    fn postflight_specs_round_trip_without_target_side_parts() {
        let spec = PostflightSpec {
            checks: vec![
                UserCheck {
                    name: "no orphans".into(),
                    query: "SELECT count(*) FROM o".into(),
                    expect: Expectation::Zero,
                },
                UserCheck {
                    name: "few".into(),
                    query: "SELECT 3".into(),
                    expect: Expectation::AtMost(-4),
                },
                UserCheck {
                    name: "eq".into(),
                    query: "SELECT 3".into(),
                    expect: Expectation::Equals(3),
                },
                UserCheck {
                    name: "none".into(),
                    query: "SELECT 1 WHERE false".into(),
                    expect: Expectation::NoRows,
                },
            ],
            smoke: vec![SmokeQuery {
                name: "s".into(),
                query: "SELECT 1 WHERE false".into(),
                allow_no_rows: true,
            }],
            verify_scripts: Vec::new(),
            history: None,
            not_valid_constraints: Severity::Warn,
            statement_timeout: Duration::from_secs(7),
        };
        assert_eq!(
            postflight_request_from(&postflight_request("t", &spec)).unwrap(),
            spec
        );
        let bare = postflight_request_from(&pb::PostflightRequest::default()).unwrap();
        assert_eq!(bare, PostflightSpec::default());
    }

    /// A health checker that counts the probes it is asked for and streams nothing.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl HealthApi for Counting {
        async fn preflight(
            &self,
            _: &str,
            _: &PreflightOptions,
        ) -> Result<Vec<CheckResult>, ApiError> {
            Ok(Vec::new())
        }
        async fn postflight(
            &self,
            _: &str,
            _: &PostflightSpec,
        ) -> Result<Vec<CheckResult>, ApiError> {
            Ok(Vec::new())
        }
        async fn probe(
            &self,
            _: &str,
            _: &TargetProbe,
            _: Duration,
        ) -> Result<ProbeEvents, ApiError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Box::pin(tokio_stream::empty()))
        }
    }

    #[tokio::test]
    async fn probes_faster_than_the_minimum_are_refused_naming_it() {
        let api = Arc::new(Counting::default());
        let grpc = HealthGrpc::new(api.clone());
        let ask = |ms: u64| {
            let mut p = TargetProbe::sql("q", "SELECT 1", Expectation::Equals(1));
            p.period = Duration::from_millis(ms);
            Request::new(pb::ProbeRequest {
                target: target("t"),
                spec: Some(probe_spec(&p)),
                duration_ms: 1_000,
            })
        };
        let err = HealthService::probe(&grpc, ask(10))
            .await
            .err()
            .expect("a 10ms probe is refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at least 100ms"), "{err:?}");
        assert!(err.message().contains("asked for 10ms"), "{err:?}");
        assert!(err.message().contains("\"q\""), "{err:?}");
        assert_eq!(api.0.load(std::sync::atomic::Ordering::Relaxed), 0);

        // The minimum itself, and an unset period (the default, 10s), are served.
        for ms in [100, 0] {
            assert!(HealthService::probe(&grpc, ask(ms)).await.is_ok());
        }
        assert_eq!(api.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn probe_specs_round_trip() {
        let mut http = TargetProbe::http("api", "http://127.0.0.1:8080/health");
        if let ProbeCheck::Http(h) = &mut http.check {
            h.expect_status = Some(204);
            h.json_pointer = Some("/db".into());
            h.equals = Some(serde_json::json!({"ok": [1, "x"]}));
            h.method = "HEAD".into();
        }
        http.period = Duration::from_millis(50);
        http.timeout = Duration::from_millis(20);
        http.failure_threshold = 2;
        http.success_threshold = 4;
        http.initial_delay = Duration::from_millis(5);
        assert_eq!(probe_spec_from(&probe_spec(&http)).unwrap(), http);
        let sql = TargetProbe::sql("q", "SELECT 1", Expectation::Equals(1));
        assert_eq!(probe_spec_from(&probe_spec(&sql)).unwrap(), sql);
        // A bare spec takes the defaults of a probe built from flags.
        let bare = pb::ProbeSpec {
            name: "q".into(),
            check: probe_spec(&sql).check,
            ..pb::ProbeSpec::default()
        };
        assert_eq!(probe_spec_from(&bare).unwrap(), sql);
        assert!(probe_spec_from(&pb::ProbeSpec::default()).is_err());
    }

    #[test]
    fn probe_events_round_trip_with_the_state_machine() {
        let at = chrono::Utc
            .timestamp_opt(1_700_000_000, 5_000)
            .single()
            .unwrap();
        for (result, state, transition, triggered) in [
            (
                ProbeResult::Fail,
                ProbeState::Triggered,
                Some(Transition::Triggered),
                true,
            ),
            (ProbeResult::Error, ProbeState::Healthy, None, false),
            (
                ProbeResult::Pass,
                ProbeState::Healthy,
                Some(Transition::Recovered),
                false,
            ),
        ] {
            let e = ProbeEvent {
                at,
                probe: "api".into(),
                target: "GET http://127.0.0.1:1/health".into(),
                seq: 3,
                result,
                evidence: Evidence {
                    status: Some(503),
                    body: Some("{\"db\":\"down\"}".into()),
                    error: Some("status 503, expected 2xx or 3xx".into()),
                    elapsed_ms: 4,
                },
                consecutive_failures: 3,
                consecutive_successes: 0,
                failure_threshold: 3,
                state,
                transition,
                triggered,
            };
            let back = probe_event_from(&probe_event(&e)).unwrap();
            assert_eq!(back, e);
            assert_eq!(back.summary(), e.summary());
        }
        let mut bad = probe_event(&ProbeEvent {
            at,
            probe: "p".into(),
            target: String::new(),
            seq: 1,
            result: ProbeResult::Pass,
            evidence: Evidence::default(),
            consecutive_failures: 0,
            consecutive_successes: 1,
            failure_threshold: 1,
            state: ProbeState::Healthy,
            transition: None,
            triggered: false,
        });
        bad.result = "maybe".into();
        assert!(probe_event_from(&bad).is_err());
    }
}
