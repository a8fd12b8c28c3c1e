//! The probe state machine: pure, deterministic, Kubernetes probe semantics.

use serde::{Deserialize, Serialize};

/// The result of one probe attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeResult {
    /// The target answered as expected.
    Pass,
    /// The target answered, but not as expected (status, JSON value, SQL expectation).
    Fail,
    /// No usable answer: refused connection, timeout, bad JSON, SQL error. Counts as a
    /// failure — a provider error is never a success.
    Error,
}

impl ProbeResult {
    pub fn is_failure(self) -> bool {
        !matches!(self, ProbeResult::Pass)
    }
}

/// Where a probe stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeState {
    /// Fewer than `failure_threshold` consecutive failures (the initial state).
    Healthy,
    /// `failure_threshold` consecutive failures seen and not yet `success_threshold`
    /// consecutive passes since.
    Triggered,
}

/// A change of [`ProbeState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// Healthy → Triggered: the event a rollback controller acts on.
    Triggered,
    /// Triggered → Healthy.
    Recovered,
}

/// Counts consecutive results and reports state changes. `observe` is the whole logic:
/// a failure (fail or error) resets the pass count, a pass resets the failure count;
/// `failure_threshold` consecutive failures trigger once, `success_threshold` consecutive
/// passes recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeMachine {
    failure_threshold: u32,
    success_threshold: u32,
    consecutive_failures: u32,
    consecutive_successes: u32,
    state: ProbeState,
}

impl ProbeMachine {
    /// Thresholds below 1 are taken as 1.
    pub fn new(failure_threshold: u32, success_threshold: u32) -> Self {
        ProbeMachine {
            failure_threshold: failure_threshold.max(1),
            success_threshold: success_threshold.max(1),
            consecutive_failures: 0,
            consecutive_successes: 0,
            state: ProbeState::Healthy,
        }
    }

    pub fn observe(&mut self, result: ProbeResult) -> Option<Transition> {
        if result.is_failure() {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            if self.state == ProbeState::Healthy
                && self.consecutive_failures >= self.failure_threshold
            {
                self.state = ProbeState::Triggered;
                return Some(Transition::Triggered);
            }
        } else {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            if self.state == ProbeState::Triggered
                && self.consecutive_successes >= self.success_threshold
            {
                self.state = ProbeState::Healthy;
                return Some(Transition::Recovered);
            }
        }
        None
    }

    pub fn state(&self) -> ProbeState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProbeResult::{Error as E, Fail as F, Pass as P};
    use Transition::{Recovered as R, Triggered as T};

    /// (failure_threshold, success_threshold, results, the transition after each result)
    type Case = (
        u32,
        u32,
        &'static [ProbeResult],
        &'static [Option<Transition>],
    );

    #[test]
    fn transitions_table() {
        let cases: &[Case] = &[
            // exactly the threshold-th consecutive failure triggers, once
            (3, 1, &[F, F, F, F], &[None, None, Some(T), None]),
            // errors count as failures, mixed with fails
            (3, 1, &[E, F, E], &[None, None, Some(T)]),
            // flapping below the threshold never fires
            (3, 1, &[F, F, P, F, F, P, F, F, P], &[None; 9]),
            (2, 1, &[F, P, E, P, F, P], &[None; 6]),
            // threshold 1: the first failure triggers
            (1, 1, &[P, F], &[None, Some(T)]),
            // recovery needs success_threshold consecutive passes
            (
                2,
                2,
                &[F, F, P, F, P, P],
                &[None, Some(T), None, None, None, Some(R)],
            ),
            // after recovering it can trigger again
            (1, 1, &[F, P, F], &[Some(T), Some(R), Some(T)]),
            // passes while healthy change nothing
            (1, 3, &[P, P, P], &[None; 3]),
        ];
        for (ft, st, results, want) in cases {
            let mut m = ProbeMachine::new(*ft, *st);
            let got: Vec<_> = results.iter().map(|r| m.observe(*r)).collect();
            assert_eq!(&got, want, "thresholds {ft}/{st}, results {results:?}");
        }
    }

    #[test]
    fn counters_follow_the_results() {
        let mut m = ProbeMachine::new(3, 2);
        m.observe(F);
        m.observe(E);
        assert_eq!(
            (m.consecutive_failures(), m.consecutive_successes()),
            (2, 0)
        );
        assert_eq!(m.state(), ProbeState::Healthy);
        m.observe(F);
        assert_eq!(m.state(), ProbeState::Triggered);
        m.observe(P);
        assert_eq!(
            (m.consecutive_failures(), m.consecutive_successes()),
            (0, 1)
        );
        assert_eq!(m.state(), ProbeState::Triggered);
        assert_eq!(ProbeMachine::new(0, 0), ProbeMachine::new(1, 1));
    }
}
