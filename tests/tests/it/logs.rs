//! Log options of a real binary: human lines by default, the level from
//! configuration, RUST_LOG over it.

use std::collections::BTreeMap;

use integration_tests::procs::{Service, free_port};
use secrets_common::auth::generate_token;

async fn run_gateway(extra: &[(&str, &str)]) -> String {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let audit = format!("sqlite://{}?mode=rwc", dir.path().join("audit.db").display());
    let mut env: BTreeMap<String, String> = [
        ("GATEWAY_AUDIT__DATABASE_URL".to_string(), audit),
        ("GATEWAY_SERVER__LISTEN_ADDR".to_string(), format!("127.0.0.1:{port}")),
        ("GATEWAY_SERVER__METRICS_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ("GATEWAY_INTERNAL_TOKEN".to_string(), generate_token()),
    ]
    .into();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let gateway = Service::start("gateway", &env);
    let mut up = false;
    for _ in 0..100 {
        if secrets_common::server::probe(([127, 0, 0, 1], port).into()).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "gateway did not start");
    gateway.stop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_human_by_default_and_follow_the_configured_level_unless_rust_log_says_otherwise() {
    let human = run_gateway(&[]).await;
    let line = human.lines().find(|l| l.contains("gateway listening")).expect("an info line at the default level");
    assert!(line.contains("INFO") && !line.trim_start().starts_with('{'), "human format: {line}");

    let quiet = run_gateway(&[("GATEWAY_TELEMETRY__LOG_LEVEL", "error")]).await;
    assert!(!quiet.contains("gateway listening"), "log_level=error hides info lines: {quiet}");

    let overridden = run_gateway(&[("GATEWAY_TELEMETRY__LOG_LEVEL", "error"), ("RUST_LOG", "info")]).await;
    assert!(overridden.contains("gateway listening"), "RUST_LOG wins: {overridden}");

    let json = run_gateway(&[("GATEWAY_TELEMETRY__LOG_FORMAT", "json")]).await;
    let line = json.lines().find(|l| l.contains("gateway listening")).expect("json line");
    let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["message"], "gateway listening");
}
