//! The same behaviour, checked on both backends: each test runs once against
//! the embedded store and once against the Kubernetes backend.

use integration_tests::stores::{CountingBackend, Fixture, PREFIX};
use secret_service::{
    Error,
    store::{Lookup, Mode, Scope, SecretStore},
};
use secrets_common::SecretValue;

/// Generates `mod name { embedded, kubernetes }` for a test taking a Fixture.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn embedded() {
                    super::$name(integration_tests::stores::Fixture::embedded().await).await
                }
                #[tokio::test]
                async fn kubernetes() {
                    super::$name(integration_tests::stores::Fixture::kubernetes().await).await
                }
            }
        )*
    };
}

on_both_backends!(
    created_secrets_are_listed_with_timestamps,
    creating_an_existing_key_fails_and_keeps_the_first_value,
    updating_changes_the_value_and_keeps_the_creation_time,
    updating_or_deleting_a_missing_key_is_not_found,
    deleting_removes_only_that_key,
    scopes_are_separate_store_objects,
    resolver_reads_fall_back_from_domain_to_global,
    resolver_reads_each_object_once_per_batch,
    an_object_over_one_mebibyte_is_refused_and_nothing_is_lost,
    concurrent_creates_in_one_domain_all_land,
    secrets_survive_a_restart,
    binary_values_round_trip_exactly,
    writers_given_up_on_mid_write_never_cost_another_writers_acknowledged_write,
    a_request_id_makes_a_retry_answer_the_first_outcome_and_change_nothing,
);

fn scope(d: &str) -> Scope {
    Scope::domain("domain", d).unwrap()
}

fn value(s: &str) -> SecretValue {
    SecretValue::from(s.to_string())
}

async fn read_one(store: &SecretStore, scope: &Scope, key: &str) -> Option<Vec<u8>> {
    let lookup = Lookup { scope: scope.clone(), key: key.into(), global_fallback: false };
    store.read_values(&[lookup]).await.unwrap().remove(0).map(|f| f.value.expose().to_vec())
}

async fn created_secrets_are_listed_with_timestamps(f: Fixture) {
    let store = f.store();
    let before = chrono::Utc::now();
    store.create(&scope("finance"), "db_password", value("pw-1")).await.unwrap();
    store.create(&scope("finance"), "api.key", value("k-1")).await.unwrap();
    let listed = store.list(&scope("finance")).await.unwrap();
    let keys: Vec<_> = listed.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["api.key", "db_password"]);
    for s in &listed {
        assert!(s.created_at >= before - chrono::Duration::seconds(1), "{s:?}");
        assert_eq!(s.created_at, s.updated_at);
    }
    assert!(store.list(&scope("empty")).await.unwrap().is_empty());
}

async fn creating_an_existing_key_fails_and_keeps_the_first_value(f: Fixture) {
    let store = f.store();
    store.create(&scope("finance"), "k", value("first")).await.unwrap();
    let err = store.create(&scope("finance"), "k", value("second")).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert!(err.to_string().contains("UpdateSecret"), "says what to do: {err}");
    assert_eq!(read_one(&store, &scope("finance"), "k").await.unwrap(), b"first");
}

async fn updating_changes_the_value_and_keeps_the_creation_time(f: Fixture) {
    let store = f.store();
    let created = store.create(&scope("finance"), "k", value("v1")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let updated = store.update(&scope("finance"), "k", value("v2")).await.unwrap();
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at > created.updated_at);
    assert_eq!(read_one(&store, &scope("finance"), "k").await.unwrap(), b"v2");
    let listed = store.list(&scope("finance")).await.unwrap();
    assert_eq!(listed[0].created_at, created.created_at);
    assert_eq!(listed[0].updated_at, updated.updated_at);
}

async fn updating_or_deleting_a_missing_key_is_not_found(f: Fixture) {
    let store = f.store();
    let err = store.update(&scope("finance"), "missing", value("v")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("domain \"finance\""), "{err}");
    let err = store.delete(&scope("finance"), "missing").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    // Failed writes create nothing.
    assert!(f.backend.read(&store.object_name(&scope("finance"))).await.unwrap().is_none());
}

async fn deleting_removes_only_that_key(f: Fixture) {
    let store = f.store();
    for k in ["a", "b", "c"] {
        store.create(&scope("finance"), k, value(k)).await.unwrap();
    }
    store.delete(&scope("finance"), "b").await.unwrap();
    let keys: Vec<_> = store.list(&scope("finance")).await.unwrap().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["a", "c"]);
    assert!(read_one(&store, &scope("finance"), "b").await.is_none());
}

