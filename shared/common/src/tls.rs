//! TLS for the gateway's listener and mutual TLS between the services, with
//! rustls. Certificates and keys come from files and are reloaded when the
//! files change (cert-manager rotates them in place), checked once per
//! `reload_interval_ms` by a background task; a reload that fails keeps the
//! last good pair and says why in the log.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use serde::Deserialize;

/// The shortest wait between two looks at the files.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

fn default_reload_interval_ms() -> u64 {
    10_000
}

/// The gateway's listener: serve TLS with this certificate and key.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often a background task looks for changed files (at least
    /// every 100 ms).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

/// Mutual TLS between the gateway and the services: every internal listener
/// asks for a client certificate chaining to `ca_file`, and every internal
/// client presents its own and checks the server's against `ca_file`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalTlsConfig {
    /// PEM CA certificate(s) the internal certificates chain to.
    pub ca_file: PathBuf,
    /// This service's certificate chain (used as server and as client).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Listeners only: when set, a client certificate must also be valid for
    /// one of these DNS names (for example `gateway.secrets.svc`).
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

/// The one crypto provider of the process.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2; nothing older is offered or accepted.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key_file.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!("{} does not belong to the certificate in {}: {e}", key_file.display(), cert_file.display())
    })?;
    Ok(certified)
}

/// The CA certificates of `path` as a trust store.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Modification time and length of both files: what tells a rotation.
type Stamp = [(Option<SystemTime>, u64); 2];

#[expect(clippy::disallowed_methods, reason = "called at startup and, after that, only inside spawn_blocking")]
fn stamp(files: &[PathBuf; 2]) -> Stamp {
    files.clone().map(|f| match std::fs::metadata(f) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    })
}

/// A certificate and key from files, reloaded when the files change: a
/// background task looks at the files once per interval, off the runtime
/// threads, so a handshake never waits on the file system.
pub struct ReloadingKey {
    files: [PathBuf; 2],
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ReloadingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingKey").field("cert_file", &self.files[0]).finish_non_exhaustive()
    }
}

impl ReloadingKey {
    /// Loads the pair now; errors name the file and what is wrong with it.
    /// Inside a Tokio runtime, starts watching the files every `interval`
    /// for as long as the key is in use.
    pub fn load(cert_file: &Path, key_file: &Path, interval: Duration) -> Result<Arc<Self>, String> {
        let files = [cert_file.to_path_buf(), key_file.to_path_buf()];
        let stamp = stamp(&files);
        let key = Arc::new(read_key(cert_file, key_file)?);
        let this = Arc::new(Self { files, current: std::sync::RwLock::new(key) });
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(Self::watch(Arc::downgrade(&this), stamp, interval.max(MIN_RELOAD_INTERVAL)));
            }
            Err(_) => tracing::warn!(
                cert_file = %cert_file.display(),
                "loaded outside a Tokio runtime: the certificate will not be reloaded when its files change"
            ),
        }
        Ok(this)
    }

    /// Reloads the pair when the files change, until the key is dropped.
    async fn watch(key: std::sync::Weak<Self>, mut last: Stamp, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let Some(files) = key.upgrade().map(|k| k.files.clone()) else { return };
            let cert_file = files[0].clone();
            let checked = tokio::task::spawn_blocking(move || {
                let now = stamp(&files);
                (now != last).then(|| (now, read_key(&files[0], &files[1])))
            })
            .await;
            let Some(this) = key.upgrade() else { return };
            match checked {
                Ok(Some((now, Ok(fresh)))) => {
                    *this.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
                    last = now;
                    tracing::info!(cert_file = %cert_file.display(), "reloaded the TLS certificate");
                }
                // Half-written files during a rotation: try again at the next interval.
                Ok(Some((_, Err(e)))) => tracing::warn!(error = %e, "kept the previous TLS certificate"),
                Ok(None) | Err(_) => {}
            }
        }
    }

    /// The pair to present.
    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The gateway's public listener: TLS 1.2+, HTTP/2, no client certificate.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let key =
        ReloadingKey::load(&config.cert_file, &config.key_file, Duration::from_millis(config.reload_interval_ms))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(key);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// Client certificate verification against the internal CA, and then, when
/// names are listed, against those names.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.names.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("unreadable client certificate: {e}")))?;
        if self.names.iter().any(|n| cert.verify_is_valid_for_subject_name(n).is_ok()) {
            Ok(verified)
        } else {
            Err(rustls::Error::General("the client certificate names none of allowed_clients".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Both ends of mutual TLS for one service, built once from its config.
#[derive(Clone, Debug)]
pub struct InternalTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl InternalTls {
    pub fn new(config: &InternalTlsConfig) -> Result<Self, String> {
        let roots = Arc::new(read_roots(&config.ca_file)?);
        let key =
            ReloadingKey::load(&config.cert_file, &config.key_file, Duration::from_millis(config.reload_interval_ms))?;
        let names = config
            .allowed_clients
            .iter()
            .enumerate()
            .map(|(i, n)| {
                ServerName::try_from(n.clone())
                    .map_err(|_| format!("internal_tls.allowed_clients[{i}]: {n:?} is not a DNS name or IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("{}: {e}", config.ca_file.display()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(NamedClients { inner: verifier, names }))
            .with_cert_resolver(key.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_cert_resolver(key);
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { server: Arc::new(server), client: Arc::new(client) })
    }
}

/// A connector for tonic's `Endpoint::connect_with_connector_lazy`: TCP with
/// TCP_NODELAY, then TLS checking the server's name from the URL (or the
/// name given, when the URL holds one replica's address).
#[derive(Clone)]
pub struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
    name: Option<String>,
}

impl TlsConnector {
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        Self { connector: tokio_rustls::TlsConnector::from(config), name: None }
    }

    /// Checks the server's certificate for `name`, wherever it connects.
    pub fn named(config: Arc<rustls::ClientConfig>, name: &str) -> Self {
        Self { connector: tokio_rustls::TlsConnector::from(config), name: Some(name.to_string()) }
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (connector, name) = (self.connector.clone(), self.name.clone());
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = name.unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name.clone()).map_err(|e| invalid(format!("{name}: {e}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Accepts TCP connections from `listener` and completes TLS handshakes
/// concurrently (a slow client never holds up the others), yielding the
/// established streams. Failed handshakes (plaintext clients, unknown CAs,
/// names not allowed) are logged and dropped.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "refused a TLS handshake"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether the call arrived over TLS with a verified client certificate.
pub fn has_client_certificate<T>(request: &tonic::Request<T>) -> bool {
    request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .is_some_and(|c| !c.is_empty())
}
