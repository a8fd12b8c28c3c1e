//! Commands run before and after a rollback (maintenance mode on/off, a traffic switch,
//! a notification), by the same runner as a deployment's hooks.

use crate::model::HookCommand;

pub use belay_deploy::hooks::HookRun;

/// Runs `hook` with `env` added (the deployment id, the phase, the strategy).
pub async fn run(hook: &HookCommand, env: &[(&str, String)]) -> HookRun {
    belay_deploy::hooks::run(&hook.command, hook.timeout, env).await
}
