//! Every service serves Prometheus metrics; the counters move with the calls
//! made, by method and status code, and carry no value or token.

use integration_tests::*;

const CREATE_OK: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.v1.SecretService",rpc_method="CreateSecret",grpc_code="OK"}"#;
const CREATE_EXISTS: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.v1.SecretService",rpc_method="CreateSecret",grpc_code="ALREADY_EXISTS"}"#;
const LIST_DENIED: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.v1.SecretService",rpc_method="ListSecrets",grpc_code="PERMISSION_DENIED"}"#;
const RESOLVE_OK: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.v1.Gateway",rpc_method="ResolveSecrets",grpc_code="OK"}"#;
const READ_OK: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.internal.v1.SecretReader",rpc_method="ReadSecrets",grpc_code="OK"}"#;
const TO_SECRET_SERVICE: &str = r#"secrets_backend_calls_total{backend="secret-service",operation="CreateSecret"}"#;
const TO_AUTHZ: &str = r#"secrets_backend_calls_total{backend="authz-service",operation="BatchCheck"}"#;
const EMBEDDED_MODIFY: &str = r#"secrets_backend_calls_total{backend="embedded",operation="modify"}"#;
const EMBEDDED_READ: &str = r#"secrets_backend_calls_total{backend="embedded",operation="read"}"#;
const SQLITE_SELECT: &str = r#"secrets_backend_calls_total{backend="sqlite",operation="select"}"#;

async fn scrape(app: &TestApp) -> [String; 3] {
    let mut out = [String::new(), String::new(), String::new()];
    for (i, service) in ["gateway", "secret-service", "authz-service"].iter().enumerate() {
        let (status, body) = http_get(&app.metrics_url(service)).await;
        assert_eq!(status, 200, "{service}");
        out[i] = body;
    }
    out
}

#[tokio::test]
async fn request_and_backend_counters_move_with_the_calls_made() {
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let canary = format!("canary-metrics-{}", uuid::Uuid::new_v4().simple());
    let [gw0, ss0, az0] = scrape(&app).await;

    let admin = app.as_user(ADMIN);
    admin.create("finance", "k", &canary).await.unwrap();
    admin.create("finance", "k", &canary).await.unwrap_err();
    app.as_user(MEMBER).list("finance").await.unwrap_err();
    app.as_service(Some("user:nina")).resolve("finance", vec![text_item("x", "${secrets.k}")]).await.unwrap();

    let [gw1, ss1, az1] = scrape(&app).await;
    let moved = |before: &str, after: &str, series: &str| sample(after, series) - sample(before, series);
    // The gateway serves and forwards.
    assert_eq!(moved(&gw0, &gw1, CREATE_OK), 1.0, "{gw1}");
    assert_eq!(moved(&gw0, &gw1, CREATE_EXISTS), 1.0);
    assert_eq!(moved(&gw0, &gw1, LIST_DENIED), 1.0);
    assert_eq!(moved(&gw0, &gw1, RESOLVE_OK), 1.0);
    assert_eq!(moved(&gw0, &gw1, TO_SECRET_SERVICE), 2.0);
    assert_eq!(moved(&gw0, &gw1, TO_AUTHZ), 1.0, "one BatchCheck per resolve");
    // The secret service answers and uses its backend.
    assert_eq!(moved(&ss0, &ss1, CREATE_OK), 1.0, "{ss1}");
    assert_eq!(moved(&ss0, &ss1, CREATE_EXISTS), 1.0);
    assert_eq!(moved(&ss0, &ss1, READ_OK), 1.0);
    assert!(moved(&ss0, &ss1, EMBEDDED_MODIFY) >= 2.0, "{ss1}");
    assert!(moved(&ss0, &ss1, EMBEDDED_READ) >= 1.0);
    // The authz service reads its database.
    assert!(moved(&az0, &az1, SQLITE_SELECT) >= 3.0, "{az1}");
    assert!(az1.contains("secrets_grpc_server_request_duration_seconds_bucket"), "latency histograms: {az1}");

    for text in [&gw1, &ss1, &az1] {
        assert!(!text.contains(&canary), "a value reached a metric");
        assert!(!text.contains("\"k\""), "secret keys are not labels");
        for user in USERS {
            assert!(!text.contains(app.token(user)), "a token reached a metric");
        }
    }
}

#[tokio::test]
async fn health_checks_and_reflection_are_not_counted_and_other_paths_are_404() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(channel(&app.gateway_url));
    health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    let (_, body) = http_get(&app.metrics_url("gateway")).await;
    assert!(!body.contains("grpc.health.v1"), "{body}");
    let url = app.metrics_url("gateway").replace("/metrics", "/other");
    assert_eq!(http_get(&url).await.0, 404);
}

#[tokio::test]
async fn a_thousand_random_paths_are_counted_under_one_unknown_series() {
    let app = TestApp::spawn().await;
    let mut grpc = tonic::client::Grpc::new(channel(&app.gateway_url));
    for i in 0..1000 {
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::try_from(format!("/probe{i}.Service{i}/Method{i}")).unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let err = grpc.unary(tonic::Request::new(()), path, codec).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }
    let (_, text) = http_get(&app.metrics_url("gateway")).await;
    let series = text.lines().filter(|l| l.starts_with("secrets_grpc_server_requests_total{")).count();
    assert!(series < 5, "random paths created series:\n{text}");
    assert_eq!(
        sample(
            &text,
            r#"secrets_grpc_server_requests_total{rpc_service="unknown",rpc_method="unknown",grpc_code="UNIMPLEMENTED"}"#
        ),
        1000.0
    );
    assert!(!text.contains("probe1"), "{text}");
}
