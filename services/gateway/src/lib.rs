//! The gateway: the one endpoint platform components and operators call.
//!
//! It authenticates every call ([`auth`]), forwards the management APIs of
//! the internal services ([`forward`]) and resolves secret references for
//! platform components ([`resolver`]).

pub mod auth;
pub mod forward;
pub mod resolver;
pub mod selector;

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use secrecy::SecretString;
use secrets_common::{
    auth::{InternalClient, internal_channel},
    authz::{self, AuthzClient},
    observe::Metrics,
    server::{self, Served},
    telemetry::TelemetryConfig,
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

pub use auth::{RpcGroup, TokenConfig, TokenKind};

pub const ENV_PREFIX: &str = "GATEWAY_";

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
    /// The credential the gateway presents to the internal services.
    pub internal_token: Option<SecretString>,
    pub secret_service_url: String,
    pub authz_service_url: String,
    pub vault_config_service_url: String,
    /// Bound on every call to an internal service.
    pub request_timeout_ms: u64,
    /// The tokens callers may present.
    pub tokens: Vec<TokenConfig>,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: ([127, 0, 0, 1], 50051).into(),
            metrics_addr: Some(([127, 0, 0, 1], 9101).into()),
            shutdown_drain_ms: 0,
            internal_token: None,
            secret_service_url: "http://127.0.0.1:50052".into(),
            authz_service_url: "http://127.0.0.1:50053".into(),
            vault_config_service_url: "http://127.0.0.1:50054".into(),
            request_timeout_ms: 5_000,
            tokens: Vec::new(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.internal_token.as_ref().context("internal_token is required")?;
        auth::Authenticator::new(&self.tokens).map_err(|v| anyhow::anyhow!("{v}"))?;
        let m = Metrics::new();
        let t = Duration::from_secs(1);
        internal_channel(&self.secret_service_url, t, forward::SECRET_SERVICE, &m)
            .map_err(|e| anyhow::anyhow!("secret_service_url: {e}"))?;
        internal_channel(&self.authz_service_url, t, authz::AUTHZ_SERVICE, &m)
            .map_err(|e| anyhow::anyhow!("authz_service_url: {e}"))?;
        internal_channel(&self.vault_config_service_url, t, forward::VAULT_CONFIG_SERVICE, &m)
            .map_err(|e| anyhow::anyhow!("vault_config_service_url: {e}"))?;
        Ok(())
    }
}

pub struct Application {
    served: Served,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let token = config
            .internal_token
            .as_ref()
            .context("internal_token is required (set GATEWAY_INTERNAL_TOKEN or internal_token in the config file)")?;
        let authenticator = auth::Authenticator::new(&config.tokens).map_err(|v| anyhow::anyhow!("{v}"))?;
        if config.tokens.is_empty() {
            tracing::warn!("no tokens are configured: every call will be refused as unauthenticated");
        }
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let metrics = Metrics::new();
        let internal = InternalClient::new(token).map_err(anyhow::Error::msg)?;
        let secrets_channel = internal_channel(&config.secret_service_url, timeout, forward::SECRET_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("secret_service_url: {e}"))?;
        let authz_channel = internal_channel(&config.authz_service_url, timeout, authz::AUTHZ_SERVICE, &metrics)
            .map_err(|e| anyhow::anyhow!("authz_service_url: {e}"))?;

        let vault_channel =
            internal_channel(&config.vault_config_service_url, timeout, forward::VAULT_CONFIG_SERVICE, &metrics)
                .map_err(|e| anyhow::anyhow!("vault_config_service_url: {e}"))?;

        let secrets_channel_for_selector = secrets_channel.clone();
        let forwarder = forward::Forwarder {
            secrets: SecretServiceClient::with_interceptor(secrets_channel.clone(), internal.clone()),
            authz: AuthzServiceClient::with_interceptor(authz_channel.clone(), internal.clone()),
            vault: VaultConfigServiceClient::with_interceptor(vault_channel.clone(), internal.clone()),
            checks: AuthzClient::new(authz_channel.clone(), token).map_err(anyhow::Error::msg)?,
        };
        let resolver = resolver::Resolver {
            kubernetes: resolver::KubernetesSource {
                reader: SecretReaderClient::with_interceptor(secrets_channel, internal.clone()),
            },
            vault: resolver::VaultSource {
                reader: VaultReaderClient::with_interceptor(vault_channel.clone(), internal.clone()),
            },
            authz: AuthzClient::new(authz_channel.clone(), token).map_err(anyhow::Error::msg)?,
            selector: selector::Selector {
                secrets: SecretServiceClient::with_interceptor(secrets_channel_for_selector, internal.clone()),
                vault: VaultReaderClient::with_interceptor(vault_channel, internal),
                authz: AuthzClient::new(authz_channel, token).map_err(anyhow::Error::msg)?,
            },
        };

        let (router, health) =
            server::router(&metrics, &[GATEWAY, SECRET_SERVICE, AUTHZ_SERVICE, VAULT_CONFIG_SERVICE]).await?;
        let router = router
            .add_service(tonic::service::interceptor::InterceptedService::new(
                GatewayServer::new(resolver).max_decoding_message_size(resolver::limits::MAX_REQUEST_BYTES),
                authenticator.clone(),
            ))
            .add_service(SecretServiceServer::with_interceptor(forwarder.clone(), authenticator.clone()))
            .add_service(AuthzServiceServer::with_interceptor(forwarder.clone(), authenticator.clone()))
            .add_service(VaultConfigServiceServer::with_interceptor(forwarder, authenticator));
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
        self.served.run(shutdown).await.context("gateway stopped with an error")
    }
}
