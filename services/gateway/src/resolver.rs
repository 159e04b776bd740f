//! `ResolveSecrets`: turns secret objects and `${secrets.KEY}` placeholders
//! into values for a platform component launching a workload.
//!
//! One batch costs one authz round trip (every distinct permission asked
//! once) and one secret-service round trip (each store object read once).
//! Problems with one item are reported on that item as a `google.rpc.Status`;
//! the rest still resolve. Every batch is bounded by [`limits`].
//!
//! Reading order: [`plan`] (rules: what each item needs, no I/O) →
//! [`Resolver::resolve`] (one permission round trip, then one read per
//! secret source, concurrently) → [`render`] (rules: values into items,
//! within the response budget). Each secret source ([`KubernetesSource`],
//! [`VaultSource`]) says which permission a target needs and reads a batch.

use std::collections::{BTreeMap, BTreeSet};

use secrets_common::{
    Principal, SecretValue,
    auth::InternalChannel,
    authz::{AuthzClient, Question},
    error::{self, from_upstream, invalid_argument},
    placeholder::{self, Segment},
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::{
        self as internal, secret_reader_client::SecretReaderClient, vault_reader_client::VaultReaderClient,
    },
    v1::{self as pb, Permission, gateway_server::Gateway, resolve_item::Reference},
};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::instrument;

use crate::{
    auth::{Caller, RpcGroup, TokenKind},
    forward::{SECRET_SERVICE, VAULT_CONFIG_SERVICE},
};

/// What one `ResolveSecrets` call may ask for. Each refusal names its limit.
pub mod limits {
    /// Items per call.
    pub const MAX_ITEMS: usize = 1_000;
    /// Bytes of one item's `id`.
    pub const MAX_ITEM_ID_BYTES: usize = 256;
    /// Bytes of one `text` item.
    pub const MAX_TEXT_BYTES: usize = 4_096;
    /// `${secrets.KEY}` placeholders in one `text` item, repeats included.
    pub const MAX_PLACEHOLDERS_PER_ITEM: usize = 64;
    /// Resolved values and texts of one response together; items past it get
    /// `RESOURCE_EXHAUSTED`. Keeps every response under gRPC's usual 4 MiB.
    pub const MAX_RESPONSE_VALUE_BYTES: usize = 3 * 1024 * 1024;
    /// One encoded request: room for `MAX_ITEMS` items at their largest.
    pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
}

use limits::*;

#[derive(Clone)]
pub struct Resolver {
    /// `features.secretsV2.enabled`: secret objects (and Vault sources) are
    /// resolved; off, only legacy `${secrets.KEY}` placeholders and admin keys.
    pub secrets_v2: bool,
    pub kubernetes: KubernetesSource,
    pub vault: VaultSource,
    pub authz: AuthzClient,
    /// The usage index, for saved workloads.
    pub usage: secrets_common::usage::UsageClient,
    pub selector: crate::selector::Selector,
}

/// Where one key is looked up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A domain's secrets, then the global secrets.
    Domain(String),
    Admin,
    /// A Vault config, by id.
    Vault(String),
}

impl Target {
    fn question<'a>(&'a self, subject: &'a Principal, groups: &'a [Principal]) -> Question<'a> {
        match self {
            Target::Domain(d) => Question::domain(subject, Permission::UseSecrets, Some(d)),
            Target::Admin => Question::domain(subject, Permission::PlatformAdmin, None),
            Target::Vault(id) => Question::vault_config(subject, Permission::Use, id),
        }
        .with_groups(groups)
    }

    fn describe(&self) -> String {
        match self {
            Target::Domain(d) => format!("domain {d:?} or the global secrets"),
            Target::Admin => "the admin secrets".into(),
            Target::Vault(id) => format!("vault config {id}"),
        }
    }
}

/// A secret source: reads a batch of (target, key) lookups in one call.
#[tonic::async_trait]
pub trait Source: Send + Sync {
    /// One answer per lookup, in order; with `presence_only`, every found
    /// key is [`Read::Withheld`] and no value leaves its service.
    async fn read(&self, lookups: &[&(Target, String)], presence_only: bool) -> Result<Vec<Option<Read>>, Status>;
}

