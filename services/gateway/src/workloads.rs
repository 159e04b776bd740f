//! Saved workloads and the usage index: `SaveWorkload` checks every
//! reference of a payload (without reading a value) and records the
//! workload's references in the index the authz-service keeps;
//! `DeleteWorkload`, `GetWorkloadReferences` and `ListSecretUsages` read and
//! change it. Delete protection itself is in the services that delete.

use secrets_common::{
    auth::InternalChannel,
    authz::{AuthzClient, Question},
    error::invalid_argument,
    usage::describe,
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::{self as internal, secret_reader_client::SecretReaderClient},
    v1::{self as pb, Permission, list_secret_usages_request::Secret},
};
use tonic::{Code, Status};

use crate::{
    auth::{Caller, RpcGroup, TokenKind},
    forward::SECRET_SERVICE,
    payload,
    resolution::{self, Resolution, limits::MAX_ITEMS},
};

/// Saved workloads: checks a payload's references with [`Resolution`]
/// (presence only) and keeps the usage index through the authz service.
#[derive(Clone)]
pub struct SavedWorkloads {
    pub resolution: Resolution,
    /// The usage index.
    pub usage: secrets_common::usage::UsageClient,
    pub authz: AuthzClient,
    /// Which domains hold a key of their own, for the users of a global key.
    pub secrets: SecretReaderClient<InternalChannel>,
}

/// Workloads `ListSecretUsages` returns unless asked otherwise.
pub const DEFAULT_USAGES: u32 = 100;
/// Workloads one `ListSecretUsages` returns at most.
pub const MAX_USAGES: u32 = 1_000;

/// The type of a reference's problem, from the error resolving it would give.
fn problem_type(status: &tonic_types::pb::Status) -> pb::ProblemType {
    match Code::from_i32(status.code) {
        Code::NotFound => pb::ProblemType::ProblemNotFound,
        Code::PermissionDenied => pb::ProblemType::ProblemPermissionDenied,
        Code::InvalidArgument => pb::ProblemType::ProblemMalformed,
        Code::FailedPrecondition if is_feature_disabled(status) => pb::ProblemType::ProblemFeatureDisabled,
        // Unavailable, timed out, or a Vault that refuses the credentials or
        // is not KV v2: the backend, not the reference.
        _ => pb::ProblemType::ProblemBackendUnavailable,
    }
}

