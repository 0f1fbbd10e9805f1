//! Hostile review of the money paths (a reviewer briefed to find an
//! interleaving that loses, strands, doubles or invents money): each test
//! showed one such way, failed on the code it was written against, and
//! passes since its fix. The doc comment of each says what it showed.

use std::{sync::Arc, time::Duration};

use betting_api::{IDEMPOTENT_REPLAYED, pb, pb_internal as pbi};
use betting_auth::{ServiceCredentials, TokenMinter};
use betting_bets::matcher::Matcher;
use betting_queue::{Queue, QueueSettings, Worker, WorkerSettings};
use betting_reconciler::ReconcilerSettings;
use betting_refunds::{Outbox, RefundHandler, Refunder};
use betting_settlement::{RoundStore, settler::SettleHandler};
use betting_wallet_client::WalletClient;
use rust_decimal::Decimal;
use tonic::Code;
use uuid::Uuid;

use betting_test_kit::{API_ONLY, SECRET, TestApp, authed, dec, poll_until, reason};

fn wallet_client(endpoint: &str) -> WalletClient {
    WalletClient::new(
        endpoint,
        ServiceCredentials::new(TokenMinter::new(SECRET.as_bytes(), None, None)),
    )
    .expect("wallet client")
}

pub(crate) fn good_wallet(app: &TestApp) -> WalletClient {
    wallet_client(&format!("http://{}", app.addr))
}

/// A wallet endpoint nothing listens on: every call fails UNAVAILABLE.
fn dead_wallet() -> WalletClient {
    wallet_client(&format!(
        "http://127.0.0.1:{}",
        betting_test_kit::free_port()
    ))
}

/// Runs `handler` on `queue` until `done` says so (or `limit` passes).
pub(crate) async fn run_worker<H: betting_queue::Handler>(
    queue: Queue,
    handler: H,
    limit: Duration,
    done: impl AsyncFn() -> bool,
) {
    let worker = Worker::new(
        queue,
        betting_queue::connect(&std::env::var("REDIS_URL").expect("REDIS_URL")).expect("redis"),
        WorkerSettings {
            poll: Duration::from_millis(50),
            concurrency: 2,
            shutdown_grace: Duration::from_secs(2),
        },
    )
    .expect("worker settings");
    let (stop, stopped) = betting_shutdown::channel();
    let running = tokio::spawn(worker.run(Arc::new(handler), stopped));
    // Not an assertion: the caller checks what the worker did.
    poll_until(limit, async || done().await.then_some(())).await;
    stop.signal();
    running.await.expect("worker stops");
}

/// A bet of `user`, matched against a bet of `other` (run by the test's own
/// matcher): returns (bet of user, bet of other, match id).
pub(crate) async fn matched_pair(
    app: &TestApp,
    round: &str,
    user: i64,
    other: i64,
    stake: &str,
) -> (String, String, Uuid) {
    let a = app.place_ok(user, round, pb::Side::A, stake).await;
    let b = app.place_ok(other, round, pb::Side::B, stake).await;
    Matcher::new(app.pool.clone())
        .match_bet(a.bet_id.parse().expect("uuid"))
        .await
        .expect("match");
    let a = app.bet(user, &a.bet_id).await;
    assert_eq!(a.status, pb::BetStatus::Matched as i32, "{a:?}");
    let match_id = a.match_id.parse().expect("match id");
    (a.bet_id, b.bet_id, match_id)
}

