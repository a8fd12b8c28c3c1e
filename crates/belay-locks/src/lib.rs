//! Live lock and activity monitoring for belay, and the blocking-tree model.
//!
//! This crate owns:
//! - [`snapshot`]: one cheap sample (a single query over `pg_stat_activity`,
//!   `pg_blocking_pids()` and `pg_locks`, under a low `statement_timeout`) turned into
//!   blocking trees (root blocker → waiters), long-running queries, idle-in-transaction
//!   sessions and replication lag. Works for a role with only `pg_monitor`.
//! - [`watch`]: the same sample repeated on one long-lived connection, as a stream; between
//!   samples a cheap probe every [`PROBE_PERIOD`] (who waits for a lock now) triggers a
//!   sample at once when a new wait begins, so a chain is reported within tens of
//!   milliseconds of forming whatever the period.
//! - [`LockMonitorApi`]: snapshot and watch of a named target, as every caller sees them
//!   (in-process: [`LocalLocks`]; over gRPC and through the controller: `belay-rpc`).
//! - [`LockGuard`]: the executor's guard. While a migration statement runs, it watches the
//!   queue that forms behind the migration's backend and cancels the statement
//!   (`pg_cancel_backend`) before anyone has waited in that queue longer than the budget,
//!   telling a [`QueueObserver`] what each poll saw; [`blockers_of`] and
//!   [`wait_until_gone`] let the executor retry the moment the migration's own blockers
//!   are gone instead of backing off blindly.
//!
//! It must not change schema: every statement it runs reads catalog views, except
//! `pg_cancel_backend` issued by the guard on the migration's own backend.

mod api;
mod error;
mod guard;
mod model;
mod sample;
mod tree;
mod watch;

pub use api::{
    DEFAULT_WATCH_PERIOD, LocalLocks, LockMonitorApi, MonitorOptions, SnapshotStream, filtered,
};
pub use error::LocksError;
pub use guard::{
    Blocker, GUARD_APPLICATION, GuardTrip, LockGuard, QueueObserver, QueueSeen, WaitOutcome,
    blockers_of, describe_sessions, guard_session, ripe_wait_sql, wait_until_gone,
};
pub use model::{
    LockNode, LockSnapshot, PendingBlocker, PendingDdl, ReplicaLag, SessionInfo, SnapshotOptions,
};
pub use sample::snapshot;
pub use watch::{MONITOR_APPLICATION, PROBE_PERIOD, watch};

/// The longest query excerpt kept in a node or session (characters).
pub const QUERY_EXCERPT_CHARS: usize = 200;
