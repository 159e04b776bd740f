//! Decision leases: while the authz-service (on SQLite) grants the gateway a
//! lease, the gateway answers permission questions from memory, and every
//! grant change returns only once the gateway has forgotten them, or once
//! a holder that stopped answering has surely lost its lease. On
//! PostgreSQL the same holds across replicas of the authz-service.

use std::time::{Duration, Instant};

use integration_tests::*;
use secrets_proto::{
    internal::v1::{WatchDecisionsRequest, decision_leases_client::DecisionLeasesClient},
    v1::{self as pb, resolved_item::Result as R},
};
use tonic::Code;

const TO_AUTHZ: &str = r#"secrets_backend_calls_total{backend="authz-service",operation="BatchCheck"}"#;

/// BatchCheck calls the gateway has made so far.
async fn asked(app: &TestApp) -> f64 {
    let (_, text) = http_get(&app.metrics_url("gateway")).await;
    text.lines()
        .find(|l| l.starts_with(TO_AUTHZ))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn item() -> Vec<pb::ResolveItem> {
    vec![object_item("pw", "finance", "db-password")]
}

async fn resolves(nina: &Clients) -> bool {
    let out = nina.resolve("finance", item()).await.unwrap();
    match &out[0].result {
        Some(R::Value(_)) => true,
        Some(R::Error(e)) if e.code == Code::PermissionDenied as i32 => false,
        other => panic!("neither a value nor a refusal: {other:?}"),
    }
}

/// Resolves until one resolve asks the authz-service nothing (the lease is
/// held and the decision remembered); panics after 5 s.
async fn until_answered_from_memory(app: &TestApp, nina: &Clients) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let before = asked(app).await;
        assert!(resolves(nina).await);
        if asked(app).await == before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway never answered from memory");
}

async fn remove_nina(app: &TestApp) {
    app.as_user(ADMIN)
        .authz
        .clone()
        .remove_domain_member(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:nina".into() })
        .await
        .unwrap();
}

async fn add_nina(app: &TestApp) {
    app.as_user(ADMIN)
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "user:nina".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn with_a_lease_resolves_ask_nothing_and_every_change_counts_on_the_next_resolve() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_answered_from_memory(&app, &nina).await;

    let before = asked(&app).await;
    for _ in 0..20 {
        assert!(resolves(&nina).await);
    }
    assert_eq!(asked(&app).await, before, "20 resolves under a lease ask the authz-service nothing");

    for round in 0..5 {
        remove_nina(&app).await;
        assert!(!resolves(&nina).await, "round {round}: allowed from memory after the removal returned");
        add_nina(&app).await;
        assert!(resolves(&nina).await, "round {round}: refused from memory after the membership returned");
    }
    // A group grant reaches the gateway's memory the same way.
    remove_nina(&app).await;
    assert!(!resolves(&nina).await);
    let admin = app.as_user(ADMIN).authz.clone();
    admin
        .clone()
        .create_group(pb::CreateGroupRequest { name: "eng".into(), description: String::new() })
        .await
        .unwrap();
    admin
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "group:eng".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap();
    assert!(!resolves(&nina).await, "nina is not in eng yet");
    admin
        .clone()
        .add_group_member(pb::AddGroupMemberRequest { group: "eng".into(), member: "user:nina".into() })
        .await
        .unwrap();
    assert!(resolves(&nina).await, "in eng, which is a member of finance");
    admin
        .clone()
        .remove_group_member(pb::RemoveGroupMemberRequest { group: "eng".into(), member: "user:nina".into() })
        .await
        .unwrap();
    assert!(!resolves(&nina).await, "allowed from memory after leaving the group");
}

/// A holder that stops answering (a hung or cut-off gateway) cannot keep a
/// change from returning, nor make it unsafe: the change waits for it, then
/// cuts it off and waits out its lease.
#[tokio::test]
async fn a_lease_holder_that_stops_answering_delays_a_change_and_is_cut_off() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_answered_from_memory(&app, &nina).await;

    let client = secrets_common::auth::InternalClient::new(&app.internal_token).unwrap();
    let mut hung = DecisionLeasesClient::with_interceptor(channel(&app.authz_service_url), client);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
    let mut answers = hung.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().expect("a lease");
    assert_eq!(first.seq, 1);
    assert_eq!((first.lease_ms, first.renew_ms), (2_000, 500));

    let started = Instant::now();
    remove_nina(&app).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_000), "the change did not wait for the silent holder ({took:?})");
    assert!(!resolves(&nina).await, "the real gateway applied the change");
    // The silent holder was told of the change, then cut off.
    let change = answers.message().await.unwrap().expect("the change");
    assert_eq!(change.seq, 0);
    assert!(change.generation > first.generation);
    let end = tokio::time::timeout(Duration::from_secs(5), answers.message()).await.expect("the stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    drop(tx);
}

