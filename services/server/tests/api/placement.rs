//! PlaceStakes (`services/wallet/src/placement.rs`): a new bet's stake and
//! its row in one wallet transaction. Each test states what one placement
//! must leave behind: both the stake and the row, or neither.

use std::time::Duration;

use betting_api::{pb, pb_internal as pbi};
use rust_decimal::Decimal;
use tonic::Code;
use uuid::Uuid;

use betting_test_kit::{API_ONLY, TestApp, authed, dec, eventually};

fn placement(user: i64, amount: &str, round: &str, key: &str) -> (Uuid, pbi::StakePlacement) {
    let bet = Uuid::now_v7();
    let placement = pbi::StakePlacement {
        hold: Some(pbi::HoldStakeRequest {
            user_id: user,
            amount: amount.into(),
            idempotency_key: format!("BET:{bet}"),
            bet_id: bet.to_string(),
        }),
        round_id: round.into(),
        side: pb::Side::A as i32,
        bet_key: key.into(),
    };
    (bet, placement)
}

async fn place_stakes(
    app: &TestApp,
    placements: Vec<pbi::StakePlacement>,
    wait: bool,
) -> Result<Vec<pbi::HoldStakeOutcome>, tonic::Status> {
    app.stakes()
        .place_stakes(authed(
            pbi::PlaceStakesRequest { placements, wait },
            &app.service_token(),
        ))
        .await
        .map(|r| r.into_inner().outcomes)
}

fn held_balance(outcome: &pbi::HoldStakeOutcome) -> Option<Decimal> {
    match &outcome.outcome {
        Some(pbi::hold_stake_outcome::Outcome::Held(held)) => {
            held.wallet.as_ref().and_then(|w| w.balance.parse().ok())
        }
        _ => None,
    }
}

fn refusal(outcome: &pbi::HoldStakeOutcome) -> Option<String> {
    match &outcome.outcome {
        Some(pbi::hold_stake_outcome::Outcome::Refused(r)) => Some(r.reason.clone()),
        _ => None,
    }
}

/// Another movement's transaction holding the user's wallet row.
async fn hold_wallet_row(app: &TestApp, user: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT balance FROM wallets WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    holder
}

/// From now on, counts the statements that insert into `bets` (each
/// statement once, whether it writes a row or none): [`bet_inserts`].
async fn count_bet_inserts(app: &TestApp) {
    for statement in [
        "CREATE SEQUENCE placement_bet_inserts",
        "CREATE FUNCTION placement_count() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
         AS $$ BEGIN PERFORM nextval('placement_bet_inserts'); RETURN NULL; END $$",
        "CREATE TRIGGER placement_count BEFORE INSERT ON bets \
         FOR EACH STATEMENT EXECUTE FUNCTION placement_count()",
    ] {
        sqlx::query(statement)
            .execute(&app.pool)
            .await
            .expect("count inserts");
    }
}

/// The statements that inserted into `bets` since [`count_bet_inserts`].
async fn bet_inserts(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM placement_bet_inserts",
    )
    .fetch_one(&app.pool)
    .await
    .expect("inserts")
}

