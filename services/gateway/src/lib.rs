//! The gateway: the one endpoint platform components and operators call.
//!
//! It authenticates every call ([`auth`], [`jwt`]) and forwards the
//! management APIs of the internal services ([`forward`]). Its own
//! `Gateway` service ([`grpc`]) hands each RPC to a room: [`resolution`]
//! (resolving references, reading through [`sources`]; workload payloads
//! through [`payload`]), [`workloads`] (saved workloads and the usage
//! index) and [`selector`] (the secret selector).

pub mod audit;
pub mod auth;
pub mod feed;
pub mod forward;
pub mod grpc;
pub mod jwt;
pub mod migration;
pub mod payload;
pub mod resolution;
pub mod selector;
pub mod sources;
pub mod values;
pub mod workloads;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use secrecy::SecretString;
use secrets_common::{
    auth::Internal,
    authz::{self, AuthzClient},
    observe::{Metrics, TracedChannel},
    server::{self, AbortOnDrop, Served, ServerConfig},
    telemetry::TelemetryConfig,
    tls::{self, InternalTlsConfig},
};
use secrets_proto::{
    internal::v1::{secret_reader_client::SecretReaderClient, vault_reader_client::VaultReaderClient},
    service_names::{AUTHZ_SERVICE, GATEWAY, SECRET_SERVICE, VAULT_CONFIG_SERVICE},
    v1::{
        authz_service_client::AuthzServiceClient, authz_service_server::AuthzServiceServer,
        gateway_server::GatewayServer, secret_service_client::SecretServiceClient,
        secret_service_server::SecretServiceServer, vault_config_service_client::VaultConfigServiceClient,
        vault_config_service_server::VaultConfigServiceServer,
    },
};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::auth::Authenticated;

pub use auth::{RpcGroup, ServiceAccountConfig, TokenConfig, TokenKind};

/// One encoded request to any public service: room for
/// [`resolution::limits::MAX_ITEMS`] items at their largest.
pub const MAX_REQUEST_BYTES: usize = resolution::limits::MAX_REQUEST_BYTES;

pub const ENV_PREFIX: &str = "GATEWAY_";

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The `[server]` table: listen, health and metrics addresses, drain,
    /// listener TLS.
    pub server: ServerConfig,
    /// The credential the gateway presents to the internal services.
    pub internal_token: Option<SecretString>,
    /// Mutual TLS to the internal services (their URLs are then `https://`).
    pub internal_tls: Option<InternalTlsConfig>,
    pub secret_service_url: String,
    pub authz_service_url: String,
    pub vault_config_service_url: String,
    /// Bound on every call to an internal service.
    pub request_timeout_ms: u64,
    /// Answer permission questions from memory while holding a decision
    /// lease from the authz-service (on SQLite, and among replicas on
    /// PostgreSQL). Off: every question is asked.
    pub decision_leases: bool,
    /// Keep resolved KUBERNETES values in memory while holding a value
    /// lease from the secret-service (offered where it sees every change to
    /// the store; see `value_cache`). Off, or without a lease: every
    /// resolve reads them.
    pub value_leases: bool,
    /// The `[value_cache]` table: how much the value lease may keep.
    pub value_cache: values::ValueCacheConfig,
    /// The static tokens callers may present.
    pub tokens: Vec<TokenConfig>,
    /// Trusted JWT issuers: the identity provider (users) and the cluster
    /// (service accounts).
    pub jwt_issuers: Vec<jwt::IssuerConfig>,
    /// Service accounts that call as platform services, and what each may do.
    pub service_accounts: Vec<ServiceAccountConfig>,
    pub features: Features,
    /// The audit trail: where it is kept, strict or buffered.
    pub audit: audit::AuditConfig,
    pub telemetry: TelemetryConfig,
}

/// Feature flags, named as in the platform's Helm values.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Features {
    #[serde(rename = "secretsV2", alias = "secretsv2")]
    pub secrets_v2: Flag,
}

impl Default for Features {
    fn default() -> Self {
        Self { secrets_v2: Flag { enabled: true } }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    pub enabled: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::local(50051, 9101),
            internal_token: None,
            internal_tls: None,
            secret_service_url: "http://127.0.0.1:50052".into(),
            authz_service_url: "http://127.0.0.1:50053".into(),
            vault_config_service_url: "http://127.0.0.1:50054".into(),
            request_timeout_ms: 5_000,
            decision_leases: true,
            value_leases: true,
            value_cache: values::ValueCacheConfig::default(),
            tokens: Vec::new(),
            jwt_issuers: Vec::new(),
            service_accounts: Vec::new(),
            features: Features::default(),
            audit: audit::AuditConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    /// Loads the file and the `GATEWAY_*` variables over the defaults.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        secrets_common::config::load(file, ENV_PREFIX, &Self::default().server).map_err(anyhow::Error::msg)
    }

