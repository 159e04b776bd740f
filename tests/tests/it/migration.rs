//! Migration to secret objects: every workload kind planned and applied,
//! placeholders that fall back to a global secret named as such, embedded
//! placeholders left alone, plaintext credentials moved into the store and
//! nowhere else, applying twice a no-op, the flag's refusal, and the
//! progress report kept in step with saves, migrations and deletes.

use integration_tests::{
    payloads::{map, object, text},
    *,
};
use prost::Message;
use secrets_proto::v1::{self as pb, workload_payload::Kind};
use tonic::Code;

const DOMAIN: &str = "finance";
const CANARY: &str = "migration-canary-5e1b7f30";
const LDAP_CANARY: &str = "migration-ldap-canary-0c9d2a41";

async fn setup(app: &TestApp) {
    app.setup_domain(DOMAIN).await;
    let owner = app.as_user(OWNER);
    owner.create(DOMAIN, "db_password", "pw-finance").await.unwrap();
    owner.create(DOMAIN, "api_key", "api-finance").await.unwrap();
    app.as_user(ADMIN).create_in(pb::Scope::Global, "", "smtp_password", "smtp-global").await.unwrap();
}

/// The platform service, acting for the domain's owner.
fn platform(app: &TestApp) -> Clients {
    app.as_service(Some(&format!("user:{OWNER}")))
}

fn spark(template: pb::EnvAndConf) -> pb::SparkJobPayload {
    pb::SparkJobPayload { template: Some(template) }
}

/// One payload of each kind, mixing placeholders (alone, embedded, falling
/// back to a global key) with plaintext credentials.
fn payloads() -> Vec<(&'static str, pb::WorkloadPayload)> {
    let env = || pb::EnvAndConf {
        env_vars: map(&[
            ("API_KEY", text("${secrets.api_key}")),
            ("JDBC", text("jdbc:postgresql://etl:${secrets.db_password}@db/warehouse")),
            ("APP", text("nightly")),
        ]),
        spark_conf: map(&[("spark.smtp.password", text("${secrets.smtp_password}"))]),
    };
    let kinds = vec![
        ("compute", Kind::Compute(pb::ComputePayload { env_vars: env().env_vars, spark_conf: env().spark_conf })),
        ("spark", Kind::SparkJob(spark(env()))),
        ("streaming", Kind::StreamingJob(spark(env()))),
        ("sdk", Kind::SdkSparkJob(spark(env()))),
        (
            "jupyter",
            Kind::JupyterContainer(pb::JupyterContainerPayload {
                config: Some(pb::JupyterConfig { env_vars: map(&[("DB_PASSWORD", text("${secrets.db_password}"))]) }),
            }),
        ),
        ("storage", Kind::StorageConfig(pb::StorageConfigPayload { secret_key: CANARY.into(), storage_secret: None })),
        (
            "email",
            Kind::EmailSettings(pb::EmailSettingsPayload { smtp_password: Some(text("${secrets.smtp_password}")) }),
        ),
        ("ldap", Kind::LdapIntegration(pb::LdapIntegrationPayload { bind_password: Some(text(LDAP_CANARY)) })),
        (
            "storage-ref",
            Kind::StorageConfig(pb::StorageConfigPayload {
                secret_key: "${secrets.db_password}".into(),
                storage_secret: None,
            }),
        ),
    ];
    kinds.into_iter().map(|(n, k)| (n, pb::WorkloadPayload { kind: Some(k) })).collect()
}

async fn resolved(app: &TestApp, payload: pb::WorkloadPayload) -> pb::ResolveWorkloadResponse {
    let request = pb::ResolveWorkloadRequest { domain: DOMAIN.into(), payload: Some(payload) };
    let answer = platform(app).gateway.resolve_workload(request).await.unwrap().into_inner();
    assert!(answer.errors.is_empty(), "{:?}", answer.errors.iter().map(|e| &e.field).collect::<Vec<_>>());
    answer
}

async fn plan(app: &TestApp, id: &str, payload: pb::WorkloadPayload) -> pb::PlanWorkloadMigrationResponse {
    let request = pb::PlanWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: id.into(),
        payload: Some(payload),
        ..Default::default()
    };
    platform(app).gateway.plan_workload_migration(request).await.unwrap().into_inner()
}

async fn apply(
    app: &TestApp,
    id: &str,
    payload: pb::WorkloadPayload,
) -> Result<pb::ApplyWorkloadMigrationResponse, tonic::Status> {
    let request = pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: id.into(),
        payload: Some(payload),
        ..Default::default()
    };
    platform(app).gateway.apply_workload_migration(request).await.map(|r| r.into_inner())
}

