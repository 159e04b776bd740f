//! Talking to one Vault (or OpenBao) KV v2 secret: read-only, through
//! vaultrs, with one client and one token per config.
//!
//! AppRole logs in once and keeps the token: it is renewed when two thirds
//! of its lifetime have passed (ahead of use, see [`Connection::keep_fresh`]),
//! and a fresh login happens when renewal is refused, the token is near its
//! maximum lifetime, or Vault answers 403. Logins and renewals are
//! serialized, and a 403 logs in again only if the token that failed is
//! still the current one, so concurrent requests never log in twice. After
//! a failed login, the next waits (exponential backoff with jitter, 1 to
//! 60 s); meanwhile requests fail at once with the last login's failure.
//! Every call is bounded by the configured timeout. Failures are classified
//! ([`FailureKind`]) with Vault's own message and never carry a credential.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use secrets_common::SecretValue;
use secrets_proto::v1 as pb;
use tokio::sync::Mutex;
use tonic::Status;
use tracing::Instrument;
use vaultrs::error::ClientError;

use crate::spec::{Credentials, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    InvalidCredentials,
    NoAccessToPath,
    NotKvV2,
    SecretNotFound,
    NamespaceNotFound,
    Unreachable,
    TimedOut,
    Tls,
    Sealed,
    /// Anything else Vault answered (a 5xx, an unexpected body).
    Other,
}

/// Why Vault could not be used, with what Vault said.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct VaultFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl VaultFailure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The same failure with `context` (the config) in front.
    pub fn context(self, context: &str) -> Self {
        Self { kind: self.kind, message: format!("{context}: {}", self.message) }
    }

    /// The gRPC status a caller gets for it.
    pub fn status(&self) -> Status {
        match self.kind {
            FailureKind::Unreachable | FailureKind::TimedOut | FailureKind::Sealed | FailureKind::Other => {
                Status::unavailable(&self.message)
            }
            FailureKind::SecretNotFound => Status::not_found(&self.message),
            FailureKind::InvalidCredentials
            | FailureKind::NoAccessToPath
            | FailureKind::NotKvV2
            | FailureKind::NamespaceNotFound
            | FailureKind::Tls => Status::failed_precondition(&self.message),
        }
    }

    pub fn outcome(&self) -> pb::VaultConnectionOutcome {
        use pb::VaultConnectionOutcome as O;
        match self.kind {
            FailureKind::InvalidCredentials => O::InvalidCredentials,
            FailureKind::NoAccessToPath => O::NoAccessToPath,
            FailureKind::NotKvV2 => O::NotKvV2,
            FailureKind::SecretNotFound => O::SecretNotFound,
            FailureKind::NamespaceNotFound => O::NamespaceNotFound,
            FailureKind::Unreachable | FailureKind::Other => O::Unreachable,
            FailureKind::TimedOut => O::TimedOut,
            FailureKind::Tls => O::TlsFailure,
            FailureKind::Sealed => O::Sealed,
        }
    }
}

impl From<VaultFailure> for secrets_common::error::Error {
    fn from(f: VaultFailure) -> Self {
        Self::Upstream(f.status())
    }
}

/// The fields of one KV v2 secret.
pub type Fields = BTreeMap<String, SecretValue>;

/// Vault's `auth` answer to a login or renewal.
#[derive(serde::Deserialize)]
struct Auth {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl Drop for Auth {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.client_token);
    }
}

struct Lease {
    token: SecretString,
    /// Renew (or log in again) from here on.
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
    renewable: bool,
    /// The lifetime the login gave: a renewal granting much less means the
    /// token is near its maximum lifetime.
    login_ttl: Duration,
}

impl Lease {
    fn from_auth(token: String, lease_duration: u64, renewable: bool, login_ttl: Option<Duration>) -> Self {
        let now = Instant::now();
        let ttl = Duration::from_secs(lease_duration);
        let (refresh_at, expires_at) =
            if lease_duration == 0 { (None, None) } else { (Some(now + ttl * 2 / 3), Some(now + ttl)) };
        Self {
            token: SecretString::from(token),
            refresh_at,
            expires_at,
            renewable,
            login_ttl: login_ttl.unwrap_or(ttl),
        }
    }

    fn fresh(&self, now: Instant) -> bool {
        self.refresh_at.is_none_or(|r| now < r)
    }

    fn alive(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }
}

