//! The application: everything a `betting serve` process runs, for a set of roles.
//!
//! [`Application::build`] constructs every part (pools, clients, listeners,
//! services) and binds the ports, so callers (the binary and the tests alike)
//! learn the real port before anything is served; [`Application::run_until`]
//! serves until a shutdown signal, then drains. Tests run exactly this path.

#![forbid(unsafe_code)]

mod feed;
mod health;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use betting_audit::{AdminService, AuditSettings};
use betting_auth::{AuthInterceptor, ServiceCredentials, TokenMinter, Verifier};
use betting_bets::{
    BetStore, BettingService,
    maintenance::MaintenanceSettings,
    matcher::{MatchHandler, Matcher},
};
use betting_config::{Role, Settings};
use betting_db::PoolSettings;
use betting_jobs::QueueSpec;
use betting_queue::{Queue, QueueSettings, Worker, WorkerSettings};
use betting_reconciler::{Reconciler, ReconcilerSettings};
use betting_refunds::{Outbox, RefundHandler, Refunder};
use betting_settlement::{RoundStore, SettlementService, settler::SettleHandler};
use betting_shutdown::{Shutdown, Trigger};
use betting_streams::{Hub, Publisher, StreamContext, StreamSettings};
use betting_wallet::WalletService;
use betting_wallet_client::WalletClient;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

pub use health::HealthWatch;

/// A built, bound, not yet running process.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    pool: PgPool,
    redis: fred::prelude::Client,
    auth: AuthInterceptor,
    wallet: Option<WalletService>,
    betting: Option<BettingService>,
    settlement: Option<SettlementService>,
    admin: Option<AdminService>,
    workers: Workers,
    reconciler: Option<Reconciler>,
    queues: Queues,
    hub: Option<Hub>,
    stop_tx: Trigger,
    stop_rx: Shutdown,
}

/// The three queues of the suite.
#[derive(Clone)]
pub struct Queues {
    pub matches: Queue,
    pub settle: Queue,
    pub refund: Queue,
}

/// Consumers to start, by role.
#[derive(Default)]
struct Workers {
    matcher: Option<(Worker, MatchHandler)>,
    settler: Option<(Worker, SettleHandler)>,
    refunder: Option<(Worker, RefundHandler)>,
}

impl Application {
    /// Validates the settings, connects (lazily) to PostgreSQL and Redis, binds
    /// the gRPC and metrics ports and builds the services of the chosen roles.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = TcpListener::bind(settings.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.metrics_addr))?;
        let metrics_addr = metrics_listener.local_addr()?;

        let pool = betting_db::connect_lazy(
            settings.storage.database_url.expose(),
            &PoolSettings {
                max_connections: settings.storage.db_max_connections,
                ..PoolSettings::default()
            },
        )
        .context("invalid DATABASE_URL")?;
        let redis =
            betting_queue::connect(settings.redis_url.expose()).context("invalid REDIS_URL")?;

        let secret = settings.jwt_secret.expose().as_bytes();
        let issuer = settings.jwt_issuer.as_deref();
        let audience = settings.jwt_audience.as_deref();
        let auth = AuthInterceptor::new(Arc::new(Verifier::new(secret, issuer, audience)));

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
        let queues = Queues {
            matches: queue(betting_jobs::MATCH),
            settle: queue(betting_jobs::SETTLE),
            refund: queue(betting_jobs::REFUND),
        };

        // Shutdown reaches every long-lived task, streams included, through this.
        let (stop_tx, stop_rx) = betting_shutdown::channel();
        let publisher = Publisher::new(redis.clone(), &settings.redis_namespace);
        let serves_streams = settings.runs(Role::Betting) || settings.runs(Role::Settlement);
        let hub = serves_streams.then(|| {
            Hub::new(
                Arc::new(feed::StoreFeed {
                    bets: BetStore::new(pool.clone()),
                    rounds: RoundStore::new(pool.clone()),
                }),
                settings.redis_url.expose(),
                &settings.redis_namespace,
            )
        });
        let streams = hub.as_ref().map(|hub| StreamContext {
            hub: hub.clone(),
            settings: StreamSettings {
                heartbeat: Duration::from_millis(settings.stream_heartbeat_ms.max(10)),
                send_timeout: Duration::from_millis(settings.stream_send_timeout_ms.max(10)),
                ..StreamSettings::default()
            },
            stop: stop_rx.clone(),
        });

