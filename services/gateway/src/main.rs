use std::{io::Read, path::PathBuf};

use clap::{Parser, Subcommand};
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
    let args = Args::parse();
    match args.command {
        Some(Command::HashToken) => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "no token on standard input");
            println!("{}", secrets_common::auth::TokenHash::of(token).to_hex());
            Ok(())
        }
        Some(Command::Maintenance(command)) => {
            secrets_common::server::run::<gateway::Application>(args.config.as_deref(), Some(command)).await
        }
        None => secrets_common::server::run::<gateway::Application>(args.config.as_deref(), None).await,
    }
}
