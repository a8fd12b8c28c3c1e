//! The agent's connection budget (`[limits] max_connections_per_server`): every service
//! the agent serves reserves, per call, the connections the call may hold at once on its
//! target's server, before it opens any (see `belay_core::ConnectionBudget`).
//!
//! The reservations are taken here, around each capability API, so the capability crates
//! need no knowledge of the budget. How many slots each call takes is the most it holds
//! at once, read from what the call does:
//! - a migration run (`apply`, `undo`): its session, plus the pre-deployment backup's two
//!   (`pg_dump` and the session exporting its snapshot) when the target takes backups, or
//!   the lock guard's session (opened after the backup, closed while an undo script's
//!   fenced snapshot runs and at the run's end);
//! - a fleet deployment of a target: its deployment log's session, plus the most any of its
//!   steps holds (preflight 1, the run, the watch window's SQL probes); everything the
//!   deployment does runs within that one reservation, so a deployment never waits for a
//!   slot while it holds one (no deadlock between deployments);
//! - a backfill: its one session, for as long as it runs (hours, maybe: the slot is
//!   what keeps a long backfill and the deployments beside it within the server's limit);
//! - a rollback (`RollbackService.Execute`): its deployment log's session, plus the most any
//!   of its steps holds (the emergency backup 2, a restore 3, the undo's run, the
//!   verification's SQL probes), all within that one reservation as a deployment's are;
//!   `Status` and `Abort` reserve nothing (one short session to the log), so an operator
//!   can always see and stop a rollback that holds the whole budget;
//! - other calls: what they open (one session; a backup 2; a restore or a restore test 3).
//!
//! A reservation never exceeds the budget (`load` refuses a budget smaller than a target's
//! deployment needs, naming both).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use belay_backfill::{BackfillApi, BackfillRequest, BackfillSink, CancellationToken, Summary};
use belay_backup::{
    BackupApi, BackupFormat, BackupRequest, CatalogEntry, Manifest, MeasuredRates, ProgressSink,
    PruneReport, PruneRequest, RestoreReport, RestoreRequest, VerifyReport,
};
use belay_core::{ApiError, ConnectionBudget};
use belay_deploy::{DeploySink, TargetDeployApi, TargetDeployed, TargetDeployment, TargetRun};
use belay_health::{
    CheckResult, HealthApi, PostflightSpec, PreflightOptions, ProbeCheck, ProbeEvents, TargetProbe,
};
use belay_locks::{LockMonitorApi, LockSnapshot, MonitorOptions, SnapshotStream};
use belay_migrate::{
    ApplyOptions, EventSink, MigrationApi, MigrationStatus, PlanView, RepairAction, RunReport,
    Target, UndoTarget, Validation,
};
use futures::StreamExt as _;

use crate::config::LoadedTarget;

/// Preflight's (and postflight's) most at once: the migration state is read (and its
/// session closed) before the checks' session opens.
const PREFLIGHT_SLOTS: u32 = 1;
/// A backup: `pg_dump` and the session whose snapshot it dumps.
const BACKUP_SLOTS: u32 = 2;
/// A restore (or a restore test): the session on the database, the administrative one
/// (emergency backup, scratch database) and `pg_restore`.
const RESTORE_SLOTS: u32 = 3;

/// What one target's calls reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSlots {
    /// `host:port` of the target's URL.
    pub server: String,
    /// A migration run.
    pub run: u32,
    /// A fleet deployment, everything included.
    pub deploy: u32,
    /// A rollback, everything included.
    pub rollback: u32,
}

impl TargetSlots {
    pub fn of(t: &LoadedTarget) -> Self {
        let backup = t
            .backup
            .as_ref()
            .is_some_and(|(_, mode)| *mode != belay_guards::BackupMode::None);
        // The backup is taken before the guard connects (an undo's fenced snapshots with
        // the guard's session closed), and the guard's session is closed when the run
        // ends: the two never overlap.
        let extra = match (backup, t.lock_guard) {
            (true, _) => BACKUP_SLOTS,
            (false, true) => 1,
            (false, false) => 0,
        };
        let run = 1 + extra;
        let probes = u32::try_from(
            t.policy
                .probes
                .iter()
                .filter(|p| matches!(p.check, ProbeCheck::Sql { .. }))
                .count(),
        )
        .unwrap_or(u32::MAX);
        TargetSlots {
            server: t.spec.url.server(),
            run,
            deploy: 1 + run.max(PREFLIGHT_SLOTS).max(probes),
            rollback: 1 + run.max(RESTORE_SLOTS).max(probes),
        }
    }