/// When [`Connection::approle_token`] logs in.
#[derive(Clone, Copy)]
enum Login<'a> {
    /// When the token is due for renewal or replacement.
    WhenDue,
    /// This token was refused: log in again, unless another request already
    /// replaced it.
    Replacing(&'a SecretString),
    /// Now, whatever the backoff (a test of the connection).
    Now,
}

/// Which request failed, for classifying a 403.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Login,
    Read,
}

/// Shortest and longest wait after a failed login (before jitter).
const LOGIN_BACKOFF_MIN: Duration = Duration::from_secs(2);
const LOGIN_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The AppRole token and what the last logins did.
#[derive(Default)]
struct Session {
    lease: Option<Lease>,
    /// Failed logins in a row, the last one's failure, and when the next
    /// login may be tried.
    failed_logins: u32,
    last_failure: Option<VaultFailure>,
    retry_at: Option<Instant>,
}

impl Session {
    /// The wait after `failed` logins in a row: doubling from
    /// [`LOGIN_BACKOFF_MIN`], at most [`LOGIN_BACKOFF_MAX`], each time
    /// between half and all of it (jitter, so replicas do not log in in step).
    fn backoff(failed: u32) -> Duration {
        let full = LOGIN_BACKOFF_MIN.saturating_mul(1 << failed.saturating_sub(1).min(8)).min(LOGIN_BACKOFF_MAX);
        full.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// One config's connection to Vault.
pub struct Connection {
    target: Target,
    credentials: Credentials,
    http: reqwest::Client,
    session: Mutex<Session>,
    /// Signalled after each login, for [`Connection::keep_fresh`].
    logged_in: std::sync::Arc<tokio::sync::Notify>,
}

impl Connection {
    /// Builds the HTTP client (bounded by `timeout`, trusting the config's
    /// CA certificate as well). Fails only on an unusable CA certificate.
    pub fn new(target: Target, credentials: Credentials, timeout: Duration) -> Result<Self, VaultFailure> {
        let mut http = reqwest::ClientBuilder::new()
            .tls_backend_rustls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(3)));
        if target.host.starts_with("http://") {
            // Plain HTTP: no certificates to load.
            http = http.tls_certs_only(Vec::new());
        } else if let Some(pem) = &target.ca_certificate {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| VaultFailure::new(FailureKind::Tls, format!("ca_certificate is not usable PEM: {e}")))?;
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .build()
            .map_err(|e| VaultFailure::new(FailureKind::Tls, format!("cannot build an HTTPS client: {}", chain(&e))))?;
        Ok(Self {
            target,
            credentials,
            http,
            session: Mutex::new(Session::default()),
            logged_in: std::sync::Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// One span per request to Vault: which request, and where.
    fn span(&self, operation: &'static str) -> tracing::Span {
        tracing::info_span!(
            "vault.request",
            vault.operation = operation,
            vault.host = %self.target.host,
            vault.mount = %self.target.kv.mount
        )
    }

    fn describe(&self) -> String {
        let kv = &self.target.kv;
        match &self.target.namespace {
            Some(ns) => format!("{} (namespace {ns}, {}/data/{})", self.target.host, kv.mount, kv.secret),
            None => format!("{} ({}/data/{})", self.target.host, kv.mount, kv.secret),
        }
    }

    /// One request to Vault (`path` under `/v1/`), with the token and
    /// namespace, taking at most [`MAX_RESPONSE_BYTES`] of answer: a server
    /// that sends more is refused, not buffered. `Ok(Err(..))` is the error
    /// Vault answered, for [`Self::classify_now`].
    async fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<serde_json::Value>,
        operation: &'static str,
    ) -> Result<Result<Vec<u8>, ClientError>, VaultFailure> {
        let at = self.describe();
        // As the Vault CLI sends it (Vault Agent and Proxy may require it).
        let mut request =
            self.http.request(method, format!("{}/v1/{path}", self.target.host)).header("X-Vault-Request", "true");
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.expose_secret());
        }
        if let Some(ns) = &self.target.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            request = request.header("Content-Type", "application/json").body(body.to_string());
        }
        let (status, body) = async {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, capped_body(response, MAX_RESPONSE_BYTES).await?))
        }
        .instrument(self.span(operation))
        .await
        .map_err(|e| transport_error(&at, &e))?;
        let Some(body) = body else {
            return Err(VaultFailure::new(
                FailureKind::Other,
                format!("vault at {at} answered more than {} MiB; refused", MAX_RESPONSE_BYTES >> 20),
            ));
        };
        if status.is_success() {
            return Ok(Ok(body));
        }
        // Vault answers errors in JSON (`{"errors": [...]}`; a deleted KV v2
        // version, its metadata). Anything else came from something in
        // front of Vault or another server: say so rather than read its
        // status as Vault's (a proxy's 403 is no refused credential).
        #[derive(serde::Deserialize)]
        struct Errors {
            #[serde(default)]
            errors: Vec<String>,
        }
        match serde_json::from_slice::<Errors>(&body) {
            Ok(e) => Ok(Err(ClientError::APIError { code: status.as_u16(), errors: e.errors })),
            Err(_) => Err(VaultFailure::new(
                FailureKind::Other,
                format!(
                    "vault at {at} answered HTTP {} without a Vault error: a proxy or a server other than Vault answered",
                    status.as_u16()
                ),
            )),
        }
    }

    /// A login or renewal: the token and lease in Vault's `auth` answer.
    async fn auth(
        &self,
        path: &str,
        token: Option<&SecretString>,
        body: serde_json::Value,
        operation: &'static str,
    ) -> Result<Auth, VaultFailure> {
        let body = match self.exchange(reqwest::Method::POST, path, token, Some(body), operation).await? {
            Ok(body) => body,
            Err(e) => return Err(self.classify_now(e, Stage::Login)),
        };
        #[derive(serde::Deserialize)]
        struct Answer {
            auth: Option<Auth>,
        }
        match serde_json::from_slice::<Answer>(&body) {
            Ok(Answer { auth: Some(auth) }) => Ok(auth),
            _ => Err(VaultFailure::new(
                FailureKind::Other,
                format!("vault at {} answered {operation} without a token", self.describe()),
            )),
        }
    }

    /// Whether Vault takes the token (`GET auth/token/lookup-self`).
    async fn look_up(&self, token: &SecretString) -> Result<(), VaultFailure> {
        match self
            .exchange(reqwest::Method::GET, "auth/token/lookup-self", Some(token), None, "token.lookup_self")
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify_now(e, Stage::Login)),
        }
    }

    /// A usable token: the configured one, or the AppRole lease (renewed or
    /// replaced when due).
    async fn token(&self) -> Result<SecretString, VaultFailure> {
        self.approle_token(Login::WhenDue).await
    }

    async fn approle_token(&self, login: Login<'_>) -> Result<SecretString, VaultFailure> {
        let (role_id, secret_id, mount) = match &self.credentials {
            Credentials::Token { token } => return Ok(token.clone()),
            Credentials::AppRole { role_id, secret_id, mount } => (role_id, secret_id, mount),
        };
        let mut session = self.session.lock().await;
        let now = Instant::now();
        if let Some(current) = session.lease.as_ref() {
            match login {
                // Another request has logged in since this token failed.
                Login::Replacing(failed) if current.token.expose_secret() != failed.expose_secret() => {
                    return Ok(current.token.clone());
                }
                Login::WhenDue if current.fresh(now) => return Ok(current.token.clone()),
                Login::WhenDue if current.renewable && current.alive(now) => match self.renew(current).await {
                    Ok(renewed) if renewed.expires_at.is_some_and(|e| e > now + current.login_ttl / 3) => {
                        let token = renewed.token.clone();
                        session.lease = Some(renewed);
                        tracing::debug!(host = %self.target.host, "vault token renewed");
                        return Ok(token);
                    }
                    Ok(_) => tracing::debug!(host = %self.target.host, "vault token near its maximum lifetime"),
                    Err(e) => tracing::info!(host = %self.target.host, error = %e, "vault token renewal refused"),
                },
                _ => {}
            }
        }
        if !matches!(login, Login::Now)
            && let (Some(at), Some(last)) = (session.retry_at, &session.last_failure)
            && now < at
        {
            return Err(VaultFailure::new(
                last.kind,
                format!(
                    "{} (after {} failed logins; the next in {} s)",
                    last.message,
                    session.failed_logins,
                    (at - now).as_secs().max(1)
                ),
            ));
        }
        let credentials = serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() });
        let logged_in = self.auth(&format!("auth/{mount}/login"), None, credentials, "approle.login").await;
        let mut auth = match logged_in {
            Ok(auth) => auth,
            Err(failure) => {
                session.failed_logins += 1;
                let wait = Session::backoff(session.failed_logins);
                session.retry_at = Some(Instant::now() + wait);
                session.last_failure = Some(failure.clone());
                session.lease = None;
                tracing::warn!(
                    host = %self.target.host,
                    failed_logins = session.failed_logins,
                    retry_in_ms = wait.as_millis() as u64,
                    error = %failure,
                    "vault login failed"
                );
                return Err(failure);
            }
        };
        tracing::info!(host = %self.target.host, ttl_s = auth.lease_duration, "logged in to vault with approle");
        let fresh = Lease::from_auth(std::mem::take(&mut auth.client_token), auth.lease_duration, auth.renewable, None);
        let token = fresh.token.clone();
        *session = Session { lease: Some(fresh), ..Session::default() };
        self.logged_in.notify_one();
        Ok(token)
    }

    /// Renews the AppRole token ahead of its expiry for as long as the
    /// connection exists, so a request rarely waits on a renewal.
    /// `on_refused` runs when Vault refuses the credentials: the values read
    /// with them are not to be served any more.
    pub fn keep_fresh(self: &std::sync::Arc<Self>, on_refused: impl Fn() + Send + Sync + 'static) {
        if !matches!(self.credentials, Credentials::AppRole { .. }) {
            return;
        }
        let weak = std::sync::Arc::downgrade(self);
        let logged_in = self.logged_in.clone();
        tokio::spawn(async move {
            loop {
                let due = match weak.upgrade() {
                    Some(c) => c.session.lock().await.lease.as_ref().and_then(|l| l.refresh_at),
                    None => return,
                };
                match due {
                    // No token yet, or one that never expires: until a login
                    // (looking again now and then whether the connection is gone).
                    None => {
                        let _ = tokio::time::timeout(Duration::from_secs(30), logged_in.notified()).await;
                        continue;
                    }
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                }
                let Some(c) = weak.upgrade() else { return };
                if let Err(f) = c.token().await {
                    if f.kind == FailureKind::InvalidCredentials {
                        on_refused();
                    }
                    drop(c);
                    // A failed login has set its backoff; wait it out.
                    tokio::time::sleep(LOGIN_BACKOFF_MIN).await;
                }
            }
        });
    }

    async fn renew(&self, current: &Lease) -> Result<Lease, VaultFailure> {
        let mut auth =
            self.auth("auth/token/renew-self", Some(&current.token), serde_json::json!({}), "token.renew_self").await?;
        Ok(Lease::from_auth(
            std::mem::take(&mut auth.client_token),
            auth.lease_duration,
            auth.renewable,
            Some(current.login_ttl),
        ))
    }

    /// Checks the credentials, then reads the secret: for test connection.
    pub async fn test(&self) -> Result<usize, VaultFailure> {
        match &self.credentials {
            Credentials::Token { token } => {
                self.look_up(token).await?;
            }
            // A test logs in for real, whatever the backoff says.
            Credentials::AppRole { .. } => {
                self.approle_token(Login::Now).await?;
            }
        }
        Ok(self.read().await?.len())
    }

    /// The fields of the secret. A 403 gets one fresh login (AppRole; unless
    /// another request has logged in since) and one retry.
    pub async fn read(&self) -> Result<Fields, VaultFailure> {
        Ok(self.read_version(None).await?.0)
    }

    /// The fields of the secret at `version` (`None`: the current one), and
    /// which version they are.
    pub async fn read_version(&self, version: Option<u64>) -> Result<(Fields, u64), VaultFailure> {
        let token = self.token().await?;
        match self.read_with(&token, version).await {
            Err(f)
                if f.kind == FailureKind::InvalidCredentials
                    && matches!(self.credentials, Credentials::AppRole { .. }) =>
            {
                let token = self.approle_token(Login::Replacing(&token)).await?;
                self.read_with(&token, version).await
            }
            other => other,
        }
    }

    /// The secret's current KV v2 version, from its metadata
    /// (`GET /v1/<mount>/metadata/<secret>`): no value moves. A token whose
    /// policy does not cover the metadata path gets `NoAccessToPath`.
    pub async fn current_version(&self) -> Result<u64, VaultFailure> {
        let token = self.token().await?;
        let kv = &self.target.kv;
        let at = self.describe();
        let path = format!("{}/metadata/{}", kv.mount, kv.secret);
        let body = match self.exchange(reqwest::Method::GET, &path, Some(&token), None, "kv2.metadata").await? {
            Ok(body) => body,
            Err(e) => return Err(self.classify(e, Stage::Read, &token).await),
        };
        #[derive(serde::Deserialize)]
        struct Metadata {
            data: MetadataData,
        }
        #[derive(serde::Deserialize)]
        struct MetadataData {
            current_version: u64,
        }
        let read: Metadata = serde_json::from_slice(&body).map_err(|e| {
            VaultFailure::new(
                FailureKind::Other,
                format!("vault at {at} answered a body that is not KV v2 metadata: {e}"),
            )
        })?;
        Ok(read.data.current_version)
    }

    /// Reads the secret (`GET /v1/<mount>/data/<secret>`), taking at most
    /// [`MAX_RESPONSE_BYTES`] of answer: a server that sends more is refused,
    /// not buffered.
    async fn read_with(&self, token: &SecretString, version: Option<u64>) -> Result<(Fields, u64), VaultFailure> {
        let kv = &self.target.kv;
        let at = self.describe();
        let path = match version {
            None => format!("{}/data/{}", kv.mount, kv.secret),
            Some(v) => format!("{}/data/{}?version={v}", kv.mount, kv.secret),
        };
        let body = match self.exchange(reqwest::Method::GET, &path, Some(token), None, "kv2.read").await? {
            Ok(body) => body,
            Err(e) => return Err(self.classify(e, Stage::Read, token).await),
        };
        #[derive(serde::Deserialize)]
        struct Read {
            data: ReadData,
        }
        #[derive(serde::Deserialize)]
        struct ReadData {
            data: Option<BTreeMap<String, serde_json::Value>>,
            #[serde(default)]
            metadata: Option<ReadMetadata>,
        }
        #[derive(serde::Deserialize)]
        struct ReadMetadata {
            #[serde(default)]
            version: u64,
        }
        let read: Read = serde_json::from_slice(&body).map_err(|e| {
            VaultFailure::new(
                FailureKind::Other,
                format!("vault at {at} answered a body that is not a KV v2 read: {e}"),
            )
        })?;
        let read_version = read.data.metadata.as_ref().map_or(0, |m| m.version);
        let fields = read
            .data
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let bytes = match v {
                    serde_json::Value::String(s) => s.into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (k, SecretValue::new(bytes))
            })
            .collect();
        Ok((fields, read_version))
    }

    /// Classifies a failure that needs no further question to Vault.
    fn classify_now(&self, e: ClientError, stage: Stage) -> VaultFailure {
        let at = self.describe();
        match e {
            ClientError::APIError { code, errors } => {
                let said = said(&errors);
                match code {
                    503 => VaultFailure::new(
                        FailureKind::Sealed,
                        format!("vault at {at} is sealed or unavailable: {said}"),
                    ),
                    _ if said.contains("sealed") => {
                        VaultFailure::new(FailureKind::Sealed, format!("vault at {at} is sealed: {said}"))
                    }
                    404 if said.contains("namespace not found") => VaultFailure::new(
                        FailureKind::NamespaceNotFound,
                        format!("vault at {at}: the namespace does not exist: {said}"),
                    ),
                    400 | 403 if stage == Stage::Login => VaultFailure::new(
                        FailureKind::InvalidCredentials,
                        format!("vault at {at} refused the credentials: {said}"),
                    ),
                    403 => VaultFailure::new(
                        FailureKind::NoAccessToPath,
                        format!("vault at {at}: no access to the path: {said}"),
                    ),
                    404 => VaultFailure::new(
                        FailureKind::SecretNotFound,
                        format!("vault at {at}: the secret does not exist: {said}"),
                    ),
                    code => VaultFailure::new(FailureKind::Other, format!("vault at {at} answered {code}: {said}")),
                }
            }
            ClientError::RestClientError { source } => transport(&at, &source),
            other => VaultFailure::new(FailureKind::Other, format!("vault at {at}: {}", chain(&other))),
        }
    }

    /// Classifies a failure, asking Vault what a 403 or 404 means: a 403 on
    /// a read is a bad token when the token cannot look itself up, and a
    /// 404 is a missing secret only on a KV v2 mount.
    async fn classify(&self, e: ClientError, stage: Stage, token: &SecretString) -> VaultFailure {
        let failure = self.classify_now(e, stage);
        match failure.kind {
            FailureKind::NoAccessToPath => {
                if self.look_up(token).await.is_err() {
                    return VaultFailure::new(
                        FailureKind::InvalidCredentials,
                        format!(
                            "vault at {} refused the credentials: the token is invalid, expired or revoked",
                            self.describe()
                        ),
                    );
                }
                // A KV v1 mount refuses `<mount>/data/...` to a token that
                // may read only its own paths; the mount tells its version
                // to any token with access below it.
                match self.mount_version(token).await {
                    Some(v) if v != 2 => self.not_kv_v2(v),
                    _ => failure,
                }
            }
            FailureKind::SecretNotFound => match self.mount_version(token).await {
                Some(2) => failure,
                Some(v) => self.not_kv_v2(v),
                None => VaultFailure::new(
                    FailureKind::NotKvV2,
                    format!("vault at {}: there is no KV v2 mount at {}", self.describe(), self.target.kv.mount),
                ),
            },
            _ => failure,
        }
    }

    fn not_kv_v2(&self, version: u8) -> VaultFailure {
        VaultFailure::new(
            FailureKind::NotKvV2,
            format!(
                "vault at {}: mount {} is KV version {version}; only KV v2 is supported",
                self.describe(),
                self.target.kv.mount
            ),
        )
    }

    /// The KV version of the config's mount, as the Vault CLI finds it
    /// (`sys/internal/ui/mounts`); `None` when there is no KV mount.
    async fn mount_version(&self, token: &SecretString) -> Option<u8> {
        let url = format!("{}/v1/sys/internal/ui/mounts/{}", self.target.host, self.target.kv.mount);
        let mut request = self.http.get(url).header("X-Vault-Token", token.expose_secret());
        if let Some(ns) = &self.target.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        let response = request.send().instrument(self.span("sys.internal.ui.mounts")).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = capped_body(response, MAX_RESPONSE_BYTES).await.ok()??;
        let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let data = body.get("data")?;
        if data.get("type").and_then(|t| t.as_str()) != Some("kv") {
            return None;
        }
        match data.get("options").and_then(|o| o.get("version")).and_then(|v| v.as_str()) {
            Some("2") => Some(2),
            _ => Some(1),
        }
    }
}

