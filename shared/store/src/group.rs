//! Group commit: concurrent changes to one store object become one
//! read-modify-write (one file write and fsync on the embedded backend, one
//! PUT on Kubernetes) instead of one each.
//!
//! Callers queue their change per object. One writer task per object takes
//! the queue in arrival order, applies every change to one copy of the
//! object, writes it once, and answers each caller with its own outcome: a
//! change that refuses (a key that exists, a missing key, the size limit)
//! fails only its own caller, and the others are written. A caller is
//! answered once its change is durable. The writer is a task of its own, so
//! a caller that goes away does not stall the callers queued behind it (its
//! change may still be written, as with any request cancelled after it was
//! sent).

use std::sync::Arc;

use secrets_common::{batch::Queues, observe::Metrics};
use tokio::sync::oneshot;

use crate::{
    BackendError,
    backend::{Entries, StoreBackend, StoreError, Version},
};

/// At most this many changes go into one write, so that one write's time
/// stays bounded however deep the queue is.
pub const MAX_CHANGES_PER_WRITE: usize = 256;

/// A store whose writes are grouped per object. Reads go straight to the
/// backend.
pub struct GroupCommit<E: StoreError> {
    backend: Arc<dyn StoreBackend<E>>,
    /// Changes waiting, per object.
    queues: Queues<Box<dyn Pending<E>>>,
    metrics: Option<Metrics>,
}

impl<E: StoreError> GroupCommit<E> {
    pub fn new(backend: Arc<dyn StoreBackend<E>>, metrics: Option<Metrics>) -> Self {
        Self { backend, queues: Queues::default(), metrics }
    }

    pub fn backend(&self) -> &Arc<dyn StoreBackend<E>> {
        &self.backend
    }

    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    pub async fn read(&self, object: &str) -> Result<Option<Entries>, E> {
        self.backend.read(object).await
    }

    pub async fn read_shared(&self, object: &str) -> Result<Option<Arc<Entries>>, E> {
        self.backend.read_shared(object).await
    }

    /// See [`StoreBackend::read_current`].
    pub async fn read_current(&self, object: &str) -> Result<Option<Entries>, E> {
        self.backend.read_current(object).await
    }

    /// Changes waiting for `object`'s writer (not counting the write in
    /// progress).
    pub fn queued(&self, object: &str) -> usize {
        self.queues.queued(object)
    }

    /// Applies `change` to the object's entries (empty when it does not
    /// exist yet) together with the other changes queued for it, and
    /// returns what `change` returned once the object is written.
    ///
    /// A change that returns an error must leave the entries as it found
    /// them: the other changes of its write go ahead. It may run more than
    /// once (when the backend meets a concurrent writer), so it must depend
    /// only on its input.
    pub async fn apply<R, F>(&self, object: &str, change: F) -> Result<R, E>
    where
        R: Send + 'static,
        F: FnMut(&mut Entries) -> Result<R, E> + Send + 'static,
    {
        Ok(self.apply_versioned(object, change).await?.0)
    }

    /// [`GroupCommit::apply`], with the version the write produced (where
    /// the backend has one).
    pub async fn apply_versioned<R, F>(&self, object: &str, change: F) -> Result<(R, Version), E>
    where
        R: Send + 'static,
        F: FnMut(&mut Entries) -> Result<R, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let item: Box<dyn Pending<E>> = Box::new(Item { change, outcome: None, reply });
        if self.queues.push(object, item) {
            let writer = Writer {
                object: object.to_string(),
                backend: self.backend.clone(),
                queues: self.queues.clone(),
                metrics: self.metrics.clone(),
            };
            tokio::spawn(writer.run());
        }
        answer.await.map_err(|_| E::from(BackendError::Internal("the store writer stopped before answering".into())))?
    }
}

/// A queued change with its caller's answer.
trait Pending<E>: Send {
    /// Applies the change; `false` when it refused (its error is kept for
    /// its caller and the entries are as before).
    fn apply(&mut self, entries: &mut Entries) -> bool;
    /// Answers the caller: its own outcome when the write went through (or
    /// when its change refused), else `failed`.
    fn answer(self: Box<Self>, failed: Option<&E>, version: Version);
}

