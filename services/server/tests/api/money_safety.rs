//! Regression tests for the ways money could be stranded, doubled or lost
//! that a reading of the code found (issue: money safety under every
//! interleaving). Each failed on the code before its fix.

use std::time::Duration;

use betting_api::pb;
use betting_auth::{ServiceCredentials, TokenMinter};
use betting_bets::{BetStore, BettingError, BettingService, recovery::RecoverySettings};
use betting_domain::{BetId, IdempotencyKey, RoundId, Side, Stake, UserId};
use betting_wallet_client::WalletClient;
use futures::future::join_all;
use rust_decimal::Decimal;
use tonic::Code;

use betting_test_kit::{API_ONLY, TestApp, authed, dec, eventually, expect_code, reason};

/// 10^15, the wallet balance limit deposits may not cross.
const BALANCE_LIMIT: i64 = 1_000_000_000_000_000;

fn recover_now() -> RecoverySettings {
    RecoverySettings {
        placing_grace: Duration::ZERO,
        ..RecoverySettings::default()
    }
}

/// Bug 1, first trigger: two HoldStakes with the same key at once. The second
/// used to re-check the balance after the first committed and answer
/// INSUFFICIENT_FUNDS without looking at the key again; the betting side then
/// raced "rejected" against "pending" and could end REJECTED with the stake held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_bets_racing_on_exactly_one_stake_get_one_answer() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    for user in 1..=15_i64 {
        app.deposit(user, "5").await;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(3));
        let results = join_all((0..3).map(|_| {
            let (app, barrier) = (&app, barrier.clone());
            async move {
                barrier.wait().await;
                app.place(user, "r", pb::Side::A, "5", "only-one").await
            }
        }))
        .await;
        let ids: Vec<String> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|s| panic!("user {user}: a copy failed: {s:?}"))
                    .into_inner()
                    .bet
                    .expect("bet")
                    .bet_id
            })
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "one bet: {ids:?}");
        assert_eq!(app.balance(user).await, dec("0"));
        assert_eq!(
            app.bet(user, &ids[0]).await.status(),
            pb::BetStatus::Pending
        );
    }
    assert_eq!(app.count_bets("REJECTED").await, 0);
    app.assert_audit_clean().await;
}

/// Bug 1, second trigger: a recovery pass completing a stale copy of a
/// PLACING row after the bet was rejected and the balance rose. HoldStake
/// used to take a fresh debit for the REJECTED bet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_recovery_never_stakes_a_rejected_bet() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    let user = UserId::new(7).expect("user");
    let betting = app.betting();
    let row = betting
        .store()
        .insert_placing(
            BetId::generate(),
            user,
            &IdempotencyKey::parse("stale").expect("key"),
            &RoundId::parse("r").expect("round"),
            Side::A,
            Stake::parse("10").expect("stake"),
        )
        .await
        .expect("insert")
        .expect("round open");
    // Another instance read the row while it was PLACING.
    let stale = row.clone();
    let rejected = betting.complete(row, false).await;
    assert!(
        matches!(rejected, Err(BettingError::InsufficientFunds)),
        "{rejected:?}"
    );
    app.deposit(7, "10").await;
    let late = betting.complete(stale, true).await;
    assert!(
        matches!(late, Err(BettingError::InsufficientFunds)),
        "the rejection stands: {late:?}"
    );
    assert_eq!(app.balance(7).await, dec("10"), "nothing was staked");
    assert_eq!(app.count_bets("REJECTED").await, 1);
    app.assert_audit_clean().await;
}

