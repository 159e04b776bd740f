//! What every service's gRPC server has: health, reflection, trace spans,
//! and a clean shutdown.

use std::{future::Future, net::SocketAddr, path::Path, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{Server, server::Router};
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::{
    cli::Maintenance,
    observe::{Metrics, ObserveLayer},
    telemetry::TelemetryConfig,
    tls::TlsConfig,
};

/// The `[server]` table every service has: where it listens, answers
/// health checks and serves metrics, how it drains, and TLS on the
/// listener. Environment variables name its keys `<PREFIX>SERVER__<KEY>`
/// (`GATEWAY_SERVER__LISTEN_ADDR`).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The gRPC listener.
    pub listen_addr: SocketAddr,
    /// Prometheus metrics at `GET /metrics`; empty turns the endpoint off.
    #[serde(default, deserialize_with = "crate::config::optional_addr", serialize_with = "addr_text")]
    pub metrics_addr: Option<SocketAddr>,
    /// Plaintext gRPC health checks only, for Kubernetes probes when the
    /// listener speaks TLS; unset: none.
    #[serde(default, deserialize_with = "crate::config::optional_addr", serialize_with = "addr_text")]
    pub health_addr: Option<SocketAddr>,
    /// After a shutdown signal: how long health checks answer NOT_SERVING
    /// while calls are still accepted, so load balancers stop sending before
    /// the listener closes. Set it to the load balancer's probe interval.
    #[serde(default)]
    pub shutdown_drain_ms: u64,
    /// TLS on the listener; plaintext is refused then. For the gateway's
    /// public listener: the internal services serve mutual TLS from
    /// `internal_tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Calls of one gRPC service served at once; more wait (see
    /// [`crate::admission`]).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Calls of one gRPC service that may wait for a turn; more are
    /// answered `RESOURCE_EXHAUSTED` at once.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// The longest a call waits for a turn (less when its deadline is
    /// nearer), then `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_queue_wait_ms")]
    pub queue_wait_ms: u64,
}

fn default_max_in_flight() -> usize {
    1_024
}

fn default_max_queued() -> usize {
    2_048
}

fn default_queue_wait_ms() -> u64 {
    2_000
}

fn addr_text<S: serde::Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_str(""),
    }
}

impl ServerConfig {
    /// Listening on loopback `port`, metrics on loopback `metrics_port`.
    pub fn local(port: u16, metrics_port: u16) -> Self {
        Self {
            listen_addr: ([127, 0, 0, 1], port).into(),
            metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
            health_addr: None,
            shutdown_drain_ms: 0,
            tls: None,
            max_in_flight: default_max_in_flight(),
            max_queued: default_max_queued(),
            queue_wait_ms: default_queue_wait_ms(),
        }
    }

    /// The admission bounds of this server.
    pub fn admission(&self) -> crate::admission::Limits {
        crate::admission::Limits {
            max_in_flight: self.max_in_flight.max(1),
            max_queued: self.max_queued,
            queue_wait: Duration::from_millis(self.queue_wait_ms),
        }
    }

    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }

    /// For the internal services, whose listeners serve the mutual TLS of
    /// `internal_tls`: `server.tls` would be ignored, so it is refused.
    pub fn refuse_listener_tls(&self) -> Result<(), String> {
        match self.tls {
            Some(_) => {
                Err("server.tls: the internal services serve mutual TLS from internal_tls; set that instead".into())
            }
            None => Ok(()),
        }
    }

    /// Where `health-check` asks: the plaintext health address when set.
    pub fn probe_addr(&self) -> SocketAddr {
        self.health_addr.unwrap_or(self.listen_addr)
    }
}

/// What [`run`] needs of a service binary.
pub trait Service: Sized {
    /// Its name in logs, traces and messages: `authz-service`.
    const NAME: &'static str;
    type Config;
    /// Built-in defaults, then the file, then the environment.
    fn load(file: Option<&Path>) -> anyhow::Result<Self::Config>;
    fn server(config: &Self::Config) -> &ServerConfig;
    fn telemetry(config: &Self::Config) -> &TelemetryConfig;
    /// Everything that can be checked without starting (`check-config`).
    fn validate(config: &Self::Config) -> anyhow::Result<()>;
    fn build(config: Self::Config) -> impl Future<Output = anyhow::Result<Self>>;
    fn port(&self) -> u16;
    fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> impl Future<Output = anyhow::Result<()>>;
}

