//! The authz service's rules and persistence. Every test runs on SQLite and,
//! when DATABASE_URL names a PostgreSQL server, on a fresh database there.

use integration_tests::{on_both_databases, postgres, *};
use secrets_proto::v1::{self as pb, DomainRole, Permission};
use tonic::Code;

on_both_databases!(
    everything_is_denied_by_default,
    roles_and_permissions_decide_each_check_with_a_reason,
    batch_check_answers_every_check_in_order,
    granting_needs_membership_and_removal_takes_permissions_along,
    adding_a_member_again_changes_its_role,
    callers_may_check_only_their_own_permissions_unless_admin,
    configured_admins_cannot_be_revoked_but_granted_ones_can,
    grants_survive_a_restart,
    a_grant_racing_a_removal_never_leaves_a_permission_behind,
    a_stored_role_that_is_not_understood_is_an_error_not_membership,
    a_batch_of_checks_costs_no_query_and_is_capped,
    a_change_through_one_replica_decides_the_next_check_on_another,
);
on_both_databases!(options = burst_options; two_hundred_concurrent_grant_changes_land_and_refusals_fail_alone);

/// Room for a burst on a debug build beside the rest of the suite: the point
/// is that nothing is lost, not how fast it goes.
fn burst_options() -> Options {
    Options { request_timeout_ms: Some(30_000), database_timeout_ms: Some(30_000), ..Default::default() }
}

/// Two authz-service replicas on one PostgreSQL database: a revoke that
/// returned on one is never answered from the other's memory. A second
/// process on one SQLite database is refused, naming PostgreSQL.
async fn a_change_through_one_replica_decides_the_next_check_on_another(app: TestApp) {
    use secrets_common::auth::{InternalClient, act_as};
    app.setup_domain("finance").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = authz_service::Config {
        internal_token: Some(app.internal_token.clone()),
        database_url: app.database_url.clone(),
        bootstrap_admins: vec![format!("user:{ADMIN}")],
        server: secrets_common::server::ServerConfig {
            metrics_addr: None,
            ..secrets_common::server::ServerConfig::local(0, 0)
        },
        ..Default::default()
    };
    let replica = authz_service::Application::build_with_listener(config, listener).await;
    if app.database_url.starts_with("sqlite") {
        let e = replica.err().expect("a second process on the SQLite database is refused").to_string();
        assert!(e.contains("another authz-service process uses the SQLite database"), "{e}");
        assert!(e.contains("use PostgreSQL"), "{e}");
        return;
    }
    let replica = replica.unwrap();
    tokio::spawn(replica.run_until_stopped(std::future::pending()));
    let client = secrets_proto::v1::authz_service_client::AuthzServiceClient::with_interceptor(
        channel(&format!("http://127.0.0.1:{port}")),
        InternalClient::new(&app.internal_token).unwrap(),
    );
    let on_replica = |permission: Permission| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(pb::CheckRequest {
                subject: "user:lisa".into(),
                permission: permission as i32,
                domain: "finance".into(),
                ..Default::default()
            });
            act_as(&mut request, &secrets_common::Principal::user(ADMIN), None, &[]);
            client.check(request).await.unwrap().into_inner().allowed
        }
    };
    let authz = app.as_user(ADMIN).authz.clone();
    let lisa = |permission: Permission| pb::GrantDomainPermissionRequest {
        domain: "finance".into(),
        subject: "user:lisa".into(),
        permission: permission as i32,
    };
    for round in 0..20 {
        assert!(on_replica(Permission::ListSecrets).await, "round {round}: lisa lists finance");
        authz
            .clone()
            .revoke_domain_permission(pb::RevokeDomainPermissionRequest {
                domain: "finance".into(),
                subject: "user:lisa".into(),
                permission: Permission::ListSecrets as i32,
            })
            .await
            .unwrap();
        assert!(
            !on_replica(Permission::ListSecrets).await,
            "round {round}: the replica answered from before the revoke"
        );
        assert!(!check(&app, "user:lisa", Permission::ListSecrets, "finance").await.allowed, "round {round}");
        authz.clone().grant_domain_permission(lisa(Permission::ListSecrets)).await.unwrap();
        assert!(on_replica(Permission::ListSecrets).await, "round {round}: the replica missed the grant");
    }
}

