//! The secret service's rules around the store: who may list or change
//! which scope, and delete protection (a secret saved workloads reference
//! is not deleted unless forced). No gRPC: permission answers come through
//! [`Decisions`] and the usage index through [`Usages`], so the rules are
//! tested with in-memory answers (see the tests below).

use std::sync::Arc;

use secrets_common::{
    SecretValue,
    auth::Acting,
    authz::{Decisions, Question},
    changes::{self, Announcer, ChangeSink},
    usage::{self, Usages},
};
use secrets_proto::{
    internal::v1 as internal,
    v1::{self as pb, Permission},
};
use tonic::Status;

use crate::{
    requests,
    store::{Lookup, Mode, Scope, SecretInfo, SecretStore},
};

#[derive(Clone)]
pub struct Secrets {
    pub store: SecretStore,
    pub authz: Arc<dyn Decisions>,
    pub usage: Arc<dyn Usages>,
    /// The change log every write is announced to.
    pub changes: Arc<dyn ChangeSink>,
    pub announcer: Announcer,
    /// Keeps each secret's announcements in the order of its changes.
    pub order: Arc<InOrder>,
}

/// Announcements of one secret are made one at a time (a lock per stripe
/// of secrets), and the changes the store watch found wait here for their
/// turn: an API write announces the sightings of its secret that came
/// before it first, so the log keeps each secret's changes in order.
pub struct InOrder {
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// (object, key) → changes the watch found, not yet announced.
    sighted: std::sync::Mutex<std::collections::HashMap<(String, String), Vec<secrets_store::ObservedChange>>>,
    /// object → announcements on their way.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Default for InOrder {
    fn default() -> Self {
        Self {
            stripes: (0..256).map(|_| tokio::sync::Mutex::new(())).collect(),
            sighted: Default::default(),
            in_flight: Default::default(),
        }
    }
}

/// An announcement on its way (see [`InOrder::busy`]).
struct Flying {
    order: Arc<InOrder>,
    object: String,
}

impl Drop for Flying {
    fn drop(&mut self) {
        let mut in_flight = self.order.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = in_flight.get_mut(&self.object) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.object);
            }
        }
    }
}

impl InOrder {
    async fn turn(&self, object: &str, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (object, key).hash(&mut h);
        self.stripes[(h.finish() % self.stripes.len() as u64) as usize].lock().await
    }

    fn sight(&self, change: secrets_store::ObservedChange) {
        let mut sighted = self.sighted.lock().unwrap_or_else(|p| p.into_inner());
        sighted.entry((change.object.clone(), change.key.clone())).or_default().push(change);
    }

    /// The sightings of (object, key) that `keep` does not keep, in order
    /// of version.
    fn take(&self, object: &str, key: &str, keep: impl Fn(u64) -> bool) -> Vec<secrets_store::ObservedChange> {
        let mut sighted = self.sighted.lock().unwrap_or_else(|p| p.into_inner());
        let id = (object.to_string(), key.to_string());
        let Some(list) = sighted.get_mut(&id) else { return Vec::new() };
        let (kept, mut taken): (Vec<_>, Vec<_>) = std::mem::take(list).into_iter().partition(|c| keep(c.version));
        if kept.is_empty() {
            sighted.remove(&id);
        } else {
            *list = kept;
        }
        taken.sort_by_key(|c| c.version);
        taken
    }

    /// Whether a change of `object` may still be unannounced: a sighting
    /// waits, or an announcement is on its way.
    pub fn busy(&self, object: &str) -> bool {
        let sighted = self.sighted.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight.get(object).is_some_and(|n| *n > 0) || sighted.keys().any(|(o, _)| o == object)
    }

    /// Counts an announcement of `object` on its way until the guard goes.
    fn flying(self: &Arc<Self>, object: &str) -> Flying {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).entry(object.to_string()).or_default() += 1;
        Flying { order: self.clone(), object: object.to_string() }
    }
}

/// A secret as refusals name it.
fn described(scope: &Scope, key: &str) -> String {
    match scope {
        Scope::Domain(d) => format!("secret {key:?} of domain {d:?}"),
        Scope::Global => format!("global secret {key:?}"),
        Scope::Admin => format!("admin secret {key:?}"),
    }
}

