//! gRPC status conventions shared by every service.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::validate::FieldViolation;

/// What a request failed with, in the terms every service answers in. The
/// services' domain logic returns it (or an error of its own that converts
/// into it); `From<Error> for Status` below is the one mapping to gRPC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: each violation names its field and the rule.
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
    /// A database or peer did not answer; the message names which.
    #[error("{0}")]
    Unavailable(String),
    /// A database call failed; [`crate::error::Error::database`] names the
    /// database once the failure is classified (secrets_db's `bounded`).
    #[cfg(feature = "database")]
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// A store backend failed or refused the object.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Ours, not the caller's: the caller sees `internal error`, the log
    /// the message.
    #[error("{0}")]
    Internal(String),
    /// An answer already in gRPC terms: another service's, or a classified
    /// failure of a peer such as Vault.
    #[error(transparent)]
    Upstream(#[from] Status),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The database did not answer or failed: `UNAVAILABLE` naming it.
    pub fn database(backend: &str, message: impl std::fmt::Display) -> Self {
        Self::Unavailable(format!("database ({backend}) is unavailable: {message}"))
    }
}

impl Error {
    /// The same failure for another caller whose work went into the same
    /// write (group commit): unavailability keeps its code and message,
    /// anything else is reported as an internal failure with its message.
    pub fn for_another_caller(&self) -> Self {
        match self {
            Self::Backend(b) => Self::Backend(b.clone()),
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<FieldViolation> for Error {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(vec![v])
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => invalid_arguments(v),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unavailable(m) => Status::unavailable(m),
            #[cfg(feature = "database")]
            Error::Db(e) => {
                tracing::error!(error = %e, "database call failed");
                Status::unavailable("database is unavailable")
            }
            Error::Backend(b @ BackendError::Unavailable { .. }) => Status::unavailable(b.to_string()),
            Error::Backend(b @ BackendError::Unanswered { .. }) => Status::deadline_exceeded(b.to_string()),
            Error::Backend(BackendError::Busy { message }) => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(crate::admission::RETRY_AFTER)),
            ),
            Error::Backend(b @ (BackendError::Rejected { .. } | BackendError::TooManyKeys { .. })) => {
                Status::failed_precondition(b.to_string())
            }
            Error::Backend(BackendError::Misconfigured(v)) => internal("store backend misconfigured", &v),
            Error::Backend(b @ (BackendError::Corrupt(_) | BackendError::Internal(_))) => {
                internal("store backend failure", &b)
            }
            Error::Internal(m) => internal("internal failure", &m),
            Error::Upstream(status) => status,
        }
    }
}

