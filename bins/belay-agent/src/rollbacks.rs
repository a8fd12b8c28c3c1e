//! The agent's rollback controller: `RollbackService` for its targets, and the
//! `FailureHandler` its deployment pipelines hand a failure to (`on_failure = rollback`),
//! both over `LocalRollbacks` built from the agent's own APIs — the guarded executor,
//! each target's backup catalog (restores with their lock waits bounded), the health
//! checker, the deployment log beside the target — with each target's
//! `[targets.rollback]`.

use crate::config::LoadedTarget;
use belay_backup::{BackupManager, LocalBackups};
use belay_core::{ApiError, ErrorKind};
use belay_deploy::{DeploySink, DeploymentLog, FailureHandler, HandlerFor};
use belay_health::HealthApi;
use belay_migrate::MigrationApi;
use belay_rollback::{Executor, LocalRollbacks, Planner, RollbackHandler, TargetRollbacks};
use std::sync::Arc;

/// Each target's rollback controller.
pub fn local(
    targets: &[LoadedTarget],
    migrations: Arc<dyn MigrationApi>,
    health: Arc<dyn HealthApi>,
) -> Result<LocalRollbacks, ApiError> {
    let mut api = LocalRollbacks::new();
    for t in targets {
        let name = t.spec.name.clone();
        let (policy, restore_lock_timeout) = t.rollback.clone();
        // Its own catalog view: the same directory as the target's backups, with a
        // restore's lock waits bounded (a rollback restores into a live database).
        let backups = match &t.backup {
            Some((dir, _)) => LocalBackups::new().with_target(
                name.clone(),
                t.spec.url.clone(),
                BackupManager::new(dir)
                    .with_history_schema(t.spec.exec.history_schema.clone())
                    .with_restore_lock_timeout(restore_lock_timeout),
            ),
            None => LocalBackups::new().without_backups(
                name.clone(),
                format!(
                    "a rollback takes an emergency backup first: set `backup_dir` for target {name:?} in the agent's agent.toml and restart the agent"
                ),
            ),
        };
        let backups = Arc::new(backups);
        let log = belay_guards::HistoryDeploymentLog::new(
            t.spec.url.clone(),
            &t.spec.exec.history_schema,
        )
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let log: Arc<dyn DeploymentLog> = Arc::new(log);
        let planner = Planner {
            backups: backups.clone(),
            backup_target: name.clone(),
            history_schema: t.spec.exec.history_schema.clone(),
            scripts: Arc::new(belay_guards::FileScriptFacts::dir(t.spec.dir.clone())),
            stats: Arc::new(belay_rollback::PgTableStats::new(t.spec.url.clone())),
        };
        let executor = Executor {
            migrations: migrations.clone(),
            backups,
            health: health.clone(),
            log: log.clone(),
            backup_target: name.clone(),
            policy,
            probes: t.policy.probes.clone(),
            // The postflight each deployment recorded (the target's, from agent.toml).
            postflight: None,
            sink: None,
            abort: None,
            run_lock: Some(Arc::new(belay_rollback::PgRunLock::new(t.spec.url.clone()))),
        };
        api = api.with_target(
            name,
            TargetRollbacks {
                planner,
                executor,
                log,
            },
        );
    }
    Ok(api)
}

/// The pipelines' failure handler per target: the target's rollback controller, per its
/// policy (`auto` rolls back, `ask` records the plan and waits, `never` refuses), its
/// events streamed with the deployment's own. The command `ask` records goes through
/// `controller` (agent.toml's) to the target, as an operator runs it.
pub fn handlers(api: LocalRollbacks, controller: Option<String>) -> HandlerFor {
    Arc::new(move |target: &str, sink: DeploySink| {
        let t = api.target(target).ok()?;
        let mut executor = t.executor.clone();
        executor.sink = Some(sink);
        let mut command_args = Vec::new();
        if let Some(c) = &controller {
            command_args.extend(["--controller".to_string(), c.clone()]);
        }
        command_args.extend(["--target".to_string(), target.to_string()]);
        let handler = RollbackHandler {
            planner: t.planner.clone(),
            executor,
            notify: None,
            local: Some(api.clone()),
            command_args,
        };
        Some(Arc::new(handler) as Arc<dyn FailureHandler>)
    })
}
