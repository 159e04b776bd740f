//! The storage contract both backends implement: whole store objects, read
//! once and changed by read-modify-write.
//!
//! The contract is generic over the caller's error type `E`, so a change
//! can refuse a write with the caller's own error (a key that exists
//! already, say) and get it back unchanged; the backends' own failures come
//! as [`BackendError`], which `E` takes in.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrets_common::{
    SecretValue,
    admission::{Admission, Limits, Settings},
    observe::Metrics,
};

use crate::BackendError;

/// The error type of a store's caller.
pub trait StoreError: From<BackendError> + std::error::Error + Send + Sync + 'static {
    /// Whether the error is the backend failing, as opposed to a change
    /// refusing the write (which is an answer, not a failure): for metrics.
    fn is_backend_failure(&self) -> bool;

    /// The same failure for another caller whose change was in the same
    /// write ([`crate::GroupCommit`]).
    fn for_another_caller(&self) -> Self;
}

impl StoreError for secrets_common::error::Error {
    fn is_backend_failure(&self) -> bool {
        matches!(self, Self::Backend(_) | Self::Internal(_))
    }

    fn for_another_caller(&self) -> Self {
        secrets_common::error::Error::for_another_caller(self)
    }
}

/// One key inside a store object.
#[derive(Clone, Debug)]
pub struct Entry {
    pub value: SecretValue,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The contents of one store object, by key.
pub type Entries = BTreeMap<String, Entry>;

/// A reserved entry: the object's idempotency records (JSON), kept and
/// written with its keys. No secret key can take this name (keys may not
/// start with `..`); listings leave it out, and the Kubernetes backend
/// keeps it in an annotation rather than in the Secret's data.
pub const REQUESTS_ENTRY: &str = "..requests";

/// The version of a store object a write produced, where the backend has
/// one: the Kubernetes resourceVersion.
pub type Version = Option<u64>;

/// What a key of a store object went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    Created,
    Updated,
    Deleted,
}

/// A change to one key that the watch (or a list after the watch was lost)
/// reported and memory did not hold yet: an edit out of band (`kubectl`,
/// another tool), or a write another replica made without telling. Never
/// a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedChange {
    pub object: String,
    pub key: String,
    pub change: KeyChange,
    /// The object's resourceVersion that carried it (for a deletion found
    /// by a list: the list's).
    pub version: u64,
}

/// The store objects as memory holds them (names, versions and key names;
/// never a value): what the secret-service records so that, starting after
/// none ran, it can tell which objects changed meanwhile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub objects: Vec<ObjectState>,
    /// Objects that exist but whose contents memory cannot tell (they did
    /// not decode): neither changed nor gone.
    pub unknown: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectState {
    pub object: String,
    pub version: u64,
    pub keys: Vec<String>,
}

/// Told of the changes the watch finds (see [`KubernetesBackend::observe`]).
pub trait Observer: Send + Sync + 'static {
    fn observed(&self, changes: Vec<ObservedChange>);
}

/// A change applied to an object's entries. It may run more than once when a
/// concurrent writer got there first, so it must only depend on its input.
pub type Change<'a, E> = dyn FnMut(&mut Entries) -> Result<(), E> + Send + 'a;

