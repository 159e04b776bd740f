//! JSON Web Tokens from OpenID Connect providers (users, e.g. Keycloak) and
//! from the Kubernetes API server (projected service-account tokens),
//! verified against each issuer's published keys.
//!
//! Keys come from the issuer's discovery document (`jwks_uri`) and are
//! cached. A token signed with a key the cache does not hold triggers one
//! refresh, at most once per `jwks_min_refresh_ms` whatever callers send; a
//! cache older than `jwks_max_age_ms` is refreshed on use and kept when the
//! provider cannot be reached, so an outage of the provider does not stop
//! callers whose keys are known.

use std::{
    collections::HashMap,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;

/// Who an issuer's tokens identify.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// People: `user:ISSUER/` + the `user_claim`, groups from the
    /// `groups_claim` as `group:ISSUER/GROUP` (see `shared_namespace`).
    Users,
    /// Kubernetes service accounts (`sub` = `system:serviceaccount:NS:NAME`),
    /// mapped to platform services by the gateway's `service_accounts`.
    ServiceAccounts,
}

fn default_leeway_s() -> u64 {
    30
}
fn default_user_claim() -> String {
    "sub".into()
}
fn default_min_refresh_ms() -> u64 {
    30_000
}
fn default_max_age_ms() -> u64 {
    600_000
}
fn default_fetch_timeout_ms() -> u64 {
    3_000
}

/// One trusted token issuer, as written in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Names the issuer in logs and errors.
    pub name: String,
    pub kind: IssuerKind,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Unset: `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// PEM CA certificate(s) for the provider's TLS, besides the system's
    /// (in a pod: `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bearer token file sent when fetching the discovery document and
    /// keys (a cluster that does not publish them anonymously).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Users: the claim naming the user: a stable one (`sub`, the default);
    /// a name the user can choose (`preferred_username`, `email`) only with
    /// an identity provider that never reassigns it.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// Users: the claim listing the user's groups; unset: none are taken.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Users: identity-provider groups (as the claim writes them; Keycloak's
    /// leading `/` optional) that are internal groups of another name:
    /// `{ "/platform-admins" = "vault-admins" }` makes members of that
    /// provider group members of `group:vault-admins`. Unmapped groups are
    /// `group:ISSUER/PATH`.
    #[serde(default)]
    pub group_map: std::collections::BTreeMap<String, String>,
    /// Users: `false` (the default) names users `user:ISSUER/CLAIM` and
    /// groups `group:ISSUER/PATH`, so no provider user can become a
    /// principal a static token or a configured admin holds. `true` names
    /// them `user:CLAIM` and `group:PATH`, sharing the plain namespace; such
    /// users are still refused as the principal of a static token, and
    /// never act as platform admins.
    #[serde(default)]
    pub shared_namespace: bool,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Bound on key refreshes caused by unknown key ids.
    #[serde(default = "default_min_refresh_ms")]
    pub jwks_min_refresh_ms: u64,
    /// Known keys are refreshed on use after this long.
    #[serde(default = "default_max_age_ms")]
    pub jwks_max_age_ms: u64,
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
}

/// A verified token's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The issuer's configured name.
    pub issuer: String,
    pub kind: IssuerKind,
    /// The user's principal name (`ISSUER/CLAIM`, or `CLAIM` in a shared
    /// namespace), or the full service-account name.
    pub subject: String,
    /// Internal group names from the groups claim (namespaced or mapped).
    pub groups: Vec<String>,
    /// Users of an issuer sharing the plain namespace.
    pub shared: bool,
}

/// Asymmetric algorithms only: an HMAC secret shared with every verifier
/// could mint tokens, and a public key used as one is the classic attack.
const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    iss: Option<String>,
}

/// Whether `token` has the shape of a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3 && parts[0].starts_with("eyJ")
}