/// The statement's snapshot of a lone placement that waited for its wallet
/// row must be taken after the wait: a bet key taken, or a round closed, by
/// the transaction it waited for is refused up front, with no bet INSERT
/// (and so no rerun). Found by the attack review: the pre-read first rode
/// on the statement that waits for the row lock, whose snapshot is taken
/// before the wait, so such a placement debited, wrote its ledger row,
/// found its bet row unwritten, and undid it all to run again.
#[tokio::test]
async fn a_lone_placement_reads_keys_and_rounds_as_its_wait_left_them() {
    // No workers: the hand-written bet has no stake for a reconciler to see.
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.open_round("r").await;
    app.open_round("closing").await;
    app.deposit(1, "10").await;
    count_bet_inserts(&app).await;
    let taken = Uuid::now_v7();
    for (round, key, change, reason) in [
        (
            "r",
            "taken",
            "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, \
               status, balance_after, version) \
             VALUES ($1, 1, 'taken', 'r', 'A', 1, 'PENDING', 9, 1)",
            "IDEMPOTENCY_KEY_REUSED",
        ),
        (
            "closing",
            "fresh",
            "UPDATE rounds SET status = 'CLOSED' WHERE round_id = 'closing' OR $1::UUID IS NULL",
            "ROUND_NOT_OPEN",
        ),
    ] {
        let before = bet_inserts(&app).await;
        let mut holder = hold_wallet_row(&app, 1).await;
        sqlx::query(change)
            .bind(taken)
            .execute(&mut *holder)
            .await
            .expect("change");
        let (bet, p) = placement(1, "1", round, key);
        let alone = tokio::spawn({
            let stakes = app.stakes();
            let token = app.service_token();
            async move {
                stakes
                    .clone()
                    .place_stakes(authed(
                        pbi::PlaceStakesRequest {
                            placements: vec![p],
                            wait: true,
                        },
                        &token,
                    ))
                    .await
                    .map(|r| r.into_inner().outcomes)
            }
        });
        // Commit only once the placement waits for the row.
        eventually(
            "the placement waits for the wallet row",
            Duration::from_secs(10),
            async || {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND query LIKE '%FOR UPDATE%'",
                )
                .fetch_one(&app.pool)
                .await
                .expect("activity");
                (waiting > 0).then_some(())
            },
        )
        .await;
        holder.commit().await.expect("commit");
        let outcomes = alone.await.expect("task").expect("place");
        assert_eq!(refusal(&outcomes[0]).as_deref(), Some(reason), "{key}");
        assert_eq!(row(&app, bet).await, None, "{key}");
        assert_eq!(movements(&app, bet).await, (0, 0), "{key}");
        let own = i64::from(key == "taken");
        assert_eq!(
            bet_inserts(&app).await - before,
            own,
            "{key}: refused up front, with no INSERT of the placement's bet"
        );
    }
    assert_eq!(app.balance(1).await, dec("10"));
}

/// The bet's row as stored: status, version, balance after its stake.
async fn row(app: &TestApp, bet: Uuid) -> Option<(String, i64, Option<Decimal>)> {
    sqlx::query_as("SELECT status, version, balance_after FROM bets WHERE bet_id = $1")
        .bind(bet)
        .fetch_optional(&app.pool)
        .await
        .expect("bet row")
}

/// How many ledger entries and recorded refusals name this bet.
async fn movements(app: &TestApp, bet: Uuid) -> (i64, i64) {
    let key = format!("BET:{bet}");
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_one(&app.pool)
            .await
            .expect("entries");
    let refusals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wallet_refusals WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_one(&app.pool)
            .await
            .expect("refusals");
    (entries, refusals)
}

