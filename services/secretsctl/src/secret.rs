//! `secretsctl secret`: create, update, list and delete secrets.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use secrets_proto::v1::{self as pb, secret_service_client::SecretServiceClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::Result,
    output::{self, Format},
    value,
};

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Create a secret; the value from stdin, a file or a masked prompt
    #[command(after_help = "Examples:
  printf '%s' \"$DB_PASSWORD\" | secretsctl secret create db_password -d finance -
  secretsctl secret create tls_key -d finance @server.key
  secretsctl secret create api_key -d finance          # prompts, echoing nothing")]
    Create(PutArgs),
    /// Replace a secret's value; the value as for create
    #[command(after_help = "Examples:
  secretsctl secret update db_password -d finance - < new-password.txt
  secretsctl secret update smtp_password --global --from-file smtp.txt")]
    Update(PutArgs),
    /// List the keys of a domain's, the global or the admin secrets (never values)
    #[command(after_help = "Examples:
  secretsctl secret list -d finance
  secretsctl secret list --global -o json")]
    List(ListArgs),
    /// Delete a secret; refused while saved workloads reference it, unless --force
    #[command(after_help = "Examples:
  secretsctl secret delete old_key -d finance
  secretsctl secret delete db_password -d finance --force   # prints the workloads that break")]
    Delete(DeleteArgs),
    /// The saved workloads that reference a secret, and in which field
    #[command(after_help = "Examples:
  secretsctl secret usages warehouse_password -d finance
  secretsctl secret usages smtp_password --global --in-domain finance -o json")]
    Usages(UsagesArgs),
    /// The keys a principal may pick for a workload in a domain, ready to paste
    #[command(after_help = "Needs LIST_SECRETS in the domain; lists its keys, the global keys it does not
shadow, and the keys of each Vault config on which the principal holds USE.

Examples:
  secretsctl secret selectable -d finance
  secretsctl --profile platform --on-behalf-of user:alice secret selectable -d finance -o json")]
    Selectable {
        #[arg(short, long)]
        domain: String,
    },
}

#[derive(Args, Debug)]
pub struct UsagesArgs {
    /// The secret's key
    pub key: String,
    #[command(flatten)]
    pub target: Target,
    /// For a global secret: only this domain's workloads
    #[arg(long, value_name = "DOMAIN", requires = "global")]
    pub in_domain: Option<String>,
}

impl UsagesArgs {
    pub fn request(&self) -> pb::list_secret_usages_request::Secret {
        let (scope, domain) = self.target.scope();
        pb::list_secret_usages_request::Secret::StoreSecret(pb::StoreSecret {
            scope: scope as i32,
            domain,
            key: self.key.clone(),
        })
    }
}

/// Which secrets: a domain's, the global or the admin ones.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// A domain's secrets
    #[arg(short, long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// The global secrets (platform admins)
    #[arg(long)]
    pub global: bool,
    /// The admin secrets (platform admins)
    #[arg(long)]
    pub admin: bool,
}