/// How long a change the store watch found waits before it is announced
/// (see [`Secrets::announce_observed`]).
const OBSERVED_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Hands the store watch's findings to [`Secrets::announce_observed`]
/// (weakly: the store's backend holds the observer).
pub struct Observed(pub std::sync::Weak<Secrets>);

impl secrets_store::Observer for Observed {
    fn observed(&self, changes: Vec<secrets_store::ObservedChange>) {
        if let Some(secrets) = self.0.upgrade() {
            secrets.announce_observed(changes);
        }
    }
}

/// What a change did, for the change feed.
struct Changed<'a> {
    /// Who made it through the API; `None` for a change seen in the store.
    principal: Option<&'a Acting>,
    scope: &'a Scope,
    key: &'a str,
    kind: pb::SecretChangeKind,
    /// The store object's version written (`None`: a backend without).
    version: secrets_store::Version,
    /// Found on start for an object that changed while no replica watched
    /// (see `SecretChange.presumed`).
    presumed: bool,
    /// Names the change in place of the one its version gives.
    dedupe: Option<String>,
}

#[derive(Clone, Copy)]
enum Op {
    List,
    Write,
}

impl Secrets {
    /// Creates or updates `key` in `scope`: MANAGE_SECRETS in a domain, a
    /// platform admin for the global and admin secrets.
    pub async fn put(
        &self,
        principal: &Acting,
        scope: &Scope,
        key: &str,
        value: SecretValue,
        mode: Mode,
        request_id: Option<&str>,
    ) -> Result<SecretInfo, Status> {
        Ok(self.put_with_reach(principal, scope, key, value, mode, request_id).await?.0)
    }

    /// [`Secrets::put`], with the change's reach: the saved workloads that
    /// reference the key, and its revision in the change feed. `None` for a
    /// retry answered from the first outcome, or when the usage index or
    /// the change log did not answer in time (the change is then announced
    /// in the background).
    pub async fn put_with_reach(
        &self,
        principal: &Acting,
        scope: &Scope,
        key: &str,
        value: SecretValue,
        mode: Mode,
        request_id: Option<&str>,
    ) -> Result<(SecretInfo, Option<pb::SecretReach>), Status> {
        self.authorize(principal, scope, Op::Write, None).await?;
        let outcome = self.store.put_written(scope, key, value, mode, request_id).await?;
        let info = outcome.value;
        let (verb, kind) = match mode {
            Mode::Create => ("secret created", pb::SecretChangeKind::SecretCreated),
            Mode::Update => ("secret updated", pb::SecretChangeKind::SecretUpdated),
        };
        tracing::info!(%scope, key = %info.key, %principal, "{verb}");
        let reach = match outcome.written {
            Some(version) => {
                self.announce(
                    Changed { principal: Some(principal), scope, key, kind, version, presumed: false, dedupe: None },
                    None,
                )
                .await
            }
            None => None,
        };
        Ok((info, reach))
    }

    /// The saved workloads a change to `key` of `scope` reaches: those that
    /// reference the domain's key, and for a global key, those of the
    /// domains without a key of that name (they fall back to it). `None`
    /// when the key does not exist (a delete then reports NOT_FOUND).
    async fn reach(
        &self,
        scope: &Scope,
        key: &str,
        find: &(
             dyn Fn(
            internal::FindUsagesRequest,
        ) -> futures::future::BoxFuture<'static, Result<internal::FindUsagesResponse, Status>>
                 + Send
                 + Sync
         ),
    ) -> Result<internal::FindUsagesResponse, Status> {
        let query = |source_id: &str, source_ids: Vec<String>| internal::FindUsagesRequest {
            source_type: pb::SourceType::Kubernetes as i32,
            source_id: source_id.to_string(),
            key: key.to_string(),
            source_ids,
            limit: changes::REACH_LIMIT,
        };
        match scope {
            Scope::Admin => Ok(internal::FindUsagesResponse::default()),
            Scope::Domain(d) => find(query(d, Vec::new())).await,
            Scope::Global => {
                let candidates = find(query("", Vec::new())).await?.source_ids;
                let lookup = |scope: Scope| Lookup { scope, key: key.to_string(), global_fallback: false };
                let lookups = candidates
                    .iter()
                    .filter_map(|d| Scope::domain("source_id", d).ok().map(lookup))
                    .collect::<Vec<_>>();
                let own = self.store.read_values(&lookups).await?;
                let falling_back: Vec<String> = lookups
                    .into_iter()
                    .zip(own)
                    .filter(|(_, found)| found.is_none())
                    .filter_map(|(l, _)| match l.scope {
                        Scope::Domain(d) => Some(d),
                        _ => None,
                    })
                    .collect();
                if falling_back.is_empty() {
                    return Ok(internal::FindUsagesResponse::default());
                }
                find(query("", falling_back)).await
            }
        }
    }

