//! Which backend a service's store objects live on: configuration, and the
//! defaults for where the service runs (Kubernetes Secrets in the pod's own
//! namespace inside a cluster, the embedded store elsewhere).

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;

use crate::{StoreBackend, StoreError, embedded::EmbeddedBackend, kubernetes::KubernetesBackend};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Encrypted files under `embedded.data_dir`: no cluster needed.
    Embedded,
    /// Opaque Secrets in `kubernetes.namespace`.
    Kubernetes,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    /// Inside a cluster each pod would write to its own disk, and replicas
    /// would each hold different data: the embedded backend is refused
    /// there unless this says the data directory is a volume that is meant
    /// for it.
    pub allow_in_cluster: bool,
}

impl EmbeddedConfig {
    pub fn at(data_dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: data_dir.into(), allow_in_cluster: false }
    }
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self::at("data/store")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The namespace of the installation. Unset: the pod's own namespace
    /// (from its service account) inside a cluster, `default` elsewhere.
    pub namespace: Option<String>,
    /// An explicit API server URL (for example `kubectl proxy`); unset means
    /// `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
    pub api_url: Option<String>,
    /// Bound on each call to the API server.
    pub timeout_ms: u64,
    /// Keep the store objects in memory by listing and watching them
    /// (needs the `list` and `watch` verbs on Secrets); off: every read is a
    /// GET.
    pub watch: bool,
    /// Writes sent to the API server at once (concurrent changes to one
    /// object are one write already); more wait in a queue of
    /// `max_writes_queued`, each at most `write_queue_wait_ms`; past that a
    /// change is refused at once with `RESOURCE_EXHAUSTED`.
    pub max_writes_in_flight: usize,
    pub max_writes_queued: usize,
    pub write_queue_wait_ms: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            api_url: None,
            timeout_ms: 5_000,
            watch: true,
            max_writes_in_flight: 32,
            max_writes_queued: 4_096,
            write_queue_wait_ms: 5_000,
        }
    }
}

/// Where the service runs, as far as its defaults care.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    /// `KUBERNETES_SERVICE_HOST` is set: a pod in a cluster.
    pub in_cluster: bool,
    /// The pod's namespace, from its service-account mount.
    pub pod_namespace: Option<String>,
}

/// Where Kubernetes mounts a pod's namespace.
pub const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl Environment {
    #[expect(clippy::disallowed_methods, reason = "reads the pod namespace once, at startup")]
    pub fn detect() -> Self {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
        let pod_namespace =
            std::fs::read_to_string(POD_NAMESPACE_FILE).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        Self { in_cluster, pod_namespace }
    }
}

/// A service's store settings, as its configuration holds them.
#[derive(Clone, Copy, Debug)]
pub struct StoreSettings<'a> {
    pub backend: Option<BackendKind>,
    pub embedded: &'a EmbeddedConfig,
    pub kubernetes: &'a KubernetesConfig,
    /// The service's environment-variable prefix, for messages.
    pub env_prefix: &'a str,
    /// Whose store objects (Kubernetes): written with, and watched by, the
    /// `app.kubernetes.io/component` label of this value.
    pub component: &'a str,
    /// The service's object prefix: it owns `{prefix}` and `{prefix}-*`.
    pub object_prefix: &'a str,
}

