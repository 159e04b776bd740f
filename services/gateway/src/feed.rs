//! The change feed (`WatchSecretChanges`): follows the change log the
//! authz-service keeps, filters it for the watcher, and, when asked,
//! coalesces it into one message per affected workload per window.
//!
//! Who may watch what: platform admins and platform services acting for
//! themselves see every domain; anyone else names a domain and needs
//! LIST_SECRETS there, and sees that domain's secrets, its Vault configs'
//! keys, and the global secrets its workloads fall back to, with each
//! change's reach cut to that domain's workloads. The permission is asked
//! again while the stream runs, so a revoke ends it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use secrets_common::{
    authz::{AuthzClient, Question},
    changes::ChangeLogClient,
    error::invalid_argument,
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::follow_changes_response::Event as Upstream,
    v1::{self as pb, Permission, watch_secret_changes_response::Event},
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::auth::{Caller, RpcGroup, TokenKind};

/// The longest coalescing window.
pub const MAX_COALESCE_SECONDS: u32 = 3_600;
/// Workload ids one watch may filter on.
pub const MAX_WORKLOAD_IDS: usize = 1_000;
/// How often a watcher's permission is asked again while it receives.
const RECHECK: Duration = Duration::from_secs(10);
/// Coalesced: workloads one window collects at most, and changes per
/// workload; past either, the window closes early (a message stays well
/// under a client's 4 MiB limit).
const MAX_PENDING_WORKLOADS: usize = 10_000;
const MAX_CHANGES_PER_WORKLOAD: usize = 1_000;

#[derive(Clone)]
pub struct Feed {
    pub log: ChangeLogClient,
    pub authz: AuthzClient,
    /// Turns true when this gateway starts shutting down: open streams end
    /// at once with UNAVAILABLE (rather than holding the shutdown for its
    /// whole grace), and new ones are refused, so watchers reconnect to
    /// another replica with their cursor.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// Why a stream ended or was refused while this gateway shuts down.
fn shutting_down() -> Status {
    Status::unavailable(
        "this gateway is shutting down; reconnect (to any gateway) with after_revision set to the last cursor \
         received",
    )
}

/// A stream's answers.
pub type Answers = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchSecretChangesResponse, Status>>;

/// What one watcher may see and asked to see.
#[derive(Clone, Debug)]
struct Filter {
    /// `None`: every domain.
    domain: Option<String>,
    source: Option<pb::SourceType>,
    kinds: Vec<i32>,
    ids: Vec<String>,
}

impl Filter {
    fn workload_matches(&self, w: &pb::WorkloadRef) -> bool {
        self.domain.as_ref().is_none_or(|d| &w.domain == d)
            && (self.kinds.is_empty() || self.kinds.contains(&w.kind))
            && (self.ids.is_empty() || self.ids.contains(&w.id))
    }

