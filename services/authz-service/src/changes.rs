//! The change log behind the change feed (`WatchSecretChanges`), in the
//! authz database beside the usage index: the secret-service and the
//! vault-config-service append every change to a secret they make or see,
//! and the gateway follows the log from a revision.
//!
//! Revisions come from one head row that every append bumps inside its
//! transaction, so they commit in order, on SQLite and across replicas on
//! PostgreSQL: a follower that has read up to revision N never later finds
//! a smaller one committed. A change seen twice (two replicas watching the
//! same store, an API write and the watch that sees it) carries the same
//! dedupe key and is recorded once. Changes older than the retention are
//! pruned from the front; a follower behind the pruned front is told to
//! resync, never left with a silent gap.

use std::{sync::Arc, time::Duration};

use prost::Message;
use sea_orm::{
    ColumnTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    sea_query::{Expr, ExprTrait},
};
use secrets_common::validate::{self, FieldViolation};
use secrets_proto::{
    internal::v1::{self as internal, change_log_server, follow_changes_response::Event},
    v1::{self as pb, SecretChangeKind, SourceType},
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    Error, Result,
    db::{secret_change, secret_change_head, store_baseline},
    policy::Policy,
};

/// Changes one append may carry.
pub const MAX_APPEND: usize = 1_000;
/// Changes read from the database at a time while following.
const PAGE: u64 = 256;
/// A follower with nothing new looks again this often, even without
/// hearing of an append (one from another replica it has not polled yet).
const RECHECK: Duration = Duration::from_secs(10);
/// PostgreSQL: how often a replica reads the head for appends made
/// through the other replicas.
const POLL: Duration = Duration::from_millis(250);
const MAX_DEDUPE_KEY: usize = 700;
/// Store baselines a list answers by default, and at most (and a record
/// call carries at most).
const DEFAULT_BASELINES: u32 = 500;
const MAX_BASELINES: u32 = 1_000;
/// Key-name bytes after which a page of baselines ends.
const PAGE_BYTES: usize = 1 << 20;
/// Revisions one pruning transaction covers at most.
const PRUNE_CHUNK: i64 = 10_000;

/// The `[changes]` table of the authz-service's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesConfig {
    /// How long the change feed keeps a change (default 7 days): a watcher
    /// that reconnects within it misses nothing; past it, it is told to
    /// resync.
    pub retention_seconds: u64,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        Self { retention_seconds: 7 * 24 * 3600 }
    }
}

#[derive(Clone)]
pub struct ChangeLog {
    policy: Policy,
    /// The newest revision known committed: appends here, and on PostgreSQL
    /// the poller's reads of the head, raise it.
    head: Arc<watch::Sender<i64>>,
    retention: Duration,
}

/// The head row as read.
#[derive(Clone, Copy, Debug)]
struct Head {
    revision: i64,
    pruned_through: i64,
}

fn kind_name(kind: i32) -> Option<&'static str> {
    match SecretChangeKind::try_from(kind).ok()? {
        SecretChangeKind::SecretCreated => Some("CREATED"),
        SecretChangeKind::SecretUpdated => Some("UPDATED"),
        SecretChangeKind::SecretDeleted => Some("DELETED"),
        SecretChangeKind::Unspecified => None,
    }
}

/// A store object's name as Kubernetes allows it: 1 to 253 characters of
/// lower-case letters, digits, '-' and '.'.
fn store_object(field: &str, name: &str) -> std::result::Result<(), FieldViolation> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(FieldViolation::new(field, "must be 1 to 253 characters of lower-case letters, digits, '-' and '.'"))
    }
}

