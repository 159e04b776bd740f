//! Replicas of the secret-service on the Kubernetes store: each keeps the
//! store objects in memory from its own watch, so a write through one
//! replica would reach another's memory only when its watch delivers it.
//! With `replicas.database_url` (PostgreSQL) they keep their copies in
//! step through [`secrets_db::replicas`]: a write announces the object and
//! the resourceVersion it wrote, every other replica reads that object from
//! the API server unless its copy has it already, and the write returns
//! only once every replica has (or can no longer answer from memory). A
//! replica whose lease has lapsed answers from the API server instead of
//! its copy, so a read after a write never sees what came before it.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use sea_orm_migration::{MigrationTrait, MigratorTrait, prelude::*};
use secrets_common::error::{BackendError, Error};
use secrets_db::replicas::{BoxFuture, Keeper, Names, Replicas};
use secrets_store::kubernetes::{Fence, KubernetesBackend};
use serde::Deserialize;

/// The names this service's replicas share.
pub const REPLICAS: Names = Names {
    service: "secret-service",
    counter: "secret_store_changes",
    table: "secret_store_replicas",
    channel: "secrets_store_changes",
    applied_channel: "secrets_store_applied",
};

/// The `[replicas]` table.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicasConfig {
    /// The PostgreSQL database the replicas keep their copies in step
    /// through (it may be the authz service's: the tables are this
    /// service's own). Needed with more than one replica on the Kubernetes
    /// store; unset: one replica.
    pub database_url: Option<String>,
    /// Bound on getting a connection and on each statement.
    pub database_timeout_ms: u64,
}

/// The URL may hold a password: printed only as set or not.
impl std::fmt::Debug for ReplicasConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicasConfig")
            .field("database_url", &self.database_url.as_ref().map(|_| "(set)"))
            .field("database_timeout_ms", &self.database_timeout_ms)
            .finish()
    }
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        Self { database_url: None, database_timeout_ms: 1_500 }
    }
}

impl ReplicasConfig {
    /// Checks the settings against whether the store keeps copies at all.
    pub fn validate(&self, store_keeps_copies: bool) -> anyhow::Result<()> {
        let Some(url) = &self.database_url else { return Ok(()) };
        anyhow::ensure!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "replicas.database_url must start with postgres:// or postgresql:// (replicas run on one PostgreSQL)"
        );
        anyhow::ensure!(
            store_keeps_copies,
            "replicas.database_url is set, but the store keeps no copy in memory to keep in step (only the \
             kubernetes backend with kubernetes.watch does): unset it"
        );
        anyhow::ensure!(self.database_timeout_ms > 0, "replicas.database_timeout_ms must be above 0");
        Ok(())
    }
}

struct Migrator;

#[derive(DeriveIden)]
enum SecretServiceMigrations {
    Table,
}

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(secrets_db::replicas::Migration { name: "m20261207_000002_replicas", names: REPLICAS })]
    }

    /// Its own migrations table, so it can share a database with the other
    /// services.
    fn migration_table_name() -> DynIden {
        SecretServiceMigrations::Table.into_iden()
    }
}

/// An arbitrary constant that names this service's migration lock.
const MIGRATION_LOCK_ID: i64 = 0x5ec2_e75e_b002;

/// The fence a replica's Kubernetes backend answers through.
pub struct StoreReplicas {
    db: DatabaseConnection,
    replicas: OnceLock<Replicas>,
}

impl StoreReplicas {
    /// Connects (and creates the tables on first start); start with
    /// [`StoreReplicas::start`] once the backend is fenced.
    pub async fn connect(
        config: &ReplicasConfig,
        url: &str,
        metrics: &secrets_common::observe::Metrics,
    ) -> anyhow::Result<Arc<Self>> {
        let timeout = Duration::from_millis(config.database_timeout_ms);
        let db = secrets_db::connect::<Migrator>(url, timeout, Some(metrics), MIGRATION_LOCK_ID)
            .await
            .map_err(|e| anyhow::anyhow!("replicas.database_url: {e}"))?;
        Ok(Arc::new(Self { db, replicas: OnceLock::new() }))
    }

