//! Tokens and who may touch what.

use std::time::{SystemTime, UNIX_EPOCH};

use betting_api::{pb, pb_internal as pbi};
use betting_auth::{Claims, Role, TokenMinter};
use tonic::{Code, Request};

use betting_test_kit::{SECRET, TestApp, authed, expect_code};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn missing_malformed_forged_and_expired_tokens_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let minter = TokenMinter::new(SECRET.as_bytes(), None, None);
    let expired = minter
        .mint_claims(&Claims {
            sub: "42".into(),
            role: Role::Player.as_str().into(),
            iat: now() - 120,
            exp: now() - 60,
            nbf: None,
            iss: None,
            aud: None,
        })
        .expect("mint");
    let forged = TokenMinter::new(b"not-the-server-secret-not-the-server", None, None)
        .mint(42, Role::Admin, std::time::Duration::from_secs(60))
        .expect("mint");
    // A token with the right signature but no `exp`.
    let no_exp = {
        #[derive(serde::Serialize)]
        struct NoExp {
            sub: String,
            role: &'static str,
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &NoExp {
                sub: "42".into(),
                role: "player",
            },
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode")
    };
    let headers: Vec<Option<String>> = vec![
        None,
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some("Basic dXNlcjpwYXNz".into()),
        Some("Bearer not-a-jwt".into()),
        Some(format!("Bearer {forged}")),
        Some(format!("Bearer {expired}")),
        Some(format!("Bearer {no_exp}")),
    ];
    for header in headers {
        let mut request = Request::new(pb::GetWalletRequest { user_id: 0 });
        if let Some(h) = &header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("header"));
        }
        let status = expect_code(
            app.wallet().get_wallet(request).await,
            Code::Unauthenticated,
        );
        assert!(!status.message().is_empty(), "{header:?}");
        let mut request = Request::new(pb::ListBetsRequest::default());
        if let Some(h) = &header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("header"));
        }
        expect_code(app.bets().list_bets(request).await, Code::Unauthenticated);
        let mut request = Request::new(pb::GetRoundRequest {
            round_id: "r".into(),
        });
        if let Some(h) = &header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("header"));
        }
        expect_code(app.rounds().get_round(request).await, Code::Unauthenticated);
    }
}

#[tokio::test]
async fn players_cannot_move_money_or_run_rounds() {
    let app = TestApp::spawn().await;
    let player = app.player(42);
    expect_code(
        app.wallet()
            .deposit(authed(
                pb::DepositRequest {
                    user_id: 42,
                    amount: "1000".into(),
                    idempotency_key: "self-gift".into(),
                    reference: String::new(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.wallet()
            .withdraw(authed(
                pb::WithdrawRequest {
                    user_id: 42,
                    amount: "1".into(),
                    idempotency_key: "w".into(),
                    reference: String::new(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.stakes()
            .hold_stake(authed(
                pbi::HoldStakeRequest {
                    user_id: 43,
                    amount: "1".into(),
                    idempotency_key: "BET:x".into(),
                    bet_id: uuid::Uuid::new_v4().to_string(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.stakes()
            .refund_stake(authed(
                pbi::RefundStakeRequest {
                    user_id: 42,
                    amount: "1".into(),
                    idempotency_key: "REFUND:x".into(),
                    bet_id: uuid::Uuid::new_v4().to_string(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.rounds()
            .open_round(authed(
                pb::OpenRoundRequest {
                    round_id: "r".into(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.rounds()
            .close_round(authed(
                pb::CloseRoundRequest {
                    round_id: "r".into(),
                },
                &player,
            ))
            .await,
        Code::PermissionDenied,
    );
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(entries, 0);
}

#[tokio::test]
async fn players_never_see_other_players_data() {
    let app = TestApp::spawn().await;
    app.deposit(42, "100").await;
    app.open_round("r").await;
    let bet = app
        .place(42, "r", pb::Side::A, "10", "mine")
        .await
        .expect("place")
        .into_inner()
        .bet
        .expect("bet");
    let intruder = app.player(43);
    let status = expect_code(
        app.bets()
            .get_bet(authed(
                pb::GetBetRequest {
                    bet_id: bet.bet_id.clone(),
                },
                &intruder,
            ))
            .await,
        Code::NotFound,
    );
    assert!(!status.message().contains(&bet.bet_id));
    expect_code(
        app.wallet()
            .get_wallet(authed(pb::GetWalletRequest { user_id: 42 }, &intruder))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.wallet()
            .list_ledger_entries(authed(
                pb::ListLedgerEntriesRequest {
                    user_id: 42,
                    ..Default::default()
                },
                &intruder,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.bets()
            .list_bets(authed(
                pb::ListBetsRequest {
                    user_id: 42,
                    ..Default::default()
                },
                &intruder,
            ))
            .await,
        Code::PermissionDenied,
    );
    // Backends may read anyone's.
    let listed = app
        .bets()
        .list_bets(authed(
            pb::ListBetsRequest {
                user_id: 42,
                ..Default::default()
            },
            &app.admin_token(),
        ))
        .await
        .expect("backend lists")
        .into_inner();
    assert_eq!(listed.bets.len(), 1);
    // Any authenticated caller reads a round: it holds no personal data.
    app.rounds()
        .get_round(authed(
            pb::GetRoundRequest {
                round_id: "r".into(),
            },
            &intruder,
        ))
        .await
        .expect("get round");
}

/// Tokens of the retired `backend` role (minted before the split into
/// service, game, cashier and admin) are refused, saying so.
#[tokio::test]
async fn an_old_backend_token_is_refused_with_a_clear_message() {
    let app = TestApp::spawn().await;
    let old = TokenMinter::new(SECRET.as_bytes(), None, None)
        .mint_claims(&Claims {
            sub: "0".into(),
            role: "backend".into(),
            iat: now(),
            exp: now() + 60,
            nbf: None,
            iss: None,
            aud: None,
        })
        .expect("mint");
    let status = expect_code(
        app.wallet()
            .deposit(authed(
                pb::DepositRequest {
                    user_id: 42,
                    amount: "1".into(),
                    idempotency_key: "old-backend".into(),
                    reference: String::new(),
                },
                &old,
            ))
            .await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("backend role was retired"),
        "{status:?}"
    );
}
