/// Why a health operation could not produce results at all. A check that ran and found a
/// problem is not an error: it is a [`crate::CheckResult`] with status `block`.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// `--override-check` named a check that does not exist.
    #[error("unknown check {name:?} in --override-check; known checks: {}", known.join(", "))]
    UnknownOverride { name: String, known: Vec<String> },
    /// Overrides are recorded with a reason; an empty one is refused.
    #[error("--override-check needs a --reason (it is recorded with the run)")]
    MissingReason,
    /// A probe or threshold configuration that cannot work.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// The database connection failed in a way no check can report (it was lost).
    #[error("database error during {during}: {source}")]
    Database {
        during: String,
        #[source]
        source: sqlx::Error,
    },
}

impl HealthError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        HealthError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
