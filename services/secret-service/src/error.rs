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

/// What the caller is told: the shared mapping of
/// [`secrets_common::error::Error`], with this service's messages.
impl From<Error> for error::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => v.into(),
            Error::NotFound { .. } => Self::NotFound(e.to_string()),
            Error::AlreadyExists { .. } => Self::AlreadyExists(e.to_string()),
            Error::TooLarge { .. } => Self::FailedPrecondition(e.to_string()),
            Error::PermissionDenied(m) => Self::PermissionDenied(m),
            Error::Backend(b) => Self::Backend(b),
            Error::Internal(m) => Self::Internal(m),
            Error::Upstream(s) => Self::Upstream(s),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        error::Error::from(e).into()
    }
}

impl StoreError for Error {
    fn is_backend_failure(&self) -> bool {
        matches!(self, Error::Backend(_) | Error::Internal(_))
    }

    fn for_another_caller(&self) -> Self {
        match self {
            Error::Backend(b) => Error::Backend(b.clone()),
            other => Error::Internal(other.to_string()),
        }
    }
}
