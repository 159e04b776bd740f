//! Leases on what a process remembers of another's data: decisions of the
//! authz-service (`DecisionLeases` in `decisions.proto`) and secret values
//! of the secret-service (`ValueLeases` in `secret_reader.proto`). The
//! holder (the gateway) answers from its memory while it holds a lease, and
//! a change returns only once every holder has forgotten what it
//! remembered, or its lease has run out.
//!
//! A holder sends at least every [`RENEW`]; each answer extends its lease to
//! [`LEASE`] after the moment it *sent* the answered message (it knows that
//! moment; the giver knows only when the message arrived, which is later).
//! A change bumps the generation, sends it to every holder and waits up to
//! [`APPLY_TIMEOUT`] for each to say it has applied it. A holder that does
//! not is cut off (its stream ends, its messages go unanswered) and the
//! change then waits until that holder's lease has surely run out: at most
//! [`LEASE`] after its last message arrived. So a holder that hangs or
//! loses its network delays a change by at most `APPLY_TIMEOUT + LEASE`
//! ([`CHANGE_WAIT`]), and never makes it unsafe.
//!
//! The giving side is [`Leases`]; the holding side is [`Leased`], which
//! keeps its memory and the lease under one lock, so that nothing asked for
//! before a change is remembered after it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use secrets_proto::internal::v1::{
    WatchDecisionsRequest, WatchDecisionsResponse, decision_leases_client::DecisionLeasesClient,
    decision_leases_server::DecisionLeases, value_leases_client::ValueLeasesClient, value_leases_server::ValueLeases,
};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{auth::InternalClient, error::from_upstream, observe::TracedChannel};

/// How long an answer keeps a holder's lease.
pub const LEASE: Duration = Duration::from_millis(2_000);
/// How often a holder must send.
pub const RENEW: Duration = Duration::from_millis(500);
/// How long a change waits for each holder to apply it before cutting it off.
pub const APPLY_TIMEOUT: Duration = Duration::from_millis(1_000);
/// The longest a change may wait for lease holders: one acknowledgement
/// timeout and one lease. A caller of changes allows this much on top of
/// its usual bound, so a change that is waiting out a silent holder is not
/// reported as failed.
pub const CHANGE_WAIT: Duration = Duration::from_millis(3_000);
const _: () = assert!(APPLY_TIMEOUT.as_millis() + LEASE.as_millis() <= CHANGE_WAIT.as_millis());

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
    /// What is leased ("decision", "value"), for messages.
    what: &'static str,
    /// Whether leases are offered at all (this process owns the data), and
    /// if not, why not.
    offered: Result<(), String>,
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
    /// Leases on `what` ("decision", "value"), offered to holders.
    pub fn new(what: &'static str) -> Self {
        Self::with_offer(what, Ok(()))
    }

    /// Leases that are not offered, for `why`: holders are refused with
    /// FAILED_PRECONDITION and ask every time; changes never wait.
    pub fn refused(what: &'static str, why: impl Into<String>) -> Self {
        Self::with_offer(what, Err(why.into()))
    }

    fn with_offer(what: &'static str, offered: Result<(), String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                what,
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
    /// Whether holders are given leases at all.
    pub fn offered(&self) -> bool {
        self.inner.offered.is_ok()
    }

    pub async fn publish(&self) {
        if !self.offered() {
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
        // Each laggard is cut off (whether or not its stream has ended and
        // taken it off the map already), and only then is `departed` read:
        // a holder whose stream ended records its lease there before it
        // leaves the map.
        let mut cut = None;
        {
            let mut map = self.holders();
            for (id, holder) in holders.iter().filter(|(id, _)| laggards.contains(id)) {
                map.remove(id);
                cut = cut.max(Some(holder.cut()));
            }
        }
        let departed = *self.inner.departed.lock().unwrap_or_else(|e| e.into_inner());
        let until = cut.map_or(departed, |c| c.max(departed));
        if laggards.is_empty() {
            tokio::time::sleep_until(until.into()).await;
            return;
        }
        tracing::warn!(
            holders = laggards.len(),
            wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "a {} lease holder did not apply a change in time; cut it off and waiting out its lease",
            self.inner.what
        );
        tokio::time::sleep_until(until.into()).await;
    }
}

/// The stream a lease giver answers with.
pub type LeaseStream = tokio_stream::wrappers::ReceiverStream<Result<WatchDecisionsResponse, Status>>;

impl Leases {
    /// Serves one holder's stream.
    fn serve(&self, mut inbound: Streaming<WatchDecisionsRequest>) -> Result<LeaseStream, Status> {
        if let Err(why) = &self.inner.offered {
            return Err(Status::failed_precondition(format!(
                "no {} leases are offered here ({why}): ask every time",
                self.inner.what
            )));
        }
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
            // may outlive it (it may not have noticed yet). Recorded before
            // it leaves the map, so a round sees it in one or the other.
            let expires = holder.cut();
            {
                let mut departed = leases.inner.departed.lock().unwrap_or_else(|e| e.into_inner());
                *departed = (*departed).max(expires);
            }
            leases.holders().remove(&id);
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl DecisionLeases for Leases {
    type WatchStream = LeaseStream;

    async fn watch(&self, request: Request<Streaming<WatchDecisionsRequest>>) -> Result<Response<LeaseStream>, Status> {
        self.serve(request.into_inner()).map(Response::new)
    }
}

#[tonic::async_trait]
impl ValueLeases for Leases {
    type WatchStream = LeaseStream;

    async fn watch(&self, request: Request<Streaming<WatchDecisionsRequest>>) -> Result<Response<LeaseStream>, Status> {
        self.serve(request.into_inner()).map(Response::new)
    }
}

/// How long a lease stream may go unanswered before it is given up.
const LEASE_SILENCE: Duration = Duration::from_secs(3);

/// What a holder remembers under a lease.
pub trait Memory: Default + Send + 'static {
    /// Forgets everything: a change has come, or the lease is gone.
    fn clear(&mut self);
}

/// The holding side of a lease: `M` is remembered and served only while a
/// lease holds; a change clears it before it is acknowledged. Cloning
/// shares it.
pub struct Leased<M> {
    state: Arc<Mutex<Held<M>>>,
}

impl<M> Clone for Leased<M> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone() }
    }
}

