//! The lock guard, without depending on the lock-monitoring crate: the executor calls a
//! [`LockGuardHook`] around each statement attempt it runs, with its own backend's pid.
//! While the statement runs, the hook watches the sessions queued behind that backend;
//! when they have waited longer than `max_blocking`, it cancels the statement (SQLSTATE
//! 57014: the statement, and in a transactional migration the whole transaction, rolls
//! back). The executor sees the cancel together with the trip, waits until the sessions
//! the migration itself was waiting for have finished their transactions, and retries
//! within the same attempt and time budget as lock-timeout retries.
//!
//! Why a guard on top of `lock_timeout`: `lock_timeout` only bounds the migration's wait
//! for its own lock. A migration given a long one (`-- belay:lock-timeout=30s`), or one
//! that holds its lock while it works, can still hold the application in its queue far
//! longer; the guard bounds what the application sees, whatever the migration does.

use crate::api::ApiError;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// A session, as far as the database shows it, for naming a blocker to a person.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionBrief {
    pub pid: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    /// `active`, `idle in transaction`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// How long its current transaction has been open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xact_ms: Option<u64>,
    /// The first characters of its current or last query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

impl SessionBrief {
    /// Just the pid (the session could not be described, or has gone).
    pub fn pid(pid: i32) -> Self {
        SessionBrief {
            pid,
            user: None,
            application: None,
            state: None,
            xact_ms: None,
            query: None,
        }
    }
}

impl std::fmt::Display for SessionBrief {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        let mut parts = Vec::new();
        if let Some(u) = &self.user {
            parts.push(format!("user {u}"));
        }
        if let Some(a) = &self.application {
            parts.push(format!("application {a}"));
        }
        if let Some(s) = &self.state {
            match self.xact_ms {
                Some(ms) => parts.push(format!("{s}, transaction open {ms} ms")),
                None => parts.push(s.clone()),
            }
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        if let Some(q) = &self.query {
            let q: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
            let excerpt: String = q.chars().take(80).collect();
            let more = if q.chars().count() > 80 { "…" } else { "" };
            write!(f, ": {excerpt}{more}")?;
        }
        Ok(())
    }
}

/// One intervention of the guard: sessions queued behind the migration waited past the
/// budget, so the guard cancelled the migration's statement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockTrip {
    pub at: DateTime<Utc>,
    /// Sessions queued behind the migration (directly or behind other waiters).
    pub blocked_sessions: u32,
    /// The longest of their waits when the guard tripped.
    pub longest_wait_ms: u64,
    /// Whom the migration itself was waiting for; empty when it held its locks and was
    /// working (then its own statement is what held the application up).
    pub blockers: Vec<SessionBrief>,
}

/// A statement being watched; [`LockWatch::stop`] ends the watch.
#[async_trait::async_trait]
pub trait LockWatch: Send {
    /// Stops watching and returns the trips since the watch began (at most one, in
    /// practice). An error means the guard stopped early and cancelled nothing after it.
    async fn stop(self: Box<Self>) -> Result<Vec<LockTrip>, ApiError>;
}

/// Guards migration statements against holding the application in their lock queue.
/// Implemented where the lock monitor is (`belay-guards` over `belay-locks`), so this crate
/// needs no monitoring code. Set per target with `LocalTargets::with_lock_guard` (or
/// `Migrator::with_lock_guard`); without one, `lock_timeout` alone bounds the stall.
#[async_trait::async_trait]
pub trait LockGuardHook: Send + Sync {
    /// Gets ready to watch, once per run before its first statement, while the migration
    /// holds no lock but the runner's: a guard that cannot get its session fails here
    /// (the executor then runs the whole run unguarded, with one warning) instead of while
    /// a migration transaction holds its locks.
    async fn prepare(&self) -> Result<(), ApiError> {
        Ok(())
    }

    /// The run is over (however it ended): closes whatever session `prepare` and the
    /// watches kept. Connections live as long as the work that needs them: a guard that
    /// kept its session between runs would hold an idle connection per target for the
    /// process's whole life, a thousand of them for a thousand tenant databases.
    async fn release(&self) {}

    /// Starts watching the queue behind `backend_pid` (the migration's session) from a
    /// session of the hook's own; the statement is cancelled when someone has waited in
    /// that queue longer than `max_blocking`. Fails (the executor then runs this statement
    /// and the rest of the run unguarded, with one warning) when the guard cannot get a
    /// session.
    async fn watch(
        &self,
        backend_pid: i32,
        max_blocking: Duration,
    ) -> Result<Box<dyn LockWatch>, ApiError>;

    /// Waits until every session in `pids` has finished the transaction it is in now (or
    /// disconnected), for at most `timeout`. Returns the sessions still in it (empty: all
    /// gone), described.
    async fn wait_until_gone(
        &self,
        pids: &[i32],
        timeout: Duration,
    ) -> Result<Vec<SessionBrief>, ApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocker_reads_as_a_sentence() {
        let s = SessionBrief {
            pid: 4242,
            user: Some("app".into()),
            application: Some("billing".into()),
            state: Some("idle in transaction".into()),
            xact_ms: Some(61_000),
            query: Some(format!("SELECT *\n  FROM t {}", "x".repeat(100))),
        };
        let text = s.to_string();
        assert!(
            text.starts_with(
                "pid 4242 (user app, application billing, idle in transaction, transaction open 61000 ms): SELECT * FROM t x"
            ),
            "{text}"
        );
        assert!(text.ends_with('…'), "{text}");
        assert_eq!(SessionBrief::pid(7).to_string(), "pid 7");
    }
}
