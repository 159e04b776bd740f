//! The audit trail: every resolution (allowed, denied, not found,
//! unavailable), SaveWorkload and management write recorded with who, what
//! and the outcome, never a value; logged on the `audit` target; queried by
//! platform admins and by domain owners for their domain; strict mode
//! refusing within its bound when the store cannot record, and recovering;
//! buffered mode counting what it drops and recording the gap.

use std::time::{Duration, Instant};

use integration_tests::{
    on_both_databases,
    payloads::{map, object, text},
    *,
};
use sea_orm::ConnectionTrait;
use secrets_proto::v1::{self as pb, AuditDecision, workload_payload::Kind};
use tonic::{Code, Request};

const CANARY: &str = "canary-audit-7f3a9c";

async fn query(
    clients: &Clients,
    request: pb::QueryAuditRecordsRequest,
) -> Result<pb::QueryAuditRecordsResponse, tonic::Status> {
    clients.gateway.clone().query_audit_records(request).await.map(|r| r.into_inner())
}

fn rpc(records: &[pb::AuditRecord], name: &str) -> Vec<pb::AuditRecord> {
    records.iter().filter(|r| r.rpc == name).cloned().collect()
}

fn decisions(record: &pb::AuditRecord) -> Vec<(String, AuditDecision)> {
    record.references.iter().map(|r| (r.key.clone(), AuditDecision::try_from(r.decision).unwrap())).collect()
}

