//! Bad input gets INVALID_ARGUMENT (or the right code) with a message and a
//! field violation naming the field; nothing panics and nothing is lost.

use integration_tests::*;
use secrets_proto::v1::{self as pb, secret_value::Kind as Value};
use tonic::{Code, Status};
use tonic_types::StatusExt;

fn field_of(status: &Status) -> String {
    let details = status.get_error_details();
    let bad = details.bad_request().unwrap_or_else(|| panic!("no BadRequest details: {status:?}"));
    bad.field_violations[0].field.clone()
}

fn create(scope: i32, domain: &str, key: &str, value: Option<Value>) -> pb::CreateSecretRequest {
    let value = value.map(|kind| pb::SecretValue { kind: Some(kind) });
    pb::CreateSecretRequest { scope, domain: domain.into(), key: key.into(), value, request_id: String::new() }
}

fn text(s: &str) -> Option<Value> {
    Some(Value::Text(s.into()))
}

#[tokio::test]
async fn bad_secret_requests_name_the_field_and_the_rule() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "existing", "keep-me").await.unwrap();
    let d = pb::Scope::Domain as i32;
    let cases = vec![
        ("empty key", create(d, "finance", "", text("v")), "key", "must not be empty"),
        ("long key", create(d, "finance", &"k".repeat(254), text("v")), "key", "254 characters"),
        ("bad characters", create(d, "finance", "a/b", text("v")), "key", "contains '/'"),
        ("dot-dot", create(d, "finance", "..", text("v")), "key", "'..'"),
        ("empty domain", create(d, "", "k", text("v")), "domain", "must not be empty"),
        ("bad domain", create(d, "Finance", "k", text("v")), "domain", "DNS label"),
        ("reserved domain", create(d, "admin", "k", text("v")), "domain", "reserved"),
        ("unknown scope", create(7, "finance", "k", text("v")), "scope", "unknown value 7"),
        ("unset scope", create(0, "finance", "k", text("v")), "scope", "is required: set SCOPE_DOMAIN"),
        ("domain on global", create(pb::Scope::Global as i32, "finance", "k", text("v")), "domain", "must be empty"),
        ("missing value", create(d, "finance", "k", None), "value", "is required"),
        ("empty value", create(d, "finance", "k", text("")), "value", "must not be empty"),
        (
            "oversized value",
            create(d, "finance", "k", Some(Value::Binary(vec![1; 1024 * 1024 + 1]))),
            "value",
            "at most 1048576 bytes (1 MiB, the Kubernetes Secret size limit)",
        ),
    ];
    for (name, request, field, fragment) in cases {
        let err = admin.secrets.clone().create_secret(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert_eq!(field_of(&err), field, "{name}");
        assert!(err.message().starts_with(&format!("{field}: ")), "{name}: {}", err.message());
        assert!(err.message().contains(fragment), "{name}: {}", err.message());
    }
    assert_eq!(admin.list("finance").await.unwrap(), ["existing"], "nothing was lost or added");
}

#[tokio::test]
async fn an_object_that_would_pass_one_mebibyte_is_refused_saying_which_limit() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    let big = || Some(Value::Binary(vec![b'x'; 700 * 1024]));
    admin.secrets.clone().create_secret(create(pb::Scope::Domain as i32, "finance", "one", big())).await.unwrap();
    let err = admin
        .secrets
        .clone()
        .create_secret(create(pb::Scope::Domain as i32, "finance", "two", big()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("limit is 1048576 bytes"), "{}", err.message());
    assert_eq!(admin.list("finance").await.unwrap(), ["one"]);
}

#[tokio::test]
async fn bad_resolve_requests_name_the_field() {
    let app = TestApp::spawn().await;
    let service = app.as_service(Some("user:admin"));
    let err = service.resolve("Bad Domain", vec![]).await.unwrap_err();
    assert_eq!((err.code(), field_of(&err).as_str()), (Code::InvalidArgument, "domain"));
    let many = (0..1001).map(|i| text_item(&i.to_string(), "x")).collect();
    let err = service.resolve("finance", many).await.unwrap_err();
    assert_eq!((err.code(), field_of(&err).as_str()), (Code::InvalidArgument, "items"));
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    assert!(service.resolve("finance", vec![]).await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_metadata_is_refused_with_the_header_named() {
    let app = TestApp::spawn().await;
    let bad_principal = app.as_service(Some("bob"));
    let err = bad_principal.list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("x-on-behalf-of"), "{}", err.message());
    let user_on_behalf = Clients::new(&app.gateway_url, Some(app.token(LISTER)), Some("user:admin"));
    let err = user_on_behalf.list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("only platform services may act on behalf"), "{}", err.message());
}

