//! The suite under test: its own PostgreSQL and Redis, the two link
//! proxies, and the processes — WalletService, two betting instances,
//! SettlementService, two matchers and two settlers.
//!
//! ```text
//!   clients ──► betting-0, betting-1, settlement-0, wallet-0 (deposits)
//!   betting-*, settler-* ──► [wallet link] ──► wallet-0
//!   every process ──► [redis link] ──► Redis        every process ──► PostgreSQL
//! ```

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::{
    faults::{LinkName, Topology},
    link::Link,
    ports::free_port,
    servers::{Postgres, Redis},
    supervise::{Drain, Kind, Process, wait_serving},
};

/// How long a process gets to answer health after a (re)start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The queue's visibility timeout the workers run with: the shortest
/// allowed, so that zombies (frozen longer than this) happen often.
pub const VISIBILITY: Duration = Duration::from_millis(6_000);
/// The drain the processes get (BETTING_SHUTDOWN_GRACE_SECS).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a SIGTERM'd process is waited for before it is SIGKILLed: its
/// grace and a margin. The margin is generous (on a loaded two-core
/// machine, with links held, a drain that ends at its grace may still take
/// a few seconds to close its pools and exit); a process still running
/// after it did not honour its grace — an orchestrator would SIGKILL it
/// mid-drain — and that is a violation, not noise.
pub const DRAIN_WAIT: Duration = Duration::from_secs(SHUTDOWN_GRACE.as_secs() + 5);

/// The processes' exits, as the run saw them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Exits {
    /// Exits the run did not cause: process, status, when it was noticed.
    pub unexpected: Vec<String>,
    /// SIGTERMs that drained (the process exited by itself).
    pub drained: u64,
    /// SIGTERMs that ended in SIGKILL after [`DRAIN_WAIT`]: process, when.
    pub drain_killed: Vec<String>,
}

impl Exits {
    /// Each of them a violation.
    pub fn violations(&self) -> Vec<String> {
        let unexpected = self
            .unexpected
            .iter()
            .map(|e| format!("a process exited though the run did not stop it: {e}"));
        let killed = self.drain_killed.iter().map(|e| {
            format!(
                "a SIGTERM'd process was still draining {} s later (grace {} s) and was SIGKILLed: {e}",
                DRAIN_WAIT.as_secs(),
                SHUTDOWN_GRACE.as_secs()
            )
        });
        unexpected.chain(killed).collect()
    }

    fn unexpected(&mut self, name: &str, status: ExitStatus, at: Duration) {
        self.unexpected.push(format!(
            "{name} ({status}), noticed {:.1} s into the run",
            at.as_secs_f64()
        ));
    }

