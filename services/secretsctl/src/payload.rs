//! Workload payloads as JSON files, in the shapes `SaveWorkload` takes
//! (the README's "Workload payloads"): one kind at the top
//! (`{"sparkJob": {"template": {...}}}`), each value `{"text": ...}` or
//! `{"secretObject": {...}}`. A plain string stands for `{"text": ...}` and
//! a bare `{"key", "source"}` for a secret object, as the platform's own
//! payloads write them. Mistakes name the field's path, never its value.

use std::collections::HashMap;

use secrets_proto::v1::{self as pb, workload_payload::Kind};
use serde_json::{Map, Value, json};

use crate::failure::{Result, local};

type Fields<'a> = &'a Map<String, Value>;

fn object<'a>(value: &'a Value, path: &str) -> Result<Fields<'a>> {
    value.as_object().ok_or_else(|| local(format!("{path}: expected an object")))
}

/// `sparkJob` → `spark_job`: protobuf's own field name, which grpcurl also
/// takes.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A field by its JSON name or its protobuf name.
fn get<'a>(fields: Fields<'a>, name: &str) -> Option<&'a Value> {
    fields.get(name).or_else(|| fields.get(&snake(name)))
}

/// Refuses fields other than `known` (by either name), naming the first.
fn only(fields: Fields<'_>, known: &[&str], path: &str) -> Result<()> {
    match fields.keys().find(|k| !known.iter().any(|n| n == k || snake(n) == **k)) {
        Some(k) => Err(local(format!("{path}: unknown field {k:?} (known here: {})", known.join(", ")))),
        None => Ok(()),
    }
}

fn string(value: &Value, path: &str) -> Result<String> {
    value.as_str().map(str::to_string).ok_or_else(|| local(format!("{path}: expected a string")))
}

fn secret_object(value: &Value, path: &str) -> Result<pb::SecretObject> {
    let fields = object(value, path)?;
    only(fields, &["key", "source"], path)?;
    let key = get(fields, "key").map(|k| string(k, &format!("{path}.key"))).transpose()?.unwrap_or_default();
    let source = match get(fields, "source") {
        None => None,
        Some(s) => {
            let at = format!("{path}.source");
            let s = object(s, &at)?;
            only(s, &["type", "id"], &at)?;
            let r#type = match get(s, "type").and_then(Value::as_u64) {
                Some(1) => Some("KUBERNETES".to_string()),
                Some(2) => Some("VAULT".to_string()),
                _ => get(s, "type").map(|t| string(t, &format!("{at}.type"))).transpose()?,
            };
            let r#type = match r#type.as_deref() {
                None => pb::SourceType::Unspecified,
                Some(t) if t.eq_ignore_ascii_case("kubernetes") => pb::SourceType::Kubernetes,
                Some(t) if t.eq_ignore_ascii_case("vault") => pb::SourceType::Vault,
                Some(_) => return Err(local(format!("{at}.type: expected KUBERNETES or VAULT"))),
            };
            let id = get(s, "id").map(|i| string(i, &format!("{at}.id"))).transpose()?.unwrap_or_default();
            Some(pb::SecretSource { r#type: r#type as i32, id })
        }
    };
    Ok(pb::SecretObject { key, source })
}

fn config_value(value: &Value, path: &str) -> Result<pb::ConfigValue> {
    use pb::config_value::Value as V;
    let v = match value {
        Value::String(text) => V::Text(text.clone()),
        Value::Object(fields) if get(fields, "text").is_some() || get(fields, "secretObject").is_some() => {
            only(fields, &["text", "secretObject"], path)?;
            match (get(fields, "text"), get(fields, "secretObject")) {
                (Some(t), None) => V::Text(string(t, &format!("{path}.text"))?),
                (None, Some(o)) => V::SecretObject(secret_object(o, &format!("{path}.secretObject"))?),
                _ => return Err(local(format!("{path}: set text or secretObject, not both"))),
            }
        }
        Value::Object(_) => V::SecretObject(secret_object(value, path)?),
        _ => {
            return Err(local(format!(
                "{path}: expected a string, {{\"text\": ...}} or {{\"secretObject\": {{\"key\", \"source\"}}}}"
            )));
        }
    };
    Ok(pb::ConfigValue { value: Some(v) })
}