/// KUBERNETES objects, placeholders and admin keys: the secret service.
#[derive(Clone)]
pub struct KubernetesSource {
    pub reader: SecretReaderClient<InternalChannel>,
}

/// VAULT objects: the vault-config-service.
#[derive(Clone)]
pub struct VaultSource {
    pub reader: VaultReaderClient<InternalChannel>,
}

/// Resolving values, or checking references for `action` (a save).
#[derive(Clone, Copy)]
enum Mode<'a> {
    Resolve,
    Check { action: &'a str },
}

/// What one item needs, once parsed.
enum Plan<'a> {
    Value { target: Target, key: String },
    Text { segments: Vec<Segment<'a>> },
    Failed(Status),
}

/// What a source answered for one (target, key); `None` is not found.
pub enum Read {
    Found(SecretValue),
    /// Found, but past the response budget (or, checking presence, not read).
    Withheld,
    /// The source could not answer for this lookup (a Vault refusal, say).
    Failed(Status),
}

type Values = BTreeMap<(Target, String), Read>;

/// One key to read: where, and which.
type Lookup<'a> = &'a (Target, String);

/// `items[3] ("envVars.DB_PASSWORD")`: how errors name an item.
pub(crate) fn item_name(index: usize, id: &str) -> String {
    if id.is_empty() || id.len() > MAX_ITEM_ID_BYTES {
        format!("items[{index}]")
    } else {
        format!("items[{index}] ({})", secrets_common::validate::echo(id))
    }
}

/// `INVALID_ARGUMENT` for one field of one item, with a `BadRequest`
/// violation naming `items[i].field`.
fn item_invalid(index: usize, id: &str, field: &str, why: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(format!("items[{index}].{field}"), why);
    Status::with_error_details(Code::InvalidArgument, format!("{}: {field}: {why}", item_name(index, id)), details)
}

/// The refusal of a secret object while `features.secretsV2.enabled` is off.
fn secrets_v2_off(index: usize, id: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_precondition_failure_violation(
        "FEATURE_DISABLED",
        "features.secretsV2.enabled",
        "secret objects and Vault sources need features.secretsV2.enabled = true in the gateway configuration",
    );
    Status::with_error_details(
        Code::FailedPrecondition,
        format!(
            "{}: secret_object: secret objects are turned off (features.secretsV2.enabled is false in the gateway \
             configuration); use a ${{secrets.KEY}} placeholder, or turn the flag on",
            item_name(index, id)
        ),
        details,
    )
}

/// The rules for one item: what it needs, or why it cannot be resolved.
fn plan(index: usize, item: &pb::ResolveItem, secrets_v2: bool) -> Plan<'_> {
    let id = item.id.as_str();
    let invalid = |field: &str, why: &str| Plan::Failed(item_invalid(index, id, field, why));
    if id.len() > MAX_ITEM_ID_BYTES {
        return invalid("id", &format!("is {} bytes; an item id is at most {MAX_ITEM_ID_BYTES} bytes", id.len()));
    }
    match &item.reference {
        None => invalid("reference", "set one of secret_object, text or admin_key"),
        Some(Reference::SecretObject(_)) if !secrets_v2 => Plan::Failed(secrets_v2_off(index, id)),
        Some(Reference::SecretObject(obj)) => {
            if let Err(v) = validate::secret_key("key", &obj.key) {
                return invalid("secret_object.key", &v.description);
            }
            let Some(source) = &obj.source else {
                return invalid("secret_object.source", "is required: {type: KUBERNETES, id: <domain>}");
            };
            match pb::SourceType::try_from(source.r#type) {
                Ok(pb::SourceType::Kubernetes) => match validate::domain("id", &source.id) {
                    Ok(()) => Plan::Value { target: Target::Domain(source.id.clone()), key: obj.key.clone() },
                    Err(v) => invalid("secret_object.source.id", &format!("must be a domain name; {}", v.description)),
                },
                Ok(pb::SourceType::Vault) => match validate::vault_config_id("id", &source.id) {
                    Ok(()) => Plan::Value { target: Target::Vault(source.id.clone()), key: obj.key.clone() },
                    Err(v) => invalid(
                        "secret_object.source.id",
                        &format!("{}; for VAULT sources the id is the config id", v.description),
                    ),
                },
                Ok(pb::SourceType::Unspecified) => {
                    invalid("secret_object.source.type", "is required: KUBERNETES or VAULT")
                }
                Err(_) => invalid(
                    "secret_object.source.type",
                    &format!("unknown value {}; use KUBERNETES or VAULT", source.r#type),
                ),
            }
        }
        Some(Reference::Text(text)) => {
            if text.len() > MAX_TEXT_BYTES {
                return invalid(
                    "text",
                    &format!("is {} bytes; a text item is at most {MAX_TEXT_BYTES} bytes", text.len()),
                );
            }
            match placeholder::parse(text) {
                Ok(segments) if placeholder::count(&segments) > MAX_PLACEHOLDERS_PER_ITEM => invalid(
                    "text",
                    &format!(
                        "has {} placeholders; a text item has at most {MAX_PLACEHOLDERS_PER_ITEM}",
                        placeholder::count(&segments)
                    ),
                ),
                Ok(segments) => Plan::Text { segments },
                Err(e) => invalid("text", &e.to_string()),
            }
        }
        Some(Reference::AdminKey(key)) => match validate::secret_key("admin_key", key) {
            Ok(()) => Plan::Value { target: Target::Admin, key: key.clone() },
            Err(v) => invalid("admin_key", &v.description),
        },
    }
}