/// Bug 1, third trigger: a refusal that is not about funds (here a credential
/// the wallet does not accept) used to be taken as "nothing was debited",
/// though an earlier attempt whose reply was lost held the stake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_wallet_call_after_a_lost_reply_leaves_the_bet_placing() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    app.deposit(8, "10").await;
    // The stake is held, then the process (of an older release, which
    // placed in three steps) "dies" before the bet is PENDING.
    app.legacy_placing(8, "r", "10", "lost", true).await;
    assert_eq!(app.balance(8).await, dec("0"), "the stake was taken");
    assert_eq!(app.count_bets("PLACING").await, 1);

    // A betting instance whose wallet credentials are refused (a rotated secret).
    let refused = WalletClient::new(
        &format!("http://{}", app.addr),
        ServiceCredentials::new(TokenMinter::new(
            b"a-rotated-secret-nobody-accepts-any-more",
            None,
            None,
        )),
    )
    .expect("client");
    let publisher =
        betting_streams::Publisher::new(app.queues.matches.client().clone(), &app.namespace);
    let rogue = BettingService::new(
        BetStore::new(app.pool.clone()),
        refused,
        app.queues.matches.clone(),
        publisher,
    );
    rogue.recover(&recover_now()).await;
    assert_eq!(
        app.count_bets("REJECTED").await,
        0,
        "not rejected on a refusal"
    );
    assert_eq!(app.count_bets("PLACING").await, 1);

    // An instance with good credentials finishes it.
    app.betting().recover(&recover_now()).await;
    assert_eq!(app.count_bets("PENDING").await, 1);
    assert_eq!(app.balance(8).await, dec("0"));
    app.assert_audit_clean().await;
}

async fn withdraw(
    app: &TestApp,
    user: i64,
    amount: &str,
    key: &str,
) -> Result<pb::WithdrawResponse, tonic::Status> {
    app.wallet()
        .withdraw(authed(
            pb::WithdrawRequest {
                user_id: user,
                amount: amount.into(),
                idempotency_key: key.into(),
                reference: String::new(),
            },
            &app.cashier_token(),
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn deposit(
    app: &TestApp,
    user: i64,
    amount: &str,
    key: &str,
) -> Result<pb::DepositResponse, tonic::Status> {
    app.wallet()
        .deposit(authed(
            pb::DepositRequest {
                user_id: user,
                amount: amount.into(),
                idempotency_key: key.into(),
                reference: String::new(),
            },
            &app.cashier_token(),
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The wallet's contract for Withdraw: a concurrent same-key retry used to be
/// told INSUFFICIENT_FUNDS for a withdrawal that happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_withdrawal_retries_get_the_original_answer() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=15_i64 {
        app.deposit(user, "30").await;
        let key = format!("payout-{user}");
        let results = join_all((0..3).map(|_| withdraw(&app, user, "30", &key))).await;
        let entries: Vec<i64> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|s| panic!("user {user}: {s:?}"))
                    .entry
                    .expect("entry")
                    .entry_id
            })
            .collect();
        assert!(entries.iter().all(|e| *e == entries[0]), "{entries:?}");
        assert_eq!(app.balance(user).await, dec("0"));
    }
    app.assert_audit_clean().await;
}

/// The same for Deposit near the balance limit: the retry used to hit the
/// limit after the original committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deposit_retries_near_the_limit_get_the_original_answer() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=10_i64 {
        app.genesis(user, Decimal::from(BALANCE_LIMIT - 10)).await;
        let key = format!("top-up-{user}");
        let results = join_all((0..3).map(|_| deposit(&app, user, "10", &key))).await;
        let entries: Vec<i64> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|s| panic!("user {user}: {s:?}"))
                    .entry
                    .expect("entry")
                    .entry_id
            })
            .collect();
        assert!(entries.iter().all(|e| *e == entries[0]), "{entries:?}");
        assert_eq!(app.balance(user).await, Decimal::from(BALANCE_LIMIT));
    }
    app.assert_audit_clean().await;
}

