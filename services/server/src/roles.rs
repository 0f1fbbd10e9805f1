//! Per-role wiring: what each role a process runs builds.
//!
//! [`Roles::build`] asks `Settings::runs` once per role and builds that
//! role's part:
//!
//! - `wallet`: WalletService.
//! - `betting`: BettingService, and its recovery pass over unfinished
//!   PLACING bets.
//! - `settlement`: SettlementService, and AdminService beside it.
//! - `matcher`: a consumer of the match queue.
//! - `settler`: consumers of the settle and refund queues.
//! - either worker role: the reconciler, which re-derives lost jobs from
//!   PostgreSQL and refunds timed-out bets.
//!
//! What several roles use is built the first time one of them asks, and only
//! once: the WalletService client (betting, settler), and the stream context
//! with this instance's hub (betting and settlement serve streams; the hub
//! runs when either does). The result is split by who uses it: [`Services`]
//! for the router, [`Background`] for the tasks run starts.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use betting_audit::{AdminService, AuditSettings};
use betting_auth::ServiceCredentials;
use betting_bets::{
    BetLimits, BetStore, BettingService,
    matcher::{MatchHandler, Matcher},
    recovery::RecoverySettings,
};
use betting_config::{ProcessRole, Settings};
use betting_queue::{Handler, Queue, Worker, WorkerSettings};
use betting_reconciler::{Reconciler, ReconcilerSettings};
use betting_refunds::{Outbox, RefundHandler, Refunder};
use betting_settlement::{RoundStore, SettlementService, settler::SettleHandler};
use betting_shutdown::Shutdown;
use betting_streams::{Hub, Publisher, StreamContext, StreamSettings};
use betting_wallet::WalletService;
use betting_wallet_client::{WalletClient, WalletTls};
use tokio::task::JoinSet;

use crate::{
    feed,
    infra::{Queues, Stores},
    limits::Limiter,
};

/// Every part of the roles a process runs, built once.
pub(crate) struct Roles {
    pub services: Services,
    pub background: Background,
}

/// The gRPC services of the roles; the router mounts those there are.
pub(crate) struct Services {
    pub wallet: Option<WalletService>,
    pub betting: Option<BettingService>,
    pub settlement: Option<SettlementService>,
    pub admin: Option<AdminService>,
    /// The per-user limits the betting and settlement adapters enforce.
    pub limiter: Limiter,
}

/// The roles' long-lived tasks; run starts those there are.
#[derive(Default)]
pub(crate) struct Background {
    pub recovery: Option<Recovery>,
    pub matcher: Option<Consumer<MatchHandler>>,
    pub settler: Option<Consumer<SettleHandler>>,
    pub refunder: Option<Consumer<RefundHandler>>,
    pub reconciler: Option<Reconciler>,
    pub hub: Option<Hub>,
}

/// The betting role's recovery pass.
pub(crate) struct Recovery {
    betting: BettingService,
    settings: RecoverySettings,
}

/// One queue consumer and the handler it runs.
pub(crate) struct Consumer<H> {
    worker: Worker,
    handler: H,
}

impl<H: Handler> Consumer<H> {
    async fn run(self, shutdown: Shutdown) {
        self.worker.run(Arc::new(self.handler), shutdown).await;
    }
}

impl Roles {
    /// `local_addr` is this process's own gRPC server: the wallet, when no
    /// other is configured. `shutdown` ends the streams.
    pub fn build(
        settings: &Settings,
        local_addr: SocketAddr,
        stores: &Stores,
        queues: &Queues,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let pool = &stores.pool;
        let mut shared = Shared {
            settings,
            local_addr,
            stores,
            shutdown,
            publisher: Publisher::new(stores.redis.clone(), &settings.redis_namespace),
            wallet: None,
            streams: None,
        };
        let mut services = Services {
            wallet: None,
            betting: None,
            settlement: None,
            admin: None,
            limiter: Limiter::new(&settings.limits),
        };
        let mut background = Background::default();

        if settings.runs(ProcessRole::Wallet) {
            services.wallet = Some(WalletService::new(pool.clone()));
        }
        if settings.runs(ProcessRole::Betting) {
            let betting = BettingService::new(
                BetStore::new(pool.clone()),
                shared.wallet()?,
                queues.matches.clone(),
                shared.publisher.clone(),
            )
            .with_limits(BetLimits {
                min_stake: settings.limits.min_stake,
                max_open_bets: settings.limits.user_max_open_bets,
            })
            .with_group_commit(settings.place_group_commit)
            .with_streams(shared.streams());
            background.recovery = Some(Recovery {
                betting: betting.clone(),
                settings: RecoverySettings {
                    interval: settings.recovery_interval(),
                    placing_grace: settings.placing_grace(),
                    ..RecoverySettings::default()
                },
            });
            services.betting = Some(betting);
        }
        if settings.runs(ProcessRole::Settlement) {
            services.settlement = Some(
                SettlementService::new(
                    pool.clone(),
                    queues.settle.clone(),
                    queues.refund.clone(),
                    shared.publisher.clone(),
                )
                .with_streams(shared.streams()),
            );
            let audit = AuditSettings {
                match_timeout: settings.match_timeout(),
                ..AuditSettings::default()
            };
            services.admin = Some(AdminService::new(pool.clone(), audit));
        }
        if settings.runs(ProcessRole::Matcher) {
            background.matcher = Some(Consumer {
                worker: shared.worker(&queues.matches)?,
                handler: MatchHandler::new(
                    Matcher::new(pool.clone()).with_publisher(shared.publisher.clone()),
                ),
            });
        }
        if settings.runs(ProcessRole::Settler) {
            let wallet = shared.wallet()?;
            background.settler = Some(Consumer {
                worker: shared.worker(&queues.settle)?,
                handler: SettleHandler::new(RoundStore::new(pool.clone()), wallet.clone())
                    .with_publisher(shared.publisher.clone()),
            });
            background.refunder = Some(Consumer {
                worker: shared.worker(&queues.refund)?,
                handler: RefundHandler::new(Refunder::new(Outbox::new(pool.clone()), wallet)),
            });
        }
        if settings.runs(ProcessRole::Matcher) || settings.runs(ProcessRole::Settler) {
            background.reconciler = Some(
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
                .with_publisher(shared.publisher.clone()),
            );
        }
        // A streaming service asked for the streams: its hub runs too, and
        // its caches hear of this process's own changes at once.
        background.hub = shared.streams.map(|streams| streams.hub);
        if let Some(hub) = &background.hub {
            shared.publisher.route_locally(hub.clone());
        }

        Ok(Self {
            services,
            background,
        })
    }
}

