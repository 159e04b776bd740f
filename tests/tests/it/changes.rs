//! The change feed: every API change recorded with its reach (the saved
//! workloads that reference the secret), UpdateSecret and DeleteSecret
//! answering with it, WatchSecretChanges resuming from a cursor with
//! nothing missed (across a subscriber killed at random points, a gateway
//! and an authz-service restart), "resync required" past the retention,
//! per-workload coalescing, and who may watch what.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::{
    payloads::{map, object, text},
    *,
};
use secrets_proto::v1::{self as pb, watch_secret_changes_response::Event, workload_payload::Kind};
use tonic::{Code, Streaming};

/// Generous: the machine may be busy.
const WAIT: Duration = Duration::from_secs(30);

fn spark_job(id: &str, env: &[(&str, pb::ConfigValue)]) -> pb::SaveWorkloadRequest {
    pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: id.into(),
        name: format!("job {id}"),
        payload: Some(pb::WorkloadPayload {
            kind: Some(Kind::SparkJob(pb::SparkJobPayload {
                template: Some(pb::EnvAndConf { env_vars: map(env), spark_conf: Default::default() }),
            })),
        }),
        validate_only: false,
    }
}

async fn save(app: &TestApp, request: pb::SaveWorkloadRequest) {
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let saved = spark.gateway.clone().save_workload(request).await.expect("save").into_inner();
    assert!(saved.saved, "{:?}", saved.problems);
}

fn request(after: u64) -> pb::WatchSecretChangesRequest {
    pb::WatchSecretChangesRequest { after_revision: after, ..Default::default() }
}

async fn watch(clients: &Clients, request: pb::WatchSecretChangesRequest) -> Streaming<pb::WatchSecretChangesResponse> {
    clients.gateway.clone().watch_secret_changes(request).await.expect("watch").into_inner()
}

async fn next(stream: &mut Streaming<pb::WatchSecretChangesResponse>) -> pb::WatchSecretChangesResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message within the bound")
        .expect("the stream failed")
        .expect("the stream ended")
}

