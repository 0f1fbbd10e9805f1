//! `betting bench place|settle|scenario`: load against a running suite.
//!
//! Every run prepares users of its own and one round of its own, drives
//! PlaceBet, and then follows the round to its end with the server's own
//! figures:
//!
//! 1. **placing** — closed loop (each client a user of its own, betting back
//!    to back) or open loop (`--rate`: bets *scheduled* at a fixed rate,
//!    round-robin over the users, each sent at its time in a task of its own
//!    whether or not earlier ones answered; latency counts from the scheduled
//!    time, so a slow server cannot hide its queue: no coordinated omission);
//! 2. **matching** — GetRound until `pending_bets` stops falling; then every
//!    MATCHED bet of the round, read back with ListBets, gives the match
//!    latency: the match's time (its bets' `updated_at`) less the later of its
//!    two bets' `created_at`, both server clocks;
//! 3. **settling** — SettleRound, timed as a call, then GetRound until every
//!    match is paid and no job is outstanding: the drain;
//! 4. **audit** — AdminService.RunAudit on the books afterwards.
//!
//! A benchmark, not a test: it asserts nothing, every loop is bounded in
//! count and time, and it only talks to `--target` (loopback by default).

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use betting_api::pb::{
    self, admin_service_client::AdminServiceClient, betting_service_client::BettingServiceClient,
    settlement_service_client::SettlementServiceClient,
};
use betting_auth::{Role, TokenMinter};
use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tonic::{Code, transport::Channel};

use crate::bench::{authed, connect, fund, open_round, percentile};

mod resilience;

/// Open-loop requests in flight at most; a bet due while this many are
/// still unanswered is not sent and counts as an error (`SKIPPED`).
const MAX_IN_FLIGHT: usize = 10_000;
/// The deadline each PlaceBet carries (`grpc-timeout`).
const BET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long matching may take to settle down after the load.
const MATCH_WAIT: Duration = Duration::from_secs(60);
/// Matching is over once `pending_bets` has not fallen for this long.
const MATCH_STALL: Duration = Duration::from_secs(2);
/// How long the payouts of a settled round may take.
const SETTLE_WAIT: Duration = Duration::from_secs(300);
/// Bets `bench settle` has in flight at once.
const SETTLE_CONCURRENCY: usize = 64;
/// Each user's deposit: far more than any run stakes at "1" a bet.
const FUNDS: &str = "1000000";

#[derive(clap::Args)]
pub struct Common {
    /// The suite to measure.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// HTTP/2 connections the clients share (each carries at most the
    /// server's BETTING_CONNECTION_MAX_STREAMS requests at once, 64 by default).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// First user id used; the run uses the next `--clients` (or `--users`) ids.
    #[arg(long, default_value_t = 5_000_000)]
    first_user: i64,
    /// Print exactly one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// A process tree whose CPU time to report for the load's window, as
    /// NAME=PID (repeatable; e.g. `--cpu server=PID --cpu postgres=PID` with
    /// the postmaster's pid). The bench's own process is always reported.
    #[arg(long = "cpu", value_name = "NAME=PID", value_parser = crate::cpu::parse_root)]
    cpu: Vec<(String, u32)>,
    /// The suite's token key (`scenario resilience` starts a suite of its
    /// own and uses its key instead).
    #[arg(long, env = "BETTING_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<betting_config::Secret>,
}

/// Where the run's calls go, and the key its tokens are signed with: one
/// address for a whole suite (`--target`), or each service its own (the
/// resilience scenario's cluster).
struct Targets {
    betting: String,
    settlement: String,
    wallet: String,
    secret: String,
}

impl Targets {
    fn of(common: &Common) -> anyhow::Result<Self> {
        let secret = common
            .jwt_secret
            .as_ref()
            .context("the suite's token key is needed: --jwt-secret or BETTING_JWT_SECRET")?;
        Ok(Self {
            betting: common.target.clone(),
            settlement: common.target.clone(),
            wallet: common.target.clone(),
            secret: secret.expose().to_owned(),
        })
    }
}