fn change<'a>(changes: &'a [pb::MigrationChange], field: &str) -> &'a pb::MigrationChange {
    changes
        .iter()
        .find(|c| c.field == field)
        .unwrap_or_else(|| panic!("no change on {field}: {:?}", changes.iter().map(|c| &c.field).collect::<Vec<_>>()))
}

fn action(c: &pb::MigrationChange) -> pb::MigrationAction {
    pb::MigrationAction::try_from(c.action).unwrap()
}

fn origin(c: &pb::MigrationChange) -> pb::KeyOrigin {
    pb::KeyOrigin::try_from(c.origin).unwrap()
}

/// Each kind: the plan names each change on its field (a global fallback as
/// such, embedded placeholders left), stores nothing and shows no value;
/// the apply creates the proposed secrets; the migrated payload resolves to
/// exactly what the original did; a second apply changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_kind_is_planned_and_applied_and_resolves_to_the_same_values() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let owner = app.as_user(OWNER);
    let mut answers = Vec::new();
    for (name, payload) in payloads() {
        let before = resolved(&app, payload.clone()).await;
        let keys = owner.list(DOMAIN).await.unwrap();
        let planned = plan(&app, name, payload.clone()).await;
        assert!(planned.problems.is_empty(), "{name}: {:?}", planned.problems);
        assert_eq!(owner.list(DOMAIN).await.unwrap(), keys, "{name}: a plan stores nothing");
        answers.push(planned.encode_to_vec());
        match name {
            "compute" | "spark" | "streaming" | "sdk" => {
                let prefix = if name == "compute" { "" } else { "template." };
                let c = change(&planned.changes, &format!("{prefix}envVars[\"API_KEY\"]"));
                assert_eq!(
                    (action(c), origin(c)),
                    (pb::MigrationAction::MigrationPlaceholderToObject, pb::KeyOrigin::Domain)
                );
                let c = change(&planned.changes, &format!("{prefix}sparkConf[\"spark.smtp.password\"]"));
                assert_eq!(origin(c), pb::KeyOrigin::Global, "{name}: the global fallback is named");
                assert!(c.message.contains("falls back to the global secret"), "{}", c.message);
                let c = change(&planned.changes, &format!("{prefix}envVars[\"JDBC\"]"));
                assert_eq!(
                    (action(c), c.keys.clone()),
                    (pb::MigrationAction::MigrationEmbeddedInText, vec!["db_password".to_string()])
                );
                assert_eq!(planned.changes.len(), 3, "{name}: APP holds no placeholder");
            }
            "storage" => {
                let c = change(&planned.changes, "secretKey");
                assert_eq!(
                    (action(c), origin(c)),
                    (pb::MigrationAction::MigrationPlaintextToSecret, pb::KeyOrigin::New)
                );
                assert_eq!(planned.proposed_secrets[0].key, "storage_secret_key");
                let Some(Kind::StorageConfig(s)) = &planned.payload.as_ref().unwrap().kind else { panic!() };
                assert!(s.secret_key.is_empty(), "the plaintext is not in the rewritten payload");
                assert_eq!(s.storage_secret.as_ref().unwrap().key, "storage_secret_key");
            }
            "email" => assert_eq!(origin(change(&planned.changes, "smtpPassword")), pb::KeyOrigin::Global),
            "ldap" => assert_eq!(planned.proposed_secrets[0].key, "ldap_bind_password"),
            "storage-ref" => {
                // A placeholder in secretKey is resolved today: it becomes the
                // reference, never a new secret holding the placeholder's text.
                let c = change(&planned.changes, "secretKey");
                assert_eq!(
                    (action(c), origin(c)),
                    (pb::MigrationAction::MigrationPlaceholderToObject, pb::KeyOrigin::Domain)
                );
                assert!(planned.proposed_secrets.is_empty());
            }
            _ => assert_eq!(action(&planned.changes[0]), pb::MigrationAction::MigrationPlaceholderToObject),
        }

        let applied = apply(&app, name, payload.clone()).await.unwrap();
        assert!(applied.applied && applied.problems.is_empty(), "{name}: {:?}", applied.problems);
        assert_eq!(applied.payload, planned.payload, "{name}: the apply carries out the plan");
        assert!(!applied.index_updated, "{name} was never saved");
        answers.push(applied.encode_to_vec());
        let after = resolved(&app, applied.payload.clone().unwrap()).await;
        assert_eq!(after.payload, before.payload, "{name}: the migrated payload resolves to the same values");

        let again = apply(&app, name, payload).await.unwrap();
        assert!(again.applied && again.created_secrets.is_empty(), "{name}: {:?}", again.created_secrets);
        assert_eq!(again.payload, applied.payload, "{name}: a second apply changes nothing");
        let twice = apply(&app, name, applied.payload.clone().unwrap()).await.unwrap();
        assert!(
            twice.created_secrets.is_empty()
                && twice.changes.iter().all(|c| action(c) == pb::MigrationAction::MigrationEmbeddedInText),
            "{name}: a migrated payload has nothing left but embedded placeholders"
        );
        assert_eq!(twice.payload, applied.payload, "{name}: and stays as it is");
    }
    // The plaintext is in the store, and nowhere else.
    let items = vec![object_item("s", DOMAIN, "storage_secret_key"), object_item("l", DOMAIN, "ldap_bind_password")];
    let values = app.as_service(Some(&format!("user:{OWNER}"))).resolve(DOMAIN, items).await.unwrap();
    let values: Vec<_> = values
        .into_iter()
        .map(|v| match v.result {
            Some(pb::resolved_item::Result::Value(v)) => String::from_utf8(v).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(values, [CANARY, LDAP_CANARY]);
    for canary in [CANARY, LDAP_CANARY] {
        assert!(!answers.iter().any(|a| a.windows(canary.len()).any(|w| w == canary.as_bytes())), "an answer shows it");
        assert!(!logs::captured().contains(canary), "a log shows it");
        for path in app.written_files() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()), "{} holds it", path.display());
        }
    }
}

