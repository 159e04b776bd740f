//! Identity tokens at the gateway: users with JWTs from an OpenID Connect
//! provider (discovery document + JWKS over HTTP, made in the test), and
//! platform services with Kubernetes service-account tokens. Every refusal
//! is UNAUTHENTICATED with a reason naming what failed, never the token.

use std::time::Duration;

use gateway::jwt::{IssuerConfig, IssuerKind};
use integration_tests::{
    oidc::{FakeOidc, SigningKey},
    *,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrets_proto::v1 as pb;
use serde_json::json;
use tonic::Code;

const DOMAIN: &str = "finance";
const AUDIENCE: &str = "secrets-gateway";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:compute:compute-manager";

fn issuer(oidc: &FakeOidc, name: &str, kind: IssuerKind) -> IssuerConfig {
    IssuerConfig {
        name: name.into(),
        kind,
        issuer: oidc.issuer.clone(),
        audiences: vec![AUDIENCE.into()],
        discovery_url: None,
        ca_file: None,
        bearer_token_file: None,
        user_claim: "sub".into(),
        groups_claim: Some("groups".into()),
        group_map: [("/finance-readers".to_string(), "data-eng".to_string())].into(),
        shared_namespace: false,
        leeway_s: 30,
        jwks_min_refresh_ms: 400,
        jwks_max_age_ms: 600_000,
        fetch_timeout_ms: 2_000,
    }
}

/// The principal the keycloak issuer's token for `user` (whose `sub` is
/// `uuid-of-USER`) acts as.
fn by_jwt(user: &str) -> String {
    format!("user:keycloak/uuid-of-{user}")
}

/// Makes the keycloak user `user` an owner of the domain.
async fn own_by_jwt(app: &TestApp, user: &str) {
    app.as_user(ADMIN)
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: DOMAIN.into(),
            subject: by_jwt(user),
            role: pb::DomainRole::Owner as i32,
        })
        .await
        .expect("owner by JWT");
}

fn user_claims(oidc: &FakeOidc, user: &str, groups: &[&str]) -> serde_json::Value {
    let mut claims = oidc.claims(AUDIENCE, &format!("uuid-of-{user}"));
    claims["preferred_username"] = json!(user);
    claims["groups"] = json!(groups);
    claims
}

async fn spawn(keycloak: &FakeOidc, cluster: Option<&FakeOidc>) -> TestApp {
    spawn_with_max_age(keycloak, cluster, 600_000).await
}

/// `max_age_ms`: how old the cached keys may get before a use refreshes them.
async fn spawn_with_max_age(keycloak: &FakeOidc, cluster: Option<&FakeOidc>, max_age_ms: u64) -> TestApp {
    let mut issuers =
        vec![IssuerConfig { jwks_max_age_ms: max_age_ms, ..issuer(keycloak, "keycloak", IssuerKind::Users) }];
    if let Some(c) = cluster {
        issuers.push(issuer(c, "cluster", IssuerKind::ServiceAccounts));
    }
    TestApp::spawn_with(Options {
        jwt_issuers: issuers,
        service_accounts: vec![gateway::ServiceAccountConfig {
            service_account: SERVICE_ACCOUNT.into(),
            subject: "compute".into(),
            allow: None,
            act_for: None,
            act_for_admins: false,
        }],
        ..Default::default()
    })
    .await
}