impl<M: Memory> Default for Leased<M> {
    fn default() -> Self {
        Self { state: Arc::new(Mutex::new(Held::default())) }
    }
}

/// A holder's memory with its lease, under one lock.
#[derive(Default)]
pub struct Held<M> {
    /// The newest generation applied.
    generation: u64,
    /// Bumped whenever the memory is cleared: what was asked for before
    /// that is not remembered.
    epoch: u64,
    /// The lease: memory is served only before this.
    valid_until: Option<Instant>,
    memory: M,
}

impl<M: Memory> Held<M> {
    /// Whether a lease holds now.
    pub fn leased(&self) -> bool {
        self.valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// What is remembered, while a lease holds.
    pub fn memory(&self) -> Option<&M> {
        self.leased().then_some(&self.memory)
    }

    /// Where to remember what was asked for at `epoch`: `None` when memory
    /// was cleared since (the answer may predate a change) or no lease holds.
    pub fn memory_since(&mut self, epoch: u64) -> Option<&mut M> {
        (self.epoch == epoch && self.leased()).then_some(&mut self.memory)
    }

    /// The epoch to pass to [`Self::memory_since`] for what is asked now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Forgets everything remembered.
    pub fn clear(&mut self) {
        self.memory.clear();
        self.epoch += 1;
    }

    #[cfg(test)]
    pub(crate) fn lease_for(&mut self, d: Duration) {
        self.valid_until = Some(Instant::now() + d);
    }
}

/// Which lease service a holder asks: the authz-service's or the
/// secret-service's.
#[derive(Clone, Copy, Debug)]
pub enum Giver {
    Decisions,
    Values,
}

impl Giver {
    fn what(self) -> &'static str {
        match self {
            Giver::Decisions => "decision",
            Giver::Values => "value",
        }
    }

    fn peer(self) -> &'static str {
        match self {
            Giver::Decisions => crate::authz::AUTHZ_SERVICE,
            Giver::Values => "secret-service",
        }
    }

    async fn watch(
        self,
        channel: &TracedChannel,
        client: &InternalClient,
        outbound: tokio_stream::wrappers::ReceiverStream<WatchDecisionsRequest>,
    ) -> Result<Streaming<WatchDecisionsResponse>, Status> {
        let answer = match self {
            Giver::Decisions => {
                DecisionLeasesClient::with_interceptor(channel.clone(), client.clone()).watch(outbound).await
            }
            Giver::Values => ValueLeasesClient::with_interceptor(channel.clone(), client.clone()).watch(outbound).await,
        };
        answer.map(Response::into_inner).map_err(|s| from_upstream(self.peer(), s))
    }
}

impl<M: Memory> Leased<M> {
    /// Starts with `memory` (empty, with its settings), and no lease.
    pub fn new(memory: M) -> Self {
        Self { state: Arc::new(Mutex::new(Held { generation: 0, epoch: 0, valid_until: None, memory })) }
    }

    /// The memory and its lease, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Held<M>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether memory is served now.
    pub fn leased(&self) -> bool {
        self.lock().leased()
    }