    /// The internal credential and mutual TLS, as configured.
    pub fn internal(&self) -> anyhow::Result<Internal> {
        anyhow::ensure!(
            self.internal_tls.as_ref().is_none_or(|t| t.allowed_clients.is_empty()),
            "internal_tls.allowed_clients: the gateway has no internal listener; list the gateway's name in the \
             services' allowed_clients instead"
        );
        Internal::new(self.internal_token.as_ref(), self.internal_tls.as_ref(), ENV_PREFIX).map_err(anyhow::Error::msg)
    }

    /// Static tokens, service accounts and JWT issuers, checked.
    pub fn authenticator(&self) -> anyhow::Result<auth::Authenticator> {
        auth::Authenticator::with_jwt(&self.tokens, &self.service_accounts, &self.jwt_issuers)
            .map_err(|v| anyhow::anyhow!("{v}"))
    }

    /// The TLS of the listener, when configured.
    pub fn server_tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        self.server.tls.as_ref().map(tls::server_config).transpose().map_err(|e| anyhow::anyhow!("server.tls: {e}"))
    }

    /// Channels to the three internal services, named by their URL fields.
    fn channels(
        &self,
        internal: &Internal,
        timeout: Duration,
        metrics: &Metrics,
    ) -> anyhow::Result<[TracedChannel; 6]> {
        let open = |field: &str, url: &str, peer: &'static str, timeout: Duration| {
            internal.channel(url, timeout, peer, metrics).map_err(|e| anyhow::anyhow!("{field}: {e}"))
        };
        // Calls to the secret and vault-config services go to every replica;
        // those to the authz-service stay on one, which gives this gateway
        // its decision lease (and in steady state is asked nothing).
        let spread = |field: &str, url: &str, peer: &'static str, timeout: Duration| {
            internal.balanced_channel(url, timeout, peer, metrics).map_err(|e| anyhow::anyhow!("{field}: {e}"))
        };
        Ok([
            spread("secret_service_url", &self.secret_service_url, forward::SECRET_SERVICE, timeout)?,
            open("authz_service_url", &self.authz_service_url, authz::AUTHZ_SERVICE, timeout)?,
            spread("vault_config_service_url", &self.vault_config_service_url, forward::VAULT_CONFIG_SERVICE, timeout)?,
            // The management APIs a grant change goes through (the authz
            // API; Vault configs, which register their resources): such a
            // change may wait for the decision lease holders on top of its
            // own work.
            open(
                "authz_service_url",
                &self.authz_service_url,
                authz::AUTHZ_SERVICE,
                timeout + authz::GRANT_CHANGE_WAIT,
            )?,
            spread(
                "vault_config_service_url",
                &self.vault_config_service_url,
                forward::VAULT_CONFIG_SERVICE,
                timeout + authz::GRANT_CHANGE_WAIT,
            )?,
            // Secret writes, which may wait for the value lease holders.
            spread(
                "secret_service_url",
                &self.secret_service_url,
                forward::SECRET_SERVICE,
                timeout + secrets_common::leases::CHANGE_WAIT,
            )?,
        ])
    }

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        let internal = self.internal()?;
        self.authenticator()?;
        self.server_tls()?;
        self.channels(&internal, Duration::from_secs(1), &Metrics::new())?;
        self.audit.validate()?;
        self.value_cache.validate()?;
        Ok(())
    }
}

pub struct Application {
    served: Served,
    /// Holds the decision lease while the gateway runs.
    _lease_holder: Option<AbortOnDrop>,
    /// Holds the value lease while the gateway runs.
    _value_lease_holder: Option<AbortOnDrop>,
    /// Set at shutdown: ends the change feed's open streams.
    closing: tokio::sync::watch::Sender<bool>,
}

