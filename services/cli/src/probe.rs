//! `betting bench probe`: abuse a running suite the way an attacker or an
//! unlucky day would, and measure what a normal player feels meanwhile.
//!
//! Each probe first measures a quiet baseline — one normal player placing a
//! bet every 25 ms for `--seconds` — then runs the abuse while the same
//! player keeps betting, and reports the player's PlaceBet p50/p99 in both
//! phases, the server's peak memory (given `--server-pid`), and what the
//! server answered the abuser, by code. A measurement, not a test: it asserts
//! nothing, is bounded in count and time, and only talks to `--target`
//! (loopback by default).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use betting_api::pb::{
    self, betting_service_client::BettingServiceClient,
    settlement_service_client::SettlementServiceClient,
};
use betting_auth::{Role, TokenMinter};
use futures::{StreamExt, stream};
use tonic::{Code, transport::Channel};

use crate::bench::{authed, connect, fund, open_round, percentile, rss_kib};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Probe {
    /// Many WatchBets streams (one user each) on one HTTP/2 connection.
    Streams,
    /// WatchBets streams opened and reset at once, 200 at a time.
    ResetFlood,
    /// Many WatchBets streams of one player, then changes to their bets.
    OnePlayer,
    /// A wallet row held FOR UPDATE while its owner places 50 bets.
    LockedWallet,
    /// Clients calling GetRound on a round of many bets.
    GetRound,
    /// Anonymous 4 MiB health and reflection requests at once.
    BigRequests,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    #[arg(value_enum)]
    probe: Probe,
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The server's process id, to report its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Streams, waiting bets, clients or requests, depending on the probe
    /// (defaults: 2,000 / 200 / 500 / 50 / 20 / 100).
    #[arg(long)]
    count: Option<usize>,
    /// Length of each phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// For the locked-wallet probe (holds the row) and the one-player probe
    /// (counts the reads of `bets`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<betting_config::Secret>,
    /// First user id the probe uses.
    #[arg(long, default_value_t = 5_000_000)]
    first_user: i64,
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    jwt_secret: betting_config::Secret,
    /// Set up rounds and wallets with a retired `backend` token, to probe a
    /// build from before the roles were split (for a before/after table).
    #[arg(long, hide = true)]
    legacy_backend_role: bool,
}

