//! What the executor reports while it works. The CLI prints these; the agent streams them
//! over gRPC; the rollback controller will act on `Failed` and `LockTimeout`.

use chrono::{DateTime, Utc};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forward,
    Undo,
    Repeatable,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub deployment_id: Uuid,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// Another runner holds this database's migration lock.
    RunnerWaiting {
        holder: Option<RunnerHolder>,
    },
    RunnerAcquired {
        waited_ms: u64,
    },
    Warning {
        message: String,
    },
    Started {
        version: Option<String>,
        script: String,
        direction: Direction,
        in_transaction: bool,
    },
    /// One attempt hit `lock_timeout`; the executor waits for the sessions that blocked it
    /// to finish (when the lock guard saw them; `backoff_ms` is then 0), or backs off,
    /// and retries.
    LockTimeout {
        version: Option<String>,
        script: String,
        line: usize,
        attempt: u32,
        waited_ms: u64,
        backoff_ms: u64,
        /// Whom the statement waited for, as the guard's last poll saw them (empty: the
        /// guard is off, or never saw it waiting).
        #[serde(default)]
        blocked_by: Vec<crate::guard::SessionBrief>,
    },
    /// The lock guard found application sessions queued behind the migration for longer
    /// than `max_blocking` and cancelled its statement (rolled back); unless the budget is
    /// spent, the executor waits for `blockers` to finish their transactions and retries.
    LockGuardTripped {
        version: Option<String>,
        script: String,
        line: usize,
        attempt: u32,
        /// Sessions queued behind the migration when the guard tripped.
        blocked_sessions: u32,
        longest_wait_ms: u64,
        /// Pids of the sessions the migration itself was waiting for (empty: it held its
        /// locks and was working).
        blockers: Vec<i32>,
        /// The same sessions described, as the poll that decided to give way read them.
        #[serde(default)]
        blocked_by: Vec<crate::guard::SessionBrief>,
        /// Whether the cancel stopped the statement; false when the statement finished
        /// first (the trip is still counted: the application did wait that long).
        cancelled: bool,
    },
    /// A `CONCURRENTLY` statement failed and left an INVALID index, which was dropped.
    InvalidIndexDropped {
        script: String,
        index: String,
    },
    Succeeded {
        version: Option<String>,
        script: String,
        direction: Direction,
        execution_ms: u64,
        retries: u32,
        lock_wait_ms: u64,
    },
    Failed {
        version: Option<String>,
        script: String,
        direction: Direction,
        error: String,
    },
    /// The backup before the run's first statement is taken (and verified): its id is in
    /// every history row of the run.
    BackupTaken {
        id: String,
        /// `full`, `schema_only` or `tables`.
        scope: String,
        ms: u64,
    },
}

/// The session holding the runner lock, as `pg_stat_activity` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunnerHolder {
    pub pid: i32,
    pub since: Option<DateTime<Utc>>,
    pub application_name: String,
    pub user: Option<String>,
    pub client_addr: Option<String>,
}

impl std::fmt::Display for RunnerHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if !self.application_name.is_empty() {
            write!(f, " ({})", self.application_name)?;
        }
        if let Some(u) = &self.user {
            write!(f, " user {u}")?;
        }
        if let Some(a) = &self.client_addr {
            write!(f, " from {a}")?;
        }
        if let Some(s) = self.since {
            write!(f, " since {}", s.format("%Y-%m-%d %H:%M:%S UTC"))?;
        }
        Ok(())
    }
}

fn verb(d: Direction) -> &'static str {
    match d {
        Direction::Forward => "applied",
        Direction::Undo => "undone",
        Direction::Repeatable => "applied (repeatable)",
    }
}

impl EventKind {
    /// One human line for this event, as the CLI prints it and the controller records
    /// it; `None` for events that only matter to machines.
    pub fn describe(&self) -> Option<String> {
        Some(match self {
            EventKind::RunnerWaiting { holder } => match holder {
                Some(h) => format!("waiting: another belay runner holds the migration lock ({h})"),
                None => "waiting for the migration lock".to_string(),
            },
            EventKind::RunnerAcquired { waited_ms } => {
                format!("acquired the migration lock after {waited_ms} ms")
            }
            EventKind::Warning { message } => format!("warning: {message}"),
            EventKind::Started { .. } => return None,
            EventKind::LockTimeout {
                script,
                line,
                attempt,
                backoff_ms,
                blocked_by,
                ..
            } => {
                let mut s = format!(
                    "  {script}:{line}: lock not granted within lock_timeout (attempt {attempt})"
                );
                if !blocked_by.is_empty() {
                    s.push_str(&format!(", {}", blocked_by_text(blocked_by)));
                }
                s.push_str("; application queries were released; ");
                if *backoff_ms == 0 && !blocked_by.is_empty() {
                    s.push_str("retrying as soon as the blocker has finished");
                } else {
                    s.push_str(&format!("retrying in {backoff_ms} ms"));
                }
                s
            }
            EventKind::LockGuardTripped {
                script,
                line,
                attempt,
                blocked_sessions,
                longest_wait_ms,
                blockers,
                blocked_by,
                cancelled,
                ..
            } => {
                let mut s = format!(
                    "  {script}:{line}: lock guard: {blocked_sessions} session(s) queued behind the migration for {longest_wait_ms} ms (attempt {attempt})"
                );
                if *cancelled {
                    s.push_str("; statement cancelled and rolled back, application released");
                } else {
                    s.push_str("; the statement finished before the cancel");
                }
                if !blocked_by.is_empty() {
                    s.push_str(&format!("; {}", blocked_by_text(blocked_by)));
                } else if !blockers.is_empty() {
                    let pids: Vec<String> = blockers.iter().map(i32::to_string).collect();
                    s.push_str(&format!("; blocked by pid {}", pids.join(", ")));
                }
                s
            }
            EventKind::InvalidIndexDropped { script, index } => {
                format!(
                    "  {script}: dropped INVALID index {index} left by the failed CONCURRENTLY build"
                )
            }
            EventKind::Succeeded {
                script,
                direction,
                execution_ms,
                retries,
                lock_wait_ms,
                ..
            } => {
                let mut s = format!("{} {script} in {execution_ms} ms", verb(*direction));
                if *retries > 0 {
                    s.push_str(&format!(
                        " after {retries} retries ({lock_wait_ms} ms waiting for locks)"
                    ));
                }
                s
            }
            EventKind::Failed { script, .. } => format!("FAILED {script}"),
            EventKind::BackupTaken { id, scope, ms } => {
                format!("backup {id} ({scope}) taken and verified in {ms} ms")
            }
        })
    }
}

/// `blocked by pid 4242 (app "report", idle in transaction 14s, holds AccessShareLock on
/// public.accounts) and pid 4243 (...)`.
pub fn blocked_by_text(blockers: &[crate::guard::SessionBrief]) -> String {
    let named: Vec<String> = blockers.iter().map(|b| b.compact()).collect();
    format!("blocked by {}", named.join(" and "))
}

/// Where events go. Cheap to clone; called synchronously from the executor, so a sink
/// must not block (forward to a channel when the consumer is slow).
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

pub fn discard() -> EventSink {
    Arc::new(|_| {})
}
