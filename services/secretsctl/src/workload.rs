//! `secretsctl workload`: check a payload's references, save it to the
//! usage index, list what it references, delete it; and `resolve`, which
//! shows values only to platform-service credentials and only with
//! `--reveal`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use secrets_proto::v1::{self as pb, gateway_client::GatewayClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::{Result, local},
    output::{self, Format},
    payload,
    secret::Workload,
};

/// A workload kind on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    Compute,
    SparkJob,
    StreamingJob,
    SdkSparkJob,
    JupyterContainer,
    StorageConfig,
    EmailSettings,
    LdapIntegration,
}

impl KindArg {
    pub fn proto(self) -> pb::WorkloadKind {
        match self {
            KindArg::Compute => pb::WorkloadKind::Compute,
            KindArg::SparkJob => pb::WorkloadKind::SparkJob,
            KindArg::StreamingJob => pb::WorkloadKind::StreamingJob,
            KindArg::SdkSparkJob => pb::WorkloadKind::SdkSparkJob,
            KindArg::JupyterContainer => pb::WorkloadKind::JupyterContainer,
            KindArg::StorageConfig => pb::WorkloadKind::StorageConfig,
            KindArg::EmailSettings => pb::WorkloadKind::EmailSettings,
            KindArg::LdapIntegration => pb::WorkloadKind::LdapIntegration,
        }
    }
}

/// A workload kind as printed: its API name (`WORKLOAD_KIND_SPARK_JOB`).
pub fn kind_name(kind: i32) -> String {
    pb::WorkloadKind::try_from(kind).unwrap_or_default().as_str_name().to_string()
}

#[derive(Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Check a payload's references as a save would, recording nothing
    #[command(after_help = "The payload is JSON, one kind at the top, as SaveWorkload takes it (see the README's
\"Workload payloads\"). Exit code 4 when a reference has a problem.

Examples:
  secretsctl workload validate -d finance -f job.json
  secretsctl workload validate -d finance -f job.json --on-behalf-of user:alice -o json")]
    Validate {
        #[arg(short, long)]
        domain: String,
        /// The payload (JSON); `-` for stdin
        #[arg(short, long, value_name = "PATH")]
        file: PathBuf,
        /// The workload's id [default: the file's name without .json]
        #[arg(long)]
        id: Option<String>,
    },
    /// Save a workload to the usage index once its references check out
    /// (platform services and platform admins)
    #[command(after_help = "Examples:
  secretsctl workload save -d finance -f job.json --id nightly-etl --name \"Nightly ETL\"
  secretsctl --profile platform workload save -d finance -f job.json --id nightly-etl --on-behalf-of user:alice")]
    Save {
        #[arg(short, long)]
        domain: String,
        /// The payload (JSON); `-` for stdin
        #[arg(short, long, value_name = "PATH")]
        file: PathBuf,
        /// The platform's id of the workload
        #[arg(long)]
        id: String,
        /// For people [default: the id]
        #[arg(long)]
        name: Option<String>,
    },
    /// The references a saved workload made
    #[command(after_help = "Examples:\n  secretsctl workload references spark-job nightly-etl -d finance")]
    References {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
        #[arg(short, long)]
        domain: String,
    },
    /// Remove a deleted workload from the usage index
    #[command(after_help = "Examples:\n  secretsctl workload delete spark-job nightly-etl -d finance")]
    Delete {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
        #[arg(short, long)]
        domain: String,
    },
}

/// A payload's check: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Checked {
    pub domain: String,
    pub id: String,
    pub kind: String,
    pub saved: bool,
    pub problems: Vec<Problem>,
    pub references: Vec<Reference>,
}

#[derive(Serialize)]
pub struct Problem {
    pub field: String,
    /// `not-found`, `permission-denied`, `backend-unavailable`, `malformed`, `feature-disabled`
    pub r#type: String,
    pub message: String,
}

#[derive(Serialize)]
pub struct Reference {
    pub field: String,
    pub key: String,
    /// `kubernetes` or `vault`
    pub source: String,
    pub source_id: String,
    pub placeholder: bool,
}

pub fn problem_type(t: i32) -> String {
    let name = pb::ProblemType::try_from(t).map(|t| t.as_str_name()).unwrap_or("PROBLEM_TYPE_UNSPECIFIED");
    name.trim_start_matches("PROBLEM_").to_ascii_lowercase().replace('_', "-")
}

pub fn source_name(t: i32) -> String {
    pb::SourceType::try_from(t).map(|t| t.as_str_name()).unwrap_or("").to_ascii_lowercase()
}

