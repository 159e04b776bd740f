//! Runs the whole control plane locally on embedded defaults: SQLite for the
//! authz service, the encrypted embedded store for secrets, every service on
//! its own port. Data and generated tokens live in the data directory, so a
//! restart keeps everything.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::Context;
use clap::Parser;
use secrecy::SecretString;
use secrets_common::{
    auth::{TokenHash, generate_token},
    telemetry::{self, LogFormat, TelemetryConfig},
};

#[derive(Parser)]
#[command(version, about = "Runs the secrets control plane locally on embedded defaults")]
struct Args {
    /// Where the database, the encrypted secrets and the tokens are kept.
    #[arg(long, env = "LOCAL_STACK_DATA_DIR", default_value = ".local-stack")]
    data_dir: PathBuf,
    #[arg(long, env = "LOCAL_STACK_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, env = "LOCAL_STACK_GATEWAY_PORT", default_value_t = 50051)]
    gateway_port: u16,
    #[arg(long, env = "LOCAL_STACK_SECRET_SERVICE_PORT", default_value_t = 50052)]
    secret_service_port: u16,
    #[arg(long, env = "LOCAL_STACK_AUTHZ_SERVICE_PORT", default_value_t = 50053)]
    authz_service_port: u16,
    #[arg(long, env = "LOCAL_STACK_VAULT_CONFIG_SERVICE_PORT", default_value_t = 50054)]
    vault_config_service_port: u16,
    /// Export traces over OTLP/gRPC, e.g. http://127.0.0.1:4317.
    #[arg(long, env = "LOCAL_STACK_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// `human` or `json` log lines.
    #[arg(long, env = "LOCAL_STACK_LOG_FORMAT", default_value = "human", value_parser = parse_format)]
    log_format: LogFormat,
}

fn parse_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "human" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?} is not a log format; use human or json")),
    }
}

/// A token kept in the data directory (mode 0600), created on first start.
#[expect(clippy::disallowed_methods, reason = "runs once, at startup")]
fn token_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("{} is empty; delete it to have a new token generated", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let token = generate_token();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(token)
}

