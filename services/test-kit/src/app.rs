//! The whole suite in the test's process: [`TestApp`] builds the real
//! [`Application`] (port 0, a database and a Redis namespace of its own),
//! serves it on a task, and offers clients, tokens and the checks tests make
//! of the books.
//!
//! An app made by [`TestApp::spawn`] or [`TestApp::spawn_roles`] owns its
//! database: dropping or stopping the app stops the server and drops the
//! database. An app made by [`TestApp::spawn_with`] runs on settings the test
//! made, and the test keeps the database guard ([`crate::fresh_database`]).

use std::time::Duration;

use betting_api::{
    pb::{
        self, betting_service_client::BettingServiceClient,
        settlement_service_client::SettlementServiceClient,
        wallet_service_client::WalletServiceClient,
    },
    pb_internal::stake_service_client::StakeServiceClient,
};
use betting_auth::{Role, TokenMinter};
use betting_bets::BettingService;
use betting_config::{Secret, Settings, StorageSettings, TokenSettings};
use betting_server::Application;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};
use uuid::Uuid;

use crate::{
    TestDatabase, authed,
    database::{owner_url, service_url},
    fresh_database, poll_until, redis_url,
};

/// How long [`TestApp::wait_for_bet`] and [`TestApp::wait_for_round_done`]
/// wait (they polled 200 times, 50 ms apart, plus each call's time).
const WAIT: Duration = Duration::from_secs(15);

/// The JWT secret every test app accepts.
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// Settings for a test app: port 0, a fresh Redis namespace, every
/// background pass slowed down to once an hour (tests run passes themselves),
/// and `database_url`'s database reached as the services' restricted role
/// ([`crate::database::SERVICE_ROLE`]), whoever the URL names.
pub fn settings(database_url: &str, redis_url: &str) -> Settings {
    Settings {
        storage: StorageSettings {
            database_url: Secret::new(service_url(database_url)),
            db_max_connections: 20,
        },
        tls: betting_config::TlsSettings::default(),
        redis_url: Secret::new(redis_url),
        redis_namespace: format!("t-{}", Uuid::new_v4().simple()),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: "127.0.0.1:0".parse().expect("addr"),
        tokens: TokenSettings::local(SECRET),
        wallet_endpoint: None,
        roles: Vec::new(),
        // Tests drive recovery passes themselves.
        placing_grace_secs: 3600,
        recovery_interval_ms: 3_600_000,
        match_timeout_secs: 300,
        place_group_commit: true,
        worker_concurrency: 4,
        reconcile_interval_ms: 3_600_000,
        queue_visibility_ms: 30_000,
        stream_heartbeat_ms: 15_000,
        stream_send_timeout_ms: 10_000,
        shutdown_grace_secs: 5,
        edge: Default::default(),
        // Tests about limits set their own; the others must never meet one.
        limits: betting_config::UserLimits::off(),
    }
}

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    /// The test's own view of the database, as the admin URL's user (the
    /// owner): checks, and corruption on purpose. The app itself runs as the
    /// restricted role its settings name.
    pub pool: PgPool,
    /// The URL of [`TestApp::pool`]: the app's database as the owner.
    pub database_url: String,
    pub channel: Channel,
    pub betting: Option<BettingService>,
    pub settlement: Option<betting_settlement::SettlementService>,
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub queues: betting_server::Queues,
    pub hub: Option<betting_streams::Hub>,
    pub namespace: String,
    minter: TokenMinter,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Last, so that it is dropped after the server was told to stop.
    database: Option<TestDatabase>,
}

impl TestApp {
    /// The whole suite in one process, on its own database.
    pub async fn spawn() -> Self {
        let database = fresh_database().await;
        let mut app = Self::spawn_with(settings(&database, &redis_url())).await;
        app.database = Some(database);
        app
    }
}

/// The API roles without any worker: jobs sit in Redis for a test to look at,
/// and matching happens only when the test runs a matcher itself.
pub const API_ONLY: &[betting_config::ProcessRole] = &[
    betting_config::ProcessRole::Wallet,
    betting_config::ProcessRole::Betting,
    betting_config::ProcessRole::Settlement,
];

