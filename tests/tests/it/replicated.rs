//! The guarantees on a stack with two replicas of every service, each its
//! own process, on one PostgreSQL and one Kubernetes API server
//! (`ReplicatedStack`), with clients spread over both gateways.

use std::time::Duration;

use integration_tests::{replicated::ReplicatedStack, *};
use secrets_proto::v1::{self as pb, resolved_item::Result as R, workload_payload::Kind};
use tonic::Code;

/// The item's value, or the code it was refused with.
async fn resolved(clients: &Clients, key: &str) -> Result<Vec<u8>, Code> {
    let out = clients.resolve("finance", vec![object_item("x", "finance", key)]).await.expect("the resolve call");
    match &out[0].result {
        Some(R::Value(v)) => Ok(v.clone()),
        Some(R::Error(e)) => Err(Code::from_i32(e.code)),
        other => panic!("neither a value nor an error: {other:?}"),
    }
}

fn spark_job(key: &str) -> pb::WorkloadPayload {
    pb::WorkloadPayload {
        kind: Some(Kind::SparkJob(pb::SparkJobPayload {
            template: Some(pb::EnvAndConf {
                env_vars: payloads::map(&[("DB_PASSWORD", payloads::object("finance", key))]),
                spark_conf: Default::default(),
            }),
        })),
    }
}

/// Permissions, read-your-writes, revokes and delete protection, each
/// change made through one gateway (and whichever replicas it reaches) and
/// checked through the other.
#[tokio::test(flavor = "multi_thread")]
async fn every_guarantee_holds_across_two_replicas_of_every_service() {
    let Some(stack) = ReplicatedStack::start().await else { return };
    stack.setup_domain("finance").await;

    // Permissions: the same answers through either gateway.
    for gw in 0..2 {
        let key = format!("key_{gw}");
        stack.as_user(MANAGER, gw).create("finance", &key, "v").await.expect("a manager creates");
        let denied = stack.as_user(MEMBER, gw).create("finance", "nope", "v").await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        let listed = stack.as_user(LISTER, 1 - gw).list("finance").await.expect("a lister lists");
        assert!(listed.contains(&key), "{listed:?}");
        let outsider = stack.as_user(OUTSIDER, gw).list("finance").await.unwrap_err();
        assert_eq!(outsider.code(), Code::PermissionDenied);
    }

    // Read your writes: every update through one gateway is what the next
    // resolve through the other returns.
    stack.as_user(OWNER, 0).create("finance", "db_password", "v0").await.unwrap();
    for round in 1..=10 {
        let (write, read) = (round % 2, 1 - round % 2);
        let value = format!("v{round}");
        stack.as_user(OWNER, write).update("finance", "db_password", &value).await.unwrap();
        assert_eq!(
            resolved(&stack.as_service(MEMBER, read), "db_password").await,
            Ok(value.into_bytes()),
            "round {round}: the update through gateway {write} is resolved through gateway {read}"
        );
    }
    stack.as_user(OWNER, 1).delete("finance", "key_0").await.unwrap();
    assert_eq!(resolved(&stack.as_service(OWNER, 0), "key_0").await, Err(Code::NotFound));

    // Revokes: a removal through one gateway counts on the next resolve
    // through the other (each gateway holds a decision lease from its own
    // authz-service replica), and so does the membership given back.
    let nina = [stack.as_service(MEMBER, 0), stack.as_service(MEMBER, 1)];
    for round in 0..4 {
        let (change, check) = (round % 2, 1 - round % 2);
        let mut authz = stack.as_user(ADMIN, change).authz.clone();
        authz
            .remove_domain_member(pb::RemoveDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:{MEMBER}"),
            })
            .await
            .unwrap();
        assert_eq!(resolved(&nina[check], "db_password").await, Err(Code::PermissionDenied), "round {round}");
        authz
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: "finance".into(),
                subject: format!("user:{MEMBER}"),
                role: pb::DomainRole::Member as i32,
            })
            .await
            .unwrap();
        assert!(resolved(&nina[check], "db_password").await.is_ok(), "round {round}: given back");
    }

    // Delete protection: a workload saved through one gateway protects its
    // secret from a delete through the other.
    let request = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: "nightly".into(),
        name: "nightly".into(),
        payload: Some(spark_job("db_password")),
        validate_only: false,
    };
    let saved = stack.as_service(OWNER, 0).gateway.clone().save_workload(request).await.unwrap().into_inner();
    assert!(saved.saved, "{saved:?}");
    let refused = stack.as_user(OWNER, 1).delete("finance", "db_password").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("nightly"), "the refusal names the workload: {}", refused.message());
    stack.stop().await;
}

/// One replica of each service is killed (SIGKILL) while writes with
/// idempotency keys run through both gateways: calls that were on a killed
/// replica may fail, their retries (same request_id, through a gateway
/// that is alive) succeed, and every write that was acknowledged is there.
#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_of_each_service_under_load_loses_no_acknowledged_write() {
    let Some(mut stack) = ReplicatedStack::start().await else { return };
    stack.setup_domain("finance").await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let clients = [stack.as_user(OWNER, 0), stack.as_user(OWNER, 1)];
            tokio::spawn(async move {
                let (mut acknowledged, mut retried) = (Vec::new(), 0);
                let mut via = w % 2;
                for i in 0..40 {
                    let key = format!("k_{w}_{i}");
                    let request = pb::CreateSecretRequest {
                        scope: pb::Scope::Domain as i32,
                        domain: "finance".into(),
                        key: key.clone(),
                        value: Some(text_value(&format!("value-{w}-{i}"))),
                        request_id: format!("create-{w}-{i}"),
                    };
                    let mut attempt = 0;
                    loop {
                        // As a balancing client would: stay with a gateway
                        // until a call through it fails, then use the other.
                        match clients[via].secrets.clone().create_secret(request.clone()).await {
                            Ok(_) => break,
                            Err(status) => {
                                assert!(
                                    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown),
                                    "{key}: a failure a retry may fix, not {status:?}"
                                );
                                attempt += 1;
                                retried += 1;
                                assert!(attempt < 20, "{key}: still failing after {attempt} attempts: {status:?}");
                                via = 1 - via;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    acknowledged.push(key);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (acknowledged, retried)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stack.kill("secret-service", 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.kill("vault-config-service", 1);
    stack.kill("authz-service", 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.kill("gateway", 1);
    let mut acknowledged = Vec::new();
    let mut retried = 0;
    for writer in writers {
        let (keys, r) = writer.await.unwrap();
        acknowledged.extend(keys);
        retried += r;
    }
    assert_eq!(acknowledged.len(), 160, "every write was acknowledged in the end");
    // Every acknowledged write is there, through the surviving replicas.
    let listed = stack.as_user(OWNER, 0).list("finance").await.unwrap();
    for key in &acknowledged {
        assert!(listed.contains(key), "{key} was acknowledged and is missing");
    }
    assert_eq!(listed.iter().filter(|k| k.starts_with("k_")).count(), 160, "nothing twice, nothing extra");
    let spark = stack.as_service(OWNER, 0);
    assert_eq!(resolved(&spark, "k_3_39").await, Ok(b"value-3-39".to_vec()));
    // Four writers have at most four calls in flight when a replica dies;
    // four replicas die.
    assert!(retried <= 16, "only calls in flight on a killed replica failed: {retried} retries");
    eprintln!("{retried} calls were retried");
    stack.stop().await;
}
