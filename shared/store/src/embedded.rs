//! The local backend: one AES-256-GCM encrypted file per store object under a
//! data directory, replaced atomically on every write.
//!
//! File layout: `ISS1` magic, 12-byte random nonce, ciphertext of a JSON
//! document; the object name is the associated data, so a file renamed onto
//! another object fails to decrypt instead of serving the wrong secrets.
//!
//! Several processes may share one data directory: every read-modify-write
//! holds an OS lock (`flock`) on the object's `.lock` file and re-reads the
//! object under it, and the key file is published with a hard link, so the
//! first process to start creates it and the others read that one.
//!
//! Objects are kept decrypted in memory. Every write draws a new random
//! nonce, so the nonce in a file's header names its version: a read checks
//! the header (one small read of the page cache, no decryption) and uses the
//! copy in memory when it is the same. Writes by this process and by others
//! on the same directory are therefore seen by the next read.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{AeadInPlace, OsRng, rand_core::RngCore},
};
use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chrono::{DateTime, Utc};
use secrets_common::SecretValue;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    BackendError as Error,
    backend::{Change, Entries, Entry, StoreBackend, StoreError, Version},
};

type Result<T, E = Error> = std::result::Result<T, E>;

const MAGIC: &[u8; 4] = b"ISS1";
const NONCE_LEN: usize = 12;
const KEY_FILE: &str = "store.key";
const NAME: &str = "embedded";

pub struct EmbeddedBackend {
    objects_dir: PathBuf,
    cipher: Aes256Gcm,
    /// One writer at a time per object inside this process.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Decrypted objects by name, with the nonce of the file they came from
    /// (`None`: the file did not exist).
    cache: std::sync::RwLock<HashMap<String, Cached>>,
}

/// A decrypted object in memory: the nonce of its file (`None`: no file),
/// and its entries.
type Cached = (Option<[u8; NONCE_LEN]>, Option<Arc<Entries>>);

/// What the header of an object's file says about its version.
enum Header {
    Missing,
    Nonce([u8; NONCE_LEN]),
    /// Too short or not ours: let a full read report it.
    Unreadable,
}

impl EmbeddedBackend {
    /// Opens (or creates) the store under `data_dir`: the key file
    /// `store.key` (32 random bytes, mode 0600) and `objects/`.
    #[expect(clippy::disallowed_methods, reason = "opens the store once, at startup")]
    pub fn open(data_dir: &Path) -> Result<Self> {
        let objects_dir = data_dir.join("objects");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&objects_dir).map_err(|e| {
            Error::Corrupt(format!("cannot create the embedded store directory {}: {e}", objects_dir.display()))
        })?;
        let key = load_or_create_key(&data_dir.join(KEY_FILE))?;
        let cipher = Aes256Gcm::new_from_slice(&key[..])
            .map_err(|_| Error::Internal("AES-256-GCM key has the wrong length".into()))?;
        Ok(Self { objects_dir, cipher, locks: Mutex::default(), cache: Default::default() })
    }

    fn path(&self, object: &str) -> PathBuf {
        self.objects_dir.join(format!("{object}.enc"))
    }

    fn lock(&self, object: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(object.to_string()).or_default().clone()
    }

    /// Takes the cross-process lock of `object`; released when the returned
    /// file is dropped. Waits in the blocking pool, never on a runtime thread.
    async fn lock_across_processes(&self, object: &str) -> Result<std::fs::File> {
        let path = self.objects_dir.join(format!("{object}.lock"));
        tokio::task::spawn_blocking(move || {
            let file = secrets_common::lockfile::open(&path)?;
            file.lock()?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(|e| Error::Internal(format!("store lock task failed: {e}")))?
        .map_err(|e| unavailable(format!("cannot lock store object {object}: {e}")))
    }

    /// The version of the object's file, from its first 16 bytes (read in
    /// the blocking pool, never on a runtime thread).
    async fn header(&self, object: &str) -> Result<Header> {
        let path = self.path(object);
        tokio::task::spawn_blocking(move || read_header(&path))
            .await
            .map_err(|e| Error::Internal(format!("store read task failed: {e}")))?
    }

    /// The object from memory when its file has not changed, else from the
    /// file (and remembered).
    async fn load_shared(&self, object: &str) -> Result<Option<Arc<Entries>>> {
        let version = match self.header(object).await? {
            Header::Missing => None,
            Header::Nonce(n) => Some(n),
            Header::Unreadable => return Ok(self.load(object).await?.map(Arc::new)),
        };
        if let Some((v, entries)) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(object)
            && *v == version
        {
            return Ok(entries.clone());
        }
        // Read after the header: if the file changes in between, what is
        // remembered is newer than its version says, and the next read
        // reloads it. Never older.
        let entries = self.load(object).await?.map(Arc::new);
        self.cache.write().unwrap_or_else(|p| p.into_inner()).insert(object.to_string(), (version, entries.clone()));
        Ok(entries)
    }

    async fn load(&self, object: &str) -> Result<Option<Entries>> {
        let path = self.path(object);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable(format!("cannot read {}: {e}", path.display()))),
        };
        let plain = self.decrypt(object, &bytes)?;
        let doc: FileDoc = serde_json::from_slice(&plain)
            .map_err(|e| Error::Corrupt(format!("embedded store object {} is not valid: {e}", path.display())))?;
        let mut entries = Entries::new();
        for (key, fe) in doc.entries {
            let value = B64
                .decode(fe.v.as_bytes())
                .map_err(|_| Error::Corrupt(format!("embedded store object {}: bad value encoding", path.display())))?;
            entries.insert(key, Entry { value: SecretValue::new(value), created_at: fe.c, updated_at: fe.u });
        }
        Ok(Some(entries))
    }

    /// The object's file contents: its entries, encrypted.
    fn seal(&self, object: &str, entries: &Entries) -> Result<Vec<u8>> {
        let doc = FileDoc {
            entries: entries
                .iter()
                .map(|(k, e)| {
                    (k.clone(), FileEntry { v: B64.encode(e.value.expose()), c: e.created_at, u: e.updated_at })
                })
                .collect(),
        };
        let plain = Zeroizing::new(
            serde_json::to_vec(&doc).map_err(|e| Error::Internal(format!("cannot encode store object: {e}")))?,
        );
        self.encrypt(object, plain)
    }

    fn encrypt(&self, object: &str, plain: Zeroizing<Vec<u8>>) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let mut buffer = plain;
        self.cipher
            .encrypt_in_place(Nonce::from_slice(&nonce), object.as_bytes(), &mut *buffer)
            .map_err(|_| Error::Internal("encryption failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buffer.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buffer);
        Ok(out)
    }

    fn decrypt(&self, object: &str, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let corrupt = |why: &str| {
            Error::Corrupt(format!(
                "embedded store object {object} cannot be decrypted ({why}); was {KEY_FILE} replaced or the file copied from another store?"
            ))
        };
        if bytes.len() < MAGIC.len() + NONCE_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("unknown file format"));
        }
        let nonce = &bytes[MAGIC.len()..MAGIC.len() + NONCE_LEN];
        let mut buffer = Zeroizing::new(bytes[MAGIC.len() + NONCE_LEN..].to_vec());
        self.cipher
            .decrypt_in_place(Nonce::from_slice(nonce), object.as_bytes(), &mut *buffer)
            .map_err(|_| corrupt("authentication failed"))?;
        Ok(buffer)
    }
}

