//! Why a backfill could not start or stopped, and how callers should classify it.

use std::time::Duration;

/// Which user-supplied SQL fragment PostgreSQL rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clause {
    /// The `SET` assignments (`--set`).
    Set,
    /// The row filter (`--where`).
    Where,
}

impl Clause {
    /// The command-line option carrying the fragment, for messages.
    pub fn option(self) -> &'static str {
        match self {
            Clause::Set => "--set",
            Clause::Where => "--where",
        }
    }
}

/// How a caller should treat an error (the CLI maps these to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong: unknown table, invalid `SET`/`WHERE`, a name taken by
    /// another backfill.
    Usage,
    /// The request is understood but belay will not do it (no primary key, not a table).
    Refused,
    /// Another run of the same backfill holds it.
    Busy,
    /// The database could not be reached or the connection was lost.
    Unavailable,
    /// A batch failed (SQL error, lock retries exhausted, statement timeout); earlier
    /// batches stay committed and recorded.
    Failed,
    /// Anything else: belay's own queries failed.
    Internal,
}

/// Messages never carry a password: URLs are always the redacted form.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },

    #[error("{0}")]
    InvalidSpec(String),

    #[error("--table {table}: {reason}")]
    TableName { table: String, reason: String },

    #[error("--table {table}: no such table (search_path is {search_path})")]
    TableNotFound { table: String, search_path: String },

    #[error(
        "--table {table} is {kind}, not a table: backfills update ordinary or partitioned tables"
    )]
    NotATable { table: String, kind: &'static str },

    #[error(
        "table {table} has no primary key: a backfill walks the primary key in batches, so each \
         batch is small and no batch is done twice. Add one first (on a live table: CREATE \
         UNIQUE INDEX CONCURRENTLY on a NOT NULL column, then ALTER TABLE {table} ADD PRIMARY \
         KEY USING INDEX …), then run the backfill again"
    )]
    NoPrimaryKey { table: String },

    #[error("{} is not valid for {table}: {message}{}", .clause.option(), at(*.position, .clause))]
    InvalidExpression {
        clause: Clause,
        table: String,
        message: String,
        /// 1-based character position inside the option's text, when PostgreSQL gave one
        /// that falls there.
        position: Option<usize>,
    },

    #[error("cannot backfill {table}: {message}")]
    Privilege { table: String, message: String },

    #[error(
        "backfill {name} already exists for different work ({existing}); choose another --name, \
         or pass --restart to start it over with these settings"
    )]
    NameInUse { name: String, existing: String },

    #[error(
        "the primary key of {table} changed since backfill {name} started (was ({was}), now \
         ({now})); its saved position cannot be used: pass --restart to start over"
    )]
    KeyChanged {
        name: String,
        table: String,
        was: String,
        now: String,
    },

    #[error("backfill {name} is already running ({holder}); wait for it to finish or stop it")]
    Busy { name: String, holder: String },

    #[error(
        "batch {batch}: a lock was not granted within lock_timeout after {attempts} attempts \
         over {waited_ms} ms; the batch was rolled back. Find the blocker with `belay locks`, \
         then run the same command again to resume"
    )]
    LockRetriesExhausted {
        batch: u64,
        attempts: u32,
        waited_ms: u64,
    },

    #[error(
        "batch {batch} ran into statement_timeout ({}); it was rolled back. Use a smaller \
         --batch (or a longer --statement-timeout), then run again to resume",
        belay_core::format_duration(*.timeout)
    )]
    StatementTimeout { batch: u64, timeout: Duration },

    #[error("batch {batch} (keys after {after}) failed and was rolled back: {message}")]
    Batch {
        batch: u64,
        after: String,
        message: String,
        sqlstate: Option<String>,
    },

    #[error("the progress row of backfill {name} disappeared while it ran; nothing more was done")]
    ProgressLost { name: String },

    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

fn at(position: Option<usize>, clause: &Clause) -> String {
    position
        .map(|p| format!(" (at character {p} of {})", clause.option()))
        .unwrap_or_default()
}

impl BackfillError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> BackfillError {
        move |source| BackfillError::Query { what, source }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            BackfillError::Connect { .. } => ErrorKind::Unavailable,
            BackfillError::InvalidSpec(_)
            | BackfillError::TableName { .. }
            | BackfillError::TableNotFound { .. }
            | BackfillError::InvalidExpression { .. }
            | BackfillError::NameInUse { .. } => ErrorKind::Usage,
            BackfillError::NotATable { .. }
            | BackfillError::NoPrimaryKey { .. }
            | BackfillError::Privilege { .. }
            | BackfillError::KeyChanged { .. } => ErrorKind::Refused,
            BackfillError::Busy { .. } => ErrorKind::Busy,
            BackfillError::LockRetriesExhausted { .. }
            | BackfillError::StatementTimeout { .. }
            | BackfillError::Batch { .. }
            | BackfillError::ProgressLost { .. } => ErrorKind::Failed,
            BackfillError::Query { source, .. } if is_connection(source) => ErrorKind::Unavailable,
            BackfillError::Query { .. } => ErrorKind::Internal,
        }
    }
}

/// Failures of the connection itself, as opposed to a statement the server refused.
pub(crate) fn is_connection(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    )
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}