impl TestApp {
    /// Only some roles, e.g. [`API_ONLY`], so that a test sees jobs sit in Redis.
    pub async fn spawn_roles(roles: &[betting_config::ProcessRole]) -> Self {
        let database = fresh_database().await;
        let mut settings = settings(&database, &redis_url());
        settings.roles = roles.to_vec();
        let mut app = Self::spawn_with(settings).await;
        app.database = Some(database);
        app
    }

    /// A reconciler over this app's database and queues, with its own settings.
    pub fn reconciler_with(
        &self,
        settings: betting_reconciler::ReconcilerSettings,
    ) -> betting_reconciler::Reconciler {
        betting_reconciler::Reconciler::new(
            self.pool.clone(),
            [
                self.queues.matches.clone(),
                self.queues.settle.clone(),
                self.queues.refund.clone(),
            ],
            settings,
        )
        .with_publisher(betting_streams::Publisher::new(
            self.queues.matches.client().clone(),
            &self.namespace,
        ))
    }

    pub async fn spawn_with(settings: Settings) -> Self {
        if std::env::var("TEST_LOG").is_ok() {
            // Logs only: tests export no traces (the guard has nothing to flush).
            drop(betting_telemetry::init_tracing());
        }
        let namespace = settings.redis_namespace.clone();
        let url = settings.storage.database_url.expose().to_owned();
        let app = Application::build(settings)
            .await
            .expect("build application");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let betting = app.betting().cloned();
        let settlement = app.settlement().cloned();
        let queues = app.queues().clone();
        let hub = app.hub().cloned();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            addr,
            metrics_addr,
            pool: PgPool::connect_lazy(&owner_url(&url)).expect("pool"),
            database_url: owner_url(&url),
            channel,
            betting,
            settlement,
            queues,
            hub,
            namespace,
            minter: TokenMinter::new(SECRET.as_bytes(), None, None),
            stop: Some(stop),
            server: Some(server),
            database: None,
        }
    }

    /// Mints the app's tokens with `minter` from now on: for an app whose
    /// settings verify with a key set rather than [`SECRET`].
    pub fn with_minter(mut self, minter: TokenMinter) -> Self {
        self.minter = minter;
        self
    }

    pub fn token(&self, user: i64, role: Role) -> String {
        self.minter
            .mint(user, role, Duration::from_secs(600))
            .expect("mint token")
    }

    pub fn player(&self, user: i64) -> String {
        self.token(user, Role::Player)
    }

    /// A token of `role` for a caller named after the role (players: user 1).
    pub fn token_for(&self, role: Role) -> String {
        match role {
            Role::Player => self.player(1),
            role => self
                .minter
                .mint_subject(&format!("test-{role}"), role, Duration::from_secs(600))
                .expect("mint token"),
        }
    }

    /// Deposits and withdrawals.
    pub fn cashier_token(&self) -> String {
        self.token_for(Role::Cashier)
    }

    /// Rounds: open, close, settle, void.
    pub fn game_token(&self) -> String {
        self.token_for(Role::Game)
    }

    /// Our own processes: StakeService (HoldStake, RefundStake, PayWinnings).
    pub fn service_token(&self) -> String {
        self.token_for(Role::Service)
    }

    /// The audit, and reading anything.
    pub fn admin_token(&self) -> String {
        self.token_for(Role::Admin)
    }

    pub fn wallet(&self) -> WalletServiceClient<Channel> {
        WalletServiceClient::new(self.channel.clone())
    }

    /// The wallet role's internal StakeService (betting.internal.v1).
    pub fn stakes(&self) -> StakeServiceClient<Channel> {
        StakeServiceClient::new(self.channel.clone())
    }

    pub fn bets(&self) -> BettingServiceClient<Channel> {
        BettingServiceClient::new(self.channel.clone())
    }

    pub fn rounds(&self) -> SettlementServiceClient<Channel> {
        SettlementServiceClient::new(self.channel.clone())
    }

    pub fn betting(&self) -> &BettingService {
        self.betting
            .as_ref()
            .expect("this app runs the betting role")
    }

    pub async fn deposit(&self, user: i64, amount: &str) -> pb::DepositResponse {
        self.wallet()
            .deposit(authed(
                pb::DepositRequest {
                    user_id: user,
                    amount: amount.into(),
                    idempotency_key: format!("dep-{}", Uuid::new_v4()),
                    reference: String::new(),
                },
                &self.cashier_token(),
            ))
            .await
            .expect("deposit")
            .into_inner()
    }

    /// A bet as an older release's instance leaves it when it dies between
    /// its saga's steps: written PLACING and, with `held`, its stake held
    /// (HoldStake, `BET:{bet_id}`) but the row not yet PENDING. This
    /// release places new bets in one transaction and never leaves such a
    /// row; it still completes them (the recovery pass, a retry by key).
    pub async fn legacy_placing(
        &self,
        user: i64,
        round: &str,
        amount: &str,
        key: &str,
        held: bool,
    ) -> betting_bets::BetRow {
        use betting_domain::{BetId, IdempotencyKey, RoundId, Side, Stake, UserId};
        let row = self
            .betting()
            .store()
            .insert_placing(
                BetId::generate(),
                UserId::new(user).expect("user"),
                &IdempotencyKey::parse(key).expect("key"),
                &RoundId::parse(round).expect("round"),
                Side::A,
                Stake::parse(amount).expect("stake"),
            )
            .await
            .expect("insert PLACING")
            .expect("the round is open and the key new");
        if held {
            self.stakes()
                .hold_stake(authed(
                    betting_api::pb_internal::HoldStakeRequest {
                        user_id: user,
                        amount: amount.into(),
                        idempotency_key: format!("BET:{}", row.bet_id),
                        bet_id: row.bet_id.to_string(),
                    },
                    &self.service_token(),
                ))
                .await
                .expect("hold the stake");
        }
        row
    }

    pub async fn open_round(&self, round: &str) {
        self.rounds()
            .open_round(authed(
                pb::OpenRoundRequest {
                    round_id: round.into(),
                },
                &self.game_token(),
            ))
            .await
            .expect("open round");
    }

    pub async fn balance(&self, user: i64) -> Decimal {
        let wallet = self
            .wallet()
            .get_wallet(authed(
                pb::GetWalletRequest { user_id: user },
                &self.admin_token(),
            ))
            .await
            .expect("get wallet")
            .into_inner()
            .wallet
            .expect("wallet");
        wallet.balance.parse().expect("balance is a decimal")
    }

    pub async fn place(
        &self,
        user: i64,
        round: &str,
        side: pb::Side,
        amount: &str,
        key: &str,
    ) -> Result<tonic::Response<pb::PlaceBetResponse>, Status> {
        self.bets()
            .place_bet(authed(
                pb::PlaceBetRequest {
                    round_id: round.into(),
                    side: side as i32,
                    amount: amount.into(),
                    idempotency_key: key.into(),
                },
                &self.player(user),
            ))
            .await
    }

    /// Checks the books: every wallet equals the sum of its entries, and all
    /// accounts (the derived system accounts included) sum to zero.
    pub async fn assert_books_balanced(&self) {
        let mismatched: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wallets w LEFT JOIN \
               (SELECT user_id, sum(amount) AS total FROM ledger_entries GROUP BY user_id) e \
               USING (user_id) \
             WHERE w.balance <> coalesce(e.total, 0)",
        )
        .fetch_one(&self.pool)
        .await
        .expect("wallet check");
        assert_eq!(mismatched, 0, "a wallet balance differs from its ledger");
        let total: Option<Decimal> =
            sqlx::query_scalar("SELECT sum(balance) FROM account_balances")
                .fetch_one(&self.pool)
                .await
                .expect("sum of accounts");
        assert_eq!(
            total.unwrap_or_default(),
            Decimal::ZERO,
            "accounts do not sum to zero"
        );
    }

    /// The derived escrow balance.
    pub async fn escrow(&self) -> Decimal {
        let escrow: Option<Decimal> =
            sqlx::query_scalar("SELECT balance FROM account_balances WHERE account = 'ESCROW'")
                .fetch_optional(&self.pool)
                .await
                .expect("escrow")
                .flatten();
        escrow.unwrap_or_default()
    }

    /// Stops the server gracefully and waits until it has drained; then the
    /// app drops (and with it a database it owns).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }
}

