//! The database itself guards the ledger.

use betting_test_kit::TestApp;

#[tokio::test]
async fn ledger_entries_cannot_be_changed_or_deleted() {
    let app = TestApp::spawn().await;
    app.deposit(7, "10").await;
    for statement in [
        "UPDATE ledger_entries SET amount = 1000",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries CASCADE",
    ] {
        let err = sqlx::query(statement)
            .execute(&app.pool)
            .await
            .expect_err(statement);
        assert!(
            err.to_string().contains("append-only"),
            "{statement}: {err}"
        );
    }
    assert_eq!(app.balance(7).await, betting_test_kit::dec("10"));
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn the_database_refuses_a_negative_balance() {
    let app = TestApp::spawn().await;
    app.deposit(7, "10").await;
    let err = sqlx::query("UPDATE wallets SET balance = -1 WHERE user_id = 7")
        .execute(&app.pool)
        .await
        .expect_err("negative balance");
    assert!(
        err.to_string().contains("wallets_balance_non_negative"),
        "{err}"
    );
}