#[async_trait]
impl<E: StoreError> StoreBackend<E> for EmbeddedBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>, E> {
        Ok(self.load_shared(object).await?.map(|e| (*e).clone()))
    }

    async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, E> {
        Ok(self.load_shared(object).await?)
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, E>) -> Result<Version, E> {
        // Writers in this process queue here; other processes on the same
        // directory queue on the file lock. The object is read under both.
        let guard = self.lock(object).lock_owned().await;
        let file_lock = self.lock_across_processes(object).await?;
        let mut entries = self.load(object).await?.unwrap_or_default();
        change(&mut entries)?;
        let sealed = self.seal(object, &entries)?;
        // Forget the copy before writing: whatever happens to the write, the
        // next read goes to the file.
        self.cache.write().unwrap_or_else(|p| p.into_inner()).remove(object);
        // The write owns both locks until its file is in place: when this
        // call is cancelled (its caller went away), the write still finishes
        // before the next writer reads the object, so that writer's change
        // is never overwritten by this one landing late.
        let (dir, path) = (self.objects_dir.clone(), self.path(object));
        tokio::task::spawn_blocking(move || {
            let _held = (guard, file_lock);
            write_atomically(&dir, &path, &sealed)
        })
        .await
        .map_err(|e| Error::Internal(format!("store write task failed: {e}")))??;
        Ok(None)
    }
}

#[derive(Serialize, Deserialize)]
struct FileDoc {
    entries: BTreeMap<String, FileEntry>,
}

/// One entry as serialized inside the encrypted document; the encoded value
/// is wiped when the entry is dropped.
#[derive(Serialize, Deserialize)]
struct FileEntry {
    v: String,
    c: DateTime<Utc>,
    u: DateTime<Utc>,
}

impl Drop for FileEntry {
    fn drop(&mut self) {
        self.v.zeroize();
    }
}

fn unavailable(message: String) -> Error {
    Error::Unavailable { backend: NAME, message }
}

/// Reads the 32-byte key, or creates it with mode 0600 on first start.
///
/// A new key is written to a private temporary file and published with a
/// hard link, which fails if the key file exists: of several processes
/// starting at once, one creates the key and the others read it, and none
/// ever reads a half-written key.
fn load_or_create_key(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    match read_key(path)? {
        Some(key) => Ok(key),
        None => match create_key(path)? {
            Some(key) => Ok(key),
            // Another process published its key first: use that one.
            None => read_key(path)?
                .ok_or_else(|| Error::Corrupt(format!("key file {} vanished while starting", path.display()))),
        },
    }
}

