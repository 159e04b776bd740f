//! Resolution: turns secret objects and `${secrets.KEY}` placeholders into
//! values for a platform component launching a workload, or checks that
//! they would resolve (a workload save).
//!
//! One batch costs one permission round trip (every distinct permission
//! asked once) and one read per secret source (each key read once).
//! Problems with one item are reported on that item as a `google.rpc.Status`;
//! the rest still resolve. Every batch is bounded by [`limits`].
//!
//! Reading order: [`plan`] (rules: what each item needs, no I/O) →
//! [`Resolution::resolve`] (decide, then read only what is allowed, each
//! source once, concurrently) → [`render`] (rules: values into items,
//! within the response budget). The permission answers come through
//! [`Decisions`] and the values through [`Source`]s ([`crate::sources`]
//! has the gRPC ones), so the whole flow is tested here without a server.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use secrets_common::{
    Principal, SecretValue,
    authz::{Decisions, Question},
    error::{self, invalid_argument},
    placeholder::{self, Segment},
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1 as internal,
    v1::{self as pb, Permission, resolve_item::Reference},
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::{Caller, RpcGroup, TokenKind};

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
pub struct Resolution {
    /// `features.secretsV2.enabled`: secret objects (and Vault sources) are
    /// resolved; off, only legacy `${secrets.KEY}` placeholders and admin keys.
    pub secrets_v2: bool,
    /// KUBERNETES objects, placeholders and admin keys.
    pub kubernetes: Arc<dyn Source>,
    /// VAULT objects.
    pub vault: Arc<dyn Source>,
    pub authz: Arc<dyn Decisions>,
}

/// Where one key is looked up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    /// The service behind it, as errors name it.
    fn name(&self) -> &'static str;

    /// One answer per lookup, in order; with `presence_only`, every found
    /// key is [`Read::Withheld`] and no value leaves its service. `within`
    /// is what is left of the caller's deadline for this hop.
    async fn read(
        &self,
        lookups: &[&(Target, String)],
        presence_only: bool,
        within: Option<Duration>,
    ) -> Result<Vec<Option<Read>>, Status>;
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

impl Resolution {
    pub async fn resolve(
        &self,
        rpc: &str,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        caller.require(RpcGroup::Resolve, rpc)?;
        if caller.kind != TokenKind::Service {
            return Err(Status::permission_denied(format!(
                "token {:?} is a user token; secret values are returned only to platform-service tokens",
                caller.name
            )));
        }
        self.answer(caller, request, Mode::Resolve, deadline).await
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
        deadline: Option<Instant>,
    ) -> Result<pb::ResolveSecretsResponse, Status> {
        self.answer(caller, request, Mode::Check { action }, deadline).await
    }

