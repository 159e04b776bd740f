//! Generated gRPC types and clients/servers for the secrets control plane.
//!
//! Messages that carry secret values have a redacting `Debug`, so a value
//! cannot reach a log line through `{:?}`.

#![allow(clippy::large_enum_variant)]

use std::fmt;

pub mod v1 {
    tonic::include_proto!("iomete.secrets.v1");
}

/// The encoded file descriptor set of every proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("secrets_descriptor");

/// Fully-qualified service names, as reflection and health report them.
pub mod service_names {
    pub const SECRET_SERVICE: &str = "iomete.secrets.v1.SecretService";
    pub const SECRET_READER: &str = "iomete.secrets.v1.SecretReader";
    pub const AUTHZ_SERVICE: &str = "iomete.secrets.v1.AuthzService";
    pub const GATEWAY: &str = "iomete.secrets.v1.Gateway";
}

const REDACTED: &str = "<redacted>";

fn value_kind(value: &Option<impl ValueKind>) -> &'static str {
    value.as_ref().map_or("none", ValueKind::kind)
}

trait ValueKind {
    fn kind(&self) -> &'static str;
}

impl ValueKind for v1::create_secret_request::Value {
    fn kind(&self) -> &'static str {
        match self {
            Self::Binary(_) => "binary",
            Self::Text(_) => "text",
        }
    }
}

impl ValueKind for v1::update_secret_request::Value {
    fn kind(&self) -> &'static str {
        match self {
            Self::Binary(_) => "binary",
            Self::Text(_) => "text",
        }
    }
}

impl fmt::Debug for v1::create_secret_request::Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({REDACTED})", self.kind())
    }
}

impl fmt::Debug for v1::update_secret_request::Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({REDACTED})", self.kind())
    }
}

impl fmt::Debug for v1::CreateSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateSecretRequest")
            .field("scope", &self.scope())
            .field("domain", &self.domain)
            .field("key", &self.key)
            .field("value", &value_kind(&self.value))
            .finish()
    }
}

impl fmt::Debug for v1::UpdateSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateSecretRequest")
            .field("scope", &self.scope())
            .field("domain", &self.domain)
            .field("key", &self.key)
            .field("value", &value_kind(&self.value))
            .finish()
    }
}

impl fmt::Debug for v1::SecretLookupResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretLookupResult")
            .field("found", &self.found)
            .field("found_in", &self.found_in())
            .field("value", &REDACTED)
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

#[cfg(test)]
mod tests {
    use super::v1::*;

    const CANARY: &str = "canary-debug-7f3a9";

    #[test]
    fn debug_output_of_value_carrying_messages_never_shows_the_value() {
        let create = CreateSecretRequest {
            key: "db_password".into(),
            value: Some(create_secret_request::Value::Text(CANARY.into())),
            ..Default::default()
        };
        let update = UpdateSecretRequest {
            key: "db_password".into(),
            value: Some(update_secret_request::Value::Binary(CANARY.as_bytes().to_vec())),
            ..Default::default()
        };
        let lookup = SecretLookupResult { found: true, found_in: 0, value: CANARY.as_bytes().to_vec() };
        let resolved = ResolvedItem {
            id: "envVars.DB".into(),
            result: Some(resolved_item::Result::Text(format!("jdbc:pg://u:{CANARY}@h"))),
        };
        let printed = format!("{create:?} {update:?} {lookup:?} {resolved:?} {create:#?}");
        assert!(!printed.contains(CANARY), "{printed}");
        assert!(printed.contains("db_password"), "keys stay visible: {printed}");
        assert!(printed.contains("envVars.DB"), "item ids stay visible: {printed}");
    }
}