async fn check(app: &TestApp, subject: &str, permission: Permission, domain: &str) -> pb::CheckResponse {
    app.as_user(ADMIN)
        .authz
        .clone()
        .check(pb::CheckRequest {
            subject: subject.into(),
            permission: permission as i32,
            domain: domain.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

const ALL: [Permission; 5] = [
    Permission::ListSecrets,
    Permission::ManageSecrets,
    Permission::UseSecrets,
    Permission::ManageDomainAccess,
    Permission::PlatformAdmin,
];

async fn everything_is_denied_by_default(app: TestApp) {
    for p in ALL {
        let d = if p == Permission::PlatformAdmin { "" } else { "finance" };
        let answer = check(&app, "user:eve", p, d).await;
        assert!(!answer.allowed, "{p:?}");
        assert!(answer.reason.contains("user:eve"), "{}", answer.reason);
    }
}

async fn roles_and_permissions_decide_each_check_with_a_reason(app: TestApp) {
    app.setup_domain("finance").await;
    use Permission::*;
    let cases = [
        ("user:admin", PlatformAdmin, "", true, "is a platform admin"),
        ("user:admin", ManageSecrets, "finance", true, "is a platform admin"),
        ("user:olivia", ManageDomainAccess, "finance", true, "owns domain \"finance\""),
        ("user:olivia", PlatformAdmin, "", false, "not one"),
        ("user:lisa", ListSecrets, "finance", true, "holds LIST_SECRETS"),
        ("user:lisa", ManageSecrets, "finance", false, "does not hold MANAGE_SECRETS"),
        ("user:max", ManageSecrets, "finance", true, "holds MANAGE_SECRETS"),
        ("user:nina", UseSecrets, "finance", true, "is a member"),
        ("user:nina", ListSecrets, "finance", false, "does not hold LIST_SECRETS"),
        ("user:nina", ManageDomainAccess, "finance", false, "not an owner"),
        ("user:oscar", UseSecrets, "finance", false, "not a member of domain \"finance\""),
        ("user:oscar", ListSecrets, "other", true, "holds LIST_SECRETS"),
    ];
    for (subject, p, domain, allowed, reason) in cases {
        let a = check(&app, subject, p, domain).await;
        assert_eq!(a.allowed, allowed, "{subject} {p:?} {domain}: {}", a.reason);
        assert!(a.reason.contains(reason), "{subject} {p:?}: {}", a.reason);
    }
}

async fn batch_check_answers_every_check_in_order(app: TestApp) {
    app.setup_domain("finance").await;
    let checks = ["user:lisa", "user:nina", "user:lisa", "user:eve"]
        .map(|s| pb::CheckRequest {
            subject: s.into(),
            permission: Permission::ListSecrets as i32,
            domain: "finance".into(),
            ..Default::default()
        })
        .to_vec();
    let results = app
        .as_user(ADMIN)
        .authz
        .clone()
        .batch_check(pb::BatchCheckRequest { checks })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.iter().map(|r| r.allowed).collect::<Vec<_>>(), [true, false, true, false]);
}

async fn granting_needs_membership_and_removal_takes_permissions_along(app: TestApp) {
    let mut authz = app.as_user(ADMIN).authz.clone();
    let grant = pb::GrantDomainPermissionRequest {
        domain: "finance".into(),
        subject: "user:zoe".into(),
        permission: Permission::ListSecrets as i32,
    };
    let err = authz.grant_domain_permission(grant.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("AddDomainMember first"), "{}", err.message());
    let add = pb::AddDomainMemberRequest {
        domain: "finance".into(),
        subject: "user:zoe".into(),
        role: DomainRole::Member as i32,
    };
    authz.add_domain_member(add.clone()).await.unwrap();
    let member = authz.grant_domain_permission(grant.clone()).await.unwrap().into_inner();
    assert_eq!(member.permissions, [Permission::ListSecrets as i32]);
    authz.grant_domain_permission(grant).await.expect("granting twice is harmless");
    authz
        .remove_domain_member(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:zoe".into() })
        .await
        .unwrap();
    assert!(!check(&app, "user:zoe", Permission::UseSecrets, "finance").await.allowed);
    let member = authz.add_domain_member(add).await.unwrap().into_inner();
    assert!(member.permissions.is_empty(), "permissions went with the membership");
    let err = authz
        .remove_domain_member(pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:nobody".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn adding_a_member_again_changes_its_role(app: TestApp) {
    app.setup_domain("finance").await;
    let mut authz = app.as_user(OWNER).authz.clone();
    let promote = pb::AddDomainMemberRequest {
        domain: "finance".into(),
        subject: "user:nina".into(),
        role: DomainRole::Owner as i32,
    };
    assert_eq!(authz.add_domain_member(promote).await.unwrap().into_inner().role(), DomainRole::Owner);
    assert!(check(&app, "user:nina", Permission::ManageDomainAccess, "finance").await.allowed);
    let members = authz
        .list_domain_members(pb::ListDomainMembersRequest { domain: "finance".into() })
        .await
        .unwrap()
        .into_inner()
        .members;
    let subjects: Vec<_> = members.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["user:lisa", "user:max", "user:nina", "user:olivia"]);
    // An owner manages its own domain only.
    let err = authz
        .add_domain_member(pb::AddDomainMemberRequest { domain: "other".into(), subject: "user:x".into(), role: 2 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn callers_may_check_only_their_own_permissions_unless_admin(app: TestApp) {
    app.setup_domain("finance").await;
    let mut lisa = app.as_user(LISTER).authz.clone();
    let own = pb::CheckRequest {
        subject: "user:lisa".into(),
        permission: Permission::ListSecrets as i32,
        domain: "finance".into(),
        ..Default::default()
    };
    assert!(lisa.check(own).await.unwrap().into_inner().allowed);
    let other = pb::CheckRequest {
        subject: "user:max".into(),
        permission: Permission::ManageSecrets as i32,
        domain: "finance".into(),
        ..Default::default()
    };
    let err = lisa.check(other.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("its own permissions"), "{}", err.message());
    assert!(app.as_user(ADMIN).authz.clone().check(other).await.unwrap().into_inner().allowed);
}

async fn configured_admins_cannot_be_revoked_but_granted_ones_can(app: TestApp) {
    let mut authz = app.as_user(ADMIN).authz.clone();
    let err =
        authz.revoke_platform_admin(pb::RevokePlatformAdminRequest { subject: "user:admin".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("bootstrap_admins"), "{}", err.message());
    authz.grant_platform_admin(pb::GrantPlatformAdminRequest { subject: "user:eve".into() }).await.unwrap();
    assert!(check(&app, "user:eve", Permission::PlatformAdmin, "").await.allowed);
    let admins = authz.list_platform_admins(pb::ListPlatformAdminsRequest {}).await.unwrap().into_inner().admins;
    let listed: Vec<_> = admins.iter().map(|a| (a.subject.as_str(), a.from_configuration)).collect();
    assert_eq!(listed, [("user:admin", true), ("user:eve", false)]);
    authz.revoke_platform_admin(pb::RevokePlatformAdminRequest { subject: "user:eve".into() }).await.unwrap();
    assert!(!check(&app, "user:eve", Permission::PlatformAdmin, "").await.allowed);
    let err =
        authz.revoke_platform_admin(pb::RevokePlatformAdminRequest { subject: "user:eve".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn grants_survive_a_restart(mut app: TestApp) {
    app.setup_domain("finance").await;
    app.stop_authz().await;
    app.start_authz().await;
    assert!(check(&app, "user:lisa", Permission::ListSecrets, "finance").await.allowed);
    assert!(check(&app, "user:olivia", Permission::ManageDomainAccess, "finance").await.allowed);
}

#[tokio::test]
async fn replicas_starting_together_on_one_postgres_database_all_migrate() {
    let Some(db) = postgres::fresh_database().await else { return };
    let starts = (0..4).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move {
            authz_service::db::connect(&url, std::time::Duration::from_secs(5), None).await.map(drop)
        })
    });
    for s in starts {
        s.await.unwrap().expect("each replica migrates or finds the schema current");
    }
    db.drop_database().await;
}

async fn a_grant_racing_a_removal_never_leaves_a_permission_behind(app: TestApp) {
    let authz = app.as_user(ADMIN).authz.clone();
    let zoe = |role: DomainRole| pb::AddDomainMemberRequest {
        domain: "finance".into(),
        subject: "user:zoe".into(),
        role: role as i32,
    };
    let grant = pb::GrantDomainPermissionRequest {
        domain: "finance".into(),
        subject: "user:zoe".into(),
        permission: Permission::ManageSecrets as i32,
    };
    let remove = pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: "user:zoe".into() };
    for round in 0..40 {
        authz.clone().add_domain_member(zoe(DomainRole::Member)).await.unwrap();
        let (mut a, mut b) = (authz.clone(), authz.clone());
        let (granted, removed) =
            tokio::join!(a.grant_domain_permission(grant.clone()), b.remove_domain_member(remove.clone()));
        removed.expect("the member existed");
        if let Err(e) = granted {
            assert_eq!(e.code(), Code::FailedPrecondition, "round {round}: {e:?}");
        }
        let back = authz.clone().add_domain_member(zoe(DomainRole::Member)).await.unwrap().into_inner();
        assert!(back.permissions.is_empty(), "round {round}: a permission outlived the membership: {back:?}");
        assert!(!check(&app, "user:zoe", Permission::ManageSecrets, "finance").await.allowed, "round {round}");
        authz.clone().remove_domain_member(remove.clone()).await.unwrap();
    }
}

async fn a_stored_role_that_is_not_understood_is_an_error_not_membership(app: TestApp) {
    use sea_orm::ConnectionTrait;
    let db = connect_database(&app.database_url).await.unwrap();
    db.execute_unprepared(
        "INSERT INTO domain_members (domain, subject, role, created_at) \
         VALUES ('finance', 'user:zed', 'superuser', '2026-01-01T00:00:00Z')",
    )
    .await
    .unwrap();
    let err = app
        .as_user(ADMIN)
        .authz
        .clone()
        .check(pb::CheckRequest {
            subject: "user:zed".into(),
            permission: Permission::UseSecrets as i32,
            domain: "finance".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(err.message(), "authz-service: internal error", "the cause is logged, not sent");
}

async fn a_batch_of_checks_costs_no_query_and_is_capped(app: TestApp) {
    app.setup_domain("finance").await;
    let checks: Vec<pb::CheckRequest> = (0..50)
        .map(|i| pb::CheckRequest {
            subject: ["user:lisa", "user:max", "user:nina", "user:eve", "user:admin"][i % 5].into(),
            permission: ALL[i % 4] as i32,
            domain: if i % 3 == 0 { "finance".into() } else { format!("domain-{}", i % 10) },
            ..Default::default()
        })
        .collect();
    let backend = if app.database_url.starts_with("postgres") { "postgres" } else { "sqlite" };
    let selects = format!(r#"secrets_backend_calls_total{{backend="{backend}",operation="select"}}"#);
    let batch = || async {
        app.as_user(ADMIN)
            .authz
            .clone()
            .batch_check(pb::BatchCheckRequest { checks: checks.clone() })
            .await
            .unwrap()
            .into_inner()
            .results
    };
    // The first batch after the setup's changes loads the grants into memory.
    batch().await;
    // SQLite belongs to this process, which knows its changes; on
    // PostgreSQL every change is announced to every replica. The service's
    // own background work (the replicas' leases) may query now and then,
    // never per batch: some batch costs nothing.
    let mut costs = Vec::new();
    let results = loop {
        let before = sample(&http_get(&app.metrics_url("authz-service")).await.1, &selects);
        let results = batch().await;
        let after = sample(&http_get(&app.metrics_url("authz-service")).await.1, &selects);
        costs.push(after - before);
        if after == before || costs.len() == 10 {
            break results;
        }
    };
    assert_eq!(results.len(), 50);
    assert_eq!(costs.last(), Some(&0.0), "50 checks over 11 domains and 5 subjects cost queries: {costs:?}");
    assert!(results[0].allowed, "lisa holds LIST_SECRETS in finance: {:?}", results[0]);
    assert!(!results[1].allowed, "max is no member of domain-1: {:?}", results[1]);

    let too_many = pb::BatchCheckRequest { checks: checks.into_iter().cycle().take(1001).collect() };
    let err = app.as_user(ADMIN).authz.clone().batch_check(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("checks: has 1001 checks; at most 1000"), "{}", err.message());
}

#[tokio::test]
async fn a_database_that_stops_answering_is_unavailable_naming_it_once_the_lease_ends_and_recovers() {
    let Some(db) = postgres::fresh_database().await else { return };
    let proxy = integration_tests::proxy::FreezableProxy::start(db.server_addr()).await;
    let app = TestApp::spawn_with(Options { database_url: Some(db.url_via(proxy.port)), ..Default::default() }).await;
    app.setup_domain("finance").await;
    let ask = || async {
        app.as_user(LISTER)
            .authz
            .clone()
            .check(pb::CheckRequest {
                subject: "user:lisa".into(),
                permission: Permission::ListSecrets as i32,
                domain: "finance".into(),
                ..Default::default()
            })
            .await
    };
    assert!(ask().await.unwrap().into_inner().allowed);

    proxy.freeze();
    // Its copy of the grants is current until its lease among the replicas
    // (3 s) runs out: until then it answers from memory, rightly (no change
    // can return through another replica meanwhile); then it fails closed.
    let mut answered = 0;
    let err = loop {
        match ask().await {
            Ok(r) => assert!(r.into_inner().allowed, "an answer from memory is still right"),
            Err(e) => break e,
        }
        answered += 1;
        assert!(answered < 300, "still answering from memory long after its lease ran out");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        "authz-service: database (postgres) is unavailable: did not answer within 1500 ms",
        "named once, by the database's own bound, before the gateway's 2 s request timeout"
    );
    // Through the secret service too: its authz call fails the same way.
    let err = app.as_user(LISTER).list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("database (postgres) is unavailable"), "{}", err.message());
    assert_eq!(err.message().matches("authz-service").count(), 1, "{}", err.message());

    proxy.thaw();
    let mut recovered = false;
    for _ in 0..20 {
        if ask().await.is_ok_and(|r| r.into_inner().allowed) {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(recovered, "the authz service answers again once the database does");
    drop(app);
    db.drop_database().await;
}

#[tokio::test]
async fn the_sqlite_database_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let path = app.dir.path().join("authz.db");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
}

/// 200 grant changes at once (they share transactions and rounds of the
/// decision leases): every one that was allowed lands, and the 20 refused
/// among them (a grant to a non-member) fail alone, changing nothing.
async fn two_hundred_concurrent_grant_changes_land_and_refusals_fail_alone(app: TestApp) {
    let authz = app.as_user_patiently(ADMIN).authz.clone();
    for i in 0..30 {
        authz
            .clone()
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:m{i}"),
                role: DomainRole::Member as i32,
            })
            .await
            .unwrap();
    }
    let grant = |subject: String, permission: Permission| {
        let mut authz = authz.clone();
        async move {
            authz
                .grant_domain_permission(pb::GrantDomainPermissionRequest {
                    domain: "finance".into(),
                    subject,
                    permission: permission as i32,
                })
                .await
                .map(|_| ())
        }
    };
    let grants = (0..30).flat_map(|i| {
        [grant(format!("user:m{i}"), Permission::ListSecrets), grant(format!("user:m{i}"), Permission::ManageSecrets)]
    });
    let refused = (0..20).map(|i| grant(format!("user:ghost{i}"), Permission::ListSecrets));
    let additions = (0..100).map(|i| {
        let mut authz = authz.clone();
        async move {
            authz
                .add_domain_member(pb::AddDomainMemberRequest {
                    domain: "finance".into(),
                    subject: format!("user:n{i}"),
                    role: DomainRole::Member as i32,
                })
                .await
                .map(|_| ())
        }
    });
    let groups = (0..20).map(|i| {
        let mut authz = authz.clone();
        async move {
            authz
                .create_group(pb::CreateGroupRequest { name: format!("g{i}"), description: String::new() })
                .await
                .map(|_| ())
        }
    });
    let (grants, refused, additions, groups) = tokio::join!(
        futures::future::join_all(grants),
        futures::future::join_all(refused),
        futures::future::join_all(additions),
        futures::future::join_all(groups),
    );
    for (i, result) in grants.into_iter().chain(additions).chain(groups).enumerate() {
        result.unwrap_or_else(|e| panic!("change {i}: {e:?}"));
    }
    for (i, result) in refused.into_iter().enumerate() {
        let e = result.expect_err("a non-member is granted nothing");
        assert_eq!(e.code(), Code::FailedPrecondition, "refused grant {i}: {e:?}");
        assert!(e.message().contains(&format!("user:ghost{i} is not a member")), "{}", e.message());
    }
    for i in 0..30 {
        for permission in [Permission::ListSecrets, Permission::ManageSecrets] {
            assert!(check(&app, &format!("user:m{i}"), permission, "finance").await.allowed, "m{i} {permission:?}");
        }
    }
    for i in 0..20 {
        assert!(!check(&app, &format!("user:ghost{i}"), Permission::ListSecrets, "finance").await.allowed);
    }
    let members = authz
        .clone()
        .list_domain_members(pb::ListDomainMembersRequest { domain: "finance".into() })
        .await
        .unwrap()
        .into_inner()
        .members;
    let members: Vec<&str> = members.iter().map(|m| m.subject.as_str()).collect();
    assert!((0..100).all(|i| members.contains(&format!("user:n{i}").as_str())), "{members:?}");
    assert!(!members.iter().any(|m| m.starts_with("user:ghost")), "{members:?}");
    let groups = authz.clone().list_groups(pb::ListGroupsRequest::default()).await.unwrap().into_inner().groups;
    assert_eq!(groups.iter().filter(|g| g.name.starts_with('g')).count(), 20);
}