    /// Why the deployment takes `deploy` slots, for the error when the budget is smaller.
    pub fn explain(&self) -> String {
        format!(
            "its deployment log's session, plus {} for its migration run, preflight or probes",
            self.deploy - 1
        )
    }
}

/// The budget and what each target's calls reserve; shared by the decorators below.
#[derive(Debug, Clone)]
pub struct Budget {
    budget: ConnectionBudget,
    targets: Arc<BTreeMap<String, TargetSlots>>,
}

impl Budget {
    pub fn new(budget: ConnectionBudget, targets: &[LoadedTarget]) -> Self {
        Budget {
            budget,
            targets: Arc::new(
                targets
                    .iter()
                    .map(|t| (t.spec.name.clone(), TargetSlots::of(t)))
                    .collect(),
            ),
        }
    }

    /// Runs `work` within `slots` of `target`'s reservation (an unknown target reserves
    /// nothing: the API refuses it without connecting).
    pub async fn within<F: Future>(
        &self,
        target: &str,
        slots: impl FnOnce(&TargetSlots) -> u32,
        what: &str,
        work: F,
    ) -> F::Output {
        match self.targets.get(target) {
            Some(t) => self.budget.scope(&t.server, slots(t), what, work).await,
            None => work.await,
        }
    }

    /// A reservation for a stream that outlives the call returning it (a lock watch, a
    /// probe): `None` when the task already holds one for the server (the stream is
    /// consumed within it) or the target is unknown.
    async fn for_stream(
        &self,
        target: &str,
        slots: u32,
        what: &str,
    ) -> Option<belay_core::Reservation> {
        let t = self.targets.get(target)?;
        if ConnectionBudget::holds(&t.server) {
            return None;
        }
        Some(self.budget.reserve(&t.server, slots, what).await)
    }
}

