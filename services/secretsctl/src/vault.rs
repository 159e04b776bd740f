//! `secretsctl vault`: a domain's read-only Vault (KV v2) integrations.
//! Credentials (a token, an AppRole secret id) are read like values: from
//! stdin, a file or a masked prompt, never from the command line.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use secrets_proto::v1::{self as pb, vault_config_service_client::VaultConfigServiceClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::{Result, local},
    output::{self, Format},
    secret::Workload,
    value,
};

type Client = VaultConfigServiceClient<Authed>;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Auth {
    /// A Vault token
    Token,
    /// AppRole: --role-id, the secret id read like a value
    AppRole,
}

/// How the service logs in to Vault; the credential read from stdin, a file or a prompt.
#[derive(Args, Debug)]
pub struct Credentials {
    /// How to log in to Vault
    #[arg(long, value_enum)]
    pub auth: Option<Auth>,
    /// The AppRole role id (not a secret)
    #[arg(long, value_name = "ID")]
    pub role_id: Option<String>,
    /// The AppRole auth mount [default: approle]
    #[arg(long, value_name = "MOUNT")]
    pub approle_mount: Option<String>,
    /// The token or secret id: `-` for stdin, `@PATH` for a file; left out,
    /// a masked prompt on a terminal, else stdin. The credential itself is refused.
    #[arg(value_name = "-|@PATH")]
    pub source: Option<String>,
    /// Read the token or secret id from this file
    #[arg(long, value_name = "PATH")]
    pub credentials_file: Option<PathBuf>,
}

impl Credentials {
    /// The credentials to send: `None` when no --auth was given.
    fn read(&self) -> Result<Option<pb::VaultCredentials>> {
        let Some(auth) = self.auth else {
            if self.source.is_some() || self.credentials_file.is_some() || self.role_id.is_some() {
                return Err(local(
                    "credentials need --auth token or --auth app-role, and the token or secret id itself on stdin \
                     (`-`), from a file (`@PATH` or --credentials-file) or at the prompt; never as an argument",
                ));
            }
            return Ok(None);
        };
        let source = value::source(self.source.as_deref(), self.credentials_file.clone())?;
        let method = match auth {
            Auth::Token => {
                let token = value::read_credential(&source, "the Vault token")?;
                pb::vault_credentials::Method::Token(token.to_string())
            }
            Auth::AppRole => {
                let role_id = self.role_id.clone().ok_or_else(|| local("--auth app-role needs --role-id"))?;
                let secret_id = value::read_credential(&source, "the AppRole secret id")?.to_string();
                pb::vault_credentials::Method::AppRole(pb::AppRoleCredentials {
                    role_id,
                    secret_id,
                    mount: self.approle_mount.clone().unwrap_or_default(),
                })
            }
        };
        Ok(Some(pb::VaultCredentials { method: Some(method) }))
    }
}

fn read_ca(path: &Option<PathBuf>) -> Result<Option<String>> {
    path.as_ref()
        .map(|p| std::fs::read_to_string(p).map_err(|e| local(format!("--vault-ca-file {}: {e}", p.display()))))
        .transpose()
}