pub fn reference(r: pb::WorkloadReference) -> Reference {
    let object = r.secret_object.unwrap_or_default();
    let source = object.source.unwrap_or_default();
    Reference {
        field: r.field,
        key: object.key,
        source: source_name(source.r#type),
        source_id: source.id,
        placeholder: r.placeholder,
    }
}

fn print_references(references: &[Reference]) {
    let rows: Vec<Vec<String>> = references
        .iter()
        .map(|r| {
            let how = if r.placeholder { "placeholder" } else { "secret object" };
            vec![r.field.clone(), r.key.clone(), format!("{} {}", r.source, r.source_id), how.to_string()]
        })
        .collect();
    output::table(&["FIELD", "KEY", "SOURCE", "AS"], &rows);
}

fn default_id(file: &std::path::Path) -> String {
    file.file_stem().map(|s| s.to_string_lossy().into_owned()).filter(|s| s != "-").unwrap_or_else(|| "draft".into())
}

pub async fn run(command: WorkloadCommand, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    let (domain, id, name, file, validate_only) = match command {
        WorkloadCommand::Validate { domain, file, id } => {
            let id = id.unwrap_or_else(|| default_id(&file));
            (domain, id, None, file, true)
        }
        WorkloadCommand::Save { domain, file, id, name } => (domain, id, name, file, false),
        WorkloadCommand::References { kind, id, domain } => {
            let r = client
                .get_workload_references(pb::GetWorkloadReferencesRequest { domain, kind: kind.proto() as i32, id })
                .await?
                .into_inner();
            #[derive(Serialize)]
            struct Saved {
                workload: Workload,
                saved_by: String,
                owner: String,
                references: Vec<Reference>,
            }
            let saved = Saved {
                workload: Workload::from(r.workload.unwrap_or_default()),
                saved_by: r.saved_by,
                owner: r.owner,
                references: r.references.into_iter().map(reference).collect(),
            };
            output::print(format, &saved, |s| {
                outln!(
                    "{} {} {} ({}), owner {}, saved for {}",
                    s.workload.domain,
                    s.workload.kind,
                    s.workload.id,
                    s.workload.name,
                    s.owner,
                    s.saved_by
                );
                print_references(&s.references);
            })?;
            return Ok(0);
        }
        WorkloadCommand::Delete { kind, id, domain } => {
            let removed = client
                .delete_workload(pb::DeleteWorkloadRequest {
                    domain: domain.clone(),
                    kind: kind.proto() as i32,
                    id: id.clone(),
                })
                .await?
                .into_inner()
                .removed;
            #[derive(Serialize)]
            struct Deleted {
                removed: bool,
            }
            output::print(format, &Deleted { removed }, |d| match d.removed {
                true => outln!("removed {domain} {} {id} from the usage index", kind_name(kind.proto() as i32)),
                false => outln!("the usage index did not hold {domain} {} {id}", kind_name(kind.proto() as i32)),
            })?;
            return Ok(0);
        }
    };
    let payload = payload::read(&file)?;
    let kind = kind_name(payload.workload_kind() as i32);
    let answer = client
        .save_workload(pb::SaveWorkloadRequest {
            domain: domain.clone(),
            id: id.clone(),
            name: name.unwrap_or_default(),
            payload: Some(payload),
            validate_only,
        })
        .await?
        .into_inner();
    let checked = Checked {
        domain,
        id,
        kind,
        saved: answer.saved,
        problems: answer
            .problems
            .into_iter()
            .map(|p| Problem { field: p.field, r#type: problem_type(p.r#type), message: p.message })
            .collect(),
        references: answer.references.into_iter().map(reference).collect(),
    };
    output::print(format, &checked, |c| {
        let what = format!("{} {} {}", c.domain, c.kind, c.id);
        match (c.problems.len(), c.saved) {
            (0, true) => outln!("saved {what}: {} reference(s), each checked", c.references.len()),
            (0, false) => outln!("{what}: {} reference(s), no problem (nothing recorded)", c.references.len()),
            (n, _) => {
                outln!("{what}: {n} problem(s), nothing recorded");
                let rows: Vec<Vec<String>> =
                    c.problems.iter().map(|p| vec![p.field.clone(), p.r#type.clone(), p.message.clone()]).collect();
                output::table(&["FIELD", "PROBLEM", "MESSAGE"], &rows);
                return;
            }
        }
        if !c.references.is_empty() {
            print_references(&c.references);
        }
    })?;
    Ok(if checked.problems.is_empty() { 0 } else { 4 })
}

/// `secretsctl resolve`: what a platform component receives at launch.
#[derive(Args, Debug)]
#[command(after_help = "Values are returned only to platform-service credentials acting for a principal
(--on-behalf-of), and printed only with --reveal; without it each item's outcome is
printed. Exit code 4 when an item did not resolve.

Examples:
  secretsctl --profile platform resolve -d finance db_password --on-behalf-of user:alice
  secretsctl --profile platform resolve -d finance --text 'jdbc:postgresql://etl:${secrets.etl_password}@db/wh' --reveal
  secretsctl --profile platform resolve -d finance -f job.json --on-behalf-of user:alice --reveal -o json")]
pub struct ResolveArgs {
    /// The workload's domain
    #[arg(short, long)]
    pub domain: String,
    /// Keys to resolve as the workload's domain would (its key, else the
    /// global one); `vault:CONFIG_ID/KEY` for a Vault config's key
    #[arg(conflicts_with = "file", required_unless_present_any = ["file", "texts"])]
    pub keys: Vec<String>,
    /// Text with legacy ${secrets.KEY} placeholders, returned with each
    /// replaced (repeatable)
    #[arg(long = "text", value_name = "TEXT", conflicts_with = "file")]
    pub texts: Vec<String>,
    /// A workload payload (JSON) to resolve instead; `-` for stdin
    #[arg(short, long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Print the values (otherwise only whether each resolved)
    #[arg(long)]
    pub reveal: bool,
}

#[derive(Serialize)]
struct Resolved {
    id: String,
    resolved: bool,
    /// With --reveal: the value (text; bytes that are not UTF-8 as base64 in `value_base64`)
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn resolve(args: ResolveArgs, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    if let Some(file) = &args.file {
        let payload = payload::read(file)?;
        let answer = client
            .resolve_workload(pb::ResolveWorkloadRequest { domain: args.domain.clone(), payload: Some(payload) })
            .await?
            .into_inner();
        #[derive(Serialize)]
        struct Errors {
            field: String,
            error: String,
        }
        let errors: Vec<Errors> = answer
            .errors
            .into_iter()
            .map(|e| Errors { field: e.field, error: e.error.map(|s| s.message).unwrap_or_default() })
            .collect();
        let failed = !errors.is_empty();
        #[derive(Serialize)]
        struct Workload {
            #[serde(skip_serializing_if = "Option::is_none")]
            payload: Option<serde_json::Value>,
            errors: Vec<Errors>,
        }
        let shown =
            Workload { payload: args.reveal.then(|| payload::to_json(&answer.payload.unwrap_or_default())), errors };
        output::print(format, &shown, |w| {
            match &w.payload {
                Some(p) => outln!("{}", serde_json::to_string_pretty(p).unwrap_or_default()),
                None if w.errors.is_empty() => outln!("every reference resolved (values not shown: --reveal)"),
                None => {}
            }
            for e in &w.errors {
                outln!("{}: {}", e.field, e.error);
            }
        })?;
        return Ok(if failed { 4 } else { 0 });
    }
    let items = args
        .keys
        .iter()
        .map(|k| {
            let object = match k.strip_prefix("vault:").and_then(|rest| rest.split_once('/')) {
                Some((config, key)) => pb::SecretObject {
                    key: key.to_string(),
                    source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: config.to_string() }),
                },
                None if k.starts_with("vault:") => return Err(local("a Vault key is vault:CONFIG_ID/KEY")),
                None => pb::SecretObject {
                    key: k.clone(),
                    source: Some(pb::SecretSource {
                        r#type: pb::SourceType::Kubernetes as i32,
                        id: args.domain.clone(),
                    }),
                },
            };
            Ok(pb::ResolveItem { id: k.clone(), reference: Some(pb::resolve_item::Reference::SecretObject(object)) })
        })
        .chain(args.texts.iter().enumerate().map(|(i, t)| {
            Ok(pb::ResolveItem {
                id: format!("text[{i}]"),
                reference: Some(pb::resolve_item::Reference::Text(t.clone())),
            })
        }))
        .collect::<Result<Vec<_>>>()?;
    let answer =
        client.resolve_secrets(pb::ResolveSecretsRequest { domain: args.domain.clone(), items }).await?.into_inner();
    let mut failed = false;
    let shown: Vec<Resolved> = answer
        .items
        .into_iter()
        .map(|item| {
            let mut r = Resolved { id: item.id, resolved: false, value: None, value_base64: None, error: None };
            match item.result {
                Some(pb::resolved_item::Result::Value(v)) => {
                    r.resolved = true;
                    if args.reveal {
                        match String::from_utf8(v) {
                            Ok(text) => r.value = Some(text),
                            Err(e) => r.value_base64 = Some(base64(e.as_bytes())),
                        }
                    }
                }
                Some(pb::resolved_item::Result::Text(t)) => {
                    r.resolved = true;
                    r.value = args.reveal.then_some(t);
                }
                Some(pb::resolved_item::Result::Error(s)) => {
                    failed = true;
                    r.error = Some(s.message);
                }
                None => failed = true,
            }
            r
        })
        .collect();
    output::print(format, &shown, |items| {
        for r in items {
            match (&r.error, &r.value, &r.value_base64) {
                (Some(e), _, _) => outln!("{}: error: {e}", r.id),
                (None, Some(v), _) => outln!("{}: {v}", r.id),
                (None, None, Some(b)) => outln!("{}: (base64) {b}", r.id),
                (None, None, None) => outln!("{}: resolved (value not shown: --reveal)", r.id),
            }
        }
    })?;
    Ok(if failed { 4 } else { 0 })
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The saved workloads that reference a secret: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Usages {
    pub total: u32,
    pub usages: Vec<Usage>,
}

#[derive(Serialize)]
pub struct Usage {
    pub workload: Workload,
    pub references: Vec<Reference>,
}

/// `secret usages` and `vault usages`.
pub async fn usages(
    secret: pb::list_secret_usages_request::Secret,
    domain: Option<String>,
    mut client: GatewayClient<Authed>,
    format: Format,
) -> Result<u8> {
    let answer = client
        .list_secret_usages(pb::ListSecretUsagesRequest {
            secret: Some(secret),
            domain: domain.unwrap_or_default(),
            limit: 1000,
        })
        .await?
        .into_inner();
    let usages = Usages {
        total: answer.total,
        usages: answer
            .usages
            .into_iter()
            .map(|u| Usage {
                workload: Workload::from(u.workload.unwrap_or_default()),
                references: u.references.into_iter().map(reference).collect(),
            })
            .collect(),
    };
    output::print(format, &usages, |u| {
        outln!("{} saved workload(s) reference it", u.total);
        let rows: Vec<Vec<String>> = u
            .usages
            .iter()
            .flat_map(|usage| {
                usage.references.iter().map(|r| {
                    let w = &usage.workload;
                    vec![w.domain.clone(), w.kind.clone(), w.id.clone(), w.name.clone(), r.field.clone()]
                })
            })
            .collect();
        if !rows.is_empty() {
            output::table(&["DOMAIN", "KIND", "ID", "NAME", "FIELD"], &rows);
        }
    })?;
    Ok(0)
}

/// `secret selectable`: the secret selector.
pub async fn selectable(domain: String, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    let answer = client.list_selectable_secrets(pb::ListSelectableSecretsRequest { domain }).await?.into_inner();
    #[derive(Serialize)]
    struct Selectable {
        key: String,
        source: String,
        source_id: String,
        label: String,
        /// For domain and global keys: the legacy `${secrets.KEY}` form.
        placeholder: String,
    }
    #[derive(Serialize)]
    struct Unreadable {
        source: String,
        source_id: String,
        label: String,
        error: String,
    }
    #[derive(Serialize)]
    struct Listed {
        secrets: Vec<Selectable>,
        errors: Vec<Unreadable>,
    }
    let listed = Listed {
        secrets: answer
            .secrets
            .into_iter()
            .map(|s| {
                let object = s.secret_object.unwrap_or_default();
                let source = object.source.unwrap_or_default();
                Selectable {
                    key: object.key,
                    source: source_name(source.r#type),
                    source_id: source.id,
                    label: s.label,
                    placeholder: s.placeholder,
                }
            })
            .collect(),
        errors: answer
            .errors
            .into_iter()
            .map(|e| {
                let source = e.source.unwrap_or_default();
                Unreadable {
                    source: source_name(source.r#type),
                    source_id: source.id,
                    label: e.label,
                    error: e.error.map(|s| s.message).unwrap_or_default(),
                }
            })
            .collect(),
    };
    output::print(format, &listed, |l| {
        let rows: Vec<Vec<String>> = l
            .secrets
            .iter()
            .map(|s| {
                vec![s.key.clone(), s.label.clone(), format!("{} {}", s.source, s.source_id), s.placeholder.clone()]
            })
            .collect();
        output::table(&["KEY", "FROM", "SOURCE", "PLACEHOLDER"], &rows);
        for e in &l.errors {
            eprintln!("warning: {} ({} {}) could not be read: {}", e.label, e.source, e.source_id, e.error);
        }
    })?;
    Ok(0)
}
