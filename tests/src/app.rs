//! `TestApp`: the three services started in-process on port 0, talking real
//! gRPC to each other, with clients for each test persona.

use std::{collections::HashMap, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use secret_service::backend::SecretBackend;
use secrets_common::auth::{ON_BEHALF_OF, TokenHash, generate_token};
use secrets_proto::v1::{
    self as pb, DomainRole, Permission, authz_service_client::AuthzServiceClient, gateway_client::GatewayClient,
    secret_service_client::SecretServiceClient, vault_config_service_client::VaultConfigServiceClient,
};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Request, Status,
    codegen::InterceptedService,
    metadata::AsciiMetadataValue,
    service::Interceptor,
    transport::{Channel, Endpoint},
};

/// Test personas and what they hold in the domain set up by `setup_domain`.
pub const ADMIN: &str = "admin"; // platform admin by configuration
pub const OWNER: &str = "olivia"; // owner of the domain
pub const LISTER: &str = "lisa"; // member with LIST_SECRETS
pub const MANAGER: &str = "max"; // member with MANAGE_SECRETS
pub const MEMBER: &str = "nina"; // member with no permission
pub const OUTSIDER: &str = "oscar"; // member of another domain with both permissions
pub const STRANGER: &str = "eve"; // no grants at all
pub const USERS: [&str; 7] = [ADMIN, OWNER, LISTER, MANAGER, MEMBER, OUTSIDER, STRANGER];
/// A platform service's token name: allowed every RPC group, for anyone.
pub const SPARK: &str = "spark";
/// A platform service's token with the defaults: resolve and workloads,
/// acting for users that are not platform admins.
pub const JUPYTER: &str = "jupyter";
/// The domain `OUTSIDER` belongs to.
pub const OTHER_DOMAIN: &str = "other";

#[derive(Default)]
pub struct Options {
    pub backend: Option<Arc<SecretBackend>>,
    /// Defaults to a SQLite file in the test's directory.
    pub database_url: Option<String>,
    /// Skip the trace-level log capture (for benchmarks).
    pub no_log_capture: bool,
    /// The vault-config-service's Vault settings (timeouts, cache).
    pub vault: Option<vault_config_service::VaultSettings>,
    /// Bound on calls between the services (default 2 s).
    pub request_timeout_ms: Option<u64>,
    /// Bound on each database operation (default: the services' 1.5 s).
    pub database_timeout_ms: Option<u64>,
    /// TLS on the gateway and mutual TLS between the services, with
    /// certificates made for the test and no internal token.
    pub tls: bool,
    /// The gateway's trusted JWT issuers and service accounts.
    pub jwt_issuers: Vec<gateway::jwt::IssuerConfig>,
    pub service_accounts: Vec<gateway::ServiceAccountConfig>,
    /// Turns `features.secretsV2.enabled` off at the gateway.
    pub secrets_v2_off: bool,
    /// Runs the authz-service as its own process (its binary), reached
    /// through a proxy, so a test can kill it with SIGKILL and cut the
    /// network to it (`crash_authz`). Not with `tls`.
    pub authz_process: bool,
    /// More platform-service tokens, each with its own limits (the token
    /// itself is `app.token(name)`).
    pub service_tokens: Vec<ServiceToken>,
    /// The gateway reaches the secret-service and the vault-config-service
    /// through proxies a test can freeze (`secret_link`, `vault_link`).
    pub source_proxies: bool,
    /// The gateway's admission bounds: max_in_flight, max_queued,
    /// queue_wait_ms (default: the services' own).
    pub gateway_admission: Option<(usize, usize, u64)>,
    /// The secret-service keeps its store objects in this Kubernetes API
    /// server (namespace `secrets`), watched; on PostgreSQL its replicas
    /// keep their copies in step through the stack's database.
    pub kubernetes_api: Option<String>,
    /// The change feed's retention (default: the authz-service's 7 days).
    pub change_retention_seconds: Option<u64>,
    /// Vault change detection (default: off in tests, so Vault sees only
    /// what a test asks).
    pub vault_changes: Option<vault_config_service::rotation::ChangesConfig>,
    /// The gateway's audit trail (default: strict, in the stack's database
    /// on PostgreSQL, else a SQLite file of its own).
    pub audit: Option<gateway::audit::AuditConfig>,
    /// The secret-service offers value leases and the gateway holds one.
    pub value_leases: bool,
}

/// A strict audit trail in a SQLite file under `dir`, for a gateway a test
/// builds itself.
pub fn audit_in(dir: &std::path::Path) -> gateway::audit::AuditConfig {
    gateway::audit::AuditConfig {
        database_url: format!("sqlite://{}?mode=rwc", dir.join("audit.db").display()),
        ..Default::default()
    }
}