/// Whether the error is the secretsV2 flag's refusal.
fn is_feature_disabled(status: &tonic_types::pb::Status) -> bool {
    use prost::Message;
    status.details.iter().any(|any| {
        any.type_url.ends_with("google.rpc.PreconditionFailure")
            && tonic_types::pb::PreconditionFailure::decode(any.value.as_slice())
                .is_ok_and(|p| p.violations.iter().any(|v| v.r#type == "FEATURE_DISABLED"))
    })
}

fn public_reference(r: internal::IndexedReference) -> pb::WorkloadReference {
    pb::WorkloadReference {
        field: r.field,
        secret_object: Some(pb::SecretObject {
            key: r.key,
            source: Some(pb::SecretSource { r#type: r.source_type, id: r.source_id }),
        }),
        placeholder: r.placeholder,
    }
}

fn workload_kind(field: &str, kind: i32) -> Result<(), Status> {
    match pb::WorkloadKind::try_from(kind) {
        Ok(pb::WorkloadKind::Unspecified) | Err(_) => Err(invalid_argument(FieldViolation::new(
            field,
            "is required: WORKLOAD_KIND_COMPUTE, WORKLOAD_KIND_SPARK_JOB, WORKLOAD_KIND_STREAMING_JOB, \
             WORKLOAD_KIND_SDK_SPARK_JOB, WORKLOAD_KIND_JUPYTER_CONTAINER, WORKLOAD_KIND_STORAGE_CONFIG, \
             WORKLOAD_KIND_EMAIL_SETTINGS or WORKLOAD_KIND_LDAP_INTEGRATION",
        ))),
        Ok(_) => Ok(()),
    }
}

impl SavedWorkloads {
    /// Ok when the caller's principal may do `question`, in one round trip
    /// with the check that a delegating token does not act for an admin.
    async fn require(&self, caller: &Caller, question: Question<'_>, action: &str) -> Result<(), Status> {
        let mut answers = caller.decide(&self.authz, vec![question.with_groups(&caller.member_of)]).await?;
        let answer = answers.remove(0);
        if answer.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{} may not {action}: {}", caller.principal, answer.reason)))
        }
    }

    /// USE_SECRETS in `domain`: what deleting a workload there, or reading
    /// its references, needs (a save asks it along with its references).
    async fn require_workloads_of(&self, caller: &Caller, domain: &str, action: &str) -> Result<(), Status> {
        validate::domain("domain", domain).map_err(invalid_argument)?;
        let question = Question::domain(&caller.principal, Permission::UseSecrets, Some(domain));
        self.require(caller, question, &format!("{action} in domain {domain:?}")).await
    }

    /// Whether the caller may record or delete saved workloads: platform
    /// services (the component that owns the workload) may; a user only
    /// as a platform admin. True when the caller is known to be an admin.
    pub async fn may_record(&self, caller: &Caller, action: &str) -> Result<bool, Status> {
        if caller.kind == TokenKind::Service {
            return Ok(false);
        }
        let question = Question::domain(&caller.principal, Permission::PlatformAdmin, None);
        self.require(
            caller,
            question,
            &format!(
                "{action}: the usage index is kept by the platform services that own workloads (and platform admins); \
                 users may only validate (validate_only)"
            ),
        )
        .await?;
        Ok(true)
    }

    /// Whether the acting principal is a platform admin, who may change a
    /// workload's record another identity owns.
    pub async fn is_admin(&self, caller: &Caller) -> Result<bool, Status> {
        let question = Question::domain(&caller.principal, Permission::PlatformAdmin, None);
        match self.require(caller, question, "act as a platform admin").await {
            Ok(()) => Ok(true),
            Err(s) if s.code() == Code::PermissionDenied => Ok(false),
            Err(s) => Err(s),
        }
    }

    /// Runs a change of the usage index as the caller's identity; when
    /// another identity owns the workload, again as a platform admin if
    /// the principal is one.
    async fn as_owner<T, F, Fut>(&self, caller: &Caller, admin: bool, change: F) -> Result<T, Status>
    where
        F: Fn(bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        match change(admin).await {
            Err(s) if s.code() == Code::PermissionDenied && !admin && self.is_admin(caller).await? => {
                change(true).await
            }
            other => other,
        }
    }

    pub async fn save(
        &self,
        caller: &Caller,
        request: pb::SaveWorkloadRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<pb::SaveWorkloadResponse, Status> {
        caller.require(RpcGroup::Workloads, "SaveWorkload")?;
        validate::domain("domain", &request.domain).map_err(invalid_argument)?;
        validate::workload_id("id", &request.id).map_err(invalid_argument)?;
        validate::workload_name("name", &request.name).map_err(invalid_argument)?;
        let admin = if request.validate_only { false } else { self.may_record(caller, "save workloads").await? };
        let payload = request
            .payload
            .ok_or_else(|| invalid_argument(FieldViolation::new("payload", "is required: the workload's payload")))?;
        let items = payload::items(&payload)?;
        if items.len() > MAX_ITEMS {
            return Err(invalid_argument(FieldViolation::new(
                "payload",
                format!("has {} references; at most {} per workload", items.len(), MAX_ITEMS),
            )));
        }
        let references = resolution::references(&request.domain, &items);
        // One authz round trip: USE_SECRETS in the domain and every reference.
        let request_items = pb::ResolveSecretsRequest { domain: request.domain.clone(), items };
        let checked = self.resolution.check(caller, request_items, "save workloads", deadline).await?;
        let problems: Vec<pb::ReferenceProblem> = checked
            .items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| match item.result {
                Some(pb::resolved_item::Result::Error(e)) => {
                    let e = payload::field_status(i, &item.id, e);
                    Some(pb::ReferenceProblem { r#type: problem_type(&e) as i32, message: e.message, field: item.id })
                }
                _ => None,
            })
            .collect();
        let saved = problems.is_empty() && !request.validate_only;
        let span = tracing::Span::current();
        span.record("problems", problems.len() as i64);
        span.record("references", references.len() as i64);
        if saved {
            let workload = pb::WorkloadRef {
                domain: request.domain,
                kind: payload.workload_kind() as i32,
                id: request.id,
                name: request.name,
            };
            let described = describe(&workload);
            let plaintext = crate::migration::plaintext_fields(&payload);
            let record = |override_owner| {
                self.usage.record(internal::RecordWorkloadRequest {
                    workload: Some(workload.clone()),
                    references: references.clone(),
                    saved_by: caller.principal.to_string(),
                    owner: caller.own.to_string(),
                    override_owner,
                    plaintext_fields: plaintext.clone(),
                })
            };
            self.as_owner(caller, admin, record).await?;
            tracing::info!(workload = %described, owner = %caller.own, "workload saved");
        }
        Ok(pb::SaveWorkloadResponse {
            saved,
            problems,
            references: references.into_iter().map(public_reference).collect(),
        })
    }

    pub async fn delete(
        &self,
        caller: &Caller,
        request: pb::DeleteWorkloadRequest,
    ) -> Result<pb::DeleteWorkloadResponse, Status> {
        caller.require(RpcGroup::Workloads, "DeleteWorkload")?;
        workload_kind("kind", request.kind)?;
        validate::workload_id("id", &request.id).map_err(invalid_argument)?;
        self.require_workloads_of(caller, &request.domain, "delete workloads").await?;
        let admin = self.may_record(caller, "delete workloads").await?;
        let forget = |override_owner| {
            self.usage.forget(internal::ForgetWorkloadRequest {
                domain: request.domain.clone(),
                kind: request.kind,
                id: request.id.clone(),
                owner: caller.own.to_string(),
                override_owner,
            })
        };
        let removed = self.as_owner(caller, admin, forget).await?;
        Ok(pb::DeleteWorkloadResponse { removed })
    }

    pub async fn references(
        &self,
        caller: &Caller,
        request: pb::GetWorkloadReferencesRequest,
    ) -> Result<pb::GetWorkloadReferencesResponse, Status> {
        caller.require(RpcGroup::Workloads, "GetWorkloadReferences")?;
        workload_kind("kind", request.kind)?;
        validate::workload_id("id", &request.id).map_err(invalid_argument)?;
        self.require_workloads_of(caller, &request.domain, "read workloads").await?;
        let wanted = pb::WorkloadRef {
            domain: request.domain.clone(),
            kind: request.kind,
            id: request.id.clone(),
            name: String::new(),
        };
        let found = self
            .usage
            .get(internal::GetWorkloadRequest { domain: request.domain, kind: request.kind, id: request.id })
            .await?;
        if !found.found {
            return Err(Status::not_found(format!(
                "workload {} is not in the usage index: it was never saved with SaveWorkload, or it was deleted",
                describe(&wanted)
            )));
        }
        Ok(pb::GetWorkloadReferencesResponse {
            workload: found.workload,
            references: found.references.into_iter().map(public_reference).collect(),
            saved_by: found.saved_by,
            owner: found.owner,
        })
    }

    pub async fn secret_usages(
        &self,
        caller: &Caller,
        request: pb::ListSecretUsagesRequest,
    ) -> Result<pb::ListSecretUsagesResponse, Status> {
        caller.require(RpcGroup::Workloads, "ListSecretUsages")?;
        let limit = match request.limit {
            0 => DEFAULT_USAGES,
            n if n > MAX_USAGES => {
                return Err(invalid_argument(FieldViolation::new("limit", format!("is at most {MAX_USAGES}"))));
            }
            n => n,
        };
        let principal = &caller.principal;
        let query = |source_type: pb::SourceType, source_id: &str, key: &str| internal::FindUsagesRequest {
            source_type: source_type as i32,
            source_id: source_id.to_string(),
            key: key.to_string(),
            source_ids: Vec::new(),
            limit,
        };
        let found = match request.secret {
            None => {
                return Err(invalid_argument(FieldViolation::new(
                    "secret",
                    "is required: storeSecret {scope, domain, key} or vaultSecret {configId, key}",
                )));
            }
            Some(Secret::StoreSecret(s)) => {
                validate::secret_key("store_secret.key", &s.key).map_err(invalid_argument)?;
                match pb::Scope::try_from(s.scope) {
                    Ok(pb::Scope::Domain) => {
                        validate::domain("store_secret.domain", &s.domain).map_err(invalid_argument)?;
                        let question = Question::domain(principal, Permission::ListSecrets, Some(&s.domain));
                        self.require(caller, question, &format!("list the secrets of domain {:?}", s.domain)).await?;
                        self.usage.find(query(pb::SourceType::Kubernetes, &s.domain, &s.key)).await?
                    }
                    Ok(pb::Scope::Global) => {
                        if request.domain.is_empty() {
                            let question = Question::domain(principal, Permission::PlatformAdmin, None);
                            self.require(
                                caller,
                                question,
                                "see every domain's use of a global secret (set domain to see one domain's)",
                            )
                            .await?;
                        } else {
                            validate::domain("domain", &request.domain).map_err(invalid_argument)?;
                            let question = Question::domain(principal, Permission::ListSecrets, Some(&request.domain));
                            self.require(caller, question, &format!("list the secrets of domain {:?}", request.domain))
                                .await?;
                        }
                        self.global_usages(&s.key, &request.domain, limit).await?
                    }
                    _ => {
                        return Err(invalid_argument(FieldViolation::new(
                            "store_secret.scope",
                            "must be SCOPE_DOMAIN or SCOPE_GLOBAL: workloads reference no admin secret",
                        )));
                    }
                }
            }
            Some(Secret::VaultSecret(v)) => {
                validate::vault_config_id("vault_secret.config_id", &v.config_id).map_err(invalid_argument)?;
                if !v.key.is_empty() {
                    validate::secret_key("vault_secret.key", &v.key).map_err(invalid_argument)?;
                }
                let question = Question::vault_config(principal, Permission::View, &v.config_id);
                self.require(caller, question, &format!("view vault config {}", v.config_id)).await?;
                self.usage.find(query(pb::SourceType::Vault, &v.config_id, &v.key)).await?
            }
        };
        Ok(pb::ListSecretUsagesResponse {
            usages: found
                .usages
                .into_iter()
                .map(|u| pb::SecretUsage {
                    workload: u.workload,
                    references: u.references.into_iter().map(public_reference).collect(),
                })
                .collect(),
            total: found.total,
        })
    }

    /// The workloads that use global `key`: those that look it up in a
    /// domain without a key of that name (only `domain`, when set).
    async fn global_usages(&self, key: &str, domain: &str, limit: u32) -> Result<internal::FindUsagesResponse, Status> {
        let query = |source_ids: Vec<String>, limit: u32| internal::FindUsagesRequest {
            source_type: pb::SourceType::Kubernetes as i32,
            source_id: domain.to_string(),
            key: key.to_string(),
            source_ids,
            limit,
        };
        let candidates = self.usage.find(query(Vec::new(), 0)).await?.source_ids;
        if candidates.is_empty() {
            return Ok(internal::FindUsagesResponse::default());
        }
        let lookups = candidates
            .iter()
            .map(|d| internal::SecretLookup {
                scope: pb::Scope::Domain as i32,
                domain: d.clone(),
                key: key.to_string(),
                global_fallback: false,
            })
            .collect();
        let own = self
            .secrets
            .clone()
            .read_secrets(internal::ReadSecretsRequest { lookups, max_value_bytes: 0, presence_only: true })
            .await
            .map_err(|s| secrets_common::error::from_upstream(SECRET_SERVICE, s))?
            .into_inner()
            .results;
        let falling_back: Vec<String> =
            candidates.into_iter().zip(own).filter(|(_, r)| !r.found).map(|(d, _)| d).collect();
        if falling_back.is_empty() {
            return Ok(internal::FindUsagesResponse::default());
        }
        self.usage.find(query(falling_back, limit)).await
    }
}