/// What [`EmbeddedBackend::header`] reads: blocking.
#[expect(clippy::disallowed_methods, reason = "runs only inside spawn_blocking")]
fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Header::Missing),
        Err(e) => return Err(unavailable(format!("cannot read {}: {e}", path.display()))),
    };
    let (mut magic, mut nonce) = ([0u8; MAGIC.len()], [0u8; NONCE_LEN]);
    match file.read_exact(&mut magic).and_then(|()| file.read_exact(&mut nonce)) {
        Ok(()) if &magic == MAGIC => Ok(Header::Nonce(nonce)),
        Ok(()) => Ok(Header::Unreadable),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Header::Unreadable),
        Err(e) => Err(unavailable(format!("cannot read {}: {e}", path.display()))),
    }
}

#[expect(clippy::disallowed_methods, reason = "reads the key once, at startup")]
fn read_key(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => Zeroizing::new(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Corrupt(format!("cannot read key file {}: {e}", path.display()))),
    };
    if bytes.len() != 32 {
        return Err(Error::Corrupt(format!(
            "key file {} holds {} bytes; an AES-256 key is 32 bytes",
            path.display(),
            bytes.len()
        )));
    }
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    if mode & 0o077 != 0 {
        return Err(Error::Corrupt(format!(
            "key file {} has mode {mode:o}; it must be readable by its owner only: chmod 600 it",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// `None` when another process published a key first.
#[expect(clippy::disallowed_methods, reason = "creates the key once, at startup")]
fn create_key(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let fail =
        |what: &str, e: std::io::Error| Error::Corrupt(format!("cannot {what} key file {}: {e}", path.display()));
    let mut key = Zeroizing::new(vec![0u8; 32]);
    OsRng.fill_bytes(&mut key);
    let tmp = path.with_file_name(format!(".{KEY_FILE}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(&key)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("write", e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a new embedded store key");
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(fail("create", e)),
    }
}

/// Writes to a temporary file beside the target, syncs it, renames it over
/// the target and syncs the directory: readers see the old or the new
/// object, never a torn one.
#[expect(clippy::disallowed_methods, reason = "runs only inside spawn_blocking")]
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| unavailable(format!("cannot {what} {}: {e}", path.display()));
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name().map_or("object".into(), |n| n.to_string_lossy()),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("write", e));
    }
    // Keep the data files private even if the umask is loose.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests may block")]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> Entries {
        let now = Utc::now();
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Entry { value: SecretValue::new(v.as_bytes().to_vec()), created_at: now, updated_at: now },
                )
            })
            .collect()
    }

    #[test]
    fn an_object_opens_only_under_its_own_name_and_with_its_stores_key() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = EmbeddedBackend::open(dir.path()).unwrap();
        let sealed = store.seal("domain-sales", &entries(&[("db", "canary-embedded-unit")])).unwrap();
        assert!(
            !sealed.windows(b"canary-embedded-unit".len()).any(|w| w == b"canary-embedded-unit"),
            "a value is written in the clear"
        );
        let plain = store.decrypt("domain-sales", &sealed).unwrap();
        assert!(String::from_utf8_lossy(&plain).contains("db"));

        // Copied to another object's file: refused, naming the object.
        let moved = store.decrypt("domain-hr", &sealed).unwrap_err();
        assert!(matches!(moved, Error::Corrupt(ref m) if m.contains("domain-hr")), "{moved}");
        // Another store's key: refused.
        let stranger = EmbeddedBackend::open(other.path()).unwrap();
        assert!(matches!(stranger.decrypt("domain-sales", &sealed), Err(Error::Corrupt(_))));
        // One flipped bit: refused.
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(store.decrypt("domain-sales", &flipped), Err(Error::Corrupt(_))));
        // Not a store file at all.
        let e = store.decrypt("domain-sales", b"{\"plain\": true}").unwrap_err();
        assert!(e.to_string().contains("unknown file format"), "{e}");
    }

    #[test]
    fn the_key_file_is_created_private_once_and_refused_when_others_may_read_it_or_it_is_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(KEY_FILE);
        let first = load_or_create_key(&key).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(*load_or_create_key(&key).unwrap(), *first, "a second start reuses the key");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose = load_or_create_key(&key).unwrap_err().to_string();
        assert!(loose.contains("mode 644") && loose.contains("chmod 600"), "{loose}");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&key, [7u8; 16]).unwrap();
        let short = load_or_create_key(&key).unwrap_err().to_string();
        assert!(short.contains("holds 16 bytes"), "{short}");
    }

    #[test]
    fn a_header_tells_a_missing_file_from_an_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedBackend::open(dir.path()).unwrap();
        assert!(matches!(read_header(&store.path("absent")).unwrap(), Header::Missing));
        std::fs::write(store.path("short"), b"IS").unwrap();
        assert!(matches!(read_header(&store.path("short")).unwrap(), Header::Unreadable));
        let sealed = store.seal("whole", &entries(&[("k", "v")])).unwrap();
        std::fs::write(store.path("whole"), &sealed).unwrap();
        match read_header(&store.path("whole")).unwrap() {
            Header::Nonce(n) => assert_eq!(n[..], sealed[MAGIC.len()..MAGIC.len() + NONCE_LEN]),
            _ => panic!("a sealed object's header holds its nonce"),
        }
    }
}