/// The next change, skipping caught-up markers.
async fn next_change(stream: &mut Streaming<pb::WatchSecretChangesResponse>) -> (u64, pb::SecretChange) {
    loop {
        let m = next(stream).await;
        match m.event {
            Some(Event::Change(c)) => return (m.cursor, c),
            Some(Event::CaughtUp(_)) => continue,
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

fn ids(reach: &pb::SecretReach) -> BTreeSet<String> {
    reach.workloads.iter().map(|w| w.id.clone()).collect()
}

async fn finance(app: &TestApp) {
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "db_password", "pw-1").await.unwrap();
    owner.create("finance", "other_key", "o-1").await.unwrap();
    save(app, spark_job("etl", &[("DB", object("finance", "db_password"))])).await;
    save(app, spark_job("legacy", &[("URL", text("jdbc://u:${secrets.db_password}@db"))])).await;
    save(app, spark_job("unrelated", &[("X", object("finance", "other_key"))])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_answer_with_their_reach_and_a_watcher_sees_each_in_order() {
    let app = TestApp::spawn().await;
    finance(&app).await;
    let platform = app.as_service(None);
    let mut stream = watch(&platform, request(0)).await;
    let first = next(&mut stream).await;
    assert_eq!(first.event, Some(Event::CaughtUp(true)), "a new watcher is told where the feed stands");

    let owner = app.as_user(OWNER);
    let updated = owner.update("finance", "db_password", "pw-2").await.unwrap();
    let reach = updated.reach.expect("UpdateSecret answers with its reach");
    assert_eq!(ids(&reach), BTreeSet::from(["etl".to_string(), "legacy".to_string()]), "placeholders included");
    assert_eq!(reach.total, 2);
    assert!(reach.revision > first.cursor);

    let (cursor, change) = next_change(&mut stream).await;
    assert_eq!(cursor, reach.revision);
    assert_eq!(change.revision, reach.revision);
    assert_eq!(change.kind, pb::SecretChangeKind::SecretUpdated as i32);
    assert_eq!(change.origin, pb::ChangeOrigin::Api as i32);
    assert_eq!((change.domain.as_str(), change.key.as_str()), ("finance", "db_password"));
    assert_eq!(change.scope, pb::Scope::Domain as i32);
    assert_eq!(change.changed_by, format!("user:{OWNER}"));
    assert!(change.changed_at.is_some());
    assert_eq!(ids(change.reach.as_ref().unwrap()), ids(&reach));

    // A delete of a referenced secret, forced: the reach is what it broke.
    let deleted = owner
        .secrets
        .clone()
        .delete_secret(pb::DeleteSecretRequest {
            scope: pb::Scope::Domain as i32,
            domain: "finance".into(),
            key: "db_password".into(),
            force: true,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let reach = deleted.reach.expect("DeleteSecret answers with its reach");
    assert_eq!(reach.total, 2);
    let created = owner.create("finance", "new_key", "n-1").await.unwrap();
    let created_reach = created.reach.expect("a create answers with its reach too");
    assert_eq!(created_reach.total, 0, "nothing referenced the new key");
    let (_, deleted) = next_change(&mut stream).await;
    assert_eq!(deleted.kind, pb::SecretChangeKind::SecretDeleted as i32);
    assert_eq!(deleted.revision, reach.revision);
    let (_, created) = next_change(&mut stream).await;
    assert_eq!((created.kind, created.key.as_str()), (pb::SecretChangeKind::SecretCreated as i32, "new_key"));
    assert_eq!(created.reach.unwrap().total, 0);

    // A global key reaches the domains that fall back to it.
    let admin = app.as_user(ADMIN);
    admin.create_in(pb::Scope::Global, "", "shared", "g-1").await.unwrap();
    save(&app, spark_job("global-user", &[("S", text("${secrets.shared}"))])).await;
    let updated = admin
        .secrets
        .clone()
        .update_secret(pb::UpdateSecretRequest {
            scope: pb::Scope::Global as i32,
            domain: String::new(),
            key: "shared".into(),
            value: Some(text_value("g-2")),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&updated.reach.unwrap()), BTreeSet::from(["global-user".to_string()]));
}

/// A subscriber that drops its stream at random points during 1,000
/// updates and reconnects with its cursor: nothing missed, at most one
/// duplicate per change, each secret's changes in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_killed_at_random_points_during_a_thousand_updates_resumes_with_nothing_missed() {
    let app = TestApp::spawn_with(Options { request_timeout_ms: Some(20_000), ..Default::default() }).await;
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for k in &keys {
        owner.create("finance", k, "v0").await.unwrap();
    }
    let platform = app.as_service(None);
    let start = next(&mut watch(&platform, request(0)).await).await.cursor;

    let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (owner, keys, written) = (owner.clone(), keys.clone(), written.clone());
        tokio::spawn(async move {
            for round in 1..=100 {
                let updates = keys.iter().map(|k| {
                    let owner = owner.clone();
                    async move {
                        let answer = owner.update("finance", k, &format!("v{round}")).await.expect("update");
                        (k.clone(), answer.reach.expect("a reach").revision)
                    }
                });
                let done = futures::future::join_all(updates).await;
                written.lock().unwrap().extend(done);
            }
        })
    };

    // Cut off after a random number of changes (seeded from the clock;
    // the seed is printed to replay a failure).
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {seed}");
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let mut received: Vec<(String, u64)> = Vec::new();
    let mut cursor = start;
    let mut reconnects = 0;
    'watching: loop {
        let mut stream = watch(&platform, request(cursor)).await;
        reconnects += 1;
        let take = 1 + random(150);
        let mut taken = 0;
        while taken < take {
            let m = next(&mut stream).await;
            cursor = m.cursor;
            match m.event {
                Some(Event::Change(c)) => {
                    received.push((c.key.clone(), c.revision));
                    taken += 1;
                }
                Some(Event::CaughtUp(_)) => {
                    let newest = written.lock().unwrap().iter().map(|(_, r)| *r).max().unwrap_or(0);
                    if writer.is_finished() && cursor >= newest {
                        break 'watching;
                    }
                    // At the feed's end: reconnect a little later.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    writer.await.unwrap();
    let written = written.lock().unwrap().clone();
    assert_eq!(written.len(), 1_000);
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, r) in &received {
        *counts.entry(*r).or_default() += 1;
    }
    let missed: Vec<_> = written.iter().filter(|(_, r)| !counts.contains_key(r)).collect();
    assert!(missed.is_empty(), "{} of 1,000 updates missed after {reconnects} reconnects", missed.len());
    assert!(counts.values().all(|&n| n <= 2), "a change came more than twice");
    for k in &keys {
        let revisions: Vec<u64> = received.iter().filter(|(key, _)| key == k).map(|(_, r)| *r).collect();
        assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{k}'s changes out of order: {revisions:?}");
    }
    assert!(reconnects > 5, "the subscriber was cut off only {reconnects} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_across_a_gateway_and_an_authz_service_restart() {
    let mut app = TestApp::spawn().await;
    finance(&app).await;
    let owner = app.as_user(OWNER);
    let gateway = app.another_gateway_with(|_| {}).await;
    let platform = Clients::new(&format!("http://127.0.0.1:{}", gateway.port), Some(app.token(SPARK)), None);
    let mut stream = watch(&platform, request(0)).await;
    let cursor = next(&mut stream).await.cursor;
    drop(stream);
    gateway.stop().await;

    let one = owner.update("finance", "db_password", "pw-2").await.unwrap().reach.unwrap().revision;
    app.stop_authz().await;
    app.start_authz().await;
    let two = wait_for_update(&owner, "other_key", "o-2").await;

    let mut stream = watch(&app.as_service(None), request(cursor)).await;
    let (_, first) = next_change(&mut stream).await;
    let (_, second) = next_change(&mut stream).await;
    assert_eq!((first.revision, first.key.as_str()), (one, "db_password"));
    assert_eq!((second.revision, second.key.as_str()), (two, "other_key"));
    assert!(second.revision > first.revision);
}

/// An update once the restarted authz-service answers; its revision.
async fn wait_for_update(owner: &Clients, key: &str, value: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match owner.update("finance", key, value).await {
            Ok(m) if m.reach.is_some() => return m.reach.unwrap().revision,
            _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("no update with a reach after the restart: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_retention_is_told_to_resync_and_then_follows_on() {
    let app = TestApp::spawn_with(Options { change_retention_seconds: Some(1), ..Default::default() }).await;
    finance(&app).await;
    let owner = app.as_user(OWNER);
    let old = owner.update("finance", "db_password", "pw-2").await.unwrap().reach.unwrap().revision;
    // Pruning runs every half second once the retention (1 s) is past.
    let platform = app.as_service(None);
    let deadline = tokio::time::Instant::now() + WAIT;
    let resync = loop {
        let mut stream = watch(&platform, request(old - 1)).await;
        let m = next(&mut stream).await;
        match m.event {
            Some(Event::ResyncRequired(r)) => break (m.cursor, r, stream),
            Some(Event::Change(c)) => assert_eq!(c.revision, old, "before pruning, the change itself"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "the change was never pruned");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (cursor, resync, mut stream) = resync;
    assert_eq!(resync.after_revision, old - 1);
    assert!(resync.oldest_revision > old, "{resync:?}");
    assert!(resync.message.contains("retention"), "{}", resync.message);
    assert_eq!(cursor, resync.oldest_revision - 1);
    let newer = owner.update("finance", "other_key", "o-2").await.unwrap().reach.unwrap().revision;
    let (_, change) = next_change(&mut stream).await;
    assert_eq!(change.revision, newer, "the stream follows on after the resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_watching_gives_one_message_per_workload_naming_every_change_in_the_window() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    for i in 1..=6 {
        owner.create("finance", &format!("k{i}"), "v").await.unwrap();
    }
    let five: Vec<(String, pb::ConfigValue)> =
        (1..=5).map(|i| (format!("K{i}"), object("finance", &format!("k{i}")))).collect();
    let five: Vec<(&str, pb::ConfigValue)> = five.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    save(&app, spark_job("five", &five)).await;
    save(&app, spark_job("sixth", &[("K6", object("finance", "k6"))])).await;

    let platform = app.as_service(None);
    let mut stream = watch(&platform, pb::WatchSecretChangesRequest { coalesce_seconds: 3, ..request(0) }).await;
    let start = next(&mut stream).await;
    assert_eq!(start.event, Some(Event::CaughtUp(true)));
    for i in 1..=5 {
        owner.update("finance", &format!("k{i}"), "v2").await.unwrap();
    }
    owner.create("finance", "unreferenced", "v").await.unwrap();
    let m = next(&mut stream).await;
    let Some(Event::Workload(w)) = m.event else { panic!("expected one workload message, got {m:?}") };
    assert_eq!(w.workload.unwrap().id, "five");
    let keys: Vec<&str> = w.changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["k1", "k2", "k3", "k4", "k5"]);
    assert_eq!(m.cursor, start.cursor, "resuming from inside a window replays the window");
    let done = next(&mut stream).await;
    assert_eq!(done.event, Some(Event::CaughtUp(true)), "workload sixth got nothing: {done:?}");
    assert!(done.cursor >= w.changes.last().unwrap().revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_watcher_needs_list_secrets_there_and_sees_only_that_domain() {
    let app = TestApp::spawn().await;
    finance(&app).await;
    app.setup_domain(OTHER_DOMAIN).await;
    let err = app
        .as_user(STRANGER)
        .gateway
        .clone()
        .watch_secret_changes(pb::WatchSecretChangesRequest { domain: "finance".into(), ..request(0) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = app.as_user(LISTER).gateway.clone().watch_secret_changes(request(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("set domain"), "{}", err.message());
    let err = app
        .as_user(LISTER)
        .gateway
        .clone()
        .watch_secret_changes(pb::WatchSecretChangesRequest { coalesce_seconds: 7_200, ..request(0) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("coalesce_seconds"), "{}", err.message());

    let lister = app.as_user(LISTER);
    let mut stream = watch(&lister, pb::WatchSecretChangesRequest { domain: "finance".into(), ..request(0) }).await;
    next(&mut stream).await;
    app.as_user(OUTSIDER).create(OTHER_DOMAIN, "theirs", "t").await.unwrap();
    let ours = app.as_user(OWNER).update("finance", "other_key", "o-2").await.unwrap().reach.unwrap().revision;
    let (_, change) = next_change(&mut stream).await;
    assert_eq!(change.revision, ours, "another domain's change is not shown");
}

/// Someone edits the store object with kubectl: the change feed reports it
/// (origin STORE, the object's new resourceVersion, the workloads it
/// reaches), once, while an API update through the same stack is reported
/// once as an API change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_out_of_band_in_kubernetes_is_reported_with_its_reach() {
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options { kubernetes_api: Some(kube.url.clone()), ..Default::default() }).await;
    finance(&app).await;
    let platform = app.as_service(None);
    let mut stream = watch(&platform, request(0)).await;
    next(&mut stream).await;

    let api = app.as_user(OWNER).update("finance", "db_password", "pw-2").await.unwrap().reach.unwrap().revision;
    let (_, change) = next_change(&mut stream).await;
    assert_eq!((change.revision, change.origin), (api, pb::ChangeOrigin::Api as i32));
    assert!(!change.version.is_empty(), "the resourceVersion it wrote");

    kube.edit("secrets", "iomete-secret-store-finance", |s| {
        s.data.as_mut().unwrap().insert("db_password".into(), k8s_openapi::ByteString(b"from-kubectl".to_vec()));
    });
    let version = kube.secret("secrets", "iomete-secret-store-finance").unwrap().metadata.resource_version.unwrap();
    let (_, change) = next_change(&mut stream).await;
    assert_eq!(change.origin, pb::ChangeOrigin::Store as i32, "{change:?}");
    assert_eq!(change.kind, pb::SecretChangeKind::SecretUpdated as i32);
    assert_eq!((change.key.as_str(), change.version.as_str()), ("db_password", version.as_str()));
    assert!(change.changed_by.is_empty());
    assert_eq!(ids(change.reach.as_ref().unwrap()), BTreeSet::from(["etl".to_string(), "legacy".to_string()]));
    // Nothing else: the API update was not reported a second time by the watch.
    let quiet = tokio::time::timeout(Duration::from_secs(4), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "an extra change: {quiet:?}");
}

/// Someone edits a key with kubectl and, a moment later (before the watch's
/// sighting is announced), the key is updated through the API: the feed
/// keeps the secret's order, the kubectl edit first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_out_of_band_then_an_api_write_of_the_same_key_are_recorded_in_that_order() {
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options { kubernetes_api: Some(kube.url.clone()), ..Default::default() }).await;
    finance(&app).await;
    let platform = app.as_service(None);
    let mut stream = watch(&platform, request(0)).await;
    next(&mut stream).await;
    for round in 0..3 {
        kube.edit("secrets", "iomete-secret-store-finance", |s| {
            let value = format!("kubectl-{round}").into_bytes();
            s.data.as_mut().unwrap().insert("db_password".into(), k8s_openapi::ByteString(value));
        });
        let edited = kube.secret("secrets", "iomete-secret-store-finance").unwrap().metadata.resource_version.unwrap();
        let value = format!("api-{round}");
        let api = app.as_user(OWNER).update("finance", "db_password", &value).await.unwrap().reach.unwrap().revision;
        let (_, first) = next_change(&mut stream).await;
        let (_, second) = next_change(&mut stream).await;
        assert_eq!(
            (first.origin, first.version.as_str()),
            (pb::ChangeOrigin::Store as i32, edited.as_str()),
            "round {round}: the kubectl edit first: {first:?}"
        );
        assert_eq!((second.origin, second.revision), (pb::ChangeOrigin::Api as i32, api), "round {round}");
        assert!(second.version.parse::<u64>().unwrap() > edited.parse::<u64>().unwrap());
    }
    let quiet = tokio::time::timeout(Duration::from_secs(4), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "an extra change: {quiet:?}");
}

type Credential = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type LogClient = secrets_proto::internal::v1::change_log_client::ChangeLogClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credential>,
>;

/// The change log, as the services call it (with the internal credential).
fn change_log(app: &TestApp) -> LogClient {
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", secrecy::ExposeSecret::expose_secret(&app.internal_token)).parse().unwrap();
    let credential: Credential = Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    secrets_proto::internal::v1::change_log_client::ChangeLogClient::with_interceptor(
        channel(&app.authz_service_url),
        credential,
    )
}

/// The store baselines as the change log holds them: object → version.
async fn baselines(app: &TestApp) -> BTreeMap<String, u64> {
    let request = secrets_proto::internal::v1::ListBaselinesRequest::default();
    let page = change_log(app).list_baselines(request).await.unwrap().into_inner();
    page.baselines.into_iter().map(|b| (b.object, b.version)).collect()
}

on_both_databases!(store_baselines_keep_the_newest_version_page_by_name_and_refuse_bad_names);

/// The baselines a starting secret-service compares the store with: a
/// late recorder's older version never replaces a newer one, removed
/// objects are forgotten, pages follow on by name, and a bad name or key
/// is refused naming the field.
async fn store_baselines_keep_the_newest_version_page_by_name_and_refuse_bad_names(app: TestApp) {
    use secrets_proto::internal::v1::{ListBaselinesRequest, RecordBaselinesRequest, StoreBaseline};
    let mut log = change_log(&app);
    let list = |after: &str, limit| ListBaselinesRequest { after_object: after.into(), limit };
    let first = log.list_baselines(list("", 0)).await.unwrap().into_inner();
    assert!(!first.recorded && first.baselines.is_empty(), "nothing recorded yet: a first start");
    let base = |object: &str, version, keys: &[&str]| StoreBaseline {
        object: object.into(),
        version,
        keys: keys.iter().map(|k| k.to_string()).collect(),
    };
    let record = |baselines, removed: &[&str]| RecordBaselinesRequest {
        baselines,
        removed: removed.iter().map(|r| r.to_string()).collect(),
        complete: true,
    };
    // A part of a record split into several calls marks nothing.
    let part = RecordBaselinesRequest { baselines: vec![base("store-a", 1, &["x"])], removed: vec![], complete: false };
    log.record_baselines(part).await.unwrap();
    assert!(!log.list_baselines(list("", 0)).await.unwrap().into_inner().recorded);
    let long = "o".repeat(253);
    log.record_baselines(record(vec![base("store-a", 5, &["x", "y.z"]), base(&long, 1, &[])], &[])).await.unwrap();
    log.record_baselines(record(vec![base("store-a", 3, &["old"])], &[])).await.unwrap();
    let page = log.list_baselines(list("", 0)).await.unwrap().into_inner();
    assert!(page.recorded && !page.more);
    assert_eq!(page.baselines, vec![base(&long, 1, &[]), base("store-a", 5, &["x", "y.z"])], "the newest kept");
    log.record_baselines(record(vec![], &[&long])).await.unwrap();
    let objects: Vec<_> = (0..7).map(|i| base(&format!("store-p{i}"), 1, &["k"])).collect();
    log.record_baselines(record(objects, &[])).await.unwrap();
    let page = log.list_baselines(list("store-a", 3)).await.unwrap().into_inner();
    let names: Vec<_> = page.baselines.iter().map(|b| b.object.as_str()).collect();
    assert_eq!((names, page.more), (vec!["store-p0", "store-p1", "store-p2"], true));
    let page = log.list_baselines(list("store-p5", 3)).await.unwrap().into_inner();
    assert_eq!((page.baselines.len(), page.more), (1, false), "{page:?}");

    for (bad, field) in [
        (base("Store_A", 1, &[]), "baselines[0].object"),
        (base(&"o".repeat(254), 1, &[]), "baselines[0].object"),
        (base("store-a", 9, &["a/b"]), "baselines[0].keys[0]"),
    ] {
        let err = log.record_baselines(record(vec![bad], &[])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    let err = log.list_baselines(list("", 5_000)).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("limit"), "{err:?}");
    assert_eq!(baselines(&app).await["store-a"], 5, "nothing refused was written");
}

/// Waits until the log's baseline of `object` is at `version`.
async fn baseline_reaches(app: &TestApp, object: &str, version: &str) {
    let version: u64 = version.parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while baselines(app).await.get(object) != Some(&version) {
        assert!(tokio::time::Instant::now() < deadline, "the baseline of {object} never reached {version}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every secret-service replica is stopped; meanwhile someone edits the
/// store with kubectl: one key changed, one added, one removed, and a new
/// domain's object created. The secret-service that starts next reports
/// them: added and removed keys as created and deleted, the keys still there
/// as presumed updated (their old values are unknown), the new object's keys
/// as created. A restart with nothing changed meanwhile reports nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_no_secret_service_ran_are_reported_when_one_starts() {
    const OBJECT: &str = "iomete-secret-store-finance";
    let kube = kube_server::FakeKube::start().await;
    let mut app = TestApp::spawn_with(Options { kubernetes_api: Some(kube.url.clone()), ..Default::default() }).await;
    finance(&app).await;
    app.as_user(OWNER).create("finance", "to_remove", "r-1").await.unwrap();
    let platform = app.as_service(None);
    let mut stream = watch(&platform, request(0)).await;
    next(&mut stream).await;
    let version = kube.secret("secrets", OBJECT).unwrap().metadata.resource_version.unwrap();
    baseline_reaches(&app, OBJECT, &version).await;

    // A restart with nothing changed meanwhile: nothing to report.
    app.stop_secret_service().await;
    app.start_secret_service().await;
    // The comparison runs 2 intervals + 5 s after the first list.
    let quiet = tokio::time::timeout(Duration::from_secs(12), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "a restart with no change reported one: {quiet:?}");

    app.stop_secret_service().await;
    kube.edit("secrets", OBJECT, |s| {
        let data = s.data.as_mut().unwrap();
        data.insert("db_password".into(), k8s_openapi::ByteString(b"edited-while-down".to_vec()));
        data.insert("added_key".into(), k8s_openapi::ByteString(b"a".to_vec()));
        data.remove("to_remove");
    });
    let mut hr = kube.secret("secrets", OBJECT).unwrap();
    hr.metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some("iomete-secret-store-hr".into()),
        labels: hr.metadata.labels.clone(),
        ..Default::default()
    };
    hr.data = Some([("hr_token".to_string(), k8s_openapi::ByteString(b"t".to_vec()))].into());
    kube.insert("secrets", hr);
    let edited = kube.secret("secrets", OBJECT).unwrap().metadata.resource_version.unwrap();
    app.start_secret_service().await;

    let mut found = BTreeMap::new();
    while found.len() < 5 {
        let (_, c) = next_change(&mut stream).await;
        assert_eq!(c.origin, pb::ChangeOrigin::Store as i32, "{c:?}");
        let kind = pb::SecretChangeKind::try_from(c.kind).unwrap().as_str_name();
        let previous = found.insert(format!("{}/{}", c.domain, c.key), (kind, c.presumed, c.version.clone()));
        assert!(previous.is_none(), "reported twice: {c:?}");
    }
    let presumed = |kind| (kind, true, edited.clone());
    let certain = |kind| (kind, false, edited.clone());
    assert_eq!(found["finance/db_password"], presumed("SECRET_UPDATED"));
    assert_eq!(found["finance/other_key"], presumed("SECRET_UPDATED"), "its old value is unknown: more, never less");
    assert_eq!(found["finance/added_key"], certain("SECRET_CREATED"));
    assert_eq!(found["finance/to_remove"], certain("SECRET_DELETED"));
    assert_eq!(found["hr/hr_token"].0, "SECRET_CREATED");
    let quiet = tokio::time::timeout(Duration::from_secs(4), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "an extra change: {quiet:?}");
    // What was reported is the new baseline: the next restart is quiet.
    baseline_reaches(&app, OBJECT, &edited).await;
}

/// A replica that starts while another runs and writes go on reports
/// nothing as changed while unwatched: it compares only once the running
/// replica has recorded what it watched. Every write is in the feed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_while_another_runs_reports_no_presumed_change() {
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options { kubernetes_api: Some(kube.url.clone()), ..Default::default() }).await;
    finance(&app).await;
    baseline_reaches(
        &app,
        "iomete-secret-store-finance",
        &kube.secret("secrets", "iomete-secret-store-finance").unwrap().metadata.resource_version.unwrap(),
    )
    .await;
    let platform = app.as_service(None);
    let mut stream = watch(&platform, request(0)).await;
    next(&mut stream).await;
    let other = app.another_secret_replica().await;
    // Writes all through the comparison (2 intervals + 5 s after its list).
    let owner = app.as_user(OWNER);
    let mut written = Vec::new();
    for round in 0..40 {
        let reach = owner.update("finance", "db_password", &format!("pw-{round}")).await.unwrap().reach.unwrap();
        written.push(reach.revision);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut seen = Vec::new();
    while let Ok((_, c)) = tokio::time::timeout(Duration::from_secs(6), next_change(&mut stream)).await {
        assert!(!c.presumed, "the new replica reported a change it did not miss: {c:?}");
        seen.push(c.revision);
    }
    assert_eq!(seen, written, "every write once, in order");
    other.stop().await;
}

/// A new version written with the Vault CLI is reported for the keys that
/// changed (not the others), with the version and the workloads it
/// reaches, and the next resolve returns the new value at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vault_version_written_with_the_cli_is_reported_for_the_keys_that_changed() {
    use integration_tests::openbao::OpenBao;
    let bao = OpenBao::start();
    let app = TestApp::spawn_with(Options {
        vault_changes: Some(vault_config_service::rotation::ChangesConfig {
            vault_poll_interval_seconds: 1,
            vault_poll_budget_per_minute: 600,
        }),
        ..Default::default()
    })
    .await;
    app.setup_domain("finance").await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    authz
        .create_bundle(pb::CreateBundleRequest {
            name: "finance-vault".into(),
            description: String::new(),
            owner: format!("user:{OWNER}"),
        })
        .await
        .unwrap();
    bao.bao(&["kv", "put", "secret/production", "db_password=v1-password", "api_key=unchanged"]);
    let spec = pb::VaultConfigSpec {
        name: "prod".into(),
        host: bao.addr.clone(),
        path: "/v1/secret/data/production".into(),
        credentials: Some(pb::VaultCredentials {
            method: Some(pb::vault_credentials::Method::Token(bao.root_token.clone())),
        }),
        ..Default::default()
    };
    let create =
        pb::CreateVaultConfigRequest { domain: "finance".into(), bundle: "finance-vault".into(), spec: Some(spec) };
    let config = app.as_user(OWNER).vault.clone().create_vault_config(create).await.unwrap().into_inner();
    let vault_object = |key: &str| pb::ConfigValue {
        value: Some(pb::config_value::Value::SecretObject(pb::SecretObject {
            key: key.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: config.id.clone() }),
        })),
    };
    save(&app, spark_job("vault-job", &[("DB", vault_object("db_password")), ("API", vault_object("api_key"))])).await;
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let resolve = || async {
        let items = spark.resolve("finance", vec![vault_item("db", &config.id, "db_password")]).await.unwrap();
        match &items[0].result {
            Some(pb::resolved_item::Result::Value(v)) => String::from_utf8(v.clone()).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(resolve().await, "v1-password", "cached for the next resolve");

    // The detection has seen version 1 once its row is in the database.
    let db = connect_database(&app.database_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        use sea_orm::{ConnectionTrait, Statement};
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT version FROM vault_secret_versions",
            ))
            .await
            .unwrap();
        if row.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the config was never polled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let platform = app.as_service(None);
    let mut stream =
        watch(&platform, pb::WatchSecretChangesRequest { source: pb::SourceType::Vault as i32, ..request(0) }).await;
    next(&mut stream).await;

    bao.bao(&["kv", "put", "secret/production", "db_password=v2-rotated", "api_key=unchanged"]);
    let (_, change) = next_change(&mut stream).await;
    assert_eq!(change.origin, pb::ChangeOrigin::Vault as i32);
    assert_eq!((change.key.as_str(), change.version.as_str()), ("db_password", "2"));
    assert_eq!(change.source.as_ref().unwrap().id, config.id);
    assert_eq!(change.domain, "finance");
    assert_eq!(ids(change.reach.as_ref().unwrap()), BTreeSet::from(["vault-job".to_string()]));
    assert_eq!(resolve().await, "v2-rotated", "the values in memory were dropped");
    // api_key did not change: no event for it.
    let quiet = tokio::time::timeout(Duration::from_secs(3), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "an extra change: {quiet:?}");
}

/// The change log is internal: the authz-service takes only the internal
/// credential, and the gateway does not route it.
#[tokio::test]
async fn the_change_log_takes_only_the_internal_credential_and_is_not_routed() {
    use secrets_proto::internal::v1::{FollowChangesRequest, change_log_client::ChangeLogClient};
    let app = TestApp::spawn().await;
    let mut anyone = ChangeLogClient::new(channel(&app.authz_service_url));
    let err = anyone.follow(FollowChangesRequest { after_revision: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut via_gateway = ChangeLogClient::new(channel(&app.gateway_url));
    let err = via_gateway.follow(FollowChangesRequest { after_revision: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

/// A watcher whose permission is revoked is cut off: the stream ends with
/// PERMISSION_DENIED at its next change (permissions are asked again every
/// 10 s while it receives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_permission_is_revoked_is_cut_off() {
    let app = TestApp::spawn().await;
    finance(&app).await;
    let lister = app.as_user(LISTER);
    let mut stream = watch(&lister, pb::WatchSecretChangesRequest { domain: "finance".into(), ..request(0) }).await;
    next(&mut stream).await;
    app.as_user(OWNER).update("finance", "other_key", "o-2").await.unwrap();
    next_change(&mut stream).await;
    app.as_user(ADMIN)
        .authz
        .clone()
        .revoke_domain_permission(pb::RevokeDomainPermissionRequest {
            domain: "finance".into(),
            subject: format!("user:{LISTER}"),
            permission: pb::Permission::ListSecrets as i32,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    app.as_user(OWNER).update("finance", "other_key", "o-3").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await.expect("the stream ends") {
            Ok(Some(m)) => assert!(!matches!(m.event, Some(Event::Change(_))), "a change after the revoke: {m:?}"),
            Ok(None) => panic!("the stream ended without saying why"),
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
                break;
            }
        }
    }
}
