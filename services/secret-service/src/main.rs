use std::path::PathBuf;

use clap::Parser;
use secrets_common::cli::Maintenance;

/// Stores domain, global and admin secrets (Kubernetes Secrets or an
/// encrypted embedded store) and serves them only to the gateway.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file; SECRET_SERVICE_* environment variables override it.
    #[arg(long, env = "SECRET_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Maintenance>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    secrets_common::server::run::<secret_service::Application>(args.config.as_deref(), args.command).await
}