/// A platform service's token and what it may do.
pub struct ServiceToken {
    pub name: &'static str,
    pub allow: Option<Vec<gateway::RpcGroup>>,
    pub act_for: Option<Vec<String>>,
    pub act_for_admins: bool,
}

/// The certificates of a TLS test stack.
pub struct TestPki {
    /// Signs the services' certificates for mutual TLS.
    pub internal: crate::pki::Pki,
    /// Signs the gateway's public certificate.
    pub public: crate::pki::Pki,
    pub gateway_public: crate::pki::Issued,
    /// Each service's certificate, by service name.
    pub services: HashMap<&'static str, crate::pki::Issued>,
}

/// The DNS names the test certificates carry.
pub fn service_dns_name(service: &str) -> String {
    format!("{service}.secrets.test")
}

impl TestPki {
    fn new(dir: &std::path::Path) -> Self {
        let internal = crate::pki::Pki::new(dir, "internal");
        let public = crate::pki::Pki::new(dir, "public");
        let gateway_public = public.issue("gateway-public", "gateway.example.test");
        let services = ["gateway", "secret-service", "authz-service", "vault-config-service"]
            .into_iter()
            .map(|s| (s, internal.issue(s, &service_dns_name(s))))
            .collect();
        Self { internal, public, gateway_public, services }
    }

