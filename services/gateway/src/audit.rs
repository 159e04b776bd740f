//! The audit trail: a record of every resolution, every SaveWorkload and
//! every management write through the gateway, allowed or not, with the
//! calling identity, the acting principal, the workload, the references
//! and each one's outcome, and the trace id. Never a value.
//!
//! Records are written in batches by one writer task (a burst of resolves
//! costs a handful of commits) to the gateway's audit database (sea-orm:
//! SQLite locally, PostgreSQL shared by every gateway replica in
//! production), and each is logged on the `audit` target for a SIEM once
//! stored. Two modes:
//!
//! - **strict** (the default): a call's answer waits until its record is
//!   stored; an audit store that cannot take it within
//!   `audit.record_timeout_ms` makes the call fail `UNAVAILABLE` naming the
//!   audit store (and a management write is refused up front while the
//!   store is failing), never a hang and never an unrecorded value;
//! - **buffered**: records wait in a bounded buffer; what it has to drop
//!   is counted (`secrets_audit_records{outcome="dropped"}`), and the gap
//!   in this replica's sequence numbers is itself recorded once the store
//!   takes records again.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait, sea_query::OnConflict,
};
use secrets_common::observe::Metrics;
use secrets_proto::v1::{self as pb, AuditDecision};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

pub mod db;
pub mod trail;

use db::{audit_last_access, audit_record, audit_reference};

/// Records one batch writes at most.
const MAX_BATCH: usize = 500;
/// References one record keeps (a resolve may name 64,000 through
/// placeholders); the detail says how many more there were.
const MAX_REFERENCES: usize = 1_000;
/// Bound on `detail` (a longer one is cut).
const MAX_DETAIL: usize = 1_024;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditMode {
    Strict,
    Buffered,
    /// No audit trail at all (for measuring what it costs; never in
    /// production).
    Off,
}

/// The `[audit]` table of the gateway's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub mode: AuditMode,
    /// `sqlite://path?mode=rwc` or `postgres://...` (shared by the gateway
    /// replicas: one trail).
    pub database_url: String,
    pub database_timeout_ms: u64,
    /// Strict mode: how long a call waits for its record to be stored
    /// before it fails `UNAVAILABLE` (under 2 s).
    pub record_timeout_ms: u64,
    /// Records waiting to be written at most (in strict mode, calls past it
    /// fail at once; in buffered mode, records past it are dropped and
    /// counted).
    pub buffer_size: usize,
    /// Records older than this are deleted.
    pub retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mode: AuditMode::Strict,
            database_url: "sqlite://data/audit.db?mode=rwc".into(),
            database_timeout_ms: 1_500,
            record_timeout_ms: 1_000,
            buffer_size: 10_000,
            retention_days: 365,
        }
    }
}

impl AuditConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.mode == AuditMode::Off {
            return Ok(());
        }
        anyhow::ensure!(
            ["sqlite:", "postgres://", "postgresql://"].iter().any(|p| self.database_url.starts_with(p)),
            "audit.database_url must start with sqlite:, postgres:// or postgresql://"
        );
        anyhow::ensure!(
            (1..2_000).contains(&self.record_timeout_ms),
            "audit.record_timeout_ms must be 1 to 1999: a call is refused within 2 s when the audit store cannot record"
        );
        anyhow::ensure!(self.buffer_size > 0, "audit.buffer_size must be above 0");
        anyhow::ensure!((1..=36_500).contains(&self.retention_days), "audit.retention_days must be 1 to 36500");
        anyhow::ensure!(self.database_timeout_ms > 0, "audit.database_timeout_ms must be above 0");
        Ok(())
    }
}

/// What one audited call did.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// The RPC's short name: `ResolveSecrets`, `CreateSecret`, ...
    pub rpc: &'static str,
    pub caller: String,
    pub principal: String,
    pub domain: String,
    pub workload: Option<pb::WorkloadRef>,
    pub references: Vec<pb::AuditReference>,
    pub decision: AuditDecision,
    pub trace_id: String,
    pub detail: String,
}

