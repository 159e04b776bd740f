//! Migration to secret objects, one workload at a time, and the progress
//! report per domain.
//!
//! A plan rewrites a payload: a value that is exactly one `${secrets.KEY}`
//! placeholder becomes `{key, source: {KUBERNETES, domain}}`, which is
//! looked up in the domain first and then in the global secrets, as the
//! placeholder is, so it resolves to the same value; a placeholder inside
//! longer text stays; a plaintext credential (a storage config's
//! `secretKey`, an email or LDAP password in plain text) becomes a proposed
//! domain secret and a reference to it. An apply creates the proposed
//! secrets through the secret-service as the caller (authorized, audited and
//! announced like any create) and, for a workload in the usage index,
//! records its new references.

use std::collections::{BTreeMap, HashMap};

use secrets_common::placeholder::{self, Segment};
use secrets_common::{
    auth::InternalChannel,
    authz::{AuthzClient, Question},
    error::{from_upstream, invalid_argument},
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::{self as internal, secret_reader_client::SecretReaderClient},
    v1::{self as pb, Permission, secret_service_server::SecretService, workload_payload::Kind},
};
use tonic::{Code, Request, Status};
use zeroize::Zeroizing;

use crate::{
    auth::{Caller, RpcGroup},
    forward::{Forwarder, SECRET_SERVICE},
    payload,
    workloads::SavedWorkloads,
};

/// The id proposed secrets are named after when a plan names none.
const DEFAULT_ID: &str = "workload";
/// Workloads `ListLegacyReferences` returns unless asked otherwise, and at most.
pub const DEFAULT_LEGACY: u32 = 100;
pub const MAX_LEGACY: u32 = 1_000;

#[derive(Clone)]
pub struct Migrations {
    pub workloads: SavedWorkloads,
    pub secrets: SecretReaderClient<InternalChannel>,
    /// Creates the proposed secrets as the caller, through the same path as
    /// `SecretService/CreateSecret` on this gateway.
    pub forwarder: Forwarder,
    pub authz: AuthzClient,
    pub secrets_v2: bool,
}

/// A plaintext credential that moves into a new domain secret.
struct Proposal {
    /// Where the plaintext was (and the name `secret_names` knows it by).
    field: String,
    /// Where the reference to the new secret is: `storageSecret` for a
    /// storage config's `secretKey`, else the same field.
    reference: String,
    key: String,
    value: Zeroizing<String>,
}

/// A payload rewritten, before its keys were looked up.
struct Rewrite {
    payload: pb::WorkloadPayload,
    changes: Vec<pb::MigrationChange>,
    proposals: Vec<Proposal>,
}

fn object(domain: &str, key: &str) -> pb::SecretObject {
    pb::SecretObject {
        key: key.to_string(),
        source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.to_string() }),
    }
}

/// `warehouse-etl` and `secretKey` → `warehouse-etl_secret_key`: the
/// workload's id and the field in snake case, cut to a key's length, with
/// every character a key may not hold replaced by `_`.
pub fn derived_key(id: &str, field: &str) -> String {
    let mut snake = String::new();
    for c in field.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    let id: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    let id = id.trim_start_matches('.');
    let id = if id.is_empty() { DEFAULT_ID } else { id };
    let room = validate::MAX_KEY_LEN.saturating_sub(snake.len() + 1);
    let id: String = id.chars().take(room).collect();
    format!("{id}_{snake}")
}

/// The single placeholder a text is, if it is exactly one.
fn lone_placeholder(text: &str) -> Option<&str> {
    match placeholder::parse(text).ok()?.as_slice() {
        [Segment::Placeholder(key)] => Some(key),
        _ => None,
    }
}

struct Rewriter<'a> {
    domain: &'a str,
    id: &'a str,
    names: &'a HashMap<String, String>,
    changes: Vec<pb::MigrationChange>,
    proposals: Vec<Proposal>,
}

