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
