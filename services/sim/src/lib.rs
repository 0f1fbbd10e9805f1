//! A deterministic, seeded simulation of the whole suite, in the spirit of
//! TigerBeetle's VOPR and Jepsen's bank test.
//!
//! A seed draws a schedule ([`schedule`]): PlaceBets (concurrent same-key
//! copies, reused keys with changed payloads), cancels, deposits and
//! withdrawals (with concurrent retries), recovery passes of two betting
//! instances at once, reconciler passes and match timeouts, round closes,
//! settles and voids, graceful and abrupt worker stops, Redis flushes, and
//! wallet calls that fail, lose their reply after committing, are refused or
//! are slow ([`proxy`]). The real services run it against real PostgreSQL and
//! Redis ([`world`]). Then everything is healed, every unresolved request is
//! retried with its key until it resolves, every round is settled or voided,
//! and after quiescence the run is checked against the client's own books
//! ([`books`]) and against SQL:
//!
//! - the same key and payload always got the same answer, and still does;
//! - every acknowledged bet exists, and no bet exists that was not acknowledged;
//! - each user's balance = genesis + deposits − withdrawals − stakes + payouts
//!   + refunds of their own bets, computed from the client's books;
//! - escrow is empty (no bet is open), no bet, round, refund or job is stuck,
//!   no job is dead;
//! - `betting audit` is clean.
//!
//! A failing seed prints itself; `betting-sim --seed N` replays it.

#![forbid(unsafe_code)]

pub use betting_books as books;
pub mod proxy;
pub mod schedule;
pub mod world;

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use betting_api::pb::{
    self, betting_service_client::BettingServiceClient,
    settlement_service_client::SettlementServiceClient, wallet_service_client::WalletServiceClient,
};
use betting_auth::Role;
use betting_bets::recovery::RecoverySettings;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rust_decimal::Decimal;
use tonic::transport::Channel;

use crate::{
    books::{Answer, Books, MoneyRequest, PlaceRequest, Reply, Request},
    proxy::Rpc,
    schedule::{
        BALANCE_LIMIT, Change, MAX_AMOUNT, RICH_USERS, SMALL_START, SMALL_USERS, Schedule, Side,
        Step, WHALE,
    },
    world::World,
};
use anyhow::Context;
use betting_test_kit::{TestDatabase, TestRedis};

/// How a seed runs.
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Groups of concurrent steps per seed.
    pub steps: usize,
    /// How long the system may take to become quiet after the schedule.
    pub quiescence: Duration,
    /// A seed that runs longer than this fails.
    pub seed_timeout: Duration,
    /// Keep the database of a failed seed for inspection.
    pub keep_failed: bool,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            steps: 60,
            quiescence: Duration::from_secs(30),
            seed_timeout: Duration::from_secs(120),
            keep_failed: true,
        }
    }
}

/// What a seed's run found.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<String>,
    pub elapsed: Duration,
    pub bets: usize,
    pub unknown_answers: usize,
    /// The database kept for a failed seed.
    pub database: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The servers a simulation runs against: PostgreSQL from `DATABASE_URL`
/// (a database per seed, cloned from the test kit's migrated template) and
/// a Redis of its own.
pub struct Simulator {
    admin: String,
    redis: TestRedis,
}

impl Simulator {
    pub async fn new(database_url: &str) -> anyhow::Result<Self> {
        let redis = TestRedis::try_start()
            .context("redis-server must be installed (deploy/local/test installs it)")?;
        // Built now, so that a server without it fails here rather than per seed.
        betting_test_kit::template(database_url).await?;
        // TestRedis returns once the server answers; a last check through the
        // client the simulation uses.
        let client = betting_queue::connect(&redis.url())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !betting_queue::ping(&client).await {
            anyhow::ensure!(Instant::now() < deadline, "the private Redis did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            admin: database_url.to_owned(),
            redis,
        })
    }

