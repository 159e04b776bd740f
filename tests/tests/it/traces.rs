//! One resolve is one trace: the four services run as their real binaries,
//! each exporting over OTLP to a receiver in this test, and the span tree
//! they send is checked hop by hop. The caller's traceparent is continued,
//! and no value or token appears in any span or log line.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use integration_tests::procs::{Service, free_port};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::{Span, span::SpanKind},
};
use secrets_common::auth::{TokenHash, generate_token};
use secrets_proto::v1::{
    self as pb, authz_service_client::AuthzServiceClient, gateway_client::GatewayClient,
    secret_service_client::SecretServiceClient, vault_config_service_client::VaultConfigServiceClient,
};
use tonic::{Request, Response, Status, metadata::MetadataValue};

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// (service.name, service.version) of every resource received.
    resources: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = |key: &str| {
                rs.resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == key)
                    .and_then(|a| a.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        AnyValue::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default()
            };
            let service = resource("service.name");
            self.resources.lock().unwrap().push((service.clone(), resource("service.version")));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn env(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_is_one_trace_across_all_services_continuing_the_callers_trace() {
    // The receiver.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The services, as separate processes.
    let dir = tempfile::tempdir().unwrap();
    let (internal, admin, spark) = (generate_token(), generate_token(), generate_token());
    let (gw, ss, az, vc) = (free_port(), free_port(), free_port(), free_port());
    let bao = integration_tests::openbao::OpenBao::start();
    let vault_canary = format!("canary-vault-trace-{}", uuid::Uuid::new_v4().simple());
    bao.bao(&["kv", "put", "secret/production", &format!("api_key={vault_canary}")]);
    let common = |prefix: &str| {
        vec![
            (format!("{prefix}INTERNAL_TOKEN"), internal.clone()),
            (format!("{prefix}SERVER__METRICS_ADDR"), "127.0.0.1:0".to_string()),
            (format!("{prefix}TELEMETRY__OTLP_ENDPOINT"), otlp.clone()),
            (format!("{prefix}TELEMETRY__LOG_FORMAT"), "json".to_string()),
        ]
    };
    let with = |prefix: &str, extra: &[(&str, String)]| {
        let mut e: BTreeMap<String, String> = common(prefix).into_iter().collect();
        e.extend(env(extra));
        e
    };
    let authz = Service::start(
        "authz-service",
        &with(
            "AUTHZ_SERVICE_",
            &[
                ("AUTHZ_SERVICE_SERVER__LISTEN_ADDR", format!("127.0.0.1:{az}")),
                ("AUTHZ_SERVICE_DATABASE_URL", format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display())),
                ("AUTHZ_SERVICE_BOOTSTRAP_ADMINS", r#"["user:admin"]"#.to_string()),
            ],
        ),
    );
    let secrets = Service::start(
        "secret-service",
        &with(
            "SECRET_SERVICE_",
            &[
                ("SECRET_SERVICE_SERVER__LISTEN_ADDR", format!("127.0.0.1:{ss}")),
                ("SECRET_SERVICE_AUTHZ_URL", format!("http://127.0.0.1:{az}")),
                ("SECRET_SERVICE_EMBEDDED__DATA_DIR", dir.path().join("secrets").display().to_string()),
            ],
        ),
    );
    let vault = Service::start(
        "vault-config-service",
        &with(
            "VAULT_CONFIG_SERVICE_",
            &[
                ("VAULT_CONFIG_SERVICE_SERVER__LISTEN_ADDR", format!("127.0.0.1:{vc}")),
                ("VAULT_CONFIG_SERVICE_AUTHZ_URL", format!("http://127.0.0.1:{az}")),
                (
                    "VAULT_CONFIG_SERVICE_DATABASE_URL",
                    format!("sqlite://{}?mode=rwc", dir.path().join("vault.db").display()),
                ),
                ("VAULT_CONFIG_SERVICE_BACKEND", "embedded".to_string()),
                ("VAULT_CONFIG_SERVICE_EMBEDDED__DATA_DIR", dir.path().join("vault-credentials").display().to_string()),
            ],
        ),
    );
    let tokens = format!(
        r#"[{{name="admin",kind="user",subject="admin",sha256="{}"}},{{name="spark",kind="service",subject="spark",sha256="{}",act_for_admins=true}}]"#,
        TokenHash::of(&admin).to_hex(),
        TokenHash::of(&spark).to_hex()
    );
    let gateway = Service::start(
        "gateway",
        &with(
            "GATEWAY_",
            &[
                ("GATEWAY_SERVER__LISTEN_ADDR", format!("127.0.0.1:{gw}")),
                ("GATEWAY_AUDIT__DATABASE_URL", format!("sqlite://{}?mode=rwc", dir.path().join("audit.db").display())),
                ("GATEWAY_SECRET_SERVICE_URL", format!("http://127.0.0.1:{ss}")),
                ("GATEWAY_AUTHZ_SERVICE_URL", format!("http://127.0.0.1:{az}")),
                ("GATEWAY_VAULT_CONFIG_SERVICE_URL", format!("http://127.0.0.1:{vc}")),
                ("GATEWAY_TOKENS", tokens),
                // A resolve's own line is at debug (its outcome is on its spans).
                ("GATEWAY_TELEMETRY__LOG_LEVEL", "info,gateway=debug".to_string()),
            ],
        ),
    );

    // Wait until the gateway answers (bounded: 100 tries).
    let url = format!("http://127.0.0.1:{gw}");
    let mut ready = false;
    for _ in 0..100 {
        if secrets_common::server::probe(([127, 0, 0, 1], gw).into()).await.is_ok()
            && secrets_common::server::probe(([127, 0, 0, 1], ss).into()).await.is_ok()
            && secrets_common::server::probe(([127, 0, 0, 1], az).into()).await.is_ok()
            && secrets_common::server::probe(([127, 0, 0, 1], vc).into()).await.is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the services did not start");

    let channel = integration_tests::channel(&url);
    let canary = format!("canary-trace-{}", uuid::Uuid::new_v4().simple());
    let mut create = Request::new(pb::CreateSecretRequest {
        scope: pb::Scope::Domain as i32,
        domain: "finance".into(),
        key: "db_password".into(),
        value: Some(integration_tests::text_value(&canary)),
        request_id: String::new(),
    });
    create.metadata_mut().insert("authorization", format!("Bearer {admin}").parse().unwrap());
    SecretServiceClient::new(channel.clone()).create_secret(create).await.unwrap();
    let mut bundle = Request::new(pb::CreateBundleRequest {
        name: "traced".into(),
        description: String::new(),
        owner: "user:admin".into(),
    });
    bundle.metadata_mut().insert("authorization", format!("Bearer {admin}").parse().unwrap());
    AuthzServiceClient::new(channel.clone()).create_bundle(bundle).await.unwrap();
    let mut config = Request::new(pb::CreateVaultConfigRequest {
        domain: "finance".into(),
        bundle: "traced".into(),
        spec: Some(pb::VaultConfigSpec {
            name: "prod".into(),
            host: bao.addr.clone(),
            path: "/v1/secret/data/production".into(),
            credentials: Some(pb::VaultCredentials {
                method: Some(pb::vault_credentials::Method::Token(bao.root_token.clone())),
            }),
            ..Default::default()
        }),
    });
    config.metadata_mut().insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let config_id =
        VaultConfigServiceClient::new(channel.clone()).create_vault_config(config).await.unwrap().into_inner().id;

    // The caller's own trace.
    let trace_hex = format!("{:032x}", rand_u128());
    let caller_span_hex = "00f067aa0ba902b7";
    let mut resolve = Request::new(pb::ResolveSecretsRequest {
        domain: "finance".into(),
        items: vec![
            integration_tests::text_item("envVars.DB", "pw=${secrets.db_password}"),
            integration_tests::object_item("envVars.OBJ", "finance", "db_password"),
            integration_tests::vault_item("envVars.API_KEY", &config_id, "api_key"),
        ],
    });
    let md = resolve.metadata_mut();
    md.insert("authorization", format!("Bearer {spark}").parse().unwrap());
    md.insert("x-on-behalf-of", MetadataValue::from_static("user:admin"));
    md.insert("traceparent", format!("00-{trace_hex}-{caller_span_hex}-01").parse().unwrap());
    let out = GatewayClient::new(channel.clone()).resolve_secrets(resolve).await.unwrap().into_inner();
    assert!(matches!(&out.items[0].result, Some(pb::resolved_item::Result::Text(t)) if t.contains(&canary)));
    assert_eq!(out.items[2].result, Some(pb::resolved_item::Result::Value(vault_canary.clone().into_bytes())));
    // A whole workload too: its spans are searched below like the resolve's.
    let text = |t: &str| pb::ConfigValue { value: Some(pb::config_value::Value::Text(t.into())) };
    let mut workload = Request::new(pb::ResolveWorkloadRequest {
        domain: "finance".into(),
        payload: Some(pb::WorkloadPayload {
            kind: Some(pb::workload_payload::Kind::Compute(pb::ComputePayload {
                env_vars: [("DB".to_string(), text("${secrets.db_password}"))].into(),
                spark_conf: [(
                    "spark.api.key".to_string(),
                    pb::ConfigValue {
                        value: Some(pb::config_value::Value::SecretObject(pb::SecretObject {
                            key: "api_key".into(),
                            source: Some(pb::SecretSource {
                                r#type: pb::SourceType::Vault as i32,
                                id: config_id.clone(),
                            }),
                        })),
                    },
                )]
                .into(),
            })),
        }),
    });
    workload.metadata_mut().insert("authorization", format!("Bearer {spark}").parse().unwrap());
    workload.metadata_mut().insert("x-on-behalf-of", MetadataValue::from_static("user:admin"));
    let resolved = GatewayClient::new(channel).resolve_workload(workload).await.unwrap().into_inner();
    assert!(resolved.errors.is_empty(), "{:?}", resolved.errors);
    let carried = prost::Message::encode_to_vec(&resolved);
    let has = |needle: &str| carried.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(has(&canary) && has(&vault_canary), "the workload's values came back");

    // Stopping flushes every exporter.
    let logs: Vec<(&str, String)> = [gateway, secrets, authz, vault].into_iter().map(|s| (s.name, s.stop())).collect();

    let received = receiver.spans.lock().unwrap().clone();
    for (service, version) in receiver.resources.lock().unwrap().iter() {
        assert_eq!(version, env!("CARGO_PKG_VERSION"), "{service} names its version");
    }
    let trace_id = hex::decode(&trace_hex).unwrap();
    let caller_span = hex::decode(caller_span_hex).unwrap();
    let trace: Vec<&(String, Span)> = received.iter().filter(|(_, s)| s.trace_id == trace_id).collect();
    let by_id: HashMap<&[u8], &(String, Span)> = trace.iter().map(|e| (e.1.span_id.as_slice(), *e)).collect();
    let find = |name: &str, kind: SpanKind| -> Vec<&(String, Span)> {
        trace.iter().copied().filter(|(_, s)| s.name == name && s.kind == kind as i32).collect()
    };
    let one = |name: &str, kind: SpanKind| -> &(String, Span) {
        let found = find(name, kind);
        assert_eq!(
            found.len(),
            1,
            "exactly one {kind:?} span {name} in the trace: {:#?}",
            trace.iter().map(|(svc, s)| (svc, &s.name, s.kind)).collect::<Vec<_>>()
        );
        found[0]
    };

    let gw_server = one("iomete.secrets.v1.Gateway/ResolveSecrets", SpanKind::Server);
    assert_eq!(gw_server.0, "gateway");
    assert_eq!(gw_server.1.parent_span_id, caller_span, "the caller's span is the parent");
    assert_eq!(attr(&gw_server.1, "rpc.grpc.status_code"), Some(&AnyValue::IntValue(0)));

    let descends_from = |span: &Span, ancestor: &Span| {
        let mut parent = span.parent_span_id.clone();
        for _ in 0..32 {
            if parent == ancestor.span_id {
                return true;
            }
            match by_id.get(parent.as_slice()) {
                Some((_, p)) => parent = p.parent_span_id.clone(),
                None => return false,
            }
        }
        false
    };
    for (client_name, server_service) in [
        ("iomete.secrets.v1.AuthzService/BatchCheck", "authz-service"),
        ("iomete.secrets.internal.v1.SecretReader/ReadSecrets", "secret-service"),
        ("iomete.secrets.internal.v1.VaultReader/ReadVaultSecrets", "vault-config-service"),
    ] {
        let client = one(client_name, SpanKind::Client);
        assert_eq!(client.0, "gateway");
        assert!(
            descends_from(&client.1, &gw_server.1),
            "{client_name} client span is inside the gateway's server span"
        );
        let server = one(client_name, SpanKind::Server);
        assert_eq!(server.0, server_service);
        assert_eq!(
            server.1.parent_span_id, client.1.span_id,
            "{server_service}'s server span is the child of the gateway's client span"
        );
    }
    // One span per request to Vault (a token config: one read), none of the
    // Vault client's own.
    let vault_spans: Vec<&Span> =
        trace.iter().filter(|(svc, _)| svc == "vault-config-service").map(|(_, s)| s).collect();
    let requests: Vec<&&Span> = vault_spans.iter().filter(|s| s.name == "vault.request").collect();
    assert_eq!(requests.len(), 1, "{:#?}", vault_spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    assert_eq!(attr(requests[0], "vault.operation"), Some(&AnyValue::StringValue("kv2.read".into())));
    let vault_server = one("iomete.secrets.internal.v1.VaultReader/ReadVaultSecrets", SpanKind::Server);
    assert!(descends_from(requests[0], &vault_server.1), "inside the vault-config-service's server span");
    assert!(
        vault_spans.len() <= 6,
        "the Vault client's internals are not traced: {:#?}",
        vault_spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let server_spans = trace.iter().filter(|(_, s)| s.kind == SpanKind::Server as i32).count();
    assert_eq!(server_spans, 4, "one server span per hop");
    for (service, span) in &trace {
        assert!(
            span.parent_span_id == caller_span || by_id.contains_key(span.parent_span_id.as_slice()),
            "{service} span {} has a parent outside the trace",
            span.name
        );
    }
    let handler = trace
        .iter()
        .find(|(_, s)| attr(s, "rpc") == Some(&AnyValue::StringValue("ResolveSecrets".into())))
        .expect("resolve handler span");
    assert_eq!(attr(&handler.1, "domain"), Some(&AnyValue::StringValue("finance".into())));
    assert_eq!(attr(&handler.1, "items"), Some(&AnyValue::IntValue(3)));
    // The calling identity (the token's name), beside the principal it acts for.
    assert_eq!(attr(&handler.1, "caller"), Some(&AnyValue::StringValue("spark".into())));
    assert_eq!(attr(&handler.1, "principal"), Some(&AnyValue::StringValue("user:admin".into())));

    // Nothing secret in any span received, from any trace.
    let everything = format!("{received:?}");
    for needle in [&canary, &vault_canary, &bao.root_token, &internal, &admin, &spark] {
        assert!(!everything.contains(needle.as_str()), "a span carries a value or token");
    }
    // Log lines are JSON; the gateway's lines for the resolve (at debug)
    // carry its trace id.
    for (service, text) in &logs {
        assert!(!text.contains(&canary), "{service} logged a value");
        assert!(!text.contains(&vault_canary), "{service} logged a Vault value");
        assert!(!text.contains(&bao.root_token), "{service} logged a Vault token");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{service}: not JSON ({e}): {line}"));
        }
    }
    let gateway_logs = &logs[0].1;
    assert!(
        gateway_logs.lines().any(|l| l.contains("\"resolved\"") && l.contains(&trace_hex)),
        "the gateway's resolve log line carries the trace id: {gateway_logs}"
    );
}

fn rand_u128() -> u128 {
    let a = uuid::Uuid::new_v4().as_u128();
    a | 1
}
