//! Value leases: while the secret-service grants a gateway a value lease,
//! the gateway keeps the values it resolved in memory, and every write
//! returns only once each holder has dropped them (or, silent, has surely
//! lost its lease). Out-of-band edits reach the holders through the store
//! watch.

use std::time::{Duration, Instant};

use integration_tests::*;
use secrets_proto::{
    internal::v1::{WatchDecisionsRequest, value_leases_client::ValueLeasesClient},
    v1::{self as pb, resolved_item::Result as R},
};
use tonic::Code;

const READS: &str = r#"secrets_backend_calls_total{backend="secret-service",operation="ReadSecrets"}"#;

/// A metric's value on `metrics_url` (0 when absent).
async fn metric(metrics_url: &str, name: &str) -> f64 {
    let (_, text) = http_get(metrics_url).await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn leased() -> Options {
    Options { value_leases: true, ..Default::default() }
}

async fn value(clients: &Clients, key: &str) -> Option<Vec<u8>> {
    let out = clients.resolve("finance", vec![object_item("v", "finance", key)]).await.unwrap();
    match &out[0].result {
        Some(R::Value(v)) => Some(v.clone()),
        Some(R::Error(e)) if e.code == Code::NotFound as i32 => None,
        other => panic!("neither a value nor not found: {other:?}"),
    }
}

/// Resolves `key` until one resolve reads nothing from the secret-service
/// (the gateway holds a value lease and remembers the value); panics after
/// 10 s.
async fn until_served_from_memory(clients: &Clients, metrics_url: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let before = metric(metrics_url, READS).await;
        value(clients, key).await;
        if metric(metrics_url, READS).await == before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway at {metrics_url} never answered {key} from memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_gateway_is_seen_by_the_next_resolve_through_another() {
    let app = TestApp::spawn_with(leased()).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v-000").await.unwrap();
    let other = app.another_gateway_with(|_| {}).await;
    let other_url = format!("http://127.0.0.1:{}", other.port);
    let gateways = [
        (app.as_user(OWNER), app.as_service(Some("user:nina")), app.metrics_url("gateway")),
        (
            Clients::new(&other_url, Some(app.token(OWNER)), None),
            Clients::new(&other_url, Some(app.token(SPARK)), Some("user:nina")),
            other.metrics_url.clone(),
        ),
    ];
    for (_, resolver, metrics) in &gateways {
        until_served_from_memory(resolver, metrics, "db-password").await;
    }
    let reads = metric(&gateways[1].2, READS).await;
    for _ in 0..20 {
        assert_eq!(value(&gateways[1].1, "db-password").await.as_deref(), Some(&b"v-000"[..]));
    }
    assert_eq!(metric(&gateways[1].2, READS).await, reads, "20 resolves under a lease read nothing");

    let mut stale = Vec::new();
    for round in 1..=200 {
        let (writer, _, _) = &gateways[round % 2];
        let (_, reader, _) = &gateways[(round + 1) % 2];
        let new = format!("v-{round:03}");
        writer.update("finance", "db-password", &new).await.unwrap();
        let seen = value(reader, "db-password").await;
        if seen.as_deref() != Some(new.as_bytes()) {
            stale.push((round, seen.map(|v| String::from_utf8_lossy(&v).into_owned())));
        }
        // The writer's own gateway, too.
        let seen = value(&gateways[round % 2].1, "db-password").await;
        if seen.as_deref() != Some(new.as_bytes()) {
            stale.push((round, seen.map(|v| String::from_utf8_lossy(&v).into_owned())));
        }
    }
    assert!(stale.is_empty(), "stale answers after a write returned: {stale:?}");

    // A delete and a create count the same way, and a key that does not
    // exist is remembered as such only until it is created.
    assert_eq!(value(&gateways[1].1, "api-key").await, None);
    assert_eq!(value(&gateways[1].1, "api-key").await, None);
    gateways[0].0.create("finance", "api-key", "k-1").await.unwrap();
    assert_eq!(value(&gateways[1].1, "api-key").await.as_deref(), Some(&b"k-1"[..]));
    gateways[0].0.delete("finance", "api-key").await.unwrap();
    assert_eq!(value(&gateways[1].1, "api-key").await, None, "deleted, yet served from memory");

    // A revoke counts on the next resolve: decisions are still made on
    // every call, values or not.
    app.as_user(ADMIN)
        .authz
        .clone()
        .remove_domain_member(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:nina".into() })
        .await
        .unwrap();
    let out = gateways[1].1.resolve("finance", vec![object_item("v", "finance", "db-password")]).await.unwrap();
    assert!(
        matches!(&out[0].result, Some(R::Error(e)) if e.code == Code::PermissionDenied as i32),
        "a remembered value was handed out after the revoke: {:?}",
        out[0].result.as_ref().map(|_| "an answer")
    );
    other.stop().await;
}

/// A holder that stops answering (a hung or cut-off gateway) delays a write
/// and is cut off; it never makes the write unsafe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_lease_holder_that_stops_answering_delays_a_write_and_is_cut_off() {
    let app = TestApp::spawn_with(leased()).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v-1").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_served_from_memory(&nina, &app.metrics_url("gateway"), "db-password").await;

    let client = secrets_common::auth::InternalClient::new(&app.internal_token).unwrap();
    let mut hung = ValueLeasesClient::with_interceptor(channel(&app.secret_service_url), client);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
    let mut answers = hung.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().expect("a lease");
    assert_eq!((first.seq, first.lease_ms, first.renew_ms), (1, 2_000, 500));

    let started = Instant::now();
    app.as_user(OWNER).update("finance", "db-password", "v-2").await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_000), "the write did not wait for the silent holder ({took:?})");
    assert_eq!(value(&nina, "db-password").await.as_deref(), Some(&b"v-2"[..]), "the real gateway dropped v-1");
    let change = answers.message().await.unwrap().expect("the change");
    assert_eq!(change.seq, 0);
    assert!(change.generation > first.generation);
    let end = tokio::time::timeout(Duration::from_secs(5), answers.message()).await.expect("the stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    drop(tx);
}

#[tokio::test]
async fn value_leases_take_only_the_internal_credential_and_are_not_routed() {
    let app = TestApp::spawn_with(leased()).await;
    for url in [&app.secret_service_url, &app.gateway_url] {
        let mut anyone = ValueLeasesClient::new(channel(url));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
        let err = anyone.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
        assert!(matches!(err.code(), Code::Unauthenticated | Code::Unimplemented), "{url}: {err:?}");
    }
}

/// Off, nothing is offered and every resolve reads.
#[tokio::test]
async fn a_secret_service_without_value_leases_refuses_holders_and_every_resolve_reads() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let client = secrets_common::auth::InternalClient::new(&app.internal_token).unwrap();
    let mut holder = ValueLeasesClient::with_interceptor(channel(&app.secret_service_url), client);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
    let err = holder.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no value leases are offered here"), "{}", err.message());

    let nina = app.as_service(Some("user:nina"));
    let before = metric(&app.metrics_url("gateway"), READS).await;
    for _ in 0..5 {
        assert_eq!(value(&nina, "db-password").await.as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(metric(&app.metrics_url("gateway"), READS).await, before + 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_value_memory_keeps_within_its_bounds_and_counts_what_it_evicts() {
    let app = TestApp::spawn_with(leased()).await;
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    for i in 0..10 {
        owner.create("finance", &format!("k-{i}"), &format!("value-{i}")).await.unwrap();
    }
    let small = app
        .another_gateway_with(|c| {
            c.value_cache = gateway::values::ValueCacheConfig { max_entries: 3, max_bytes: 1024 * 1024 };
        })
        .await;
    let url = format!("http://127.0.0.1:{}", small.port);
    let nina = Clients::new(&url, Some(app.token(SPARK)), Some("user:nina"));
    until_served_from_memory(&nina, &small.metrics_url, "k-0").await;
    // Cycling through 10 values with room for 3 evicts on every read; a
    // busy machine may let the lease lapse now and then (memory is then
    // dropped, not evicted), so cycle until the count shows.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut evicted = 0.0;
    while evicted < 17.0 {
        assert!(Instant::now() < deadline, "20 values through a memory of 3 evicted only {evicted}");
        for i in 0..10 {
            let got = value(&nina, &format!("k-{i}")).await;
            assert_eq!(got, Some(format!("value-{i}").into_bytes()), "k-{i}");
        }
        let entries = metric(&small.metrics_url, "secrets_gateway_value_cache_entries").await;
        assert!(entries <= 3.0, "entries {entries} past max_entries");
        evicted = metric(&small.metrics_url, "secrets_gateway_value_cache_evictions_total").await;
    }

    // In bytes too: a value larger than the whole bound is never kept.
    let tiny = app
        .another_gateway_with(|c| {
            c.value_cache = gateway::values::ValueCacheConfig { max_entries: 100, max_bytes: 200 };
        })
        .await;
    let tiny_url = format!("http://127.0.0.1:{}", tiny.port);
    let nina = Clients::new(&tiny_url, Some(app.token(SPARK)), Some("user:nina"));
    owner.create("finance", "big", &"x".repeat(500)).await.unwrap();
    until_served_from_memory(&nina, &tiny.metrics_url, "k-1").await;
    let reads = metric(&tiny.metrics_url, READS).await;
    for _ in 0..3 {
        assert_eq!(value(&nina, "big").await.map(|v| v.len()), Some(500));
    }
    assert_eq!(metric(&tiny.metrics_url, READS).await, reads + 3.0, "a value past max_bytes is read every time");
    assert!(metric(&tiny.metrics_url, "secrets_gateway_value_cache_bytes").await <= 200.0);
    small.stop().await;
    tiny.stop().await;
}

/// Someone edits a key with kubectl: the watch hands it to the lease
/// holders, and the gateway stops serving the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_out_of_band_in_kubernetes_reaches_the_gateways_memory() {
    let kube = kube_server::FakeKube::start().await;
    let app = TestApp::spawn_with(Options { kubernetes_api: Some(kube.url.clone()), ..leased() }).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db_password", "pw-1").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_served_from_memory(&nina, &app.metrics_url("gateway"), "db_password").await;

    kube.edit("secrets", "iomete-secret-store-finance", |s| {
        s.data.as_mut().unwrap().insert("db_password".into(), k8s_openapi::ByteString(b"from-kubectl".to_vec()));
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = value(&nina, "db_password").await;
        if seen.as_deref() == Some(&b"from-kubectl"[..]) {
            break;
        }
        assert!(Instant::now() < deadline, "the edit never reached the gateway: {:?}", seen.map(String::from_utf8));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the new value is what memory holds from now on.
    until_served_from_memory(&nina, &app.metrics_url("gateway"), "db_password").await;
    assert_eq!(value(&nina, "db_password").await.as_deref(), Some(&b"from-kubectl"[..]));
}

/// Values in memory are never written out: no log line, at any level,
/// carries one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_value_reaches_no_log() {
    let app = TestApp::spawn_with(leased()).await;
    app.setup_domain("finance").await;
    let canary = format!("canary-{}", secrets_common::auth::generate_token());
    app.as_user(OWNER).create("finance", "db-password", &canary).await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_served_from_memory(&nina, &app.metrics_url("gateway"), "db-password").await;
    app.as_user(OWNER).update("finance", "db-password", "rotated").await.unwrap();
    assert_eq!(value(&nina, "db-password").await.as_deref(), Some(&b"rotated"[..]));
    let logs = integration_tests::logs::captured();
    assert!(!logs.contains(&canary), "the canary reached the logs");
    let (_, metrics) = http_get(&app.metrics_url("gateway")).await;
    assert!(!metrics.contains(&canary), "the canary reached the metrics");
}

/// On the embedded store, a process offering value leases has the data
/// directory alone: another secret-service on it is refused at start (its
/// writes would go unseen by the first one's gateways) until it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_an_embedded_store_with_value_leases_is_refused_at_start() {
    let mut app = TestApp::spawn_with(leased()).await;
    let config = secret_service::Config {
        server: secrets_common::server::ServerConfig::local(0, 0),
        internal_token: Some(app.internal_token.clone()),
        authz_url: app.authz_service_url.clone(),
        backend: Some(secret_service::BackendKind::Embedded),
        embedded: secret_service::EmbeddedConfig { data_dir: app.dir.path().join("secrets"), allow_in_cluster: true },
        ..Default::default()
    };
    for value_leases in [false, true] {
        let second = secret_service::Config { value_leases: Some(value_leases), ..config.clone() };
        match secret_service::Application::build(second).await {
            Ok(_) => {
                panic!("a second process started beside one offering value leases (value_leases = {value_leases})")
            }
            Err(e) => assert!(e.to_string().contains("must have it alone"), "{e}"),
        }
    }
    app.stop_secret_service().await;
    let second = secret_service::Application::build(config).await.expect("starts once the first has stopped");
    drop(second);
}