/// A refusal is the key's answer for good: the same request gets it again
/// even after the balance would now allow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_is_the_final_answer_for_its_key() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    let status = expect_code(
        withdraw(&app, 3, "5", "w-1").await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    let status = expect_code(
        app.place(3, "r", pb::Side::B, "5", "b-1").await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");

    app.deposit(3, "10").await;
    let status = expect_code(
        withdraw(&app, 3, "5", "w-1").await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        reason(&status),
        "INSUFFICIENT_FUNDS",
        "the same key, the same answer"
    );
    let status = expect_code(
        app.place(3, "r", pb::Side::B, "5", "b-1").await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    // Another payload under a refused key is a reused key.
    expect_code(withdraw(&app, 3, "6", "w-1").await, Code::AlreadyExists);
    // A new key is a new request.
    withdraw(&app, 3, "5", "w-2").await.expect("new key");
    assert_eq!(app.balance(3).await, dec("5"));
    app.assert_audit_clean().await;
}

/// Bug 2: a stake above half the largest amount could never be paid (the
/// payout is twice the stake). Stakes are capped so that every accepted bet
/// can be paid, and a bet at the cap is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_accepted_stake_can_be_paid() {
    let app = TestApp::spawn().await;
    app.open_round("big").await;
    for user in [1, 2] {
        app.deposit(user, "1000000000000").await;
    }
    for too_big in ["500000000000.00000001", "1000000000000"] {
        let status = expect_code(
            app.place(1, "big", pb::Side::A, too_big, too_big).await,
            Code::InvalidArgument,
        );
        assert_eq!(betting_test_kit::bad_fields(&status), ["amount"]);
    }
    let a = app.place_ok(1, "big", pb::Side::A, "500000000000").await;
    let b = app.place_ok(2, "big", pb::Side::B, "500000000000").await;
    app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    app.wait_for_bet(2, &b.bet_id, pb::BetStatus::Matched).await;
    app.settle_round("big", pb::Side::A).await.expect("settle");
    app.wait_for_round_done("big").await;
    let won = app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Settled).await;
    assert_eq!(won.payout.as_deref(), Some("1000000000000"));
    assert_eq!(app.balance(1).await, dec("1500000000000"));
    assert_eq!(app.balance(2).await, dec("500000000000"));
    app.assert_audit_clean().await;
}

/// Bug 4: money owed past the balance limit (a refund or a payout into a
/// wallet that deposits filled up) used to retry or die for ever. The limit
/// applies to deposits only: owed money is always credited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_and_payouts_land_past_the_deposit_limit() {
    let app = TestApp::spawn().await;
    app.open_round("full").await;
    let whale = 900;
    app.genesis(whale, Decimal::from(BALANCE_LIMIT - 5)).await;
    let cancelled = app.place_ok(whale, "full", pb::Side::B, "3").await;
    let winner = app.place_ok(whale, "full", pb::Side::A, "10").await;
    app.deposit(901, "10").await;
    let loser = app.place_ok(901, "full", pb::Side::B, "10").await;
    app.wait_for_bet(whale, &winner.bet_id, pb::BetStatus::Matched)
        .await;
    app.wait_for_bet(901, &loser.bet_id, pb::BetStatus::Matched)
        .await;
    // Deposits fill the wallet to the limit, and no further.
    app.deposit(whale, "18").await;
    assert_eq!(app.balance(whale).await, Decimal::from(BALANCE_LIMIT));
    let status = expect_code(
        deposit(&app, whale, "1", "over").await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "BALANCE_LIMIT");

    let refunded = app
        .bets()
        .cancel_bet(authed(
            pb::CancelBetRequest {
                bet_id: cancelled.bet_id.clone(),
            },
            &app.player(whale),
        ))
        .await
        .expect("cancel: the refund lands")
        .into_inner();
    assert_eq!(refunded.balance, (BALANCE_LIMIT + 3).to_string());
    app.settle_round("full", pb::Side::A).await.expect("settle");
    app.wait_for_round_done("full").await;
    app.wait_for_bet(whale, &winner.bet_id, pb::BetStatus::Settled)
        .await;
    assert_eq!(app.balance(whale).await, Decimal::from(BALANCE_LIMIT + 23));
    app.assert_audit_clean().await;
}