/// Keeps `reservation` until the stream is dropped.
fn holding<S, T>(
    stream: S,
    reservation: Option<belay_core::Reservation>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = T> + Send>>
where
    S: futures::Stream<Item = T> + Send + 'static,
{
    Box::pin(stream.map(move |item| {
        let _held = &reservation;
        item
    }))
}

/// `MigrationApi` within the budget.
pub struct Migrations {
    pub inner: Arc<dyn MigrationApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl MigrationApi for Migrations {
    async fn status(&self, target: &str) -> Result<Vec<MigrationStatus>, ApiError> {
        self.budget
            .within(target, |_| 1, "status", self.inner.status(target))
            .await
    }

    async fn plan(&self, target: &str, forward: &Target, sql: bool) -> Result<PlanView, ApiError> {
        self.budget
            .within(target, |_| 1, "plan", self.inner.plan(target, forward, sql))
            .await
    }

    async fn apply(
        &self,
        target: &str,
        forward: &Target,
        options: &ApplyOptions,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        self.budget
            .within(
                target,
                |t| t.run,
                "migrate",
                self.inner.apply(target, forward, options, sink),
            )
            .await
    }

    async fn undo(
        &self,
        target: &str,
        undo: &UndoTarget,
        deployment_id: Option<uuid::Uuid>,
        sink: EventSink,
    ) -> Result<RunReport, ApiError> {
        self.budget
            .within(
                target,
                |t| t.run,
                "undo",
                self.inner.undo(target, undo, deployment_id, sink),
            )
            .await
    }

    async fn validate(&self, target: &str) -> Result<Validation, ApiError> {
        self.budget
            .within(target, |_| 1, "validate", self.inner.validate(target))
            .await
    }

    async fn repair(
        &self,
        target: &str,
        scope: &belay_migrate::RepairScope,
    ) -> Result<Vec<RepairAction>, ApiError> {
        self.budget
            .within(target, |_| 1, "repair", self.inner.repair(target, scope))
            .await
    }

    async fn baseline(
        &self,
        target: &str,
        version: &str,
        description: &str,
    ) -> Result<(), ApiError> {
        self.budget
            .within(
                target,
                |_| 1,
                "baseline",
                self.inner.baseline(target, version, description),
            )
            .await
    }

    async fn record_reverted(
        &self,
        target: &str,
        versions: &[String],
        deployment_id: uuid::Uuid,
        backup_id: Option<&str>,
        note: serde_json::Value,
    ) -> Result<Vec<String>, ApiError> {
        self.budget
            .within(
                target,
                |_| 1,
                "record_reverted",
                self.inner
                    .record_reverted(target, versions, deployment_id, backup_id, note),
            )
            .await
    }
}

/// `HealthApi` within the budget.
pub struct Health {
    pub inner: Arc<dyn HealthApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl HealthApi for Health {
    async fn preflight(
        &self,
        target: &str,
        options: &PreflightOptions,
    ) -> Result<Vec<CheckResult>, ApiError> {
        self.budget
            .within(
                target,
                |_| PREFLIGHT_SLOTS,
                "preflight",
                self.inner.preflight(target, options),
            )
            .await
    }

    async fn postflight(
        &self,
        target: &str,
        spec: &PostflightSpec,
    ) -> Result<Vec<CheckResult>, ApiError> {
        self.budget
            .within(
                target,
                |_| PREFLIGHT_SLOTS,
                "postflight",
                self.inner.postflight(target, spec),
            )
            .await
    }

    async fn probe(
        &self,
        target: &str,
        probe: &TargetProbe,
        duration: Duration,
    ) -> Result<ProbeEvents, ApiError> {
        // An HTTP probe opens no database connection.
        let reservation = match probe.check {
            ProbeCheck::Sql { .. } => self.budget.for_stream(target, 1, "probe").await,
            ProbeCheck::Http(_) => None,
        };
        let events = self.inner.probe(target, probe, duration).await?;
        Ok(holding(events, reservation))
    }
}

/// `LockMonitorApi` within the budget.
pub struct Locks {
    pub inner: Arc<dyn LockMonitorApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl LockMonitorApi for Locks {
    async fn snapshot(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<LockSnapshot, ApiError> {
        self.budget
            .within(
                target,
                |_| 1,
                "lock snapshot",
                self.inner.snapshot(target, options),
            )
            .await
    }

    async fn watch(
        &self,
        target: &str,
        options: &MonitorOptions,
    ) -> Result<SnapshotStream, ApiError> {
        let reservation = self.budget.for_stream(target, 1, "lock watch").await;
        let snapshots = self.inner.watch(target, options).await?;
        Ok(holding(snapshots, reservation))
    }
}

/// `BackupApi` within the budget.
pub struct Backups {
    pub inner: Arc<dyn BackupApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl BackupApi for Backups {
    async fn create(
        &self,
        target: &str,
        req: &BackupRequest,
        progress: ProgressSink,
    ) -> Result<Manifest, ApiError> {
        // A directory-format dump runs `jobs` workers beside its leader.
        let slots = match req.format {
            BackupFormat::Directory { jobs } => 1 + jobs.max(1),
            _ => BACKUP_SLOTS,
        };
        self.budget
            .within(
                target,
                |_| slots,
                "backup",
                self.inner.create(target, req, progress),
            )
            .await
    }

    async fn list(&self, target: &str) -> Result<Vec<CatalogEntry>, ApiError> {
        // The catalog is on disk.
        self.inner.list(target).await
    }

    async fn verify(
        &self,
        target: &str,
        id: &str,
        restore_test: bool,
    ) -> Result<VerifyReport, ApiError> {
        if !restore_test {
            return self.inner.verify(target, id, restore_test).await;
        }
        self.budget
            .within(
                target,
                |_| RESTORE_SLOTS,
                "restore test",
                self.inner.verify(target, id, restore_test),
            )
            .await
    }

    async fn restore(
        &self,
        target: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressSink,
    ) -> Result<RestoreReport, ApiError> {
        self.budget
            .within(
                target,
                |_| RESTORE_SLOTS,
                "restore",
                self.inner.restore(target, id, req, progress),
            )
            .await
    }

    async fn prune(&self, target: &str, req: &PruneRequest) -> Result<PruneReport, ApiError> {
        self.budget
            .within(target, |_| 1, "backup prune", self.inner.prune(target, req))
            .await
    }

    async fn snapshot_tables(
        &self,
        target: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, ApiError> {
        self.budget
            .within(
                target,
                |_| BACKUP_SLOTS,
                "table snapshot",
                self.inner.snapshot_tables(target, tables, reason),
            )
            .await
    }

    async fn manifest(&self, target: &str, id: &str) -> Result<Manifest, ApiError> {
        self.inner.manifest(target, id).await
    }

    async fn measured_rates(&self, target: &str) -> Result<MeasuredRates, ApiError> {
        // A file beside the catalog: nothing to budget.
        self.inner.measured_rates(target).await
    }
}

/// `TargetDeployApi` within the budget: one reservation for the whole deployment.
pub struct Deploys {
    pub inner: Arc<dyn TargetDeployApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl TargetDeployApi for Deploys {
    async fn deploy_target(
        &self,
        request: TargetDeployment,
        sink: DeploySink,
    ) -> Result<TargetDeployed, ApiError> {
        let target = request.target.clone();
        self.budget
            .within(
                &target,
                |t| t.deploy,
                "deployment",
                self.inner.deploy_target(request, sink),
            )
            .await
    }

    async fn deployment(&self, target: &str, id: uuid::Uuid) -> Result<TargetRun, ApiError> {
        // Its log's session, and a settlement's history read beside it.
        self.budget
            .within(
                target,
                |_| 2,
                "deployment lookup",
                self.inner.deployment(target, id),
            )
            .await
    }
}

/// `BackfillApi` within the budget: a backfill holds its one session from its checks to
/// its last batch.
pub struct Backfills {
    pub inner: Arc<dyn BackfillApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl BackfillApi for Backfills {
    async fn run(
        &self,
        target: &str,
        request: BackfillRequest,
        stop: CancellationToken,
        events: BackfillSink,
    ) -> Result<Summary, ApiError> {
        self.budget
            .within(
                target,
                |_| 1,
                "backfill",
                self.inner.run(target, request, stop, events),
            )
            .await
    }

    async fn stop(&self, target: &str, name: &str) -> Result<(), ApiError> {
        // Connects to nothing: it signals the running backfill.
        self.inner.stop(target, name).await
    }
}

/// `RollbackApi` within the budget: one reservation for the whole rollback.
pub struct Rollbacks {
    pub inner: Arc<dyn belay_rollback::RollbackApi>,
    pub budget: Budget,
}

#[async_trait::async_trait]
impl belay_rollback::RollbackApi for Rollbacks {
    async fn list(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<belay_rollback::Rollbackable>, ApiError> {
        self.budget
            .within(
                target,
                |_| 1,
                "rollback list",
                self.inner.list(target, limit),
            )
            .await
    }

    async fn plan(
        &self,
        target: &str,
        to: &belay_rollback::RollbackTo,
        trigger: belay_rollback::Trigger,
    ) -> Result<belay_rollback::RollbackPlan, ApiError> {
        // The log's session and the live row counts' beside it.
        self.budget
            .within(
                target,
                |_| 2,
                "rollback plan",
                self.inner.plan(target, to, trigger),
            )
            .await
    }

    async fn execute(
        &self,
        target: &str,
        what: belay_rollback::Execute,
        trigger: belay_rollback::Trigger,
        sink: DeploySink,
    ) -> Result<belay_rollback::Outcome, ApiError> {
        self.budget
            .within(
                target,
                |t| t.rollback,
                "rollback",
                self.inner.execute(target, what, trigger, sink),
            )
            .await
    }

    async fn status(
        &self,
        target: &str,
        id: Option<&str>,
    ) -> Result<belay_rollback::RollbackStatus, ApiError> {
        // Unreserved: waiting here behind the rollback it asks about would hide it.
        self.inner.status(target, id).await
    }

    async fn abort(
        &self,
        target: &str,
        id: Option<&str>,
    ) -> Result<belay_rollback::RollbackStatus, ApiError> {
        // Unreserved: an abort must reach a rollback that holds the whole budget.
        self.inner.abort(target, id).await
    }
}

/// A budget must let every target's deployment run: one that needs more connections at
/// once than the budget allows would wait forever.
pub fn check(limits: &crate::config::Limits, targets: &[LoadedTarget]) -> Result<(), String> {
    let budget = limits.connections_per_server();
    if budget == 0 {
        return Err("`[limits] max_connections_per_server` must be at least 1".into());
    }
    for t in targets {
        let slots = TargetSlots::of(t);
        if slots.deploy > budget {
            return Err(format!(
                "`[limits] max_connections_per_server` is {budget}, but a deployment of target {:?} holds up to {} connections at once ({}); raise it to at least {}",
                t.spec.name,
                slots.deploy,
                slots.explain(),
                slots.deploy
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use belay_rollback::{
        Execute, Outcome, RollbackApi, RollbackPlan, RollbackStatus, RollbackTo, Rollbackable,
        Trigger,
    };
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the calls that got through; refuses each (the budget is what is tested).
    #[derive(Default)]
    struct Counting {
        executed: AtomicU32,
        asked: AtomicU32,
    }

    fn refused() -> ApiError {
        ApiError::new(belay_core::ErrorKind::Refused, "counted")
    }

    #[async_trait::async_trait]
    impl RollbackApi for Counting {
        async fn list(&self, _: &str, _: usize) -> Result<Vec<Rollbackable>, ApiError> {
            Err(refused())
        }
        async fn plan(
            &self,
            _: &str,
            _: &RollbackTo,
            _: Trigger,
        ) -> Result<RollbackPlan, ApiError> {
            Err(refused())
        }
        async fn execute(
            &self,
            _: &str,
            _: Execute,
            _: Trigger,
            _: DeploySink,
        ) -> Result<Outcome, ApiError> {
            self.executed.fetch_add(1, Ordering::SeqCst);
            Err(refused())
        }
        async fn status(&self, _: &str, _: Option<&str>) -> Result<RollbackStatus, ApiError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Err(refused())
        }
        async fn abort(&self, _: &str, _: Option<&str>) -> Result<RollbackStatus, ApiError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Err(refused())
        }
    }

    // One thread: the yield lets the spawned rollback run until it waits for its slots,
    // as the core budget tests do.
    #[tokio::test]
    async fn a_rollback_waits_for_its_budget_slots_while_status_and_abort_never_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_connections_per_server = 4\n[[targets]]\nname = \"shop\"\nurl = \"postgres://db/shop\"\nmigrations = \"m\"\nbackup_dir = \"b\"\n",
        )
        .unwrap();
        let (cfg, targets) = load(&path).unwrap();
        let slots = TargetSlots::of(&targets[0]);
        // The log's session and a restore's three.
        assert_eq!(slots.rollback, 4);
        let budget = Budget::new(
            ConnectionBudget::new(cfg.limits.connections_per_server()),
            &targets,
        );
        let inner = Arc::new(Counting::default());
        let api = Arc::new(Rollbacks {
            inner: inner.clone(),
            budget: budget.clone(),
        });
        // Another call on the same server holds one slot: the rollback needs all four.
        let held = budget
            .budget
            .reserve(&slots.server, 1, "another call")
            .await;
        let run = tokio::spawn({
            let api = api.clone();
            async move {
                api.execute(
                    "shop",
                    Execute::To(RollbackTo::Version("0".into())),
                    Trigger::operator("test", false),
                    Arc::new(|_: &belay_deploy::DeployEvent| {}),
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            inner.executed.load(Ordering::SeqCst),
            0,
            "ran without its slots"
        );
        // The semaphore is fair: the waiting rollback has claimed the three free slots.
        assert_eq!(budget.budget.available(&slots.server), 0);
        // Status and abort reach the target while the rollback waits (or runs).
        assert!(api.status("shop", None).await.is_err());
        assert!(api.abort("shop", None).await.is_err());
        assert_eq!(inner.asked.load(Ordering::SeqCst), 2);
        drop(held);
        let done = run.await.unwrap();
        assert_eq!(done.unwrap_err().message, "counted");
        assert_eq!(inner.executed.load(Ordering::SeqCst), 1);
        // Given back once it ended.
        assert_eq!(budget.budget.available(&slots.server), 4);
    }

    #[test]
    fn the_connection_budget_defaults_and_must_fit_a_deployment() {
        let dir = tempfile::tempdir().unwrap();
        let write = |body: &str| {
            let p = dir.path().join("agent.toml");
            std::fs::write(&p, body).unwrap();
            p
        };
        let target = "[[targets]]\nname = \"shop\"\nurl = \"postgres://db/shop\"\nmigrations = \"m\"\nbackup_dir = \"b\"\n";
        let (cfg, _) = load(&write(target)).unwrap();
        assert_eq!(
            cfg.limits.connections_per_server(),
            belay_core::DEFAULT_CONNECTIONS_PER_SERVER
        );
        let (cfg, targets) = load(&write(&format!(
            "[limits]\nmax_connections_per_server = 4\n{target}"
        )))
        .unwrap();
        assert_eq!(cfg.limits.connections_per_server(), 4);
        // The log's session, the migration's and the backup's two.
        assert_eq!(TargetSlots::of(&targets[0]).deploy, 4);
        let (cfg, targets) = load(&write(&format!(
            "[limits]\nmax_connections_per_server = 3\n{target}"
        )))
        .unwrap();
        let text = check(&cfg.limits, &targets).unwrap_err();
        assert!(
            text.contains("max_connections_per_server")
                && text.contains("\"shop\"")
                && text.contains("at least 4"),
            "{text}"
        );
        let (cfg, targets) = load(&write("[limits]\nmax_connections_per_server = 0\n")).unwrap();
        let err = check(&cfg.limits, &targets).unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
        let err = load(&write("[limits]\nmax_connections = 5\n")).unwrap_err();
        assert!(format!("{err:#}").contains("max_connections"), "{err:#}");
    }
}
