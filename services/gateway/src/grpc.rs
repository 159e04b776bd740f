//! The `Gateway` service's gRPC adapter: authenticates nothing itself (the
//! [`crate::auth`] layer did), names the caller on the span, and hands each
//! RPC to its room: [`Resolution`] (ResolveSecrets, ResolveWorkload with
//! [`crate::payload`]), [`SavedWorkloads`] (SaveWorkload, DeleteWorkload,
//! GetWorkloadReferences, ListSecretUsages) and [`Selector`]
//! (ListSelectableSecrets).

use secrets_common::{deadline, error::invalid_argument, validate::FieldViolation};
use secrets_proto::v1::{self as pb, gateway_server::Gateway};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    audit::{self, Audit, Record},
    auth::{Caller, RpcGroup},
    feed::{self, Feed},
    migration::Migrations,
    payload,
    resolution::Resolution,
    selector::Selector,
    workloads::SavedWorkloads,
};

#[derive(Clone)]
pub struct GatewayService {
    pub resolution: Resolution,
    pub workloads: SavedWorkloads,
    pub migrations: Migrations,
    pub selector: Selector,
    pub feed: Feed,
    pub audit: Audit,
    /// For the audit queries' permission questions.
    pub checks: secrets_common::authz::AuthzClient,
}

/// A resolution as its audit record names it.
struct Resolving<'a> {
    rpc: &'static str,
    caller: &'a Caller,
    domain: &'a str,
    trace_id: String,
}

impl GatewayService {
    /// Records a resolution; in strict mode an answer is given only once
    /// its record is stored (a failed call keeps its own error).
    async fn audited<T>(
        &self,
        call: Resolving<'_>,
        items: &[pb::ResolveItem],
        result: Result<T, Status>,
        answers: impl FnOnce(&T) -> Option<&[pb::ResolvedItem]>,
    ) -> Result<T, Status> {
        let Resolving { rpc, caller, domain, trace_id } = call;
        if !self.audit.is_on() {
            return result;
        }
        let (decision, references, detail) = match &result {
            Ok(answer) => (
                pb::AuditDecision::AuditAllowed,
                audit::resolution_references(domain, items, answers(answer), None),
                String::new(),
            ),
            Err(s) => (
                audit::decision_of(s.code()),
                audit::resolution_references(domain, items, None, Some(s.code())),
                s.message().to_string(),
            ),
        };
        let record = Record {
            rpc,
            caller: caller.own.to_string(),
            principal: caller.principal.to_string(),
            domain: domain.to_string(),
            workload: None,
            references,
            decision,
            trace_id,
            detail,
        };
        let stored = self.audit.record(record).await;
        let answer = result?;
        stored?;
        Ok(answer)
    }
}

