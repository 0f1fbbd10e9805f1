//! The internal money RPCs verify what they are asked (`services/wallet/src/due.rs`):
//! a service token — leaked, or held by a buggy caller — can move only money
//! the books owe. Each test failed on the code before the check: the wallet
//! paid or refunded whatever a service token asked for, as long as the
//! stakes were held.

use betting_api::{pb, pb_internal as pbi};
use tonic::Code;
use uuid::Uuid;

use betting_test_kit::{API_ONLY, TestApp, authed, dec, expect_code, reason};

use crate::attack::matched_pair;

/// The match's two bet ids, as stored.
async fn bets_of(app: &TestApp, match_id: Uuid) -> Vec<String> {
    let (a, b): (Uuid, Uuid) =
        sqlx::query_as("SELECT bet_a_id, bet_b_id FROM matches WHERE match_id = $1")
            .bind(match_id)
            .fetch_one(&app.pool)
            .await
            .expect("match");
    vec![a.to_string(), b.to_string()]
}

async fn pay(
    app: &TestApp,
    user: i64,
    amount: &str,
    match_id: Uuid,
    bets: Vec<String>,
) -> Result<tonic::Response<pbi::PayWinningsResponse>, tonic::Status> {
    app.stakes()
        .pay_winnings(authed(
            pbi::PayWinningsRequest {
                user_id: user,
                amount: amount.into(),
                idempotency_key: format!("SETTLE:{match_id}"),
                match_id: match_id.to_string(),
                bet_ids: bets,
            },
            &app.service_token(),
        ))
        .await
}

async fn refund(
    app: &TestApp,
    user: i64,
    amount: &str,
    bet: &str,
) -> Result<tonic::Response<pbi::RefundStakeResponse>, tonic::Status> {
    app.stakes()
        .refund_stake(authed(
            pbi::RefundStakeRequest {
                user_id: user,
                amount: amount.into(),
                idempotency_key: format!("REFUND:{bet}"),
                bet_id: bet.into(),
            },
            &app.service_token(),
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payout_of_an_unsettled_round_is_refused_and_does_not_block_the_real_one() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    app.open_round("r").await;
    let (_, _, match_id) = matched_pair(&app, "r", 1, 2, "10").await;
    let bets = bets_of(&app, match_id).await;

    // Before the round is settled: nothing is owed yet.
    let early = expect_code(
        pay(&app, 1, "20", match_id, bets.clone()).await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&early), "PAYOUT_NOT_DUE");
    assert!(early.message().contains("not settled"), "{early:?}");
    assert_eq!(app.balance(1).await, dec("0"));

    // Once it is, the same key pays: the early refusal was not its answer.
    app.settle_round("r", pb::Side::A).await.expect("settle");
    pay(&app, 1, "20", match_id, bets)
        .await
        .expect("the payout owed");
    assert_eq!(app.balance(1).await, dec("20"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payout_to_the_loser_or_of_a_wrong_amount_is_refused() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=4 {
        app.deposit(user, "10").await;
    }
    app.open_round("r").await;
    let (_, _, match_id) = matched_pair(&app, "r", 1, 2, "10").await;
    let (c, d, _) = matched_pair(&app, "r", 3, 4, "10").await;
    app.settle_round("r", pb::Side::A).await.expect("settle");
    let bets = bets_of(&app, match_id).await;

    // User 2 bet on B and lost; user 3 is not in the match.
    for (user, amount) in [(2, "20"), (3, "20"), (1, "30"), (1, "10")] {
        let status = expect_code(
            pay(&app, user, amount, match_id, bets.clone()).await,
            Code::FailedPrecondition,
        );
        assert_eq!(
            reason(&status),
            "PAYOUT_NOT_DUE",
            "{user} {amount}: {status:?}"
        );
    }
    // The bets of another match under this match's key (user 3 won that one).
    let status = expect_code(
        pay(&app, 3, "20", match_id, vec![c, d]).await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "PAYOUT_NOT_DUE", "{status:?}");
    for user in 2..=4 {
        assert_eq!(app.balance(user).await, dec("0"));
    }

    // None of these refusals was recorded under the key: the winner's payout goes through.
    pay(&app, 1, "20", match_id, bets)
        .await
        .expect("the payout owed");
    assert_eq!(app.balance(1).await, dec("20"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_of_a_matched_or_pending_bet_is_refused() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    for user in 1..=3 {
        app.deposit(user, "10").await;
    }
    app.open_round("r").await;
    let (a, b, _) = matched_pair(&app, "r", 1, 2, "10").await;
    let pending = app.place_ok(3, "r", pb::Side::A, "4").await;

    for (user, amount, bet) in [(1, "10", &a), (2, "10", &b), (3, "4", &pending.bet_id)] {
        let status = expect_code(
            refund(&app, user, amount, bet).await,
            Code::FailedPrecondition,
        );
        assert_eq!(reason(&status), "REFUND_NOT_DUE", "{bet}: {status:?}");
    }
    assert_eq!(app.balance(1).await, dec("0"));
    assert_eq!(app.balance(2).await, dec("0"));
    assert_eq!(app.balance(3).await, dec("6"));

    // Once the round is voided the refunds are owed, and the same keys pay them.
    app.void_round("r").await.expect("void");
    for (user, amount, bet) in [(1, "10", &a), (2, "10", &b), (3, "4", &pending.bet_id)] {
        refund(&app, user, amount, bet).await.expect("owed now");
    }
    for user in 1..=3 {
        assert_eq!(app.balance(user).await, dec("10"));
    }
}
