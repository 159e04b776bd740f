//! What only the embedded backend has: its key file and encrypted files.

use std::os::unix::fs::PermissionsExt;

use integration_tests::stores::{Fixture, PREFIX};
use secret_service::{
    Error,
    backend::BackendError,
    embedded::EmbeddedBackend,
    store::{Scope, SecretStore},
};
use secrets_common::SecretValue;

fn finance() -> Scope {
    Scope::domain("domain", "finance").unwrap()
}

#[tokio::test]
async fn the_key_file_is_created_on_first_start_readable_by_its_owner_only() {
    let f = Fixture::embedded().await;
    let key = f.dir.path().join("store.key");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&key).unwrap();
    let _again = EmbeddedBackend::open(f.dir.path()).unwrap();
    assert_eq!(std::fs::read(&key).unwrap(), first, "an existing key is kept");
}

#[tokio::test]
async fn a_key_file_others_can_read_is_refused_with_what_to_do() {
    let f = Fixture::embedded().await;
    let key = f.dir.path().join("store.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = EmbeddedBackend::open(f.dir.path()).err().expect("refused");
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[tokio::test]
async fn object_files_are_private_and_hold_no_plaintext() {
    let f = Fixture::embedded().await;
    f.store().create(&finance(), "db_password", SecretValue::from("plain-canary-0451".to_string())).await.unwrap();
    let path = f.dir.path().join("objects").join(format!("{PREFIX}-finance.enc"));
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(17).any(|w| w == b"plain-canary-0451"));
    assert!(!bytes.windows(11).any(|w| w == b"db_password"), "keys are encrypted too");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "atomic replace leaves no temporary files");
}

#[tokio::test]
async fn a_tampered_or_swapped_file_is_an_error_not_a_panic_or_wrong_secrets() {
    let f = Fixture::embedded().await;
    let store = f.store();
    store.create(&finance(), "k", SecretValue::from("v".to_string())).await.unwrap();
    store.create(&Scope::Global, "k", SecretValue::from("g".to_string())).await.unwrap();
    let objects = f.dir.path().join("objects");
    // A file copied over another object's name does not decrypt.
    std::fs::copy(objects.join(format!("{PREFIX}.enc")), objects.join(format!("{PREFIX}-finance.enc"))).unwrap();
    let err = store.list(&finance()).await.unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Corrupt(_))), "{err:?}");
    // Flipped bits do not decrypt either.
    let path = objects.join(format!("{PREFIX}.enc"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(store.list(&Scope::Global).await.unwrap_err(), Error::Backend(BackendError::Corrupt(_))));
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(store.list(&Scope::Global).await.unwrap_err(), Error::Backend(BackendError::Corrupt(_))));
}

#[tokio::test]
async fn another_stores_key_cannot_read_the_files() {
    let f = Fixture::embedded().await;
    f.store().create(&finance(), "k", SecretValue::from("v".to_string())).await.unwrap();
    std::fs::write(f.dir.path().join("store.key"), [7u8; 32]).unwrap();
    let other = SecretStore::new(std::sync::Arc::new(EmbeddedBackend::open(f.dir.path()).unwrap()), PREFIX);
    let err = other.list(&finance()).await.unwrap_err();
    assert!(err.to_string().contains("cannot be decrypted"), "{err}");
}

