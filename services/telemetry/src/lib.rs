//! Logs and metrics, set up in one place.
//!
//! Tracing: `RUST_LOG`-style filtering (default `info`), human-readable or
//! JSON lines (`BETTING_LOG_FORMAT=json`). Metrics: one process-wide Prometheus
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
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global tracing subscriber. Safe to call more than once (tests):
/// later calls do nothing.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BETTING_LOG_FORMAT").is_ok_and(|f| f == "json");
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        // Colours only for a person at a terminal, not in log files.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init()
    };
    // Already installed (a second app in one test binary): keep the first.
    drop(result);
}

/// The process-wide metrics recorder.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours
            // simply renders nothing.
            drop(metrics::set_global_recorder(recorder));
            handle
        })
        .clone()
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
