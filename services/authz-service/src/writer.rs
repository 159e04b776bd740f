//! Every change to the authz-service's database goes through one writer
//! (group commit): concurrent callers queue their changes, and a worker
//! writes them in arrival order, up to [`MAX_CHANGES_PER_TRANSACTION`] at a
//! time, in one transaction, each in a savepoint of its own. A change that
//! is refused (or whose statement fails) is rolled back alone and fails
//! only its caller; a transaction that fails, or does not finish within the
//! database timeout, fails every change in it. Each caller is answered once
//! its change is committed. Grant changes and usage-index saves share the
//! writer, so SQLite sees one writer at a time rather than spinning on its
//! busy wait, and a burst of 200 changes costs a handful of commits.

use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};
use secrets_common::{batch::Queues, observe::Metrics};
use tokio::sync::oneshot;

use crate::{Error, Result};

/// Changes written in one transaction at most.
pub const MAX_CHANGES_PER_TRANSACTION: usize = 64;

/// The one queue of the writer.
const CHANGES: &str = "changes";

/// A change: statements on a savepoint of the batch's transaction.
pub type Change<T> = Box<dyn for<'a> FnOnce(&'a DatabaseTransaction) -> BoxFuture<'a, Result<T>> + Send>;

/// A queued change with its caller's answer, whatever the answer's type.
trait Job: Send {
    /// Runs the change in a savepoint; `Err` only when the savepoint itself
    /// failed, which fails the batch.
    fn run<'a>(&'a mut self, txn: &'a DatabaseTransaction) -> BoxFuture<'a, Result<()>>;
    /// Answers the caller: its own outcome, or `failed` when the batch's
    /// transaction did not commit.
    fn answer(self: Box<Self>, failed: Option<&Error>);
}

struct Queued<T> {
    change: Option<Change<T>>,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    backend: &'static str,
    timeout: Duration,
}

impl<T: Send + 'static> Job for Queued<T> {
    fn run<'a>(&'a mut self, txn: &'a DatabaseTransaction) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(change) = self.change.take() else { return Ok(()) };
            let savepoint = txn.begin().await?;
            let outcome = change(&savepoint).await;
            match outcome {
                Ok(_) => savepoint.commit().await?,
                Err(_) => savepoint.rollback().await?,
            }
            self.outcome = Some(outcome);
            Ok(())
        })
    }

    fn answer(self: Box<Self>, failed: Option<&Error>) {
        let outcome = match (failed, self.outcome) {
            (Some(e), _) => Err(e.for_another_caller()),
            (None, Some(Err(Error::Db(e)))) => Err(secrets_db::failure(self.backend, self.timeout, &e)),
            (None, Some(outcome)) => outcome,
            (None, None) => Err(Error::Internal("a queued change was never run".into())),
        };
        let _ = self.reply.send(outcome);
    }
}