        let wallet = settings
            .runs(Role::Wallet)
            .then(|| WalletService::new(pool.clone()));
        let settlement = match (&streams, settings.runs(Role::Settlement)) {
            (Some(streams), true) => Some(
                SettlementService::new(
                    pool.clone(),
                    queues.settle.clone(),
                    queues.refund.clone(),
                    publisher.clone(),
                )
                .with_streams(streams.clone()),
            ),
            _ => None,
        };
        let audit = AuditSettings {
            match_timeout: settings.match_timeout(),
            ..AuditSettings::default()
        };
        let admin = settings
            .runs(Role::Settlement)
            .then(|| AdminService::new(pool.clone(), audit));

        // In all-in-one mode the wallet is this very server, reached over
        // loopback exactly as a split deployment reaches it over the network.
        let wallet_client = if settings.runs(Role::Betting) || settings.runs(Role::Settler) {
            let endpoint = match &settings.wallet_endpoint {
                Some(endpoint) => endpoint.clone(),
                None => format!("http://{}", loopback(local_addr)),
            };
            let credentials = ServiceCredentials::new(TokenMinter::new(secret, issuer, audience));
            Some(
                WalletClient::new(&endpoint, credentials)
                    .with_context(|| format!("invalid wallet endpoint {endpoint}"))?,
            )
        } else {
            None
        };
        let bets = BetStore::new(pool.clone());
        let betting = match (&wallet_client, &streams, settings.runs(Role::Betting)) {
            (Some(client), Some(streams), true) => Some(
                BettingService::new(
                    bets.clone(),
                    client.clone(),
                    queues.matches.clone(),
                    publisher.clone(),
                )
                .with_streams(streams.clone()),
            ),
            _ => None,
        };

        let worker_settings = WorkerSettings {
            concurrency: settings.worker_concurrency,
            shutdown_grace: settings.shutdown_grace(),
            ..WorkerSettings::default()
        };
        // Each consumer blocks in BLMOVE, so each gets a Redis connection of its own.
        let consumer = |queue: &Queue| -> anyhow::Result<Worker> {
            let blocking = betting_queue::connect(settings.redis_url.expose())?;
            Ok(Worker::new(
                queue.clone(),
                blocking,
                worker_settings.clone(),
            )?)
        };
        let mut workers = Workers::default();
        if settings.runs(Role::Matcher) {
            workers.matcher = Some((
                consumer(&queues.matches)?,
                MatchHandler::new(Matcher::new(pool.clone()).with_publisher(publisher.clone())),
            ));
        }
        if let (Some(client), true) = (&wallet_client, settings.runs(Role::Settler)) {
            workers.settler = Some((
                consumer(&queues.settle)?,
                SettleHandler::new(RoundStore::new(pool.clone()), client.clone())
                    .with_publisher(publisher.clone()),
            ));
            workers.refunder = Some((
                consumer(&queues.refund)?,
                RefundHandler::new(Refunder::new(Outbox::new(pool.clone()), client.clone())),
            ));
        }
        let reconciler =
            (settings.runs(Role::Matcher) || settings.runs(Role::Settler)).then(|| {
                Reconciler::new(
                    pool.clone(),
                    [
                        queues.matches.clone(),
                        queues.settle.clone(),
                        queues.refund.clone(),
                    ],
                    ReconcilerSettings {
                        interval: settings.reconcile_interval(),
                        match_timeout: settings.match_timeout(),
                        ..ReconcilerSettings::default()
                    },
                )
                // Its refunds are bet changes like any other: announce them.
                .with_publisher(publisher.clone())
            });

        Ok(Self {
            settings,
            listener,
            local_addr,
            metrics_listener,
            metrics_addr,
            pool,
            redis,
            auth,
            wallet,
            betting,
            settlement,
            admin,
            workers,
            reconciler,
            queues,
            hub,
            stop_tx,
            stop_rx,
        })
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The betting service, when this process runs the betting role.
    pub fn betting(&self) -> Option<&BettingService> {
        self.betting.as_ref()
    }

    pub fn settlement(&self) -> Option<&SettlementService> {
        self.settlement.as_ref()
    }

