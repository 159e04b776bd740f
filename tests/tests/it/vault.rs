//! Vault integrations against a real OpenBao server: configs through the
//! gateway, credentials kept out of every answer, keys, resolution with USE,
//! test connection classifying each failure, and what Vault was really
//! asked (its own audit log).

use integration_tests::{openbao::OpenBao, *};
use secrets_proto::v1::{self as pb, Permission, VaultConnectionOutcome as Outcome, resolved_item::Result as R};
use std::time::Duration;

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

/// Config "prod" of finance, reading secret/production with the root
/// token, created by the domain's owner.
async fn prod_config(app: &TestApp, bao: &OpenBao) -> pb::VaultConfig {
    create(app, OWNER, spec("prod", bao, "/v1/secret/data/production", token_creds(&bao.root_token)))
        .await
        .expect("the domain's owner creates a config")
}

/// Tests an unsaved config of finance as its owner.
async fn test_unsaved(app: &TestApp, spec: pb::VaultConfigSpec) -> pb::TestVaultConnectionResponse {
    let target = pb::test_vault_connection_request::Target::Unsaved(pb::UnsavedVaultConfig {
        domain: "finance".into(),
        spec: Some(spec),
    });
    let request = pb::TestVaultConnectionRequest { target: Some(target) };
    app.as_user(OWNER).vault.clone().test_vault_connection(request).await.unwrap().into_inner()
}

/// The stack with Vault values kept for 1 ms: every read asks Vault.
async fn spawn_uncached() -> TestApp {
    TestApp::spawn_with(Options {
        vault: Some(vault_config_service::VaultSettings { cache_ttl_ms: 1, ..Default::default() }),
        ..Default::default()
    })
    .await
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
    assert_eq!(err.code(), Code::NotFound, "neither VIEW nor USE: the config is not hers to know of");
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
    // eve knows nothing of it: for her it does not exist.
    let err = app
        .as_user(STRANGER)
        .vault
        .clone()
        .get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!err.message().contains("prod") && !err.message().contains(BUNDLE), "{}", err.message());
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = app
        .as_user(STRANGER)
        .vault
        .clone()
        .get_vault_config(pb::GetVaultConfigRequest { id: unknown.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        missing.message().replace(&unknown, "ID"),
        err.message().replace(&config.id, "ID"),
        "an id that names nothing and one eve may not see get the same answer"
    );
    let err = app
        .as_user(MEMBER)
        .vault
        .clone()
        .get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() })
        .await
        .unwrap_err();
    // nina holds USE only: she resolves the config's keys, and learns
    // nothing of its details, exactly as of an id that names nothing.
    assert_eq!(err.code(), Code::NotFound, "USE is not VIEW");
    assert_eq!(missing.message().replace(&unknown, "ID"), err.message().replace(&config.id, "ID"));
    let err = app
        .as_user(MEMBER)
        .vault
        .clone()
        .delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone(), force: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "deleting needs UPDATE, and USE alone does not show the config");
    // Who may VIEW but not UPDATE is told why.
    let err = app
        .as_user(OWNER)
        .authz
        .clone()
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: BUNDLE.into(),
            subject: format!("user:{MEMBER}"),
            permission: Permission::View as i32,
        })
        .await
        .map(|_| ())
        .err();
    assert!(err.is_none(), "{err:?}");
    let err = app
        .as_user(MEMBER)
        .vault
        .clone()
        .delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone(), force: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "deleting needs UPDATE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_is_fixed_credentials_can_be_replaced_and_delete_leaves_vault_alone() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let config = prod_config(&app, &bao).await;
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

    olivia.delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone(), force: false }).await.unwrap();
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
    bao.bao(&["kv", "put", "secret/single", "only=one"]);
    // A token that may read the one KV v1 secret, and nothing else (not
    // sys/mounts).
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("kv1-app.hcl");
    std::fs::write(&policy, "path \"kv1/app\" { capabilities = [\"read\"] }\n").unwrap();
    bao.bao(&["policy", "write", "kv1-app", policy.to_str().unwrap()]);
    let kv1_reader = bao.field(&["token", "create", "-policy=kv1-app"], "token");
    let closed = format!("http://127.0.0.1:{}", procs::free_port());
    let https_to_plaintext = bao.addr.replace("http://", "https://");
    let test = |s: pb::VaultConfigSpec| test_unsaved(&app, s);
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
        ("one key", spec("a", &bao, "/v1/secret/data/single", root()), Outcome::ConnectionOk, "the secret has 1 key"),
        ("kv v1", spec("a", &bao, "/v1/kv1/data/app", root()), Outcome::NotKvV2, "KV version 1"),
        (
            "kv v1, a token for that path only",
            spec("a", &bao, "/v1/kv1/data/app", token_creds(&kv1_reader)),
            Outcome::NotKvV2,
            "KV version 1",
        ),
        (
            "https to a plaintext port",
            pb::VaultConfigSpec {
                host: https_to_plaintext.clone(),
                ..spec("a", &bao, "/v1/secret/data/production", root())
            },
            Outcome::TlsFailure,
            "does not speak TLS",
        ),
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
        if expected == Outcome::ConnectionOk {
            assert!(answer.message.ends_with(said), "{name}: one key, not one keys: {}", answer.message);
        }
        assert!(!answer.message.contains(&bao.root_token), "{name} leaks the token");
        assert!(
            !answer.message.contains("error occurred") && !answer.message.contains("\t*"),
            "{name}: {}",
            answer.message
        );
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
    let test = |s: pb::VaultConfigSpec| test_unsaved(&app, s);
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