/// What each item references, for the usage index: the field (the item's
/// id), where the key is looked up, and whether through a placeholder
/// (looked up in `domain`, then the global secrets). Items that do not
/// parse reference nothing.
pub fn references(domain: &str, items: &[pb::ResolveItem]) -> Vec<internal::IndexedReference> {
    let reference = |field: &str, target: &Target, key: &str, placeholder: bool| {
        let (source_type, source_id) = match target {
            Target::Domain(d) => (pb::SourceType::Kubernetes, d.as_str()),
            Target::Vault(id) => (pb::SourceType::Vault, id.as_str()),
            Target::Admin => return None,
        };
        Some(internal::IndexedReference {
            field: field.to_string(),
            source_type: source_type as i32,
            source_id: source_id.to_string(),
            key: key.to_string(),
            placeholder,
        })
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match plan(i, item, true) {
            Plan::Value { target, key } => out.extend(reference(&item.id, &target, &key, false)),
            Plan::Text { segments } => {
                let target = Target::Domain(domain.to_string());
                let keys = placeholder::keys(&segments);
                out.extend(keys.into_iter().filter_map(|k| reference(&item.id, &target, k, true)));
            }
            Plan::Failed(_) => {}
        }
    }
    out
}

/// The response budget left for values and texts.
struct Budget {
    left: usize,
}

impl Budget {
    fn take(&mut self, name: &str, bytes: usize) -> Result<(), Status> {
        if bytes > self.left {
            return Err(over_budget(name));
        }
        self.left -= bytes;
        Ok(())
    }
}

fn over_budget(name: &str) -> Status {
    Status::resource_exhausted(format!(
        "{name}: the resolved values of one response total at most {MAX_RESPONSE_VALUE_BYTES} bytes (3 MiB) and this item would pass that; resolve it in another call"
    ))
}

/// What resolving needs to know besides the values.
struct Answers<'a> {
    values: &'a Values,
    denied: &'a BTreeMap<&'a Target, String>,
    principal: &'a Principal,
    /// Checking presence: a withheld key exists, and nothing is rendered.
    presence_only: bool,
}

/// Why an item's (target, key) cannot be used, if it cannot; `None` when it
/// exists but was not read (presence only).
fn lookup<'v>(
    answers: &Answers<'v>,
    name: &str,
    target: &Target,
    key: &str,
) -> Result<Option<&'v SecretValue>, Status> {
    let Answers { values, denied, principal, presence_only } = answers;
    if let Some(reason) = denied.get(target) {
        let what = match target {
            Target::Domain(d) => format!("use the secrets of domain {d:?}"),
            Target::Admin => "use the admin secrets".into(),
            Target::Vault(id) => format!("use vault config {id}"),
        };
        return Err(Status::permission_denied(format!("{name}: {principal} may not {what}: {reason}")));
    }
    match values.get(&(target.clone(), key.to_string())) {
        Some(Read::Found(v)) => Ok(Some(v)),
        Some(Read::Withheld) if *presence_only => Ok(None),
        Some(Read::Withheld) => Err(over_budget(name)),
        Some(Read::Failed(status)) => Err(Status::new(status.code(), format!("{name}: {}", status.message()))),
        None => Err(Status::not_found(format!("{name}: secret {key:?} does not exist in {}", target.describe()))),
    }
}

