//! The secret service: stores domain, global and admin secrets and hands
//! values only to the gateway's resolver.
//!
//! Reading order: [`grpc`] (the tonic adapter) → [`store`] (the domain logic)
//! → [`backend`] (the storage trait, from the shared `secrets-store` crate,
//! with [`kubernetes`] and [`embedded`]).

mod error;
pub mod grpc;
pub mod store;

/// The store backends, from the shared store library, with this service's
/// error type.
pub mod backend {
    pub use secrets_store::{BackendError, Change, Entries, Entry, MeteredBackend, StoreBackend, StoreError};

    /// A store backend as this service uses it.
    pub type SecretBackend = dyn StoreBackend<crate::Error>;
}

pub use secrets_store::{embedded, kubernetes};

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use secrecy::SecretString;
use secrets_common::{
    auth::{InternalAuth, internal_channel},
    authz::{AUTHZ_SERVICE, AuthzClient},
    observe::Metrics,
    server::{self, Served},
    telemetry::TelemetryConfig,
};
use secrets_proto::{
    internal::v1::secret_reader_server::SecretReaderServer,
    service_names::{SECRET_READER, SECRET_SERVICE},
    v1::secret_service_server::SecretServiceServer,
};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::{Error, Result};

use crate::{backend::SecretBackend, embedded::EmbeddedBackend, kubernetes::KubernetesBackend, store::SecretStore};

/// Environment variables that configure the service start with this.
pub const ENV_PREFIX: &str = "SECRET_SERVICE_";

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// Prometheus metrics at `GET /metrics`; unset turns the endpoint off.
    pub metrics_addr: Option<SocketAddr>,
    /// After a shutdown signal: how long health checks answer NOT_SERVING
    /// while calls are still accepted, so load balancers stop sending before
    /// the listener closes. Set it to the load balancer's probe interval.
    pub shutdown_drain_ms: u64,
    /// The credential the gateway and the services present to each other.
    pub internal_token: Option<SecretString>,
    /// The authz service, asked before every management call.
    pub authz_url: String,
    /// Bound on every call to another service.
    pub request_timeout_ms: u64,
    /// Unset: `kubernetes` inside a cluster (`KUBERNETES_SERVICE_HOST` set),
    /// `embedded` elsewhere. See [`Config::backend_kind`].
    pub backend: Option<BackendKind>,
    /// Store object names: `{prefix}-{domain}`, `{prefix}`, `{prefix}-admin`.
    pub object_prefix: String,
    pub embedded: EmbeddedConfig,
    pub kubernetes: KubernetesConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: ([127, 0, 0, 1], 50052).into(),
            metrics_addr: Some(([127, 0, 0, 1], 9102).into()),
            shutdown_drain_ms: 0,
            internal_token: None,
            authz_url: "http://127.0.0.1:50053".into(),
            request_timeout_ms: 5_000,
            backend: None,
            object_prefix: "iomete-secret-store".into(),
            embedded: EmbeddedConfig::default(),
            kubernetes: KubernetesConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

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
    /// would each hold different secrets: the embedded backend is refused
    /// there unless this says the data directory is a volume that is meant
    /// for it.
    pub allow_in_cluster: bool,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("data/secrets"), allow_in_cluster: false }
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
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self { namespace: None, api_url: None, timeout_ms: 5_000 }
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
    pub fn detect() -> Self {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
        let pod_namespace =
            std::fs::read_to_string(POD_NAMESPACE_FILE).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        Self { in_cluster, pod_namespace }
    }
}