struct Item<R, F, E> {
    change: F,
    outcome: Option<Result<R, E>>,
    reply: oneshot::Sender<Result<(R, Version), E>>,
}

impl<R, F, E> Pending<E> for Item<R, F, E>
where
    R: Send,
    F: FnMut(&mut Entries) -> Result<R, E> + Send,
    E: StoreError,
{
    fn apply(&mut self, entries: &mut Entries) -> bool {
        let outcome = (self.change)(entries);
        let applied = outcome.is_ok();
        self.outcome = Some(outcome);
        applied
    }

    fn answer(self: Box<Self>, failed: Option<&E>, version: Version) {
        let Item { outcome, reply, .. } = *self;
        let answer = match (failed, outcome) {
            // Refused: nothing of it was to be written, whatever the write did.
            (_, Some(Err(own))) => Err(own),
            (None, Some(Ok(r))) => Ok((r, version)),
            (Some(e), _) => Err(e.for_another_caller()),
            (None, None) => Err(E::from(BackendError::Internal("a store write finished without its change".into()))),
        };
        // The caller may have gone away: nobody to tell.
        let _ = reply.send(answer);
    }
}

/// The writer task of one object: writes batches until its queue is empty.
struct Writer<E: StoreError> {
    object: String,
    backend: Arc<dyn StoreBackend<E>>,
    queues: Queues<Box<dyn Pending<E>>>,
    metrics: Option<Metrics>,
}

impl<E: StoreError> Writer<E> {
    async fn run(self) {
        let mut worker = self.queues.worker(&self.object);
        while let Some(mut batch) = worker.next_batch(MAX_CHANGES_PER_WRITE) {
            self.write(&mut batch).await;
        }
    }

    async fn write(&self, batch: &mut [Box<dyn Pending<E>>]) {
        // Set when every change refused: the write is skipped.
        let mut nothing_to_write = false;
        let result = self
            .backend
            .modify(&self.object, &mut |entries: &mut Entries| {
                // Runs again from the object as read when the backend met a
                // concurrent writer: every change is applied anew.
                let applied = batch.iter_mut().map(|item| item.apply(entries)).filter(|&ok| ok).count();
                nothing_to_write = applied == 0;
                if nothing_to_write {
                    return Err(E::from(BackendError::Internal("every change of this write refused".into())));
                }
                Ok(())
            })
            .await;
        if let Some(m) = &self.metrics
            && !nothing_to_write
        {
            m.observe_group_write(self.backend.name(), batch.len());
        }
        let (failed, version) = match &result {
            Err(_) if nothing_to_write => (None, None),
            Err(e) => (Some(e), None),
            Ok(version) => (None, *version),
        };
        for item in batch.iter_mut().map(|item| std::mem::replace(item, Box::new(Answered))) {
            item.answer(failed, version);
        }
    }
}

/// What is left in a batch slot once its caller is answered.
struct Answered;

impl<E> Pending<E> for Answered {
    fn apply(&mut self, _: &mut Entries) -> bool {
        false
    }
    fn answer(self: Box<Self>, _: Option<&E>, _: Version) {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use chrono::Utc;
    use secrets_common::{SecretValue, error::Error};
    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::{Entry, backend::Change, embedded::EmbeddedBackend};

    /// Counts writes; the first one waits until the test lets it go, so
    /// that the changes sent meanwhile queue behind it. Fails every write
    /// when told to.
    struct Gated {
        inner: EmbeddedBackend,
        writes: AtomicUsize,
        entered: Notify,
        gate: Semaphore,
        fail: bool,
    }

    impl Gated {
        fn new(dir: &std::path::Path, fail: bool) -> Arc<Self> {
            let inner = EmbeddedBackend::open(dir).unwrap();
            Arc::new(Self { inner, writes: AtomicUsize::new(0), entered: Notify::new(), gate: Semaphore::new(0), fail })
        }
    }

    #[async_trait]
    impl StoreBackend<Error> for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        async fn read(&self, object: &str) -> Result<Option<Entries>, Error> {
            StoreBackend::<Error>::read(&self.inner, object).await
        }
        async fn modify(&self, object: &str, change: &mut Change<'_, Error>) -> Result<crate::backend::Version, Error> {
            if self.writes.fetch_add(1, Ordering::SeqCst) == 0 {
                self.entered.notify_one();
                self.gate.acquire().await.unwrap().forget();
            }
            if self.fail {
                return Err(BackendError::Unavailable { backend: "gated", message: "disk gone".into() }.into());
            }
            self.inner.modify(object, change).await
        }
    }

