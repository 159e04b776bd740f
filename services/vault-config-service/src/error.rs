use secrets_common::{error, validate::FieldViolation};
use secrets_store::{BackendError, StoreError};
use tonic::Status;

use crate::vault::VaultFailure;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    PermissionDenied(String),

    /// Vault refused or could not be reached: named, with Vault's message.
    #[error("{0}")]
    Vault(#[from] VaultFailure),

    /// The credential store failed.
    #[error(transparent)]
    Store(#[from] BackendError),

    #[error("database ({backend}) is unavailable: {message}")]
    Database { backend: &'static str, message: String },

    #[error("{0}")]
    Internal(String),

    #[error(transparent)]
    Upstream(#[from] Status),
}

impl From<FieldViolation> for Error {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(vec![v])
    }
}

impl StoreError for Error {
    fn is_backend_failure(&self) -> bool {
        matches!(self, Error::Store(_) | Error::Internal(_))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => error::invalid_arguments(v),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Vault(f) => f.status(),
            Error::Store(BackendError::Unavailable { .. }) => Status::unavailable(e.to_string()),
            Error::Store(BackendError::Rejected { .. } | BackendError::TooManyKeys { .. }) => {
                Status::failed_precondition(e.to_string())
            }
            Error::Store(_) | Error::Internal(_) => error::internal("vault-config-service failure", &e),
            Error::Database { .. } => Status::unavailable(e.to_string()),
            Error::Upstream(s) => s,
        }
    }
}