    /// Records a change in the change feed with its reach (`known`: found
    /// before the change, as a delete does), after the changes of the same
    /// secret the store watch found before it; the reach with the revision.
    async fn announce(
        &self,
        changed: Changed<'_>,
        known: Option<internal::FindUsagesResponse>,
    ) -> Option<pb::SecretReach> {
        let object = self.store.object_name(changed.scope);
        let _flying = self.order.flying(&object);
        let _turn = self.order.turn(&object, changed.key).await;
        // Sightings before this change first; one of this very change is it.
        let version = changed.version.unwrap_or(0);
        self.announce_sighted(&object, changed.key, |v| v > version, Some(version)).await;
        self.record(changed, known).await
    }

    /// Announces the changes of (object, key) the store watch found that
    /// `keep` does not keep, in order, but the one at version `same` (the
    /// caller's own change). The caller holds its turn.
    async fn announce_sighted(&self, object: &str, key: &str, keep: impl Fn(u64) -> bool, same: Option<u64>) {
        let sightings = self.order.take(object, key, keep);
        let _flying = (!sightings.is_empty()).then(|| self.order.flying(object));
        for c in sightings.into_iter().filter(|c| Some(c.version) != same) {
            let Some(scope) = self.store.scope_of_object(&c.object) else { continue };
            let kind = match c.change {
                secrets_store::KeyChange::Created => pb::SecretChangeKind::SecretCreated,
                secrets_store::KeyChange::Updated => pb::SecretChangeKind::SecretUpdated,
                secrets_store::KeyChange::Deleted => pb::SecretChangeKind::SecretDeleted,
            };
            tracing::info!(%scope, key = %c.key, version = c.version, ?kind, "a secret changed in the store out of band");
            let version = Some(c.version);
            let changed =
                Changed { principal: None, scope: &scope, key: &c.key, kind, version, presumed: false, dedupe: None };
            self.record(changed, None).await;
        }
    }

