//! The health checker as a capability every caller sees the same way: [`HealthApi`],
//! implemented here in-process over target URLs ([`HealthTargets`]), over gRPC by
//! `belay_rpc::HealthClient`, and by the controller's router.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use belay_core::{ApiError, DatabaseUrl, ErrorKind, redact_url};
use futures::{Stream, StreamExt};
use sqlx::{Connection, PgConnection};
use tracing::{Instrument, info_span};

use crate::postflight::{Expectation, PostflightSpec, VerifyScript};
use crate::preflight::{MigrationSummary, PreflightContext, Thresholds};
use crate::probe::{HttpProbe, ProbeEvent, ProbeKind, ProbeSpec, SqlProbe, defaults, run_probe};
use crate::{CheckResult, HealthError, apply_overrides, postflight, preflight_url};

impl From<HealthError> for ApiError {
    fn from(e: HealthError) -> Self {
        let kind = match &e {
            HealthError::UnknownOverride { .. }
            | HealthError::MissingReason
            | HealthError::Invalid { .. } => ErrorKind::InvalidArgument,
            HealthError::Database { .. } => ErrorKind::Unavailable,
        };
        ApiError::new(kind, redact_url(&e.to_string()))
    }
}

/// How a preflight is judged.
#[derive(Debug, Clone, PartialEq)]
pub struct PreflightOptions {
    pub thresholds: Thresholds,
    /// Blocking checks to report as warnings (`--override-check`); needs a reason.
    pub overrides: Vec<String>,
    pub reason: Option<String>,
    /// Include pending, failed and drifted migrations (`migrate` leaves them to the
    /// executor, whose refusals carry better remedies).
    pub migration_checks: bool,
}

impl Default for PreflightOptions {
    fn default() -> Self {
        PreflightOptions {
            thresholds: Thresholds::default(),
            overrides: Vec::new(),
            reason: None,
            migration_checks: true,
        }
    }
}

/// What a probe looks at. A SQL probe runs on the target itself, through whoever holds
/// its URL, so a probe can travel to an agent without a database URL.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeCheck {
    Http(HttpProbe),
    Sql { query: String, expect: Expectation },
}

/// A probe of a target: a [`ProbeSpec`] whose SQL probes name no URL.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetProbe {
    pub name: String,
    pub check: ProbeCheck,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub initial_delay: Duration,
}

impl TargetProbe {
    /// An HTTP GET probe with [`ProbeSpec::http`]'s defaults.
    pub fn http(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::with_check(
            name,
            ProbeCheck::Http(HttpProbe {
                method: defaults::method(),
                url: url.into(),
                expect_status: None,
                json_pointer: None,
                equals: None,
            }),
        )
    }

    /// A SQL probe of the target with the same defaults.
    pub fn sql(name: impl Into<String>, query: impl Into<String>, expect: Expectation) -> Self {
        Self::with_check(
            name,
            ProbeCheck::Sql {
                query: query.into(),
                expect,
            },
        )
    }

    fn with_check(name: impl Into<String>, check: ProbeCheck) -> Self {
        TargetProbe {
            name: name.into(),
            check,
            period: defaults::period(),
            timeout: defaults::timeout(),
            failure_threshold: defaults::failure_threshold(),
            success_threshold: defaults::success_threshold(),
            initial_delay: Duration::ZERO,
        }
    }

    /// The runnable spec, on `url` for a SQL probe.
    pub fn into_spec(self, url: Option<&DatabaseUrl>) -> Result<ProbeSpec, HealthError> {
        let kind = match self.check {
            ProbeCheck::Http(h) => ProbeKind::Http(h),
            ProbeCheck::Sql { query, expect } => ProbeKind::Sql(SqlProbe {
                url: url.cloned().ok_or_else(|| {
                    HealthError::invalid(
                        format!("probe {:?}", self.name),
                        "a SQL probe needs the target's database URL, and none is configured",
                    )
                })?,
                query,
                expect,
            }),
        };
        Ok(ProbeSpec {
            name: self.name,
            kind,
            period: self.period,
            timeout: self.timeout,
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
            initial_delay: self.initial_delay,
        })
    }
}

/// A configured probe (`[[probes]]` of belay.toml) as a probe of a target. A SQL probe
/// becomes a query on the target's own database: whoever holds the target (its agent, in
/// remote mode) runs it on the target's URL, so the spec's URL never crosses the wire.
impl From<ProbeSpec> for TargetProbe {
    fn from(spec: ProbeSpec) -> Self {
        let check = match spec.kind {
            ProbeKind::Http(h) => ProbeCheck::Http(h),
            ProbeKind::Sql(s) => ProbeCheck::Sql {
                query: s.query,
                expect: s.expect,
            },
        };
        TargetProbe {
            name: spec.name,
            check,
            period: spec.period,
            timeout: spec.timeout,
            failure_threshold: spec.failure_threshold,
            success_threshold: spec.success_threshold,
            initial_delay: spec.initial_delay,
        }
    }
}

