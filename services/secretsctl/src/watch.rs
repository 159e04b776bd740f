//! `secretsctl watch`: the change feed, followed. A dropped stream is
//! reopened after the last cursor received, so nothing is missed and
//! nothing printed twice unless the feed itself repeats it.

use std::time::Duration;

use clap::{Args, ValueEnum};
use secrets_proto::v1::{self as pb, gateway_client::GatewayClient, watch_secret_changes_response::Event};
use serde::Serialize;
use tonic::Code;

use crate::{
    connect::Authed,
    failure::Result,
    output::{self, Format},
    secret::{Reach, Workload},
    workload::KindArg,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SourceArg {
    Kubernetes,
    Vault,
}

impl SourceArg {
    pub fn proto(self) -> pb::SourceType {
        match self {
            SourceArg::Kubernetes => pb::SourceType::Kubernetes,
            SourceArg::Vault => pb::SourceType::Vault,
        }
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Each event is printed as it arrives: a line of text, or with -o json one JSON object
per line (`cursor` and one of `change`, `workload`, `resync_required`, `caught_up`).
A dropped connection is reopened after the last cursor, with back-off, until
interrupted; a refusal (permission, bad request) ends it with its exit code.

Examples:
  secretsctl watch -d finance
  secretsctl watch -d finance --after 1234 -o json >> changes.jsonl
  secretsctl watch --kind spark-job --coalesce 30
  secretsctl watch -d finance --after 1234 --until-caught-up
  secretsctl watch -d finance --after 1234 --count 1 --max-time 60   # wait for the next change")]
pub struct WatchArgs {
    /// Only this domain's secrets, its Vault configs' keys and the global
    /// secrets its workloads use (needed unless you are a platform admin)
    #[arg(short, long)]
    pub domain: Option<String>,
    /// Resume after this revision (the last `cursor` printed); 0: changes from now on
    #[arg(long, default_value_t = 0, value_name = "REVISION")]
    pub after: u64,
    /// Only Kubernetes or only Vault secrets
    #[arg(long, value_enum)]
    pub source: Option<SourceArg>,
    /// Only changes that reach saved workloads of this kind (repeatable)
    #[arg(long = "kind", value_enum)]
    pub kinds: Vec<KindArg>,
    /// Only changes that reach this workload id (repeatable)
    #[arg(long = "workload", value_name = "ID")]
    pub workloads: Vec<String>,
    /// One message per workload per window of this many seconds (1 to 3600)
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub coalesce: u32,
    /// Stop once everything recorded so far has been printed
    #[arg(long)]
    pub until_caught_up: bool,
    /// Stop after this many changes (or workload messages)
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Give up after this many seconds, with exit code 5 if --count was not reached
    #[arg(long, value_name = "SECONDS")]
    pub max_time: Option<u64>,
}

/// One change: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Change {
    pub revision: u64,
    /// `created`, `updated`, `deleted`
    pub kind: String,
    /// `api`, `store` (edited out of band), `vault` (a new Vault version)
    pub origin: String,
    /// `kubernetes` or `vault`
    pub source: String,
    pub source_id: String,
    pub scope: String,
    pub domain: String,
    pub key: String,
    pub version: String,
    pub changed_at: String,
    pub changed_by: String,
    /// Reported after a restart without knowing whether the value changed
    pub presumed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

impl From<pb::SecretChange> for Change {
    fn from(c: pb::SecretChange) -> Self {
        let source = c.source.unwrap_or_default();
        Change {
            revision: c.revision,
            kind: short(pb::SecretChangeKind::try_from(c.kind).unwrap_or_default().as_str_name(), "SECRET_"),
            origin: short(pb::ChangeOrigin::try_from(c.origin).unwrap_or_default().as_str_name(), "CHANGE_ORIGIN_"),
            source: crate::workload::source_name(source.r#type),
            source_id: source.id,
            scope: short(pb::Scope::try_from(c.scope).unwrap_or_default().as_str_name(), "SCOPE_"),
            domain: c.domain,
            key: c.key,
            version: c.version,
            changed_at: output::time(c.changed_at.as_ref()),
            changed_by: c.changed_by,
            presumed: c.presumed,
            reach: c.reach.map(Reach::from),
        }
    }
}

#[derive(Serialize)]
pub struct WorkloadChanges {
    pub workload: Workload,
    pub changes: Vec<Change>,
}

#[derive(Serialize)]
pub struct Resync {
    pub after_revision: u64,
    pub oldest_revision: u64,
    pub message: String,
}

/// One message of the feed.
#[derive(Serialize)]
pub struct Message {
    pub cursor: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadChanges>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_required: Option<Resync>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub caught_up: bool,
}

fn change_line(c: &Change) -> String {
    let mut line = format!("#{} {} {} {}", c.revision, c.kind, c.origin, c.key);
    match c.scope.as_str() {
        "domain" => line.push_str(&format!(" (domain {})", c.domain)),
        "global" | "admin" => line.push_str(&format!(" ({})", c.scope)),
        _ => line.push_str(&format!(" (vault {})", c.source_id)),
    }
    if !c.changed_by.is_empty() {
        line.push_str(&format!(" by {}", c.changed_by));
    }
    if c.presumed {
        line.push_str(", presumed");
    }
    if let Some(r) = &c.reach {
        let names: Vec<String> = r.workloads.iter().map(|w| format!("{}/{}", w.domain, w.id)).collect();
        line.push_str(&format!("; reaches {}", r.total));
        if !names.is_empty() {
            line.push_str(&format!(": {}", names.join(", ")));
        }
    }
    line
}

fn print(format: Format, message: &Message) -> Result<()> {
    match format {
        Format::Json => {
            let text = serde_json::to_string(message)
                .map_err(|e| crate::failure::local(format!("encoding the event as JSON: {e}")))?;
            outln!("{text}");
        }
        Format::Yaml => {
            outln!("---");
            output::print(format, message, |_| {})?;
        }
        Format::Table => {
            if let Some(c) = &message.change {
                outln!("{}", change_line(c));
            }
            if let Some(w) = &message.workload {
                outln!("{} {} {}: {} change(s)", w.workload.domain, w.workload.kind, w.workload.id, w.changes.len());
                for c in &w.changes {
                    outln!("  {}", change_line(c));
                }
            }
            if let Some(r) = &message.resync_required {
                outln!(
                    "resync required (after {}, oldest kept {}): {}",
                    r.after_revision,
                    r.oldest_revision,
                    r.message
                );
            }
            if message.caught_up {
                outln!("-- caught up at {}", message.cursor);
            }
        }
    }
    Ok(())
}

/// Whether a failed stream is worth reopening: always for an outage; for
/// an error that may be the server's own bug, only a few times in a row
/// without progress.
fn transient(code: Code, fruitless: u32) -> bool {
    match code {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::ResourceExhausted => true,
        Code::Unknown | Code::Internal => fruitless < MAX_FRUITLESS,
        _ => false,
    }
}

/// Reconnections in a row that delivered nothing, after which an error that
/// is not an outage ends the watch.
const MAX_FRUITLESS: u32 = 5;

pub async fn run(args: WatchArgs, client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    match args.max_time {
        None => follow(args, client, format).await,
        Some(seconds) => {
            let count = args.count;
            match tokio::time::timeout(Duration::from_secs(seconds), follow(args, client, format)).await {
                Ok(done) => done,
                Err(_) if count.is_some() => Err(tonic::Status::deadline_exceeded(format!(
                    "fewer changes than --count in --max-time {seconds}s"
                ))
                .into()),
                Err(_) => Ok(0),
            }
        }
    }
}

async fn follow(args: WatchArgs, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    let mut cursor = args.after;
    let mut seen = 0u64;
    let mut fruitless = 0u32;
    let mut pause = Duration::from_millis(500);
    loop {
        let request = pb::WatchSecretChangesRequest {
            after_revision: cursor,
            domain: args.domain.clone().unwrap_or_default(),
            source: args.source.map(|s| s.proto() as i32).unwrap_or_default(),
            workload_kinds: args.kinds.iter().map(|k| k.proto() as i32).collect(),
            workload_ids: args.workloads.clone(),
            coalesce_seconds: args.coalesce,
        };
        let failure = match client.watch_secret_changes(request).await {
            Err(status) => status,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            // The cursor moves only once the message is printed.
                            let message = Message {
                                cursor: m.cursor,
                                caught_up: matches!(m.event, Some(Event::CaughtUp(true))),
                                change: match &m.event {
                                    Some(Event::Change(c)) => Some(Change::from(c.clone())),
                                    _ => None,
                                },
                                workload: match &m.event {
                                    Some(Event::Workload(w)) => Some(WorkloadChanges {
                                        workload: Workload::from(w.workload.clone().unwrap_or_default()),
                                        changes: w.changes.iter().cloned().map(Change::from).collect(),
                                    }),
                                    _ => None,
                                },
                                resync_required: match &m.event {
                                    Some(Event::ResyncRequired(r)) => Some(Resync {
                                        after_revision: r.after_revision,
                                        oldest_revision: r.oldest_revision,
                                        message: r.message.clone(),
                                    }),
                                    _ => None,
                                },
                            };
                            if message.resync_required.is_some() {
                                eprintln!(
                                    "warning: changes after {cursor} are no longer kept; what you hold may be stale \
                                     (resync), following on from the oldest change kept"
                                );
                            }
                            print(format, &message)?;
                            // The server's cursor, even when a resync moves
                            // it back: it is where this watcher stands.
                            if m.cursor != cursor || message.change.is_some() || message.workload.is_some() {
                                pause = Duration::from_millis(500);
                                fruitless = 0;
                            }
                            cursor = m.cursor;
                            if message.caught_up && args.until_caught_up {
                                return Ok(0);
                            }
                            if message.change.is_some() || message.workload.is_some() {
                                seen += 1;
                                if args.count.is_some_and(|n| seen >= n) {
                                    return Ok(0);
                                }
                            }
                        }
                        Ok(None) => break tonic::Status::unavailable("the gateway ended the stream"),
                        Err(status) => break status,
                    }
                }
            }
        };
        if !transient(failure.code(), fruitless) {
            return Err(failure.into());
        }
        fruitless += 1;
        eprintln!(
            "watch: {} ({:?}); reconnecting in {:.1}s after cursor {cursor}",
            failure.message(),
            failure.code(),
            pause.as_secs_f32()
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