/// Found by the simulation (seeds 1107 and 1119): a PlaceBet racing the
/// OpenRound of its round could find the round missing at its insert and open
/// right after, and answered INTERNAL. It is answered as of its insert now:
/// ROUND_NOT_FOUND, and a retry places the bet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bet_racing_the_opening_of_its_round_gets_a_clear_answer() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(5, "1000").await;
    for i in 0..100 {
        let round = format!("race-{i}");
        let (_, placed) = tokio::join!(
            app.open_round(&round),
            app.place(5, &round, pb::Side::A, "1", &round)
        );
        match placed {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                assert_eq!(reason(&status), "ROUND_NOT_FOUND");
                app.place(5, &round, pb::Side::A, "1", &round)
                    .await
                    .expect("the retry places the bet");
            }
        }
    }
    assert_eq!(app.count_bets("PENDING").await, 100);
}

/// The dead-letter policy: a settle job that died stays dead — the reconciler
/// used to put it back every pass, so a poison job cycled for ever — and the
/// money it holds up is counted until an operator requeues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_settle_job_stays_dead_and_its_money_is_counted() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("poison").await;
    for user in [1, 2] {
        app.deposit(user, "10").await;
    }
    app.place_ok(1, "poison", pb::Side::A, "4").await;
    app.place_ok(2, "poison", pb::Side::B, "4").await;
    // No matcher runs here: match by hand, then settle.
    let matcher = betting_bets::matcher::Matcher::new(app.pool.clone());
    let round_bets: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT bet_id FROM bets")
        .fetch_all(&app.pool)
        .await
        .expect("bets");
    matcher.match_bet(round_bets[0]).await.expect("match");
    app.settle_round("poison", pb::Side::A)
        .await
        .expect("settle");

    // The settle job dies.
    let settle = &app.queues.settle;
    let blocking =
        betting_queue::connect(&std::env::var("REDIS_URL").expect("REDIS_URL")).expect("redis");
    let job = eventually(
        "the settle job was enqueued",
        // Twenty fetches of at most 500 ms each, and the pauses between.
        Duration::from_secs(11),
        async || {
            settle
                .fetch(&blocking, "poisoned-consumer", Duration::from_millis(500))
                .await
                .expect("fetch")
        },
    )
    .await;
    settle
        .fail("poisoned-consumer", &job, "poisoned", true)
        .await
        .expect("fail");
    let money = betting_reconciler::stuck::dead_money(&app.pool, settle)
        .await
        .expect("dead money");
    assert_eq!(money, dec("8"), "the payout the dead job holds up");

    // The reconciler finds the unpaid match, but does not resurrect the job.
    let report = app
        .reconciler_with(betting_reconciler::ReconcilerSettings {
            retry_after: Duration::ZERO,
            ..Default::default()
        })
        .pass()
        .await
        .expect("pass");
    assert_eq!(report.settle_jobs, 1);
    let stats = settle.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (0, 1));

    // An operator requeues it.
    assert!(settle.retry_dead(&job.id).await.expect("retry"));
    let stats = settle.stats().await.expect("stats");
    assert_eq!((stats.waiting, stats.dead), (1, 0));
}

/// Bug 3, through the server: a matcher process stopped gracefully while its
/// fetch was blocked used to drop the fetch, but Redis kept it blocked; a job
/// pushed right after landed in the active list of a consumer that had
/// already left, where nothing ever looked again (and the job's entry made
/// every re-enqueue a no-op). Now the stopping worker lets its fetch finish
/// and hands back what it got, and the reaper sweeps lease-less lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_pushed_while_a_matcher_stops_is_still_run() {
    let url = betting_test_kit::fresh_database().await;
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL");
    let mut api_settings = betting_test_kit::settings(&url, &redis);
    api_settings.roles = API_ONLY.to_vec();
    let namespace = api_settings.redis_namespace.clone();
    let api = TestApp::spawn_with(api_settings).await;
    let matcher_settings = || {
        let mut s = betting_test_kit::settings(&url, &redis);
        s.roles = vec![betting_config::ProcessRole::Matcher];
        s.redis_namespace = namespace.clone();
        s
    };
    api.open_round("r").await;
    for user in [1, 2] {
        api.deposit(user, "10").await;
    }
    let first = TestApp::spawn_with(matcher_settings()).await;
    let a = api.place_ok(1, "r", pb::Side::A, "5").await;
    // Its match job ran (nothing to pair yet) and the matcher sits in BLMOVE.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.stop().await;
    // Within the blocked fetch's second: the partner's match job.
    let b = api.place_ok(2, "r", pb::Side::B, "5").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _second = TestApp::spawn_with(matcher_settings()).await;
    api.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    api.wait_for_bet(2, &b.bet_id, pb::BetStatus::Matched).await;
}

