//! Value leases (`ValueLeases` in `secret_reader.proto`): gateways keep the
//! values they read in memory while they hold a lease from this service,
//! and every write returns only once each of them has forgotten what it
//! kept (or its lease has run out). Changes made outside the service reach
//! them the same way, as soon as the store watch reports them.
//!
//! Offered only where this process sees every change to the store: the
//! embedded store while this process holds its value-lease lock, or the
//! Kubernetes store watched by a single replica, and then only while the
//! watch is alive.

use std::{path::Path, sync::Arc};

use secrets_common::leases::Leases;
use secrets_store::{Entries, ObservedChange, Observer, Snapshot};

use crate::{
    BackendKind, Config, Environment,
    backend::{Change, SecretBackend, StoreBackend, Version},
};

/// What is leased, in messages.
const WHAT: &str = "value";

/// The lock file, in the embedded store's data directory, that the process
/// offering value leases holds.
pub const LOCK_FILE: &str = "value-leases.lock";

/// The leases this process offers, and the lock that keeps them sound
/// (held for as long as the service runs).
pub struct Offer {
    pub leases: Leases,
    pub lock: Option<std::fs::File>,
    /// Offered only while the backend's watch is alive.
    pub while_watched: bool,
}

impl Offer {
    /// Leases that are not offered, for `why`.
    pub fn refused(why: &str) -> Self {
        Self { leases: Leases::refused(WHAT, why), lock: None, while_watched: false }
    }

    /// What a single secret-service (no `[replicas]`) offers with `config`.
    pub fn for_config(config: &Config) -> anyhow::Result<Self> {
        if !config.value_leases {
            return Ok(Self::refused("value_leases is off"));
        }
        match config.store().kind(&Environment::detect())? {
            BackendKind::Embedded => match lock(&config.embedded.data_dir)? {
                Some(lock) => Ok(Self { leases: Leases::new(WHAT), lock: Some(lock), while_watched: false }),
                None => {
                    tracing::warn!(
                        data_dir = %config.embedded.data_dir.display(),
                        "another process holds the embedded store's value-lease lock: no value leases are offered here"
                    );
                    Ok(Self::refused("another secret-service process offers them for this data directory"))
                }
            },
            BackendKind::Kubernetes if config.kubernetes.watch => {
                Ok(Self { leases: Leases::new(WHAT), lock: None, while_watched: true })
            }
            BackendKind::Kubernetes => {
                Ok(Self::refused("kubernetes.watch is off, so changes made outside this service go unseen"))
            }
        }
    }
}

/// Takes `data_dir`'s value-lease lock; `None` when another process holds it.
#[expect(clippy::disallowed_methods, reason = "takes the lock once, at startup")]
fn lock(data_dir: &Path) -> anyhow::Result<Option<std::fs::File>> {
    std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// A backend whose every write, and every change it observes, is handed
/// to the value lease holders before it counts as done.
pub struct LeasedBackend {
    inner: Arc<SecretBackend>,
    leases: Leases,
}

impl LeasedBackend {
    pub fn new(inner: Arc<SecretBackend>, leases: Leases) -> Self {
        Self { inner, leases }
    }
}

/// Hands observed changes to the lease holders, then to `observer`.
struct Publishing {
    observer: Arc<dyn Observer>,
    leases: Leases,
}

impl Observer for Publishing {
    fn observed(&self, changes: Vec<ObservedChange>) {
        let leases = self.leases.clone();
        tokio::spawn(async move { leases.publish().await });
        self.observer.observed(changes);
    }
}

#[async_trait::async_trait]
impl StoreBackend<crate::Error> for LeasedBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>, crate::Error> {
        self.inner.read(object).await
    }

    async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, crate::Error> {
        self.inner.read_shared(object).await
    }

    async fn read_current(&self, object: &str) -> Result<Option<Entries>, crate::Error> {
        self.inner.read_current(object).await
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, crate::Error>) -> Result<Version, crate::Error> {
        let written = self.inner.modify(object, change).await;
        // Also after an error: a write the store did not confirm may still
        // have landed.
        self.leases.publish().await;
        written
    }

    fn observe(&self, observer: Arc<dyn Observer>) {
        self.inner.observe(Arc::new(Publishing { observer, leases: self.leases.clone() }));
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.inner.snapshot()
    }

    fn watched(&self) -> bool {
        self.inner.watched()
    }
}
