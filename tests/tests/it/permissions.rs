//! Each management RPC as each persona: platform admin, domain owner,
//! members with and without the permission, another domain's member, a user
//! with no grants, and an unauthenticated caller.

use integration_tests::*;
use secrets_proto::v1::{self as pb, DomainRole};
use tonic::{Code, Status};

#[derive(Clone, Copy, Debug)]
enum Op {
    List,
    Create,
    Update,
    Delete,
    ListGlobalFromDomain,
    CreateGlobal,
    ListAdmin,
    CreateAdmin,
    AddMember,
    ListMembers,
    GrantAdmin,
}

const OPS: [Op; 11] = [
    Op::List,
    Op::Create,
    Op::Update,
    Op::Delete,
    Op::ListGlobalFromDomain,
    Op::CreateGlobal,
    Op::ListAdmin,
    Op::CreateAdmin,
    Op::AddMember,
    Op::ListMembers,
    Op::GrantAdmin,
];

fn allowed(user: &str, op: Op) -> bool {
    use Op::*;
    match user {
        ADMIN => true,
        OWNER => matches!(op, List | Create | Update | Delete | ListGlobalFromDomain | AddMember | ListMembers),
        LISTER => matches!(op, List | ListGlobalFromDomain),
        MANAGER => matches!(op, Create | Update | Delete),
        _ => false,
    }
}

async fn attempt(app: &TestApp, c: &Clients, op: Op, tag: &str) -> Result<(), Status> {
    let key = format!("{op:?}-{tag}").to_lowercase();
    // Keys to update and delete exist beforehand.
    if matches!(op, Op::Update | Op::Delete) {
        app.as_user(ADMIN).create("finance", &key, "v").await.unwrap();
    }
    match op {
        Op::List => c.list("finance").await.map(drop),
        Op::Create => c.create("finance", &key, "v").await.map(drop),
        Op::Update => c.update("finance", &key, "v2").await.map(drop),
        Op::Delete => c.delete("finance", &key).await,
        Op::ListGlobalFromDomain => c.list_in(pb::Scope::Global, "finance").await.map(drop),
        Op::CreateGlobal => c.create_in(pb::Scope::Global, "", &key, "v").await.map(drop),
        Op::ListAdmin => c.list_in(pb::Scope::Admin, "").await.map(drop),
        Op::CreateAdmin => c.create_in(pb::Scope::Admin, "", &key, "v").await.map(drop),
        Op::AddMember => c
            .authz
            .clone()
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:new-{tag}"),
                role: DomainRole::Member as i32,
            })
            .await
            .map(drop),
        Op::ListMembers => c
            .authz
            .clone()
            .list_domain_members(pb::ListDomainMembersRequest { domain: "finance".into() })
            .await
            .map(drop),
        Op::GrantAdmin => c
            .authz
            .clone()
            .grant_platform_admin(pb::GrantPlatformAdminRequest { subject: format!("user:admin-{tag}") })
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn each_rpc_is_allowed_exactly_for_the_personas_that_hold_its_permission() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let mut failures = Vec::new();
    for user in USERS {
        let clients = app.as_user(user);
        for op in OPS {
            let result = attempt(&app, &clients, op, user).await;
            match (allowed(user, op), &result) {
                (true, Ok(())) => {}
                (false, Err(s)) if s.code() == Code::PermissionDenied => {
                    if !s.message().contains(&format!("user:{user}")) {
                        failures.push(format!("{user} {op:?}: denial does not name the principal: {}", s.message()));
                    }
                }
                (expected, r) => failures.push(format!("{user} {op:?}: expected allowed={expected}, got {r:?}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn unauthenticated_calls_are_refused_for_every_rpc() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let anonymous = app.anonymous();
    let wrong = Clients::new(&app.gateway_url, Some("not-a-real-token"), None);
    for op in OPS {
        for (who, c) in [("anonymous", &anonymous), ("wrong-token", &wrong)] {
            let err = attempt(&app, c, op, who).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{who} {op:?}: {err:?}");
        }
    }
    let err = anonymous.resolve("finance", vec![text_item("x", "plain")]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn denials_say_what_was_missing() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let err = app.as_user(MEMBER).list("finance").await.unwrap_err();
    assert!(err.message().contains("does not hold LIST_SECRETS in domain \"finance\""), "{}", err.message());
    let err = app.as_user(OUTSIDER).create("finance", "k", "v").await.unwrap_err();
    assert!(err.message().contains("is not a member of domain \"finance\""), "{}", err.message());
}