impl StoreSettings<'_> {
    /// The backend to use: the configured one, else `kubernetes` in a
    /// cluster and `embedded` elsewhere. The embedded backend in a cluster
    /// needs `embedded.allow_in_cluster`.
    pub fn kind(&self, env: &Environment) -> anyhow::Result<BackendKind> {
        match (self.backend, env.in_cluster) {
            (Some(BackendKind::Embedded), true) if !self.embedded.allow_in_cluster => anyhow::bail!(
                "backend = \"embedded\" inside a Kubernetes cluster would keep data on this pod's own disk, \
                 different for every replica and lost with the pod: use backend = \"kubernetes\" (the default in a \
                 cluster), or set embedded.allow_in_cluster = true ({}EMBEDDED__ALLOW_IN_CLUSTER=true) \
                 when data_dir is a persistent volume that a single replica owns",
                self.env_prefix
            ),
            (Some(kind), _) => Ok(kind),
            (None, true) => Ok(BackendKind::Kubernetes),
            (None, false) => Ok(BackendKind::Embedded),
        }
    }

    /// The installation's namespace: the configured one, else the pod's,
    /// else `default`.
    pub fn namespace(&self, env: &Environment) -> String {
        self.kubernetes
            .namespace
            .clone()
            .or_else(|| env.pod_namespace.clone().filter(|_| env.in_cluster))
            .unwrap_or_else(|| "default".into())
    }

    /// Everything that can be checked without starting.
    pub fn validate(&self, env: &Environment) -> anyhow::Result<()> {
        match self.kind(env)? {
            BackendKind::Embedded => anyhow::ensure!(
                !self.embedded.data_dir.as_os_str().is_empty(),
                "embedded.data_dir must be set for the embedded backend"
            ),
            BackendKind::Kubernetes => {
                anyhow::ensure!(
                    self.kubernetes.namespace.as_ref().is_none_or(|n| !n.is_empty()),
                    "kubernetes.namespace must not be empty (leave it unset for the pod's own namespace)"
                );
                if let Some(url) = &self.kubernetes.api_url {
                    url.parse::<http::Uri>().map_err(|e| anyhow::anyhow!("kubernetes.api_url {url:?}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// The bounds on writes to the backend: the Kubernetes API server's.
    pub fn write_limits(&self) -> Option<secrets_common::admission::Limits> {
        let k = self.kubernetes;
        (self.kind(&Environment::detect()).ok()? == BackendKind::Kubernetes).then(|| {
            secrets_common::admission::Limits {
                max_in_flight: k.max_writes_in_flight.max(1),
                max_queued: k.max_writes_queued,
                queue_wait: Duration::from_millis(k.write_queue_wait_ms),
            }
        })
    }

    /// Opens the backend the settings name, or the default for where the
    /// service runs.
    pub async fn open<E: StoreError>(&self) -> anyhow::Result<Arc<dyn StoreBackend<E>>> {
        let env = Environment::detect();
        Ok(match self.kind(&env)? {
            BackendKind::Embedded => Arc::new(EmbeddedBackend::open(&self.embedded.data_dir)?),
            BackendKind::Kubernetes => Arc::new(self.open_kubernetes().await?),
        })
    }

    /// The Kubernetes backend the settings describe, whatever backend they
    /// name (for a caller that adds to it, a [`crate::kubernetes::Fence`]).
    pub async fn open_kubernetes(&self) -> anyhow::Result<KubernetesBackend> {
        let env = Environment::detect();
        let k = self.kubernetes;
        let namespace = self.namespace(&env);
        let timeout = Duration::from_millis(k.timeout_ms);
        let client = KubernetesBackend::client(k.api_url.as_deref(), &namespace, timeout).await?;
        let backend = KubernetesBackend::new(client, &namespace).owned_by(crate::kubernetes::Owner {
            component: self.component.to_string(),
            prefix: self.object_prefix.to_string(),
        });
        Ok(if k.watch {
            let watch = KubernetesBackend::watch_client(k.api_url.as_deref(), &namespace, timeout).await?;
            backend.watching(watch)
        } else {
            backend
        })
    }

    /// Whether the backend keeps its objects in memory (Kubernetes with
    /// `watch`), so that replicas need to keep their copies in step.
    pub fn keeps_copies(&self, env: &Environment) -> bool {
        self.kind(env).is_ok_and(|k| k == BackendKind::Kubernetes) && self.kubernetes.watch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(namespace: Option<&str>) -> Environment {
        Environment { in_cluster: true, pod_namespace: namespace.map(str::to_string) }
    }

    fn settings<'a>(
        backend: Option<BackendKind>,
        embedded: &'a EmbeddedConfig,
        kubernetes: &'a KubernetesConfig,
    ) -> StoreSettings<'a> {
        StoreSettings { backend, embedded, kubernetes, env_prefix: "SVC_", component: "store", object_prefix: "store" }
    }

    #[test]
    fn in_a_cluster_the_default_is_kubernetes_in_the_pods_own_namespace() {
        let (e, k) = (EmbeddedConfig::default(), KubernetesConfig::default());
        let s = settings(None, &e, &k);
        assert_eq!(s.kind(&cluster(Some("data-plane"))).unwrap(), BackendKind::Kubernetes);
        assert_eq!(s.namespace(&cluster(Some("data-plane"))), "data-plane");
        assert_eq!(s.namespace(&cluster(None)), "default");
        let named = KubernetesConfig { namespace: Some("iomete".into()), ..Default::default() };
        assert_eq!(settings(None, &e, &named).namespace(&cluster(Some("data-plane"))), "iomete", "configuration wins");
    }

    #[test]
    fn outside_a_cluster_the_default_is_embedded() {
        let (e, k) = (EmbeddedConfig::default(), KubernetesConfig::default());
        let local = Environment::default();
        assert_eq!(settings(None, &e, &k).kind(&local).unwrap(), BackendKind::Embedded);
        assert_eq!(settings(None, &e, &k).namespace(&local), "default");
    }

    #[test]
    fn embedded_in_a_cluster_needs_an_explicit_opt_in() {
        let k = KubernetesConfig::default();
        let e = EmbeddedConfig::default();
        let err = settings(Some(BackendKind::Embedded), &e, &k).kind(&cluster(Some("ns"))).unwrap_err().to_string();
        assert!(err.contains("SVC_EMBEDDED__ALLOW_IN_CLUSTER=true"), "{err}");
        assert!(err.contains("own disk"), "{err}");
        let allowed = EmbeddedConfig { allow_in_cluster: true, ..Default::default() };
        let kind = settings(Some(BackendKind::Embedded), &allowed, &k).kind(&cluster(Some("ns"))).unwrap();
        assert_eq!(kind, BackendKind::Embedded);
    }
}
