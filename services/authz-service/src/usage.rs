//! The usage index: which saved workload references which secret, in the
//! authz database (references only, never a value). The gateway records a
//! workload when it is saved; the secret-service and the
//! vault-config-service ask before a delete. Callers authorize; this
//! service checks only the shape of what it stores.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, sea_query::OnConflict,
};
use secrets_common::validate::{self, FieldViolation};
use secrets_proto::{
    internal::v1::{self as internal, usage_index_server},
    v1::{self as pb, SourceType, WorkloadKind},
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    Error, Result,
    db::{workload, workload_reference},
    policy::Policy,
};

/// References one workload may record (a payload resolves at most 1,000
/// items, each with at most 64 placeholders).
pub const MAX_REFERENCES: usize = 64_000;
/// Workloads one `FindUsages` returns.
pub const MAX_LIMIT: u32 = 1_000;
pub const MAX_FIELD_LEN: usize = 1_024;

/// Writes go through the authz-service's one writer ([`crate::writer`]):
/// concurrent saves share a transaction.
#[derive(Clone)]
pub struct UsageIndex {
    policy: Policy,
}

/// A workload's identity in the index.
struct Key {
    domain: String,
    kind: &'static str,
    id: String,
}

fn kind_name(kind: i32) -> Result<&'static str> {
    match WorkloadKind::try_from(kind) {
        Ok(WorkloadKind::Unspecified) | Err(_) => Err(Error::from(FieldViolation::new(
            "kind",
            format!("{kind} is not a workload kind; use WORKLOAD_KIND_SPARK_JOB, WORKLOAD_KIND_COMPUTE, ..."),
        ))),
        Ok(k) => Ok(k.as_str_name().trim_start_matches("WORKLOAD_KIND_")),
    }
}

fn kind_of(name: &str) -> i32 {
    WorkloadKind::from_str_name(&format!("WORKLOAD_KIND_{name}")).unwrap_or_default() as i32
}

fn source_name(source: i32, field: &str) -> Result<&'static str> {
    match SourceType::try_from(source) {
        Ok(SourceType::Kubernetes) => Ok("KUBERNETES"),
        Ok(SourceType::Vault) => Ok("VAULT"),
        _ => Err(Error::from(FieldViolation::new(field, "must be KUBERNETES or VAULT"))),
    }
}

fn source_of(name: &str) -> i32 {
    SourceType::from_str_name(name).unwrap_or_default() as i32
}

/// PERMISSION_DENIED when another identity owns the workload. Workloads
/// recorded before owners were have none: the next save claims them.
fn owned_elsewhere(row: &workload::Model, owner: &str, override_owner: bool, action: &str) -> Result<()> {
    if row.owner.is_empty() || row.owner == owner || override_owner {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "{} may not {action} workload {}/{} {:?}: {} saved it, and only it or a platform admin may change its record",
        if owner.is_empty() { "the caller" } else { owner },
        row.domain,
        row.kind,
        row.id,
        row.owner
    )))
}

fn key_of(domain: &str, kind: i32, id: &str) -> Result<Key> {
    validate::domain("domain", domain)?;
    validate::workload_id("id", id)?;
    Ok(Key { domain: domain.to_string(), kind: kind_name(kind)?, id: id.to_string() })
}

fn reference_row(key: &Key, i: usize, r: &internal::IndexedReference) -> Result<workload_reference::ActiveModel> {
    let at = |f: &str| format!("references[{i}].{f}");
    if r.field.is_empty() || r.field.len() > MAX_FIELD_LEN {
        return Err(Error::from(FieldViolation::new(at("field"), format!("must be 1 to {MAX_FIELD_LEN} bytes"))));
    }
    let source_type = source_name(r.source_type, &at("source_type"))?;
    if source_type == "KUBERNETES" {
        validate::domain(&at("source_id"), &r.source_id)?;
    } else {
        validate::vault_config_id(&at("source_id"), &r.source_id)?;
    }
    validate::secret_key(&at("key"), &r.key)?;
    Ok(workload_reference::ActiveModel {
        domain: Set(key.domain.clone()),
        kind: Set(key.kind.to_string()),
        workload_id: Set(key.id.clone()),
        field: Set(r.field.clone()),
        source_type: Set(source_type.to_string()),
        source_id: Set(r.source_id.clone()),
        key: Set(r.key.clone()),
        placeholder: Set(r.placeholder),
    })
}

