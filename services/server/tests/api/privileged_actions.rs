//! The privileged-action trail: every deposit, withdrawal, round transition
//! and audit run leaves one row saying who did it (the token's subject and
//! role) and with which idempotency key, written with the change itself;
//! retries that change nothing add none; the table is append-only.

use betting_api::pb;
use tonic::Code;

use betting_test_kit::{TestApp, authed, expect_code};

/// (subject, role, action, target, idempotency key, detail) of every row, oldest first.
type Row = (String, String, String, String, Option<String>, String);

async fn trail(app: &TestApp) -> Vec<Row> {
    sqlx::query_as(
        "SELECT subject, role, action, target, idempotency_key, detail::TEXT \
         FROM privileged_actions ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("trail")
}

fn deposit(user: i64, amount: &str, key: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        user_id: user,
        amount: amount.into(),
        idempotency_key: key.into(),
        reference: "psp-1".into(),
    }
}

#[tokio::test]
async fn money_movements_are_recorded_with_who_and_the_key() {
    let app = TestApp::spawn().await;
    let cashier = app.cashier_token();
    for _ in 0..2 {
        // The second is a replay: no second row.
        app.wallet()
            .deposit(authed(deposit(7, "25", "dep-7"), &cashier))
            .await
            .expect("deposit");
    }
    let withdraw = |amount: &str, key: &str| {
        let mut wallet = app.wallet();
        let request = authed(
            pb::WithdrawRequest {
                user_id: 7,
                amount: amount.into(),
                idempotency_key: key.into(),
                reference: String::new(),
            },
            &cashier,
        );
        async move { wallet.withdraw(request).await }
    };
    withdraw("5", "wd-7").await.expect("withdraw");
    // Refused: nothing moved, nothing recorded.
    expect_code(withdraw("500", "wd-8").await, Code::FailedPrecondition);

    let rows = trail(&app).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (subject, role, action, target, key, detail) = &rows[0];
    assert_eq!(
        (
            subject.as_str(),
            role.as_str(),
            action.as_str(),
            target.as_str()
        ),
        ("test-cashier", "cashier", "DEPOSIT", "user:7")
    );
    assert_eq!(key.as_deref(), Some("dep-7"));
    assert!(detail.contains(r#""amount": "25""#), "{detail}");
    assert!(detail.contains(r#""reference": "psp-1""#), "{detail}");
    assert_eq!(rows[1].2, "WITHDRAWAL");
    assert_eq!(rows[1].4.as_deref(), Some("wd-7"));
}

#[tokio::test]
async fn round_transitions_and_audits_are_recorded() {
    let app = TestApp::spawn().await;
    app.open_round("r1").await;
    app.open_round("r1").await; // a retry: no second row
    app.settle_round("r1", pb::Side::B).await.expect("settle");
    app.open_round("r2").await;
    app.rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "r2".into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("close");
    app.void_round("r2").await.expect("void");
    app.void_round("r2").await.expect("void again: a retry");
    app.admin()
        .run_audit(authed(pb::RunAuditRequest {}, &app.admin_token()))
        .await
        .expect("audit");

    let rows = trail(&app).await;
    let summary: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|(_, role, action, target, _, _)| (role.as_str(), action.as_str(), target.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("game", "ROUND_OPEN", "round:r1"),
            ("game", "ROUND_SETTLE", "round:r1"),
            ("game", "ROUND_OPEN", "round:r2"),
            ("game", "ROUND_CLOSE", "round:r2"),
            ("game", "ROUND_VOID", "round:r2"),
            ("admin", "AUDIT_RUN", "books"),
        ]
    );
    assert!(
        rows[1].5.contains(r#""winning_side": "B""#),
        "{:?}",
        rows[1]
    );
    assert_eq!(rows[5].0, "test-admin");

    // The documented query: who acted on a round.
    let who: Vec<(String, String)> = sqlx::query_as(
        "SELECT subject, action FROM privileged_actions WHERE target = 'round:r2' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("query");
    assert_eq!(who.len(), 3);
}

#[tokio::test]
async fn the_trail_is_append_only() {
    let app = TestApp::spawn().await;
    app.open_round("r").await;
    for statement in [
        "UPDATE privileged_actions SET subject = 'someone-else'",
        "DELETE FROM privileged_actions",
        "TRUNCATE privileged_actions",
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
    assert_eq!(trail(&app).await.len(), 1);
}
