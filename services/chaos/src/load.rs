//! The run's clients: players betting (new keys, same-key retries, a few
//! reused keys with a changed payload), cancelling, and a cashier moving
//! money in and out (with retries), spread over every API instance; a game
//! server opening, settling and voiding rounds. Every answer goes into the
//! client's own books; every call that ended without a known outcome
//! (UNAVAILABLE, DEADLINE_EXCEEDED, a shed call) is retried with the same
//! key until it resolves.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use betting_api::pb::{
    self, betting_service_client::BettingServiceClient,
    settlement_service_client::SettlementServiceClient, wallet_service_client::WalletServiceClient,
};
use betting_auth::{Role, TokenMinter};
use betting_books::{
    Answer, Books, CancelRequest, MoneyRequest, PlaceRequest, Reply, Request, Side,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rust_decimal::Decimal;
use tonic::{Code, Status, transport::Channel};

/// Every call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Money each user starts with.
pub const GENESIS: i64 = 1_000;

/// Where the clients send their calls.
pub struct Targets {
    pub betting: Vec<Channel>,
    pub settlement: Channel,
    pub wallet: Channel,
}

fn channel(port: u16) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy(),
    )
}

impl Targets {
    pub fn new(betting: &[u16], settlement: u16, wallet: u16) -> anyhow::Result<Self> {
        Ok(Self {
            betting: betting
                .iter()
                .map(|&p| channel(p))
                .collect::<anyhow::Result<_>>()?,
            settlement: channel(settlement)?,
            wallet: channel(wallet)?,
        })
    }
}

/// An end of a round the game server asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Settled(Side),
    Voided,
}

pub use betting_books::CancelSeen;

/// What the clients did, for the report.
#[derive(Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub placed: AtomicU64,
    pub unknown: AtomicU64,
    pub retries: AtomicU64,
    pub cancels: AtomicU64,
    pub rounds_settled: AtomicU64,
    pub rounds_voided: AtomicU64,
}

/// The clients' shared state.
pub struct Load {
    targets: Targets,
    minter: TokenMinter,
    pub books: Mutex<Books>,
    /// Every user with a wallet: the players, then the probe.
    pub users: Vec<i64>,
    /// How many of `users` the clients bet as.
    players: usize,
    /// The user whose bets probe each betting instance after healing; no
    /// client bets as it, and its bets are in the books like any other.
    pub probe_user: i64,
    /// Rounds open for bets, oldest first.
    rounds: Mutex<VecDeque<String>>,
    /// Every round opened, to be ended after the run.
    pub all_rounds: Mutex<Vec<String>>,
    next_round: AtomicUsize,
    next_key: AtomicU64,
    pub counters: Counters,
    /// When each betting instance last acknowledged a PlaceBet.
    last_placed: Vec<Mutex<Instant>>,
    /// Every end the game server asked of each round (every attempt: one
    /// whose answer was lost may have taken effect).
    pub outcomes: Mutex<HashMap<String, Vec<Outcome>>>,
}

fn side_pb(side: Side) -> pb::Side {
    match side {
        Side::A => pb::Side::A,
        Side::B => pb::Side::B,
    }
}

/// A call's outcome as the books see it. A call the edge shed
/// (RESOURCE_EXHAUSTED) never ran, but the client cannot tell it from
/// one that did before its answer was lost in every case, so it is
/// retried like one.
fn reply_of(status: Status) -> Reply {
    match status.code() {
        Code::ResourceExhausted => Reply::Unknown,
        _ => Reply::of_error(status),
    }
}

/// A failed CancelBet as the books see it.
fn cancel_reply(status: Status) -> Reply {
    match status.code() {
        Code::FailedPrecondition => Reply::of_error(status),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted => Reply::Unknown,
        _ => Reply::Unexpected(status),
    }
}

