//! The storage contract both backends implement: whole store objects, read
//! once and changed by read-modify-write.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrets_common::{SecretValue, observe::Metrics};

use crate::Result;

/// One secret inside a store object.
#[derive(Clone, Debug)]
pub struct Entry {
    pub value: SecretValue,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The contents of one store object, by key.
pub type Entries = BTreeMap<String, Entry>;

/// A change applied to an object's entries. It may run more than once when a
/// concurrent writer got there first, so it must only depend on its input.
pub type Change<'a> = dyn FnMut(&mut Entries) -> Result<()> + Send + 'a;

#[async_trait]
pub trait SecretBackend: Send + Sync + 'static {
    /// `kubernetes` or `embedded`: named in errors and logs.
    fn name(&self) -> &'static str;

    /// The entries of a store object; `None` when it does not exist yet.
    async fn read(&self, object: &str) -> Result<Option<Entries>>;

    /// Reads the object (empty when it does not exist), applies `change` and
    /// writes the result back, so that concurrent writers never lose each
    /// other's keys. Creates the object on first write.
    async fn modify(&self, object: &str, change: &mut Change<'_>) -> Result<()>;
}

/// Counts and times every call to the backend it wraps.
pub struct MeteredBackend {
    inner: Arc<dyn SecretBackend>,
    metrics: Metrics,
}

impl MeteredBackend {
    pub fn new(inner: Arc<dyn SecretBackend>, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl SecretBackend for MeteredBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>> {
        let start = Instant::now();
        let result = self.inner.read(object).await;
        self.metrics.observe_backend(self.name(), "read", result.is_ok(), start.elapsed());
        result
    }

    async fn modify(&self, object: &str, change: &mut Change<'_>) -> Result<()> {
        let start = Instant::now();
        let result = self.inner.modify(object, change).await;
        // A change refused by the store's own rules (exists, missing, too
        // large) is an answer, not a backend failure.
        let failed = matches!(
            result,
            Err(crate::Error::Unavailable { .. }
                | crate::Error::Corrupt(_)
                | crate::Error::Internal(_)
                | crate::Error::Rejected { .. })
        );
        self.metrics.observe_backend(self.name(), "modify", !failed, start.elapsed());
        result
    }
}
