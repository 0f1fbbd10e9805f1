//! The application: everything a `betting serve` process runs, for a set of roles.
//!
//! [`Application::build`] constructs every part (pools, clients, listeners,
//! services) and binds the ports, so callers (the binary and the tests alike)
//! learn the real port before anything is served; [`Application::run_until`]
//! serves until a shutdown signal, then drains. Tests run exactly this path.
//!
//! One job per module: `infra` binds the ports and holds the stores and the
//! queues; `roles` builds what each role runs; `grpc` holds the gRPC
//! adapters of the domain services; `router` mounts them; `serve` runs and
//! drains; `health` keeps the health service true; `feed` feeds the stream
//! hub's sweep; `edge` (load shedding, deadlines) and `conn` (the connection
//! cap) protect the server from its callers; `tls` terminates TLS on the
//! gRPC port; `limits` holds the per-user limits the adapters enforce.

#![forbid(unsafe_code)]

mod conn;
mod edge;
mod feed;
mod grpc;
mod health;
mod infra;
mod legacy;
mod limits;
mod observe;
mod roles;
mod router;
mod serve;
mod status_log;
mod tls;

use std::{future::Future, net::SocketAddr, sync::Arc};

use betting_auth::AuthInterceptor;
use betting_bets::BettingService;
use betting_config::Settings;
use betting_reconciler::Reconciler;
use betting_settlement::SettlementService;
use betting_shutdown::{Shutdown, Trigger};
use betting_streams::Hub;

pub use health::HealthWatch;
pub use infra::Queues;

use crate::{
    infra::{Listeners, Stores},
    roles::{Background, Roles, Services},
};

/// A built, bound, not yet running process.
pub struct Application {
    settings: Settings,
    listeners: Listeners,
    stores: Stores,
    auth: AuthInterceptor,
    queues: Queues,
    services: Services,
    background: Background,
    /// Shutdown reaches every long-lived task, streams included, through these.
    trigger: Trigger,
    shutdown: Shutdown,
}

impl Application {
    /// Validates the settings, connects (lazily) to PostgreSQL and Redis, binds
    /// the gRPC and metrics ports and builds the services of the chosen roles.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let listeners = Listeners::bind(&settings).await?;
        let stores = Stores::connect(&settings)?;
        let auth = AuthInterceptor::new(Arc::new(betting_auth::setup::verifier(&settings.tokens)?));
        let queues = Queues::new(&stores.redis, &settings);
        let (trigger, shutdown) = betting_shutdown::channel();
        let Roles {
            services,
            background,
        } = Roles::build(&settings, listeners.grpc_addr, &stores, &queues, &shutdown)?;
        Ok(Self {
            settings,
            listeners,
            stores,
            auth,
            queues,
            services,
            background,
            trigger,
            shutdown,
        })
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.grpc_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.listeners.metrics_addr
    }

    /// The betting service, when this process runs the betting role.
    pub fn betting(&self) -> Option<&BettingService> {
        self.services.betting.as_ref()
    }

    pub fn settlement(&self) -> Option<&SettlementService> {
        self.services.settlement.as_ref()
    }

    /// The reconciler, when this process runs a worker role.
    pub fn reconciler(&self) -> Option<&Reconciler> {
        self.background.reconciler.as_ref()
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    /// This instance's stream hub, when it serves streams.
    pub fn hub(&self) -> Option<&Hub> {
        self.background.hub.as_ref()
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(serve::shutdown_signal()).await
    }

    /// Serves until `signal` completes, then shuts down gracefully: health
    /// turns NOT_SERVING, background work stops, and in-flight requests get
    /// the configured grace period to finish.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        serve::run(self, signal).await
    }
}
