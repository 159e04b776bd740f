//! Groups, resource bundles and the resources they hold: who holds VIEW,
//! UPDATE and USE, through which path, and what can never change. Every test
//! runs on SQLite and PostgreSQL.

use integration_tests::{on_both_databases, *};
use secrecy::ExposeSecret;
use secrets_proto::{
    internal::v1::{self as internal, resource_registry_client::ResourceRegistryClient},
    v1::{self as pb, Permission},
};
use tonic::{Code, Request, Status};

on_both_databases!(
    nested_group_members_hold_what_the_group_holds_and_the_reason_names_the_path,
    a_membership_that_would_form_a_cycle_is_refused_naming_it,
    bundle_names_never_change_and_resources_never_move,
    a_bundle_that_holds_resources_is_not_deleted_and_the_refusal_names_them,
    a_revoked_grant_takes_effect_on_the_next_call,
    checks_through_nested_groups_cost_no_query,
    only_owners_and_platform_admins_manage_a_bundle,
    groups_from_the_token_count_as_memberships,
    only_domain_owners_place_resources_and_only_in_bundles_they_own,
    groups_are_domain_members_too,
);

const CONFIG: &str = "cfg-1";

fn config() -> pb::Resource {
    pb::Resource { r#type: pb::ResourceType::VaultConfig as i32, id: CONFIG.into() }
}

/// The internal registry, called as the vault-config-service does: with the
/// internal credential, acting for `principal`.
async fn register(app: &TestApp, principal: &str, bundle: &str, domain: &str) -> Result<(), Status> {
    register_as(app, principal, CONFIG, bundle, domain).await
}

async fn register_as(app: &TestApp, principal: &str, id: &str, bundle: &str, domain: &str) -> Result<(), Status> {
    let mut request = Request::new(internal::RegisterResourceRequest {
        resource: Some(pb::Resource { r#type: pb::ResourceType::VaultConfig as i32, id: id.into() }),
        bundle: bundle.into(),
        domain: domain.into(),
    });
    let md = request.metadata_mut();
    md.insert("authorization", format!("Bearer {}", app.internal_token.expose_secret()).parse().unwrap());
    md.insert("x-iomete-principal", principal.parse().unwrap());
    ResourceRegistryClient::new(channel(&app.authz_service_url)).register_resource(request).await.map(|_| ())
}

async fn check(app: &TestApp, who: &str, permission: Permission, groups: &[&str]) -> pb::CheckResponse {
    app.as_user(ADMIN)
        .authz
        .clone()
        .check(pb::CheckRequest {
            subject: who.into(),
            permission: permission as i32,
            resource: Some(config()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Groups eng ⊃ data-eng ⊃ alice, vault-admins ⊃ olga; bundle finance-vault
/// owned by group:vault-admins with USE for group:eng and VIEW for vic;
/// cfg-1 in it.
async fn setup(app: &TestApp) {
    app.setup_domain("finance").await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    for g in ["eng", "data-eng", "vault-admins"] {
        authz.create_group(pb::CreateGroupRequest { name: g.into(), description: String::new() }).await.unwrap();
    }
    for (group, member) in [("eng", "group:data-eng"), ("data-eng", "user:alice"), ("vault-admins", "user:olga")] {
        authz.add_group_member(pb::AddGroupMemberRequest { group: group.into(), member: member.into() }).await.unwrap();
    }
    authz
        .create_bundle(pb::CreateBundleRequest {
            name: "finance-vault".into(),
            description: "Vault configs of finance".into(),
            owner: "group:vault-admins".into(),
        })
        .await
        .unwrap();
    for (subject, permission) in [("group:eng", Permission::Use), ("user:vic", Permission::View)] {
        authz
            .grant_bundle_permission(pb::GrantBundlePermissionRequest {
                bundle: "finance-vault".into(),
                subject: subject.into(),
                permission: permission as i32,
            })
            .await
            .unwrap();
    }
    register(app, "user:admin", "finance-vault", "finance").await.unwrap();
}

async fn nested_group_members_hold_what_the_group_holds_and_the_reason_names_the_path(app: TestApp) {
    setup(&app).await;
    let used = check(&app, "user:alice", Permission::Use, &[]).await;
    assert!(used.allowed, "{}", used.reason);
    assert_eq!(used.reason, "user:alice ∈ group:data-eng ∈ group:eng; group:eng holds USE on bundle finance-vault");
    let update = check(&app, "user:alice", Permission::Update, &[]).await;
    assert!(!update.allowed);
    assert!(update.reason.contains("holds no UPDATE on Vault config \"cfg-1\""), "{}", update.reason);
    let owner = check(&app, "user:olga", Permission::Update, &[]).await;
    assert!(owner.allowed, "{}", owner.reason);
    assert!(owner.reason.contains("group:vault-admins owns bundle finance-vault"), "{}", owner.reason);
    assert!(check(&app, "user:vic", Permission::View, &[]).await.allowed);
    assert!(!check(&app, "user:vic", Permission::Use, &[]).await.allowed);
    assert!(!check(&app, "user:eve", Permission::View, &[]).await.allowed);
    assert!(check(&app, "user:admin", Permission::Update, &[]).await.allowed, "platform admins hold everything");
}

async fn a_membership_that_would_form_a_cycle_is_refused_naming_it(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    let err = authz
        .add_group_member(pb::AddGroupMemberRequest { group: "data-eng".into(), member: "group:eng".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("would form a cycle: group:eng ∈ group:data-eng ∈ group:eng"), "{}", err.message());
    let err = authz
        .add_group_member(pb::AddGroupMemberRequest { group: "eng".into(), member: "group:eng".into() })
        .await
        .unwrap_err();
    assert!(err.message().contains("cycle"), "{}", err.message());
    let groups = authz.list_groups(pb::ListGroupsRequest {}).await.unwrap().into_inner().groups;
    let data_eng = groups.iter().find(|g| g.name == "data-eng").unwrap();
    assert_eq!(data_eng.members, ["user:alice"], "nothing was added");
}

async fn bundle_names_never_change_and_resources_never_move(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    let err = authz
        .update_bundle(pb::UpdateBundleRequest {
            name: "finance-vault".into(),
            new_name: Some("money-vault".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("bundle names never change"), "{}", err.message());
    let described = authz
        .update_bundle(pb::UpdateBundleRequest {
            name: "finance-vault".into(),
            description: Some("finance only".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((described.name.as_str(), described.description.as_str()), ("finance-vault", "finance only"));

    authz
        .create_bundle(pb::CreateBundleRequest {
            name: "other-vault".into(),
            description: String::new(),
            owner: "user:admin".into(),
        })
        .await
        .unwrap();
    let err = register(&app, "user:admin", "other-vault", "finance").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("belongs to bundle finance-vault"), "{}", err.message());
    assert!(err.message().contains("never changes"), "{}", err.message());
    register(&app, "user:admin", "finance-vault", "finance").await.expect("registering again in place is harmless");
}

async fn a_bundle_that_holds_resources_is_not_deleted_and_the_refusal_names_them(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    let err = authz.delete_bundle(pb::DeleteBundleRequest { name: "finance-vault".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("still holds VAULT_CONFIG cfg-1"), "{}", err.message());
    let bundle = authz.get_bundle(pb::GetBundleRequest { name: "finance-vault".into() }).await.unwrap().into_inner();
    assert_eq!(bundle.resources, [config()]);
    assert_eq!(bundle.grants.len(), 2, "nothing was deleted");
}

async fn a_revoked_grant_takes_effect_on_the_next_call(app: TestApp) {
    setup(&app).await;
    assert!(check(&app, "user:alice", Permission::Use, &[]).await.allowed);
    app.as_user(ADMIN)
        .authz
        .clone()
        .revoke_bundle_permission(pb::RevokeBundlePermissionRequest {
            bundle: "finance-vault".into(),
            subject: "group:eng".into(),
            permission: Permission::Use as i32,
        })
        .await
        .unwrap();
    assert!(!check(&app, "user:alice", Permission::Use, &[]).await.allowed, "no decision is cached past a revoke");
    app.as_user(ADMIN)
        .authz
        .clone()
        .remove_group_member(pb::RemoveGroupMemberRequest { group: "vault-admins".into(), member: "user:olga".into() })
        .await
        .unwrap();
    assert!(!check(&app, "user:olga", Permission::Update, &[]).await.allowed, "ownership through a removed membership");
}

async fn checks_through_nested_groups_cost_no_query(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    // Three more levels: alice ∈ data-eng ∈ eng ∈ l1 ∈ l2 ∈ l3.
    for (g, parent) in [("l1", "eng"), ("l2", "l1"), ("l3", "l2")] {
        authz.create_group(pb::CreateGroupRequest { name: g.into(), description: String::new() }).await.unwrap();
        authz
            .add_group_member(pb::AddGroupMemberRequest { group: g.into(), member: format!("group:{parent}") })
            .await
            .unwrap();
    }
    authz
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: "finance-vault".into(),
            subject: "group:l3".into(),
            permission: Permission::Update as i32,
        })
        .await
        .unwrap();
    let checks: Vec<pb::CheckRequest> = ["user:alice", "user:olga", "user:vic", "user:eve"]
        .iter()
        .flat_map(|who| {
            [Permission::View, Permission::Update, Permission::Use].map(|p| pb::CheckRequest {
                subject: who.to_string(),
                permission: p as i32,
                resource: Some(config()),
                ..Default::default()
            })
        })
        .chain([pb::CheckRequest {
            subject: "user:lisa".into(),
            permission: Permission::ListSecrets as i32,
            domain: "finance".into(),
            ..Default::default()
        }])
        .collect();
    let backend = if app.database_url.starts_with("postgres") { "postgres" } else { "sqlite" };
    let selects = format!(r#"secrets_backend_calls_total{{backend="{backend}",operation="select"}}"#);
    // The first batch after the changes above loads the grants into memory.
    authz.batch_check(pb::BatchCheckRequest { checks: checks.clone() }).await.unwrap();
    let before = sample(&http_get(&app.metrics_url("authz-service")).await.1, &selects);
    let results = authz.batch_check(pb::BatchCheckRequest { checks }).await.unwrap().into_inner().results;
    let after = sample(&http_get(&app.metrics_url("authz-service")).await.1, &selects);
    assert_eq!(after - before, 0.0, "13 checks through five levels of groups: no query");
    let update = &results[1];
    assert!(update.allowed, "{}", update.reason);
    assert_eq!(
        update.reason,
        "user:alice ∈ group:data-eng ∈ group:eng ∈ group:l1 ∈ group:l2 ∈ group:l3; group:l3 holds UPDATE on bundle finance-vault"
    );
    assert!(results[12].allowed, "domain checks ride in the same query: {}", results[12].reason);
}

async fn only_owners_and_platform_admins_manage_a_bundle(app: TestApp) {
    setup(&app).await;
    // olga owns it through group:vault-admins; alice only uses it.
    let olga = Clients::new(&app.gateway_url, Some(app.token(SPARK)), Some("user:olga"));
    let alice = Clients::new(&app.gateway_url, Some(app.token(SPARK)), Some("user:alice"));
    let grant = pb::GrantBundlePermissionRequest {
        bundle: "finance-vault".into(),
        subject: "user:zoe".into(),
        permission: Permission::View as i32,
    };
    olga.authz.clone().grant_bundle_permission(grant.clone()).await.expect("owners manage grants");
    let err = alice.authz.clone().grant_bundle_permission(grant).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("only the owner of bundle finance-vault (group:vault-admins)"), "{}", err.message());
    let err = olga
        .authz
        .clone()
        .update_bundle(pb::UpdateBundleRequest {
            name: "finance-vault".into(),
            owner: Some("user:olga".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "changing the owner is for platform admins");
    let err = olga
        .authz
        .clone()
        .create_bundle(pb::CreateBundleRequest {
            name: "mine".into(),
            description: String::new(),
            owner: "user:olga".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = olga
        .authz
        .clone()
        .create_group(pb::CreateGroupRequest { name: "mine".into(), description: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Who sees the bundle: anyone holding a permission on it.
    let listed = alice.authz.clone().list_bundles(pb::ListBundlesRequest {}).await.unwrap().into_inner().bundles;
    assert_eq!(listed.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["finance-vault"]);
    let eve = Clients::new(&app.gateway_url, Some(app.token(SPARK)), Some("user:eve"));
    assert!(eve.authz.clone().list_bundles(pb::ListBundlesRequest {}).await.unwrap().into_inner().bundles.is_empty());
    let err = eve.authz.clone().get_bundle(pb::GetBundleRequest { name: "finance-vault".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = app
        .anonymous()
        .authz
        .clone()
        .create_group(pb::CreateGroupRequest { name: "x".into(), description: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn groups_from_the_token_count_as_memberships(app: TestApp) {
    setup(&app).await;
    assert!(!check(&app, "user:carol", Permission::Use, &[]).await.allowed);
    let through_token = check(&app, "user:carol", Permission::Use, &["group:eng"]).await;
    assert!(through_token.allowed, "{}", through_token.reason);
    assert!(through_token.reason.starts_with("user:carol ∈ group:eng (token)"), "{}", through_token.reason);
    // Nested groups are followed from a token's group too.
    let nested = check(&app, "user:carol", Permission::Use, &["group:data-eng"]).await;
    assert!(nested.allowed, "{}", nested.reason);
    // A person cannot claim groups for itself through the gateway.
    let carol = Clients::new(&app.gateway_url, Some(app.token(SPARK)), Some("user:carol"));
    let err = carol
        .authz
        .clone()
        .check(pb::CheckRequest {
            subject: "user:carol".into(),
            permission: Permission::Use as i32,
            resource: Some(config()),
            groups: vec!["group:eng".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may not set groups"), "{}", err.message());
}

async fn only_domain_owners_place_resources_and_only_in_bundles_they_own(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    authz
        .create_bundle(pb::CreateBundleRequest {
            name: "olivia-vault".into(),
            description: String::new(),
            owner: "user:olivia".into(),
        })
        .await
        .unwrap();
    register_as(&app, "user:olivia", "cfg-2", "olivia-vault", "finance")
        .await
        .expect("a domain owner places a resource in a bundle she owns");
    let denied = [
        ("user:lisa", "olivia-vault", "is a member, not an owner"),
        ("user:olga", "finance-vault", "is not a member of domain \"finance\""),
        ("user:olivia", "finance-vault", "only the owner of bundle finance-vault"),
    ];
    for (who, bundle, reason) in denied {
        let err = register_as(&app, who, "cfg-3", bundle, "finance").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{who}");
        assert!(err.message().contains(reason), "{who}: {}", err.message());
    }
}

async fn groups_are_domain_members_too(app: TestApp) {
    setup(&app).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    authz
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "group:eng".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap();
    authz
        .grant_domain_permission(pb::GrantDomainPermissionRequest {
            domain: "finance".into(),
            subject: "group:eng".into(),
            permission: Permission::ListSecrets as i32,
        })
        .await
        .unwrap();
    let answer = authz
        .check(pb::CheckRequest {
            subject: "user:alice".into(),
            permission: Permission::ListSecrets as i32,
            domain: "finance".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.allowed, "{}", answer.reason);
    assert_eq!(
        answer.reason,
        "user:alice ∈ group:data-eng ∈ group:eng; group:eng holds LIST_SECRETS in domain \"finance\""
    );
    // And alice lists finance's secrets through the gateway.
    let alice = Clients::new(&app.gateway_url, Some(app.token(SPARK)), Some("user:alice"));
    alice.list("finance").await.expect("listing through a group's permission");
}
