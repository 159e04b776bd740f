use secrets_common::{error, validate::FieldViolation};
use tonic::Status;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] FieldViolation),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A database call that failed before [`crate::policy::Policy`] named it.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The database did not answer, or failed: `UNAVAILABLE` naming it.
    #[error("database ({backend}) is unavailable: {message}")]
    Database { backend: &'static str, message: String },
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => error::invalid_argument(v),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Db(ref db) => {
                tracing::error!(error = %db, "database call failed");
                Status::unavailable("database is unavailable")
            }
            Error::Database { .. } => Status::unavailable(e.to_string()),
            Error::Internal(m) => error::internal("authz failure", &m),
        }
    }
}
