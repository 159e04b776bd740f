//! The production backend: opaque Kubernetes Secrets, one per store object,
//! in the installation's namespace, through kube-rs.
//!
//! Writes are read-modify-write: the PUT carries the `resourceVersion` that
//! was read, so the API server refuses it (409) when another writer got there
//! first; the change is then re-applied to the fresh object, with jittered
//! exponential backoff. Writers inside one replica also queue on a local lock
//! so they do not race each other for nothing.
//!
//! With [`KubernetesBackend::watching`], the store objects are kept decoded
//! in memory by a list and watch of the Secrets carrying our label: a read
//! sends nothing to the API server. A write updates the copy at once (read
//! your own writes); edits made with kubectl arrive as watch events. A watch
//! that fails is replaced by a new list (so nothing is missed, `410 Gone`
//! included), and until then reads go to the API server. A watch is
//! renewed every [`WATCH_WINDOW`]; one that has gone silent past
//! [`WATCH_WINDOW`] + [`WATCH_GRACE`] is no longer trusted: that is the
//! bound on serving a copy behind a silently broken connection.
//!
//! Several replicas of a service each keep such a copy. With a [`Fence`]
//! ([`KubernetesBackend::fenced`]) a write returns only once every other
//! replica's copy has it (or that replica answers from the API server), and
//! a replica answers from memory only while the fence holds.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use secrets_common::SecretValue;
use serde::{Deserialize, Serialize};

use crate::{
    BackendError as Error,
    backend::{
        Change, Entries, Entry, KeyChange, ObjectState, ObservedChange, Observer, REQUESTS_ENTRY, Snapshot,
        StoreBackend, StoreError, Version,
    },
};

type Result<T, E = Error> = std::result::Result<T, E>;

const NAME: &str = "kubernetes";
/// Per-key creation and update times (Secret data has none of its own).
pub const TIMESTAMPS_ANNOTATION: &str = "secrets.iomete.com/timestamps";
/// The object's idempotency records ([`REQUESTS_ENTRY`]).
pub const REQUESTS_ANNOTATION: &str = "secrets.iomete.com/requests";
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "iomete-secrets");
/// Which service's store objects these are (see [`Owner`]).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// The store objects one service owns: those labelled with its component,
/// the only ones it lists and watches, so two services in one namespace
/// never mirror each other's objects. Objects written before components
/// were labelled (the managed-by label only, named with the prefix) are
/// labelled when the service lists its objects.
#[derive(Clone, Debug)]
pub struct Owner {
    /// `secret-store`, `vault-credentials`.
    pub component: String,
    /// The service's object prefix: it owns `{prefix}` and `{prefix}-*`.
    pub prefix: String,
}

