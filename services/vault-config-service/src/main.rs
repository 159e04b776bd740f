use std::path::PathBuf;

use clap::Parser;
use secrets_common::cli::Maintenance;

/// Read-only HashiCorp Vault / OpenBao KV v2 integrations: configs,
/// credentials, key listing, and values for the gateway's resolver.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file; VAULT_CONFIG_SERVICE_* environment variables override it.
    #[arg(long, env = "VAULT_CONFIG_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Maintenance>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    secrets_common::server::run::<vault_config_service::Application>(args.config.as_deref(), args.command).await
}
