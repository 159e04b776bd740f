//! The rules of a Vault config, without I/O: names, hosts, KV v2 paths,
//! namespaces, CA certificates and credentials. Each violation names the
//! field and the rule. A host and a token are checked here before any
//! client is built (the Vault client panics on a bad URL or a token with a
//! newline).

use secrecy::{ExposeSecret, SecretString};
use secrets_common::validate::{FieldViolation, echo, echo_plain};
use secrets_proto::v1 as pb;
use serde::{Deserialize, Serialize};

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_HOST_LEN: usize = 2_048;
pub const MAX_PATH_LEN: usize = 1_024;
pub const MAX_NAMESPACE_LEN: usize = 256;
pub const MAX_CA_BYTES: usize = 64 * 1024;
pub const MAX_CREDENTIAL_LEN: usize = 4_096;

/// Where a KV v2 secret lives: `/v1/<mount>/data/<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPath {
    pub mount: String,
    pub secret: String,
}

/// How the service logs in to Vault. Redacted in `Debug`.
#[derive(Clone, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Credentials {
    Token { token: SecretString },
    AppRole { role_id: String, secret_id: SecretString, mount: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { .. } => f.write_str("Token(<redacted>)"),
            Self::AppRole { role_id, mount, .. } => {
                write!(f, "AppRole {{ role_id: {role_id:?}, secret_id: <redacted>, mount: {mount:?} }}")
            }
        }
    }
}

impl Credentials {
    pub fn method(&self) -> pb::VaultAuthMethod {
        match self {
            Self::Token { .. } => pb::VaultAuthMethod::Token,
            Self::AppRole { .. } => pb::VaultAuthMethod::AppRole,
        }
    }
}

/// A config's checked fields (credentials apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub kv: KvPath,
    pub namespace: Option<String>,
    pub ca_certificate: Option<String>,
}

fn violation(field: &str, why: impl Into<String>) -> FieldViolation {
    FieldViolation::new(field, why)
}

/// Letters or digits, then letters, digits, `_`, `-`, `.`; 1..128.
pub fn name(field: &str, text: &str) -> Result<(), FieldViolation> {
    let rule = "names are 1 to 128 characters: a letter or digit, then letters, digits, '_', '-' and '.'";
    let mut chars = text.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !first_ok || !rest_ok || text.len() > MAX_NAME_LEN {
        return Err(violation(field, format!("{} is not a valid name; {rule}", echo(text))));
    }
    Ok(())
}

