//! Replicas of a service on one PostgreSQL (`secrets_db::replicas`): a
//! change returns only once every other replica has applied it or can no
//! longer answer from its copy.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use integration_tests::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use secrets_db::replicas::{BoxFuture, Keeper, Names, Replicas};

const NAMES: Names = Names {
    service: "test-service",
    counter: "test_changes",
    table: "test_replicas",
    channel: "test_changes",
    applied_channel: "test_applied",
};

/// A copy that only counts: the newest version it has applied, slowly or
/// never when told to.
struct Counting {
    db: DatabaseConnection,
    seen: AtomicI64,
    slow: AtomicBool,
    hung: AtomicBool,
}

impl Keeper for Counting {
    fn reload(&self) -> BoxFuture<'_, Result<i64, secrets_common::error::Error>> {
        Box::pin(async {
            let version = Replicas::version_in(&NAMES, &self.db).await?;
            Ok(self.seen.fetch_max(version, Ordering::SeqCst).max(version))
        })
    }

    fn apply<'a>(&'a self, version: i64, _what: &'a str) -> BoxFuture<'a, Result<(), secrets_common::error::Error>> {
        Box::pin(async move {
            if self.hung.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            self.seen.fetch_max(version, Ordering::SeqCst);
            Ok(())
        })
    }
}

impl Counting {
    fn new(db: &DatabaseConnection) -> Arc<Self> {
        Arc::new(Self {
            db: db.clone(),
            seen: AtomicI64::new(0),
            slow: AtomicBool::new(false),
            hung: AtomicBool::new(false),
        })
    }
}

/// A replica's own pool (the listener keeps one connection of it).
async fn pool(url: &str) -> DatabaseConnection {
    let mut options = sea_orm::ConnectOptions::new(url.to_string());
    options.max_connections(4).sqlx_logging(false);
    sea_orm::Database::connect(options).await.unwrap()
}

async fn schema(url: &str) -> DatabaseConnection {
    logs::init();
    let db = pool(url).await;
    db.execute_unprepared("CREATE TABLE test_changes (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)").await.unwrap();
    db.execute_unprepared("INSERT INTO test_changes VALUES (1, 1)").await.unwrap();
    db.execute_unprepared(&NAMES.create_table()).await.unwrap();
    db
}

/// One change, announced and committed; its version.
async fn change(db: &DatabaseConnection) -> i64 {
    let txn = db.begin().await.unwrap();
    let version = Replicas::announce(&NAMES, &txn, "one").await.unwrap();
    txn.commit().await.unwrap();
    version
}

async fn until_serving(replicas: &[&Replicas]) {
    for _ in 0..600 {
        if replicas.iter().all(|r| r.serving()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a replica never started serving: {}", logs::captured());
}

#[tokio::test]
async fn a_change_returns_once_every_other_replica_has_applied_it() {
    let Some(database) = postgres::fresh_database().await else { return };
    let db = schema(&database.url).await;
    let keepers: Vec<Arc<Counting>> = (0..3).map(|_| Counting::new(&db)).collect();
    let mut replicas = Vec::new();
    for keeper in &keepers {
        replicas.push(Replicas::start(pool(&database.url).await, NAMES, keeper.clone()));
    }
    until_serving(&replicas.iter().collect::<Vec<_>>()).await;
    // The others apply slowly: a writer that did not wait would see them behind.
    keepers[1].slow.store(true, Ordering::SeqCst);
    keepers[2].slow.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let version = change(&db).await;
        replicas[0].wait_for_others(version).await.unwrap();
        for (i, keeper) in keepers.iter().enumerate().skip(1) {
            assert!(keeper.seen.load(Ordering::SeqCst) >= version, "replica {i} had not applied {version}");
        }
    }
    for r in &replicas {
        r.stop();
    }
    database.drop_database().await;
}

/// A replica that stops applying holds a change only until its lease runs
/// out, and by then it no longer answers from its copy.
#[tokio::test]
async fn a_replica_that_stops_applying_holds_a_change_only_until_it_stops_serving() {
    let Some(database) = postgres::fresh_database().await else { return };
    let db = schema(&database.url).await;
    let (a, b) = (Counting::new(&db), Counting::new(&db));
    let ra = Replicas::start(pool(&database.url).await, NAMES, a.clone());
    let rb = Replicas::start(pool(&database.url).await, NAMES, b.clone());
    until_serving(&[&ra, &rb]).await;
    b.hung.store(true, Ordering::SeqCst);
    let version = change(&db).await;
    tokio::time::timeout(Duration::from_secs(60), ra.wait_for_others(version))
        .await
        .expect("the change was held past every bound")
        .unwrap();
    assert!(b.seen.load(Ordering::SeqCst) < version, "B never applied it");
    assert!(!rb.serving(), "the change returned while B could still answer from before it");
    ra.stop();
    rb.stop();
    database.drop_database().await;
}