/// Names: a proposed secret may be named; a name that another secret with
/// another value holds is refused before anything changes; a storage
/// config whose storageSecret already wins just loses its plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposed_secrets_are_named_as_asked_and_never_overwrite_another_value() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let storage = |secret: Option<pb::SecretObject>| pb::WorkloadPayload {
        kind: Some(Kind::StorageConfig(pb::StorageConfigPayload { secret_key: CANARY.into(), storage_secret: secret })),
    };
    let named = pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: "lake".into(),
        payload: Some(storage(None)),
        secret_names: [("secretKey".to_string(), "db_password".to_string())].into(),
    };
    let err = platform(&app).gateway.apply_workload_migration(named.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("exists already with another value") && !err.message().contains(CANARY));
    let mut named = named;
    named.secret_names.insert("secretKey".into(), "lake_s3_secret".into());
    let applied = platform(&app).gateway.apply_workload_migration(named).await.unwrap().into_inner();
    assert_eq!(applied.created_secrets[0].key, "lake_s3_secret");

    let overridden =
        plan(&app, "lake2", storage(Some(integration_tests::payloads::secret_object(DOMAIN, "db_password")))).await;
    let c = change(&overridden.changes, "secretKey");
    assert_eq!(action(c), pb::MigrationAction::MigrationPlaintextRemoved);
    assert!(overridden.proposed_secrets.is_empty());

    // A name for a field that proposes nothing is refused, naming it.
    let misnamed = pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: "lake4".into(),
        payload: Some(storage(None)),
        secret_names: [("secret_key".to_string(), "x".to_string())].into(),
    };
    let err = platform(&app).gateway.apply_workload_migration(misnamed).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("secret_names[\"secret_key\"]") && err.message().contains("secretKey"),
        "{}",
        err.message()
    );

    // A user token never learns how an existing secret compares with a
    // guess: its second apply is refused the same way whatever the value.
    let by_user = |value: &str| pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: "directory".into(),
        payload: Some(pb::WorkloadPayload {
            kind: Some(Kind::LdapIntegration(pb::LdapIntegrationPayload { bind_password: Some(text(value)) })),
        }),
        ..Default::default()
    };
    let first = app.as_user(OWNER).gateway.apply_workload_migration(by_user(LDAP_CANARY)).await.unwrap().into_inner();
    assert_eq!(first.created_secrets[0].key, "directory_bind_password");
    let same = app.as_user(OWNER).gateway.apply_workload_migration(by_user(LDAP_CANARY)).await.unwrap_err();
    let other = app.as_user(OWNER).gateway.apply_workload_migration(by_user("a-guess")).await.unwrap_err();
    assert_eq!((same.code(), other.code()), (Code::FailedPrecondition, Code::FailedPrecondition));
    assert_eq!(same.message(), other.message(), "the answer does not depend on the value");

    // Creating secrets needs MANAGE_SECRETS: lisa may list, not manage.
    let request = pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: "lake3".into(),
        payload: Some(storage(None)),
        ..Default::default()
    };
    let err =
        app.as_service(Some(&format!("user:{LISTER}"))).gateway.apply_workload_migration(request).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(!app.as_user(OWNER).list(DOMAIN).await.unwrap().contains(&"lake3_secret_key".to_string()));
}

