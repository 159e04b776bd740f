//! The subcommands every service binary has besides running.

use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, clap::Subcommand)]
pub enum Maintenance {
    /// Loads and checks the configuration (file and environment), prints
    /// what is wrong, and exits; starts nothing.
    CheckConfig,
    /// Exits 0 when the service is serving (asked on health_addr when set,
    /// else on listen_addr).
    HealthCheck,
}

impl Maintenance {
    pub async fn run(
        self,
        probe_addr: SocketAddr,
        validate: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Self::CheckConfig => {
                validate()?;
                println!("configuration ok");
                Ok(())
            }
            Self::HealthCheck => crate::server::probe(probe_addr).await,
        }
    }
}
