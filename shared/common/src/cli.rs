//! The subcommands every service binary has besides running.

use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, clap::Subcommand)]
pub enum Maintenance {
    /// Loads and checks the configuration (file and environment), prints
    /// what is wrong, and exits; starts nothing.
    CheckConfig,
    /// Exits 0 when the service on the configured listen_addr is serving.
    HealthCheck,
}

impl Maintenance {
    pub async fn run(
        self,
        listen_addr: SocketAddr,
        validate: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Self::CheckConfig => {
                validate()?;
                println!("configuration ok");
                Ok(())
            }
            Self::HealthCheck => crate::server::probe(listen_addr).await,
        }
    }
}