/// A save, checked and ready to write.
struct Save {
    key: Key,
    name: String,
    rows: Vec<workload_reference::ActiveModel>,
    saved_by: String,
    owner: String,
    override_owner: bool,
    /// One field per line.
    plaintext_fields: String,
}

/// Placeholders listed per workload in a legacy report (a workload may
/// hold thousands; the first ones say what to migrate).
pub const MAX_LEGACY_PLACEHOLDERS: usize = 100;

/// Fields holding a plaintext credential one workload may record.
pub const MAX_PLAINTEXT_FIELDS: usize = 16;

fn plaintext_fields(fields: &[String]) -> Result<String> {
    if fields.len() > MAX_PLAINTEXT_FIELDS {
        return Err(Error::from(FieldViolation::new(
            "plaintext_fields",
            format!("at most {MAX_PLAINTEXT_FIELDS} per workload"),
        )));
    }
    for (i, f) in fields.iter().enumerate() {
        if f.is_empty() || f.len() > MAX_FIELD_LEN || f.chars().any(char::is_control) {
            return Err(Error::from(FieldViolation::new(
                format!("plaintext_fields[{i}]"),
                format!("must be a field path of 1 to {MAX_FIELD_LEN} bytes without control characters"),
            )));
        }
    }
    Ok(fields.join("\n"))
}

