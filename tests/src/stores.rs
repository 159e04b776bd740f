//! Backends for the store suite, and a wrapper that counts reads.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use secret_service::{
    Error, Result,
    backend::{Change, Entries, SecretBackend, StoreBackend},
    embedded::EmbeddedBackend,
    kubernetes::KubernetesBackend,
    store::SecretStore,
};
use tempfile::TempDir;

use crate::kube_server::FakeKube;

pub const NAMESPACE: &str = "data-plane";
pub const PREFIX: &str = "iomete-secret-store";

/// One backend under test and the storage behind it.
pub struct Fixture {
    pub backend: Arc<SecretBackend>,
    pub kube: Option<FakeKube>,
    pub dir: TempDir,
}

impl Fixture {
    pub async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = Arc::new(EmbeddedBackend::open(dir.path()).expect("open embedded store"));
        Self { backend, kube: None, dir }
    }

    pub async fn kubernetes() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kube = FakeKube::start().await;
        let backend = Arc::new(KubernetesBackend::new(kube.client(NAMESPACE).await, NAMESPACE));
        Self { backend, kube: Some(kube), dir: tempfile::tempdir().expect("tempdir") }
    }

    /// The Kubernetes backend as production runs it: store objects kept in
    /// memory by a list and watch.
    pub async fn kubernetes_watching() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kube = FakeKube::start().await;
        let backend = KubernetesBackend::new(kube.client(NAMESPACE).await, NAMESPACE);
        let watch = KubernetesBackend::watch_client(Some(&kube.url), NAMESPACE, std::time::Duration::from_secs(5))
            .await
            .expect("watch client");
        let backend = Arc::new(backend.watching(watch));
        Self { backend, kube: Some(kube), dir: tempfile::tempdir().expect("tempdir") }
    }

    /// Another backend over the same storage: a second replica, or the same
    /// service after a restart.
    pub async fn another(&self) -> Arc<SecretBackend> {
        match &self.kube {
            Some(k) => Arc::new(KubernetesBackend::new(k.client(NAMESPACE).await, NAMESPACE)),
            None => Arc::new(EmbeddedBackend::open(self.dir.path()).expect("reopen embedded store")),
        }
    }

    pub fn store(&self) -> SecretStore {
        SecretStore::new(self.backend.clone(), PREFIX)
    }
}

/// Counts how often each store object is read.
pub struct CountingBackend {
    inner: Arc<SecretBackend>,
    reads: Mutex<HashMap<String, usize>>,
}

impl CountingBackend {
    pub fn new(inner: Arc<SecretBackend>) -> Arc<Self> {
        Arc::new(Self { inner, reads: Mutex::default() })
    }

    pub fn reads(&self) -> HashMap<String, usize> {
        self.reads.lock().unwrap().clone()
    }

    pub fn reset(&self) {
        self.reads.lock().unwrap().clear();
    }
}

#[async_trait]
impl StoreBackend<Error> for CountingBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>> {
        *self.reads.lock().unwrap().entry(object.to_string()).or_default() += 1;
        self.inner.read(object).await
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, Error>) -> Result<secret_service::backend::Version> {
        self.inner.modify(object, change).await
    }
}
