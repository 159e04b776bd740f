//! Managing secrets through the gateway, as an operator with grpcurl would.

use integration_tests::*;
use secrets_proto::v1::{self as pb, SourceType};
use tonic::Code;

#[tokio::test]
async fn a_domain_secret_is_created_listed_updated_and_deleted_through_the_gateway() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);

    let created = admin.create("finance", "db_password", "pw-1").await.unwrap();
    assert_eq!(created.key, "db_password");
    assert_eq!(created.domain, "finance");
    let source = created.source.unwrap();
    assert_eq!((source.r#type(), source.id.as_str()), (SourceType::Kubernetes, "finance"));
    assert!(created.created_at.is_some() && created.updated_at.is_some());

    assert_eq!(admin.list("finance").await.unwrap(), ["db_password"]);
    let updated = admin.update("finance", "db_password", "pw-2").await.unwrap();
    assert_eq!(updated.created_at, created.created_at);
    assert_ne!(updated.updated_at, created.updated_at);

    let resolved = app
        .as_service(Some("user:admin"))
        .resolve("finance", vec![object_item("x", "finance", "db_password")])
        .await
        .unwrap();
    assert_eq!(resolved[0].result, Some(pb::resolved_item::Result::Value(b"pw-2".to_vec())));

    admin.delete("finance", "db_password").await.unwrap();
    assert!(admin.list("finance").await.unwrap().is_empty());
    let err = admin.delete("finance", "db_password").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"db_password\"") && err.message().contains("\"finance\""), "{}", err.message());
}

#[tokio::test]
async fn creating_a_key_twice_is_already_exists() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "k", "v").await.unwrap();
    let err = admin.create("finance", "k", "v2").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("UpdateSecret"), "{}", err.message());
}

#[tokio::test]
async fn list_responses_carry_keys_and_timestamps_never_values() {
    let app = TestApp::spawn().await;
    let admin = app.as_user(ADMIN);
    admin.create("finance", "k", "value-in-list-canary").await.unwrap();
    let response = admin
        .secrets
        .clone()
        .list_secrets(pb::ListSecretsRequest { scope: pb::Scope::Domain as i32, domain: "finance".into() })
        .await
        .unwrap()
        .into_inner();
    let encoded = prost::Message::encode_to_vec(&response);
    assert!(!encoded.windows(20).any(|w| w == b"value-in-list-canary"));
    assert_eq!(response.secrets.len(), 1);
}

#[tokio::test]
async fn global_secrets_are_listed_from_a_domain_with_that_domain_as_source() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    app.as_user(ADMIN).create_in(pb::Scope::Global, "", "smtp_password", "g").await.unwrap();
    let response = app
        .as_user(LISTER)
        .secrets
        .clone()
        .list_secrets(pb::ListSecretsRequest { scope: pb::Scope::Global as i32, domain: "finance".into() })
        .await
        .unwrap()
        .into_inner();
    let s = &response.secrets[0];
    assert_eq!((s.key.as_str(), s.scope()), ("smtp_password", pb::Scope::Global));
    assert_eq!(s.source.as_ref().unwrap().id, "finance", "usable as a secret object from this domain");
}

#[tokio::test]
async fn the_internal_services_refuse_calls_that_do_not_come_from_the_gateway() {
    let app = TestApp::spawn().await;
    // A valid user token is not the internal credential.
    let direct = Clients::new(&app.secret_service_url, Some(app.token(ADMIN)), None);
    let err = direct.list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("only from the gateway"), "{}", err.message());
    let direct = Clients::new(&app.authz_service_url, Some(app.token(ADMIN)), None);
    let err = direct.authz.clone().list_platform_admins(pb::ListPlatformAdminsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("only from the gateway"), "{}", err.message());
    let anonymous = Clients::new(&app.authz_service_url, None, None);
    let err = anonymous.authz.clone().list_platform_admins(pb::ListPlatformAdminsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn every_service_reports_health() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let app = TestApp::spawn().await;
    for (url, service) in [
        (&app.gateway_url, "iomete.secrets.v1.Gateway"),
        (&app.gateway_url, "iomete.secrets.v1.SecretService"),
        (&app.gateway_url, ""),
        (&app.secret_service_url, "iomete.secrets.v1.SecretService"),
        (&app.secret_service_url, "iomete.secrets.internal.v1.SecretReader"),
        (&app.authz_service_url, "iomete.secrets.v1.AuthzService"),
    ] {
        let mut health = HealthClient::new(channel(url));
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{url} {service}");
    }
}