impl Rewriter<'_> {
    fn key_for(&self, field: &str) -> Result<String, Status> {
        let key = match self.names.get(field) {
            Some(name) => name.clone(),
            None => derived_key(self.id, field),
        };
        validate::secret_key(&format!("secret_names[{field:?}]"), &key).map_err(invalid_argument)?;
        Ok(key)
    }

    /// A plaintext credential in `field`: proposed as a new domain secret,
    /// referenced from `reference`.
    fn propose(&mut self, field: &str, reference: &str, value: String) -> Result<pb::SecretObject, Status> {
        let key = self.key_for(field)?;
        let object = object(self.domain, &key);
        self.changes.push(pb::MigrationChange {
            field: field.to_string(),
            action: pb::MigrationAction::MigrationPlaintextToSecret as i32,
            secret_object: Some(object.clone()),
            origin: pb::KeyOrigin::New as i32,
            message: format!(
                "{field}: the plaintext credential moves into a new secret {key:?} of domain {:?}, referenced instead",
                self.domain
            ),
            keys: Vec::new(),
        });
        self.proposals.push(Proposal {
            field: field.to_string(),
            reference: reference.to_string(),
            key,
            value: Zeroizing::new(value),
        });
        Ok(object)
    }

    /// One configuration value at `field`; `credential` when the field only
    /// ever holds a password (a plain text there is a plaintext credential).
    fn value(&mut self, field: String, value: &mut pb::ConfigValue, credential: bool) -> Result<(), Status> {
        let Some(pb::config_value::Value::Text(text)) = &value.value else { return Ok(()) };
        if let Some(key) = lone_placeholder(text) {
            let object = object(self.domain, key);
            self.changes.push(pb::MigrationChange {
                field: field.clone(),
                action: pb::MigrationAction::MigrationPlaceholderToObject as i32,
                secret_object: Some(object.clone()),
                origin: pb::KeyOrigin::Unspecified as i32,
                message: String::new(),
                keys: Vec::new(),
            });
            value.value = Some(pb::config_value::Value::SecretObject(object));
            return Ok(());
        }
        // A malformed placeholder stays: validation names it.
        let keys: Vec<String> = placeholder::parse(text)
            .map(|segments| placeholder::keys(&segments).into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        if !keys.is_empty() {
            self.changes.push(pb::MigrationChange {
                field: field.clone(),
                action: pb::MigrationAction::MigrationEmbeddedInText as i32,
                secret_object: None,
                origin: pb::KeyOrigin::Unspecified as i32,
                message: format!(
                    "{field}: {} placeholder(s) embedded in text stay as they are; to migrate them, reference each \
                     secret in a field of its own",
                    keys.len()
                ),
                keys,
            });
        } else if credential && !text.is_empty() && !text.contains("${secrets.") {
            let plaintext = std::mem::take(match &mut value.value {
                Some(pb::config_value::Value::Text(t)) => t,
                _ => return Ok(()),
            });
            let object = self.propose(&field, &field, plaintext)?;
            value.value = Some(pb::config_value::Value::SecretObject(object));
        }
        Ok(())
    }

    fn map(&mut self, prefix: &str, name: &str, map: &mut HashMap<String, pb::ConfigValue>) -> Result<(), Status> {
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort();
        for k in names {
            if let Some(v) = map.get_mut(&k) {
                self.value(payload::entry(prefix, name, &k), v, false)?;
            }
        }
        Ok(())
    }

    fn payload(&mut self, payload: &mut pb::WorkloadPayload) -> Result<(), Status> {
        match &mut payload.kind {
            Some(Kind::Compute(c)) => {
                self.map("", "envVars", &mut c.env_vars)?;
                self.map("", "sparkConf", &mut c.spark_conf)?;
            }
            Some(Kind::SparkJob(s) | Kind::StreamingJob(s) | Kind::SdkSparkJob(s)) => {
                if let Some(t) = &mut s.template {
                    self.map("template.", "envVars", &mut t.env_vars)?;
                    self.map("template.", "sparkConf", &mut t.spark_conf)?;
                }
            }
            Some(Kind::JupyterContainer(j)) => {
                if let Some(c) = &mut j.config {
                    self.map("config.", "envVars", &mut c.env_vars)?;
                }
            }
            Some(Kind::StorageConfig(s)) => {
                if s.secret_key.is_empty() {
                } else if s.storage_secret.is_some() {
                    drop(Zeroizing::new(std::mem::take(&mut s.secret_key)));
                    self.changes.push(pb::MigrationChange {
                        field: "secretKey".into(),
                        action: pb::MigrationAction::MigrationPlaintextRemoved as i32,
                        secret_object: None,
                        origin: pb::KeyOrigin::Unspecified as i32,
                        message: "secretKey: the fallback is removed; storageSecret already wins over it".into(),
                        keys: Vec::new(),
                    });
                } else if let Some(key) = lone_placeholder(&s.secret_key).map(str::to_string) {
                    // Resolved into secretKey today: the reference does the same.
                    let object = object(self.domain, &key);
                    self.changes.push(pb::MigrationChange {
                        field: "secretKey".into(),
                        action: pb::MigrationAction::MigrationPlaceholderToObject as i32,
                        secret_object: Some(object.clone()),
                        origin: pb::KeyOrigin::Unspecified as i32,
                        message: String::new(),
                        keys: Vec::new(),
                    });
                    s.secret_key.clear();
                    s.storage_secret = Some(object);
                } else if s.secret_key.contains("${secrets.") {
                    let keys: Vec<String> = placeholder::parse(&s.secret_key)
                        .map(|segments| placeholder::keys(&segments).into_iter().map(str::to_string).collect())
                        .unwrap_or_default();
                    self.changes.push(pb::MigrationChange {
                        field: "secretKey".into(),
                        action: pb::MigrationAction::MigrationEmbeddedInText as i32,
                        secret_object: None,
                        origin: pb::KeyOrigin::Unspecified as i32,
                        message: format!(
                            "secretKey: {} placeholder(s) embedded in text stay as they are; to migrate, keep the \
                             whole key in one secret and reference it",
                            keys.len()
                        ),
                        keys,
                    });
                } else {
                    let plaintext = std::mem::take(&mut s.secret_key);
                    s.storage_secret = Some(self.propose("secretKey", "storageSecret", plaintext)?);
                }
            }
            Some(Kind::EmailSettings(e)) => {
                if let Some(v) = &mut e.smtp_password {
                    self.value("smtpPassword".into(), v, true)?;
                }
            }
            Some(Kind::LdapIntegration(l)) => {
                if let Some(v) = &mut l.bind_password {
                    self.value("bindPassword".into(), v, true)?;
                }
            }
            None => {
                return Err(invalid_argument(FieldViolation::new(
                    "payload",
                    "set one kind: compute, sparkJob, streamingJob, sdkSparkJob, jupyterContainer, storageConfig, \
                     emailSettings or ldapIntegration",
                )));
            }
        }
        Ok(())
    }
}

