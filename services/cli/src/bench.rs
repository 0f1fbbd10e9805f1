//! Benchmarks against a running suite, and the helpers they share.
//!
//! `betting bench place|settle|scenario` live in `load.rs`.
//!
//! `betting bench streams`: how fast bet changes reach live streams.
//!
//! Against a running suite: opens N WatchBets streams (one user each, many
//! streams per HTTP/2 connection), places bets for those users so that they
//! match, and measures, for every change event a stream receives, the time
//! from the change's transaction (the bet's `updated_at`) to its arrival. It
//! reports p50/p90/p99 delivery latency and, given the server's pid, the
//! server's memory per open stream. A benchmark, not a test: it asserts
//! nothing and only talks to the address it is given (loopback by default).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use betting_api::pb::{
    self, betting_service_client::BettingServiceClient,
    settlement_service_client::SettlementServiceClient, wallet_service_client::WalletServiceClient,
};
use betting_auth::{Role, TokenMinter};
use futures::{StreamExt, stream};
use tonic::{Request, transport::Channel};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The suite to measure.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Streams to open, one user each.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Bets to place while the streams are open.
    #[arg(long, default_value_t = 2000)]
    bets: usize,
    /// Bets per second to aim for.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Streams per HTTP/2 connection: at most the server's
    /// BETTING_CONNECTION_MAX_STREAMS (64 by default).
    #[arg(long, default_value_t = 64)]
    streams_per_connection: usize,
    /// The server's process id, to report its memory per stream.
    #[arg(long)]
    server_pid: Option<u32>,
    /// First user id used (users FIRST..FIRST+streams get 1000 each).
    #[arg(long, default_value_t = 1_000_000)]
    first_user: i64,
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    jwt_secret: betting_config::Secret,
}

pub(crate) fn authed<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) async fn connect(target: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(target.to_owned())?
        .connect()
        .await
        .context("cannot reach the suite")
}

/// Opens a round of the benchmark's own.
pub(crate) async fn open_round(
    channel: &Channel,
    game: &str,
    prefix: &str,
) -> anyhow::Result<String> {
    let round = format!("{prefix}-{}", uuid::Uuid::now_v7().simple());
    SettlementServiceClient::new(channel.clone())
        .open_round(authed(
            pb::OpenRoundRequest {
                round_id: round.clone(),
            },
            game,
        )?)
        .await?;
    Ok(round)
}

