//! What SREs see of every call: a span per gRPC request on both sides of
//! each hop (joined by W3C trace context), its outcome, and Prometheus
//! metrics for requests and backend calls.
//!
//! Labels and span attributes carry service, method, status code and backend
//! names only: never a value, a token or a key.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tonic::{Code, transport::Channel};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};

use crate::telemetry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc_service: String,
    rpc_method: String,
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    rpc_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    rpc_service: String,
    reason: String,
}

struct Inner {
    registry: Registry,
    admission_in_flight: Family<AdmissionLabels, Gauge>,
    admission_queued: Family<AdmissionLabels, Gauge>,
    admission_shed: Family<ShedLabels, Counter>,
    requests: Family<RpcLabels, Counter>,
    request_seconds: Family<RpcLabels, Histogram>,
    backend_calls: Family<BackendLabels, Counter>,
    backend_errors: Family<BackendLabels, Counter>,
    backend_seconds: Family<BackendLabels, Histogram>,
    changes_per_write: Family<WriteLabels, Histogram>,
    audit_records: Family<AuditLabels, Counter>,
    value_cache_entries: Gauge,
    value_cache_bytes: Gauge,
    value_cache_evictions: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    backend: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~16 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 17))
}

fn changes_histogram() -> Histogram {
    // 1 .. 256, the most changes one write takes
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

/// One service's metrics registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("secrets");
        let requests = Family::<RpcLabels, Counter>::default();
        let request_seconds =
            Family::<RpcLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let backend_calls = Family::<BackendLabels, Counter>::default();
        let backend_errors = Family::<BackendLabels, Counter>::default();
        let backend_seconds =
            Family::<BackendLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("grpc_server_requests", "gRPC requests served, by method and status code", requests.clone());
        registry.register(
            "grpc_server_request_duration_seconds",
            "Time to serve a gRPC request, by method and status code",
            request_seconds.clone(),
        );
        registry.register(
            "backend_calls",
            "Calls to a backend (kubernetes, embedded, sqlite, postgres, or another service)",
            backend_calls.clone(),
        );
        registry.register("backend_errors", "Backend calls that failed", backend_errors.clone());
        registry.register("backend_call_duration_seconds", "Time a backend call took", backend_seconds.clone());
        let changes_per_write =
            Family::<WriteLabels, Histogram>::new_with_constructor(changes_histogram as fn() -> Histogram);
        registry.register(
            "changes_per_write",
            "Changes written together (group commit) in one write of a store object or one database transaction: the count is the writes",
            changes_per_write.clone(),
        );
        let admission_in_flight = Family::<AdmissionLabels, Gauge>::default();
        let admission_queued = Family::<AdmissionLabels, Gauge>::default();
        let admission_shed = Family::<ShedLabels, Counter>::default();
        registry.register(
            "admission_in_flight",
            "Calls being served, by gRPC service (at most server.max_in_flight)",
            admission_in_flight.clone(),
        );
        registry.register(
            "admission_queued",
            "Calls waiting for a turn, by gRPC service (at most server.max_queued)",
            admission_queued.clone(),
        );
        registry.register(
            "admission_shed",
            "Calls answered RESOURCE_EXHAUSTED without being served: queue_full or waited_too_long",
            admission_shed.clone(),
        );
        let audit_records = Family::<AuditLabels, Counter>::default();
        registry.register(
            "audit_records",
            "Audit records by outcome: recorded (in the audit store), dropped (buffered mode, the buffer full), failed (the store refused or did not answer in time)",
            audit_records.clone(),
        );
        let value_cache_entries = Gauge::default();
        let value_cache_bytes = Gauge::default();
        let value_cache_evictions = Counter::default();
        registry.register(
            "gateway_value_cache_entries",
            "Secret values (and answers that a key does not exist) the gateway keeps under a value lease",
            value_cache_entries.clone(),
        );
        registry.register(
            "gateway_value_cache_bytes",
            "Bytes of keys and values the gateway keeps under a value lease (at most value_cache.max_bytes)",
            value_cache_bytes.clone(),
        );
        registry.register(
            "gateway_value_cache_evictions",
            "Values the gateway dropped to stay within value_cache.max_entries and value_cache.max_bytes",
            value_cache_evictions.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                value_cache_entries,
                value_cache_bytes,
                value_cache_evictions,
                audit_records,
                registry,
                requests,
                request_seconds,
                backend_calls,
                backend_errors,
                backend_seconds,
                admission_in_flight,
                admission_queued,
                admission_shed,
                changes_per_write,
            }),
        }
    }

    /// Calls of `rpc_service` in flight and waiting.
    pub fn admission_state(&self, rpc_service: &str, in_flight: usize, queued: usize) {
        let labels = AdmissionLabels { rpc_service: rpc_service.into() };
        self.inner.admission_in_flight.get_or_create(&labels).set(in_flight as i64);
        self.inner.admission_queued.get_or_create(&labels).set(queued as i64);
    }

    /// A call of `rpc_service` shed, and why.
    pub fn admission_shed(&self, rpc_service: &str, reason: &str) {
        let labels = ShedLabels { rpc_service: rpc_service.into(), reason: reason.into() };
        self.inner.admission_shed.get_or_create(&labels).inc();
    }

    fn observe_request(&self, service: &str, method: &str, code: Code, elapsed: Duration) {
        let labels =
            RpcLabels { rpc_service: service.into(), rpc_method: method.into(), grpc_code: code_name(code).into() };
        self.inner.requests.get_or_create(&labels).inc();
        self.inner.request_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// Records one backend call.
    pub fn observe_backend(&self, backend: &str, operation: &str, ok: bool, elapsed: Duration) {
        let labels = BackendLabels { backend: backend.into(), operation: operation.into() };
        self.inner.backend_calls.get_or_create(&labels).inc();
        if !ok {
            self.inner.backend_errors.get_or_create(&labels).inc();
        }
        self.inner.backend_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// One write (a store object's, a database transaction) carrying
    /// `changes` callers' changes.
    pub fn observe_group_write(&self, backend: &str, changes: usize) {
        let labels = WriteLabels { backend: backend.into() };
        self.inner.changes_per_write.get_or_create(&labels).observe(changes as f64);
    }

    /// `n` audit records that ended as `outcome` (recorded, dropped, failed).
    pub fn audit_records(&self, outcome: &str, n: u64) {
        self.inner.audit_records.get_or_create(&AuditLabels { outcome: outcome.into() }).inc_by(n);
    }

    /// The gateway's value cache now, and values it just evicted.
    pub fn value_cache(&self, entries: usize, bytes: usize, evicted: u64) {
        self.inner.value_cache_entries.set(entries as i64);
        self.inner.value_cache_bytes.set(bytes as i64);
        self.inner.value_cache_evictions.inc_by(evicted);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let metrics = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(metrics_response(&metrics, req.method(), req.uri().path())) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }
}

fn metrics_response(metrics: &Metrics, method: &http::Method, path: &str) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&http::Method::GET, "/metrics") => {
            (http::StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        _ => (http::StatusCode::NOT_FOUND, "text/plain", "metrics are served at GET /metrics\n".to_string()),
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}

/// Binds the metrics listener; errors name the address.
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for metrics on {addr}: {e}")))
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// The label every path that names no RPC of ours is counted under.
pub const UNKNOWN: &str = "unknown";

/// Every RPC path of the workspace's protos, `/pkg.Service/Method`.
fn known_paths() -> &'static std::collections::HashSet<String> {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message;
        [secrets_proto::FILE_DESCRIPTOR_SET, secrets_proto::INTERNAL_FILE_DESCRIPTOR_SET]
            .iter()
            .filter_map(|set| prost_types::FileDescriptorSet::decode(*set).ok())
            .flat_map(|set| set.file)
            .flat_map(|file| {
                let package = file.package().to_string();
                file.service.into_iter().flat_map(move |service| {
                    let prefix = format!("/{package}.{}/", service.name());
                    service.method.into_iter().map(move |m| format!("{prefix}{}", m.name()))
                })
            })
            .collect()
    })
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`) for the RPCs this
/// workspace defines, (`unknown`, `unknown`) for any other path: a caller
/// sending random paths cannot create a metric series or span name each.
pub fn rpc_of(path: &str) -> (&str, &str) {
    if known_paths().contains(path) {
        path.trim_start_matches('/').split_once('/').unwrap_or((UNKNOWN, UNKNOWN))
    } else {
        (UNKNOWN, UNKNOWN)
    }
}

/// Health checks and reflection are not traced or counted: they would bury
/// the calls that matter.
fn is_quiet(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// What to record once a call's final status is known.
struct Finish {
    span: Span,
    start: Instant,
    metrics: Metrics,
    side: Side,
}

enum Side {
    Server { service: String, method: String },
    Client { peer: &'static str, method: String },
}

impl Finish {
    fn done(self, code: Code) {
        let elapsed = self.start.elapsed();
        self.span.record("rpc.grpc.status_code", code as i64);
        if code != Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
        match &self.side {
            Side::Server { service, method } => self.metrics.observe_request(service, method, code, elapsed),
            Side::Client { peer, method } => {
                // Refusals about the request itself are answers, not backend failures.
                let failed = matches!(
                    code,
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Internal
                        | Code::Unknown
                        | Code::Cancelled
                        | Code::DataLoss
                );
                self.metrics.observe_backend(peer, method, !failed, elapsed)
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call's status when its trailers
    /// arrive (or CANCELLED when it is dropped before).
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        finish: Option<Finish>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(f) = this.project().finish.take() {
                f.done(Code::Cancelled);
            }
        }
    }
}

/// Needed by tonic's interceptors, which answer refused calls themselves.
impl<B: Default> Default for ObservedBody<B> {
    fn default() -> Self {
        Self { inner: B::default(), finish: None }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref()
                    && let Some(finish) = this.finish.take()
                {
                    finish.done(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(Code::Unknown);
                }
            }
            None => {
                if let Some(finish) = this.finish.take() {
                    finish.done(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn observe_response<B>(response: http::Response<B>, finish: Option<Finish>) -> http::Response<ObservedBody<B>> {
    // Errors are sent "trailers-only": the status is already in the headers.
    let finish = match (finish, grpc_status(response.headers())) {
        (Some(f), Some(code)) => {
            f.done(code);
            None
        }
        (f, _) => f,
    };
    response.map(|inner| ObservedBody { inner, finish })
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Server layer: one span per request (continuing the caller's trace), its
/// status recorded on the span, and the request metrics.
#[derive(Clone)]
pub struct ObserveLayer {
    /// The service this server is (`gateway`, `secret-service`, ...).
    service: &'static str,
    metrics: Metrics,
    /// Who gets a turn (see [`crate::admission`]); `None`: everyone.
    admission: Option<Arc<crate::admission::Admission>>,
}

impl ObserveLayer {
    pub fn new(service: &'static str, metrics: Metrics) -> Self {
        Self { service, metrics, admission: None }
    }

    /// Calls wait for a turn within `limits`, or are shed.
    pub fn with_admission(mut self, limits: crate::admission::Limits) -> Self {
        self.admission = Some(Arc::new(crate::admission::Admission::new(self.service, limits, self.metrics.clone())));
        self
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, service: self.service, metrics: self.metrics.clone(), admission: self.admission.clone() }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    service: &'static str,
    metrics: Metrics,
    admission: Option<Arc<crate::admission::Admission>>,
}

/// Bound on a `grpc-message` a server sends: however much of a caller's
/// input an error repeats, it fits in HTTP/2 headers.
const MAX_GRPC_MESSAGE_BYTES: usize = 2_048;

/// The response's `grpc-message`, cut at [`MAX_GRPC_MESSAGE_BYTES`] (never
/// inside a `%XX` escape) with `…` appended.
fn cap_grpc_message(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get("grpc-message") else { return };
    let bytes = value.as_bytes();
    if bytes.len() <= MAX_GRPC_MESSAGE_BYTES {
        return;
    }
    let mut cut = MAX_GRPC_MESSAGE_BYTES;
    if let Some(percent) = bytes[cut.saturating_sub(2)..cut].iter().position(|b| *b == b'%') {
        cut = cut - 2 + percent;
    }
    // Nor inside a UTF-8 character: the first byte left out may not be a
    // continuation byte (%80-%BF).
    let continuation = |at: usize| {
        bytes.get(at) == Some(&b'%')
            && bytes.get(at + 1).is_some_and(|h| matches!(h, b'8' | b'9' | b'A' | b'B' | b'a' | b'b'))
    };
    while cut >= 3 && continuation(cut) {
        cut -= 3;
    }
    let mut capped = bytes[..cut].to_vec();
    capped.extend_from_slice(b"%E2%80%A6");
    if let Ok(v) = http::HeaderValue::from_bytes(&capped) {
        headers.insert("grpc-message", v);
    }
}

/// A request past this server's size limit is refused by tonic with a
/// message that names nobody: say which service refused it, as a limit met
/// further along is named by the service that called there.
fn name_size_refusal(service: &str, headers: &mut http::HeaderMap) {
    if grpc_status(headers) != Some(Code::OutOfRange) {
        return;
    }
    let Some(value) = headers.get("grpc-message") else { return };
    // tonic's own words, not yet named: a message another service named
    // (and this one passed on) keeps its one name.
    let said = String::from_utf8_lossy(value.as_bytes()).replace("%20", " ");
    if !said.starts_with("Error, decoded message length too large") {
        return;
    }
    let named = format!("{service}:%20{}", String::from_utf8_lossy(value.as_bytes()));
    if let Ok(v) = http::HeaderValue::from_str(&named) {
        headers.insert("grpc-message", v);
    }
}

/// The answer to a call whose handler panicked: INTERNAL naming the RPC
/// (trailers-only), instead of a reset stream the caller sees as a timeout.
fn panicked<B: Default>(path: &str) -> http::Response<B> {
    tracing::error!(rpc = path, "a handler panicked; the call was answered INTERNAL");
    let message = format!("{path} failed: the service hit a bug (a panic) and did not finish the call; report it");
    let encoded: String = message
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b" ./:;()_-,".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let mut response = http::Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", http::HeaderValue::from(Code::Internal as i32));
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
    response
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observe<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let path =
            if is_quiet(path) || known_paths().contains(path) { path.to_string() } else { "/unknown/unknown".into() };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let service = self.service;
        // A panicking handler is answered, not left to reset the stream.
        let guarded = |fut: S::Future, path: String| async move {
            use futures::FutureExt;
            match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                Ok(answer) => answer.map(|mut response| {
                    name_size_refusal(service, response.headers_mut());
                    cap_grpc_message(response.headers_mut());
                    response
                }),
                Err(_) => Ok(panicked(&path)),
            }
        };
        if is_quiet(&path) {
            let fut = guarded(inner.call(request), path);
            return Box::pin(async move { Ok(observe_response(fut.await?, None)) });
        }
        let span = telemetry::server_span(&path, request.headers());
        let deadline = crate::deadline::from_headers(request.headers());
        let admission = self.admission.clone();
        let fut = {
            let _entered = span.enter();
            guarded(inner.call(request), path.clone())
        };
        let (service, method) = rpc_of(&path);
        let finish = Finish {
            span: span.clone(),
            start: Instant::now(),
            metrics: self.metrics.clone(),
            side: Side::Server { service: service.into(), method: method.into() },
        };
        let rpc_service = service.to_string();
        Box::pin(
            async move {
                // Not polled until it has a turn: nothing of it runs before.
                let _turn = match &admission {
                    None => None,
                    Some(admission) => match admission.admit(&rpc_service, deadline).await {
                        Ok(turn) => Some(turn),
                        Err(shed) => {
                            let refusal = admission.refusal(&rpc_service, shed);
                            tracing::warn!(rpc_service, "{}", refusal.message());
                            return Ok(observe_response(refusal.into_http(), Some(finish)));
                        }
                    },
                };
                Ok(observe_response(fut.await?, Some(finish)))
            }
            .instrument(span),
        )
    }
}

/// A channel to another service that opens a client span per call, sends
/// that span's trace context, and records the call as a backend call of
/// `peer`.
#[derive(Clone)]
pub struct TracedChannel {
    inner: Link,
    peer: &'static str,
    metrics: Metrics,
}

/// One connection, or one per replica ([`crate::balance`]).
#[derive(Clone)]
enum Link {
    One(Channel),
    Balanced(crate::balance::Balanced),
}

impl TracedChannel {
    pub fn new(inner: Channel, peer: &'static str, metrics: Metrics) -> Self {
        Self { inner: Link::One(inner), peer, metrics }
    }

    /// Calls spread over the replicas of `peer`.
    pub fn balanced(inner: crate::balance::Balanced, peer: &'static str, metrics: Metrics) -> Self {
        Self { inner: Link::Balanced(inner), peer, metrics }
    }
}

impl Service<http::Request<tonic::body::Body>> for Link {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Link::One(channel) => channel.poll_ready(cx).map_err(Into::into),
            Link::Balanced(balanced) => balanced.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        match self {
            Link::One(channel) => {
                let call = channel.call(request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            Link::Balanced(balanced) => balanced.call(request),
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for TracedChannel {
    type Response = http::Response<ObservedBody<tonic::body::Body>>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().to_string();
        let (service, method) = rpc_of(&path);
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            peer.service = self.peer,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        telemetry::record_ids(&span);
        telemetry::inject_into_headers(&span, request.headers_mut());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(request);
        let finish = Finish {
            span: span.clone(),
            start: Instant::now(),
            metrics: self.metrics.clone(),
            side: Side::Client { peer: self.peer, method: method.to_string() },
        };
        Box::pin(
            async move {
                match fut.await {
                    Ok(response) => Ok(observe_response(response, Some(finish))),
                    Err(e) => {
                        finish.done(Code::Unavailable);
                        Err(e)
                    }
                }
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal_naming_the_rpc_and_long_messages_are_cut() {
        use tower::ServiceExt;
        let path = "/iomete.secrets.v1.SecretService/CreateSecret";
        let panics = tower::service_fn(|_: http::Request<String>| async move {
            if true {
                panic!("canary-panic-text");
            }
            Ok::<_, Infallible>(http::Response::new(String::new()))
        });
        let service = ObserveLayer::new("test-service", Metrics::new()).layer(panics);
        let request = http::Request::builder().uri(path).body(String::new()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(grpc_status(response.headers()), Some(Code::Internal));
        let message = response.headers()["grpc-message"].to_str().unwrap().to_string();
        assert!(message.contains("SecretService/CreateSecret") && message.contains("panic"), "{message}");
        assert!(!message.contains("canary-panic-text"), "the panic's text stays out of the answer: {message}");

        let long = tower::service_fn(|_: http::Request<String>| async move {
            let status = tonic::Status::invalid_argument(format!("{} is not a name", "é".repeat(10_000)));
            Ok::<_, Infallible>(status.into_http::<String>())
        });
        let service = ObserveLayer::new("test-service", Metrics::new()).layer(long);
        let request = http::Request::builder().uri(path).body(String::new()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        let value = response.headers()["grpc-message"].as_bytes();
        assert!(value.len() <= MAX_GRPC_MESSAGE_BYTES + 9, "{}", value.len());
        let mut bytes = Vec::new();
        let mut i = 0;
        while i < value.len() {
            if value[i] == b'%' {
                bytes.push(u8::from_str_radix(std::str::from_utf8(&value[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            } else {
                bytes.push(value[i]);
                i += 1;
            }
        }
        let decoded = String::from_utf8(bytes).expect("cut between characters");
        assert!(decoded.starts_with("ééé") && decoded.ends_with('…'), "{decoded}");
    }

    #[tokio::test]
    async fn a_request_past_the_size_limit_names_the_service_that_refused_it() {
        use tower::ServiceExt;
        let path = "/iomete.secrets.v1.SecretService/CreateSecret";
        let answer = |message: &'static str| {
            let refuses = tower::service_fn(move |_: http::Request<String>| async move {
                Ok::<_, Infallible>(tonic::Status::out_of_range(message).into_http::<String>())
            });
            let service = ObserveLayer::new("gateway", Metrics::new()).layer(refuses);
            async move {
                let request = http::Request::builder().uri(path).body(String::new()).unwrap();
                let response = service.oneshot(request).await.unwrap();
                assert_eq!(grpc_status(response.headers()), Some(Code::OutOfRange));
                let status = tonic::Status::from_header_map(response.headers()).expect("a status");
                status.message().to_string()
            }
        };
        let own = "Error, decoded message length too large: found 9437201 bytes, the limit is: 8388608 bytes";
        assert_eq!(answer(own).await, format!("gateway: {own}"));
        // A limit met further along was named by the service that met it.
        for upstream in [
            "secret-service: the response is larger than 4 MiB",
            "secret-service: Error, decoded message length too large: found 9437201 bytes, the limit is: 8454144 bytes",
        ] {
            assert_eq!(answer(upstream).await, upstream);
        }
    }

    #[test]
    fn metrics_render_requests_and_backend_calls() {
        let m = Metrics::new();
        m.observe_request(
            "iomete.secrets.v1.SecretService",
            "CreateSecret",
            Code::InvalidArgument,
            Duration::from_millis(3),
        );
        m.observe_backend("kubernetes", "modify", false, Duration::from_millis(20));
        let text = m.render();
        assert!(text.contains(
            r#"secrets_grpc_server_requests_total{rpc_service="iomete.secrets.v1.SecretService",rpc_method="CreateSecret",grpc_code="INVALID_ARGUMENT"} 1"#
        ), "{text}");
        assert!(text.contains(r#"secrets_backend_errors_total{backend="kubernetes",operation="modify"} 1"#), "{text}");
        assert!(text.contains("secrets_backend_call_duration_seconds_bucket"), "{text}");
    }

    #[test]
    fn only_the_workspaces_own_rpcs_get_their_own_labels() {
        assert_eq!(
            rpc_of("/iomete.secrets.v1.Gateway/ResolveSecrets"),
            ("iomete.secrets.v1.Gateway", "ResolveSecrets")
        );
        assert_eq!(
            rpc_of("/iomete.secrets.internal.v1.SecretReader/ReadSecrets"),
            ("iomete.secrets.internal.v1.SecretReader", "ReadSecrets")
        );
        for path in ["/iomete.secrets.v1.Gateway/Nope", "/x.Y/Z", "/", "", "/iomete.secrets.v1.Gateway"] {
            assert_eq!(rpc_of(path), (UNKNOWN, UNKNOWN), "{path}");
        }
    }
}
