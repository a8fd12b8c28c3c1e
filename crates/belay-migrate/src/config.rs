//! Execution settings and their defaults, with the reasoning that sets them.

use std::time::Duration;

/// How the executor waits for locks and for other runners.
///
/// The defaults keep the application flowing. While a migration waits for a lock that
/// another session holds, every application query that needs a conflicting lock queues
/// behind the migration, so `lock_timeout` *is* the longest stall belay can add to those
/// queries. 100 ms keeps that stall far under a second while still landing at once when
/// application transactions hold their row locks for up to ~100 ms (a 20 ms timeout needed
/// 24 attempts there, 50 ms needed 12). Between attempts the queue drains; retries back off
/// exponentially with jitter, capped at 1 s so a migration lands soon after its blocker
/// leaves, and stop after `max_attempts` or `max_lock_wait`, whichever comes first — every
/// attempt, including the last, runs with the timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    pub lock_timeout: Duration,
    pub max_attempts: u32,
    /// Budget for one migration's lock waits and backoff together.
    pub max_lock_wait: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `statement_timeout` for migrations without their own directive; `None` leaves the
    /// server's setting alone.
    pub statement_timeout: Option<Duration>,
    /// `lock_timeout` for `CONCURRENTLY` statements. Their SHARE UPDATE EXCLUSIVE lock does
    /// not block the application's reads and writes, and they wait for every older
    /// transaction in the database, so a short timeout would only make them fail and leave
    /// INVALID indexes behind.
    pub concurrent_lock_timeout: Duration,
    /// How long a second runner waits for the first to finish.
    pub runner_wait: Duration,
    pub history_schema: String,
    /// The lock guard's budget (used when a `LockGuardHook` is installed): the longest
    /// an application session may wait in the lock queue behind a running migration
    /// statement before the guard cancels the statement and the executor retries it
    /// once the migration's blockers are gone.
    ///
    /// 500 ms: well under the second or two after which people and HTTP clients notice
    /// and time out, and five times `lock_timeout`, so a migration merely waiting for its
    /// lock is stopped by `lock_timeout` first (the guard never competes with it) — the
    /// guard acts on what `lock_timeout` cannot see: a long `-- belay:lock-timeout`, or a
    /// statement that holds its lock while it works.
    pub max_blocking: Duration,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            lock_timeout: Duration::from_millis(100),
            max_attempts: 60,
            max_lock_wait: Duration::from_secs(120),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            statement_timeout: None,
            concurrent_lock_timeout: Duration::from_secs(30 * 60),
            runner_wait: Duration::from_secs(60),
            history_schema: belay_history::DEFAULT_SCHEMA.to_string(),
            max_blocking: Duration::from_millis(500),
        }
    }
}

impl ExecConfig {
    /// Backoff before attempt `attempt + 1` (attempt counts from 1): exponential, capped,
    /// with jitter in [d/2, d] so concurrent runners and app retries do not synchronise.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_max);
        let half = d / 2;
        half + Duration::from_secs_f64(half.as_secs_f64() * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let c = ExecConfig::default();
        for attempt in 1..40 {
            let b = c.backoff(attempt);
            assert!(b <= c.backoff_max, "attempt {attempt}: {b:?}");
            let nominal = c
                .backoff_initial
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(c.backoff_max);
            assert!(
                b >= nominal / 2,
                "attempt {attempt}: {b:?} < half of {nominal:?}"
            );
        }
        assert!(c.backoff(1) <= Duration::from_millis(100));
    }
}