/// With features.secretsV2.enabled off, an apply is refused naming the
/// flag (the plan still shows what would change, with its problems).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_is_refused_while_secret_objects_are_off() {
    let app = TestApp::spawn_with(Options { secrets_v2_off: true, ..Default::default() }).await;
    setup(&app).await;
    let payload = payloads().remove(5).1;
    let err = apply(&app, "lake", payload.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("features.secretsV2.enabled"), "{}", err.message());
    assert!(!app.as_user(OWNER).list(DOMAIN).await.unwrap().contains(&"lake_secret_key".to_string()));
    let planned = plan(&app, "lake", payloads().remove(1).1).await;
    assert!(
        planned.problems.iter().all(|p| p.r#type == pb::ProblemType::ProblemFeatureDisabled as i32)
            && !planned.problems.is_empty(),
        "{:?}",
        planned.problems
    );
}

async fn save(app: &TestApp, id: &str, payload: pb::WorkloadPayload) {
    let request = pb::SaveWorkloadRequest {
        domain: DOMAIN.into(),
        id: id.into(),
        name: id.into(),
        payload: Some(payload),
        validate_only: false,
    };
    let saved = platform(app).gateway.save_workload(request).await.unwrap().into_inner();
    assert!(saved.saved, "{:?}", saved.problems);
}

async fn legacy(app: &TestApp) -> pb::ListLegacyReferencesResponse {
    let request = pb::ListLegacyReferencesRequest { domain: DOMAIN.into(), limit: 0 };
    app.as_user(LISTER).gateway.list_legacy_references(request).await.unwrap().into_inner()
}

fn count(report: &pb::ListLegacyReferencesResponse, kind: pb::WorkloadKind) -> Option<(u32, u32, u32, u32)> {
    report
        .counts
        .iter()
        .find(|c| c.kind == kind as i32)
        .map(|c| (c.saved, c.with_placeholders, c.with_plaintext, c.migrated))
}

