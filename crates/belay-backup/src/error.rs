//! Errors: each names the target, backup or file concerned and says what to do about it.

use std::path::PathBuf;

use crate::model::VerifyProblem;

/// How a failure should be treated by callers (exit codes in the CLI, status codes in gRPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (bad name, unknown table, bad option).
    InvalidArgument,
    /// The backup or target does not exist.
    NotFound,
    /// Refused: the state does not allow it (unverified backup, client too old, exists).
    FailedPrecondition,
    /// The database could not be reached.
    Unavailable,
    /// Out of space or over the configured size budget.
    ResourceExhausted,
    /// A tool or the file system failed unexpectedly.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "the PostgreSQL client tools (pg_dump, pg_restore, psql) were not found (searched: {searched}): \
         install them, e.g. `apt-get install postgresql-client`, or point belay at the directory \
         holding them"
    )]
    ToolsNotFound { searched: String },

    #[error(
        "pg_dump {client} in {bin_dir} is older than the server of target {target} ({server}): \
         a dump would fail or be incomplete; install the client tools of version {server_major} \
         or newer (e.g. `apt-get install postgresql-client-{server_major}`) and point belay at them"
    )]
    ClientTooOld {
        target: String,
        client: String,
        server: String,
        server_major: u32,
        bin_dir: PathBuf,
    },

    #[error(
        "could not connect to {url} (target {target}): {reason}; check the URL, the network and that the server is running"
    )]
    Connect {
        target: String,
        url: String,
        reason: String,
    },

    #[error("{doing} on {url} (target {target}) failed: {reason}")]
    Database {
        target: String,
        url: String,
        doing: String,
        reason: String,
    },

    #[error("table {table} does not exist in {url} (target {target}); name tables as schema.table")]
    TableNotFound {
        target: String,
        url: String,
        table: String,
    },

    #[error(
        "table {table} is not in backup {id} of target {target} (it holds: {available}); \
         pick another backup or table"
    )]
    TableNotInBackup {
        target: String,
        id: String,
        table: String,
        available: String,
    },

    #[error(
        "cannot restore table {table} in place: {dependents} depend on it; restore the backup \
         in full, into a new database (--into), or drop the dependents first"
    )]
    TableHasDependents { table: String, dependents: String },

    #[error("{tool} failed for target {target} (exit {status}): {stderr}")]
    ToolFailed {
        tool: String,
        target: String,
        status: String,
        stderr: String,
    },

    #[error(
        "out of disk space writing backup of target {target} into {dir}: the partial backup was \
         removed and the catalog is unchanged; free space or choose another --backup-dir"
    )]
    DiskFull { target: String, dir: PathBuf },

    #[error(
        "backup of target {target} exceeded the size limit of {limit} bytes ({written} written) in \
         {dir}: the partial backup was removed and the catalog is unchanged; raise the limit or \
         back up fewer tables"
    )]
    SizeLimit {
        target: String,
        dir: PathBuf,
        limit: u64,
        written: u64,
    },

    #[error("{action} {path}: {source}")]
    Io {
        action: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("backup {id} of target {target} not found in {dir}; `belay backup list` shows the ids")]
    BackupNotFound {
        target: String,
        id: String,
        dir: PathBuf,
    },

    #[error(
        "backup {id} of target {target} is incomplete (no manifest.json in {dir}); it is ignored \
         and `belay backup prune` removes it"
    )]
    Incomplete {
        target: String,
        id: String,
        dir: PathBuf,
    },

    #[error("manifest {path} is unreadable: {reason}")]
    ManifestInvalid { path: PathBuf, reason: String },

    #[error(
        "backup {id} of target {target} failed verification: {}; refusing to restore it \
         (use --force to restore anyway)",
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    VerificationFailed {
        target: String,
        id: String,
        problems: Vec<VerifyProblem>,
    },

    #[error(
        "database {name} already exists on the server of target {target}; choose another --into name"
    )]
    DatabaseExists { target: String, name: String },

    #[error(
        "backup {id} of target {target} was taken at schema version {backup_version}; the \
         database is at {current_version} now: restoring {tables} in place would put back \
         definitions the migrations since may have changed, while history says they are \
         applied. Undo to {backup_version} first (`belay undo --to {backup_version}`), restore into a new database (--into NAME) and \
         copy what you need, or pass --across-versions to restore tables whose definition has \
         not changed since"
    )]
    SchemaVersionMismatch {
        target: String,
        id: String,
        backup_version: String,
        current_version: String,
        tables: String,
    },

    #[error(
        "refusing to restore from backup {id} of target {target} across schema versions \
         ({backup_version} then, {current_version} now): {changes}; history would say the \
         migrations since are applied to tables that no longer have their effects. Undo to \
         {backup_version} first (`belay undo --to {backup_version}`), or restore into a new database (--into NAME) and copy the rows"
    )]
    TableChangedSince {
        target: String,
        id: String,
        backup_version: String,
        current_version: String,
        changes: String,
    },

    #[error(
        "restoring backup {id} of target {target} into new database {name} failed: {source}; {cleanup}"
    )]
    IntoFailed {
        target: String,
        id: String,
        name: String,
        source: Box<BackupError>,
        cleanup: String,
    },

    #[error("invalid request: {0}")]
    Invalid(String),
}

impl BackupError {
    pub fn kind(&self) -> ErrorKind {
        use BackupError::*;
        match self {
            Invalid(_) | TableNotFound { .. } | TableNotInBackup { .. } => {
                ErrorKind::InvalidArgument
            }
            BackupNotFound { .. } | Incomplete { .. } => ErrorKind::NotFound,
            ClientTooOld { .. }
            | VerificationFailed { .. }
            | DatabaseExists { .. }
            | TableHasDependents { .. }
            | SchemaVersionMismatch { .. }
            | TableChangedSince { .. }
            | ToolsNotFound { .. } => ErrorKind::FailedPrecondition,
            IntoFailed { source, .. } => source.kind(),
            Connect { .. } => ErrorKind::Unavailable,
            DiskFull { .. } | SizeLimit { .. } => ErrorKind::ResourceExhausted,
            Database { .. } | ToolFailed { .. } | Io { .. } | ManifestInvalid { .. } => {
                ErrorKind::Internal
            }
        }
    }

    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let (action, path) = (action.into(), path.into());
        move |source| BackupError::Io {
            action,
            path,
            source,
        }
    }
}
