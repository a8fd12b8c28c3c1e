use crate::events::RunnerHolder;
use crate::source::SourceError;
use std::path::PathBuf;

/// Everything the engine refuses or fails at. `kind()` sorts them for exit codes.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("database error on {url} while {doing}: {reason}")]
    Database {
        url: String,
        doing: &'static str,
        reason: String,
    },
    #[error(transparent)]
    History(#[from] belay_history::HistoryError),
    #[error("{0}")]
    ScriptFailed(Box<ScriptFailure>),
    #[error(
        "{}:{line}: gave up after {attempts} attempts and {waited_ms} ms waiting for locks (lock_timeout {lock_timeout}); {who}",
        path.display()
    )]
    LockRetriesExhausted {
        path: PathBuf,
        line: usize,
        attempts: u32,
        waited_ms: u64,
        lock_timeout: String,
        /// Who held the lock at the last attempt and what to do, as a sentence.
        who: String,
    },
    /// The lock guard kept cancelling a migration until its budget was spent.
    #[error("{0}")]
    LockGuardExhausted(Box<GuardExhaustion>),
    #[error(
        "another belay runner is migrating this database: {holder}; waited {waited_s} s (--runner-wait). Try again when it is done"
    )]
    RunnerBusy {
        holder: Box<RunnerHolder>,
        waited_s: u64,
    },
    #[error("refusing to {action}: {reason}")]
    Refused {
        action: &'static str,
        reason: String,
    },
    #[error("no migration with version {0} in the migrations directory")]
    UnknownVersion(String),
    #[error("refusing to {action}: the backup before it failed, so nothing was changed: {message}")]
    BackupFailed {
        action: &'static str,
        /// The hook's class: `Unavailable` when the database could not be reached,
        /// otherwise `Refused`.
        kind: ErrorKind,
        message: String,
    },
    /// The snapshot an undo script takes of the data it drops, inside its own
    /// transaction behind the write fence, failed: that script did not run.
    #[error(
        "the snapshot before {script} failed, so {script} did not run (undo scripts before it in this run are undone and recorded; the ones after it did not run): {message}"
    )]
    UndoSnapshotFailed {
        script: String,
        /// As for `BackupFailed`.
        kind: ErrorKind,
        message: String,
    },
    /// The script gate (the linter, on the agent and in the CLI) refused the pending
    /// scripts; its message says why and how to proceed.
    #[error("{message}")]
    GateRefused { kind: ErrorKind, message: String },
}

/// A migration the lock guard cancelled until the attempts or the time ran out.
#[derive(Debug)]
pub struct GuardExhaustion {
    pub path: PathBuf,
    pub line: usize,
    pub attempts: u32,
    pub trips: u32,
    pub elapsed: String,
    pub max_attempts: u32,
    pub max_lock_wait: String,
    pub max_blocking: String,
    /// What was rolled back, who held the migration up (its blockers, described) and
    /// what to do about it.
    pub cause: String,
}

impl std::fmt::Display for GuardExhaustion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: gave up after {} attempt(s) in {} (limits: --max-attempts {}, --max-lock-wait {}): application sessions queued behind the migration for longer than --max-blocking {}, so the lock guard cancelled it ({} trip(s)). {}",
            self.path.display(),
            self.line,
            self.attempts,
            self.elapsed,
            self.max_attempts,
            self.max_lock_wait,
            self.max_blocking,
            self.trips,
            self.cause
        )
    }
}

/// A script that PostgreSQL rejected, located in its file.
#[derive(Debug)]
pub struct ScriptFailure {
    pub path: PathBuf,
    pub line: usize,
    pub column: Option<usize>,
    pub sqlstate: Option<String>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ScriptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)?;
        if let Some(c) = self.column {
            write!(f, ":{c}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {code})")?;
        }
        if let Some(d) = &self.detail {
            write!(f, "\n  detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

pub use belay_core::ErrorKind;

impl MigrateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrateError::Source(_) => ErrorKind::InvalidSource,
            MigrateError::Connect { .. } => ErrorKind::Unavailable,
            MigrateError::ScriptFailed(_)
            | MigrateError::LockRetriesExhausted { .. }
            | MigrateError::LockGuardExhausted(_) => ErrorKind::MigrationFailed,
            MigrateError::Refused { .. } | MigrateError::UnknownVersion(_) => ErrorKind::Refused,
            MigrateError::RunnerBusy { .. } => ErrorKind::Busy,
            MigrateError::Database { .. } | MigrateError::History(_) => ErrorKind::Internal,
            MigrateError::BackupFailed { kind, .. }
            | MigrateError::UndoSnapshotFailed { kind, .. }
            | MigrateError::GateRefused { kind, .. } => *kind,
        }
    }
}

/// A driver error as text for people: PostgreSQL's message (and detail) alone. sqlx's
/// `Display` appends "at line N", N being the line of PostgreSQL's C source that raised
/// the error — read as a line of the user's SQL, it sends them looking in the wrong place.
/// (A script's own errors are placed in the script by the executor: `file:line:column`.)
pub fn db_error_text(e: &sqlx::Error) -> String {
    let Some(pg) = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    else {
        return e.to_string();
    };
    match pg.detail() {
        Some(detail) => format!("{} ({detail})", pg.message()),
        None => pg.message().to_string(),
    }
}
