//! The vault-config-service: read-only HashiCorp Vault (or OpenBao) KV v2
//! integrations of a domain, their credentials, their keys, and their values
//! for the gateway's resolver.
//!
//! Reading order: [`grpc`] (the tonic adapters) → [`configs`] (the domain
//! logic: authorization, where each part is kept, caches) → [`spec`] (the
//! rules of a config, no I/O) and [`vault`] (talking to Vault) → [`rows`]
//! (the rows in memory) → [`db`].

pub mod configs;
pub mod db;
pub mod grpc;
pub mod rotation;
pub mod rows;
pub mod spec;
pub mod vault;

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
    internal::v1::{resource_registry_client::ResourceRegistryClient, vault_reader_server::VaultReaderServer},
    service_names::{VAULT_CONFIG_SERVICE, VAULT_READER},
    v1::vault_config_service_server::VaultConfigServiceServer,
};
use secrets_store::{BackendKind, EmbeddedConfig, Environment, KubernetesConfig, MeteredBackend, StoreSettings};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use secrets_common::error::{Error, Result};

pub const ENV_PREFIX: &str = "VAULT_CONFIG_SERVICE_";

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
    /// The authz service: permission checks and bundle placement.
    pub authz_url: String,
    /// Bound on every call to another service.
    pub request_timeout_ms: u64,
    /// `sqlite://path?mode=rwc` (the default) or `postgres://...`;
    /// `DATABASE_URL` sets it too.
    pub database_url: String,
    /// Bound on getting a connection and on each database operation.
    pub database_timeout_ms: u64,
    /// Where credentials live; unset: `kubernetes` in a cluster, else `embedded`.
    pub backend: Option<BackendKind>,
    /// Credential store objects: `{prefix}-{domain}`.
    pub object_prefix: String,
    pub embedded: EmbeddedConfig,
    pub kubernetes: KubernetesConfig,
    pub vault: VaultSettings,
    /// Vault change detection for the change feed.
    pub changes: rotation::ChangesConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultSettings {
    /// Bound on each request to a Vault server: keep it under the gateway's
    /// `request_timeout_ms`, so a Vault that does not answer is reported as
    /// such (TIMED_OUT, or UNAVAILABLE naming the config) rather than as the
    /// gateway giving up on this service.
    pub timeout_ms: u64,
    /// How long values read from Vault are kept in memory (never on disk).
    pub cache_ttl_ms: u64,
    /// Configs whose connections are kept at once.
    pub cache_max_entries: u64,
    /// Bound on the values kept in memory, in bytes (keys and values of
    /// every cached secret together); the least used go first.
    pub cache_max_bytes: u64,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self { timeout_ms: 3_000, cache_ttl_ms: 30_000, cache_max_entries: 10_000, cache_max_bytes: 64 * 1024 * 1024 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::local(50054, 9104),
            internal_token: None,
            internal_tls: None,
            authz_url: "http://127.0.0.1:50053".into(),
            request_timeout_ms: 5_000,
            database_url: "sqlite://data/vault-configs.db?mode=rwc".into(),
            database_timeout_ms: 1_500,
            backend: None,
            object_prefix: "iomete-vault-credentials".into(),
            embedded: EmbeddedConfig::at("data/vault-credentials"),
            kubernetes: KubernetesConfig::default(),
            vault: VaultSettings::default(),
            changes: rotation::ChangesConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    /// Loads file and `VAULT_CONFIG_SERVICE_*` variables; a `DATABASE_URL`
    /// in the environment is used unless the prefixed one is set too.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut config: Self =
            secrets_common::config::load(file, ENV_PREFIX, &Self::default().server).map_err(anyhow::Error::msg)?;
        secrets_db::url_from_environment("VAULT_CONFIG_SERVICE_DATABASE_URL", &mut config.database_url);
        Ok(config)
    }

    /// Where the credentials' store objects live.
    pub fn store(&self) -> StoreSettings<'_> {
        StoreSettings {
            backend: self.backend,
            embedded: &self.embedded,
            kubernetes: &self.kubernetes,
            env_prefix: ENV_PREFIX,
            component: "vault-credentials",
            object_prefix: &self.object_prefix,
        }
    }

    /// The internal credential and mutual TLS, as configured.
    pub fn internal(&self) -> anyhow::Result<Internal> {
        self.server.refuse_listener_tls().map_err(anyhow::Error::msg)?;
        Internal::new(self.internal_token.as_ref(), self.internal_tls.as_ref(), ENV_PREFIX).map_err(anyhow::Error::msg)
    }

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.internal()?
            .channel(&self.authz_url, Duration::from_secs(1), AUTHZ_SERVICE, &Metrics::new())
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        anyhow::ensure!(
            ["sqlite:", "postgres://", "postgresql://"].iter().any(|p| self.database_url.starts_with(p)),
            "database_url must start with sqlite:, postgres:// or postgresql://"
        );
        anyhow::ensure!(self.database_timeout_ms > 0, "database_timeout_ms must be above 0");
        anyhow::ensure!(self.vault.timeout_ms > 0, "vault.timeout_ms must be above 0");
        anyhow::ensure!(
            self.changes.vault_poll_interval_seconds == 0 || self.changes.vault_poll_budget_per_minute > 0,
            "changes.vault_poll_budget_per_minute must be above 0 (or set changes.vault_poll_interval_seconds to 0 \
             to turn Vault change detection off)"
        );
        self.store().validate(&Environment::detect())
    }
}