fn fields_of(stored: &str) -> Vec<String> {
    stored.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// Replaces one workload's record and references inside `txn`; true when
/// it was indexed before.
async fn save_one(txn: &DatabaseTransaction, backend: DbBackend, save: &Save) -> Result<bool> {
    let key = &save.key;
    let id = (key.domain.clone(), key.kind.to_string(), key.id.clone());
    let model = workload::ActiveModel {
        domain: Set(key.domain.clone()),
        kind: Set(key.kind.to_string()),
        id: Set(key.id.clone()),
        name: Set(save.name.clone()),
        saved_by: Set(save.saved_by.clone()),
        saved_at: Set(Utc::now()),
        owner: Set(save.owner.clone()),
        plaintext_fields: Set(save.plaintext_fields.clone()),
    };
    // Claim the row first: a new workload becomes this owner's, and on
    // PostgreSQL a concurrent first save waits here for this one, then
    // finds the row taken. Then the row, locked, is checked for its owner
    // before anything changes.
    let claimed = workload::Entity::insert(model.clone())
        .on_conflict(
            OnConflict::columns([workload::Column::Domain, workload::Column::Kind, workload::Column::Id])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    let existed = claimed == 0;
    if existed {
        let mut find = workload::Entity::find_by_id(id);
        if backend == DbBackend::Postgres {
            find = find.lock_exclusive();
        }
        let row = find.one(txn).await?.ok_or_else(|| {
            Error::Internal(format!("workload {}/{} {:?} vanished while saved", key.domain, key.kind, key.id))
        })?;
        owned_elsewhere(&row, &save.owner, save.override_owner, "replace")?;
        model.update(txn).await?;
    }
    workload_reference::Entity::delete_many()
        .filter(workload_reference::Column::Domain.eq(&key.domain))
        .filter(workload_reference::Column::Kind.eq(key.kind))
        .filter(workload_reference::Column::WorkloadId.eq(&key.id))
        .exec(txn)
        .await?;
    for chunk in save.rows.chunks(500) {
        workload_reference::Entity::insert_many(chunk.to_vec()).exec_without_returning(txn).await?;
    }
    Ok(existed)
}

fn to_reference(row: workload_reference::Model) -> internal::IndexedReference {
    internal::IndexedReference {
        field: row.field,
        source_type: source_of(&row.source_type),
        source_id: row.source_id,
        key: row.key,
        placeholder: row.placeholder,
    }
}

fn to_ref(row: &workload::Model) -> pb::WorkloadRef {
    pb::WorkloadRef { domain: row.domain.clone(), kind: kind_of(&row.kind), id: row.id.clone(), name: row.name.clone() }
}

impl UsageIndex {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// Replaces the workload's references; true when it was indexed before.
    pub async fn record(&self, request: internal::RecordWorkloadRequest) -> Result<bool> {
        let w = request.workload.ok_or_else(|| Error::from(FieldViolation::new("workload", "is required")))?;
        let key = key_of(&w.domain, w.kind, &w.id)?;
        validate::workload_name("workload.name", &w.name)?;
        if request.references.len() > MAX_REFERENCES {
            return Err(Error::from(FieldViolation::new(
                "references",
                format!("at most {MAX_REFERENCES} per workload"),
            )));
        }
        // One row per (field, source, key): a field naming a key twice
        // references it once.
        let mut rows = Vec::with_capacity(request.references.len());
        let mut seen = BTreeSet::new();
        for (i, r) in request.references.iter().enumerate() {
            let row = reference_row(&key, i, r)?;
            if seen.insert((r.field.clone(), r.source_type, r.source_id.clone(), r.key.clone())) {
                rows.push(row);
            }
        }
        let name = if w.name.is_empty() { w.id.clone() } else { w.name.clone() };
        let save = Save {
            key,
            name,
            rows,
            saved_by: request.saved_by,
            owner: request.owner,
            override_owner: request.override_owner,
            plaintext_fields: plaintext_fields(&request.plaintext_fields)?,
        };
        // Queued with the changes of other callers and written with them
        // in one transaction; the caller is answered once it is committed.
        let backend = self.policy.db().get_database_backend();
        self.policy
            .writer()
            .write(Box::new(move |txn| Box::pin(async move { save_one(txn, backend, &save).await })))
            .await
    }

    /// True when the workload was indexed. A workload another identity
    /// owns is removed only with `override_owner`.
    pub async fn forget(&self, request: &internal::ForgetWorkloadRequest) -> Result<bool> {
        let key = key_of(&request.domain, request.kind, &request.id)?;
        let (owner, override_owner) = (request.owner.clone(), request.override_owner);
        self.policy
            .writer()
            .write(Box::new(move |txn| {
                Box::pin(async move {
                    let id = (key.domain, key.kind.to_string(), key.id);
                    let Some(row) = workload::Entity::find_by_id(id.clone()).one(txn).await? else {
                        return Ok(false);
                    };
                    owned_elsewhere(&row, &owner, override_owner, "delete")?;
                    // The owner checked is the owner deleted: a save that
                    // changed it in between makes this delete remove nothing.
                    let removed = workload::Entity::delete_by_id(id)
                        .filter(workload::Column::Owner.eq(row.owner.clone()))
                        .exec(txn)
                        .await?;
                    Ok(removed.rows_affected > 0)
                })
            }))
            .await
    }

    pub async fn get(&self, domain: &str, kind: i32, id: &str) -> Result<internal::GetWorkloadResponse> {
        let key = key_of(domain, kind, id)?;
        self.policy
            .bounded(async {
                let db = self.policy.db();
                let Some(row) =
                    workload::Entity::find_by_id((key.domain.clone(), key.kind.to_string(), key.id.clone()))
                        .one(db)
                        .await?
                else {
                    return Ok(internal::GetWorkloadResponse::default());
                };
                let references = workload_reference::Entity::find()
                    .filter(workload_reference::Column::Domain.eq(&key.domain))
                    .filter(workload_reference::Column::Kind.eq(key.kind))
                    .filter(workload_reference::Column::WorkloadId.eq(&key.id))
                    .order_by_asc(workload_reference::Column::Field)
                    .order_by_asc(workload_reference::Column::Key)
                    .all(db)
                    .await?;
                Ok(internal::GetWorkloadResponse {
                    found: true,
                    workload: Some(to_ref(&row)),
                    references: references.into_iter().map(to_reference).collect(),
                    plaintext_fields: fields_of(&row.plaintext_fields),
                    saved_by: row.saved_by,
                    owner: row.owner,
                })
            })
            .await
    }

    pub async fn find(&self, request: &internal::FindUsagesRequest) -> Result<internal::FindUsagesResponse> {
        let source_type = source_name(request.source_type, "source_type")?;
        if request.limit > MAX_LIMIT {
            return Err(Error::from(FieldViolation::new("limit", format!("is at most {MAX_LIMIT}"))));
        }
        let mut query = workload_reference::Entity::find()
            .filter(workload_reference::Column::SourceType.eq(source_type))
            .order_by_asc(workload_reference::Column::Domain)
            .order_by_asc(workload_reference::Column::Kind)
            .order_by_asc(workload_reference::Column::WorkloadId)
            .order_by_asc(workload_reference::Column::Field);
        if !request.source_id.is_empty() {
            query = query.filter(workload_reference::Column::SourceId.eq(&request.source_id));
        }
        if !request.key.is_empty() {
            query = query.filter(workload_reference::Column::Key.eq(&request.key));
        }
        if !request.source_ids.is_empty() {
            query = query.filter(workload_reference::Column::SourceId.is_in(request.source_ids.iter().cloned()));
        }
        self.policy
            .bounded(async {
                let db = self.policy.db();
                let rows = query.all(db).await?;
                let source_ids: BTreeSet<String> = rows.iter().map(|r| r.source_id.clone()).collect();
                let mut by_workload: BTreeMap<(String, String, String), Vec<internal::IndexedReference>> =
                    BTreeMap::new();
                for row in rows {
                    by_workload
                        .entry((row.domain.clone(), row.kind.clone(), row.workload_id.clone()))
                        .or_default()
                        .push(to_reference(row));
                }
                let total = by_workload.len() as u32;
                let first: Vec<_> = by_workload.into_iter().take(request.limit as usize).collect();
                let mut names = BTreeMap::new();
                if !first.is_empty() {
                    let wanted = first.iter().fold(Condition::any(), |c, ((d, k, i), _)| {
                        c.add(
                            Condition::all()
                                .add(workload::Column::Domain.eq(d))
                                .add(workload::Column::Kind.eq(k))
                                .add(workload::Column::Id.eq(i)),
                        )
                    });
                    for row in workload::Entity::find().filter(wanted).all(db).await? {
                        names.insert((row.domain.clone(), row.kind.clone(), row.id.clone()), to_ref(&row));
                    }
                }
                let usages = first
                    .into_iter()
                    .map(|(k, references)| internal::WorkloadUsage {
                        workload: Some(names.remove(&k).unwrap_or_else(|| pb::WorkloadRef {
                            domain: k.0.clone(),
                            kind: kind_of(&k.1),
                            name: k.2.clone(),
                            id: k.2,
                        })),
                        references,
                    })
                    .collect();
                Ok(internal::FindUsagesResponse { usages, total, source_ids: source_ids.into_iter().collect() })
            })
            .await
    }
}

impl UsageIndex {
    /// The saved workloads that still use placeholders or hold plaintext
    /// credentials (the first `limit`, by domain, kind and id, with their
    /// placeholder references), and counts per kind over all of them.
    pub async fn legacy(&self, request: &internal::ListLegacyRequest) -> Result<internal::ListLegacyResponse> {
        if !request.domain.is_empty() {
            validate::domain("domain", &request.domain)?;
        }
        if request.limit > MAX_LIMIT {
            return Err(Error::from(FieldViolation::new("limit", format!("is at most {MAX_LIMIT}"))));
        }
        let domain = (!request.domain.is_empty()).then(|| request.domain.clone());
        self.policy
            .bounded(async {
                let db = self.policy.db();
                let mut workloads = workload::Entity::find()
                    .select_only()
                    .column(workload::Column::Domain)
                    .column(workload::Column::Kind)
                    .column(workload::Column::Id)
                    .column(workload::Column::Name)
                    .column(workload::Column::PlaintextFields);
                let mut placeholders =
                    workload_reference::Entity::find().filter(workload_reference::Column::Placeholder.eq(true));
                if let Some(d) = &domain {
                    workloads = workloads.filter(workload::Column::Domain.eq(d));
                    placeholders = placeholders.filter(workload_reference::Column::Domain.eq(d));
                }
                // Names and plaintext fields only: a few bytes per workload.
                let rows: Vec<(String, String, String, String, String)> = workloads.into_tuple().all(db).await?;
                let placeholders = placeholders
                    .order_by_asc(workload_reference::Column::Field)
                    .order_by_asc(workload_reference::Column::Key)
                    .all(db)
                    .await?;
                let mut by_workload: BTreeMap<(String, String, String), Vec<internal::IndexedReference>> =
                    BTreeMap::new();
                for row in placeholders {
                    by_workload
                        .entry((row.domain.clone(), row.kind.clone(), row.workload_id.clone()))
                        .or_default()
                        .push(to_reference(row));
                }
                let mut counts: BTreeMap<String, internal::KindCount> = BTreeMap::new();
                let mut legacy = Vec::new();
                for (domain, kind, id, name, plaintext) in rows {
                    let count = counts
                        .entry(kind.clone())
                        .or_insert_with(|| internal::KindCount { kind: kind_of(&kind), ..Default::default() });
                    count.saved += 1;
                    let key = (domain, kind, id);
                    let refs = by_workload.remove(&key).unwrap_or_default();
                    let fields = fields_of(&plaintext);
                    count.with_placeholders += u32::from(!refs.is_empty());
                    count.with_plaintext += u32::from(!fields.is_empty());
                    if refs.is_empty() && fields.is_empty() {
                        continue;
                    }
                    count.legacy += 1;
                    let mut refs = refs;
                    refs.truncate(MAX_LEGACY_PLACEHOLDERS);
                    legacy.push((key, name, refs, fields));
                }
                legacy.sort_by(|a, b| a.0.cmp(&b.0));
                let total = legacy.len() as u32;
                let workloads = legacy
                    .into_iter()
                    .take(request.limit as usize)
                    .map(|((domain, kind, id), name, placeholders, plaintext_fields)| internal::LegacyEntry {
                        workload: Some(pb::WorkloadRef { domain, kind: kind_of(&kind), id, name }),
                        placeholders,
                        plaintext_fields,
                    })
                    .collect();
                Ok(internal::ListLegacyResponse { workloads, total, counts: counts.into_values().collect() })
            })
            .await
    }
}

#[tonic::async_trait]
impl usage_index_server::UsageIndex for UsageIndex {
    #[instrument(skip_all, fields(rpc = "RecordWorkload", references = request.get_ref().references.len() as i64))]
    async fn record_workload(
        &self,
        request: Request<internal::RecordWorkloadRequest>,
    ) -> Result<Response<internal::RecordWorkloadResponse>, Status> {
        let replaced = self.record(request.into_inner()).await?;
        Ok(Response::new(internal::RecordWorkloadResponse { replaced }))
    }

    #[instrument(skip_all, fields(rpc = "ForgetWorkload"))]
    async fn forget_workload(
        &self,
        request: Request<internal::ForgetWorkloadRequest>,
    ) -> Result<Response<internal::ForgetWorkloadResponse>, Status> {
        let r = request.into_inner();
        let removed = self.forget(&r).await?;
        Ok(Response::new(internal::ForgetWorkloadResponse { removed }))
    }

    #[instrument(skip_all, fields(rpc = "GetWorkload"))]
    async fn get_workload(
        &self,
        request: Request<internal::GetWorkloadRequest>,
    ) -> Result<Response<internal::GetWorkloadResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.get(&r.domain, r.kind, &r.id).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListLegacy", total))]
    async fn list_legacy(
        &self,
        request: Request<internal::ListLegacyRequest>,
    ) -> Result<Response<internal::ListLegacyResponse>, Status> {
        let found = self.legacy(request.get_ref()).await?;
        tracing::Span::current().record("total", found.total as i64);
        Ok(Response::new(found))
    }

    #[instrument(skip_all, fields(rpc = "FindUsages", total))]
    async fn find_usages(
        &self,
        request: Request<internal::FindUsagesRequest>,
    ) -> Result<Response<internal::FindUsagesResponse>, Status> {
        let found = self.find(request.get_ref()).await?;
        tracing::Span::current().record("total", found.total as i64);
        Ok(Response::new(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b";

    fn reference(source: SourceType, source_id: &str, key: &str, field: &str) -> internal::IndexedReference {
        internal::IndexedReference {
            field: field.into(),
            source_type: source as i32,
            source_id: source_id.into(),
            key: key.into(),
            placeholder: false,
        }
    }

    fn refused(r: Result<impl Sized>) -> FieldViolation {
        match r {
            Err(Error::InvalidArgument(mut v)) if v.len() == 1 => v.remove(0),
            Err(e) => panic!("expected INVALID_ARGUMENT, got {e}"),
            Ok(_) => panic!("expected INVALID_ARGUMENT"),
        }
    }

    #[test]
    fn workload_kinds_and_sources_are_stored_by_name_and_read_back() {
        for kind in [WorkloadKind::SparkJob, WorkloadKind::Compute, WorkloadKind::LdapIntegration] {
            let name = kind_name(kind as i32).unwrap();
            assert!(!name.starts_with("WORKLOAD_KIND_"), "{name}");
            assert_eq!(kind_of(name), kind as i32);
        }
        assert_eq!(refused(kind_name(0)).field, "kind");
        assert_eq!(refused(kind_name(999)).field, "kind");
        assert_eq!(source_of(source_name(SourceType::Vault as i32, "s").unwrap()), SourceType::Vault as i32);
        assert_eq!(refused(source_name(0, "references[2].source_type")).field, "references[2].source_type");
    }

    #[test]
    fn each_reference_is_checked_naming_its_index_and_field() {
        let key = key_of("sales", WorkloadKind::SparkJob as i32, "job-1").unwrap();
        assert!(reference_row(&key, 0, &reference(SourceType::Kubernetes, "sales", "db", "env.DB")).is_ok());
        assert!(reference_row(&key, 0, &reference(SourceType::Vault, CONFIG, "s3", "env.S3")).is_ok());
        let cases = [
            (reference(SourceType::Kubernetes, "sales", "db", ""), "references[3].field"),
            (reference(SourceType::Kubernetes, "sales", "db", &"f".repeat(MAX_FIELD_LEN + 1)), "references[3].field"),
            (reference(SourceType::Vault, "sales", "db", "f"), "references[3].source_id"),
            (reference(SourceType::Kubernetes, "Sales Team", "db", "f"), "references[3].source_id"),
            (reference(SourceType::Kubernetes, "sales", "no spaces", "f"), "references[3].key"),
            (reference(SourceType::Unspecified, "sales", "db", "f"), "references[3].source_type"),
        ];
        for (r, field) in cases {
            assert_eq!(refused(reference_row(&key, 3, &r)).field, field);
        }
        assert_eq!(refused(key_of("Not A Domain", 1, "x")).field, "domain");
    }

    #[test]
    fn only_the_owner_an_override_or_a_first_save_changes_an_owned_record() {
        let row = |owner: &str| workload::Model {
            domain: "sales".into(),
            kind: "SPARK_JOB".into(),
            id: "job-1".into(),
            name: "nightly".into(),
            saved_by: owner.into(),
            saved_at: chrono::Utc::now(),
            owner: owner.into(),
            plaintext_fields: String::new(),
        };
        assert!(owned_elsewhere(&row("service:spark-manager"), "service:spark-manager", false, "save").is_ok());
        assert!(owned_elsewhere(&row(""), "service:compute-manager", false, "save").is_ok(), "claimed");
        assert!(owned_elsewhere(&row("service:spark-manager"), "user:root", true, "delete").is_ok());
        match owned_elsewhere(&row("service:spark-manager"), "service:compute-manager", false, "delete") {
            Err(Error::PermissionDenied(m)) => assert_eq!(
                m,
                "service:compute-manager may not delete workload sales/SPARK_JOB \"job-1\": service:spark-manager \
                 saved it, and only it or a platform admin may change its record"
            ),
            other => panic!("expected PERMISSION_DENIED, got {:?}", other.err()),
        }
    }

    /// Saves that arrive while a transaction is being written go out
    /// together in the next one; a refused save among them fails alone.
    #[tokio::test]
    async fn saves_queued_behind_a_transaction_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display());
        let timeout = std::time::Duration::from_secs(60);
        let db = crate::db::connect(&url, timeout, None).await.unwrap();
        let metrics = secrets_common::observe::Metrics::new();
        let index = UsageIndex::new(Policy::new(db, BTreeSet::new(), timeout, Some(metrics.clone())));
        let save = |id: String, owner: &str| {
            let index = index.clone();
            let request = internal::RecordWorkloadRequest {
                workload: Some(pb::WorkloadRef {
                    domain: "sales".into(),
                    kind: WorkloadKind::SparkJob as i32,
                    id,
                    name: String::new(),
                }),
                references: vec![reference(SourceType::Kubernetes, "sales", "db", "env.DB")],
                saved_by: "user:alice".into(),
                owner: owner.into(),
                override_owner: false,
                plaintext_fields: Vec::new(),
            };
            tokio::spawn(async move { index.record(request).await })
        };
        save("owned".into(), "service:spark").await.unwrap().unwrap();

        // The writer's transaction is held open by a change the test
        // releases; the first save and 49 more queue meanwhile.
        let (release, holder) = index.policy.writer().hold().await;
        let first = save("job-00".into(), "service:spark");
        let mut rest: Vec<_> = (1..49).map(|i| save(format!("job-{i:02}"), "service:spark")).collect();
        rest.push(save("owned".into(), "service:jupyter"));
        while index.policy.writer().queued() < 50 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();

        assert!(!first.await.unwrap().unwrap(), "a new workload");
        let refused = rest.pop().unwrap().await.unwrap();
        assert!(matches!(refused, Err(Error::PermissionDenied(_))), "{refused:?}");
        for r in rest {
            assert!(!r.await.unwrap().unwrap());
        }
        let text = metrics.render();
        let sample = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{series} in {text}"))
        };
        assert_eq!(
            sample(r#"secrets_changes_per_write_count{backend="sqlite"}"#),
            3.0,
            "the first save, the held change, then 50 saves together"
        );
        assert_eq!(sample(r#"secrets_changes_per_write_sum{backend="sqlite"}"#), 52.0);
        let found = index
            .find(&internal::FindUsagesRequest {
                source_type: SourceType::Kubernetes as i32,
                source_id: "sales".into(),
                key: "db".into(),
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(found.total, 50, "every acknowledged save is indexed");
    }
}