/// Probe events. `Err` means the stream broke (a remote connection lost); it ends then.
pub type ProbeEvents = Pin<Box<dyn Stream<Item = Result<ProbeEvent, ApiError>> + Send>>;

/// Health checks of a target, local or remote alike.
#[async_trait::async_trait]
pub trait HealthApi: Send + Sync {
    /// Is it safe to migrate now? One result per check; a block is a result, not an error.
    async fn preflight(
        &self,
        target: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError>;

    /// Did the migration leave the target as it should be? `spec`'s `history` and
    /// `verify_scripts` are the target's own: an implementation that knows the target's
    /// migrations replaces them.
    async fn postflight(
        &self,
        target: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError>;

    /// Runs `probe` for `duration`: every attempt's event (the state machine's counts,
    /// transitions and `triggered`), then the stream ends. Dropping it stops the probe.
    async fn probe(
        &self,
        target: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError>;
}

/// What the health checker needs to know about a target's migrations, from whoever owns
/// them (`belay-guards` adapts the migration engine), so this crate needs no executor.
#[async_trait::async_trait]
pub trait MigrationFacts: Send + Sync {
    /// Pending, failed and drifted migrations.
    async fn summary(&self, target: &str) -> Result<MigrationSummary, ApiError>;
    /// The `verify.sql` of every applied migration that has one.
    async fn verify_scripts(&self, target: &str) -> Result<Vec<VerifyScript>, ApiError>;
}

/// One target of [`HealthTargets`].
#[derive(Debug, Clone, Default)]
pub struct HealthTarget {
    /// `None`: HTTP probes only (local `probe http` needs no database).
    pub url: Option<DatabaseUrl>,
    /// Where this target's backups go; `None` skips the disk check.
    pub backup_dir: Option<PathBuf>,
}

/// [`HealthApi`] in-process, over named targets (the CLI's local mode, the agent's own
/// targets).
#[derive(Clone, Default)]
pub struct HealthTargets {
    targets: BTreeMap<String, HealthTarget>,
    facts: Option<Arc<dyn MigrationFacts>>,
}

impl std::fmt::Debug for HealthTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthTargets")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl HealthTargets {
    pub fn new(targets: impl IntoIterator<Item = (String, HealthTarget)>) -> Self {
        HealthTargets {
            targets: targets.into_iter().collect(),
            facts: None,
        }
    }

    /// Migration state for the migration checks of preflight and the history and
    /// `verify.sql` checks of postflight; without it those are left out.
    pub fn with_migration_facts(mut self, facts: Arc<dyn MigrationFacts>) -> Self {
        self.facts = Some(facts);
        self
    }

    fn target(&self, name: &str) -> Result<&HealthTarget, ApiError> {
        self.targets.get(name).ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownTarget,
                format!(
                    "unknown target {name:?}; known: {}",
                    self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    fn url<'a>(&self, name: &str, t: &'a HealthTarget) -> Result<&'a DatabaseUrl, ApiError> {
        t.url.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("target {name:?} has no database URL"),
            )
        })
    }
}

#[async_trait::async_trait]
impl HealthApi for HealthTargets {
    async fn preflight(
        &self,
        target: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let t = self.target(target)?;
        let url = self.url(target, t)?;
        async {
            let migration_summary = match (&self.facts, options.migration_checks) {
                (Some(facts), true) => Some(facts.summary(target).await?),
                _ => None,
            };
            let ctx = PreflightContext {
                backup_dir: t.backup_dir.clone(),
                expected_backup_bytes: None,
                migration_summary,
            };
            let mut results = preflight_url(url, &ctx, &options.thresholds).await?;
            apply_overrides(
                &mut results,
                &options.overrides,
                options.reason.as_deref().unwrap_or(""),
            )?;
            Ok(results)
        }
        .instrument(info_span!("preflight", target = %target))
        .await
    }

