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
}

const REDACTED: &str = "<redacted>";

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

#[cfg(test)]
mod tests {
    use super::{internal::v1::SecretLookupResult, v1::*};

    const CANARY: &str = "canary-debug-7f3a9";

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