    /// Runs one seed from scratch.
    pub async fn run(&self, seed: u64, settings: &SimSettings) -> Outcome {
        let started = Instant::now();
        let schedule = schedule::generate(seed, settings.steps);
        let mut outcome = Outcome {
            seed,
            violations: Vec::new(),
            elapsed: Duration::ZERO,
            bets: 0,
            unknown_answers: 0,
            database: None,
        };
        let database = match TestDatabase::create_in(&self.admin, "sim").await {
            Ok(db) => db,
            Err(error) => {
                outcome.violations.push(format!("set-up failed: {error:#}"));
                return outcome;
            }
        };
        let run = tokio::time::timeout(
            settings.seed_timeout,
            run_schedule(seed, &schedule, &database, &self.redis.url(), settings),
        )
        .await;
        match run {
            Ok(Ok(report)) => {
                outcome.violations = report.violations;
                outcome.bets = report.bets;
                outcome.unknown_answers = report.unknown_answers;
            }
            Ok(Err(error)) => outcome.violations.push(format!("run failed: {error:#}")),
            Err(_) => outcome.violations.push(format!(
                "the seed did not finish within {:?}",
                settings.seed_timeout
            )),
        }
        if outcome.passed() || !settings.keep_failed {
            database.drop_database().await;
        } else {
            outcome.database = Some(database.keep());
        }
        outcome.elapsed = started.elapsed();
        outcome
    }

    /// Stops its Redis. The template stays for the next run: it is shared,
    /// and named after the migrations.
    pub async fn close(self) {
        drop(self.redis);
    }
}

/// Runs `seeds` on `lanes` simulators at once (each with a Redis of its
/// own), sending each outcome as it comes. The lanes end, and close their
/// servers, once the seeds run out or the receiver is dropped; await the
/// returned set to wait for that.
pub async fn run_seeds(
    database_url: &str,
    seeds: Vec<u64>,
    lanes: usize,
    settings: SimSettings,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedReceiver<Outcome>,
    tokio::task::JoinSet<()>,
)> {
    let seeds = std::sync::Arc::new(seeds);
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..lanes.clamp(1, 64) {
        let simulator = Simulator::new(database_url).await?;
        let (seeds, next, tx, settings) =
            (seeds.clone(), next.clone(), tx.clone(), settings.clone());
        set.spawn(async move {
            while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::SeqCst)) {
                if tx.send(simulator.run(seed, &settings).await).is_err() {
                    break;
                }
            }
            simulator.close().await;
        });
    }
    Ok((rx, set))
}

struct Report {
    violations: Vec<String>,
    bets: usize,
    unknown_answers: usize,
}

async fn run_schedule(
    seed: u64,
    schedule: &Schedule,
    database_url: &str,
    redis_url: &str,
    settings: &SimSettings,
) -> anyhow::Result<Report> {
    let world = World::start(database_url, redis_url).await?;
    let run = Run {
        world,
        books: Mutex::new(Books::default()),
        places: Mutex::new(Vec::new()),
        rounds: AtomicUsize::new(2),
        users: schedule.cast.users(),
    };
    let result = async {
        run.genesis(&schedule.cast).await?;
        for group in &schedule.groups {
            futures::future::join_all(group.iter().map(|step| run.step(step))).await;
        }
        run.heal_and_quiesce(seed, settings.quiescence).await;
        run.check().await
    }
    .await;
    let Run { world, books, .. } = run;
    world.shut_down().await;
    let violations = result?;
    let books = books.into_inner().unwrap_or_default();
    Ok(Report {
        violations,
        bets: books.acknowledged().len(),
        unknown_answers: books.unknown_answers,
    })
}

/// One seed's run in progress.
struct Run {
    world: World,
    books: Mutex<Books>,
    /// Every PlaceBet the schedule sent, in order: what Reuse and Cancel name.
    places: Mutex<Vec<PlaceRequest>>,
    rounds: AtomicUsize,
    users: Vec<i64>,
}

/// Every call the client makes has a deadline: a hung call is an unknown outcome.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn round_name(i: usize) -> String {
    format!("r{i}")
}

fn side_pb(side: Side) -> pb::Side {
    match side {
        Side::A => pb::Side::A,
        Side::B => pb::Side::B,
    }
}