/// What Vault said, without the wrapping of its error lists
/// (`1 error occurred:\n\t* permission denied\n\n`).
fn said(errors: &[String]) -> String {
    let mut parts = Vec::new();
    for e in errors {
        let e = e.trim();
        match e.split_once("occurred:") {
            Some((head, list)) if head.trim_end().ends_with("error") || head.trim_end().ends_with("errors") => parts
                .extend(list.split("\n").map(|l| l.trim().trim_start_matches('*').trim()).filter(|l| !l.is_empty())),
            _ => parts.push(e),
        }
    }
    if parts.is_empty() { "(no message)".into() } else { format!("\"{}\"", parts.join("; ")) }
}

/// Every message of an error chain, joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A request that got no answer: refused, timed out, or a TLS failure.
fn transport(at: &str, e: &rustify::errors::ClientError) -> VaultFailure {
    let text = chain(e);
    let reqwest = find_reqwest(e);
    let lower = text.to_lowercase();
    if reqwest.is_some_and(reqwest::Error::is_timeout) || lower.contains("timed out") {
        return VaultFailure::new(FailureKind::TimedOut, format!("vault at {at} did not answer in time: {text}"));
    }
    if is_tls_failure(e, &lower) {
        return tls_failure(at, &text, &lower);
    }
    VaultFailure::new(FailureKind::Unreachable, format!("vault at {at} is unreachable: {text}"))
}

