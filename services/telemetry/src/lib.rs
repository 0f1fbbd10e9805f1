//! Logs, traces and metrics, set up in one place.
//!
//! Logs: `RUST_LOG`-style filtering (default `info`), human-readable or
//! JSON lines (`BETTING_LOG_FORMAT=json`); a line within an RPC or a job
//! carries its span's `trace_id`. Traces: OpenTelemetry over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace context across
//! processes ([`trace`]). Metrics: one process-wide Prometheus
//! recorder, rendered at `GET /metrics` by hyper on the metrics address.

#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::Duration,
};

use betting_shutdown::Shutdown;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::Level;
use tracing_subscriber::{EnvFilter, filter::Targets, fmt, prelude::*};

pub mod trace;

/// Installs the global tracing subscriber: logs as `RUST_LOG` says, and
/// traces exported over OTLP when the environment asks for it
/// ([`trace`]). Safe to call more than once (tests): later calls install
/// nothing and return an inert guard.
///
/// Keep the guard for the life of the process and [`Telemetry::shutdown`]
/// it at the end, so the last spans are exported.
pub fn init_tracing() -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BETTING_LOG_FORMAT").is_ok_and(|f| f == "json");
    let provider = trace::provider_from_env();
    // Export our own spans only, at INFO and above, whatever RUST_LOG says of
    // the logs (a quiet log must not switch tracing off).
    let exported = Targets::new().with_target("betting", Level::INFO);
    let otel = provider
        .as_ref()
        .map(|provider| trace::layer(provider).with_filter(exported));
    let registry = tracing_subscriber::registry().with(otel);
    let result = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        // Colours only for a person at a terminal, not in log files.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(
                fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    };
    // Already installed (a second app in one test binary): keep the first,
    // and this provider exports nothing.
    Telemetry {
        provider: if result.is_ok() { provider } else { None },
    }
}

/// What [`init_tracing`] set up that must be flushed at the end.
#[must_use = "dropping the guard stops trace export; keep it and shut it down at exit"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter (bounded by
    /// the exporter's own timeout).
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            // The SDK's shutdown blocks until its export thread is done.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The process-wide metrics recorder.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours
            // simply renders nothing.
            drop(metrics::set_global_recorder(recorder));
            handle
        })
        .clone()
}

/// Latency buckets (seconds) of every `*_seconds` histogram: from a
/// millisecond (an in-memory answer) to a minute (a job's backoff, a long
/// stream), so `histogram_quantile` works in Prometheus. Other histograms
/// (batch sizes) stay summaries.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn builder() -> PrometheusBuilder {
    // Fails only for an empty list, which this is not.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Serves `GET /metrics` on `listener` until `shutdown`, with hyper's
/// HTTP/1.1 server: a scraper gets a real HTTP answer (404 elsewhere, 405 to
/// other methods), and nobody holds the port hostage — a connection must
/// send its request head within [`HEAD_TIMEOUT`], lives at most
/// [`CONNECTION_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are open at once
/// (one more is closed at once).
pub async fn serve_metrics(listener: TcpListener, shutdown: Shutdown) {
    let handle = metrics_handle();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let answer = answer(&handle, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Scrapers are few; this is plenty and bounds what a flood can hold.
const MAX_CONNECTIONS: usize = 64;

fn answer(handle: &PrometheusHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "see /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