/// An AppRole whose tokens live `ttl` (at most `max_ttl`) and may read
/// secret/*: (role id, secret id).
fn app_role(bao: &OpenBao, ttl: &str, max_ttl: &str) -> (String, String) {
    bao.bao(&["auth", "enable", "approle"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("read.hcl");
    std::fs::write(&file, "path \"secret/data/*\" { capabilities = [\"read\"] }\n").unwrap();
    bao.bao(&["policy", "write", "read-secrets", file.to_str().unwrap()]);
    bao.bao(&[
        "write",
        "auth/approle/role/etl",
        "token_policies=read-secrets",
        &format!("token_ttl={ttl}"),
        &format!("token_max_ttl={max_ttl}"),
    ]);
    let role_id = bao.field(&["read", "auth/approle/role/etl/role-id"], "role_id");
    let secret_id = bao.field(&["write", "-f", "auth/approle/role/etl/secret-id"], "secret_id");
    (role_id, secret_id)
}

/// Config "prod" of finance reading secret/production with a new AppRole
/// whose tokens live `ttl` (at most `max_ttl`); and the role's secret id.
async fn approle_config(app: &TestApp, bao: &OpenBao, ttl: &str, max_ttl: &str) -> (pb::VaultConfig, String) {
    let (role_id, secret_id) = app_role(bao, ttl, max_ttl);
    let config =
        create(app, OWNER, spec("prod", bao, "/v1/secret/data/production", app_role_creds(&role_id, &secret_id)))
            .await
            .unwrap();
    (config, secret_id)
}

fn app_role_creds(role_id: &str, secret_id: &str) -> pb::VaultCredentials {
    pb::VaultCredentials {
        method: Some(pb::vault_credentials::Method::AppRole(pb::AppRoleCredentials {
            role_id: role_id.into(),
            secret_id: secret_id.into(),
            mount: String::new(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_cold_resolves_make_one_vault_read_and_one_login() {
    let bao = OpenBao::start();
    // 1,000 calls at once on a debug build, beside the rest of the suite:
    // room for all of them, however slow.
    let app = TestApp::spawn_with(Options {
        request_timeout_ms: Some(30_000),
        database_timeout_ms: Some(30_000),
        ..Default::default()
    })
    .await;
    setup(&app, &bao).await;
    let (config, _) = approle_config(&app, &bao, "1h", "2h").await;
    let before = bao.requested_paths();
    let service = app.as_service_patiently(Some(&format!("user:{MEMBER}")));
    let resolves = (0..1000).map(|i| {
        let service = service.gateway.clone();
        let item = vault_item(&format!("r{i}"), &config.id, "db_password");
        tokio::spawn(async move {
            let mut service = service;
            service
                .resolve_secrets(pb::ResolveSecretsRequest { domain: "finance".into(), items: vec![item] })
                .await
                .map(|r| r.into_inner().items)
        })
    });
    for r in futures::future::join_all(resolves).await {
        let items = r.unwrap().expect("resolved");
        assert_eq!(value(&items[0]), b"pw-from-vault");
    }
    let paths: Vec<String> = bao.requested_paths().into_iter().skip(before.len()).collect();
    let reads = paths.iter().filter(|p| *p == "secret/data/production").count();
    let logins = paths.iter().filter(|p| *p == "auth/approle/login").count();
    assert_eq!(reads, 1, "OpenBao's audit log: {paths:?}");
    assert_eq!(logins, 1, "OpenBao's audit log: {paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_approle_tokens_are_renewed_and_replaced_while_resolving_for_a_minute() {
    let bao = OpenBao::start();
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    let (config, _) = approle_config(&app, &bao, "5s", "15s").await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let start = std::time::Instant::now();
    let mut resolved = 0;
    while start.elapsed() < std::time::Duration::from_secs(60) {
        let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
        assert_eq!(value(&out[0]), b"pw-from-vault", "after {:?}", start.elapsed());
        resolved += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let paths = bao.requested_paths();
    let logins = paths.iter().filter(|p| *p == "auth/approle/login").count();
    let renewals = paths.iter().filter(|p| *p == "auth/token/renew-self").count();
    eprintln!("{resolved} resolves in 60 s: {logins} logins, {renewals} renewals");
    assert!(renewals >= 1, "tokens were renewed: {logins} logins, {renewals} renewals");
    assert!(logins >= 4, "a token lives at most 15 s, so 60 s need fresh logins: {logins}");
    assert!(logins <= 8, "but not one per request: {logins}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vault_is_unavailable_per_item_naming_the_config_and_recovers_without_restarts() {
    let mut bao = OpenBao::start();
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    let config = prod_config(&app, &bao).await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let items = || vec![vault_item("v", &config.id, "db_password"), text_item("t", "plain")];
    assert_eq!(value(&service.resolve("finance", items()).await.unwrap()[0]), b"pw-from-vault");

    bao.stop();
    let out = service.resolve("finance", items()).await.expect("the batch is answered");
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::Unavailable);
    assert!(message.contains("vault config \"prod\""), "{message}");
    assert!(message.contains(&bao.addr), "names the host: {message}");
    assert!(matches!(&out[1].result, Some(R::Text(t)) if t == "plain"), "the other items still resolve");

    bao.restart();
    bao.bao(&["kv", "put", "secret/production", "db_password=pw-after-restart"]);
    let out = service.resolve("finance", items()).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-after-restart", "recovered without restarting any service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_in_a_namespace_reads_that_namespace() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    bao.bao(&["namespace", "create", "team-a"]);
    bao.bao(&["secrets", "enable", "-namespace=team-a", "-path=secret", "kv-v2"]);
    bao.bao(&["kv", "put", "-namespace=team-a", "secret/production", "db_password=pw-of-team-a"]);
    let s = pb::VaultConfigSpec {
        namespace: "team-a".into(),
        ..spec("team-a", &bao, "/v1/secret/data/production", token_creds(&bao.root_token))
    };
    let config = create(&app, OWNER, s).await.unwrap();
    assert_eq!(config.namespace, "team-a");
    let out = app
        .as_service(Some(&format!("user:{MEMBER}")))
        .resolve("finance", vec![vault_item("v", &config.id, "db_password")])
        .await
        .unwrap();
    assert_eq!(value(&out[0]), b"pw-of-team-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_credentials_and_values_never_reach_answers_logs_files_or_metrics() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let canary_value = format!("canary-vault-value-{}", uuid::Uuid::new_v4().simple());
    bao.bao(&["kv", "put", "secret/canary", &format!("password={canary_value}")]);
    let (role_id, secret_id) = app_role(&bao, "1h", "2h");
    let token_config =
        create(&app, OWNER, spec("tok", &bao, "/v1/secret/data/canary", token_creds(&bao.root_token))).await.unwrap();
    let role_config =
        create(&app, OWNER, spec("role", &bao, "/v1/secret/data/canary", app_role_creds(&role_id, &secret_id)))
            .await
            .unwrap();
    let planted = [bao.root_token.clone(), secret_id.clone(), canary_value.clone()];

    let mut answers = format!("{token_config:?} {role_config:?}");
    for id in [&token_config.id, &role_config.id] {
        let got = app.as_user(OWNER).vault.clone().get_vault_config(pb::GetVaultConfigRequest { id: id.clone() }).await;
        answers.push_str(&format!("{got:?}"));
        let keys = app.as_user(MEMBER).vault.clone().list_vault_keys(pb::ListVaultKeysRequest { id: id.clone() }).await;
        answers.push_str(&format!("{keys:?}"));
        let out = app
            .as_service(Some(&format!("user:{MEMBER}")))
            .resolve("finance", vec![vault_item("v", id, "password"), vault_item("w", id, "missing")])
            .await
            .unwrap();
        assert_eq!(value(&out[0]), canary_value.as_bytes(), "the value does reach the platform service");
        answers.push_str(&item_error(&out[1]).1);
    }
    let failed = create(&app, OWNER, spec("bad", &bao, "/v1/secret/canary", token_creds(&bao.root_token))).await;
    answers.push_str(&format!("{failed:?}"));
    let wrong =
        create(&app, OWNER, spec("wrong", &bao, "/v1/secret/data/canary", app_role_creds(&role_id, "wrong-secret-id")))
            .await
            .unwrap();
    let out = app
        .as_service(Some(&format!("user:{MEMBER}")))
        .resolve("finance", vec![vault_item("v", &wrong.id, "password")])
        .await
        .unwrap();
    answers.push_str(&item_error(&out[0]).1);

    let logs = logs::captured();
    let mut metrics = String::new();
    for service in ["gateway", "vault-config-service", "authz-service"] {
        metrics.push_str(&http_get(&app.metrics_url(service)).await.1);
    }
    assert!(
        metrics.contains(r#"secrets_backend_calls_total{backend="vault",operation="read"}"#),
        "Vault reads are counted: {metrics}"
    );
    for c in &planted {
        assert!(!answers.contains(c.as_str()), "an answer leaks {c}: {answers}");
        assert!(!logs.contains(c.as_str()), "logs leak {c}");
        assert!(!metrics.contains(c.as_str()), "metrics leak {c}");
    }
    for path in app.written_files() {
        let bytes = std::fs::read(&path).unwrap();
        for c in &planted {
            assert!(!bytes.windows(c.len()).any(|w| w == c.as_bytes()), "{} holds {c} in clear", path.display());
        }
    }
    assert!(
        app.written_files().iter().any(|p| p.to_string_lossy().contains("vault-credentials")),
        "credentials were stored"
    );
}

async fn selectable(app: &TestApp, who: &str) -> Result<pb::ListSelectableSecretsResponse, tonic::Status> {
    app.as_service(Some(&format!("user:{who}")))
        .gateway
        .clone()
        .list_selectable_secrets(pb::ListSelectableSecretsRequest { domain: "finance".into() })
        .await
        .map(|r| r.into_inner())
}

fn entries(r: &pb::ListSelectableSecretsResponse) -> Vec<(String, String, i32)> {
    r.secrets
        .iter()
        .map(|s| {
            let o = s.secret_object.as_ref().unwrap();
            (s.label.clone(), o.key.clone(), o.source.as_ref().unwrap().r#type)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_selector_lists_what_the_principal_may_pick_with_vault_keys_only_where_it_holds_use() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "db_password", "domain-pw").await.unwrap();
    admin.create_in(pb::Scope::Global, "", "db_password", "shadowed").await.unwrap();
    admin.create_in(pb::Scope::Global, "", "smtp_password", "global-pw").await.unwrap();
    let config = prod_config(&app, &bao).await;
    let (k, v) = (pb::SourceType::Kubernetes as i32, pb::SourceType::Vault as i32);
    let base = vec![
        ("finance".to_string(), "db_password".to_string(), k),
        ("global".to_string(), "smtp_password".to_string(), k),
    ];
    let with_vault = {
        let mut all = base.clone();
        all.push(("prod".into(), "api_key".into(), v));
        all.push(("prod".into(), "db_password".into(), v));
        all
    };

    // The owner of the domain and the bundle.
    let owner = selectable(&app, OWNER).await.unwrap();
    assert_eq!(entries(&owner), with_vault);
    let vault_entry = owner.secrets.iter().find(|s| s.label == "prod").unwrap();
    assert_eq!(vault_entry.secret_object.as_ref().unwrap().source.as_ref().unwrap().id, config.id, "ready to paste");
    // lisa lists finance but holds no USE: no Vault keys.
    assert_eq!(entries(&selectable(&app, LISTER).await.unwrap()), base);
    // Once in a group that holds USE, she sees them.
    let mut authz = admin.authz.clone();
    authz.create_group(pb::CreateGroupRequest { name: "pickers".into(), description: String::new() }).await.unwrap();
    authz
        .add_group_member(pb::AddGroupMemberRequest { group: "pickers".into(), member: format!("user:{LISTER}") })
        .await
        .unwrap();
    authz
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: BUNDLE.into(),
            subject: "group:pickers".into(),
            permission: Permission::Use as i32,
        })
        .await
        .unwrap();
    assert_eq!(entries(&selectable(&app, LISTER).await.unwrap()), with_vault);
    // nina holds USE but may not list the domain's secrets.
    let err = selectable(&app, MEMBER).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("LIST_SECRETS"), "{}", err.message());

    // An unreachable Vault is that source's error; the rest still returns.
    let closed = format!("http://127.0.0.1:{}", procs::free_port());
    let down = pb::VaultConfigSpec {
        host: closed,
        ..spec("down", &bao, "/v1/secret/data/production", token_creds(&bao.root_token))
    };
    create(&app, OWNER, down).await.unwrap();
    let answer = selectable(&app, OWNER).await.unwrap();
    assert_eq!(entries(&answer), with_vault);
    assert_eq!(answer.errors.len(), 1);
    assert_eq!(answer.errors[0].label, "down");
    let error = answer.errors[0].error.as_ref().unwrap();
    assert_eq!(Code::from_i32(error.code), Code::Unavailable);
    assert!(error.message.contains("unreachable"), "{}", error.message);
    assert!(!format!("{answer:?}").contains("pw"), "never a value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_that_stops_answering_times_out_within_the_bound() {
    let bao = OpenBao::start();
    let proxy =
        integration_tests::proxy::FreezableProxy::start(bao.addr.trim_start_matches("http://").to_string()).await;
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let through_proxy = pb::VaultConfigSpec {
        host: format!("http://127.0.0.1:{}", proxy.port),
        ..spec("slow", &bao, "/v1/secret/data/production", token_creds(&bao.root_token))
    };
    let config = create(&app, OWNER, through_proxy).await.unwrap();
    let test = || {
        let mut c = app.as_user(OWNER).vault.clone();
        let id = config.id.clone();
        async move {
            c.test_vault_connection(pb::TestVaultConnectionRequest {
                target: Some(pb::test_vault_connection_request::Target::Id(id)),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert_eq!(test().await.outcome(), Outcome::ConnectionOk);
    proxy.freeze();
    let answer = test().await;
    assert_eq!(answer.outcome(), Outcome::TimedOut, "{}", answer.message);
    assert!(answer.message.contains("did not answer in time"), "{}", answer.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_leave_one_config_and_nothing_behind() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let creates = (0..5).map(|_| {
        let s = spec("dup", &bao, "/v1/secret/data/production", token_creds(&bao.root_token));
        let mut client = app.as_user(OWNER).vault.clone();
        async move {
            client
                .create_vault_config(pb::CreateVaultConfigRequest {
                    domain: "finance".into(),
                    bundle: BUNDLE.into(),
                    spec: Some(s),
                })
                .await
        }
    });
    let results = futures::future::join_all(creates).await;
    let created: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    }
    let bundle = app
        .as_user(ADMIN)
        .authz
        .clone()
        .get_bundle(pb::GetBundleRequest { name: BUNDLE.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.resources.len(), 1, "the losers' placements were removed: {:?}", bundle.resources);
    assert_eq!(bundle.resources[0].id, created[0].get_ref().id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_classifies_each_vault_failure_on_its_item() {
    let bao = OpenBao::start();
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    bao.bao(&["secrets", "enable", "-version=1", "-path=kv1", "kv"]);
    bao.bao(&["kv", "put", "kv1/app", "db_password=v1"]);
    let root = || token_creds(&bao.root_token);
    let specs = [
        ("bad-token", spec("bad-token", &bao, "/v1/secret/data/production", token_creds("not-a-token"))),
        ("kv-v1", spec("kv-v1", &bao, "/v1/kv1/data/app", root())),
        ("missing", spec("missing", &bao, "/v1/secret/data/nothing-here", root())),
        (
            "namespace",
            pb::VaultConfigSpec {
                namespace: "no-such-team".into(),
                ..spec("namespace", &bao, "/v1/secret/data/production", root())
            },
        ),
        ("sealed", spec("sealed", &bao, "/v1/secret/data/production", root())),
    ];
    let mut ids = Vec::new();
    for (name, s) in specs {
        ids.push((name, create(&app, OWNER, s).await.unwrap().id));
    }
    let items = || ids.iter().map(|(name, id)| vault_item(name, id, "db_password")).collect::<Vec<_>>();
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let out = service.resolve("finance", items()).await.unwrap();
    let expected = [
        ("bad-token", Code::FailedPrecondition, "refused the credentials"),
        ("kv-v1", Code::FailedPrecondition, "KV version 1"),
        ("missing", Code::NotFound, "does not exist"),
        ("namespace", Code::FailedPrecondition, "namespace does not exist"),
    ];
    for (item, (name, code, said)) in out.iter().zip(expected) {
        let (got, message) = item_error(item);
        assert_eq!(got, code, "{name}: {message}");
        assert!(message.contains(said), "{name}: {message}");
        assert!(message.contains(&format!("vault config \"{name}\"")), "names the config: {message}");
    }
    assert_eq!(value(&out[4]), b"pw-from-vault");

    bao.bao(&["operator", "seal"]);
    let out = service.resolve("finance", items()).await.unwrap();
    let (code, message) = item_error(&out[4]);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("sealed"), "sealed says sealed: {message}");
}

/// A workload referencing Vault keys: checked at save time against the real
/// server (a missing key, Vault down), found by config in the usage index,
/// and protecting the config from deletion unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_workloads_with_vault_references_are_checked_indexed_and_protect_their_config() {
    use pb::{ProblemType, config_value::Value as CV, workload_payload::Kind};
    let mut bao = OpenBao::start();
    // The check after Vault stops asks Vault.
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    let config = prod_config(&app, &bao).await;
    let vault = |key: &str| pb::ConfigValue {
        value: Some(CV::SecretObject(pb::SecretObject {
            key: key.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: config.id.clone() }),
        })),
    };
    let payload = |keys: &[&str]| pb::WorkloadPayload {
        kind: Some(Kind::Compute(pb::ComputePayload {
            env_vars: keys.iter().map(|k| (k.to_uppercase(), vault(k))).collect(),
            ..Default::default()
        })),
    };
    let save = |p: pb::WorkloadPayload| {
        let mut gateway = app.as_service(Some(&format!("user:{OWNER}"))).gateway.clone();
        async move {
            let request = pb::SaveWorkloadRequest {
                domain: "finance".into(),
                id: "analytics".into(),
                name: String::new(),
                payload: Some(p),
                validate_only: false,
            };
            gateway.save_workload(request).await.unwrap().into_inner()
        }
    };
    let out = save(payload(&["db_password", "no_such_key"])).await;
    assert!(!out.saved);
    assert_eq!(out.problems.len(), 1, "{out:?}");
    assert_eq!(out.problems[0].field, r#"envVars["NO_SUCH_KEY"]"#);
    assert_eq!(out.problems[0].r#type, ProblemType::ProblemNotFound as i32, "{}", out.problems[0].message);
    let out = save(payload(&["db_password", "api_key"])).await;
    assert!(out.saved, "{out:?}");
    assert!(!format!("{out:?}").contains("pw-from-vault"), "a save reads no value out");

    let found = app
        .as_user(OWNER)
        .gateway
        .clone()
        .list_secret_usages(pb::ListSecretUsagesRequest {
            secret: Some(pb::list_secret_usages_request::Secret::VaultSecret(pb::VaultSecret {
                config_id: config.id.clone(),
                key: "api_key".into(),
            })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.total, 1);
    assert_eq!(found.usages[0].references.len(), 1, "only the matching key's field");
    assert_eq!(found.usages[0].references[0].field, r#"envVars["API_KEY"]"#);

    let mut olivia = app.as_user(OWNER).vault.clone();
    let delete = |force| pb::DeleteVaultConfigRequest { id: config.id.clone(), force };
    let e = olivia.delete_vault_config(delete(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("vault config \"prod\"") && e.message().contains("finance/COMPUTE/analytics"),
        "{}",
        e.message()
    );
    assert!(olivia.get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() }).await.is_ok());

    // Only the usage index failing (the authz-service answers): refused
    // with UNAVAILABLE, and the config stays.
    app.usage_index_works(false).await;
    assert!(olivia.get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() }).await.is_ok());
    let e = olivia.delete_vault_config(delete(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("usage index"), "{}", e.message());
    app.usage_index_works(true).await;
    assert!(olivia.get_vault_config(pb::GetVaultConfigRequest { id: config.id.clone() }).await.is_ok());

    // Vault down: the save names the backend, per field.
    bao.stop();
    let out = save(payload(&["db_password"])).await;
    assert!(!out.saved);
    assert_eq!(out.problems[0].r#type, ProblemType::ProblemBackendUnavailable as i32, "{:?}", out.problems);
    bao.restart();

    let deleted = olivia.delete_vault_config(delete(true)).await.unwrap().into_inner();
    let broken = deleted.broken.unwrap();
    assert_eq!((broken.total, broken.workloads[0].id.as_str()), (1, "analytics"));
}

/// Accepts connections on 127.0.0.1 and keeps every byte it receives.
struct Recorder {
    addr: String,
    bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bytes.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // What a client sends first (its request) and then the close.
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(std::time::Duration::from_millis(500), stream.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Self { addr, bytes }
    }

    fn contains(&self, needle: &str) -> bool {
        let bytes = self.bytes.lock().unwrap();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn len(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_holder_can_never_send_the_stored_credentials_to_another_server() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let owner_token = bao.field(&["token", "create", "-policy=root"], "token");
    let config =
        create(&app, OWNER, spec("prod", &bao, "/v1/secret/data/production", token_creds(&owner_token))).await.unwrap();
    // max may UPDATE the config: the bundle's owner granted it.
    app.as_user(OWNER)
        .authz
        .clone()
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: BUNDLE.into(),
            subject: format!("user:{MANAGER}"),
            permission: Permission::Update as i32,
        })
        .await
        .unwrap();
    let recorder = Recorder::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let other_ca = integration_tests::pki::Pki::new(tmp.path(), "attacker").ca_pem();
    let mut max = app.as_user(MANAGER).vault.clone();
    let test_saved = |mut client: pb::vault_config_service_client::VaultConfigServiceClient<_>, id: String| async move {
        client
            .test_vault_connection(pb::TestVaultConnectionRequest {
                target: Some(pb::test_vault_connection_request::Target::Id(id)),
            })
            .await
            .unwrap()
            .into_inner()
    };

    let attempts = [
        ("host", pb::UpdateVaultConfigRequest { host: Some(recorder.addr.clone()), ..Default::default() }),
        ("namespace", pb::UpdateVaultConfigRequest { namespace: Some("team-x".into()), ..Default::default() }),
        ("ca_certificate", pb::UpdateVaultConfigRequest { ca_certificate: Some(other_ca), ..Default::default() }),
        (
            "host and namespace",
            pb::UpdateVaultConfigRequest {
                host: Some(recorder.addr.clone()),
                namespace: Some("team-x".into()),
                ..Default::default()
            },
        ),
    ];
    for (moved, mut request) in attempts {
        request.id = config.id.clone();
        let err = max.update_vault_config(request).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{moved}: {}", err.message());
        assert!(
            err.message().contains(&format!("changing the {moved} of vault config \"prod\""))
                && err.message().contains("give the credentials again in the same request"),
            "{moved}: {}",
            err.message()
        );
        // Nothing changed: the config still reaches its own Vault.
        let test = test_saved(max.clone(), config.id.clone()).await;
        assert_eq!(test.outcome(), Outcome::ConnectionOk, "{moved}: {}", test.message);
    }
    // A path on the same server keeps the credentials.
    max.update_vault_config(pb::UpdateVaultConfigRequest {
        id: config.id.clone(),
        path: Some("/v1/secret/data/production/".into()),
        ..Default::default()
    })
    .await
    .unwrap();

    // With credentials of its own, max may point the config elsewhere:
    // those, and only those, go there.
    max.update_vault_config(pb::UpdateVaultConfigRequest {
        id: config.id.clone(),
        host: Some(recorder.addr.clone()),
        credentials: Some(token_creds("max-own-token-for-elsewhere")),
        ..Default::default()
    })
    .await
    .unwrap();
    let test = test_saved(max.clone(), config.id.clone()).await;
    assert_ne!(test.outcome(), Outcome::ConnectionOk, "{}", test.message);
    let resolved = app
        .as_service(Some(&format!("user:{MEMBER}")))
        .resolve("finance", vec![vault_item("x", &config.id, "db_password")])
        .await
        .unwrap();
    assert!(matches!(resolved[0].result, Some(R::Error(_))), "{resolved:?}");
    assert!(recorder.len() > 0, "the recorder saw the test connection");
    assert!(recorder.contains("max-own-token-for-elsewhere"), "the recorder records what reaches it");
    assert!(!recorder.contains(&owner_token), "the owner's token reached the other server");

    // An AppRole config alike: its secret id never leaves for another host,
    // nor does a mount change go without credentials.
    let (role_id, secret_id) = app_role(&bao, "1h", "2h");
    let approle = create(
        &app,
        OWNER,
        spec("prod-approle", &bao, "/v1/secret/data/production", app_role_creds(&role_id, &secret_id)),
    )
    .await
    .unwrap();
    let err = max
        .update_vault_config(pb::UpdateVaultConfigRequest {
            id: approle.id.clone(),
            host: Some(recorder.addr.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let test = test_saved(max.clone(), approle.id.clone()).await;
    assert_eq!(test.outcome(), Outcome::ConnectionOk, "{}", test.message);
    assert!(!recorder.contains(&secret_id), "the owner's AppRole secret id reached the other server");
}

/// The logins OpenBao's audit log records after `skip` requests.
fn logins_after(bao: &OpenBao, skip: usize) -> usize {
    bao.requested_paths().into_iter().skip(skip).filter(|p| p == "auth/approle/login").count()
}

/// One config's connection, read by 100 requests at once after Vault
/// revoked its token: each gets a 403, and exactly one logs in again. (On
/// the connection itself: through the service, the value cache would merge
/// the reads into one before they reach Vault.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_refused_reads_make_one_login() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bao = OpenBao::start();
    bao.bao(&["kv", "put", "secret/production", "db_password=pw-from-vault"]);
    let (role_id, secret_id) = app_role(&bao, "1h", "2h");
    let config = spec("prod", &bao, "/v1/secret/data/production", app_role_creds(&role_id, &secret_id));
    let target = vault_config_service::spec::target(&config, "").unwrap();
    let credentials = vault_config_service::spec::credentials("credentials", config.credentials.as_ref()).unwrap();
    let connection = std::sync::Arc::new(
        vault_config_service::vault::Connection::new(target, credentials, std::time::Duration::from_secs(30)).unwrap(),
    );
    assert!(connection.read().await.unwrap().contains_key("db_password"));
    // Every token the role has handed out is revoked.
    bao.bao(&["token", "revoke", "-mode=path", "auth/approle"]);
    let before = bao.requested_paths().len();
    let reads = (0..100).map(|_| {
        let connection = connection.clone();
        tokio::spawn(async move { connection.read().await })
    });
    for read in futures::future::join_all(reads).await {
        assert!(read.unwrap().expect("read after one fresh login").contains_key("db_password"));
    }
    let paths: Vec<String> = bao.requested_paths().into_iter().skip(before).collect();
    let refused = paths.iter().filter(|p| *p == "secret/data/production").count();
    let logins = paths.iter().filter(|p| *p == "auth/approle/login").count();
    assert!(refused > 100, "every read reached Vault, and was refused first: {refused}");
    assert_eq!(logins, 1, "one login however many reads were refused: {paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_backs_off_and_each_item_says_so_naming_the_config() {
    let bao = OpenBao::start();
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    let (role_id, _) = app_role(&bao, "1h", "2h");
    let wrong = uuid::Uuid::new_v4().to_string();
    let config =
        create(&app, OWNER, spec("prod", &bao, "/v1/secret/data/production", app_role_creds(&role_id, &wrong)))
            .await
            .unwrap();
    let before = bao.requested_paths().len();
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let start = std::time::Instant::now();
    let mut messages = Vec::new();
    for _ in 0..50 {
        let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
        let (code, message) = item_error(&out[0]);
        assert_eq!(code, Code::FailedPrecondition, "{message}");
        assert!(message.contains("vault config \"prod\""), "names the config: {message}");
        messages.push(message);
    }
    let elapsed = start.elapsed();
    let logins = logins_after(&bao, before);
    eprintln!("50 resolves in {elapsed:?}: {logins} login attempts");
    // The waits are at least 1 s, 2 s, 4 s, ...: attempt n+1 needs 2^n - 1 s.
    let allowed = 1 + (1..16).filter(|n| ((1u64 << n) - 1) as f64 <= elapsed.as_secs_f64()).count();
    assert!(logins >= 1 && logins <= allowed, "{logins} login attempts in {elapsed:?} (at most {allowed})");
    assert!(messages.iter().any(|m| m.contains("failed logins")), "the backoff is named: {messages:?}");
    assert!(!messages.iter().any(|m| m.contains(&wrong)), "no secret id in a message");

    // Testing the connection logs in for real, backoff or not.
    let before = bao.requested_paths().len();
    let request = pb::TestVaultConnectionRequest {
        target: Some(pb::test_vault_connection_request::Target::Id(config.id.clone())),
    };
    let tested = app.as_user(OWNER).vault.clone().test_vault_connection(request).await.unwrap().into_inner();
    assert_eq!(tested.outcome, pb::VaultConnectionOutcome::InvalidCredentials as i32, "{tested:?}");
    assert_eq!(logins_after(&bao, before), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_approle_token_is_renewed_ahead_of_its_expiry() {
    let bao = OpenBao::start();
    let app = spawn_uncached().await;
    setup(&app, &bao).await;
    let (config, _) = approle_config(&app, &bao, "6s", "1h").await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let before = bao.requested_paths().len();
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");
    // Past the token's lifetime with no request: it was renewed meanwhile,
    // so the next read needs no login.
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");
    let paths: Vec<String> = bao.requested_paths().into_iter().skip(before).collect();
    let renewals = paths.iter().filter(|p| *p == "auth/token/renew-self").count();
    assert!(renewals >= 1, "renewed while idle: {paths:?}");
    assert_eq!(logins_after(&bao, before), 1, "{paths:?}");
}

/// An AppRole config (tokens living `ttl`) whose value nina has resolved,
/// so it is cached; then the Vault operator withdraws the role's access:
/// its secret id and every token it had.
async fn a_cached_value_whose_approle_is_withdrawn(ttl: &str) -> (OpenBao, TestApp, pb::VaultConfig) {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let (config, secret_id) = approle_config(&app, &bao, ttl, "2h").await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");
    bao.bao(&["write", "auth/approle/role/etl/secret-id/destroy", &format!("secret_id={secret_id}")]);
    bao.bao(&["token", "revoke", "-mode=path", "auth/approle"]);
    (bao, app, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_vault_refuses_stop_cached_values_being_served() {
    let (_bao, app, config) = a_cached_value_whose_approle_is_withdrawn("1h").await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let request = pb::TestVaultConnectionRequest {
        target: Some(pb::test_vault_connection_request::Target::Id(config.id.clone())),
    };
    let tested = app.as_user(OWNER).vault.clone().test_vault_connection(request).await.unwrap().into_inner();
    assert_eq!(tested.outcome, pb::VaultConnectionOutcome::InvalidCredentials as i32, "{tested:?}");
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::FailedPrecondition, "the cached value is not served any more: {message}");
}

/// The same when nobody asks: the background renewal is refused, and the
/// values read with the withdrawn credentials stop being served although
/// their cache time has not run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_vault_refuses_in_the_background_stops_cached_values_being_served() {
    // Renewed at two thirds of 3 s; values are kept for 30 s.
    let (_bao, app, config) = a_cached_value_whose_approle_is_withdrawn("3s").await;
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
        if let Some(R::Error(e)) = &out[0].result {
            assert_eq!(e.code, Code::FailedPrecondition as i32, "{}", e.message);
            assert!(e.message.contains("refused the credentials"), "{}", e.message);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cached value was still served after the refused renewal");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn hosts_certificates_and_mounts_that_cannot_work_are_refused_at_create_update_and_test() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let good = || spec("prod", &bao, "/v1/secret/data/production", token_creds(&bao.root_token));
    let with_host = |host: &str| pb::VaultConfigSpec { host: host.into(), ..good() };
    let header_only = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
    let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    let cases = [
        (with_host("http://127.0.0.1:99999"), "spec.host", "1 to 65535"),
        (with_host("http://127.0.0.1:0"), "spec.host", "1 to 65535"),
        (with_host("https://ops:canary-url-password@vault.example.com"), "spec.host", "user info"),
        (with_host("https://vault.example.com:8200/#x"), "spec.host", "fragment"),
        (with_host("ftp://vault.example.com"), "spec.host", "scheme"),
        (pb::VaultConfigSpec { ca_certificate: header_only.into(), ..good() }, "spec.ca_certificate", "not a usable"),
        (pb::VaultConfigSpec { ca_certificate: garbage.into(), ..good() }, "spec.ca_certificate", "certificate 1"),
        (
            pb::VaultConfigSpec {
                credentials: Some(pb::VaultCredentials {
                    method: Some(pb::vault_credentials::Method::AppRole(pb::AppRoleCredentials {
                        role_id: "r".into(),
                        secret_id: "s".into(),
                        mount: "../x".into(),
                    })),
                }),
                ..good()
            },
            "spec.credentials.app_role.mount",
            "'..'",
        ),
    ];
    for (bad, field, rule) in &cases {
        let err = create(&app, OWNER, bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field) && err.message().contains(rule), "{field}: {}", err.message());
        assert!(!err.message().contains("canary-url-password"), "a password in a URL is never repeated");
        // Testing it unsaved is refused alike, before anything is sent.
        let request = pb::TestVaultConnectionRequest {
            target: Some(pb::test_vault_connection_request::Target::Unsaved(pb::UnsavedVaultConfig {
                domain: "finance".into(),
                spec: Some(bad.clone()),
            })),
        };
        let err = app.as_user(OWNER).vault.clone().test_vault_connection(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "test of {field}: {err:?}");
    }
    // And in an update; the config keeps working.
    let config = create(&app, OWNER, good()).await.unwrap();
    let update = pb::UpdateVaultConfigRequest {
        id: config.id.clone(),
        host: Some("http://127.0.0.1:99999".into()),
        credentials: Some(token_creds(&bao.root_token)),
        ..Default::default()
    };
    let err = app.as_user(OWNER).vault.clone().update_vault_config(update).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");
}

/// A "Vault" that answers every request with `bytes` of JSON-looking body.
async fn flooding_server(bytes: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = socket.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 0;
                while sent < bytes {
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Answers every request with `status` and an HTML page: a proxy or a web
/// server where Vault should be.
async fn html_server(status: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = socket.read(&mut buf).await;
                let page = "<html><body>Forbidden by policy</body></html>";
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

/// A 403 or 404 from something that is not Vault (a proxy's HTML page) is
/// never read as Vault refusing the credentials or lacking the secret.
#[tokio::test]
async fn a_server_that_is_not_vault_is_never_taken_for_vaults_answer() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    for status in ["403 Forbidden", "404 Not Found"] {
        let host = html_server(status).await;
        for creds in [token_creds("t"), app_role_creds("role", "secret")] {
            let spec = pb::VaultConfigSpec {
                name: "proxied".into(),
                host: host.clone(),
                path: "/v1/secret/data/production".into(),
                credentials: Some(creds),
                ..Default::default()
            };
            let answer = test_unsaved(&app, spec).await;
            assert!(
                !matches!(
                    answer.outcome(),
                    Outcome::InvalidCredentials | Outcome::SecretNotFound | Outcome::ConnectionOk
                ),
                "{status}: {:?}: {}",
                answer.outcome(),
                answer.message
            );
            assert!(answer.message.contains("without a Vault error"), "{status}: {}", answer.message);
        }
    }
}

#[tokio::test]
async fn a_vault_answer_past_the_size_limit_is_refused_not_buffered() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let host = flooding_server(64 << 20).await;
    let flood = pb::VaultConfigSpec {
        name: "flood".into(),
        host,
        path: "/v1/secret/data/production".into(),
        credentials: Some(token_creds("t")),
        ..Default::default()
    };
    let config = create(&app, OWNER, flood).await.unwrap();
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let out = service.resolve("finance", vec![vault_item("x", &config.id, "db_password")]).await.unwrap();
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("more than 4 MiB") && message.contains("vault config \"flood\""), "{message}");

    // Logins and token look-ups (a test connection of an unsaved config,
    // which any domain owner may point anywhere) are capped alike.
    let host = flooding_server(64 << 20).await;
    for creds in [token_creds("t"), app_role_creds("role", "secret")] {
        let answer = test_unsaved(
            &app,
            pb::VaultConfigSpec {
                name: "flood".into(),
                host: host.clone(),
                path: "/v1/secret/data/production".into(),
                credentials: Some(creds),
                ..Default::default()
            },
        )
        .await;
        assert_ne!(answer.outcome(), Outcome::ConnectionOk);
        assert!(answer.message.contains("more than 4 MiB"), "{}", answer.message);
    }
}

#[tokio::test]
async fn the_value_cache_is_bounded_in_bytes() {
    let bao = OpenBao::start();
    let app = TestApp::spawn_with(Options {
        vault: Some(vault_config_service::VaultSettings { cache_max_bytes: 2_048, ..Default::default() }),
        ..Default::default()
    })
    .await;
    setup(&app, &bao).await;
    bao.bao(&["kv", "put", "secret/small", "k=small-value"]);
    bao.bao(&["kv", "put", "secret/large", &format!("k={}", "x".repeat(4_096))]);
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    for (name, reads_expected) in [("small", 1), ("large", 3)] {
        let path = format!("/v1/secret/data/{name}");
        let config = create(&app, OWNER, spec(name, &bao, &path, token_creds(&bao.root_token))).await.unwrap();
        let before = bao.requested_paths().len();
        for _ in 0..3 {
            let out = service.resolve("finance", vec![vault_item("x", &config.id, "k")]).await.unwrap();
            assert!(matches!(out[0].result, Some(R::Value(_))), "{out:?}");
        }
        let wanted = format!("secret/data/{name}");
        let reads = bao.requested_paths().into_iter().skip(before).filter(|p| *p == wanted).count();
        assert_eq!(reads, reads_expected, "{name}: a secret larger than the whole cache is not kept");
    }
}

/// Whether `who` gets the Vault value through the gateway: `Some(true)` a
/// value, `Some(false)` a refusal.
async fn uses(app: &TestApp, who: &str, config_id: &str) -> bool {
    let items = vec![vault_item("env.DB", config_id, "db_password")];
    let out = app.as_service(Some(&format!("user:{who}"))).resolve("finance", items).await.unwrap();
    match &out[0].result {
        Some(R::Value(_)) => true,
        Some(R::Error(e)) if e.code == Code::PermissionDenied as i32 => false,
        other => panic!("neither a value nor a refusal: {other:?}"),
    }
}

/// Resolves as `who` until a resolve asks the authz-service nothing: the
/// gateway holds a decision lease and answers from memory.
async fn until_answered_from_memory(app: &TestApp, who: &str, config_id: &str) {
    const ASKED: &str = r#"secrets_backend_calls_total{backend="authz-service",operation="BatchCheck"}"#;
    let asked = || async { sample(&http_get(&app.metrics_url("gateway")).await.1, ASKED) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let before = asked().await;
        assert!(uses(app, who, config_id).await, "{who} may use the config");
        if asked().await == before {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the gateway never answered from memory");
}

/// USE that comes through a bundle grant to a group: while the gateway
/// answers from memory, revoking the grant, or taking the user out of the
/// group, counts on the very next resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_bundle_grant_or_group_membership_counts_on_the_next_resolve_through_the_gateway() {
    let bao = OpenBao::start();
    let app = TestApp::spawn().await;
    setup(&app, &bao).await;
    let config = prod_config(&app, &bao).await;
    let mut authz = app.as_user(ADMIN).authz.clone();
    authz
        .create_group(pb::CreateGroupRequest { name: "vault-users".into(), description: String::new() })
        .await
        .unwrap();
    let membership = pb::AddGroupMemberRequest { group: "vault-users".into(), member: format!("user:{LISTER}") };
    authz.add_group_member(membership.clone()).await.unwrap();
    let grant = pb::GrantBundlePermissionRequest {
        bundle: BUNDLE.into(),
        subject: "group:vault-users".into(),
        permission: Permission::Use as i32,
    };
    authz.grant_bundle_permission(grant.clone()).await.unwrap();

    for round in 0..3 {
        until_answered_from_memory(&app, LISTER, &config.id).await;
        authz
            .revoke_bundle_permission(pb::RevokeBundlePermissionRequest {
                bundle: BUNDLE.into(),
                subject: "group:vault-users".into(),
                permission: Permission::Use as i32,
            })
            .await
            .unwrap();
        assert!(!uses(&app, LISTER, &config.id).await, "round {round}: the revoked grant still counted");
        authz.grant_bundle_permission(grant.clone()).await.unwrap();

        until_answered_from_memory(&app, LISTER, &config.id).await;
        authz
            .remove_group_member(pb::RemoveGroupMemberRequest {
                group: "vault-users".into(),
                member: format!("user:{LISTER}"),
            })
            .await
            .unwrap();
        assert!(!uses(&app, LISTER, &config.id).await, "round {round}: the removed membership still counted");
        authz.add_group_member(membership.clone()).await.unwrap();
    }
    // Nina's own grant was never touched.
    assert!(uses(&app, MEMBER, &config.id).await);
}

/// A hung vault-config-service fails only the items it serves, before the
/// caller's deadline: the store's items still resolve, and each Vault item
/// says which service was late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_vault_config_service_fails_only_its_items_before_the_callers_deadline() {
    let bao = OpenBao::start();
    let app = TestApp::spawn_with(Options { source_proxies: true, ..Default::default() }).await;
    setup(&app, &bao).await;
    let config = prod_config(&app, &bao).await;
    app.as_user(OWNER).create("finance", "db", "pw-from-store").await.unwrap();
    let items = vec![vault_item("envVars.VAULT", &config.id, "db_password"), text_item("envVars.DB", "${secrets.db}")];
    let resolve = |timeout: Duration| {
        let mut gateway = app.as_service(Some(&format!("user:{MEMBER}"))).gateway.clone();
        let mut request =
            tonic::Request::new(pb::ResolveSecretsRequest { domain: "finance".into(), items: items.clone() });
        request.set_timeout(timeout);
        async move { gateway.resolve_secrets(request).await.map(|r| r.into_inner().items) }
    };
    let out = resolve(Duration::from_secs(30)).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-vault");

    app.vault_link().freeze();
    // Under the services' own 2 s bound: the caller's deadline decides.
    let out = resolve(Duration::from_millis(1_500)).await.expect("the call answers, with the store's items");
    assert_eq!(out[1].result, Some(R::Text("pw-from-store".into())), "the store's item resolves");
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::Unavailable);
    assert!(message.contains("vault-config-service: did not answer before the call's deadline"), "{message}");
    assert!(message.starts_with("items[0] (\"envVars.VAULT\")"), "{message}");

    // Without a deadline, the services' own bound fails the Vault item only.
    let out = app.as_service(Some(&format!("user:{MEMBER}"))).resolve("finance", items.clone()).await.unwrap();
    assert_eq!(out[1].result, Some(R::Text("pw-from-store".into())), "the store's item resolves");
    let (code, message) = item_error(&out[0]);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("vault-config-service"), "{message}");
}

on_both_databases!(a_resolve_reads_no_database_and_a_change_to_the_config_counts_at_once);

/// The queries the vault-config-service has sent.
async fn vault_config_queries(app: &TestApp) -> f64 {
    let backend = if app.database_url.starts_with("postgres") { "postgres" } else { "sqlite" };
    let selects = format!(r#"secrets_backend_calls_total{{backend="{backend}",operation="select"}}"#);
    sample(&http_get(&app.metrics_url("vault-config-service")).await.1, &selects)
}

/// Resolves until 10 resolves in a row send the vault-config-service's
/// database no query: the configs are held in memory, loaded in the
/// background at start and, on PostgreSQL, a change is read from memory
/// again once its notification has come back. False when that never
/// happens.
async fn resolves_without_queries(app: &TestApp, config_id: &str, expected: &[u8]) -> bool {
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    for _ in 0..100 {
        let before = vault_config_queries(app).await;
        for _ in 0..10 {
            let out = service.resolve("finance", vec![vault_item("v", config_id, "db_password")]).await.unwrap();
            assert_eq!(value(&out[0]), expected);
        }
        if vault_config_queries(app).await == before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn a_resolve_reads_no_database_and_a_change_to_the_config_counts_at_once(app: TestApp) {
    let bao = OpenBao::start();
    setup(&app, &bao).await;
    bao.bao(&["kv", "put", "secret/staging", "db_password=pw-from-staging"]);
    let config = prod_config(&app, &bao).await;
    assert!(resolves_without_queries(&app, &config.id, b"pw-from-vault").await, "every resolve queried the database");

    // The next resolve after an update returns reads the new path.
    let mut olivia = app.as_user(OWNER).vault.clone();
    let update = pb::UpdateVaultConfigRequest {
        id: config.id.clone(),
        path: Some("/v1/secret/data/staging".into()),
        ..Default::default()
    };
    olivia.update_vault_config(update).await.unwrap();
    let service = app.as_service(Some(&format!("user:{MEMBER}")));
    let out = service.resolve("finance", vec![vault_item("v", &config.id, "db_password")]).await.unwrap();
    assert_eq!(value(&out[0]), b"pw-from-staging", "the first resolve after the update");
    assert!(resolves_without_queries(&app, &config.id, b"pw-from-staging").await, "queries after an update");

    // And after a delete, the config is gone for the next resolve (its
    // bundle placement went with it).
    olivia.delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone(), force: false }).await.unwrap();
    let out = service.resolve("finance", vec![vault_item("v", &config.id, "db_password")]).await.unwrap();
    assert_eq!(item_error(&out[0]).0, Code::PermissionDenied, "{out:?}");
}

/// Two replicas of the vault-config-service on one PostgreSQL database:
/// each holds the configs in memory, and a create, update or delete through
/// one reaches the other's memory through LISTEN/NOTIFY (no polling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_config_change_returns_only_once_every_other_replica_holds_it() {
    use sea_orm::{ActiveModelTrait, EntityTrait, Set, TransactionTrait};
    use vault_config_service::{db::vault_config, rows::Rows};
    let Some(database) = integration_tests::postgres::fresh_database().await else { return };
    let timeout = Duration::from_secs(30);
    let connect = || vault_config_service::db::connect(&database.url, timeout, None);
    let (db_a, db_b) = (connect().await.unwrap(), connect().await.unwrap());
    let (a, b) = (Rows::start(db_a.clone(), timeout), Rows::start(db_b.clone(), timeout));
    let now = chrono::Utc::now();
    let row = vault_config::Model {
        id: uuid::Uuid::new_v4().to_string(),
        domain: "finance".into(),
        name: "prod".into(),
        bundle: BUNDLE.into(),
        host: "https://vault.example:8200".into(),
        path: "/v1/secret/data/production".into(),
        namespace: String::new(),
        ca_certificate: String::new(),
        auth_method: "TOKEN".into(),
        created_at: now,
        updated_at: now,
    };
    let id = row.id.clone();
    // What B holds in memory (not what the database says), once B's copy is current.
    let held_by_b = || async {
        for _ in 0..600 {
            if b.is_current() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(b.is_current(), "replica B never loaded the configs");
        b.get(&id).await.unwrap()
    };
    // What B's memory says once a write through A has returned: no waiting.
    let b_holds = || async { held_by_b().await.map(|r| r.path) };
    assert_eq!(held_by_b().await, None);

    let write = |op: &'static str, path: &'static str| {
        let (a, db_a, row) = (a.clone(), db_a.clone(), row.clone());
        async move {
            let change = a.changing(&row.id);
            let txn = db_a.begin().await.unwrap();
            match op {
                "insert" => drop(
                    vault_config::Entity::insert(vault_config::ActiveModel::from(row.clone()))
                        .exec(&txn)
                        .await
                        .unwrap(),
                ),
                "update" => {
                    let mut active: vault_config::ActiveModel = row.clone().into();
                    active.path = Set(path.into());
                    active.updated_at = Set(row.updated_at + chrono::Duration::milliseconds(1));
                    drop(active.update(&txn).await.unwrap());
                }
                _ => drop(vault_config::Entity::delete_by_id(row.id.clone()).exec(&txn).await.unwrap()),
            }
            a.notify(&txn, &change).await.unwrap();
            txn.commit().await.unwrap();
            a.changed(change).await.unwrap();
        }
    };
    write("insert", "").await;
    assert_eq!(b_holds().await.as_deref(), Some("/v1/secret/data/production"), "the create returned before B had it");
    for path in ["/v1/secret/data/staging", "/v1/secret/data/dev", "/v1/secret/data/qa"] {
        write("update", path).await;
        assert_eq!(b_holds().await.as_deref(), Some(path), "the update returned before B had it");
        assert_eq!(a.get(&id).await.unwrap().unwrap().path, path, "A reads its own write");
    }
    write("delete", "").await;
    assert_eq!(b_holds().await, None, "the delete returned before B had it");
    drop((a, b, db_a, db_b));
    database.drop_database().await;
}
