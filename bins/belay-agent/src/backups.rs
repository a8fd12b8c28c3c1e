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
