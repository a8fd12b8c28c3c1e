//! The failure every capability API returns, local or remote: a stable class and a human
//! message. The classes map one-to-one onto gRPC status codes and CLI exit codes, so a
//! message that crossed the wire keeps both its meaning and its exit code.

/// Coarse classes of failure, stable for exit codes and gRPC status mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Migration files are invalid (names, duplicates, directives, layouts).
    InvalidSource,
    /// The database could not be reached.
    Unavailable,
    /// A migration ran and failed (SQL error, lock retries exhausted).
    MigrationFailed,
    /// The engine refused to act: history needs attention, or the request is impossible.
    Refused,
    /// Another runner holds the lock.
    Busy,
    /// Anything else from the database.
    Internal,
    /// No such target (remote mode: no agent owns it).
    UnknownTarget,
    /// The agent owning the target cannot be reached.
    AgentUnreachable,
    /// The caller is not authenticated or authorised.
    Unauthenticated,
    /// The request itself is wrong (bad option, unknown table, bad name).
    InvalidArgument,
    /// The object asked for (a backup, a probe) does not exist on a known target.
    NotFound,
    /// Out of disk space or over a configured size budget.
    OutOfSpace,
}

/// A failure as every caller sees it, local or remote: a class and a human message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}
