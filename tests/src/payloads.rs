//! Building workload payloads in tests: values as text or secret objects.

use std::collections::HashMap;

use secrets_proto::v1::{self as pb, config_value::Value as CV};

/// A plain value (placeholders allowed).
pub fn text(t: &str) -> pb::ConfigValue {
    pb::ConfigValue { value: Some(CV::Text(t.into())) }
}

/// A KUBERNETES secret object as a value.
pub fn object(domain: &str, key: &str) -> pb::ConfigValue {
    pb::ConfigValue { value: Some(CV::SecretObject(secret_object(domain, key))) }
}

pub fn secret_object(domain: &str, key: &str) -> pb::SecretObject {
    pb::SecretObject {
        key: key.into(),
        source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.into() }),
    }
}

pub fn map(entries: &[(&str, pb::ConfigValue)]) -> HashMap<String, pb::ConfigValue> {
    entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}