/// The most of one Vault answer read; more is refused.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The body, read chunk by chunk; `None` when it passes `limit`.
async fn capped_body(mut response: reqwest::Response, limit: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// As [`transport`], for a request made with reqwest directly.
fn transport_error(at: &str, e: &reqwest::Error) -> VaultFailure {
    let text = chain(e);
    let lower = text.to_lowercase();
    if e.is_timeout() || lower.contains("timed out") {
        return VaultFailure::new(FailureKind::TimedOut, format!("vault at {at} did not answer in time: {text}"));
    }
    if is_tls_failure(e, &lower) {
        return tls_failure(at, &text, &lower);
    }
    VaultFailure::new(FailureKind::Unreachable, format!("vault at {at} is unreachable: {text}"))
}

/// A TLS failure: a rustls error anywhere in the chain (an HTTPS request
/// to a plaintext port ends in one: the answer is not a TLS record), or
/// words only TLS failures use.
fn is_tls_failure(e: &(dyn std::error::Error + 'static), lower: &str) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<rustls::Error>().is_some()
            || err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        current = err.source();
    }
    ["certificate", "tls", "handshake", "unknownissuer", "invalid peer", "corrupt message", "invalidcontenttype"]
        .iter()
        .any(|w| lower.contains(w))
}

fn tls_failure(at: &str, text: &str, lower: &str) -> VaultFailure {
    let hint = if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
        " (the server does not speak TLS on that port: is the host http:// rather than https://?)"
    } else {
        ""
    };
    VaultFailure::new(FailureKind::Tls, format!("vault at {at}: TLS failure: {text}{hint}"))
}

