//! Calls spread over every replica of a service: one connection per
//! address its name resolves to (a Kubernetes headless Service gives one
//! per ready pod), re-resolved every [`REFRESH`], each call sent to the
//! less loaded of two replicas picked at random (tower's p2c balancer,
//! load = calls in flight).
//!
//! A replica whose call failed at the transport (refused, reset, no
//! answer in time) is left out for a while ([`EJECT_MIN`], doubling up to
//! [`EJECT_MAX`] while it keeps failing), so that a retry goes to another
//! replica; it comes back once a new connection to it opens (a probe, not a
//! caller's call). When every replica is failing, calls go through and
//! fail at once rather than wait; when the names resolve to no address at
//! all, calls fail at once naming them.

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
    /// Addresses known now; -1 until the names were first resolved.
    known: Arc<std::sync::atomic::AtomicIsize>,
    /// `poll_ready` found no address: the call fails at once.
    nowhere: bool,
    /// The names, for errors.
    names: Arc<str>,
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
        let known = Arc::new(std::sync::atomic::AtomicIsize::new(-1));
        let names: Arc<str> = targets.iter().map(|t| t.authority.as_str()).collect::<Vec<_>>().join(",").into();
        let resolver = Resolver { targets, peer, refresh, resolve, connect, known: known.clone() };
        tokio::spawn(resolver.run(changes, healthy));
        let balance = Balance::new(tokio_stream::wrappers::ReceiverStream::new(discovered));
        let service = BoxService::new(balance);
        Self { inner: Buffer::new(service, 1024), peer, request_timeout, known, nowhere: false, names }
    }
}