#[derive(Clone)]
pub struct Writer {
    db: DatabaseConnection,
    timeout: Duration,
    queue: Queues<Box<dyn Job>>,
    metrics: Option<Metrics>,
    /// PostgreSQL: the change counter as of the newest transaction committed
    /// here (read inside it, so it counts that transaction's changes).
    committed: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Writer {
    pub fn new(db: DatabaseConnection, timeout: Duration, metrics: Option<Metrics>) -> Self {
        Self { db, timeout, queue: Queues::default(), metrics, committed: Default::default() }
    }

    /// PostgreSQL: the change counter as of the newest transaction this
    /// writer committed; a change answered `Ok` is counted in it.
    pub fn committed(&self) -> i64 {
        self.committed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes waiting for the worker (not those it is writing).
    pub fn queued(&self) -> usize {
        self.queue.queued(CHANGES)
    }

    /// Whether the worker is writing.
    pub fn working(&self) -> bool {
        self.queue.working(CHANGES)
    }

    /// Writes `change` with the changes queued beside it; its outcome once
    /// committed. A database failure of the change alone is answered as
    /// `UNAVAILABLE` naming the database, as every database call is.
    pub async fn write<T: Send + 'static>(&self, change: Change<T>) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Queued {
            change: Some(change),
            outcome: None,
            reply,
            backend: secrets_db::backend_name(&self.db),
            timeout: self.timeout,
        });
        if self.queue.push(CHANGES, job) {
            let writer = self.clone();
            tokio::spawn(async move { writer.work().await });
        }
        answer.await.map_err(|_| Error::Internal("the authz-service's writer stopped before answering".into()))?
    }

    /// The worker: one transaction per batch, until the queue is empty.
    async fn work(&self) {
        let mut worker = self.queue.worker(CHANGES);
        while let Some(mut batch) = worker.next_batch(MAX_CHANGES_PER_TRANSACTION) {
            let written = secrets_db::bounded(
                &self.db,
                self.timeout,
                async {
                    // SQLite: take the write lock at BEGIN (waiting for it as
                    // the busy timeout allows). A deferred transaction that
                    // reads first is refused at once when it comes to write
                    // if another connection (a vault-config-service on the
                    // same file) committed since its read.
                    let txn = self
                        .db
                        .begin_with_options(TransactionOptions {
                            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                            ..Default::default()
                        })
                        .await?;
                    for job in batch.iter_mut() {
                        job.run(&txn).await?;
                    }
                    let version = match txn.get_database_backend() {
                        DbBackend::Postgres => {
                            Some(secrets_db::replicas::Replicas::version_in(&crate::db::REPLICAS, &txn).await?)
                        }
                        _ => None,
                    };
                    txn.commit().await?;
                    if let Some(version) = version {
                        self.committed.fetch_max(version, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(())
                },
                |_| None,
            )
            .await;
            if let (Some(m), Ok(())) = (&self.metrics, &written) {
                m.observe_group_write(secrets_db::backend_name(&self.db), batch.len());
            }
            let failed = written.err();
            for job in batch {
                job.answer(failed.as_ref());
            }
        }
    }
}

#[cfg(test)]
impl Writer {
    /// Holds the writer's transaction open with a change that waits for the
    /// returned sender; returns once that transaction is being written, so
    /// changes sent next queue behind it.
    pub(crate) async fn hold(&self) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), Error>>) {
        let (release, held) = oneshot::channel::<()>();
        let writer = self.clone();
        let holder = tokio::spawn(async move {
            writer
                .write(Box::new(move |_| {
                    Box::pin(async move {
                        let _ = held.await;
                        Ok(())
                    })
                }))
                .await
        });
        while self.queued() > 0 || !self.working() {
            tokio::task::yield_now().await;
        }
        (release, holder)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use sea_orm::{EntityTrait, Set};

    use super::*;
    use crate::db::platform_admin;

    /// SQLite: a change that reads before it writes is not refused because
    /// another connection to the same file (a vault-config-service sharing
    /// it) committed in between: the writer holds the write lock from BEGIN.
    #[tokio::test]
    async fn a_change_that_reads_first_survives_another_connection_writing_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display());
        let timeout = Duration::from_secs(60);
        let db = crate::db::connect(&url, timeout, None).await.unwrap();
        let other = crate::db::connect(&url, timeout, None).await.unwrap();
        let writer = Writer::new(db.clone(), timeout, None);
        let admit =
            |subject: &str| platform_admin::ActiveModel { subject: Set(subject.into()), created_at: Set(Utc::now()) };
        let (mine, theirs) = (admit("user:mine"), admit("user:theirs"));
        let meanwhile = writer
            .write(Box::new(move |txn| {
                Box::pin(async move {
                    platform_admin::Entity::find().all(txn).await?;
                    let meanwhile = tokio::spawn(async move {
                        platform_admin::Entity::insert(theirs).exec_without_returning(&other).await
                    });
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    platform_admin::Entity::insert(mine).exec_without_returning(txn).await?;
                    Ok(meanwhile)
                })
            }))
            .await
            .expect("the change that read first is written");
        meanwhile.await.unwrap().expect("the other connection's write waits its turn and lands");
        assert_eq!(platform_admin::Entity::find().all(&db).await.unwrap().len(), 2);
    }

    /// Changes that arrive while a transaction is being written go out
    /// together in the next one. A change refused after it wrote, and one
    /// whose statement fails, are rolled back alone; the rest land.
    #[tokio::test]
    async fn changes_queued_behind_a_transaction_share_the_next_one_and_a_refused_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display());
        let timeout = Duration::from_secs(60);
        let db = crate::db::connect(&url, timeout, None).await.unwrap();
        let metrics = Metrics::new();
        let writer = Writer::new(db.clone(), timeout, Some(metrics.clone()));

        // A change the test releases holds the first transaction open.
        let (release, holder) = writer.hold().await;
        let admit = |subject: String, refuse: bool| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .write(Box::new(move |txn| {
                        Box::pin(async move {
                            let row = platform_admin::ActiveModel {
                                subject: Set(subject.clone()),
                                created_at: Set(Utc::now()),
                            };
                            platform_admin::Entity::insert(row).exec_without_returning(txn).await?;
                            if refuse {
                                return Err(Error::FailedPrecondition(format!("{subject} refused after writing")));
                            }
                            Ok(subject)
                        })
                    }))
                    .await
            })
        };
        let mut changes: Vec<_> = (0..40).map(|i| admit(format!("user:a{i}"), i % 10 == 3)).collect();
        // The same row twice: the second insert's statement fails.
        changes.push(admit("user:a0".into(), false));
        while writer.queued() < 41 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();

        let mut outcomes = Vec::new();
        for change in changes {
            outcomes.push(change.await.unwrap());
        }
        match outcomes.pop().unwrap() {
            Err(Error::Unavailable(m)) => assert_eq!(m, "database (sqlite) is unavailable: a query failed"),
            other => panic!("a failed statement is UNAVAILABLE naming the database, got {other:?}"),
        }
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Err(Error::FailedPrecondition(m)) if i % 10 == 3 => assert!(m.contains(&format!("user:a{i} ")), "{m}"),
                Ok(subject) if i % 10 != 3 => assert_eq!(subject, format!("user:a{i}")),
                other => panic!("change {i}: {other:?}"),
            }
        }
        let mut stored: Vec<String> =
            platform_admin::Entity::find().all(&db).await.unwrap().into_iter().map(|r| r.subject).collect();
        stored.sort();
        let mut expected: Vec<String> = (0..40).filter(|i| i % 10 != 3).map(|i| format!("user:a{i}")).collect();
        expected.sort();
        assert_eq!(stored, expected, "the refused changes left nothing, the others all landed");

        let text = metrics.render();
        let sample = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{series} in {text}"))
        };
        assert_eq!(sample(r#"secrets_changes_per_write_count{backend="sqlite"}"#), 2.0, "the held one, then 41");
        assert_eq!(sample(r#"secrets_changes_per_write_sum{backend="sqlite"}"#), 42.0);
    }
}
