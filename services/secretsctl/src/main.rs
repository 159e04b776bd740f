//! secretsctl: the command-line client of the secrets control plane, on the
//! gateway's public API (the calls any platform component makes). Values
//! are read from stdin, a file or a masked prompt, never from the command
//! line.

#![allow(
    clippy::disallowed_methods,
    reason = "a command-line tool: it reads its files (profiles, tokens, values) before its one call, blocking nothing else"
)]

/// `println!` that does not panic when stdout's reader has gone away.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod access;
mod audit;
mod check;
mod connect;
mod failure;
mod migrate;
mod output;
mod payload;
mod secret;
mod value;
mod vault;
mod watch;
mod workload;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use secrets_proto::v1::{
    self as pb, authz_service_client::AuthzServiceClient, gateway_client::GatewayClient,
    secret_service_client::SecretServiceClient, vault_config_service_client::VaultConfigServiceClient,
};

const ABOUT: &str = "Manage the secrets control plane from the command line";

const AFTER_HELP: &str = "Connection: --profile NAME takes the address and the token from that
profile of the profiles file. Without it: SECRETS_ADDR with SECRETS_TOKEN or
SECRETS_TOKEN_FILE, when any of them is set; else the profile SECRETSCTL_PROFILE
names, or the file's `current`; else http://127.0.0.1:50051 with no token. The
address and the token come from the same place; --addr, --token-file and the TLS
flags override it. A token goes over plain http only to this machine, unless
--insecure. The profiles file is ~/.config/secretsctl/config.toml (or --config,
SECRETSCTL_CONFIG), mode 600; relative paths in it are relative to it:

  current = \"local\"
  [profiles.local]
  addr = \"https://secrets.example.com:443\"
  ca_file = \"ca.pem\"
  token_file = \"local.token\"

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
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl secret create db_password -d finance - < password.txt
  secretsctl secret list -d finance
  secretsctl secret usages db_password -d finance"
    )]
    Secret(secret::SecretCommand),
    /// Ask whether a subject may do something, and why
    Check(check::CheckArgs),
    /// A domain's members and their roles
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl member add user:bob -d finance
  secretsctl member list -d finance"
    )]
    Member(access::MemberCommand),
    /// A domain's permissions held by its members
    #[command(subcommand, after_help = "Examples:\n  secretsctl permission grant user:bob list-secrets -d finance")]
    Permission(access::PermissionCommand),
    /// Platform admins
    #[command(subcommand, after_help = "Examples:\n  secretsctl admin list\n  secretsctl admin grant user:carol")]
    Admin(access::AdminCommand),
    /// Groups (members: users, services, other groups)
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl group create analysts --description \"finance analysts\"
  secretsctl group add-member analysts user:bob"
    )]
    Group(access::GroupCommand),
    /// Resource bundles: owners, grants, resources
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl bundle create analysts-vault --owner user:admin
  secretsctl bundle grant analysts-vault group:analysts use"
    )]
    Bundle(access::BundleCommand),
    /// A domain's Vault (KV v2) integrations: configs, connection tests, keys
    #[command(
        subcommand,
        after_help = "Examples:
  printf '%s' \"$VAULT_TOKEN\" | secretsctl vault create prod -d finance --bundle finance-vault \\
    --host https://vault.example.com:8200 --path /v1/secret/data/prod --auth token -
  secretsctl vault test 3f2a..."
    )]
    Vault(vault::VaultCommand),
    /// Check, save, inspect and delete saved workloads (the usage index)
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl workload validate -d finance -f job.json
  secretsctl --profile platform --on-behalf-of user:alice workload save -d finance -f job.json --id nightly-etl"
    )]
    Workload(workload::WorkloadCommand),
    /// Resolve keys or a workload payload as a platform component does at launch
    Resolve(workload::ResolveArgs),
    /// Follow the change feed: every create, update and delete, and what it reaches
    Watch(watch::WatchArgs),
    /// Move workloads from ${secrets.KEY} placeholders and plaintext credentials to secret objects
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl migrate status -d finance
  secretsctl migrate plan -d finance -f job.json
  secretsctl --profile platform --on-behalf-of user:alice migrate apply -d finance -f job.json --id nightly-etl"
    )]
    Migrate(migrate::MigrateCommand),
    /// The audit trail and each secret's last access
    #[command(
        subcommand,
        after_help = "Examples:
  secretsctl audit query -d finance --key api_token --since 24h
  secretsctl audit last-access -d finance"
    )]
    Audit(audit::AuditCommand),
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
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "secretsctl", &mut script);
        outln!("{}", String::from_utf8_lossy(&script).trim_end_matches('\n'));
        return Ok(0);
    }
    let (channel, bearer) = cli.connect.resolve()?.open()?;
    let gateway = || GatewayClient::with_interceptor(channel.clone(), bearer.clone());
    match cli.command {
        Command::Secret(secret::SecretCommand::Usages(args)) => {
            let domain = args.in_domain.clone();
            return workload::usages(args.request(), domain, gateway(), cli.output).await;
        }
        Command::Secret(secret::SecretCommand::Selectable { domain }) => {
            return workload::selectable(domain, gateway(), cli.output).await;
        }
        Command::Vault(vault::VaultCommand::Usages { id, key }) => {
            let secret = pb::list_secret_usages_request::Secret::VaultSecret(pb::VaultSecret {
                config_id: id,
                key: key.unwrap_or_default(),
            });
            return workload::usages(secret, None, gateway(), cli.output).await;
        }
        Command::Vault(c) => {
            return vault::run(c, VaultConfigServiceClient::with_interceptor(channel, bearer), cli.output).await;
        }
        Command::Workload(c) => return workload::run(c, gateway(), cli.output).await,
        Command::Resolve(args) => return workload::resolve(args, gateway(), cli.output).await,
        Command::Watch(args) => return watch::run(args, gateway(), cli.output).await,
        Command::Audit(c) => return audit::run(c, gateway(), cli.output).await,
        Command::Migrate(c) => return migrate::run(c, gateway(), cli.output).await,
        _ => {}
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
        Command::Completion { .. }
        | Command::Vault(_)
        | Command::Workload(_)
        | Command::Resolve(_)
        | Command::Watch(_)
        | Command::Audit(_)
        | Command::Migrate(_) => Ok(()),
    }
    .map(|()| 0)
}

