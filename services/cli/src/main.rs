//! `betting`: the one binary of the suite.
//!
//! - `betting serve [--role ...]` runs the chosen roles (all by default);
//! - `betting migrate` applies the database migrations;
//! - `betting token --user 42 --role player` mints a bearer token for local use;
//! - `betting audit` checks the books and exits non-zero on any violation;
//! - `betting queue stats|dead|retry` inspects the job queues and requeues dead jobs;
//! - `betting dev-certs --out DIR` makes a local CA and certificates for TLS.

#![forbid(unsafe_code)]

mod bench;
mod dev_certs;

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use betting_auth::{Role, TokenMinter};
use betting_config::{Secret, Settings, StorageSettings};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "betting", version, about = "Peer-to-peer betting backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC services and run the workers of the chosen roles.
    Serve(Box<Settings>),
    /// Apply pending database migrations.
    Migrate(StorageSettings),
    /// Mint a bearer token; the token alone is printed on the last line.
    Token(TokenArgs),
    /// Check every invariant of the books and the bets; exit 1 on any violation.
    Audit(AuditArgs),
    /// Inspect the job queues.
    Queue(QueueArgs),
    /// Benchmarks against a running suite.
    Bench(BenchCommand),
    /// Write a local CA, a server certificate for localhost and a client
    /// certificate (for mutual TLS), and print the settings that use them.
    DevCerts(dev_certs::DevCertsArgs),
}