/// The row of one change, checked (its revision set later).
fn row_of(i: usize, logged: &internal::LoggedChange) -> Result<secret_change::ActiveModel> {
    let at = |f: &str| format!("changes[{i}].{f}");
    if logged.dedupe_key.is_empty() || logged.dedupe_key.len() > MAX_DEDUPE_KEY {
        return Err(FieldViolation::new(at("dedupe_key"), format!("must be 1 to {MAX_DEDUPE_KEY} bytes")).into());
    }
    let change = logged.change.as_ref().ok_or_else(|| FieldViolation::new(at("change"), "is required"))?;
    let kind = kind_name(change.kind).ok_or_else(|| {
        FieldViolation::new(at("change.kind"), "must be SECRET_CREATED, SECRET_UPDATED or SECRET_DELETED")
    })?;
    let source = change.source.clone().unwrap_or_default();
    let source_type = match SourceType::try_from(source.r#type) {
        Ok(SourceType::Kubernetes) => "KUBERNETES",
        Ok(SourceType::Vault) => {
            validate::vault_config_id(&at("change.source.id"), &source.id)?;
            "VAULT"
        }
        _ => return Err(FieldViolation::new(at("change.source.type"), "must be KUBERNETES or VAULT").into()),
    };
    if !change.domain.is_empty() {
        validate::domain(&at("change.domain"), &change.domain)?;
    }
    validate::secret_key(&at("change.key"), &change.key)?;
    let mut body = change.clone();
    body.revision = 0;
    Ok(secret_change::ActiveModel {
        revision: Set(0),
        dedupe_key: Set(logged.dedupe_key.clone()),
        recorded_at_ms: Set(chrono::Utc::now().timestamp_millis()),
        source_type: Set(source_type.to_string()),
        source_id: Set(source.id),
        domain: Set(change.domain.clone()),
        key: Set(change.key.clone()),
        kind: Set(kind.to_string()),
        body: Set(body.encode_to_vec()),
    })
}

/// Records `rows` in `txn`: each takes the next revision from the head,
/// unless its dedupe key is recorded already (then that revision).
async fn append_rows(txn: &DatabaseTransaction, rows: Vec<secret_change::ActiveModel>) -> Result<Vec<u64>> {
    let mut revisions = Vec::with_capacity(rows.len());
    for mut row in rows {
        // Bumping first takes the head's row lock: another replica's append
        // of the same change waits for this commit, then finds it below.
        secret_change_head::Entity::update_many()
            .col_expr(secret_change_head::Column::Revision, Expr::col(secret_change_head::Column::Revision).add(1))
            .filter(secret_change_head::Column::Id.eq(1))
            .exec(txn)
            .await?;
        let head = secret_change_head::Entity::find_by_id(1)
            .one(txn)
            .await?
            .ok_or_else(|| Error::Internal("the change log's head row is missing".into()))?;
        let dedupe_key = match &row.dedupe_key {
            sea_orm::ActiveValue::Set(k) | sea_orm::ActiveValue::Unchanged(k) => k.clone(),
            sea_orm::ActiveValue::NotSet => String::new(),
        };
        if let Some(first) = secret_change::Entity::find()
            .filter(secret_change::Column::DedupeKey.eq(dedupe_key.clone()))
            .one(txn)
            .await?
        {
            revisions.push(first.revision as u64);
            continue;
        }
        row.revision = Set(head.revision);
        secret_change::Entity::insert(row).exec_without_returning(txn).await?;
        revisions.push(head.revision as u64);
    }
    Ok(revisions)
}

impl ChangeLog {
    /// The log over the authz database; [`ChangeLog::run`] keeps it (the
    /// PostgreSQL poller and the pruning).
    pub async fn new(policy: Policy, config: &ChangesConfig) -> Result<Self> {
        let log = Self {
            policy,
            head: Arc::new(watch::Sender::new(0)),
            retention: Duration::from_secs(config.retention_seconds),
        };
        let head = log.read_head().await?;
        log.head.send_replace(head.revision);
        Ok(log)
    }

    async fn read_head(&self) -> Result<Head> {
        let db = self.policy.db();
        self.policy
            .bounded(async {
                let row = secret_change_head::Entity::find_by_id(1)
                    .one(db)
                    .await?
                    .ok_or_else(|| Error::Internal("the change log's head row is missing".into()))?;
                Ok(Head { revision: row.revision, pruned_through: row.pruned_through })
            })
            .await
    }

    /// Records `changes` through the authz-service's one writer; their
    /// revisions, in order.
    pub async fn append(&self, changes: &[internal::LoggedChange]) -> Result<Vec<u64>> {
        if changes.len() > MAX_APPEND {
            return Err(FieldViolation::new("changes", format!("at most {MAX_APPEND} per call")).into());
        }
        let rows = changes.iter().enumerate().map(|(i, c)| row_of(i, c)).collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let revisions = self.transact(move |txn| Box::pin(async move { append_rows(txn, rows).await })).await?;
        if let Some(&newest) = revisions.iter().max() {
            self.head.send_if_modified(|h| {
                let newer = newest as i64 > *h;
                if newer {
                    *h = newest as i64;
                }
                newer
            });
        }
        Ok(revisions)
    }