/// A backend's own failure, as opposed to a change refusing a write.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot be reached or did not answer: `UNAVAILABLE`.
    #[error("{backend}: {message}")]
    Unavailable { backend: &'static str, message: String },

    /// A write was sent and not answered in time: it may have been applied.
    /// `DEADLINE_EXCEEDED`, where `Unavailable` means nothing was written.
    #[error(
        "{backend}: {message}; the change may have been applied: send it again with the same request_id, or read it back first"
    )]
    Unanswered { backend: &'static str, message: String },

    /// This service's bound on calls to the backend is reached: the message
    /// says which bound. `RESOURCE_EXHAUSTED` with a `RetryInfo`.
    #[error("{message}")]
    Busy { message: String },

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
    Misconfigured(#[from] FieldViolation),
}

/// `INVALID_ARGUMENT` with one `BadRequest` field violation; the message names
/// the field and the rule too, for callers that do not read details.
pub fn invalid_argument(violation: FieldViolation) -> Status {
    invalid_arguments(vec![violation])
}

/// `INVALID_ARGUMENT` with every violation as a `BadRequest` field violation.
pub fn invalid_arguments(violations: Vec<FieldViolation>) -> Status {
    let message = violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let mut details = ErrorDetails::new();
    for v in &violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// Wraps a status that came back from another service so the caller sees
/// which service failed. Errors about the request itself (bad input, not
/// found, denied, ...) keep their code and details; transport and server
/// failures become `UNAVAILABLE` naming the service, once.
///
/// `UNAUTHENTICATED` from an internal service means this service's internal
/// credential was refused: an operator's misconfiguration of that hop, not
/// the caller's token. It becomes `UNAVAILABLE` naming the hop, so a client
/// never rotates a valid token because of it.
/// What an answer says when a change was sent and its outcome is unknown.
pub const MAY_HAVE_BEEN_APPLIED: &str = "the change may have been applied";

/// A change's failure from a peer: as [`from_upstream`], except that a
/// change sent and not answered in time may have been applied, which
/// `DEADLINE_EXCEEDED` says, with `retry` telling the caller what is safe
/// (`UNAVAILABLE` always means nothing was changed). A peer's own
/// `DEADLINE_EXCEEDED` of that kind (its backend took the change and did
/// not answer) is passed on with its message.
pub fn from_upstream_write(service: &str, status: Status, retry: &str) -> Status {
    match status.code() {
        Code::DeadlineExceeded if status.message().contains(MAY_HAVE_BEEN_APPLIED) => {
            Status::deadline_exceeded(name_once(service, status.message()))
        }
        Code::DeadlineExceeded | Code::Cancelled => {
            Status::deadline_exceeded(format!("{service}: did not answer in time; {MAY_HAVE_BEEN_APPLIED}: {retry}"))
        }
        _ => from_upstream(service, status),
    }
}

pub fn from_upstream(service: &str, status: Status) -> Status {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition => status,
        // A size limit: say which hop's.
        Code::ResourceExhausted | Code::OutOfRange => {
            Status::with_details(status.code(), name_once(service, status.message()), status.details().to_vec().into())
        }
        Code::Unauthenticated => {
            tracing::error!(peer = service, reason = status.message(), "internal credential refused");
            Status::unavailable(format!(
                "{service} refused this service's internal credential: the two are configured with different internal tokens (an operator must fix the configuration)"
            ))
        }
        // A failure the peer knows is not transient (corrupt data, a bug):
        // retrying will not help, so it stays INTERNAL.
        Code::Internal | Code::DataLoss => Status::internal(name_once(service, status.message())),
        Code::DeadlineExceeded | Code::Cancelled => {
            Status::unavailable(format!("{service}: did not answer in time ({})", status.message()))
        }
        _ => Status::unavailable(name_once(service, status.message())),
    }
}

/// `service: message`, unless the message already starts with the name.
fn name_once(service: &str, message: &str) -> String {
    match message.strip_prefix(service) {
        Some(rest) if rest.starts_with(':') => message.to_string(),
        _ => format!("{service}: {message}"),
    }
}

/// A `google.rpc.Status` carrying the code, message and details of `status`,
/// for per-item errors in batch responses.
pub fn to_rpc_status(status: &Status) -> tonic_types::pb::Status {
    use prost::Message;
    // A status with details carries them as an encoded google.rpc.Status.
    if !status.details().is_empty()
        && let Ok(decoded) = tonic_types::pb::Status::decode(status.details())
    {
        return decoded;
    }
    tonic_types::pb::Status { code: status.code() as i32, message: status.message().to_string(), details: Vec::new() }
}

/// The message a caller sees for a failure that is ours, not theirs; the
/// cause goes to the log with the request's trace.
pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %error, "{context}");
    Status::internal("internal error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_not_answered_in_time_says_it_may_have_landed_and_what_is_safe() {
        let timed_out = from_upstream_write("usage index", Status::cancelled("Timeout expired"), "save it again");
        assert_eq!(timed_out.code(), Code::DeadlineExceeded);
        assert_eq!(
            timed_out.message(),
            "usage index: did not answer in time; the change may have been applied: save it again"
        );
        let peer = Status::deadline_exceeded(
            BackendError::Unanswered { backend: "kubernetes", message: "writing secret s".into() }.to_string(),
        );
        let passed_on = from_upstream_write("secret-service", peer, "unused");
        assert_eq!(passed_on.code(), Code::DeadlineExceeded);
        assert!(
            passed_on.message().starts_with("secret-service: kubernetes: writing secret s; the change may"),
            "{}",
            passed_on.message()
        );
        // Not sent, or refused: as any other call.
        assert_eq!(from_upstream_write("x", Status::unavailable("down"), "r").code(), Code::Unavailable);
        assert_eq!(from_upstream_write("x", Status::already_exists("k"), "r").code(), Code::AlreadyExists);
    }

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = invalid_argument(FieldViolation::new("key", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "key: must not be empty");
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "key");
    }

    #[test]
    fn upstream_transport_failures_name_the_service() {
        let status = from_upstream("authz-service", Status::unavailable("tcp connect error"));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("authz-service: "), "{}", status.message());
        let denied = from_upstream("authz-service", Status::permission_denied("no"));
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(from_upstream("x", Status::unknown("boom")).code(), Code::Unavailable);
    }

    #[test]
    fn upstream_messages_name_the_service_once() {
        let status = from_upstream("authz-service", Status::unavailable("authz-service: database: gone"));
        assert_eq!(status.message(), "authz-service: database: gone");
    }

    #[test]
    fn a_refused_internal_credential_is_the_operators_problem_not_the_callers() {
        let status = from_upstream("secret-service", Status::unauthenticated("wrong internal credential"));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("secret-service refused"), "{}", status.message());
        assert!(status.message().contains("internal token"), "{}", status.message());
    }

    #[test]
    fn each_error_maps_to_one_code_and_ours_never_show_their_cause() {
        let table: Vec<(Error, Code, &str)> = vec![
            (FieldViolation::new("key", "must not be empty").into(), Code::InvalidArgument, "key: must not be empty"),
            (Error::NotFound("no such key".into()), Code::NotFound, "no such key"),
            (Error::AlreadyExists("taken".into()), Code::AlreadyExists, "taken"),
            (Error::FailedPrecondition("in use".into()), Code::FailedPrecondition, "in use"),
            (Error::PermissionDenied("no grant".into()), Code::PermissionDenied, "no grant"),
            (
                Error::database("sqlite", "did not answer within 5 ms"),
                Code::Unavailable,
                "database (sqlite) is unavailable: did not answer within 5 ms",
            ),
            (
                BackendError::Unavailable { backend: "kubernetes", message: "refused".into() }.into(),
                Code::Unavailable,
                "kubernetes: refused",
            ),
            (
                BackendError::Rejected { backend: "kubernetes", object: "o".into(), message: "too big".into() }.into(),
                Code::FailedPrecondition,
                "kubernetes rejected store object o: too big",
            ),
            (BackendError::Corrupt("bad file at /secret/path".into()).into(), Code::Internal, "internal error"),
            (BackendError::Internal("bug".into()).into(), Code::Internal, "internal error"),
            (
                BackendError::Misconfigured(FieldViolation::new("namespace", "x")).into(),
                Code::Internal,
                "internal error",
            ),
            (Error::Internal("a stored subject is invalid".into()), Code::Internal, "internal error"),
            (Error::Upstream(Status::not_found("peer said")), Code::NotFound, "peer said"),
        ];
        for (error, code, message) in table {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
        let bad =
            Status::from(Error::InvalidArgument(vec![FieldViolation::new("a", "x"), FieldViolation::new("b", "y")]));
        assert_eq!(bad.get_error_details().bad_request().unwrap().field_violations.len(), 2);
    }

    #[test]
    fn item_statuses_keep_code_message_and_field_violations() {
        let rpc = to_rpc_status(&invalid_argument(FieldViolation::new("items[2].text", "too long")));
        assert_eq!(rpc.code, Code::InvalidArgument as i32);
        assert_eq!(rpc.message, "items[2].text: too long");
        let status: Status =
            Status::with_details(Code::InvalidArgument, "x", prost::Message::encode_to_vec(&rpc).into());
        let bad = status.get_error_details().bad_request().cloned().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "items[2].text");
        let plain = to_rpc_status(&Status::not_found("missing"));
        assert_eq!((plain.code, plain.message.as_str()), (Code::NotFound as i32, "missing"));
    }
}
