//! `ResolveSecrets`: turns secret objects and `${secrets.KEY}` placeholders
//! into values for a platform component launching a workload.
//!
//! One batch costs one authz round trip (every distinct permission asked
//! once) and one secret-service round trip (each store object read once).
//! Problems with one item are reported on that item; the rest still resolve.

use std::collections::{BTreeMap, BTreeSet};

use secrets_common::{
    Principal, SecretValue,
    auth::InternalChannel,
    authz::{AuthzClient, Question},
    error::{from_upstream, invalid_argument},
    placeholder::{self, Segment},
    validate::{self, FieldViolation},
};
use secrets_proto::v1::{
    self as pb, ItemErrorCode, Permission, gateway_server::Gateway, resolve_item::Reference,
    secret_reader_client::SecretReaderClient,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    auth::{Caller, TokenKind},
    forward::SECRET_SERVICE,
};

/// Items per call: enough for any workload, small enough to bound one call.
pub const MAX_ITEMS: usize = 1_000;

#[derive(Clone)]
pub struct Resolver {
    pub reader: SecretReaderClient<InternalChannel>,
    pub authz: AuthzClient,
}

/// Where one key is looked up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A domain's secrets, then the global secrets.
    Domain(String),
    Admin,
}

impl Target {
    fn question<'a>(&'a self, subject: &'a Principal) -> Question<'a> {
        match self {
            Target::Domain(d) => Question { subject, permission: Permission::UseSecrets, domain: Some(d) },
            Target::Admin => Question { subject, permission: Permission::PlatformAdmin, domain: None },
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Domain(d) => format!("domain {d:?} or the global secrets"),
            Target::Admin => "the admin secrets".into(),
        }
    }
}

/// What one item needs, once parsed.
enum Plan<'a> {
    Value { target: Target, key: String },
    Text { segments: Vec<Segment<'a>> },
    Failed(pb::ItemError),
}

fn item_error(code: ItemErrorCode, message: String) -> pb::ItemError {
    pb::ItemError { code: code as i32, message }
}

/// `items[3] ("envVars.DB_PASSWORD")`: how errors name an item.
fn item_name(index: usize, id: &str) -> String {
    if id.is_empty() { format!("items[{index}]") } else { format!("items[{index}] ({id:?})") }
}

fn plan(index: usize, item: &pb::ResolveItem) -> Plan<'_> {
    let name = item_name(index, &item.id);
    let invalid = |field: &str, why: String| {
        Plan::Failed(item_error(ItemErrorCode::InvalidArgument, format!("{name}: {field}: {why}")))
    };
    match &item.reference {
        None => invalid("reference", "set one of secret_object, text or admin_key".into()),
        Some(Reference::SecretObject(obj)) => {
            if let Err(v) = validate::secret_key("key", &obj.key) {
                return invalid("secret_object.key", v.description);
            }
            let Some(source) = &obj.source else {
                return invalid("secret_object.source", "is required: {type: KUBERNETES, id: <domain>}".into());
            };
            match pb::SourceType::try_from(source.r#type) {
                Ok(pb::SourceType::Kubernetes) => match validate::domain("id", &source.id) {
                    Ok(()) => Plan::Value { target: Target::Domain(source.id.clone()), key: obj.key.clone() },
                    Err(v) => invalid("secret_object.source.id", format!("must be the domain name; {}", v.description)),
                },
                Ok(pb::SourceType::Vault) => Plan::Failed(item_error(
                    ItemErrorCode::FailedPrecondition,
                    format!(
                        "{name}: VAULT sources are resolved by the vault-config-service, which this gateway is not connected to"
                    ),
                )),
                Ok(pb::SourceType::Unspecified) | Err(_) => invalid(
                    "secret_object.source.type",
                    format!("unknown source type {}; use KUBERNETES or VAULT", source.r#type),
                ),
            }
        }
        Some(Reference::Text(text)) => match placeholder::parse(text) {
            Ok(segments) => Plan::Text { segments },
            Err(e) => invalid("text", e.to_string()),
        },
        Some(Reference::AdminKey(key)) => match validate::secret_key("admin_key", key) {
            Ok(()) => Plan::Value { target: Target::Admin, key: key.clone() },
            Err(v) => invalid("admin_key", v.description),
        },
    }
}

