//! [`RollbackHandler`]: the pipeline's `FailureHandler` for `on_failure = "rollback"`.
//! It plans the rollback of the failed deployment and, per the policy's mode, executes it
//! (`auto`), records the plan and the command that would run it (`ask`), or refuses
//! (`never`).

use std::sync::Arc;

use belay_core::{ApiError, ErrorKind};
use belay_deploy::{DeploymentRecord, FailureHandler, Step, StepFailure};
use serde_json::json;
use uuid::Uuid;

use crate::api::{Execute, LocalRollbacks, RollbackApi};
use crate::exec::{Executor, KIND_ROLLBACK_PLAN, Outcome};
use crate::model::{Mode, RollbackPlan, Trigger};
use crate::plan::{Planner, Resolved};

/// Where the handler tells the caller what happened (the CLI prints it).
pub type Notify = Arc<dyn Fn(HandlerNote<'_>) + Send + Sync>;

/// What the handler did.
#[derive(Debug)]
pub enum HandlerNote<'a> {
    Planned(&'a RollbackPlan),
    /// `ask`: the plan is recorded; this command runs it.
    Asked {
        plan: &'a RollbackPlan,
        command: String,
    },
    Finished(&'a Outcome),
}

#[derive(Clone)]
pub struct RollbackHandler {
    pub planner: Planner,
    pub executor: Executor,
    pub notify: Option<Notify>,
    /// Runs the rollback through this (the agent's), so it is known to `rollback abort`
    /// and to a concurrent `rollback execute`; `None`: on `executor` directly.
    pub local: Option<LocalRollbacks>,
    /// The global arguments an operator's `belay` needs to reach this target (`--dir`,
    /// `--config` locally; `--controller`, `--target` for an agent's), put in the
    /// command `ask` records.
    pub command_args: Vec<String>,
}

impl std::fmt::Debug for RollbackHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollbackHandler")
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

impl RollbackHandler {
    fn note(&self, n: HandlerNote<'_>) {
        if let Some(f) = &self.notify {
            f(n);
        }
    }
}

/// The command that runs a planned rollback of `id`, runnable as printed from an
/// operator's shell: `args` (the global arguments reaching the target) quoted for `sh`.
pub fn execute_command(id: Uuid, args: &[String]) -> String {
    let mut words = vec!["belay".to_string()];
    words.extend(args.iter().map(|a| shell_quote(a)));
    words.extend([
        "rollback".into(),
        "execute".into(),
        id.to_string()[..8].to_string(),
        "--yes".into(),
    ]);
    words.join(" ")
}

/// `word` as `sh` reads it back: bare when it holds nothing special, else single-quoted.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[async_trait::async_trait]
impl FailureHandler for RollbackHandler {
    async fn handle(
        &self,
        record: &DeploymentRecord,
        failure: &StepFailure,
    ) -> Result<(), ApiError> {
        let id = record.start.id;
        let mode = self.executor.policy.mode;
        if mode == Mode::Never {
            return Err(ApiError::new(
                ErrorKind::Refused,
                format!(
                    "the rollback policy is `never`: deployment {id} is left as it failed; roll back by hand with `belay rollback plan {}` then `execute`",
                    &id.to_string()[..8]
                ),
            ));
        }
        if record.outcome.as_ref().is_none_or(|o| o.applied.is_empty()) {
            // Nothing committed (a refusal before the first migration, or a failed first
            // migration rolled back by its own transaction): nothing to revert.
            return Ok(());
        }
        let resolved = Resolved {
            deployments: vec![record.clone()],
            to_version: record.start.from_version.clone(),
        };
        let plan = self
            .planner
            .plan(
                &record.start.target,
                &resolved,
                Trigger::from_failure(failure),
            )
            .await?;
        self.note(HandlerNote::Planned(&plan));
        if mode == Mode::Ask {
            let command = execute_command(id, &self.command_args);
            let mut event = belay_deploy::DeployEvent {
                deployment_id: id,
                target: record.start.target.clone(),
                seq: 0,
                at: chrono::Utc::now(),
                step: Step::Failed,
                kind: KIND_ROLLBACK_PLAN.into(),
                message: format!(
                    "rollback planned ({}), waiting for `{command}`",
                    plan.strategy
                ),
                payload: json!({ "plan": plan, "command": command }),
            };
            event.seq = self
                .executor
                .log
                .append(event.clone())
                .await
                .map_err(|e| ApiError::new(ErrorKind::Unavailable, e.to_string()))?;
            // Streamed too: a fleet deployment's controller records it with the target's
            // events, where the operator finds the command.
            if let Some(sink) = &self.executor.sink {
                sink(&event);
            }
            self.note(HandlerNote::Asked {
                plan: &plan,
                command,
            });
            return Ok(());
        }
        let outcome = match &self.local {
            Some(local) => {
                let sink = self
                    .executor
                    .sink
                    .clone()
                    .unwrap_or_else(|| Arc::new(|_: &belay_deploy::DeployEvent| {}));
                local
                    .execute(
                        &record.start.target,
                        Execute::Plan(Box::new(plan.clone())),
                        plan.trigger.clone(),
                        sink,
                    )
                    .await?
            }
            None => self.executor.execute(&plan).await?,
        };
        self.note(HandlerNote::Finished(&outcome));
        if outcome.state == Step::Escalated {
            return Err(ApiError::new(
                ErrorKind::MigrationFailed,
                format!(
                    "the rollback of deployment {id} escalated: {}",
                    outcome.report.errors.join("; ")
                ),
            ));
        }
        Ok(())
    }
}
