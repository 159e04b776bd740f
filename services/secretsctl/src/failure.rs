//! What went wrong, and the exit code that says so (documented in `--help`):
//! 0 ok, 1 usage or local error, 2 unauthenticated or permission denied,
//! 3 not found, 4 conflict or precondition (exists, in use), 5 unavailable
//! or timed out, 6 any other server error.

use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug)]
pub enum Failure {
    /// A mistake on this side: arguments, files, the profile.
    Local(String),
    /// The server's answer.
    Server(tonic::Status),
}

pub type Result<T> = std::result::Result<T, Failure>;

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Server(status)
    }
}

pub fn local(message: impl Into<String>) -> Failure {
    Failure::Local(message.into())
}

/// The exit code of a server answer's status.
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::Unauthenticated | Code::PermissionDenied => 2,
        Code::NotFound => 3,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => 4,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => 5,
        _ => 6,
    }
}

impl Failure {
    /// Prints the failure on stderr (the server's message and each field
    /// violation); its exit code.
    pub fn report(&self) -> u8 {
        match self {
            Failure::Local(message) => {
                eprintln!("error: {message}");
                1
            }
            Failure::Server(status) => {
                let class = match status.code() {
                    Code::Unauthenticated => "unauthenticated",
                    Code::PermissionDenied => "permission denied",
                    Code::NotFound => "not found",
                    Code::AlreadyExists => "already exists",
                    Code::FailedPrecondition => "refused",
                    Code::Unavailable => "unavailable",
                    Code::DeadlineExceeded | Code::Cancelled => "timed out",
                    Code::InvalidArgument => "invalid argument",
                    Code::ResourceExhausted => "busy",
                    _ => "server error",
                };
                eprintln!("error ({class}): {}", status.message());
                if let Some(bad) = status.get_details_bad_request() {
                    for v in bad.field_violations {
                        eprintln!("  {}: {}", v.field, v.description);
                    }
                }
                exit_code(status.code())
            }
        }
    }
}
