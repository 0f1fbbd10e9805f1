//! Deposits, withdrawals, reads and idempotency of WalletService.

use betting_api::{IDEMPOTENT_REPLAYED, pb};
use tonic::Code;

use betting_test_kit::{TestApp, authed, bad_fields, dec, expect_code, reason};

fn deposit(user: i64, amount: &str, key: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        user_id: user,
        amount: amount.into(),
        idempotency_key: key.into(),
        reference: "psp-1".into(),
    }
}

#[tokio::test]
async fn deposit_then_withdraw_moves_exact_money() {
    let app = TestApp::spawn().await;
    let backend = app.cashier_token();
    let r = app
        .wallet()
        .deposit(authed(deposit(7, "100.12345678", "d1"), &backend))
        .await
        .expect("deposit")
        .into_inner();
    assert_eq!(r.wallet.expect("wallet").balance, "100.12345678");
    let entry = r.entry.expect("entry");
    assert_eq!(entry.kind, pb::EntryKind::Deposit as i32);
    assert_eq!(entry.counterparty, pb::Account::External as i32);
    assert_eq!(entry.amount, "100.12345678");

    let w = app
        .wallet()
        .withdraw(authed(
            pb::WithdrawRequest {
                user_id: 7,
                amount: "0.12345678".into(),
                idempotency_key: "w1".into(),
                reference: String::new(),
            },
            &backend,
        ))
        .await
        .expect("withdraw")
        .into_inner();
    assert_eq!(w.wallet.expect("wallet").balance, "100");
    assert_eq!(w.entry.expect("entry").amount, "-0.12345678");
    assert_eq!(app.balance(7).await, dec("100"));
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn deposit_replay_returns_the_original_and_moves_nothing() {
    let app = TestApp::spawn().await;
    let backend = app.cashier_token();
    let first = app
        .wallet()
        .deposit(authed(deposit(7, "25", "same-key"), &backend))
        .await
        .expect("deposit");
    assert!(first.metadata().get(IDEMPOTENT_REPLAYED).is_none());
    let second = app
        .wallet()
        .deposit(authed(deposit(7, "25", "same-key"), &backend))
        .await
        .expect("replay");
    assert_eq!(
        second
            .metadata()
            .get(IDEMPOTENT_REPLAYED)
            .map(|v| v.to_str().ok()),
        Some(Some("true"))
    );
    assert_eq!(
        first.into_inner(),
        second.into_inner(),
        "a replay answers exactly as the original"
    );
    assert_eq!(app.balance(7).await, dec("25"));
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(entries, 1);
}

#[tokio::test]
async fn reused_key_with_another_payload_is_refused_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let backend = app.cashier_token();
    app.wallet()
        .deposit(authed(deposit(7, "25", "k"), &backend))
        .await
        .expect("deposit");
    for other in [deposit(7, "26", "k"), deposit(8, "25", "k")] {
        let status = expect_code(
            app.wallet().deposit(authed(other, &backend)).await,
            Code::AlreadyExists,
        );
        assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    }
    // A withdrawal may not reuse a deposit's key either.
    let status = expect_code(
        app.wallet()
            .withdraw(authed(
                pb::WithdrawRequest {
                    user_id: 7,
                    amount: "25".into(),
                    idempotency_key: "k".into(),
                    reference: "psp-1".into(),
                },
                &backend,
            ))
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.balance(7).await, dec("25"));
    assert_eq!(app.balance(8).await, dec("0"));
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn withdraw_never_overdraws() {
    let app = TestApp::spawn().await;
    app.deposit(7, "10").await;
    let status = expect_code(
        app.wallet()
            .withdraw(authed(
                pb::WithdrawRequest {
                    user_id: 7,
                    amount: "10.00000001".into(),
                    idempotency_key: "w".into(),
                    reference: String::new(),
                },
                &app.cashier_token(),
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    // A user who never had a wallet has nothing to withdraw.
    let status = expect_code(
        app.wallet()
            .withdraw(authed(
                pb::WithdrawRequest {
                    user_id: 99,
                    amount: "1".into(),
                    idempotency_key: "w2".into(),
                    reference: String::new(),
                },
                &app.cashier_token(),
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    assert_eq!(app.balance(7).await, dec("10"));
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn deposits_validate_every_field() {
    let app = TestApp::spawn().await;
    let status = expect_code(
        app.wallet()
            .deposit(authed(
                pb::DepositRequest {
                    user_id: 0,
                    amount: "-1".into(),
                    idempotency_key: String::new(),
                    reference: "x".repeat(200),
                },
                &app.cashier_token(),
            ))
            .await,
        Code::InvalidArgument,
    );
    let mut fields = bad_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        ["amount", "idempotency_key", "reference", "user_id"]
    );
    // Our own services' key shapes are reserved.
    let status = expect_code(
        app.wallet()
            .deposit(authed(deposit(7, "1", "BET:abc"), &app.cashier_token()))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_fields(&status), ["idempotency_key"]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn get_wallet_defaults_to_the_caller_and_zero() {
    let app = TestApp::spawn().await;
    let wallet = app
        .wallet()
        .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &app.player(5)))
        .await
        .expect("get wallet")
        .into_inner()
        .wallet
        .expect("wallet");
    assert_eq!(wallet.user_id, 5);
    assert_eq!(wallet.balance, "0");
    assert!(wallet.updated_at.is_none());
}

#[tokio::test]
async fn ledger_entries_page_newest_first() {
    let app = TestApp::spawn().await;
    for amount in ["1", "2", "3", "4", "5"] {
        app.deposit(7, amount).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .wallet()
            .list_ledger_entries(authed(
                pb::ListLedgerEntriesRequest {
                    user_id: 0,
                    page_size: 2,
                    page_token: token.clone(),
                },
                &app.player(7),
            ))
            .await
            .expect("list")
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.iter().map(|e| e.amount.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["5", "4", "3", "2", "1"]);
    assert_eq!(
        seen.iter().map(|a| dec(a)).sum::<rust_decimal::Decimal>(),
        app.balance(7).await
    );
    let status = expect_code(
        app.wallet()
            .list_ledger_entries(authed(
                pb::ListLedgerEntriesRequest {
                    user_id: 0,
                    page_size: 2,
                    page_token: "garbage!".into(),
                },
                &app.player(7),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_fields(&status), ["page_token"]);
}