/// STRANDED a refund for good. A round is voided during a wallet outage; the
/// refund job fails UNAVAILABLE on each of its 10 attempts and goes to the
/// dead-letter hash. Once the wallet is back, nothing carries the refund out:
/// the reconciler re-derives the owed refund from `wallet_commands`, but
/// ENQUEUE now refuses an id that is dead ("dead stays dead"), so the user's
/// stake sits in escrow until an operator runs `betting queue retry`. The same
/// holds for settle jobs (unpaid matches). With the production backoff
/// (0.5 s doubling, capped at 60 s, 10 attempts) an outage of about 1.5 to 3
/// minutes is enough; the test compresses the backoff (a queue handle on the
/// same Redis keys with a 1 ms base), nothing else.
///
/// Failed before: the balance stayed 0 and the audit reported the missing
/// refund. Now an outage uses up no attempt (`JobError::Unavailable`): the
/// job is deferred, never buried, and runs once the wallet is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_a_wallet_outage_longer_than_the_attempts_never_buries_a_refund() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "10").await;
    app.open_round("r").await;
    let bet = app.place_ok(1, "r", pb::Side::A, "10").await;
    app.void_round("r").await.expect("void");
    assert_eq!(
        app.balance(1).await,
        dec("0"),
        "the refund is owed, not done"
    );

    // The outage: the refunder cannot reach the wallet, for more failures
    // than the job has attempts.
    let during_outage = Queue::new(
        app.queues.refund.client().clone(),
        &app.namespace,
        app.queues.refund.name(),
        QueueSettings {
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            visibility_timeout: Duration::from_millis(600),
            ..app.queues.refund.settings().clone()
        },
    );
    assert_eq!(
        during_outage.settings().max_attempts,
        10,
        "production budget"
    );
    let q = app.queues.refund.clone();
    let job_id = format!("refund:REFUND:{}", bet.bet_id);
    let outlasted = async || {
        q.job(&job_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|job| job.outages > 12)
    };
    run_worker(
        during_outage,
        RefundHandler::new(Refunder::new(Outbox::new(app.pool.clone()), dead_wallet())),
        Duration::from_secs(30),
        outlasted,
    )
    .await;
    let stats = app.queues.refund.stats().await.expect("stats");
    assert_eq!(stats.dead, 0, "an outage buries nothing");
    let job = app
        .queues
        .refund
        .job(&job_id)
        .await
        .expect("job")
        .expect("the refund job is still queued");
    assert!(job.outages > 12, "{job:?}");
    assert_eq!(job.attempts, 0, "an outage uses up no attempt");

    // The wallet is back. The reconciler finds the refund owed and tries to
    // enqueue it; real refunders run.
    let reconciler = app.reconciler_with(ReconcilerSettings::default());
    let report = reconciler.pass().await.expect("pass");
    assert_eq!(report.refund_jobs, 1, "the reconciler knows it is owed");
    let app_ref = &app;
    run_worker(
        app.queues.refund.clone(),
        RefundHandler::new(Refunder::new(
            Outbox::new(app.pool.clone()),
            good_wallet(&app),
        )),
        Duration::from_secs(5),
        async || app_ref.balance(1).await == dec("10"),
    )
    .await;
    assert_eq!(
        app.balance(1).await,
        dec("10"),
        "the voided bet {} was never refunded: its job is dead and the reconciler may not requeue it",
        bet.bet_id
    );
    app.assert_audit_clean().await;
}

/// STRANDED a payout behind an INTERNAL answer. Money owed is credited past
/// the deposit limit, up to the column's backstop (10^18, which keeps sums
/// inside rust_decimal's range at 8 fractional digits). A payout past the
/// backstop (reachable only through winnings: a thousand wallets' worth of
/// deposits won by one player) used to violate the CHECK, come back as
/// INTERNAL, be retried as "unavailable" and never settle. Now it is parked
/// visibly for an operator: the wallet answers FAILED_PRECONDITION
/// BALANCE_LIMIT, the settle job fails for good (to the dead-letter list,
/// where its money is counted), and the bets stay MATCHED until a human acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_a_payout_past_the_balance_backstop_is_parked_visibly() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    // A winner who already won a lot (written as the wallet writes it).
    app.genesis(
        1,
        Decimal::from(1_000_000_000_000_000_000_i64) - Decimal::ONE,
    )
    .await;
    app.deposit(2, "10").await;
    app.open_round("r").await;
    let (_, _, match_id) = matched_pair(&app, "r", 1, 2, "10").await;
    app.settle_round("r", pb::Side::A).await.expect("settle");

    let settler = SettleHandler::new(RoundStore::new(app.pool.clone()), good_wallet(&app));
    let paid = settler.settle(match_id).await;
    // What the wallet itself answers to the payout.
    let direct = app
        .stakes()
        .pay_winnings(authed(
            pbi::PayWinningsRequest {
                user_id: 1,
                amount: "20".into(),
                idempotency_key: format!("SETTLE:{match_id}"),
                match_id: match_id.to_string(),
                bet_ids: sqlx::query_as::<_, (Uuid, Uuid)>(
                    "SELECT bet_a_id, bet_b_id FROM matches WHERE match_id = $1",
                )
                .bind(match_id)
                .fetch_one(&app.pool)
                .await
                .map(|(a, b)| vec![a.to_string(), b.to_string()])
                .expect("bets"),
            },
            &app.service_token(),
        ))
        .await;
    assert!(
        !matches!(&direct, Err(s) if s.code() == Code::Internal),
        "the wallet answers INTERNAL to a payout it owes: {direct:?}"
    );
    let status = direct.expect_err("past the backstop");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "BALANCE_LIMIT");
    assert!(
        matches!(paid, Err(betting_queue::JobError::Permanent(_))),
        "the settle job is parked for an operator, not retried for ever: {paid:?}"
    );
    assert_eq!(
        app.balance(1).await,
        Decimal::from(1_000_000_000_000_000_000_i64) - Decimal::from(11),
        "the stake left; nothing else moved"
    );
}

