//! secretsctl: the command-line client of the secrets control plane, on the
//! gateway's public API (the calls any platform component makes). Values
//! are read from stdin, a file or a masked prompt, never from the command
//! line.

#![allow(
    clippy::disallowed_methods,
    reason = "a command-line tool: it reads its files (profiles, tokens, values) before its one call, blocking nothing else"
)]

mod access;
mod check;
mod connect;
mod failure;
mod output;
mod secret;
mod value;
mod vault;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use secrets_proto::v1::{
    authz_service_client::AuthzServiceClient, secret_service_client::SecretServiceClient,
    vault_config_service_client::VaultConfigServiceClient,
};

const ABOUT: &str = "Manage the secrets control plane from the command line";

const AFTER_HELP: &str = "Connection: --addr, else SECRETS_ADDR, else the profile's `addr`, else
http://127.0.0.1:50051. The token: --token-file, else SECRETS_TOKEN or
SECRETS_TOKEN_FILE, else the profile's `token` or `token_file`. Profiles live in
~/.config/secretsctl/config.toml (mode 600):

  current = \"local\"
  [profiles.local]
  addr = \"http://127.0.0.1:50051\"
  token_file = \"/home/me/.config/secretsctl/local.token\"

Values are never taken from the command line: pass `-` (stdin), `@PATH` or
--from-file PATH, or leave the value out to be prompted for it.

Exit codes: 0 ok, 1 usage or local error, 2 unauthenticated or permission
denied, 3 not found, 4 conflict or precondition (exists, in use),
5 unavailable or timed out, 6 other server error.

Examples:
  export SECRETS_TOKEN_FILE=~/.config/secretsctl/admin.token
  secretsctl secret create db_password -d finance - < password.txt
  secretsctl secret list -d finance -o json
  secretsctl check user:alice manage-secrets -d finance
  secretsctl completion bash > /etc/bash_completion.d/secretsctl";

#[derive(Parser, Debug)]
#[command(name = "secretsctl", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    connect: connect::ConnectArgs,
    /// How answers are printed
    #[arg(short, long, global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Domain, global and admin secrets
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Ask whether a subject may do something, and why
    Check(check::CheckArgs),
    /// A domain's members and their roles
    #[command(subcommand)]
    Member(access::MemberCommand),
    /// A domain's permissions held by its members
    #[command(subcommand)]
    Permission(access::PermissionCommand),
    /// Platform admins
    #[command(subcommand)]
    Admin(access::AdminCommand),
    /// Groups (members: users, services, other groups)
    #[command(subcommand)]
    Group(access::GroupCommand),
    /// Resource bundles: owners, grants, resources
    #[command(subcommand)]
    Bundle(access::BundleCommand),
    /// A domain's Vault (KV v2) integrations: configs, connection tests, keys
    #[command(subcommand)]
    Vault(vault::VaultCommand),
    /// Print a shell completion script
    #[command(after_help = "Examples:
  secretsctl completion bash > ~/.local/share/bash-completion/completions/secretsctl
  secretsctl completion zsh > \"${fpath[1]}/_secretsctl\"
  secretsctl completion fish > ~/.config/fish/completions/secretsctl.fish")]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs the command; its exit code (a Vault connection test's outcome sets
/// one of its own).
async fn run(cli: Cli) -> failure::Result<u8> {
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "secretsctl", &mut std::io::stdout());
        return Ok(0);
    }
    let (channel, bearer) = cli.connect.resolve()?.open()?;
    if let Command::Vault(c) = cli.command {
        return vault::run(c, VaultConfigServiceClient::with_interceptor(channel, bearer), cli.output).await;
    }
    match cli.command {
        Command::Secret(command) => {
            secret::run(command, SecretServiceClient::with_interceptor(channel, bearer), cli.output).await
        }
        Command::Check(args) => {
            check::run(args, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await
        }
        Command::Member(c) => {
            access::member(c, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await
        }
        Command::Permission(c) => {
            access::permission(c, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await
        }
        Command::Admin(c) => access::admin(c, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await,
        Command::Group(c) => access::group(c, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await,
        Command::Bundle(c) => {
            access::bundle(c, AuthzServiceClient::with_interceptor(channel, bearer), cli.output).await
        }
        Command::Completion { .. } | Command::Vault(_) => Ok(()),
    }
    .map(|()| 0)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => ExitCode::from(failure.report()),
    }
}
