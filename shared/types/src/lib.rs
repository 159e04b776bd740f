//! The rules and types every service shares, without I/O or gRPC: the
//! input rules (keys, domains, values), subjects, legacy placeholders, and
//! the one type that holds a secret value.

pub mod placeholder;
pub mod principal;
pub mod validate;
pub mod value;

pub use principal::Principal;
pub use value::SecretValue;
