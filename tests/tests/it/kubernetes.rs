//! What only the Kubernetes backend has: the API server's optimistic
//! concurrency, Secrets written by other tools, and outages.

use std::{collections::BTreeMap, sync::Arc};

use integration_tests::stores::{Fixture, NAMESPACE, PREFIX};
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use secret_service::{
    Error, KubernetesConfig,
    backend::BackendError,
    backend::SecretBackend,
    kubernetes::{KubernetesBackend, MANAGED_BY_LABEL, TIMESTAMPS_ANNOTATION},
    store::{Scope, SecretStore},
};
use secrets_common::SecretValue;

fn finance() -> Scope {
    Scope::domain("domain", "finance").unwrap()
}

#[tokio::test]
async fn replicas_writing_at_once_retry_on_conflict_and_lose_no_key() {
    let f = Fixture::kubernetes().await;
    let kube = f.kube.clone().unwrap();
    // Four replicas, each with its own client: their writes race at the API server.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(SecretStore::new(f.another().await, PREFIX));
    }
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = stores[i % 4].clone();
            tokio::spawn(
                async move { store.create(&finance(), &format!("k{i}"), SecretValue::from(format!("v{i}"))).await },
            )
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let secret = kube.secret(NAMESPACE, &format!("{PREFIX}-finance")).unwrap();
    assert_eq!(secret.data.unwrap().len(), 200);
    let c = kube.counters();
    assert!(c.conflicts > 0, "the replicas really raced: {c:?}");
    assert_eq!(c.unconditional_puts, 0, "every PUT carried the resourceVersion it read: {c:?}");
}

#[tokio::test]
async fn writes_are_opaque_labelled_and_keep_timestamps_in_an_annotation() {
    let f = Fixture::kubernetes().await;
    f.store().create(&finance(), "db_password", SecretValue::from("pw".to_string())).await.unwrap();
    let secret = f.kube.as_ref().unwrap().secret(NAMESPACE, &format!("{PREFIX}-finance")).unwrap();
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(secret.data.unwrap()["db_password"].0, b"pw");
    assert_eq!(secret.metadata.labels.unwrap()[MANAGED_BY_LABEL.0], MANAGED_BY_LABEL.1);
    let times = &secret.metadata.annotations.unwrap()[TIMESTAMPS_ANNOTATION];
    assert!(times.contains("db_password"), "{times}");
    assert!(!times.contains("pw\""), "the annotation holds times, not values: {times}");
}

#[tokio::test]
async fn secrets_written_by_other_tools_are_read_and_kept() {
    let f = Fixture::kubernetes().await;
    let kube = f.kube.as_ref().unwrap();
    let mut annotations = BTreeMap::new();
    annotations.insert("owner".to_string(), "helm".to_string());
    kube.insert(
        NAMESPACE,
        Secret {
            metadata: ObjectMeta { name: Some(PREFIX.into()), annotations: Some(annotations), ..Default::default() },
            data: Some([("legacy_key".to_string(), ByteString(b"legacy".to_vec()))].into()),
            ..Default::default()
        },
    );
    let store = f.store();
    let listed = store.list(&Scope::Global).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "legacy_key");
    store.create(&Scope::Global, "new_key", SecretValue::from("n".to_string())).await.unwrap();
    let secret = kube.secret(NAMESPACE, PREFIX).unwrap();
    assert_eq!(secret.data.unwrap().len(), 2, "the legacy key is kept");
    assert_eq!(secret.metadata.annotations.unwrap()["owner"], "helm", "foreign annotations are kept");
}

