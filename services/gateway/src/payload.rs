//! Workload payloads: every reference in a compute, Spark job, Jupyter,
//! storage-config, email or LDAP payload becomes one resolve item named by
//! its field path; the answers are put back in place, or reported per field.

use std::collections::HashMap;

use secrets_proto::v1::{
    self as pb, config_value::Value as CV, resolve_item::Reference, resolved_item::Result as R, workload_payload::Kind,
};
use tonic::Status;

/// A map field's entry path, as in JSON: `envVars["DB_PASSWORD"]`.
pub fn entry(prefix: &str, map: &str, key: &str) -> String {
    format!("{prefix}{map}[{key:?}]")
}

/// One reference of the payload: where it sits, and what it asks for.
struct Slot {
    path: String,
    reference: Reference,
}

fn reference(value: &pb::ConfigValue) -> Option<Reference> {
    match &value.value {
        Some(CV::Text(t)) => Some(Reference::Text(t.clone())),
        Some(CV::SecretObject(o)) => Some(Reference::SecretObject(o.clone())),
        None => None,
    }
}

fn collect_map(slots: &mut Vec<Slot>, prefix: &str, name: &str, map: &HashMap<String, pb::ConfigValue>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for k in keys {
        if let Some(reference) = reference(&map[k]) {
            slots.push(Slot { path: entry(prefix, name, k), reference });
        }
    }
}

/// Every reference of `payload`, in a stable order.
fn slots(payload: &pb::WorkloadPayload) -> Vec<Slot> {
    let mut slots = Vec::new();
    let single = |slots: &mut Vec<Slot>, path: &str, value: &Option<pb::ConfigValue>| {
        if let Some(reference) = value.as_ref().and_then(reference) {
            slots.push(Slot { path: path.to_string(), reference });
        }
    };
    match &payload.kind {
        Some(Kind::Compute(c)) => {
            collect_map(&mut slots, "", "envVars", &c.env_vars);
            collect_map(&mut slots, "", "sparkConf", &c.spark_conf);
        }
        Some(Kind::SparkJob(j) | Kind::StreamingJob(j) | Kind::SdkSparkJob(j)) => {
            if let Some(t) = &j.template {
                collect_map(&mut slots, "template.", "envVars", &t.env_vars);
                collect_map(&mut slots, "template.", "sparkConf", &t.spark_conf);
            }
        }
        Some(Kind::JupyterContainer(j)) => {
            if let Some(c) = &j.config {
                collect_map(&mut slots, "config.", "envVars", &c.env_vars);
            }
        }
        Some(Kind::StorageConfig(s)) => match &s.storage_secret {
            // storageSecret wins over the plaintext fallback.
            Some(o) => slots.push(Slot { path: "storageSecret".into(), reference: Reference::SecretObject(o.clone()) }),
            None if !s.secret_key.is_empty() => {
                slots.push(Slot { path: "secretKey".into(), reference: Reference::Text(s.secret_key.clone()) })
            }
            None => {}
        },
        Some(Kind::EmailSettings(e)) => single(&mut slots, "smtpPassword", &e.smtp_password),
        Some(Kind::LdapIntegration(l)) => single(&mut slots, "bindPassword", &l.bind_password),
        None => {}
    }
    slots
}

/// An item's error as a field's: the message names the field's path
/// rather than the internal item it was resolved as.
pub fn field_status(index: usize, field: &str, status: tonic_types::pb::Status) -> tonic_types::pb::Status {
    let prefix = format!("{}: ", crate::resolution::item_name(index, field));
    match status.message.strip_prefix(&prefix) {
        Some(rest) => tonic_types::pb::Status { message: format!("{field}: {rest}"), ..status },
        None => status,
    }
}

/// The resolve request for `payload`: one item per reference, its id the
/// field's path.
pub fn items(payload: &pb::WorkloadPayload) -> Result<Vec<pb::ResolveItem>, Status> {
    if payload.kind.is_none() {
        return Err(secrets_common::error::invalid_argument(secrets_common::validate::FieldViolation::new(
            "payload",
            "set one kind: compute, sparkJob, streamingJob, sdkSparkJob, jupyterContainer, storageConfig, emailSettings or ldapIntegration",
        )));
    }
    Ok(slots(payload).into_iter().map(|s| pb::ResolveItem { id: s.path, reference: Some(s.reference) }).collect())
}