#[async_trait]
pub trait StoreBackend<E: StoreError>: Send + Sync + 'static {
    /// `kubernetes` or `embedded`: named in errors and logs.
    fn name(&self) -> &'static str;

    /// The entries of a store object; `None` when it does not exist yet.
    async fn read(&self, object: &str) -> Result<Option<Entries>, E>;

    /// The same, shared: a backend that keeps objects in memory hands out
    /// its copy, so looking up one key does not copy the whole object. Never
    /// older than the last write this process made or saw acknowledged.
    async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, E> {
        Ok(self.read(object).await?.map(Arc::new))
    }

    /// The entries as the store holds them now, past any copy in memory:
    /// for what is read rarely and must not be a moment behind another
    /// replica's write (credentials when a config changed).
    async fn read_current(&self, object: &str) -> Result<Option<Entries>, E> {
        self.read(object).await
    }

    /// Reads the object (empty when it does not exist), applies `change` and
    /// writes the result back, so that concurrent writers never lose each
    /// other's keys. Creates the object on first write. An error from
    /// `change` is returned as it is and nothing is written. The version
    /// written, where the backend has one (a Kubernetes resourceVersion).
    async fn modify(&self, object: &str, change: &mut Change<'_, E>) -> Result<Version, E>;

    /// Tells `observer` of the changes to keys made outside this service
    /// that the backend sees (the Kubernetes watch); nothing for a backend
    /// that sees none.
    fn observe(&self, _observer: Arc<dyn Observer>) {}

    /// What memory holds of every store object, once it is in step with the
    /// store; `None` for a backend that keeps no copy, or while its copy is
    /// not (yet) trusted.
    fn snapshot(&self) -> Option<Snapshot> {
        None
    }

    /// Whether every change made to the store outside this process reaches
    /// [`Self::observe`]'s observer as it happens, now and for at least
    /// `for_at_least` (the Kubernetes watch, while it is alive); `false` for
    /// a backend that sees none.
    fn watched(&self, _for_at_least: Duration) -> bool {
        false
    }

    /// Returns once every write this process has made is known to everyone
    /// who must know of it before it counts as done (see the secret-service's
    /// value leases); at once for a backend that tells no one.
    async fn settle(&self) {}
}

/// Counts and times every call to the backend it wraps, and bounds the
/// writes it lets through at once.
pub struct MeteredBackend<E: StoreError> {
    inner: Arc<dyn StoreBackend<E>>,
    metrics: Metrics,
    /// The bound on writes, and the name its metrics and refusals use.
    writes: Option<(Admission, String)>,
}

/// The settings that bound a backend's writes.
const WRITE_SETTINGS: Settings = Settings {
    in_flight: "kubernetes.max_writes_in_flight",
    queued: "kubernetes.max_writes_queued",
    wait: "kubernetes.write_queue_wait_ms",
};

impl<E: StoreError> MeteredBackend<E> {
    pub fn new(inner: Arc<dyn StoreBackend<E>>, metrics: Metrics) -> Self {
        Self { inner, metrics, writes: None }
    }

    /// At most `limits.max_in_flight` writes at once; `max_queued` more
    /// wait (at most `queue_wait`); past that a write is refused at once
    /// with `RESOURCE_EXHAUSTED`. In flight, waiting and refused writes are
    /// the `secrets_admission_*` metrics of `kubernetes.writes`.
    pub fn with_write_limits(mut self, limits: Option<Limits>) -> Self {
        let class = format!("{}.writes", self.inner.name());
        self.writes = limits
            .map(|l| (Admission::with_settings(self.inner.name(), WRITE_SETTINGS, l, self.metrics.clone()), class));
        self
    }
}

#[async_trait]
impl<E: StoreError> StoreBackend<E> for MeteredBackend<E> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>, E> {
        let start = Instant::now();
        let result = self.inner.read(object).await;
        self.metrics.observe_backend(self.name(), "read", result.is_ok(), start.elapsed());
        result
    }

    async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, E> {
        let start = Instant::now();
        let result = self.inner.read_shared(object).await;
        self.metrics.observe_backend(self.name(), "read", result.is_ok(), start.elapsed());
        result
    }

    async fn read_current(&self, object: &str) -> Result<Option<Entries>, E> {
        let start = Instant::now();
        let result = self.inner.read_current(object).await;
        self.metrics.observe_backend(self.name(), "read", result.is_ok(), start.elapsed());
        result
    }

    fn observe(&self, observer: Arc<dyn Observer>) {
        self.inner.observe(observer);
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.inner.snapshot()
    }

    fn watched(&self, for_at_least: Duration) -> bool {
        self.inner.watched(for_at_least)
    }

    async fn settle(&self) {
        self.inner.settle().await;
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, E>) -> Result<Version, E> {
        let _turn = match &self.writes {
            Some((writes, class)) => Some(writes.admit(class, None).await.map_err(|shed| {
                let refusal = writes.refusal(class, shed);
                E::from(crate::BackendError::Busy { message: refusal.message().to_string() })
            })?),
            None => None,
        };
        let start = Instant::now();
        let result = self.inner.modify(object, change).await;
        // A change refused by the caller's own rules (exists, missing, too
        // large) is an answer, not a backend failure.
        let failed = result.as_ref().is_err_and(StoreError::is_backend_failure);
        self.metrics.observe_backend(self.name(), "modify", !failed, start.elapsed());
        result
    }
}