impl Config {
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }

    /// The backend to use: the configured one, else `kubernetes` in a
    /// cluster and `embedded` elsewhere. The embedded backend in a cluster
    /// needs `embedded.allow_in_cluster`.
    pub fn backend_kind(&self, env: &Environment) -> anyhow::Result<BackendKind> {
        match (self.backend, env.in_cluster) {
            (Some(BackendKind::Embedded), true) if !self.embedded.allow_in_cluster => anyhow::bail!(
                "backend = \"embedded\" inside a Kubernetes cluster would keep secrets on this pod's own disk, \
                 different for every replica and lost with the pod: use backend = \"kubernetes\" (the default in a \
                 cluster), or set embedded.allow_in_cluster = true (SECRET_SERVICE_EMBEDDED__ALLOW_IN_CLUSTER=true) \
                 when data_dir is a persistent volume that a single replica owns"
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

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_in(&Environment::detect())
    }

    pub fn validate_in(&self, env: &Environment) -> anyhow::Result<()> {
        self.internal_token()?;
        secrets_common::auth::internal_channel(&self.authz_url, Duration::from_secs(1), AUTHZ_SERVICE, &Metrics::new())
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        match self.backend_kind(env)? {
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

    pub fn internal_token(&self) -> anyhow::Result<&SecretString> {
        self.internal_token.as_ref().context(
            "internal_token is required (set SECRET_SERVICE_INTERNAL_TOKEN or internal_token in the config file)",
        )
    }
}

/// The backend the configuration names, or the default for where the
/// service runs.
pub async fn backend_from_config(config: &Config) -> anyhow::Result<Arc<SecretBackend>> {
    let env = Environment::detect();
    Ok(match config.backend_kind(&env)? {
        BackendKind::Embedded => Arc::new(EmbeddedBackend::open(&config.embedded.data_dir)?),
        BackendKind::Kubernetes => {
            let k = &config.kubernetes;
            let namespace = config.namespace(&env);
            let timeout = Duration::from_millis(k.timeout_ms);
            let client = KubernetesBackend::client(k.api_url.as_deref(), &namespace, timeout).await?;
            Arc::new(KubernetesBackend::new(client, &namespace))
        }
    })
}

/// A built server, bound and ready to run.
pub struct Application {
    served: Served,
}

impl Application {
    /// Binds `listen_addr` and opens the configured backend.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    /// Serves on an already-bound listener (tests and the local stack bind
    /// port 0 first).
    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let backend = backend_from_config(&config).await?;
        Self::build_with_backend(config, listener, backend).await
    }

    /// Serves with a given backend.
    pub async fn build_with_backend(
        config: Config,
        listener: TcpListener,
        backend: Arc<SecretBackend>,
    ) -> anyhow::Result<Self> {
        let token = config.internal_token()?;
        let metrics = Metrics::new();
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let channel = internal_channel(&config.authz_url, timeout, AUTHZ_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        let authz = AuthzClient::new(channel, token).map_err(anyhow::Error::msg)?;
        let backend: Arc<SecretBackend> = Arc::new(backend::MeteredBackend::new(backend, metrics.clone()));
        let store = SecretStore::new(backend, config.object_prefix.clone());
        tracing::info!(backend = store.backend_name(), "secret store ready");
        let grpc = grpc::SecretGrpc::new(store, authz);
        let auth = InternalAuth::new(token);

        let (router, health) = server::router(&metrics, &[SECRET_SERVICE, SECRET_READER]).await?;
        let router = router
            .add_service(SecretServiceServer::with_interceptor(grpc.clone(), auth.clone()))
            .add_service(SecretReaderServer::with_interceptor(grpc, auth));
        Ok(Self {
            served: Served::new(listener, (router, health), metrics, config.metrics_addr, config.shutdown_drain())
                .await?,
        })
    }

    pub fn port(&self) -> u16 {
        self.served.port()
    }

    pub fn metrics_port(&self) -> Option<u16> {
        self.served.metrics_port()
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.served.run(shutdown).await.context("secret-service stopped with an error")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(namespace: Option<&str>) -> Environment {
        Environment { in_cluster: true, pod_namespace: namespace.map(str::to_string) }
    }

    #[test]
    fn in_a_cluster_the_default_is_kubernetes_in_the_pods_own_namespace() {
        let config = Config::default();
        assert_eq!(config.backend_kind(&cluster(Some("data-plane"))).unwrap(), BackendKind::Kubernetes);
        assert_eq!(config.namespace(&cluster(Some("data-plane"))), "data-plane");
        assert_eq!(config.namespace(&cluster(None)), "default");
        let named = Config {
            kubernetes: KubernetesConfig { namespace: Some("iomete".into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(named.namespace(&cluster(Some("data-plane"))), "iomete", "configuration wins");
    }

    #[test]
    fn outside_a_cluster_the_default_is_embedded() {
        let local = Environment::default();
        assert_eq!(Config::default().backend_kind(&local).unwrap(), BackendKind::Embedded);
        assert_eq!(Config::default().namespace(&local), "default");
    }

    #[test]
    fn embedded_in_a_cluster_needs_an_explicit_opt_in() {
        let embedded = Config { backend: Some(BackendKind::Embedded), ..Default::default() };
        let err = embedded.backend_kind(&cluster(Some("ns"))).unwrap_err().to_string();
        assert!(err.contains("embedded.allow_in_cluster"), "{err}");
        assert!(err.contains("own disk"), "{err}");
        let allowed = Config {
            backend: Some(BackendKind::Embedded),
            embedded: EmbeddedConfig { allow_in_cluster: true, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(allowed.backend_kind(&cluster(Some("ns"))).unwrap(), BackendKind::Embedded);
    }
}