    /// Within `deadline` (the caller's, when it set one): the permission
    /// round trip fails the call when late (nothing is allowed unanswered);
    /// a secret source that fails or is late fails only the items it serves.
    async fn answer(
        &self,
        caller: &Caller,
        request: pb::ResolveSecretsRequest,
        mode: Mode<'_>,
        deadline: Option<Instant>,
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
        let decided = caller.decide(self.authz.as_ref(), questions);
        let answers = match deadline {
            None => decided.await?,
            Some(d) => {
                tokio::time::timeout(secrets_common::deadline::for_a_hop(d), decided).await.map_err(|_| {
                    Status::unavailable(format!(
                        "{}: did not decide before the call's deadline; nothing was read",
                        secrets_common::authz::AUTHZ_SERVICE
                    ))
                })??
            }
        };
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
            read_from(self.kubernetes.as_ref(), &kubernetes, presence_only, deadline),
            read_from(self.vault.as_ref(), &vault, presence_only, deadline)
        );
        let mut values = Values::new();
        for (lookups, read) in [(&kubernetes, from_kubernetes), (&vault, from_vault)] {
            match read {
                Ok(read) => values.extend(read),
                // A source that failed or was late fails the items it serves.
                Err(e) => values.extend(failed(lookups, &e)),
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

/// A hop used up what the caller's deadline left for it: the items it
/// serves get this.
pub fn deadline_passed(peer: &str, within: Duration) -> Status {
    Status::unavailable(format!(
        "{peer}: did not answer before the call's deadline ({} ms were left for it)",
        within.as_millis()
    ))
}

/// Every lookup failed with `status` (its source did not answer).
fn failed(lookups: &[Lookup], status: &Status) -> Values {
    lookups.iter().map(|l| ((*l).clone(), Read::Failed(Status::new(status.code(), status.message())))).collect()
}

/// Reads `lookups` from `source` (nothing when there are none), within
/// what `deadline` leaves for the hop.
async fn read_from(
    source: &dyn Source,
    lookups: &[&(Target, String)],
    presence_only: bool,
    deadline: Option<Instant>,
) -> Result<Values, Status> {
    if lookups.is_empty() {
        return Ok(Values::new());
    }
    let answers = match deadline.map(secrets_common::deadline::for_a_hop) {
        None => source.read(lookups, presence_only, None).await?,
        Some(within) => tokio::time::timeout(within, source.read(lookups, presence_only, Some(within)))
            .await
            .map_err(|_| deadline_passed(source.name(), within))??,
    };
    if answers.len() != lookups.len() {
        return Err(Status::unavailable(format!(
            "{}: answered {} of {} lookups",
            source.name(),
            answers.len(),
            lookups.len()
        )));
    }
    Ok(lookups.iter().zip(answers).filter_map(|(l, a)| a.map(|a| ((*l).clone(), a))).collect())
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

    /// Answers from a rule; counts the round trips and the questions.
    struct Table {
        allow: fn(&Question<'_>) -> bool,
        calls: std::sync::Mutex<Vec<usize>>,
    }

    #[tonic::async_trait]
    impl Decisions for Table {
        async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<pb::CheckResponse>, Status> {
            self.calls.lock().unwrap().push(questions.len());
            Ok(questions
                .iter()
                .map(|q| pb::CheckResponse {
                    allowed: (self.allow)(q),
                    reason: if (self.allow)(q) { "granted".into() } else { "no grant".into() },
                })
                .collect())
        }
    }

    /// Keys in memory; records every read, or fails every read, or never
    /// answers.
    #[derive(Default)]
    struct Memory {
        keys: BTreeMap<(Target, String), &'static str>,
        reads: std::sync::Mutex<Vec<Vec<(Target, String)>>>,
        down: bool,
        hung: bool,
    }

    #[tonic::async_trait]
    impl Source for Memory {
        fn name(&self) -> &'static str {
            "memory-store"
        }

        async fn read(
            &self,
            lookups: &[&(Target, String)],
            presence_only: bool,
            _within: Option<Duration>,
        ) -> Result<Vec<Option<Read>>, Status> {
            self.reads.lock().unwrap().push(lookups.iter().map(|l| (*l).clone()).collect());
            if self.down {
                return Err(Status::unavailable("memory-store: does not answer"));
            }
            if self.hung {
                std::future::pending::<()>().await;
            }
            Ok(lookups
                .iter()
                .map(|l| {
                    self.keys.get(l).map(|v| {
                        if presence_only {
                            Read::Withheld
                        } else {
                            Read::Found(SecretValue::new(v.as_bytes().to_vec()))
                        }
                    })
                })
                .collect())
        }
    }

    const CONFIG: &str = "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b";

    fn service_caller() -> Caller {
        Caller {
            name: "compute".into(),
            kind: TokenKind::Service,
            principal: Principal::service("compute-manager"),
            own: Principal::service("compute-manager"),
            member_of: Vec::new(),
            groups: None,
            not_admin: None,
        }
    }

    fn object(id: &str, key: &str, kind: pb::SourceType, source: &str) -> pb::ResolveItem {
        pb::ResolveItem {
            id: id.into(),
            reference: Some(Reference::SecretObject(pb::SecretObject {
                key: key.into(),
                source: Some(pb::SecretSource { r#type: kind as i32, id: source.into() }),
            })),
        }
    }

    struct Fixture {
        resolution: Resolution,
        table: Arc<Table>,
        kubernetes: Arc<Memory>,
        vault: Arc<Memory>,
    }

    fn fixture(allow: fn(&Question<'_>) -> bool, kubernetes: Memory, vault: Memory) -> Fixture {
        let (table, kubernetes, vault) =
            (Arc::new(Table { allow, calls: Default::default() }), Arc::new(kubernetes), Arc::new(vault));
        let resolution =
            Resolution { secrets_v2: true, kubernetes: kubernetes.clone(), vault: vault.clone(), authz: table.clone() };
        Fixture { resolution, table, kubernetes, vault }
    }

    fn memory(keys: &[(Target, &str, &'static str)]) -> Memory {
        Memory { keys: keys.iter().map(|(t, k, v)| ((t.clone(), k.to_string()), *v)).collect(), ..Default::default() }
    }

    fn domain(d: &str) -> Target {
        Target::Domain(d.into())
    }

    fn request(items: Vec<pb::ResolveItem>) -> pb::ResolveSecretsRequest {
        pb::ResolveSecretsRequest { domain: "sales".into(), items }
    }

    #[tokio::test]
    async fn a_batch_asks_each_permission_once_and_reads_each_key_once_per_source() {
        let f = fixture(
            |_| true,
            memory(&[(domain("sales"), "db", "pw1"), (domain("hr"), "api", "k2")]),
            memory(&[(Target::Vault(CONFIG.into()), "s3", "v3")]),
        );
        let items = vec![
            text("a", "u=${secrets.db};again=${secrets.db}"),
            text("b", "${secrets.db}"),
            object("c", "api", pb::SourceType::Kubernetes, "hr"),
            object("d", "s3", pb::SourceType::Vault, CONFIG),
            object("e", "api", pb::SourceType::Kubernetes, "hr"),
        ];
        let out = f.resolution.resolve("ResolveSecrets", &service_caller(), request(items), None).await.unwrap();
        let got: Vec<String> = out.items.iter().map(|i| result(i).unwrap()).collect();
        assert_eq!(got, ["u=pw1;again=pw1", "pw1", "k2", "v3", "k2"]);
        // Three targets (sales, hr, the config): one round trip.
        assert_eq!(*f.table.calls.lock().unwrap(), [3]);
        assert_eq!(f.kubernetes.reads.lock().unwrap().len(), 1);
        assert_eq!(f.kubernetes.reads.lock().unwrap()[0].len(), 2, "db and api, each once");
        assert_eq!(*f.vault.reads.lock().unwrap(), [vec![(Target::Vault(CONFIG.into()), "s3".to_string())]]);
    }

    #[tokio::test]
    async fn a_denied_target_is_never_read_and_its_items_name_the_principal_and_the_reason() {
        let f = fixture(
            |q| q.vault_config.is_none(),
            memory(&[(domain("sales"), "db", "pw1")]),
            memory(&[(Target::Vault(CONFIG.into()), "s3", "v3")]),
        );
        let items = vec![object("d", "s3", pb::SourceType::Vault, CONFIG), text("a", "${secrets.db}")];
        let out = f.resolution.resolve("ResolveSecrets", &service_caller(), request(items), None).await.unwrap();
        let denied = result(&out.items[0]).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(denied.message().contains("service:compute-manager may not use vault config"), "{}", denied.message());
        assert!(denied.message().ends_with("no grant"), "{}", denied.message());
        assert_eq!(result(&out.items[1]).unwrap(), "pw1");
        assert!(f.vault.reads.lock().unwrap().is_empty(), "the denied config was read");
    }

    #[tokio::test]
    async fn a_missing_key_fails_its_item_naming_where_it_was_looked_up() {
        let f = fixture(|_| true, memory(&[]), memory(&[]));
        let out = f
            .resolution
            .resolve("ResolveSecrets", &service_caller(), request(vec![text("a", "${secrets.nope}")]), None)
            .await
            .unwrap();
        let e = result(&out.items[0]).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(
            e.message(),
            "items[0] (\"a\"): secret \"nope\" does not exist in domain \"sales\" or the global secrets"
        );
    }

    #[tokio::test]
    async fn a_failing_source_fails_only_the_items_it_serves() {
        let vault = Memory { down: true, ..memory(&[(Target::Vault(CONFIG.into()), "s3", "v3")]) };
        let f = fixture(|_| true, memory(&[(domain("sales"), "db", "pw1")]), vault);
        let items = || vec![object("d", "s3", pb::SourceType::Vault, CONFIG), text("a", "${secrets.db}")];
        let out = f.resolution.resolve("ResolveSecrets", &service_caller(), request(items()), None).await.unwrap();
        let e = result(&out.items[0]).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("memory-store: does not answer"), "{}", e.message());
        assert_eq!(result(&out.items[1]).unwrap(), "pw1", "the other source's items still resolve");

        let out = f.resolution.check(&service_caller(), request(items()), "save workloads", None).await.unwrap();
        assert_eq!(result(&out.items[0]).unwrap_err().code(), Code::Unavailable);
        assert_eq!(result(&out.items[1]).unwrap(), "", "a check renders nothing");
    }

    #[tokio::test]
    async fn a_source_that_hangs_past_the_callers_deadline_fails_its_items_and_the_rest_answer() {
        let vault = Memory { hung: true, ..memory(&[(Target::Vault(CONFIG.into()), "s3", "v3")]) };
        let f = fixture(|_| true, memory(&[(domain("sales"), "db", "pw1")]), vault);
        let items = vec![object("d", "s3", pb::SourceType::Vault, CONFIG), text("a", "${secrets.db}")];
        let deadline = Instant::now() + Duration::from_millis(300);
        let out =
            f.resolution.resolve("ResolveSecrets", &service_caller(), request(items), Some(deadline)).await.unwrap();
        let e = result(&out.items[0]).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("memory-store: did not answer before the call's deadline"), "{}", e.message());
        assert_eq!(result(&out.items[1]).unwrap(), "pw1");
    }

    #[tokio::test]
    async fn values_go_only_to_service_tokens_and_never_to_a_principal_that_turns_out_to_be_an_admin() {
        let f = fixture(|_| true, memory(&[(domain("sales"), "db", "pw1")]), memory(&[]));
        let user = Caller { kind: TokenKind::User, ..service_caller() };
        let e = f
            .resolution
            .resolve("ResolveSecrets", &user, request(vec![text("a", "${secrets.db}")]), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("platform-service tokens"), "{}", e.message());

        let delegating = Caller {
            principal: Principal::user("root"),
            not_admin: Some(crate::auth::NotAdmin::Delegated),
            ..service_caller()
        };
        let e = f
            .resolution
            .resolve("ResolveSecrets", &delegating, request(vec![text("a", "${secrets.db}")]), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(*f.table.calls.lock().unwrap(), [2], "the admin question rides the same round trip");
        assert!(f.kubernetes.reads.lock().unwrap().is_empty(), "nothing is read for a refused caller");
    }

    fn result(r: &pb::ResolvedItem) -> Result<String, Status> {
        match r.result.clone().unwrap() {
            pb::resolved_item::Result::Value(v) => Ok(String::from_utf8(v).unwrap()),
            pb::resolved_item::Result::Text(t) => Ok(t),
            pb::resolved_item::Result::Error(e) => Err(Status::new(Code::from_i32(e.code), e.message)),
        }
    }
}