#[tokio::test]
async fn leases_take_only_the_internal_credential() {
    let app = TestApp::spawn().await;
    let mut anyone = DecisionLeasesClient::new(channel(&app.authz_service_url));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
    let err = anyone.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Nor does the gateway route it.
    let mut via_gateway = DecisionLeasesClient::new(channel(&app.gateway_url));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchDecisionsRequest { seq: 1, applied_generation: 0 }).await.unwrap();
    let err = via_gateway.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

/// On PostgreSQL, with a second authz-service replica that the gateway
/// never calls: the gateway holds a lease from its own replica, so resolves
/// ask nothing, and a change made through the other replica returns only
/// once the gateway has forgotten what it remembered.
#[tokio::test]
async fn on_postgresql_a_change_through_another_replica_counts_on_the_next_resolve() {
    let Some(db) = postgres::fresh_database().await else { return };
    let app = TestApp::spawn_with(Options { database_url: Some(db.url.clone()), ..Default::default() }).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_answered_from_memory(&app, &nina).await;
    let before = asked(&app).await;
    for _ in 0..20 {
        assert!(resolves(&nina).await);
    }
    assert_eq!(asked(&app).await, before, "20 resolves under a lease ask the authz-service nothing");

    let other = app.another_authz_replica().await;
    let admin = app.authz_direct_on(other.port);
    for round in 0..5 {
        admin
            .clone()
            .remove_domain_member(pb::RemoveDomainMemberRequest {
                domain: "finance".into(),
                subject: "user:nina".into(),
            })
            .await
            .unwrap();
        assert!(!resolves(&nina).await, "round {round}: allowed from memory after the removal returned");
        admin
            .clone()
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: "finance".into(),
                subject: "user:nina".into(),
                role: pb::DomainRole::Member as i32,
            })
            .await
            .unwrap();
        assert!(resolves(&nina).await, "round {round}: refused from memory after the membership returned");
    }
    other.stop().await;
    db.drop_database().await;
}

/// Generations count per authz-service process: after a restart the
/// gateway's lease starts over, and the restarted service's first changes
/// count at once.
#[tokio::test]
async fn after_an_authz_restart_the_new_lease_sees_every_change() {
    let mut app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    // Many changes before the restart: the old process's generation is high.
    for _ in 0..5 {
        remove_nina(&app).await;
        add_nina(&app).await;
    }
    until_answered_from_memory(&app, &nina).await;

    app.stop_authz().await;
    app.start_authz().await;
    until_answered_from_memory(&app, &nina).await;
    remove_nina(&app).await;
    assert!(!resolves(&nina).await, "allowed from memory after the restarted service's first change");
    add_nina(&app).await;
    assert!(resolves(&nina).await);
}

/// What a resolve for nina gets: a value, a refusal, or no answer (the
/// gateway could not reach the authz-service and failed closed).
async fn nina_gets(nina: &Clients) -> Option<bool> {
    match nina.resolve("finance", item()).await {
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            None
        }
        Ok(out) => match &out[0].result {
            Some(R::Value(_)) => Some(true),
            Some(R::Error(e)) if e.code == Code::PermissionDenied as i32 => Some(false),
            Some(R::Error(e)) if e.code == Code::Unavailable as i32 => None,
            other => panic!("neither a value nor a refusal: {other:?}"),
        },
    }
}

