//! The domain logic of secrets: which object a secret lives in, the key and
//! size rules, create / update / delete / list semantics. Knows nothing about
//! gRPC or about how objects are stored.

use std::{collections::BTreeMap, fmt, sync::Arc};

use chrono::{SubsecRound, Utc};
use secrets_common::{
    SecretValue,
    observe::Metrics,
    validate::{self, MAX_OBJECT_VALUE_BYTES},
};
use tracing::instrument;

use crate::{
    Error, Result,
    backend::{Entries, Entry, GroupCommit, REQUESTS_ENTRY, SecretBackend},
    requests::{self, Op, Requests},
};

/// Where a secret lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Domain(String),
    Global,
    Admin,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Domain(d) => write!(f, "domain {d:?}"),
            Self::Global => f.write_str("the global secrets"),
            Self::Admin => f.write_str("the admin secrets"),
        }
    }
}

impl Scope {
    /// A domain scope, checking the name (reserved names are refused).
    pub fn domain(field: &str, name: &str) -> Result<Self> {
        validate::domain(field, name)?;
        Ok(Self::Domain(name.to_string()))
    }
}

/// What a person may see about a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretInfo {
    pub key: String,
    pub scope: Scope,
    pub created_at: chrono::DateTime<Utc>,
    pub updated_at: chrono::DateTime<Utc>,
}

/// What a write answered, and whether it wrote: `written` is the version
/// of the store object it produced (`Some(None)` for a backend without
/// versions), `None` when a retry was answered from the first outcome.
#[derive(Debug)]
pub struct Outcome<T> {
    pub value: T,
    pub written: Option<secrets_store::Version>,
}

/// One key to read for the resolver.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub scope: Scope,
    pub key: String,
    /// For domain scopes: try the global secrets when the domain lacks the key.
    pub global_fallback: bool,
}

/// The answer to one [`Lookup`].
#[derive(Debug)]
pub struct Found {
    pub scope: Scope,
    pub value: SecretValue,
}

#[derive(Clone)]
pub struct SecretStore {
    backend: Arc<GroupCommit<Error>>,
    prefix: String,
}

impl SecretStore {
    pub fn new(backend: Arc<SecretBackend>, prefix: impl Into<String>) -> Self {
        Self::with_metrics(backend, prefix, None)
    }

