//! The production backend: opaque Kubernetes Secrets, one per store object,
//! in the installation's namespace, through kube-rs.
//!
//! Writes are read-modify-write: the PUT carries the `resourceVersion` that
//! was read, so the API server refuses it (409) when another writer got there
//! first; the change is then re-applied to the fresh object, with jittered
//! exponential backoff. Writers inside one replica also queue on a local lock
//! so they do not race each other for nothing.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::api::{Api, PostParams};
use secrets_common::SecretValue;
use serde::{Deserialize, Serialize};

use crate::{
    BackendError as Error,
    backend::{Change, Entries, Entry, StoreBackend, StoreError},
};

type Result<T, E = Error> = std::result::Result<T, E>;

const NAME: &str = "kubernetes";
/// Per-key creation and update times (Secret data has none of its own).
pub const TIMESTAMPS_ANNOTATION: &str = "secrets.iomete.com/timestamps";
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "iomete-secrets");
/// The API server's limit on all annotations of an object together; the
/// key timestamps live there, so it caps the keys of one store object
/// (about 4,000 keys of 30-character names).
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;
const MAX_WRITE_ATTEMPTS: usize = 64;

pub struct KubernetesBackend {
    api: Api<Secret>,
    namespace: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    backoff: ExponentialBuilder,
}

impl KubernetesBackend {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            locks: Mutex::default(),
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(2))
                .with_max_delay(Duration::from_millis(250))
                .with_jitter()
                .with_max_times(MAX_WRITE_ATTEMPTS),
        }
    }

    /// A client from an explicit API URL (for example `kubectl proxy`'s
    /// `http://127.0.0.1:8001`), or inferred from `KUBECONFIG`, the default
    /// kubeconfig or the in-cluster service account.
    ///
    /// Every API call is bounded by `timeout`. kube's own retry layer is
    /// turned off: it retries 503s for minutes, and a caller waiting on a
    /// secret is better told at once that the API server is unavailable.
    pub async fn client(api_url: Option<&str>, namespace: &str, timeout: Duration) -> Result<kube::Client> {
        let config = match api_url {
            Some(url) => {
                let uri = url.parse().map_err(|e| {
                    Error::Misconfigured(secrets_common::validate::FieldViolation::new(
                        "kubernetes.api_url",
                        format!("{url:?} is not a URL: {e}"),
                    ))
                })?;
                let mut c = kube::Config::new(uri);
                c.default_namespace = namespace.to_string();
                c
            }
            None => kube::Config::infer().await.map_err(|e| Error::Unavailable {
                backend: NAME,
                message: format!("no cluster configuration found (KUBECONFIG, ~/.kube/config or in-cluster): {e}"),
            })?,
        };
        let mut config = config;
        config.default_retry = false;
        config.connect_timeout = Some(timeout.min(Duration::from_secs(5)));
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        kube::Client::try_from(config)
            .map_err(|e| Error::Unavailable { backend: NAME, message: format!("cannot build a client: {e}") })
    }

    fn lock(&self, object: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(object.to_string()).or_default().clone()
    }

    fn api_error(&self, object: &str, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(status) if status.is_invalid() => {
                Error::Rejected { backend: NAME, object: object.to_string(), message: status.message.clone() }
            }
            kube::Error::Api(status) if status.is_forbidden() => Error::Unavailable {
                backend: NAME,
                message: format!(
                    "the service account may not access secret {object} in namespace {}: {}",
                    self.namespace, status.message
                ),
            },
            other => Error::Unavailable { backend: NAME, message: format!("secret {object}: {other}") },
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

#[async_trait]
impl<E: StoreError> StoreBackend<E> for KubernetesBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn read(&self, object: &str) -> Result<Option<Entries>, E> {
        let secret = self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))?;
        Ok(secret.map(|s| decode(object, s).map(|(entries, _)| entries)).transpose()?)
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, E>) -> Result<(), E> {
        let lock = self.lock(object);
        let _guard = lock.lock().await;
        let mut delays = self.backoff.build();
        let mut conflicts = 0usize;
        loop {
            let current = self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))?;
            let exists = current.is_some();
            let (mut entries, meta) = match current {
                Some(s) => decode(object, s)?,
                None => (Entries::new(), ObjectMeta::default()),
            };
            change(&mut entries)?;
            let secret = encode(object, meta, &entries)?;
            let written = if exists {
                self.api.replace(object, &PostParams::default(), &secret).await
            } else {
                self.api.create(&PostParams::default(), &secret).await
            };
            match written {
                Ok(_) => {
                    if conflicts > 0 {
                        tracing::debug!(object, conflicts, "write succeeded after conflicts");
                    }
                    return Ok(());
                }
                Err(e) if is_conflict(&e) => {
                    conflicts += 1;
                    match delays.next() {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => {
                            return Err(Error::Unavailable {
                                backend: NAME,
                                message: format!(
                                    "secret {object} kept changing under {conflicts} concurrent writes; try again"
                                ),
                            }
                            .into());
                        }
                    }
                }
                Err(e) => return Err(self.api_error(object, e).into()),
            }
        }
    }
}

