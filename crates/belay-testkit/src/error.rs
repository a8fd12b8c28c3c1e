use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while providing a throwaway PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No directory with `initdb` and `postgres` was found.
    #[error(
        "no PostgreSQL server binaries found (looked in: {searched}); install them with \
         `apt-get install postgresql` (Debian/Ubuntu), or set BELAY_PG_BINDIR to the directory \
         holding `initdb` and `postgres`"
    )]
    BinariesNotFound {
        /// Where we looked, for the message.
        searched: String,
    },
    /// Running as root but there is no `postgres` user to run the server as.
    #[error(
        "running as root but the OS user `postgres` does not exist, and PostgreSQL refuses to \
         run as root: install the `postgresql` package (it creates the user) or run the tests as \
         a normal user"
    )]
    NoPostgresUser,
    /// A file-system or process operation failed.
    #[error("{what}")]
    Io {
        /// What we were doing, naming the path or program.
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An external program (`initdb`, `psql`, `pg_dump`, `cp`) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The program and its arguments.
        command: String,
        /// The exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// The server exited or did not become ready in time.
    #[error("postgres on port {port} did not start: {reason}; last lines of {}:\n{log_tail}", log.display())]
    Start {
        /// The port it was started on.
        port: u16,
        /// Exit status or timeout.
        reason: String,
        /// The server log file.
        log: PathBuf,
        /// The end of the server log.
        log_tail: String,
    },
    /// The server did not shut down in time (it was then killed).
    #[error(
        "postgres (pid {pid}) did not shut down within {timeout:?}; it was killed with SIGKILL"
    )]
    Stop {
        /// The postmaster pid.
        pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// A SQL statement the kit runs itself (such as `CREATE DATABASE`) failed.
    #[error("{what} on {url}")]
    Sql {
        /// The statement or step.
        what: String,
        /// The connection URL (test clusters use trust auth, so it holds no secret).
        url: String,
        #[source]
        source: sqlx::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
