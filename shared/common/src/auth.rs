//! Bearer tokens, the internal credential between services, and the call
//! metadata that carries the acting principal across hops.

use std::{fmt, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    service::Interceptor,
    transport::{Channel, Endpoint},
};

use crate::{
    Principal,
    error::invalid_argument,
    observe::{Metrics, TracedChannel},
    tls::{InternalTls, InternalTlsConfig},
};

/// `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
/// Set by a platform-service caller: the principal it acts for.
pub const ON_BEHALF_OF: &str = "x-on-behalf-of";
/// Set by the gateway on internal hops: the principal the call acts as.
pub const PRINCIPAL: &str = "x-iomete-principal";
/// Set by the gateway on internal hops: the authenticated caller (token name).
pub const CALLER: &str = "x-iomete-caller";
/// Set by the gateway on internal hops: the groups the identity provider
/// says the principal belongs to (`group:a,group:b`).
pub const GROUPS: &str = "x-iomete-groups";

/// SHA-256 of a bearer token. Tokens are random and long, so a plain hash is
/// enough; comparison is constant-time.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hex digits, as written in configuration.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|e| format!("is not hex: {e}"))?;
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("is {} bytes; a SHA-256 hash is 32 bytes (64 hex digits)", b.len()))?;
        Ok(Self(array))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// A new random token: 32 bytes from the OS generator, hex encoded.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// The token of an `authorization: Bearer ...` header, if any.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    bearer_token(metadata.get(AUTHORIZATION)?.to_str().ok()?)
}

/// The token in an `authorization` header's value `Bearer <token>` (the
/// scheme in any case), if any: the one parser of that header.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// What an internal service knows about a call that came through the gateway.
#[derive(Clone, Debug, Default)]
pub struct InternalCall {
    /// The principal the call acts as; `None` for the gateway's own calls.
    pub principal: Option<Principal>,
    /// The authenticated caller at the gateway, for logs and audit.
    pub caller: Option<String>,
    /// Groups of the principal from its token's groups claim.
    pub groups: Vec<Principal>,
}

impl InternalCall {
    /// The call's context, set by [`InternalAuth`].
    pub fn of<T>(request: &Request<T>) -> Self {
        request.extensions().get::<InternalCall>().cloned().unwrap_or_default()
    }

    /// The acting principal and its groups, or `UNAUTHENTICATED` when the
    /// call carries no principal.
    pub fn require_acting(&self) -> Result<Acting, Status> {
        Ok(Acting { principal: self.require_principal()?.clone(), groups: self.groups.clone() })
    }

    /// The acting principal, or `UNAUTHENTICATED` when the call carries none.
    pub fn require_principal(&self) -> Result<&Principal, Status> {
        self.principal.as_ref().ok_or_else(|| {
            Status::unauthenticated(format!("the call names no principal; set the {PRINCIPAL} metadata"))
        })
    }
}

/// The principal a call acts for, with the groups its identity provider
/// says it belongs to (they count like recorded memberships).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acting {
    pub principal: Principal,
    pub groups: Vec<Principal>,
}

impl std::ops::Deref for Acting {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

impl fmt::Display for Acting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.principal.fmt(f)
    }
}

/// Server-side check of internal calls: the internal services accept calls
/// only from the gateway (and from each other), never directly. The caller
/// proves itself with the shared internal token, a client certificate from
/// the internal CA (mutual TLS), or both when both are configured.
#[derive(Clone)]
pub struct InternalAuth {
    expected: Option<TokenHash>,
    mtls: bool,
}

impl InternalAuth {
    pub fn new(token: &SecretString) -> Self {
        Self { expected: Some(TokenHash::of(token.expose_secret())), mtls: false }
    }
}

