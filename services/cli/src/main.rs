//! `betting`: the one binary of the suite.
//!
//! - `betting serve [--role ...]` runs the chosen roles (all by default);
//! - `betting migrate` applies the database migrations;
//! - `betting token --user 42 --role player` mints a bearer token (HS256 with
//!   the local secret, or signed with `--key`/`--kid`);
//! - `betting keys generate --kid k1` writes an Ed25519 key pair and adds its
//!   public half to a JWKS file;
//! - `betting audit` checks the books and exits non-zero on any violation;
//! - `betting queue stats|dead|retry` inspects the job queues and requeues dead
//!   jobs (recorded in the privileged-action trail when DATABASE_URL is set).
//! - `betting dev-certs --out DIR` makes a local CA and certificates for TLS.
//! - `betting health` asks a server's gRPC health; exits 1 unless SERVING.

#![forbid(unsafe_code)]

mod bench;
mod cpu;
mod dev_certs;
mod health;
mod load;
mod probe;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use betting_auth::{Role, SigningKey, TokenMinter};
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
    /// Signing keys for bearer tokens.
    Keys(KeysArgs),
    /// Check every invariant of the books and the bets; exit 1 on any violation.
    Audit(AuditArgs),
    /// Inspect the job queues.
    Queue(QueueArgs),
    /// Benchmarks against a running suite.
    Bench(BenchCommand),
    /// The suite as separate processes under load while a seeded schedule
    /// kills, freezes and restarts them, restarts Redis and PostgreSQL and
    /// breaks links; then heals, quiesces and checks every cent against the
    /// client's own books. Exit 1 on any violation.
    Chaos(betting_chaos::ChaosArgs),
    /// Write a local CA, a server certificate for localhost and a client
    /// certificate (for mutual TLS), and print the settings that use them.
    DevCerts(dev_certs::DevCertsArgs),
    /// Ask a server's gRPC health service (container health checks); exit 1
    /// unless it answers SERVING.
    Health(health::HealthArgs),
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
    /// PlaceBet throughput and latency (closed loop, or open loop with
    /// --rate), then match latency, settlement drain and an audit.
    Place(load::PlaceArgs),
    /// Make N matches, settle the round, and time the call and the payouts.
    Settle(load::SettleArgs),
    /// The design's load scenarios: burst and sustained as open-loop presets,
    /// resilience in a suite of its own with its workers killed.
    Scenario(load::ScenarioArgs),
    /// Abuse probes: what a normal player feels while someone floods the server.
    Probe(probe::ProbeArgs),
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
    /// Who runs the audit, for the privileged-action trail.
    #[arg(long, env = "USER", default_value = "unknown-operator")]
    operator: String,
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
    /// With it, `stats` also says how much money dead jobs hold up, and
    /// `retry` is recorded in the privileged-action trail.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<Secret>,
    /// Who runs the command, for the privileged-action trail.
    #[arg(long, env = "USER", global = true, default_value = "unknown-operator")]
    operator: String,
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
    /// The player the token speaks for (player tokens only).
    #[arg(long)]
    user: Option<i64>,
    /// Who holds a token of another role (a game server, a cashier desk, an
    /// operator): its `sub`, recorded with every privileged action it takes.
    /// Defaults to the role's name.
    #[arg(long)]
    subject: Option<String>,
    /// player, service, game, cashier or admin.
    #[arg(long, default_value = "player")]
    role: Role,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Sign with this PKCS#8 PEM private key (Ed25519 or P-256) instead of
    /// the HS256 secret; needs --kid.
    #[arg(long, requires = "kid")]
    key: Option<PathBuf>,
    /// The key's id in the verifiers' JWKS.
    #[arg(long, requires = "key")]
    kid: Option<String>,
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<Secret>,
    #[arg(long, env = "BETTING_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    #[arg(long, env = "BETTING_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