/// The report counts what the index holds after saves, migrations and
/// deletes; each placeholder says whether it falls back to a global key;
/// a plaintext credential is named by its field, never its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_report_keeps_count_through_saves_migrations_and_deletes() {
    let app = TestApp::spawn().await;
    setup(&app).await;
    let all = payloads();
    let by_name = |n: &str| all.iter().find(|(name, _)| *name == n).unwrap().1.clone();
    save(&app, "etl", by_name("spark")).await;
    save(&app, "mail", by_name("email")).await;
    save(&app, "lake", by_name("storage")).await;
    let done = pb::WorkloadPayload {
        kind: Some(Kind::Compute(pb::ComputePayload {
            env_vars: map(&[("DB", object(DOMAIN, "db_password"))]),
            spark_conf: Default::default(),
        })),
    };
    save(&app, "cluster", done).await;
    // Another domain's legacy workload is not finance's.
    app.setup_domain(OTHER_DOMAIN).await;
    let other = pb::SaveWorkloadRequest {
        domain: OTHER_DOMAIN.into(),
        id: "mail".into(),
        name: String::new(),
        payload: Some(by_name("email")),
        validate_only: false,
    };
    let saved = app.as_service(Some(&format!("user:{OWNER}"))).gateway.save_workload(other).await.unwrap().into_inner();
    assert!(saved.saved, "{:?}", saved.problems);

    let report = legacy(&app).await;
    assert_eq!(report.total, 3);
    assert_eq!(count(&report, pb::WorkloadKind::SparkJob), Some((1, 1, 0, 0)));
    assert_eq!(count(&report, pb::WorkloadKind::EmailSettings), Some((1, 1, 0, 0)));
    assert_eq!(count(&report, pb::WorkloadKind::StorageConfig), Some((1, 0, 1, 0)));
    assert_eq!(count(&report, pb::WorkloadKind::Compute), Some((1, 0, 0, 1)));
    let etl = report.workloads.iter().find(|w| w.workload.as_ref().unwrap().id == "etl").unwrap();
    let origins: Vec<(String, String, i32)> =
        etl.placeholders.iter().map(|p| (p.field.clone(), p.key.clone(), p.origin)).collect();
    assert!(
        origins.contains(&("template.envVars[\"API_KEY\"]".into(), "api_key".into(), pb::KeyOrigin::Domain as i32)),
        "{origins:?}"
    );
    assert!(
        origins.contains(&(
            "template.sparkConf[\"spark.smtp.password\"]".into(),
            "smtp_password".into(),
            pb::KeyOrigin::Global as i32
        )),
        "{origins:?}"
    );
    let lake = report.workloads.iter().find(|w| w.workload.as_ref().unwrap().id == "lake").unwrap();
    assert_eq!(lake.plaintext_fields, ["secretKey"]);
    assert!(!report.encode_to_vec().windows(CANARY.len()).any(|w| w == CANARY.as_bytes()));

    // Migrated: the index holds its new references, and the report moves on.
    let applied = apply(&app, "etl", by_name("spark")).await.unwrap();
    assert!(applied.index_updated);
    let references = platform(&app)
        .gateway
        .get_workload_references(pb::GetWorkloadReferencesRequest {
            domain: DOMAIN.into(),
            kind: pb::WorkloadKind::SparkJob as i32,
            id: "etl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(references.workload.unwrap().name, "etl", "the name is kept");
    assert!(
        references.references.iter().all(|r| !r.placeholder || r.field.ends_with("[\"JDBC\"]")),
        "{:?}",
        references.references
    );
    let report = legacy(&app).await;
    assert_eq!(
        (report.total, count(&report, pb::WorkloadKind::SparkJob)),
        (3, Some((1, 1, 0, 0))),
        "JDBC's embedded placeholder stays"
    );
    // An operator (a platform admin) migrates the storage config: its record
    // keeps the platform service as its owner.
    let request = pb::ApplyWorkloadMigrationRequest {
        domain: DOMAIN.into(),
        id: "lake".into(),
        payload: Some(by_name("storage")),
        ..Default::default()
    };
    let applied = app.as_user(ADMIN).gateway.apply_workload_migration(request).await.unwrap().into_inner();
    assert!(applied.index_updated);
    let lake = platform(&app)
        .gateway
        .get_workload_references(pb::GetWorkloadReferencesRequest {
            domain: DOMAIN.into(),
            kind: pb::WorkloadKind::StorageConfig as i32,
            id: "lake".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((lake.owner.as_str(), lake.saved_by.as_str()), ("service:spark", "user:admin"));
    assert_eq!(lake.references[0].field, "storageSecret");
    let report = legacy(&app).await;
    assert_eq!((report.total, count(&report, pb::WorkloadKind::StorageConfig)), (2, Some((1, 0, 0, 1))));
    platform(&app)
        .gateway
        .delete_workload(pb::DeleteWorkloadRequest {
            domain: DOMAIN.into(),
            kind: pb::WorkloadKind::EmailSettings as i32,
            id: "mail".into(),
        })
        .await
        .unwrap();
    let report = legacy(&app).await;
    assert_eq!((report.total, count(&report, pb::WorkloadKind::EmailSettings)), (1, None));

    // The plaintext the index was told about is in no file: the index
    // holds the field's name only.
    for path in app.written_files() {
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()), "{} holds it", path.display());
    }
    // Each apply is in the audit trail, naming the workload.
    let request = pb::QueryAuditRecordsRequest {
        rpcs: vec!["ApplyWorkloadMigration".into()],
        domain: DOMAIN.into(),
        ..Default::default()
    };
    let records = app.as_user(ADMIN).gateway.query_audit_records(request).await.unwrap().into_inner().records;
    let ids: Vec<&str> = records.iter().map(|r| r.workload.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(ids, ["lake", "etl"], "newest first");
    assert!(
        records.iter().all(|r| r.detail.starts_with("migrated")),
        "{:?}",
        records.iter().map(|r| &r.detail).collect::<Vec<_>>()
    );

    // Every domain: platform admins only.
    let every = pb::ListLegacyReferencesRequest { domain: String::new(), limit: 0 };
    let err = app.as_user(OWNER).gateway.list_legacy_references(every.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let all = app.as_user(ADMIN).gateway.list_legacy_references(every).await.unwrap().into_inner();
    assert_eq!(all.total, 2, "finance's one and the other domain's");
}