impl Service<http::Request<Body>> for Balanced {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Nowhere to send it: answered at once, never queued for good.
        self.nowhere = self.known.load(Ordering::SeqCst) == 0;
        if self.nowhere {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if std::mem::take(&mut self.nowhere) {
            let status = tonic::Status::unavailable(format!(
                "{}: {} resolves to no address (no replica is ready)",
                self.peer, self.names
            ));
            return Box::pin(async move { Err(Box::new(status) as BoxError) });
        }
        let call = self.inner.call(request);
        // Past the replica's own bound (which leaves it out), so a replica
        // that does not answer is noticed; the rest is time spent waiting
        // for a replica to be ready.
        let (peer, timeout) = (self.peer, self.request_timeout + Duration::from_millis(500));
        Box::pin(async move {
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
    known: Arc<std::sync::atomic::AtomicIsize>,
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
            for (i, target) in self.targets.iter().enumerate() {
                match (self.resolve)(target.clone()).await {
                    Ok(addrs) => found.extend(addrs.into_iter().map(|a| (a, i))),
                    Err(e) => {
                        // A name that did not resolve this time keeps what it had.
                        tracing::warn!(peer, target = %target.authority, error = %e, "cannot resolve a replica name; keeping its addresses known");
                        found.extend(current.iter().filter(|(_, t)| **t == i).map(|(a, t)| (*a, *t)));
                    }
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
                    let replica = Replica::new(*addr, channel, healthy.clone());
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
            if found.is_empty() {
                tracing::warn!(peer, "no replica address is known: calls fail until one resolves");
            }
            self.known.store(found.len() as isize, Ordering::SeqCst);
            // With nowhere to send calls, look again soon.
            let wait = if found.is_empty() { self.refresh.min(Duration::from_secs(1)) } else { self.refresh };
            current = found;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = changes.closed() => return,
            }
        }
    }
}

/// One replica's connection, left out of the balancer while it fails.
struct Replica {
    addr: SocketAddr,
    load: PendingRequests<Channel, CompleteOnResponse>,
    state: Arc<Mutex<Health>>,
    /// Replicas of this balancer not left out now.
    healthy: Arc<AtomicUsize>,
    wake: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A connection attempt deciding whether it comes back.
    probe: Option<BoxFuture<bool>>,
}

struct Health {
    /// Left out until then (and until a probe connects).
    out_until: Option<Instant>,
    /// How long the next failure leaves it out.
    next_eject: Duration,
    /// Removed from the balancer: calls still finishing change no count.
    gone: bool,
}

impl Health {
    /// Leaves the replica out after a failure.
    fn eject(&mut self, healthy: &AtomicUsize) {
        if self.gone {
            return;
        }
        if self.out_until.is_none() {
            decrement(healthy);
        }
        self.out_until = Some(Instant::now() + self.next_eject);
        self.next_eject = (self.next_eject * 2).min(EJECT_MAX);
    }

    /// Takes the replica back.
    fn readmit(&mut self, healthy: &AtomicUsize) {
        if self.out_until.take().is_some() && !self.gone {
            healthy.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn decrement(count: &AtomicUsize) {
    let _ = count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1)));
}

/// Whether a new TCP connection to `addr` opens (within a second).
fn connects(addr: SocketAddr) -> BoxFuture<bool> {
    Box::pin(async move {
        matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
    })
}

impl Replica {
    fn new(addr: SocketAddr, channel: Channel, healthy: Arc<AtomicUsize>) -> Self {
        healthy.fetch_add(1, Ordering::SeqCst);
        Self {
            addr,
            load: PendingRequests::new(channel, CompleteOnResponse::default()),
            state: Arc::new(Mutex::new(Health { out_until: None, next_eject: EJECT_MIN, gone: false })),
            healthy,
            wake: None,
            probe: None,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Pending` while the replica is left out (and another can take the
    /// call); registers the wake-up.
    fn poll_back(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(until) = self.health().out_until else { return Poll::Ready(()) };
            // Every replica is failing: let calls through, to fail at once.
            if self.healthy.load(Ordering::SeqCst) == 0 {
                self.health().readmit(&self.healthy);
                return Poll::Ready(());
            }
            if until > Instant::now() {
                let deadline = tokio::time::Instant::from_std(until);
                let wake = self.wake.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if wake.deadline() != deadline {
                    wake.as_mut().reset(deadline);
                }
                if wake.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                continue;
            }
            // Its time out is over: a new connection, not a caller's
            // call, finds out whether it is back.
            let addr = self.addr;
            let probe = self.probe.get_or_insert_with(|| connects(addr));
            let Poll::Ready(back) = probe.as_mut().poll(cx) else { return Poll::Pending };
            self.probe = None;
            let mut health = self.health();
            if back {
                health.readmit(&self.healthy);
                return Poll::Ready(());
            }
            // Still down: left out longer (it stays out of the count).
            health.out_until = Some(Instant::now() + health.next_eject);
            health.next_eject = (health.next_eject * 2).min(EJECT_MAX);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let mut health = self.health();
        if !health.gone && health.out_until.is_none() {
            decrement(&self.healthy);
        }
        health.gone = true;
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
        if self.poll_back(cx).is_pending() {
            return Poll::Pending;
        }
        self.wake = None;
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
                Err(_) => health.eject(&healthy),
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
        replica_on("127.0.0.1:0".parse().unwrap(), status).await
    }

    async fn replica_on(
        addr: SocketAddr,
        status: tonic_health::ServingStatus,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
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
        // Calls for about three seconds: past several times it is left out.
        let (mut failures, mut calls) = (0, 0);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            calls += 1;
            match who(&mut client).await {
                Ok(answered) => assert_eq!(answered, "b"),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                    failures += 1;
                    // The retry succeeds on the other replica.
                    assert_eq!(who(&mut client).await.expect("the retry"), "b");
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Only calls sent before it was known dead fail: coming back is
        // decided by a new connection, never by a caller's call.
        assert!(failures <= 2, "{failures} of {calls} calls failed on the dead replica");

        // It comes back: once it listens again, calls reach it.
        let (_a_again, _stop_again) = replica_on(a, ServingStatus::Serving).await;
        let mut back = false;
        for _ in 0..400 {
            if who(&mut client).await.expect("a call") == "a" {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(back, "a replica that listens again takes calls again");
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_no_address_fails_calls_at_once_naming_it() {
        let target = Target { authority: "secret-service-pods:50052".into(), host: "pods".into(), port: 1 };
        let balanced = Balanced::start_with(
            vec![target],
            "secret-service",
            Duration::from_secs(30),
            Duration::from_millis(50),
            |_| Box::pin(async { Ok(Vec::new()) }),
            |_, _| Err("no address to connect to".to_string()),
        );
        let mut client = HealthClient::new(balanced);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Many at once: none is queued for good.
        let calls: Vec<_> = (0..2_000)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { who(&mut client).await })
            })
            .collect();
        for call in calls {
            let status =
                tokio::time::timeout(Duration::from_secs(10), call).await.expect("answered").unwrap().unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("secret-service-pods:50052 resolves to no address"), "{status:?}");
        }
        assert!(who(&mut client).await.is_err());
    }
}
