//! `secretsctl migrate`: a workload's payload moved from `${secrets.KEY}`
//! placeholders and plaintext credentials to secret objects, one workload
//! at a time, and each domain's progress.

use std::{collections::HashMap, path::PathBuf};

use clap::Subcommand;
use secrets_proto::v1::{self as pb, gateway_client::GatewayClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::{Result, local},
    output::{self, Format},
    payload,
    secret::Workload,
    workload::{Problem, problem_type, source_name},
};

#[derive(Subcommand, Debug)]
pub enum MigrateCommand {
    /// Show how a payload would be migrated, field by field; nothing is stored
    #[command(after_help = "Exit code 4 when the migrated payload would have problems.

Examples:
  secretsctl migrate plan -d finance -f job.json
  secretsctl migrate plan -d finance -f lake.json --id lake --name-secret secretKey=lake_s3_secret -o json")]
    Plan {
        #[arg(short, long)]
        domain: String,
        /// The payload (JSON); `-` for stdin
        #[arg(short, long, value_name = "PATH")]
        file: PathBuf,
        /// The workload's id: proposed secrets are named after it
        #[arg(long)]
        id: Option<String>,
        /// Name a proposed secret yourself: FIELD=KEY (repeatable)
        #[arg(long = "name-secret", value_name = "FIELD=KEY")]
        names: Vec<String>,
    },
    /// Migrate a payload: create the proposed secrets, update the usage index, write the new payload
    #[command(after_help = "The new payload goes to --out (or stdout): store it where the workload's payload
lives. Applying again changes nothing. Exit code 4 when the plan has problems
(nothing is done then).

Examples:
  secretsctl --profile platform --on-behalf-of user:alice migrate apply -d finance -f job.json --id nightly-etl --out job.migrated.json")]
    Apply {
        #[arg(short, long)]
        domain: String,
        /// The payload (JSON); `-` for stdin
        #[arg(short, long, value_name = "PATH")]
        file: PathBuf,
        /// The workload's id
        #[arg(long)]
        id: String,
        /// Name a proposed secret yourself: FIELD=KEY (repeatable)
        #[arg(long = "name-secret", value_name = "FIELD=KEY")]
        names: Vec<String>,
        /// Write the migrated payload to this file (mode 600)
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Migration progress: saved workloads still on placeholders or plaintext, counts per kind
    #[command(after_help = "Examples:\n  secretsctl migrate status -d finance\n  secretsctl migrate status -o json")]
    Status {
        /// One domain [default: every domain, platform admins]
        #[arg(short, long)]
        domain: Option<String>,
        /// Workloads to list (the counts cover all)
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn names(pairs: &[String]) -> Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(f, k)| (f.to_string(), k.to_string()))
                .ok_or_else(|| local("--name-secret takes FIELD=KEY, e.g. secretKey=lake_s3_secret"))
        })
        .collect()
}

/// One change of a plan: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Change {
    pub field: String,
    /// `placeholder-to-object`, `embedded-in-text`, `plaintext-to-secret`, `plaintext-removed`
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// `domain`, `global` (falls back to the global secret), `missing`, `new`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    pub message: String,
}

fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase().replace('_', "-")
}

