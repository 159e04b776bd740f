//! Calls spread over every replica of a service: one connection per
//! address its name resolves to (a Kubernetes headless Service gives one
//! per ready pod), re-resolved every [`REFRESH`], each call sent to the
//! less loaded of two replicas picked at random (tower's p2c balancer,
//! load = calls in flight).
//!
//! A replica whose call failed at the transport (refused, reset, no
//! answer in time) is left out for a while ([`EJECT_MIN`], doubling up to
//! [`EJECT_MAX`] while it keeps failing), so that a retry goes to another
//! replica; when every replica is failing, calls go through and fail at
//! once rather than wait.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{body::Body, transport::Channel};
use tower::{
    BoxError, Service,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{CompleteOnResponse, PendingRequests},
    util::BoxService,
};

/// How often the names are resolved again.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long a replica whose call failed is first left out.
pub const EJECT_MIN: Duration = Duration::from_millis(500);
/// The longest a replica that keeps failing is left out at a time.
pub const EJECT_MAX: Duration = Duration::from_secs(5);

type Response = http::Response<Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where to connect: the scheme's port and every host to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as written, for log lines and errors.
    pub authority: String,
    pub host: String,
    pub port: u16,
}

/// The replicas behind one or more URLs, and the connection to each.
#[derive(Clone)]
pub struct Balanced {
    inner: Buffer<http::Request<Body>, BoxFuture<Result<Response, BoxError>>>,
    peer: &'static str,
    request_timeout: Duration,
}

impl Balanced {
    /// Starts resolving `targets` (now and every [`REFRESH`]) and connecting
    /// to each address with `connect` (lazily: a connection opens on first
    /// use). Needs a Tokio runtime.
    pub fn start(
        targets: Vec<Target>,
        peer: &'static str,
        request_timeout: Duration,
        connect: impl Fn(SocketAddr, &Target) -> Result<Channel, String> + Send + 'static,
    ) -> Self {
        Self::start_with(targets, peer, request_timeout, REFRESH, resolve, connect)
    }

    /// The same, with the names resolved by `resolve` every `refresh`.
    fn start_with<R>(
        targets: Vec<Target>,
        peer: &'static str,
        request_timeout: Duration,
        refresh: Duration,
        resolve: R,
        connect: impl Fn(SocketAddr, &Target) -> Result<Channel, String> + Send + 'static,
    ) -> Self
    where
        R: Fn(Target) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        let (changes, discovered) = tokio::sync::mpsc::channel::<Result<Change<SocketAddr, Replica>, Infallible>>(64);
        let healthy = Arc::new(AtomicUsize::new(0));
        let resolver = Resolver { targets, peer, refresh, resolve, connect };
        tokio::spawn(resolver.run(changes, healthy));
        let balance = Balance::new(tokio_stream::wrappers::ReceiverStream::new(discovered));
        let service = BoxService::new(balance);
        Self { inner: Buffer::new(service, 1024), peer, request_timeout }
    }
}

impl Service<http::Request<Body>> for Balanced {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(request);
        let (peer, timeout) = (self.peer, self.request_timeout);
        Box::pin(async move {
            // Waiting for a replica counts against the call's bound too.
            match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer,
                Err(_) => Err(Box::new(tonic::Status::unavailable(format!(
                    "{peer}: no replica answered within {} ms",
                    timeout.as_millis()
                ))) as BoxError),
            }
        })
    }
}

/// Every address a name resolves to, by DNS.
fn resolve(target: Target) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
    Box::pin(async move { Ok(tokio::net::lookup_host((target.host.as_str(), target.port)).await?.collect()) })
}

struct Resolver<R, C> {
    targets: Vec<Target>,
    peer: &'static str,
    refresh: Duration,
    resolve: R,
    connect: C,
}

