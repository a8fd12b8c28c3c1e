/// Why a sample, a watch or the guard failed. Messages never carry a password: URLs are
/// always the redacted form.
#[derive(Debug, thiserror::Error)]
pub enum LocksError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("lock monitor query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("lock monitor sample could not be decoded: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("lock guard task failed: {0}")]
    Task(String),
}

impl LocksError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> LocksError {
        move |source| LocksError::Query { what, source }
    }

    /// True for failures of the connection itself (worth reconnecting), as opposed to a
    /// query the server refused.
    pub fn is_connection(&self) -> bool {
        match self {
            LocksError::Connect { .. } => true,
            LocksError::Query { source, .. } => matches!(
                source,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Protocol(_)
            ),
            LocksError::Decode(_) | LocksError::Task(_) => false,
        }
    }
}