impl Target {
    fn scope(&self) -> (pb::Scope, String) {
        match (&self.domain, self.global) {
            (Some(d), _) => (pb::Scope::Domain, d.clone()),
            (None, true) => (pb::Scope::Global, String::new()),
            (None, false) => (pb::Scope::Admin, String::new()),
        }
    }
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// The secret's key
    pub key: String,
    /// `-` to read the value from stdin, `@PATH` to read it from a file; left
    /// out: a masked prompt on a terminal, else stdin. A value itself is refused.
    #[arg(value_name = "-|@PATH")]
    pub source: Option<String>,
    /// Read the value from this file
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
    /// Retry a call with the id it had: the service answers the first
    /// outcome instead of acting twice [default: a new id]
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The secret's key
    pub key: String,
    /// Delete even while saved workloads reference it (they are printed)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub target: Target,
    /// Retry a call with the id it had [default: a new id]
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// A workload, as every answer names one.
#[derive(Serialize)]
pub struct Workload {
    pub domain: String,
    pub kind: String,
    pub id: String,
    pub name: String,
}

impl From<pb::WorkloadRef> for Workload {
    fn from(w: pb::WorkloadRef) -> Self {
        let kind = pb::WorkloadKind::try_from(w.kind).unwrap_or_default().as_str_name().to_string();
        Workload { domain: w.domain, kind, id: w.id, name: w.name }
    }
}

/// The saved workloads a change reached, and its revision in the change feed.
#[derive(Serialize)]
pub struct Reach {
    pub total: u32,
    pub revision: u64,
    pub workloads: Vec<Workload>,
}

impl From<pb::SecretReach> for Reach {
    fn from(r: pb::SecretReach) -> Self {
        Reach { total: r.total, revision: r.revision, workloads: r.workloads.into_iter().map(Workload::from).collect() }
    }
}

/// A secret: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Secret {
    pub key: String,
    pub scope: String,
    pub domain: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

fn scope_name(scope: i32) -> String {
    pb::Scope::try_from(scope).unwrap_or_default().as_str_name().trim_start_matches("SCOPE_").to_lowercase()
}

impl From<pb::SecretMetadata> for Secret {
    fn from(m: pb::SecretMetadata) -> Self {
        Secret {
            scope: scope_name(m.scope),
            created_at: output::time(m.created_at.as_ref()),
            updated_at: output::time(m.updated_at.as_ref()),
            reach: m.reach.map(Reach::from),
            key: m.key,
            domain: m.domain,
        }
    }
}

/// What a delete did.
#[derive(Serialize)]
pub struct Deleted {
    pub key: String,
    pub scope: String,
    pub domain: String,
    /// Saved workloads that referenced it (a forced delete): they now fail.
    pub broken: Vec<Workload>,
    pub broken_total: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

fn describe(scope: &str, domain: &str, key: &str) -> String {
    match scope {
        "domain" => format!("secret {key} of domain {domain}"),
        other => format!("{other} secret {key}"),
    }
}

fn print_reach(reach: &Option<Reach>) {
    if let Some(r) = reach {
        match r.total {
            0 => outln!("no saved workload references it"),
            n => {
                outln!("{n} saved workload(s) reference it (change-feed revision {}):", r.revision);
                for w in &r.workloads {
                    outln!("  {} {} {} ({})", w.domain, w.kind, w.id, w.name);
                }
            }
        }
    }
}

pub async fn run(command: SecretCommand, client: SecretServiceClient<Authed>, format: Format) -> Result<()> {
    let mut client = client;
    match command {
        SecretCommand::Usages(_) | SecretCommand::Selectable { .. } => {
            Err(crate::failure::local("usages and the selector are the gateway's"))
        }
        SecretCommand::Create(args) => put(&mut client, args, true, format).await,
        SecretCommand::Update(args) => put(&mut client, args, false, format).await,
        SecretCommand::List(args) => {
            let (scope, domain) = args.target.scope();
            let listed = client.list_secrets(pb::ListSecretsRequest { scope: scope as i32, domain }).await?;
            let secrets: Vec<Secret> = listed.into_inner().secrets.into_iter().map(Secret::from).collect();
            output::print(format, &secrets, |secrets| {
                let rows: Vec<Vec<String>> = secrets
                    .iter()
                    .map(|s| vec![s.key.clone(), s.scope.clone(), s.domain.clone(), s.updated_at.clone()])
                    .collect();
                output::table(&["KEY", "SCOPE", "DOMAIN", "UPDATED"], &rows);
            })
        }
        SecretCommand::Delete(args) => {
            let (scope, domain) = args.target.scope();
            let request = pb::DeleteSecretRequest {
                scope: scope as i32,
                domain: domain.clone(),
                key: args.key.clone(),
                force: args.force,
                request_id: args.request_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            };
            let answer = client.delete_secret(request).await?.into_inner();
            let broken = answer.broken.unwrap_or_default();
            let deleted = Deleted {
                key: args.key,
                scope: scope_name(scope as i32),
                domain,
                broken_total: broken.total,
                broken: broken.workloads.into_iter().map(Workload::from).collect(),
                reach: answer.reach.map(Reach::from),
            };
            output::print(format, &deleted, |d| {
                outln!("deleted {}", describe(&d.scope, &d.domain, &d.key));
                if d.broken_total > 0 {
                    outln!("{} saved workload(s) referenced it and now fail to resolve:", d.broken_total);
                    for w in &d.broken {
                        outln!("  {} {} {} ({})", w.domain, w.kind, w.id, w.name);
                    }
                }
            })
        }
    }
}

async fn put(client: &mut SecretServiceClient<Authed>, args: PutArgs, create: bool, format: Format) -> Result<()> {
    let source = value::source(args.source.as_deref(), args.from_file.clone())?;
    let (scope, domain) = args.target.scope();
    let bytes = value::read(&source, &args.key)?;
    let value = match std::str::from_utf8(&bytes) {
        Ok(text) => pb::secret_value::Kind::Text(text.to_string()),
        Err(_) => pb::secret_value::Kind::Binary(bytes.to_vec()),
    };
    let value = Some(pb::SecretValue { kind: Some(value) });
    let request_id = args.request_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (key, scope_i) = (args.key.clone(), scope as i32);
    let metadata = if create {
        let request = pb::CreateSecretRequest { scope: scope_i, domain: domain.clone(), key, value, request_id };
        client.create_secret(request).await?.into_inner()
    } else {
        let request = pb::UpdateSecretRequest { scope: scope_i, domain: domain.clone(), key, value, request_id };
        client.update_secret(request).await?.into_inner()
    };
    let secret = Secret::from(metadata);
    output::print(format, &secret, |s| {
        let verb = if create { "created" } else { "updated" };
        outln!("{verb} {}", describe(&s.scope, &s.domain, &s.key));
        print_reach(&s.reach);
    })
}