impl Resolver {
    pub async fn resolve(
        &self,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        if caller.kind != TokenKind::Service {
            return Err(Status::permission_denied(format!(
                "token {:?} is a user token; secret values are returned only to platform-service tokens",
                caller.name
            )));
        }
        validate::domain("domain", &request.domain).map_err(invalid_argument)?;
        if request.items.len() > MAX_ITEMS {
            return Err(invalid_argument(FieldViolation::new(
                "items",
                format!("has {} items; at most {MAX_ITEMS} per call", request.items.len()),
            )));
        }
        let text_target = Target::Domain(request.domain.clone());
        let plans: Vec<Plan> = request.items.iter().enumerate().map(|(i, item)| plan(i, item)).collect();

        // Every (target, key) the batch needs, once.
        let mut wanted: BTreeSet<(Target, String)> = BTreeSet::new();
        for p in &plans {
            match p {
                Plan::Value { target, key } => {
                    wanted.insert((target.clone(), key.clone()));
                }
                Plan::Text { segments } => {
                    for k in placeholder::keys(segments) {
                        wanted.insert((text_target.clone(), k.to_string()));
                    }
                }
                Plan::Failed(_) => {}
            }
        }

        // One authz round trip for every distinct target.
        let targets: Vec<Target> = wanted.iter().map(|(t, _)| t.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let questions: Vec<Question> = targets.iter().map(|t| t.question(&caller.principal)).collect();
        let answers = if questions.is_empty() { Vec::new() } else { self.authz.batch_check(&questions).await? };
        let denied: BTreeMap<&Target, String> =
            targets.iter().zip(answers).filter(|(_, a)| !a.allowed).map(|(t, a)| (t, a.reason)).collect();

        // One secret-service round trip for every permitted key.
        let lookups: Vec<&(Target, String)> = wanted.iter().filter(|(t, _)| !denied.contains_key(t)).collect();
        let values = self.read(&lookups).await?;

        let mut counts = Counts::default();
        let items = request
            .items
            .iter()
            .zip(plans)
            .enumerate()
            .map(|(i, (item, p))| {
                let name = item_name(i, &item.id);
                let result = match p {
                    Plan::Failed(e) => Err(e),
                    Plan::Value { target, key } => lookup(&values, &denied, &caller.principal, &name, &target, &key)
                        .map(|v| pb::resolved_item::Result::Value(v.clone().into_exposed())),
                    Plan::Text { segments } => {
                        render(&values, &denied, &caller.principal, &name, &text_target, &segments)
                            .map(pb::resolved_item::Result::Text)
                    }
                };
                let result = result.unwrap_or_else(|e| {
                    counts.count(&e);
                    pb::resolved_item::Result::Error(e)
                });
                pb::ResolvedItem { id: item.id.clone(), result: Some(result) }
            })
            .collect::<Vec<_>>();
        let span = tracing::Span::current();
        span.record("keys", wanted.len() as i64);
        span.record("denied", counts.denied as i64);
        span.record("not_found", counts.not_found as i64);
        span.record("invalid", counts.invalid as i64);
        Ok(pb::ResolveSecretsResponse { items })
    }

    async fn read(&self, lookups: &[&(Target, String)]) -> Result<BTreeMap<(Target, String), SecretValue>, Status> {
        if lookups.is_empty() {
            return Ok(BTreeMap::new());
        }
        let request = pb::ReadSecretsRequest {
            lookups: lookups
                .iter()
                .map(|(t, key)| match t {
                    Target::Domain(d) => pb::SecretLookup {
                        scope: pb::Scope::Domain as i32,
                        domain: d.clone(),
                        key: key.clone(),
                        global_fallback: true,
                    },
                    Target::Admin => pb::SecretLookup {
                        scope: pb::Scope::Admin as i32,
                        domain: String::new(),
                        key: key.clone(),
                        global_fallback: false,
                    },
                })
                .collect(),
        };
        let results = self
            .reader
            .clone()
            .read_secrets(request)
            .await
            .map_err(|s| from_upstream(SECRET_SERVICE, s))?
            .into_inner()
            .results;
        if results.len() != lookups.len() {
            return Err(Status::unavailable(format!(
                "{SECRET_SERVICE}: answered {} of {} lookups",
                results.len(),
                lookups.len()
            )));
        }
        Ok(lookups
            .iter()
            .zip(results)
            .filter(|(_, r)| r.found)
            .map(|(l, r)| ((*l).clone(), SecretValue::new(r.value)))
            .collect())
    }
}

fn lookup<'v>(
    values: &'v BTreeMap<(Target, String), SecretValue>,
    denied: &BTreeMap<&Target, String>,
    principal: &Principal,
    name: &str,
    target: &Target,
    key: &str,
) -> Result<&'v SecretValue, pb::ItemError> {
    if let Some(reason) = denied.get(target) {
        let what = match target {
            Target::Domain(d) => format!("use the secrets of domain {d:?}"),
            Target::Admin => "use the admin secrets".into(),
        };
        return Err(item_error(
            ItemErrorCode::PermissionDenied,
            format!("{name}: {principal} may not {what}: {reason}"),
        ));
    }
    values.get(&(target.clone(), key.to_string())).ok_or_else(|| {
        item_error(ItemErrorCode::NotFound, format!("{name}: secret {key:?} does not exist in {}", target.describe()))
    })
}

