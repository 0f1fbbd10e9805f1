//! `betting`: the one binary of the suite.
//!
//! - `betting serve [--role ...]` runs the chosen roles (all by default);
//! - `betting migrate` applies the database migrations;
//! - `betting token --user 42 --role player` mints a bearer token for local use.

#![forbid(unsafe_code)]

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use betting_auth::{Role as TokenRole, TokenMinter};
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
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user the token speaks for (0: none, backend and admin only).
    #[arg(long)]
    user: i64,
    /// player, backend or admin.
    #[arg(long, default_value = "player")]
    role: TokenRole,
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
        Command::Serve(settings) => runtime().and_then(|rt| rt.block_on(serve(*settings))),
        Command::Migrate(storage) => runtime().and_then(|rt| rt.block_on(migrate(storage))),
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

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    if args.jwt_secret.expose().len() < 32 {
        anyhow::bail!("BETTING_JWT_SECRET must be at least 32 bytes");
    }
    if args.user < 0 || (args.user == 0 && args.role == TokenRole::Player) {
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
