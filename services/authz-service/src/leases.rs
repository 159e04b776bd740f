//! Decision leases (`DecisionLeases` in `decisions.proto`): the gateway
//! answers permission questions from its memory while it holds a lease, and
//! a grant change returns only once every holder has forgotten what it
//! remembered, or its lease has run out.
//!
//! A holder sends at least every [`RENEW`]; each answer extends its lease to
//! [`LEASE`] after the moment it *sent* the answered message (it knows that
//! moment; this process knows only when the message arrived, which is
//! later). A change bumps the generation, sends it to every holder and waits
//! up to [`APPLY_TIMEOUT`] for each to say it has applied it. A holder that
//! does not is cut off (its stream ends, its messages go unanswered) and the
//! change then waits until that holder's lease has surely run out: at most
//! [`LEASE`] after its last message arrived. So a holder that hangs or
//! loses its network delays a change by at most `APPLY_TIMEOUT + LEASE`,
//! and never makes it unsafe.
//!
//! With PostgreSQL, a change through another replica reaches this one's
//! holders before it returns (see [`secrets_db::replicas`]: it waits until
//! this replica has applied it, which includes a round here), and holders
//! are answered only while this replica's own lease among the replicas
//! outlasts theirs (see [`Leases::with_guard`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use secrets_proto::internal::v1::{
    WatchDecisionsRequest, WatchDecisionsResponse, decision_leases_server::DecisionLeases,
};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// How long an answer keeps a holder's lease.
pub const LEASE: Duration = Duration::from_millis(2_000);
/// How often a holder must send.
pub const RENEW: Duration = Duration::from_millis(500);
/// How long a change waits for each holder to apply it before cutting it off.
pub const APPLY_TIMEOUT: Duration = Duration::from_millis(1_000);
// A change never waits longer than its callers allow for.
const _: () =
    assert!(APPLY_TIMEOUT.as_millis() + LEASE.as_millis() <= secrets_common::authz::GRANT_CHANGE_WAIT.as_millis());

/// Messages queued to one holder; one that lets them pile up is cut off.
const QUEUE: usize = 64;

type Outbox = mpsc::Sender<Result<WatchDecisionsResponse, Status>>;

/// One holder's state, shared by its stream and by changes.
struct Holder {
    outbox: Outbox,
    /// The newest generation it has applied.
    applied: watch::Sender<u64>,
    /// When its last message arrived, and whether it has been cut off; one
    /// lock, so a message answered is always one a change has counted.
    heard: Mutex<(Instant, bool)>,
    /// Tells its stream to end once it is cut off.
    cutoff: tokio::sync::Notify,
}

impl Holder {
    /// Records a message from the holder; `false` once it is cut off.
    fn heard(&self) -> bool {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.0 = Instant::now();
        !heard.1
    }

    /// Cuts the holder off; its lease runs out by the returned instant.
    fn cut(&self) -> Instant {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.1 = true;
        self.cutoff.notify_one();
        heard.0 + LEASE
    }
}

#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

struct Inner {
    /// Whether leases are offered at all (this process owns the grants).
    offered: bool,
    generation: AtomicU64,
    next_id: AtomicU64,
    holders: Mutex<HashMap<u64, Arc<Holder>>>,
    /// When the leases of holders whose streams ended have surely run out:
    /// a holder may not have noticed yet that its stream is gone. At start,
    /// one lease from now: the holders of a process before this one.
    departed: Mutex<Instant>,
    /// Set when the service stops: every stream ends.
    stopping: watch::Sender<bool>,
    /// Changes published so far, counted as they ask.
    asked: AtomicU64,
    /// Held by the round in progress; holds how many changes the rounds
    /// done so far cover.
    rounds: tokio::sync::Mutex<u64>,
    /// Whether a holder may be given a lease of the given length now; see
    /// [`Leases::with_guard`].
    guard: std::sync::OnceLock<Box<dyn Fn(Duration) -> bool + Send + Sync>>,
}