/// A key's creation and update time, as Unix milliseconds: `[created, updated]`
/// (compact, so an object holds thousands of keys within the annotation
/// limit). RFC 3339 strings, as older versions wrote, are read too.
#[derive(Serialize, Deserialize)]
struct Times(Stamp, Stamp);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stamp {
    Millis(i64),
    Rfc3339(DateTime<Utc>),
}

impl Stamp {
    fn of(t: DateTime<Utc>) -> Self {
        Stamp::Millis(t.timestamp_millis())
    }

    fn time(&self) -> DateTime<Utc> {
        match self {
            Stamp::Millis(ms) => DateTime::<Utc>::from_timestamp_millis(*ms).unwrap_or_default(),
            Stamp::Rfc3339(t) => *t,
        }
    }
}

fn decode(object: &str, secret: Secret) -> Result<(Entries, ObjectMeta)> {
    let meta = secret.metadata;
    let times: BTreeMap<String, Times> = match meta.annotations.as_ref().and_then(|a| a.get(TIMESTAMPS_ANNOTATION)) {
        Some(json) => serde_json::from_str(json).map_err(|e| {
            Error::Corrupt(format!("secret {object}: annotation {TIMESTAMPS_ANNOTATION} is not valid: {e}"))
        })?,
        None => BTreeMap::new(),
    };
    // Secrets created by other tools have no timestamps: use the object's.
    let fallback = meta
        .creation_timestamp
        .as_ref()
        .map_or_else(Utc::now, |t| DateTime::<Utc>::from_timestamp(t.0.as_second(), 0).unwrap_or_else(Utc::now));
    let mut entries = Entries::new();
    for (key, ByteString(bytes)) in secret.data.unwrap_or_default() {
        let (created_at, updated_at) = times.get(&key).map_or((fallback, fallback), |t| (t.0.time(), t.1.time()));
        entries.insert(key, Entry { value: SecretValue::new(bytes), created_at, updated_at });
    }
    Ok((entries, meta))
}

/// The Secret to write: the metadata that was read (so `resourceVersion`
/// makes the write conditional), our label and timestamps, and the data.
fn encode(object: &str, mut meta: ObjectMeta, entries: &Entries) -> Result<Secret> {
    let times: BTreeMap<&str, Times> =
        entries.iter().map(|(k, e)| (k.as_str(), Times(Stamp::of(e.created_at), Stamp::of(e.updated_at)))).collect();
    let times = serde_json::to_string(&times).map_err(|e| Error::Internal(format!("cannot encode timestamps: {e}")))?;
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(TIMESTAMPS_ANNOTATION.to_string(), times);
    let annotation_bytes: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if annotation_bytes > MAX_ANNOTATION_BYTES {
        return Err(Error::TooManyKeys {
            object: object.to_string(),
            keys: entries.len(),
            bytes: annotation_bytes,
            limit: MAX_ANNOTATION_BYTES,
        });
    }
    meta.annotations = Some(annotations);
    meta.name = Some(object.to_string());
    meta.labels.get_or_insert_with(BTreeMap::new).insert(MANAGED_BY_LABEL.0.into(), MANAGED_BY_LABEL.1.into());
    meta.managed_fields = None;
    Ok(Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(entries.iter().map(|(k, e)| (k.clone(), ByteString(e.value.expose().to_vec()))).collect()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize, key_len: usize) -> Entries {
        let now = Utc::now();
        (0..n)
            .map(|i| {
                let key = format!("{i:0key_len$}");
                (key, Entry { value: SecretValue::new(vec![b'v']), created_at: now, updated_at: now })
            })
            .collect()
    }

    #[test]
    fn thousands_of_keys_fit_in_the_annotation_limit() {
        let secret = encode("s", ObjectMeta::default(), &entries(4_000, 30)).expect("4,000 keys of 30 characters fit");
        let (decoded, _) = decode("s", secret).unwrap();
        assert_eq!(decoded.len(), 4_000);
    }

    #[test]
    fn past_the_annotation_limit_the_error_names_that_limit_not_the_size_limit() {
        let err = encode("s", ObjectMeta::default(), &entries(5_000, 40)).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::TooManyKeys { keys: 5_000, .. }), "{err:?}");
        assert!(message.contains("262144 bytes (256 KiB) of annotations"), "{message}");
        assert!(!message.contains("1 MiB"), "{message}");
    }

    #[test]
    fn timestamps_written_as_rfc3339_by_older_versions_are_still_read() {
        let meta = ObjectMeta {
            annotations: Some(BTreeMap::from([(
                TIMESTAMPS_ANNOTATION.to_string(),
                r#"{"k":["2026-01-02T03:04:05Z",1767323045123]}"#.to_string(),
            )])),
            ..Default::default()
        };
        let secret = Secret {
            metadata: meta,
            data: Some(BTreeMap::from([("k".to_string(), ByteString(b"v".to_vec()))])),
            ..Default::default()
        };
        let (entries, _) = decode("s", secret).unwrap();
        assert_eq!(entries["k"].created_at.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert_eq!(entries["k"].updated_at.timestamp_millis(), 1767323045123);
    }
}
