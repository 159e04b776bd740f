//! `secretsctl check`: may a subject do something, and why.

use clap::{Args, ValueEnum};
use secrets_proto::v1::{self as pb, authz_service_client::AuthzServiceClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::Result,
    output::{self, Format},
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Permission {
    ListSecrets,
    ManageSecrets,
    UseSecrets,
    ManageDomainAccess,
    PlatformAdmin,
    View,
    Update,
    Use,
    ManageBundle,
}

impl From<Permission> for pb::Permission {
    fn from(p: Permission) -> Self {
        match p {
            Permission::ListSecrets => pb::Permission::ListSecrets,
            Permission::ManageSecrets => pb::Permission::ManageSecrets,
            Permission::UseSecrets => pb::Permission::UseSecrets,
            Permission::ManageDomainAccess => pb::Permission::ManageDomainAccess,
            Permission::PlatformAdmin => pb::Permission::PlatformAdmin,
            Permission::View => pb::Permission::View,
            Permission::Update => pb::Permission::Update,
            Permission::Use => pb::Permission::Use,
            Permission::ManageBundle => pb::Permission::ManageBundle,
        }
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  secretsctl check user:alice manage-secrets -d finance
  secretsctl check user:bob use --vault-config 3f2a... -o json
  secretsctl check user:carol view --bundle finance-vault --group group:analysts")]
pub struct CheckArgs {
    /// Who: user:NAME or service:NAME
    pub subject: String,
    /// What
    #[arg(value_enum)]
    pub permission: Permission,
    /// The domain, for the domain permissions
    #[arg(short, long)]
    pub domain: Option<String>,
    /// A Vault config, for view, update and use
    #[arg(long, value_name = "ID")]
    pub vault_config: Option<String>,
    /// A bundle, for manage-bundle (or view, update and use on a whole bundle)
    #[arg(long)]
    pub bundle: Option<String>,
    /// A group the subject belongs to at its identity provider (repeatable)
    #[arg(long = "group", value_name = "group:NAME")]
    pub groups: Vec<String>,
}

/// A decision: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Decision {
    pub subject: String,
    pub permission: String,
    pub allowed: bool,
    /// The grant that allowed it, or what is missing.
    pub reason: String,
}

pub async fn run(args: CheckArgs, client: AuthzServiceClient<Authed>, format: Format) -> Result<()> {
    let mut client = client;
    let permission = pb::Permission::from(args.permission);
    let request = pb::CheckRequest {
        subject: args.subject.clone(),
        permission: permission as i32,
        domain: args.domain.unwrap_or_default(),
        resource: args.vault_config.map(|id| pb::Resource { r#type: pb::ResourceType::VaultConfig as i32, id }),
        bundle: args.bundle.unwrap_or_default(),
        groups: args.groups,
    };
    let answer = client.check(request).await?.into_inner();
    let decision = Decision {
        subject: args.subject,
        permission: permission.as_str_name().to_string(),
        allowed: answer.allowed,
        reason: answer.reason,
    };
    output::print(format, &decision, |d| {
        let verdict = if d.allowed { "allowed" } else { "denied" };
        outln!("{verdict}: {} {}: {}", d.subject, d.permission, d.reason);
    })
}