/// A process that crashed with its host says nothing: its gateway keeps
/// the lease it was given until it runs out. The process that replaces it
/// cannot know that gateway, so its first change waits out one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_authz_crash_the_first_revoke_returns_only_when_no_old_lease_can_answer() {
    let mut app = TestApp::spawn_with(Options { authz_process: true, ..Default::default() }).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    until_answered_from_memory(&app, &nina).await;

    app.crash_authz();
    app.start_authz().await;
    // Straight to the new process: the gateway's own connection is the
    // silent one.
    let mut authz =
        pb::authz_service_client::AuthzServiceClient::new(channel(&format!("http://127.0.0.1:{}", app.authz_port)));
    let mut request =
        tonic::Request::new(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:nina".into() });
    let bearer = format!("Bearer {}", secrecy::ExposeSecret::expose_secret(&app.internal_token));
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    secrets_common::auth::act_as(&mut request, &"user:admin".parse().unwrap(), Some("test"), &[]);
    authz.remove_domain_member(request).await.unwrap();

    assert_ne!(
        nina_gets(&nina).await,
        Some(true),
        "allowed from the crashed process's lease after the revoke returned"
    );
    // Once the gateway notices the dead connection, it asks the new process.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match nina_gets(&nina).await {
            Some(false) => break,
            Some(true) => panic!("allowed after the revoke"),
            None => assert!(Instant::now() < deadline, "the gateway never reached the new authz-service"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Changes whose callers give up mid-call are published all the same: what
/// the gateway answers from memory always ends up as the grants say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_changes_cancelled_mid_call_are_still_published() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    let admin = app.as_user(ADMIN);
    let is_member = || async {
        admin
            .authz
            .clone()
            .list_domain_members(pb::ListDomainMembersRequest { domain: "finance".into() })
            .await
            .unwrap()
            .into_inner()
            .members
            .iter()
            .any(|m| m.subject == "user:nina")
    };
    let mut mismatches = Vec::new();
    for round in 0..20u64 {
        until_answered_from_memory_or_denied(&app, &nina).await;
        // Give up on the change after a few milliseconds: sometimes before
        // it is written, sometimes after, sometimes while it is published.
        let delay = Duration::from_micros(700 * round);
        if is_member().await {
            let _ = tokio::time::timeout(delay, remove_nina(&app)).await;
        } else {
            let _ = tokio::time::timeout(delay, add_nina(&app)).await;
        }
        // Whatever happened, it is published at once (no holder lags).
        tokio::time::sleep(Duration::from_millis(600)).await;
        let truth = is_member().await;
        let answered = resolves(&nina).await;
        if answered != truth {
            mismatches.push((round, truth, answered));
        }
    }
    assert!(mismatches.is_empty(), "the gateway answered against the grants (round, member, allowed): {mismatches:?}");
}

/// As `until_answered_from_memory`, also when the answer is a refusal.
async fn until_answered_from_memory_or_denied(app: &TestApp, nina: &Clients) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let before = asked(app).await;
        let _ = resolves(nina).await;
        if asked(app).await == before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway never answered from memory");
}

/// The stack with its authz-service a process behind a proxy (for the
/// test to partition or slow down), finance set up, and a client acting
/// for nina. Returns once the process is older than one lease, so its
/// start-up wait (a crashed predecessor's holders) no longer covers a
/// change, and each change waits only for the holders it has.
async fn behind_a_proxy() -> (TestApp, Clients) {
    let started = Instant::now();
    let app = TestApp::spawn_with(Options { authz_process: true, ..Default::default() }).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let nina = app.as_service(Some("user:nina"));
    let lease = Duration::from_millis(2_000);
    tokio::time::sleep_until((started + lease + Duration::from_millis(200)).into()).await;
    (app, nina)
}

/// A holder the network cut off is cut off by the change, and the change
/// then waits out the lease that holder was given: the real gateway, whose
/// lease stream goes silent, never answers from its old lease once the
/// revoke has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_its_lease_never_answers_from_it_after_the_revoke_returned() {
    let (app, nina) = behind_a_proxy().await;
    until_answered_from_memory(&app, &nina).await;

    // The gateway's connection to the authz-service goes silent both ways;
    // the process lives on and takes the revoke straight.
    app.authz_proxy().partition();
    let revoke = Instant::now();
    app.authz_direct()
        .remove_domain_member(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:nina".into() })
        .await
        .unwrap();
    let took = revoke.elapsed();

    assert_ne!(nina_gets(&nina).await, Some(true), "allowed from a cut-off lease after the revoke returned ({took:?})");
    // A holder that never acknowledges costs the acknowledgement timeout
    // and what is left of its lease: more than the timeout alone.
    assert!(took >= Duration::from_millis(1_000), "the change did not wait for the silent holder ({took:?})");
}

/// A change returns only once every holder has acknowledged it: with the
/// gateway's lease stream slowed down (alive, but every message late), the
/// first resolve after the revoke returned is already refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_lease_messages_arrive_late_still_refuses_the_first_resolve_after_a_revoke() {
    let (app, nina) = behind_a_proxy().await;
    // Each message takes 300 ms each way: an acknowledgement comes back
    // well within the 1 s the change waits for it, so nobody is cut off.
    app.authz_proxy().delay(Duration::from_millis(300));
    until_answered_from_memory(&app, &nina).await;

    for round in 0..3 {
        let revoke = Instant::now();
        app.authz_direct()
            .remove_domain_member(pb::RemoveDomainMemberRequest {
                domain: "finance".into(),
                subject: "user:nina".into(),
            })
            .await
            .unwrap();
        let took = revoke.elapsed();
        assert_eq!(nina_gets(&nina).await, Some(false), "round {round}: the first resolve after the revoke ({took:?})");
        // The change waited for the late acknowledgement: at least a round trip.
        assert!(
            took >= Duration::from_millis(600),
            "round {round}: returned before the holder could answer ({took:?})"
        );
        add_nina(&app).await;
        until_answered_from_memory(&app, &nina).await;
    }
}
