use std::path::PathBuf;

use clap::Parser;
use secrets_common::cli::Maintenance;

/// Decides who may see, change or use secrets.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file; AUTHZ_SERVICE_* environment variables override it.
    #[arg(long, env = "AUTHZ_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Maintenance>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    secrets_common::server::run::<authz_service::Application>(args.config.as_deref(), args.command).await
}