fn config_map(fields: Fields<'_>, name: &str, prefix: &str) -> Result<HashMap<String, pb::ConfigValue>> {
    let Some(value) = get(fields, name) else { return Ok(HashMap::new()) };
    let path = format!("{prefix}{name}");
    object(value, &path)?.iter().map(|(k, v)| Ok((k.clone(), config_value(v, &format!("{path}[{k:?}]"))?))).collect()
}

fn env_and_conf(value: &Value, path: &str) -> Result<pb::EnvAndConf> {
    let fields = object(value, path)?;
    only(fields, &["envVars", "sparkConf"], path)?;
    let prefix = format!("{path}.");
    Ok(pb::EnvAndConf {
        env_vars: config_map(fields, "envVars", &prefix)?,
        spark_conf: config_map(fields, "sparkConf", &prefix)?,
    })
}

fn spark(value: &Value, path: &str) -> Result<pb::SparkJobPayload> {
    let fields = object(value, path)?;
    only(fields, &["template"], path)?;
    let template = get(fields, "template").map(|t| env_and_conf(t, &format!("{path}.template"))).transpose()?;
    Ok(pb::SparkJobPayload { template })
}

const KINDS: [&str; 8] = [
    "compute",
    "sparkJob",
    "streamingJob",
    "sdkSparkJob",
    "jupyterContainer",
    "storageConfig",
    "emailSettings",
    "ldapIntegration",
];

/// Reads a payload from JSON text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<pb::WorkloadPayload> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| local(format!("{file}: not JSON (line {}, column {})", e.line(), e.column())))?;
    let top = object(&value, file)?;
    only(top, &KINDS, file)?;
    let mut kinds = KINDS.iter().filter_map(|k| get(top, k).map(|body| (*k, body)));
    let (Some((kind, body)), None) = (kinds.next(), kinds.next()) else {
        return Err(local(format!("{file}: set exactly one kind at the top: {}", KINDS.join(", "))));
    };
    let kind = match kind {
        "compute" => {
            let c = env_and_conf(body, "compute")?;
            Kind::Compute(pb::ComputePayload { env_vars: c.env_vars, spark_conf: c.spark_conf })
        }
        "sparkJob" => Kind::SparkJob(spark(body, "sparkJob")?),
        "streamingJob" => Kind::StreamingJob(spark(body, "streamingJob")?),
        "sdkSparkJob" => Kind::SdkSparkJob(spark(body, "sdkSparkJob")?),
        "jupyterContainer" => {
            let fields = object(body, "jupyterContainer")?;
            only(fields, &["config"], "jupyterContainer")?;
            let config = match get(fields, "config") {
                Some(c) => {
                    let c = object(c, "jupyterContainer.config")?;
                    only(c, &["envVars"], "jupyterContainer.config")?;
                    Some(pb::JupyterConfig { env_vars: config_map(c, "envVars", "jupyterContainer.config.")? })
                }
                None => None,
            };
            Kind::JupyterContainer(pb::JupyterContainerPayload { config })
        }
        "storageConfig" => {
            let fields = object(body, "storageConfig")?;
            only(fields, &["secretKey", "storageSecret"], "storageConfig")?;
            Kind::StorageConfig(pb::StorageConfigPayload {
                secret_key: get(fields, "secretKey")
                    .map(|v| string(v, "storageConfig.secretKey"))
                    .transpose()?
                    .unwrap_or_default(),
                storage_secret: get(fields, "storageSecret")
                    .map(|v| secret_object(v, "storageConfig.storageSecret"))
                    .transpose()?,
            })
        }
        "emailSettings" => {
            let fields = object(body, "emailSettings")?;
            only(fields, &["smtpPassword"], "emailSettings")?;
            Kind::EmailSettings(pb::EmailSettingsPayload {
                smtp_password: get(fields, "smtpPassword")
                    .map(|v| config_value(v, "emailSettings.smtpPassword"))
                    .transpose()?,
            })
        }
        _ => {
            let fields = object(body, "ldapIntegration")?;
            only(fields, &["bindPassword"], "ldapIntegration")?;
            Kind::LdapIntegration(pb::LdapIntegrationPayload {
                bind_password: get(fields, "bindPassword")
                    .map(|v| config_value(v, "ldapIntegration.bindPassword"))
                    .transpose()?,
            })
        }
    };
    Ok(pb::WorkloadPayload { kind: Some(kind) })
}