/// Tells the server to stop (nothing can wait here); the database the app
/// owns is dropped next, `WITH (FORCE)`, closing the connections the server
/// and the pool still hold.
impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl TestApp {
    pub fn channel_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn admin(&self) -> betting_api::pb::admin_service_client::AdminServiceClient<Channel> {
        betting_api::pb::admin_service_client::AdminServiceClient::new(self.channel.clone())
    }

    /// Runs the audit with no quiescence period: call it once work is done.
    pub async fn assert_audit_clean(&self) {
        let report = betting_audit::run(
            &self.pool,
            &betting_audit::AuditSettings {
                quiescence: Duration::ZERO,
                match_timeout: Duration::from_secs(300),
            },
        )
        .await
        .expect("audit runs");
        assert!(
            report.is_clean(),
            "audit violations: {:#?}",
            report.violations
        );
    }

    pub async fn bet(&self, user: i64, bet_id: &str) -> pb::Bet {
        self.bets()
            .get_bet(authed(
                pb::GetBetRequest {
                    bet_id: bet_id.into(),
                },
                &self.player(user),
            ))
            .await
            .expect("get bet")
            .into_inner()
            .bet
            .expect("bet")
    }

    /// Polls until the bet reaches `status` (the workers run in the background).
    pub async fn wait_for_bet(&self, user: i64, bet_id: &str, status: pb::BetStatus) -> pb::Bet {
        let reached = poll_until(WAIT, async || {
            let bet = self.bet(user, bet_id).await;
            (bet.status == status as i32).then_some(bet)
        })
        .await;
        if let Some(bet) = reached {
            return bet;
        }
        panic!(
            "bet {bet_id} never became {status:?}: {:?}",
            self.bet(user, bet_id).await
        );
    }

    pub async fn round(&self, round: &str) -> pb::Round {
        self.rounds()
            .get_round(authed(
                pb::GetRoundRequest {
                    round_id: round.into(),
                },
                &self.game_token(),
            ))
            .await
            .expect("get round")
            .into_inner()
            .round
            .expect("round")
    }

    /// Polls until the round has no outstanding work.
    pub async fn wait_for_round_done(&self, round: &str) -> pb::Round {
        let done = poll_until(WAIT, async || {
            let r = self.round(round).await;
            r.stats
                .as_ref()
                .is_some_and(|s| s.outstanding_jobs == 0)
                .then_some(r)
        })
        .await;
        if let Some(r) = done {
            return r;
        }
        panic!(
            "round {round} never finished: {:?}",
            self.round(round).await
        );
    }

    pub async fn settle_round(&self, round: &str, side: pb::Side) -> Result<pb::Round, Status> {
        self.rounds()
            .settle_round(authed(
                pb::SettleRoundRequest {
                    round_id: round.into(),
                    winning_side: side as i32,
                },
                &self.game_token(),
            ))
            .await
            .map(|r| r.into_inner().round.expect("round"))
    }

    pub async fn void_round(&self, round: &str) -> Result<pb::Round, Status> {
        self.rounds()
            .void_round(authed(
                pb::VoidRoundRequest {
                    round_id: round.into(),
                    reason: "game server crashed".into(),
                },
                &self.game_token(),
            ))
            .await
            .map(|r| r.into_inner().round.expect("round"))
    }

    pub async fn place_ok(&self, user: i64, round: &str, side: pb::Side, amount: &str) -> pb::Bet {
        self.place(user, round, side, amount, &Uuid::new_v4().to_string())
            .await
            .expect("place bet")
            .into_inner()
            .bet
            .expect("bet")
    }
}

impl TestApp {
    /// How many bets are in `status`.
    pub async fn count_bets(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM bets WHERE status = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await
            .expect("count bets")
    }
}

impl TestApp {
    /// Opens a wallet with `balance` in one go, written as the wallet writes a
    /// deposit (a wallet near the balance limit would take a thousand
    /// deposits of the largest amount).
    pub async fn genesis(&self, user: i64, balance: Decimal) {
        genesis(&self.pool, user, balance)
            .await
            .expect("genesis wallet");
    }
}

/// Opens `user`'s wallet with `balance` in one go, written as the wallet
/// writes a deposit (idempotency key `genesis-{user}`).
pub async fn genesis(pool: &PgPool, user: i64, balance: Decimal) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO wallets (user_id, balance) VALUES ($1, $2)")
        .bind(user)
        .bind(balance)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO ledger_entries (transfer_id, idempotency_key, kind, user_id, \
           counterparty, amount, balance_after, reference) \
         VALUES ($1, $2, 'DEPOSIT', $3, 'EXTERNAL', $4, $4, 'genesis')",
    )
    .bind(Uuid::now_v7())
    .bind(format!("genesis-{user}"))
    .bind(user)
    .bind(balance)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
