//! Integration tests: real servers in-process on port 0, real gRPC between
//! them, a Kubernetes API server speaking the core/v1 Secret protocol,
//! SQLite and (when DATABASE_URL is set) PostgreSQL, and grpcurl.

#![allow(
    clippy::disallowed_methods,
    reason = "test set-up may block: it runs before and beside the servers, not in them"
)]

mod audit;
mod authz;
mod bad_input;
mod bundles;
mod canary;
mod changes;
mod cli;
mod decisions;
mod deployment;
mod embedded;
mod grpcurl;
mod internal;
mod jwt;
mod kubernetes;
mod least_privilege;
mod logs;
mod manifests;
mod metrics;
mod migration;
mod permissions;
mod readme;
mod replicas;
mod replicated;
mod resilience;
mod resolve;
mod secrets;
mod store_suite;
mod tls;
mod traces;
mod usage;
mod values;
mod vault;
mod vault_matrix;
mod workloads;
