//! Generated gRPC types and clients/servers for the secrets control plane.
//!
//! Messages that carry secret values have a redacting `Debug`, so a value
//! cannot reach a log line through `{:?}`.

#![allow(clippy::large_enum_variant)]

use std::fmt;

/// The public APIs: what the gateway serves and reflects.
pub mod v1 {
    tonic::include_proto!("iomete.secrets.v1");
}

/// APIs between the services only: never routed or reflected by the gateway.
pub mod internal {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/internal/iomete.secrets.internal.v1.rs"));
    }
}

/// The encoded file descriptor set of the public protos, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("secrets_descriptor");

/// The encoded file descriptor set of the internal protos, reflected only by
/// the internal services.
pub const INTERNAL_FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("secrets_internal_descriptor");

/// Fully-qualified service names, as reflection and health report them.
pub mod service_names {
    pub const SECRET_SERVICE: &str = "iomete.secrets.v1.SecretService";
    pub const SECRET_READER: &str = "iomete.secrets.internal.v1.SecretReader";
    pub const RESOURCE_REGISTRY: &str = "iomete.secrets.internal.v1.ResourceRegistry";
    pub const AUTHZ_SERVICE: &str = "iomete.secrets.v1.AuthzService";
    pub const GATEWAY: &str = "iomete.secrets.v1.Gateway";
    pub const VAULT_CONFIG_SERVICE: &str = "iomete.secrets.v1.VaultConfigService";
    pub const VAULT_READER: &str = "iomete.secrets.internal.v1.VaultReader";
    pub const USAGE_INDEX: &str = "iomete.secrets.internal.v1.UsageIndex";
    pub const DECISION_LEASES: &str = "iomete.secrets.internal.v1.DecisionLeases";
    pub const VALUE_LEASES: &str = "iomete.secrets.internal.v1.ValueLeases";
    pub const CHANGE_LOG: &str = "iomete.secrets.internal.v1.ChangeLog";
}

/// The messages and oneofs whose `Debug` is written here, as the build
/// names them.
pub mod redaction {
    include!("../redacted.rs");
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for v1::resolve_item::Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A template may hold a literal a person typed: its length only.
            Self::Text(t) => write!(f, "Text({REDACTED}, {} bytes)", t.len()),
            Self::SecretObject(o) => f.debug_tuple("SecretObject").field(o).finish(),
            Self::AdminKey(k) => f.debug_tuple("AdminKey").field(k).finish(),
        }
    }
}

impl fmt::Debug for v1::ResolveItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveItem").field("id", &self.id).field("reference", &self.reference).finish()
    }
}

impl fmt::Debug for v1::config_value::Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Resolved, the text holds values.
            Self::Text(t) => write!(f, "Text({REDACTED}, {} bytes)", t.len()),
            Self::SecretObject(o) => f.debug_tuple("SecretObject").field(o).finish(),
        }
    }
}

impl fmt::Debug for v1::ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigValue").field("value", &self.value).finish()
    }
}

impl fmt::Debug for v1::StorageConfigPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfigPayload")
            .field("secret_key", &REDACTED)
            .field("storage_secret", &self.storage_secret)
            .finish()
    }
}

impl fmt::Debug for v1::secret_value::Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Binary(_) => write!(f, "Binary({REDACTED})"),
            Self::Text(_) => write!(f, "Text({REDACTED})"),
        }
    }
}

impl fmt::Debug for v1::SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValue").field("kind", &self.kind).finish()
    }
}

impl fmt::Debug for internal::v1::SecretLookupResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretLookupResult")
            .field("found", &self.found)
            .field("found_in", &self.found_in())
            .field("value", &REDACTED)
            .field("withheld", &self.withheld)
            .finish()
    }
}

impl fmt::Debug for internal::v1::vault_lookup_result::Result {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => write!(f, "Value({REDACTED})"),
            Self::Error(e) => f.debug_tuple("Error").field(e).finish(),
            Self::Withheld(w) => f.debug_tuple("Withheld").field(w).finish(),
        }
    }
}

impl fmt::Debug for internal::v1::VaultLookupResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultLookupResult").field("result", &self.result).finish()
    }
}

impl fmt::Debug for v1::vault_credentials::Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => write!(f, "Token({REDACTED})"),
            Self::AppRole(a) => f.debug_tuple("AppRole").field(a).finish(),
        }
    }
}