/// Refunds made by the reconciler (a match timeout here) used to reach live
/// streams only through the hubs' once-a-second sweep: nothing published
/// them. Every change of a bet now goes out as a change note.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_made_by_the_reconciler_is_announced() {
    use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
    let url = betting_test_kit::fresh_database().await;
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL");
    let mut settings = betting_test_kit::settings(&url, &redis);
    settings.reconcile_interval_ms = 200;
    settings.match_timeout_secs = 1;
    let app = TestApp::spawn_with(settings).await;

    let listener = fred::prelude::Client::new(
        fred::prelude::Config::from_url(&redis).expect("url"),
        None,
        None,
        None,
    );
    listener.init().await.expect("connect");
    let mut notes = listener.message_rx();
    listener
        .subscribe(betting_streams::channel(&app.namespace))
        .await
        .expect("subscribe");

    app.open_round("lonely").await;
    app.deposit(4, "5").await;
    let bet = app.place_ok(4, "lonely", pb::Side::A, "5").await;
    let announced = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let Ok(message) = notes.recv().await else {
                return false;
            };
            let text = message.value.as_string().unwrap_or_default();
            // Version 1 is PENDING; the refund is version 2.
            if text.contains(&bet.bet_id) && text.contains("\"v\":2") {
                return true;
            }
        }
    })
    .await;
    assert_eq!(announced, Ok(true), "the refund was published");
    let refunded = app.bet(4, &bet.bet_id).await;
    assert_eq!(refunded.status(), pb::BetStatus::Refunded);
    assert_eq!(refunded.refund_reason(), pb::RefundReason::MatchTimeout);
}

/// Found by the simulation: a settle job whose payout was refused for the
/// settler's credentials (a rotated secret) went straight to the dead-letter
/// list. It is retried instead, using up no attempt: the wallet never looked
/// at the payout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_refused_for_credentials_is_retried_not_buried() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("cred").await;
    for user in [1, 2] {
        app.deposit(user, "10").await;
    }
    app.place_ok(1, "cred", pb::Side::A, "4").await;
    app.place_ok(2, "cred", pb::Side::B, "4").await;
    let first: uuid::Uuid = sqlx::query_scalar("SELECT bet_id FROM bets LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .expect("bet");
    betting_bets::matcher::Matcher::new(app.pool.clone())
        .match_bet(first)
        .await
        .expect("match");
    app.settle_round("cred", pb::Side::A).await.expect("settle");
    let match_id: uuid::Uuid = sqlx::query_scalar("SELECT match_id FROM matches")
        .fetch_one(&app.pool)
        .await
        .expect("match");
    let refused = WalletClient::new(
        &format!("http://{}", app.addr),
        ServiceCredentials::new(TokenMinter::new(
            b"a-rotated-secret-nobody-accepts-any-more",
            None,
            None,
        )),
    )
    .expect("client");
    let handler = betting_settlement::settler::SettleHandler::new(
        betting_settlement::RoundStore::new(app.pool.clone()),
        refused,
    );
    let result = handler.settle(match_id).await;
    assert!(
        matches!(result, Err(betting_queue::JobError::Unavailable(_))),
        "{result:?}"
    );
}