impl Run {
    fn authed<T>(&self, message: T, user: i64, role: Role) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        if let Ok(value) = format!("Bearer {}", self.world.token(user, role)).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    fn instance(&self, i: usize) -> Channel {
        self.world.betting[i % self.world.betting.len()]
            .channel
            .clone()
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn violation(&self, text: String) {
        self.books().violations.push(text);
    }

    /// Money the players start with, and the first two rounds.
    async fn genesis(&self, cast: &schedule::Cast) -> anyhow::Result<()> {
        for i in 0..2 {
            self.open_round(i).await;
        }
        for user in SMALL_USERS {
            self.genesis_deposit(user, Decimal::from(SMALL_START), "genesis")
                .await?;
        }
        if cast.rich {
            for user in RICH_USERS {
                for n in 0..2 {
                    self.genesis_deposit(user, Decimal::from(MAX_AMOUNT), &format!("genesis{n}"))
                        .await?;
                }
            }
        }
        if cast.whale {
            // A thousand deposits of the largest amount would take too long:
            // the whale's first deposit is written as the wallet would write it.
            let balance = Decimal::from(BALANCE_LIMIT - 20);
            betting_test_kit::genesis(&self.world.pool, WHALE, balance).await?;
            *self.books().genesis.entry(WHALE).or_default() += balance;
        }
        Ok(())
    }

    async fn genesis_deposit(&self, user: i64, amount: Decimal, key: &str) -> anyhow::Result<()> {
        WalletServiceClient::new(self.world.wallet.channel.clone())
            .deposit(self.authed(
                pb::DepositRequest {
                    user_id: user,
                    amount: amount.to_string(),
                    idempotency_key: format!("{key}-{user}"),
                    reference: String::new(),
                },
                0,
                Role::Cashier,
            ))
            .await?;
        *self.books().genesis.entry(user).or_default() += amount;
        Ok(())
    }

    async fn open_round(&self, i: usize) {
        let result = SettlementServiceClient::new(self.instance(i))
            .open_round(self.authed(
                pb::OpenRoundRequest {
                    round_id: round_name(i),
                },
                0,
                Role::Game,
            ))
            .await;
        self.expect_known(result, "OpenRound");
    }

    /// A call whose outcome does not matter, as long as it is not a bug.
    fn expect_known<T>(&self, result: Result<T, tonic::Status>, what: &str) {
        if let Err(status) = result
            && let Reply::Unexpected(status) = Reply::of_error(status)
        {
            self.violation(format!(
                "{what} got {:?}: {}",
                status.code(),
                status.message()
            ));
        }
    }

    async fn step(&self, step: &Step) {
        match step {
            Step::Place {
                user,
                round,
                side,
                stake,
                key,
                copies,
                faults,
            } => {
                for fault in faults {
                    self.world.faults.arm(Rpc::HoldStake, *user, *fault);
                }
                let request = PlaceRequest {
                    user: *user,
                    key: key.clone(),
                    round: round_name(*round),
                    side: *side,
                    stake: *stake,
                };
                if let Ok(mut places) = self.places.lock() {
                    places.push(request.clone());
                }
                self.place_copies(&request, *copies).await;
            }
            Step::Reuse { nth, change } => {
                let Some(mut request) = self.nth_place(*nth) else {
                    return;
                };
                match change {
                    Change::Side => {
                        request.side = match request.side {
                            Side::A => Side::B,
                            Side::B => Side::A,
                        }
                    }
                    Change::Stake => request.stake += Decimal::ONE,
                }
                self.place_copies(&request, 1).await;
            }
            Step::Cancel { nth } => {
                let Some(request) = self.nth_place(*nth) else {
                    return;
                };
                let Some(bet) = self.books().bet_of(request.user, &request.key) else {
                    return;
                };
                let result = BettingServiceClient::new(self.instance(*nth))
                    .cancel_bet(self.authed(
                        pb::CancelBetRequest { bet_id: bet },
                        request.user,
                        Role::Player,
                    ))
                    .await;
                self.expect_known(result, "CancelBet");
            }
            Step::Deposit {
                user,
                amount,
                key,
                copies,
                fault,
            }
            | Step::Withdraw {
                user,
                amount,
                key,
                copies,
                fault,
            } => {
                let withdraw = matches!(step, Step::Withdraw { .. });
                if let Some(fault) = fault {
                    let rpc = if withdraw {
                        Rpc::Withdraw
                    } else {
                        Rpc::Deposit
                    };
                    self.world.faults.arm(rpc, *user, *fault);
                }
                let request = MoneyRequest {
                    user: *user,
                    key: key.clone(),
                    amount: *amount,
                    withdraw,
                };
                futures::future::join_all((0..*copies).map(|_| self.money(&request))).await;
            }
            Step::TopUp { user, key } => self.top_up(*user, key).await,
            Step::Recovery { instances } => {
                let settings = RecoverySettings {
                    placing_grace: Duration::ZERO,
                    ..RecoverySettings::default()
                };
                futures::future::join_all(instances.iter().filter_map(|i| {
                    let betting = self.world.betting.get(*i)?.betting.as_ref()?;
                    Some(betting.recover(&settings))
                }))
                .await;
            }
            Step::Reconcile { timeout } => {
                if let Err(error) = self.world.reconcile(*timeout).await {
                    tracing::debug!(%error, "reconciler pass failed");
                }
            }
            Step::OpenRound => {
                let i = self.rounds.fetch_add(1, Ordering::SeqCst);
                self.open_round(i).await;
            }
            Step::Close { round } => {
                let result = SettlementServiceClient::new(self.instance(*round))
                    .close_round(self.authed(
                        pb::CloseRoundRequest {
                            round_id: round_name(*round),
                        },
                        0,
                        Role::Game,
                    ))
                    .await;
                self.expect_known(result, "CloseRound");
            }
            Step::Settle { round, side } => self.settle(*round, *side).await,
            Step::Void { round } => self.void(*round).await,
            Step::StopWorker { graceful } => self.world.stop_worker(*graceful).await,
            Step::StartWorker => {
                if self.world.workers.lock().await.len() < 3
                    && let Err(error) = self.world.start_worker().await
                {
                    self.violation(format!("a worker did not start: {error:#}"));
                }
            }
            Step::FlushRedis => {
                use fred::prelude::ClientLike;
                let _: Result<(), _> = self.world.redis.flushall(false).await;
            }
            Step::Arm { rpc, user, fault } => self.world.faults.arm(*rpc, *user, *fault),
            Step::Pause(pause) => tokio::time::sleep(*pause).await,
        }
    }

    fn nth_place(&self, nth: usize) -> Option<PlaceRequest> {
        self.places.lock().ok()?.get(nth).cloned()
    }

    async fn place_copies(&self, request: &PlaceRequest, copies: usize) {
        futures::future::join_all((0..copies).map(|c| self.place(request, c))).await;
    }

    async fn place(&self, request: &PlaceRequest, instance: usize) {
        let result = BettingServiceClient::new(self.instance(instance))
            .place_bet(self.authed(
                pb::PlaceBetRequest {
                    round_id: request.round.clone(),
                    side: side_pb(request.side) as i32,
                    amount: request.stake.to_string(),
                    idempotency_key: request.key.clone(),
                },
                request.user,
                Role::Player,
            ))
            .await;
        let reply = match result {
            Ok(response) => match response.into_inner().bet {
                Some(bet) => Reply::Resolved(Answer::Bet(bet.bet_id)),
                None => Reply::Unexpected(tonic::Status::internal("PlaceBet answered no bet")),
            },
            Err(status) => Reply::of_error(status),
        };
        self.books().place(request, reply);
    }

    async fn money(&self, request: &MoneyRequest) {
        let mut wallet = WalletServiceClient::new(self.world.proxy.clone());
        let result = if request.withdraw {
            wallet
                .withdraw(self.authed(
                    pb::WithdrawRequest {
                        user_id: request.user,
                        amount: request.amount.to_string(),
                        idempotency_key: request.key.clone(),
                        reference: String::new(),
                    },
                    0,
                    Role::Cashier,
                ))
                .await
                .map(|r| r.into_inner().entry)
        } else {
            wallet
                .deposit(self.authed(
                    pb::DepositRequest {
                        user_id: request.user,
                        amount: request.amount.to_string(),
                        idempotency_key: request.key.clone(),
                        reference: String::new(),
                    },
                    0,
                    Role::Cashier,
                ))
                .await
                .map(|r| r.into_inner().entry)
        };
        let reply = match result {
            Ok(Some(entry)) => Reply::Resolved(Answer::Entry(entry.entry_id)),
            Ok(None) => Reply::Unexpected(tonic::Status::internal("no entry in the answer")),
            Err(status) => Reply::of_error(status),
        };
        self.books().money(request, reply);
    }

    /// Deposits what brings the wallet to the balance limit (at most the
    /// largest single amount).
    async fn top_up(&self, user: i64, key: &str) {
        let Some(balance) = self.balance(user).await else {
            return;
        };
        let room = Decimal::from(BALANCE_LIMIT) - balance;
        let amount = room.min(Decimal::from(MAX_AMOUNT));
        if amount <= Decimal::ZERO {
            return;
        }
        let request = MoneyRequest {
            user,
            key: key.to_owned(),
            amount,
            withdraw: false,
        };
        self.money(&request).await;
    }

    async fn balance(&self, user: i64) -> Option<Decimal> {
        let wallet = WalletServiceClient::new(self.world.wallet.channel.clone())
            .get_wallet(self.authed(pb::GetWalletRequest { user_id: user }, 0, Role::Admin))
            .await
            .ok()?
            .into_inner()
            .wallet?;
        wallet.balance.parse().ok()
    }

    async fn settle(&self, round: usize, side: Side) {
        let result = SettlementServiceClient::new(self.instance(round))
            .settle_round(self.authed(
                pb::SettleRoundRequest {
                    round_id: round_name(round),
                    winning_side: side_pb(side) as i32,
                },
                0,
                Role::Game,
            ))
            .await;
        self.expect_known(result, "SettleRound");
    }

    async fn void(&self, round: usize) {
        let result = SettlementServiceClient::new(self.instance(round))
            .void_round(self.authed(
                pb::VoidRoundRequest {
                    round_id: round_name(round),
                    reason: "simulation".into(),
                },
                0,
                Role::Game,
            ))
            .await;
        self.expect_known(result, "VoidRound");
    }

    /// Heals every fault, makes sure a worker runs, resolves every request
    /// whose outcome was lost, ends every round, and waits until nothing is
    /// left to do (or the time is up; the checks then say what is stuck).
    async fn heal_and_quiesce(&self, seed: u64, within: Duration) {
        self.world.faults.clear();
        if self.world.workers.lock().await.is_empty()
            && let Err(error) = self.world.start_worker().await
        {
            self.violation(format!("a worker did not start: {error:#}"));
        }
        self.resolve_unknowns().await;

        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let rounds = self.rounds.load(Ordering::SeqCst);
        for round in 0..rounds {
            if rng.random_bool(0.8) {
                let side = if rng.random_bool(0.5) {
                    Side::A
                } else {
                    Side::B
                };
                self.settle(round, side).await;
            } else {
                self.void(round).await;
            }
        }

        let deadline = Instant::now() + within;
        let settings = RecoverySettings {
            placing_grace: Duration::ZERO,
            ..RecoverySettings::default()
        };
        loop {
            for process in &self.world.betting {
                if let Some(betting) = &process.betting {
                    betting.recover(&settings).await;
                }
            }
            let _ = self.world.reconcile(false).await;
            if self.stuck().await.is_empty() || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Retries every request whose answer was lost, with its own key, until
    /// it resolves.
    async fn resolve_unknowns(&self) {
        for _ in 0..30 {
            let pending = std::mem::take(&mut self.books().unresolved);
            if pending.is_empty() {
                return;
            }
            for (i, request) in pending.iter().enumerate() {
                self.resend(request, i).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.books().unresolved.len();
        if left > 0 {
            self.violation(format!("{left} requests never resolved"));
        }
    }

    /// What is not finished yet.
    async fn stuck(&self) -> Vec<String> {
        let mut stuck = Vec::new();
        let pool = &self.world.pool;
        let counts: Result<Vec<(String, i64)>, _> = sqlx::query_as(
            "SELECT 'bets ' || status, count(*) FROM bets \
               WHERE status IN ('PLACING', 'PENDING', 'MATCHED') GROUP BY status \
             UNION ALL SELECT 'rounds ' || status, count(*) FROM rounds \
               WHERE status IN ('OPEN', 'CLOSED') GROUP BY status \
             UNION ALL SELECT 'open matches', count(*) FROM matches \
               WHERE status = 'OPEN' HAVING count(*) > 0 \
             UNION ALL SELECT 'refunds owed', count(*) FROM wallet_commands \
               WHERE done_at IS NULL HAVING count(*) > 0",
        )
        .fetch_all(pool)
        .await;
        match counts {
            Ok(rows) => stuck.extend(rows.into_iter().map(|(what, n)| format!("{n} {what}"))),
            Err(error) => stuck.push(format!("cannot read the tables: {error}")),
        }
        let queues = &self.world.queues;
        for queue in [&queues.matches, &queues.settle, &queues.refund] {
            match queue.stats().await {
                Ok(s) if s.waiting + s.delayed + s.in_flight + s.dead > 0 => stuck.push(format!(
                    "queue {}: {} waiting, {} delayed, {} in flight, {} dead",
                    s.queue, s.waiting, s.delayed, s.in_flight, s.dead
                )),
                Ok(_) => {}
                Err(error) => stuck.push(format!("queue {}: {error}", queue.name())),
            }
        }
        stuck
    }

    /// Every check of a quiet system; returns the violations.
    async fn check(&self) -> anyhow::Result<Vec<String>> {
        let mut violations = std::mem::take(&mut self.books().violations);
        violations.extend(
            self.stuck()
                .await
                .into_iter()
                .map(|s| format!("stuck: {s}")),
        );
        self.replay_all().await;
        violations.extend(self.check_books().await?);
        let pool = &self.world.pool;
        let escrow: Option<Decimal> =
            sqlx::query_scalar("SELECT balance FROM account_balances WHERE account = 'ESCROW'")
                .fetch_optional(pool)
                .await?
                .flatten();
        if let Some(escrow) = escrow.filter(|e| !e.is_zero()) {
            violations.push(format!("escrow holds {escrow} with no bet open"));
        }
        let report = betting_audit::run(
            pool,
            &betting_audit::AuditSettings {
                quiescence: Duration::ZERO,
                match_timeout: Duration::from_secs(3600),
            },
        )
        .await?;
        violations.extend(
            report
                .violations
                .into_iter()
                .map(|v| format!("audit {}: {}", v.check, v.detail)),
        );
        // The books' own findings while replaying.
        violations.append(&mut self.books().violations);
        Ok(violations)
    }

    /// Asks every request that stored something once more; the books flag
    /// any answer that changed.
    async fn replay_all(&self) {
        let replays = self.books().replays();
        for (i, request) in replays.iter().enumerate() {
            self.resend(request, i).await;
        }
    }

    /// Sends a request again, with its own key (through instance `i` for a bet).
    async fn resend(&self, request: &Request, i: usize) {
        match request {
            Request::Place(r) => self.place(r, i).await,
            Request::Money(r) => self.money(r).await,
        }
    }

    /// Each user's balance against the client's books, and every bet
    /// against what the client was told.
    async fn check_books(&self) -> anyhow::Result<Vec<String>> {
        let mut violations = Vec::new();
        let (acknowledged, net) = {
            let books = self.books();
            (books.acknowledged(), books.net_external())
        };
        let mut expected: HashMap<i64, Decimal> = net;
        let mut seen = std::collections::HashSet::new();
        for &user in &self.users {
            for bet in self.list_bets(user).await? {
                seen.insert(bet.bet_id.clone());
                let Some(request) = acknowledged.get(&bet.bet_id) else {
                    violations.push(format!(
                        "user {user} has bet {} ({:?}) that no answer acknowledged",
                        bet.bet_id,
                        bet.status()
                    ));
                    continue;
                };
                let stake: Decimal = bet.amount.parse().unwrap_or_default();
                if request.user != user
                    || request.round != bet.round_id
                    || side_pb(request.side) != bet.side()
                    || request.stake != stake
                {
                    violations.push(format!(
                        "bet {} differs from its request {request:?}",
                        bet.bet_id
                    ));
                }
                let change = match (bet.status(), bet.result()) {
                    (pb::BetStatus::Settled, pb::BetResult::Won) => stake,
                    (pb::BetStatus::Settled, pb::BetResult::Lost) => -stake,
                    (pb::BetStatus::Refunded, _) => Decimal::ZERO,
                    (status, _) => {
                        violations.push(format!("bet {} ended {status:?}", bet.bet_id));
                        Decimal::ZERO
                    }
                };
                *expected.entry(user).or_default() += change;
            }
        }
        for id in acknowledged.keys() {
            if !seen.contains(id) {
                violations.push(format!("acknowledged bet {id} is missing"));
            }
        }
        let balances: Vec<(i64, Decimal)> = sqlx::query_as("SELECT user_id, balance FROM wallets")
            .fetch_all(&self.world.pool)
            .await?;
        let balances: HashMap<i64, Decimal> = balances.into_iter().collect();
        for &user in &self.users {
            let want = expected.get(&user).copied().unwrap_or_default();
            let have = balances.get(&user).copied().unwrap_or_default();
            if want != have {
                violations.push(format!(
                    "user {user} holds {have}, but the client's books say {want}"
                ));
            }
        }
        Ok(violations)
    }

    async fn list_bets(&self, user: i64) -> anyhow::Result<Vec<pb::Bet>> {
        let mut bets = Vec::new();
        let mut page_token = String::new();
        for _ in 0..1000 {
            let response = BettingServiceClient::new(self.instance(0))
                .list_bets(self.authed(
                    pb::ListBetsRequest {
                        page_size: 100,
                        page_token: page_token.clone(),
                        ..Default::default()
                    },
                    user,
                    Role::Player,
                ))
                .await?
                .into_inner();
            bets.extend(response.bets);
            if response.next_page_token.is_empty() {
                return Ok(bets);
            }
            page_token = response.next_page_token;
        }
        anyhow::bail!("bets of user {user} did not fit in 1000 pages")
    }
}
