//! Store objects: named sets of keys, each with a value and its creation and
//! update times, kept whole in a Kubernetes opaque Secret or in one file of
//! an encrypted embedded store. The secret-service keeps secrets in them;
//! the vault-config-service keeps Vault credentials.
//!
//! Reading order: [`backend`] (the contract, generic over the caller's error
//! type) → [`kubernetes`] and [`embedded`] → [`group`] (concurrent changes
//! to one object written together).

pub mod backend;
pub mod config;
pub mod embedded;
pub mod group;
pub mod kubernetes;

pub use backend::{
    Change, Entries, Entry, KeyChange, MeteredBackend, ObjectState, ObservedChange, Observer, REQUESTS_ENTRY, Snapshot,
    StoreBackend, StoreError, Version,
};
pub use config::{BackendKind, EmbeddedConfig, Environment, KubernetesConfig, StoreSettings};
pub use group::GroupCommit;
pub use secrets_common::error::BackendError;