/// secretsctl's profiles for this stack (mode 0600), written at every start:
/// `admin` (the current one) and `platform`, each with its token file.
#[expect(clippy::disallowed_methods, reason = "runs once, at startup")]
fn secretsctl_profiles(dir: &Path, gateway: &str) -> anyhow::Result<()> {
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    let token = |name: &str| quoted(&dir.join(name).display().to_string());
    let text = format!(
        "# secretsctl's profiles for this local stack (rewritten at every start)\n\
         current = \"admin\"\n\n\
         [profiles.admin]\naddr = {gateway}\ntoken_file = {admin}\n\n\
         [profiles.platform]\naddr = {gateway}\ntoken_file = {platform}\n",
        gateway = quoted(gateway),
        admin = token("admin.token"),
        platform = token("platform-service.token"),
    );
    // Written whole beside it, then renamed into place: a reader never
    // sees half a file.
    let path = dir.join("secretsctl.toml");
    let partial = dir.join("secretsctl.toml.partial");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let _telemetry = telemetry::init(
        "secrets-local-stack",
        &TelemetryConfig {
            log_level: "info".into(),
            log_format: args.log_format,
            otlp_endpoint: args.otlp_endpoint.clone(),
        },
    )?;

    #[expect(clippy::disallowed_methods, reason = "runs once, at startup")]
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = tokio::fs::canonicalize(&args.data_dir).await?;
    let internal = SecretString::from(token_file(&data_dir, "internal.token")?);
    let admin = token_file(&data_dir, "admin.token")?;
    let service = token_file(&data_dir, "platform-service.token")?;

    let addr = |port| SocketAddr::new(args.host, port);
    let url = |port| format!("http://{}", SocketAddr::new(args.host, port));

    // Each service reads its usual environment variables too, so
    // SECRET_SERVICE_BACKEND=kubernetes and friends work here as well.
    let mut authz: authz_service::Config = authz_service::Config::load(None)?;
    authz.server.listen_addr = addr(args.authz_service_port);
    authz.internal_token = Some(internal.clone());
    if std::env::var_os("AUTHZ_SERVICE_DATABASE_URL").is_none() && std::env::var_os("DATABASE_URL").is_none() {
        authz.database_url = format!("sqlite://{}?mode=rwc", data_dir.join("authz.db").display());
    }
    authz.bootstrap_admins.push("user:admin".into());

    let mut secrets = secret_service::Config::load(None)?;
    secrets.server.listen_addr = addr(args.secret_service_port);
    secrets.internal_token = Some(internal.clone());
    secrets.authz_url = url(args.authz_service_port);
    if std::env::var_os("SECRET_SERVICE_EMBEDDED__DATA_DIR").is_none() {
        secrets.embedded.data_dir = data_dir.join("secrets");
    }
    if secrets.backend.is_none() {
        // The local stack runs on embedded defaults wherever it is started.
        secrets.backend = Some(secret_service::BackendKind::Embedded);
        secrets.embedded.allow_in_cluster = true;
    }

    let mut vault = vault_config_service::Config::load(None)?;
    vault.server.listen_addr = addr(args.vault_config_service_port);
    vault.internal_token = Some(internal.clone());
    vault.authz_url = url(args.authz_service_port);
    if std::env::var_os("VAULT_CONFIG_SERVICE_DATABASE_URL").is_none() && std::env::var_os("DATABASE_URL").is_none() {
        vault.database_url = format!("sqlite://{}?mode=rwc", data_dir.join("vault-configs.db").display());
    }
    if std::env::var_os("VAULT_CONFIG_SERVICE_EMBEDDED__DATA_DIR").is_none() {
        vault.embedded.data_dir = data_dir.join("vault-credentials");
    }
    // Locally, a Vault secret's new version is in the change feed within
    // seconds (production polls every 60 s).
    if std::env::var_os("VAULT_CONFIG_SERVICE_CHANGES__VAULT_POLL_INTERVAL_SECONDS").is_none() {
        vault.changes.vault_poll_interval_seconds = 5;
        vault.changes.vault_poll_budget_per_minute = 60;
    }
    if vault.backend.is_none() {
        vault.backend = Some(secret_service::BackendKind::Embedded);
        vault.embedded.allow_in_cluster = true;
    }

    let mut gw = gateway::Config::load(None)?;
    gw.server.listen_addr = addr(args.gateway_port);
    if std::env::var_os("GATEWAY_AUDIT__DATABASE_URL").is_none() {
        gw.audit.database_url = format!("sqlite://{}?mode=rwc", data_dir.join("audit.db").display());
    }
    gw.internal_token = Some(internal);
    gw.secret_service_url = url(args.secret_service_port);
    gw.authz_service_url = url(args.authz_service_port);
    gw.vault_config_service_url = url(args.vault_config_service_port);
    gw.tokens.push(gateway::TokenConfig {
        name: "admin".into(),
        kind: gateway::TokenKind::User,
        subject: "admin".into(),
        sha256: TokenHash::of(&admin).to_hex(),
        allow: None,
        act_for: None,
        act_for_admins: false,
    });
    gw.tokens.push(gateway::TokenConfig {
        name: "platform".into(),
        kind: gateway::TokenKind::Service,
        subject: "platform".into(),
        sha256: TokenHash::of(&service).to_hex(),
        // A service token's defaults: resolve and workloads, for users
        // that are not platform admins.
        allow: None,
        act_for: None,
        act_for_admins: false,
    });

    // Caught from before the first port is bound (see shutdown_signal).
    let signal = secrets_common::server::shutdown_signal();
    let authz = authz_service::Application::build(authz).await.context("authz-service")?;
    let secrets = secret_service::Application::build(secrets).await.context("secret-service")?;
    let vault = vault_config_service::Application::build(vault).await.context("vault-config-service")?;
    let gw = gateway::Application::build(gw).await.context("gateway")?;

    secretsctl_profiles(&data_dir, &url(gw.port()))?;
    let shown = args.data_dir.display();
    println!(
        "\nsecrets control plane is running; data in {shown} (kept across restarts)\n\n  \
         gateway         {gateway_addr}   <- call this one\n  \
         secret-service  {secret_addr}   (internal: accepts only the gateway)\n  \
         authz-service   {authz_addr}   (internal: accepts only the gateway)\n  \
         vault-config    {vault_addr}   (internal: accepts only the gateway)\n\n\
         metrics: {metrics}\n\n\
         tokens (created on first start):\n  \
         export ADMIN_TOKEN=$(cat {shown}/admin.token)              # user:admin, a platform admin\n  \
         export SERVICE_TOKEN=$(cat {shown}/platform-service.token) # platform service: may resolve values\n\n\
         try:\n  \
         grpcurl -plaintext -H \"authorization: Bearer $ADMIN_TOKEN\" {gateway_addr} list\n  \
         SECRETSCTL_CONFIG={shown}/secretsctl.toml secretsctl secret list --global\n",
        gateway_addr = addr(gw.port()),
        secret_addr = addr(secrets.port()),
        authz_addr = addr(authz.port()),
        vault_addr = addr(vault.port()),
        metrics = [
            ("gateway", gw.metrics_port()),
            ("secret-service", secrets.metrics_port()),
            ("authz-service", authz.metrics_port()),
            ("vault-config-service", vault.metrics_port())
        ]
        .iter()
        .filter_map(|(n, p)| p.map(|p| format!("{n} http://127.0.0.1:{p}/metrics")))
        .collect::<Vec<_>>()
        .join(", "),
    );

    let shutdown = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (tx, rx) = shutdown;
    let servers = tokio::spawn(async move {
        tokio::try_join!(
            authz.run_until_stopped(stopped(rx.clone())),
            secrets.run_until_stopped(stopped(rx.clone())),
            vault.run_until_stopped(stopped(rx.clone())),
            gw.run_until_stopped(stopped(rx)),
        )
    });
    signal.await;
    let _ = tx.send(true);
    servers.await??;
    Ok(())
}
