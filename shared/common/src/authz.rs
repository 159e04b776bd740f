//! The client every service uses to ask the authz service. Fails closed: when
//! the authz service cannot answer, the caller gets `UNAVAILABLE` and nothing
//! is allowed.

use std::collections::HashMap;

use secrets_proto::v1::{
    BatchCheckRequest, CheckRequest, CheckResponse, Permission, authz_service_client::AuthzServiceClient,
};
use tonic::Status;

use crate::{
    Principal,
    auth::{InternalChannel, InternalClient},
    error::from_upstream,
    leases::{Giver, Leased, Memory},
    observe::TracedChannel,
};

pub const AUTHZ_SERVICE: &str = "authz-service";

/// The longest a grant change may wait for decision lease holders (see
/// [`crate::leases::CHANGE_WAIT`]). A caller of grant changes allows this
/// much on top of its usual bound.
pub const GRANT_CHANGE_WAIT: std::time::Duration = crate::leases::CHANGE_WAIT;

#[derive(Clone)]
pub struct AuthzClient {
    inner: AuthzServiceClient<InternalChannel>,
    /// Decisions remembered under a lease (see [`DecisionCache`]).
    cache: Option<DecisionCache>,
}

/// One question for the authz service.
#[derive(Clone, Debug)]
pub struct Question<'a> {
    pub subject: &'a Principal,
    pub permission: Permission,
    pub domain: Option<&'a str>,
    /// For VIEW, UPDATE and USE: the Vault config asked about.
    pub vault_config: Option<&'a str>,
    /// Groups of the subject from its identity provider.
    pub groups: &'a [Principal],
}

impl<'a> Question<'a> {
    /// A domain permission (or PLATFORM_ADMIN, with no domain).
    pub fn domain(subject: &'a Principal, permission: Permission, domain: Option<&'a str>) -> Self {
        Self { subject, permission, domain, vault_config: None, groups: &[] }
    }

    /// VIEW, UPDATE or USE on a Vault config.
    pub fn vault_config(subject: &'a Principal, permission: Permission, id: &'a str) -> Self {
        Self { subject, permission, domain: None, vault_config: Some(id), groups: &[] }
    }
}

impl<'a> Question<'a> {
    /// The same question, counting `groups` as memberships of the subject.
    pub fn with_groups(mut self, groups: &'a [Principal]) -> Self {
        self.groups = groups;
        self
    }
}

/// Whoever answers permission questions: the authz service through
/// [`AuthzClient`], or, in a unit test, a table of answers.
#[tonic::async_trait]
pub trait Decisions: Send + Sync {
    /// Answers `questions` in one round trip, in order, one per question;
    /// fails closed (`UNAVAILABLE`) when they cannot be answered.
    async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<CheckResponse>, Status>;

    /// `Ok(())` when allowed, `PERMISSION_DENIED` saying what `action` needed
    /// and why it was refused otherwise.
    async fn require(&self, question: Question<'_>, action: &str) -> Result<(), Status> {
        let answer = self.batch_check(std::slice::from_ref(&question)).await?.remove(0);
        if answer.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{} may not {action}: {}", question.subject, answer.reason)))
        }
    }
}

#[tonic::async_trait]
impl Decisions for AuthzClient {
    async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<CheckResponse>, Status> {
        AuthzClient::batch_check(self, questions).await
    }
}

impl AuthzClient {
    pub fn new(channel: TracedChannel, client: InternalClient) -> Self {
        Self { inner: AuthzServiceClient::with_interceptor(channel, client), cache: None }
    }