/// BREAKS the idempotency contract ("the same key with another payload is
/// refused and changes nothing"): a PayWinnings replay compares the user,
/// amount and match id but not the bets. A second PayWinnings under the same
/// `SETTLE:{match}` key naming two other bets — bets whose payout guard was
/// never checked — is answered as a successful replay instead of
/// ALREADY_EXISTS, so a caller believes bets were paid that were not (and
/// `payout_bets` never records them).
///
/// Failed before: the second call succeeded, marked replayed. Now a payout's
/// replay compares the bets it paid (`payout_bets`) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_pay_winnings_replay_ignores_which_bets_it_pays() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=4 {
        app.deposit(user, "10").await;
    }
    app.open_round("r").await;
    let (a, b, match_id) = matched_pair(&app, "r", 1, 2, "10").await;
    let (c, d, _) = matched_pair(&app, "r", 3, 4, "10").await;
    // A payout is owed only once the round is settled (no settler runs
    // here: the matches stay unpaid for the test to pay by hand).
    app.settle_round("r", pb::Side::A).await.expect("settle");
    let pay = |bets: Vec<String>| {
        let mut wallet = app.stakes();
        let request = authed(
            pbi::PayWinningsRequest {
                user_id: 1,
                amount: "20".into(),
                idempotency_key: format!("SETTLE:{match_id}"),
                match_id: match_id.to_string(),
                bet_ids: bets,
            },
            &app.service_token(),
        );
        async move { wallet.pay_winnings(request).await }
    };
    pay(vec![a.clone(), b.clone()])
        .await
        .expect("the real payout");
    // Same key, other payload: the bets of another match.
    let other = pay(vec![c.clone(), d.clone()]).await;
    match other {
        Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        Ok(response) => panic!(
            "a PayWinnings naming bets {c} and {d} was answered as a replay of the payout of {a} and {b} \
             (replayed header: {:?}) instead of ALREADY_EXISTS",
            response.metadata().get(IDEMPOTENT_REPLAYED)
        ),
    }
}

/// BREAKS the idempotency contract ("the same key and payload get the same
/// answer ... the original entry, or the original refusal"): only
/// INSUFFICIENT_FUNDS and BALANCE_LIMIT are recorded under the key. A guard
/// refusal (NO_MATCHING_STAKE, ALREADY_PAID, ALREADY_REFUNDED) is not, so the
/// very same RefundStake that was refused moves money when retried later.
/// (Not reachable through the betting flow today, which only refunds bets
/// whose stake is held; it is the wallet's own contract that fails.)
///
/// Failed before: the retry of the refused refund was credited. Now every
/// refusal, the guards' too, is recorded under its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_a_refused_refund_is_not_the_answer_for_its_key() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "10").await;
    let bet = Uuid::now_v7().to_string();
    let refund = || {
        let mut wallet = app.stakes();
        let request = authed(
            pbi::RefundStakeRequest {
                user_id: 1,
                amount: "10".into(),
                idempotency_key: format!("REFUND:{bet}"),
                bet_id: bet.clone(),
            },
            &app.service_token(),
        );
        async move { wallet.refund_stake(request).await }
    };
    let first = refund().await.expect_err("no stake is held: refused");
    assert_eq!(first.code(), Code::FailedPrecondition);
    assert_eq!(reason(&first), "NO_MATCHING_STAKE");

    app.stakes()
        .hold_stake(authed(
            pbi::HoldStakeRequest {
                user_id: 1,
                amount: "10".into(),
                idempotency_key: format!("BET:{bet}"),
                bet_id: bet.clone(),
            },
            &app.service_token(),
        ))
        .await
        .expect("stake");
    let retry = refund().await;
    assert!(
        matches!(&retry, Err(s) if reason(s) == "NO_MATCHING_STAKE"),
        "the same key and payload got another answer: first NO_MATCHING_STAKE, now {retry:?}"
    );
}
