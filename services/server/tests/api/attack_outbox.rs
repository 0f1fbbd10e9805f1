//! Hostile review of the refunds refactor (the shared `refund_bets`
//! statement, the refund runner, `betting_db::StoreError` and the typed rows),
//! compared with `0a66452`: each test shows a way money is stranded or an
//! answer changes, and failed on the code it was written against.

use std::time::Duration;

use betting_api::pb;
use betting_bets::matcher::Matcher;
use betting_reconciler::ReconcilerSettings;
use betting_refunds::{Outbox, RefundHandler, Refunder};
use uuid::Uuid;

use betting_test_kit::{API_ONLY, TestApp, dec};

use crate::attack::{good_wallet, run_worker};

/// STRANDS every owed refund the reconciler is the only one to carry out.
///
/// `wallet_commands.kind` admits `'REFUND'` and `'PAYOUT'` (the migration:
/// "refunds now, payouts next"). At `0a66452` the reconciler read the owed
/// commands as plain rows and enqueued one job each; a command the refund
/// runner could not carry out (a PAYOUT names no bet) failed its own job and
/// nothing else. Now `Outbox::due` decodes the whole page into `OwedRefund`
/// and refuses a kind other than REFUND as `StoreError::Corrupt`, so the
/// one row fails `due()`, hence every reconciler pass, at the step that
/// enqueues refund jobs. `PAYOUT:` sorts before `REFUND:`, so it sits in the
/// first page of every pass and the cursor never moves past it.
///
/// Here the reconciler itself refunds a bet past its match timeout (as it
/// does in production: no request enqueues that refund's job) and then cannot
/// enqueue the job: the user's stake stays in escrow, pass after pass. The
/// same strands a cancel whose refund call met a wallet outage, a round
/// close whose refund jobs were lost to a Redis restart, and so on.
///
/// Fix I would make: decode per row and skip (log, count) the rows that do
/// not decode, or select `WHERE kind = 'REFUND'` in `due()`; never let one
/// row fail the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_one_payout_command_stops_the_reconciler_enqueueing_refunds() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "10").await;
    app.deposit(2, "10").await;
    app.deposit(3, "5").await;

    // A settled match whose payout is owed, recorded as the schema allows.
    app.open_round("paid").await;
    let a = app.place_ok(1, "paid", pb::Side::A, "10").await;
    app.place_ok(2, "paid", pb::Side::B, "10").await;
    Matcher::new(app.pool.clone())
        .match_bet(a.bet_id.parse().expect("uuid"))
        .await
        .expect("match");
    let a = app.bet(1, &a.bet_id).await;
    let match_id: Uuid = a.match_id.parse().expect("matched");
    app.settle_round("paid", pb::Side::A).await.expect("settle");
    sqlx::query(
        "INSERT INTO wallet_commands (idempotency_key, kind, user_id, amount, match_id) \
         VALUES ($1, 'PAYOUT', 1, 20, $2)",
    )
    .bind(format!("PAYOUT:{match_id}"))
    .bind(match_id)
    .execute(&app.pool)
    .await
    .expect("a PAYOUT command, as the schema admits");

    // A bet nobody takes: the reconciler refunds it (match timeout zero).
    app.open_round("r").await;
    let lonely = app.place_ok(3, "r", pb::Side::A, "5").await;
    assert_eq!(app.balance(3).await, dec("0"));

    let reconciler = app.reconciler_with(ReconcilerSettings {
        match_timeout: Duration::ZERO,
        ..ReconcilerSettings::default()
    });
    let mut passes = Vec::new();
    for _ in 0..3 {
        passes.push(reconciler.pass().await.map_err(|e| e.to_string()));
    }
    let lonely_now = app.bet(3, &lonely.bet_id).await;
    assert_eq!(
        lonely_now.status,
        pb::BetStatus::Refunded as i32,
        "{lonely_now:?}"
    );

    // Real refunders run; the refund is carried out iff its job exists.
    let app_ref = &app;
    run_worker(
        app.queues.refund.clone(),
        RefundHandler::new(Refunder::new(
            Outbox::new(app.pool.clone()),
            good_wallet(&app),
        )),
        Duration::from_secs(8),
        async || app_ref.balance(3).await == dec("5"),
    )
    .await;
    assert_eq!(
        app.balance(3).await,
        dec("5"),
        "bet {} was refunded by the reconciler but its refund was never carried out; \
         the reconciler's passes: {passes:?}",
        lonely.bet_id
    );
    assert!(
        passes.iter().all(Result::is_ok),
        "reconciler passes failed: {passes:?}"
    );
}

/// The other half of the fix above: a refund row that cannot be read (this
/// one names no bet, which the schema admits) is skipped, and the page still
/// carries the refunds behind it and says where the next page starts.
#[tokio::test]
async fn an_unreadable_refund_row_does_not_hide_the_ones_behind_it() {
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(1, "10").await;
    app.open_round("r").await;
    let bet = app.place_ok(1, "r", pb::Side::A, "5").await;
    for (key, bet_id) in [
        ("REFUND:0-unreadable".to_owned(), None),
        (format!("REFUND:{}", bet.bet_id), Some(bet.bet_id.clone())),
    ] {
        sqlx::query(
            "INSERT INTO wallet_commands (idempotency_key, kind, user_id, amount, bet_id) \
             VALUES ($1, 'REFUND', 1, 5, $2::UUID)",
        )
        .bind(&key)
        .bind(bet_id)
        .execute(&app.pool)
        .await
        .expect("owed refund");
    }
    let page = Outbox::new(app.pool.clone())
        .due(Duration::ZERO, None, 10)
        .await
        .expect("the page is read despite the bad row");
    assert_eq!(page.rows, 2);
    assert_eq!(page.refunds.len(), 1, "{page:?}");
    assert_eq!(
        page.refunds[0].key.as_str(),
        format!("REFUND:{}", bet.bet_id)
    );
    assert_eq!(page.last_key, Some(format!("REFUND:{}", bet.bet_id)));
}