    /// Mutual TLS for `service`, accepting calls from `clients`.
    pub fn internal_tls(&self, service: &str, clients: &[&str]) -> secrets_common::tls::InternalTlsConfig {
        let issued = &self.services[service];
        secrets_common::tls::InternalTlsConfig {
            ca_file: self.internal.ca_file(),
            cert_file: issued.cert_file.clone(),
            key_file: issued.key_file.clone(),
            allowed_clients: clients.iter().map(|c| service_dns_name(c)).collect(),
            reload_interval_ms: 100,
        }
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Another replica of a service, in this process; see
/// [`TestApp::another_authz_replica`].
pub struct Replica {
    pub port: u16,
    /// Its metrics endpoint, `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    running: Running,
}

impl Replica {
    pub async fn stop(self) {
        let _ = self.running.stop.send(());
        let _ = self.running.task.await;
    }
}

pub struct TestApp {
    pub gateway_url: String,
    pub secret_service_url: String,
    pub authz_service_url: String,
    pub vault_config_service_url: String,
    pub authz_port: u16,
    /// Metrics endpoints: gateway, secret-service, authz-service (the last
    /// changes when authz restarts).
    pub metrics_urls: std::sync::Mutex<HashMap<&'static str, String>>,
    pub dir: TempDir,
    pub internal_token: SecretString,
    /// Set when the stack runs with TLS (`Options::tls`).
    pub pki: Option<TestPki>,
    pub database_url: String,
    database_timeout_ms: u64,
    change_retention_seconds: Option<u64>,
    tokens: HashMap<String, String>,
    authz: Option<Running>,
    secrets: Option<Running>,
    secret_port: u16,
    secret_config: secret_service::Config,
    backend: Option<Arc<SecretBackend>>,
    others: Vec<Running>,
    /// With `Options::authz_process`: the process, and the proxy in front.
    authz_child: Option<crate::procs::Service>,
    authz_proxy: Option<crate::proxy::FreezableProxy>,
    /// With `Options::source_proxies`: the gateway's links to the
    /// secret-service and the vault-config-service.
    source_links: Option<(crate::proxy::FreezableProxy, crate::proxy::FreezableProxy)>,
    gateway_config: Option<gateway::Config>,
}

fn run<F>(fut: F) -> Running
where
    F: FnOnce(oneshot::Receiver<()>) -> JoinHandle<anyhow::Result<()>>,
{
    let (stop, rx) = oneshot::channel();
    Running { stop, task: fut(rx) }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let request_timeout_ms = options.request_timeout_ms.unwrap_or(2_000);
        if !options.no_log_capture {
            crate::logs::init();
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let internal_token = SecretString::from(generate_token());
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let (authz_l, secret_l, gateway_l, vault_l) = (bind().await, bind().await, bind().await, bind().await);
        let port = |l: &TcpListener| l.local_addr().unwrap().port();
        let pki = options.tls.then(|| TestPki::new(&dir.path().join("pki")));
        let scheme = if pki.is_some() { "https" } else { "http" };
        let authz_port = port(&authz_l);
        assert!(!(options.authz_process && options.tls), "authz_process runs without TLS");
        let authz_proxy = match options.authz_process {
            true => Some(crate::proxy::FreezableProxy::start(format!("127.0.0.1:{authz_port}")).await),
            false => None,
        };
        let authz_service_url = match &authz_proxy {
            Some(proxy) => format!("http://127.0.0.1:{}", proxy.port),
            None => format!("{scheme}://127.0.0.1:{authz_port}"),
        };
        let secret_service_url = format!("{scheme}://127.0.0.1:{}", port(&secret_l));
        let gateway_url = format!("{scheme}://127.0.0.1:{}", port(&gateway_l));
        let vault_config_service_url = format!("{scheme}://127.0.0.1:{}", port(&vault_l));
        let source_links = match options.source_proxies {
            true => Some((
                crate::proxy::FreezableProxy::start(format!("127.0.0.1:{}", port(&secret_l))).await,
                crate::proxy::FreezableProxy::start(format!("127.0.0.1:{}", port(&vault_l))).await,
            )),
            false => None,
        };
        let token_unless_tls = |t: &SecretString| if options.tls { None } else { Some(t.clone()) };
        let database_url = options
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("authz.db").display()));

        let mut tokens = HashMap::new();
        let mut token_configs = Vec::new();
        for (name, kind) in USERS
            .iter()
            .map(|u| (*u, gateway::TokenKind::User))
            .chain([(SPARK, gateway::TokenKind::Service), (JUPYTER, gateway::TokenKind::Service)])
        {
            let token = generate_token();
            // SPARK may do everything for anyone (the tests act for every
            // persona through it); JUPYTER has a service token's defaults.
            let everything = name == SPARK;
            token_configs.push(gateway::TokenConfig {
                name: name.into(),
                kind,
                subject: name.into(),
                sha256: TokenHash::of(&token).to_hex(),
                allow: everything.then(|| {
                    use gateway::RpcGroup::*;
                    vec![Resolve, Workloads, ManageSecrets, ManageAccess, Admin]
                }),
                act_for: everything.then(|| vec!["*".to_string()]),
                act_for_admins: everything,
            });
            tokens.insert(name.to_string(), token);
        }
        for extra in options.service_tokens {
            let token = generate_token();
            token_configs.push(gateway::TokenConfig {
                name: extra.name.into(),
                kind: gateway::TokenKind::Service,
                subject: extra.name.into(),
                sha256: TokenHash::of(&token).to_hex(),
                allow: extra.allow,
                act_for: extra.act_for,
                act_for_admins: extra.act_for_admins,
            });
            tokens.insert(extra.name.to_string(), token);
        }

        let mut app = TestApp {
            database_timeout_ms: options.database_timeout_ms.unwrap_or(1_500),
            change_retention_seconds: options.change_retention_seconds,
            gateway_url,
            secret_service_url: secret_service_url.clone(),
            authz_service_url: authz_service_url.clone(),
            vault_config_service_url: vault_config_service_url.clone(),
            authz_port,
            metrics_urls: Default::default(),
            internal_token: internal_token.clone(),
            pki,
            database_url,
            tokens,
            authz: None,
            secrets: None,
            secret_port: port(&secret_l),
            secret_config: secret_service::Config::default(),
            backend: None,
            others: Vec::new(),
            authz_child: None,
            authz_proxy,
            source_links,
            gateway_config: None,
            dir,
        };
        if app.authz_proxy.is_some() {
            drop(authz_l);
            app.start_authz_process().await;
        } else {
            app.start_authz_on(authz_l).await;
        }

        let secret_config = secret_service::Config {
            internal_token: token_unless_tls(&internal_token),
            internal_tls: app.pki.as_ref().map(|p| p.internal_tls("secret-service", &["gateway"])),
            server: secrets_common::server::ServerConfig::local(0, 0),
            authz_url: authz_service_url.clone(),
            request_timeout_ms,
            backend: Some(secret_service::BackendKind::Embedded),
            embedded: secret_service::EmbeddedConfig {
                data_dir: app.dir.path().join("secrets"),
                allow_in_cluster: true,
            },
            // Off unless asked: most tests count what a resolve reads.
            value_leases: Some(options.value_leases),
            ..Default::default()
        };
        let mut secret_config = secret_config;
        let backend = match (options.backend, &options.kubernetes_api) {
            (Some(b), _) => Some(b),
            (None, Some(api_url)) => {
                secret_config.backend = Some(secret_service::BackendKind::Kubernetes);
                secret_config.kubernetes = secret_service::KubernetesConfig {
                    api_url: Some(api_url.clone()),
                    namespace: Some("secrets".into()),
                    ..Default::default()
                };
                // Baselines recorded every second: a restart finds what
                // changed while it was down within seconds.
                secret_config.changes.baseline_interval_seconds = 1;
                // Value leases are offered by a single replica only.
                if app.database_url.starts_with("postgres") && !options.value_leases {
                    secret_config.replicas.database_url = Some(app.database_url.clone());
                }
                None
            }
            // The service opens its own store, so that it may offer value
            // leases (a backend handed in may be shared).
            (None, None) if options.value_leases => None,
            (None, None) => Some(secret_service::backend_from_config(&secret_config).await.expect("backend")),
        };
        app.secret_config = secret_config;
        app.backend = backend;
        app.start_secret_service_on(secret_l).await;

        let vault_config = vault_config_service::Config {
            internal_token: token_unless_tls(&internal_token),
            internal_tls: app.pki.as_ref().map(|p| p.internal_tls("vault-config-service", &["gateway"])),
            server: secrets_common::server::ServerConfig::local(0, 0),
            authz_url: authz_service_url.clone(),
            request_timeout_ms,
            database_url: app.database_url.clone(),
            database_timeout_ms: app.database_timeout_ms,
            backend: Some(secret_service::BackendKind::Embedded),
            embedded: secret_service::EmbeddedConfig {
                data_dir: app.dir.path().join("vault-credentials"),
                allow_in_cluster: true,
            },
            // Under the 2 s bound between the services.
            vault: vault_config_service::VaultSettings { timeout_ms: 1_000, ..options.vault.unwrap_or_default() },
            changes: options.vault_changes.clone().unwrap_or(vault_config_service::rotation::ChangesConfig {
                vault_poll_interval_seconds: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let vault = vault_config_service::Application::build_with_listener(vault_config, vault_l)
            .await
            .expect("vault-config-service");
        app.set_metrics("vault-config-service", vault.metrics_port());
        app.others.push(run(|rx| {
            tokio::spawn(vault.run_until_stopped(async {
                let _ = rx.await;
            }))
        }));

        let mut gateway_server = secrets_common::server::ServerConfig::local(0, 0);
        if let Some((max_in_flight, max_queued, queue_wait_ms)) = options.gateway_admission {
            (gateway_server.max_in_flight, gateway_server.max_queued, gateway_server.queue_wait_ms) =
                (max_in_flight, max_queued, queue_wait_ms);
        }
        let gateway_config = gateway::Config {
            internal_token: token_unless_tls(&internal_token),
            internal_tls: app.pki.as_ref().map(|p| p.internal_tls("gateway", &[])),
            server: secrets_common::server::ServerConfig {
                tls: app.pki.as_ref().map(|p| secrets_common::tls::TlsConfig {
                    cert_file: p.gateway_public.cert_file.clone(),
                    key_file: p.gateway_public.key_file.clone(),
                    reload_interval_ms: 100,
                }),
                ..gateway_server
            },
            secret_service_url: match &app.source_links {
                Some((secrets, _)) => format!("{scheme}://127.0.0.1:{}", secrets.port),
                None => secret_service_url,
            },
            authz_service_url,
            vault_config_service_url: match &app.source_links {
                Some((_, vault)) => format!("{scheme}://127.0.0.1:{}", vault.port),
                None => vault_config_service_url,
            },
            request_timeout_ms,
            tokens: token_configs,
            jwt_issuers: options.jwt_issuers,
            service_accounts: options.service_accounts,
            features: gateway::Features { secrets_v2: gateway::Flag { enabled: !options.secrets_v2_off } },
            value_leases: options.value_leases,
            // The stack's own database on PostgreSQL (one trail for every
            // gateway), a file of its own on SQLite.
            audit: options.audit.clone().unwrap_or_else(|| gateway::audit::AuditConfig {
                database_url: if app.database_url.starts_with("postgres") {
                    app.database_url.clone()
                } else {
                    format!("sqlite://{}?mode=rwc", app.dir.path().join("audit.db").display())
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        app.gateway_config = Some(gateway_config.clone());
        let gw = gateway::Application::build_with_listener(gateway_config, gateway_l).await.expect("gateway");
        app.set_metrics("gateway", gw.metrics_port());
        app.others.push(run(|rx| {
            tokio::spawn(gw.run_until_stopped(async {
                let _ = rx.await;
            }))
        }));
        app
    }

    async fn start_secret_service_on(&mut self, listener: TcpListener) {
        let secrets = match self.backend.clone() {
            Some(backend) => {
                secret_service::Application::build_with_backend(self.secret_config.clone(), listener, backend).await
            }
            None => secret_service::Application::build_with_listener(self.secret_config.clone(), listener).await,
        }
        .expect("secret-service");
        self.set_metrics("secret-service", secrets.metrics_port());
        self.secrets = Some(run(|rx| {
            tokio::spawn(secrets.run_until_stopped(async {
                let _ = rx.await;
            }))
        }));
    }

    /// Stops the secret service (its data stays).
    pub async fn stop_secret_service(&mut self) {
        if let Some(r) = self.secrets.take() {
            let _ = r.stop.send(());
            let _ = r.task.await;
        }
    }

    /// Starts the secret service again on the same port, backend and data.
    pub async fn start_secret_service(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.secret_port)).await.expect("rebind secret-service port");
        self.start_secret_service_on(listener).await;
    }

    fn authz_config(&self) -> authz_service::Config {
        authz_service::Config {
            internal_token: if self.pki.is_some() { None } else { Some(self.internal_token.clone()) },
            internal_tls: self
                .pki
                .as_ref()
                .map(|p| p.internal_tls("authz-service", &["gateway", "secret-service", "vault-config-service"])),
            database_url: self.database_url.clone(),
            bootstrap_admins: vec![format!("user:{ADMIN}")],
            server: secrets_common::server::ServerConfig::local(0, 0),
            database_timeout_ms: self.database_timeout_ms,
            changes: authz_service::changes::ChangesConfig {
                retention_seconds: self.change_retention_seconds.unwrap_or(7 * 24 * 3600),
            },
            ..Default::default()
        }
    }

    async fn start_authz_on(&mut self, listener: TcpListener) {
        let authz = authz_service::Application::build_with_listener(self.authz_config(), listener)
            .await
            .expect("authz-service");
        self.set_metrics("authz-service", authz.metrics_port());
        self.authz = Some(run(|rx| {
            tokio::spawn(authz.run_until_stopped(async {
                let _ = rx.await;
            }))
        }));
    }

    /// A second authz-service replica on the same database (PostgreSQL),
    /// which no other service of the stack calls.
    pub async fn another_authz_replica(&self) -> Replica {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let authz = authz_service::Application::build_with_listener(self.authz_config(), listener)
            .await
            .expect("authz-service");
        let metrics_url = format!("http://127.0.0.1:{}/metrics", authz.metrics_port().expect("metrics endpoint"));
        let running = run(|rx| {
            tokio::spawn(authz.run_until_stopped(async {
                let _ = rx.await;
            }))
        });
        Replica { port, metrics_url, running }
    }

    /// A second secret-service replica on the same store (and, with
    /// `kubernetes_api` on PostgreSQL, the same replicas' database), which
    /// no other service of the stack calls.
    pub async fn another_secret_replica(&self) -> Replica {
        self.another_secret_replica_with(|_| {}).await
    }

    /// The same, with its configuration changed by `edit`.
    pub async fn another_secret_replica_with(&self, edit: impl FnOnce(&mut secret_service::Config)) -> Replica {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let mut config = self.secret_config.clone();
        edit(&mut config);
        let secrets = match self.backend.clone() {
            Some(backend) => secret_service::Application::build_with_backend(config, listener, backend).await,
            None => secret_service::Application::build_with_listener(config, listener).await,
        }
        .expect("secret-service");
        let metrics_url = format!("http://127.0.0.1:{}/metrics", secrets.metrics_port().expect("metrics endpoint"));
        let running = run(|rx| {
            tokio::spawn(secrets.run_until_stopped(async {
                let _ = rx.await;
            }))
        });
        Replica { port, metrics_url, running }
    }

    /// Another gateway in front of the same services, configured as the
    /// stack's own with `edit` applied.
    pub async fn another_gateway_with(&self, edit: impl FnOnce(&mut gateway::Config)) -> Replica {
        self.another_gateway_on(0, edit).await
    }

    /// Another gateway on `port` (0: any free port): one that was stopped
    /// can be started again where its clients look for it.
    pub async fn another_gateway_on(&self, port: u16, edit: impl FnOnce(&mut gateway::Config)) -> Replica {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let mut config = self.gateway_config.clone().expect("the stack's gateway");
        edit(&mut config);
        let gw = gateway::Application::build_with_listener(config, listener).await.expect("gateway");
        let metrics_url = format!("http://127.0.0.1:{}/metrics", gw.metrics_port().expect("metrics endpoint"));
        let running = run(|rx| {
            tokio::spawn(gw.run_until_stopped(async {
                let _ = rx.await;
            }))
        });
        Replica { port, metrics_url, running }
    }

    fn set_metrics(&self, service: &'static str, port: Option<u16>) {
        let url = format!("http://127.0.0.1:{}/metrics", port.expect("metrics endpoint"));
        self.metrics_urls.lock().unwrap().insert(service, url);
    }

    /// The metrics endpoint of `service` (gateway, secret-service, authz-service).
    pub fn metrics_url(&self, service: &str) -> String {
        self.metrics_urls.lock().unwrap()[service].clone()
    }

    /// Stops the authz service (its port stays unused until `start_authz`).
    pub async fn stop_authz(&mut self) {
        if let Some(child) = self.authz_child.take() {
            let _ = tokio::task::spawn_blocking(move || child.stop()).await;
        }
        if let Some(r) = self.authz.take() {
            let _ = r.stop.send(());
            let _ = r.task.await;
        }
    }

    /// Starts the authz service again on the same port and database.
    pub async fn start_authz(&mut self) {
        if self.authz_proxy.is_some() {
            return self.start_authz_process().await;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.authz_port)).await.expect("rebind authz port");
        self.start_authz_on(listener).await;
    }

    /// The authz-service's binary on `authz_port`, once it answers.
    async fn start_authz_process(&mut self) {
        let metrics = crate::procs::free_port();
        let env: std::collections::BTreeMap<String, String> = [
            ("AUTHZ_SERVICE_SERVER__LISTEN_ADDR", format!("127.0.0.1:{}", self.authz_port)),
            ("AUTHZ_SERVICE_INTERNAL_TOKEN", self.internal_token.expose_secret().to_string()),
            ("AUTHZ_SERVICE_DATABASE_URL", self.database_url.clone()),
            ("AUTHZ_SERVICE_DATABASE_TIMEOUT_MS", self.database_timeout_ms.to_string()),
            ("AUTHZ_SERVICE_BOOTSTRAP_ADMINS", format!(r#"["user:{ADMIN}"]"#)),
            ("AUTHZ_SERVICE_SERVER__METRICS_ADDR", format!("127.0.0.1:{metrics}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.authz_child =
            Some(crate::procs::Service::start_logging("authz-service", &env, std::process::Stdio::null()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while secrets_common::server::probe(([127, 0, 0, 1], self.authz_port).into()).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "the authz-service process did not start");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.set_metrics("authz-service", Some(metrics));
    }

    /// The authz-service's process dies at once (SIGKILL, no clean close),
    /// and the network to it goes silent: its clients are told nothing.
    /// Only with `Options::authz_process`.
    pub fn crash_authz(&mut self) {
        let proxy = self.authz_proxy.as_ref().expect("crash_authz needs Options::authz_process");
        proxy.partition();
        self.authz_child.take().expect("running").kill();
    }

    /// Takes the usage index's table of references away (`false`) or gives
    /// it back (`true`), in the authz-service's database: the index then
    /// fails every query while the rest of the authz-service answers.
    pub async fn usage_index_works(&self, works: bool) {
        use sea_orm::ConnectionTrait;
        let (from, to) = match works {
            true => ("workload_references_away", "workload_references"),
            false => ("workload_references", "workload_references_away"),
        };
        let db = crate::connect_database(&self.database_url).await.expect("the authz database");
        db.execute_unprepared(&format!("ALTER TABLE {from} RENAME TO {to}")).await.expect("rename the index table");
        let _ = db.close().await;
    }

    /// The gateway's link to the secret-service (`Options::source_proxies`).
    pub fn secret_link(&self) -> &crate::proxy::FreezableProxy {
        &self.source_links.as_ref().expect("secret_link needs Options::source_proxies").0
    }

    /// The gateway's link to the vault-config-service (`Options::source_proxies`).
    pub fn vault_link(&self) -> &crate::proxy::FreezableProxy {
        &self.source_links.as_ref().expect("vault_link needs Options::source_proxies").1
    }

    /// The proxy every service reaches the authz-service through (to
    /// partition or slow the network to it). Only with
    /// `Options::authz_process`.
    pub fn authz_proxy(&self) -> &crate::proxy::FreezableProxy {
        self.authz_proxy.as_ref().expect("authz_proxy needs Options::authz_process")
    }

    /// A client straight to the authz-service (past the proxy), as the
    /// gateway calls it, acting for the platform admin.
    pub fn authz_direct(&self) -> AuthzServiceClient<InterceptedService<Channel, ActAsAdmin>> {
        self.authz_direct_on(self.authz_port)
    }

    /// The same, to the authz-service (or replica) on `port`.
    pub fn authz_direct_on(&self, port: u16) -> AuthzServiceClient<InterceptedService<Channel, ActAsAdmin>> {
        let bearer = format!("Bearer {}", self.internal_token.expose_secret());
        AuthzServiceClient::with_interceptor(
            channel(&format!("http://127.0.0.1:{port}")),
            ActAsAdmin(bearer.parse().expect("ascii token")),
        )
    }

    pub fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    /// A channel to the gateway (over TLS trusting the test's public CA
    /// when the stack runs with TLS).
    pub fn gateway_channel(&self) -> Channel {
        match &self.pki {
            Some(pki) => tls_channel(&self.gateway_url, &pki.public.ca_pem(), None),
            None => channel(&self.gateway_url),
        }
    }

    /// Clients that call the gateway with `name`'s token.
    pub fn as_user(&self, name: &str) -> Clients {
        Clients::over(self.gateway_channel(), Some(self.token(name)), None)
    }

    /// Clients that call the gateway as the platform service, optionally on
    /// behalf of a principal such as `user:lisa`.
    pub fn as_service(&self, on_behalf_of: Option<&str>) -> Clients {
        Clients::over(self.gateway_channel(), Some(self.token(SPARK)), on_behalf_of)
    }

    /// [`TestApp::as_service`] over a channel that waits a minute per call
    /// (the default gives up after 10 s): for bursts whose point is that
    /// every call lands, however loaded the machine.
    pub fn as_service_patiently(&self, on_behalf_of: Option<&str>) -> Clients {
        Clients::over(patient_channel(&self.gateway_url), Some(self.token(SPARK)), on_behalf_of)
    }

    /// [`TestApp::as_user`], as patient.
    pub fn as_user_patiently(&self, name: &str) -> Clients {
        Clients::over(patient_channel(&self.gateway_url), Some(self.token(name)), None)
    }

    /// Clients that send no credentials.
    pub fn anonymous(&self) -> Clients {
        Clients::over(self.gateway_channel(), None, None)
    }

    /// Gives every persona its grants in `domain` (and OUTSIDER its grants in
    /// OTHER_DOMAIN), through the gateway as the admin.
    pub async fn setup_domain(&self, domain: &str) {
        grant_personas(&self.as_user(ADMIN), domain).await;
    }

    /// Every file the services wrote (database, store objects, key file).
    pub fn written_files(&self) -> Vec<std::path::PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for r in self.authz.take().into_iter().chain(self.secrets.take()).chain(self.others.drain(..)) {
            let _ = r.stop.send(());
        }
    }
}

/// Adds a bearer token and, for service calls, `x-on-behalf-of`.
#[derive(Clone)]
pub struct Bearer {
    authorization: Option<AsciiMetadataValue>,
    on_behalf_of: Option<AsciiMetadataValue>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(a) = &self.authorization {
            request.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(p) = &self.on_behalf_of {
            request.metadata_mut().insert(ON_BEHALF_OF, p.clone());
        }
        Ok(request)
    }
}

/// The internal credential of a service, acting for the platform admin (a
/// call as the gateway makes it, straight to an internal service).
#[derive(Clone)]
pub struct ActAsAdmin(AsciiMetadataValue);

impl ActAsAdmin {
    /// With the internal credential `token`.
    pub fn with_token(token: &str) -> Self {
        Self(format!("Bearer {token}").parse().expect("ascii token"))
    }
}

impl Interceptor for ActAsAdmin {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        let admin = format!("user:{ADMIN}").parse().map_err(|_| Status::internal("admin principal"))?;
        secrets_common::auth::act_as(&mut request, &admin, Some("test"), &[]);
        Ok(request)
    }
}

pub type Ch = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Clients {
    pub secrets: SecretServiceClient<Ch>,
    pub authz: AuthzServiceClient<Ch>,
    pub gateway: GatewayClient<Ch>,
    pub vault: VaultConfigServiceClient<Ch>,
}

/// Gives every persona its grants in `domain` (and OUTSIDER its grants in
/// OTHER_DOMAIN), through `admin`'s gateway.
pub async fn grant_personas(admin: &Clients, domain: &str) {
    let mut authz = admin.authz.clone();
    let add = |d: &str, who: &str, role: DomainRole| pb::AddDomainMemberRequest {
        domain: d.into(),
        subject: format!("user:{who}"),
        role: role as i32,
    };
    let grant = |d: &str, who: &str, p: Permission| pb::GrantDomainPermissionRequest {
        domain: d.into(),
        subject: format!("user:{who}"),
        permission: p as i32,
    };
    authz.add_domain_member(add(domain, OWNER, DomainRole::Owner)).await.expect("owner");
    for who in [LISTER, MANAGER, MEMBER] {
        authz.add_domain_member(add(domain, who, DomainRole::Member)).await.expect("member");
    }
    authz.grant_domain_permission(grant(domain, LISTER, Permission::ListSecrets)).await.expect("grant");
    authz.grant_domain_permission(grant(domain, MANAGER, Permission::ManageSecrets)).await.expect("grant");
    authz.add_domain_member(add(OTHER_DOMAIN, OUTSIDER, DomainRole::Member)).await.expect("outsider");
    for p in [Permission::ListSecrets, Permission::ManageSecrets] {
        authz.grant_domain_permission(grant(OTHER_DOMAIN, OUTSIDER, p)).await.expect("grant");
    }
}

pub fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string()).expect("url").timeout(Duration::from_secs(10)).connect_lazy()
}

/// A channel whose calls wait up to a minute (plaintext).
pub fn patient_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string()).expect("url").timeout(Duration::from_secs(60)).connect_lazy()
}

/// A TLS channel trusting `ca_pem`, presenting `identity` (cert, key PEM)
/// when given.
pub fn tls_channel(url: &str, ca_pem: &str, identity: Option<(String, String)>) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

impl Clients {
    pub fn new(url: &str, token: Option<&str>, on_behalf_of: Option<&str>) -> Self {
        Self::over(channel(url), token, on_behalf_of)
    }

    pub fn over(ch: Channel, token: Option<&str>, on_behalf_of: Option<&str>) -> Self {
        let bearer = Bearer {
            authorization: token.map(|t| format!("Bearer {t}").parse().expect("token header")),
            on_behalf_of: on_behalf_of.map(|p| p.parse().expect("principal header")),
        };
        Self {
            secrets: SecretServiceClient::with_interceptor(ch.clone(), bearer.clone()),
            authz: AuthzServiceClient::with_interceptor(ch.clone(), bearer.clone()),
            gateway: GatewayClient::with_interceptor(ch.clone(), bearer.clone()),
            vault: VaultConfigServiceClient::with_interceptor(ch, bearer),
        }
    }

    pub async fn create(&self, domain: &str, key: &str, text: &str) -> Result<pb::SecretMetadata, Status> {
        self.create_in(pb::Scope::Domain, domain, key, text).await
    }

    pub async fn create_in(
        &self,
        scope: pb::Scope,
        domain: &str,
        key: &str,
        text: &str,
    ) -> Result<pb::SecretMetadata, Status> {
        let request = pb::CreateSecretRequest {
            scope: scope as i32,
            domain: domain.into(),
            key: key.into(),
            value: Some(text_value(text)),
            request_id: String::new(),
        };
        Ok(self.secrets.clone().create_secret(request).await?.into_inner())
    }

    pub async fn update(&self, domain: &str, key: &str, text: &str) -> Result<pb::SecretMetadata, Status> {
        let request = pb::UpdateSecretRequest {
            scope: pb::Scope::Domain as i32,
            domain: domain.into(),
            key: key.into(),
            value: Some(text_value(text)),
            request_id: String::new(),
        };
        Ok(self.secrets.clone().update_secret(request).await?.into_inner())
    }

    pub async fn delete(&self, domain: &str, key: &str) -> Result<(), Status> {
        let request = pb::DeleteSecretRequest {
            scope: pb::Scope::Domain as i32,
            domain: domain.into(),
            key: key.into(),
            force: false,
            request_id: String::new(),
        };
        self.secrets.clone().delete_secret(request).await.map(|_| ())
    }

    pub async fn list_in(&self, scope: pb::Scope, domain: &str) -> Result<Vec<String>, Status> {
        let request = pb::ListSecretsRequest { scope: scope as i32, domain: domain.into() };
        Ok(self.secrets.clone().list_secrets(request).await?.into_inner().secrets.into_iter().map(|s| s.key).collect())
    }

    pub async fn list(&self, domain: &str) -> Result<Vec<String>, Status> {
        self.list_in(pb::Scope::Domain, domain).await
    }

    pub async fn resolve(&self, domain: &str, items: Vec<pb::ResolveItem>) -> Result<Vec<pb::ResolvedItem>, Status> {
        let request = pb::ResolveSecretsRequest { domain: domain.into(), items };
        Ok(self.gateway.clone().resolve_secrets(request).await?.into_inner().items)
    }
}

/// A text secret value, as create and update take it.
pub fn text_value(text: &str) -> pb::SecretValue {
    pb::SecretValue { kind: Some(pb::secret_value::Kind::Text(text.into())) }
}

/// A `${secrets.KEY}` text item.
pub fn text_item(id: &str, text: &str) -> pb::ResolveItem {
    pb::ResolveItem { id: id.into(), reference: Some(pb::resolve_item::Reference::Text(text.into())) }
}

/// A VAULT secret-object item.
pub fn vault_item(id: &str, config_id: &str, key: &str) -> pb::ResolveItem {
    pb::ResolveItem {
        id: id.into(),
        reference: Some(pb::resolve_item::Reference::SecretObject(pb::SecretObject {
            key: key.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: config_id.into() }),
        })),
    }
}

/// A KUBERNETES secret-object item.
pub fn object_item(id: &str, domain: &str, key: &str) -> pb::ResolveItem {
    pb::ResolveItem {
        id: id.into(),
        reference: Some(pb::resolve_item::Reference::SecretObject(pb::SecretObject {
            key: key.into(),
            source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.into() }),
        })),
    }
}