    /// Answers from `cache` while it holds a lease, asking the authz service
    /// only for what it does not remember.
    pub fn with_cache(mut self, cache: DecisionCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Asks several questions in one round trip; answers in order.
    pub async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<CheckResponse>, Status> {
        let checks = questions
            .iter()
            .map(|q| CheckRequest {
                subject: q.subject.to_string(),
                permission: q.permission as i32,
                domain: q.domain.unwrap_or_default().to_string(),
                resource: q.vault_config.map(|id| secrets_proto::v1::Resource {
                    r#type: secrets_proto::v1::ResourceType::VaultConfig as i32,
                    id: id.to_string(),
                }),
                groups: q.groups.iter().map(Principal::to_string).collect(),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let Some(cache) = &self.cache else { return self.ask(checks).await };
        let keys: Vec<String> = checks.iter().map(cache_key).collect();
        let epoch = match cache.lookup(&keys) {
            Lookup::All(answers) => return Ok(answers),
            Lookup::Missing(epoch) => epoch,
        };
        let results = self.ask(checks).await?;
        cache.remember(epoch, keys.into_iter().zip(results.iter().cloned()));
        Ok(results)
    }

    async fn ask(&self, checks: Vec<CheckRequest>) -> Result<Vec<CheckResponse>, Status> {
        let n = checks.len();
        let results = self
            .inner
            .clone()
            .batch_check(BatchCheckRequest { checks })
            .await
            .map_err(|s| from_upstream(AUTHZ_SERVICE, s))?
            .into_inner()
            .results;
        if results.len() != n {
            return Err(Status::unavailable(format!("{AUTHZ_SERVICE}: answered {} of {n} checks", results.len())));
        }
        Ok(results)
    }
}

/// A question as the cache knows it: every field that bears on the answer.
fn cache_key(c: &CheckRequest) -> String {
    let (kind, id) = c.resource.as_ref().map(|r| (r.r#type, r.id.as_str())).unwrap_or((0, ""));
    let mut groups = c.groups.clone();
    groups.sort();
    format!(
        "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{kind}\u{0}{id}\u{0}{}",
        c.subject,
        c.permission,
        c.domain,
        c.bundle,
        groups.join(",")
    )
}

/// Entries one cache holds at most; past it, it starts again empty.
const MAX_DECISIONS: usize = 100_000;

/// Decisions of the authz service, remembered while a lease from it holds
/// (`DecisionLeases` in `decisions.proto`). The authz service returns from a
/// grant change only once this cache has forgotten everything from before
/// it (or its lease has run out), so nothing is answered from before a
/// change that has returned. Without a lease (none yet, the stream lost, or
/// an authz service that offers none) every question is asked.
#[derive(Clone, Default)]
pub struct DecisionCache {
    leased: Leased<Remembered>,
}

#[derive(Default)]
struct Remembered(HashMap<String, CheckResponse>);

impl Memory for Remembered {
    fn clear(&mut self) {
        self.0.clear();
    }
}

enum Lookup {
    All(Vec<CheckResponse>),
    Missing(u64),
}

impl DecisionCache {
    fn lookup(&self, keys: &[String]) -> Lookup {
        let state = self.leased.lock();
        if let Some(memory) = state.memory() {
            let found: Option<Vec<CheckResponse>> = keys.iter().map(|k| memory.0.get(k).cloned()).collect();
            if let Some(answers) = found {
                return Lookup::All(answers);
            }
        }
        Lookup::Missing(state.epoch())
    }

    fn remember(&self, epoch: u64, answers: impl Iterator<Item = (String, CheckResponse)>) {
        let mut state = self.leased.lock();
        let Some(memory) = state.memory_since(epoch) else { return };
        if memory.0.len() >= MAX_DECISIONS {
            state.clear();
            return;
        }
        memory.0.extend(answers);
    }

    /// Whether answers are served from memory now.
    pub fn leased(&self) -> bool {
        self.leased.leased()
    }

    /// Holds a lease from the authz service at `channel` for as long as the
    /// returned task runs, reconnecting when the stream is lost.
    pub fn watch(&self, channel: TracedChannel, client: InternalClient) -> tokio::task::JoinHandle<()> {
        self.leased.watch(Giver::Decisions, channel, client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(allowed: bool) -> CheckResponse {
        CheckResponse { allowed, reason: String::new() }
    }

    fn leased_cache(for_ms: u64) -> DecisionCache {
        let cache = DecisionCache::default();
        cache.leased.lock().lease_for(std::time::Duration::from_millis(for_ms));
        cache
    }

    fn hit(cache: &DecisionCache, key: &str) -> Option<bool> {
        match cache.lookup(&[key.to_string()]) {
            Lookup::All(a) => Some(a[0].allowed),
            Lookup::Missing(_) => None,
        }
    }

    #[test]
    fn answers_are_served_from_memory_only_under_a_lease() {
        let cache = DecisionCache::default();
        let Lookup::Missing(epoch) = cache.lookup(&["q".into()]) else { panic!() };
        cache.remember(epoch, std::iter::once(("q".to_string(), answer(true))));
        assert_eq!(hit(&cache, "q"), None, "no lease: nothing is remembered");

        let cache = leased_cache(60_000);
        let Lookup::Missing(epoch) = cache.lookup(&["q".into()]) else { panic!() };
        cache.remember(epoch, std::iter::once(("q".to_string(), answer(true))));
        assert_eq!(hit(&cache, "q"), Some(true));
        cache.leased.lock().lease_for(std::time::Duration::ZERO);
        assert_eq!(hit(&cache, "q"), None, "an expired lease serves nothing");
    }

    #[test]
    fn an_answer_asked_for_before_a_change_is_not_remembered() {
        let cache = leased_cache(60_000);
        let Lookup::Missing(epoch) = cache.lookup(&["q".into()]) else { panic!() };
        // A change is applied while the question is on its way.
        cache.leased.lock().clear();
        cache.remember(epoch, std::iter::once(("q".to_string(), answer(true))));
        assert_eq!(hit(&cache, "q"), None);
    }

    #[test]
    fn a_batch_is_served_from_memory_only_when_every_answer_is_there() {
        let cache = leased_cache(60_000);
        let Lookup::Missing(epoch) = cache.lookup(&["a".into()]) else { panic!() };
        cache.remember(epoch, std::iter::once(("a".to_string(), answer(false))));
        assert!(matches!(cache.lookup(&["a".into(), "b".into()]), Lookup::Missing(_)));
        assert!(matches!(cache.lookup(&["a".into()]), Lookup::All(a) if !a[0].allowed));
    }

    #[test]
    fn every_field_of_a_question_is_part_of_its_key() {
        let base = CheckRequest {
            subject: "user:a".into(),
            permission: 1,
            domain: "d".into(),
            groups: vec!["group:x".into(), "group:y".into()],
            ..Default::default()
        };
        let mut reordered = base.clone();
        reordered.groups.reverse();
        assert_eq!(cache_key(&base), cache_key(&reordered), "group order does not matter");
        let variants = [
            CheckRequest { subject: "user:b".into(), ..base.clone() },
            CheckRequest { permission: 2, ..base.clone() },
            CheckRequest { domain: "e".into(), ..base.clone() },
            CheckRequest { bundle: "b".into(), ..base.clone() },
            CheckRequest { groups: vec!["group:x".into()], ..base.clone() },
            CheckRequest { resource: Some(secrets_proto::v1::Resource { r#type: 1, id: "r".into() }), ..base.clone() },
        ];
        for v in &variants {
            assert_ne!(cache_key(&base), cache_key(v), "{v:?}");
        }
    }
}
