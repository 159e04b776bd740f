//! `ResolveSecrets`: what a platform component gets when it launches a workload.

use integration_tests::{on_both_databases, stores::CountingBackend, *};
use secrets_proto::v1::{self as pb, resolved_item::Result as R};
use tonic::Code;
use tonic_types::StatusExt;

fn text(r: &pb::ResolvedItem) -> &str {
    match &r.result {
        Some(R::Text(t)) => t,
        other => panic!("{}: expected text, got {other:?}", r.id),
    }
}

fn error(r: &pb::ResolvedItem) -> (Code, &str) {
    match &r.result {
        Some(R::Error(e)) => (Code::from_i32(e.code), e.message.as_str()),
        other => panic!("{}: expected an error, got {other:?}", r.id),
    }
}

#[tokio::test]
async fn placeholders_and_objects_resolve_domain_first_then_global() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "db_user", "etl").await.unwrap();
    admin.create("finance", "db_password", "domain-pw").await.unwrap();
    admin.create_in(pb::Scope::Global, "", "db_password", "global-pw").await.unwrap();
    admin.create_in(pb::Scope::Global, "", "s3_key", "global-s3").await.unwrap();

    let items = vec![
        text_item("envVars.JDBC", "jdbc:pg://${secrets.db_user}:${secrets.db_password}@db/${secrets.db_user}"),
        text_item("sparkConf.spark.hadoop.fs.s3a.secret.key", "${secrets.s3_key}"),
        text_item("envVars.PLAIN", "no placeholders ${env:HOME} here"),
        object_item("envVars.DB", "finance", "db_password"),
        object_item("envVars.S3", "finance", "s3_key"),
    ];
    let out = app.as_service(Some("user:nina")).resolve("finance", items).await.unwrap();
    assert_eq!(out.len(), 5);
    assert_eq!(text(&out[0]), "jdbc:pg://etl:domain-pw@db/etl");
    assert_eq!(text(&out[1]), "global-s3");
    assert_eq!(text(&out[2]), "no placeholders ${env:HOME} here");
    assert_eq!(out[3].result, Some(R::Value(b"domain-pw".to_vec())));
    assert_eq!(out[4].result, Some(R::Value(b"global-s3".to_vec())), "objects fall back to global too");
    assert_eq!(out.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()[0], "envVars.JDBC", "ids come back in order");
}

#[tokio::test]
async fn problems_with_one_item_are_reported_on_that_item_and_the_rest_resolve() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "ok", "fine").await.unwrap();
    let unknown_type = pb::ResolveItem {
        id: "unknown-type".into(),
        reference: Some(pb::resolve_item::Reference::SecretObject(pb::SecretObject {
            key: "ok".into(),
            source: Some(pb::SecretSource { r#type: 9, id: "finance".into() }),
        })),
    };
    let vault = pb::ResolveItem {
        id: "vault".into(),
        reference: Some(pb::resolve_item::Reference::SecretObject(pb::SecretObject {
            key: "ok".into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: "cfg-1".into() }),
        })),
    };
    let items = vec![
        text_item("missing", "${secrets.nope}"),
        text_item("unterminated", "x=${secrets.ok"),
        text_item("bad-key", "${secrets.bad key}"),
        unknown_type,
        vault,
        object_item("bad-domain", "Not_A_Domain", "ok"),
        object_item("bad-object-key", "finance", "a/b"),
        pb::ResolveItem { id: "empty".into(), reference: None },
        object_item("good", "finance", "ok"),
    ];
    let out = app.as_service(Some("user:olivia")).resolve("finance", items).await.unwrap();
    let expect = [
        ("missing", Code::NotFound, "secret \"nope\" does not exist in domain \"finance\" or the global secrets"),
        ("unterminated", Code::InvalidArgument, "text: malformed placeholder at byte 2"),
        ("bad-key", Code::InvalidArgument, "contains ' '"),
        ("unknown-type", Code::InvalidArgument, "secret_object.source.type: unknown value 9"),
        ("vault", Code::InvalidArgument, "is not a vault config id"),
        ("bad-domain", Code::InvalidArgument, "secret_object.source.id"),
        ("bad-object-key", Code::InvalidArgument, "secret_object.key"),
        ("empty", Code::InvalidArgument, "set one of secret_object, text or admin_key"),
    ];
    for (i, (id, code, fragment)) in expect.iter().enumerate() {
        let (got_code, message) = error(&out[i]);
        assert_eq!(got_code, *code, "{id}: {message}");
        assert!(message.contains(&format!("items[{i}] (\"{id}\")")), "names the item: {message}");
        assert!(message.contains(fragment), "{id}: {message}");
    }
    assert_eq!(out[8].result, Some(R::Value(b"fine".to_vec())));
}

