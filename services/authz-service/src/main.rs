use std::path::PathBuf;

use authz_service::{Application, Config};
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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    if let Some(command) = args.command {
        return command.run(config.health_addr.unwrap_or(config.listen_addr), || config.validate()).await;
    }
    let _telemetry = secrets_common::telemetry::init("authz-service", &config.telemetry)?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "authz-service listening");
    app.run_until_stopped(secrets_common::server::shutdown_signal()).await
}
