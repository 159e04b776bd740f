//! `ReplicatedStack`: two replicas of every service, each its own process
//! (the real binaries), on one PostgreSQL database and one Kubernetes API
//! server (the in-test one), as production runs them. Each gateway spreads
//! its calls over both secret-service and both vault-config-service
//! replicas and keeps its own authz-service replica (as one connection
//! through a ClusterIP Service would); tests spread their clients over
//! both gateways.

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, time::Duration};

use crate::{
    ADMIN, Clients, JUPYTER, SPARK, USERS,
    kube_server::FakeKube,
    postgres::TestDatabase,
    procs::{Service, free_port},
};
use secrets_common::auth::{TokenHash, generate_token};

/// The services, in the order they start.
pub const SERVICES: [&str; 4] = ["authz-service", "secret-service", "vault-config-service", "gateway"];
/// Replicas of each.
pub const REPLICAS: usize = 2;
/// The Kubernetes namespace of the store objects.
pub const NAMESPACE: &str = "secrets";

pub struct ReplicatedStack {
    /// The gateways' URLs.
    pub gateways: Vec<String>,
    pub kube: FakeKube,
    pub db: TestDatabase,
    /// `service` → each replica's gRPC port.
    pub ports: HashMap<&'static str, Vec<u16>>,
    /// (`service`, replica) → its metrics port.
    pub metrics: HashMap<(&'static str, usize), u16>,
    /// Variables every process gets besides PATH (a log level, worker
    /// threads).
    env: std::collections::BTreeMap<String, String>,
    internal_token: String,
    token_table: String,
    tokens: HashMap<String, String>,
    processes: HashMap<(&'static str, usize), Service>,
    /// The authz-service as each replica of the others reaches it: its
    /// ClusterIP Service (a connection goes to one replica, and to another
    /// once that one is gone), starting at the replica of the same number.
    authz_links: Vec<crate::proxy::ClusterIp>,
    /// Each authz-service replica's link to the database.
    authz_databases: Vec<crate::proxy::FreezableProxy>,
    dir: tempfile::TempDir,
    /// One stack at a time (dropped last, once its processes are gone):
    /// eight processes and a PostgreSQL each are as much as this machine
    /// runs beside the other tests.
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// Stacks that may run at once.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

impl ReplicatedStack {
    /// Starts it all; `None` when no PostgreSQL is configured (see
    /// [`crate::postgres::fresh_database`]).
    pub async fn start() -> Option<Self> {
        Self::start_with(Default::default()).await
    }

    /// The same, each process with `env` too.
    pub async fn start_with(env: std::collections::BTreeMap<String, String>) -> Option<Self> {
        let db = crate::postgres::fresh_database().await?;
        let slot = SLOTS.acquire().await.expect("the slots are never closed");
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: HashMap<&'static str, Vec<u16>> =
            SERVICES.iter().map(|s| (*s, (0..REPLICAS).map(|_| free_port()).collect())).collect();
        let mut tokens = HashMap::new();
        let mut token_table = String::new();
        for (name, kind) in USERS.iter().map(|u| (*u, "user")).chain([(SPARK, "service"), (JUPYTER, "service")]) {
            let token = generate_token();
            let everything = name == SPARK;
            let _ = write!(
                token_table,
                "\n[[tokens]]\nname = \"{name}\"\nkind = \"{kind}\"\nsubject = \"{name}\"\nsha256 = \"{}\"\n",
                TokenHash::of(&token).to_hex()
            );
            if everything {
                token_table.push_str(
                    "allow = [\"resolve\", \"workloads\", \"manage_secrets\", \"manage_access\", \"admin\"]\n\
                     act_for = [\"*\"]\nact_for_admins = true\n",
                );
            }
            tokens.insert(name.to_string(), token);
        }
        let authz: Vec<String> = ports["authz-service"].iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut authz_links = Vec::new();
        for replica in 0..REPLICAS {
            authz_links.push(crate::proxy::ClusterIp::start(authz.clone(), replica).await);
        }
        let mut authz_databases = Vec::new();
        for _ in 0..REPLICAS {
            authz_databases.push(crate::proxy::FreezableProxy::start(db.server_addr()).await);
        }
        let mut stack = Self {
            gateways: Vec::new(),
            kube,
            db,
            ports,
            metrics: HashMap::new(),
            env,
            internal_token: generate_token(),
            token_table,
            tokens,
            processes: HashMap::new(),
            authz_links,
            authz_databases,
            dir,
            _slot: slot,
        };
        for service in SERVICES {
            for replica in 0..REPLICAS {
                let port = stack.ports[service][replica];
                let config = stack.config(service, replica, port, None);
                stack.launch(service, replica, &config);
            }
            for replica in 0..REPLICAS {
                stack.until_serving(service, replica).await;
            }
        }
        stack.gateways = stack.ports["gateway"].iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        Some(stack)
    }

    /// The URLs of `service`'s replicas (of those in `only`).
    fn urls(&self, service: &str, only: Option<&[usize]>) -> String {
        let ports = self.ports[service].iter().enumerate().filter(|(i, _)| only.is_none_or(|o| o.contains(i)));
        ports.map(|(_, p)| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// Writes `config` and starts the process as replica `replica` of `service`.
    fn launch(&mut self, service: &'static str, replica: usize, config: &str) {
        let path = self.dir.path().join(format!("{service}-{replica}.toml"));
        std::fs::write(&path, config).expect("write a configuration");
        let log = self.dir.path().join(format!("{service}-{replica}.log"));
        let metrics = config
            .lines()
            .find_map(|l| l.strip_prefix("metrics_addr = \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse().ok())
            .expect("a metrics port");
        self.metrics.insert((service, replica), metrics);
        self.processes.insert((service, replica), start(service, &path, &log, &self.env));
    }

    /// Another gateway, calling only the secret-service and vault-config-service
    /// replicas in `replicas` (and authz-service replica 0); its number.
    pub async fn another_gateway(&mut self, replicas: &[usize]) -> usize {
        let number = self.gateways.len();
        let port = free_port();
        let config = self.config("gateway", 0, port, Some(replicas));
        self.launch("gateway", number, &config);
        self.ports.get_mut("gateway").expect("gateways").push(port);
        self.until_serving("gateway", number).await;
        self.gateways.push(format!("http://127.0.0.1:{port}"));
        number
    }

    /// The process ids, by (`service`, replica).
    pub fn pids(&self) -> Vec<((&'static str, usize), u32)> {
        let mut pids: Vec<_> = self.processes.iter().filter_map(|(k, p)| Some((*k, p.pid()?))).collect();
        pids.sort();
        pids
    }

    fn config(&self, service: &str, replica: usize, port: u16, only: Option<&[usize]>) -> String {
        let (internal_token, tokens) = (&self.internal_token, &self.token_table);
        let authz = format!("http://127.0.0.1:{}", self.authz_links[replica].port);
        let mut text = format!("internal_token = \"{internal_token}\"\n");
        if service != "authz-service" {
            // Past the longest a write waits for a replica that is gone.
            text.push_str("request_timeout_ms = 15000\n");
        }
        let kubernetes = format!(
            "backend = \"kubernetes\"\n[kubernetes]\napi_url = \"{}\"\nnamespace = \"{NAMESPACE}\"\n",
            self.kube.url
        );
        match service {
            "authz-service" => {
                let url = self.db.url_via(self.authz_databases[replica].port);
                let _ = write!(text, "database_url = \"{url}\"\nbootstrap_admins = [\"user:{ADMIN}\"]\n");
            }
            "secret-service" => {
                let _ = write!(
                    text,
                    "authz_url = \"{authz}\"\n{kubernetes}[replicas]\ndatabase_url = \"{}\"\n",
                    self.db.url
                );
            }
            "vault-config-service" => {
                let _ = write!(text, "authz_url = \"{authz}\"\ndatabase_url = \"{}\"\n{kubernetes}", self.db.url);
            }
            _ => {
                let _ = write!(
                    text,
                    "secret_service_url = \"{}\"\nvault_config_service_url = \"{}\"\nauthz_service_url = \"{authz}\"\n",
                    self.urls("secret-service", only),
                    self.urls("vault-config-service", only),
                );
                text.push_str(tokens);
                // One audit trail for every gateway.
                let _ = write!(text, "\n[audit]\ndatabase_url = \"{}\"\n", self.db.url);
            }
        }
        let _ = write!(
            text,
            "\n[server]\nlisten_addr = \"127.0.0.1:{port}\"\nmetrics_addr = \"127.0.0.1:{}\"\n",
            free_port()
        );
        text
    }

    /// Waits until replica `replica` of `service` answers. The metrics port
    /// was free when it was picked, but another process may take it before
    /// the replica binds it: then the replica starts again on another.
    async fn until_serving(&mut self, service: &'static str, replica: usize) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.ports[service][replica]).into();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut relaunched = 0;
        while secrets_common::server::probe(addr).await.is_err() {
            let log = self.log(service, replica);
            if relaunched < 3 && log.contains("cannot listen for metrics") && log.contains("Address already in use") {
                relaunched += 1;
                let path = self.dir.path().join(format!("{service}-{replica}.toml"));
                let config: String = std::fs::read_to_string(&path)
                    .expect("its configuration")
                    .lines()
                    .map(|l| match l.starts_with("metrics_addr = ") {
                        true => format!("metrics_addr = \"127.0.0.1:{}\"\n", free_port()),
                        false => format!("{l}\n"),
                    })
                    .collect();
                self.launch(service, replica, &config);
                continue;
            }
            assert!(std::time::Instant::now() < deadline, "{service} replica {replica} did not start: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A person's clients through gateway `gateway`.
    pub fn as_user(&self, name: &str, gateway: usize) -> Clients {
        Clients::new(&self.gateways[gateway], Some(&self.tokens[name]), None)
    }

    /// A platform service's clients through gateway `gateway`, acting for
    /// `user:{on_behalf_of}`.
    pub fn as_service(&self, on_behalf_of: &str, gateway: usize) -> Clients {
        Clients::new(&self.gateways[gateway], Some(&self.tokens[SPARK]), Some(&format!("user:{on_behalf_of}")))
    }

    /// The token of `name` (a persona, or the platform service).
    pub fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    /// The personas' grants in `domain` (as `TestApp::setup_domain`).
    pub async fn setup_domain(&self, domain: &str) {
        crate::grant_personas(&self.as_user(ADMIN, 0), domain).await;
    }

    /// SIGKILL: replica `replica` of `service` ends at once.
    pub fn kill(&mut self, service: &'static str, replica: usize) {
        self.processes.remove(&(service, replica)).expect("running").kill();
    }

    /// Authz-service replica `replica`'s link to the database (to cut it).
    pub fn authz_database(&self, replica: usize) -> &crate::proxy::FreezableProxy {
        &self.authz_databases[replica]
    }

    /// The admin's AuthzService on authz-service replica `replica` itself,
    /// as a gateway calls it.
    pub fn authz_direct(
        &self,
        replica: usize,
    ) -> secrets_proto::v1::authz_service_client::AuthzServiceClient<
        tonic::codegen::InterceptedService<tonic::transport::Channel, crate::ActAsAdmin>,
    > {
        let url = format!("http://127.0.0.1:{}", self.ports["authz-service"][replica]);
        secrets_proto::v1::authz_service_client::AuthzServiceClient::with_interceptor(
            crate::channel(&url),
            crate::ActAsAdmin::with_token(&self.internal_token),
        )
    }

    /// The credential the services present to each other.
    pub fn internal_token(&self) -> &str {
        &self.internal_token
    }

    /// What replica `replica` of `service` has logged so far.
    pub fn log(&self, service: &str, replica: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{service}-{replica}.log"))).unwrap_or_default()
    }

    pub async fn stop(self) {
        drop(self.processes);
        self.db.drop_database().await;
    }
}

/// Starts one replica, its log going to `log` (a pipe nobody reads would
/// fill up and stall it).
fn start(
    service: &'static str,
    config: &std::path::Path,
    log: &std::path::Path,
    env: &std::collections::BTreeMap<String, String>,
) -> Service {
    let log = std::fs::File::create(log).expect("a log file");
    let args = ["--config", config.to_str().expect("a UTF-8 path")];
    Service::start_with_args(service, &args, env, std::process::Stdio::from(log))
}