impl Interceptor for InternalAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.mtls && !crate::tls::has_client_certificate(&request) {
            return Err(Status::unauthenticated(
                "no client certificate: this service accepts only mutual-TLS calls from the gateway",
            ));
        }
        if let Some(expected) = &self.expected {
            let presented = bearer(request.metadata()).ok_or_else(|| {
                Status::unauthenticated("missing internal credential: this service accepts calls only from the gateway")
            })?;
            if !expected.matches(&TokenHash::of(presented)) {
                return Err(Status::unauthenticated(
                    "wrong internal credential: this service accepts calls only from the gateway",
                ));
            }
        }
        let principal = match request.metadata().get(PRINCIPAL) {
            None => None,
            Some(v) => {
                let text = v
                    .to_str()
                    .map_err(|_| invalid_argument(crate::validate::FieldViolation::new(PRINCIPAL, "must be ASCII")))?;
                Some(Principal::parse(PRINCIPAL, text).map_err(invalid_argument)?)
            }
        };
        let caller = request.metadata().get(CALLER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let groups = match request.metadata().get(GROUPS) {
            None => Vec::new(),
            Some(v) => parse_groups(v.to_str().unwrap_or_default())?,
        };
        request.extensions_mut().insert(InternalCall { principal, caller, groups });
        Ok(request)
    }
}

/// The groups of [`GROUPS`]: `group:NAME` separated by commas.
fn parse_groups(text: &str) -> Result<Vec<Principal>, Status> {
    text.split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|g| match Principal::parse_subject(GROUPS, g) {
            Ok(p) if p.kind == crate::principal::SubjectKind::Group => Ok(p),
            Ok(_) => Err(invalid_argument(crate::validate::FieldViolation::new(GROUPS, "lists groups only"))),
            Err(v) => Err(invalid_argument(v)),
        })
        .collect()
}

/// Client-side interceptor for internal hops: adds the internal credential
/// when one is configured. (The trace context is added by the
/// [`TracedChannel`] underneath.)
#[derive(Clone)]
pub struct InternalClient {
    authorization: Option<AsciiMetadataValue>,
}

impl InternalClient {
    pub fn new(token: &SecretString) -> Result<Self, String> {
        let mut authorization: AsciiMetadataValue = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| "the internal token must be printable ASCII".to_string())?;
        authorization.set_sensitive(true);
        Ok(Self { authorization: Some(authorization) })
    }
}

impl Interceptor for InternalClient {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert(AUTHORIZATION, authorization.clone());
        }
        Ok(request)
    }
}

/// How a service proves itself on internal hops and checks its callers: the
/// shared internal token (local runs), mutual TLS with the internal CA, or
/// both. Built once from the service's configuration.
#[derive(Clone)]
pub struct Internal {
    client: InternalClient,
    auth: InternalAuth,
    tls: Option<InternalTls>,
}

impl Internal {
    /// `env_prefix` names the environment variable in the error when
    /// neither is configured.
    pub fn new(
        token: Option<&SecretString>,
        tls: Option<&InternalTlsConfig>,
        env_prefix: &str,
    ) -> Result<Self, String> {
        if token.is_none() && tls.is_none() {
            return Err(format!(
                "internal_token or internal_tls is required (set {env_prefix}INTERNAL_TOKEN, or \
                 internal_tls.ca_file, cert_file and key_file in the config file)"
            ));
        }
        let tls = tls.map(InternalTls::new).transpose().map_err(|e| format!("internal_tls: {e}"))?;
        let client = match token {
            Some(t) => InternalClient::new(t)?,
            None => InternalClient { authorization: None },
        };
        let auth = InternalAuth { expected: token.map(|t| TokenHash::of(t.expose_secret())), mtls: tls.is_some() };
        Ok(Self { client, auth, tls })
    }

    pub fn client(&self) -> InternalClient {
        self.client.clone()
    }

    pub fn auth(&self) -> InternalAuth {
        self.auth.clone()
    }