#[derive(Subcommand, Debug)]
pub enum VaultCommand {
    /// A domain's Vault configs (those you may view)
    #[command(after_help = "Examples:\n  secretsctl vault list -d finance")]
    List {
        #[arg(short, long)]
        domain: String,
    },
    /// One config (never its credentials)
    #[command(after_help = "Examples:\n  secretsctl vault get 3f2a... -o json")]
    Get { id: String },
    /// The keys of the config's Vault secret (never values)
    #[command(after_help = "Examples:\n  secretsctl vault keys 3f2a...")]
    Keys { id: String },
    /// Test a saved config's connection: prints the classified outcome
    #[command(after_help = "Exit codes: 0 CONNECTION_OK; 2 INVALID_CREDENTIALS or NO_ACCESS_TO_PATH;
3 SECRET_NOT_FOUND or NAMESPACE_NOT_FOUND; 4 NOT_KV_V2; 5 UNREACHABLE, TIMED_OUT,
TLS_FAILURE or SEALED.

Examples:
  secretsctl vault test 3f2a...")]
    Test { id: String },
    /// Create a config in a domain's bundle; the credential from stdin, a file or a prompt
    #[command(after_help = "Examples:
  secretsctl vault create prod -d finance --bundle finance-vault \\
    --host https://vault.example.com:8200 --path /v1/secret/data/production \\
    --auth token - < vault.token
  secretsctl vault create prod -d finance --bundle finance-vault --host http://127.0.0.1:8200 \\
    --path /v1/secret/data/production --auth app-role --role-id 6c1f... @secret-id.txt")]
    Create {
        name: String,
        #[arg(short, long)]
        domain: String,
        /// The bundle whose grants decide who may use it
        #[arg(long)]
        bundle: String,
        /// Vault's address, e.g. https://vault.example.com:8200
        #[arg(long)]
        host: String,
        /// The KV v2 secret, e.g. /v1/secret/data/production
        #[arg(long)]
        path: String,
        /// A Vault Enterprise / OpenBao namespace
        #[arg(long)]
        namespace: Option<String>,
        /// A CA certificate (PEM) to trust for Vault's TLS
        #[arg(long, value_name = "PATH")]
        vault_ca_file: Option<PathBuf>,
        #[command(flatten)]
        credentials: Credentials,
    },
    /// Change a config; credentials only with --auth
    #[command(after_help = "Examples:
  secretsctl vault update 3f2a... --path /v1/secret/data/staging
  secretsctl vault update 3f2a... --auth token - < new.token")]
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        bundle: Option<String>,
        #[arg(long, value_name = "PATH")]
        vault_ca_file: Option<PathBuf>,
        #[command(flatten)]
        credentials: Credentials,
    },
    /// Delete a config; refused while saved workloads use it, unless --force
    #[command(after_help = "Examples:\n  secretsctl vault delete 3f2a... --force")]
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// The saved workloads that use a config's keys (or one key)
    #[command(after_help = "Examples:\n  secretsctl vault usages 3f2a... --key db_password")]
    Usages {
        id: String,
        /// Only this key
        #[arg(long)]
        key: Option<String>,
    },
}

/// A Vault config: `-o json` prints these fields (never a credential).
#[derive(Serialize)]
pub struct VaultConfig {
    pub id: String,
    pub domain: String,
    pub name: String,
    pub bundle: String,
    pub host: String,
    pub path: String,
    pub namespace: String,
    pub has_ca_certificate: bool,
    /// TOKEN or APP_ROLE.
    pub auth_method: String,
    pub credentials_set: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<pb::VaultConfig> for VaultConfig {
    fn from(c: pb::VaultConfig) -> Self {
        VaultConfig {
            auth_method: pb::VaultAuthMethod::try_from(c.auth_method).unwrap_or_default().as_str_name().to_string(),
            created_at: output::time(c.created_at.as_ref()),
            updated_at: output::time(c.updated_at.as_ref()),
            id: c.id,
            domain: c.domain,
            name: c.name,
            bundle: c.bundle,
            host: c.host,
            path: c.path,
            namespace: c.namespace,
            has_ca_certificate: c.has_ca_certificate,
            credentials_set: c.credentials_set,
        }
    }
}

fn print_configs(format: Format, configs: Vec<VaultConfig>) -> Result<()> {
    output::print(format, &configs, |configs| {
        let rows: Vec<Vec<String>> = configs
            .iter()
            .map(|c| vec![c.id.clone(), c.name.clone(), c.bundle.clone(), c.host.clone(), c.path.clone()])
            .collect();
        output::table(&["ID", "NAME", "BUNDLE", "HOST", "PATH"], &rows);
    })
}

/// A connection test: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Tested {
    pub outcome: String,
    pub message: String,
    pub key_count: u32,
}

/// What a delete did.
#[derive(Serialize)]
pub struct Deleted {
    pub id: String,
    pub broken: Vec<Workload>,
    pub broken_total: u32,
}