/// Two stores on one data directory stand for two secret-service processes:
/// they share no memory, only the files and their OS locks.
fn two_stores_on_one_directory(dir: &std::path::Path) -> (SecretStore, SecretStore) {
    let open = || SecretStore::new(std::sync::Arc::new(EmbeddedBackend::open(dir).unwrap()), PREFIX);
    (open(), open())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_writing_500_keys_at_once_into_one_object_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores_on_one_directory(dir.path());
    let writes = (0..500).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            store.create(&finance(), &format!("key-{i:03}"), SecretValue::from(format!("value-{i}"))).await
        })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap().expect("every create is acknowledged");
    }
    for store in [&a, &b] {
        let keys = store.list(&finance()).await.unwrap();
        assert_eq!(keys.len(), 500, "acknowledged creates were lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_updating_and_creating_at_once_keep_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores_on_one_directory(dir.path());
    for i in 0..50 {
        a.create(&finance(), &format!("old-{i:02}"), SecretValue::from("v0".to_string())).await.unwrap();
    }
    let writes = (0..100).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            if i < 50 {
                store.update(&finance(), &format!("old-{i:02}"), SecretValue::from("v1".to_string())).await
            } else {
                store.create(&finance(), &format!("new-{i:02}"), SecretValue::from("v1".to_string())).await
            }
        })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap().expect("acknowledged");
    }
    let listed = b.list(&finance()).await.unwrap();
    assert_eq!(listed.len(), 100);
    let lookups: Vec<_> = listed
        .iter()
        .map(|i| secret_service::store::Lookup { scope: finance(), key: i.key.clone(), global_fallback: false })
        .collect();
    let values = a.read_values(&lookups).await.unwrap();
    assert!(values.iter().all(|v| v.as_ref().is_some_and(|f| f.value.expose() == b"v1")), "an update was lost");
}

#[test]
fn processes_starting_together_on_a_new_directory_agree_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let opened: Vec<_> = (0..8)
        .map(|_| {
            let (dir, barrier) = (dir.path().to_path_buf(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                EmbeddedBackend::open(&dir)
            })
        })
        .collect();
    let backends: Vec<_> = opened.into_iter().map(|t| t.join().unwrap().expect("every start succeeds")).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut stores = backends.into_iter().map(|b| SecretStore::new(std::sync::Arc::new(b), PREFIX));
    let writer = stores.next().unwrap();
    rt.block_on(writer.create(&finance(), "k", SecretValue::from("v".to_string()))).unwrap();
    for reader in stores {
        assert_eq!(rt.block_on(reader.list(&finance())).expect("same key").len(), 1);
    }
    let leftovers = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name() != "store.key").count();
    assert_eq!(leftovers, 1, "only the objects directory is left beside the key");
}

#[tokio::test]
async fn store_and_lock_files_are_private() {
    let f = Fixture::embedded().await;
    f.store().create(&finance(), "k", SecretValue::from("v".to_string())).await.unwrap();
    for entry in std::fs::read_dir(f.dir.path().join("objects")).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", entry.file_name());
    }
    let dir_mode = std::fs::metadata(f.dir.path().join("objects")).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
}

/// The value `store` resolves for `key` in finance, as the resolver reads it.
async fn resolved(store: &SecretStore, key: &str) -> Option<Vec<u8>> {
    let lookup = secret_service::store::Lookup { scope: finance(), key: key.into(), global_fallback: false };
    store.read_values(&[lookup]).await.unwrap().remove(0).map(|f| f.value.expose().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_kept_in_memory_show_every_write_of_this_and_other_processes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores_on_one_directory(dir.path());
    a.create(&finance(), "k", SecretValue::from("v-000".to_string())).await.unwrap();
    assert_eq!(resolved(&a, "k").await.as_deref(), Some(&b"v-000"[..]));
    assert_eq!(resolved(&b, "k").await.as_deref(), Some(&b"v-000"[..]));
    // Same-length values, back to back: whatever the file's size and times
    // say, each read sees the last acknowledged write, from either side.
    for i in 1..=200 {
        let (writer, reader) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let value = format!("v-{i:03}");
        writer.update(&finance(), "k", SecretValue::from(value.clone())).await.unwrap();
        assert_eq!(resolved(reader, "k").await.as_deref(), Some(value.as_bytes()), "the other process, write {i}");
        assert_eq!(resolved(writer, "k").await.as_deref(), Some(value.as_bytes()), "the writer, write {i}");
    }
    // A deleted key is gone for both at once.
    b.delete(&finance(), "k").await.unwrap();
    assert_eq!(resolved(&a, "k").await, None, "a deleted key is never served from memory");
    assert_eq!(resolved(&b, "k").await, None);
    // An object whose file disappears (restored from an older backup, say)
    // is not served from memory either.
    a.create(&finance(), "x", SecretValue::from("1".to_string())).await.unwrap();
    assert!(resolved(&b, "x").await.is_some());
    for f in std::fs::read_dir(dir.path().join("objects")).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "enc") {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(resolved(&b, "x").await, None);
}
