//! Vault integrations against a real OpenBao server: configs through the
//! gateway, credentials kept out of every answer, keys, resolution with USE,
//! test connection classifying each failure, and what Vault was really
//! asked (its own audit log).

use integration_tests::{openbao::OpenBao, *};
use secrets_proto::v1::{self as pb, Permission, VaultConnectionOutcome as Outcome, resolved_item::Result as R};
use tonic::Code;

const BUNDLE: &str = "finance-vault";

fn token_creds(token: &str) -> pb::VaultCredentials {
    pb::VaultCredentials { method: Some(pb::vault_credentials::Method::Token(token.into())) }
}

fn spec(name: &str, bao: &OpenBao, path: &str, creds: pb::VaultCredentials) -> pb::VaultConfigSpec {
    pb::VaultConfigSpec {
        name: name.into(),
        host: bao.addr.clone(),
        path: path.into(),
        credentials: Some(creds),
        ca_certificate: bao.ca_pem.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// Domain finance with the usual personas; bundle finance-vault owned by
/// olivia (who owns the domain) with USE for nina; a secret in OpenBao.
async fn setup(app: &TestApp, bao: &OpenBao) {
    app.setup_domain("finance").await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    authz
        .create_bundle(pb::CreateBundleRequest {
            name: BUNDLE.into(),
            description: String::new(),
            owner: format!("user:{OWNER}"),
        })
        .await
        .unwrap();
    authz
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: BUNDLE.into(),
            subject: format!("user:{MEMBER}"),
            permission: Permission::Use as i32,
        })
        .await
        .unwrap();
    bao.bao(&["kv", "put", "secret/production", "db_password=pw-from-vault", "api_key=key-from-vault"]);
}

async fn create(app: &TestApp, who: &str, spec: pb::VaultConfigSpec) -> Result<pb::VaultConfig, tonic::Status> {
    let request = pb::CreateVaultConfigRequest { domain: "finance".into(), bundle: BUNDLE.into(), spec: Some(spec) };
    app.as_user(who).vault.clone().create_vault_config(request).await.map(|r| r.into_inner())
}

fn value(item: &pb::ResolvedItem) -> &[u8] {
    match &item.result {
        Some(R::Value(v)) => v,
        other => panic!("{}: expected a value, got {other:?}", item.id),
    }
}

