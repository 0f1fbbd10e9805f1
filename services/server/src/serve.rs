//! Run and drain: serve until the signal, then stop in a fixed order.
//!
//! Before serving, health is probed once, then the background tasks start:
//! the health watch, the metrics listener and the roles' tasks. When the
//! signal comes, in this order: health turns NOT_SERVING, the shutdown
//! reaches every loop and stream, and the server stops accepting while
//! in-flight requests get the grace period. Then the background tasks get
//! the grace period, one poll and a second more (a worker lets its fetch
//! finish, drains its jobs and hands back the rest) before what remains is
//! aborted. Last, the Redis client quits and the pool closes.

use std::{future::Future, time::Duration};

use anyhow::Context;
use tokio::task::JoinSet;

use crate::{Application, HealthWatch, conn, router};

/// How often the health watch probes the stores.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Serves `app` until `signal` completes, then drains.
pub(crate) async fn run(
    app: Application,
    signal: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let Application {
        settings,
        listeners,
        stores,
        auth,
        services,
        background,
        trigger,
        shutdown,
        ..
    } = app;
    let roles = settings.roles();
    tracing::info!(addr = %listeners.grpc_addr, metrics = %listeners.metrics_addr, ?roles, "serving");

    let placing = services.betting.clone();
    let router::Mounted {
        router,
        reporter,
        served,
    } = router::mount(services, &auth, &settings.edge)?;
    let health = HealthWatch::new(reporter, served, stores.pool.clone(), stores.redis.clone());
    health.check_once().await;
    let mut tasks = JoinSet::new();
    tasks.spawn(health.clone().run(HEALTH_EVERY, shutdown.clone()));
    tasks.spawn(betting_telemetry::serve_metrics(
        listeners.metrics,
        shutdown.clone(),
    ));
    background.spawn(&mut tasks, &shutdown);

    let grace = settings.shutdown_grace();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = {
        let health = health.clone();
        async move {
            signal.await;
            tracing::info!("shutting down");
            health.shutting_down().await;
            trigger.signal();
            let _ = drain_tx.send(());
        }
    };
    let incoming = conn::incoming(listeners.grpc, settings.edge.max_connections);
    let server = router
        .serve_with_incoming_shutdown(crate::tls::incoming(incoming, listeners.tls), stopping);
    tokio::pin!(server);
    // Serve until the signal; then give in-flight requests the grace period.
    tokio::select! {
        result = &mut server => result.context("gRPC server failed")?,
        _ = async {
            let _ = drain_rx.await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("grace period over; dropping remaining requests"),
    }
    // Workers finish a fetch under way (one poll), drain their in-flight
    // jobs within the grace period and hand back the rest; give them that
    // long before stopping what remains.
    let workers_stop = grace + betting_queue::DEFAULT_POLL + Duration::from_secs(1);
    let _ = tokio::time::timeout(workers_stop, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    // The last placing batch sends its match jobs after its answers, in
    // its slot: let it (bounded by the Redis calls' timeout and the grace;
    // the reconciler re-derives any job a crash loses).
    if let Some(betting) = placing {
        let _ = tokio::time::timeout(grace, betting.drained()).await;
    }
    // Everything that used the stores has stopped.
    stores.close().await;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
