//! Bearer tokens, the internal credential between services, and the call
//! metadata that carries the acting principal across hops.

use std::{fmt, time::Duration};

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
};

/// `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
/// Set by a platform-service caller: the principal it acts for.
pub const ON_BEHALF_OF: &str = "x-on-behalf-of";
/// Set by the gateway on internal hops: the principal the call acts as.
pub const PRINCIPAL: &str = "x-iomete-principal";
/// Set by the gateway on internal hops: the authenticated caller (token name).
pub const CALLER: &str = "x-iomete-caller";

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
    let value = metadata.get(AUTHORIZATION)?.to_str().ok()?;
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
}

impl InternalCall {
    /// The call's context, set by [`InternalAuth`].
    pub fn of<T>(request: &Request<T>) -> Self {
        request.extensions().get::<InternalCall>().cloned().unwrap_or_default()
    }

    /// The acting principal, or `UNAUTHENTICATED` when the call carries none.
    pub fn require_principal(&self) -> Result<&Principal, Status> {
        self.principal.as_ref().ok_or_else(|| {
            Status::unauthenticated(format!("the call names no principal; set the {PRINCIPAL} metadata"))
        })
    }
}

/// Server-side check of the internal credential: the internal services accept
/// calls only from the gateway (and from each other), never directly.
#[derive(Clone)]
pub struct InternalAuth {
    expected: TokenHash,
}

impl InternalAuth {
    pub fn new(token: &SecretString) -> Self {
        Self { expected: TokenHash::of(token.expose_secret()) }
    }
}

impl Interceptor for InternalAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = bearer(request.metadata()).ok_or_else(|| {
            Status::unauthenticated("missing internal credential: this service accepts calls only from the gateway")
        })?;
        if !self.expected.matches(&TokenHash::of(presented)) {
            return Err(Status::unauthenticated(
                "wrong internal credential: this service accepts calls only from the gateway",
            ));
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
        request.extensions_mut().insert(InternalCall { principal, caller });
        Ok(request)
    }
}

/// Client-side interceptor for internal hops: adds the internal credential.
/// (The trace context is added by the [`TracedChannel`] underneath.)
#[derive(Clone)]
pub struct InternalClient {
    authorization: AsciiMetadataValue,
}

impl InternalClient {
    pub fn new(token: &SecretString) -> Result<Self, String> {
        let mut authorization: AsciiMetadataValue = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| "the internal token must be printable ASCII".to_string())?;
        authorization.set_sensitive(true);
        Ok(Self { authorization })
    }
}

impl Interceptor for InternalClient {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.authorization.clone());
        Ok(request)
    }
}

/// Marks a request to an internal service as acting for `principal`.
pub fn act_as<T>(request: &mut Request<T>, principal: &Principal, caller: Option<&str>) {
    if let Ok(v) = principal.to_string().parse() {
        request.metadata_mut().insert(PRINCIPAL, v);
    }
    if let Some(v) = caller.and_then(|c| c.parse().ok()) {
        request.metadata_mut().insert(CALLER, v);
    }
}

/// A channel to another service that connects on first use and reconnects
/// by itself, so services start in any order and recover when a peer returns.
/// Every call is bounded by `request_timeout`, traced, and counted as a
/// backend call of `peer`.
pub fn internal_channel(
    url: &str,
    request_timeout: Duration,
    peer: &'static str,
    metrics: &Metrics,
) -> Result<TracedChannel, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let channel: Channel = endpoint
        .connect_timeout(Duration::from_secs(2).min(request_timeout))
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(TracedChannel::new(channel, peer, metrics.clone()))
}

/// A client stack for internal calls: traced channel plus internal credential.
pub type InternalChannel = tonic::codegen::InterceptedService<TracedChannel, InternalClient>;

#[cfg(test)]
mod tests {
    use super::*;

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
        act_as(&mut ok, &Principal::user("alice"), Some("spark"));
        let ok = auth.call(ok).unwrap();
        let call = InternalCall::of(&ok);
        assert_eq!(call.principal, Some(Principal::user("alice")));
        assert_eq!(call.caller.as_deref(), Some("spark"));
    }

    #[test]
    fn the_internal_token_is_not_printed_with_the_metadata() {
        let token = SecretString::from("tok-canary-4411".to_string());
        let mut client = InternalClient::new(&token).unwrap();
        let request = client.call(Request::new(())).unwrap();
        assert!(!format!("{:?}", request.metadata()).contains("tok-canary-4411"));
    }
}
