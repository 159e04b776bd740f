//! The client of the change log (served by the authz-service), which the
//! secret-service and the vault-config-service append to, and the
//! announcement both make after a change: the reach (from the usage index)
//! and the change recorded with it. A change saved while the log cannot
//! take it is announced later, retried in the background, so the feed
//! records it late rather than never.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use secrets_proto::{
    internal::v1::{self as internal, change_log_client::ChangeLogClient as Grpc},
    v1 as pb,
};
use tonic::{Code, Status};

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
/// The pause after a deferred announcement's first failure, doubling to
/// the second.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Store baselines asked for, or recorded, at a time.
const BASELINE_PAGE: u32 = 500;
/// Key-name bytes one record call carries, about.
const BASELINE_BYTES: usize = 1 << 20;

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

impl ChangeLogClient {
    /// Every store baseline recorded (see `ChangeLog.ListBaselines`), and
    /// whether any ever was.
    pub async fn baselines(&self) -> Result<(Vec<internal::StoreBaseline>, bool), Status> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .inner
                .clone()
                .list_baselines(internal::ListBaselinesRequest { after_object: after, limit: BASELINE_PAGE })
                .await
                .map_err(|s| from_upstream(CHANGE_LOG, s))?
                .into_inner();
            let recorded = page.recorded;
            after = page.baselines.last().map(|b| b.object.clone()).unwrap_or_default();
            all.extend(page.baselines);
            if !page.more || after.is_empty() {
                return Ok((all, recorded));
            }
        }
    }

    /// Records store objects as seen and forgets `removed` ones, in calls
    /// of at most [`BASELINE_PAGE`] objects and about 1 MiB of key names;
    /// the last marks the record complete.
    pub async fn record_baselines(
        &self,
        baselines: Vec<internal::StoreBaseline>,
        removed: Vec<String>,
    ) -> Result<(), Status> {
        let mut baselines = baselines.into_iter().peekable();
        let mut removed = removed.into_iter().peekable();
        loop {
            let (mut batch, mut bytes) = (Vec::new(), 0);
            while batch.len() < BASELINE_PAGE as usize && bytes < BASELINE_BYTES {
                let Some(b) = baselines.next() else { break };
                bytes += b.object.len() + b.keys.iter().map(|k| k.len() + 1).sum::<usize>();
                batch.push(b);
            }
            let room = BASELINE_PAGE as usize - batch.len();
            let gone: Vec<_> = removed.by_ref().take(room).collect();
            let complete = baselines.peek().is_none() && removed.peek().is_none();
            self.inner
                .clone()
                .record_baselines(internal::RecordBaselinesRequest { baselines: batch, removed: gone, complete })
                .await
                .map_err(|s| from_upstream(CHANGE_LOG, s))?;
            if complete {
                return Ok(());
            }
        }
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
/// [`ANNOUNCE_WAIT`], else again in the background with backoff. Deferred
/// announcements are retried one at a time in the order they were made,
/// and while any waits, a new one queues behind it at once (its caller
/// gets no reach): the log records a secret's changes in the order they
/// happened, outages or not.
#[derive(Clone, Default)]
pub struct Announcer {
    deferred: Arc<Mutex<Deferred>>,
}

#[derive(Default)]
struct Deferred {
    queue: VecDeque<Waiting>,
    /// A task is retrying the queue's front.
    draining: bool,
}

struct Waiting {
    what: String,
    announcement: Announcement,
    since: tokio::time::Instant,
}

/// Errors that may clear (the log or the usage index is down, slow or
/// busy): worth retrying. Any other says the announcement cannot be
/// recorded as it is, and would hold up every change queued behind it.
fn passing(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}

impl Announcer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deferred> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reach of a change, with its revision; `None` when it could not
    /// be recorded in time, or changes before it still wait for the log (it
    /// is then recorded after them, in the background).
    pub async fn announce(&self, what: &str, announcement: Announcement) -> Option<pb::SecretReach> {
        {
            let mut deferred = self.lock();
            if !deferred.queue.is_empty() {
                self.defer(&mut deferred, what, announcement);
                return None;
            }
        }
        match tokio::time::timeout(ANNOUNCE_WAIT, announcement()).await {
            Ok(Ok(reach)) => return Some(reach),
            Ok(Err(e)) if !passing(&e) => {
                tracing::error!(change = what, error = %e.message(), "the change cannot be announced: it is left out of the change feed");
                return None;
            }
            Ok(Err(e)) => {
                tracing::warn!(change = what, error = %e.message(), "the change is saved; announcing it in the background")
            }
            Err(_) => tracing::warn!(
                change = what,
                "the change is saved; its announcement is slow, going on in the background"
            ),
        }
        let mut deferred = self.lock();
        self.defer(&mut deferred, what, announcement);
        None
    }

    /// Queues an announcement for the background (past [`MAX_DEFERRED`]
    /// it is dropped, logged).
    fn defer(&self, deferred: &mut Deferred, what: &str, announcement: Announcement) {
        if deferred.queue.len() >= MAX_DEFERRED {
            tracing::error!(change = what, "too many changes wait for the change log: this one is not announced");
            return;
        }
        deferred.queue.push_back(Waiting { what: what.to_string(), announcement, since: tokio::time::Instant::now() });
        if !deferred.draining {
            deferred.draining = true;
            tokio::spawn(self.clone().drain());
        }
    }

    /// Retries the queue's front until it is recorded (or given up), then
    /// the next, until the queue is empty.
    async fn drain(self) {
        let mut delay = RETRY_FIRST;
        let mut failed = true;
        loop {
            if failed {
                tokio::time::sleep(delay).await;
            }
            let front = {
                let mut deferred = self.lock();
                match deferred.queue.front() {
                    Some(w) => (w.announcement.clone(), w.since, w.what.clone()),
                    None => {
                        deferred.draining = false;
                        return;
                    }
                }
            };
            let (announcement, since, what) = front;
            let done = match announcement().await {
                Ok(reach) => {
                    tracing::info!(change = %what, revision = reach.revision, "a deferred change is announced");
                    true
                }
                Err(e) if !passing(&e) => {
                    tracing::error!(change = %what, error = %e.message(), "a deferred change cannot be announced: it is left out of the change feed");
                    true
                }
                Err(e) if since.elapsed() >= DEFER_FOR => {
                    tracing::error!(change = %what, error = %e.message(), "a change could not be announced for an hour; giving up");
                    true
                }
                Err(e) => {
                    tracing::debug!(change = %what, error = %e.message(), "announcing a change failed again");
                    false
                }
            };
            failed = !done;
            if done {
                delay = RETRY_FIRST;
                self.lock().queue.pop_front();
            } else {
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }

    /// Announcements waiting in the background.
    pub fn deferred(&self) -> usize {
        self.lock().queue.len()
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    use super::*;

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// An announcement that fails `failures` times with `error`, then
    /// records `name` in `log`.
    fn recording(log: &Log, name: &'static str, failures: u32, error: fn() -> Status) -> Announcement {
        let (log, left) = (log.clone(), Arc::new(AtomicU32::new(failures)));
        Arc::new(move || {
            let (log, left) = (log.clone(), left.clone());
            Box::pin(async move {
                if left.load(SeqCst) > 0 {
                    left.fetch_sub(1, SeqCst);
                    return Err(error());
                }
                let mut log = log.lock().unwrap();
                log.push(name);
                Ok(pb::SecretReach { revision: log.len() as u64, ..Default::default() })
            })
        })
    }

    fn down() -> Status {
        Status::unavailable("the change log is down")
    }

    #[tokio::test]
    async fn a_change_made_while_an_earlier_one_waits_for_the_log_is_recorded_after_it() {
        let log: Log = Default::default();
        let announcer = Announcer::default();
        // Fails now and at its first retry (after 0.5 s); recorded at the second (1.5 s).
        assert!(announcer.announce("first", recording(&log, "first", 2, down)).await.is_none());
        assert_eq!(announcer.deferred(), 1);
        // The log would take this one at once: it queues behind the first.
        assert!(announcer.announce("second", recording(&log, "second", 0, down)).await.is_none());
        assert_eq!(announcer.deferred(), 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while announcer.deferred() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the queue never drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["first", "second"]);
        // With nothing waiting, the next goes straight to the log.
        let third = announcer.announce("third", recording(&log, "third", 0, down)).await;
        assert_eq!(third.map(|r| r.revision), Some(3));
    }

    #[tokio::test]
    async fn a_change_that_cannot_be_recorded_holds_nothing_up() {
        let log: Log = Default::default();
        let announcer = Announcer::default();
        let refused = || Status::invalid_argument("changes[0].change.key: must not be empty");
        assert!(announcer.announce("bad", recording(&log, "bad", 1, refused)).await.is_none());
        assert_eq!(announcer.deferred(), 0, "not queued for retries");
        // One that fails for a reason that does not clear, once deferred, is
        // dropped at its retry, and the one behind it is recorded.
        let broken = || Status::internal("an object of the store does not decode");
        assert!(announcer.announce("slow", recording(&log, "slow", 1, down)).await.is_none());
        {
            // Behind it: fails with Internal for good.
            let mut deferred = announcer.lock();
            let stuck = recording(&log, "stuck", u32::MAX, broken);
            announcer.defer(&mut deferred, "stuck", stuck);
        }
        assert!(announcer.announce("next", recording(&log, "next", 0, down)).await.is_none());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while announcer.deferred() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the queue never drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["slow", "next"]);
    }
}
