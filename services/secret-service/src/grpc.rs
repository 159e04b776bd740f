//! The tonic adapter: decode, authorize, call the store, map errors.

use prost_types::Timestamp;
use secrets_common::{
    SecretValue,
    auth::{Acting, InternalCall},
    authz::{AuthzClient, Question},
    error::invalid_argument,
    usage::UsageClient,
    validate::FieldViolation,
};
use secrets_proto::{
    internal::v1::{self as internal, secret_reader_server::SecretReader},
    v1::{self as pb, Permission, secret_service_server::SecretService},
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::store::{Lookup, Scope, SecretInfo, SecretStore};

#[derive(Clone)]
pub struct SecretGrpc {
    store: SecretStore,
    authz: AuthzClient,
    usage: UsageClient,
}

impl SecretGrpc {
    pub fn new(store: SecretStore, authz: AuthzClient, usage: UsageClient) -> Self {
        Self { store, authz, usage }
    }

    /// Delete protection: the saved workloads that would break if `key` of
    /// `scope` went, refused unless `force` (see [`UsageClient::guard_delete`]).
    /// A global key breaks the workloads that look it up in a domain without
    /// a key of that name (they fall back to the global one).
    async fn guard_delete(&self, scope: &Scope, key: &str, force: bool) -> Result<Option<pb::BrokenWorkloads>, Status> {
        let lookup = |scope: Scope| Lookup { scope, key: key.to_string(), global_fallback: false };
        if self.store.read_values(&[lookup(scope.clone())]).await?[0].is_none() {
            // Nothing to protect: the delete reports NOT_FOUND.
            return Ok(None);
        }
        let query = |source_id: &str, source_ids: Vec<String>| internal::FindUsagesRequest {
            source_type: pb::SourceType::Kubernetes as i32,
            source_id: source_id.to_string(),
            key: key.to_string(),
            source_ids,
            limit: 0,
        };
        match scope {
            Scope::Admin => Ok(None),
            Scope::Domain(d) => {
                let what = format!("secret {key:?} of domain {d:?}");
                self.usage.guard_delete(&what, query(d, Vec::new()), force).await
            }
            Scope::Global => {
                let what = format!("global secret {key:?}");
                let candidates = self.usage.find_before_delete(&what, query("", Vec::new())).await?.source_ids;
                let lookups = candidates
                    .iter()
                    .filter_map(|d| Scope::domain("source_id", d).ok().map(lookup))
                    .collect::<Vec<_>>();
                let own = self.store.read_values(&lookups).await?;
                let falling_back: Vec<String> = lookups
                    .into_iter()
                    .zip(own)
                    .filter(|(_, found)| found.is_none())
                    .filter_map(|(l, _)| match l.scope {
                        Scope::Domain(d) => Some(d),
                        _ => None,
                    })
                    .collect();
                if falling_back.is_empty() {
                    return Ok(None);
                }
                self.usage.guard_delete(&what, query("", falling_back), force).await
            }
        }
    }

    async fn authorize(
        &self,
        principal: &Acting,
        scope: &Scope,
        op: Op,
        view_domain: Option<&str>,
    ) -> Result<(), Status> {
        let (permission, domain) = match (scope, op) {
            (Scope::Domain(d), Op::List) => (Permission::ListSecrets, Some(d.as_str())),
            (Scope::Domain(d), Op::Write) => (Permission::ManageSecrets, Some(d.as_str())),
            (Scope::Global, Op::List) if view_domain.is_some() => (Permission::ListSecrets, view_domain),
            (Scope::Global | Scope::Admin, _) => (Permission::PlatformAdmin, None),
        };
        let action = match op {
            Op::List => format!("list {scope}"),
            Op::Write => format!("change {scope}"),
        };
        self.authz
            .require(Question::domain(principal, permission, domain).with_groups(&principal.groups), &action)
            .await
    }
}

/// A create or update request, whichever message it came in.
struct Write {
    scope: i32,
    domain: String,
    key: String,
    value: Option<pb::SecretValue>,
}

#[derive(Clone, Copy)]
enum Mode {
    Create,
    Update,
}

#[derive(Clone, Copy)]
enum Op {
    List,
    Write,
}

impl SecretGrpc {
    async fn put(&self, call: &InternalCall, w: Write, mode: Mode) -> Result<Response<pb::SecretMetadata>, Status> {
        let principal = &call.require_acting()?;
        record(&principal.to_string(), &w.domain, &w.key, w.scope);
        let scope = scope_of(w.scope, &w.domain, false)?;
        let value = value_of(w.value)?;
        self.authorize(principal, &scope, Op::Write, None).await?;
        let info = match mode {
            Mode::Create => self.store.create(&scope, &w.key, value).await?,
            Mode::Update => self.store.update(&scope, &w.key, value).await?,
        };
        let verb = match mode {
            Mode::Create => "secret created",
            Mode::Update => "secret updated",
        };
        tracing::info!(%scope, key = %info.key, %principal, "{verb}");
        Ok(Response::new(metadata(info, &w.domain)))
    }
}

/// The scope a request names; `domain` must be set exactly for domain scopes
/// (and may be set to view global secrets from a domain).
fn scope_of(scope: i32, domain: &str, allow_domain_view: bool) -> Result<Scope, Status> {
    let field = |why: String| invalid_argument(FieldViolation::new("scope", why));
    match pb::Scope::try_from(scope) {
        Ok(pb::Scope::Unspecified) => {
            Err(field("is required: set SCOPE_DOMAIN (with domain), SCOPE_GLOBAL or SCOPE_ADMIN".into()))
        }
        Err(_) => Err(field(format!("unknown value {scope}; use SCOPE_DOMAIN, SCOPE_GLOBAL or SCOPE_ADMIN"))),
        Ok(pb::Scope::Domain) => Ok(Scope::domain("domain", domain)?),
        Ok(pb::Scope::Global) if allow_domain_view => Ok(Scope::Global),
        Ok(s @ (pb::Scope::Global | pb::Scope::Admin)) if !domain.is_empty() => {
            Err(invalid_argument(FieldViolation::new(
                "domain",
                format!("must be empty for {}: those secrets belong to no domain", s.as_str_name()),
            )))
        }
        Ok(pb::Scope::Global) => Ok(Scope::Global),
        Ok(pb::Scope::Admin) => Ok(Scope::Admin),
    }
}

fn value_of(value: Option<pb::SecretValue>) -> Result<SecretValue, Status> {
    use pb::secret_value::Kind;
    match value.and_then(|v| v.kind) {
        Some(Kind::Binary(b)) => Ok(SecretValue::new(b)),
        Some(Kind::Text(t)) => Ok(SecretValue::from(t)),
        None => Err(invalid_argument(FieldViolation::new(
            "value",
            "is required: set value.text, or value.binary (base64 in JSON)",
        ))),
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn metadata(info: SecretInfo, view_domain: &str) -> pb::SecretMetadata {
    let (scope, domain, source_id) = match &info.scope {
        Scope::Domain(d) => (pb::Scope::Domain, d.clone(), d.clone()),
        // Listed from a domain, a global secret is referenced through that
        // domain (domain first, then global), so the source names it.
        Scope::Global => (pb::Scope::Global, String::new(), view_domain.to_string()),
        Scope::Admin => (pb::Scope::Admin, String::new(), String::new()),
    };
    pb::SecretMetadata {
        key: info.key,
        scope: scope as i32,
        domain,
        source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: source_id }),
        created_at: Some(timestamp(info.created_at)),
        updated_at: Some(timestamp(info.updated_at)),
    }
}

#[tonic::async_trait]
impl SecretService for SecretGrpc {
    #[instrument(skip_all, fields(rpc = "CreateSecret", scope, domain, key, principal))]
    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = InternalCall::of(&request);
        let req = request.into_inner();
        self.put(&call, Write { scope: req.scope, domain: req.domain, key: req.key, value: req.value }, Mode::Create)
            .await
    }

    #[instrument(skip_all, fields(rpc = "UpdateSecret", scope, domain, key, principal))]
    async fn update_secret(
        &self,
        request: Request<pb::UpdateSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = InternalCall::of(&request);
        let req = request.into_inner();
        self.put(&call, Write { scope: req.scope, domain: req.domain, key: req.key, value: req.value }, Mode::Update)
            .await
    }

    #[instrument(skip_all, fields(rpc = "DeleteSecret", scope, domain, key, principal))]
    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let call = InternalCall::of(&request);
        let principal = &call.require_acting()?;
        let req = request.into_inner();
        record(&principal.to_string(), &req.domain, &req.key, req.scope);
        let scope = scope_of(req.scope, &req.domain, false)?;
        secrets_common::validate::secret_key("key", &req.key).map_err(invalid_argument)?;
        self.authorize(principal, &scope, Op::Write, None).await?;
        let broken = self.guard_delete(&scope, &req.key, req.force).await?;
        self.store.delete(&scope, &req.key).await?;
        match &broken {
            Some(b) => {
                tracing::warn!(%scope, key = %req.key, %principal, broken = b.total, "secret deleted by force while workloads reference it")
            }
            None => tracing::info!(%scope, key = %req.key, %principal, "secret deleted"),
        }
        Ok(Response::new(pb::DeleteSecretResponse { broken }))
    }

    #[instrument(skip_all, fields(rpc = "ListSecrets", scope, domain, principal, count))]
    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let call = InternalCall::of(&request);
        let principal = &call.require_acting()?;
        let req = request.into_inner();
        record(&principal.to_string(), &req.domain, "", req.scope);
        let scope = scope_of(req.scope, &req.domain, true)?;
        let view_domain = match (&scope, req.domain.as_str()) {
            (Scope::Global, "") => None,
            (Scope::Global, d) => {
                secrets_common::validate::domain("domain", d).map_err(invalid_argument)?;
                Some(d)
            }
            _ => None,
        };
        self.authorize(principal, &scope, Op::List, view_domain).await?;
        let secrets: Vec<_> = self.store.list(&scope).await?.into_iter().map(|i| metadata(i, &req.domain)).collect();
        tracing::Span::current().record("count", secrets.len() as i64);
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }
}