#[tokio::test]
async fn an_api_server_outage_is_unavailable_naming_kubernetes_and_recovers() {
    let f = Fixture::kubernetes().await;
    let kube = f.kube.as_ref().unwrap();
    let store = f.store();
    kube.set_failing(Some(503));
    let err = store.create(&finance(), "k", SecretValue::from("v".to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Unavailable { backend: "kubernetes", .. })), "{err:?}");
    assert!(err.to_string().starts_with("kubernetes: "), "{err}");
    let err = store.list(&finance()).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Unavailable { .. })), "{err:?}");
    kube.set_failing(None);
    store.create(&finance(), "k", SecretValue::from("v".to_string())).await.unwrap();
    assert_eq!(store.list(&finance()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_write_the_api_server_rejects_is_refused_with_its_reason_and_loses_nothing() {
    let f = Fixture::kubernetes().await;
    let kube = f.kube.as_ref().unwrap();
    let store = f.store();
    store.create(&finance(), "kept", SecretValue::from("v".to_string())).await.unwrap();
    let reason = "ValidatingAdmissionPolicy 'secret-size' with binding 'prod' denied request: too many keys";
    kube.deny_writes(Some(reason));
    let err = store.create(&finance(), "new", SecretValue::from("v".to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Rejected { backend: "kubernetes", .. })), "{err:?}");
    assert!(err.to_string().contains(reason), "the server's reason reaches the caller: {err}");
    assert!(err.to_string().contains(&format!("{PREFIX}-finance")), "names the object: {err}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    kube.deny_writes(None);
    let keys: Vec<_> = store.list(&finance()).await.unwrap().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["kept"]);
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_a_panic() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = KubernetesBackend::client(Some("http://127.0.0.1:9"), NAMESPACE, std::time::Duration::from_secs(2))
        .await
        .unwrap();
    let backend: Arc<SecretBackend> = Arc::new(KubernetesBackend::new(client, NAMESPACE));
    let err = backend.read("anything").await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Unavailable { backend: "kubernetes", .. })), "{err:?}");
    let err = KubernetesBackend::client(Some("not a url"), NAMESPACE, std::time::Duration::from_secs(2))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("kubernetes.api_url"), "{err}");
}

/// Runs against a real cluster when KUBECONFIG is set (in the namespace
/// named by SECRETS_TEST_NAMESPACE, default `default`); prints why it did
/// nothing otherwise.
#[tokio::test]
async fn real_cluster_round_trip_when_kubeconfig_is_set() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG is not set: not running against a real cluster");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let namespace = std::env::var("SECRETS_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client =
        KubernetesBackend::client(None, &namespace, std::time::Duration::from_secs(10)).await.expect("cluster client");
    let prefix = format!("secrets-it-{}", uuid::Uuid::new_v4().simple());
    let store = SecretStore::new(Arc::new(KubernetesBackend::new(client.clone(), &namespace)), prefix.clone());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(
                async move { store.create(&finance(), &format!("k{i}"), SecretValue::from(format!("v{i}"))).await },
            )
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.list(&finance()).await.unwrap().len(), 20);
    let api: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    api.delete(&format!("{prefix}-finance"), &Default::default()).await.expect("clean up");
}

/// The value resolved for `key` in finance.
async fn resolved(store: &SecretStore, key: &str) -> Option<Vec<u8>> {
    let lookup = secret_service::store::Lookup { scope: finance(), key: key.into(), global_fallback: false };
    store.read_values(&[lookup]).await.unwrap().remove(0).map(|f| f.value.expose().to_vec())
}

