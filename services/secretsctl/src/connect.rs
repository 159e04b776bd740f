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
    /// The gateway, e.g. https://secrets.example.com:443 [default: the
    /// profile's, else http://127.0.0.1:50051]
    #[arg(long, global = true, env = "SECRETS_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// A file holding the bearer token (mode 600). The token itself may be
    /// in SECRETS_TOKEN; there is no flag for it, so it never shows in the
    /// process list.
    #[arg(long, global = true, env = "SECRETS_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// A profile of the profiles file [default: the file's `current`]
    #[arg(long, global = true, env = "SECRETSCTL_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// The profiles file [default: ~/.config/secretsctl/config.toml]
    #[arg(long, global = true, env = "SECRETSCTL_CONFIG", value_name = "PATH")]
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
    /// How long one call may take, in seconds
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
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

/// Refuses a file that anyone but its owner may read or write.
fn private(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| local(format!("{what} {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(local(format!(
            "{what} {} may be read by others (mode {mode:o}); it holds a credential: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

fn default_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("secretsctl").join("config.toml"))
}

fn read_token(path: &Path) -> Result<Zeroizing<String>> {
    private(path, "the token file")?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| local(format!("the token file {}: {e}", path.display())))?,
    );
    Ok(Zeroizing::new(text.trim().to_string()))
}

/// Where and as whom to call, resolved.
pub struct Connection {
    pub addr: String,
    token: Option<Zeroizing<String>>,
    ca_file: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    timeout: Duration,
}

impl ConnectArgs {
    pub fn resolve(&self) -> Result<Connection> {
        let (path, named) = match &self.config {
            Some(p) => (Some(p.clone()), true),
            None => (default_config(), false),
        };
        let file = match path {
            Some(path) if path.exists() => {
                private(&path, "the profiles file")?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| local(format!("the profiles file {}: {e}", path.display())))?;
                toml::from_str::<ProfilesFile>(&text)
                    .map_err(|e| local(format!("the profiles file {}: {}", path.display(), e.message())))?
            }
            Some(path) if named => return Err(local(format!("the profiles file {} does not exist", path.display()))),
            _ => ProfilesFile::default(),
        };
        let mut profiles = file.profiles;
        let profile = match self.profile.as_ref().or(file.current.as_ref()) {
            Some(name) => profiles.remove(name).ok_or_else(|| {
                let known: Vec<_> = profiles.keys().cloned().collect();
                local(format!("no profile {name:?} in the profiles file (it has: {})", known.join(", ")))
            })?,
            None => Profile::default(),
        };
        let token = match (std::env::var("SECRETS_TOKEN").ok().filter(|t| !t.is_empty()), &self.token_file) {
            (_, Some(path)) => Some(read_token(path)?),
            (Some(token), None) => Some(Zeroizing::new(token)),
            (None, None) => match (profile.token.clone(), &profile.token_file) {
                (Some(token), _) => Some(Zeroizing::new(token)),
                (None, Some(path)) => Some(read_token(path)?),
                (None, None) => None,
            },
        };
        let cert = self.cert_file.clone().or(profile.cert_file.clone());
        let key = self.key_file.clone().or(profile.key_file.clone());
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(local("a client certificate needs both cert_file and key_file")),
        };
        Ok(Connection {
            addr: self.addr.clone().or(profile.addr.clone()).unwrap_or_else(|| DEFAULT_ADDR.to_string()),
            token,
            ca_file: self.ca_file.clone().or(profile.ca_file.clone()),
            identity,
            timeout: Duration::from_secs(self.timeout.max(1)),
        })
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

impl Connection {
    /// A channel to the gateway (connected on first use) and the credential.
    pub fn open(&self) -> Result<(Channel, Bearer)> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read_to_string(path).map_err(|e| local(format!("{what} {}: {e}", path.display())))
        };
        let mut endpoint = Endpoint::from_shared(self.addr.clone())
            .map_err(|e| local(format!("--addr {:?} is not a URL: {e}", self.addr)))?
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(10)));
        let https = self.addr.starts_with("https://");
        if https || self.ca_file.is_some() || self.identity.is_some() {
            let Some(ca) = &self.ca_file else {
                return Err(local(
                    "https needs --ca-file: the CA certificate (PEM) that signed the gateway's certificate",
                ));
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "the CA file")?));
            if let Some((cert, key)) = &self.identity {
                private(key, "the client key file")?;
                tls = tls
                    .identity(Identity::from_pem(read(cert, "the client certificate")?, read(key, "the client key")?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| local(format!("TLS settings: {e}")))?;
        }
        let bearer = match &self.token {
            Some(token) => Some(
                format!("Bearer {}", token.as_str())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| local("the token holds characters a header cannot carry"))?,
            ),
            None => None,
        };
        Ok((endpoint.connect_lazy(), Bearer(bearer)))
    }
}