/// Rewrites `payload` (pure: nothing is looked up).
fn rewrite(
    domain: &str,
    id: &str,
    mut payload: pb::WorkloadPayload,
    names: &HashMap<String, String>,
) -> Result<Rewrite, Status> {
    let mut r = Rewriter { domain, id, names, changes: Vec::new(), proposals: Vec::new() };
    r.payload(&mut payload)?;
    if let Some(unknown) = names.keys().find(|f| !r.proposals.iter().any(|p| &p.field == *f)) {
        let proposed: Vec<&str> = r.proposals.iter().map(|p| p.field.as_str()).collect();
        return Err(invalid_argument(FieldViolation::new(
            format!("secret_names[{unknown:?}]"),
            match proposed.is_empty() {
                true => "names no proposed secret: this payload proposes none".to_string(),
                false => format!("names no proposed secret: this payload proposes {}", proposed.join(", ")),
            },
        )));
    }
    let mut keys = std::collections::HashSet::new();
    for p in &r.proposals {
        if !keys.insert(p.key.clone()) {
            return Err(invalid_argument(FieldViolation::new(
                format!("secret_names[{:?}]", p.field),
                format!("names {:?}, which another proposed secret of this payload has", p.key),
            )));
        }
    }
    Ok(Rewrite { payload, changes: r.changes, proposals: r.proposals })
}

