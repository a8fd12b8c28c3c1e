use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// What a sample reports, and from when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Trees whose longest wait is shorter than this are left out (0 keeps every tree).
    pub min_wait: Duration,
    /// Active queries running at least this long are reported in `long_running`.
    pub long_running: Duration,
    /// Sessions idle in a transaction at least this long are reported.
    pub idle_in_transaction: Duration,
    /// A session left out of `long_running` and `idle_in_transaction` (e.g. belay's own
    /// runner). Blocking trees always show every session involved: hiding a blocker would
    /// misreport who the waiters wait for.
    pub exclude_pid: Option<i32>,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            min_wait: Duration::ZERO,
            // The seed runbook's long-query threshold.
            long_running: Duration::from_secs(5 * 60),
            idle_in_transaction: Duration::from_secs(60),
            exclude_pid: None,
        }
    }
}

/// One sample of the server's lock and activity state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockSnapshot {
    /// The server's clock when the sample was taken.
    pub at: DateTime<Utc>,
    /// One tree per root blocker (a session that blocks others and waits for no one),
    /// longest wait first.
    pub trees: Vec<LockNode>,
    /// belay runners retrying a migration statement, between attempts: whom their last
    /// attempt waited for. Between attempts nothing waits, so no tree shows them; each
    /// runner's lock guard names them in its `application_name` while it waits for them
    /// to leave, and the sample describes those sessions.
    #[serde(default)]
    pub pending_ddl: Vec<PendingDdl>,
    /// Active queries running longer than the threshold, longest first.
    pub long_running: Vec<SessionInfo>,
    /// Sessions idle in a transaction longer than the threshold, longest first.
    pub idle_in_transaction: Vec<SessionInfo>,
    /// Lag per replica (empty on a server without streaming replicas).
    pub replication: Vec<ReplicaLag>,
}

impl LockSnapshot {
    /// Every session in the trees that waits for a lock.
    pub fn waiting_count(&self) -> usize {
        fn count(n: &LockNode) -> usize {
            usize::from(n.waiting_ms.is_some()) + n.children.iter().map(count).sum::<usize>()
        }
        self.trees.iter().map(count).sum()
    }

    /// The longest lock wait in any tree.
    pub fn longest_wait_ms(&self) -> u64 {
        self.trees
            .iter()
            .map(LockNode::longest_wait_ms)
            .max()
            .unwrap_or(0)
    }
}

/// A session in a blocking tree. Its children are the sessions waiting for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockNode {
    pub pid: i32,
    pub user: Option<String>,
    pub application: Option<String>,
    pub database: Option<String>,
    /// `active`, `idle in transaction`, ...
    pub state: Option<String>,
    /// `Lock:relation`, `Lock:transactionid`, `Client:ClientRead`, ...
    pub wait_event: Option<String>,
    /// For a waiting session the lock mode it waits for; for a root the strongest mode it
    /// holds on the relation its waiters wait for (when that is a relation lock).
    pub mode: Option<String>,
    /// `relation`, `transactionid`, `tuple`, ... of the lock waited for (or held, for a root).
    pub lock_type: Option<String>,
    /// The relation (`schema.table` as `regclass` prints it) of that lock, when it has one.
    pub relation: Option<String>,
    /// How long this session has waited for its lock; `None` for a session not waiting.
    pub waiting_ms: Option<u64>,
    /// How long its current transaction has been open.
    pub xact_ms: Option<u64>,
    /// The first characters of the session's current or last query.
    pub query: Option<String>,
    /// Every session this one waits for (`pg_blocking_pids`, parallel workers folded into
    /// their leader); a waiter appears under each blocker not itself queued behind another.
    pub blocked_by: Vec<i32>,
    /// Set on a root picked to break a cycle of sessions all waiting for each other.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_cycle: bool,
    pub children: Vec<LockNode>,
}

impl LockNode {
    /// The longest wait in this subtree.
    pub fn longest_wait_ms(&self) -> u64 {
        self.children
            .iter()
            .map(LockNode::longest_wait_ms)
            .chain(self.waiting_ms)
            .max()
            .unwrap_or(0)
    }

    /// The pids of this subtree, depth first (a pid may repeat when a session waits for
    /// two independent blockers).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = vec![self.pid];
        for c in &self.children {
            out.extend(c.pids());
        }
        out
    }

    /// Finds a node by pid in this subtree.
    pub fn find(&self, pid: i32) -> Option<&LockNode> {
        if self.pid == pid {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(pid))
    }
}

/// A belay runner waiting, between attempts, for the sessions that blocked its statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingDdl {
    /// The migration's session.
    pub migration_pid: i32,
    /// The lock guard's session, which announced the wait.
    pub guard_pid: i32,
    /// The sessions its last attempt waited for (those still connected).
    pub blockers: Vec<PendingBlocker>,
}

/// A session a pending migration statement waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingBlocker {
    pub session: SessionInfo,
    /// The table locks it holds (`AccessShareLock on public.accounts, ...`).
    pub holds: Option<String>,
}

/// A session reported for how long it has been running or idle in a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    pub pid: i32,
    pub user: Option<String>,
    pub application: Option<String>,
    pub database: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub wait_event: Option<String>,
    pub backend_type: Option<String>,
    /// Since the current query started (for idle sessions: since the last one started).
    pub query_ms: Option<u64>,
    /// Since the transaction started.
    pub xact_ms: Option<u64>,
    /// Since the state last changed (for idle in transaction: how long it has been idle).
    pub state_ms: Option<u64>,
    pub query: Option<String>,
}

/// Replication lag of one streaming replica, as the primary sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaLag {
    pub pid: i32,
    pub application: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sync_state: Option<String>,
    pub write_lag_ms: Option<u64>,
    pub flush_lag_ms: Option<u64>,
    pub replay_lag_ms: Option<u64>,
    /// WAL bytes not yet replayed (`None` when the server is itself a standby).
    pub replay_lag_bytes: Option<i64>,
}