secrets_common::service!(Application, Config, "gateway");

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.server.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let internal = config.internal()?;
        let server_tls = config.server_tls()?;
        let authenticator = config.authenticator()?;
        if config.tokens.is_empty() && config.jwt_issuers.is_empty() {
            tracing::warn!("no tokens are configured: every call will be refused as unauthenticated");
        }
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let metrics = Metrics::new();
        let [
            secrets_channel,
            authz_channel,
            vault_channel,
            authz_changes_channel,
            vault_changes_channel,
            secrets_changes_channel,
        ] = config.channels(&internal, timeout, &metrics)?;
        config.value_cache.validate()?;
        let client = internal.client();
        config.audit.validate()?;
        let audit = audit::Audit::open(&config.audit, &metrics).await?;

        // One decision cache for every permission question the gateway asks.
        let mut checks = AuthzClient::new(authz_channel.clone(), client.clone());
        let mut lease_holder = None;
        if config.decision_leases {
            let cache = secrets_common::authz::DecisionCache::default();
            lease_holder = Some(AbortOnDrop(cache.watch(authz_channel.clone(), client.clone())));
            checks = checks.with_cache(cache);
        }
        let forwarder = forward::Forwarder {
            secrets: SecretServiceClient::with_interceptor(secrets_changes_channel, client.clone())
                .max_encoding_message_size(MAX_REQUEST_BYTES)
                .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
            authz: AuthzServiceClient::with_interceptor(authz_changes_channel, client.clone())
                .max_encoding_message_size(MAX_REQUEST_BYTES)
                .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
            vault: VaultConfigServiceClient::with_interceptor(vault_changes_channel, client.clone())
                .max_encoding_message_size(MAX_REQUEST_BYTES)
                .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
            checks: checks.clone(),
            audit: audit.clone(),
        };
        if !config.features.secrets_v2.enabled {
            tracing::info!("features.secretsV2.enabled is false: secret objects are refused, placeholders resolve");
        }
        let secrets_v2 = config.features.secrets_v2.enabled;
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let mut kubernetes: Arc<dyn resolution::Source> = Arc::new(sources::KubernetesSource {
            reader: SecretReaderClient::with_interceptor(secrets_channel.clone(), client.clone())
                .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
        });
        let mut value_lease_holder = None;
        if config.value_leases {
            let leased = values::LeasedSource::new(kubernetes, &config.value_cache, metrics.clone());
            value_lease_holder = Some(AbortOnDrop(leased.watch(secrets_channel.clone(), client.clone())));
            kubernetes = Arc::new(leased);
        }
        let resolution = resolution::Resolution {
            secrets_v2,
            kubernetes,
            vault: Arc::new(sources::VaultSource {
                reader: VaultReaderClient::with_interceptor(vault_channel.clone(), client.clone())
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
            }),
            authz: Arc::new(checks.clone()),
        };
        let workloads = workloads::SavedWorkloads {
            resolution: resolution.clone(),
            usage: secrets_common::usage::UsageClient::new(authz_channel.clone(), client.clone()),
            authz: checks.clone(),
            secrets: SecretReaderClient::with_interceptor(secrets_channel.clone(), client.clone())
                .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
        };
        let gateway = grpc::GatewayService {
            migrations: migration::Migrations {
                workloads: workloads.clone(),
                secrets: SecretReaderClient::with_interceptor(secrets_channel.clone(), client.clone())
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                forwarder: forwarder.clone(),
                authz: checks.clone(),
                secrets_v2,
            },
            workloads,
            resolution,
            selector: selector::Selector {
                secrets_v2,
                catalog: Arc::new(selector::GrpcCatalog {
                    secrets: SecretServiceClient::with_interceptor(secrets_channel, client.clone()),
                    vault: VaultReaderClient::with_interceptor(vault_channel, client.clone()),
                }),
                authz: Arc::new(checks.clone()),
            },
            feed: feed::Feed {
                log: secrets_common::changes::ChangeLogClient::new(authz_channel.clone(), client.clone()),
                authz: checks.clone(),
                closing: closing_rx,
            },
            audit,
            checks,
        };

        let (router, health) = server::router(
            "gateway",
            &metrics,
            &config.server,
            &[GATEWAY, SECRET_SERVICE, AUTHZ_SERVICE, VAULT_CONFIG_SERVICE],
        )
        .await?;
        let router = router
            .add_service(Authenticated::new(
                GatewayServer::new(gateway).max_decoding_message_size(MAX_REQUEST_BYTES),
                authenticator.clone(),
            ))
            .add_service(Authenticated::new(
                SecretServiceServer::new(forwarder.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
                authenticator.clone(),
            ))
            .add_service(Authenticated::new(
                AuthzServiceServer::new(forwarder.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
                authenticator.clone(),
            ))
            .add_service(Authenticated::new(
                VaultConfigServiceServer::new(forwarder).max_decoding_message_size(MAX_REQUEST_BYTES),
                authenticator,
            ));
        Ok(Self {
            served: Served::start(listener, (router, health), metrics, &config.server, server_tls).await?,
            _lease_holder: lease_holder,
            _value_lease_holder: value_lease_holder,
            closing,
        })
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let closing = self.closing;
        let shutdown = async move {
            shutdown.await;
            // Change-feed streams never finish on their own: they end now.
            let _ = closing.send(true);
        };
        self.served.run(shutdown).await.context("gateway stopped with an error")
    }
}
