//! Why a rollback could not be planned or run (a rollback that ran and escalated is an
//! outcome, not an error: see `Outcome`).

use belay_core::{ApiError, ErrorKind};
use belay_deploy::LogError;

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// No deployment, release or version on record matches.
    #[error("{0}")]
    NotFound(String),
    /// The request is ambiguous or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The rollback is not allowed (already rolled back, in progress, policy `never`).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl RollbackError {
    /// The capability error kind this maps to (exit codes, gRPC codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            RollbackError::NotFound(_) => ErrorKind::NotFound,
            RollbackError::Invalid(_) => ErrorKind::InvalidArgument,
            RollbackError::Refused(_) => ErrorKind::Refused,
            RollbackError::Log(_) => ErrorKind::Unavailable,
            RollbackError::Api(e) => e.kind,
        }
    }
}

impl From<RollbackError> for ApiError {
    fn from(e: RollbackError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}
