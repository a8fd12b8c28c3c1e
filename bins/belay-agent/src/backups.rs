//! The agent's `BackupService`: each target with a `backup_dir` is backed up into it (the
//! same catalog its pre-deployment backups go to); a target without one is refused with
//! the key to set, rather than reported unknown.

use crate::config::LoadedTarget;
use belay_backup::{BackupManager, LocalBackups};
use std::path::Path;

pub fn service(targets: &[LoadedTarget], config: Option<&Path>) -> LocalBackups {
    let file = config.map_or_else(
        || "the agent's configuration (--config)".to_owned(),
        |p| p.display().to_string(),
    );
    targets.iter().fold(LocalBackups::new(), |api, t| {
        let name = t.spec.name.clone();
        match &t.backup {
            Some((dir, _)) => api.with_target(name, t.spec.url.clone(), manager(dir, t)),
            None => {
                let remedy = format!(
                    "set `backup_dir` for target {name:?} in {file} (where its backups go) and restart the agent"
                );
                api.without_backups(name, remedy)
            }
        }
    })
}

/// The manager for a target's catalog, reading the schema version from the target's own
/// history schema.
fn manager(dir: &Path, t: &LoadedTarget) -> BackupManager {
    BackupManager::new(dir).with_history_schema(t.spec.exec.history_schema.clone())
}

/// What the metrics know of a target at start-up: its probes, and for one that takes
/// backups, its newest one on record (so backup age and size tell the truth across a
/// restart, rather than starting from "never").
pub fn metric_series(t: &LoadedTarget) -> belay_telemetry::TargetSeries {
    let backups = t.backup.as_ref().map(|(dir, _)| {
        let catalog = manager(dir, t).catalog(&t.spec.name).ok()?;
        let newest = catalog
            .list()
            .ok()?
            .into_iter()
            .max_by_key(|e| e.created_at)?;
        let manifest = catalog.get(&newest.id).ok()?;
        let finished = manifest.created_at.timestamp_millis() as f64 / 1000.0
            + manifest.duration_ms as f64 / 1000.0;
        Some((finished, manifest.total_size() as f64))
    });
    belay_telemetry::TargetSeries {
        name: t.spec.name.clone(),
        probes: t.policy.probes.iter().map(|p| p.name.clone()).collect(),
        backups,
    }
}
