//! The server runtime shared by the services of the secrets control plane:
//! internal authentication, the authz client, configuration, error
//! conventions, observability, telemetry and the server wiring. The rules
//! and types without I/O live in `secrets-types`, re-exported here.

pub mod admission;
pub mod auth;
pub mod authz;
pub mod balance;
pub mod batch;
pub mod changes;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod error;
pub mod leases;
pub mod lockfile;
pub mod observe;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod usage;

// The rules and types without I/O, re-exported so services name one crate.
pub use secrets_types::{Principal, SecretValue, placeholder, principal, validate, value};
