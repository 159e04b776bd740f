//! The secret service: stores domain, global and admin secrets and hands
//! values only to the gateway's resolver.
//!
//! Reading order: [`grpc`] (the tonic adapter) → [`store`] (the domain logic)
//! → [`backend`] (the storage trait, from the shared `secrets-store` crate,
//! with [`kubernetes`] and [`embedded`]).

pub mod baselines;
mod error;
pub mod grpc;
pub mod replicas;
pub mod requests;
pub mod secrets;
pub mod store;
pub mod values;

/// The store backends, from the shared store library, with this service's
/// error type.
pub mod backend {
    pub use secrets_store::{
        BackendError, Change, Entries, Entry, GroupCommit, KeyChange, MeteredBackend, ObservedChange, Observer,
        REQUESTS_ENTRY, StoreBackend, StoreError, Version,
    };

    /// A store backend as this service uses it.
    pub type SecretBackend = dyn StoreBackend<crate::Error>;
}

pub use secrets_store::{
    BackendKind, EmbeddedConfig, Environment, KubernetesConfig, StoreSettings, embedded, kubernetes,
};

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use secrecy::SecretString;
use secrets_common::{
    auth::Internal,
    authz::{AUTHZ_SERVICE, AuthzClient},
    observe::Metrics,
    server::{self, Served, ServerConfig},
    telemetry::TelemetryConfig,
    tls::InternalTlsConfig,
};
use secrets_proto::{
    internal::v1::{secret_reader_server::SecretReaderServer, value_leases_server::ValueLeasesServer},
    service_names::{SECRET_READER, SECRET_SERVICE, VALUE_LEASES},
    v1::secret_service_server::SecretServiceServer,
};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::{Error, Result};

use crate::{backend::SecretBackend, store::SecretStore};

/// Environment variables that configure the service start with this.
pub const ENV_PREFIX: &str = "SECRET_SERVICE_";

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The `[server]` table: listen, health and metrics addresses, drain,
    /// listener TLS.
    pub server: ServerConfig,
    /// The credential the gateway and the services present to each other.
    pub internal_token: Option<SecretString>,
    /// Mutual TLS on internal hops; with it the internal token is optional.
    pub internal_tls: Option<InternalTlsConfig>,
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
    /// The `[replicas]` table: how replicas on the Kubernetes store keep
    /// their copies in step.
    pub replicas: replicas::ReplicasConfig,
    /// The `[changes]` table: how changes made while no replica watched the
    /// store are found.
    pub changes: baselines::ChangesConfig,
    /// Offer gateways value leases (see [`values`]): they keep resolved
    /// values in memory, and every write waits until they have dropped
    /// them. Offered only where this process sees every change to the store
    /// (the embedded store held by this process alone, or the Kubernetes
    /// store watched by a single replica). Unset: on for the embedded
    /// store, off for Kubernetes (a rolling update runs two pods at once).
    pub value_leases: Option<bool>,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::local(50052, 9102),
            internal_token: None,
            internal_tls: None,
            authz_url: "http://127.0.0.1:50053".into(),
            request_timeout_ms: 5_000,
            backend: None,
            object_prefix: "iomete-secret-store".into(),
            embedded: EmbeddedConfig::at("data/secrets"),
            kubernetes: KubernetesConfig::default(),
            replicas: replicas::ReplicasConfig::default(),
            changes: baselines::ChangesConfig::default(),
            value_leases: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    /// Loads the file and the `SECRET_SERVICE_*` variables over the defaults.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        secrets_common::config::load(file, ENV_PREFIX, &Self::default().server).map_err(anyhow::Error::msg)
    }

    /// Where the secrets' store objects live.
    pub fn store(&self) -> StoreSettings<'_> {
        StoreSettings {
            backend: self.backend,
            embedded: &self.embedded,
            kubernetes: &self.kubernetes,
            env_prefix: ENV_PREFIX,
            component: "secret-store",
            object_prefix: &self.object_prefix,
        }
    }

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_in(&Environment::detect())
    }

    pub fn validate_in(&self, env: &Environment) -> anyhow::Result<()> {
        self.internal()?
            .channel(&self.authz_url, Duration::from_secs(1), AUTHZ_SERVICE, &Metrics::new())
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        self.store().validate(env)?;
        self.changes.validate()?;
        self.replicas.validate(self.store().keeps_copies(env))
    }

    /// The internal credential and mutual TLS, as configured.
    pub fn internal(&self) -> anyhow::Result<Internal> {
        self.server.refuse_listener_tls().map_err(anyhow::Error::msg)?;
        Internal::new(self.internal_token.as_ref(), self.internal_tls.as_ref(), ENV_PREFIX).map_err(anyhow::Error::msg)
    }
}

/// The backend the configuration names, or the default for where the
/// service runs.
pub async fn backend_from_config(config: &Config) -> anyhow::Result<Arc<SecretBackend>> {
    config.store().open().await
}