#[derive(clap::Args)]
pub struct PlaceArgs {
    /// Users, one per client. Clients bet far faster than the per-user limits
    /// allow: run the server with `BETTING_USER_BET_RATE=0
    /// BETTING_USER_MAX_OPEN_BETS=0`.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Open loop: bets per second in all, scheduled round-robin over the
    /// users. Without it, each client bets back to back (closed loop).
    #[arg(long)]
    rate: Option<f64>,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
pub struct SettleArgs {
    /// Matches to make and settle: N bets on A and N on B.
    #[arg(long, default_value_t = 1000)]
    matches: usize,
    /// Users the bets are spread over.
    #[arg(long, default_value_t = 100)]
    users: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Scenario {
    /// 1,000 users, 200 bets per second, for 5 s (open loop).
    Burst,
    /// 200 users, 100 bets per second, for `--seconds` (60 by default).
    Sustained,
    /// 200 users, 100 bets per second, for `--seconds` (30 by default),
    /// while matchers and settlers are killed and restarted; it starts a
    /// suite of its own (`betting chaos`'s processes) to kill them in.
    Resilience,
}

#[derive(clap::Args)]
pub struct ScenarioArgs {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Seconds of load (burst: 5, sustained: 60, resilience: 30 by default).
    #[arg(long)]
    seconds: Option<u64>,
    #[command(flatten)]
    common: Common,
}

/// What one run measures; `--json` prints it as is.
#[derive(Serialize, Default)]
struct Report {
    bench: &'static str,
    round_id: String,
    clients: usize,
    connections: usize,
    /// The seconds of load asked for (`bench settle`: how long placing took).
    seconds: f64,
    /// Bets per second scheduled; null for a closed loop.
    rate: Option<f64>,
    /// From the first bet sent to the last one answered.
    elapsed_s: f64,
    /// Open loop: bets scheduled (placed + errors).
    scheduled: Option<u64>,
    placed: u64,
    placed_per_sec: f64,
    errors: u64,
    /// gRPC code name → count; `SKIPPED` for open-loop bets never sent
    /// because too many were in flight.
    error_codes: BTreeMap<String, u64>,
    latency_ms: Latency,
    match_latency_ms: Latency,
    /// Matches whose two bets were both read back.
    match_latency_samples: usize,
    /// Of those, matches whose time is before their later bet's creation.
    /// Both are transaction start times (`now()`), and a matcher transaction
    /// starts before it waits for the round's lock, so a bet created during
    /// that wait can be matched "before" it was created: the figure is low
    /// by up to the lock wait.
    match_latency_negative: usize,
    /// `pending_bets` when matching was taken to be over.
    pending_after_matching: i64,
    matches: i64,
    settled_matches: i64,
    settle_call_ms: Option<f64>,
    settle_drain_s: Option<f64>,
    settled_per_sec: Option<f64>,
    /// Every match paid and nothing outstanding within the bound.
    settle_complete: bool,
    audit_clean: Option<bool>,
    audit_checks_run: i32,
    /// The check name of every violation found, one entry per violation.
    audit_violations: Vec<String>,
    /// CPU per process tree while the load ran (`--cpu`).
    cpu: Option<crate::cpu::CpuUse>,
    /// `scenario resilience`: the worker faults, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_faults: Option<Vec<resilience::WorkerFault>>,
    /// `scenario resilience`: exits of the suite's processes the run did
    /// not cause (each one a failure of the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    unexpected_exits: Option<Vec<String>>,
}

#[derive(Serialize, Default)]
struct Latency {
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
}

impl Latency {
    /// From milliseconds, sorted ascending; null figures for no samples.
    fn of(sorted: &[f64]) -> Self {
        let at = |p| finite(percentile(sorted, p));
        Self {
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: sorted.last().copied().and_then(finite),
        }
    }

    fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        format!(
            "p50 {}   p90 {}   p99 {}   max {}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// A figure rounded to microseconds (of a millisecond) for the report; none
/// when it is not a number.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then(|| (v * 1000.0).round() / 1000.0)
}

/// The canonical name of a gRPC status code, as in the gRPC spec.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Latencies of answered bets and counts of the failed ones.
#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, outcome: Result<f64, &'static str>) {
        match outcome {
            Ok(ms) => self.latencies.push(ms),
            Err(code) => *self.errors.entry(code.to_owned()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Answered and failed bets so far, for the progress bar.
#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn count(&self, outcome: &Result<f64, &'static str>) {
        let counter = if outcome.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn message(&self) -> String {
        format!(
            "{} placed, {} errors",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// A bar on stderr, or none at all with `--json` or when stderr is not a
/// terminal.
fn progress(json: bool, len: u64, template: &str) -> ProgressBar {
    let target = if json || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Users, their tokens and a round, ready for load.
struct Setup {
    game: String,
    admin: String,
    /// BettingService's connections, the clients' and the read-back's.
    channels: Vec<Channel>,
    /// SettlementService and AdminService.
    settlement: Channel,
    round: String,
    users: Vec<i64>,
    tokens: Vec<String>,
    /// Prefix of this run's idempotency keys, so that a rerun with the same
    /// users never replays an earlier run's bets.
    run: String,
}

async fn prepare(
    common: &Common,
    targets: &Targets,
    users: usize,
    prefix: &str,
) -> anyhow::Result<Setup> {
    anyhow::ensure!(users > 0, "at least one user is needed");
    let minter = TokenMinter::new(targets.secret.as_bytes(), None, None);
    let ttl = Duration::from_secs(3600);
    let mint = |subject: &str, role| {
        minter
            .mint_subject(subject, role, ttl)
            .map_err(|e| anyhow::anyhow!("cannot mint a {role:?} token: {e}"))
    };
    // The bench opens its round as a game server, funds its users as the
    // cashier and reads everyone's bets as an operator, like any client of
    // those roles.
    let game = mint("bench", Role::Game)?;
    let cashier = mint("bench", Role::Cashier)?;
    let admin = mint("bench", Role::Admin)?;
    let mut channels = Vec::new();
    for _ in 0..common.connections.max(1) {
        channels.push(connect(&targets.betting).await?);
    }
    let settlement = connect(&targets.settlement).await?;
    let round = open_round(&settlement, &game, prefix).await?;
    let users: Vec<i64> = (0..users as i64).map(|i| common.first_user + i).collect();
    let tokens = users
        .iter()
        .map(|user| mint(&user.to_string(), Role::Player))
        .collect::<anyhow::Result<Vec<_>>>()?;
    fund(&connect(&targets.wallet).await?, &cashier, &users, FUNDS).await?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    Ok(Setup {
        game,
        admin,
        channels,
        settlement,
        round,
        users,
        tokens,
        run: run[run.len() - 12..].to_owned(),
    })
}

/// One PlaceBet at stake "1"; the error is the answer's code name.
async fn place_one(
    client: &mut BettingServiceClient<Channel>,
    token: &str,
    round: &str,
    side: pb::Side,
    key: String,
) -> Result<(), &'static str> {
    let mut request = authed(
        pb::PlaceBetRequest {
            round_id: round.to_owned(),
            side: side as i32,
            amount: "1".into(),
            idempotency_key: key,
        },
        token,
    )
    .map_err(|_| "BAD_TOKEN")?;
    request.set_timeout(BET_TIMEOUT);
    client
        .place_bet(request)
        .await
        .map(|_| ())
        .map_err(|status| code_name(status.code()))
}

fn side(n: u64) -> pb::Side {
    if n.is_multiple_of(2) {
        pb::Side::A
    } else {
        pb::Side::B
    }
}

/// Moves the load bar along with the clock until dropped.
struct Ticker(tokio::task::JoinHandle<()>);

impl Ticker {
    fn start(bar: ProgressBar, counters: Arc<Counters>, started: Instant) -> Self {
        Self(tokio::spawn(async move {
            loop {
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(counters.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closed loop: each user's client places bets back to back until the time
/// is up; latency is each call's own.
async fn closed_loop(setup: &Setup, seconds: u64, counters: &Arc<Counters>) -> (Tally, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut clients = tokio::task::JoinSet::new();
    for (i, token) in setup.tokens.iter().enumerate() {
        let mut client =
            BettingServiceClient::new(setup.channels[i % setup.channels.len()].clone());
        let (token, round, run) = (token.clone(), setup.round.clone(), setup.run.clone());
        let counters = counters.clone();
        clients.spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0_u64;
            while Instant::now() < deadline {
                // Each user alternates sides, half the users starting on A.
                let side = side(i as u64 + n);
                let sent = Instant::now();
                let outcome = place_one(&mut client, &token, &round, side, format!("{run}-{n}"))
                    .await
                    .map(|()| sent.elapsed().as_secs_f64() * 1000.0);
                counters.count(&outcome);
                tally.record(outcome);
                n += 1;
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(done) = clients.join_next().await {
        match done {
            Ok(tally) => all.merge(tally),
            Err(_) => all.record(Err("CLIENT_PANICKED")),
        }
    }
    (all, started.elapsed())
}

/// Open loop: bet `k` is due at `k / rate` seconds, for user `k mod N`, and
/// is sent at that time in a task of its own; its latency counts from the
/// time it was due. At most [`MAX_IN_FLIGHT`] are unanswered at once.
async fn open_loop(
    setup: &Setup,
    seconds: u64,
    rate: f64,
    counters: &Arc<Counters>,
) -> (Tally, Duration, u64) {
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let clients: Vec<_> = setup
        .channels
        .iter()
        .map(|c| BettingServiceClient::new(c.clone()))
        .collect();
    let users = setup.users.len() as u64;
    let total = (rate * seconds as f64).floor() as u64;
    let started = Instant::now();
    let due = |k: u64| started + Duration::from_secs_f64(k as f64 / rate);
    let mut k = 0_u64;
    while k < total {
        tokio::time::sleep_until(due(k).into()).await;
        let now = Instant::now();
        // Everything due by now goes out at once, however late the timer woke.
        while k < total && due(k) <= now {
            let at = due(k);
            let user = (k % users) as usize;
            // A user's j-th bet: sides alternate per user, half the users
            // starting on A.
            let side = side(k / users + user as u64);
            match in_flight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let mut client = clients[user % clients.len()].clone();
                    let token = setup.tokens[user].clone();
                    let round = setup.round.clone();
                    let key = format!("{}-{k}", setup.run);
                    let (tally, counters) = (tally.clone(), counters.clone());
                    tokio::spawn(async move {
                        let outcome = place_one(&mut client, &token, &round, side, key)
                            .await
                            .map(|()| at.elapsed().as_secs_f64() * 1000.0);
                        counters.count(&outcome);
                        if let Ok(mut t) = tally.lock() {
                            t.record(outcome);
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    let outcome = Err("SKIPPED");
                    counters.count(&outcome);
                    if let Ok(mut t) = tally.lock() {
                        t.record(outcome);
                    }
                }
            }
            k += 1;
        }
    }
    // Every request carries a deadline, so this wait ends; it is bounded anyway.
    let all = MAX_IN_FLIGHT as u32;
    let _ = tokio::time::timeout(BET_TIMEOUT * 2, in_flight.acquire_many(all)).await;
    let elapsed = started.elapsed();
    let tally = match tally.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(_) => Tally::default(),
    };
    (tally, elapsed, total)
}

/// `bench settle`'s placing: `2 × matches` bets, alternately A and B, spread
/// over the users, [`SETTLE_CONCURRENCY`] at a time.
async fn place_pairs(setup: &Setup, matches: usize, json: bool) -> (Tally, Duration) {
    let bets = 2 * matches as u64;
    let bar = progress(json, bets, "placing {bar:40} {pos}/{len} bets {msg}");
    let users = setup.users.len() as u64;
    let started = Instant::now();
    let outcomes = stream::iter(0..bets)
        .map(|k| {
            // Bet k is on A when k is even: exactly `matches` on each side.
            // Each user gets one bet per pass over the users, with (for an
            // even number of users) its side alternating from pass to pass.
            let user = ((k + k / users) % users) as usize;
            let mut client =
                BettingServiceClient::new(setup.channels[user % setup.channels.len()].clone());
            let token = &setup.tokens[user];
            let round = &setup.round;
            let key = format!("{}-{k}", setup.run);
            let bar = &bar;
            async move {
                let sent = Instant::now();
                let outcome = place_one(&mut client, token, round, side(k), key)
                    .await
                    .map(|()| sent.elapsed().as_secs_f64() * 1000.0);
                bar.inc(1);
                outcome
            }
        })
        .buffer_unordered(SETTLE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let mut tally = Tally::default();
    for outcome in outcomes {
        tally.record(outcome);
    }
    (tally, elapsed)
}

async fn get_round(channel: &Channel, token: &str, round: &str) -> anyhow::Result<pb::RoundStats> {
    let response = SettlementServiceClient::new(channel.clone())
        .get_round(authed(
            pb::GetRoundRequest {
                round_id: round.to_owned(),
            },
            token,
        )?)
        .await
        .context("GetRound")?;
    response
        .into_inner()
        .round
        .and_then(|r| r.stats)
        .context("GetRound answered without the round's stats")
}

/// Waits, bounded by [`MATCH_WAIT`], until `pending_bets` is below 2, or
/// `matches` reaches `want`, or `pending_bets` has not fallen for
/// [`MATCH_STALL`]; returns the last stats read.
async fn wait_for_matching(
    setup: &Setup,
    want: Option<i64>,
    stall: Duration,
) -> anyhow::Result<pb::RoundStats> {
    let started = Instant::now();
    let mut lowest = i64::MAX;
    let mut since = Instant::now();
    loop {
        let stats = get_round(&setup.settlement, &setup.game, &setup.round).await?;
        if stats.pending_bets < 2 || want.is_some_and(|w| stats.matches >= w) {
            return Ok(stats);
        }
        if stats.pending_bets < lowest {
            lowest = stats.pending_bets;
            since = Instant::now();
        } else if since.elapsed() >= stall || started.elapsed() >= MATCH_WAIT {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A MATCHED bet as read back: its match and its two server times, in
/// nanoseconds since the epoch.
struct MatchedBet {
    match_id: String,
    created_ns: i128,
    updated_ns: i128,
}

/// A wire timestamp (seconds and nanoseconds) in nanoseconds since the epoch.
fn nanos(seconds: i64, nanos: i32) -> i128 {
    i128::from(seconds) * 1_000_000_000 + i128::from(nanos)
}

/// Every MATCHED bet of the round, user by user, 500 a page.
async fn matched_bets(setup: &Setup) -> anyhow::Result<Vec<MatchedBet>> {
    let pages = stream::iter(setup.users.iter().copied())
        .map(|user| {
            let mut client = BettingServiceClient::new(setup.channels[0].clone());
            let (admin, round) = (&setup.admin, &setup.round);
            async move {
                let mut bets = Vec::new();
                let mut page_token = String::new();
                // Bounded: a user has far fewer than 10,000 pages of bets.
                for _ in 0..10_000 {
                    let page = client
                        .list_bets(authed(
                            pb::ListBetsRequest {
                                round_id: round.clone(),
                                status: pb::BetStatus::Matched as i32,
                                page_size: 500,
                                page_token: page_token.clone(),
                                user_id: user,
                            },
                            admin,
                        )?)
                        .await
                        .context("ListBets")?
                        .into_inner();
                    for bet in page.bets {
                        let (Some(created), Some(updated)) = (bet.created_at, bet.updated_at)
                        else {
                            continue;
                        };
                        bets.push(MatchedBet {
                            match_id: bet.match_id,
                            created_ns: nanos(created.seconds, created.nanos),
                            updated_ns: nanos(updated.seconds, updated.nanos),
                        });
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                anyhow::Ok(bets)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut all = Vec::new();
    for page in pages {
        all.extend(page?);
    }
    Ok(all)
}

/// Match latency in milliseconds, sorted: for every match both of whose
/// bets were read, the match time (the later `updated_at` of the two; they
/// are the same row change) less the later of the two `created_at`.
fn match_latencies(bets: &[MatchedBet]) -> Vec<f64> {
    let mut matches: HashMap<&str, (u32, i128, i128)> = HashMap::new();
    for bet in bets.iter().filter(|b| !b.match_id.is_empty()) {
        let entry = matches
            .entry(&bet.match_id)
            .or_insert((0, i128::MIN, i128::MIN));
        entry.0 += 1;
        entry.1 = entry.1.max(bet.created_ns);
        entry.2 = entry.2.max(bet.updated_ns);
    }
    let mut latencies: Vec<f64> = matches
        .values()
        .filter(|(seen, _, _)| *seen == 2)
        .map(|(_, created, matched)| (matched - created) as f64 / 1e6)
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

struct Settled {
    call_ms: f64,
    drain_s: f64,
    complete: bool,
    stats: pb::RoundStats,
}

/// SettleRound (A wins), then GetRound until every match is paid and nothing
/// is outstanding, bounded by [`SETTLE_WAIT`].
async fn settle_round(setup: &Setup, json: bool) -> anyhow::Result<Settled> {
    let mut client = SettlementServiceClient::new(setup.settlement.clone());
    let request = authed(
        pb::SettleRoundRequest {
            round_id: setup.round.clone(),
            winning_side: pb::Side::A as i32,
        },
        &setup.game,
    )?;
    let sent = Instant::now();
    client.settle_round(request).await.context("SettleRound")?;
    let call_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let bar = progress(json, 0, "paying  {bar:40} {pos}/{len} matches {msg}");
    let (stats, complete) = loop {
        let stats = get_round(&setup.settlement, &setup.game, &setup.round).await?;
        bar.set_length(stats.matches.max(0) as u64);
        bar.set_position(stats.settled_matches.max(0) as u64);
        bar.set_message(format!("{} jobs outstanding", stats.outstanding_jobs));
        if stats.outstanding_jobs == 0 && stats.settled_matches == stats.matches {
            break (stats, true);
        }
        if sent.elapsed() >= SETTLE_WAIT {
            break (stats, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain_s = sent.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(Settled {
        call_ms,
        drain_s,
        complete,
        stats,
    })
}

/// AdminService.RunAudit: clean or not, checks run, each violation's check.
async fn audit(setup: &Setup) -> anyhow::Result<(bool, i32, Vec<String>)> {
    let mut request = authed(pb::RunAuditRequest {}, &setup.admin)?;
    request.set_timeout(Duration::from_secs(300));
    let report = AdminServiceClient::new(setup.settlement.clone())
        .run_audit(request)
        .await
        .context("RunAudit")?
        .into_inner();
    let checks = report.violations.into_iter().map(|v| v.check).collect();
    Ok((report.clean, report.checks_run, checks))
}

/// Matching, match latency, settling and the audit, after the load.
async fn follow_round(
    setup: &Setup,
    report: &mut Report,
    want_matches: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    follow_matching(setup, report, want_matches).await?;
    follow_settling(setup, report, json).await
}

/// Waits for matching to finish; then the match latency.
async fn follow_matching(
    setup: &Setup,
    report: &mut Report,
    want_matches: Option<i64>,
) -> anyhow::Result<()> {
    eprintln!("waiting for matching to finish");
    let stall = if want_matches.is_some() {
        MATCH_STALL * 5
    } else {
        MATCH_STALL
    };
    let stats = wait_for_matching(setup, want_matches, stall).await?;
    report.pending_after_matching = stats.pending_bets;
    report.matches = stats.matches;
    eprintln!(
        "{} matches, {} bets still pending; reading the matched bets back",
        stats.matches, stats.pending_bets
    );
    let latencies = match_latencies(&matched_bets(setup).await?);
    report.match_latency_samples = latencies.len();
    report.match_latency_negative = latencies.iter().filter(|ms| **ms < 0.0).count();
    report.match_latency_ms = Latency::of(&latencies);
    Ok(())
}

/// SettleRound, timed as a call and to the last payout; then the audit.
async fn follow_settling(setup: &Setup, report: &mut Report, json: bool) -> anyhow::Result<()> {
    eprintln!("settling the round");
    let settled = settle_round(setup, json).await?;
    report.matches = settled.stats.matches;
    report.settled_matches = settled.stats.settled_matches;
    report.settle_call_ms = finite(settled.call_ms);
    report.settle_drain_s = finite(settled.drain_s);
    report.settle_complete = settled.complete;
    report.settled_per_sec = (settled.drain_s > 0.0)
        .then(|| settled.stats.settled_matches as f64 / settled.drain_s)
        .and_then(finite);
    if !settled.complete {
        eprintln!(
            "the round was not fully paid within {} s ({} jobs outstanding)",
            SETTLE_WAIT.as_secs(),
            settled.stats.outstanding_jobs
        );
    }

    eprintln!("auditing the books");
    match audit(setup).await {
        Ok((clean, checks_run, violations)) => {
            report.audit_clean = Some(clean);
            report.audit_checks_run = checks_run;
            report.audit_violations = violations;
        }
        Err(e) => eprintln!("the audit could not run: {e:#}"),
    }
    Ok(())
}

fn fill_placing(report: &mut Report, tally: Tally, elapsed: Duration) {
    let mut latencies = tally.latencies;
    latencies.sort_by(f64::total_cmp);
    let secs = elapsed.as_secs_f64();
    report.elapsed_s = finite(secs).unwrap_or_default();
    report.placed = latencies.len() as u64;
    report.placed_per_sec = finite(latencies.len() as f64 / secs.max(1e-9)).unwrap_or_default();
    report.errors = tally.errors.values().sum();
    report.latency_ms = Latency::of(&latencies);
    report.error_codes = tally.errors;
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let opt =
        |v: Option<f64>, unit: &str| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}{unit}"));
    println!();
    println!("round               {}", report.round_id);
    match report.rate {
        Some(rate) => println!(
            "load                open loop, {rate} bets/s over {} users for {} s",
            report.clients, report.seconds
        ),
        None => println!(
            "load                closed loop, {} clients for {:.1} s",
            report.clients, report.seconds
        ),
    }
    println!(
        "bets placed         {} ({} failed) in {:.1} s",
        report.placed, report.errors, report.elapsed_s
    );
    if !report.error_codes.is_empty() {
        let codes: Vec<String> = report
            .error_codes
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        println!("errors              {}", codes.join(", "));
    }
    println!(
        "throughput          {:.0} PlaceBet/s",
        report.placed_per_sec
    );
    println!("latency             {}", report.latency_ms.line());
    if let Some(cpu) = &report.cpu {
        println!("cpu while placing   {cpu}");
    }
    println!(
        "matches             {} ({} bets left pending)",
        report.matches, report.pending_after_matching
    );
    println!(
        "match latency       {} ({} of {} below zero)",
        report.match_latency_ms.line(),
        report.match_latency_negative,
        report.match_latency_samples
    );
    println!(
        "SettleRound         {} (call), {} to pay {} matches: {} matches/s{}",
        opt(report.settle_call_ms, " ms"),
        opt(report.settle_drain_s, " s"),
        report.settled_matches,
        opt(report.settled_per_sec, ""),
        if report.settle_complete {
            ""
        } else {
            " (incomplete)"
        }
    );
    match report.audit_clean {
        Some(true) => println!(
            "audit               clean ({} checks)",
            report.audit_checks_run
        ),
        Some(false) => println!(
            "audit               {} violation(s): {}",
            report.audit_violations.len(),
            report.audit_violations.join(", ")
        ),
        None => println!("audit               did not run"),
    }
    Ok(())
}

/// One load run: who, how long, and at what rate (none: closed loop).
struct Plan {
    bench: &'static str,
    clients: usize,
    seconds: u64,
    rate: Option<f64>,
}

async fn run_plan(plan: Plan, common: &Common) -> anyhow::Result<()> {
    anyhow::ensure!(plan.seconds > 0, "--seconds must be at least 1");
    if let Some(rate) = plan.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of bets per second"
        );
    }
    let targets = Targets::of(common)?;
    let setup = prepare(
        common,
        &targets,
        plan.clients,
        &format!("bench-{}", plan.bench),
    )
    .await?;
    let mut report = place_load(&plan, &setup, common).await;
    follow_round(&setup, &mut report, None, common.json).await?;
    print(&report, common.json)
}

/// The load of a plan against a prepared run; the report of its placing.
async fn place_load(plan: &Plan, setup: &Setup, common: &Common) -> Report {
    match plan.rate {
        Some(rate) => eprintln!(
            "{rate} bets/s over {} users for {} s (open loop)",
            plan.clients, plan.seconds
        ),
        None => eprintln!(
            "{} clients placing bets for {} s (closed loop)",
            plan.clients, plan.seconds
        ),
    }
    let counters = Arc::new(Counters::default());
    let bar = progress(
        common.json,
        plan.seconds * 1000,
        "placing {bar:40} {elapsed}/{duration} {msg}",
    );
    let ticker = Ticker::start(bar.clone(), counters.clone(), Instant::now());
    let cpu = crate::cpu::CpuWatch::start(&common.cpu);
    let (tally, elapsed, scheduled) = match plan.rate {
        Some(rate) => {
            let (tally, elapsed, scheduled) = open_loop(setup, plan.seconds, rate, &counters).await;
            (tally, elapsed, Some(scheduled))
        }
        None => {
            let (tally, elapsed) = closed_loop(setup, plan.seconds, &counters).await;
            (tally, elapsed, None)
        }
    };
    let cpu = cpu.finish();
    drop(ticker);
    bar.finish_and_clear();
    eprintln!(
        "{} bets placed, {} errors",
        tally.latencies.len(),
        tally.error_count()
    );
    let mut report = Report {
        bench: plan.bench,
        round_id: setup.round.clone(),
        clients: plan.clients,
        connections: setup.channels.len(),
        seconds: plan.seconds as f64,
        rate: plan.rate,
        scheduled,
        cpu: Some(cpu),
        ..Report::default()
    };
    fill_placing(&mut report, tally, elapsed);
    report
}

/// `betting bench place`.
pub async fn place(args: PlaceArgs) -> anyhow::Result<()> {
    let plan = Plan {
        bench: "place",
        clients: args.clients,
        seconds: args.seconds,
        rate: args.rate,
    };
    run_plan(plan, &args.common).await
}

/// `betting bench scenario`: the design's scenarios, as open-loop presets.
pub async fn scenario(args: ScenarioArgs) -> anyhow::Result<()> {
    let plan = match args.scenario {
        Scenario::Burst => Plan {
            bench: "burst",
            clients: 1000,
            seconds: args.seconds.unwrap_or(5),
            rate: Some(200.0),
        },
        Scenario::Sustained => Plan {
            bench: "sustained",
            clients: 200,
            seconds: args.seconds.unwrap_or(60),
            rate: Some(100.0),
        },
        Scenario::Resilience => {
            return resilience::run(args.seconds.unwrap_or(30), &args.common).await;
        }
    };
    run_plan(plan, &args.common).await
}

/// `betting bench settle`: N matches made, then settled, timed to the last payout.
pub async fn settle(args: SettleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.matches > 0, "--matches must be at least 1");
    let targets = Targets::of(&args.common)?;
    let setup = prepare(&args.common, &targets, args.users, "bench-settle").await?;
    eprintln!(
        "placing {} bets on A and {} on B over {} users",
        args.matches, args.matches, args.users
    );
    let (tally, elapsed) = place_pairs(&setup, args.matches, args.common.json).await;
    eprintln!(
        "{} bets placed, {} errors, in {:.1} s",
        tally.latencies.len(),
        tally.error_count(),
        elapsed.as_secs_f64()
    );
    let mut report = Report {
        bench: "settle",
        round_id: setup.round.clone(),
        clients: args.users,
        connections: setup.channels.len(),
        seconds: finite(elapsed.as_secs_f64()).unwrap_or_default(),
        ..Report::default()
    };
    fill_placing(&mut report, tally, elapsed);
    let want = i64::try_from(args.matches).unwrap_or(i64::MAX);
    follow_round(&setup, &mut report, Some(want), args.common.json).await?;
    print(&report, args.common.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bet(match_id: &str, created_ms: i128, updated_ms: i128) -> MatchedBet {
        MatchedBet {
            match_id: match_id.into(),
            created_ns: created_ms * 1_000_000,
            updated_ns: updated_ms * 1_000_000,
        }
    }

    #[test]
    fn a_match_counts_from_its_later_bet() {
        let bets = [
            bet("m1", 100, 130),
            bet("m1", 110, 130),
            bet("m2", 200, 205),
            bet("m2", 190, 205),
            // Only one of its bets was read: no figure.
            bet("m3", 300, 400),
            // Not matched.
            bet("", 0, 1000),
        ];
        assert_eq!(match_latencies(&bets), vec![5.0, 20.0]);
    }

    #[test]
    fn percentiles_of_a_hundred() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        let latency = Latency::of(&sorted);
        assert_eq!(latency.p50, Some(51.0));
        assert_eq!(latency.p90, Some(90.0));
        assert_eq!(latency.p99, Some(99.0));
        assert_eq!(latency.max, Some(100.0));
        let none = Latency::of(&[]);
        assert!(none.p50.is_none() && none.max.is_none());
    }

    #[test]
    fn settle_bets_split_evenly_and_alternate_per_user() {
        let users = 10_u64;
        let bets = 2 * 35_u64;
        let mut per_user: HashMap<u64, Vec<pb::Side>> = HashMap::new();
        for k in 0..bets {
            per_user
                .entry((k + k / users) % users)
                .or_default()
                .push(side(k));
        }
        let on_a = (0..bets).filter(|k| side(*k) == pb::Side::A).count();
        assert_eq!(on_a, 35);
        for sides in per_user.values() {
            assert!(sides.windows(2).all(|w| w[0] != w[1]), "{sides:?}");
        }
    }

    #[test]
    fn code_names_are_the_specs() {
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }
}