/// Waits (up to 5 s) until `key` resolves to `want`.
async fn eventually(store: &SecretStore, key: &str, want: Option<&[u8]>) {
    for _ in 0..500 {
        if resolved(store, key).await.as_deref() == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{key} never resolved to {want:?}");
}

/// An out-of-band edit, as `kubectl edit secret` makes it.
fn kubectl_set(kube: &integration_tests::kube_server::FakeKube, key: &str, value: &str) {
    kube.edit(NAMESPACE, &format!("{PREFIX}-finance"), |s| {
        s.data.get_or_insert_with(BTreeMap::new).insert(key.into(), ByteString(value.as_bytes().to_vec()));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_objects_resolve_from_memory_and_see_every_write_and_edit() {
    let f = Fixture::kubernetes_watching().await;
    let kube = f.kube.clone().unwrap();
    let store = f.store();
    store.create(&finance(), "k", SecretValue::from("v1".to_string())).await.unwrap();
    // Read your own writes: the next call sees it, before any watch event.
    for i in 2..50 {
        let value = format!("v{i}");
        store.update(&finance(), "k", SecretValue::from(value.clone())).await.unwrap();
        assert_eq!(resolved(&store, "k").await.as_deref(), Some(value.as_bytes()), "write {i}");
    }
    eventually(&store, "k", Some(b"v49")).await;

    // Steady state: resolves send nothing to the API server.
    let before = kube.counters();
    for _ in 0..200 {
        assert_eq!(resolved(&store, "k").await.as_deref(), Some(&b"v49"[..]));
    }
    let after = kube.counters();
    assert_eq!((after.gets, after.lists, after.watches), (before.gets, before.lists, before.watches), "200 resolves");

    // Edited with kubectl: resolved new once the watch event arrives.
    kubectl_set(&kube, "k", "from-kubectl");
    eventually(&store, "k", Some(b"from-kubectl")).await;
    // A deleted key is never served from memory.
    store.delete(&finance(), "k").await.unwrap();
    assert_eq!(resolved(&store, "k").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_drops_or_expires_misses_no_change() {
    integration_tests::logs::init();
    let f = Fixture::kubernetes_watching().await;
    let kube = f.kube.clone().unwrap();
    let store = f.store();
    store.create(&finance(), "k", SecretValue::from("v1".to_string())).await.unwrap();
    eventually(&store, "k", Some(b"v1")).await;

    // The connection drops: the next watch resumes from the last version.
    let watches = kube.counters().watches;
    kube.drop_watches();
    kubectl_set(&kube, "k", "after-drop");
    eventually(&store, "k", Some(b"after-drop")).await;
    assert!(kube.counters().watches > watches, "a new watch was opened");

    // The API server is unreachable while the object changes and its
    // history is compacted: the resumed watch gets 410 Gone, and a new list
    // brings the change.
    kube.set_failing(Some(503));
    kube.drop_watches();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    kubectl_set(&kube, "k", "while-away");
    kube.compact();
    let lists = kube.counters().lists;
    kube.set_failing(None);
    eventually(&store, "k", Some(b"while-away")).await;
    for _ in 0..500 {
        if kube.counters().lists > lists {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(kube.counters().lists > lists, "the store objects were listed again");
    // ...and memory answers again (while it could not, reads went to the API server).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let gets = kube.counters().gets;
    assert_eq!(resolved(&store, "k").await.as_deref(), Some(&b"while-away"[..]));
    assert_eq!(kube.counters().gets, gets, "served from memory after the relist");

    // A watch that lagged behind a compaction resumes from a version that
    // is gone: 410, and a new list brings what it missed.
    kube.hold_events(true);
    kubectl_set(&kube, "k", "after-410");
    kube.compact();
    kube.drop_watches();
    kube.hold_events(false);
    eventually(&store, "k", Some(b"after-410")).await;
    assert!(
        integration_tests::logs::captured().contains("the watch's version was compacted away; listing again"),
        "the 410 and the relist are logged"
    );
}

/// Two store services sharing a namespace: each labels its objects with
/// its component and lists and watches only those, so neither mirrors the
/// other's; objects written before components were labelled are labelled
/// by their owner when it starts.
#[tokio::test]
async fn each_store_service_watches_only_its_own_objects_and_adopts_its_unlabelled_ones() {
    use integration_tests::kube_server::FakeKube;
    use secret_service::kubernetes::COMPONENT_LABEL;
    let kube = FakeKube::start().await;
    let legacy = |name: &str| Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.0.to_string(), MANAGED_BY_LABEL.1.to_string())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), ByteString(b"v".to_vec()))])),
        ..Default::default()
    };
    kube.insert(NAMESPACE, legacy("iomete-secret-store-finance"));
    kube.insert(NAMESPACE, legacy("iomete-vault-credentials-finance"));
    kube.insert(NAMESPACE, legacy("someone-elses-object"));

    let kubernetes = KubernetesConfig {
        namespace: Some(NAMESPACE.into()),
        api_url: Some(kube.url.clone()),
        timeout_ms: 5_000,
        watch: true,
        ..Default::default()
    };
    let secrets_config = secret_service::Config {
        backend: Some(secret_service::BackendKind::Kubernetes),
        kubernetes: kubernetes.clone(),
        ..Default::default()
    };
    let vault_config = vault_config_service::Config {
        backend: Some(secret_service::BackendKind::Kubernetes),
        kubernetes,
        ..Default::default()
    };
    let secrets = secrets_config.store().open::<Error>().await.unwrap();
    let credentials = vault_config.store().open::<vault_config_service::Error>().await.unwrap();

    let component = |name: &str| {
        kube.secret(NAMESPACE, name).and_then(|s| s.metadata.labels.unwrap_or_default().get(COMPONENT_LABEL).cloned())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while component("iomete-secret-store-finance").is_none() || component("iomete-vault-credentials-finance").is_none()
    {
        assert!(std::time::Instant::now() < deadline, "the old objects were never labelled: {:?}", kube.counters());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(component("iomete-secret-store-finance").as_deref(), Some("secret-store"));
    assert_eq!(component("iomete-vault-credentials-finance").as_deref(), Some("vault-credentials"));
    assert_eq!(component("someone-elses-object"), None, "an object of neither prefix is left alone");

    // New writes carry the writer's component.
    fn add<E>(entries: &mut secret_service::backend::Entries) -> Result<(), E> {
        let now = chrono::Utc::now();
        let value = SecretValue::from("v".to_string());
        entries.insert("new".into(), secret_service::backend::Entry { value, created_at: now, updated_at: now });
        Ok(())
    }
    secrets.modify("iomete-secret-store-sales", &mut add).await.unwrap();
    credentials.modify("iomete-vault-credentials-sales", &mut add).await.unwrap();
    assert_eq!(component("iomete-secret-store-sales").as_deref(), Some("secret-store"));
    assert_eq!(component("iomete-vault-credentials-sales").as_deref(), Some("vault-credentials"));
    // Both read their own, old and new.
    assert!(secrets.read("iomete-secret-store-finance").await.unwrap().is_some());
    assert!(credentials.read("iomete-vault-credentials-finance").await.unwrap().is_some());

    // What each watch was sent: only its own service's objects.
    let sent_to = |component: &str| -> std::collections::BTreeSet<String> {
        let wanted = format!("{COMPONENT_LABEL}={component}");
        kube.counters().delivered.iter().filter(|(sel, _)| sel.contains(&wanted)).flat_map(|(_, n)| n.clone()).collect()
    };
    while !sent_to("secret-store").contains("iomete-secret-store-sales")
        || !sent_to("vault-credentials").contains("iomete-vault-credentials-sales")
    {
        assert!(std::time::Instant::now() < deadline, "the watches never saw the writes: {:?}", kube.counters());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let delivered = kube.counters().delivered;
    assert!(delivered.keys().all(|sel| sel.contains(COMPONENT_LABEL)), "a watch without a component: {delivered:?}");
    let secret_store = sent_to("secret-store");
    let vault_credentials = sent_to("vault-credentials");
    assert!(secret_store.iter().all(|n| n.starts_with("iomete-secret-store")), "{secret_store:?}");
    assert!(vault_credentials.iter().all(|n| n.starts_with("iomete-vault-credentials")), "{vault_credentials:?}");
}

/// A write the API server took but did not answer in time may have landed:
/// it is DEADLINE_EXCEEDED saying so (never UNAVAILABLE, which means
/// nothing was written), and a retry with the same request_id is answered
/// with the first outcome instead of ALREADY_EXISTS. A write that never
/// reached a server stays UNAVAILABLE.
#[tokio::test]
async fn a_write_the_api_server_took_but_did_not_answer_is_deadline_exceeded_and_safe_to_retry() {
    use secret_service::store::Mode;
    let f = Fixture::kubernetes().await;
    let kube = f.kube.clone().unwrap();
    let client =
        KubernetesBackend::client(Some(&kube.url), NAMESPACE, std::time::Duration::from_millis(500)).await.unwrap();
    let backend: Arc<SecretBackend> = Arc::new(KubernetesBackend::new(client, NAMESPACE));
    let store = SecretStore::new(backend, PREFIX);
    kube.answer_writes_after(Some(std::time::Duration::from_secs(2)));
    let value = || SecretValue::from("pw-1".to_string());
    let err = store.put(&finance(), "db", value(), Mode::Create, Some("req-1")).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Unanswered { .. })), "{err:?}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("may have been applied"), "{}", status.message());
    assert!(!status.message().contains("pw-1"), "{}", status.message());
    kube.answer_writes_after(None);

    assert!(kube.secret(NAMESPACE, &format!("{PREFIX}-finance")).is_some(), "the write did land");
    let first = store.put(&finance(), "db", value(), Mode::Create, Some("req-1")).await.expect("the retry is answered");
    assert_eq!(first.key, "db");
    assert_eq!(store.list(&finance()).await.unwrap().len(), 1);

    let unreachable =
        KubernetesBackend::client(Some("http://127.0.0.1:9"), NAMESPACE, std::time::Duration::from_secs(2))
            .await
            .unwrap();
    let store = SecretStore::new(Arc::new(KubernetesBackend::new(unreachable, NAMESPACE)), PREFIX);
    let err = store.put(&finance(), "db", value(), Mode::Update, None).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Unavailable { .. })), "{err:?}");
}