    /// The TLS of an internal listener, when mutual TLS is configured.
    pub fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.as_ref().map(|t| t.server.clone())
    }

    /// A channel to another service, as [`internal_channel`]. With mutual
    /// TLS configured the URL must be `https://`, without it `http://`.
    /// One connection to one URL: for the authz-service, whose decision
    /// lease and checks must come from the same replica.
    pub fn channel(
        &self,
        url: &str,
        request_timeout: Duration,
        peer: &'static str,
        metrics: &Metrics,
    ) -> Result<TracedChannel, String> {
        channel(url, request_timeout, peer, metrics, self.tls.as_ref().map(|t| t.client.clone()))
    }

    /// A channel that spreads calls over every replica of a service: `url`
    /// may list several URLs separated by commas, and each host name is
    /// resolved to all its addresses, again every few seconds (a headless
    /// Service's name gives every ready pod). See [`crate::balance`].
    pub fn balanced_channel(
        &self,
        url: &str,
        request_timeout: Duration,
        peer: &'static str,
        metrics: &Metrics,
    ) -> Result<TracedChannel, String> {
        balanced_channel(url, request_timeout, peer, metrics, self.tls.as_ref().map(|t| t.client.clone()))
    }
}

/// Marks a request to an internal service as acting for `principal`, who
/// belongs to `groups` by its identity provider's word.
pub fn act_as<T>(request: &mut Request<T>, principal: &Principal, caller: Option<&str>, groups: &[Principal]) {
    if !groups.is_empty() {
        let list = groups.iter().map(Principal::to_string).collect::<Vec<_>>().join(",");
        if let Ok(v) = list.parse() {
            request.metadata_mut().insert(GROUPS, v);
        }
    }
    if let Ok(v) = principal.to_string().parse() {
        request.metadata_mut().insert(PRINCIPAL, v);
    }
    if let Some(v) = caller.and_then(|c| c.parse().ok()) {
        request.metadata_mut().insert(CALLER, v);
    }
}

/// A plaintext channel to another service that connects on first use and
/// reconnects by itself, so services start in any order and recover when a
/// peer returns. Every call is bounded by `request_timeout`, traced, and
/// counted as a backend call of `peer`.
pub fn internal_channel(
    url: &str,
    request_timeout: Duration,
    peer: &'static str,
    metrics: &Metrics,
) -> Result<TracedChannel, String> {
    channel(url, request_timeout, peer, metrics, None)
}

/// HTTP/2 pings on every internal connection: a peer that vanished without
/// closing it (its host died, the network split) is noticed within about
/// both together, and the channel connects anew.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The checked URLs of a channel: every one `http://` without mutual TLS,
/// `https://` with it.
fn targets(url: &str, tls: bool) -> Result<Vec<crate::balance::Target>, String> {
    let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Err(format!("{url:?} names no URL"));
    }
    urls.into_iter()
        .map(|one| {
            let endpoint =
                Endpoint::from_shared(one.to_string()).map_err(|e| format!("{one:?} is not a valid URL: {e}"))?;
            let uri = endpoint.uri();
            let https = uri.scheme_str() == Some("https");
            if !https && uri.scheme_str() != Some("http") {
                return Err(format!("{one:?} must start with http:// or https://"));
            }
            match (tls, https) {
                (true, false) => {
                    return Err(format!("{one:?} must start with https:// when internal_tls is configured"));
                }
                (false, true) => {
                    return Err(format!(
                        "{one:?} is https://: configure internal_tls (ca_file, cert_file, key_file) for it"
                    ));
                }
                _ => {}
            }
            let host = uri.host().ok_or_else(|| format!("{one:?} names no host"))?;
            Ok(crate::balance::Target {
                authority: uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default(),
                host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
                port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            })
        })
        .collect()
}

/// A lazily connecting channel to `authority` (`host:port`), checking the
/// server's certificate for `name` when TLS is on.
fn connect(
    authority: &str,
    name: &str,
    request_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| format!("{authority:?} is not a valid address: {e}"))?
        .connect_timeout(Duration::from_secs(2).min(request_timeout))
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(match tls {
        // tonic's own TLS cannot reload a client certificate, so the
        // connector does TLS itself; tonic is handed the plain scheme.
        Some(tls) => endpoint.connect_with_connector_lazy(crate::tls::TlsConnector::named(tls, name)),
        None => endpoint.connect_lazy(),
    })
}