#[tokio::test]
async fn bad_authz_requests_name_the_field() {
    let app = TestApp::spawn().await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    let err = authz
        .add_domain_member(pb::AddDomainMemberRequest { domain: "finance".into(), subject: "alice".into(), role: 1 })
        .await
        .unwrap_err();
    assert_eq!((err.code(), field_of(&err).as_str()), (Code::InvalidArgument, "subject"));
    let err = authz
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "user:alice".into(),
            role: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "role");
    let err = authz
        .grant_domain_permission(pb::GrantDomainPermissionRequest {
            domain: "finance".into(),
            subject: "user:alice".into(),
            permission: pb::Permission::UseSecrets as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "permission");
    assert!(err.message().contains("cannot be granted"), "{}", err.message());
    let err = authz
        .check(pb::CheckRequest {
            subject: "user:a".into(),
            permission: 99,
            domain: "finance".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "permission");
    let err = authz
        .batch_check(pb::BatchCheckRequest {
            checks: vec![
                pb::CheckRequest {
                    subject: "user:a".into(),
                    permission: 1,
                    domain: "finance".into(),
                    ..Default::default()
                },
                pb::CheckRequest { subject: "user:a".into(), permission: 1, domain: "".into(), ..Default::default() },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "checks[1].domain");
}

/// Many requests with arbitrary strings in every field: each gets an answer
/// (success or a client error code), and the services keep serving.
#[tokio::test]
async fn arbitrary_strings_never_crash_a_service() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    let service = app.as_service(Some("user:admin"));
    let pieces =
        ["", "a", "-", "..", "${secrets.", "}", "${secrets.a}", "\u{0}", "é", "🔑", "finance", "/", " ", "%", "\n"];
    let mut seed: u64 = 0x5eed;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..300 {
        let mut s = String::new();
        for _ in 0..next(6) {
            s.push_str(pieces[next(pieces.len())]);
        }
        let domain = if next(2) == 0 { "finance".to_string() } else { s.clone() };
        let scope = next(4) as i32;
        let r = admin.secrets.clone().create_secret(create(scope, &domain, &s, text(&s))).await;
        if let Err(e) = r {
            assert!(
                matches!(e.code(), Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition),
                "{e:?}"
            );
        }
        let r = service.resolve(&domain, vec![text_item(&s, &s), object_item(&s, &s, &s)]).await;
        if let Err(e) = r {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }
        // Saved workloads and the usage index.
        let payload = pb::WorkloadPayload {
            kind: Some(pb::workload_payload::Kind::Compute(pb::ComputePayload {
                env_vars: [
                    (s.clone(), integration_tests::payloads::text(&s)),
                    (format!("{s}2"), integration_tests::payloads::object(&s, &s)),
                ]
                .into(),
                ..Default::default()
            })),
        };
        let save = pb::SaveWorkloadRequest {
            domain: domain.clone(),
            id: s.clone(),
            name: s.clone(),
            payload: Some(payload),
            validate_only: next(2) == 0,
        };
        if let Err(e) = service.gateway.clone().save_workload(save).await {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }
        let delete = pb::DeleteWorkloadRequest { domain: domain.clone(), kind: next(12) as i32, id: s.clone() };
        if let Err(e) = service.gateway.clone().delete_workload(delete).await {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }
        let usages = pb::ListSecretUsagesRequest {
            secret: Some(pb::list_secret_usages_request::Secret::StoreSecret(pb::StoreSecret {
                scope,
                domain: domain.clone(),
                key: s.clone(),
            })),
            domain: String::new(),
            limit: next(2000) as u32,
        };
        if let Err(e) = service.gateway.clone().list_secret_usages(usages).await {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }
    }
    assert!(admin.list("finance").await.is_ok(), "still serving");
}

#[tokio::test]
async fn ten_thousand_characters_of_input_get_a_short_error_never_a_protocol_error() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    let long = "x".repeat(10_000);
    let mut failures = Vec::new();
    let err = admin.vault.clone().get_vault_config(pb::GetVaultConfigRequest { id: long.clone() }).await.unwrap_err();
    failures.push(("GetVaultConfig id", err));
    let err = admin
        .secrets
        .clone()
        .create_secret(create(pb::Scope::Domain as i32, "finance", &long, text("v")))
        .await
        .unwrap_err();
    failures.push(("CreateSecret key", err));
    let err =
        admin.secrets.clone().create_secret(create(pb::Scope::Domain as i32, &long, "k", text("v"))).await.unwrap_err();
    failures.push(("CreateSecret domain", err));
    let err = admin
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: format!("user:{long}"),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap_err();
    failures.push(("AddDomainMember subject", err));
    for (what, err) in &failures {
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().len() < 600, "{what}: a {} byte message", err.message().len());
    }
    // A resolve item's id is echoed on its own item, cut short too.
    let out = app
        .as_service(Some("user:admin"))
        .resolve(
            "finance",
            vec![pb::ResolveItem { id: long.clone(), reference: Some(pb::resolve_item::Reference::Text("x".into())) }],
        )
        .await
        .unwrap();
    match &out[0].result {
        Some(pb::resolved_item::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.len() < 600, "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_forwarded_request_has_the_gateways_size_limit_not_a_smaller_one() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    // 5 MiB: within the gateway's 8 MiB, so the secret-service gets it and
    // says which of its own limits it passes.
    let err = admin
        .secrets
        .clone()
        .create_secret(create(pb::Scope::Domain as i32, "finance", "big", Some(Value::Binary(vec![b'x'; 5 << 20]))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("at most 1048576 bytes"), "the secret-service's own rule: {}", err.message());
    // Past 8 MiB: the gateway refuses it.
    let err = admin
        .secrets
        .clone()
        .create_secret(create(pb::Scope::Domain as i32, "finance", "big", Some(Value::Binary(vec![b'x'; 9 << 20]))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(err.message().starts_with("gateway: "), "the refusing hop is named: {}", err.message());
    assert!(admin.list("finance").await.unwrap().is_empty());
}