/// Each placement of a call: held with its PENDING row; refused for funds
/// with its REJECTED row; refused for a closed round or a taken key with
/// nothing written at all.
#[tokio::test]
async fn each_placement_writes_its_stake_and_row_together_or_nothing() {
    let app = TestApp::spawn().await;
    app.open_round("open").await;
    app.deposit(1, "10").await;
    app.deposit(2, "3").await;
    app.deposit(3, "10").await;
    app.deposit(4, "10").await;
    // User 4's key "taken" names a bet already.
    let taken = app
        .place(4, "open", pb::Side::B, "1", "taken")
        .await
        .expect("the first bet of the key")
        .into_inner();
    assert_eq!(app.balance(4).await, dec("9"));

    let (held, p1) = placement(1, "4", "open", "k1");
    let (poor, p2) = placement(2, "5", "open", "k2");
    let (closed, p3) = placement(3, "5", "no-such-round", "k3");
    let (reused, p4) = placement(4, "2", "open", "taken");
    let outcomes = place_stakes(&app, vec![p1, p2, p3, p4], false)
        .await
        .expect("place");
    assert_eq!(outcomes.len(), 4);

    assert_eq!(held_balance(&outcomes[0]), Some(dec("6")));
    assert_eq!(
        row(&app, held).await,
        Some(("PENDING".into(), 1, Some(dec("6"))))
    );
    assert_eq!(movements(&app, held).await, (1, 0));

    assert_eq!(refusal(&outcomes[1]).as_deref(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(row(&app, poor).await, Some(("REJECTED".into(), 0, None)));
    assert_eq!(movements(&app, poor).await, (0, 1));
    assert_eq!(app.balance(2).await, dec("3"));

    // A placement that cannot write its row is refused, saying why.
    for (outcome, bet, user, balance, why) in [
        (&outcomes[2], closed, 3, "10", "ROUND_NOT_OPEN"),
        (&outcomes[3], reused, 4, "9", "IDEMPOTENCY_KEY_REUSED"),
    ] {
        assert_eq!(refusal(outcome).as_deref(), Some(why));
        assert_eq!(row(&app, bet).await, None);
        assert_eq!(movements(&app, bet).await, (0, 0));
        assert_eq!(app.balance(user).await, dec(balance));
    }
    // Alone, the same.
    let (closed, p3) = placement(3, "5", "no-such-round", "k3");
    let alone = place_stakes(&app, vec![p3], true).await.expect("alone");
    assert_eq!(refusal(&alone[0]).as_deref(), Some("ROUND_NOT_OPEN"));
    let (reused, p4) = placement(4, "2", "open", "taken");
    let again = place_stakes(&app, vec![p4], true).await.expect("alone");
    assert_eq!(
        refusal(&again[0]).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    for bet in [closed, reused] {
        assert_eq!(row(&app, bet).await, None);
        assert_eq!(movements(&app, bet).await, (0, 0));
    }
    assert_eq!(app.balance(3).await, dec("10"));
    assert_eq!(app.balance(4).await, dec("9"));
    assert_eq!(
        taken.bet.expect("bet").status,
        pb::BetStatus::Pending as i32
    );
    app.assert_books_balanced().await;
    app.assert_audit_clean().await;
}

/// A placement whose key another transaction is writing (a retry racing
/// its original, the original not yet committed) is not seen by the
/// batch's read; its INSERT waits, then writes nothing. The batch is undone
/// and runs again without it, so the holds after it are decided without
/// its stake: the same user's next placement still has the money.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placement_that_loses_a_race_for_its_key_does_not_count_against_the_others() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "6").await;
    // The original, mid-transaction: its row written, not yet committed.
    let mut original = app.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
         VALUES ($1, 1, 'taken', 'r', 'A', 5, 'PLACING')",
    )
    .bind(Uuid::now_v7())
    .execute(&mut *original)
    .await
    .expect("the original's row");
    let (lost, first) = placement(1, "5", "r", "taken");
    let (second, next) = placement(1, "5", "r", "fresh");
    let batch = async { place_stakes(&app, vec![first, next], false).await };
    let commit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        original.commit().await.expect("the original commits");
    };
    let (outcomes, ()) = tokio::join!(batch, commit);
    let outcomes = outcomes.expect("place");
    assert_eq!(
        refusal(&outcomes[0]).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(held_balance(&outcomes[1]), Some(dec("1")), "5 of 6 taken");
    assert_eq!(row(&app, lost).await, None);
    assert_eq!(movements(&app, lost).await, (0, 0));
    assert_eq!(
        row(&app, second).await,
        Some(("PENDING".into(), 1, Some(dec("1"))))
    );
    assert_eq!(app.balance(1).await, dec("1"));
}

/// Repeating a PlaceStakes (a lost reply) replays each stake by its key and
/// writes no second row or movement.
#[tokio::test]
async fn a_repeated_placement_replays_and_writes_nothing_more() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    app.deposit(2, "1").await;
    let (held, p1) = placement(1, "4", "r", "k1");
    let (poor, p2) = placement(2, "5", "r", "k2");
    let first = place_stakes(&app, vec![p1.clone(), p2.clone()], false)
        .await
        .expect("place");
    let again = place_stakes(&app, vec![p1, p2], false)
        .await
        .expect("again");
    assert_eq!(held_balance(&first[0]), Some(dec("6")));
    assert_eq!(held_balance(&again[0]), Some(dec("6")));
    assert!(again[0].replayed);
    assert_eq!(refusal(&again[1]).as_deref(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(movements(&app, held).await, (1, 0));
    assert_eq!(movements(&app, poor).await, (0, 1));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bets")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(rows, 2);
    assert_eq!(app.balance(1).await, dec("6"));
    app.assert_books_balanced().await;
}

/// A lone placement (`wait`) waits for a wallet row another movement holds,
/// then places; a batch answers the same placement USER_BUSY at once and
/// writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_placement_waits_for_a_busy_wallet_and_a_batch_does_not() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    let holder = hold_wallet_row(&app, 1).await;
    let (busy, p) = placement(1, "3", "r", "k");
    let batch = place_stakes(&app, vec![p.clone()], false)
        .await
        .expect("batch");
    assert_eq!(refusal(&batch[0]).as_deref(), Some("USER_BUSY"));
    assert_eq!(row(&app, busy).await, None);

    let alone = {
        let app = &app;
        let p = p.clone();
        async move { place_stakes(app, vec![p], true).await }
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.rollback().await.expect("free the row");
    };
    let (alone, ()) = tokio::join!(alone, release);
    let alone = alone.expect("alone");
    assert_eq!(held_balance(&alone[0]), Some(dec("7")));
    assert_eq!(
        row(&app, busy).await,
        Some(("PENDING".into(), 1, Some(dec("7"))))
    );
    app.assert_books_balanced().await;
}

/// A waiting placement carries exactly one bet, and a placement with a bad
/// field is refused alone, naming the field.
#[tokio::test]
async fn malformed_placements_are_refused_with_their_fields() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    let (_, a) = placement(1, "1", "r", "a");
    let (_, b) = placement(1, "1", "r", "b");
    let two = place_stakes(&app, vec![a, b.clone()], true).await;
    assert_eq!(two.expect_err("two waiting").code(), Code::InvalidArgument);

    let (_, mut no_side) = placement(1, "1", "r", "c");
    no_side.side = pb::Side::Unspecified as i32;
    let (_, mut no_key) = placement(1, "1", "r", "");
    no_key.bet_key.clear();
    let outcomes = place_stakes(&app, vec![no_side, no_key, b], false)
        .await
        .expect("place");
    assert_eq!(refusal(&outcomes[0]).as_deref(), Some("INVALID_ARGUMENT"));
    assert_eq!(refusal(&outcomes[1]).as_deref(), Some("INVALID_ARGUMENT"));
    assert_eq!(held_balance(&outcomes[2]), Some(dec("9")));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bets")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    app.assert_books_balanced().await;
}

