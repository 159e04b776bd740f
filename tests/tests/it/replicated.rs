//! The guarantees on a stack with two replicas of every service, each its
//! own process, on one PostgreSQL and one Kubernetes API server
//! (`ReplicatedStack`), with clients spread over both gateways.

use std::time::Duration;

use integration_tests::{
    replicated::{NAMESPACE, ReplicatedStack},
    *,
};
use secrets_proto::v1::{self as pb, resolved_item::Result as R, workload_payload::Kind};
use tonic::Code;

/// The ReadSecrets calls a secret-service replica answered.
const READS: &str = r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.internal.v1.SecretReader",rpc_method="ReadSecrets",grpc_code="OK"}"#;

/// The item's value, or the code it was refused with.
async fn resolved(clients: &Clients, key: &str) -> Result<Vec<u8>, Code> {
    let out = clients.resolve("finance", vec![object_item("x", "finance", key)]).await.expect("the resolve call");
    match &out[0].result {
        Some(R::Value(v)) => Ok(v.clone()),
        Some(R::Error(e)) => Err(Code::from_i32(e.code)),
        other => panic!("neither a value nor an error: {other:?}"),
    }
}

fn token(t: &str) -> pb::VaultCredentials {
    pb::VaultCredentials { method: Some(pb::vault_credentials::Method::Token(t.into())) }
}

