//! Replicas of one service on one PostgreSQL database, each holding a copy
//! of shared rows in memory: a change made through any replica returns
//! only once every other replica has applied it, or has surely stopped
//! answering from its copy.
//!
//! Every change bumps a counter row (`<counter>.version`, id 1) and sends
//! `NOTIFY <channel>, '<version> <what changed>'` in its transaction. Each
//! replica listens, applies the changes in commit order and records the
//! newest version it has applied in its row of `<table>`, together with a
//! lease (`lease_until`, the database's clock) that it renews every
//! [`RENEW`] for [`LEASE`]. A writer, once committed, waits until every
//! other replica whose lease has not run out has applied its version
//! ([`Replicas::wait_for_others`]).
//!
//! A replica answers from its copy only while it is [`serving`]: its
//! listener is up and it has loaded since, and its lease holds by its own
//! clock (measured from before it sent the renewal, so it ends no later
//! than the row says). A replica that loses the database, or stops
//! applying (one that has not applied, within [`CATCH_UP`], a version the
//! counter showed it), stops renewing: within [`LEASE`] writers stop
//! waiting for it and it stops answering from memory. After a lapse it
//! answers from memory again only once it has applied everything committed
//! before its lease came back. So a waiting writer is held at most
//! `CATCH_UP + RENEW + LEASE`, and never returns while a replica can still
//! answer from before its change.
//!
//! [`serving`]: Replicas::serving

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement,
    sqlx::postgres::{PgListener, PgNotification},
};
use secrets_common::error::Error;

/// Begins every statement of the replicas' own bookkeeping, so that the
/// statement metrics count it apart (`operation="replicas"`).
pub const MARKER: &str = "/*replicas*/";

/// A boxed future, as the keepers return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long a renewal keeps a replica's lease.
pub const LEASE: Duration = Duration::from_millis(3_000);
/// How often a replica renews its lease.
pub const RENEW: Duration = Duration::from_millis(500);
/// How long a replica may take to apply a version the counter showed it
/// before it stops renewing its lease.
pub const CATCH_UP: Duration = Duration::from_millis(4_000);
/// The longest a writer can be held by replicas that do not apply its
/// change, with a margin for the statements themselves.
pub const MAX_WAIT: Duration =
    Duration::from_millis(CATCH_UP.as_millis() as u64 + RENEW.as_millis() as u64 + LEASE.as_millis() as u64 + 2_000);

/// The names one service's replicas share.
#[derive(Clone, Copy, Debug)]
pub struct Names {
    /// The service, in log lines and errors.
    pub service: &'static str,
    /// The counter table: one row (`id` 1) with a BIGINT `version`.
    pub counter: &'static str,
    /// The replicas' table; see [`Names::create_table`].
    pub table: &'static str,
    /// The channel changes are announced on.
    pub channel: &'static str,
    /// The channel replicas announce what they applied on.
    pub applied_channel: &'static str,
}

impl Names {
    /// The statement that creates the replicas' table (in a migration).
    pub fn create_table(&self) -> String {
        format!(
            "CREATE TABLE {} (replica TEXT PRIMARY KEY, applied BIGINT NOT NULL, lease_until TIMESTAMPTZ NOT NULL)",
            self.table
        )
    }
}

/// Applies changes to a replica's copy.
pub trait Keeper: Send + Sync + 'static {
    /// Loads the whole copy; returns a version it holds at least.
    fn reload(&self) -> BoxFuture<'_, Result<i64, Error>>;
    /// Applies one announced change: `what` is the payload after its
    /// version. Returning an error reloads the whole copy.
    fn apply<'a>(&'a self, version: i64, what: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    /// After the changes that arrived together were applied, before they
    /// are confirmed to writers: whatever must hold before then.
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    names: Names,
    replica: String,
    keeper: Arc<dyn Keeper>,
    /// The newest version applied here.
    applied: AtomicI64,
    /// The listener is up and the copy was loaded since.
    current: AtomicBool,
    lease: Mutex<Lease>,
    /// Replicas announced what they applied: waiting writers look again.
    acks: tokio::sync::Notify,
    /// Something was applied: renew (and announce it) now.
    to_ack: tokio::sync::Notify,
    /// The copy fell behind for too long: listen and load again.
    restart: tokio::sync::Notify,
    stopped: AtomicBool,
    /// Held while a renewal is being written: a replica that leaves waits
    /// for it, so no renewal brings its row back.
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Lease {
    /// When this replica's lease surely ends, by its own clock.
    until: Option<Instant>,
    /// After a lapse: the version to apply before answering from memory.
    must_reach: i64,
    /// A version a renewal showed and not applied yet, and since when.
    behind: Option<(i64, Instant)>,
}