fn item_error(item: &pb::ResolvedItem) -> (Code, String) {
    match &item.result {
        Some(R::Error(e)) => (Code::from_i32(e.code), e.message.clone()),
        other => panic!("{}: expected an error, got {other:?}", item.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_config_lists_its_keys_and_resolves_through_the_gateway_for_holders_of_use() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let config = create(&app, OWNER, spec("prod", &bao, "/v1/secret/data/production", token_creds(&bao.root_token)))
        .await
        .expect("a domain owner who owns the bundle creates a config");
    assert_eq!(config.auth_method(), pb::VaultAuthMethod::Token);
    assert!(config.credentials_set);
    assert_eq!((config.bundle.as_str(), config.domain.as_str()), (BUNDLE, "finance"));

    let keys = app
        .as_user(MEMBER)
        .vault
        .clone()
        .list_vault_keys(pb::ListVaultKeysRequest { id: config.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys, ["api_key", "db_password"]);

    let items = vec![
        vault_item("envVars.DB", &config.id, "db_password"),
        vault_item("envVars.MISSING", &config.id, "nope"),
        text_item("plain", "no secrets"),
    ];
    let out = app.as_service(Some(&format!("user:{MEMBER}"))).resolve("finance", items.clone()).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");
    let (code, message) = item_error(&out[1]);
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("has no key \"nope\""), "{message}");
    assert!(message.starts_with("items[1] (\"envVars.MISSING\")"), "{message}");

    // lisa lists finance's secrets but holds no USE on the bundle.
    let out = app.as_service(Some(&format!("user:{LISTER}"))).resolve("finance", items).await.unwrap();
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("holds no USE on Vault config"), "{message}");
    let err = app
        .as_user(LISTER)
        .vault
        .clone()
        .list_vault_keys(pb::ListVaultKeysRequest { id: config.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_domain_owners_create_configs_and_only_viewers_see_them() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let s = || spec("prod", &bao, "/v1/secret/data/production", token_creds(&bao.root_token));
    let err = create(&app, MANAGER, s()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("is a member, not an owner"), "{}", err.message());
    let config = create(&app, OWNER, s()).await.unwrap();
    let err = create(&app, OWNER, s()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "names are unique in the domain: {err:?}");

    let list = |who: &'static str| {
        let c = app.as_user(who).vault.clone();
        async move {
            let mut c = c;
            c.list_vault_configs(pb::ListVaultConfigsRequest { domain: "finance".into() })
                .await
                .unwrap()
                .into_inner()
                .configs
        }
    };
    assert_eq!(list(OWNER).await.len(), 1, "the bundle owner sees it");
    assert!(list(MEMBER).await.is_empty(), "USE is not VIEW: listing filters, it does not fail");
    let err = app
        .as_user(MEMBER)
        .vault
        .clone()
        .get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = app
        .as_user(MEMBER)
        .vault
        .clone()
        .delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "deleting needs UPDATE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_is_fixed_credentials_can_be_replaced_and_delete_leaves_vault_alone() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let config = create(&app, OWNER, spec("prod", &bao, "/v1/secret/data/production", token_creds(&bao.root_token)))
        .await
        .unwrap();
    let mut olivia = app.as_user(OWNER).vault.clone();
    let err = olivia
        .update_vault_config(pb::UpdateVaultConfigRequest {
            id: config.id.clone(),
            bundle: Some("other-vault".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is fixed at creation"), "{}", err.message());

    // A token that may read nothing, then the root token again.
    let weak = bao.field(&["token", "create", "-policy=default"], "token");
    let updated = olivia
        .update_vault_config(pb::UpdateVaultConfigRequest {
            id: config.id.clone(),
            credentials: Some(token_creds(&weak)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.credentials_set);
    let test = olivia
        .test_vault_connection(pb::TestVaultConnectionRequest {
            target: Some(pb::test_vault_connection_request::Target::Id(config.id.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(test.outcome(), Outcome::NoAccessToPath, "{}", test.message);

    olivia.delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone() }).await.unwrap();
    let err = olivia.get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        bao.field(&["kv", "get", "secret/production"], "db_password"),
        "pw-from-vault",
        "Vault data is untouched"
    );
    let bundle = app
        .as_user(ADMIN)
        .authz
        .clone()
        .get_bundle(pb::GetBundleRequest { name: BUNDLE.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(bundle.resources.is_empty(), "the placement went with the config");
    let writes = bao.requested_paths();
    assert!(writes.iter().any(|p| p == "secret/data/production"), "the audit log shows the reads: {writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_classifies_each_failure_with_vaults_message() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    bao.bao(&["secrets", "enable", "-version=1", "-path=kv1", "kv"]);
    bao.bao(&["kv", "put", "kv1/app", "a=b"]);
    bao.bao(&["namespace", "create", "team-a"]);
    let weak = bao.field(&["token", "create", "-policy=default"], "token");
    let closed = format!("http://127.0.0.1:{}", procs::free_port());
    let test = |s: pb::VaultConfigSpec| {
        let mut c = app.as_user(OWNER).vault.clone();
        async move {
            c.test_vault_connection(pb::TestVaultConnectionRequest {
                target: Some(pb::test_vault_connection_request::Target::Unsaved(pb::UnsavedVaultConfig {
                    domain: "finance".into(),
                    spec: Some(s),
                })),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let root = || token_creds(&bao.root_token);
    let cases = vec![
        ("ok", spec("a", &bao, "/v1/secret/data/production", root()), Outcome::ConnectionOk, "2 keys"),
        (
            "bad token",
            spec("a", &bao, "/v1/secret/data/production", token_creds("not-a-token")),
            Outcome::InvalidCredentials,
            "permission denied",
        ),
        (
            "no access",
            spec("a", &bao, "/v1/secret/data/production", token_creds(&weak)),
            Outcome::NoAccessToPath,
            "permission denied",
        ),
        ("kv v1", spec("a", &bao, "/v1/kv1/data/app", root()), Outcome::NotKvV2, "KV version 1"),
        ("missing", spec("a", &bao, "/v1/secret/data/nothing-here", root()), Outcome::SecretNotFound, "does not exist"),
        ("no mount", spec("a", &bao, "/v1/nomount/data/x", root()), Outcome::NotKvV2, "no KV v2 mount"),
        (
            "namespace",
            pb::VaultConfigSpec {
                namespace: "no-such-team".into(),
                ..spec("a", &bao, "/v1/secret/data/production", root())
            },
            Outcome::NamespaceNotFound,
            "namespace not found",
        ),
        (
            "unreachable",
            pb::VaultConfigSpec { host: closed.clone(), ..spec("a", &bao, "/v1/secret/data/production", root()) },
            Outcome::Unreachable,
            "unreachable",
        ),
    ];
    for (name, s, expected, said) in cases {
        let answer = test(s).await;
        assert_eq!(answer.outcome(), expected, "{name}: {}", answer.message);
        assert!(answer.message.contains(said), "{name}: {}", answer.message);
        assert!(!answer.message.contains(&bao.root_token), "{name} leaks the token");
    }
    // Saved nothing.
    let listed = app
        .as_user(OWNER)
        .vault
        .clone()
        .list_vault_configs(pb::ListVaultConfigsRequest { domain: "finance".into() })
        .await
        .unwrap()
        .into_inner()
        .configs;
    assert!(listed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_only_when_given_and_a_sealed_vault_says_sealed() {
    let bao = OpenBao::start_tls();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let with_ca = spec("tls", &bao, "/v1/secret/data/production", token_creds(&bao.root_token));
    let without_ca = pb::VaultConfigSpec { ca_certificate: String::new(), ..with_ca.clone() };
    let test = |s: pb::VaultConfigSpec| {
        let mut c = app.as_user(OWNER).vault.clone();
        async move {
            c.test_vault_connection(pb::TestVaultConnectionRequest {
                target: Some(pb::test_vault_connection_request::Target::Unsaved(pb::UnsavedVaultConfig {
                    domain: "finance".into(),
                    spec: Some(s),
                })),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let ok = test(with_ca.clone()).await;
    assert_eq!(ok.outcome(), Outcome::ConnectionOk, "{}", ok.message);
    let untrusted = test(without_ca).await;
    assert_eq!(untrusted.outcome(), Outcome::TlsFailure, "{}", untrusted.message);

    bao.bao(&["operator", "seal"]);
    let sealed = test(with_ca).await;
    assert_eq!(sealed.outcome(), Outcome::Sealed, "{}", sealed.message);
    assert!(sealed.message.contains("sealed"), "{}", sealed.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_naming_the_field_and_the_rule() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let good = || spec("prod", &bao, "/v1/secret/data/production", token_creds(&bao.root_token));
    let cases = vec![
        (pb::VaultConfigSpec { path: "/v1/secret/production".into(), ..good() }, "spec.path", "/data/ segment"),
        (pb::VaultConfigSpec { host: "vault.example.com".into(), ..good() }, "spec.host", "http:// or https://"),
        (pb::VaultConfigSpec { name: "-x".into(), ..good() }, "spec.name", "letter or digit"),
        (pb::VaultConfigSpec { credentials: None, ..good() }, "spec.credentials", "are required"),
        (pb::VaultConfigSpec { ca_certificate: "not pem".into(), ..good() }, "spec.ca_certificate", "must be PEM"),
        (
            pb::VaultConfigSpec { credentials: Some(token_creds("a\nb")), ..good() },
            "spec.credentials.token",
            "printable",
        ),
    ];
    for (s, field, rule) in cases {
        let err = create(&app, OWNER, s).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field) && err.message().contains(rule), "{field}: {}", err.message());
    }
}