/// The decision a gRPC status stands for.
pub fn decision_of(code: Code) -> AuditDecision {
    match code {
        Code::Ok => AuditDecision::AuditAllowed,
        Code::PermissionDenied | Code::Unauthenticated => AuditDecision::AuditDenied,
        Code::NotFound => AuditDecision::AuditNotFound,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Internal | Code::Unknown => {
            AuditDecision::AuditUnavailable
        }
        _ => AuditDecision::AuditInvalid,
    }
}

/// The decision a SaveWorkload problem stands for.
pub fn problem_decision(problem: pb::ProblemType) -> AuditDecision {
    match problem {
        pb::ProblemType::ProblemPermissionDenied => AuditDecision::AuditDenied,
        pb::ProblemType::ProblemNotFound => AuditDecision::AuditNotFound,
        pb::ProblemType::ProblemBackendUnavailable => AuditDecision::AuditUnavailable,
        _ => AuditDecision::AuditInvalid,
    }
}

/// The trace id of a call: from its `traceparent` header.
pub fn trace_id_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_default()
        .to_string()
}

struct Queued {
    sequence: u64,
    at_ms: i64,
    record: Record,
    stored: Option<oneshot::Sender<Result<(), String>>>,
}

/// Dropped records not yet recorded as a gap: first and last sequence, count.
type Gap = Option<(u64, u64, u64)>;

struct Inner {
    db: DatabaseConnection,
    backend: &'static str,
    mode: AuditMode,
    /// This replica's name in the trail.
    gateway: String,
    sequence: AtomicU64,
    queue: mpsc::Sender<Queued>,
    /// The last write failed (strict mode refuses management writes).
    failing: AtomicBool,
    gap: Mutex<Gap>,
    record_timeout: Duration,
    /// Records one batch takes at most (buffered: the buffer's size, so
    /// what a failing store holds back stays within it).
    batch_room: usize,
    metrics: Metrics,
}

/// The audit trail as the gateway's rooms use it. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

impl Audit {
    /// No trail (`audit.mode = "off"`).
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Connects to the audit database (migrating it) and starts the writer
    /// and the pruning; both stop when the last clone goes.
    pub async fn open(config: &AuditConfig, metrics: &Metrics) -> anyhow::Result<Self> {
        if config.mode == AuditMode::Off {
            tracing::warn!("audit.mode is off: no resolution or change is recorded");
            return Ok(Self::off());
        }
        let timeout = Duration::from_millis(config.database_timeout_ms);
        let db = db::connect(&config.database_url, timeout, Some(metrics)).await?;
        let (queue, receiver) = mpsc::channel(config.buffer_size);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into());
        let gateway = format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let inner = Arc::new(Inner {
            backend: secrets_db::backend_name(&db),
            db,
            mode: config.mode,
            gateway,
            sequence: AtomicU64::new(0),
            queue,
            failing: AtomicBool::new(false),
            gap: Mutex::new(None),
            record_timeout: Duration::from_millis(config.record_timeout_ms),
            batch_room: match config.mode {
                AuditMode::Buffered => config.buffer_size.min(MAX_BATCH),
                _ => MAX_BATCH,
            },
            metrics: metrics.clone(),
        });
        tracing::info!(gateway = %inner.gateway, mode = ?config.mode, database = inner.backend, "audit trail ready");
        tokio::spawn(write_loop(Arc::downgrade(&inner), receiver, timeout));
        tokio::spawn(prune_loop(Arc::downgrade(&inner), Duration::from_secs(config.retention_days * 24 * 3600)));
        Ok(Self { inner: Some(inner) })
    }

    /// Whether records are kept at all.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    pub fn db(&self) -> Option<&DatabaseConnection> {
        self.inner.as_ref().map(|i| &i.db)
    }

    fn unavailable(inner: &Inner, why: &str) -> Status {
        Status::unavailable(format!(
            "audit store ({}): {why}; nothing is answered that is not recorded (audit.mode = \"strict\")",
            inner.backend
        ))
    }

    /// Strict mode: `UNAVAILABLE` while the audit store is failing, so a
    /// change is not made that could not be recorded.
    pub fn ready(&self) -> Result<(), Status> {
        match &self.inner {
            Some(inner) if inner.mode == AuditMode::Strict && inner.failing.load(Ordering::SeqCst) => {
                Err(Self::unavailable(inner, "its last write failed"))
            }
            _ => Ok(()),
        }
    }

    /// Records `record`. Strict: returns once it is stored, or
    /// `UNAVAILABLE` naming the audit store within `record_timeout_ms`.
    /// Buffered: returns at once; a full buffer drops it (counted).
    pub async fn record(&self, record: Record) -> Result<(), Status> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let record = sanitized(record);
        let sequence = inner.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let at_ms = chrono::Utc::now().timestamp_millis();
        match inner.mode {
            AuditMode::Strict => {
                let (stored, answer) = oneshot::channel();
                let queued = Queued { sequence, at_ms, record, stored: Some(stored) };
                if inner.queue.try_send(queued).is_err() {
                    inner.metrics.audit_records("failed", 1);
                    return Err(Self::unavailable(inner, "too many records wait to be written"));
                }
                match tokio::time::timeout(inner.record_timeout, answer).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(why))) => Err(Self::unavailable(inner, &why)),
                    Ok(Err(_)) => Err(Self::unavailable(inner, "its writer stopped")),
                    Err(_) => {
                        // Failing from now on (until a write goes through):
                        // management writes are refused up front.
                        inner.failing.store(true, Ordering::SeqCst);
                        Err(Self::unavailable(
                            inner,
                            &format!("did not record within {} ms", inner.record_timeout.as_millis()),
                        ))
                    }
                }
            }
            AuditMode::Buffered | AuditMode::Off => {
                if inner.queue.try_send(Queued { sequence, at_ms, record, stored: None }).is_err() {
                    inner.metrics.audit_records("dropped", 1);
                    let mut gap = inner.gap.lock().unwrap_or_else(|p| p.into_inner());
                    *gap = Some(match *gap {
                        None => (sequence, sequence, 1),
                        Some((first, _, n)) => (first, sequence, n + 1),
                    });
                }
                Ok(())
            }
        }
    }
}

