//! The audit queries: who may see which records, the filters checked, and
//! the page token.

use secrets_common::{
    authz::{AuthzClient, Question},
    error::invalid_argument,
    validate::{self, FieldViolation},
};
use secrets_proto::v1::{self as pb, Permission};
use tonic::Status;

use super::{Audit, Query};
use crate::auth::{Caller, RpcGroup};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1_000;

/// Platform admins see every record; a domain's owners (MANAGE_DOMAIN_ACCESS
/// there) set `domain` and see its records.
async fn authorize(checks: &AuthzClient, caller: &Caller, domain: &str, what: &str) -> Result<(), Status> {
    caller.require(RpcGroup::Workloads, what)?;
    let principal = &caller.principal;
    let (question, action) = if domain.is_empty() {
        (
            Question::domain(principal, Permission::PlatformAdmin, None),
            "query every domain's audit records (set domain to query one domain's, as its owner)".to_string(),
        )
    } else {
        validate::domain("domain", domain).map_err(invalid_argument)?;
        (
            Question::domain(principal, Permission::ManageDomainAccess, Some(domain)),
            format!("query the audit records of domain {domain:?}: its owners and platform admins may"),
        )
    };
    let answer = caller.decide(checks, vec![question.with_groups(&caller.member_of)]).await?.remove(0);
    if answer.allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("{principal} may not {action}: {}", answer.reason)))
    }
}

fn millis(field: &str, t: &Option<prost_types::Timestamp>) -> Result<Option<i64>, Status> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid_argument(FieldViolation::new(field, "nanos must be 0 to 999,999,999")));
    }
    t.seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
        .map(Some)
        .ok_or_else(|| invalid_argument(FieldViolation::new(field, "is out of range")))
}

fn page_token(after: &(i64, i64, String)) -> String {
    format!("{}.{}.{}", after.0, after.1, after.2)
}

fn parse_token(token: &str) -> Result<(i64, i64, String), Status> {
    let bad = || {
        invalid_argument(FieldViolation::new(
            "page_token",
            "is not a page token this service gave; send the next_page_token of the previous answer",
        ))
    };
    let mut parts = token.splitn(3, '.');
    let at = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let sequence = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let gateway = parts.next().filter(|g| !g.is_empty() && g.len() <= 128).ok_or_else(bad)?;
    Ok((at, sequence, gateway.to_string()))
}

fn store_unavailable(audit: &Audit, e: sea_orm::DbErr) -> Status {
    let backend = audit.inner.as_ref().map_or("database", |i| i.backend);
    tracing::error!(error = %e, "an audit query failed");
    Status::unavailable(format!("audit store ({backend}) did not answer the query; try again"))
}

pub async fn query(
    audit: &Audit,
    checks: &AuthzClient,
    caller: &Caller,
    r: pb::QueryAuditRecordsRequest,
) -> Result<pb::QueryAuditRecordsResponse, Status> {
    authorize(checks, caller, &r.domain, "QueryAuditRecords").await?;
    let Some(db) = audit.db() else {
        return Err(Status::failed_precondition("the audit trail is off (audit.mode = \"off\"): nothing is recorded"));
    };
    let limit = match r.page_size {
        0 => DEFAULT_PAGE,
        n if n > MAX_PAGE => {
            return Err(invalid_argument(FieldViolation::new("page_size", format!("is at most {MAX_PAGE}"))));
        }
        n => n,
    };
    let source = match &r.source {
        None => None,
        Some(s) => {
            let kind = super::source_type_name(s.r#type);
            if kind.is_empty() {
                return Err(invalid_argument(FieldViolation::new("source.type", "must be KUBERNETES or VAULT")));
            }
            Some((kind.to_string(), s.id.clone()))
        }
    };
    if !r.key.is_empty() {
        validate::secret_key("key", &r.key).map_err(invalid_argument)?;
        if source.is_none() {
            return Err(invalid_argument(FieldViolation::new("source", "is required with key: the secret's source")));
        }
    }
    let workload = match &r.workload {
        None => None,
        Some(w) => {
            validate::domain("workload.domain", &w.domain).map_err(invalid_argument)?;
            validate::workload_id("workload.id", &w.id).map_err(invalid_argument)?;
            let kind = pb::WorkloadKind::try_from(w.kind).unwrap_or_default();
            if kind == pb::WorkloadKind::Unspecified {
                return Err(invalid_argument(FieldViolation::new("workload.kind", "is required")));
            }
            if !r.domain.is_empty() && w.domain != r.domain {
                return Err(invalid_argument(FieldViolation::new("workload.domain", "must be the queried domain")));
            }
            Some((w.domain.clone(), kind.as_str_name().to_string(), w.id.clone()))
        }
    };
    let decision = match pb::AuditDecision::try_from(r.decision) {
        Ok(pb::AuditDecision::Unspecified) => None,
        Ok(d) => Some(super::decision_name(d as i32).to_string()),
        Err(_) => return Err(invalid_argument(FieldViolation::new("decision", "is not an audit decision"))),
    };
    let q = Query {
        domain: (!r.domain.is_empty()).then(|| r.domain.clone()),
        from_ms: millis("from", &r.from)?,
        to_ms: millis("to", &r.to)?,
        principal: (!r.principal.is_empty()).then(|| r.principal.clone()),
        caller: (!r.caller.is_empty()).then(|| r.caller.clone()),
        source,
        key: (!r.key.is_empty()).then(|| r.key.clone()),
        workload,
        decision,
        rpcs: r.rpcs.clone(),
        limit: u64::from(limit),
        after: match r.page_token.as_str() {
            "" => None,
            t => Some(parse_token(t)?),
        },
    };
    let page = super::query(db, &q).await.map_err(|e| store_unavailable(audit, e))?;
    Ok(pb::QueryAuditRecordsResponse {
        records: page.records,
        next_page_token: page.next.as_ref().map(page_token).unwrap_or_default(),
    })
}

pub async fn last_access(
    audit: &Audit,
    checks: &AuthzClient,
    caller: &Caller,
    r: pb::ListSecretLastAccessRequest,
) -> Result<pb::ListSecretLastAccessResponse, Status> {
    authorize(checks, caller, &r.domain, "ListSecretLastAccess").await?;
    let Some(db) = audit.db() else {
        return Err(Status::failed_precondition("the audit trail is off (audit.mode = \"off\"): nothing is recorded"));
    };
    let domain = (!r.domain.is_empty()).then_some(r.domain.as_str());
    let secrets = super::last_access(db, domain).await.map_err(|e| store_unavailable(audit, e))?;
    Ok(pb::ListSecretLastAccessResponse { secrets })
}