async fn scopes_are_separate_store_objects(f: Fixture) {
    let store = f.store();
    store.create(&scope("finance"), "k", value("finance")).await.unwrap();
    store.create(&scope("sales"), "k", value("sales")).await.unwrap();
    store.create(&Scope::Global, "k", value("global")).await.unwrap();
    store.create(&Scope::Admin, "k", value("admin")).await.unwrap();
    for (s, object, v) in [
        (scope("finance"), format!("{PREFIX}-finance"), "finance"),
        (scope("sales"), format!("{PREFIX}-sales"), "sales"),
        (Scope::Global, PREFIX.to_string(), "global"),
        (Scope::Admin, format!("{PREFIX}-admin"), "admin"),
    ] {
        assert_eq!(store.object_name(&s), object);
        let entries = f.backend.read(&object).await.unwrap().expect("object exists");
        assert_eq!(entries["k"].value.expose(), v.as_bytes(), "{object}");
    }
    let err = Scope::domain("domain", "admin").unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}

async fn resolver_reads_fall_back_from_domain_to_global(f: Fixture) {
    let store = f.store();
    store.create(&Scope::Global, "shared", value("global-shared")).await.unwrap();
    store.create(&Scope::Global, "both", value("global-both")).await.unwrap();
    store.create(&scope("finance"), "both", value("finance-both")).await.unwrap();
    let lookup = |key: &str, fallback| Lookup { scope: scope("finance"), key: key.into(), global_fallback: fallback };
    let found = store
        .read_values(&[lookup("both", true), lookup("shared", true), lookup("shared", false), lookup("none", true)])
        .await
        .unwrap();
    let found: Vec<_> = found.into_iter().map(|f| f.map(|f| (f.scope, f.value.expose().to_vec()))).collect();
    assert_eq!(found[0], Some((scope("finance"), b"finance-both".to_vec())), "domain wins");
    assert_eq!(found[1], Some((Scope::Global, b"global-shared".to_vec())), "then global");
    assert_eq!(found[2], None, "no fallback unless asked");
    assert_eq!(found[3], None);
}

async fn resolver_reads_each_object_once_per_batch(f: Fixture) {
    let counting = CountingBackend::new(f.backend.clone());
    let store = SecretStore::new(counting.clone(), PREFIX);
    for (d, k) in [("finance", "a"), ("finance", "b"), ("sales", "a")] {
        store.create(&scope(d), k, value("v")).await.unwrap();
    }
    store.create(&Scope::Global, "g", value("v")).await.unwrap();
    counting.reset();
    let lookups: Vec<_> = ["a", "b", "g", "a", "b", "missing"]
        .iter()
        .flat_map(|k| {
            ["finance", "sales"].map(|d| Lookup { scope: scope(d), key: k.to_string(), global_fallback: true })
        })
        .collect();
    let found = store.read_values(&lookups).await.unwrap();
    // finance: a, b, g (global), a, b; sales: a, g (global), a.
    assert_eq!(found.iter().filter(|f| f.is_some()).count(), 8);
    let reads = counting.reads();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert!(reads.values().all(|n| *n == 1), "each object read once: {reads:?}");
}

async fn an_object_over_one_mebibyte_is_refused_and_nothing_is_lost(f: Fixture) {
    let store = f.store();
    let half = SecretValue::new(vec![b'x'; 600 * 1024]);
    store.create(&scope("finance"), "first", half.clone()).await.unwrap();
    let err = store.create(&scope("finance"), "second", half).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(msg.contains("1048576") && msg.contains("Kubernetes Secret size limit"), "{msg}");
    assert!(msg.contains(&format!("{PREFIX}-finance")), "names the object: {msg}");
    let keys: Vec<_> = store.list(&scope("finance")).await.unwrap().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["first"]);
    // A single value over the limit is refused before any object is touched.
    let err = store.create(&scope("sales"), "big", SecretValue::new(vec![0; 1024 * 1024 + 1])).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref v) if v.field == "value"), "{err:?}");
}

async fn concurrent_creates_in_one_domain_all_land(f: Fixture) {
    let store = f.store();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.create(&scope("finance"), &format!("key-{i:03}"), value(&format!("v{i}"))).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let listed = store.list(&scope("finance")).await.unwrap();
    assert_eq!(listed.len(), 200);
    assert_eq!(read_one(&store, &scope("finance"), "key-137").await.unwrap(), b"v137");
}

async fn secrets_survive_a_restart(f: Fixture) {
    f.store().create(&scope("finance"), "k", value("kept")).await.unwrap();
    let restarted = SecretStore::new(f.another().await, PREFIX);
    assert_eq!(read_one(&restarted, &scope("finance"), "k").await.unwrap(), b"kept");
}

