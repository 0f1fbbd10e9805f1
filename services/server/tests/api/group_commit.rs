//! Group commit (`services/betting/src/placer.rs`, `Ledger::hold_stakes`):
//! batching changes how many bets share a commit, never an outcome. Each
//! hold of a HoldStakes call is answered as a lone HoldStake would be, and
//! concurrent PlaceBets batched together each keep their own answer.

use betting_api::{pb, pb_internal as pbi};
use rust_decimal::Decimal;
use tonic::Code;
use uuid::Uuid;

use betting_test_kit::{TestApp, authed, dec};

use crate::rows;

fn hold(user: i64, amount: &str, bet: Uuid) -> pbi::HoldStakeRequest {
    pbi::HoldStakeRequest {
        user_id: user,
        amount: amount.into(),
        idempotency_key: format!("BET:{bet}"),
        bet_id: bet.to_string(),
    }
}

async fn hold_stakes(
    app: &TestApp,
    holds: Vec<pbi::HoldStakeRequest>,
) -> Vec<pbi::HoldStakeOutcome> {
    app.stakes()
        .hold_stakes(authed(
            pbi::HoldStakesRequest { holds },
            &app.service_token(),
        ))
        .await
        .expect("hold stakes")
        .into_inner()
        .outcomes
}

fn held_balance(outcome: &pbi::HoldStakeOutcome) -> Option<Decimal> {
    match &outcome.outcome {
        Some(pbi::hold_stake_outcome::Outcome::Held(held)) => {
            held.wallet.as_ref().and_then(|w| w.balance.parse().ok())
        }
        _ => None,
    }
}