/// The exit code of a connection test's outcome.
fn outcome_code(outcome: pb::VaultConnectionOutcome) -> u8 {
    use pb::VaultConnectionOutcome as O;
    match outcome {
        O::ConnectionOk => 0,
        O::InvalidCredentials | O::NoAccessToPath => 2,
        O::SecretNotFound | O::NamespaceNotFound => 3,
        O::NotKvV2 => 4,
        O::Unreachable | O::TimedOut | O::TlsFailure | O::Sealed => 5,
        O::Unspecified => 6,
    }
}

/// Runs `command`; the exit code (a connection test's outcome sets it).
pub async fn run(command: VaultCommand, mut client: Client, format: Format) -> Result<u8> {
    let config = match command {
        VaultCommand::Usages { .. } => return Err(local("usages are the gateway's")),
        VaultCommand::List { domain } => {
            let listed = client.list_vault_configs(pb::ListVaultConfigsRequest { domain }).await?.into_inner();
            print_configs(format, listed.configs.into_iter().map(VaultConfig::from).collect())?;
            return Ok(0);
        }
        VaultCommand::Get { id } => client.get_vault_config(pb::GetVaultConfigRequest { id }).await?.into_inner(),
        VaultCommand::Keys { id } => {
            let keys = client.list_vault_keys(pb::ListVaultKeysRequest { id }).await?.into_inner().keys;
            output::print(format, &keys, |keys| keys.iter().for_each(|k| outln!("{k}")))?;
            return Ok(0);
        }
        VaultCommand::Test { id } => {
            let request =
                pb::TestVaultConnectionRequest { target: Some(pb::test_vault_connection_request::Target::Id(id)) };
            let answer = client.test_vault_connection(request).await?.into_inner();
            let outcome = pb::VaultConnectionOutcome::try_from(answer.outcome).unwrap_or_default();
            let tested = Tested {
                outcome: outcome.as_str_name().to_string(),
                message: answer.message,
                key_count: answer.key_count,
            };
            output::print(format, &tested, |t| {
                outln!("{}: {}", t.outcome, t.message);
                if t.outcome == "CONNECTION_OK" {
                    outln!("{} key(s)", t.key_count);
                }
            })?;
            return Ok(outcome_code(outcome));
        }
        VaultCommand::Create { name, domain, bundle, host, path, namespace, vault_ca_file, credentials } => {
            let spec = pb::VaultConfigSpec {
                name,
                host,
                path,
                namespace: namespace.unwrap_or_default(),
                ca_certificate: read_ca(&vault_ca_file)?.unwrap_or_default(),
                credentials: Some(
                    credentials
                        .read()?
                        .ok_or_else(|| local("a Vault config needs credentials: --auth token or app-role"))?,
                ),
            };
            let request = pb::CreateVaultConfigRequest { domain, bundle, spec: Some(spec) };
            client.create_vault_config(request).await?.into_inner()
        }
        VaultCommand::Update { id, name, host, path, namespace, bundle, vault_ca_file, credentials } => {
            let request = pb::UpdateVaultConfigRequest {
                id,
                name,
                host,
                path,
                namespace,
                ca_certificate: read_ca(&vault_ca_file)?,
                credentials: credentials.read()?,
                bundle,
            };
            client.update_vault_config(request).await?.into_inner()
        }
        VaultCommand::Delete { id, force } => {
            let answer = client.delete_vault_config(pb::DeleteVaultConfigRequest { id: id.clone(), force }).await?;
            let broken = answer.into_inner().broken.unwrap_or_default();
            let deleted = Deleted {
                id,
                broken_total: broken.total,
                broken: broken.workloads.into_iter().map(Workload::from).collect(),
            };
            output::print(format, &deleted, |d| {
                outln!("deleted Vault config {}", d.id);
                if d.broken_total > 0 {
                    outln!("{} saved workload(s) used it and now fail to resolve:", d.broken_total);
                    for w in &d.broken {
                        outln!("  {} {} {} ({})", w.domain, w.kind, w.id, w.name);
                    }
                }
            })?;
            return Ok(0);
        }
    };
    print_configs(format, vec![VaultConfig::from(config)])?;
    Ok(0)
}