fn with_jwt(app: &TestApp, token: &str, on_behalf_of: Option<&str>) -> Clients {
    Clients::over(app.gateway_channel(), Some(token), on_behalf_of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_with_provider_tokens_act_as_themselves_and_their_token_groups_count() {
    let key = SigningKey::generate("k1");
    let keycloak = FakeOidc::start(&[&key]).await;
    let app = spawn(&keycloak, None).await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "db-password", "v").await.expect("create");

    // A provider user is user:keycloak/<sub>: not the static user of the
    // same name, until that principal is given the domain.
    let owner = with_jwt(&app, &key.sign(&user_claims(&keycloak, OWNER, &[])), None);
    let e = owner.list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(&by_jwt(OWNER)), "{}", e.message());
    own_by_jwt(&app, OWNER).await;
    assert_eq!(owner.list(DOMAIN).await.expect("the owner by JWT"), ["db-password"]);

    // A stranger sees nothing... until the provider puts them in a group
    // that is a member of the domain with LIST_SECRETS.
    let stranger = with_jwt(&app, &key.sign(&user_claims(&keycloak, STRANGER, &[])), None);
    assert_eq!(stranger.list(DOMAIN).await.unwrap_err().code(), Code::PermissionDenied);
    let admin = app.as_user(ADMIN);
    admin
        .authz
        .clone()
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: DOMAIN.into(),
            subject: "group:keycloak/data-eng".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .expect("group member");
    admin
        .authz
        .clone()
        .grant_domain_permission(pb::GrantDomainPermissionRequest {
            domain: DOMAIN.into(),
            subject: "group:keycloak/data-eng".into(),
            permission: pb::Permission::ListSecrets as i32,
        })
        .await
        .expect("grant to the group");
    // Keycloak writes group paths; they count under the issuer's namespace.
    let in_group = with_jwt(&app, &key.sign(&user_claims(&keycloak, STRANGER, &["/data-eng"])), None);
    assert_eq!(in_group.list(DOMAIN).await.expect("a member by the groups claim"), ["db-password"]);
    assert_eq!(stranger.list(DOMAIN).await.unwrap_err().code(), Code::PermissionDenied, "not without the claim");

    // The authz service's own decisions count token groups too: a bundle
    // owned by a group is managed by a member by token.
    admin
        .authz
        .clone()
        .create_bundle(pb::CreateBundleRequest {
            name: "team-vault".into(),
            description: String::new(),
            owner: "group:keycloak/vault-admins".into(),
        })
        .await
        .expect("bundle");
    let grant = pb::GrantBundlePermissionRequest {
        bundle: "team-vault".into(),
        subject: "user:zoe".into(),
        permission: pb::Permission::View as i32,
    };
    let outsider = with_jwt(&app, &key.sign(&user_claims(&keycloak, "zed", &[])), None);
    let e = outsider.authz.clone().grant_bundle_permission(grant.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let owner_by_token = with_jwt(&app, &key.sign(&user_claims(&keycloak, "zed", &["vault-admins"])), None);
    owner_by_token.authz.clone().grant_bundle_permission(grant).await.expect("an owner through the groups claim");

    // A user token never acts for someone else.
    let other = with_jwt(&app, &key.sign(&user_claims(&keycloak, OWNER, &[])), Some("user:admin"));
    let e = other.list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("only platform services may act on behalf"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_unauthenticated_with_the_reason_and_never_the_token() {
    let key = SigningKey::generate("k1");
    let keycloak = FakeOidc::start(&[&key]).await;
    let elsewhere_key = SigningKey::generate("k1");
    let elsewhere = FakeOidc::start(&[&elsewhere_key]).await;
    let app = spawn(&keycloak, None).await;
    app.setup_domain(DOMAIN).await;
    own_by_jwt(&app, OWNER).await;
    let good = user_claims(&keycloak, OWNER, &[]);
    let now = chrono::Utc::now().timestamp();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };

    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("another-app");
    let mut expired = good.clone();
    expired["exp"] = json!(now - 120);
    let mut early = good.clone();
    early["nbf"] = json!(now + 3600);
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&key.public_bytes()).unwrap()).unwrap()
    };
    let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","kid":"k1"}"#), b64(&good.to_string()));
    let unknown_kid = SigningKey::generate("k-unpublished").sign(&good);
    let tampered = {
        let token = key.sign(&good);
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = good.clone();
        claims["preferred_username"] = json!(ADMIN);
        format!("{}.{}.{}", parts[0], b64(&claims.to_string()), parts[2])
    };
    let mut foreign_claims = good.clone();
    foreign_claims["iss"] = json!(elsewhere.issuer);

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned, "alg none is refused"),
        ("HS256 signed with the public key", hs256, "alg \"HS256\" is refused"),
        ("wrong issuer", elsewhere_key.sign(&foreign_claims), "is not trusted"),
        ("wrong audience", key.sign(&wrong_aud), "wrong audience"),
        ("expired", key.sign(&expired), "expired"),
        ("not yet valid", key.sign(&early), "not valid yet"),
        ("no exp", key.sign(&no_exp), "no exp claim"),
        ("unknown key", unknown_kid, "unknown signing key kid \"k-unpublished\""),
        ("tampered payload", tampered, "bad signature"),
    ];
    for (name, token, reason) in cases {
        let e = with_jwt(&app, &token, None).list(DOMAIN).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert!(e.message().contains(reason), "{name}: {}", e.message());
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.is_empty() || !e.message().contains(signature), "{name}: the token is echoed");
        assert!(!logs::captured().contains(&token), "{name}: the token reached the logs");
        // Operators see refusals: the reason is logged, never the token.
        assert!(
            logs::captured().lines().any(|l| l.contains("token refused") && l.contains(reason)),
            "{name}: no log line says the token was refused"
        );
        // And the call's span carries why.
        assert!(
            logs::captured()
                .lines()
                .any(|l| l.contains("grpc.server{") && l.contains("auth.refused=") && l.contains(reason)),
            "{name}: the span does not say why the token was refused"
        );
    }
    // And the good one passes.
    with_jwt(&app, &key.sign(&good), None).list(DOMAIN).await.expect("a valid token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_are_fetched_once_within_the_bound_and_cached_keys_outlive_a_provider_outage() {
    let k1 = SigningKey::generate("k1");
    let keycloak = FakeOidc::start(&[&k1]).await;
    let app = spawn_with_max_age(&keycloak, None, 1_500).await;
    app.setup_domain(DOMAIN).await;
    own_by_jwt(&app, OWNER).await;
    let claims = user_claims(&keycloak, OWNER, &[]);
    with_jwt(&app, &k1.sign(&claims), None).list(DOMAIN).await.expect("k1");
    assert_eq!(keycloak.fetches(), 1, "keys are fetched on first use, then cached");
    for _ in 0..5 {
        with_jwt(&app, &k1.sign(&claims), None).list(DOMAIN).await.expect("k1 again");
    }
    assert_eq!(keycloak.fetches(), 1, "known keys need no fetch");

    // A flood of unknown key ids costs at most one fetch per bound (400 ms):
    // counted against the time the flood took (a busy machine stretches it).
    let junk: Vec<String> = (0..30).map(|i| SigningKey::generate(&format!("junk-{i}")).sign(&claims)).collect();
    let before = keycloak.fetches();
    let started = std::time::Instant::now();
    for token in &junk {
        let e = with_jwt(&app, token, None).list(DOMAIN).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let bounds = started.elapsed().as_millis() / 400 + 1;
    let fetched = keycloak.fetches() - before;
    assert!(fetched as u128 <= bounds, "30 unknown kids fetched the key set {fetched} times in {bounds} bounds");
    assert!(fetched < 30, "every unknown kid fetched the key set");

    // The provider rotates to k2: accepted once the bound has passed.
    let k2 = SigningKey::generate("k2");
    keycloak.publish(&[&k1, &k2]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    with_jwt(&app, &k2.sign(&claims), None).list(DOMAIN).await.expect("the new key after a refresh");

    // The provider goes down: known keys keep working past their maximum
    // age (each use tries a refresh, bounded, and keeps them), new ones
    // cannot be learned.
    keycloak.set_down(true);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    with_jwt(&app, &k1.sign(&claims), None).list(DOMAIN).await.expect("k1 during the outage");
    with_jwt(&app, &k2.sign(&claims), None).list(DOMAIN).await.expect("k2 during the outage");
    let k3 = SigningKey::generate("k3");
    let e = with_jwt(&app, &k3.sign(&claims), None).list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("unknown signing key"), "{}", e.message());
    assert!(logs::captured().contains("cannot refresh the signing keys; keeping the cached ones"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_platform_services_with_least_privilege() {
    let user_key = SigningKey::generate("u1");
    let keycloak = FakeOidc::start(&[&user_key]).await;
    let cluster_key = SigningKey::generate("sa1");
    let cluster = FakeOidc::start(&[&cluster_key]).await;
    let app = spawn(&keycloak, Some(&cluster)).await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "api-key", "k-value").await.expect("create");
    let sa_token = cluster_key.sign(&cluster.claims(AUDIENCE, SERVICE_ACCOUNT));

    // Resolves for a user, and receives the value: it is a platform service.
    let compute = with_jwt(&app, &sa_token, Some(&format!("user:{OWNER}")));
    let resolved = compute
        .resolve(DOMAIN, vec![text_item("key", "${secrets.api-key}")])
        .await
        .expect("a service account resolves for a user");
    assert!(matches!(&resolved[0].result, Some(pb::resolved_item::Result::Text(t)) if t == "k-value"));

    // Only what its defaults allow: no management, no acting for an admin.
    let e = compute.create(DOMAIN, "x", "y").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(SERVICE_ACCOUNT) && e.message().contains("may not call"), "{}", e.message());
    let as_admin = with_jwt(&app, &sa_token, Some(&format!("user:{ADMIN}")));
    let e = as_admin.resolve(DOMAIN, vec![text_item("key", "${secrets.api-key}")]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("a platform admin"), "{}", e.message());
    let e = with_jwt(&app, &sa_token, Some("service:spark")).list(DOMAIN).await.unwrap_err();
    assert!(e.message().contains("may not act for service:spark"), "{}", e.message());

    // A service account the gateway does not list, and a user token from the
    // cluster issuer, are refused.
    let stranger = cluster_key.sign(&cluster.claims(AUDIENCE, "system:serviceaccount:default:default"));
    let e = with_jwt(&app, &stranger, None).list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("not a platform service here"), "{}", e.message());
    let not_sa = cluster_key.sign(&cluster.claims(AUDIENCE, "alice"));
    let e = with_jwt(&app, &not_sa, None).list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("is not a service account"), "{}", e.message());
    // The calling identity is in the logs beside the acting principal.
    assert!(logs::captured().contains(SERVICE_ACCOUNT), "the calling service account is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_provider_user_becomes_a_principal_a_static_token_or_a_configured_admin_holds() {
    let key = SigningKey::generate("k1");
    let keycloak = FakeOidc::start(&[&key]).await;
    let partner_key = SigningKey::generate("p1");
    let partner = FakeOidc::start(&[&partner_key]).await;
    let mut shared = issuer(&partner, "partner", IssuerKind::Users);
    shared.shared_namespace = true;
    shared.user_claim = "preferred_username".into();
    shared.group_map.clear();
    let app = TestApp::spawn_with(Options {
        jwt_issuers: vec![issuer(&keycloak, "keycloak", IssuerKind::Users), shared],
        ..Default::default()
    })
    .await;
    app.setup_domain(DOMAIN).await;
    let admin = app.as_user(ADMIN);
    let mut admin_authz = admin.authz.clone();
    admin_authz
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: DOMAIN.into(),
            subject: "group:data-eng".into(),
            role: pb::DomainRole::Owner as i32,
        })
        .await
        .unwrap();
    // user:pat is a platform admin; below, a shared-namespace provider user
    // named pat is that principal but may not act as an admin.
    admin_authz.grant_platform_admin(pb::GrantPlatformAdminRequest { subject: "user:pat".into() }).await.unwrap();

    // Whatever name and groups a provider user is given, it is
    // user:keycloak/<sub> in group:keycloak/<path>: never the configured
    // admin, never in the internal groups of the same name.
    let mut claims = keycloak.claims(AUDIENCE, ADMIN);
    claims["preferred_username"] = json!(ADMIN);
    claims["groups"] = json!(["/platform-admins", "data-eng", "/data-eng"]);
    let fake_admin = with_jwt(&app, &key.sign(&claims), None);
    let e = fake_admin.authz.clone().list_platform_admins(pb::ListPlatformAdminsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = fake_admin
        .authz
        .clone()
        .grant_platform_admin(pb::GrantPlatformAdminRequest { subject: "user:mallory".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("user:keycloak/admin"), "{}", e.message());
    assert_eq!(fake_admin.list(DOMAIN).await.unwrap_err().code(), Code::PermissionDenied, "not in group:data-eng");
    // An explicit mapping makes a provider group an internal one.
    claims["groups"] = json!(["/finance-readers"]);
    let mapped = with_jwt(&app, &key.sign(&claims), None);
    mapped.list(DOMAIN).await.expect("group:data-eng through group_map");

    // An issuer sharing the plain namespace: its users are user:NAME, but
    // never the principal of a static token, and never a platform admin.
    for name in [ADMIN, OWNER, SPARK] {
        let mut c = partner.claims(AUDIENCE, &format!("uuid-{name}"));
        c["preferred_username"] = json!(name);
        let e = with_jwt(&app, &partner_key.sign(&c), None).list(DOMAIN).await.unwrap_err();
        if name == SPARK {
            // spark is a service token's subject, not a user's: user:spark is free.
            assert_eq!(e.code(), Code::PermissionDenied, "{name}: {e:?}");
            continue;
        }
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert!(e.message().contains(&format!("user:{name} is the principal of a static token")), "{}", e.message());
    }
    let mut c = partner.claims(AUDIENCE, "uuid-pat");
    c["preferred_username"] = json!("pat");
    let pat = with_jwt(&app, &partner_key.sign(&c), None);
    let e = pat.authz.clone().list_platform_admins(pb::ListPlatformAdminsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("shares the plain namespace"), "{}", e.message());
    let mut c = partner.claims(AUDIENCE, "uuid-lee");
    c["preferred_username"] = json!("lee");
    c["groups"] = json!(["data-eng"]);
    let lee = with_jwt(&app, &partner_key.sign(&c), None);
    lee.list(DOMAIN).await.expect("a shared-namespace group is the internal group");
    // But no plain name may reach into another issuer's namespace.
    let mut c = partner.claims(AUDIENCE, "uuid-sneaky");
    c["preferred_username"] = json!("keycloak/uuid-admin");
    let e = with_jwt(&app, &partner_key.sign(&c), None).list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("another issuer's users"), "{}", e.message());
    let mut c = partner.claims(AUDIENCE, "uuid-lee");
    c["preferred_username"] = json!("lee");
    c["groups"] = json!(["keycloak/data-eng"]);
    admin_authz
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: DOMAIN.into(),
            subject: "group:keycloak/data-eng".into(),
            role: pb::DomainRole::Owner as i32,
        })
        .await
        .unwrap();
    let e = with_jwt(&app, &partner_key.sign(&c), None).list(DOMAIN).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "not in keycloak's group: {e:?}");

    // Configured identities may not use the providers' separator.
    let bad = gateway::auth::Authenticator::new(&[gateway::auth::TokenConfig {
        name: "t".into(),
        kind: gateway::auth::TokenKind::User,
        subject: "keycloak/admin".into(),
        sha256: "00".repeat(32),
        allow: None,
        act_for: None,
        act_for_admins: false,
    }]);
    let e = bad.err().expect("a static subject with '/' is refused");
    assert!(e.description.contains("reserved for the namespaces"), "{}", e.description);
}
