//! Money under concurrency.

use betting_api::pb;
use futures::future::join_all;
use tonic::Code;

use betting_test_kit::{TestApp, dec, reason};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_bets_on_a_wallet_that_affords_ten() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    // All released together; each stakes 10 with its own key.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let attempts = (0..50).map(|i| {
        let app = &app;
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            let side = if i % 2 == 0 { pb::Side::A } else { pb::Side::B };
            app.place(42, "r", side, "10", &format!("c{i}")).await
        }
    });
    let results = join_all(attempts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::FailedPrecondition, "{r:?}");
        assert_eq!(reason(r), "INSUFFICIENT_FUNDS");
    }
    assert_eq!(ok, 10, "exactly ten bets fit in the wallet");
    assert_eq!(app.balance(42).await, dec("0"));
    assert_eq!(app.escrow().await, dec("100"));
    let negative: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE balance_after < 0")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(negative, 0, "no entry ever saw a negative balance");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM bets WHERE status = 'PENDING'")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(pending, 10);
    app.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_placed_concurrently_debits_once() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let attempts = (0..20).map(|_| {
        let app = &app;
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            app.place(42, "r", pb::Side::A, "10", "one-key").await
        }
    });
    let results = join_all(attempts).await;
    let bet_ids: std::collections::HashSet<String> = results
        .into_iter()
        .map(|r| {
            r.expect("every retry succeeds")
                .into_inner()
                .bet
                .expect("bet")
                .bet_id
        })
        .collect();
    assert_eq!(bet_ids.len(), 1, "one bet for one key");
    assert_eq!(app.balance(42).await, dec("90"));
    app.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deposits_with_one_key_credit_once() {
    let app = TestApp::spawn().await;
    let backend = app.cashier_token();
    let attempts = (0..20).map(|_| {
        let mut wallet = app.wallet();
        let backend = backend.clone();
        async move {
            wallet
                .deposit(betting_test_kit::authed(
                    pb::DepositRequest {
                        user_id: 9,
                        amount: "5".into(),
                        idempotency_key: "dup".into(),
                        reference: String::new(),
                    },
                    &backend,
                ))
                .await
        }
    });
    for result in join_all(attempts).await {
        result.expect("every replay succeeds");
    }
    assert_eq!(app.balance(9).await, dec("5"));
    app.assert_books_balanced().await;
}
