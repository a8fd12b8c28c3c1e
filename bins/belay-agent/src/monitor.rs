//! The lock monitor and health checker the agent serves for its targets: in-process
//! implementations over the targets' URLs, behind the same gRPC adapters the controller
//! uses, so a remote `belay locks` or `belay check` prints what a local one would.

use crate::budget::{self, Budget};
use crate::config::LoadedTarget;
use belay_health::{HealthApi, HealthTarget, HealthTargets};
use belay_locks::LocalLocks;
use belay_migrate::LocalTargets;
use belay_rpc::{HealthGrpc, LockMonitorGrpc};
use std::sync::Arc;

/// The lock monitor and health services, and the health checker behind the latter (the
/// same one the agent's deployment pipelines check their targets with), each call within
/// the agent's connection budget.
pub fn services(
    targets: &[LoadedTarget],
    budget: &Budget,
) -> (LockMonitorGrpc, HealthGrpc, Arc<dyn HealthApi>) {
    let locks = LocalLocks::new(
        targets
            .iter()
            .map(|t| (t.spec.name.clone(), t.spec.url.clone())),
    );
    // Migration state for preflight and postflight comes from the engine over the same
    // targets (status reads history; no backup or lock-guard hooks are involved).
    let migrations = Arc::new(LocalTargets::new(targets.iter().map(|t| t.spec.clone())));
    let facts = belay_guards::MigrationFactsAdapter::new(
        migrations,
        targets
            .iter()
            .map(|t| (t.spec.name.clone(), t.spec.dir.clone())),
    );
    let health = HealthTargets::new(targets.iter().map(|t| {
        (
            t.spec.name.clone(),
            HealthTarget {
                url: Some(t.spec.url.clone()),
                backup_dir: t.backup.as_ref().map(|(dir, _)| dir.clone()),
            },
        )
    }))
    .with_migration_facts(Arc::new(facts));
    let health: Arc<dyn HealthApi> = Arc::new(budget::Health {
        inner: Arc::new(health),
        budget: budget.clone(),
    });
    let locks = budget::Locks {
        inner: Arc::new(locks),
        budget: budget.clone(),
    };
    (
        LockMonitorGrpc::new(Arc::new(locks)),
        HealthGrpc::new(health.clone()),
        health,
    )
}
