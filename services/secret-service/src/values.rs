//! Value leases (`ValueLeases` in `secret_reader.proto`): gateways keep the
//! values they read in memory while they hold a lease from this service,
//! and every write returns only once each of them has forgotten what it
//! kept (or its lease has run out). Changes made outside the service reach
//! them the same way, as soon as the store watch reports them.
//!
//! Offered only where this process sees every change to the store: the
//! embedded store while this process has its data directory alone (every
//! secret-service on an embedded store holds the directory's lock file,
//! shared, or exclusively to offer value leases), or the Kubernetes store
//! watched by a single replica, and then only while the watch is alive.

use std::{path::Path, sync::Arc, time::Duration};

use secrets_common::leases::Leases;
use secrets_store::{Entries, ObservedChange, Observer, Snapshot};

use crate::{
    BackendKind, Config, Environment,
    backend::{Change, SecretBackend, StoreBackend, Version},
};

/// What is leased, in messages.
const WHAT: &str = "value";

/// The lock file in the embedded store's data directory: every
/// secret-service on the directory holds it, shared, or exclusively when it
/// offers value leases.
pub const LOCK_FILE: &str = "value-leases.lock";

/// The leases this process offers, and its hold on the embedded store's
/// lock file (kept for as long as the service runs).
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
        match config.store().kind(&Environment::detect())? {
            BackendKind::Embedded => {
                let wanted = config.value_leases.unwrap_or(true);
                let (lock, alone) = lock(&config.embedded.data_dir, wanted)?;
                let mut offer = match (wanted, alone) {
                    (false, _) => Self::refused("value_leases is off"),
                    (true, true) => Self { leases: Leases::new(WHAT), lock: None, while_watched: false },
                    (true, false) => {
                        tracing::warn!(
                            data_dir = %config.embedded.data_dir.display(),
                            "other secret-service processes use this embedded store: no value leases are offered"
                        );
                        Self::refused("other secret-service processes share this embedded store")
                    }
                };
                offer.lock = Some(lock);
                Ok(offer)
            }
            BackendKind::Kubernetes if config.value_leases.is_none() => Ok(Self::refused(
                "value_leases is not set: on Kubernetes they are offered only when set, for a single replica \
                 deployed with the Recreate strategy",
            )),
            BackendKind::Kubernetes if config.value_leases == Some(false) => Ok(Self::refused("value_leases is off")),
            BackendKind::Kubernetes if config.kubernetes.watch => {
                Ok(Self { leases: Leases::new(WHAT), lock: None, while_watched: true })
            }
            BackendKind::Kubernetes => {
                Ok(Self::refused("kubernetes.watch is off, so changes made outside this service go unseen"))
            }
        }
    }
}

/// Takes `data_dir`'s lock file: exclusively when `exclusive` is asked and
/// no other process holds it (`true`: this process has the store alone),
/// else shared. Refused while another process holds it exclusively.
#[expect(clippy::disallowed_methods, reason = "takes the lock once, at startup")]
fn lock(data_dir: &Path, exclusive: bool) -> anyhow::Result<(std::fs::File, bool)> {
    std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    let file =
        secrets_common::lockfile::open(&path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let failed = |e: std::io::Error| anyhow::anyhow!("cannot lock {}: {e}", path.display());
    if exclusive {
        match file.try_lock() {
            Ok(()) => return Ok((file, true)),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
    }
    match file.try_lock_shared() {
        Ok(()) => Ok((file, false)),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another secret-service process offers value leases on the embedded store at {} and must have it \
             alone: stop it, or set value_leases = false in it, before starting another one on this directory",
            data_dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(failed(e)),
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
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { leases.publish().await });
        }
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
        let mut changed = false;
        let written = {
            let mut noting = |entries: &mut Entries| {
                let outcome = change(entries);
                changed |= outcome.is_ok();
                outcome
            };
            self.inner.modify(object, &mut noting).await
        };
        // Also after an error, once a change was made: a write the store
        // did not confirm may still have landed. A change refused before
        // anything was written costs the holders nothing.
        if changed {
            self.leases.publish().await;
        }
        written
    }

    async fn settle(&self) {
        self.leases.publish().await;
    }

    fn observe(&self, observer: Arc<dyn Observer>) {
        self.inner.observe(Arc::new(Publishing { observer, leases: self.leases.clone() }));
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.inner.snapshot()
    }

    fn watched(&self, for_at_least: Duration) -> bool {
        self.inner.watched(for_at_least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded(dir: &Path, value_leases: Option<bool>) -> Config {
        Config {
            backend: Some(BackendKind::Embedded),
            embedded: crate::EmbeddedConfig { data_dir: dir.to_path_buf(), allow_in_cluster: true },
            value_leases,
            ..Config::default()
        }
    }

    fn kubernetes(value_leases: Option<bool>, watch: bool) -> Config {
        let mut config = Config { backend: Some(BackendKind::Kubernetes), value_leases, ..Config::default() };
        config.kubernetes.watch = watch;
        config
    }

    #[test]
    fn on_the_embedded_store_they_are_offered_unless_turned_off_and_only_to_the_process_alone_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = Offer::for_config(&embedded(dir.path(), None)).unwrap();
        assert!(first.leases.offered(), "unset: offered on the embedded store");
        let Err(e) = Offer::for_config(&embedded(dir.path(), Some(false))) else { panic!("a second process started") };
        assert!(e.to_string().contains("must have it alone"), "{e}");
        drop(first);

        let off = Offer::for_config(&embedded(dir.path(), Some(false))).unwrap();
        assert!(!off.leases.offered());
        let shared = Offer::for_config(&embedded(dir.path(), Some(true))).unwrap();
        assert!(!shared.leases.offered(), "another process shares the directory: none are offered");
    }

    #[test]
    fn on_kubernetes_they_are_offered_only_when_set_and_watched() {
        assert!(!Offer::for_config(&kubernetes(None, true)).unwrap().leases.offered());
        assert!(!Offer::for_config(&kubernetes(Some(false), true)).unwrap().leases.offered());
        assert!(!Offer::for_config(&kubernetes(Some(true), false)).unwrap().leases.offered());
        let offer = Offer::for_config(&kubernetes(Some(true), true)).unwrap();
        assert!(offer.leases.offered() && offer.while_watched);
    }
}