async fn finance(app: &TestApp) {
    app.setup_domain("finance").await;
    app.as_user(OWNER).create("finance", "db_password", CANARY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resolution_and_write_is_recorded_with_who_what_and_the_outcome_never_a_value() {
    logs::init();
    let mut app = TestApp::spawn().await;
    finance(&app).await;
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let mut request = Request::new(pb::ResolveSecretsRequest {
        domain: "finance".into(),
        items: vec![
            object_item("db", "finance", "db_password"),
            object_item("missing", "finance", "no_such_key"),
            text_item("url", "jdbc://u:${secrets.db_password}@db"),
        ],
    });
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    request.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    let answer = spark.gateway.clone().resolve_secrets(request).await.unwrap().into_inner();
    assert_eq!(answer.items.len(), 3);
    // Denied: the platform service acting for someone with no grant.
    let stranger = app.as_service(Some(&format!("user:{STRANGER}")));
    stranger.resolve("finance", vec![object_item("db", "finance", "db_password")]).await.unwrap();
    // Unavailable: the secret-service is down.
    app.stop_secret_service().await;
    spark.resolve("finance", vec![object_item("db", "finance", "db_password")]).await.unwrap();
    app.start_secret_service().await;

    let admin = app.as_user(ADMIN);
    let all = query(&admin, pb::QueryAuditRecordsRequest { page_size: 1_000, ..Default::default() }).await.unwrap();
    let resolves = rpc(&all.records, "ResolveSecrets");
    assert_eq!(resolves.len(), 3, "{resolves:#?}");
    // Newest first.
    let (unavailable, denied, mixed) = (&resolves[0], &resolves[1], &resolves[2]);
    assert_eq!(mixed.caller, format!("service:{SPARK}"));
    assert_eq!(mixed.principal, format!("user:{OWNER}"));
    assert_eq!(mixed.domain, "finance");
    assert_eq!(mixed.trace_id, trace);
    assert_eq!(
        decisions(mixed),
        [
            ("db_password".to_string(), AuditDecision::AuditAllowed),
            ("no_such_key".to_string(), AuditDecision::AuditNotFound),
            ("db_password".to_string(), AuditDecision::AuditAllowed),
        ]
    );
    assert_eq!(mixed.references[2].item, "url");
    assert_eq!(denied.principal, format!("user:{STRANGER}"));
    assert_eq!(decisions(denied), [("db_password".to_string(), AuditDecision::AuditDenied)]);
    assert_eq!(decisions(unavailable), [("db_password".to_string(), AuditDecision::AuditUnavailable)]);
    let created = rpc(&all.records, "CreateSecret");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].decision, AuditDecision::AuditAllowed as i32);
    assert_eq!(created[0].principal, format!("user:{OWNER}"));
    assert_eq!(created[0].references[0].key, "db_password");
    assert!(!rpc(&all.records, "AddDomainMember").is_empty(), "grant changes are recorded");
    // A refused write is recorded too.
    let refused = app.as_user(LISTER).create("finance", "nope", "x").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let denied_writes = query(
        &admin,
        pb::QueryAuditRecordsRequest {
            rpcs: vec!["CreateSecret".into()],
            decision: AuditDecision::AuditDenied as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(denied_writes.records.len(), 1);
    assert!(denied_writes.records[0].detail.contains("may not"), "{:?}", denied_writes.records[0].detail);

    // Never a value: not in any record, the trail's database, or a log line.
    let everything = format!(
        "{:?}",
        query(&admin, pb::QueryAuditRecordsRequest { page_size: 1_000, ..Default::default() }).await.unwrap()
    );
    assert!(!everything.contains(CANARY));
    let file = std::fs::read(app.dir.path().join("audit.db")).unwrap();
    assert!(!String::from_utf8_lossy(&file).contains(CANARY), "the value is in the audit database");
    let logs = logs::eventually(&["\"target\":\"audit\""]).await;
    assert!(logs.contains("\"rpc\":\"ResolveSecrets\""), "records are logged on the audit target");
    assert!(!logs.contains(CANARY), "the value is in the logs");
}

on_both_databases!(the_trail_is_queried_by_admins_and_by_domain_owners_for_their_domain_only);

async fn the_trail_is_queried_by_admins_and_by_domain_owners_for_their_domain_only(app: TestApp) {
    finance(&app).await;
    // A request with ids past every column's size is refused and recorded
    // as far as they fit; the trail goes on.
    let long = "x".repeat(5_000);
    let spark_long = app.as_service(Some(&format!("user:{OWNER}")));
    let _ = spark_long.resolve(&long, vec![object_item(&long, &long, &long)]).await;
    app.setup_domain(OTHER_DOMAIN).await;
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let since = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() - 1, nanos: 0 };
    for _ in 0..3 {
        spark.resolve("finance", vec![object_item("db", "finance", "db_password")]).await.unwrap();
    }
    let job = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: "etl".into(),
        name: "etl".into(),
        payload: Some(pb::WorkloadPayload {
            kind: Some(Kind::SparkJob(pb::SparkJobPayload {
                template: Some(pb::EnvAndConf {
                    env_vars: map(&[("DB", object("finance", "db_password")), ("U", text("${secrets.db_password}"))]),
                    spark_conf: Default::default(),
                }),
            })),
        }),
        validate_only: false,
    };
    assert!(spark.gateway.clone().save_workload(job).await.unwrap().into_inner().saved);

    let owner = app.as_user(OWNER);
    // Who resolved db_password since T, as the domain's owner.
    let who = pb::QueryAuditRecordsRequest {
        domain: "finance".into(),
        from: Some(since),
        source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: "finance".into() }),
        key: "db_password".into(),
        rpcs: vec!["ResolveSecrets".into()],
        page_size: 2,
        ..Default::default()
    };
    let first = query(&owner, who.clone()).await.unwrap();
    assert_eq!(first.records.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second =
        query(&owner, pb::QueryAuditRecordsRequest { page_token: first.next_page_token.clone(), ..who.clone() })
            .await
            .unwrap();
    assert_eq!(second.records.len(), 1, "three resolves, paged 2 + 1");
    assert!(second.next_page_token.is_empty());
    let sequences: std::collections::BTreeSet<u64> =
        first.records.iter().chain(&second.records).map(|r| r.sequence).collect();
    assert_eq!(sequences.len(), 3, "no record twice");
    // What did the owner's workloads receive: by principal.
    let by_principal = query(
        &owner,
        pb::QueryAuditRecordsRequest {
            domain: "finance".into(),
            principal: format!("user:{OWNER}"),
            rpcs: vec!["ResolveSecrets".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_principal.records.len(), 3);
    // The workload's save.
    let saved = query(
        &owner,
        pb::QueryAuditRecordsRequest {
            domain: "finance".into(),
            workload: Some(pb::WorkloadRef {
                domain: "finance".into(),
                kind: pb::WorkloadKind::SparkJob as i32,
                id: "etl".into(),
                name: String::new(),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(saved.records.len(), 1);
    assert_eq!(saved.records[0].rpc, "SaveWorkload");
    assert_eq!(saved.records[0].references.len(), 2);

    // The last access of each secret, to the second.
    let last = owner
        .gateway
        .clone()
        .list_secret_last_access(pb::ListSecretLastAccessRequest { domain: "finance".into() })
        .await
        .unwrap()
        .into_inner();
    let db = last.secrets.iter().find(|s| s.key == "db_password").expect("db_password was resolved");
    let at = db.last_resolved.unwrap();
    assert_eq!(at.nanos, 0, "to the second");
    assert!(at.seconds >= since.seconds);
    assert_eq!(db.principal, format!("user:{OWNER}"));

    // Refused: a member who is no owner, another domain, everything without
    // being an admin, a lister.
    for (who, domain) in
        [(OUTSIDER, OTHER_DOMAIN), (OUTSIDER, "finance"), (OWNER, ""), (LISTER, "finance"), (STRANGER, "finance")]
    {
        let e = query(&app.as_user(who), pb::QueryAuditRecordsRequest { domain: domain.into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who} on {domain:?}: {e:?}");
    }
    let e = query(
        &owner,
        pb::QueryAuditRecordsRequest { domain: "finance".into(), page_size: 5_000, ..Default::default() },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("page_size"), "{}", e.message());
}

/// Holds the SQLite audit database's write lock, as a stuck writer would.
async fn hold_audit_database(app: &TestApp) -> sea_orm::DatabaseTransaction {
    use sea_orm::TransactionTrait;
    let url = format!("sqlite://{}?mode=rwc", app.dir.path().join("audit.db").display());
    let db = connect_database(&url).await.unwrap();
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("CREATE TABLE audit_lock_holder (x INTEGER)").await.unwrap();
    txn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_within_its_bound_when_the_store_cannot_record_and_recovers() {
    let app = TestApp::spawn().await;
    finance(&app).await;
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let held = hold_audit_database(&app).await;
    let started = Instant::now();
    let e = spark.resolve("finance", vec![object_item("db", "finance", "db_password")]).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit store (sqlite)"), "{}", e.message());
    // The bound is audit.record_timeout_ms (1 s); generous for a busy machine.
    assert!(took < Duration::from_secs(10), "a hang: {took:?}");
    // While the store fails, a management write is refused up front.
    let e = app.as_user(OWNER).create("finance", "while-failing", "v").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit store"), "{}", e.message());
    held.rollback().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match spark.resolve("finance", vec![object_item("db", "finance", "db_password")]).await {
            Ok(items) => {
                assert!(matches!(items[0].result, Some(pb::resolved_item::Result::Value(_))));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("never recovered: {e:?}"),
        }
    }
    assert!(
        !app.as_user(OWNER).list("finance").await.unwrap().contains(&"while-failing".to_string()),
        "the refused write changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_counts_what_it_drops_and_records_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("audit.db").display());
    let app = TestApp::spawn_with(Options {
        audit: Some(gateway::audit::AuditConfig {
            mode: gateway::audit::AuditMode::Buffered,
            database_url: url.clone(),
            buffer_size: 4,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    finance(&app).await;
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let db = connect_database(&url).await.unwrap();
    let held = {
        use sea_orm::TransactionTrait;
        let txn = db.begin().await.unwrap();
        txn.execute_unprepared("CREATE TABLE audit_lock_holder (x INTEGER)").await.unwrap();
        txn
    };
    for _ in 0..30 {
        // Answered at once: nothing waits for the store.
        spark.resolve("finance", vec![object_item("db", "finance", "db_password")]).await.unwrap();
    }
    let metrics = reqwest::get(app.metrics_url("gateway")).await.unwrap().text().await.unwrap();
    let dropped: u64 = metrics
        .lines()
        .find(|l| l.starts_with("secrets_audit_records_total{outcome=\"dropped\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("the dropped count is a metric");
    assert!(dropped > 0, "{metrics}");
    held.rollback().await.unwrap();

    let admin = app.as_user(ADMIN);
    let deadline = Instant::now() + Duration::from_secs(30);
    let gap = loop {
        let all = query(&admin, pb::QueryAuditRecordsRequest { page_size: 1_000, ..Default::default() }).await.unwrap();
        if let Some(gap) = all.records.iter().find(|r| r.rpc == "AuditGap").cloned() {
            let resolves = rpc(&all.records, "ResolveSecrets").len() as u64;
            assert_eq!(resolves + dropped, 30, "every resolve is recorded or counted as dropped");
            break gap;
        }
        assert!(Instant::now() < deadline, "no gap record");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(gap.decision, AuditDecision::AuditDropped as i32);
    assert!(gap.detail.starts_with(&format!("{dropped} records dropped")), "{}", gap.detail);
}

/// Records past `audit.retention_days` are deleted (a gateway prunes soon
/// after it starts, then every ten minutes); newer ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_the_retention_are_deleted() {
    let app = TestApp::spawn().await;
    finance(&app).await;
    let url = format!("sqlite://{}?mode=rwc", app.dir.path().join("audit.db").display());
    let db = connect_database(&url).await.unwrap();
    let old = chrono::Utc::now().timestamp_millis() - 400 * 24 * 3600 * 1000;
    db.execute_unprepared(&format!(
        "INSERT INTO audit_records (gateway, sequence, at_ms, rpc, caller, principal, domain, workload_kind, \
         workload_id, decision, trace_id, detail) VALUES ('gateway-old', 1, {old}, 'ResolveSecrets', 'service:spark', \
         'user:old', 'finance', '', '', 'ALLOWED', '', '')"
    ))
    .await
    .unwrap();
    let admin = app.as_user(ADMIN);
    let old_ones = || {
        let admin = admin.clone();
        async move {
            let request = pb::QueryAuditRecordsRequest { principal: "user:old".into(), ..Default::default() };
            query(&admin, request).await.unwrap().records.len()
        }
    };
    assert_eq!(old_ones().await, 1);
    // Another gateway on the same trail (retention 365 days) prunes it.
    let _pruner = app.another_gateway_with(|_| {}).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while old_ones().await > 0 {
        assert!(Instant::now() < deadline, "the record past the retention was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = query(&admin, pb::QueryAuditRecordsRequest { rpcs: vec!["CreateSecret".into()], ..Default::default() });
    assert_eq!(kept.await.unwrap().records.len(), 1, "newer records stay");
}