/// For a service's `Application`, which serves through its field
/// `served: Served`: its `port`, `metrics_port` and `health_port`, and
/// [`Service`] from its inherent `build` and `run_until_stopped` and its
/// `Config`'s `load`, `validate`, `server` and `telemetry`.
#[macro_export]
macro_rules! service {
    ($app:ty, $config:ty, $name:literal) => {
        impl $app {
            /// The gRPC listener's port.
            pub fn port(&self) -> u16 {
                self.served.port()
            }

            /// The metrics endpoint's port, when there is one.
            pub fn metrics_port(&self) -> Option<u16> {
                self.served.metrics_port()
            }

            /// The plaintext health port, when there is one.
            pub fn health_port(&self) -> Option<u16> {
                self.served.health_port()
            }
        }

        impl $crate::server::Service for $app {
            const NAME: &'static str = $name;
            type Config = $config;

            fn load(file: Option<&std::path::Path>) -> anyhow::Result<$config> {
                <$config>::load(file)
            }

            fn server(config: &$config) -> &$crate::server::ServerConfig {
                &config.server
            }

            fn telemetry(config: &$config) -> &$crate::telemetry::TelemetryConfig {
                &config.telemetry
            }

            fn validate(config: &$config) -> anyhow::Result<()> {
                config.validate()
            }

            async fn build(config: $config) -> anyhow::Result<Self> {
                <$app>::build(config).await
            }

            fn port(&self) -> u16 {
                <$app>::port(self)
            }

            async fn run_until_stopped(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
                <$app>::run_until_stopped(self, shutdown).await
            }
        }
    };
}

/// A service binary's life: the process's TLS provider, the configuration,
/// then a maintenance `command` (`check-config`, `health-check`), or
/// telemetry and serving until SIGTERM or Ctrl-C.
pub async fn run<S: Service>(config_file: Option<&Path>, command: Option<Maintenance>) -> anyhow::Result<()> {
    // One TLS provider for the whole process (kube, sqlx, reqwest and
    // tonic all use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = S::load(config_file)?;
    if let Some(command) = command {
        return command.run(S::server(&config).probe_addr(), || S::validate(&config)).await;
    }
    let _telemetry = crate::telemetry::init(S::NAME, S::telemetry(&config))?;
    // Caught from before the port is bound: a SIGTERM that arrives as soon
    // as the service answers (an orchestrator's quick restart) stops it
    // cleanly instead of killing it.
    let shutdown = shutdown_signal();
    let app = S::build(config).await?;
    tracing::info!(port = app.port(), "{} listening", S::NAME);
    app.run_until_stopped(shutdown).await
}

/// The router every service builds: its services behind [`ObserveLayer`].
pub type ServiceRouter = Router<Stack<ObserveLayer, Identity>>;

/// A server builder with a span per request that joins the caller's trace,
/// and request metrics recorded into `metrics`.
pub fn builder(
    service: &'static str,
    metrics: &Metrics,
    server: &ServerConfig,
) -> Server<Stack<ObserveLayer, Identity>> {
    Server::builder().layer(ObserveLayer::new(service, metrics.clone()).with_admission(server.admission()))
}

/// The largest message an internal service accepts: the gateway's 8 MiB
/// request limit and room for what the gateway adds, so whatever the
/// gateway accepts and forwards is accepted upstream too.
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 8 * 1024 * 1024 + 64 * 1024;

/// The package of the internal APIs: reflected only by a server that serves
/// one of them.
pub const INTERNAL_PACKAGE: &str = "iomete.secrets.internal.v1.";

/// Server reflection (v1 and v1alpha, which grpcurl speaks) advertising only
/// the named services. The internal descriptor set is registered only when
/// an internal service is named, so the gateway cannot describe one.
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let internal = services.iter().any(|s| s.starts_with(INTERNAL_PACKAGE));
    let configure = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(secrets_proto::FILE_DESCRIPTOR_SET);
        if internal {
            b = b.register_encoded_file_descriptor_set(secrets_proto::INTERNAL_FILE_DESCRIPTOR_SET);
        }
        b = b
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest and friends, so grpcurl can print error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
        for s in services {
            b = b.with_service_name(*s);
        }
        b.with_service_name("grpc.health.v1.Health")
    };
    Ok((configure().build_v1()?, configure().build_v1alpha()?))
}

/// The health of a server's services: SERVING from the start, NOT_SERVING
/// from the moment shutdown begins.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
}