impl Replicas {
    /// Starts keeping `keeper`'s copy current as this replica: listens,
    /// loads, registers and renews, all in the background. Until that is
    /// done the replica is not [`Replicas::serving`].
    pub fn start(db: DatabaseConnection, names: Names, keeper: Arc<dyn Keeper>) -> Self {
        let replicas = Self {
            inner: Arc::new(Inner {
                db,
                names,
                replica: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
                keeper,
                applied: AtomicI64::new(0),
                current: AtomicBool::new(false),
                lease: Mutex::default(),
                acks: tokio::sync::Notify::new(),
                to_ack: tokio::sync::Notify::new(),
                restart: tokio::sync::Notify::new(),
                stopped: AtomicBool::new(false),
                renewing: tokio::sync::Mutex::new(()),
            }),
        };
        let listener = replicas.clone();
        tokio::spawn(async move { listener.listen().await });
        let renewer = replicas.clone();
        tokio::spawn(async move { renewer.renew_forever().await });
        replicas
    }

    /// Stops listening and renewing; the lease runs out on its own.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.restart.notify_one();
        self.inner.to_ack.notify_one();
    }

    /// Stops, no longer answers from its copy, and removes its row: writers
    /// stop waiting for it now rather than when its lease would have run
    /// out (a replica shutting down cleanly, as in a rolling upgrade).
    pub async fn leave(&self) {
        self.stop();
        let _renewal = self.inner.renewing.lock().await;
        let names = &self.inner.names;
        let removed = self
            .inner
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!("{MARKER} DELETE FROM {} WHERE replica = $1", names.table),
                [self.inner.replica.clone().into()],
            ))
            .await;
        match removed {
            Ok(_) => tracing::info!(service = names.service, "left the replicas"),
            Err(e) => {
                tracing::warn!(service = names.service, error = %e, "cannot remove this replica's row; its lease runs out on its own")
            }
        }
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.inner.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this replica may answer from its copy now.
    pub fn serving(&self) -> bool {
        self.serving_for().is_some()
    }

    /// How much longer this replica's lease surely holds, while it may
    /// answer from its copy.
    pub fn serving_for(&self) -> Option<Duration> {
        if self.inner.stopped.load(Ordering::SeqCst) || !self.inner.current.load(Ordering::SeqCst) {
            return None;
        }
        let lease = self.lease();
        let left = lease.until?.checked_duration_since(Instant::now())?;
        (self.inner.applied.load(Ordering::SeqCst) >= lease.must_reach).then_some(left)
    }

    /// The newest version applied here.
    pub fn applied(&self) -> i64 {
        self.inner.applied.load(Ordering::SeqCst)
    }

    /// The counter's version now.
    pub async fn version(&self) -> Result<i64, DbErr> {
        read_version(&self.inner.db, &self.inner.names).await
    }

    /// The counter's version as `db` (a transaction) sees it.
    pub async fn version_in(names: &Names, db: &impl ConnectionTrait) -> Result<i64, DbErr> {
        read_version(db, names).await
    }

    /// Inside a change's transaction: bumps the counter and announces
    /// `what` to every replica (sent when the transaction commits).
    /// Returns the change's version.
    pub async fn announce(names: &Names, txn: &impl ConnectionTrait, what: &str) -> Result<i64, DbErr> {
        let row = txn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("{MARKER} UPDATE {} SET version = version + 1 WHERE id = 1 RETURNING version", names.counter),
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("the {} row", names.counter)))?;
        let version: i64 = row.try_get("", "version")?;
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("{MARKER} SELECT pg_notify($1, $2)"),
            [names.channel.into(), format!("{version} {what}").into()],
        ))
        .await?;
        Ok(version)
    }

    /// After a change of `version` committed: returns once every other
    /// replica has applied it or can no longer answer from its copy.
    pub async fn wait_for_others(&self, version: i64) -> Result<(), Error> {
        let started = Instant::now();
        let names = &self.inner.names;
        let query = format!(
            "{MARKER} SELECT count(*) AS behind, \
             COALESCE(EXTRACT(EPOCH FROM max(lease_until) - now()) * 1000, 0)::BIGINT AS left_ms \
             FROM {} WHERE replica <> $1 AND applied < $2 AND lease_until > now()",
            names.table
        );
        let unconfirmed = |why: String| {
            Error::Upstream(tonic::Status::deadline_exceeded(format!(
                "{}: the change was saved, but {why}: other replicas may answer from before it for up to {} ms more; \
                 sending it again is safe",
                names.service,
                LEASE.as_millis()
            )))
        };
        loop {
            let acked = self.inner.acks.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let row = self
                .inner
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    &query,
                    [self.inner.replica.clone().into(), version.into()],
                ))
                .await;
            let wait = match row {
                Ok(Some(row)) => {
                    let behind: i64 = row.try_get("", "behind").map_err(|e| Error::Internal(e.to_string()))?;
                    if behind == 0 {
                        return Ok(());
                    }
                    if started.elapsed() > MAX_WAIT {
                        return Err(unconfirmed(format!(
                            "{behind} other replica(s) had not confirmed it after {} ms",
                            MAX_WAIT.as_millis()
                        )));
                    }
                    let left_ms: i64 = row.try_get("", "left_ms").map_err(|e| Error::Internal(e.to_string()))?;
                    Duration::from_millis(left_ms.clamp(1, 100) as u64)
                }
                // A database that does not answer now may answer in a
                // moment: try again until the bound.
                Ok(None) | Err(_) if started.elapsed() <= MAX_WAIT => Duration::from_millis(100),
                Ok(None) => return Err(Error::Internal("count(*) returned no row".into())),
                Err(e) => {
                    return Err(unconfirmed(format!("the replicas could not be asked whether they have it: {e}")));
                }
            };
            tokio::select! {
                () = acked => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Listens, loads, applies every change; again after any failure.
    async fn listen(&self) {
        let names = self.inner.names;
        let mut wait = Duration::from_millis(100);
        while !self.inner.stopped.load(Ordering::SeqCst) {
            self.inner.current.store(false, Ordering::SeqCst);
            let listening = async {
                let mut listener = PgListener::connect_with(self.inner.db.get_postgres_connection_pool()).await?;
                listener.listen_all([names.channel, names.applied_channel]).await?;
                Ok::<_, sea_orm::sqlx::Error>(listener)
            };
            let mut listener = match listening.await {
                Ok(l) => l,
                Err(sea_orm::sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(service = names.service, error = %e, "cannot listen for changes; answering from the database");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            wait = Duration::from_millis(100);
            // Listening first, then loading: no change committed after the
            // load goes unseen.
            match self.inner.keeper.reload().await {
                Ok(version) => {
                    self.inner.applied.fetch_max(version, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!(service = names.service, error = %e, "cannot load the copy; answering from the database");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            self.inner.current.store(true, Ordering::SeqCst);
            self.inner.to_ack.notify_one();
            loop {
                let notification = tokio::select! {
                    n = listener.try_recv() => n,
                    () = self.inner.restart.notified() => break,
                };
                match notification {
                    Ok(Some(n)) => {
                        // The notifications that arrived together (one
                        // transaction's, a burst's) are applied, settled
                        // and confirmed together.
                        let mut batch = vec![n];
                        while let Some(n) = listener.next_buffered() {
                            batch.push(n);
                        }
                        if !self.received(&batch).await {
                            break;
                        }
                    }
                    Ok(None) => {
                        tracing::warn!(service = names.service, "lost the change listener's connection; loading again");
                        break;
                    }
                    Err(sea_orm::sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        tracing::warn!(service = names.service, error = %e, "the change listener failed; listening again");
                        break;
                    }
                }
            }
        }
        self.inner.current.store(false, Ordering::SeqCst);
    }

    /// Notifications that arrived together; `false` when the copy must be
    /// loaded again.
    async fn received(&self, batch: &[PgNotification]) -> bool {
        let service = self.inner.names.service;
        let mut newest = None;
        for n in batch {
            if n.channel() == self.inner.names.applied_channel {
                self.inner.acks.notify_waiters();
                continue;
            }
            let (version, what) = n.payload().split_once(' ').unwrap_or((n.payload(), ""));
            let Ok(version) = version.parse::<i64>() else {
                tracing::warn!(service, "a change notification without a version; loading again");
                return false;
            };
            if let Err(e) = self.inner.keeper.apply(version, what).await {
                tracing::warn!(service, error = %e, "cannot apply a change; loading again");
                return false;
            }
            newest = newest.max(Some(version));
        }
        if let Some(version) = newest {
            self.inner.keeper.settle().await;
            self.inner.applied.fetch_max(version, Ordering::SeqCst);
            self.inner.to_ack.notify_one();
        }
        true
    }

    /// Renews every [`RENEW`], and at once after something was applied.
    async fn renew_forever(&self) {
        let mut announced = 0;
        let (mut renewals, mut prune_at) = (0u64, 0u64);
        while !self.inner.stopped.load(Ordering::SeqCst) {
            // About every two minutes: the rows of replicas long gone
            // (killed, never left cleanly) are removed.
            if renewals >= prune_at {
                prune_at = renewals + 240;
                let pruned = self
                    .inner
                    .db
                    .execute_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!(
                            "{MARKER} DELETE FROM {} WHERE lease_until < now() - interval '1 hour'",
                            self.inner.names.table
                        ),
                    ))
                    .await;
                if let Err(e) = pruned {
                    tracing::debug!(service = self.inner.names.service, error = %e, "cannot remove old replica rows");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RENEW) => renewals += 1,
                () = self.inner.to_ack.notified() => {}
            }
            if self.inner.stopped.load(Ordering::SeqCst) || !self.inner.current.load(Ordering::SeqCst) {
                continue;
            }
            match self.renew(&mut announced).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(service = self.inner.names.service, error = %e, "cannot renew this replica's lease")
                }
            }
        }
    }

    async fn renew(&self, announced: &mut i64) -> Result<(), DbErr> {
        let _renewal = self.inner.renewing.lock().await;
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        let names = &self.inner.names;
        let applied = self.inner.applied.load(Ordering::SeqCst);
        let sent = Instant::now();
        // A replica that has not applied, in time, a version a renewal
        // showed it is stuck: it stops renewing and loads again.
        let extend = {
            let mut lease = self.lease();
            match lease.behind {
                Some((v, _)) if applied >= v => {
                    lease.behind = None;
                    true
                }
                Some((_, since)) if since.elapsed() > CATCH_UP => false,
                _ => true,
            }
        };
        if !extend {
            tracing::warn!(service = names.service, "this replica fell behind the changes; loading its copy again");
            self.lease().behind = None;
            self.inner.current.store(false, Ordering::SeqCst);
            self.inner.restart.notify_one();
            return Ok(());
        }
        let row = self
            .inner
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "{MARKER} WITH renewed AS (INSERT INTO {table} (replica, applied, lease_until) \
                     VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
                     ON CONFLICT (replica) DO UPDATE SET applied = GREATEST({table}.applied, EXCLUDED.applied), \
                     lease_until = EXCLUDED.lease_until RETURNING 1) \
                     SELECT (SELECT version FROM {counter} WHERE id = 1) AS version FROM renewed",
                    table = names.table,
                    counter = names.counter
                ),
                [self.inner.replica.clone().into(), applied.into(), (LEASE.as_millis() as i64).into()],
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("the {} row", names.counter)))?;
        let version: i64 = row.try_get("", "version")?;
        // Lapsed if the lease may have run out before this renewal reached
        // the database: decided now that the answer is here (the local
        // bound is never later than the row's). A writer may then have
        // passed this replica by, so it must first apply everything
        // committed before the renewal: the counter read after it.
        let lapsed = self.lease().until.is_none_or(|until| until <= Instant::now());
        let must_reach = if lapsed { Some(read_version(&self.inner.db, names).await?) } else { None };
        {
            let mut lease = self.lease();
            if let Some(must_reach) = must_reach {
                lease.must_reach = must_reach;
            }
            lease.until = Some(sent + LEASE);
            if applied < version && lease.behind.is_none() {
                lease.behind = Some((version, sent));
            }
        }
        if applied > *announced {
            *announced = applied;
            self.inner
                .db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!("{MARKER} SELECT pg_notify($1, '')"),
                    [names.applied_channel.into()],
                ))
                .await?;
        }
        Ok(())
    }
}

async fn read_version(db: &impl ConnectionTrait, names: &Names) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT version FROM {} WHERE id = 1", names.counter),
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("the {} row", names.counter)))?;
    row.try_get("", "version")
}

/// The migration that creates one service's counter row and replicas'
/// table on PostgreSQL (on SQLite, where one process holds the database,
/// it does nothing).
pub struct Migration {
    /// The migration's name in the service's migrations table.
    pub name: &'static str,
    pub names: Names,
}

impl sea_orm_migration::MigrationName for Migration {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for Migration {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        let names = self.names;
        db.execute_unprepared(&format!(
            "CREATE TABLE {} (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)",
            names.counter
        ))
        .await?;
        db.execute_unprepared(&format!("INSERT INTO {} (id, version) VALUES (1, 1)", names.counter)).await?;
        db.execute_unprepared(&names.create_table()).await?;
        Ok(())
    }

    async fn down(&self, _manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration("the replicas tables are not removed by a down migration".into()))
    }
}
