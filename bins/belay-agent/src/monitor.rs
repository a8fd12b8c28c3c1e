//! The lock monitor and health checker the agent serves for its targets: in-process
//! implementations over the targets' URLs, behind the same gRPC adapters the controller
//! uses, so a remote `belay locks` or `belay check` prints what a local one would.

use crate::config::LoadedTarget;
use belay_health::{HealthTarget, HealthTargets};
use belay_locks::LocalLocks;
use belay_migrate::LocalTargets;
use belay_rpc::{HealthGrpc, LockMonitorGrpc};
use std::sync::Arc;

/// The lock monitor and health services, and the health checker behind the latter (the
/// same one the agent's deployment pipelines check their targets with).
pub fn services(targets: &[LoadedTarget]) -> (LockMonitorGrpc, HealthGrpc, Arc<HealthTargets>) {
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
    let health = Arc::new(health);
    (
        LockMonitorGrpc::new(Arc::new(locks)),
        HealthGrpc::new(health.clone()),
        health,
    )
}