/// A setup token: `role`, or, against an older build, the retired `backend`
/// role (which named no user: `sub` "0").
fn setup_token(minter: &TokenMinter, role: Role, legacy: bool) -> anyhow::Result<String> {
    let ttl = Duration::from_secs(3600);
    if !legacy {
        return Ok(minter.mint_subject("probe", role, ttl)?);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(minter.mint_claims(&betting_auth::Claims {
        sub: "0".into(),
        role: "backend".into(),
        exp: now + ttl.as_secs(),
        iat: now,
        nbf: None,
        iss: None,
        aud: None,
    })?)
}

/// A normal player betting every 25 ms, and the latencies they saw.
struct NormalPlayer {
    latencies: Arc<Mutex<Vec<f64>>>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl NormalPlayer {
    fn start(channel: Channel, token: String, round: String) -> Self {
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (latencies, errors, stop) = (latencies.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = BettingServiceClient::new(channel);
                let mut tick = tokio::time::interval(Duration::from_millis(25));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let Ok(request) = authed(
                        pb::PlaceBetRequest {
                            round_id: round.clone(),
                            side: pb::Side::A as i32,
                            amount: "0.01".into(),
                            idempotency_key: uuid::Uuid::now_v7().to_string(),
                        },
                        &token,
                    ) else {
                        continue;
                    };
                    let started = Instant::now();
                    let answer = client.place_bet(request).await;
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    match answer {
                        Ok(_) => latencies.lock().expect("latencies").push(ms),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Self {
            latencies,
            errors,
            stop,
            task,
        }
    }

    /// Latencies so far (sorted), and errors; starts a new phase.
    fn take(&self) -> (Vec<f64>, u64) {
        let mut all = std::mem::take(&mut *self.latencies.lock().expect("latencies"));
        all.sort_by(f64::total_cmp);
        (all, self.errors.swap(0, Ordering::Relaxed))
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// Peak RSS of the server while a phase runs.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: Option<u32>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(pid) = pid {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Self { peak, stop }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed) / 1024
    }
}

/// What the abuser was answered, by gRPC code.
#[derive(Default, Clone)]
struct Answers(Arc<Mutex<BTreeMap<String, u64>>>);

impl Answers {
    fn add(&self, code: Code) {
        *self
            .0
            .lock()
            .expect("answers")
            .entry(format!("{code:?}"))
            .or_default() += 1;
    }

    fn summary(&self) -> String {
        let map = self.0.lock().expect("answers");
        if map.is_empty() {
            return "nothing".into();
        }
        map.iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn report(label: &str, sorted: &[f64], errors: u64) {
    println!(
        "{label:<9} normal player's PlaceBet: n {}  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  errors {errors}",
        sorted.len(),
        percentile(sorted, 50.0),
        percentile(sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let minter = TokenMinter::new(args.jwt_secret.expose().as_bytes(), None, None);
    let ttl = Duration::from_secs(3600);
    let game = setup_token(&minter, Role::Game, args.legacy_backend_role)?;
    let cashier = setup_token(&minter, Role::Cashier, args.legacy_backend_role)?;
    let channel = connect(&args.target).await?;
    let normal_user = args.first_user;
    let normal_round = open_round(&channel, &game, "probe-normal").await?;
    fund(&channel, &cashier, &[normal_user], "100000").await?;
    // The normal player has a connection of their own, like a real client.
    let player = NormalPlayer::start(
        connect(&args.target).await?,
        minter.mint(normal_user, Role::Player, ttl)?,
        normal_round,
    );
    let phase = Duration::from_secs(args.seconds);
    tokio::time::sleep(phase).await;
    let (quiet, quiet_errors) = player.take();
    let rss_before = args.server_pid.and_then(rss_kib).unwrap_or(0) / 1024;

    let answers = Answers::default();
    let rss = RssWatch::start(args.server_pid);
    let ctx = Ctx {
        args: &args,
        minter: &minter,
        game: &game,
        cashier: &cashier,
        channel: &channel,
        answers: answers.clone(),
        phase,
    };
    let note = match args.probe {
        Probe::Streams => streams(&ctx).await?,
        Probe::ResetFlood => reset_flood(&ctx).await?,
        Probe::OnePlayer => one_player(&ctx).await?,
        Probe::LockedWallet => locked_wallet(&ctx).await?,
        Probe::GetRound => get_round(&ctx).await?,
        Probe::BigRequests => big_requests(&ctx).await?,
    };
    let (during, during_errors) = player.take();
    let rss_peak = rss.finish();
    // Let the server settle, then read its memory again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = args.server_pid.and_then(rss_kib).unwrap_or(0) / 1024;
    player.stop().await;

    println!("probe {:?}: {note}", args.probe);
    report("quiet", &quiet, quiet_errors);
    report("during", &during, during_errors);
    println!(
        "p99 ratio {:.2}   server RSS {rss_before} MB before, {rss_peak} MB peak, {rss_after} MB after",
        percentile(&during, 99.0) / percentile(&quiet, 99.0)
    );
    println!("the abuser was answered: {}", answers.summary());
    Ok(())
}

struct Ctx<'a> {
    args: &'a ProbeArgs,
    minter: &'a TokenMinter,
    /// Opens rounds.
    game: &'a str,
    /// Funds wallets.
    cashier: &'a str,
    channel: &'a Channel,
    answers: Answers,
    phase: Duration,
}

impl Ctx<'_> {
    fn player(&self, user: i64) -> anyhow::Result<String> {
        Ok(self
            .minter
            .mint(user, Role::Player, Duration::from_secs(3600))?)
    }

    fn watch_request(&self, user: i64) -> anyhow::Result<tonic::Request<pb::WatchBetsRequest>> {
        authed(pb::WatchBetsRequest::default(), &self.player(user)?)
    }
}

/// `count` WatchBets, one user each, all on one HTTP/2 connection, held for
/// the phase.
async fn streams(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let count = ctx.args.count.unwrap_or(2_000);
    let channel = connect(&ctx.args.target).await?;
    let opened = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    let deadline = Instant::now() + ctx.phase;
    for i in 0..count {
        let mut client = BettingServiceClient::new(channel.clone());
        let request = ctx.watch_request(ctx.args.first_user + 1 + i as i64)?;
        let (answers, opened) = (ctx.answers.clone(), opened.clone());
        held.push(tokio::spawn(async move {
            let open = tokio::time::timeout_at(deadline.into(), client.watch_bets(request)).await;
            match open {
                Ok(Ok(response)) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    answers.add(Code::Ok);
                    let mut stream = response.into_inner();
                    let _ = tokio::time::timeout_at(deadline.into(), async {
                        while let Some(Ok(_)) = stream.next().await {}
                    })
                    .await;
                }
                Ok(Err(status)) => answers.add(status.code()),
                // Still waiting for a stream slot when the phase ended.
                Err(_) => answers.add(Code::DeadlineExceeded),
            }
        }));
    }
    for task in held {
        let _ = task.await;
    }
    Ok(format!(
        "{count} WatchBets on one connection: {} opened within {} s",
        opened.load(Ordering::Relaxed),
        ctx.phase.as_secs()
    ))
}

/// WatchBets opened and dropped (RST_STREAM) right after the server
/// answered, 200 in flight at a time, for the phase: each one cost the
/// server a snapshot query before.
async fn reset_flood(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let concurrency = ctx.args.count.unwrap_or(200);
    let user = ctx.args.first_user + 1;
    let token = ctx.player(user)?;
    let channel = connect(&ctx.args.target).await?;
    let deadline = Instant::now() + ctx.phase;
    let opened = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (channel, token, answers, opened) = (
            channel.clone(),
            token.clone(),
            ctx.answers.clone(),
            opened.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut client = BettingServiceClient::new(channel);
            while Instant::now() < deadline {
                let Ok(request) = authed(pb::WatchBetsRequest::default(), &token) else {
                    return;
                };
                match client.watch_bets(request).await {
                    // Dropping the response resets the stream.
                    Ok(_) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        answers.add(Code::Ok);
                    }
                    Err(status) => answers.add(status.code()),
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    Ok(format!(
        "{} WatchBets opened and reset in {} s by one player, {concurrency} at a time",
        opened.load(Ordering::Relaxed),
        ctx.phase.as_secs()
    ))
}

/// Reads of the `bets` table so far (index and sequential scans), when the
/// probe may read PostgreSQL's statistics.
async fn bet_reads(pool: Option<&sqlx::PgPool>) -> Option<i64> {
    let pool = pool?;
    sqlx::query_scalar(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::BIGINT \
         FROM pg_stat_user_tables WHERE relname = 'bets'",
    )
    .fetch_one(pool)
    .await
    .ok()
}

/// `count` WatchBets of one player over 8 connections, then 6 changes to
/// that player's bets.
async fn one_player(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let count = ctx.args.count.unwrap_or(500);
    let user = ctx.args.first_user + 1;
    fund(ctx.channel, ctx.cashier, &[user], "1000").await?;
    let round = open_round(ctx.channel, ctx.game, "probe-one").await?;
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(connect(&ctx.args.target).await?);
    }
    let deadline = Instant::now() + ctx.phase;
    let received = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    for i in 0..count {
        let mut client = BettingServiceClient::new(channels[i % channels.len()].clone());
        let request = ctx.watch_request(user)?;
        let (answers, received) = (ctx.answers.clone(), received.clone());
        held.push(tokio::spawn(async move {
            match client.watch_bets(request).await {
                Ok(response) => {
                    answers.add(Code::Ok);
                    let mut stream = response.into_inner();
                    let _ = tokio::time::timeout_at(deadline.into(), async {
                        while let Some(Ok(_)) = stream.next().await {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .await;
                }
                Err(status) => answers.add(status.code()),
            }
        }));
    }
    let pool = match &ctx.args.database_url {
        Some(url) => Some(sqlx::PgPool::connect(url.expose()).await?),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reads_before = bet_reads(pool.as_ref()).await;
    let mut bets = BettingServiceClient::new(ctx.channel.clone());
    let token = ctx.player(user)?;
    for i in 0..3 {
        let placed = bets
            .place_bet(authed(
                pb::PlaceBetRequest {
                    round_id: round.clone(),
                    side: pb::Side::A as i32,
                    amount: "1".into(),
                    idempotency_key: format!("probe-one-{i}-{}", uuid::Uuid::now_v7()),
                },
                &token,
            )?)
            .await?
            .into_inner()
            .bet
            .context("a bet")?;
        // PENDING, then CANCELLED (and refunded): two changes each.
        bets.cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: placed.bet_id,
            },
            &token,
        )?)
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads_after = bet_reads(pool.as_ref()).await;
    for task in held {
        let _ = task.await;
    }
    let reads = match (reads_before, reads_after) {
        (Some(a), Some(b)) => format!("{} reads of bets during the changes", b - a),
        _ => "reads not counted (no --database-url)".into(),
    };
    Ok(format!(
        "{count} WatchBets of one player, 6 changes: {} events delivered, {reads}",
        received.load(Ordering::Relaxed)
    ))
}

/// A wallet row held FOR UPDATE (as a slow transaction would) while its
/// owner places `count` bets at once.
async fn locked_wallet(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let count = ctx.args.count.unwrap_or(50);
    let url = ctx
        .args
        .database_url
        .as_ref()
        .context("the locked-wallet probe needs --database-url to hold the row")?;
    let user = ctx.args.first_user + 1;
    fund(ctx.channel, ctx.cashier, &[user], "1000").await?;
    let round = open_round(ctx.channel, ctx.game, "probe-locked").await?;
    let pool = sqlx::PgPool::connect(url.expose()).await?;
    let mut held = pool.begin().await?;
    sqlx::query("SELECT 1 FROM wallets WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *held)
        .await?;
    let token = ctx.player(user)?;
    let mut calls = Vec::new();
    for i in 0..count {
        let mut client = BettingServiceClient::new(ctx.channel.clone());
        let request = authed(
            pb::PlaceBetRequest {
                round_id: round.clone(),
                side: pb::Side::A as i32,
                amount: "1".into(),
                idempotency_key: format!("probe-locked-{i}-{}", uuid::Uuid::now_v7()),
            },
            &token,
        )?;
        let answers = ctx.answers.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let code = match client.place_bet(request).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            answers.add(code);
            started.elapsed()
        }));
    }
    tokio::time::sleep(ctx.phase).await;
    held.rollback().await?;
    let mut longest = Duration::ZERO;
    for call in calls {
        longest = longest.max(call.await.unwrap_or_default());
    }
    Ok(format!(
        "{count} PlaceBets behind a held wallet row for {} s; the longest waited {:.1} s",
        ctx.phase.as_secs(),
        longest.as_secs_f64()
    ))
}

/// A round of `5,000` bets (50 players × 100), then `count` clients calling
/// GetRound on it as fast as they can for the phase.
async fn get_round(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let clients = ctx.args.count.unwrap_or(20);
    let round = open_round(ctx.channel, ctx.game, "probe-round").await?;
    let users: Vec<i64> = (0..50).map(|i| ctx.args.first_user + 100 + i).collect();
    fund(ctx.channel, ctx.cashier, &users, "1000").await?;
    println!("placing 5,000 bets");
    let mut placements = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let token = ctx.player(*user)?;
        for i in 0..100 {
            placements.push((token.clone(), u, i));
        }
    }
    stream::iter(placements)
        .map(|(token, u, i)| {
            let mut client = BettingServiceClient::new(ctx.channel.clone());
            let round = round.clone();
            async move {
                let side = if u % 2 == 0 { pb::Side::A } else { pb::Side::B };
                // Different stakes never match: the round keeps 5,000 bets.
                let amount = format!("{}.{:02}", 1 + u, i);
                let request = authed(
                    pb::PlaceBetRequest {
                        round_id: round,
                        side: side as i32,
                        amount,
                        idempotency_key: uuid::Uuid::now_v7().to_string(),
                    },
                    &token,
                )?;
                client.place_bet(request).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let deadline = Instant::now() + ctx.phase;
    let calls = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..clients {
        let mut client = SettlementServiceClient::new(ctx.channel.clone());
        let (round, token, answers, calls) = (
            round.clone(),
            ctx.player(ctx.args.first_user + 99)?,
            ctx.answers.clone(),
            calls.clone(),
        );
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let Ok(request) = authed(
                    pb::GetRoundRequest {
                        round_id: round.clone(),
                    },
                    &token,
                ) else {
                    return;
                };
                let code = match client.get_round(request).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                answers.add(code);
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    Ok(format!(
        "{clients} clients, {} GetRound calls on a 5,000-bet round in {} s",
        calls.load(Ordering::Relaxed),
        ctx.phase.as_secs()
    ))
}

/// `count` anonymous 4 MiB requests at once, half health, half reflection.
async fn big_requests(ctx: &Ctx<'_>) -> anyhow::Result<String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let count = ctx.args.count.unwrap_or(100);
    let big = "x".repeat(4 * 1024 * 1024 - 64);
    let longest_message = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for i in 0..count {
        let channel = connect(&ctx.args.target).await?;
        let (big, answers, longest) = (big.clone(), ctx.answers.clone(), longest_message.clone());
        calls.push(tokio::spawn(async move {
            let status = if i % 2 == 0 {
                HealthClient::new(channel)
                    .check(HealthCheckRequest { service: big })
                    .await
                    .err()
            } else {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::FileContainingSymbol(big)),
                };
                match ServerReflectionClient::new(channel)
                    .max_decoding_message_size(64 << 20)
                    .server_reflection_info(stream::iter([request]))
                    .await
                {
                    Err(status) => Some(status),
                    Ok(response) => {
                        let mut stream = response.into_inner();
                        match stream.message().await {
                            Ok(Some(answer)) => {
                                // An error answer may echo the symbol.
                                if let Some(MessageResponse::ErrorResponse(e)) =
                                    answer.message_response
                                {
                                    longest
                                        .fetch_max(e.error_message.len() as u64, Ordering::Relaxed);
                                }
                                None
                            }
                            Ok(None) => None,
                            Err(status) => Some(status),
                        }
                    }
                }
            };
            match status {
                Some(status) => {
                    longest.fetch_max(status.message().len() as u64, Ordering::Relaxed);
                    answers.add(status.code());
                }
                None => answers.add(Code::Ok),
            }
        }));
    }
    for call in calls {
        let _ = call.await;
    }
    Ok(format!(
        "{count} anonymous 4 MiB requests (health, reflection); the longest text answered was {} bytes",
        longest_message.load(Ordering::Relaxed)
    ))
}