fn part<T: serde::de::DeserializeOwned>(token: &str, index: usize, what: &str) -> Result<T, String> {
    let text = token.split('.').nth(index).ok_or_else(|| format!("malformed token: no {what}"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("malformed token: the {what} is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| format!("malformed token: the {what} is not the expected JSON"))
}

/// A printable, bounded rendering of an untrusted string for messages.
fn shown(text: &str) -> String {
    let short: String = text.chars().take(120).collect();
    format!("{short:?}")
}

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    jwks_uri: Option<String>,
}

/// One issuer with its cached keys.
pub struct Issuer {
    pub config: IssuerConfig,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Issuer {
    #[expect(clippy::disallowed_methods, reason = "reads the issuer CA file once, at startup")]
    fn new(config: IssuerConfig, field: &str) -> Result<Self, String> {
        if config.issuer.is_empty() || config.audiences.is_empty() {
            return Err(format!("{field}: issuer and audiences are required"));
        }
        let mut http = reqwest::ClientBuilder::new()
            .tls_backend_rustls()
            .timeout(Duration::from_millis(config.fetch_timeout_ms))
            .connect_timeout(Duration::from_millis(config.fetch_timeout_ms));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{field}.ca_file: {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{field}.ca_file: {}: not usable PEM: {e}", path.display()))?;
            http = http.tls_certs_merge(certs);
        }
        let http = http.build().map_err(|e| format!("{field}: cannot build an HTTP client: {e}"))?;
        Ok(Self {
            config,
            http,
            keys: RwLock::new(Keys { by_kid: HashMap::new(), fetched: None, attempted: None, jwks_uri: None }),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self, kid: &str) -> (Option<(DecodingKey, Option<Algorithm>)>, bool) {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let fresh = keys.fetched.is_some_and(|t| t.elapsed() < Duration::from_millis(self.config.jwks_max_age_ms));
        (keys.by_kid.get(kid).cloned(), fresh)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let mut request = self.http.get(url);
        if let Some(path) = &self.config.bearer_token_file {
            let token = tokio::fs::read_to_string(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            request = request.bearer_auth(token.trim());
        }
        let response = request.send().await.map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let body = response.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not the expected JSON: {e}"))
    }

    /// Fetches the discovery document (once) and the key set.
    async fn fetch(&self) -> Result<(HashMap<String, (DecodingKey, Option<Algorithm>)>, String), String> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let known = self.keys.read().unwrap_or_else(|e| e.into_inner()).jwks_uri.clone();
        let jwks_uri = match known {
            Some(uri) => uri,
            None => {
                let url = self.config.discovery_url.clone().unwrap_or_else(|| {
                    format!("{}/.well-known/openid-configuration", self.config.issuer.trim_end_matches('/'))
                });
                self.get_json::<Discovery>(&url).await?.jwks_uri
            }
        };
        let set: JwkSet = self.get_json(&jwks_uri).await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else { continue };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    let alg = jwk.common.key_algorithm.and_then(|a| Algorithm::from_str(&a.to_string()).ok());
                    keys.insert(kid.clone(), (key, alg));
                }
                Err(e) => tracing::warn!(issuer = %self.config.name, %kid, error = %e, "skipped an unusable key"),
            }
        }
        Ok((keys, jwks_uri))
    }

    /// The key `kid`, refreshing the cache when it is unknown (bounded) or
    /// old (keeping the old keys when the provider cannot be reached).
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>), String> {
        let (found, fresh) = self.cached(kid);
        if let (Some(key), true) = (&found, fresh) {
            return Ok(key.clone());
        }
        let _one_at_a_time = self.refreshing.lock().await;
        let (found, fresh) = self.cached(kid);
        if let (Some(key), true) = (&found, fresh) {
            return Ok(key.clone());
        }
        let min = Duration::from_millis(self.config.jwks_min_refresh_ms);
        let recently = self.keys.read().unwrap_or_else(|e| e.into_inner()).attempted.is_some_and(|t| t.elapsed() < min);
        if !recently {
            self.keys.write().unwrap_or_else(|e| e.into_inner()).attempted = Some(Instant::now());
            match self.fetch().await {
                Ok((by_kid, jwks_uri)) => {
                    let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
                    tracing::info!(issuer = %self.config.name, keys = by_kid.len(), "fetched the signing keys");
                    keys.by_kid = by_kid;
                    keys.fetched = Some(Instant::now());
                    keys.jwks_uri = Some(jwks_uri);
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.config.name, error = %e, "cannot refresh the signing keys; keeping the cached ones");
                    if found.is_none() && self.keys.read().unwrap_or_else(|e| e.into_inner()).fetched.is_none() {
                        return Err(format!("its signing keys cannot be fetched: {e}"));
                    }
                }
            }
        }
        match self.cached(kid) {
            (Some(key), _) => Ok(key),
            (None, _) => Err(format!(
                "unknown signing key kid {} (not in the issuer's key set; refreshed at most every {} ms)",
                shown(kid),
                self.config.jwks_min_refresh_ms
            )),
        }
    }

    /// A name under this issuer's namespace (or the plain one, shared).
    fn namespaced(&self, name: &str) -> String {
        if self.config.shared_namespace { name.to_string() } else { format!("{}/{name}", self.config.name) }
    }

    /// The internal group a provider group stands for: mapped, or under
    /// the issuer's namespace. Keycloak writes group paths (`/a/b`).
    fn group(&self, claimed: &str) -> Option<String> {
        let path = claimed.trim_start_matches('/');
        let mapped =
            self.config.group_map.get(claimed).or_else(|| {
                self.config.group_map.iter().find(|(k, _)| k.trim_start_matches('/') == path).map(|(_, v)| v)
            });
        match mapped {
            Some(internal) => Some(internal.clone()),
            None if path.is_empty() => None,
            // Plain names with '/' would be another issuer's namespace.
            None if self.config.shared_namespace && path.contains('/') => None,
            None => Some(self.namespaced(path)),
        }
    }

    async fn verify(&self, token: &str, alg: Algorithm, kid: &str) -> Result<Verified, String> {
        let (key, key_alg) = self.key(kid).await?;
        if let Some(key_alg) = key_alg
            && key_alg != alg
        {
            return Err(format!("alg {alg:?} does not match the key's alg {key_alg:?}"));
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.config.leeway_s;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "expired (exp is in the past)".to_string(),
            ErrorKind::ImmatureSignature => "not valid yet (nbf is in the future)".to_string(),
            ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
            ErrorKind::InvalidAudience => {
                format!("wrong audience: aud must include one of {}", self.config.audiences.join(", "))
            }
            ErrorKind::InvalidSignature => "bad signature".to_string(),
            ErrorKind::InvalidAlgorithm => format!("alg {alg:?} does not fit the key"),
            ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
            _ => "malformed token".to_string(),
        })?;
        let claims = data.claims;
        let string_claim = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        match self.config.kind {
            IssuerKind::Users => {
                let claim = string_claim(&self.config.user_claim)
                    .ok_or_else(|| format!("the token has no string {} claim", self.config.user_claim))?;
                if self.config.shared_namespace && claim.contains('/') {
                    return Err(format!(
                        "the {} claim contains '/', which names another issuer's users; an issuer sharing the plain namespace may not use it",
                        self.config.user_claim
                    ));
                }
                let subject = self.namespaced(&claim);
                let groups = match &self.config.groups_claim {
                    None => Vec::new(),
                    Some(claim) => claims
                        .get(claim)
                        .and_then(|v| v.as_array())
                        .map(|a| a.iter().filter_map(|g| g.as_str()).filter_map(|g| self.group(g)).collect())
                        .unwrap_or_default(),
                };
                Ok(Verified {
                    issuer: self.config.name.clone(),
                    kind: IssuerKind::Users,
                    subject,
                    groups,
                    shared: self.config.shared_namespace,
                })
            }
            IssuerKind::ServiceAccounts => {
                let subject = string_claim("sub").ok_or("the token has no sub claim")?;
                if !subject.starts_with("system:serviceaccount:") {
                    return Err(format!("sub {} is not a service account", shown(&subject)));
                }
                Ok(Verified {
                    issuer: self.config.name.clone(),
                    kind: IssuerKind::ServiceAccounts,
                    subject,
                    groups: Vec::new(),
                    shared: false,
                })
            }
        }
    }
}