    /// The reconciler, when this process runs a worker role.
    pub fn reconciler(&self) -> Option<&Reconciler> {
        self.reconciler.as_ref()
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    /// This instance's stream hub, when it serves streams.
    pub fn hub(&self) -> Option<&Hub> {
        self.hub.as_ref()
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `signal` completes, then shuts down gracefully: health
    /// turns NOT_SERVING, background work stops, and in-flight requests get
    /// the configured grace period to finish.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = (self.stop_tx, self.stop_rx);
        let roles = self.settings.roles();
        tracing::info!(addr = %self.local_addr, metrics = %self.metrics_addr, ?roles, "serving");

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut served = Vec::new();
        if self.wallet.is_some() {
            served.push("betting.v1.WalletService");
        }
        if self.betting.is_some() {
            served.push("betting.v1.BettingService");
        }
        if self.settlement.is_some() {
            served.push("betting.v1.SettlementService");
            served.push("betting.v1.AdminService");
        }
        let health = HealthWatch::new(reporter, served, self.pool.clone(), self.redis.clone());
        health.check_once().await;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(health.clone().run(Duration::from_secs(1), stop_rx.clone()));
        tasks.spawn(betting_telemetry::serve_metrics(
            self.metrics_listener,
            stop_rx.clone(),
        ));
        if let Some(betting) = &self.betting {
            let maintenance = MaintenanceSettings {
                interval: self.settings.maintenance_interval(),
                placing_grace: self.settings.placing_grace(),
                ..MaintenanceSettings::default()
            };
            tasks.spawn(
                betting
                    .clone()
                    .run_maintenance(maintenance, stop_rx.clone()),
            );
        }
        if let Some((worker, handler)) = self.workers.matcher {
            tasks.spawn(worker.run(Arc::new(handler), stop_rx.clone()));
        }
        if let Some((worker, handler)) = self.workers.settler {
            tasks.spawn(worker.run(Arc::new(handler), stop_rx.clone()));
        }
        if let Some((worker, handler)) = self.workers.refunder {
            tasks.spawn(worker.run(Arc::new(handler), stop_rx.clone()));
        }
        if let Some(reconciler) = self.reconciler {
            tasks.spawn(reconciler.run(stop_rx.clone()));
        }
        if let Some(hub) = self.hub.clone() {
            tasks.spawn(hub.run(stop_rx.clone()));
        }

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(betting_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(betting_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        let auth = self.auth.clone();
        let router = Server::builder()
            // Keep idle client connections alive through NATs and notice dead peers.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // Browsers speak gRPC-Web over HTTP/1.1 (and need CORS to call us).
            .accept_http1(true)
            .layer(cors())
            .layer(tonic_web::GrpcWebLayer::new())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_optional_service(self.wallet.map(|s| s.into_server(auth.clone())))
            .add_optional_service(self.betting.map(|s| s.into_server(auth.clone())))
            .add_optional_service(self.settlement.map(|s| s.into_server(auth.clone())))
            .add_optional_service(self.admin.map(|s| s.into_server(auth.clone())));

        // Small RPCs: don't let Nagle hold replies back.
        let incoming = TcpListenerStream::new(self.listener).map(|conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });

        let grace = self.settings.shutdown_grace();
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = {
            let health = health.clone();
            async move {
                signal.await;
                tracing::info!("shutting down");
                health.shutting_down().await;
                stop_tx.signal();
                let _ = drain_tx.send(());
            }
        };
        let server = router.serve_with_incoming_shutdown(incoming, shutdown);
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
        // A fred client keeps its connection (and reconnects) until told to
        // quit; everything that used this one has stopped.
        let _ = fred::prelude::ClientLike::quit(&self.redis).await;
        self.pool.close().await;
        Ok(())
    }
}

/// CORS for browser clients: any origin may call (tokens, not cookies,
/// authenticate), and may read the gRPC status headers.
fn cors() -> tower_http::cors::CorsLayer {
    use http::{HeaderName, Method};
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(tower_http::cors::Any)
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Where this process reaches its own server.
fn loopback(addr: SocketAddr) -> SocketAddr {
    let ip = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        }
    } else {
        addr.ip()
    };
    SocketAddr::new(ip, addr.port())
}

async fn shutdown_signal() {
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
