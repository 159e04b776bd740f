use secrets_common::{error, validate::FieldViolation};
use tonic::Status;

use secrets_store::{BackendError, StoreError};

use crate::store::Scope;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] FieldViolation),

    #[error("secret {key:?} does not exist in {scope}")]
    NotFound { key: String, scope: Scope },

    #[error("secret {key:?} already exists in {scope}; use UpdateSecret to change its value")]
    AlreadyExists { key: String, scope: Scope },

    #[error(
        "store object {object} would hold {total} bytes of values; the limit is {limit} bytes (1 MiB, the Kubernetes Secret size limit): delete unused secrets or store large values elsewhere"
    )]
    TooLarge { object: String, total: usize, limit: usize },

    #[error("{0}")]
    PermissionDenied(String),

    /// The store backend failed (unavailable, rejected, corrupt data, ...).
    #[error(transparent)]
    Backend(#[from] BackendError),

    #[error("{0}")]
    Internal(String),

    #[error(transparent)]
    Upstream(#[from] Status),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => error::invalid_argument(v),
            Error::NotFound { .. } => Status::not_found(e.to_string()),
            Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
            Error::TooLarge { .. } => Status::failed_precondition(e.to_string()),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Backend(BackendError::Unavailable { .. }) => Status::unavailable(e.to_string()),
            Error::Backend(BackendError::Rejected { .. } | BackendError::TooManyKeys { .. }) => {
                Status::failed_precondition(e.to_string())
            }
            Error::Backend(BackendError::Misconfigured(v)) => error::internal("secret store misconfigured", &v),
            Error::Backend(BackendError::Corrupt(_) | BackendError::Internal(_)) | Error::Internal(_) => {
                error::internal("secret store failure", &e)
            }
            Error::Upstream(status) => status,
        }
    }
}

impl StoreError for Error {
    fn is_backend_failure(&self) -> bool {
        matches!(self, Error::Backend(_) | Error::Internal(_))
    }
}