fn refusal(outcome: &pbi::HoldStakeOutcome) -> Option<(i32, String)> {
    match &outcome.outcome {
        Some(pbi::hold_stake_outcome::Outcome::Refused(r)) => Some((r.code, r.reason.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn each_hold_of_a_batch_gets_its_own_answer() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.deposit(2, "3").await;
    // User 3 has no wallet at all.
    let (a1, a2, b1, c1, bad) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let mut wrong_key = hold(1, "1", bad);
    wrong_key.idempotency_key = format!("BET:{}", Uuid::now_v7());
    let outcomes = hold_stakes(
        &app,
        vec![
            hold(1, "4", a1),
            hold(2, "5", b1), // more than user 2 holds
            hold(1, "6", a2), // exactly what user 1 has left
            hold(3, "1", c1), // no wallet
            wrong_key,        // malformed: refused alone
            hold(1, "4", a1), // the same key again: a replay of the first
        ],
    )
    .await;
    assert_eq!(outcomes.len(), 6);
    assert_eq!(held_balance(&outcomes[0]), Some(dec("6")));
    assert_eq!(
        refusal(&outcomes[1]),
        Some((Code::FailedPrecondition as i32, "INSUFFICIENT_FUNDS".into()))
    );
    assert_eq!(held_balance(&outcomes[2]), Some(dec("0")));
    assert_eq!(
        refusal(&outcomes[3]),
        Some((Code::FailedPrecondition as i32, "INSUFFICIENT_FUNDS".into()))
    );
    assert_eq!(
        refusal(&outcomes[4]).map(|r| r.0),
        Some(Code::InvalidArgument as i32)
    );
    assert_eq!(
        held_balance(&outcomes[5]),
        Some(dec("6")),
        "the first's answer"
    );
    assert!(outcomes[5].replayed);
    assert_eq!(app.balance(1).await, dec("0"));
    assert_eq!(app.balance(2).await, dec("3"));

    // Asked again, one at a time or batched, every key keeps its answer,
    // refusals included, whatever the balance is now.
    app.deposit(2, "10").await;
    let single = app
        .stakes()
        .hold_stake(authed(hold(2, "5", b1), &app.service_token()))
        .await
        .expect_err("the recorded refusal");
    assert_eq!(single.code(), Code::FailedPrecondition);
    let again = hold_stakes(&app, vec![hold(2, "5", b1), hold(1, "6", a2)]).await;
    assert_eq!(
        refusal(&again[0]),
        Some((Code::FailedPrecondition as i32, "INSUFFICIENT_FUNDS".into()))
    );
    assert_eq!(held_balance(&again[1]), Some(dec("0")));
    assert!(again[1].replayed);
    // A key reused with another payload changes nothing.
    let reused = hold_stakes(&app, vec![hold(1, "5", a1)]).await;
    assert_eq!(
        refusal(&reused[0]).map(|r| r.0),
        Some(Code::AlreadyExists as i32)
    );
    assert_eq!(app.balance(2).await, dec("13"));
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn a_batch_refuses_what_no_single_hold_would_take() {
    let app = TestApp::spawn().await;
    // Too many holds, none: refused as a whole, nothing moved.
    let holds: Vec<_> = (0..257).map(|_| hold(1, "1", Uuid::now_v7())).collect();
    let status = app
        .stakes()
        .hold_stakes(authed(
            pbi::HoldStakesRequest { holds },
            &app.service_token(),
        ))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app
        .stakes()
        .hold_stakes(authed(
            pbi::HoldStakesRequest { holds: Vec::new() },
            &app.service_token(),
        ))
        .await
        .expect_err("none");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Only our own services hold stakes.
    let status = app
        .stakes()
        .hold_stakes(authed(
            pbi::HoldStakesRequest {
                holds: vec![hold(1, "1", Uuid::now_v7())],
            },
            &app.player(1),
        ))
        .await
        .expect_err("a player");
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Many users placing at once, so that bets share batches: each user's
/// bets are decided against that user's balance alone, in some order, and
/// the books balance. User `u` holds `u % 4` units and places 3 bets of 1:
/// exactly `min(u % 4, 3)` of them are taken.
#[tokio::test]
async fn concurrent_bets_batched_together_keep_their_own_outcomes() {
    let app = TestApp::spawn().await;
    app.open_round("gc").await;
    let users: Vec<i64> = (1..=40).collect();
    for &u in &users {
        if u % 4 > 0 {
            app.deposit(u, &(u % 4).to_string()).await;
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for &u in &users {
        for n in 0..3 {
            let bets = app.bets();
            let token = app.player(u);
            tasks.spawn(async move {
                let side = if (u + n) % 2 == 0 {
                    pb::Side::A
                } else {
                    pb::Side::B
                };
                let answer = bets
                    .clone()
                    .place_bet(authed(
                        pb::PlaceBetRequest {
                            round_id: "gc".into(),
                            side: side as i32,
                            amount: "1".into(),
                            idempotency_key: format!("k{n}"),
                        },
                        &token,
                    ))
                    .await;
                (u, answer.map(|r| r.into_inner()).map_err(|s| s.code()))
            });
        }
    }
    let mut placed = std::collections::HashMap::<i64, i64>::new();
    while let Some(done) = tasks.join_next().await {
        let (u, answer) = done.expect("task");
        match answer {
            Ok(response) => {
                let bet = response.bet.expect("bet");
                assert_eq!(bet.status, pb::BetStatus::Pending as i32);
                *placed.entry(u).or_default() += 1;
            }
            Err(code) => assert_eq!(code, Code::FailedPrecondition, "user {u}"),
        }
    }
    for &u in &users {
        assert_eq!(
            placed.get(&u).copied().unwrap_or_default(),
            (u % 4).min(3),
            "user {u}"
        );
        assert_eq!(app.balance(u).await, Decimal::ZERO, "user {u}");
    }
    // Retries of every key get the same answers: the placed ones their bet,
    // the rejected ones their refusal, and nothing more is taken.
    for &u in &users {
        let mut ok = 0;
        for n in 0..3 {
            let side = if (u + n) % 2 == 0 {
                pb::Side::A
            } else {
                pb::Side::B
            };
            match app.place(u, "gc", side, "1", &format!("k{n}")).await {
                Ok(_) => ok += 1,
                Err(status) => assert_eq!(status.code(), Code::FailedPrecondition),
            }
        }
        assert_eq!(ok, placed.get(&u).copied().unwrap_or_default(), "user {u}");
        assert_eq!(app.balance(u).await, Decimal::ZERO, "user {u}");
    }
    assert_eq!(app.count_bets("PLACING").await, 0);
    app.assert_books_balanced().await;
}

/// Two PlaceBets with one key at once (a retry racing its original) land
/// in one batch's INSERT: one bet is written, both get it.
#[tokio::test]
async fn a_retry_in_the_same_batch_as_its_original_gets_the_same_bet() {
    let app = TestApp::spawn().await;
    app.open_round("gc2").await;
    app.deposit(7, "100").await;
    for round in 0..10 {
        let key = format!("same-{round}");
        let (a, b) = tokio::join!(
            app.place(7, "gc2", pb::Side::A, "1", &key),
            app.place(7, "gc2", pb::Side::A, "1", &key)
        );
        let a = a.expect("first").into_inner().bet.expect("bet");
        let b = b.expect("second").into_inner().bet.expect("bet");
        assert_eq!(a.bet_id, b.bet_id);
    }
    assert_eq!(app.balance(7).await, dec("90"));
    assert_eq!(app.count_bets("PENDING").await, 10);
    app.assert_books_balanced().await;
}

/// A wallet row held by another movement (a long transaction) never
/// stalls a batch: its holds come back USER_BUSY at once, undecided and
/// unrecorded, and the rest of the batch is held; PlaceBet then holds such
/// a bet alone, once the row is free.
#[tokio::test]
async fn a_held_wallet_row_is_skipped_not_waited_for() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    let mut holder = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT balance FROM wallets WHERE user_id = 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    let (busy, free) = (Uuid::now_v7(), Uuid::now_v7());
    let started = std::time::Instant::now();
    let outcomes = hold_stakes(&app, vec![hold(1, "1", busy), hold(2, "1", free)]).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(
        refusal(&outcomes[0]).map(|r| r.1),
        Some("USER_BUSY".to_owned())
    );
    assert_eq!(held_balance(&outcomes[1]), Some(dec("9")));
    holder.rollback().await.expect("release");
    // Nothing was recorded for the skipped hold: it is a first attempt.
    let again = hold_stakes(&app, vec![hold(1, "1", busy)]).await;
    assert_eq!(held_balance(&again[0]), Some(dec("9")));
    assert!(!again[0].replayed);

    // Through PlaceBet: the held user's bet waits for its row alone while
    // another user's bet goes through.
    app.open_round("gc3").await;
    let mut holder = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT balance FROM wallets WHERE user_id = 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    let held_user = tokio::spawn({
        let bets = app.bets();
        let token = app.player(1);
        async move {
            bets.clone()
                .place_bet(authed(
                    pb::PlaceBetRequest {
                        round_id: "gc3".into(),
                        side: pb::Side::A as i32,
                        amount: "1".into(),
                        idempotency_key: "held".into(),
                    },
                    &token,
                ))
                .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    app.place(2, "gc3", pb::Side::B, "1", "free")
        .await
        .expect("another user's bet is not held up");
    holder.rollback().await.expect("release");
    let placed = held_user
        .await
        .expect("task")
        .expect("placed once the row is free");
    assert_eq!(placed.into_inner().balance, "8");
    app.assert_books_balanced().await;
}

/// A batch locks the wallet rows of its new holds only: a user whose only
/// hold in the batch is a replay keeps their row free, so another batch's
/// (or a deposit's) movement of that user is not made to wait or answered
/// USER_BUSY while this batch runs. The batch is kept open by a key whose
/// refusal another transaction is inserting: its refusal INSERT waits.
#[tokio::test]
async fn a_replay_in_a_batch_leaves_its_users_row_unlocked() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    let (replayed, stalled) = (Uuid::now_v7(), Uuid::now_v7());
    let first = hold_stakes(&app, vec![hold(1, "1", replayed)]).await;
    assert_eq!(held_balance(&first[0]), Some(dec("9")));

    // User 3 has no wallet, so the stalled key's hold is a refusal to
    // record; a transaction inserting the same key's refusal, uncommitted,
    // makes the batch's INSERT wait while the batch holds its locks.
    let mut holder = app.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO wallet_refusals (idempotency_key, kind, user_id, amount, reason) \
         VALUES ($1, 'STAKE', 3, 1, 'INSUFFICIENT_FUNDS')",
    )
    .bind(format!("BET:{stalled}"))
    .execute(&mut *holder)
    .await
    .expect("insert the refusal");
    let (outcomes, ()) = tokio::join!(
        hold_stakes(&app, vec![hold(1, "1", replayed), hold(3, "1", stalled)]),
        async {
            // The batch's write statement waits on the held refusal key.
            rows::row_lock_waiter(&app.pool, "WITH w AS ( UPDATE wallets").await;
            // The replayed hold's user: the row is free while the batch is open.
            let mut other = app.pool.begin().await.expect("begin");
            let free =
                sqlx::query("SELECT balance FROM wallets WHERE user_id = 1 FOR UPDATE NOWAIT")
                    .execute(&mut *other)
                    .await;
            assert!(
                free.is_ok(),
                "a replay's wallet row was locked by the batch: {free:?}"
            );
            other.rollback().await.expect("release");
            holder.rollback().await.expect("release the refusal");
        }
    );
    assert_eq!(held_balance(&outcomes[0]), Some(dec("9")));
    assert!(outcomes[0].replayed);
    assert_eq!(
        refusal(&outcomes[1]).map(|r| r.1),
        Some("INSUFFICIENT_FUNDS".to_owned())
    );
    app.assert_books_balanced().await;
}

/// A replay beside a hold whose row is held elsewhere: the replay answers
/// as before and the other hold is USER_BUSY (unrecorded), never
/// INSUFFICIENT_FUNDS: the replay's user's row does not count as one of
/// the new holds' rows found.
#[tokio::test]
async fn a_replay_beside_a_held_row_leaves_the_other_hold_busy() {
    let app = TestApp::spawn().await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    let (replayed, busy) = (Uuid::now_v7(), Uuid::now_v7());
    let first = hold_stakes(&app, vec![hold(1, "1", replayed)]).await;
    assert_eq!(held_balance(&first[0]), Some(dec("9")));
    let mut holder = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT balance FROM wallets WHERE user_id = 2 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    let outcomes = hold_stakes(&app, vec![hold(1, "1", replayed), hold(2, "1", busy)]).await;
    assert_eq!(held_balance(&outcomes[0]), Some(dec("9")));
    assert!(outcomes[0].replayed);
    assert_eq!(
        refusal(&outcomes[1]).map(|r| r.1),
        Some("USER_BUSY".to_owned())
    );
    holder.rollback().await.expect("release");
    let again = hold_stakes(&app, vec![hold(2, "1", busy)]).await;
    assert_eq!(held_balance(&again[0]), Some(dec("9")));
    assert!(!again[0].replayed);
    app.assert_books_balanced().await;
}

fn payout(user: i64, amount: &str, matched: Uuid, bets: [&str; 2]) -> pbi::PayWinningsRequest {
    pbi::PayWinningsRequest {
        user_id: user,
        amount: amount.into(),
        idempotency_key: format!("SETTLE:{matched}"),
        match_id: matched.to_string(),
        bet_ids: bets.iter().map(|b| (*b).to_owned()).collect(),
    }
}

async fn pay_batch(
    app: &TestApp,
    payouts: Vec<pbi::PayWinningsRequest>,
) -> Vec<pbi::PayoutOutcome> {
    app.stakes()
        .pay_winnings_batch(authed(
            pbi::PayWinningsBatchRequest { payouts },
            &app.service_token(),
        ))
        .await
        .expect("pay winnings batch")
        .into_inner()
        .outcomes
}

fn paid_balance(outcome: &pbi::PayoutOutcome) -> Option<Decimal> {
    match &outcome.outcome {
        Some(pbi::payout_outcome::Outcome::Paid(paid)) => {
            paid.wallet.as_ref().and_then(|w| w.balance.parse().ok())
        }
        _ => None,
    }
}

fn payout_refusal(outcome: &pbi::PayoutOutcome) -> Option<String> {
    match &outcome.outcome {
        Some(pbi::payout_outcome::Outcome::Refused(r)) => Some(r.reason.clone()),
        _ => None,
    }
}

/// Each payout of a PayWinningsBatch is verified and answered as a lone
/// PayWinnings would be: the winner paid twice the stake, once; a payout
/// not due (the loser, an unsettled round, the wrong amount) refused and not
/// recorded, so the right one still goes through; a key twice in the batch
/// a replay; the same bet never paid twice, even by two matches' payouts.
#[tokio::test]
async fn each_payout_of_a_batch_gets_its_own_answer() {
    let app = TestApp::spawn_roles(betting_test_kit::API_ONLY).await;
    for user in [1, 2, 3, 4, 5, 6] {
        app.deposit(user, "10").await;
    }
    app.open_round("pay").await;
    app.open_round("later").await;
    let (a1, b1, m1) = crate::attack::matched_pair(&app, "pay", 1, 2, "3").await;
    let (a2, b2, m2) = crate::attack::matched_pair(&app, "pay", 3, 4, "2").await;
    let (a3, b3, m3) = crate::attack::matched_pair(&app, "later", 5, 6, "1").await;
    app.settle_round("pay", pb::Side::A).await.expect("settle");

    let outcomes = pay_batch(
        &app,
        vec![
            payout(1, "6", m1, [&a1, &b1]),
            payout(4, "4", m2, [&a2, &b2]), // the loser
            payout(5, "2", m3, [&a3, &b3]), // its round is not settled
            payout(3, "5", m2, [&a2, &b2]), // the wrong amount
            payout(1, "6", m1, [&a1, &b1]), // the first again
        ],
    )
    .await;
    assert_eq!(paid_balance(&outcomes[0]), Some(dec("13")));
    assert_eq!(
        payout_refusal(&outcomes[1]).as_deref(),
        Some("PAYOUT_NOT_DUE")
    );
    assert_eq!(
        payout_refusal(&outcomes[2]).as_deref(),
        Some("PAYOUT_NOT_DUE")
    );
    assert_eq!(
        payout_refusal(&outcomes[3]).as_deref(),
        Some("PAYOUT_NOT_DUE")
    );
    assert_eq!(paid_balance(&outcomes[4]), Some(dec("13")));
    assert!(outcomes[4].replayed);

    // Nothing was recorded for the refusals: the right payout goes through.
    let again = pay_batch(
        &app,
        vec![
            payout(3, "4", m2, [&a2, &b2]),
            payout(1, "6", m1, [&a1, &b1]),
        ],
    )
    .await;
    assert_eq!(paid_balance(&again[0]), Some(dec("12")));
    assert!(!again[0].replayed);
    assert!(again[1].replayed, "paid once");
    // Another match's payout naming a paid bet is refused by the books.
    let forged = pay_batch(&app, vec![payout(1, "6", Uuid::now_v7(), [&a1, &b1])]).await;
    assert!(payout_refusal(&forged[0]).is_some(), "{forged:?}");
    assert_eq!(app.balance(1).await, dec("13"));
    assert_eq!(app.balance(3).await, dec("12"));
    app.assert_books_balanced().await;
}

/// A round of many matches is paid by one settle-round job in batches
/// (more matches than one wallet call carries), every winner once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_big_round_is_paid_in_batches() {
    let app = TestApp::spawn().await;
    app.open_round("big").await;
    let pairs = 300_i64;
    for user in 1..=(2 * pairs) {
        app.deposit(user, "5").await;
    }
    for n in 0..pairs {
        app.place_ok(2 * n + 1, "big", pb::Side::A, "5").await;
        app.place_ok(2 * n + 2, "big", pb::Side::B, "5").await;
    }
    betting_test_kit::eventually(
        "every bet is matched",
        std::time::Duration::from_secs(30),
        async || (app.count_bets("PENDING").await == 0).then_some(()),
    )
    .await;
    app.settle_round("big", pb::Side::B).await.expect("settle");
    let round = app.wait_for_round_done("big").await;
    let stats = round.stats.expect("stats");
    assert_eq!(stats.matches, pairs);
    assert_eq!(stats.settled_matches, pairs);
    for n in 0..pairs {
        assert_eq!(app.balance(2 * n + 1).await, Decimal::ZERO);
        assert_eq!(app.balance(2 * n + 2).await, dec("10"));
    }
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}