#[tonic::async_trait]
impl SecretReader for SecretGrpc {
    /// Values for the gateway's resolver. The gateway has already decided the
    /// caller may use them; this service only checks that the call is the
    /// gateway's (the internal credential). Values are returned in lookup
    /// order while they fit in `max_value_bytes`; the rest are withheld.
    #[instrument(skip_all, fields(rpc = "ReadSecrets", lookups, found, withheld))]
    async fn read_secrets(
        &self,
        request: Request<internal::ReadSecretsRequest>,
    ) -> Result<Response<internal::ReadSecretsResponse>, Status> {
        let req = request.into_inner();
        tracing::Span::current().record("lookups", req.lookups.len() as i64);
        let mut lookups = Vec::with_capacity(req.lookups.len());
        for (i, l) in req.lookups.into_iter().enumerate() {
            let scope = scope_of(l.scope, &l.domain, false).map_err(|s| {
                Status::with_details(s.code(), format!("lookups[{i}].{}", s.message()), s.details().to_vec().into())
            })?;
            lookups.push(Lookup { scope, key: l.key, global_fallback: l.global_fallback });
        }
        let found = self.store.read_values(&lookups).await?;
        let budget = if req.max_value_bytes == 0 { u64::MAX } else { req.max_value_bytes };
        let mut sent = 0u64;
        let (mut n_found, mut n_withheld) = (0i64, 0i64);
        let results = found
            .into_iter()
            .map(|f| match f {
                None => internal::SecretLookupResult::default(),
                Some(f) => {
                    n_found += 1;
                    let found_in = match f.scope {
                        Scope::Domain(_) => pb::Scope::Domain,
                        Scope::Global => pb::Scope::Global,
                        Scope::Admin => pb::Scope::Admin,
                    } as i32;
                    let len = f.value.len() as u64;
                    if req.presence_only || sent.saturating_add(len) > budget {
                        n_withheld += 1;
                        return internal::SecretLookupResult {
                            found: true,
                            found_in,
                            withheld: true,
                            ..Default::default()
                        };
                    }
                    sent += len;
                    internal::SecretLookupResult {
                        found: true,
                        found_in,
                        value: f.value.into_exposed(),
                        withheld: false,
                    }
                }
            })
            .collect();
        let span = tracing::Span::current();
        span.record("found", n_found);
        span.record("withheld", n_withheld);
        Ok(Response::new(internal::ReadSecretsResponse { results }))
    }
}

fn record(principal: &str, domain: &str, key: &str, scope: i32) {
    let span = tracing::Span::current();
    span.record("principal", principal);
    span.record("domain", domain);
    span.record("key", key);
    span.record("scope", pb::Scope::try_from(scope).map_or("unknown", |s| s.as_str_name()));
}