/// Found by the attack review: every placement whose row could not be
/// written undid the whole batch, one at a time, so a batch with k bets on
/// a closed or unknown round (or k retries of placed bets) ran k + 1
/// transactions, holding every user's wallet row each time. Now they are
/// refused up front, each with its reason, in one transaction.
#[tokio::test]
async fn unwritable_placements_are_refused_without_rerunning_the_batch() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.open_round("shut").await;
    close(&app, "shut").await;
    for user in 1..=41 {
        app.deposit(user, "10").await;
    }
    app.place(41, "r", pb::Side::A, "1", "placed")
        .await
        .expect("a placed bet");
    count_bet_inserts(&app).await;
    let mut placements = Vec::new();
    let mut bets = Vec::new();
    for user in 1..=20 {
        let (bet, p) = placement(user, "1", "no-such-round", &format!("k{user}"));
        bets.push(bet);
        placements.push(p);
    }
    for user in 21..=39 {
        let (bet, p) = placement(user, "1", "shut", &format!("k{user}"));
        bets.push(bet);
        placements.push(p);
    }
    let (retry, p) = placement(41, "1", "r", "placed");
    placements.push(p);
    let (good, p) = placement(40, "1", "r", "good");
    placements.push(p);
    let outcomes = place_stakes(&app, placements, false).await.expect("place");
    for outcome in &outcomes[..39] {
        assert_eq!(refusal(outcome).as_deref(), Some("ROUND_NOT_OPEN"));
    }
    assert_eq!(
        refusal(&outcomes[39]).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(held_balance(&outcomes[40]), Some(dec("9")));
    assert_eq!(
        bet_inserts(&app).await,
        1,
        "one transaction wrote the batch's bets"
    );
    for bet in bets.into_iter().chain([retry]) {
        assert_eq!(row(&app, bet).await, None);
        assert_eq!(movements(&app, bet).await, (0, 0));
    }
    assert_eq!(
        row(&app, good).await,
        Some(("PENDING".into(), 1, Some(dec("9"))))
    );
    app.assert_books_balanced().await;
}

async fn close(app: &TestApp, round: &str) {
    app.rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: round.into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("close");
}