impl Owner {
    fn selector(&self) -> String {
        format!("{}={},{COMPONENT_LABEL}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1, self.component)
    }

    fn owns(&self, name: &str) -> bool {
        name.strip_prefix(self.prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }
}
/// The API server's limit on all annotations of an object together; the
/// key timestamps live there, so it caps the keys of one store object
/// (about 4,000 keys of 30-character names).
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;
const MAX_WRITE_ATTEMPTS: usize = 64;
/// How long one watch request lasts before it is renewed.
pub const WATCH_WINDOW: Duration = Duration::from_secs(15);
/// How long past its window a silent watch is still trusted.
pub const WATCH_GRACE: Duration = Duration::from_secs(5);

/// Keeps the copies of several replicas in step (see the module
/// documentation): the secret-service's is `secret_service::replicas`.
pub trait Fence: Send + Sync + 'static {
    /// Whether this replica may answer from its copy now.
    fn holds(&self) -> bool;
    /// After this replica wrote `object` at `version` (its
    /// resourceVersion): returns once every other replica's copy has it, or
    /// that replica can no longer answer from its copy.
    fn written<'a>(
        &'a self,
        object: &'a str,
        version: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;
}

/// The keys whose values differ between two copies of an object.
fn key_changes(object: &str, version: u64, before: Option<&Entries>, after: Option<&Entries>) -> Vec<ObservedChange> {
    let empty = Entries::new();
    let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    let change =
        |key: &str, change| ObservedChange { object: object.to_string(), key: key.to_string(), change, version };
    let mut changes = Vec::new();
    for (key, entry) in after.iter().filter(|(k, _)| k.as_str() != REQUESTS_ENTRY) {
        match before.get(key) {
            None => changes.push(change(key, KeyChange::Created)),
            Some(old) if old.value != entry.value => changes.push(change(key, KeyChange::Updated)),
            Some(_) => {}
        }
    }
    for key in before.keys().filter(|k| k.as_str() != REQUESTS_ENTRY && !after.contains_key(*k)) {
        changes.push(change(key, KeyChange::Deleted));
    }
    changes
}

pub struct KubernetesBackend {
    api: Api<Secret>,
    namespace: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    backoff: ExponentialBuilder,
    mirror: Option<Arc<Mirror>>,
    owner: Option<Owner>,
    fence: Option<Arc<dyn Fence>>,
}

/// The store objects as the watch last reported them.
#[derive(Default)]
struct Mirror {
    state: RwLock<MirrorState>,
    /// Told of the changes the watch finds that memory did not hold.
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
}

#[derive(Default)]
struct MirrorState {
    /// A list has been loaded, and no watch failed since.
    synced: bool,
    /// When the watch last proved alive (accepted, an event, a clean end).
    alive: Option<Instant>,
    /// Name → (resourceVersion, entries, the object's metadata).
    objects: HashMap<String, (u64, Arc<Entries>, Arc<ObjectMeta>)>,
    /// Objects that did not decode: read from the API server, which reports why.
    undecodable: HashSet<String>,
    /// Objects this replica is writing: what the watch reports of them
    /// meanwhile waits, so the write's own event is not taken for a change
    /// made out of band when it arrives before the write's answer.
    writing: HashMap<String, Writing>,
}

#[derive(Default)]
struct Writing {
    /// Writes on their way.
    count: usize,
    /// The versions they wrote.
    own: Vec<u64>,
    /// Changes seen meanwhile.
    held: Vec<ObservedChange>,
}

/// One write on its way (see [`MirrorState::writing`]).
struct WriteGuard<'a> {
    mirror: Option<&'a Mirror>,
    object: &'a str,
    written: Option<u64>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let Some(m) = self.mirror else { return };
        let mut release = Vec::new();
        m.with(|s| {
            let Some(w) = s.writing.get_mut(self.object) else { return };
            w.count -= 1;
            w.own.extend(self.written);
            if w.count == 0
                && let Some(w) = s.writing.remove(self.object)
            {
                release = w.held.into_iter().filter(|c| !w.own.contains(&c.version)).collect();
            }
        });
        m.tell(release);
    }
}

