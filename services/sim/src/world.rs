//! The system under test for one seed: a database of its own, the wallet, a
//! fault-injecting proxy in front of it, two betting instances and any number
//! of worker processes, all real [`Application`]s on loopback ports, verifying
//! tokens against a key set as a production deployment does.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use betting_auth::{Role, SigningKey, TokenMinter};
use betting_bets::BettingService;
use betting_config::{ProcessRole, Secret, Settings, StorageSettings, TokenSettings};
use betting_queue::{Queue, QueueSettings};
use betting_reconciler::{Reconciler, ReconcilerSettings};
use betting_server::{Application, Queues};
use sqlx::PgPool;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Server};

use crate::proxy::{FaultProxy, FaultTable};

/// One running `betting serve` process (in this process).
pub struct Process {
    pub channel: Channel,
    pub betting: Option<BettingService>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Process {
    async fn start(settings: Settings) -> anyhow::Result<Self> {
        let app = Application::build(settings).await?;
        let addr = app.local_addr();
        let betting = app.betting().cloned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            channel: connect(addr).await?,
            betting,
            stop: Some(stop),
            task,
        })
    }

    /// SIGTERM: drain and hand work back. Returns the task to await later.
    pub fn stop(mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
    }

    /// SIGKILL: everything it was doing stops between two awaits.
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// Everything running for one seed.
pub struct World {
    pub pool: PgPool,
    pub faults: Arc<FaultTable>,
    pub wallet: Process,
    pub betting: Vec<Process>,
    pub workers: tokio::sync::Mutex<Vec<Process>>,
    /// Workers stopped gracefully, still draining.
    pub stopping: std::sync::Mutex<Vec<JoinHandle<anyhow::Result<()>>>>,
    /// The "network" path to the wallet: through the fault proxy.
    pub proxy: Channel,
    pub queues: Queues,
    pub redis: fred::prelude::Client,
    minter: TokenMinter,
    config: WorldSettings,
    proxy_addr: SocketAddr,
    proxy_task: JoinHandle<()>,
    /// Removes the key files when the world ends.
    _keys: KeyFiles,
}