/// Bundle finance-vault (owned by the domain's owner, USE for nina), two
/// secrets in OpenBao, and config "prod" reading secret/production with
/// `with_token`, created through gateway 0.
async fn vault_config(stack: &ReplicatedStack, bao: &openbao::OpenBao, with_token: &str) -> pb::VaultConfig {
    let mut authz = stack.as_user(ADMIN, 0).authz.clone();
    authz
        .create_bundle(pb::CreateBundleRequest {
            name: "finance-vault".into(),
            description: String::new(),
            owner: format!("user:{OWNER}"),
        })
        .await
        .unwrap();
    authz
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: "finance-vault".into(),
            subject: format!("user:{MEMBER}"),
            permission: pb::Permission::Use as i32,
        })
        .await
        .unwrap();
    bao.bao(&["kv", "put", "secret/production", "db_password=pw-production"]);
    bao.bao(&["kv", "put", "secret/staging", "db_password=pw-staging"]);
    stack
        .as_user(OWNER, 0)
        .vault
        .clone()
        .create_vault_config(pb::CreateVaultConfigRequest {
            domain: "finance".into(),
            bundle: "finance-vault".into(),
            spec: Some(pb::VaultConfigSpec {
                name: "prod".into(),
                host: bao.addr.clone(),
                path: "/v1/secret/data/production".into(),
                credentials: Some(token(with_token)),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
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
    // resolve through the other returns, even while no watch delivers
    // anything (only the replicas' own coordination brings the copies
    // forward); reads are spread over both secret-service replicas.
    stack.as_user(OWNER, 0).create("finance", "db_password", "v0").await.unwrap();
    let reads = |stack: &ReplicatedStack| {
        let ports: Vec<u16> = (0..2).map(|r| stack.metrics[&("secret-service", r)]).collect();
        async move {
            let mut served = Vec::new();
            for port in ports {
                let text = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
                served.push(sample(&text, READS));
            }
            served
        }
    };
    let before = reads(&stack).await;
    stack.kube.hold_events(true);
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
    stack.kube.hold_events(false);
    let after = reads(&stack).await;
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "both secret-service replicas answered resolves: {before:?} -> {after:?}"
    );

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
    // The replica that gives gateway 1 its lease is cut off from the
    // database, so it learns of no change: a revoke through the other
    // returns only once gateway 1 can no longer answer from before it
    // (then it fails closed until the replica is back).
    assert!(resolved(&nina[1], "db_password").await.is_ok(), "remembered under gateway 1's lease");
    stack.authz_database(1).freeze();
    let removal = pb::RemoveDomainMemberRequest { domain: "finance".into(), subject: format!("user:{MEMBER}") };
    stack.authz_direct(0).remove_domain_member(removal).await.unwrap();
    // Refused, or unavailable (the call or the item): never the value.
    let after = nina[1].resolve("finance", vec![object_item("x", "finance", "db_password")]).await;
    let leaked = after.as_ref().is_ok_and(|items| matches!(items[0].result, Some(R::Value(_))));
    assert!(!leaked, "gateway 1 answered from before the revoke: {after:?}");
    stack.authz_database(1).thaw();
    let back = pb::AddDomainMemberRequest {
        domain: "finance".into(),
        subject: format!("user:{MEMBER}"),
        role: pb::DomainRole::Member as i32,
    };
    stack.authz_direct(0).add_domain_member(back).await.unwrap();
    let mut recovered = false;
    for _ in 0..300 {
        let out = nina[1].resolve("finance", vec![object_item("x", "finance", "db_password")]).await;
        if out.is_ok_and(|items| matches!(items[0].result, Some(R::Value(_)))) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "gateway 1 resolves again once its replica is back");

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
/// idempotency keys and Vault resolves run through both gateways: calls
/// that were on a killed replica may fail, their retries (same request_id,
/// through a gateway that is alive) succeed, and every write that was
/// acknowledged is there.
#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_of_each_service_under_load_loses_no_acknowledged_write() {
    let Some(mut stack) = ReplicatedStack::start().await else { return };
    stack.setup_domain("finance").await;
    let bao = openbao::OpenBao::start();
    let config = vault_config(&stack, &bao, &bao.root_token).await;
    // Resolves of a Vault item run beside the writes, through both gateways.
    let resolvers: Vec<_> = (0..2)
        .map(|r| {
            let clients = [stack.as_service(MEMBER, 0), stack.as_service(MEMBER, 1)];
            let id = config.id.clone();
            tokio::spawn(async move {
                let (mut via, mut failed) = (r, 0);
                for _ in 0..150 {
                    let mut attempt = 0;
                    loop {
                        let out = clients[via].resolve("finance", vec![vault_item("x", &id, "db_password")]).await;
                        let failure = match out.as_ref().map(|items| &items[0].result) {
                            Ok(Some(R::Value(v))) => {
                                assert_eq!(v, b"pw-production");
                                break;
                            }
                            Ok(Some(R::Error(e))) => format!("{:?}: {}", Code::from_i32(e.code), e.message),
                            Ok(other) => panic!("{other:?}"),
                            // The connection to a gateway that died (hyper
                            // reports a call cut off mid-flight as cancelled).
                            Err(status) if matches!(status.code(), Code::Unknown | Code::Cancelled) => {
                                format!("Unavailable: {status:?}")
                            }
                            Err(status) => format!("{status:?}"),
                        };
                        assert!(
                            failure.contains("Unavailable") || failure.contains("DeadlineExceeded"),
                            "a failure a retry may fix, not {failure}"
                        );
                        failed += 1;
                        attempt += 1;
                        assert!(attempt < 20, "a Vault resolve still failing after {attempt} attempts: {failure}");
                        via = 1 - via;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                failed
            })
        })
        .collect();
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
                                    matches!(
                                        status.code(),
                                        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
                                    ),
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
    let mut resolves_failed = 0;
    for resolver in resolvers {
        resolves_failed += resolver.await.unwrap();
    }
    // Two resolvers, at most one call each in flight on a replica that dies.
    assert!(resolves_failed <= 8, "only resolves in flight on a killed replica failed: {resolves_failed}");
    assert_eq!(acknowledged.len(), 160, "every write was acknowledged in the end");
    // Every acknowledged write is there, through the surviving replicas.
    let listed = stack.as_user(OWNER, 0).list("finance").await.unwrap();
    for key in &acknowledged {
        assert!(listed.contains(key), "{key} was acknowledged and is missing");
    }
    assert_eq!(listed.iter().filter(|k| k.starts_with("k_")).count(), 160, "nothing twice, nothing extra");
    // The value resolves through the survivors; the first call may still
    // meet a connection to a killed replica that the gateway has not
    // dropped yet (the point here is that nothing acknowledged was lost).
    let spark = stack.as_service(OWNER, 0);
    let mut answer = resolved(&spark, "k_3_39").await;
    for _ in 0..40 {
        if answer != Err(Code::Unavailable) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = resolved(&spark, "k_3_39").await;
    }
    assert_eq!(answer, Ok(b"value-3-39".to_vec()));
    // Four writers have at most four calls in flight when a replica dies;
    // four replicas die.
    assert!(retried <= 16, "only calls in flight on a killed replica failed: {retried} retries");
    eprintln!("{retried} calls were retried");
    stack.stop().await;
}

/// Vault configs across replicas: a config created through one gateway
/// resolves through the other; after its credentials are replaced (and the
/// old token revoked) or its path changed through one gateway, no replica
/// resolves with the old ones, even while the credentials' store objects
/// reach no replica by its watch; after a delete, none resolves it.
#[tokio::test(flavor = "multi_thread")]
async fn vault_configs_and_their_credentials_stay_coherent_across_replicas() {
    let Some(stack) = ReplicatedStack::start().await else { return };
    let bao = openbao::OpenBao::start();
    stack.setup_domain("finance").await;
    let first_token = bao.field(&["token", "create", "-policy=root"], "token");
    let config = vault_config(&stack, &bao, &first_token).await;
    let nina = [stack.as_service(MEMBER, 0), stack.as_service(MEMBER, 1)];
    let vault = |clients: &Clients| {
        let clients = clients.clone();
        let id = config.id.clone();
        async move {
            let out = clients.resolve("finance", vec![vault_item("x", &id, "db_password")]).await.expect("the call");
            match &out[0].result {
                Some(R::Value(v)) => Ok(String::from_utf8(v.clone()).unwrap()),
                Some(R::Error(e)) => Err((Code::from_i32(e.code), e.message.clone())),
                other => panic!("{other:?}"),
            }
        }
    };
    // Both vault-config-service replicas have connected with the first
    // token and hold the value (calls spread over both).
    for _ in 0..10 {
        for clients in &nina {
            assert_eq!(vault(clients).await, Ok("pw-production".to_string()));
        }
    }
    stack.kube.hold_events(true);
    let second_token = bao.field(&["token", "create", "-policy=root"], "token");
    let mut owner = stack.as_user(OWNER, 1).vault.clone();
    owner
        .update_vault_config(pb::UpdateVaultConfigRequest {
            id: config.id.clone(),
            credentials: Some(token(&second_token)),
            path: Some("/v1/secret/data/staging".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    bao.bao(&["token", "revoke", &first_token]);
    for _ in 0..10 {
        for clients in &nina {
            assert_eq!(vault(clients).await, Ok("pw-staging".to_string()), "the new path, with the new token");
        }
    }
    owner.delete_vault_config(pb::DeleteVaultConfigRequest { id: config.id.clone(), force: false }).await.unwrap();
    // Every vault-config-service replica has forgotten it, asked directly
    // as the gateway asks (not behind the authz-service's answer).
    for replica in 0..2 {
        use secrets_proto::internal::v1::{self as internal, vault_reader_client::VaultReaderClient};
        let port = stack.ports["vault-config-service"][replica];
        let mut reader = VaultReaderClient::new(channel(&format!("http://127.0.0.1:{port}")));
        let mut request = tonic::Request::new(internal::ListDomainVaultConfigsRequest { domain: "finance".into() });
        let bearer = format!("Bearer {}", stack.internal_token());
        request.metadata_mut().insert("authorization", bearer.parse().unwrap());
        let listed = reader.list_domain_vault_configs(request).await.unwrap().into_inner().configs;
        assert!(listed.iter().all(|c| c.id != config.id), "replica {replica} still lists it: {listed:?}");
    }
    for clients in &nina {
        // Its bundle placement went with it: refused as for any resource
        // outside the caller's grants.
        let (code, _) = vault(clients).await.unwrap_err();
        assert_eq!(code, Code::PermissionDenied, "no replica resolves a deleted config");
    }
    stack.kube.hold_events(false);
    stack.stop().await;
}

/// The change feed and the audit trail across two replicas of every
/// service: a watcher on one gateway sees every change made through either
/// gateway and the one made with kubectl, each once, in revision order, and
/// resumes on the other gateway with its cursor; the audit records of both
/// gateways are one trail.
#[tokio::test(flavor = "multi_thread")]
async fn the_change_feed_and_the_audit_trail_span_every_replica() {
    let Some(stack) = ReplicatedStack::start().await else { return };
    stack.setup_domain("finance").await;
    stack.as_user(OWNER, 0).create("finance", "db_password", "v0").await.unwrap();
    let spark = stack.as_service(OWNER, 0);
    let job = pb::SaveWorkloadRequest {
        domain: "finance".into(),
        id: "etl".into(),
        name: "etl".into(),
        payload: Some(spark_job("db_password")),
        validate_only: false,
    };
    assert!(spark.gateway.clone().save_workload(job).await.unwrap().into_inner().saved);

    let platform = |gw: usize| Clients::new(&stack.gateways[gw], Some(stack.token(SPARK)), None);
    let watch = |gw: usize, after: u64| {
        let clients = platform(gw);
        async move {
            let request = pb::WatchSecretChangesRequest { after_revision: after, ..Default::default() };
            clients.gateway.clone().watch_secret_changes(request).await.unwrap().into_inner()
        }
    };
    let mut stream = watch(0, 0).await;
    let mut expected = Vec::new();
    for round in 1..=6 {
        let gw = round % 2;
        let reach =
            stack.as_user(OWNER, gw).update("finance", "db_password", &format!("v{round}")).await.unwrap().reach;
        let reach = reach.expect("the update's reach");
        assert_eq!(reach.workloads.len(), 1, "{reach:?}");
        expected.push(reach.revision);
    }
    stack.kube.edit(NAMESPACE, "iomete-secret-store-finance", |s| {
        s.data.as_mut().unwrap().insert("db_password".into(), k8s_openapi::ByteString(b"from-kubectl".to_vec()));
    });
    let mut seen = Vec::new();
    let mut cursor = 0;
    for _ in 0..4 {
        let (c, change) = next_change(&mut stream).await;
        seen.push(change.revision);
        cursor = c;
    }
    drop(stream);
    // The rest through the other gateway, from the cursor.
    let mut stream = watch(1, cursor).await;
    let mut store_edits = 0;
    while seen.len() < 7 {
        let (_, change) = next_change(&mut stream).await;
        if change.origin == pb::ChangeOrigin::Store as i32 {
            store_edits += 1;
        }
        seen.push(change.revision);
    }
    assert_eq!(&seen[..6], &expected[..], "every API change once, in order, across the reconnect");
    assert_eq!(store_edits, 1, "the kubectl edit once, though both secret-service replicas watch");
    let quiet = tokio::time::timeout(Duration::from_secs(4), next_change(&mut stream)).await;
    assert!(quiet.is_err(), "a change came twice: {quiet:?}");

    // One trail: the records of both gateways, through either.
    let admin = stack.as_user(ADMIN, 1);
    let query = pb::QueryAuditRecordsRequest { rpcs: vec!["UpdateSecret".into()], ..Default::default() };
    let records = admin.gateway.clone().query_audit_records(query).await.unwrap().into_inner().records;
    assert_eq!(records.len(), 6);
    let gateways: std::collections::BTreeSet<&str> = records.iter().map(|r| r.gateway.as_str()).collect();
    assert_eq!(gateways.len(), 2, "{gateways:?}");
}

/// The next change on a watch, skipping the caught-up markers.
async fn next_change(stream: &mut tonic::Streaming<pb::WatchSecretChangesResponse>) -> (u64, pb::SecretChange) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(pb::watch_secret_changes_response::Event::Change(c)) = m.event {
            return (m.cursor, c);
        }
    }
}
