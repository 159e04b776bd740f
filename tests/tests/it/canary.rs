//! Canary values planted through every path that carries a value, then
//! searched for everywhere they must never be: logs (at trace level, span
//! fields included), error messages, the database file and the embedded
//! store's files.

use integration_tests::{logs, *};
use secrets_proto::v1::{self as pb, secret_value::Kind};

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn planted_values_never_reach_logs_errors_or_files_in_clear() {
    planted_values_never_leak(TestApp::spawn().await, true).await
}

/// The same with the secret-service on the Kubernetes backend (the
/// in-test API server): kube-rs and its HTTP stack log at trace level too.
#[tokio::test]
async fn planted_values_never_leak_on_the_kubernetes_backend() {
    let kube = integration_tests::stores::Fixture::kubernetes().await;
    let app = TestApp::spawn_with(Options { backend: Some(kube.backend.clone()), ..Default::default() }).await;
    planted_values_never_leak(app, false).await
}

async fn planted_values_never_leak(app: TestApp, embedded: bool) {
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let canary = |what: &str| format!("canary-{what}-{id}");
    let mut planted = Vec::new();
    let mut errors = Vec::new();

    // Created as text and as bytes, in every scope.
    for (scope, domain, what) in
        [(pb::Scope::Domain, "finance", "domain"), (pb::Scope::Global, "", "global"), (pb::Scope::Admin, "", "admin")]
    {
        admin.create_in(scope, domain, what, &canary(what)).await.unwrap();
        planted.push(canary(what));
    }
    let binary = canary("binary");
    admin
        .secrets
        .clone()
        .create_secret(pb::CreateSecretRequest {
            scope: pb::Scope::Domain as i32,
            domain: "finance".into(),
            key: "binary".into(),
            value: Some(pb::SecretValue { kind: Some(Kind::Binary(binary.clone().into_bytes())) }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    planted.push(binary);
    // Updated.
    let updated = canary("updated");
    admin
        .secrets
        .clone()
        .update_secret(pb::UpdateSecretRequest {
            scope: pb::Scope::Domain as i32,
            domain: "finance".into(),
            key: "domain".into(),
            value: Some(text_value(&updated)),
            request_id: String::new(),
        })
        .await
        .unwrap();
    planted.push(updated);

    // Refused writes that carried a value.
    let refused = canary("refused");
    planted.push(refused.clone());
    errors.push(admin.create("finance", "binary", &refused).await.unwrap_err());
    errors.push(admin.update("finance", "missing", &refused).await.unwrap_err());
    errors.push(app.as_user(LISTER).create("finance", "x", &refused).await.unwrap_err());
    errors.push(app.as_user(STRANGER).update("finance", "domain", &refused).await.unwrap_err());
    errors.push(admin.create("Bad Domain", "x", &refused).await.unwrap_err());
    errors.push(admin.create("finance", "bad key", &refused).await.unwrap_err());
    let mut oversized = refused.clone().into_bytes();
    oversized.resize(1024 * 1024 + 1, b'#');
    errors.push(
        admin
            .secrets
            .clone()
            .create_secret(pb::CreateSecretRequest {
                scope: pb::Scope::Domain as i32,
                domain: "finance".into(),
                key: "huge".into(),
                value: Some(pb::SecretValue { kind: Some(Kind::Binary(oversized)) }),
                request_id: String::new(),
            })
            .await
            .unwrap_err(),
    );

    // Resolved: the values do come back to the service, and go nowhere else.
    let out = app
        .as_service(Some("user:admin"))
        .resolve(
            "finance",
            vec![
                text_item("t", "${secrets.domain}:${secrets.global}:${secrets.missing}"),
                text_item("u", "${secrets.domain}:${secrets.global}"),
                object_item("o", "finance", "binary"),
                pb::ResolveItem {
                    id: "a".into(),
                    reference: Some(pb::resolve_item::Reference::AdminKey("admin".into())),
                },
            ],
        )
        .await
        .unwrap();
    // Saved as a workload: the usage index (in authz.db, checked below)
    // holds the references, and the answer no value.
    let payload = pb::WorkloadPayload {
        kind: Some(pb::workload_payload::Kind::Compute(pb::ComputePayload {
            env_vars: [(
                "T".to_string(),
                pb::ConfigValue { value: Some(pb::config_value::Value::Text("${secrets.domain}".into())) },
            )]
            .into(),
            ..Default::default()
        })),
    };
    let saved = app
        .as_service(Some("user:admin"))
        .gateway
        .clone()
        .save_workload(pb::SaveWorkloadRequest {
            domain: "finance".into(),
            id: "canary".into(),
            payload: Some(payload),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(saved.saved, "{saved:?}");
    // Resolved as a whole workload: the payload carries the values back to
    // the service (and nowhere else); a failing field's error carries none.
    let workload = pb::WorkloadPayload {
        kind: Some(pb::workload_payload::Kind::SparkJob(pb::SparkJobPayload {
            template: Some(pb::EnvAndConf {
                env_vars: [
                    (
                        "T".to_string(),
                        pb::ConfigValue {
                            value: Some(pb::config_value::Value::Text("${secrets.domain}:${secrets.global}".into())),
                        },
                    ),
                    (
                        "M".to_string(),
                        pb::ConfigValue {
                            value: Some(pb::config_value::Value::Text("${secrets.domain}${secrets.missing}".into())),
                        },
                    ),
                ]
                .into(),
                spark_conf: [(
                    "spark.key".to_string(),
                    pb::ConfigValue {
                        value: Some(pb::config_value::Value::SecretObject(pb::SecretObject {
                            key: "binary".into(),
                            source: Some(pb::SecretSource {
                                r#type: pb::SourceType::Kubernetes as i32,
                                id: "finance".into(),
                            }),
                        })),
                    },
                )]
                .into(),
            }),
        })),
    };
    let resolved_workload = app
        .as_service(Some("user:admin"))
        .gateway
        .clone()
        .resolve_workload(pb::ResolveWorkloadRequest { domain: "finance".into(), payload: Some(workload) })
        .await
        .unwrap()
        .into_inner();
    let carried = prost::Message::encode_to_vec(&resolved_workload);
    assert!(contains(&carried, &canary("updated")) && contains(&carried, &canary("binary")), "the values came back");
    assert_eq!(resolved_workload.errors.len(), 1, "{:?}", resolved_workload.errors);
    let workload_debug = format!("{resolved_workload:?}");
    assert!(
        !planted.iter().any(|c| workload_debug.contains(c)),
        "Debug of a resolved workload leaks: {workload_debug}"
    );
    for e in &resolved_workload.errors {
        let message = e.error.as_ref().map(|s| s.message.clone()).unwrap_or_default();
        assert!(!planted.iter().any(|c| message.contains(c)), "field error leaks: {message}");
    }
    tracing::info!(response = ?resolved_workload, "the canary test logs a resolved workload with Debug");
    // What a log line with `?request` would print of each message that
    // carries a value in: text and bytes, on create and update.
    let debug_text = canary("debug-text");
    let debug_binary = canary("debug-binary");
    let carriers = [
        format!(
            "{:?}",
            pb::CreateSecretRequest {
                scope: pb::Scope::Domain as i32,
                domain: "finance".into(),
                key: "k".into(),
                value: Some(text_value(&debug_text)),
                request_id: String::new(),
            }
        ),
        format!(
            "{:?}",
            pb::UpdateSecretRequest {
                scope: pb::Scope::Domain as i32,
                domain: "finance".into(),
                key: "k".into(),
                value: Some(pb::SecretValue { kind: Some(Kind::Binary(debug_binary.clone().into_bytes())) }),
                request_id: String::new(),
            }
        ),
    ];
    let numbers = format!("{:?}", debug_binary.as_bytes());
    let binary_as_numbers = numbers.trim_start_matches('[').trim_end_matches(']');
    for printed in carriers {
        for leak in [debug_text.as_str(), debug_binary.as_str(), binary_as_numbers] {
            assert!(!printed.contains(leak), "Debug leaks a value: {printed}");
        }
    }
    assert!(!planted.iter().any(|c| format!("{saved:?}").contains(c)), "a save answers no value");
    let resolved_text = format!("{out:?}");
    assert!(matches!(&out[1].result, Some(pb::resolved_item::Result::Text(t)) if t.contains(&canary("updated"))));
    for item in &out {
        if let Some(pb::resolved_item::Result::Error(e)) = &item.result {
            assert!(!planted.iter().any(|c| e.message.contains(c)), "item error leaks: {}", e.message);
        }
    }

    for e in &errors {
        for c in &planted {
            assert!(!e.message().contains(c), "error message leaks {c}: {}", e.message());
            assert!(!contains(e.details(), c), "error details leak {c}");
        }
    }
    assert!(!planted.iter().any(|c| resolved_text.contains(c)), "Debug of resolved items leaks: {resolved_text}");

    let logs = logs::captured();
    assert!(logs.contains("secret created"), "logs were captured");
    for c in &planted {
        assert!(!logs.contains(c.as_str()), "logs leak {c}");
    }
    for token in USERS.iter().map(|u| app.token(u)).chain([app.token(SPARK)]) {
        assert!(!logs.contains(token), "logs leak a bearer token");
    }

    let files = app.written_files();
    assert!(files.iter().any(|p| p.ends_with("authz.db")), "{files:?}");
    assert_eq!(files.iter().any(|p| p.extension().is_some_and(|e| e == "enc")), embedded, "{files:?}");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        for c in &planted {
            assert!(!contains(&bytes, c), "{} holds {c} in clear", path.display());
        }
    }
}
