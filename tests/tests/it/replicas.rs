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

/// A replica that leaves cleanly (shutting down, as in a rolling upgrade)
/// stops answering from its copy at once and removes its row: a change
/// never waits for it, even if it would never apply the change.
#[tokio::test]
async fn a_replica_that_leaves_stops_answering_from_its_copy_and_holds_no_change() {
    let Some(database) = postgres::fresh_database().await else { return };
    let db = schema(&database.url).await;
    let (a, b) = (Counting::new(&db), Counting::new(&db));
    let ra = Replicas::start(pool(&database.url).await, NAMES, a.clone());
    let rb = Replicas::start(pool(&database.url).await, NAMES, b.clone());
    until_serving(&[&ra, &rb]).await;
    let rows = |db: DatabaseConnection| async move {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("SELECT count(*) AS n FROM {}", NAMES.table),
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    };
    assert_eq!(rows(db.clone()).await, 2);
    b.hung.store(true, Ordering::SeqCst);
    rb.leave().await;
    assert!(!rb.serving(), "a replica that left answers from its copy no more");
    assert_eq!(rows(db.clone()).await, 1, "its row is gone");
    // Its renewer is stopped too: the row stays gone past a renewal.
    tokio::time::sleep(secrets_db::replicas::RENEW * 3).await;
    assert_eq!(rows(db.clone()).await, 1, "no renewal brought it back");
    let version = change(&db).await;
    let confirmed = ra.wait_for_others(version).await;
    assert!(confirmed.is_ok(), "{confirmed:?}");
    assert!(b.seen.load(Ordering::SeqCst) < version, "B never applied it, and nothing waited for B");
    ra.stop();
    database.drop_database().await;
}

/// What a secret-service replica answers the gateway for `key` in `domain`
/// (the internal read every resolve makes): `None` when it is not there.
async fn read_on(app: &TestApp, port: u16, domain: &str, key: &str) -> Option<Vec<u8>> {
    use secrecy::ExposeSecret;
    use secrets_proto::internal::v1::{self as internal, secret_reader_client::SecretReaderClient};
    let mut reader = SecretReaderClient::new(channel(&format!("http://127.0.0.1:{port}")));
    let mut request = tonic::Request::new(internal::ReadSecretsRequest {
        lookups: vec![internal::SecretLookup {
            scope: secrets_proto::v1::Scope::Domain as i32,
            domain: domain.into(),
            key: key.into(),
            global_fallback: false,
        }],
        max_value_bytes: 0,
        presence_only: false,
    });
    let bearer = format!("Bearer {}", app.internal_token.expose_secret());
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    let found = reader.read_secrets(request).await.expect("read through the replica").into_inner();
    found.results.into_iter().next().filter(|r| r.found).map(|r| r.value)
}

/// Two secret-service replicas on one Kubernetes namespace and one
/// PostgreSQL, each answering from its own watched copy: a create, update
/// or delete through one returns only once the other answers with it, even
/// while the other's watch delivers nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn on_kubernetes_a_write_through_one_secret_service_replica_is_read_through_another_at_once() {
    let Some(db) = postgres::fresh_database().await else { return };
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options {
        database_url: Some(db.url.clone()),
        kubernetes_api: Some(kube.url.clone()),
        ..Default::default()
    })
    .await;
    app.setup_domain("finance").await;
    let other = app.another_secret_replica().await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "db_password", "first").await.unwrap();
    // The other replica is up and has loaded its copy.
    let mut seen = None;
    for _ in 0..200 {
        seen = read_on(&app, other.port, "finance", "db_password").await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.as_deref(), Some(&b"first"[..]));
    // Served from its copy: reads cost the API server nothing. A replica
    // that is not sure its copy is current (a busy machine delays its
    // watch and its leases) reads through instead, so the claim is that
    // some batch of reads costs nothing, not that every one does.
    let mut costs = Vec::new();
    for _ in 0..20 {
        let gets = kube.counters().gets;
        for _ in 0..5 {
            assert_eq!(read_on(&app, other.port, "finance", "db_password").await.as_deref(), Some(&b"first"[..]));
        }
        costs.push(kube.counters().gets - gets);
        if costs.last() == Some(&0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(costs.last(), Some(&0), "the replica answers from its watched copy: GETs per 5 reads {costs:?}");

    // From now on no watch delivers anything: only the replicas' own
    // coordination can bring the other replica's copy forward.
    kube.hold_events(true);
    for round in 0..5 {
        let value = format!("rotated-{round}");
        owner.update("finance", "db_password", &value).await.unwrap();
        assert_eq!(
            read_on(&app, other.port, "finance", "db_password").await.as_deref(),
            Some(value.as_bytes()),
            "round {round}: the other replica answers with the update that returned"
        );
    }
    owner.create("finance", "api_key", "created").await.unwrap();
    assert_eq!(read_on(&app, other.port, "finance", "api_key").await.as_deref(), Some(&b"created"[..]));
    owner.delete("finance", "api_key").await.unwrap();
    assert_eq!(read_on(&app, other.port, "finance", "api_key").await, None, "a delete that returned counts");
    kube.hold_events(false);
    other.stop().await;
    db.drop_database().await;
}

/// A secret-service replica cut off from the replicas' database stops
/// answering from its copy once its lease runs out, and reads the API
/// server instead: a write through another replica waits for that, at most
/// the documented bound, and is then read through the cut-off one.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_service_replica_cut_off_from_the_database_reads_the_api_server_once_its_lease_ends() {
    let Some(db) = postgres::fresh_database().await else { return };
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options {
        database_url: Some(db.url.clone()),
        kubernetes_api: Some(kube.url.clone()),
        // Past the longest a write can wait for a replica that is cut off.
        request_timeout_ms: Some(15_000),
        ..Default::default()
    })
    .await;
    app.setup_domain("finance").await;
    let link = proxy::FreezableProxy::start(db.server_addr()).await;
    let other = app.another_secret_replica_with(|c| c.replicas.database_url = Some(db.url_via(link.port))).await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "db_password", "first").await.unwrap();
    for _ in 0..200 {
        if read_on(&app, other.port, "finance", "db_password").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kube.hold_events(true);
    link.freeze();
    let started = std::time::Instant::now();
    owner.update("finance", "db_password", "while-cut-off").await.unwrap();
    let held = started.elapsed();
    assert!(
        held < secrets_db::replicas::MAX_WAIT + Duration::from_secs(5),
        "the write waited for the cut-off replica at most the bound: {held:?}"
    );
    let gets = kube.counters().gets;
    assert_eq!(
        read_on(&app, other.port, "finance", "db_password").await.as_deref(),
        Some(&b"while-cut-off"[..]),
        "the cut-off replica no longer answers from its copy"
    );
    assert!(kube.counters().gets > gets, "it read the API server");
    link.thaw();
    kube.hold_events(false);
    other.stop().await;
    db.drop_database().await;
}