impl World {
    pub async fn start(database_url: &str, redis_url: &str) -> anyhow::Result<Self> {
        let namespace = format!("sim-{}", uuid::Uuid::new_v4().simple());
        let (keys, minter) = KeyFiles::generate(&namespace)?;
        let config = WorldSettings {
            database_url: database_url.to_owned(),
            redis_url: redis_url.to_owned(),
            namespace: namespace.clone(),
            keys: keys.dir.clone(),
        };
        let wallet = Process::start(config.settings(&[ProcessRole::Wallet], None)).await?;

        let faults = Arc::new(FaultTable::default());
        let proxy = FaultProxy::new(wallet.channel.clone(), faults.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        let proxy_task = tokio::spawn(async move {
            let incoming = tokio_stream_listener(listener);
            let (wallet_proxy, stakes_proxy) = proxy.into_servers();
            let _ = Server::builder()
                .add_service(wallet_proxy)
                .add_service(stakes_proxy)
                .serve_with_incoming(incoming)
                .await;
        });
        let via_proxy = Some(format!("http://{proxy_addr}"));

        let mut betting = Vec::new();
        for _ in 0..2 {
            betting.push(
                Process::start(config.settings(
                    &[ProcessRole::Betting, ProcessRole::Settlement],
                    via_proxy.clone(),
                ))
                .await?,
            );
        }
        let redis = betting_queue::connect(redis_url)?;
        let queue =
            |name: &str| Queue::new(redis.clone(), &namespace, name, QueueSettings::default());
        let queues = Queues {
            matches: queue(betting_jobs::MATCH.name),
            settle: queue(betting_jobs::SETTLE.name),
            refund: queue(betting_jobs::REFUND.name),
        };
        let world = Self {
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(3)
                .connect(database_url)
                .await?,
            faults,
            wallet,
            betting,
            workers: tokio::sync::Mutex::new(Vec::new()),
            stopping: std::sync::Mutex::new(Vec::new()),
            proxy: connect(proxy_addr).await?,
            queues,
            redis,
            minter,
            config,
            proxy_addr,
            proxy_task,
            _keys: keys,
        };
        world.start_worker().await?;
        Ok(world)
    }

    /// A matcher + settler process.
    pub async fn start_worker(&self) -> anyhow::Result<()> {
        let settings = self.config.settings(
            &[ProcessRole::Matcher, ProcessRole::Settler],
            Some(format!("http://{}", self.proxy_addr)),
        );
        let process = Process::start(settings).await?;
        self.workers.lock().await.push(process);
        Ok(())
    }

    /// Stops the oldest worker process, if any: gracefully or abruptly.
    pub async fn stop_worker(&self, graceful: bool) {
        let process = {
            let mut workers = self.workers.lock().await;
            if workers.is_empty() {
                return;
            }
            workers.remove(0)
        };
        if graceful {
            let handle = process.stop();
            if let Ok(mut stopping) = self.stopping.lock() {
                stopping.push(handle);
            }
        } else {
            process.kill();
        }
    }

    pub fn token(&self, user: i64, role: Role) -> String {
        self.minter
            .mint(user, role, Duration::from_secs(3600))
            .unwrap_or_default()
    }

    /// A reconciler pass with the simulation's clock: nothing needs to age
    /// first, and with `timeout` every PENDING bet counts as timed out.
    pub async fn reconcile(&self, timeout: bool) -> anyhow::Result<()> {
        let settings = ReconcilerSettings {
            interval: Duration::from_secs(3600),
            sweep_after: Duration::ZERO,
            match_timeout: if timeout {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            },
            retry_after: Duration::ZERO,
            batch: 1000,
        };
        Reconciler::new(
            self.pool.clone(),
            [
                self.queues.matches.clone(),
                self.queues.settle.clone(),
                self.queues.refund.clone(),
            ],
            settings,
        )
        .pass()
        .await?;
        Ok(())
    }

    /// Stops everything and waits (bounded) for graceful stops to finish.
    pub async fn shut_down(self) {
        let mut handles = self.stopping.into_inner().unwrap_or_default();
        for process in self.workers.into_inner().into_iter().chain(self.betting) {
            handles.push(process.stop());
        }
        handles.push(self.wallet.stop());
        let deadline = Instant::now() + Duration::from_secs(10);
        for handle in handles {
            let left = deadline.saturating_duration_since(Instant::now());
            let abort = handle.abort_handle();
            if tokio::time::timeout(left, handle).await.is_err() {
                abort.abort();
            }
        }
        self.proxy_task.abort();
        let _ = fred::prelude::ClientLike::quit(&self.redis).await;
        self.pool.close().await;
    }
}

struct WorldSettings {
    database_url: String,
    redis_url: String,
    namespace: String,
    /// Where the key set and the private keys are (see [`KeyFiles`]).
    keys: PathBuf,
}

const ISSUER: &str = "betting-sim";
const AUDIENCE: &str = "betting-api";

/// The simulation runs in production token mode, as a split deployment
/// does: every process verifies against a JWKS, only the betting and
/// settler processes hold the private key of their service tokens, and the
/// simulated clients' tokens are signed with another key.
struct KeyFiles {
    dir: PathBuf,
}

impl KeyFiles {
    fn generate(namespace: &str) -> anyhow::Result<(Self, TokenMinter)> {
        let dir = std::env::temp_dir().join(format!("{namespace}-keys"));
        std::fs::create_dir_all(&dir)?;
        let files = Self { dir };
        let mut keys = Vec::new();
        for kid in ["service", "clients"] {
            let (pem, _) = betting_auth::generate_ed25519(kid)?;
            std::fs::write(files.dir.join(format!("{kid}.pem")), &pem)?;
            keys.push(SigningKey::from_pem(pem.as_bytes(), kid)?);
        }
        let jwks = betting_auth::public_key_set(&[&keys[0], &keys[1]])?;
        std::fs::write(files.dir.join("jwks.json"), jwks)?;
        let clients = TokenMinter::with_key(keys.remove(1), Some(ISSUER), Some(AUDIENCE));
        Ok((files, clients))
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl WorldSettings {
    /// Production-mode token settings for a process of `roles`.
    fn tokens(&self, roles: &[ProcessRole]) -> TokenSettings {
        let signs = roles
            .iter()
            .any(|r| matches!(r, ProcessRole::Betting | ProcessRole::Settler));
        TokenSettings {
            jwt_secret: None,
            jwt_jwks: Some(self.keys.join("jwks.json")),
            jwt_signing_key: signs.then(|| self.keys.join("service.pem")),
            jwt_signing_kid: signs.then(|| "service".to_owned()),
            jwt_issuer: Some(ISSUER.into()),
            jwt_audience: Some(AUDIENCE.into()),
            jwt_max_lifetime_secs: 86_400,
        }
    }

    fn settings(&self, roles: &[ProcessRole], wallet_endpoint: Option<String>) -> Settings {
        Settings {
            storage: StorageSettings {
                // The services' restricted role, as in production.
                database_url: Secret::new(betting_test_kit::service_url(&self.database_url)),
                db_max_connections: 3,
            },
            tls: betting_config::TlsSettings::default(),
            redis_url: Secret::new(&self.redis_url),
            redis_namespace: self.namespace.clone(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: self.tokens(roles),
            wallet_endpoint,
            roles: roles.to_vec(),
            // The schedule runs recovery and reconciler passes itself.
            placing_grace_secs: 3600,
            recovery_interval_ms: 3_600_000,
            match_timeout_secs: 3600,
            place_group_commit: true,
            worker_concurrency: 4,
            queue_visibility_ms: 6_000,
            reconcile_interval_ms: 3_600_000,
            stream_heartbeat_ms: 15_000,
            stream_send_timeout_ms: 10_000,
            shutdown_grace_secs: 1,
            edge: Default::default(),
            // The books expect every request to be judged on its money alone.
            limits: betting_config::UserLimits::off(),
        }
    }
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
