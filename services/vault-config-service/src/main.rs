use std::path::PathBuf;

use clap::Parser;
use secrets_common::cli::Maintenance;
use vault_config_service::{Application, Config};

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
    // One TLS provider for the whole process (kube, sqlx and the Vault client use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    if let Some(command) = args.command {
        return command.run(config.health_addr.unwrap_or(config.listen_addr), || config.validate()).await;
    }
    let _telemetry = secrets_common::telemetry::init("vault-config-service", &config.telemetry)?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "vault-config-service listening");
    app.run_until_stopped(secrets_common::server::shutdown_signal()).await
}