fn render(
    values: &BTreeMap<(Target, String), SecretValue>,
    denied: &BTreeMap<&Target, String>,
    principal: &Principal,
    name: &str,
    target: &Target,
    segments: &[Segment<'_>],
) -> Result<String, pb::ItemError> {
    let mut out = zeroize::Zeroizing::new(String::new());
    for s in segments {
        match s {
            Segment::Literal(l) => out.push_str(l),
            Segment::Placeholder(key) => {
                let value = lookup(values, denied, principal, name, target, key)?;
                let text = std::str::from_utf8(value.expose()).map_err(|_| {
                    item_error(
                        ItemErrorCode::FailedPrecondition,
                        format!("{name}: secret {key:?} holds binary data and cannot be placed into text; reference it as a secret object"),
                    )
                })?;
                out.push_str(text);
            }
        }
    }
    Ok(std::mem::take(&mut *out))
}

#[derive(Default)]
struct Counts {
    denied: usize,
    not_found: usize,
    invalid: usize,
}

impl Counts {
    fn count(&mut self, e: &pb::ItemError) {
        match ItemErrorCode::try_from(e.code) {
            Ok(ItemErrorCode::PermissionDenied) => self.denied += 1,
            Ok(ItemErrorCode::NotFound) => self.not_found += 1,
            _ => self.invalid += 1,
        }
    }
}

#[tonic::async_trait]
impl Gateway for Resolver {
    #[instrument(
        skip_all,
        fields(rpc = "ResolveSecrets", caller, principal, domain = %request.get_ref().domain,
               items = request.get_ref().items.len() as i64, keys, denied, not_found, invalid)
    )]
    async fn resolve_secrets(
        &self,
        request: Request<pb::ResolveSecretsRequest>,
    ) -> Result<Response<pb::ResolveSecretsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let span = tracing::Span::current();
        span.record("caller", caller.name.as_str());
        span.record("principal", tracing::field::display(&caller.principal));
        let response = self.resolve(&caller, request.into_inner()).await?;
        tracing::info!("resolved");
        Ok(Response::new(response))
    }
}
