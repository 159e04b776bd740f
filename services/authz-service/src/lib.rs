//! The authz service (the RAS): platform admins, domain owners and members
//! with explicit permissions. Deny by default. It also keeps the usage
//! index ([`usage`]) in its database.
//!
//! Reading order: [`grpc`] → [`policy`] (queries) and [`rules`] (decisions,
//! no I/O) → [`db`].

pub mod access;
pub mod changes;
pub mod db;
pub mod grants;
pub mod grpc;
pub mod policy;
pub mod rules;
pub mod usage;
pub mod writer;

use std::{collections::BTreeSet, future::Future, time::Duration};

use anyhow::Context;
use secrecy::SecretString;
use secrets_common::{
    Principal,
    auth::Internal,
    observe::Metrics,
    server::{self, Served, ServerConfig},
    telemetry::TelemetryConfig,
    tls::InternalTlsConfig,
};
use secrets_proto::{
    internal::v1::{
        change_log_server::ChangeLogServer, decision_leases_server::DecisionLeasesServer,
        resource_registry_server::ResourceRegistryServer, usage_index_server::UsageIndexServer,
    },
    service_names::{AUTHZ_SERVICE, CHANGE_LOG, DECISION_LEASES, RESOURCE_REGISTRY, USAGE_INDEX},
    v1::authz_service_server::AuthzServiceServer,
};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use secrets_common::error::{Error, Result};

pub const ENV_PREFIX: &str = "AUTHZ_SERVICE_";

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The `[server]` table: listen, health and metrics addresses, drain,
    /// listener TLS.
    pub server: ServerConfig,
    pub internal_token: Option<SecretString>,
    /// Mutual TLS on internal hops; with it the internal token is optional.
    pub internal_tls: Option<InternalTlsConfig>,

    /// `sqlite://path?mode=rwc` (the default) or `postgres://...`;
    /// `DATABASE_URL` sets it too.
    pub database_url: String,
    /// Subjects that are platform admins by configuration, such as `user:admin`.
    pub bootstrap_admins: Vec<String>,
    /// Bound on getting a connection and on each database operation; well
    /// under the callers' request timeout, so a database that stops
    /// answering is reported as `UNAVAILABLE` naming it, not as a time-out.
    pub database_timeout_ms: u64,
    /// The change feed's log: how long it keeps changes.
    pub changes: changes::ChangesConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::local(50053, 9103),
            internal_token: None,
            internal_tls: None,
            database_url: "sqlite://data/authz.db?mode=rwc".into(),
            bootstrap_admins: Vec::new(),
            database_timeout_ms: 1_500,
            changes: changes::ChangesConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    /// Loads file and `AUTHZ_SERVICE_*` variables; a `DATABASE_URL` in the
    /// environment is used unless `AUTHZ_SERVICE_DATABASE_URL` is set too.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut config: Self =
            secrets_common::config::load(file, ENV_PREFIX, &Self::default().server).map_err(anyhow::Error::msg)?;
        secrets_db::url_from_environment("AUTHZ_SERVICE_DATABASE_URL", &mut config.database_url);
        Ok(config)
    }
}

impl Config {
    /// The internal credential and mutual TLS, as configured.
    pub fn internal(&self) -> anyhow::Result<Internal> {
        self.server.refuse_listener_tls().map_err(anyhow::Error::msg)?;
        Internal::new(self.internal_token.as_ref(), self.internal_tls.as_ref(), ENV_PREFIX).map_err(anyhow::Error::msg)
    }

    /// Everything that can be checked without starting: for `check-config`.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.internal()?;
        for (i, s) in self.bootstrap_admins.iter().enumerate() {
            Principal::parse(&format!("bootstrap_admins[{i}]"), s)?;
        }
        anyhow::ensure!(
            ["sqlite:", "postgres://", "postgresql://"].iter().any(|p| self.database_url.starts_with(p)),
            "database_url must start with sqlite:, postgres:// or postgresql://"
        );
        anyhow::ensure!(self.database_timeout_ms > 0, "database_timeout_ms must be above 0");
        anyhow::ensure!(
            (1..=10 * 365 * 24 * 3600).contains(&self.changes.retention_seconds),
            "changes.retention_seconds must be 1 to 315360000 (ten years)"
        );
        Ok(())
    }
}

pub struct Application {
    served: Served,
    /// Held while the service runs (see [`db::lock_sqlite`]).
    _sqlite_lock: Option<std::fs::File>,
    policy: policy::Policy,
    /// Keeps the change log (polling the head on PostgreSQL, pruning).
    _change_keeper: secrets_common::server::AbortOnDrop,
}

secrets_common::service!(Application, Config, "authz-service");

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = server::bind(config.server.listen_addr).await?;
        Self::build_with_listener(config, listener).await
    }

    pub async fn build_with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let internal = config.internal()?;
        let admins = config
            .bootstrap_admins
            .iter()
            .enumerate()
            .map(|(i, s)| Principal::parse(&format!("bootstrap_admins[{i}]"), s))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let metrics = Metrics::new();
        let timeout = Duration::from_millis(config.database_timeout_ms);
        let sqlite_lock = db::lock_sqlite(&config.database_url)?;
        let db = db::connect(&config.database_url, timeout, Some(&metrics)).await?;
        tracing::info!(backend = ?db.get_database_backend(), "authz database ready");
        let policy = policy::Policy::new(db, admins, timeout, Some(metrics.clone()));
        let usage = usage::UsageIndex::new(policy.clone());
        let leases = policy.leases();
        let grpc = grpc::AuthzGrpc::new(policy.clone());
        let change_log = changes::ChangeLog::new(policy.clone(), &config.changes).await?;
        let change_keeper = secrets_common::server::AbortOnDrop(tokio::spawn(change_log.clone().run()));

        let (router, health) = server::router(
            "authz-service",
            &metrics,
            &config.server,
            &[AUTHZ_SERVICE, RESOURCE_REGISTRY, USAGE_INDEX, DECISION_LEASES, CHANGE_LOG],
        )
        .await?;
        let auth = internal.auth();
        let router = router
            .add_service(tonic::service::interceptor::InterceptedService::new(
                AuthzServiceServer::new(grpc.clone())
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ResourceRegistryServer::new(grpc)
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                UsageIndexServer::new(usage)
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ChangeLogServer::new(change_log)
                    .max_decoding_message_size(secrets_common::server::MAX_INTERNAL_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(DecisionLeasesServer::with_interceptor(leases.clone(), auth));
        Ok(Self {
            served: Served::start(listener, (router, health), metrics, &config.server, internal.server_tls()).await?,
            _sqlite_lock: sqlite_lock,
            policy,
            _change_keeper: change_keeper,
        })
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let policy = self.policy.clone();
        let shutdown = async move {
            shutdown.await;
            // Lease holders go back to asking while the server drains.
            policy.stop().await;
        };
        let result = self.served.run(shutdown).await.context("authz-service stopped with an error");
        drop(self._sqlite_lock);
        result
    }
}