pub struct Application {
    served: Served,
    /// Stops taking part among the replicas once the server has drained.
    rows: rows::Rows,
    /// The Vault change detection.
    _poller: secrets_common::server::AbortOnDrop,
}

secrets_common::service!(Application, Config, "vault-config-service");

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.server.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let internal = config.internal()?;
        let metrics = Metrics::new();
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let channel = internal
            .channel(&config.authz_url, timeout, AUTHZ_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        let authz = AuthzClient::new(channel.clone(), internal.client());
        // Placing a resource is a grant change: it may wait for the decision
        // lease holders on top of its own work.
        let registry_channel = internal
            .channel(&config.authz_url, timeout + secrets_common::authz::GRANT_CHANGE_WAIT, AUTHZ_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("authz_url: {e}"))?;
        let peers = configs::Peers {
            authz: Arc::new(authz),
            registry: ResourceRegistryClient::with_interceptor(registry_channel, internal.client()),
            usage: Arc::new(secrets_common::usage::UsageClient::new(channel.clone(), internal.client())),
        };
        let usage = peers.usage.clone();
        let change_log = secrets_common::changes::ChangeLogClient::new(channel, internal.client());
        let database_timeout = Duration::from_millis(config.database_timeout_ms);
        let db = db::connect(&config.database_url, database_timeout, Some(&metrics)).await?;
        let store = config.store().open::<Error>().await?;
        let store =
            Arc::new(MeteredBackend::new(store, metrics.clone()).with_write_limits(config.store().write_limits()));
        tracing::info!(database = secrets_db::backend_name(&db), store = store_name(&*store), "vault configs ready");
        let limits = configs::Limits {
            vault_timeout: Duration::from_millis(config.vault.timeout_ms),
            cache_ttl: Duration::from_millis(config.vault.cache_ttl_ms),
            cache_max_entries: config.vault.cache_max_entries,
            cache_max_bytes: config.vault.cache_max_bytes,
            database_timeout,
        };
        let configs =
            configs::Configs::new(db.clone(), store, config.object_prefix.clone(), peers, limits, metrics.clone());
        let rows = configs.rows().clone();
        let poller = secrets_common::server::AbortOnDrop(tokio::spawn(
            rotation::Poller {
                configs: configs.clone(),
                db,
                usage,
                log: Arc::new(change_log),
                announcer: Default::default(),
                settings: config.changes.clone(),
            }
            .run(),
        ));
        let grpc = grpc::VaultGrpc::new(configs);
        let auth = internal.auth();
        let (router, health) =
            server::router("vault-config-service", &metrics, &config.server, &[VAULT_CONFIG_SERVICE, VAULT_READER])
                .await?;
        let router = router
            .add_service(tonic::service::interceptor::InterceptedService::new(
                VaultConfigServiceServer::new(grpc.clone())
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                VaultReaderServer::new(grpc)
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth,
            ));
        Ok(Self {
            served: Served::start(listener, (router, health), metrics, &config.server, internal.server_tls()).await?,
            rows,
            _poller: poller,
        })
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let rows = self.rows.clone();
        let shutdown = async move {
            shutdown.await;
            // Changes stop waiting for this replica while it drains.
            rows.leave().await;
        };
        self.served.run(shutdown).await.context("vault-config-service stopped with an error")
    }
}

fn store_name(store: &dyn secrets_store::StoreBackend<Error>) -> &'static str {
    store.name()
}