fn change(c: pb::MigrationChange) -> Change {
    let object = c.secret_object.map(|o| {
        let source = o.source.unwrap_or_default();
        (o.key, source_name(source.r#type), source.id)
    });
    let origin = pb::KeyOrigin::try_from(c.origin).unwrap_or_default();
    Change {
        field: c.field,
        action: short(pb::MigrationAction::try_from(c.action).unwrap_or_default().as_str_name(), "MIGRATION_"),
        key: object.as_ref().map(|o| o.0.clone()),
        source: object.as_ref().map(|o| o.1.clone()),
        source_id: object.map(|o| o.2),
        origin: (origin != pb::KeyOrigin::Unspecified).then(|| short(origin.as_str_name(), "KEY_ORIGIN_")),
        keys: c.keys,
        message: c.message,
    }
}

fn problems(p: Vec<pb::ReferenceProblem>) -> Vec<Problem> {
    p.into_iter().map(|p| Problem { field: p.field, r#type: problem_type(p.r#type), message: p.message }).collect()
}

fn print_changes(changes: &[Change], problems: &[Problem]) {
    if changes.is_empty() {
        outln!("nothing to migrate: no placeholder alone in a field, no plaintext credential");
    } else {
        let rows: Vec<Vec<String>> = changes
            .iter()
            .map(|c| {
                let to = match (&c.key, &c.origin) {
                    (Some(k), Some(o)) => format!("{k} ({o})"),
                    (Some(k), None) => k.clone(),
                    (None, _) if !c.keys.is_empty() => format!("stays: {}", c.keys.join(", ")),
                    (None, _) => String::new(),
                };
                vec![c.field.clone(), c.action.clone(), to]
            })
            .collect();
        output::table(&["FIELD", "CHANGE", "SECRET"], &rows);
    }
    if !problems.is_empty() {
        outln!("{} problem(s):", problems.len());
        let rows: Vec<Vec<String>> =
            problems.iter().map(|p| vec![p.field.clone(), p.r#type.clone(), p.message.clone()]).collect();
        output::table(&["FIELD", "PROBLEM", "MESSAGE"], &rows);
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| local(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| local(format!("{}: {e}", path.display())))
}

pub async fn run(command: MigrateCommand, mut client: GatewayClient<Authed>, format: Format) -> Result<u8> {
    match command {
        MigrateCommand::Plan { domain, file, id, names: pairs } => {
            let answer = client
                .plan_workload_migration(pb::PlanWorkloadMigrationRequest {
                    domain,
                    id: id.unwrap_or_default(),
                    payload: Some(payload::read(&file)?),
                    secret_names: names(&pairs)?,
                })
                .await?
                .into_inner();
            #[derive(Serialize)]
            struct Plan {
                payload: serde_json::Value,
                changes: Vec<Change>,
                proposed_secrets: Vec<String>,
                problems: Vec<Problem>,
            }
            let plan = Plan {
                payload: payload::to_json(&answer.payload.unwrap_or_default()),
                changes: answer.changes.into_iter().map(change).collect(),
                proposed_secrets: answer.proposed_secrets.into_iter().map(|o| o.key).collect(),
                problems: problems(answer.problems),
            };
            output::print(format, &plan, |p| {
                print_changes(&p.changes, &p.problems);
                if !p.proposed_secrets.is_empty() {
                    outln!("apply creates: {}", p.proposed_secrets.join(", "));
                }
            })?;
            Ok(if plan.problems.is_empty() { 0 } else { 4 })
        }
        MigrateCommand::Apply { domain, file, id, names: pairs, out } => {
            let answer = client
                .apply_workload_migration(pb::ApplyWorkloadMigrationRequest {
                    domain,
                    id,
                    payload: Some(payload::read(&file)?),
                    secret_names: names(&pairs)?,
                })
                .await?
                .into_inner();
            #[derive(Serialize)]
            struct Applied {
                applied: bool,
                #[serde(skip_serializing_if = "Option::is_none")]
                payload: Option<serde_json::Value>,
                changes: Vec<Change>,
                problems: Vec<Problem>,
                created_secrets: Vec<String>,
                index_updated: bool,
            }
            let applied = Applied {
                applied: answer.applied,
                payload: answer.payload.as_ref().map(payload::to_json),
                changes: answer.changes.into_iter().map(change).collect(),
                problems: problems(answer.problems),
                created_secrets: answer.created_secrets.into_iter().map(|o| o.key).collect(),
                index_updated: answer.index_updated,
            };
            if let (Some(path), Some(p)) = (&out, &applied.payload) {
                let text = serde_json::to_string_pretty(p).map_err(|e| local(format!("the payload: {e}")))?;
                write_private(path, &format!("{text}\n"))?;
            }
            output::print(format, &applied, |a| {
                print_changes(&a.changes, &a.problems);
                if !a.applied {
                    outln!("not migrated: nothing was done");
                    return;
                }
                for key in &a.created_secrets {
                    outln!("created secret {key}");
                }
                outln!(
                    "{}",
                    if a.index_updated { "usage index updated" } else { "the usage index does not hold this workload" }
                );
                match (&out, &a.payload) {
                    (Some(path), _) => outln!("migrated payload written to {}", path.display()),
                    (None, Some(p)) => outln!("{}", serde_json::to_string_pretty(p).unwrap_or_default()),
                    (None, None) => {}
                }
            })?;
            Ok(if applied.applied { 0 } else { 4 })
        }
        MigrateCommand::Status { domain, limit } => {
            let answer = client
                .list_legacy_references(pb::ListLegacyReferencesRequest { domain: domain.unwrap_or_default(), limit })
                .await?
                .into_inner();
            #[derive(Serialize)]
            struct Placeholder {
                field: String,
                key: String,
                origin: String,
            }
            #[derive(Serialize)]
            struct Legacy {
                workload: Workload,
                placeholders: Vec<Placeholder>,
                plaintext_fields: Vec<String>,
            }
            #[derive(Serialize)]
            struct Count {
                kind: String,
                saved: u32,
                with_placeholders: u32,
                with_plaintext: u32,
                migrated: u32,
            }
            #[derive(Serialize)]
            struct Status {
                total: u32,
                counts: Vec<Count>,
                workloads: Vec<Legacy>,
            }
            let status = Status {
                total: answer.total,
                counts: answer
                    .counts
                    .into_iter()
                    .map(|c| Count {
                        kind: pb::WorkloadKind::try_from(c.kind).unwrap_or_default().as_str_name().to_string(),
                        saved: c.saved,
                        with_placeholders: c.with_placeholders,
                        with_plaintext: c.with_plaintext,
                        migrated: c.migrated,
                    })
                    .collect(),
                workloads: answer
                    .workloads
                    .into_iter()
                    .map(|w| Legacy {
                        workload: Workload::from(w.workload.unwrap_or_default()),
                        placeholders: w
                            .placeholders
                            .into_iter()
                            .map(|p| Placeholder {
                                origin: short(
                                    pb::KeyOrigin::try_from(p.origin).unwrap_or_default().as_str_name(),
                                    "KEY_ORIGIN_",
                                ),
                                field: p.field,
                                key: p.key,
                            })
                            .collect(),
                        plaintext_fields: w.plaintext_fields,
                    })
                    .collect(),
            };
            output::print(format, &status, |s| {
                let rows: Vec<Vec<String>> = s
                    .counts
                    .iter()
                    .map(|c| {
                        vec![
                            c.kind.clone(),
                            c.saved.to_string(),
                            c.with_placeholders.to_string(),
                            c.with_plaintext.to_string(),
                            c.migrated.to_string(),
                        ]
                    })
                    .collect();
                output::table(&["KIND", "SAVED", "PLACEHOLDERS", "PLAINTEXT", "MIGRATED"], &rows);
                outln!("{} workload(s) still to migrate", s.total);
                let rows: Vec<Vec<String>> = s
                    .workloads
                    .iter()
                    .flat_map(|w| {
                        let who = format!("{} {} {}", w.workload.domain, w.workload.kind, w.workload.id);
                        let placeholders = w.placeholders.iter().map({
                            let who = who.clone();
                            move |p| {
                                vec![who.clone(), p.field.clone(), format!("${{secrets.{}}} ({})", p.key, p.origin)]
                            }
                        });
                        let plaintext =
                            w.plaintext_fields.iter().map(move |f| vec![who.clone(), f.clone(), "plaintext".into()]);
                        placeholders.chain(plaintext).collect::<Vec<_>>()
                    })
                    .collect();
                if !rows.is_empty() {
                    output::table(&["WORKLOAD", "FIELD", "HOLDS"], &rows);
                }
            })?;
            Ok(0)
        }
    }
}
