//! Fail closed when the authz service cannot answer, and recover when it is
//! back, without restarting anything.

use integration_tests::*;
use secrets_proto::v1::{self as pb, resolved_item::Result as R};
use tonic::Code;

#[tokio::test]
async fn nothing_is_allowed_while_authz_is_down_and_everything_recovers_when_it_returns() {
    let mut app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();

    app.stop_authz().await;
    let err = app.as_user(ADMIN).create("finance", "k2", "v").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The chain of hops: the gateway reached the secret service, which could not reach authz.
    assert!(err.message().starts_with("secret-service: authz-service: "), "names the backends: {}", err.message());
    let err = app.as_user(LISTER).list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let err =
        app.as_service(Some("user:nina")).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().starts_with("authz-service: "), "{}", err.message());

    app.start_authz().await;
    app.as_user(ADMIN).create("finance", "k2", "v").await.unwrap();
    let out =
        app.as_service(Some("user:nina")).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert_eq!(out[0].result, Some(R::Value(b"v".to_vec())));
    assert_eq!(app.as_user(LISTER).list("finance").await.unwrap(), ["k", "k2"], "grants survived the restart");
}

#[tokio::test]
async fn a_stopped_secret_service_is_unavailable_by_name_and_recovers_without_restarts() {
    let mut app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();

    app.stop_secret_service().await;
    // A source that does not answer fails the items it serves, by name.
    let out =
        app.as_service(Some("user:nina")).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    let Some(R::Error(e)) = &out[0].result else { panic!("expected an item error: {out:?}") };
    assert_eq!(e.code, Code::Unavailable as i32, "{e:?}");
    assert!(e.message.starts_with("items[0] (\"x\"): secret-service: "), "{}", e.message);
    let err = app.as_user(LISTER).list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().starts_with("secret-service: "), "{}", err.message());

    app.start_secret_service().await;
    let out =
        app.as_service(Some("user:nina")).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert_eq!(out[0].result, Some(R::Value(b"v".to_vec())), "the gateway reconnected by itself");
}

#[tokio::test]
async fn from_the_moment_shutdown_begins_health_says_not_serving_while_the_listener_stays_open() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let config = authz_service::Config {
        internal_token: Some(secrecy::SecretString::from("t".to_string())),
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display()),
        server: secrets_common::server::ServerConfig {
            metrics_addr: None,
            shutdown_drain_ms: 1_500,
            ..secrets_common::server::ServerConfig::local(0, 0)
        },
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = authz_service::Application::build_with_listener(config, listener).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let status = |service: &'static str| {
        let url = url.clone();
        async move {
            // A new connection each time, as a load balancer's probe makes.
            let mut client = HealthClient::new(channel(&url));
            client.check(HealthCheckRequest { service: service.into() }).await.map(|r| r.into_inner().status())
        }
    };
    assert_eq!(status("").await.unwrap(), ServingStatus::Serving);
    assert_eq!(status("iomete.secrets.v1.AuthzService").await.unwrap(), ServingStatus::Serving);

    stop.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(status("").await.unwrap(), ServingStatus::NotServing, "the listener is still open while draining");
    assert_eq!(status("iomete.secrets.v1.AuthzService").await.unwrap(), ServingStatus::NotServing);

    task.await.unwrap().unwrap();
    assert!(status("").await.is_err(), "after the drain the listener is closed");
}

/// Past its bound a server answers at once, RESOURCE_EXHAUSTED with a retry
/// hint, instead of queueing until the caller times out; other gRPC
/// services keep their own turns, and the shed calls are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bound_the_gateway_sheds_calls_at_once_with_a_retry_hint() {
    use tonic_types::StatusExt;
    let app = TestApp::spawn_with(Options {
        source_proxies: true,
        gateway_admission: Some((1, 0, 1_000)),
        ..Default::default()
    })
    .await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();
    let resolve = || {
        let clients = app.as_service(Some("user:nina"));
        async move { clients.resolve("finance", vec![text_item("x", "${secrets.k}")]).await }
    };
    assert!(resolve().await.is_ok());

    // One resolve holds the gateway's only turn while its store hangs.
    app.secret_link().freeze();
    let holder = tokio::spawn(resolve());
    let in_flight = "secrets_admission_in_flight{rpc_service=\"iomete.secrets.v1.Gateway\"} 1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !http_get(&app.metrics_url("gateway")).await.1.contains(in_flight) {
        assert!(std::time::Instant::now() < deadline, "the first resolve never took its turn");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let shed = resolve().await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(
        shed.message().starts_with("gateway: too busy: 1 calls of iomete.secrets.v1.Gateway"),
        "{}",
        shed.message()
    );
    assert!(shed.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some(), "a retry hint");
    // Another gRPC service of the gateway has turns of its own.
    let mut authz = app.as_user(OWNER).authz.clone();
    let members = authz.list_domain_members(pb::ListDomainMembersRequest { domain: "finance".into() });
    assert!(members.await.is_ok(), "AuthzService calls are admitted while Gateway's turn is taken");

    let held = holder.await.unwrap().expect("the holder answers: its item failed, not the call");
    assert!(matches!(&held[0].result, Some(R::Error(e)) if e.code == Code::Unavailable as i32), "{held:?}");
    let (_, text) = http_get(&app.metrics_url("gateway")).await;
    assert!(
        text.contains(
            "secrets_admission_shed_total{rpc_service=\"iomete.secrets.v1.Gateway\",reason=\"queue_full\"} 1"
        ),
        "{text}"
    );
    app.secret_link().thaw();
    assert!(resolve().await.is_ok(), "the turn is free again");
}

