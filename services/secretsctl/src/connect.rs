//! Where the gateway is and who calls it: flags, then the environment
//! (`SECRETS_ADDR`, `SECRETS_TOKEN`, `SECRETS_TOKEN_FILE`), then a profile of
//! the profiles file (`~/.config/secretsctl/config.toml`). A profiles or
//! token file that others may read is refused.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use serde::Deserialize;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use zeroize::Zeroizing;

use crate::failure::{Result, local};

/// The gateway's address when nothing names one: the local stack's.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The gateway, e.g. https://secrets.example.com:443 [default: see below]
    #[arg(long, global = true, value_name = "URL")]
    pub addr: Option<String>,
    /// A file holding the bearer token (mode 600). The token itself may be
    /// in SECRETS_TOKEN; there is no flag for it, so it never shows in the
    /// process list.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Take the address and the token from this profile of the profiles
    /// file, whatever the environment says [default: SECRETSCTL_PROFILE, else
    /// the file's `current`]
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// The profiles file [default: SECRETSCTL_CONFIG, else
    /// ~/.config/secretsctl/config.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the gateway's certificate; needed for https
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS, with --key-file
    #[arg(long, global = true, value_name = "PATH", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, global = true, value_name = "PATH", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Send the token over plain http to a host other than this machine
    /// (anyone on the way can read it)
    #[arg(long, global = true)]
    pub insecure: bool,
    /// How long one call may take, in seconds
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
    /// Act for this principal (user:alice): for platform-service
    /// credentials, as the platform's components do (x-on-behalf-of)
    #[arg(long, global = true, value_name = "PRINCIPAL")]
    pub on_behalf_of: Option<String>,
}

/// The profiles file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilesFile {
    /// The profile used when `--profile` is not given.
    current: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    addr: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(token) = &mut self.token {
            zeroize::Zeroize::zeroize(token);
        }
    }
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

/// Reads a file that holds a credential. It is opened first and then
/// checked, so what is checked is what is read: it must belong to this user
/// (or root) and be closed to everyone else.
fn read_private(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, PermissionsExt},
    };
    let failed = |e: std::io::Error| local(format!("{what} {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(local(format!(
            "{what} {} may be read by others (mode {mode:o}); it holds a credential: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(local(format!(
            "{what} {} belongs to another user (uid {}); it holds a credential: use a file of your own, mode 600",
            path.display(),
            meta.uid()
        )));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(failed)?;
    Ok(bytes)
}

fn default_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("secretsctl").join("config.toml"))
}

fn read_token(path: &Path) -> Result<Zeroizing<String>> {
    let bytes = read_private(path, "the token file")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| local(format!("the token file {} does not hold text", path.display())))?;
    Ok(Zeroizing::new(text.trim().to_string()))
}

/// A variable of the environment, when set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Where and as whom to call, resolved.
pub struct Connection {
    pub addr: String,
    token: Option<Zeroizing<String>>,
    ca_file: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    timeout: Duration,
    insecure: bool,
    on_behalf_of: Option<String>,
}

/// Where the address and the token come from: both from one place, so that
/// a token is never sent to an address meant for another.
enum Origin {
    Environment,
    Profile(Profile),
    Nothing,
}

impl ConnectArgs {
    fn profile(&self, name: Option<String>) -> Result<Option<Profile>> {
        let (path, named) = match self.config.clone().or_else(|| env("SECRETSCTL_CONFIG").map(PathBuf::from)) {
            Some(p) => (Some(p), true),
            None => (default_config(), false),
        };
        let Some(path) = path else { return Ok(None) };
        if !path.exists() {
            if named || name.is_some() {
                return Err(local(format!("the profiles file {} does not exist", path.display())));
            }
            return Ok(None);
        }
        let bytes = read_private(&path, "the profiles file")?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| local(format!("the profiles file {} does not hold text", path.display())))?;
        let file = toml::from_str::<ProfilesFile>(text)
            .map_err(|e| local(format!("the profiles file {}: {}", path.display(), e.message())))?;
        let mut profiles = file.profiles;
        let Some(name) = name.or(file.current.clone()) else { return Ok(None) };
        let mut profile = profiles.remove(&name).ok_or_else(|| {
            let known: Vec<_> = profiles.keys().cloned().collect();
            local(format!("no profile {name:?} in the profiles file {} (it has: {})", path.display(), known.join(", ")))
        })?;
        // Relative paths are relative to the profiles file.
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [&mut profile.token_file, &mut profile.ca_file, &mut profile.cert_file, &mut profile.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(Some(profile))
    }

