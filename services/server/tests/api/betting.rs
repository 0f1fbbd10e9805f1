//! PlaceBet, GetBet, ListBets and CancelBet.

use std::time::Duration;

use betting_api::{IDEMPOTENT_REPLAYED, pb};
use tonic::Code;

use betting_test_kit::{
    API_ONLY, TestApp, authed, bad_fields, dec, eventually, expect_code, reason,
};

#[tokio::test]
async fn place_bet_takes_the_stake_and_hands_the_bet_to_the_matcher() {
    // No matcher running: the job stays in Redis for us to see.
    let app = TestApp::spawn_roles(API_ONLY).await;
    app.deposit(42, "100").await;
    app.open_round("round-1").await;
    let placed = app
        .place(42, "round-1", pb::Side::A, "10.5", "bet-1")
        .await
        .expect("place bet");
    assert!(placed.metadata().get(IDEMPOTENT_REPLAYED).is_none());
    let placed = placed.into_inner();
    let bet = placed.bet.expect("bet");
    assert_eq!(placed.balance, "89.5");
    assert_eq!(bet.status, pb::BetStatus::Pending as i32);
    assert_eq!(bet.user_id, 42);
    assert_eq!(bet.round_id, "round-1");
    assert_eq!(bet.side, pb::Side::A as i32);
    assert_eq!(bet.amount, "10.5");
    assert_eq!(bet.idempotency_key, "bet-1");
    assert!(bet.version >= 1);
    // Explicit presence: a PENDING bet has no result, payout or refund
    // reason at all (not BET_RESULT_UNSPECIFIED, not "").
    assert_eq!(
        (bet.result, bet.payout.as_deref(), bet.refund_reason),
        (None, None, None)
    );
    assert_eq!(app.balance(42).await, dec("89.5"));
    assert_eq!(app.escrow().await, dec("10.5"));
    app.assert_books_balanced().await;

    // The stake is one ledger entry keyed by the bet.
    let key: String =
        sqlx::query_scalar("SELECT idempotency_key FROM ledger_entries WHERE kind = 'STAKE'")
            .fetch_one(&app.pool)
            .await
            .expect("stake entry");
    assert_eq!(key, format!("BET:{}", bet.bet_id));

    // The matcher's job is in Redis: sent right after the answer (which
    // waits for the commit, never for the queue).
    let queue = app.betting().match_queue();
    let job = eventually(
        "the match job is enqueued",
        Duration::from_secs(5),
        async || {
            queue
                .job(&format!("match:{}", bet.bet_id))
                .await
                .expect("redis")
        },
    )
    .await;
    assert_eq!(job.payload["bet_id"], bet.bet_id.as_str());

    let got = app
        .bets()
        .get_bet(authed(
            pb::GetBetRequest {
                bet_id: bet.bet_id.clone(),
            },
            &app.player(42),
        ))
        .await
        .expect("get bet")
        .into_inner()
        .bet
        .expect("bet");
    assert_eq!(got, bet);
}