    /// The same, with the group commit's metrics.
    pub fn with_metrics(backend: Arc<SecretBackend>, prefix: impl Into<String>, metrics: Option<Metrics>) -> Self {
        Self { backend: Arc::new(GroupCommit::new(backend, metrics)), prefix: prefix.into() }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The store object of a scope: `{prefix}-{domain}`, `{prefix}`, `{prefix}-admin`.
    pub fn object_name(&self, scope: &Scope) -> String {
        match scope {
            Scope::Domain(d) => format!("{}-{d}", self.prefix),
            Scope::Global => self.prefix.clone(),
            Scope::Admin => format!("{}-admin", self.prefix),
        }
    }

    /// The scope whose store object `object` is, if any.
    pub fn scope_of_object(&self, object: &str) -> Option<Scope> {
        let rest = object.strip_prefix(self.prefix.as_str())?;
        match rest {
            "" => Some(Scope::Global),
            "-admin" => Some(Scope::Admin),
            _ => Scope::domain("object", rest.strip_prefix('-')?).ok(),
        }
    }

    /// What memory holds of every store object (see
    /// [`secrets_store::StoreBackend::snapshot`]).
    pub fn snapshot(&self) -> Option<secrets_store::Snapshot> {
        self.backend.backend().snapshot()
    }

    /// Tells `observer` of changes made to the store outside this service.
    pub fn observe(&self, observer: Arc<dyn secrets_store::Observer>) {
        self.backend.backend().observe(observer);
    }

    #[instrument(skip(self, value), fields(backend = self.backend.name(), %scope))]
    pub async fn create(&self, scope: &Scope, key: &str, value: SecretValue) -> Result<SecretInfo> {
        self.put(scope, key, value, Mode::Create, None).await
    }

    #[instrument(skip(self, value), fields(backend = self.backend.name(), %scope))]
    pub async fn update(&self, scope: &Scope, key: &str, value: SecretValue) -> Result<SecretInfo> {
        self.put(scope, key, value, Mode::Update, None).await
    }

    /// The outcome of an earlier request with this `request_id` (see
    /// [`crate::requests`]): `Some` to answer with, without changing
    /// anything; an error when the id was used for another request.
    pub async fn replay(
        &self,
        scope: &Scope,
        request_id: Option<&str>,
        op: Op,
        key: &str,
        value: Option<&SecretValue>,
    ) -> Result<Option<Option<SecretInfo>>> {
        let Some(id) = request_id else { return Ok(None) };
        requests::validate("request_id", id)?;
        let Some(entries) = self.backend.read_shared(&self.object_name(scope)).await? else { return Ok(None) };
        let replayed = Requests::of(&entries).replay(id, op, scope, key, value, &entries).transpose()?;
        if replayed.is_some() {
            // The first attempt may still be handing its change on (value
            // leases): a retry answers only once that is done.
            self.backend.backend().settle().await;
        }
        Ok(replayed)
    }

    /// Creates or updates `key`; with a `request_id`, recorded in the same
    /// write, and a retry answered with the first outcome.
    pub async fn put(
        &self,
        scope: &Scope,
        key: &str,
        value: SecretValue,
        mode: Mode,
        request_id: Option<&str>,
    ) -> Result<SecretInfo> {
        Ok(self.put_written(scope, key, value, mode, request_id).await?.value)
    }

    /// [`SecretStore::put`], saying what was written.
    #[instrument(skip(self, value, request_id), fields(backend = self.backend.name(), %scope))]
    pub async fn put_written(
        &self,
        scope: &Scope,
        key: &str,
        value: SecretValue,
        mode: Mode,
        request_id: Option<&str>,
    ) -> Result<Outcome<SecretInfo>> {
        validate::secret_key("key", key)?;
        validate::secret_value("value", value.len())?;
        if let Some(id) = request_id {
            requests::validate("request_id", id)?;
        }
        let op = match mode {
            Mode::Create => Op::Create,
            Mode::Update => Op::Update,
        };
        if let Some(first) = self.replay(scope, request_id, op, key, Some(&value)).await? {
            let info =
                first.ok_or_else(|| Error::Internal("a create or update was recorded without its times".into()))?;
            return Ok(Outcome { value: info, written: None });
        }
        let object = self.object_name(scope);
        let (key, scope, name) = (key.to_string(), scope.clone(), object.clone());
        let request_id = request_id.map(str::to_string);
        // Queued with the other changes to this object and written with them;
        // a refusal leaves the entries as they were, so the others go ahead.
        let ((info, fresh), version) = self
            .backend
            .apply_versioned(&object, move |entries: &mut Entries| {
                // Records are read only for a change that carries an id.
                let mut requests = request_id.as_ref().map(|_| Requests::of(entries));
                // The same request may have landed since the check above.
                if let (Some(id), Some(requests)) = (&request_id, &requests)
                    && let Some(first) = requests.replay(id, op, &scope, &key, Some(&value), entries)
                {
                    let info =
                        first?.ok_or_else(|| Error::Internal("a write was recorded without its times".into()))?;
                    return Ok((info, false));
                }
                // Milliseconds: what every backend stores and lists.
                let now = Utc::now().trunc_subsecs(3);
                let existing = entries.get(&key);
                let created_at = match (existing, mode) {
                    (Some(_), Mode::Create) => {
                        return Err(Error::AlreadyExists { key: key.clone(), scope: scope.clone() });
                    }
                    (None, Mode::Update) => return Err(Error::NotFound { key: key.clone(), scope: scope.clone() }),
                    (Some(existing), Mode::Update) => existing.created_at,
                    (None, Mode::Create) => now,
                };
                let replaced = existing.map_or(0, |e| e.value.len());
                check_object_size(&name, entries, replaced, value.len())?;
                let info = SecretInfo { key: key.clone(), scope: scope.clone(), created_at, updated_at: now };
                if let (Some(id), Some(requests)) = (&request_id, requests.as_mut()) {
                    requests.add(id, op, &key, Some(&info), now);
                    requests.store(entries, now)?;
                }
                entries.insert(key.clone(), Entry { value: value.clone(), created_at, updated_at: now });
                Ok((info, true))
            })
            .await?;
        Ok(Outcome { value: info, written: fresh.then_some(version) })
    }

    pub async fn delete(&self, scope: &Scope, key: &str) -> Result<()> {
        self.delete_once(scope, key, None).await.map(|_| ())
    }

    /// Deletes `key`; with a `request_id`, recorded in the same write, and
    /// a retry answered OK without deleting anything (`written` is `None`).
    #[instrument(skip(self, request_id), fields(backend = self.backend.name(), %scope))]
    pub async fn delete_once(&self, scope: &Scope, key: &str, request_id: Option<&str>) -> Result<Outcome<()>> {
        validate::secret_key("key", key)?;
        if self.replay(scope, request_id, Op::Delete, key, None).await?.is_some() {
            return Ok(Outcome { value: (), written: None });
        }
        let object = self.object_name(scope);
        // A missing object has no keys: report the key as missing without
        // creating an empty object.
        if self.backend.read_shared(&object).await?.is_none() {
            return Err(Error::NotFound { key: key.to_string(), scope: scope.clone() });
        }
        let (key, scope) = (key.to_string(), scope.clone());
        let request_id = request_id.map(str::to_string);
        let (fresh, version) = self
            .backend
            .apply_versioned(&object, move |entries: &mut Entries| {
                let mut requests = request_id.as_ref().map(|_| Requests::of(entries));
                if let (Some(id), Some(requests)) = (&request_id, &requests)
                    && let Some(first) = requests.replay(id, Op::Delete, &scope, &key, None, entries)
                {
                    return first.map(|_| false);
                }
                if !entries.contains_key(&key) {
                    return Err(Error::NotFound { key: key.clone(), scope: scope.clone() });
                }
                if let (Some(id), Some(requests)) = (&request_id, requests.as_mut()) {
                    let now = Utc::now().trunc_subsecs(3);
                    requests.add(id, Op::Delete, &key, None, now);
                    requests.store(entries, now)?;
                }
                entries.remove(&key);
                Ok(true)
            })
            .await?;
        Ok(Outcome { value: (), written: fresh.then_some(version) })
    }

    #[instrument(skip(self), fields(backend = self.backend.name(), %scope))]
    pub async fn list(&self, scope: &Scope) -> Result<Vec<SecretInfo>> {
        let entries = self.backend.read(&self.object_name(scope)).await?.unwrap_or_default();
        Ok(entries
            .into_iter()
            .filter(|(key, _)| key != REQUESTS_ENTRY)
            .map(|(key, e)| SecretInfo {
                key,
                scope: scope.clone(),
                created_at: e.created_at,
                updated_at: e.updated_at,
            })
            .collect())
    }

    /// Reads values for the resolver. Each store object is read at most once,
    /// however many lookups name it; the global object is read once, and only
    /// when a lookup needs it.
    #[instrument(skip(self, lookups), fields(backend = self.backend.name(), lookups = lookups.len() as i64, objects_read))]
    pub async fn read_values(&self, lookups: &[Lookup]) -> Result<Vec<Option<Found>>> {
        for (i, l) in lookups.iter().enumerate() {
            validate::secret_key(&format!("lookups[{i}].key"), &l.key)?;
        }
        // Shared copies: looking up a key costs the same whatever the
        // object's size.
        let mut objects: BTreeMap<Scope, Arc<Entries>> = BTreeMap::new();
        let load = async |scope: &Scope, objects: &mut BTreeMap<Scope, Arc<Entries>>| -> Result<()> {
            if !objects.contains_key(scope) {
                let entries = self.backend.read_shared(&self.object_name(scope)).await?.unwrap_or_default();
                objects.insert(scope.clone(), entries);
            }
            Ok(())
        };
        for l in lookups {
            load(&l.scope, &mut objects).await?;
        }
        let needs_global = lookups.iter().any(|l| {
            matches!(l.scope, Scope::Domain(_)) && l.global_fallback && !objects[&l.scope].contains_key(&l.key)
        });
        if needs_global {
            load(&Scope::Global, &mut objects).await?;
        }
        tracing::Span::current().record("objects_read", objects.len() as i64);
        Ok(lookups
            .iter()
            .map(|l| {
                let found = |scope: &Scope| {
                    objects
                        .get(scope)
                        .and_then(|o| o.get(&l.key))
                        .map(|e| Found { scope: scope.clone(), value: e.value.clone() })
                };
                found(&l.scope).or_else(|| {
                    (l.global_fallback && matches!(l.scope, Scope::Domain(_))).then(|| found(&Scope::Global)).flatten()
                })
            })
            .collect())
    }
}

/// A create refuses an existing key; an update a missing one.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Create,
    Update,
}

/// Refuses a change that would take the object past the Kubernetes Secret
/// limit (a value of `adding` bytes in place of one of `replacing`), before
/// anything is changed.
fn check_object_size(object: &str, entries: &Entries, replacing: usize, adding: usize) -> Result<()> {
    let total: usize = entries.values().map(|e| e.value.len()).sum::<usize>() - replacing + adding;
    if total > MAX_OBJECT_VALUE_BYTES {
        return Err(Error::TooLarge { object: object.to_string(), total, limit: MAX_OBJECT_VALUE_BYTES });
    }
    Ok(())
}
