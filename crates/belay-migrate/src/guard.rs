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
    /// The client's address (`host(client_addr)`; none for a local socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// `active`, `idle in transaction`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// How long its current transaction has been open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xact_ms: Option<u64>,
    /// The first characters of its current or last query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The lock mode(s) it holds on what the migration waited for (`AccessShareLock`), or
    /// `waiting for <mode>` when it is itself queued ahead of the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The relation that lock is on (`public.accounts`), when it is a relation lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
}

impl SessionBrief {
    /// Just the pid (the session could not be described, or has gone).
    pub fn pid(pid: i32) -> Self {
        SessionBrief {
            pid,
            user: None,
            application: None,
            client: None,
            state: None,
            xact_ms: None,
            query: None,
            mode: None,
            relation: None,
        }
    }

    /// The short form a retry line shows: `pid 4242 (app "report", idle in transaction
    /// 14s, holds AccessShareLock on public.accounts)`.
    pub fn compact(&self) -> String {
        let parts = self.parts(false);
        if parts.is_empty() {
            format!("pid {}", self.pid)
        } else {
            format!("pid {} ({})", self.pid, parts.join(", "))
        }
    }

    fn parts(&self, full: bool) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(a) = &self.application {
            parts.push(format!("app {a:?}"));
        }
        if full {
            if let Some(u) = &self.user {
                parts.push(format!("user {u}"));
            }
            if let Some(c) = &self.client {
                parts.push(format!("from {c}"));
            }
        }
        match (&self.state, self.xact_ms) {
            (Some(s), Some(ms)) => parts.push(format!("{s} {}", age(ms))),
            (Some(s), None) => parts.push(s.clone()),
            (None, Some(ms)) => parts.push(format!("transaction open {}", age(ms))),
            (None, None) => {}
        }
        match (&self.mode, &self.relation) {
            (Some(m), Some(r)) if m.starts_with("waiting") => parts.push(format!("{m} on {r}")),
            (Some(m), Some(r)) => parts.push(format!("holds {m} on {r}")),
            (Some(m), None) if m.starts_with("waiting") => parts.push(m.clone()),
            (Some(m), None) => parts.push(format!("holds {m}")),
            (None, _) => {}
        }
        parts
    }
}

/// A transaction's age as a person reads it: `850ms`, `14s`, `3min 5s`.
fn age(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}min {}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

impl std::fmt::Display for SessionBrief {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        let parts = self.parts(true);
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

/// What a watch saw, handed back when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchEnd {
    /// The trips since the watch began (at most one, in practice).
    pub trips: Vec<LockTrip>,
    /// Whom the statement was waiting for at the guard's last poll that saw it waiting
    /// (empty: never seen waiting). A statement that failed on `lock_timeout` names these:
    /// the server's timeout says nothing about who held the lock, and once the statement
    /// has given up nobody blocks it any more.
    pub last_blockers: Vec<SessionBrief>,
}

/// A statement being watched; [`LockWatch::stop`] ends the watch.
#[async_trait::async_trait]
pub trait LockWatch: Send {
    /// Stops watching and returns what the watch saw. An error means the guard stopped
    /// early and cancelled nothing after it.
    async fn stop(self: Box<Self>) -> Result<WatchEnd, ApiError>;
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
    /// gone), described, and, when they are gone, what the retry should wait for first.
    async fn wait_until_gone(
        &self,
        pids: &[i32],
        timeout: Duration,
    ) -> Result<BlockersGone, ApiError>;
}

/// What [`LockGuardHook::wait_until_gone`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockersGone {
    /// The sessions still in the transaction they were in when the wait began (empty:
    /// all gone).
    pub remaining: Vec<SessionBrief>,
    /// One statement for the retry to run right after its `BEGIN`, in the same message
    /// as the script, so that no client round trip lies between it and the script's
    /// first lock request: it waits (server-side, bounded) for a moment when every
    /// session holding a lock on the tables is far enough into its transaction to end
    /// within the guard's trip point. `None`: retry at once. It locks none of the application's
    /// tables; the executor runs the retry without it should it fail. Its time counts
    /// in the attempt's execution time, as the successful attempt's own lock wait does.
    pub ripe_wait: Option<String>,
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
            client: Some("10.0.0.5".into()),
            state: Some("idle in transaction".into()),
            xact_ms: Some(61_000),
            query: Some(format!("SELECT *\n  FROM t {}", "x".repeat(100))),
            mode: Some("AccessShareLock".into()),
            relation: Some("public.accounts".into()),
        };
        let text = s.to_string();
        assert!(
            text.starts_with(
                "pid 4242 (app \"billing\", user app, from 10.0.0.5, idle in transaction 1min 1s, holds AccessShareLock on public.accounts): SELECT * FROM t x"
            ),
            "{text}"
        );
        assert_eq!(
            s.compact(),
            "pid 4242 (app \"billing\", idle in transaction 1min 1s, holds AccessShareLock on public.accounts)"
        );
        assert!(text.ends_with('…'), "{text}");
        assert_eq!(SessionBrief::pid(7).to_string(), "pid 7");
    }
}