/// The value a resolved item carries.
fn value(items: &[secrets_proto::v1::ResolvedItem]) -> Vec<u8> {
    match &items[0].result {
        Some(secrets_proto::v1::resolved_item::Result::Value(v)) => v.clone(),
        other => panic!("not a value: {other:?}"),
    }
}

/// The item's value, or the error it was answered with.
fn item_outcome(
    answer: Result<Vec<secrets_proto::v1::ResolvedItem>, tonic::Status>,
) -> Result<Vec<u8>, tonic_types::pb::Status> {
    let items = answer.expect("the resolve call");
    match &items[0].result {
        Some(secrets_proto::v1::resolved_item::Result::Value(v)) => Ok(v.clone()),
        Some(secrets_proto::v1::resolved_item::Result::Error(e)) => Err(e.clone()),
        other => panic!("neither value nor error: {other:?}"),
    }
}

/// ReadSecrets calls a secret-service replica has answered.
async fn reads_served(metrics_url: &str) -> f64 {
    let series = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.internal.v1.SecretReader",rpc_method="ReadSecrets",grpc_code="OK"}"#;
    sample(&http_get(metrics_url).await.1, series)
}

/// A gateway given several secret-service addresses (a headless Service's
/// name gives one per ready pod; here a list) spreads
/// its resolves over all of them; when one replica dies under load, only
/// calls that were on it fail, and each one's retry succeeds on another.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_spreads_resolves_over_every_secret_service_replica_and_a_retry_outlives_one_dying() {
    let mut app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db_password", "spread").await.unwrap();
    let other = app.another_secret_replica().await;
    let first = app.secret_service_url.rsplit(':').next().unwrap().to_string();
    let gateway = app
        .another_gateway_with(|c| {
            c.secret_service_url = format!("http://127.0.0.1:{first},http://127.0.0.1:{}", other.port);
        })
        .await;
    let clients = Clients::new(
        &format!("http://127.0.0.1:{}", gateway.port),
        Some(app.token(SPARK)),
        Some(&format!("user:{OWNER}")),
    );
    let item = || vec![object_item("db", "finance", "db_password")];
    let before = (reads_served(&app.metrics_url("secret-service")).await, reads_served(&other.metrics_url).await);
    for _ in 0..60 {
        let resolved = clients.resolve("finance", item()).await.expect("resolve");
        assert_eq!(value(&resolved), b"spread");
    }
    let after = (reads_served(&app.metrics_url("secret-service")).await, reads_served(&other.metrics_url).await);
    let (on_first, on_other) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(on_first + on_other, 60.0, "every resolve read once");
    assert!(on_first >= 5.0 && on_other >= 5.0, "both replicas took load: {on_first} and {on_other}");

    // One replica dies while resolves run: a call fails only if it was on
    // it, and its retry lands on the other.
    let load = {
        let clients = clients.clone();
        tokio::spawn(async move {
            let (mut failed, mut retried) = (0, 0);
            for _ in 0..200 {
                // A source that fails answers its items with their own
                // error (the call itself succeeds).
                match item_outcome(clients.resolve("finance", item()).await) {
                    Ok(v) => assert_eq!(v, b"spread"),
                    Err(status) => {
                        assert_eq!(status.code, tonic::Code::Unavailable as i32, "{status:?}");
                        failed += 1;
                        let again = item_outcome(clients.resolve("finance", item()).await);
                        assert_eq!(again.expect("the retry succeeds on another replica"), b"spread");
                        retried += 1;
                    }
                }
            }
            (failed, retried)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.stop_secret_service().await;
    let (failed, retried) = load.await.unwrap();
    assert_eq!(failed, retried);
    assert!(failed <= 4, "only calls on the dead replica failed, then it was left out: {failed}");
    other.stop().await;
    gateway.stop().await;
}