fn version_of(secret: &Secret) -> u64 {
    secret.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Mirror {
    fn with<T>(&self, f: impl FnOnce(&mut MirrorState) -> T) -> T {
        f(&mut self.state.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the copy is in step with the store (listed, and the watch
    /// heard from within a window) and stays so for at least `margin`
    /// unless the watch is heard from again.
    fn trusted_for(&self, margin: Duration) -> bool {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.synced && s.alive.is_some_and(|t| t.elapsed() + margin < WATCH_WINDOW + WATCH_GRACE)
    }

    /// The object from memory: `None` when memory cannot answer.
    fn get(&self, object: &str) -> Option<Option<Arc<Entries>>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let trusted = s.synced && s.alive.is_some_and(|t| t.elapsed() < WATCH_WINDOW + WATCH_GRACE);
        if !trusted || s.undecodable.contains(object) {
            return None;
        }
        Some(s.objects.get(object).map(|(_, e, _)| e.clone()))
    }

    /// What a write starts from: the entries and the metadata (with its
    /// resourceVersion, so the write is conditional) when memory can
    /// answer; `Some(None)`: the object does not exist.
    fn for_write(&self, object: &str) -> Option<Option<(Entries, ObjectMeta)>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let trusted = s.synced && s.alive.is_some_and(|t| t.elapsed() < WATCH_WINDOW + WATCH_GRACE);
        if !trusted || s.undecodable.contains(object) {
            return None;
        }
        Some(s.objects.get(object).map(|(_, e, m)| ((**e).clone(), (**m).clone())))
    }

    /// Keeps `secret` unless memory holds a newer version already.
    fn apply(&self, secret: Secret) {
        self.apply_seen(secret, false);
    }

    /// [`Mirror::apply`]; with `observed` (the watch or a later list
    /// reported it), the observer is told which keys changed from what
    /// memory held.
    fn apply_seen(&self, secret: Secret, observed: bool) {
        let Some(name) = secret.metadata.name.clone() else { return };
        let version = version_of(&secret);
        let decoded = decode(&name, secret);
        let mut changes = Vec::new();
        self.with(|s| {
            let held = s.objects.get(&name);
            if held.is_some_and(|(v, _, _)| *v > version) {
                return;
            }
            match decoded {
                Ok((entries, meta)) => {
                    if observed && held.is_none_or(|(v, _, _)| *v < version) {
                        let found = key_changes(&name, version, held.map(|(_, e, _)| e.as_ref()), Some(&entries));
                        changes = Self::report(s, &name, found);
                    }
                    s.undecodable.remove(&name);
                    s.objects.insert(name, (version, Arc::new(entries), Arc::new(meta)));
                }
                Err(e) => {
                    tracing::warn!(object = %name, error = %e, "a store object does not decode; reading it from the API server");
                    s.objects.remove(&name);
                    s.undecodable.insert(name);
                }
            }
        });
        self.tell(changes);
    }

    fn tell(&self, changes: Vec<ObservedChange>) {
        if let (false, Some(observer)) = (changes.is_empty(), self.observer.get()) {
            observer.observed(changes);
        }
    }

    /// Holds what the watch reports of `object` until the write the guard
    /// stands for is answered.
    fn writing<'a>(&'a self, object: &'a str) -> WriteGuard<'a> {
        self.with(|s| s.writing.entry(object.to_string()).or_default().count += 1);
        WriteGuard { mirror: Some(self), object, written: None }
    }

    /// Tells the observer of `changes`, or holds them while `object` is
    /// being written here. Called with the state locked.
    fn report(s: &mut MirrorState, object: &str, changes: Vec<ObservedChange>) -> Vec<ObservedChange> {
        match s.writing.get_mut(object) {
            Some(w) => {
                w.held.extend(changes);
                Vec::new()
            }
            None => changes,
        }
    }

    /// The version memory holds of `object`.
    fn version(&self, object: &str) -> Option<u64> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.objects.get(object).map(|(v, _, _)| *v)
    }

    /// The watch reported `secret` deleted: every key it held is.
    fn delete(&self, secret: &Secret) {
        let Some(name) = secret.metadata.name.as_deref() else { return };
        let version = version_of(secret);
        let mut changes = Vec::new();
        self.with(|s| {
            if s.objects.get(name).is_none_or(|(v, _, _)| *v <= version)
                && let Some((_, entries, _)) = s.objects.remove(name)
            {
                changes = Self::report(s, name, key_changes(name, version, Some(&entries), None));
            }
            s.undecodable.remove(name);
        });
        self.tell(changes);
    }

    /// Every object memory holds, while it is in step with the store.
    fn snapshot(&self) -> Option<Snapshot> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        if !s.synced {
            return None;
        }
        let objects = s
            .objects
            .iter()
            .map(|(name, (version, entries, _))| ObjectState {
                object: name.clone(),
                version: *version,
                keys: entries.keys().filter(|k| k.as_str() != REQUESTS_ENTRY).cloned().collect(),
            })
            .collect();
        Some(Snapshot { objects, unknown: s.undecodable.iter().cloned().collect() })
    }

    fn alive(&self) {
        self.with(|s| s.alive = Some(Instant::now()));
    }
}