/// The result of one planned item, drawing on `budget`.
fn render(
    plan: Plan<'_>,
    name: &str,
    text_target: &Target,
    answers: &Answers<'_>,
    budget: &mut Budget,
) -> Result<pb::resolved_item::Result, Status> {
    match plan {
        Plan::Failed(e) => Err(e),
        Plan::Value { target, key } => {
            let Some(value) = lookup(answers, name, &target, &key)? else {
                return Ok(pb::resolved_item::Result::Value(Vec::new()));
            };
            budget.take(name, value.len())?;
            Ok(pb::resolved_item::Result::Value(value.expose().to_vec()))
        }
        Plan::Text { segments } => {
            let mut out = zeroize::Zeroizing::new(String::new());
            let mut taken = 0;
            let mut push = |piece: &str, budget: &mut Budget| -> Result<(), Status> {
                budget.take(name, piece.len())?;
                taken += piece.len();
                out.push_str(piece);
                Ok(())
            };
            let result = segments.iter().try_for_each(|s| match s {
                Segment::Literal(l) => push(l, budget),
                Segment::Placeholder(key) => {
                    let Some(value) = lookup(answers, name, text_target, key)? else { return Ok(()) };
                    let text = std::str::from_utf8(value.expose()).map_err(|_| {
                        Status::failed_precondition(format!(
                            "{name}: secret {key:?} holds binary data and cannot be placed into text; reference it as a secret object"
                        ))
                    })?;
                    push(text, budget)
                }
            });
            match result {
                Ok(()) => Ok(pb::resolved_item::Result::Text(std::mem::take(&mut *out))),
                Err(e) => {
                    // A failed item sends nothing: give its bytes back.
                    budget.left += taken;
                    Err(e)
                }
            }
        }
    }
}

impl Resolver {
    pub async fn resolve(
        &self,
        rpc: &str,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        caller.require(RpcGroup::Resolve, rpc)?;
        if caller.kind != TokenKind::Service {
            return Err(Status::permission_denied(format!(
                "token {:?} is a user token; secret values are returned only to platform-service tokens",
                caller.name
            )));
        }
        self.answer(caller, request, Mode::Resolve).await
    }

    /// Whether each item would resolve, without reading a value: per item,
    /// an empty result or the error resolving would give. A store or Vault
    /// that does not answer fails the items that need it, not the call.
    /// `action` in the request's domain needs USE_SECRETS there, asked in
    /// the same round trip as the items' permissions.
    pub async fn check(
        &self,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
        action: &str,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        self.answer(caller, request, Mode::Check { action }).await
    }