    /// Resolves the connection: `--profile` takes the address and the token
    /// from that profile; otherwise the environment, when it names either;
    /// otherwise the profile SECRETSCTL_PROFILE or the file's `current`
    /// names. `--addr`, `--token-file` and the TLS flags override each.
    pub fn resolve(&self) -> Result<Connection> {
        let from_env = ["SECRETS_ADDR", "SECRETS_TOKEN", "SECRETS_TOKEN_FILE"].iter().any(|v| env(v).is_some());
        let origin = match &self.profile {
            Some(name) => Origin::Profile(
                self.profile(Some(name.clone()))?.ok_or_else(|| local("no profiles file to take --profile from"))?,
            ),
            None if from_env => Origin::Environment,
            None => match self.profile(env("SECRETSCTL_PROFILE"))? {
                Some(p) => Origin::Profile(p),
                None => Origin::Nothing,
            },
        };
        let (addr, token, ca, cert, key) = match &origin {
            Origin::Environment => {
                let token = match (env("SECRETS_TOKEN"), env("SECRETS_TOKEN_FILE")) {
                    (Some(_), Some(_)) => return Err(local("set SECRETS_TOKEN or SECRETS_TOKEN_FILE, not both")),
                    (Some(t), None) => Some(Zeroizing::new(t)),
                    (None, Some(path)) => Some(read_token(Path::new(&path))?),
                    (None, None) => None,
                };
                (env("SECRETS_ADDR"), token, None, None, None)
            }
            Origin::Profile(p) => {
                let token = match (&p.token, &p.token_file) {
                    (Some(_), Some(_)) => return Err(local("a profile has `token` or `token_file`, not both")),
                    (Some(t), None) => Some(Zeroizing::new(t.clone())),
                    (None, Some(path)) => Some(read_token(path)?),
                    (None, None) => None,
                };
                (p.addr.clone(), token, p.ca_file.clone(), p.cert_file.clone(), p.key_file.clone())
            }
            Origin::Nothing => (None, None, None, None, None),
        };
        // A token goes only to the address it came with: --addr pointing
        // elsewhere needs its own --token-file.
        if let (Some(flag), Some(origin_addr), Some(_), None) = (&self.addr, &addr, &token, &self.token_file)
            && flag.trim_end_matches('/') != origin_addr.trim_end_matches('/')
        {
            let from = match &origin {
                Origin::Profile(_) => "the profile's",
                _ => "SECRETS_ADDR's",
            };
            return Err(local(format!(
                "--addr {flag} is not {from} address {origin_addr}, and the token is for that one only: give the \
                 token for {flag} with --token-file, or choose the profile for it with --profile"
            )));
        }
        let token = match &self.token_file {
            Some(path) => Some(read_token(path)?),
            None => token,
        };
        let identity = match (self.cert_file.clone().or(cert), self.key_file.clone().or(key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(local("a client certificate needs both cert_file and key_file")),
        };
        Ok(Connection {
            addr: self.addr.clone().or(addr).unwrap_or_else(|| DEFAULT_ADDR.to_string()),
            token,
            ca_file: self.ca_file.clone().or(ca),
            identity,
            timeout: Duration::from_secs(self.timeout.max(1)),
            insecure: self.insecure,
            on_behalf_of: self.on_behalf_of.clone(),
        })
    }
}

/// Whether `host` is this machine.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// Adds the bearer token, and the principal acted for, to every call.
#[derive(Clone)]
pub struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    on_behalf_of: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.token {
            request.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(value) = &self.on_behalf_of {
            request.metadata_mut().insert("x-on-behalf-of", value.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

impl Connection {
    /// A channel to the gateway (connected on first use) and the credential.
    pub fn open(&self) -> Result<(Channel, Bearer)> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| local(format!("{what} {}: {e}", path.display())))
        };
        let mut endpoint = Endpoint::from_shared(self.addr.clone())
            .map_err(|e| local(format!("the address {:?} is not a URL: {e}", self.addr)))?
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(10)))
            // A connection that dies without a word (a partition, a host
            // gone) is noticed, so `watch` reconnects instead of waiting.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(60)));
        let uri = self
            .addr
            .parse::<tonic::codegen::http::Uri>()
            .map_err(|e| local(format!("the address {:?} is not a URL: {e}", self.addr)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(local(format!("the address {:?} should start with https:// or http://", self.addr))),
        };
        if !https && (self.ca_file.is_some() || self.identity.is_some()) {
            return Err(local(format!(
                "TLS files are set (--ca-file, --cert-file or the profile's) but {} is plain http, so they would \
                 not be used and the token would travel in clear text: use an https:// address",
                self.addr
            )));
        }
        if !https && self.token.is_some() && !self.insecure && !uri.host().is_some_and(loopback) {
            return Err(local(format!(
                "{} is plain http to another machine: the token would travel in clear text. Use https:// (with \
                 --ca-file), or pass --insecure if the network is yours",
                self.addr
            )));
        }
        if https {
            let Some(ca) = &self.ca_file else {
                return Err(local(
                    "https needs --ca-file: the CA certificate (PEM) that signed the gateway's certificate",
                ));
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "the CA file")?));
            if let Some((cert, key)) = &self.identity {
                let key = read_private(key, "the client key file")?;
                tls = tls.identity(Identity::from_pem(read(cert, "the client certificate")?, &*key));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| local(format!("TLS settings: {e}")))?;
        }
        let bearer = match &self.token {
            Some(token) => {
                let header = Zeroizing::new(format!("Bearer {}", token.as_str()));
                let mut value = MetadataValue::<Ascii>::try_from(header.as_str())
                    .map_err(|_| local("the token holds characters a header cannot carry"))?;
                // Kept out of HTTP/2 header compression tables.
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let on_behalf_of = self
            .on_behalf_of
            .as_deref()
            .map(|p| {
                MetadataValue::<Ascii>::try_from(p)
                    .map_err(|_| local("--on-behalf-of takes a principal such as user:alice (printable ASCII)"))
            })
            .transpose()?;
        Ok((endpoint.connect_lazy(), Bearer { token: bearer, on_behalf_of }))
    }
}