/// Lists and watches the labelled Secrets into `mirror` for as long as the
/// backend exists.
async fn mirror_loop(mirror: Weak<Mirror>, api: Api<Secret>, owner: Option<Owner>) {
    let selector = match &owner {
        Some(owner) => owner.selector(),
        None => format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1),
    };
    let mut failures = 0u32;
    let pause = |failures: u32| Duration::from_millis((100u64 << failures.min(6)).min(5_000));
    // The first list only fills memory; later ones (after the watch was
    // lost or its version compacted away) report what changed meanwhile.
    let mut baseline = false;
    'list: loop {
        if let Some(owner) = &owner {
            adopt(&api, owner).await;
        }
        let listed = api.list(&ListParams::default().labels(&selector)).await;
        let Some(m) = mirror.upgrade() else { return };
        let list = match listed {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the store objects; reading from the API server meanwhile");
                m.with(|s| s.synced = false);
                drop(m);
                failures += 1;
                tokio::time::sleep(pause(failures)).await;
                continue 'list;
            }
        };
        let mut version = list.metadata.resource_version.clone().unwrap_or_default();
        // Merged, not replaced: what memory holds newer than the list (a
        // write of this replica, or one another replica announced, that
        // landed while the list was on its way) stays; what the list no
        // longer has, and memory had from before it, goes.
        let listed_at: u64 = version.parse().unwrap_or(u64::MAX);
        let listed: HashSet<String> = list.items.iter().filter_map(|s| s.metadata.name.clone()).collect();
        let mut gone = Vec::new();
        m.with(|s| {
            s.objects.retain(|name, (v, entries, _)| {
                let keep = listed.contains(name) || *v > listed_at;
                if !keep && baseline {
                    gone.extend(key_changes(name, listed_at, Some(entries), None));
                }
                keep
            });
            s.undecodable.retain(|name| listed.contains(name));
        });
        m.tell(gone);
        for secret in list.items {
            m.apply_seen(secret, baseline);
        }
        baseline = true;
        m.with(|s| {
            s.synced = true;
            s.alive = Some(Instant::now());
        });
        drop(m);
        loop {
            let params = WatchParams::default().labels(&selector).timeout(WATCH_WINDOW.as_secs() as u32);
            let stream = match api.watch(&params, &version).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the store objects; listing again");
                    if let Some(m) = mirror.upgrade() {
                        m.with(|s| s.synced = false);
                    }
                    failures += 1;
                    tokio::time::sleep(pause(failures)).await;
                    continue 'list;
                }
            };
            let mut stream = std::pin::pin!(stream);
            match mirror.upgrade() {
                Some(m) => m.alive(),
                None => return,
            }
            loop {
                let next = tokio::time::timeout(WATCH_WINDOW + WATCH_GRACE, stream.next()).await;
                let Some(m) = mirror.upgrade() else { return };
                match next {
                    // Silent past its window: renew it (memory is no longer
                    // trusted meanwhile, see `Mirror::get`).
                    Err(_) => break,
                    // The window ended: watch on from the last version.
                    Ok(None) => {
                        m.alive();
                        failures = 0;
                        break;
                    }
                    Ok(Some(Ok(WatchEvent::Added(secret) | WatchEvent::Modified(secret)))) => {
                        version = secret.metadata.resource_version.clone().unwrap_or(version);
                        m.apply_seen(secret, true);
                        m.alive();
                    }
                    Ok(Some(Ok(WatchEvent::Deleted(secret)))) => {
                        version = secret.metadata.resource_version.clone().unwrap_or(version);
                        m.delete(&secret);
                        m.alive();
                    }
                    Ok(Some(Ok(WatchEvent::Bookmark(b)))) => {
                        version = b.metadata.resource_version;
                        m.alive();
                    }
                    Ok(Some(Ok(WatchEvent::Error(e)))) => {
                        if e.code == 410 {
                            tracing::info!("the watch's version was compacted away; listing again");
                        } else {
                            tracing::warn!(code = e.code, message = %e.message, "the watch failed; listing again");
                        }
                        m.with(|s| s.synced = false);
                        continue 'list;
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "the watch broke; listing again");
                        m.with(|s| s.synced = false);
                        drop(m);
                        failures += 1;
                        tokio::time::sleep(pause(failures)).await;
                        continue 'list;
                    }
                }
            }
        }
    }
}

