//! Logs and traces: one function builds the subscriber, W3C trace context
//! crosses every gRPC hop (client interceptor in, server span out).

use std::io::IsTerminal;

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, Tracer},
};
use serde::Deserialize;
use tracing::{Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, filter_fn},
    fmt::MakeWriter,
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

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

    let (tracer, provider) = match &config.otlp_endpoint {
        None if config.log_format == LogFormat::Json => {
            let provider = SdkTracerProvider::builder().build();
            (Some(provider.tracer(service_name)), None)
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
            (Some(tracer), Some(provider))
        }
    };
    build(filter, config.log_format, std::io::stderr().is_terminal(), writer, tracer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("a tracing subscriber is already installed: {e}"))?;
    Ok(TelemetryGuard { provider, _log_writer: log_writer })
}

/// The subscriber: `filter`, log lines in `format` to `writer` (coloured
/// when `ansi`: a terminal), and spans to `tracer` when there is one.
fn build<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
    tracer: Option<Tracer>,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Formatting a span's fields for the log costs every call that opens
    // it, whether or not a line is written inside it. Below debug, lines
    // carry only the grpc.server span (the RPC and its trace ids); the
    // calls it makes to other services (grpc.client) and a handler's own
    // fields (caller, principal, counts) are on its trace. At debug and
    // below, lines carry every span.
    let every_span = filter.max_level_hint().is_some_and(|l| l >= LevelFilter::DEBUG);
    let spans_in_lines = filter_fn(move |meta| every_span || !meta.is_span() || meta.name() == "grpc.server");
    // Without traces nothing but log lines uses a span: the others are then
    // never made at all (a filter for the whole subscriber), so they cost a
    // call nothing.
    let unused_spans = tracer.is_none().then(|| spans_in_lines.clone());
    TRACED.store(tracer.is_some(), std::sync::atomic::Ordering::Relaxed);
    let fmt = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer).boxed(),
        // The span list carries the ids recorded on the grpc.server and
        // grpc.client spans: every line can be tied to its trace.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    };
    // The Vault client's own spans (vaultrs, rustify: several per request)
    // stay out of traces; the vault-config-service records one span per
    // Vault request instead (`vault.request`).
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter_fn(|meta| !is_vault_client(meta)))
    });
    tracing_subscriber::registry().with(filter).with(unused_spans).with(fmt.with_filter(spans_in_lines)).with(otel)
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

/// Whether the installed subscriber sends spans to a trace (set by
/// [`build`]). Without one, the server span carries only what log lines
/// show.
static TRACED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The server span of one gRPC request, continuing the caller's trace when
/// it sent a `traceparent`.
pub fn server_span(path: &str, headers: &http::HeaderMap) -> Span {
    let name = path.trim_start_matches('/');
    if !TRACED.load(std::sync::atomic::Ordering::Relaxed) {
        // Its fields are formatted for the log as it opens, on every call:
        // the RPC's name, and why the caller was refused if it was.
        return tracing::info_span!("grpc.server", rpc = %name, auth.refused = tracing::field::Empty);
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Under `level` and `format` (traced or not): whether a handler's span
    /// is made, and the line an event inside it writes.
    fn handler_span_and_line(level: &str, format: LogFormat, traced: bool) -> (bool, String) {
        let lines = Lines::default();
        let tracer = traced.then(|| SdkTracerProvider::builder().build().tracer("test"));
        let writer = lines.clone();
        let subscriber = build(EnvFilter::new(level), format, false, move || writer.clone(), tracer);
        let made = tracing::subscriber::with_default(subscriber, || {
            let server = server_span("/secrets.v1.Gateway/ResolveSecrets", &http::HeaderMap::new());
            assert!(!server.is_disabled(), "the grpc.server span is always made");
            let _server = server.enter();
            server.record("auth.refused", "no token");
            let handler = tracing::info_span!("handler", caller = "service:spark");
            let _handler = handler.enter();
            tracing::info!("secret created");
            !handler.is_disabled()
        });
        (made, lines.text())
    }

    /// Below debug a line carries only the grpc.server span, and without
    /// traces no other span is made at all; at debug lines carry every
    /// span, and with traces every span is made for the trace.
    #[test]
    fn below_debug_lines_carry_only_the_server_span_and_untraced_spans_are_not_made() {
        let (made, line) = handler_span_and_line("info", LogFormat::Human, false);
        assert!(!made, "no trace, below debug: the handler span is not made");
        assert!(line.contains("grpc.server") && line.contains("secret created"), "{line}");
        assert!(line.contains("rpc=secrets.v1.Gateway/ResolveSecrets") && line.contains("auth.refused"), "{line}");
        assert!(!line.contains("handler") && !line.contains("service:spark"), "{line}");

        let (made, line) = handler_span_and_line("info", LogFormat::Json, true);
        assert!(made, "traced: the handler span is made for the trace");
        assert!(line.contains("grpc.server") && line.contains("secret created"), "{line}");
        assert!(!line.contains("\"handler\"") && !line.contains("service:spark"), "{line}");
        assert!(line.contains("\"rpc.method\":\"ResolveSecrets\"") && line.contains("auth.refused"), "{line}");

        let (made, line) = handler_span_and_line("debug", LogFormat::Human, false);
        assert!(made, "at debug every span is made");
        assert!(line.contains("grpc.server") && line.contains("handler") && line.contains("service:spark"), "{line}");
    }
}