#[derive(clap::Args)]
struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new Ed25519 key pair: `<dir>/<kid>.pem` (the private key, mode
    /// 0600) and its public half added to `<dir>/jwks.json` (created when
    /// missing; earlier keys stay, so tokens signed with them keep verifying
    /// during a rotation).
    Generate {
        /// The new key's id; tokens signed with it carry it as `kid`.
        #[arg(long)]
        kid: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Token(args) => token(&args),
        Command::Keys(args) => keys(&args),
        Command::DevCerts(args) => dev_certs::run(&args),
        Command::Serve(settings) => runtime().and_then(|rt| rt.block_on(serve(*settings))),
        Command::Migrate(storage) => runtime().and_then(|rt| rt.block_on(migrate(storage))),
        Command::Audit(args) => runtime().and_then(|rt| rt.block_on(audit(args))),
        Command::Queue(args) => runtime().and_then(|rt| rt.block_on(queue(args))),
        Command::Chaos(args) => runtime().and_then(|rt| rt.block_on(chaos(args))),
        Command::Health(args) => runtime().and_then(|rt| rt.block_on(health::run(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Streams(args),
        }) => runtime().and_then(|rt| rt.block_on(bench::streams(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Place(args),
        }) => runtime().and_then(|rt| rt.block_on(load::place(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Settle(args),
        }) => runtime().and_then(|rt| rt.block_on(load::settle(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Scenario(args),
        }) => runtime().and_then(|rt| rt.block_on(load::scenario(args))),
        Command::Bench(BenchCommand {
            command: BenchKind::Probe(args),
        }) => runtime().and_then(|rt| rt.block_on(probe::run(args))),
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
    let telemetry = betting_telemetry::init_tracing();
    let served = match betting_server::Application::build(settings).await {
        Ok(app) => app.run_until_stopped().await,
        Err(e) => Err(e),
    };
    // The last spans (the drain's) are exported before the process exits.
    telemetry.shutdown().await;
    served
}

async fn migrate(storage: StorageSettings) -> anyhow::Result<()> {
    let _telemetry = betting_telemetry::init_tracing();
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

async fn chaos(args: betting_chaos::ChaosArgs) -> anyhow::Result<()> {
    let report = betting_chaos::run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        betting_chaos::print(&report);
    }
    if !report.passed() {
        // The seed and the violations are in the report above.
        std::process::exit(1);
    }
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
    let detail = vec![
        ("checks_run", report.checks_run.to_string()),
        ("violations", report.violations.len().to_string()),
    ];
    record(
        &pool,
        &args.operator,
        betting_db::actions::ActionKind::AuditRun,
        "books".into(),
        detail,
    )
    .await?;
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
                if requeued > 0 {
                    let detail = vec![("requeued", requeued.to_string())];
                    record_retry(
                        pool.as_ref(),
                        &args.operator,
                        format!("queue:{name}"),
                        detail,
                    )
                    .await?;
                }
                if requeued >= betting_queue::RETRY_ALL_LIMIT.unsigned_abs() {
                    println!("{name}: more dead jobs may remain; run it again");
                }
            }
            QueueCommand::Retry { id } => {
                if queue.retry_dead(id).await? {
                    println!("{name}: requeued {id}");
                    let target = format!("job:{name}:{id}");
                    record_retry(pool.as_ref(), &args.operator, target, Vec::new()).await?;
                }
            }
        }
    }
    Ok(())
}

/// Records an operator's requeue in the privileged-action trail. Redis and
/// PostgreSQL share no transaction, so the row follows the requeue: a
/// requeue whose row could not be written fails the command loudly, and a
/// crash in between leaves a requeue without its row (the queue's own
/// counters still show it). Without DATABASE_URL nothing is recorded.
async fn record_retry(
    pool: Option<&betting_db::Pool>,
    operator: &str,
    target: String,
    detail: Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    let Some(pool) = pool else {
        return Ok(());
    };
    record(
        pool,
        operator,
        betting_db::actions::ActionKind::QueueRetry,
        target,
        detail,
    )
    .await
}

/// Appends one row by `operator` (role `operator-cli`) to the trail.
async fn record(
    pool: &betting_db::Pool,
    operator: &str,
    kind: betting_db::actions::ActionKind,
    target: String,
    detail: Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    use betting_db::actions::{Actor, PrivilegedAction};
    let actor = Actor::new(operator, "operator-cli");
    let action = PrivilegedAction {
        actor: &actor,
        kind,
        target,
        idempotency_key: None,
        detail,
    };
    let mut conn = pool
        .acquire()
        .await
        .context("connect to record the action")?;
    betting_db::actions::record(&mut conn, &action)
        .await
        .context("record the action in privileged_actions")
}

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    let subject = match (args.role, args.user) {
        (Role::Player, Some(user)) if user > 0 => user.to_string(),
        (Role::Player, _) => anyhow::bail!("--user must be a positive user id for a player token"),
        (role, _) => args
            .subject
            .clone()
            .unwrap_or_else(|| role.as_str().to_owned()),
    };
    let (iss, aud) = (args.jwt_issuer.as_deref(), args.jwt_audience.as_deref());
    let minter = match (&args.key, &args.kid) {
        (Some(path), Some(kid)) => {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            TokenMinter::with_key(SigningKey::from_pem(&pem, kid)?, iss, aud)
        }
        _ => {
            let secret = args
                .jwt_secret
                .as_ref()
                .context("BETTING_JWT_SECRET (or --key and --kid) is required")?;
            if secret.expose().len() < 32 {
                anyhow::bail!("BETTING_JWT_SECRET must be at least 32 bytes");
            }
            TokenMinter::new(secret.expose().as_bytes(), iss, aud)
        }
    };
    let token = minter
        .mint_subject(&subject, args.role, Duration::from_secs(args.ttl))
        .map_err(|e| anyhow::anyhow!("cannot mint token: {e}"))?;
    println!("{token}");
    Ok(())
}

fn keys(args: &KeysArgs) -> anyhow::Result<()> {
    let KeysCommand::Generate { kid, dir } = &args.command;
    let (pem, jwks) = betting_auth::generate_ed25519(kid)?;
    let key_path = dir.join(format!("{kid}.pem"));
    let jwks_path = dir.join("jwks.json");
    // Add to an existing key set, so that the keys in use keep verifying
    // while tokens signed with the new one roll out.
    let mut set: serde_json::Value = match std::fs::read_to_string(&jwks_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", jwks_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({"keys": []}),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", jwks_path.display())),
    };
    let new: serde_json::Value = serde_json::from_str(&jwks)?;
    let keys = set
        .get_mut("keys")
        .and_then(|k| k.as_array_mut())
        .with_context(|| format!("{} has no \"keys\" array", jwks_path.display()))?;
    if keys
        .iter()
        .any(|k| k.get("kid") == new["keys"][0].get("kid"))
    {
        anyhow::bail!("{} already holds a key {kid:?}", jwks_path.display());
    }
    keys.push(new["keys"][0].clone());
    let merged = serde_json::to_string_pretty(&set)?;
    // Check the result loads as the servers will load it.
    betting_auth::KeySet::from_jwks(&merged)?;
    write_private(&key_path, pem.as_bytes())?;
    std::fs::write(&jwks_path, merged + "\n")
        .with_context(|| format!("cannot write {}", jwks_path.display()))?;
    println!("private key: {} (kid {kid})", key_path.display());
    println!("public key set: {}", jwks_path.display());
    Ok(())
}

/// Creates a file only its owner can read; refuses to overwrite one.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}