/// Reads a payload from a file, or from stdin when `path` is `-`.
pub fn read(path: &std::path::Path) -> Result<pb::WorkloadPayload> {
    use std::io::Read;
    let (text, name) = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| local(format!("reading the payload from stdin: {e}")))?;
        (text, "stdin".to_string())
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| local(format!("{}: {e}", path.display())))?;
        (text, path.display().to_string())
    };
    parse(&text, &name)
}

fn object_json(o: &pb::SecretObject) -> Value {
    let mut out = Map::new();
    out.insert("key".into(), json!(o.key));
    if let Some(s) = &o.source {
        let t = pb::SourceType::try_from(s.r#type).map(|t| t.as_str_name()).unwrap_or("SOURCE_TYPE_UNSPECIFIED");
        out.insert("source".into(), json!({"type": t, "id": s.id}));
    }
    Value::Object(out)
}

fn value_json(v: &pb::ConfigValue) -> Value {
    match &v.value {
        Some(pb::config_value::Value::Text(t)) => json!({"text": t}),
        Some(pb::config_value::Value::SecretObject(o)) => json!({"secretObject": object_json(o)}),
        None => json!({}),
    }
}

fn map_json(m: &HashMap<String, pb::ConfigValue>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> =
        m.iter().filter(|(_, v)| v.value.is_some()).map(|(k, v)| (k.clone(), value_json(v))).collect();
    json!(sorted)
}

fn env_and_conf_json(env: &HashMap<String, pb::ConfigValue>, conf: &HashMap<String, pb::ConfigValue>) -> Value {
    let mut o = Map::new();
    if !env.is_empty() {
        o.insert("envVars".into(), map_json(env));
    }
    if !conf.is_empty() {
        o.insert("sparkConf".into(), map_json(conf));
    }
    Value::Object(o)
}

/// A payload as JSON, in the shape `parse` reads (and grpcurl takes).
pub fn to_json(p: &pb::WorkloadPayload) -> Value {
    let spark = |s: &pb::SparkJobPayload| match &s.template {
        Some(t) => json!({"template": env_and_conf_json(&t.env_vars, &t.spark_conf)}),
        None => json!({}),
    };
    match &p.kind {
        Some(Kind::Compute(c)) => json!({"compute": env_and_conf_json(&c.env_vars, &c.spark_conf)}),
        Some(Kind::SparkJob(s)) => json!({"sparkJob": spark(s)}),
        Some(Kind::StreamingJob(s)) => json!({"streamingJob": spark(s)}),
        Some(Kind::SdkSparkJob(s)) => json!({"sdkSparkJob": spark(s)}),
        Some(Kind::JupyterContainer(j)) => {
            let config = j.config.as_ref().map(|c| json!({"envVars": map_json(&c.env_vars)}));
            json!({"jupyterContainer": config.map(|c| json!({"config": c})).unwrap_or_else(|| json!({}))})
        }
        Some(Kind::StorageConfig(s)) => {
            let mut o = Map::new();
            if !s.secret_key.is_empty() {
                o.insert("secretKey".into(), json!(s.secret_key));
            }
            if let Some(obj) = &s.storage_secret {
                o.insert("storageSecret".into(), object_json(obj));
            }
            json!({"storageConfig": o})
        }
        Some(Kind::EmailSettings(e)) => {
            json!({"emailSettings": e.smtp_password.as_ref().map(|v| json!({"smtpPassword": value_json(v)})).unwrap_or_else(|| json!({}))})
        }
        Some(Kind::LdapIntegration(l)) => {
            json!({"ldapIntegration": l.bind_password.as_ref().map(|v| json!({"bindPassword": value_json(v)})).unwrap_or_else(|| json!({}))})
        }
        None => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_and_writes_back_the_same() {
        let docs = [
            r#"{"compute":{"envVars":{"A":{"text":"${secrets.a}"}},"sparkConf":{"s.k":{"secretObject":{"key":"k","source":{"type":"KUBERNETES","id":"finance"}}}}}}"#,
            r#"{"sparkJob":{"template":{"envVars":{"A":{"text":"x"}}}}}"#,
            r#"{"streamingJob":{"template":{"sparkConf":{"B":{"text":"y"}}}}}"#,
            r#"{"sdkSparkJob":{"template":{"envVars":{"C":{"secretObject":{"key":"c","source":{"type":"VAULT","id":"v"}}}}}}}"#,
            r#"{"jupyterContainer":{"config":{"envVars":{"D":{"text":"z"}}}}}"#,
            r#"{"storageConfig":{"secretKey":"plain","storageSecret":{"key":"s","source":{"type":"KUBERNETES","id":"finance"}}}}"#,
            r#"{"emailSettings":{"smtpPassword":{"text":"${secrets.smtp}"}}}"#,
            r#"{"ldapIntegration":{"bindPassword":{"secretObject":{"key":"l","source":{"type":"KUBERNETES","id":"finance"}}}}}"#,
        ];
        for doc in docs {
            let payload = parse(doc, "t").unwrap();
            let back = to_json(&payload);
            assert_eq!(back, serde_json::from_str::<Value>(doc).unwrap(), "{doc}");
            assert_eq!(parse(&back.to_string(), "t").unwrap(), payload);
        }
    }

    #[test]
    fn shorthand_strings_and_bare_objects_are_read_as_the_platform_writes_them() {
        let p = parse(
            r#"{"compute":{"envVars":{"A":"${secrets.a}","B":{"key":"b","source":{"type":"kubernetes","id":"d"}}}}}"#,
            "t",
        )
        .unwrap();
        let back = to_json(&p);
        assert_eq!(back["compute"]["envVars"]["A"], json!({"text": "${secrets.a}"}));
        assert_eq!(back["compute"]["envVars"]["B"]["secretObject"]["source"]["type"], "KUBERNETES");
    }

    #[test]
    fn protobuf_names_and_numeric_enums_are_read_as_grpcurl_takes_them() {
        let p = parse(
            r#"{"spark_job":{"template":{"env_vars":{"A":{"secret_object":{"key":"a","source":{"type":2,"id":"v"}}}}}}}"#,
            "t",
        )
        .unwrap();
        let back = to_json(&p);
        assert_eq!(back["sparkJob"]["template"]["envVars"]["A"]["secretObject"]["source"]["type"], "VAULT");
        let bare = parse(r#"{"emailSettings":{"smtpPassword":{"secretObject":{"key":"k"}}}}"#, "t").unwrap();
        assert_eq!(parse(&to_json(&bare).to_string(), "t").unwrap(), bare, "no null written back");
    }

    #[test]
    fn mistakes_name_the_field_and_never_the_value() {
        let err = |doc: &str| match parse(doc, "job.json") {
            Err(crate::failure::Failure::Local(m)) => m,
            _ => panic!("{doc} was accepted"),
        };
        let m = err(r#"{"sparkJob":{"template":{"envVars":{"PW":42}}}}"#);
        assert!(m.starts_with(r#"sparkJob.template.envVars["PW"]: expected a string"#), "{m}");
        let m = err(r#"{"compute":{"envVar":{}}}"#);
        assert!(m.contains("unknown field \"envVar\""), "{m}");
        let m = err(r#"{"compute":{},"sparkJob":{}}"#);
        assert!(m.contains("exactly one kind"), "{m}");
        let m = err(r#"{"storageConfig":{"storageSecret":{"key":"k","source":{"type":"s3cr3t-canary"}}}}"#);
        assert!(m.contains("storageConfig.storageSecret.source.type") && !m.contains("canary"), "{m}");
        let m = err(r#"{"compute": {"envVars": {"A": "s3cr3t-canary""#);
        assert!(m.starts_with("job.json: not JSON") && !m.contains("canary"), "{m}");
    }
}
