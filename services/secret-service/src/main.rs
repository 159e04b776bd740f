use std::path::PathBuf;

use clap::Parser;
use secret_service::{Application, Config, ENV_PREFIX};
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
    // One TLS provider for the whole process (kube and sqlx use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config: Config =
        secrets_common::config::load(args.config.as_deref(), ENV_PREFIX).map_err(anyhow::Error::msg)?;
    if let Some(command) = args.command {
        return command.run(config.health_addr.unwrap_or(config.listen_addr), || config.validate()).await;
    }
    let _telemetry = secrets_common::telemetry::init("secret-service", &config.telemetry)?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "secret-service listening");
    app.run_until_stopped(secrets_common::server::shutdown_signal()).await
}