fn find_reqwest<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a reqwest::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            return Some(r);
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::VaultConnectionOutcome as O;
    use tonic::Code;

    #[test]
    fn each_failure_is_one_status_code_and_one_test_outcome() {
        use FailureKind as K;
        let table = [
            (K::InvalidCredentials, Code::FailedPrecondition, O::InvalidCredentials),
            (K::NoAccessToPath, Code::FailedPrecondition, O::NoAccessToPath),
            (K::NotKvV2, Code::FailedPrecondition, O::NotKvV2),
            (K::NamespaceNotFound, Code::FailedPrecondition, O::NamespaceNotFound),
            (K::Tls, Code::FailedPrecondition, O::TlsFailure),
            (K::SecretNotFound, Code::NotFound, O::SecretNotFound),
            (K::Unreachable, Code::Unavailable, O::Unreachable),
            (K::TimedOut, Code::Unavailable, O::TimedOut),
            (K::Sealed, Code::Unavailable, O::Sealed),
            (K::Other, Code::Unavailable, O::Unreachable),
        ];
        for (kind, code, outcome) in table {
            let failure = VaultFailure::new(kind, "vault said no").context("vault config \"lake\"");
            let status = failure.status();
            assert_eq!((status.code(), failure.outcome()), (code, outcome), "{kind:?}");
            assert_eq!(status.message(), "vault config \"lake\": vault said no");
        }
    }

    #[test]
    fn a_token_is_renewed_after_two_thirds_of_its_lease_and_dead_at_its_end() {
        let lease = Lease::from_auth("t".into(), 30, true, None);
        let start = Instant::now();
        assert!(lease.fresh(start) && lease.alive(start));
        assert!(!lease.fresh(start + Duration::from_secs(21)), "due for renewal past 20 s");
        assert!(lease.alive(start + Duration::from_secs(21)));
        assert!(!lease.alive(start + Duration::from_secs(31)), "expired past 30 s");
        assert_eq!(lease.login_ttl, Duration::from_secs(30));

        let renewed = Lease::from_auth("t".into(), 5, true, Some(Duration::from_secs(30)));
        assert_eq!(renewed.login_ttl, Duration::from_secs(30), "a renewal keeps the login's lifetime");

        let forever = Lease::from_auth("root".into(), 0, false, None);
        let much_later = start + Duration::from_secs(365 * 24 * 3600);
        assert!(forever.fresh(much_later) && forever.alive(much_later), "a token without a lease never expires");
    }

    #[test]
    fn failed_logins_back_off_doubling_with_jitter_up_to_a_minute() {
        for failed in 1..=20u32 {
            let full = LOGIN_BACKOFF_MIN.saturating_mul(1 << (failed - 1).min(8)).min(LOGIN_BACKOFF_MAX);
            for _ in 0..50 {
                let wait = Session::backoff(failed);
                assert!(wait >= full / 2 && wait <= full, "after {failed}: {wait:?} outside {:?}..={full:?}", full / 2);
            }
        }
        assert_eq!(
            LOGIN_BACKOFF_MIN.saturating_mul(1 << 8).min(LOGIN_BACKOFF_MAX),
            LOGIN_BACKOFF_MAX,
            "the cap is reached"
        );
    }

    #[test]
    fn vaults_error_lists_are_unwrapped_and_quoted() {
        assert_eq!(said(&["1 error occurred:\n\t* permission denied\n\n".into()]), "\"permission denied\"");
        assert_eq!(said(&["2 errors occurred:\n\t* a\n\t* b\n\n".into()]), "\"a; b\"");
        assert_eq!(said(&["no handler for route".into(), " x ".into()]), "\"no handler for route; x\"");
        assert_eq!(said(&[]), "(no message)");
    }
}