/// The configured issuers.
#[derive(Clone, Default)]
pub struct Verifier {
    issuers: Arc<Vec<Issuer>>,
}

impl Verifier {
    /// Checks the configuration; errors name the entry and the field.
    pub fn new(configs: &[IssuerConfig]) -> Result<Self, String> {
        let mut issuers = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let field = format!("jwt_issuers[{i}]");
            if c.name.is_empty() || configs[..i].iter().any(|o| o.name == c.name || o.issuer == c.issuer) {
                return Err(format!("{field}: name and issuer must be non-empty and unique"));
            }
            // The name is the namespace of the issuer's principals.
            let segment = |t: &str| {
                !t.is_empty()
                    && t.len() <= 64
                    && t.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
            };
            if !segment(&c.name) {
                return Err(format!(
                    "{field}.name: {} is not an issuer name: 1 to 64 of letters, digits, '.', '_' and '-' (it prefixes the principals of its users)",
                    shown(&c.name)
                ));
            }
            for (from, to) in &c.group_map {
                if from.trim_start_matches('/').is_empty() || !segment(to) {
                    return Err(format!(
                        "{field}.group_map: {} = {}: map a provider group to an internal group name (letters, digits, '.', '_' and '-')",
                        shown(from),
                        shown(to)
                    ));
                }
            }
            issuers.push(Issuer::new(c.clone(), &field)?);
        }
        Ok(Self { issuers: Arc::new(issuers) })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token`; the error says what failed and never contains the
    /// token.
    pub async fn verify(&self, token: &str) -> Result<Verified, String> {
        let header: RawHeader = part(token, 0, "header")?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err("alg none is refused: the token is not signed".into());
        }
        if header.alg.to_ascii_uppercase().starts_with("HS") {
            return Err(format!(
                "alg {} is refused: tokens must be signed with the issuer's private key (RS, PS, ES or EdDSA)",
                shown(&header.alg)
            ));
        }
        let alg = Algorithm::from_str(&header.alg)
            .ok()
            .filter(|a| ACCEPTED.contains(a))
            .ok_or_else(|| format!("alg {} is not supported", shown(&header.alg)))?;
        let claims: RawClaims = part(token, 1, "payload")?;
        let iss = claims.iss.ok_or("the token has no iss claim")?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or_else(|| format!("issuer {} is not trusted (not in jwt_issuers)", shown(&iss)))?;
        let kid = header.kid.ok_or("the token names no signing key (kid)")?;
        issuer.verify(token, alg, &kid).await.map_err(|e| format!("issuer {}: {e}", issuer.config.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(extra: serde_json::Value) -> Issuer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = serde_json::json!({
            "name": "corp", "kind": "users", "issuer": "https://idp.example", "audiences": ["secrets"],
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        Issuer::new(serde_json::from_value(config).expect("an issuer config"), "jwt_issuers[0]").expect("valid")
    }

    #[test]
    fn users_are_named_by_sub_under_the_issuer_unless_configured_otherwise() {
        let default = issuer(serde_json::json!({}));
        assert_eq!(default.config.user_claim, "sub");
        assert!(!default.config.shared_namespace);
        assert_eq!(default.namespaced("admin"), "corp/admin", "never the plain admin");
        let shared = issuer(serde_json::json!({"shared_namespace": true}));
        assert_eq!(shared.namespaced("alice"), "alice");
    }

    #[test]
    fn keycloak_group_paths_map_under_the_issuer_or_through_the_group_map() {
        let corp = issuer(serde_json::json!({"group_map": {"/platform-admins": "vault-admins", "ops": "sre"}}));
        assert_eq!(corp.group("/data/eng").as_deref(), Some("corp/data/eng"), "nested paths keep their slashes");
        assert_eq!(corp.group("data-eng").as_deref(), Some("corp/data-eng"));
        assert_eq!(corp.group("/platform-admins").as_deref(), Some("vault-admins"));
        assert_eq!(corp.group("platform-admins").as_deref(), Some("vault-admins"), "the leading / is optional");
        assert_eq!(corp.group("/ops").as_deref(), Some("sre"));
        assert_eq!(corp.group("/"), None);
        // Sharing the plain namespace, a path with '/' would name another
        // issuer's group: it is dropped, and flat names stay plain.
        let shared = issuer(serde_json::json!({"shared_namespace": true}));
        assert_eq!(shared.group("/data/eng"), None);
        assert_eq!(shared.group("/data-eng").as_deref(), Some("data-eng"));
    }

    /// Whatever a caller sends as a token, verification answers with a
    /// reason (no panic, no key fetched: no issuer is trusted here) that
    /// never repeats the token.
    fn refused(token: &str) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(Verifier::default().verify(token)).expect_err("no issuer is trusted")
    }

    proptest::proptest! {
        #[test]
        fn any_token_text_is_refused_with_a_reason_that_never_repeats_it(
            token in proptest::prop_oneof!["[A-Za-z0-9_=.-]{0,300}", ".{0,80}"],
        ) {
            let reason = refused(&token);
            proptest::prop_assert!(!reason.is_empty());
            if token.len() >= 16 {
                proptest::prop_assert!(!reason.contains(&token), "{reason}");
            }
        }

        #[test]
        fn jwt_shaped_tokens_with_any_header_and_claims_are_refused_with_a_reason(
            header in proptest::prop_oneof![
                ".{0,60}",
                "\\{\"alg\":\"(none|HS256|RS256|ES256|EdDSA|[A-Z]{0,6})\"(,\"kid\":\"[a-z0-9]{0,8}\")?\\}",
            ],
            claims in ".{0,60}",
        ) {
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let token = format!("{}.{}.c2lnbmF0dXJl", b64(&header), b64(&claims));
            let reason = refused(&token);
            proptest::prop_assert!(!reason.is_empty());
            proptest::prop_assert!(!reason.contains("c2lnbmF0dXJl"), "the signature is never repeated: {reason}");
        }
    }

    #[test]
    fn jwt_shapes_are_told_from_static_tokens() {
        assert!(looks_like_jwt("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!looks_like_jwt("0123456789abcdef"));
        assert!(!looks_like_jwt("a.b.c"));
    }

    #[tokio::test]
    async fn unsigned_and_hmac_tokens_are_refused_before_any_key_is_fetched() {
        let verifier = Verifier::default();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"iss":"x"}"#));
        assert!(verifier.verify(&none).await.unwrap_err().contains("alg none is refused"));
        let hs = format!("{}.{}.c2ln", b64(r#"{"alg":"HS256","kid":"k"}"#), b64(r#"{"iss":"x"}"#));
        assert!(verifier.verify(&hs).await.unwrap_err().contains("alg \"HS256\" is refused"));
        let unknown = format!("{}.{}.c2ln", b64(r#"{"alg":"ES256","kid":"k"}"#), b64(r#"{"iss":"https://evil"}"#));
        let e = verifier.verify(&unknown).await.unwrap_err();
        assert!(e.contains("issuer \"https://evil\" is not trusted"), "{e}");
        assert!(!e.contains("c2ln"), "the token is never echoed");
    }
}