impl Health {
    /// Marks the named services and the server as a whole (`""`) with `status`.
    async fn set(&self, status: tonic_health::ServingStatus) {
        for name in self.services.iter().map(String::as_str).chain([""]) {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Tells health checkers to stop sending: the server is going away.
    pub async fn not_serving(&self) {
        self.set(tonic_health::ServingStatus::NotServing).await;
    }
}

/// Binds `addr`; errors name the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// The incoming connections of an already-bound listener, for
/// `serve_with_incoming`, with TCP_NODELAY: small gRPC frames must not wait
/// for Nagle's algorithm and the peer's delayed ACK (tens of ms per call).
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives in
/// between is not lost (nor does it kill the process with the default
/// action).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::terminate()).and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
    };
    async move {
        #[cfg(unix)]
        match handlers {
            Ok((mut term, mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down");
    }
}

/// Asks the gRPC health service of the server listening on `listen_addr`
/// (on loopback when it listens on every interface) whether it is serving.
/// For container health checks: `<binary> health-check`.
pub async fn probe(listen_addr: SocketAddr) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut addr = listen_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {e}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|e| anyhow::anyhow!("health check at {addr} failed: {}", e.message()))?
        .into_inner()
        .status();
    anyhow::ensure!(status == ServingStatus::Serving, "{addr} reports {}", status.as_str_name());
    Ok(())
}

/// How long open connections may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A service ready to run: its gRPC listener and router, its health, and
/// its metrics endpoint when one is configured.
pub struct Served {
    listener: TcpListener,
    router: ServiceRouter,
    health: Health,
    metrics: Metrics,
    metrics_listener: Option<TcpListener>,
    drain: std::time::Duration,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    health_listener: Option<TcpListener>,
}

impl Served {
    /// Binds the metrics endpoint (when `metrics_addr` is set). `drain` is
    /// how long the server keeps accepting calls after a shutdown signal
    /// while health checks already answer NOT_SERVING.
    pub async fn new(
        listener: TcpListener,
        (router, health): (ServiceRouter, Health),
        metrics: Metrics,
        metrics_addr: Option<SocketAddr>,
        drain: std::time::Duration,
    ) -> std::io::Result<Self> {
        let metrics_listener = match metrics_addr {
            Some(addr) => Some(crate::observe::bind_metrics(addr).await?),
            None => None,
        };
        Ok(Self { listener, router, health, metrics, metrics_listener, drain, tls: None, health_listener: None })
    }

    /// Ready to serve as `server` says: metrics, drain and the plaintext
    /// health listener from it; TLS on the listener when `tls` is set (the
    /// gateway's from `server.tls`, the internal services' mutual TLS).
    pub async fn start(
        listener: TcpListener,
        router: (ServiceRouter, Health),
        metrics: Metrics,
        server: &ServerConfig,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        Self::new(listener, router, metrics, server.metrics_addr, server.drain())
            .await?
            .with_tls(tls)
            .with_health_addr(server.health_addr)
            .await
    }

    /// Serves TLS (and only TLS) on the listener when `tls` is set.
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Also answers gRPC health checks in plaintext on `addr` (and nothing
    /// else there): for Kubernetes gRPC probes, which cannot speak TLS.
    pub async fn with_health_addr(mut self, addr: Option<SocketAddr>) -> std::io::Result<Self> {
        if let Some(addr) = addr {
            self.health_listener = Some(bind(addr).await?);
        }
        Ok(self)
    }

    /// The plaintext health port, when there is one.
    pub fn health_port(&self) -> Option<u16> {
        self.health_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port())
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The metrics endpoint's port, when there is one.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port())
    }

    /// Serves gRPC and metrics until `shutdown` resolves. From then on
    /// health checks answer NOT_SERVING, so load balancers stop sending;
    /// after the drain period the listener closes and open calls get at
    /// most [`SHUTDOWN_GRACE`] to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), tonic::transport::Error> {
        use futures::FutureExt;
        let (health, drain) = (self.health.clone(), self.drain);
        let shutdown = async move {
            shutdown.await;
            health.not_serving().await;
            if !drain.is_zero() {
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "not serving; draining before closing the listener"
                );
                tokio::time::sleep(drain).await;
            }
        }
        .shared();
        use futures::future::Either;
        let grpc = match self.tls {
            Some(tls) => Either::Left(
                self.router.serve_with_incoming_shutdown(crate::tls::incoming(self.listener, tls), shutdown.clone()),
            ),
            None => Either::Right(self.router.serve_with_incoming_shutdown(incoming(self.listener), shutdown.clone())),
        };
        let health = match self.health_listener {
            Some(l) => {
                let service = tonic_health::pb::health_server::HealthServer::new(
                    tonic_health::server::HealthService::from_health_reporter(self.health.reporter.clone()),
                );
                Either::Left(
                    Server::builder().add_service(service).serve_with_incoming_shutdown(incoming(l), shutdown.clone()),
                )
            }
            None => Either::Right(futures::future::ready(Ok(()))),
        };
        let metrics = match self.metrics_listener {
            Some(l) => Either::Left(self.metrics.serve(l, shutdown.clone())),
            None => Either::Right(futures::future::ready(())),
        };
        let serve = async {
            let (grpc, health, ()) = tokio::join!(grpc, health, metrics);
            grpc.and(health)
        };
        let deadline = async {
            shutdown.clone().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = serve => result,
            () = deadline => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after shutdown; closing them");
                Ok(())
            }
        }
    }
}

/// The router every service starts from: the observe layer, health with
/// every named service SERVING, and reflection advertising the names; and
/// the handle that turns health to NOT_SERVING at shutdown.
pub async fn router(
    service: &'static str,
    metrics: &Metrics,
    server: &ServerConfig,
    services: &[&str],
) -> anyhow::Result<(ServiceRouter, Health)> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health { reporter, services: services.iter().map(|s| s.to_string()).collect() };
    health.set(tonic_health::ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = reflection(services)?;
    let router = builder(service, metrics, server)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, health))
}

/// A background task of a service, stopped when the service (holding this)
/// goes.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