/// Deposits `amount` into every user's wallet, 32 at a time.
pub(crate) async fn fund(
    channel: &Channel,
    cashier: &str,
    users: &[i64],
    amount: &str,
) -> anyhow::Result<()> {
    eprintln!("funding {} users", users.len());
    stream::iter(users.iter().copied())
        .map(|user| {
            let mut wallet = WalletServiceClient::new(channel.clone());
            async move {
                wallet
                    .deposit(authed(
                        pb::DepositRequest {
                            user_id: user,
                            amount: amount.into(),
                            idempotency_key: format!("bench-{}", uuid::Uuid::now_v7()),
                            reference: "bench".into(),
                        },
                        cashier,
                    )?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

/// Prints p50/p90/p99/max of sorted milliseconds.
fn print_latency(label: &str, sorted: &[f64]) {
    println!(
        "{label:<20}p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        percentile(sorted, 50.0),
        percentile(sorted, 90.0),
        percentile(sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
}

pub async fn streams(args: BenchArgs) -> anyhow::Result<()> {
    let minter = TokenMinter::new(args.jwt_secret.expose().as_bytes(), None, None);
    let ttl = Duration::from_secs(3600);
    // The bench opens its round as a game server and funds its users as
    // the cashier, like any client of those roles.
    let game = minter
        .mint_subject("bench", Role::Game, ttl)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cashier = minter
        .mint_subject("bench", Role::Cashier, ttl)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let control = connect(&args.target).await?;
    let round = open_round(&control, &game, "bench").await?;
    let users: Vec<i64> = (0..args.streams as i64)
        .map(|i| args.first_user + i)
        .collect();
    fund(&control, &cashier, &users, "1000").await?;

    let rss_before = args.server_pid.and_then(rss_kib);
    println!("opening {} streams", users.len());
    let connections = users.len().div_ceil(args.streams_per_connection.max(1));
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&args.target).await?);
    }
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    // Opens the server shed (RESOURCE_EXHAUSTED, UNAVAILABLE) and this
    // client retried, as a game client does, and opens that failed for good.
    let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(users.len());
    let mut readers = tokio::task::JoinSet::new();
    for (i, user) in users.iter().copied().enumerate() {
        let channel = channels[i / args.streams_per_connection.max(1)].clone();
        let token = minter
            .mint(user, Role::Player, ttl)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let latencies = latencies.clone();
        let ready = ready_tx.clone();
        let (retried, failed) = (retried.clone(), failed.clone());
        readers.spawn(async move {
            let mut client = BettingServiceClient::new(channel);
            let mut attempt = 0u32;
            let response = loop {
                let Ok(request) = authed(pb::WatchBetsRequest::default(), &token) else {
                    return;
                };
                match client.watch_bets(request).await {
                    Ok(response) => break response,
                    Err(status)
                        if attempt < 10
                            && matches!(
                                status.code(),
                                tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                            ) =>
                    {
                        attempt += 1;
                        retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Spread out, as clients with jittered backoff are.
                        let jitter = u64::try_from(user % 50).unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(
                            (50 << attempt.min(5)) + jitter * 4,
                        ))
                        .await;
                    }
                    Err(status) => {
                        if let Ok(mut f) = failed.lock() {
                            f.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                        return;
                    }
                }
            };
            let mut events = response.into_inner();
            while let Ok(Some(event)) = events.message().await {
                if event.r#type == pb::WatchEventType::SnapshotEnd as i32 {
                    let _ = ready.send(()).await;
                }
                if event.r#type != pb::WatchEventType::Change as i32 {
                    continue;
                }
                let Some(changed) = event.bet.and_then(|b| b.updated_at) else {
                    continue;
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let at = Duration::new(changed.seconds.max(0) as u64, changed.nanos.max(0) as u32);
                let ms = now.saturating_sub(at).as_secs_f64() * 1000.0;
                if let Ok(mut l) = latencies.lock() {
                    l.push(ms);
                }
            }
        });
    }
    drop(ready_tx);
    let opened_at = Instant::now();
    let mut ready = 0;
    while ready < users.len() {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let retries = retried.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{ready} streams open in {:.1} s ({retries} opens shed by the server and retried)",
        opened_at.elapsed().as_secs_f64()
    );
    if let Ok(failed) = failed.lock()
        && let Some(first) = failed.first()
    {
        println!("{} opens failed, e.g. {first}", failed.len());
    }
    let rss_open = args.server_pid.and_then(rss_kib);

    println!(
        "placing {} bets at up to {} per second",
        args.bets, args.rate
    );
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let placed = stream::iter(0..args.bets)
        .map(|i| {
            let user = users[i % users.len()];
            let side = if (i / users.len()) % 2 == (i % 2) {
                pb::Side::A
            } else {
                pb::Side::B
            };
            let token = minter.mint(user, Role::Player, ttl);
            let mut client = BettingServiceClient::new(control.clone());
            let round = round.clone();
            let due = started + interval * i as u32;
            async move {
                tokio::time::sleep_until(due.into()).await;
                let token = token.map_err(|e| anyhow::anyhow!("{e}"))?;
                client
                    .place_bet(authed(
                        pb::PlaceBetRequest {
                            round_id: round,
                            side: side as i32,
                            amount: "1".into(),
                            idempotency_key: format!("bench-{i}"),
                        },
                        &token,
                    )?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let driven = started.elapsed();
    let failures = placed.iter().filter(|r| r.is_err()).count();
    // Let the last matches arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    readers.abort_all();

    let mut all = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    all.sort_by(f64::total_cmp);
    println!();
    println!("streams open        {ready}");
    println!(
        "bets placed         {} in {:.1} s ({:.0}/s), {failures} failed",
        args.bets - failures,
        driven.as_secs_f64(),
        (args.bets - failures) as f64 / driven.as_secs_f64()
    );
    println!("change events       {}", all.len());
    print_latency("delivery latency", &all);
    if let (Some(before), Some(open)) = (rss_before, rss_open) {
        println!(
            "server memory       {} KiB before, {} KiB with streams open: {:.1} KiB per stream",
            before,
            open,
            (open.saturating_sub(before)) as f64 / ready.max(1) as f64
        );
    }
    Ok(())
}
