//! The authz service's rules and persistence. Every test runs on SQLite and,
//! when DATABASE_URL names a PostgreSQL server, on a fresh database there.

use integration_tests::{postgres, *};
use secrets_proto::v1::{self as pb, DomainRole, Permission};
use tonic::Code;

macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use integration_tests::*;

                #[tokio::test]
                async fn sqlite() {
                    super::$name(TestApp::spawn().await).await
                }

                #[tokio::test]
                async fn postgres() {
                    let Some(db) = integration_tests::postgres::fresh_database().await else {
                        eprintln!("DATABASE_URL is not set: PostgreSQL variant not run");
                        return;
                    };
                    let app = TestApp::spawn_with(Options { database_url: Some(db.url.clone()), ..Default::default() }).await;
                    super::$name(app).await;
                    db.drop_database().await;
                }
            }
        )*
    };
}

on_both_databases!(
    everything_is_denied_by_default,
    roles_and_permissions_decide_each_check_with_a_reason,
    batch_check_answers_every_check_in_order,
    granting_needs_membership_and_removal_takes_permissions_along,
    adding_a_member_again_changes_its_role,
    callers_may_check_only_their_own_permissions_unless_admin,
    configured_admins_cannot_be_revoked_but_granted_ones_can,
    grants_survive_a_restart,
);

async fn check(app: &TestApp, subject: &str, permission: Permission, domain: &str) -> pb::CheckResponse {
    app.as_user(ADMIN)
        .authz
        .clone()
        .check(pb::CheckRequest { subject: subject.into(), permission: permission as i32, domain: domain.into() })
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
    };
    assert!(lisa.check(own).await.unwrap().into_inner().allowed);
    let other = pb::CheckRequest {
        subject: "user:max".into(),
        permission: Permission::ManageSecrets as i32,
        domain: "finance".into(),
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
    let Some(db) = postgres::fresh_database().await else {
        eprintln!("DATABASE_URL is not set: PostgreSQL variant not run");
        return;
    };
    let starts = (0..4).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move { authz_service::db::connect(&url, None).await.map(drop) })
    });
    for s in starts {
        s.await.unwrap().expect("each replica migrates or finds the schema current");
    }
    db.drop_database().await;
}