#[derive(clap::Args)]
struct BenchCommand {
    #[command(subcommand)]
    command: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Live stream delivery latency and memory per stream.
    Streams(bench::BenchArgs),
    /// PlaceBet throughput and latency.
    Place(bench::PlaceArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    #[command(flatten)]
    storage: StorageSettings,
    /// Seconds of work that may still legitimately be in flight.
    #[arg(long, default_value_t = 30)]
    quiescence_secs: u64,
    /// The match timeout the suite runs with.
    #[arg(long, env = "BETTING_MATCH_TIMEOUT_SECS", default_value_t = 300)]
    match_timeout_secs: u64,
}

#[derive(clap::Args)]
struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    redis_url: Option<Secret>,
    #[arg(
        long,
        env = "BETTING_REDIS_NAMESPACE",
        default_value = "betting",
        global = true
    )]
    redis_namespace: String,
    /// match, settle or refund; all of them when absent.
    #[arg(long, global = true)]
    queue: Option<String>,
    /// With it, `stats` also says how much money dead jobs hold up.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<Secret>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, in flight, delayed, dead, processed and failed counts.
    Stats,
    /// The dead-letter list: every job out of attempts, with its last error.
    Dead {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Requeue a dead job by id, or all of them.
    Retry { id: String },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user the token speaks for (0: none, backend and admin only).
    #[arg(long)]
    user: i64,
    /// player, backend or admin.
    #[arg(long, default_value = "player")]
    role: Role,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Secret,
    #[arg(long, env = "BETTING_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    #[arg(long, env = "BETTING_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Token(args) => token(&args),
        Command::DevCerts(args) => dev_certs::run(&args),
        Command::Serve(settings) => runtime().and_then(|rt| rt.block_on(serve(*settings))),
        Command::Migrate(storage) => runtime().and_then(|rt| rt.block_on(migrate(storage))),
        Command::Audit(args) => runtime().and_then(|rt| rt.block_on(audit(args))),
        Command::Queue(args) => runtime().and_then(|rt| rt.block_on(queue(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Streams(args),
        }) => runtime().and_then(|rt| rt.block_on(bench::streams(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Place(args),
        }) => runtime().and_then(|rt| rt.block_on(bench::place(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("betting: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    betting_telemetry::init_tracing();
    let app = betting_server::Application::build(settings).await?;
    app.run_until_stopped().await
}

async fn migrate(storage: StorageSettings) -> anyhow::Result<()> {
    betting_telemetry::init_tracing();
    storage.validate()?;
    let pool = betting_db::connect_lazy(
        storage.database_url.expose(),
        &betting_db::PoolSettings {
            max_connections: 2,
            ..Default::default()
        },
    )
    .context("invalid DATABASE_URL")?;
    betting_db::migrate(&pool)
        .await
        .context("migration failed")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    args.storage.validate()?;
    let pool = betting_db::connect_lazy(
        args.storage.database_url.expose(),
        &betting_db::PoolSettings {
            max_connections: 2,
            ..Default::default()
        },
    )
    .context("invalid DATABASE_URL")?;
    let settings = betting_audit::AuditSettings {
        quiescence: Duration::from_secs(args.quiescence_secs),
        match_timeout: Duration::from_secs(args.match_timeout_secs),
    };
    let report = betting_audit::run(&pool, &settings)
        .await
        .context("the audit could not run")?;
    for v in &report.violations {
        println!("VIOLATION {}: {}", v.check, v.detail);
    }
    if report.is_clean() {
        println!("audit clean: {} checks, no violations", report.checks_run);
        Ok(())
    } else {
        anyhow::bail!(
            "audit found {} violation(s) in {} checks",
            report.violations.len(),
            report.checks_run
        )
    }
}

async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    use betting_queue::{Queue, QueueSettings};
    let url = args
        .redis_url
        .context("REDIS_URL (or --redis-url) is required")?;
    let client = betting_queue::connect(url.expose()).context("invalid REDIS_URL")?;
    let names: Vec<String> = match args.queue {
        Some(name) => vec![name],
        None => betting_jobs::QUEUES
            .map(|spec| spec.name.to_owned())
            .to_vec(),
    };
    let pool = match &args.database_url {
        Some(url) => Some(
            betting_db::connect_lazy(url.expose(), &betting_db::PoolSettings::default())
                .context("invalid DATABASE_URL")?,
        ),
        None => None,
    };
    for name in names {
        let queue = Queue::new(
            client.clone(),
            &args.redis_namespace,
            &name,
            QueueSettings::default(),
        );
        match &args.command {
            QueueCommand::Stats => {
                let mut stats = serde_json::to_value(queue.stats().await?)?;
                if let (Some(pool), Some(fields)) = (&pool, stats.as_object_mut()) {
                    let money = betting_reconciler::stuck::dead_money(pool, &queue).await?;
                    fields.insert(
                        "dead_money".into(),
                        betting_domain::format_money(money).into(),
                    );
                }
                println!("{stats}");
            }
            QueueCommand::Dead { limit } => {
                for job in queue.dead(*limit).await? {
                    println!("{}", serde_json::to_string(&job)?);
                }
            }
            QueueCommand::Retry { id } if id == "all" => {
                let requeued = queue.retry_all_dead().await?;
                println!("{name}: requeued {requeued}");
                if requeued >= betting_queue::RETRY_ALL_LIMIT.unsigned_abs() {
                    println!("{name}: more dead jobs may remain; run it again");
                }
            }
            QueueCommand::Retry { id } => {
                if queue.retry_dead(id).await? {
                    println!("{name}: requeued {id}");
                }
            }
        }
    }
    Ok(())
}

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    if args.jwt_secret.expose().len() < 32 {
        anyhow::bail!("BETTING_JWT_SECRET must be at least 32 bytes");
    }
    if args.user < 0 || (args.user == 0 && args.role == Role::Player) {
        anyhow::bail!("--user must be a positive user id (0 only for backend or admin)");
    }
    let minter = TokenMinter::new(
        args.jwt_secret.expose().as_bytes(),
        args.jwt_issuer.as_deref(),
        args.jwt_audience.as_deref(),
    );
    let token = minter
        .mint(args.user, args.role, Duration::from_secs(args.ttl))
        .map_err(|e| anyhow::anyhow!("cannot mint token: {e}"))?;
    println!("{token}");
    Ok(())
}