/// `payload` with every answered field replaced by its text, and the
/// fields that failed (left out of the payload).
pub fn fill(mut payload: pb::WorkloadPayload, answers: Vec<pb::ResolvedItem>) -> pb::ResolveWorkloadResponse {
    let mut texts: HashMap<String, String> = HashMap::new();
    let mut errors = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a.result {
            Some(R::Text(t)) => {
                texts.insert(a.id, t);
            }
            Some(R::Value(v)) => match String::from_utf8(v) {
                Ok(t) => {
                    texts.insert(a.id, t);
                }
                Err(_) => errors.push(pb::FieldError {
                    error: Some(secrets_common::error::to_rpc_status(&Status::failed_precondition(format!(
                        "{}: the secret's value is not UTF-8 text, which this field needs",
                        a.id
                    )))),
                    field: a.id,
                }),
            },
            Some(R::Error(e)) => errors.push(pb::FieldError { error: Some(field_status(i, &a.id, e)), field: a.id }),
            None => {}
        }
    }
    let text = |v: String| pb::ConfigValue { value: Some(CV::Text(v)) };
    let fill_map = |prefix: &str, name: &str, map: &mut HashMap<String, pb::ConfigValue>| {
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            match texts.get(&entry(prefix, name, &k)) {
                Some(t) => {
                    map.insert(k, text(t.clone()));
                }
                None => {
                    map.remove(&k);
                }
            }
        }
    };
    let fill_single = |path: &str, value: &mut Option<pb::ConfigValue>| {
        *value = texts.get(path).cloned().map(text);
    };
    match &mut payload.kind {
        Some(Kind::Compute(c)) => {
            fill_map("", "envVars", &mut c.env_vars);
            fill_map("", "sparkConf", &mut c.spark_conf);
        }
        Some(Kind::SparkJob(j) | Kind::StreamingJob(j) | Kind::SdkSparkJob(j)) => {
            if let Some(t) = &mut j.template {
                fill_map("template.", "envVars", &mut t.env_vars);
                fill_map("template.", "sparkConf", &mut t.spark_conf);
            }
        }
        Some(Kind::JupyterContainer(j)) => {
            if let Some(c) = &mut j.config {
                fill_map("config.", "envVars", &mut c.env_vars);
            }
        }
        Some(Kind::StorageConfig(s)) => {
            let path = if s.storage_secret.is_some() { "storageSecret" } else { "secretKey" };
            s.secret_key = texts.get(path).cloned().unwrap_or_default();
            s.storage_secret = None;
        }
        Some(Kind::EmailSettings(e)) => fill_single("smtpPassword", &mut e.smtp_password),
        Some(Kind::LdapIntegration(l)) => fill_single("bindPassword", &mut l.bind_password),
        None => {}
    }
    pb::ResolveWorkloadResponse { payload: Some(payload), errors }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str) -> pb::SecretObject {
        pb::SecretObject {
            key: key.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: "finance".into() }),
        }
    }

    #[test]
    fn field_paths_name_the_exact_field_and_storage_secret_wins() {
        let job = pb::WorkloadPayload {
            kind: Some(Kind::SparkJob(pb::SparkJobPayload {
                template: Some(pb::EnvAndConf {
                    env_vars: HashMap::from([(
                        "API_KEY".to_string(),
                        pb::ConfigValue { value: Some(CV::Text("${secrets.api_key}".into())) },
                    )]),
                    spark_conf: HashMap::from([(
                        "spark.hadoop.fs.s3a.access.key".to_string(),
                        pb::ConfigValue { value: Some(CV::SecretObject(obj("s3"))) },
                    )]),
                }),
            })),
        };
        let ids: Vec<String> = items(&job).unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, [r#"template.envVars["API_KEY"]"#, r#"template.sparkConf["spark.hadoop.fs.s3a.access.key"]"#]);
        let storage = pb::WorkloadPayload {
            kind: Some(Kind::StorageConfig(pb::StorageConfigPayload {
                secret_key: "plain".into(),
                storage_secret: Some(obj("s3")),
            })),
        };
        let items = items(&storage).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, "storageSecret");
        assert!(matches!(&items[0].reference, Some(Reference::SecretObject(_))));
    }
}
