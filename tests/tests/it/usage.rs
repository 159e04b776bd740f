//! Saved workloads: references checked at save time with a typed problem per
//! field, the usage index after saves, updates and deletes, and delete
//! protection of domain and global secrets. The index tests run on SQLite
//! and, when DATABASE_URL names a PostgreSQL server, there too.

use std::collections::HashMap;

use integration_tests::{
    on_both_databases,
    payloads::{map, object, secret_object, text},
    procs::grpcurl,
    *,
};
use secrets_proto::v1::{
    self as pb, ProblemType, WorkloadKind, list_secret_usages_request::Secret, workload_payload::Kind,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

on_both_databases!(
    the_usage_index_follows_saves_updates_and_deletes,
    every_workload_kind_is_indexed_under_its_kind,
    deleting_a_referenced_domain_secret_is_refused_naming_the_workloads_unless_forced,
);
on_both_databases!(options = burst_options; two_hundred_concurrent_saves_lose_no_index_entry);
on_both_databases!(two_services_saving_one_new_workload_at_once_leave_one_owner);

/// 200 saves at once on a shared, busy machine: what counts is that none is
/// lost, not how fast they land; bounds with room for that.
fn burst_options() -> Options {
    Options { request_timeout_ms: Some(20_000), database_timeout_ms: Some(20_000), ..Default::default() }
}

fn spark_job(env: &[(&str, pb::ConfigValue)], conf: &[(&str, pb::ConfigValue)]) -> pb::WorkloadPayload {
    pb::WorkloadPayload {
        kind: Some(Kind::SparkJob(pb::SparkJobPayload {
            template: Some(pb::EnvAndConf { env_vars: map(env), spark_conf: map(conf) }),
        })),
    }
}

async fn setup(app: &TestApp) {
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "db_password", "pw-finance").await.unwrap();
    owner.create("finance", "s3_access_key", "AKIA-finance").await.unwrap();
    app.as_user(ADMIN).create_in(pb::Scope::Global, "", "api_key", "api-global").await.unwrap();
}

/// The platform's Spark manager, acting for the domain owner.
fn spark(app: &TestApp) -> Clients {
    app.as_service(Some(&format!("user:{OWNER}")))
}

async fn save(clients: &Clients, id: &str, payload: pb::WorkloadPayload) -> Result<pb::SaveWorkloadResponse, Status> {
    let request = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: id.into(),
        name: format!("job {id}"),
        payload: Some(payload),
        validate_only: false,
    };
    Ok(clients.gateway.clone().save_workload(request).await?.into_inner())
}

async fn usages(clients: &Clients, scope: pb::Scope, domain: &str, key: &str) -> pb::ListSecretUsagesResponse {
    let request = pb::ListSecretUsagesRequest {
        secret: Some(Secret::StoreSecret(pb::StoreSecret {
            scope: scope as i32,
            domain: if scope == pb::Scope::Domain { domain.into() } else { String::new() },
            key: key.into(),
        })),
        domain: String::new(),
        limit: 1_000,
    };
    clients.gateway.clone().list_secret_usages(request).await.expect("list usages").into_inner()
}

fn ids(found: &pb::ListSecretUsagesResponse) -> Vec<String> {
    found.usages.iter().map(|u| u.workload.as_ref().unwrap().id.clone()).collect()
}