/// Found by the attack review: a waiting placement's row took its stamp
/// from the transaction's start, seconds before the row became visible
/// when the wallet row was held, so the streams' sweep (a margin of 3 s)
/// could miss a bet whose note was lost. The row is stamped when written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_placement_stamps_its_row_when_it_writes_it() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    let holder = hold_wallet_row(&app, 1).await;
    let (bet, p) = placement(1, "3", "r", "k");
    let alone = async { place_stakes(&app, vec![p], true).await };
    let release = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&app.pool)
            .await
            .expect("clock");
        holder.rollback().await.expect("free the row");
        at
    };
    let (placed, released) = tokio::join!(alone, release);
    assert_eq!(held_balance(&placed.expect("placed")[0]), Some(dec("7")));
    let (created, updated): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT created_at, updated_at FROM bets WHERE bet_id = $1")
            .bind(bet)
            .fetch_one(&app.pool)
            .await
            .expect("row");
    assert!(
        created >= released && updated >= released,
        "stamped {created} / {updated}, written after {released}"
    );
}

/// Found by the attack review: a replayed stake answered "held" whatever
/// round, side or bet key the repeat named. It names the bet its stake
/// was for, or it is a reused key.
#[tokio::test]
async fn a_replay_naming_another_bet_is_a_reused_key() {
    let app = TestApp::spawn().await;
    app.open_round("r1").await;
    app.open_round("r2").await;
    app.deposit(1, "10").await;
    let (bet, p) = placement(1, "4", "r1", "k1");
    let first = place_stakes(&app, vec![p.clone()], false)
        .await
        .expect("place");
    assert_eq!(held_balance(&first[0]), Some(dec("6")));
    let mut other_round = p.clone();
    other_round.round_id = "r2".into();
    let mut other_side = p.clone();
    other_side.side = pb::Side::B as i32;
    let mut other_key = p.clone();
    other_key.bet_key = "k2".into();
    for repeat in [other_round, other_side, other_key] {
        let again = place_stakes(&app, vec![repeat], false)
            .await
            .expect("again");
        assert_eq!(
            refusal(&again[0]).as_deref(),
            Some("IDEMPOTENCY_KEY_REUSED")
        );
    }
    let same = place_stakes(&app, vec![p], false).await.expect("same");
    assert!(same[0].replayed, "the same placement replays");
    assert_eq!(movements(&app, bet).await, (1, 0));
    assert_eq!(app.balance(1).await, dec("6"));
}

/// Found by the attack review: PlaceStakes took any amount the ledger
/// takes (up to 10^12), so it wrote a PENDING bet past the largest stake
/// (5 × 10^11), whose payout the settler cannot make; and one malformed
/// waiting placement was answered INTERNAL instead of its refusal.
#[tokio::test]
async fn a_placement_past_the_largest_stake_or_malformed_is_refused_alone() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "700000000000").await;
    let (big, p) = placement(1, "600000000000", "r", "big");
    let outcomes = place_stakes(&app, vec![p], false).await.expect("place");
    assert_eq!(refusal(&outcomes[0]).as_deref(), Some("INVALID_ARGUMENT"));
    assert_eq!(row(&app, big).await, None);

    let (_, mut bad) = placement(1, "1", "r", "k");
    bad.side = pb::Side::Unspecified as i32;
    let outcomes = place_stakes(&app, vec![bad], true)
        .await
        .expect("an answer per placement");
    assert_eq!(refusal(&outcomes[0]).as_deref(), Some("INVALID_ARGUMENT"));
    assert_eq!(app.balance(1).await, dec("700000000000"));
}

/// A StakeService of an earlier release, in front of the test app's
/// wallet: every call it serves is passed on with the caller's token.
/// Without `place_stakes`, a release before PlaceStakes (UNIMPLEMENTED);
/// with it, the first release of PlaceStakes, which did not say when it
/// wrote a bet's row (`bet_written_at` unset).
#[derive(Clone)]
struct OlderWallet {
    inner: pbi::stake_service_client::StakeServiceClient<tonic::transport::Channel>,
    place_stakes: bool,
}

fn passed_on<T>(request: tonic::Request<T>) -> tonic::Request<T> {
    let authorization = request.metadata().get("authorization").cloned();
    let mut upstream = tonic::Request::new(request.into_inner());
    if let Some(value) = authorization {
        upstream.metadata_mut().insert("authorization", value);
    }
    upstream
}

