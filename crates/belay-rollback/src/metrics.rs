//! The rollback's metrics, with the names agreed across belay (`belay_telemetry`'s
//! recorder exports them): `belay_rollbacks_total{strategy,trigger,result}`,
//! `belay_rollback_duration_seconds{strategy,result}`, `belay_rollbacks_in_progress`.

use std::time::Duration;

use crate::error::RollbackError;
use crate::exec::Outcome;
use crate::model::RollbackPlan;

pub const ROLLBACKS_TOTAL: &str = "belay_rollbacks_total";
pub const ROLLBACK_DURATION_SECONDS: &str = "belay_rollback_duration_seconds";
pub const ROLLBACKS_IN_PROGRESS: &str = "belay_rollbacks_in_progress";

pub(crate) fn started() {
    metrics::gauge!(ROLLBACKS_IN_PROGRESS).increment(1.0);
}

pub(crate) fn finished(
    plan: &RollbackPlan,
    result: &Result<Outcome, RollbackError>,
    took: Duration,
) {
    metrics::gauge!(ROLLBACKS_IN_PROGRESS).decrement(1.0);
    let outcome = match result {
        Ok(o) => o.state.as_str(),
        // Nothing ran to its end: the log could not be written, or the deployment moved.
        Err(_) => "aborted",
    };
    let strategy = plan.strategy.as_str();
    metrics::counter!(
        ROLLBACKS_TOTAL,
        "strategy" => strategy,
        "trigger" => trigger_label(plan.trigger.kind),
        "result" => outcome,
    )
    .increment(1);
    metrics::histogram!(
        ROLLBACK_DURATION_SECONDS,
        "strategy" => strategy,
        "result" => outcome,
    )
    .record(took.as_secs_f64());
}

/// The `trigger` label: the documented, bounded values (`belay_telemetry::ROLLBACK_TRIGGERS`)
/// — a failed pipeline step, an alert through the webhook, or an operator's command. The
/// step and cause are in the deployment's record, not in a label.
fn trigger_label(kind: crate::TriggerKind) -> &'static str {
    match kind {
        crate::TriggerKind::Operator => "manual",
        crate::TriggerKind::Alert => "alert",
        crate::TriggerKind::MigrationFailed
        | crate::TriggerKind::ValidationFailed
        | crate::TriggerKind::ProbeThreshold
        | crate::TriggerKind::LockTrips => "pipeline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trigger_label_is_one_the_start_up_series_initialise() {
        use crate::TriggerKind::*;
        for kind in [
            MigrationFailed,
            ValidationFailed,
            ProbeThreshold,
            LockTrips,
            Operator,
            Alert,
        ] {
            assert!(
                belay_telemetry::ROLLBACK_TRIGGERS.contains(&trigger_label(kind)),
                "{kind:?}"
            );
        }
    }
}