    fn create(key: String) -> impl FnMut(&mut Entries) -> Result<String, Error> + Send + 'static {
        move |entries: &mut Entries| {
            if entries.contains_key(&key) {
                return Err(Error::AlreadyExists(format!("{key} exists")));
            }
            let now = Utc::now();
            entries.insert(
                key.clone(),
                Entry { value: SecretValue::from(b"v".to_vec()), created_at: now, updated_at: now },
            );
            Ok(key.clone())
        }
    }

    /// Sends one change that enters the backend and waits there, then
    /// `keys` more, and lets the first go once all of them are queued.
    async fn burst(store: &Arc<GroupCommit<Error>>, gated: &Gated, keys: Vec<String>) -> Vec<Result<String, Error>> {
        let first = {
            let store = store.clone();
            tokio::spawn(async move { store.apply("obj", create("first".into())).await })
        };
        gated.entered.notified().await;
        let n = keys.len();
        let rest: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let store = store.clone();
                tokio::spawn(async move { store.apply("obj", create(k)).await })
            })
            .collect();
        while store.queued("obj") < n {
            tokio::task::yield_now().await;
        }
        gated.gate.add_permits(1);
        let mut out = vec![first.await.unwrap()];
        for t in rest {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn changes_queued_behind_a_write_go_out_in_one_write_and_a_refusal_fails_only_its_caller() {
        let dir = tempfile::tempdir().unwrap();
        let gated = Gated::new(dir.path(), false);
        let store = Arc::new(GroupCommit::new(gated.clone() as Arc<dyn StoreBackend<Error>>, None));
        // 99 new keys, and "first" again, which exists by then.
        let mut keys: Vec<String> = (0..99).map(|i| format!("k{i:02}")).collect();
        keys.insert(50, "first".into());
        let outcomes = burst(&store, &gated, keys).await;

        assert_eq!(gated.writes.load(Ordering::SeqCst), 2, "the first write, then one for the 100 queued behind it");
        let refused: Vec<String> = outcomes.iter().filter_map(|o| o.as_ref().err()).map(ToString::to_string).collect();
        assert_eq!(refused, ["first exists"], "only the refused change fails");
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 100);
        let stored = store.read("obj").await.unwrap().unwrap();
        assert_eq!(stored.len(), 100, "every acknowledged key is in the object");
        assert!(stored.contains_key("k00") && stored.contains_key("k98"));
        assert_eq!(store.queued("obj"), 0);
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_change_in_it_with_the_backends_error() {
        let dir = tempfile::tempdir().unwrap();
        let gated = Gated::new(dir.path(), true);
        let store = Arc::new(GroupCommit::new(gated.clone() as Arc<dyn StoreBackend<Error>>, None));
        let outcomes = burst(&store, &gated, (0..20).map(|i| format!("k{i}")).collect()).await;
        assert_eq!(outcomes.len(), 21);
        for o in outcomes {
            let e = o.unwrap_err().to_string();
            assert!(e.contains("disk gone"), "{e}");
        }
        assert_eq!(gated.writes.load(Ordering::SeqCst), 2);
        // The queue is free again: the next change starts a writer.
        assert!(store.apply("obj", create("later".into())).await.unwrap_err().to_string().contains("disk gone"));
    }

    #[tokio::test]
    async fn when_every_change_refuses_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(EmbeddedBackend::open(dir.path()).unwrap());
        let store = GroupCommit::new(backend as Arc<dyn StoreBackend<Error>>, None);
        let refuse = |entries: &mut Entries| -> Result<(), Error> {
            let _ = entries;
            Err(Error::NotFound("no such key".into()))
        };
        assert_eq!(store.apply("never", refuse).await.unwrap_err().to_string(), "no such key");
        assert!(store.read("never").await.unwrap().is_none(), "a write with no change created the object");
    }
}