impl fmt::Debug for v1::VaultCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultCredentials").field("method", &self.method).finish()
    }
}

impl fmt::Debug for v1::AppRoleCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The role id names a role; the secret id is the credential.
        f.debug_struct("AppRoleCredentials")
            .field("role_id", &self.role_id)
            .field("secret_id", &REDACTED)
            .field("mount", &self.mount)
            .finish()
    }
}

impl fmt::Debug for v1::resolved_item::Result {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => write!(f, "Value({REDACTED})"),
            Self::Text(_) => write!(f, "Text({REDACTED})"),
            Self::Error(e) => f.debug_tuple("Error").field(e).finish(),
        }
    }
}

impl fmt::Debug for v1::ResolvedItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedItem").field("id", &self.id).field("result", &self.result).finish()
    }
}

impl v1::WorkloadPayload {
    /// The kind of workload this payload configures.
    pub fn workload_kind(&self) -> v1::WorkloadKind {
        use v1::{WorkloadKind as K, workload_payload::Kind};
        match &self.kind {
            Some(Kind::Compute(_)) => K::Compute,
            Some(Kind::SparkJob(_)) => K::SparkJob,
            Some(Kind::StreamingJob(_)) => K::StreamingJob,
            Some(Kind::SdkSparkJob(_)) => K::SdkSparkJob,
            Some(Kind::JupyterContainer(_)) => K::JupyterContainer,
            Some(Kind::StorageConfig(_)) => K::StorageConfig,
            Some(Kind::EmailSettings(_)) => K::EmailSettings,
            Some(Kind::LdapIntegration(_)) => K::LdapIntegration,
            None => K::Unspecified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{internal::v1::SecretLookupResult, v1::*};

    const CANARY: &str = "canary-debug-7f3a9";

    /// Field names that hold a secret when they are strings: values,
    /// resolved texts, tokens, secret ids and plaintext keys.
    const VALUE_NAMES: &[&str] = &["value", "text", "token", "secret_id", "secret_key", "password", "binary"];

    /// Every field of our APIs that can carry a secret value (any `bytes`,
    /// strings named as values are, fields of a value-carrying message type)
    /// must sit in a message or oneof whose `Debug` is written by hand.
    #[test]
    fn every_field_that_can_carry_a_value_has_a_redacting_debug() {
        use prost::Message;
        use prost_types::field_descriptor_proto::Type;
        let mut carrying = Vec::new();
        let mut walked = 0;
        for set in [super::FILE_DESCRIPTOR_SET, super::INTERNAL_FILE_DESCRIPTOR_SET] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file.iter().filter(|f| f.package().starts_with("iomete.")) {
                let mut messages: Vec<(String, &prost_types::DescriptorProto)> =
                    file.message_type.iter().map(|m| (format!(".{}.{}", file.package(), m.name()), m)).collect();
                while let Some((name, message)) = messages.pop() {
                    walked += 1;
                    messages.extend(message.nested_type.iter().map(|n| (format!("{name}.{}", n.name()), n)));
                    // A map's entries name their fields `key` and `value`
                    // whatever they hold: a map is judged by its own name,
                    // in the message that has it (below).
                    let map_entry = message.options.as_ref().is_some_and(|o| o.map_entry());
                    for field in &message.field {
                        let by_type = field.r#type() == Type::Bytes;
                        let by_name =
                            !map_entry && field.r#type() == Type::String && VALUE_NAMES.contains(&field.name());
                        let is_map = field.r#type() == Type::Message
                            && message.nested_type.iter().any(|n| {
                                n.options.as_ref().is_some_and(|o| o.map_entry())
                                    && field.type_name() == format!("{name}.{}", n.name())
                            });
                        let by_name =
                            by_name || (is_map && (VALUE_NAMES.contains(&field.name()) || field.name() == "values"));
                        let by_message = field.r#type() == Type::Message
                            && super::redaction::REDACTED.contains(&field.type_name())
                            && !field.type_name().ends_with("Credentials");
                        if !(by_type || by_name || by_message) {
                            continue;
                        }
                        // A oneof that is not proto3's synthetic `optional` one.
                        let oneof = field
                            .oneof_index
                            .filter(|_| !field.proto3_optional())
                            .map(|i| format!("{name}.{}", message.oneof_decl[i as usize].name()));
                        carrying.push((format!("{name}.{}", field.name()), name.clone(), oneof, by_message));
                    }
                }
            }
        }
        assert!(walked > 50, "the descriptor sets were walked: {walked} messages");
        let mut unredacted = Vec::new();
        for (field, message, oneof, by_message) in &carrying {
            // A field whose type redacts itself is safe wherever it is.
            if *by_message {
                continue;
            }
            let redacted = |n: &str| super::redaction::REDACTED.contains(&n);
            if !(redacted(message) || oneof.as_deref().is_some_and(redacted)) {
                unredacted.push(field.clone());
            }
        }
        assert!(unredacted.is_empty(), "fields that can carry a value print it in Debug: {unredacted:?}");
        for expected in [
            ".iomete.secrets.v1.ConfigValue.text",
            ".iomete.secrets.v1.StorageConfigPayload.secret_key",
            ".iomete.secrets.internal.v1.SecretLookupResult.value",
        ] {
            assert!(carrying.iter().any(|(f, ..)| f == expected), "{expected} is found by the walk: {carrying:?}");
        }
    }

    #[test]
    fn a_resolved_workload_prints_no_value() {
        let text = || ConfigValue { value: Some(config_value::Value::Text(CANARY.into())) };
        let response = ResolveWorkloadResponse {
            payload: Some(WorkloadPayload {
                kind: Some(workload_payload::Kind::SparkJob(SparkJobPayload {
                    template: Some(EnvAndConf {
                        env_vars: [("DB_PASSWORD".to_string(), text())].into(),
                        spark_conf: [("spark.key".to_string(), text())].into(),
                    }),
                })),
            }),
            ..Default::default()
        };
        let storage = StorageConfigPayload { secret_key: CANARY.into(), storage_secret: None };
        let item = ResolveItem { id: "x".into(), reference: Some(resolve_item::Reference::Text(CANARY.into())) };
        for shown in [format!("{response:?}"), format!("{storage:?}"), format!("{item:?}")] {
            assert!(!shown.contains(CANARY), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
    }

    #[test]
    fn debug_output_of_value_carrying_messages_never_shows_the_value() {
        let create = CreateSecretRequest {
            key: "db_password".into(),
            value: Some(SecretValue { kind: Some(secret_value::Kind::Text(CANARY.into())) }),
            ..Default::default()
        };
        let update = UpdateSecretRequest {
            key: "db_password".into(),
            value: Some(SecretValue { kind: Some(secret_value::Kind::Binary(CANARY.as_bytes().to_vec())) }),
            ..Default::default()
        };
        let lookup = SecretLookupResult { found: true, value: CANARY.as_bytes().to_vec(), ..Default::default() };
        let resolved = ResolvedItem {
            id: "envVars.DB".into(),
            result: Some(resolved_item::Result::Text(format!("jdbc:pg://u:{CANARY}@h"))),
        };
        let token = VaultCredentials { method: Some(vault_credentials::Method::Token(CANARY.into())) };
        let app_role = VaultCredentials {
            method: Some(vault_credentials::Method::AppRole(AppRoleCredentials {
                role_id: "etl-role".into(),
                secret_id: CANARY.into(),
                mount: String::new(),
            })),
        };
        let spec = VaultConfigSpec { name: "prod".into(), credentials: Some(token.clone()), ..Default::default() };
        let vault_value = super::internal::v1::VaultLookupResult {
            result: Some(super::internal::v1::vault_lookup_result::Result::Value(CANARY.as_bytes().to_vec())),
        };
        let printed = format!(
            "{create:?} {update:?} {lookup:?} {resolved:?} {create:#?} {token:?} {app_role:?} {spec:?} {vault_value:?}"
        );
        assert!(!printed.contains(CANARY), "{printed}");
        assert!(printed.contains("db_password"), "keys stay visible: {printed}");
        assert!(printed.contains("envVars.DB"), "item ids stay visible: {printed}");
        assert!(printed.contains("Text(<redacted>)"), "the kind of value stays visible: {printed}");
    }

    #[test]
    fn the_public_descriptor_set_holds_no_internal_package() {
        use prost::Message;
        let public = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        assert!(public.file.iter().any(|f| f.package() == "iomete.secrets.v1"));
        assert!(public.file.iter().all(|f| !f.package().contains("internal")), "internal schema in the public set");
        let internal = prost_types::FileDescriptorSet::decode(super::INTERNAL_FILE_DESCRIPTOR_SET).unwrap();
        assert!(internal.file.iter().any(|f| f.package() == "iomete.secrets.internal.v1"));
    }
}