    async fn postflight(
        &self,
        target: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError> {
        let t = self.target(target)?;
        let url = self.url(target, t)?;
        async {
            let mut spec = spec.clone();
            if let Some(facts) = &self.facts {
                spec.history = Some(facts.summary(target).await?);
                spec.verify_scripts = facts.verify_scripts(target).await?;
            }
            let mut conn = PgConnection::connect(url.expose()).await.map_err(|e| {
                ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot connect to {url}: {}", redact_url(&e.to_string())),
                )
            })?;
            belay_core::send_without_delay();
            let results = postflight(&mut conn, &spec).await;
            let _ = conn.close().await;
            Ok(results?)
        }
        .instrument(info_span!("postflight", target = %target))
        .await
    }

    async fn probe(
        &self,
        target: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        let t = self.target(target)?;
        let spec = probe.clone().into_spec(t.url.as_ref())?;
        let span = info_span!("probe", target = %target, probe = %spec.name);
        let _entered = span.enter();
        let events = run_probe(spec)?;
        let window = tokio::time::sleep(duration);
        // The gauge keeps the probe's last verdict after its window: a deployment that
        // failed on this probe stays unhealthy (its alert fires, so a rollback can be
        // asked for) until the probe is watched again and passes — the rollback's
        // verification, or the next deployment's window.
        let target = target.to_string();
        Ok(Box::pin(events.take_until(window).map(move |e| {
            crate::probe::record_metrics(&target, &e);
            Ok(e)
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_class() {
        let e = ApiError::from(HealthError::MissingReason);
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = ApiError::from(HealthError::UnknownOverride {
            name: "x".into(),
            known: vec!["lock_waits".into()],
        });
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("lock_waits"), "{e}");
        let e = ApiError::from(HealthError::Database {
            during: "postflight".into(),
            source: sqlx::Error::PoolClosed,
        });
        assert_eq!(e.kind, ErrorKind::Unavailable);
    }

    #[test]
    fn target_probes_take_the_target_url_only_for_sql() {
        let http = TargetProbe::http("api", "http://127.0.0.1:1/health");
        let spec = http.clone().into_spec(None).unwrap();
        assert_eq!(spec.failure_threshold, 3);
        assert_eq!(spec.period, Duration::from_secs(10));
        assert!(matches!(spec.kind, ProbeKind::Http(_)));

        let sql = TargetProbe::sql("q", "SELECT 1", Expectation::NoRows);
        let err = sql.clone().into_spec(None).unwrap_err();
        assert!(err.to_string().contains("database URL"), "{err}");
        let url = DatabaseUrl::parse("postgres://app:secret@db/shop").unwrap();
        let spec = sql.into_spec(Some(&url)).unwrap();
        let ProbeKind::Sql(s) = &spec.kind else {
            panic!("sql")
        };
        assert_eq!(s.query, "SELECT 1");
        assert!(!spec.target().contains("secret"));
    }

    #[test]
    fn configured_probes_become_target_probes_without_their_url() {
        let mut http = ProbeSpec::http("api", "http://127.0.0.1:8080/health");
        http.period = Duration::from_millis(250);
        http.failure_threshold = 2;
        http.initial_delay = Duration::from_secs(1);
        let tp = TargetProbe::from(http.clone());
        assert_eq!(tp.name, "api");
        assert_eq!(tp.period, Duration::from_millis(250));
        assert_eq!(tp.failure_threshold, 2);
        assert_eq!(tp.initial_delay, Duration::from_secs(1));
        // Back to a runnable spec, nothing is lost.
        assert_eq!(tp.into_spec(None).unwrap(), http);

        let elsewhere = DatabaseUrl::parse("postgres://app:secret@laptop/shop").unwrap();
        let sql = ProbeSpec::sql("stuck", elsewhere, "SELECT 1", Expectation::Zero);
        let tp = TargetProbe::from(sql);
        assert_eq!(
            tp.check,
            ProbeCheck::Sql {
                query: "SELECT 1".into(),
                expect: Expectation::Zero
            }
        );
        // It runs on the URL of whoever holds the target, not the configured one.
        let target = DatabaseUrl::parse("postgres://agent@db/tenant").unwrap();
        let spec = tp.into_spec(Some(&target)).unwrap();
        let ProbeKind::Sql(s) = &spec.kind else {
            panic!("sql")
        };
        assert_eq!(s.url, target);
    }

    #[tokio::test]
    async fn unknown_targets_and_missing_urls_are_refused() {
        let api = HealthTargets::new([("local".to_string(), HealthTarget::default())]);
        let err = api
            .preflight("nope", &PreflightOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnknownTarget);
        assert!(err.message.contains("local"), "{err}");
        let err = api
            .postflight("local", &PostflightSpec::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        let err = api
            .probe(
                "local",
                &TargetProbe::sql("q", "SELECT 1", Expectation::NoRows),
                Duration::from_secs(1),
            )
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
    }
}