    async fn answer(
        &self,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
        mode: Mode<'_>,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        let presence_only = matches!(mode, Mode::Check { .. });
        validate::domain("domain", &request.domain).map_err(invalid_argument)?;
        if request.items.len() > MAX_ITEMS {
            return Err(invalid_argument(FieldViolation::new(
                "items",
                format!("has {} items; at most {MAX_ITEMS} per call", request.items.len()),
            )));
        }
        let text_target = Target::Domain(request.domain.clone());
        let plans: Vec<Plan> =
            request.items.iter().enumerate().map(|(i, item)| plan(i, item, self.secrets_v2)).collect();

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
        let mut targets: BTreeSet<Target> = wanted.iter().map(|(t, _)| t.clone()).collect();
        if presence_only {
            targets.insert(text_target.clone());
        }
        let targets: Vec<Target> = targets.into_iter().collect();
        let questions: Vec<Question> =
            targets.iter().map(|t| t.question(&caller.principal, &caller.member_of)).collect();
        // Decide first, then read only what is allowed: a denied item's
        // value never leaves its store or Vault, and never crosses the wire
        // into the gateway.
        let answers = caller.decide(&self.authz, questions).await?;
        let denied: BTreeMap<&Target, String> =
            targets.iter().zip(answers).filter(|(_, a)| !a.allowed).map(|(t, a)| (t, a.reason)).collect();
        if let (Mode::Check { action }, Some(reason)) = (mode, denied.get(&text_target)) {
            return Err(Status::permission_denied(format!(
                "{} may not {action} in domain {:?}: {reason}",
                caller.principal, request.domain
            )));
        }
        // One read per source, at once, of the allowed lookups only.
        let (vault, kubernetes): (Vec<Lookup>, Vec<Lookup>) =
            wanted.iter().filter(|(t, _)| !denied.contains_key(t)).partition(|(t, _)| matches!(t, Target::Vault(_)));
        let (from_kubernetes, from_vault) = tokio::join!(
            read_from(&self.kubernetes, &kubernetes, presence_only),
            read_from(&self.vault, &vault, presence_only)
        );
        let mut values = Values::new();
        for (lookups, read) in [(&kubernetes, from_kubernetes), (&vault, from_vault)] {
            match read {
                Ok(read) => values.extend(read),
                // Checking reports a source that did not answer per item.
                Err(e) if presence_only => values.extend(failed(lookups, &e)),
                Err(e) => return Err(e),
            }
        }

        let mut counts = Counts::default();
        let mut budget = Budget { left: MAX_RESPONSE_VALUE_BYTES };
        let answers = Answers { values: &values, denied: &denied, principal: &caller.principal, presence_only };
        let items = request
            .items
            .iter()
            .zip(plans)
            .enumerate()
            .map(|(i, (item, p))| {
                let name = item_name(i, &item.id);
                let result = render(p, &name, &text_target, &answers, &mut budget).unwrap_or_else(|e| {
                    counts.count(e.code());
                    pb::resolved_item::Result::Error(error::to_rpc_status(&e))
                });
                pb::ResolvedItem { id: item.id.clone(), result: Some(result) }
            })
            .collect::<Vec<_>>();
        let span = tracing::Span::current();
        span.record("keys", wanted.len() as i64);
        span.record("denied", counts.denied as i64);
        span.record("not_found", counts.not_found as i64);
        span.record("invalid", counts.invalid as i64);
        span.record("over_limit", counts.over_limit as i64);
        Ok(pb::ResolveSecretsResponse { items })
    }
}

/// Every lookup failed with `status` (its source did not answer).
fn failed(lookups: &[Lookup], status: &Status) -> Values {
    lookups.iter().map(|l| ((*l).clone(), Read::Failed(Status::new(status.code(), status.message())))).collect()
}

/// Reads `lookups` from `source` (nothing when there are none).
async fn read_from(source: &dyn Source, lookups: &[&(Target, String)], presence_only: bool) -> Result<Values, Status> {
    if lookups.is_empty() {
        return Ok(Values::new());
    }
    let answers = source.read(lookups, presence_only).await?;
    if answers.len() != lookups.len() {
        return Err(Status::unavailable(format!(
            "a secret source answered {} of {} lookups",
            answers.len(),
            lookups.len()
        )));
    }
    Ok(lookups.iter().zip(answers).filter_map(|(l, a)| a.map(|a| ((*l).clone(), a))).collect())
}

#[tonic::async_trait]
impl Source for KubernetesSource {
    async fn read(&self, lookups: &[&(Target, String)], presence_only: bool) -> Result<Vec<Option<Read>>, Status> {
        let request = internal::ReadSecretsRequest {
            lookups: lookups
                .iter()
                .map(|(t, key)| match t {
                    Target::Domain(d) => internal::SecretLookup {
                        scope: pb::Scope::Domain as i32,
                        domain: d.clone(),
                        key: key.clone(),
                        global_fallback: true,
                    },
                    Target::Admin | Target::Vault(_) => internal::SecretLookup {
                        scope: pb::Scope::Admin as i32,
                        domain: String::new(),
                        key: key.clone(),
                        global_fallback: false,
                    },
                })
                .collect(),
            max_value_bytes: MAX_RESPONSE_VALUE_BYTES as u64,
            presence_only,
        };
        let results = self
            .reader
            .clone()
            .read_secrets(request)
            .await
            .map_err(|s| internal_refusal(SECRET_SERVICE, s))?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| r.found.then(|| if r.withheld { Read::Withheld } else { Read::Found(SecretValue::new(r.value)) }))
            .collect())
    }
}