/// The fields of a payload that hold a plaintext credential: what the
/// usage index records (the field, never the value).
pub fn plaintext_fields(payload: &pb::WorkloadPayload) -> Vec<String> {
    let plain = |v: &Option<pb::ConfigValue>| {
        matches!(v, Some(pb::ConfigValue { value: Some(pb::config_value::Value::Text(t)) })
            if !t.is_empty() && !t.contains("${secrets."))
    };
    match &payload.kind {
        Some(Kind::StorageConfig(s)) if !s.secret_key.is_empty() && !s.secret_key.contains("${secrets.") => {
            vec!["secretKey".into()]
        }
        Some(Kind::EmailSettings(e)) if plain(&e.smtp_password) => vec!["smtpPassword".into()],
        Some(Kind::LdapIntegration(l)) if plain(&l.bind_password) => vec!["bindPassword".into()],
        _ => Vec::new(),
    }
}

/// The refusal of an apply while `features.secretsV2.enabled` is off.
fn secrets_v2_off() -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let mut details = ErrorDetails::new();
    details.add_precondition_failure_violation(
        "FEATURE_DISABLED",
        "features.secretsV2.enabled",
        "a migration rewrites payloads to secret objects, which need features.secretsV2.enabled = true in the \
         gateway configuration",
    );
    Status::with_error_details(
        Code::FailedPrecondition,
        "ApplyWorkloadMigration is refused: secret objects are turned off (features.secretsV2.enabled is false in \
         the gateway configuration), so a migrated payload would not resolve; turn the flag on first \
         (PlanWorkloadMigration still shows the plan)",
        details,
    )
}

/// Whether two values are equal, in time that does not depend on where
/// they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A planned migration, keys looked up and the result checked.
struct Planned {
    rewrite: Rewrite,
    problems: Vec<pb::ReferenceProblem>,
}