fn channel(
    url: &str,
    request_timeout: Duration,
    peer: &'static str,
    metrics: &Metrics,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<TracedChannel, String> {
    let targets = targets(url, tls.is_some())?;
    let [target] = targets.as_slice() else {
        return Err(format!("{url:?}: give one URL here (several are for the secret and vault-config services)"));
    };
    let channel = connect(&target.authority, &target.host, request_timeout, tls)?;
    Ok(TracedChannel::new(channel, peer, metrics.clone()))
}

fn balanced_channel(
    url: &str,
    request_timeout: Duration,
    peer: &'static str,
    metrics: &Metrics,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<TracedChannel, String> {
    let targets = targets(url, tls.is_some())?;
    // One URL naming one address: one connection, nothing to spread.
    if let [target] = targets.as_slice()
        && target.host.parse::<std::net::IpAddr>().is_ok()
    {
        let channel = connect(&target.authority, &target.host, request_timeout, tls)?;
        return Ok(TracedChannel::new(channel, peer, metrics.clone()));
    }
    let balanced = crate::balance::Balanced::start(targets, peer, request_timeout, move |addr, target| {
        connect(&addr.to_string(), &target.host, request_timeout, tls.clone())
    });
    Ok(TracedChannel::balanced(balanced, peer, metrics.clone()))
}

/// A client stack for internal calls: traced channel plus internal credential.
pub type InternalChannel = tonic::codegen::InterceptedService<TracedChannel, InternalClient>;

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_bearer_header_gives_its_token_and_nothing_else_does(
            scheme in proptest::prop_oneof![
                proptest::strategy::Just("Bearer".to_string()),
                proptest::strategy::Just("bearer".to_string()),
                proptest::strategy::Just("BeArEr".to_string()),
                "[A-Za-z]{0,8}",
            ],
            token in "[ -~]{0,40}",
        ) {
            let value = format!("{scheme} {token}");
            let expected = (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim());
            proptest::prop_assert_eq!(bearer_token(&value), expected);
            // No space, no token.
            proptest::prop_assert_eq!(bearer_token(&scheme), None);
        }
    }

    #[test]
    fn token_hashes_match_only_the_same_token() {
        let token = generate_token();
        assert_eq!(token.len(), 64);
        let h = TokenHash::of(&token);
        assert!(h.matches(&TokenHash::from_hex(&h.to_hex()).unwrap()));
        assert!(!h.matches(&TokenHash::of("other")));
        assert!(TokenHash::from_hex("abcd").unwrap_err().contains("32 bytes"));
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn internal_auth_rejects_missing_and_wrong_credentials() {
        let token = SecretString::from(generate_token());
        let mut auth = InternalAuth::new(&token);
        let missing = auth.call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);

        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(auth.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);

        let mut client = InternalClient::new(&token).unwrap();
        let mut ok = client.call(Request::new(())).unwrap();
        act_as(&mut ok, &Principal::user("alice"), Some("spark"), &[Principal::group("eng")]);
        let ok = auth.call(ok).unwrap();
        let call = InternalCall::of(&ok);
        assert_eq!(call.principal, Some(Principal::user("alice")));
        assert_eq!(call.caller.as_deref(), Some("spark"));
        assert_eq!(call.groups, vec![Principal::group("eng")]);
    }

    #[test]
    fn the_internal_token_is_not_printed_with_the_metadata() {
        let token = SecretString::from("tok-canary-4411".to_string());
        let mut client = InternalClient::new(&token).unwrap();
        let request = client.call(Request::new(())).unwrap();
        assert!(!format!("{:?}", request.metadata()).contains("tok-canary-4411"));
    }
}