#[tonic::async_trait]
impl Source for VaultSource {
    async fn read(&self, lookups: &[&(Target, String)], presence_only: bool) -> Result<Vec<Option<Read>>, Status> {
        use internal::vault_lookup_result::Result as R;
        let request = internal::ReadVaultSecretsRequest {
            lookups: lookups
                .iter()
                .map(|(t, key)| internal::VaultLookup {
                    config_id: match t {
                        Target::Vault(id) => id.clone(),
                        _ => String::new(),
                    },
                    key: key.clone(),
                })
                .collect(),
            max_value_bytes: MAX_RESPONSE_VALUE_BYTES as u64,
            presence_only,
        };
        let results = self
            .reader
            .clone()
            .read_vault_secrets(request)
            .await
            .map_err(|s| internal_refusal(VAULT_CONFIG_SERVICE, s))?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(R::Value(v)) => Some(Read::Found(SecretValue::new(v))),
                Some(R::Withheld(_)) => Some(Read::Withheld),
                Some(R::Error(e)) => Some(Read::Failed(Status::new(Code::from_i32(e.code), e.message))),
                None => Some(Read::Failed(Status::unavailable("vault-config-service: an empty answer"))),
            })
            .collect())
    }
}

/// A refusal of lookups built here from validated items is this service's
/// bug, and the internal field names mean nothing to the caller; anything
/// else is the peer failing.
fn internal_refusal(peer: &str, s: Status) -> Status {
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange => {
            error::internal(&format!("{peer} refused the resolver's lookups"), &s.message())
        }
        _ => from_upstream(peer, s),
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

#[derive(Default)]
struct Counts {
    denied: usize,
    not_found: usize,
    invalid: usize,
    over_limit: usize,
}

impl Counts {
    fn count(&mut self, code: Code) {
        match code {
            Code::PermissionDenied => self.denied += 1,
            Code::NotFound => self.not_found += 1,
            Code::ResourceExhausted => self.over_limit += 1,
            _ => self.invalid += 1,
        }
    }
}

#[tonic::async_trait]
impl Gateway for Resolver {
    #[instrument(
        skip_all,
        fields(rpc = "ResolveSecrets", caller, principal, domain = %request.get_ref().domain,
               items = request.get_ref().items.len() as i64, keys, denied, not_found, invalid, over_limit)
    )]
    async fn resolve_secrets(
        &self,
        request: Request<pb::ResolveSecretsRequest>,
    ) -> Result<Response<pb::ResolveSecretsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let span = tracing::Span::current();
        span.record("caller", caller.name.as_str());
        span.record("principal", tracing::field::display(&caller.principal));
        let response = self.resolve("ResolveSecrets", &caller, request.into_inner()).await?;
        tracing::info!("resolved");
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "ResolveWorkload", caller, principal, domain = %request.get_ref().domain, keys, denied, not_found, invalid, over_limit))]
    async fn resolve_workload(
        &self,
        request: Request<pb::ResolveWorkloadRequest>,
    ) -> Result<Response<pb::ResolveWorkloadResponse>, Status> {
        let caller = Caller::of(&request)?;
        let span = tracing::Span::current();
        span.record("caller", caller.name.as_str());
        span.record("principal", tracing::field::display(&caller.principal));
        let request = request.into_inner();
        let payload = request
            .payload
            .ok_or_else(|| invalid_argument(FieldViolation::new("payload", "is required: the workload's payload")))?;
        let items = crate::workload::items(&payload)?;
        let resolved = self
            .resolve("ResolveWorkload", &caller, pb::ResolveSecretsRequest { domain: request.domain, items })
            .await?;
        tracing::info!("resolved");
        Ok(Response::new(crate::workload::fill(payload, resolved.items)))
    }

    #[instrument(skip_all, fields(rpc = "SaveWorkload", caller, principal, domain = %request.get_ref().domain,
                                  id = %request.get_ref().id, validate_only = request.get_ref().validate_only,
                                  references, problems))]
    async fn save_workload(
        &self,
        request: Request<pb::SaveWorkloadRequest>,
    ) -> Result<Response<pb::SaveWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.save_workload(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "DeleteWorkload", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn delete_workload(
        &self,
        request: Request<pb::DeleteWorkloadRequest>,
    ) -> Result<Response<pb::DeleteWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.delete_workload(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "GetWorkloadReferences", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn get_workload_references(
        &self,
        request: Request<pb::GetWorkloadReferencesRequest>,
    ) -> Result<Response<pb::GetWorkloadReferencesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workload_references(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListSecretUsages", caller, principal))]
    async fn list_secret_usages(
        &self,
        request: Request<pb::ListSecretUsagesRequest>,
    ) -> Result<Response<pb::ListSecretUsagesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.secret_usages(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListSelectableSecrets", caller, principal, domain = %request.get_ref().domain, count))]
    async fn list_selectable_secrets(
        &self,
        request: Request<pb::ListSelectableSecretsRequest>,
    ) -> Result<Response<pb::ListSelectableSecretsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let span = tracing::Span::current();
        span.record("caller", caller.name.as_str());
        span.record("principal", tracing::field::display(&caller.principal));
        caller.require(RpcGroup::Workloads, "ListSelectableSecrets")?;
        Ok(Response::new(self.selector.select(&caller, &request.get_ref().domain).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(id: &str, t: &str) -> pb::ResolveItem {
        pb::ResolveItem { id: id.into(), reference: Some(Reference::Text(t.into())) }
    }

    fn failed(p: Plan<'_>) -> Status {
        match p {
            Plan::Failed(s) => s,
            _ => panic!("expected a failed plan"),
        }
    }

    #[test]
    fn items_past_their_limits_are_refused_naming_the_limit_and_the_field() {
        let long_text = text("x", &"a".repeat(MAX_TEXT_BYTES + 1));
        let s = failed(plan(0, &long_text, true));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("at most 4096 bytes"), "{}", s.message());
        assert_eq!(s.get_error_details().bad_request().unwrap().field_violations[0].field, "items[0].text");

        let many = text("y", &"${secrets.k}".repeat(MAX_PLACEHOLDERS_PER_ITEM + 1));
        let s = failed(plan(3, &many, true));
        assert!(s.message().contains("at most 64"), "{}", s.message());
        assert!(s.message().starts_with("items[3] (\"y\"): text:"), "{}", s.message());

        let long_id = text(&"i".repeat(MAX_ITEM_ID_BYTES + 1), "plain");
        let s = failed(plan(1, &long_id, true));
        assert!(s.message().starts_with("items[1]: id: is 257 bytes"), "{}", s.message());

        assert!(matches!(
            plan(0, &text("ok", &"${secrets.k}".repeat(MAX_PLACEHOLDERS_PER_ITEM)), true),
            Plan::Text { .. }
        ));
    }

    #[test]
    fn the_reserved_admin_domain_fails_its_item_only() {
        let item = pb::ResolveItem {
            id: "a".into(),
            reference: Some(Reference::SecretObject(pb::SecretObject {
                key: "k".into(),
                source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: "admin".into() }),
            })),
        };
        let s = failed(plan(0, &item, true));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("reserved"), "{}", s.message());
    }

    #[test]
    fn rendering_stops_at_the_response_budget_and_gives_back_what_a_failed_item_took() {
        let target = Target::Domain("d".into());
        let mut values = Values::new();
        values.insert((target.clone(), "big".into()), Read::Found(SecretValue::new(vec![b'v'; 1000])));
        let principal = Principal::user("u");
        let denied = BTreeMap::new();
        let mut budget = Budget { left: 2500 };
        let answers = Answers { values: &values, denied: &denied, principal: &principal, presence_only: false };
        let run = |t: &str, budget: &mut Budget| {
            let item = text("t", t);
            render(plan(0, &item, true), "items[0]", &target, &answers, budget)
        };
        assert!(run("${secrets.big}${secrets.big}", &mut budget).is_ok());
        assert_eq!(budget.left, 500);
        let over = run("ab${secrets.big}", &mut budget).unwrap_err();
        assert_eq!(over.code(), Code::ResourceExhausted);
        assert!(over.message().contains("3 MiB"), "{}", over.message());
        assert_eq!(budget.left, 500, "a refused item costs nothing");
        assert!(run("short", &mut budget).is_ok());
    }
}
