//! A deployment's life once a rollback acts on it, as data: which step an event moves it
//! to, or `None` when the event is not allowed there. The executor asks before every
//! transition it records, so the record never shows a move the table does not allow (two
//! rollbacks of one deployment, a rollback of one still running, an escalated one
//! rolled back without a person).

use belay_deploy::Step;

/// What happens to a deployment on the rollback's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackEvent {
    /// A rollback starts.
    Start,
    /// Every step passed, verification included.
    Verified,
    /// A step failed: stop, keep everything, a person decides.
    StepFailed,
}

impl RollbackEvent {
    pub const ALL: [RollbackEvent; 3] = [
        RollbackEvent::Start,
        RollbackEvent::Verified,
        RollbackEvent::StepFailed,
    ];
}

/// The transition table.
pub fn next(step: Step, event: RollbackEvent) -> Option<Step> {
    use RollbackEvent::*;
    match (step, event) {
        (Step::Succeeded | Step::Failed, Start) => Some(Step::RollingBack),
        (Step::RollingBack, Verified) => Some(Step::RolledBack),
        (Step::RollingBack, StepFailed) => Some(Step::Escalated),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [Step; 11] = [
        Step::Planned,
        Step::Preflight,
        Step::BackingUp,
        Step::Migrating,
        Step::Validating,
        Step::Watching,
        Step::Succeeded,
        Step::Failed,
        Step::RollingBack,
        Step::RolledBack,
        Step::Escalated,
    ];

    #[test]
    fn every_step_and_event() {
        for step in STEPS {
            for event in RollbackEvent::ALL {
                let expected = match (step, event) {
                    (Step::Succeeded, RollbackEvent::Start)
                    | (Step::Failed, RollbackEvent::Start) => Some(Step::RollingBack),
                    (Step::RollingBack, RollbackEvent::Verified) => Some(Step::RolledBack),
                    (Step::RollingBack, RollbackEvent::StepFailed) => Some(Step::Escalated),
                    _ => None,
                };
                assert_eq!(next(step, event), expected, "{step} on {event:?}");
            }
        }
        // Final states stay final; a running deployment cannot be rolled back.
        for event in RollbackEvent::ALL {
            assert_eq!(next(Step::RolledBack, event), None);
            assert_eq!(next(Step::Escalated, event), None);
            assert_eq!(next(Step::Migrating, event), None);
        }
    }
}