/// With the objects watched, a write starts from the copy in memory: one
/// request (a conditional PUT) instead of a GET and a PUT. A copy that is
/// behind (an edit whose event has not arrived) costs one conflict, then
/// the object is read and nothing of the edit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_write_is_one_request_and_a_copy_that_is_behind_costs_a_conflict_not_a_lost_edit() {
    let f = Fixture::kubernetes_watching().await;
    let kube = f.kube.clone().unwrap();
    let store = f.store();
    store.create(&finance(), "a", SecretValue::from("1".to_string())).await.unwrap();
    eventually(&store, "a", Some(b"1")).await;
    let before = kube.counters();
    for i in 0..5 {
        store.create(&finance(), &format!("k{i}"), SecretValue::from("v".to_string())).await.unwrap();
    }
    let after = kube.counters();
    assert_eq!(after.gets, before.gets, "no GET before a write from memory");
    assert_eq!(after.replaces - before.replaces, 5);
    assert_eq!(after.conflicts, before.conflicts);

    // An edit the watch has not delivered yet: memory is behind.
    kube.hold_events(true);
    kubectl_set(&kube, "edited", "by-kubectl");
    store.create(&finance(), "mine", SecretValue::from("v".to_string())).await.unwrap();
    let behind = kube.counters();
    assert_eq!(behind.conflicts - after.conflicts, 1, "the stale copy's write was refused once");
    assert_eq!(behind.gets - after.gets, 1, "then the object was read");
    kube.hold_events(false);
    let stored = kube.secret(NAMESPACE, &format!("{PREFIX}-finance")).unwrap().data.unwrap();
    assert!(stored.contains_key("edited") && stored.contains_key("mine"), "both the edit and the write are kept");
    assert_eq!(kube.counters().unconditional_puts, 0);
}

