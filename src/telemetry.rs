//! Logs and traces: JSON (or text) log lines filtered by `RUST_LOG`, and OpenTelemetry
//! spans exported over OTLP when, and only when, the standard `OTEL_*` variables ask.
//!
//! The log filter sits on the log layer alone, so `RUST_LOG=warn` quiets logs without
//! disabling the spans that traces are made of. JSON lines carry `trace_id` and
//! `span_id` from the OpenTelemetry context of the span they were emitted in.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use serde_json::{Map, Value};
use tracing::{field::Field, Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::{filter_fn, FilterExt, Targets},
    fmt::{format::Writer, time::FormatTime, FmtContext, FormatEvent, FormatFields},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
    EnvFilter, Layer,
};

use crate::config::LogFormat;

/// Whether spans are being exported; when not, incoming trace context is not parsed.
static TRACING: AtomicBool = AtomicBool::new(false);

/// A tracing setup that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct TelemetryError {
    var: &'static str,
    value: String,
    expected: &'static str,
}

/// Owns the tracer provider; [`Telemetry::shutdown`] flushes the last spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the `OTEL_*` variables ask for traces: an endpoint, and the SDK not disabled.
fn tracing_requested() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled
        && (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

/// The samplers `OTEL_TRACES_SAMPLER` may name (the SDK would fall back silently on a typo).
const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Refuses sampler settings the SDK would quietly ignore.
fn check_sampler() -> Result<(), TelemetryError> {
    let Some(sampler) = env("OTEL_TRACES_SAMPLER") else {
        return Ok(());
    };
    let sampler = sampler.trim().to_owned();
    if !SAMPLERS.contains(&sampler.as_str()) {
        return Err(TelemetryError {
            var: "OTEL_TRACES_SAMPLER",
            value: sampler,
            expected: "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
        });
    }
    if let Some(arg) = env("OTEL_TRACES_SAMPLER_ARG").filter(|_| sampler.ends_with("traceidratio"))
    {
        if !arg
            .trim()
            .parse::<f64>()
            .is_ok_and(|r| (0.0..=1.0).contains(&r))
        {
            return Err(TelemetryError {
                var: "OTEL_TRACES_SAMPLER_ARG",
                value: arg,
                expected: "a sampling ratio from 0 to 1",
            });
        }
    }
    Ok(())
}

fn tracer_provider() -> Result<SdkTracerProvider, TelemetryError> {
    let (var, protocol) = match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", p),
        None => (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into()),
        ),
    };
    let invalid = |expected| TelemetryError {
        var,
        value: protocol.clone(),
        expected,
    };
    // Endpoint, headers and timeout come from the environment inside the builders.
    let exporter = match protocol.trim() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
        _ => return Err(invalid("grpc or http/protobuf")),
    }
    .map_err(|_| {
        invalid("a protocol whose exporter can be built from the OTEL_EXPORTER_OTLP_* settings")
    })?;
    let mut resource = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name(env!("CARGO_PKG_NAME"));
    }
    // The sampler comes from OTEL_TRACES_SAMPLER(_ARG) through the SDK's default config.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global subscriber (and the tracer, if asked for). Call once, in `main`.
pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let directives = env("RUST_LOG").unwrap_or_else(|| "info".into());
    // A typo must not silently mean `info`, or quiet a service that should speak.
    let mut log_filter = EnvFilter::builder()
        .parse(&directives)
        .map_err(|_| TelemetryError {
            var: "RUST_LOG",
            value: directives.clone(),
            expected: "tracing directives, e.g. info or warn,fibonacci_api=debug",
        })?;
    // The redis crate logs every step of a topology change, hundreds of lines a second
    // during a failover; this service logs Redis's state itself, once per change. Its
    // lines come back when RUST_LOG names it (`info,redis=warn`).
    if !names_target(&directives, "redis") {
        log_filter = log_filter.add_directive("redis=off".parse().expect("a valid directive"));
    }
    // Spans are for traces; log lines are events. Without this the log layer would
    // format every span's fields on every request for nothing.
    let log_filter = log_filter.and(filter_fn(|meta| meta.is_event()));
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_filter(log_filter)
            .boxed(),
        // Colour only for a person at a terminal: escape codes in a file or a log
        // shipper's pipe are noise.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_filter(log_filter)
            .boxed(),
    };
    check_sampler()?;
    let provider = tracing_requested().then(tracer_provider).transpose()?;
    let traces = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        TRACING.store(true, Ordering::Relaxed);
        // Our own spans only: the exporter's crates (tonic, hyper, reqwest…) would
        // otherwise trace their own exporting.
        let ours = Targets::new().with_target(env!("CARGO_CRATE_NAME"), tracing::Level::DEBUG);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_filter(ours)
    });
    // Only layers that exist: a `None` layer reports interest in every callsite, which
    // would make every span live (and cost a registry slot per request) with nobody
    // listening.
    let mut layers = vec![logs];
    layers.extend(traces.map(Layer::boxed));
    tracing_subscriber::registry().with(layers).init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes and stops the exporter; call after the HTTP drain so the last requests'
    /// spans are among those flushed.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The SDK's shutdown blocks while it exports: keep it off the async workers.
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        }
    }
}

/// Makes `span` continue the W3C `traceparent` of an incoming request.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !TRACING.load(Ordering::Relaxed) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Whether tracing `directives` name `target` (or a module of it).
fn names_target(directives: &str, target: &str) -> bool {
    directives.split(',').any(|directive| {
        let named = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        named == target || named.starts_with(&format!("{target}::"))
    })
}

/// One JSON object per line: timestamp, level, target, message, fields, trace ids.
///
/// Written here rather than `tracing_subscriber::fmt().json()`: that formatter has no
/// hook for the OpenTelemetry trace and span ids (they live in the span's extensions,
/// put there by `tracing-opentelemetry`), and those ids are what links a log line in
/// Loki to its trace.
struct JsonLines;

struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        if !field.name().starts_with("log.") {
            self.0.insert(field.name().into(), value);
        }
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        // A `log` crate's record (the redis client's) arrives with the target `log` and
        // its origin in `log.*` fields: shown under its own target, without them.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut Fields(&mut line));
        let context = tracing::Span::current().context();
        let span = context.span();
        let ids = span.span_context();
        if ids.is_valid() {
            line.insert("trace_id".into(), ids.trace_id().to_string().into());
            line.insert("span_id".into(), ids.span_id().to_string().into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
