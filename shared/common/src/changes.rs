//! The client of the change log (served by the authz-service), which the
//! secret-service and the vault-config-service append to, and the
//! announcement both make after a change: the reach (from the usage index)
//! and the change recorded with it. A change saved while the log cannot
//! take it is announced later, retried in the background, so the feed
//! records it late rather than never.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use secrets_proto::{
    internal::v1::{self as internal, change_log_client::ChangeLogClient as Grpc},
    v1 as pb,
};
use tonic::Status;

use crate::{
    auth::{InternalChannel, InternalClient},
    error::from_upstream,
    observe::TracedChannel,
};

/// How errors name the log.
pub const CHANGE_LOG: &str = "change log (authz-service)";
/// Workloads an event names; its reach's `total` counts them all.
pub const REACH_LIMIT: u32 = 1_000;
/// How long a change's caller waits for the announcement before it is
/// left to the background.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);
/// Announcements waiting in the background at most; past that a change is
/// logged as unannounced (the store watch still reports Kubernetes changes).
const MAX_DEFERRED: usize = 10_000;
/// How long a deferred announcement is retried.
const DEFER_FOR: Duration = Duration::from_secs(3_600);

#[derive(Clone)]
pub struct ChangeLogClient {
    inner: Grpc<InternalChannel>,
}

impl ChangeLogClient {
    pub fn new(channel: TracedChannel, client: InternalClient) -> Self {
        Self { inner: Grpc::with_interceptor(channel, client) }
    }

    /// Follows the log after `after_revision` (0: from its end).
    pub async fn follow(
        &self,
        after_revision: u64,
    ) -> Result<tonic::Streaming<internal::FollowChangesResponse>, Status> {
        Ok(self
            .inner
            .clone()
            .follow(internal::FollowChangesRequest { after_revision })
            .await
            .map_err(|s| from_upstream(CHANGE_LOG, s))?
            .into_inner())
    }
}

/// Where announcements go: the change log, or in a unit test, a list.
#[tonic::async_trait]
pub trait ChangeSink: Send + Sync {
    /// Records the changes; their revisions, in order.
    async fn append(&self, changes: Vec<internal::LoggedChange>) -> Result<Vec<u64>, Status>;
}

#[tonic::async_trait]
impl ChangeSink for ChangeLogClient {
    async fn append(&self, changes: Vec<internal::LoggedChange>) -> Result<Vec<u64>, Status> {
        Ok(self
            .inner
            .clone()
            .append(internal::AppendChangesRequest { changes })
            .await
            .map_err(|s| from_upstream(CHANGE_LOG, s))?
            .into_inner()
            .revisions)
    }
}

/// One announcement: finds the reach and records the change with it; the
/// reach with the change's revision.
pub type Announcement = Arc<dyn Fn() -> BoxFuture<'static, Result<pb::SecretReach, Status>> + Send + Sync>;

/// Makes announcements: at once when the log answers within
/// [`ANNOUNCE_WAIT`], else again in the background with backoff.
#[derive(Clone, Default)]
pub struct Announcer {
    deferred: Arc<AtomicUsize>,
}

impl Announcer {
    /// The reach of a change, with its revision; `None` when it could not
    /// be recorded in time (it is then retried in the background).
    pub async fn announce(&self, what: &str, announcement: Announcement) -> Option<pb::SecretReach> {
        match tokio::time::timeout(ANNOUNCE_WAIT, announcement()).await {
            Ok(Ok(reach)) => return Some(reach),
            Ok(Err(e)) => {
                tracing::warn!(change = what, error = %e.message(), "the change is saved; announcing it in the background")
            }
            Err(_) => tracing::warn!(
                change = what,
                "the change is saved; its announcement is slow, going on in the background"
            ),
        }
        if self.deferred.fetch_add(1, Ordering::SeqCst) >= MAX_DEFERRED {
            self.deferred.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(change = what, "too many changes wait for the change log: this one is not announced");
            return None;
        }
        let (deferred, what) = (self.deferred.clone(), what.to_string());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut delay = Duration::from_millis(500);
            loop {
                tokio::time::sleep(delay).await;
                match announcement().await {
                    Ok(reach) => {
                        tracing::info!(change = %what, revision = reach.revision, "a deferred change is announced");
                        break;
                    }
                    Err(e) if started.elapsed() < DEFER_FOR => {
                        tracing::debug!(change = %what, error = %e.message(), "announcing a change failed again");
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        tracing::error!(change = %what, error = %e.message(), "a change could not be announced for an hour; giving up");
                        break;
                    }
                }
            }
            deferred.fetch_sub(1, Ordering::SeqCst);
        });
        None
    }

    /// Announcements waiting in the background.
    pub fn deferred(&self) -> usize {
        self.deferred.load(Ordering::SeqCst)
    }
}

/// The reach of a usage-index answer (with no revision yet).
pub fn reach_of(found: internal::FindUsagesResponse) -> pb::SecretReach {
    pb::SecretReach {
        workloads: found.usages.into_iter().filter_map(|u| u.workload).collect(),
        total: found.total,
        revision: 0,
    }
}

/// Now, as the feed's timestamps are.
pub fn now() -> prost_types::Timestamp {
    let t = chrono::Utc::now();
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}