    /// Runs `work` in a transaction of its own: on PostgreSQL beside the
    /// writer, so the head row's lock is never held beside the grant
    /// counter's (another replica's writer may take them in the other
    /// order); on SQLite through the one writer, so the file sees one.
    async fn transact<T: Send + 'static>(
        &self,
        work: impl for<'t> FnOnce(&'t DatabaseTransaction) -> futures::future::BoxFuture<'t, Result<T>> + Send + 'static,
    ) -> Result<T> {
        if self.policy.db().get_database_backend() == DbBackend::Postgres {
            let db = self.policy.db().clone();
            self.policy
                .bounded(async move {
                    use sea_orm::TransactionTrait;
                    let txn = db.begin().await?;
                    let out = work(&txn).await?;
                    txn.commit().await?;
                    Ok(out)
                })
                .await
        } else {
            self.policy.writer().write(Box::new(move |txn| work(txn))).await
        }
    }

    /// The store baselines after `after`, at most `limit`, by name; whether
    /// any were ever recorded, and whether more follow.
    pub async fn baselines(&self, after: &str, limit: u32) -> Result<internal::ListBaselinesResponse> {
        let limit = match limit {
            0 => DEFAULT_BASELINES,
            n if n > MAX_BASELINES => {
                return Err(FieldViolation::new("limit", format!("must be at most {MAX_BASELINES}")).into());
            }
            n => n,
        };
        let db = self.policy.db();
        let after = after.to_string();
        let (rows, recorded) = self
            .policy
            .bounded(async {
                let recorded = store_baseline::Entity::find_by_id(String::new()).one(db).await?.is_some();
                let rows = store_baseline::Entity::find()
                    .filter(store_baseline::Column::Object.gt(after))
                    .order_by_asc(store_baseline::Column::Object)
                    .limit(u64::from(limit) + 1)
                    .all(db)
                    .await?;
                Ok((rows, recorded))
            })
            .await?;
        let mut more = rows.len() > limit as usize;
        let mut baselines = Vec::new();
        let mut bytes = 0;
        for row in rows.into_iter().take(limit as usize) {
            // A page stays well within a message, however many keys.
            if bytes > PAGE_BYTES {
                more = true;
                break;
            }
            bytes += row.keys.len() + row.object.len();
            baselines.push(internal::StoreBaseline {
                keys: row.keys.split('\n').filter(|k| !k.is_empty()).map(str::to_string).collect(),
                object: row.object,
                version: row.version as u64,
            });
        }
        Ok(internal::ListBaselinesResponse { baselines, recorded, more })
    }

    /// Records store objects as seen (a baseline older than the one kept is
    /// ignored) and forgets `removed` ones; a `complete` record marks that
    /// baselines were taken.
    pub async fn record_baselines(&self, mut request: internal::RecordBaselinesRequest) -> Result<()> {
        // The same order on every replica: two recorders' upserts never
        // wait on each other's rows in opposite orders (PostgreSQL).
        request.baselines.sort_by(|a, b| a.object.cmp(&b.object));
        if request.baselines.len() + request.removed.len() > MAX_BASELINES as usize {
            return Err(FieldViolation::new("baselines", format!("at most {MAX_BASELINES} objects per call")).into());
        }
        let mut rows = Vec::with_capacity(request.baselines.len() + 1);
        for (i, b) in request.baselines.iter().enumerate() {
            store_object(&format!("baselines[{i}].object"), &b.object)?;
            for (j, key) in b.keys.iter().enumerate() {
                validate::secret_key(&format!("baselines[{i}].keys[{j}]"), key)?;
            }
            let version = i64::try_from(b.version)
                .map_err(|_| FieldViolation::new(format!("baselines[{i}].version"), "is too large"))?;
            rows.push(store_baseline::ActiveModel {
                object: Set(b.object.clone()),
                version: Set(version),
                keys: Set(b.keys.join("\n")),
            });
        }
        for (i, object) in request.removed.iter().enumerate() {
            store_object(&format!("removed[{i}]"), object)?;
        }
        if request.complete {
            // The mark that baselines were taken: a row no object can name.
            rows.insert(
                0,
                store_baseline::ActiveModel { object: Set(String::new()), version: Set(0), keys: Set(String::new()) },
            );
        }
        let removed = request.removed;
        self.transact(move |txn| {
            Box::pin(async move {
                use sea_orm::sea_query::{Alias, OnConflict};
                for row in rows {
                    store_baseline::Entity::insert(row)
                        .on_conflict(
                            OnConflict::column(store_baseline::Column::Object)
                                .update_columns([store_baseline::Column::Version, store_baseline::Column::Keys])
                                .action_and_where(
                                    Expr::col((store_baseline::Entity, store_baseline::Column::Version))
                                        .lt(Expr::col((Alias::new("excluded"), store_baseline::Column::Version))),
                                )
                                .to_owned(),
                        )
                        .exec_without_returning(txn)
                        .await?;
                }
                if !removed.is_empty() {
                    store_baseline::Entity::delete_many()
                        .filter(store_baseline::Column::Object.is_in(removed))
                        .exec(txn)
                        .await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// The changes after `after`, at most `limit`, in revision order.
    async fn page(&self, after: i64, limit: u64) -> Result<Vec<pb::SecretChange>> {
        let db = self.policy.db();
        let rows = self
            .policy
            .bounded(async {
                Ok(secret_change::Entity::find()
                    .filter(secret_change::Column::Revision.gt(after))
                    .order_by_asc(secret_change::Column::Revision)
                    .limit(limit)
                    .all(db)
                    .await?)
            })
            .await?;
        rows.into_iter()
            .map(|row| {
                let mut change = pb::SecretChange::decode(row.body.as_slice()).map_err(|e| {
                    Error::Internal(format!("change {} of the change log cannot be decoded: {e}", row.revision))
                })?;
                change.revision = row.revision as u64;
                Ok(change)
            })
            .collect()
    }

    /// Follows the log after `after` (0: from its current end) into `tx`
    /// until the receiver goes.
    async fn feed(
        &self,
        after: u64,
        tx: &mpsc::Sender<std::result::Result<internal::FollowChangesResponse, Status>>,
    ) -> Result<()> {
        let mut heard = self.head.subscribe();
        let send =
            async |event: Event| tx.send(Ok(internal::FollowChangesResponse { event: Some(event) })).await.is_ok();
        let mut cursor = match after {
            0 => self.read_head().await?.revision,
            n => i64::try_from(n).map_err(|_| FieldViolation::new("after_revision", "is past any revision"))?,
        };
        let mut told: Option<i64> = None;
        let first = self.read_head().await?;
        if cursor > first.revision {
            // A cursor this log never gave (a restored database, another
            // installation's cursor): what it missed cannot be told.
            let resync = pb::ResyncRequired {
                after_revision: cursor as u64,
                oldest_revision: first.pruned_through as u64 + 1,
                message: format!(
                    "revision {cursor} is past the newest this change feed has recorded ({}): the feed was restored \
                     or the cursor is another's; list the secrets and treat every workload as possibly affected, \
                     then follow on from here",
                    first.revision
                ),
            };
            if !send(Event::ResyncRequired(resync)).await {
                return Ok(());
            }
            cursor = first.revision;
        }
        loop {
            let head = self.read_head().await?;
            if cursor < head.pruned_through {
                let resync = pb::ResyncRequired {
                    after_revision: cursor as u64,
                    oldest_revision: head.pruned_through as u64 + 1,
                    message: format!(
                        "the changes after revision {cursor} up to {} are past the change feed's retention ({} s) and \
                         were pruned: list the secrets and treat every workload as possibly affected, then follow \
                         on from here",
                        head.pruned_through,
                        self.retention.as_secs()
                    ),
                };
                if !send(Event::ResyncRequired(resync)).await {
                    return Ok(());
                }
                cursor = head.pruned_through;
            }
            let changes = self.page(cursor, PAGE).await?;
            // A prune between the head's read and the page may have taken
            // changes after the cursor: go round again to say so.
            if self.read_head().await?.pruned_through > cursor {
                continue;
            }
            let full = changes.len() as u64 == PAGE;
            for change in changes {
                cursor = change.revision as i64;
                if !send(Event::Change(change)).await {
                    return Ok(());
                }
            }
            if full {
                continue;
            }
            // Everything committed up to the head as read before the page
            // was in it (revisions given to duplicates have no row).
            cursor = Ord::max(cursor, head.revision);
            if told != Some(cursor) {
                if !send(Event::CaughtUp(cursor as u64)).await {
                    return Ok(());
                }
                told = Some(cursor);
            }
            tokio::select! {
                () = tx.closed() => return Ok(()),
                _ = heard.wait_for(|h| *h > cursor) => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Keeps the log: on PostgreSQL reads the head for other replicas'
    /// appends; prunes changes past the retention. Runs until dropped.
    pub async fn run(self) {
        let postgres = self.policy.db().get_database_backend() == DbBackend::Postgres;
        let prune_every = (self.retention / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(if postgres { POLL } else { prune_every }).await;
            if postgres && let Ok(head) = self.read_head().await {
                self.head.send_if_modified(|h| {
                    let newer = head.revision > *h;
                    if newer {
                        *h = head.revision;
                    }
                    newer
                });
            }
            if last_prune.elapsed() >= prune_every {
                last_prune = tokio::time::Instant::now();
                // A chunk at a time, until nothing is past the retention.
                for _ in 0..1_000 {
                    match self.prune().await {
                        Ok(0) => break,
                        Ok(n) => tracing::info!(pruned = n, "changes past the change feed's retention pruned"),
                        Err(e) => {
                            tracing::warn!(error = %e, "pruning the change feed failed; trying again later");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Removes the changes recorded before the retention, from the front;
    /// how many.
    pub async fn prune(&self) -> Result<u64> {
        let cutoff = chrono::Utc::now().timestamp_millis() - self.retention.as_millis() as i64;
        self.policy
            .writer()
            .write(Box::new(move |txn| {
                Box::pin(async move {
                    let newest_old: Option<i64> = secret_change::Entity::find()
                        .select_only()
                        .column_as(secret_change::Column::Revision.max(), "newest")
                        .filter(secret_change::Column::RecordedAtMs.lt(cutoff))
                        .into_tuple::<Option<i64>>()
                        .one(txn)
                        .await?
                        .flatten();
                    let Some(newest_old) = newest_old else { return Ok(0) };
                    // At most PRUNE_CHUNK changes a transaction; the next
                    // round takes the rest.
                    let oldest: Option<i64> = secret_change::Entity::find()
                        .select_only()
                        .column_as(secret_change::Column::Revision.min(), "oldest")
                        .into_tuple::<Option<i64>>()
                        .one(txn)
                        .await?
                        .flatten();
                    let through = oldest.map_or(newest_old, |o| Ord::min(newest_old, o.saturating_add(PRUNE_CHUNK)));
                    let removed = secret_change::Entity::delete_many()
                        .filter(secret_change::Column::Revision.lte(through))
                        .exec(txn)
                        .await?
                        .rows_affected;
                    secret_change_head::Entity::update_many()
                        .col_expr(secret_change_head::Column::PrunedThrough, Expr::value(through))
                        .filter(secret_change_head::Column::Id.eq(1))
                        .filter(secret_change_head::Column::PrunedThrough.lt(through))
                        .exec(txn)
                        .await?;
                    Ok(removed)
                })
            }))
            .await
    }
}

#[tonic::async_trait]
impl change_log_server::ChangeLog for ChangeLog {
    #[instrument(skip_all, fields(rpc = "Append", changes = request.get_ref().changes.len() as i64))]
    async fn append(
        &self,
        request: Request<internal::AppendChangesRequest>,
    ) -> std::result::Result<Response<internal::AppendChangesResponse>, Status> {
        let revisions = ChangeLog::append(self, &request.get_ref().changes).await?;
        Ok(Response::new(internal::AppendChangesResponse { revisions }))
    }

    #[instrument(skip_all, fields(rpc = "ListBaselines"))]
    async fn list_baselines(
        &self,
        request: Request<internal::ListBaselinesRequest>,
    ) -> std::result::Result<Response<internal::ListBaselinesResponse>, Status> {
        let r = request.get_ref();
        Ok(Response::new(self.baselines(&r.after_object, r.limit).await?))
    }

    #[instrument(skip_all, fields(rpc = "RecordBaselines", objects = request.get_ref().baselines.len() as i64))]
    async fn record_baselines(
        &self,
        request: Request<internal::RecordBaselinesRequest>,
    ) -> std::result::Result<Response<internal::RecordBaselinesResponse>, Status> {
        ChangeLog::record_baselines(self, request.into_inner()).await?;
        Ok(Response::new(internal::RecordBaselinesResponse {}))
    }

    type FollowStream =
        tokio_stream::wrappers::ReceiverStream<std::result::Result<internal::FollowChangesResponse, Status>>;

    #[instrument(skip_all, fields(rpc = "Follow", after = request.get_ref().after_revision))]
    async fn follow(
        &self,
        request: Request<internal::FollowChangesRequest>,
    ) -> std::result::Result<Response<Self::FollowStream>, Status> {
        let after = request.get_ref().after_revision;
        if i64::try_from(after).is_err() {
            return Err(Error::from(FieldViolation::new("after_revision", "is past any revision")).into());
        }
        let (tx, rx) = mpsc::channel(64);
        let log = self.clone();
        tokio::spawn(async move {
            if let Err(e) = log.feed(after, &tx).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