/// An `http://` or `https://` URL with a host, an optional port (1 to
/// 65535) and nothing else: no user info, path, query or fragment. Parsed
/// as the Vault client parses it, so what is accepted here can be used.
pub fn host(field: &str, text: &str) -> Result<String, FieldViolation> {
    let rule = "the host is an http:// or https:// URL such as https://vault.example.com:8200";
    if text.is_empty() {
        return Err(violation(field, format!("is required; {rule}")));
    }
    if text.len() > MAX_HOST_LEN || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(violation(field, format!("is not a URL; {rule}")));
    }
    // Before anything echoes the text: it may carry a password (which may
    // itself contain '/'). A host URL has no other use for '@'.
    let authority = text.split_once("://").map_or(text, |(_, rest)| rest).split(['/', '?', '#']).next().unwrap_or("");
    if text.contains('@') {
        return Err(violation(
            field,
            format!("has user info (user:password@); give credentials in `credentials`, never in the URL; {rule}"),
        ));
    }
    let shown = echo(text);
    if let Some(port) = authority.rsplit_once(':').map(|(_, p)| p).filter(|p| !p.contains(']'))
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(violation(field, format!("{shown} has port {}: ports are 1 to 65535; {rule}", echo_plain(port))));
    }
    let url = url::Url::parse(text).map_err(|e| violation(field, format!("{shown} is not a URL ({e}); {rule}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(violation(field, format!("{shown} has no http:// or https:// scheme; {rule}")));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(violation(field, format!("{shown} names no host; {rule}")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(violation(field, format!("has user info; give credentials in `credentials`; {rule}")));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(violation(
            field,
            format!("{shown} has a path, query or fragment; give the API path in `path` (/v1/<mount>/data/<secret>)"),
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// A KV v2 API path: `/v1/<mount>/data/<secret>`; the mount may contain
/// slashes, and the first `/data/` ends it.
pub fn kv_path(field: &str, text: &str) -> Result<KvPath, FieldViolation> {
    let rule = "a KV v2 API path looks like /v1/<mount>/data/<secret path>, for example /v1/secret/data/production";
    if text.len() > MAX_PATH_LEN {
        return Err(violation(field, format!("is {} bytes; at most {MAX_PATH_LEN}", text.len())));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.' | '@' | '+');
    if let Some(bad) = text.chars().find(|c| !ok(*c)) {
        return Err(violation(field, format!("contains {bad:?}; {rule}")));
    }
    let Some(rest) = text.strip_prefix("/v1/") else {
        return Err(violation(field, format!("must start with /v1/; {rule}")));
    };
    let Some((mount, secret)) = rest.split_once("/data/") else {
        return Err(violation(field, format!("must contain the /data/ segment of a KV v2 mount; {rule}")));
    };
    let secret = secret.trim_end_matches('/');
    if mount.is_empty()
        || secret.is_empty()
        || mount.split('/').chain(secret.split('/')).any(|s| s.is_empty() || s == "..")
    {
        return Err(violation(field, format!("has an empty or '..' segment; {rule}")));
    }
    Ok(KvPath { mount: mount.to_string(), secret: secret.to_string() })
}

/// A Vault namespace (`team-a` or `org/team-a`), or empty for none.
pub fn namespace(field: &str, text: &str) -> Result<Option<String>, FieldViolation> {
    let text = text.trim_matches('/');
    if text.is_empty() {
        return Ok(None);
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.');
    if text.len() > MAX_NAMESPACE_LEN || !text.chars().all(ok) || text.split('/').any(str::is_empty) {
        return Err(violation(field, "namespaces are letters, digits, '_', '-', '.' separated by '/'"));
    }
    Ok(Some(text.to_string()))
}

/// PEM certificates, or empty for none; parsed when the client is built.
pub fn ca_certificate(field: &str, pem: &str) -> Result<Option<String>, FieldViolation> {
    if pem.trim().is_empty() {
        return Ok(None);
    }
    if pem.len() > MAX_CA_BYTES {
        return Err(violation(field, format!("is {} bytes; at most {MAX_CA_BYTES}", pem.len())));
    }
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let rule = "must be PEM: one or more -----BEGIN CERTIFICATE----- blocks of X.509 CA certificates";
    let mut roots = rustls::RootCertStore::empty();
    let mut count = 0;
    for (i, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let cert = cert.map_err(|e| violation(field, format!("certificate {}: is not PEM ({e}); {rule}", i + 1)))?;
        roots
            .add(cert)
            .map_err(|e| violation(field, format!("certificate {} is not a usable X.509 certificate: {e}", i + 1)))?;
        count += 1;
    }
    if count == 0 {
        return Err(violation(field, rule));
    }
    Ok(Some(pem.to_string()))
}

/// A credential: printable ASCII without spaces (it travels in an HTTP header).
fn credential(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    if value.len() > MAX_CREDENTIAL_LEN || !value.chars().all(|c| c.is_ascii_graphic()) {
        // Never echo the value.
        return Err(violation(field, "must be printable ASCII without spaces or line breaks"));
    }
    Ok(())
}

/// The credentials of a request, checked.
pub fn credentials(field: &str, creds: Option<&pb::VaultCredentials>) -> Result<Credentials, FieldViolation> {
    use pb::vault_credentials::Method;
    match creds.and_then(|c| c.method.as_ref()) {
        None => Err(violation(field, "are required: set token, or app_role {role_id, secret_id}")),
        Some(Method::Token(t)) => {
            credential(&format!("{field}.token"), t)?;
            Ok(Credentials::Token { token: SecretString::from(t.clone()) })
        }
        Some(Method::AppRole(a)) => {
            credential(&format!("{field}.app_role.role_id"), &a.role_id)?;
            credential(&format!("{field}.app_role.secret_id"), &a.secret_id)?;
            let mount = if a.mount.is_empty() { "approle".to_string() } else { a.mount.trim_matches('/').to_string() };
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.');
            let segments_ok = mount.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
            if mount.is_empty() || mount.len() > MAX_NAMESPACE_LEN || !mount.chars().all(ok) || !segments_ok {
                return Err(violation(
                    &format!("{field}.app_role.mount"),
                    "must be an auth mount path such as approle or team/approle: letters, digits, '_', '-', '.' in segments separated by '/', none of them '.' or '..'",
                ));
            }
            Ok(Credentials::AppRole {
                role_id: a.role_id.clone(),
                secret_id: SecretString::from(a.secret_id.clone()),
                mount,
            })
        }
    }
}

impl Credentials {
    /// The secret part, for the store object; never logged.
    pub fn to_json(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, serde_json::Error> {
        #[derive(Serialize)]
        #[serde(tag = "method", rename_all = "snake_case")]
        enum Plain<'a> {
            Token { token: &'a str },
            AppRole { role_id: &'a str, secret_id: &'a str, mount: &'a str },
        }
        let plain = match self {
            Self::Token { token } => Plain::Token { token: token.expose_secret() },
            Self::AppRole { role_id, secret_id, mount } => {
                Plain::AppRole { role_id, secret_id: secret_id.expose_secret(), mount }
            }
        };
        serde_json::to_vec(&plain).map(zeroize::Zeroizing::new)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Checks a whole spec: every violation, not just the first.
pub fn target(spec: &pb::VaultConfigSpec, prefix: &str) -> Result<Target, Vec<FieldViolation>> {
    let f = |name: &str| format!("{prefix}{name}");
    let mut problems = Vec::new();
    if let Err(v) = name(&f("name"), &spec.name) {
        problems.push(v);
    }
    let host = host(&f("host"), &spec.host).map_err(|v| problems.push(v)).ok();
    let kv = kv_path(&f("path"), &spec.path).map_err(|v| problems.push(v)).ok();
    let namespace = namespace(&f("namespace"), &spec.namespace).map_err(|v| problems.push(v)).ok();
    let ca = ca_certificate(&f("ca_certificate"), &spec.ca_certificate).map_err(|v| problems.push(v)).ok();
    match (host, kv, namespace, ca) {
        (Some(host), Some(kv), Some(namespace), Some(ca_certificate)) if problems.is_empty() => {
            Ok(Target { host, kv, namespace, ca_certificate })
        }
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_v2_paths_split_into_mount_and_secret() {
        assert_eq!(
            kv_path("path", "/v1/secret/data/production").unwrap(),
            KvPath { mount: "secret".into(), secret: "production".into() }
        );
        assert_eq!(
            kv_path("path", "/v1/kv/team-a/data/apps/etl/").unwrap(),
            KvPath { mount: "kv/team-a".into(), secret: "apps/etl".into() }
        );
        for (bad, why) in [
            ("/v1/secret/production", "must contain the /data/ segment of a KV v2 mount"),
            ("secret/data/x", "must start with /v1/"),
            ("/v1//data/x", "empty"),
            ("/v1/secret/data/../x", "'..'"),
            ("/v1/secret/data/x y", "contains ' '"),
        ] {
            let e = kv_path("path", bad).unwrap_err();
            assert!(e.description.contains(why), "{bad}: {}", e.description);
            assert!(e.description.contains("/v1/<mount>/data/<secret path>"), "says what a path looks like");
        }
    }

    #[test]
    fn hosts_are_http_urls_checked_before_any_client_is_built() {
        assert_eq!(host("host", "https://vault.example.com:8200/").unwrap(), "https://vault.example.com:8200");
        for bad in
            ["", "vault.example.com", "ftp://x", "http://", "https://v:8200/v1/secret", "http://a b", "http://x\n"]
        {
            let e = host("host", bad).unwrap_err();
            assert_eq!(e.field, "host", "{bad:?}");
        }
    }

    #[test]
    fn names_and_namespaces_follow_their_rules() {
        for ok in ["prod", "Prod-1.a_b", "9"] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-prod", ".x", "a b", "ä"] {
            assert!(name("name", bad).is_err(), "{bad}");
        }
        assert_eq!(namespace("namespace", "").unwrap(), None);
        assert_eq!(namespace("namespace", "org/team-a/").unwrap().as_deref(), Some("org/team-a"));
        assert!(namespace("namespace", "a//b").is_err());
    }

    #[test]
    fn credentials_are_checked_and_never_echoed() {
        let canary = "s.canary\nbad";
        let creds = pb::VaultCredentials { method: Some(pb::vault_credentials::Method::Token(canary.into())) };
        let e = credentials("credentials", Some(&creds)).unwrap_err();
        assert_eq!(e.field, "credentials.token");
        assert!(!e.description.contains("canary"), "{}", e.description);
        let app_role = pb::VaultCredentials {
            method: Some(pb::vault_credentials::Method::AppRole(pb::AppRoleCredentials {
                role_id: "role".into(),
                secret_id: "s3cret-canary".into(),
                mount: String::new(),
            })),
        };
        let c = credentials("credentials", Some(&app_role)).unwrap();
        assert!(!format!("{c:?}").contains("s3cret-canary"));
        let round = Credentials::from_json(&c.to_json().unwrap()).unwrap();
        assert!(matches!(round, Credentials::AppRole { ref mount, .. } if mount == "approle"));
        assert!(credentials("credentials", None).unwrap_err().description.contains("are required"));
    }

    #[test]
    fn a_whole_spec_reports_every_violation() {
        let spec =
            pb::VaultConfigSpec { name: "-".into(), host: "x".into(), path: "/v1/secret".into(), ..Default::default() };
        let problems = target(&spec, "spec.").unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec.name", "spec.host", "spec.path"]);
    }
}