impl Background {
    /// Starts every task there is, each stopping on `shutdown`.
    pub fn spawn(self, tasks: &mut JoinSet<()>, shutdown: &Shutdown) {
        if let Some(Recovery { betting, settings }) = self.recovery {
            tasks.spawn(betting.run_recovery(settings, shutdown.clone()));
        }
        if let Some(matcher) = self.matcher {
            tasks.spawn(matcher.run(shutdown.clone()));
        }
        if let Some(settler) = self.settler {
            tasks.spawn(settler.run(shutdown.clone()));
        }
        if let Some(refunder) = self.refunder {
            tasks.spawn(refunder.run(shutdown.clone()));
        }
        if let Some(reconciler) = self.reconciler {
            tasks.spawn(reconciler.run(shutdown.clone()));
        }
        if let Some(hub) = self.hub {
            tasks.spawn(hub.run(shutdown.clone()));
        }
    }
}

/// What several roles use, built the first time one asks.
struct Shared<'a> {
    settings: &'a Settings,
    local_addr: SocketAddr,
    stores: &'a Stores,
    shutdown: &'a Shutdown,
    /// Announces bet and round changes to every instance's hub.
    publisher: Publisher,
    wallet: Option<WalletClient>,
    streams: Option<StreamContext>,
}

impl Shared<'_> {
    /// The WalletService client. In all-in-one mode the wallet is this very
    /// server, reached over loopback exactly as a split deployment reaches it
    /// over the network.
    fn wallet(&mut self) -> anyhow::Result<WalletClient> {
        if let Some(client) = &self.wallet {
            return Ok(client.clone());
        }
        let settings = self.settings;
        let endpoint = settings.wallet_url(loopback(self.local_addr));
        let tls = settings.tls.client()?;
        // Only this process's service tokens are signed here: with a key
        // set, by the private key only the betting and settler roles hold.
        let credentials =
            ServiceCredentials::new(betting_auth::setup::service_minter(&settings.tokens)?);
        let tls = tls.as_ref().map(|tls| WalletTls {
            ca: &tls.ca,
            identity: tls
                .identity
                .as_ref()
                .map(|id| (id.cert.as_slice(), id.key.expose())),
        });
        let client = WalletClient::with_tls(&endpoint, credentials, tls)
            .with_context(|| format!("invalid wallet endpoint {endpoint}"))?;
        Ok(self.wallet.insert(client).clone())
    }

    /// What a streaming service needs: this instance's hub (one, however many
    /// services stream), the stream settings, and the shutdown that ends
    /// every stream.
    fn streams(&mut self) -> StreamContext {
        let Self {
            settings,
            stores,
            shutdown,
            ..
        } = *self;
        self.streams
            .get_or_insert_with(|| StreamContext {
                hub: Hub::new(
                    Arc::new(feed::StoreFeed {
                        bets: BetStore::new(stores.pool.clone()),
                        rounds: RoundStore::new(stores.pool.clone()),
                    }),
                    stores.redis_config.clone(),
                    &settings.redis_namespace,
                ),
                settings: StreamSettings {
                    heartbeat: Duration::from_millis(settings.stream_heartbeat_ms.max(10)),
                    send_timeout: Duration::from_millis(settings.stream_send_timeout_ms.max(10)),
                    ..StreamSettings::default()
                },
                stop: shutdown.clone(),
            })
            .clone()
    }

    /// A consumer of `queue`. Each blocks in BLMOVE, so each gets a Redis
    /// connection of its own.
    fn worker(&self, queue: &Queue) -> anyhow::Result<Worker> {
        let settings = self.settings;
        let blocking = betting_queue::connect_with(
            settings.redis_url.expose(),
            settings.tls.redis_ca()?.as_deref(),
        )?;
        let worker_settings = WorkerSettings {
            concurrency: settings.worker_concurrency,
            shutdown_grace: settings.shutdown_grace(),
            ..WorkerSettings::default()
        };
        Ok(Worker::new(queue.clone(), blocking, worker_settings)?)
    }
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