#[tonic::async_trait]
impl pbi::stake_service_server::StakeService for OlderWallet {
    async fn hold_stake(
        &self,
        request: tonic::Request<pbi::HoldStakeRequest>,
    ) -> Result<tonic::Response<pbi::HoldStakeResponse>, tonic::Status> {
        self.inner.clone().hold_stake(passed_on(request)).await
    }
    async fn hold_stakes(
        &self,
        request: tonic::Request<pbi::HoldStakesRequest>,
    ) -> Result<tonic::Response<pbi::HoldStakesResponse>, tonic::Status> {
        self.inner.clone().hold_stakes(passed_on(request)).await
    }
    async fn place_stakes(
        &self,
        request: tonic::Request<pbi::PlaceStakesRequest>,
    ) -> Result<tonic::Response<pbi::PlaceStakesResponse>, tonic::Status> {
        if !self.place_stakes {
            return Err(tonic::Status::unimplemented("unknown method PlaceStakes"));
        }
        let mut response = self.inner.clone().place_stakes(passed_on(request)).await?;
        for outcome in &mut response.get_mut().outcomes {
            outcome.bet_written_at = None;
        }
        Ok(response)
    }
    async fn refund_stake(
        &self,
        request: tonic::Request<pbi::RefundStakeRequest>,
    ) -> Result<tonic::Response<pbi::RefundStakeResponse>, tonic::Status> {
        self.inner.clone().refund_stake(passed_on(request)).await
    }
    async fn pay_winnings(
        &self,
        request: tonic::Request<pbi::PayWinningsRequest>,
    ) -> Result<tonic::Response<pbi::PayWinningsResponse>, tonic::Status> {
        self.inner.clone().pay_winnings(passed_on(request)).await
    }
    async fn pay_winnings_batch(
        &self,
        request: tonic::Request<pbi::PayWinningsBatchRequest>,
    ) -> Result<tonic::Response<pbi::PayWinningsBatchResponse>, tonic::Status> {
        self.inner
            .clone()
            .pay_winnings_batch(passed_on(request))
            .await
    }
}

/// A BettingService whose wallet calls go through `older` (see
/// [`OlderWallet`]); the server task serves it until aborted.
async fn betting_beside(
    app: &TestApp,
    older: OlderWallet,
) -> (betting_bets::BettingService, tokio::task::JoinHandle<()>) {
    use betting_auth::{ServiceCredentials, TokenMinter};
    use betting_bets::{BetStore, BettingService};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(pbi::stake_service_server::StakeServiceServer::new(older))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let wallet = betting_wallet_client::WalletClient::new(
        &format!("http://{addr}"),
        ServiceCredentials::new(TokenMinter::new(
            betting_test_kit::SECRET.as_bytes(),
            None,
            None,
        )),
    )
    .expect("client");
    let publisher =
        betting_streams::Publisher::new(app.queues.matches.client().clone(), &app.namespace);
    let betting = BettingService::new(
        BetStore::new(app.pool.clone()),
        wallet,
        app.queues.matches.clone(),
        publisher,
    );
    (betting, server)
}

/// Places a bet of 3 on side A of round "r" for user 1 with `key`.
async fn place_three(betting: &betting_bets::BettingService, key: &str) -> betting_bets::Placed {
    use betting_domain::{IdempotencyKey, RoundId, Side, Stake, UserId};
    betting
        .place(
            UserId::new(1).expect("user"),
            RoundId::parse("r").expect("round"),
            Side::A,
            Stake::parse("3").expect("stake"),
            IdempotencyKey::parse(key).expect("key"),
        )
        .await
        .expect("placed")
}