    fn drain(&mut self, name: &str, drain: Drain, at: Duration) {
        match drain {
            Drain::NotRunning => {}
            Drain::Exited(_) => self.drained += 1,
            Drain::Killed => self.drain_killed.push(format!(
                "{name}, SIGTERM'd {:.1} s into the run",
                at.as_secs_f64()
            )),
        }
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub pg: Postgres,
    pub redis: Mutex<Redis>,
    pub wallet_link: Link,
    pub redis_link: Link,
    pub processes: Vec<Slot>,
    /// The owner's pool, for the final checks (direct, not through a link).
    pub pool: PgPool,
    pub secret: String,
    /// The Redis namespace the processes share.
    pub namespace: String,
    /// When the suite started, for the times in [`Exits`].
    pub began: Instant,
    pub exits: std::sync::Mutex<Exits>,
}

/// One process's place in the suite: what it is, and the process itself.
pub struct Slot {
    pub kind: Kind,
    pub index: usize,
    pub name: String,
    pub port: u16,
    pub process: Mutex<Process>,
}

impl Cluster {
    pub async fn start(dir: &Path, topology: Topology) -> anyhow::Result<Self> {
        let pg = Postgres::create(dir, free_port()?)?;
        let redis = Redis::start(dir, free_port()?)?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&pg.url("postgres", "postgres"))
            .await?;
        sqlx::query("CREATE DATABASE betting")
            .execute(&admin)
            .await?;
        admin.close().await;
        let owner_url = pg.url("postgres", "betting");
        let migrate = tokio::process::Command::new(std::env::current_exe()?)
            .arg("migrate")
            .env("DATABASE_URL", &owner_url)
            .output()
            .await?;
        anyhow::ensure!(
            migrate.status.success(),
            "betting migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&owner_url)
            .await?;
        // The services connect as a login role with the application's grants.
        sqlx::query("CREATE ROLE betting_service LOGIN IN ROLE betting_app")
            .execute(&pool)
            .await?;

        let wallet_port = free_port()?;
        let wallet_link = Link::start("wallet", wallet_port).await?;
        let redis_link = Link::start("redis", redis.port).await?;
        let secret = format!("chaos-{}", uuid::Uuid::new_v4().simple());
        let namespace = "chaos".to_owned();
        let env: Vec<(String, String)> = [
            ("DATABASE_URL", pg.url("betting_service", "betting")),
            (
                "REDIS_URL",
                format!("redis://127.0.0.1:{}", redis_link.port),
            ),
            ("BETTING_REDIS_NAMESPACE", namespace.clone()),
            (
                "BETTING_WALLET_ENDPOINT",
                format!("http://127.0.0.1:{}", wallet_link.port),
            ),
            ("BETTING_JWT_SECRET", secret.clone()),
            ("BETTING_METRICS_ADDR", "127.0.0.1:0".into()),
            (
                "BETTING_QUEUE_VISIBILITY_MS",
                VISIBILITY.as_millis().to_string(),
            ),
            ("BETTING_RECONCILE_INTERVAL_MS", "1000".into()),
            ("BETTING_RECOVERY_INTERVAL_MS", "500".into()),
            ("BETTING_PLACING_GRACE_SECS", "2".into()),
            ("BETTING_MATCH_TIMEOUT_SECS", "20".into()),
            ("BETTING_SHUTDOWN_GRACE_SECS", "3".into()),
            ("BETTING_DB_MAX_CONNECTIONS", "12".into()),
            // The run's clients bet far faster than a player may.
            ("BETTING_USER_BET_RATE", "0".into()),
            ("BETTING_USER_MAX_OPEN_BETS", "0".into()),
            ("BETTING_USER_READ_RATE", "0".into()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        let mut processes = Vec::new();
        let mut add = |kind: Kind, count: usize, fixed: Option<u16>| -> anyhow::Result<()> {
            for index in 0..count {
                let port = match fixed {
                    Some(port) => port,
                    None => free_port()?,
                };
                let process = Process::new(kind, index, port, env.clone(), dir);
                processes.push(Slot {
                    kind,
                    index,
                    name: process.name.clone(),
                    port,
                    process: Mutex::new(process),
                });
            }
            Ok(())
        };
        add(Kind::Wallet, 1, Some(wallet_port))?;
        add(Kind::Betting, topology.betting, None)?;
        add(Kind::Settlement, 1, None)?;
        add(Kind::Matcher, topology.matchers, None)?;
        add(Kind::Settler, topology.settlers, None)?;

        let cluster = Self {
            dir: dir.to_owned(),
            pg,
            redis: Mutex::new(redis),
            wallet_link,
            redis_link,
            processes,
            pool,
            secret,
            namespace,
            began: Instant::now(),
            exits: std::sync::Mutex::new(Exits::default()),
        };
        for slot in &cluster.processes {
            slot.process.lock().await.start()?;
        }
        for slot in &cluster.processes {
            wait_serving(slot.port, START_TIMEOUT)
                .await
                .with_context(|| format!("{} did not start", slot.name))?;
        }
        Ok(cluster)
    }

    pub fn slot(&self, kind: Kind, index: usize) -> Option<&Slot> {
        self.processes
            .iter()
            .find(|s| s.kind == kind && s.index == index)
    }

    /// The gRPC port of every process of a kind, in index order.
    pub fn ports(&self, kind: Kind) -> Vec<u16> {
        self.processes
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.port)
            .collect()
    }

    pub fn link(&self, name: LinkName) -> &Link {
        match name {
            LinkName::Wallet => &self.wallet_link,
            LinkName::Redis => &self.redis_link,
        }
    }

    fn exits(&self) -> std::sync::MutexGuard<'_, Exits> {
        self.exits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an exit of `process` the run did not cause, if it exited.
    /// Called before every kill, freeze and SIGTERM of the schedule, and
    /// before healing: whatever exited by itself meanwhile is found then.
    pub fn reap_unexpected(&self, process: &mut Process) {
        if let Some(status) = process.reap_unexpected() {
            tracing::warn!(process = %process.name, %status, "exited by itself");
            self.exits()
                .unexpected(&process.name, status, self.began.elapsed());
        }
    }

    /// SIGTERM, the drain waited for up to [`DRAIN_WAIT`]; recorded.
    pub async fn terminate(&self, process: &mut Process) {
        self.reap_unexpected(process);
        let at = self.began.elapsed();
        let drain = process.terminate(DRAIN_WAIT).await;
        self.exits().drain(&process.name, drain, at);
    }

    /// Heals every link, wakes every frozen process and starts every dead
    /// one, then waits until all of them serve.
    pub async fn heal(&self) -> anyhow::Result<()> {
        self.wallet_link.heal();
        self.redis_link.heal();
        if let Some(status) = self.redis.lock().await.reap_unexpected()? {
            self.exits()
                .unexpected("redis-server", status, self.began.elapsed());
        }
        for slot in &self.processes {
            let mut p = slot.process.lock().await;
            self.reap_unexpected(&mut p);
            p.thaw()?;
            if !p.alive() {
                p.start()?;
            }
        }
        for slot in &self.processes {
            wait_serving(slot.port, START_TIMEOUT)
                .await
                .with_context(|| format!("{} does not serve after healing", slot.name))?;
        }
        Ok(())
    }

    /// Stops every process gracefully (the end of the run).
    pub async fn stop(&self) {
        for slot in &self.processes {
            self.terminate(&mut *slot.process.lock().await).await;
        }
    }
}
