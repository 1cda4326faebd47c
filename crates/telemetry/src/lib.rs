//! Traces across services. Every process installs one subscriber ([`init`]): structured logs on stderr
//! and, when the standard `OTEL_*` variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT`, or
//! `OTEL_TRACES_EXPORTER=otlp`), spans exported over OTLP/gRPC. The W3C trace context travels in gRPC
//! metadata ([`inject`] on the way out, [`server_span`] on the way in) and in events (the outbox row's
//! `traceparent`, from [`current_traceparent`], and [`consumer_span`] when an event is processed), so a
//! bank's activation is one trace from its call through the registry to the consumers.
//!
//! Spans carry the RPC and messaging semantic-convention attributes and never personal data: paths,
//! topics and event ids only.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Whether the standard variables ask for OTLP export.
fn otlp_requested() -> bool {
    let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
    if exporter == "none" {
        return false;
    }
    exporter == "otlp"
        || std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

/// Installs the process's subscriber: `RUST_LOG` (default `default_filter`) for logs on stderr, and the
/// OTLP exporter when asked for, with `OTEL_SERVICE_NAME` or `service` as the service name.
pub fn init(service: &str, default_filter: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter());
    let provider = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => Some(provider_with(service, |b| b.with_batch_exporter(exporter))),
            Err(e) => {
                eprintln!("warning: OTLP export is off: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| otel_layer(p, service));
    let _ = tracing_subscriber::registry().with(fmt).with(otel).try_init();
    Telemetry { provider }
}

/// A tracer provider for `service` (the name from `OTEL_SERVICE_NAME` wins), configured by `add` (an
/// exporter). Tests pass an in-memory exporter.
pub fn provider_with(
    service: &str,
    add: impl FnOnce(opentelemetry_sdk::trace::TracerProviderBuilder) -> opentelemetry_sdk::trace::TracerProviderBuilder,
) -> SdkTracerProvider {
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    add(SdkTracerProvider::builder().with_resource(resource)).build()
}

/// The layer that turns `tracing` spans into OpenTelemetry spans of `provider`.
pub fn otel_layer<S>(provider: &SdkTracerProvider, service: &str) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_string()))
}

/// Installs the W3C propagator only (for processes whose subscriber is set up elsewhere, e.g. tests).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(k, v);
        }
    }
}

struct Headers<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Puts the current span's trace context into an outgoing call's metadata (`traceparent`).
pub fn inject<T>(request: &mut tonic::Request<T>) {
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Metadata(request.metadata_mut())));
}

/// The current span's W3C `traceparent`, for an event written now (None outside a sampled trace).
pub fn current_traceparent() -> Option<String> {
    let cx = Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

fn parent_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The server span of one gRPC call (`rpc.system` grpc, `rpc.service`, `rpc.method`), a child of the
/// caller's trace when its metadata carries one. For `tonic`'s `trace_fn`.
pub fn server_span(request: &tonic::codegen::http::Request<()>) -> Span {
    let path = request.uri().path();
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
    let _ = span.set_parent(parent);
    span
}

/// A `process <topic>` span (messaging semantic conventions), its message id or batch size left for the
/// caller to record.
fn process_span(system: &'static str, topic: &str) -> Span {
    tracing::info_span!(
        "process",
        otel.name = %format!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.destination.name = %topic,
        messaging.message.id = tracing::field::Empty,
        messaging.batch.message_count = tracing::field::Empty,
    )
}

/// The span of processing one event (`process <topic>`, messaging semantic conventions), a child of the
/// trace that wrote the event when it carries a `traceparent`.
pub fn consumer_span(system: &'static str, topic: &str, event_id: &str, traceparent: Option<&str>) -> Span {
    let span = process_span(system, topic);
    span.record("messaging.message.id", event_id);
    if let Some(tp) = traceparent {
        let _ = span.set_parent(parent_from_traceparent(tp));
    }
    span
}

/// The span of processing several events of one topic together (one transaction): `process <topic>`
/// with `messaging.batch.message_count`, linked to each trace that wrote one of them (the semantic
/// conventions' batch form: a span has one parent, but may link many).
pub fn consumer_batch_span<'a>(
    system: &'static str,
    topic: &str,
    traceparents: impl IntoIterator<Item = Option<&'a str>>,
    count: usize,
) -> Span {
    use opentelemetry::trace::TraceContextExt as _;
    let span = process_span(system, topic);
    span.record("messaging.batch.message_count", count);
    for tp in traceparents.into_iter().flatten() {
        let cx = parent_from_traceparent(tp);
        let linked = cx.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
    span
}

/// The trace id of the current span, as 32 hex digits (for logs and tests).
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = Span::current().context();
    let id = cx.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}