    /// Holds a lease from `giver` at `channel` for as long as the returned
    /// task runs, reconnecting when the stream is lost.
    pub fn watch(&self, giver: Giver, channel: TracedChannel, client: InternalClient) -> tokio::task::JoinHandle<()> {
        let leased = self.clone();
        tokio::spawn(async move {
            let (what, peer) = (giver.what(), giver.peer());
            let (mut had_lease, mut told_none) = (false, false);
            loop {
                let outcome = leased.hold(giver, &channel, &client, &mut had_lease).await;
                {
                    // Generations count per giving process: the next stream
                    // (perhaps to a restarted one) starts from zero.
                    let mut state = leased.lock();
                    state.valid_until = None;
                    state.generation = 0;
                    state.clear();
                }
                let pause = match outcome {
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        if !std::mem::replace(&mut told_none, true) {
                            tracing::info!("{peer} offers no {what} leases: {}", s.message());
                        }
                        Duration::from_secs(60)
                    }
                    Err(s) => {
                        if had_lease {
                            tracing::warn!("{what} lease lost; asking {peer} every time: {}", s.message());
                        }
                        Duration::from_secs(1)
                    }
                    Ok(()) => Duration::from_millis(200),
                };
                had_lease = false;
                tokio::time::sleep(pause).await;
            }
        })
    }

    /// One stream: answers extend the lease, changes clear the memory and
    /// are acknowledged at once. Returns when the stream ends.
    async fn hold(
        &self,
        giver: Giver,
        channel: &TracedChannel,
        client: &InternalClient,
        had_lease: &mut bool,
    ) -> Result<(), Status> {
        let (tx, rx) = mpsc::channel::<WatchDecisionsRequest>(16);
        let mut sent: std::collections::VecDeque<(u64, Instant)> = std::collections::VecDeque::new();
        let mut seq = 0u64;
        let mut send = |applied: u64, sent: &mut std::collections::VecDeque<(u64, Instant)>| {
            seq += 1;
            sent.push_back((seq, Instant::now()));
            if sent.len() > 64 {
                sent.pop_front();
            }
            tx.try_send(WatchDecisionsRequest { seq, applied_generation: applied }).is_ok()
        };
        let applied = self.lock().generation;
        send(applied, &mut sent);
        let mut inbound = giver.watch(channel, client, tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
        let mut renew = tokio::time::interval(RENEW);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    // No answer for a whole lease: the giver is gone or
                    // unreachable; the lease has run out. Connect anew.
                    if last_answer.elapsed() > LEASE_SILENCE {
                        return Err(Status::unavailable(format!("{} stopped answering the lease stream", giver.peer())));
                    }
                    let applied = self.lock().generation;
                    if !send(applied, &mut sent) {
                        return Ok(());
                    }
                }
                message = inbound.message() => {
                    let Some(answer) = message.map_err(|s| from_upstream(giver.peer(), s))? else { return Ok(()) };
                    last_answer = Instant::now();
                    let changed = {
                        let mut state = self.lock();
                        let changed = answer.generation > state.generation;
                        if changed {
                            state.clear();
                            state.generation = answer.generation;
                        }
                        if answer.seq != 0
                            && let Some(&(_, at)) = sent.iter().find(|(s, _)| *s == answer.seq)
                        {
                            // After a lapse (the giver stopped answering for
                            // a while, perhaps unsure of its own data), what
                            // was kept before it is not served again.
                            if !state.leased() {
                                state.clear();
                            }
                            let until = at + Duration::from_millis(u64::from(answer.lease_ms));
                            state.valid_until = Some(state.valid_until.map_or(until, |t| t.max(until)));
                        }
                        changed
                    };
                    if changed && !send(answer.generation, &mut sent) {
                        return Ok(());
                    }
                    if answer.renew_ms > 0 && renew.period() != Duration::from_millis(u64::from(answer.renew_ms)) {
                        renew = tokio::time::interval(Duration::from_millis(u64::from(answer.renew_ms)));
                        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        renew.tick().await;
                    }
                    if !*had_lease && self.leased() {
                        *had_lease = true;
                        tracing::debug!("{} lease held from {}", giver.what(), giver.peer());
                    }
                }
            }
        }
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
        let leases = Leases::new("decision");
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
        let leases = Leases::new("decision");
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
        let leases = Leases::new("decision");
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
        let leases = Leases::refused("decision", "a test");
        let (_, _, mut rx) = holder(&leases);
        leases.publish().await;
        assert!(rx.try_recv().is_err(), "nothing is sent");
        assert_eq!(leases.inner.generation.load(Ordering::SeqCst), 1);
    }
}