/// Writes to the API server are bounded: past `kubernetes.max_writes_in_flight`
/// and the queue behind it, a change is refused at once with
/// RESOURCE_EXHAUSTED and a retry hint, naming the setting, and nothing of
/// it is written; the write in flight completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_write_bound_a_change_is_refused_at_once_naming_the_setting() {
    use secret_service::backend::MeteredBackend;
    use tonic_types::StatusExt;
    let f = Fixture::kubernetes().await;
    let kube = f.kube.clone().unwrap();
    let limits = secrets_common::admission::Limits {
        max_in_flight: 1,
        max_queued: 0,
        queue_wait: std::time::Duration::from_secs(5),
    };
    let metered = MeteredBackend::new(f.backend.clone(), secrets_common::observe::Metrics::new());
    let store = SecretStore::new(Arc::new(metered.with_write_limits(Some(limits))), PREFIX);
    kube.answer_writes_after(Some(std::time::Duration::from_millis(1_500)));
    let slow = {
        let store = store.clone();
        tokio::spawn(async move { store.create(&finance(), "a", SecretValue::from("1".to_string())).await })
    };
    // The first write has reached the API server and waits for its answer.
    for _ in 0..500 {
        if kube.secret(NAMESPACE, &format!("{PREFIX}-finance")).is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let hr = Scope::domain("domain", "hr").unwrap();
    let err = store.create(&hr, "b", SecretValue::from("2".to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Busy { .. })), "{err:?}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("kubernetes.max_writes_in_flight"), "{}", status.message());
    assert!(status.get_error_details().retry_info().is_some(), "a retry hint");
    assert!(kube.secret(NAMESPACE, &format!("{PREFIX}-hr")).is_none(), "nothing of the refused change was written");
    slow.await.unwrap().expect("the write in flight completes");
    kube.answer_writes_after(None);
    store.create(&hr, "b", SecretValue::from("2".to_string())).await.expect("a turn is free again");
}

/// What must not be a moment behind another replica's write (a Vault
/// config's credentials when the config changed) is read with
/// `read_current`: from the API server, even while the watched copy lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_read_sees_an_edit_the_watched_copy_has_not_received() {
    let f = Fixture::kubernetes_watching().await;
    let kube = f.kube.clone().unwrap();
    let store = f.store();
    store.create(&finance(), "k", SecretValue::from("v1".to_string())).await.unwrap();
    eventually(&store, "k", Some(b"v1")).await;
    // The copy answers only while its watch is alive; on a busy machine it
    // may be between watches for a moment, and then reads go through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !secret_service::backend::StoreBackend::watched(&*f.backend, std::time::Duration::from_secs(5)) {
        assert!(std::time::Instant::now() < deadline, "the watch never became trusted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    kube.hold_events(true);
    kubectl_set(&kube, "k", "v2");
    let object = format!("{PREFIX}-finance");
    assert_eq!(resolved(&store, "k").await.as_deref(), Some(&b"v1"[..]), "the copy lags while events are held");
    let current = f.backend.read_current(&object).await.unwrap().expect("the object exists");
    assert_eq!(current["k"].value.expose(), b"v2");
    kube.hold_events(false);
}