async fn references(clients: &Clients, id: &str) -> Result<Vec<(String, String, bool)>, Status> {
    let request = pb::GetWorkloadReferencesRequest {
        domain: "finance".into(),
        kind: WorkloadKind::SparkJob as i32,
        id: id.into(),
    };
    let found = clients.gateway.clone().get_workload_references(request).await?.into_inner();
    let mut refs: Vec<_> =
        found.references.into_iter().map(|r| (r.field, r.secret_object.unwrap().key, r.placeholder)).collect();
    refs.sort();
    Ok(refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_checks_every_reference_and_reports_a_typed_problem_per_field() {
    let mut app = TestApp::spawn().await;
    setup(&app).await;
    let spark = spark(&app);
    let payload = spark_job(
        &[
            ("DB_PASSWORD", object("finance", "db_password")),
            ("MISSING", object("finance", "no_such_key")),
            ("LEGACY", text("jdbc://u:${secrets.no_such_placeholder}@db")),
            ("PLAIN", text("no references here")),
        ],
        &[
            ("spark.other.domain", object(OTHER_DOMAIN, "anything")),
            ("spark.bad.key", object("finance", "not a key!")),
            ("spark.bad.placeholder", text("${secrets.}")),
        ],
    );
    let out = save(&spark, "etl", payload.clone()).await.unwrap();
    assert!(!out.saved, "a payload with problems is not recorded");
    let problems: HashMap<&str, (ProblemType, &str)> = out
        .problems
        .iter()
        .map(|p| (p.field.as_str(), (ProblemType::try_from(p.r#type).unwrap(), p.message.as_str())))
        .collect();
    let expect = [
        (r#"template.envVars["MISSING"]"#, ProblemType::ProblemNotFound),
        (r#"template.envVars["LEGACY"]"#, ProblemType::ProblemNotFound),
        (r#"template.sparkConf["spark.other.domain"]"#, ProblemType::ProblemPermissionDenied),
        (r#"template.sparkConf["spark.bad.key"]"#, ProblemType::ProblemMalformed),
        (r#"template.sparkConf["spark.bad.placeholder"]"#, ProblemType::ProblemMalformed),
    ];
    assert_eq!(problems.len(), expect.len(), "exactly the bad fields: {problems:#?}");
    for (field, kind) in expect {
        let (got, message) = problems.get(field).unwrap_or_else(|| panic!("no problem for {field}: {problems:#?}"));
        assert_eq!(*got, kind, "{field}: {message}");
        assert!(message.starts_with(&format!("{field}: ")), "the message names the field first: {message}");
    }
    assert!(problems[r#"template.envVars["MISSING"]"#].1.contains("no_such_key"));
    // Every reference is listed, the good ones too; never a value.
    assert!(out.references.iter().any(|r| r.field == r#"template.envVars["DB_PASSWORD"]"#));
    assert!(!format!("{out:?}").contains("pw-finance"), "a save never carries a value");
    let e = references(&spark, "etl").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "nothing was recorded: {}", e.message());

    // validate_only checks and records nothing, even when all is well.
    let good = spark_job(&[("DB_PASSWORD", object("finance", "db_password"))], &[]);
    let request = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: "etl".into(),
        name: String::new(),
        payload: Some(good.clone()),
        validate_only: true,
    };
    let out = spark.gateway.clone().save_workload(request).await.unwrap().into_inner();
    assert!(out.problems.is_empty() && !out.saved, "{out:?}");
    assert_eq!(references(&spark, "etl").await.unwrap_err().code(), Code::NotFound);

    // A store that does not answer: each of its references is a backend
    // problem, and nothing is recorded.
    app.stop_secret_service().await;
    let out = save(&spark, "etl", good).await.unwrap();
    assert!(!out.saved);
    assert_eq!(out.problems.len(), 1, "{out:?}");
    assert_eq!(out.problems[0].r#type, ProblemType::ProblemBackendUnavailable as i32, "{:?}", out.problems);
    assert!(out.problems[0].message.contains("secret-service"), "names the backend: {}", out.problems[0].message);
    app.start_secret_service().await;

    // Saving needs USE_SECRETS in the workload's domain.
    let e = save(&app.as_service(Some(&format!("user:{STRANGER}"))), "x", spark_job(&[], &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("may not save workloads in domain \"finance\""), "{}", e.message());
    // Bad ids and names name the field.
    for (id, field) in [("", "id"), ("a\u{7}b", "id")] {
        let e = save(&spark, id, spark_job(&[], &[])).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.get_error_details().bad_request().unwrap().field_violations[0].field, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_secrets_v2_off_saving_refuses_secret_objects_and_the_selector_offers_placeholders() {
    let app = TestApp::spawn_with(Options { secrets_v2_off: true, ..Default::default() }).await;
    setup(&app).await;
    let spark = spark(&app);
    let out = save(
        &spark,
        "legacy",
        spark_job(&[("DB_PASSWORD", object("finance", "db_password")), ("API", text("${secrets.api_key}"))], &[]),
    )
    .await
    .unwrap();
    assert!(!out.saved);
    assert_eq!(out.problems.len(), 1, "only the secret object: {out:?}");
    assert_eq!(out.problems[0].r#type, ProblemType::ProblemFeatureDisabled as i32);
    assert!(out.problems[0].message.contains("features.secretsV2.enabled"), "{}", out.problems[0].message);
    let out = save(&spark, "legacy", spark_job(&[("API", text("${secrets.api_key}"))], &[])).await.unwrap();
    assert!(out.saved, "placeholders keep working: {out:?}");

    let listed = app
        .as_service(Some(&format!("user:{LISTER}")))
        .gateway
        .clone()
        .list_selectable_secrets(pb::ListSelectableSecretsRequest { domain: "finance".into() })
        .await
        .unwrap()
        .into_inner();
    let placeholders: Vec<&str> = listed.secrets.iter().map(|s| s.placeholder.as_str()).collect();
    assert!(placeholders.contains(&"${secrets.db_password}") && placeholders.contains(&"${secrets.api_key}"));
    assert!(listed.secrets.iter().all(|s| s.secret_object.is_none()), "no secret objects: {listed:?}");
}

async fn the_usage_index_follows_saves_updates_and_deletes(app: TestApp) {
    setup(&app).await;
    let spark = spark(&app);
    // A domain secret and a global one as secret objects, and a placeholder.
    let payload = spark_job(
        &[("DB_PASSWORD", object("finance", "db_password")), ("API_KEY", object("finance", "api_key"))],
        &[("spark.hadoop.fs.s3a.access.key", text("${secrets.s3_access_key}"))],
    );
    let out = save(&spark, "etl", payload).await.unwrap();
    assert!(out.saved && out.problems.is_empty(), "{out:?}");
    assert_eq!(
        references(&spark, "etl").await.unwrap(),
        [
            (r#"template.envVars["API_KEY"]"#.to_string(), "api_key".to_string(), false),
            (r#"template.envVars["DB_PASSWORD"]"#.to_string(), "db_password".to_string(), false),
            (r#"template.sparkConf["spark.hadoop.fs.s3a.access.key"]"#.to_string(), "s3_access_key".to_string(), true),
        ]
    );
    let lister = app.as_service(Some(&format!("user:{LISTER}")));
    let admin = app.as_user(ADMIN);
    assert_eq!(ids(&usages(&lister, pb::Scope::Domain, "finance", "db_password").await), ["etl"]);
    assert_eq!(
        ids(&usages(&lister, pb::Scope::Domain, "finance", "s3_access_key").await),
        ["etl"],
        "placeholders count"
    );
    let global = usages(&admin, pb::Scope::Global, "", "api_key").await;
    assert_eq!(ids(&global), ["etl"], "finance has no api_key of its own: the global one is used");
    let usage = &global.usages[0];
    assert_eq!(usage.workload.as_ref().unwrap().name, "job etl");
    assert_eq!(usage.workload.as_ref().unwrap().kind, WorkloadKind::SparkJob as i32);
    assert_eq!(usage.references[0].field, r#"template.envVars["API_KEY"]"#);

    // An update that drops references drops them from the index.
    let payload = spark_job(&[("API_KEY", object("finance", "api_key"))], &[]);
    assert!(save(&spark, "etl", payload).await.unwrap().saved);
    assert_eq!(usages(&lister, pb::Scope::Domain, "finance", "db_password").await.total, 0);
    assert_eq!(usages(&lister, pb::Scope::Domain, "finance", "s3_access_key").await.total, 0);
    assert_eq!(references(&spark, "etl").await.unwrap().len(), 1);

    // Who may see usages: LIST_SECRETS in the domain; a global secret's
    // usages across domains only for platform admins.
    let member = app.as_service(Some(&format!("user:{MEMBER}")));
    let request = |scope: pb::Scope, domain: &str| pb::ListSecretUsagesRequest {
        secret: Some(Secret::StoreSecret(pb::StoreSecret {
            scope: scope as i32,
            domain: domain.into(),
            key: "api_key".into(),
        })),
        ..Default::default()
    };
    let e = member.gateway.clone().list_secret_usages(request(pb::Scope::Domain, "finance")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = lister.gateway.clone().list_secret_usages(request(pb::Scope::Global, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let mut in_finance = request(pb::Scope::Global, "");
    in_finance.domain = "finance".into();
    let found = lister.gateway.clone().list_secret_usages(in_finance).await.unwrap().into_inner();
    assert_eq!(ids(&found), ["etl"], "a global secret's usages in one domain, for its listers");

    // Delete removes it; deleting again says it was not there.
    let delete =
        pb::DeleteWorkloadRequest { domain: "finance".into(), kind: WorkloadKind::SparkJob as i32, id: "etl".into() };
    assert!(spark.gateway.clone().delete_workload(delete.clone()).await.unwrap().into_inner().removed);
    assert!(!spark.gateway.clone().delete_workload(delete).await.unwrap().into_inner().removed);
    assert_eq!(references(&spark, "etl").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(usages(&admin, pb::Scope::Global, "", "api_key").await.total, 0);
}

/// One payload of each kind with `value` in one field, and that field's path.
fn one_of_each(value: pb::ConfigValue, object: pb::SecretObject) -> Vec<(WorkloadKind, Kind, &'static str)> {
    let v = || value.clone();
    let job = || pb::SparkJobPayload {
        template: Some(pb::EnvAndConf { env_vars: map(&[("DB", v())]), ..Default::default() }),
    };
    vec![
        (
            WorkloadKind::Compute,
            Kind::Compute(pb::ComputePayload { spark_conf: map(&[("k", v())]), ..Default::default() }),
            r#"sparkConf["k"]"#,
        ),
        (WorkloadKind::SparkJob, Kind::SparkJob(job()), r#"template.envVars["DB"]"#),
        (WorkloadKind::StreamingJob, Kind::StreamingJob(job()), r#"template.envVars["DB"]"#),
        (WorkloadKind::SdkSparkJob, Kind::SdkSparkJob(job()), r#"template.envVars["DB"]"#),
        (
            WorkloadKind::JupyterContainer,
            Kind::JupyterContainer(pb::JupyterContainerPayload {
                config: Some(pb::JupyterConfig { env_vars: map(&[("DB", v())]) }),
            }),
            r#"config.envVars["DB"]"#,
        ),
        (
            WorkloadKind::StorageConfig,
            Kind::StorageConfig(pb::StorageConfigPayload {
                secret_key: "${secrets.s3_access_key}".into(),
                storage_secret: Some(object),
            }),
            "storageSecret",
        ),
        (
            WorkloadKind::EmailSettings,
            Kind::EmailSettings(pb::EmailSettingsPayload { smtp_password: Some(v()) }),
            "smtpPassword",
        ),
        (
            WorkloadKind::LdapIntegration,
            Kind::LdapIntegration(pb::LdapIntegrationPayload { bind_password: Some(v()) }),
            "bindPassword",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_kind_reports_a_bad_reference_on_its_field_at_save_and_at_resolve() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let spark = spark(&app);
    for (kind, payload, field) in one_of_each(object("finance", "missing"), secret_object("finance", "missing")) {
        let payload = pb::WorkloadPayload { kind: Some(payload) };
        let out = save(&spark, "w1", payload.clone()).await.unwrap();
        assert!(!out.saved, "{kind:?}");
        assert_eq!(out.problems.len(), 1, "{kind:?}: {out:?}");
        assert_eq!(out.problems[0].field, field, "{kind:?}");
        assert_eq!(out.problems[0].r#type, ProblemType::ProblemNotFound as i32, "{kind:?}");
        let resolved = spark
            .gateway
            .clone()
            .resolve_workload(pb::ResolveWorkloadRequest { domain: "finance".into(), payload: Some(payload) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resolved.errors.len(), 1, "{kind:?}");
        assert_eq!(resolved.errors[0].field, field, "{kind:?}");
        let message = &resolved.errors[0].error.as_ref().unwrap().message;
        assert!(message.starts_with(&format!("{field}: secret \"missing\" does not exist")), "{kind:?}: {message}");
    }
}

async fn every_workload_kind_is_indexed_under_its_kind(app: TestApp) {
    setup(&app).await;
    let spark = spark(&app);
    let payloads = one_of_each(object("finance", "db_password"), secret_object("finance", "db_password"));
    for (_, kind, _) in &payloads {
        let out = save(&spark, "w1", pb::WorkloadPayload { kind: Some(kind.clone()) }).await.unwrap();
        assert!(out.saved, "{out:?}");
    }
    let found = usages(&spark, pb::Scope::Domain, "finance", "db_password").await;
    assert_eq!(found.total, payloads.len() as u32, "one workload per kind with the same id: {found:?}");
    for (kind, _, field) in payloads {
        let usage = found
            .usages
            .iter()
            .find(|u| u.workload.as_ref().unwrap().kind == kind as i32)
            .unwrap_or_else(|| panic!("{kind:?} is indexed"));
        assert_eq!(usage.references[0].field, field, "{kind:?}");
    }
    // storageSecret wins: the plaintext fallback's placeholder is no reference.
    assert_eq!(usages(&spark, pb::Scope::Domain, "finance", "s3_access_key").await.total, 0);
}

/// Saves are written in batches (one transaction each): 200 at once all
/// land, and 20 refused among them (another service's workloads) fail
/// alone, changing nothing.
async fn two_hundred_concurrent_saves_lose_no_index_entry(app: TestApp) {
    setup(&app).await;
    let spark = spark(&app);
    for i in 0..20 {
        save(&spark, &format!("job-{i:03}"), spark_job(&[], &[])).await.unwrap();
    }
    let jupyter = Clients::over(app.gateway_channel(), Some(app.token(JUPYTER)), Some(&format!("user:{OWNER}")));
    let refused = (0..20).map(|i| {
        let jupyter = jupyter.clone();
        async move {
            save(&jupyter, &format!("job-{i:03}"), spark_job(&[("X", object("finance", "db_password"))], &[])).await
        }
    });
    let saves = (0..200).map(|i| {
        let spark = spark.clone();
        async move {
            let key = if i % 2 == 0 { "db_password" } else { "s3_access_key" };
            let payload = spark_job(&[("SECRET", object("finance", key))], &[("n", text(&format!("{i}")))]);
            save(&spark, &format!("job-{i:03}"), payload).await
        }
    });
    let (results, refused) = tokio::join!(futures::future::join_all(saves), futures::future::join_all(refused));
    for (i, r) in results.iter().enumerate() {
        assert!(r.as_ref().is_ok_and(|r| r.saved), "save {i}: {r:?}");
    }
    for (i, r) in refused.iter().enumerate() {
        let e = r.as_ref().expect_err("another service's workload is not replaced");
        assert_eq!(e.code(), Code::PermissionDenied, "refused save {i}: {e:?}");
    }
    let even = usages(&spark, pb::Scope::Domain, "finance", "db_password").await;
    let odd = usages(&spark, pb::Scope::Domain, "finance", "s3_access_key").await;
    assert_eq!((even.total, odd.total), (100, 100));
    assert_eq!(ids(&even), (0..200).step_by(2).map(|i| format!("job-{i:03}")).collect::<Vec<_>>());

    // Concurrent saves of one workload: the last one's references are all
    // that is left, never a mix.
    let saves = (0..20).map(|i| {
        let spark = spark.clone();
        async move {
            let key = if i % 2 == 0 { "db_password" } else { "s3_access_key" };
            save(&spark, "shared", spark_job(&[(&format!("V{i}"), object("finance", key))], &[])).await.unwrap()
        }
    });
    futures::future::join_all(saves).await;
    let refs = references(&spark, "shared").await.unwrap();
    assert_eq!(refs.len(), 1, "one save's references, not a union: {refs:?}");
}

async fn deleting_a_referenced_domain_secret_is_refused_naming_the_workloads_unless_forced(app: TestApp) {
    setup(&app).await;
    let spark = spark(&app);
    for id in ["etl", "report"] {
        let payload = spark_job(&[("DB_PASSWORD", object("finance", "db_password"))], &[]);
        assert!(save(&spark, id, payload).await.unwrap().saved);
    }
    let owner = app.as_user(OWNER);
    let delete = |force: bool| pb::DeleteSecretRequest {
        scope: pb::Scope::Domain as i32,
        domain: "finance".into(),
        key: "db_password".into(),
        force,
        request_id: String::new(),
    };
    let e = owner.secrets.clone().delete_secret(delete(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("secret \"db_password\" of domain \"finance\" is referenced by 2 saved workloads"),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains(r#"finance/SPARK_JOB/etl ("job etl") at template.envVars["DB_PASSWORD"]"#),
        "{}",
        e.message()
    );
    assert!(e.message().contains("force=true"), "says what to do: {}", e.message());
    let violations = e.get_error_details().precondition_failure().unwrap().violations.clone();
    assert_eq!(violations.len(), 2);
    assert_eq!(violations[0].r#type, "IN_USE");
    assert_eq!(owner.list("finance").await.unwrap().iter().filter(|k| *k == "db_password").count(), 1, "still there");

    // Unreferenced keys delete as before; a missing key is NOT_FOUND.
    owner.delete("finance", "s3_access_key").await.unwrap();
    assert_eq!(owner.delete("finance", "s3_access_key").await.unwrap_err().code(), Code::NotFound);

    let deleted = owner.secrets.clone().delete_secret(delete(true)).await.unwrap().into_inner();
    let broken = deleted.broken.expect("a forced delete names the broken workloads");
    assert_eq!(broken.total, 2);
    let names: Vec<&str> = broken.workloads.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(names, ["etl", "report"]);
    assert!(!owner.list("finance").await.unwrap().contains(&"db_password".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_global_secret_is_refused_while_a_domain_falls_back_to_it() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let admin = app.as_user(ADMIN);
    admin.create_in(pb::Scope::Global, "", "smtp_password", "smtp-global").await.unwrap();
    let spark = spark(&app);
    let payload =
        spark_job(&[("API", text("key=${secrets.api_key}")), ("SMTP", text("${secrets.smtp_password}"))], &[]);
    assert!(save(&spark, "etl", payload).await.unwrap().saved);
    let delete = |key: &str, force: bool| pb::DeleteSecretRequest {
        scope: pb::Scope::Global as i32,
        domain: String::new(),
        key: key.into(),
        force,
        request_id: String::new(),
    };
    let e = admin.secrets.clone().delete_secret(delete("api_key", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with("global secret \"api_key\" is referenced by 1 saved workload: finance/SPARK_JOB/etl"),
        "{}",
        e.message()
    );

    // Forced, the delete goes through and names the broken workload.
    let deleted = admin.secrets.clone().delete_secret(delete("smtp_password", true)).await.unwrap().into_inner();
    let broken = deleted.broken.expect("broken workloads");
    assert_eq!((broken.total, broken.workloads[0].id.as_str()), (1, "etl"));
    assert!(!admin.list_in(pb::Scope::Global, "").await.unwrap().contains(&"smtp_password".to_string()));

    // Once finance has its own api_key, the workload uses that one: the
    // global key is free to go.
    app.as_user(OWNER).create("finance", "api_key", "api-finance").await.unwrap();
    let deleted = admin.secrets.clone().delete_secret(delete("api_key", false)).await.unwrap().into_inner();
    assert!(deleted.broken.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_is_refused_while_the_usage_index_cannot_answer() {
    let mut app = TestApp::spawn().await;
    setup(&app).await;
    // The owner's delete needs the authz-service twice: the permission and
    // the index. With it down, nothing is deleted, and the answer says why.
    app.stop_authz().await;
    let e = app.as_user(OWNER).delete("finance", "db_password").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    app.start_authz().await;
    assert!(app.as_user(OWNER).list("finance").await.unwrap().contains(&"db_password".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_saves_a_seed_payload_and_lists_a_secrets_usages() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let addr = app.gateway_url.trim_start_matches("http://").to_string();
    let call = |token: &str, body: &str, rpc: &str| {
        let output = tokio::task::block_in_place(|| {
            std::process::Command::new(grpcurl())
                .args(["-plaintext", "-H", &format!("authorization: Bearer {token}")])
                .args(["-H", &format!("x-on-behalf-of: user:{OWNER}"), "-d", body, &addr])
                .arg(format!("iomete.secrets.v1.Gateway/{rpc}"))
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{rpc}: {}{stdout}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    // The seed's compute payload: a V1 placeholder and a V2 secret object.
    let saved = call(
        app.token(SPARK),
        r#"{"domain": "finance", "id": "c-1", "name": "analytics", "payload": {"compute": {
            "envVars": {"DB_URL": {"text": "postgres://u:${secrets.db_password}@db"}},
            "sparkConf": {"spark.hadoop.fs.s3a.access.key":
                {"secretObject": {"key": "s3_access_key", "source": {"type": "KUBERNETES", "id": "finance"}}}}}}}"#,
        "SaveWorkload",
    );
    assert_eq!(saved["saved"], true, "{saved}");
    assert_eq!(saved["references"].as_array().unwrap().len(), 2, "{saved}");
    let found = call(
        app.token(SPARK),
        r#"{"storeSecret": {"scope": "SCOPE_DOMAIN", "domain": "finance", "key": "db_password"}}"#,
        "ListSecretUsages",
    );
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["usages"][0]["workload"]["kind"], "WORKLOAD_KIND_COMPUTE");
    assert_eq!(found["usages"][0]["workload"]["name"], "analytics");
    assert_eq!(found["usages"][0]["references"][0]["field"], r#"envVars["DB_URL"]"#);
    assert_eq!(found["usages"][0]["references"][0]["placeholder"], true);
}

#[tokio::test]
async fn only_the_identity_that_saved_a_workload_or_an_admin_changes_its_record() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let payload = || spark_job(&[("DB_PASSWORD", object("finance", "db_password"))], &[]);
    let delete =
        pb::DeleteWorkloadRequest { domain: "finance".into(), kind: WorkloadKind::SparkJob as i32, id: "etl".into() };

    // A user may validate but not record or delete: their token cannot add
    // or remove another component's delete protection.
    let owner = app.as_user(OWNER);
    let e = save(&owner, "etl", payload()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("validate_only"), "{}", e.message());
    let check = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: "etl".into(),
        name: String::new(),
        payload: Some(payload()),
        validate_only: true,
    };
    let out = owner.gateway.clone().save_workload(check).await.unwrap().into_inner();
    assert!(out.problems.is_empty() && !out.saved, "{out:?}");

    // The platform service that saves it owns it.
    let spark = spark(&app);
    assert!(save(&spark, "etl", payload()).await.unwrap().saved);
    let get = pb::GetWorkloadReferencesRequest {
        domain: "finance".into(),
        kind: WorkloadKind::SparkJob as i32,
        id: "etl".into(),
    };
    let found = spark.gateway.clone().get_workload_references(get.clone()).await.unwrap().into_inner();
    assert_eq!(found.owner, "service:spark");
    assert_eq!(found.saved_by, format!("user:{OWNER}"));

    let e = owner.gateway.clone().delete_workload(delete.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());

    // Another platform service, for the same user, can neither replace nor
    // delete it.
    let jupyter = Clients::over(app.gateway_channel(), Some(app.token(JUPYTER)), Some(&format!("user:{OWNER}")));
    let e = save(&jupyter, "etl", spark_job(&[], &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("service:spark saved it"), "{}", e.message());
    let e = jupyter.gateway.clone().delete_workload(delete.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(references(&spark, "etl").await.unwrap().len(), 1, "the record is unchanged");
    let e = app.as_user(OWNER).delete("finance", "db_password").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "still protected: {}", e.message());

    // A platform admin may, as a user or through any service.
    let admin = app.as_user(ADMIN);
    assert!(save(&admin, "etl", payload()).await.unwrap().saved);
    let found = spark.gateway.clone().get_workload_references(get).await.unwrap().into_inner();
    assert_eq!(found.owner, "user:admin");
    assert!(admin.gateway.clone().delete_workload(delete.clone()).await.unwrap().into_inner().removed);
    assert_eq!(references(&spark, "etl").await.unwrap_err().code(), Code::NotFound);

    assert!(save(&jupyter, "etl", payload()).await.unwrap().saved);
    let admin_through_spark = app.as_service(Some("user:admin"));
    assert!(admin_through_spark.gateway.clone().delete_workload(delete).await.unwrap().into_inner().removed);
}

async fn two_services_saving_one_new_workload_at_once_leave_one_owner(app: TestApp) {
    setup(&app).await;
    let spark = spark(&app);
    let jupyter = Clients::over(app.gateway_channel(), Some(app.token(JUPYTER)), Some(&format!("user:{OWNER}")));
    let payload = || spark_job(&[("DB_PASSWORD", object("finance", "db_password"))], &[]);
    for round in 0..10 {
        let id = format!("race-{round}");
        let (a, b) = tokio::join!(save(&spark, &id, payload()), save(&jupyter, &id, payload()));
        let winners: Vec<&str> = [(&a, "service:spark"), (&b, "service:jupyter")]
            .iter()
            .filter(|(r, _)| r.as_ref().is_ok_and(|r| r.saved))
            .map(|(_, who)| *who)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one first save wins: {a:?} / {b:?}");
        for r in [&a, &b] {
            if let Err(e) = r {
                assert_eq!(e.code(), Code::PermissionDenied, "round {round}: {e:?}");
            }
        }
        let request = pb::GetWorkloadReferencesRequest {
            domain: "finance".into(),
            kind: WorkloadKind::SparkJob as i32,
            id: id.clone(),
        };
        let found = spark.gateway.clone().get_workload_references(request).await.unwrap().into_inner();
        assert_eq!(found.owner, winners[0], "round {round}: the record names the save that won");
    }
}

/// The guard itself, not the permission check before it: with the
/// authz-service answering (the owner may delete) and only the usage index
/// failing, a delete is refused with UNAVAILABLE, nothing is deleted, and
/// the secret still resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_is_refused_while_only_the_usage_index_fails() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let owner = app.as_user(OWNER);
    let resolves = || async {
        let out = spark(&app).resolve("finance", vec![object_item("pw", "finance", "db_password")]).await.unwrap();
        matches!(&out[0].result, Some(pb::resolved_item::Result::Value(_)))
    };

    app.usage_index_works(false).await;
    // Authorization answers: the owner may list, and asking is not the problem.
    assert!(owner.list("finance").await.unwrap().contains(&"db_password".to_string()));
    let e = owner.delete("finance", "db_password").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("usage index"), "the answer names what failed: {}", e.message());
    assert!(owner.list("finance").await.unwrap().contains(&"db_password".to_string()), "nothing was deleted");
    assert!(resolves().await, "the secret still resolves");

    app.usage_index_works(true).await;
    owner.delete("finance", "db_password").await.unwrap();
    assert!(!owner.list("finance").await.unwrap().contains(&"db_password".to_string()));
}
