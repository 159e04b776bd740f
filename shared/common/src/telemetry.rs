//! Logs and traces: one function builds the subscriber, W3C trace context
//! crosses every gRPC hop (client interceptor in, server span out).

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use serde::Deserialize;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Logging and tracing settings, the same for every service.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A filter such as `info` or `secret_service=debug,info`; `RUST_LOG`
    /// wins when it is set.
    pub log_level: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint such as `http://127.0.0.1:4317`; unset means no
    /// exporter at all. With JSON logs and no endpoint, trace ids are still
    /// made (and logged) but nothing is exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_level: "info".into(), log_format: LogFormat::Human, otlp_endpoint: None }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Flushes and shuts the exporter down when dropped.
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// Writes the queued log lines out when dropped.
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter shutdown failed: {e}");
        }
    }
}

/// Installs the global subscriber for a process: a filter, a human or JSON
/// log sink on stderr, and an OpenTelemetry layer when an OTLP endpoint is
/// configured. Call it once, inside the Tokio runtime.
pub fn init(service_name: &'static str, config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&config.log_level),
    }
    .map_err(|e| anyhow::anyhow!("log_level: {e}"))?;

    // Lines are written by a thread of their own: a call only queues its
    // line (and waits when the queue is full, never dropping one).
    let (writer, log_writer) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    // Formatting a span's fields for the log costs every call that opens
    // it, whether or not a line is written inside it. Below debug, lines
    // carry only the grpc.server span (the RPC and its trace ids); the
    // calls it makes to other services (grpc.client) and a handler's own
    // fields (caller, principal, counts) are on its trace. At debug and
    // below, lines carry every span.
    let every_span = filter.max_level_hint().is_some_and(|l| l >= tracing_subscriber::filter::LevelFilter::DEBUG);
    let spans_in_lines = tracing_subscriber::filter::filter_fn(move |meta| {
        every_span || !meta.is_span() || meta.name() == "grpc.server"
    });
    let fmt = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
        // The span list carries the ids recorded on the grpc.server and
        // grpc.client spans: every line can be tied to its trace.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    };

    let (otel, provider) = match &config.otlp_endpoint {
        None if config.log_format == LogFormat::Json => {
            let provider = SdkTracerProvider::builder().build();
            let tracer = provider.tracer(service_name);
            (Some(tracing_opentelemetry::layer().with_tracer(tracer)), None)
        }
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| anyhow::anyhow!("otlp_endpoint {endpoint:?}: {e}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(service_name)
                        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                        .build(),
                )
                .build();
            let tracer = provider.tracer(service_name);
            global::set_tracer_provider(provider.clone());
            (Some(tracing_opentelemetry::layer().with_tracer(tracer)), Some(provider))
        }
    };

    // The Vault client's own spans (vaultrs, rustify: several per request)
    // stay out of traces; the vault-config-service records one span per
    // Vault request instead (`vault.request`).
    let otel =
        otel.map(|layer| layer.with_filter(tracing_subscriber::filter::filter_fn(|meta| !is_vault_client(meta))));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(spans_in_lines))
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("a tracing subscriber is already installed: {e}"))?;
    Ok(TelemetryGuard { provider, _log_writer: log_writer })
}

/// Whether a span or event comes from inside the Vault client crates.
fn is_vault_client(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    ["vaultrs", "rustify"].iter().any(|c| target == *c || target.strip_prefix(c).is_some_and(|r| r.starts_with("::")))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `span`'s W3C trace context (`traceparent`) into outgoing headers.
pub fn inject_into_headers(span: &Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// Records the span's OpenTelemetry trace and span ids as `trace_id` and
/// `span_id`, so log lines inside it can be found from a trace and back.
pub fn record_ids(span: &Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// The server span of one gRPC request, continuing the caller's trace when
/// it sent a `traceparent`.
pub fn server_span(path: &str, headers: &http::HeaderMap) -> Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        // Why the caller's credentials were refused (never the credentials).
        auth.refused = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    // Fails only when no OpenTelemetry layer is installed: nothing to join then.
    let _ = span.set_parent(parent);
    record_ids(&span);
    span
}
