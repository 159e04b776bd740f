//! Code shared by the services of the secrets control plane.

pub mod auth;
pub mod authz;
pub mod cli;
pub mod config;
pub mod error;
pub mod observe;
pub mod placeholder;
pub mod principal;
pub mod server;
pub mod telemetry;
pub mod validate;
pub mod value;

pub use principal::Principal;
pub use value::SecretValue;