    /// Starts keeping `backend`'s copy in step with the other replicas'.
    pub fn start(&self, backend: Arc<KubernetesBackend>) {
        // Held weakly: the backend holds this fence, and the fence the keeper.
        let keeper = Arc::new(Mirror { backend: Arc::downgrade(&backend), db: self.db.clone() });
        let _ = self.replicas.set(Replicas::start(self.db.clone(), REPLICAS, keeper));
    }

    /// Leaves the replicas (the service is stopping): reads go to the API
    /// server, and writers stop waiting for this replica at once.
    pub async fn leave(&self) {
        if let Some(r) = self.replicas.get() {
            r.leave().await;
        }
    }

    async fn announce(&self, what: &str) -> Result<i64, DbErr> {
        let txn = self.db.begin().await?;
        let version = Replicas::announce(&REPLICAS, &txn, what).await?;
        txn.commit().await?;
        Ok(version)
    }
}

/// What a write tells the caller when it landed but is not confirmed.
fn unconfirmed(object: &str, why: String) -> BackendError {
    BackendError::Unanswered { backend: "kubernetes", message: format!("secret {object} was written, but {why}") }
}

impl Fence for StoreReplicas {
    fn holds(&self) -> bool {
        self.replicas.get().is_some_and(Replicas::serving)
    }

    fn written<'a>(
        &'a self,
        object: &'a str,
        version: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BackendError>> + Send + 'a>> {
        Box::pin(async move {
            let Some(replicas) = self.replicas.get() else { return Ok(()) };
            let change = self.announce(&format!("{object} {version}")).await.map_err(|e| {
                unconfirmed(object, format!("the other replicas could not be told of it through the database: {e}"))
            })?;
            replicas.wait_for_others(change).await.map_err(|e| match e {
                Error::Upstream(status) => unconfirmed(object, status.message().to_string()),
                other => unconfirmed(object, other.to_string()),
            })
        })
    }
}

/// A replica's copy: the backend's memory.
struct Mirror {
    backend: std::sync::Weak<KubernetesBackend>,
    db: DatabaseConnection,
}

impl Mirror {
    fn backend(&self) -> Result<Arc<KubernetesBackend>, Error> {
        self.backend.upgrade().ok_or_else(|| Error::Internal("the store backend is gone".into()))
    }
}

impl Keeper for Mirror {
    fn reload(&self) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async {
            // The counter first: every write announced up to it was in the
            // API server before, so the list has it.
            let version = Replicas::version_in(&REPLICAS, &self.db).await?;
            self.backend()?.catch_up_all().await?;
            Ok(version)
        })
    }

    fn apply<'a>(&'a self, _version: i64, what: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let (object, version) = what
                .rsplit_once(' ')
                .and_then(|(o, v)| Some((o, v.parse::<u64>().ok()?)))
                .ok_or_else(|| Error::Internal(format!("a store change announcement without a version: {what:?}")))?;
            Ok(self.backend()?.catch_up(object, version).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_database_is_postgresql_and_only_for_a_store_that_keeps_copies() {
        let with = |url: &str| ReplicasConfig { database_url: Some(url.into()), ..Default::default() };
        assert!(ReplicasConfig::default().validate(false).is_ok(), "unset: one replica, whatever the store");
        assert!(with("postgres://db/secrets").validate(true).is_ok());
        let sqlite = with("sqlite://replicas.db").validate(true).unwrap_err().to_string();
        assert!(sqlite.contains("replicas.database_url") && sqlite.contains("postgres://"), "{sqlite}");
        let embedded = with("postgres://db/secrets").validate(false).unwrap_err().to_string();
        assert!(embedded.contains("replicas.database_url") && embedded.contains("unset it"), "{embedded}");
    }

    #[test]
    fn the_database_url_and_its_password_stay_out_of_debug_output() {
        let config =
            ReplicasConfig { database_url: Some("postgres://u:pw-canary-17@db/x".into()), ..Default::default() };
        let printed = format!("{config:?}");
        assert!(!printed.contains("pw-canary-17") && printed.contains("(set)"), "{printed}");
    }
}
