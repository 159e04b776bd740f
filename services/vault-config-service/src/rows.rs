//! The configs' rows in memory, so that a resolve reads no database.
//!
//! Loaded at start. On SQLite (one process) this service's own writes keep
//! the copy current. On PostgreSQL the replicas keep their copies together
//! through [`secrets_db::replicas`]: every write bumps `vault_config_changes`
//! and announces the config it changed (`NOTIFY secrets_vault_configs`) in
//! its transaction, each replica re-reads that row, and a write returns
//! only once every other replica has applied it (or can no longer answer
//! from its copy). So after `UpdateVaultConfig` or `DeleteVaultConfig`
//! returns, no replica resolves with the old row, and the caches keyed by
//! it miss.
//!
//! Reads go to the database instead while the copy may be behind: before
//! the first load, while this replica is not serving among the replicas,
//! and for a config this replica is changing until its own change is in its
//! copy.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait};
use secrets_db::replicas::{BoxFuture, Names, Replicas};

use crate::{
    Error, Result,
    db::vault_config::{self, Model},
};

/// The names the replicas share on PostgreSQL; a change's payload is the
/// config's id.
pub const REPLICAS: Names = Names {
    service: "vault-config-service",
    counter: "vault_config_changes",
    table: "vault_config_replicas",
    channel: "secrets_vault_configs",
    applied_channel: "secrets_vault_configs_applied",
};

#[derive(Clone)]
pub struct Rows {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    timeout: Duration,
    map: RwLock<HashMap<String, Slot>>,
    /// SQLite: the copy holds every committed change (false before the
    /// first load).
    current: AtomicBool,
    /// PostgreSQL: this replica among the others.
    replicas: std::sync::OnceLock<Replicas>,
    /// One re-read or load at a time, so the one that read last writes
    /// last: a late answer can never put an older row back.
    reading: tokio::sync::Mutex<()>,
    /// Configs this replica is changing: read from the database until the
    /// change has been applied to the copy. A count per config.
    pending: std::sync::Mutex<HashMap<String, usize>>,
}

#[derive(Clone)]
enum Slot {
    Row(Box<Model>),
    /// Deleted (ids are never reused): a late re-read cannot bring it back.
    Deleted,
}

/// A change this replica is making to one config; see [`Rows::changing`].
pub struct Changing {
    rows: Rows,
    id: String,
    done: bool,
    /// PostgreSQL: the version the change was announced as.
    version: std::sync::atomic::AtomicI64,
}

impl Drop for Changing {
    fn drop(&mut self) {
        if !self.done {
            self.rows.settled(&self.id);
        }
    }
}

impl Rows {
    /// Starts keeping the copy: the first load (and, on PostgreSQL, the
    /// listener) runs in the background; reads go to the database until it
    /// is done.
    pub fn start(db: DatabaseConnection, timeout: Duration) -> Self {
        let rows = Self {
            inner: Arc::new(Inner {
                db,
                timeout,
                map: RwLock::default(),
                current: AtomicBool::new(false),
                replicas: std::sync::OnceLock::new(),
                reading: tokio::sync::Mutex::new(()),
                pending: Default::default(),
            }),
        };
        match rows.inner.db.get_database_backend() {
            DbBackend::Postgres => {
                let keeper = Arc::new(Keeper(Arc::downgrade(&rows.inner)));
                let replicas = Replicas::start(rows.inner.db.clone(), REPLICAS, keeper);
                let _ = rows.inner.replicas.set(replicas);
            }
            _ => {
                let keeper = rows.clone();
                drop(tokio::spawn(async move { keeper.load_until_done().await }));
            }
        }
        rows
    }

    /// Leaves the replicas (the service is stopping): reads go to the
    /// database, and changes stop waiting for this replica at once.
    pub async fn leave(&self) {
        if let Some(replicas) = self.inner.replicas.get() {
            replicas.leave().await;
        }
    }

    /// Whether reads are served from memory.
    pub fn is_current(&self) -> bool {
        match self.inner.replicas.get() {
            Some(replicas) => replicas.serving(),
            None => self.inner.current.load(Ordering::Acquire),
        }
    }

    /// The row of `id`, from memory when the copy holds it.
    pub async fn get(&self, id: &str) -> Result<Option<Model>> {
        if self.is_current() && !self.is_pending(id) {
            let map = self.inner.map.read().unwrap_or_else(|p| p.into_inner());
            return Ok(match map.get(id) {
                Some(Slot::Row(row)) => Some((**row).clone()),
                Some(Slot::Deleted) | None => None,
            });
        }
        self.bounded(vault_config::Entity::find_by_id(id.to_string()).one(&self.inner.db)).await
    }