/// A rolling deploy with the betting role ahead of the wallet: the wallet
/// answers PlaceStakes UNIMPLEMENTED, and each new bet is placed the way
/// the older release placed it (PLACING, HoldStake, PENDING), batched or
/// alone, instead of every PlaceBet failing UNAVAILABLE. Found by the
/// attack review (an outage, not a loss: UNIMPLEMENTED moved nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beside_a_wallet_without_place_stakes_bets_are_placed_in_three_steps() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    let older = OlderWallet {
        inner: app.stakes(),
        place_stakes: false,
    };
    let (ahead, server) = betting_beside(&app, older).await;
    for (betting, key, balance) in [
        (ahead.clone(), "batched", "7"),
        (ahead.with_group_commit(false), "alone", "4"),
    ] {
        let placed = place_three(&betting, key).await;
        assert_eq!(
            placed.bet.status,
            betting_domain::BetStatus::Pending,
            "{key}"
        );
        assert_eq!(placed.balance, dec(balance), "{key}");
        assert_eq!(movements(&app, placed.bet.bet_id).await, (1, 0), "{key}");
    }
    assert_eq!(app.balance(1).await, dec("4"));
    app.assert_books_balanced().await;
    server.abort();
}

/// PlaceStakes says when it wrote each bet's row, so the placer answers
/// PlaceBet from the row as written, without reading it back; beside a
/// wallet of the first PlaceStakes release, which does not say, the row is
/// read back. Either way the answer is the stored row, field for field
/// (its times to the microsecond).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placed_bet_is_answered_with_its_row_as_stored() {
    use betting_bets::BetStore;

    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "20").await;

    // The wallet's own answer: the row's one time, for a bet written now.
    let (bet, p) = placement(1, "2", "r", "direct");
    let outcomes = place_stakes(&app, vec![p.clone()], false)
        .await
        .expect("place");
    let (created, updated): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT created_at, updated_at FROM bets WHERE bet_id = $1")
            .bind(bet)
            .fetch_one(&app.pool)
            .await
            .expect("row");
    assert_eq!(created, updated);
    assert_eq!(
        outcomes[0].bet_written_at,
        Some(betting_api::convert::timestamp(created))
    );
    // A replay wrote nothing: it does not say when.
    let replayed = place_stakes(&app, vec![p], false).await.expect("replay");
    assert!(replayed[0].replayed);
    assert_eq!(replayed[0].bet_written_at, None);

    let store = BetStore::new(app.pool.clone());
    let current = OlderWallet {
        inner: app.stakes(),
        place_stakes: true,
    };
    let (through, server) = betting_beside(&app, current).await;
    for (betting, key) in [
        (app.betting().clone(), "now"),
        (app.betting().clone().with_group_commit(false), "now-alone"),
        (through.clone(), "first-release"),
        (through.with_group_commit(false), "first-release-alone"),
    ] {
        let placed = place_three(&betting, key).await;
        let stored = store
            .get(placed.bet.id())
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(placed.bet, stored, "{key}");
    }
    assert_eq!(app.balance(1).await, dec("6"));
    app.assert_books_balanced().await;
    server.abort();
}

/// A bet key twice in one call (a client's retry racing its original into
/// one batch): the first is placed; the second is left to its caller
/// (USER_BUSY: place it alone), never refused "key taken" on the strength
/// of a row its own transaction might still not write. Found by the full
/// suite's same-key races (`same_key_bets_racing_on_exactly_one_stake_get_one_answer`,
/// `attack9_same_key_retries_racing_at_the_open_bet_cap_get_the_bet`): a
/// rerun of the batch that could not place the first (its wallet row
/// taken meanwhile) answered the others "key taken" for a bet that was
/// never written, and PlaceBet told those clients ROUND_NOT_FOUND.
#[tokio::test]
async fn a_bet_key_twice_in_one_call_decides_the_first_and_leaves_the_other() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    app.deposit(1, "10").await;
    let (first, a) = placement(1, "1", "r", "same");
    let (second, b) = placement(1, "1", "r", "same");
    let outcomes = place_stakes(&app, vec![a, b.clone()], false)
        .await
        .expect("place");
    assert_eq!(held_balance(&outcomes[0]), Some(dec("9")));
    assert_eq!(refusal(&outcomes[1]).as_deref(), Some("USER_BUSY"));
    assert_eq!(row(&app, second).await, None);
    // Alone, after the first committed: the key is taken.
    let alone = place_stakes(&app, vec![b], true).await.expect("alone");
    assert_eq!(
        refusal(&alone[0]).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(
        row(&app, first).await,
        Some(("PENDING".into(), 1, Some(dec("9"))))
    );
    assert_eq!(movements(&app, second).await, (0, 0));
    assert_eq!(app.balance(1).await, dec("9"));
}