impl<R, C> Resolver<R, C>
where
    R: Fn(Target) -> BoxFuture<std::io::Result<Vec<SocketAddr>>>,
    C: Fn(SocketAddr, &Target) -> Result<Channel, String>,
{
    /// Resolves every target into the set of addresses and tells the
    /// balancer what came and went, until the balancer is gone.
    async fn run(
        self,
        changes: tokio::sync::mpsc::Sender<Result<Change<SocketAddr, Replica>, Infallible>>,
        healthy: Arc<AtomicUsize>,
    ) {
        let peer = self.peer;
        let mut current: HashMap<SocketAddr, usize> = HashMap::new();
        loop {
            let mut found: HashMap<SocketAddr, usize> = HashMap::new();
            let mut failed = false;
            for (i, target) in self.targets.iter().enumerate() {
                match (self.resolve)(target.clone()).await {
                    Ok(addrs) if !addrs.is_empty() => found.extend(addrs.into_iter().map(|a| (a, i))),
                    Ok(_) => {
                        failed = true;
                        tracing::warn!(peer, target = %target.authority, "a replica name resolved to no address; keeping the ones known");
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(peer, target = %target.authority, error = %e, "cannot resolve a replica name; keeping the ones known");
                    }
                }
            }
            // A name that did not resolve this time keeps what it had.
            if failed {
                for (addr, i) in &current {
                    found.entry(*addr).or_insert(*i);
                }
            }
            let mut unusable = Vec::new();
            for (addr, i) in &found {
                if !current.contains_key(addr) {
                    let channel = match (self.connect)(*addr, &self.targets[*i]) {
                        Ok(channel) => channel,
                        Err(e) => {
                            tracing::warn!(peer, %addr, error = %e, "cannot connect to a replica address");
                            unusable.push(*addr);
                            continue;
                        }
                    };
                    let replica = Replica::new(channel, healthy.clone());
                    if changes.send(Ok(Change::Insert(*addr, replica))).await.is_err() {
                        return;
                    }
                    tracing::debug!(peer, %addr, "a replica joined");
                }
            }
            for addr in &unusable {
                found.remove(addr);
            }
            for addr in current.keys() {
                if !found.contains_key(addr) {
                    if changes.send(Ok(Change::Remove(*addr))).await.is_err() {
                        return;
                    }
                    tracing::info!(peer, %addr, "a replica left");
                }
            }
            current = found;
            tokio::select! {
                () = tokio::time::sleep(self.refresh) => {}
                () = changes.closed() => return,
            }
        }
    }
}

/// One replica's connection, left out of the balancer while it fails.
struct Replica {
    load: PendingRequests<Channel, CompleteOnResponse>,
    state: Arc<Mutex<Health>>,
    /// Replicas of this balancer not left out now.
    healthy: Arc<AtomicUsize>,
    wake: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Default)]
struct Health {
    /// Left out until then.
    out_until: Option<Instant>,
    /// How long the next failure leaves it out.
    next_eject: Duration,
}