impl Load {
    pub fn new(targets: Targets, secret: &str, users: usize) -> Self {
        let instances = targets.betting.len();
        Self {
            targets,
            minter: TokenMinter::new(secret.as_bytes(), None, None),
            books: Mutex::new(Books::default()),
            users: (1..=users as i64 + 1).collect(),
            players: users,
            probe_user: users as i64 + 1,
            rounds: Mutex::new(VecDeque::new()),
            all_rounds: Mutex::new(Vec::new()),
            next_round: AtomicUsize::new(0),
            next_key: AtomicU64::new(0),
            counters: Counters::default(),
            last_placed: (0..instances).map(|_| Mutex::new(Instant::now())).collect(),
            outcomes: Mutex::new(HashMap::new()),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn authed<T>(&self, message: T, user: i64, role: Role) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        let token = match role {
            Role::Player => self.minter.mint(user, role, Duration::from_secs(3600)),
            _ => self
                .minter
                .mint_subject("chaos", role, Duration::from_secs(3600)),
        };
        if let Ok(value) = format!("Bearer {}", token.unwrap_or_default()).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    fn key(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_key.fetch_add(1, Ordering::Relaxed))
    }

    /// The last time every betting instance acknowledged a PlaceBet.
    pub fn last_placed_everywhere(&self) -> Instant {
        self.last_placed
            .iter()
            .map(|m| *m.lock().unwrap_or_else(|p| p.into_inner()))
            .min()
            .unwrap_or_else(Instant::now)
    }

    /// Funds every user (retried until each deposit resolves).
    pub async fn fund(&self) {
        for &user in &self.users {
            let request = MoneyRequest {
                user,
                key: format!("genesis-{user}"),
                amount: Decimal::from(GENESIS),
                withdraw: false,
            };
            self.money(&request).await;
        }
        self.resolve_unknowns(Duration::from_secs(60)).await;
    }

    pub async fn open_round(&self) {
        let round = format!("chaos-{}", self.next_round.fetch_add(1, Ordering::Relaxed));
        // Retried until known: OpenRound of an existing round is refused
        // ALREADY_EXISTS, which means an earlier attempt opened it.
        for _ in 0..60 {
            let result = SettlementServiceClient::new(self.targets.settlement.clone())
                .open_round(self.authed(
                    pb::OpenRoundRequest {
                        round_id: round.clone(),
                    },
                    0,
                    Role::Game,
                ))
                .await;
            match result {
                Ok(_) => break,
                Err(status) if status.code() == Code::AlreadyExists => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        self.all_rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(round.clone());
        self.rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(round);
    }

    /// Ends a round: settled (mostly) or voided, retried until the service
    /// answers; a round already ended answers FAILED_PRECONDITION.
    pub async fn end_round(&self, round: &str, rng: &mut StdRng) {
        let settle = rng.random_bool(0.85);
        let side = if rng.random_bool(0.5) {
            pb::Side::A
        } else {
            pb::Side::B
        };
        let outcome = if !settle {
            Outcome::Voided
        } else if side == pb::Side::A {
            Outcome::Settled(Side::A)
        } else {
            Outcome::Settled(Side::B)
        };
        for _ in 0..240 {
            let mut client = SettlementServiceClient::new(self.targets.settlement.clone());
            let result = if settle {
                client
                    .settle_round(self.authed(
                        pb::SettleRoundRequest {
                            round_id: round.to_owned(),
                            winning_side: side as i32,
                        },
                        0,
                        Role::Game,
                    ))
                    .await
                    .map(|_| ())
            } else {
                client
                    .void_round(self.authed(
                        pb::VoidRoundRequest {
                            round_id: round.to_owned(),
                            reason: "chaos".into(),
                        },
                        0,
                        Role::Game,
                    ))
                    .await
                    .map(|_| ())
            };
            // Every attempt that may have taken effect: answered, or its
            // answer lost. (FAILED_PRECONDITION: the round had ended before.)
            if !matches!(&result, Err(status) if status.code() == Code::FailedPrecondition) {
                self.outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(round.to_owned())
                    .or_default()
                    .push(outcome);
            }
            match result {
                Ok(()) => {
                    let counter = if settle {
                        &self.counters.rounds_settled
                    } else {
                        &self.counters.rounds_voided
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(status) if status.code() == Code::FailedPrecondition => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        tracing::warn!(round, "the round could not be ended");
    }

    /// The game server: keeps `open` rounds open, ending the oldest and
    /// opening a new one every few seconds, until `until`.
    pub async fn run_rounds(&self, seed: u64, open: usize, until: Instant) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0a0d);
        for _ in 0..open {
            self.open_round().await;
        }
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.random_range(3_000..8_000))).await;
            let oldest = self
                .rounds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            self.open_round().await;
            if let Some(round) = oldest {
                self.end_round(&round, &mut rng).await;
            }
        }
    }

    /// After healing: a fresh PlaceBet by the probe user on every betting
    /// instance, each sent to it (and retried with its key) until it is
    /// acknowledged or `within` has passed. How long each took; `Err` with
    /// the last answer for an instance that never acknowledged.
    pub async fn probe(&self, within: Duration) -> Vec<Result<Duration, String>> {
        let started = Instant::now();
        let deadline = started + within;
        let round = self
            .rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back()
            .cloned();
        let Some(round) = round else {
            return vec![Err("no round open to probe with".into()); self.targets.betting.len()];
        };
        let mut found = Vec::new();
        for instance in 0..self.targets.betting.len() {
            let request = PlaceRequest {
                user: self.probe_user,
                key: format!("probe-{instance}"),
                round: round.clone(),
                side: Side::A,
                stake: Decimal::ONE,
            };
            let result = loop {
                self.place(&request, instance).await;
                if self.books().bet_of(request.user, &request.key).is_some() {
                    break Ok(started.elapsed());
                }
                if Instant::now() > deadline {
                    break Err(format!(
                        "betting-{instance} acknowledged no PlaceBet within {within:?} of healing"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            found.push(result);
        }
        found
    }

    fn some_round(&self, rng: &mut StdRng) -> Option<String> {
        let rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        if rounds.is_empty() {
            return None;
        }
        rounds.get(rng.random_range(0..rounds.len())).cloned()
    }

    /// One client: operations back to back with a short think time, until
    /// `until`.
    pub async fn run_client(&self, seed: u64, client: usize, until: Instant) {
        let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9));
        let mut mine: Vec<PlaceRequest> = Vec::new();
        let mut money: Vec<MoneyRequest> = Vec::new();
        while Instant::now() < until {
            let user = self.users[rng.random_range(0..self.players)];
            let roll = rng.random_range(0..100);
            let instance = rng.random_range(0..self.targets.betting.len());
            match roll {
                0..=69 => {
                    let Some(round) = self.some_round(&mut rng) else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let request = PlaceRequest {
                        user,
                        key: self.key("bet"),
                        round,
                        side: if rng.random_bool(0.5) {
                            Side::A
                        } else {
                            Side::B
                        },
                        stake: Decimal::from([1, 2, 5][rng.random_range(0..3)]),
                    };
                    self.place(&request, instance).await;
                    mine.push(request);
                }
                // The same request again: a client retry, maybe racing.
                70..=75 if !mine.is_empty() => {
                    let request = mine[rng.random_range(0..mine.len())].clone();
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.place(&request, instance).await;
                }
                // A reused key with a changed payload: must be refused.
                76..=77 if !mine.is_empty() => {
                    let mut request = mine[rng.random_range(0..mine.len())].clone();
                    request.stake += Decimal::ONE;
                    self.place(&request, instance).await;
                }
                78..=85 if !mine.is_empty() => {
                    let request = mine[rng.random_range(0..mine.len())].clone();
                    self.cancel(&request, instance).await;
                }
                86..=96 => {
                    let withdraw = rng.random_bool(0.5);
                    let request = MoneyRequest {
                        user,
                        key: self.key(if withdraw { "withdraw" } else { "deposit" }),
                        amount: Decimal::from(rng.random_range(1..20)),
                        withdraw,
                    };
                    self.money(&request).await;
                    money.push(request);
                }
                _ if !money.is_empty() => {
                    let request = money[rng.random_range(0..money.len())].clone();
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.money(&request).await;
                }
                _ => {}
            }
            if mine.len() > 200 {
                mine.drain(..100);
            }
            if money.len() > 100 {
                money.drain(..50);
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
        }
    }

    /// Retries, every half second, whatever is unresolved, until `until`.
    pub async fn run_retrier(&self, until: Instant) {
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.retry_unresolved().await;
        }
    }

    async fn retry_unresolved(&self) {
        let (pending, cancels) = {
            let mut books = self.books();
            (
                std::mem::take(&mut books.unresolved),
                std::mem::take(&mut books.unresolved_cancels),
            )
        };
        for (i, request) in pending.iter().enumerate() {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            self.resend(request, i).await;
        }
        // CancelBet is idempotent: a cancel whose answer was lost is asked
        // again until it is acknowledged or refused.
        for (i, request) in cancels.iter().enumerate() {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            self.cancel_bet(request, i).await;
        }
    }

    /// Requests and cancels whose outcome is still unknown.
    pub fn unresolved(&self) -> usize {
        let books = self.books();
        books.unresolved.len() + books.unresolved_cancels.len()
    }

    /// Retries until nothing is unresolved; whether that happened in time.
    pub async fn resolve_unknowns(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            self.retry_unresolved().await;
            if self.unresolved() == 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn resend(&self, request: &Request, i: usize) {
        match request {
            Request::Place(r) => self.place(r, i).await,
            Request::Money(r) => self.money(r).await,
        }
    }

    pub async fn place(&self, request: &PlaceRequest, instance: usize) {
        let instance = instance % self.targets.betting.len();
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let result = BettingServiceClient::new(self.targets.betting[instance].clone())
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
                Some(bet) => {
                    self.counters.placed.fetch_add(1, Ordering::Relaxed);
                    *self.last_placed[instance]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    Reply::Resolved(Answer::Bet(bet.bet_id))
                }
                None => Reply::Unexpected(Status::internal("PlaceBet answered no bet")),
            },
            Err(status) => reply_of(status),
        };
        if matches!(reply, Reply::Unknown) {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
        }
        self.books().place(request, reply);
    }

    /// CancelBet of an acknowledged bet.
    async fn cancel(&self, request: &PlaceRequest, instance: usize) {
        let Some(bet) = self.books().bet_of(request.user, &request.key) else {
            return;
        };
        self.counters.cancels.fetch_add(1, Ordering::Relaxed);
        let cancel = CancelRequest {
            user: request.user,
            bet,
        };
        self.cancel_bet(&cancel, instance).await;
    }

    /// One CancelBet attempt, its answer into the books: acknowledged,
    /// refused (FAILED_PRECONDITION: no longer PENDING), or unknown (then
    /// retried with the others). Any other code is one a cancel of the
    /// player's own acknowledged bet should never get.
    pub async fn cancel_bet(&self, request: &CancelRequest, instance: usize) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let result = BettingServiceClient::new(
            self.targets.betting[instance % self.targets.betting.len()].clone(),
        )
        .cancel_bet(self.authed(
            pb::CancelBetRequest {
                bet_id: request.bet.clone(),
            },
            request.user,
            Role::Player,
        ))
        .await;
        let reply = match result {
            Ok(_) => Reply::Resolved(Answer::Cancelled),
            Err(status) => cancel_reply(status),
        };
        if matches!(reply, Reply::Unknown) {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
        }
        self.books().cancel(request, reply);
    }

    pub async fn money(&self, request: &MoneyRequest) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut wallet = WalletServiceClient::new(self.targets.wallet.clone());
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
            Ok(None) => Reply::Unexpected(Status::internal("no entry in the answer")),
            Err(status) => reply_of(status),
        };
        if matches!(reply, Reply::Unknown) {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
        }
        self.books().money(request, reply);
    }
}

/// Runs `clients` clients, the game server and the retrier for `duration`.
pub async fn drive(load: Arc<Load>, seed: u64, clients: usize, duration: Duration) {
    let until = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let load = load.clone();
        tasks.spawn(async move { load.run_rounds(seed, 4, until).await });
    }
    {
        let load = load.clone();
        tasks.spawn(async move { load.run_retrier(until).await });
    }
    for client in 0..clients {
        let load = load.clone();
        tasks.spawn(async move { load.run_client(seed, client, until).await });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_without_a_known_outcome_is_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
            Code::ResourceExhausted,
        ] {
            assert!(
                matches!(cancel_reply(Status::new(code, "")), Reply::Unknown),
                "{code:?}"
            );
        }
        assert!(matches!(
            cancel_reply(Status::failed_precondition("matched")),
            Reply::Resolved(Answer::Refused(_))
        ));
        for code in [Code::NotFound, Code::Internal, Code::PermissionDenied] {
            assert!(
                matches!(cancel_reply(Status::new(code, "")), Reply::Unexpected(_)),
                "{code:?}"
            );
        }
    }
}
