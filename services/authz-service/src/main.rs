use std::path::PathBuf;

use authz_service::{Application, Config};
use clap::{Parser, Subcommand};

/// Decides who may see, change or use secrets.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file; AUTHZ_SERVICE_* environment variables override it.
    #[arg(long, env = "AUTHZ_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Loads and checks the configuration (file and environment), prints
    /// what is wrong, and exits; starts nothing.
    CheckConfig,
    /// Exits 0 when the service on the configured listen_addr is serving.
    HealthCheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    match args.command {
        Some(Command::HealthCheck) => return secrets_common::server::probe(config.listen_addr).await,
        Some(Command::CheckConfig) => {
            config.validate()?;
            println!("configuration ok");
            return Ok(());
        }
        _ => {}
    }
    let _telemetry = secrets_common::telemetry::init("authz-service", &config.telemetry)?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "authz-service listening");
    app.run_until_stopped(secrets_common::server::shutdown_signal()).await
}