#[tokio::test]
async fn values_go_only_to_platform_service_tokens() {
    let app = TestApp::spawn().await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();
    for user in [ADMIN, OWNER] {
        let err = app.as_user(user).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{user}");
        assert!(err.message().contains("only to platform-service tokens"), "{}", err.message());
    }
}

#[tokio::test]
async fn kubernetes_sources_need_membership_of_their_domain() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create("finance", "k", "v").await.unwrap();
    for user in [ADMIN, OWNER, LISTER, MANAGER, MEMBER] {
        let out = app
            .as_service(Some(&format!("user:{user}")))
            .resolve("finance", vec![object_item("x", "finance", "k")])
            .await
            .unwrap();
        assert_eq!(out[0].result, Some(R::Value(b"v".to_vec())), "{user}");
    }
    for user in [OUTSIDER, STRANGER] {
        let out = app
            .as_service(Some(&format!("user:{user}")))
            .resolve("finance", vec![object_item("x", "finance", "k"), text_item("y", "${secrets.k}")])
            .await
            .unwrap();
        for item in &out {
            let (code, message) = error(item);
            assert_eq!(code, Code::PermissionDenied, "{user}");
            assert!(
                message.contains(&format!("user:{user} may not use the secrets of domain \"finance\"")),
                "{message}"
            );
        }
    }
    // An object in another domain needs membership there, whatever the workload's domain.
    let out =
        app.as_service(Some("user:oscar")).resolve("other", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert_eq!(error(&out[0]).0, Code::PermissionDenied);
}

#[tokio::test]
async fn a_service_without_a_principal_acts_as_its_own_service_account() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "k", "v").await.unwrap();
    let out = app.as_service(None).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert!(error(&out[0]).1.contains("service:spark"), "{:?}", out[0]);
    admin
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "finance".into(),
            subject: "service:spark".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap();
    let out = app.as_service(None).resolve("finance", vec![object_item("x", "finance", "k")]).await.unwrap();
    assert_eq!(out[0].result, Some(R::Value(b"v".to_vec())));
}

#[tokio::test]
async fn admin_secrets_resolve_only_for_platform_admins() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create_in(pb::Scope::Admin, "", "ldap_bind_password", "ldap").await.unwrap();
    let item = || pb::ResolveItem {
        id: "ldap".into(),
        reference: Some(pb::resolve_item::Reference::AdminKey("ldap_bind_password".into())),
    };
    let out = app.as_service(Some("user:admin")).resolve("finance", vec![item()]).await.unwrap();
    assert_eq!(out[0].result, Some(R::Value(b"ldap".to_vec())));
    let out = app.as_service(Some("user:olivia")).resolve("finance", vec![item()]).await.unwrap();
    assert_eq!(error(&out[0]).0, Code::PermissionDenied);
}

#[tokio::test]
async fn binary_values_cannot_be_placed_into_text_but_resolve_as_objects() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let request = pb::CreateSecretRequest {
        scope: pb::Scope::Domain as i32,
        domain: "finance".into(),
        key: "keystore".into(),
        value: Some(pb::SecretValue { kind: Some(pb::secret_value::Kind::Binary(vec![0xff, 0xfe, 0x00])) }),
        request_id: String::new(),
    };
    app.as_user(ADMIN).secrets.clone().create_secret(request).await.unwrap();
    let out = app
        .as_service(Some("user:nina"))
        .resolve("finance", vec![text_item("t", "${secrets.keystore}"), object_item("o", "finance", "keystore")])
        .await
        .unwrap();
    let (code, message) = error(&out[0]);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("binary"), "{message}");
    assert_eq!(out[1].result, Some(R::Value(vec![0xff, 0xfe, 0x00])));
}

#[tokio::test]
async fn each_store_object_is_read_once_per_batch() {
    let fixture = integration_tests::stores::Fixture::embedded().await;
    let counting = CountingBackend::new(fixture.backend.clone());
    let app = TestApp::spawn_with(Options { backend: Some(counting.clone()), ..Default::default() }).await;
    app.setup_domain("finance").await;
    app.setup_domain("sales").await;
    let admin = app.as_user(ADMIN);
    for (d, k) in [("finance", "a"), ("finance", "b"), ("sales", "c")] {
        admin.create(d, k, "v").await.unwrap();
    }
    admin.create_in(pb::Scope::Global, "", "g", "v").await.unwrap();
    counting.reset();
    let mut items = Vec::new();
    for i in 0..4 {
        items.push(text_item(&format!("t{i}"), "${secrets.a}/${secrets.b}/${secrets.g}"));
        items.push(object_item(&format!("o{i}"), "sales", "c"));
        items.push(object_item(&format!("g{i}"), "sales", "g"));
    }
    let out = app.as_service(Some("user:admin")).resolve("finance", items).await.unwrap();
    assert!(out.iter().all(|r| !matches!(r.result, Some(R::Error(_)))), "{out:?}");
    let reads = counting.reads();
    assert_eq!(reads.len(), 3, "finance, sales and global: {reads:?}");
    assert!(reads.values().all(|n| *n == 1), "12 items, each object read once: {reads:?}");
}