/// Prints a command-line mistake; its exit code. What was typed in a wrong
/// place is not repeated: it may be a value pasted where it does not belong.
fn usage(e: clap::Error) -> u8 {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let what = match e.kind() {
        ErrorKind::UnknownArgument | ErrorKind::TooManyValues => "an argument this command does not take".to_string(),
        ErrorKind::InvalidSubcommand => "an unknown command".to_string(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8 => {
            match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(arg)) => format!("a value {arg} does not take"),
                _ => "a value that is not valid here".to_string(),
            }
        }
        _ => {
            let _ = e.print();
            return if e.use_stderr() { 1 } else { 0 };
        }
    };
    eprintln!("error: {what} (not repeated here, in case it was a secret value)");
    if matches!(e.kind(), ErrorKind::UnknownArgument | ErrorKind::TooManyValues) {
        eprintln!(
            "  a value or credential is never taken from the command line: pass it on stdin (`-`), from a file \
             (`@PATH` or --from-file), or leave it out to be prompted for it"
        );
    }
    let strings = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(s)) => s.clone(),
        _ => Vec::new(),
    };
    for suggestion in strings(ContextKind::SuggestedArg).into_iter().chain(strings(ContextKind::SuggestedSubcommand)) {
        eprintln!("  did you mean {suggestion}?");
    }
    let valid = strings(ContextKind::ValidValue);
    if !valid.is_empty() {
        eprintln!("  possible values: {}", valid.join(", "));
    }
    if let Some(ContextValue::StyledStr(usage)) = e.get(ContextKind::Usage) {
        eprintln!("\n{usage}");
    }
    eprintln!("\nFor more information, try '--help'.");
    1
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(usage(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of every command's definition (names that the
    /// conflicts and requirements refer to exist, and so on).
    #[test]
    fn every_command_is_well_defined() {
        Cli::command().debug_assert();
    }
}
