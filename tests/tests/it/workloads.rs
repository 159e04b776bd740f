//! Workload payloads resolved in place: each kind of the platform's payloads
//! (compute, Spark jobs, Jupyter containers, storage configs, email, LDAP),
//! legacy placeholders and secret objects mixed, errors per field path.

use std::collections::HashMap;

use integration_tests::{
    payloads::{map, object, secret_object, text},
    procs::grpcurl,
    *,
};
use secrets_proto::v1::{self as pb, config_value::Value as CV, workload_payload::Kind};
use tonic::Code;

fn texts(map: &HashMap<String, pb::ConfigValue>) -> HashMap<String, String> {
    map.iter()
        .map(|(k, v)| match &v.value {
            Some(CV::Text(t)) => (k.clone(), t.clone()),
            other => panic!("{k} is not resolved to text: {other:?}"),
        })
        .collect()
}

async fn setup(app: &TestApp) {
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "db_password", "pw-finance").await.unwrap();
    owner.create("finance", "s3_access_key", "AKIA-finance").await.unwrap();
    app.as_user(ADMIN).create_in(pb::Scope::Global, "", "api_key", "api-global").await.unwrap();
}

async fn resolve(app: &TestApp, payload: pb::WorkloadPayload) -> pb::ResolveWorkloadResponse {
    app.as_service(Some(&format!("user:{OWNER}")))
        .gateway
        .clone()
        .resolve_workload(pb::ResolveWorkloadRequest { domain: "finance".into(), payload: Some(payload) })
        .await
        .expect("resolve workload")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_kind_resolves_in_place_with_errors_per_field() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let env_and_conf = pb::EnvAndConf {
        env_vars: map(&[("API_KEY", text("${secrets.api_key}")), ("DB_PASSWORD", object("finance", "db_password"))]),
        spark_conf: map(&[
            ("spark.hadoop.fs.s3a.access.key", object("finance", "s3_access_key")),
            ("spark.hadoop.fs.s3a.secret.key", object("finance", "missing")),
            ("spark.app.name", text("nightly")),
        ]),
    };
    for kind in ["spark", "streaming", "sdk"] {
        let job = pb::SparkJobPayload { template: Some(env_and_conf.clone()) };
        let payload = match kind {
            "spark" => Kind::SparkJob(job),
            "streaming" => Kind::StreamingJob(job),
            _ => Kind::SdkSparkJob(job),
        };
        let out = resolve(&app, pb::WorkloadPayload { kind: Some(payload) }).await;
        let Some(Kind::SparkJob(j) | Kind::StreamingJob(j) | Kind::SdkSparkJob(j)) = out.payload.unwrap().kind else {
            panic!("{kind}: the same kind comes back")
        };
        let t = j.template.unwrap();
        let env = texts(&t.env_vars);
        assert_eq!(env["API_KEY"], "api-global", "{kind}: a placeholder falls back to the global secrets");
        assert_eq!(env["DB_PASSWORD"], "pw-finance");
        let conf = texts(&t.spark_conf);
        assert_eq!(conf["spark.hadoop.fs.s3a.access.key"], "AKIA-finance");
        assert_eq!(conf["spark.app.name"], "nightly", "plain values stay as they are");
        assert!(!conf.contains_key("spark.hadoop.fs.s3a.secret.key"), "a failed field is left out");
        assert_eq!(out.errors.len(), 1, "{kind}: {:?}", out.errors);
        assert_eq!(out.errors[0].field, r#"template.sparkConf["spark.hadoop.fs.s3a.secret.key"]"#);
        let e = out.errors[0].error.as_ref().unwrap();
        assert_eq!(Code::from_i32(e.code), Code::NotFound, "{}", e.message);
        assert!(e.message.contains("spark.hadoop.fs.s3a.secret.key") && e.message.contains("missing"), "{}", e.message);
    }

    let compute = pb::ComputePayload {
        env_vars: map(&[("DB_PASSWORD", text("${secrets.db_password}"))]),
        spark_conf: map(&[("spark.hadoop.fs.s3a.secret.key", object("finance", "s3_access_key"))]),
    };
    let out = resolve(&app, pb::WorkloadPayload { kind: Some(Kind::Compute(compute)) }).await;
    let Some(Kind::Compute(c)) = out.payload.unwrap().kind else { panic!("compute") };
    assert_eq!(texts(&c.env_vars)["DB_PASSWORD"], "pw-finance");
    assert_eq!(texts(&c.spark_conf)["spark.hadoop.fs.s3a.secret.key"], "AKIA-finance");

    let jupyter = pb::JupyterContainerPayload {
        config: Some(pb::JupyterConfig { env_vars: map(&[("DB_PASSWORD", object("finance", "db_password"))]) }),
    };
    let out = resolve(&app, pb::WorkloadPayload { kind: Some(Kind::JupyterContainer(jupyter)) }).await;
    let Some(Kind::JupyterContainer(j)) = out.payload.unwrap().kind else { panic!("jupyter") };
    assert_eq!(texts(&j.config.unwrap().env_vars)["DB_PASSWORD"], "pw-finance");

    // storageSecret wins over the plaintext secretKey; alone, secretKey is kept.
    let storage = |secret: Option<pb::SecretObject>| pb::WorkloadPayload {
        kind: Some(Kind::StorageConfig(pb::StorageConfigPayload {
            secret_key: "my-plaintext-secret-value".into(),
            storage_secret: secret,
        })),
    };
    let out = resolve(&app, storage(Some(secret_object("finance", "s3_access_key")))).await;
    let Some(Kind::StorageConfig(s)) = out.payload.unwrap().kind else { panic!("storage") };
    assert_eq!((s.secret_key.as_str(), s.storage_secret.is_none()), ("AKIA-finance", true));
    let out = resolve(&app, storage(None)).await;
    let Some(Kind::StorageConfig(s)) = out.payload.unwrap().kind else { panic!("storage") };
    assert_eq!(s.secret_key, "my-plaintext-secret-value");

    let email = pb::EmailSettingsPayload { smtp_password: Some(object("finance", "db_password")) };
    let out = resolve(&app, pb::WorkloadPayload { kind: Some(Kind::EmailSettings(email)) }).await;
    let Some(Kind::EmailSettings(e)) = out.payload.unwrap().kind else { panic!("email") };
    assert_eq!(e.smtp_password, Some(text("pw-finance")));
    let ldap = pb::LdapIntegrationPayload { bind_password: Some(object("other", "db_password")) };
    let out = resolve(&app, pb::WorkloadPayload { kind: Some(Kind::LdapIntegration(ldap)) }).await;
    assert_eq!(out.errors[0].field, "bindPassword");
    assert_eq!(Code::from_i32(out.errors[0].error.as_ref().unwrap().code), Code::PermissionDenied);

    // No kind, or a user token: refused as for ResolveSecrets.
    let e = app
        .as_service(Some(&format!("user:{OWNER}")))
        .gateway
        .clone()
        .resolve_workload(pb::ResolveWorkloadRequest {
            domain: "finance".into(),
            payload: Some(pb::WorkloadPayload { kind: None }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("payload: set one kind"), "{}", e.message());
    let e = app
        .as_user(OWNER)
        .gateway
        .clone()
        .resolve_workload(pb::ResolveWorkloadRequest {
            domain: "finance".into(),
            payload: Some(pb::WorkloadPayload { kind: Some(Kind::Compute(Default::default())) }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_resolves_a_spark_job_payload_written_as_json() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let body = r#"{"domain": "finance", "payload": {"sparkJob": {"template": {
        "envVars": {"API_KEY": {"text": "${secrets.api_key}"}},
        "sparkConf": {"spark.hadoop.fs.s3a.access.key":
            {"secretObject": {"key": "s3_access_key", "source": {"type": "KUBERNETES", "id": "finance"}}}}}}}}"#;
    let addr = app.gateway_url.trim_start_matches("http://").to_string();
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(grpcurl())
            .args(["-plaintext", "-H", &format!("authorization: Bearer {}", app.token(SPARK))])
            .args(["-H", &format!("x-on-behalf-of: user:{OWNER}"), "-d", body, &addr])
            .arg("iomete.secrets.v1.Gateway/ResolveWorkload")
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}{stdout}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let template = &json["payload"]["sparkJob"]["template"];
    assert_eq!(template["envVars"]["API_KEY"]["text"], "api-global");
    assert_eq!(template["sparkConf"]["spark.hadoop.fs.s3a.access.key"]["text"], "AKIA-finance");
}
