//! `secretsctl audit`: who received or changed which secret, and when each
//! secret was last resolved. Never a value: the trail holds none.

use clap::{Subcommand, ValueEnum};
use secrets_proto::v1::{self as pb, gateway_client::GatewayClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::{Result, local},
    output::{self, Format},
    secret::Workload,
    workload::{KindArg, source_name},
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DecisionArg {
    Allowed,
    Denied,
    NotFound,
    Unavailable,
    Invalid,
    Dropped,
}

impl DecisionArg {
    fn proto(self) -> pb::AuditDecision {
        match self {
            DecisionArg::Allowed => pb::AuditDecision::AuditAllowed,
            DecisionArg::Denied => pb::AuditDecision::AuditDenied,
            DecisionArg::NotFound => pb::AuditDecision::AuditNotFound,
            DecisionArg::Unavailable => pb::AuditDecision::AuditUnavailable,
            DecisionArg::Invalid => pb::AuditDecision::AuditInvalid,
            DecisionArg::Dropped => pb::AuditDecision::AuditDropped,
        }
    }
}

fn decision_name(d: i32) -> String {
    let name = pb::AuditDecision::try_from(d).unwrap_or_default().as_str_name();
    name.trim_start_matches("AUDIT_").to_ascii_lowercase().replace('_', "-")
}

#[derive(Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once per run")]
pub enum AuditCommand {
    /// Audit records, newest first (platform admins; a domain's owners with -d)
    #[command(after_help = "Examples:
  secretsctl audit query -d finance --key api_token --since 24h
  secretsctl audit query --principal user:alice --decision denied -o json
  secretsctl audit query -d finance --rpc ResolveWorkload --workload spark-job/nightly-etl --limit 20")]
    Query {
        #[arg(short, long)]
        domain: Option<String>,
        /// Records from this long ago: 90s, 15m, 2h, 7d
        #[arg(long, value_name = "DURATION", conflicts_with = "from")]
        since: Option<String>,
        /// Records from this time on (RFC 3339)
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Records before this time (RFC 3339)
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// The principal a call acted for (user:alice)
        #[arg(long)]
        principal: Option<String>,
        /// The calling identity (service:spark)
        #[arg(long)]
        caller: Option<String>,
        /// Records that named this key (a domain's, with -d; else with --vault)
        #[arg(long)]
        key: Option<String>,
        /// Records that named this Vault config (and --key)
        #[arg(long, value_name = "CONFIG_ID")]
        vault: Option<String>,
        /// Records of this workload: KIND/ID (spark-job/nightly-etl), in -d's domain
        #[arg(long, value_name = "KIND/ID", requires = "domain")]
        workload: Option<String>,
        #[arg(long, value_enum)]
        decision: Option<DecisionArg>,
        /// Only these RPCs (ResolveSecrets, UpdateSecret, ...; repeatable)
        #[arg(long = "rpc", value_name = "NAME")]
        rpcs: Vec<String>,
        /// At most this many records
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// When each secret was last resolved, and by whom
    #[command(
        after_help = "Examples:\n  secretsctl audit last-access -d finance\n  secretsctl audit last-access -o json"
    )]
    LastAccess {
        /// A domain's secrets and its Vault configs' keys [default: every secret, platform admins]
        #[arg(short, long)]
        domain: Option<String>,
    },
}

/// An audit record: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Record {
    pub at: String,
    pub gateway: String,
    pub sequence: u64,
    pub rpc: String,
    pub caller: String,
    pub principal: String,
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    pub references: Vec<AuditReference>,
    /// `allowed`, `denied`, `not-found`, `unavailable`, `invalid`, `dropped`
    pub decision: String,
    pub trace_id: String,
    pub detail: String,
}

#[derive(Serialize)]
pub struct AuditReference {
    pub source: String,
    pub source_id: String,
    pub key: String,
    pub version: String,
    pub decision: String,
    pub item: String,
}

#[derive(Serialize)]
pub struct LastAccess {
    pub source: String,
    pub source_id: String,
    pub key: String,
    pub last_resolved: String,
    pub principal: String,
    pub caller: String,
}

/// `90s`, `15m`, `2h`, `7d`.
fn duration(text: &str) -> Result<chrono::Duration> {
    let bad = || local("--since takes a number and a unit: 90s, 15m, 2h or 7d");
    let unit = text.chars().last().ok_or_else(bad)?;
    let n: i64 = text.get(..text.len() - unit.len_utf8()).and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).filter(|s| *s >= 0).and_then(chrono::Duration::try_seconds).ok_or_else(bad)
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn parse_time(text: &str, flag: &str) -> Result<prost_types::Timestamp> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| timestamp(t.with_timezone(&chrono::Utc)))
        .map_err(|_| local(format!("{flag} takes a time in RFC 3339, e.g. 2026-12-08T09:30:00Z")))
}