    /// Marks `id` as being changed by this replica, before its transaction
    /// starts. Pass the result to [`Rows::changed`] once it has committed;
    /// dropped without that (the change failed), the mark goes.
    pub fn changing(&self, id: &str) -> Changing {
        *self.pending().entry(id.to_string()).or_default() += 1;
        Changing { rows: self.clone(), id: id.to_string(), done: false, version: Default::default() }
    }

    /// Inside the change's transaction: announces it to the other replicas
    /// (PostgreSQL).
    pub async fn notify(&self, txn: &DatabaseTransaction, change: &Changing) -> Result<(), DbErr> {
        if txn.get_database_backend() == DbBackend::Postgres {
            let version = Replicas::announce(&REPLICAS, txn, &change.id).await?;
            change.version.store(version, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The change has committed: the copy is updated here, and on
    /// PostgreSQL this returns once every other replica has it too (else
    /// `DEADLINE_EXCEEDED` saying the change was saved).
    pub async fn changed(&self, mut change: Changing) -> Result<()> {
        // A failed re-read leaves the mark: this config keeps being read
        // from the database, which is always right.
        if self.refresh(&change.id).await.is_err() {
            change.done = true;
        }
        match self.inner.replicas.get() {
            Some(replicas) => replicas.wait_for_others(change.version.load(Ordering::SeqCst)).await,
            None => Ok(()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_pending(&self, id: &str) -> bool {
        self.pending().contains_key(id)
    }

    fn settled(&self, id: &str) {
        let mut pending = self.pending();
        if let Some(n) = pending.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                pending.remove(id);
            }
        }
    }

    async fn bounded<T>(&self, f: impl Future<Output = Result<T, DbErr>>) -> Result<T> {
        secrets_db::bounded(&self.inner.db, self.inner.timeout, async { f.await.map_err(Error::from) }, |_| None).await
    }

    /// Re-reads one row into the copy.
    async fn refresh(&self, id: &str) -> Result<()> {
        let _one = self.inner.reading.lock().await;
        let row = self.bounded(vault_config::Entity::find_by_id(id.to_string()).one(&self.inner.db)).await?;
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        match (map.get(id), row) {
            // Ids are never reused: a deleted config stays deleted.
            (Some(Slot::Deleted), _) => {}
            (_, Some(row)) => drop(map.insert(id.to_string(), Slot::Row(Box::new(row)))),
            (_, None) => drop(map.insert(id.to_string(), Slot::Deleted)),
        }
        Ok(())
    }

    /// Loads every row. Rows deleted meanwhile stay deleted.
    async fn load(&self) -> Result<()> {
        let _one = self.inner.reading.lock().await;
        let rows = self.bounded(vault_config::Entity::find().all(&self.inner.db)).await?;
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        let deleted: Vec<String> =
            map.iter().filter(|(_, s)| matches!(s, Slot::Deleted)).map(|(id, _)| id.clone()).collect();
        *map = rows.into_iter().map(|r| (r.id.clone(), Slot::Row(Box::new(r)))).collect();
        for id in deleted {
            map.insert(id, Slot::Deleted);
        }
        tracing::debug!(configs = map.len(), "vault configs loaded into memory");
        Ok(())
    }

    async fn load_until_done(&self) {
        let mut wait = Duration::from_millis(100);
        while let Err(e) = self.load().await {
            tracing::warn!(error = %e, "cannot load the vault configs into memory yet; reading them from the database");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        self.inner.current.store(true, Ordering::Release);
    }
}

/// Applies what other replicas announce: the changed row is read again.
struct Keeper(std::sync::Weak<Inner>);

impl Keeper {
    fn rows(&self) -> Result<Rows> {
        self.0.upgrade().map(|inner| Rows { inner }).ok_or_else(|| Error::Internal("the service is stopping".into()))
    }
}

impl secrets_db::replicas::Keeper for Keeper {
    fn reload(&self) -> BoxFuture<'_, Result<i64>> {
        Box::pin(async move {
            let rows = self.rows()?;
            let version = Replicas::version_in(&REPLICAS, &rows.inner.db).await?;
            rows.load().await?;
            Ok(version)
        })
    }

    fn apply<'a>(&'a self, _version: i64, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.rows()?.refresh(id).await })
    }
}