impl Migrations {
    async fn read(
        &self,
        lookups: Vec<internal::SecretLookup>,
        presence_only: bool,
    ) -> Result<Vec<internal::SecretLookupResult>, Status> {
        if lookups.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .secrets
            .clone()
            .read_secrets(internal::ReadSecretsRequest { lookups, max_value_bytes: 0, presence_only })
            .await
            .map_err(|s| from_upstream(SECRET_SERVICE, s))?
            .into_inner()
            .results)
    }

    /// Where each key is found for `domain` today: its own, the global, or
    /// nowhere.
    pub async fn origins(&self, domain: &str, keys: &[String]) -> Result<Vec<pb::KeyOrigin>, Status> {
        let lookups = keys
            .iter()
            .map(|k| internal::SecretLookup {
                scope: pb::Scope::Domain as i32,
                domain: domain.to_string(),
                key: k.clone(),
                global_fallback: true,
            })
            .collect();
        Ok(self
            .read(lookups, true)
            .await?
            .into_iter()
            .map(|r| match (r.found, pb::Scope::try_from(r.found_in)) {
                (false, _) => pb::KeyOrigin::Missing,
                (true, Ok(pb::Scope::Global)) => pb::KeyOrigin::Global,
                (true, _) => pb::KeyOrigin::Domain,
            })
            .collect())
    }

    async fn plan_of(
        &self,
        caller: &Caller,
        domain: &str,
        id: &str,
        payload: Option<pb::WorkloadPayload>,
        names: &HashMap<String, String>,
        deadline: Option<std::time::Instant>,
    ) -> Result<Planned, Status> {
        validate::domain("domain", domain).map_err(invalid_argument)?;
        let payload = payload
            .ok_or_else(|| invalid_argument(FieldViolation::new("payload", "is required: the workload's payload")))?;
        let mut rewrite = rewrite(domain, id, payload, names)?;
        // Validated as SaveWorkload validates (USE_SECRETS in the domain
        // and every reference), recording nothing.
        let checked = self
            .workloads
            .save(
                caller,
                pb::SaveWorkloadRequest {
                    domain: domain.to_string(),
                    id: id.to_string(),
                    name: String::new(),
                    payload: Some(rewrite.payload.clone()),
                    validate_only: true,
                },
                deadline,
            )
            .await?;
        let proposed: Vec<&str> = rewrite.proposals.iter().map(|p| p.reference.as_str()).collect();
        let problems = checked
            .problems
            .into_iter()
            .filter(|p| !(proposed.contains(&p.field.as_str()) && p.r#type == pb::ProblemType::ProblemNotFound as i32))
            .collect();
        let placeholders: Vec<(usize, String)> = rewrite
            .changes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.action == pb::MigrationAction::MigrationPlaceholderToObject as i32)
            .filter_map(|(i, c)| c.secret_object.as_ref().map(|o| (i, o.key.clone())))
            .collect();
        let keys: Vec<String> = placeholders.iter().map(|(_, k)| k.clone()).collect();
        let origins = self.origins(domain, &keys).await?;
        for ((i, key), origin) in placeholders.into_iter().zip(origins) {
            let change = &mut rewrite.changes[i];
            change.origin = origin as i32;
            change.message = match origin {
                pb::KeyOrigin::Global => format!(
                    "{}: ${{secrets.{key}}} becomes a secret object; domain {domain:?} has no {key:?}, so it falls back \
                     to the global secret, as the placeholder does",
                    change.field
                ),
                pb::KeyOrigin::Missing => format!(
                    "{}: ${{secrets.{key}}} becomes a secret object; {key:?} exists neither in domain {domain:?} nor \
                     in the global secrets, so it does not resolve now either",
                    change.field
                ),
                _ => format!("{}: ${{secrets.{key}}} becomes a secret object of domain {domain:?}", change.field),
            };
        }
        Ok(Planned { rewrite, problems })
    }

    pub async fn plan(
        &self,
        caller: &Caller,
        request: pb::PlanWorkloadMigrationRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<pb::PlanWorkloadMigrationResponse, Status> {
        caller.require(RpcGroup::Workloads, "PlanWorkloadMigration")?;
        let id = if request.id.is_empty() { DEFAULT_ID.to_string() } else { request.id.clone() };
        validate::workload_id("id", &id).map_err(invalid_argument)?;
        let planned =
            self.plan_of(caller, &request.domain, &id, request.payload, &request.secret_names, deadline).await?;
        let proposed_secrets = planned.rewrite.proposals.iter().map(|p| object(&request.domain, &p.key)).collect();
        Ok(pb::PlanWorkloadMigrationResponse {
            payload: Some(planned.rewrite.payload),
            changes: planned.rewrite.changes,
            proposed_secrets,
            problems: planned.problems,
        })
    }

    async fn require(&self, caller: &Caller, question: Question<'_>, action: &str) -> Result<(), Status> {
        let answer = caller.decide(&self.authz, vec![question.with_groups(&caller.member_of)]).await?.remove(0);
        if answer.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{} may not {action}: {}", caller.principal, answer.reason)))
        }
    }

    pub async fn apply(
        &self,
        caller: &Caller,
        request: pb::ApplyWorkloadMigrationRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<pb::ApplyWorkloadMigrationResponse, Status> {
        caller.require(RpcGroup::Workloads, "ApplyWorkloadMigration")?;
        if !self.secrets_v2 {
            return Err(secrets_v2_off());
        }
        validate::workload_id("id", &request.id).map_err(invalid_argument)?;
        let domain = request.domain.clone();
        let kind = request.payload.as_ref().map_or(pb::WorkloadKind::Unspecified, pb::WorkloadPayload::workload_kind);
        let planned =
            self.plan_of(caller, &domain, &request.id, request.payload, &request.secret_names, deadline).await?;
        let Planned { rewrite, problems } = planned;
        if !problems.is_empty() {
            return Ok(pb::ApplyWorkloadMigrationResponse {
                applied: false,
                payload: None,
                changes: rewrite.changes,
                problems,
                created_secrets: Vec::new(),
                index_updated: false,
            });
        }
        // Everything that could refuse is asked before anything changes.
        let indexed = self
            .workloads
            .usage
            .get(internal::GetWorkloadRequest { domain: domain.clone(), kind: kind as i32, id: request.id.clone() })
            .await?;
        // The index is updated by the record's owner or a platform admin
        // (SaveWorkload's rule); anyone else gets the payload and the
        // secrets, and the owner's next save records the references.
        let may_record = if !indexed.found {
            false
        } else {
            match self.workloads.may_record(caller, "update the usage index").await {
                Ok(admin) => {
                    let owner = &indexed.owner;
                    owner.is_empty()
                        || *owner == caller.own.to_string()
                        || admin
                        || self.workloads.is_admin(caller).await?
                }
                Err(s) if s.code() == Code::PermissionDenied => false,
                Err(s) => return Err(s),
            }
        };
        // Proposed secrets that exist already. A platform service, which
        // resolves values anyway, may find its own earlier apply there (same
        // value: nothing to do). Nobody else learns how a value compares.
        let lookups: Vec<internal::SecretLookup> = rewrite
            .proposals
            .iter()
            .map(|p| internal::SecretLookup {
                scope: pb::Scope::Domain as i32,
                domain: domain.clone(),
                key: p.key.clone(),
                global_fallback: false,
            })
            .collect();
        let existing = self.read(lookups.clone(), false).await?;
        if existing.len() != lookups.len() {
            return Err(Status::unavailable(format!(
                "{SECRET_SERVICE} answered {} of {} lookups; nothing was done, try again",
                existing.len(),
                lookups.len()
            )));
        }
        let compares = caller.kind == crate::auth::TokenKind::Service;
        let exists = |proposal: &Proposal, found: internal::SecretLookupResult| -> Result<(), Status> {
            let value = Zeroizing::new(found.value);
            if compares && same(&value, proposal.value.as_bytes()) {
                return Ok(());
            }
            Err(Status::failed_precondition(format!(
                "{}: secret {:?} of domain {domain:?} exists already{}; name the new secret with secret_names[{:?}], \
                 or apply the migrated payload",
                proposal.field,
                proposal.key,
                if compares { " with another value" } else { "" },
                proposal.field
            )))
        };
        let mut to_create = Vec::new();
        for (proposal, found) in rewrite.proposals.iter().zip(existing) {
            if found.found {
                exists(proposal, found)?;
            } else {
                to_create.push(proposal);
            }
        }
        if !to_create.is_empty() {
            caller.require(RpcGroup::ManageSecrets, "ApplyWorkloadMigration")?;
            let question = Question::domain(&caller.principal, Permission::ManageSecrets, Some(&domain));
            self.require(caller, question, &format!("create the proposed secrets in domain {domain:?}")).await?;
        }
        let mut created_secrets = Vec::new();
        for proposal in to_create {
            let mut create = Request::new(pb::CreateSecretRequest {
                scope: pb::Scope::Domain as i32,
                domain: domain.clone(),
                key: proposal.key.clone(),
                value: Some(pb::SecretValue { kind: Some(pb::secret_value::Kind::Text(proposal.value.to_string())) }),
                request_id: uuid::Uuid::new_v4().to_string(),
            });
            create.extensions_mut().insert(caller.clone());
            match SecretService::create_secret(&self.forwarder, create).await {
                Ok(_) => created_secrets.push(object(&domain, &proposal.key)),
                // Created meanwhile (a concurrent apply): the same rule as above.
                Err(s) if s.code() == Code::AlreadyExists => {
                    let lookup = internal::SecretLookup {
                        scope: pb::Scope::Domain as i32,
                        domain: domain.clone(),
                        key: proposal.key.clone(),
                        global_fallback: false,
                    };
                    let found = self.read(vec![lookup], false).await?.into_iter().next().unwrap_or_default();
                    exists(proposal, found)?;
                }
                Err(s) => return Err(s),
            }
        }
        // The workload's record keeps its owner (the platform component
        // that saved it) and its name; its references and plaintext fields
        // change.
        let mut index_updated = false;
        if may_record {
            let items = payload::items(&rewrite.payload)?;
            let owner = if indexed.owner.is_empty() { caller.own.to_string() } else { indexed.owner.clone() };
            let override_owner = owner != caller.own.to_string();
            self.workloads
                .usage
                .record(internal::RecordWorkloadRequest {
                    workload: Some(pb::WorkloadRef {
                        domain: domain.clone(),
                        kind: kind as i32,
                        id: request.id.clone(),
                        name: indexed.workload.map(|w| w.name).unwrap_or_default(),
                    }),
                    references: crate::resolution::references(&domain, &items),
                    saved_by: caller.principal.to_string(),
                    owner,
                    override_owner,
                    plaintext_fields: plaintext_fields(&rewrite.payload),
                })
                .await?;
            index_updated = true;
        }
        tracing::info!(
            changes = rewrite.changes.len(),
            created = created_secrets.len(),
            index_updated,
            "workload migrated"
        );
        Ok(pb::ApplyWorkloadMigrationResponse {
            applied: true,
            payload: Some(rewrite.payload),
            changes: rewrite.changes,
            problems: Vec::new(),
            created_secrets,
            index_updated,
        })
    }
}

impl Migrations {
    /// Migration progress from the usage index.
    pub async fn legacy(
        &self,
        caller: &Caller,
        request: pb::ListLegacyReferencesRequest,
    ) -> Result<pb::ListLegacyReferencesResponse, Status> {
        caller.require(RpcGroup::Workloads, "ListLegacyReferences")?;
        let limit = match request.limit {
            0 => DEFAULT_LEGACY,
            n if n > MAX_LEGACY => {
                return Err(invalid_argument(FieldViolation::new("limit", format!("is at most {MAX_LEGACY}"))));
            }
            n => n,
        };
        if request.domain.is_empty() {
            let question = Question::domain(&caller.principal, Permission::PlatformAdmin, None);
            self.require(caller, question, "see every domain's migration progress (set domain to see one domain's)")
                .await?;
        } else {
            validate::domain("domain", &request.domain).map_err(invalid_argument)?;
            let question = Question::domain(&caller.principal, Permission::ListSecrets, Some(&request.domain));
            self.require(caller, question, &format!("list the secrets of domain {:?}", request.domain)).await?;
        }
        let found =
            self.workloads.usage.legacy(internal::ListLegacyRequest { domain: request.domain.clone(), limit }).await?;
        // Where each placeholder's key is found, per domain, asked once.
        let mut origins: BTreeMap<(String, String), pb::KeyOrigin> = BTreeMap::new();
        for w in &found.workloads {
            for p in &w.placeholders {
                origins.insert((p.source_id.clone(), p.key.clone()), pb::KeyOrigin::Unspecified);
            }
        }
        let wanted: Vec<(String, String)> = origins.keys().cloned().collect();
        for chunk in wanted.chunks(500) {
            let lookups = chunk
                .iter()
                .map(|(domain, key)| internal::SecretLookup {
                    scope: pb::Scope::Domain as i32,
                    domain: domain.clone(),
                    key: key.clone(),
                    global_fallback: true,
                })
                .collect();
            for ((domain, key), r) in chunk.iter().zip(self.read(lookups, true).await?) {
                let origin = match (r.found, pb::Scope::try_from(r.found_in)) {
                    (false, _) => pb::KeyOrigin::Missing,
                    (true, Ok(pb::Scope::Global)) => pb::KeyOrigin::Global,
                    (true, _) => pb::KeyOrigin::Domain,
                };
                origins.insert((domain.clone(), key.clone()), origin);
            }
        }
        let workloads = found
            .workloads
            .into_iter()
            .map(|w| pb::LegacyWorkload {
                workload: w.workload,
                placeholders: w
                    .placeholders
                    .into_iter()
                    .map(|p| pb::LegacyPlaceholder {
                        origin: origins.get(&(p.source_id.clone(), p.key.clone())).copied().unwrap_or_default() as i32,
                        field: p.field,
                        key: p.key,
                    })
                    .collect(),
                plaintext_fields: w.plaintext_fields,
            })
            .collect();
        let counts = found
            .counts
            .into_iter()
            .map(|c| pb::LegacyCount {
                kind: c.kind,
                saved: c.saved,
                with_placeholders: c.with_placeholders,
                with_plaintext: c.with_plaintext,
                migrated: c.saved.saturating_sub(c.legacy),
            })
            .collect();
        Ok(pb::ListLegacyReferencesResponse { workloads, total: found.total, counts })
    }
}