/// Labels this service's objects that were written before components
/// were (managed-by only, named with its prefix), so its watch sees them.
/// A conflict or failure leaves the object for the next list.
async fn adopt(api: &Api<Secret>, owner: &Owner) {
    let unlabelled = format!("{}={},!{COMPONENT_LABEL}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1);
    let listed = match api.list(&ListParams::default().labels(&unlabelled)).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list unlabelled store objects");
            return;
        }
    };
    for mut secret in listed.items {
        let Some(name) = secret.metadata.name.clone().filter(|n| owner.owns(n)) else { continue };
        secret
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(COMPONENT_LABEL.into(), owner.component.clone());
        secret.metadata.managed_fields = None;
        match api.replace(&name, &PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(object = %name, component = %owner.component, "labelled a store object with its component")
            }
            Err(e) => tracing::warn!(object = %name, error = %e, "cannot label a store object with its component"),
        }
    }
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
            mirror: None,
            owner: None,
            fence: None,
        }
    }

    /// Answers from memory only while `fence` holds, and tells it of every
    /// write before the write returns.
    pub fn fenced(mut self, fence: Arc<dyn Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Makes sure memory holds `object` at `version` or newer: reads it
    /// from the API server unless it does already.
    pub async fn catch_up(&self, object: &str, version: u64) -> Result<()> {
        let Some(mirror) = &self.mirror else { return Ok(()) };
        if mirror.version(object).is_some_and(|v| v >= version) {
            return Ok(());
        }
        if let Some(secret) = self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))? {
            // What else changed since memory's copy (an edit out of band the
            // watch has not delivered) is reported, not swallowed.
            mirror.apply_seen(secret, true);
        }
        Ok(())
    }

    /// Lists this service's objects from the API server into memory (what
    /// memory holds that is newer stays).
    pub async fn catch_up_all(&self) -> Result<()> {
        let Some(mirror) = &self.mirror else { return Ok(()) };
        let selector = match &self.owner {
            Some(owner) => owner.selector(),
            None => format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1),
        };
        let list = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| Error::Unavailable { backend: NAME, message: format!("listing the store objects: {e}") })?;
        for secret in list.items {
            mirror.apply_seen(secret, true);
        }
        Ok(())
    }

    fn memory(&self) -> Option<&Mirror> {
        let mirror = self.mirror.as_deref()?;
        self.fence.as_ref().is_none_or(|f| f.holds()).then_some(mirror)
    }

    /// Writes, lists and watches only `owner`'s objects (call before
    /// [`Self::watching`]).
    pub fn owned_by(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Keeps the store objects in memory, listed and watched through
    /// `watch_client` (a client whose read timeout outlasts a watch window:
    /// see [`Self::watch_client`]). Needs the `list` and `watch` verbs.
    pub fn watching(mut self, watch_client: kube::Client) -> Self {
        let mirror = Arc::new(Mirror::default());
        let api = Api::namespaced(watch_client, &self.namespace);
        tokio::spawn(mirror_loop(Arc::downgrade(&mirror), api, self.owner.clone()));
        self.mirror = Some(mirror);
        self
    }

    /// A client for [`Self::watching`]: as [`Self::client`], with a read
    /// timeout past a watch window.
    pub async fn watch_client(api_url: Option<&str>, namespace: &str, timeout: Duration) -> Result<kube::Client> {
        Self::client_with(api_url, namespace, timeout, WATCH_WINDOW + WATCH_GRACE).await
    }

    /// A client from an explicit API URL (for example `kubectl proxy`'s
    /// `http://127.0.0.1:8001`), or inferred from `KUBECONFIG`, the default
    /// kubeconfig or the in-cluster service account.
    ///
    /// Every API call is bounded by `timeout`. kube's own retry layer is
    /// turned off: it retries 503s for minutes, and a caller waiting on a
    /// secret is better told at once that the API server is unavailable.
    pub async fn client(api_url: Option<&str>, namespace: &str, timeout: Duration) -> Result<kube::Client> {
        Self::client_with(api_url, namespace, timeout, timeout).await
    }

    async fn client_with(
        api_url: Option<&str>,
        namespace: &str,
        timeout: Duration,
        read_timeout: Duration,
    ) -> Result<kube::Client> {
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
        config.read_timeout = Some(read_timeout);
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

/// A write the API server may have received and applied: anything but a
/// failure to connect or an answer (a timeout while waiting for the
/// answer, a connection lost mid-call).
fn may_have_landed(e: &kube::Error) -> bool {
    match e {
        kube::Error::HyperError(_) => true,
        kube::Error::Service(inner) => {
            !inner.downcast_ref::<hyper_util::client::legacy::Error>().is_some_and(|h| h.is_connect())
        }
        _ => false,
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
        Ok(StoreBackend::<E>::read_shared(self, object).await?.map(|e| (*e).clone()))
    }

    async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, E> {
        if let Some(found) = self.memory().and_then(|m| m.get(object)) {
            return Ok(found);
        }
        let secret = self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))?;
        Ok(secret.map(|s| decode(object, s).map(|(entries, _)| Arc::new(entries))).transpose()?)
    }

    async fn read_current(&self, object: &str) -> Result<Option<Entries>, E> {
        let secret = self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))?;
        if let (Some(mirror), Some(secret)) = (&self.mirror, &secret) {
            mirror.apply_seen(secret.clone(), true);
        }
        Ok(secret.map(|s| decode(object, s).map(|(entries, _)| entries)).transpose()?)
    }

    /// Changes before the first list are not reported: there is nothing to
    /// compare them with. This replica's own writes, and those another
    /// replica announced, are in memory before the watch reports them.
    fn observe(&self, observer: Arc<dyn Observer>) {
        if let Some(mirror) = &self.mirror {
            let _ = mirror.observer.set(observer);
        }
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.mirror.as_ref()?.snapshot()
    }

    fn watched(&self, for_at_least: Duration) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.trusted_for(for_at_least))
    }

    async fn modify(&self, object: &str, change: &mut Change<'_, E>) -> Result<Version, E> {
        let version = self.write(object, change).await?;
        if let Some(fence) = &self.fence {
            fence.written(object, version).await?;
        }
        Ok(Some(version))
    }
}

