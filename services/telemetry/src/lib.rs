//! Logs and metrics, set up in one place.
//!
//! Tracing: `RUST_LOG`-style filtering (default `info`), human-readable or
//! JSON lines (`BETTING_LOG_FORMAT=json`). Metrics: one process-wide Prometheus
//! recorder, rendered at `/metrics` by a tiny HTTP responder on the metrics
//! address.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use betting_shutdown::Shutdown;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
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

/// Serves `GET /metrics` (any path, really) on `listener` until `shutdown`.
pub async fn serve_metrics(listener: TcpListener, shutdown: Shutdown) {
    let handle = metrics_handle();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let body = handle.render();
        tokio::spawn(async move {
            // Read (and ignore) the request head; a scraper sends a small GET.
            let mut buf = [0_u8; 1024];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                body.len(),
                body
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