/// A built server, bound and ready to run.
pub struct Application {
    served: Served,
    replicas: Option<Arc<replicas::StoreReplicas>>,
    /// Finds what changed while no replica watched, then records baselines.
    _baselines: Option<secrets_common::server::AbortOnDrop>,
    /// The value leases given to gateways (ended at shutdown), and the lock
    /// that keeps them sound.
    value_leases: secrets_common::leases::Leases,
    _value_lock: Option<std::fs::File>,
}

secrets_common::service!(Application, Config, "secret-service");

impl Application {
    /// Binds `server.listen_addr` and opens the configured backend.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.server.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    /// Serves on an already-bound listener (tests and the local stack bind
    /// port 0 first).
    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let Some(url) = config.replicas.database_url.clone() else {
            let backend = backend_from_config(&config).await?;
            let offer = values::Offer::for_config(&config)?;
            return Self::build_on(config, listener, backend, Metrics::new(), offer).await;
        };
        config.validate()?;
        let metrics = Metrics::new();
        let fence = replicas::StoreReplicas::connect(&config.replicas, &url, &metrics).await?;
        let backend = Arc::new(config.store().open_kubernetes().await?.fenced(fence.clone()));
        fence.start(backend.clone());
        tracing::info!("keeping the store objects in memory in step with the other replicas");
        let offer = values::Offer::refused(
            "replicas keep their copies in step through the database, and value leases are not offered across replicas",
        );
        let mut app = Self::build_on(config, listener, backend, metrics, offer).await?;
        app.replicas = Some(fence);
        Ok(app)
    }

    /// Serves with a given backend, which other replicas in this process
    /// may share (so no value leases are offered).
    pub async fn build_with_backend(
        config: Config,
        listener: TcpListener,
        backend: Arc<SecretBackend>,
    ) -> anyhow::Result<Self> {
        let offer = values::Offer::refused("this replica shares its store with others it does not coordinate with");
        Self::build_on(config, listener, backend, Metrics::new(), offer).await
    }

    async fn build_on(
        config: Config,
        listener: TcpListener,
        backend: Arc<SecretBackend>,
        metrics: Metrics,
        offer: values::Offer,
    ) -> anyhow::Result<Self> {
        let internal = config.internal()?;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let channel = internal
            .channel(&config.authz_url, timeout, AUTHZ_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        let authz = AuthzClient::new(channel.clone(), internal.client());
        let usage = secrets_common::usage::UsageClient::new(channel.clone(), internal.client());
        let changes = secrets_common::changes::ChangeLogClient::new(channel, internal.client());
        config.changes.validate()?;
        let backend: Arc<SecretBackend> = Arc::new(
            backend::MeteredBackend::new(backend, metrics.clone()).with_write_limits(config.store().write_limits()),
        );
        let values::Offer { leases, lock, while_watched } = offer;
        let leases = if while_watched {
            let watched = backend.clone();
            leases.with_guard(move |lease| watched.watched(lease))
        } else {
            leases
        };
        if leases.offered() {
            tracing::info!("offering value leases: gateways may keep values in memory; writes wait for them");
        }
        let backend: Arc<SecretBackend> = Arc::new(values::LeasedBackend::new(backend, leases.clone()));
        let store = SecretStore::with_metrics(backend, config.object_prefix.clone(), Some(metrics.clone()));
        tracing::info!(backend = store.backend_name(), "secret store ready");
        let secrets = secrets::Secrets {
            store,
            authz: Arc::new(authz),
            usage: Arc::new(usage),
            changes: Arc::new(changes.clone()),
            announcer: Default::default(),
            order: Default::default(),
        };
        let secrets = Arc::new(secrets);
        secrets.store.observe(Arc::new(secrets::Observed(Arc::downgrade(&secrets))));
        let baselines =
            baselines::start(&secrets, changes, config.changes.clone()).map(secrets_common::server::AbortOnDrop);
        let grpc = grpc::SecretGrpc::shared(secrets);
        let auth = internal.auth();

        let (router, health) =
            server::router("secret-service", &metrics, &config.server, &[SECRET_SERVICE, SECRET_READER, VALUE_LEASES])
                .await?;
        let router = router
            .add_service(tonic::service::interceptor::InterceptedService::new(
                SecretServiceServer::new(grpc.clone())
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                SecretReaderServer::new(grpc)
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(ValueLeasesServer::with_interceptor(leases.clone(), auth));
        Ok(Self {
            served: Served::start(listener, (router, health), metrics, &config.server, internal.server_tls()).await?,
            replicas: None,
            _baselines: baselines,
            value_leases: leases,
            _value_lock: lock,
        })
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let replicas = self.replicas.clone();
        let leases = self.value_leases.clone();
        let shutdown = async move {
            shutdown.await;
            leases.stop();
            // Writes stop waiting for this replica while it drains.
            if let Some(replicas) = replicas {
                replicas.leave().await;
            }
        };
        self.served.run(shutdown).await.context("secret-service stopped with an error")
    }
}