async fn binary_values_round_trip_exactly(f: Fixture) {
    let store = f.store();
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    store.create(&scope("finance"), "blob", SecretValue::new(bytes.clone())).await.unwrap();
    assert_eq!(read_one(&store, &scope("finance"), "blob").await.unwrap(), bytes);
}

/// A caller that goes away mid-write (its request cancelled) must not take
/// another writer's acknowledged change with it. Each round a large create
/// is given up on at a different moment (before, during and after its
/// write) while a small create waits behind it and is acknowledged; every
/// acknowledged create is there at the end.
async fn writers_given_up_on_mid_write_never_cost_another_writers_acknowledged_write(f: Fixture) {
    let store = f.store();
    let finance = scope("finance");
    // About 300 KB: slow to encrypt and write next to a small object.
    let big = || SecretValue::from(vec![b'x'; 300 * 1024]);
    // How long a large create takes here: the moments to give up at are
    // spread over it, so some fall while its file is being written.
    let started = std::time::Instant::now();
    store.create(&finance, "big", big()).await.unwrap();
    let full = started.elapsed();
    store.delete(&finance, "big").await.unwrap();
    let mut acknowledged = Vec::new();
    for round in 0..40u32 {
        let given_up = full.mul_f64(0.1 + 1.1 * f64::from(round) / 40.0);
        let create_big = tokio::time::timeout(given_up, store.create(&finance, "big", big()));
        let key = format!("kept-{round:02}");
        let (_, create) = tokio::join!(create_big, store.create(&finance, &key, value("v")));
        create.unwrap_or_else(|e| panic!("round {round}: {e}"));
        acknowledged.push(key);
        // The next round starts from a small object again.
        let _ = store.delete(&finance, "big").await;
    }
    let listed: std::collections::HashSet<String> =
        store.list(&finance).await.unwrap().into_iter().map(|m| m.key).collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|k| !listed.contains(*k)).collect();
    assert!(lost.is_empty(), "acknowledged creates lost to a cancelled writer: {lost:?}");
}

/// Idempotency keys, on both backends: the record is written with the
/// change, survives a restart, is no secret key, and a retry changes
/// nothing; the id used for another request is refused naming it.
async fn a_request_id_makes_a_retry_answer_the_first_outcome_and_change_nothing(f: Fixture) {
    let store = f.store();
    let finance = scope("finance");
    let first = store.put(&finance, "db", value("pw-1"), Mode::Create, Some("req-1")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // A retry after a restart (another process on the same store).
    let restarted = SecretStore::new(f.another().await, PREFIX);
    let again = restarted.put(&finance, "db", value("pw-1"), Mode::Create, Some("req-1")).await.unwrap();
    assert_eq!(again, first, "the retry is answered with the first outcome, not ALREADY_EXISTS");
    let listed = restarted.list(&finance).await.unwrap();
    assert_eq!(listed.len(), 1, "the records are not a secret: {listed:?}");
    assert_eq!(listed[0].updated_at, first.updated_at, "the retry wrote nothing");

    let update = store.put(&finance, "db", value("pw-2"), Mode::Update, Some("req-2")).await.unwrap();
    assert_eq!(store.put(&finance, "db", value("pw-2"), Mode::Update, Some("req-2")).await.unwrap(), update);
    for (mode, key, v) in [(Mode::Update, "db", "pw-3"), (Mode::Create, "db", "pw-2"), (Mode::Update, "other", "pw-2")]
    {
        match store.put(&finance, key, value(v), mode, Some("req-2")).await {
            Err(Error::InvalidArgument(violation)) => {
                assert_eq!(violation.field, "request_id");
                assert!(violation.description.contains("\"req-2\" was used for another request"), "{violation}");
                assert!(!violation.description.contains("pw-"), "no value in the message: {violation}");
            }
            other => panic!("{mode:?} {key} {v} with req-2: {other:?}"),
        }
    }
    assert_eq!(read_one(&store, &finance, "db").await.unwrap(), b"pw-2", "nothing changed");

    store.delete_once(&finance, "db", Some("req-3")).await.unwrap();
    store.delete_once(&finance, "db", Some("req-3")).await.expect("a retried delete is OK, not NOT_FOUND");
    assert!(matches!(store.delete_once(&finance, "db", Some("req-4")).await, Err(Error::NotFound { .. })));
    assert!(store.list(&finance).await.unwrap().is_empty());
    // The same key created again under a new id.
    store.put(&finance, "db", value("pw-4"), Mode::Create, Some("req-5")).await.unwrap();
    assert_eq!(read_one(&store, &finance, "db").await.unwrap(), b"pw-4");
}
