//! The tonic adapter: decode, name the caller on the span, hand over to
//! [`Secrets`] (management) or the store (the resolver's reads), map errors.

use prost_types::Timestamp;
use secrets_common::{SecretValue, auth::InternalCall, error::invalid_argument, validate::FieldViolation};
use secrets_proto::{
    internal::v1::{self as internal, secret_reader_server::SecretReader},
    v1::{self as pb, secret_service_server::SecretService},
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    secrets::Secrets,
    store::{Lookup, Mode, Scope, SecretInfo},
};

#[derive(Clone)]
pub struct SecretGrpc {
    secrets: std::sync::Arc<Secrets>,
}

impl SecretGrpc {
    pub fn new(secrets: Secrets) -> Self {
        Self::shared(std::sync::Arc::new(secrets))
    }

    pub fn shared(secrets: std::sync::Arc<Secrets>) -> Self {
        Self { secrets }
    }

    async fn put(&self, call: &InternalCall, w: Write, mode: Mode) -> Result<Response<pb::SecretMetadata>, Status> {
        let principal = &call.require_acting()?;
        record(&principal.to_string(), &w.domain, &w.key, w.scope);
        let scope = scope_of(w.scope, &w.domain, false)?;
        let value = value_of(w.value)?;
        let request_id = Some(w.request_id.as_str()).filter(|id| !id.is_empty());
        let (info, reach) = self.secrets.put_with_reach(principal, &scope, &w.key, value, mode, request_id).await?;
        let mut answer = metadata(info, &w.domain);
        answer.reach = reach;
        Ok(Response::new(answer))
    }
}

/// A create or update request, whichever message it came in.
struct Write {
    scope: i32,
    domain: String,
    key: String,
    value: Option<pb::SecretValue>,
    request_id: String,
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
        reach: None,
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
        self.put(
            &call,
            Write { scope: req.scope, domain: req.domain, key: req.key, value: req.value, request_id: req.request_id },
            Mode::Create,
        )
        .await
    }

    #[instrument(skip_all, fields(rpc = "UpdateSecret", scope, domain, key, principal))]
    async fn update_secret(
        &self,
        request: Request<pb::UpdateSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = InternalCall::of(&request);
        let req = request.into_inner();
        self.put(
            &call,
            Write { scope: req.scope, domain: req.domain, key: req.key, value: req.value, request_id: req.request_id },
            Mode::Update,
        )
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
        let request_id = Some(req.request_id.as_str()).filter(|id| !id.is_empty());
        let (broken, reach) =
            self.secrets.delete_with_reach(principal, &scope, &req.key, req.force, request_id).await?;
        Ok(Response::new(pb::DeleteSecretResponse { broken, reach }))
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
        let listed = self.secrets.list(principal, &scope, view_domain).await?;
        let secrets: Vec<_> = listed.into_iter().map(|i| metadata(i, &req.domain)).collect();
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
        let found = self.secrets.store.read_values(&lookups).await?;
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