#[tokio::test]
async fn a_denied_item_is_never_read_from_its_store() {
    let fixture = integration_tests::stores::Fixture::embedded().await;
    let counting = CountingBackend::new(fixture.backend.clone());
    let app = TestApp::spawn_with(Options { backend: Some(counting.clone()), ..Default::default() }).await;
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "k", "finance-value").await.unwrap();
    admin.create(OTHER_DOMAIN, "mine", "other-value").await.unwrap();
    admin.create_in(pb::Scope::Admin, "", "ldap", "admin-value").await.unwrap();
    let admin_key =
        || pb::ResolveItem { id: "ldap".into(), reference: Some(pb::resolve_item::Reference::AdminKey("ldap".into())) };
    let oscar = app.as_service(Some(&format!("user:{OUTSIDER}")));

    // Every item denied: the secret-service is not asked at all.
    counting.reset();
    let out = oscar.resolve("finance", vec![object_item("a", "finance", "k"), admin_key()]).await.unwrap();
    assert!(out.iter().all(|r| error(r).0 == Code::PermissionDenied), "{out:?}");
    assert_eq!(counting.reads(), Default::default(), "denied items were read");

    // Some allowed: only their objects are read.
    let out = oscar
        .resolve(
            OTHER_DOMAIN,
            vec![object_item("a", "finance", "k"), admin_key(), object_item("b", OTHER_DOMAIN, "mine")],
        )
        .await
        .unwrap();
    assert_eq!(error(&out[0]).0, Code::PermissionDenied);
    assert_eq!(error(&out[1]).0, Code::PermissionDenied);
    assert_eq!(out[2].result, Some(R::Value(b"other-value".to_vec())));
    let reads = counting.reads();
    assert!(reads.keys().any(|o| o.ends_with(&format!("-{OTHER_DOMAIN}"))), "{reads:?}");
    assert!(!reads.keys().any(|o| o.ends_with("-finance") || o.ends_with("-admin")), "denied objects read: {reads:?}");
}

fn error_status(r: &pb::ResolvedItem) -> &tonic_types::pb::Status {
    match &r.result {
        Some(R::Error(e)) => e,
        other => panic!("{}: expected an error, got {other:?}", r.id),
    }
}

#[tokio::test]
async fn item_errors_are_google_rpc_statuses_with_field_violations() {
    let app = TestApp::spawn().await;
    let out = app
        .as_service(Some("user:admin"))
        .resolve("finance", vec![object_item("envVars.DB", "finance", "a/b")])
        .await
        .unwrap();
    let status = error_status(&out[0]);
    assert_eq!(Code::from_i32(status.code), Code::InvalidArgument);
    let details = tonic::Status::with_details(Code::InvalidArgument, "", prost::Message::encode_to_vec(status).into())
        .get_error_details();
    let violation = &details.bad_request().expect("BadRequest detail").field_violations[0];
    assert_eq!(violation.field, "items[0].secret_object.key");
    assert!(violation.description.contains("contains '/'"), "{}", violation.description);
}

#[tokio::test]
async fn a_secret_object_naming_the_reserved_admin_domain_fails_only_its_own_item() {
    let app = TestApp::spawn().await;
    app.as_user(ADMIN).create("finance", "ok", "fine").await.unwrap();
    let out = app
        .as_service(Some("user:admin"))
        .resolve("finance", vec![object_item("a", "admin", "ok"), object_item("b", "finance", "ok")])
        .await
        .unwrap();
    let (code, message) = error(&out[0]);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("reserved"), "{message}");
    assert!(!message.contains("lookups"), "no internal field names: {message}");
    assert_eq!(out[1].result, Some(R::Value(b"fine".to_vec())));
}

