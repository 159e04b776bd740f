//! What only the embedded backend has: its key file and encrypted files.

use std::os::unix::fs::PermissionsExt;

use integration_tests::stores::{Fixture, PREFIX};
use secret_service::{
    Error,
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
    assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
    // Flipped bits do not decrypt either.
    let path = objects.join(format!("{PREFIX}.enc"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(store.list(&Scope::Global).await.unwrap_err(), Error::Corrupt(_)));
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(store.list(&Scope::Global).await.unwrap_err(), Error::Corrupt(_)));
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