/// A change that was sent and not answered in time may have been applied:
/// the caller hears DEADLINE_EXCEEDED saying so (and here it did land),
/// where UNAVAILABLE would mean it was not. A read that times out changes
/// nothing and stays UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_answered_too_late_is_deadline_exceeded_and_may_have_landed() {
    let app = TestApp::spawn_with(Options { source_proxies: true, ..Default::default() }).await;
    app.setup_domain("finance").await;
    // Over the gateway's 2 s bound on calls to the secret-service.
    app.secret_link().delay(std::time::Duration::from_millis(3_000));
    let create = || pb::CreateSecretRequest {
        scope: pb::Scope::Domain as i32,
        domain: "finance".into(),
        key: "late".into(),
        value: Some(text_value("v")),
        request_id: "rotate-late-1".into(),
    };
    let mut secrets = app.as_user(ADMIN).secrets.clone();
    let err = secrets.create_secret(create()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().starts_with(
            "secret-service: did not answer in time; the change may have been applied: send it again with the same \
             request_id"
        ),
        "{}",
        err.message()
    );
    let err = app.as_user(LISTER).list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "a read changes nothing: {err:?}");

    app.secret_link().delay(std::time::Duration::ZERO);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match app.as_user(LISTER).list("finance").await {
            Ok(keys) if keys.contains(&"late".to_string()) => break,
            _ => assert!(std::time::Instant::now() < deadline, "the late create never landed"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The caller retries with its idempotency key: told it is done (the
    // first outcome), not ALREADY_EXISTS, and nothing is written twice.
    let retried = secrets.create_secret(create()).await.expect("the retry answers the first outcome").into_inner();
    assert_eq!(retried.key, "late");
    let err = secrets
        .create_secret(pb::CreateSecretRequest { key: "other".into(), ..create() })
        .await
        .expect_err("the key names another request");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("request_id: \"rotate-late-1\" was used for another request"), "{}", err.message());
}

/// A rotation script or a burst of sign-ups: 500 creates at once over 10
/// domains. Every one is answered OK and is there afterwards; changes to one
/// store object share writes (group commit), and every change is counted in
/// exactly one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_creates_over_ten_domains_all_land() {
    // Room for all of them on a debug build beside the rest of the suite:
    // the point is that none is lost or refused, not how fast they are.
    let app = TestApp::spawn_with(Options {
        request_timeout_ms: Some(30_000),
        database_timeout_ms: Some(30_000),
        ..Default::default()
    })
    .await;
    let domains: Vec<String> = (0..10).map(|d| format!("burst{d}")).collect();
    for d in &domains {
        app.setup_domain(d).await;
    }
    let changes = r#"secrets_changes_per_write_sum{backend="embedded"}"#;
    let writes = r#"secrets_changes_per_write_count{backend="embedded"}"#;
    let metrics = || async { http_get(&app.metrics_url("secret-service")).await.1 };
    let before = metrics().await;
    let calls: Vec<_> = (0..500)
        .map(|i| {
            // As patient as the services (a loaded machine takes its time).
            let client = app.as_user_patiently(ADMIN);
            let domain = domains[i % 10].clone();
            tokio::spawn(async move { client.create(&domain, &format!("key-{i:03}"), "v").await })
        })
        .collect();
    let mut failed = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        if let Err(e) = call.await.unwrap() {
            failed.push(format!("key-{i:03}: {e:?}"));
        }
    }
    assert!(failed.is_empty(), "{} of 500 creates failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    for d in &domains {
        assert_eq!(app.as_user(ADMIN).list(d).await.unwrap().len(), 50, "{d}: every acknowledged create is listed");
    }
    let after = metrics().await;
    assert_eq!(sample(&after, changes) - sample(&before, changes), 500.0, "each change written once");
    let written = sample(&after, writes) - sample(&before, writes);
    assert!((10.0..=500.0).contains(&written), "{written} writes for 500 changes over 10 objects");
    eprintln!("500 creates over 10 objects took {written} writes");
}