/// The record as it is stored and logged: every text within its column,
/// without control characters.
fn sanitized(mut r: Record) -> Record {
    if let Some(more) = r.references.len().checked_sub(MAX_REFERENCES).filter(|&n| n > 0) {
        r.references.truncate(MAX_REFERENCES);
        r.detail = format!("{} ({more} more references not recorded)", r.detail);
    }
    r.caller = cut(&r.caller, 300);
    r.principal = cut(&r.principal, 300);
    r.domain = cut(&r.domain, 63);
    r.trace_id = cut(&r.trace_id, 32);
    r.detail = cut(&r.detail, MAX_DETAIL);
    if let Some(w) = r.workload.as_mut() {
        w.domain = cut(&w.domain, 63);
        w.id = cut(&w.id, 128);
        w.name = cut(&w.name, 256);
    }
    for x in &mut r.references {
        if let Some(source) = x.source.as_mut() {
            source.id = cut(&source.id, 64);
        }
        x.key = cut(&x.key, 256);
        x.version = cut(&x.version, 64);
        x.item = cut(&x.item, MAX_DETAIL);
    }
    r
}

fn reference_rows(gateway: &str, q: &Queued) -> Vec<audit_reference::ActiveModel> {
    q.record
        .references
        .iter()
        .map(|r| {
            let source = r.source.clone().unwrap_or_default();
            audit_reference::ActiveModel {
                gateway: Set(gateway.to_string()),
                sequence: Set(q.sequence as i64),
                position: Set(0),
                at_ms: Set(q.at_ms),
                source_type: Set(source_type_name(source.r#type).to_string()),
                source_id: Set(source.id.clone()),
                key: Set(r.key.clone()),
                version: Set(r.version.clone()),
                decision: Set(decision_name(r.decision).to_string()),
                item: Set(r.item.clone()),
            }
        })
        .enumerate()
        .map(|(i, mut row)| {
            row.position = Set(i as i32);
            row
        })
        .collect()
}

/// `text` as the trail stores it: control characters (which PostgreSQL
/// refuses, `\0`, and which would forge lines in a log) replaced, and cut
/// to its column's size, so no request can make a record unwritable.
fn cut(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

pub fn source_type_name(t: i32) -> &'static str {
    match pb::SourceType::try_from(t) {
        Ok(pb::SourceType::Kubernetes) => "KUBERNETES",
        Ok(pb::SourceType::Vault) => "VAULT",
        _ => "",
    }
}

pub fn decision_name(d: i32) -> &'static str {
    match AuditDecision::try_from(d).unwrap_or_default() {
        AuditDecision::Unspecified => "UNSPECIFIED",
        known => known.as_str_name().trim_start_matches("AUDIT_"),
    }
}

/// Writes one batch in one transaction.
async fn write_batch(inner: &Inner, batch: &[Queued], gap: Gap) -> Result<(), sea_orm::DbErr> {
    let txn = inner.db.begin().await?;
    let mut records: Vec<audit_record::ActiveModel> = Vec::with_capacity(batch.len() + 1);
    if let Some((first, last, n)) = gap {
        // The gap's record takes the first dropped sequence number: no
        // record of its own ever had it.
        records.push(audit_record::ActiveModel {
            gateway: Set(inner.gateway.clone()),
            sequence: Set(first as i64),
            at_ms: Set(chrono::Utc::now().timestamp_millis()),
            rpc: Set("AuditGap".into()),
            caller: Set(String::new()),
            principal: Set(String::new()),
            domain: Set(String::new()),
            workload_kind: Set(String::new()),
            workload_id: Set(String::new()),
            decision: Set(decision_name(AuditDecision::AuditDropped as i32).into()),
            trace_id: Set(String::new()),
            detail: Set(format!(
                "{n} records dropped by this gateway's audit buffer (sequence {first} to {last}): the buffer was full \
                 while the audit store did not take records"
            )),
        });
    }
    let mut references = Vec::new();
    // One row per secret: the newest of the batch (records are in order).
    let mut last_access: std::collections::HashMap<(String, String, String, String), audit_last_access::ActiveModel> =
        std::collections::HashMap::new();
    for q in batch {
        let r = &q.record;
        let workload = r.workload.clone().unwrap_or_default();
        records.push(audit_record::ActiveModel {
            gateway: Set(inner.gateway.clone()),
            sequence: Set(q.sequence as i64),
            at_ms: Set(q.at_ms),
            // Every text is within its column already (`sanitized`).
            rpc: Set(r.rpc.to_string()),
            caller: Set(r.caller.clone()),
            principal: Set(r.principal.clone()),
            domain: Set(r.domain.clone()),
            workload_kind: Set(if r.workload.is_some() {
                pb::WorkloadKind::try_from(workload.kind).unwrap_or_default().as_str_name().to_string()
            } else {
                String::new()
            }),
            workload_id: Set(workload.id.clone()),
            decision: Set(decision_name(r.decision as i32).to_string()),
            trace_id: Set(r.trace_id.clone()),
            detail: Set(r.detail.clone()),
        });
        references.extend(reference_rows(&inner.gateway, q));
        let resolution = matches!(r.rpc, "ResolveSecrets" | "ResolveWorkload");
        for reference in r.references.iter().filter(|x| resolution && x.decision == AuditDecision::AuditAllowed as i32)
        {
            let source = reference.source.clone().unwrap_or_default();
            let source_type = source_type_name(source.r#type).to_string();
            let slot = (r.domain.clone(), source_type.clone(), source.id.clone(), reference.key.clone());
            last_access.insert(
                slot,
                audit_last_access::ActiveModel {
                    domain: Set(r.domain.clone()),
                    source_type: Set(source_type),
                    source_id: Set(source.id),
                    key: Set(reference.key.clone()),
                    at_ms: Set(q.at_ms),
                    principal: Set(r.principal.clone()),
                    caller: Set(r.caller.clone()),
                },
            );
        }
    }
    // A batch written again after a commit whose answer was lost finds its
    // rows there: they are kept, not refused.
    for chunk in records.chunks(200) {
        let insert = audit_record::Entity::insert_many(chunk.to_vec()).on_conflict(
            OnConflict::columns([audit_record::Column::Gateway, audit_record::Column::Sequence])
                .do_nothing()
                .to_owned(),
        );
        ignore_none_inserted(insert.exec_without_returning(&txn).await)?;
    }
    for chunk in references.chunks(200) {
        let insert = audit_reference::Entity::insert_many(chunk.to_vec()).on_conflict(
            OnConflict::columns([
                audit_reference::Column::Gateway,
                audit_reference::Column::Sequence,
                audit_reference::Column::Position,
            ])
            .do_nothing()
            .to_owned(),
        );
        ignore_none_inserted(insert.exec_without_returning(&txn).await)?;
    }
    let last_access: Vec<_> = last_access.into_values().collect();
    for chunk in last_access.chunks(200) {
        audit_last_access::Entity::insert_many(chunk.to_vec())
            .on_conflict(
                OnConflict::columns([
                    audit_last_access::Column::Domain,
                    audit_last_access::Column::SourceType,
                    audit_last_access::Column::SourceId,
                    audit_last_access::Column::Key,
                ])
                .update_columns([
                    audit_last_access::Column::AtMs,
                    audit_last_access::Column::Principal,
                    audit_last_access::Column::Caller,
                ])
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await
}

/// An insert whose rows were all there already is no failure.
fn ignore_none_inserted(result: Result<u64, sea_orm::DbErr>) -> Result<(), sea_orm::DbErr> {
    match result {
        Ok(_) | Err(sea_orm::DbErr::RecordNotInserted) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Logs a stored record on the `audit` target, for a SIEM.
fn log_record(gateway: &str, q: &Queued) {
    if !tracing::enabled!(target: "audit", tracing::Level::INFO) {
        return;
    }
    let r = &q.record;
    let references: Vec<String> = r
        .references
        .iter()
        .map(|x| {
            let source = x.source.clone().unwrap_or_default();
            format!("{}:{}:{}={}", source_type_name(source.r#type), source.id, x.key, decision_name(x.decision))
        })
        .collect();
    let workload = r.workload.as_ref().map(secrets_common::usage::describe).unwrap_or_default();
    tracing::info!(
        target: "audit",
        gateway,
        sequence = q.sequence,
        rpc = r.rpc,
        caller = %r.caller,
        principal = %r.principal,
        domain = %r.domain,
        workload = %workload,
        references = %references.join(","),
        decision = decision_name(r.decision as i32),
        trace_id = %r.trace_id,
        detail = %r.detail,
        "audit"
    );
}

async fn write_loop(inner: std::sync::Weak<Inner>, mut receiver: mpsc::Receiver<Queued>, timeout: Duration) {
    let mut pending: Vec<Queued> = Vec::new();
    let mut delay = Duration::from_millis(50);
    loop {
        if pending.is_empty() {
            let failing = inner.upgrade().is_some_and(|i| i.failing.load(Ordering::SeqCst));
            if failing {
                // Nothing to write while the store is failing: try it every
                // second, so management writes are taken again once it
                // takes records.
                match tokio::time::timeout(Duration::from_secs(1), receiver.recv()).await {
                    Ok(Some(q)) => pending.push(q),
                    Ok(None) => return,
                    Err(_) => {
                        if let Some(inner) = inner.upgrade()
                            && tokio::time::timeout(timeout, probe(&inner.db)).await.is_ok_and(|r| r.is_ok())
                        {
                            inner.failing.store(false, Ordering::SeqCst);
                            tracing::info!("the audit store takes records again");
                        }
                        continue;
                    }
                }
            } else {
                match receiver.recv().await {
                    Some(q) => pending.push(q),
                    None => return,
                }
            }
        }
        // Buffered: what waits for a failing store stays within the buffer.
        let room = inner.upgrade().map_or(MAX_BATCH, |i| i.batch_room);
        while pending.len() < room {
            match receiver.try_recv() {
                Ok(q) => pending.push(q),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        // Strict: a caller that gave up is answered anyway (its record is
        // written: the answer it got said the store was failing).
        let gap = inner.gap.lock().unwrap_or_else(|p| p.into_inner()).take();
        let written = match tokio::time::timeout(timeout, write_batch(&inner, &pending, gap)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not answer within {} ms", timeout.as_millis())),
        };
        match written {
            Ok(()) => {
                inner.failing.store(false, Ordering::SeqCst);
                inner.metrics.audit_records("recorded", pending.len() as u64);
                // Every waiting call is answered before the batch is logged.
                for q in &mut pending {
                    if let Some(stored) = q.stored.take() {
                        let _ = stored.send(Ok(()));
                    }
                }
                for q in pending.drain(..) {
                    log_record(&inner.gateway, &q);
                }
                delay = Duration::from_millis(50);
            }
            Err(why) => {
                if !inner.failing.swap(true, Ordering::SeqCst) {
                    tracing::error!(error = %why, "the audit store refused a batch of records");
                }
                if let Some(gap) = gap {
                    // Not recorded yet: kept for the next batch.
                    let mut slot = inner.gap.lock().unwrap_or_else(|p| p.into_inner());
                    *slot = Some(match *slot {
                        None => gap,
                        Some((_, last, n)) => (gap.0, last.max(gap.1), n + gap.2),
                    });
                }
                match inner.mode {
                    // Strict: each waiting call fails; nothing is kept.
                    AuditMode::Strict => {
                        inner.metrics.audit_records("failed", pending.len() as u64);
                        for mut q in pending.drain(..) {
                            if let Some(stored) = q.stored.take() {
                                let _ = stored.send(Err(why.clone()));
                            }
                        }
                    }
                    // Buffered: kept and tried again; the channel behind
                    // fills and drops what does not fit.
                    _ => {
                        drop(inner);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// A write that changes nothing: whether the store takes writes.
async fn probe(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    use sea_orm::ConnectionTrait;
    let txn = db.begin().await?;
    txn.execute_unprepared("UPDATE audit_last_access SET at_ms = at_ms WHERE 1 = 0").await?;
    txn.commit().await
}

/// Deletes records past the retention: a few seconds after start, then
/// every ten minutes.
async fn prune_loop(inner: std::sync::Weak<Inner>, retention: Duration) {
    let mut pause = Duration::from_secs(2);
    loop {
        tokio::time::sleep(pause).await;
        pause = Duration::from_secs(600);
        let Some(inner) = inner.upgrade() else { return };
        let cutoff = chrono::Utc::now().timestamp_millis() - retention.as_millis() as i64;
        let pruned = async {
            audit_reference::Entity::delete_many()
                .filter(audit_reference::Column::AtMs.lt(cutoff))
                .exec(&inner.db)
                .await?;
            audit_last_access::Entity::delete_many()
                .filter(audit_last_access::Column::AtMs.lt(cutoff))
                .exec(&inner.db)
                .await?;
            audit_record::Entity::delete_many().filter(audit_record::Column::AtMs.lt(cutoff)).exec(&inner.db).await
        }
        .await;
        match pruned {
            Ok(r) if r.rows_affected > 0 => {
                tracing::info!(pruned = r.rows_affected, "audit records past the retention deleted")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the audit trail failed; trying again later"),
        }
    }
}

/// A page of the trail, newest first.
pub struct Page {
    pub records: Vec<pb::AuditRecord>,
    pub next: Option<(i64, i64, String)>,
}

/// What a query asks for, checked.
#[derive(Default)]
pub struct Query {
    pub domain: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub principal: Option<String>,
    pub caller: Option<String>,
    pub source: Option<(String, String)>,
    pub key: Option<String>,
    pub workload: Option<(String, String, String)>,
    pub decision: Option<String>,
    pub rpcs: Vec<String>,
    pub limit: u64,
    /// After this record (at, sequence, gateway), newest first.
    pub after: Option<(i64, i64, String)>,
}

/// Runs a query over the trail.
pub async fn query(db: &DatabaseConnection, q: &Query) -> Result<Page, sea_orm::DbErr> {
    use sea_orm::sea_query::{Expr, ExprTrait, Query as Sql};
    let mut cond = Condition::all();
    if let Some(d) = &q.domain {
        cond = cond.add(audit_record::Column::Domain.eq(d.clone()));
    }
    if let Some(t) = q.from_ms {
        cond = cond.add(audit_record::Column::AtMs.gte(t));
    }
    if let Some(t) = q.to_ms {
        cond = cond.add(audit_record::Column::AtMs.lt(t));
    }
    if let Some(p) = &q.principal {
        cond = cond.add(audit_record::Column::Principal.eq(p.clone()));
    }
    if let Some(c) = &q.caller {
        cond = cond.add(audit_record::Column::Caller.eq(c.clone()));
    }
    if let Some(d) = &q.decision {
        cond = cond.add(audit_record::Column::Decision.eq(d.clone()));
    }
    if !q.rpcs.is_empty() {
        cond = cond.add(audit_record::Column::Rpc.is_in(q.rpcs.clone()));
    }
    if let Some((domain, kind, id)) = &q.workload {
        cond = cond
            .add(audit_record::Column::Domain.eq(domain.clone()))
            .add(audit_record::Column::WorkloadKind.eq(kind.clone()))
            .add(audit_record::Column::WorkloadId.eq(id.clone()));
    }
    if let Some((source_type, source_id)) = &q.source {
        // The records that named the secret, from the references' index.
        let mut sub = Sql::select();
        sub.columns([audit_reference::Column::Gateway, audit_reference::Column::Sequence])
            .from(audit_reference::Entity)
            .and_where(audit_reference::Column::SourceType.eq(source_type.clone()))
            .and_where(audit_reference::Column::SourceId.eq(source_id.clone()));
        if let Some(k) = &q.key {
            sub.and_where(audit_reference::Column::Key.eq(k.clone()));
        }
        if let Some(t) = q.from_ms {
            sub.and_where(audit_reference::Column::AtMs.gte(t));
        }
        if let Some(t) = q.to_ms {
            sub.and_where(audit_reference::Column::AtMs.lt(t));
        }
        cond = cond.add(
            Expr::tuple([
                Expr::col((audit_record::Entity, audit_record::Column::Gateway)),
                Expr::col((audit_record::Entity, audit_record::Column::Sequence)),
            ])
            .in_subquery(sub.to_owned()),
        );
    }
    if let Some((at, sequence, gateway)) = &q.after {
        cond = cond.add(
            Condition::any()
                .add(audit_record::Column::AtMs.lt(*at))
                .add(
                    Condition::all()
                        .add(audit_record::Column::AtMs.eq(*at))
                        .add(audit_record::Column::Sequence.lt(*sequence)),
                )
                .add(
                    Condition::all()
                        .add(audit_record::Column::AtMs.eq(*at))
                        .add(audit_record::Column::Sequence.eq(*sequence))
                        .add(audit_record::Column::Gateway.lt(gateway.clone())),
                ),
        );
    }
    let mut rows = audit_record::Entity::find()
        .filter(cond)
        .order_by_desc(audit_record::Column::AtMs)
        .order_by_desc(audit_record::Column::Sequence)
        .order_by_desc(audit_record::Column::Gateway)
        .limit(q.limit + 1)
        .all(db)
        .await?;
    let next = (rows.len() as u64 > q.limit).then(|| {
        rows.truncate(q.limit as usize);
        rows.last().map(|r| (r.at_ms, r.sequence, r.gateway.clone()))
    });
    let mut references: std::collections::HashMap<(String, i64), Vec<pb::AuditReference>> = Default::default();
    if !rows.is_empty() {
        let wanted = rows.iter().fold(Condition::any(), |c, r| {
            c.add(
                Condition::all()
                    .add(audit_reference::Column::Gateway.eq(r.gateway.clone()))
                    .add(audit_reference::Column::Sequence.eq(r.sequence)),
            )
        });
        for r in audit_reference::Entity::find()
            .filter(wanted)
            .order_by_asc(audit_reference::Column::Position)
            .all(db)
            .await?
        {
            let source_type = pb::SourceType::from_str_name(&r.source_type).unwrap_or_default() as i32;
            references.entry((r.gateway.clone(), r.sequence)).or_default().push(pb::AuditReference {
                source: Some(pb::SecretSource { r#type: source_type, id: r.source_id }),
                key: r.key,
                version: r.version,
                decision: AuditDecision::from_str_name(&format!("AUDIT_{}", r.decision)).unwrap_or_default() as i32,
                item: r.item,
            });
        }
    }
    let records = rows
        .into_iter()
        .map(|r| pb::AuditRecord {
            at: Some(prost_types_timestamp(r.at_ms)),
            references: references.remove(&(r.gateway.clone(), r.sequence)).unwrap_or_default(),
            gateway: r.gateway,
            sequence: r.sequence as u64,
            rpc: r.rpc,
            caller: r.caller,
            principal: r.principal,
            workload: (!r.workload_id.is_empty()).then(|| pb::WorkloadRef {
                domain: r.domain.clone(),
                kind: pb::WorkloadKind::from_str_name(&r.workload_kind).unwrap_or_default() as i32,
                id: r.workload_id.clone(),
                name: String::new(),
            }),
            domain: r.domain,
            decision: AuditDecision::from_str_name(&format!("AUDIT_{}", r.decision)).unwrap_or_default() as i32,
            trace_id: r.trace_id,
            detail: r.detail,
        })
        .collect();
    Ok(Page { records, next: next.flatten() })
}

/// The last allowed resolution of each secret (of a domain's workloads, or
/// every one).
pub async fn last_access(
    db: &DatabaseConnection,
    domain: Option<&str>,
) -> Result<Vec<pb::SecretLastAccess>, sea_orm::DbErr> {
    let mut find = audit_last_access::Entity::find();
    if let Some(d) = domain {
        find = find.filter(audit_last_access::Column::Domain.eq(d));
    }
    let rows = find
        .order_by_asc(audit_last_access::Column::SourceType)
        .order_by_asc(audit_last_access::Column::SourceId)
        .order_by_asc(audit_last_access::Column::Key)
        .limit(10_000)
        .all(db)
        .await?;
    // Several domains' workloads may resolve one global key: the newest.
    let mut newest: std::collections::BTreeMap<(String, String, String), audit_last_access::Model> = Default::default();
    for row in rows {
        let k = (row.source_type.clone(), row.source_id.clone(), row.key.clone());
        if newest.get(&k).is_none_or(|n| n.at_ms < row.at_ms) {
            newest.insert(k, row);
        }
    }
    Ok(newest
        .into_values()
        .map(|r| pb::SecretLastAccess {
            source: Some(pb::SecretSource {
                r#type: pb::SourceType::from_str_name(&r.source_type).unwrap_or_default() as i32,
                id: r.source_id,
            }),
            key: r.key,
            // To the second.
            last_resolved: Some(prost_types_timestamp(r.at_ms - r.at_ms.rem_euclid(1_000))),
            principal: r.principal,
            caller: r.caller,
        })
        .collect())
}

fn prost_types_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1_000), nanos: (ms.rem_euclid(1_000) * 1_000_000) as i32 }
}

/// The references of a resolution's items, each with its item's outcome
/// (`answers`: the resolved items in request order; `failed`: the whole
/// call's failure, which every item shares).
pub fn resolution_references(
    domain: &str,
    items: &[pb::ResolveItem],
    answers: Option<&[pb::ResolvedItem]>,
    failed: Option<Code>,
) -> Vec<pb::AuditReference> {
    use pb::{resolve_item::Reference, resolved_item::Result as R};
    let mut references = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let decision = match (failed, answers.and_then(|a| a.get(i)).and_then(|a| a.result.as_ref())) {
            (Some(code), _) => decision_of(code),
            (None, Some(R::Value(_) | R::Text(_))) => AuditDecision::AuditAllowed,
            (None, Some(R::Error(status))) => decision_of(Code::from_i32(status.code)),
            (None, None) => AuditDecision::AuditUnavailable,
        } as i32;
        let kubernetes = |id: &str| Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: id.into() });
        let mut push = |source, key: &str| {
            references.push(pb::AuditReference {
                source,
                key: key.to_string(),
                version: String::new(),
                decision,
                item: item.id.clone(),
            })
        };
        match &item.reference {
            Some(Reference::SecretObject(o)) => push(o.source.clone(), &o.key),
            Some(Reference::AdminKey(k)) => push(kubernetes(""), k),
            Some(Reference::Text(t)) => {
                if let Ok(segments) = secrets_common::placeholder::parse(t) {
                    for key in secrets_common::placeholder::keys(&segments) {
                        push(kubernetes(domain), key);
                    }
                }
            }
            None => {}
        }
    }
    references
}