impl KubernetesBackend {
    /// One read-modify-write; the resourceVersion written.
    async fn write<E: StoreError>(&self, object: &str, change: &mut Change<'_, E>) -> Result<u64, E> {
        let lock = self.lock(object);
        let _guard = lock.lock().await;
        let mut delays = self.backoff.build();
        let mut conflicts = 0usize;
        // The first attempt starts from memory (the watch's copy, which has
        // this process's own last write): one request instead of a GET and
        // a PUT. The write names the resourceVersion it started from, so a
        // copy that is behind only costs a conflict, and the next attempt
        // reads the object from the API server.
        let mut remembered = self.mirror.as_ref().and_then(|m| m.for_write(object));
        loop {
            let from_memory = remembered.is_some();
            let (exists, mut entries, meta) = match remembered.take() {
                Some(Some((entries, meta))) => (true, entries, meta),
                Some(None) => (false, Entries::new(), ObjectMeta::default()),
                None => match self.api.get_opt(object).await.map_err(|e| self.api_error(object, e))? {
                    Some(s) => {
                        // Memory was behind: what it missed is reported
                        // before this write moves it past.
                        if let Some(m) = &self.mirror {
                            m.apply_seen(s.clone(), true);
                        }
                        let (entries, meta) = decode(object, s)?;
                        (true, entries, meta)
                    }
                    None => (false, Entries::new(), ObjectMeta::default()),
                },
            };
            change(&mut entries)?;
            let secret = encode(object, meta, &entries, self.owner.as_ref())?;
            let mut guard = match &self.mirror {
                Some(m) => m.writing(object),
                None => WriteGuard { mirror: None, object, written: None },
            };
            let written = if exists {
                self.api.replace(object, &PostParams::default(), &secret).await
            } else {
                self.api.create(&PostParams::default(), &secret).await
            };
            match written {
                Ok(stored) => {
                    let version = version_of(&stored);
                    guard.written = Some(version);
                    // Read your own writes: memory has it before the event.
                    if let Some(m) = &self.mirror {
                        m.apply(stored);
                    }
                    drop(guard);
                    if conflicts > 0 {
                        tracing::debug!(object, conflicts, "write succeeded after conflicts");
                    }
                    return Ok(version);
                }
                // Memory was behind: read the object and try again at once.
                Err(e) if is_conflict(&e) && from_memory => continue,
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
                Err(e) if may_have_landed(&e) => {
                    return Err(
                        Error::Unanswered { backend: NAME, message: format!("writing secret {object}: {e}") }.into()
                    );
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
    if let Some(records) = meta.annotations.as_ref().and_then(|a| a.get(REQUESTS_ANNOTATION)) {
        let value = SecretValue::new(records.as_bytes().to_vec());
        entries.insert(REQUESTS_ENTRY.to_string(), Entry { value, created_at: fallback, updated_at: fallback });
    }
    for (key, ByteString(bytes)) in secret.data.unwrap_or_default() {
        let (created_at, updated_at) = times.get(&key).map_or((fallback, fallback), |t| (t.0.time(), t.1.time()));
        entries.insert(key, Entry { value: SecretValue::new(bytes), created_at, updated_at });
    }
    Ok((entries, meta))
}

/// The Secret to write: the metadata that was read (so `resourceVersion`
/// makes the write conditional), our label and timestamps, and the data.
fn encode(object: &str, mut meta: ObjectMeta, entries: &Entries, owner: Option<&Owner>) -> Result<Secret> {
    let keys = || entries.iter().filter(|(k, _)| k.as_str() != REQUESTS_ENTRY);
    let times: BTreeMap<&str, Times> =
        keys().map(|(k, e)| (k.as_str(), Times(Stamp::of(e.created_at), Stamp::of(e.updated_at)))).collect();
    let times = serde_json::to_string(&times).map_err(|e| Error::Internal(format!("cannot encode timestamps: {e}")))?;
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(TIMESTAMPS_ANNOTATION.to_string(), times);
    match entries.get(REQUESTS_ENTRY) {
        Some(records) => annotations
            .insert(REQUESTS_ANNOTATION.to_string(), String::from_utf8_lossy(records.value.expose()).into_owned()),
        None => annotations.remove(REQUESTS_ANNOTATION),
    };
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
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(MANAGED_BY_LABEL.0.into(), MANAGED_BY_LABEL.1.into());
    if let Some(owner) = owner {
        labels.insert(COMPONENT_LABEL.into(), owner.component.clone());
    }
    meta.managed_fields = None;
    Ok(Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(keys().map(|(k, e)| (k.clone(), ByteString(e.value.expose().to_vec()))).collect()),
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
        let secret =
            encode("s", ObjectMeta::default(), &entries(4_000, 30), None).expect("4,000 keys of 30 characters fit");
        let (decoded, _) = decode("s", secret).unwrap();
        assert_eq!(decoded.len(), 4_000);
    }

    #[test]
    fn past_the_annotation_limit_the_error_names_that_limit_not_the_size_limit() {
        let err = encode("s", ObjectMeta::default(), &entries(5_000, 40), None).unwrap_err();
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

    #[test]
    fn idempotency_records_live_in_an_annotation_never_in_the_data() {
        let mut with_records = entries(2, 3);
        let now = Utc::now();
        let records = Entry { value: SecretValue::new(br#"{"r-1":{}}"#.to_vec()), created_at: now, updated_at: now };
        with_records.insert(REQUESTS_ENTRY.into(), records);
        let secret = encode("s", ObjectMeta::default(), &with_records, None).unwrap();
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data.len(), 2, "only the keys are data: {:?}", data.keys().collect::<Vec<_>>());
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[REQUESTS_ANNOTATION], r#"{"r-1":{}}"#);
        assert!(!annotations[TIMESTAMPS_ANNOTATION].contains(REQUESTS_ENTRY));
        let (decoded, meta) = decode("s", secret).unwrap();
        assert_eq!(decoded[REQUESTS_ENTRY].value.expose(), br#"{"r-1":{}}"#);
        // Written again without records: the annotation goes.
        let secret = encode("s", meta, &entries(2, 3), None).unwrap();
        assert!(!secret.metadata.annotations.unwrap().contains_key(REQUESTS_ANNOTATION));
    }
}
