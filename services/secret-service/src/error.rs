use secrets_common::{error, validate::FieldViolation};
use tonic::Status;

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

    #[error(
        "store object {object} would hold {keys} keys, whose timestamps take {bytes} bytes of annotations; Kubernetes allows {limit} bytes (256 KiB) of annotations per object: delete unused secrets or keep fewer keys in this domain"
    )]
    TooManyKeys { object: String, keys: usize, bytes: usize, limit: usize },

    #[error("{0}")]
    PermissionDenied(String),

    #[error("{backend}: {message}")]
    Unavailable { backend: &'static str, message: String },

    /// The backend refused the object (a Kubernetes 422): the message says why.
    #[error("{backend} rejected store object {object}: {message}")]
    Rejected { backend: &'static str, object: String, message: String },

    /// Local data the service cannot use as it is: tells the operator what to fix.
    #[error("{0}")]
    Corrupt(String),

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
            Error::TooLarge { .. } | Error::TooManyKeys { .. } => Status::failed_precondition(e.to_string()),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unavailable { .. } => Status::unavailable(e.to_string()),
            Error::Rejected { .. } => Status::failed_precondition(e.to_string()),
            Error::Corrupt(_) | Error::Internal(_) => error::internal("secret store failure", &e),
            Error::Upstream(status) => status,
        }
    }
}
