/// A backend's own failure, as opposed to a change refusing a write.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot be reached or did not answer: `UNAVAILABLE`.
    #[error("{backend}: {message}")]
    Unavailable { backend: &'static str, message: String },

    /// The backend refused the object (a Kubernetes 422): the message says why.
    #[error("{backend} rejected store object {object}: {message}")]
    Rejected { backend: &'static str, object: String, message: String },

    /// Key timestamps would pass the Kubernetes annotation limit.
    #[error(
        "store object {object} would hold {keys} keys, whose timestamps take {bytes} bytes of annotations; Kubernetes allows {limit} bytes (256 KiB) of annotations per object: delete unused keys or keep fewer in this object"
    )]
    TooManyKeys { object: String, keys: usize, bytes: usize, limit: usize },

    /// Local data the service cannot use as it is: tells the operator what to fix.
    #[error("{0}")]
    Corrupt(String),

    #[error("{0}")]
    Internal(String),

    /// The backend's configuration is unusable: names the setting.
    #[error(transparent)]
    Misconfigured(#[from] secrets_common::validate::FieldViolation),
}
