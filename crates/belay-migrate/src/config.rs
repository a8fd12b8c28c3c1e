//! Execution settings and their defaults, with the reasoning that sets them.

use std::time::Duration;

/// How the executor waits for locks and for other runners.
///
/// The defaults keep the application flowing. While a migration waits for a lock that
/// another session holds, every application query that needs a conflicting lock queues
/// behind the migration. With the lock guard (the default wiring of every caller), the
/// guard watches that queue and gives way the moment an application session has waited
/// behind the migration for `max_blocking`; nobody queued means waiting costs no one, so
/// the statement keeps waiting, up to `guarded_lock_timeout`. After giving way the
/// executor waits for the sessions it was blocked by to finish and retries at once.
/// Without a guard, `lock_timeout` *is* the longest stall belay can add: 100 ms keeps it
/// far under a second while still landing at once when application transactions hold
/// their row locks for up to ~100 ms; retries then back off exponentially with jitter,
/// capped at 1 s. Either way attempts stop after `max_attempts` or `max_lock_wait`,
/// whichever comes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// `lock_timeout` of a statement the lock guard does not watch (no guard, the guard
    /// off, or transaction control).
    pub lock_timeout: Duration,
    /// `lock_timeout` of a statement the lock guard watches: only the outer safety net,
    /// so no attempt waits unbounded if the guard stops mid-statement. The guard gives way
    /// long before it whenever anyone queues behind the statement. 10 s: a blocker that
    /// nobody else is waiting for costs one retry per 10 s instead of one per 100 ms.
    pub guarded_lock_timeout: Duration,
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
    /// an application session may wait in the lock queue behind a migration statement —
    /// one waiting for its lock or one holding it while it works — before the guard
    /// cancels the statement and the executor retries it once the migration's blockers are
    /// gone.
    ///
    /// 50 ms: about what one more network round trip or a slow index lookup adds to a
    /// query, so an application whose own p99 is tens of milliseconds sees belay as noise,
    /// not as a stall; the guard polls every 10 ms (a fifth of it) while a statement runs.
    pub max_blocking: Duration,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            lock_timeout: Duration::from_millis(100),
            guarded_lock_timeout: Duration::from_secs(10),
            max_attempts: 60,
            max_lock_wait: Duration::from_secs(120),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            statement_timeout: None,
            concurrent_lock_timeout: Duration::from_secs(30 * 60),
            runner_wait: Duration::from_secs(60),
            history_schema: belay_history::DEFAULT_SCHEMA.to_string(),
            max_blocking: Duration::from_millis(50),
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