impl Replica {
    fn new(channel: Channel, healthy: Arc<AtomicUsize>) -> Self {
        healthy.fetch_add(1, Ordering::SeqCst);
        Self {
            load: PendingRequests::new(channel, CompleteOnResponse::default()),
            state: Arc::new(Mutex::new(Health { out_until: None, next_eject: EJECT_MIN })),
            healthy,
            wake: None,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.health().out_until.is_none() {
            self.healthy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl tower::load::Load for Replica {
    type Metric = tower::load::pending_requests::Count;

    fn load(&self) -> Self::Metric {
        tower::load::Load::load(&self.load)
    }
}

impl Service<http::Request<Body>> for Replica {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let out_until = self.health().out_until;
        if let Some(until) = out_until {
            // Left out only while another replica can take the call.
            if until > Instant::now() && self.healthy.load(Ordering::SeqCst) > 0 {
                let deadline = tokio::time::Instant::from_std(until);
                let wake = self.wake.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if wake.deadline() != deadline {
                    wake.as_mut().reset(deadline);
                }
                if wake.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Its time out is over: it is tried again.
            let mut health = self.health();
            if health.out_until.take().is_some() {
                self.healthy.fetch_add(1, Ordering::SeqCst);
            }
            drop(health);
            self.wake = None;
        }
        self.load.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.load.call(request);
        let (state, healthy) = (self.state.clone(), self.healthy.clone());
        Box::pin(async move {
            let answer = call.await;
            let mut health = state.lock().unwrap_or_else(|p| p.into_inner());
            match &answer {
                Ok(_) => health.next_eject = EJECT_MIN,
                Err(_) => {
                    if health.out_until.is_none() {
                        healthy.fetch_sub(1, Ordering::SeqCst);
                    }
                    health.out_until = Some(Instant::now() + health.next_eject);
                    health.next_eject = (health.next_eject * 2).min(EJECT_MAX);
                }
            }
            answer.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    use super::*;

    /// A gRPC server that says which replica it is by the health status it
    /// holds for "who"; stopped when the sender is dropped.
    async fn replica(status: tonic_health::ServingStatus) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("who", status).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _keep = reporter;
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        (addr, stop)
    }

    /// Which replica answered.
    async fn who(client: &mut HealthClient<Balanced>) -> Result<&'static str, tonic::Status> {
        let answer = client.check(HealthCheckRequest { service: "who".into() }).await?.into_inner();
        Ok(match answer.status {
            1 => "a",
            2 => "b",
            _ => "c",
        })
    }

    #[tokio::test]
    async fn calls_spread_over_the_replicas_a_name_resolves_to_follow_them_as_they_change_and_skip_a_dead_one() {
        use tonic_health::ServingStatus;
        let (a, stop_a) = replica(ServingStatus::Serving).await;
        let (b, _stop_b) = replica(ServingStatus::NotServing).await;
        let (c, _stop_c) = replica(ServingStatus::Unknown).await;
        // What the name resolves to; the test changes it as pods would come and go.
        let addresses = Arc::new(Mutex::new(vec![a, b]));
        let resolved = addresses.clone();
        let target = Target { authority: "replicas:1".into(), host: "replicas".into(), port: 1 };
        let balanced = Balanced::start_with(
            vec![target],
            "test",
            Duration::from_secs(5),
            Duration::from_millis(50),
            move |_| {
                let now = resolved.lock().unwrap().clone();
                Box::pin(async move { Ok(now) })
            },
            |addr, _| Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy()),
        );
        let mut client = HealthClient::new(balanced);
        let count = |client: &mut HealthClient<Balanced>| {
            let mut client = client.clone();
            async move {
                let mut seen: HashMap<&'static str, usize> = HashMap::new();
                for _ in 0..60 {
                    *seen.entry(who(&mut client).await.unwrap()).or_default() += 1;
                }
                seen
            }
        };
        let seen = count(&mut client).await;
        assert!(seen.get("a").is_some_and(|n| *n > 0) && seen.get("b").is_some_and(|n| *n > 0), "{seen:?}");
        assert_eq!(seen.get("c"), None, "c is not among the addresses yet");

        // A pod joins and another leaves: within a refresh the calls follow.
        *addresses.lock().unwrap() = vec![b, c];
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = count(&mut client).await;
        assert!(seen.get("c").is_some_and(|n| *n > 0), "{seen:?}");
        assert_eq!(seen.get("a"), None, "a left: {seen:?}");

        // A replica that dies (still listed): at most the calls on it fail,
        // then it is left out and a retry goes to another.
        *addresses.lock().unwrap() = vec![a, b];
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(stop_a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut failures = 0;
        for _ in 0..40 {
            match who(&mut client).await {
                Ok(answered) => assert_eq!(answered, "b"),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                    failures += 1;
                    // The retry succeeds on the other replica.
                    assert_eq!(who(&mut client).await.expect("the retry"), "b");
                }
            }
        }
        assert!(failures <= 2, "the dead replica was left out after failing: {failures} failures");
    }
}
