//! Each service token may call only its RPC groups and act only for whom
//! its configuration allows: by default resolve and workloads, for users
//! who are not platform admins. A leaked token of one platform component
//! cannot make itself an admin.

use integration_tests::*;
use secrets_proto::v1::{self as pb, Permission};
use tonic::Code;

fn jupyter(app: &TestApp, on_behalf_of: &str) -> Clients {
    Clients::new(&app.gateway_url, Some(app.token(JUPYTER)), Some(on_behalf_of))
}

#[tokio::test]
async fn a_default_service_token_resolves_for_users_but_never_for_a_platform_admin() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();
    let out = jupyter(&app, "user:nina").resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert_eq!(out[0].result, Some(pb::resolved_item::Result::Value(b"v".to_vec())));

    let err = jupyter(&app, "user:admin").resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may not act for user:admin, a platform admin"), "{}", err.message());
    let admin_key =
        pb::ResolveItem { id: "a".into(), reference: Some(pb::resolve_item::Reference::AdminKey("x".into())) };
    assert_eq!(
        jupyter(&app, "user:admin").resolve("finance", vec![admin_key]).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let err = jupyter(&app, "service:spark").resolve("finance", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may not act for service:spark"), "{}", err.message());
}

#[tokio::test]
async fn a_default_service_token_calls_only_resolve_and_workload_rpcs() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    // As the domain owner it may not manage secrets: the token is not allowed to.
    let err = jupyter(&app, &format!("user:{OWNER}")).create("finance", "k", "v").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("group manage_secrets"), "{}", err.message());
    let err = jupyter(&app, &format!("user:{OWNER}"))
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "user:mallory".into(),
            role: pb::DomainRole::Owner as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("group manage_access"), "{}", err.message());
    // The attack from the outside review: a leaked token granting itself admin.
    let err = jupyter(&app, "user:admin")
        .authz
        .clone()
        .grant_platform_admin(pb::GrantPlatformAdminRequest { subject: "service:jupyter".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("group admin"), "{}", err.message());
    // Reading what a workload may use is allowed.
    let answer = jupyter(&app, &format!("user:{LISTER}"))
        .authz
        .clone()
        .check(pb::CheckRequest {
            subject: format!("user:{LISTER}"),
            permission: Permission::ListSecrets as i32,
            domain: "finance".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.allowed);
    let listed = jupyter(&app, &format!("user:{LISTER}"))
        .gateway
        .clone()
        .list_selectable_secrets(pb::ListSelectableSecretsRequest { domain: "finance".into() })
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    // So is validating and saving a workload (the usage index).
    let saved = jupyter(&app, &format!("user:{LISTER}"))
        .gateway
        .clone()
        .save_workload(pb::SaveWorkloadRequest {
            domain: "finance".into(),
            id: "notebook".into(),
            payload: Some(pb::WorkloadPayload {
                kind: Some(pb::workload_payload::Kind::JupyterContainer(Default::default())),
            }),
            ..Default::default()
        })
        .await;
    assert!(saved.is_ok_and(|s| s.into_inner().saved));
    // Acting as itself, with its own (absent) permissions, is allowed.
    let own = Clients::new(&app.gateway_url, Some(app.token(JUPYTER)), None);
    let out = own.resolve("finance", vec![text_item("t", "plain")]).await.unwrap();
    assert_eq!(out.len(), 1);
}

/// A token whose `act_for` names exact principals acts for those and for
/// itself only, with its RPC groups and nothing more; a token with
/// `act_for_admins = true` may act for a platform admin, and then gets
/// what the admin may have, through the real permission checks.
#[tokio::test]
async fn exact_act_for_entries_and_act_for_admins_are_kept_to_the_letter() {
    use gateway::RpcGroup::*;
    let app = TestApp::spawn_with(Options {
        service_tokens: vec![
            ServiceToken {
                name: "scheduler",
                allow: Some(vec![Resolve]),
                act_for: Some(vec![format!("user:{MEMBER}"), "service:cron".into()]),
                act_for_admins: false,
            },
            ServiceToken {
                name: "console",
                allow: Some(vec![Resolve, ManageSecrets]),
                act_for: Some(vec!["user:*".into()]),
                act_for_admins: true,
            },
        ],
        ..Default::default()
    })
    .await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();
    app.as_user(ADMIN).create_in(pb::Scope::Admin, "", "control-plane", "admin-only").await.unwrap();
    let as_token = |token: &str, who: Option<&str>| Clients::new(&app.gateway_url, Some(app.token(token)), who);
    let domain_key = || vec![object_item("x", "finance", "k")];
    let value = |out: &[pb::ResolvedItem]| out[0].result.clone();

    // Exactly the named user, and the named service.
    let out = as_token("scheduler", Some(&format!("user:{MEMBER}"))).resolve("finance", domain_key()).await.unwrap();
    assert_eq!(value(&out), Some(pb::resolved_item::Result::Value(b"v".to_vec())));
    for other in [format!("user:{LISTER}"), format!("user:{OWNER}"), "service:spark".into(), "user:admin".into()] {
        let err = as_token("scheduler", Some(&other)).resolve("finance", domain_key()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{other}: {err:?}");
        assert!(err.message().contains(&format!("may not act for {other}")), "{other}: {}", err.message());
    }
    let cron = as_token("scheduler", Some("service:cron")).resolve("finance", domain_key()).await;
    assert!(cron.is_ok(), "service:cron is named: {cron:?}");
    // Its groups: resolve only, even for the user it may act for.
    let err = as_token("scheduler", Some(&format!("user:{MEMBER}"))).list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("group manage_secrets"), "{}", err.message());

    // act_for_admins: the admin's own permissions, no more than its groups.
    let admin_key = || {
        vec![pb::ResolveItem {
            id: "a".into(),
            reference: Some(pb::resolve_item::Reference::AdminKey("control-plane".into())),
        }]
    };
    let out = as_token("console", Some("user:admin")).resolve("finance", admin_key()).await.unwrap();
    assert_eq!(value(&out), Some(pb::resolved_item::Result::Value(b"admin-only".to_vec())));
    let out = as_token("console", Some(&format!("user:{MEMBER}"))).resolve("finance", admin_key()).await.unwrap();
    assert!(
        matches!(&out[0].result, Some(pb::resolved_item::Result::Error(e)) if e.code == Code::PermissionDenied as i32),
        "a user's admin key: {:?}",
        out[0].result
    );
    assert!(as_token("console", Some("user:admin")).list("finance").await.is_ok());
    let err = as_token("console", Some("user:admin"))
        .authz
        .clone()
        .grant_platform_admin(pb::GrantPlatformAdminRequest { subject: "service:console".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "acting for an admin gives no RPC group the token lacks");
    assert!(err.message().contains("group admin"), "{}", err.message());
    let err = as_token("console", Some("service:spark")).resolve("finance", domain_key()).await.unwrap_err();
    assert!(err.message().contains("may not act for service:spark"), "{}", err.message());
}