impl Leases {
    pub fn new(offered: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                offered,
                generation: AtomicU64::new(1),
                next_id: AtomicU64::new(1),
                holders: Mutex::new(HashMap::new()),
                // A process that replaces one that crashed cannot know its
                // holders: any of them may answer from a lease the old one
                // gave for up to one more lease. Changes wait that out.
                departed: Mutex::new(Instant::now() + LEASE),
                stopping: watch::channel(false).0,
                asked: AtomicU64::new(0),
                rounds: tokio::sync::Mutex::new(0),
                guard: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Answers holders only while `may_lease(LEASE)` says so: with replicas,
    /// while this replica's own lease among them outlasts the holder's.
    /// Unanswered, a holder's lease runs out and it asks instead.
    pub fn with_guard(self, may_lease: impl Fn(Duration) -> bool + Send + Sync + 'static) -> Self {
        let _ = self.inner.guard.set(Box::new(may_lease));
        self
    }

    fn may_lease(&self) -> bool {
        self.inner.guard.get().is_none_or(|may| may(LEASE))
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Holder>>> {
        self.inner.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, seq: u64) -> WatchDecisionsResponse {
        WatchDecisionsResponse {
            seq,
            generation: self.inner.generation.load(Ordering::SeqCst),
            lease_ms: LEASE.as_millis() as u32,
            renew_ms: RENEW.as_millis() as u32,
        }
    }

    /// Ends every stream: the service is stopping.
    pub fn stop(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// After a change to the grants: returns once no holder can still answer
    /// from before it. Changes published while a round is under way share
    /// the next one: a burst of changes costs two rounds, not one each
    /// (and a holder is sent two messages, not more than its queue holds).
    pub async fn publish(&self) {
        if !self.inner.offered {
            return;
        }
        let ticket = self.inner.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = self.inner.rounds.lock().await;
        if *covered >= ticket {
            // A round that began after this change was published is done.
            return;
        }
        let covers = self.inner.asked.load(Ordering::SeqCst);
        self.round().await;
        *covered = covers;
    }

    /// One round: a new generation, sent to every holder, waited for.
    async fn round(&self) {
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let holders: Vec<(u64, Arc<Holder>)> = self.holders().iter().map(|(id, h)| (*id, h.clone())).collect();
        let change = self.answer(0);
        let waits = holders.iter().map(|(id, holder)| {
            async move {
                let mut applied = holder.applied.subscribe();
                let sent = holder.outbox.try_send(Ok(change)).is_ok();
                let done = sent
                    && tokio::time::timeout(APPLY_TIMEOUT, async {
                        tokio::select! {
                            applied = applied.wait_for(|a| *a >= generation) => applied.is_ok(),
                            // The stream is gone: the holder is waited out below.
                            () = holder.outbox.closed() => false,
                        }
                    })
                    .await
                    .unwrap_or(false);
                (!done).then_some(*id)
            }
        });
        let laggards: Vec<u64> = futures::future::join_all(waits).await.into_iter().flatten().collect();
        let mut until = *self.inner.departed.lock().unwrap_or_else(|e| e.into_inner());
        if laggards.is_empty() {
            tokio::time::sleep_until(until.into()).await;
            return;
        }
        {
            let mut map = self.holders();
            for id in &laggards {
                if let Some(holder) = map.remove(id) {
                    until = until.max(holder.cut());
                }
            }
        }
        tracing::warn!(
            holders = laggards.len(),
            wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "a decision lease holder did not apply a change in time; cut it off and waiting out its lease"
        );
        tokio::time::sleep_until(until.into()).await;
    }
}

#[tonic::async_trait]
impl DecisionLeases for Leases {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchDecisionsResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchDecisionsRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if !self.inner.offered {
            return Err(Status::failed_precondition(
                "this authz-service offers no decision leases: ask for every decision",
            ));
        }
        let mut inbound = request.into_inner();
        let (outbox, rx) = mpsc::channel(QUEUE);
        let holder = Arc::new(Holder {
            outbox: outbox.clone(),
            applied: watch::channel(0).0,
            heard: Mutex::new((Instant::now(), false)),
            cutoff: tokio::sync::Notify::new(),
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        self.holders().insert(id, holder.clone());
        let leases = self.clone();
        let mut stopping = self.inner.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = inbound.message() => m,
                    _ = stopping.wait_for(|s| *s) => break,
                    () = holder.cutoff.notified() => break,
                };
                let Ok(Some(message)) = message else { break };
                if !holder.heard() {
                    break;
                }
                holder.applied.send_if_modified(|a| {
                    let newer = message.applied_generation > *a;
                    *a = (*a).max(message.applied_generation);
                    newer
                });
                if !leases.may_lease() {
                    continue;
                }
                if outbox.try_send(Ok(leases.answer(message.seq))).is_err() {
                    break;
                }
            }
            // The holder's stream ends when the last sender goes; its lease
            // may outlive it (it may not have noticed yet).
            leases.holders().remove(&id);
            let expires = holder.cut();
            let mut departed = leases.inner.departed.lock().unwrap_or_else(|e| e.into_inner());
            *departed = (*departed).max(expires);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder registered with `leases`, and what is sent to it.
    fn holder(leases: &Leases) -> (u64, Arc<Holder>, mpsc::Receiver<Result<WatchDecisionsResponse, Status>>) {
        let (outbox, rx) = mpsc::channel(QUEUE);
        let holder = Arc::new(Holder {
            outbox,
            applied: watch::channel(0).0,
            heard: Mutex::new((Instant::now(), false)),
            cutoff: tokio::sync::Notify::new(),
        });
        let id = leases.inner.next_id.fetch_add(1, Ordering::SeqCst);
        leases.holders().insert(id, holder.clone());
        (id, holder, rx)
    }

    #[tokio::test]
    async fn a_change_returns_once_every_holder_applied_it_and_keeps_them() {
        let leases = Leases::new(true);
        let (id, holder, mut rx) = holder(&leases);
        let applier = tokio::spawn({
            let holder = holder.clone();
            async move {
                let change = rx.recv().await.expect("the change is sent").expect("not an error");
                holder.applied.send_replace(change.generation);
                // A live holder keeps its stream open.
                (change, rx)
            }
        });
        leases.publish().await;
        let (change, _rx) = applier.await.unwrap();
        assert_eq!(change.generation, 2, "the first change is generation 2");
        assert_eq!((change.lease_ms, change.renew_ms), (LEASE.as_millis() as u32, RENEW.as_millis() as u32));
        assert!(leases.holders().contains_key(&id), "a holder that applied in time keeps its lease");
        assert!(holder.heard(), "and is still heard");
    }

    #[tokio::test]
    async fn a_holder_that_does_not_apply_in_time_is_cut_off_and_its_lease_waited_out() {
        let leases = Leases::new(true);
        let (id, holder, _rx) = holder(&leases);
        let last_heard = Instant::now();
        leases.publish().await;
        assert!(!leases.holders().contains_key(&id), "the silent holder is dropped");
        assert!(!holder.heard(), "its messages go unanswered from now on");
        // The change could not return before the holder's lease surely ran out.
        assert!(last_heard.elapsed() >= LEASE, "returned after {:?}", last_heard.elapsed());
    }

    #[tokio::test]
    async fn a_burst_of_changes_shares_rounds_and_keeps_the_holder() {
        let leases = Leases::new(true);
        // The first round waits for the lease of a process before this one.
        *leases.inner.departed.lock().unwrap() = Instant::now();
        let (id, holder, mut rx) = holder(&leases);
        let received = Arc::new(AtomicU64::new(0));
        let applier = tokio::spawn({
            let (holder, received) = (holder.clone(), received.clone());
            async move {
                while let Some(Ok(change)) = rx.recv().await {
                    received.fetch_add(1, Ordering::SeqCst);
                    holder.applied.send_replace(change.generation);
                }
            }
        });
        let changes: Vec<_> = (0..200)
            .map(|_| {
                let leases = leases.clone();
                tokio::spawn(async move { leases.publish().await })
            })
            .collect();
        for change in changes {
            change.await.unwrap();
        }
        assert!(leases.holders().contains_key(&id), "200 changes do not overflow the holder's queue");
        let generation = leases.inner.generation.load(Ordering::SeqCst);
        assert!(generation <= 3, "200 changes published together took {} rounds", generation - 1);
        assert_eq!(*holder.applied.borrow(), generation, "the holder applied the last round");
        applier.abort();
        assert_eq!(received.load(Ordering::SeqCst), generation - 1, "one message per round");
    }

    #[tokio::test]
    async fn a_process_that_offers_no_leases_never_waits() {
        let leases = Leases::new(false);
        let (_, _, mut rx) = holder(&leases);
        leases.publish().await;
        assert!(rx.try_recv().is_err(), "nothing is sent");
        assert_eq!(leases.inner.generation.load(Ordering::SeqCst), 1);
    }
}