/// Collects what the store watch reports.
#[derive(Default)]
struct Seen(std::sync::Mutex<Vec<secret_service::backend::ObservedChange>>);

impl secret_service::backend::Observer for Seen {
    fn observed(&self, changes: Vec<secret_service::backend::ObservedChange>) {
        self.0.lock().unwrap().extend(changes);
    }
}

impl Seen {
    /// Waits (up to 10 s) until `n` changes were reported; all of them.
    async fn at_least(&self, n: usize) -> Vec<(String, secret_service::backend::KeyChange, u64)> {
        for _ in 0..1_000 {
            let seen = self.0.lock().unwrap().clone();
            if seen.len() >= n {
                return seen.into_iter().map(|c| (c.key, c.change, c.version)).collect();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("only {:?} reported", self.0.lock().unwrap());
    }
}

fn version_now(kube: &integration_tests::kube_server::FakeKube) -> u64 {
    let secret = kube.secret(NAMESPACE, &format!("{PREFIX}-finance")).unwrap();
    secret.metadata.resource_version.unwrap().parse().unwrap()
}

/// Out-of-band edits reach the observer once each, with the version that
/// carried them; this service's own writes do not (the API reports those);
/// a watch resumed from a bookmark needs no list; one resumed from a
/// version compacted away gets 410, lists again and reports what changed
/// meanwhile, never skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_reports_each_change_made_out_of_band_once_even_across_a_410() {
    use secret_service::backend::KeyChange::{Created, Deleted, Updated};
    integration_tests::logs::init();
    let f = Fixture::kubernetes_watching().await;
    let kube = f.kube.clone().unwrap();
    let store = f.store();
    let seen = Arc::new(Seen::default());
    store.observe(seen.clone());
    store.create(&finance(), "k", SecretValue::from("v1".to_string())).await.unwrap();
    store.update(&finance(), "k", SecretValue::from("v2".to_string())).await.unwrap();
    eventually(&store, "k", Some(b"v2")).await;

    kubectl_set(&kube, "k", "edited");
    let edited = version_now(&kube);
    assert_eq!(seen.at_least(1).await, [("k".to_string(), Updated, edited)], "own writes are not reported");
    kubectl_set(&kube, "added", "a");
    let added = version_now(&kube);
    kube.edit(NAMESPACE, &format!("{PREFIX}-finance"), |s| {
        s.data.as_mut().unwrap().remove("added");
    });
    let removed = version_now(&kube);
    let all = seen.at_least(3).await;
    assert_eq!(all[1..], [("added".to_string(), Created, added), ("added".to_string(), Deleted, removed)]);

    // A bookmark moves the watch's version on: resumed after the history
    // is compacted, it needs no list.
    let lists = kube.counters().lists;
    assert!(kube.bookmark() > 0, "the watch asked for bookmarks");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    kube.compact();
    kube.drop_watches();
    kubectl_set(&kube, "k", "after-bookmark");
    let after_bookmark = version_now(&kube);
    eventually(&store, "k", Some(b"after-bookmark")).await;
    assert_eq!(kube.counters().lists, lists, "resumed from the bookmark, not listed again");

    // Lagging behind a compaction: 410, a new list, and the change it
    // missed is reported from the list.
    kube.hold_events(true);
    kubectl_set(&kube, "k", "while-lagging");
    let lagging = version_now(&kube);
    kube.compact();
    kube.drop_watches();
    kube.hold_events(false);
    eventually(&store, "k", Some(b"while-lagging")).await;
    let all = seen.at_least(5).await;
    assert_eq!(all[3..], [("k".to_string(), Updated, after_bookmark), ("k".to_string(), Updated, lagging)]);
    assert!(kube.counters().lists > lists, "listed again after the 410");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(seen.0.lock().unwrap().len(), 5, "each change reported once");
}