pub async fn run(command: AuditCommand, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    match command {
        AuditCommand::Query {
            domain,
            since,
            from,
            to,
            principal,
            caller,
            key,
            vault,
            workload,
            decision,
            rpcs,
            limit,
        } => {
            let from = match (since, from) {
                (Some(s), _) => {
                    let from = chrono::Utc::now().checked_sub_signed(duration(&s)?);
                    Some(timestamp(from.ok_or_else(|| local("--since reaches back before any time there is"))?))
                }
                (None, Some(f)) => Some(parse_time(&f, "--from")?),
                (None, None) => None,
            };
            let source = match (&vault, &domain, &key) {
                (Some(id), _, _) => Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: id.clone() }),
                (None, Some(d), Some(_)) => {
                    Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: d.clone() })
                }
                (None, None, Some(_)) => {
                    return Err(local("--key names a domain's secret with -d, or a Vault config's with --vault"));
                }
                _ => None,
            };
            let workload = match &workload {
                Some(w) => {
                    let (kind, id) = w
                        .split_once('/')
                        .ok_or_else(|| local("--workload takes KIND/ID, e.g. spark-job/nightly-etl"))?;
                    let kind = KindArg::from_str(kind, true).map_err(|_| {
                        local("--workload's kind is one of compute, spark-job, streaming-job, sdk-spark-job, jupyter-container, storage-config, email-settings, ldap-integration")
                    })?;
                    Some(pb::WorkloadRef {
                        domain: domain.clone().unwrap_or_default(),
                        kind: kind.proto() as i32,
                        id: id.to_string(),
                        name: String::new(),
                    })
                }
                None => None,
            };
            let mut records = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .query_audit_records(pb::QueryAuditRecordsRequest {
                        domain: domain.clone().unwrap_or_default(),
                        from,
                        to: to.as_deref().map(|t| parse_time(t, "--to")).transpose()?,
                        principal: principal.clone().unwrap_or_default(),
                        caller: caller.clone().unwrap_or_default(),
                        source: source.clone(),
                        key: key.clone().unwrap_or_default(),
                        workload: workload.clone(),
                        decision: decision.map(|d| d.proto() as i32).unwrap_or_default(),
                        rpcs: rpcs.clone(),
                        page_size: (limit as usize - records.len()).clamp(1, 1000) as u32,
                        page_token: page_token.clone(),
                    })
                    .await?
                    .into_inner();
                records.extend(page.records.into_iter().map(record));
                if page.next_page_token.is_empty() || records.len() >= limit as usize {
                    break;
                }
                page_token = page.next_page_token;
            }
            records.truncate(limit as usize);
            output::print(format, &records, |records| {
                let rows: Vec<Vec<String>> = records
                    .iter()
                    .map(|r| {
                        let keys: Vec<String> = r.references.iter().map(|x| x.key.clone()).collect();
                        vec![
                            r.at.clone(),
                            r.rpc.rsplit('/').next().unwrap_or_default().to_string(),
                            r.principal.clone(),
                            r.caller.clone(),
                            r.domain.clone(),
                            r.decision.clone(),
                            keys.join(","),
                            r.detail.clone(),
                        ]
                    })
                    .collect();
                output::table(&["AT", "RPC", "PRINCIPAL", "CALLER", "DOMAIN", "DECISION", "KEYS", "DETAIL"], &rows);
            })?;
        }
        AuditCommand::LastAccess { domain } => {
            let answer = client
                .list_secret_last_access(pb::ListSecretLastAccessRequest { domain: domain.unwrap_or_default() })
                .await?
                .into_inner();
            let secrets: Vec<LastAccess> = answer
                .secrets
                .into_iter()
                .map(|s| {
                    let source = s.source.unwrap_or_default();
                    LastAccess {
                        source: source_name(source.r#type),
                        source_id: source.id,
                        key: s.key,
                        last_resolved: output::time(s.last_resolved.as_ref()),
                        principal: s.principal,
                        caller: s.caller,
                    }
                })
                .collect();
            output::print(format, &secrets, |secrets| {
                let rows: Vec<Vec<String>> = secrets
                    .iter()
                    .map(|s| {
                        vec![
                            s.key.clone(),
                            format!("{} {}", s.source, s.source_id),
                            s.last_resolved.clone(),
                            s.principal.clone(),
                            s.caller.clone(),
                        ]
                    })
                    .collect();
                output::table(&["KEY", "SOURCE", "LAST RESOLVED", "PRINCIPAL", "CALLER"], &rows);
            })?;
        }
    }
    Ok(0)
}

fn record(r: pb::AuditRecord) -> Record {
    Record {
        at: output::time(r.at.as_ref()),
        gateway: r.gateway,
        sequence: r.sequence,
        rpc: r.rpc,
        caller: r.caller,
        principal: r.principal,
        domain: r.domain,
        workload: r.workload.map(Workload::from),
        references: r
            .references
            .into_iter()
            .map(|x| {
                let source = x.source.unwrap_or_default();
                AuditReference {
                    source: source_name(source.r#type),
                    source_id: source.id,
                    key: x.key,
                    version: x.version,
                    decision: decision_name(x.decision),
                    item: x.item,
                }
            })
            .collect(),
        decision: decision_name(r.decision),
        trace_id: r.trace_id,
        detail: r.detail,
    }
}