    /// [`Secrets::announce`] without waiting for the secret's turn.
    async fn record(
        &self,
        changed: Changed<'_>,
        known: Option<internal::FindUsagesResponse>,
    ) -> Option<pb::SecretReach> {
        let (scope, key) = (changed.scope.clone(), changed.key.to_string());
        let object = self.store.object_name(&scope);
        let (pb_scope, domain) = match &scope {
            Scope::Domain(d) => (pb::Scope::Domain, d.clone()),
            Scope::Global => (pb::Scope::Global, String::new()),
            Scope::Admin => (pb::Scope::Admin, String::new()),
        };
        // The same name the store watch gives the change it sees, so it is
        // recorded once; a store without versions has no watch.
        let dedupe_key = match (changed.dedupe, changed.version) {
            (Some(dedupe), _) => dedupe,
            (None, Some(v)) => format!("store:{object}:{v}:{key}"),
            (None, None) => format!("api:{object}:{key}:{}", uuid::Uuid::new_v4()),
        };
        let change = pb::SecretChange {
            revision: 0,
            kind: changed.kind as i32,
            origin: match changed.principal {
                Some(_) => pb::ChangeOrigin::Api,
                None => pb::ChangeOrigin::Store,
            } as i32,
            source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.clone() }),
            scope: pb_scope as i32,
            domain,
            key: key.clone(),
            version: changed.version.map(|v| v.to_string()).unwrap_or_default(),
            changed_at: Some(changes::now()),
            changed_by: changed.principal.map(|p| p.principal.to_string()).unwrap_or_default(),
            reach: None,
            presumed: changed.presumed,
        };
        let what = format!(
            "{} {key:?} of {scope}",
            pb::SecretChangeKind::try_from(changed.kind as i32).unwrap_or_default().as_str_name()
        );
        let this = self.clone();
        let known = Arc::new(std::sync::Mutex::new(known));
        let announcement: changes::Announcement = Arc::new(move || {
            let (this, scope, key, mut change, dedupe_key, known) =
                (this.clone(), scope.clone(), key.clone(), change.clone(), dedupe_key.clone(), known.clone());
            Box::pin(async move {
                let known = known.lock().unwrap_or_else(|p| p.into_inner()).take();
                let found = match known {
                    Some(found) => found,
                    None => {
                        let usage = this.usage.clone();
                        let find = move |q: internal::FindUsagesRequest| {
                            let usage = usage.clone();
                            Box::pin(async move { usage.find(q).await }) as futures::future::BoxFuture<'static, _>
                        };
                        this.reach(&scope, &key, &find).await?
                    }
                };
                let mut reach = changes::reach_of(found);
                change.reach = Some(reach.clone());
                let revisions =
                    this.changes.append(vec![internal::LoggedChange { change: Some(change), dedupe_key }]).await?;
                reach.revision = revisions.first().copied().unwrap_or_default();
                Ok(reach)
            })
        });
        self.announcer.announce(&what, announcement).await
    }

    /// Deletes `key` from `scope` once the caller may change it and no
    /// saved workload would break, or, with `force`, reporting those that do.
    pub async fn delete(
        &self,
        principal: &Acting,
        scope: &Scope,
        key: &str,
        force: bool,
        request_id: Option<&str>,
    ) -> Result<Option<pb::BrokenWorkloads>, Status> {
        Ok(self.delete_with_reach(principal, scope, key, force, request_id).await?.0)
    }

    /// [`Secrets::delete`], with the change's reach (see
    /// [`Secrets::put_with_reach`]).
    pub async fn delete_with_reach(
        &self,
        principal: &Acting,
        scope: &Scope,
        key: &str,
        force: bool,
        request_id: Option<&str>,
    ) -> Result<(Option<pb::BrokenWorkloads>, Option<pb::SecretReach>), Status> {
        secrets_common::validate::secret_key("key", key).map_err(secrets_common::error::invalid_argument)?;
        self.authorize(principal, scope, Op::Write, None).await?;
        // A retry of a delete that landed: answered before the usage check,
        // which would now judge a secret that is gone.
        if self.store.replay(scope, request_id, requests::Op::Delete, key, None).await?.is_some() {
            tracing::info!(%scope, key, %principal, "secret delete retried: already done");
            return Ok((None, None));
        }
        let found = self.guard_delete(scope, key).await?;
        let what = described(scope, key);
        let broken = match &found {
            Some(found) => {
                // A refusal lists the first few; the reach keeps them all.
                let mut listed = found.clone();
                listed.usages.truncate(usage::LISTED_WORKLOADS as usize);
                usage::guard(&what, listed, force)?
            }
            None => None,
        };
        let outcome = self.store.delete_once(scope, key, request_id).await?;
        match &broken {
            Some(b) => {
                tracing::warn!(%scope, key, %principal, broken = b.total, "secret deleted by force while workloads reference it")
            }
            None => tracing::info!(%scope, key, %principal, "secret deleted"),
        }
        let reach = match outcome.written {
            Some(version) => {
                let kind = pb::SecretChangeKind::SecretDeleted;
                let changed =
                    Changed { principal: Some(principal), scope, key, kind, version, presumed: false, dedupe: None };
                self.announce(changed, Some(found.unwrap_or_default())).await
            }
            None => None,
        };
        Ok((broken, reach))
    }

    /// The keys of `scope`: LIST_SECRETS in a domain; the global secrets
    /// need a platform admin, or LIST_SECRETS in `view_domain` when listed
    /// from a domain (for the selector).
    pub async fn list(
        &self,
        principal: &Acting,
        scope: &Scope,
        view_domain: Option<&str>,
    ) -> Result<Vec<SecretInfo>, Status> {
        self.authorize(principal, scope, Op::List, view_domain).await?;
        Ok(self.store.list(scope).await?)
    }

    async fn authorize(
        &self,
        principal: &Acting,
        scope: &Scope,
        op: Op,
        view_domain: Option<&str>,
    ) -> Result<(), Status> {
        let (permission, domain) = match (scope, op) {
            (Scope::Domain(d), Op::List) => (Permission::ListSecrets, Some(d.as_str())),
            (Scope::Domain(d), Op::Write) => (Permission::ManageSecrets, Some(d.as_str())),
            (Scope::Global, Op::List) if view_domain.is_some() => (Permission::ListSecrets, view_domain),
            (Scope::Global | Scope::Admin, _) => (Permission::PlatformAdmin, None),
        };
        let action = match op {
            Op::List => format!("list {scope}"),
            Op::Write => format!("change {scope}"),
        };
        self.authz
            .require(Question::domain(principal, permission, domain).with_groups(&principal.groups), &action)
            .await
    }

    /// Announces the changes the store watch found that no API call here
    /// made (edits out of band), each with its reach. A moment later: a
    /// change another replica made through the API, which this replica's
    /// watch may report first, is then recorded as that replica announced
    /// it (with who made it), and this sighting is recorded once with it.
    /// An API write of the same secret meanwhile announces them first.
    pub fn announce_observed(&self, changes: Vec<secrets_store::ObservedChange>) {
        // (object, key) → the newest version of this batch: later
        // sightings wait for their own delay.
        let mut secrets: Vec<(String, String, u64)> = Vec::new();
        for c in changes {
            match secrets.iter_mut().find(|(o, k, _)| *o == c.object && *k == c.key) {
                Some(s) => s.2 = s.2.max(c.version),
                None => secrets.push((c.object.clone(), c.key.clone(), c.version)),
            }
            self.order.sight(c);
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(OBSERVED_DELAY).await;
            for (object, key, through) in secrets {
                let _turn = this.order.turn(&object, &key).await;
                this.announce_sighted(&object, &key, |v| v > through, None).await;
            }
        });
    }

    /// Announces what changed in the store while no secret-service watched
    /// it (found on start; see [`crate::baselines`]): keys added or removed
    /// as such, every other key as presumed updated. Named by the object's
    /// current version (`gone`: the version it was last seen at), so
    /// replicas starting together, and the watch, record each once.
    pub async fn announce_unwatched(&self, found: crate::baselines::Unwatched) {
        let Some(scope) = self.store.scope_of_object(&found.object) else { return };
        let kind = match found.change {
            secrets_store::KeyChange::Created => pb::SecretChangeKind::SecretCreated,
            secrets_store::KeyChange::Updated => pb::SecretChangeKind::SecretUpdated,
            secrets_store::KeyChange::Deleted => pb::SecretChangeKind::SecretDeleted,
        };
        let presumed = found.change == secrets_store::KeyChange::Updated;
        let (version, dedupe) = match found.gone {
            false => (Some(found.version), None),
            true => (None, Some(format!("store:{}:gone-{}:{}", found.object, found.version, found.key))),
        };
        tracing::info!(%scope, key = %found.key, version = found.version, ?kind, presumed, "a secret changed in the store while no secret-service watched it");
        let changed = Changed { principal: None, scope: &scope, key: &found.key, kind, version, presumed, dedupe };
        self.announce(changed, None).await;
    }

    /// Delete protection: the saved workloads that would break if `key` of
    /// `scope` went (see [`Secrets::reach`]); `None` when the key does not
    /// exist. When the index cannot answer, `UNAVAILABLE` saying nothing
    /// was deleted.
    async fn guard_delete(&self, scope: &Scope, key: &str) -> Result<Option<internal::FindUsagesResponse>, Status> {
        let lookup = Lookup { scope: scope.clone(), key: key.to_string(), global_fallback: false };
        if self.store.read_values(&[lookup]).await?[0].is_none() {
            // Nothing to protect: the delete reports NOT_FOUND.
            return Ok(None);
        }
        let what = described(scope, key);
        let usage = self.usage.clone();
        let find = move |q: internal::FindUsagesRequest| {
            let (usage, what) = (usage.clone(), what.clone());
            Box::pin(async move { usage.find_before_delete(&what, q).await }) as futures::future::BoxFuture<'static, _>
        };
        Ok(Some(self.reach(scope, key, &find).await?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use secrets_common::Principal;
    use secrets_store::embedded::EmbeddedBackend;
    use tonic::Code;

    use super::*;

    /// Grants from a rule; records every question asked.
    struct Grants {
        allow: fn(Permission, Option<&str>) -> bool,
        asked: Mutex<Vec<(Permission, Option<String>)>>,
    }

    #[tonic::async_trait]
    impl Decisions for Grants {
        async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<pb::CheckResponse>, Status> {
            let mut asked = self.asked.lock().unwrap();
            Ok(questions
                .iter()
                .map(|q| {
                    asked.push((q.permission, q.domain.map(str::to_string)));
                    let allowed = (self.allow)(q.permission, q.domain);
                    pb::CheckResponse { allowed, reason: if allowed { "granted" } else { "no grant" }.into() }
                })
                .collect())
        }
    }

    /// The usage index: every domain in `referencing` has one saved
    /// workload using the key; records the queries.
    #[derive(Default)]
    struct Index {
        referencing: Vec<&'static str>,
        queries: Mutex<Vec<internal::FindUsagesRequest>>,
        down: bool,
    }

    #[tonic::async_trait]
    impl Usages for Index {
        async fn find(&self, q: internal::FindUsagesRequest) -> Result<internal::FindUsagesResponse, Status> {
            self.queries.lock().unwrap().push(q.clone());
            if self.down {
                return Err(Status::unavailable("usage index (authz-service): gone"));
            }
            let matches: Vec<&str> = self
                .referencing
                .iter()
                .copied()
                .filter(|d| *d == q.source_id || q.source_ids.iter().any(|s| s == d) || q.source_id.is_empty())
                .filter(|d| q.source_ids.is_empty() || q.source_ids.iter().any(|s| s == d))
                .collect();
            let usages = matches
                .iter()
                .map(|d| internal::WorkloadUsage {
                    workload: Some(pb::WorkloadRef {
                        domain: d.to_string(),
                        kind: pb::WorkloadKind::SparkJob as i32,
                        id: format!("etl-{d}"),
                        name: String::new(),
                    }),
                    references: Vec::new(),
                })
                .collect();
            Ok(internal::FindUsagesResponse {
                total: matches.len() as u32,
                usages,
                source_ids: matches.iter().map(|d| d.to_string()).collect(),
            })
        }
    }

    /// The change log: every change appended, in order.
    #[derive(Default)]
    struct Log {
        changes: Mutex<Vec<internal::LoggedChange>>,
    }

    #[tonic::async_trait]
    impl ChangeSink for Log {
        async fn append(&self, changes: Vec<internal::LoggedChange>) -> Result<Vec<u64>, Status> {
            let mut all = self.changes.lock().unwrap();
            let first = all.len() as u64 + 1;
            all.extend(changes.iter().cloned());
            Ok((first..first + changes.len() as u64).collect())
        }
    }

    struct Fixture {
        secrets: Secrets,
        grants: Arc<Grants>,
        index: Arc<Index>,
        _dir: tempfile::TempDir,
    }

    fn fixture(allow: fn(Permission, Option<&str>) -> bool, index: Index) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<crate::backend::SecretBackend> = Arc::new(EmbeddedBackend::open(dir.path()).unwrap());
        let (grants, index) = (Arc::new(Grants { allow, asked: Mutex::default() }), Arc::new(index));
        let secrets = Secrets {
            store: SecretStore::new(backend, "store"),
            authz: grants.clone(),
            usage: index.clone(),
            changes: Arc::new(Log::default()),
            announcer: Announcer::default(),
            order: Default::default(),
        };
        Fixture { secrets, grants, index, _dir: dir }
    }

    fn alice() -> Acting {
        Acting { principal: Principal::user("alice"), groups: Vec::new() }
    }

    fn value(v: &str) -> SecretValue {
        SecretValue::from(v.to_string())
    }

    fn sales() -> Scope {
        Scope::Domain("sales".into())
    }

    #[tokio::test]
    async fn each_scope_asks_its_own_permission_and_a_refusal_changes_nothing() {
        let f = fixture(|p, d| p == Permission::ManageSecrets && d == Some("sales"), Index::default());
        f.secrets.put(&alice(), &sales(), "db", value("pw"), Mode::Create, None).await.unwrap();
        let refused = f.secrets.put(&alice(), &Scope::Global, "db", value("pw"), Mode::Create, None).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert_eq!(refused.message(), "user:alice may not change the global secrets: no grant");
        assert!(f.secrets.store.list(&Scope::Global).await.unwrap().is_empty(), "a refused write lands nothing");
        let listing = f.secrets.list(&alice(), &sales(), None).await.unwrap_err();
        assert!(listing.message().contains("may not list domain \"sales\""), "{}", listing.message());
        assert_eq!(
            *f.grants.asked.lock().unwrap(),
            [
                (Permission::ManageSecrets, Some("sales".into())),
                (Permission::PlatformAdmin, None),
                (Permission::ListSecrets, Some("sales".into())),
            ]
        );
    }

    #[tokio::test]
    async fn the_global_secrets_are_listed_from_a_domain_with_list_secrets_there() {
        let f = fixture(|p, d| p == Permission::ListSecrets && d == Some("hr"), Index::default());
        assert!(f.secrets.list(&alice(), &Scope::Global, Some("hr")).await.unwrap().is_empty());
        assert_eq!(f.secrets.list(&alice(), &Scope::Global, None).await.unwrap_err().code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_referenced_secret_is_kept_unless_forced_and_a_forced_delete_names_what_broke() {
        let f = fixture(|_, _| true, Index { referencing: vec!["sales"], ..Default::default() });
        f.secrets.put(&alice(), &sales(), "db", value("pw"), Mode::Create, None).await.unwrap();
        let refused = f.secrets.delete(&alice(), &sales(), "db", false, None).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("sales/SPARK_JOB/etl-sales"), "{}", refused.message());
        assert_eq!(f.secrets.store.list(&sales()).await.unwrap().len(), 1, "the secret is kept");
        let broken = f.secrets.delete(&alice(), &sales(), "db", true, None).await.unwrap().expect("broken workloads");
        assert_eq!(broken.total, 1);
        assert!(f.secrets.store.list(&sales()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn deleting_a_global_key_counts_only_the_domains_that_fall_back_to_it() {
        let f = fixture(|_, _| true, Index { referencing: vec!["sales", "hr"], ..Default::default() });
        f.secrets.put(&alice(), &Scope::Global, "db", value("g"), Mode::Create, None).await.unwrap();
        // hr has its own db: its workloads keep working without the global one.
        f.secrets.put(&alice(), &Scope::Domain("hr".into()), "db", value("h"), Mode::Create, None).await.unwrap();
        let refused = f.secrets.delete(&alice(), &Scope::Global, "db", false, None).await.unwrap_err();
        assert!(
            refused.message().contains("etl-sales") && !refused.message().contains("etl-hr"),
            "{}",
            refused.message()
        );
        let last = f.index.queries.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.source_ids, ["sales"]);
    }

    #[tokio::test]
    async fn nothing_is_deleted_blind_and_a_missing_key_never_asks_the_index() {
        let f = fixture(|_, _| true, Index { down: true, ..Default::default() });
        f.secrets.put(&alice(), &sales(), "db", value("pw"), Mode::Create, None).await.unwrap();
        let e = f.secrets.delete(&alice(), &sales(), "db", true, None).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("was not deleted"), "{}", e.message());
        assert_eq!(f.secrets.store.list(&sales()).await.unwrap().len(), 1);

        let queries = f.index.queries.lock().unwrap().len();
        let missing = f.secrets.delete(&alice(), &sales(), "nope", false, None).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(f.index.queries.lock().unwrap().len(), queries, "the index was asked about a missing key");
    }
}
