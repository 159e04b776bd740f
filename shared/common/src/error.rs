//! gRPC status conventions shared by every service.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::validate::FieldViolation;

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
/// failures become `UNAVAILABLE` naming the service.
pub fn from_upstream(service: &str, status: Status) -> Status {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::OutOfRange => status,
        Code::DeadlineExceeded | Code::Cancelled => {
            Status::unavailable(format!("{service}: did not answer in time ({})", status.message()))
        }
        _ => Status::unavailable(format!("{service}: {}", status.message())),
    }
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
}
