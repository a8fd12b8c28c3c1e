//! The deployment metrics, recorded by the process that runs a target's pipeline (the
//! agent for remote and fleet deployments, the CLI in-process for local `migrate`): every
//! end counted once, whatever path it took, and the targets in each step now.
//!
//! The controller counts none of these: each fleet target's end is counted by the agent
//! that ran it, so a sum over every scraped job never counts a deployment twice.

use std::time::Instant;

use belay_telemetry::names;

use crate::record::Step;

/// The status label an end is counted under.
pub(crate) fn status(state: Option<Step>) -> &'static str {
    match state {
        Some(Step::Succeeded) => "succeeded",
        Some(Step::RolledBack) => "rolled_back",
        Some(Step::Escalated) => "escalated",
        // A failed step, or a run that ended without an outcome (its log broke).
        _ => "failed",
    }
}

/// Counts one deployment's end.
pub(crate) fn ended(status: &'static str, started: Instant) {
    metrics::counter!(names::DEPLOYMENTS_TOTAL, "status" => status).increment(1);
    metrics::histogram!(names::DEPLOYMENT_DURATION_SECONDS, "status" => status)
        .record(started.elapsed().as_secs_f64());
}

/// Counts the blocking results of a target's postflight.
pub(crate) fn validation_errors(target: &str, blocked: usize) {
    metrics::counter!(
        names::VALIDATION_ERRORS_TOTAL,
        "target" => target.to_string(),
        "kind" => "postflight"
    )
    .increment(blocked as u64);
}

/// The target's place in `belay_deployment_targets{step}`: moved at each transition and
/// taken out when dropped, so a run that ends by any path (an error included) leaves no
/// target counted in a step.
#[derive(Debug, Default)]
pub(crate) struct InStep(Option<Step>);

impl InStep {
    pub(crate) fn move_to(&mut self, to: Step) {
        self.leave();
        if is_running(to) {
            metrics::gauge!(names::DEPLOYMENT_TARGETS, "step" => to.as_str()).increment(1.0);
            self.0 = Some(to);
        }
    }

    fn leave(&mut self) {
        if let Some(step) = self.0.take() {
            metrics::gauge!(names::DEPLOYMENT_TARGETS, "step" => step.as_str()).decrement(1.0);
        }
    }
}

impl Drop for InStep {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Whether a target in this step is still being deployed.
fn is_running(step: Step) -> bool {
    !matches!(
        step,
        Step::Succeeded | Step::Failed | Step::RolledBack | Step::Escalated
    )
}
