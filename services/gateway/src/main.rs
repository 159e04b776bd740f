use std::{io::Read, path::PathBuf};

use clap::{Parser, Subcommand};
use gateway::{Application, Config, ENV_PREFIX};
use secrets_common::cli::Maintenance;

/// The one endpoint platform components and operators call.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file; GATEWAY_* environment variables override it.
    #[arg(long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Reads a token on standard input and prints the `sha256` to put in a
    /// `[[tokens]]` entry of the configuration.
    HashToken,
    #[command(flatten)]
    Maintenance(Maintenance),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(Command::HashToken) = args.command {
        let mut token = String::new();
        std::io::stdin().read_to_string(&mut token)?;
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "no token on standard input");
        println!("{}", secrets_common::auth::TokenHash::of(token).to_hex());
        return Ok(());
    }
    let config: Config =
        secrets_common::config::load(args.config.as_deref(), ENV_PREFIX).map_err(anyhow::Error::msg)?;
    if let Some(Command::Maintenance(command)) = args.command {
        return command.run(config.health_addr.unwrap_or(config.listen_addr), || config.validate()).await;
    }
    let _telemetry = secrets_common::telemetry::init("gateway", &config.telemetry)?;
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "gateway listening");
    app.run_until_stopped(secrets_common::server::shutdown_signal()).await
}