#[tokio::test]
async fn a_thousand_items_of_maximal_text_get_the_named_response_limit_not_a_failed_batch() {
    use gateway::resolution::limits::*;
    let app = TestApp::spawn().await;
    let service = app.as_service(Some("user:admin"));
    // Literal text: 1,000 x 4 KiB is more than one response may carry.
    let items: Vec<_> = (0..MAX_ITEMS).map(|i| text_item(&format!("i{i}"), &"x".repeat(MAX_TEXT_BYTES))).collect();
    let start = std::time::Instant::now();
    let out = service.resolve("finance", items).await.expect("the batch is answered");
    eprintln!("1,000 literal items of {MAX_TEXT_BYTES} bytes: answered in {:?}", start.elapsed());
    let fitting = MAX_RESPONSE_VALUE_BYTES / MAX_TEXT_BYTES;
    assert!(out[..fitting].iter().all(|r| matches!(r.result, Some(R::Text(_)))));
    for r in &out[fitting..] {
        let (code, message) = error(r);
        assert_eq!(code, Code::ResourceExhausted);
        assert!(message.contains("at most 3145728 bytes (3 MiB)"), "{message}");
    }

    // Placeholders multiply: 64 of a 16 KiB value is 1 MiB per item.
    app.as_user(ADMIN).create("finance", "big", &"v".repeat(16 * 1024)).await.unwrap();
    let text = "${secrets.big}".repeat(MAX_PLACEHOLDERS_PER_ITEM);
    let items: Vec<_> = (0..MAX_ITEMS).map(|i| text_item(&format!("p{i}"), &text)).collect();
    let start = std::time::Instant::now();
    let out = service.resolve("finance", items).await.expect("the batch is answered");
    eprintln!("1,000 items of {MAX_PLACEHOLDERS_PER_ITEM} placeholders: answered in {:?}", start.elapsed());
    let resolved = out.iter().filter(|r| matches!(r.result, Some(R::Text(_)))).count();
    assert_eq!(resolved, 3, "three 1 MiB items fit in 3 MiB");
    assert_eq!(error(&out[3]).0, Code::ResourceExhausted);

    // Past the per-item limits: refused on the item, naming the limit.
    let too_long = text_item("long", &"x".repeat(MAX_TEXT_BYTES + 1));
    let too_many = text_item("many", &"${secrets.big}".repeat(MAX_PLACEHOLDERS_PER_ITEM + 1));
    let long_id = text_item(&"i".repeat(MAX_ITEM_ID_BYTES + 1), "x");
    let out = service.resolve("finance", vec![too_long, too_many, long_id]).await.unwrap();
    assert!(error(&out[0]).1.contains("at most 4096 bytes"), "{}", error(&out[0]).1);
    assert!(error(&out[1]).1.contains("at most 64"), "{}", error(&out[1]).1);
    assert!(error(&out[2]).1.contains("at most 256 bytes"), "{}", error(&out[2]).1);
}

on_both_databases!(a_removed_membership_denies_the_next_resolve_at_once);

/// Decisions come from memory: a change that returned must count on the
/// very next resolve, every time.
async fn a_removed_membership_denies_the_next_resolve_at_once(app: TestApp) {
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "v").await.unwrap();
    let admin = app.as_user(ADMIN).authz.clone();
    let nina = app.as_service(Some(&format!("user:{MEMBER}")));
    let item = || vec![object_item("pw", "finance", "db-password")];
    for round in 0..15 {
        let out = nina.resolve("finance", item()).await.unwrap();
        assert!(matches!(out[0].result, Some(R::Value(_))), "round {round}: a member uses the secret");
        admin
            .clone()
            .remove_domain_member(pb::RemoveDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:{MEMBER}"),
            })
            .await
            .unwrap();
        let out = nina.resolve("finance", item()).await.unwrap();
        assert_eq!(error(&out[0]).0, Code::PermissionDenied, "round {round}: resolved after the removal returned");
        admin
            .clone()
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:{MEMBER}"),
                role: pb::DomainRole::Member as i32,
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_secrets_v2_off_secret_objects_are_refused_naming_the_flag_and_placeholders_resolve() {
    let app = TestApp::spawn_with(Options { secrets_v2_off: true, ..Default::default() }).await;
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db-password", "pw-v1").await.unwrap();
    let out = app
        .as_service(Some(&format!("user:{OWNER}")))
        .resolve(
            "finance",
            vec![
                text_item("envVars.DB_URL", "jdbc:pg://db?password=${secrets.db-password}"),
                object_item("envVars.DB_PASSWORD", "finance", "db-password"),
                vault_item("sparkConf.key", "0b5e1f5c-7d1e-4c55-9a57-3f1f6a0d2f4e", "api_key"),
            ],
        )
        .await
        .expect("the batch is answered item by item");
    assert_eq!(text(&out[0]), "jdbc:pg://db?password=pw-v1", "legacy placeholders keep working");
    for item in &out[1..] {
        let (code, message) = error(item);
        assert_eq!(code, Code::FailedPrecondition, "{message}");
        assert!(message.contains("features.secretsV2.enabled"), "{message}");
        assert!(message.contains(&item.id), "the item is named: {message}");
    }
    // The same configuration through the environment, as Helm-style values.
    let output = std::process::Command::new(procs::binary("gateway"))
        .arg("check-config")
        .env_clear()
        .env("GATEWAY_INTERNAL_TOKEN", "t")
        .env("GATEWAY_FEATURES__SECRETSV2__ENABLED", "false")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