/// The authenticated caller, recorded on the current span.
fn traced_caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let caller = Caller::of(request)?;
    let span = tracing::Span::current();
    span.record("caller", caller.name.as_str());
    span.record("principal", tracing::field::display(&caller.principal));
    Ok(caller)
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    #[instrument(
        skip_all,
        fields(rpc = "ResolveSecrets", caller, principal, domain = %request.get_ref().domain,
               items = request.get_ref().items.len() as i64, keys, denied, not_found, invalid, over_limit)
    )]
    async fn resolve_secrets(
        &self,
        request: Request<pb::ResolveSecretsRequest>,
    ) -> Result<Response<pb::ResolveSecretsResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let trace_id = audit::trace_id_of(request.metadata());
        let request = request.into_inner();
        let (domain, items) =
            if self.audit.is_on() { (request.domain.clone(), request.items.clone()) } else { Default::default() };
        let result = self.resolution.resolve("ResolveSecrets", &caller, request, deadline).await;
        let response = self
            .audited(
                Resolving { rpc: "ResolveSecrets", caller: &caller, domain: &domain, trace_id },
                &items,
                result,
                |r| Some(r.items.as_slice()),
            )
            .await?;
        tracing::debug!("resolved");
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "ResolveWorkload", caller, principal, domain = %request.get_ref().domain, keys, denied, not_found, invalid, over_limit))]
    async fn resolve_workload(
        &self,
        request: Request<pb::ResolveWorkloadRequest>,
    ) -> Result<Response<pb::ResolveWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let trace_id = audit::trace_id_of(request.metadata());
        let request = request.into_inner();
        let domain = request.domain;
        let prepared = request
            .payload
            .ok_or_else(|| invalid_argument(FieldViolation::new("payload", "is required: the workload's payload")))
            .and_then(|payload| payload::items(&payload).map(|items| (payload, items)));
        let (payload, items) = match prepared {
            Ok(p) => p,
            Err(s) => {
                // Always the error itself (recorded first).
                let call = Resolving { rpc: "ResolveWorkload", caller: &caller, domain: &domain, trace_id };
                let failed = self.audited(call, &[], Err(s), |_: &()| None);
                return failed.await.map(|()| Response::new(pb::ResolveWorkloadResponse::default()));
            }
        };
        let kept = if self.audit.is_on() { items.clone() } else { Vec::new() };
        let request = pb::ResolveSecretsRequest { domain: domain.clone(), items };
        let result = self.resolution.resolve("ResolveWorkload", &caller, request, deadline).await;
        let resolved = self
            .audited(
                Resolving { rpc: "ResolveWorkload", caller: &caller, domain: &domain, trace_id },
                &kept,
                result,
                |r| Some(r.items.as_slice()),
            )
            .await?;
        tracing::debug!("resolved");
        Ok(Response::new(payload::fill(payload, resolved.items)))
    }

    #[instrument(skip_all, fields(rpc = "SaveWorkload", caller, principal, domain = %request.get_ref().domain,
                                  id = %request.get_ref().id, validate_only = request.get_ref().validate_only,
                                  references, problems))]
    async fn save_workload(
        &self,
        request: Request<pb::SaveWorkloadRequest>,
    ) -> Result<Response<pb::SaveWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let trace_id = audit::trace_id_of(request.metadata());
        let request = request.into_inner();
        let workload = pb::WorkloadRef {
            domain: request.domain.clone(),
            kind: request.payload.as_ref().map_or(pb::WorkloadKind::Unspecified, pb::WorkloadPayload::workload_kind)
                as i32,
            id: request.id.clone(),
            name: String::new(),
        };
        let validate_only = request.validate_only;
        let result = self.workloads.save(&caller, request, deadline).await;
        if !self.audit.is_on() {
            return Ok(Response::new(result?));
        }
        let (decision, references, detail) = match &result {
            Ok(saved) => {
                let problem = |field: &str| saved.problems.iter().find(|p| p.field == field);
                let references = saved
                    .references
                    .iter()
                    .map(|r| {
                        let object = r.secret_object.clone().unwrap_or_default();
                        let decision = problem(&r.field).map_or(pb::AuditDecision::AuditAllowed, |p| {
                            audit::problem_decision(pb::ProblemType::try_from(p.r#type).unwrap_or_default())
                        });
                        pb::AuditReference {
                            source: object.source,
                            key: object.key,
                            version: String::new(),
                            decision: decision as i32,
                            item: r.field.clone(),
                        }
                    })
                    .collect();
                let decision = saved.problems.first().map_or(pb::AuditDecision::AuditAllowed, |p| {
                    audit::problem_decision(pb::ProblemType::try_from(p.r#type).unwrap_or_default())
                });
                let detail = match (saved.saved, validate_only) {
                    (true, _) => "saved".to_string(),
                    (false, true) => "validated only".to_string(),
                    (false, false) => format!("not saved: {} problems", saved.problems.len()),
                };
                (decision, references, detail)
            }
            Err(s) => (audit::decision_of(s.code()), Vec::new(), s.message().to_string()),
        };
        let record = Record {
            rpc: "SaveWorkload",
            caller: caller.own.to_string(),
            principal: caller.principal.to_string(),
            domain: workload.domain.clone(),
            workload: Some(workload),
            references,
            decision,
            trace_id,
            detail,
        };
        let stored = self.audit.record(record).await;
        let saved = result?;
        stored?;
        Ok(Response::new(saved))
    }

    #[instrument(skip_all, fields(rpc = "DeleteWorkload", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn delete_workload(
        &self,
        request: Request<pb::DeleteWorkloadRequest>,
    ) -> Result<Response<pb::DeleteWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.delete(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "GetWorkloadReferences", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn get_workload_references(
        &self,
        request: Request<pb::GetWorkloadReferencesRequest>,
    ) -> Result<Response<pb::GetWorkloadReferencesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.references(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListSecretUsages", caller, principal))]
    async fn list_secret_usages(
        &self,
        request: Request<pb::ListSecretUsagesRequest>,
    ) -> Result<Response<pb::ListSecretUsagesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.secret_usages(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "QueryAuditRecords", caller, principal, domain = %request.get_ref().domain, count))]
    async fn query_audit_records(
        &self,
        request: Request<pb::QueryAuditRecordsRequest>,
    ) -> Result<Response<pb::QueryAuditRecordsResponse>, Status> {
        let caller = traced_caller(&request)?;
        let answer = audit::trail::query(&self.audit, &self.checks, &caller, request.into_inner()).await?;
        tracing::Span::current().record("count", answer.records.len() as i64);
        Ok(Response::new(answer))
    }

    #[instrument(skip_all, fields(rpc = "ListSecretLastAccess", caller, principal, domain = %request.get_ref().domain))]
    async fn list_secret_last_access(
        &self,
        request: Request<pb::ListSecretLastAccessRequest>,
    ) -> Result<Response<pb::ListSecretLastAccessResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(audit::trail::last_access(&self.audit, &self.checks, &caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "PlanWorkloadMigration", caller, principal, domain = %request.get_ref().domain,
                                  id = %request.get_ref().id, changes, problems))]
    async fn plan_workload_migration(
        &self,
        request: Request<pb::PlanWorkloadMigrationRequest>,
    ) -> Result<Response<pb::PlanWorkloadMigrationResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let plan = self.migrations.plan(&caller, request.into_inner(), deadline).await?;
        let span = tracing::Span::current();
        span.record("changes", plan.changes.len() as i64);
        span.record("problems", plan.problems.len() as i64);
        Ok(Response::new(plan))
    }

    #[instrument(skip_all, fields(rpc = "ApplyWorkloadMigration", caller, principal, domain = %request.get_ref().domain,
                                  id = %request.get_ref().id, changes, created))]
    async fn apply_workload_migration(
        &self,
        request: Request<pb::ApplyWorkloadMigrationRequest>,
    ) -> Result<Response<pb::ApplyWorkloadMigrationResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let trace_id = audit::trace_id_of(request.metadata());
        let request = request.into_inner();
        let workload = pb::WorkloadRef {
            domain: request.domain.clone(),
            kind: request.payload.as_ref().map_or(pb::WorkloadKind::Unspecified, pb::WorkloadPayload::workload_kind)
                as i32,
            id: request.id.clone(),
            name: String::new(),
        };
        let applied = self.migrations.apply(&caller, request, deadline).await;
        if let Ok(a) = &applied {
            let span = tracing::Span::current();
            span.record("changes", a.changes.len() as i64);
            span.record("created", a.created_secrets.len() as i64);
        }
        if !self.audit.is_on() {
            return Ok(Response::new(applied?));
        }
        let (decision, references, detail) = match &applied {
            Ok(a) => {
                let references = a
                    .changes
                    .iter()
                    .filter_map(|c| {
                        let object = c.secret_object.clone()?;
                        Some(pb::AuditReference {
                            source: object.source,
                            key: object.key,
                            version: String::new(),
                            decision: pb::AuditDecision::AuditAllowed as i32,
                            item: c.field.clone(),
                        })
                    })
                    .collect();
                let detail = match a.applied {
                    true => format!(
                        "migrated: {} change(s), {} secret(s) created, usage index {}",
                        a.changes.len(),
                        a.created_secrets.len(),
                        if a.index_updated { "updated" } else { "not holding it" }
                    ),
                    false => format!("not migrated: {} problem(s)", a.problems.len()),
                };
                let decision =
                    if a.applied { pb::AuditDecision::AuditAllowed } else { pb::AuditDecision::AuditInvalid };
                (decision, references, detail)
            }
            Err(s) => (audit::decision_of(s.code()), Vec::new(), s.message().to_string()),
        };
        let record = Record {
            rpc: "ApplyWorkloadMigration",
            caller: caller.own.to_string(),
            principal: caller.principal.to_string(),
            domain: workload.domain.clone(),
            workload: Some(workload),
            references,
            decision,
            trace_id,
            detail,
        };
        let stored = self.audit.record(record).await;
        let applied = applied?;
        stored?;
        Ok(Response::new(applied))
    }

    #[instrument(skip_all, fields(rpc = "ListLegacyReferences", caller, principal, domain = %request.get_ref().domain, total))]
    async fn list_legacy_references(
        &self,
        request: Request<pb::ListLegacyReferencesRequest>,
    ) -> Result<Response<pb::ListLegacyReferencesResponse>, Status> {
        let caller = traced_caller(&request)?;
        let answer = self.migrations.legacy(&caller, request.into_inner()).await?;
        tracing::Span::current().record("total", answer.total as i64);
        Ok(Response::new(answer))
    }

    type WatchSecretChangesStream = feed::Answers;

    #[instrument(skip_all, fields(rpc = "WatchSecretChanges", caller, principal, domain = %request.get_ref().domain,
                                  after = request.get_ref().after_revision))]
    async fn watch_secret_changes(
        &self,
        request: Request<pb::WatchSecretChangesRequest>,
    ) -> Result<Response<Self::WatchSecretChangesStream>, Status> {
        let caller = traced_caller(&request)?;
        let answers = self.feed.watch(&caller, request.into_inner()).await?;
        tracing::info!("watching secret changes");
        Ok(Response::new(answers))
    }

    #[instrument(skip_all, fields(rpc = "ListSelectableSecrets", caller, principal, domain = %request.get_ref().domain, count))]
    async fn list_selectable_secrets(
        &self,
        request: Request<pb::ListSelectableSecretsRequest>,
    ) -> Result<Response<pb::ListSelectableSecretsResponse>, Status> {
        let caller = traced_caller(&request)?;
        caller.require(RpcGroup::Workloads, "ListSelectableSecrets")?;
        Ok(Response::new(self.selector.select(&caller, &request.get_ref().domain).await?))
    }
}
