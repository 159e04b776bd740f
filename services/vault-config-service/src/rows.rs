//! The configs' rows in memory, so that a resolve reads no database.
//!
//! Loaded at start. On SQLite (one process) this service's own writes keep
//! the copy current. On PostgreSQL every write sends `NOTIFY
//! secrets_vault_configs` in its transaction, and each replica's listener
//! re-reads the row it names, so a change through any replica reaches the
//! others as soon as it commits; when the listener loses its connection the
//! copy is reloaded whole once it is back.
//!
//! Reads go to the database instead while the copy may be behind: before
//! the first load, while the listener is reconnecting, and for a config this
//! replica is changing until its own change has come back through the
//! listener (so a write that returned is seen by the next read here).

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait, Statement};

use crate::{
    Error, Result,
    db::vault_config::{self, Model},
};

/// The PostgreSQL channel every replica listens on; the payload is
/// `<config id> <replica id>`.
pub const CHANNEL: &str = "secrets_vault_configs";

#[derive(Clone)]
pub struct Rows {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    timeout: Duration,
    /// Names this process in its notifications.
    replica: String,
    map: RwLock<HashMap<String, Slot>>,
    /// The copy holds every committed change (false before the first load
    /// and while the listener is away).
    current: AtomicBool,
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
                replica: uuid::Uuid::new_v4().to_string(),
                map: RwLock::default(),
                current: AtomicBool::new(false),
                pending: Default::default(),
            }),
        };
        let keeper = rows.clone();
        match rows.inner.db.get_database_backend() {
            DbBackend::Postgres => drop(tokio::spawn(async move { keeper.listen().await })),
            _ => drop(tokio::spawn(async move { keeper.load_until_done().await })),
        }
        rows
    }

    /// Whether reads are served from memory.
    pub fn is_current(&self) -> bool {
        self.inner.current.load(Ordering::Acquire)
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
        Changing { rows: self.clone(), id: id.to_string(), done: false }
    }

    /// Inside the change's transaction: tells the other replicas (PostgreSQL).
    pub async fn notify(&self, txn: &DatabaseTransaction, id: &str) -> Result<(), DbErr> {
        if txn.get_database_backend() == DbBackend::Postgres {
            let payload = format!("{id} {}", self.inner.replica);
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [CHANNEL.into(), payload.into()],
            ))
            .await?;
        }
        Ok(())
    }

    /// The change has committed. SQLite: the copy is updated here.
    /// PostgreSQL: the listener updates it when the change's notification
    /// comes back, and only then is the config read from memory again.
    pub async fn changed(&self, mut change: Changing) {
        if self.inner.db.get_database_backend() != DbBackend::Postgres {
            // A failed re-read leaves the mark: this config keeps being
            // read from the database, which is always right.
            if self.refresh(&change.id).await.is_err() {
                change.done = true;
            }
        } else {
            change.done = true;
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
        let row = self.bounded(vault_config::Entity::find_by_id(id.to_string()).one(&self.inner.db)).await?;
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        match (map.get(id), row) {
            (Some(Slot::Deleted), _) => {}
            // Never older than what is there: updates move updated_at on.
            (Some(Slot::Row(held)), Some(row)) if row.updated_at < held.updated_at => {}
            (_, Some(row)) => drop(map.insert(id.to_string(), Slot::Row(Box::new(row)))),
            (_, None) => drop(map.insert(id.to_string(), Slot::Deleted)),
        }
        Ok(())
    }

    /// Loads every row. Rows deleted meanwhile stay deleted.
    async fn load(&self) -> Result<()> {
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

    /// PostgreSQL: listen first, then load, so that no change committed
    /// after the load goes unseen; then apply every notification.
    async fn listen(&self) {
        use sea_orm::sqlx::postgres::PgListener;
        let mut wait = Duration::from_millis(100);
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(self.inner.db.get_postgres_connection_pool()).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sea_orm::sqlx::Error>(listener)
            };
            let mut listener = match listening.await {
                Ok(l) => l,
                // The service is stopping.
                Err(sea_orm::sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for vault config changes; reading them from the database");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            wait = Duration::from_millis(100);
            // Lost notifications are found by loading everything again;
            // with eager reconnection the listener is back before that.
            loop {
                self.load_until_done().await;
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => self.apply(n.payload()).await,
                        Ok(None) => {
                            tracing::warn!("lost the vault config change listener's connection; reloading");
                            self.inner.current.store(false, Ordering::Release);
                            break;
                        }
                        Err(sea_orm::sqlx::Error::PoolClosed) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "the vault config change listener failed; reconnecting");
                            self.inner.current.store(false, Ordering::Release);
                            break;
                        }
                    }
                }
                if listener.listen(CHANNEL).await.is_err() {
                    break;
                }
            }
        }
    }

    /// One notification: re-read the row, then, when it was this replica's
    /// change, read it from memory again.
    async fn apply(&self, payload: &str) {
        let (id, replica) = payload.split_once(' ').unwrap_or((payload, ""));
        if let Err(e) = self.refresh(id).await {
            // Read from the database until the copy is whole again.
            tracing::warn!(error = %e, "cannot re-read a changed vault config; reloading");
            self.inner.current.store(false, Ordering::Release);
            self.load_until_done().await;
        }
        if replica == self.inner.replica {
            self.settled(id);
        }
    }
}
