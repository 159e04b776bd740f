//! The internal APIs and the internal credential: the secret service's
//! reader answers only the gateway, the gateway neither routes nor reflects
//! it, and a credential mismatch between hops is reported as the operator's
//! problem, never as the caller's.

use integration_tests::*;
use secrecy::ExposeSecret;
use secrets_proto::internal::v1::{self as internal, secret_reader_client::SecretReaderClient};
use tonic::{Code, Request};

fn read_request() -> internal::ReadSecretsRequest {
    internal::ReadSecretsRequest {
        lookups: vec![internal::SecretLookup {
            scope: secrets_proto::v1::Scope::Domain as i32,
            domain: "finance".into(),
            key: "db_password".into(),
            global_fallback: false,
        }],
        max_value_bytes: 0,
        presence_only: false,
    }
}

fn with_bearer(token: &str) -> Request<internal::ReadSecretsRequest> {
    let mut request = Request::new(read_request());
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn the_secret_reader_answers_only_the_internal_credential() {
    let app = TestApp::spawn().await;
    app.as_user(ADMIN).create("finance", "db_password", "reader-canary").await.unwrap();
    let mut reader = SecretReaderClient::new(channel(&app.secret_service_url));

    let missing = reader.read_secrets(read_request()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("missing internal credential"), "{}", missing.message());

    let wrong = reader.read_secrets(with_bearer(app.token(SPARK))).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "a gateway token is no internal credential: {wrong:?}");

    let found = reader
        .read_secrets(with_bearer(app.internal_token.expose_secret()))
        .await
        .expect("the internal credential is accepted")
        .into_inner();
    assert_eq!(found.results[0].value, b"reader-canary");
}

#[tokio::test]
async fn the_gateway_neither_routes_nor_reflects_the_secret_reader() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = TestApp::spawn().await;
    app.as_user(ADMIN).create("finance", "db_password", "v").await.unwrap();
    let mut reader = SecretReaderClient::new(channel(&app.gateway_url));
    let err = reader.read_secrets(with_bearer(app.token(SPARK))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    let ask = |url: String| async move {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "iomete.secrets.internal.v1.SecretReader".into(),
            )),
        };
        let mut client = ServerReflectionClient::new(channel(&url));
        let mut answers = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
        answers.message().await.map(|m| m.and_then(|m| m.message_response))
    };
    match ask(app.gateway_url.clone()).await {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        Ok(Some(MessageResponse::ErrorResponse(e))) => assert_eq!(e.error_code, Code::NotFound as i32),
        Ok(other) => panic!("the gateway describes the internal reader: {other:?}"),
    }
    // The secret service itself does describe it, for operators on the inside.
    assert!(matches!(ask(app.secret_service_url.clone()).await, Ok(Some(MessageResponse::FileDescriptorResponse(_)))));
}

#[tokio::test]
async fn a_gateway_with_the_wrong_internal_token_is_unavailable_naming_the_hop_never_unauthenticated() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let token = secrets_common::auth::generate_token();
    let config = gateway::Config {
        internal_token: Some(secrecy::SecretString::from("not-the-internal-token".to_string())),
        server: secrets_common::server::ServerConfig {
            metrics_addr: None,
            ..secrets_common::server::ServerConfig::local(0, 0)
        },
        secret_service_url: app.secret_service_url.clone(),
        authz_service_url: app.authz_service_url.clone(),
        tokens: vec![gateway::TokenConfig {
            name: "ops".into(),
            kind: gateway::TokenKind::Service,
            subject: "ops".into(),
            sha256: secrets_common::auth::TokenHash::of(&token).to_hex(),
            allow: Some(vec![gateway::RpcGroup::Resolve, gateway::RpcGroup::ManageSecrets]),
            act_for: None,
            act_for_admins: true,
        }],
        audit: integration_tests::audit_in(app.dir.path()),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let gw = gateway::Application::build_with_listener(config, listener).await.unwrap();
    let _task = tokio::spawn(gw.run_until_stopped(std::future::pending()));
    let clients = Clients::new(&url, Some(&token), Some("user:admin"));

    let err = clients.list("finance").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with("secret-service refused this service's internal credential"),
        "{}",
        err.message()
    );
    let err = clients.resolve("finance", vec![text_item("x", "${secrets.k}")]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("authz-service refused this service's internal credential"), "{}", err.message());
}

/// The usage index decides what may be deleted: nobody without the
/// internal credential may record or forget a workload in it, and the
/// gateway does not route it.
#[tokio::test]
async fn the_usage_index_answers_only_the_internal_credential() {
    use secrets_proto::internal::v1::usage_index_client::UsageIndexClient;
    let app = TestApp::spawn().await;
    let forget = || internal::ForgetWorkloadRequest {
        domain: "finance".into(),
        kind: secrets_proto::v1::WorkloadKind::SparkJob as i32,
        id: "etl".into(),
        ..Default::default()
    };
    let mut index = UsageIndexClient::new(channel(&app.authz_service_url));
    let missing = index.forget_workload(forget()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let mut request = Request::new(forget());
    request.metadata_mut().insert("authorization", format!("Bearer {}", app.token(SPARK)).parse().unwrap());
    assert_eq!(index.forget_workload(request).await.unwrap_err().code(), Code::Unauthenticated);
    let mut request = Request::new(forget());
    let bearer = format!("Bearer {}", app.internal_token.expose_secret());
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    assert!(!index.forget_workload(request).await.unwrap().into_inner().removed);

    let mut through_gateway = UsageIndexClient::new(channel(&app.gateway_url));
    let mut request = Request::new(forget());
    request.metadata_mut().insert("authorization", format!("Bearer {}", app.token(SPARK)).parse().unwrap());
    assert_eq!(through_gateway.forget_workload(request).await.unwrap_err().code(), Code::Unimplemented);
}