#[tokio::test]
async fn a_retried_place_bet_returns_the_same_bet_and_debits_once() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    let first = app
        .place(42, "r", pb::Side::B, "30", "retry-me")
        .await
        .expect("first")
        .into_inner();
    let again = app
        .place(42, "r", pb::Side::B, "30", "retry-me")
        .await
        .expect("retry");
    assert_eq!(
        again
            .metadata()
            .get(IDEMPOTENT_REPLAYED)
            .map(|v| v.to_str().ok()),
        Some(Some("true"))
    );
    let again = again.into_inner();
    assert_eq!(first.bet, again.bet);
    assert_eq!(
        again.balance, "70",
        "a replay reports the balance right after the original debit"
    );
    assert_eq!(app.balance(42).await, dec("70"));

    // The same key for another bet is refused, and nothing moves.
    for (side, amount, round) in [(pb::Side::A, "30", "r"), (pb::Side::B, "31", "r")] {
        let status = expect_code(
            app.place(42, round, side, amount, "retry-me").await,
            Code::AlreadyExists,
        );
        assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(app.balance(42).await, dec("70"));
    // Keys are scoped to the user: another player may use the same one.
    app.deposit(43, "5").await;
    app.place(43, "r", pb::Side::A, "5", "retry-me")
        .await
        .expect("other user, same key");
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn insufficient_funds_refuses_and_debits_nothing() {
    let app = TestApp::spawn().await;
    app.deposit(42, "5").await;
    app.open_round("r").await;
    let status = expect_code(
        app.place(42, "r", pb::Side::A, "5.00000001", "too-much")
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    assert_eq!(app.balance(42).await, dec("5"));
    assert_eq!(app.escrow().await, dec("0"));
    // The refused bet is nowhere to be seen.
    let list = app
        .bets()
        .list_bets(authed(pb::ListBetsRequest::default(), &app.player(42)))
        .await
        .expect("list")
        .into_inner();
    assert!(list.bets.is_empty());
    // A player without any wallet is refused the same way.
    expect_code(
        app.place(77, "r", pb::Side::A, "1", "k").await,
        Code::FailedPrecondition,
    );
    app.assert_books_balanced().await;
}

#[tokio::test]
async fn rounds_must_exist_and_be_open() {
    let app = TestApp::spawn().await;
    app.deposit(42, "50").await;
    let status = expect_code(
        app.place(42, "nope", pb::Side::A, "1", "k1").await,
        Code::NotFound,
    );
    assert_eq!(reason(&status), "ROUND_NOT_FOUND");
    app.open_round("r").await;
    app.rounds()
        .close_round(authed(
            pb::CloseRoundRequest {
                round_id: "r".into(),
            },
            &app.game_token(),
        ))
        .await
        .expect("close");
    let status = expect_code(
        app.place(42, "r", pb::Side::A, "1", "k2").await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&status), "ROUND_NOT_OPEN");
    assert_eq!(app.balance(42).await, dec("50"));
}

#[tokio::test]
async fn every_bad_amount_is_invalid_argument() {
    let app = TestApp::spawn().await;
    app.deposit(42, "1000").await;
    app.open_round("r").await;
    let bad = [
        "0",
        "-1",
        "-0",
        "1e3",
        "NaN",
        "Infinity",
        "0.000000001",
        " 1",
        "1,000",
        "١٢٣",
        "99999999999999999999999999999",
        "",
    ];
    for (i, amount) in bad.iter().enumerate() {
        let status = expect_code(
            app.place(42, "r", pb::Side::A, amount, &format!("bad-{i}"))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_fields(&status), ["amount"], "amount {amount:?}");
    }
    for side in [pb::Side::Unspecified as i32, 3, -1] {
        let status = expect_code(
            app.bets()
                .place_bet(authed(
                    pb::PlaceBetRequest {
                        round_id: "r".into(),
                        side,
                        amount: "1".into(),
                        idempotency_key: format!("side-{side}"),
                    },
                    &app.player(42),
                ))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_fields(&status), ["side"], "side {side}");
    }
    let status = expect_code(
        app.bets()
            .place_bet(authed(
                pb::PlaceBetRequest {
                    round_id: "bad round!".into(),
                    side: 1,
                    amount: "1".into(),
                    idempotency_key: String::new(),
                },
                &app.player(42),
            ))
            .await,
        Code::InvalidArgument,
    );
    let mut fields = bad_fields(&status);
    fields.sort();
    assert_eq!(fields, ["idempotency_key", "round_id"]);
    assert_eq!(app.balance(42).await, dec("1000"), "nothing moved");
    let bets: i64 = sqlx::query_scalar("SELECT count(*) FROM bets")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(bets, 0);
}

#[tokio::test]
async fn cancel_returns_the_stake_once() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    let bet = app
        .place(42, "r", pb::Side::A, "40", "c1")
        .await
        .expect("place")
        .into_inner()
        .bet
        .expect("bet");
    let cancel = || {
        let mut client = app.bets();
        let request = authed(
            pb::CancelBetRequest {
                bet_id: bet.bet_id.clone(),
            },
            &app.player(42),
        );
        async move { client.cancel_bet(request).await }
    };
    let cancelled = cancel().await.expect("cancel").into_inner();
    let refunded = cancelled.bet.expect("bet");
    assert_eq!(refunded.status, pb::BetStatus::Refunded as i32);
    assert_eq!(
        refunded.refund_reason,
        Some(pb::RefundReason::Cancelled as i32)
    );
    assert!(refunded.version > bet.version);
    assert_eq!(cancelled.balance, "100");
    // Cancelling again answers the same and refunds nothing more.
    let again = cancel().await.expect("cancel again").into_inner();
    assert_eq!(again.balance, "100");
    assert_eq!(app.balance(42).await, dec("100"));
    assert_eq!(app.escrow().await, dec("0"));
    let refunds: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'REFUND'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(refunds, 1);
    app.assert_books_balanced().await;

    // Someone else's bet is not found, and stays as it is.
    let other = app
        .place(42, "r", pb::Side::A, "10", "c2")
        .await
        .expect("place")
        .into_inner()
        .bet
        .expect("bet");
    let status = expect_code(
        app.bets()
            .cancel_bet(authed(
                pb::CancelBetRequest {
                    bet_id: other.bet_id.clone(),
                },
                &app.player(43),
            ))
            .await,
        Code::NotFound,
    );
    assert_eq!(reason(&status), "BET_NOT_FOUND");
    assert_eq!(app.balance(42).await, dec("90"));
}

#[tokio::test]
async fn list_bets_filters_and_pages() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r1").await;
    app.open_round("r2").await;
    for i in 0..5 {
        let round = if i % 2 == 0 { "r1" } else { "r2" };
        app.place(42, round, pb::Side::A, "1", &format!("l{i}"))
            .await
            .expect("place");
    }
    let list = |round: &str, page_token: String| {
        let mut client = app.bets();
        let request = authed(
            pb::ListBetsRequest {
                round_id: round.into(),
                status: 0,
                page_size: 2,
                page_token,
                user_id: 0,
            },
            &app.player(42),
        );
        async move { client.list_bets(request).await }
    };
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let page = list("r1", token).await.expect("list").into_inner();
        keys.extend(page.bets.iter().map(|b| b.idempotency_key.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(keys, ["l4", "l2", "l0"], "newest first, only round r1");
    let refunded = app
        .bets()
        .list_bets(authed(
            pb::ListBetsRequest {
                status: pb::BetStatus::Refunded as i32,
                ..Default::default()
            },
            &app.player(42),
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(refunded.bets.is_empty());
    // Nobody else sees them.
    let theirs = app
        .bets()
        .list_bets(authed(pb::ListBetsRequest::default(), &app.player(43)))
        .await
        .expect("list")
        .into_inner();
    assert!(theirs.bets.is_empty());
}
