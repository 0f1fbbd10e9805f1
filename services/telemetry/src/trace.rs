//! Traces: OpenTelemetry export over OTLP, and W3C trace context carried
//! between processes.
//!
//! Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then the SDK reads the rest
//! of the standard variables itself: `OTEL_SERVICE_NAME` (default `betting`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (default: parent-based, always on), and the
//! batch processor's `OTEL_BSP_*`. Only our own spans are exported (targets
//! `betting*` at INFO and above), whatever `RUST_LOG` says about logs.
//!
//! A trace crosses processes in two ways, both as W3C `traceparent` /
//! `tracestate` text fields ([`Carrier`]): in gRPC metadata (the server's RPC
//! span adopts the caller's context; our wallet client sends the current
//! span's) and in a queue job (the producer's context rides in the job, the
//! worker's span adopts it), so PlaceBet and the match job it enqueued, or
//! SettleRound, its settle jobs and their payouts, are one trace.

use std::collections::HashMap;

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A trace context as text fields: `traceparent`, and `tracestate` when set.
pub type Carrier = HashMap<String, String>;

/// The service name when `OTEL_SERVICE_NAME` is unset.
const DEFAULT_SERVICE_NAME: &str = "betting";

/// The exporting tracer provider, when the environment asks for one. A bad
/// setting is reported on stderr and export stays off: the process serves
/// all the same.
pub(crate) fn provider_from_env() -> Option<SdkTracerProvider> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let wanted = set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !wanted || disabled {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTLP trace export is off: {error}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    )
}

/// The layer that turns our spans into OpenTelemetry spans.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("betting"))
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: std::sync::OnceLock<TraceContextPropagator> = std::sync::OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// `span`'s trace context, to send along; `None` when it has none (export
/// is off, or the span is disabled).
pub fn carrier_of(span: &tracing::Span) -> Option<Carrier> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::new();
    propagator().inject_context(&context, &mut carrier);
    Some(carrier)
}

/// The current span's trace context ([`carrier_of`]).
pub fn current() -> Option<Carrier> {
    carrier_of(&tracing::Span::current())
}

/// Makes `span` a child of the context `get` reads (a `traceparent` from
/// gRPC metadata or a job), when there is a valid one, and records the
/// span's trace id in its `trace_id` field, so every log line within it
/// carries the id. Call it before the span is first entered.
pub fn adopt<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    let carrier: Carrier = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), get(key)?.to_owned())))
        .collect();
    if !carrier.is_empty() {
        let parent = propagator().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records `span`'s trace id in its `trace_id` field (when it has one).
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
    }
}

/// Links `span` to the trace of `other` (a batch span to each request it
/// carries out, beyond the one it is the child of).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    let context = other.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.add_link(ids);
    }
}