    /// The change as this watcher may see it, or `None`.
    fn admit(&self, mut change: pb::SecretChange) -> Option<pb::SecretChange> {
        let source = change.source.as_ref().map(|s| s.r#type).unwrap_or_default();
        if self.source.is_some_and(|s| s as i32 != source) {
            return None;
        }
        let reach = change.reach.get_or_insert_with(Default::default);
        if let Some(domain) = &self.domain {
            let global = change.scope == pb::Scope::Global as i32;
            let own = !global && change.scope != pb::Scope::Admin as i32 && &change.domain == domain;
            // Only this domain's workloads, and their count: never what
            // other domains have.
            reach.workloads.retain(|w| &w.domain == domain);
            reach.total = reach.workloads.len() as u32;
            let reaches_it = global && !reach.workloads.is_empty();
            if !own && !reaches_it {
                return None;
            }
        }
        if (!self.kinds.is_empty() || !self.ids.is_empty()) && !reach.workloads.iter().any(|w| self.workload_matches(w))
        {
            return None;
        }
        Some(change)
    }
}

fn answer(cursor: u64, event: Event) -> Result<pb::WatchSecretChangesResponse, Status> {
    Ok(pb::WatchSecretChangesResponse { cursor, event: Some(event) })
}

impl Feed {
    /// Checks the request and the caller, then streams.
    pub async fn watch(&self, caller: &Caller, request: pb::WatchSecretChangesRequest) -> Result<Answers, Status> {
        caller.require(RpcGroup::Workloads, "WatchSecretChanges")?;
        if *self.closing.borrow() {
            return Err(shutting_down());
        }
        let filter = Filter {
            domain: match request.domain.as_str() {
                "" => None,
                d => {
                    validate::domain("domain", d).map_err(invalid_argument)?;
                    Some(d.to_string())
                }
            },
            source: match pb::SourceType::try_from(request.source) {
                Ok(pb::SourceType::Unspecified) => None,
                Ok(s) => Some(s),
                Err(_) => {
                    return Err(invalid_argument(FieldViolation::new("source", "must be KUBERNETES, VAULT or unset")));
                }
            },
            kinds: request.workload_kinds.clone(),
            ids: request.workload_ids.clone(),
        };
        for (i, k) in request.workload_kinds.iter().enumerate() {
            if !matches!(pb::WorkloadKind::try_from(*k), Ok(k) if k != pb::WorkloadKind::Unspecified) {
                return Err(invalid_argument(FieldViolation::new(
                    format!("workload_kinds[{i}]"),
                    format!("{k} is not a workload kind; use WORKLOAD_KIND_SPARK_JOB, WORKLOAD_KIND_COMPUTE, ..."),
                )));
            }
        }
        if request.workload_ids.len() > MAX_WORKLOAD_IDS {
            return Err(invalid_argument(FieldViolation::new("workload_ids", format!("at most {MAX_WORKLOAD_IDS}"))));
        }
        for (i, id) in request.workload_ids.iter().enumerate() {
            validate::workload_id(&format!("workload_ids[{i}]"), id).map_err(invalid_argument)?;
        }
        if request.coalesce_seconds > MAX_COALESCE_SECONDS {
            return Err(invalid_argument(FieldViolation::new(
                "coalesce_seconds",
                format!("must be 0 (every change) or 1 to {MAX_COALESCE_SECONDS}"),
            )));
        }
        if i64::try_from(request.after_revision).is_err() {
            return Err(invalid_argument(FieldViolation::new("after_revision", "is past any revision")));
        }
        self.authorize(caller, &filter).await?;
        let upstream = self.log.follow(request.after_revision).await?;
        let (tx, rx) = mpsc::channel(64);
        let (feed, caller) = (self.clone(), caller.clone());
        let window = (request.coalesce_seconds > 0).then(|| Duration::from_secs(request.coalesce_seconds.into()));
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            // Shutdown ends the relay wherever it waits: on the log, on a
            // permission check, or on a watcher too slow to take its messages.
            let relayed = tokio::select! {
                relayed = feed.relay(&caller, filter, window, request.after_revision, upstream, &tx) => relayed,
                _ = closing.wait_for(|c| *c) => Err(shutting_down()),
            };
            if let Err(e) = relayed {
                // Once shutting down, a watcher too slow to take the error
                // only sees the stream end.
                tokio::select! {
                    biased;
                    _ = tx.send(Err(e.clone())) => {}
                    _ = closing.wait_for(|c| *c) => {
                        let _ = tx.try_send(Err(e));
                    }
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Every domain: platform admins and platform services acting for
    /// themselves. One domain: LIST_SECRETS there.
    async fn authorize(&self, caller: &Caller, filter: &Filter) -> Result<(), Status> {
        let principal = &caller.principal;
        if caller.kind == TokenKind::Service && caller.principal == caller.own {
            // A platform component for itself: every domain, or one.
            return Ok(());
        }
        let (question, action) = match &filter.domain {
            None => (
                Question::domain(principal, Permission::PlatformAdmin, None),
                "watch every domain's secrets (set domain to watch one)".to_string(),
            ),
            Some(d) => (
                Question::domain(principal, Permission::ListSecrets, Some(d)),
                format!("watch the secrets of domain {d:?}"),
            ),
        };
        let answer = caller.decide(&self.authz, vec![question.with_groups(&caller.member_of)]).await?.remove(0);
        if answer.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{principal} may not {action}: {}", answer.reason)))
        }
    }

    /// Relays the log to one watcher until either side goes.
    async fn relay(
        &self,
        caller: &Caller,
        filter: Filter,
        window: Option<Duration>,
        after: u64,
        mut upstream: tonic::Streaming<secrets_proto::internal::v1::FollowChangesResponse>,
        tx: &mpsc::Sender<Result<pb::WatchSecretChangesResponse, Status>>,
    ) -> Result<(), Status> {
        // Where a watcher resumes to miss nothing: everything up to it has
        // been delivered (or did not concern it).
        let mut delivered = after;
        // The newest revision read from the log.
        let mut read = after;
        let mut pending: BTreeMap<(String, i32, String), pb::WorkloadChanges> = BTreeMap::new();
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut checked = Instant::now();
        loop {
            let next = tokio::select! {
                () = tx.closed() => return Ok(()),
                () = async { if let Some(at) = flush_at { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => None,
                message = upstream.message() => Some(message.map_err(|s| secrets_common::error::from_upstream(secrets_common::changes::CHANGE_LOG, s))?),
            };
            let Some(message) = next else {
                // The window closed: one message per workload, then where
                // the stream stands (to a watcher still allowed to see it).
                flush_at = None;
                self.authorize(caller, &filter).await?;
                checked = Instant::now();
                for (_, changes) in std::mem::take(&mut pending) {
                    if tx.send(answer(delivered, Event::Workload(changes))).await.is_err() {
                        return Ok(());
                    }
                }
                delivered = read;
                if tx.send(answer(delivered, Event::CaughtUp(true))).await.is_err() {
                    return Ok(());
                }
                continue;
            };
            let Some(message) = message else { return Ok(()) };
            if checked.elapsed() >= RECHECK {
                self.authorize(caller, &filter).await?;
                checked = Instant::now();
            }
            match message.event {
                Some(Upstream::Change(change)) => {
                    read = change.revision;
                    let Some(change) = filter.admit(change) else {
                        if window.is_none() || pending.is_empty() {
                            delivered = read;
                        }
                        continue;
                    };
                    match window {
                        None => {
                            delivered = read;
                            if tx.send(answer(delivered, Event::Change(change))).await.is_err() {
                                return Ok(());
                            }
                        }
                        Some(window) => {
                            let workloads = change.reach.as_ref().map(|r| r.workloads.clone()).unwrap_or_default();
                            // Each workload's message names its changes; the
                            // reach of each would only repeat it.
                            let mut bare = change.clone();
                            bare.reach = None;
                            let mut full = false;
                            for w in workloads.into_iter().filter(|w| filter.workload_matches(w)) {
                                let slot =
                                    pending.entry((w.domain.clone(), w.kind, w.id.clone())).or_insert_with(|| {
                                        pb::WorkloadChanges { workload: Some(w.clone()), changes: Vec::new() }
                                    });
                                slot.changes.push(bare.clone());
                                full |= slot.changes.len() >= MAX_CHANGES_PER_WORKLOAD;
                            }
                            full |= pending.len() >= MAX_PENDING_WORKLOADS;
                            if pending.is_empty() {
                                delivered = read;
                            } else if full {
                                flush_at = Some(tokio::time::Instant::now());
                            } else if flush_at.is_none() {
                                flush_at = Some(tokio::time::Instant::now() + window);
                            }
                        }
                    }
                }
                Some(Upstream::ResyncRequired(resync)) => {
                    read = resync.oldest_revision.saturating_sub(1);
                    pending.clear();
                    flush_at = None;
                    delivered = read;
                    if tx.send(answer(delivered, Event::ResyncRequired(resync))).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Upstream::CaughtUp(revision)) => {
                    read = read.max(revision);
                    if pending.is_empty() {
                        delivered = read;
                        if tx.send(answer(delivered, Event::CaughtUp(true))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(domain: &str, id: &str) -> pb::WorkloadRef {
        pb::WorkloadRef {
            domain: domain.into(),
            kind: pb::WorkloadKind::SparkJob as i32,
            id: id.into(),
            name: id.into(),
        }
    }

    fn change(scope: pb::Scope, domain: &str, reach: Vec<pb::WorkloadRef>) -> pb::SecretChange {
        pb::SecretChange {
            revision: 7,
            scope: scope as i32,
            domain: domain.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.into() }),
            key: "db".into(),
            reach: Some(pb::SecretReach { total: reach.len() as u32, workloads: reach, revision: 7 }),
            ..Default::default()
        }
    }

    fn for_domain(d: &str) -> Filter {
        Filter { domain: Some(d.into()), source: None, kinds: Vec::new(), ids: Vec::new() }
    }

    #[test]
    fn a_domain_watcher_sees_its_secrets_and_the_global_ones_reaching_it_with_only_its_own_workloads() {
        let f = for_domain("sales");
        assert!(f.admit(change(pb::Scope::Domain, "sales", vec![])).is_some());
        assert!(f.admit(change(pb::Scope::Domain, "hr", vec![])).is_none());
        assert!(f.admit(change(pb::Scope::Admin, "", vec![])).is_none());
        assert!(f.admit(change(pb::Scope::Global, "", vec![workload("hr", "a")])).is_none());
        let seen = f.admit(change(pb::Scope::Global, "", vec![workload("hr", "a"), workload("sales", "b")])).unwrap();
        let reach = seen.reach.unwrap();
        assert_eq!(reach.workloads, [workload("sales", "b")], "another domain's workload is never named");
        assert_eq!(reach.total, 1);
    }

    #[test]
    fn workload_filters_keep_only_changes_that_reach_them() {
        let f =
            Filter { domain: None, source: Some(pb::SourceType::Kubernetes), kinds: Vec::new(), ids: vec!["b".into()] };
        assert!(f.admit(change(pb::Scope::Domain, "sales", vec![workload("sales", "a")])).is_none());
        assert!(f.admit(change(pb::Scope::Domain, "sales", vec![workload("sales", "b")])).is_some());
        let vault = Filter { source: Some(pb::SourceType::Vault), ids: Vec::new(), ..f };
        assert!(vault.admit(change(pb::Scope::Domain, "sales", vec![])).is_none());
    }
}
