//! What every role stands on: the bound ports, the stores and the queues.
//!
//! The ports are bound first, so a caller learns the real ones (port 0 in
//! tests) before anything runs. PostgreSQL and Redis connect lazily: a
//! process starts, and reports NOT_SERVING, while either is down.

use std::net::SocketAddr;

use anyhow::Context;
use betting_config::Settings;
use betting_db::PoolSettings;
use betting_jobs::QueueSpec;
use betting_queue::{Queue, QueueSettings};
use sqlx::PgPool;
use tokio::net::TcpListener;

/// The gRPC and metrics ports, bound.
pub(crate) struct Listeners {
    pub grpc: TcpListener,
    pub grpc_addr: SocketAddr,
    /// TLS for the gRPC port, when configured (`crate::tls`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub metrics: TcpListener,
    pub metrics_addr: SocketAddr,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let tls = crate::tls::acceptor(&settings.tls)?;
        let grpc = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen_addr))?;
        let grpc_addr = grpc.local_addr()?;
        let metrics = TcpListener::bind(settings.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.metrics_addr))?;
        let metrics_addr = metrics.local_addr()?;
        Ok(Self {
            grpc,
            grpc_addr,
            tls,
            metrics,
            metrics_addr,
        })
    }
}

/// The PostgreSQL pool and the Redis client every part shares.
pub(crate) struct Stores {
    pub pool: PgPool,
    pub redis: fred::prelude::Client,
    /// What every other Redis client of the process (the hub's subscriber,
    /// the workers' blocking connections) is built from: TLS included.
    pub redis_config: fred::prelude::Config,
}

impl Stores {
    /// Checks both URLs; connects in the background.
    pub fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let pool = betting_db::connect_lazy(
            settings.storage.database_url.expose(),
            &PoolSettings {
                max_connections: settings.storage.db_max_connections,
                ..PoolSettings::default()
            },
        )
        .context("invalid DATABASE_URL")?;
        let redis_ca = settings.tls.redis_ca()?;
        let redis = betting_queue::connect_with(settings.redis_url.expose(), redis_ca.as_deref())
            .context("invalid REDIS_URL")?;
        let redis_config = betting_queue::config(settings.redis_url.expose(), redis_ca.as_deref())
            .context("invalid REDIS_URL")?;
        Ok(Self {
            pool,
            redis,
            redis_config,
        })
    }

    /// Quits Redis, then closes the pool: last, once everything that used
    /// them has stopped.
    pub async fn close(&self) {
        // A fred client keeps its connection (and reconnects) until told to
        // quit.
        let _ = fred::prelude::ClientLike::quit(&self.redis).await;
        self.pool.close().await;
    }
}

/// The three queues of the suite.
#[derive(Clone)]
pub struct Queues {
    pub matches: Queue,
    pub settle: Queue,
    pub refund: Queue,
}

impl Queues {
    /// The queues on the shared Redis client, under the deployment's namespace.
    pub(crate) fn new(redis: &fred::prelude::Client, settings: &Settings) -> Self {
        let queue = |spec: QueueSpec| {
            Queue::new(
                redis.clone(),
                &settings.redis_namespace,
                spec.name,
                QueueSettings {
                    max_attempts: spec.max_attempts,
                    visibility_timeout: settings.queue_visibility(),
                    ..QueueSettings::default()
                },
            )
        };
        Self {
            matches: queue(betting_jobs::MATCH),
            settle: queue(betting_jobs::SETTLE),
            refund: queue(betting_jobs::REFUND),
        }
    }
}
